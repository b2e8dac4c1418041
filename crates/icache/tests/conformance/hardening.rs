//! The holes a review found in the promise (never stale, never down), each
//! reproduced on real servers and proved closed. Faults go through the test
//! support's [`Proxy`](crate::support::Proxy): the server process keeps its
//! data while the path to it refuses, hangs or freezes, which is the
//! dangerous case (nothing restarts, so nothing old is dropped).

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use icache::ICache;

use crate::support::{Fault, MemcachedServer, Proxy, RedisServer};

/// A real server behind a fault-injecting proxy, and a direct URL to it.
struct Proxied {
    _server: Server,
    proxy: Proxy,
    scheme: &'static str,
    direct_port: u16,
}

#[expect(dead_code, reason = "held only to keep the server alive")]
enum Server {
    Redis(RedisServer),
    Memcached(MemcachedServer),
}

#[derive(Clone, Copy, Debug)]
enum Net {
    Redis,
    Memcached,
}

const BOTH: [Net; 2] = [Net::Redis, Net::Memcached];

impl Proxied {
    fn start(net: Net) -> Option<Proxied> {
        let (server, scheme, port) = match net {
            Net::Redis => {
                let s = RedisServer::start()?;
                let p = s.port();
                (Server::Redis(s), "redis", p)
            }
            Net::Memcached => {
                let s = MemcachedServer::start()?;
                let p = s.port();
                (Server::Memcached(s), "memcached", p)
            }
        };
        Some(Proxied {
            _server: server,
            proxy: Proxy::start(port),
            scheme,
            direct_port: port,
        })
    }

    /// A handle through the proxy, with a short time-out.
    fn through(&self, timeout_ms: u64) -> ICache {
        ICache::from_url(&format!(
            "{}://127.0.0.1:{}?timeout_ms={timeout_ms}&connect_timeout_ms={timeout_ms}",
            self.scheme,
            self.proxy.port()
        ))
        .expect("open through the proxy")
    }

    /// A handle straight to the server (another process, in effect).
    fn direct(&self) -> ICache {
        ICache::from_url(&format!(
            "{}://127.0.0.1:{}?timeout_ms=2000",
            self.scheme, self.direct_port
        ))
        .expect("open directly")
    }
}

/// Retries `f` until it returns `Some`, for at most `limit`.
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up after {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `f` on a thread and fails the test if it does not end within
/// `limit` (a deadlock must fail the test, not hang the suite).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {limit:?} (deadlock or hang)"),
    }
}

fn ok(s: String) -> Result<String, std::convert::Infallible> {
    Ok(s)
}

/// Hole 1: every bump that failed in an outage is replayed, not only the
/// first one.
#[test]
fn every_bump_lost_in_an_outage_is_replayed() {
    for net in BOTH {
        let Some(p) = Proxied::start(net) else { return };
        let cache = p.through(200);
        let tokens = ["lost-a", "lost-b", "lost-c"];
        for t in tokens {
            assert_eq!(
                cache
                    .fragment("t", &[t], || ok(format!("{t}=old")))
                    .expect("render"),
                format!("{t}=old")
            );
            // Cached: the body does not run.
            assert_eq!(
                cache
                    .fragment("t", &[t], || ok("body ran".into()))
                    .expect("hit"),
                format!("{t}=old")
            );
        }
        // Cut off, process and data intact; three commits each bump a token.
        p.proxy.set_fault(Fault::Refuse);
        for t in tokens {
            assert!(
                cache.incr(t).is_err(),
                "{net:?}: the bump of {t} cannot reach the server"
            );
        }
        p.proxy.set_fault(Fault::Pass);
        // Once the server answers again (the breaker lets a probe through),
        // no old fragment is ever served.
        eventually(Duration::from_secs(10), || cache.ping().ok());
        eventually(Duration::from_secs(10), || cache.get_sum(&["lost-a"]).ok());
        for t in tokens {
            let html = cache
                .fragment("t", &[t], || ok(format!("{t}=new")))
                .expect("render");
            assert_eq!(
                html,
                format!("{t}=new"),
                "{net:?}: the failed bump of {t} was lost"
            );
            let again = cache
                .fragment("t", &[t], || ok("body ran".into()))
                .expect("hit");
            assert_eq!(
                again,
                format!("{t}=new"),
                "{net:?}: cached again after the replay"
            );
        }
    }
}

