//! The purges' shapes (Varnish, Fastly, Cloudflare) against a local HTTP
//! server that records every request (the real CDN APIs are not reachable
//! from the tests), retries, and the two ways to call a Purger.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;

use icache::ICache;
use icache_http::{PurgeErrorKind, Purger, surrogate_key};

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Recorded {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Answers each request with the next status of `statuses` (the last one
/// repeated), recording it.
struct Recorder {
    url: String,
    seen: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    fn start(statuses: &[u16]) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, statuses) = (seen.clone(), statuses.to_vec());
        thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (
                    parts.next().unwrap_or("").to_owned(),
                    parts.next().unwrap_or("").to_owned(),
                );
                let mut headers = Vec::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.trim_end().split_once(':') {
                        headers.push((k.trim().to_owned(), v.trim().to_owned()));
                    }
                }
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                log.lock().expect("log").push(Recorded {
                    method,
                    path,
                    headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                let status = statuses.get(n).or(statuses.last()).copied().unwrap_or(200);
                let reply = "{\"success\":true}";
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            }
        });
        Recorder { url, seen }
    }

    fn seen(&self) -> Vec<Recorded> {
        self.seen.lock().expect("log").clone()
    }
}

fn tokens(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user:{i}")).collect()
}

fn sorted_keys(tokens: &[String]) -> Vec<String> {
    let mut k: Vec<String> = tokens.iter().map(|t| surrogate_key(t)).collect();
    k.sort();
    k
}

#[test]
fn varnish_gets_purge_with_the_xkey_purge_header() {
    let r = Recorder::start(&[200]);
    let p = Purger::varnish(&r.url).expect("url");
    p.purge(&["movies", "7", "movies"]).expect("purge");
    let seen = r.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("PURGE", "/")
    );
    let mut got: Vec<&str> = seen[0].header("xkey-purge").split(' ').collect();
    got.sort_unstable();
    assert_eq!(got, sorted_keys(&["movies".into(), "7".into()]));
    // Many tokens: several requests, each header within Varnish's limits.
    let many = tokens(400);
    p.purge(&many).expect("purge");
    let seen = r.seen();
    assert!(seen.len() >= 3, "{}", seen.len());
    let mut all: Vec<String> = Vec::new();
    for s in &seen[1..] {
        assert!(s.header("xkey-purge").len() <= 4000);
        all.extend(s.header("xkey-purge").split(' ').map(str::to_owned));
    }
    all.sort();
    assert_eq!(all, sorted_keys(&many));
}

#[test]
fn fastly_gets_a_surrogate_key_purge_in_batches_of_256() {
    let r = Recorder::start(&[200]);
    let p = Purger::fastly("SVC123", "secret-token").api_base(&r.url);
    let many = tokens(300);
    p.purge(&many).expect("purge");
    let seen = r.seen();
    assert_eq!(seen.len(), 2);
    let mut all = Vec::new();
    for s in &seen {
        assert_eq!(
            (s.method.as_str(), s.path.as_str()),
            ("POST", "/service/SVC123/purge")
        );
        assert_eq!(s.header("fastly-key"), "secret-token");
        all.extend(s.header("surrogate-key").split(' ').map(str::to_owned));
    }
    assert_eq!(seen[0].header("surrogate-key").split(' ').count(), 256);
    all.sort();
    assert_eq!(all, sorted_keys(&many));
    assert_eq!(p.stats().ok, 2);
}

#[test]
fn cloudflare_gets_a_purge_by_tags_in_batches_of_30() {
    let r = Recorder::start(&[200]);
    let p =
        Purger::from_url(&format!("cloudflare://ZONE9?token=cf-token&api={}", r.url)).expect("url");
    let many = tokens(31);
    p.purge(&many).expect("purge");
    let seen = r.seen();
    assert_eq!(seen.len(), 2);
    let mut all = Vec::new();
    for s in &seen {
        assert_eq!(
            (s.method.as_str(), s.path.as_str()),
            ("POST", "/zones/ZONE9/purge_cache")
        );
        assert_eq!(s.header("authorization"), "Bearer cf-token");
        assert_eq!(s.header("content-type"), "application/json");
        let tags = s
            .body
            .strip_prefix("{\"tags\":[")
            .and_then(|b| b.strip_suffix("]}"))
            .unwrap_or_else(|| panic!("body {:?}", s.body));
        all.extend(tags.split(',').map(|t| t.trim_matches('"').to_owned()));
    }
    assert_eq!(seen[0].body.matches(',').count(), 29);
    all.sort();
    assert_eq!(all, sorted_keys(&many));
}

