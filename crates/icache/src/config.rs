//! Parsing a cache URL into backend settings.

use std::fmt;
use std::time::Duration;

use url::Url;

use crate::error::{Error, Result};
use crate::keys::key_prefix;

/// Default bound of the memory backend.
pub(crate) const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default time-out for one answer from a network backend. Small on purpose:
/// a cache that answers slower than this is slower than rendering.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// Default time-out for opening a connection.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(100);
/// Default number of idle connections kept per server.
pub(crate) const DEFAULT_POOL_SIZE: usize = 8;
/// Default `?near_max_bytes=`: the in-process bound of the near cache.
pub(crate) const DEFAULT_NEAR_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default `?max_lag_ms=` of `near=tracking`.
pub(crate) const DEFAULT_MAX_LAG: Duration = Duration::from_millis(100);

/// The largest `?max_lag_ms=`.
const MAX_LAG_LIMIT: Duration = Duration::from_secs(60);

/// `?near=`: what a network backend also keeps in process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Near {
    /// Nothing: every read is one round trip carrying the value.
    Off,
    /// Entries and fragment bodies, by (key, version, server instance): a hit
    /// fetches the generations only.
    Entries,
    /// Entries, and generations kept coherent by Redis's client-side caching:
    /// a hit makes no round trip, and is at most `max_lag` behind a bump.
    Tracking { max_lag: Duration },
}

/// Which backend, with its own settings.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Memory {
        max_bytes: u64,
    },
    /// `none://`: no caching at all.
    Nothing,
    /// The URL handed to the redis crate (our own options removed).
    Redis {
        url: String,
        /// `?ca_file=`: PEM root certificate(s) to trust for `rediss://`.
        ca_file: Option<String>,
    },
    /// One server, or a pool routed by rendezvous hashing.
    Memcached {
        servers: Vec<String>,
        /// `?failover=`: does a pool move a down server's keys to the others
        /// (`move`, the default) or keep them where they are (`off`)?
        failover: bool,
    },
    /// `redis+cluster://` seed nodes, as `redis://[user:pass@]host:port` URLs.
    RedisCluster {
        nodes: Vec<String>,
    },
    /// `redis+sentinel://`: the master named `master`, found through these
    /// sentinels.
    RedisSentinel(Sentinel),
}

/// Everything a URL says.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) target: Target,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) pool_size: usize,
    /// `?near=` (network backends; `Off` in process, where it means nothing).
    pub(crate) near: Near,
    /// `?near_max_bytes=`.
    pub(crate) near_max_bytes: u64,
    /// `?strict=true` (with `near=tracking`): a bump returns only `max_lag`
    /// after the server applied it, so no reader trusts a table without it.
    pub(crate) strict: bool,
    /// `?fill=lease` (the default on network backends): who renders a miss
    /// across processes; `None` for `fill=local` and in process.
    pub(crate) lease: Option<Duration>,
    /// `?stale=render`: serve the previous body while another render
    /// holds the lease.
    pub(crate) stale_render: bool,
    /// `?salt=`: mixed into every block's key (a deploy salt).
    pub(crate) salt: Option<String>,
    /// The URL with any password replaced by `***`, for messages.
    pub(crate) redacted: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the redacted URL: the password must never reach a log.
        f.debug_struct("Config")
            .field("url", &self.redacted)
            .finish_non_exhaustive()
    }
}

/// Query options whose values may be shown in messages. Any other value
/// (an unknown option may well be `password=…`) is shown as `***`.
const HARMLESS: &[&str] = &[
    "prefix",
    "timeout_ms",
    "connect_timeout_ms",
    "pool_size",
    "max_bytes",
    "ca_file",
    "protocol",
    "failover",
    "near",
    "max_lag_ms",
    "near_max_bytes",
    "db",
    "user",
    "strict",
    "fill",
    "lease_ms",
    "stale",
];

/// The URL for messages, `Debug` and `url()`: the password and the value of
/// every query option not known to be harmless replaced by `***`.
pub(crate) fn redact(url: &Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        // Cannot fail for URLs that already have a password.
        let _ = u.set_password(Some("***"));
    } else if url.scheme().eq_ignore_ascii_case("redis+sentinel") && !url.username().is_empty() {
        // `redis+sentinel://secret@…`: the user part is the password.
        let _ = u.set_username("***");
    }
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if HARMLESS.contains(&&*k) {
                    v.into_owned()
                } else {
                    "***".to_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.set_query(None);
        if !pairs.is_empty() {
            u.query_pairs_mut().extend_pairs(pairs);
        }
    }
    u.to_string()
}

