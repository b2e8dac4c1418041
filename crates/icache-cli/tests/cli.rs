//! End-to-end tests of the `icache` binary against real `redis-server` and
//! `memcached` processes (skipped, loudly, when they are not installed; they
//! fail instead when `CI=true`).

use icache_test_support as support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use icache::ICache;

/// A running server of one backend kind, stopped when dropped.
enum Server {
    Redis(support::RedisServer),
    Memcached(support::MemcachedServer),
}

impl Server {
    fn name(&self) -> &'static str {
        match self {
            Server::Redis(_) => "redis",
            Server::Memcached(_) => "memcached",
        }
    }

    fn url(&self) -> String {
        match self {
            Server::Redis(s) => s.url(),
            Server::Memcached(s) => s.url(),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Server::Redis(s) => s.port(),
            Server::Memcached(s) => s.port(),
        }
    }

    fn stop(&mut self) {
        match self {
            Server::Redis(s) => s.stop(),
            Server::Memcached(s) => s.stop(),
        }
    }

    /// A field `stats` always shows for this backend.
    fn known_stat(&self) -> &'static str {
        match self {
            Server::Redis(_) => "used_memory",
            Server::Memcached(_) => "curr_items",
        }
    }
}

/// One fresh server per backend that is installed.
fn servers() -> Vec<Server> {
    let mut servers = Vec::new();
    if let Some(s) = support::RedisServer::start() {
        servers.push(Server::Redis(s));
    }
    if let Some(s) = support::MemcachedServer::start() {
        servers.push(Server::Memcached(s));
    }
    servers
}

/// Runs the binary with `args`, without any inherited `ICACHE_URL`.
fn icache(args: &[&str]) -> Output {
    icache_with_env(args, None)
}

