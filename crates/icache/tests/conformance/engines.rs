//! The template engines people use (Askama, maud), each through the same
//! block tests on a real Redis and in-process: a hit skips the body, a bump
//! re-renders, nested blocks invalidate the outer one, output identical to
//! the uncached render (escaping included), one render for many threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use askama::Template;
use icache::ICache;
use maud::{Markup, html};

use crate::support::RedisServer;

const TRICKY: &str = "Tom & \"Jerry\" <script>alert('x')</script>";

fn caches(redis: &RedisServer) -> Vec<ICache> {
    vec![
        ICache::memory(),
        ICache::from_url(&format!("{}?timeout_ms=2000", redis.url())).expect("redis"),
    ]
}

// ---- maud ------------------------------------------------------------------

fn maud_list(items: &[String]) -> Markup {
    html! { ul { @for i in items { li title=(i) { (i) } } } }
}

/// The page, with the list cached under `tokens`; `renders` counts bodies.
fn maud_page(cache: &ICache, tokens: &[&str], items: &[String], renders: &AtomicUsize) -> String {
    html! {
        h1 { "Items" }
        (icache::maud::cached(cache, "list", tokens, || {
            renders.fetch_add(1, Ordering::SeqCst);
            maud_list(items)
        }))
    }
    .into_string()
}

#[test]
fn maud_blocks() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    for cache in caches(&redis) {
        let renders = AtomicUsize::new(0);
        let items = vec![TRICKY.to_string(), "plain".to_string()];
        let tokens = ["items"];
        let uncached = html! { h1 { "Items" } (maud_list(&items)) }.into_string();
        let first = maud_page(&cache, &tokens, &items, &renders);
        assert_eq!(
            first, uncached,
            "identical to the uncached render, escaping included"
        );
        let hit = maud_page(&cache, &tokens, &["other".to_string()], &renders);
        assert_eq!(hit, first, "a hit");
        assert_eq!(renders.load(Ordering::SeqCst), 1, "the body ran once");
        cache.incr("items").expect("bump");
        let after = maud_page(&cache, &tokens, &["new".to_string()], &renders);
        assert!(after.contains("<li title=\"new\">new</li>"), "{after}");

        // Nested: the outer block depends on the inner block's token.
        let outer = |inner_item: &str| {
            html! {
                (icache::maud::cached(&cache, "outer", &["outer"], || html! {
                    div { (icache::maud::cached(&cache, "inner", &["inner"], || html! { p { (inner_item) } })) }
                }))
            }
            .into_string()
        };
        assert_eq!(outer("one"), "<div><p>one</p></div>");
        assert_eq!(outer("two"), "<div><p>one</p></div>", "a hit");
        cache.incr("inner").expect("bump the inner token");
        assert_eq!(
            outer("three"),
            "<div><p>three</p></div>",
            "the outer block re-rendered"
        );

        // Many threads miss at once: one render.
        let renders = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (cache, renders) = (cache.clone(), renders.clone());
                thread::spawn(move || {
                    html! {
                        (icache::maud::cached(&cache, "herd", &["herd"], || {
                            renders.fetch_add(1, Ordering::SeqCst);
                            thread::sleep(std::time::Duration::from_millis(200));
                            html! { p { "herd" } }
                        }))
                    }
                    .into_string()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("thread"), "<p>herd</p>");
        }
        assert_eq!(renders.load(Ordering::SeqCst), 1, "single-flight");
    }
}

// ---- Askama ----------------------------------------------------------------

#[derive(Template)]
#[template(
    source = "<ul>{% for i in items %}<li title=\"{{ i }}\">{{ i }}</li>{% endfor %}</ul>",
    ext = "html"
)]
struct List {
    items: Vec<String>,
}

#[derive(Template)]
#[template(source = "<h1>Items</h1>{{ list }}", ext = "html")]
struct Page<'a> {
    list: icache::askama::Cached<'a, List>,
}

#[derive(Template)]
#[template(source = "<h1>Items</h1>{{ list }}", ext = "html")]
struct PlainPage {
    list: String,
}

#[derive(Template)]
#[template(source = "<p>{{ item }}</p>", ext = "html")]
struct Inner {
    item: String,
}

#[derive(Template)]
#[template(source = "<div>{{ inner }}</div>", ext = "html")]
struct Outer<'a> {
    inner: icache::askama::Cached<'a, Inner>,
}

#[derive(Template)]
#[template(source = "{{ outer }}", ext = "html")]
struct Wrapper<'a> {
    outer: icache::askama::Cached<'a, Outer<'a>>,
}

