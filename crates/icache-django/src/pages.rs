//! Pages at the edge for Django (`django_icache.middleware`): the tags,
//! manifests and purges of [`icache_http`], so a Django page and a Rust page
//! behind `PageLayer` get ETags and surrogate keys of the same form, and one
//! purge per bumped token reaches both at the proxy.
//!
//! Python only moves headers in and out: which blocks a page read (with
//! the nested tokens of an outer block that hit, which Python never sees)
//! comes from the core's [`icache::observe`] around each block.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use icache::BlockEvent;
use icache_http::{PageLayer, PurgeErrorKind, SurrogateHeader, Tagging};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::{Cache, cache_error, detached};

/// What the blocks of one page did, collected while Django renders it.
/// `taint()` marks a page that showed something no token covers (a block
/// rendered uncached, a hole filled for this request): it gets no tag.
#[pyclass(frozen, module = "django_icache._core")]
#[derive(Default)]
pub(crate) struct Page {
    events: Mutex<Vec<BlockEvent>>,
    tainted: AtomicBool,
}

impl Page {
    pub(crate) fn record(&self, events: Vec<BlockEvent>) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(events);
    }
}

#[pymethods]
impl Page {
    #[new]
    fn new() -> Self {
        Page::default()
    }

    /// The page showed something its blocks' tokens do not cover.
    fn taint(&self) {
        self.tainted.store(true, Ordering::Relaxed);
    }

    #[getter]
    fn tainted(&self) -> bool {
        self.tainted.load(Ordering::Relaxed)
    }

    /// How many blocks were seen (nested ones included).
    #[getter]
    fn blocks(&self) -> usize {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        // A header Django would not send either is left out: the page key
        // and the checks only look at well-formed ones.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            map.append(n, v);
        }
    }
    map
}

fn pairs(map: &HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// The page layer's checks and tags, one call on the way in
/// (`not_modified`) and one on the way out (`tag`).
#[pyclass(frozen, module = "django_icache._core")]
struct Pages {
    inner: PageLayer,
    header: HeaderName,
}

#[pymethods]
impl Pages {
    /// `Pages(cache, header="surrogate-key", budget=8192,
    /// cache_control="no-cache", manifest_bytes=32 MiB)`; a bad option is a
    /// `ValueError` naming it.
    #[new]
    #[pyo3(signature = (cache, header = "surrogate-key", budget = icache_http::DEFAULT_HEADER_BUDGET, cache_control = "no-cache", manifest_bytes = icache_http::DEFAULT_MANIFEST_BYTES))]
    fn new(
        cache: &Bound<'_, Cache>,
        header: &str,
        budget: usize,
        cache_control: &str,
        manifest_bytes: u64,
    ) -> PyResult<Self> {
        let which = match header.to_ascii_lowercase().as_str() {
            "surrogate-key" => SurrogateHeader::SurrogateKey,
            "xkey" => SurrogateHeader::Xkey,
            "cache-tag" => SurrogateHeader::CacheTag,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "surrogate header {header:?}: expected \"Surrogate-Key\", \"xkey\" or \"Cache-Tag\""
                )));
            }
        };
        let cache_control = HeaderValue::from_str(cache_control).map_err(|_| {
            PyValueError::new_err(format!(
                "Cache-Control {cache_control:?} is not a valid header value"
            ))
        })?;
        let inner = PageLayer::new(cache.get().inner.clone())
            .surrogate_header(which)
            .header_budget(budget)
            .cache_control(cache_control)
            .manifest_bytes(manifest_bytes);
        Ok(Pages {
            inner,
            header: which.name(),
        })
    }

    /// The name of the surrogate-key header, lower case.
    #[getter]
    fn header(&self) -> &str {
        self.header.as_str()
    }

    /// The headers of a `304 Not Modified` for a GET or HEAD of `uri` (path
    /// and query) with these request headers, or `None`: render the page.
    /// One read of the generations, without the GIL.
    fn not_modified(
        &self,
        py: Python<'_>,
        uri: &str,
        request: Vec<(String, String)>,
    ) -> Option<Vec<(String, String)>> {
        let request = header_map(&request);
        detached(py, || self.inner.not_modified(uri, &request)).map(|h| pairs(&h))
    }

    /// Tags the response of a GET or HEAD: `(what, headers)` where `what` is
    /// `"untouched"` (headers empty), `"tagged"` (set these headers on the
    /// response) or `"not_modified"` (answer 304 with these headers).
    fn tag(
        &self,
        py: Python<'_>,
        uri: &str,
        request: Vec<(String, String)>,
        status: u16,
        response: Vec<(String, String)>,
        page: &Page,
    ) -> (&'static str, Vec<(String, String)>) {
        if page.tainted() {
            return ("untouched", Vec::new());
        }
        let Ok(status) = StatusCode::from_u16(status) else {
            return ("untouched", Vec::new());
        };
        let request = header_map(&request);
        let mut headers = header_map(&response);
        let events =
            std::mem::take(&mut *page.events.lock().unwrap_or_else(PoisonError::into_inner));
        let tagging = detached(py, || {
            self.inner.tag(uri, &request, status, &mut headers, &events)
        });
        match tagging {
            Tagging::NotModified(kept) => ("not_modified", pairs(&kept)),
            Tagging::Tagged => {
                let mut set = HeaderMap::new();
                for name in [
                    http::header::ETAG,
                    http::header::CACHE_CONTROL,
                    self.header.clone(),
                ] {
                    for v in headers.get_all(&name) {
                        set.append(name.clone(), v.clone());
                    }
                }
                ("tagged", pairs(&set))
            }
            _ => ("untouched", Vec::new()),
        }
    }

    /// not_modified, manifest_hits, manifest_misses, over_budget, tagged.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("not_modified", s.not_modified)?;
        d.set_item("manifest_hits", s.manifest_hits)?;
        d.set_item("manifest_misses", s.manifest_misses)?;
        d.set_item("over_budget", s.over_budget)?;
        d.set_item("tagged", s.tagged)?;
        Ok(d)
    }
}

