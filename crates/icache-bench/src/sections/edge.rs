//! Section 7 of the report: Pages at the edge (icache-http behind Varnish).

use std::time::{Duration, Instant};

use icache::ICache;
use icache_demo::testing::{Site, movie_order};
use icache_http::Purger;

use crate::report::{self, Goal, Table, Target};
use crate::support::VarnishServer;
use crate::{Section, Settings, load, progress};

/// Bump → fresh samples (each re-renders a page).
const FRESH_SAMPLES_QUICK: usize = 40;
const FRESH_SAMPLES_FULL: usize = 300;

/// The rating shown for `movie` in a page's personal list.
fn shown_rating(body: &str, movie: i64) -> Option<i64> {
    let (_, rest) = body.split_once(&format!(
        "<li data-movie=\"{movie}\"><span class=\"rating\">"
    ))?;
    rest.split_once("/5")?.0.parse().ok()
}

pub(crate) fn edge(settings: &Settings, quick: bool) -> Section {
    let cache = ICache::memory();
    let site = Site::start(cache.clone());
    let varnish = VarnishServer::start(site.port)
        .unwrap_or_else(|| panic!("varnishd is not installed: run scripts/test.sh"));
    let purger = Purger::varnish(&varnish.url()).unwrap_or_else(|e| panic!("{e}"));
    site.state.set_purger(purger.clone());
    let paths: Vec<String> = (1..=icache_demo::db::USERS)
        .map(|id| format!("/users/{id}"))
        .collect();

    // Every page once from the app (fills the blocks, learns the ETags)
    // and twice through Varnish (stores it, then checks it is a hit).
    let mut etags = Vec::new();
    for path in &paths {
        let r = site.get(path);
        let etag = r
            .header("etag")
            .unwrap_or_else(|| panic!("GET {path}: no ETag"))
            .to_owned();
        etags.push((path.clone(), format!("If-None-Match: {etag}\r\n")));
    }
    let mut client = load::Client::new(varnish.port());
    for path in &paths {
        for _ in 0..2 {
            let status = client
                .get(path)
                .unwrap_or_else(|e| panic!("GET {path} through Varnish: {e}"));
            assert_eq!(status, 200, "GET {path} through Varnish");
        }
    }
    drop(client);
    let hits_before = cache.stats().hits;

    let run = |label: &str, port: u16, requests: &[(String, String)], expect: u16| {
        progress(&format!("7/7 … {label}"));
        load::run_requests(
            port,
            settings.page_clients,
            requests,
            expect,
            settings.page_warmup,
            settings.page_duration,
        )
        .unwrap_or_else(|e| panic!("{label}: load test: {e}"))
    };
    let plain: Vec<(String, String)> = paths.iter().map(|p| (p.clone(), String::new())).collect();
    let through = run("through Varnish", varnish.port(), &plain, 200);
    let hits_through = cache.stats().hits;
    assert_eq!(
        hits_through, hits_before,
        "pages through Varnish reached the app (not all Varnish hits)"
    );
    let app = run("straight from the app", site.port, &plain, 200);
    let not_modified_before = site.state.pages().stats().not_modified;
    let hits_before_304 = cache.stats().hits;
    let revalidated = run("304 from the layer", site.port, &etags, 304);
    assert_eq!(
        cache.stats().hits,
        hits_before_304,
        "a 304 rendered a block: the handler ran"
    );
    assert!(site.state.pages().stats().not_modified > not_modified_before);

    // Bump → fresh page at Varnish: commit a new rating, bump (the clock
    // starts when `incr` returns), purge, GET through Varnish until the page
    // shows it (the first GET does, unless the purge was lost).
    progress("7/7 … bump → fresh page at Varnish");
    let samples = if quick {
        FRESH_SAMPLES_QUICK
    } else {
        FRESH_SAMPLES_FULL
    };
    let mut client = load::Client::new(varnish.port());
    let mut lat_us = Vec::with_capacity(samples);
    let mut extra_gets = 0usize;
    for i in 0..samples {
        let user = (i as i64 % icache_demo::db::USERS) + 1;
        let path = format!("/users/{user}");
        // Cached first (a hit), as a visitor would find it.
        client
            .get(&path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body = String::from_utf8_lossy(&client.body).into_owned();
        let movie = *movie_order(&body, "personal")
            .last()
            .unwrap_or_else(|| panic!("{path}: no movie list"));
        let old = shown_rating(&body, movie).unwrap_or_else(|| panic!("{path}: no rating"));
        // The last movie of page 1 rated 5 moves up, staying on the page;
        // rated 4 (when it had 5) it may move to page 2: either way the
        // page no longer shows its old rating.
        let new = if old == 5 { 4 } else { 5 };
        site.state
            .db()
            .rate(user, movie, new)
            .unwrap_or_else(|e| panic!("rate: {e}"));
        let user_token = user.to_string();
        let tokens = ["movies", user_token.as_str()];
        cache
            .incr_many(&tokens)
            .unwrap_or_else(|e| panic!("bump: {e}"));
        let t0 = Instant::now();
        purger
            .purge(&tokens)
            .unwrap_or_else(|e| panic!("purge: {e}"));
        loop {
            client
                .get(&path)
                .unwrap_or_else(|e| panic!("GET {path}: {e}"));
            let body = String::from_utf8_lossy(&client.body);
            if shown_rating(&body, movie) != Some(old) {
                break;
            }
            extra_gets += 1;
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{path}: the new rating never showed through Varnish"
            );
        }
        lat_us.push(t0.elapsed().as_micros() as u64);
    }
    lat_us.sort_unstable();
    let fresh_p50 = crate::timing::quantile(&lat_us, 0.50);
    let fresh_p99 = crate::timing::quantile(&lat_us, 0.99);

    let targets = vec![
        Target {
            section: 7,
            what: "user page through Varnish: requests/s ÷ the app's alone".to_owned(),
            goal: Goal::AtLeast(5.0),
            measured: through.rps / app.rps,
        },
        Target {
            section: 7,
            what: "304 from the layer: requests/s ÷ a full hit page's".to_owned(),
            goal: Goal::AtLeast(3.0),
            measured: revalidated.rps / app.rps,
        },
        Target {
            section: 7,
            what: "bump → fresh page at Varnish: p99 ÷ 20 ms".to_owned(),
            goal: Goal::AtMost(1.0),
            measured: fresh_p99 as f64 / 20_000.0,
        },
    ];
    let mut missed_notes = Vec::new();
    for t in targets.iter().filter(|t| !t.met()) {
        missed_notes.push(format!(
            "**7. {}** ({}): the load generator, the app, Varnish and its \
             worker threads share this VM's 2 CPUs; a page from the app costs \
             a render of the page around its block (SQLite for the user row \
             and count, MiniJinja for the rest) while Varnish and a 304 cost \
             neither, so on separate machines the ratio only grows.",
            t.what,
            report::ratio(t.measured)
        ));
    }

    let mut md = format!(
        "## 7. Pages at the edge\n\n\
         The demo (memory backend) behind `icache_http::PageLayer`, and a real \
         Varnish 7 with `deploy/varnish/icache.vcl` in front of it (vmod xkey, \
         no TTL), both on free loopback ports; {clients} client threads of the \
         tool's generator, `GET /users/1` … `/users/{users}` in turn, {warm} ms \
         warm-up, {secs} s measured. \"Through Varnish\" is all Varnish hits \
         (checked: no block was looked up in the app meanwhile); \"from the \
         app\" is all block hits; the 304 rows send each page's `If-None-Match` \
         to the app, which answers from the manifest without running the \
         handler (checked: no block looked up). Bump → fresh: a rating \
         committed to SQLite, `incr` of its tokens, then the clock starts: \
         the purge (`PURGE` with `xkey-purge`) and GETs through Varnish until \
         the page no longer shows the old rating ({samples} samples, {extra} GETs showed \
         the old page).\n\n",
        clients = settings.page_clients,
        users = paths.len(),
        warm = settings.page_warmup.as_millis(),
        secs = settings.page_duration.as_secs_f64(),
        extra = extra_gets,
    );
    let mut table = Table::new(&["case", "requests/s", "p50", "p99", "requests/s ÷ app"]);
    for (label, l) in [
        ("user page through Varnish (Varnish hit)", &through),
        ("user page straight from the app (block hits)", &app),
        ("304 from the layer (handler not run)", &revalidated),
    ] {
        table.row(&[
            label.to_owned(),
            report::count(l.rps),
            report::micros(l.p50_us),
            report::micros(l.p99_us),
            report::ratio(l.rps / app.rps),
        ]);
    }
    md.push_str(&table.finish());
    let mut fresh = Table::new(&["bump → fresh page at Varnish", "p50", "p99"]);
    fresh.row(&[
        "`incr` returned → first GET showing the new data".to_owned(),
        report::micros(fresh_p50),
        report::micros(fresh_p99),
    ]);
    md.push_str(&fresh.finish());
    for t in &targets {
        md.push_str(&t.line());
    }
    Section {
        markdown: md,
        targets,
        missed_notes,
    }
}
