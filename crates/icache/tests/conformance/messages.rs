//! Messages users meet first: they name what is wrong and keep the cause.

use icache::ICache;

use crate::support::RedisServer;

/// `memcached://` pointed at a Redis port says it looks like Redis, without
/// a dump of Redis's reply.
#[test]
fn memcached_url_on_a_redis_port_says_it_is_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let cache = ICache::from_url(&format!(
        "memcached://127.0.0.1:{}?timeout_ms=2000&connect_timeout_ms=2000",
        redis.port()
    ))
    .expect("opens without connecting");
    let e = cache.ping().expect_err("not a memcached").to_string();
    assert!(e.contains("Redis"), "{e}");
    assert!(e.contains("redis://"), "{e}");
    assert!(!e.contains("unknown command"), "the reply was dumped: {e}");
}

/// Once the breaker is open, the fail-fast errors keep the failure that
/// opened it.
#[test]
fn fail_fast_errors_keep_the_cause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let cache = ICache::from_url(&format!("redis://127.0.0.1:{port}?connect_timeout_ms=500"))
        .expect("opens without connecting");
    let first = cache.ping().expect_err("nothing listens").to_string();
    let again = cache.ping().expect_err("fails fast");
    assert!(again.is_circuit_open(), "{again}");
    let again = again.to_string();
    assert!(again.contains("fail fast for"), "{again}");
    assert!(
        again.contains(first.split(": ").last().unwrap_or(&first)),
        "the cause {first:?} is lost in {again:?}"
    );
}
