//! `--writers db`: the bumps come from the database, not from the writers.
//!
//! A real PostgreSQL holds `items (id, v)`; `icache::db` installs the outbox
//! and watches the table, so every committed UPDATE writes its tokens to
//! `icache_outbox` in its own transaction. Writer processes only commit
//! (`UPDATE items SET v = v + 1 …`, sometimes two rows in one transaction,
//! sometimes a ROLLBACK): no code of theirs bumps anything. Relay processes
//! (three, each an in-process [`icache::db::Relay`]) move the outbox to the
//! cache. Reader processes (the usual children) render rows read from
//! PostgreSQL. The fault schedule adds `kill9_writer` and `kill9_relay` (a
//! SIGKILL anywhere, mid-transaction or mid-batch, then a restart) to the
//! backend's own faults.
//!
//! The oracle is the file database's `completed[]`, written by the relays'
//! `after_bump` hook (see [`applied`] for why that order is sound). At the
//! end the outbox must drain to empty and a final read of every item through
//! the cache must show its last committed value.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use icache::ICache;
use icache_test_support::PostgresServer;
use postgres::{Client, NoTls};

use crate::db::Db;
use crate::faults::{Fault, Injector};
use crate::rng::Rng;
use crate::tally::Tally;

/// The token expressions the table is watched with: the item's token, which
/// readers' blocks depend on, and one that names the committed value (see
/// [`applied`]).
const TOKEN_EXPRS: [&str; 2] = ["'item:' || id", "'v:' || id || ':' || v"];

/// Relay processes running at once.
pub(crate) const RELAYS: usize = 3;

/// The file relays wait for before they stop: written only once the outbox
/// is empty, after `stop` has stopped writers and readers.
const RELAY_STOP: &str = "stop-relays";

/// What a writer or relay process is told (`--db-role …`).
#[derive(Debug, Clone)]
pub(crate) struct ProcArgs {
    pub(crate) role: Role,
    /// The cache URL (relays).
    pub(crate) url: String,
    pub(crate) db_url: String,
    pub(crate) dir: PathBuf,
    pub(crate) index: u64,
    /// How many times this slot was restarted: each life draws new choices.
    pub(crate) generation: u64,
    pub(crate) seed: u64,
    /// Writer threads (writers).
    pub(crate) threads: usize,
    pub(crate) items: usize,
}

/// A process of the database mode other than a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Writer,
    Relay,
}

impl Role {
    pub(crate) fn parse(name: &str) -> Option<Role> {
        match name {
            "writer" => Some(Role::Writer),
            "relay" => Some(Role::Relay),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Relay => "relay",
        }
    }
}

/// The PostgreSQL server of a run, with the watched table.
pub(crate) struct Pg {
    server: PostgresServer,
    pub(crate) url: String,
}

impl Pg {
    /// Starts the server, creates `items` with `items` rows at 0, installs
    /// the outbox and watches the table.
    pub(crate) fn start(items: usize) -> Result<Pg, String> {
        let server = PostgresServer::start().ok_or_else(|| {
            String::from("PostgreSQL is not installed: run scripts/test.sh to install it")
        })?;
        let url = server.create_database("chaos");
        server.psql(
            "chaos",
            &format!(
                "CREATE TABLE items (id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0);
                 INSERT INTO items (id) SELECT generate_series(0, {});",
                items - 1
            ),
        )?;
        icache::db::install(&url).map_err(|e| format!("icache::db::install: {e}"))?;
        icache::db::watch(&url, "items", &TOKEN_EXPRS)
            .map_err(|e| format!("icache::db::watch: {e}"))?;
        Ok(Pg { server, url })
    }

    fn query_u64s(&self, sql: &str) -> Result<Vec<u64>, String> {
        let out = self.server.psql("chaos", sql)?;
        out.split_whitespace()
            .map(|v| v.parse().map_err(|_| format!("{sql}: answered {out:?}")))
            .collect()
    }

    /// Rows waiting in the outbox.
    fn pending(&self) -> Result<u64, String> {
        self.query_u64s("SELECT count(*) FROM icache_outbox")?
            .first()
            .copied()
            .ok_or_else(|| String::from("SELECT count(*) answered nothing"))
    }

