//! The `ICache` handle: the seed's five methods, plain get/set, and their async
//! forms.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::backend::{self, Backend};
use crate::codec::{Entry, Payload};
use crate::config::{Config, Target};
use crate::core::Core;
use crate::error::{Error, Result};
use crate::fragment::{
    AsyncRole, Blocks, FOLLOWER_WAIT, Html, Lookup, Miss, PooledName, Rendered, SharedFrame, Strs,
    as_strs, emit_block, in_frame, leading, report, report_unknown, split_name, wants_reads,
};
use crate::keys::Key;
use crate::near::{Kind, Near};
use crate::observe::Outcome;
use crate::stats::{Event, Stats};
use std::sync::PoisonError;

/// A stored value as it was stored: text or bytes
/// ([`ICache::get_versioned_value`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Value {
    /// Stored as text (`set_versioned`).
    Text(Arc<str>),
    /// Stored as bytes (`set_versioned_bytes`).
    Bytes(Bytes),
    /// Stored as a Python pickle ([`ICache::set_versioned_pickle`]); the
    /// entry's header says so, so no `set_*_bytes` caller can make one.
    Pickle(Bytes),
}

/// A handle to a timeout-less cache. Cheap to clone; all clones share one
/// backend (and its connections).
///
/// See the [crate docs](crate) for the model and examples.
#[derive(Clone)]
pub struct ICache {
    inner: Arc<Inner>,
}

struct Inner {
    core: Core,
    blocks: Blocks,
}

impl fmt::Debug for ICache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ICache")
            .field("backend", &self.inner.core.backend.name())
            .field("url", &self.inner.core.config.redacted)
            .finish()
    }
}

impl Default for ICache {
    /// The in-process cache with default settings, as `memory://`.
    fn default() -> Self {
        ICache::memory()
    }
}

impl ICache {
    /// Opens a cache from a URL:
    ///
    /// | URL | backend |
    /// |---|---|
    /// | `memory://` , `memory://?max_bytes=N` | in-process, bounded by bytes (default 64 MiB) |
    /// | `redis://[user:password@]host[:port][/db]` | Redis (feature `redis`) |
    /// | `rediss://…` (`#insecure` to skip certificate checks) | Redis over TLS (feature `redis`) |
    /// | `redis+unix:///path/redis.sock[?db=N&user=U&pass=P]` | Redis over a Unix socket (feature `redis`) |
    /// | `memcached://host[:port]` | memcached (feature `memcached`) |
    /// | `memcached://h1:p1,h2:p2,…` | a memcached pool (rendezvous hashing) |
    /// | `redis+cluster://h1:p1,h2:p2,…` | Redis Cluster (feature `redis`) |
    /// | `redis+sentinel://[password@]h1:p1,h2:p2/MASTER_NAME[/db]` | Redis Sentinel: the master it names (feature `redis`) |
    /// | `none://` | no cache: every block renders, nothing is stored |
    ///
    /// Options for every scheme: `prefix=` (keeps apps apart on a shared
    /// server; any string: up to 64 printable ASCII bytes, colons included, are
    /// kept verbatim at the start of every key, anything else is hashed),
    /// `timeout_ms=` (one answer,
    /// default 100), `connect_timeout_ms=` (default 100), `pool_size=` (idle
    /// connections kept, default 8), `salt=` (a deploy salt, any string: mixed
    /// into every block's key, so another salt makes every block miss, while
    /// tokens, bumps and versioned entries stay shared; its value is not
    /// shown).
    ///
    /// Options of network backends: `near=entries|tracking|off` (what is also
    /// kept in process; default `entries`, see the crate docs' "near cache"),
    /// `near_max_bytes=` (its bound, default 64 MiB) and `max_lag_ms=` (the
    /// staleness bound of `near=tracking`, default 100). `near=tracking`
    /// needs a single Redis node; on memcached or a cluster it is a
    /// [`Config`](crate::ErrorKind::Config) error.
    ///
    /// `strict=true` (with `near=tracking`): bumps return `max_lag_ms`
    /// after the server applied them, so reads are never stale again
    /// ([`max_lag`](Self::max_lag) is zero). `fill=lease|local` (default
    /// `lease`: one render per block and version across processes, others
    /// wait at most `lease_ms=`, default 3000) and `stale=render` (serve the
    /// previous body while another process renders); see the README's
    /// "A fleet of app servers".
    ///
    /// Network backends connect lazily: opening never blocks, and a server that
    /// is down shows up as an error of the first operation. After a failure
    /// (time-out, refused), calls to that server fail at once for a back-off
    /// period (250 ms, doubling up to 4 s) while one probe at a time checks
    /// whether it is back ([`Error::is_circuit_open`]): a hung cache costs a
    /// page one time-out per back-off period, not one per lookup.
    ///
    /// Values of query options are never shown in errors, logs, [`url`](Self::url)
    /// or `Debug` unless the option is known to be harmless (`prefix`,
    /// `timeout_ms`, …): an unknown option could be a secret.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Config`](crate::ErrorKind::Config), with a message naming the
    /// offending part, for a malformed URL, an unknown scheme or option, or a
    /// scheme whose cargo feature is not enabled.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::from_url("memory://?max_bytes=1048576&prefix=shop")?;
    /// assert!(icache::ICache::from_url("memory://?colour=red").unwrap_err().is_config());
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn from_url(url: &str) -> Result<ICache> {
        let config = Config::parse(url)?;
        let near = Near::new(config.near, config.near_max_bytes, &config.prefix);
        // The `near=tracking` thread, kept alive by the handle.
        #[allow(unused_mut)]
        let mut tracking: Option<Box<dyn std::any::Any + Send + Sync>> = None;
        let backend: Box<dyn Backend> = match &config.target {
            Target::Memory { max_bytes } => Box::new(backend::memory::Memory::new(*max_bytes)?),
            Target::Nothing => Box::new(backend::none::Nothing),
            #[cfg(feature = "redis")]
            Target::Redis { .. } | Target::RedisSentinel(_) => {
                let redis = backend::redis::Redis::new(&config)?;
                if let Some(gens) = near.as_ref().and_then(|n| n.gens.clone()) {
                    let thread = backend::redis::tracking::start(redis.tracking_setup()?, gens)?;
                    tracking = Some(Box::new(thread));
                }
                Box::new(redis)
            }
            #[cfg(feature = "redis")]
            Target::RedisCluster { .. } => {
                Box::new(backend::redis::cluster::RedisCluster::new(&config)?)
            }
            #[cfg(feature = "memcached")]
            Target::Memcached { servers, .. } if servers.len() > 1 => {
                Box::new(backend::memcached::pool::MemcachedPool::new(&config)?)
            }
            #[cfg(feature = "memcached")]
            Target::Memcached { .. } => Box::new(backend::memcached::Memcached::new(&config)?),
            #[allow(unreachable_patterns)]
            _ => {
                let feature = match &config.target {
                    Target::Redis { .. }
                    | Target::RedisCluster { .. }
                    | Target::RedisSentinel(_) => "redis",
                    _ => "memcached",
                };
                return Err(Error::config(format!(
                    "{} needs icache's cargo feature {feature:?}, which is not enabled",
                    config.redacted
                )));
            }
        };
        let mut core = Core::new(backend, config, near);
        core._tracking = tracking;
        Ok(ICache {
            inner: Arc::new(Inner {
                core,
                blocks: Blocks::default(),
            }),
        })
    }

