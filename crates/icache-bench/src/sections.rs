//! The five measurements, each returning its part of the report.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use icache::ICache;
use icache_demo::AppState;
use icache_demo::testing::Site;

use crate::raw::{Protocol, RawClient};
use crate::report::{self, Goal, Table, Target};
use crate::support::{MemcachedServer, Proxy, RedisServer};
use crate::timing::{self, Case};
use crate::{Options, Section, Settings, load, memory, progress, sysinfo};

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

    /// A new handle on `backend` (`memory`, `redis`, `memcached` or `off`).
    fn open(&self, backend: &str) -> ICache {
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

/// A fragment hit. Every measurement names its fragment (`fragment_named`,
/// which only adds the name to the key), so entries of different sections
/// never meet on the shared servers. The body never runs on a hit, and
/// `AllHits` checks there was no miss.
fn hit(cache: &ICache, name: &str, tokens: &[&str]) -> String {
    let html = cache.fragment_named(name, tokens, || Ok::<_, Infallible>(String::new()));
    html.unwrap_or_else(|never| match never {})
}

/// Stores `html` as fragment `name` and checks it is served.
fn fill(cache: &ICache, name: &str, tokens: &[&str], html: &str) {
    let stored = cache.fragment_named(name, tokens, || Ok::<_, Infallible>(html.to_owned()));
    let again = hit(cache, name, tokens);
    assert!(
        stored.is_ok() && again == html,
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

// ---------------------------------------------------------------------------
// 1. Hit vs render
// ---------------------------------------------------------------------------

pub(crate) fn hit_vs_render(servers: &Servers<'_>, settings: &Settings) -> Section {
    let dir = TempDir::new("block");
    let sites: Vec<(&str, AppState)> = BACKENDS
        .iter()
        .map(|&b| {
            let state = icache_demo::open(&dir.0, servers.open(b))
                .unwrap_or_else(|e| panic!("open the demo on {b}: {e}"));
            (b, state)
        })
        .collect();
    let render = |state: &AppState, cached: bool| -> String {
        state
            .render_personal_rating(USER, cached)
            .unwrap_or_else(|e| panic!("render the personal-rating block: {e}"))
    };
    let plain = render(&sites[0].1, false);
    let rows = plain.matches("<li data-movie=").count();
    assert!(rows > 300, "the block lists {rows} movies");
    for (name, state) in &sites {
        render(state, true);
        let hits = state.cache().stats().hits;
        let cached = render(state, true);
        assert!(
            state.cache().stats().hits > hits,
            "{name}: the block was not served from the cache"
        );
        // Byte for byte the block the uncached render produces (MiniJinja
        // drops the final newline of the body-only template).
        assert_eq!(cached.trim_end(), plain.trim_end(), "{name}: block differs");
        fill(state.cache(), "block", &TOKENS, &plain);
    }

    let checks: Vec<AllHits> = sites
        .iter()
        .map(|(n, s)| AllHits::new(s.cache(), format!("{n} block")))
        .collect();
    // The floor for a remote hit: one bare round trip moving as many bytes.
    let mut bare_redis = servers.raw("redis", plain.len());
    let mut bare_memcached = servers.raw("memcached", plain.len());
    let mut cases = vec![Case::new("render", || {
        black_box(render(&sites[0].1, false));
    })];
    for (name, state) in &sites {
        cases.push(Case::new(format!("{name} block hit"), move || {
            black_box(render(state, true));
        }));
    }
    for (name, state) in &sites {
        cases.push(Case::new(format!("{name} fragment() hit"), move || {
            black_box(hit(state.cache(), "block", &TOKENS));
        }));
    }
    cases.push(Case::new("redis bare GET", || {
        black_box(bare_redis.get().unwrap_or_else(|e| panic!("bare GET: {e}")));
    }));
    cases.push(Case::new("memcached bare get", || {
        black_box(
            bare_memcached
                .get()
                .unwrap_or_else(|e| panic!("bare get: {e}")),
        );
    }));
    let t = timing::interleaved(&settings.plan, &mut cases);
    drop(cases);
    checks.into_iter().for_each(AllHits::check);

    let render_ns = t[0];
    // t[7], t[8]: bare GET of the block's size on redis, memcached.
    let bare_block = |name: &str| match name {
        "redis" => Some(t[7]),
        "memcached" => Some(t[8]),
        _ => None,
    };
    let mut md = format!(
        "## 1. Hit vs render\n\n\
         The demo's personal-rating block for user {USER}: {rows} movies from SQLite \
         through MiniJinja, {} of HTML. *Render* is the block's body without the \
         cache (query and template every time); a *block hit* renders the same \
         block, `{{% icache 'movies-personal-rating' 'movies' user.id %}}` \
         included, through the demo's MiniJinja environment, served from the \
         cache. A *fragment hit* is the same HTML served by `fragment_named()` (the \
         block API for any renderer), without a template engine around it. \
         One client thread.\n\n",
        report::bytes(plain.len())
    );
    let mut table = Table::new(&["case", "time per block", "render ÷ this"]);
    table.row(&[
        "render uncached (SQLite + MiniJinja)".into(),
        report::time(render_ns),
        report::ratio(1.0),
    ]);
    for (i, name) in BACKENDS.iter().enumerate() {
        table.row(&[
            format!("block hit, {name}"),
            report::time(t[1 + i]),
            report::ratio(render_ns / t[1 + i]),
        ]);
    }
    for (i, name) in BACKENDS.iter().enumerate() {
        table.row(&[
            format!("fragment hit, {name}"),
            report::time(t[4 + i]),
            report::ratio(render_ns / t[4 + i]),
        ]);
    }
    for (i, name) in ["redis", "memcached"].iter().enumerate() {
        table.row(&[
            format!(
                "bare `GET` of {}, {name} (no icache: the floor)",
                report::bytes(plain.len())
            ),
            report::time(t[7 + i]),
            report::ratio(render_ns / t[7 + i]),
        ]);
    }
    md.push_str(&table.finish());

    let targets: Vec<Target> = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, name)| Target {
            section: 1,
            what: format!("{name}: render ÷ block hit"),
            goal: Goal::AtLeast(if *name == "memory" { 100.0 } else { 20.0 }),
            measured: render_ns / t[1 + i],
        })
        .collect();
    for t in &targets {
        md.push_str(&t.line());
    }
    let mut missed_notes = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        if target.met() {
            continue;
        }
        let name = BACKENDS[i];
        let (block, fragment) = (t[1 + i], t[4 + i]);
        let mut note = format!(
            "**1. {}** ({} measured, {} wanted). The block hit took {}; the fragment hit \
             of the same HTML without the template engine took {} (render ÷ fragment \
             hit: {}).",
            target.what,
            report::ratio(target.measured),
            target.goal_text(),
            report::time(block),
            report::time(fragment),
            report::ratio(render_ns / fragment),
        );
        if block > fragment * 1.05 {
            let _ = write!(
                note,
                " So {} of the block hit is MiniJinja around the block: the {} string is \
                 copied out of the cache, into a template value, and into the output.",
                report::time(block - fragment),
                report::bytes(plain.len()),
            );
        }
        if let Some(bare) = bare_block(name) {
            let _ = write!(
                note,
                " The rest is the wire: one bare `GET` of a {} value, with no client \
                 library and no icache at all, takes {} on this machine's loopback, so \
                 no {name} client could do better than render ÷ bare = {} here; the \
                 fragment hit is {} of that floor. The block renders in only {}, and it \
                 is large, so the round trip that moves it dominates. What would close \
                 it: fewer bytes on the wire per hit, either by compressing entries \
                 (HTML shrinks several-fold) or by keeping a copy of the entry in \
                 process and fetching only the generations from {name} (a hit would \
                 then move a few dozen bytes); or a network where a 200 KB transfer is \
                 cheaper than on this VM.",
                report::bytes(plain.len()),
                report::time(bare),
                report::ratio(render_ns / bare),
                report::ratio(fragment / bare),
                report::time(render_ns),
            );
        } else {
            let _ = write!(
                note,
                " What would close it: fewer copies of the stored HTML per hit. The \
                 hit returns a fresh `String` (copy one), the template function turns \
                 it into a safe MiniJinja string (copy two) and the template writes it \
                 to the output (copy three). Handing MiniJinja the stored `Arc<str>` \
                 would leave only the last; it needs a change in `crates/icache`, and \
                 MiniJinja 3.1 has no public way to make a safe string from an \
                 `Arc<str>` without copying, so possibly one upstream too."
            );
        }
        missed_notes.push(note);
    }
    Section {
        markdown: md,
        targets,
        missed_notes,
    }
}

