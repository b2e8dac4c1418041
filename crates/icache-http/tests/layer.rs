//! PageLayer through axum: tags, 304 before the handler, what gets no
//! manifest, Vary, HEAD, the header budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use icache::ICache;
use icache_http::{PageLayer, SurrogateHeader, surrogate_key};
use tower::ServiceExt;

/// A site whose handlers count their calls.
struct Site {
    app: Router,
    layer: PageLayer,
    cache: ICache,
    calls: Arc<AtomicUsize>,
}

fn site_with(cache: ICache, layer: PageLayer) -> Site {
    let calls = Arc::new(AtomicUsize::new(0));
    let (c, n) = (cache.clone(), calls.clone());
    let page = move |req: Request| {
        let (c, n) = (c.clone(), n.clone());
        async move {
            n.fetch_add(1, Ordering::SeqCst);
            let user = req.uri().path().trim_start_matches("/users/").to_owned();
            let list = c
                .fragment("list", &["movies", &user], || {
                    Ok::<_, String>(format!("<ul>{user}</ul>"))
                })
                .unwrap_or_default();
            let top = c
                .fragment("top", &["movies"], || Ok::<_, String>("<ol/>".into()))
                .unwrap_or_default();
            let mut resp = format!("{list}{top}").into_response();
            let extra: &[(&str, &str)] = match req.uri().query() {
                Some("cookie") => &[("set-cookie", "sid=1")],
                Some("private") => &[("cache-control", "private")],
                Some("no-store") => &[("cache-control", "max-age=0, no-store")],
                Some("lang") => &[("vary", "accept-language")],
                _ => &[],
            };
            for (k, v) in extra {
                resp.headers_mut()
                    .insert(*k, v.parse().expect("header value"));
            }
            if req.uri().query() == Some("missing") {
                *resp.status_mut() = StatusCode::NOT_FOUND;
            }
            resp
        }
    };
    let (c, n) = (cache.clone(), calls.clone());
    // Rendered off the executor, carried there by icache::Scope.
    let blocking = move || {
        let (c, n) = (c.clone(), n.clone());
        async move {
            n.fetch_add(1, Ordering::SeqCst);
            let scope = icache::Scope::current();
            tokio::task::spawn_blocking(move || {
                scope
                    .run(|| c.fragment("b", &["movies"], || Ok::<_, String>("<p/>".into())))
                    .unwrap_or_default()
            })
            .await
            .unwrap_or_default()
        }
    };
    let (c, n) = (cache.clone(), calls.clone());
    let tokenless = move || {
        let (c, n) = (c.clone(), n.clone());
        async move {
            n.fetch_add(1, Ordering::SeqCst);
            c.fragment("none", &[] as &[&str], || Ok::<_, String>("x".into()))
                .unwrap_or_default()
        }
    };
    let (c, n) = (cache.clone(), calls.clone());
    let nested = move || {
        let (c, n) = (c.clone(), n.clone());
        async move {
            n.fetch_add(1, Ordering::SeqCst);
            c.fragment("outer", &["a"], || {
                let inner = c.fragment("inner", &["b"], || Ok::<_, String>("<i/>".into()))?;
                Ok::<_, String>(format!("<o>{inner}</o>"))
            })
            .unwrap_or_default()
        }
    };
    let app = Router::new()
        .route("/users/{id}", get(page))
        .route("/nested", get(nested))
        .route("/blocking", get(blocking))
        .route("/tokenless", get(tokenless))
        .route("/plain", get(|| async { "no blocks" }))
        .layer(layer.clone());
    Site {
        app,
        layer,
        cache,
        calls,
    }
}

fn site() -> Site {
    let cache = ICache::memory();
    site_with(cache.clone(), PageLayer::new(cache))
}

impl Site {
    async fn send(&self, method: &str, uri: &str, headers: &[(&str, &str)]) -> Response {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.app
            .clone()
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("infallible")
    }

    async fn get(&self, uri: &str) -> Response {
        self.send("GET", uri, &[]).await
    }

