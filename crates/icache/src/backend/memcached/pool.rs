//! A pool of memcached servers (`memcached://h1:p1,h2:p2,h3:p3`).
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
//! A multi-key read sends one `get` to every server involved, all written
//! before any answer is read: one round trip of latency however many servers.
//!
//! A server that fails is marked down for a second and its keys go to the
//! others. When it is tried again it is first emptied with `flush_all`: while
//! it was away, the generations of its tokens lived (and moved on) elsewhere,
//! so its old generations and entries must never match again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Conn, Fail, Memcached, read_values};
use crate::backend::{Backend, Fetched, Sharded, assemble, by_shard, pick};
use crate::codec::Entry;
use crate::config::{Config, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::Key;

/// How long a failed server stays out before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

struct Node {
    server: Memcached,
    /// `Some(t)`: down until `t`, then flushed before it is used again.
    down_until: Mutex<Option<Instant>>,
}

pub(crate) struct MemcachedPool {
    nodes: Vec<Node>,
    /// Bumped whenever a server goes down or comes back: a block is stored
    /// only if the routing did not change since its version was read.
    epoch: AtomicU64,
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

impl MemcachedPool {
    pub(crate) fn new(config: &Config) -> Result<Self> {
        let Target::Memcached { servers } = &config.target else {
            return Err(Error::config("not a memcached:// URL"));
        };
        Ok(MemcachedPool {
            nodes: servers
                .iter()
                .map(|s| Node {
                    server: Memcached::for_server(s.clone(), config),
                    down_until: Mutex::new(None),
                })
                .collect(),
            epoch: AtomicU64::new(0),
            redacted: config.redacted.clone(),
        })
    }

    /// The servers that may be used now; a server whose time out is over is
    /// flushed first (and stays out if that fails).
    fn live(&self) -> Vec<bool> {
        let now = Instant::now();
        self.nodes
            .iter()
            .map(|n| {
                let mut down = n.down_until.lock().unwrap_or_else(PoisonError::into_inner);
                match *down {
                    None => true,
                    Some(until) if until > now => false,
                    Some(_) => match n.server.flush_all() {
                        Ok(()) => {
                            *down = None;
                            self.epoch.fetch_add(1, Ordering::SeqCst);
                            tracing::info!(server = %n.server.server, "icache: memcached server is back (flushed)");
                            true
                        }
                        Err(_) => {
                            *down = Some(now + RETRY_AFTER);
                            false
                        }
                    },
                }
            })
            .collect()
    }

    fn mark_down(&self, i: usize, e: &Error) {
        if !e.is_transient() {
            return;
        }
        let node = &self.nodes[i];
        let mut down = node
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if down.is_none() {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(server = %node.server.server, error = %e, "icache: memcached server marked down");
        }
        *down = Some(Instant::now() + RETRY_AFTER);
    }

    /// The server for each key: rendezvous hashing over the live servers.
    fn route(&self, keys: &[String], live: &[bool]) -> Result<Vec<usize>> {
        keys.iter()
            .map(|k| {
                (0..self.nodes.len())
                    .filter(|&i| live[i])
                    .max_by_key(|&i| fnv1a(&[self.nodes[i].server.server.as_bytes(), k.as_bytes()]))
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::Unavailable,
                            format!("memcached pool {}: every server is down", self.redacted),
                        )
                    })
            })
            .collect()
    }
}

impl Sharded for MemcachedPool {
    type Shard = Memcached;

    /// Marks a server that fails as down.
    fn per_shard<T: Clone + Default>(
        &self,
        keys: &[Key<'_>],
        f: impl Fn(&Memcached, &[Key<'_>], &[usize]) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let live = self.live();
        let encoded: Vec<String> = keys.iter().map(|k| self.nodes[0].server.key(*k)).collect();
        let route = self.route(&encoded, &live)?;
        by_shard(&route, self.nodes.len(), |i, idx| {
            f(&self.nodes[i].server, &pick(keys, idx), idx).inspect_err(|e| self.mark_down(i, e))
        })
    }

    fn guard(&self) -> Arc<str> {
        Arc::from(format!("pool-epoch:{}", self.epoch.load(Ordering::SeqCst)))
    }
}

impl Backend for MemcachedPool {
    fn fetch(&self, tokens: &[&str], entries: &[Key<'_>]) -> Result<Fetched> {
        // After `live()`, which may bring a server back (a new epoch).
        let live = self.live();
        let guard = self.guard();
        let first = &self.nodes[0].server;
        let all: Vec<String> = tokens
            .iter()
            .map(|t| first.key(Key::gen_(t)))
            .chain(entries.iter().map(|k| first.key(*k)))
            .collect();
        let route = self.route(&all, &live)?;
        // Write every server's `get` first, then read the answers: the
        // servers work in parallel and the caller waits one round trip.
        let mut conns: Vec<(usize, Conn)> = Vec::new();
        let mut failure: Option<(usize, Error)> = None;
        for (i, node) in self.nodes.iter().enumerate() {
            let mine: Vec<&String> = (0..all.len())
                .filter(|&j| route[j] == i)
                .map(|j| &all[j])
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut req = String::from("get");
            for k in mine {
                req.push(' ');
                req.push_str(k);
            }
            req.push_str("\r\n");
            let conn = match node.server.pool.take() {
                Some(c) => Ok(c),
                None => node.server.connect(),
            };
            match conn.and_then(|mut c| {
                c.send(req.as_bytes())
                    .map_err(|e| node.server.fail("get", Fail::Io(e)))?;
                Ok(c)
            }) {
                Ok(c) => conns.push((i, c)),
                Err(e) => {
                    failure = Some((i, e));
                    break;
                }
            }
        }
        let mut found: std::collections::HashMap<String, (Vec<u8>, Arc<str>)> = Default::default();
        for (i, mut conn) in conns {
            if failure.is_some() {
                // Answers we will not read: the connection cannot be reused.
                continue;
            }
            match read_values(&mut conn, 8) {
                Ok(values) => {
                    for (k, v) in values {
                        found.insert(k, (v, conn.instance.clone()));
                    }
                    self.nodes[i].server.pool.put(conn);
                }
                Err(f) => failure = Some((i, self.nodes[i].server.fail("get", f))),
            }
        }
        if let Some((i, e)) = failure {
            self.mark_down(i, &e);
            return Err(e);
        }
        Ok(assemble(
            super::in_key_order(&all, found),
            tokens.len(),
            Some(guard),
        ))
    }

    fn init_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        self.sharded_init_gens(gens, fresh)
    }

    fn incr_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        self.sharded_incr_gens(gens, fresh)
    }

    fn set(
        &self,
        key: Key<'_>,
        entry: Arc<Entry>,
        ttl: Option<Duration>,
        guard: Option<&str>,
    ) -> Result<bool> {
        self.sharded_set(key, entry, ttl, guard)
    }

    fn delete(&self, key: Key<'_>) -> Result<bool> {
        self.sharded_delete(key)
    }

    fn ping(&self) -> Result<()> {
        let live = self.live();
        let mut up = 0;
        for (i, node) in self.nodes.iter().enumerate() {
            if live[i] {
                match node.server.ping() {
                    Ok(()) => up += 1,
                    Err(e) => self.mark_down(i, &e),
                }
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