    /// Opens the cache named by the `ICACHE_URL` environment variable, or the
    /// in-process default (`memory://`) when it is unset or empty.
    ///
    /// # Example
    ///
    /// ```
    /// // With ICACHE_URL unset this is the in-process cache.
    /// let cache = icache::ICache::from_env()?;
    /// cache.incr("movies")?;
    /// # Ok::<(), icache::Error>(())
    /// ```
    ///
    /// The fallback is logged once per process as a warning: `memory://` is
    /// per process, so a deployment of several processes that forgot
    /// `ICACHE_URL` would have each process invalidate only its own cache.
    pub fn from_env() -> Result<ICache> {
        match std::env::var("ICACHE_URL") {
            Ok(url) if !url.trim().is_empty() => ICache::from_url(&url),
            _ => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        "icache: ICACHE_URL is not set; using the in-process cache (memory://), \
                         which other processes do not see: set ICACHE_URL=redis://… or \
                         memcached://… when several processes serve the same data"
                    );
                });
                ICache::from_url("memory://")
            }
        }
    }

    /// The in-process cache with default settings (64 MiB).
    pub fn memory() -> ICache {
        // The default configuration always parses and always builds; fall back
        // to a tiny store rather than panic should that ever change.
        ICache::from_url("memory://").unwrap_or_else(|_| {
            ICache::from_url("memory://?max_bytes=1048576")
                .unwrap_or_else(|e| unreachable!("memory backend cannot fail to build: {e}"))
        })
    }

    /// `"memory"`, `"redis"`, `"redis-cluster"`, `"memcached"` (one server or
    /// a pool) or `"none"`.
    pub fn backend_name(&self) -> &'static str {
        self.inner.core.backend.name()
    }

    /// The URL this cache was opened with, password replaced by `***`.
    pub fn url(&self) -> &str {
        &self.inner.core.config.redacted
    }

    /// How long after a bump completed a read may still return output from
    /// before it: zero (never stale), except under `near=tracking`, where it
    /// is `max_lag_ms`.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// assert!(cache.max_lag().is_zero());
    /// ```
    pub fn max_lag(&self) -> Duration {
        match self.inner.core.config.near {
            // strict=true: a bump returns only once no reader can miss it.
            crate::config::Near::Tracking { .. } if self.inner.core.config.strict => Duration::ZERO,
            crate::config::Near::Tracking { max_lag } => max_lag,
            _ => Duration::ZERO,
        }
    }

    /// The configured time-out for one backend answer.
    pub fn timeout(&self) -> Duration {
        self.inner.core.config.timeout
    }

    /// The backend's own counters as name/value pairs: Redis `INFO` (memory,
    /// hits, evictions, keyspace), memcached `stats`, or the memory store's
    /// size and evictions. For operators (`icache stats`).
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// let stats = cache.server_stats()?;
    /// assert!(stats.iter().any(|(k, _)| k == "entries"));
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn server_stats(&self) -> Result<Vec<(String, String)>> {
        self.inner.core.backend.server_stats()
    }

    /// One round trip to the backend: `Ok` if it answers.
    pub fn ping(&self) -> Result<()> {
        self.inner.core.backend.ping()
    }

    /// A snapshot of this cache's counters (shared by all clones of the handle).
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// for _ in 0..2 {
    ///     cache.fragment("list", &["movies"], || Ok::<_, std::convert::Infallible>("<ul/>".to_string()))?;
    /// }
    /// let stats = cache.stats();
    /// assert_eq!((stats.hits, stats.misses), (1, 1));
    /// # Ok::<(), std::convert::Infallible>(())
    /// ```
    pub fn stats(&self) -> Stats {
        let core = &self.inner.core;
        core.counters.snapshot(
            core.backend.evictions(),
            core.near.as_ref().map_or(0, Near::bytes),
        )
    }

    // ---- generations -------------------------------------------------------

    /// Bumps the generation of `token`: every value stored under a version that
    /// includes this token is outdated from now on. Call it **after** the
    /// database commit that changed the data.
    ///
    /// Atomic in the backend: concurrent bumps are never lost. A token that has
    /// no generation yet (never used, evicted, lost in a restart) gets a fresh
    /// random one, never 0. Returns the new generation.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// let before = cache.get_sum(&["movies"])?;
    /// let now = cache.incr("movies")?;
    /// assert_eq!(now, before + 1);
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn incr(&self, token: &str) -> Result<u64> {
        let mut out = self.incr_many(&[token])?;
        out.pop()
            .ok_or_else(|| Error::new(crate::ErrorKind::Backend, "backend returned no generation"))
    }

    /// Bumps several tokens at once, in one round trip (pipelined on Redis and
    /// memcached). Each bump is atomic; the set of them is not a transaction.
    /// Returns the new generations, in order.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// let v = cache.get_sum(&["movies", "user:42"])?;
    /// cache.incr_many(&["movies", "user:42"])?;
    /// assert_eq!(cache.get_sum(&["movies", "user:42"])?, v.wrapping_add(2));
    /// # Ok::<(), icache::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// When the backend cannot be reached the bump is reported as an error
    /// **and** remembered: this handle replays it before it reads any
    /// generation again (and renders blocks uncached until it could), so the
    /// outage cannot make it serve what the bump invalidated.
    pub fn incr_many(&self, tokens: &[&str]) -> Result<Vec<u64>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let core = &self.inner.core;
        if let Some(lease) = core.config.lease {
            // Before the bump: a read racing it must not get an old body.
            core.bumps.bumped(tokens, lease);
        }
        let gens = core.incr_many(tokens)?;
        crate::strict::after_bump(&core.config);
        Ok(gens)
    }

    /// The token every cached block depends on besides its own:
    /// [`flush`](Self::flush) bumps it (so `icache bump icache:flush` is a
    /// flush too). Add it to the tokens of your own versioned entries for
    /// `flush` to reach them.
    pub const FLUSH_TOKEN: &'static str = "icache:flush";

    /// Whether bumps that failed wait in this handle to be replayed (they
    /// are, before its next read or bump). For work that must follow a
    /// bump's replay, such as the purge of a proxy's pages
    /// (`icache_http::Purger::defer`). One atomic load.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// cache.incr("movies")?;
    /// assert!(!cache.has_pending_bumps());
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn has_pending_bumps(&self) -> bool {
        self.inner.core.has_pending()
    }

    /// Makes **every cached block miss once**, on every handle and process
    /// that shares this backend and prefix: one bump of
    /// [`FLUSH_TOKEN`](Self::FLUSH_TOKEN), whose generation is part of every
    /// block's version (read with the block's own generations: no extra
    /// round trip; kept and invalidated like any token under
    /// `near=tracking`). For what no token or digest can see: a deploy that
    /// changed a helper, a fix in a template's data. Nothing is deleted:
    /// entries are replaced by the next render, or evicted.
    ///
    /// Versioned entries ([`set_versioned`](Self::set_versioned)) carry the
    /// version their caller computed, so a flush reaches them only if that
    /// version includes `FLUSH_TOKEN`; plain `set` values are not touched.
    /// Returns the flush token's new generation. Errors and replays as
    /// [`incr`](Self::incr).
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// let render = || Ok::<_, std::fmt::Error>("<ul/>".to_string());
    /// cache.fragment("list", &["movies"], render)?;
    /// cache.flush()?;
    /// // Rendered once more, then a hit again.
    /// let mut ran = 0;
    /// for _ in 0..2 {
    ///     cache.fragment("list", &["movies"], || { ran += 1; render() })?;
    /// }
    /// assert_eq!(ran, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn flush(&self) -> Result<u64> {
        self.incr(Self::FLUSH_TOKEN)
    }

    /// A block's identity and tokens as the engine keys them: the handle's
    /// `?salt=` first in the identity (another salt, another key), the
    /// flush token after the tokens (a flush, another version). No
    /// allocation for short lists.
    pub(crate) fn keyed<R>(
        &self,
        identity: &[&str],
        tokens: &[&str],
        f: impl FnOnce(&[&str], &[&str]) -> R,
    ) -> R {
        const N: usize = 8;
        let salt = self.inner.core.config.salt.as_deref();
        let (mut ibuf, ivec): ([&str; N], Vec<&str>);
        let identity: &[&str] = match salt {
            None => identity,
            Some(salt) if identity.len() + 2 <= N => {
                ibuf = [""; N];
                ibuf[0] = "salt";
                ibuf[1] = salt;
                ibuf[2..2 + identity.len()].copy_from_slice(identity);
                &ibuf[..2 + identity.len()]
            }
            Some(salt) => {
                ivec = ["salt", salt]
                    .into_iter()
                    .chain(identity.iter().copied())
                    .collect();
                &ivec
            }
        };
        let (mut tbuf, tvec): ([&str; N], Vec<&str>);
        let tokens: &[&str] = if tokens.len() < N {
            tbuf = [""; N];
            tbuf[..tokens.len()].copy_from_slice(tokens);
            tbuf[tokens.len()] = Self::FLUSH_TOKEN;
            &tbuf[..=tokens.len()]
        } else {
            tvec = tokens.iter().copied().chain([Self::FLUSH_TOKEN]).collect();
            &tvec
        };
        f(identity, tokens)
    }

    /// Drops a token's generation, as an eviction or a server restart would.
    /// Everything stored under it becomes outdated: the next read starts the
    /// token at a fresh random value. Prefer [`incr`](Self::incr); this exists
    /// for operators and for tests of the eviction path. `true` if a
    /// generation was there.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// let v = cache.get_sum(&["movies"])?;
    /// cache.set_versioned("list", "<ul/>", v)?;
    /// assert!(cache.forget_token("movies")?);
    /// assert_eq!(cache.get_versioned("list", cache.get_sum(&["movies"])?)?, None);
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn forget_token(&self, token: &str) -> Result<bool> {
        let out = self.inner.core.backend.delete(Key::gen_(token));
        self.inner.core.forget_local(&[token]);
        out
    }

    /// The current generation of each token, in order (missing ones are
    /// initialised to fresh random values). One round trip when all exist.
    pub fn generations(&self, tokens: &[&str]) -> Result<Vec<u64>> {
        self.inner.core.generations(tokens)
    }

    /// The version of a set of tokens: the wrapping sum of their generations.
    /// One round trip (plus one to initialise tokens seen for the first time).
    ///
    /// Generations start at random values in 1..=2^62 and only ever move by +1
    /// or to a new random value, so a version returns to an earlier value only
    /// by chance: about 2^-62 per comparison, even after evictions and restarts.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// let v1 = cache.get_sum(&["movies", "user:42"])?;
    /// assert_ne!(v1, 0);
    /// assert_eq!(cache.get_sum(&["movies", "user:42"])?, v1); // stable until a bump
    /// cache.incr("user:42")?;
    /// assert_ne!(cache.get_sum(&["movies", "user:42"])?, v1);
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn get_sum(&self, tokens: &[&str]) -> Result<u64> {
        if tokens.is_empty() {
            return Ok(0);
        }
        self.inner.core.replay_pending()?;
        if let Some((gens, _)) = self.inner.core.local_gens(tokens) {
            return Ok(gens.into_iter().fold(0, u64::wrapping_add));
        }
        let gens = self.inner.core.fetch(tokens, &[])?.gens;
        // Hot path: every generation was there; no second pass, no allocation.
        let mut sum = 0u64;
        for g in &gens {
            match g {
                Some(g) => sum = sum.wrapping_add(*g),
                None => {
                    return Ok(self
                        .inner
                        .core
                        .complete_gens(tokens, gens)?
                        .into_iter()
                        .fold(0, u64::wrapping_add));
                }
            }
        }
        Ok(sum)
    }

    // ---- versioned entries -------------------------------------------------

    /// Stores `value` under `key` together with the `version` it was computed
    /// from (read that version with [`get_sum`](Self::get_sum) **before** reading
    /// the data). Any key string and any value size the backend accepts.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::TooLarge`](crate::ErrorKind::TooLarge) when the backend
    /// refuses the size; the network kinds when it cannot be reached.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// let version = cache.get_sum(&["movies", "user:42"])?;
    /// cache.set_versioned("movies#42", "<ul>…</ul>", version)?;
    /// assert_eq!(cache.get_versioned("movies#42", version)?.as_deref(), Some("<ul>…</ul>"));
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn set_versioned(&self, key: &str, value: impl AsRef<str>, version: u64) -> Result<()> {
        self.store_versioned(key, Payload::Text(Arc::from(value.as_ref())), version)
    }

    /// [`set_versioned`](Self::set_versioned) for bytes.
    pub fn set_versioned_bytes(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        version: u64,
    ) -> Result<()> {
        self.store_versioned(key, Payload::Bytes(value.into()), version)
    }

    /// [`set_versioned_bytes`](Self::set_versioned_bytes) for the Python
    /// binding (`django_icache`): the entry's header marks `pickle` as a Python
    /// pickle, the only kind of entry the binding unpickles. Bytes stored any
    /// other way come back as bytes, whatever they start with. Rust readers
    /// get the pickle's bytes from [`get_versioned_bytes`](Self::get_versioned_bytes),
    /// and [`Value::Pickle`] from [`get_versioned_value`](Self::get_versioned_value).
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// cache.set_versioned_pickle("k", &b"\x80\x05K\x01."[..], 1)?;
    /// cache.set_versioned_bytes("j", &b"\x80\x05K\x01."[..], 1)?;
    /// assert!(matches!(cache.get_versioned_value("k", 1)?, Some(icache::Value::Pickle(_))));
    /// assert!(matches!(cache.get_versioned_value("j", 1)?, Some(icache::Value::Bytes(_))));
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn set_versioned_pickle(
        &self,
        key: &str,
        pickle: impl Into<Bytes>,
        version: u64,
    ) -> Result<()> {
        self.store_versioned(key, Payload::Pickle(pickle.into()), version)
    }

    fn store_versioned(&self, key: &str, payload: Payload, version: u64) -> Result<()> {
        if let Some(near) = &self.inner.core.near {
            near.drop_body(Kind::Versioned, key);
        }
        self.inner
            .core
            .backend
            .set(
                Key::versioned(key),
                Arc::new(Entry::versioned(payload, version)),
                None,
                None,
            )
            .map(drop)
    }

    /// The value stored by [`set_versioned`](Self::set_versioned) under `key`,
    /// if it was stored with exactly `version`; `None` otherwise (never stored,
    /// evicted, stored under another version, or not text).
    ///
    /// Unlike the seed, a mismatching entry is **not deleted**: deleting costs a
    /// round trip, and a slow reader holding an old version would delete the
    /// entry that a faster reader had just stored for the current one. An
    /// outdated entry is overwritten by the next `set_versioned` of its key, or
    /// evicted by the backend when memory is needed.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// cache.set_versioned("k", "old", 1)?;
    /// assert_eq!(cache.get_versioned("k", 2)?, None);
    /// assert_eq!(cache.get_versioned("k", 1)?.as_deref(), Some("old"));
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn get_versioned(&self, key: &str, version: u64) -> Result<Option<Arc<str>>> {
        Ok(self
            .load_versioned(key, version)?
            .and_then(Payload::into_text))
    }

    /// [`get_versioned`](Self::get_versioned) for bytes (text values come back
    /// as their UTF-8 bytes).
    pub fn get_versioned_bytes(&self, key: &str, version: u64) -> Result<Option<Bytes>> {
        Ok(self.load_versioned(key, version)?.map(Payload::into_bytes))
    }

    /// [`get_versioned`](Self::get_versioned) that says which kind of value
    /// was stored: [`Value::Text`] for [`set_versioned`](Self::set_versioned),
    /// [`Value::Bytes`] for [`set_versioned_bytes`](Self::set_versioned_bytes)
    /// (for bindings that must give back the type they were given).
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// cache.set_versioned_bytes("k", &b"abc"[..], 1)?;
    /// assert_eq!(cache.get_versioned_value("k", 1)?, Some(icache::Value::Bytes(icache::Bytes::from_static(b"abc"))));
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn get_versioned_value(&self, key: &str, version: u64) -> Result<Option<Value>> {
        Ok(self
            .load_versioned(key, version)?
            .map(|payload| match payload {
                Payload::Text(s) => Value::Text(s),
                Payload::Bytes(b) => Value::Bytes(b),
                Payload::Pickle(b) => Value::Pickle(b),
            }))
    }

    fn load_versioned(&self, key: &str, version: u64) -> Result<Option<Payload>> {
        let core = &self.inner.core;
        let Some(near) = core
            .near
            .as_ref()
            .filter(|_| core.backend.single_instance())
        else {
            return Ok(match core.backend.get_entry(Key::versioned(key))? {
                Some(entry) if entry.version == Some(version) => Some(entry.payload.clone()),
                _ => None,
            });
        };
        // An entry never changes under its (key, version, instance): the
        // copy kept here serves while the server is the one it came from
        // (known without a round trip under near=tracking, else asked).
        if let Some(held) = near.get(Kind::Versioned, key)
            && held.entry.version == Some(version)
        {
            let now = match core.tracked_instance() {
                Some(i) => Some(i),
                None => core.backend.instance()?,
            };
            if now.as_deref() == Some(&*held.instance) {
                core.counters.count(Event::NearHit);
                return Ok(Some(held.entry.payload.clone()));
            }
            core.counters.count(Event::BodyFetch);
        } else {
            core.counters.count(Event::NearMiss);
        }
        let fetched = core.backend.fetch(&[], &[Key::versioned(key)])?;
        Ok(match fetched.entries.into_iter().next().flatten() {
            Some(entry) if entry.version == Some(version) => {
                let payload = entry.payload.clone();
                core.keep_near(Kind::Versioned, key, fetched.instance.as_ref(), entry);
                Some(payload)
            }
            _ => None,
        })
    }

    // ---- plain caching -----------------------------------------------------

    /// Plain caching beside the versioned kind ("you can use it for additional
    /// caching as well"): stores `value` under `key`, for `ttl` if given,
    /// otherwise until evicted. Plain keys never meet versioned keys or tokens.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// let cache = icache::ICache::memory();
    /// cache.set("greeting", "hello", None)?;
    /// cache.set("otp", "123456", Some(Duration::from_secs(30)))?;
    /// assert_eq!(cache.get("greeting")?.as_deref(), Some("hello"));
    /// assert!(cache.delete("greeting")?);
    /// assert_eq!(cache.get("greeting")?, None);
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn set(&self, key: &str, value: impl AsRef<str>, ttl: Option<Duration>) -> Result<()> {
        self.store_plain(key, Payload::Text(Arc::from(value.as_ref())), ttl)
    }

    /// [`set`](Self::set) for bytes.
    pub fn set_bytes(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.store_plain(key, Payload::Bytes(value.into()), ttl)
    }

    fn store_plain(&self, key: &str, payload: Payload, ttl: Option<Duration>) -> Result<()> {
        if ttl.is_some_and(|t| t.is_zero()) {
            // Expires at once: store nothing, and drop what was there.
            self.inner.core.backend.delete(Key::plain(key))?;
            return Ok(());
        }
        self.inner
            .core
            .backend
            .set(Key::plain(key), Arc::new(Entry::plain(payload)), ttl, None)
            .map(drop)
    }

    /// The text stored by [`set`](Self::set), if any (bytes that are not UTF-8
    /// read as `None`; use [`get_bytes`](Self::get_bytes)).
    pub fn get(&self, key: &str) -> Result<Option<Arc<str>>> {
        Ok(self.get_many(&[key])?.pop().flatten())
    }

    /// The bytes stored by [`set_bytes`](Self::set_bytes) or [`set`](Self::set).
    pub fn get_bytes(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.get_many_bytes(&[key])?.pop().flatten())
    }

    /// Several plain values in one round trip, in order.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// cache.set("a", "1", None)?;
    /// let got = cache.get_many(&["a", "b"])?;
    /// assert_eq!(got[0].as_deref(), Some("1"));
    /// assert_eq!(got[1], None);
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Arc<str>>>> {
        Ok(self
            .load_plain(keys)?
            .into_iter()
            .map(|p| p.and_then(Payload::into_text))
            .collect())
    }

    /// [`get_many`](Self::get_many) for bytes.
    pub fn get_many_bytes(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        Ok(self
            .load_plain(keys)?
            .into_iter()
            .map(|p| p.map(Payload::into_bytes))
            .collect())
    }

    fn load_plain(&self, keys: &[&str]) -> Result<Vec<Option<Payload>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<Key<'_>> = keys.iter().map(|k| Key::plain(k)).collect();
        let fetched = self.inner.core.backend.fetch(&[], &keys)?;
        Ok(fetched
            .entries
            .into_iter()
            .map(|e| match e {
                Some(entry) if entry.version.is_none() => Some(entry.payload.clone()),
                _ => None,
            })
            .collect())
    }

    /// Removes a plain value; `true` if one was there.
    pub fn delete(&self, key: &str) -> Result<bool> {
        self.inner.core.backend.delete(Key::plain(key))
    }
}

