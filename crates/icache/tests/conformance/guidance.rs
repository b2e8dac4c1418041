//! Failures that explain themselves: what a user sees when something is
//! wrong, in errors and in the log.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;

use icache::ICache;

/// Collects what icache logs (through `tracing`) while `f` runs.
fn logged(f: impl FnOnce()) -> String {
    logged_with(f).1
}

/// [`logged`], keeping what `f` returned (the other test files use it too).
pub(crate) fn logged_with<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = buf.0.lock().expect("log buffer").clone();
    (out, String::from_utf8_lossy(&text).into_owned())
}

/// A block too large for the backend: served uncached, and a warning that
/// names the block and its size, at most once per 10 s however often.
#[test]
fn too_large_blocks_are_named_once() {
    let cache = ICache::from_url("memory://?max_bytes=65536").expect("open");
    let big = "x".repeat(100_000);
    let log = logged(|| {
        for _ in 0..5 {
            let html = cache
                .fragment("huge-list", &["movies", "7"], || Ok::<_, ()>(big.clone()))
                .expect("served");
            assert_eq!(html.len(), big.len());
        }
    });
    assert_eq!(cache.stats().too_large, 5, "{:?}", cache.stats());
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("too large")).collect();
    assert_eq!(warnings.len(), 1, "rate-limited: {log}");
    assert!(
        warnings[0].contains("huge-list") && warnings[0].contains("[movies, 7]"),
        "names the block: {log}"
    );
    assert!(warnings[0].contains("100000"), "names the size: {log}");
}

/// `redis://` pointed at something that is not Redis (an HTTP port) says so.
#[test]
fn a_redis_url_at_something_else_says_so() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    thread::spawn(move || {
        for conn in listener.incoming().take(4) {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let cache =
        ICache::from_url(&format!("redis://127.0.0.1:{port}?timeout_ms=2000")).expect("open");
    let e = cache.ping().expect_err("not Redis");
    let shown = e.to_string();
    assert!(
        shown.contains(&format!(
            "the server at 127.0.0.1:{port} did not answer like Redis"
        )),
        "{shown}"
    );
}

/// A mistyped scheme names the one that was probably meant.
#[test]
fn a_mistyped_scheme_suggests_the_right_one() {
    let e = ICache::from_url("memcache://127.0.0.1:11211").expect_err("unknown scheme");
    assert!(
        e.is_config() && e.to_string().contains("did you mean memcached://"),
        "{e}"
    );
}

/// `observe` tells, for each block of one render, what happened: on a real
/// Redis (through a proxy that can cut it off), in-process, and with caching
/// off.
#[test]
fn observe_tells_what_each_block_did() {
    use icache::{Outcome, observe};
    let Some(redis) = crate::support::RedisServer::start() else {
        return;
    };
    let proxy = crate::support::Proxy::start(redis.port());
    let page = |cache: &ICache| {
        cache
            .fragment("page", &["movies"], || {
                let inner =
                    cache.fragment("item", &["movie:1"], || Ok::<_, ()>("<li/>".to_owned()))?;
                Ok::<_, ()>(format!("<ul>{inner}</ul>"))
            })
            .expect("render")
    };
    for url in [
        "memory://".to_string(),
        format!("redis://127.0.0.1:{}?timeout_ms=500", proxy.port()),
    ] {
        let cache = ICache::from_url(&url).expect("open");
        let (_, first) = observe(|| page(&cache));
        let outcomes: Vec<(String, Outcome, usize)> = first
            .iter()
            .map(|e| (e.identity[1].clone(), e.outcome, e.depth))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("item".to_string(), Outcome::Stored, 1),
                ("page".to_string(), Outcome::Stored, 0)
            ],
            "{url}"
        );
        assert!(
            first
                .iter()
                .all(|e| e.render_time.is_some() && e.version.is_some())
        );
        let (_, second) = observe(|| page(&cache));
        assert_eq!(
            second.len(),
            1,
            "{url}: the outer hit skips the inner block"
        );
        assert_eq!(second[0].outcome, Outcome::Hit);
        assert_eq!(second[0].tokens, ["movies"]);
        assert_eq!(second[0].render_time, None);
        cache.incr("movie:1").expect("bump");
        let (_, third) = observe(|| page(&cache));
        assert!(
            third.iter().all(|e| e.outcome == Outcome::Stored),
            "{url}: {third:?}"
        );
        assert!(
            third
                .iter()
                .any(|e| e.identity[1] == "page" && e.invalidated),
            "{url}: {third:?}"
        );
        if url.starts_with("redis") {
            proxy.set_fault(crate::support::Fault::Refuse);
            let (_, down) = observe(|| page(&cache));
            assert!(
                down.iter().all(|e| e.outcome == Outcome::Uncached),
                "{down:?}"
            );
            proxy.set_fault(crate::support::Fault::Pass);
        }
    }
    let off = ICache::from_url("none://").expect("none");
    let (_, events) = observe(|| page(&off));
    assert!(
        events.iter().all(|e| e.outcome == Outcome::Off),
        "{events:?}"
    );
    // Nothing is recorded outside `observe`.
    let (_, outer) = observe(|| {
        let (_, inner) = observe(|| page(&off));
        assert_eq!(inner.len(), 2);
    });
    assert_eq!(
        outer.len(),
        2,
        "an outer observation sees the inner one's blocks"
    );
}

/// An application that uses `log` (env_logger…) and no tracing subscriber
/// still sees the fail-open warning.
#[test]
fn log_users_see_fail_open_warnings() {
    struct Capture(Mutex<Vec<String>>);
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            if let Ok(mut lines) = self.0.lock() {
                lines.push(format!("{} {}", record.level(), record.args()));
            }
        }
        fn flush(&self) {}
    }
    static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));
    // The only test in this binary that installs a logger.
    log::set_logger(&CAPTURE).expect("no other logger");
    log::set_max_level(log::LevelFilter::Debug);
    // Nothing listens there: the block renders uncached, and says so.
    let cache =
        ICache::from_url("redis://127.0.0.1:1?timeout_ms=50&connect_timeout_ms=50").expect("open");
    let html = cache
        .fragment("t", &["logged"], || Ok::<_, ()>("<p/>".to_owned()))
        .expect("fail-open");
    assert_eq!(html, "<p/>");
    let lines = CAPTURE.0.lock().expect("captured").clone();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("WARN") && l.contains("cache backend trouble")),
        "{lines:?}"
    );
}
