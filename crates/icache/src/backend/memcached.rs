//! memcached (`memcached://host:port`), through a small client of our own for
//! the classic ASCII protocol.
//!
//! Why our own: no Rust memcached client is mature. The `memcache` crate routes
//! keys by std's `DefaultHasher`, which is not stable across Rust releases (a
//! bump could land on another server than the one readers ask), its pool checks
//! every connection with a round trip, and it was seen blocking for over a
//! minute behind a server that accepts connections and never answers. We need
//! six commands (`get` with many keys, `set`, `add`, `incr`, `delete`,
//! `version`), each with a hard time-out, and nothing else.
//!
//! Every request of one operation is written at once and the answers read
//! back in order (pipelining), so a multi-key operation is one round trip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Backend, Fetched, parse_gen};
use crate::codec::{self, Entry};
use crate::config::{Config, Target};
use crate::error::{Error, ErrorKind, Result, from_io};
use crate::keys::{self, Key};
use crate::pool::Pool;

pub(crate) mod pool;

/// Longest status line we accept from the server.
const MAX_LINE: u64 = 8 * 1024;
/// Largest value we accept from the server (memcached's own ceiling is 1 GiB).
const MAX_VALUE: usize = 1 << 30;
/// memcached reads an expiry above 30 days as an absolute Unix time.
const RELATIVE_TTL_MAX: u64 = 30 * 24 * 3600;

struct Conn {
    stream: BufReader<TcpStream>,
    /// The server instance: its pid and start time, from `stats`.
    instance: Arc<str>,
}

impl Conn {
    fn send(&mut self, request: &[u8]) -> std::io::Result<()> {
        self.stream.get_mut().write_all(request)
    }

    /// One line without its `\r\n`.
    fn line(&mut self) -> std::io::Result<String> {
        let mut buf = Vec::new();
        (&mut self.stream)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)?;
        if buf.last() != Some(&b'\n') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed or line too long",
            ));
        }
        buf.truncate(buf.len() - 1);
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        String::from_utf8(buf)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "line is not UTF-8"))
    }

    fn exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; n];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }
}

pub(crate) struct Memcached {
    server: String,
    pool: Pool<Conn>,
    prefix: String,
    timeout: Duration,
    connect_timeout: Duration,
    redacted: String,
}

impl std::fmt::Debug for Memcached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memcached")
            .field("url", &self.redacted)
            .finish()
    }
}

/// What went wrong inside one exchange, before it becomes an [`Error`].
enum Fail {
    Io(std::io::Error),
    Server(String),
    TooLarge(String),
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        Fail::Io(e)
    }
}

type Answer<T> = std::result::Result<T, Fail>;

fn protocol(line: &str) -> Fail {
    Fail::Server(format!("unexpected answer {:?}", truncate(line)))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Reads the answer to one `get`: the values found, by key.
fn read_values(conn: &mut Conn, want: usize) -> Answer<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::with_capacity(want);
    loop {
        let line = conn.line()?;
        if line == "END" {
            return Ok(out);
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("VALUE"), Some(key), Some(_flags), Some(len)) => {
                let len: usize = len.parse().map_err(|_| protocol(&line))?;
                if len > MAX_VALUE {
                    return Err(protocol(&line));
                }
                let mut data = conn.exact(len + 2)?;
                if !data.ends_with(b"\r\n") {
                    return Err(protocol("value not followed by CRLF"));
                }
                data.truncate(len);
                out.push((key.to_owned(), data));
            }
            _ => return Err(server_error(line)),
        }
    }
}

fn server_error(line: String) -> Fail {
    if line.contains("too large") {
        Fail::TooLarge(line)
    } else if line.starts_with("SERVER_ERROR")
        || line.starts_with("CLIENT_ERROR")
        || line == "ERROR"
    {
        Fail::Server(line)
    } else {
        protocol(&line)
    }
}

fn storage(cmd: &str, key: &str, exptime: u64, data: &[u8]) -> Vec<u8> {
    let mut req = format!("{cmd} {key} 0 {exptime} {}\r\n", data.len()).into_bytes();
    req.extend_from_slice(data);
    req.extend_from_slice(b"\r\n");
    req
}

impl Memcached {
    pub(crate) fn new(config: &Config) -> Result<Self> {
        let Target::Memcached { servers } = &config.target else {
            return Err(Error::config("not a memcached:// URL"));
        };
        let server = servers
            .first()
            .cloned()
            .ok_or_else(|| Error::config(format!("no server in {}", config.redacted)))?;
        Ok(Memcached::for_server(server, config))
    }

