//! The seed's movies site on icache: axum + MiniJinja + SQLite.
//!
//! Run with: `cargo run --release -p icache-demo` and open <http://127.0.0.1:3000/>.
//!
//! A user's page lists their movies by personal rating inside the seed's own
//! block, `{% icache 'movies-personal-rating' 'movies' user.id page %}` (the
//! seed's, with the page of the list as one more token); the home
//! page has a top list cached by `'movies'`. Rating a movie commits to SQLite;
//! the `ratings` table's triggers (`icache::db`) bump `movies` and the user's
//! id from inside that transaction, and the in-process relay applies them
//! before the response (no bump in request code). The cache is in-process by default; `ICACHE_URL=redis://…` or
//! `memcached://…` switches backends with no other change.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use icache::ICache;
use icache_http::{PageLayer, Purger};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use minijinja::value::Serde;
use minijinja::{Environment, Value, context};
use serde::{Deserialize, Serialize};

pub mod db;
#[doc(hidden)]
pub mod testing;
use db::Db;

/// Where the site listens by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:3000";

/// Movies on one page of a user's list (the whole list of a user is some
/// 400 movies: about 190 KB of HTML on one page).
pub const PER_PAGE: i64 = 100;

/// Where base.html puts the cache panel: it is rendered after the page, from
/// what the page's blocks did (`icache::observe`), and put in here.
const PANEL_MARK: &str = "<!--icache-panel-->";

/// A rating just committed, shown once on the user's next page.
#[derive(Debug, Clone, Serialize)]
struct Rated {
    movie: i64,
    title: String,
    rating: i64,
    /// The tokens the database bumped for this rating.
    bumped: Vec<String>,
}

struct Inner {
    cache: ICache,
    env: Environment<'static>,
    db: Arc<Db>,
    prometheus: PrometheusHandle,
    /// User id -> the rating they just made (taken by their next page).
    rated: Mutex<HashMap<i64, Rated>>,
    /// Movies per page of a user's list.
    per_page: i64,
    /// ETags, surrogate keys and 304s for the pages.
    pages: PageLayer,
    /// Purges the proxy in front (`ICACHE_PURGE_URL`) after each bump.
    purger: Arc<OnceLock<Purger>>,
}

/// The shared state of the site.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The Prometheus recorder, installed once per process (before any cache is
/// opened, so icache's counters report to it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0])
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if another recorder is installed: then ours just
            // shows nothing, which /metrics makes visible.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

fn template_source(name: &str) -> Option<&'static str> {
    Some(match name {
        "base.html" => include_str!("templates/base.html"),
        "index.html" => include_str!("templates/index.html"),
        "user.html" => include_str!("templates/user.html"),
        "error.html" => include_str!("templates/error.html"),
        "panel.html" => include_str!("templates/panel.html"),
        PERSONAL_BLOCK => personal_block(include_str!("templates/user.html"))?.0,
        PERSONAL_BODY => personal_block(include_str!("templates/user.html"))?.1,
        _ => return None,
    })
}

/// user.html's personal-rating block alone, `{% icache … %}` tags included.
/// No route renders it: it is for [`AppState::render_personal_rating`].
const PERSONAL_BLOCK: &str = "user.html#personal-rating";
/// The same block's body without the `{% icache %}` tags: the block uncached.
const PERSONAL_BODY: &str = "user.html#personal-rating-body";

/// Splits user.html's `{% icache 'movies-personal-rating' … %}…{% endicache %}`
/// into (the whole block, its body). Sliced from the page's own source, so a
/// benchmark of the block always measures what the site serves.
fn personal_block(source: &str) -> Option<(&str, &str)> {
    const END: &str = "{% endicache %}";
    let start = source.find("{% icache 'movies-personal-rating'")?;
    let body_start = start + source[start..].find("%}")? + 2;
    let body_end = body_start + source[body_start..].find(END)?;
    Some((
        &source[start..body_end + END.len()],
        &source[body_start..body_end],
    ))
}

fn sql_error(e: rusqlite::Error) -> minijinja::Error {
    minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        format!("database: {e}"),
    )
}

