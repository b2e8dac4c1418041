//! A pool of memcached servers (`memcached://h1:p1,h2:p2,h3:p3`).
//!
//! ## Routing
//!
//! Keys are routed by rendezvous (highest random weight) hashing over the
//! servers that are up: each key goes to the server with the highest
//! `hash(server, key)`. Adding or losing a server moves only that server's
//! keys, and every client that sees the same servers up routes the same way.
//! The hash is our own fixed function (FNV-1a 64), not std's `DefaultHasher`,
//! whose output may change between Rust releases: a bump must land where
//! readers look, whichever build wrote it. Written here because the whole
//! algorithm is a loop and a hash; no crate made for it is better kept.
//!
//! A multi-key read sends one request to every server involved, all written
//! before any answer is read: one round trip of latency however many servers.
//!
//! ## Down and back, without wiping anyone
//!
//! A server is marked down after three failed calls in a row (a success
//! resets the count; one slow answer does not move a third of the keys, and
//! calls the circuit breaker refused without asking the server do not
//! count). Its keys then go to the others, and it is tried again a second
//! later.
//!
//! While it was away, the generations of its tokens lived (and moved on)
//! elsewhere, and it still holds the old ones: they must never match again.
//! The pool never uses `flush_all` for that: the server is shared with other
//! apps and prefixes whose entries are not ours to drop (and `memcached -F`
//! refuses it). Instead every server holds an **epoch** under this client's
//! prefix (key `[prefix:]ic:g:pool-epoch`), and every key this client
//! routes to a server carries that server's current epoch
//! (`ic:g:movies@<epoch in hex>`). A server that comes back gets its epoch
//! bumped (an atomic `incr`), so all of this client's old keys there become
//! unreachable, and nothing else on the server is touched. A missing epoch
//! (evicted, server restarted) is created with `add` of a fresh random value,
//! so an epoch never returns to an old value.
//!
//! The same hole exists on the other side: a key that went to server B
//! while its own server A was away leaves its copy on B when A comes back,
//! and A's next outage would find that old copy again. So a key routed
//! around down servers also carries their **detour epochs**, kept on the
//! server that takes the key (`[prefix:]ic:g:pool-detour:<A>` on B), and
//! A's return bumps its detour epoch on every other server.
//!
//! Other client processes share the epochs: each request to a server also
//! reads the epochs its keys were built from, in the same pipelined request
//! (still one round trip). When one moved (another client brought the server
//! back), the answer is dropped, the new epoch remembered, and the request
//! retried once: an extra round trip only when an epoch changed. The epochs
//! are read *after* the request's commands, so an answer that counts was
//! given under the epoch it was built from (epochs only move forward).
//!
//! What epochs cannot fix is clients that disagree about which servers are
//! up (one marked a server down, another still uses it): while they disagree
//! they may read a token in two places. Each client's own view heals within
//! a second of the server's return, but the chaos run (`icache-chaos`, three
//! processes) finds stale reads in those windows. Hence `?failover=off`:
//! servers are never marked down, keys never move, and a down server's
//! blocks render uncached (its bumps fail and are replayed) until it answers
//! again, exactly as with a single server. Every process then reads each
//! token in one place; the chaos run is clean.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{
    Check, Checked, Conn, Fail, Memcached, exptime, get_request, read_values, unchecked, unix_now,
};
use crate::backend::{
    Backend, Fetched, assemble, fresh_generation, fresh_generations, parse_gen, pick,
};
use crate::codec::Entry;
use crate::config::{Config, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{self, Key};
use crate::pool::Admitted;

/// How long a failed server stays out before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// When a server's return was refused by its circuit breaker without asking
/// it (a cheap check), how soon it is tried again.
const RETRY_SOON: Duration = Duration::from_millis(100);
/// Failed calls in a row that take a server out.
const FAILURES_TO_MARK_DOWN: u32 = 3;
/// The name (a generation key of this client's prefix) of a server's epoch.
/// Never routed, so never suffixed: no routed key can equal it.
const EPOCH_NAME: &str = "pool-epoch";
/// The name of the detour epoch of a server (this plus its address), kept
/// on each other server.
const DETOUR_NAME: &str = "pool-detour:";

struct Node {
    server: Memcached,
    /// Failed calls in a row (outside the lock: a success resets it on
    /// every request).
    failures: AtomicU32,
    state: Mutex<NodeState>,
}

struct NodeState {
    /// `Some(t)`: down until `t`, then brought back (its epoch bumped).
    down_until: Option<Instant>,
    /// What this client believes the server holds: `marks[own index]` is its
    /// epoch, `marks[j]` the detour epoch of server `j`. `None`: not known
    /// yet (read, or created, before the next request that needs it).
    marks: Vec<Option<u64>>,
    /// `owed[j]`: server `j` came back but its detour epoch here could not be
    /// bumped then; it is bumped before it is used again.
    owed: Vec<bool>,
}

impl Node {
    fn lock(&self) -> MutexGuard<'_, NodeState> {
        // Plain data: a panic elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) struct MemcachedPool {
    nodes: Vec<Node>,
    prefix: String,
    /// The key of a server's epoch, on that server.
    epoch_key: String,
    /// `detour_keys[j]`: the key of server `j`'s detour epoch, on the others.
    detour_keys: Vec<String>,
    /// Bumped whenever a server goes down or comes back: a block is stored
    /// only if the routing did not change since its version was read.
    routing: AtomicU64,
    /// `?failover=move` (the default): a server is marked down after three
    /// failed calls in a row and its keys go to the others. `off`: keys
    /// never move; a down server's blocks render uncached until it answers.
    failover: bool,
    redacted: String,
}

impl std::fmt::Debug for MemcachedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedPool")
            .field("url", &self.redacted)
            .finish()
    }
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate the parts so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // A final mix spreads FNV's weak low bits.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Where one key goes.
struct Placed {
    server: usize,
    /// The servers ranked above `server` for this key, which are down.
    detour: Vec<usize>,
}