    /// One server of a pool (or the only one).
    pub(crate) fn for_server(server: String, config: &Config) -> Self {
        Memcached {
            redacted: if matches!(&config.target, Target::Memcached { servers } if servers.len() > 1)
            {
                format!("memcached://{server}")
            } else {
                config.redacted.clone()
            },
            pool: Pool::new(config.pool_size).named(format!("memcached://{server}")),
            server,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
        }
    }

    fn connect(&self) -> Result<Conn> {
        let context = || format!("memcached connect to {}", self.server);
        let addrs = self
            .server
            .to_socket_addrs()
            .map_err(|e| from_io(&context(), e))?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.connect_timeout) {
                Ok(stream) => {
                    let setup = stream
                        .set_read_timeout(Some(self.timeout))
                        .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
                        .and_then(|()| stream.set_nodelay(true));
                    if let Err(e) = setup {
                        last = Some(e);
                        continue;
                    }
                    let mut conn = Conn {
                        stream: BufReader::with_capacity(16 * 1024, stream),
                        instance: Arc::from(""),
                    };
                    conn.instance = instance_of(&mut conn).map_err(|f| self.fail("stats", f))?;
                    return Ok(conn);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(from_io(
            &context(),
            last.unwrap_or_else(|| std::io::Error::other("host resolved to no address")),
        ))
    }

    /// One exchange on a pooled connection, with errors made ours.
    fn run<T>(&self, op: &str, f: impl Fn(&mut Conn) -> Answer<T>) -> Result<T> {
        self.pool.with(
            || self.connect(),
            |conn| f(conn).map_err(|fail| self.fail(op, fail)),
        )
    }

    fn fail(&self, op: &str, fail: Fail) -> Error {
        match fail {
            Fail::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                ) =>
            {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "memcached {op} on {}: no answer within {:?}",
                        self.redacted, self.timeout
                    ),
                )
            }
            Fail::Io(e) => from_io(&format!("memcached {op} on {}", self.redacted), e),
            Fail::Server(m) => Error::new(
                ErrorKind::Backend,
                format!("memcached {op} on {}: {m}", self.redacted),
            ),
            Fail::TooLarge(m) => Error::new(
                ErrorKind::TooLarge,
                format!(
                    "memcached {op} on {}: {m} (the server's item size limit is its -I option)",
                    self.redacted
                ),
            ),
        }
    }

    fn key(&self, k: Key<'_>) -> String {
        keys::encode(&self.prefix, k)
    }

    /// `flush_all`: drops everything on this server (a pool does this to a
    /// server that comes back after being marked down: what it holds is old).
    fn flush_all(&self) -> Result<()> {
        self.run("flush_all", |conn| {
            conn.send(b"flush_all\r\n")?;
            let line = conn.line()?;
            if line == "OK" {
                Ok(())
            } else {
                Err(server_error(line))
            }
        })
    }

    /// `get` for many keys; values in the order of `keys`, and the instance
    /// that answered.
    fn get_many(&self, keys: &[String]) -> Result<Values> {
        if keys.is_empty() {
            return Ok((Vec::new(), None));
        }
        let mut req = String::from("get");
        for k in keys {
            req.push(' ');
            req.push_str(k);
        }
        req.push_str("\r\n");
        let (found, instance) = self.run("get", |conn| {
            conn.send(req.as_bytes())?;
            Ok((read_values(conn, keys.len())?, conn.instance.clone()))
        })?;
        Ok((
            in_key_order(keys, found.into_iter().collect()),
            Some(instance),
        ))
    }

    /// Plain `set` of a generation (replacing foreign bytes).
    fn set_gens(&self, keys: &[&String], values: &[u64]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut req = Vec::new();
        for (k, v) in keys.iter().zip(values) {
            req.extend(storage("set", k, 0, v.to_string().as_bytes()));
        }
        self.run("set", |conn| {
            conn.send(&req)?;
            for _ in keys {
                let line = conn.line()?;
                if line != "STORED" {
                    return Err(server_error(line));
                }
            }
            Ok(())
        })
    }

    /// `add` each key with its fresh value; `true` where it was stored.
    fn add_gens(&self, keys: &[&String], fresh: &[u64]) -> Result<Vec<bool>> {
        let mut req = Vec::new();
        for (k, f) in keys.iter().zip(fresh) {
            req.extend(storage("add", k, 0, f.to_string().as_bytes()));
        }
        self.run("add", |conn| {
            conn.send(&req)?;
            keys.iter()
                .map(|_| match conn.line()?.as_str() {
                    "STORED" => Ok(true),
                    "NOT_STORED" => Ok(false),
                    other => Err(server_error(other.to_owned())),
                })
                .collect()
        })
    }
}

