//! The in-process backend: a byte-bounded quick_cache.
//!
//! Chosen over moka by measurement (see `benches/core.rs`): quick_cache hits
//! cost a few tens of nanoseconds here, moka's several times more, and this
//! backend's hot path is just a few hash lookups. Entries are kept decoded
//! (`Arc<Entry>`), so a hit costs no copy and no UTF-8 check. Generations are
//! `Arc<AtomicU64>`s in the same cache: a bump is a `fetch_add`, and an evicted
//! generation simply comes back as a fresh random value, as on any backend.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Equivalent, Lifecycle, OptionsBuilder, Weighter};

use super::{Backend, Fetched};
use crate::codec::Entry;
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{Key, Space};

#[derive(Debug, Clone, PartialEq, Eq)]
struct MemKey {
    space: Space,
    name: Box<str>,
}

// Hashes exactly like `MemKeyRef` so that lookups need no allocation.
impl Hash for MemKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.space.hash(state);
        self.name.hash(state);
    }
}

struct MemKeyRef<'a> {
    space: Space,
    name: &'a str,
}

impl Hash for MemKeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.space.hash(state);
        self.name.hash(state);
    }
}

impl Equivalent<MemKey> for MemKeyRef<'_> {
    fn equivalent(&self, key: &MemKey) -> bool {
        self.space == key.space && self.name == &*key.name
    }
}

impl From<Key<'_>> for MemKey {
    fn from(k: Key<'_>) -> Self {
        MemKey {
            space: k.space,
            name: Box::from(k.name),
        }
    }
}

fn r<'a>(k: &Key<'a>) -> MemKeyRef<'a> {
    MemKeyRef {
        space: k.space,
        name: k.name,
    }
}

#[derive(Debug, Clone)]
enum Item {
    Gen(Arc<AtomicU64>),
    Entry {
        entry: Arc<Entry>,
        expires: Option<Instant>,
    },
}

#[derive(Debug, Clone)]
struct ByBytes;

impl Weighter<MemKey, Item> for ByBytes {
    fn weight(&self, key: &MemKey, val: &Item) -> u64 {
        let v = match val {
            Item::Gen(_) => 48,
            Item::Entry { entry, .. } => entry.weight(),
        };
        (key.name.len() + 32 + v) as u64
    }
}

/// Counts evictions, for stats and the `icache_evictions_total` metric:
/// only what the byte bound pushed out. quick_cache reports a value replaced
/// by an insert of the same key through the same hook, so an insert names
/// its key in the request state, and that key's old value is not counted (a
/// re-render after a bump replaces its entry; nothing was evicted).
#[derive(Debug, Clone)]
struct CountEvictions(Arc<AtomicU64>, metrics::Counter);

impl Default for CountEvictions {
    fn default() -> Self {
        CountEvictions(
            Arc::default(),
            metrics::counter!("icache_evictions_total", "backend" => "memory"),
        )
    }
}

/// The key an insert replaces, if any (see [`CountEvictions`]).
#[derive(Debug, Default)]
struct Inserting(Option<MemKey>);

impl Lifecycle<MemKey, Item> for CountEvictions {
    type RequestState = Inserting;
    fn on_evict(&self, state: &mut Self::RequestState, key: MemKey, _val: Item) {
        if state.0.as_ref() == Some(&key) {
            return;
        }
        self.0.fetch_add(1, Ordering::Relaxed);
        self.1.increment(1);
    }
}

type Store = Cache<MemKey, Item, ByBytes, DefaultHashBuilder, CountEvictions>;

pub(crate) struct Memory {
    store: Store,
    /// The largest item one shard can hold; larger values are refused.
    max_item: u64,
    evictions: Arc<AtomicU64>,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("capacity", &self.store.capacity())
            .field("weight", &self.store.weight())
            .field("len", &self.store.len())
            .finish()
    }
}

/// Few shards: each shard gets `max_bytes / shards`, and a value must fit in one
/// shard. Four is enough to keep lock contention low on small machines.
const SHARDS: usize = 4;

impl Memory {
    pub(crate) fn new(max_bytes: u64) -> Result<Self> {
        let evictions = CountEvictions::default();
        let options = OptionsBuilder::new()
            .estimated_items_capacity(usize::try_from(max_bytes / 1024).unwrap_or(1 << 20).max(16))
            .weight_capacity(max_bytes)
            .shards(SHARDS)
            .build()
            .map_err(|e| Error::config(format!("memory backend: {e}")))?;
        let counter = evictions.0.clone();
        let store = Cache::with_options(options, ByBytes, DefaultHashBuilder::default(), evictions);
        let max_item = store.shard_capacity();
        Ok(Memory {
            store,
            max_item,
            evictions: counter,
        })
    }

    fn entry(&self, k: &Key<'_>) -> Option<Arc<Entry>> {
        match self.store.get(&r(k)) {
            Some(Item::Entry { entry, expires }) => match expires {
                Some(at) if at <= Instant::now() => {
                    self.store.remove(&r(k));
                    None
                }
                _ => Some(entry),
            },
            _ => None,
        }
    }

