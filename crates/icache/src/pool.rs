//! A tiny pool of blocking connections to one server, shared by the network
//! backends, with a circuit breaker.
//!
//! Written here rather than taken from r2d2: we need only "reuse an idle
//! connection or open one, and drop it when anything went wrong", and r2d2
//! adds a reaper thread, health checks that cost a round trip per checkout
//! (the memcache crate's pool does that and hangs behind an unresponsive
//! server), and its own time-out semantics on top of ours.
//!
//! ## The circuit breaker
//!
//! A server that hangs costs every call a full time-out; a page with two
//! lookups would pay two. So after a call fails for a transient reason
//! (time-out, refused, reset) the pool fails every call **at once** for a
//! back-off period (250 ms, doubling up to 4 s while the server stays bad),
//! then lets **one** call through as a probe while the others keep failing
//! fast; the probe's success closes the breaker. Fail-open callers render
//! uncached at uncached speed meanwhile, and a failed bump is remembered and
//! replayed by the probe that finds the server back (see `ICache`).
//! The cost on the hot path, when closed, is one atomic load.
//!
//! Written here rather than taken from a crate (failsafe, recloser): those
//! wrap futures or closures with their own error types and policies, while
//! this is three atomics at the one place every call to a server passes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// First back-off after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest back-off while a server keeps failing.
const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// Fails calls fast while a server is known bad; one probe at a time.
#[derive(Debug)]
struct Breaker {
    /// Base of the millisecond clock below.
    born: Instant,
    /// Milliseconds since `born` until which calls fail fast; 0: closed.
    open_until: AtomicU64,
    /// The current back-off, in milliseconds (0: none yet).
    backoff: AtomicU64,
    /// A probe is in flight.
    probing: AtomicBool,
    /// The failure that opened the breaker, for the fail-fast errors (which
    /// would otherwise hide why the server is skipped).
    cause: Mutex<Option<String>>,
}

/// What the breaker says about one call.
enum Gate {
    /// Closed: go ahead.
    Pass,
    /// Open, and this call is the one probe.
    Probe,
}

impl Breaker {
    fn new() -> Self {
        Breaker {
            born: Instant::now(),
            open_until: AtomicU64::new(0),
            backoff: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            cause: Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .max(1)
    }

    fn check(&self, server: &str) -> Result<Gate> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Ok(Gate::Pass);
        }
        let now = self.now_ms();
        if now >= until
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Ok(Gate::Probe);
        }
        let wait = until.saturating_sub(now);
        let cause = self
            .cause
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Err(Error::circuit_open(match cause {
            Some(cause) => format!(
                "{server}: calls fail fast for {wait} ms more, then one probe tries again; it failed with: {cause}"
            ),
            None => format!(
                "{server}: failed recently; calls fail fast for {wait} ms more, then one probe tries again"
            ),
        }))
    }

    /// The server answered (perhaps with an error of its own): close.
    fn succeeded(&self, gate: &Gate) {
        if matches!(gate, Gate::Probe) || self.open_until.load(Ordering::Relaxed) != 0 {
            self.open_until.store(0, Ordering::Release);
            self.backoff.store(0, Ordering::Relaxed);
            self.probing.store(false, Ordering::Release);
        }
    }

    /// The server did not answer: open, for a longer back-off when the one
    /// probe failed. Calls admitted while the breaker was closed that fail
    /// together (one incident seen by several threads) open it once, at the
    /// shortest back-off.
    fn failed(&self, gate: &Gate, cause: Option<&Error>) {
        let min = BACKOFF_MIN.as_millis() as u64;
        let max = BACKOFF_MAX.as_millis() as u64;
        let backoff = match (gate, self.backoff.load(Ordering::Relaxed)) {
            (Gate::Probe, b) if b > 0 => b.saturating_mul(2).min(max),
            (Gate::Pass, b) if b > 0 && self.open_until.load(Ordering::Acquire) != 0 => return,
            _ => min,
        };
        if let Some(cause) = cause {
            *self
                .cause
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cause.to_string());
        }
        self.backoff.store(backoff, Ordering::Relaxed);
        self.open_until
            .store(self.now_ms().saturating_add(backoff), Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    fn record<T>(&self, gate: &Gate, out: &Result<T>) {
        match out {
            // A probe must always settle the breaker.
            Err(e) if e.is_circuit_open() && matches!(gate, Gate::Probe) => self.failed(gate, None),
            Err(e) if e.is_circuit_open() => {}
            Err(e) if e.is_transient() => self.failed(gate, Some(e)),
            _ => self.succeeded(gate),
        }
    }
}

pub(crate) struct Pool<C> {
    idle: Mutex<Vec<C>>,
    max_idle: usize,
    breaker: Breaker,
    /// Names the server in fail-fast errors (a redacted URL).
    name: String,
}

impl<C> Pool<C> {
    pub(crate) fn new(max_idle: usize) -> Self {
        Pool {
            idle: Mutex::new(Vec::with_capacity(max_idle)),
            max_idle,
            breaker: Breaker::new(),
            name: "the cache server".to_owned(),
        }
    }

