//! A real PostgreSQL server (Debian's `postgresql` package) on a free port
//! of 127.0.0.1, in a temporary data directory, killed on drop.
//!
//! The server refuses to run as root: when the tests run as root, `initdb`
//! and `postgres` run as the `postgres` user the package creates (through
//! `setpriv`, which execs in place, so the child we hold *is* the
//! postmaster and signals reach it). The cluster is made once by `initdb`
//! into a template directory under the system temp dir (reused by later
//! runs of the same version) and copied for each server: a start costs a
//! copy and a postmaster start, not an `initdb`.
//!
//! Binaries are looked up on `PATH`, then in `/usr/lib/postgresql/*/bin`
//! (where Debian puts them). Missing: `None` with a loud SKIPPING message, or
//! a panic when `CI=true`, as for the other servers.
//!
//! ```ignore
//! let Some(pg) = support::PostgresServer::start() else { return };
//! let url = pg.create_database("app"); // postgres://postgres@127.0.0.1:PORT/app
//! pg.psql("app", "CREATE TABLE t (id int)").expect("psql");
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{TempDir, file_len, free_port, in_ci, log_excerpt, shout};

/// The user Debian's package creates, and the database superuser we make.
const PG_USER: &str = "postgres";

/// A running PostgreSQL server; see the [module docs](self).
pub struct PostgresServer {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    /// Dropped after the process is killed (see `Drop`).
    dir: TempDir,
}

/// Finds a PostgreSQL server binary (`initdb`, `postgres`, `pg_isready`).
fn find_pg_bin() -> Option<PathBuf> {
    if let Some(initdb) = crate::find_on_path("initdb")
        && let Some(dir) = initdb
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        && dir.join("postgres").is_file()
    {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    // No libc: the effective uid from /proc, as the kernel reports it.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// `(uid, gid)` of `user` from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == user).then_some(())?;
        let _password = fields.next()?;
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })
}

/// A command for `program`, as the `postgres` user when we are root.
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            PG_USER,
            "--regid",
            PG_USER,
            "--init-groups",
            "--",
        ])
        .arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Gives `path` (recursively) to the `postgres` user when we are root.
fn give_to_pg_user(path: &Path) {
    if !is_root() {
        return;
    }
    let (uid, gid) = user_ids(PG_USER).unwrap_or_else(|| {
        panic!("no `{PG_USER}` user in /etc/passwd: install Debian's postgresql package (scripts/test.sh)")
    });
    fn walk(path: &Path, uid: u32, gid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        if path.is_dir() && !path.is_symlink() {
            for entry in
                fs::read_dir(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            {
                walk(&entry.expect("directory entry").path(), uid, gid);
            }
        }
    }
    walk(path, uid, gid);
}

fn require_postgres() -> Option<PathBuf> {
    if let Some(bin) = find_pg_bin()
        && (!is_root() || user_ids(PG_USER).is_some())
        && crate::find_on_path("psql").is_some()
    {
        return Some(bin);
    }
    let what = "PostgreSQL (initdb/postgres from Debian's postgresql package, psql from postgresql-client, and its postgres user)";
    if in_ci() {
        panic!(
            "{what} is not installed and CI=true: tests needing it must not be skipped in CI; run scripts/test.sh to install it"
        );
    }
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        shout(&format!(
            "SKIPPING: {what} not installed; run scripts/test.sh to install it \
             (tests needing it pass without testing anything)"
        ));
    });
    None
}

/// The initdb'd cluster to copy, made once per version and machine.
fn template(bin: &Path) -> PathBuf {
    let version = bin
        .parent()
        .and_then(Path::file_name)
        .and_then(|v| v.to_str())
        .unwrap_or("pg")
        .to_owned();
    let base = std::env::temp_dir();
    let template = base.join(format!("icache-test-postgres-template-{version}"));
    if template.join("PG_VERSION").is_file() {
        return template;
    }
    // Built aside and renamed into place: concurrent test binaries race
    // harmlessly (the loser removes its copy).
    let work = TempDir::new("postgres-initdb");
    let data = work.path().join("data");
    give_to_pg_user(work.path());
    let out = as_pg_user(&bin.join("initdb"))
        .args(["-D"])
        .arg(&data)
        .args([
            "-U",
            PG_USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ])
        .current_dir(work.path())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run initdb: {e}"));
    assert!(
        out.status.success(),
        "initdb failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if fs::rename(&data, &template).is_err() && !template.join("PG_VERSION").is_file() {
        panic!("cannot move the initdb'd cluster to {}", template.display());
    }
    template
}

impl PostgresServer {
    /// Starts a server with an empty cluster (the superuser `postgres`, no
    /// password, trust on loopback). `None` when PostgreSQL is not installed
    /// (outside CI; see the module docs).
    pub fn start() -> Option<PostgresServer> {
        let bin = require_postgres()?;
        let template = template(&bin);
        let dir = TempDir::new("postgres");
        let data = dir.path().join("data");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .status()
            .unwrap_or_else(|e| panic!("cannot run cp: {e}"));
        assert!(
            copied.success(),
            "cp -a {} {} failed",
            template.display(),
            data.display()
        );
        give_to_pg_user(dir.path());
        let mut server = PostgresServer {
            bin,
            port: 0,
            child: None,
            dir,
        };
        let mut failures = Vec::new();
        for _ in 0..crate::START_ATTEMPTS {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return Some(server),
                Err(e) => failures.push(e),
            }
        }
        panic!("postgres did not start:\n{}", failures.join("\n---\n"));
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.log();
        let from = file_len(&log_path);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("open {}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("clone log handle: {e}"))?;
        let data = self.dir.path().join("data");
        let mut child = as_pg_user(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", data.display()))
            // Test data: durability is not what is measured.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200", "-c", "shared_buffers=32MB"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run postgres: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "postgres exited ({status}) on port {}:\n{}",
                    self.port,
                    log_excerpt(&log_path, from)
                ));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    PG_USER,
                ])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "postgres not ready after 20 s on port {}:\n{}",
                    self.port,
                    log_excerpt(&log_path, from)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (the default database).
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates database `name` (tests sharing a server each take one) and
    /// returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        if let Err(e) = self.psql("postgres", &format!("CREATE DATABASE \"{name}\"")) {
            panic!("CREATE DATABASE {name}: {e}");
        }
        self.url_of(name)
    }

    /// Runs `sql` with `psql` (a process of its own, as any outside writer)
    /// on database `db`: its output (unaligned, tuples only), or its error.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = self
            .psql_command(db, sql)
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "psql failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The `psql` command [`psql`](Self::psql) runs, to spawn it yourself
    /// (to kill it, or to feed it on stdin: pass `-` as `sql`).
    pub fn psql_command(&self, db: &str, sql: &str) -> Command {
        let mut cmd = Command::new("psql");
        cmd.args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .args(["-p", &self.port.to_string(), "-U", PG_USER, "-d", db])
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE");
        if sql != "-" {
            cmd.args(["-c", sql]);
        }
        cmd
    }

    /// Runs `psql` to completion with `sql` and returns its raw output.
    pub fn psql_output(&self, db: &str, sql: &str) -> Output {
        self.psql_command(db, sql).output().expect("run psql")
    }

    /// Stops the server as a crash does (SIGQUIT: immediate shutdown, the
    /// backends killed, no checkpoint) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data (crash
    /// recovery runs first), and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let mut failures = Vec::new();
        for _ in 0..crate::RESTART_ATTEMPTS {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => failures.push(e),
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!("postgres did not restart:\n{}", failures.join("\n---\n"));
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}
