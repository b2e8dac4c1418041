//! One child process: writer and reader threads on one `ICache`, checking
//! every read against the shared database, until the orchestrator creates the
//! `stop` file. Prints one `REPORT key=value …` line on stdout at the end.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use icache::ICache;

use crate::db::Db;
use crate::faults::{self, Backend, MemoryInjector, panic_message};
use crate::rng::Rng;
use crate::tally::Tally;

/// The payload of an injected render panic; any other panic is unexpected.
pub(crate) const INJECTED: &str = "icache-chaos: injected render panic";

/// Panics other than the injected ones, in any thread of this process
/// (icache's own threads included), counted by the panic hook.
static UNEXPECTED_PANICS: AtomicU64 = AtomicU64::new(0);

/// What the orchestrator tells a child (`--child …`).
#[derive(Debug, Clone)]
pub(crate) struct ChildArgs {
    pub(crate) backend: Backend,
    pub(crate) url: String,
    pub(crate) dir: PathBuf,
    pub(crate) index: u64,
    pub(crate) seed: u64,
    pub(crate) writers: usize,
    pub(crate) readers: usize,
    pub(crate) items: usize,
    pub(crate) hung: Duration,
    /// How long the fault schedule runs (memory only: its faults are
    /// injected in this process).
    pub(crate) seconds: f64,
    pub(crate) in_process_faults: bool,
    /// `--faults`: only these kinds (names), if given.
    pub(crate) faults: Option<Vec<String>>,
    /// The run's origin (Unix time in ms): findings are timed from it, as
    /// the orchestrator's fault log is.
    pub(crate) origin_ms: u64,
    /// `--writers db`: readers only, rendering rows of this PostgreSQL
    /// database (writer processes commit there; relays bump).
    pub(crate) db_url: Option<String>,
}

/// The pages readers render: each a few overlapping items.
pub(crate) fn pages(items: usize) -> Vec<Vec<usize>> {
    (0..items.div_ceil(2))
        .map(|p| {
            let mut page: Vec<usize> = Vec::new();
            for i in [(2 * p) % items, (2 * p + 1) % items, (5 * p + 3) % items] {
                if !page.contains(&i) {
                    page.push(i);
                }
            }
            page
        })
        .collect()
}

fn item_token(i: usize) -> String {
    format!("item:{i}")
}

fn page_token(p: usize) -> String {
    format!("page:{p}")
}

/// One thread's current icache call, for the watchdog: the start in ms
/// since the child started (0: no call), and what it is.
#[derive(Default)]
struct CallSlot {
    started_ms: AtomicU64,
    warned: AtomicBool,
}

struct Shared {
    args: ChildArgs,
    cache: ICache,
    stop: AtomicBool,
    t0: Instant,
    pages: Vec<Vec<usize>>,
    tally: Mutex<Tally>,
    /// Stale and malformed reads printed so far (only the first few are).
    printed: AtomicU64,
    /// Stale reads per second since the origin, to line up with the faults.
    stale_by_second: Mutex<BTreeMap<u64, u64>>,
    /// `near=tracking`'s bound (`max_lag_ms`), zero in the other modes: a
    /// read may miss the bumps of the last `lag`, no older one.
    lag: Duration,
    /// Under a lag: `completed` of every item, snapshot every 2 ms, so that a
    /// read's floor is what had completed `lag` before it began.
    history: Mutex<VecDeque<(Instant, Vec<u64>)>>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Prints a finding (the first 10 of this process only).
    fn finding(&self, text: &str) {
        if self.printed.fetch_add(1, Ordering::SeqCst) < 10 {
            eprintln!(
                "[{} process {}] {text}",
                self.args.backend.name(),
                self.args.index
            );
        }
    }

    /// Times one icache call: counts it as hung if it took over the limit.
    fn timed<T>(
        &self,
        slot: &CallSlot,
        what: impl Fn() -> String,
        f: impl FnOnce() -> T,
        tally: &mut Tally,
    ) -> T {
        slot.warned.store(false, Ordering::SeqCst);
        slot.started_ms.store(self.now_ms(), Ordering::SeqCst);
        let started = Instant::now();
        let out = f();
        let took = started.elapsed();
        slot.started_ms.store(0, Ordering::SeqCst);
        tally.add(
            "max_call_ms",
            u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        );
        if took > self.args.hung {
            tally.add("hung", 1);
            eprintln!(
                "[{} process {}] HUNG CALL: {} took {} ms (limit {} ms)",
                self.args.backend.name(),
                self.args.index,
                what(),
                took.as_millis(),
                self.args.hung.as_millis()
            );
        }
        out
    }
}

