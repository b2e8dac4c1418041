//! Counters: an in-library snapshot ([`Stats`]) and the `metrics` facade.
//!
//! Metric names (labels: `backend` only; never keys or arguments):
//! `icache_hits_total`, `icache_misses_total`, `icache_mismatches_total`,
//! `icache_errors_total`, `icache_stores_total`, `icache_outdated_total`,
//! `icache_too_large_total`, `icache_shared_renders_total`,
//! `icache_evictions_total` (memory backend), the near cache's
//! `icache_near_hits_total`, `icache_near_misses_total`,
//! `icache_body_fetches_total`, `icache_tracked_hits_total` and the gauge
//! `icache_near_bytes`, and the histogram `icache_render_seconds`. Install your recorder before
//! opening the cache: handles are taken once, when the cache is opened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Histogram};

/// A snapshot of one cache handle's counters (shared by its clones).
///
/// What each counter counts, for cached blocks (`fragment*`, template
/// blocks; `get_versioned` and plain `get` count nothing here). Every block
/// lookup is exactly one of a **hit**, a **miss** or an uncached render
/// (counted in **errors**); what happens to a miss's render is one of
/// **stores**, **outdated**, **too_large** (or an error).
///
/// | counter | metric | counts | e.g. after |
/// |---|---|---|---|
/// | `hits` | `icache_hits_total` | lookups served from the cache: the body did not run | a second view of an unchanged page |
/// | `misses` | `icache_misses_total` | lookups that found no usable entry, so the body rendered: the first render, an evicted entry, **and** every mismatch | any render |
/// | `mismatches` | `icache_mismatches_total` | the part of `misses` where an entry was there but stored under another version: a re-render because a token was bumped | `incr("movies")`, then the page |
/// | `outdated` | `icache_outdated_total` | renders **not stored** because a token moved *while* the body rendered (the output still goes to that request); not a bump seen before the render, which is a mismatch | a bump racing a slow render |
/// | `stores` | `icache_stores_total` | renders stored | each miss that was stored |
/// | `too_large` | `icache_too_large_total` | renders not stored because the backend refused their size | a block above memcached's `-I` |
/// | `errors` | `icache_errors_total` | backend operations that failed; the block rendered uncached | a dead or hung server |
/// | `shared_renders` | `icache_shared_renders_total` | lookups that waited for another thread's render of the same block (single-flight) instead of rendering | a burst of requests on a cold block |
/// | `evictions` | `icache_evictions_total` | entries the memory backend's byte bound pushed out (a replaced entry is not one; network backends count their own, see `server_stats`) | `memory://?max_bytes=` too small |
/// | `near_hits` | `icache_near_hits_total` | hits whose body came from this process (`?near=`) | the default `near=entries` |
/// | `near_misses` | `icache_near_misses_total` | lookups with no body in process (body and generations came together) | a process's first view of a block |
/// | `body_fetches` | `icache_body_fetches_total` | lookups whose body in process was for another version (a second round trip fetched the body) | another process re-rendered after a bump |
/// | `tracked_hits` | `icache_tracked_hits_total` | near hits with no round trip at all (`near=tracking`) | |
/// | `near_bytes` | `icache_near_bytes` (gauge) | bytes held in process now | |
/// | `lease_waits` | `icache_lease_waits_total` | misses that waited for another process's render under its fill lease (`fill=lease`) instead of rendering | a bump seen by several app servers at once |
/// | `stale_served` | `icache_stale_served_total` | misses answered with the block's previous body while another render holds the lease (`stale=render`) | a bump of a hot block under load |
/// | `render_time` | `icache_render_seconds` (histogram) | time spent rendering block bodies | |
///
/// So "a bump made the block re-render" shows as `misses` + 1 and
/// `mismatches` + 1 (and `stores` + 1), with `outdated` unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Fragments served from the cache (the body was not rendered).
    pub hits: u64,
    /// Fragments rendered because no usable entry was there (includes mismatches).
    pub misses: u64,
    /// Misses where an entry was there, stored under an older version.
    pub mismatches: u64,
    /// Backend operations that failed; the fragment was rendered uncached.
    pub errors: u64,
    /// Fragments stored after a render.
    pub stores: u64,
    /// Renders not stored because their tokens moved on while rendering.
    pub outdated: u64,
    /// Renders not stored because the backend refused their size.
    pub too_large: u64,
    /// Renders that waited for another thread's render of the same block.
    pub shared_renders: u64,
    /// Entries the memory backend evicted to stay within its bound (0 for
    /// network backends, which count evictions themselves).
    pub evictions: u64,
    /// Time spent rendering fragment bodies, in total.
    pub render_time: Duration,
    /// Hits served from the near cache's in-process copy (`?near=`): the
    /// server sent generations only, or nothing at all (`near=tracking`).
    pub near_hits: u64,
    /// Lookups with no in-process copy: generations and body came together.
    pub near_misses: u64,
    /// Lookups whose in-process copy was for another version: the body was
    /// fetched (a second round trip).
    pub body_fetches: u64,
    /// Near hits that made no round trip at all (`near=tracking`).
    pub tracked_hits: u64,
    /// Bytes the near cache holds now (bounded by `?near_max_bytes=`).
    pub near_bytes: u64,
    /// Misses that waited for another process's render (`fill=lease`).
    pub lease_waits: u64,
    /// Misses answered with the block's previous body while another render
    /// held the lease (`stale=render`).
    pub stale_served: u64,
}