/// The keys of one operation that go to one server, ready to send.
struct Group {
    server: usize,
    /// Their indices in the operation's keys.
    idx: Vec<usize>,
    /// Their keys on this server (epochs embedded).
    routed: Vec<String>,
    /// The marks the keys were built from (this server's epoch first, then
    /// detour epochs), their keys on this server, and their values.
    mark_ids: Vec<usize>,
    check_keys: Vec<String>,
    expect: Vec<u64>,
}

impl Group {
    fn check(&self) -> Check<'_> {
        Check {
            keys: &self.check_keys,
            expect: &self.expect,
        }
    }
}

/// One server's answer to a fetch: the values, or the marks that moved.
type Read = Checked<Vec<Option<Vec<u8>>>>;

impl MemcachedPool {
    pub(crate) fn new(config: &Config) -> Result<Self> {
        let Target::Memcached { servers, failover } = &config.target else {
            return Err(Error::config("not a memcached:// URL"));
        };
        if servers.is_empty() {
            return Err(Error::config(format!("no server in {}", config.redacted)));
        }
        let n = servers.len();
        Ok(MemcachedPool {
            nodes: servers
                .iter()
                .map(|s| Node {
                    server: Memcached::for_server(s.clone(), config),
                    failures: AtomicU32::new(0),
                    state: Mutex::new(NodeState {
                        down_until: None,
                        marks: vec![None; n],
                        owed: vec![false; n],
                    }),
                })
                .collect(),
            prefix: config.prefix.clone(),
            epoch_key: keys::encode(&config.prefix, Key::gen_(EPOCH_NAME)),
            detour_keys: servers
                .iter()
                .map(|s| keys::encode(&config.prefix, Key::gen_(&format!("{DETOUR_NAME}{s}"))))
                .collect(),
            routing: AtomicU64::new(0),
            failover: *failover,
            redacted: config.redacted.clone(),
        })
    }

    fn key(&self, k: Key<'_>) -> String {
        keys::encode(&self.prefix, k)
    }

    /// The key of mark `j` on server `i`.
    fn mark_key(&self, i: usize, j: usize) -> &str {
        if i == j {
            &self.epoch_key
        } else {
            &self.detour_keys[j]
        }
    }

    fn guard(&self) -> Arc<str> {
        Arc::from(format!(
            "pool-routing:{}",
            self.routing.load(Ordering::SeqCst)
        ))
    }

