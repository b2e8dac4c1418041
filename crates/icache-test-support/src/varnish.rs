//! A real `varnishd` (with vmod xkey from `varnish-modules`) on a free
//! loopback port, running the repository's `deploy/varnish/icache.vcl` with
//! its backend port rewritten to the app under test.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{READY_TIMEOUT, START_ATTEMPTS, TempDir, free_port, log_excerpt, loopback, require};

/// The repository's VCL.
pub fn repo_vcl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/varnish/icache.vcl")
}

/// A `varnishd` in the foreground, in its own temporary working directory
/// (`-n`), with no jail (`-j none`: as root varnishd otherwise wants its
/// `varnish` users), no management port, 64 MB of malloc storage.
pub struct VarnishServer {
    child: Child,
    port: u16,
    // Dropped after the process is stopped.
    dir: TempDir,
}

impl VarnishServer {
    /// Starts Varnish with the repository's VCL in front of
    /// `127.0.0.1:backend_port`. `None` (loudly) when `varnishd` is not
    /// installed outside CI; panics in CI, or when it cannot be started.
    pub fn start(backend_port: u16) -> Option<VarnishServer> {
        Self::start_with_vcl(&repo_vcl(), backend_port)
    }

    /// [`start`](Self::start) with another VCL file, whose
    /// `.port = "3000";` backend line is rewritten to `backend_port`.
    pub fn start_with_vcl(vcl: &Path, backend_port: u16) -> Option<VarnishServer> {
        if !require("varnishd") {
            return None;
        }
        let source = fs::read_to_string(vcl)
            .unwrap_or_else(|e| panic!("cannot read the VCL {}: {e}", vcl.display()));
        const PORT_LINE: &str = ".port = \"3000\";";
        assert!(
            source.contains(PORT_LINE),
            "{} has no backend line `{PORT_LINE}` to point at the app under test",
            vcl.display()
        );
        let source = source.replacen(PORT_LINE, &format!(".port = \"{backend_port}\";"), 1);
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&source) {
                Ok(server) => return Some(server),
                Err(e) => failures.push(e),
            }
        }
        panic!(
            "varnishd did not start in {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n---\n")
        );
    }

    fn try_start(source: &str) -> Result<VarnishServer, String> {
        let dir = TempDir::new("varnish");
        let vcl = dir.path().join("icache.vcl");
        fs::write(&vcl, source).map_err(|e| format!("write {}: {e}", vcl.display()))?;
        let log = dir.path().join("varnishd.log");
        let out = fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let port = free_port();
        let work = dir.path().join("work");
        let child = Command::new("varnishd")
            .arg("-F")
            .args(["-j", "none"])
            .arg("-n")
            .arg(&work)
            .args(["-a", &format!("127.0.0.1:{port}")])
            .args(["-T", "none"])
            .arg("-f")
            .arg(&vcl)
            .args(["-s", "malloc,64m"])
            // Tests purge and fetch in quick succession: no waiting for
            // the ban lurker, no delayed backend connections.
            .args(["-p", "default_grace=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("spawn varnishd: {e}"))?;
        let mut server = VarnishServer { child, port, dir };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "varnishd exited ({status}) on port {port}:\n{}",
                    log_excerpt(&log, 0)
                ));
            }
            if server.answers() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "varnishd did not answer on port {port} within {READY_TIMEOUT:?}:\n{}",
                    log_excerpt(&log, 0)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Any HTTP answer (a 503 while the backend is not up is one): the
    /// child runs the VCL.
    fn answers(&self) -> bool {
        let Ok(mut s) =
            TcpStream::connect_timeout(&loopback(self.port), Duration::from_millis(200))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        // A PURGE without keys is answered by the VCL itself (400), without
        // touching the backend.
        if s.write_all(b"PURGE /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut head = [0u8; 12];
        s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
    }

    /// Varnish's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` (what `ICACHE_PURGE_URL` takes).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Varnish's log (stdout and stderr), for failure messages.
    pub fn log(&self) -> String {
        log_excerpt(&self.dir.path().join("varnishd.log"), 0)
    }
}

impl Drop for VarnishServer {
    fn drop(&mut self) {
        // SIGTERM first: the manager then stops its worker child; SIGKILL
        // would leave the worker to notice the closed pipe on its own.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