// ---------------------------------------------------------------------------
// 2. Hit vs the bare minimum
// ---------------------------------------------------------------------------

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
        // The name icache gives a `fragment_named()` entry: the count of
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

pub(crate) fn hit_vs_bare(servers: &Servers<'_>, settings: &Settings) -> Section {
    let body = html(STANDARD_SIZE);
    let caches: Vec<ICache> = BACKENDS.iter().map(|b| servers.open(b)).collect();
    for c in &caches {
        fill(c, "standard", &TOKENS, &body);
    }
    let direct = Direct::new("standard", &TOKENS, &body);
    let mut redis = servers.raw("redis", STANDARD_SIZE);
    let mut memcached = servers.raw("memcached", STANDARD_SIZE);
    let checks: Vec<AllHits> = caches
        .iter()
        .map(|c| AllHits::new(c, format!("{} bare", c.backend_name())))
        .collect();
    let mut cases = vec![
        Case::new("memory hit", || {
            black_box(hit(&caches[0], "standard", &TOKENS));
        }),
        Case::new("quick_cache gets", || {
            black_box(direct.get());
        }),
        Case::new("quick_cache gets + copy", || {
            black_box(direct.get().to_string());
        }),
        Case::new("redis hit", || {
            black_box(hit(&caches[1], "standard", &TOKENS));
        }),
        Case::new("redis bare GET", || {
            black_box(redis.get().unwrap_or_else(|e| panic!("bare GET: {e}")));
        }),
        Case::new("memcached hit", || {
            black_box(hit(&caches[2], "standard", &TOKENS));
        }),
        Case::new("memcached bare get", || {
            black_box(memcached.get().unwrap_or_else(|e| panic!("bare get: {e}")));
        }),
    ];
    let t = timing::interleaved(&settings.plan, &mut cases);
    drop(cases);
    checks.into_iter().for_each(AllHits::check);

    let gets = TOKENS.len() + 1;
    let mut md = format!(
        "## 2. Hit vs the bare minimum\n\n\
         A fragment hit (`fragment_named()`) of {size} of HTML with {n} tokens (as the demo's block), \
         one client thread. **Memory**: the bare minimum is the {gets} lookups a hit \
         needs ({n} generations and the entry) made directly on quick_cache, the \
         crate under the memory backend, with the same key strings; the second row \
         adds copying the value into a `String`, which a hit returns. \
         **Redis, memcached**: one bare `GET` of a {size} value on a raw TCP \
         connection (no client library: write the request, read the length, read \
         the bytes), against the icache hit on its own pooled connection, which \
         fetches the {n} generations and the entry in one round trip.\n\n",
        size = report::bytes(STANDARD_SIZE),
        n = TOKENS.len(),
    );
    let mut table = Table::new(&["comparison", "icache hit", "bare minimum", "hit ÷ bare"]);
    let rows = [
        (format!("memory vs {gets} quick_cache gets"), t[0], t[1]),
        (
            format!("memory vs {gets} quick_cache gets + copy to `String`"),
            t[0],
            t[2],
        ),
        ("redis vs one bare `GET`".to_owned(), t[3], t[4]),
        ("memcached vs one bare `get`".to_owned(), t[5], t[6]),
    ];
    for (label, icache, bare) in &rows {
        table.row(&[
            label.clone(),
            report::time(*icache),
            report::time(*bare),
            report::ratio(icache / bare),
        ]);
    }
    md.push_str(&table.finish());
    let targets = vec![
        Target {
            section: 2,
            what: format!("memory: hit ÷ {gets} direct quick_cache gets"),
            goal: Goal::AtMost(2.0),
            measured: t[0] / t[1],
        },
        Target {
            section: 2,
            what: "redis: hit ÷ one bare GET".to_owned(),
            goal: Goal::AtMost(1.3),
            measured: t[3] / t[4],
        },
        Target {
            section: 2,
            what: "memcached: hit ÷ one bare get".to_owned(),
            goal: Goal::AtMost(1.3),
            measured: t[5] / t[6],
        },
    ];
    for t in &targets {
        md.push_str(&t.line());
    }
    let mut missed_notes = Vec::new();
    if !targets[0].met() {
        missed_notes.push(format!(
            "**2. {what}** ({measured} measured, {goal} wanted). The {gets} lookups take \
             {lookups}; adding the copy of the {size} value into the `String` a hit \
             returns makes {copied}, {share:.0}% of the hit's {hit}. The rest is what a \
             hit does besides its lookups (measured with callgrind on the hit path): \
             it builds the block's name (its identity and its {n} tokens, length \
             prefixed) as a new string and hashes it for the entry's lookup, \
             allocates the vectors of fetched generations and entries that every \
             backend returns, checks the stored version against the sum, clones two \
             `Arc`s, and bumps its own and the `metrics` counters: a handful of small \
             allocations and frees, and the generic backend interface. What would \
             close it (changes in `crates/icache`): return the stored `Arc<str>` \
             instead of a copy, cache the block's name per call site, and give the \
             memory backend a lookup that fills caller-owned buffers; a hit would \
             then cost little more than its lookups.",
            what = targets[0].what,
            measured = report::ratio(targets[0].measured),
            goal = targets[0].goal_text(),
            lookups = report::time(t[1]),
            size = report::bytes(STANDARD_SIZE),
            copied = report::time(t[2]),
            share = t[2] / t[0] * 100.0,
            hit = report::time(t[0]),
            n = TOKENS.len(),
        ));
    }
    for (target, (hit_ns, bare_ns)) in targets[1..].iter().zip([(t[3], t[4]), (t[5], t[6])]) {
        if !target.met() {
            missed_notes.push(format!(
                "**2. {}** ({} measured, {} wanted). Both are one round trip on the same \
                 server thread; the hit takes {} more ({} against {}). icache's own \
                 bookkeeping is about the memory backend's whole hit, {}; the rest is \
                 the request itself and its client: one multi-key get of {} keys \
                 instead of a `GET` of one, {} values to parse, the entry to decode \
                 (header, version, server instance) and its payload copied out. On \
                 this VM a round trip's own cost also moves with what the other CPU \
                 is doing, which the alternating batches spread over both sides but \
                 cannot remove. What would close it: a client that parses the answer \
                 in place (no copy of the payload before decoding) and sends the \
                 request from a reused buffer.",
                target.what,
                report::ratio(target.measured),
                target.goal_text(),
                report::time((hit_ns - bare_ns).max(1.0)),
                report::time(hit_ns),
                report::time(bare_ns),
                report::time(t[0]),
                TOKENS.len() + 1,
                TOKENS.len() + 1,
            ));
        }
    }
    Section {
        markdown: md,
        targets,
        missed_notes,
    }
}

