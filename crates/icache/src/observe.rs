//! What happened to each cached block during one render: [`observe`].
//!
//! For pages that show their work (the demo's panel), tests, and debugging:
//! run a render inside [`observe`] and get, for every block it met, whether
//! it was a hit, rendered and stored, rendered but not stored (and why),
//! taken from another thread's render, or rendered uncached because the cache
//! was down; with its tokens, version and render time. Blocks are recorded
//! when they finish (an inner block comes before the block around it): on
//! the calling thread with [`observe`]; in every poll of a future, wherever
//! it runs, with [`observe_async`] (an axum handler, MiniJinja's
//! `render_async`); in work moved to another thread with [`Scope`].
//!
//! When nothing observes, a block pays one thread-local check.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::fragment::{Entered, SharedFrame, current_shared};

/// Where the events of one observation go: shared, because an observed
/// async render moves between threads (and into `spawn_blocking`).
type Sink = Arc<Mutex<Vec<BlockEvent>>>;

thread_local! {
    /// The observation the code running on this thread belongs to.
    static OBSERVED: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

fn take(sink: &Sink) -> Vec<BlockEvent> {
    std::mem::take(&mut *sink.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Puts `sink` (or none) as this thread's observation until dropped (even
/// on panic), then the one before it.
struct Swap(Option<Sink>);

impl Swap {
    fn to(sink: Option<Sink>) -> Swap {
        Swap(OBSERVED.with(|o| o.replace(sink)))
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        let before = self.0.take();
        OBSERVED.with(|o| *o.borrow_mut() = before);
    }
}

/// Hands this observation's events to the one around it (observations nest).
fn pass_up(events: &[BlockEvent]) {
    if let Some(outer) = OBSERVED.with(|o| o.borrow().clone())
        && !events.is_empty()
    {
        outer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(events);
    }
}

/// One cached block, as it went during an [`observe`]d render.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlockEvent {
    /// What identifies the block besides its tokens: for MiniJinja blocks
    /// `["minijinja", template, escape mode, position and digest, name]`,
    /// for [`fragment`](crate::ICache::fragment) `["named", name]`, for
    /// Askama `["askama", template type, name]`, for maud `["maud", name]`.
    pub identity: Vec<String>,
    /// The block's tokens, as strings.
    pub tokens: Vec<String>,
    /// The version served or stored (own tokens plus nested ones); `None`
    /// when the generations could not be read.
    pub version: Option<u64>,
    /// What happened.
    pub outcome: Outcome,
    /// An entry was there, stored under an older version: a bump of one of
    /// the block's tokens made this render necessary.
    pub invalidated: bool,
    /// How long the body took; `None` when it did not run here.
    pub render_time: Option<Duration>,
    /// How many cached blocks this one was inside (0: top level).
    pub depth: usize,
    /// Every token the served or stored output was computed from (the
    /// block's own and those of the blocks nested in it) with the
    /// generation it was computed at; empty when unknown (rendered uncached,
    /// caching off). What a page's validator (an HTTP `ETag`) can be built
    /// from: the same reads give the same output.
    pub reads: Vec<(String, u64)>,
}

/// What happened to a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Served from the cache: the body did not run.
    Hit,
    /// Rendered, and stored for the next readers.
    Stored,
    /// Rendered, served, not stored.
    NotStored(NotStored),
    /// Another thread was rendering the same version: its output was taken.
    Shared,
    /// The cache could not be read (down, hung, failing fast): rendered
    /// uncached.
    Uncached,
    /// Caching is off (`none://`): rendered.
    Off,
    /// Another render held the lease for the new version: the block's
    /// previous body was served (`stale=render`).
    Stale,
    /// The body returned an error: nothing was stored, and whatever the
    /// caller shows in its place (a fallback) depends on tokens nobody
    /// recorded.
    Failed,
}

/// Why a rendered block was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotStored {
    /// A token was bumped while the body rendered: the output was already
    /// outdated.
    Moved,
    /// A block inside it could not read its generations, or ended in an
    /// error or a panic that the body caught (a fallback in its place): the
    /// output depends on tokens nobody recorded.
    NestedUnknown,
    /// Larger than the backend takes.
    TooLarge,
    /// The server restarted (or the pool's routing changed) while rendering.
    ServerChanged,
    /// Storing failed (the backend went away meanwhile).
    BackendError,
}

impl Outcome {
    /// A short description: `hit`, `stored`, `not stored: …`, …
    pub fn describe(&self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Stored => "miss, rendered and stored",
            Outcome::NotStored(NotStored::Moved) => {
                "miss, rendered, not stored: a token moved while it rendered"
            }
            Outcome::NotStored(NotStored::NestedUnknown) => {
                "miss, rendered, not stored: an inner block could not be checked or failed"
            }
            Outcome::NotStored(NotStored::TooLarge) => {
                "miss, rendered, not stored: too large for the backend"
            }
            Outcome::NotStored(NotStored::ServerChanged) => {
                "miss, rendered, not stored: the server changed while it rendered"
            }
            Outcome::NotStored(NotStored::BackendError) => {
                "miss, rendered, not stored: the backend failed"
            }
            Outcome::Shared => "miss, taken from another request's render",
            Outcome::Uncached => "rendered uncached: the cache is down",
            Outcome::Off => "rendered: caching is off (none://)",
            Outcome::Stale => "miss, the previous body served while another render holds the lease",
            Outcome::Failed => "miss, the body failed: nothing stored",
        }
    }
}

