//! The fault schedule: which faults each backend gets, and the loop that
//! draws them from the seed and injects them one after another.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread;
use std::time::{Duration, Instant};

use icache::ICache;

use crate::rng::Rng;
use crate::tally::Tally;

/// A backend the chaos run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `memory://`: in-process, so one process with threads only.
    Memory,
    /// One `redis-server` behind a fault proxy.
    Redis,
    /// One `memcached` behind a fault proxy.
    Memcached,
    /// A Redis Cluster of 3 masters (no proxies: it advertises real ports).
    RedisCluster,
    /// 3 `memcached` servers, each behind its own fault proxy.
    MemcachedPool,
}

impl Backend {
    /// Every backend, in the order `--backend all` runs them.
    pub const ALL: [Backend; 5] = [
        Backend::Memory,
        Backend::Redis,
        Backend::Memcached,
        Backend::RedisCluster,
        Backend::MemcachedPool,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
            Backend::Memcached => "memcached",
            Backend::RedisCluster => "redis-cluster",
            Backend::MemcachedPool => "memcached-pool",
        }
    }

    /// The backend named `name`.
    pub fn parse(name: &str) -> Option<Backend> {
        Backend::ALL.into_iter().find(|b| b.name() == name)
    }

    /// The faults the schedule draws from for this backend.
    pub(crate) fn faults(self) -> &'static [Fault] {
        use Fault::*;
        match self {
            Backend::Memory => &[Evict, Flush, Filler],
            Backend::Redis => &[
                Refuse,
                Hang,
                Freeze,
                KillRestart,
                SnapshotRestart,
                ClientPause,
                Evict,
                Flush,
                Filler,
            ],
            Backend::Memcached => &[Refuse, Hang, Freeze, KillRestart, Evict, Flush, Filler],
            // Clients reach the nodes on the ports the cluster advertises, so a
            // proxy in front would be bypassed: node faults only.
            Backend::RedisCluster => &[KillRestart, ClientPause, Evict, Flush],
            Backend::MemcachedPool => &[
                Refuse,
                Hang,
                Freeze,
                NodeLeave,
                KillRestart,
                Evict,
                Flush,
                Filler,
            ],
        }
    }
}

/// A fault the schedule injects on the backend (render faults are drawn by
/// the readers themselves: `slow_render`, `render_panic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Proxy cuts and refuses connections for 0.2–2 s.
    Refuse,
    /// Proxy accepts but forwards nothing for 0.2–2 s.
    Hang,
    /// Proxy forwards requests but holds the replies for 0.2–2 s.
    Freeze,
    /// A pool server's proxy refuses for 1–4 s: the node leaves and returns
    /// with its old data.
    NodeLeave,
    /// kill -9 of a server (a cluster node, a pool server) and a restart empty.
    KillRestart,
    /// Redis: SAVE, let data and bumps move on, kill -9, restart from the
    /// older dump.rdb.
    SnapshotRestart,
    /// `CLIENT PAUSE` of a Redis server or cluster node for 0.2–1.5 s.
    ClientPause,
    /// Our keys deleted at random (generations more often than entries).
    Evict,
    /// FLUSHALL / flush_all on every server (memory: every token forgotten).
    Flush,
    /// Megabytes of other keys written to a server with a small memory limit,
    /// so that it evicts by itself.
    Filler,
    /// `--writers db`: SIGKILL of a writer process (mid-transaction or just
    /// after a COMMIT), restarted.
    KillWriter,
    /// `--writers db`: SIGKILL of a relay process (mid-batch or idle),
    /// restarted.
    KillRelay,
}

impl Fault {
    pub(crate) const ALL: [Fault; 12] = [
        Fault::Refuse,
        Fault::Hang,
        Fault::Freeze,
        Fault::NodeLeave,
        Fault::KillRestart,
        Fault::SnapshotRestart,
        Fault::ClientPause,
        Fault::Evict,
        Fault::Flush,
        Fault::Filler,
        Fault::KillWriter,
        Fault::KillRelay,
    ];

    /// What `--writers db` adds to every backend's faults.
    pub(crate) const DB: [Fault; 2] = [Fault::KillWriter, Fault::KillRelay];

    /// The name in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::Refuse => "proxy_refuse",
            Fault::Hang => "proxy_hang",
            Fault::Freeze => "proxy_freeze",
            Fault::NodeLeave => "node_leave_return",
            Fault::KillRestart => "kill9_restart_empty",
            Fault::SnapshotRestart => "kill9_restart_old_snapshot",
            Fault::ClientPause => "client_pause",
            Fault::Evict => "evict_keys",
            Fault::Flush => "flush_all",
            Fault::Filler => "memory_filler",
            Fault::KillWriter => "kill9_writer",
            Fault::KillRelay => "kill9_relay",
        }
    }
}

/// The faults of `backend`, or those of them named in `only`.
pub(crate) fn select(backend: Backend, only: Option<&[String]>) -> Result<Vec<Fault>, String> {
    select_from(backend, backend.faults(), only)
}