/// Opens the database (creating and seeding it on first start) and builds the
/// template environment around `cache`.
pub fn open(
    data_dir: &Path,
    cache: ICache,
) -> Result<AppState, Box<dyn std::error::Error + Send + Sync>> {
    open_paged(data_dir, cache, PER_PAGE)
}

/// [`open`] with `per_page` movies per page of a user's list instead of
/// [`PER_PAGE`] (the benchmark's unpaged block: a page as large as the list).
pub fn open_paged(
    data_dir: &Path,
    cache: ICache,
    per_page: i64,
) -> Result<AppState, Box<dyn std::error::Error + Send + Sync>> {
    let per_page = per_page.max(1);
    let prometheus = prometheus();
    let db = Arc::new(Db::open(data_dir)?);
    let cache_for_pages = cache.clone();
    // The relay purges the proxy after each batch it bumped (set later by
    // `set_purger`): a purge that fails keeps the rows, so it is retried
    // with them (at least once, as the bumps), unless the proxy has refused
    // for over 10 s: then the purges wait in the purger and bumps go on.
    let purger: Arc<OnceLock<Purger>> = Arc::default();
    let hook = purger.clone();
    db.start_relay(cache.clone(), move |tokens: &[String]| match hook.get() {
        Some(p) => p.purge_for_relay(tokens).map_err(|e| e.to_string()),
        None => Ok(()),
    })?;
    let mut env = Environment::new();
    icache::minijinja::register(&mut env, cache.clone());
    // Templates go through icache's loader: the seed's {% icache %} syntax.
    env.set_loader(icache::minijinja::loader(|name: &str| {
        Ok(template_source(name))
    }));
    env.add_global("per_page", per_page);
    let d = db.clone();
    env.add_function(
        "personal_ratings",
        move |user: i64, page: i64| -> Result<Value, minijinja::Error> {
            Ok(Value::from(Serde(
                d.personal_ratings_page(user, page, per_page)
                    .map_err(sql_error)?,
            )))
        },
    );
    let d = db.clone();
    env.add_function("top_movies", move || -> Result<Value, minijinja::Error> {
        Ok(Value::from(Serde(d.top_movies(20).map_err(sql_error)?)))
    });
    Ok(AppState(Arc::new(Inner {
        cache,
        env,
        db,
        prometheus,
        rated: Mutex::new(HashMap::new()),
        per_page,
        pages: PageLayer::new(cache_for_pages),
        purger,
    })))
}

/// The site's routes, behind [`PageLayer`]: pages get an ETag and
/// surrogate keys, and a revalidation whose tokens did not move is answered
/// `304` before the handler runs.
pub fn app(state: AppState) -> Router {
    let pages = state.0.pages.clone();
    Router::new()
        .route("/", get(index))
        .route("/users/{id}", get(user_page))
        .route("/users/{id}/rate", post(rate))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(pages)
        .with_state(state)
}

/// Serves the site on `listener` until the process is stopped.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    axum::serve(listener, app(state)).await
}

/// A page that went wrong: rendered as a clear HTML page with its status.
#[derive(Debug)]
pub struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        PageError {
            status,
            message: message.into(),
        }
    }
}

#[derive(Serialize)]
struct StatsView {
    hits: u64,
    misses: u64,
    ratio: String,
    errors: u64,
    near_hits: u64,
    near_misses: u64,
    body_fetches: u64,
    tracked_hits: u64,
    near_bytes: String,
}

/// One block of this request, for the panel.
#[derive(Serialize)]
struct BlockView {
    /// `user.html line 12`, or the block's name.
    label: String,
    tokens: String,
    version: String,
    /// `hit`, `stored`, `not-stored`, `shared`, `uncached`, `off`: a CSS class
    /// and what tests look for.
    kind: &'static str,
    outcome: &'static str,
    invalidated: bool,
    ms: String,
    depth: usize,
}

