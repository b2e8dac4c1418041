//! [`PageLayer`] and its service: ETag, surrogate keys and Cache-Control on
//! the way out, 304 from the manifest on the way in.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::header::{CACHE_CONTROL, ETAG, IF_NONE_MATCH, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use icache::{BlockEvent, ICache, NotStored, Outcome};
use tower_layer::Layer;
use tower_service::Service;

use crate::key;
use crate::manifest::{Manifest, Manifests};

/// The header a page's surrogate keys go in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SurrogateHeader {
    /// `Surrogate-Key`, space separated (Fastly; Varnish with the repo's VCL).
    #[default]
    SurrogateKey,
    /// `xkey`, space separated (Varnish's vmod xkey read directly).
    Xkey,
    /// `Cache-Tag`, comma separated (Cloudflare).
    CacheTag,
}

impl SurrogateHeader {
    /// The header's name.
    pub fn name(self) -> HeaderName {
        HeaderName::from_static(match self {
            SurrogateHeader::SurrogateKey => "surrogate-key",
            SurrogateHeader::Xkey => "xkey",
            SurrogateHeader::CacheTag => "cache-tag",
        })
    }

    fn separator(self) -> &'static str {
        match self {
            SurrogateHeader::CacheTag => ",",
            _ => " ",
        }
    }
}

/// Default header budget for the surrogate keys: 8 KB (nginx's default
/// proxy buffer is 4 or 8 KB; Cloudflare allows 16 KB of `Cache-Tag`).
pub const DEFAULT_HEADER_BUDGET: usize = 8 * 1024;

/// Default bytes of manifests kept in process.
pub const DEFAULT_MANIFEST_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Clone, Debug)]
struct Options {
    header: SurrogateHeader,
    budget: usize,
    cache_control: HeaderValue,
    manifest_bytes: u64,
}

/// Counters since the layer was built (also reported through `metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PageStats {
    /// `304 Not Modified` answered (from the manifest, or after the handler
    /// when its page had the tag the client sent).
    pub not_modified: u64,
    /// Conditional requests whose manifest was there and current.
    pub manifest_hits: u64,
    /// Conditional requests with no manifest, or a stale one (a token moved).
    pub manifest_misses: u64,
    /// Pages whose surrogate keys did not fit the header budget (marked
    /// `private` so that no shared cache keeps them).
    pub over_budget: u64,
    /// Pages given an ETag.
    pub tagged: u64,
    /// Pages left untagged because a token they read moved before the
    /// response left (their bump's purge may have passed them).
    pub moved: u64,
}

#[derive(Default)]
struct Counters {
    not_modified: AtomicU64,
    manifest_hits: AtomicU64,
    manifest_misses: AtomicU64,
    over_budget: AtomicU64,
    tagged: AtomicU64,
    moved: AtomicU64,
    warned_budget: AtomicBool,
}

struct Shared {
    cache: ICache,
    manifests: OnceLock<Manifests>,
    counters: Counters,
}

/// A tower [`Layer`] giving cached pages an ETag, surrogate keys and
/// `Cache-Control`, and answering `If-None-Match` with `304 Not Modified`
/// before the handler runs when none of the tokens the page read moved.
///
/// For a `GET` or `HEAD` answered `200` whose render read icache blocks,
/// all of them from known generations:
///
/// * `ETag: W/"…"`, a digest of the page key (path, query, and the request
///   headers the response `Vary`s on), every token read with its generation,
///   and the blocks' identities;
/// * the surrogate-key header ([`surrogate_header`](Self::surrogate_header))
///   with each token's [`surrogate_key`](crate::surrogate_key), within
///   [`header_budget`](Self::header_budget) (over it, the page is marked
///   `Cache-Control: private, no-cache`: fewer keys would let a proxy keep it
///   past a bump);
/// * `Cache-Control` ([`cache_control`](Self::cache_control), default
///   `no-cache`) unless the handler set one.
///
/// Responses with `Set-Cookie`, another status, their own `ETag`, `Vary: *`
/// or `Cache-Control: private`/`no-store` are left as they are and get no
/// manifest; so are pages where a block rendered uncached or that read no
/// token.
///
/// # Example
///
/// ```
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cache = icache::ICache::memory();
/// let c = cache.clone();
/// let handler = tower::service_fn(move |_req: http::Request<()>| {
///     let html = c.fragment("list", &["movies"], || Ok::<_, String>("<ul/>".into()));
///     async move { Ok::<_, String>(http::Response::new(html.unwrap_or_default())) }
/// });
/// let layer = icache_http::PageLayer::new(cache.clone());
/// let mut svc = ServiceBuilder::new().layer(layer.clone()).service(handler);
///
/// let page = svc.ready().await?.call(http::Request::get("/").body(())?).await?;
/// let etag = page.headers()["etag"].clone();
/// let again = http::Request::get("/").header("if-none-match", etag).body(())?;
/// let not_modified = svc.ready().await?.call(again).await?;
/// assert_eq!(not_modified.status(), 304);
/// assert_eq!(layer.stats().not_modified, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PageLayer {
    opts: Options,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PageLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageLayer")
            .field("options", &self.opts)
            .field("stats", &self.stats())
            .finish()
    }
}