// ---------------------------------------------------------------------------
// 3. How the cost grows
// ---------------------------------------------------------------------------

const TOKEN_COUNTS: [usize; 4] = [1, 4, 16, 64];
const SIZES: [usize; 3] = [1024, 64 * 1024, 1024 * 1024];
const THREADS: [usize; 4] = [1, 2, 4, 8];

pub(crate) fn growth(servers: &Servers<'_>, settings: &Settings) -> Section {
    let caches: Vec<ICache> = BACKENDS.iter().map(|b| servers.open(b)).collect();
    let mut md = String::from("## 3. How the cost grows\n\n");
    let mut targets = Vec::new();
    let mut missed_notes = Vec::new();

    // Tokens per block.
    progress("3/5 … tokens per block");
    let body = html(STANDARD_SIZE);
    let token_lists: Vec<Vec<String>> = TOKEN_COUNTS
        .iter()
        .map(|&n| (0..n).map(|i| format!("token-{i:02}")).collect())
        .collect();
    let mut by_backend: Vec<Vec<f64>> = Vec::new();
    // Remote backends: the same multi-key request without icache (the token
    // count's generations, 19-digit values, plus the entry), per count.
    let mut bare_multi: Vec<Vec<f64>> = Vec::new();
    for cache in &caches {
        let lists: Vec<Vec<&str>> = token_lists
            .iter()
            .map(|l| l.iter().map(String::as_str).collect())
            .collect();
        for l in &lists {
            fill(cache, "tokens", l, &body);
        }
        let backend = cache.backend_name();
        let mut raws: Vec<RawClient> = if backend == "memory" {
            Vec::new()
        } else {
            TOKEN_COUNTS
                .iter()
                .map(|&n| servers.raw_many(backend, n, STANDARD_SIZE))
                .collect()
        };
        let check = AllHits::new(cache, format!("{backend} tokens"));
        let mut cases: Vec<Case<'_>> = lists
            .iter()
            .map(|l| {
                Case::new(format!("{} tokens", l.len()), move || {
                    black_box(hit(cache, "tokens", l));
                })
            })
            .collect();
        for raw in &mut raws {
            cases.push(Case::new(format!("bare {backend} multi-get"), move || {
                black_box(raw.get().unwrap_or_else(|e| panic!("bare multi-get: {e}")));
            }));
        }
        let mut t = timing::interleaved(&settings.plan, &mut cases);
        drop(cases);
        check.check();
        if t.len() > TOKEN_COUNTS.len() {
            bare_multi.push(t.split_off(TOKEN_COUNTS.len()));
        }
        by_backend.push(t);
    }
    let _ = write!(
        md,
        "### Tokens per block\n\n\
         A fragment hit of {size} with 1 to 64 tokens, one client thread; \
         \"÷ 1\" is the cost relative to the same backend with one token. A remote \
         hit is one round trip whatever the count (one `MGET` / multi-key `get`), \
         so it should stay nearly flat; the memory backend does one hash lookup \
         per token. *Bare MGET* / *bare get* is the same request without icache: \
         one multi-key get, on a raw connection, of as many 19-digit values as \
         there are tokens plus one {size} value. *Round trips* are counted per hit \
         (mean of 5) by a TCP proxy between icache and the server.\n\n",
        size = report::bytes(STANDARD_SIZE)
    );
    // Round trips per hit, counted by a TCP proxy between icache and the
    // server: the claim that a hit stays one round trip, checked per count.
    let mut round_trips: Vec<Vec<f64>> = Vec::new();
    for backend in ["redis", "memcached"] {
        let proxy = Proxy::start(servers.port(backend));
        let cache = servers.open_via(backend, proxy.port());
        round_trips.push(
            token_lists
                .iter()
                .map(|l| {
                    let l: Vec<&str> = l.iter().map(String::as_str).collect();
                    fill(&cache, "tokens", &l, &body);
                    let before = proxy.round_trips();
                    for _ in 0..5 {
                        black_box(hit(&cache, "tokens", &l));
                    }
                    (proxy.round_trips() - before) as f64 / 5.0
                })
                .collect(),
        );
    }
    let mut table = Table::new(&[
        "tokens per block",
        "memory",
        "÷ 1",
        "redis",
        "÷ 1",
        "bare MGET",
        "hit ÷ MGET",
        "round trips",
        "memcached",
        "÷ 1",
        "bare get",
        "hit ÷ get",
        "round trips",
    ]);
    for (i, n) in TOKEN_COUNTS.iter().enumerate() {
        let mut row = vec![if *n == 1 {
            "1 token".to_owned()
        } else {
            format!("{n} tokens")
        }];
        for (b, times) in by_backend.iter().enumerate() {
            row.push(report::time(times[i]));
            row.push(report::ratio(times[i] / times[0]));
            if b > 0 {
                let bare = bare_multi[b - 1][i];
                row.push(report::time(bare));
                row.push(report::ratio(times[i] / bare));
                row.push(format!("{}", round_trips[b - 1][i]));
            }
        }
        table.row(&row);
    }
    md.push_str(&table.finish());
    // What one more token costs, from 1 to 64 tokens.
    let per_token: Vec<f64> = by_backend.iter().map(|t| (t[3] - t[0]) / 63.0).collect();
    let _ = writeln!(
        md,
        "From 1 to 64 tokens, each extra token adds about {} on memory, {} on redis \
         and {} on memcached.\n",
        report::time(per_token[0].max(1.0)),
        report::time(per_token[1].max(1.0)),
        report::time(per_token[2].max(1.0)),
    );
    for (b, name) in BACKENDS.iter().enumerate().skip(1) {
        let times = &by_backend[b];
        let target = Target {
            section: 3,
            what: format!("{name}: 64 tokens ÷ 1 token (nearly flat)"),
            goal: Goal::AtMost(1.5),
            measured: times[3] / times[0],
        };
        if !target.met() {
            let bare = &bare_multi[b - 1];
            let added = (times[3] - times[0]).max(1.0);
            let added_bare = (bare[3] - bare[0]).max(0.0).min(added);
            missed_notes.push(format!(
                "**3. {what}** ({measured} measured, {goal} wanted; the issue asks for \
                 \"nearly flat\", taken here as at most 1.5×: 63 more tokens cost less \
                 than half of a one-token hit). It is still one round trip (counted \
                 through a proxy: see the table), and 64 tokens add {added} to a \
                 {one} hit. The same multi-key request without icache grows from {bare1} \
                 to {bare64}, so {bare_share:.0}% of the added time is the protocol and \
                 the server (a longer request, 65 lookups, 64 more values in the \
                 answer). The rest, about {per} per token, is work per token in the \
                 client: encoding a key for each token, parsing and checking each \
                 generation, recording each token in the block's list of reads (the \
                 memory backend, doing that bookkeeping without a network, spends \
                 {memory} per token). What would close it: less work per token in \
                 the crate (keys encoded into one reused buffer, no allocation per \
                 token); and on a real network, where a round trip costs more than \
                 on loopback, the same work weighs less.",
                what = target.what,
                measured = report::ratio(target.measured),
                goal = target.goal_text(),
                added = report::time(added),
                one = report::time(times[0]),
                bare1 = report::time(bare[0]),
                bare64 = report::time(bare[3]),
                bare_share = added_bare / added * 100.0,
                per = report::time(((added - added_bare) / 63.0).max(1.0)),
                memory = report::time(per_token[0].max(1.0)),
            ));
        }
        targets.push(target);
    }
    for t in &targets {
        md.push_str(&t.line());
    }
    md.push('\n');

    // Fragment size.
    progress("3/5 … fragment size");
    let _ = write!(
        md,
        "### Fragment size\n\n\
         A fragment hit with {} tokens, one client thread, against the bare \
         minimum of section 2 for a value of the same size: direct quick_cache \
         gets (and a copy into a `String`, which a hit returns) for \
         memory, one bare `GET` for Redis and memcached.\n\n",
        TOKENS.len()
    );
    let mut table = Table::new(&[
        "size",
        "memory hit",
        "direct gets",
        "gets + copy",
        "hit ÷ gets",
        "redis hit",
        "bare GET",
        "hit ÷ GET",
        "memcached hit",
        "bare get",
        "hit ÷ get",
    ]);
    for size in SIZES {
        let body = html(size);
        let name = format!("size-{size}");
        for cache in &caches {
            fill(cache, &name, &TOKENS, &body);
        }
        let sized_hit = |cache: &ICache| -> String { hit(cache, &name, &TOKENS) };
        let direct = Direct::new(&name, &TOKENS, &body);
        let mut redis = servers.raw("redis", size);
        let mut memcached = servers.raw("memcached", size);
        let checks: Vec<AllHits> = caches
            .iter()
            .map(|c| AllHits::new(c, format!("{} {}", c.backend_name(), report::bytes(size))))
            .collect();
        let mut cases = vec![
            Case::new("memory hit", || {
                black_box(sized_hit(&caches[0]));
            }),
            Case::new("direct gets", || {
                black_box(direct.get());
            }),
            Case::new("direct gets + copy", || {
                black_box(direct.get().to_string());
            }),
            Case::new("redis hit", || {
                black_box(sized_hit(&caches[1]));
            }),
            Case::new("redis bare GET", || {
                black_box(redis.get().unwrap_or_else(|e| panic!("bare GET: {e}")));
            }),
            Case::new("memcached hit", || {
                black_box(sized_hit(&caches[2]));
            }),
            Case::new("memcached bare get", || {
                black_box(memcached.get().unwrap_or_else(|e| panic!("bare get: {e}")));
            }),
        ];
        let t = timing::interleaved(&settings.plan, &mut cases);
        drop(cases);
        checks.into_iter().for_each(AllHits::check);
        table.row(&[
            report::bytes(size),
            report::time(t[0]),
            report::time(t[1]),
            report::time(t[2]),
            report::ratio(t[0] / t[1]),
            report::time(t[3]),
            report::time(t[4]),
            report::ratio(t[3] / t[4]),
            report::time(t[5]),
            report::time(t[6]),
            report::ratio(t[5] / t[6]),
        ]);
    }
    md.push_str(&table.finish());

    // Client threads.
    progress("3/5 … client threads");
    let _ = write!(
        md,
        "### Client threads\n\n\
         The {} fragment of section 2 hit by 1 to 8 threads at once through one \
         shared handle (its pool keeps up to 8 connections) for {} ms per round, \
         median of {} rounds: hits per second in total, and the time one hit \
         takes as its thread sees it (threads ÷ rate). This machine has {} CPUs, \
         shared with the servers, so beyond that many threads the rate stays \
         flat and each hit waits longer.\n\n",
        report::bytes(STANDARD_SIZE),
        settings.plan.round.as_millis(),
        settings.plan.rounds,
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    for cache in &caches {
        fill(cache, "threads", &TOKENS, &body);
    }
    let mut headings = vec!["client threads".to_owned()];
    for b in BACKENDS {
        headings.push(format!("{b} hits/s"));
        headings.push(format!("{b} per hit"));
    }
    let headings: Vec<&str> = headings.iter().map(String::as_str).collect();
    let mut table = Table::new(&headings);
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); THREADS.len()];
    for cache in &caches {
        let check = AllHits::new(cache, format!("{} threads", cache.backend_name()));
        let op = || {
            black_box(hit(cache, "threads", &TOKENS));
        };
        for (i, rate) in timing::throughput(&settings.plan, &THREADS, &op)
            .into_iter()
            .enumerate()
        {
            rates[i].push(rate);
        }
        check.check();
    }
    for (i, &n) in THREADS.iter().enumerate() {
        let mut row = vec![if n == 1 {
            "1 thread".to_owned()
        } else {
            format!("{n} threads")
        }];
        for rate in &rates[i] {
            row.push(report::count(*rate));
            row.push(report::time(n as f64 / rate * 1e9));
        }
        table.row(&row);
    }
    md.push_str(&table.finish());

    Section {
        markdown: md,
        targets,
        missed_notes,
    }
}

