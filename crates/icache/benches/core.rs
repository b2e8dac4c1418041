//! Micro benchmarks of the ICache object on every backend.
//!
//! Run with: `cargo bench -p icache --all-features --bench core`
//!
//! Groups:
//! * `memory`, `redis`, `memcached`: `incr`, `get_sum` of 3 tokens,
//!   `get_versioned` hit of a 4 KB value, and the reader's whole hit
//!   (`get_sum(3)` + `get_versioned`).
//! * `direct`: the same four lookups done directly on quick_cache (the crate
//!   under the memory backend), and one hit on quick_cache and on moka, so the
//!   overhead shows as a ratio measured in the same run.
//!
//! The servers are started by the test harness on free loopback ports.

use icache_test_support as support;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use icache::ICache;

const TOKENS: [&str; 3] = ["movies-personal-rating", "movies", "user:42"];
const KEY: &str = "movies-personal-rating#42";

fn bench_backend(c: &mut Criterion, name: &str, cache: &ICache) {
    let value = "x".repeat(4096);
    let version = cache.get_sum(&TOKENS).expect("get_sum");
    cache
        .set_versioned(KEY, value.as_str(), version)
        .expect("set_versioned");
    let mut g = c.benchmark_group(name);
    g.bench_function("incr", |b| b.iter(|| cache.incr(black_box("bench-incr"))));
    g.bench_function("get_sum_3", |b| {
        b.iter(|| cache.get_sum(black_box(&TOKENS)))
    });
    g.bench_function("get_versioned_4k_hit", |b| {
        b.iter(|| {
            let v = cache.get_versioned(black_box(KEY), version).expect("get");
            assert!(v.is_some());
            v
        })
    });
    g.bench_function("hit_get_sum_3_plus_get_versioned", |b| {
        b.iter(|| {
            let v = cache.get_sum(black_box(&TOKENS)).expect("get_sum");
            cache.get_versioned(black_box(KEY), v).expect("get")
        })
    });
    g.finish();
}

fn bench_direct(c: &mut Criterion) {
    // The same shape of data as the memory backend keeps: three counters and
    // one 4 KB value behind an Arc.
    let qc: quick_cache::sync::Cache<String, Arc<str>> = quick_cache::sync::Cache::new(1024);
    let mk: moka::sync::Cache<String, Arc<str>> = moka::sync::Cache::new(1024);
    let value: Arc<str> = Arc::from("x".repeat(4096));
    for k in TOKENS.iter().chain([&KEY]) {
        qc.insert((*k).to_string(), value.clone());
        mk.insert((*k).to_string(), value.clone());
    }
    let keys: Vec<String> = TOKENS.iter().chain([&KEY]).map(|k| k.to_string()).collect();
    let mut g = c.benchmark_group("direct");
    g.bench_function("quick_cache_4_gets", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(qc.get(black_box(k.as_str())));
            }
        })
    });
    g.bench_function("quick_cache_1_get", |b| b.iter(|| qc.get(black_box(KEY))));
    g.bench_function("moka_1_get", |b| b.iter(|| mk.get(black_box(KEY))));
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_direct(c);
    bench_backend(c, "memory", &ICache::memory());
    match support::RedisServer::start() {
        Some(redis) => {
            let cache = ICache::from_url(&redis.url()).expect("redis");
            bench_backend(c, "redis", &cache);
        }
        None => eprintln!("redis-server missing: redis group skipped"),
    }
    match support::MemcachedServer::start() {
        Some(mc) => {
            let cache = ICache::from_url(&mc.url()).expect("memcached");
            bench_backend(c, "memcached", &cache);
        }
        None => eprintln!("memcached missing: memcached group skipped"),
    }
}

criterion_group! {
    name = core;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(core);