impl BlockView {
    fn new(e: &icache::BlockEvent) -> Self {
        // MiniJinja blocks: ["minijinja", template, escape, "template:line:col:digest", name].
        let label = match e.identity.as_slice() {
            [kind, template, _, id, name, ..] if kind == "minijinja" => {
                let mut parts = id.rsplitn(4, ':');
                let (_digest, _col, line) = (parts.next(), parts.next(), parts.next());
                match (line, name.is_empty()) {
                    (_, false) => format!("{template}: {name}"),
                    (Some(line), true) => format!("{template} line {line}"),
                    (None, true) => template.clone(),
                }
            }
            other => other.join(" "),
        };
        let kind = match e.outcome {
            icache::Outcome::Hit => "hit",
            icache::Outcome::Stored => "stored",
            icache::Outcome::Shared => "shared",
            icache::Outcome::Uncached => "uncached",
            icache::Outcome::Off => "off",
            _ => "not-stored",
        };
        BlockView {
            label,
            tokens: e.tokens.join(", "),
            version: e.version.map_or_else(|| "—".to_owned(), |v| v.to_string()),
            kind,
            outcome: e.outcome.describe(),
            invalidated: e.invalidated,
            ms: e.render_time.map_or_else(
                || "—".to_owned(),
                |d| format!("{:.2} ms", d.as_secs_f64() * 1000.0),
            ),
            depth: e.depth,
        }
    }
}

impl AppState {
    /// Purges the proxy in front of the site after every bump (Varnish at
    /// `ICACHE_PURGE_URL`). Set once; `false` if one was already set.
    pub fn set_purger(&self, purger: Purger) -> bool {
        self.0.purger.set(purger).is_ok()
    }

    /// The page layer (its counters).
    pub fn pages(&self) -> &PageLayer {
        &self.0.pages
    }

    /// Bumps `tokens` after a commit, then purges their pages at the proxy.
    /// A purge that fails is logged, counted and sent again with the next
    /// one; the bump's own failure is the caller's to report.
    ///
    /// # Errors
    ///
    /// The bump's error.
    pub fn bump(&self, tokens: &[&str]) -> icache::Result<Vec<u64>> {
        let gens = self.0.cache.incr_many(tokens)?;
        if let Some(purger) = self.0.purger.get()
            && let Err(e) = purger.purge(tokens)
        {
            tracing::error!(error = %e, "bumped, but the proxy could not be purged yet");
        }
        Ok(gens)
    }

    /// The database (for tests and tools).
    pub fn db(&self) -> &Db {
        &self.0.db
    }

    /// The cache handle.
    pub fn cache(&self) -> &ICache {
        &self.0.cache
    }

    /// Renders user `user`'s personal-rating block alone, exactly as in their
    /// page: through the cache (`cached`: a hit once it is stored), or the
    /// block's body without the cache (SQLite query and MiniJinja every time).
    /// For `icache-bench`, which compares the two.
    ///
    /// The uncached form lacks the block's final newline (MiniJinja drops a
    /// template's trailing newline); the content is otherwise identical.
    ///
    /// # Errors
    ///
    /// The template's error (a database failure inside the block).
    pub fn render_personal_rating(
        &self,
        user: i64,
        cached: bool,
    ) -> Result<String, minijinja::Error> {
        let name = if cached {
            PERSONAL_BLOCK
        } else {
            PERSONAL_BODY
        };
        // The block reads only `user.id`, so the user row is not fetched: a
        // hit costs the cache lookup and nothing else.
        let ctx = context! { user => context! { id => user }, page => 1 };
        self.0.env.get_template(name)?.render(ctx)
    }

    fn common(&self) -> Value {
        context! { backend => self.0.cache.backend_name() }
    }

    /// The cache panel: what each block of this request did (known only
    /// once the page has rendered), and the counters since start.
    fn panel(&self, events: &[icache::BlockEvent]) -> Result<String, minijinja::Error> {
        let s = self.0.cache.stats();
        let blocks: Vec<BlockView> = events.iter().map(BlockView::new).collect();
        self.0.env.get_template("panel.html")?.render(context! {
            backend => self.0.cache.backend_name(),
            blocks => Serde(blocks),
            stats => Serde(StatsView {
                hits: s.hits,
                misses: s.misses,
                ratio: format!("{:.1}%", s.hit_ratio() * 100.0),
                errors: s.errors,
                near_hits: s.near_hits,
                near_misses: s.near_misses,
                body_fetches: s.body_fetches,
                tracked_hits: s.tracked_hits,
                near_bytes: format!("{:.1} KiB", s.near_bytes as f64 / 1024.0),
            }),
        })
    }

