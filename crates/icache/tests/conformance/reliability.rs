//! Never stale, never down: a stale-read checker run on every backend, under
//! evictions, restarts (with and without a snapshot that rolls the server's
//! state back), and across OS processes.
//!
//! The checker: writers commit to a "database" (a counter), then bump the
//! token; readers render a block that embeds the data version they read. A
//! read fails the check if it returns a version older than the last bump that
//! had completed before the read began; under `near=tracking`, older than
//! the last bump that had completed `max_lag_ms` before it began (the
//! mode's documented bound).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use icache::ICache;

use crate::support::{MemcachedServer, RedisServer};
use crate::{Ctx, Kind, Server};

/// What one checker run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub reads: u64,
    pub stale: u64,
    /// Reads begun after the backend was back that returned data committed
    /// before it was back.
    pub stale_after_recovery: u64,
    pub writes: u64,
    pub failed_bumps: u64,
    /// Reads that completed while the backend was down (rendered uncached).
    pub reads_while_down: u64,
}

#[derive(Default)]
pub struct Db {
    data: AtomicU64,
    /// The highest data version whose bump has completed.
    completed: AtomicU64,
    /// Under `near=tracking`: the bound, and when each version's bump
    /// completed.
    lag: Duration,
    history: std::sync::Mutex<std::collections::VecDeque<(Instant, u64)>>,
}

impl Db {
    fn completed(&self, v: u64) {
        self.completed.fetch_max(v, Ordering::SeqCst);
        if !self.lag.is_zero() {
            let mut h = self.history.lock().expect("history");
            h.push_back((Instant::now(), v));
            // Keep a few seconds: reads look back by the lag only.
            while h.len() > 100_000 {
                h.pop_front();
            }
        }
    }

    /// The oldest data version a read begun now may return.
    fn floor(&self) -> u64 {
        if self.lag.is_zero() {
            return self.completed.load(Ordering::SeqCst);
        }
        let Some(before) = Instant::now().checked_sub(self.lag) else {
            return 0;
        };
        let h = self.history.lock().expect("history");
        h.iter()
            .filter(|(t, _)| *t <= before)
            .map(|(_, v)| *v)
            .max()
            .unwrap_or(0)
    }
}

/// Shared between the checker's threads and the scenario driving it.
#[derive(Default)]
pub struct Phase {
    pub stop: AtomicBool,
    /// Writers wait while set.
    pub pause: AtomicBool,
    /// Bumps the scenario itself attempted while the backend was down, and
    /// saw fail.
    pub failed_in_outage: AtomicU64,
    pub down: AtomicBool,
    /// Data version when the backend was back (0: not yet / never down).
    pub recovered_at: AtomicU64,
}

/// Runs writers and readers until `scenario` returns.
pub fn check(
    reads_cache: &ICache,
    writes_cache: &ICache,
    writers: usize,
    readers: usize,
    scenario: impl FnOnce(&Phase, &Db),
) -> Report {
    check_with(
        reads_cache,
        writes_cache,
        writers,
        readers,
        &["checker-data".to_string()],
        scenario,
    )
}