    /// The servers that may be used now. A server whose time out is over is
    /// brought back first (and stays out if that fails).
    fn live(&self) -> Vec<bool> {
        let now = Instant::now();
        (0..self.nodes.len())
            .map(|i| {
                {
                    let mut st = self.nodes[i].lock();
                    match st.down_until {
                        None => return true,
                        Some(until) if until > now => return false,
                        // This thread brings it back; the others keep it
                        // out meanwhile.
                        Some(_) => st.down_until = Some(now + RETRY_AFTER),
                    }
                }
                self.bring_back(i)
            })
            .collect()
    }

    /// Takes server `i` back: bumps its epoch (all of this client's old keys
    /// there become unreachable; nothing else is touched), routes to it
    /// again, then bumps its detour epoch on every other server (the copies
    /// its keys left there while it was away become unreachable).
    fn bring_back(&self, i: usize) -> bool {
        let node = &self.nodes[i];
        let bumped = node
            .server
            .incr_counters(
                std::slice::from_ref(&self.epoch_key),
                &[fresh_generation()],
                Check::default(),
            )
            .and_then(unchecked);
        let epoch = match bumped {
            Ok(v) => v.first().copied(),
            Err(e) => {
                if e.is_circuit_open() {
                    // Nothing was asked (the server's circuit breaker is
                    // still open): try again soon, when its probe is due,
                    // rather than a whole period later.
                    node.lock().down_until = Some(Instant::now() + RETRY_SOON);
                }
                tracing::debug!(server = %node.server.server, error = %e, "icache: memcached server still down");
                return false;
            }
        };
        {
            let mut st = node.lock();
            st.marks[i] = epoch;
            st.down_until = None;
        }
        node.failures.store(0, Ordering::SeqCst);
        self.routing.fetch_add(1, Ordering::SeqCst);
        tracing::info!(server = %node.server.server, "icache: memcached server is back (its epoch bumped)");
        // After the switch: a request still routing around `i` with the old
        // detour epoch sees it move, and is retried on the new routing.
        for (r, other) in self.nodes.iter().enumerate() {
            if r == i || other.lock().down_until.is_some() {
                // A server that is down gets its own epoch bumped when it
                // returns, which covers the detour copies it holds.
                continue;
            }
            let keys = std::slice::from_ref(&self.detour_keys[i]);
            match self.call(r, || {
                other
                    .server
                    .incr_counters(keys, &[fresh_generation()], Check::default())
                    .and_then(unchecked)
            }) {
                Ok(v) => {
                    let mut st = other.lock();
                    st.marks[i] = v.first().copied();
                    st.owed[i] = false;
                }
                Err(_) => other.lock().owed[i] = true,
            }
        }
        true
    }

    /// Runs one call to server `i`, counting its failure or success.
    fn call<T>(&self, i: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let out = f();
        match &out {
            Ok(_) => self.succeeded(i),
            Err(e) => self.failed(i, e),
        }
        out
    }

    fn succeeded(&self, i: usize) {
        let f = &self.nodes[i].failures;
        if f.load(Ordering::Relaxed) != 0 {
            f.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failed call; the third in a row marks the server down. Only
    /// "the server did not answer" counts: a refusal by the circuit breaker
    /// never reached the server, and an error answer is an answer.
    fn failed(&self, i: usize, e: &Error) {
        if !self.failover || !e.is_transient() || e.is_circuit_open() {
            return;
        }
        let node = &self.nodes[i];
        let mut st = node.lock();
        if st.down_until.is_some() {
            return;
        }
        if node.failures.fetch_add(1, Ordering::SeqCst) + 1 < FAILURES_TO_MARK_DOWN {
            return;
        }
        node.failures.store(0, Ordering::SeqCst);
        st.down_until = Some(Instant::now() + RETRY_AFTER);
        self.routing.fetch_add(1, Ordering::SeqCst);
        tracing::warn!(server = %node.server.server, error = %e, "icache: memcached server marked down");
    }

    fn all_down(&self) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            format!("memcached pool {}: every server is down", self.redacted),
        )
    }

