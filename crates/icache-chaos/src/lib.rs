//! The chaos run behind the `icache-chaos` binary (see its docs for how to
//! run it). The orchestrator starts the servers and proxies, spawns child
//! processes (this same binary with `--child`) that write and read through
//! icache and check every read, and injects a fault schedule drawn from a
//! seed. [`main_with_args`] is the whole command line; [`Tally`] parses the
//! `RESULT` lines it prints.

mod child;
mod db;
mod dbmode;
mod faults;
mod rng;
mod tally;
mod topology;

use std::io::Read as _;
use std::panic::catch_unwind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use faults::Backend;
pub use tally::Tally;

use crate::child::ChildArgs;
use crate::db::Db;
use crate::faults::{Fault, RENDER_FAULTS, panic_message};
use crate::topology::Topology;

/// What an orchestrator run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// The backends to run, one after another.
    pub backends: Vec<Backend>,
    /// How long the fault schedule runs on each backend.
    pub seconds: f64,
    /// Where every random choice comes from.
    pub seed: u64,
    /// Child processes per network backend (memory: one process, threads only).
    pub processes: usize,
    /// Writer threads per process.
    pub writers: usize,
    /// Reader threads per process.
    pub readers: usize,
    /// Items in the database (each a token, `item:N`).
    pub items: usize,
    /// icache's `timeout_ms` and `connect_timeout_ms`.
    pub timeout_ms: u64,
    /// A call (bump or read, render included) longer than this is hung.
    pub hung_ms: u64,
    /// Calm after the schedule, faults healed, reads still checked.
    pub tail_seconds: f64,
    /// Only these fault kinds (by report name), to investigate one.
    pub faults: Option<Vec<String>>,
    /// Extra URL options for the clients (`failover=off`, …).
    pub url_options: String,
    /// `--writers db`: writer processes commit to a real PostgreSQL whose
    /// triggers fill the outbox, and relay processes bump (see `dbmode`).
    pub db_writers: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backends: Backend::ALL.to_vec(),
            seconds: 30.0,
            seed: 0,
            processes: 3,
            writers: 2,
            readers: 3,
            items: 16,
            timeout_ms: 100,
            hung_ms: 3000,
            tail_seconds: 2.0,
            faults: None,
            url_options: String::new(),
            db_writers: false,
        }
    }
}

const USAGE: &str = "\
usage: icache-chaos [--backend all|memory,redis,memcached,redis-cluster,memcached-pool]
                    [--seconds N] [--seed N] [--processes N] [--writers N] [--readers N]
                    [--items N] [--timeout-ms N] [--hung-ms N] [--tail-seconds N]
                    [--faults KIND,...] [--url-options K=V&...] [--writers db]

Fault kinds: proxy_refuse, proxy_hang, proxy_freeze, node_leave_return,
kill9_restart_empty, kill9_restart_old_snapshot, client_pause, evict_keys,
flush_all, memory_filler (each backend draws from those that apply to it);
with --writers db also kill9_writer, kill9_relay.

--writers db: the bumps come from the database. A real PostgreSQL holds the
items, icache::db's triggers write every commit's tokens to the outbox,
writer processes only commit UPDATEs, three relay processes bump, and the
schedule also SIGKILLs writers and relays (restarting them). Reads are
checked against what the relays had applied; at the end the outbox must be
empty and every item's read must show its last commit. Network backends only.

Runs a seeded fault schedule on each backend while several processes write,
bump and read through icache, and checks every read for staleness. Exits 0
only if every backend had reads, hits and injected faults, and no stale read,
hung call, unexpected panic or stuck thread. A failing run prints the command
that replays its schedule (--seed).";

fn value<T: std::str::FromStr>(args: &[String], i: usize) -> Result<T, String> {
    let flag = &args[i];
    let v = args
        .get(i + 1)
        .ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse()
        .map_err(|_| format!("{flag} {v:?}: not a valid value"))
}

enum Mode {
    Help,
    Orchestrate(Options),
    Child(ChildArgs),
    DbProc(dbmode::ProcArgs),
}

