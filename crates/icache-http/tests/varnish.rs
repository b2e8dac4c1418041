//! A real Varnish (the repo's deploy/varnish/icache.vcl, vmod xkey) in front
//! of an axum app behind PageLayer, purged by Purger.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::get;
use icache::ICache;
use icache_http::{PageLayer, Purger};
use icache_test_support::VarnishServer;

#[derive(Clone)]
struct App {
    cache: ICache,
    /// user -> what their page shows (the "database").
    data: Arc<Mutex<HashMap<String, String>>>,
    calls: Arc<AtomicUsize>,
}

impl App {
    fn block(&self, user: &str) -> String {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let data = self.data.clone();
        let user = user.to_owned();
        self.cache
            .fragment("list", &["movies", &user], || {
                let shown = data
                    .lock()
                    .expect("data")
                    .get(&user)
                    .cloned()
                    .unwrap_or_default();
                Ok::<_, String>(format!("<p>user {user}: {shown}</p>"))
            })
            .unwrap_or_default()
    }
}

fn session(headers: &HeaderMap) -> String {
    headers
        .get("cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|c| {
            c.split(';')
                .find_map(|kv| kv.trim().strip_prefix("sessionid="))
        })
        .unwrap_or("anonymous")
        .to_owned()
}

struct Stack {
    app: App,
    varnish: VarnishServer,
    purger: Purger,
    http: ureq::Agent,
    _rt: tokio::runtime::Runtime,
}

fn stack() -> Option<Stack> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cache = ICache::memory();
    let app = App {
        cache: cache.clone(),
        data: Arc::default(),
        calls: Arc::default(),
    };
    let router =
        Router::new()
            .route(
                "/users/{id}",
                get(|State(a): State<App>, Path(id): Path<String>| async move { a.block(&id) }),
            )
            // Personal by session, and says so.
            .route(
                "/me",
                get(|State(a): State<App>, req: Request| async move {
                    let who = session(req.headers());
                    ([("vary", "cookie")], a.block(&who)).into_response()
                }),
            )
            // Personal by session but forgets Vary: the VCL must not share it.
            .route(
                "/me-novary",
                get(|State(a): State<App>, req: Request| async move {
                    a.block(&session(req.headers()))
                }),
            )
            .route(
                "/login",
                get(|State(a): State<App>| async move {
                    ([("set-cookie", "sessionid=1")], a.block("login")).into_response()
                }),
            )
            .route(
                "/plain",
                get(|State(a): State<App>| async move {
                    a.calls.fetch_add(1, Ordering::SeqCst);
                    "no blocks"
                }),
            )
            .layer(PageLayer::new(cache))
            .with_state(app.clone());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    rt.spawn(async move { axum::serve(listener, router).await });
    let varnish = VarnishServer::start(port)?;
    let purger = Purger::varnish(&varnish.url()).expect("purge url");
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .allow_non_standard_methods(true)
        .build()
        .into();
    Some(Stack {
        app,
        varnish,
        purger,
        http,
        _rt: rt,
    })
}

struct Got {
    status: u16,
    cache: String,
    etag: String,
    body: String,
    headers: http::HeaderMap,
}

impl Stack {
    fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Got {
        let mut req = self.http.get(format!("{}{path}", self.varnish.url()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut resp = req
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.varnish.log()));
        let h = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        Got {
            status: resp.status().as_u16(),
            cache: h("x-cache"),
            etag: h("etag"),
            headers: resp.headers().clone(),
            body: resp.body_mut().read_to_string().unwrap_or_default(),
        }
    }

    fn get(&self, path: &str) -> Got {
        self.get_with(path, &[])
    }

    fn set(&self, user: &str, shown: &str) {
        self.app
            .data
            .lock()
            .expect("data")
            .insert(user.to_owned(), shown.to_owned());
    }

    fn calls(&self) -> usize {
        self.app.calls.load(Ordering::SeqCst)
    }
}

