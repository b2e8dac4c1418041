//! The five measurements, each returning its part of the report.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use icache::ICache;

use crate::raw::{Protocol, RawClient};
use crate::support::{MemcachedServer, RedisServer};
use crate::sysinfo;

/// The backends compared, in report order.
const BACKENDS: [&str; 3] = ["memory", "redis", "memcached"];

/// The demo block's tokens for user 7, as `{% icache 'movies-personal-rating'
/// 'movies' user.id %}` passes them.
const USER: i64 = 7;
const TOKENS: [&str; 3] = ["movies-personal-rating", "movies", "7"];
/// The standard fragment of sections 2 and 3: 4 KB of HTML, 3 tokens.
const STANDARD_SIZE: usize = 4 * 1024;

/// The servers the tool started.
pub(crate) struct Servers<'a> {
    redis: &'a RedisServer,
    memcached: &'a MemcachedServer,
}

impl<'a> Servers<'a> {
    pub(crate) fn new(redis: &'a RedisServer, memcached: &'a MemcachedServer) -> Self {
        Servers { redis, memcached }
    }

    /// A new handle on `backend` (`memory`, `redis`, `memcached` or `off`),
    /// optionally followed by a space and URL options (`redis near=off`).
    fn open(&self, backend: &str) -> ICache {
        let (backend, options) = backend.split_once(' ').unwrap_or((backend, ""));
        // A generous time-out: on a loaded 2-CPU machine a 1 MB answer can
        // take longer than the default 100 ms, and a time-out would turn a
        // timed hit into a fail-open render (which `AllHits` would catch).
        let url = match backend {
            "memory" => "memory://".to_owned(),
            "redis" => format!("{}?timeout_ms=2000", self.redis.url()),
            "memcached" => format!("{}?timeout_ms=2000", self.memcached.url()),
            "off" => "none://".to_owned(),
            other => unreachable!("no backend {other}"),
        };
        let url = if options.is_empty() {
            url
        } else {
            format!("{url}&{options}")
        };
        ICache::from_url(&url).unwrap_or_else(|e| panic!("cannot open {url}: {e}"))
    }

    /// A new handle on a remote `backend` reached through a proxy on `port`.
    fn open_via(&self, backend: &str, port: u16) -> ICache {
        let url = format!("{backend}://127.0.0.1:{port}?timeout_ms=2000");
        ICache::from_url(&url).unwrap_or_else(|e| panic!("cannot open {url}: {e}"))
    }

    fn port(&self, backend: &str) -> u16 {
        match backend {
            "redis" => self.redis.port(),
            "memcached" => self.memcached.port(),
            other => unreachable!("no server for {other}"),
        }
    }

    /// A raw connection whose request fetches `tokens` generation-sized
    /// values and one `size`-byte value in one multi-key get.
    fn raw_many(&self, backend: &str, tokens: usize, size: usize) -> RawClient {
        let protocol = match backend {
            "redis" => Protocol::Redis,
            _ => Protocol::Memcached,
        };
        let mut items: Vec<(String, Vec<u8>)> = (0..tokens)
            .map(|i| {
                let generation = format!("{}", (1u64 << 61) + i as u64);
                (format!("icache-bench:gen:{i:02}"), generation.into_bytes())
            })
            .collect();
        items.push((
            format!("icache-bench:entry:{tokens}"),
            html(size).into_bytes(),
        ));
        RawClient::connect_many(protocol, self.port(backend), &items)
            .unwrap_or_else(|e| panic!("bare {backend} connection: {e}"))
    }

    fn raw(&self, backend: &str, size: usize) -> RawClient {
        let protocol = match backend {
            "redis" => Protocol::Redis,
            _ => Protocol::Memcached,
        };
        let port = self.port(backend);
        let key = format!("icache-bench:bare:{size}");
        RawClient::connect(protocol, port, &key, html(size).as_bytes())
            .unwrap_or_else(|e| panic!("bare {backend} connection: {e}"))
    }

    pub(crate) fn redis_version(&self) -> String {
        let v = sysinfo::version_of("redis-server", &["--version"]);
        // "Redis server v=7.0.15 sha=… malloc=… build=…": the version is enough.
        v.split(" sha=").next().unwrap_or(&v).to_owned()
    }

    pub(crate) fn memcached_version(&self) -> String {
        sysinfo::version_of("memcached", &["-V"])
    }
}

