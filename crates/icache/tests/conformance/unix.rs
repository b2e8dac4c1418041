//! Redis over a Unix socket: `redis+unix:///path/redis.sock?db=N`, with
//! redis-rs's `user=`/`pass=` options and every option of the library.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use icache::ICache;

use crate::redis_calls;
use crate::support::RedisServer;

/// A fresh directory for a socket (Unix socket paths are short: keep it
/// under the system's temporary directory, not the target directory).
fn socket_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "icache-unix-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("socket dir");
    dir
}

fn start(dir: &std::path::Path, extra: &[&str]) -> Option<RedisServer> {
    let sock = dir.join("redis.sock");
    let sock = sock.to_str().expect("a UTF-8 path");
    let mut args = vec!["--unixsocket", sock, "--unixsocketperm", "700"];
    args.extend_from_slice(extra);
    RedisServer::start_with(&args)
}

fn url(dir: &std::path::Path, query: &str) -> String {
    format!(
        "redis+unix://{}?timeout_ms=2000&connect_timeout_ms=2000&{query}",
        dir.join("redis.sock").display()
    )
}

#[test]
fn redis_over_a_unix_socket_with_db_and_near_tracking() {
    let dir = socket_dir();
    let Some(server) = start(&dir, &[]) else {
        return;
    };
    let db3 = ICache::from_url(&url(&dir, "db=3&prefix=u")).expect("open");
    let db4 = ICache::from_url(&url(&dir, "db=4&prefix=u")).expect("open");
    assert_eq!(db3.backend_name(), "redis");
    db3.ping().expect("ping over the socket");
    db3.incr("movies").expect("incr");
    let v3 = db3.get_sum(&["movies"]).expect("get_sum");
    let v4 = db4.get_sum(&["movies"]).expect("get_sum");
    assert_ne!(v3, v4, "db=3 and db=4 are separate databases");
    db3.set_versioned("page", "in db 3", v3).expect("set");
    assert_eq!(
        db3.get_versioned("page", v3).expect("get").as_deref(),
        Some("in db 3")
    );
    assert_eq!(db4.get_versioned("page", v3).expect("get"), None);
    // The keys are in database 3 (seen over TCP).
    let mut con = redis_tcp(server.port());
    con.write(&["SELECT", "3"]);
    assert_eq!(con.line(), "+OK");
    con.write(&["EXISTS", "u:ic:g:movies"]);
    assert_eq!(con.line(), ":1");

    // near=tracking over the socket: kept generations, no MGET per read.
    let tracked = ICache::from_url(&url(&dir, "db=3&prefix=u&near=tracking")).expect("open");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = redis_calls(server.port(), &["mget"]);
        assert_eq!(tracked.get_sum(&["movies"]).expect("get_sum"), v3);
        if redis_calls(server.port(), &["mget"]) == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "near=tracking never served a read locally"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A bump from another handle reaches it.
    db3.incr("movies").expect("incr");
    let deadline = Instant::now() + Duration::from_secs(5);
    while tracked.get_sum(&["movies"]).expect("get_sum") == v3 {
        assert!(
            Instant::now() < deadline,
            "the bump never reached the tracking handle"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unix_socket_password_option_and_errors() {
    let dir = socket_dir();
    let Some(_server) = start(&dir, &["--requirepass", "s3cret"]) else {
        return;
    };
    let cache = ICache::from_url(&url(&dir, "pass=s3cret")).expect("open");
    cache.incr("t").expect("incr with the password");
    assert!(!cache.url().contains("s3cret"), "{}", cache.url());
    assert!(!format!("{cache:?}").contains("s3cret"));
    let wrong = ICache::from_url(&url(&dir, "pass=nope")).expect("open");
    let e = wrong.incr("t").expect_err("wrong password");
    assert!(!e.to_string().contains("nope"), "{e}");
    for bad in [
        "redis+unix://",
        "redis+unix://host/tmp/x.sock",
        "redis+unix:///tmp/x.sock?db=x",
        "redis+unix:///tmp/x.sock?bogus=1",
    ] {
        let e = ICache::from_url(bad).expect_err(bad);
        assert!(e.is_config(), "{bad}: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tiny RESP client over TCP, for looking at the server directly.
struct Tcp(std::io::BufReader<std::net::TcpStream>);

fn redis_tcp(port: u16) -> Tcp {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    Tcp(std::io::BufReader::new(s))
}

impl Tcp {
    fn write(&mut self, args: &[&str]) {
        use std::io::Write;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.0.get_mut().write_all(req.as_bytes()).expect("write");
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.0.read_line(&mut line).expect("read");
        line.trim_end().to_owned()
    }
}