#[test]
fn failures_are_retried_and_refusals_reported_by_name() {
    // Two 503s then a 200: purged, three requests.
    let r = Recorder::start(&[503, 503, 200]);
    let p = Purger::varnish(&r.url).expect("url");
    p.purge(&["movies"]).expect("third try");
    assert_eq!(r.seen().len(), 3);
    assert_eq!((p.stats().ok, p.stats().failed), (1, 0));

    // A refusal is not retried; the error says who refused and what.
    let r = Recorder::start(&[403]);
    let p = Purger::fastly("SVC", "bad").api_base(&r.url);
    let err = p.purge(&["movies"]).expect_err("403");
    assert_eq!(err.kind(), PurgeErrorKind::Purge);
    let msg = err.to_string();
    assert!(
        msg.contains("Fastly service SVC") && msg.contains("403"),
        "{msg}"
    );
    assert!(
        !msg.contains("bad"),
        "the token must not be in messages: {msg}"
    );
    assert_eq!(r.seen().len(), 1);
    assert_eq!(p.stats().failed, 1);

    // Nobody listening: an error after the retries.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let p = Purger::varnish(&format!("http://127.0.0.1:{port}")).expect("url");
    let err = p.purge(&["movies"]).expect_err("refused");
    assert!(err.to_string().contains("did not answer"), "{err}");
}

#[test]
fn the_relay_hook_and_incr_and_purge() {
    let r = Recorder::start(&[200]);
    let purger = Purger::varnish(&r.url).expect("url");
    // The outbox relay's `after_bump(impl Fn(&[String]) -> Result<(), String>)`.
    let p = purger.clone();
    let hook = move |bumped: &[String]| p.purge(bumped).map_err(|e| e.to_string());
    hook(&["movies".to_owned()]).expect("hook");
    assert_eq!(r.seen().len(), 1);

    let cache = ICache::memory();
    let before = cache.generations(&["7"]).expect("gens")[0];
    let gens = purger
        .incr_and_purge(&cache, &["7"])
        .expect("bump and purge");
    assert_eq!(gens, [before + 1]);
    assert_eq!(r.seen()[1].header("xkey-purge"), surrogate_key("7"));

    // The bump fails: nothing is purged, the error says so.
    let down = ICache::from_url("redis://127.0.0.1:1?timeout_ms=50").expect("url");
    let err = purger.incr_and_purge(&down, &["7"]).expect_err("down");
    assert_eq!(err.kind(), PurgeErrorKind::Bump);
    assert_eq!(r.seen().len(), 2);
}

#[test]
fn bad_purge_urls_name_the_bad_part() {
    for (url, part) in [
        ("ftp://x", "scheme"),
        ("http://", "no host"),
        ("http://127.0.0.1:99999", "99999"),
        ("fastly://", "id"),
        ("fastly://svc", "token"),
        ("cloudflare://z?token=t&ttl=3", "ttl"),
        ("cloudflare://z?token=t&api=nope", "scheme"),
    ] {
        let err = Purger::from_url(url).expect_err(url);
        assert_eq!(err.kind(), PurgeErrorKind::Config);
        assert!(err.to_string().contains(part), "{url}: {err}");
    }
}

