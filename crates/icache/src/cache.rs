//! The `ICache` handle: the seed's five methods, plain get/set, and their async
//! forms.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::backend::{self, Backend};
use crate::codec::{Entry, Payload};
use crate::config::{Config, Target};
use crate::error::{Error, Result};
use crate::fragment::Flights;
use crate::keys::Key;
use crate::stats::{Counters, Every, Stats};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bumps that failed (the backend was down or hung), to be replayed.
///
/// Every failed bump is remembered, whatever else failed. A replay copies the
/// list and applies it **without holding the lock across I/O**, one replay at
/// a time (others fail fast meanwhile, and the backend's circuit breaker
/// rate-limits the attempts); it removes only what was remembered before it
/// started, so a bump that failed during the replay is replayed again later.
#[derive(Default)]
pub(crate) struct Pending {
    list: Mutex<PendingList>,
    /// Something is pending: one atomic load on the read path when not.
    has: AtomicBool,
    /// A replay is in flight.
    replaying: AtomicBool,
}

#[derive(Default)]
struct PendingList {
    /// Counts `remember` calls.
    seq: u64,
    /// Each token, with the `seq` of its latest failed bump.
    tokens: Vec<(String, u64)>,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingList> {
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn remember(&self, tokens: &[&str]) {
        let mut list = self.lock();
        list.seq += 1;
        let seq = list.seq;
        for t in tokens {
            match list.tokens.iter_mut().find(|(p, _)| p == t) {
                Some(entry) => entry.1 = seq,
                None => list.tokens.push(((*t).to_owned(), seq)),
            }
        }
        self.has.store(true, Ordering::Release);
        tracing::warn!(
            tokens = list.tokens.len(),
            "icache: bump failed; it will be replayed, and blocks render uncached until it is"
        );
    }

    /// Applies the pending bumps with `apply`; `Ok` when none is left.
    pub(crate) fn replay(&self, apply: impl FnOnce(&[&str]) -> Result<()>) -> Result<()> {
        if !self.has.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.replaying.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                crate::ErrorKind::Unavailable,
                "bumps that failed earlier are being replayed by another thread; \
                 rendering uncached until they are",
            ));
        }
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _done = Done(&self.replaying);
        let (seq, tokens) = {
            let list = self.lock();
            if list.tokens.is_empty() {
                self.has.store(false, Ordering::Release);
                return Ok(());
            }
            let tokens: Vec<String> = list.tokens.iter().map(|(t, _)| t.clone()).collect();
            (list.seq, tokens)
        };
        let names: Vec<&str> = tokens.iter().map(String::as_str).collect();
        apply(&names)?;
        let mut list = self.lock();
        list.tokens.retain(|(_, s)| *s > seq);
        if list.tokens.is_empty() {
            self.has.store(false, Ordering::Release);
        }
        tracing::info!(
            tokens = names.len(),
            "icache: replayed bumps that had failed"
        );
        Ok(())
    }
}

/// Bytes of nested-token lists remembered per process (names and tokens):
/// bounded by size, not count, since one list can hold thousands of tokens.
const DEP_HINTS_BYTES: u64 = 4 << 20;

/// Weighs a dependency hint by the bytes it holds.
#[derive(Clone, Copy)]
pub(crate) struct HintBytes;

impl quick_cache::Weighter<String, Arc<[Box<str>]>> for HintBytes {
    fn weight(&self, name: &String, deps: &Arc<[Box<str>]>) -> u64 {
        let deps: usize = deps.iter().map(|d| d.len() + 16).sum();
        (name.len() + deps + 64) as u64
    }
}

/// Fragment name -> the nested tokens its entry was last seen with.
pub(crate) type DepHints = quick_cache::sync::Cache<String, Arc<[Box<str>]>, HintBytes>;

/// A handle to a timeout-less cache. Cheap to clone; all clones share one
/// backend (and its connections).
///
/// See the [crate docs](crate) for the model and examples.
#[derive(Clone)]
pub struct ICache {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) config: Config,
    pub(crate) counters: Counters,
    pub(crate) flights: Flights,
    /// Fragment name -> the nested tokens its entry was last seen with, so a
    /// hit can fetch their generations in the same round trip as the entry.
    pub(crate) dep_hints: DepHints,
    /// Tokens whose bump failed (backend down): replayed before this handle
    /// reads any generation again, so it never serves what they invalidated.
    pub(crate) pending: Pending,
    /// Fail-open warnings, at most every 10 s.
    pub(crate) trouble_log: Every,
    /// "Too large" warnings, at most every 10 s.
    pub(crate) too_large_log: Every,
}

