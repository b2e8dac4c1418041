//! End to end: the site on a free port, on each backend (real redis-server
//! and memcached started by the test harness), fetched, rated and fetched
//! again over HTTP.

use icache_test_support as support;

use icache::ICache;
use icache_demo::testing::{Site, movie_order, stat};
use support::{MemcachedServer, RedisServer};

enum Backend {
    Memory,
    Redis(RedisServer),
    Memcached(MemcachedServer),
}

impl Backend {
    fn all() -> Vec<Backend> {
        let mut v = vec![Backend::Memory];
        if let Some(s) = RedisServer::start() {
            v.push(Backend::Redis(s));
        }
        if let Some(s) = MemcachedServer::start() {
            v.push(Backend::Memcached(s));
        }
        v
    }
    fn url(&self) -> String {
        match self {
            Backend::Memory => "memory://".into(),
            Backend::Redis(s) => format!("{}?timeout_ms=2000", s.url()),
            Backend::Memcached(s) => format!("{}?timeout_ms=2000", s.url()),
        }
    }
}

#[test]
fn rate_a_movie_and_see_the_new_order_on_every_backend() {
    // The recorder before the first cache, as the binary does: a cache
    // opened earlier reports its counters nowhere (alone, this test saw no
    // icache_hits_total; with the other test first it did).
    icache_demo::prometheus();
    for backend in Backend::all() {
        let cache = ICache::from_url(&backend.url()).expect("cache");
        let site = Site::start(cache.clone());
        let name = cache.backend_name();

        let page = site.get("/users/3");
        assert_eq!(page.status, 200, "{name}: {}", page.body);
        assert!(page.body.contains(&format!("<b id=\"backend\">{name}</b>")));
        let before = movie_order(&page.body, "personal");
        assert_eq!(before.len(), 100, "{name}: one page of 100 movies");
        assert!(page.body.contains("page 1 of"), "{name}: the pager");
        let second = site.get("/users/3?page=2");
        assert_eq!(second.status, 200);
        assert!(
            movie_order(&second.body, "personal")
                .iter()
                .all(|m| !before.contains(m)),
            "{name}: page 2 lists other movies"
        );
        assert_eq!(site.get("/users/3?page=999").status, 404);
        assert_eq!(site.get("/users/3?page=x").status, 404);

        // The panel says what this request's block did, after rendering it:
        // the first view rendered and stored it, the next ones are hits.
        let kinds = |body: &str| -> Vec<String> {
            body.split("data-kind=\"")
                .skip(1)
                .filter_map(|s| s.split('"').next())
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(kinds(&page.body), ["stored"], "{name}: first view");
        assert!(
            page.body.contains("user.html line"),
            "{name}: the block is named"
        );
        assert!(
            page.body
                .contains("<code>movies-personal-rating, movies, 3, 1</code>")
        );
        // Repeated fetches are hits, and the list is the same.
        let hits0 = stat(&site.get("/users/3").body, "hits");
        let again = site.get("/users/3");
        assert_eq!(kinds(&again.body), ["hit"], "{name}: repeated view");
        assert!(
            stat(&again.body, "hits") > hits0,
            "{name}: hits did not rise"
        );
        assert_eq!(movie_order(&again.body, "personal"), before);
        // On a network backend the panel shows the near cache: the hit's
        // body came from this process (the default near=entries).
        if matches!(backend, Backend::Memory) {
            assert!(!again.body.contains("id=\"near\""), "{name}: no near panel");
        } else {
            assert!(stat(&again.body, "near-hits") > 0, "{name}: near hits");
            assert!(again.body.contains("id=\"near-bytes\""), "{name}");
        }

        // Rate the last movie 5 stars: it moves up into the 5-star group.
        let last = *before.last().expect("a movie");
        let r = site.post_form("/users/3/rate", &format!("movie_id={last}&rating=5"));
        assert_eq!(r.status, 303, "{name}: {}", r.body);
        assert_eq!(r.header("location"), Some("/users/3"));
        let after_page = site.get("/users/3");
        // What was committed and which tokens were bumped; the block
        // re-rendered because of it; shown once.
        assert!(
            after_page.body.contains("id=\"rated\""),
            "{name}: no rating notice"
        );
        assert!(
            after_page
                .body
                .contains("<code class=\"bumped\">movies</code>")
        );
        assert!(after_page.body.contains("<code class=\"bumped\">3</code>"));
        assert_eq!(
            kinds(&after_page.body),
            ["stored"],
            "{name}: after the rating"
        );
        assert!(after_page.body.contains("re-rendered: a token was bumped"));
        assert!(
            !site.get("/users/3").body.contains("id=\"rated\""),
            "shown once"
        );
        let after = movie_order(&after_page.body, "personal");
        let pos = after.iter().position(|&m| m == last).expect("still listed");
        assert!(
            pos < before.len() - 1,
            "{name}: movie {last} did not move up"
        );
        assert_eq!(after.len(), before.len());

        // The home page's top list (cached by 'movies') is served too.
        let home = site.get("/");
        assert_eq!(home.status, 200);
        assert_eq!(movie_order(&home.body, "top").len(), 20);
        let home_again = site.get("/");
        assert_eq!(
            movie_order(&home_again.body, "top"),
            movie_order(&home.body, "top")
        );

        // A bump from elsewhere (another process, an ops script) invalidates.
        let misses0 = stat(&site.get("/users/3").body, "misses");
        let other = if let Backend::Memory = backend {
            cache.clone()
        } else {
            ICache::from_url(&backend.url()).expect("other")
        };
        other.incr("movies").expect("bump");
        let page = site.get("/users/3");
        assert!(
            stat(&site.get("/users/3").body, "misses") > misses0,
            "{name}: bump did not invalidate"
        );
        assert_eq!(movie_order(&page.body, "personal"), after);

        // Health and metrics.
        let h = site.get("/healthz");
        assert_eq!(h.status, 200, "{}", h.body);
        assert!(h.body.contains(name));
        let m = site.get("/metrics");
        assert_eq!(m.status, 200);
        assert!(m.body.contains("icache_hits_total"), "{}", m.body);
        assert!(
            m.body.contains("icache_render_seconds_bucket"),
            "{}",
            m.body
        );
    }
}

#[test]
fn bad_input_gets_a_clear_4xx_page_and_loses_nothing() {
    let site = Site::start(ICache::memory());
    let ratings = || site.state_count();
    let before = ratings();
    for (method, path, body, status, needle) in [
        ("GET", "/users/9999", "", 404, "no user"),
        ("GET", "/users/abc", "", 404, "no user"),
        ("GET", "/users/-1", "", 404, "no user"),
        ("GET", "/nope", "", 404, "no such page"),
        (
            "POST",
            "/users/9999/rate",
            "movie_id=1&rating=3",
            404,
            "no user",
        ),
        (
            "POST",
            "/users/1/rate",
            "movie_id=999999&rating=3",
            404,
            "no movie",
        ),
        (
            "POST",
            "/users/1/rate",
            "movie_id=abc&rating=3",
            400,
            "not a number",
        ),
        (
            "POST",
            "/users/1/rate",
            "movie_id=1&rating=0",
            422,
            "out of range",
        ),
        (
            "POST",
            "/users/1/rate",
            "movie_id=1&rating=6",
            422,
            "out of range",
        ),
        (
            "POST",
            "/users/1/rate",
            "movie_id=1&rating=3.5",
            422,
            "out of range",
        ),
        (
            "POST",
            "/users/1/rate",
            "movie_id=1&rating=",
            422,
            "out of range",
        ),
        ("POST", "/users/1/rate", "movie_id=1", 400, "malformed"),
        ("POST", "/users/1/rate", "", 400, "malformed"),
        ("POST", "/users/1/rate", "%%%&&&=", 400, "malformed"),
    ] {
        let r = if method == "GET" {
            site.get(path)
        } else {
            site.post_form(path, body)
        };
        assert_eq!(r.status, status, "{method} {path} {body:?}: {}", r.body);
        assert!(
            r.body.to_lowercase().contains(needle),
            "{method} {path} {body:?}: {}",
            r.body
        );
        assert!(
            r.body.contains("<!doctype html>"),
            "a page, not a bare error"
        );
    }
    let r = site.post(
        "/users/1/rate",
        "application/json",
        "{\"movie_id\":1,\"rating\":3}",
    );
    assert!((400..500).contains(&r.status), "{}: {}", r.status, r.body);
    assert_eq!(ratings(), before, "nothing added or lost");
    // And the site still works.
    assert_eq!(site.get("/users/1").status, 200);
}

trait Count {
    fn state_count(&self) -> i64;
}

impl Count for Site {
    fn state_count(&self) -> i64 {
        self.state.db().count_ratings().expect("count")
    }
}