    fn gen_cell(&self, key: &Key<'_>, fresh: u64) -> Arc<AtomicU64> {
        if let Some(Item::Gen(cell)) = self.store.get(&r(key)) {
            return cell;
        }
        // Slow path: atomically insert unless another thread just did.
        let owned = MemKey::from(*key);
        let item = self
            .store
            .get_or_insert_with(&owned, || {
                Ok::<_, std::convert::Infallible>(Item::Gen(Arc::new(AtomicU64::new(fresh))))
            })
            .unwrap_or_else(|never| match never {});
        match item {
            Item::Gen(cell) => cell,
            // Spaces keep generations and entries apart, so this cannot happen;
            // answer with a fresh orphan cell rather than panic.
            Item::Entry { .. } => Arc::new(AtomicU64::new(fresh)),
        }
    }
}

impl Backend for Memory {
    fn fetch(&self, tokens: &[&str], entries: &[Key<'_>]) -> Result<Fetched> {
        let gens = tokens
            .iter()
            .map(|t| match self.store.get(&r(&Key::gen_(t))) {
                Some(Item::Gen(cell)) => Some(cell.load(Ordering::Acquire)),
                _ => None,
            })
            .collect();
        let entries = entries.iter().map(|k| self.entry(k)).collect();
        Ok(Fetched {
            gens,
            entries,
            instance: None,
        })
    }

    fn get_entry(&self, key: Key<'_>) -> Result<Option<Arc<Entry>>> {
        Ok(self.entry(&key))
    }

    fn fetch_local(
        &self,
        tokens: &[&str],
        entry: Key<'_>,
        gens: &mut [u64],
    ) -> Option<(bool, Option<Arc<Entry>>)> {
        let mut complete = true;
        for (t, g) in tokens.iter().zip(gens.iter_mut()) {
            match self.store.get(&r(&Key::gen_(t))) {
                Some(Item::Gen(cell)) => *g = cell.load(Ordering::Acquire),
                _ => complete = false,
            }
        }
        Some((complete, self.entry(&entry)))
    }

    fn init_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        Ok(gens
            .iter()
            .zip(fresh)
            .map(|(k, &f)| self.gen_cell(k, f).load(Ordering::Acquire))
            .collect())
    }

    fn incr_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        Ok(gens
            .iter()
            .zip(fresh)
            .map(|(k, &f)| {
                self.gen_cell(k, f)
                    .fetch_add(1, Ordering::AcqRel)
                    .wrapping_add(1)
            })
            .collect())
    }

    fn set(
        &self,
        key: Key<'_>,
        entry: Arc<Entry>,
        ttl: Option<Duration>,
        _guard: Option<&str>,
    ) -> Result<bool> {
        let weight = ByBytes.weight(
            &MemKey::from(key),
            &Item::Entry {
                entry: entry.clone(),
                expires: None,
            },
        );
        if weight > self.max_item {
            // quick_cache would silently drop it; say so instead.
            self.store.remove(&r(&key));
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "value of {} bytes does not fit the memory backend (at most {} bytes per value; raise ?max_bytes=)",
                    entry.payload.as_bytes().len(),
                    self.max_item.saturating_sub(200)
                ),
            ));
        }
        // A TTL too long to represent is as good as none.
        let expires = ttl.and_then(|t| Instant::now().checked_add(t));
        let key = MemKey::from(key);
        let mut replacing = Inserting(Some(key.clone()));
        self.store
            .insert_with_lifecycle(key, Item::Entry { entry, expires }, &mut replacing);
        Ok(true)
    }

    fn delete(&self, key: Key<'_>) -> Result<bool> {
        Ok(self.store.remove(&r(&key)).is_some())
    }

    fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }

    fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn server_stats(&self) -> Result<Vec<(String, String)>> {
        Ok(vec![
            ("entries".into(), self.store.len().to_string()),
            ("bytes".into(), self.store.weight().to_string()),
            ("max_bytes".into(), self.store.capacity().to_string()),
            ("evictions".into(), self.evictions().to_string()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Payload;

    fn entry(n: usize) -> Arc<Entry> {
        Arc::new(Entry::versioned(Payload::Text(Arc::from("x".repeat(n))), 1))
    }

    /// Replacing an entry (a re-render after a bump) is not an eviction;
    /// pushing entries out to stay within the bound is.
    #[test]
    fn only_the_bound_counts_as_evictions() {
        let memory = Memory::new(64 * 1024).expect("memory backend");
        for _ in 0..100 {
            memory
                .set(Key::fragment("block"), entry(100), None, None)
                .expect("set");
        }
        assert_eq!(memory.evictions(), 0, "replacements counted as evictions");
        for i in 0..1000 {
            let name = format!("block-{i}");
            memory
                .set(Key::fragment(&name), entry(1000), None, None)
                .expect("set");
        }
        assert!(memory.evictions() > 0, "the bound evicted nothing");
        assert!(memory.store.weight() <= 64 * 1024);
    }
}