/// Cached blocks: the seed's `{% icache %}` for any renderer. The engine is
/// `Blocks` (`fragment.rs`); these are its public doors.
impl ICache {
    /// Caches the output of `render` until a token in `tokens` is bumped: the
    /// seed's `{% icache token… %}` block, for any renderer (Askama, Maud,
    /// hand-written HTML).
    ///
    /// Every token is part of the entry's key and of its version. The version
    /// is read before `render` runs; on a hit `render` is not called at all.
    /// On a miss it runs once per process for all the threads that miss the
    /// same fragment at once, and its output is stored only if no token moved
    /// while it ran. Fragments rendered inside `render` (nested blocks) add
    /// their tokens to this one's.
    ///
    /// Backend trouble never becomes an error here: the body is rendered
    /// uncached (fail-open), a warning is logged at most every 10 s, and
    /// [`Stats::errors`](crate::Stats::errors) counts it. The closure's own
    /// error comes back unchanged and nothing is stored.
    ///
    /// **What identifies the block:** `name` and the tokens, nothing else,
    /// as every cache takes a key. Blocks with different names never share
    /// an entry, whatever their tokens (so a helper of yours that wraps this
    /// call keeps its callers' blocks apart by the name they pass); calls
    /// with the same name and tokens share one entry wherever they are.
    ///
    /// `tokens` is any slice of strings: `&["movies", &user_id]`, a
    /// `&Vec<String>`, a `&[String; N]`. Up to 16 tokens are looked up
    /// without a heap allocation.
    ///
    /// # Example
    ///
    /// ```
    /// # fn render_list(db: &str) -> Result<String, std::fmt::Error> { Ok(format!("<ul>{db}</ul>")) }
    /// # let db = "movies";
    /// let cache = icache::ICache::memory();
    /// let user_id = 42.to_string();
    /// let page = |render: &dyn Fn() -> Result<String, std::fmt::Error>| {
    ///     cache.fragment("movie-list", &["movies", &user_id], || render())
    /// };
    /// let html = page(&|| render_list(&db))?;
    /// assert_eq!(html, "<ul>movies</ul>");
    /// // Hit: the closure is not called.
    /// assert_eq!(page(&|| unreachable!())?, html);
    /// // Another name is another block, with the same tokens.
    /// let count = cache.fragment("movie-count", &["movies", &user_id], || Ok::<_, std::fmt::Error>("3".into()))?;
    /// assert_eq!(count, "3");
    /// // Owned tokens work as they are.
    /// let owned: Vec<String> = vec!["movies".into(), user_id.clone()];
    /// assert_eq!(cache.fragment("movie-list", &owned, || render_list("not run"))?, html);
    /// # Ok::<(), std::fmt::Error>(())
    /// ```
    pub fn fragment<E, T: AsRef<str>>(
        &self,
        name: &str,
        tokens: &[T],
        render: impl FnOnce() -> Result<String, E>,
    ) -> Result<String, E> {
        let (mut buf, mut heap) = ([""; 16], Vec::new());
        let tokens = as_strs(tokens, &mut buf, &mut heap);
        self.block(&["named", name], tokens, render)
    }

