//! memcached under a hostile or broken server, and the pool under faults
//! (issue 10: TTLs, answers, pool epochs).
//!
//! The pool tests put a [`Proxy`] in front of each of three real servers: a
//! refused or hanging proxy is a server that is gone for the client while its
//! process keeps every key, which is the dangerous case (a server that
//! restarts empty holds nothing old).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use icache::ICache;

use crate::support::{Fault, MemcachedServer, Proxy};

// ---- helpers ----------------------------------------------------------------

/// The value under `key` on the server at `port`, read with a raw `get`.
fn raw_get(port: u16, key: &str) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to memcached");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(format!("get {key}\r\n").as_bytes())
        .expect("write");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("read");
    let len: usize = match line.trim_end().split(' ').collect::<Vec<_>>()[..] {
        ["END"] => return None,
        ["VALUE", _, _, len] => len.parse().expect("length"),
        _ => panic!("unexpected answer {line:?}"),
    };
    let mut data = vec![0; len + 2];
    r.read_exact(&mut data).expect("value");
    data.truncate(len);
    Some(data)
}

/// Every key on the server at `port` (`lru_crawler metadump`), decoded.
pub(crate) fn keys_on(port: u16) -> Vec<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to memcached");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"lru_crawler metadump all\r\n").expect("write");
    let mut out = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line.expect("read");
        if line.trim_end() == "END" {
            break;
        }
        let Some(key) = line.strip_prefix("key=").and_then(|l| l.split(' ').next()) else {
            panic!("unexpected metadump line {line:?}");
        };
        out.push(percent_decode(key));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let (b'%', Some(v)) = (b[i], hex) {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).expect("ASCII keys")
}

/// The form `key` (an unprefixed key, e.g. `ic:g:movies`) has on the pool
/// server at `port`: `key@<that server's epoch in hex>` (all servers up).
/// Creates the epoch if the server has none yet, as the pool would.
pub(crate) fn pool_key(port: u16, key: &str) -> String {
    let epoch_key = "ic:g:pool-epoch";
    let fresh = format!("{}", 1 + (std::process::id() as u64) * 7919);
    let _ = crate::raw_memcached(
        port,
        format!("add {epoch_key} 0 0 {}\r\n{fresh}\r\n", fresh.len()).as_bytes(),
    );
    let epoch: u64 = String::from_utf8(raw_get(port, epoch_key).expect("the pool epoch"))
        .expect("ASCII")
        .trim()
        .parse()
        .expect("a number");
    format!("{key}@{epoch:x}")
}

/// Does the server at `port` hold `key`, as a lone client stores it or as a
/// pool does (`key@<epochs>`)?
fn holds(port: u16, key: &str) -> bool {
    keys_on(port).iter().any(|k| {
        k.strip_prefix(key)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('@'))
    })
}

/// Calls `f` every 50 ms until it says yes; panics after `limit`.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Three real memcached servers, each behind a proxy; the pool URL names
/// the proxies.
struct Pool3 {
    servers: Vec<MemcachedServer>,
    proxies: Vec<Proxy>,
}

impl Pool3 {
    fn start(first_args: &[&str]) -> Option<Pool3> {
        let servers = vec![
            MemcachedServer::start_with(first_args)?,
            MemcachedServer::start()?,
            MemcachedServer::start()?,
        ];
        let proxies = servers.iter().map(|s| Proxy::start(s.port())).collect();
        Some(Pool3 { servers, proxies })
    }

    /// The pool URL, with short time-outs (a hanging server costs one each).
    fn url(&self, query: &str) -> String {
        let hosts: Vec<String> = self
            .proxies
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.port()))
            .collect();
        let sep = if query.is_empty() { "" } else { "&" };
        format!(
            "memcached://{}?timeout_ms=200&connect_timeout_ms=200{sep}{query}",
            hosts.join(",")
        )
    }

    fn open(&self, query: &str) -> ICache {
        ICache::from_url(&self.url(query)).expect("open the pool")
    }

    /// The real port of server `i` (behind its proxy).
    fn port(&self, i: usize) -> u16 {
        self.servers[i].port()
    }
}

