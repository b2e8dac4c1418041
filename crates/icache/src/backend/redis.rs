//! Redis, single node (`redis://`, `rediss://`), through redis-rs's blocking
//! client and our small pool.
//!
//! Why blocking: template rendering is synchronous and is the hot path; a
//! blocking connection used from the rendering thread costs one loopback round
//! trip, with no hop to another thread. The async API runs this same code on
//! tokio's blocking pool.
//!
//! Generations are decimal integers (so `INCR` works on them). A bump is
//! `MULTI; SET k <fresh> NX; INCR k; EXEC` per token, all tokens in one
//! pipeline: atomic per token (no eviction can slip between the two
//! commands, so a counter never restarts at 1), one round trip in all.

use std::sync::Arc;
use std::time::Duration;

use super::{Backend, Fetched, parse_gen};
use crate::codec::{self, Entry};
use crate::config::{Config, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{self, Key};
use crate::pool::Pool;

pub(crate) mod cluster;
pub(crate) mod sentinel;
pub(crate) mod tracking;

/// A connection and the server instance it talks to.
struct Conn {
    con: redis::Connection,
    /// The server's life: its `run_id`, or `-` where `INFO` gives none.
    server: Arc<str>,
    /// The instance last seen on this connection: `server/marker` on a
    /// single node (see [`Marker`]), the server alone on a cluster node.
    instance: Arc<str>,
}

/// The instance marker of one database and prefix on a single node.
///
/// `run_id` changes with the server's life, but not when the data under it
/// is replaced while it runs (`SWAPDB`, `FLUSHALL`/`FLUSHDB`), and a
/// Redis-compatible server may have no `run_id` at all. So each database
/// (per prefix) holds a marker: a random value set once with `SET NX`, read
/// in the same `MGET` as the generations. Replacing the data replaces or
/// removes the marker, which turns every entry stored under the old one into
/// a miss (entries carry the instance they were stored on).
///
/// Where `INFO` has no `run_id`, the server's life is found another way:
/// a script whose text names this marker is loaded once per server life
/// (`SCRIPT LOAD`; scripts are not persisted), after the marker is renewed.
/// A connection that finds no such script loaded is the first of this life
/// (or the script cache was flushed): it renews the marker, so a server
/// restarted from an old snapshot never serves that snapshot's entries.
#[derive(Debug, Clone)]
pub(crate) struct Marker {
    /// `[prefix:]ic:g:ic:instance`: under the generation tag (so
    /// `near=tracking`'s prefixes cover it), a name no token has.
    pub(crate) key: String,
    /// The life script's text and SHA-1.
    script: String,
    sha: String,
}

impl Marker {
    fn new(prefix: &str, db: i64) -> Marker {
        let key = keys::instance_marker(prefix);
        let script = format!("-- icache: this server life has renewed {key} in db {db}\nreturn 1");
        let sha = redis::Script::new(&script).get_hash().to_owned();
        Marker { key, script, sha }
    }

    /// The instance of a server life and a marker value.
    pub(crate) fn instance(server: &str, marker: &[u8]) -> Arc<str> {
        // Foreign bytes under the marker key still identify the data; only
        // a bounded form of them goes into entries.
        match std::str::from_utf8(marker) {
            Ok(m) if m.len() <= 64 && m.bytes().all(|b| b.is_ascii_graphic()) => {
                Arc::from(format!("{server}/{m}"))
            }
            _ => Arc::from(format!("{server}/~{}", keys::sha256_hex(marker))),
        }
    }
}

pub(crate) struct Redis {
    client: redis::Client,
    /// The URL and root certificates, for the `near=tracking` connection.
    url: String,
    root_cert: Option<Vec<u8>>,
    pool: Pool<Conn>,
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
    redacted: String,
    /// `None` on a cluster node (no `SWAPDB` there, one database, and the
    /// cluster's fetch reads no marker).
    marker: Option<Marker>,
    /// `redis+sentinel://`: connections go to the master it names.
    sentinel: Option<Arc<sentinel::Sentinel>>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.redacted)
            .finish()
    }
}

impl Redis {
    pub(crate) fn new(config: &Config) -> Result<Self> {
        if let Target::RedisSentinel(settings) = &config.target {
            let sentinel = Arc::new(sentinel::Sentinel::new(settings, config));
            let mut redis = Redis::open(
                &sentinel.placeholder_url(),
                None,
                config,
                config.redacted.clone(),
            )?;
            redis.marker = Some(Marker::new(&redis.prefix, i64::from(settings.db)));
            redis.sentinel = Some(sentinel);
            return Ok(redis);
        }
        let Target::Redis { url, ca_file } = &config.target else {
            return Err(Error::config("not a redis:// URL"));
        };
        let mut redis = Redis::open(url, ca_file.as_deref(), config, config.redacted.clone())?;
        let db = redis.client.get_connection_info().redis_settings().db();
        redis.marker = Some(Marker::new(&redis.prefix, db));
        Ok(redis)
    }

