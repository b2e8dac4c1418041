//! The storage behind an [`ICache`](crate::ICache): a small trait and its
//! implementations, one feature-gated file each.
//!
//! ## Restarts and rollbacks
//!
//! A network backend can restart empty (all generations come back fresh: safe)
//! or restore an older snapshot (an RDB file, a lagging replica promoted):
//! then generations go back to older values *and* entries stored under them
//! come back, so an old entry could match again although the data moved on.
//! To close that hole every connection learns the id of the server instance
//! it talks to (Redis `run_id`, memcached pid and start time) when it opens;
//! versioned entries are stored with that id, and an entry written by another
//! instance is a miss. A fragment is stored only on the instance its version
//! was read from (`set`'s `guard`).
//!
//! On a single Redis node the id is `run_id/marker`: the marker is a random
//! value each database holds under the handle's prefix (set once with
//! `SET NX`, read in the same `MGET` as the generations, so a hit costs no
//! extra round trip). Data replaced while the server runs (`SWAPDB`,
//! `FLUSHALL`/`FLUSHDB`) brings another marker or none, and the old entries
//! become misses; where `INFO` has no `run_id`, the first connection of a
//! server life renews the marker (a script loaded once per life tells;
//! scripts are not persisted), so a restart from an old snapshot is still
//! caught. memcached needs no marker: it has no `SWAPDB` and no snapshots,
//! `flush_all` leaves nothing that could match, and a restart (warm restarts
//! included) changes its pid or start time.
//!
//! The trait is deliberately narrow: everything icache does is built from
//! "fetch generations and entries together", "initialise missing generations",
//! "bump generations atomically", "set" and "delete". Each method is one round
//! trip on a network backend (the generation methods may take a second one when a
//! counter is missing or foreign, which is rare).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::codec::Entry;
use crate::error::Result;
use crate::keys::Key;

#[cfg(feature = "memcached")]
pub(crate) mod memcached;
pub(crate) mod memory;
pub(crate) mod none;
#[cfg(feature = "redis")]
pub(crate) mod redis;

/// What [`Backend::fetch`] returns, in the order the keys were given.
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    /// `None`: the generation is missing, or its bytes are not ours.
    pub(crate) gens: Vec<Option<u64>>,
    /// `None`: missing, not decodable (foreign or corrupt bytes), or a
    /// versioned entry stored by another server instance.
    pub(crate) entries: Vec<Option<Arc<Entry>>>,
    /// The server instance that answered (`None` in-process).
    pub(crate) instance: Option<Arc<str>>,
}