/// An option that takes one of two words: `true` for the first, `false` for
/// the second; anything else is an error naming the option and what it takes.
fn two_words(
    option: &str,
    v: &str,
    redacted: &str,
    [on, off]: [&str; 2],
    expected: &str,
) -> Result<bool> {
    match v {
        w if w == on => Ok(true),
        w if w == off => Ok(false),
        _ => Err(Error::config(format!(
            "option {option}={v:?} in {redacted}: expected {expected}"
        ))),
    }
}

fn parse_ms(name: &str, value: &str, redacted: &str) -> Result<Duration> {
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(Error::config(format!(
            "option {name}={value:?} in {redacted}: expected a whole number of milliseconds > 0"
        ))),
    }
}

/// Splits `scheme://[userinfo@]h1:p1,h2:p2/rest` into a URL with the first
/// host only (for the `url` crate, which takes one host) and the list of
/// `host:port` strings. URLs with a single host pass through untouched.
fn split_hosts(input: &str, default_port: u16) -> Result<(String, Vec<String>)> {
    let Some((scheme, rest)) = input.split_once("://") else {
        return Ok((input.to_string(), Vec::new()));
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    if !hosts.contains(',') {
        return Ok((input.to_string(), Vec::new()));
    }
    let mut list = Vec::new();
    for (i, h) in hosts.split(',').enumerate() {
        let h = h.trim();
        let (host, port) = if let Some(v6) = h.strip_prefix('[') {
            match v6.split_once(']') {
                Some((addr, p)) => (format!("[{addr}]"), p.strip_prefix(':')),
                None => {
                    return Err(Error::config(format!(
                        "server {} of {scheme}:// has an unclosed '[': {h:?}",
                        i + 1
                    )));
                }
            }
        } else {
            match h.rsplit_once(':') {
                Some((host, p)) => (host.to_string(), Some(p)),
                None => (h.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(Error::config(format!(
                "server {} of {scheme}:// has no host (in the list {hosts:?})",
                i + 1
            )));
        }
        let port = match port {
            None | Some("") => default_port,
            Some(p) => p.parse::<u16>().map_err(|_| {
                Error::config(format!(
                    "server {} of {scheme}:// has a bad port {p:?}; expected a number up to 65535",
                    i + 1
                ))
            })?,
        };
        list.push(format!("{host}:{port}"));
    }
    let first = list.first().cloned().unwrap_or_default();
    Ok((format!("{scheme}://{userinfo}{first}{tail}"), list))
}

/// The schemes we know.
const SCHEMES: &[&str] = &[
    "memory",
    "none",
    "redis",
    "rediss",
    "redis+unix",
    "memcached",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
];

/// Every scheme, for messages: one list wherever a scheme is expected.
fn expected_schemes() -> String {
    let all: Vec<String> = SCHEMES.iter().map(|s| format!("{s}://")).collect();
    match all.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => all.concat(),
    }
}

/// Which part of `input` the URL parser refused, named without echoing
/// anything that could be a password.
fn bad_part(e: url::ParseError, input: &str) -> String {
    use url::ParseError as P;
    // The authority's host and port: after the scheme and any userinfo.
    let authority = input
        .split_once("://")
        .map(|(_, rest)| &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())])
        .map(|a| a.rsplit_once('@').map_or(a, |(_, host)| host));
    match e {
        P::InvalidPort => {
            let port = authority
                .and_then(|a| a.rsplit_once(':'))
                .map(|(_, p)| p)
                .filter(|p| !p.contains(']'));
            match port {
                Some(p) => format!("the port {p:?} is not a number from 0 to 65535"),
                None => "the port is not a number from 0 to 65535".to_owned(),
            }
        }
        P::EmptyHost => "the host is empty".to_owned(),
        P::IdnaError
        | P::InvalidDomainCharacter
        | P::InvalidIpv4Address
        | P::InvalidIpv6Address => {
            let host = authority.map(|a| match a.strip_prefix('[') {
                Some(v6) => v6.split(']').next().unwrap_or(v6),
                None => a.rsplit_once(':').map_or(a, |(h, _)| h),
            });
            match host {
                Some(h) if !h.is_empty() => format!("the host {h:?} is not valid ({e})"),
                _ => format!("the host is not valid ({e})"),
            }
        }
        P::RelativeUrlWithoutBase => "it has no scheme (like redis://)".to_owned(),
        other => other.to_string(),
    }
}

