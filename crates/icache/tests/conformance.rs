//! One behavioural suite, run against every backend: the in-process cache, a
//! real `redis-server` and a real `memcached`, each started on a free loopback
//! port for the test and stopped after it (see `support`).
//!
//! Each case is a plain function of a [`Ctx`]; the `suite!` macro makes one
//! `#[test]` per case and backend, named `memory::case`, `redis::case`,
//! `memcached::case`.

use icache_test_support as support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use icache::{ErrorKind, ICache};
use support::{MemcachedServer, Proxy, RedisServer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Memory,
    Redis,
    Memcached,
    /// Three memcached servers behind one `memcached://a,b,c` URL.
    MemcachedPool,
    /// A Redis Cluster of three masters.
    RedisCluster,
}

impl Kind {
    /// memcached semantics (whole-second TTLs, item size limits).
    fn is_memcached(self) -> bool {
        matches!(self, Kind::Memcached | Kind::MemcachedPool)
    }
}

pub(crate) enum Server {
    None,
    Redis(RedisServer),
    Memcached(MemcachedServer),
    MemcachedPool(Vec<MemcachedServer>),
    RedisCluster(support::RedisCluster),
}

pub(crate) struct Ctx {
    kind: Kind,
    /// The `near=` option of every handle this context opens (`""`: the
    /// backend's default, `entries` on network backends).
    near: &'static str,
    server: Server,
    cache: ICache,
}

impl Ctx {
    fn start(kind: Kind) -> Option<Ctx> {
        Ctx::start_near(kind, "")
    }

    /// A context whose handles all use `near` (`"near=off"`, …).
    fn start_near(kind: Kind, near: &'static str) -> Option<Ctx> {
        let server = match kind {
            Kind::Memory => Server::None,
            Kind::Redis => Server::Redis(RedisServer::start()?),
            Kind::Memcached => Server::Memcached(MemcachedServer::start()?),
            Kind::MemcachedPool => Server::MemcachedPool(vec![
                MemcachedServer::start()?,
                MemcachedServer::start()?,
                MemcachedServer::start()?,
            ]),
            Kind::RedisCluster => Server::RedisCluster(support::RedisCluster::start(3)?),
        };
        let mut ctx = Ctx {
            kind,
            near,
            server,
            cache: ICache::memory(),
        };
        ctx.cache = ctx.open("");
        Some(ctx)
    }

