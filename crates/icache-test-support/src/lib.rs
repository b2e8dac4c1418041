//! Test support: real `redis-server` / `memcached` processes and a small TCP
//! proxy, for integration tests and benches.
//!
//! An unpublished crate: integration tests, benches, the benchmark report and
//! the chaos run depend on it (`use icache_test_support as support;`).
//!
//! # What it gives you
//!
//! * [`RedisServer`]: a plain-TCP `redis-server` (no persistence) in its own
//!   temporary directory.
//! * [`RedisTlsServer`]: a TLS-only `redis-server` with a freshly generated
//!   self-signed CA and a server certificate for `127.0.0.1` / `localhost`.
//! * [`RedisCluster`]: a Redis Cluster of N masters (no replicas), each a
//!   `redis-server` in cluster mode (no persistence), created with
//!   `redis-cli --cluster create`; single nodes can be killed and restarted.
//! * [`MemcachedServer`]: a `memcached` that accepts values of several MB.
//! * [`Proxy`]: a counting TCP proxy that injects faults on its path
//!   ([`Fault`]): refuse connections, hang (accept, never answer), or freeze
//!   (requests reach the server, answers never come back).
//! * [`SlowProxy`]: a proxy whose answers arrive a set delay late, in order
//!   (a slow link, throughput kept).
//! * [`RedisSentinel`]: one master, one replica (replicating through a
//!   [`Proxy`], so it can be made to lag) and three `redis-server --sentinel`;
//!   kill the master and wait for the failover.
//!
//! Every server and the proxy listen on a free port of `127.0.0.1` only (never
//! a fixed port, never another address). A port is found by binding
//! `127.0.0.1:0`; as that port could be taken by someone else before the
//! server binds it, a failed start is retried (up to 5 times) on a new port.
//! A Redis Cluster node also needs its cluster bus port, `P + 10000`, so its
//! port `P` is one where both are free (hence at most 55535).
//! A server that cannot be started panics with the content of its log files.
//!
//! `stop()` kills a server with SIGKILL (a crash, not a clean shutdown) and
//! `restart()` starts it again on the same port, with the same arguments and
//! directory (for a cluster node: `stop_node(i)` / `restart_node(i)`).
//! Servers keep no data on disk, so a restarted server is empty; a cluster
//! node keeps only its cluster configuration, so it keeps its slots.
//! Dropping a server kills it and removes its temporary directory.
//!
//! # Missing binaries
//!
//! The `start*()` constructors return `None` when a required binary
//! (`redis-server`, `memcached`, `openssl` for TLS, `redis-cli` for a
//! cluster) is not on `PATH`:
//!
//! * when the environment variable `CI` is `true` (or `1`) they **panic**
//!   instead, so a CI job without the servers fails rather than silently
//!   skipping the tests;
//! * otherwise they print a loud `SKIPPING: ... not installed; run
//!   scripts/test.sh to install it` message to stderr, and the test should
//!   return early:
//!
//! ```ignore
//! let Some(redis) = support::RedisServer::start() else { return };
//! ```
//!
//! [`RedisTlsServer::start`] also returns `None` (with a loud message, even in
//! CI) when the installed `redis-server` was built without TLS support.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod varnish;
pub use varnish::{VarnishServer, repo_vcl};
mod postgres;
pub use postgres::PostgresServer;
mod sentinel;
mod slow;
pub use sentinel::RedisSentinel;
pub use slow::SlowProxy;

/// How long a server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a start is tried (each time on a new port).
const START_ATTEMPTS: usize = 5;
/// How many times a restart on the same port is tried.
const RESTART_ATTEMPTS: usize = 5;
/// Log line `redis-server` writes once it listens.
const REDIS_READY_LINE: &str = "Ready to accept connections";

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// Returns the full path of `binary` if it is an executable file on `PATH`.
fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Whether we run in CI (`CI=true`, as set by GitHub Actions and most others).
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Prints `message` to stderr between two loud bars.
///
/// Written to the stderr handle rather than with `eprintln!`, which the test
/// harness captures (and only shows for failing tests): a skip must be seen.
fn shout(message: &str) {
    let bar = "!".repeat(78);
    let _ = write!(io::stderr().lock(), "\n{bar}\n!!! {message}\n{bar}\n\n");
}

/// Checks that `binary` is installed.
///
/// Returns `true` if it is on `PATH`. Otherwise panics when `CI` is `true`
/// (tests must fail in CI), or prints a loud SKIPPING message and returns
/// `false`.
fn require(binary: &str) -> bool {
    if find_on_path(binary).is_some() {
        return true;
    }
    if in_ci() {
        panic!(
            "{binary} is not installed (not found on PATH) and CI=true: tests \
             needing it must not be skipped in CI; run scripts/test.sh to install it"
        );
    }
    // Once per binary and process: loud, not a wall of identical messages.
    static WARNED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(PoisonError::into_inner);
    if !warned.iter().any(|b| b == binary) {
        warned.push(binary.to_owned());
        shout(&format!(
            "SKIPPING: {binary} not installed; run scripts/test.sh to install it \
             (tests needing it pass without testing anything)"
        ));
    }
    false
}

/// A free TCP port on 127.0.0.1 (free when this returns; see the module docs).
fn free_port() -> u16 {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local address of a listener bound to 127.0.0.1:0")
        .port()
}