/// `size` bytes of list-item HTML.
fn html(size: usize) -> String {
    "<li data-movie=\"42\"><span class=\"title\">The Silent River</span> (1984)</li>\n"
        .chars()
        .cycle()
        .take(size)
        .collect()
}

/// Checks that a timed loop was all hits: a miss or a backend error inside
/// it would mean something other than a hit was timed.
struct AllHits {
    cache: ICache,
    before: icache::Stats,
    what: String,
}

impl AllHits {
    fn new(cache: &ICache, what: impl Into<String>) -> Self {
        AllHits {
            cache: cache.clone(),
            before: cache.stats(),
            what: what.into(),
        }
    }

    fn check(self) {
        let now = self.cache.stats();
        assert!(
            now.misses == self.before.misses
                && now.errors == self.before.errors
                && now.hits > self.before.hits,
            "{}: the timed loop was not all hits (before {:?}, after {:?})",
            self.what,
            self.before,
            now
        );
    }
}

/// A fragment hit. Every measurement names its fragment (`fragment` takes a name,
/// which only adds the name to the key), so entries of different sections
/// never meet on the shared servers. The body never runs on a hit, and
/// `AllHits` checks there was no miss.
///
/// Through `fragment_arc()`, which hands out the stored text itself (what a
/// response body or a template engine takes): `fragment()` adds a copy of
/// it into a `String`, the "+ copy" rows of sections 2 and 3.
fn hit(cache: &ICache, name: &str, tokens: &[&str]) -> Arc<str> {
    let html = cache.fragment_arc(name, tokens, || Ok::<_, Infallible>(String::new()));
    html.unwrap_or_else(|never| match never {})
}

/// Stores `html` as fragment `name` and checks it is served.
fn fill(cache: &ICache, name: &str, tokens: &[&str], html: &str) {
    let stored = cache.fragment(name, tokens, || Ok::<_, Infallible>(html.to_owned()));
    let again = hit(cache, name, tokens);
    assert!(
        stored.is_ok() && &*again == html,
        "{}: fragment {name} was not stored ({:?})",
        cache.backend_name(),
        cache.stats()
    );
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("icache-bench-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the memory backend keeps, for the direct lookups: generations as
/// shared atomics, entries behind an `Arc`.
#[derive(Clone)]
enum Item {
    Gen(Arc<AtomicU64>),
    Entry(Arc<str>),
}

/// The lookups a memory hit needs, made directly on quick_cache: one get per
/// token's generation and one for the entry, under the same key strings.
struct Direct {
    store: quick_cache::sync::Cache<String, Item>,
    gens: Vec<String>,
    entry: String,
}

impl Direct {
    fn new(name: &str, tokens: &[&str], html: &str) -> Self {
        let store = quick_cache::sync::Cache::new(1024);
        for (i, t) in tokens.iter().enumerate() {
            store.insert(
                (*t).to_owned(),
                Item::Gen(Arc::new(AtomicU64::new(i as u64 + 1))),
            );
        }
        // The name icache gives a `fragment()` entry: the count of
        // identity parts, then every part length-prefixed.
        let mut entry = String::from("2|5:named");
        for part in std::iter::once(&name).chain(tokens) {
            let _ = write!(entry, "{}:{part}", part.len());
        }
        store.insert(entry.clone(), Item::Entry(Arc::from(html)));
        Direct {
            store,
            gens: tokens.iter().map(|t| (*t).to_owned()).collect(),
            entry,
        }
    }

    fn get(&self) -> Arc<str> {
        let mut version = 0u64;
        for g in &self.gens {
            if let Some(Item::Gen(cell)) = self.store.get(g.as_str()) {
                version = version.wrapping_add(cell.load(Ordering::Acquire));
            }
        }
        black_box(version);
        match self.store.get(self.entry.as_str()) {
            Some(Item::Entry(html)) => html,
            _ => unreachable!("the direct entry is never evicted from a 1024-entry cache"),
        }
    }
}

pub(crate) mod bump;
mod edge;
mod engines;
mod growth;
mod hit_vs_bare;
mod hit_vs_render;
mod memory_per_entry;
mod outbox;
mod pages;
mod wire;

pub(crate) use bump::bump_under_load;
pub(crate) use edge::edge;
pub(crate) use growth::growth;
pub(crate) use hit_vs_bare::hit_vs_bare;
pub(crate) use hit_vs_render::hit_vs_render;
pub(crate) use memory_per_entry::memory_per_entry;
pub(crate) use outbox::outbox;
pub(crate) use pages::pages;
pub(crate) use wire::wire;