    fn kept_moving(&self) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "memcached pool {}: a server's epoch changed again while a request was retried",
                self.redacted
            ),
        )
    }

    /// The server for a key: rendezvous hashing over the live servers, and
    /// the down servers ranked above it.
    fn place(&self, key: &str, live: &[bool]) -> Result<Placed> {
        // Ties (practically never) go to the later server, as they always did.
        let rank = |i: usize| {
            (
                fnv1a(&[self.nodes[i].server.server.as_bytes(), key.as_bytes()]),
                i,
            )
        };
        let server = (0..self.nodes.len())
            .filter(|&i| live[i])
            .max_by_key(|&i| rank(i))
            .ok_or_else(|| self.all_down())?;
        let detour = if live.iter().all(|&l| l) {
            Vec::new()
        } else {
            let top = rank(server);
            (0..self.nodes.len())
                .filter(|&i| !live[i] && rank(i) > top)
                .collect()
        };
        Ok(Placed { server, detour })
    }

    /// The key `base` has on a server whose epoch is `epoch`, routed around
    /// the `detour` servers whose detour epochs there are `detour_epoch(j)`.
    /// `@` never occurs in what follows it, so the last `@` ends `base`: no
    /// two (base, epochs) give the same key, and no routed key equals an
    /// epoch key (those have no `@` suffix).
    fn routed_key(
        &self,
        base: &str,
        epoch: u64,
        detour: &[usize],
        detour_epoch: impl Fn(usize) -> Option<u64>,
    ) -> Result<String> {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(base.len() + 50);
        out.push_str(base);
        // Writing to a String cannot fail.
        let _ = write!(out, "@{epoch:x}");
        if !detour.is_empty() {
            // Named by address, in a fixed order: every client lists the same
            // servers, not necessarily in the same order.
            let mut parts: Vec<String> = Vec::with_capacity(detour.len());
            for &j in detour {
                let e = detour_epoch(j).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Backend,
                        "memcached pool: a detour epoch was not read",
                    )
                })?;
                parts.push(format!("{}={e:x};", self.nodes[j].server.server));
            }
            parts.sort_unstable();
            let digest = keys::sha256_hex(parts.concat().as_bytes());
            out.push('.');
            out.push_str(digest.get(..32).unwrap_or(&digest));
        }
        Ok(out)
    }

    /// Routes the `pending` keys of `bases` and builds each server's request:
    /// the marks it needs are read (or created) first where this client
    /// does not know them yet.
    fn plan(&self, bases: &[String], pending: &[usize], live: &[bool]) -> Result<Vec<Group>> {
        let mut placed: Vec<(usize, Placed)> = Vec::with_capacity(pending.len());
        for &k in pending {
            placed.push((k, self.place(&bases[k], live)?));
        }
        let mut groups = Vec::new();
        for i in 0..self.nodes.len() {
            let mine: Vec<&(usize, Placed)> =
                placed.iter().filter(|(_, p)| p.server == i).collect();
            if mine.is_empty() {
                continue;
            }
            let mut mark_ids = vec![i];
            for (_, p) in &mine {
                for &j in &p.detour {
                    if !mark_ids.contains(&j) {
                        mark_ids.push(j);
                    }
                }
            }
            let expect = self.ready(i, &mark_ids)?;
            let value_of = |j: usize| {
                mark_ids
                    .iter()
                    .position(|&m| m == j)
                    .and_then(|p| expect.get(p).copied())
            };
            let epoch = value_of(i).unwrap_or_default();
            let routed = mine
                .iter()
                .map(|(k, p)| self.routed_key(&bases[*k], epoch, &p.detour, value_of))
                .collect::<Result<Vec<String>>>()?;
            groups.push(Group {
                server: i,
                idx: mine.iter().map(|(k, _)| *k).collect(),
                routed,
                check_keys: mark_ids
                    .iter()
                    .map(|&j| self.mark_key(i, j).to_owned())
                    .collect(),
                mark_ids,
                expect,
            });
        }
        Ok(groups)
    }

    /// The values of marks `ids` on server `i`, as this client knows them;
    /// unknown ones are read from the server (and created with `add` of a
    /// fresh random value where missing), owed detour bumps are paid first.
    fn ready(&self, i: usize, ids: &[usize]) -> Result<Vec<u64>> {
        let node = &self.nodes[i];
        let (mut known, owed) = {
            let st = node.lock();
            let known: Vec<Option<u64>> = ids.iter().map(|&j| st.marks[j]).collect();
            let owed: Vec<usize> = ids.iter().copied().filter(|&j| st.owed[j]).collect();
            (known, owed)
        };
        if !owed.is_empty() {
            let keys: Vec<String> = owed.iter().map(|&j| self.detour_keys[j].clone()).collect();
            let got = self.call(i, || {
                node.server
                    .incr_counters(&keys, &fresh_generations(keys.len()), Check::default())
                    .and_then(unchecked)
            })?;
            let mut st = node.lock();
            for (&j, v) in owed.iter().zip(got) {
                st.marks[j] = Some(v);
                st.owed[j] = false;
                if let Some(p) = ids.iter().position(|&m| m == j) {
                    known[p] = Some(v);
                }
            }
        }
        let unknown: Vec<usize> = (0..ids.len()).filter(|&p| known[p].is_none()).collect();
        if !unknown.is_empty() {
            // Read first: usually another client (or an earlier life of this
            // one) made them.
            let keys: Vec<String> = unknown
                .iter()
                .map(|&p| self.mark_key(i, ids[p]).to_owned())
                .collect();
            let (now, _) = self.call(i, || {
                node.server
                    .get_keys(&keys, Check::default())
                    .and_then(unchecked)
            })?;
            let mut found: Vec<Option<u64>> = now
                .iter()
                .map(|v| v.as_deref().and_then(parse_gen))
                .collect();
            let missing: Vec<usize> = (0..found.len()).filter(|&q| found[q].is_none()).collect();
            if !missing.is_empty() {
                let mk: Vec<String> = missing.iter().map(|&q| keys[q].clone()).collect();
                let made = self.call(i, || {
                    node.server
                        .init_counters(&mk, &fresh_generations(mk.len()), Check::default())
                        .and_then(unchecked)
                })?;
                for (&q, v) in missing.iter().zip(made) {
                    found[q] = Some(v);
                }
            }
            let mut st = node.lock();
            for (&p, v) in unknown.iter().zip(found) {
                st.marks[ids[p]] = v;
                known[p] = v;
            }
        }
        known
            .into_iter()
            .map(|v| {
                v.ok_or_else(|| {
                    Error::new(
                        ErrorKind::Backend,
                        format!(
                            "memcached pool {}: an epoch could not be read",
                            self.redacted
                        ),
                    )
                })
            })
            .collect()
    }

    /// Remembers what a server's marks hold now (after a `Moved`).
    fn observed(&self, g: &Group, now: Vec<Option<u64>>) {
        let mut st = self.nodes[g.server].lock();
        for (&j, v) in g.mark_ids.iter().zip(now) {
            st.marks[j] = v;
        }
    }

    /// Runs `op` on each server with its keys; results in key order. A
    /// server whose marks moved is asked again (once) on the new routing.
    fn on_servers<T: Clone + Default>(
        &self,
        bases: &[String],
        op: impl Fn(&Memcached, &Group) -> Result<Checked<Vec<T>>>,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); bases.len()];
        let mut pending: Vec<usize> = (0..bases.len()).collect();
        for _ in 0..2 {
            let live = self.live();
            let groups = self.plan(bases, &pending, &live)?;
            let mut moved = Vec::new();
            for g in &groups {
                match self.call(g.server, || op(&self.nodes[g.server].server, g))? {
                    Checked::Done(values) => {
                        for (&k, v) in g.idx.iter().zip(values) {
                            out[k] = v;
                        }
                    }
                    Checked::Moved(now) => {
                        self.observed(g, now);
                        moved.extend_from_slice(&g.idx);
                    }
                }
            }
            if moved.is_empty() {
                return Ok(out);
            }
            pending = moved;
        }
        Err(self.kept_moving())
    }

    /// Sends `req` to server `i` on an idle connection (`true`) or a new
    /// one. An idle connection that fails is replaced by a new one: it may
    /// have died while it waited (the server restarted).
    fn send(&self, i: usize, req: &[u8]) -> Result<(Conn, bool)> {
        let server = &self.nodes[i].server;
        if let Some(mut conn) = server.pool.take() {
            if conn.send(&[req]).is_ok() {
                return Ok((conn, true));
            }
            server.pool.clear();
        }
        let mut conn = server.connect()?;
        conn.send(&[req])
            .map_err(|e| server.fail("get", Fail::Io(e)))?;
        Ok((conn, false))
    }

    /// Reads one server's answer to a fetch.
    fn read(&self, g: &Group, conn: &mut Conn) -> Result<Read> {
        let answer = (|| {
            let values = read_values(conn, &g.routed)?;
            Ok(match g.check().read(conn)? {
                None => Checked::Done(values),
                Some(now) => Checked::Moved(now),
            })
        })();
        answer.map_err(|f| self.nodes[g.server].server.fail("get", f))
    }

    /// Sends and reads on connection `conn` (from [`send`](Self::send)); an
    /// idle connection found dead is replaced once by a new one.
    fn exchange(&self, g: &Group, req: &[u8], conn: Result<(Conn, bool)>) -> Result<(Conn, Read)> {
        let (mut conn, reused) = conn?;
        match self.read(g, &mut conn) {
            Ok(r) => Ok((conn, r)),
            Err(e) if reused && e.is_unavailable() => {
                let server = &self.nodes[g.server].server;
                server.pool.clear();
                let mut conn = server.connect()?;
                conn.send(&[req])
                    .map_err(|e| server.fail("get", Fail::Io(e)))?;
                let r = self.read(g, &mut conn)?;
                Ok((conn, r))
            }
            Err(e) => Err(e),
        }
    }

    /// One fetch round: every server's request is written first, then the
    /// answers are read, so the servers work in parallel and the caller
    /// waits one round trip. Fills `found`; returns the keys to ask again
    /// (their server's marks moved).
    fn fetch_round(
        &self,
        groups: &[Group],
        found: &mut [Option<(Vec<u8>, Arc<str>)>],
    ) -> Result<Vec<usize>> {
        /// A request written (or not: `conn` is the error) to one server.
        struct Sent<'g> {
            g: &'g Group,
            req: Vec<u8>,
            admitted: Admitted<'g>,
            conn: Result<(Conn, bool)>,
        }
        let mut failure: Option<Error> = None;
        let mut sent: Vec<Sent<'_>> = Vec::new();
        for g in groups {
            let server = &self.nodes[g.server].server;
            let admitted = match server.pool.admit() {
                Ok(a) => a,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let mut req = get_request(&g.routed).into_bytes();
            req.extend_from_slice(get_request(&g.check_keys).as_bytes());
            let conn = self.send(g.server, &req);
            let stop = conn.is_err();
            sent.push(Sent {
                g,
                req,
                admitted,
                conn,
            });
            if stop {
                break;
            }
        }
        let mut moved = Vec::new();
        // Every admitted call is read and recorded, even after another
        // server failed (its breaker must learn how the call went).
        for Sent {
            g,
            req,
            admitted,
            conn,
        } in sent
        {
            let server = &self.nodes[g.server].server;
            let outcome = self.call(g.server, || self.exchange(g, &req, conn));
            let record: Result<()> = match outcome {
                Ok((conn, Checked::Done(values))) => {
                    for (&k, v) in g.idx.iter().zip(values) {
                        found[k] = v.map(|b| (b, conn.instance.clone()));
                    }
                    server.pool.put(conn);
                    Ok(())
                }
                Ok((conn, Checked::Moved(now))) => {
                    self.observed(g, now);
                    moved.extend_from_slice(&g.idx);
                    server.pool.put(conn);
                    Ok(())
                }
                Err(e) => Err(e),
            };
            server.pool.record(admitted, &record);
            if let Err(e) = record {
                failure.get_or_insert(e);
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(moved),
        }
    }
}

