//! What happened to each cached block during one render: [`observe`].
//!
//! For pages that show their work (the demo's panel), tests, and debugging:
//! run a render inside [`observe`] and get, for every block it met, whether
//! it was a hit, rendered and stored, rendered but not stored (and why),
//! taken from another thread's render, or rendered uncached because the cache
//! was down; with its tokens, version and render time. Blocks are recorded
//! on the calling thread (all MiniJinja rendering, `fragment`), when they
//! finish: an inner block comes before the block around it.
//!
//! When nothing observes, a block pays one thread-local check.

use std::cell::RefCell;
use std::time::Duration;

thread_local! {
    static OBSERVED: RefCell<Option<Vec<BlockEvent>>> = const { RefCell::new(None) };
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
        }
    }
}

/// Runs `f` and returns what it returned with every cached block it
/// rendered on this thread, in the order they finished.
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
    /// Puts the outer observation back, with this one's events added to it,
    /// even if `f` panics.
    struct Restore(Option<Vec<BlockEvent>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let mine = OBSERVED.with(|o| o.borrow_mut().take());
            let mut outer = self.0.take();
            if let (Some(outer), Some(mine)) = (outer.as_mut(), mine) {
                outer.extend(mine);
            }
            OBSERVED.with(|o| *o.borrow_mut() = outer);
        }
    }
    let restore = Restore(OBSERVED.with(|o| o.borrow_mut().replace(Vec::new())));
    let out = f();
    let mine = OBSERVED.with(|o| o.borrow().clone()).unwrap_or_default();
    drop(restore);
    (out, mine)
}

/// Is a render on this thread observed? (Only then are events built.)
pub(crate) fn observing() -> bool {
    OBSERVED.with(|o| o.borrow().is_some())
}

/// Records an event built by `make`, if this thread is observed.
pub(crate) fn emit(make: impl FnOnce() -> BlockEvent) {
    if observing() {
        let event = make();
        OBSERVED.with(|o| {
            if let Some(list) = o.borrow_mut().as_mut() {
                list.push(event);
            }
        });
    }
}
