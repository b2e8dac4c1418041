//! Section 6 of the report: bytes on the wire per hit, per near-cache mode.

use std::hint::black_box;

use icache::ICache;

use crate::report::{self, Goal, Table, Target};
use crate::support::Proxy;
use crate::{Section, progress};

use super::*;

/// Hits measured per mode (the proxy's counters are exact; this only
/// amortises the tracking connection's pings).
const HITS: u64 = 2_000;

pub(crate) fn wire(servers: &Servers<'_>) -> Section {
    let body = "x".repeat(186 * 1024);
    let modes = [
        ("redis", "near=off"),
        ("redis", "near=entries"),
        ("redis", "near=tracking"),
        ("memcached", "near=off"),
        ("memcached", "near=entries"),
    ];
    let mut table = Table::new(&[
        "backend, mode",
        "bytes from server per hit",
        "bytes to server per hit",
        "round trips per hit",
    ]);
    let mut targets = Vec::new();
    for (backend, near) in modes {
        progress(&format!("6/6 … {backend} {near}"));
        let proxy = Proxy::start(servers.port(backend));
        let url = format!(
            "{backend}://127.0.0.1:{}?timeout_ms=2000&{near}",
            proxy.port()
        );
        let cache = ICache::from_url(&url).unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
        fill(&cache, "wire", &TOKENS, &body);
        // Warm: the body is kept in process, tracking is on.
        for _ in 0..100 {
            black_box(hit(&cache, "wire", &TOKENS));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let before = cache.stats();
        let (down, up, trips) = (proxy.bytes_down(), proxy.bytes_up(), proxy.round_trips());
        for _ in 0..HITS {
            black_box(hit(&cache, "wire", &TOKENS));
        }
        let after = cache.stats();
        assert_eq!(
            after.hits - before.hits,
            HITS,
            "{backend} {near}: every lookup a hit"
        );
        let per = |n: u64| n as f64 / HITS as f64;
        let bytes_down = per(proxy.bytes_down() - down);
        table.row(&[
            format!("{backend}, `{near}`"),
            format!("{bytes_down:.1}"),
            format!("{:.1}", per(proxy.bytes_up() - up)),
            format!("{:.3}", per(proxy.round_trips() - trips)),
        ]);
        if near == "near=entries" {
            let limit = 100.0 + 40.0 * TOKENS.len() as f64;
            targets.push(Target {
                section: 6,
                what: format!(
                    "{backend} near=entries: bytes from server per hit ÷ (100 + 40 per token)"
                ),
                goal: Goal::AtMost(1.0),
                measured: bytes_down / limit,
            });
        }
    }
    let mut md = format!(
        "## 6. Bytes on the wire per hit\n\n\
         A {} block with the demo's 3 tokens, read {HITS} times as a hit through \
         the tool's counting TCP proxy (`icache_test_support::Proxy`), per \
         backend and `near=` mode. `near=off` moves the block on every hit; \
         `near=entries` (the default) moves the generations only; `near=tracking` \
         moves nothing per hit (what is left is the tracking connection's pings, \
         one every 25 ms, amortised over the run).\n\n",
        report::bytes(body.len())
    );
    md.push_str(&table.finish());
    for t in &targets {
        md.push_str(&t.line());
    }
    let missed_notes = targets
        .iter()
        .filter(|t| !t.met())
        .map(|t| {
            format!(
                "**6. {}** ({}): a hit with `near=entries` should carry only the \
                 generations; more bytes mean the body crossed the network, i.e. \
                 the in-process copy was not used.",
                t.what,
                report::ratio(t.measured)
            )
        })
        .collect();
    Section {
        markdown: md,
        targets,
        missed_notes,
    }
}