impl Backend for MemcachedPool {
    fn fetch(&self, tokens: &[&str], entries: &[Key<'_>]) -> Result<Fetched> {
        let bases: Vec<String> = crate::backend::fetch_keys(&self.prefix, tokens, entries);
        let mut found: Vec<Option<(Vec<u8>, Arc<str>)>> = (0..bases.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..bases.len()).collect();
        let mut guard = None;
        for _ in 0..2 {
            // After `live()`, which may bring a server back (a new routing),
            // and from the first round: a retry that routes differently
            // makes the store refuse this version, which is the safe side.
            let live = self.live();
            let guard = guard.get_or_insert_with(|| self.guard()).clone();
            let groups = self.plan(&bases, &pending, &live)?;
            pending = self.fetch_round(&groups, &mut found)?;
            if pending.is_empty() {
                return Ok(assemble(found, tokens.len(), Some(guard)));
            }
        }
        Err(self.kept_moving())
    }

    fn init_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        let bases: Vec<String> = gens.iter().map(|k| self.key(*k)).collect();
        self.on_servers(&bases, |s, g| {
            s.init_counters(&g.routed, &pick(fresh, &g.idx), g.check())
        })
    }

    fn incr_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        let bases: Vec<String> = gens.iter().map(|k| self.key(*k)).collect();
        self.on_servers(&bases, |s, g| {
            s.incr_counters(&g.routed, &pick(fresh, &g.idx), g.check())
        })
    }

    fn set(
        &self,
        key: Key<'_>,
        entry: Arc<Entry>,
        ttl: Option<Duration>,
        guard: Option<&str>,
    ) -> Result<bool> {
        if guard.is_some_and(|g| *g != *self.guard()) {
            return Ok(false);
        }
        let exptime = exptime(ttl, unix_now());
        let out = self.on_servers(&[self.key(key)], |s, g| {
            let Some(k) = g.routed.first() else {
                return Ok(Checked::Done(Vec::new()));
            };
            Ok(match s.set_entry(k, &entry, exptime, None, g.check())? {
                Checked::Done(b) => Checked::Done(vec![b]),
                Checked::Moved(now) => Checked::Moved(now),
            })
        })?;
        Ok(out.first().copied().unwrap_or(false))
    }

    fn delete(&self, key: Key<'_>) -> Result<bool> {
        let out = self.on_servers(&[self.key(key)], |s, g| {
            let Some(k) = g.routed.first() else {
                return Ok(Checked::Done(Vec::new()));
            };
            Ok(match s.delete_key(k, g.check())? {
                Checked::Done(b) => Checked::Done(vec![b]),
                Checked::Moved(now) => Checked::Moved(now),
            })
        })?;
        Ok(out.first().copied().unwrap_or(false))
    }

    fn lease(&self, key: Key<'_>, ttl: Duration) -> Result<bool> {
        let out = self.on_servers(&[self.key(key)], |s, g| {
            let Some(k) = g.routed.first() else {
                return Ok(Checked::Done(Vec::new()));
            };
            Ok(match s.add_lease(k, ttl, g.check())? {
                Checked::Done(b) => Checked::Done(vec![b]),
                Checked::Moved(now) => Checked::Moved(now),
            })
        })?;
        Ok(out.first().copied().unwrap_or(false))
    }

    fn ping(&self) -> Result<()> {
        let live = self.live();
        let mut up = 0;
        for (i, node) in self.nodes.iter().enumerate() {
            if live[i] && self.call(i, || node.server.ping()).is_ok() {
                up += 1;
            }
        }
        if up == 0 {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("memcached pool {}: no server answers", self.redacted),
            ));
        }
        Ok(())
    }

    fn server_stats(&self) -> Result<Vec<(String, String)>> {
        let live = self.live();
        let mut out = vec![("servers".to_string(), self.nodes.len().to_string())];
        out.push((
            "servers_up".to_string(),
            live.iter().filter(|&&l| l).count().to_string(),
        ));
        for (i, node) in self.nodes.iter().enumerate() {
            out.push((format!("server{i}"), node.server.server.clone()));
            out.push((format!("server{i}.up"), u8::from(live[i]).to_string()));
            match node.server.server_stats() {
                Ok(stats) => out.extend(
                    stats
                        .into_iter()
                        .map(|(k, v)| (format!("server{i}.{k}"), v)),
                ),
                Err(e) => out.push((format!("server{i}.error"), e.to_string())),
            }
        }
        Ok(out)
    }

    fn name(&self) -> &'static str {
        "memcached"
    }
}

#[cfg(test)]
mod tests {
    use super::fnv1a;

    #[test]
    fn the_routing_hash_never_changes() {
        // Pinned: a different value would send bumps and reads of the same
        // token to different servers across builds.
        assert_eq!(fnv1a(&[b"x"]), 4_685_073_499_457_051_372, "pinned value");
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }
}