/// [`check`] with the data under several tokens: writers bump them all, and
/// every reader's block names them all.
pub fn check_with(
    reads_cache: &ICache,
    writes_cache: &ICache,
    writers: usize,
    readers: usize,
    tokens: &[String],
    scenario: impl FnOnce(&Phase, &Db),
) -> Report {
    let tokens: Arc<Vec<String>> = Arc::new(tokens.to_vec());
    let db = Arc::new(Db {
        lag: reads_cache.max_lag(),
        ..Db::default()
    });
    let phase = Arc::new(Phase::default());
    let report = Arc::new(std::sync::Mutex::new(Report::default()));
    let mut threads = Vec::new();
    for _ in 0..writers {
        let (db, phase, cache, report) = (
            db.clone(),
            phase.clone(),
            writes_cache.clone(),
            report.clone(),
        );
        let tokens = tokens.clone();
        threads.push(thread::spawn(move || {
            let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let (mut writes, mut failed) = (0, 0);
            while !phase.stop.load(Ordering::SeqCst) {
                if phase.pause.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                // Commit, then bump.
                let v = db.data.fetch_add(1, Ordering::SeqCst) + 1;
                writes += 1;
                match cache.incr_many(&tokens) {
                    Ok(_) => db.completed(v),
                    Err(_) => failed += 1,
                }
                thread::sleep(Duration::from_micros(300));
            }
            let mut r = report.lock().expect("report");
            r.writes += writes;
            r.failed_bumps += failed;
        }));
    }
    for i in 0..readers {
        let (db, phase, cache, report) = (
            db.clone(),
            phase.clone(),
            reads_cache.clone(),
            report.clone(),
        );
        let tokens = tokens.clone();
        threads.push(thread::spawn(move || {
            let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let mut with_other = tokens.clone();
            with_other.push("other");
            let mut mine = Report::default();
            while !phase.stop.load(Ordering::SeqCst) {
                let floor = db.floor();
                let recovered = phase.recovered_at.load(Ordering::SeqCst);
                let down = phase.down.load(Ordering::SeqCst);
                let render = || Ok::<_, ()>(db.data.load(Ordering::SeqCst).to_string());
                // Half the readers read through a nested block: the outer
                // block names only "page", the inner one the data token.
                let out = if i % 2 == 0 {
                    cache.fragment("t", &with_other, render)
                } else {
                    cache.fragment("page", &["page"], || {
                        let inner = cache.fragment("t", &tokens, render)?;
                        Ok::<_, ()>(inner)
                    })
                }
                .expect("fragments never fail");
                let v: u64 = out.parse().expect("a number");
                mine.reads += 1;
                if v < floor {
                    mine.stale += 1;
                }
                if recovered > 0 && v < recovered {
                    mine.stale_after_recovery += 1;
                }
                if down && phase.down.load(Ordering::SeqCst) {
                    mine.reads_while_down += 1;
                }
            }
            let mut r = report.lock().expect("report");
            r.reads += mine.reads;
            r.stale += mine.stale;
            r.stale_after_recovery += mine.stale_after_recovery;
            r.reads_while_down += mine.reads_while_down;
        }));
    }
    scenario(&phase, &db);
    phase.stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("checker thread");
    }
    let mut r = Arc::try_unwrap(report)
        .ok()
        .map(|m| m.into_inner().expect("report"))
        .unwrap_or_default();
    r.failed_bumps += phase.failed_in_outage.load(Ordering::SeqCst);
    r
}

fn assert_clean(what: &str, r: &Report) {
    eprintln!(
        "{what}: {} reads checked, {} writes, {r:?}",
        r.reads, r.writes
    );
    assert!(
        r.reads >= 100,
        "{what}: too few reads to mean anything: {r:?}"
    );
    assert!(r.writes >= 20, "{what}: too few writes: {r:?}");
    assert_eq!(r.stale, 0, "{what}: stale reads: {r:?}");
    assert_eq!(
        r.stale_after_recovery, 0,
        "{what}: stale after recovery: {r:?}"
    );
}

suite!(checker = crate::reliability::cases: stale_read_checker);

pub mod cases {
    use super::*;

    pub fn stale_read_checker(ctx: &Ctx) {
        // Readers and writers on separate handles, as in separate processes.
        let writes = ctx.open("prefix=checker");
        let reads = ctx.open("prefix=checker");
        let (reads, writes) = if ctx.kind == Kind::Memory {
            (ctx.cache.clone(), ctx.cache.clone())
        } else {
            (reads, writes)
        };
        let r = check(&reads, &writes, 2, 4, |_, _| {
            thread::sleep(Duration::from_millis(1500))
        });
        assert_clean(&format!("{:?} checker", ctx.kind), &r);
        assert_eq!(r.failed_bumps, 0);
    }
}