/// The server instance behind a fresh connection: its pid and start time.
fn instance_of(conn: &mut Conn) -> Answer<Arc<str>> {
    conn.send(b"stats\r\n")?;
    let (mut pid, mut time, mut uptime) = (0i64, 0i64, 0i64);
    loop {
        let line = conn.line()?;
        if line == "END" {
            break;
        }
        let mut parts = line.split(' ');
        if parts.next() != Some("STAT") {
            return Err(server_error(line));
        }
        let (name, value) = (parts.next(), parts.next().and_then(|v| v.parse().ok()));
        match (name, value) {
            (Some("pid"), Some(v)) => pid = v,
            (Some("time"), Some(v)) => time = v,
            (Some("uptime"), Some(v)) => uptime = v,
            _ => {}
        }
    }
    Ok(Arc::from(format!("{pid}@{}", time - uptime)))
}

/// The values found, in the order of `keys`. A key asked twice gets a copy;
/// every other value moves (entries can be large: no needless copy).
fn in_key_order<V: Clone>(
    keys: &[String],
    mut found: std::collections::HashMap<String, V>,
) -> Vec<Option<V>> {
    let mut left: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for k in keys {
        *left.entry(k.as_str()).or_default() += 1;
    }
    keys.iter()
        .map(|k| {
            let n = left.get_mut(k.as_str()).map(|n| {
                *n -= 1;
                *n
            });
            if n == Some(0) {
                found.remove(k)
            } else {
                found.get(k).cloned()
            }
        })
        .collect()
}

/// Values in the order asked, and the server instance that answered.
type Values = (Vec<Option<Vec<u8>>>, Option<Arc<str>>);

/// One answer to `incr`.
enum Incr {
    Value(u64),
    NotFound,
    NotANumber,
}

impl Backend for Memcached {
    fn fetch(&self, tokens: &[&str], entries: &[Key<'_>]) -> Result<Fetched> {
        let all: Vec<String> = tokens
            .iter()
            .map(|t| self.key(Key::gen_(t)))
            .chain(entries.iter().map(|k| self.key(*k)))
            .collect();
        let (values, instance) = self.get_many(&all)?;
        let here = instance.clone().unwrap_or_else(|| Arc::from(""));
        let tagged = values
            .into_iter()
            .map(|v| v.map(|b| (b, here.clone())))
            .collect();
        Ok(super::assemble(tagged, tokens.len(), instance))
    }

    fn init_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        let keys: Vec<String> = gens.iter().map(|k| self.key(*k)).collect();
        let refs: Vec<&String> = keys.iter().collect();
        let added = self.add_gens(&refs, fresh)?;
        let mut out: Vec<Option<u64>> = added
            .iter()
            .zip(fresh)
            .map(|(&a, &f)| a.then_some(f))
            .collect();
        // Someone else initialised these first (or they hold foreign bytes):
        // read what is there.
        let taken: Vec<usize> = (0..keys.len()).filter(|&i| out[i].is_none()).collect();
        if !taken.is_empty() {
            let ks: Vec<String> = taken.iter().map(|&i| keys[i].clone()).collect();
            let (now, _) = self.get_many(&ks)?;
            let mut foreign = Vec::new();
            for (&i, v) in taken.iter().zip(now) {
                match v.as_deref().and_then(parse_gen) {
                    Some(g) => out[i] = Some(g),
                    None => foreign.push(i),
                }
            }
            let fk: Vec<&String> = foreign.iter().map(|&i| &keys[i]).collect();
            let fv: Vec<u64> = foreign.iter().map(|&i| fresh[i]).collect();
            self.set_gens(&fk, &fv)?;
            for (&i, v) in foreign.iter().zip(fv) {
                out[i] = Some(v);
            }
        }
        Ok(out.into_iter().map(|g| g.unwrap_or_default()).collect())
    }