#[test]
fn askama_blocks() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    for cache in caches(&redis) {
        let renders = AtomicUsize::new(0);
        let tokens = ["items"];
        let page = |items: &[&str]| {
            let items: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
            Page {
                list: icache::askama::cached(&cache, "list", &tokens, {
                    let renders = &renders;
                    move || {
                        renders.fetch_add(1, Ordering::SeqCst);
                        List {
                            items: items.clone(),
                        }
                    }
                }),
            }
            .render()
            .expect("render")
        };
        let items = [TRICKY, "plain"];
        let uncached = PlainPage {
            list: List {
                items: items.iter().map(|s| (*s).to_owned()).collect(),
            }
            .render()
            .expect("list"),
        };
        // The uncached page writes the inner HTML through `|safe`-free
        // `{{ }}`, which would escape it: compare with the list rendered
        // alone instead.
        let first = page(&items);
        assert_eq!(
            first,
            format!("<h1>Items</h1>{}", uncached.list),
            "not escaped twice"
        );
        assert_eq!(page(&["other"]), first, "a hit");
        assert_eq!(renders.load(Ordering::SeqCst), 1);
        cache.incr("items").expect("bump");
        assert!(page(&["new"]).contains("<li title=\"new\">new</li>"));

        let c = &cache;
        let wrapper = |item: &str| {
            let item = item.to_owned();
            Wrapper {
                outer: icache::askama::cached(c, "outer", &["outer"], move || Outer {
                    inner: icache::askama::cached(c, "inner", &["inner"], {
                        let item = item.clone();
                        move || Inner { item: item.clone() }
                    }),
                }),
            }
            .render()
            .expect("render")
        };
        assert_eq!(wrapper("one"), "<div><p>one</p></div>");
        assert_eq!(wrapper("two"), "<div><p>one</p></div>", "a hit");
        cache.incr("inner").expect("bump the inner token");
        assert_eq!(
            wrapper("three"),
            "<div><p>three</p></div>",
            "the outer block re-rendered"
        );

        let renders = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (cache, renders) = (cache.clone(), renders.clone());
                thread::spawn(move || {
                    icache::askama::cached(&cache, "herd", &["herd"], move || {
                        renders.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(std::time::Duration::from_millis(200));
                        Inner {
                            item: "herd".into(),
                        }
                    })
                    .to_string()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("thread"), "<p>herd</p>");
        }
        assert_eq!(renders.load(Ordering::SeqCst), 1, "single-flight");
    }
}

// ---- Tera ------------------------------------------------------------------

#[test]
fn tera_blocks() {
    use std::sync::atomic::AtomicBool;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    for cache in caches(&redis) {
        let renders = Arc::new(AtomicUsize::new(0));
        let items = Arc::new(std::sync::Mutex::new(vec![
            TRICKY.to_string(),
            "plain".to_string(),
        ]));
        let fail_once = Arc::new(AtomicBool::new(false));
        let mut tera = tera::Tera::default();
        icache::tera::register(&mut tera, cache.clone());
        let (r, i, f) = (renders.clone(), items.clone(), fail_once.clone());
        tera.register_function("items", move |_: tera::Kwargs, _: &tera::State| {
            if f.swap(false, Ordering::SeqCst) {
                return Err(tera::Error::message("the database went away"));
            }
            r.fetch_add(1, Ordering::SeqCst);
            Ok(i.lock().expect("items").clone())
        });
        let body = "<ul>{% for i in items() %}<li title=\"{{ i }}\">{{ i }}</li>{% endfor %}</ul>";
        let source = format!(
            "{{% load icache %}}<h1>Items</h1>{{% icache 'items' %}}{body}{{% endicache %}}"
        );
        tera.add_raw_template(
            "page.html",
            &icache::tera::rewrite("page.html", &source).expect("rewrite"),
        )
        .expect("page");
        tera.add_raw_template("plain.html", &format!("<h1>Items</h1>{body}"))
            .expect("plain");
        let ctx = tera::Context::new();
        let uncached = tera.render("plain.html", &ctx).expect("plain");
        let first = icache::tera::render(&tera, "page.html", &ctx).expect("render");
        assert_eq!(
            first, uncached,
            "identical to the uncached render, escaping included"
        );
        let renders_before = renders.load(Ordering::SeqCst);
        *items.lock().expect("items") = vec!["other".into()];
        assert_eq!(
            icache::tera::render(&tera, "page.html", &ctx).expect("hit"),
            first,
            "a hit"
        );
        assert_eq!(
            renders.load(Ordering::SeqCst),
            renders_before,
            "the hit skipped the body"
        );
        cache.incr("items").expect("bump");
        let after = icache::tera::render(&tera, "page.html", &ctx).expect("render");
        assert!(after.contains("<li title=\"other\">other</li>"), "{after}");

        // Nested blocks: the outer one depends on the inner one's token.
        let nested = "{% load icache %}{% icache 'outer' %}<div>{% icache 'inner' %}<p>{{ word }}</p>{% endicache %}</div>{% endicache %}";
        tera.add_raw_template(
            "nested.html",
            &icache::tera::rewrite("nested.html", nested).expect("rewrite"),
        )
        .expect("nested");
        let with = |word: &str| {
            let mut ctx = tera::Context::new();
            ctx.insert("word", word);
            icache::tera::render(&tera, "nested.html", &ctx).expect("nested")
        };
        assert_eq!(with("one"), "<div><p>one</p></div>");
        assert_eq!(with("two"), "<div><p>one</p></div>", "a hit");
        cache.incr("inner").expect("bump the inner token");
        assert_eq!(
            with("three"),
            "<div><p>three</p></div>",
            "the outer block re-rendered"
        );

        // An error halfway stores nothing and leaves nothing behind.
        cache.incr("items").expect("bump");
        fail_once.store(true, Ordering::SeqCst);
        assert!(icache::tera::render(&tera, "page.html", &ctx).is_err());
        *items.lock().expect("items") = vec!["fresh".into()];
        let fresh = icache::tera::render(&tera, "page.html", &ctx).expect("render");
        assert!(fresh.contains(">fresh<"), "{fresh}");
        assert_eq!(
            icache::tera::render(&tera, "page.html", &ctx).expect("hit"),
            fresh
        );

        // A `none` token: rendered uncached, never merged.
        let per_user = "{% load icache %}{% icache 'p' user %}<p>{{ name }}</p>{% endicache %}";
        tera.add_raw_template(
            "user.html",
            &icache::tera::rewrite("user.html", per_user).expect("rewrite"),
        )
        .expect("user");
        let as_user = |name: &str| {
            let mut ctx = tera::Context::new();
            ctx.insert("name", name);
            ctx.insert("user", &Option::<i64>::None);
            icache::tera::render(&tera, "user.html", &ctx).expect("user")
        };
        assert_eq!(
            (as_user("Ann"), as_user("Bob")),
            ("<p>Ann</p>".to_string(), "<p>Bob</p>".to_string())
        );
    }
}
