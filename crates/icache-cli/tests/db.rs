//! `icache db …` and `icache relay` as processes, on a real PostgreSQL (run
//! as its `postgres` user), SQLite files and a real `redis-server`. Skipped
//! loudly when a server is missing; failing instead when `CI=true`.

use icache_test_support as support;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use icache::ICache;

fn icache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_icache"))
        .args(args)
        .env_remove("ICACHE_URL")
        .output()
        .expect("run the icache binary")
}

#[track_caller]
fn assert_exit(o: &Output, expected: i32, what: &str) -> String {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(
        o.status.code(),
        Some(expected),
        "{what}\n--- stdout:\n{out}--- stderr:\n{err}"
    );
    format!("{out}{err}")
}

fn relay_process(cache: &str, db: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_icache"))
        .args([
            "--url",
            cache,
            "relay",
            "--db",
            db,
            "--batch",
            "20",
            "--poll-ms",
            "100",
        ])
        .env_remove("ICACHE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn icache relay")
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig}");
}

fn sqlite_file(dir: &std::path::Path) -> String {
    let path = dir.join("app.db");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("test -e {0} || : > {0}", path.display()))
        .status()
        .expect("touch");
    assert!(out.success());
    format!("sqlite://{}", path.display())
}

#[test]
fn db_commands_print_what_they_did_and_exit_with_the_right_code() {
    // SQLite needs no server: these always run.
    let dir = std::env::temp_dir().join(format!("icache-cli-db-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let db = sqlite_file(&dir);
    // An empty file is a valid, empty SQLite database.
    let o = icache(&["db", "status", "--db", &db]);
    let text = assert_exit(&o, 1, "status before install");
    assert!(
        text.contains("not installed") && text.contains("icache db install"),
        "{text}"
    );
    let text = assert_exit(&icache(&["db", "install", "--db", &db]), 0, "install");
    assert!(text.contains("installed"), "{text}");
    assert_exit(&icache(&["db", "install", "--db", &db]), 0, "install again");
    let text = assert_exit(
        &icache(&["db", "watch", "--db", &db, "movies", "'movies'"]),
        2,
        "no table",
    );
    assert!(text.contains("table movies does not exist"), "{text}");

    let usage: &[(&[&str], &str)] = &[
        (
            &["db", "install", "--db", "mysql://root@db/app"],
            "mysql://",
        ),
        (
            &["db", "install", "--db", "sqlite://relative.db"],
            "absolute",
        ),
        (
            &["db", "install", "--db", "postgres://u@h:notaport/x"],
            "port",
        ),
        (&["db", "watch", "--db", &db, "movies"], "TOKEN_EXPR"),
        (&["db", "install"], "--db"),
        (&["relay", "--db", &db], "shared cache"),
    ];
    for (args, names) in usage {
        let text = assert_exit(&icache(args), 2, &format!("{args:?}"));
        assert!(
            text.contains(names),
            "{args:?} should name {names:?}: {text}"
        );
    }
    let missing = format!("sqlite://{}/nosuch.db", dir.display());
    let text = assert_exit(&icache(&["db", "status", "--db", &missing]), 2, "no file");
    assert!(text.contains("no database file"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);

    let Some(pg) = support::PostgresServer::start() else {
        return;
    };
    let url = pg.create_database("cli");
    pg.psql("cli", "CREATE TABLE movies (id int PRIMARY KEY, title text); INSERT INTO movies VALUES (7, 'Seven')")
        .expect("schema");
    let text = assert_exit(
        &icache(&["db", "watch", "--db", &url, "movies", "'movies'"]),
        1,
        "not installed",
    );
    assert!(text.contains("not installed"), "{text}");
    assert_exit(&icache(&["db", "install", "--db", &url]), 0, "install");
    let text = assert_exit(
        &icache(&[
            "db",
            "watch",
            "--db",
            &url,
            "movies",
            "'movies'",
            "'movie:' || id",
        ]),
        0,
        "watch",
    );
    assert!(
        text.contains("UPDATE") && text.contains("movies, movie:7"),
        "prints what changes bump: {text}"
    );
    let text = assert_exit(
        &icache(&["db", "watch", "--db", &url, "movies", "'u:' || user_id"]),
        2,
        "no column",
    );
    assert!(text.contains("user_id"), "{text}");
    pg.psql("cli", "UPDATE movies SET title = 'Sept'")
        .expect("update");
    let text = assert_exit(&icache(&["db", "status", "--db", &url]), 0, "status");
    assert!(text.contains("pending 2"), "{text}");
    assert!(
        text.contains("watched movies: 'movies' | 'movie:' || id"),
        "{text}"
    );
    let text = assert_exit(
        &icache(&["db", "unwatch", "--db", &url, "movies"]),
        0,
        "unwatch",
    );
    assert!(text.contains("unwatched movies"), "{text}");
    let text = assert_exit(&icache(&["db", "status", "--db", &url]), 0, "status");
    assert!(text.contains("watched (none)"), "{text}");
    let unreachable = format!("postgres://postgres@127.0.0.1:{}/cli", pg.port() ^ 1);
    let text = assert_exit(
        &icache(&["db", "status", "--db", &unreachable]),
        1,
        "unreachable",
    );
    assert!(text.contains("127.0.0.1"), "{text}");
    let secret = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/nosuchdb",
        pg.port()
    );
    let text = assert_exit(
        &icache(&["db", "status", "--db", &secret]),
        1,
        "no such database",
    );
    assert!(
        text.contains("nosuchdb") && !text.contains("hunter2"),
        "{text}"
    );
}

/// Whether the relay whose connections are named `name` is inside a batch:
/// it claimed rows (its transaction is open) and has not committed yet.
fn mid_batch(pg: &support::PostgresServer, name: &str) -> bool {
    pg.psql(
        "app",
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}' \
             AND state = 'idle in transaction'"
        ),
    )
    .is_ok_and(|n| n != "0")
}