    fn incr_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        let keys: Vec<String> = gens.iter().map(|k| self.key(*k)).collect();
        let mut out: Vec<Option<u64>> = vec![None; keys.len()];
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        // Three passes at most: incr; add where missing; incr where another
        // client's add won the race. Each pass is one pipelined round trip.
        for _ in 0..3 {
            if pending.is_empty() {
                break;
            }
            let mut req = String::new();
            for &i in &pending {
                req.push_str("incr ");
                req.push_str(&keys[i]);
                req.push_str(" 1\r\n");
            }
            let answers = self.run("incr", |conn| {
                conn.send(req.as_bytes())?;
                pending
                    .iter()
                    .map(|_| {
                        let line = conn.line()?;
                        if line == "NOT_FOUND" {
                            Ok(Incr::NotFound)
                        } else if line.starts_with("CLIENT_ERROR") {
                            Ok(Incr::NotANumber)
                        } else {
                            line.trim_end()
                                .parse()
                                .map(Incr::Value)
                                .map_err(|_| server_error(line))
                        }
                    })
                    .collect::<Answer<Vec<Incr>>>()
            })?;
            let mut missing = Vec::new();
            let mut foreign = Vec::new();
            for (&i, a) in pending.iter().zip(answers) {
                match a {
                    // Below 2: the counter held foreign bytes ("0") that incr
                    // accepted. Not a generation of ours: replace it.
                    Incr::Value(v) if v < 2 => foreign.push(i),
                    Incr::Value(v) => out[i] = Some(v),
                    Incr::NotFound => missing.push(i),
                    Incr::NotANumber => foreign.push(i),
                }
            }
            let fk: Vec<&String> = foreign.iter().map(|&i| &keys[i]).collect();
            let fv: Vec<u64> = foreign.iter().map(|&i| fresh[i]).collect();
            self.set_gens(&fk, &fv)?;
            for (&i, v) in foreign.iter().zip(fv) {
                out[i] = Some(v);
            }
            pending.clear();
            if !missing.is_empty() {
                let mk: Vec<&String> = missing.iter().map(|&i| &keys[i]).collect();
                let mv: Vec<u64> = missing.iter().map(|&i| fresh[i]).collect();
                for (&i, stored) in missing.iter().zip(self.add_gens(&mk, &mv)?) {
                    if stored {
                        out[i] = Some(fresh[i]);
                    } else {
                        pending.push(i);
                    }
                }
            }
        }
        if !pending.is_empty() {
            return Err(Error::new(
                ErrorKind::Backend,
                format!(
                    "memcached incr on {}: counter kept vanishing",
                    self.redacted
                ),
            ));
        }
        Ok(out.into_iter().map(|g| g.unwrap_or_default()).collect())
    }

    fn set(
        &self,
        key: Key<'_>,
        entry: Arc<Entry>,
        ttl: Option<Duration>,
        guard: Option<&str>,
    ) -> Result<bool> {
        let k = self.key(key);
        let exptime = match ttl {
            None => 0,
            Some(t) => {
                let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0);
                if secs <= RELATIVE_TTL_MAX {
                    secs.max(1)
                } else {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or_default();
                    now.saturating_add(secs)
                }
            }
        };
        self.run("set", |conn| {
            if guard.is_some_and(|g| g != &*conn.instance) {
                return Ok(false);
            }
            let req = storage(
                "set",
                &k,
                exptime,
                &codec::encode(&entry, Some(&conn.instance)),
            );
            conn.send(&req)?;
            let line = conn.line()?;
            if line == "STORED" {
                Ok(true)
            } else {
                Err(server_error(line))
            }
        })
    }

    fn delete(&self, key: Key<'_>) -> Result<bool> {
        let req = format!("delete {}\r\n", self.key(key));
        self.run("delete", |conn| {
            conn.send(req.as_bytes())?;
            let line = conn.line()?;
            match line.as_str() {
                "DELETED" => Ok(true),
                "NOT_FOUND" => Ok(false),
                _ => Err(server_error(line)),
            }
        })
    }

    fn ping(&self) -> Result<()> {
        self.run("version", |conn| {
            conn.send(b"version\r\n")?;
            let line = conn.line()?;
            if line.starts_with("VERSION") {
                Ok(())
            } else {
                Err(server_error(line))
            }
        })
    }

    fn name(&self) -> &'static str {
        "memcached"
    }

    fn server_stats(&self) -> Result<Vec<(String, String)>> {
        self.run("stats", |conn| {
            conn.send(b"stats\r\n")?;
            let mut out = Vec::new();
            loop {
                let line = conn.line()?;
                if line == "END" {
                    return Ok(out);
                }
                match line.strip_prefix("STAT ").and_then(|l| l.split_once(' ')) {
                    Some((k, v)) => out.push((k.to_string(), v.to_string())),
                    None => return Err(server_error(line)),
                }
            }
        })
    }
}