/// The `Instant` of a Unix time in ms (now, if that is in the future).
fn origin(origin_ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let now = Instant::now();
    now.checked_sub(Duration::from_millis(now_ms.saturating_sub(origin_ms)))
        .unwrap_or(now)
}

/// Counts unexpected panics and keeps the injected ones quiet.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<&str>() == Some(&INJECTED) {
            return;
        }
        UNEXPECTED_PANICS.fetch_add(1, Ordering::SeqCst);
        eprintln!("UNEXPECTED PANIC (process {}):", std::process::id());
        default(info);
    }));
}

/// Runs the child; never returns (exits, so that a thread stuck in a call
/// cannot keep the process alive).
pub(crate) fn run(args: ChildArgs) -> ! {
    install_panic_hook();
    let cache = match ICache::from_url(&args.url) {
        Ok(cache) => cache,
        Err(e) => {
            eprintln!("child {}: cannot open {}: {e}", args.index, args.url);
            std::process::exit(2);
        }
    };
    let lag = cache.max_lag();
    let shared = Arc::new(Shared {
        pages: pages(args.items),
        args: args.clone(),
        cache,
        stop: AtomicBool::new(false),
        t0: origin(args.origin_ms),
        tally: Mutex::new(Tally::default()),
        printed: AtomicU64::new(0),
        stale_by_second: Mutex::new(BTreeMap::new()),
        lag,
        history: Mutex::new(VecDeque::new()),
    });
    if !shared.lag.is_zero() {
        snapshot_completed(&shared, &args);
    }

    // Stop when the orchestrator says so, when it is gone (this process was
    // handed to another parent), or long after it should have: a child never
    // outlives its run by much.
    let stop_file = args.dir.join("stop");
    let hard_deadline =
        Instant::now() + Duration::from_secs_f64(args.seconds) + Duration::from_secs(120);
    {
        let shared = Arc::clone(&shared);
        thread::spawn(move || {
            let parent = std::os::unix::process::parent_id();
            while !stop_file.exists()
                && Instant::now() < hard_deadline
                && std::os::unix::process::parent_id() == parent
            {
                thread::sleep(Duration::from_millis(20));
            }
            shared.stop.store(true, Ordering::SeqCst);
        });
    }

    let mut slots: Vec<(String, Arc<CallSlot>)> = Vec::new();
    let mut workers: Vec<(String, JoinHandle<()>)> = Vec::new();
    let db_path = args.dir.join("db");
    let writers = if args.db_url.is_some() {
        0
    } else {
        args.writers
    };
    for (role, count) in [("writer", writers), ("reader", args.readers)] {
        for t in 0..count {
            let name = format!("{role}-{}-{t}", args.index);
            let slot = Arc::new(CallSlot::default());
            slots.push((name.clone(), Arc::clone(&slot)));
            let shared = Arc::clone(&shared);
            let db = match Db::open(&db_path, args.items) {
                Ok(db) => db,
                Err(e) => {
                    eprintln!(
                        "child {}: cannot open {}: {e}",
                        args.index,
                        db_path.display()
                    );
                    std::process::exit(2);
                }
            };
            let rng = Rng::derive(args.seed, role, args.index * 1000 + t as u64);
            let source = match &args.db_url {
                Some(url) => match crate::dbmode::connect(url) {
                    Ok(client) => Some(RefCell::new(client)),
                    Err(e) => {
                        eprintln!("child {}: {e}", args.index);
                        std::process::exit(2);
                    }
                },
                None => None,
            };
            let handle = thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let mut tally = Tally::default();
                    if role == "writer" {
                        writer(&shared, &db, rng, &slot, &mut tally);
                    } else {
                        reader(&shared, &db, source.as_ref(), rng, &slot, &mut tally);
                    }
                    shared
                        .tally
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .merge(&tally);
                })
                .expect("spawn a worker thread");
            workers.push((name, handle));
        }
    }
    if args.in_process_faults {
        let shared = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name(String::from("faults"))
            .spawn(move || {
                let mut tokens: Vec<String> = (0..shared.args.items).map(item_token).collect();
                tokens.extend((0..shared.pages.len()).map(page_token));
                let mut injector = MemoryInjector {
                    cache: shared.cache.clone(),
                    tokens,
                    filler_serial: 0,
                };
                let mut tally = Tally::default();
                let kinds = match faults::select(shared.args.backend, shared.args.faults.as_deref())
                {
                    Ok(kinds) => kinds,
                    Err(e) => {
                        eprintln!("{e}");
                        tally.add("harness_errors", 1);
                        Vec::new()
                    }
                };
                faults::run_schedule(
                    shared.args.backend,
                    &kinds,
                    shared.args.seed,
                    Duration::from_secs_f64(shared.args.seconds),
                    shared.t0,
                    &mut injector,
                    &mut tally,
                );
                shared
                    .tally
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .merge(&tally);
            })
            .expect("spawn the fault thread");
        workers.push((String::from("faults"), handle));
    }
    if let Err(e) = std::fs::write(args.dir.join(format!("ready-{}", args.index)), b"") {
        eprintln!("child {}: cannot write its ready file: {e}", args.index);
        std::process::exit(2);
    }

    // Watchdog: say so at once when a call runs past the limit (it is
    // counted when it returns, or at the end if it never does).
    while !shared.stopping() {
        thread::sleep(Duration::from_millis(100));
        let now = shared.now_ms();
        for (name, slot) in &slots {
            let started = slot.started_ms.load(Ordering::SeqCst);
            if started != 0
                && now.saturating_sub(started) > args.hung.as_millis() as u64
                && !slot.warned.swap(true, Ordering::SeqCst)
            {
                eprintln!(
                    "[{} process {}] {name}: a call has been running for over {} ms",
                    args.backend.name(),
                    args.index,
                    args.hung.as_millis()
                );
            }
        }
    }

    // Let every thread finish its call; one that does not is stuck.
    let deadline = Instant::now() + args.hung + Duration::from_secs(10);
    while Instant::now() < deadline && !workers.iter().all(|(_, h)| h.is_finished()) {
        thread::sleep(Duration::from_millis(20));
    }
    let mut stuck = Vec::new();
    for (name, handle) in workers {
        if handle.is_finished() {
            if let Err(panic) = handle.join() {
                // Already counted by the hook; a worker catches its own.
                eprintln!("{name} died: {}", panic_message(&*panic));
                shared
                    .tally
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .add("dead_threads", 1);
            }
        } else {
            stuck.push(name);
        }
    }
    let mut tally = shared
        .tally
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if !stuck.is_empty() {
        eprintln!(
            "[{} process {}] STUCK (deadlocked or hung) threads: {}",
            args.backend.name(),
            args.index,
            stuck.join(", ")
        );
        tally.add("stuck_threads", stuck.len() as u64);
        let in_call = slots
            .iter()
            .filter(|(name, slot)| {
                stuck.contains(name) && slot.started_ms.load(Ordering::SeqCst) != 0
            })
            .count();
        tally.add("hung", in_call as u64);
    }
    tally.add(
        "unexpected_panics",
        UNEXPECTED_PANICS.load(Ordering::SeqCst),
    );
    let by_second = shared
        .stale_by_second
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if !by_second.is_empty() {
        let seconds: Vec<String> = by_second
            .iter()
            .map(|(s, n)| format!("{s}s: {n}"))
            .collect();
        eprintln!(
            "[{} process {}] stale reads by second since the start: {}",
            args.backend.name(),
            args.index,
            seconds.join(", ")
        );
    }
    let s = shared.cache.stats();
    for (k, v) in [
        ("hits", s.hits),
        ("misses", s.misses),
        ("mismatches", s.mismatches),
        ("errors", s.errors),
        ("stores", s.stores),
        ("outdated", s.outdated),
        ("shared_renders", s.shared_renders),
        ("near_hits", s.near_hits),
        ("tracked_hits", s.tracked_hits),
        ("body_fetches", s.body_fetches),
        ("evictions", s.evictions),
    ] {
        tally.add(&format!("stats.{k}"), v);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "REPORT {}", tally.to_line());
    let _ = out.flush();
    std::process::exit(0);
}