impl PageLayer {
    /// A layer over `cache` (the handle the pages' blocks use).
    pub fn new(cache: ICache) -> PageLayer {
        // On /metrics from the start, not from the first event.
        for name in [
            "icache_http_not_modified_total",
            "icache_http_manifest_hits_total",
            "icache_http_manifest_misses_total",
            "icache_http_over_budget_total",
            "icache_http_moved_total",
        ] {
            metrics::counter!(name).increment(0);
        }
        PageLayer {
            opts: Options {
                header: SurrogateHeader::default(),
                budget: DEFAULT_HEADER_BUDGET,
                cache_control: HeaderValue::from_static("no-cache"),
                manifest_bytes: DEFAULT_MANIFEST_BYTES,
            },
            shared: Arc::new(Shared {
                cache,
                manifests: OnceLock::new(),
                counters: Counters::default(),
            }),
        }
    }

    /// The header the surrogate keys go in (default `Surrogate-Key`).
    pub fn surrogate_header(mut self, header: SurrogateHeader) -> PageLayer {
        self.opts.header = header;
        self
    }

    /// The most bytes the surrogate-key header's value may take (default
    /// [`DEFAULT_HEADER_BUDGET`]).
    pub fn header_budget(mut self, bytes: usize) -> PageLayer {
        self.opts.budget = bytes;
        self
    }

    /// The `Cache-Control` given to tagged pages whose handler set none
    /// (default `no-cache`: caches may store, and must revalidate).
    pub fn cache_control(mut self, value: HeaderValue) -> PageLayer {
        self.opts.cache_control = value;
        self
    }

    /// Bytes of manifests kept in process (default
    /// [`DEFAULT_MANIFEST_BYTES`]); the least used leave first. Takes effect
    /// if set before the layer serves its first page.
    pub fn manifest_bytes(mut self, bytes: u64) -> PageLayer {
        self.opts.manifest_bytes = bytes;
        self
    }

    /// The counters since the layer was built.
    pub fn stats(&self) -> PageStats {
        let c = &self.shared.counters;
        PageStats {
            not_modified: c.not_modified.load(Ordering::Relaxed),
            manifest_hits: c.manifest_hits.load(Ordering::Relaxed),
            manifest_misses: c.manifest_misses.load(Ordering::Relaxed),
            over_budget: c.over_budget.load(Ordering::Relaxed),
            tagged: c.tagged.load(Ordering::Relaxed),
            moved: c.moved.load(Ordering::Relaxed),
        }
    }

    fn manifests(&self) -> &Manifests {
        self.shared
            .manifests
            .get_or_init(|| Manifests::new(self.opts.manifest_bytes))
    }

    fn count(&self, which: fn(&Counters) -> &AtomicU64, name: &'static str) {
        which(&self.shared.counters).fetch_add(1, Ordering::Relaxed);
        metrics::counter!(name).increment(1);
    }
}

impl<S> Layer<S> for PageLayer {
    type Service = PageService<S>;

    fn layer(&self, inner: S) -> PageService<S> {
        PageService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`PageLayer`] wraps around a handler.
#[derive(Clone, Debug)]
pub struct PageService<S> {
    inner: S,
    layer: PageLayer,
}

/// The future of [`PageService`].
pub type ResponseFuture<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for PageService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The clone is not ready: keep the ready one for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Box::pin(inner.call(req));
        }
        let layer = self.layer.clone();
        let uri = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
        let headers = req.headers().clone();
        Box::pin(async move {
            if headers.contains_key(IF_NONE_MATCH)
                && let Some(m) = layer.manifest_for(&uri, &headers)
            {
                let tokens: Vec<&str> = m.reads.iter().map(|(t, _)| t.as_str()).collect();
                let gens = layer.shared.cache.generations_async(&tokens).await;
                if let Some(kept) = layer.judge(&m, gens, &headers) {
                    return Ok(not_modified(kept));
                }
            }
            // Blocks rendered in `call` itself (a `service_fn` may do its
            // work there), in every poll of its future, and in work it moves
            // to blocking threads with `icache::Scope`.
            let (fut, mut events) = icache::observe(move || inner.call(req));
            let (resp, polled) = icache::observe_async(fut).await;
            events.extend(polled);
            let mut resp = resp?;
            let status = resp.status();
            let Some(page) = layer.taggable(status, resp.headers(), &events) else {
                return Ok(resp);
            };
            let now = layer
                .shared
                .cache
                .generations_async(&read_tokens(&page.reads))
                .await;
            match layer.tag_read(&uri, &headers, resp.headers_mut(), &events, page, now) {
                Tagging::NotModified(kept) => Ok(not_modified(kept)),
                _ => Ok(resp),
            }
        })
    }
}

