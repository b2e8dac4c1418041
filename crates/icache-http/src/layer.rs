//! [`PageLayer`] and its service: ETag, surrogate keys and Cache-Control on
//! the way out, 304 from the manifest on the way in.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::header::{CACHE_CONTROL, ETAG, IF_NONE_MATCH, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use icache::ICache;
use tower_layer::Layer;
use tower_service::Service;

use crate::key;
use crate::manifest::{Manifest, Manifests};
use crate::shim::{self, PageEvents};

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
}

#[derive(Default)]
struct Counters {
    not_modified: AtomicU64,
    manifest_hits: AtomicU64,
    manifest_misses: AtomicU64,
    over_budget: AtomicU64,
    tagged: AtomicU64,
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

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
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
        let handed = PageEvents::default();
        req.extensions_mut().insert(handed.clone());
        Box::pin(async move {
            if let Some(inm) = headers.get(IF_NONE_MATCH)
                && let Some(resp) = layer
                    .answer_from_manifest(&uri, &headers, inm.as_bytes())
                    .await
            {
                return Ok(resp);
            }
            let (resp, events) = shim::observe_async(move || inner.call(req), handed).await;
            let resp = resp?;
            Ok(layer.finish(resp, &events, &uri, &headers).await)
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

impl PageLayer {
    /// A 304 from the manifest, if the page's tokens are where they were and
    /// the client holds its tag.
    async fn answer_from_manifest<B: Default>(
        &self,
        uri: &str,
        headers: &HeaderMap,
        if_none_match: &[u8],
    ) -> Option<Response<B>> {
        let manifests = self.manifests();
        let Some(m) = manifests.get(uri, headers) else {
            self.count(|c| &c.manifest_misses, "icache_http_manifest_misses_total");
            return None;
        };
        let tokens: Vec<&str> = m.reads.iter().map(|(t, _)| t.as_str()).collect();
        match self.shared.cache.generations_async(&tokens).await {
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
        if !key::if_none_match(if_none_match, &m.etag) {
            return None;
        }
        self.count(|c| &c.not_modified, "icache_http_not_modified_total");
        Some(not_modified(&m.headers))
    }

    /// Tags a page the handler rendered and keeps its manifest.
    async fn finish<B: Default>(
        &self,
        mut resp: Response<B>,
        events: &[icache::BlockEvent],
        uri: &str,
        request: &HeaderMap,
    ) -> Response<B> {
        let h = resp.headers();
        if resp.status() != StatusCode::OK
            || events.is_empty()
            || h.contains_key(ETAG)
            || h.contains_key(SET_COOKIE)
            || private_or_no_store(h)
        {
            return resp;
        }
        let Some(vary) = vary_names(h) else {
            return resp;
        };
        let Some(reads) = shim::reads(events) else {
            return resp;
        };
        // Every block also reads the flush token (`ICache::flush`): it is in
        // the ETag (a flush changes every tag), but a page whose blocks read
        // nothing else read no data, and its key would tag every page alike
        // (after a flush, purge the proxy as a whole).
        if reads.iter().all(|(t, _)| t == icache::ICache::FLUSH_TOKEN) {
            return resp;
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
            return resp;
        };

        let mut tokens: Vec<&str> = reads
            .iter()
            .map(|(t, _)| t.as_str())
            .filter(|t| *t != icache::ICache::FLUSH_TOKEN)
            .collect();
        tokens.sort_unstable();
        tokens.dedup();
        let keys = tokens
            .iter()
            .map(|t| key::surrogate_key(t))
            .collect::<Vec<_>>()
            .join(self.opts.header.separator());
        let headers = resp.headers_mut();
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
            return not_modified(&manifest.headers);
        }
        resp
    }
}

fn not_modified<B: Default>(headers: &HeaderMap) -> Response<B> {
    let mut resp = Response::new(B::default());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    *resp.headers_mut() = headers.clone();
    resp
}
