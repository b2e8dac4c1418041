//! The outbox on SQLite files: row triggers, the in-process relay, errors.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use icache::ICache;
use icache::db::{self, DbErrorKind, Relay};
use rusqlite::Connection;

use crate::Block;

/// A fresh SQLite file (removed on drop) with the movies schema.
struct File {
    dir: PathBuf,
}

impl File {
    fn new() -> File {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "icache-db-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = File { dir };
        let conn = file.conn();
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        conn.execute_batch(
            "CREATE TABLE movies (id INTEGER PRIMARY KEY, title TEXT NOT NULL);
             CREATE TABLE ratings (user_id INTEGER NOT NULL, movie_id INTEGER NOT NULL, rating INTEGER NOT NULL,
                                   PRIMARY KEY (user_id, movie_id));
             INSERT INTO movies VALUES (1, 'One'), (2, 'Two');
             INSERT INTO ratings VALUES (1, 1, 5), (1, 2, 3), (2, 2, 4);",
        )
        .expect("schema");
        file
    }

    fn path(&self) -> PathBuf {
        self.dir.join("app.db")
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.path().display())
    }

    /// Another writer's connection (as the application has its own).
    fn conn(&self) -> Connection {
        let conn = Connection::open(self.path()).expect("open");
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        conn
    }

    fn pending(&self) -> i64 {
        self.conn()
            .query_row("SELECT count(*) FROM icache_outbox", [], |r| r.get(0))
            .expect("count")
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn watched(file: &File) {
    db::install(&file.url()).expect("install");
    db::install(&file.url()).expect("install again");
    let watch = db::watch(&file.url(), "movies", &["'movies'", "'movie:' || id"]).expect("watch");
    assert!(watch.to_string().contains("movies, movie:1"), "{watch}");
    db::watch(&file.url(), "ratings", &["'movies'", "'user:' || user_id"]).expect("watch");
}

#[test]
fn sqlite_writes_invalidate_the_right_blocks_and_flush_reads_own_writes() {
    let file = File::new();
    watched(&file);
    let cache = ICache::memory();
    // No poll in the test's time: only flush() wakes it, so the tokens it
    // reports are exactly the statement's.
    let relay = Relay::builder(&file.url(), cache.clone())
        .expect("builder")
        .poll_interval(Duration::from_secs(600))
        .spawn()
        .expect("spawn");
    let all: Vec<Block> = [
        ("list", "movies"),
        ("m1", "movie:1"),
        ("m2", "movie:2"),
        ("m3", "movie:3"),
        ("u1", "user:1"),
        ("u3", "user:3"),
    ]
    .iter()
    .map(|(k, t)| Block::new(k, &[t]))
    .collect();
    let writer = file.conn();
    let cases: &[(&str, &[&str])] = &[
        (
            "UPDATE movies SET title = 'Uno' WHERE id = 1",
            &["movies", "movie:1"],
        ),
        (
            "INSERT INTO movies VALUES (3, 'Three')",
            &["movies", "movie:3"],
        ),
        ("DELETE FROM movies WHERE id = 2", &["movies", "movie:2"]),
        (
            "UPDATE ratings SET user_id = 3 WHERE user_id = 1 AND movie_id = 1",
            &["movies", "user:1", "user:3"],
        ),
        (
            "BEGIN; UPDATE movies SET title = 'x'; DELETE FROM ratings; ROLLBACK",
            &[],
        ),
        (
            "BEGIN; INSERT INTO icache_outbox (token) VALUES ('user:1'); COMMIT",
            &["user:1"],
        ),
        ("DELETE FROM movies", &["movies", "movie:1", "movie:3"]),
    ];
    for (sql, bumped) in cases {
        for b in &all {
            b.store(&cache);
        }
        writer.execute_batch(sql).expect(sql);
        let mut tokens = relay.flush(Duration::from_secs(5)).expect("flush");
        tokens.sort();
        let mut expected: Vec<&str> = bumped.to_vec();
        expected.sort();
        assert_eq!(tokens, expected, "tokens applied for {sql:?}");
        for b in &all {
            assert_eq!(
                b.served(&cache),
                !bumped.contains(&b.tokens[0].as_str()),
                "after {sql:?}: {}",
                b.key
            );
        }
        assert_eq!(file.pending(), 0);
    }
    relay.stop();
}

#[test]
fn sqlite_flush_after_commit_is_immediate_and_polls_catch_the_rest() {
    let file = File::new();
    watched(&file);
    let cache = ICache::memory();
    let poll = Duration::from_millis(500);
    let relay = Relay::builder(&file.url(), cache.clone())
        .expect("builder")
        .poll_interval(poll)
        .spawn()
        .expect("spawn");
    let block = Block::new("m1", &["movie:1"]);
    let writer = file.conn();
    // Read your writes: flush returns once the bump is applied.
    block.store(&cache);
    writer
        .execute("UPDATE movies SET title = 'a' WHERE id = 1", [])
        .expect("update");
    let start = std::time::Instant::now();
    relay.flush(Duration::from_secs(5)).expect("flush");
    assert!(!block.served(&cache));
    assert!(
        start.elapsed() < poll,
        "woken, not polled: {:?}",
        start.elapsed()
    );
    // Another process's commit (no wake-up): the poll finds it.
    block.store(&cache);
    writer
        .execute("UPDATE movies SET title = 'b' WHERE id = 1", [])
        .expect("update");
    let took = crate::wait_for(Duration::from_secs(5), "polled bump", || {
        !block.served(&cache)
    });
    // One poll interval, plus slack for a loaded machine.
    assert!(took < poll * 2, "{took:?}");
    relay.stop();
}

#[test]
fn two_sqlite_relays_share_one_outbox_and_lose_nothing() {
    let file = File::new();
    watched(&file);
    let cache = ICache::memory();
    let writer = file.conn();
    writer
        .execute_batch(
            "WITH RECURSIVE g(i) AS (SELECT 3 UNION ALL SELECT i + 1 FROM g WHERE i < 500)
             INSERT INTO movies SELECT i, 'm' || i FROM g;
             DELETE FROM icache_outbox;",
        )
        .expect("rows");
    let blocks: Vec<Block> = (1..=500)
        .map(|i| Block::new(&format!("m{i}"), &[&format!("movie:{i}")]))
        .collect();
    for b in &blocks {
        b.store(&cache);
    }
    let relays: Vec<Relay> = (0..2)
        .map(|_| {
            Relay::builder(&file.url(), cache.clone())
                .expect("builder")
                .batch_size(7)
                .poll_interval(Duration::from_millis(20))
                .spawn()
                .expect("spawn")
        })
        .collect();
    for i in 1..=500 {
        writer
            .execute("UPDATE movies SET title = title || '!' WHERE id = ?1", [i])
            .expect("update");
    }
    for relay in &relays {
        relay.flush(Duration::from_secs(10)).expect("flush");
    }
    assert_eq!(file.pending(), 0);
    assert!(
        blocks.iter().all(|b| !b.served(&cache)),
        "every token bumped"
    );
    let rows: u64 = relays.iter().map(|r| r.stats().rows).sum();
    assert!(rows >= 500, "{rows}");
}

#[test]
fn sqlite_errors_name_the_problem() {
    let file = File::new();
    let e = db::status(&file.url()).expect_err("not installed");
    assert_eq!(e.kind(), DbErrorKind::NotInstalled);
    let missing = format!("sqlite://{}/nosuch.db", file.dir.display());
    let e = db::install(&missing).expect_err("no file");
    assert_eq!(e.kind(), DbErrorKind::Usage);
    assert!(e.to_string().contains("no database file"), "{e}");
    assert!(!file.dir.join("nosuch.db").exists(), "no file was created");
    let junk = file.dir.join("junk.db");
    std::fs::write(&junk, vec![b'x'; 4096]).expect("junk");
    let e = db::install(&format!("sqlite://{}", junk.display())).expect_err("not a database");
    assert!(e.to_string().contains("not a SQLite database"), "{e}");
    db::install(&file.url()).expect("install");
    let e = db::watch(&file.url(), "nosuch", &["'x'"]).expect_err("no table");
    assert_eq!(e.kind(), DbErrorKind::Schema);
    assert!(e.to_string().contains("nosuch"), "{e}");
    let e =
        db::watch(&file.url(), "movies", &["'movies'", "'u:' || user_id"]).expect_err("no column");
    assert_eq!(e.kind(), DbErrorKind::Schema);
    assert!(e.to_string().contains("user_id"), "{e}");
    assert!(db::status(&file.url()).expect("status").watched.is_empty());
    let e = Relay::builder("sqlite://relative.db", ICache::memory())
        .err()
        .expect("relative path");
    assert_eq!(e.kind(), DbErrorKind::Usage);
}