/// Under a lag, keeps snapshots of every item's `completed` (see
/// [`Shared::history`]), from a thread of its own.
fn snapshot_completed(shared: &Arc<Shared>, args: &ChildArgs) {
    let db = match Db::open(&args.dir.join("db"), args.items) {
        Ok(db) => db,
        Err(e) => {
            eprintln!("child {}: cannot open the db: {e}", args.index);
            std::process::exit(2);
        }
    };
    let all: Vec<usize> = (0..args.items).collect();
    let keep = usize::try_from(shared.lag.as_millis() / 2).unwrap_or(usize::MAX) + 500;
    let shared = Arc::clone(shared);
    thread::spawn(move || {
        while !shared.stopping() {
            let taken = Instant::now();
            if let Ok(completed) = db.completed(&all) {
                let mut h = shared
                    .history
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                h.push_back((taken, completed));
                while h.len() > keep {
                    h.pop_front();
                }
            }
            thread::sleep(Duration::from_millis(2));
        }
    });
}

/// The floors of a read beginning now: what had completed before it began,
/// or under a lag, what had completed `lag` before it began.
fn floors(shared: &Shared, db: &Db, items: &[usize]) -> std::io::Result<Vec<u64>> {
    if shared.lag.is_zero() {
        return db.completed(items);
    }
    let Some(before) = Instant::now().checked_sub(shared.lag) else {
        return Ok(vec![0; items.len()]);
    };
    let h = shared
        .history
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    Ok(match h.iter().rev().find(|(t, _)| *t <= before) {
        Some((_, completed)) => items
            .iter()
            .map(|&i| completed.get(i).copied().unwrap_or(0))
            .collect(),
        None => vec![0; items.len()],
    })
}