/// Hole 2: thread 1 renders A whose body renders B, thread 2 renders B whose
/// body renders A. Neither waits for the other forever.
#[test]
fn crosswise_nesting_never_deadlocks() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    for url in ["memory://".to_string(), redis.url()] {
        let cache = ICache::from_url(&url).expect("open");
        for round in 0..5 {
            let (a, b) = (format!("cross-a-{round}"), format!("cross-b-{round}"));
            let both = Arc::new(Barrier::new(2));
            let cache = cache.clone();
            let spawn = move |outer: String, inner: String| {
                let (cache, both) = (cache.clone(), both.clone());
                thread::spawn(move || {
                    cache
                        .fragment("t", &[&outer], || {
                            // Both outer renders are under way before either
                            // asks for its inner block.
                            both.wait();
                            let inner_html =
                                cache.fragment("t", &[&inner], || ok(format!("<{inner}>")))?;
                            ok(format!("<{outer}>{inner_html}"))
                        })
                        .expect("render")
                })
            };
            let outs = within(
                Duration::from_secs(5),
                "crosswise nested renders",
                move || {
                    let t1 = spawn(a.clone(), b.clone());
                    let t2 = spawn(b, a);
                    (t1.join().expect("thread 1"), t2.join().expect("thread 2"))
                },
            );
            assert!(outs.0.starts_with("<cross-a-"), "{outs:?}");
            assert!(outs.1.starts_with("<cross-b-"), "{outs:?}");
        }
    }
}

/// Hole 3: a reader waiting for another thread's render does not take it
/// when that render's nested tokens are unknown (an inner block failed open)
/// and the reader began after a bump of the inner token.
#[test]
fn a_waiting_reader_never_takes_a_render_with_unknown_nested_tokens() {
    let Some(p) = Proxied::start(Net::Redis) else {
        return;
    };
    let cache = p.through(200);
    let writer = p.direct();
    let data = Arc::new(AtomicU64::new(1));
    let (inner_go_tx, inner_go) = mpsc::channel::<()>();
    let (inner_done, inner_done_rx) = mpsc::channel::<()>();
    let (finish_go_tx, finish_go) = mpsc::channel::<()>();
    let leader = {
        let (cache, data) = (cache.clone(), data.clone());
        thread::spawn(move || {
            cache
                .fragment("t", &["outer-u"], || {
                    inner_go.recv().expect("inner go");
                    let inner = cache.fragment("t", &["inner-u"], || {
                        ok(format!("inner-v{}", data.load(Ordering::SeqCst)))
                    })?;
                    inner_done.send(()).expect("inner done");
                    finish_go.recv().expect("finish go");
                    ok(format!("outer[{inner}]"))
                })
                .expect("leader render")
        })
    };
    // The leader's inner block cannot reach the server: it fails open.
    thread::sleep(Duration::from_millis(200));
    p.proxy.set_fault(Fault::Refuse);
    inner_go_tx.send(()).expect("go");
    inner_done_rx.recv().expect("inner rendered");
    p.proxy.set_fault(Fault::Pass);
    eventually(Duration::from_secs(10), || cache.ping().ok());
    // A commit and its bump, then a reader that joins the leader's render.
    data.store(2, Ordering::SeqCst);
    writer.incr("inner-u").expect("bump");
    let follower = {
        let (cache, data) = (cache.clone(), data.clone());
        thread::spawn(move || {
            cache
                .fragment("t", &["outer-u"], || {
                    let inner = cache.fragment("t", &["inner-u"], || {
                        ok(format!("inner-v{}", data.load(Ordering::SeqCst)))
                    })?;
                    ok(format!("outer[{inner}]"))
                })
                .expect("follower render")
        })
    };
    thread::sleep(Duration::from_millis(300));
    finish_go_tx.send(()).expect("finish");
    assert_eq!(leader.join().expect("leader"), "outer[inner-v1]");
    assert_eq!(
        follower.join().expect("follower"),
        "outer[inner-v2]",
        "the reader began after the bump of inner-u and must not get inner-v1"
    );
}