    /// Every item's committed value, by id.
    fn values(&self) -> Result<Vec<u64>, String> {
        self.query_u64s("SELECT v FROM items ORDER BY id")
    }
}

/// A connection of our own (readers, writers).
pub(crate) fn connect(db_url: &str) -> Result<Client, String> {
    Client::connect(db_url, NoTls).map_err(|e| format!("cannot connect to {db_url}: {e}"))
}

/// What a render of item `i` shows: its committed value.
pub(crate) fn read_value(client: &mut Client, i: usize) -> Result<u64, String> {
    let id = i32::try_from(i).map_err(|_| format!("item {i} out of range"))?;
    let row = client
        .query_one("SELECT v FROM items WHERE id = $1", &[&id])
        .map_err(|e| format!("SELECT v of item {i}: {e}"))?;
    let v: i64 = row.get(0);
    u64::try_from(v).map_err(|_| format!("item {i} has value {v}"))
}

/// The writer and relay processes, by slot; the schedule kills and
/// restarts them.
pub(crate) struct Procs {
    writers: Vec<(u64, Child)>,
    relays: Vec<(u64, Child)>,
    base: ProcArgs,
}

impl Procs {
    /// Starts `processes` writer processes of `threads` threads and
    /// [`RELAYS`] relays.
    pub(crate) fn start(
        url: &str,
        db_url: &str,
        dir: &Path,
        seed: u64,
        (processes, threads, items): (usize, usize, usize),
    ) -> Result<Procs, String> {
        let base = ProcArgs {
            role: Role::Writer,
            url: url.to_owned(),
            db_url: db_url.to_owned(),
            dir: dir.to_owned(),
            index: 0,
            generation: 0,
            seed,
            threads,
            items,
        };
        let mut procs = Procs {
            writers: Vec::new(),
            relays: Vec::new(),
            base,
        };
        for index in 0..RELAYS as u64 {
            let child = procs.spawn(Role::Relay, index, 0)?;
            procs.relays.push((0, child));
        }
        for index in 0..processes as u64 {
            let child = procs.spawn(Role::Writer, index, 0)?;
            procs.writers.push((0, child));
        }
        Ok(procs)
    }

