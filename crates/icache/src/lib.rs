//! # icache: timeout-less fragment caching
//!
//! icache caches rendered output **until the data it shows changes**, with no
//! timeouts. It is the Rust form of a small Django app (its `ICache` object and
//! `{% icache %}` tag), with the original's defects fixed.
//!
//! ## The model
//!
//! * A **token** names some data: `"movies"`, `"user:42"`.
//! * Every token has a **generation** in the shared cache. [`ICache::incr`]
//!   bumps it; call it **after** the database commit that changed the data.
//! * A cached value is stored with the **version** of its tokens, the wrapping
//!   sum of their generations ([`ICache::get_sum`]). Read the version **before**
//!   reading the data, store the result under that version
//!   ([`ICache::set_versioned`]), and serve it only while the current version is
//!   still the same ([`ICache::get_versioned`]).
//!
//! With these two orderings a reader never serves output older than the last
//! bump that completed before its read began, and nothing ever needs a timeout:
//! an outdated entry is simply never served again, and leaves when the backend
//! needs the room.
//!
//! Generations never repeat: a missing one (never set, evicted, lost in a
//! restart) becomes a fresh random value in 1..=2^62, never 0, and bumps are
//! atomic increments in the backend. So a version only returns to an old value
//! by chance, about 2^-62.
//!
//! ## Example
//!
//! ```
//! use icache::ICache;
//!
//! let cache = ICache::from_url("memory://")?;     // or ICache::from_env()?
//!
//! // Reader: version first, then data, then store under that version.
//! let version = cache.get_sum(&["movies", "user:42"])?;
//! let html = match cache.get_versioned("movies#42", version)? {
//!     Some(html) => html.to_string(),
//!     None => {
//!         let html = "<ul>…</ul>".to_string(); // render from the database
//!         cache.set_versioned("movies#42", html.as_str(), version)?;
//!         html
//!     }
//! };
//! assert_eq!(cache.get_versioned("movies#42", version)?.as_deref(), Some(html.as_str()));
//!
//! // Writer: commit, then bump. The entry above is never served again.
//! cache.incr_many(&["movies", "user:42"])?;
//! let version = cache.get_sum(&["movies", "user:42"])?;
//! assert_eq!(cache.get_versioned("movies#42", version)?, None);
//! # Ok::<(), icache::Error>(())
//! ```
//!
//! ## Backends
//!
//! | URL | feature | notes |
//! |---|---|---|
//! | `memory://?max_bytes=N` | always | in-process, bounded by bytes (default 64 MiB) |
//! | `redis://user:pass@host:port/db`, `rediss://…` | `redis` | single node; TLS through rustls |
//! | `redis+unix:///path/redis.sock?db=N` | `redis` | single node over a Unix socket (`user=`, `pass=` options) |
//! | `memcached://host:port` | `memcached` | one server, our own small client |
//! | `redis+cluster://h1:p1,h2:p2` | `redis` | Redis Cluster, one round trip per hit |
//! | `redis+sentinel://h1:p1,h2:p2/MASTER` | `redis` | Redis Sentinel: the master the sentinels name, followed across failovers |
//! | `memcached://h1:p1,h2:p2,h3:p3` | `memcached` | a pool, rendezvous-hashed |
//! | `none://` | always | caching off |
//!
//! Every scheme takes `?prefix=` (keeps apps apart on a shared server),
//! `salt=` (a deploy salt mixed into every block's key), `timeout_ms=`,
//! `connect_timeout_ms=` and `pool_size=`. See [`ICache::from_url`].
//! [`ICache::flush`] makes every block miss once (`icache flush` on the
//! command line).
//!
//! ## The near cache
//!
//! Network backends also keep in process what they read (`?near=`):
//!
//! * `near=entries` (the default): fragment bodies and versioned entries, by
//!   (key, version, server instance). A block hit fetches the generations
//!   only (a few bytes per token, one round trip); the body crosses the
//!   network once per process and version. Never stale.
//! * `near=tracking` (Redis, single node): generations too, kept coherent by
//!   Redis's client-side caching on one extra connection per handle. A hit
//!   makes **no round trip**. The promise becomes bounded: a read is never
//!   older than the last bump that completed `max_lag_ms` (default 100)
//!   before it began; the bound is enforced with pings, not hoped for.
//! * `near=off`: every hit carries the body.
//!
//! `near_max_bytes=` (default 64 MiB per handle) bounds what is kept.
//! [`Stats`] counts near hits, near misses, body fetches, hits with no round
//! trip, and the bytes held.
//!
//! Any string is a valid token or key (spaces, `#`, control characters,
//! unicode, 100 KB): short plain names stay readable in the backend, anything
//! else is hashed with SHA-256, so no two inputs share an entry and every key
//! fits memcached.
//!
//! ## Cached blocks and template engines
//!
//! [`ICache::fragment`] (identified by the name you give it and its
//! tokens, as any cache takes a key) and [`ICache::fragment_async`] cache any
//! renderer's output; [`observe`] says what each block of a render did. Integrations,
//! one cargo feature each:
//!
//! | feature | module | what |
//! |---|---|---|
//! | `minijinja` | [`minijinja`] | the `icache` call block, the seed's `{% icache %}` syntax, `render_async` |
//! | `askama` | [`askama`] | a cached sub-template, rendered only on a miss |
//! | `maud` | [`maud`] | a cached block that implements `Render` |
//! | `tera` | [`tera`] | the seed's `{% icache %}` syntax in Tera 2 (no single-flight there) |
//! | `redis`, `memcached` | | the network backends |
//!
//! ## Sync and async
//!
//! The methods are blocking and work from any thread, with or without a tokio
//! runtime (including inside `spawn_blocking`). Each has an `_async` twin for
//! async handlers that never blocks the executor.
//!
//! **A sync call inside an async handler blocks the executor's thread** on a
//! network backend (one round trip, up to `timeout_ms` when the server
//! hangs); on `memory://` nothing blocks. Per engine, in a handler:
//!
//! | engine (version) | async form |
//! |---|---|
//! | any renderer | [`ICache::fragment_async`]: inline when a hit needs no I/O, nested blocks recorded across `.await`s |
//! | MiniJinja 3.1 | [`minijinja::render_async`]: renders on the blocking pool, its blocks report to the calling task |
//! | Askama 0.16, maud 0.27 | the cached blocks are `Send` with owned tokens ([`Tokens`]): build the page anywhere; on a network backend render it in `spawn_blocking` inside [`Scope::run`] |
//! | Tera 2 | [`tera::render`] in `spawn_blocking` inside [`Scope::run`] |
//!
//! [`observe_async`] sees every block of an async render (an axum handler,
//! `render_async`); [`Scope`] carries the observation and the enclosing
//! async block into work moved to another thread.
//!
//! ## Errors
//!
//! One [`Error`] type with an [`ErrorKind`]: bad configuration (naming the bad
//! part of the URL), backend unavailable, timed out, value too large, backend
//! error. Foreign or corrupt bytes under our keys read as a miss, never a panic.
//! Passwords never appear in `Debug` output, errors or logs.

#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "askama")]
pub mod askama;
mod backend;
mod cache;
mod codec;
mod config;
mod core;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod db;
mod error;
mod fragment;
mod keys;
mod lease;
#[cfg(feature = "maud")]
pub mod maud;
#[cfg(feature = "minijinja")]
pub mod minijinja;
mod near;
mod observe;
#[cfg(any(feature = "redis", feature = "memcached"))]
mod pool;
mod stats;
mod strict;
#[cfg(feature = "tera")]
pub mod tera;

pub use bytes::Bytes;
pub use cache::{ICache, Tokens, Value};
pub use error::{Error, ErrorKind, Result};
pub use lease::BlockOptions;
pub use observe::{BlockEvent, NotStored, Outcome, Scope, observe, observe_async};
pub use stats::Stats;

/// Entry points for the cargo-fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod __fuzz {
    /// Decodes bytes as an entry read from a backend; `true` if they decode.
    pub fn decode(bytes: &[u8]) -> bool {
        crate::codec::decode(bytes::Bytes::copy_from_slice(bytes)).is_some()
    }
}

// The README's examples are compiled and run as doctests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
