//! Redis Sentinel (`redis+sentinel://`): a real group of one master, one
//! replica and three sentinels; the master is killed with SIGKILL and the
//! replica promoted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use icache::ICache;
use icache_test_support::RedisSentinel;

/// Reads one counter of `INFO` through the handle (for round-trip counts).
fn commands_processed(cache: &ICache) -> u64 {
    cache
        .server_stats()
        .expect("INFO")
        .into_iter()
        .find(|(k, _)| k == "total_commands_processed")
        .and_then(|(_, v)| v.parse().ok())
        .expect("total_commands_processed in INFO")
}

/// The seed's reader: version first, then the entry; on a miss "render" the
/// database's value (read after the version) and store it.
fn read(cache: &ICache, db: &AtomicU64) -> icache::Result<u64> {
    let version = cache.get_sum(&["movies"])?;
    if let Some(body) = cache.get_versioned("movies-list", version)? {
        return Ok(body.parse().expect("a body we stored"));
    }
    let value = db.load(Ordering::SeqCst);
    cache.set_versioned("movies-list", value.to_string(), version)?;
    Ok(value)
}

/// Reads and bumps go on after the master dies and the replica takes over;
/// no read ever returns a value older than the last bump that completed
/// before it began (for `near=tracking`, older than `max_lag` before it: its
/// promise), and the `near=tracking` handle tracks the new master (its reads
/// make no round trip again, and still see the bumps).
#[test]
fn failover_keeps_reads_and_bumps_and_is_never_stale() {
    let Some(mut group) = RedisSentinel::start() else {
        return;
    };
    let url = group.url();
    let writer = ICache::from_url(&url).expect("writer");
    let readers = [
        ICache::from_url(&url).expect("reader"),
        ICache::from_url(&format!("{url}?near=off")).expect("reader"),
        ICache::from_url(&format!("{url}?near=tracking&max_lag_ms=100")).expect("reader"),
    ];
    // The database, and what the oracle knows: (when, value) of every
    // completed bump.
    let db = Arc::new(AtomicU64::new(0));
    let completed: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::new(Mutex::new(vec![]));
    let stop = Arc::new(AtomicBool::new(false));
    let failed_over = Arc::new(Mutex::new(None::<Instant>));

    let bumper = {
        let (db, completed, stop, writer) = (db.clone(), completed.clone(), stop.clone(), writer);
        thread::spawn(move || {
            let mut bumps_after = 0;
            while !stop.load(Ordering::SeqCst) {
                let value = db.fetch_add(1, Ordering::SeqCst) + 1; // the commit
                if writer.incr("movies").is_ok() {
                    completed
                        .lock()
                        .expect("not poisoned")
                        .push((Instant::now(), value));
                    bumps_after += 1;
                }
                thread::sleep(Duration::from_millis(20));
            }
            bumps_after
        })
    };
    let reading: Vec<_> = readers
        .iter()
        .cloned()
        .map(|cache| {
            let (db, completed, stop) = (db.clone(), completed.clone(), stop.clone());
            thread::spawn(move || {
                let lag = cache.max_lag();
                let (mut ok, mut stale) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    let began = Instant::now();
                    // The newest bump that completed before `began - lag`.
                    let floor = completed
                        .lock()
                        .expect("not poisoned")
                        .iter()
                        .rev()
                        .find(|(at, _)| *at + lag <= began)
                        .map_or(0, |(_, v)| *v);
                    if let Ok(value) = read(&cache, &db) {
                        ok.push(Instant::now());
                        if value < floor {
                            stale.push((value, floor));
                        }
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                (ok, stale)
            })
        })
        .collect();

    thread::sleep(Duration::from_millis(1500));
    group.kill_master();
    let took = group.wait_for_failover(Duration::from_secs(30));
    *failed_over.lock().expect("not poisoned") = Some(Instant::now());
    let before = completed.lock().expect("not poisoned").len();
    // Long enough for every circuit breaker (4 s at most) to let a probe
    // through to the new master.
    thread::sleep(Duration::from_secs(6));

    // The tracking handle is subscribed on the new master: its reads are
    // answered in process again (a few pings, no reads)...
    let tracking = &readers[2];
    let calls = commands_processed(tracking);
    for _ in 0..200 {
        tracking.get_sum(&["movies"]).expect("get_sum");
    }
    let made = commands_processed(tracking) - calls;
    assert!(
        made < 50,
        "{made} commands for 200 tracked reads after the failover"
    );

    stop.store(true, Ordering::SeqCst);
    let bumps = bumper.join().expect("the thread ends");
    let after = completed.lock().expect("not poisoned").len() - before;
    assert!(
        after > 20,
        "only {after} bumps completed after the failover ({bumps} in all; failover took {took:?})"
    );
    let at = failed_over
        .lock()
        .expect("not poisoned")
        .expect("failed over");
    for (i, r) in reading.into_iter().enumerate() {
        let (ok, stale) = r.join().expect("the thread ends");
        assert!(
            stale.is_empty(),
            "reader {i} served stale values (value, floor): {stale:?}"
        );
        let after = ok.iter().filter(|t| **t > at).count();
        assert!(
            after > 50,
            "reader {i}: only {after} reads worked after the failover"
        );
    }
}

/// The replica lags (its replication link is held) when the master dies
/// after a bump: the promoted replica has the generation from before the
/// bump *and* the entry stored under it. The instance check (entries are
/// served only by the server instance that stored them) makes it a miss:
/// without it the old value would be served although its bump completed.
/// For each `near=` mode, on the handles that knew the old master (and keep
/// copies in process) and on fresh ones.
#[test]
fn failover_to_a_lagging_replica_is_a_miss() {
    let Some(mut group) = RedisSentinel::start() else {
        return;
    };
    let url = group.url();
    let modes = ["near=off", "near=entries", "near=tracking"];
    let handles: Vec<ICache> = modes
        .iter()
        .map(|near| ICache::from_url(&format!("{url}?{near}")).expect("opens"))
        .collect();
    let mut before = Vec::new();
    for (cache, near) in handles.iter().zip(modes) {
        let (token, key) = (format!("movies-{near}"), format!("list-{near}"));
        let version = cache.get_sum(&[&token]).expect("get_sum");
        cache.set_versioned(&key, "old", version).expect("stored");
        assert_eq!(
            cache.get_versioned(&key, version).expect("get").as_deref(),
            Some("old")
        );
        before.push(version);
    }
    group.wait_replicated();
    group.replication_link().pause();
    assert!(
        group.original_master_serves(),
        "the sentinels failed over by themselves (a loaded machine): the replica does not \
         replicate through the held link, so this run proves nothing; run it again"
    );
    for (cache, near) in handles.iter().zip(modes) {
        cache
            .incr(&format!("movies-{near}"))
            .expect("bump, on the master only");
    }
    group.kill_master();
    group.wait_for_failover(Duration::from_secs(30));

    let fresh: Vec<ICache> = modes
        .iter()
        .map(|near| ICache::from_url(&format!("{url}?{near}")).expect("opens"))
        .collect();
    for (i, near) in modes.iter().enumerate() {
        let (token, key) = (format!("movies-{near}"), format!("list-{near}"));
        for (who, cache) in [("old handle", &handles[i]), ("new handle", &fresh[i])] {
            // Circuit breakers may still be open from the dead master.
            let deadline = Instant::now() + Duration::from_secs(10);
            let version = loop {
                match cache.get_sum(&[&token]) {
                    Ok(v) => break v,
                    Err(_) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(100))
                    }
                    Err(e) => panic!("{near}, {who}: no answer from the new master: {e}"),
                }
            };
            // The promoted replica missed the bump: the generation went back.
            assert_eq!(
                version, before[i],
                "{near}, {who}: the replica was meant to lag"
            );
            assert_eq!(
                cache.get_versioned(&key, version).expect("get"),
                None,
                "{near}, {who}: an entry stored by the old master matched on the new one"
            );
        }
    }
}
