//! The servers of one run, the proxies in front of them, and the faults
//! injected on them. Every server and proxy listens on 127.0.0.1 only (the
//! support crate picks free loopback ports); admin commands go straight to
//! the servers, never through the proxies.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use icache_test_support::{Fault as ProxyFault, MemcachedServer, Proxy, RedisCluster, RedisServer};

use crate::faults::{Backend, Fault, Injector};
use crate::rng::Rng;

/// The `?prefix=` of every client: the admin side finds our keys by it.
pub(crate) const PREFIX: &str = "chaos";

/// Small memory limits, so that the filler makes the servers evict by
/// themselves. The memory backend gets `max_bytes=65536` (see `url`).
const REDIS_ARGS: [&str; 4] = ["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"];
const MEMCACHED_ARGS: [&str; 2] = ["-m", "4"];
/// One filler value; a burst writes `FILLER_VALUES` of them.
const FILLER_BYTES: usize = 64 * 1024;
const FILLER_VALUES: usize = 96;

/// What runs for one backend.
pub(crate) enum Topology {
    Memory,
    Redis {
        server: RedisServer,
        proxy: Proxy,
        /// The server's directory, where SAVE writes `dump.rdb` and a
        /// restart loads it from.
        dir: PathBuf,
    },
    Memcached {
        server: MemcachedServer,
        proxy: Proxy,
    },
    Cluster {
        cluster: RedisCluster,
    },
    Pool {
        servers: Vec<MemcachedServer>,
        proxies: Vec<Proxy>,
    },
}

fn missing(what: &str) -> String {
    format!("{what} is not installed (not on PATH): run scripts/test.sh to install it")
}

impl Topology {
    /// Starts the servers (and proxies) for `backend`.
    pub(crate) fn start(backend: Backend) -> Result<Topology, String> {
        Ok(match backend {
            Backend::Memory => Topology::Memory,
            Backend::Redis => {
                let server =
                    RedisServer::start_with(&REDIS_ARGS).ok_or_else(|| missing("redis-server"))?;
                let proxy = Proxy::start(server.port());
                let reply: Vec<String> =
                    redis_query(server.port(), redis::cmd("CONFIG").arg("GET").arg("dir"))?;
                let dir = reply
                    .get(1)
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("CONFIG GET dir answered {reply:?}"))?;
                Topology::Redis { server, proxy, dir }
            }
            Backend::Memcached => {
                let server = MemcachedServer::start_with(&MEMCACHED_ARGS)
                    .ok_or_else(|| missing("memcached"))?;
                let proxy = Proxy::start(server.port());
                Topology::Memcached { server, proxy }
            }
            Backend::RedisCluster => Topology::Cluster {
                cluster: RedisCluster::start(3)
                    .ok_or_else(|| missing("redis-server or redis-cli"))?,
            },
            Backend::MemcachedPool => {
                let mut servers = Vec::new();
                for _ in 0..3 {
                    servers.push(
                        MemcachedServer::start_with(&MEMCACHED_ARGS)
                            .ok_or_else(|| missing("memcached"))?,
                    );
                }
                let proxies = servers.iter().map(|s| Proxy::start(s.port())).collect();
                Topology::Pool { servers, proxies }
            }
        })
    }

    /// The URL the clients use (through the proxies where there are some).
    pub(crate) fn url(&self, timeout_ms: u64) -> String {
        // Leases on (the default `fill=lease`) with a `lease_ms` well under
        // the call limit: a wait for another process's render is bounded by
        // it, and the checker's limit then proves that bound.
        let opts = format!(
            "prefix={PREFIX}&timeout_ms={timeout_ms}&connect_timeout_ms={timeout_ms}&lease_ms=1000"
        );
        match self {
            Topology::Memory => format!("memory://?max_bytes=65536&prefix={PREFIX}"),
            Topology::Redis { proxy, .. } => format!("{}?{opts}", proxy.redis_url()),
            Topology::Memcached { proxy, .. } => format!("{}?{opts}", proxy.memcached_url()),
            Topology::Cluster { cluster } => format!("{}?{opts}", cluster.url()),
            Topology::Pool { proxies, .. } => {
                let hosts: Vec<String> = proxies
                    .iter()
                    .map(|p| format!("127.0.0.1:{}", p.port()))
                    .collect();
                format!("memcached://{}?{opts}", hosts.join(","))
            }
        }
    }

    /// Server-side counters worth reporting (`server.evictions` since the
    /// servers' last restart). Best effort: a failure reports nothing.
    pub(crate) fn server_evictions(&self) -> u64 {
        let redis = |port| {
            redis_query::<String>(port, redis::cmd("INFO").arg("stats"))
                .ok()
                .and_then(|info| info_field(&info, "evicted_keys"))
                .unwrap_or(0)
        };
        let memcached = |port| {
            mc_request(port, b"stats\r\n", |l| l == "END")
                .ok()
                .and_then(|lines| {
                    lines.iter().find_map(|l| {
                        l.strip_prefix("STAT evictions ")
                            .and_then(|v| v.trim().parse().ok())
                    })
                })
                .unwrap_or(0)
        };
        match self {
            Topology::Memory => 0,
            Topology::Redis { server, .. } => redis(server.port()),
            Topology::Memcached { server, .. } => memcached(server.port()),
            Topology::Cluster { cluster } => cluster.ports().into_iter().map(redis).sum(),
            Topology::Pool { servers, .. } => servers.iter().map(|s| memcached(s.port())).sum(),
        }
    }

    fn proxies(&self) -> Vec<&Proxy> {
        match self {
            Topology::Redis { proxy, .. } | Topology::Memcached { proxy, .. } => vec![proxy],
            Topology::Pool { proxies, .. } => proxies.iter().collect(),
            Topology::Memory | Topology::Cluster { .. } => Vec::new(),
        }
    }

    /// Ports of the servers admin commands go to (no proxies).
    fn redis_ports(&self) -> Vec<u16> {
        match self {
            Topology::Redis { server, .. } => vec![server.port()],
            Topology::Cluster { cluster } => cluster.ports(),
            _ => Vec::new(),
        }
    }

    fn memcached_ports(&self) -> Vec<u16> {
        match self {
            Topology::Memcached { server, .. } => vec![server.port()],
            Topology::Pool { servers, .. } => servers.iter().map(MemcachedServer::port).collect(),
            _ => Vec::new(),
        }
    }
}

