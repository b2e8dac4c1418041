//! The ETag changes if and only if a token the page read moved or a block
//! identity changed: random pages, random bumps, random renames.

use std::sync::{Arc, Mutex};

use icache::ICache;
use icache_http::PageLayer;
use proptest::prelude::*;
use tower::{Layer, Service, ServiceExt};

/// A page: its blocks, each a name and the tokens it reads.
type Page = Vec<(u8, Vec<u8>)>;

fn page() -> impl Strategy<Value = Page> {
    prop::collection::vec((0u8..3, prop::collection::vec(0u8..5, 1..4)), 1..5)
}

fn etag_of(rt: &tokio::runtime::Runtime, cache: &ICache, layer: &PageLayer, page: &Page) -> String {
    let spec = Arc::new(Mutex::new(page.clone()));
    let c = cache.clone();
    let handler = tower::service_fn(move |_req: http::Request<()>| {
        let blocks = spec.lock().expect("spec").clone();
        let mut html = String::new();
        for (name, tokens) in blocks {
            let tokens: Vec<String> = tokens.iter().map(|t| format!("t{t}")).collect();
            let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let out = c.fragment(&format!("b{name}"), &tokens, || {
                Ok::<_, String>(format!("<p>{name}</p>"))
            });
            html.push_str(&out.unwrap_or_default());
        }
        async move { Ok::<_, String>(http::Response::new(html)) }
    });
    let mut svc = layer.layer(handler);
    rt.block_on(async {
        let req = http::Request::get("/page").body(()).expect("request");
        let resp = svc
            .ready()
            .await
            .expect("ready")
            .call(req)
            .await
            .expect("page");
        resp.headers()
            .get("etag")
            .map(|v| v.to_str().expect("ascii").to_owned())
            .expect("every page reads tokens from known generations: it has an ETag")
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn etag_changes_iff_a_read_token_moved_or_a_block_changed(
        first in page(),
        bumps in prop::collection::vec(0u8..7, 0..3),
        rename in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let cache = ICache::memory();
        let layer = PageLayer::new(cache.clone());
        let before = etag_of(&rt, &cache, &layer, &first);
        // Rendering again (now all hits) gives the same tag.
        prop_assert_eq!(&etag_of(&rt, &cache, &layer, &first), &before);

        let mut second = first.clone();
        if let Some(i) = rename {
            // A name no block has: the page's set of identities changes.
            let at = i.index(second.len());
            second[at].0 = 9;
        }
        let bumped: Vec<String> = bumps.iter().map(|t| format!("t{t}")).collect();
        let refs: Vec<&str> = bumped.iter().map(String::as_str).collect();
        cache.incr_many(&refs).expect("bump");
        let after = etag_of(&rt, &cache, &layer, &second);

        let read_moved = first
            .iter()
            .flat_map(|(_, t)| t)
            .chain(second.iter().flat_map(|(_, t)| t))
            .any(|t| bumps.contains(t));
        let should_change = read_moved || rename.is_some();
        prop_assert_eq!(after != before, should_change, "bumps {:?} rename {:?}", bumps, rename);
    }
}
