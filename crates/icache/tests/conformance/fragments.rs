//! Cached blocks (`fragment`, MiniJinja) on every backend.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use icache::ICache;
use minijinja::Environment;

use crate::support::Proxy;
use crate::{Ctx, Kind, Server};

suite!(blocks = crate::fragments::cases:
    hit_does_not_render,
    every_argument_is_key_and_token,
    render_error_propagates_and_is_not_cached,
    outdated_output_is_returned_not_stored,
    single_flight_32_threads_render_once,
    nested_fragments_invalidate_outer,
    minijinja_both_forms_and_seed_semantics,
    minijinja_block_identity,
    minijinja_nested_blocks,
    minijinja_escaping_is_exact,
    async_fragments,
    stats_count_what_happened,
    too_large_is_served_uncached,
);

/// A MiniJinja environment with icache and a `count()` function that counts
/// body renders.
fn env(cache: &ICache) -> (Environment<'static>, Arc<AtomicUsize>) {
    let mut env = Environment::new();
    icache::minijinja::register(&mut env, cache.clone());
    let renders = Arc::new(AtomicUsize::new(0));
    let r = renders.clone();
    env.add_function("count", move || {
        r.fetch_add(1, Ordering::SeqCst);
        String::new()
    });
    (env, renders)
}

fn add(env: &mut Environment<'static>, name: &str, src: &str) {
    let rewritten = icache::minijinja::rewrite(name, src).expect("rewrite");
    env.add_template_owned(name.to_owned(), rewritten)
        .expect("template");
}

fn render(env: &Environment<'static>, name: &str, ctx: minijinja::Value) -> String {
    env.get_template(name)
        .expect("get")
        .render(ctx)
        .expect("render")
}

pub mod cases {
    use super::*;

    pub fn hit_does_not_render(ctx: &Ctx) {
        let c = &ctx.cache;
        let renders = AtomicUsize::new(0);
        let body = || {
            renders.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::convert::Infallible>("<ul>list</ul>".to_string())
        };
        let user_id = "42".to_string();
        let args = ["movies-personal-rating", "movies", user_id.as_str()];
        assert_eq!(
            c.fragment("t", &args, body).expect("render"),
            "<ul>list</ul>"
        );
        assert_eq!(c.fragment("t", &args, body).expect("hit"), "<ul>list</ul>");
        assert_eq!(c.fragment("t", &args, body).expect("hit"), "<ul>list</ul>");
        assert_eq!(renders.load(Ordering::SeqCst), 1);
        c.incr("movies").expect("incr");
        c.fragment("t", &args, body).expect("render");
        assert_eq!(renders.load(Ordering::SeqCst), 2);
        c.fragment("t", &args, body).expect("hit");
        assert_eq!(renders.load(Ordering::SeqCst), 2);
    }

    pub fn every_argument_is_key_and_token(ctx: &Ctx) {
        let c = &ctx.cache;
        let out = |args: &[&str]| {
            let s = format!("{args:?}");
            c.fragment("t", args, || Ok::<_, ()>(s)).expect("fragment")
        };
        assert_eq!(out(&["a", "b"]), "[\"a\", \"b\"]");
        assert_eq!(out(&["a", "c"]), "[\"a\", \"c\"]");
        assert_eq!(out(&["a#b"]), "[\"a#b\"]");
        assert_eq!(out(&["b", "a"]), "[\"b\", \"a\"]");
        // Still each its own after hits.
        assert_eq!(out(&["a", "b"]), "[\"a\", \"b\"]");
        assert_eq!(out(&["a#b"]), "[\"a#b\"]");
        // Bumping "b" invalidates ["a","b"] only.
        let renders = AtomicUsize::new(0);
        let count = |args: &[&str]| {
            c.fragment("t", args, || {
                renders.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>(String::new())
            })
            .expect("fragment")
        };
        count(&["a", "b"]);
        count(&["a", "c"]);
        assert_eq!(renders.load(Ordering::SeqCst), 0);
        c.incr("b").expect("incr");
        count(&["a", "b"]);
        count(&["a", "c"]);
        assert_eq!(renders.load(Ordering::SeqCst), 1);
        // Named blocks never share an entry with each other.
        let a = c
            .fragment("one", &["t"], || Ok::<_, ()>("one".into()))
            .expect("f");
        let b = c
            .fragment("two", &["t"], || Ok::<_, ()>("two".into()))
            .expect("f");
        assert_eq!((a.as_str(), b.as_str()), ("one", "two"));
    }