/// Filler traffic that pushes the backend past its memory bound.
fn filler(cache: ICache, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let value = "f".repeat(8 * 1024);
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let _ = cache.set(&format!("filler-{n}"), value.as_str(), None);
            n += 1;
        }
        n
    })
}

fn stat(cache: &ICache, name: &str) -> u64 {
    cache
        .server_stats()
        .expect("stats")
        .into_iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the server's stats"))
}

#[test]
fn evictions_never_serve_stale() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"]);
    let memcached = MemcachedServer::start_with(&["-m", "2"]);
    let mut backends: Vec<(String, &str)> = vec![("memory://?max_bytes=65536".into(), "evictions")];
    if let Some(s) = &redis {
        backends.push((format!("{}?timeout_ms=2000", s.url()), "evicted_keys"));
    }
    if let Some(s) = &memcached {
        backends.push((format!("{}?timeout_ms=2000", s.url()), "evictions"));
    }
    for (url, counter) in backends {
        let cache = ICache::from_url(&url).expect("open");
        let before = stat(&cache, counter);
        let stop = Arc::new(AtomicBool::new(false));
        let fill = filler(cache.clone(), stop.clone());
        let r = check(&cache, &cache, 2, 4, |_, _| {
            thread::sleep(Duration::from_millis(1500))
        });
        stop.store(true, Ordering::SeqCst);
        let filled = fill.join().expect("filler");
        let evicted = stat(&cache, counter) - before;
        eprintln!("{url}: {evicted} evictions during the run ({filled} filler values)");
        // The counter counts only what the bound evicted (not entries
        // replaced by a re-render), and the first filler value is gone.
        assert!(
            evicted > 0,
            "{url}: no eviction happened: the test proves nothing"
        );
        assert_eq!(
            cache.get("filler-0").expect("get"),
            None,
            "{url}: the first filler value was not evicted: the test proves nothing"
        );
        assert_clean(&format!("{url} under evictions"), &r);
    }
}

/// Kill -9 and restart mid-run: pages keep rendering during the outage,
/// bumps during it are errors, nothing stale once the server is back.
fn restart_scenario(ctx: &mut Ctx, snapshot: bool) {
    let reads = ctx.open("prefix=restart");
    let writes = ctx.open("prefix=restart");
    let port = ctx.port();
    let server = &mut ctx.server;
    let r = check(&reads, &writes, 2, 4, |phase, db| {
        let pause = |on: bool| {
            phase.pause.store(on, Ordering::SeqCst);
            // Let a writer in the middle of a commit + bump finish it.
            thread::sleep(Duration::from_millis(50));
        };
        thread::sleep(Duration::from_millis(400));
        if snapshot {
            // An RDB snapshot of generations and entries as they are now;
            // then the data and the generations move on.
            pause(true);
            assert_eq!(crate::raw_redis(port, &[b"SAVE"]), "+OK");
            pause(false);
            thread::sleep(Duration::from_millis(400));
        }
        pause(true);
        phase.down.store(true, Ordering::SeqCst);
        match server {
            Server::Redis(s) => s.stop(),
            Server::Memcached(s) => s.stop(),
            _ => unreachable!("a single server"),
        }
        thread::sleep(Duration::from_millis(300));
        // An invalidation during the outage is reported as an error.
        if writes.incr_many(&["checker-data"]).is_err() {
            phase.failed_in_outage.fetch_add(1, Ordering::SeqCst);
        }
        thread::sleep(Duration::from_millis(200));
        match server {
            Server::Redis(s) => s.restart(),
            Server::Memcached(s) => s.restart(),
            _ => unreachable!("a single server"),
        }
        phase.down.store(false, Ordering::SeqCst);
        phase
            .recovered_at
            .store(db.data.load(Ordering::SeqCst), Ordering::SeqCst);
        // The sharpest window: the server's state rolled back, and no writer
        // has bumped anything since. Readers must not serve the old entries.
        thread::sleep(Duration::from_millis(500));
        pause(false);
        thread::sleep(Duration::from_millis(500));
    });
    let what = format!("{:?} restart (snapshot: {snapshot})", ctx.kind);
    assert_clean(&what, &r);
    assert!(
        r.failed_bumps > 0,
        "{what}: no bump was attempted during the outage: {r:?}"
    );
    assert!(
        r.reads_while_down > 0,
        "{what}: no page rendered during the outage: {r:?}"
    );
}

