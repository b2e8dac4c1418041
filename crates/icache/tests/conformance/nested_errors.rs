//! An inner block that ends in an error (or a panic) which the outer body
//! catches: the outer output (a fallback in the inner's place) depends on
//! the inner's tokens, which nobody recorded. Stored, it would never be
//! replaced by a bump of them; so it is not stored, in every engine.

use std::convert::Infallible;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use askama::Template;
use icache::{ICache, NotStored, Outcome};

use crate::Ctx;

suite!(nested_errors = crate::nested_errors::cases:
    caught_inner_error_leaves_the_outer_unstored,
    caught_inner_panic_leaves_the_outer_unstored,
    askama_inner_error,
    maud_inner_panic,
    minijinja_inner_error,
    tera_inner_error,
);

/// Renders `outer` around `inner(fails)` twice: first with the inner
/// failing (the outer shows the fallback and is not stored), then with it
/// working (the outer must show it: a stored fallback would be served until
/// `item:1` is bumped, and with the old code not even then).
fn check(ctx: &Ctx, engine: &str, inner: impl Fn(&ICache, bool) -> String) {
    let cache = &ctx.cache;
    let outer_name = format!("outer-{engine}");
    let page = |fails: bool| {
        cache.fragment(&outer_name, &["page"], || {
            Ok::<_, Infallible>(format!("<main>{}</main>", inner(cache, fails)))
        })
    };
    let (first, events) = icache::observe(|| page(true));
    assert_eq!(first.as_deref(), Ok("<main>fallback</main>"), "{engine}");
    let outer = events.last().expect("an event for the outer block");
    assert_eq!(
        outer.outcome,
        Outcome::NotStored(NotStored::NestedUnknown),
        "{engine}: {events:?}"
    );
    let second = page(false);
    assert_eq!(second.as_deref(), Ok("<main><li>1</li></main>"), "{engine}");
    // The working render was stored (and then serves), and a bump of the
    // inner token replaces it as usual.
    assert_eq!(
        cache
            .fragment(&outer_name, &["page"], || Ok::<_, Infallible>("x".into()))
            .as_deref(),
        Ok("<main><li>1</li></main>")
    );
    cache.incr("item:1").expect("incr");
    assert_eq!(
        cache
            .fragment(&outer_name, &["page"], || Ok::<_, Infallible>("new".into()))
            .as_deref(),
        Ok("new"),
        "{engine}"
    );
}

struct Fails;

impl fmt::Display for Fails {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        Err(fmt::Error)
    }
}

#[derive(Template)]
#[template(
    source = "{% if fails %}{{ boom }}{% else %}<li>1</li>{% endif %}",
    ext = "txt"
)]
struct Item {
    fails: bool,
    boom: Fails,
}

#[derive(Template)]
#[template(source = "{{ item }}", ext = "txt")]
struct Holder<'a> {
    item: icache::askama::Cached<'a, Item>,
}

pub mod cases {
    use super::*;

    /// The case: `unwrap_or_else(|_| fallback)` around an inner
    /// block whose body fails.
    pub fn caught_inner_error_leaves_the_outer_unstored(ctx: &Ctx) {
        check(ctx, "fragment", |cache, fails| {
            cache
                .fragment("inner", &["item:1"], || {
                    if fails {
                        Err("db down")
                    } else {
                        Ok("<li>1</li>".to_owned())
                    }
                })
                .unwrap_or_else(|_| "fallback".to_owned())
        });
    }

    pub fn caught_inner_panic_leaves_the_outer_unstored(ctx: &Ctx) {
        check(ctx, "panic", |cache, fails| {
            catch_unwind(AssertUnwindSafe(|| {
                cache.fragment("inner", &["item:1"], || {
                    assert!(!fails, "the inner body panics (expected by the test)");
                    Ok::<_, Infallible>("<li>1</li>".to_owned())
                })
            }))
            .map_or_else(|_| "fallback".to_owned(), |r| r.unwrap_or_default())
        });
    }

    pub fn askama_inner_error(ctx: &Ctx) {
        check(ctx, "askama", |cache, fails| {
            Holder {
                item: icache::askama::cached(cache, "inner", &["item:1"], move || Item {
                    fails,
                    boom: Fails,
                }),
            }
            .render()
            .unwrap_or_else(|_| "fallback".to_owned())
        });
    }

    pub fn maud_inner_panic(ctx: &Ctx) {
        check(ctx, "maud", |cache, fails| {
            catch_unwind(AssertUnwindSafe(|| {
                maud::html! {
                    (icache::maud::cached(cache, "inner", &["item:1"], || {
                        assert!(!fails, "the inner body panics (expected by the test)");
                        maud::html! { li { "1" } }
                    }))
                }
                .into_string()
            }))
            .unwrap_or_else(|_| "fallback".to_owned())
        });
    }

    pub fn minijinja_inner_error(ctx: &Ctx) {
        let fails = Arc::new(AtomicBool::new(false));
        let mut env = minijinja::Environment::new();
        icache::minijinja::register(&mut env, ctx.cache.clone());
        let f = fails.clone();
        env.add_function("item", move || {
            if f.load(Ordering::SeqCst) {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    "db down",
                ))
            } else {
                Ok("<li>1</li>".to_owned())
            }
        });
        let src = "{% call icache('item:1', name='inner') %}{{ item()|safe }}{% endcall %}";
        env.add_template("item.html", src).expect("template");
        check(ctx, "minijinja", |_, fail| {
            fails.store(fail, Ordering::SeqCst);
            env.get_template("item.html")
                .and_then(|t| t.render(minijinja::context! {}))
                .unwrap_or_else(|_| "fallback".to_owned())
        });
    }

    pub fn tera_inner_error(ctx: &Ctx) {
        let fails = Arc::new(AtomicBool::new(false));
        let mut tera = tera::Tera::default();
        icache::tera::register(&mut tera, ctx.cache.clone());
        let f = fails.clone();
        tera.register_function("item", move |_: tera::Kwargs, _: &tera::State| {
            if f.load(Ordering::SeqCst) {
                Err(tera::Error::message("db down"))
            } else {
                Ok(tera::Value::safe_string("<li>1</li>"))
            }
        });
        let src = "{% load icache %}{% icache 'item:1' %}{{ item() }}{% endicache %}";
        let rewritten = icache::tera::rewrite("item.html", src).expect("rewrite");
        tera.add_raw_template("item.html", &rewritten)
            .expect("template");
        check(ctx, "tera", |_, fail| {
            fails.store(fail, Ordering::SeqCst);
            icache::tera::render(&tera, "item.html", &tera::Context::new())
                .unwrap_or_else(|_| "fallback".to_owned())
        });
    }
}