#[test]
fn tagged_pages_are_served_by_varnish_until_their_tokens_are_purged() {
    let Some(s) = stack() else { return };
    s.set("7", "4 stars");
    let first = s.get("/users/7");
    assert_eq!((first.status, first.cache.as_str()), (200, "MISS"));
    assert!(first.body.contains("user 7: 4 stars"), "{}", first.body);
    let second = s.get("/users/7");
    assert_eq!(second.cache, "HIT", "{}", s.varnish.log());
    assert_eq!(second.body, first.body);
    assert_eq!(s.calls(), 1);
    // The keys stay between the app and Varnish.
    assert!(second.headers.get("surrogate-key").is_none() && second.headers.get("xkey").is_none());

    // An unrelated bump leaves the page cached.
    s.purger
        .incr_and_purge(&s.app.cache, &["9"])
        .expect("bump 9");
    assert_eq!(s.get("/users/7").cache, "HIT");

    // The data changes, commit, then bump + purge: the next GET is fresh.
    s.set("7", "2 stars");
    s.purger
        .incr_and_purge(&s.app.cache, &["7"])
        .expect("bump 7");
    let fresh = s.get("/users/7");
    assert_eq!(fresh.cache, "MISS");
    assert!(fresh.body.contains("user 7: 2 stars"), "{}", fresh.body);
    assert_ne!(fresh.etag, first.etag);
    assert_eq!(s.get("/users/7").cache, "HIT");
    assert_eq!(s.purger.stats().ok, 2);
}

#[test]
fn browsers_revalidate_at_varnish() {
    let Some(s) = stack() else { return };
    let first = s.get("/users/7");
    assert!(first.etag.starts_with("W/\""), "{:?}", first.headers);
    assert_eq!(
        first
            .headers
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-cache")
    );
    let r = s.get_with("/users/7", &[("if-none-match", &first.etag)]);
    assert_eq!(r.status, 304);
    assert_eq!(r.etag, first.etag);
}

#[test]
fn one_users_page_is_never_served_to_another() {
    let Some(s) = stack() else { return };
    s.set("7", "seven's");
    s.set("8", "eight's");
    for _ in 0..2 {
        assert!(s.get("/users/7").body.contains("user 7: seven's"));
        assert!(s.get("/users/8").body.contains("user 8: eight's"));
    }
    // By session cookie, on a page that varies on it: cached per session.
    for _ in 0..2 {
        let seven = s.get_with("/me", &[("cookie", "sessionid=7")]);
        let eight = s.get_with("/me", &[("cookie", "sessionid=8")]);
        assert!(seven.body.contains("user 7: seven's"), "{}", seven.body);
        assert!(eight.body.contains("user 8: eight's"), "{}", eight.body);
    }
    assert_eq!(s.get_with("/me", &[("cookie", "sessionid=7")]).cache, "HIT");
    // A page that forgot `Vary: Cookie`: with a session it is never taken
    // from (or stored in) the cache.
    let anon = s.get("/me-novary");
    assert!(anon.body.contains("user anonymous"));
    assert_eq!(s.get("/me-novary").cache, "HIT");
    for who in ["7", "8", "7"] {
        let r = s.get_with(
            "/me-novary",
            &[("cookie", &format!("theme=dark; sessionid={who}"))],
        );
        assert!(
            r.body.contains(&format!("user {who}:")),
            "{who}: {}",
            r.body
        );
        assert_eq!(r.cache, "MISS");
    }
}

#[test]
fn untagged_and_cookie_setting_pages_are_not_kept() {
    let Some(s) = stack() else { return };
    for _ in 0..2 {
        assert_eq!(s.get("/plain").cache, "MISS");
        assert_eq!(s.get("/login").cache, "MISS");
    }
    assert_eq!(s.calls(), 4);
}

#[test]
fn purge_needs_keys() {
    let Some(s) = stack() else { return };
    let resp = s
        .http
        .run(
            http::Request::builder()
                .method("PURGE")
                .uri(format!("{}/", s.varnish.url()))
                .body(())
                .expect("request"),
        )
        .expect("PURGE");
    assert_eq!(resp.status(), 400);
}
