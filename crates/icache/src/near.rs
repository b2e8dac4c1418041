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

use quick_cache::sync::Cache;
use quick_cache::{Equivalent, Weighter};

use crate::codec::Entry;
use crate::config::Near as Mode;

/// A value kept in process: the entry and the server instance it is from.
#[derive(Clone)]
pub(crate) struct Held {
    pub(crate) instance: Arc<str>,
    pub(crate) entry: Arc<Entry>,
}

/// A body's key: its kind and name.
#[derive(Clone, PartialEq, Eq, Hash)]
struct BodyKey {
    kind: u8,
    name: Box<str>,
}

/// A [`BodyKey`] to look up without allocating (hashes the same way).
#[derive(Hash)]
struct BodyRef<'a> {
    kind: u8,
    name: &'a str,
}

impl Equivalent<BodyKey> for BodyRef<'_> {
    fn equivalent(&self, key: &BodyKey) -> bool {
        self.kind == key.kind && self.name == &*key.name
    }
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<BodyKey, Held> for ByBytes {
    fn weight(&self, key: &BodyKey, held: &Held) -> u64 {
        (key.name.len() + held.instance.len() + held.entry.weight()) as u64
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
    bodies: Cache<BodyKey, Held, ByBytes>,
    /// `near=tracking`: generations kept coherent by the server.
    pub(crate) gens: Option<Arc<Gens>>,
}

impl Near {
    /// The near cache of `mode`, or `None` when it is off.
    pub(crate) fn new(mode: Mode, max_bytes: u64, prefix: &str) -> Option<Near> {
        let gens = match mode {
            Mode::Off => return None,
            Mode::Entries => None,
            Mode::Tracking { max_lag } => Some(Arc::new(Gens::new(max_lag, max_bytes, prefix))),
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
        self.bodies.get(&BodyRef {
            kind: kind as u8,
            name,
        })
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
                BodyKey {
                    kind: kind as u8,
                    name: Box::from(name),
                },
                Held {
                    instance: instance.clone(),
                    entry,
                },
            );
        }
    }

    pub(crate) fn drop_body(&self, kind: Kind, name: &str) {
        self.bodies.remove(&BodyRef {
            kind: kind as u8,
            name,
        });
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
/// token (a hit looks them up without building a key); invalidations name
/// backend keys, which map back to tokens (readable names are in the key
/// itself; hashed ones are remembered when filled).
pub(crate) struct Gens {
    /// `<prefix:>ic:g:`: readable generation keys are this and the token.
    readable: String,
    /// `<prefix:>ic:G:`: hashed generation keys.
    hashed: String,
    prefix: String,
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
    slots: HashMap<Box<str>, Slot>,
    /// Hashed generation key -> its token, for tokens with a slot.
    hashed: HashMap<String, Box<str>>,
    /// The server instance the pooled connections reached on the latest
    /// fill: the table is trusted only while it is the tracked one (a pool
    /// moved to another server, e.g. behind a virtual IP, is not tracked).
    pool_seen: Option<Arc<str>>,
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
    fn new(max_lag: Duration, max_bytes: u64, prefix: &str) -> Gens {
        let readable = crate::keys::encode(prefix, crate::keys::Key::gen_("x"));
        let readable = readable.strip_suffix('x').unwrap_or(&readable).to_owned();
        let hashed = format!("{}G:", readable.strip_suffix("g:").unwrap_or(&readable));
        Gens {
            readable,
            hashed,
            prefix: prefix.to_owned(),
            table: Mutex::new(Table {
                slots: HashMap::new(),
                hashed: HashMap::new(),
                pool_seen: None,
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

    /// The key prefixes of this cache's generations (readable and hashed
    /// names), for `CLIENT TRACKING … BCAST PREFIX`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn key_prefixes(&self) -> [&str; 2] {
        [&self.readable, &self.hashed]
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
    pub(crate) fn trusted(&self, keys: &[&str]) -> Option<(Vec<u64>, Arc<str>)> {
        if !self.fresh() {
            return None;
        }
        let table = self.lock();
        let instance = table.instance.clone()?;
        if table.pool_seen.as_deref() != Some(&*instance) {
            return None;
        }
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            match table.slots.get(*k) {
                Some(Slot::Gen(g)) => out.push(*g),
                _ => return None,
            }
        }
        Some((out, instance))
    }

    /// Puts placeholders in the slots of `keys` that hold no generation,
    /// before they are read on another connection; `None` while tracking is
    /// not on (nothing will be kept).
    pub(crate) fn begin_fill(&self, keys: &[&str]) -> Option<Fill> {
        // Hashed names are remembered to map invalidations back; their
        // keys are made before the lock is taken (a SHA-256 each).
        let hashed: Vec<Option<String>> = keys
            .iter()
            .map(|k| {
                let key = crate::keys::encode(&self.prefix, crate::keys::Key::gen_(k));
                key.starts_with(&self.hashed).then_some(key)
            })
            .collect();
        let mut dropped = None;
        let mut table = self.lock();
        table.instance.as_ref()?;
        if table.slots.len() + table.hashed.len() + keys.len() > self.max_slots {
            // Starting over is always safe; the old maps are freed after
            // the lock is released.
            dropped = Some((
                std::mem::take(&mut table.slots),
                std::mem::take(&mut table.hashed),
            ));
        }
        table.next_fill += 1;
        let id = table.next_fill;
        for (k, hashed) in keys.iter().zip(hashed) {
            match table.slots.get(*k) {
                Some(Slot::Gen(_)) => {}
                _ => {
                    table.slots.insert(Box::from(*k), Slot::Filling(id));
                    if let Some(key) = hashed {
                        table.hashed.insert(key, Box::from(*k));
                    }
                }
            }
        }
        let fill = Fill {
            id,
            epoch: table.epoch,
        };
        drop(table);
        drop(dropped);
        Some(fill)
    }

    /// Keeps what a fill read, where its placeholder is still in place (no
    /// invalidation or reset came since) and the server is the tracked one.
    pub(crate) fn end_fill(
        &self,
        fill: Fill,
        keys: &[&str],
        gens: &[Option<u64>],
        instance: Option<&Arc<str>>,
    ) {
        let mut table = self.lock();
        table.pool_seen = instance.cloned();
        if table.epoch != fill.epoch || table.instance.as_deref() != instance.map(|i| &**i) {
            return;
        }
        for (k, g) in keys.iter().zip(gens) {
            if let Some(slot) = table.slots.get_mut(*k)
                && *slot == Slot::Filling(fill.id)
            {
                match g {
                    Some(g) => *slot = Slot::Gen(*g),
                    None => {
                        table.slots.remove(*k);
                    }
                }
            }
        }
    }

    /// Drops the slots of `tokens` (this handle's own bump).
    pub(crate) fn forget(&self, tokens: &[&str]) {
        let keys: Vec<String> = tokens
            .iter()
            .map(|t| crate::keys::encode(&self.prefix, crate::keys::Key::gen_(t)))
            .collect();
        let mut table = self.lock();
        for (t, key) in tokens.iter().zip(&keys) {
            table.slots.remove(*t);
            table.hashed.remove(key);
        }
    }

    /// Drops the slots of the generation keys an invalidation names.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn invalidate<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let mut table = self.lock();
        for k in keys {
            if let Some(token) = k.strip_prefix(&*self.readable) {
                table.slots.remove(token);
            } else if k.starts_with(&*self.hashed)
                && let Some(token) = table.hashed.remove(k)
            {
                table.slots.remove(&token);
            }
        }
    }

    /// Drops everything and follows another connection: the old one was
    /// lost, or a new one tracks. `instance` is the tracking connection's
    /// server once tracking is on again, `None` until then.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn reset(&self, instance: Option<Arc<str>>) {
        self.answered.store(0, Ordering::Release);
        self.clear(Some(instance));
    }

    /// Drops every generation, on the same connection: the server was
    /// flushed (`FLUSHALL`/`FLUSHDB`).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn flush(&self) {
        self.clear(None);
    }

    /// Empties the table (fills in progress never land) and, when given,
    /// sets the tracked instance.
    fn clear(&self, instance: Option<Option<Arc<str>>>) {
        let mut table = self.lock();
        let slots = std::mem::take(&mut table.slots);
        let hashed = std::mem::take(&mut table.hashed);
        table.epoch += 1;
        if let Some(instance) = instance {
            table.instance = instance;
        }
        drop(table);
        // Freed outside the lock: readers never wait for it.
        drop((slots, hashed));
    }

    /// Has a ping been answered since the last reset?
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn was_answered(&self) -> bool {
        self.answered.load(Ordering::Acquire) != 0
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

    fn gens() -> Gens {
        let g = Gens::new(Duration::from_secs(60), 1 << 20, "");
        g.reset(Some(Arc::from("run-1")));
        g.answered(g.now());
        g
    }

    #[test]
    fn an_invalidation_during_a_fill_keeps_the_old_value_out() {
        let g = gens();
        let k = ["a"];
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
        let k = ["a"];
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
    fn a_pool_on_another_server_is_not_trusted() {
        let g = gens();
        let k = ["a"];
        let fill = g.begin_fill(&k).expect("tracking on");
        g.end_fill(fill, &k, &[Some(5)], Some(&Arc::from("run-1")));
        assert!(g.trusted(&k).is_some());
        // The pool's connections now reach another server (which the
        // tracking connection does not watch): nothing local is trusted.
        let fill = g.begin_fill(&["b"]).expect("tracking on");
        g.end_fill(fill, &["b"], &[Some(1)], Some(&Arc::from("run-2")));
        assert!(g.trusted(&k).is_none());
    }

    #[test]
    fn nothing_is_trusted_without_a_recent_answered_ping() {
        let g = Gens::new(Duration::from_millis(1), 1 << 20, "");
        g.reset(Some(Arc::from("run-1")));
        let k = ["a"];
        let fill = g.begin_fill(&k).expect("tracking on");
        g.end_fill(fill, &k, &[Some(5)], Some(&Arc::from("run-1")));
        assert!(g.trusted(&k).is_none(), "no ping answered yet");
        g.answered(g.now());
        assert!(g.trusted(&k).is_some());
        std::thread::sleep(Duration::from_millis(5));
        assert!(g.trusted(&k).is_none(), "the answered ping is too old");
    }

    #[test]
    fn prefixes_cover_readable_and_hashed_generations() {
        use crate::keys::{Key, encode};
        for prefix in ["", "shop", "box", "myapp:prod"] {
            let g = Gens::new(Duration::from_secs(1), 1 << 20, prefix);
            let [readable, hashed] = g.key_prefixes();
            assert!(encode(prefix, Key::gen_("movies")).starts_with(readable));
            assert!(encode(prefix, Key::gen_(&"x".repeat(100))).starts_with(hashed));
            assert!(!encode(prefix, Key::fragment("movies")).starts_with(readable));
            assert!(!encode(prefix, Key::fragment("movies")).starts_with(hashed));
        }
    }

    #[test]
    fn invalidations_name_keys_readable_or_hashed() {
        let g = Gens::new(Duration::from_secs(60), 1 << 20, "myapp:prod");
        g.reset(Some(Arc::from("run-1")));
        g.answered(g.now());
        let long = "t".repeat(100);
        let k = ["movies", long.as_str()];
        let inst = Arc::from("run-1");
        let fill = g.begin_fill(&k).expect("tracking on");
        g.end_fill(fill, &k, &[Some(1), Some(2)], Some(&inst));
        assert!(g.trusted(&k).is_some());
        g.invalidate(["myapp:prod:ic:g:movies"]);
        assert!(g.trusted(&k[..1]).is_none());
        assert!(g.trusted(&k[1..]).is_some());
        let hashed = crate::keys::encode("myapp:prod", crate::keys::Key::gen_(&long));
        g.invalidate([hashed.as_str()]);
        assert!(g.trusted(&k[1..]).is_none());
    }
}
