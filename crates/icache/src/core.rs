//! What every part of a cache handle shares: the backend, its settings and
//! counters, and the bumps still to be replayed. The public handle
//! ([`ICache`](crate::ICache), `cache.rs`) and the block engine
//! (`fragment.rs`) both work on a `Core`; neither depends on the other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::{self, Backend, Fetched};
use crate::codec::Entry;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::keys::Key;
use crate::near::{Gens, Near};
use crate::stats::{Counters, Event, Every};

/// Bumps that failed (the backend was down or hung), to be replayed.
///
/// Every failed bump is remembered, whatever else failed. A replay copies the
/// list and applies it **without holding the lock across I/O**, one replay at
/// a time (others fail fast meanwhile, and the backend's circuit breaker
/// rate-limits the attempts), in chunks (a long outage can leave thousands of
/// tokens: one huge pipeline would never fit in a time-out); it removes only
/// what was remembered before it started, so a bump that failed during the
/// replay is replayed again later.
pub(crate) struct Pending {
    list: Mutex<PendingList>,
    /// Something is pending: one atomic load on the read path when not.
    has: AtomicBool,
    /// A replay is in flight.
    replaying: AtomicBool,
    /// "Bump failed" warnings, at most every 10 s.
    log: Every,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            list: Mutex::default(),
            has: AtomicBool::new(false),
            replaying: AtomicBool::new(false),
            log: Every::new(),
        }
    }
}

/// Tokens replayed in one round trip.
const REPLAY_CHUNK: usize = 256;

#[derive(Default)]
struct PendingList {
    /// Counts `remember` calls.
    seq: u64,
    /// Each token, with the `seq` of its latest failed bump.
    tokens: std::collections::HashMap<String, u64>,
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
            list.tokens.insert((*t).to_owned(), seq);
        }
        self.has.store(true, Ordering::Release);
        if self.log.due() {
            tracing::warn!(
                tokens = list.tokens.len(),
                "icache: bump failed; it will be replayed, and blocks render uncached until it is (this warning at most every 10 s)"
            );
        }
    }

    /// Applies the pending bumps with `apply`; `Ok` when none is left.
    pub(crate) fn replay(&self, apply: impl Fn(&[&str]) -> Result<()>) -> Result<()> {
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
            let tokens: Vec<String> = list.tokens.keys().cloned().collect();
            (list.seq, tokens)
        };
        for chunk in tokens.chunks(REPLAY_CHUNK) {
            let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
            apply(&names)?;
            // Each chunk is done as it succeeds: a later failure does not
            // make it be replayed again.
            let mut list = self.lock();
            for t in chunk {
                if list.tokens.get(t).is_some_and(|s| *s <= seq) {
                    list.tokens.remove(t);
                }
            }
            if list.tokens.is_empty() {
                self.has.store(false, Ordering::Release);
            }
        }
        tracing::info!(
            tokens = tokens.len(),
            "icache: replayed bumps that had failed"
        );
        Ok(())
    }
}

/// The shared state of one cache handle and all its clones.
pub(crate) struct Core {
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) config: Config,
    pub(crate) counters: Counters,
    /// Tokens whose bump failed (backend down): replayed before this handle
    /// reads any generation again, so it never serves what they invalidated.
    pub(crate) pending: Pending,
    /// Fail-open warnings, at most every 10 s.
    pub(crate) trouble_log: Every,
    /// "Too large" warnings, at most every 10 s.
    pub(crate) too_large_log: Every,
    /// `?near=`: what is also kept in process (`None`: nothing).
    pub(crate) near: Option<Near>,
    /// Keeps the `near=tracking` thread running while the handle lives.
    pub(crate) _tracking: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// The tokens this handle bumped lately (`stale=render` never serves
    /// their blocks' old bodies to it).
    pub(crate) bumps: crate::lease::Bumps,
}

impl Core {
    pub(crate) fn new(backend: Box<dyn Backend>, config: Config, near: Option<Near>) -> Core {
        let counters = Counters::new(backend.name());
        Core {
            backend,
            config,
            counters,
            pending: Pending::default(),
            trouble_log: Every::new(),
            too_large_log: Every::new(),
            near,
            _tracking: None,
            bumps: crate::lease::Bumps::default(),
        }
    }

    /// The generations kept coherent in process (`near=tracking`).
    fn tracked(&self) -> Option<&Gens> {
        self.near.as_ref()?.gens.as_deref()
    }

    /// The generations of `tokens` from the in-process table, when every one
    /// is there and the table may be trusted (`near=tracking`): no round trip.
    pub(crate) fn local_gens(&self, tokens: &[&str]) -> Option<(Vec<u64>, Arc<str>)> {
        self.tracked()?.trusted(tokens)
    }

    /// The server instance the in-process generations are from, while they
    /// may be trusted (`near=tracking`).
    pub(crate) fn tracked_instance(&self) -> Option<Arc<str>> {
        self.tracked()?.instance()
    }

