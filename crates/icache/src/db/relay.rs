//! The relay: outbox rows → `incr_many` on the cache → rows deleted.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};

use super::url::Target;
use super::{DbError, DbErrorKind, DbUrl, Dialect};
use crate::ICache;
use crate::stats::Every;

/// Rows claimed per batch by default (one `incr_many` round trip each).
const DEFAULT_BATCH: usize = 1_000;
/// Polling interval by default: the bound on delay when no wake-up comes.
const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// First and last back-off after a failure (cache or database).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Rows older than this are worth a (rate-limited) warning.
const WAIT_WARNING: Duration = Duration::from_secs(5);
/// How often a flush looks again at rows another relay holds.
const HELD_RECHECK: Duration = Duration::from_millis(2);

/// One outbox row handed to the relay.
pub(crate) struct Row {
    pub(crate) token: String,
    /// Seconds since the row was written, as the database saw it when the
    /// row was claimed (no clock skew between hosts).
    pub(crate) age: f64,
}

/// Why a batch did not go through.
pub(crate) enum BatchError {
    /// The database failed: reconnect.
    Db(DbError),
    /// The cache (or the `after_bump` hook) refused: the rows stay.
    Apply(String),
}

impl From<DbError> for BatchError {
    fn from(e: DbError) -> Self {
        BatchError::Db(e)
    }
}

/// A connection to the outbox, as the relay uses it.
pub(crate) trait Outbox: Send {
    /// Claims up to `limit` rows, calls `apply` with them and deletes them
    /// (committed) only if it returned `Ok`. Returns how many rows it
    /// claimed (0: nothing to do).
    fn claim(
        &mut self,
        limit: usize,
        apply: &mut dyn FnMut(&[Row]) -> Result<(), String>,
    ) -> Result<usize, BatchError>;
    /// The highest `seq` committed now (0 if the outbox is empty).
    fn max_seq(&mut self) -> Result<i64, DbError>;
    /// Whether rows with `seq <= seq` are still there (held by another relay).
    fn any_up_to(&mut self, seq: i64) -> Result<bool, DbError>;
    /// Rows waiting, and the age of the oldest.
    fn pending(&mut self) -> Result<(u64, Option<Duration>), DbError>;
}

/// Opens an outbox connection for `url` (checks that the outbox is there).
pub(crate) fn open_outbox(url: &DbUrl) -> Result<Box<dyn Outbox>, DbError> {
    match url.target() {
        #[cfg(feature = "postgres")]
        Target::Postgres(config) => Ok(Box::new(super::pg::PgOutbox::open(config, url)?)),
        #[cfg(feature = "sqlite")]
        Target::Sqlite(path) => Ok(Box::new(super::sqlite::SqliteOutbox::open(path, url)?)),
        #[allow(unreachable_patterns)]
        _ => Err(DbError::usage(format!(
            "{url}: no driver for {} in this build",
            url.dialect()
        ))),
    }
}

/// Something that wakes the relay: a notification, a flush, a stop.
pub(crate) type Waker = Sender<()>;

/// `after_bump`'s type.
type Hook = Arc<dyn Fn(&[String]) -> Result<(), String> + Send + Sync + 'static>;

/// Builds a [`Relay`]: see the [module docs](super) for what it does.
///
/// ```no_run
/// use std::time::Duration;
/// let cache = icache::ICache::from_url("redis://127.0.0.1:6379")?;
/// let relay = icache::db::Relay::builder("sqlite:///var/lib/app/app.db", cache)?
///     .poll_interval(Duration::from_millis(500))
///     .after_bump(|tokens| {
///         println!("bumped {tokens:?}");
///         Ok(())
///     })
///     .spawn()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct RelayBuilder {
    url: DbUrl,
    cache: ICache,
    poll: Duration,
    batch: usize,
    after_bump: Option<Hook>,
}

