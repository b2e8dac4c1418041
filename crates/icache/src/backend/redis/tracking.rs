//! `near=tracking`: the connection that keeps in-process generations
//! coherent, through Redis's server-assisted client-side caching.
//!
//! One thread per cache handle owns one RESP3 connection with
//! `CLIENT TRACKING ON BCAST PREFIX <our generation keys>`: Redis then pushes
//! an invalidation on it for every change of one of this cache's generation
//! keys, whoever made it. The thread pings every `max_lag / 4`; reading the
//! answer to a ping means every invalidation Redis sent before it has been
//! applied (replies and pushes arrive in order on one connection), so
//! [`Gens`] trusts its table only while a ping sent at most `max_lag` ago has
//! been answered. A stalled connection (no answer within the time-out), a
//! dropped one, a restart (another `run_id`), `FLUSHALL`/`FLUSHDB` (the
//! null invalidation) and a `SWAPDB` (no invalidation, but the instance
//! marker the ping reads changes) all empty the table.
//!
//! Why our own loop rather than redis-rs's client-side cache: that cache is
//! async-only and experimental; the sync `Connection` gives us exactly what we
//! need (`send_packed_command`, and `recv_response`, which hands push
//! messages back in order with the replies), and the loop is small. Nothing
//! in the hit path waits on this thread: readers only look at the table and
//! one atomic.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use redis::Value;

use crate::near::Gens;
use crate::stats::Every;

/// Stops the tracking thread when the cache handle is dropped.
pub(crate) struct Tracking {
    stop: Arc<(Mutex<bool>, Condvar)>,
}

impl Drop for Tracking {
    fn drop(&mut self) {
        let (flag, wake) = &*self.stop;
        *flag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        wake.notify_all();
    }
}

impl std::fmt::Debug for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracking")
    }
}

/// What the thread needs.
pub(crate) struct Setup {
    pub(crate) client: redis::Client,
    /// The database's instance marker (`None`: the server's life alone).
    pub(crate) marker: Option<super::Marker>,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) redacted: String,
    /// `redis+sentinel://`: each session connects to the master it names
    /// now, and ends when its server stops being the master.
    pub(crate) sentinel: Option<Arc<super::sentinel::Sentinel>>,
}

/// Starts the tracking thread for `gens`.
pub(crate) fn start(setup: Setup, gens: Arc<Gens>) -> crate::Result<Tracking> {
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let thread_stop = stop.clone();
    std::thread::Builder::new()
        .name("icache-tracking".into())
        .spawn(move || run(&setup, &gens, &thread_stop))
        .map_err(|e| {
            crate::Error::new(
                crate::ErrorKind::Unavailable,
                "cannot start the near=tracking thread",
            )
            .with_source(e)
        })?;
    Ok(Tracking { stop })
}

/// Sleeps `d` unless stopped; `true` when stopped.
fn pause(stop: &(Mutex<bool>, Condvar), d: Duration) -> bool {
    let (flag, wake) = stop;
    let guard = flag
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *guard {
        return true;
    }
    let (guard, _) = wake
        .wait_timeout_while(guard, d, |stopped| !*stopped)
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *guard
}