/// Hole 4 (and 11): with a bump pending and the server accepting but never
/// answering, renders are not serialised behind a lock held across I/O, and
/// do not each pay a time-out: they fail fast and render uncached.
#[test]
fn a_hung_server_neither_serialises_nor_slows_renders() {
    for net in BOTH {
        let Some(p) = Proxied::start(net) else { return };
        let cache = p.through(200);
        cache
            .fragment("t", &["hung"], || ok("warm".into()))
            .expect("warm up");
        p.proxy.set_fault(Fault::Hang);
        assert!(cache.incr("hung").is_err(), "the bump cannot be answered");
        let started = Instant::now();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let cache = cache.clone();
                thread::spawn(move || {
                    for j in 0..5 {
                        let html = cache
                            .fragment("t", &["hung", &format!("{i}-{j}")], || {
                                ok(format!("fresh {i}-{j}"))
                            })
                            .expect("render");
                        assert_eq!(html, format!("fresh {i}-{j}"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("render thread");
        }
        let took = started.elapsed();
        // Serialised behind the replay lock this took 8 × 5 × 200 ms = 8 s;
        // without a breaker each render still paid a 200 ms time-out.
        assert!(
            took < Duration::from_secs(3),
            "{net:?}: 40 renders took {took:?} with the server hung"
        );
        // Fail fast, measured one call at a time: far below the time-out.
        let one = Instant::now();
        for _ in 0..20 {
            let _ = cache.get_sum(&["hung"]);
        }
        assert!(
            one.elapsed() < Duration::from_millis(1500),
            "{net:?}: 20 calls took {:?}",
            one.elapsed()
        );
        let err = cache.get_sum(&["hung"]).expect_err("still hung");
        assert!(err.is_unavailable() || err.is_timeout(), "{err}");
        // Back: the pending bump is replayed and blocks are cached again.
        p.proxy.set_fault(Fault::Pass);
        eventually(Duration::from_secs(10), || cache.get_sum(&["hung"]).ok());
        assert_eq!(
            cache
                .fragment("t", &["hung"], || ok("after".into()))
                .expect("render"),
            "after"
        );
        assert_eq!(
            cache
                .fragment("t", &["hung"], || ok("body ran".into()))
                .expect("hit"),
            "after"
        );
    }
}

/// Hole 6: with caching off (`none://`), a reader that begins after a commit
/// and its bump never gets a render that began before the commit.
#[test]
fn none_never_merges_renders_across_a_bump() {
    let cache = ICache::from_url("none://").expect("none");
    let data = Arc::new(AtomicU64::new(1));
    let (started_tx, started) = mpsc::channel::<()>();
    let (go_tx, go) = mpsc::channel::<()>();
    let first = {
        let (cache, data) = (cache.clone(), data.clone());
        thread::spawn(move || {
            cache
                .fragment("t", &["kill-switch"], || {
                    let v = data.load(Ordering::SeqCst);
                    started_tx.send(()).expect("started");
                    go.recv().expect("go");
                    ok(format!("v{v}"))
                })
                .expect("render")
        })
    };
    started.recv().expect("first render under way");
    data.store(2, Ordering::SeqCst);
    cache.incr("kill-switch").expect("bump");
    let second = {
        let (cache, data) = (cache.clone(), data.clone());
        thread::spawn(move || {
            cache
                .fragment("t", &["kill-switch"], || {
                    ok(format!("v{}", data.load(Ordering::SeqCst)))
                })
                .expect("render")
        })
    };
    thread::sleep(Duration::from_millis(200));
    go_tx.send(()).expect("go");
    assert_eq!(first.join().expect("first"), "v1");
    assert_eq!(second.join().expect("second"), "v2", "began after the bump");
}

/// Hole 8: no value of a URL's query string reaches an error, `url()` or
/// `Debug` unless it is known to be harmless.
#[test]
fn query_string_secrets_never_leak() {
    for url in [
        "redis://h:6379/0?password=hunter2",
        "redis://h:6379/0?prefix=shop&auth=hunter2",
        "memcached://a:1,b:2?secret=hunter2",
        "redis+cluster://a:1,b:2?token=hunter2",
        "memory://?x=hunter2",
    ] {
        let err = ICache::from_url(url).expect_err("unknown option");
        assert!(err.is_config(), "{err}");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains("hunter2"), "{url}: {shown}");
        }
    }
    let cache = ICache::from_url("redis://u:hunter2@127.0.0.1:1/0?prefix=shop&timeout_ms=50")
        .expect("open");
    for shown in [
        cache.url().to_string(),
        format!("{cache:?}"),
        cache.ping().expect_err("nothing there").to_string(),
    ] {
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("shop") || shown.contains("***") || shown.contains("127.0.0.1"),
            "{shown}"
        );
    }
}

/// Hole 10: any prefix is accepted, `myapp:prod` + `k` never meets `myapp` +
/// `prod:k`, and every key starts with the prefix (so `SCAN MATCH` finds it).
#[test]
fn prefixes_with_colons_keep_apps_apart() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let Some(mc) = MemcachedServer::start() else {
        return;
    };
    for base in [redis.url(), mc.url()] {
        let prod = ICache::from_url(&format!("{base}?prefix=myapp:prod")).expect("colon prefix");
        let app = ICache::from_url(&format!("{base}?prefix=myapp")).expect("prefix");
        let odd = ICache::from_url(&format!("{base}?prefix=my%20app%C3%A9")).expect("any prefix");
        prod.set("k", "prod", None).expect("set");
        app.set("prod:k", "app", None).expect("set");
        odd.set("k", "odd", None).expect("set");
        assert_eq!(prod.get("k").expect("get").as_deref(), Some("prod"));
        assert_eq!(app.get("prod:k").expect("get").as_deref(), Some("app"));
        assert_eq!(odd.get("k").expect("get").as_deref(), Some("odd"));
        assert_eq!(app.get("k").expect("get"), None);
        let g = prod.incr("movies").expect("incr");
        assert_ne!(app.get_sum(&["movies"]).expect("sum"), g);
    }
    // Every key of the `myapp:prod` handle starts with the prefix, and the
    // other app's keys are not among them.
    let keys = |pattern: &str| -> Vec<String> {
        let client = redis::Client::open(redis.url()).expect("client");
        let mut con = client.get_connection().expect("connect");
        redis::cmd("KEYS")
            .arg(pattern)
            .query(&mut con)
            .expect("KEYS")
    };
    let prod = keys("myapp:prod*");
    assert!(prod.contains(&"myapp:prod:ic:k:k".to_string()), "{prod:?}");
    assert!(
        prod.contains(&"myapp:prod:ic:g:movies".to_string()),
        "{prod:?}"
    );
    let app = keys("myapp:ic:*");
    assert!(app.contains(&"myapp:ic:k:prod:k".to_string()), "{app:?}");
    assert!(app.iter().all(|k| !prod.contains(k)), "{app:?} / {prod:?}");
}