    pub fn render_error_propagates_and_is_not_cached(ctx: &Ctx) {
        let c = &ctx.cache;
        #[derive(Debug, PartialEq)]
        struct MyError(u32);
        let e = c
            .fragment("t", &["err"], || Err::<String, _>(MyError(7)))
            .expect_err("error");
        assert_eq!(e, MyError(7));
        let out = c
            .fragment("t", &["err"], || Ok::<_, MyError>("fine".into()))
            .expect("ok");
        assert_eq!(out, "fine");
    }

    pub fn outdated_output_is_returned_not_stored(ctx: &Ctx) {
        let c = &ctx.cache;
        let before = c.stats();
        // A writer bumps the token while the block renders.
        let out = c
            .fragment("t", &["racy"], || {
                c.incr("racy").map_err(|e| e.to_string())?;
                Ok::<_, String>("rendered during a change".into())
            })
            .expect("render");
        assert_eq!(out, "rendered during a change");
        let after = c.stats();
        assert_eq!(after.outdated - before.outdated, 1);
        assert_eq!(after.stores, before.stores);
        // So the next request renders again (and stores this time).
        let renders = AtomicUsize::new(0);
        c.fragment("t", &["racy"], || {
            renders.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>("fresh".into())
        })
        .expect("render");
        assert_eq!(renders.load(Ordering::SeqCst), 1);
        assert_eq!(c.stats().stores, before.stores + 1);
    }

    pub fn single_flight_32_threads_render_once(ctx: &Ctx) {
        let c = &ctx.cache;
        let renders = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(32));
        let threads: Vec<_> = (0..32)
            .map(|_| {
                let (c, renders, barrier) = (c.clone(), renders.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    c.fragment("t", &["herd", "movies"], || {
                        renders.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(Duration::from_millis(300));
                        Ok::<_, ()>("the list".to_string())
                    })
                    .expect("fragment")
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("thread"), "the list");
        }
        assert_eq!(
            renders.load(Ordering::SeqCst),
            1,
            "the herd rendered more than once"
        );
    }

    pub fn nested_fragments_invalidate_outer(ctx: &Ctx) {
        let c = &ctx.cache;
        let outer_renders = AtomicUsize::new(0);
        let page = || {
            c.fragment("t", &["page"], || {
                outer_renders.fetch_add(1, Ordering::SeqCst);
                let inner =
                    c.fragment("t", &["inner-token"], || Ok::<_, ()>("inner".to_string()))?;
                Ok::<_, ()>(format!("<main>{inner}</main>"))
            })
            .expect("page")
        };
        assert_eq!(page(), "<main>inner</main>");
        assert_eq!(page(), "<main>inner</main>");
        assert_eq!(outer_renders.load(Ordering::SeqCst), 1);
        // Bumping only the inner token invalidates the outer block.
        c.incr("inner-token").expect("incr");
        page();
        assert_eq!(outer_renders.load(Ordering::SeqCst), 2);
        page();
        assert_eq!(outer_renders.load(Ordering::SeqCst), 2);
        // A fresh handle (another process, no hints) still sees the nesting.
        if ctx.kind != Kind::Memory {
            let other = ctx.open("");
            let renders = AtomicUsize::new(0);
            let render = || {
                other
                    .fragment("t", &["page"], || {
                        renders.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, ()>(String::new())
                    })
                    .expect("page")
            };
            assert_eq!(render(), "<main>inner</main>", "hit from the other handle");
            c.incr("inner-token").expect("incr");
            render();
            assert_eq!(renders.load(Ordering::SeqCst), 1);
        }
    }

