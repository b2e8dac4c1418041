//! Fill leases (`fill=lease`, the default on network backends): one render
//! per (block, version) across every process that shares the cache, not one
//! per process.
//!
//! On a miss the process's single-flight leader first takes a lease for the
//! block's key and the version it read, on the server (`SET … NX PX`,
//! memcached `add` with an expiry). The one that gets it renders and stores
//! as before. The others wait for its entry (polling the block, which is the
//! same one round trip as a lookup) for at most `lease_ms`, then render
//! themselves: a lease holder that died, hangs or could not store costs the
//! others `lease_ms` at most, never a hang, and a backend error while taking
//! a lease renders at once (fail-open).
//!
//! The lease is the only thing icache stores with a time limit, and it never
//! decides **what** is served, only **who** renders: whatever a waiter gets
//! passed the same version check as any hit. So leases cannot make anything
//! stale; a lost or expired lease only costs a duplicate render.
//!
//! `stale=render` (per handle, or per block) trades the wait for the
//! block's **previous** body: while another render holds the lease for the
//! new version, the entry still under the block's key (stored for an older
//! version) is served at once. Once the new entry is stored it replaces the
//! old one under the same key, so nobody gets the old body any more; and a
//! handle that bumped one of the block's tokens in the last `lease_ms` never
//! gets it (it reads its own writes). A stale body inside an enclosing
//! render marks that render's dependencies unknown, so the outer block is
//! not stored with it.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

#[cfg(any(feature = "redis", feature = "memcached"))]
use crate::codec::{self, Entry, Payload};
use crate::core::Core;
use crate::keys::Key;
use crate::stats::Event;

/// The first pause between two polls of a lease holder's entry; doubled up
/// to [`POLL_MAX`].
const POLL_FIRST: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(20);

/// What a lease holds: a plain entry, so that a waiter can tell "still
/// held" (it decodes) from "gone" with the ordinary fetch.
#[cfg(any(feature = "redis", feature = "memcached"))]
pub(crate) fn value() -> Vec<u8> {
    codec::encode(
        &Entry {
            version: None,
            deps: Vec::new(),
            payload: Payload::Text(Arc::from("lease")),
        },
        None,
    )
}

/// The lease's name for one (block, version).
fn lease_name(block: &str, version: u64) -> String {
    format!("{block}@{version}")
}

