//! Redis Sentinel (`redis+sentinel://[password@]h1:p1,h2:p2/MASTER_NAME[/db]`):
//! the single-node backend, whose connections go to whichever server the
//! sentinels name as the master right now.
//!
//! Every new connection asks the sentinels (`SENTINEL
//! get-master-addr-by-name`, the one that answered last first) and then
//! checks with `ROLE` that the server it reached is a master (the sentinels'
//! client protocol: during a failover a sentinel may still name the old
//! one). After a failover the old master's connections fail (it died, or
//! Sentinel's `CLIENT KILL TYPE normal` cut them when it demoted it; a write
//! that reaches a demoted master answers `READONLY`, which drops the
//! connection too), and the pool opens new ones on the new master.
//!
//! What makes a failover safe is the server instance check every Redis
//! connection already does (see the [backend docs](crate::backend)): the new
//! master has another `run_id`, so every versioned entry the old one stored,
//! replicated or not, is a miss there, even if the promoted replica lagged
//! and its generations went back to values those entries match. Blocks are
//! rendered and stored again on the new master.
//!
//! Why not redis-rs's `sentinel` module: its sync `Sentinel` opens the
//! sentinel and master connections without any time-out (a hung sentinel
//! would hang a page render, against our bounded waits), keeps one cached
//! connection per sentinel behind `&mut self`, and hands back a `Client`
//! that would still need the `ROLE` check on our own connection. The
//! protocol itself is two commands.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::Value;

use super::cluster::join_host_port;
use crate::config;
use crate::error::{Error, ErrorKind, Result};

/// Finds the master of one sentinel-monitored group.
pub(crate) struct Sentinel {
    settings: config::Sentinel,
    connect_timeout: Duration,
    timeout: Duration,
    /// The URL, password redacted, for messages.
    redacted: String,
    /// The sentinel that answered last: asked first next time.
    first: AtomicUsize,
    /// `host:port` of the master found last, for messages.
    last: Mutex<Option<String>>,
}

impl std::fmt::Debug for Sentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinel")
            .field("url", &self.redacted)
            .finish_non_exhaustive()
    }
}

impl Sentinel {
    pub(crate) fn new(settings: &config::Sentinel, config: &config::Config) -> Sentinel {
        Sentinel {
            settings: settings.clone(),
            connect_timeout: config.connect_timeout,
            timeout: config.timeout,
            redacted: config.redacted.clone(),
            first: AtomicUsize::new(0),
            last: Mutex::new(None),
        }
    }

    /// A placeholder URL for the node client (never connected to: every
    /// connection goes through [`connect`](Self::connect)).
    pub(crate) fn placeholder_url(&self) -> String {
        let first = self
            .settings
            .sentinels
            .first()
            .map_or("127.0.0.1:26379", String::as_str);
        format!(
            "redis://{}{first}/{}",
            self.settings.userinfo, self.settings.db
        )
    }

    /// `host:port` of the master found last, or of the first sentinel.
    pub(crate) fn last_master(&self) -> String {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| format!("the master {:?}", self.settings.master))
    }

    /// A connection to the current master (RESP3 for the `near=tracking`
    /// connection), with our time-outs, checked with `ROLE`.
    pub(crate) fn connect(&self, resp3: bool) -> Result<redis::Connection> {
        let (host, port) = self.locate()?;
        let addr = join_host_port(&host, port);
        let url = format!(
            "redis://{}{addr}/{}{}",
            self.settings.userinfo,
            self.settings.db,
            if resp3 { "?protocol=resp3" } else { "" }
        );
        let fail = |what: &str, e: redis::RedisError| {
            let kind = if e.is_timeout() {
                ErrorKind::Timeout
            } else {
                ErrorKind::Unavailable
            };
            Error::new(
                kind,
                format!(
                    "{}: {what} the master {:?} at {addr} (named by the sentinels): {e}",
                    self.redacted, self.settings.master
                ),
            )
        };
        let client = redis::Client::open(url).map_err(|e| fail("cannot address", e))?;
        let mut con = client
            .get_connection_with_timeout(self.connect_timeout)
            .map_err(|e| fail("cannot connect to", e))?;
        con.set_read_timeout(Some(self.timeout))
            .and_then(|()| con.set_write_timeout(Some(self.timeout)))
            .map_err(|e| fail("cannot set time-outs on", e))?;
        let role: Value = redis::cmd("ROLE")
            .query(&mut con)
            .map_err(|e| fail("ROLE failed on", e))?;
        if !is_master(&role) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{}: {addr}, named by the sentinels as the master {:?}, is not a master \
                     (a failover is under way); retried on the next call",
                    self.redacted, self.settings.master
                ),
            ));
        }
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(addr);
        Ok(con)
    }

    /// Asks the sentinels in turn for the master's address.
    fn locate(&self) -> Result<(String, u16)> {
        let sentinels = &self.settings.sentinels;
        let start = self.first.load(Ordering::Relaxed);
        let mut why = Vec::new();
        for i in 0..sentinels.len() {
            let idx = (start + i) % sentinels.len();
            let addr = &sentinels[idx];
            match self.ask(addr) {
                Ok(Some(found)) => {
                    self.first.store(idx, Ordering::Relaxed);
                    return Ok(found);
                }
                Ok(None) => why.push(format!("{addr}: knows no master by that name")),
                Err(e) => why.push(format!("{addr}: {e}")),
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "{}: no sentinel named the master {:?} ({})",
                self.redacted,
                self.settings.master,
                why.join("; ")
            ),
        ))
    }

    fn ask(&self, addr: &str) -> redis::RedisResult<Option<(String, u16)>> {
        let client = redis::Client::open(format!("redis://{addr}"))?;
        let mut con = client.get_connection_with_timeout(self.connect_timeout)?;
        con.set_read_timeout(Some(self.timeout))?;
        con.set_write_timeout(Some(self.timeout))?;
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.settings.master)
            .query(&mut con)
    }
}

/// Is this `ROLE` answer a master's?
pub(crate) fn is_master(role: &Value) -> bool {
    let Value::Array(items) = role else {
        return false;
    };
    match items.first() {
        Some(Value::BulkString(b)) => b == b"master",
        Some(Value::SimpleString(s)) => s == "master",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_answers() {
        let master = Value::Array(vec![
            Value::BulkString(b"master".to_vec()),
            Value::Int(10),
            Value::Array(vec![]),
        ]);
        assert!(is_master(&master));
        let replica = Value::Array(vec![Value::BulkString(b"slave".to_vec())]);
        assert!(!is_master(&replica));
        assert!(!is_master(&Value::Nil));
    }

    /// No sentinel answers: an `Unavailable` error naming each one, within
    /// the connect time-out, not a hang.
    #[test]
    fn no_sentinel_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let cache = crate::ICache::from_url(&format!(
            "redis+sentinel://127.0.0.1:{port}/mymaster?connect_timeout_ms=200"
        ))
        .expect("opens without connecting");
        let err = cache.ping().expect_err("no sentinel listens there");
        assert!(err.is_unavailable(), "{err}");
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }
}