    pub fn minijinja_both_forms_and_seed_semantics(ctx: &Ctx) {
        let (mut env, renders) = env(&ctx.cache);
        add(
            &mut env,
            "seed.html",
            "{% load icache %}{% icache 'movies-personal-rating' 'movies' user.id %}{{ count() }}<ol>{{ user.name }}</ol>{% endicache %}",
        );
        add(
            &mut env,
            "call.html",
            "{% call icache('movies', user.id) %}{{ count() }}<ul>{{ user.name }}</ul>{% endcall %}",
        );
        let ann = minijinja::context! { user => minijinja::context! { id => 1, name => "Ann" } };
        let bob = minijinja::context! { user => minijinja::context! { id => 2, name => "Bob" } };
        assert_eq!(render(&env, "seed.html", ann.clone()), "<ol>Ann</ol>");
        assert_eq!(
            render(&env, "seed.html", bob.clone()),
            "<ol>Bob</ol>",
            "user.id is part of the key"
        );
        assert_eq!(render(&env, "seed.html", ann.clone()), "<ol>Ann</ol>");
        assert_eq!(renders.load(Ordering::SeqCst), 2);
        assert_eq!(render(&env, "call.html", ann.clone()), "<ul>Ann</ul>");
        assert_eq!(render(&env, "call.html", ann.clone()), "<ul>Ann</ul>");
        assert_eq!(renders.load(Ordering::SeqCst), 3);
        // The value of an expression, as a string, is a token: bump user 1.
        ctx.cache.incr("1").expect("incr");
        assert_eq!(render(&env, "seed.html", ann), "<ol>Ann</ol>");
        assert_eq!(render(&env, "seed.html", bob), "<ol>Bob</ol>");
        assert_eq!(renders.load(Ordering::SeqCst), 4);
        // The loader form, and its errors name the template and line.
        let mut env2 = Environment::new();
        icache::minijinja::register(&mut env2, ctx.cache.clone());
        env2.set_loader(icache::minijinja::loader(|name: &str| {
            Ok(match name {
                "ok.html" => Some("{% icache 'movies' %}loaded{% endicache %}".to_string()),
                "bad.html" => Some("one\ntwo\n{% icache 'movies' %}never closed".to_string()),
                _ => None,
            })
        }));
        assert_eq!(
            env2.get_template("ok.html")
                .expect("ok")
                .render(())
                .expect("render"),
            "loaded"
        );
        let e = env2
            .get_template("bad.html")
            .expect_err("unclosed")
            .to_string();
        assert!(
            e.contains("bad.html line 3") && e.contains("unclosed"),
            "{e}"
        );
        // A render error inside a block is the template's error.
        add(
            &mut env,
            "boom.html",
            "{% icache 'x' %}{{ nope() }}{% endicache %}",
        );
        assert!(
            env.get_template("boom.html")
                .expect("t")
                .render(())
                .is_err()
        );
    }

    pub fn minijinja_block_identity(ctx: &Ctx) {
        let (mut env, renders) = env(&ctx.cache);
        // Same arguments, two blocks in one template and one in another.
        add(
            &mut env,
            "a.html",
            "{% icache 'movies' %}{{ count() }}first{% endicache %}|{% icache 'movies' %}{{ count() }}second{% endicache %}",
        );
        add(
            &mut env,
            "b.html",
            "{% icache 'movies' %}{{ count() }}other{% endicache %}",
        );
        // Hand-written call blocks, told apart by name= (or by the rewrite).
        env.add_template(
            "c.html",
            "{% call icache('movies', name='x') %}x{% endcall %}|{% call icache('movies', name='y') %}y{% endcall %}",
        )
        .expect("c");
        add(
            &mut env,
            "d.html",
            "{% call icache('movies') %}p{% endcall %}|{% call icache('movies') %}q{% endcall %}",
        );
        for _ in 0..2 {
            assert_eq!(render(&env, "a.html", ().into()), "first|second");
            assert_eq!(render(&env, "b.html", ().into()), "other");
            assert_eq!(render(&env, "c.html", ().into()), "x|y");
            assert_eq!(render(&env, "d.html", ().into()), "p|q");
        }
        assert_eq!(renders.load(Ordering::SeqCst), 3);
        // Editing a block's source invalidates it, with no bump.
        add(
            &mut env,
            "b.html",
            "{% icache 'movies' %}{{ count() }}edited{% endicache %}",
        );
        assert_eq!(render(&env, "b.html", ().into()), "edited");
        assert_eq!(renders.load(Ordering::SeqCst), 4);
    }