impl RelayBuilder {
    /// How often the outbox is looked at without a wake-up (default 1 s;
    /// at least 10 ms).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(10));
        self
    }

    /// Rows per batch (default 1,000; 1 to 100,000): one `incr_many` round
    /// trip of the distinct tokens, one transaction.
    pub fn batch_size(mut self, rows: usize) -> Self {
        self.batch = rows.clamp(1, 100_000);
        self
    }

    /// Runs `hook` with each batch's distinct tokens after their
    /// `incr_many` succeeded and before the rows are deleted. When it returns
    /// `Err` the rows stay and the batch is retried (its tokens are bumped
    /// again: at least once, for the hook too).
    ///
    /// ```no_run
    /// let cache = icache::ICache::from_url("redis://127.0.0.1:6379")?;
    /// let relay = icache::db::Relay::builder("postgres://app@127.0.0.1/app", cache)?
    ///     .after_bump(|tokens| if tokens.is_empty() { Err("nothing".into()) } else { Ok(()) })
    ///     .spawn()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn after_bump(
        mut self,
        hook: impl Fn(&[String]) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.after_bump = Some(Arc::new(hook));
        self
    }

    /// Starts the relay in a background thread (and, on PostgreSQL, a
    /// listener thread). Fails only for a build without the database's
    /// driver; an unreachable database or a missing outbox is retried (and
    /// logged), so an app starts while its database is down.
    pub fn spawn(self) -> Result<Relay, DbError> {
        if matches!(self.url.target(), Target::Unavailable) {
            return Err(DbError::usage(format!(
                "{}: no driver for {} in this build",
                self.url,
                self.url.dialect()
            )));
        }
        let (wake, wakes) = mpsc::channel();
        let dialect = self.url.dialect();
        let label = match dialect {
            Dialect::Postgres => "postgres",
            Dialect::Sqlite => "sqlite",
        };
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            wake: Mutex::new(wake.clone()),
            flush: Mutex::new(FlushState::default()),
            flushed: Condvar::new(),
            counts: Counts::default(),
            last_error: Mutex::new(None),
            metrics: RelayMetrics {
                bumps: metrics::counter!("icache_relay_bumps_total", "db" => label),
                rows: metrics::counter!("icache_relay_rows_total", "db" => label),
                errors: metrics::counter!("icache_relay_errors_total", "db" => label),
                pending: metrics::gauge!("icache_relay_pending_rows", "db" => label),
                lag: metrics::histogram!("icache_relay_lag_seconds", "db" => label),
            },
        });
        let mut threads = Vec::new();
        #[cfg(feature = "postgres")]
        if let Target::Postgres(config) = self.url.target() {
            let listener = super::pg::Listener::new(
                (**config).clone(),
                self.url.clone(),
                shared.clone(),
                wake,
            );
            let thread = thread::Builder::new()
                .name("icache-relay-listen".into())
                .spawn(move || listener.run())
                .map_err(|e| {
                    DbError::database(format!("cannot start the relay's listener thread: {e}"))
                })?;
            threads.push(thread);
        }
        #[cfg(not(feature = "postgres"))]
        drop(wake);
        let worker = Worker {
            url: self.url,
            cache: self.cache,
            poll: self.poll,
            batch: self.batch,
            after_bump: self.after_bump,
            shared: shared.clone(),
            wakes,
            waiting_warned: Every::new(),
            error_warned: Every::new(),
        };
        let thread = thread::Builder::new()
            .name("icache-relay".into())
            .spawn(move || worker.run())
            .map_err(|e| DbError::database(format!("cannot start the relay thread: {e}")))?;
        threads.push(thread);
        Ok(Relay { shared, threads })
    }
}

/// A running relay (see the [module docs](super)). Stops, after the batch
/// in hand, when [`stop`](Self::stop)ped or dropped.
pub struct Relay {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// What a relay did so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Batches applied (bumped and deleted).
    pub batches: u64,
    /// Outbox rows applied and deleted.
    pub rows: u64,
    /// Tokens bumped (distinct per batch).
    pub bumps: u64,
    /// Failures (cache, hook or database), each retried.
    pub errors: u64,
    /// Rows waiting at the last look (every poll interval when idle).
    pub pending: u64,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
}