/// Hole 11: a hung backend does not tax every request: after one time-out,
/// calls fail fast for a back-off period, one probe at a time checks whether
/// it is back, and a failed bump is remembered and replayed.
#[test]
fn a_hung_backend_fails_fast_then_recovers() {
    for net in BOTH {
        let Some(p) = Proxied::start(net) else { return };
        let cache = p.through(300);
        cache.incr("breaker").expect("incr");
        p.proxy.set_fault(Fault::Hang);
        let first = Instant::now();
        let e = cache.get_sum(&["breaker"]).expect_err("hung");
        assert!(e.is_timeout() && !e.is_circuit_open(), "{net:?}: {e}");
        assert!(
            first.elapsed() >= Duration::from_millis(250),
            "{net:?}: the first call waits for its time-out"
        );
        // Then: fail fast, with an error that says so.
        let fast = Instant::now();
        let e = cache.get_sum(&["breaker"]).expect_err("still hung");
        assert!(e.is_circuit_open() && e.is_unavailable(), "{net:?}: {e}");
        assert!(
            fast.elapsed() < Duration::from_millis(100),
            "{net:?}: {:?}",
            fast.elapsed()
        );
        // A bump that fails fast is remembered.
        let before = p.direct().get_sum(&["breaker"]).expect("direct read");
        assert!(cache.incr("breaker").is_err());
        p.proxy.set_fault(Fault::Pass);
        let after = eventually(Duration::from_secs(10), || cache.get_sum(&["breaker"]).ok());
        assert!(
            after > before,
            "{net:?}: the remembered bump was replayed ({before} -> {after})"
        );
    }
}

