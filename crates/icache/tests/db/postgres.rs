//! The outbox on a real PostgreSQL: triggers fired by `psql` writers outside
//! the app, the relay, its failure cases.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use icache::ICache;
use icache::db::{self, DbErrorKind, Relay};
use icache_test_support as support;
use postgres::{Client, NoTls};

use crate::{Block, redis, wait_for};

/// A server with the movies schema installed and watched.
fn movies_db(pg: &support::PostgresServer, name: &str) -> String {
    let url = pg.create_database(name);
    pg.psql(
        name,
        "CREATE TABLE movies (id int PRIMARY KEY, title text NOT NULL);
         CREATE TABLE ratings (user_id int NOT NULL, movie_id int NOT NULL, rating int NOT NULL,
                               PRIMARY KEY (user_id, movie_id));
         INSERT INTO movies VALUES (1, 'One'), (2, 'Two');
         INSERT INTO ratings VALUES (1, 1, 5), (1, 2, 3), (2, 2, 4);",
    )
    .expect("schema");
    db::install(&url).expect("install");
    db::install(&url).expect("install is idempotent");
    let watch = db::watch(&url, "movies", &["'movies'", "'movie:' || id"]).expect("watch movies");
    let shown = watch.to_string();
    assert!(shown.contains("TRUNCATE"), "{shown}");
    assert!(
        shown.contains("movies, movie:"),
        "the example row's tokens: {shown}"
    );
    db::watch(&url, "ratings", &["'movies'", "'user:' || user_id"]).expect("watch ratings");
    url
}

fn gens(cache: &ICache, tokens: &[&str]) -> Vec<u64> {
    cache.generations(tokens).expect("generations")
}

fn pending(pg: &support::PostgresServer, db: &str) -> u64 {
    pg.psql(db, "SELECT count(*) FROM icache_outbox")
        .expect("count")
        .parse()
        .expect("a number")
}

#[test]
fn psql_writes_invalidate_the_right_blocks_and_a_rollback_nothing() {
    let Some(pg) = support::PostgresServer::start() else {
        return;
    };
    let Some((_redis, cache)) = redis() else {
        return;
    };
    let url = movies_db(&pg, "app");
    let relay = Relay::builder(&url, cache.clone())
        .expect("builder")
        .spawn()
        .expect("spawn");

    let blocks = |names: &[(&str, &[&str])]| -> Vec<Block> {
        names.iter().map(|(k, t)| Block::new(k, t)).collect()
    };
    let all = blocks(&[
        ("list", &["movies"]),
        ("m1", &["movie:1"]),
        ("m2", &["movie:2"]),
        ("m3", &["movie:3"]),
        ("u1", &["user:1"]),
        ("u2", &["user:2"]),
        ("u3", &["user:3"]),
    ]);
    // Each case: a psql statement outside the app, and which blocks it must
    // invalidate (all others stay served).
    let cases: &[(&str, &[&str])] = &[
        (
            "UPDATE movies SET title = 'Uno' WHERE id = 1",
            &["list", "m1"],
        ),
        ("INSERT INTO movies VALUES (3, 'Three')", &["list", "m3"]),
        ("DELETE FROM movies WHERE id = 2", &["list", "m2"]),
        // A rating moved from user 1 to user 3 invalidates both.
        (
            "UPDATE ratings SET user_id = 3 WHERE user_id = 1 AND movie_id = 1",
            &["list", "u1", "u3"],
        ),
        (
            "BEGIN; UPDATE movies SET title = 'x'; DELETE FROM ratings; ROLLBACK",
            &[],
        ),
        ("BEGIN; SELECT icache_bump('user:2'); COMMIT", &["u2"]),
        (
            "BEGIN; SELECT icache_bump('user:1', 'movie:1'); ROLLBACK",
            &[],
        ),
        ("TRUNCATE movies", &["list", "m1", "m3"]),
    ];
    for (sql, invalidated) in cases {
        for b in &all {
            b.store(&cache);
            assert!(b.served(&cache));
        }
        pg.psql("app", sql).expect(sql);
        // Everything committed before flush() is applied when it returns.
        relay.flush(Duration::from_secs(5)).expect("flush");
        for b in &all {
            let expected = !invalidated.contains(&b.key.as_str());
            assert_eq!(
                b.served(&cache),
                expected,
                "after {sql:?}: block {} served?",
                b.key
            );
        }
        assert_eq!(pending(&pg, "app"), 0, "after {sql:?}");
    }
    let stats = relay.stats();
    assert!(stats.rows > 0 && stats.bumps > 0, "{stats:?}");
    relay.stop();
}