    /// [`fragment`](Self::fragment), handing out the stored text itself:
    /// on a hit an `Arc<str>` shared with the cache, no copy. The cheapest
    /// hit, for callers that only write the text out (a response body,
    /// another template's output).
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// let render = || Ok::<_, std::fmt::Error>("<ul/>".to_string());
    /// let first = cache.fragment_arc("list", &["movies"], render)?;
    /// let hit = cache.fragment_arc("list", &["movies"], render)?;
    /// assert_eq!(&*hit, "<ul/>");
    /// assert!(std::sync::Arc::ptr_eq(&hit, &cache.fragment_arc("list", &["movies"], render)?));
    /// # let _ = first;
    /// # Ok::<(), std::fmt::Error>(())
    /// ```
    pub fn fragment_arc<E, T: AsRef<str>>(
        &self,
        name: &str,
        tokens: &[T],
        render: impl FnOnce() -> Result<String, E>,
    ) -> Result<Arc<str>, E> {
        let (mut buf, mut heap) = ([""; 16], Vec::new());
        Ok(
            match self.block_html(
                &["named", name],
                as_strs(tokens, &mut buf, &mut heap),
                render,
            )? {
                Html::Cached(html) => html,
                Html::Rendered(html) => Arc::from(html),
            },
        )
    }