/// Commit, bump, and record the bump as completed only if it returned `Ok`.
fn writer(shared: &Shared, db: &Db, mut rng: Rng, slot: &CallSlot, tally: &mut Tally) {
    let items = shared.args.items;
    while !shared.stopping() {
        let i = rng.below(items);
        let v = match db.commit(i) {
            Ok(v) => v,
            Err(e) => {
                tally.add("harness_errors", 1);
                eprintln!("db commit failed: {e}");
                return;
            }
        };
        tally.add("writes", 1);
        let token = item_token(i);
        // Sometimes a page token too, through `incr_many`.
        let page = (rng.chance(250))
            .then(|| shared.pages.iter().position(|p| p.contains(&i)))
            .flatten()
            .map(page_token);
        let outcome = shared.timed(
            slot,
            || format!("bump of {token}"),
            || {
                catch_unwind(AssertUnwindSafe(|| match &page {
                    Some(page) => shared.cache.incr_many(&[&token, page]).map(drop),
                    None => shared.cache.incr(&token).map(drop),
                }))
            },
            tally,
        );
        match outcome {
            Ok(Ok(())) => {
                tally.add("bumps_ok", 1);
                if let Err(e) = db.complete(i, v) {
                    tally.add("harness_errors", 1);
                    eprintln!("db complete failed: {e}");
                    return;
                }
            }
            Ok(Err(e)) => {
                tally.add("failed_bumps", 1);
                let kind = if e.is_circuit_open() {
                    "circuit_open"
                } else if e.is_timeout() {
                    "timeout"
                } else if e.is_unavailable() {
                    "unavailable"
                } else {
                    "other"
                };
                tally.add(&format!("failed_bumps.{kind}"), 1);
            }
            // Counted by the hook; the bump is not known to be done.
            Err(_) => tally.add("failed_bumps", 1),
        }
        thread::sleep(rng.millis(2, 20));
    }
}

/// What one reader's read asked for.
struct Read {
    /// `Some(p)`: page `p` (an outer block with an item block per item);
    /// `None`: one item block alone.
    page: Option<usize>,
    items: Vec<usize>,
}