    pub fn minijinja_nested_blocks(ctx: &Ctx) {
        let (mut env, renders) = env(&ctx.cache);
        add(
            &mut env,
            "page.html",
            "{% icache 'page' %}{{ count() }}<main>{% icache 'movies' user %}<ul>{{ user }}</ul>{% endicache %}</main>{% endicache %}",
        );
        let ctx1 = minijinja::context! { user => "ann" };
        assert_eq!(
            render(&env, "page.html", ctx1.clone()),
            "<main><ul>ann</ul></main>"
        );
        assert_eq!(
            render(&env, "page.html", ctx1.clone()),
            "<main><ul>ann</ul></main>"
        );
        assert_eq!(renders.load(Ordering::SeqCst), 1);
        // The outer block never named 'movies' or 'ann', yet a bump of either
        // invalidates it.
        ctx.cache.incr("movies").expect("incr");
        render(&env, "page.html", ctx1.clone());
        assert_eq!(renders.load(Ordering::SeqCst), 2);
        ctx.cache.incr("ann").expect("incr");
        render(&env, "page.html", ctx1.clone());
        assert_eq!(renders.load(Ordering::SeqCst), 3);
        render(&env, "page.html", ctx1);
        assert_eq!(renders.load(Ordering::SeqCst), 3);
    }

    pub fn minijinja_escaping_is_exact(ctx: &Ctx) {
        let (mut env, _) = env(&ctx.cache);
        let body = "<p title=\"{{ v }}\">{{ v }} {{ v|safe }} {{ '<i>'|e }}</p>";
        // .html: HTML auto-escaping; .txt: none.
        for ext in ["html", "txt"] {
            let plain = format!("plain.{ext}");
            let cached = format!("cached.{ext}");
            let nested = format!("nested.{ext}");
            env.add_template_owned(plain.clone(), body.to_string())
                .expect("plain");
            add(
                &mut env,
                &cached,
                &format!("{{% icache 'esc' %}}{body}{{% endicache %}}"),
            );
            add(
                &mut env,
                &nested,
                &format!(
                    "{{% icache 'outer-esc' %}}[{{% icache 'esc-in' %}}{body}{{% endicache %}}]{{% endicache %}}"
                ),
            );
            let v = minijinja::context! { v => "<b>Tom & \"Jerry\"</b>" };
            let want = render(&env, &plain, v.clone());
            assert_eq!(render(&env, &cached, v.clone()), want, "{ext}: miss");
            assert_eq!(render(&env, &cached, v.clone()), want, "{ext}: hit");
            assert_eq!(render(&env, &nested, v.clone()), format!("[{want}]"));
            assert_eq!(render(&env, &nested, v), format!("[{want}]"));
        }
        assert!(
            render(&env, "cached.html", minijinja::context! { v => "<b>" }).contains("&lt;b&gt;")
        );
    }