    fn render(&self, template: &str, ctx: Value) -> Result<String, PageError> {
        let ctx = context! { ..ctx, ..self.common() };
        let (page, events) = icache::observe(|| {
            self.0
                .env
                .get_template(template)
                .and_then(|t| t.render(ctx))
        });
        page.and_then(|page| Ok(page.replacen(PANEL_MARK, &self.panel(&events)?, 1)))
            .map_err(|e| {
                tracing::error!(error = %e, template, "render failed");
                PageError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The page could not be rendered.",
                )
            })
    }
}

/// Runs blocking work (SQLite, MiniJinja, sync cache calls) off the executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PageError> + Send + 'static,
) -> Result<T, PageError> {
    // The page's observation (the layer's) and enclosing blocks follow
    // the work onto the blocking thread.
    let scope = icache::Scope::current();
    tokio::task::spawn_blocking(move || scope.run(f))
        .await
        .unwrap_or_else(|e| {
            Err(PageError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("worker failed: {e}"),
            ))
        })
}

fn db_error(e: rusqlite::Error) -> PageError {
    tracing::error!(error = %e, "database error");
    PageError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "The database is not available right now.",
    )
}

async fn index(State(state): State<AppState>) -> Result<Html<String>, ErrorPage> {
    let html = blocking(move || {
        let users = state.0.db.users().map_err(db_error)?;
        state.render("index.html", context! { users => Serde(users) })
    })
    .await
    .map_err(|e| ErrorPage(e, None))?;
    Ok(Html(html))
}

fn parse_user(state: &AppState, id: &str) -> Result<db::User, PageError> {
    let not_found = || PageError::new(StatusCode::NOT_FOUND, format!("There is no user {id:?}."));
    let id: i64 = id.parse().map_err(|_| not_found())?;
    state.0.db.user(id).map_err(db_error)?.ok_or_else(not_found)
}

/// `?page=N` of a user's list.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    page: Option<String>,
}

async fn user_page(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<PageQuery>,
) -> Result<Response, ErrorPage> {
    let s = state.clone();
    let (html, flashed) = blocking(move || {
        let user = parse_user(&s, &id)?;
        let rated_count = s.0.db.rated_count(user.id).map_err(db_error)?;
        let per_page = s.0.per_page;
        let pages = ((rated_count + per_page - 1) / per_page).max(1);
        let page = match query.page.as_deref().map(str::trim) {
            None | Some("") => 1,
            Some(p) => match p.parse::<i64>() {
                Ok(n) if (1..=pages).contains(&n) => n,
                _ => {
                    return Err(PageError::new(
                        StatusCode::NOT_FOUND,
                        format!(
                            "There is no page {p:?} of {}'s list: pages go from 1 to {pages}.",
                            user.name
                        ),
                    ));
                }
            },
        };
        let rated =
            s.0.rated
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&user.id);
        let flashed = rated.is_some();
        s.render(
            "user.html",
            context! { user => Serde(user), rated => Serde(rated), page, pages, rated_count },
        )
        .map(|html| (html, flashed))
    })
    .await
    .map_err(|e| ErrorPage(e, Some(state.clone())))?;
    // "You rated …" is for this one response: no cache may keep it.
    if flashed {
        return Ok(([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response());
    }
    Ok(Html(html).into_response())
}

/// The rating form. Fields are strings so that a malformed post gets our own
/// clear message rather than a generic rejection.
#[derive(Debug, Deserialize)]
pub struct RateForm {
    movie_id: String,
    rating: String,
}

async fn rate(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    form: Result<Form<RateForm>, FormRejection>,
) -> Result<Redirect, ErrorPage> {
    let s = state.clone();
    let to = blocking(move || {
        let Form(form) = form.map_err(|e| {
            PageError::new(
                StatusCode::BAD_REQUEST,
                format!("The rating form was malformed ({e}). Send movie_id and rating (1 to 5)."),
            )
        })?;
        let user = parse_user(&s, &id)?;
        let movie: i64 = form.movie_id.trim().parse().map_err(|_| {
            PageError::new(StatusCode::BAD_REQUEST, format!("Movie id {:?} is not a number.", form.movie_id))
        })?;
        let rating: i64 = match form.rating.trim().parse() {
            Ok(r) if (1..=5).contains(&r) => r,
            _ => {
                return Err(PageError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("Rating {:?} is out of range: give a whole number from 1 to 5.", form.rating),
                ));
            }
        };
        let Some(title) = s.0.db.movie_title(movie).map_err(db_error)? else {
            return Err(PageError::new(StatusCode::NOT_FOUND, format!("There is no movie {movie}.")));
        };
        // The ratings table's triggers wrote the bumps in the rating's own
        // transaction; waiting for the relay to apply them means the next
        // page is never the old one (read your own writes).
        s.0.db.rate(user.id, movie, rating).map_err(db_error)?;
        let bumped = match s.0.db.applied_bumps() {
            Ok(bumped) => bumped,
            Err(e) => {
                tracing::error!(error = %e, "rating saved; its bumps wait in the outbox");
                return Err(PageError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Your rating was saved. The cache could not be told yet: the database keeps the bumps and they are applied as soon as it answers; until then pages are rendered without it.",
                ));
            }
        };
        // Shown once, on the user's next page.
        s.0.rated.lock().unwrap_or_else(PoisonError::into_inner).insert(
            user.id,
            Rated {
                movie,
                title,
                rating,
                bumped,
            },
        );
        Ok(format!("/users/{}", user.id))
    })
    .await
    .map_err(|e| ErrorPage(e, Some(state)))?;
    Ok(Redirect::to(&to))
}

