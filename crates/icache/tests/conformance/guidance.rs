//! Failures that explain themselves: what a user sees when something is
//! wrong, in errors and in the log.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;

use icache::ICache;

/// Collects what icache logs (through `tracing`) while `f` runs.
fn logged(f: impl FnOnce()) -> String {
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
    tracing::subscriber::with_default(subscriber, f);
    let out = buf.0.lock().expect("log buffer").clone();
    String::from_utf8_lossy(&out).into_owned()
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
                .fragment_named("huge-list", &["movies", "7"], || Ok::<_, ()>(big.clone()))
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