#[test]
fn statement_level_triggers_write_one_row_per_distinct_token() {
    let Some(pg) = support::PostgresServer::start() else {
        return;
    };
    let url = pg.create_database("bulk");
    pg.psql(
        "bulk",
        "CREATE TABLE items (id int PRIMARY KEY, owner int, n int NOT NULL);
         INSERT INTO items SELECT g, g % 10, 0 FROM generate_series(1, 10000) g;",
    )
    .expect("schema");
    db::install(&url).expect("install");
    db::watch(&url, "items", &["'items'", "'owner:' || owner"]).expect("watch");
    pg.psql("bulk", "UPDATE items SET n = n + 1")
        .expect("update");
    // 10,000 rows, 11 distinct tokens: 11 outbox rows, not 20,000.
    assert_eq!(pending(&pg, "bulk"), 11);
    // A NULL token bumps nothing.
    pg.psql(
        "bulk",
        "DELETE FROM icache_outbox; UPDATE items SET owner = NULL WHERE id = 1",
    )
    .expect("update");
    let tokens = pg
        .psql(
            "bulk",
            "SELECT string_agg(token, ',' ORDER BY token) FROM icache_outbox",
        )
        .expect("tokens");
    assert_eq!(tokens, "items,owner:1");
    let status = db::status(&url).expect("status");
    assert_eq!(status.pending, 2);
    assert!(status.oldest.is_some());
    assert_eq!(status.watched.len(), 1);
    assert_eq!(
        status.watched[0].expressions,
        ["'items'", "'owner:' || owner"]
    );
    // unwatch: no more rows.
    assert!(db::unwatch(&url, "items").expect("unwatch"));
    assert!(!db::unwatch(&url, "items").expect("unwatch again"));
    pg.psql("bulk", "DELETE FROM icache_outbox; UPDATE items SET n = 0")
        .expect("update");
    assert_eq!(pending(&pg, "bulk"), 0);
    assert!(db::status(&url).expect("status").watched.is_empty());
}

#[test]
fn watch_errors_name_the_problem() {
    let Some(pg) = support::PostgresServer::start() else {
        return;
    };
    let url = pg.create_database("errs");
    pg.psql("errs", "CREATE TABLE movies (id int PRIMARY KEY)")
        .expect("schema");
    let e = db::watch(&url, "movies", &["'movies'"]).expect_err("not installed");
    assert_eq!(e.kind(), DbErrorKind::NotInstalled, "{e}");
    assert!(e.to_string().contains("icache db install"), "{e}");
    db::install(&url).expect("install");
    let e = db::watch(&url, "nosuch", &["'x'"]).expect_err("no table");
    assert_eq!(e.kind(), DbErrorKind::Schema);
    assert!(e.to_string().contains("nosuch"), "{e}");
    let e = db::watch(&url, "movies", &["'movies'", "'u:' || user_id"]).expect_err("no column");
    assert_eq!(e.kind(), DbErrorKind::Schema);
    assert!(
        e.to_string().contains("user_id") && e.to_string().contains("expression 2"),
        "{e}"
    );
    let e = db::watch(&url, "movies", &["'a' ; DROP TABLE movies"]).expect_err("two statements");
    assert_eq!(e.kind(), DbErrorKind::Schema, "{e}");
    let e = db::watch(&url, "movies", &[]).expect_err("no expression");
    assert_eq!(e.kind(), DbErrorKind::Usage);
    // Nothing was installed by the failures.
    assert!(db::status(&url).expect("status").watched.is_empty());
    assert_eq!(
        pg.psql("errs", "SELECT count(*) FROM movies")
            .expect("still there"),
        "0"
    );
    let e = db::status(&pg.url_of("nosuchdb")).expect_err("no database");
    assert_eq!(e.kind(), DbErrorKind::Database);
    assert!(e.to_string().contains("nosuchdb"), "{e}");
}