    fn spawn(&self, role: Role, index: u64, generation: u64) -> Result<Child, String> {
        let b = &self.base;
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        Command::new(exe)
            .args([
                "--db-role",
                role.name(),
                "--url",
                &b.url,
                "--db-url",
                &b.db_url,
            ])
            .arg("--dir")
            .arg(&b.dir)
            .args(["--index", &index.to_string()])
            .args(["--generation", &generation.to_string()])
            .args(["--seed", &b.seed.to_string()])
            .args(["--writers", &b.threads.to_string()])
            .args(["--items", &b.items.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot spawn a {} process: {e}", role.name()))
    }

    /// SIGKILLs the process in slot `i` of `role`, waits `down`, restarts it.
    fn kill_restart(&mut self, role: Role, i: usize, down: Duration) -> Result<(), String> {
        let slot = match role {
            Role::Writer => self.writers.get_mut(i),
            Role::Relay => self.relays.get_mut(i),
        }
        .ok_or_else(|| format!("no {} {i}", role.name()))?;
        let (generation, child) = slot;
        // `Child::kill` is SIGKILL: nothing of ours runs after it.
        let _ = child.kill();
        let _ = child.wait();
        *generation += 1;
        let generation = *generation;
        thread::sleep(down);
        let fresh = self.spawn(role, i as u64, generation)?;
        match role {
            Role::Writer => self.writers[i].1 = fresh,
            Role::Relay => self.relays[i].1 = fresh,
        }
        Ok(())
    }
}

/// The database mode's own schedule: SIGKILLs of writers and relays (the
/// backend's faults run beside it, on the topology).
impl Injector for Procs {
    fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Result<String, String> {
        let (role, slots) = match fault {
            Fault::KillWriter => (Role::Writer, self.writers.len()),
            Fault::KillRelay => (Role::Relay, self.relays.len()),
            other => return Err(format!("{} is not a process fault", other.name())),
        };
        let i = rng.below(slots);
        let down = rng.millis(0, 400);
        self.kill_restart(role, i, down)?;
        Ok(format!(
            "{} process {i} killed (-9), restarted after {} ms",
            role.name(),
            down.as_millis()
        ))
    }

    fn heal(&mut self) {}
}

/// Waits for `child` until `deadline` (kills it after that); its `REPORT`
/// line, if it exited 0 with one.
fn collect(child: &mut Child, deadline: Instant) -> Result<Tally, String> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                if let Some(mut stdout) = child.stdout.take() {
                    let _ = stdout.read_to_string(&mut out);
                }
                return match out.lines().find_map(|l| l.strip_prefix("REPORT ")) {
                    Some(report) if status.success() => Ok(Tally::parse(report)),
                    _ => Err(format!("exited {status} with output {out:?}")),
                };
            }
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(String::from("did not finish: killed"));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The end of a run, once `stop` is written and the readers collected:
/// writers finish, the outbox must drain, every item's final read through
/// the cache must show its last committed value, then the relays stop.
pub(crate) fn finish(
    pg: &Pg,
    mut procs: Procs,
    cache_url: &str,
    dir: &Path,
    tally: &mut Tally,
    log: &dyn Fn(&str),
) {
    tally.add("db.mode", 1);
    let deadline = Instant::now() + Duration::from_secs(15);
    for (i, (_, child)) in procs.writers.iter_mut().enumerate() {
        match collect(child, deadline) {
            Ok(t) => tally.merge(&t),
            Err(e) => {
                log(&format!("writer process {i}: {e}"));
                tally.add("child_failures", 1);
            }
        }
    }
    // Writers are gone: what is committed now is final. Relays that died by
    // themselves (not by the schedule) are failures, and are restarted so
    // that the drain can still be judged.
    for i in 0..procs.relays.len() {
        if let Ok(Some(status)) = procs.relays[i].1.try_wait() {
            log(&format!("relay process {i} exited by itself ({status})"));
            tally.add("child_failures", 1);
            if let Err(e) = procs.kill_restart(Role::Relay, i, Duration::ZERO) {
                log(&e);
                tally.add("harness_errors", 1);
            }
        }
    }
    let drain_started = Instant::now();
    let drained = loop {
        match pg.pending() {
            Ok(0) => break true,
            Ok(n) if drain_started.elapsed() > Duration::from_secs(20) => {
                log(&format!("OUTBOX NOT DRAINED: {n} rows left after 20 s"));
                tally.add("outbox_left", n);
                break false;
            }
            Ok(_) => thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                log(&format!("cannot count the outbox: {e}"));
                tally.add("harness_errors", 1);
                break false;
            }
        }
    };
    tally.add(
        "drain_ms",
        u64::try_from(drain_started.elapsed().as_millis()).unwrap_or(u64::MAX),
    );
    if drained {
        final_reads(pg, cache_url, dir, tally, log);
    }
    if let Err(e) = std::fs::write(dir.join(RELAY_STOP), b"") {
        log(&format!("cannot write {RELAY_STOP}: {e}"));
        tally.add("harness_errors", 1);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for (i, (_, child)) in procs.relays.iter_mut().enumerate() {
        match collect(child, deadline) {
            Ok(t) => tally.merge(&t),
            Err(e) => {
                log(&format!("relay process {i}: {e}"));
                tally.add("child_failures", 1);
            }
        }
    }
    // Every life's counts, the killed ones' included.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|x| x == "counts")
                && let Ok(line) = std::fs::read_to_string(entry.path())
            {
                tally.merge(&Tally::parse(&line));
            }
        }
    }
}