    /// [`Backend::fetch`], keeping the generations it read in process under
    /// `near=tracking` (unless an invalidation for one arrived meanwhile).
    pub(crate) fn fetch(&self, tokens: &[&str], entries: &[Key<'_>]) -> Result<Fetched> {
        let Some(gens) = self.tracked() else {
            return self.backend.fetch(tokens, entries);
        };
        let fill = gens.begin_fill(tokens);
        let fetched = self.backend.fetch(tokens, entries)?;
        if let Some(fill) = fill {
            gens.end_fill(fill, tokens, &fetched.gens, fetched.instance.as_ref());
        }
        Ok(fetched)
    }

    /// Keeps `entry`, read from or stored on `instance`, in the near cache.
    pub(crate) fn keep_near(
        &self,
        kind: crate::near::Kind,
        name: &str,
        instance: Option<&Arc<str>>,
        entry: Arc<Entry>,
    ) {
        if let Some(near) = &self.near {
            near.keep(kind, name, instance, entry);
            self.counters.near_bytes(near.bytes());
        }
    }

    /// Drops in-process generations of `tokens` (this handle bumped them:
    /// its own reads see the bump at once).
    pub(crate) fn forget_local(&self, tokens: &[&str]) {
        if let Some(gens) = self.tracked() {
            gens.forget(tokens);
        }
    }

    /// `"memory"`, `"redis"`, …
    pub(crate) fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Bumps wait to be replayed (their replay is I/O): one atomic load.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.has.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The memory and `none://` backends: no I/O, nothing ever blocks.
    pub(crate) fn is_in_process(&self) -> bool {
        matches!(self.backend_name(), "memory" | "none")
    }

    /// Bumps `tokens` atomically in the backend; a failure is remembered
    /// (whatever else failed before) and replayed later.
    pub(crate) fn incr_many(&self, tokens: &[&str]) -> Result<Vec<u64>> {
        // Bumps commute: this one need not wait for older failed ones, and a
        // failure here is remembered whatever else failed before.
        let keys: Vec<Key<'_>> = tokens.iter().map(|t| Key::gen_(t)).collect();
        let fresh = backend::fresh_generations(keys.len());
        let out = self.backend.incr_gens(&keys, &fresh);
        // Whether or not it went through, this handle's copies are suspect.
        self.forget_local(tokens);
        match out {
            Ok(gens) => {
                // The backend answers: a good moment to replay older failures.
                let _ = self.replay_pending();
                Ok(gens)
            }
            Err(e) => {
                if !e.is_config() {
                    self.pending.remember(tokens);
                }
                Err(e)
            }
        }
    }

    /// Replays bumps that failed earlier. Cheap when there are none (one
    /// atomic load); an error means they still cannot be applied (and the
    /// caller must not trust what the backend says about generations).
    pub(crate) fn replay_pending(&self) -> Result<()> {
        self.pending.replay(|tokens| {
            let keys: Vec<Key<'_>> = tokens.iter().map(|t| Key::gen_(t)).collect();
            let fresh = backend::fresh_generations(keys.len());
            let out = self.backend.incr_gens(&keys, &fresh).map(drop);
            self.forget_local(tokens);
            out
        })
    }

    /// The current generation of each token (missing ones initialised), after
    /// replaying failed bumps. One round trip when all exist.
    pub(crate) fn generations(&self, tokens: &[&str]) -> Result<Vec<u64>> {
        self.replay_pending()?;
        if let Some((gens, _)) = self.local_gens(tokens) {
            return Ok(gens);
        }
        let fetched = self.fetch(tokens, &[])?;
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
        let got = self.backend.init_gens(&missing_keys, &fresh)?;
        let mut out: Vec<u64> = gens.into_iter().map(|g| g.unwrap_or(0)).collect();
        for (i, g) in missing.into_iter().zip(got) {
            out[i] = g;
        }
        Ok(out)
    }

    /// Fail-open bookkeeping: count, and warn at most every 10 seconds.
    pub(crate) fn backend_trouble(&self, e: &Error) {
        self.counters.count(Event::Error);
        if self.trouble_log.due() {
            tracing::warn!(backend = self.backend_name(), error = %e, "icache: cache backend trouble; rendering uncached");
        } else {
            tracing::debug!(error = %e, "icache: cache backend trouble");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn tokens(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t{i}")).collect()
    }

    #[test]
    fn a_long_outage_replays_in_chunks_and_keeps_what_failed() {
        let pending = Pending::default();
        let names = tokens(1000);
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        pending.remember(&refs);
        // The third chunk fails: the first two are done, the rest stays.
        let calls = AtomicUsize::new(0);
        let out = pending.replay(|chunk| {
            assert!(chunk.len() <= REPLAY_CHUNK);
            if calls.fetch_add(1, Ordering::SeqCst) == 2 {
                Err(Error::new(crate::ErrorKind::Timeout, "hung"))
            } else {
                Ok(())
            }
        });
        assert!(out.is_err());
        assert_eq!(pending.lock().tokens.len(), 1000 - 2 * REPLAY_CHUNK);
        assert!(pending.has.load(Ordering::SeqCst));
        // A bump that fails while a replay runs is kept for the next one.
        let first = std::sync::atomic::AtomicBool::new(true);
        let out = pending.replay(|_| {
            if first.swap(false, Ordering::SeqCst) {
                pending.remember(&["late"]);
            }
            Ok(())
        });
        assert!(out.is_ok());
        let left: Vec<String> = pending.lock().tokens.keys().cloned().collect();
        assert_eq!(left, ["late"]);
        pending.replay(|_| Ok(())).expect("replay");
        assert!(!pending.has.load(Ordering::SeqCst));
    }
}
