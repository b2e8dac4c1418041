//! A tiny pool of blocking connections, shared by the network backends.
//!
//! Written here rather than taken from r2d2: we need only "reuse an idle
//! connection or open one, and drop it when anything went wrong", and r2d2
//! adds a reaper thread, health checks that cost a round trip per checkout
//! (the memcache crate's pool does that and hangs behind an unresponsive
//! server), and its own time-out semantics on top of ours.

use std::sync::Mutex;

use crate::error::Result;

pub(crate) struct Pool<C> {
    idle: Mutex<Vec<C>>,
    max_idle: usize,
}

impl<C> Pool<C> {
    pub(crate) fn new(max_idle: usize) -> Self {
        Pool {
            idle: Mutex::new(Vec::with_capacity(max_idle)),
            max_idle,
        }
    }

    /// Runs `f` on an idle connection, or on a new one from `connect`. The
    /// connection goes back to the pool only if `f` succeeded: after an error we
    /// cannot know what is left unread on it.
    ///
    /// An idle connection may have died while it waited (the server restarted):
    /// if it fails as unavailable, the pool is emptied and `f` runs once more on
    /// a new connection. Every operation we run is safe to repeat (a repeated
    /// bump is just one more bump).
    pub(crate) fn with<T>(
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
