//! The near cache (`?near=`): what a hit costs on the wire in each mode, and
//! the promise of `near=tracking` under its faults: a stalled, dropped or
//! restarted tracking connection, `FLUSHALL`, bumps racing fills, and a
//! handle reading its own writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use icache::ICache;

use crate::support::{Fault, MemcachedServer, Proxy, RedisServer};
use crate::{raw_redis, redis_calls};

/// A block of `size` bytes whose body records that it ran.
fn block(cache: &ICache, tokens: &[&str], body: &str, ran: &AtomicU64) -> String {
    cache
        .fragment("near", tokens, || {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(body.to_string())
        })
        .expect("fragments never fail")
}

const TOKENS: [&str; 3] = ["movies", "user:42", "movies-personal-rating"];

/// On a hit, the server sends the generations only: at most 100 bytes plus
/// 40 per token, whatever the block's size; with `near=off` it sends the
/// block.
fn entries_hit_bytes(server_port: u16, url_of: fn(&Proxy) -> String) {
    let proxy = Proxy::start(server_port);
    let body = "x".repeat(186 * 1024);
    for (near, big) in [("near=entries", false), ("", false), ("near=off", true)] {
        let sep = if near.is_empty() { "" } else { "&" };
        let cache = ICache::from_url(&format!(
            "{}?timeout_ms=2000&connect_timeout_ms=2000{sep}{near}&prefix=bytes-{}",
            url_of(&proxy),
            near.len()
        ))
        .expect("open");
        let ran = AtomicU64::new(0);
        block(&cache, &TOKENS, &body, &ran);
        block(&cache, &TOKENS, &body, &ran);
        let (down, trips) = (proxy.bytes_down(), proxy.round_trips());
        assert_eq!(block(&cache, &TOKENS, &body, &ran).len(), body.len());
        assert_eq!(ran.load(Ordering::SeqCst), 1, "{near}: one render");
        let bytes = proxy.bytes_down() - down;
        assert_eq!(proxy.round_trips() - trips, 1, "{near}: one round trip");
        if big {
            assert!(
                bytes as usize > body.len(),
                "{near}: the body came: {bytes}"
            );
        } else {
            // Every block also reads the flush token (`ICache::flush`).
            let limit = 100 + 40 * (TOKENS.len() as u64 + 1);
            assert!(
                bytes <= limit,
                "{near}: {bytes} bytes from the server, limit {limit}"
            );
            assert!(cache.stats().near_hits >= 1, "{:?}", cache.stats());
        }
    }
}

#[test]
fn redis_entries_hit_moves_generations_only() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    entries_hit_bytes(server.port(), Proxy::redis_url);
}

#[test]
fn memcached_entries_hit_moves_generations_only() {
    let Some(server) = MemcachedServer::start() else {
        return;
    };
    entries_hit_bytes(server.port(), Proxy::memcached_url);
}

/// When another process stored a newer version, the body is fetched once
/// (a second round trip), and later hits move generations only again.
#[test]
fn a_new_version_fetches_the_body_once() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let reader = ICache::from_url(&format!("{}?timeout_ms=2000", server.url())).expect("open");
    let writer = ICache::from_url(&format!("{}?timeout_ms=2000", server.url())).expect("open");
    let ran = AtomicU64::new(0);
    assert_eq!(block(&reader, &["n"], "v1", &ran), "v1");
    writer.incr("n").expect("bump");
    assert_eq!(block(&writer, &["n"], "v2", &ran), "v2");
    assert_eq!(ran.load(Ordering::SeqCst), 2);
    let before = reader.stats();
    assert_eq!(
        block(&reader, &["n"], "never", &ran),
        "v2",
        "the writer's render"
    );
    assert_eq!(block(&reader, &["n"], "never", &ran), "v2");
    let after = reader.stats();
    assert_eq!(ran.load(Ordering::SeqCst), 2, "no render in the reader");
    assert_eq!(after.body_fetches - before.body_fetches, 1, "{after:?}");
    assert_eq!(after.near_hits - before.near_hits, 1, "{after:?}");
}

fn tracking(server_url: &str, extra: &str) -> ICache {
    ICache::from_url(&format!(
        "{server_url}?near=tracking&timeout_ms=2000&connect_timeout_ms=2000{extra}"
    ))
    .expect("open")
}

/// Waits until `cache` serves hits without a round trip (the tracking
/// connection is up and its first ping answered).
fn wait_tracked(cache: &ICache, tokens: &[&str]) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let before = cache.stats().tracked_hits;
        let ran = AtomicU64::new(0);
        block(cache, tokens, "warm", &ran);
        if cache.stats().tracked_hits > before {
            return;
        }
        assert!(
            Instant::now() < until,
            "tracking never started: {:?}",
            cache.stats()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Under `near=tracking` a hit sends nothing to Redis: no `GET`/`MGET`.
#[test]
fn tracking_hit_makes_no_round_trip() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let cache = tracking(&server.url(), "");
    wait_tracked(&cache, &TOKENS);
    let before = redis_calls(server.port(), &["get", "mget"]);
    let ran = AtomicU64::new(0);
    for _ in 0..100 {
        assert_eq!(block(&cache, &TOKENS, "never", &ran), "warm");
    }
    let after = redis_calls(server.port(), &["get", "mget"]);
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    assert_eq!(after, before, "reads reached Redis");
}