    /// The async form of [`fragment`](Self::fragment), for a body that awaits.
    ///
    /// A hit that needs no I/O (the memory backend, a near copy confirmed by
    /// the `near=tracking` table) runs inline on the calling task; a lookup
    /// or a store that talks to a network backend runs on tokio's blocking
    /// pool, so the executor is never blocked. Concurrent misses of the same
    /// block are merged as in the sync API: one task renders, the others
    /// wait (without blocking a thread, at most 10 s) and take its output; a
    /// task that is itself rendering an async block never waits for another
    /// one (it renders), so async blocks nested in each other cannot
    /// deadlock.
    ///
    /// Blocks rendered inside the body, async or sync, on whichever thread
    /// each poll of the body runs (and in [`minijinja::render_async`]), add
    /// their tokens to this one's, as in the sync API; an inner block that
    /// fails keeps this one from being stored.
    ///
    /// Identified like [`fragment`](Self::fragment): `name` and tokens (the
    /// sync and the async form of one name share entries).
    ///
    /// [`minijinja::render_async`]: crate::minijinja::render_async
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), std::fmt::Error> {
    /// # async fn load_movies() -> Vec<String> { vec!["Alien".into()] }
    /// let cache = icache::ICache::memory();
    /// let user_id = "42".to_string();
    /// let page = || cache.fragment_async("page", &["page"], || async {
    ///     let list = cache
    ///         .fragment_async("movie-list", &["movies", &user_id], || async {
    ///             Ok::<_, std::fmt::Error>(format!("<ul>{}</ul>", load_movies().await.len()))
    ///         })
    ///         .await?;
    ///     Ok::<_, std::fmt::Error>(format!("<main>{list}</main>"))
    /// });
    /// assert_eq!(page().await?, "<main><ul>1</ul></main>");
    /// // The outer block depends on the inner one's tokens too.
    /// cache.incr_async("movies").await.map_err(|_| std::fmt::Error)?;
    /// let (html, events) = icache::observe_async(page()).await;
    /// assert_eq!(html?, "<main><ul>1</ul></main>");
    /// assert_eq!(events.last().map(|e| e.outcome), Some(icache::Outcome::Stored));
    /// # Ok(()) }
    /// ```
    pub fn fragment_async<'a, E, F, Fut, T>(
        &'a self,
        name: &str,
        tokens: &[T],
        render: F,
    ) -> impl Future<Output = Result<String, E>> + 'a
    where
        T: AsRef<str>,
        F: FnOnce() -> Fut + 'a,
        Fut: Future<Output = Result<String, E>> + 'a,
        E: 'a,
    {
        // The block's name holds its identity and tokens: built now, it is
        // all the future needs to own (the tokens need not outlive this call,
        // and are read back from it without a copy).
        // Keyed as the sync engine keys blocks (see `keyed`): the salt in the
        // identity, the flush token among the tokens.
        let name = self.keyed(&["named", name], Strs::of(tokens).get(), PooledName::new);
        async move {
            let (parts, count) = split_name(&name);
            let (identity, tokens) = parts.get().split_at(count);
            let out = self.block_async(&name, identity, tokens, render).await;
            if out.is_err() {
                emit_block(identity, tokens, Outcome::Failed, None, false, None, &[]);
            }
            out
        }
    }

    /// The async engine: the lookup inline when it needs no I/O, otherwise
    /// off the executor; the body awaited here in a frame of its own;
    /// concurrent misses merged.
    pub(crate) async fn block_async<E, F, Fut>(
        &self,
        name: &str,
        identity: &[&str],
        tokens: &[&str],
        render: F,
    ) -> Result<String, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<String, E>>,
    {
        let (core, blocks) = (&self.inner.core, &self.inner.blocks);
        let counters = &core.counters;
        let event = |outcome, version, invalidated, took, reads: &[(Box<str>, u64)]| {
            emit_block(identity, tokens, outcome, version, invalidated, took, reads);
        };
        let lookup = match blocks.lookup_local(core, name, tokens) {
            Some(lookup) => lookup,
            None => {
                // Asked here, in this task's poll: the blocking thread the
                // lookup runs on renders nothing, and a hit without its reads
                // would leave the enclosing block stored without this one's
                // tokens (a bump of them would never replace it).
                let with_reads = wants_reads();
                let (name, tokens) = (name.to_owned(), owned(tokens));
                self.off_executor_infallible(move |c| {
                    c.inner
                        .blocks
                        .lookup_with(&c.inner.core, &name, &borrowed(&tokens), with_reads)
                })
                .await
            }
        };
        let miss = match lookup {
            Lookup::Hit {
                html,
                reads,
                version,
            } => {
                counters.count(Event::Hit);
                report(&reads);
                event(Outcome::Hit, Some(version), false, None, &reads);
                return Ok(html.to_string());
            }
            Lookup::Down => {
                report_unknown();
                let started = Instant::now();
                let html = render().await;
                let took = started.elapsed();
                counters.rendered(took);
                event(Outcome::Uncached, None, false, Some(took), &[]);
                return html;
            }
            Lookup::Miss(miss) => miss,
        };
        counters.count(Event::Miss);
        let invalidated = miss.invalidated;
        let stores = core.backend.stores();
        let role = if stores {
            blocks
                .async_flights
                .join((name.to_owned(), miss.own_version, miss.instance.clone()))
        } else {
            // `none://`: never shared (see the sync engine).
            AsyncRole::Alone
        };
        let leader = match role {
            AsyncRole::Follower(flight) => {
                // As in the sync engine: the leader's output only if all it
                // depends on is known and no nested token moved since.
                if let Some(rendered) = flight.wait(FOLLOWER_WAIT).await
                    && !rendered.unknown
                    && self.still_current_async(tokens, &rendered).await
                {
                    counters.count(Event::Shared);
                    rendered.report();
                    event(
                        Outcome::Shared,
                        Some(rendered.version),
                        invalidated,
                        None,
                        &rendered.reads,
                    );
                    return Ok(rendered.html.clone());
                }
                // The leader failed, took too long, or is outdated: render here.
                None
            }
            AsyncRole::Leader(guard) => Some(guard),
            AsyncRole::Alone => None,
        };
        let frame = SharedFrame::default();
        let started = Instant::now();
        let out = leading(in_frame(frame.clone(), render())).await;
        let nested = std::mem::take(&mut *frame.lock().unwrap_or_else(PoisonError::into_inner));
        let took = started.elapsed();
        counters.rendered(took);
        let html = match out {
            Ok(html) => html,
            Err(e) => {
                // See the sync engine: a caught error leaves tokens unknown.
                report_unknown();
                drop(leader);
                return Err(e);
            }
        };
        let rendered = {
            let (name, tokens) = (name.to_owned(), owned(tokens));
            let Miss {
                own,
                own_version,
                instance,
                ..
            } = miss;
            self.off_executor_infallible(move |c| {
                c.inner.blocks.rendered(
                    &c.inner.core,
                    &name,
                    &borrowed(&tokens),
                    (own, own_version, instance),
                    nested,
                    took,
                    html,
                )
            })
            .await
        };
        let rendered = Arc::new(rendered);
        rendered.report();
        if let Some(guard) = leader {
            guard.publish(Some(rendered.clone()));
        }
        let outcome = match (stores, rendered.not_stored) {
            (false, _) => Outcome::Off,
            (true, None) => Outcome::Stored,
            (true, Some(why)) => Outcome::NotStored(why),
        };
        let reads: &[(Box<str>, u64)] = if stores { &rendered.reads } else { &[] };
        event(
            outcome,
            Some(rendered.version),
            invalidated,
            Some(took),
            reads,
        );
        Ok(rendered.html.clone())
    }

    /// [`Blocks::still_current`] without blocking the executor (no I/O at
    /// all when the leader read no nested token).
    async fn still_current_async(&self, tokens: &[&str], rendered: &Arc<Rendered>) -> bool {
        let own = tokens.len();
        if rendered.reads.len() <= own && rendered.reads.iter().all(|(t, _)| tokens.contains(&&**t))
        {
            return true;
        }
        let (tokens, rendered) = (owned(tokens), rendered.clone());
        self.off_executor_infallible(move |c| {
            c.inner
                .blocks
                .still_current(&c.inner.core, &borrowed(&tokens), &rendered.reads)
        })
        .await
    }

    /// The engine of every cached block: `identity` tells blocks apart,
    /// `tokens` are its arguments (key and version).
    pub(crate) fn block<E>(
        &self,
        identity: &[&str],
        tokens: &[&str],
        render: impl FnOnce() -> Result<String, E>,
    ) -> Result<String, E> {
        self.block_html(identity, tokens, render)
            .map(Html::into_string)
    }

    /// [`block`](Self::block), handing out the stored text itself on a hit
    /// (no copy), for callers that can use it as it is.
    pub(crate) fn block_html<E>(
        &self,
        identity: &[&str],
        tokens: &[&str],
        render: impl FnOnce() -> Result<String, E>,
    ) -> Result<Html, E> {
        self.keyed(identity, tokens, |identity, tokens| {
            let out = self
                .inner
                .blocks
                .block_html(&self.inner.core, identity, tokens, render);
            if out.is_err() {
                // An observer (a page's ETag) must know: a caller's fallback
                // in its place depends on tokens nobody recorded.
                emit_block(identity, tokens, Outcome::Failed, None, false, None, &[]);
            }
            out
        })
    }
}

