//! memcached (`memcached://host:port`), through a small client of our own for
//! the classic ASCII protocol. A pool of servers (`memcached://h1,h2,h3`) is
//! built on it in [`pool`].
//!
//! Why our own: no Rust memcached client is mature. The `memcache` crate routes
//! keys by std's `DefaultHasher`, which is not stable across Rust releases (a
//! bump could land on another server than the one readers ask), its pool checks
//! every connection with a round trip, and it was seen blocking for over a
//! minute behind a server that accepts connections and never answers. We need
//! a handful of commands (`get` with many keys, `set`, `add`, `incr`,
//! `delete`, `version`, `stats`), each with a hard time-out, and nothing else.
//! This client never sends `flush_all`: a memcached server is usually shared
//! with other apps and prefixes, and only their own keys are ours to drop.
//!
//! Every request of one operation is written at once and the answers read
//! back in order (pipelining), so a multi-key operation is one round trip.
//!
//! ## A server is not trusted
//!
//! What a server (or anything that answers on its port) sends back can cost
//! us only what we asked for: a `get` accepts at most one `VALUE` per key it
//! asked for, only under keys it asked for, and a value is read as its bytes
//! arrive, never allocated at its announced length first (a server announcing
//! 1 GiB and then stalling costs a time-out, not a gigabyte). Numbers in
//! answers are parsed and combined with checked arithmetic.
//!
//! ## Expiry times
//!
//! memcached takes a relative expiry up to 30 days and reads anything larger
//! as an absolute Unix time, a signed 32-bit number. A command line it
//! rejects is answered with `CLIENT_ERROR` *without* the data block being
//! consumed, so the value's bytes would run as commands: [`exptime`] never
//! produces such a line (a time beyond 2038 becomes "no expiry").
//!
//! ## Checked requests (pools)
//!
//! A pool appends a `get` of a few keys (its per-server epochs) to a request
//! and compares what they hold with what it built the request's keys from
//! ([`Check`]); a difference comes back as [`Checked::Moved`], in the same
//! round trip. A lone server uses no check.

use std::io::{BufRead, BufReader, IoSlice, Read, Write};
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
/// What is allocated for a value before its bytes arrive; the buffer grows
/// with what is actually received.
const VALUE_START: usize = 64 * 1024;
/// Most `STAT` lines we read (memcached sends about 90): a server that streams
/// lines forever must not keep us reading forever.
const MAX_STATS: usize = 4096;
/// memcached reads an expiry above 30 days as an absolute Unix time.
const RELATIVE_TTL_MAX: u64 = 30 * 24 * 3600;
/// memcached parses an expiry as a signed 32-bit number; above this it
/// rejects the command line (and then runs the data block as commands).
const EXPTIME_MAX: u64 = i32::MAX as u64;