/// Every item read through the cache (the same block the readers cache)
/// must show its last committed value: the relays bumped every commit.
fn final_reads(pg: &Pg, cache_url: &str, dir: &Path, tally: &mut Tally, log: &dyn Fn(&str)) {
    let values = match pg.values() {
        Ok(v) => v,
        Err(e) => {
            log(&format!("cannot read the items: {e}"));
            tally.add("harness_errors", 1);
            return;
        }
    };
    tally.add("writes", values.iter().sum());
    let cache = match ICache::from_url(cache_url) {
        Ok(c) => c,
        Err(e) => {
            log(&format!("cannot open {cache_url}: {e}"));
            tally.add("harness_errors", 1);
            return;
        }
    };
    let applied = Db::open(&dir.join("db"), values.len())
        .and_then(|db| db.completed(&(0..values.len()).collect::<Vec<_>>()));
    for (i, &v) in values.iter().enumerate() {
        let shown = cache.fragment("item", &[&format!("item:{i}")], || {
            Ok::<_, String>(format!("{i}={v};"))
        });
        tally.add("final_reads", 1);
        match shown {
            Ok(out) if out == format!("{i}={v};") => {}
            Ok(out) => {
                tally.add("final_stale", 1);
                log(&format!(
                    "FINAL READ STALE: item {i} shows {out:?}, its last commit is {v}"
                ));
            }
            Err(e) => {
                log(&format!("final read of item {i} failed: {e}"));
                tally.add("harness_errors", 1);
            }
        }
        // The oracle may trail (a commit whose `v:` row went to another
        // batch than its `item:` row records nothing): counted, not failed.
        if let Ok(applied) = &applied
            && applied.get(i).copied().unwrap_or(0) < v
        {
            tally.add("final_oracle_behind", 1);
        }
    }
}

/// A writer process: `threads` threads commit until `stop` exists. It
/// bumps nothing: the triggers do, inside each transaction.
pub(crate) fn writer_main(args: ProcArgs) -> ! {
    let stop = args.dir.join("stop");
    let writes = Arc::new(AtomicU64::new(0));
    let rollbacks = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..args.threads {
        let mut client = match connect(&args.db_url) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("db writer {}: {e}", args.index);
                std::process::exit(2);
            }
        };
        let mut rng = Rng::derive(
            args.seed,
            "db-writer",
            (args.index * 1000 + args.generation) * 100 + t as u64,
        );
        let (stop, writes, rollbacks, items) = (
            stop.clone(),
            Arc::clone(&writes),
            Arc::clone(&rollbacks),
            args.items,
        );
        threads.push(thread::spawn(move || -> Result<(), String> {
            while !stop.exists() && parent_alive() {
                // Two rows always locked in id order: transactions that
                // took them in opposite orders would deadlock (PostgreSQL
                // then aborts one, an error here).
                let (a, b) = {
                    let (x, y) = (rng.below(items) as i32, rng.below(items) as i32);
                    (x.min(y), x.max(y))
                };
                let update = "UPDATE items SET v = v + 1 WHERE id = $1";
                let e = |e: postgres::Error| match e.as_db_error() {
                    Some(db) => format!("commit: {}: {}", db.code().code(), db.message()),
                    None => format!("commit: {e}"),
                };
                if rng.chance(850) {
                    client.execute(update, &[&a]).map_err(e)?;
                    writes.fetch_add(1, Ordering::Relaxed);
                } else {
                    // Two rows in one transaction, or a ROLLBACK (which must
                    // bump nothing and change nothing).
                    let commit = rng.chance(700);
                    let mut tx = client.transaction().map_err(e)?;
                    tx.execute(update, &[&a]).map_err(e)?;
                    tx.execute(update, &[&b]).map_err(e)?;
                    if commit {
                        tx.commit().map_err(e)?;
                        writes.fetch_add(2, Ordering::Relaxed);
                    } else {
                        tx.rollback().map_err(e)?;
                        rollbacks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                thread::sleep(rng.millis(2, 20));
            }
            Ok(())
        }));
    }
    let mut failed = 0;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("db writer {}: {e}", args.index);
                failed += 1;
            }
            Err(_) => failed += 1,
        }
    }
    let mut tally = Tally::default();
    tally.add("db.writes_by_survivors", writes.load(Ordering::Relaxed));
    tally.add("db.rollbacks", rollbacks.load(Ordering::Relaxed));
    tally.add("harness_errors", failed);
    report(&tally)
}