impl Relay {
    /// A relay from the outbox of `db_url` (`postgres://…`,
    /// `postgresql://…`, `sqlite:///absolute/path.db`) to `cache`.
    ///
    /// ```
    /// let e = icache::db::Relay::builder("mysql://db/app", icache::ICache::memory()).err();
    /// assert!(e.expect("unsupported").to_string().contains("mysql"));
    /// ```
    pub fn builder(db_url: &str, cache: ICache) -> Result<RelayBuilder, DbError> {
        Ok(RelayBuilder {
            url: DbUrl::parse(db_url)?,
            cache,
            poll: DEFAULT_POLL,
            batch: DEFAULT_BATCH,
            after_bump: None,
        })
    }

    /// Wakes the relay now (after this process committed bumps).
    pub fn wake(&self) {
        self.shared.wake();
    }

    /// Read your own writes: wakes the relay and waits until every outbox
    /// row committed before this call is applied to the cache (by this relay
    /// or another), at most `timeout`. Returns the tokens this relay applied
    /// meanwhile (distinct; with other writers, theirs too).
    ///
    /// # Errors
    ///
    /// [`DbErrorKind::Timeout`] when the rows are still waiting after
    /// `timeout` (the cache or the database is down: they are applied
    /// later) or the relay has stopped.
    pub fn flush(&self, timeout: Duration) -> Result<Vec<String>, DbError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.flush_state();
        state.requested += 1;
        let mine = state.requested;
        let start = state.log_base + state.log.len();
        state.waiting += 1;
        self.shared.wake();
        let outcome = loop {
            if state.done >= mine {
                break Ok(());
            }
            if self.shared.stop.load(Ordering::Acquire) {
                break Err(DbError::new(DbErrorKind::Timeout, "the relay has stopped"));
            }
            let now = Instant::now();
            if now >= deadline {
                let why = self
                    .shared
                    .last_error()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                break Err(DbError::new(
                    DbErrorKind::Timeout,
                    format!(
                        "bumps not applied within {timeout:?}{why}; they stay in the outbox \
                         and are applied when the cache answers"
                    ),
                ));
            }
            state = self
                .shared
                .flushed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        let mut seen = HashSet::new();
        let tokens = state.log[start.saturating_sub(state.log_base).min(state.log.len())..]
            .iter()
            .filter(|t| seen.insert(t.as_str()))
            .cloned()
            .collect();
        state.waiting -= 1;
        if state.waiting == 0 {
            state.log_base += state.log.len();
            state.log.clear();
        }
        outcome.map(|()| tokens)
    }

    /// What the relay did so far.
    pub fn stats(&self) -> RelayStats {
        let c = &self.shared.counts;
        RelayStats {
            batches: c.batches.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            bumps: c.bumps.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            pending: c.pending.load(Ordering::Relaxed),
            last_error: self.shared.last_error(),
        }
    }

    /// Stops the relay: the batch in hand is finished (bumped and deleted,
    /// or left for the next relay), then its threads are joined. Returns
    /// its final [`stats`](Self::stats).
    pub fn stop(mut self) -> RelayStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        self.shared.flushed.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("stats", &self.stats())
            .finish()
    }
}

#[derive(Default)]
struct FlushState {
    /// Flushes asked for / served, in order.
    requested: u64,
    done: u64,
    /// Tokens applied while someone waits (from index `log_base` on).
    log: Vec<String>,
    log_base: usize,
    waiting: usize,
}

#[derive(Default)]
struct Counts {
    batches: AtomicU64,
    rows: AtomicU64,
    bumps: AtomicU64,
    errors: AtomicU64,
    pending: AtomicU64,
}

struct RelayMetrics {
    bumps: Counter,
    rows: Counter,
    errors: Counter,
    pending: Gauge,
    lag: Histogram,
}