/// The expiry field for a `set` with `ttl`, at Unix time `now`: 0 (never)
/// without a TTL; whole seconds, rounded up, up to 30 days; beyond that the
/// absolute time `now + ttl`, or 0 when that does not fit memcached's signed
/// 32-bit field (past January 2038: keeping the value longer than asked is
/// allowed, dropping it early or sending a line memcached rejects is not).
fn exptime(ttl: Option<Duration>, now: u64) -> u64 {
    let Some(ttl) = ttl else {
        return 0;
    };
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0));
    if secs <= RELATIVE_TTL_MAX {
        // 0 would mean "never"; the caller drops zero TTLs before this.
        return secs.max(1);
    }
    match now.checked_add(secs) {
        // `now` is 0 only with a clock before 1970: an absolute time from it
        // would lie in the past (expired at once).
        Some(at) if at <= EXPTIME_MAX && now > 0 => at,
        _ => 0,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

struct Conn {
    stream: BufReader<TcpStream>,
    /// The server instance: its pid and start time, from `stats`.
    instance: Arc<str>,
    /// Reused for the lines and small values of a fetch: a hit allocates
    /// nothing per token.
    scratch: Vec<u8>,
}

impl Conn {
    /// Writes the parts of one request with as few system calls as the
    /// kernel allows, without first copying them together (a value can be
    /// hundreds of KB).
    fn send(&mut self, parts: &[&[u8]]) -> std::io::Result<()> {
        let stream = self.stream.get_mut();
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match stream.write_vectored(rest) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "connection closed while writing",
                    ));
                }
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
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

    /// One line without its `\r\n`, into `scratch` (no allocation).
    fn line_in_scratch(&mut self) -> Answer<&str> {
        self.scratch.clear();
        (&mut self.stream)
            .take(MAX_LINE)
            .read_until(b'\n', &mut self.scratch)?;
        if self.scratch.last() != Some(&b'\n') {
            return Err(Fail::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed or line too long",
            )));
        }
        self.scratch.pop();
        if self.scratch.last() == Some(&b'\r') {
            self.scratch.pop();
        }
        std::str::from_utf8(&self.scratch).map_err(|_| {
            Fail::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line is not UTF-8",
            ))
        })
    }

    /// A generation's data block, parsed where it lies in `scratch`.
    fn generation(&mut self, len: usize) -> Answer<Option<u64>> {
        self.scratch.clear();
        let want = len as u64 + 2;
        let got = (&mut self.stream)
            .take(want)
            .read_to_end(&mut self.scratch)?;
        if got as u64 != want || !self.scratch.ends_with(b"\r\n") {
            return Err(Fail::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed inside a value",
            )));
        }
        Ok(parse_gen(&self.scratch[..len]))
    }

    /// A data block of `len` bytes and its `\r\n`. The buffer grows with the
    /// bytes received: the announced length is only a bound.
    fn value(&mut self, len: usize) -> Answer<Vec<u8>> {
        let mut buf = Vec::with_capacity(len.min(VALUE_START));
        let want = len as u64 + 2;
        let got = (&mut self.stream).take(want).read_to_end(&mut buf)?;
        if got as u64 != want {
            return Err(Fail::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed inside a value",
            )));
        }
        if !buf.ends_with(b"\r\n") {
            return Err(protocol("value not followed by CRLF"));
        }
        buf.truncate(len);
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
    if looks_like_redis(line) {
        return Fail::Server(
            "the server answered in Redis's protocol (RESP), not memcached's: is this a Redis \
             port? Use redis://host:port for Redis"
                .to_owned(),
        );
    }
    Fail::Server(format!("unexpected answer {:?}", truncate(line)))
}

/// A RESP reply where a memcached line was expected: Redis answers our
/// inline `stats` with `-ERR unknown command …`, other commands with
/// `+`, `:`, `$` or `*` replies.
fn looks_like_redis(line: &str) -> bool {
    line.starts_with("-ERR ")
        || line.starts_with("-WRONGTYPE")
        || line.starts_with("-NOAUTH")
        || (line.len() > 1
            && matches!(line.as_bytes()[0], b'$' | b'*' | b':')
            && line[1..].bytes().all(|b| b.is_ascii_digit() || b == b'-'))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Keys a pool reads back at the end of a request, and the values they must
/// still hold for the request's answers to count. Empty for a lone server.
#[derive(Clone, Copy, Default)]
struct Check<'a> {
    keys: &'a [String],
    expect: &'a [u64],
}

impl Check<'_> {
    /// `get <keys>\r\n`, or nothing.
    fn request(&self) -> Vec<u8> {
        if self.keys.is_empty() {
            return Vec::new();
        }
        get_request(self.keys).into_bytes()
    }

    /// Reads the values of the checked keys (after the request's own
    /// answers): `None` if they hold what was expected, else what they hold
    /// (`None` each where missing or not a number).
    fn read(&self, conn: &mut Conn) -> Answer<Option<Vec<Option<u64>>>> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let now: Vec<Option<u64>> = read_values(conn, self.keys)?
            .into_iter()
            .map(|v| v.as_deref().and_then(parse_gen))
            .collect();
        let same = now.len() == self.expect.len()
            && now.iter().zip(self.expect).all(|(n, e)| *n == Some(*e));
        Ok((!same).then_some(now))
    }
}

/// The outcome of a checked request.
enum Checked<T> {
    /// The checked keys held what was expected: the answers count.
    Done(T),
    /// A checked key holds something else now (the values found, `None`
    /// where missing): the answers were about keys no longer in use.
    Moved(Vec<Option<u64>>),
}

