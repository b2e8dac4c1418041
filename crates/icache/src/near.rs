//! The near cache (`?near=`): what a network backend also keeps in process.
//!
//! **Bodies** (`near=entries`, the default, and `near=tracking`): a fragment
//! or versioned entry stored under (key, version, server instance) never
//! changes, so a copy kept here may be served whenever the server says the
//! current version is that one: a hit then fetches the generations only (a
//! few bytes per token, whatever the fragment's size). Bounded by
//! `?near_max_bytes=` (quick_cache, weighed by bytes).
//!
//! **Generations** (`near=tracking`, Redis only): kept here too, and dropped
//! when Redis says they changed (client-side caching, see
//! `backend/redis/tracking.rs`). Trusted only while a ping sent at most
//! `max_lag` ago has been answered on the tracking connection: replies and
//! invalidations arrive in order there, so every bump that completed before
//! that ping was sent has been seen. A hit then makes no round trip.
//!
//! Fills never race invalidations: before generations are read on another
//! connection, a placeholder is put in their slot ("caching in progress", as
//! Redis's documentation has it); an invalidation (or a reset) removes it, and
//! a fill stores a value only where its own placeholder is still there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use crate::codec::Entry;
use crate::config::Near as Mode;

/// A value kept in process: the entry and the server instance it is from.
#[derive(Clone)]
pub(crate) struct Held {
    pub(crate) instance: Arc<str>,
    pub(crate) entry: Arc<Entry>,
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<(u8, Box<str>), Held> for ByBytes {
    fn weight(&self, key: &(u8, Box<str>), held: &Held) -> u64 {
        (key.1.len() + held.instance.len() + held.entry.weight()) as u64
    }
}

/// What kind of entry a body is: fragments and versioned entries never meet.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Fragment = 0,
    Versioned = 1,
}

/// The in-process side of one cache handle (shared by its clones).
pub(crate) struct Near {
    bodies: Cache<(u8, Box<str>), Held, ByBytes>,
    /// `near=tracking`: generations kept coherent by the server.
    pub(crate) gens: Option<Arc<Gens>>,
}

impl Near {
    /// The near cache of `mode`, or `None` when it is off.
    pub(crate) fn new(mode: Mode, max_bytes: u64) -> Option<Near> {
        let gens = match mode {
            Mode::Off => return None,
            Mode::Entries => None,
            Mode::Tracking { max_lag } => Some(Arc::new(Gens::new(max_lag, max_bytes))),
        };
        // About 4 KiB per body to size quick_cache's tables; the bound is
        // in bytes whatever the count.
        let items = usize::try_from(max_bytes / 4096)
            .unwrap_or(usize::MAX)
            .max(16);
        Some(Near {
            bodies: Cache::with_weighter(items, max_bytes, ByBytes),
            gens,
        })
    }

    pub(crate) fn get(&self, kind: Kind, name: &str) -> Option<Held> {
        self.bodies.get(&(kind as u8, Box::from(name)))
    }

    pub(crate) fn keep(
        &self,
        kind: Kind,
        name: &str,
        instance: Option<&Arc<str>>,
        entry: Arc<Entry>,
    ) {
        if let Some(instance) = instance {
            self.bodies.insert(
                (kind as u8, Box::from(name)),
                Held {
                    instance: instance.clone(),
                    entry,
                },
            );
        }
    }

    pub(crate) fn drop_body(&self, kind: Kind, name: &str) {
        self.bodies.remove(&(kind as u8, Box::from(name)));
    }

    /// Bytes held now.
    pub(crate) fn bytes(&self) -> u64 {
        self.bodies.weight()
    }
}

/// A generation kept in process, or a fill's placeholder.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Filling(u64),
    Gen(u64),
}

/// Generations kept coherent by the server (`near=tracking`), keyed by
/// their backend key (what invalidations name).
pub(crate) struct Gens {
    table: Mutex<Table>,
    /// When the tracking thread started; times below are nanoseconds since.
    base: Instant,
    /// The send time (+1; 0: none) of the latest ping answered on the
    /// current tracking connection.
    answered: AtomicU64,
    max_lag: Duration,
    /// Slots kept at most (then the table starts over: always safe).
    max_slots: usize,
}

struct Table {
    slots: HashMap<String, Slot>,
    /// The server instance of the tracking connection while tracking is on;
    /// `None` while it is not (nothing may be filled then).
    instance: Option<Arc<str>>,
    /// Changes at every reset: a fill from before one never lands.
    epoch: u64,
    next_fill: u64,
}

/// A fill in progress: its placeholders' id and the epoch it began in.
pub(crate) struct Fill {
    id: u64,
    epoch: u64,
}

