//! TEMPORARY SHIM, to be removed when `BlockEvent::reads` and
//! `icache::observe_async` land in `icache` (issue 22, engineer i22core).
//!
//! * [`observe_async`]: observes the handler's future poll by poll (blocks
//!   rendered on the polling thread) and collects what a handler hands over
//!   through [`PageEvents`] (blocks rendered in `spawn_blocking`).
//! * [`reads`]: the generations each block read. Until events carry them,
//!   they are read once more after the render and kept **only if** every
//!   block's recorded version (read before it rendered) is the sum of those
//!   generations: then they are the ones the block read (up to the 2^-62
//!   chance of the version model). Any other outcome (a bump meanwhile, a
//!   nested block whose recorded tokens are not in its event) gives no
//!   reads, so no ETag: never an ETag for new generations over old content.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};

use icache::{BlockEvent, ICache, Outcome};

/// Where a handler hands over the blocks it rendered off the polled thread
/// (`spawn_blocking`): found in the request's extensions.
///
/// Temporary: once `icache::observe_async` sees blocks rendered in
/// `spawn_blocking`, handlers need not do this.
///
/// # Example
///
/// ```
/// let events = icache_http::PageEvents::default();
/// let cache = icache::ICache::memory();
/// let (_, seen) = icache::observe(|| cache.fragment_named("b", &["t"], || Ok::<_, ()>("x".into())));
/// events.record(seen);
/// ```
#[derive(Clone, Default, Debug)]
pub struct PageEvents(Arc<Mutex<Vec<BlockEvent>>>);

impl PageEvents {
    /// Adds the events of a render done for this request.
    pub fn record(&self, events: impl IntoIterator<Item = BlockEvent>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(events);
    }

    fn take(&self) -> Vec<BlockEvent> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Calls `call` and runs its future to completion, returning its output
/// and the blocks rendered (in `call` itself, which for a tower service may
/// do the work, on the polling thread, and handed over to `handed`).
pub(crate) async fn observe_async<F: Future>(
    call: impl FnOnce() -> F,
    handed: PageEvents,
) -> (F::Output, Vec<BlockEvent>) {
    let (fut, mut seen) = icache::observe(call);
    let mut fut = pin!(fut);
    let out = std::future::poll_fn(|cx| {
        let (poll, events) = icache::observe(|| fut.as_mut().poll(cx));
        seen.extend(events);
        poll
    })
    .await;
    seen.extend(handed.take());
    (out, seen)
}

/// Every token the page's blocks read with its generation, or `None` when
/// any block was not served from known generations.
pub(crate) async fn reads(cache: &ICache, events: &[BlockEvent]) -> Option<Vec<(String, u64)>> {
    let mut tokens: Vec<&str> = Vec::new();
    for e in events {
        if !matches!(
            e.outcome,
            Outcome::Hit | Outcome::Stored | Outcome::Shared | Outcome::NotStored(_)
        ) {
            return None;
        }
        e.version?;
        tokens.extend(e.tokens.iter().map(String::as_str));
    }
    tokens.sort_unstable();
    tokens.dedup();
    if tokens.is_empty() {
        return Some(Vec::new());
    }
    let gens = cache.generations_async(&tokens).await.ok()?;
    let of = |t: &str| {
        tokens
            .binary_search(&t)
            .ok()
            .and_then(|i| gens.get(i).copied())
    };
    for e in events {
        let mut sum = 0u64;
        for t in &e.tokens {
            sum = sum.wrapping_add(of(t)?);
        }
        if Some(sum) != e.version {
            return None;
        }
    }
    Some(
        tokens
            .iter()
            .map(|t| (*t).to_owned())
            .zip(gens.iter().copied())
            .collect(),
    )
}