/// The known scheme a mistyped one most likely meant (`memcache` →
/// `memcached`, `redis-cluster` → `redis+cluster`): within two edits.
fn closest_scheme(typed: &str) -> Option<&'static str> {
    fn distance(a: &str, b: &str) -> usize {
        // Levenshtein over bytes, one row at a time: the inputs are short.
        let b = b.as_bytes();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.bytes().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, &cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    SCHEMES
        .iter()
        .map(|s| (distance(typed, s), *s))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, s)| s)
}

/// Checks `?near=` and `?max_lag_ms=` against the backend; the default is
/// `entries` on network backends and nothing in process.
fn near_option(
    target: &Target,
    near: Option<Near>,
    max_lag: Option<Duration>,
    redacted: &str,
) -> Result<Near> {
    let in_process = matches!(target, Target::Memory { .. } | Target::Nothing);
    if in_process && near.is_some_and(|n| n != Near::Off) {
        return Err(Error::config(format!(
            "option near= in {redacted}: this cache is in process already; near= is for \
             redis://, rediss://, redis+unix://, redis+cluster:// and memcached://"
        )));
    }
    let near = near.unwrap_or(if in_process { Near::Off } else { Near::Entries });
    match (near, max_lag) {
        (Near::Tracking { .. }, Some(max_lag)) => Ok(Near::Tracking { max_lag }),
        (_, Some(_)) => Err(Error::config(format!(
            "option max_lag_ms= in {redacted} is for near=tracking, the only mode whose reads \
             can lag a bump"
        ))),
        (Near::Tracking { .. }, _) if matches!(target, Target::Memcached { .. }) => {
            Err(Error::config(format!(
                "option near=tracking in {redacted}: memcached cannot tell a client that a key \
                 changed (it has no client-side caching), so generations cannot be kept in \
                 process; use near=entries (the default)"
            )))
        }
        (Near::Tracking { .. }, _) if matches!(target, Target::RedisCluster { .. }) => {
            Err(Error::config(format!(
                "option near=tracking in {redacted}: tracking needs a single Redis node \
                 (redis:// or rediss://); on a cluster use near=entries (the default)"
            )))
        }
        (near, _) => Ok(near),
    }
}