    /// Names the server in fail-fast errors (never with a password).
    #[must_use]
    pub(crate) fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Lets a call through the circuit breaker, or fails it at once while the
    /// breaker is open (but for one probe). For callers that drive
    /// connections themselves (parallel fetches); [`with`](Self::with) does
    /// this itself. Hand the outcome to [`record`](Self::record).
    pub(crate) fn admit(&self) -> Result<Admitted<'_>> {
        self.breaker.check(&self.name).map(|gate| Admitted {
            gate,
            breaker: &self.breaker,
            recorded: false,
        })
    }

    /// Records how an admitted call went.
    pub(crate) fn record<T>(&self, mut admitted: Admitted<'_>, out: &Result<T>) {
        admitted.recorded = true;
        self.breaker.record(&admitted.gate, out);
    }

    /// Runs `f` on an idle connection, or on a new one from `connect`. The
    /// connection goes back to the pool only if `f` succeeded: after an error we
    /// cannot know what is left unread on it.
    ///
    /// An idle connection may have died while it waited (the server restarted):
    /// if it fails as unavailable, the pool is emptied and `f` runs once more on
    /// a new connection. Every operation we run is safe to repeat (a repeated
    /// bump is just one more bump).
    ///
    /// Goes through the circuit breaker (see the module docs).
    pub(crate) fn with<T>(
        &self,
        connect: impl Fn() -> Result<C>,
        f: impl Fn(&mut C) -> Result<T>,
    ) -> Result<T> {
        let admitted = self.admit()?;
        let out = self.with_unguarded(connect, f);
        self.record(admitted, &out);
        out
    }

    fn with_unguarded<T>(
        &self,
        connect: impl Fn() -> Result<C>,
        f: impl Fn(&mut C) -> Result<T>,
    ) -> Result<T> {
        let idle = self.lock().pop();
        if let Some(mut conn) = idle {
            match f(&mut conn) {
                Ok(v) => {
                    self.put(conn);
                    return Ok(v);
                }
                Err(e) if !e.is_unavailable() => return Err(e),
                Err(_) => self.clear(),
            }
        }
        let mut conn = connect()?;
        let out = f(&mut conn)?;
        self.put(conn);
        Ok(out)
    }

    /// An idle connection, if there is one (for callers that drive several
    /// connections at once; give it back with [`put`](Self::put)).
    pub(crate) fn take(&self) -> Option<C> {
        self.lock().pop()
    }

    /// Returns a connection that is known to be in a clean state.
    pub(crate) fn put(&self, conn: C) {
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    /// Drops every idle connection (after the server went away, say).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<C>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A call the breaker let through; hand it back to [`Pool::record`]. If it
/// never is (the call panicked), the call counts as failed: a probe that
/// vanished must not leave the breaker waiting for it forever.
pub(crate) struct Admitted<'a> {
    gate: Gate,
    breaker: &'a Breaker,
    recorded: bool,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.recorded && matches!(self.gate, Gate::Probe) {
            self.breaker.failed(&self.gate, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes an open breaker's back-off be over.
    fn elapse(pool: &Pool<()>) {
        pool.breaker.open_until.store(1, Ordering::SeqCst);
    }

    #[test]
    fn one_probe_at_a_time_and_a_vanished_probe_settles() {
        let pool: Pool<()> = Pool::new(1);
        assert!(pool.admit().is_ok(), "closed");
        pool.breaker.failed(&Gate::Pass, None);
        let e = pool.admit().err().expect("open: fails fast");
        assert!(e.is_circuit_open() && e.is_unavailable());
        elapse(&pool);
        let probe = pool.admit().expect("the back-off is over: one probe");
        assert!(pool.admit().is_err(), "only one probe at a time");
        // The probe's call panicked: it is never recorded.
        drop(probe);
        elapse(&pool);
        let probe = pool.admit().expect("a new probe, not stuck");
        pool.record(probe, &Ok::<(), Error>(()));
        assert!(
            pool.admit().is_ok(),
            "a successful probe closes the breaker"
        );
    }

    #[test]
    fn only_a_failed_probe_doubles_the_back_off() {
        let pool: Pool<()> = Pool::new(1);
        let timeout = || Err::<(), _>(Error::new(crate::ErrorKind::Timeout, "hung"));
        for _ in 0..3 {
            // Several calls of one incident fail together.
            let a = pool.admit();
            if let Ok(a) = a {
                pool.record(a, &timeout());
            }
        }
        assert_eq!(pool.breaker.backoff.load(Ordering::SeqCst), 250);
        elapse(&pool);
        let probe = pool.admit().expect("probe");
        pool.record(probe, &timeout());
        assert_eq!(pool.breaker.backoff.load(Ordering::SeqCst), 500);
    }

    /// The fail-fast error says why the server is skipped.
    #[test]
    fn fail_fast_errors_keep_the_original_cause() {
        let pool: Pool<()> = Pool::new(1).named("redis://127.0.0.1:1");
        let a = pool.admit().expect("closed");
        let cause = Error::new(
            crate::ErrorKind::Timeout,
            "redis MGET on redis://127.0.0.1:1: no answer within 100ms",
        );
        pool.record(a, &Err::<(), _>(cause));
        let e = pool.admit().err().expect("open: fails fast");
        let text = e.to_string();
        assert!(text.contains("fail fast for"), "{text}");
        assert!(text.contains("no answer within 100ms"), "{text}");
    }
}