/// How many servers of the pool `cache` uses now.
fn servers_up(cache: &ICache) -> usize {
    cache
        .server_stats()
        .expect("server_stats")
        .into_iter()
        .find(|(k, _)| k == "servers_up")
        .and_then(|(_, v)| v.parse().ok())
        .expect("servers_up in the stats")
}

/// Drives calls through `cache` until the pool has marked a server down.
fn until_marked_down(cache: &ICache, token: &str) {
    eventually("the server is marked down", Duration::from_secs(15), || {
        let _ = cache.get_sum(&[token]);
        servers_up(cache) == 2
    });
}

/// Waits until the pool has taken every server back.
fn until_all_back(cache: &ICache) {
    eventually("the server is taken back", Duration::from_secs(15), || {
        servers_up(cache) == 3
    });
}

/// The first name `name(i)` whose key, once `store`d, lands on server
/// `port` (the key's readable form is `key(name)`).
fn name_on(
    port: u16,
    name: impl Fn(usize) -> String,
    key: impl Fn(&str) -> String,
    store: impl Fn(&str),
) -> String {
    for i in 0..200 {
        let n = name(i);
        store(&n);
        if holds(port, &key(&n)) {
            return n;
        }
    }
    panic!("no key landed on the server at port {port}");
}

// ---- 1. expiry times never turn a value into commands ------------------------

/// A TTL memcached cannot take in its signed 32-bit expiry field used to be
/// sent anyway: memcached rejected the line *without* swallowing the data,
/// and ran the value as commands (here: `flush_all` and a `set` of another
/// app's key). `Duration::MAX` also overflowed. Long TTLs must neither do
/// that nor expire early.
#[test]
fn huge_ttls_never_run_the_value_as_commands_nor_expire_early() {
    let Some(server) = MemcachedServer::start() else {
        return;
    };
    let port = server.port();
    assert_eq!(
        crate::raw_memcached(port, b"set other-app 0 0 5\r\nhello\r\n"),
        "STORED"
    );
    let cache = ICache::from_url(&format!(
        "{}?timeout_ms=2000&connect_timeout_ms=2000",
        server.url()
    ))
    .expect("open");
    let evil = "a\r\nflush_all\r\nset other-app 0 0 3\r\nbad\r\nb";
    let day = 24 * 3600;
    let long = [
        ("u64-max", Duration::from_secs(u64::MAX)),
        ("duration-max", Duration::MAX),
        ("twenty-years", Duration::from_secs(20 * 365 * day)),
        ("thirty-one-days", Duration::from_secs(31 * day)),
        ("thirty-days", Duration::from_secs(30 * day)),
    ];
    for (key, ttl) in long {
        cache
            .set(key, evil, Some(ttl))
            .unwrap_or_else(|e| panic!("set with {ttl:?}: {e}"));
    }
    cache
        .set("one-second", evil, Some(Duration::from_millis(900)))
        .expect("set with a short TTL");
    assert_eq!(
        raw_get(port, "other-app").as_deref(),
        Some(&b"hello"[..]),
        "the value ran as commands"
    );
    for (key, _) in long {
        assert_eq!(cache.get(key).expect("get").as_deref(), Some(evil), "{key}");
    }
    assert_eq!(cache.get("one-second").expect("get").as_deref(), Some(evil));
    thread::sleep(Duration::from_millis(2500));
    for (key, ttl) in long {
        assert_eq!(
            cache.get(key).expect("get").as_deref(),
            Some(evil),
            "{key} ({ttl:?}) expired early"
        );
    }
    assert_eq!(
        cache.get("one-second").expect("get"),
        None,
        "a short TTL still expires"
    );
    assert_eq!(raw_get(port, "other-app").as_deref(), Some(&b"hello"[..]));
}

// ---- 2, 3. a server that lies -----------------------------------------------