/// The faults of `all`, or those of them named in `only`.
pub(crate) fn select_from(
    backend: Backend,
    all: &[Fault],
    only: Option<&[String]>,
) -> Result<Vec<Fault>, String> {
    let Some(only) = only else {
        return Ok(all.to_vec());
    };
    for name in only {
        if !Fault::ALL.iter().any(|f| f.name() == name) {
            let known: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            return Err(format!(
                "unknown fault {name:?}; known: {}",
                known.join(", ")
            ));
        }
    }
    let chosen: Vec<Fault> = all
        .iter()
        .copied()
        .filter(|f| only.iter().any(|n| n == f.name()))
        .collect();
    if chosen.is_empty() {
        return Err(format!(
            "none of the faults {} applies to {}",
            only.join(","),
            backend.name()
        ));
    }
    Ok(chosen)
}

/// Render faults, counted by the readers; every other `fault.*` counter is a
/// backend fault.
pub(crate) const RENDER_FAULTS: [&str; 2] = ["slow_render", "render_panic"];

/// Something that can inject faults into a backend.
pub(crate) trait Injector {
    /// Injects `fault` (and ends it again, for the faults that last): blocks
    /// for the fault's duration. `Ok` describes what was done.
    fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Result<String, String>;
    /// Ends whatever fault may still be on (after a failed injection).
    fn heal(&mut self);
}

/// Draws faults from `seed` for `duration`, one at a time with 0.2–1.5 s of
/// calm between them, and counts them in `tally` (`fault.<name>`; a fault
/// that could not be injected counts as a `harness_errors`). The log gives
/// times since `origin`, the clock the children's findings use too.
pub(crate) fn run_schedule(
    backend: Backend,
    kinds: &[Fault],
    seed: u64,
    duration: Duration,
    origin: Instant,
    injector: &mut dyn Injector,
    tally: &mut Tally,
) {
    let end = Instant::now() + duration;
    let mut rng = Rng::derive(seed, "schedule", 0);
    // Drawn from a shuffled bag, refilled when empty: every kind comes
    // once before any comes twice, so even a short run covers many kinds.
    let mut bag: Vec<Fault> = Vec::new();
    loop {
        let gap = rng.millis(200, 1500);
        if Instant::now() + gap >= end {
            break;
        }
        thread::sleep(gap);
        if bag.is_empty() {
            bag = kinds.to_vec();
            for i in (1..bag.len()).rev() {
                bag.swap(i, rng.below(i + 1));
            }
        }
        let Some(fault) = bag.pop() else { break };
        let at = origin.elapsed();
        let started = Instant::now();
        // Its own generator: however many draws a fault takes (one per key
        // for an eviction), the schedule after it stays the same.
        let mut fault_rng = Rng::derive(rng.next_u64(), "fault", 0);
        let outcome = catch_unwind(AssertUnwindSafe(|| injector.inject(fault, &mut fault_rng)));
        let took = started.elapsed();
        match outcome {
            Ok(Ok(what)) => {
                tally.add(&format!("fault.{}", fault.name()), 1);
                eprintln!(
                    "[{} +{:6.2}s] {}: {what} ({} ms)",
                    backend.name(),
                    at.as_secs_f64(),
                    fault.name(),
                    took.as_millis()
                );
            }
            Ok(Err(e)) => {
                tally.add("harness_errors", 1);
                eprintln!(
                    "[{} +{:6.2}s] HARNESS ERROR: could not inject {}: {e}",
                    backend.name(),
                    at.as_secs_f64(),
                    fault.name()
                );
                injector.heal();
            }
            Err(panic) => {
                tally.add("harness_errors", 1);
                eprintln!(
                    "[{} +{:6.2}s] HARNESS ERROR: injecting {} panicked: {}",
                    backend.name(),
                    at.as_secs_f64(),
                    fault.name(),
                    panic_message(&*panic)
                );
                injector.heal();
            }
        }
    }
    injector.heal();
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        String::from("(a panic payload that is not a string)")
    }
}

/// Faults for the in-process memory backend, injected from inside the one
/// process that uses it (nothing outside the process can reach it).
pub(crate) struct MemoryInjector {
    pub(crate) cache: ICache,
    /// Every token the workers use.
    pub(crate) tokens: Vec<String>,
    pub(crate) filler_serial: u64,
}

impl Injector for MemoryInjector {
    fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Result<String, String> {
        match fault {
            Fault::Evict => {
                let n = rng.range(1, 5) as usize;
                let mut forgotten = Vec::new();
                for _ in 0..n {
                    let token = &self.tokens[rng.below(self.tokens.len())];
                    self.cache.forget_token(token).map_err(|e| e.to_string())?;
                    forgotten.push(token.as_str());
                }
                Ok(format!("generations of {} forgotten", forgotten.join(", ")))
            }
            Fault::Flush => {
                for token in &self.tokens {
                    self.cache.forget_token(token).map_err(|e| e.to_string())?;
                }
                Ok(format!(
                    "all {} generations forgotten (the memory backend has no flush)",
                    self.tokens.len()
                ))
            }
            Fault::Filler => {
                // 64 values of 1 KiB fill the whole 64 KiB bound: the bounded
                // cache evicts entries and generations to make room.
                let value = "x".repeat(1024);
                for _ in 0..64 {
                    self.filler_serial += 1;
                    self.cache
                        .set(&format!("filler:{}", self.filler_serial), &value, None)
                        .map_err(|e| e.to_string())?;
                }
                Ok(String::from("64 KiB of filler values written"))
            }
            other => Err(format!("{} is not a memory fault", other.name())),
        }
    }

    fn heal(&mut self) {}
}
