//! The demo behind a real Varnish running deploy/varnish/icache.vcl: pages
//! served by Varnish after the first request, a rating purges exactly the
//! pages that read its tokens, one user's page is never another's, and the
//! layer's 304s and counters on /metrics.

use icache::ICache;
use icache_demo::testing::{Site, movie_order};
use icache_http::Purger;
use icache_test_support::VarnishServer;

struct Got {
    status: u16,
    x_cache: String,
    headers: ureq::http::HeaderMap,
    body: String,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

fn send(agent: &ureq::Agent, req: ureq::http::Request<String>) -> Got {
    let uri = req.uri().to_string();
    let mut resp = agent.run(req).unwrap_or_else(|e| panic!("{uri}: {e}"));
    Got {
        status: resp.status().as_u16(),
        x_cache: resp
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        headers: resp.headers().clone(),
        body: resp.body_mut().read_to_string().unwrap_or_default(),
    }
}

struct Stack {
    site: Site,
    varnish: VarnishServer,
    agent: ureq::Agent,
}

fn stack() -> Option<Stack> {
    let site = Site::start(ICache::memory());
    let varnish = VarnishServer::start(site.port)?;
    assert!(
        site.state
            .set_purger(Purger::varnish(&varnish.url()).expect("url"))
    );
    Some(Stack {
        site,
        varnish,
        agent: agent(),
    })
}

impl Stack {
    fn get(&self, path: &str) -> Got {
        self.get_from(&self.varnish.url(), path, &[])
    }