    async fn revalidate(&self, uri: &str, etag: &str) -> Response {
        self.send("GET", uri, &[("if-none-match", etag)]).await
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().expect("ascii").to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_cached_page_gets_a_weak_etag_surrogate_keys_and_no_cache() {
    let s = site();
    let r = s.get("/users/7").await;
    assert_eq!(r.status(), 200);
    let etag = header(r.headers(), "etag");
    assert!(
        etag.starts_with("W/\"") && etag.ends_with('"') && etag.len() > 20,
        "{etag}"
    );
    let keys = header(r.headers(), "surrogate-key");
    let mut got: Vec<&str> = keys.split(' ').collect();
    got.sort_unstable();
    // The flush token's key too: one purge of it empties the proxy after
    // `ICache::flush`.
    let mut want = vec![
        surrogate_key("movies"),
        surrogate_key("7"),
        surrogate_key(ICache::FLUSH_TOKEN),
    ];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(header(r.headers(), "cache-control"), "no-cache");
    // The same data, the same tag (hit or miss); another page, another tag.
    assert_eq!(header(s.get("/users/7").await.headers(), "etag"), etag);
    assert_ne!(header(s.get("/users/8").await.headers(), "etag"), etag);
    assert_eq!(s.layer.stats().tagged, 3);
}

#[tokio::test]
async fn a_304_is_answered_without_running_the_handler() {
    let s = site();
    let first = s.get("/users/7").await;
    let etag = header(first.headers(), "etag");
    assert_eq!(s.calls(), 1);
    for _ in 0..3 {
        let r = s.revalidate("/users/7", &etag).await;
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header(r.headers(), "etag"), etag);
        assert_eq!(header(r.headers(), "cache-control"), "no-cache");
        assert_eq!(
            header(r.headers(), "surrogate-key"),
            header(first.headers(), "surrogate-key")
        );
        let body = axum::body::to_bytes(r.into_body(), 1 << 20)
            .await
            .expect("body");
        assert!(body.is_empty());
    }
    assert_eq!(s.calls(), 1, "the handler ran for a 304");
    let st = s.layer.stats();
    assert_eq!(
        (st.not_modified, st.manifest_hits, st.manifest_misses),
        (3, 3, 0)
    );
    // A strong form of the same tag and a list match too (weak comparison).
    let strong = etag.trim_start_matches("W/");
    let r = s.revalidate("/users/7", &format!("\"zz\", {strong}")).await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(s.calls(), 1);
}

#[tokio::test]
async fn a_stale_etag_gets_200_and_the_new_etag() {
    let s = site();
    let old = header(s.get("/users/7").await.headers(), "etag");
    s.cache.incr("7").expect("bump");
    let r = s.revalidate("/users/7", &old).await;
    assert_eq!(r.status(), 200);
    let new = header(r.headers(), "etag");
    assert_ne!(new, old);
    assert_eq!(s.calls(), 2);
    assert_eq!(s.layer.stats().manifest_misses, 1);
    // The new tag is now the current one.
    assert_eq!(
        s.revalidate("/users/7", &new).await.status(),
        StatusCode::NOT_MODIFIED
    );
    assert_eq!(s.revalidate("/users/7", &old).await.status(), 200);
    assert_eq!(s.calls(), 3);
}

#[tokio::test]
async fn a_bump_of_an_unrelated_token_keeps_304() {
    let s = site();
    let etag = header(s.get("/users/7").await.headers(), "etag");
    s.cache.incr_many(&["8", "series"]).expect("bump");
    assert_eq!(
        s.revalidate("/users/7", &etag).await.status(),
        StatusCode::NOT_MODIFIED
    );
    assert_eq!(s.calls(), 1);
}

#[tokio::test]
async fn head_behaves_like_get() {
    let s = site();
    let head = s.send("HEAD", "/users/7", &[]).await;
    assert_eq!(head.status(), 200);
    let etag = header(head.headers(), "etag");
    assert!(!etag.is_empty());
    assert_eq!(header(s.get("/users/7").await.headers(), "etag"), etag);
    let calls = s.calls();
    let r = s
        .send("HEAD", "/users/7", &[("if-none-match", &etag)])
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(r.headers(), "etag"), etag);
    assert_eq!(s.calls(), calls);
}

#[tokio::test]
async fn cookies_errors_private_and_no_store_get_no_manifest() {
    let s = site();
    for query in ["cookie", "private", "no-store", "missing"] {
        let uri = format!("/users/7?{query}");
        let r = s.get(&uri).await;
        assert!(
            r.headers().get("etag").is_none(),
            "{query}: {:?}",
            r.headers()
        );
        assert!(r.headers().get("surrogate-key").is_none(), "{query}");
        let before = s.calls();
        let r = s.revalidate(&uri, "*").await;
        assert_ne!(r.status(), StatusCode::NOT_MODIFIED, "{query}");
        assert_eq!(s.calls(), before + 1, "{query}: the handler must run");
    }
    // The handler's own Cache-Control is kept.
    assert_eq!(
        header(s.get("/users/7?private").await.headers(), "cache-control"),
        "private"
    );
}