// ---------------------------------------------------------------------------
// 4. Page level
// ---------------------------------------------------------------------------

pub(crate) fn pages(servers: &Servers<'_>, settings: &Settings) -> Section {
    let paths: Vec<String> = (1..=icache_demo::db::USERS)
        .map(|id| format!("/users/{id}"))
        .collect();
    let cases = [
        ("icache on, memory", "memory"),
        ("icache on, redis", "redis"),
        ("icache on, memcached", "memcached"),
        ("redis hung (accepts, never answers)", "hung"),
        ("icache off (`none://`)", "off"),
    ];
    let mut results = Vec::new();
    for (label, backend) in cases {
        progress(&format!("4/5 … {label}"));
        // A Redis that accepts connections and never answers: the path to
        // it goes through a proxy that holds everything back. With the
        // default 100 ms time-out, the circuit breaker should make pages
        // render at uncached speed.
        let hung = (backend == "hung").then(|| {
            let proxy = Proxy::start(servers.port("redis"));
            proxy.set_fault(crate::support::Fault::Hang);
            proxy
        });
        let cache = match &hung {
            Some(proxy) => ICache::from_url(&format!("redis://127.0.0.1:{}", proxy.port()))
                .unwrap_or_else(|e| panic!("{label}: {e}")),
            None => servers.open(backend),
        };
        let site = Site::start(cache.clone());
        // Every user's page once: checks the pages and fills the cache.
        let mut client = load::Client::new(site.port);
        for path in &paths {
            let status = client
                .get(path)
                .unwrap_or_else(|e| panic!("{label}: GET {path}: {e}"));
            let body = String::from_utf8_lossy(&client.body);
            assert!(
                status == 200
                    && body.contains("<ol id=\"personal\">")
                    && body.matches("<li data-movie=").count() > 300,
                "{label}: GET {path} answered {status} without the movie list"
            );
        }
        drop(client);
        let before = cache.stats();
        let load = load::run(
            site.port,
            settings.page_clients,
            &paths,
            settings.page_warmup,
            settings.page_duration,
        )
        .unwrap_or_else(|e| panic!("{label}: load test: {e}"));
        let after = cache.stats();
        if backend == "off" || backend == "hung" {
            assert_eq!(after.hits, 0, "{label}: served a hit");
        } else {
            assert!(
                after.misses == before.misses && after.errors == before.errors,
                "{label}: pages under load were not all hits (before {before:?}, after {after:?})"
            );
        }
        assert!(load.requests > 0, "{label}: no request completed");
        results.push((label, load));
        drop(site);
    }
    let off = results
        .last()
        .map(|(_, l)| l.clone())
        .unwrap_or_else(|| unreachable!("five cases were run"));
    let hung = results
        .iter()
        .find(|(label, _)| label.starts_with("redis hung"))
        .map(|(_, l)| l.clone())
        .unwrap_or_else(|| unreachable!("the hung case was run"));
    let targets = vec![Target {
        section: 4,
        what: "redis hung: p50 page latency ÷ `none://`'s".to_owned(),
        goal: Goal::AtMost(1.2),
        measured: hung.p50_us as f64 / off.p50_us.max(1) as f64,
    }];
    let missed_notes = if targets[0].met() {
        Vec::new()
    } else {
        vec![format!(
            "- **redis hung, p50 ÷ `none://`** ({}): every request should fail \
             fast while the circuit breaker is open; a probe pays one 100 ms \
             time-out every back-off period (up to 4 s). A miss here means \
             probes or time-outs reached the median request.",
            report::ratio(targets[0].measured)
        )]
    };

    let mut md = format!(
        "## 4. Page level\n\n\
         The demo site (`icache_demo::testing::Site`: axum, 2 runtime workers, \
         SQLite, MiniJinja) on a free port, loaded by the tool's own HTTP/1.1 \
         generator: {clients} client threads, one keep-alive connection each, \
         `GET /users/1` … `/users/{users}` in turn, {warm} ms of warm-up then \
         {secs} s measured. Every page was fetched once before, so with icache \
         on each request is a hit (checked: no miss, no error during the run); \
         `none://` renders every block; \"redis hung\" is Redis behind a proxy \
         that accepts connections and never answers (default 100 ms time-out), \
         where every block renders uncached. The generator, the site and the server \
         share this machine's CPUs, so the rates are lower than on separate \
         machines; the on/off ratio is the point.\n\n",
        clients = settings.page_clients,
        users = paths.len(),
        warm = settings.page_warmup.as_millis(),
        secs = settings.page_duration.as_secs_f64(),
    );
    let mut table = Table::new(&[
        "case",
        "requests/s",
        "p50",
        "p99",
        "requests/s ÷ off",
        "p50 off ÷ this",
    ]);
    for (label, l) in &results {
        table.row(&[
            (*label).to_owned(),
            report::count(l.rps),
            report::micros(l.p50_us),
            report::micros(l.p99_us),
            report::ratio(l.rps / off.rps),
            report::ratio(off.p50_us as f64 / l.p50_us.max(1) as f64),
        ]);
    }
    md.push_str(&table.finish());
    for t in &targets {
        md.push_str(&t.line());
    }
    Section {
        markdown: md,
        targets,
        missed_notes,
    }
}

