//! Async blocks as sync ones: nested blocks (async, sync, and MiniJinja's
//! `render_async` on a blocking thread) add their tokens to the async block
//! around them, on whichever thread each poll runs; an observer sees them;
//! a follower's wait is bounded; a hit that needs no I/O runs inline.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use icache::{ICache, NotStored, Outcome};

use crate::Ctx;
use crate::support::RedisServer;

suite!(async_blocks = crate::async_blocks::cases:
    nested_async_and_sync_blocks_invalidate_the_outer,
    render_async_inside_an_async_block_is_recorded,
    observe_async_sees_render_async_and_handlers,
    caught_async_inner_error_leaves_the_outer_unstored,
);

use crate::runtime;

fn ok(s: String) -> Result<String, Infallible> {
    Ok(s)
}

/// A MiniJinja environment whose `list.html` has one block on `movies`,
/// counting its body's renders.
fn env(cache: &ICache) -> (Arc<minijinja::Environment<'static>>, Arc<AtomicUsize>) {
    let mut env = minijinja::Environment::new();
    icache::minijinja::register(&mut env, cache.clone());
    let renders = Arc::new(AtomicUsize::new(0));
    let r = renders.clone();
    env.add_function("count", move || {
        r.fetch_add(1, Ordering::SeqCst);
        String::new()
    });
    env.set_loader(icache::minijinja::loader(|name: &str| {
        Ok((name == "list.html").then(|| {
            "{% icache 'movies' %}{{ count() }}<li>{{ n }}</li>{% endicache %}".to_string()
        }))
    }));
    (Arc::new(env), renders)
}

pub mod cases {
    use super::*;

    /// The outer async block names only its own token; a bump of a token of
    /// an async block or of a sync block inside it re-renders it (it used to
    /// be served as it was). Each inner block awaits first, so the body's
    /// polls move between the runtime's threads.
    pub fn nested_async_and_sync_blocks_invalidate_the_outer(ctx: &Ctx) {
        let cache = &ctx.cache;
        let outer_renders = AtomicUsize::new(0);
        let round = AtomicUsize::new(0);
        let page = || {
            cache.fragment_async("page", &["page"], || async {
                outer_renders.fetch_add(1, Ordering::SeqCst);
                let n = round.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                let a = cache
                    .fragment_async("async-item", &["item:a"], || async {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        ok(format!("a{n}"))
                    })
                    .await?;
                tokio::time::sleep(Duration::from_millis(2)).await;
                let b = cache.fragment("sync-item", &["item:b"], || ok(format!("b{n}")))?;
                Ok::<_, Infallible>(format!("<p>{a} {b}</p>"))
            })
        };
        runtime().block_on(async {
            assert_eq!(page().await.as_deref(), Ok("<p>a0 b0</p>"));
            assert_eq!(page().await.as_deref(), Ok("<p>a0 b0</p>"));
            assert_eq!(outer_renders.load(Ordering::SeqCst), 1, "a hit");
            round.store(1, Ordering::SeqCst);
            cache.incr_async("item:a").await.expect("incr");
            assert_eq!(
                page().await.as_deref(),
                Ok("<p>a1 b0</p>"),
                "async inner bumped"
            );
            round.store(2, Ordering::SeqCst);
            cache.incr_async("item:b").await.expect("incr");
            assert_eq!(
                page().await.as_deref(),
                Ok("<p>a1 b2</p>"),
                "sync inner bumped"
            );
            assert_eq!(outer_renders.load(Ordering::SeqCst), 3);
            assert_eq!(page().await.as_deref(), Ok("<p>a1 b2</p>"));
            assert_eq!(outer_renders.load(Ordering::SeqCst), 3, "a hit again");
        });
    }

    /// MiniJinja's `render_async` renders on a blocking thread; its blocks
    /// still add their tokens to the async block around it.
    pub fn render_async_inside_an_async_block_is_recorded(ctx: &Ctx) {
        let cache = &ctx.cache;
        let (env, renders) = env(cache);
        let n = AtomicUsize::new(0);
        let page = || {
            cache.fragment_async("page-mj", &["page"], || async {
                let ctx = minijinja::context! { n => n.load(Ordering::SeqCst) };
                let list = icache::minijinja::render_async(env.clone(), "list.html", ctx)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(format!("<ul>{list}</ul>"))
            })
        };
        runtime().block_on(async {
            assert_eq!(page().await.as_deref(), Ok("<ul><li>0</li></ul>"));
            n.store(1, Ordering::SeqCst);
            assert_eq!(page().await.as_deref(), Ok("<ul><li>0</li></ul>"), "a hit");
            cache.incr_async("movies").await.expect("incr");
            assert_eq!(page().await.as_deref(), Ok("<ul><li>1</li></ul>"));
            assert_eq!(renders.load(Ordering::SeqCst), 2);
        });
    }

