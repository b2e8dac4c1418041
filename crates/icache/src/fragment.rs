//! The block engine ([`Blocks`]) behind `fragment`,
//! `fragment_async` (in `cache.rs`) and the template integrations. It owns its
//! state (renders in flight, nested-token hints) and works on the shared
//! [`Core`]; it does not know `ICache`.
//!
//! A lookup fetches the tokens' generations **and** the entry in one round
//! trip (plus the generations of nested tokens the entry was last seen with,
//! remembered per process in `dep_hints`). On a miss the body is rendered once
//! per process and version (single-flight), the generations are read again, and
//! the output is stored only if they did not move while it rendered.
//!
//! Nested blocks: while a body renders, a thread-local frame collects the
//! generations every block inside it read. The outer entry stores those tokens
//! (`deps`) and includes their generations in its version, so a bump of an
//! inner token invalidates the outer block too.

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use crate::codec::{Entry, Payload};
use crate::core::Core;
use crate::error::Result;
use crate::keys::{Key, join_parts_into, push_decimal};
use crate::lease;
use crate::near;
use crate::observe::{self, BlockEvent, NotStored, Outcome};
use crate::stats::Event;

/// Token generations as read by one render: `(token, generation)`.
type Reads = Vec<(Box<str>, u64)>;

/// What one render learned from the blocks nested in it.
#[derive(Default)]
pub(crate) struct Nested {
    reads: Reads,
    /// A nested block could not read its generations (backend trouble), or
    /// ended in an error or a panic: the enclosing output depends on tokens
    /// nobody recorded, so it must not be stored. Without this an outer
    /// block could be cached with no way to be invalidated by its inner
    /// tokens.
    unknown: bool,
}

impl Nested {
    #[cfg(feature = "tera")]
    fn absorb(&mut self, other: Nested) {
        self.reads.extend(other.reads);
        self.unknown |= other.unknown;
    }
}

/// A render collecting what its nested blocks read: a sync body's own
/// frame, or an async body's, shared because the body moves between threads
/// at every `.await` (it is pushed on the polling thread for each poll).
pub(crate) type SharedFrame = Arc<Mutex<Nested>>;

enum Slot {
    Own(Nested),
    Shared(SharedFrame),
}