/// The async API: the same operations for async handlers.
///
/// On the memory backend they run inline (they never block). On network
/// backends they run the blocking client on tokio's blocking pool
/// (`spawn_blocking`), so the executor's threads are never blocked; outside a
/// tokio runtime they simply run inline.
impl ICache {
    async fn off_executor<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&ICache) -> Result<T> + Send + 'static,
    {
        self.off_executor_infallible(f).await
    }

    /// Runs `f` where it cannot block an async executor: inline for the
    /// in-process backends (they never block) or outside a tokio runtime,
    /// else on tokio's blocking pool. A panic in `f` resumes in the caller,
    /// as it would in a sync call.
    pub(crate) async fn off_executor_infallible<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&ICache) -> T + Send + 'static,
    {
        if self.is_in_process() {
            return f(self);
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let this = self.clone();
                match handle.spawn_blocking(move || f(&this)).await {
                    Ok(v) => v,
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                }
            }
            Err(_) => f(self),
        }
    }

    /// The block engine (for the template integrations).
    #[cfg(feature = "tera")]
    pub(crate) fn blocks(&self) -> &Blocks {
        &self.inner.blocks
    }

    /// The shared core (for the template integrations).
    #[cfg(feature = "tera")]
    pub(crate) fn core(&self) -> &Core {
        &self.inner.core
    }

    /// The memory and `none://` backends: no I/O, nothing ever blocks.
    pub(crate) fn is_in_process(&self) -> bool {
        self.inner.core.is_in_process()
    }

    /// Does a hit hand out text kept in this process (the same `Arc` on
    /// every hit of one version): the memory backend, or the near cache?
    #[cfg_attr(not(feature = "minijinja"), allow(dead_code))]
    pub(crate) fn keeps_bodies_in_process(&self) -> bool {
        self.is_in_process() || self.inner.core.near.is_some()
    }

    /// Async [`incr`](Self::incr).
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> icache::Result<()> {
    /// let cache = icache::ICache::memory();
    /// let g = cache.incr_async("movies").await?;
    /// assert_eq!(cache.get_sum_async(&["movies"]).await?, g);
    /// # Ok(()) }
    /// ```
    pub async fn incr_async(&self, token: &str) -> Result<u64> {
        let token = token.to_owned();
        self.off_executor(move |c| c.incr(&token)).await
    }

    /// Async [`flush`](Self::flush).
    pub async fn flush_async(&self) -> Result<u64> {
        self.off_executor(|c| c.flush()).await
    }

    /// Async [`incr_many`](Self::incr_many).
    pub async fn incr_many_async(&self, tokens: &[&str]) -> Result<Vec<u64>> {
        let tokens = owned(tokens);
        self.off_executor(move |c| c.incr_many(&borrowed(&tokens)))
            .await
    }

    /// Async [`get_sum`](Self::get_sum).
    pub async fn get_sum_async(&self, tokens: &[&str]) -> Result<u64> {
        let tokens = owned(tokens);
        self.off_executor(move |c| c.get_sum(&borrowed(&tokens)))
            .await
    }

    /// Async [`set_versioned`](Self::set_versioned).
    pub async fn set_versioned_async(
        &self,
        key: &str,
        value: impl AsRef<str>,
        version: u64,
    ) -> Result<()> {
        let (key, value) = (key.to_owned(), Arc::<str>::from(value.as_ref()));
        self.off_executor(move |c| c.set_versioned(&key, value, version))
            .await
    }

    /// Async [`get_versioned`](Self::get_versioned).
    pub async fn get_versioned_async(&self, key: &str, version: u64) -> Result<Option<Arc<str>>> {
        let key = key.to_owned();
        self.off_executor(move |c| c.get_versioned(&key, version))
            .await
    }

    /// Async [`set`](Self::set).
    pub async fn set_async(
        &self,
        key: &str,
        value: impl AsRef<str>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let (key, value) = (key.to_owned(), Arc::<str>::from(value.as_ref()));
        self.off_executor(move |c| c.set(&key, value, ttl)).await
    }

    /// Async [`get`](Self::get).
    pub async fn get_async(&self, key: &str) -> Result<Option<Arc<str>>> {
        let key = key.to_owned();
        self.off_executor(move |c| c.get(&key)).await
    }

    /// Async [`get_many`](Self::get_many).
    pub async fn get_many_async(&self, keys: &[&str]) -> Result<Vec<Option<Arc<str>>>> {
        let keys = owned(keys);
        self.off_executor(move |c| c.get_many(&borrowed(&keys)))
            .await
    }

    /// Async [`ping`](Self::ping).
    pub async fn ping_async(&self) -> Result<()> {
        self.off_executor(|c| c.ping()).await
    }

    /// Async [`set_versioned_bytes`](Self::set_versioned_bytes).
    pub async fn set_versioned_bytes_async(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        version: u64,
    ) -> Result<()> {
        let (key, value) = (key.to_owned(), value.into());
        self.off_executor(move |c| c.set_versioned_bytes(&key, value, version))
            .await
    }

    /// Async [`get_versioned_bytes`](Self::get_versioned_bytes).
    pub async fn get_versioned_bytes_async(
        &self,
        key: &str,
        version: u64,
    ) -> Result<Option<Bytes>> {
        let key = key.to_owned();
        self.off_executor(move |c| c.get_versioned_bytes(&key, version))
            .await
    }

    /// Async [`set_bytes`](Self::set_bytes).
    pub async fn set_bytes_async(
        &self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let (key, value) = (key.to_owned(), value.into());
        self.off_executor(move |c| c.set_bytes(&key, value, ttl))
            .await
    }

    /// Async [`get_bytes`](Self::get_bytes).
    pub async fn get_bytes_async(&self, key: &str) -> Result<Option<Bytes>> {
        let key = key.to_owned();
        self.off_executor(move |c| c.get_bytes(&key)).await
    }

    /// Async [`get_many_bytes`](Self::get_many_bytes).
    pub async fn get_many_bytes_async(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let keys = owned(keys);
        self.off_executor(move |c| c.get_many_bytes(&borrowed(&keys)))
            .await
    }

    /// Async [`generations`](Self::generations).
    pub async fn generations_async(&self, tokens: &[&str]) -> Result<Vec<u64>> {
        let tokens = owned(tokens);
        self.off_executor(move |c| c.generations(&borrowed(&tokens)))
            .await
    }

    /// Async [`forget_token`](Self::forget_token).
    pub async fn forget_token_async(&self, token: &str) -> Result<bool> {
        let token = token.to_owned();
        self.off_executor(move |c| c.forget_token(&token)).await
    }

    /// Async [`server_stats`](Self::server_stats).
    pub async fn server_stats_async(&self) -> Result<Vec<(String, String)>> {
        self.off_executor(|c| c.server_stats()).await
    }

    /// Async [`delete`](Self::delete).
    pub async fn delete_async(&self, key: &str) -> Result<bool> {
        let key = key.to_owned();
        self.off_executor(move |c| c.delete(&key)).await
    }
}