    pub fn async_fragments(ctx: &Ctx) {
        let c = ctx.cache.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let renders = AtomicUsize::new(0);
            let user_id = "42".to_string();
            for _ in 0..3 {
                let html = c
                    .fragment_async(
                        "list",
                        &["movies-personal-rating", "movies", &user_id],
                        || async {
                            renders.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            Ok::<_, std::io::Error>("<ul/>".to_string())
                        },
                    )
                    .await
                    .expect("fragment_async");
                assert_eq!(html, "<ul/>");
            }
            assert_eq!(renders.load(Ordering::SeqCst), 1);
            c.incr_async("movies").await.expect("incr");
            let e = c
                .fragment_async("list", &["movies"], || async {
                    Err::<String, _>(std::io::Error::other("db down"))
                })
                .await
                .expect_err("error passes through");
            assert_eq!(e.to_string(), "db down");
        });
    }

    pub fn stats_count_what_happened(ctx: &Ctx) {
        let c = ctx.open("prefix=stats");
        let f = |t: &str| {
            c.fragment("t", &[t], || {
                thread::sleep(Duration::from_millis(2));
                Ok::<_, ()>("x".into())
            })
            .expect("f")
        };
        f("s1");
        f("s1");
        f("s1");
        c.incr("s1").expect("incr");
        f("s1");
        let s = c.stats();
        assert_eq!(
            (s.hits, s.misses, s.mismatches, s.stores, s.errors),
            (2, 2, 1, 2, 0),
            "{s:?}"
        );
        assert!(s.render_time >= Duration::from_millis(4), "{s:?}");
        assert!((s.hit_ratio() - 0.5).abs() < 1e-9);
    }

    pub fn too_large_is_served_uncached(ctx: &Ctx) {
        let (c, size) = match ctx.kind {
            Kind::Memory => (
                ICache::from_url("memory://?max_bytes=65536").expect("open"),
                100_000,
            ),
            Kind::Memcached | Kind::MemcachedPool => (ctx.cache.clone(), 40 << 20),
            Kind::Redis | Kind::RedisCluster => return,
        };
        let big = "y".repeat(size);
        let out = c
            .fragment("t", &["big"], || Ok::<_, ()>(big.clone()))
            .expect("served");
        assert_eq!(out.len(), size);
        let s = c.stats();
        assert_eq!((s.too_large, s.stores, s.errors), (1, 0, 0), "{s:?}");
    }
}

/// On Redis and memcached a hit is one round trip, counted by a proxy,
/// including for a block with nested blocks (after this process has seen it).
#[test]
fn one_round_trip_per_hit() {
    for kind in [Kind::Redis, Kind::Memcached] {
        let Some(ctx) = Ctx::start(kind) else {
            continue;
        };
        let proxy = Proxy::start(ctx.port());
        let scheme = if kind == Kind::Redis {
            "redis"
        } else {
            "memcached"
        };
        let c = ICache::from_url(&format!(
            "{scheme}://127.0.0.1:{}?timeout_ms=2000&connect_timeout_ms=2000",
            proxy.port()
        ))
        .expect("open");
        let page = || {
            c.fragment("t", &["movies-personal-rating", "movies", "42"], || {
                let inner = c.fragment("t", &["inner", "x"], || Ok::<_, ()>("i".to_string()))?;
                Ok::<_, ()>(format!("<ul>{inner}</ul>"))
            })
            .expect("page")
        };
        page();
        page();
        for _ in 0..5 {
            let before = proxy.round_trips();
            assert_eq!(page(), "<ul>i</ul>");
            assert_eq!(
                proxy.round_trips() - before,
                1,
                "{kind:?}: a hit took more than one round trip"
            );
        }
        let plain = || {
            c.fragment("t", &["a", "b", "c", "d"], || Ok::<_, ()>("p".to_string()))
                .expect("f")
        };
        plain();
        let before = proxy.round_trips();
        plain();
        assert_eq!(proxy.round_trips() - before, 1, "{kind:?}");
        assert!(c.stats().hits >= 6);
    }
}

