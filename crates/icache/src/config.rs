//! Parsing a cache URL into backend settings.

use std::fmt;
use std::time::Duration;

use url::Url;

use crate::error::{Error, Result};
use crate::keys::validate_prefix;

/// Default bound of the memory backend.
pub(crate) const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default time-out for one answer from a network backend. Small on purpose:
/// a cache that answers slower than this is slower than rendering.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// Default time-out for opening a connection.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(100);
/// Default number of idle connections kept per server.
pub(crate) const DEFAULT_POOL_SIZE: usize = 8;

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
    Memcached {
        servers: Vec<String>,
    },
}

/// Everything a URL says.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Config {
    pub(crate) target: Target,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) pool_size: usize,
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

pub(crate) fn redact(url: &Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        // Cannot fail for URLs that already have a password.
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

fn parse_ms(name: &str, value: &str, redacted: &str) -> Result<Duration> {
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(Error::config(format!(
            "option {name}={value:?} in {redacted}: expected a whole number of milliseconds > 0"
        ))),
    }
}

impl Config {
    pub(crate) fn parse(input: &str) -> Result<Config> {
        let url = Url::parse(input.trim()).map_err(|e| {
            // The input may hold a password: never echo it back.
            Error::config(format!(
                "cache URL does not parse ({e}); expected memory://, redis://, rediss:// or memcached://"
            ))
        })?;
        let redacted = redact(&url);
        let scheme = url.scheme().to_ascii_lowercase();

        let mut prefix = String::new();
        let mut timeout = DEFAULT_TIMEOUT;
        let mut connect_timeout = DEFAULT_CONNECT_TIMEOUT;
        let mut pool_size = DEFAULT_POOL_SIZE;
        let mut max_bytes = DEFAULT_MAX_BYTES;
        let mut passthrough: Vec<(String, String)> = Vec::new();
        let mut ca_file = None;

        for (k, v) in url.query_pairs() {
            match &*k {
                "prefix" => {
                    validate_prefix(&v)
                        .map_err(|m| Error::config(format!("{m} (in {redacted})")))?;
                    prefix = v.into_owned();
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
                "protocol" if scheme.starts_with("redis") => {
                    passthrough.push((k.into_owned(), v.into_owned()))
                }
                other => {
                    return Err(Error::config(format!(
                        "unknown option {other:?} in {redacted}; known: prefix, timeout_ms, connect_timeout_ms, pool_size{}",
                        if scheme == "memory" {
                            ", max_bytes"
                        } else {
                            ""
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
                Target::Memcached {
                    servers: vec![format!("{host}:{port}")],
                }
            }
            other => {
                return Err(Error::config(format!(
                    "unknown scheme {other:?} in {redacted}; expected memory://, redis://, rediss://, memcached:// or none://"
                )));
            }
        };

        Ok(Config {
            target,
            prefix,
            timeout,
            connect_timeout,
            pool_size,
            redacted,
        })
    }
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
    fn bad_urls_name_the_bad_part() {
        assert!(err("nope://x").contains("\"nope\""));
        assert!(err("redis://h/abc").contains("\"abc\""));
        assert!(err("redis://h?prefix=a b").contains("prefix"));
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
    }
}