impl Config {
    pub(crate) fn parse(input: &str) -> Result<Config> {
        let input = input.trim();
        let lower = input.to_ascii_lowercase();
        let (input, hosts) = if lower.starts_with("memcached://") {
            split_hosts(input, 11211)?
        } else if lower.starts_with("redis+cluster://") || lower.starts_with("rediss+cluster://") {
            split_hosts(input, 6379)?
        } else if lower.starts_with("redis+sentinel://") {
            split_hosts(input, 26379)?
        } else {
            (input.to_string(), Vec::new())
        };
        let url = Url::parse(&input).map_err(|e| {
            // The input may hold a password: never echo it back, only the
            // part that is wrong.
            Error::config(format!(
                "cache URL does not parse: {}; expected {}",
                bad_part(e, &input),
                expected_schemes()
            ))
        })?;
        let mut redacted = redact(&url);
        if hosts.len() > 1 {
            redacted = redacted.replacen(&hosts[0], &hosts.join(","), 1);
        }
        let scheme = url.scheme().to_ascii_lowercase();

        let mut prefix = String::new();
        let mut timeout = DEFAULT_TIMEOUT;
        let mut connect_timeout = DEFAULT_CONNECT_TIMEOUT;
        let mut pool_size = DEFAULT_POOL_SIZE;
        let mut max_bytes = DEFAULT_MAX_BYTES;
        let mut passthrough: Vec<(String, String)> = Vec::new();
        let mut ca_file = None;
        let mut failover = None;
        let mut near = None;
        let mut max_lag = None;
        let mut near_max_bytes = DEFAULT_NEAR_MAX_BYTES;
        let mut near_max_bytes_given = false;
        let mut strict = None;
        let mut fill = None;
        let mut lease_ms = None;
        let mut stale = None;
        let mut salt = None;

        for (k, v) in url.query_pairs() {
            match &*k {
                "prefix" => prefix = key_prefix(&v),
                "salt" => {
                    if v.is_empty() {
                        return Err(Error::config(format!(
                            "option salt= in {redacted} is empty; expected any non-empty string \
                             (e.g. the deploy's id), or no salt= at all"
                        )));
                    }
                    salt = Some(v.into_owned());
                }
                "timeout_ms" => timeout = parse_ms("timeout_ms", &v, &redacted)?,
                "connect_timeout_ms" => {
                    connect_timeout = parse_ms("connect_timeout_ms", &v, &redacted)?
                }
                "pool_size" => {
                    pool_size = match v.parse::<usize>() {
                        Ok(n) if (1..=1024).contains(&n) => n,
                        _ => {
                            return Err(Error::config(format!(
                                "option pool_size={v:?} in {redacted}: expected a number from 1 to 1024"
                            )));
                        }
                    }
                }
                "max_bytes" if scheme == "memory" => {
                    max_bytes = match v.parse::<u64>() {
                        Ok(n) if n >= 1024 => n,
                        _ => {
                            return Err(Error::config(format!(
                                "option max_bytes={v:?} in {redacted}: expected a number of bytes >= 1024"
                            )));
                        }
                    }
                }
                "ca_file" if scheme == "rediss" => ca_file = Some(v.into_owned()),
                "failover" if scheme == "memcached" => {
                    failover = Some(two_words(
                        "failover",
                        &v,
                        &redacted,
                        ["move", "off"],
                        "move or off",
                    )?)
                }
                "near" => {
                    near = Some(match &*v {
                        "entries" => Near::Entries,
                        "tracking" => Near::Tracking {
                            max_lag: DEFAULT_MAX_LAG,
                        },
                        "off" => Near::Off,
                        _ => {
                            return Err(Error::config(format!(
                                "option near={v:?} in {redacted}: expected entries (the default), tracking or off"
                            )));
                        }
                    })
                }
                "max_lag_ms" => {
                    let lag = parse_ms("max_lag_ms", &v, &redacted)?;
                    if lag > MAX_LAG_LIMIT {
                        return Err(Error::config(format!(
                            "option max_lag_ms={v:?} in {redacted}: expected at most 60000 (a minute)"
                        )));
                    }
                    max_lag = Some(lag);
                }
                "near_max_bytes" => {
                    near_max_bytes_given = true;
                    near_max_bytes = match v.parse::<u64>() {
                        Ok(n) if n >= 1024 => n,
                        _ => {
                            return Err(Error::config(format!(
                                "option near_max_bytes={v:?} in {redacted}: expected a number of bytes >= 1024"
                            )));
                        }
                    }
                }
                "fill" => {
                    fill = Some(two_words(
                        "fill",
                        &v,
                        &redacted,
                        ["lease", "local"],
                        "lease (the default) or local",
                    )?)
                }
                "lease_ms" => lease_ms = Some(parse_ms("lease_ms", &v, &redacted)?),
                "stale" => {
                    stale = Some(two_words(
                        "stale",
                        &v,
                        &redacted,
                        ["render", "off"],
                        "render or off (the default)",
                    )?)
                }
                "strict" => {
                    strict = Some(two_words(
                        "strict",
                        &v,
                        &redacted,
                        ["true", "false"],
                        "true or false",
                    )?)
                }
                "protocol" if matches!(scheme.as_str(), "redis" | "rediss" | "redis+unix") => {
                    passthrough.push((k.into_owned(), v.into_owned()))
                }
                // redis-rs's own options of a Unix socket URL (it has no
                // host for a database path or a user and password).
                "db" | "user" | "pass" if scheme == "redis+unix" => {
                    if &*k == "db" && v.parse::<u16>().is_err() {
                        return Err(Error::config(format!(
                            "option db={v:?} in {redacted}: expected a database number"
                        )));
                    }
                    passthrough.push((k.into_owned(), v.into_owned()))
                }
                other => {
                    return Err(Error::config(format!(
                        "unknown option {other:?} in {redacted}; known: prefix, salt, timeout_ms, connect_timeout_ms, pool_size{}",
                        match scheme.as_str() {
                            "memory" => ", max_bytes",
                            "redis+unix" => ", near, max_lag_ms, near_max_bytes, db, user, pass",
                            _ => ", near, max_lag_ms, near_max_bytes",
                        }
                    )));
                }
            }
        }

        let target = match scheme.as_str() {
            "memory" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) || !matches!(url.path(), "" | "/")
                {
                    return Err(Error::config(format!(
                        "memory:// takes no host or path (got {redacted}); use memory:// or memory://?max_bytes=N"
                    )));
                }
                Target::Memory { max_bytes }
            }
            "none" => Target::Nothing,
            "redis" | "rediss" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(Error::config(format!(
                        "missing host in {redacted}; expected redis://host:port/db"
                    )));
                }
                let path = url.path().trim_start_matches('/');
                if !path.is_empty() && path.parse::<u16>().is_err() {
                    return Err(Error::config(format!(
                        "database {path:?} in {redacted} is not a number; expected redis://host:port/0"
                    )));
                }
                match url.fragment() {
                    None => {}
                    Some("insecure") if scheme == "rediss" => {}
                    Some(f) => {
                        return Err(Error::config(format!(
                            "unknown URL fragment #{f} in {redacted}; only rediss://…#insecure is known"
                        )));
                    }
                }
                let mut clean = url.clone();
                clean.set_query(None);
                if !passthrough.is_empty() {
                    clean.query_pairs_mut().extend_pairs(passthrough.iter());
                }
                Target::Redis {
                    url: clean.to_string(),
                    ca_file,
                }
            }
            "redis+unix" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(Error::config(format!(
                        "redis+unix:// takes a socket path, not a host (got {redacted}); \
                         expected redis+unix:///path/to/redis.sock?db=0"
                    )));
                }
                if matches!(url.path(), "" | "/") {
                    return Err(Error::config(format!(
                        "missing socket path in {redacted}; expected redis+unix:///path/to/redis.sock?db=0"
                    )));
                }
                if url.username() != "" || url.password().is_some() || url.fragment().is_some() {
                    return Err(Error::config(format!(
                        "redis+unix:// takes its user and password as options (?user=…&pass=…), \
                         and no #fragment (in {redacted})"
                    )));
                }
                let mut clean = url.clone();
                clean.set_query(None);
                if !passthrough.is_empty() {
                    clean.query_pairs_mut().extend_pairs(passthrough.iter());
                }
                Target::Redis {
                    url: clean.to_string(),
                    ca_file: None,
                }
            }
            "memcached" => {
                if url.username() != "" || url.password().is_some() {
                    return Err(Error::config(format!(
                        "memcached:// does not take a user or password (in {redacted})"
                    )));
                }
                if !matches!(url.path(), "" | "/") {
                    return Err(Error::config(format!(
                        "memcached:// takes no path (got {:?} in {redacted})",
                        url.path()
                    )));
                }
                let host = url.host_str().unwrap_or_default();
                if host.is_empty() {
                    return Err(Error::config(format!(
                        "missing host in {redacted}; expected memcached://host:port"
                    )));
                }
                let port = url.port().unwrap_or(11211);
                let servers = if hosts.len() > 1 {
                    hosts
                } else {
                    vec![format!("{host}:{port}")]
                };
                if failover.is_some() && servers.len() < 2 {
                    return Err(Error::config(format!(
                        "option failover= in {redacted} is for a pool of several servers (memcached://h1,h2,…)"
                    )));
                }
                Target::Memcached {
                    servers,
                    failover: failover.unwrap_or(true),
                }
            }
            "redis+cluster" | "rediss+cluster" => {
                if !matches!(url.path(), "" | "/" | "/0") {
                    return Err(Error::config(format!(
                        "a Redis Cluster has only database 0 (got {:?} in {redacted})",
                        url.path()
                    )));
                }
                let base = if scheme == "rediss+cluster" {
                    "rediss"
                } else {
                    "redis"
                };
                let userinfo = match (url.username(), url.password()) {
                    ("", None) => String::new(),
                    (u, None) => format!("{u}@"),
                    (u, Some(p)) => format!("{u}:{p}@"),
                };
                let hosts = if hosts.is_empty() {
                    vec![format!(
                        "{}:{}",
                        url.host_str().unwrap_or_default(),
                        url.port().unwrap_or(6379)
                    )]
                } else {
                    hosts
                };
                let fragment = url.fragment().map(|f| format!("#{f}")).unwrap_or_default();
                Target::RedisCluster {
                    nodes: hosts
                        .iter()
                        .map(|h| format!("{base}://{userinfo}{h}{fragment}"))
                        .collect(),
                }
            }
            "redis+sentinel" => Target::RedisSentinel(sentinel_target(&url, hosts, &redacted)?),
            other => {
                let hint = closest_scheme(other)
                    .map(|s| format!(" (did you mean {s}://?)"))
                    .unwrap_or_default();
                return Err(Error::config(format!(
                    "unknown scheme {other:?} in {redacted}{hint}; expected {}",
                    expected_schemes()
                )));
            }
        };

        let near = near_option(&target, near, max_lag, &redacted)?;
        if near_max_bytes_given && near == Near::Off {
            return Err(Error::config(format!(
                "option near_max_bytes= in {redacted} bounds the near cache, which is off here \
                 (near=off, or an in-process cache)"
            )));
        }
        if strict == Some(true) && !matches!(near, Near::Tracking { .. }) {
            return Err(Error::config(format!(
                "option strict=true in {redacted} is for near=tracking (its bumps then wait \
                 max_lag_ms so that no reader still trusts a generation without them); every \
                 other mode is never stale already"
            )));
        }
        let (lease, stale_render) = fill_options(&target, fill, lease_ms, stale, &redacted)?;
        Ok(Config {
            target,
            prefix,
            timeout,
            connect_timeout,
            pool_size,
            near,
            near_max_bytes,
            strict: strict.unwrap_or(false),
            lease,
            stale_render,
            salt,
            redacted,
        })
    }
}