impl Injector for Topology {
    fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Result<String, String> {
        match fault {
            Fault::Refuse | Fault::Hang | Fault::Freeze | Fault::NodeLeave => {
                let proxies = self.proxies();
                if proxies.is_empty() {
                    return Err(format!("no proxy to inject {} on", fault.name()));
                }
                let which = rng.below(proxies.len());
                let (proxy_fault, hold) = match fault {
                    Fault::Refuse => (ProxyFault::Refuse, rng.millis(200, 2000)),
                    Fault::Hang => (ProxyFault::Hang, rng.millis(200, 2000)),
                    Fault::Freeze => (ProxyFault::Freeze, rng.millis(200, 2000)),
                    _ => (ProxyFault::Refuse, rng.millis(1000, 4000)),
                };
                let proxy = proxies[which];
                proxy.set_fault(proxy_fault);
                thread::sleep(hold);
                proxy.set_fault(ProxyFault::Pass);
                Ok(format!(
                    "{proxy_fault:?} on the path to server {which} for {} ms",
                    hold.as_millis()
                ))
            }
            Fault::KillRestart => {
                let down = rng.millis(0, 1500);
                match self {
                    Topology::Redis { server, dir, .. } => {
                        // No dump.rdb, or the restart would load it.
                        remove_dump(dir)?;
                        server.stop();
                        thread::sleep(down);
                        server.restart();
                        Ok(format!(
                            "redis killed, restarted empty after {} ms",
                            down.as_millis()
                        ))
                    }
                    Topology::Memcached { server, .. } => {
                        server.stop();
                        thread::sleep(down);
                        server.restart();
                        Ok(format!(
                            "memcached killed, restarted empty after {} ms",
                            down.as_millis()
                        ))
                    }
                    Topology::Cluster { cluster } => {
                        let i = rng.below(cluster.ports().len());
                        cluster.stop_node(i);
                        thread::sleep(down);
                        // Waits until the cluster is healthy again.
                        cluster.restart_node(i);
                        Ok(format!(
                            "cluster node {i} killed, restarted empty after {} ms",
                            down.as_millis()
                        ))
                    }
                    Topology::Pool { servers, .. } => {
                        let i = rng.below(servers.len());
                        servers[i].stop();
                        thread::sleep(down);
                        servers[i].restart();
                        Ok(format!(
                            "pool server {i} killed, restarted empty after {} ms",
                            down.as_millis()
                        ))
                    }
                    Topology::Memory => Err(String::from("nothing to kill in memory")),
                }
            }
            Fault::SnapshotRestart => {
                let Topology::Redis { server, dir, .. } = self else {
                    return Err(String::from("snapshots are for single Redis only"));
                };
                let port = server.port();
                redis_query::<()>(port, &redis::cmd("SAVE"))?;
                let saved: u64 = redis_query(port, &redis::cmd("DBSIZE"))?;
                // Data and bumps move on past the snapshot...
                let later = rng.millis(300, 2500);
                thread::sleep(later);
                let before: u64 = redis_query(port, &redis::cmd("DBSIZE"))?;
                // ...then a crash, and the restart loads the older dump.rdb.
                server.stop();
                server.restart();
                let loaded: u64 = redis_query(port, &redis::cmd("DBSIZE"))?;
                remove_dump(dir)?;
                Ok(format!(
                    "SAVE ({saved} keys), {} ms later kill -9 ({before} keys), restart loaded {loaded} keys",
                    later.as_millis()
                ))
            }
            Fault::ClientPause => {
                let ports = self.redis_ports();
                if ports.is_empty() {
                    return Err(String::from("CLIENT PAUSE needs Redis"));
                }
                let i = rng.below(ports.len());
                let pause = rng.millis(200, 1500);
                redis_query::<()>(
                    ports[i],
                    redis::cmd("CLIENT")
                        .arg("PAUSE")
                        .arg(pause.as_millis() as u64),
                )?;
                thread::sleep(pause);
                Ok(format!(
                    "CLIENT PAUSE {} ms on server {i}",
                    pause.as_millis()
                ))
            }
            Fault::Evict => {
                let mut deleted = 0;
                let mut seen = 0;
                for port in self.redis_ports() {
                    let (s, d) = redis_evict(port, rng)?;
                    seen += s;
                    deleted += d;
                }
                for port in self.memcached_ports() {
                    let (s, d) = memcached_evict(port, rng)?;
                    seen += s;
                    deleted += d;
                }
                Ok(format!("deleted {deleted} of our {seen} keys"))
            }
            Fault::Flush => {
                let redis_ports = self.redis_ports();
                let mc_ports = self.memcached_ports();
                for &port in &redis_ports {
                    redis_query::<()>(port, &redis::cmd("FLUSHALL"))?;
                }
                for &port in &mc_ports {
                    let lines =
                        mc_request(port, b"flush_all\r\n", |l| l == "OK" || is_mc_error(l))?;
                    if lines.last().is_none_or(|l| l != "OK") {
                        return Err(format!("flush_all answered {lines:?}"));
                    }
                }
                Ok(format!(
                    "{} on {} server(s)",
                    if redis_ports.is_empty() {
                        "flush_all"
                    } else {
                        "FLUSHALL"
                    },
                    redis_ports.len() + mc_ports.len()
                ))
            }
            Fault::KillWriter | Fault::KillRelay => Err(format!(
                "{} is a fault of --writers db, injected by its processes' owner",
                fault.name()
            )),
            Fault::Filler => {
                let value = vec![b'f'; FILLER_BYTES];
                let base = rng.next_u64();
                let redis_ports = self.redis_ports();
                let mc_ports = self.memcached_ports();
                if let Some(&port) = redis_ports.first() {
                    let mut pipe = redis::pipe();
                    for n in 0..FILLER_VALUES {
                        pipe.cmd("SET")
                            .arg(format!("filler:{base}:{n}"))
                            .arg(&value)
                            .ignore();
                    }
                    redis_query::<()>(port, &pipe)?;
                    Ok(format!(
                        "{} KiB of filler on redis",
                        FILLER_BYTES * FILLER_VALUES / 1024
                    ))
                } else if !mc_ports.is_empty() {
                    let which = rng.below(mc_ports.len());
                    let mut request = Vec::with_capacity(FILLER_VALUES * (FILLER_BYTES + 64));
                    for n in 0..FILLER_VALUES {
                        request.extend_from_slice(
                            format!("set filler:{base}:{n} 0 0 {FILLER_BYTES} noreply\r\n")
                                .as_bytes(),
                        );
                        request.extend_from_slice(&value);
                        request.extend_from_slice(b"\r\n");
                    }
                    request.extend_from_slice(b"version\r\n");
                    mc_request(mc_ports[which], &request, |l| l.starts_with("VERSION"))?;
                    Ok(format!(
                        "{} KiB of filler on memcached server {which}",
                        FILLER_BYTES * FILLER_VALUES / 1024
                    ))
                } else {
                    Err(String::from("no server to fill"))
                }
            }
        }
    }