/// Hole 12: the value types a Rust user writes first.
#[test]
fn values_of_every_string_type() {
    let cache = ICache::memory();
    let html: String = "<ul/>".to_string();
    let key: String = "k".to_string();
    let v = cache.get_sum(&["t"]).expect("sum");
    cache.set_versioned(&key, &html, v).expect("&String");
    cache.set_versioned(&key, html.clone(), v).expect("String");
    cache.set_versioned(&key, html.as_str(), v).expect("&str");
    cache
        .set_versioned(&key, Arc::<str>::from("<ul/>"), v)
        .expect("Arc<str>");
    cache
        .set_versioned(&key, Cow::Borrowed("<ul/>"), v)
        .expect("Cow<str>");
    cache.set(&key, &html, None).expect("&String");
    cache
        .set(&key, Cow::<str>::Owned(html.clone()), None)
        .expect("Cow");
    assert_eq!(
        cache.get_versioned(&key, v).expect("get").as_deref(),
        Some("<ul/>")
    );
    assert_eq!(cache.get(&key).expect("get").as_deref(), Some("<ul/>"));
}

/// A page with thousands of nested blocks: the outer block depends on every
/// inner token (nested dependencies are compared with sets, not scans).
#[test]
fn thousands_of_nested_blocks() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    for url in ["memory://".to_string(), redis.url()] {
        let cache = ICache::from_url(&url).expect("open");
        let n = if url.starts_with("memory") { 3000 } else { 300 };
        fn page(cache: &ICache, n: usize, tag: &str) -> String {
            cache
                .fragment("t", &["page"], || {
                    let mut out = String::new();
                    for i in 0..n {
                        out.push_str(
                            &cache.fragment("t", &[&format!("item-{i}")], || {
                                ok(format!("{tag}{i},"))
                            })?,
                        );
                    }
                    ok(out)
                })
                .expect("render")
        }
        let first = within(Duration::from_secs(60), "nested render", {
            let cache = cache.clone();
            move || page(&cache, n, "a")
        });
        assert!(first.starts_with("a0,a1,"));
        assert_eq!(page(&cache, n, "b"), first, "a hit");
        cache
            .incr(&format!("item-{}", n - 1))
            .expect("bump the last inner token");
        let again = page(&cache, n, "c");
        assert!(
            again.ends_with(&format!("c{},", n - 1)),
            "the outer block re-rendered"
        );
        assert!(again.starts_with("a0,"), "the other inner blocks were hits");
    }
}
