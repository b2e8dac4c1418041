//! What a page's blocks read.
//!
//! * [`observe_async`], TEMPORARY until `icache::observe_async` lands (issue
//!   22): observes the handler's future poll by poll (blocks rendered on the
//!   polling thread) and collects what a handler hands over through
//!   [`PageEvents`] (blocks rendered in `spawn_blocking`).
//! * [`reads`]: the generations each block read before it rendered
//!   (`BlockEvent::reads`), never re-read after the render: a tag for new
//!   generations over old content would validate that content forever.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};

use icache::{BlockEvent, Outcome};

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
/// let (_, seen) = icache::observe(|| cache.fragment("b", &["t"], || Ok::<_, ()>("x".into())));
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

/// Every token the page's blocks read with its generation (as each block
/// read it before rendering: `BlockEvent::reads`), or `None` when any block
/// was not served from known generations (rendered uncached, caching off,
/// an inner block unknown, or no token at all).
pub(crate) fn reads(events: &[BlockEvent]) -> Option<Vec<(String, u64)>> {
    let mut all = Vec::new();
    for e in events {
        if !matches!(
            e.outcome,
            Outcome::Hit | Outcome::Stored | Outcome::Shared | Outcome::NotStored(_)
        ) || e.reads.is_empty()
        {
            return None;
        }
        all.extend(e.reads.iter().cloned());
    }
    // The same token read at two generations (a bump between two blocks)
    // stays twice: such a page is never current, so never a 304.
    all.sort_unstable();
    all.dedup();
    Some(all)
}