thread_local! {
    /// The renders in progress on this thread, innermost last. An async
    /// block's frame is on it only while its body is being polled, so the
    /// top is always the render the code running now is part of.
    static FRAMES: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

fn lock(frame: &SharedFrame) -> std::sync::MutexGuard<'_, Nested> {
    frame.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f` on the innermost render's frame, if there is one.
fn with_top(f: impl FnOnce(&mut Nested)) {
    FRAMES.with(|frames| match frames.borrow_mut().last_mut() {
        Some(Slot::Own(nested)) => f(nested),
        Some(Slot::Shared(shared)) => f(&mut lock(shared)),
        None => {}
    });
}

/// The longest a reader waits for another thread's (or task's) render of
/// the same block before it renders the block itself. Only a pathological
/// render takes this long; the bound makes sure no wait is unbounded even
/// when the leader is blocked on something the waiting thread holds (a
/// database lock, say), which no cycle check inside icache can see.
pub(crate) const FOLLOWER_WAIT: Duration = Duration::from_secs(10);

/// Tells the enclosing render (if any) which generations this block depends on.
pub(crate) fn report(reads: &[(Box<str>, u64)]) {
    if !reads.is_empty() {
        with_top(|top| top.reads.extend(reads.iter().cloned()));
    }
}

/// Tells the enclosing render (if any) that this block's dependencies are
/// unknown, so the enclosing output must not be stored.
pub(crate) fn report_unknown() {
    with_top(|top| top.unknown = true);
}

/// The innermost render's frame, shared, for work that continues on another
/// thread (`spawn_blocking`): `None` outside a render, or inside a sync
/// body (it cannot be waited across threads).
pub(crate) fn current_shared() -> Option<SharedFrame> {
    FRAMES.with(|frames| match frames.borrow().last() {
        Some(Slot::Shared(shared)) => Some(shared.clone()),
        _ => None,
    })
}

/// Puts `frame` on this thread's stack until dropped (one poll of an async
/// body, or a closure run on a blocking thread for it). If what ran panics,
/// the render around it learns that its dependencies are unknown: whoever
/// catches the panic writes something else in its place.
pub(crate) struct Entered(());

impl Entered {
    pub(crate) fn enter(frame: SharedFrame) -> Entered {
        FRAMES.with(|frames| frames.borrow_mut().push(Slot::Shared(frame)));
        Entered(())
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        FRAMES.with(|frames| frames.borrow_mut().pop());
        if thread::panicking() {
            report_unknown();
        }
    }
}

/// Polls `body` with `frame` as the innermost render: the blocks it renders
/// (async ones, and sync ones called from it) report to `frame`, on
/// whichever thread each poll runs.
pub(crate) async fn in_frame<F: Future>(frame: SharedFrame, body: F) -> F::Output {
    let mut body = std::pin::pin!(body);
    std::future::poll_fn(|cx| {
        let _entered = Entered::enter(frame.clone());
        body.as_mut().poll(cx)
    })
    .await
}

/// A frame for the blocks nested in one render; popped on drop (even on panic).
struct Frame {
    done: bool,
}

impl Frame {
    fn push() -> Frame {
        FRAMES.with(|f| f.borrow_mut().push(Slot::Own(Nested::default())));
        Frame { done: false }
    }
    fn finish(mut self) -> Nested {
        self.done = true;
        match FRAMES.with(|f| f.borrow_mut().pop()) {
            Some(Slot::Own(nested)) => nested,
            Some(Slot::Shared(shared)) => std::mem::take(&mut *lock(&shared)),
            None => Nested::default(),
        }
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        if !self.done {
            // The body panicked. Whoever catches the panic (an enclosing
            // body's `catch_unwind`) renders something in its place that
            // depends on tokens nobody recorded: the enclosing output must
            // not be stored.
            FRAMES.with(|f| f.borrow_mut().pop());
            report_unknown();
        }
    }
}

/// What a leader's render produced, shared with the threads that waited.
pub(crate) struct Rendered {
    pub(crate) html: String,
    pub(crate) reads: Reads,
    /// Some nested dependency is unknown (see [`Nested::unknown`]).
    pub(crate) unknown: bool,
    /// The version it was rendered for (own and nested tokens).
    pub(crate) version: u64,
    /// `None`: stored; otherwise why not.
    pub(crate) not_stored: Option<NotStored>,
    pub(crate) took: Duration,
}

impl Rendered {
    /// Passes what this render depends on to the enclosing render.
    pub(crate) fn report(&self) {
        report(&self.reads);
        if self.unknown {
            report_unknown();
        }
    }
}

struct Flight {
    /// The thread rendering.
    leader: ThreadId,
    /// `None` while rendering; `Some(None)` if the leader failed.
    outcome: Mutex<Option<Option<Arc<Rendered>>>>,
    done: Condvar,
}

/// A flight's key: the fragment's name, its version, and the server
/// instance the version was read from (a snapshot restored mid-render gives
/// another instance: its readers must not take this render).
pub(crate) type FlightKey = (String, u64, Option<Arc<str>>);

/// In-flight renders, by fragment name and version, and who waits for which.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<FlightMap>,
}

#[derive(Default)]
struct FlightMap {
    flights: HashMap<FlightKey, Arc<Flight>>,
    /// The flight each waiting thread waits for. Each thread waits for at
    /// most one, so following "leader of the flight I wait for" from any
    /// thread is a path; `join` never adds an edge that would close a cycle,
    /// so the path always ends.
    waiting: HashMap<ThreadId, Arc<Flight>>,
}

enum Role<'a> {
    Leader(LeaderGuard<'a>),
    Follower(Waiter<'a>),
    /// Waiting would deadlock: this thread (perhaps through others waiting
    /// on each other) is the one rendering that flight. Render alone.
    Alone,
}

/// Ends a flight: publishes the outcome (failure if dropped without one).
struct LeaderGuard<'a> {
    flights: &'a Flights,
    key: FlightKey,
    flight: Arc<Flight>,
    published: bool,
}

impl LeaderGuard<'_> {
    fn publish(mut self, outcome: Option<Arc<Rendered>>) {
        self.end(outcome);
    }
    fn end(&mut self, outcome: Option<Arc<Rendered>>) {
        self.published = true;
        self.flights.lock().flights.remove(&self.key);
        *self
            .flight
            .outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        self.flight.done.notify_all();
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if !self.published {
            self.end(None);
        }
    }
}

/// A thread waiting for a flight; its edge in the wait graph goes on drop.
struct Waiter<'a> {
    flights: &'a Flights,
    flight: Arc<Flight>,
}

impl Waiter<'_> {
    /// The leader's outcome, or `None` if it failed or took longer than
    /// `limit`.
    fn wait(&self, limit: Duration) -> Option<Arc<Rendered>> {
        let deadline = Instant::now() + limit;
        let mut outcome = self
            .flight
            .outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(o) = &*outcome {
                return o.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    "icache: gave up waiting for another thread's render of the same block after {limit:?}; rendering it here"
                );
                return None;
            }
            outcome = self
                .flight
                .done
                .wait_timeout(outcome, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.flights.lock().waiting.remove(&thread::current().id());
    }
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, FlightMap> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn join(&self, key: FlightKey) -> Role<'_> {
        let me = thread::current().id();
        let mut map = self.lock();
        if let Some(flight) = map.flights.get(&key).cloned() {
            // Would this thread end up waiting for itself? Follow the chain
            // of leaders and what they wait for.
            let mut leader = flight.leader;
            loop {
                if leader == me {
                    return Role::Alone;
                }
                match map.waiting.get(&leader) {
                    Some(next) => leader = next.leader,
                    None => break,
                }
            }
            map.waiting.insert(me, flight.clone());
            return Role::Follower(Waiter {
                flights: self,
                flight,
            });
        }
        let flight = Arc::new(Flight {
            leader: me,
            outcome: Mutex::new(None),
            done: Condvar::new(),
        });
        map.flights.insert(key.clone(), flight.clone());
        Role::Leader(LeaderGuard {
            flights: self,
            key,
            flight,
            published: false,
        })
    }
}

/// Bytes of nested-token lists remembered per process (names and tokens):
/// bounded by size, not count, since one list can hold thousands of tokens.
const DEP_HINTS_BYTES: u64 = 4 << 20;

/// Weighs a dependency hint by the bytes it holds.
#[derive(Clone, Copy)]
pub(crate) struct HintBytes;

impl quick_cache::Weighter<String, Arc<[Box<str>]>> for HintBytes {
    fn weight(&self, name: &String, deps: &Arc<[Box<str>]>) -> u64 {
        let deps: usize = deps.iter().map(|d| d.len() + 16).sum();
        (name.len() + deps + 64) as u64
    }
}

/// Fragment name -> the nested tokens its entry was last seen with.
pub(crate) type DepHints = quick_cache::sync::Cache<String, Arc<[Box<str>]>, HintBytes>;

tokio::task_local! {
    /// Set while an async block's body renders: a task that leads a render
    /// never waits for another one's (it renders alone), so no two tasks can
    /// wait for each other, however their async blocks nest.
    static LEADING_ASYNC: ();
}

/// One async render in flight, shared with the tasks that wait for it.
#[derive(Default)]
pub(crate) struct AsyncFlight {
    /// `None` while rendering; `Some(None)` if the leader failed or was
    /// dropped.
    outcome: Mutex<Option<Option<Arc<Rendered>>>>,
    done: tokio::sync::Notify,
}

impl AsyncFlight {
    /// The leader's render, or `None` if it failed or took longer than
    /// `limit` (the wait is bounded by [`timer`], which needs no runtime
    /// timer: it holds under any executor).
    pub(crate) async fn wait(&self, limit: Duration) -> Option<Arc<Rendered>> {
        let deadline = Instant::now() + limit;
        loop {
            // Registered before the outcome is looked at, so a publish in
            // between is not missed.
            let mut notified = std::pin::pin!(self.done.notified());
            notified.as_mut().enable();
            if let Some(outcome) = &*self.outcome.lock().unwrap_or_else(PoisonError::into_inner) {
                return outcome.clone();
            }
            let mut late = std::pin::pin!(timer::at(deadline));
            let published = std::future::poll_fn(|cx| {
                if notified.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(true);
                }
                late.as_mut().poll(cx).map(|()| false)
            })
            .await;
            if !published {
                tracing::warn!(
                    "icache: gave up waiting for another task's render of the same block after {limit:?}; rendering it here"
                );
                return None;
            }
        }
    }
}

/// Async renders in flight, by fragment name, version and instance.
#[derive(Default)]
pub(crate) struct AsyncFlights {
    map: Mutex<HashMap<FlightKey, Arc<AsyncFlight>>>,
}

pub(crate) enum AsyncRole<'a> {
    Leader(AsyncLeader<'a>),
    Follower(Arc<AsyncFlight>),
    /// This task leads a render already: render alone.
    Alone,
}

/// Ends an async flight: publishes the outcome (failure if dropped first,
/// say because the leader's future was cancelled).
pub(crate) struct AsyncLeader<'a> {
    flights: &'a AsyncFlights,
    key: FlightKey,
    flight: Arc<AsyncFlight>,
    published: bool,
}

impl AsyncLeader<'_> {
    pub(crate) fn publish(mut self, rendered: Option<Arc<Rendered>>) {
        self.end(rendered);
    }
    fn end(&mut self, rendered: Option<Arc<Rendered>>) {
        self.published = true;
        self.flights
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
        *self
            .flight
            .outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(rendered);
        self.flight.done.notify_waiters();
    }
}

impl Drop for AsyncLeader<'_> {
    fn drop(&mut self) {
        if !self.published {
            self.end(None);
        }
    }
}

impl AsyncFlights {
    pub(crate) fn join(&self, key: FlightKey) -> AsyncRole<'_> {
        if LEADING_ASYNC.try_with(|_| ()).is_ok() {
            return AsyncRole::Alone;
        }
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(flight) = map.get(&key) {
            return AsyncRole::Follower(flight.clone());
        }
        let flight = Arc::new(AsyncFlight::default());
        map.insert(key.clone(), flight.clone());
        AsyncRole::Leader(AsyncLeader {
            flights: self,
            key,
            flight,
            published: false,
        })
    }
}

/// Runs an async block's body marked as leading (see `LEADING_ASYNC`).
pub(crate) async fn leading<F: Future>(body: F) -> F::Output {
    LEADING_ASYNC.scope((), body).await
}

/// A deadline for async waits that works under any executor: one thread per
/// process (started by the first wait that needs it) wakes the tasks whose
/// deadline passed. Tokio's own timer would panic in a runtime built
/// without `enable_time`, and there is no way to ask a runtime whether it
/// has one. Only followers of a render in flight use it: rare, short waits.
mod timer {
    use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
    use std::task::{Poll, Waker};
    use std::time::Instant;

    #[derive(Default)]
    struct Timer {
        due: Mutex<Vec<(Instant, Waker)>>,
        changed: Condvar,
    }

    /// The timer thread, `None` if it could not be started (then waits are
    /// bounded only by the leader's own end, as the docs say).
    fn timer() -> Option<&'static Timer> {
        static TIMER: OnceLock<Option<&'static Timer>> = OnceLock::new();
        *TIMER.get_or_init(|| {
            let timer: &'static Timer = Box::leak(Box::default());
            std::thread::Builder::new()
                .name("icache-timer".into())
                .spawn(move || run(timer))
                .ok()
                .map(|_| timer)
        })
    }

    fn run(timer: &Timer) {
        let mut due = timer.due.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            due.retain(|(at, waker)| {
                let keep = *at > now;
                if !keep {
                    waker.wake_by_ref();
                }
                keep
            });
            due = match due.iter().map(|(at, _)| *at).min() {
                Some(next) => {
                    timer
                        .changed
                        .wait_timeout(due, next.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => timer
                    .changed
                    .wait(due)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    /// Ready once `deadline` has passed.
    pub(super) async fn at(deadline: Instant) {
        std::future::poll_fn(|cx| {
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            if let Some(timer) = timer() {
                let mut due = timer.due.lock().unwrap_or_else(PoisonError::into_inner);
                // One entry per waiting task: a new poll replaces its waker.
                match due.iter_mut().find(|(_, w)| w.will_wake(cx.waker())) {
                    Some(entry) => *entry = (deadline, cx.waker().clone()),
                    None => due.push((deadline, cx.waker().clone())),
                }
                timer.changed.notify_one();
            }
            Poll::Pending
        })
        .await
    }
}

/// A block's output: the stored text (a hit) or a fresh render.
pub(crate) enum Html {
    Cached(Arc<str>),
    Rendered(String),
}

impl Html {
    pub(crate) fn into_string(self) -> String {
        match self {
            Html::Cached(s) => s.to_string(),
            Html::Rendered(s) => s,
        }
    }
}

/// The result of looking a fragment up.
pub(crate) enum Lookup {
    Hit {
        html: Arc<str>,
        reads: Reads,
        version: u64,
    },
    Miss(Miss),
    /// The backend failed: render uncached.
    Down,
}

/// A render to store: its version (own tokens and nested ones), the nested
/// tokens it depends on, the output, and the instance to store it on.
pub(crate) struct Output<'a> {
    pub(crate) version: u64,
    pub(crate) deps: &'a [(Box<str>, u64)],
    pub(crate) html: String,
    pub(crate) instance: Option<Arc<str>>,
}

#[cfg(feature = "tera")]
/// What [`Blocks::begin`] found.
pub(crate) enum Begun {
    Hit(Arc<str>),
    /// Render the body, then hand it to [`Blocks::finish`].
    Render(Unfinished),
    /// The cache is down: render the body, uncached.
    Uncached,
}

#[cfg(feature = "tera")]
/// A block whose body is being rendered by the engine.
pub(crate) struct Unfinished {
    name: String,
    tokens: Vec<String>,
    miss: Miss,
    /// How many frames there were before this block's own.
    pub(crate) depth: usize,
    started: Instant,
}

#[cfg(feature = "tera")]
/// Drops frames above `depth` (blocks an engine error left unfinished).
pub(crate) fn unwind_frames(depth: usize) {
    FRAMES.with(|f| f.borrow_mut().truncate(depth));
}

#[cfg(feature = "tera")]
/// How many frames this thread has.
pub(crate) fn frame_depth() -> usize {
    FRAMES.with(|f| f.borrow().len())
}

/// What a miss read before rendering.
pub(crate) struct Miss {
    /// The block's own tokens and their generations.
    pub(crate) own: Reads,
    /// Their sum: the version the output is stored under (plus nested ones).
    pub(crate) own_version: u64,
    /// The server instance the version was read from: the output is stored
    /// only there.
    pub(crate) instance: Option<Arc<str>>,
    /// An entry was there under an older version.
    pub(crate) invalidated: bool,
    /// That entry's version and body: what `stale=render` may serve while
    /// another render holds the lease.
    previous: Option<(u64, Arc<str>)>,
}

/// The entry name of a block: its identity and its tokens, length-prefixed so
/// that no two different lists give the same name. (The hot paths build it
/// in a [`PooledName`].)
#[cfg(any(test, feature = "tera"))]
pub(crate) fn fragment_name(identity: &[&str], tokens: &[&str]) -> String {
    let mut name = String::new();
    fragment_name_into(&mut name, identity, tokens);
    name
}

fn fragment_name_into(name: &mut String, identity: &[&str], tokens: &[&str]) {
    let parts = identity.iter().chain(tokens);
    name.reserve(parts.clone().map(|p| p.len() + 8).sum::<usize>() + 4);
    push_decimal(name, identity.len());
    name.push('|');
    join_parts_into(name, parts.copied());
}

thread_local! {
    /// The buffer a block's name is built in, reused from block to block:
    /// a hit only reads the name, so it costs no allocation.
    static NAME_BUF: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

/// A [`fragment_name`] in this thread's reused buffer (a nested block,
/// built while its outer one holds the buffer, gets a new one). Dropped on
/// another thread (an async block's future moved), the buffer stays there.
pub(crate) struct PooledName(String);

impl PooledName {
    pub(crate) fn new(identity: &[&str], tokens: &[&str]) -> Self {
        let mut name = NAME_BUF.take();
        name.clear();
        fragment_name_into(&mut name, identity, tokens);
        PooledName(name)
    }
}

impl std::ops::Deref for PooledName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for PooledName {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.0);
        // Not kept if a huge list of tokens made it big.
        if name.capacity() <= 4096 {
            NAME_BUF.set(name);
        }
    }
}

/// Strings as `&[&str]`: on the stack for the usual handful (a hit
/// allocates nothing), in a `Vec` beyond.
#[allow(clippy::large_enum_variant)] // the stack variant is the point
pub(crate) enum Strs<'a> {
    Stack([&'a str; 20], usize),
    Heap(Vec<&'a str>),
}

impl<'a> Strs<'a> {
    pub(crate) fn of<T: AsRef<str>>(items: &'a [T]) -> Self {
        let mut out = Strs::Stack([""; 20], 0);
        if items.len() > 20 {
            out = Strs::Heap(Vec::with_capacity(items.len()));
        }
        for item in items {
            out.push(item.as_ref());
        }
        out
    }

    fn push(&mut self, item: &'a str) {
        match self {
            Strs::Stack(buf, n) if *n < buf.len() => {
                buf[*n] = item;
                *n += 1;
            }
            Strs::Stack(buf, n) => {
                let mut v = buf[..*n].to_vec();
                v.push(item);
                *self = Strs::Heap(v);
            }
            Strs::Heap(v) => v.push(item),
        }
    }

    pub(crate) fn get(&self) -> &[&'a str] {
        match self {
            Strs::Stack(buf, n) => &buf[..*n],
            Strs::Heap(v) => v,
        }
    }
}

/// `tokens` as `&[&str]`, in `buf` when they fit (the hot path: filled in
/// place, nothing moved or allocated), else in `heap`.
pub(crate) fn as_strs<'a, T: AsRef<str>>(
    tokens: &'a [T],
    buf: &'a mut [&'a str; 16],
    heap: &'a mut Vec<&'a str>,
) -> &'a [&'a str] {
    if tokens.len() <= buf.len() {
        for (slot, t) in buf.iter_mut().zip(tokens) {
            *slot = t.as_ref();
        }
        &buf[..tokens.len()]
    } else {
        heap.extend(tokens.iter().map(AsRef::as_ref));
        heap
    }
}

/// The parts of a [`fragment_name`], and how many of them are the
/// identity (the rest are the tokens). A name this crate did not build
/// gives what parses of it.
pub(crate) fn split_name(name: &str) -> (Strs<'_>, usize) {
    let mut parts = Strs::Stack([""; 20], 0);
    let Some((count, mut rest)) = name.split_once('|') else {
        return (parts, 0);
    };
    while let Some((len, tail)) = rest.split_once(':') {
        let Some(part) = len.parse::<usize>().ok().and_then(|len| {
            let part = tail.get(..len)?;
            rest = &tail[len..];
            Some(part)
        }) else {
            break;
        };
        parts.push(part);
    }
    let count = count.parse().unwrap_or(0).min(parts.get().len());
    (parts, count)
}

/// A fragment name ([`fragment_name`]) as people read it, for log lines:
/// `template.html:3:5 [movies, 7]`, at most about 200 characters.
fn readable_name(name: &str) -> String {
    let parse = || -> Option<(Vec<&str>, Vec<&str>)> {
        let (count, mut rest) = name.split_once('|')?;
        let count: usize = count.parse().ok()?;
        let mut parts = Vec::new();
        while !rest.is_empty() {
            let (len, tail) = rest.split_once(':')?;
            let len: usize = len.parse().ok()?;
            parts.push(tail.get(..len)?);
            rest = tail.get(len..)?;
        }
        let mut tokens = parts.split_off(count.min(parts.len()));
        // Every block has it (`ICache::flush`): noise in a log line.
        tokens.retain(|t| *t != crate::ICache::FLUSH_TOKEN);
        Some((parts, tokens))
    };
    let mut out = match parse() {
        Some((identity, tokens)) => format!("{} [{}]", identity.join(" "), tokens.join(", ")),
        None => name.to_owned(),
    };
    if let Some((cut, _)) = out.char_indices().nth(200) {
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// Tells an `observe`r what happened to a block (nothing is built when
/// nobody observes).
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_block(
    identity: &[&str],
    tokens: &[&str],
    outcome: Outcome,
    version: Option<u64>,
    invalidated: bool,
    took: Option<Duration>,
    reads: &[(Box<str>, u64)],
) {
    observe::emit(|| BlockEvent {
        identity: identity.iter().map(|s| (*s).to_owned()).collect(),
        tokens: tokens
            .iter()
            .filter(|t| **t != crate::ICache::FLUSH_TOKEN)
            .map(|s| (*s).to_owned())
            .collect(),
        version,
        outcome,
        invalidated,
        render_time: took,
        depth: FRAMES.with(|f| f.borrow().len()),
        reads: reads.iter().map(|(t, g)| (t.to_string(), *g)).collect(),
    });
}

/// Does anyone want what a hit read: an enclosing render collecting nested
/// dependencies, or an observer? (Otherwise nothing is built.)
pub(crate) fn wants_reads() -> bool {
    FRAMES.with(|f| !f.borrow().is_empty()) || observe::observing()
}

/// Membership in a block's own tokens: a scan for the usual handful, a hash
/// set when there are many (nested blocks can bring thousands).
enum TokenSet<'a> {
    Few(&'a [&'a str]),
    Many(HashSet<&'a str>),
}

impl<'a> TokenSet<'a> {
    fn new(tokens: &'a [&'a str]) -> Self {
        if tokens.len() <= 16 {
            TokenSet::Few(tokens)
        } else {
            TokenSet::Many(tokens.iter().copied().collect())
        }
    }
    fn contains(&self, t: &str) -> bool {
        match self {
            TokenSet::Few(v) => v.contains(&t),
            TokenSet::Many(s) => s.contains(t),
        }
    }
}

fn sum(reads: &[(Box<str>, u64)]) -> u64 {
    reads.iter().fold(0u64, |s, (_, g)| s.wrapping_add(*g))
}

/// The block engine's own state: renders in flight and the nested tokens
/// each block was last seen with.
pub(crate) struct Blocks {
    flights: Flights,
    /// Renders in flight for the async API (waited for without blocking).
    pub(crate) async_flights: AsyncFlights,
    dep_hints: DepHints,
    /// A hint was ever kept: until then a lookup skips `dep_hints` (whose
    /// own emptiness check locks every shard).
    has_hints: std::sync::atomic::AtomicBool,
}

impl Default for Blocks {
    fn default() -> Self {
        Blocks {
            flights: Flights::default(),
            async_flights: AsyncFlights::default(),
            dep_hints: DepHints::with_weighter(10_000, DEP_HINTS_BYTES, HintBytes),
            has_hints: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Blocks {
    /// [`block`](Self::block), handing out the stored text itself on a hit
    /// (no copy), for callers that can use it as it is.
    pub(crate) fn block_html<E>(
        &self,
        core: &Core,
        identity: &[&str],
        tokens: &[&str],
        render: impl FnOnce() -> Result<String, E>,
    ) -> Result<Html, E> {
        let name = PooledName::new(identity, tokens);
        let name: &str = &name;
        // Taken first, so that the blocks nested in this one's body do not
        // inherit this block's choice.
        let stale = crate::lease::take_block_choice().unwrap_or(core.config.stale_render);
        let counters = &core.counters;
        // Tells an `observe`r what happened (nothing is built otherwise).
        let event = |outcome: Outcome,
                     version: Option<u64>,
                     invalidated: bool,
                     took: Option<Duration>,
                     reads: &[(Box<str>, u64)]| {
            emit_block(identity, tokens, outcome, version, invalidated, took, reads);
        };
        // A render of this thread's own: reported to the enclosing render
        // and to an observer.
        let finish = |rendered: &Rendered, off: bool, invalidated: bool| {
            rendered.report();
            let outcome = match (off, rendered.not_stored) {
                (true, _) => Outcome::Off,
                (false, None) => Outcome::Stored,
                (false, Some(why)) => Outcome::NotStored(why),
            };
            event(
                outcome,
                Some(rendered.version),
                invalidated,
                Some(rendered.took),
                if off { &[] } else { &rendered.reads },
            );
        };
        let miss = match self.lookup(core, name, tokens) {
            Lookup::Hit {
                html,
                reads,
                version,
            } => {
                counters.count(Event::Hit);
                report(&reads);
                event(Outcome::Hit, Some(version), false, None, &reads);
                return Ok(Html::Cached(html));
            }
            Lookup::Down => {
                report_unknown();
                let started = Instant::now();
                let out = render();
                let took = started.elapsed();
                counters.rendered(took);
                event(Outcome::Uncached, None, false, Some(took), &[]);
                return out.map(Html::Rendered);
            }
            Lookup::Miss(miss) => miss,
        };
        counters.count(Event::Miss);
        let invalidated = miss.invalidated;
        if !core.backend.stores() {
            // Caching is off (`none://`): generations never move, so a
            // shared render could be one that began before a commit whose
            // bump this reader already saw. Every reader renders.
            let rendered = self.render_and_store(core, name, tokens, miss, render)?;
            finish(&rendered, true, false);
            return Ok(Html::Rendered(rendered.html));
        }
        // The previous body, served as it is (`stale=render`): not this
        // version's output, so an enclosing render must not be stored with it.
        let serve_stale = |body: Arc<str>| {
            report_unknown();
            event(Outcome::Stale, None, invalidated, None, &[]);
            Ok(Html::Cached(body))
        };
        match self
            .flights
            .join((name.to_owned(), miss.own_version, miss.instance.clone()))
        {
            Role::Leader(guard) => {
                let own_version = miss.own_version;
                match self.fill_lease(core, name, tokens, &miss, stale) {
                    lease::Fill::Render => {}
                    lease::Fill::Found((html, reads, version)) => {
                        report(&reads);
                        event(Outcome::Shared, Some(version), invalidated, None, &reads);
                        let rendered = Arc::new(Rendered {
                            html: html.to_string(),
                            reads,
                            unknown: false,
                            version,
                            not_stored: None,
                            took: Duration::ZERO,
                        });
                        guard.publish(Some(rendered));
                        return Ok(Html::Cached(html));
                    }
                    lease::Fill::Stale(body) => {
                        guard.publish(None);
                        return serve_stale(body);
                    }
                }
                // A body that panics gives the lease up as it unwinds: the
                // other processes render at once instead of waiting out
                // `lease_ms` for an entry that will never come.
                let _unwinding = lease::ReleaseOnPanic::new(core, name, own_version);
                match self.render_and_store(core, name, tokens, miss, render) {
                    Ok(rendered) => {
                        if rendered.not_stored.is_some() {
                            lease::release(core, name, own_version);
                        }
                        let rendered = Arc::new(rendered);
                        guard.publish(Some(rendered.clone()));
                        finish(&rendered, false, invalidated);
                        Ok(Html::Rendered(rendered.html.clone()))
                    }
                    Err(e) => {
                        lease::release(core, name, own_version);
                        guard.publish(None);
                        Err(e)
                    }
                }
            }
            // Another thread of this process is on it (rendering, or
            // waiting for another process's render): the previous body now.
            Role::Follower(_) if stale && self.may_serve_stale(core, tokens, &miss) => {
                let body = miss.previous.map(|(_, b)| b).unwrap_or_default();
                core.counters.count(Event::StaleServed);
                serve_stale(body)
            }
            Role::Follower(waiter) => {
                let outcome = waiter.wait(FOLLOWER_WAIT);
                drop(waiter);
                // Take the leader's output only if everything it depends on
                // is known (an inner block that failed open leaves tokens
                // nobody recorded: this reader may have begun after a bump of
                // one of them) and no nested token moved since.
                if let Some(rendered) = outcome
                    && !rendered.unknown
                    && self.still_current(core, tokens, &rendered.reads)
                {
                    counters.count(Event::Shared);
                    rendered.report();
                    event(
                        Outcome::Shared,
                        Some(rendered.version),
                        invalidated,
                        None,
                        &rendered.reads,
                    );
                    return Ok(Html::Rendered(rendered.html.clone()));
                }
                let rendered = self.render_and_store(core, name, tokens, miss, render)?;
                finish(&rendered, false, invalidated);
                Ok(Html::Rendered(rendered.html))
            }
            Role::Alone => {
                // This thread is already rendering this very block further up
                // (a recursive macro), or threads rendering blocks nested in
                // each other crosswise would wait on each other: render on
                // its own (no flight, no deadlock).
                let rendered = self.render_and_store(core, name, tokens, miss, render)?;
                finish(&rendered, false, invalidated);
                Ok(Html::Rendered(rendered.html))
            }
        }
    }

    /// `fill=lease`: takes the lease for this miss, or waits for the
    /// holder's entry, or (`stale`) hands out the previous body.
    fn fill_lease(
        &self,
        core: &Core,
        name: &str,
        tokens: &[&str],
        miss: &Miss,
        stale: bool,
    ) -> lease::Fill<(Arc<str>, Reads, u64)> {
        let seen = miss.previous.as_ref().map(|(v, _)| *v);
        let own_version = miss.own_version;
        lease::before_render(
            core,
            name,
            own_version,
            tokens,
            stale,
            miss.previous.as_ref().map(|(_, b)| b.clone()),
            || {
                // A cheap look first (no generations): has anything been
                // stored since the miss? Only then the full lookup.
                match core.backend.get_entry(Key::fragment(name)) {
                    Ok(Some(e)) if e.version.is_some() && e.version != seen => {}
                    Ok(_) => return lease::Poll::Wait,
                    Err(e) => {
                        core.backend_trouble(&e);
                        return lease::Poll::GiveUp;
                    }
                }
                // With its reads whatever this thread wants: the threads of
                // this process that joined its flight take this entry too,
                // and check it against them (the nested generations it was
                // found at), since they may have begun after a nested bump
                // that this look just missed.
                match self.lookup_with(core, name, tokens, true) {
                    Lookup::Hit {
                        html,
                        reads,
                        version,
                    } => lease::Poll::Found((html, reads, version)),
                    // Something was stored since the miss, and it does not
                    // serve this reader (its nested tokens moved meanwhile,
                    // or it is another version's): the holder is done, the
                    // lease may live on until it expires, and waiting for it
                    // would cost up to `lease_ms` for nothing. Render now.
                    Lookup::Miss(_) | Lookup::Down => lease::Poll::GiveUp,
                }
            },
        )
    }

    /// May a follower of this process get the previous body at once?
    fn may_serve_stale(&self, core: &Core, tokens: &[&str], miss: &Miss) -> bool {
        match (core.config.lease, &miss.previous) {
            (Some(lease), Some(_)) => !core.bumps.within(tokens, lease),
            _ => false,
        }
    }

    /// A follower takes the leader's output only if the nested tokens the
    /// leader read (which this thread did not read itself) have not moved.
    pub(crate) fn still_current(
        &self,
        core: &Core,
        tokens: &[&str],
        reads: &[(Box<str>, u64)],
    ) -> bool {
        let own = TokenSet::new(tokens);
        let deps: Vec<&(Box<str>, u64)> = reads.iter().filter(|(t, _)| !own.contains(t)).collect();
        if deps.is_empty() {
            return true;
        }
        let names: Vec<&str> = deps.iter().map(|(t, _)| &**t).collect();
        match core.generations(&names) {
            Ok(now) => now.iter().zip(&deps).all(|(n, (_, g))| n == g),
            Err(e) => {
                core.backend_trouble(&e);
                false
            }
        }
    }

    fn render_and_store<E>(
        &self,
        core: &Core,
        name: &str,
        tokens: &[&str],
        miss: Miss,
        render: impl FnOnce() -> Result<String, E>,
    ) -> Result<Rendered, E> {
        let Miss {
            own,
            own_version,
            instance,
            ..
        } = miss;
        let _span = tracing::debug_span!("icache.render", backend = core.backend_name()).entered();
        let frame = Frame::push();
        let started = Instant::now();
        let out = render();
        let nested = frame.finish();
        let took = started.elapsed();
        core.counters.rendered(took);
        if out.is_err() {
            // An enclosing body that catches this error (a fallback in
            // `unwrap_or_else`) renders without this block's tokens: if it
            // were stored, a bump of them would never replace the fallback.
            report_unknown();
        }
        let html = out?;
        Ok(self.rendered(
            core,
            name,
            tokens,
            (own, own_version, instance),
            nested,
            took,
            html,
        ))
    }

    /// After a body rendered: its nested dependencies, the store, and what
    /// to share with waiting readers.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rendered(
        &self,
        core: &Core,
        name: &str,
        tokens: &[&str],
        (own, own_version, instance): (Reads, u64, Option<Arc<str>>),
        nested: Nested,
        took: Duration,
        html: String,
    ) -> Rendered {
        // Nested tokens beyond our own, first read of each (the oldest).
        // Sets, not scans: a page may nest thousands of blocks.
        let mine = TokenSet::new(tokens);
        let mut seen: HashSet<Box<str>> = HashSet::new();
        let mut deps: Reads = Vec::new();
        for (t, g) in nested.reads {
            if !mine.contains(&t) && seen.insert(t.clone()) {
                deps.push((t, g));
            }
        }
        let version = own_version.wrapping_add(sum(&deps));
        let not_stored = if nested.unknown {
            core.counters.count(Event::Outdated);
            tracing::debug!("icache: a nested block could not be checked; output not stored");
            Some(NotStored::NestedUnknown)
        } else {
            self.store_checked(
                core,
                name,
                tokens,
                Output {
                    version,
                    deps: &deps,
                    html: html.clone(),
                    instance,
                },
            )
        };
        let mut reads = own;
        reads.extend(deps);
        Rendered {
            html,
            reads,
            unknown: nested.unknown,
            version,
            not_stored,
            took,
        }
    }

    #[cfg(feature = "tera")]
    /// The first half of a block whose body a template engine renders
    /// between two calls (Tera): the lookup, and on a miss a frame that
    /// collects what nested blocks read until [`finish`](Self::finish).
    /// No single-flight: the body runs in the engine, not in a closure this
    /// thread could share.
    pub(crate) fn begin(&self, core: &Core, identity: &[&str], tokens: &[&str]) -> Begun {
        let name = fragment_name(identity, tokens);
        match self.lookup(core, &name, tokens) {
            Lookup::Hit { html, reads, .. } => {
                core.counters.count(Event::Hit);
                report(&reads);
                Begun::Hit(html)
            }
            Lookup::Down => {
                report_unknown();
                Begun::Uncached
            }
            Lookup::Miss(miss) => {
                core.counters.count(Event::Miss);
                let depth = FRAMES.with(|f| f.borrow().len());
                FRAMES.with(|f| f.borrow_mut().push(Slot::Own(Nested::default())));
                Begun::Render(Unfinished {
                    name,
                    tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
                    miss,
                    depth,
                    started: Instant::now(),
                })
            }
        }
    }

    #[cfg(feature = "tera")]
    /// The second half: stores the body's output (unless outdated) and
    /// reports its dependencies to the enclosing block.
    pub(crate) fn finish(&self, core: &Core, begun: Unfinished, html: String) {
        // Frames above ours belong to blocks that never finished (an engine
        // error skipped their end): dropped, and ours with them counted.
        let nested = FRAMES.with(|f| {
            let mut f = f.borrow_mut();
            let mut nested = Nested::default();
            while f.len() > begun.depth {
                match f.pop() {
                    Some(Slot::Own(n)) => nested.absorb(n),
                    Some(Slot::Shared(n)) => nested.absorb(std::mem::take(&mut *lock(&n))),
                    None => {}
                }
            }
            nested
        });
        let took = begun.started.elapsed();
        core.counters.rendered(took);
        let tokens: Vec<&str> = begun.tokens.iter().map(String::as_str).collect();
        let Miss {
            own,
            own_version,
            instance,
            ..
        } = begun.miss;
        let rendered = self.rendered(
            core,
            &begun.name,
            &tokens,
            (own, own_version, instance),
            nested,
            took,
            html,
        );
        rendered.report();
    }

    /// Stores `html` under `version` unless the generations moved on while it
    /// rendered (then storing it would be wasted: it could never be served).
    /// `None` if it was stored, otherwise why not.
    pub(crate) fn store_checked(
        &self,
        core: &Core,
        name: &str,
        tokens: &[&str],
        out: Output<'_>,
    ) -> Option<NotStored> {
        let Output {
            version,
            deps,
            html,
            instance,
        } = out;
        let counters = &core.counters;
        let html_len = html.len();
        let mut all: Vec<&str> = tokens.to_vec();
        all.extend(deps.iter().map(|(t, _)| &**t));
        let now = match core.generations(&all) {
            Ok(g) => g.into_iter().fold(0u64, u64::wrapping_add),
            Err(e) => {
                core.backend_trouble(&e);
                return Some(NotStored::BackendError);
            }
        };
        if now != version {
            counters.count(Event::Outdated);
            tracing::debug!("icache: tokens moved while rendering; output not stored");
            return Some(NotStored::Moved);
        }
        let dep_names: Vec<Box<str>> = deps.iter().map(|(t, _)| t.clone()).collect();
        let entry = Arc::new(Entry {
            version: Some(version),
            deps: dep_names.clone(),
            payload: Payload::Text(Arc::from(html)),
        });
        match core.backend.set(
            Key::fragment(name),
            entry.clone(),
            None,
            instance.as_deref(),
        ) {
            Ok(false) => {
                counters.count(Event::Outdated);
                tracing::debug!("icache: the server restarted while rendering; output not stored");
                Some(NotStored::ServerChanged)
            }
            Ok(true) => {
                counters.count(Event::Store);
                core.keep_near(near::Kind::Fragment, name, instance.as_ref(), entry);
                if !dep_names.is_empty() {
                    self.keep_hint(name, Arc::from(dep_names));
                }
                None
            }
            Err(e) if e.is_too_large() => {
                counters.count(Event::TooLarge);
                if core.too_large_log.due() {
                    tracing::warn!(
                        block = %readable_name(name),
                        bytes = html_len,
                        error = %e,
                        "icache: a block's output is too large for the backend; it is served uncached (this warning at most every 10 s)"
                    );
                }
                Some(NotStored::TooLarge)
            }
            Err(e) => {
                core.backend_trouble(&e);
                Some(NotStored::BackendError)
            }
        }
    }

    fn has_hints(&self) -> bool {
        self.has_hints.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn keep_hint(&self, name: &str, deps: Arc<[Box<str>]>) {
        self.has_hints
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.dep_hints.insert(name.to_owned(), deps);
    }

    /// The memory backend's hit of a block with no nested tokens, the hot
    /// path: the generations land in a stack buffer and the entry comes
    /// back as stored; nothing is allocated. `None`: anything else (a miss,
    /// nested tokens, another backend), for the general path.
    fn local_hit(
        &self,
        core: &Core,
        name: &str,
        tokens: &[&str],
        with_reads: bool,
    ) -> Option<Lookup> {
        const MAX: usize = 16;
        // Hints do not matter here: the entry itself says whether it has
        // nested tokens (then the general path reads them).
        if tokens.len() > MAX || core.near.is_some() {
            return None;
        }
        let mut gens = [0u64; MAX];
        let gens = &mut gens[..tokens.len()];
        let (true, Some(entry)) = core
            .backend
            .fetch_local(tokens, Key::fragment(name), gens)?
        else {
            return None;
        };
        let version = gens.iter().fold(0u64, |s, g| s.wrapping_add(*g));
        match (&entry.payload, entry.version) {
            (Payload::Text(html), Some(v)) if v == version && entry.deps.is_empty() => {
                Some(Lookup::Hit {
                    html: html.clone(),
                    version,
                    reads: if with_reads {
                        tokens
                            .iter()
                            .map(|t| Box::from(*t))
                            .zip(gens.iter().copied())
                            .collect()
                    } else {
                        Vec::new()
                    },
                })
            }
            _ => None,
        }
    }

    /// [`lookup`](Self::lookup) when it needs no I/O, so that an async
    /// caller can run it inline: always on the in-process backends, and a
    /// near copy whose version the `near=tracking` table confirms. `None`:
    /// the answer needs the backend (a blocking call).
    pub(crate) fn lookup_local(&self, core: &Core, name: &str, tokens: &[&str]) -> Option<Lookup> {
        if core.is_in_process() {
            return Some(self.lookup(core, name, tokens));
        }
        if core.has_pending() {
            return None;
        }
        let held = core.near.as_ref()?.get(near::Kind::Fragment, name)?;
        if tokens.is_empty() && held.entry.deps.is_empty() {
            return None;
        }
        match near_lookup(core, tokens, held, true, wants_reads()) {
            Ok(Some(hit)) => {
                core.counters.count(Event::NearHit);
                Some(hit)
            }
            _ => None,
        }
    }

    pub(crate) fn lookup(&self, core: &Core, name: &str, tokens: &[&str]) -> Lookup {
        self.lookup_with(core, name, tokens, wants_reads())
    }

    /// [`lookup`](Self::lookup); a hit carries what it read (tokens and
    /// nested tokens with their generations) when `with_reads`.
    pub(crate) fn lookup_with(
        &self,
        core: &Core,
        name: &str,
        tokens: &[&str],
        with_reads: bool,
    ) -> Lookup {
        if let Err(e) = core.replay_pending() {
            core.backend_trouble(&e);
            return Lookup::Down;
        }
        if let Some(hit) = self.local_hit(core, name, tokens, with_reads) {
            return hit;
        }
        if let Some(near) = &core.near {
            match near.get(near::Kind::Fragment, name) {
                // A block with no token at all: no generation to fetch, so
                // no server instance to check the copy against.
                Some(held) if tokens.is_empty() && held.entry.deps.is_empty() => {}
                Some(held) => match near_lookup(core, tokens, held, false, with_reads) {
                    Ok(Some(hit)) => {
                        core.counters.count(Event::NearHit);
                        return hit;
                    }
                    // Another version now: the body comes with a second
                    // round trip (once per process and version).
                    Ok(None) => core.counters.count(Event::BodyFetch),
                    Err(e) => {
                        core.backend_trouble(&e);
                        return Lookup::Down;
                    }
                },
                None => core.counters.count(Event::NearMiss),
            }
        }
        // The tokens, and the nested tokens this process last saw the entry
        // with, so that a hit is one round trip. No copy when there are none.
        let hints = if !self.has_hints() {
            None
        } else {
            self.dep_hints.get(name)
        };
        let with_hints: Vec<&str>;
        let all: &[&str] = match &hints {
            None => tokens,
            Some(h) => {
                let own = TokenSet::new(tokens);
                let mut v = tokens.to_vec();
                v.extend(h.iter().map(|d| &**d).filter(|d| !own.contains(d)));
                with_hints = v;
                &with_hints
            }
        };
        let fetched = match core.fetch(all, &[Key::fragment(name)]) {
            Ok(f) => f,
            Err(e) => {
                core.backend_trouble(&e);
                return Lookup::Down;
            }
        };
        let mut gens = fetched.gens;
        if gens.iter().any(Option::is_none) {
            match core.complete_gens(all, gens) {
                Ok(g) => gens = g.into_iter().map(Some).collect(),
                Err(e) => {
                    core.backend_trouble(&e);
                    return Lookup::Down;
                }
            }
        }
        let gen_at = |i: usize| gens.get(i).copied().flatten().unwrap_or_default();
        let own_version = (0..tokens.len()).fold(0u64, |s, i| s.wrapping_add(gen_at(i)));
        let own_reads = || -> Reads {
            tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (Box::from(*t), gen_at(i)))
                .collect()
        };
        let instance = fetched.instance;
        let Some(entry) = fetched.entries.into_iter().next().flatten() else {
            return Lookup::Miss(Miss {
                own: own_reads(),
                own_version,
                instance,
                invalidated: false,
                previous: None,
            });
        };
        // Generations of the entry's nested tokens: from this round trip when
        // the hint was right, otherwise one more.
        let mut dep_gens: Vec<u64> = Vec::with_capacity(entry.deps.len());
        let mut missing: Vec<&str> = Vec::new();
        let mut missing_at: Vec<usize> = Vec::new();
        // An index, not a scan per nested token, when there are many.
        let index: Option<HashMap<&str, usize>> =
            (all.len() > 16).then(|| all.iter().enumerate().rev().map(|(i, a)| (*a, i)).collect());
        for d in &entry.deps {
            let found = match &index {
                Some(index) => index.get(&**d).copied(),
                None => all.iter().position(|a| a == &&**d),
            };
            match found {
                Some(i) => dep_gens.push(gen_at(i)),
                None => {
                    missing.push(d);
                    missing_at.push(dep_gens.len());
                    dep_gens.push(0);
                }
            }
        }
        if !missing.is_empty() {
            match core.generations(&missing) {
                Ok(g) => {
                    for (at, g) in missing_at.into_iter().zip(g) {
                        dep_gens[at] = g;
                    }
                }
                Err(e) => {
                    core.backend_trouble(&e);
                    return Lookup::Down;
                }
            }
        }
        if !entry.deps.is_empty() && hints.as_deref() != Some(&*entry.deps) {
            self.keep_hint(name, Arc::from(entry.deps.clone()));
        }
        let current = dep_gens.iter().fold(own_version, |s, g| s.wrapping_add(*g));
        match (&entry.payload, entry.version) {
            (Payload::Text(html), Some(v)) if v == current => {
                let html = html.clone();
                core.keep_near(near::Kind::Fragment, name, instance.as_ref(), entry.clone());
                Lookup::Hit {
                    version: v,
                    html,
                    // What it read, for an enclosing render; nothing to build
                    // when there is none (the common case of a top-level block).
                    reads: if with_reads {
                        let mut reads = own_reads();
                        reads.extend(entry.deps.iter().cloned().zip(dep_gens));
                        reads
                    } else {
                        Vec::new()
                    },
                }
            }
            (payload, version) => {
                core.counters.count(Event::Mismatch);
                let previous = match (payload, version) {
                    (Payload::Text(html), Some(v)) => Some((v, html.clone())),
                    _ => None,
                };
                Lookup::Miss(Miss {
                    own: own_reads(),
                    own_version,
                    instance,
                    invalidated: true,
                    previous,
                })
            }
        }
    }
}