/// A port `P` of 127.0.0.1 such that both `P` and its Redis Cluster bus port
/// `P + 10000` are free when this returns (so `P` is at most 55535).
fn free_cluster_port() -> u16 {
    const TRIES: usize = 1000;
    for _ in 0..TRIES {
        // Kept bound while the bus port is tried.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("bind 127.0.0.1:0 to find a free port");
        let port = listener
            .local_addr()
            .expect("local address of a listener bound to 127.0.0.1:0")
            .port();
        let Some(bus_port) = port.checked_add(CLUSTER_BUS_PORT_OFFSET) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, bus_port)).is_ok() {
            return port;
        }
    }
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| String::from("unknown"));
    panic!(
        "no port P of 127.0.0.1 with P and P + {CLUSTER_BUS_PORT_OFFSET} both free in {TRIES} \
         tries (ephemeral port range: {}); Redis Cluster needs both",
        range.trim()
    );
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Length of a file, 0 if it does not exist (yet).
fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Content of a file from byte `from` on, lossily decoded, for messages.
fn read_from(path: &Path, from: u64) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
            String::from_utf8_lossy(&bytes[from..]).into_owned()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::from("<no such file>\n"),
        Err(e) => format!("<cannot read {}: {e}>\n", path.display()),
    }
}

/// Content of a whole log file, for failure messages (the tail if huge).
fn log_excerpt(path: &Path, from: u64) -> String {
    const MAX: usize = 64 * 1024;
    let text = read_from(path, from);
    if text.len() <= MAX {
        return text;
    }
    let mut start = text.len() - MAX;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("<... truncated ...>\n{}", &text[start..])
}

/// A directory under [`std::env::temp_dir`], removed on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new(kind: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        fs::create_dir_all(&base).expect("create the system temporary directory");
        loop {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = base.join(format!(
                "icache-test-{kind}-{}-{}-{nanos}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
            ));
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create temporary directory {}: {e}", path.display()),
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Generic server process management
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Redis,
    RedisTls,
    /// A `redis-server` node of a [`RedisCluster`] (cluster mode, its
    /// `nodes-PORT.conf` in its directory, bus port = port + 10000).
    RedisClusterNode,
    Memcached,
}

/// Why a start attempt failed.
enum StartError {
    /// Did not come up (maybe a port race): try again.
    Failed(String),
    /// `redis-server` has no TLS support: give up, no point retrying.
    TlsUnsupported(String),
}

impl StartError {
    fn into_message(self) -> String {
        match self {
            StartError::Failed(m) | StartError::TlsUnsupported(m) => m,
        }
    }
}

/// One server process: what to run, where, on which port.
struct ServerProcess {
    kind: Kind,
    program: PathBuf,
    extra_args: Vec<String>,
    port: u16,
    child: Option<Child>,
    // Dropped last (fields drop in declaration order), after the process is
    // killed in `Drop for ServerProcess`.
    dir: TempDir,
}

impl ServerProcess {
    /// A process of `kind` not started yet (see [`start_fresh`](Self::start_fresh)),
    /// its files in `dir`.
    fn new(kind: Kind, program: PathBuf, extra_args: &[&str], dir: TempDir) -> ServerProcess {
        ServerProcess {
            kind,
            program,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            port: 0,
            child: None,
            dir,
        }
    }

