//! `icache-bench`: measures icache side by side in one run and writes a
//! markdown report of ratios, with the absolute times beside them.
//!
//! ```sh
//! cargo run --release -p icache-bench -- --out bench/REPORT.md
//! cargo run --release -p icache-bench -- --quick --out /tmp/REPORT.md   # < 2 minutes
//! ```
//!
//! It starts its own `redis-server` and `memcached` on free loopback ports
//! (the test harness in `crates/icache/tests/support`), and measures:
//!
//! 1. a block hit per backend against rendering the same block uncached
//!    (the demo's personal-rating list);
//! 2. a hit against the bare minimum: the same lookups made directly on
//!    quick_cache, or one bare `GET` round trip on a raw connection;
//! 3. how a hit's cost grows with tokens, fragment size and client threads;
//! 4. the demo site under load, icache on and off;
//! 5. resident bytes per cached entry on the memory backend.
//!
//! Every comparison is measured within the same run, its cases in
//! alternating batches, so the ratios hold on a noisy machine where the
//! absolute times do not.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use icache_test_support as support;

mod load;
mod memory;
mod raw;
pub mod report;
mod sections;
mod sysinfo;
mod timing;

pub use memory::child as memory_child;
pub use sections::bump::child as bump_child;

/// What to run and where to write.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the report goes (parent directories are created).
    pub out: PathBuf,
    /// Small iteration counts: the whole run in well under two minutes, to
    /// keep the tool working in CI. Its numbers are rough.
    pub quick: bool,
    /// The command line, as the report's header shows it.
    pub command: String,
    /// This program, run again as a child for each memory measurement.
    pub exe: PathBuf,
}

/// Why a run could not happen.
#[derive(Debug)]
pub enum Error {
    /// `redis-server` or `memcached` is not installed (outside CI; in CI the
    /// harness aborts instead). The report needs both.
    ServerMissing(&'static str),
    /// The report could not be written.
    Write(PathBuf, std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::ServerMissing(name) => write!(
                f,
                "{name} is not installed; the report compares every backend, so it needs \
                 redis-server and memcached (bash scripts/test.sh installs them)"
            ),
            Error::Write(path, e) => write!(f, "cannot write {}: {e}", path.display()),
        }
    }
}

impl std::error::Error for Error {}

/// Iteration counts and durations for one mode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) plan: timing::Plan,
    pub(crate) page_clients: usize,
    pub(crate) page_warmup: Duration,
    pub(crate) page_duration: Duration,
    pub(crate) memory_entries: usize,
    pub(crate) memory_payload: usize,
}

impl Settings {
    fn new(quick: bool) -> Self {
        if quick {
            Settings {
                plan: timing::Plan {
                    warmup: Duration::from_millis(20),
                    batch: Duration::from_millis(3),
                    batches: 3,
                    round: Duration::from_millis(150),
                    rounds: 1,
                },
                page_clients: 4,
                page_warmup: Duration::from_millis(300),
                page_duration: Duration::from_millis(1_500),
                memory_entries: 20_000,
                memory_payload: 256,
            }
        } else {
            Settings {
                plan: timing::Plan {
                    warmup: Duration::from_millis(300),
                    batch: Duration::from_millis(20),
                    batches: 31,
                    round: Duration::from_secs(1),
                    rounds: 3,
                },
                page_clients: 4,
                page_warmup: Duration::from_secs(1),
                page_duration: Duration::from_secs(8),
                memory_entries: 100_000,
                memory_payload: 256,
            }
        }
    }
}

/// Says what the tool is doing, on stderr (the report is the output).
pub(crate) fn progress(message: &str) {
    eprintln!("icache-bench: {message}");
}