thread_local! {
    /// The per-block `stale` choice for the next block this thread looks
    /// up (set by the API that opens it, taken by the engine at once, so the
    /// blocks nested in its body do not inherit it).
    static BLOCK_STALE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Sets the `stale` choice of the next block this thread opens (`None`:
/// the handle's `stale=`).
pub(crate) fn choose_for_next_block(stale: Option<bool>) {
    BLOCK_STALE.with(|c| c.set(stale));
}

/// The choice for the block being opened, cleared for the next one.
pub(crate) fn take_block_choice() -> Option<bool> {
    BLOCK_STALE.with(Cell::take)
}

/// Per-block choices for [`ICache::fragment_with`](crate::ICache::fragment_with).
///
/// # Example
///
/// ```
/// let cache = icache::ICache::memory();
/// let options = icache::BlockOptions::new().stale_render(true);
/// let html = cache.fragment_with("top-movies", &["movies"], options, || {
///     Ok::<_, std::fmt::Error>("<ol/>".to_string())
/// })?;
/// assert_eq!(html, "<ol/>");
/// # Ok::<(), std::fmt::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct BlockOptions {
    stale: Option<bool>,
}

impl BlockOptions {
    /// The handle's choices for everything.
    pub fn new() -> Self {
        BlockOptions::default()
    }

    /// `true`: this block serves its previous body while another render
    /// holds the lease for the new version (`stale=render` for this block
    /// alone); `false`: it never does, even on a `stale=render` handle.
    /// Needs `fill=lease` (the default on network backends); in process
    /// there is no lease and this changes nothing.
    pub fn stale_render(mut self, on: bool) -> Self {
        self.stale = Some(on);
        self
    }
}

impl crate::ICache {
    /// [`fragment`](Self::fragment) with per-block choices
    /// ([`BlockOptions`]): for example stale-while-render for one hot block
    /// of a handle that otherwise waits for fresh output.
    ///
    /// # Example
    ///
    /// ```
    /// let cache = icache::ICache::memory();
    /// let fresh = icache::BlockOptions::new().stale_render(false);
    /// let html = cache.fragment_with("cart", &["cart:42"], fresh, || {
    ///     Ok::<_, std::fmt::Error>("<p>2 items</p>".to_string())
    /// })?;
    /// assert_eq!(html, "<p>2 items</p>");
    /// # Ok::<(), std::fmt::Error>(())
    /// ```
    pub fn fragment_with<E, T: AsRef<str>>(
        &self,
        name: &str,
        tokens: &[T],
        options: BlockOptions,
        render: impl FnOnce() -> Result<String, E>,
    ) -> Result<String, E> {
        choose_for_next_block(options.stale);
        let out = self.fragment(name, tokens, render);
        // Should the block never have been opened (no lookup at all).
        choose_for_next_block(None);
        out
    }
}

/// What to do about a miss, after the lease.
pub(crate) enum Fill<T> {
    /// Render: this process took the lease (or leases are off, or the wait
    /// ran out, or the backend failed).
    Render,
    /// The lease holder's entry, found while waiting.
    Found(T),
    /// The block's previous body (`stale=render`).
    Stale(Arc<str>),
}

/// What one poll of the block found while waiting.
pub(crate) enum Poll<T> {
    /// The entry for this version (or a newer one) is there.
    Found(T),
    /// Not yet.
    Wait,
    /// Waiting is pointless (the version moved, the backend failed): render.
    GiveUp,
}

/// The tokens this handle bumped lately, for `stale=render`'s "read your
/// own writes".
#[derive(Debug, Default)]
pub(crate) struct Bumps {
    at: Mutex<HashMap<Box<str>, Instant>>,
}

/// Above this many remembered bumps, the old ones are dropped.
const BUMPS_KEPT: usize = 4096;

impl Bumps {
    /// This handle bumped `tokens` now.
    pub(crate) fn bumped(&self, tokens: &[&str], window: Duration) {
        let now = Instant::now();
        let mut at = self.at.lock().unwrap_or_else(PoisonError::into_inner);
        if at.len() >= BUMPS_KEPT {
            at.retain(|_, t| now.duration_since(*t) < window);
        }
        for t in tokens {
            at.insert(Box::from(*t), now);
        }
    }

    /// Did this handle bump one of `tokens` in the last `window`?
    pub(crate) fn within(&self, tokens: &[&str], window: Duration) -> bool {
        let at = self.at.lock().unwrap_or_else(PoisonError::into_inner);
        if at.is_empty() {
            return false;
        }
        let now = Instant::now();
        tokens.iter().any(|t| {
            at.get(*t)
                .is_some_and(|when| now.duration_since(*when) < window)
        })
    }
}

/// Decides a miss of `block` at `version` (its own tokens' version: the
/// one every process reads the same). `previous` is the body stored for an
/// older version, offered when `stale` is on; `poll` looks the block up
/// again.
pub(crate) fn before_render<T>(
    core: &Core,
    block: &str,
    version: u64,
    tokens: &[&str],
    stale: bool,
    previous: Option<Arc<str>>,
    mut poll: impl FnMut() -> Poll<T>,
) -> Fill<T> {
    let Some(lease) = core.config.lease else {
        return Fill::Render;
    };
    let name = lease_name(block, version);
    match core.backend.lease(Key::lease(&name), lease) {
        Ok(true) => return Fill::Render,
        Ok(false) => {}
        Err(e) => {
            core.backend_trouble(&e);
            return Fill::Render;
        }
    }
    // Another process renders this version.
    if stale
        && let Some(body) = previous
        && !core.bumps.within(tokens, lease)
    {
        core.counters.count(Event::StaleServed);
        return Fill::Stale(body);
    }
    core.counters.count(Event::LeaseWait);
    let deadline = Instant::now() + lease;
    let mut pause = POLL_FIRST;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Fill::Render;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(POLL_MAX);
        match poll() {
            Poll::Found(found) => return Fill::Found(found),
            Poll::GiveUp => return Fill::Render,
            Poll::Wait => {}
        }
        // The holder gave the lease up (it could not store) or it expired:
        // nothing more will come; render now rather than at the deadline.
        match core.backend.get_entry(Key::lease(&name)) {
            Ok(Some(_)) => {}
            Ok(None) => return Fill::Render,
            Err(e) => {
                core.backend_trouble(&e);
                return Fill::Render;
            }
        }
    }
}

/// The holder could not store its render (outdated, too large, a body
/// error): gives the lease up so that waiters render at once.
pub(crate) fn release(core: &Core, block: &str, version: u64) {
    if core.config.lease.is_none() {
        return;
    }
    if let Err(e) = core.backend.delete(Key::lease(&lease_name(block, version))) {
        core.backend_trouble(&e);
    }
}

/// Gives the lease up if the holder's body panics (dropped while the thread
/// unwinds); does nothing on a normal return, where the store or
/// [`release`] decides.
pub(crate) struct ReleaseOnPanic<'a> {
    core: &'a Core,
    block: &'a str,
    version: u64,
}

impl<'a> ReleaseOnPanic<'a> {
    pub(crate) fn new(core: &'a Core, block: &'a str, version: u64) -> Self {
        ReleaseOnPanic {
            core,
            block,
            version,
        }
    }
}

impl Drop for ReleaseOnPanic<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            release(self.core, self.block, self.version);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bumps_are_remembered_for_the_window() {
        let b = Bumps::default();
        assert!(!b.within(&["movies"], Duration::from_secs(1)));
        b.bumped(&["movies"], Duration::from_secs(1));
        assert!(b.within(&["a", "movies"], Duration::from_secs(1)));
        assert!(!b.within(&["a"], Duration::from_secs(1)));
        assert!(!b.within(&["movies"], Duration::ZERO));
    }

    #[test]
    #[cfg(any(feature = "redis", feature = "memcached"))]
    fn lease_values_decode_as_plain_entries() {
        let (entry, _) = codec::decode(bytes::Bytes::from(value())).expect("decodes");
        assert_eq!(entry.version, None);
        assert_ne!(lease_name("b", 1), lease_name("b", 11));
    }
}