fn parse(args: &[String]) -> Result<Mode, String> {
    let mut o = Options::default();
    let mut seed = None;
    let mut child = false;
    let (mut url, mut dir, mut index, mut in_process, mut origin_ms) =
        (None, None, 0u64, false, 0u64);
    let (mut db_url, mut db_role, mut generation) = (None, None, 0u64);
    let mut backends_named = false;
    let mut i = 0;
    while i < args.len() {
        let mut takes_value = true;
        match args[i].as_str() {
            "-h" | "--help" => return Ok(Mode::Help),
            "--backend" => {
                let list: String = value(args, i)?;
                backends_named = list != "all";
                o.backends = if list == "all" {
                    Backend::ALL.to_vec()
                } else {
                    list.split(',')
                        .map(|b| Backend::parse(b).ok_or_else(|| format!("unknown backend {b:?}")))
                        .collect::<Result<_, _>>()?
                };
            }
            "--seconds" => o.seconds = value(args, i)?,
            "--seed" => seed = Some(value(args, i)?),
            "--processes" => o.processes = value(args, i)?,
            "--writers" if args.get(i + 1).is_some_and(|v| v == "db") => o.db_writers = true,
            "--writers=db" => {
                o.db_writers = true;
                takes_value = false;
            }
            "--writers" => o.writers = value(args, i)?,
            "--readers" => o.readers = value(args, i)?,
            "--items" => o.items = value(args, i)?,
            "--timeout-ms" => o.timeout_ms = value(args, i)?,
            "--url-options" => o.url_options = value(args, i)?,
            "--hung-ms" => o.hung_ms = value(args, i)?,
            "--tail-seconds" => o.tail_seconds = value(args, i)?,
            "--faults" => {
                let list: String = value(args, i)?;
                let names: Vec<String> = list.split(',').map(str::to_owned).collect();
                if let Some(bad) = names
                    .iter()
                    .find(|n| !faults::Fault::ALL.iter().any(|f| f.name() == *n))
                {
                    return Err(format!("unknown fault kind {bad:?}"));
                }
                o.faults = Some(names);
            }
            // Child mode, for the orchestrator only.
            "--child" => {
                child = true;
                takes_value = false;
            }
            "--url" => url = Some(value::<String>(args, i)?),
            "--dir" => dir = Some(PathBuf::from(value::<String>(args, i)?)),
            "--index" => index = value(args, i)?,
            "--origin-ms" => origin_ms = value(args, i)?,
            "--db-url" => db_url = Some(value::<String>(args, i)?),
            "--generation" => generation = value(args, i)?,
            "--db-role" => {
                let name: String = value(args, i)?;
                db_role = Some(
                    dbmode::Role::parse(&name)
                        .ok_or_else(|| format!("unknown --db-role {name:?}"))?,
                );
            }
            "--in-process-faults" => {
                in_process = true;
                takes_value = false;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
        i += if takes_value { 2 } else { 1 };
    }
    if !(o.seconds.is_finite()
        && o.seconds > 0.0
        && o.tail_seconds.is_finite()
        && o.tail_seconds >= 0.0)
    {
        return Err(String::from(
            "--seconds must be > 0 and --tail-seconds >= 0",
        ));
    }
    if o.processes == 0 || o.readers == 0 || o.writers == 0 || o.items == 0 || o.backends.is_empty()
    {
        return Err(String::from(
            "--processes, --writers, --readers, --items and --backend must not be 0 or empty",
        ));
    }
    // Relays run in processes of their own, which an in-process cache
    // cannot be shared with: `all` means every network backend here.
    if o.db_writers && db_role.is_none() && !child {
        if backends_named && o.backends.contains(&Backend::Memory) {
            return Err(String::from(
                "--writers db needs network backends (memory is per process)",
            ));
        }
        o.backends.retain(|b| *b != Backend::Memory);
    }
    o.seed = seed.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // Short seeds are easier to pass around.
        (nanos ^ u64::from(std::process::id()).rotate_left(32)) % 1_000_000_000
    });
    if let Some(role) = db_role {
        let (Some(url), Some(dir), Some(db_url)) = (url, dir, db_url) else {
            return Err(String::from("--db-role needs --url, --dir and --db-url"));
        };
        return Ok(Mode::DbProc(dbmode::ProcArgs {
            role,
            url,
            db_url,
            dir,
            index,
            generation,
            seed: o.seed,
            threads: o.writers,
            items: o.items,
        }));
    }
    if !child {
        return Ok(Mode::Orchestrate(o));
    }
    let (Some(url), Some(dir), [backend]) = (url, dir, o.backends.as_slice()) else {
        return Err(String::from("--child needs --url, --dir and one --backend"));
    };
    Ok(Mode::Child(ChildArgs {
        backend: *backend,
        url,
        dir,
        index,
        seed: o.seed,
        writers: o.writers,
        readers: o.readers,
        items: o.items,
        hung: Duration::from_millis(o.hung_ms),
        seconds: o.seconds,
        in_process_faults: in_process,
        faults: o.faults.clone(),
        origin_ms,
        db_url,
    }))
}