/// For every bumped token, the purge the proxy in front understands
/// (`icache_http::Purger`): `Purger(url)` with `http://HOST:PORT` (Varnish
/// with the repo's VCL), `fastly://SERVICE?token=…` or
/// `cloudflare://ZONE?token=…`.
#[pyclass(frozen, module = "django_icache._core")]
pub(crate) struct Purger {
    pub(crate) inner: icache_http::Purger,
}

#[pymethods]
impl Purger {
    /// `timeout`: seconds each purge request may take (default 2; each is
    /// tried 3 times).
    #[new]
    #[pyo3(signature = (url, timeout = None))]
    fn new(url: &str, timeout: Option<f64>) -> PyResult<Self> {
        let inner =
            icache_http::Purger::from_url(url).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let inner = match timeout {
            None => inner,
            Some(t) if t.is_finite() && t > 0.0 && t <= 3600.0 => {
                inner.timeout(std::time::Duration::from_secs_f64(t))
            }
            Some(t) => {
                return Err(PyValueError::new_err(format!(
                    "purge timeout {t}: expected seconds, more than 0 and at most 3600"
                )));
            }
        };
        Ok(Purger { inner })
    }

    /// Purges the pages that read any of `tokens` (and the tokens of earlier
    /// purges that failed), without the GIL. Raises `CacheError` (kind
    /// `"purge"`) when the proxy did not take it after its retries: the
    /// tokens are then sent again with the next purge.
    fn purge(&self, py: Python<'_>, tokens: Vec<String>) -> PyResult<()> {
        detached(py, || self.inner.purge(&tokens)).map_err(|e| purge_err(&e))
    }

    /// What a relay does after a batch's bump: raises `CacheError` (kind
    /// `"purge"`: the rows stay) only while the proxy has refused for less
    /// than 10 s; after that the purge waits here, retried in the
    /// background, and the relay goes on.
    fn purge_for_relay(&self, py: Python<'_>, tokens: Vec<String>) -> PyResult<()> {
        detached(py, || self.inner.purge_for_relay(&tokens)).map_err(|e| purge_err(&e))
    }

    /// The purge of a bump of `tokens` that failed on `cache`: sent once
    /// `cache` has replayed its failed bumps (checked in the background).
    fn defer(&self, cache: &Bound<'_, Cache>, tokens: Vec<String>) {
        self.inner.defer(&cache.get().inner, &tokens);
    }

    /// Tokens waiting for their purge to be sent again.
    #[getter]
    fn pending(&self) -> usize {
        self.inner.pending()
    }

    /// ok, failed: purge requests so far.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("ok", s.ok)?;
        d.set_item("failed", s.failed)?;
        Ok(d)
    }
}

/// The surrogate key of a token (`icache_http::surrogate_key`): what the
/// pages' header lists and a purge names.
#[pyfunction]
fn surrogate_key(token: &str) -> String {
    icache_http::surrogate_key(token)
}

/// A purge that failed as a `CacheError`: kind `"purge"` (the proxy did
/// not take it), `"other"` for a purger that cannot build its requests.
fn purge_err(e: &icache_http::PurgeError) -> PyErr {
    let kind = if e.kind() == PurgeErrorKind::Config {
        "other"
    } else {
        "purge"
    };
    cache_error(format!("purge: {e}"), kind)
}

/// Adds this module's classes to `_core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(surrogate_key, m)?)?;
    m.add_class::<Page>()?;
    m.add_class::<Pages>()?;
    m.add_class::<Purger>()?;
    Ok(())
}
