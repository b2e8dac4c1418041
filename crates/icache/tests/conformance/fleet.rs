//! A fleet of app servers: several OS processes (this test binary spawned
//! again as a child) share one Redis or memcached. `fill=lease` makes a bump
//! of a hot block cost one render across all of them, a lease holder killed
//! with SIGKILL costs the others at most `lease_ms`, and `stale=render`
//! serves the previous body meanwhile, never an older one, never to the
//! handle that bumped.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use icache::ICache;
use icache_test_support::{MemcachedServer, RedisServer};

/// The tests of this file take turns: each runs several processes of
/// several threads, and their timing bounds mean nothing on a machine the
/// others oversubscribe.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Time-outs for a loaded machine: a bump that times out is not what these
/// tests are about.
const SLACK: &str = "timeout_ms=1000";

/// The environment variables that turn this test binary into a child.
const CHILD_URL: &str = "ICACHE_TEST_FLEET_URL";
const CHILD_MODE: &str = "ICACHE_TEST_FLEET_MODE";
const CHILD_DB: &str = "ICACHE_TEST_FLEET_DB";

/// The hot block's body: 50 ms of "database", then the data (a file the
/// test writes before each bump, as a database commit before its bump).
fn render(db: &Path, renders: &AtomicU64) -> Result<String, std::io::Error> {
    thread::sleep(Duration::from_millis(50));
    renders.fetch_add(1, Ordering::SeqCst);
    Ok(format!("body {}", std::fs::read_to_string(db)?.trim()))
}

/// What the body says: the data version it showed.
fn shown(body: &str) -> u64 {
    body.trim_start_matches("body ")
        .parse()
        .expect("a body we rendered")
}

/// The child process. `readers`: 4 threads read the hot block until stdin
/// says `stop`, then it prints `renders N`. `hold`: takes the lease with a
/// render that never ends (after printing `rendering`), to be killed.
#[test]
fn fleet_child_process() {
    let (Ok(url), Ok(mode), Ok(db)) = (
        std::env::var(CHILD_URL),
        std::env::var(CHILD_MODE),
        std::env::var(CHILD_DB),
    ) else {
        return; // run as a normal test: nothing to do
    };
    let db = PathBuf::from(db);
    let cache = ICache::from_url(&url).expect("child opens");
    let renders = Arc::new(AtomicU64::new(0));
    let mut out = std::io::stdout().lock();
    if mode == "hold" {
        let _ = cache.fragment("hot", &["movies"], || {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "\nrendering");
            let _ = out.flush();
            thread::sleep(Duration::from_secs(60));
            render(&db, &renders)
        });
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (cache, renders, stop, db) =
                (cache.clone(), renders.clone(), stop.clone(), db.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let _ = cache.fragment("hot", &["movies"], || render(&db, &renders));
                    thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect();
    writeln!(out, "\nready").expect("pipe");
    out.flush().expect("pipe");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("reader thread");
    }
    let s = cache.stats();
    writeln!(
        out,
        "\nrenders {} lease_waits {} stale {}",
        renders.load(Ordering::SeqCst),
        s.lease_waits,
        s.stale_served
    )
    .expect("pipe");
    out.flush().expect("pipe");
}