/// Runs the command line `args` (without the program name); returns the
/// process exit code: 0 all checks passed, 1 a check failed, 2 bad usage.
pub fn main_with_args(args: &[String]) -> i32 {
    match parse(args) {
        Ok(Mode::Help) => {
            println!("{USAGE}");
            0
        }
        Ok(Mode::Child(args)) => child::run(args),
        Ok(Mode::DbProc(args)) => match args.role {
            dbmode::Role::Writer => dbmode::writer_main(args),
            dbmode::Role::Relay => dbmode::relay_main(args),
        },
        Ok(Mode::Orchestrate(options)) => {
            if run(&options) {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("icache-chaos: {e}\n\n{USAGE}");
            2
        }
    }
}

/// The command line that replays `backend` of this run.
fn replay_command(o: &Options, backend: Backend) -> String {
    let d = Options::default();
    let mut cmd = format!(
        "cargo run --release -p icache-chaos -- --backend {} --seconds {} --seed {}",
        backend.name(),
        o.seconds,
        o.seed
    );
    for (flag, v, default) in [
        ("--processes", o.processes, d.processes),
        ("--writers", o.writers, d.writers),
        ("--readers", o.readers, d.readers),
        ("--items", o.items, d.items),
        ("--timeout-ms", o.timeout_ms as usize, d.timeout_ms as usize),
        ("--hung-ms", o.hung_ms as usize, d.hung_ms as usize),
    ] {
        if v != default {
            cmd.push_str(&format!(" {flag} {v}"));
        }
    }
    if o.db_writers {
        cmd.push_str(" --writers db");
    }
    if let Some(faults) = &o.faults {
        cmd.push_str(&format!(" --faults {}", faults.join(",")));
    }
    if !o.url_options.is_empty() {
        cmd.push_str(&format!(" --url-options '{}'", o.url_options));
    }
    if o.tail_seconds != d.tail_seconds {
        cmd.push_str(&format!(" --tail-seconds {}", o.tail_seconds));
    }
    cmd
}

/// Runs every backend of `o`, prints a summary of each; `true` if all passed.
pub fn run(o: &Options) -> bool {
    eprintln!(
        "icache-chaos: seed {}, {} s of faults per backend, backends {}",
        o.seed,
        o.seconds,
        o.backends
            .iter()
            .map(|b| b.name())
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut all_passed = true;
    let mut failed = Vec::new();
    for &backend in &o.backends {
        let (tally, failures) = run_backend(o, backend);
        print_summary(o, backend, &tally, &failures);
        if !failures.is_empty() {
            all_passed = false;
            failed.push(backend);
        }
    }
    if all_passed {
        println!("icache-chaos: PASS (seed {})", o.seed);
    } else {
        println!("icache-chaos: FAIL (seed {})", o.seed);
        for backend in failed {
            println!(
                "  replay {}: {}",
                backend.name(),
                replay_command(o, backend)
            );
        }
    }
    all_passed
}

/// Everything the checks require, as failure messages (empty: passed).
fn verdict(t: &Tally) -> Vec<String> {
    let mut failures = Vec::new();
    for (key, what) in [
        ("stale", "stale reads"),
        ("malformed", "malformed reads"),
        ("hung", "hung calls"),
        ("unexpected_panics", "unexpected panics"),
        ("stuck_threads", "stuck threads (deadlock?)"),
        ("final_stale", "final reads not showing the last commit"),
        ("outbox_left", "outbox rows never applied"),
        ("dead_threads", "worker threads that died"),
        ("stuck_processes", "child processes that never finished"),
        ("child_failures", "child processes that failed"),
        ("harness_errors", "harness errors"),
    ] {
        if t.get(key) > 0 {
            failures.push(format!("{what}: {} (must be 0)", t.get(key)));
        }
    }
    // Every injected panic fires on the reader's own thread, inside its
    // `catch_unwind`: one that never arrived was swallowed somewhere.
    let (fired, caught) = (t.get("fault.render_panic"), t.get("injected_panics_caught"));
    if fired != caught {
        failures.push(format!(
            "injected render panics: {fired} fired but {caught} reached the caller"
        ));
    }
    // A run that checked nothing proves nothing.
    if t.get("reads") == 0 {
        failures.push(String::from("no read was checked"));
    }
    if t.get("bumps_ok") == 0 {
        failures.push(String::from("no bump completed"));
    }
    if t.get("hits.page") + t.get("hits.item") == 0 {
        failures.push(String::from("no read was a cache hit"));
    }
    if t.get("db.mode") == 1 && t.get("final_reads") == 0 {
        failures.push(String::from("no final read was checked"));
    }
    if backend_faults(t) == 0 {
        failures.push(String::from("no backend fault was injected"));
    }
    failures
}

fn backend_faults(t: &Tally) -> u64 {
    t.with_prefix("fault.")
        .filter(|(k, _)| !RENDER_FAULTS.contains(k))
        .map(|(_, v)| v)
        .sum()
}

fn print_summary(o: &Options, backend: Backend, t: &Tally, failures: &[String]) {
    let status = if failures.is_empty() { "PASS" } else { "FAIL" };
    let (processes, writers, readers) = shape(o, backend);
    println!(
        "== {} {status}: seed {}, {:.1} s ({} s of faults + {} s calm), {processes} process(es) x ({writers} writers + {readers} readers), timeout_ms {}, call limit {} ms ==",
        backend.name(),
        o.seed,
        t.get("elapsed_ms") as f64 / 1000.0,
        o.seconds,
        o.tail_seconds,
        o.timeout_ms,
        o.hung_ms
    );
    println!(
        "  reads   {} checked ({} pages of nested blocks, {} items alone); hits: {} pages, {} items; icache stats: {} hits, {} misses, {} errors, {} stores, {} outdated",
        t.get("reads"),
        t.get("reads.page"),
        t.get("reads.item"),
        t.get("hits.page"),
        t.get("hits.item"),
        t.get("stats.hits"),
        t.get("stats.misses"),
        t.get("stats.errors"),
        t.get("stats.stores"),
        t.get("stats.outdated")
    );
    let failed_kinds: Vec<String> = t
        .with_prefix("failed_bumps.")
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "  writes  {} commits, {} bumps completed, {} failed ({})",
        t.get("writes"),
        t.get("bumps_ok"),
        t.get("failed_bumps"),
        failed_kinds.join(", ")
    );
    let kinds: Vec<String> = t
        .with_prefix("fault.")
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "  faults  {} on the backend + {} in renders: {}; evictions: {} by the servers, {} by icache's memory backend",
        backend_faults(t),
        RENDER_FAULTS
            .iter()
            .map(|k| t.get(&format!("fault.{k}")))
            .sum::<u64>(),
        kinds.join(", "),
        t.get("server.evictions"),
        t.get("stats.evictions")
    );
    println!(
        "  checks  stale reads {}, malformed {}, hung calls {} (longest call {} ms), unexpected panics {}, injected panics caught {}, stuck threads {}, child failures {}, harness errors {}",
        t.get("stale"),
        t.get("malformed"),
        t.get("hung"),
        t.get("max_call_ms"),
        t.get("unexpected_panics"),
        t.get("injected_panics_caught"),
        t.get("stuck_threads"),
        t.get("child_failures") + t.get("stuck_processes"),
        t.get("harness_errors")
    );
    if t.get("db.mode") == 1 {
        println!(
            "  db      {} commits in PostgreSQL ({} rollbacks by writers that finished), writers killed {}, relays killed {}; relays: {} batches, {} item bumps, {} oracle records, {} errors (of relays not killed); drain {} ms, outbox left {}; final reads {} ({} stale, oracle behind on {})",
            t.get("writes"),
            t.get("db.rollbacks"),
            t.get("fault.kill9_writer"),
            t.get("fault.kill9_relay"),
            t.get("relay.batches"),
            t.get("bumps_ok"),
            t.get("relay.applied_records"),
            t.get("relay.errors"),
            t.get("drain_ms"),
            t.get("outbox_left"),
            t.get("final_reads"),
            t.get("final_stale"),
            t.get("final_oracle_behind")
        );
    }
    for f in failures {
        println!("  FAILED: {f}");
    }
    if !failures.is_empty() {
        println!("  replay: {}", replay_command(o, backend));
    }
    // One machine-readable line (tests parse it with `Tally::parse`).
    println!(
        "RESULT backend={} passed={} seed={} {}",
        backend.name(),
        u8::from(failures.is_empty()),
        o.seed,
        t.to_line()
    );
}

