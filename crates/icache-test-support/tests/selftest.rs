//! Tests of the test-support harness itself: real
//! servers start, stop and restart, and the proxy forwards, counts and pauses.

use icache_test_support as support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use support::{MemcachedServer, Proxy, RedisCluster, RedisServer, RedisTlsServer};

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set read timeout");
    stream
}

/// Sends `request`, reads until the answer ends with `end`.
fn roundtrip(stream: &mut TcpStream, request: &[u8], end: &[u8]) -> Vec<u8> {
    stream.write_all(request).expect("write request");
    let mut answer = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    while !answer.ends_with(end) {
        let n = stream.read(&mut buf).expect("read answer");
        assert!(
            n > 0,
            "connection closed; got so far {:?}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
    }
    answer
}

fn redis_ping(port: u16) {
    let mut stream = connect(port);
    assert_eq!(roundtrip(&mut stream, b"PING\r\n", b"\r\n"), b"+PONG\r\n");
}

fn memcached_version(stream: &mut TcpStream) {
    let answer = roundtrip(stream, b"version\r\n", b"\r\n");
    assert!(
        answer.starts_with(b"VERSION "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn redis_start_stop_restart() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    redis_ping(port);

    let mut stream = connect(port);
    assert_eq!(roundtrip(&mut stream, b"SET k v\r\n", b"\r\n"), b"+OK\r\n");
    assert_eq!(
        roundtrip(&mut stream, b"GET k\r\n", b"v\r\n"),
        b"$1\r\nv\r\n"
    );

    redis.stop();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening after stop"
    );
    redis.restart();
    assert_eq!(redis.port(), port);
    let mut stream = connect(port);
    // No persistence: the restarted server is empty.
    assert_eq!(roundtrip(&mut stream, b"GET k\r\n", b"\r\n"), b"$-1\r\n");
    // Restart of a running server works too.
    redis.restart();
    redis_ping(port);
}

#[test]
fn redis_extra_args() {
    let Some(redis) =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"])
    else {
        return;
    };
    let mut stream = connect(redis.port());
    let answer = roundtrip(
        &mut stream,
        b"CONFIG GET maxmemory-policy\r\n",
        b"allkeys-lru\r\n",
    );
    assert!(answer.ends_with(b"allkeys-lru\r\n"));
    let answer = roundtrip(&mut stream, b"CONFIG GET maxmemory\r\n", b"2097152\r\n");
    assert!(answer.ends_with(b"2097152\r\n"));
}

#[test]
fn redis_servers_are_independent_and_drop_cleans_up() {
    let Some(a) = RedisServer::start() else {
        return;
    };
    let Some(b) = RedisServer::start() else {
        return;
    };
    assert_ne!(a.port(), b.port());
    let port = a.port();
    drop(a);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening after drop"
    );
    redis_ping(b.port());
}

#[test]
fn redis_tls_comes_up() {
    let Some(mut redis) = RedisTlsServer::start() else {
        return;
    };
    let port = redis.port();
    assert_eq!(redis.url(), format!("rediss://127.0.0.1:{port}"));
    assert!(redis.ca_cert_path().is_file());
    TcpStream::connect(("127.0.0.1", port)).expect("TCP connect to the TLS port");

    // Strict verification of the generated chain, for 127.0.0.1.
    let dir = redis
        .ca_cert_path()
        .parent()
        .expect("CA file has a directory")
        .to_path_buf();
    let verify = Command::new("openssl")
        .args([
            "verify",
            "-x509_strict",
            "-verify_ip",
            "127.0.0.1",
            "-CAfile",
        ])
        .arg(redis.ca_cert_path())
        .arg(dir.join("server.crt"))
        .output()
        .expect("run openssl verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // A real TLS round trip, if a TLS-capable redis-cli is around.
    let cli = |port: u16| {
        Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(redis.ca_cert_path())
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"])
            .output()
    };
    if let Ok(out) = cli(port) {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let cli_without_tls =
            stderr.contains("nrecognized option") || stderr.contains("not supported");
        if !cli_without_tls {
            assert_eq!(
                stdout.trim(),
                "PONG",
                "redis-cli --tls PING: {stdout}{stderr}"
            );
        }
    }

    redis.stop();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    redis.restart();
    TcpStream::connect(("127.0.0.1", port)).expect("TCP connect after restart");
}

#[test]
fn memcached_start_stop_restart_big_values() {
    let Some(mut mc) = MemcachedServer::start() else {
        return;
    };
    let port = mc.port();
    assert_eq!(mc.url(), format!("memcached://127.0.0.1:{port}"));
    let mut stream = connect(port);
    memcached_version(&mut stream);

    // A value of several MB fits (-I 32m).
    let value = vec![b'x'; 5 * 1024 * 1024];
    let mut request = format!("set big 0 0 {}\r\n", value.len()).into_bytes();
    request.extend_from_slice(&value);
    request.extend_from_slice(b"\r\n");
    assert_eq!(roundtrip(&mut stream, &request, b"\r\n"), b"STORED\r\n");
    let answer = roundtrip(&mut stream, b"get big\r\n", b"END\r\n");
    assert_eq!(
        answer.len(),
        value.len() + "VALUE big 0 5242880\r\n\r\nEND\r\n".len()
    );

    mc.stop();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening after stop"
    );
    mc.restart();
    assert_eq!(mc.port(), port);
    let mut stream = connect(port);
    assert_eq!(
        roundtrip(&mut stream, b"get big\r\n", b"END\r\n"),
        b"END\r\n"
    );
}

#[test]
fn memcached_small_memory() {
    let Some(mc) = MemcachedServer::start_with(&["-m", "1"]) else {
        return;
    };
    let mut stream = connect(mc.port());
    memcached_version(&mut stream);
    let answer = roundtrip(&mut stream, b"stats settings\r\n", b"END\r\n");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("STAT maxbytes 1048576\r\n"), "{text}");
}