fn run(setup: &Setup, gens: &Gens, stop: &(Mutex<bool>, Condvar)) {
    let log = Every::new();
    const FIRST_BACKOFF: Duration = Duration::from_millis(50);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let outcome = session(setup, gens, stop);
        // A connection that answered a ping before it failed starts the
        // back-off over: only failures in a row make it longer.
        if gens.was_answered() {
            backoff = FIRST_BACKOFF;
        }
        // Whatever ended the session, nothing in the table can be trusted.
        gens.reset(None);
        match outcome {
            Ok(()) => return,
            Err(e) => {
                if log.due() {
                    tracing::warn!(
                        url = %setup.redacted,
                        error = %e,
                        "icache: near=tracking connection lost; reads make a round trip until it is back (this warning at most every 10 s)"
                    );
                }
            }
        }
        if pause(stop, backoff) {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One tracking connection, until it fails (`Err`) or the handle is dropped
/// (`Ok`).
fn session(setup: &Setup, gens: &Gens, stop: &(Mutex<bool>, Condvar)) -> redis::RedisResult<()> {
    let mut con = match &setup.sentinel {
        Some(sentinel) => sentinel.connect(true).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Io, "redis+sentinel", e.to_string()))
        })?,
        None => setup
            .client
            .get_connection_with_timeout(setup.connect_timeout)?,
    };
    // Trust ends by itself `max_lag` after the last answered ping (readers
    // check it); the connection is dropped only when a ping goes unanswered
    // much longer, so a short stall of the server does not make every
    // handle reconnect.
    con.set_read_timeout(Some(
        (gens.max_lag() * 4)
            .max(setup.timeout)
            .max(Duration::from_secs(1)),
    ))?;
    con.set_write_timeout(Some(setup.timeout))?;
    let server = super::server_life(&mut con)?;
    // The same instance the pooled connections report: the table is
    // trusted only while they agree.
    let mut instance = match &setup.marker {
        Some(marker) => super::first_instance(&mut con, marker, &server)?,
        None => server.clone(),
    };
    let mut track = redis::cmd("CLIENT");
    track.arg("TRACKING").arg("ON").arg("BCAST");
    for prefix in gens.key_prefixes() {
        track.arg("PREFIX").arg(prefix);
    }
    track.query::<()>(&mut con)?;
    // Tracking is on from here: fills may begin.
    gens.reset(Some(instance.clone()));
    // The ping reads the marker: a `SWAPDB` sends no invalidation, but it
    // changes the marker, and so the instance the table belongs to. Under
    // Sentinel it asks `ROLE` first (as ordered as any command): a master
    // demoted by a failover, whose table would follow a lagging copy, ends
    // the session, and the next one tracks the new master. GETRANGE rather
    // than GET: an operator counting `get` calls sees only the reads of
    // pages (a missing key reads as "", never a marker).
    let mut ping = redis::pipe();
    if setup.sentinel.is_some() {
        ping.cmd("ROLE");
    }
    match &setup.marker {
        Some(marker) => ping.cmd("GETRANGE").arg(&marker.key).arg(0).arg(1023),
        None => ping.cmd("PING"),
    };
    let replies = 1 + usize::from(setup.sentinel.is_some());
    let ping = ping.get_packed_pipeline();
    let every = (gens.max_lag() / 4).clamp(Duration::from_millis(1), Duration::from_millis(250));
    loop {
        let sent = gens.now();
        let mut answer = exchange(&mut con, gens, &ping, replies)?;
        if setup.sentinel.is_some() {
            if !answer.first().is_some_and(super::sentinel::is_master) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "redis+sentinel: the tracked server is no longer the master",
                )));
            }
            answer.remove(0);
        }
        if let Some(marker) = &setup.marker {
            let now = match answer.into_iter().next() {
                Some(Value::BulkString(m)) if !m.is_empty() => super::Marker::instance(&server, &m),
                Some(Value::SimpleString(m)) if !m.is_empty() => {
                    super::Marker::instance(&server, m.as_bytes())
                }
                // Flushed: the next marker is set here, the way every
                // connection sets it (`SET NX`, then read it).
                _ => {
                    let fresh = crate::backend::fresh_generation().to_string();
                    let set = redis::pipe()
                        .cmd("SET")
                        .arg(&marker.key)
                        .arg(&fresh)
                        .arg("NX")
                        .cmd("GET")
                        .arg(&marker.key)
                        .get_packed_pipeline();
                    match exchange(&mut con, gens, &set, 2)?.pop() {
                        Some(Value::BulkString(m)) => super::Marker::instance(&server, &m),
                        _ => super::Marker::instance(&server, fresh.as_bytes()),
                    }
                }
            };
            if now != instance {
                instance = now;
                gens.reset(Some(instance.clone()));
            }
        }
        gens.answered(sent);
        if pause(stop, every) {
            return Ok(());
        }
    }
}

/// Sends `packed` and reads its `replies` answers, applying the
/// invalidations that come before them.
fn exchange(
    con: &mut redis::Connection,
    gens: &Gens,
    packed: &[u8],
    replies: usize,
) -> redis::RedisResult<Vec<Value>> {
    con.send_packed_command(packed)?;
    let mut out = Vec::with_capacity(replies);
    while out.len() < replies {
        match con.recv_response()? {
            Value::Push { kind, data } => {
                if kind == redis::PushKind::Invalidate {
                    invalidated(gens, data);
                }
            }
            Value::ServerError(e) => return Err(e.into()),
            answer => out.push(answer),
        }
    }
    Ok(out)
}

/// Applies one invalidation push: the keys it names, or everything (`FLUSHALL`,
/// `FLUSHDB`: a null list).
fn invalidated(gens: &Gens, data: Vec<Value>) {
    match data.into_iter().next() {
        Some(Value::Array(keys)) => {
            let names: Vec<String> = keys
                .into_iter()
                .filter_map(|k| match k {
                    Value::BulkString(b) => String::from_utf8(b).ok(),
                    Value::SimpleString(s) => Some(s),
                    _ => None,
                })
                .collect();
            gens.invalidate(names.iter().map(String::as_str));
        }
        _ => gens.flush(),
    }
}