/// Is `value` a `Cache-Control` that keeps the page out of shared caches?
fn private_or_no_store(headers: &HeaderMap) -> bool {
    headers.get_all(CACHE_CONTROL).iter().any(|v| {
        v.to_str().map_or(true, |s| {
            s.split(',').any(|d| {
                let d = d.trim().split('=').next().unwrap_or("").trim();
                d.eq_ignore_ascii_case("private") || d.eq_ignore_ascii_case("no-store")
            })
        })
    })
}

/// The header names of a response's `Vary` (lower case, sorted, unique);
/// `None` for `Vary: *` or a malformed one.
fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for v in headers.get_all(VARY) {
        for n in v.to_str().ok()?.split(',') {
            let n = n.trim();
            if n.is_empty() {
                continue;
            }
            if n == "*" {
                return None;
            }
            names.push(HeaderName::from_bytes(n.as_bytes()).ok()?);
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Some(names)
}

/// The page key: path and query, and the request's values of the headers
/// the response varies on (method aside: HEAD is GET without the body).
pub(crate) fn page_key(uri: &str, vary: &[HeaderName], request: &HeaderMap) -> [u8; 32] {
    let mut parts: Vec<&[u8]> = vec![uri.as_bytes()];
    let joined: Vec<Vec<u8>> = vary
        .iter()
        .map(|n| {
            let mut all = Vec::new();
            for v in request.get_all(n) {
                all.extend_from_slice(v.as_bytes());
                all.push(0);
            }
            all
        })
        .collect();
    for (n, v) in vary.iter().zip(&joined) {
        parts.push(n.as_str().as_bytes());
        parts.push(v);
    }
    key::digest(&parts)
}

/// Every token the page's blocks read with its generation (as each block
/// read it before rendering: `BlockEvent::reads`, never re-read after the
/// render: a tag for new generations over old content would validate that
/// content forever), or `None` when any block was not served from known
/// generations (rendered uncached, caching off, an inner block unknown, or
/// no token at all).
fn page_reads(events: &[BlockEvent]) -> Option<Vec<(String, u64)>> {
    let mut all = Vec::new();
    for e in events {
        // Not `NotStored(Moved)` (a token moved while the block rendered:
        // its purge may already have gone out, and a proxy would keep this
        // page past it) nor `NestedUnknown` (a caught inner failure: the
        // output depends on tokens nobody recorded), nor `Failed`.
        if !matches!(
            e.outcome,
            Outcome::Hit
                | Outcome::Stored
                | Outcome::Shared
                | Outcome::NotStored(
                    NotStored::TooLarge | NotStored::ServerChanged | NotStored::BackendError
                )
        ) || e.reads.is_empty()
        {
            return None;
        }
        all.extend(e.reads.iter().cloned());
    }
    // The same token read at two generations (a bump between two blocks)
    // stays twice: such a page is never current, so never a 304.
    all.sort_unstable();
    all.dedup();
    Some(all)
}

/// A page a cache may keep by its data: the response's `Vary` names and
/// what its blocks read.
struct Taggable {
    vary: Vec<HeaderName>,
    reads: Vec<(String, u64)>,
}

/// The tokens of a page's reads, in their order.
fn read_tokens(reads: &[(String, u64)]) -> Vec<&str> {
    reads.iter().map(|(t, _)| t.as_str()).collect()
}

/// What [`PageLayer::tag`] did to a response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Tagging {
    /// Left as it was: not a page a cache may keep by its data (see
    /// [`PageLayer`]).
    Untouched,
    /// Given its `ETag`, surrogate keys and `Cache-Control`; its manifest is
    /// kept for the next conditional request.
    Tagged,
    /// Tagged, and the request's `If-None-Match` already holds the new tag:
    /// answer `304 Not Modified` with these headers instead of the body.
    NotModified(HeaderMap),
}