/// Default `?lease_ms=`: how long others wait for a lease holder's render.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_millis(3000);

/// The largest `?lease_ms=`: a render slower than this is not worth waiting
/// for.
const LEASE_LIMIT: Duration = Duration::from_secs(60);

/// Checks `?fill=`, `?lease_ms=` and `?stale=`: the lease (`None`: local
/// fills only) and whether `stale=render` is on.
fn fill_options(
    target: &Target,
    fill: Option<bool>,
    lease_ms: Option<Duration>,
    stale: Option<bool>,
    redacted: &str,
) -> Result<(Option<Duration>, bool)> {
    if matches!(target, Target::Memory { .. } | Target::Nothing) {
        if fill.is_some() || lease_ms.is_some() || stale.is_some() {
            return Err(Error::config(format!(
                "options fill=, lease_ms= and stale= in {redacted} are for caches shared by \
                 several processes (redis://, memcached://, …); in process, one render per \
                 miss is the default already"
            )));
        }
        return Ok((None, false));
    }
    if let Some(ms) = lease_ms
        && ms > LEASE_LIMIT
    {
        return Err(Error::config(format!(
            "option lease_ms={} in {redacted}: expected at most 60000 (a minute)",
            ms.as_millis()
        )));
    }
    let lease = match (fill.unwrap_or(true), lease_ms) {
        (true, ms) => Some(ms.unwrap_or(DEFAULT_LEASE)),
        (false, Some(_)) => {
            return Err(Error::config(format!(
                "option lease_ms= in {redacted} is for fill=lease (the default), not fill=local"
            )));
        }
        (false, None) => None,
    };
    let stale_render = stale.unwrap_or(false);
    if stale_render && lease.is_none() {
        return Err(Error::config(format!(
            "option stale=render in {redacted} needs fill=lease (the default): the lease is \
             what says another process is rendering the new version"
        )));
    }
    Ok((lease, stale_render))
}