    /// The base URL of this backend, without a query.
    fn base(&self) -> String {
        match &self.server {
            Server::None => "memory://".into(),
            Server::Redis(s) => s.url(),
            Server::Memcached(s) => s.url(),
            Server::MemcachedPool(v) => format!(
                "memcached://{}",
                v.iter()
                    .map(|s| format!("127.0.0.1:{}", s.port()))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Server::RedisCluster(c) => c.url(),
        }
    }

    /// The port of a single server (the first one of a pool).
    fn port(&self) -> u16 {
        self.ports().first().copied().unwrap_or(0)
    }

    fn ports(&self) -> Vec<u16> {
        match &self.server {
            Server::None => Vec::new(),
            Server::Redis(s) => vec![s.port()],
            Server::Memcached(s) => vec![s.port()],
            Server::MemcachedPool(v) => v.iter().map(MemcachedServer::port).collect(),
            Server::RedisCluster(c) => c.ports(),
        }
    }

    /// Opens another handle on the same backend with `query` options. On the
    /// memory backend that is a separate store; use `cache.clone()` to share.
    fn open(&self, query: &str) -> ICache {
        let with_near;
        let query = if self.near.is_empty() || query.contains("near=") {
            query
        } else if query.is_empty() {
            self.near
        } else {
            with_near = format!("{query}&{}", self.near);
            &with_near
        };
        let sep = if query.is_empty() { "" } else { "?" };
        // Generous time-outs: this machine is shared and the suite runs
        // tests in parallel.
        let q = if query.contains("timeout_ms") || self.kind == Kind::Memory {
            query.to_string()
        } else if query.is_empty() {
            "timeout_ms=2000&connect_timeout_ms=2000".to_string()
        } else {
            format!("{query}&timeout_ms=2000&connect_timeout_ms=2000")
        };
        let sep = if q.is_empty() { sep } else { "?" };
        ICache::from_url(&format!("{}{sep}{q}", self.base())).expect("open cache")
    }

    /// Deletes a generation behind icache's back, as an eviction would.
    fn evict_generation(&self, token: &str) {
        match self.kind {
            Kind::Memory => {
                assert!(self.cache.forget_token(token).expect("forget"));
            }
            Kind::Redis | Kind::RedisCluster => {
                // On a cluster only the owner of the slot deletes; the others
                // answer MOVED.
                let deleted = self
                    .ports()
                    .into_iter()
                    .filter(|&p| raw_redis(p, &[b"DEL", key_of("g", token).as_bytes()]) == ":1")
                    .count();
                assert_eq!(deleted, 1);
            }
            Kind::Memcached | Kind::MemcachedPool => {
                // On a pool the key lives on one of the servers, with that
                // server's epoch appended.
                let deleted = self
                    .ports()
                    .into_iter()
                    .filter(|&p| {
                        let key = self.memcached_key(p, &key_of("g", token));
                        raw_memcached(p, format!("delete {key}\r\n").as_bytes()) == "DELETED"
                    })
                    .count();
                assert_eq!(deleted, 1);
            }
        }
    }

    /// The form an unprefixed key has on the memcached server at `port`: on
    /// a pool, with that server's epoch appended.
    fn memcached_key(&self, port: u16, key: &str) -> String {
        if self.kind == Kind::MemcachedPool {
            memcached_faults::pool_key(port, key)
        } else {
            key.to_owned()
        }
    }

    /// Writes foreign bytes under one of our keys, as another client might.
    /// Not applicable in-process (no other client can reach the store).
    fn write_foreign(&self, key: &str, bytes: &[u8]) -> bool {
        match self.kind {
            Kind::Memory => false,
            Kind::Redis | Kind::RedisCluster => {
                let stored = self
                    .ports()
                    .into_iter()
                    .filter(|&p| raw_redis(p, &[b"SET", key.as_bytes(), bytes]) == "+OK")
                    .count();
                assert_eq!(stored, 1);
                true
            }
            Kind::Memcached | Kind::MemcachedPool => {
                // Everywhere: whichever server the key routes to has it.
                for p in self.ports() {
                    let key = self.memcached_key(p, key);
                    let mut req = format!("set {key} 0 0 {}\r\n", bytes.len()).into_bytes();
                    req.extend_from_slice(bytes);
                    req.extend_from_slice(b"\r\n");
                    assert_eq!(raw_memcached(p, &req), "STORED");
                }
                true
            }
        }
    }
}

/// The documented key layout for short plain names: `ic:<tag>:<name>`.
fn key_of(tag: &str, name: &str) -> String {
    format!("ic:{tag}:{name}")
}

/// One RESP command on a fresh connection; the first reply line.
/// A multi-threaded tokio runtime for the async cases (2 workers: an inner
/// block's lookup may run on another thread than its outer block's).
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

pub(crate) fn raw_redis(port: u16, args: &[&[u8]]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    s.write_all(&req).expect("write");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read");
    line.trim_end().to_string()
}

/// How many times Redis ran each of `commands` (lower case), summed, from
/// `INFO commandstats`.
pub(crate) fn redis_calls(port: u16, commands: &[&str]) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .expect("write");
    let mut reader = BufReader::new(s);
    let mut header = String::new();
    reader.read_line(&mut header).expect("read");
    let len: usize = header
        .trim_start_matches('$')
        .trim_end()
        .parse()
        .expect("a bulk reply");
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).expect("read");
    let text = String::from_utf8_lossy(&body);
    commands
        .iter()
        .map(|c| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{c}:calls=")))
                .and_then(|r| r.split(',').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// One memcached request on a fresh connection; the first reply line.
fn raw_memcached(port: u16, req: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to memcached");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(req).expect("write");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read");
    line.trim_end().to_string()
}

fn run(kind: Kind, case: fn(&Ctx)) {
    run_near(kind, "", case)
}

/// [`run`] with every handle opened with `near` (`"near=off"`, …).
fn run_near(kind: Kind, near: &'static str, case: fn(&Ctx)) {
    match Ctx::start_near(kind, near) {
        Some(ctx) => case(&ctx),
        None => eprintln!("SKIPPED: {kind:?} backend not available (see the message above)"),
    }
}

/// One `#[test]` per case, backend and near-cache mode:
/// `<group>::<backend>[_<mode>]::<case>`. Network backends run with the
/// default `near=entries` and with `near=off`; Redis also with
/// `near=tracking`.
macro_rules! suite {
    ($group:ident = $cases:path: $($case:ident),* $(,)?) => {
        mod $group {
            mod memory { $( #[test] fn $case() { crate::run(crate::Kind::Memory, { use $cases as c; c::$case }) } )* }
            mod redis { $( #[test] fn $case() { crate::run(crate::Kind::Redis, { use $cases as c; c::$case }) } )* }
            mod memcached { $( #[test] fn $case() { crate::run(crate::Kind::Memcached, { use $cases as c; c::$case }) } )* }
            mod memcached_pool { $( #[test] fn $case() { crate::run(crate::Kind::MemcachedPool, { use $cases as c; c::$case }) } )* }
            mod redis_cluster { $( #[test] fn $case() { crate::run(crate::Kind::RedisCluster, { use $cases as c; c::$case }) } )* }
            mod redis_near_off { $( #[test] fn $case() { crate::run_near(crate::Kind::Redis, "near=off", { use $cases as c; c::$case }) } )* }
            mod redis_tracking { $( #[test] fn $case() { crate::run_near(crate::Kind::Redis, "near=tracking", { use $cases as c; c::$case }) } )* }
            mod memcached_near_off { $( #[test] fn $case() { crate::run_near(crate::Kind::Memcached, "near=off", { use $cases as c; c::$case }) } )* }
            mod memcached_pool_near_off { $( #[test] fn $case() { crate::run_near(crate::Kind::MemcachedPool, "near=off", { use $cases as c; c::$case }) } )* }
            mod redis_cluster_near_off { $( #[test] fn $case() { crate::run_near(crate::Kind::RedisCluster, "near=off", { use $cases as c; c::$case }) } )* }
        }
    };
}

#[path = "conformance/async_blocks.rs"]
mod async_blocks;
#[path = "conformance/async_inner_hits.rs"]
mod async_inner_hits;
#[path = "conformance/bad_input.rs"]
mod bad_input;
#[path = "conformance/engines.rs"]
mod engines;
#[path = "conformance/engines_send.rs"]
mod engines_send;
#[path = "conformance/fleet.rs"]
mod fleet;
#[path = "conformance/flush.rs"]
mod flush;
#[path = "conformance/fragments.rs"]
mod fragments;
#[path = "conformance/guidance.rs"]
mod guidance;
#[path = "conformance/hardening.rs"]
mod hardening;
#[path = "conformance/instance.rs"]
mod instance;
#[path = "conformance/lease_found.rs"]
mod lease_found;
#[path = "conformance/memcached_faults.rs"]
mod memcached_faults;
#[path = "conformance/messages.rs"]
mod messages;
#[path = "conformance/minijinja_seed.rs"]
mod minijinja_seed;
#[path = "conformance/near.rs"]
mod near;
#[path = "conformance/nested_errors.rs"]
mod nested_errors;
#[path = "conformance/reliability.rs"]
mod reliability;
#[path = "conformance/rust_api.rs"]
mod rust_api;
#[path = "conformance/sentinel.rs"]
mod sentinel;
#[path = "conformance/strict.rs"]
mod strict;
#[path = "conformance/unix.rs"]
mod unix;
#[path = "conformance/web.rs"]
mod web;

suite!(flushing = crate::flush:
    flush_makes_every_block_miss_once_across_handles,
    salt_changes_every_block_key,
);

suite!(object = crate::object_cases:
    incr_adds_one,
    missing_generations_are_fresh_and_never_zero,
    get_sum_is_the_wrapping_sum,
    versioned_roundtrip_and_mismatch,
    mismatch_does_not_delete,
    values_empty_to_several_megabytes,
    concurrent_incr_many_loses_nothing,
    evicted_generation_invalidates,
    hash_joined_keys_do_not_collide,
    any_key_string_works,
    prefix_isolates_apps,
    plain_get_set_delete_get_many,
    plain_ttl_expires,
    namespaces_are_apart,
    foreign_bytes_read_as_miss,
    async_api_and_runtimes,
    too_large_is_a_clear_error,
    errors_and_debug_never_show_passwords,
    server_stats_answer,
);

mod object_cases {
    use super::*;

    pub fn incr_adds_one(ctx: &Ctx) {
        let c = &ctx.cache;
        let g = c.get_sum(&["movies"]).expect("get_sum");
        assert_eq!(c.incr("movies").expect("incr"), g + 1);
        assert_eq!(c.get_sum(&["movies"]).expect("get_sum"), g + 1);
        let gs = c.incr_many(&["movies", "user:42"]).expect("incr_many");
        assert_eq!(gs[0], g + 2);
        assert_eq!(c.generations(&["user:42"]).expect("gens"), vec![gs[1]]);
        assert_eq!(c.incr_many(&[]).expect("empty"), Vec::<u64>::new());
    }

    pub fn missing_generations_are_fresh_and_never_zero(ctx: &Ctx) {
        let c = &ctx.cache;
        // A first read and a first bump both start from a fresh random value:
        // never 0 or 1 (the seed's "stores 0" loses the first invalidation).
        let mut seen = std::collections::HashSet::new();
        for i in 0..50 {
            let g = c.get_sum(&[&format!("fresh-read-{i}")]).expect("get_sum");
            assert!(g > 1, "{g}");
            assert!(seen.insert(g), "generation {g} repeated");
            let b = c.incr(&format!("fresh-bump-{i}")).expect("incr");
            assert!(b > 2, "{b}");
            assert!(seen.insert(b), "generation {b} repeated");
        }
        // Stable once set.
        let g = c.get_sum(&["fresh-read-0"]).expect("get_sum");
        assert_eq!(c.get_sum(&["fresh-read-0"]).expect("get_sum"), g);
    }

    pub fn get_sum_is_the_wrapping_sum(ctx: &Ctx) {
        let c = &ctx.cache;
        let tokens = ["a", "b", "c"];
        let gens = c.generations(&tokens).expect("gens");
        let sum = gens.iter().fold(0u64, |a, g| a.wrapping_add(*g));
        assert_eq!(c.get_sum(&tokens).expect("get_sum"), sum);
        assert_eq!(c.get_sum(&[]).expect("empty"), 0);
        // The same token twice counts twice, as in the seed.
        assert_eq!(
            c.get_sum(&["a", "a"]).expect("twice"),
            gens[0].wrapping_mul(2)
        );
    }

    pub fn versioned_roundtrip_and_mismatch(ctx: &Ctx) {
        let c = &ctx.cache;
        let version = c.get_sum(&["movies", "user:42"]).expect("get_sum");
        c.set_versioned("movies#42", "<ul>…</ul>", version)
            .expect("set");
        assert_eq!(
            c.get_versioned("movies#42", version)
                .expect("get")
                .as_deref(),
            Some("<ul>…</ul>")
        );
        assert_eq!(
            c.get_versioned("movies#42", version + 1).expect("get"),
            None
        );
        assert_eq!(c.get_versioned("never-set", version).expect("get"), None);
        c.incr("user:42").expect("incr");
        let now = c.get_sum(&["movies", "user:42"]).expect("get_sum");
        assert_ne!(now, version);
        assert_eq!(c.get_versioned("movies#42", now).expect("get"), None);
        // Bytes, including ones that are not UTF-8.
        c.set_versioned_bytes("bin", vec![0u8, 255, 1], 7)
            .expect("set");
        assert_eq!(
            c.get_versioned_bytes("bin", 7).expect("get").as_deref(),
            Some(&[0u8, 255, 1][..])
        );
        assert_eq!(c.get_versioned("bin", 7).expect("get"), None, "not text");
        // A text value read as bytes.
        assert_eq!(
            c.get_versioned_bytes("movies#42", version)
                .expect("get")
                .as_deref(),
            Some("<ul>…</ul>".as_bytes())
        );
    }

    pub fn mismatch_does_not_delete(ctx: &Ctx) {
        let c = &ctx.cache;
        c.set_versioned("k", "fresh", 10).expect("set");
        // A slow reader holding an old version must not destroy the entry.
        assert_eq!(c.get_versioned("k", 9).expect("get"), None);
        assert_eq!(
            c.get_versioned("k", 10).expect("get").as_deref(),
            Some("fresh")
        );
    }

    pub fn values_empty_to_several_megabytes(ctx: &Ctx) {
        let c = &ctx.cache;
        for size in [0usize, 1, 4096, 1 << 20, 3 << 20] {
            let value: String = (0..size)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            let key = format!("size-{size}");
            c.set_versioned(&key, value.as_str(), 1).expect("set");
            let got = c.get_versioned(&key, 1).expect("get").expect("hit");
            assert_eq!(got.len(), size);
            assert!(*got == *value);
            c.set(&key, value.as_str(), None).expect("plain set");
            assert_eq!(
                c.get(&key).expect("get").as_deref().map(str::len),
                Some(size)
            );
        }
    }

    pub fn concurrent_incr_many_loses_nothing(ctx: &Ctx) {
        let c = &ctx.cache;
        let tokens = ["race-a", "race-b"];
        let start = c.generations(&tokens).expect("gens");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                thread::spawn(move || {
                    for _ in 0..1000 {
                        c.incr_many(&["race-a", "race-b"]).expect("incr_many");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let end = c.generations(&tokens).expect("gens");
        assert_eq!(end[0], start[0] + 8000);
        assert_eq!(end[1], start[1] + 8000);
    }

    pub fn evicted_generation_invalidates(ctx: &Ctx) {
        let c = &ctx.cache;
        let v = c.get_sum(&["movies", "user:7"]).expect("get_sum");
        c.set_versioned("page", "old", v).expect("set");
        ctx.evict_generation("movies");
        let now = c.get_sum(&["movies", "user:7"]).expect("get_sum");
        assert_ne!(now, v, "a lost counter must not bring the old version back");
        assert_eq!(c.get_versioned("page", now).expect("get"), None);
        // And a bump of an evicted token does not restart at a small number.
        ctx.evict_generation("movies");
        assert!(c.incr("movies").expect("incr") > 2);
        assert_ne!(c.get_sum(&["movies", "user:7"]).expect("get_sum"), v);
    }

    pub fn hash_joined_keys_do_not_collide(ctx: &Ctx) {
        let c = &ctx.cache;
        let v = c.get_sum(&["a#b"]).expect("get_sum");
        c.set_versioned("a#b", "joined", v).expect("set");
        c.set_versioned("a", "a alone", v).expect("set");
        assert_eq!(
            c.get_versioned("a#b", v).expect("get").as_deref(),
            Some("joined")
        );
        // Bumping "a" and "b" leaves "a#b" alone, and the other way round.
        let ab = c.get_sum(&["a", "b"]).expect("get_sum");
        c.incr("a#b").expect("incr");
        assert_eq!(c.get_sum(&["a", "b"]).expect("get_sum"), ab);
        let joined = c.get_sum(&["a#b"]).expect("get_sum");
        c.incr_many(&["a", "b"]).expect("incr");
        assert_eq!(c.get_sum(&["a#b"]).expect("get_sum"), joined);
    }

    pub fn any_key_string_works(ctx: &Ctx) {
        let c = &ctx.cache;
        let long = "k".repeat(100_000);
        let long2 = format!("{}x", "k".repeat(99_999));
        let keys = [
            "",
            " ",
            "with space",
            "tab\there",
            "new\nline",
            "nul\0byte",
            "ünï©ødé 🎬",
            "#",
            "a#b",
            &long,
            &long2,
            "ic:g:movies",
            "movies",
        ];
        for (i, k) in keys.iter().enumerate() {
            c.set_versioned(k, format!("value {i}"), 5).expect("set");
            c.set(k, format!("plain {i}"), None).expect("set");
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(
                c.get_versioned(k, 5).expect("get").as_deref(),
                Some(format!("value {i}").as_str()),
                "key {i}"
            );
            assert_eq!(
                c.get(k).expect("get").as_deref(),
                Some(format!("plain {i}").as_str())
            );
        }
        // The same strings as tokens: each its own counter.
        let before = c.generations(&keys).expect("gens");
        c.incr(&long).expect("incr");
        let after = c.generations(&keys).expect("gens");
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            if keys[i] == long {
                assert_eq!(*a, b + 1);
            } else {
                assert_eq!(a, b, "token {i} moved");
            }
        }
    }

    pub fn prefix_isolates_apps(ctx: &Ctx) {
        // On the memory backend each handle has its own store; on a server the
        // prefix is what keeps two apps apart.
        let shop = ctx.open("prefix=shop");
        let blog = ctx.open("prefix=blog");
        let v = shop.get_sum(&["movies"]).expect("get_sum");
        let w = blog.get_sum(&["movies"]).expect("get_sum");
        shop.set_versioned("page", "shop page", v).expect("set");
        shop.set("plain", "shop plain", None).expect("set");
        assert_eq!(blog.get_versioned("page", v).expect("get"), None);
        assert_eq!(blog.get("plain").expect("get"), None);
        shop.incr("movies").expect("incr");
        assert_eq!(blog.get_sum(&["movies"]).expect("get_sum"), w);
        assert_eq!(shop.get_sum(&["movies"]).expect("get_sum"), v + 1);
        // The unprefixed handle is apart from both.
        assert_eq!(ctx.cache.get("plain").expect("get"), None);
    }

    pub fn plain_get_set_delete_get_many(ctx: &Ctx) {
        let c = &ctx.cache;
        c.set("greeting", "hello", None).expect("set");
        c.set_bytes("blob", vec![1u8, 2, 3], None).expect("set");
        let got = c
            .get_many(&["greeting", "missing", "blob"])
            .expect("get_many");
        assert_eq!(got[0].as_deref(), Some("hello"));
        assert_eq!(got[1], None);
        // Bytes that happen to be UTF-8 read as text too; others do not.
        assert_eq!(got[2].as_deref(), Some("\u{1}\u{2}\u{3}"));
        c.set_bytes("binary", vec![0xffu8, 0xfe], None)
            .expect("set");
        assert_eq!(c.get("binary").expect("get"), None);
        assert_eq!(
            c.get_bytes("binary").expect("get").as_deref(),
            Some(&[0xffu8, 0xfe][..])
        );
        let got = c
            .get_many_bytes(&["blob", "greeting"])
            .expect("get_many_bytes");
        assert_eq!(got[0].as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(got[1].as_deref(), Some(&b"hello"[..]));
        assert!(c.delete("greeting").expect("delete"));
        assert!(!c.delete("greeting").expect("delete"));
        assert_eq!(c.get("greeting").expect("get"), None);
        assert_eq!(c.get_many(&[]).expect("empty"), vec![]);
    }

    pub fn plain_ttl_expires(ctx: &Ctx) {
        let c = &ctx.cache;
        // memcached counts whole seconds.
        let ttl = if ctx.kind.is_memcached() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(100)
        };
        c.set("short", "lived", Some(ttl)).expect("set");
        c.set("long", "lived", Some(Duration::from_secs(3600)))
            .expect("set");
        c.set("gone", "at once", Some(Duration::ZERO)).expect("set");
        assert_eq!(c.get("gone").expect("get"), None);
        assert_eq!(c.get("short").expect("get").as_deref(), Some("lived"));
        let deadline = Instant::now() + ttl * 4 + Duration::from_secs(1);
        while c.get("short").expect("get").is_some() {
            assert!(Instant::now() < deadline, "TTL did not expire");
            thread::sleep(ttl / 4);
        }
        assert_eq!(c.get("long").expect("get").as_deref(), Some("lived"));
    }

    pub fn namespaces_are_apart(ctx: &Ctx) {
        let c = &ctx.cache;
        c.set("k", "plain", None).expect("set");
        assert_eq!(c.get_versioned("k", 0).expect("get"), None);
        c.set_versioned("v", "versioned", 3).expect("set");
        assert_eq!(c.get("v").expect("get"), None);
        // A token named like a key does not disturb either.
        c.incr("k").expect("incr");
        assert_eq!(c.get("k").expect("get").as_deref(), Some("plain"));
    }

    pub fn foreign_bytes_read_as_miss(ctx: &Ctx) {
        let c = &ctx.cache;
        let junk: &[&[u8]] = &[
            b"",
            b"hello",
            b"iC\x01\xff",
            b"\xff\xfe\x00",
            b"-5",
            b"0",
            b"99999999999999999999999",
        ];
        for (i, bytes) in junk.iter().enumerate() {
            let name = format!("foreign{i}");
            if !ctx.write_foreign(&key_of("v", &name), bytes) {
                eprintln!("foreign bytes: not applicable to the in-process backend");
                return;
            }
            ctx.write_foreign(&key_of("k", &name), bytes);
            ctx.write_foreign(&key_of("g", &name), bytes);
            assert_eq!(c.get_versioned(&name, 0).expect("get_versioned"), None);
            assert_eq!(c.get(&name).expect("get"), None);
            assert_eq!(c.get_bytes(&name).expect("get"), None);
            // A generation that is not ours is replaced by a fresh one.
            let g = c.get_sum(&[&name]).expect("get_sum");
            assert!(g > 1, "{g}");
            assert_eq!(c.get_sum(&[&name]).expect("get_sum"), g);
            ctx.write_foreign(&key_of("g", &name), bytes);
            let b = c.incr(&name).expect("incr");
            assert!(b > 1);
            assert_eq!(c.get_sum(&[&name]).expect("get_sum"), b);
        }
    }

    pub fn async_api_and_runtimes(ctx: &Ctx) {
        let c = ctx.cache.clone();
        // Sync API with no runtime at all.
        let g = c.incr("async-t").expect("incr");
        // Async API on a multi-thread runtime; sync API inside spawn_blocking
        // and even (blocking, but never panicking) inside an async task.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let c2 = c.clone();
        rt.block_on(async move {
            assert_eq!(c2.incr_async("async-t").await.expect("incr_async"), g + 1);
            assert_eq!(
                c2.incr_many_async(&["async-t"])
                    .await
                    .expect("incr_many_async"),
                vec![g + 2]
            );
            let v = c2.get_sum_async(&["async-t"]).await.expect("get_sum_async");
            assert_eq!(v, g + 2);
            c2.set_versioned_async("ak", "av", v)
                .await
                .expect("set_versioned_async");
            assert_eq!(
                c2.get_versioned_async("ak", v)
                    .await
                    .expect("get")
                    .as_deref(),
                Some("av")
            );
            c2.set_async("pk", "pv", None).await.expect("set_async");
            assert_eq!(
                c2.get_async("pk").await.expect("get_async").as_deref(),
                Some("pv")
            );
            assert_eq!(
                c2.get_many_async(&["pk"]).await.expect("get_many_async")[0].as_deref(),
                Some("pv")
            );
            assert!(c2.delete_async("pk").await.expect("delete_async"));
            let c3 = c2.clone();
            let inside = tokio::task::spawn_blocking(move || c3.get_sum(&["async-t"]))
                .await
                .expect("join")
                .expect("get_sum");
            assert_eq!(inside, v);
            assert_eq!(c2.get_sum(&["async-t"]).expect("sync in async"), v);
        });
        // A current-thread runtime, too.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            assert_eq!(
                c.get_sum_async(&["async-t"]).await.expect("get_sum_async"),
                g + 2
            );
        });
    }

    pub fn too_large_is_a_clear_error(ctx: &Ctx) {
        let (cache, size) = match ctx.kind {
            Kind::Memory => (
                ICache::from_url("memory://?max_bytes=65536").expect("open"),
                100_000,
            ),
            // The harness allows 32 MB items.
            Kind::Memcached | Kind::MemcachedPool => (ctx.cache.clone(), 40 << 20),
            Kind::Redis | Kind::RedisCluster => {
                eprintln!("too large: Redis takes values up to 512 MB; nothing to check here");
                return;
            }
        };
        let big = "x".repeat(size);
        let err = cache
            .set_versioned("big", big.as_str(), 1)
            .expect_err("too large");
        assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
        assert!(err.is_too_large());
        assert_eq!(cache.get_versioned("big", 1).expect("get"), None);
        // The handle still works afterwards.
        cache.set_versioned("small", "ok", 1).expect("set");
        assert_eq!(
            cache.get_versioned("small", 1).expect("get").as_deref(),
            Some("ok")
        );
    }

    pub fn server_stats_answer(ctx: &Ctx) {
        let stats = ctx.cache.server_stats().expect("server_stats");
        let want = match ctx.kind {
            Kind::Memory => "entries",
            Kind::Redis => "used_memory",
            Kind::Memcached => "curr_items",
            Kind::MemcachedPool => "server2.curr_items",
            Kind::RedisCluster => "node2.used_memory",
        };
        assert!(stats.iter().any(|(k, _)| k == want), "{stats:?}");
        ctx.cache.ping().expect("ping");
    }

    pub fn errors_and_debug_never_show_passwords(ctx: &Ctx) {
        let url = match ctx.kind {
            Kind::Memory => "memory://?bogus=1".to_string(),
            Kind::Redis => "redis://user:hunter2@127.0.0.1:1/0?timeout_ms=50".into(),
            Kind::Memcached => "memcached://user:hunter2@127.0.0.1:1".into(),
            Kind::MemcachedPool => "memcached://user:hunter2@127.0.0.1:1,127.0.0.1:2".into(),
            Kind::RedisCluster => {
                "redis+cluster://user:hunter2@127.0.0.1:1,127.0.0.1:2?timeout_ms=50".into()
            }
        };
        match ICache::from_url(&url) {
            Ok(c) => {
                assert!(!format!("{c:?}").contains("hunter2"));
                assert!(!c.url().contains("hunter2"));
                let e = c.incr("x").expect_err("port 1 is closed");
                assert!(e.is_unavailable(), "{e}");
                assert!(!e.to_string().contains("hunter2"), "{e}");
                assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
            }
            Err(e) => {
                assert!(e.is_config());
                assert!(!e.to_string().contains("hunter2"), "{e}");
            }
        }
    }
}

// ---- backend-specific behaviour ------------------------------------------

/// An unreachable server fails fast; a server that accepts connections but
/// never answers fails within the time-out, never hangs.
#[test]
fn unreachable_and_hanging_servers_fail_within_the_timeout() {
    for kind in [Kind::Redis, Kind::Memcached] {
        let Some(ctx) = Ctx::start(kind) else {
            continue;
        };
        let scheme = if kind == Kind::Redis {
            "redis"
        } else {
            "memcached"
        };
        // Closed port.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let c = ICache::from_url(&format!("{scheme}://127.0.0.1:{closed}?timeout_ms=100"))
            .expect("open");
        let t = Instant::now();
        let e = c.get_sum(&["x"]).expect_err("closed port");
        assert!(e.is_unavailable(), "{kind:?}: {e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        // Hanging: the proxy accepts and then forwards nothing.
        let proxy = Proxy::start(ctx.port());
        let c = ICache::from_url(&format!(
            "{scheme}://127.0.0.1:{}?timeout_ms=100&connect_timeout_ms=100",
            proxy.port()
        ))
        .expect("open");
        c.incr("h").expect("works through the proxy");
        proxy.pause();
        for op in 0..3 {
            let t = Instant::now();
            let e = c.get_sum(&["h"]).expect_err("hanging");
            assert!(e.is_timeout() || e.is_unavailable(), "{kind:?}: {e}");
            assert!(e.is_transient());
            assert!(
                t.elapsed() < Duration::from_millis(1500),
                "{kind:?} op {op}: {:?}",
                t.elapsed()
            );
        }
        proxy.resume();
        // Back to normal once the server answers again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.get_sum(&["h"]).is_err() {
            assert!(Instant::now() < deadline, "{kind:?} did not recover");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A server that restarts (losing everything) is used again without help, and
/// the lost generations come back fresh: old entries are not served.
#[test]
fn restarted_server_is_reconnected_and_nothing_old_matches() {
    for kind in [Kind::Redis, Kind::Memcached] {
        let Some(mut ctx) = Ctx::start(kind) else {
            continue;
        };
        let c = ctx.cache.clone();
        let v = c.get_sum(&["movies"]).expect("get_sum");
        c.set_versioned("page", "old", v).expect("set");
        match &mut ctx.server {
            Server::Redis(s) => s.restart(),
            Server::Memcached(s) => s.restart(),
            _ => unreachable!("a single server"),
        }
        // Pooled connections died with the server; the next call reconnects.
        let now = c.get_sum(&["movies"]).expect("get_sum after restart");
        assert_ne!(now, v);
        assert_eq!(c.get_versioned("page", now).expect("get"), None);
    }
}

#[test]
fn redis_password_and_database() {
    let Some(server) = RedisServer::start_with(&["--requirepass", "s3cret"]) else {
        return;
    };
    let port = server.port();
    let ok = ICache::from_url(&format!("redis://:s3cret@127.0.0.1:{port}/2")).expect("open");
    let g = ok.incr("movies").expect("incr with password");
    let other_db = ICache::from_url(&format!("redis://:s3cret@127.0.0.1:{port}/3")).expect("open");
    assert_ne!(
        other_db.get_sum(&["movies"]).expect("get_sum"),
        g,
        "databases are apart"
    );
    let bad = ICache::from_url(&format!("redis://:wrong@127.0.0.1:{port}/2")).expect("open");
    let e = bad.incr("movies").expect_err("wrong password");
    assert!(!e.to_string().contains("wrong"), "{e}");
    assert!(!format!("{bad:?}").contains("wrong"));
}

#[test]
fn redis_tls() {
    let Some(server) = support::RedisTlsServer::start() else {
        // Debian's redis-server has TLS; in CI its absence is a failure.
        let ci = matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"));
        assert!(
            !ci,
            "CI=true but no TLS redis-server could be started: the TLS test would be skipped"
        );
        eprintln!("SKIPPED: TLS redis-server could not be started here");
        return;
    };
    let ca = server.ca_cert_path();
    let url = format!(
        "{}?ca_file={}&timeout_ms=2000&connect_timeout_ms=2000",
        server.url(),
        ca.display()
    );
    let c = ICache::from_url(&url).expect("open");
    let v = c.get_sum(&["movies"]).expect("get_sum over TLS");
    c.set_versioned("page", "over tls", v).expect("set");
    assert_eq!(
        c.get_versioned("page", v).expect("get").as_deref(),
        Some("over tls")
    );
    assert_eq!(c.incr("movies").expect("incr"), v + 1);
    // Without our CA the certificate is not trusted.
    let untrusted = ICache::from_url(&format!(
        "{}?timeout_ms=2000&connect_timeout_ms=2000",
        server.url()
    ))
    .expect("open");
    assert!(untrusted.ping().is_err());
    // Unless the user says so.
    let insecure = ICache::from_url(&format!(
        "{}?timeout_ms=2000&connect_timeout_ms=2000#insecure",
        server.url()
    ))
    .expect("open");
    insecure.ping().expect("insecure TLS");
}

#[test]
fn redis_keys_are_readable_for_operators() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let c = ICache::from_url(&format!("{}?prefix=shop", server.url())).expect("open");
    let g = c.incr("movies").expect("incr");
    let mut s = TcpStream::connect(("127.0.0.1", server.port())).expect("connect");
    s.write_all(b"*2\r\n$3\r\nGET\r\n$16\r\nshop:ic:g:movies\r\n")
        .expect("write");
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).expect("read");
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.contains(&g.to_string()), "{reply}");
}

#[test]
fn sync_handles_share_connections_across_threads() {
    // Many threads, few pooled connections: nothing deadlocks or mixes up answers.
    for kind in [Kind::Memory, Kind::Redis, Kind::Memcached] {
        let Some(ctx) = Ctx::start(kind) else {
            continue;
        };
        let c = Arc::new(ctx.open("pool_size=2"));
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let c = Arc::clone(&c);
                thread::spawn(move || {
                    for i in 0..100 {
                        let key = format!("t{t}-{i}");
                        c.set_versioned(&key, key.as_str(), i).expect("set");
                        assert_eq!(
                            c.get_versioned(&key, i).expect("get").as_deref(),
                            Some(key.as_str())
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
    }
}