#[test]
fn a_failed_purge_is_sent_again_with_the_next_one() {
    let r = Recorder::start(&[503, 503, 503, 200]);
    let p = Purger::varnish(&r.url).expect("url");
    let err = p.purge(&["movies"]).expect_err("three 503s");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(p.pending(), 1);
    p.purge(&["7"]).expect("purged");
    let seen = r.seen();
    assert_eq!(seen.len(), 4);
    let mut keys: Vec<&str> = seen[3].header("xkey-purge").split(' ').collect();
    keys.sort_unstable();
    assert_eq!(keys, sorted_keys(&["movies".into(), "7".into()]));
    assert_eq!(p.pending(), 0);
}

fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        thread::sleep(std::time::Duration::from_millis(50));
    }
    done()
}

#[test]
fn a_failed_purge_is_retried_in_the_background_until_the_proxy_takes_it() {
    // One purge call tries 3 times: all refused; then the proxy is back.
    let r = Recorder::start(&[503, 503, 503, 200]);
    let p = Purger::varnish(&r.url).expect("url");
    assert!(p.purge(&["late"]).is_err());
    assert_eq!(p.pending(), 1);
    // No further purge from the app: the purger's own retry sends it.
    assert!(wait_until(|| p.stats().ok == 1), "not retried");
    assert_eq!(p.pending(), 0);
    let seen = r.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[3].header("xkey-purge"), surrogate_key("late"));
}

#[test]
fn the_relay_hook_keeps_rows_only_while_the_proxy_has_refused_briefly() {
    let r = Recorder::start(&[503]);
    let p = Purger::varnish(&r.url)
        .expect("url")
        .timeout(std::time::Duration::from_millis(500))
        .relay_hold(std::time::Duration::from_millis(100));
    let hook = p.relay_hook();
    // A blip: the batch fails, its rows stay for the relay to retry.
    let first = hook(&["a".to_owned()]);
    assert!(first.is_err(), "{first:?}");
    // Past the hold, well before the retry thread's first try (0.5 s).
    thread::sleep(std::time::Duration::from_millis(200));
    // Refused for longer than the hold: the relay goes on (its bumps are
    // the site's own) at once, without a request of its own (a proxy that
    // hangs would cost each batch its time-outs); the purges wait in the
    // purger, whose retry thread probes the proxy.
    let sent = r.seen().len();
    let started = std::time::Instant::now();
    assert_eq!(hook(&["b".to_owned()]), Ok(()));
    assert!(started.elapsed() < std::time::Duration::from_millis(200));
    assert!(
        r.seen()[sent..]
            .iter()
            .all(|x| !x.header("xkey-purge").contains(&surrogate_key("b"))),
        "the hook sent a request past the hold"
    );
    // A direct purge is queued at once too, and says so.
    let err = p.purge(&["c"]).expect_err("queued");
    assert!(err.to_string().contains("queued"), "{err}");
}

#[test]
fn a_deferred_purge_waits_until_the_failed_bump_was_replayed() {
    let Some(mut redis) = icache_test_support::RedisServer::start() else {
        return;
    };
    let cache = ICache::from_url(&format!("{}?timeout_ms=200", redis.url())).expect("url");
    cache.incr("warm").expect("bump");
    redis.stop();
    assert!(cache.incr("replayed").is_err());
    assert!(cache.has_pending_bumps());
    let r = Recorder::start(&[200]);
    let p = Purger::varnish(&r.url).expect("url");
    p.defer(&cache, &["replayed"]);
    // Another purge meanwhile does not carry it: the bump is not replayed.
    p.purge(&["other"]).expect("purge");
    thread::sleep(std::time::Duration::from_millis(1200));
    let keys = |r: &Recorder| -> Vec<String> {
        r.seen()
            .iter()
            .flat_map(|x| {
                x.header("xkey-purge")
                    .split(' ')
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert!(
        !keys(&r).contains(&surrogate_key("replayed")),
        "sent before the replay"
    );
    // The server is back; the handle's next read replays the bump.
    redis.restart();
    cache.generations(&["x"]).expect("replayed on this read");
    assert!(!cache.has_pending_bumps());
    assert!(
        wait_until(|| keys(&r).contains(&surrogate_key("replayed"))),
        "never sent after the replay"
    );
}