    /// A connection-pooled client of one server; `redacted` names it in
    /// messages.
    fn open(url: &str, ca_file: Option<&str>, config: &Config, redacted: String) -> Result<Self> {
        let bad = |e: redis::RedisError| {
            // redis-rs messages do not echo the URL, but be sure: ours only names
            // the redacted form.
            Error::config(format!(
                "{}: {}",
                redacted,
                e.detail().unwrap_or("invalid Redis URL")
            ))
        };
        if ca_file.is_some() || url.starts_with("rediss:") {
            ensure_crypto_provider();
        }
        let root_cert = match ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                Error::config(format!("ca_file={path:?} in {}: cannot read it", redacted))
                    .with_source(e)
            })?),
            None => None,
        };
        let client = client_of(url, root_cert.clone()).map_err(bad)?;
        Ok(Redis {
            client,
            url: url.to_owned(),
            root_cert,
            pool: Pool::new(config.pool_size).named(redacted.clone()),
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            redacted,
            marker: None,
            sentinel: None,
        })
    }

    /// What the `near=tracking` thread needs: a RESP3 client of this server.
    pub(crate) fn tracking_setup(&self) -> Result<tracking::Setup> {
        let mut url = url::Url::parse(&self.url)
            .map_err(|_| Error::config(format!("{}: invalid Redis URL", self.redacted)))?;
        let query: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "protocol")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        url.query_pairs_mut()
            .clear()
            .extend_pairs(query)
            .append_pair("protocol", "resp3");
        let client = client_of(url.as_str(), self.root_cert.clone()).map_err(|e| {
            Error::config(format!(
                "{}: {}",
                self.redacted,
                e.detail().unwrap_or("invalid Redis URL")
            ))
        })?;
        Ok(tracking::Setup {
            client,
            marker: self.marker.clone(),
            timeout: self.timeout,
            connect_timeout: self.connect_timeout,
            redacted: self.redacted.clone(),
            sentinel: self.sentinel.clone(),
        })
    }

    fn connect(&self) -> Result<Conn> {
        let mut con = match &self.sentinel {
            Some(sentinel) => sentinel.connect(false)?,
            None => {
                let con = self
                    .client
                    .get_connection_with_timeout(self.connect_timeout)
                    .map_err(|e| self.error("connect", e))?;
                con.set_read_timeout(Some(self.timeout))
                    .and_then(|()| con.set_write_timeout(Some(self.timeout)))
                    .map_err(|e| self.error("connect", e))?;
                con
            }
        };
        // Which server life is this? Asked once per connection: a restart
        // drops every connection.
        let server = server_life(&mut con).map_err(|e| self.error("INFO server", e))?;
        let mut conn = Conn {
            con,
            instance: server.clone(),
            server,
        };
        if let Some(marker) = &self.marker {
            conn.instance = first_instance(&mut conn.con, marker, &conn.server)
                .map_err(|e| self.error("SET NX", e))?;
        }
        Ok(conn)
    }

    fn run<T>(
        &self,
        op: &str,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        self.run_on(op, |c| f(&mut c.con))
    }

    fn run_on<T>(&self, op: &str, f: impl Fn(&mut Conn) -> redis::RedisResult<T>) -> Result<T> {
        self.pool.with(
            || self.connect(),
            |con| f(con).map_err(|e| self.error(op, e)),
        )
    }

    fn error(&self, op: &str, e: redis::RedisError) -> Error {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else if e.is_io_error()
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            // A write that reached a master demoted by a failover: this
            // connection is done; a new one finds the new master.
            || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        {
            ErrorKind::Unavailable
        } else {
            ErrorKind::Backend
        };
        let what = match kind {
            ErrorKind::Timeout => format!("no answer within {:?}", self.timeout),
            // Something answered, but not in RESP: an HTTP port, a
            // memcached, a TLS server reached without `rediss://`…
            _ if e.kind() == redis::ErrorKind::Parse => format!(
                "the server at {} did not answer like Redis (is it a Redis server, \
                 and is the scheme right: redis:// or rediss://?) ({e})",
                self.node_addr()
            ),
            _ => e.to_string(),
        };
        Error::new(kind, format!("redis {op} on {}: {what}", self.redacted))
    }

    fn key(&self, k: Key<'_>) -> String {
        keys::encode(&self.prefix, k)
    }

    /// "host:port" of this server.
    fn node_addr(&self) -> String {
        if let Some(sentinel) = &self.sentinel {
            return sentinel.last_master();
        }
        let info = self.client.get_connection_info();
        match info.addr() {
            redis::ConnectionAddr::Tcp(h, p)
            | redis::ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => cluster::join_host_port(h, *p),
            other => other.to_string(),
        }
    }

    /// Overwrites foreign bytes under a generation key with a fresh value.
    fn replace_foreign(&self, key: &str, fresh: u64) -> Result<u64> {
        self.run("set", |con| {
            redis::cmd("SET").arg(key).arg(fresh).query::<()>(con)
        })?;
        Ok(fresh)
    }
}