/// For servers that are not tower services (the Django middleware is
/// built on these): the same checks, tags and manifests as the layer, one
/// call on the way in and one on the way out.
impl PageLayer {
    /// The headers of a `304 Not Modified` for a `GET` or `HEAD` of `uri`
    /// (path and query) with these request headers, when its manifest is
    /// current (one read of the generations; none with `near=tracking`) and
    /// the request's `If-None-Match` holds the page's tag; `None`: run the
    /// handler. Blocking: call it off an async executor (the layer itself
    /// reads asynchronously).
    ///
    /// # Example
    ///
    /// ```
    /// use http::{HeaderMap, StatusCode};
    /// let cache = icache::ICache::memory();
    /// let pages = icache_http::PageLayer::new(cache.clone());
    /// let request = HeaderMap::new();
    /// let (html, events) = icache::observe(|| {
    ///     cache.fragment("list", &["movies"], || Ok::<_, String>("<ul/>".into()))
    /// });
    /// let mut response = HeaderMap::new();
    /// let tagged = pages.tag("/", &request, StatusCode::OK, &mut response, &events);
    /// assert_eq!(tagged, icache_http::Tagging::Tagged);
    ///
    /// let mut again = HeaderMap::new();
    /// again.insert("if-none-match", response["etag"].clone());
    /// let answer = pages.not_modified("/", &again).expect("a 304");
    /// assert_eq!(answer["etag"], response["etag"]);
    /// cache.incr("movies").unwrap();
    /// assert!(pages.not_modified("/", &again).is_none());
    /// # drop(html);
    /// ```
    pub fn not_modified(&self, uri: &str, request: &HeaderMap) -> Option<HeaderMap> {
        if !request.contains_key(IF_NONE_MATCH) {
            return None;
        }
        let m = self.manifest_for(uri, request)?;
        let tokens: Vec<&str> = m.reads.iter().map(|(t, _)| t.as_str()).collect();
        let gens = self.shared.cache.generations(&tokens);
        self.judge(&m, gens, request)
    }

    /// The manifest of this page, if one is kept (a miss is counted).
    fn manifest_for(&self, uri: &str, request: &HeaderMap) -> Option<Arc<Manifest>> {
        let m = self.manifests().get(uri, request);
        if m.is_none() {
            self.count(|c| &c.manifest_misses, "icache_http_manifest_misses_total");
        }
        m
    }