#[test]
fn redis_restart_without_persistence() {
    let Some(mut ctx) = Ctx::start(Kind::Redis) else {
        return;
    };
    restart_scenario(&mut ctx, false);
}

#[test]
fn redis_restart_rolled_back_to_an_older_snapshot() {
    let Some(mut ctx) = Ctx::start(Kind::Redis) else {
        return;
    };
    restart_scenario(&mut ctx, true);
}

#[test]
fn memcached_restart() {
    let Some(mut ctx) = Ctx::start(Kind::Memcached) else {
        return;
    };
    restart_scenario(&mut ctx, false);
}

// ---- several OS processes sharing one server ------------------------------

/// A "database" several processes share: two numbers in files, under file
/// locks (commit = locked read-modify-write).
mod filedb {
    use std::fs::{File, OpenOptions};
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::path::Path;

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .expect("open db file")
    }

    fn read(f: &mut File) -> u64 {
        let mut s = String::new();
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.read_to_string(&mut s).expect("read");
        s.trim().parse().unwrap_or(0)
    }

    fn write(f: &mut File, v: u64) {
        f.set_len(0).expect("truncate");
        f.seek(SeekFrom::Start(0)).expect("seek");
        write!(f, "{v}").expect("write");
        f.flush().expect("flush");
    }

    /// Adds `delta` (or takes the max with `max`) atomically; returns the new value.
    pub fn update(path: &Path, f: impl FnOnce(u64) -> u64) -> u64 {
        let mut file = open(path);
        file.lock().expect("lock");
        let v = f(read(&mut file));
        write(&mut file, v);
        file.unlock().expect("unlock");
        v
    }

    pub fn get(path: &Path) -> u64 {
        let mut file = open(path);
        file.lock_shared().expect("lock");
        let v = read(&mut file);
        file.unlock().expect("unlock");
        v
    }
}

/// The body of one child process: reads and writes for a while, prints a
/// `REPORT reads stale writes` line.
#[test]
fn checker_child() {
    let (Ok(url), Ok(dir)) = (
        std::env::var("ICACHE_CHECKER_URL"),
        std::env::var("ICACHE_CHECKER_DIR"),
    ) else {
        return; // Only runs when started by multi_process_checker.
    };
    let dir = std::path::PathBuf::from(dir);
    let (data, completed) = (dir.join("data"), dir.join("completed"));
    let cache = ICache::from_url(&url).expect("open");
    let deadline = Instant::now() + Duration::from_millis(1500);
    let (mut reads, mut stale, mut writes) = (0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        if reads % 4 == 0 {
            let v = filedb::update(&data, |v| v + 1);
            writes += 1;
            if cache.incr("mp-data").is_ok() {
                filedb::update(&completed, |c| c.max(v));
            }
        }
        let floor = filedb::get(&completed);
        let out = cache
            .fragment("t", &["mp-data"], || {
                Ok::<_, ()>(filedb::get(&data).to_string())
            })
            .expect("fragment");
        reads += 1;
        if out.parse::<u64>().expect("number") < floor {
            stale += 1;
        }
    }
    println!("REPORT {reads} {stale} {writes}");
}