pub(crate) trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Reads the generations of `tokens` and the entries under `entries` in
    /// one round trip.
    fn fetch(&self, tokens: &[&str], entries: &[Key<'_>]) -> Result<Fetched>;

    /// A block hit's reads answered in process, without allocating: the
    /// generations of `tokens` into `gens` (`false` if one is missing) and
    /// the entry under `entry`. `None` from backends that must do I/O
    /// (they answer through [`fetch`](Self::fetch)).
    fn fetch_local(
        &self,
        _tokens: &[&str],
        _entry: Key<'_>,
        _gens: &mut [u64],
    ) -> Option<(bool, Option<Arc<Entry>>)> {
        None
    }

    /// One entry. The default goes through [`fetch`](Self::fetch); the memory
    /// backend answers without allocating.
    fn get_entry(&self, key: Key<'_>) -> Result<Option<Arc<Entry>>> {
        Ok(self.fetch(&[], &[key])?.entries.pop().flatten())
    }

    /// For each generation: if it is missing (or not a number), store
    /// `fresh[i]` atomically unless another client got there first; return the
    /// value now stored.
    fn init_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>>;

    /// Adds one to each generation atomically; a missing (or foreign) one becomes
    /// `fresh[i]` (then +1 on Redis, which is just as fresh). Returns the new
    /// values. One round trip for all of them.
    fn incr_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>>;

    /// Stores an entry; `ttl` only for plain entries. With a `guard`, stores
    /// only if the server instance is still that one, and says whether it did.
    fn set(
        &self,
        key: Key<'_>,
        entry: Arc<Entry>,
        ttl: Option<Duration>,
        guard: Option<&str>,
    ) -> Result<bool>;

    /// Removes an entry; `true` if something was there.
    fn delete(&self, key: Key<'_>) -> Result<bool>;

    /// Takes the fill lease `key` for `ttl` unless another client holds it
    /// (`SET … NX PX` on Redis, `add` with an expiry on memcached): `true`
    /// if this call took it. A lease only decides who renders, never what
    /// is served (see `lease.rs`). In process it is always granted: the
    /// process's own single-flight is the whole fleet.
    fn lease(&self, _key: Key<'_>, _ttl: Duration) -> Result<bool> {
        Ok(true)
    }

    /// Does the backend answer? One cheap round trip.
    fn ping(&self) -> Result<()>;

    /// The server instance a call would reach now (one cheap round trip);
    /// `None` where one instance does not answer for every key (in process,
    /// pools, clusters).
    fn instance(&self) -> Result<Option<Arc<str>>> {
        Ok(None)
    }

    /// Does one server instance answer for every key (so that
    /// [`instance`](Self::instance) says where a value is)?
    fn single_instance(&self) -> bool {
        false
    }

    /// `"memory"`, `"redis"` or `"memcached"`.
    fn name(&self) -> &'static str;

    /// The server's own counters (Redis `INFO`, memcached `stats`, the memory
    /// store's size), as name/value pairs, for operators.
    fn server_stats(&self) -> Result<Vec<(String, String)>>;

    /// Does this backend store anything? `false` for `none://`, whose
    /// generations never move: a render there is never shared with another
    /// reader (it could predate a commit that reader's bump followed).
    fn stores(&self) -> bool {
        true
    }

    /// Entries evicted to stay within a bound, where the backend knows.
    fn evictions(&self) -> u64 {
        0
    }
}

/// Keeps a decoded entry if it may be served from `instance`: versioned
/// entries only where they were stored (a restored snapshot's entries are
/// misses); plain entries anywhere.
#[cfg(any(feature = "redis", feature = "memcached"))]
pub(crate) fn same_instance(
    entry: Entry,
    from: Option<&str>,
    instance: &str,
) -> Option<Arc<Entry>> {
    if entry.version.is_some() && from != Some(instance) {
        return None;
    }
    Some(Arc::new(entry))
}

/// Turns the raw values of one fetch (generations first, then entries, each
/// with the server instance that answered) into a [`Fetched`]: generations
/// parsed, entries decoded and kept only where they may be served.
#[cfg(any(feature = "redis", feature = "memcached"))]
pub(crate) fn assemble(
    values: Vec<Option<(Vec<u8>, Arc<str>)>>,
    tokens: usize,
    instance: Option<Arc<str>>,
) -> Fetched {
    let mut values = values.into_iter();
    let gens = values
        .by_ref()
        .take(tokens)
        .map(|v| v.and_then(|(b, _)| parse_gen(&b)))
        .collect();
    let entries = values
        .map(|v| {
            v.and_then(|(b, from_instance)| {
                crate::codec::decode(bytes::Bytes::from(b)).and_then(|(e, stored_by)| {
                    same_instance(e, stored_by.as_deref(), &from_instance)
                })
            })
        })
        .collect();
    Fetched {
        gens,
        entries,
        instance,
    }
}

/// The backend keys of one fetch, generations first, then entries, all
/// under `prefix` (a [`keys::key_prefix`](crate::keys::key_prefix)).
#[cfg(any(feature = "redis", feature = "memcached"))]
pub(crate) fn fetch_keys(prefix: &str, tokens: &[&str], entries: &[Key<'_>]) -> Vec<String> {
    tokens
        .iter()
        .map(|t| crate::keys::encode(prefix, Key::gen_(t)))
        .chain(entries.iter().map(|k| crate::keys::encode(prefix, *k)))
        .collect()
}

/// [`assemble`] for values that all came from one server instance.
#[cfg(feature = "redis")]
pub(crate) fn assemble_from(
    values: Vec<Option<Vec<u8>>>,
    tokens: usize,
    instance: Arc<str>,
) -> Fetched {
    let tagged = values
        .into_iter()
        .map(|v| v.map(|b| (b, instance.clone())))
        .collect();
    assemble(tagged, tokens, Some(instance))
}

/// A backend spread over several servers (a memcached pool, a Redis
/// Cluster): it routes keys to shards, and everything but the parallel fetch
/// is the single-server operation run on each shard's keys.
#[cfg(feature = "redis")]
pub(crate) trait Sharded {
    /// The single-server backend of one shard.
    type Shard: Backend;

    /// Runs `f` on each shard with its keys (and their indices in `keys`);
    /// results in key order.
    fn per_shard<T: Clone + Default>(
        &self,
        keys: &[Key<'_>],
        f: impl Fn(&Self::Shard, &[Key<'_>], &[usize]) -> Result<Vec<T>>,
    ) -> Result<Vec<T>>;

    /// Changes whenever the routing changes: a block is stored only if it did
    /// not change since its version was read.
    fn guard(&self) -> Arc<str>;

    fn sharded_init_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        self.per_shard(gens, |s, group, idx| s.init_gens(group, &pick(fresh, idx)))
    }

    fn sharded_incr_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        self.per_shard(gens, |s, group, idx| s.incr_gens(group, &pick(fresh, idx)))
    }

    fn sharded_set(
        &self,
        key: Key<'_>,
        entry: Arc<Entry>,
        ttl: Option<Duration>,
        guard: Option<&str>,
    ) -> Result<bool> {
        if guard.is_some_and(|g| *g != *self.guard()) {
            return Ok(false);
        }
        let out = self.per_shard(&[key], |s, group, _| {
            Ok(vec![s.set(group[0], entry.clone(), ttl, None)?])
        })?;
        Ok(out.first().copied().unwrap_or(false))
    }

    fn sharded_lease(&self, key: Key<'_>, ttl: Duration) -> Result<bool> {
        let out = self.per_shard(&[key], |s, group, _| Ok(vec![s.lease(group[0], ttl)?]))?;
        Ok(out.first().copied().unwrap_or(false))
    }

    fn sharded_delete(&self, key: Key<'_>) -> Result<bool> {
        let out = self.per_shard(&[key], |s, group, _| Ok(vec![s.delete(group[0])?]))?;
        Ok(out.first().copied().unwrap_or(false))
    }
}

/// Splits a multi-key operation over shards (servers of a pool, nodes of a
/// cluster): `route[i]` is key `i`'s shard; `f` runs once per shard that has
/// keys, with their indices, and the results are put back in key order.
#[cfg(feature = "redis")]
pub(crate) fn by_shard<T: Clone + Default>(
    route: &[usize],
    shards: usize,
    mut f: impl FnMut(usize, &[usize]) -> Result<Vec<T>>,
) -> Result<Vec<T>> {
    let mut out = vec![T::default(); route.len()];
    for shard in 0..shards {
        let idx: Vec<usize> = (0..route.len()).filter(|&j| route[j] == shard).collect();
        if idx.is_empty() {
            continue;
        }
        for (j, v) in idx.iter().zip(f(shard, &idx)?) {
            out[*j] = v;
        }
    }
    Ok(out)
}

/// The items at `idx`.
#[cfg(any(feature = "redis", feature = "memcached"))]
pub(crate) fn pick<T: Copy>(items: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| items[i]).collect()
}

/// A fresh random generation, in `1..=2^62`: never 0, and with headroom so that
/// +1 bumps never overflow a signed 64-bit Redis integer.
pub(crate) fn fresh_generation() -> u64 {
    rand::random_range(1..=(1u64 << 62))
}

pub(crate) fn fresh_generations(n: usize) -> Vec<u64> {
    (0..n).map(|_| fresh_generation()).collect()
}

/// Parses a generation stored as decimal ASCII (Redis, memcached); anything
/// else (foreign bytes, 0) is "not ours".
#[cfg(any(feature = "redis", feature = "memcached"))]
pub(crate) fn parse_gen(bytes: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(bytes).ok()?.trim_end();
    match s.parse::<u64>() {
        Ok(0) | Err(_) => None,
        Ok(v) => Some(v),
    }
}
