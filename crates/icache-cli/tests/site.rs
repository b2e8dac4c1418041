//! The movies site on Redis and on memcached, invalidated from the command
//! line: `icache bump movies` from a shell makes the next page render afresh.

use icache_test_support as support;

use std::process::Command;

use icache::ICache;
use icache_demo::testing::{Site, movie_order, stat};

#[test]
fn icache_bump_from_the_command_line_invalidates_the_site() {
    let redis = support::RedisServer::start();
    let memcached = support::MemcachedServer::start();
    let urls: Vec<String> = redis
        .iter()
        .map(|s| s.url())
        .chain(memcached.iter().map(|s| s.url()))
        .collect();
    for url in urls {
        let site = Site::start(ICache::from_url(&format!("{url}?timeout_ms=2000")).expect("cache"));
        let first = site.get("/users/7");
        assert_eq!(first.status, 200);
        let list = movie_order(&first.body, "personal");
        let hits = stat(&site.get("/users/7").body, "hits");
        assert!(
            stat(&site.get("/users/7").body, "hits") > hits,
            "{url}: hits rise"
        );
        let misses = stat(&site.get("/users/7").body, "misses");

        let out = Command::new(env!("CARGO_BIN_EXE_icache"))
            .args(["bump", "movies", "--url", &url])
            .output()
            .expect("run icache");
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("movies "));

        let page = site.get("/users/7");
        assert_eq!(movie_order(&page.body, "personal"), list);
        let after = stat(&site.get("/users/7").body, "misses");
        assert!(
            after > misses,
            "{url}: the bump did not invalidate the page"
        );

        // And a rating is seen on the next fetch, as on the memory backend.
        let last = *list.last().expect("movies");
        let r = site.post_form("/users/7/rate", &format!("movie_id={last}&rating=5"));
        assert_eq!(r.status, 303);
        let moved = movie_order(&site.get("/users/7").body, "personal");
        assert!(
            moved.iter().position(|&m| m == last) < Some(list.len() - 1),
            "{url}"
        );
    }
}