fn icache_with_env(args: &[&str], env_url: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_icache"));
    cmd.args(args).env_remove("ICACHE_URL");
    if let Some(url) = env_url {
        cmd.env("ICACHE_URL", url);
    }
    cmd.output().expect("run the icache binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status
        .code()
        .expect("icache exited normally, not by a signal")
}

/// Asserts the exit code, showing the output when it differs.
#[track_caller]
fn assert_code(o: &Output, expected: i32, what: &str) {
    assert_eq!(
        code(o),
        expected,
        "{what}: exit code\n--- stdout:\n{}--- stderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

/// The `NAME VALUE` lines of an output, as pairs.
fn pairs(o: &Output) -> Vec<(String, String)> {
    stdout(o)
        .lines()
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a `NAME VALUE` line: {l:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn number(o: &Output, name: &str) -> u64 {
    let pairs = pairs(o);
    let (_, v) = pairs
        .iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no `{name}` line in {:?}", stdout(o)));
    v.parse()
        .unwrap_or_else(|e| panic!("`{name} {v}` is not a number: {e}"))
}

#[test]
fn bump_prints_increasing_generations() {
    for server in servers() {
        let url = server.url();
        let what = server.name();
        let first = icache(&["bump", "--url", &url, "movies", "user:42"]);
        assert_code(&first, 0, what);
        let lines = pairs(&first);
        assert_eq!(
            lines.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["movies", "user:42"],
            "{what}"
        );
        // --url also works before the subcommand.
        let second = icache(&["--url", &url, "bump", "movies", "user:42"]);
        assert_code(&second, 0, what);
        for token in ["movies", "user:42"] {
            assert_eq!(
                number(&second, token),
                number(&first, token).wrapping_add(1),
                "{what}: {token}"
            );
        }
        assert_eq!(stderr(&second), "", "{what}: no warning for a network URL");
    }
}

#[test]
fn version_is_the_sum_and_follows_bumps() {
    for server in servers() {
        let url = server.url();
        let what = server.name();
        let bumped = icache(&["bump", "--url", &url, "movies"]);
        assert_code(&bumped, 0, what);
        let movies = number(&bumped, "movies");

        let v1 = icache(&["version", "--url", &url, "movies", "user:42"]);
        assert_code(&v1, 0, what);
        assert_eq!(
            number(&v1, "movies"),
            movies,
            "{what}: generation after bump"
        );
        let user = number(&v1, "user:42");
        assert_ne!(user, 0, "{what}: a fresh generation is never 0");
        let sum = number(&v1, "version");
        assert_eq!(sum, movies.wrapping_add(user), "{what}: version is the sum");
        assert_eq!(
            stdout(&v1).lines().last(),
            Some(format!("version {sum}").as_str()),
            "{what}"
        );

        // The same number the library computes.
        let cache = ICache::from_url(&url).expect("open the cache");
        assert_eq!(
            cache.get_sum(&["movies", "user:42"]).expect("get_sum"),
            sum,
            "{what}: get_sum"
        );

        // Stable until a bump, then +1.
        let v2 = icache(&["version", "--url", &url, "movies", "user:42"]);
        assert_eq!(number(&v2, "version"), sum, "{what}: stable");
        assert_code(&icache(&["bump", "--url", &url, "user:42"]), 0, what);
        let v3 = icache(&["version", "--url", &url, "movies", "user:42"]);
        assert_code(&v3, 0, what);
        assert_eq!(number(&v3, "version"), sum.wrapping_add(1), "{what}: +1");
    }
}

#[test]
fn tokens_that_are_not_plain_words_are_quoted() {
    for server in servers() {
        let url = server.url();
        let what = server.name();
        let out = icache(&["bump", "--url", &url, "two words", "line\nbreak"]);
        assert_code(&out, 0, what);
        let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 2, "{what}: {lines:?}");
        assert!(lines[0].starts_with("\"two words\" "), "{what}: {lines:?}");
        assert!(
            lines[1].starts_with("\"line\\nbreak\" "),
            "{what}: {lines:?}"
        );
    }
}

#[test]
fn get_prints_the_value_or_exits_4() {
    for server in servers() {
        let url = server.url();
        let what = server.name();
        let cache = ICache::from_url(&url).expect("open the cache");
        cache.set("greeting", "hello", None).expect("set");
        cache
            .set_bytes("raw", vec![0xff, 0x00, b'x'], None)
            .expect("set_bytes");

        let got = icache(&["get", "--url", &url, "greeting"]);
        assert_code(&got, 0, what);
        assert_eq!(stdout(&got), "hello", "{what}: the value, as is");

        let raw = icache(&["get", "--url", &url, "raw"]);
        assert_code(&raw, 0, what);
        assert_eq!(raw.stdout, [0xff, 0x00, b'x'], "{what}: raw bytes");

        let missing = icache(&["get", "--url", &url, "no-such-key"]);
        assert_code(&missing, 4, what);
        assert_eq!(stdout(&missing), "", "{what}: nothing on stdout");
        assert!(
            stderr(&missing).contains("icache: not found: no-such-key"),
            "{what}: {}",
            stderr(&missing)
        );
    }
}

#[test]
fn stats_prints_backend_url_and_server_counters() {
    for server in servers() {
        let url = server.url();
        let what = server.name();
        let out = icache(&["stats", "--url", &url]);
        assert_code(&out, 0, what);
        let text = stdout(&out);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(format!("backend {what}").as_str()));
        assert_eq!(lines.next(), Some(format!("url {url}").as_str()));
        let stat = server.known_stat();
        assert!(
            lines.any(|l| l.starts_with(&format!("{stat} "))),
            "{what}: no {stat} in\n{text}"
        );
    }
}

#[test]
fn icache_url_environment_variable_is_used() {
    for server in servers() {
        let url = server.url();
        let what = server.name();
        let out = icache_with_env(&["stats"], Some(&url));
        assert_code(&out, 0, what);
        assert!(
            stdout(&out).starts_with(&format!("backend {what}\nurl {url}\n")),
            "{what}: {}",
            stdout(&out)
        );
        assert_eq!(stderr(&out), "", "{what}: no memory:// warning");

        let bumped = icache_with_env(&["bump", "t"], Some(&url));
        assert_code(&bumped, 0, what);
        let cache = ICache::from_url(&url).expect("open the cache");
        assert_eq!(
            cache.generations(&["t"]).expect("generations"),
            [number(&bumped, "t")],
            "{what}: the bump went to the server of ICACHE_URL"
        );

        // --url wins over the variable.
        let out = icache_with_env(&["stats", "--url", &url], Some("nope://x"));
        assert_code(&out, 0, what);
    }
}

#[test]
fn usage_errors_exit_2() {
    let no_subcommand = icache(&[]);
    assert_code(&no_subcommand, 2, "no subcommand");

    for cmd in ["bump", "version"] {
        let out = icache(&[cmd, "--url", "redis://127.0.0.1:1"]);
        assert_code(&out, 2, cmd);
        assert!(stderr(&out).contains("TOKEN"), "{cmd}: {}", stderr(&out));
    }
    assert_code(&icache(&["get", "--url", "redis://127.0.0.1:1"]), 2, "get");
    assert_code(&icache(&["frobnicate"]), 2, "unknown subcommand");
    assert_code(&icache(&["stats", "--colour"]), 2, "unknown flag");

    // An empty URL (an unset shell variable) is refused, not memory://.
    for out in [
        icache_with_env(&["bump", "t"], Some("")),
        icache(&["bump", "t", "--url", " "]),
    ] {
        assert_code(&out, 2, "empty URL");
        assert!(stderr(&out).contains("empty"), "{}", stderr(&out));
        assert_eq!(stdout(&out), "");
    }
}

#[test]
fn malformed_urls_exit_2_naming_the_bad_part() {
    for (url, bad_part) in [
        ("redis://h/abc", "abc"),
        ("nope://x", "nope"),
        ("memcached://127.0.0.1:11211?colour=red", "colour"),
    ] {
        for via_env in [false, true] {
            let out = if via_env {
                icache_with_env(&["stats"], Some(url))
            } else {
                icache(&["stats", "--url", url])
            };
            assert_code(&out, 2, url);
            let err = stderr(&out);
            assert!(err.starts_with("icache: "), "{url}: {err}");
            assert!(
                err.contains(bad_part),
                "{url}: {err} does not name {bad_part}"
            );
            assert_eq!(stdout(&out), "", "{url}");
        }
    }
}

#[test]
fn unreachable_servers_exit_1_quickly() {
    for url in ["redis://127.0.0.1:1", "memcached://127.0.0.1:1"] {
        for args in [
            &["bump", "t"][..],
            &["version", "t"],
            &["get", "k"],
            &["stats"],
        ] {
            let started = Instant::now();
            let out = icache(&[args, &["--url", url]].concat());
            let took = started.elapsed();
            assert_code(&out, 1, &format!("{url} {args:?}"));
            assert!(
                took < Duration::from_secs(5),
                "{url} {args:?} took {took:?}"
            );
            assert!(
                stderr(&out).starts_with("icache: "),
                "{url} {args:?}: {}",
                stderr(&out)
            );
            assert!(
                !stderr(&out).contains("panicked"),
                "{url} {args:?}: {}",
                stderr(&out)
            );
            assert_eq!(stdout(&out), "", "{url} {args:?}: nothing on stdout");
        }
    }
}

#[test]
fn a_server_that_goes_down_exits_1() {
    for mut server in servers() {
        let url = server.url();
        let what = server.name();
        assert_code(&icache(&["bump", "--url", &url, "t"]), 0, what);
        server.stop();
        let started = Instant::now();
        let out = icache(&["bump", "--url", &url, "t"]);
        assert_code(&out, 1, what);
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
    }
}

#[test]
fn passwords_are_never_printed() {
    let mut urls = vec![
        "redis://u:hunter2@127.0.0.1:1".to_owned(),
        "redis://:hunter2@127.0.0.1:1/0".to_owned(),
        "memcached://u:hunter2@127.0.0.1:1".to_owned(),
        // Malformed after the password.
        "redis://u:hunter2@127.0.0.1:1/abc".to_owned(),
        "redis://u:hunter2@127.0.0.1:1/0?colour=red".to_owned(),
    ];
    // Reachable servers, which do not expect that password.
    for server in servers() {
        let scheme = server.name();
        urls.push(format!("{scheme}://u:hunter2@127.0.0.1:{}", server.port()));
        let mut checks = Vec::new();
        for url in &urls {
            for args in [
                &["bump", "t"][..],
                &["version", "t"],
                &["get", "k"],
                &["stats"],
            ] {
                checks.push(icache(&[args, &["--url", url]].concat()));
                checks.push(icache_with_env(args, Some(url)));
            }
            // clap must not show the variable's value in the help either.
            checks.push(icache_with_env(&["--help"], Some(url)));
            checks.push(icache_with_env(&["stats", "--help"], Some(url)));
        }
        for out in &checks {
            assert!(!stdout(out).contains("hunter2"), "stdout: {}", stdout(out));
            assert!(!stderr(out).contains("hunter2"), "stderr: {}", stderr(out));
        }
    }
}

#[test]
fn memory_url_works_but_warns() {
    for args in [&["bump", "t"][..], &["version", "t"], &["stats"]] {
        let out = icache(args);
        assert_code(&out, 0, &format!("{args:?}"));
        assert!(
            stderr(&out).contains("warning") && stderr(&out).contains("memory://"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // Each run is its own empty cache: a value is never there.
    assert_code(&icache(&["get", "k"]), 4, "get on memory://");
}

#[test]
fn help_and_version_exit_0() {
    let help = icache(&["--help"]);
    assert_code(&help, 0, "--help");
    let text = stdout(&help);
    for word in [
        "bump",
        "version",
        "get",
        "stats",
        "--url",
        "ICACHE_URL",
        "redis://",
        "memcached://",
        "memory://",
        "4  key not found",
    ] {
        assert!(
            text.contains(word),
            "--help does not mention {word}:\n{text}"
        );
    }
    for cmd in ["bump", "version", "get", "stats"] {
        let out = icache(&[cmd, "--help"]);
        assert_code(&out, 0, cmd);
        assert!(stdout(&out).contains("--url"), "{cmd} --help");
    }
    let version = icache(&["--version"]);
    assert_code(&version, 0, "--version");
    assert!(
        stdout(&version).starts_with("icache "),
        "{}",
        stdout(&version)
    );
}