/// What the relay's threads and its handle share.
pub(crate) struct Shared {
    pub(crate) stop: AtomicBool,
    wake: Mutex<Waker>,
    flush: Mutex<FlushState>,
    flushed: Condvar,
    counts: Counts,
    last_error: Mutex<Option<String>>,
    metrics: RelayMetrics,
}

impl Shared {
    fn wake(&self) {
        let _ = self
            .wake
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(());
    }

    fn flush_state(&self) -> MutexGuard<'_, FlushState> {
        self.flush.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// Doubling back-off between `BACKOFF_MIN` and `BACKOFF_MAX`.
pub(crate) struct Backoff(Option<Duration>);

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff(None)
    }
    pub(crate) fn next(&mut self) -> Duration {
        let d = self.0.map_or(BACKOFF_MIN, |d| (d * 2).min(BACKOFF_MAX));
        self.0 = Some(d);
        d
    }
    pub(crate) fn reset(&mut self) {
        self.0 = None;
    }
}

struct Worker {
    url: DbUrl,
    cache: ICache,
    poll: Duration,
    batch: usize,
    after_bump: Option<Hook>,
    shared: Arc<Shared>,
    wakes: Receiver<()>,
    waiting_warned: Every,
    error_warned: Every,
}

impl Worker {
    fn run(self) {
        let mut outbox: Option<Box<dyn Outbox>> = None;
        let mut backoff = Backoff::new();
        let mut last_look: Option<Instant> = None;
        let mut held: Option<(u64, i64)> = None;
        while !self.shared.stopped() {
            let Some(db) = outbox.as_mut() else {
                // (Re)connected below, then drained in full: rows committed
                // while we were away sent their NOTIFY to nobody.
                match open_outbox(&self.url) {
                    Ok(db) => outbox = Some(db),
                    Err(e) => {
                        self.failed(&format!("cannot open the outbox: {e}"));
                        self.pause(backoff.next());
                    }
                }
                continue;
            };
            // The flushes asked for so far, and the last seq committed
            // before this relay saw them: kept until served, so a stream of
            // new commits cannot move the goal away from them.
            if held.is_none() {
                let wanted = {
                    let state = self.shared.flush_state();
                    (state.requested > state.done).then_some(state.requested)
                };
                if let Some(wanted) = wanted {
                    match db.max_seq() {
                        Ok(mark) => held = Some((wanted, mark)),
                        Err(e) => {
                            self.failed(&format!("database: {e}"));
                            outbox = None;
                            self.pause(backoff.next());
                            continue;
                        }
                    }
                }
            }
            match self.drain(db.as_mut()) {
                Ok(()) => {}
                Err(BatchError::Db(e)) => {
                    self.failed(&format!("database: {e}"));
                    outbox = None;
                    self.pause(backoff.next());
                    continue;
                }
                Err(BatchError::Apply(e)) => {
                    self.failed(&e);
                    self.pause(backoff.next());
                    continue;
                }
            }
            backoff.reset();
            self.shared.set_error(None);
            if let Some((wanted, mark)) = held {
                match db.any_up_to(mark) {
                    // Another relay holds them: it deletes them once bumped.
                    Ok(true) => {
                        self.wait(HELD_RECHECK);
                        continue;
                    }
                    Ok(false) => {
                        held = None;
                        let mut state = self.shared.flush_state();
                        state.done = state.done.max(wanted);
                        let more = state.requested > state.done;
                        drop(state);
                        self.shared.flushed.notify_all();
                        if more {
                            // Asked for while this one was served.
                            continue;
                        }
                    }
                    Err(e) => {
                        self.failed(&format!("database: {e}"));
                        outbox = None;
                        continue;
                    }
                }
            }
            if last_look.is_none_or(|t| t.elapsed() >= self.poll) {
                last_look = Some(Instant::now());
                if let Err(e) = self.look(db.as_mut()) {
                    self.failed(&format!("database: {e}"));
                    outbox = None;
                    continue;
                }
            }
            self.wait(self.poll);
        }
        // Whoever still waits for a flush learns that we stopped.
        self.shared.flushed.notify_all();
    }

