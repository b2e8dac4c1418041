//! The instance check on Redis: entries are served only by the data they
//! were stored in. `run_id` alone misses data replaced while the server
//! runs (`SWAPDB`) and servers whose `INFO` has no `run_id`; the per-database
//! marker read with the generations covers both.

use std::time::Duration;

use icache::ICache;

use crate::support::RedisServer;
use crate::{raw_redis, redis_calls};

fn open(url: &str, query: &str) -> ICache {
    ICache::from_url(&format!(
        "{url}?timeout_ms=2000&connect_timeout_ms=2000&{query}"
    ))
    .expect("open")
}

/// `SWAPDB` brings back an older copy of the data (its generations and
/// entries, copied into db 1 before the data moved on): its entries must be
/// misses, as after a restart from an older snapshot, though `run_id` did
/// not change.
#[test]
fn swapdb_makes_the_swapped_in_entries_misses() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    for near in ["near=off", "near=entries"] {
        let prefix = format!("swap-{}", near.len());
        let cache = open(
            &format!("{}/0", server.url()),
            &format!("prefix={prefix}&{near}"),
        );
        cache.incr("t").expect("incr");
        let old = cache.get_sum(&["t"]).expect("get_sum");
        cache.set_versioned("page", "old", old).expect("set");
        assert_eq!(
            cache.get_versioned("page", old).expect("get").as_deref(),
            Some("old")
        );
        // A copy of the data as it is now (its keys, the way an operator
        // copies an application's keys), then the data moves on.
        for key in [format!("{prefix}:ic:g:t"), format!("{prefix}:ic:v:page")] {
            let k = key.as_bytes();
            assert_eq!(
                raw_redis(server.port(), &[b"COPY", k, k, b"DB", b"1", b"REPLACE"]),
                ":1",
                "{key}"
            );
        }
        cache.incr("t").expect("incr");
        let new = cache.get_sum(&["t"]).expect("get_sum");
        cache.set_versioned("page", "new", new).expect("set");
        assert_eq!(raw_redis(server.port(), &[b"SWAPDB", b"0", b"1"]), "+OK");
        let now = cache.get_sum(&["t"]).expect("get_sum after SWAPDB");
        assert_eq!(now, old, "{near}: the old generations are back");
        assert_eq!(
            cache.get_versioned("page", now).expect("get"),
            None,
            "{near}: an entry of the swapped-in data was served"
        );
        // The cache works on the swapped-in data.
        cache.set_versioned("page", "again", now).expect("set");
        assert_eq!(
            cache.get_versioned("page", now).expect("get").as_deref(),
            Some("again"),
            "{near}"
        );
        // Back as it was for the next mode.
        assert_eq!(raw_redis(server.port(), &[b"FLUSHALL"]), "+OK");
    }
}

/// A server whose `INFO` gives no `run_id` (here `INFO` renamed away, as
/// some Redis-compatible servers and proxies do) is usable, and a restart
/// from an older snapshot still makes that snapshot's entries misses.
#[test]
fn without_run_id_a_restart_from_a_snapshot_is_detected() {
    let Some(mut server) = RedisServer::start_with(&["--rename-command", "INFO", ""]) else {
        return;
    };
    assert!(
        raw_redis(server.port(), &[b"INFO"]).starts_with("-ERR"),
        "INFO is renamed away"
    );
    let cache = open(&server.url(), "prefix=life&near=off");
    cache.ping().expect("a server without INFO is usable");
    cache.incr("t").expect("incr");
    let old = cache.get_sum(&["t"]).expect("get_sum");
    cache.set_versioned("page", "old", old).expect("set");
    assert_eq!(raw_redis(server.port(), &[b"SAVE"]), "+OK");
    cache.incr("t").expect("incr");
    let new = cache.get_sum(&["t"]).expect("get_sum");
    cache.set_versioned("page", "new", new).expect("set");
    server.stop();
    server.restart();
    // The pooled connections died with the server; the first call may
    // still see one of them fail.
    let now = (0..20)
        .find_map(|_| {
            let got = cache.get_sum(&["t"]).ok();
            if got.is_none() {
                std::thread::sleep(Duration::from_millis(300));
            }
            got
        })
        .expect("get_sum after the restart");
    assert_eq!(now, old, "the snapshot's generations are back");
    assert_eq!(
        cache.get_versioned("page", now).expect("get"),
        None,
        "an entry of the old snapshot was served after a restart"
    );
    let other = open(&server.url(), "prefix=life&near=off");
    assert_eq!(other.get_versioned("page", now).expect("get"), None);
    // New entries are served, by both handles.
    cache.set_versioned("page", "fresh", now).expect("set");
    assert_eq!(
        other.get_versioned("page", now).expect("get").as_deref(),
        Some("fresh")
    );
}

/// `near=tracking` follows a `SWAPDB` (which sends no invalidation): the
/// tracking connection reads the marker with every ping, and hits with no
/// round trip resume on the swapped-in data.
#[test]
fn tracking_follows_swapdb() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let cache = open(
        &format!("{}/0", server.url()),
        "prefix=track&near=tracking&max_lag_ms=40",
    );
    let other = open(&format!("{}/1", server.url()), "prefix=track&near=off");
    cache.incr("t").expect("incr");
    other.incr("t").expect("incr in db 1");
    let in_db1 = other.get_sum(&["t"]).expect("get_sum");
    let port = server.port();
    let tracked = |c: &ICache| {
        // Generations are kept once tracking is on and a fill landed; a
        // kept one is read with no MGET.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let before = redis_calls(port, &["mget"]);
            let v = c.get_sum(&["t"]).expect("get_sum");
            if redis_calls(port, &["mget"]) == before {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "no tracked hit");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let before = tracked(&cache);
    assert_ne!(before, in_db1);
    assert_eq!(raw_redis(server.port(), &[b"SWAPDB", b"0", b"1"]), "+OK");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        cache.get_sum(&["t"]).expect("get_sum"),
        in_db1,
        "after SWAPDB the tracked generations are the swapped-in ones"
    );
    assert_eq!(tracked(&cache), in_db1);
}
