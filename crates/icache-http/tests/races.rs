//! Pages that must not be tagged although every block "worked": a token
//! that moved before the response left (its purge may already have passed
//! the proxy), a block whose body failed behind a fallback, an inner
//! failure caught by the outer body. A proxy would keep any of them past a
//! bump, forever.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use icache::ICache;
use icache_http::PageLayer;
use tower::ServiceExt;

async fn get_page(app: &Router, path: &str) -> axum::http::Response<Body> {
    app.clone()
        .oneshot(Request::get(path).body(Body::empty()).expect("request"))
        .await
        .expect("infallible")
}

fn site(cache: &ICache) -> (Router, PageLayer) {
    let layer = PageLayer::new(cache.clone());
    let (a, b, c, d) = (cache.clone(), cache.clone(), cache.clone(), cache.clone());
    let app = Router::new()
        .route(
            "/ok",
            get(move || async move {
                a.fragment("ok", &["movies"], || Ok::<_, String>("<ul/>".into()))
                    .unwrap_or_default()
            }),
        )
        // The writer's commit, bump and purge land while this page renders,
        // after its block read the generations.
        .route(
            "/moved",
            get(move || async move {
                let html = b
                    .fragment("list", &["movies"], || {
                        Ok::<_, String>("<ul>old</ul>".into())
                    })
                    .unwrap_or_default();
                b.incr("movies").expect("bump");
                html
            }),
        )
        // A body that fails; the handler shows a fallback in its place.
        .route(
            "/failed",
            get(move || async move {
                let ok = c
                    .fragment("top", &["top"], || Ok::<_, String>("<ol/>".into()))
                    .unwrap_or_default();
                let list = c
                    .fragment("list", &["movies"], || Err::<String, _>("db down"))
                    .unwrap_or_else(|_| "<p>no list right now</p>".into());
                format!("{ok}{list}")
            }),
        )
        // The outer body catches its inner block's failure.
        .route(
            "/nested-failed",
            get(move || async move {
                d.fragment("outer", &["outer"], || {
                    let inner = d
                        .fragment("inner", &["inner"], || Err::<String, _>("db down"))
                        .unwrap_or_else(|_| "fallback".into());
                    Ok::<_, String>(format!("<o>{inner}</o>"))
                })
                .unwrap_or_default()
            }),
        )
        .layer(layer.clone());
    (app, layer)
}

#[tokio::test]
async fn a_page_whose_token_moved_before_it_left_is_not_tagged() {
    let cache = ICache::memory();
    let (app, layer) = site(&cache);
    assert!(get_page(&app, "/ok").await.headers().contains_key("etag"));
    let r = get_page(&app, "/moved").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("etag").is_none(), "{:?}", r.headers());
    assert!(r.headers().get("surrogate-key").is_none());
    assert_eq!(layer.stats().moved, 1);
}

#[tokio::test]
async fn a_fallback_for_a_failed_block_is_not_tagged() {
    let cache = ICache::memory();
    let (app, _) = site(&cache);
    let r = get_page(&app, "/failed").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("etag").is_none(), "{:?}", r.headers());
    let (_, events) =
        icache::observe(|| cache.fragment("list", &["movies"], || Err::<String, _>("db down")));
    assert_eq!(
        events.last().map(|e| e.outcome),
        Some(icache::Outcome::Failed)
    );
}

#[tokio::test]
async fn an_inner_failure_caught_by_the_outer_body_is_not_tagged() {
    let cache = ICache::memory();
    let (app, _) = site(&cache);
    let r = get_page(&app, "/nested-failed").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("etag").is_none(), "{:?}", r.headers());
}