impl Stats {
    /// hits / (hits + misses), or 0 before the first lookup.
    pub fn hit_ratio(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

#[derive(Debug)]
struct Pair {
    local: AtomicU64,
    metric: Counter,
}

impl Pair {
    fn new(name: &'static str, backend: &'static str) -> Self {
        Pair {
            local: AtomicU64::new(0),
            metric: metrics::counter!(name, "backend" => backend),
        }
    }
    fn add(&self, n: u64) {
        self.local.fetch_add(n, Ordering::Relaxed);
        self.metric.increment(n);
    }
    fn get(&self) -> u64 {
        self.local.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub(crate) struct Counters {
    hits: Pair,
    misses: Pair,
    mismatches: Pair,
    errors: Pair,
    stores: Pair,
    outdated: Pair,
    too_large: Pair,
    shared: Pair,
    near_hits: Pair,
    near_misses: Pair,
    body_fetches: Pair,
    tracked_hits: Pair,
    lease_waits: Pair,
    stale_served: Pair,
    near_bytes: metrics::Gauge,
    render_nanos: AtomicU64,
    render_hist: Histogram,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    Hit,
    Miss,
    Mismatch,
    Error,
    Store,
    Outdated,
    TooLarge,
    Shared,
    NearHit,
    NearMiss,
    BodyFetch,
    TrackedHit,
    LeaseWait,
    StaleServed,
}

impl Counters {
    pub(crate) fn new(backend: &'static str) -> Self {
        Counters {
            hits: Pair::new("icache_hits_total", backend),
            misses: Pair::new("icache_misses_total", backend),
            mismatches: Pair::new("icache_mismatches_total", backend),
            errors: Pair::new("icache_errors_total", backend),
            stores: Pair::new("icache_stores_total", backend),
            outdated: Pair::new("icache_outdated_total", backend),
            too_large: Pair::new("icache_too_large_total", backend),
            shared: Pair::new("icache_shared_renders_total", backend),
            near_hits: Pair::new("icache_near_hits_total", backend),
            near_misses: Pair::new("icache_near_misses_total", backend),
            body_fetches: Pair::new("icache_body_fetches_total", backend),
            tracked_hits: Pair::new("icache_tracked_hits_total", backend),
            lease_waits: Pair::new("icache_lease_waits_total", backend),
            stale_served: Pair::new("icache_stale_served_total", backend),
            near_bytes: metrics::gauge!("icache_near_bytes", "backend" => backend),
            render_nanos: AtomicU64::new(0),
            render_hist: metrics::histogram!("icache_render_seconds", "backend" => backend),
        }
    }

    pub(crate) fn count(&self, event: Event) {
        match event {
            Event::Hit => &self.hits,
            Event::Miss => &self.misses,
            Event::Mismatch => &self.mismatches,
            Event::Error => &self.errors,
            Event::Store => &self.stores,
            Event::Outdated => &self.outdated,
            Event::TooLarge => &self.too_large,
            Event::Shared => &self.shared,
            Event::NearHit => &self.near_hits,
            Event::NearMiss => &self.near_misses,
            Event::BodyFetch => &self.body_fetches,
            Event::TrackedHit => &self.tracked_hits,
            Event::LeaseWait => &self.lease_waits,
            Event::StaleServed => &self.stale_served,
        }
        .add(1);
    }

    pub(crate) fn rendered(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.render_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.render_hist.record(took.as_secs_f64());
    }

    /// The near cache holds `bytes` now.
    pub(crate) fn near_bytes(&self, bytes: u64) {
        self.near_bytes.set(bytes as f64);
    }

    pub(crate) fn snapshot(&self, evictions: u64, near_bytes: u64) -> Stats {
        Stats {
            hits: self.hits.get(),
            misses: self.misses.get(),
            mismatches: self.mismatches.get(),
            errors: self.errors.get(),
            stores: self.stores.get(),
            outdated: self.outdated.get(),
            too_large: self.too_large.get(),
            shared_renders: self.shared.get(),
            evictions,
            render_time: Duration::from_nanos(self.render_nanos.load(Ordering::Relaxed)),
            near_hits: self.near_hits.get(),
            near_misses: self.near_misses.get(),
            body_fetches: self.body_fetches.get(),
            tracked_hits: self.tracked_hits.get(),
            near_bytes,
            lease_waits: self.lease_waits.get(),
            stale_served: self.stale_served.get(),
        }
    }
}

/// Lets a log line through at most once per period (10 s), so a cache that
/// is down or a block that is always too large warns, without flooding.
#[derive(Debug)]
pub(crate) struct Every {
    born: std::time::Instant,
    /// Milliseconds since `born` of the last line let through; 0: none yet.
    last: AtomicU64,
}

impl Every {
    const PERIOD_MS: u64 = 10_000;

    pub(crate) fn new() -> Self {
        Every {
            born: std::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// `true` for the first call of each period (one caller wins a race).
    pub(crate) fn due(&self) -> bool {
        let now = u64::try_from(self.born.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= Self::PERIOD_MS)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}