/// Unwraps a checked step, or returns its `Moved` from the enclosing function.
macro_rules! step {
    ($e:expr) => {
        match $e? {
            Checked::Done(v) => v,
            Checked::Moved(now) => return Ok(Checked::Moved(now)),
        }
    };
}

/// The answer to an unchecked request (a lone server never sees `Moved`).
fn unchecked<T>(c: Checked<T>) -> Result<T> {
    match c {
        Checked::Done(v) => Ok(v),
        Checked::Moved(_) => Err(Error::new(
            ErrorKind::Backend,
            "memcached: a request without checks reported a moved key",
        )),
    }
}

/// `get k1 k2 …\r\n`.
fn get_request<K: AsRef<str>>(keys: &[K]) -> String {
    let mut req =
        String::with_capacity(5 + keys.iter().map(|k| k.as_ref().len() + 1).sum::<usize>());
    req.push_str("get");
    for k in keys {
        req.push(' ');
        req.push_str(k.as_ref());
    }
    req.push_str("\r\n");
    req
}

/// Reads the answer to one `get` of `keys`: the values, in the order of
/// `keys` (moved out of the socket's buffer, never copied).
///
/// A server may answer only what was asked: at most one `VALUE` per key
/// asked (a key asked twice may come twice), and none for a key not asked.
/// Anything else is a protocol error, before anything is allocated for it.
fn read_values<K: AsRef<str>>(conn: &mut Conn, keys: &[K]) -> Answer<Vec<Option<Vec<u8>>>> {
    let mut out: Vec<Option<Vec<u8>>> = (0..keys.len()).map(|_| None).collect();
    // memcached answers in the order asked (skipping misses): searching from
    // just after the last hit finds each key at once.
    let mut cursor = 0;
    loop {
        let line = conn.line()?;
        if line == "END" {
            return Ok(out);
        }
        let mut parts = line.split(' ');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("VALUE"), Some(key), Some(_flags), Some(len), None) => {
                let n = keys.len();
                let slot = (cursor..n)
                    .chain(0..cursor)
                    .find(|&i| out[i].is_none() && keys[i].as_ref() == key)
                    .ok_or_else(|| {
                        Fail::Server(format!(
                            "answered a value not asked for (or twice): {:?}",
                            truncate(&line)
                        ))
                    })?;
                let len: usize = len.parse().map_err(|_| protocol(&line))?;
                if len > MAX_VALUE {
                    return Err(protocol(&line));
                }
                out[slot] = Some(conn.value(len)?);
                cursor = slot + 1;
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

/// The command line of a storage command (the data block follows it).
fn storage_line(cmd: &str, key: &str, exptime: u64, len: usize) -> String {
    format!("{cmd} {key} 0 {exptime} {len}\r\n")
}

/// A whole storage command for a small value (a generation).
fn storage(cmd: &str, key: &str, value: &[u8]) -> Vec<u8> {
    let mut req = storage_line(cmd, key, 0, value.len()).into_bytes();
    req.extend_from_slice(value);
    req.extend_from_slice(b"\r\n");
    req
}

impl Memcached {
    pub(crate) fn new(config: &Config) -> Result<Self> {
        let Target::Memcached { servers, .. } = &config.target else {
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
            redacted: if matches!(&config.target, Target::Memcached { servers, .. } if servers.len() > 1)
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
                        scratch: Vec::with_capacity(256),
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

    /// One pipelined exchange: `parts` (one or more commands), then the
    /// check's `get`; `read` reads the commands' answers, then the checked
    /// values are compared.
    fn exchange<T>(
        &self,
        op: &str,
        parts: &[&[u8]],
        check: Check<'_>,
        read: impl Fn(&mut Conn) -> Answer<T>,
    ) -> Result<Checked<T>> {
        let check_req = check.request();
        let mut all: Vec<&[u8]> = parts.to_vec();
        all.push(&check_req);
        self.run(op, |conn| {
            conn.send(&all)?;
            let out = read(conn)?;
            Ok(match check.read(conn)? {
                None => Checked::Done(out),
                Some(now) => Checked::Moved(now),
            })
        })
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

    /// `get` for many keys: the values in the order of `keys`, and the
    /// instance that answered.
    fn get_keys(&self, keys: &[String], check: Check<'_>) -> Result<Checked<Values>> {
        // A `get` without keys is an error to memcached: send none.
        let req = if keys.is_empty() {
            String::new()
        } else {
            get_request(keys)
        };
        self.exchange("get", &[req.as_bytes()], check, |conn| {
            let values = if keys.is_empty() {
                Vec::new()
            } else {
                read_values(conn, keys)?
            };
            Ok((values, conn.instance.clone()))
        })
    }

    /// Plain `set` of counters (replacing foreign bytes).
    fn set_counters(&self, keys: &[&str], values: &[u64], check: Check<'_>) -> Result<Checked<()>> {
        if keys.is_empty() {
            return Ok(Checked::Done(()));
        }
        let mut req = Vec::new();
        for (k, v) in keys.iter().zip(values) {
            req.extend(storage("set", k, v.to_string().as_bytes()));
        }
        self.exchange("set", &[&req], check, |conn| {
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
    fn add_counters(
        &self,
        keys: &[&str],
        fresh: &[u64],
        check: Check<'_>,
    ) -> Result<Checked<Vec<bool>>> {
        let mut req = Vec::new();
        for (k, f) in keys.iter().zip(fresh) {
            req.extend(storage("add", k, f.to_string().as_bytes()));
        }
        self.exchange("add", &[&req], check, |conn| {
            keys.iter()
                .map(|_| match conn.line()?.as_str() {
                    "STORED" => Ok(true),
                    "NOT_STORED" => Ok(false),
                    other => Err(server_error(other.to_owned())),
                })
                .collect()
        })
    }

    /// `incr` each key by one.
    fn incr_once(&self, keys: &[&str], check: Check<'_>) -> Result<Checked<Vec<Incr>>> {
        let mut req = String::new();
        for k in keys {
            req.push_str("incr ");
            req.push_str(k);
            req.push_str(" 1\r\n");
        }
        self.exchange("incr", &[req.as_bytes()], check, |conn| {
            keys.iter()
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
                .collect()
        })
    }

    /// For each counter key: if it is missing (or not a number), store
    /// `fresh[i]` unless another client got there first; the values now
    /// stored. Each step is checked.
    fn init_counters(
        &self,
        keys: &[String],
        fresh: &[u64],
        check: Check<'_>,
    ) -> Result<Checked<Vec<u64>>> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let added = step!(self.add_counters(&refs, fresh, check));
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
            let (now, _) = step!(self.get_keys(&ks, check));
            let mut foreign = Vec::new();
            for (&i, v) in taken.iter().zip(now) {
                match v.as_deref().and_then(parse_gen) {
                    Some(g) => out[i] = Some(g),
                    None => foreign.push(i),
                }
            }
            let fk: Vec<&str> = foreign.iter().map(|&i| refs[i]).collect();
            let fv: Vec<u64> = foreign.iter().map(|&i| fresh[i]).collect();
            step!(self.set_counters(&fk, &fv, check));
            for (&i, v) in foreign.iter().zip(fv) {
                out[i] = Some(v);
            }
        }
        Ok(Checked::Done(
            out.into_iter().map(Option::unwrap_or_default).collect(),
        ))
    }

    /// Adds one to each counter key; a missing (or foreign) one becomes
    /// `fresh[i]`. Each step is checked.
    fn incr_counters(
        &self,
        keys: &[String],
        fresh: &[u64],
        check: Check<'_>,
    ) -> Result<Checked<Vec<u64>>> {
        let mut out: Vec<Option<u64>> = vec![None; keys.len()];
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        // Three passes at most: incr; add where missing; incr where another
        // client's add won the race. Each pass is one pipelined round trip.
        for _ in 0..3 {
            if pending.is_empty() {
                break;
            }
            let pk: Vec<&str> = pending.iter().map(|&i| keys[i].as_str()).collect();
            let answers = step!(self.incr_once(&pk, check));
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
            let fk: Vec<&str> = foreign.iter().map(|&i| keys[i].as_str()).collect();
            let fv: Vec<u64> = foreign.iter().map(|&i| fresh[i]).collect();
            step!(self.set_counters(&fk, &fv, check));
            for (&i, v) in foreign.iter().zip(fv) {
                out[i] = Some(v);
            }
            pending.clear();
            if !missing.is_empty() {
                let mk: Vec<&str> = missing.iter().map(|&i| keys[i].as_str()).collect();
                let mv: Vec<u64> = missing.iter().map(|&i| fresh[i]).collect();
                let added = step!(self.add_counters(&mk, &mv, check));
                for (&i, stored) in missing.iter().zip(added) {
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
        Ok(Checked::Done(
            out.into_iter().map(Option::unwrap_or_default).collect(),
        ))
    }

    /// Stores an entry under `key`. With a `guard`, only on that server
    /// instance (`false` otherwise).
    fn set_entry(
        &self,
        key: &str,
        entry: &Entry,
        exptime: u64,
        guard: Option<&str>,
        check: Check<'_>,
    ) -> Result<Checked<bool>> {
        let check_req = check.request();
        self.run("set", |conn| {
            if guard.is_some_and(|g| g != &*conn.instance) {
                return Ok(Checked::Done(false));
            }
            let data = codec::encode(entry, Some(&conn.instance));
            let head = storage_line("set", key, exptime, data.len());
            // The value is written from where it lies, not copied into a
            // request buffer first.
            conn.send(&[head.as_bytes(), &data, b"\r\n", &check_req])?;
            let line = conn.line()?;
            if line != "STORED" {
                // The connection is dropped after an error: what is left
                // unread on it does not matter.
                return Err(server_error(line));
            }
            Ok(match check.read(conn)? {
                None => Checked::Done(true),
                Some(now) => Checked::Moved(now),
            })
        })
    }

    /// `add` a fill lease expiring after `ttl`; `true` if it was stored.
    /// Whole seconds, rounded up: a lease may outlive `ttl` on the server by
    /// up to a second, which only makes a later miss of the same (block,
    /// version) wait (at most `lease_ms`) rather than render at once.
    fn add_lease(&self, key: &str, ttl: Duration, check: Check<'_>) -> Result<Checked<bool>> {
        let value = crate::lease::value();
        let mut req =
            storage_line("add", key, exptime(Some(ttl), unix_now()), value.len()).into_bytes();
        req.extend_from_slice(&value);
        req.extend_from_slice(b"\r\n");
        self.exchange("add", &[&req], check, |conn| match conn.line()?.as_str() {
            "STORED" => Ok(true),
            "NOT_STORED" => Ok(false),
            other => Err(server_error(other.to_owned())),
        })
    }

    fn delete_key(&self, key: &str, check: Check<'_>) -> Result<Checked<bool>> {
        let req = format!("delete {key}\r\n");
        self.exchange("delete", &[req.as_bytes()], check, |conn| {
            let line = conn.line()?;
            match line.as_str() {
                "DELETED" => Ok(true),
                "NOT_FOUND" => Ok(false),
                _ => Err(server_error(line)),
            }
        })
    }
}

/// The server instance behind a fresh connection: its pid and start time.
fn instance_of(conn: &mut Conn) -> Answer<Arc<str>> {
    conn.send(&[b"stats\r\n"])?;
    let (mut pid, mut time, mut uptime) = (0i64, 0i64, 0i64);
    for _ in 0..MAX_STATS {
        let line = conn.line()?;
        if line == "END" {
            return instance_id(pid, time, uptime)
                .map(Arc::from)
                .ok_or_else(|| {
                    Fail::Server(format!(
                        "stats: time {time} and uptime {uptime} give no start time"
                    ))
                });
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
    Err(Fail::Server(format!("stats: more than {MAX_STATS} lines")))
}

/// `pid@start`, the start time being `time - uptime` (server-provided
/// numbers: `None` if the subtraction overflows).
fn instance_id(pid: i64, time: i64, uptime: i64) -> Option<String> {
    Some(format!("{pid}@{}", time.checked_sub(uptime)?))
}

/// Values in the order asked, and the server instance that answered.
type Values = (Vec<Option<Vec<u8>>>, Arc<str>);

/// One answer to `incr`.
enum Incr {
    Value(u64),
    NotFound,
    NotANumber,
}

/// The answer to one fetch's `get`: generations parsed as they arrive,
/// entries' bytes, and the server instance.
type FetchAnswer = (Vec<Option<u64>>, Vec<Option<Vec<u8>>>, Arc<str>);

/// Reads the answer to a fetch's `get` (the keys are `req[span]`, the first
/// `tokens` of them generations), with the checks of [`read_values`], and
/// no allocation per generation.
fn read_fetch(
    conn: &mut Conn,
    req: &str,
    spans: &[(usize, usize)],
    tokens: usize,
) -> Answer<FetchAnswer> {
    let key = |i: usize| &req[spans[i].0..spans[i].1];
    let mut gens: Vec<Option<u64>> = vec![None; tokens];
    let mut entries: Vec<Option<Vec<u8>>> = (tokens..spans.len()).map(|_| None).collect();
    let mut seen = vec![false; spans.len()];
    let mut cursor = 0;
    loop {
        let (slot, len) = {
            let line = conn.line_in_scratch()?;
            if line == "END" {
                return Ok((gens, entries, conn.instance.clone()));
            }
            let mut parts = line.split(' ');
            match (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) {
                (Some("VALUE"), Some(k), Some(_flags), Some(len), None) => {
                    let n = spans.len();
                    let slot = (cursor..n)
                        .chain(0..cursor)
                        .find(|&i| !seen[i] && key(i) == k)
                        .ok_or_else(|| {
                            Fail::Server(format!(
                                "answered a value not asked for (or twice): {:?}",
                                truncate(line)
                            ))
                        })?;
                    let len: usize = len.parse().map_err(|_| protocol(line))?;
                    if len > MAX_VALUE {
                        return Err(protocol(line));
                    }
                    (slot, len)
                }
                _ => return Err(server_error(line.to_owned())),
            }
        };
        seen[slot] = true;
        if slot < tokens {
            gens[slot] = conn.generation(len)?;
        } else {
            entries[slot - tokens] = Some(conn.value(len)?);
        }
        cursor = slot + 1;
    }
}

impl Backend for Memcached {
    fn fetch(&self, tokens: &[&str], entries: &[Key<'_>]) -> Result<Fetched> {
        let n = tokens.len() + entries.len();
        if n == 0 {
            return Ok(super::assemble(Vec::new(), 0, None));
        }
        // One buffer: the request, whose key parts are also what the
        // answers are matched against (no string per key).
        let mut req = String::with_capacity(5 + n * (self.prefix.len() + 24));
        let mut spans = Vec::with_capacity(n);
        req.push_str("get");
        for key in tokens
            .iter()
            .map(|t| Key::gen_(t))
            .chain(entries.iter().copied())
        {
            req.push(' ');
            let start = req.len();
            keys::encode_into(&mut req, &self.prefix, key);
            spans.push((start, req.len()));
        }
        req.push_str("\r\n");
        let (gens, raw, instance) = self.run("get", |conn| {
            conn.send(&[req.as_bytes()])?;
            read_fetch(conn, &req, &spans, tokens.len())
        })?;
        let entries = raw
            .into_iter()
            .map(|v| {
                v.and_then(|b| {
                    codec::decode(bytes::Bytes::from(b)).and_then(|(e, stored_by)| {
                        super::same_instance(e, stored_by.as_deref(), &instance)
                    })
                })
            })
            .collect();
        Ok(Fetched {
            gens,
            entries,
            instance: Some(instance),
        })
    }

    fn init_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        let keys: Vec<String> = gens.iter().map(|k| self.key(*k)).collect();
        unchecked(self.init_counters(&keys, fresh, Check::default())?)
    }

    fn incr_gens(&self, gens: &[Key<'_>], fresh: &[u64]) -> Result<Vec<u64>> {
        let keys: Vec<String> = gens.iter().map(|k| self.key(*k)).collect();
        unchecked(self.incr_counters(&keys, fresh, Check::default())?)
    }

    fn set(
        &self,
        key: Key<'_>,
        entry: Arc<Entry>,
        ttl: Option<Duration>,
        guard: Option<&str>,
    ) -> Result<bool> {
        let k = self.key(key);
        let exptime = exptime(ttl, unix_now());
        unchecked(self.set_entry(&k, &entry, exptime, guard, Check::default())?)
    }

    fn delete(&self, key: Key<'_>) -> Result<bool> {
        unchecked(self.delete_key(&self.key(key), Check::default())?)
    }

    fn lease(&self, key: Key<'_>, ttl: Duration) -> Result<bool> {
        unchecked(self.add_lease(&self.key(key), ttl, Check::default())?)
    }

    fn ping(&self) -> Result<()> {
        self.instance().map(drop)
    }

    fn instance(&self) -> Result<Option<Arc<str>>> {
        self.run("version", |conn| {
            conn.send(&[b"version\r\n"])?;
            let line = conn.line()?;
            if line.starts_with("VERSION") {
                Ok(Some(conn.instance.clone()))
            } else {
                Err(server_error(line))
            }
        })
    }

    fn single_instance(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "memcached"
    }

    fn server_stats(&self) -> Result<Vec<(String, String)>> {
        self.run("stats", |conn| {
            conn.send(&[b"stats\r\n"])?;
            let mut out = Vec::new();
            for _ in 0..MAX_STATS {
                let line = conn.line()?;
                if line == "END" {
                    return Ok(out);
                }
                match line.strip_prefix("STAT ").and_then(|l| l.split_once(' ')) {
                    Some((k, v)) => out.push((k.to_string(), v.to_string())),
                    None => return Err(server_error(line)),
                }
            }
            Err(Fail::Server(format!("stats: more than {MAX_STATS} lines")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn short_ttls_are_relative_whole_seconds() {
        assert_eq!(exptime(None, NOW), 0);
        assert_eq!(exptime(Some(Duration::from_millis(1)), NOW), 1);
        assert_eq!(exptime(Some(Duration::from_millis(1500)), NOW), 2);
        assert_eq!(exptime(Some(Duration::from_secs(60)), NOW), 60);
        assert_eq!(
            exptime(Some(Duration::from_secs(RELATIVE_TTL_MAX)), NOW),
            RELATIVE_TTL_MAX
        );
    }

    #[test]
    fn long_ttls_are_absolute_or_never() {
        let day = 24 * 3600;
        assert_eq!(
            exptime(Some(Duration::from_secs(RELATIVE_TTL_MAX + 1)), NOW),
            NOW + RELATIVE_TTL_MAX + 1
        );
        // Past 2038 the field cannot hold it: no expiry, never a bad line.
        for ttl in [
            Duration::from_secs(20 * 365 * day),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
            Duration::new(u64::MAX, 1),
        ] {
            assert_eq!(exptime(Some(ttl), NOW), 0, "{ttl:?}");
        }
        // Just inside and just outside the signed 32-bit field.
        let fits = EXPTIME_MAX - NOW;
        assert_eq!(exptime(Some(Duration::from_secs(fits)), NOW), EXPTIME_MAX);
        assert_eq!(exptime(Some(Duration::from_secs(fits + 1)), NOW), 0);
        // A clock before 1970 cannot place an absolute time: no expiry.
        assert_eq!(
            exptime(Some(Duration::from_secs(RELATIVE_TTL_MAX + 1)), 0),
            0
        );
        assert_eq!(exptime(Some(Duration::from_secs(60)), 0), 60);
        // Sub-second parts round up, even at the top.
        assert_eq!(exptime(Some(Duration::new(fits - 1, 1)), NOW), EXPTIME_MAX);
    }

    #[test]
    fn instance_ids_never_overflow() {
        assert_eq!(instance_id(7, 100, 40).as_deref(), Some("7@60"));
        assert_eq!(instance_id(7, i64::MIN, 1), None);
        assert_eq!(instance_id(7, i64::MAX, -1), None);
        assert_eq!(
            instance_id(7, -1, i64::MAX).as_deref(),
            Some("7@-9223372036854775808")
        );
    }
}