/// What stands for `run_id` where `INFO` has none.
pub(crate) const NO_RUN_ID: &str = "-";

/// The server's `run_id`, or [`NO_RUN_ID`] where `INFO` gives none (a
/// Redis-compatible server, or `INFO` renamed away).
pub(crate) fn server_life(con: &mut redis::Connection) -> redis::RedisResult<Arc<str>> {
    match redis::cmd("INFO").arg("server").query::<String>(con) {
        Ok(info) => Ok(Arc::from(
            info.lines()
                .find_map(|l| l.trim_end().strip_prefix("run_id:"))
                .filter(|id| !id.is_empty())
                .unwrap_or(NO_RUN_ID),
        )),
        // The server answered, with an error (unknown or forbidden command).
        Err(e) if is_refusal(&e) => Ok(Arc::from(NO_RUN_ID)),
        Err(e) => Err(e),
    }
}

/// An error answer from a live server (as opposed to a broken connection).
fn is_refusal(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
    )
}

/// The instance a new connection reaches: the marker, renewed first when
/// this is the first connection of a server life that has no `run_id`.
pub(crate) fn first_instance(
    con: &mut redis::Connection,
    marker: &Marker,
    server: &str,
) -> redis::RedisResult<Arc<str>> {
    if server == NO_RUN_ID && !life_marked(con, marker)? {
        renew_marker(con, marker, server)
    } else {
        ensure_marker(con, marker, server)
    }
}

/// Has this server life renewed `marker` (its script is loaded)? A server
/// that refuses `SCRIPT` cannot say: `true`, and the marker alone stands.
fn life_marked(con: &mut redis::Connection, marker: &Marker) -> redis::RedisResult<bool> {
    match redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(&marker.sha)
        .query::<Vec<bool>>(con)
    {
        Ok(v) => Ok(v.first().copied().unwrap_or(false)),
        Err(e) if is_refusal(&e) => Ok(true),
        Err(e) => Err(e),
    }
}

/// A fresh marker, then the life script loaded (in that order: a connection
/// that sees the script loaded sees the renewed marker).
fn renew_marker(
    con: &mut redis::Connection,
    marker: &Marker,
    server: &str,
) -> redis::RedisResult<Arc<str>> {
    let fresh = super::fresh_generation().to_string();
    redis::pipe()
        .cmd("SET")
        .arg(&marker.key)
        .arg(&fresh)
        .ignore()
        .query::<()>(con)?;
    // A server that refuses SCRIPT LOAD keeps the marker alone.
    let _ = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(&marker.script)
        .query::<String>(con);
    ensure_marker(con, marker, server)
}

/// The instance under `marker`, read first: a server that refuses writes
/// (full, under `noeviction`) still serves reads when the marker is there.
fn ensure_marker(
    con: &mut redis::Connection,
    marker: &Marker,
    server: &str,
) -> redis::RedisResult<Arc<str>> {
    let now: Option<Vec<u8>> = redis::cmd("GET").arg(&marker.key).query(con)?;
    match now {
        Some(m) => Ok(Marker::instance(server, &m)),
        None => set_marker(con, marker, server),
    }
}

/// The instance under `marker`, which was missing: set it unless another
/// client just did, then read it.
fn set_marker(
    con: &mut redis::Connection,
    marker: &Marker,
    server: &str,
) -> redis::RedisResult<Arc<str>> {
    let fresh = super::fresh_generation().to_string();
    let (value,): (Option<Vec<u8>>,) = redis::pipe()
        .cmd("SET")
        .arg(&marker.key)
        .arg(&fresh)
        .arg("NX")
        .ignore()
        .cmd("GET")
        .arg(&marker.key)
        .query(con)?;
    Ok(Marker::instance(
        server,
        value.as_deref().unwrap_or(fresh.as_bytes()),
    ))
}