/// `redis+sentinel://`'s settings: where to ask, for which master, and how
/// to log in to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sentinel {
    /// The sentinels, as `host:port`.
    pub(crate) sentinels: Vec<String>,
    /// The name the sentinels monitor the master under.
    pub(crate) master: String,
    /// The database on the master.
    pub(crate) db: u16,
    /// `user:password@` or `password@` as written (still percent-encoded),
    /// for the master and its replicas; the sentinels are asked without it.
    pub(crate) userinfo: String,
}

/// Parses `redis+sentinel://[password@]h1:p1,h2:p2/MASTER_NAME[/db]` (the
/// hosts already split off by [`split_hosts`]).
fn sentinel_target(url: &Url, hosts: Vec<String>, redacted: &str) -> Result<Sentinel> {
    let sentinels = if hosts.is_empty() {
        let host = url.host_str().unwrap_or_default();
        if host.is_empty() {
            return Err(Error::config(format!(
                "missing sentinel host in {redacted}; expected \
                 redis+sentinel://host1:26379,host2:26379/MASTER_NAME"
            )));
        }
        vec![format!("{host}:{}", url.port().unwrap_or(26379))]
    } else {
        hosts
    };
    let mut path = url.path().trim_start_matches('/').split('/');
    let master = path.next().unwrap_or_default();
    if master.is_empty() {
        return Err(Error::config(format!(
            "missing master name in {redacted}; expected redis+sentinel://host:26379/MASTER_NAME[/db]"
        )));
    }
    let master = percent_decode(master);
    let db = match path.next() {
        None | Some("") => 0,
        Some(db) => db.parse::<u16>().map_err(|_| {
            Error::config(format!(
                "database {db:?} in {redacted} is not a number; expected \
                 redis+sentinel://host:26379/MASTER_NAME/0"
            ))
        })?,
    };
    if let Some(extra) = path.next() {
        return Err(Error::config(format!(
            "unexpected path segment {extra:?} in {redacted}; expected \
             redis+sentinel://host:26379/MASTER_NAME[/db]"
        )));
    }
    if let Some(f) = url.fragment() {
        return Err(Error::config(format!(
            "unknown URL fragment #{f} in {redacted}; redis+sentinel:// takes none"
        )));
    }
    let userinfo = match (url.username(), url.password()) {
        ("", None) => String::new(),
        // `redis+sentinel://secret@h`: a password alone, as in redis://.
        (password, None) => format!(":{password}@"),
        (user, Some(password)) => format!("{user}:{password}@"),
    };
    Ok(Sentinel {
        sentinels,
        master,
        db,
        userinfo,
    })
}

