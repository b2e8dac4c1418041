//! Section 4 of the report: Page level.

use icache::ICache;
use icache_demo::testing::Site;

use crate::report::{self, Goal, Table, Target};
use crate::support::Proxy;
use crate::{Section, Settings, load, progress};

use super::*;

pub(crate) fn pages(servers: &Servers<'_>, settings: &Settings) -> Section {
    let paths: Vec<String> = (1..=icache_demo::db::USERS)
        .map(|id| format!("/users/{id}"))
        .collect();
    let cases = [
        ("icache on, memory", "memory"),
        ("icache on, redis", "redis"),
        ("icache on, memcached", "memcached"),
        ("icache on, redis near=tracking", "redis near=tracking"),
        ("redis hung (accepts, never answers)", "hung"),
        ("icache off (`none://`)", "off"),
    ];
    let mut results = Vec::new();
    for (label, backend) in cases {
        progress(&format!("4/6 … {label}"));
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
                    && body.contains("<ol id=\"personal\"")
                    && body.matches("<li data-movie=").count() >= 100,
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
    let rps = |prefix: &str| {
        results
            .iter()
            .find(|(label, _)| *label == prefix)
            .map(|(_, l)| l.rps)
            .unwrap_or_else(|| unreachable!("the {prefix} case was run"))
    };
    let targets = vec![
        Target {
            section: 4,
            what: "redis hung: p50 page latency ÷ `none://`'s".to_owned(),
            goal: Goal::AtMost(1.2),
            measured: hung.p50_us as f64 / off.p50_us.max(1) as f64,
        },
        Target {
            section: 4,
            what: "redis near=tracking: requests/s ÷ memory's".to_owned(),
            goal: Goal::AtLeast(0.8),
            measured: rps("icache on, redis near=tracking") / rps("icache on, memory"),
        },
    ];
    let mut missed_notes = Vec::new();
    if !targets[1].met() {
        missed_notes.push(format!(
            "**4. redis near=tracking, requests/s ÷ memory's** ({}): a page under \
             `near=tracking` serves every block from process like `memory://`; what \
             differs is the per-block work of checking the in-process generations \
             (one lock and one key encoding per token) and the tracking thread's \
             pings. On this 2-CPU VM the load generator, the site and Redis share \
             the CPUs, so a few percent of either shows.",
            report::ratio(targets[1].measured)
        ));
    }
    if !targets[0].met() {
        missed_notes.push(format!(
            "**4. redis hung, p50 ÷ `none://`** ({}): every request should fail \
             fast while the circuit breaker is open; a probe pays one 100 ms \
             time-out every back-off period (up to 4 s). A miss here means \
             probes or time-outs reached the median request.",
            report::ratio(targets[0].measured)
        ));
    }

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