/// A lookup with an in-process copy of the block (`?near=`): the
/// generations of its tokens and nested tokens only (from the in-process
/// table under `near=tracking` when it may be trusted, otherwise one round
/// trip that carries no body). `Some` hit when the copy is for the current
/// version on the same server instance; `None` when it is not (then the body
/// is fetched).
///
/// `local_only`: answer only from the in-process table (no I/O); `None`
/// when it cannot. `with_reads`: a hit carries what it read.
fn near_lookup(
    core: &Core,
    tokens: &[&str],
    held: near::Held,
    local_only: bool,
    with_reads: bool,
) -> Result<Option<Lookup>> {
    let (Some(version), Payload::Text(html)) = (held.entry.version, &held.entry.payload) else {
        return Ok(None);
    };
    let own = TokenSet::new(tokens);
    let mut all: Vec<&str> = tokens.to_vec();
    all.extend(
        held.entry
            .deps
            .iter()
            .map(|d| &**d)
            .filter(|d| !own.contains(d)),
    );
    let (gens, instance, tracked) = match core.local_gens(&all) {
        Some((gens, instance)) => (gens, Some(instance), true),
        None if local_only => return Ok(None),
        None => {
            let fetched = core.fetch(&all, &[])?;
            (
                core.complete_gens(&all, fetched.gens)?,
                fetched.instance,
                false,
            )
        }
    };
    if instance.as_deref() != Some(&*held.instance)
        || gens.iter().fold(0u64, |s, g| s.wrapping_add(*g)) != version
    {
        return Ok(None);
    }
    if tracked {
        core.counters.count(Event::TrackedHit);
    }
    Ok(Some(Lookup::Hit {
        html: html.clone(),
        version,
        reads: if with_reads {
            all.iter().map(|t| Box::from(*t)).zip(gens).collect()
        } else {
            Vec::new()
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::{Strs, fragment_name, readable_name, split_name};

    #[test]
    fn names_read_back_for_logs() {
        let name = fragment_name(&["named", "list"], &["movies", "7"]);
        assert_eq!(readable_name(&name), "named list [movies, 7]");
        assert_eq!(readable_name("not a name"), "not a name");
        assert!(
            readable_name(&fragment_name(&["x"], &[&"y".repeat(1000)]))
                .chars()
                .count()
                <= 201
        );
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fragment_names_split_back(
            ia in proptest::collection::vec(".{0,5}", 0..3), ta in proptest::collection::vec(".{0,5}", 0..30),
        ) {
            let name = fragment_name(Strs::of(&ia).get(), Strs::of(&ta).get());
            let (parts, count) = split_name(&name);
            let (identity, tokens) = parts.get().split_at(count);
            let (ia, ta) = (Strs::of(&ia), Strs::of(&ta));
            prop_assert_eq!(identity, ia.get());
            prop_assert_eq!(tokens, ta.get());
        }

        #[test]
        fn fragment_names_are_unambiguous(
            ia in proptest::collection::vec(".{0,5}", 0..3), ta in proptest::collection::vec(".{0,5}", 0..4),
            ib in proptest::collection::vec(".{0,5}", 0..3), tb in proptest::collection::vec(".{0,5}", 0..4),
        ) {
            fn v(x: &[String]) -> Vec<&str> {
                x.iter().map(String::as_str).collect()
            }
            let na = fragment_name(&v(&ia), &v(&ta));
            let nb = fragment_name(&v(&ib), &v(&tb));
            prop_assert_eq!(na == nb, ia == ib && ta == tb);
        }
    }
}