async fn healthz(State(state): State<AppState>) -> Response {
    let backend = state.0.cache.backend_name();
    match state.0.cache.ping_async().await {
        Ok(()) => (
            StatusCode::OK,
            format!("ok: cache backend {backend} answers\n"),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("degraded: cache backend {backend}: {e} (pages render uncached)\n"),
        )
            .into_response(),
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    state.0.prometheus.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.0.prometheus.render(),
    )
        .into_response()
}

async fn not_found(State(state): State<AppState>) -> ErrorPage {
    ErrorPage(
        PageError::new(StatusCode::NOT_FOUND, "There is no such page."),
        Some(state),
    )
}

/// A [`PageError`] on its way out, with the state to render the page (or
/// plain text when there is none).
pub struct ErrorPage(PageError, Option<AppState>);

impl IntoResponse for ErrorPage {
    fn into_response(self) -> Response {
        let ErrorPage(err, state) = self;
        let body = state
            .and_then(|s| {
                s.render(
                    "error.html",
                    context! { status => err.status.to_string(), message => err.message.clone() },
                )
                .ok()
            })
            .unwrap_or_else(|| {
                format!(
                    "<!doctype html><title>{0}</title><h1>{0}</h1><p>{1}</p>",
                    err.status,
                    minijinja::HtmlEscape(&err.message)
                )
            });
        (err.status, Html(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_personal_rating_block_alone_is_the_pages_block() {
        let (block, body) =
            personal_block(include_str!("templates/user.html")).expect("user.html has the block");
        assert!(block.starts_with("{% icache 'movies-personal-rating' 'movies' user.id page %}"));
        assert!(block.ends_with("{% endicache %}") && block.contains(body));
        assert!(!body.contains("icache"), "{body}");

        let dir = std::env::temp_dir().join(format!("icache-demo-block-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = open(&dir, ICache::memory()).expect("open");
        let plain = state.render_personal_rating(7, false).expect("uncached");
        let miss = state.render_personal_rating(7, true).expect("miss");
        let hit = state.render_personal_rating(7, true).expect("hit");
        assert_eq!(state.cache().stats().hits, 1);
        assert_eq!(miss, hit);
        assert_eq!(hit.trim_end(), plain.trim_end());
        assert_eq!(
            crate::testing::movie_order(&hit, "personal").len(),
            state
                .db()
                .personal_ratings_page(7, 1, PER_PAGE)
                .expect("db")
                .len()
        );
        // The same list as the page shows.
        let page = state
            .render(
                "user.html",
                context! { user => Serde(state.db().user(7).expect("db").expect("user 7")), page => 1, pages => 4, rated_count => 400 },
            )
            .expect("page");
        assert!(page.contains(hit.trim_end()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