/// After `incr` returns, the same handle's reads see the bump at once; a
/// bump by another client is seen within the bound.
#[test]
fn tracking_reads_its_own_writes_and_others_within_the_bound() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let cache = tracking(&server.url(), "&max_lag_ms=50");
    let other = ICache::from_url(&format!("{}?near=off", server.url())).expect("open");
    wait_tracked(&cache, &["own"]);
    let ran = AtomicU64::new(0);
    for i in 0..50 {
        cache.incr("own").expect("bump");
        assert_eq!(
            block(&cache, &["own"], &format!("mine {i}"), &ran),
            format!("mine {i}")
        );
        other.incr("own").expect("bump");
        thread::sleep(Duration::from_millis(50 + 20));
        assert_eq!(
            block(&cache, &["own"], &format!("theirs {i}"), &ran),
            format!("theirs {i}"),
            "a bump that completed max_lag ago is seen"
        );
    }
}

/// A tracking connection that goes silent (open, nothing flows) is not
/// trusted past `max_lag`: the read makes its round trip (and fails open),
/// never serving what a bump made meanwhile invalidated.
#[test]
fn tracking_stalled_connection_is_not_trusted() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(server.port());
    let cache = tracking(&proxy.redis_url(), "&max_lag_ms=50&timeout_ms=200");
    let direct = ICache::from_url(&format!("{}?near=off", server.url())).expect("open");
    wait_tracked(&cache, &["stall"]);
    proxy.set_fault(Fault::Hang);
    direct.incr("stall").expect("bump");
    thread::sleep(Duration::from_millis(60));
    let ran = AtomicU64::new(0);
    assert_eq!(
        block(&cache, &["stall"], "fresh", &ran),
        "fresh",
        "rendered, not the old copy"
    );
    proxy.set_fault(Fault::Pass);
}

/// `FLUSHALL` (the null invalidation) and a restart of the server drop
/// every generation kept in process.
#[test]
fn tracking_flush_and_restart_drop_local_generations() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let cache = tracking(&server.url(), "&max_lag_ms=50");
    wait_tracked(&cache, &["flush"]);
    let ran = AtomicU64::new(0);
    assert_eq!(raw_redis(server.port(), &[b"FLUSHALL"]), "+OK");
    thread::sleep(Duration::from_millis(70));
    assert_eq!(
        block(&cache, &["flush"], "after flush", &ran),
        "after flush"
    );
    wait_tracked(&cache, &["flush"]);
    server.restart();
    thread::sleep(Duration::from_millis(70));
    assert_eq!(
        block(&cache, &["flush"], "after restart", &ran),
        "after restart"
    );
    // Tracking comes back on the new server.
    wait_tracked(&cache, &["flush"]);
}

/// Bumps racing fills: a generation read on a pool connection just before a
/// bump must not be kept after the bump's invalidation was applied (that
/// would be stale forever, beyond any bound).
#[test]
fn tracking_bumps_racing_fills_leave_nothing_stale() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // Pings every millisecond: invalidations are applied while fills are in
    // flight.
    let cache = tracking(&server.url(), "&max_lag_ms=4");
    let other = ICache::from_url(&format!("{}?near=off", server.url())).expect("open");
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(5));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (cache, stop, start) = (cache.clone(), stop.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                while !stop.load(Ordering::SeqCst) {
                    cache.get_sum(&["race"]).expect("get_sum");
                }
            })
        })
        .collect();
    start.wait();
    for _ in 0..300 {
        other.incr("race").expect("bump");
        thread::sleep(Duration::from_millis(2));
    }
    let truth = other.get_sum(&["race"]).expect("get_sum");
    // Beyond the bound, every read agrees with the server.
    thread::sleep(Duration::from_millis(30));
    for _ in 0..20 {
        assert_eq!(cache.get_sum(&["race"]).expect("get_sum"), truth);
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.join().expect("reader");
    }
    assert_eq!(cache.get_sum(&["race"]).expect("get_sum"), truth);
}

/// Options are checked: bad values, and modes a backend cannot have, are
/// configuration errors naming the option.
#[test]
fn near_options_are_checked() {
    for (url, names) in [
        ("redis://127.0.0.1:1/?near=sometimes", "near="),
        (
            "redis://127.0.0.1:1/?near=tracking&max_lag_ms=0",
            "max_lag_ms",
        ),
        ("redis://127.0.0.1:1/?max_lag_ms=10", "max_lag_ms"),
        ("redis://127.0.0.1:1/?near_max_bytes=12", "near_max_bytes"),
        (
            "redis://127.0.0.1:1/?near=off&near_max_bytes=1048576",
            "near_max_bytes",
        ),
        ("memory://?near_max_bytes=1048576", "near_max_bytes"),
        (
            "redis://127.0.0.1:1/?near=tracking&max_lag_ms=600000",
            "max_lag_ms",
        ),
        ("memcached://127.0.0.1:1?near=tracking", "memcached"),
        (
            "redis+cluster://127.0.0.1:1,127.0.0.1:2?near=tracking",
            "single Redis node",
        ),
        ("memory://?near=entries", "near="),
    ] {
        let e = ICache::from_url(url).expect_err(url);
        assert!(e.is_config(), "{url}: {e}");
        assert!(e.to_string().contains(names), "{url}: {e}");
    }
    for url in [
        "redis://127.0.0.1:1/?near=off",
        "redis://127.0.0.1:1/?near=entries&near_max_bytes=1048576",
        "redis://127.0.0.1:1/?near=tracking&max_lag_ms=250",
        "memcached://127.0.0.1:1,127.0.0.1:2?near=entries",
        "memory://?near=off",
    ] {
        ICache::from_url(url).expect(url);
    }
}
