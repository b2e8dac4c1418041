//! `icache bump --purge-url`: the movies site behind a real Varnish (the
//! repo's VCL); a bump from the shell purges exactly the pages of its tokens.

use std::process::Command;

use icache::ICache;
use icache_demo::testing::Site;
use icache_test_support as support;

fn x_cache(agent: &ureq::Agent, url: &str) -> String {
    let resp = agent
        .get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    resp.headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

fn bump(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_icache"))
        .args(["--url", url, "bump"])
        .args(args)
        .env_remove("ICACHE_PURGE_URL")
        .output()
        .expect("run icache")
}

/// The movies site on a real Redis, behind a real Varnish (fields drop
/// in this order: the proxy, then the site, then its cache).
struct Behind {
    agent: ureq::Agent,
    varnish: support::VarnishServer,
    url: String,
    _site: Site,
    _redis: support::RedisServer,
}

fn behind_varnish() -> Option<Behind> {
    let redis = support::RedisServer::start()?;
    let url = format!("{}?timeout_ms=2000", redis.url());
    let site = Site::start(ICache::from_url(&url).expect("cache"));
    let varnish = support::VarnishServer::start(site.port)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    Some(Behind {
        _redis: redis,
        _site: site,
        url,
        varnish,
        agent,
    })
}

#[test]
fn icache_bump_with_a_purge_url_purges_only_the_pages_of_its_tokens() {
    // Held whole: a pattern with `..` would drop the site and its Redis here.
    let Some(behind) = behind_varnish() else {
        return;
    };
    let (url, varnish, agent) = (&behind.url, &behind.varnish, &behind.agent);
    let page = format!("{}/users/7", varnish.url());
    x_cache(agent, &page);
    assert_eq!(x_cache(agent, &page), "HIT");

    // `icache bump 9`: user 7's page read no token 9; still a hit.
    let out = bump(url, &["9", "--purge-url", &varnish.url()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(x_cache(agent, &page), "HIT");
    // Without a purge URL the proxy is not told (said in the docs).
    assert!(bump(url, &["7"]).status.success());
    assert_eq!(x_cache(agent, &page), "HIT");
    // `icache bump 7 --purge-url`: purged, rendered afresh.
    let out = bump(url, &["7", "--purge-url", &varnish.url()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(x_cache(agent, &page), "MISS");
    assert_eq!(x_cache(agent, &page), "HIT");
}

#[test]
fn a_bad_purge_url_is_refused_before_the_bump_and_a_failed_purge_exits_1() {
    let Some(redis) = support::RedisServer::start() else {
        return;
    };
    let url = redis.url();
    let before = ICache::from_url(&url)
        .expect("cache")
        .generations(&["t"])
        .expect("gens")[0];
    let out = bump(&url, &["t", "--purge-url", "ftp://nope"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--purge-url") && err.contains("scheme"),
        "{err}"
    );
    let after = ICache::from_url(&url)
        .expect("cache")
        .generations(&["t"])
        .expect("gens")[0];
    assert_eq!(after, before, "nothing was bumped");

    // Nobody listens there: bumped (printed), then exit 1 saying so.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let out = bump(
        &url,
        &["t", "--purge-url", &format!("http://127.0.0.1:{port}")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("t "));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not purged"));
}

#[test]
fn icache_flush_with_a_purge_url_empties_the_proxy_of_tagged_pages() {
    // Held whole: a pattern with `..` would drop the site and its Redis here.
    let Some(behind) = behind_varnish() else {
        return;
    };
    let (url, varnish, agent) = (&behind.url, &behind.varnish, &behind.agent);
    let pages = [
        format!("{}/users/7", varnish.url()),
        format!("{}/users/8", varnish.url()),
    ];
    for page in &pages {
        x_cache(agent, page);
        assert_eq!(x_cache(agent, page), "HIT", "{page}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_icache"))
        .args(["--url", url, "flush", "--purge-url", &varnish.url()])
        .env_remove("ICACHE_PURGE_URL")
        .output()
        .expect("run icache");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every tagged page carries the flush token's key: all purged.
    for page in &pages {
        assert_eq!(x_cache(agent, page), "MISS", "{page}");
        assert_eq!(x_cache(agent, page), "HIT", "{page}");
    }
}
