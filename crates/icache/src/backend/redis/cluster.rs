//! Redis Cluster (`redis+cluster://host:port,host:port`).
//!
//! Routing is ours, on redis-rs's plain connections: the slot map comes from
//! `CLUSTER SLOTS`, a key's slot is CRC16 (XMODEM) of the key modulo 16384,
//! exactly Redis's rule for keys without a `{hash tag}` (ours never have
//! braces: readable names exclude them and hashed names are hex). We do not
//! use redis-rs's cluster client because a hit must fetch keys that live on
//! several nodes in **one round trip of latency**: we write each node's
//! pipeline of `GET`s first and only then read the answers, so the nodes
//! work in parallel. Nothing here sends a multi-key command or a script:
//! per-key `GET`s, and per-key `MULTI; SET NX; INCR; EXEC` (one slot each).
//!
//! A `MOVED`/`ASK` answer or a failed node makes the next operation reload
//! the slot map (at most every 100 ms). An operation that fails is an error,
//! so blocks render uncached (fail-open) while the cluster is not ok.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use url::Url;

use super::{Conn, Redis};
use crate::backend::{Backend, Fetched, Sharded, assemble, by_shard, pick};
use crate::codec::Entry;
use crate::config::{Config, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{self, Key};

const SLOTS: usize = 16384;

/// A value found, with the instance of the node that answered.
type Found = Option<(Vec<u8>, Arc<str>)>;
/// The slot map is reloaded at most this often.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

/// `host:port`, with an IPv6 host in brackets (`[::1]:7000`): the one form
/// of a node's address, so the same node reached from a seed, from
/// `CLUSTER SLOTS` or from redis-rs's connection info is one client, and
/// [`split_host_port`] can read it back (a bare `::1:7000` is ambiguous).
pub(super) fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Host and port of an address made by [`join_host_port`], the port 6379 if
/// missing. An IPv6 host keeps its brackets, the form `Url::set_host` takes.
/// `None` for what that function never makes: an unclosed bracket, a bad
/// port, an IPv6 address without brackets.
fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = if addr.starts_with('[') {
        let close = addr.find(']')?;
        let (host, rest) = addr.split_at(close + 1);
        (host, rest.strip_prefix(':'))
    } else {
        match addr.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => return None,
            Some((host, port)) => (host, Some(port)),
            None => (addr, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None if host.len() == addr.len() => 6379,
        // Text after `]` that is not `:port`.
        None => return None,
    };
    (!host.is_empty()).then_some((host, port))
}

/// The slot of a key without a hash tag.
fn slot(key: &str) -> usize {
    usize::from(crc16::State::<crc16::XMODEM>::calculate(key.as_bytes())) % SLOTS
}

struct Topology {
    /// Node index for every slot (`usize::MAX`: not served).
    slots: Vec<usize>,
    nodes: Vec<Arc<Redis>>,
}

pub(crate) struct RedisCluster {
    /// The first seed URL: user, password and scheme for every node.
    template: Url,
    seeds: Vec<String>,
    config: Config,
    topology: RwLock<Option<Arc<Topology>>>,
    /// Clients by "host:port", kept across reloads of the slot map.
    clients: Mutex<HashMap<String, Arc<Redis>>>,
    stale: Mutex<Option<Instant>>,
    /// Bumped whenever the slot map changes: a block is stored only if the
    /// routing did not change since its version was read.
    epoch: AtomicU64,
    prefix: String,
    redacted: String,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field("url", &self.redacted)
            .finish()
    }
}

impl RedisCluster {
    pub(crate) fn new(config: &Config) -> Result<Self> {
        let Target::RedisCluster { nodes } = &config.target else {
            return Err(Error::config("not a redis+cluster:// URL"));
        };
        let first = nodes
            .first()
            .ok_or_else(|| Error::config(format!("no node in {}", config.redacted)))?;
        let template =
            Url::parse(first).map_err(|e| Error::config(format!("{}: {e}", config.redacted)))?;
        let seeds = nodes
            .iter()
            .filter_map(|n| Url::parse(n).ok())
            .map(|u| join_host_port(u.host_str().unwrap_or_default(), u.port().unwrap_or(6379)))
            .collect();
        Ok(RedisCluster {
            template,
            seeds,
            config: config.clone(),
            topology: RwLock::new(None),
            clients: Mutex::new(HashMap::new()),
            stale: Mutex::new(None),
            epoch: AtomicU64::new(0),
            prefix: config.prefix.clone(),
            redacted: config.redacted.clone(),
        })
    }