// ---------------------------------------------------------------------------
// 5. Memory per entry
// ---------------------------------------------------------------------------

pub(crate) fn memory_per_entry(options: &Options, settings: &Settings) -> Section {
    let (entries, payload) = (settings.memory_entries, settings.memory_payload);
    let measured: Vec<memory::Measured> = memory::Kind::ALL
        .iter()
        .map(|&k| memory::measure(&options.exe, k, entries, payload))
        .collect();
    let mut md = format!(
        "## 5. Memory per entry\n\n\
         {entries} entries of {payload} bytes each inserted into a fresh `memory://` \
         cache (default 64 MiB bound; nothing evicted, checked) in a fresh process; \
         the growth of the process's resident memory (`VmRSS` in \
         `/proc/self/status`, read before the cache is created and after the last \
         insert), minus the payload bytes, divided by the entry count. So the \
         overhead is everything an entry costs beyond its payload: key string, \
         entry header, hash-table slot, `Arc`s, allocator rounding, and the \
         cache's own tables amortised over the entries. The last row is \
         quick_cache alone with the same keys and `Arc<str>` values, for \
         reference. *Charged* is what the memory backend counts against its \
         `max_bytes` bound per entry.\n\n",
        entries = report::count(entries as f64),
    );
    let mut table = Table::new(&[
        "entries",
        "key length",
        "RSS growth",
        "resident per entry",
        "overhead per entry",
        "charged per entry",
    ]);
    for m in &measured {
        table.row(&[
            m.kind.label().to_owned(),
            format!("{} B", m.key_bytes),
            format!("{:.1} MB", m.rss_growth as f64 / f64::from(1 << 20)),
            format!("{:.0} B", m.rss_growth as f64 / m.entries as f64),
            format!("{:.0} B", m.overhead()),
            m.charged.map_or("—".to_owned(), |c| {
                format!("{:.0} B", c as f64 / m.entries as f64)
            }),
        ]);
    }
    md.push_str(&table.finish());
    if let Some(fragment) = measured.iter().find(|m| m.kind == memory::Kind::Fragment)
        && let Some(charged) = fragment.charged
    {
        let _ = writeln!(
            md,
            "The `max_bytes` bound counts {:.0}% of what a fragment entry really \
             occupies here ({:.0} of {:.0} bytes): a `memory://?max_bytes=N` cache \
             full of entries like these takes about {:.2} × N of resident memory.\n",
            charged as f64 / fragment.rss_growth as f64 * 100.0,
            charged as f64 / fragment.entries as f64,
            fragment.rss_growth as f64 / fragment.entries as f64,
            fragment.rss_growth as f64 / charged as f64,
        );
    }
    Section {
        markdown: md,
        targets: Vec::new(),
        missed_notes: Vec::new(),
    }
}
