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

/// A connection and the server instance it talks to (`run_id`).
struct Conn {
    con: redis::Connection,
    instance: Arc<str>,
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
            redis.sentinel = Some(sentinel);
            return Ok(redis);
        }
        let Target::Redis { url, ca_file } = &config.target else {
            return Err(Error::config("not a redis:// URL"));
        };
        Redis::open(url, ca_file.as_deref(), config, config.redacted.clone())
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
        // Which server instance is this? Asked once per connection.
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query(&mut con)
            .map_err(|e| self.error("INFO server", e))?;
        let run_id = info
            .lines()
            .find_map(|l| l.trim_end().strip_prefix("run_id:"))
            .unwrap_or("unknown");
        Ok(Conn {
            con,
            instance: Arc::from(run_id),
        })
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
        let all: Vec<String> = super::fetch_keys(&self.prefix, tokens, entries);
        let (values, instance): (Vec<Option<Vec<u8>>>, Arc<str>) = self.run_on("MGET", |c| {
            let v = redis::cmd("MGET").arg(&all).query(&mut c.con)?;
            Ok((v, c.instance.clone()))
        })?;
        if values.len() != all.len() {
            return Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "redis MGET on {}: {} values for {} keys",
                    self.redacted,
                    values.len(),
                    all.len()
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
            let bytes = codec::encode(&entry, Some(&c.instance));
            let mut cmd = redis::cmd("SET");
            cmd.arg(&k).arg(&bytes);
            if let Some(ttl) = ttl {
                cmd.arg("PX")
                    .arg(ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64);
            }
            cmd.query::<()>(&mut c.con)?;
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
                .arg(1)
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
        self.run_on("PING", |c| {
            redis::cmd("PING").query::<String>(&mut c.con)?;
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
