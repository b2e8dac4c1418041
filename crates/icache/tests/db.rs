//! `icache::db` on real servers: PostgreSQL (Debian's package, run as its
//! `postgres` user), SQLite files, and a real `redis-server` as the cache.
//! Writers are outside the app where the issue says so (`psql` processes).
//! Skipped loudly when a server is missing; failing instead when `CI=true`.

use icache_test_support as support;

use std::time::{Duration, Instant};

use icache::ICache;

mod db {
    pub mod postgres;
    pub mod sqlite;
}

/// A block cached under `tokens`, as a page would store it.
pub(crate) struct Block {
    key: String,
    tokens: Vec<String>,
}

impl Block {
    pub(crate) fn new(key: &str, tokens: &[&str]) -> Block {
        Block {
            key: key.to_owned(),
            tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    fn refs(&self) -> Vec<&str> {
        self.tokens.iter().map(String::as_str).collect()
    }

    /// Renders and stores the block under the version read first.
    pub(crate) fn store(&self, cache: &ICache) {
        let version = cache.get_sum(&self.refs()).expect("get_sum");
        cache
            .set_versioned(&self.key, format!("<{}>", self.key), version)
            .expect("set_versioned");
    }

    /// Whether the stored copy would still be served (no token moved).
    pub(crate) fn served(&self, cache: &ICache) -> bool {
        let version = cache.get_sum(&self.refs()).expect("get_sum");
        cache
            .get_versioned(&self.key, version)
            .expect("get_versioned")
            .is_some()
    }
}

/// Waits until `done` holds, at most `limit`; the time it took.
pub(crate) fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// A Redis server and a cache handle on it (`None`: skipped).
pub(crate) fn redis() -> Option<(support::RedisServer, ICache)> {
    let redis = support::RedisServer::start()?;
    let cache = ICache::from_url(&redis.url()).expect("cache URL");
    Some((redis, cache))
}