/// A fake memcached on 127.0.0.1: answers `stats` with `stats`, and each
/// `get` with `answer(keys asked)`, then stalls for `stall`. It stops
/// accepting after 30 s.
fn fake_memcached(
    stats: &'static str,
    answer: impl Fn(&[&str]) -> Vec<u8> + Send + Sync + 'static,
    stall: Duration,
) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let answer = Arc::new(answer);
    thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            match listener.accept() {
                Ok((conn, _)) => {
                    let answer = Arc::clone(&answer);
                    thread::spawn(move || serve_fake(conn, stats, &*answer, stall));
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    port
}

fn serve_fake(conn: TcpStream, stats: &str, answer: &dyn Fn(&[&str]) -> Vec<u8>, stall: Duration) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut w = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        let reply = if line == "stats" {
            stats.as_bytes().to_vec()
        } else if let Some(keys) = line.strip_prefix("get ") {
            let keys: Vec<&str> = keys.split(' ').collect();
            let _ = w.write_all(&answer(&keys));
            thread::sleep(stall);
            continue;
        } else {
            b"ERROR\r\n".to_vec()
        };
        if w.write_all(&reply).is_err() {
            return;
        }
    }
}

const FAKE_STATS: &str = "STAT pid 4242\r\nSTAT uptime 10\r\nSTAT time 1800000000\r\nEND\r\n";