    /// The headers of a 304 if the manifest's tokens are still at `gens`
    /// and the client holds the page's tag.
    fn judge(
        &self,
        m: &Manifest,
        gens: icache::Result<Vec<u64>>,
        request: &HeaderMap,
    ) -> Option<HeaderMap> {
        match gens {
            Ok(gens) if gens.iter().eq(m.reads.iter().map(|(_, g)| g)) => {
                self.count(|c| &c.manifest_hits, "icache_http_manifest_hits_total");
            }
            Ok(_) => {
                // Left for the next render of the page to replace.
                self.count(|c| &c.manifest_misses, "icache_http_manifest_misses_total");
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "icache-http: manifest not checked, the handler runs");
                self.count(|c| &c.manifest_misses, "icache_http_manifest_misses_total");
                return None;
            }
        }
        let inm = request.get(IF_NONE_MATCH)?;
        if !key::if_none_match(inm.as_bytes(), &m.etag) {
            return None;
        }
        self.count(|c| &c.not_modified, "icache_http_not_modified_total");
        Some(m.headers.clone())
    }

    /// Tags the response of a `GET` or `HEAD` of `uri` (path and query),
    /// given the request's headers, the response's status and headers, and
    /// the blocks its render met ([`icache::observe`]): adds `ETag`, the
    /// surrogate keys and `Cache-Control` when it is a page a cache may
    /// keep by its data (see [`PageLayer`]), and keeps its manifest. The
    /// caller makes sure the method is `GET` or `HEAD`.
    ///
    /// Blocking: it reads the generations of the page's tokens once more
    /// (none with `near=tracking`), and a page one of whose tokens moved
    /// since its blocks read it is left untagged: its bump's purge may
    /// already have reached the proxy, which would then keep this older
    /// page until the next one.
    pub fn tag(
        &self,
        uri: &str,
        request: &HeaderMap,
        status: StatusCode,
        response: &mut HeaderMap,
        events: &[BlockEvent],
    ) -> Tagging {
        let Some(page) = self.taggable(status, response, events) else {
            return Tagging::Untouched;
        };
        let now = self.shared.cache.generations(&read_tokens(&page.reads));
        self.tag_read(uri, request, response, events, page, now)
    }

    /// The page's reads, if it is a page a cache may keep by its data.
    fn taggable(
        &self,
        status: StatusCode,
        h: &HeaderMap,
        events: &[BlockEvent],
    ) -> Option<Taggable> {
        if status != StatusCode::OK
            || events.is_empty()
            || h.contains_key(ETAG)
            || h.contains_key(SET_COOKIE)
            || private_or_no_store(h)
        {
            return None;
        }
        let vary = vary_names(h)?;
        let reads = page_reads(events)?;
        // Every block also reads the flush token (`ICache::flush`): a page
        // whose blocks read nothing else read no data.
        if reads.iter().all(|(t, _)| t == ICache::FLUSH_TOKEN) {
            return None;
        }
        Some(Taggable { vary, reads })
    }

    /// Tags a taggable page given the generations of its tokens read after
    /// the render (`now`, in the order of `reads`).
    fn tag_read(
        &self,
        uri: &str,
        request: &HeaderMap,
        response: &mut HeaderMap,
        events: &[BlockEvent],
        Taggable { vary, reads }: Taggable,
        now: icache::Result<Vec<u64>>,
    ) -> Tagging {
        match now {
            Ok(now) if now.iter().eq(reads.iter().map(|(_, g)| g)) => {}
            // Moved meanwhile (or unknown): served as rendered, untagged.
            _ => {
                self.count(|c| &c.moved, "icache_http_moved_total");
                return Tagging::Untouched;
            }
        }
        // The outermost blocks only: an inner block's output is part of its
        // outer block's (whose reads include the inner tokens), and it is not
        // even seen when the outer block is a hit, so counting it would give
        // the same page two tags.
        let identities: Vec<Vec<String>> = events
            .iter()
            .filter(|e| e.depth == 0)
            .map(|e| e.identity.clone())
            .collect();
        let page = page_key(uri, &vary, request);
        let etag = key::etag(&page, &reads, &identities);
        let Ok(etag_value) = HeaderValue::from_str(&etag) else {
            return Tagging::Untouched;
        };

        // The flush token's key too: every tagged page has it, so that after
        // `ICache::flush` one purge of it empties the proxy of icache's
        // pages.
        let mut tokens: Vec<&str> = reads.iter().map(|(t, _)| t.as_str()).collect();
        tokens.sort_unstable();
        tokens.dedup();
        let keys = tokens
            .iter()
            .map(|t| key::surrogate_key(t))
            .collect::<Vec<_>>()
            .join(self.opts.header.separator());
        let headers = response;
        if keys.len() > self.opts.budget {
            self.count(|c| &c.over_budget, "icache_http_over_budget_total");
            if !self
                .shared
                .counters
                .warned_budget
                .swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    page = uri,
                    tokens = tokens.len(),
                    bytes = keys.len(),
                    budget = self.opts.budget,
                    "icache-http: surrogate keys over the header budget: page marked private \
                     (no shared cache keeps it); raise header_budget or read fewer tokens \
                     (logged once)"
                );
            }
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
        } else {
            if let Ok(v) = HeaderValue::from_str(&keys) {
                headers.insert(self.opts.header.name(), v);
            }
            if !headers.contains_key(CACHE_CONTROL) {
                headers.insert(CACHE_CONTROL, self.opts.cache_control.clone());
            }
        }
        headers.insert(ETAG, etag_value);
        self.shared.counters.tagged.fetch_add(1, Ordering::Relaxed);

        // What a 304 repeats (RFC 9110 §15.4.5).
        let mut kept = HeaderMap::new();
        for name in [ETAG, CACHE_CONTROL, VARY, self.opts.header.name()] {
            for v in headers.get_all(&name) {
                kept.append(name.clone(), v.clone());
            }
        }
        let manifest = Manifest {
            uri: uri.to_owned(),
            vary,
            key: page,
            etag,
            reads,
            headers: kept,
        };
        let inm_matches = request
            .get(IF_NONE_MATCH)
            .is_some_and(|v| key::if_none_match(v.as_bytes(), &manifest.etag));
        let manifest = self.manifests().insert(manifest);
        if inm_matches {
            self.count(|c| &c.not_modified, "icache_http_not_modified_total");
            return Tagging::NotModified(manifest.headers.clone());
        }
        Tagging::Tagged
    }
}

fn not_modified<B: Default>(headers: HeaderMap) -> Response<B> {
    let mut resp = Response::new(B::default());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    *resp.headers_mut() = headers;
    resp
}