    /// [`new`](Self::new), started; panics with the server's output if it
    /// does not come up.
    fn started(kind: Kind, program: PathBuf, extra_args: &[&str], dir: TempDir) -> ServerProcess {
        let mut process = ServerProcess::new(kind, program, extra_args, dir);
        if let Err(e) = process.start_fresh() {
            panic!("{}", e.into_message());
        }
        process
    }

    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Redis => "redis-server",
            Kind::RedisTls => "redis-server (TLS)",
            Kind::RedisClusterNode => "redis-server (cluster node)",
            Kind::Memcached => "memcached",
        }
    }

    /// File the server's stdout and stderr go to.
    fn stdio_log(&self) -> PathBuf {
        self.dir.path().join("stdio.log")
    }

    /// Redis' own log file (`--logfile`), if the server has one.
    fn server_log(&self) -> Option<PathBuf> {
        match self.kind {
            Kind::Redis | Kind::RedisTls | Kind::RedisClusterNode => {
                Some(self.dir.path().join("redis.log"))
            }
            Kind::Memcached => None,
        }
    }

    fn args(&self, port: u16) -> Vec<String> {
        let dir = self.dir.path();
        let s = |v: &str| v.to_owned();
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let mut args = match self.kind {
            Kind::Redis | Kind::RedisTls | Kind::RedisClusterNode => {
                let mut args = if self.kind == Kind::RedisTls {
                    vec![
                        s("--port"),
                        s("0"),
                        s("--tls-port"),
                        port.to_string(),
                        s("--tls-cert-file"),
                        path(dir.join("server.crt")),
                        s("--tls-key-file"),
                        path(dir.join("server.key")),
                        s("--tls-ca-cert-file"),
                        path(dir.join("ca.crt")),
                        s("--tls-auth-clients"),
                        s("no"),
                    ]
                } else {
                    vec![s("--port"), port.to_string()]
                };
                if self.kind == Kind::RedisClusterNode {
                    // The config file is named after the port: a node that
                    // restarts on its port finds its slots and peers again.
                    args.extend([
                        s("--cluster-enabled"),
                        s("yes"),
                        s("--cluster-config-file"),
                        path(dir.join(format!("nodes-{port}.conf"))),
                        s("--cluster-node-timeout"),
                        CLUSTER_NODE_TIMEOUT_MS.to_string(),
                    ]);
                }
                args.extend([
                    s("--bind"),
                    s("127.0.0.1"),
                    s("--save"),
                    s(""),
                    s("--appendonly"),
                    s("no"),
                    s("--daemonize"),
                    s("no"),
                    s("--protected-mode"),
                    s("no"),
                    s("--dir"),
                    path(dir.to_path_buf()),
                    s("--logfile"),
                    path(dir.join("redis.log")),
                ]);
                args
            }
            Kind::Memcached => {
                let mut args = vec![
                    // memcached refuses to run as root without -u; when not
                    // root, -u is ignored.
                    s("-u"),
                    s("root"),
                    s("-l"),
                    s("127.0.0.1"),
                    s("-p"),
                    port.to_string(),
                    s("-U"),
                    s("0"),
                ];
                if let Some(item_size) = memcached_item_size(&self.extra_args) {
                    args.extend([s("-I"), item_size]);
                }
                args
            }
        };
        args.extend(self.extra_args.iter().cloned());
        args
    }

    fn command_line(&self, port: u16) -> String {
        let mut line = self.program.display().to_string();
        for arg in self.args(port) {
            if arg.is_empty() || arg.contains(' ') {
                line.push_str(&format!(" {arg:?}"));
            } else {
                line.push(' ');
                line.push_str(&arg);
            }
        }
        line
    }

    /// Starts the server on `port` and waits until it is ready.
    fn spawn_ready(&mut self, port: u16) -> Result<(), StartError> {
        self.stop();
        let stdio_path = self.stdio_log();
        let stdio_from = file_len(&stdio_path);
        let server_log_from = self.server_log().map_or(0, |p| file_len(&p));
        let stdio = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stdio_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", stdio_path.display()));
        let stderr = stdio
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone handle of {}: {e}", stdio_path.display()));
        let child = Command::new(&self.program)
            .args(self.args(port))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdio))
            .stderr(Stdio::from(stderr))
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => panic!("cannot spawn `{}`: {e}", self.command_line(port)),
        };
        self.child = Some(child);
        self.port = port;

        match self.wait_ready(server_log_from) {
            Ok(()) => Ok(()),
            Err(reason) => {
                let exited = self
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                self.stop();
                let stdio_text = log_excerpt(&stdio_path, stdio_from);
                let server_text = self
                    .server_log()
                    .map(|p| log_excerpt(&p, server_log_from))
                    .unwrap_or_default();
                let mut message = format!(
                    "{} on 127.0.0.1:{port} did not come up: {reason}\ncommand: {}\n\
                     --- stdout/stderr ({}) ---\n{stdio_text}",
                    self.name(),
                    self.command_line(port),
                    stdio_path.display(),
                );
                if let Some(p) = self.server_log() {
                    message.push_str(&format!("--- log ({}) ---\n{server_text}", p.display()));
                }
                let all = format!("{stdio_text}\n{server_text}");
                let tls_unsupported = self.kind == Kind::RedisTls
                    && exited
                    && ((all.contains("Bad directive") && all.contains("tls-"))
                        || all.contains("connection type tls"));
                if tls_unsupported {
                    Err(StartError::TlsUnsupported(message))
                } else {
                    Err(StartError::Failed(message))
                }
            }
        }
    }

    /// Polls until the server answers (bounded by [`READY_TIMEOUT`]).
    fn wait_ready(&mut self, server_log_from: u64) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_probe_error = String::from("no probe made yet");
        loop {
            if let Some(reason) = self.exited() {
                return Err(reason);
            }
            match self.probe(server_log_from) {
                Ok(()) => {
                    // Make sure it is *our* process that answered: a server
                    // that lost a port race exits right after startup.
                    thread::sleep(Duration::from_millis(50));
                    if let Some(reason) = self.exited() {
                        return Err(reason);
                    }
                    if self.probe(server_log_from).is_ok() {
                        return Ok(());
                    }
                }
                Err(e) => last_probe_error = e,
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not ready after {READY_TIMEOUT:?} (last probe: {last_probe_error})"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Some(reason)` if the process has exited.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!("process exited early ({status})")),
            Ok(None) => None,
            Err(e) => Some(format!("cannot query the process status: {e}")),
        }
    }

    fn probe(&self, server_log_from: u64) -> Result<(), String> {
        if let Some(log) = self.server_log() {
            // Redis logs this only once it has bound its port, so this also
            // proves that whatever answers on the port is our process.
            if !read_from(&log, server_log_from).contains(REDIS_READY_LINE) {
                return Err(format!("no {REDIS_READY_LINE:?} in the log yet"));
            }
        }
        let stream = TcpStream::connect_timeout(&loopback(self.port), Duration::from_millis(250))
            .map_err(|e| format!("connect: {e}"))?;
        match self.kind {
            Kind::Redis | Kind::RedisClusterNode => request_line(stream, b"PING\r\n", b"+PONG"),
            // Cannot speak without TLS: the connect (and the log) is enough.
            Kind::RedisTls => Ok(()),
            Kind::Memcached => request_line(stream, b"version\r\n", b"VERSION"),
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts on a new free port, retrying on failure.
    fn start_fresh(&mut self) -> Result<(), StartError> {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = match self.kind {
                Kind::RedisClusterNode => free_cluster_port(),
                _ => free_port(),
            };
            match self.spawn_ready(port) {
                Ok(()) => return Ok(()),
                Err(StartError::TlsUnsupported(m)) => return Err(StartError::TlsUnsupported(m)),
                Err(StartError::Failed(m)) => failures.push(m),
            }
        }
        Err(StartError::Failed(format!(
            "{} failed to start {START_ATTEMPTS} times, each on a new port: {}",
            self.name(),
            summarize_failures(&failures)
        )))
    }

    /// Starts again on the same port; panics if that fails.
    fn restart(&mut self) {
        self.stop();
        let port = self.port;
        let mut failures = Vec::new();
        for _ in 0..RESTART_ATTEMPTS {
            match self.spawn_ready(port) {
                Ok(()) => return,
                Err(e) => failures.push(e.into_message()),
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{} failed to restart on 127.0.0.1:{port} ({RESTART_ATTEMPTS} attempts):\n{}",
            self.name(),
            summarize_failures(&failures)
        );
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Earlier attempts as their first line, the last one in full.
fn summarize_failures(failures: &[String]) -> String {
    let Some((last, earlier)) = failures.split_last() else {
        return String::from("no attempt made");
    };
    let mut text = String::new();
    for failure in earlier {
        text.push_str("\n  - ");
        text.push_str(failure.lines().next().unwrap_or_default());
    }
    text.push_str("\n--- last attempt ---\n");
    text.push_str(last);
    text
}

/// Sends `request` and checks that the first line of the answer starts with
/// `expected`.
fn request_line(mut stream: TcpStream, request: &[u8], expected: &[u8]) -> Result<(), String> {
    let timeout = Some(Duration::from_secs(1));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    stream
        .set_write_timeout(timeout)
        .map_err(|e| format!("set_write_timeout: {e}"))?;
    stream
        .write_all(request)
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    // A server started with --requirepass answers PING with NOAUTH: it is up.
    if answer.starts_with(expected) || answer.starts_with(b"-NOAUTH") {
        Ok(())
    } else {
        Err(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&answer)
        ))
    }
}

/// The `-I` (max item size) to pass to memcached, or `None` if the caller
/// sets it. 32 MB by default; memcached refuses an item size above half the
/// memory limit, so with a small `-m` it is lowered to `-m`/2.
fn memcached_item_size(extra_args: &[String]) -> Option<String> {
    let mut memory_mb: Option<u64> = None;
    let mut args = extra_args.iter();
    while let Some(arg) = args.next() {
        if arg == "-I" || arg == "--max-item-size" || arg.starts_with("--max-item-size=") {
            return None;
        }
        let value = if arg == "-m" || arg == "--memory-limit" {
            args.next().map(String::as_str)
        } else {
            arg.strip_prefix("--memory-limit=")
        };
        if let Some(value) = value {
            let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
            memory_mb = digits.parse().ok();
        }
    }
    let kb = match memory_mb {
        Some(mb) if mb > 0 => (mb * 1024 / 2).min(32 * 1024),
        _ => 32 * 1024,
    };
    Some(format!("{kb}k"))
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// A real `redis-server` on a free port of 127.0.0.1, without persistence.
pub struct RedisServer {
    process: ServerProcess,
}

impl RedisServer {
    /// Starts a server. `None` if `redis-server` is not installed (outside
    /// CI; see the module docs).
    pub fn start() -> Option<RedisServer> {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments, e.g.
    /// `["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]`.
    pub fn start_with(extra_args: &[&str]) -> Option<RedisServer> {
        if !require("redis-server") {
            return None;
        }
        let program = find_on_path("redis-server")?;
        let process =
            ServerProcess::started(Kind::Redis, program, extra_args, TempDir::new("redis"));
        Some(RedisServer { process })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port())
    }

    /// The server's process id while it runs (to SIGSTOP/SIGCONT it).
    pub fn pid(&self) -> Option<u32> {
        self.process.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts the server again (stopping it first if running) on the same
    /// port with the same arguments, and waits until it is ready. The new
    /// server is empty.
    pub fn restart(&mut self) {
        self.process.restart();
    }
}

/// A real TLS-only `redis-server` on a free port of 127.0.0.1, with a
/// self-signed CA and a server certificate for `127.0.0.1` and `localhost`.
/// Clients are not asked for certificates.
pub struct RedisTlsServer {
    process: ServerProcess,
}

impl RedisTlsServer {
    /// Starts a server. `None` if `redis-server` or `openssl` is not
    /// installed (outside CI; see the module docs), or if `redis-server` was
    /// built without TLS support.
    pub fn start() -> Option<RedisTlsServer> {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments.
    pub fn start_with(extra_args: &[&str]) -> Option<RedisTlsServer> {
        if !require("redis-server") || !require("openssl") {
            return None;
        }
        let program = find_on_path("redis-server")?;
        let dir = TempDir::new("redis-tls");
        generate_certificates(dir.path());
        let mut process = ServerProcess::new(Kind::RedisTls, program, extra_args, dir);
        match process.start_fresh() {
            Ok(()) => Some(RedisTlsServer { process }),
            Err(StartError::TlsUnsupported(message)) => {
                shout(&format!(
                    "SKIPPING: the installed redis-server was built without TLS support \
                     (rebuild it with BUILD_TLS=yes or install a TLS-enabled package):\n{message}"
                ));
                None
            }
            Err(StartError::Failed(message)) => panic!("{message}"),
        }
    }

    /// The TLS port it listens on.
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// `rediss://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port())
    }

    /// The PEM file of the CA that signed the server certificate.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.process.dir.path().join("ca.crt")
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts the server again on the same port (see [`RedisServer::restart`]).
    pub fn restart(&mut self) {
        self.process.restart();
    }
}

/// Writes `ca.crt`/`ca.key` (a self-signed CA) and `server.crt`/`server.key`
/// (signed by it, for IP 127.0.0.1 and DNS localhost) into `dir`, with the
/// `openssl` command line. Panics with openssl's output on failure.
fn generate_certificates(dir: &Path) {
    let write = |name: &str, content: &str| {
        let path = dir.join(name);
        fs::write(&path, content)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    };
    // Own config files, so the system openssl.cnf does not matter. The
    // extensions are what strict verifiers (webpki/rustls) require.
    write(
        "ca.cnf",
        "[req]\nprompt = no\ndistinguished_name = dn\nx509_extensions = v3_ca\n\
         [dn]\nCN = icache test CA\n\
         [v3_ca]\nbasicConstraints = critical,CA:TRUE\n\
         keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n",
    );
    write(
        "server.cnf",
        "[req]\nprompt = no\ndistinguished_name = dn\n[dn]\nCN = localhost\n",
    );
    write(
        "server_ext.cnf",
        "[v3_server]\nbasicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n\
         subjectAltName = IP:127.0.0.1,DNS:localhost\n\
         subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n",
    );
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run_openssl(
        dir,
        &[
            &["req", "-x509", "-new"][..],
            &ec,
            &[
                "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650", "-config", "ca.cnf",
            ],
        ]
        .concat(),
    );
    run_openssl(
        dir,
        &[
            &["req", "-new"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-config",
                "server.cnf",
            ],
        ]
        .concat(),
    );
    run_openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "3650",
            "-extfile",
            "server_ext.cnf",
            "-extensions",
            "v3_server",
        ],
    );
}

fn run_openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `openssl {}`: {e}", args.join(" ")));
    assert!(
        output.status.success(),
        "`openssl {}` failed in {} ({}):\n{}{}",
        args.join(" "),
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

// ---------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------

/// A cluster node's bus port is its client port plus this.
const CLUSTER_BUS_PORT_OFFSET: u16 = 10000;
/// `--cluster-node-timeout` of the nodes, in ms: about this long after a
/// master is killed, the others flag it and the cluster reports `fail`.
const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;
/// How long `redis-cli --cluster create` may take.
const CLUSTER_CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a cluster may take until every node reports it healthy.
const CLUSTER_OK_TIMEOUT: Duration = Duration::from_secs(20);
/// The number of hash slots of a Redis Cluster.
const CLUSTER_SLOTS: &str = "16384";

/// A local Redis Cluster of masters without replicas, each a real
/// `redis-server` in cluster mode on a free port `P` of 127.0.0.1 (with its
/// cluster bus on `P + 10000`), without persistence, in its own temporary
/// directory.
///
/// The hash slots are spread evenly over the masters by
/// `redis-cli --cluster create`. [`RedisCluster::start`] returns once every
/// node reports `cluster_state:ok` with all 16384 slots assigned and served
/// and every node known.
///
/// [`RedisCluster::stop_node`] kills one node (SIGKILL): its slots are then
/// served by nobody, and about [`CLUSTER_NODE_TIMEOUT_MS`] (1 s) later the
/// other nodes report `cluster_state:fail`. [`RedisCluster::restart_node`]
/// starts it again on the same port with its `nodes-PORT.conf`: it keeps
/// its slots and rejoins, **empty** (no persistence). Dropping the cluster
/// kills every node and removes the temporary directories.
pub struct RedisCluster {
    nodes: Vec<ServerProcess>,
    redis_cli: PathBuf,
    // Holds the output of `redis-cli --cluster create`; dropped after the
    // nodes (fields drop in declaration order).
    dir: TempDir,
}

impl RedisCluster {
    /// Starts a cluster of `masters` masters (at least 3, which
    /// `redis-cli --cluster create` requires) and waits until it is healthy.
    /// `None` if `redis-server` or `redis-cli` is not installed (outside CI;
    /// see the module docs).
    pub fn start(masters: usize) -> Option<RedisCluster> {
        assert!(
            masters >= 3,
            "RedisCluster::start({masters}): a Redis Cluster needs at least 3 masters \
             (`redis-cli --cluster create` refuses fewer)"
        );
        if !require("redis-server") || !require("redis-cli") {
            return None;
        }
        let program = find_on_path("redis-server")?;
        let redis_cli = find_on_path("redis-cli")?;
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            // A node that has started binds its port and bus port, so the
            // next node's free-port search cannot pick either.
            nodes.push(ServerProcess::started(
                Kind::RedisClusterNode,
                program.clone(),
                &[],
                TempDir::new("redis-cluster-node"),
            ));
        }
        let mut cluster = RedisCluster {
            nodes,
            redis_cli,
            dir: TempDir::new("redis-cluster"),
        };
        cluster.create();
        cluster.wait_healthy("after `redis-cli --cluster create`");
        Some(cluster)
    }

    /// The client ports of the nodes, node 0 first.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port).collect()
    }

    /// `redis+cluster://127.0.0.1:P0,127.0.0.1:P1,...` with every node.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports()
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// `redis://127.0.0.1:PORT` of node `i` (a plain connection to that node
    /// only, which answers `-MOVED` for keys of other nodes).
    pub fn node_url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.node(i).port)
    }

    /// Kills node `i` (SIGKILL) and waits for it to exit.
    pub fn stop_node(&mut self, i: usize) {
        self.node_mut(i).stop();
    }

    /// Starts node `i` again (stopping it first if running) on the same port
    /// with the same directory and `nodes-PORT.conf`, so that it keeps its
    /// slots and rejoins; it comes back empty.
    ///
    /// When every node is then running, waits (up to 20 s) until every node
    /// reports the cluster healthy again, as [`RedisCluster::start`] does.
    /// While another node is still stopped the cluster cannot be healthy: it
    /// then only waits until the node answers `PING`.
    pub fn restart_node(&mut self, i: usize) {
        self.node_mut(i).restart();
        if self.nodes.iter().all(|node| node.child.is_some()) {
            let port = self.nodes[i].port;
            self.wait_healthy(&format!("after restarting node {i} (port {port})"));
        }
    }

    fn node(&self, i: usize) -> &ServerProcess {
        let count = self.nodes.len();
        self.nodes
            .get(i)
            .unwrap_or_else(|| panic!("no node {i} in a cluster of {count} nodes"))
    }

    fn node_mut(&mut self, i: usize) -> &mut ServerProcess {
        let count = self.nodes.len();
        self.nodes
            .get_mut(i)
            .unwrap_or_else(|| panic!("no node {i} in a cluster of {count} nodes"))
    }

    /// Runs `redis-cli --cluster create` (bounded by
    /// [`CLUSTER_CREATE_TIMEOUT`]); panics with its output and the node logs
    /// on failure.
    fn create(&self) {
        let log = self.dir.path().join("cluster-create.log");
        let output = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let stderr = output
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone handle of {}: {e}", log.display()));
        let mut args = vec![String::from("--cluster"), String::from("create")];
        args.extend(self.ports().iter().map(|port| format!("127.0.0.1:{port}")));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let command_line = format!("{} {}", self.redis_cli.display(), args.join(" "));
        let mut child = Command::new(&self.redis_cli)
            .args(&args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(output))
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{command_line}`: {e}"));
        let deadline = Instant::now() + CLUSTER_CREATE_TIMEOUT;
        let failure = loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => break None,
                Ok(Some(status)) => break Some(format!("failed ({status})")),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Some(format!(
                        "did not finish within {CLUSTER_CREATE_TIMEOUT:?} (killed)"
                    ));
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Some(format!("cannot query its status: {e}"));
                }
            }
        };
        if let Some(failure) = failure {
            panic!(
                "{}",
                self.report(&format!(
                    "`{command_line}` {failure}\n--- its output ({}) ---\n{}",
                    log.display(),
                    log_excerpt(&log, 0)
                ))
            );
        }
    }

    /// Waits (up to [`CLUSTER_OK_TIMEOUT`]) until every node reports the
    /// cluster healthy (see [`cluster_info_healthy`]); panics with what each
    /// node last said and the logs otherwise.
    fn wait_healthy(&mut self, when: &str) {
        let started = Instant::now();
        let deadline = started + CLUSTER_OK_TIMEOUT;
        let count = self.nodes.len();
        let mut last = vec![String::from("<not asked yet>"); count];
        loop {
            let mut healthy = true;
            for (i, node) in self.nodes.iter_mut().enumerate() {
                if let Some(reason) = node.exited() {
                    let port = node.port;
                    panic!(
                        "{}",
                        self.report(&format!(
                            "Redis Cluster node {i} (port {port}) died {when}: {reason}"
                        ))
                    );
                }
                match redis_query(node.port, &["CLUSTER", "INFO"]) {
                    Ok(info) => {
                        healthy &= cluster_info_healthy(&info, count);
                        last[i] = info;
                    }
                    Err(e) => {
                        healthy = false;
                        last[i] = format!("<no answer: {e}>");
                    }
                }
            }
            if healthy {
                return;
            }
            if Instant::now() >= deadline {
                let mut headline = format!(
                    "Redis Cluster not healthy {when} within {CLUSTER_OK_TIMEOUT:?}: every \
                     node must report cluster_state:ok, cluster_slots_assigned:{CLUSTER_SLOTS}, \
                     cluster_slots_ok:{CLUSTER_SLOTS} and cluster_known_nodes:{count}"
                );
                for (i, info) in last.iter().enumerate() {
                    headline.push_str(&format!(
                        "\n--- CLUSTER INFO of node {i} (port {}) ---\n{}",
                        self.nodes[i].port,
                        info.trim_end()
                    ));
                }
                panic!("{}", self.report(&headline));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `headline` followed by each node's command line and logs.
    fn report(&self, headline: &str) -> String {
        let mut text = format!("{headline}\n");
        for (i, node) in self.nodes.iter().enumerate() {
            let running = if node.child.is_some() {
                "running"
            } else {
                "stopped"
            };
            text.push_str(&format!(
                "=== node {i} (port {}, {running}) ===\ncommand: {}\n--- stdout/stderr ({}) ---\n{}",
                node.port,
                node.command_line(node.port),
                node.stdio_log().display(),
                log_excerpt(&node.stdio_log(), 0),
            ));
            if let Some(log) = node.server_log() {
                text.push_str(&format!(
                    "--- log ({}) ---\n{}",
                    log.display(),
                    log_excerpt(&log, 0)
                ));
            }
        }
        text
    }
}

/// Whether a `CLUSTER INFO` answer says the cluster is fully up: state ok,
/// every slot assigned and served (none flagged failing), and all `nodes`
/// nodes known.
fn cluster_info_healthy(info: &str, nodes: usize) -> bool {
    let field = |name: &str| {
        info.lines().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(str::trim)
        })
    };
    field("cluster_state") == Some("ok")
        && field("cluster_slots_assigned") == Some(CLUSTER_SLOTS)
        && field("cluster_slots_ok") == Some(CLUSTER_SLOTS)
        && field("cluster_known_nodes") == Some(nodes.to_string().as_str())
}

/// Sends one command (RESP) to `127.0.0.1:port` and returns the answer if
/// it is a simple string, an integer or a bulk string; an error answer, a
/// nil, an array or an I/O problem is an `Err` describing it.
fn redis_query(port: u16, args: &[&str]) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&loopback(port), Duration::from_millis(250))
        .map_err(|e| format!("connect: {e}"))?;
    let timeout = Some(Duration::from_secs(1));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    stream
        .set_write_timeout(timeout)
        .map_err(|e| format!("set_write_timeout: {e}"))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    (&stream)
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut reader = io::BufReader::new(&stream);
    let mut line = String::new();
    match io::BufRead::read_line(&mut reader, &mut line) {
        Ok(0) => return Err(String::from("connection closed without an answer")),
        Ok(_) => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1).unwrap_or((line, ""));
    match kind {
        "+" | ":" => Ok(rest.to_owned()),
        "-" => Err(format!("error answer: {rest}")),
        "$" => {
            let len: usize = rest
                .parse()
                .map_err(|_| format!("nil or bad bulk length: {line:?}"))?;
            let mut bulk = vec![0u8; len + 2];
            reader
                .read_exact(&mut bulk)
                .map_err(|e| format!("read {len} bytes of bulk string: {e}"))?;
            bulk.truncate(len);
            Ok(String::from_utf8_lossy(&bulk).into_owned())
        }
        _ => Err(format!("unexpected answer {line:?}")),
    }
}

// ---------------------------------------------------------------------------
// memcached
// ---------------------------------------------------------------------------

/// A real `memcached` on a free port of 127.0.0.1 (TCP only), accepting
/// items up to 32 MB by default.
pub struct MemcachedServer {
    process: ServerProcess,
}

impl MemcachedServer {
    /// Starts `memcached -l 127.0.0.1 -p PORT -U 0 -I 32m` (plus `-u root`,
    /// needed when running as root). `None` if `memcached` is not installed
    /// (outside CI; see the module docs).
    pub fn start() -> Option<MemcachedServer> {
        Self::start_with(&[])
    }

    /// Like [`MemcachedServer::start`], with extra arguments appended, e.g.
    /// `["-m", "1"]`. With a small `-m`, the default `-I` is lowered to half
    /// of it (memcached requires that); an explicit `-I` replaces the default.
    pub fn start_with(extra_args: &[&str]) -> Option<MemcachedServer> {
        if !require("memcached") {
            return None;
        }
        let program = find_on_path("memcached")?;
        let process = ServerProcess::started(
            Kind::Memcached,
            program,
            extra_args,
            TempDir::new("memcached"),
        );
        Some(MemcachedServer { process })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// `memcached://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("memcached://127.0.0.1:{}", self.port())
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts the server again (stopping it first if running) on the same
    /// port with the same arguments, and waits until it is ready. The new
    /// server is empty.
    pub fn restart(&mut self) {
        self.process.restart();
    }
}