/// A client of `url`, trusting `root_cert` (PEM) when given.
fn client_of(url: &str, root_cert: Option<Vec<u8>>) -> redis::RedisResult<redis::Client> {
    match root_cert {
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            },
        ),
        None => redis::Client::open(url),
    }
}

/// Makes sure rustls has a process-wide crypto provider before a TLS client
/// is built. redis-rs builds its rustls config with the process default, and
/// rustls picks one by itself only when exactly one provider is compiled in:
/// we enable `ring`, so an application that also enables `aws-lc-rs` (through
/// any other crate) has two, none chosen, and would panic on the first
/// `rediss://` connection. An application that installed a provider keeps it;
/// otherwise ring is installed, and losing a race to another installer is
/// fine (a provider is set either way).
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

impl Backend for Redis {
    fn fetch(&self, tokens: &[&str], entries: &[Key<'_>]) -> Result<Fetched> {
        if tokens.is_empty() && entries.is_empty() {
            return Ok(Fetched::default());
        }
        let mut all: Vec<String> = super::fetch_keys(&self.prefix, tokens, entries);
        let wanted = all.len();
        if let Some(marker) = &self.marker {
            // Read with the entries, atomically: they are served only if
            // they were stored under this very marker.
            all.push(marker.key.clone());
        }
        let (values, instance): (Vec<Option<Vec<u8>>>, Arc<str>) = self.run_on("MGET", |c| {
            let mut v: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&all).query(&mut c.con)?;
            if let Some(marker) = &self.marker
                && v.len() == all.len()
            {
                c.instance = match v.pop().flatten() {
                    Some(m) => Marker::instance(&c.server, &m),
                    // Flushed, or swapped for unmarked data: what this
                    // read found was stored under no marker we know.
                    None => set_marker(&mut c.con, marker, &c.server)?,
                };
            }
            Ok((v, c.instance.clone()))
        })?;
        if values.len() != wanted {
            return Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "redis MGET on {}: {} values for {} keys",
                    self.redacted,
                    values.len(),
                    wanted
                ),
            ));
        }
        Ok(super::assemble_from(values, tokens.len(), instance))
    }

    fn init_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        let keys: Vec<String> = gens.iter().map(|k| self.key(*k)).collect();
        let got: Vec<Option<Vec<u8>>> = self.run("SET NX", |con| {
            let mut pipe = redis::pipe();
            for (k, f) in keys.iter().zip(fresh) {
                pipe.cmd("SET").arg(k).arg(f).arg("NX").ignore();
                pipe.cmd("GET").arg(k);
            }
            pipe.query(con)
        })?;
        keys.iter()
            .zip(fresh)
            .zip(got)
            .map(|((k, &f), v)| match v.as_deref().and_then(parse_gen) {
                Some(g) => Ok(g),
                None => self.replace_foreign(k, f),
            })
            .collect()
    }

    fn incr_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        let keys: Vec<String> = gens.iter().map(|k| self.key(*k)).collect();
        let bump = |con: &mut redis::Connection, keys: &[String], fresh: &[u64]| {
            let mut pipe = redis::pipe();
            for (k, f) in keys.iter().zip(fresh) {
                pipe.cmd("MULTI").ignore();
                pipe.cmd("SET").arg(k).arg(f).arg("NX").ignore();
                pipe.cmd("INCR").arg(k).ignore();
                pipe.cmd("EXEC");
            }
            pipe.query::<Vec<(Option<String>, i64)>>(con)
        };
        // A result below 2 means the counter held foreign bytes ("0", "-5")
        // that INCR accepted: not a generation of ours, so replace it.
        let checked = |k: &String, f: u64, g: i64| match u64::try_from(g) {
            Ok(g) if g > 1 => Ok(g),
            _ => self.replace_foreign(k, f),
        };
        match self.run("INCR", |con| bump(con, &keys, fresh)) {
            Ok(v) => keys
                .iter()
                .zip(fresh)
                .zip(v)
                .map(|((k, &f), (_, g))| checked(k, f, g))
                .collect(),
            // A token holds foreign bytes, so INCR refused it: bump one by one,
            // replacing what is not a number by a fresh value (as fresh as a bump).
            Err(e) if e.is_backend() => keys
                .iter()
                .zip(fresh)
                .map(|(k, &f)| {
                    match self.run("INCR", |con| bump(con, std::slice::from_ref(k), &[f])) {
                        Ok(mut v) => match v.pop() {
                            Some((_, g)) => checked(k, f, g),
                            None => self.replace_foreign(k, f),
                        },
                        Err(e) if e.is_backend() => self.replace_foreign(k, f),
                        Err(e) => Err(e),
                    }
                })
                .collect(),
            Err(e) => Err(e),
        }
    }

    fn set(
        &self,
        key: Key<'_>,
        entry: Arc<Entry>,
        ttl: Option<Duration>,
        guard: Option<&str>,
    ) -> Result<bool> {
        let k = self.key(key);
        self.run_on("SET", |c| {
            if guard.is_some_and(|g| g != &*c.instance) {
                return Ok(false);
            }
            let stored_on = c.instance.clone();
            let bytes = codec::encode(&entry, Some(&stored_on));
            let mut cmd = redis::cmd("SET");
            cmd.arg(&k).arg(&bytes);
            if let Some(ttl) = ttl {
                cmd.arg("PX")
                    .arg(ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64);
            }
            let (Some(marker), Some(_)) = (&self.marker, entry.version) else {
                cmd.query::<()>(&mut c.con)?;
                return Ok(true);
            };
            // A versioned entry is served only under the marker it carries:
            // check in the same round trip that it is still the current one.
            let (now,): (Option<Vec<u8>>,) = redis::pipe()
                .add_command(cmd)
                .ignore()
                .cmd("GET")
                .arg(&marker.key)
                .query(&mut c.con)?;
            c.instance = match now {
                Some(m) => Marker::instance(&c.server, &m),
                None => set_marker(&mut c.con, marker, &c.server)?,
            };
            if c.instance == stored_on {
                return Ok(true);
            }
            // The data was replaced since this connection last looked: what
            // was just stored is a miss for everyone. A guarded store (a
            // block's version read before the change) stays so; a plain
            // `set_versioned` is stored again under the current marker.
            if guard.is_some() {
                return Ok(false);
            }
            let bytes = codec::encode(&entry, Some(&c.instance));
            let mut again = redis::cmd("SET");
            again.arg(&k).arg(&bytes);
            again.query::<()>(&mut c.con)?;
            Ok(true)
        })
    }

    fn delete(&self, key: Key<'_>) -> Result<bool> {
        let k = self.key(key);
        let n: u64 = self.run("DEL", |con| redis::cmd("DEL").arg(&k).query(con))?;
        Ok(n > 0)
    }

    fn lease(&self, key: Key<'_>, ttl: Duration) -> Result<bool> {
        let k = self.key(key);
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let got: Option<String> = self.run("SET NX PX", |con| {
            redis::cmd("SET")
                .arg(&k)
                .arg(crate::lease::value())
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query(con)
        })?;
        Ok(got.is_some())
    }

    fn ping(&self) -> Result<()> {
        self.run("PING", |con| redis::cmd("PING").query::<String>(con))
            .map(|_| ())
    }

    fn instance(&self) -> Result<Option<Arc<str>>> {
        let Some(marker) = &self.marker else {
            return self.run_on("PING", |c| {
                redis::cmd("PING").query::<String>(&mut c.con)?;
                Ok(Some(c.instance.clone()))
            });
        };
        self.run_on("GET", |c| {
            let now: Option<Vec<u8>> = redis::cmd("GET").arg(&marker.key).query(&mut c.con)?;
            c.instance = match now {
                Some(m) => Marker::instance(&c.server, &m),
                None => set_marker(&mut c.con, marker, &c.server)?,
            };
            Ok(Some(c.instance.clone()))
        })
    }

    fn single_instance(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    fn server_stats(&self) -> Result<Vec<(String, String)>> {
        let info: String = self.run("INFO", |con| redis::cmd("INFO").query(con))?;
        const WANTED: &[&str] = &[
            "redis_version",
            "uptime_in_seconds",
            "connected_clients",
            "used_memory",
            "maxmemory",
            "maxmemory_policy",
            "keyspace_hits",
            "keyspace_misses",
            "evicted_keys",
            "expired_keys",
            "total_commands_processed",
        ];
        Ok(info
            .lines()
            .filter_map(|l| l.trim_end().split_once(':'))
            .filter(|(k, _)| WANTED.contains(k) || k.starts_with("db"))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    /// With no provider installed beforehand, opening a `rediss://` cache
    /// installs one, and a failed connection is an error, not a panic.
    #[test]
    fn rediss_installs_a_crypto_provider_and_fails_cleanly() {
        // A port nobody listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let cache = crate::ICache::from_url(&format!(
            "rediss://127.0.0.1:{port}/?connect_timeout_ms=500"
        ))
        .expect("opens without connecting");
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        let err = cache.ping().expect_err("nothing listens there");
        assert!(err.is_unavailable() || err.is_timeout(), "{err}");
    }
}
