//! A Redis Sentinel group: one master, one replica and three sentinels
//! (`redis-server <config> --sentinel`), all on free loopback ports, killed on
//! drop.
//!
//! The replica replicates through a [`Proxy`], so a test can make it lag
//! ([`replication_link`](RedisSentinel::replication_link)`.pause()`) before it
//! kills the master and lets the sentinels promote the replica: the failover
//! to a replica that missed writes, which icache must turn into misses.
//!
//! Timings are shortened for tests: the master is "down" after 1 s without
//! an answer (shorter makes a loaded machine fail over by itself), a
//! failover may take 3 s before it is retried.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{Kind, Proxy, ServerProcess, TempDir, find_on_path, free_port, loopback, require};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "mymaster";

/// How long the sentinels take to agree on the group at start, at most.
const SETTLE: Duration = Duration::from_secs(20);

/// One master, one replica (replicating through a proxy), three sentinels.
pub struct RedisSentinel {
    // Sentinels first: they drop (are killed) before the servers, so none
    // starts a failover while the group shuts down.
    sentinels: Vec<SentinelProcess>,
    master: ServerProcess,
    replica: ServerProcess,
    link: Proxy,
}

struct SentinelProcess {
    port: u16,
    child: Child,
    dir: TempDir,
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisSentinel {
    /// Starts the group and waits until every sentinel knows the replica and
    /// the two other sentinels (so a failover can be voted). `None` if
    /// `redis-server` is not installed (outside CI).
    pub fn start() -> Option<RedisSentinel> {
        if !require("redis-server") {
            return None;
        }
        let program = find_on_path("redis-server")?;
        // Diskless full syncs at once: the replica is in sync within
        // milliseconds instead of the default 5 s delay.
        let master = ServerProcess::started(
            Kind::Redis,
            program.clone(),
            &["--repl-diskless-sync-delay", "0"],
            TempDir::new("sentinel-master"),
        );
        let link = Proxy::start(master.port);
        let upstream = link.port().to_string();
        let replica = ServerProcess::started(
            Kind::Redis,
            program.clone(),
            &[
                "--replicaof",
                "127.0.0.1",
                &upstream,
                "--repl-diskless-sync-delay",
                "0",
            ],
            TempDir::new("sentinel-replica"),
        );
        let mut group = RedisSentinel {
            sentinels: Vec::new(),
            master,
            replica,
            link,
        };
        group.wait_until("the replica is in sync", SETTLE, |g| {
            info_field(g.replica.port, "replication", "master_link_status").as_deref() == Some("up")
        });
        for _ in 0..3 {
            let sentinel = spawn_sentinel(&program, group.master.port);
            group.sentinels.push(sentinel);
        }
        group.wait_until(
            "the sentinels know each other and the replica",
            SETTLE,
            |g| {
                g.sentinels.iter().all(|s| {
                    let Ok(Reply::Array(fields)) =
                        command(s.port, &["SENTINEL", "MASTER", MASTER_NAME])
                    else {
                        return false;
                    };
                    let field = |name: &str| {
                        fields
                            .chunks(2)
                            .find(|kv| kv[0].text() == Some(name))
                            .and_then(|kv| kv.get(1).and_then(Reply::text).map(str::to_owned))
                    };
                    field("num-slaves").as_deref() == Some("1")
                        && field("num-other-sentinels").as_deref() == Some("2")
                })
            },
        );
        Some(group)
    }

    /// `redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The ports of the sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The port of the first master.
    pub fn master_port(&self) -> u16 {
        self.master.port
    }

    /// The port of the replica (the master after a failover).
    pub fn replica_port(&self) -> u16 {
        self.replica.port
    }

    /// The proxy the replica replicates through: `pause()` it to make the
    /// replica lag, `set_fault(Fault::Refuse)` to cut it off.
    pub fn replication_link(&self) -> &Proxy {
        &self.link
    }

    /// Waits until the replica has everything the master has (`WAIT 1`);
    /// panics after 5 s.
    pub fn wait_replicated(&self) {
        match command(self.master.port, &["WAIT", "1", "5000"]) {
            Ok(Reply::Int(n)) if n >= 1 => {}
            other => panic!(
                "the replica did not acknowledge the master's writes within 5 s: {other:?}\n{}",
                self.logs()
            ),
        }
    }

    /// Is the first master still the master (no failover happened)?
    /// A test that relies on the replica's link must check this: on a
    /// loaded machine the sentinels may fail over by themselves.
    pub fn original_master_serves(&self) -> bool {
        info_field(self.master.port, "replication", "role").as_deref() == Some("master")
            && self.sentinels.iter().all(|s| {
                matches!(
                    command(s.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]),
                    Ok(Reply::Array(a)) if a.get(1).and_then(Reply::text) == Some(&self.master.port.to_string())
                )
            })
    }

    /// Kills the master with SIGKILL.
    pub fn kill_master(&mut self) {
        self.master.stop();
    }