impl Gens {
    fn new(max_lag: Duration, max_bytes: u64) -> Gens {
        Gens {
            table: Mutex::new(Table {
                slots: HashMap::new(),
                instance: None,
                epoch: 0,
                next_fill: 0,
            }),
            base: Instant::now(),
            answered: AtomicU64::new(0),
            max_lag,
            // A slot costs about 100 bytes with its key.
            max_slots: usize::try_from(max_bytes / 100)
                .unwrap_or(usize::MAX)
                .max(1024),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn max_lag(&self) -> Duration {
        self.max_lag
    }

    /// Has a ping sent at most `max_lag` ago been answered?
    fn fresh(&self) -> bool {
        let answered = self.answered.load(Ordering::Acquire);
        if answered == 0 {
            return false;
        }
        let sent = Duration::from_nanos(answered - 1);
        self.base.elapsed().saturating_sub(sent) <= self.max_lag
    }

    /// The generations of `keys` and the instance they are from, when every
    /// one is here and may be trusted; `None` otherwise (read them remotely).
    pub(crate) fn trusted(&self, keys: &[String]) -> Option<(Vec<u64>, Arc<str>)> {
        if !self.fresh() {
            return None;
        }
        let table = self.lock();
        let instance = table.instance.clone()?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            match table.slots.get(k) {
                Some(Slot::Gen(g)) => out.push(*g),
                _ => return None,
            }
        }
        Some((out, instance))
    }

    /// Puts placeholders in the slots of `keys` that hold no generation,
    /// before they are read on another connection; `None` while tracking is
    /// not on (nothing will be kept).
    pub(crate) fn begin_fill(&self, keys: &[String]) -> Option<Fill> {
        let mut table = self.lock();
        table.instance.as_ref()?;
        if table.slots.len() + keys.len() > self.max_slots {
            table.slots.clear();
        }
        table.next_fill += 1;
        let id = table.next_fill;
        for k in keys {
            match table.slots.get(k) {
                Some(Slot::Gen(_)) => {}
                _ => {
                    table.slots.insert(k.clone(), Slot::Filling(id));
                }
            }
        }
        Some(Fill {
            id,
            epoch: table.epoch,
        })
    }

    /// Keeps what a fill read, where its placeholder is still in place (no
    /// invalidation or reset came since) and the server is the tracked one.
    pub(crate) fn end_fill(
        &self,
        fill: Fill,
        keys: &[String],
        gens: &[Option<u64>],
        instance: Option<&Arc<str>>,
    ) {
        let mut table = self.lock();
        if table.epoch != fill.epoch || table.instance.as_deref() != instance.map(|i| &**i) {
            return;
        }
        for (k, g) in keys.iter().zip(gens) {
            if let Some(slot) = table.slots.get_mut(k)
                && *slot == Slot::Filling(fill.id)
            {
                match g {
                    Some(g) => *slot = Slot::Gen(*g),
                    None => {
                        table.slots.remove(k);
                    }
                }
            }
        }
    }

    /// Drops `keys` (an invalidation, or this handle's own bump).
    pub(crate) fn invalidate<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let mut table = self.lock();
        for k in keys {
            table.slots.remove(k);
        }
    }

    /// Drops everything: the connection was lost, re-made, or the server was
    /// flushed. `instance` is the tracking connection's server once tracking
    /// is on again, `None` until then.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn reset(&self, instance: Option<Arc<str>>) {
        self.answered.store(0, Ordering::Release);
        let mut table = self.lock();
        table.slots.clear();
        table.epoch += 1;
        table.instance = instance;
    }

    /// The send time of a ping, to hand to [`answered`](Self::answered).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// The ping sent at `sent` was answered: everything before it is seen.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn answered(&self, sent: u64) {
        self.answered.store(sent + 1, Ordering::Release);
    }

    /// The instance of the tracking connection, trusted or not.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn instance_now(&self) -> Option<Arc<str>> {
        self.lock().instance.clone()
    }

    /// The instance of the tracking connection while its table is trusted.
    pub(crate) fn instance(&self) -> Option<Arc<str>> {
        if !self.fresh() {
            return None;
        }
        self.lock().instance.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| (*s).to_owned()).collect()
    }

    fn gens() -> Gens {
        let g = Gens::new(Duration::from_secs(60), 1 << 20);
        g.reset(Some(Arc::from("run-1")));
        g.answered(g.now());
        g
    }

    #[test]
    fn an_invalidation_during_a_fill_keeps_the_old_value_out() {
        let g = gens();
        let k = keys(&["ic:g:a"]);
        let inst = Arc::from("run-1");
        let fill = g.begin_fill(&k).expect("tracking on");
        // The bump's invalidation arrives before the fill's reply is kept.
        g.invalidate(["ic:g:a"]);
        g.end_fill(fill, &k, &[Some(5)], Some(&inst));
        assert!(g.trusted(&k).is_none());
        // A fill with no invalidation in between is kept.
        let fill = g.begin_fill(&k).expect("tracking on");
        g.end_fill(fill, &k, &[Some(6)], Some(&inst));
        assert_eq!(g.trusted(&k).map(|(v, _)| v), Some(vec![6]));
    }

    #[test]
    fn a_reset_or_another_server_keeps_a_fill_out() {
        let g = gens();
        let k = keys(&["ic:g:a"]);
        let fill = g.begin_fill(&k).expect("tracking on");
        g.reset(Some(Arc::from("run-1")));
        g.answered(g.now());
        g.end_fill(fill, &k, &[Some(5)], Some(&Arc::from("run-1")));
        assert!(g.trusted(&k).is_none());
        let fill = g.begin_fill(&k).expect("tracking on");
        g.end_fill(fill, &k, &[Some(5)], Some(&Arc::from("run-2")));
        assert!(g.trusted(&k).is_none());
        // While tracking is off nothing is filled at all.
        g.reset(None);
        assert!(g.begin_fill(&k).is_none());
    }

    #[test]
    fn nothing_is_trusted_without_a_recent_answered_ping() {
        let g = Gens::new(Duration::from_millis(1), 1 << 20);
        g.reset(Some(Arc::from("run-1")));
        let k = keys(&["ic:g:a"]);
        let fill = g.begin_fill(&k).expect("tracking on");
        g.end_fill(fill, &k, &[Some(5)], Some(&Arc::from("run-1")));
        assert!(g.trusted(&k).is_none(), "no ping answered yet");
        g.answered(g.now());
        assert!(g.trusted(&k).is_some());
        std::thread::sleep(Duration::from_millis(5));
        assert!(g.trusted(&k).is_none(), "the answered ping is too old");
    }
}