#[tokio::test]
async fn pages_without_tokens_or_blocks_or_with_an_uncached_block_get_no_etag() {
    let s = site();
    for uri in ["/tokenless", "/plain"] {
        let r = s.get(uri).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("etag").is_none(), "{uri}");
        assert!(r.headers().get("cache-control").is_none(), "{uri}");
    }
    // Caching off: every block renders, nothing is known.
    let off = ICache::from_url("none://").expect("none://");
    let s = site_with(off.clone(), PageLayer::new(off));
    assert!(s.get("/users/7").await.headers().get("etag").is_none());
    // The backend is down: blocks render uncached.
    let down = ICache::from_url("redis://127.0.0.1:1?timeout_ms=50").expect("url");
    let s = site_with(down.clone(), PageLayer::new(down));
    let r = s.get("/users/7").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("etag").is_none());
    assert_eq!(s.revalidate("/users/7", "*").await.status(), 200);
}

#[tokio::test]
async fn blocks_rendered_in_spawn_blocking_and_handed_over_count() {
    let s = site();
    let r = s.get("/blocking").await;
    let etag = header(r.headers(), "etag");
    assert!(!etag.is_empty(), "{:?}", r.headers());
    let mut keys: Vec<String> = header(r.headers(), "surrogate-key")
        .split(' ')
        .map(str::to_owned)
        .collect();
    keys.sort();
    let mut want = vec![surrogate_key("movies"), surrogate_key(ICache::FLUSH_TOKEN)];
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(
        s.revalidate("/blocking", &etag).await.status(),
        StatusCode::NOT_MODIFIED
    );
    assert_eq!(s.calls(), 1);
}

#[tokio::test]
async fn a_page_that_varies_has_a_manifest_per_variant() {
    let s = site();
    let en = s
        .send("GET", "/users/7?lang", &[("accept-language", "en")])
        .await;
    let fr = s
        .send("GET", "/users/7?lang", &[("accept-language", "fr")])
        .await;
    let (en, fr) = (header(en.headers(), "etag"), header(fr.headers(), "etag"));
    assert_ne!(en, fr);
    let r = s
        .send(
            "GET",
            "/users/7?lang",
            &[("accept-language", "fr"), ("if-none-match", &en)],
        )
        .await;
    assert_eq!(
        r.status(),
        200,
        "the English tag must not validate the French page"
    );
    let r = s
        .send(
            "GET",
            "/users/7?lang",
            &[("accept-language", "en"), ("if-none-match", &en)],
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(header(r.headers(), "vary"), "accept-language");
}

#[tokio::test]
async fn over_the_header_budget_the_page_is_private_and_counted() {
    let cache = ICache::memory();
    // Three keys of 26 bytes and their spaces on /users/7, two on /blocking.
    let s = site_with(cache.clone(), PageLayer::new(cache).header_budget(60));
    let r = s.get("/users/7").await;
    assert!(r.headers().get("surrogate-key").is_none());
    assert_eq!(header(r.headers(), "cache-control"), "private, no-cache");
    assert!(r.headers().get("etag").is_some());
    assert_eq!(s.layer.stats().over_budget, 1);
    // Within budget with two keys (53 bytes).
    let r = s.get("/blocking").await;
    assert_eq!(header(r.headers(), "cache-control"), "no-cache");
}

#[tokio::test]
async fn the_keys_header_is_selectable() {
    let cache = ICache::memory();
    let s = site_with(
        cache.clone(),
        PageLayer::new(cache).surrogate_header(SurrogateHeader::CacheTag),
    );
    let r = s.get("/users/7").await;
    let tags = header(r.headers(), "cache-tag");
    assert_eq!(tags.split(',').count(), 3, "{tags}");
    assert!(r.headers().get("surrogate-key").is_none());
}

#[tokio::test]
async fn a_nested_blocks_tokens_are_in_the_tag_even_when_the_outer_block_is_a_hit() {
    let s = site();
    let first = s.get("/nested").await;
    let etag = header(first.headers(), "etag");
    let keys = header(first.headers(), "surrogate-key");
    assert!(
        keys.contains(&surrogate_key("a")) && keys.contains(&surrogate_key("b")),
        "{keys}"
    );
    // The outer block is a hit now (the inner one does not run): same tag.
    let again = s.get("/nested").await;
    assert_eq!(header(again.headers(), "etag"), etag);
    assert_eq!(header(again.headers(), "surrogate-key"), keys);
    assert_eq!(
        s.revalidate("/nested", &etag).await.status(),
        StatusCode::NOT_MODIFIED
    );
    // Only the inner token moves: not modified no more.
    s.cache.incr("b").expect("bump");
    let r = s.revalidate("/nested", &etag).await;
    assert_eq!(r.status(), 200);
    assert_ne!(header(r.headers(), "etag"), etag);
}