#[test]
fn proxy_forwards_counts_and_pauses() {
    let Some(mc) = MemcachedServer::start() else {
        return;
    };
    let proxy = Proxy::start(mc.port());
    assert_ne!(proxy.port(), mc.port());
    assert_eq!(proxy.connections(), 0);

    let mut stream = connect(proxy.port());
    memcached_version(&mut stream);
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.bytes_up(), b"version\r\n".len() as u64);
    let down = proxy.bytes_down();
    assert!(down > b"VERSION \r\n".len() as u64, "bytes_down = {down}");

    // Paused: connections are accepted, nothing is answered.
    proxy.pause();
    let mut hung = connect(proxy.port());
    hung.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("set read timeout");
    hung.write_all(b"version\r\n").expect("write while paused");
    let mut buf = [0u8; 64];
    let err = hung.read(&mut buf).expect_err("no answer while paused");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    assert_eq!(proxy.bytes_down(), down);
    assert_eq!(proxy.connections(), 2);

    // Resumed: the held-back request is answered.
    proxy.resume();
    hung.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set read timeout");
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n") {
        let n = hung.read(&mut buf).expect("answer after resume");
        assert!(n > 0, "closed after resume");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"VERSION "));
    assert_eq!(proxy.bytes_up(), 2 * b"version\r\n".len() as u64);

    // Target down: the proxy closes the client connections.
    let proxy_port = proxy.port();
    drop(mc);
    let mut orphan = connect(proxy_port);
    let _ = orphan.write_all(b"version\r\n");
    let n = orphan.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected the proxy to close the connection");

    // Dropping the proxy stops it promptly, with connections still open.
    let started = std::time::Instant::now();
    drop(proxy);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(TcpStream::connect(("127.0.0.1", proxy_port)).is_err());
    drop((stream, hung));
}

