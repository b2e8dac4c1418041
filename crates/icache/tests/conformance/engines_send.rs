//! Askama's and maud's cached blocks in an async handler: the page holding
//! them is `Send` (built, awaited across, rendered, in a spawned task), and
//! their tokens may be owned (`Vec<String>`, `[String; N]`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use askama::Template;
use icache::ICache;

fn send<T: Send>(_: &T) {}

#[derive(Template)]
#[template(
    source = "<ul>{% for m in movies %}<li>{{ m }}</li>{% endfor %}</ul>",
    ext = "html"
)]
struct List {
    movies: Vec<String>,
}

#[derive(Template)]
#[template(source = "<h1>{{ user }}</h1>{{ list }}", ext = "html")]
struct Page<'a> {
    user: String,
    list: icache::askama::Cached<'a, List>,
}

/// What an axum handler does: build the page, await something (the
/// session, a second query), render.
async fn askama_handler(cache: &ICache, user_id: u32, renders: Arc<AtomicUsize>) -> String {
    let user = user_id.to_string();
    let page = Page {
        user: user.clone(),
        // Owned tokens: nothing borrowed from a local that ends first.
        list: icache::askama::cached(cache, "list", vec!["movies".to_string(), user], move || {
            renders.fetch_add(1, Ordering::SeqCst);
            List {
                movies: vec!["Alien".into(), "Brazil <3".into()],
            }
        }),
    };
    send(&page);
    tokio::task::yield_now().await;
    page.render().unwrap_or_else(|e| format!("error: {e}"))
}

async fn maud_handler(cache: &ICache, user_id: u32, renders: Arc<AtomicUsize>) -> String {
    let tokens: [String; 2] = ["movies".into(), user_id.to_string()];
    let block = icache::maud::cached(cache, "list", tokens, move || {
        renders.fetch_add(1, Ordering::SeqCst);
        maud::html! { ul { li { "Alien" } li { "Brazil <3" } } }
    });
    send(&block);
    tokio::task::yield_now().await;
    maud::html! { h1 { (user_id) } (block) }.into_string()
}

#[test]
fn askama_and_maud_pages_are_send_with_owned_tokens() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cache = ICache::memory();
    let (askama_renders, maud_renders) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    rt.block_on(async {
        for _ in 0..3 {
            // tokio::spawn needs a `Send` future: the page lives across the
            // `.await` inside it.
            let (c, r) = (cache.clone(), askama_renders.clone());
            let html = tokio::spawn(async move { askama_handler(&c, 7, r).await })
                .await
                .expect("askama task");
            assert_eq!(
                html,
                "<h1>7</h1><ul><li>Alien</li><li>Brazil &#60;3</li></ul>"
            );
            let (c, r) = (cache.clone(), maud_renders.clone());
            let html = tokio::spawn(async move { maud_handler(&c, 7, r).await })
                .await
                .expect("maud task");
            assert_eq!(
                html,
                "<h1>7</h1><ul><li>Alien</li><li>Brazil &lt;3</li></ul>"
            );
        }
    });
    assert_eq!(
        askama_renders.load(Ordering::SeqCst),
        1,
        "hits after the first"
    );
    assert_eq!(
        maud_renders.load(Ordering::SeqCst),
        1,
        "hits after the first"
    );
    // Another user is another entry; a bump re-renders.
    rt.block_on(async {
        let r = askama_renders.clone();
        askama_handler(&cache, 8, r).await;
        cache.incr_async("movies").await.expect("incr");
        askama_handler(&cache, 7, askama_renders.clone()).await;
        maud_handler(&cache, 7, maud_renders.clone()).await;
    });
    assert_eq!(askama_renders.load(Ordering::SeqCst), 3);
    assert_eq!(maud_renders.load(Ordering::SeqCst), 2);
}

/// The same tokens borrowed, owned, as a slice of `String` or an array: one
/// entry.
#[test]
fn token_forms_are_one_block() {
    let cache = ICache::memory();
    let renders = AtomicUsize::new(0);
    let user = "7".to_string();
    let body = || {
        renders.fetch_add(1, Ordering::SeqCst);
        maud::html! { p { "x" } }
    };
    let borrowed = ["movies", user.as_str()];
    let owned_vec = vec!["movies".to_string(), user.clone()];
    let render = |tokens: icache::Tokens<'_>| {
        maud::html! { (icache::maud::cached(&cache, "forms", tokens, body)) }.into_string()
    };
    let outs = [
        render((&borrowed).into()),
        render(owned_vec.clone().into()),
        render((&owned_vec).into()),
        render(owned_vec.as_slice().into()),
        render(["movies".to_string(), user.clone()].into()),
    ];
    assert!(outs.iter().all(|o| o == "<p>x</p>"), "{outs:?}");
    assert_eq!(renders.load(Ordering::SeqCst), 1);
}