#[test]
fn a_writer_killed_right_after_commit_is_still_bumped() {
    let Some(pg) = support::PostgresServer::start() else {
        return;
    };
    let Some((_redis, cache)) = redis() else {
        return;
    };
    let url = movies_db(&pg, "app");
    let block = Block::new("m1", &["movie:1"]);
    block.store(&cache);
    // The writer commits, then hangs; it is killed before anything else
    // runs in it (and no relay is running yet).
    let mut writer = pg
        .psql_command("app", "-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("psql");
    {
        use std::io::Write;
        let stdin = writer.stdin.as_mut().expect("stdin");
        stdin
            .write_all(b"BEGIN; UPDATE movies SET title = 'Killed' WHERE id = 1; COMMIT; SELECT pg_sleep(60);\n")
            .expect("write");
    }
    wait_for(Duration::from_secs(10), "the commit", || {
        pg.psql("app", "SELECT title FROM movies WHERE id = 1")
            .expect("read")
            == "Killed"
    });
    let _ = Command::new("kill")
        .args(["-KILL", &writer.id().to_string()])
        .status();
    let _ = writer.wait();
    assert!(block.served(&cache), "nothing ran yet");
    let relay = Relay::builder(&url, cache.clone())
        .expect("builder")
        .spawn()
        .expect("spawn");
    relay.flush(Duration::from_secs(5)).expect("flush");
    assert!(!block.served(&cache), "the committed change was bumped");
    relay.stop();
}

#[test]
fn a_frozen_cache_loses_no_bump_of_a_thousand_commits() {
    let Some(pg) = support::PostgresServer::start() else {
        return;
    };
    let Some((redis, _)) = redis() else { return };
    let url = movies_db(&pg, "app");
    // A short time-out, so the frozen cache fails fast.
    let cache = ICache::from_url(&format!("{}?timeout_ms=100", redis.url())).expect("cache");
    let mut client = Client::connect(&url, NoTls).expect("connect");
    client
        .batch_execute("INSERT INTO movies SELECT g, 'm' || g FROM generate_series(3, 1000) g")
        .expect("rows");
    let relay = Relay::builder(&url, cache.clone())
        .expect("builder")
        .poll_interval(Duration::from_millis(200))
        .spawn()
        .expect("spawn");
    relay.flush(Duration::from_secs(10)).expect("settled");
    let blocks: Vec<Block> = (1..=1000)
        .map(|i| Block::new(&format!("m{i}"), &[&format!("movie:{i}")]))
        .collect();
    for b in &blocks {
        b.store(&cache);
    }
    let before: Vec<u64> = blocks
        .iter()
        .map(|b| gens(&cache, &[&b.tokens[0]])[0])
        .collect();
    let pid = redis.pid().expect("pid").to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    // 1,000 transactions, one row each, while the cache is frozen.
    for i in 1..=1000 {
        client
            .execute(
                "UPDATE movies SET title = title || '!' WHERE id = $1",
                &[&i],
            )
            .expect("update");
    }
    assert!(
        relay.flush(Duration::from_millis(300)).is_err(),
        "nothing can be applied now"
    );
    assert!(pending(&pg, "app") > 0, "the rows wait");
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .expect("kill")
            .success()
    );
    // The breaker's back-off and the relay's: a few seconds at most.
    relay
        .flush(Duration::from_secs(20))
        .expect("applied after the cache is back");
    assert_eq!(pending(&pg, "app"), 0, "outbox empty");
    let mut stale = 0;
    for (b, old) in blocks.iter().zip(before) {
        assert_ne!(
            gens(&cache, &[&b.tokens[0]])[0],
            old,
            "{} bumped",
            b.tokens[0]
        );
        if b.served(&cache) {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "stale reads");
    relay.stop();
}

#[test]
fn a_restarted_postgres_is_picked_up_within_the_poll_interval() {
    let Some(mut pg) = support::PostgresServer::start() else {
        return;
    };
    let Some((_redis, cache)) = redis() else {
        return;
    };
    let url = movies_db(&pg, "app");
    let poll = Duration::from_secs(1);
    let relay = Relay::builder(&url, cache.clone())
        .expect("builder")
        .poll_interval(poll)
        .spawn()
        .expect("spawn");
    let block = Block::new("m1", &["movie:1"]);
    let listening = |pg: &support::PostgresServer| {
        wait_for(
            Duration::from_secs(20),
            "the relay's LISTEN connection",
            || {
                pg.psql(
                    "app",
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
                )
                .is_ok_and(|n| n != "0")
            },
        )
    };
    // Listening: a commit is applied at once (NOTIFY), within the poll.
    listening(&pg);
    block.store(&cache);
    pg.psql("app", "UPDATE movies SET title = 'a' WHERE id = 1")
        .expect("update");
    let took = wait_for(Duration::from_secs(5), "bump", || !block.served(&cache));
    assert!(took < poll, "NOTIFY wakes the relay: {took:?}");

    pg.restart();
    // Commits right after the restart: applied by the poll (or the
    // listener's reconnect), at most the poll plus the reconnect back-off.
    block.store(&cache);
    pg.psql("app", "UPDATE movies SET title = 'b' WHERE id = 1")
        .expect("update");
    let took = wait_for(Duration::from_secs(10), "bump after restart", || {
        !block.served(&cache)
    });
    assert!(took < poll + Duration::from_secs(3), "{took:?}");
    // Listening again (NOTIFY sent while it was away is lost, so the relay
    // drained after reconnecting): within the poll interval again.
    listening(&pg);
    block.store(&cache);
    pg.psql("app", "UPDATE movies SET title = 'c' WHERE id = 1")
        .expect("update");
    let took = wait_for(Duration::from_secs(5), "bump after reconnect", || {
        !block.served(&cache)
    });
    assert!(took < poll, "{took:?}");
    assert_eq!(pending(&pg, "app"), 0);
    relay.stop();
}

#[test]
fn after_bump_failures_keep_the_rows_and_are_retried() {
    let Some(pg) = support::PostgresServer::start() else {
        return;
    };
    let Some((_redis, cache)) = redis() else {
        return;
    };
    let url = movies_db(&pg, "app");
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let relay = Relay::builder(&url, cache.clone())
        .expect("builder")
        .after_bump(move |tokens| {
            assert!(!tokens.is_empty());
            // The first two calls fail: the rows must stay and come back.
            if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                Err("purge endpoint down".into())
            } else {
                Ok(())
            }
        })
        .spawn()
        .expect("spawn");
    pg.psql("app", "UPDATE movies SET title = 'z' WHERE id = 1")
        .expect("update");
    let start = Instant::now();
    relay
        .flush(Duration::from_secs(10))
        .expect("flush after retries");
    assert!(calls.load(Ordering::SeqCst) >= 3, "retried");
    assert!(
        start.elapsed() >= Duration::from_millis(100),
        "with back-off"
    );
    assert_eq!(pending(&pg, "app"), 0);
    assert!(relay.stats().errors >= 2);
    relay.stop();
}