/// Runs `redis-cli -p PORT ARGS...` (with `-c` to follow cluster redirections)
/// and returns its trimmed stdout; panics if it fails.
fn redis_cli(port: u16, follow: bool, args: &[&str]) -> String {
    let mut command = Command::new("redis-cli");
    if follow {
        command.arg("-c");
    }
    let output = command
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(
        output.status.success(),
        "redis-cli -p {port} {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn cluster_state(port: u16) -> String {
    let info = redis_cli(port, false, &["CLUSTER", "INFO"]);
    info.lines()
        .find_map(|line| line.strip_prefix("cluster_state:"))
        .unwrap_or_else(|| panic!("no cluster_state in {info:?}"))
        .trim()
        .to_owned()
}

fn dbsize(port: u16) -> u64 {
    let answer = redis_cli(port, false, &["DBSIZE"]);
    answer
        .parse()
        .unwrap_or_else(|_| panic!("DBSIZE answered {answer:?}"))
}

#[test]
fn redis_cluster_start_kill_restart() {
    let started = std::time::Instant::now();
    let Some(mut cluster) = RedisCluster::start(3) else {
        return;
    };
    let start_time = started.elapsed();
    let ports = cluster.ports();
    assert_eq!(ports.len(), 3);
    assert_eq!(
        cluster.url(),
        format!(
            "redis+cluster://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
            ports[0], ports[1], ports[2]
        )
    );
    for (i, port) in ports.iter().enumerate() {
        assert_eq!(cluster.node_url(i), format!("redis://127.0.0.1:{port}"));
        assert!(*port <= 55535, "bus port of {port} would be above 65535");
        assert_eq!(cluster_state(*port), "ok");
        let info = redis_cli(*port, false, &["CLUSTER", "INFO"]);
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
        assert!(info.contains("cluster_known_nodes:3"), "{info}");
        assert!(info.contains("cluster_size:3"), "{info}");
    }

    // Keys spread over the masters; redis-cli -c follows the redirections.
    let keys: Vec<String> = (0..30).map(|i| format!("key-{i}")).collect();
    for key in &keys {
        assert_eq!(
            redis_cli(ports[0], true, &["SET", key, &format!("v-{key}")]),
            "OK"
        );
    }
    for key in &keys {
        assert_eq!(redis_cli(ports[2], true, &["GET", key]), format!("v-{key}"));
    }
    let sizes: Vec<u64> = ports.iter().map(|port| dbsize(*port)).collect();
    assert_eq!(sizes.iter().sum::<u64>(), keys.len() as u64, "{sizes:?}");
    assert!(sizes.iter().all(|size| *size > 0), "{sizes:?}");
    // A plain connection to a node that does not own a key is redirected.
    let mut moved = 0;
    for key in &keys {
        let mut stream = connect(ports[1]);
        let request = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
        let answer = roundtrip(&mut stream, request.as_bytes(), b"\r\n");
        if answer.starts_with(b"-MOVED ") {
            moved += 1;
        }
    }
    assert_eq!(moved, sizes[0] + sizes[2]);

    // Node 1 killed: unreachable, and soon the others report the failure.
    cluster.stop_node(1);
    assert!(
        TcpStream::connect(("127.0.0.1", ports[1])).is_err(),
        "node 1 still listening after stop_node"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while cluster_state(ports[0]) != "fail" || cluster_state(ports[2]) != "fail" {
        assert!(
            std::time::Instant::now() < deadline,
            "the cluster does not report the killed node as failed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Restarted: it keeps its slots, comes back empty, the cluster is ok.
    let restarted = std::time::Instant::now();
    cluster.restart_node(1);
    let restart_time = restarted.elapsed();
    assert_eq!(cluster.ports(), ports);
    for port in &ports {
        assert_eq!(cluster_state(*port), "ok");
    }
    assert_eq!(dbsize(ports[1]), 0);
    assert_eq!(dbsize(ports[0]), sizes[0]);
    assert_eq!(dbsize(ports[2]), sizes[2]);
    let missing = keys
        .iter()
        .filter(|key| redis_cli(ports[0], true, &["GET", key]).is_empty())
        .count();
    assert_eq!(missing as u64, sizes[1]);
    assert_eq!(
        redis_cli(ports[0], true, &["SET", "after", "restart"]),
        "OK"
    );
    assert_eq!(redis_cli(ports[1], true, &["GET", "after"]), "restart");

    // Dropped: no node listens any more, on its port or its bus port.
    drop(cluster);
    for port in &ports {
        assert!(TcpStream::connect(("127.0.0.1", *port)).is_err());
        assert!(TcpStream::connect(("127.0.0.1", *port + 10000)).is_err());
    }
    let _ = writeln!(
        std::io::stderr(),
        "cluster start took {start_time:?}, node restart {restart_time:?}"
    );
}

#[test]
fn redis_clusters_are_independent() {
    let Some(a) = RedisCluster::start(3) else {
        return;
    };
    let Some(b) = RedisCluster::start(4) else {
        return;
    };
    let (ports_a, ports_b) = (a.ports(), b.ports());
    assert_eq!(ports_b.len(), 4);
    for port in &ports_a {
        assert!(!ports_b.contains(port));
    }
    for port in ports_a.iter().chain(&ports_b) {
        assert_eq!(cluster_state(*port), "ok");
    }
    let known = |port: u16| {
        redis_cli(port, false, &["CLUSTER", "NODES"])
            .lines()
            .count()
    };
    assert_eq!(known(ports_a[0]), 3);
    assert_eq!(known(ports_b[0]), 4);
}