#[test]
fn multi_process_checker() {
    let redis = RedisServer::start();
    let memcached = MemcachedServer::start();
    let urls: Vec<String> = redis
        .iter()
        .map(|s| s.url())
        .chain(memcached.iter().map(|s| s.url()))
        .collect();
    for url in urls {
        let dir =
            std::env::temp_dir().join(format!("icache-mp-{}-{}", std::process::id(), url.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let exe = std::env::current_exe().expect("test binary");
        let children: Vec<_> = (0..3)
            .map(|_| {
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "reliability::checker_child",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(
                        "ICACHE_CHECKER_URL",
                        format!("{url}?prefix=mp&timeout_ms=2000"),
                    )
                    .env("ICACHE_CHECKER_DIR", &dir)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn child")
            })
            .collect();
        let (mut reads, mut stale, mut writes) = (0u64, 0u64, 0u64);
        for child in children {
            let out = child.wait_with_output().expect("child");
            assert!(out.status.success(), "{url}: child failed");
            let text = String::from_utf8_lossy(&out.stdout);
            // libtest prints "test … ... " before our line.
            let line = text
                .lines()
                .find_map(|l| l.split_once("REPORT ").map(|(_, r)| r))
                .unwrap_or_else(|| panic!("{url}: no report in {text}"));
            let n: Vec<u64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            assert_eq!(n.len(), 3, "{url}: {line}");
            reads += n[0];
            stale += n[1];
            writes += n[2];
        }
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("{url}: 3 processes, {reads} reads checked, {writes} writes, {stale} stale");
        assert!(reads >= 100 && writes >= 20, "{url}: too little traffic");
        assert_eq!(stale, 0, "{url}: stale reads across processes");
    }
}

// ---- pools and clusters: one node goes away mid-run ------------------------

/// A pool server stops answering (its data stays), is marked down, its keys
/// move to the others and move on there; when it answers again it still holds
/// its old generations and entries. None of that may be served.
#[test]
fn memcached_pool_server_comes_back_with_old_data() {
    let (Some(a), Some(b), Some(c)) = (
        MemcachedServer::start(),
        MemcachedServer::start(),
        MemcachedServer::start(),
    ) else {
        return;
    };
    let proxy = crate::support::Proxy::start(b.port());
    let url = format!(
        "memcached://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}?timeout_ms=100&connect_timeout_ms=100",
        a.port(),
        proxy.port(),
        c.port()
    );
    let reads = ICache::from_url(&url).expect("pool");
    let writes = ICache::from_url(&url).expect("pool");
    // Tokens spread over the servers, so some live on the one that hangs.
    let r = check_tokens(&reads, &writes, |phase, db| {
        thread::sleep(Duration::from_millis(500));
        phase.down.store(true, Ordering::SeqCst);
        proxy.pause();
        thread::sleep(Duration::from_millis(1500));
        proxy.resume();
        phase.down.store(false, Ordering::SeqCst);
        phase
            .recovered_at
            .store(db.data.load(Ordering::SeqCst), Ordering::SeqCst);
        thread::sleep(Duration::from_millis(2000));
    });
    assert_clean("memcached pool, a server hangs and comes back", &r);
    let stats = reads.server_stats().expect("stats");
    assert!(
        stats.iter().any(|(k, v)| k == "servers_up" && v == "3"),
        "{stats:?}"
    );
}

#[test]
fn memcached_pool_server_killed_mid_run() {
    let Some(mut ctx) = Ctx::start(Kind::MemcachedPool) else {
        return;
    };
    let url = format!("{}?timeout_ms=200&connect_timeout_ms=200", ctx.base());
    let reads = ICache::from_url(&url).expect("pool");
    let writes = ICache::from_url(&url).expect("pool");
    let Server::MemcachedPool(servers) = &mut ctx.server else {
        unreachable!()
    };
    let r = check_tokens(&reads, &writes, |phase, db| {
        thread::sleep(Duration::from_millis(500));
        phase.down.store(true, Ordering::SeqCst);
        servers[1].stop();
        thread::sleep(Duration::from_millis(1500));
        servers[1].restart();
        phase.down.store(false, Ordering::SeqCst);
        phase
            .recovered_at
            .store(db.data.load(Ordering::SeqCst), Ordering::SeqCst);
        thread::sleep(Duration::from_millis(1500));
    });
    assert_clean("memcached pool, a server killed and restarted", &r);
}

/// The checker with several data tokens (so they spread over a pool's or a
/// cluster's nodes): every writer bumps all of them, every reader's block
/// names all of them.
fn check_tokens(reads: &ICache, writes: &ICache, scenario: impl FnOnce(&Phase, &Db)) -> Report {
    let tokens: Vec<String> = (0..8).map(|i| format!("spread-{i}")).collect();
    check_with(reads, writes, 2, 4, &tokens, scenario)
}

#[test]
fn redis_cluster_node_killed_mid_run() {
    let Some(mut ctx) = Ctx::start(Kind::RedisCluster) else {
        return;
    };
    let url = format!("{}?timeout_ms=200&connect_timeout_ms=200", ctx.base());
    let reads = ICache::from_url(&url).expect("cluster");
    let writes = ICache::from_url(&url).expect("cluster");
    let Server::RedisCluster(cluster) = &mut ctx.server else {
        unreachable!()
    };
    let r = check_tokens(&reads, &writes, |phase, db| {
        thread::sleep(Duration::from_millis(700));
        phase.down.store(true, Ordering::SeqCst);
        cluster.stop_node(1);
        thread::sleep(Duration::from_millis(1500));
        cluster.restart_node(1);
        phase.down.store(false, Ordering::SeqCst);
        phase
            .recovered_at
            .store(db.data.load(Ordering::SeqCst), Ordering::SeqCst);
        thread::sleep(Duration::from_millis(1500));
    });
    assert_clean("redis cluster, a master killed and restarted", &r);
    assert!(
        r.reads_while_down > 0,
        "pages rendered during the outage: {r:?}"
    );
}

/// A hit on a cluster sends only `GET`s, one per key, to the nodes that own
/// them (written to every node before any answer is read), and nothing else:
/// no slot-map reload, no multi-key command, no script.
///
/// With `near=off` the entry comes too (one more `GET`); with the default
/// `near=entries` the body is served from process and only the tokens'
/// generations are read.
#[test]
fn redis_cluster_hit_is_gets_only() {
    for (near, entry_gets) in [("near=off", 1u64), ("near=entries", 0)] {
        cluster_hit_gets(near, entry_gets);
    }
}

fn cluster_hit_gets(near: &str, entry_gets: u64) {
    let Some(ctx) = Ctx::start(Kind::RedisCluster) else {
        return;
    };
    let c = &ctx.open(near);
    let tokens: Vec<String> = (0..8).map(|i| format!("hit-{i}")).collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let page = || {
        c.fragment("t", &refs, || Ok::<_, ()>("page".to_string()))
            .expect("f")
    };
    page();
    page();
    let stats = |port: u16| -> (u64, u64) {
        (
            crate::redis_calls(port, &["get"]),
            crate::redis_calls(port, &["mget", "cluster", "eval", "evalsha", "set"]),
        )
    };
    let ports = ctx.ports();
    let before: Vec<(u64, u64)> = ports.iter().map(|&p| stats(p)).collect();
    assert_eq!(page(), "page");
    let after: Vec<(u64, u64)> = ports.iter().map(|&p| stats(p)).collect();
    let gets: u64 = after.iter().zip(&before).map(|(a, b)| a.0 - b.0).sum();
    let others: u64 = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).sum();
    let nodes = after.iter().zip(&before).filter(|(a, b)| a.0 > b.0).count();
    // Every block also reads the flush token (`ICache::FLUSH_TOKEN`).
    assert_eq!(
        gets,
        tokens.len() as u64 + 1 + entry_gets,
        "{near}: one GET per token and the flush token, and {entry_gets} for the entry"
    );
    assert_eq!(others, 0, "nothing else");
    assert!(nodes >= 2, "the keys spread over the nodes ({nodes})");
}