struct ChildProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ChildProcess {
    fn spawn(url: &str, mode: &str, db: &Path) -> ChildProcess {
        let mut child = Command::new(std::env::current_exe().expect("this test binary"))
            .args([
                "fleet::fleet_child_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_URL, url)
            .env(CHILD_MODE, mode)
            .env(CHILD_DB, db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a child process");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        ChildProcess {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line that starts with `word` (the harness's own output
    /// is skipped).
    fn expect(&mut self, word: &str) -> String {
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line).expect("pipe from a child") == 0 {
                panic!("a child process ended before saying {word:?}");
            }
            if line.starts_with(word) {
                return line.trim().to_owned();
            }
        }
    }

    fn stop(&mut self) -> u64 {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "stop");
        }
        let line = self.expect("renders ");
        let _ = self.child.wait();
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("renders N")
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The "database": a file the bodies read.
struct Db {
    path: PathBuf,
    value: AtomicU64,
}

impl Db {
    fn new(name: &str) -> Db {
        let path = std::env::temp_dir().join(format!(
            "icache-fleet-{name}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        std::fs::write(&path, "0").expect("write the db file");
        Db {
            path,
            value: AtomicU64::new(0),
        }
    }

    /// A commit: the next value, written where the bodies read it.
    fn commit(&self) -> u64 {
        let v = self.value.fetch_add(1, Ordering::SeqCst) + 1;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, v.to_string()).expect("write the db file");
        std::fs::rename(&tmp, &self.path).expect("replace the db file");
        v
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// 4 processes × 4 threads on one hot block (50 ms to render), 20 bumps:
/// the renders across all processes per bump (the first fill counts as one).
fn renders_per_bump(url: &str) -> f64 {
    const BUMPS: u64 = 20;
    let db = Db::new("renders");
    let writer = ICache::from_url(url).expect("writer");
    let mut children: Vec<ChildProcess> = (0..4)
        .map(|_| ChildProcess::spawn(url, "readers", &db.path))
        .collect();
    for c in &mut children {
        c.expect("ready");
    }
    for _ in 0..BUMPS {
        thread::sleep(Duration::from_millis(300));
        db.commit();
        writer.incr("movies").expect("bump");
    }
    thread::sleep(Duration::from_millis(300));
    let renders: u64 = children.iter_mut().map(ChildProcess::stop).sum();
    renders as f64 / (BUMPS + 1) as f64
}

#[test]
fn fill_lease_one_render_per_bump_redis() {
    let _turn = turn();
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let per_bump = renders_per_bump(&format!("{}/?{SLACK}", redis.url()));
    assert!(
        per_bump <= 1.25,
        "{per_bump} renders per bump with fill=lease on Redis"
    );
}

#[test]
fn fill_lease_one_render_per_bump_memcached() {
    let _turn = turn();
    let Some(memcached) = MemcachedServer::start() else {
        return;
    };
    let per_bump = renders_per_bump(&format!("{}?{SLACK}", memcached.url()));
    assert!(
        per_bump <= 1.25,
        "{per_bump} renders per bump with fill=lease on memcached"
    );
}

/// `fill=local`: single-flight per process only, so each of the 4
/// processes renders each bump (what the test above would catch).
#[test]
fn fill_local_renders_once_per_process() {
    let _turn = turn();
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let per_bump = renders_per_bump(&format!("{}/?fill=local&{SLACK}", redis.url()));
    assert!(
        per_bump >= 2.5,
        "only {per_bump} renders per bump with fill=local"
    );
}

/// A lease holder killed with SIGKILL mid-render: the other processes'
/// readers render within `lease_ms` + a margin; nobody hangs.
fn killed_holder(url: &str, lease_ms: u64) {
    let db = Db::new("killed");
    let mut holder = ChildProcess::spawn(url, "hold", &db.path);
    holder.expect("rendering");
    holder.child.kill().expect("SIGKILL the lease holder");
    let _ = holder.child.wait();
    let reader = ICache::from_url(url).expect("reader");
    let renders = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (reader, renders, path) = (reader.clone(), renders.clone(), db.path.clone());
            thread::spawn(move || {
                let body = reader
                    .fragment("hot", &["movies"], || render(&path, &renders))
                    .expect("a body");
                (body, started.elapsed())
            })
        })
        .collect();
    for r in readers {
        let (body, took) = r.join().expect("reader");
        assert_eq!(body, "body 0");
        assert!(
            took < Duration::from_millis(lease_ms + 700),
            "a reader took {took:?} with lease_ms={lease_ms} after the holder died"
        );
    }
    assert_eq!(
        renders.load(Ordering::SeqCst),
        1,
        "one render in this process"
    );
    assert_eq!(
        reader.stats().lease_waits,
        1,
        "the reader waited for the dead holder"
    );
}

#[test]
fn killed_lease_holder_costs_at_most_lease_ms_redis() {
    let _turn = turn();
    let Some(redis) = RedisServer::start() else {
        return;
    };
    killed_holder(&format!("{}/?lease_ms=800&{SLACK}", redis.url()), 800);
}

#[test]
fn killed_lease_holder_costs_at_most_lease_ms_memcached() {
    let _turn = turn();
    let Some(memcached) = MemcachedServer::start() else {
        return;
    };
    killed_holder(&format!("{}?lease_ms=800&{SLACK}", memcached.url()), 800);
}

/// `stale=render`: two reader processes render the hot block (50 ms), and
/// this process reads it from 4 threads while it is bumped 20 times. A read
/// that did not render itself never waits longer than a hit + 10 ms (the
/// slowest hit of the same run, so that the machine's own noise is on both
/// sides);
/// every body is the new version or the one before, and none is older once
/// the new one was served; the handle that bumps always reads the new one.
#[test]
fn stale_render_serves_the_previous_body_and_no_older() {
    let _turn = turn();
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let url = format!("{}/?stale=render&{SLACK}", redis.url());
    let db = Db::new("stale");
    let mut children: Vec<ChildProcess> = (0..2)
        .map(|_| ChildProcess::spawn(&url, "readers", &db.path))
        .collect();
    for c in &mut children {
        c.expect("ready");
    }
    let reader = ICache::from_url(&url).expect("reader");
    let writer = ICache::from_url(&url).expect("writer");
    let renders = Arc::new(AtomicU64::new(0));
    reader
        .fragment("hot", &["movies"], || render(&db.path, &renders))
        .expect("warm");
    // (when it began, latency, value shown, rendered here, a plain hit)
    let log: Arc<Mutex<Vec<Logged>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (reader, log, stop, path) =
                (reader.clone(), log.clone(), stop.clone(), db.path.clone());
            thread::spawn(move || {
                let mine = AtomicU64::new(0);
                while !stop.load(Ordering::SeqCst) {
                    let before = mine.load(Ordering::SeqCst);
                    let began = Instant::now();
                    let (body, events) = icache::observe(|| {
                        reader.fragment("hot", &["movies"], || render(&path, &mine))
                    });
                    let took = began.elapsed();
                    let body = body.expect("a body");
                    let rendered = mine.load(Ordering::SeqCst) != before;
                    let hit = events
                        .first()
                        .is_some_and(|e| e.outcome == icache::Outcome::Hit);
                    log.lock().expect("not poisoned").push((
                        began,
                        took,
                        shown(&body),
                        rendered,
                        hit,
                    ));
                    thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect();
    // (value, when its bump completed)
    let mut bumps = Vec::new();
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(300));
        let value = db.commit();
        writer.incr("movies").expect("bump");
        bumps.push((value, Instant::now()));
        // Read your own writes: the bumping handle never gets the old body.
        let body = writer
            .fragment("hot", &["movies"], || render(&db.path, &renders))
            .expect("the writer's read");
        assert_eq!(shown(&body), value, "the bumping handle got an old body");
    }
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("reader thread");
    }
    for c in &mut children {
        c.stop();
    }
    let log = log.lock().expect("not poisoned");
    let stale = reader.stats().stale_served;
    assert!(
        stale > 0,
        "no stale body was served: the test shows nothing"
    );
    let slowest_hit = log.iter().filter(|r| r.4).map(|r| r.1).max().expect("hits");
    // When each value was first served: from then on nothing older may be.
    let first_seen = |v: u64| log.iter().filter(|r| r.2 >= v).map(|r| r.0 + r.1).min();
    for (i, (value, bumped)) in bumps.iter().enumerate() {
        let next = bumps.get(i + 1).map(|(_, at)| *at);
        let seen = first_seen(*value);
        for (began, took, shown, rendered, _) in log.iter() {
            // Reads that began after this bump completed and before the next.
            if *began < *bumped || next.is_some_and(|n| *began >= n) {
                continue;
            }
            // Newer is fine (it began before the next bump completed).
            assert!(
                *shown + 1 >= *value,
                "a read after bump {value} showed {shown}: older than the one before"
            );
            if let Some(seen) = seen
                && *began > seen
            {
                assert!(
                    *shown >= *value,
                    "a read after bump {value} showed {shown} once the new body was stored"
                );
            }
            if !rendered {
                assert!(
                    *took <= slowest_hit + Duration::from_millis(10),
                    "a read waited {took:?} during a re-render (the slowest hit: {slowest_hit:?})"
                );
            }
        }
    }
}

/// The Askama case's template.
#[derive(askama::Template)]
#[template(source = "{{ v }}", ext = "txt")]
struct Data {
    v: String,
}

/// One read of the stale test: when it began, how long it took, the value
/// it showed, whether this read rendered, whether it was a plain hit.
type Logged = (Instant, Duration, u64, bool, bool);

/// What the per-block test's bodies show, and how long they take.
static VALUE: AtomicU64 = AtomicU64::new(0);
static DELAY_MS: AtomicU64 = AtomicU64::new(0);

fn data() -> String {
    thread::sleep(Duration::from_millis(DELAY_MS.load(Ordering::SeqCst)));
    format!("v{}", VALUE.load(Ordering::SeqCst))
}

/// The per-block `stale` choice, in the fragment API (`fragment_with` and
/// `BlockOptions::stale_render`), Askama and maud (`.stale_render(true)`), a
/// MiniJinja call block (`stale=true`) and the seed syntax
/// (`{% icache 'movies' stale=true %}`), on handles
/// without `stale=render`: while another handle's slow render of the new
/// version holds the lease (as another process's would), the block gets its
/// previous body at once (`Outcome::Stale`); the same block without the
/// choice waits for the new one.
#[test]
fn stale_is_chosen_per_block_in_each_api() {
    let _turn = turn();
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let url = format!("{}/?{SLACK}", redis.url());
    type Read = Box<dyn Fn(&ICache, bool) -> (String, Vec<icache::BlockEvent>) + Send + Sync>;
    let env_for = |cache: &ICache| {
        let mut env = minijinja::Environment::new();
        icache::minijinja::register(&mut env, cache.clone());
        env.add_function("data", data);
        env.set_loader(icache::minijinja::loader(|name: &str| {
            Ok(match name {
                "call-stale" => Some(
                    "{% call icache('t-call', name='call', stale=true) %}{{ data() }}{% endcall %}",
                ),
                "call-fresh" => Some(
                    "{% call icache('t-call', name='call', stale=false) %}{{ data() }}{% endcall %}",
                ),
                "seed-stale" => {
                    Some("{% load icache %}{% icache 't-seed' name='seed' stale=true %}{{ data() }}{% endicache %}")
                }
                "seed-fresh" => {
                    Some("{% load icache %}{% icache 't-seed' name='seed' stale=false %}{{ data() }}{% endicache %}")
                }
                _ => None,
            })
        }));
        env
    };
    let template = |which: &'static str| -> Read {
        Box::new(move |cache: &ICache, stale: bool| {
            let env = env_for(cache);
            let name = format!("{which}-{}", if stale { "stale" } else { "fresh" });
            let (out, events) = icache::observe(|| {
                env.get_template(&name)
                    .and_then(|t| t.render(()))
                    .expect("renders")
            });
            (out, events)
        })
    };
    let cases: Vec<(&str, &str, Read)> = vec![
        (
            "fragment_with",
            "t-api",
            Box::new(|cache: &ICache, stale: bool| {
                icache::observe(|| {
                    let options = icache::BlockOptions::new().stale_render(stale);
                    cache
                        .fragment_with("api", &["t-api"], options, || Ok::<_, String>(data()))
                        .expect("renders")
                })
            }),
        ),
        (
            "Askama",
            "t-askama",
            Box::new(|cache: &ICache, stale: bool| {
                icache::observe(|| {
                    icache::askama::cached(cache, "askama", &["t-askama"], || Data { v: data() })
                        .stale_render(stale)
                        .to_string()
                })
            }),
        ),
        (
            "maud",
            "t-maud",
            Box::new(|cache: &ICache, stale: bool| {
                use maud::Render;
                icache::observe(|| {
                    icache::maud::cached(cache, "maud", &["t-maud"], || maud::html! { (data()) })
                        .stale_render(stale)
                        .render()
                        .into_string()
                })
            }),
        ),
        ("MiniJinja call block", "t-call", template("call")),
        ("seed syntax", "t-seed", template("seed")),
    ];
    let reader = ICache::from_url(&url).expect("reader");
    let writer = ICache::from_url(&url).expect("writer");
    for (api, token, read) in &cases {
        for stale in [true, false] {
            DELAY_MS.store(0, Ordering::SeqCst);
            let before = read(&reader, stale).0;
            VALUE.fetch_add(1, Ordering::SeqCst);
            writer.incr(token).expect("bump");
            let now = format!("v{}", VALUE.load(Ordering::SeqCst));
            DELAY_MS.store(400, Ordering::SeqCst);
            // Another handle renders the new version slowly, holding the lease.
            let holder = ICache::from_url(&url).expect("holder");
            let slow = thread::scope(|s| {
                let slow = s.spawn(|| read(&holder, stale).0);
                thread::sleep(Duration::from_millis(100));
                let started = Instant::now();
                let (got, events) = read(&reader, stale);
                let took = started.elapsed();
                if stale {
                    assert_eq!(got, before, "{api}: stale=true gets the previous body");
                    assert!(
                        took < Duration::from_millis(200),
                        "{api}: stale=true waited {took:?}"
                    );
                    assert_eq!(events[0].outcome, icache::Outcome::Stale, "{api}");
                } else {
                    assert_eq!(got, now, "{api}: stale=false waits for the new body");
                    assert_ne!(events[0].outcome, icache::Outcome::Stale, "{api}");
                }
                slow.join().expect("the slow render")
            });
            assert_eq!(slow, now, "{api}: the holder rendered the new version");
        }
    }
}

/// A lease holder whose body panics gives the lease up as it unwinds: the
/// next process renders at once, it does not wait out `lease_ms` (the chaos
/// run's injected render panics found this).
#[test]
fn a_panicking_lease_holder_gives_the_lease_up() {
    let _turn = turn();
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // A long lease: waiting it out would be plain to see.
    let url = format!("{}/?lease_ms=20000&{SLACK}", redis.url());
    let (holder, other) = (
        ICache::from_url(&url).expect("holder"),
        ICache::from_url(&url).expect("other"),
    );
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        holder.fragment("hot", &["panics"], || -> Result<String, ()> {
            panic!("the body fails")
        })
    }));
    assert!(panicked.is_err(), "the body's panic reaches the caller");
    let started = Instant::now();
    let html = other.fragment("hot", &["panics"], || Ok::<_, ()>("fresh".to_string()));
    assert_eq!(html.as_deref(), Ok("fresh"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?} for a lease whose holder had panicked",
        started.elapsed()
    );
}