/// Runs every measurement and writes the report; returns its path.
///
/// # Errors
///
/// [`Error::ServerMissing`] when `redis-server` or `memcached` is not
/// installed, [`Error::Write`] when the report cannot be written. Anything
/// else that goes wrong aborts with a message: a report with a hole in it
/// would be worse than none.
pub fn run(options: &Options) -> Result<PathBuf, Error> {
    let settings = Settings::new(options.quick);
    let started = std::time::Instant::now();

    progress("starting redis-server and memcached on free loopback ports");
    let redis = support::RedisServer::start().ok_or(Error::ServerMissing("redis-server"))?;
    // One worker thread, so that every connection is served by the same
    // server thread, as with Redis: with several, each connection lands on
    // its own thread, and on a small VM where that thread runs can change a
    // round trip several-fold, which would make "icache's connection vs the
    // bare one" a comparison of thread placements.
    let memcached = support::MemcachedServer::start_with(&["-t", "1"])
        .ok_or(Error::ServerMissing("memcached"))?;
    let servers = sections::Servers::new(&redis, &memcached);

    // Each memory measurement runs in a fresh child process, so it is taken
    // first only to report it early; the servers do not affect it.
    progress("5/6 memory per entry (in fresh processes)");
    let memory = sections::memory_per_entry(options, &settings);

    progress("1/6 block hit vs render");
    let hit_vs_render = sections::hit_vs_render(&servers, &settings);
    progress("2/6 hit vs the bare minimum");
    let bare = sections::hit_vs_bare(&servers, &settings);
    progress("3/6 how the cost grows (tokens, size, threads)");
    let growth = sections::growth(&servers, &settings);
    progress("4/6 the demo site under load");
    let pages = sections::pages(&servers, &settings);

    progress("6/6 bytes on the wire per hit");
    let wire = sections::wire(&servers);
    progress("7/9 bumps from the database (outbox, relay)");
    let outbox = sections::outbox(&servers, &settings);
    progress("8/9 a bump under load (several processes)");
    let bump = sections::bump_under_load(&servers, &options.exe, options.quick);
    progress("9/9 pages at the edge (Varnish, 304s, bump to fresh)");
    let edge = sections::edge(&settings, options.quick);
    let sections = [
        hit_vs_render,
        bare,
        growth,
        pages,
        memory,
        wire,
        outbox,
        bump,
        edge,
    ];
    let report = assemble(options, &settings, &sections, &servers, started.elapsed());
    if let Some(dir) = options.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Write(dir.to_path_buf(), e))?;
    }
    std::fs::write(&options.out, report).map_err(|e| Error::Write(options.out.clone(), e))?;
    Ok(options.out.clone())
}

/// One section of the report: its markdown (target lines included, under
/// the table they belong to) and its targets, for the summary.
pub(crate) struct Section {
    pub(crate) markdown: String,
    pub(crate) targets: Vec<report::Target>,
    /// Explanations for targets of this section that were missed.
    pub(crate) missed_notes: Vec<String>,
}

fn assemble(
    options: &Options,
    settings: &Settings,
    sections: &[Section],
    servers: &sections::Servers<'_>,
    took: Duration,
) -> String {
    let mut md = String::new();
    let mode = if options.quick {
        "quick (`--quick`: few iterations, numbers rough; it checks that the tool works)"
    } else {
        "full"
    };
    let build = if cfg!(debug_assertions) {
        "debug (unoptimised: absolute numbers are meaningless)"
    } else {
        "release"
    };
    let _ = write!(
        md,
        "# icache benchmark report\n\n\
         Written by `{command}`; do not edit by hand, run the command again.\n\n\
         - date: {date}\n\
         - machine: {cpu}; {kernel}\n\
         - rustc: {rustc}\n\
         - servers: {redis}; {memcached} with one worker thread (`-t 1`), so that, as \
         with Redis, every connection is served by the same server thread; both \
         started by the tool on free loopback ports\n\
         - build: {build}; mode: {mode}; the run took {took:.0} s\n\n\
         **The ratios are the result; the absolute times are indicative only.** \
         The machine is shared and noisy: the servers, the site and the load \
         generator share its CPUs with the code measured, and on a small VM a \
         loopback round trip costs several times more when the CPU it must wake \
         is idle than when it is busy, so remote times move with whatever else \
         runs. Each ratio compares cases measured in the same run, in \
         alternating batches (a new random order every round), so noise falls \
         on both sides alike. A time is the median of {batches} batches of about \
         {batch_ms} ms each, after {warm_ms} ms of warm-up.\n\n",
        command = options.command,
        date = sysinfo::utc_now(),
        cpu = sysinfo::cpu(),
        kernel = sysinfo::kernel(),
        rustc = sysinfo::version_of(
            &std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()),
            &["--version"]
        ),
        redis = servers.redis_version(),
        memcached = servers.memcached_version(),
        took = took.as_secs_f64(),
        batches = settings.plan.batches,
        batch_ms = settings.plan.batch.as_millis(),
        warm_ms = settings.plan.warmup.as_millis(),
    );

    let targets: Vec<&report::Target> = sections.iter().flat_map(|s| &s.targets).collect();
    let missed = targets.iter().filter(|t| !t.met()).count();
    let _ = writeln!(md, "## Targets\n");
    if missed == 0 {
        let _ = writeln!(md, "All {} targets met.\n", targets.len());
    } else {
        let _ = writeln!(
            md,
            "{} of {} targets met; **{missed} MISSED** (see [the notes](#missed-targets)).\n",
            targets.len() - missed,
            targets.len()
        );
    }
    for t in &targets {
        let _ = write!(
            md,
            "{}",
            t.line().replacen("- ", &format!("- {}. ", t.section), 1)
        );
    }
    md.push('\n');

    for s in sections {
        md.push_str(&s.markdown);
        md.push('\n');
    }

    let notes: Vec<&String> = sections.iter().flat_map(|s| &s.missed_notes).collect();
    let _ = writeln!(md, "## Missed targets\n");
    if notes.is_empty() {
        let _ = writeln!(md, "None in this run.");
    } else {
        for n in notes {
            let _ = writeln!(md, "{n}\n");
        }
    }
    md
}