/// Runs `f` and returns what it returned with every cached block it
/// rendered, in the order they finished: on this thread, and in work it
/// hands to other threads through [`Scope`] (as
/// [`minijinja::render_async`](crate::minijinja::render_async) does).
/// For an async render (an axum handler, `render_async`), use
/// [`observe_async`].
///
/// Observations nest: an inner `observe` sees its own blocks only, and they
/// are also reported to the outer one.
///
/// # Example
///
/// ```
/// let cache = icache::ICache::memory();
/// let render = || cache.fragment("list", &["movies"], || Ok::<_, ()>("<ul/>".to_string()));
/// let (_, first) = icache::observe(render);
/// let (_, second) = icache::observe(render);
/// assert_eq!(first[0].outcome, icache::Outcome::Stored);
/// assert_eq!(second[0].outcome, icache::Outcome::Hit);
/// assert_eq!(second[0].tokens, ["movies"]);
/// ```
pub fn observe<T>(f: impl FnOnce() -> T) -> (T, Vec<BlockEvent>) {
    let mine = Sink::default();
    let out = {
        let _swap = Swap::to(Some(mine.clone()));
        f()
    };
    let events = take(&mine);
    pass_up(&events);
    (out, events)
}

/// [`observe`] for a future: every cached block rendered while it runs, on
/// whichever thread each of its polls runs, and in work it hands to
/// blocking threads through [`Scope`] (MiniJinja's
/// [`render_async`](crate::minijinja::render_async) does). Blocks in tasks
/// it spawns are not its own.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cache = icache::ICache::memory();
/// let render = || cache.fragment_async("list", &["movies"], || async { Ok::<_, ()>("<ul/>".to_string()) });
/// let (_, first) = icache::observe_async(render()).await;
/// let (_, second) = icache::observe_async(render()).await;
/// assert_eq!(first[0].outcome, icache::Outcome::Stored);
/// assert_eq!(second[0].outcome, icache::Outcome::Hit);
/// # }
/// ```
pub async fn observe_async<F: Future>(fut: F) -> (F::Output, Vec<BlockEvent>) {
    let mine = Sink::default();
    let mut fut = std::pin::pin!(fut);
    let out = std::future::poll_fn(|cx| {
        let _swap = Swap::to(Some(mine.clone()));
        fut.as_mut().poll(cx)
    })
    .await;
    let events = take(&mine);
    pass_up(&events);
    (out, events)
}

/// What the cached blocks running now report to: the observation
/// ([`observe`], [`observe_async`]) and the enclosing async block
/// ([`fragment_async`](crate::ICache::fragment_async)), captured to carry
/// into work that continues on another thread, such as a render in
/// `tokio::task::spawn_blocking`. Without it, blocks rendered there are
/// neither observed nor added to the enclosing block's tokens.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cache = icache::ICache::memory();
/// let (html, events) = icache::observe_async(async {
///     let scope = icache::Scope::current();
///     let c = cache.clone();
///     tokio::task::spawn_blocking(move || {
///         scope.run(|| c.fragment("list", &["movies"], || Ok::<_, ()>("<ul/>".to_string())))
///     })
///     .await
/// })
/// .await;
/// assert_eq!(html.ok(), Some(Ok("<ul/>".to_string())));
/// assert_eq!(events.len(), 1);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Scope {
    sink: Option<Sink>,
    frame: Option<SharedFrame>,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope")
            .field("observed", &self.sink.is_some())
            .field("in_block", &self.frame.is_some())
            .finish()
    }
}

impl Scope {
    /// The scope of the code running now (empty outside any observation
    /// and async block).
    pub fn current() -> Scope {
        Scope {
            sink: OBSERVED.with(|o| o.borrow().clone()),
            frame: current_shared(),
        }
    }

    /// Runs `f` in this scope, on the calling thread.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        let _swap = self.sink.clone().map(|sink| Swap::to(Some(sink)));
        let _entered = self.frame.clone().map(Entered::enter);
        f()
    }
}

/// Is a render on this thread observed? (Only then are events built.)
pub(crate) fn observing() -> bool {
    OBSERVED.with(|o| o.borrow().is_some())
}

/// Records an event built by `make`, if this thread is observed.
pub(crate) fn emit(make: impl FnOnce() -> BlockEvent) {
    if let Some(sink) = OBSERVED.with(|o| o.borrow().clone()) {
        let event = make();
        sink.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event);
    }
}