    fn heal(&mut self) {
        for proxy in self.proxies() {
            proxy.set_fault(ProxyFault::Pass);
        }
    }
}

fn remove_dump(dir: &std::path::Path) -> Result<(), String> {
    match std::fs::remove_file(dir.join("dump.rdb")) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}/dump.rdb: {e}", dir.display())),
    }
}

fn info_field(info: &str, field: &str) -> Option<u64> {
    info.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix(field)?
            .strip_prefix(':')?
            .parse()
            .ok()
    })
}

// ---- Redis admin ---------------------------------------------------------

/// Runs one command (or pipeline) on a fresh direct connection to `port`:
/// the server may have restarted since the last one.
fn redis_query<T: redis::FromRedisValue>(port: u16, cmd: &impl Query) -> Result<T, String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .map_err(|e| format!("redis admin on {port}: {e}"))?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .map_err(|e| format!("redis admin connect to {port}: {e}"))?;
    // Generous: FLUSHALL or SAVE of a few MB, a SCAN.
    let limit = Some(Duration::from_secs(10));
    con.set_read_timeout(limit)
        .and_then(|()| con.set_write_timeout(limit))
        .map_err(|e| format!("redis admin on {port}: {e}"))?;
    cmd.run(&mut con)
        .map_err(|e| format!("redis admin on {port}: {e}"))
}