    /// Waits until every sentinel names the replica as the master and the
    /// replica says it is one; panics (with the sentinels' logs) after
    /// `timeout`. Returns how long the failover took from the call.
    pub fn wait_for_failover(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        let want = self.replica.port;
        self.wait_until("the sentinels promote the replica", timeout, |g| {
            let named = g.sentinels.iter().all(|s| {
                matches!(
                    command(s.port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME]),
                    Ok(Reply::Array(a)) if a.get(1).and_then(Reply::text) == Some(&want.to_string())
                )
            });
            named && info_field(want, "replication", "role").as_deref() == Some("master")
        });
        started.elapsed()
    }

    fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() >= deadline {
                panic!(
                    "Sentinel group: {what}: not after {timeout:?}\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The sentinels' logs, for failure messages.
    fn logs(&self) -> String {
        let mut text = String::new();
        for s in &self.sentinels {
            let log = s.dir.path().join("sentinel.log");
            text.push_str(&format!(
                "--- sentinel {} ({}) ---\n{}",
                s.port,
                log.display(),
                super::log_excerpt(&log, 0)
            ));
        }
        text
    }
}

fn spawn_sentinel(program: &std::path::Path, master_port: u16) -> SentinelProcess {
    let dir = TempDir::new("sentinel");
    for _ in 0..super::START_ATTEMPTS {
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n\
             dir {dir}\nlogfile {log}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 3000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            dir = dir.path().display(),
            log = dir.path().join("sentinel.log").display(),
        );
        if let Err(e) = fs::write(&conf, text) {
            panic!("cannot write {}: {e}", conf.display());
        }
        let child = Command::new(program)
            .arg(&conf)
            .arg("--sentinel")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot spawn `{} {} --sentinel`: {e}",
                program.display(),
                conf.display()
            ),
        };
        let deadline = Instant::now() + super::READY_TIMEOUT;
        loop {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break; // lost a port race: try another port
            }
            if matches!(command(port, &["PING"]), Ok(Reply::Status(ref s)) if s == "PONG") {
                return SentinelProcess { port, child, dir };
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    panic!(
        "redis-server --sentinel did not come up in {} attempts:\n{}",
        super::START_ATTEMPTS,
        super::log_excerpt(&dir.path().join("sentinel.log"), 0)
    );
}

/// One field of `INFO section` on a server, if it answers.
fn info_field(port: u16, section: &str, field: &str) -> Option<String> {
    let Ok(Reply::Bulk(text)) = command(port, &["INFO", section]) else {
        return None;
    };
    text.lines()
        .find_map(|l| l.trim_end().strip_prefix(field)?.strip_prefix(':'))
        .map(str::to_owned)
}

/// A RESP reply, as far as these checks need one.
#[derive(Debug)]
enum Reply {
    Status(String),
    Int(i64),
    Bulk(String),
    Nil,
    Array(Vec<Reply>),
}

impl Reply {
    fn text(&self) -> Option<&str> {
        match self {
            Reply::Status(s) | Reply::Bulk(s) => Some(s),
            _ => None,
        }
    }
}

/// Sends one command to `127.0.0.1:port` and reads its reply (1 s time-outs).
fn command(port: u16, args: &[&str]) -> Result<Reply, String> {
    let stream = TcpStream::connect_timeout(&loopback(port), Duration::from_secs(1))
        .map_err(|e| format!("connect to {port}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(1))))
        .map_err(|e| format!("time-outs: {e}"))?;
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    (&stream)
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    read_reply(&mut BufReader::new(stream))
}

fn read_reply(r: &mut BufReader<TcpStream>) -> Result<Reply, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    let line = line.trim_end();
    let (tag, rest) = line.split_at(line.len().min(1));
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| format!("bad reply line {line:?}"))
    };
    match tag {
        "+" => Ok(Reply::Status(rest.to_owned())),
        "-" => Err(format!("error reply: {rest}")),
        ":" => Ok(Reply::Int(number()?)),
        "$" => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Reply::Nil);
            };
            let mut buf = vec![0; len + 2];
            r.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
            buf.truncate(len);
            Ok(Reply::Bulk(String::from_utf8_lossy(&buf).into_owned()))
        }
        "*" => {
            let Ok(n) = usize::try_from(number()?) else {
                return Ok(Reply::Nil);
            };
            (0..n)
                .map(|_| read_reply(r))
                .collect::<Result<_, _>>()
                .map(Reply::Array)
        }
        _ => Err(format!("unexpected reply line {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The group comes up, and a killed master is replaced by the replica.
    #[test]
    fn fails_over_to_the_replica() {
        let Some(mut group) = RedisSentinel::start() else {
            return;
        };
        assert!(matches!(
            command(group.master_port(), &["SET", "k", "v"]),
            Ok(Reply::Status(_))
        ));
        group.wait_replicated();
        group.kill_master();
        let took = group.wait_for_failover(Duration::from_secs(30));
        assert!(
            matches!(command(group.replica_port(), &["GET", "k"]), Ok(Reply::Bulk(ref v)) if v == "v"),
            "the promoted replica has the data"
        );
        assert!(took < Duration::from_secs(30));
    }
}