    /// `observe_async` around an axum-style handler that renders through
    /// `render_async`: the template's block is seen, with its outcome.
    pub fn observe_async_sees_render_async_and_handlers(ctx: &Ctx) {
        let cache = &ctx.cache;
        let (env, _) = env(cache);
        let handler = || {
            let env = env.clone();
            async move {
                tokio::task::yield_now().await;
                icache::minijinja::render_async(env, "list.html", minijinja::context! { n => 1 })
                    .await
            }
        };
        runtime().block_on(async {
            let (html, events) = icache::observe_async(handler()).await;
            assert_eq!(html.as_deref().ok(), Some("<li>1</li>"));
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(events[0].outcome, Outcome::Stored);
            assert_eq!(events[0].tokens, ["movies"]);
            // In a spawned task, as axum runs a handler, and nested in an
            // outer observation that sees the inner one's events too.
            let (inner, outer) = icache::observe_async(async {
                tokio::spawn(icache::observe_async(handler()))
                    .await
                    .expect("task")
            })
            .await;
            assert_eq!(inner.1.len(), 1);
            assert_eq!(inner.1[0].outcome, Outcome::Hit);
            assert!(outer.is_empty(), "a spawned task is not the observer's");
            let ((_, inner), outer) = icache::observe_async(icache::observe_async(handler())).await;
            assert_eq!((inner.len(), outer.len()), (1, 1));
            // Async blocks report too, with what they read.
            let (_, events) =
                icache::observe_async(
                    cache.fragment_async("observed", &["movies"], || async { ok("x".into()) }),
                )
                .await;
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].outcome, Outcome::Stored);
            // Its own token, and the flush token every block reads.
            let g = cache
                .generations_async(&["movies", icache::ICache::FLUSH_TOKEN])
                .await
                .expect("gens");
            let mut reads = events[0].reads.clone();
            reads.sort();
            let mut want = vec![
                ("movies".to_string(), g[0]),
                (icache::ICache::FLUSH_TOKEN.to_string(), g[1]),
            ];
            want.sort();
            assert_eq!(reads, want);
        });
    }

    /// The issue's `unwrap_or_else(|_| fallback)` case, async.
    pub fn caught_async_inner_error_leaves_the_outer_unstored(ctx: &Ctx) {
        let cache = &ctx.cache;
        let page = |fails: bool| {
            cache.fragment_async("outer-async", &["page"], move || async move {
                let inner = cache
                    .fragment_async("inner", &["item:1"], || async {
                        tokio::task::yield_now().await;
                        if fails {
                            Err("db down")
                        } else {
                            Ok("<li>1</li>".to_owned())
                        }
                    })
                    .await
                    .unwrap_or_else(|_| "fallback".to_owned());
                Ok::<_, Infallible>(format!("<main>{inner}</main>"))
            })
        };
        runtime().block_on(async {
            let (html, events) = icache::observe_async(page(true)).await;
            assert_eq!(html.as_deref(), Ok("<main>fallback</main>"));
            assert_eq!(
                events.last().map(|e| e.outcome),
                Some(Outcome::NotStored(NotStored::NestedUnknown)),
                "{events:?}"
            );
            assert_eq!(page(false).await.as_deref(), Ok("<main><li>1</li></main>"));
        });
    }
}

/// A follower waits for the leader at most the documented 10 s, then
/// renders itself: here the leader's body waits for the follower to finish
/// (a lock a follower holds, in real life), which used to hang forever.
#[test]
fn a_followers_wait_is_bounded() {
    let cache = ICache::memory();
    let rt = runtime();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = std::sync::Mutex::new(Some(rx));
    let started = Instant::now();
    let out = rt.block_on(async {
        let leader = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .fragment_async("stuck", &["t"], || async {
                        let rx = rx.lock().ok().and_then(|mut r| r.take());
                        if let Some(rx) = rx {
                            let _ = rx.await;
                        }
                        ok("leader".into())
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let follower = cache.fragment_async("stuck", &["t"], || async { ok("follower".into()) });
        let follower = tokio::time::timeout(Duration::from_secs(30), follower)
            .await
            .expect("the follower's wait is bounded");
        let _ = tx.send(());
        let leader = leader.await.expect("leader task");
        (follower, leader)
    });
    assert_eq!(out.0.as_deref(), Ok("follower"));
    assert_eq!(out.1.as_deref(), Ok("leader"));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(25),
        "{waited:?}"
    );
}

/// A hit that needs no I/O does not hop to the blocking pool: with the only
/// blocking thread busy, memory and `near=tracking` hits are served at once.
#[test]
fn hits_without_io_run_inline() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    for url in [
        "memory://".to_string(),
        format!("{}?near=tracking&max_lag_ms=10000", redis.url()),
    ] {
        let cache = ICache::from_url(&url).expect("open");
        rt.block_on(async {
            for _ in 0..3 {
                let html = cache
                    .fragment_async("inline", &["movies", "7"], || async { ok("<ul/>".into()) })
                    .await;
                assert_eq!(html.as_deref(), Ok("<ul/>"));
            }
            let busy = tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_secs(2)));
            tokio::time::sleep(Duration::from_millis(50)).await;
            let started = Instant::now();
            let html = cache
                .fragment_async("inline", &["movies", "7"], || async { ok("miss".into()) })
                .await;
            assert_eq!(html.as_deref(), Ok("<ul/>"), "{url}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{url}: the hit waited for the blocking pool ({:?})",
                started.elapsed()
            );
            busy.await.expect("busy");
        });
    }
}

/// An async block's future is `Send` (an axum handler's must be), with
/// borrowed and owned tokens.
#[test]
fn async_block_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let cache = ICache::memory();
    let owned: Vec<String> = vec!["movies".into()];
    let fut = cache.fragment_async("send", &owned, || async { ok("x".into()) });
    send(&fut);
    let user = 7.to_string();
    let fut2 = cache.fragment_async("send", &["movies", &user], || async { ok("x".into()) });
    send(&fut2);
    let both = icache::observe_async(async move { (fut.await, fut2.await) });
    send(&both);
    let (out, _) = runtime().block_on(both);
    assert_eq!(out.0.as_deref(), Ok("x"));
}