impl fmt::Debug for ICache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ICache")
            .field("backend", &self.inner.backend.name())
            .field("url", &self.inner.config.redacted)
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
    /// | `memcached://host[:port]` | memcached (feature `memcached`) |
    /// | `memcached://h1:p1,h2:p2,…` | a memcached pool (rendezvous hashing) |
    /// | `redis+cluster://h1:p1,h2:p2,…` | Redis Cluster (feature `redis`) |
    /// | `none://` | no cache: every block renders, nothing is stored |
    ///
    /// Options for every scheme: `prefix=` (keeps apps apart on a shared
    /// server; any string: up to 64 printable ASCII bytes, colons included, are
    /// kept verbatim at the start of every key, anything else is hashed),
    /// `timeout_ms=` (one answer,
    /// default 100), `connect_timeout_ms=` (default 100), `pool_size=` (idle
    /// connections kept, default 8).
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
        let backend: Box<dyn Backend> = match &config.target {
            Target::Memory { max_bytes } => Box::new(backend::memory::Memory::new(*max_bytes)?),
            Target::Nothing => Box::new(backend::none::Nothing),
            #[cfg(feature = "redis")]
            Target::Redis { .. } => Box::new(backend::redis::Redis::new(&config)?),
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
                    Target::Redis { .. } | Target::RedisCluster { .. } => "redis",
                    _ => "memcached",
                };
                return Err(Error::config(format!(
                    "{} needs icache's cargo feature {feature:?}, which is not enabled",
                    config.redacted
                )));
            }
        };
        let counters = Counters::new(backend.name());
        Ok(ICache {
            inner: Arc::new(Inner {
                backend,
                config,
                counters,
                flights: Flights::default(),
                dep_hints: DepHints::with_weighter(10_000, DEP_HINTS_BYTES, HintBytes),
                pending: Pending::default(),
                trouble_log: Every::new(),
                too_large_log: Every::new(),
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
        self.inner.backend.name()
    }

    /// The URL this cache was opened with, password replaced by `***`.
    pub fn url(&self) -> &str {
        &self.inner.config.redacted
    }

    /// The configured time-out for one backend answer.
    pub fn timeout(&self) -> Duration {
        self.inner.config.timeout
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
        self.inner.backend.server_stats()
    }

    /// One round trip to the backend: `Ok` if it answers.
    pub fn ping(&self) -> Result<()> {
        self.inner.backend.ping()
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// A snapshot of this cache's counters (shared by all clones of the handle).
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// cache.fragment(&["movies"], || Ok::<_, std::convert::Infallible>("<ul/>".to_string()))?;
    /// cache.fragment(&["movies"], || Ok::<_, std::convert::Infallible>("<ul/>".to_string()))?;
    /// let stats = cache.stats();
    /// assert_eq!((stats.hits, stats.misses), (1, 1));
    /// # Ok::<(), std::convert::Infallible>(())
    /// ```
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot(self.inner.backend.evictions())
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
        // Bumps commute: this one need not wait for older failed ones, and a
        // failure here is remembered whatever else failed before.
        let keys: Vec<Key<'_>> = tokens.iter().map(|t| Key::gen_(t)).collect();
        let fresh = backend::fresh_generations(keys.len());
        match self.inner.backend.incr_gens(&keys, &fresh) {
            Ok(gens) => {
                // The backend answers: a good moment to replay older failures.
                let _ = self.replay_pending();
                Ok(gens)
            }
            Err(e) => {
                if !e.is_config() {
                    self.inner.pending.remember(tokens);
                }
                Err(e)
            }
        }
    }

    /// Replays bumps that failed earlier. Cheap when there are none (one
    /// atomic load); an error means they still cannot be applied (and the
    /// caller must not trust what the backend says about generations).
    pub(crate) fn replay_pending(&self) -> Result<()> {
        self.inner.pending.replay(|tokens| {
            let keys: Vec<Key<'_>> = tokens.iter().map(|t| Key::gen_(t)).collect();
            let fresh = backend::fresh_generations(keys.len());
            self.inner.backend.incr_gens(&keys, &fresh).map(drop)
        })
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
        self.inner.backend.delete(Key::gen_(token))
    }

    /// The current generation of each token, in order (missing ones are
    /// initialised to fresh random values). One round trip when all exist.
    pub fn generations(&self, tokens: &[&str]) -> Result<Vec<u64>> {
        self.replay_pending()?;
        let fetched = self.inner.backend.fetch(tokens, &[])?;
        self.complete_gens(tokens, fetched.gens)
    }

    /// Fills in missing generations (initialising them atomically in the
    /// backend) and returns them all.
    pub(crate) fn complete_gens(
        &self,
        tokens: &[&str],
        gens: Vec<Option<u64>>,
    ) -> Result<Vec<u64>> {
        if gens.iter().all(Option::is_some) {
            return Ok(gens.into_iter().flatten().collect());
        }
        let missing: Vec<usize> = (0..gens.len()).filter(|&i| gens[i].is_none()).collect();
        let missing_keys: Vec<Key<'_>> = missing.iter().map(|&i| Key::gen_(tokens[i])).collect();
        let fresh = backend::fresh_generations(missing.len());
        let got = self.inner.backend.init_gens(&missing_keys, &fresh)?;
        let mut out: Vec<u64> = gens.into_iter().map(|g| g.unwrap_or(0)).collect();
        for (i, g) in missing.into_iter().zip(got) {
            out[i] = g;
        }
        Ok(out)
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
        self.replay_pending()?;
        let gens = self.inner.backend.fetch(tokens, &[])?.gens;
        // Hot path: every generation was there; no second pass, no allocation.
        let mut sum = 0u64;
        for g in &gens {
            match g {
                Some(g) => sum = sum.wrapping_add(*g),
                None => {
                    return Ok(self
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

    fn store_versioned(&self, key: &str, payload: Payload, version: u64) -> Result<()> {
        self.inner
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

    fn load_versioned(&self, key: &str, version: u64) -> Result<Option<Payload>> {
        Ok(match self.inner.backend.get_entry(Key::versioned(key))? {
            Some(entry) if entry.version == Some(version) => Some(entry.payload.clone()),
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
            self.inner.backend.delete(Key::plain(key))?;
            return Ok(());
        }
        self.inner
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
        let fetched = self.inner.backend.fetch(&[], &keys)?;
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
        self.inner.backend.delete(Key::plain(key))
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

    /// The memory and `none://` backends: no I/O, nothing ever blocks.
    pub(crate) fn is_in_process(&self) -> bool {
        matches!(self.backend_name(), "memory" | "none")
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