    fn get_from(&self, base: &str, path: &str, headers: &[(&str, &str)]) -> Got {
        let mut req = ureq::http::Request::get(format!("{base}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        send(&self.agent, req.body(String::new()).expect("request"))
    }

    fn rate(&self, user: i64, movie: i64, rating: i64) -> Got {
        let req = ureq::http::Request::post(format!("{}/users/{user}/rate", self.varnish.url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("movie_id={movie}&rating={rating}"))
            .expect("request");
        send(&self.agent, req)
    }
}

/// The rating shown for `movie` in the personal list.
fn shown_rating(body: &str, movie: i64) -> Option<i64> {
    let (_, rest) = body.split_once(&format!(
        "<li data-movie=\"{movie}\"><span class=\"rating\">"
    ))?;
    rest.split_once("/5")?.0.parse().ok()
}

#[test]
fn demo_pages_are_served_by_varnish_after_the_first_request() {
    let Some(s) = stack() else { return };
    for path in ["/", "/users/7", "/users/7?page=2"] {
        let first = s.get(path);
        assert_eq!(
            (first.status, first.x_cache.as_str()),
            (200, "MISS"),
            "{path}"
        );
        assert!(
            first.header("etag").starts_with("W/\""),
            "{path}: {:?}",
            first.headers
        );
        let second = s.get(path);
        assert_eq!(second.x_cache, "HIT", "{path}\n{}", s.varnish.log());
        assert_eq!(
            movie_order(&second.body, "personal"),
            movie_order(&first.body, "personal")
        );
    }
    // Not pages: never kept.
    for path in ["/metrics", "/healthz", "/users/nobody"] {
        s.get(path);
        assert_eq!(s.get(path).x_cache, "MISS", "{path}");
    }
}

#[test]
fn a_rating_shows_on_the_next_get_through_varnish_and_only_its_pages_are_purged() {
    let Some(s) = stack() else { return };
    let page = s.get("/users/7");
    let movie = *movie_order(&page.body, "personal").last().expect("a movie");
    let old = shown_rating(&page.body, movie).expect("a rating");
    let new = if old == 5 { 1 } else { 5 };
    assert_eq!(s.get("/users/7").x_cache, "HIT");
    s.get("/users/8");
    assert_eq!(s.get("/users/8").x_cache, "HIT");

    // An unrelated token: user 7's page stays cached.
    s.site.state.bump(&["9"]).expect("bump 9");
    assert_eq!(s.get("/users/7").x_cache, "HIT");

    let r = s.rate(7, movie, new);
    assert_eq!(r.status, 303, "{}", r.body);
    // Next GET (no TTL involved): the purge made it a miss; it shows the
    // new rating and the one-time notice, which no cache may keep.
    let next = s.get("/users/7");
    assert_eq!(next.x_cache, "MISS");
    assert_eq!(shown_rating(&next.body, movie), Some(new), "{}", next.body);
    assert!(next.body.contains("id=\"rated\""));
    assert_eq!(next.header("cache-control"), "no-store");
    // The page after it: fresh, without the notice, then cached again.
    let after = s.get("/users/7");
    assert!(
        !after.body.contains("id=\"rated\""),
        "the notice was cached"
    );
    assert_eq!(shown_rating(&after.body, movie), Some(new));
    let cached = s.get("/users/7");
    assert_eq!(cached.x_cache, "HIT");
    assert_eq!(shown_rating(&cached.body, movie), Some(new));
    // "movies" was bumped too: every list that shows ratings was purged.
    assert_eq!(s.get("/users/8").x_cache, "MISS");
}

#[test]
fn a_page_for_user_7_is_never_served_to_user_8() {
    let Some(s) = stack() else { return };
    let name = |id: i64| s.site.state.db().user(id).expect("db").expect("user").name;
    let (seven, eight) = (name(7), name(8));
    for _ in 0..3 {
        let p7 = s.get("/users/7");
        let p8 = s.get("/users/8");
        assert!(
            p7.body.contains(&format!("{seven}'s movies"))
                && !p7.body.contains(&format!("{eight}'s movies"))
        );
        assert!(
            p8.body.contains(&format!("{eight}'s movies"))
                && !p8.body.contains(&format!("{seven}'s movies"))
        );
        assert_ne!(
            movie_order(&p7.body, "personal"),
            movie_order(&p8.body, "personal")
        );
        // With session cookies too (the demo's pages do not vary on them:
        // such requests are never answered from the cache).
        let c8 = s.get_from(&s.varnish.url(), "/users/8", &[("cookie", "sessionid=7")]);
        assert!(c8.body.contains(&format!("{eight}'s movies")));
        assert_eq!(c8.x_cache, "MISS");
    }
}

#[test]
fn the_layer_answers_304_before_rendering_and_metrics_count_it() {
    let Some(s) = stack() else { return };
    let app = s.site.url();
    let page = s.get_from(&app, "/users/7", &[]);
    let etag = page.header("etag").to_owned();
    let rendered = s.site.state.cache().stats();
    let r = s.get_from(&app, "/users/7", &[("if-none-match", &etag)]);
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), etag);
    assert_eq!(r.header("cache-control"), "no-cache");
    // Nothing rendered: no block was looked up.
    let after = s.site.state.cache().stats();
    assert_eq!((after.hits, after.misses), (rendered.hits, rendered.misses));
    // Through Varnish too: it answers the revalidation from its copy.
    s.get("/users/7");
    assert_eq!(
        s.get_from(&s.varnish.url(), "/users/7", &[("if-none-match", &etag)])
            .status,
        304
    );
    // A stale tag after a bump: 200 with the new one.
    s.site.state.bump(&["7"]).expect("bump");
    let fresh = s.get_from(&app, "/users/7", &[("if-none-match", &etag)]);
    assert_eq!(fresh.status, 200);
    assert_ne!(fresh.header("etag"), etag);

    let metrics = s.get_from(&app, "/metrics", &[]).body;
    let value = |line_start: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{metrics}"))
    };
    assert!(value("icache_http_not_modified_total") >= 1.0);
    assert!(value("icache_http_manifest_hits_total") >= 1.0);
    assert!(value("icache_http_manifest_misses_total") >= 1.0);
    assert!(value("icache_http_purges_total{result=\"ok\"}") >= 1.0);
    value("icache_http_purges_total{result=\"error\"}");
}