/// Reads a page (nested blocks) or an item, and checks what it shows
/// against the bumps that had completed before it began. Renders read the
/// file database's `data[]`, or with `source` (`--writers db`) the rows of
/// PostgreSQL; the floors are `completed[]` either way (written by the
/// relays' hook in the database mode).
fn reader(
    shared: &Shared,
    db: &Db,
    source: Option<&RefCell<postgres::Client>>,
    mut rng: Rng,
    slot: &CallSlot,
    tally: &mut Tally,
) {
    while !shared.stopping() {
        let read = if rng.chance(800) {
            let p = rng.below(shared.pages.len());
            Read {
                page: Some(p),
                items: shared.pages[p].clone(),
            }
        } else {
            Read {
                page: None,
                items: vec![rng.below(shared.args.items)],
            }
        };
        // Before the read begins: the floor every item must reach.
        let floors = match floors(shared, db, &read.items) {
            Ok(f) => f,
            Err(e) => {
                tally.add("harness_errors", 1);
                eprintln!("db read failed: {e}");
                return;
            }
        };
        let slow_at = rng.chance(30).then(|| rng.pick(&read.items));
        let slow_for = rng.millis(20, 80);
        let panic_at = rng.chance(5).then(|| rng.pick(&read.items));
        let slowed = Cell::new(0u64);
        let panicked = Cell::new(0u64);
        let outer_ran = Cell::new(false);
        let render_item = |i: usize| -> Result<String, String> {
            if slow_at == Some(i) {
                slowed.set(slowed.get() + 1);
                thread::sleep(slow_for);
            }
            if panic_at == Some(i) {
                panicked.set(panicked.get() + 1);
                std::panic::panic_any(INJECTED);
            }
            let v = match source {
                Some(client) => crate::dbmode::read_value(&mut client.borrow_mut(), i)?,
                None => db.data(i).map_err(|e| format!("db read failed: {e}"))?,
            };
            Ok(format!("{i}={v};"))
        };
        let cache = &shared.cache;
        let outcome = shared.timed(
            slot,
            || match read.page {
                Some(p) => format!("read of page {p} {:?}", read.items),
                None => format!("read of item {}", read.items[0]),
            },
            || {
                catch_unwind(AssertUnwindSafe(|| match read.page {
                    Some(p) => cache.fragment("page", &[&page_token(p)], || {
                        outer_ran.set(true);
                        let mut out = String::new();
                        for &i in &read.items {
                            out.push_str(
                                &cache.fragment("item", &[&item_token(i)], || render_item(i))?,
                            );
                        }
                        Ok(out)
                    }),
                    None => {
                        let i = read.items[0];
                        cache.fragment("item", &[&item_token(i)], || {
                            outer_ran.set(true);
                            render_item(i)
                        })
                    }
                }))
            },
            tally,
        );
        tally.add("fault.slow_render", slowed.get());
        tally.add("fault.render_panic", panicked.get());
        let kind = if read.page.is_some() { "page" } else { "item" };
        match outcome {
            Ok(Ok(out)) => {
                tally.add("reads", 1);
                tally.add(&format!("reads.{kind}"), 1);
                if !outer_ran.get() {
                    tally.add(&format!("hits.{kind}"), 1);
                }
                check(shared, &read, &floors, &out, tally);
            }
            Ok(Err(e)) => {
                tally.add("harness_errors", 1);
                eprintln!("render failed: {e}");
                return;
            }
            Err(panic) => {
                if panic.downcast_ref::<&str>() == Some(&INJECTED) {
                    tally.add("injected_panics_caught", 1);
                }
                // Any other panic was counted by the hook.
            }
        }
        thread::sleep(rng.millis(0, 3));
    }
}

/// Counts a stale read if an item shows a value below its floor, a
/// malformed one if the output is not what the blocks render.
fn check(shared: &Shared, read: &Read, floors: &[u64], out: &str, tally: &mut Tally) {
    let parsed: Option<Vec<(usize, u64)>> = out
        .split_terminator(';')
        .map(|pair| {
            let (i, v) = pair.split_once('=')?;
            Some((i.parse().ok()?, v.parse().ok()?))
        })
        .collect();
    let what = match read.page {
        Some(p) => format!("page {p}"),
        None => format!("item {}", read.items[0]),
    };
    let Some(parsed) = parsed.filter(|p| p.iter().map(|(i, _)| *i).eq(read.items.iter().copied()))
    else {
        tally.add("malformed", 1);
        shared.finding(&format!(
            "MALFORMED READ of {what}: {out:?} (items {:?})",
            read.items
        ));
        return;
    };
    let stale: Vec<String> = parsed
        .iter()
        .zip(floors)
        .filter(|((_, v), floor)| v < floor)
        .map(|((i, v), floor)| format!("item {i} shows {v}, but the bump after commit {floor} had completed {} before the read began", if shared.lag.is_zero() { String::new() } else { format!("{:?}", shared.lag) }))
        .collect();
    if !stale.is_empty() {
        tally.add("stale", 1);
        *shared
            .stale_by_second
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(shared.t0.elapsed().as_secs())
            .or_insert(0) += 1;
        shared.finding(&format!(
            "STALE READ at +{:.3}s of {what}: {}; output {out:?}",
            shared.t0.elapsed().as_secs_f64(),
            stale.join("; ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::pages;

    #[test]
    fn pages_overlap_and_have_distinct_items() {
        let all = pages(16);
        assert_eq!(all.len(), 8);
        for page in &all {
            let mut sorted = page.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), page.len(), "{page:?}");
            assert!(page.iter().all(|&i| i < 16));
        }
        assert!(pages(1).iter().all(|p| p == &vec![0]));
    }
}