    /// Batches until the outbox has no row this relay may claim.
    fn drain(&self, db: &mut dyn Outbox) -> Result<(), BatchError> {
        loop {
            if self.shared.stopped() {
                return Ok(());
            }
            let mut applied = (0usize, Vec::new(), None::<Instant>);
            let claimed = Instant::now();
            let rows = db.claim(self.batch, &mut |rows| {
                let mut seen = HashSet::with_capacity(rows.len());
                let tokens: Vec<&str> = rows
                    .iter()
                    .map(|r| r.token.as_str())
                    .filter(|t| seen.insert(*t))
                    .collect();
                self.cache
                    .incr_many(&tokens)
                    .map_err(|e| format!("the cache did not take {} bumps: {e}", tokens.len()))?;
                let owned: Vec<String> = tokens.iter().map(|t| (*t).to_owned()).collect();
                if let Some(hook) = &self.after_bump {
                    hook(&owned).map_err(|e| format!("after_bump failed: {e}"))?;
                }
                applied = (rows.len(), owned, Some(Instant::now()));
                // Written → applied: the age the database saw at the claim
                // (its own clock), plus our time since.
                let since = claimed.elapsed().as_secs_f64();
                for r in rows {
                    self.shared.metrics.lag.record(r.age.max(0.0) + since);
                }
                Ok(())
            })?;
            if let (n, tokens, Some(_)) = applied {
                let c = &self.shared.counts;
                c.batches.fetch_add(1, Ordering::Relaxed);
                c.rows.fetch_add(n as u64, Ordering::Relaxed);
                c.bumps.fetch_add(tokens.len() as u64, Ordering::Relaxed);
                self.shared.metrics.rows.increment(n as u64);
                self.shared.metrics.bumps.increment(tokens.len() as u64);
                let mut state = self.shared.flush_state();
                if state.waiting > 0 {
                    state.log.extend(tokens);
                }
            }
            if rows < self.batch {
                return Ok(());
            }
        }
    }

    /// Every poll interval: the pending gauge, and a warning when rows wait.
    fn look(&self, db: &mut dyn Outbox) -> Result<(), DbError> {
        let (pending, oldest) = db.pending()?;
        self.shared.counts.pending.store(pending, Ordering::Relaxed);
        self.shared.metrics.pending.set(pending as f64);
        if let Some(age) = oldest.filter(|a| *a > WAIT_WARNING)
            && self.waiting_warned.due()
        {
            tracing::warn!(
                pending,
                oldest_secs = age.as_secs_f64(),
                last_error = self.shared.last_error().unwrap_or_default(),
                "icache relay: outbox rows are waiting (is the cache down, or another relay stuck?); \
                 this warning at most every 10 s"
            );
        }
        Ok(())
    }

    fn failed(&self, error: &str) {
        self.shared.counts.errors.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.errors.increment(1);
        self.shared.set_error(Some(error.to_owned()));
        if self.error_warned.due() {
            tracing::warn!(
                db = %self.url,
                error,
                "icache relay: will retry; the rows stay in the outbox (this warning at most every 10 s)"
            );
        }
    }

    /// Waits for a wake-up, a stop or `timeout`; wake-ups that piled up are
    /// taken together.
    fn wait(&self, timeout: Duration) {
        match self.wakes.recv_timeout(timeout) {
            Ok(()) => while self.wakes.try_recv().is_ok() {},
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
    }

    /// Sleeps `period` (a back-off): wake-ups do not cut it short, a stop does.
    fn pause(&self, period: Duration) {
        let deadline = Instant::now() + period;
        loop {
            let now = Instant::now();
            if now >= deadline || self.shared.stopped() {
                return;
            }
            if let Err(RecvTimeoutError::Disconnected) = self.wakes.recv_timeout(deadline - now) {
                thread::sleep(deadline - now);
            }
        }
    }
}