    fn client(&self, addr: &str) -> Result<Arc<Redis>> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let bad = |what: &str| Error::config(format!("node {addr} of {}: {what}", self.redacted));
        let (host, port) = split_host_port(addr).ok_or_else(|| bad("not host:port"))?;
        let mut url = self.template.clone();
        // An IPv6 host goes in with its brackets: that is how a URL holds one.
        url.set_host(Some(host)).map_err(|e| bad(&e.to_string()))?;
        url.set_port(Some(port)).map_err(|()| bad("bad port"))?;
        let redacted = format!("{} (node {addr})", self.redacted);
        let node = Arc::new(Redis::open(url.as_str(), None, &self.config, redacted)?);
        clients.insert(addr.to_string(), node.clone());
        Ok(node)
    }

    /// The current slot map, loaded or reloaded when needed.
    fn topology(&self) -> Result<Arc<Topology>> {
        let want_refresh = {
            let stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
            stale.is_some_and(|since| since.elapsed() >= REFRESH_EVERY)
        };
        if !want_refresh
            && let Some(t) = &*self.topology.read().unwrap_or_else(PoisonError::into_inner)
        {
            return Ok(t.clone());
        }
        match self.refresh() {
            Ok(t) => Ok(t),
            // Keep using the old map if there is one: the failing node's slots
            // fail, the others work.
            Err(e) => match &*self.topology.read().unwrap_or_else(PoisonError::into_inner) {
                Some(t) => {
                    *self.stale.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(Instant::now());
                    Ok(t.clone())
                }
                None => Err(e),
            },
        }
    }

    fn mark_stale(&self) {
        let mut stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
        if stale.is_none() {
            // Reload on the very next operation.
            *stale = Some(Instant::now() - REFRESH_EVERY);
        }
    }

    fn refresh(&self) -> Result<Arc<Topology>> {
        let mut candidates: Vec<String> = Vec::new();
        if let Some(t) = &*self.topology.read().unwrap_or_else(PoisonError::into_inner) {
            candidates.extend(t.nodes.iter().map(|n| n.node_addr()));
        }
        for s in &self.seeds {
            if !candidates.contains(s) {
                candidates.push(s.clone());
            }
        }
        let mut last = None;
        for addr in candidates {
            let node = self.client(&addr)?;
            match node.run("CLUSTER SLOTS", |con| {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query::<redis::Value>(con)
            }) {
                Ok(v) => match self.parse_slots(&v) {
                    Ok(t) => {
                        let t = Arc::new(t);
                        let mut current = self
                            .topology
                            .write()
                            .unwrap_or_else(PoisonError::into_inner);
                        let changed = current.as_ref().is_none_or(|c| c.slots != t.slots);
                        if changed {
                            self.epoch.fetch_add(1, Ordering::SeqCst);
                        }
                        *current = Some(t.clone());
                        *self.stale.lock().unwrap_or_else(PoisonError::into_inner) = None;
                        return Ok(t);
                    }
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::new(
                ErrorKind::Unavailable,
                format!("{}: no node answers", self.redacted),
            )
        }))
    }

    fn parse_slots(&self, v: &redis::Value) -> Result<Topology> {
        let bad = || {
            Error::new(
                ErrorKind::Backend,
                format!("{}: unexpected CLUSTER SLOTS answer", self.redacted),
            )
        };
        let redis::Value::Array(ranges) = v else {
            return Err(bad());
        };
        let mut slots = vec![usize::MAX; SLOTS];
        let mut nodes: Vec<Arc<Redis>> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for r in ranges {
            let redis::Value::Array(parts) = r else {
                return Err(bad());
            };
            let (
                Some(redis::Value::Int(start)),
                Some(redis::Value::Int(end)),
                Some(redis::Value::Array(master)),
            ) = (parts.first(), parts.get(1), parts.get(2))
            else {
                return Err(bad());
            };
            let host = match master.first() {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(redis::Value::SimpleString(s)) => s.clone(),
                _ => return Err(bad()),
            };
            let Some(redis::Value::Int(port)) = master.get(1) else {
                return Err(bad());
            };
            let port = u16::try_from(*port).map_err(|_| bad())?;
            // An empty host means "the address you reached me on".
            let host = if host.is_empty() {
                self.template.host_str().unwrap_or("127.0.0.1").to_string()
            } else {
                host
            };
            let addr = join_host_port(&host, port);
            let i = match index.get(&addr) {
                Some(&i) => i,
                None => {
                    nodes.push(self.client(&addr)?);
                    index.insert(addr, nodes.len() - 1);
                    nodes.len() - 1
                }
            };
            let (start, end) = (
                usize::try_from(*start).map_err(|_| bad())?,
                usize::try_from(*end).map_err(|_| bad())?,
            );
            if start > end || end >= SLOTS {
                return Err(bad());
            }
            slots[start..=end].fill(i);
        }
        Ok(Topology { slots, nodes })
    }

    fn key(&self, k: Key<'_>) -> String {
        keys::encode(&self.prefix, k)
    }

    fn node_for(&self, t: &Topology, key: &str) -> Result<usize> {
        match t.slots[slot(key)] {
            usize::MAX => {
                self.mark_stale();
                Err(Error::new(
                    ErrorKind::Unavailable,
                    format!("{}: slot {} is not served", self.redacted, slot(key)),
                ))
            }
            i => Ok(i),
        }
    }

    /// Runs `f` on each node with the keys it owns (and their indices in
    /// `keys`); results in key order.
    fn per_node_impl<T: Clone + Default>(
        &self,
        keys: &[Key<'_>],
        f: impl Fn(&Redis, &[Key<'_>], &[usize]) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let t = self.topology()?;
        let route: Vec<usize> = keys
            .iter()
            .map(|k| self.node_for(&t, &self.key(*k)))
            .collect::<Result<_>>()?;
        by_shard(&route, t.nodes.len(), |i, idx| {
            f(&t.nodes[i], &pick(keys, idx), idx).inspect_err(|_| self.mark_stale())
        })
    }

    /// One parallel round of `GET`s; `None` if a node moved a slot (retry).
    fn fetch_once(&self, all: &[String]) -> Result<Option<Vec<Found>>> {
        let t = self.topology()?;
        let route: Vec<usize> = all
            .iter()
            .map(|k| self.node_for(&t, k))
            .collect::<Result<_>>()?;
        let mut sent: Vec<(usize, Conn, Vec<usize>)> = Vec::new();
        let mut failure = None;
        for (i, node) in t.nodes.iter().enumerate() {
            let idx: Vec<usize> = (0..all.len()).filter(|&j| route[j] == i).collect();
            if idx.is_empty() {
                continue;
            }
            let mut pipe = redis::pipe();
            for &j in &idx {
                pipe.cmd("GET").arg(&all[j]);
            }
            let conn = match node.pool.take() {
                Some(c) => Ok(c),
                None => node.connect(),
            };
            match conn.and_then(|mut c| {
                c.con
                    .send_packed_command(&pipe.get_packed_pipeline())
                    .map_err(|e| node.error("GET", e))?;
                Ok(c)
            }) {
                Ok(c) => sent.push((i, c, idx)),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut out: Vec<Found> = vec![None; all.len()];
        let mut moved = false;
        for (i, mut conn, idx) in sent {
            if failure.is_some() {
                continue; // unread answers: the connection is dropped
            }
            let node = &t.nodes[i];
            let mut ok = true;
            for &j in &idx {
                match conn.con.recv_response() {
                    Ok(redis::Value::Nil) => {}
                    Ok(redis::Value::BulkString(b)) => out[j] = Some((b, conn.instance.clone())),
                    Ok(redis::Value::ServerError(e))
                        if matches!(e.code(), "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN") =>
                    {
                        moved |= e.code() != "CLUSTERDOWN";
                        if e.code() == "CLUSTERDOWN" {
                            failure = Some(Error::new(
                                ErrorKind::Unavailable,
                                format!("{}: the cluster is down", self.redacted),
                            ));
                        }
                    }
                    Ok(other) => {
                        failure = Some(Error::new(
                            ErrorKind::Backend,
                            format!("{}: unexpected answer {other:?}", self.redacted),
                        ));
                        ok = false;
                        break;
                    }
                    Err(e) => {
                        failure = Some(node.error("GET", e));
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                node.pool.put(conn);
            }
        }
        if let Some(e) = failure {
            self.mark_stale();
            return Err(e);
        }
        if moved {
            self.mark_stale();
            return Ok(None);
        }
        Ok(Some(out))
    }
}

impl Sharded for RedisCluster {
    type Shard = Redis;

    fn per_shard<T: Clone + Default>(
        &self,
        keys: &[Key<'_>],
        f: impl Fn(&Redis, &[Key<'_>], &[usize]) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        self.per_node_impl(keys, f)
    }

    fn guard(&self) -> Arc<str> {
        Arc::from(format!(
            "cluster-epoch:{}",
            self.epoch.load(Ordering::SeqCst)
        ))
    }
}

impl Backend for RedisCluster {
    fn fetch(&self, tokens: &[&str], entries: &[Key<'_>]) -> Result<Fetched> {
        let all: Vec<String> = crate::backend::fetch_keys(&self.prefix, tokens, entries);
        let mut values = None;
        for _ in 0..3 {
            if let Some(v) = self.fetch_once(&all)? {
                values = Some(v);
                break;
            }
        }
        let values = values.ok_or_else(|| {
            Error::new(
                ErrorKind::Unavailable,
                format!("{}: slots kept moving", self.redacted),
            )
        })?;
        // Taken after the slot map the values came through was loaded.
        let guard = self.guard();
        Ok(assemble(values, tokens.len(), Some(guard)))
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

    fn lease(&self, key: Key<'_>, ttl: Duration) -> Result<bool> {
        self.sharded_lease(key, ttl)
    }

    fn ping(&self) -> Result<()> {
        let t = self.topology()?;
        for node in &t.nodes {
            node.ping().inspect_err(|_| self.mark_stale())?;
        }
        Ok(())
    }

    fn server_stats(&self) -> Result<Vec<(String, String)>> {
        let t = self.topology()?;
        let mut out = vec![("nodes".to_string(), t.nodes.len().to_string())];
        for (i, node) in t.nodes.iter().enumerate() {
            out.push((format!("node{i}"), node.node_addr()));
            match node.server_stats() {
                Ok(stats) => {
                    out.extend(stats.into_iter().map(|(k, v)| (format!("node{i}.{k}"), v)))
                }
                Err(e) => out.push((format!("node{i}.error"), e.to_string())),
            }
        }
        Ok(out)
    }

    fn name(&self) -> &'static str {
        "redis-cluster"
    }
}

#[cfg(test)]
mod tests {
    use super::{RedisCluster, join_host_port, slot, split_host_port};
    use crate::config::Config;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("bar"), 5061);
        assert_eq!(slot("ic:g:movies"), slot("ic:g:movies"));
    }

    #[test]
    fn addresses_round_trip() {
        for (host, port, addr) in [
            ("127.0.0.1", 7000, "127.0.0.1:7000"),
            ("redis-1.example", 6379, "redis-1.example:6379"),
            ("::1", 7000, "[::1]:7000"),
            ("[::1]", 7000, "[::1]:7000"),
            ("fe80::1:2", 1, "[fe80::1:2]:1"),
        ] {
            assert_eq!(join_host_port(host, port), addr);
            let bracketed = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            assert_eq!(split_host_port(addr), Some((&*bracketed, port)), "{addr}");
        }
        assert_eq!(split_host_port("[::1]"), Some(("[::1]", 6379)));
        assert_eq!(split_host_port("cache"), Some(("cache", 6379)));
        for bad in [
            "::1:7000",
            "[::1",
            "[::1]7000",
            "[::1]:",
            "h:",
            "h:99999",
            ":7000",
            "",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad:?}");
        }
    }

    /// IPv6 seeds keep their brackets through the node's client: the address
    /// redis-rs reports for it is the one it was made from.
    #[test]
    fn ipv6_nodes_keep_their_address() {
        let config =
            Config::parse("redis+cluster://[::1]:7000,[::1]:7001,127.0.0.1:7002").expect("parses");
        let cluster = RedisCluster::new(&config).expect("no connection yet");
        assert_eq!(
            cluster.seeds,
            ["[::1]:7000", "[::1]:7001", "127.0.0.1:7002"]
        );
        for seed in &cluster.seeds {
            let node = cluster.client(seed).expect("a client, not connected");
            assert_eq!(&node.node_addr(), seed);
            assert!(std::sync::Arc::ptr_eq(
                &node,
                &cluster.client(&node.node_addr()).expect("same")
            ));
        }
        // CLUSTER SLOTS names IPv6 nodes without brackets.
        let answer = redis::Value::Array(vec![redis::Value::Array(vec![
            redis::Value::Int(0),
            redis::Value::Int(16383),
            redis::Value::Array(vec![
                redis::Value::BulkString(b"::1".to_vec()),
                redis::Value::Int(7001),
            ]),
        ])]);
        let topology = cluster.parse_slots(&answer).expect("parses");
        assert_eq!(topology.nodes.len(), 1);
        assert_eq!(topology.nodes[0].node_addr(), "[::1]:7001");
    }
}