fn owned(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn borrowed(items: &[String]) -> Vec<&str> {
    items.iter().map(String::as_str).collect()
}

/// The tokens of a block built ahead of its render (Askama's and maud's
/// `cached`): borrowed (`&["movies", &user_id]`, `&[String]`) or owned
/// (`Vec<String>`, `[String; N]`), so a page that holds its blocks can be
/// built in one place, moved (it is `Send`) and rendered in another.
///
/// # Example
///
/// ```
/// let user_id = 42.to_string();
/// let list = ["movies", user_id.as_str()];
/// let borrowed = icache::Tokens::from(&list);
/// let owned = icache::Tokens::from(vec!["movies".to_string(), user_id.clone()]);
/// let array = icache::Tokens::from(["movies".to_string(), user_id.clone()]);
/// assert_eq!(borrowed, owned);
/// assert_eq!(owned, array);
/// ```
#[derive(Debug, Clone)]
pub struct Tokens<'a>(TokensRepr<'a>);

#[derive(Debug, Clone)]
enum TokensRepr<'a> {
    Strs(&'a [&'a str]),
    Strings(&'a [String]),
    Owned(Vec<String>),
}

impl Tokens<'_> {
    /// Runs `f` with the tokens as `&[&str]` (no allocation for up to 20).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&[&str]) -> R) -> R {
        match &self.0 {
            TokensRepr::Strs(t) => f(t),
            TokensRepr::Strings(t) => f(as_strs(t, &mut [""; 16], &mut Vec::new())),
            TokensRepr::Owned(t) => f(as_strs(t, &mut [""; 16], &mut Vec::new())),
        }
    }
}