/// Processes, writers and readers per process: the memory backend lives in
/// one process, so it gets all the threads in one.
fn shape(o: &Options, backend: Backend) -> (usize, usize, usize) {
    if backend == Backend::Memory {
        (1, o.writers * o.processes, o.readers * o.processes)
    } else {
        (o.processes, o.writers, o.readers)
    }
}

/// Runs one backend: servers, children, schedule, calm, collection.
fn run_backend(o: &Options, backend: Backend) -> (Tally, Vec<String>) {
    let started = Instant::now();
    let mut tally = Tally::default();
    let fail = |mut tally: Tally, msg: String| {
        eprintln!("[{}] HARNESS ERROR: {msg}", backend.name());
        tally.add("harness_errors", 1);
        let failures = verdict(&tally);
        (tally, failures)
    };
    if o.db_writers && backend == Backend::Memory {
        return fail(
            tally,
            String::from(
                "--writers db needs a network backend: relays run in processes of their own",
            ),
        );
    }
    let mut topology = match catch_unwind(|| Topology::start(backend)) {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return fail(tally, format!("cannot start the servers: {e}")),
        Err(p) => {
            return fail(
                tally,
                format!("cannot start the servers: {}", panic_message(&*p)),
            );
        }
    };
    let mut url = topology.url(o.timeout_ms);
    if !o.url_options.is_empty() {
        url.push('&');
        url.push_str(&o.url_options);
    }
    // A pool shared by several processes keeps the promise with keys that
    // never move (see RELIABILITY.md); `--url-options failover=move` runs
    // the default, whose cross-process limit this run finds.
    if backend == Backend::MemcachedPool && !o.url_options.contains("failover=") {
        url.push_str("&failover=off");
    }
    // The clock of the fault log and of the children's findings.
    let origin = Instant::now();
    let origin_ms = unix_ms();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "icache-chaos-{}-{}-{nanos}",
        std::process::id(),
        backend.name()
    ));
    if let Err(e) =
        std::fs::create_dir_all(&dir).and_then(|()| Db::create(&dir.join("db"), o.items))
    {
        return fail(tally, format!("cannot create {}: {e}", dir.display()));
    }
    let pg = if o.db_writers {
        match catch_unwind(|| dbmode::Pg::start(o.items)) {
            Ok(Ok(pg)) => Some(pg),
            Ok(Err(e)) => return fail(tally, format!("cannot start PostgreSQL: {e}")),
            Err(p) => {
                return fail(
                    tally,
                    format!("cannot start PostgreSQL: {}", panic_message(&*p)),
                );
            }
        }
    } else {
        None
    };
    let db_url = pg.as_ref().map(|pg| pg.url.as_str());
    let (processes, writers, readers) = shape(o, backend);
    eprintln!(
        "[{}] {url}: {processes} process(es) x ({writers} writers + {readers} readers), seed {}",
        backend.name(),
        o.seed
    );
    let mut children = Vec::new();
    for index in 0..processes {
        match spawn_child(
            o,
            backend,
            (&url, db_url),
            &dir,
            index,
            (writers, readers),
            origin_ms,
        ) {
            Ok(child) => children.push(child),
            Err(e) => {
                tally.add("child_failures", 1);
                eprintln!("[{}] cannot spawn child {index}: {e}", backend.name());
            }
        }
    }
    wait_ready(&dir, processes, &mut tally, backend);
    let mut procs = match db_url
        .map(|db_url| {
            dbmode::Procs::start(&url, db_url, &dir, o.seed, (processes, writers, o.items))
        })
        .transpose()
    {
        Ok(procs) => procs,
        Err(e) => {
            eprintln!("[{}] {e}", backend.name());
            tally.add("harness_errors", 1);
            None
        }
    };

    let schedule = Duration::from_secs_f64(o.seconds);
    if backend == Backend::Memory {
        // Its faults are injected inside the child, the only process that
        // can reach an in-process cache.
        thread::sleep(schedule);
    } else {
        // The database mode runs a second schedule beside the backend's:
        // SIGKILLs of writers and relays, so that they also land during
        // cache faults (a relay killed while it retries, a writer killed
        // while the cache is down).
        let all: Vec<Fault> = match &procs {
            Some(_) => [backend.faults(), &Fault::DB].concat(),
            None => backend.faults().to_vec(),
        };
        match faults::select_from(backend, &all, o.faults.as_deref()) {
            Ok(kinds) => {
                let (kills, backend_kinds): (Vec<Fault>, Vec<Fault>) =
                    kinds.into_iter().partition(|f| Fault::DB.contains(f));
                thread::scope(|s| {
                    let killer = procs.as_mut().filter(|_| !kills.is_empty()).map(|procs| {
                        let kills = &kills;
                        s.spawn(move || {
                            let mut t = Tally::default();
                            let seed = rng::Rng::derive(o.seed, "db-kills", 0).next_u64();
                            faults::run_schedule(
                                backend, kills, seed, schedule, origin, procs, &mut t,
                            );
                            t
                        })
                    });
                    if backend_kinds.is_empty() {
                        thread::sleep(schedule);
                    } else {
                        faults::run_schedule(
                            backend,
                            &backend_kinds,
                            o.seed,
                            schedule,
                            origin,
                            &mut topology,
                            &mut tally,
                        );
                    }
                    match killer.map(|k| k.join()) {
                        Some(Ok(t)) => tally.merge(&t),
                        Some(Err(_)) => tally.add("harness_errors", 1),
                        None => {}
                    }
                });
            }
            Err(e) => {
                eprintln!("[{}] {e}", backend.name());
                tally.add("harness_errors", 1);
            }
        }
    }
    // Calm: every fault healed, reads still checked.
    thread::sleep(Duration::from_secs_f64(o.tail_seconds));
    if let Err(e) = std::fs::write(dir.join("stop"), b"") {
        eprintln!("[{}] cannot write the stop file: {e}", backend.name());
        tally.add("harness_errors", 1);
    }
    let deadline = Instant::now() + Duration::from_millis(o.hung_ms) + Duration::from_secs(20);
    for (index, child) in children.into_iter().enumerate() {
        collect_child(backend, index, child, deadline, &mut tally);
    }
    if let (Some(pg), Some(procs)) = (&pg, procs) {
        let log = |msg: &str| eprintln!("[{} db] {msg}", backend.name());
        dbmode::finish(pg, procs, &url, &dir, &mut tally, &log);
    }
    drop(pg);
    tally.add("server.evictions", topology.server_evictions());
    drop(topology);
    let _ = std::fs::remove_dir_all(&dir);
    tally.add(
        "elapsed_ms",
        u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    );
    let failures = verdict(&tally);
    (tally, failures)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn spawn_child(
    o: &Options,
    backend: Backend,
    // The cache's, and with `--writers db` the database's.
    (url, db_url): (&str, Option<&str>),
    dir: &Path,
    index: usize,
    (writers, readers): (usize, usize),
    origin_ms: u64,
) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("--child")
        .args(["--backend", backend.name(), "--url", url])
        .arg("--dir")
        .arg(dir)
        .args(["--index", &index.to_string(), "--seed", &o.seed.to_string()])
        .args([
            "--writers",
            &writers.to_string(),
            "--readers",
            &readers.to_string(),
        ])
        .args([
            "--items",
            &o.items.to_string(),
            "--hung-ms",
            &o.hung_ms.to_string(),
        ])
        .args([
            "--seconds",
            &o.seconds.to_string(),
            "--origin-ms",
            &origin_ms.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if backend == Backend::Memory {
        cmd.arg("--in-process-faults");
    }
    if let Some(faults) = &o.faults {
        cmd.args(["--faults", &faults.join(",")]);
    }
    if let Some(db_url) = db_url {
        cmd.args(["--db-url", db_url]);
    }
    cmd.spawn()
}

/// Waits (up to 15 s) until every child has opened its cache and started.
fn wait_ready(dir: &Path, processes: usize, tally: &mut Tally, backend: Backend) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ready = (0..processes)
            .filter(|i| dir.join(format!("ready-{i}")).exists())
            .count();
        if ready == processes {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "[{}] only {ready} of {processes} children started in 15 s",
                backend.name()
            );
            tally.add("child_failures", (processes - ready) as u64);
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child until `deadline` (kills it after that), and adds its
/// `REPORT` line to `tally`.
fn collect_child(
    backend: Backend,
    index: usize,
    mut child: Child,
    deadline: Instant,
    tally: &mut Tally,
) {
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                eprintln!("[{}] child {index} did not finish: killed", backend.name());
                let _ = child.kill();
                let _ = child.wait();
                tally.add("stuck_processes", 1);
                return;
            }
            Err(e) => {
                eprintln!("[{}] child {index}: {e}", backend.name());
                break None;
            }
        }
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    let report = out.lines().find_map(|l| l.strip_prefix("REPORT "));
    match (status, report) {
        (Some(s), Some(report)) if s.success() => tally.merge(&Tally::parse(report)),
        (status, _) => {
            eprintln!(
                "[{}] child {index} failed ({status:?}) with output {out:?}",
                backend.name()
            );
            tally.add("child_failures", 1);
        }
    }
}