// ---------------------------------------------------------------------------
// Proxy
// ---------------------------------------------------------------------------

/// How often proxy threads look at the shutdown and pause flags.
const PROXY_POLL: Duration = Duration::from_millis(10);

/// A fault a [`Proxy`] injects on its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything (no fault).
    Pass,
    /// Cut every open connection and close new ones at once: a server that
    /// is gone (the client sees a reset or an end of stream).
    Refuse,
    /// Accept connections but forward nothing in either direction (data
    /// already read is held back): a server that hangs.
    Hang,
    /// Forward requests to the server but hold its answers back: the server
    /// acts (a bump is applied) while the client hears nothing.
    Freeze,
}

impl Fault {
    fn code(self) -> u8 {
        match self {
            Fault::Pass => 0,
            Fault::Refuse => 1,
            Fault::Hang => 2,
            Fault::Freeze => 3,
        }
    }
    fn from_code(c: u8) -> Fault {
        match c {
            1 => Fault::Refuse,
            2 => Fault::Hang,
            3 => Fault::Freeze,
            _ => Fault::Pass,
        }
    }
}

struct ProxyShared {
    target_port: u16,
    shutdown: AtomicBool,
    fault: std::sync::atomic::AtomicU8,
    /// Bumped by every `set_fault(Refuse)`: connections opened before it are cut.
    cut: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    round_trips: AtomicU64,
    connections: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl ProxyShared {
    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    fn fault(&self) -> Fault {
        Fault::from_code(self.fault.load(Ordering::SeqCst))
    }

    /// Waits while this direction is held back; `false` if the proxy is
    /// shutting down or the connection (opened at cut count `born`) is cut.
    fn wait_for_path(&self, upstream: bool, born: u64) -> bool {
        loop {
            if self.stopping() || self.cut.load(Ordering::SeqCst) != born {
                return false;
            }
            match self.fault() {
                Fault::Pass => return true,
                Fault::Freeze if upstream => return true,
                Fault::Refuse => return false,
                Fault::Hang | Fault::Freeze => thread::sleep(PROXY_POLL),
            }
        }
    }
}

/// A counting TCP proxy on a free port of 127.0.0.1, forwarding every
/// connection to `127.0.0.1:target_port`, with faults injected on demand
/// ([`set_fault`](Proxy::set_fault)).
///
/// Its threads stop when it is dropped.
pub struct Proxy {
    port: u16,
    shared: Arc<ProxyShared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("proxy: bind a listener on 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("proxy: local address of its listener")
            .port();
        listener
            .set_nonblocking(true)
            .expect("proxy: make its listener non-blocking");
        let shared = Arc::new(ProxyShared {
            target_port,
            shutdown: AtomicBool::new(false),
            fault: std::sync::atomic::AtomicU8::new(0),
            cut: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            workers: Mutex::new(Vec::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name(format!("proxy-{port}-accept"))
            .spawn(move || proxy_accept_loop(&listener, &accept_shared))
            .expect("proxy: spawn its accept thread");
        Proxy {
            port,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    /// The port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT` through this proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `memcached://127.0.0.1:PORT` through this proxy.
    pub fn memcached_url(&self) -> String {
        format!("memcached://127.0.0.1:{}", self.port)
    }

    /// Bytes forwarded from clients to the target (counted as forwarding
    /// starts, so an answer a client got is always counted).
    pub fn bytes_up(&self) -> u64 {
        self.shared.bytes_up.load(Ordering::SeqCst)
    }

    /// Requests that followed an answer (or opened a connection): a client that
    /// writes a whole pipeline at once and then reads counts one round trip.
    pub fn round_trips(&self) -> u64 {
        self.shared.round_trips.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from the server to the clients.
    pub fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst)
    }

    /// Client connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Injects `fault` from now on ([`Fault::Pass`] ends it). `Refuse` also
    /// cuts the connections that are open.
    pub fn set_fault(&self, fault: Fault) {
        if fault == Fault::Refuse {
            self.shared.cut.fetch_add(1, Ordering::SeqCst);
        }
        self.shared.fault.store(fault.code(), Ordering::SeqCst);
    }

    /// The fault injected now.
    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    /// Stops forwarding (connections are still accepted): [`Fault::Hang`].
    pub fn pause(&self) {
        self.set_fault(Fault::Hang);
    }

    /// Forwards again, including what was held back: [`Fault::Pass`].
    pub fn resume(&self) {
        self.set_fault(Fault::Pass);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        if let Some(handle) = self.accept_thread.take() {
            let _ = handle.join();
        }
        // The accept thread has ended: no more workers get added.
        let workers = std::mem::take(
            &mut *self
                .shared
                .workers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for handle in workers {
            let _ = handle.join();
        }
    }
}

fn proxy_accept_loop(listener: &TcpListener, shared: &Arc<ProxyShared>) {
    while !shared.stopping() {
        match listener.accept() {
            Ok((client, _)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                if shared.fault() == Fault::Refuse {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                proxy_connection(client, shared);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock (nothing to accept) or a transient error.
            Err(_) => thread::sleep(PROXY_POLL),
        }
    }
}

/// Connects to the target and starts the two pumping threads; on any failure
/// the client connection is just closed.
fn proxy_connection(client: TcpStream, shared: &Arc<ProxyShared>) {
    let Ok(server) =
        TcpStream::connect_timeout(&loopback(shared.target_port), Duration::from_secs(1))
    else {
        return;
    };
    let setup = || -> io::Result<[(TcpStream, TcpStream); 2]> {
        client.set_nonblocking(false)?;
        for stream in [&client, &server] {
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(PROXY_POLL))?;
            stream.set_write_timeout(Some(PROXY_POLL))?;
        }
        Ok([
            (client.try_clone()?, server.try_clone()?),
            (server.try_clone()?, client.try_clone()?),
        ])
    };
    let Ok([up, down]) = setup() else {
        return;
    };
    let mut workers = shared
        .workers
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    // true while the client's next bytes start a new round trip.
    let turn = Arc::new(AtomicBool::new(true));
    let born = shared.cut.load(Ordering::SeqCst);
    for ((from, to), upstream) in [(up, true), (down, false)] {
        let pump_shared = Arc::clone(shared);
        let turn = Arc::clone(&turn);
        let spawned = thread::Builder::new()
            .name(format!(
                "proxy-pump-{}",
                if upstream { "up" } else { "down" }
            ))
            .spawn(move || proxy_pump(from, to, upstream, born, &pump_shared, &turn));
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// Copies `from` to `to` until EOF, an error, or shutdown.
fn proxy_pump(
    mut from: TcpStream,
    mut to: TcpStream,
    upstream: bool,
    born: u64,
    shared: &ProxyShared,
    turn: &AtomicBool,
) {
    let counter = if upstream {
        &shared.bytes_up
    } else {
        &shared.bytes_down
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !shared.wait_for_path(upstream, born) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                // Half-close: pass the EOF on, let the other direction finish.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if !shared.wait_for_path(upstream, born) {
                    break;
                }
                // Counted before the write: whatever a peer has received is
                // already counted when it looks at the counters.
                counter.fetch_add(n as u64, Ordering::SeqCst);
                if upstream {
                    if turn.swap(false, Ordering::SeqCst) {
                        shared.round_trips.fetch_add(1, Ordering::SeqCst);
                    }
                } else {
                    turn.store(true, Ordering::SeqCst);
                }
                if !proxy_write_all(&mut to, &buf[..n], upstream, born, shared) {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Writes all of `data`, holding it back while paused; `false` on error or
/// shutdown.
fn proxy_write_all(
    to: &mut TcpStream,
    mut data: &[u8],
    upstream: bool,
    born: u64,
    shared: &ProxyShared,
) -> bool {
    while !data.is_empty() {
        if !shared.wait_for_path(upstream, born) {
            return false;
        }
        match to.write(data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return false,
        }
    }
    true
}