/// `%41` → `A`; bytes that are not valid UTF-8 once decoded are kept as
/// written.
fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map_or_else(|| s.to_owned(), |(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        let e = Config::parse(url).expect_err(url);
        assert!(e.is_config(), "{e}");
        e.to_string()
    }

    #[test]
    fn memory_defaults() {
        let c = Config::parse("memory://").expect("parses");
        assert!(
            c.target
                == Target::Memory {
                    max_bytes: DEFAULT_MAX_BYTES
                }
        );
        assert_eq!(c.prefix, "");
        let c = Config::parse("memory://?max_bytes=2048&prefix=a").expect("parses");
        assert!(c.target == Target::Memory { max_bytes: 2048 });
    }

    #[test]
    fn redis_options_are_taken_out() {
        let c = Config::parse("redis://u:secret@127.0.0.1:6380/3?prefix=shop&timeout_ms=50")
            .expect("parses");
        assert_eq!(c.prefix, "shop");
        assert_eq!(c.timeout, Duration::from_millis(50));
        assert!(
            c.target
                == Target::Redis {
                    url: "redis://u:secret@127.0.0.1:6380/3".into(),
                    ca_file: None,
                }
        );
        assert!(!format!("{c:?}").contains("secret"));
        assert!(c.redacted.contains("***"));
    }

    #[test]
    fn several_servers() {
        let c = Config::parse("memcached://a:1,b:2,[::1]:3,c?prefix=x").expect("parses");
        assert!(
            c.target
                == Target::Memcached {
                    servers: vec![
                        "a:1".into(),
                        "b:2".into(),
                        "[::1]:3".into(),
                        "c:11211".into()
                    ],
                    failover: true,
                }
        );
        assert_eq!(c.prefix, "x");
        let c = Config::parse("redis+cluster://u:pw@h1:7000,h2:7001").expect("parses");
        assert!(
            c.target
                == Target::RedisCluster {
                    nodes: vec!["redis://u:pw@h1:7000".into(), "redis://u:pw@h2:7001".into()]
                }
        );
        assert!(!format!("{c:?}").contains("pw"));
        assert!(err("memcached://a:1,:2").contains("server 2"));
        assert!(err("memcached://a:1,b:x").contains("bad port"));
        let off = Config::parse("memcached://a:1,b:2?failover=off").expect("parses");
        assert!(matches!(
            off.target,
            Target::Memcached {
                failover: false,
                ..
            }
        ));
        assert!(err("memcached://a:1,b:2?failover=maybe").contains("failover"));
        assert!(err("memcached://a:1?failover=off").contains("pool"));
        assert!(err("redis+cluster://a:1,b:2/3").contains("database 0"));
    }

    #[test]
    fn bad_urls_name_the_bad_part() {
        assert!(err("nope://x").contains("\"nope\""));
        assert!(err("memcache://h:11211").contains("did you mean memcached://"));
        assert!(err("redis-cluster://h:1").contains("did you mean redis+cluster://"));
        assert!(err("reddis://h").contains("did you mean redis://"));
        assert!(!err("postgres://h").contains("did you mean"));
        assert!(err("redis://h/abc").contains("\"abc\""));
        assert_eq!(
            Config::parse("redis://h?prefix=a b")
                .expect("any prefix")
                .prefix,
            crate::keys::key_prefix("a b")
        );
        assert_eq!(
            Config::parse("redis://h?prefix=myapp:prod")
                .expect("colons")
                .prefix,
            "myapp:prod"
        );
        assert!(err("redis://h?timeout_ms=0").contains("timeout_ms"));
        assert!(err("redis://h?colour=red").contains("colour"));
        assert!(err("memory://?max_bytes=x").contains("max_bytes"));
        assert!(err("memory://host").contains("no host"));
        assert!(err("memcached://").contains("missing host"));
        assert!(err("memcached://u:p@h").contains("user"));
        let e = err("redis://:pw@/");
        assert!(
            e.contains("missing host") || e.contains("does not parse"),
            "{e}"
        );
        assert!(!e.contains("pw"), "{e}");
        assert!(err("not a url").contains("does not parse"));
        assert!(!err("redis://u:hunter2@h?x=1").contains("hunter2"));
        assert!(!err("redis://u:hunter2@h/abc").contains("hunter2"));
        // Secrets in the query string: never echoed.
        let e = err("redis://h:6379/0?password=hunter2");
        assert!(e.contains("password") && !e.contains("hunter2"), "{e}");
        let e = err("redis://h:6379/0?prefix=shop&token=hunter2&timeout_ms=x");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err("memcached://a:1,b:2?auth=hunter2");
        assert!(!e.contains("hunter2"), "{e}");
    }

    /// A URL that does not parse names the part that is wrong (never the
    /// password), and every error that lists schemes lists all of them.
    #[test]
    fn parse_errors_name_the_part_and_list_every_scheme() {
        let e = err("redis://127.0.0.1:abc");
        assert!(e.contains("the port \"abc\""), "{e}");
        let e = err("redis://user:s3cret@127.0.0.1:99999/0");
        assert!(e.contains("the port \"99999\""), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let e = err("memcached://[::1/");
        assert!(e.contains("host"), "{e}");
        let e = err("not a url");
        assert!(e.contains("no scheme"), "{e}");
        let unknown = err("redsi://127.0.0.1");
        for scheme in SCHEMES {
            let listed = format!("{scheme}://");
            assert!(e.contains(&listed), "{listed} missing from: {e}");
            assert!(
                unknown.contains(&listed),
                "{listed} missing from: {unknown}"
            );
        }
    }

    #[test]
    fn sentinel_urls() {
        let c = Config::parse("redis+sentinel://s3cret@a:1,b:2,c/mymaster/3?near=tracking")
            .expect("parses");
        assert!(
            c.target
                == Target::RedisSentinel(Sentinel {
                    sentinels: vec!["a:1".into(), "b:2".into(), "c:26379".into()],
                    master: "mymaster".into(),
                    db: 3,
                    userinfo: ":s3cret@".into(),
                })
        );
        assert!(matches!(c.near, Near::Tracking { .. }));
        assert!(!c.redacted.contains("s3cret"), "{}", c.redacted);
        assert!(c.redacted.contains("a:1,b:2,c:26379"), "{}", c.redacted);
        let one = Config::parse("redis+sentinel://h/m").expect("parses");
        assert!(
            matches!(&one.target, Target::RedisSentinel(s) if s.sentinels == ["h:26379"] && s.db == 0)
        );
        assert!(err("redis+sentinel://h:26379").contains("master name"));
        assert!(err("redis+sentinel://h:26379/").contains("master name"));
        assert!(err("redis+sentinel://h:26379/m/x").contains("\"x\""));
        assert!(err("redis+sentinel://h:26379/m/0/extra").contains("extra"));
        assert!(err("redis+sentinel://a:1,b:x/m").contains("bad port"));
        assert!(err("redis-sentinel://h/m").contains("did you mean redis+sentinel://"));
    }

    #[test]
    fn strict_is_for_tracking() {
        let c = Config::parse("redis://h?near=tracking&strict=true&max_lag_ms=20").expect("parses");
        assert!(c.strict);
        assert!(c.redacted.contains("strict=true"), "{}", c.redacted);
        assert!(
            !Config::parse("redis://h?near=tracking&strict=false")
                .expect("parses")
                .strict
        );
        assert!(
            !Config::parse("redis://h?near=tracking")
                .expect("parses")
                .strict
        );
        assert!(err("redis://h?strict=true").contains("near=tracking"));
        assert!(err("memory://?strict=true").contains("strict"));
        assert!(err("redis://h?near=tracking&strict=yes").contains("strict=\"yes\""));
    }

    #[test]
    fn fill_options() {
        let c = Config::parse("redis://h").expect("parses");
        assert_eq!(c.lease, Some(DEFAULT_LEASE));
        assert!(!c.stale_render);
        let c = Config::parse("memcached://h?lease_ms=500&stale=render").expect("parses");
        assert_eq!(c.lease, Some(Duration::from_millis(500)));
        assert!(c.stale_render);
        assert!(c.redacted.contains("lease_ms=500"), "{}", c.redacted);
        assert_eq!(
            Config::parse("redis://h?fill=local").expect("parses").lease,
            None
        );
        assert_eq!(Config::parse("memory://").expect("parses").lease, None);
        assert!(err("redis://h?lease_ms=0").contains("lease_ms"));
        assert!(err("redis://h?lease_ms=x").contains("lease_ms"));
        assert!(err("redis://h?lease_ms=60001").contains("lease_ms"));
        assert!(err("redis://h?fill=local&lease_ms=100").contains("lease_ms"));
        assert!(err("redis://h?fill=maybe").contains("fill=\"maybe\""));
        assert!(err("redis://h?fill=local&stale=render").contains("stale=render"));
        assert!(err("redis://h?stale=yes").contains("stale=\"yes\""));
        assert!(err("memory://?fill=lease").contains("fill="));
    }
}