/// With the backend stopped or hanging, blocks render uncached within a
/// bounded time, errors are counted, and nothing becomes an error page.
#[test]
fn fail_open_when_the_backend_is_down_or_hanging() {
    for kind in [Kind::Redis, Kind::Memcached] {
        let Some(mut ctx) = Ctx::start(kind) else {
            continue;
        };
        let proxy = Proxy::start(ctx.port());
        let scheme = if kind == Kind::Redis {
            "redis"
        } else {
            "memcached"
        };
        // The default time-outs (100 ms).
        let c = ICache::from_url(&format!("{scheme}://127.0.0.1:{}", proxy.port())).expect("open");
        assert!(c.timeout() <= Duration::from_millis(100));
        let renders = AtomicUsize::new(0);
        let page = || {
            let t = Instant::now();
            let out = c
                .fragment("t", &["movies"], || {
                    renders.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, ()>("list".to_string())
                })
                .expect("never an error");
            assert_eq!(out, "list");
            t.elapsed()
        };
        page();
        page();
        assert_eq!(renders.load(Ordering::SeqCst), 1);
        // Hanging: accepts, never answers.
        proxy.pause();
        for _ in 0..3 {
            let took = page();
            assert!(took < Duration::from_millis(1500), "{kind:?}: {took:?}");
        }
        assert_eq!(renders.load(Ordering::SeqCst), 4);
        assert!(c.stats().errors >= 3);
        proxy.resume();
        // Stopped.
        match &mut ctx.server {
            Server::Redis(s) => s.stop(),
            Server::Memcached(s) => s.stop(),
            _ => unreachable!("a single server"),
        }
        let took = page();
        assert!(took < Duration::from_millis(1500), "{kind:?}: {took:?}");
        assert_eq!(renders.load(Ordering::SeqCst), 5);
        // Back: served from the cache again (fresh generations after the
        // restart: rendered once more, then hits).
        match &mut ctx.server {
            Server::Redis(s) => s.restart(),
            Server::Memcached(s) => s.restart(),
            _ => unreachable!("a single server"),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            page();
            let before = renders.load(Ordering::SeqCst);
            page();
            if renders.load(Ordering::SeqCst) == before {
                break;
            }
            assert!(Instant::now() < deadline, "{kind:?}: cache never came back");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `none://` turns caching off: every block renders, nothing breaks.
#[test]
fn none_backend_renders_every_time() {
    let c = ICache::from_url("none://").expect("none://");
    assert_eq!(c.backend_name(), "none");
    let renders = AtomicUsize::new(0);
    for _ in 0..3 {
        let out = c
            .fragment("t", &["movies"], || {
                renders.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>("x".to_string())
            })
            .expect("f");
        assert_eq!(out, "x");
    }
    assert_eq!(renders.load(Ordering::SeqCst), 3);
    c.incr("movies").expect("incr");
    assert_eq!(c.get("k").expect("get"), None);
}

/// An outer block whose inner block could not reach its backend depends on
/// tokens nobody recorded: it is served but must not be stored (found by the
/// cluster checker: such an outer entry was never invalidated again).
#[test]
fn outer_block_is_not_stored_when_an_inner_block_failed_open() {
    let outer = ICache::memory();
    let down =
        ICache::from_url("redis://127.0.0.1:1?timeout_ms=50&connect_timeout_ms=50").expect("open");
    let renders = AtomicUsize::new(0);
    let page = || {
        outer
            .fragment("t", &["page"], || {
                renders.fetch_add(1, Ordering::SeqCst);
                let inner = down.fragment("t", &["data"], || Ok::<_, ()>("inner".to_string()))?;
                Ok::<_, ()>(format!("<main>{inner}</main>"))
            })
            .expect("page")
    };
    assert_eq!(page(), "<main>inner</main>");
    assert_eq!(page(), "<main>inner</main>");
    assert_eq!(
        renders.load(Ordering::SeqCst),
        2,
        "the outer block was cached without its inner tokens"
    );
    assert_eq!(outer.stats().stores, 0);
    assert!(down.stats().errors >= 2);
}

/// A block that renders itself again (a recursive macro) must not wait for
/// its own render: it used to deadlock on its own single-flight.
#[test]
fn a_block_nested_in_itself_does_not_deadlock() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let c = ICache::memory();
        let out = c
            .fragment("tree", &["cats"], || {
                let inner = c.fragment("tree", &["cats"], || Ok::<_, ()>("leaf".to_string()))?;
                Ok::<_, ()>(format!("<ul>{inner}</ul>"))
            })
            .expect("renders");
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a block nested in itself deadlocked");
    assert_eq!(out, "<ul>leaf</ul>");
}

/// A TTL too long to represent is "no expiry", never a panic.
#[test]
fn huge_ttl_is_no_expiry() {
    let c = ICache::memory();
    c.set("k", "v", Some(Duration::MAX)).expect("set");
    assert_eq!(c.get("k").expect("get").as_deref(), Some("v"));
}