/// Deletes about a quarter of our keys on one Redis server (half of the
/// generations): what an eviction or a lost key does.
fn redis_evict(port: u16, rng: &mut Rng) -> Result<(usize, usize), String> {
    let mut keys = Vec::new();
    let mut cursor = String::from("0");
    loop {
        let (next, batch): (String, Vec<String>) = redis_query(
            port,
            redis::cmd("SCAN")
                .arg(&cursor)
                .arg("MATCH")
                .arg(format!("{PREFIX}:*"))
                .arg("COUNT")
                .arg(1000),
        )?;
        keys.extend(batch);
        if next == "0" || keys.len() > 100_000 {
            break;
        }
        cursor = next;
    }
    let victims = choose_victims(&keys, rng);
    if !victims.is_empty() {
        // One DEL per key: on a cluster node keys of different slots cannot
        // share a command.
        let mut pipe = redis::pipe();
        for key in &victims {
            pipe.cmd("DEL").arg(key).ignore();
        }
        redis_query::<()>(port, &pipe)?;
    }
    Ok((keys.len(), victims.len()))
}

fn choose_victims(keys: &[String], rng: &mut Rng) -> Vec<String> {
    keys.iter()
        .filter(|k| {
            let generation = k.contains(":ic:g:") || k.contains(":ic:G:");
            rng.chance(if generation { 500 } else { 250 })
        })
        .cloned()
        .collect()
}

/// A command or a pipeline, for [`redis_query`].
trait Query {
    fn run<T: redis::FromRedisValue>(&self, con: &mut redis::Connection) -> redis::RedisResult<T>;
}

impl Query for redis::Cmd {
    fn run<T: redis::FromRedisValue>(&self, con: &mut redis::Connection) -> redis::RedisResult<T> {
        self.query(con)
    }
}

impl Query for redis::Pipeline {
    fn run<T: redis::FromRedisValue>(&self, con: &mut redis::Connection) -> redis::RedisResult<T> {
        self.query(con)
    }
}

// ---- memcached admin -----------------------------------------------------

fn is_mc_error(line: &str) -> bool {
    line == "ERROR" || line.starts_with("CLIENT_ERROR") || line.starts_with("SERVER_ERROR")
}

/// Sends `request` on a fresh connection to `port` and reads lines until
/// `done` says so (or an error line).
fn mc_request(
    port: u16,
    request: &[u8],
    done: impl Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("memcached admin connect to {port}: {e}"))?;
    let limit = Some(Duration::from_secs(10));
    stream
        .set_read_timeout(limit)
        .and_then(|()| stream.set_write_timeout(limit))
        .map_err(|e| format!("memcached admin on {port}: {e}"))?;
    stream
        .write_all(request)
        .map_err(|e| format!("memcached admin write to {port}: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("memcached admin read from {port}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "memcached on {port} closed the connection after {lines:?}"
            ));
        }
        let line = line.trim_end().to_owned();
        let finished = done(&line) || is_mc_error(&line);
        lines.push(line);
        if finished {
            return Ok(lines);
        }
    }
}

/// Decodes the %XX escapes of `lru_crawler metadump` keys.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Deletes about a quarter of our keys on one memcached (half of the
/// generations), found with `lru_crawler metadump all`.
fn memcached_evict(port: u16, rng: &mut Rng) -> Result<(usize, usize), String> {
    let lines = mc_request(port, b"lru_crawler metadump all\r\n", |l| l == "END")?;
    if lines.last().is_some_and(|l| is_mc_error(l)) {
        return Err(format!("lru_crawler metadump answered {lines:?}"));
    }
    let ours = format!("{PREFIX}:");
    let keys: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("key=")?.split_whitespace().next())
        .map(percent_decode)
        .filter(|k| k.starts_with(&ours))
        .collect();
    let victims = choose_victims(&keys, rng);
    if !victims.is_empty() {
        let mut request = Vec::new();
        for key in &victims {
            request.extend_from_slice(format!("delete {key} noreply\r\n").as_bytes());
        }
        request.extend_from_slice(b"version\r\n");
        mc_request(port, &request, |l| l.starts_with("VERSION"))?;
    }
    Ok((keys.len(), victims.len()))
}