impl PartialEq for Tokens<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.with(|a| other.with(|b| a == b))
    }
}

impl Eq for Tokens<'_> {}

impl<'a> From<&'a [&'a str]> for Tokens<'a> {
    fn from(t: &'a [&'a str]) -> Self {
        Tokens(TokensRepr::Strs(t))
    }
}

impl<'a, const N: usize> From<&'a [&'a str; N]> for Tokens<'a> {
    fn from(t: &'a [&'a str; N]) -> Self {
        Tokens(TokensRepr::Strs(t))
    }
}

impl<'a> From<&'a Vec<&'a str>> for Tokens<'a> {
    fn from(t: &'a Vec<&'a str>) -> Self {
        Tokens(TokensRepr::Strs(t))
    }
}

impl<'a> From<&'a [String]> for Tokens<'a> {
    fn from(t: &'a [String]) -> Self {
        Tokens(TokensRepr::Strings(t))
    }
}

impl<'a, const N: usize> From<&'a [String; N]> for Tokens<'a> {
    fn from(t: &'a [String; N]) -> Self {
        Tokens(TokensRepr::Strings(t))
    }
}

impl<'a> From<&'a Vec<String>> for Tokens<'a> {
    fn from(t: &'a Vec<String>) -> Self {
        Tokens(TokensRepr::Strings(t))
    }
}

impl From<Vec<String>> for Tokens<'_> {
    fn from(t: Vec<String>) -> Self {
        Tokens(TokensRepr::Owned(t))
    }
}

impl<const N: usize> From<[String; N]> for Tokens<'_> {
    fn from(t: [String; N]) -> Self {
        Tokens(TokensRepr::Owned(t.into()))
    }
}
