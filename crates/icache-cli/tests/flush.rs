//! `icache flush` against real servers: every cached block misses once.

use icache_test_support as support;

use std::cell::Cell;
use std::process::Command;

use icache::ICache;

fn block(cache: &ICache, ran: &Cell<u32>) -> String {
    cache
        .fragment("flush-list", &["movies"], || {
            ran.set(ran.get() + 1);
            Ok::<_, ()>("<ul/>".to_string())
        })
        .expect("blocks never fail")
}

#[test]
fn flush_makes_every_block_miss_once_and_exits_like_the_other_commands() {
    let mut urls = Vec::new();
    let redis = support::RedisServer::start();
    let memcached = support::MemcachedServer::start();
    if let Some(s) = &redis {
        urls.push(s.url());
    }
    if let Some(s) = &memcached {
        urls.push(s.url());
    }
    for url in urls {
        let cache = ICache::from_url(&format!("{url}?timeout_ms=2000")).expect("open");
        let ran = Cell::new(0);
        block(&cache, &ran);
        block(&cache, &ran);
        assert_eq!(ran.get(), 1, "{url}: a hit before the flush");
        let out = Command::new(env!("CARGO_BIN_EXE_icache"))
            // Generous time-outs: a loaded machine is not what this tests.
            .args([
                "--url",
                &format!("{url}?timeout_ms=2000&connect_timeout_ms=2000"),
                "flush",
            ])
            .env_remove("ICACHE_URL")
            .output()
            .expect("run icache");
        assert_eq!(out.status.code(), Some(0), "{url}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (token, generation) = stdout
            .trim_end()
            .split_once(' ')
            .unwrap_or_else(|| panic!("{url}: {stdout:?}"));
        assert_eq!(token, ICache::FLUSH_TOKEN);
        assert!(generation.parse::<u64>().is_ok_and(|g| g > 1), "{stdout:?}");
        block(&cache, &ran);
        block(&cache, &ran);
        assert_eq!(
            ran.get(),
            2,
            "{url}: rendered once after the flush, then a hit"
        );
    }
    // Backend trouble exits 1, a bad URL 2.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let down = Command::new(env!("CARGO_BIN_EXE_icache"))
        .args(["--url", &format!("redis://127.0.0.1:{port}"), "flush"])
        .env_remove("ICACHE_URL")
        .output()
        .expect("run icache");
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    let bad = Command::new(env!("CARGO_BIN_EXE_icache"))
        .args(["--url", "redis://127.0.0.1:abc", "flush"])
        .env_remove("ICACHE_URL")
        .output()
        .expect("run icache");
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}