/// The oracle, written by a relay's `after_bump` hook with a batch's tokens.
///
/// The hook runs after `incr_many` of the batch's tokens returned `Ok` and
/// before the batch's rows are deleted (or its transaction commits). For
/// every `v:I:X` token of the batch whose `item:I` token is in the same
/// batch, it records `applied[I] >= X`. Why that is sound: the `v:I:X` row
/// was written by the transaction that committed `v = X` (the trigger runs
/// inside it), and the relay could claim the row, so that transaction had
/// committed **before** the claim; the batch's bump of `item:I` came after
/// the claim. So a bump of `item:I` completed after the commit of `X`, and a
/// reader that notes `applied[I] = X` before it begins must see at least `X`.
///
/// Reading `v` from the table in the hook instead would not be: a commit
/// between the `incr_many` and the read would be recorded without any bump
/// after it. Recording a `v:I:X` whose `item:I` went to another batch (a
/// transaction's rows split by the batch limit or by another relay's SKIP
/// LOCKED) would not be either: that other batch may not have bumped yet.
/// Such a commit is simply not recorded (the oracle trails, never leads).
pub(crate) fn applied(db: &Db, tokens: &[String]) -> Result<u64, String> {
    let items: HashSet<usize> = tokens
        .iter()
        .filter_map(|t| t.strip_prefix("item:")?.parse().ok())
        .collect();
    let mut recorded = 0;
    for t in tokens {
        let Some((i, v)) = t.strip_prefix("v:").and_then(|rest| {
            let (i, v) = rest.split_once(':')?;
            Some((i.parse::<usize>().ok()?, v.parse::<u64>().ok()?))
        }) else {
            continue;
        };
        if items.contains(&i) {
            db.complete(i, v)
                .map_err(|e| format!("recording item {i} at {v}: {e}"))?;
            recorded += 1;
        }
    }
    Ok(recorded)
}

/// A relay process: an in-process relay with the oracle's hook, until
/// `stop-relays` exists (or SIGKILL).
pub(crate) fn relay_main(args: ProcArgs) -> ! {
    let cache = match ICache::from_url(&args.url) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay {}: cannot open {}: {e}", args.index, args.url);
            std::process::exit(2);
        }
    };
    let db = match Db::open(&args.dir.join("db"), args.items) {
        Ok(db) => db,
        Err(e) => {
            eprintln!("relay {}: cannot open the oracle: {e}", args.index);
            std::process::exit(2);
        }
    };
    // The counts of this life, rewritten after every batch (a rename: a
    // SIGKILL leaves the previous whole file), so that killed relays count.
    let counts_file = args
        .dir
        .join(format!("relay-{}-{}.counts", args.index, args.generation));
    let counts = Mutex::new(Tally::default());
    let relay = icache::db::Relay::builder(&args.db_url, cache).and_then(|b| {
        b.poll_interval(Duration::from_millis(100))
            // Small batches: more of them, so kills land mid-batch.
            .batch_size(64)
            .after_bump(move |tokens| {
                let recorded = applied(&db, tokens)?;
                let mut c = counts.lock().unwrap_or_else(PoisonError::into_inner);
                c.add("relay.batches", 1);
                c.add(
                    "bumps_ok",
                    tokens.iter().filter(|t| t.starts_with("item:")).count() as u64,
                );
                c.add("relay.applied_records", recorded);
                // Counts only: a failed write must not fail the batch.
                let tmp = counts_file.with_extension("tmp");
                if std::fs::write(&tmp, c.to_line()).is_ok() {
                    let _ = std::fs::rename(&tmp, &counts_file);
                }
                Ok(())
            })
            .spawn()
    });
    let relay = match relay {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relay {}: {e}", args.index);
            std::process::exit(2);
        }
    };
    let stop = args.dir.join(RELAY_STOP);
    while !stop.exists() && parent_alive() {
        thread::sleep(Duration::from_millis(20));
    }
    let stats = relay.stop();
    let mut tally = Tally::default();
    tally.add("relay.errors", stats.errors);
    report(&tally)
}

/// Gone when the orchestrator is (this process was handed to another parent).
fn parent_alive() -> bool {
    static PARENT: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let now = std::os::unix::process::parent_id();
    *PARENT.get_or_init(|| now) == now
}

fn report(tally: &Tally) -> ! {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "REPORT {}", tally.to_line());
    let _ = out.flush();
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::{Db, applied};

    #[test]
    fn applied_records_only_values_whose_item_was_bumped_in_the_batch() {
        let dir = std::env::temp_dir().join(format!("icache-chaos-applied-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("db");
        Db::create(&path, 4).expect("create");
        let db = Db::open(&path, 4).expect("open");
        let tokens: Vec<String> = ["item:1", "v:1:6", "v:1:7", "v:2:9", "bogus", "v:x:1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(applied(&db, &tokens).expect("applied"), 2);
        assert_eq!(db.completed(&[1, 2]).expect("read"), vec![7, 0]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