#[test]
fn three_relays_one_killed_mid_batch_another_restarted_lose_no_token() {
    let Some(pg) = support::PostgresServer::start() else {
        return;
    };
    let Some(redis) = support::RedisServer::start() else {
        return;
    };
    let url = pg.create_database("app");
    pg.psql("app", "CREATE TABLE events (id int PRIMARY KEY)")
        .expect("schema");
    assert_exit(&icache(&["db", "install", "--db", &url]), 0, "install");
    assert_exit(
        &icache(&["db", "watch", "--db", &url, "events", "'event:' || id"]),
        0,
        "watch",
    );
    let cache = ICache::from_url(&redis.url()).expect("cache");
    const COMMITS: i32 = 3000;
    let tokens: Vec<String> = (1..=COMMITS).map(|i| format!("event:{i}")).collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let before = cache.generations(&refs).expect("generations");

    let named = |name: &str| format!("{url}?application_name={name}");
    let mut relays: Vec<Child> = ["r0", "r1", "r2"]
        .iter()
        .map(|n| relay_process(&redis.url(), &named(n)))
        .collect();
    // The writer: one transaction per token, from another thread.
    let writer_url = url.clone();
    let writer = std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&writer_url, postgres::NoTls).expect("connect");
        for i in 1..=COMMITS {
            client
                .execute("INSERT INTO events VALUES ($1)", &[&i])
                .expect("insert");
        }
    });

    // Kill r0 with SIGKILL while it holds a claimed batch: freeze it until
    // it is caught inside one, then kill it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "r0 never caught mid-batch");
        signal(&relays[0], "STOP");
        if mid_batch(&pg, "r0") {
            break;
        }
        signal(&relays[0], "CONT");
        std::thread::sleep(Duration::from_millis(3));
    }
    signal(&relays[0], "KILL");
    let _ = relays[0].wait();
    // r1: a clean stop (SIGTERM: exit 0 after the batch in hand), restarted.
    signal(&relays[1], "TERM");
    let status = relays[1].wait().expect("wait r1");
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    relays[1] = relay_process(&redis.url(), &named("r1b"));

    writer.join().expect("writer");
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg
        .psql("app", "SELECT count(*) FROM icache_outbox")
        .expect("count")
        != "0"
    {
        assert!(Instant::now() < deadline, "outbox not drained");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = cache.generations(&refs).expect("generations");
    let missed: Vec<&str> = refs
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| b == a)
        .map(|(t, _)| *t)
        .collect();
    assert!(
        missed.is_empty(),
        "{} committed tokens never bumped, e.g. {:?}",
        missed.len(),
        &missed[..missed.len().min(5)]
    );
    for relay in &mut relays[1..] {
        signal(relay, "TERM");
        assert_eq!(relay.wait().expect("wait").code(), Some(0));
    }
}