/// The body run in a child process with its address space capped at 1 GiB:
/// a client that allocates the announced length of a value up front dies.
#[test]
fn value_announced_at_1_gib_child() {
    if std::env::var_os("ICACHE_HOSTILE_CHILD").is_none() {
        return; // Only runs when started by the test below.
    }
    let port = fake_memcached(
        FAKE_STATS,
        |keys| format!("VALUE {} 0 1000000000\r\n0123456789", keys[0]).into_bytes(),
        Duration::from_secs(5),
    );
    let cache = ICache::from_url(&format!(
        "memcached://127.0.0.1:{port}?timeout_ms=300&connect_timeout_ms=300"
    ))
    .expect("open");
    let t = Instant::now();
    let e = cache.get("k").expect_err("a value that never arrives");
    assert!(e.is_transient(), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    println!("HOSTILE-OK");
}

/// A server announcing a 1 GiB value and sending 10 bytes costs a time-out,
/// not a gigabyte: run in a child process whose address space cannot hold
/// one, so an up-front allocation of the announced length aborts it.
#[test]
fn a_value_announced_at_1_gib_costs_nothing_up_front() {
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("ulimit -v 1048576 && exec \"$0\" \"$@\"")
        .arg(&exe)
        .args([
            "--exact",
            "memcached_faults::value_announced_at_1_gib_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ICACHE_HOSTILE_CHILD", "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("HOSTILE-OK"),
        "child failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `get` accepts no more `VALUE`s than keys it asked for, and none under
/// a key it did not ask for.
#[test]
fn values_not_asked_for_are_refused() {
    type Answer = fn(&[&str]) -> Vec<u8>;
    let cases: [(&str, Answer); 3] = [
        ("the same key twice", |keys| {
            format!(
                "VALUE {k} 0 2\r\nab\r\nVALUE {k} 0 2\r\ncd\r\nEND\r\n",
                k = keys[0]
            )
            .into_bytes()
        }),
        ("a key not asked for", |_| {
            b"VALUE not-asked 0 2\r\nab\r\nEND\r\n".to_vec()
        }),
        ("a thousand values for one key", |keys| {
            let mut out = Vec::new();
            for _ in 0..1000 {
                out.extend_from_slice(format!("VALUE {} 0 2\r\nab\r\n", keys[0]).as_bytes());
            }
            out.extend_from_slice(b"END\r\n");
            out
        }),
    ];
    for (what, answer) in cases {
        let port = fake_memcached(FAKE_STATS, answer, Duration::ZERO);
        let cache = ICache::from_url(&format!(
            "memcached://127.0.0.1:{port}?timeout_ms=1000&connect_timeout_ms=1000"
        ))
        .expect("open");
        let t = Instant::now();
        let e = cache
            .get("k")
            .expect_err(&format!("{what}: must be refused"));
        assert!(e.is_backend(), "{what}: {e}");
        assert!(t.elapsed() < Duration::from_secs(3), "{what}");
        let e = cache
            .get_many(&["k", "j"])
            .expect_err(&format!("{what}: must be refused"));
        assert!(e.is_backend(), "{what}: {e}");
    }
}

/// `time - uptime` from `stats` is server-provided: an overflow is an error,
/// never a panic.
#[test]
fn stats_times_that_overflow_are_an_error() {
    for stats in [
        "STAT pid 1\r\nSTAT uptime 1\r\nSTAT time -9223372036854775808\r\nEND\r\n",
        "STAT pid 1\r\nSTAT uptime -1\r\nSTAT time 9223372036854775807\r\nEND\r\n",
    ] {
        let port = fake_memcached(stats, |_| b"END\r\n".to_vec(), Duration::ZERO);
        let cache = ICache::from_url(&format!(
            "memcached://127.0.0.1:{port}?timeout_ms=1000&connect_timeout_ms=1000"
        ))
        .expect("open");
        let e = cache.get_sum(&["t"]).expect_err("no instance id");
        assert!(e.is_backend(), "{e}");
    }
}

// ---- 4. a pool never wipes a shared server ------------------------------------

/// Another app's keys (another prefix through the same pool, a lone client
/// of that server, a raw key) survive the server being marked down by this
/// client and taken back.
#[test]
fn a_server_taken_back_keeps_other_apps_keys() {
    let Some(p) = Pool3::start(&[]) else {
        return;
    };
    let s = p.port(0);
    assert_eq!(
        crate::raw_memcached(s, b"set raw-app-key 0 0 3\r\nraw\r\n"),
        "STORED"
    );
    let blog = p.open("prefix=blog");
    let post = name_on(
        s,
        |i| format!("post{i}"),
        |n| format!("blog:ic:k:{n}"),
        |n| blog.set(n, "a post", None).expect("set"),
    );
    let solo =
        ICache::from_url(&format!("{}?prefix=solo", p.proxies[0].memcached_url())).expect("open");
    solo.set("note", "solo note", None).expect("set");

    let ours = p.open("");
    let token = name_on(
        s,
        |i| format!("tok{i}"),
        |n| format!("ic:g:{n}"),
        |n| {
            ours.get_sum(&[n]).expect("get_sum");
        },
    );
    p.proxies[0].set_fault(Fault::Refuse);
    until_marked_down(&ours, &token);
    p.proxies[0].set_fault(Fault::Pass);
    until_all_back(&ours);

    assert_eq!(raw_get(s, "raw-app-key").as_deref(), Some(&b"raw"[..]));
    assert_eq!(blog.get(&post).expect("get").as_deref(), Some("a post"));
    assert_eq!(solo.get("note").expect("get").as_deref(), Some("solo note"));
    // Our own old generation is still on the server, but no longer ours.
    assert!(holds(s, &format!("ic:g:{token}")));
}

/// A server started with `-F` (`flush_all` disabled) is taken back too.
#[test]
fn a_server_without_flush_all_is_taken_back() {
    let Some(p) = Pool3::start(&["-F"]) else {
        return;
    };
    assert!(
        crate::raw_memcached(p.port(0), b"flush_all\r\n").starts_with("CLIENT_ERROR"),
        "-F disables flush_all"
    );
    let ours = p.open("");
    let token = name_on(
        p.port(0),
        |i| format!("tok{i}"),
        |n| format!("ic:g:{n}"),
        |n| {
            ours.get_sum(&[n]).expect("get_sum");
        },
    );
    p.proxies[0].set_fault(Fault::Refuse);
    until_marked_down(&ours, &token);
    p.proxies[0].set_fault(Fault::Pass);
    until_all_back(&ours);
    // And used: the token's generation is read there again.
    let v = ours.get_sum(&[&token]).expect("get_sum");
    assert_eq!(ours.get_sum(&[&token]).expect("get_sum"), v);
    ours.set_versioned("page", "x", v).expect("set");
    assert_eq!(
        ours.get_versioned("page", v).expect("get").as_deref(),
        Some("x")
    );
}

/// The read protocol of a page: version first, then the entry, rendered
/// and stored on a miss. Returns what the reader shows.
fn read_page(cache: &ICache, token: &str, key: &str, render: &str) -> String {
    let v = cache.get_sum(&[token]).expect("get_sum");
    if let Some(hit) = cache.get_versioned(key, v).expect("get_versioned") {
        return hit.to_string();
    }
    cache.set_versioned(key, render, v).expect("set_versioned");
    render.to_owned()
}

/// Never stale across a server's absence: the token and the page live on
/// server S; S goes away with its data, the token is bumped elsewhere; S
/// comes back with the old generation and the old page: not served. Then
/// the token is bumped on S and S goes away again: the copies left on the
/// other servers by the first absence (older than that bump) are not served
/// either.
#[test]
fn a_returning_server_never_brings_old_pages_back() {
    let Some(p) = Pool3::start(&[]) else {
        return;
    };
    let s = p.port(0);
    let cache = p.open("");
    let token = name_on(
        s,
        |i| format!("tok{i}"),
        |n| format!("ic:g:{n}"),
        |n| {
            cache.get_sum(&[n]).expect("get_sum");
        },
    );
    let page = name_on(
        s,
        |i| format!("page{i}"),
        |n| format!("ic:v:{n}"),
        |n| cache.set_versioned(n, "probe", 1).expect("set"),
    );
    assert_eq!(read_page(&cache, &token, &page, "v1"), "v1");
    assert_eq!(read_page(&cache, &token, &page, "x"), "v1");

    // S goes away (its process keeps everything); the token moves on elsewhere.
    p.proxies[0].set_fault(Fault::Refuse);
    until_marked_down(&cache, &token);
    cache.incr(&token).expect("bump while S is away");
    assert_eq!(read_page(&cache, &token, &page, "v2"), "v2");

    // S comes back with the old generation and the old page.
    p.proxies[0].set_fault(Fault::Pass);
    until_all_back(&cache);
    assert!(holds(s, &format!("ic:g:{token}")), "S kept its data");
    assert_eq!(
        read_page(&cache, &token, &page, "v3"),
        "v3",
        "the page from before the bump came back"
    );

    // The token moves on, on S now; then S goes away again.
    cache.incr(&token).expect("bump");
    assert_eq!(read_page(&cache, &token, &page, "v4"), "v4");
    p.proxies[0].set_fault(Fault::Refuse);
    until_marked_down(&cache, &token);
    // The other servers still hold the token's generation and the page from
    // the first absence (v2): older than the last bump.
    assert_eq!(
        read_page(&cache, &token, &page, "v5"),
        "v5",
        "a copy left by the first absence came back"
    );
}

/// The same through a fragment: a server that hangs (rather than refuses)
/// and comes back with the fragment's old generation.
#[test]
fn a_hung_server_never_brings_an_old_fragment_back() {
    let Some(p) = Pool3::start(&[]) else {
        return;
    };
    let s = p.port(0);
    let cache = p.open("");
    let fragments_on_s = || {
        keys_on(s)
            .iter()
            .filter(|k| k.starts_with("ic:f:") || k.starts_with("ic:F:"))
            .count()
    };
    // A token whose generation *and* fragment both live on S: then S's
    // return brings back exactly the old pair (a fragment stored elsewhere
    // was overwritten meanwhile).
    let token = (0..400)
        .map(|i| format!("tok{i}"))
        .find(|t| {
            let before = fragments_on_s();
            cache
                .fragment("t", &[t.as_str()], || Ok::<_, ()>("v1".to_owned()))
                .expect("fragment");
            holds(s, &format!("ic:g:{t}")) && fragments_on_s() > before
        })
        .expect("a token with its generation and fragment on S");
    let block = |out: &str| {
        cache
            .fragment("t", &[&token], || Ok::<_, ()>(out.to_owned()))
            .expect("fragment")
    };
    assert_eq!(block("x"), "v1");
    p.proxies[0].set_fault(Fault::Hang);
    until_marked_down(&cache, &token);
    cache.incr(&token).expect("bump while S hangs");
    assert_eq!(block("v2"), "v2");
    p.proxies[0].set_fault(Fault::Pass);
    until_all_back(&cache);
    assert_ne!(
        block("v3"),
        "v1",
        "the fragment from before the bump came back"
    );
}

/// One or two slow answers do not take a server out: its keys keep being
/// read there (a value only that server holds is still found).
#[test]
fn slow_answers_do_not_take_a_server_out() {
    let Some(p) = Pool3::start(&[]) else {
        return;
    };
    let s = p.port(0);
    let cache = p.open("");
    let key = name_on(
        s,
        |i| format!("kept{i}"),
        |n| format!("ic:k:{n}"),
        |n| cache.set(n, "kept", None).expect("set"),
    );
    assert_eq!(cache.get(&key).expect("get").as_deref(), Some("kept"));
    p.proxies[0].set_fault(Fault::Hang);
    let e = cache.get(&key).expect_err("hangs");
    assert!(e.is_transient(), "{e}");
    // Past the circuit breaker's first back-off: the next call reaches the
    // server again (and hangs again).
    thread::sleep(Duration::from_millis(400));
    let e = cache.get(&key).expect_err("hangs");
    assert!(e.is_transient(), "{e}");
    p.proxies[0].set_fault(Fault::Pass);
    let deadline = Instant::now() + Duration::from_secs(5);
    let found = loop {
        match cache.get(&key) {
            Ok(v) => break v,
            Err(e) => {
                assert!(Instant::now() < deadline, "never answered again: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(
        found.as_deref(),
        Some("kept"),
        "the server was taken out: its key was looked up elsewhere"
    );
    assert_eq!(servers_up(&cache), 3);
}

/// Another client process that brought a server back bumped its epoch:
/// this client, which never saw the server go, notices on its next request
/// (in the same round trip) and leaves the old keys there, which no longer
/// get the other client's bumps.
#[test]
fn another_client_notices_a_bumped_epoch() {
    let Some(p) = Pool3::start(&[]) else {
        return;
    };
    let s = p.port(0);
    let (a, b) = (p.open(""), p.open(""));
    let token = name_on(
        s,
        |i| format!("tok{i}"),
        |n| format!("ic:g:{n}"),
        |n| {
            a.get_sum(&[n]).expect("get_sum");
        },
    );
    let page = format!("page-of-{token}");
    assert_eq!(read_page(&b, &token, &page, "v1"), "v1");
    assert_eq!(read_page(&b, &token, &page, "x"), "v1");
    // Only A sees S go and come back (B makes no call meanwhile).
    p.proxies[0].set_fault(Fault::Refuse);
    until_marked_down(&a, &token);
    p.proxies[0].set_fault(Fault::Pass);
    until_all_back(&a);
    // A bumps the token, on S, under S's new epoch.
    a.incr(&token).expect("bump");
    let before = p.proxies[0].round_trips();
    assert_eq!(
        read_page(&b, &token, &page, "v2"),
        "v2",
        "B kept reading S's old keys and missed A's bump"
    );
    assert!(p.proxies[0].round_trips() > before);
    // And B follows A's bumps from now on.
    a.incr(&token).expect("bump");
    assert_eq!(read_page(&b, &token, &page, "v3"), "v3");
}

/// A hit on a pool is one request per server involved, all written before
/// any answer is read: one round trip on each server (the epochs are read
/// in the same request).
#[test]
fn a_pool_hit_is_one_round_trip_per_server() {
    let Some(p) = Pool3::start(&[]) else {
        return;
    };
    let cache = p.open("");
    let tokens: Vec<String> = (0..12).map(|i| format!("hit-{i}")).collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let page = || {
        cache
            .fragment("t", &refs, || Ok::<_, ()>("page".to_owned()))
            .expect("fragment")
    };
    page();
    page();
    let before: Vec<u64> = p.proxies.iter().map(Proxy::round_trips).collect();
    let t = Instant::now();
    assert_eq!(page(), "page");
    let elapsed = t.elapsed();
    let trips: Vec<u64> = p
        .proxies
        .iter()
        .zip(&before)
        .map(|(p, b)| p.round_trips() - b)
        .collect();
    assert!(trips.iter().all(|&t| t <= 1), "{trips:?}");
    assert!(
        trips.iter().filter(|&&t| t == 1).count() >= 2,
        "the tokens spread over the servers: {trips:?}"
    );
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    assert!(cache.stats().hits >= 2);
}

/// Keys stay readable for operators: a token's generation is under
/// `ic:g:<token>@<epoch of its server, in hex>`, the epoch under
/// `ic:g:pool-epoch` on that server.
#[test]
fn pool_keys_are_readable_for_operators() {
    let Some(p) = Pool3::start(&[]) else {
        return;
    };
    let cache = p.open("");
    let g = cache.incr("movies").expect("incr");
    let found: Vec<u16> = (0..3)
        .map(|i| p.port(i))
        .filter(|&port| {
            raw_get(port, &pool_key(port, "ic:g:movies"))
                .is_some_and(|v| v == g.to_string().as_bytes())
        })
        .collect();
    assert_eq!(found.len(), 1, "on exactly one server");
}

/// `failover=off`: a server that stops answering is never taken out, so its
/// keys never move: its tokens fail (and their blocks render uncached) until
/// it answers again, a bump of one of them fails and is replayed, and no
/// other server ever holds them. Two clients can never read one token in
/// two places.
#[test]
fn with_failover_off_keys_never_move() {
    let Some(p) = Pool3::start(&[]) else {
        return;
    };
    let s = p.port(0);
    let cache = p.open("failover=off");
    let token = name_on(
        s,
        |i| format!("tok{i}"),
        |n| format!("ic:g:{n}"),
        |n| {
            cache.get_sum(&[n]).expect("get_sum");
        },
    );
    assert_eq!(
        cache
            .fragment("t", &[&token], || Ok::<_, ()>("v1".to_owned()))
            .expect("render"),
        "v1"
    );
    p.proxies[0].set_fault(Fault::Refuse);
    // Many failures: still not taken out, and nothing is read elsewhere.
    for _ in 0..10 {
        assert!(cache.get_sum(&[&token]).is_err(), "read elsewhere");
        thread::sleep(Duration::from_millis(60));
    }
    assert_eq!(
        servers_up(&cache),
        3,
        "failover=off never takes a server out"
    );
    assert!(
        cache.incr(&token).is_err(),
        "the bump cannot reach its server"
    );
    assert_eq!(
        cache
            .fragment("t", &[&token], || Ok::<_, ()>("uncached".to_owned()))
            .expect("render"),
        "uncached"
    );
    for other in [p.port(1), p.port(2)] {
        assert!(
            !keys_on(other)
                .iter()
                .any(|k| k.contains(&format!("ic:g:{token}"))),
            "the token moved to another server"
        );
    }
    // Back: the failed bump is replayed, and the old fragment is not served.
    p.proxies[0].set_fault(Fault::Pass);
    eventually("the server answers again", Duration::from_secs(10), || {
        cache.get_sum(&[&token]).is_ok()
    });
    assert_eq!(
        cache
            .fragment("t", &[&token], || Ok::<_, ()>("v2".to_owned()))
            .expect("render"),
        "v2",
        "the fragment from before the failed bump came back"
    );
}
