//! The pattern to copy: axum + MiniJinja + icache.
//!
//! Run with: `cargo run -p axum-minijinja-example`, then open
//! <http://127.0.0.1:3001/> (`ICACHE_URL=redis://…` for Redis; the in-process
//! cache otherwise).
//!
//! Three things make it work:
//! 1. the state holds the cache and an `Arc<Environment<'static>>` built once;
//! 2. pages render through [`icache::minijinja::render_async`] (off the
//!    executor: MiniJinja and the database are blocking);
//! 3. the data is loaded **inside** the cached block, by a template function
//!    (`movies()`), so a hit skips the query. A writer commits, then bumps.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{Html, Redirect};
use axum::routing::get;
use icache::ICache;
use minijinja::{Environment, context};
use serde::Deserialize;

/// Stands in for your database: a list of titles, and a count of queries.
#[derive(Default)]
pub struct Db {
    movies: Mutex<Vec<String>>,
    /// How many times the list was read (a cache hit reads nothing).
    pub queries: AtomicUsize,
}

impl Db {
    fn movies(&self) -> Vec<String> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        self.movies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    fn add(&self, title: String) {
        self.movies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(title);
    }
}

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    /// The cache (cheap to clone).
    pub cache: ICache,
    env: Arc<Environment<'static>>,
    /// The database.
    pub db: Arc<Db>,
}

/// Builds the state: the template environment once, with icache registered
/// and the data function the cached block calls.
pub fn state(cache: ICache, db: Arc<Db>) -> AppState {
    let mut env = Environment::new();
    icache::minijinja::register(&mut env, cache.clone());
    // The seed's `{% icache %}` syntax: templates go through icache's loader.
    env.set_loader(icache::minijinja::loader(|name: &str| {
        Ok((name == "movies.html").then(|| include_str!("templates/movies.html").to_owned()))
    }));
    let d = db.clone();
    env.add_function("movies", move || d.movies());
    AppState {
        cache,
        env: Arc::new(env),
        db,
    }
}

/// The routes.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(list))
        .route("/movies", axum::routing::post(add))
        .with_state(state)
}

async fn list(State(s): State<AppState>) -> Result<Html<String>, (StatusCode, String)> {
    icache::minijinja::render_async(s.env.clone(), "movies.html", context! {})
        .await
        .map(Html)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The form of a new movie.
#[derive(Deserialize)]
pub struct NewMovie {
    title: String,
}

async fn add(State(s): State<AppState>, Form(m): Form<NewMovie>) -> Redirect {
    s.db.add(m.title); // commit first…
    // …then bump. A failure is remembered and replayed by icache; pages
    // render uncached until it is.
    let _ = s.cache.incr_async("movies").await;
    Redirect::to("/")
}
