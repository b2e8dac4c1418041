//! Manifests: for each page key, the tokens the page read with their
//! generations, its tag and the headers a 304 repeats. Kept in process,
//! bounded by bytes (a lost manifest costs one render, never a wrong 304).

use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use quick_cache::Weighter;
use quick_cache::sync::Cache;

use crate::layer::page_key;

/// What a conditional request is checked against.
#[derive(Debug)]
pub(crate) struct Manifest {
    pub(crate) uri: String,
    /// The response's `Vary` names (sorted, lower case).
    pub(crate) vary: Vec<HeaderName>,
    pub(crate) key: [u8; 32],
    pub(crate) etag: String,
    pub(crate) reads: Vec<(String, u64)>,
    /// `ETag`, `Cache-Control`, `Vary` and the surrogate keys of the 200.
    pub(crate) headers: HeaderMap,
}

#[derive(Clone)]
struct ByBytes;

impl Weighter<[u8; 32], Arc<Manifest>> for ByBytes {
    fn weight(&self, _: &[u8; 32], m: &Arc<Manifest>) -> u64 {
        let reads: usize = m.reads.iter().map(|(t, _)| t.len() + 32).sum();
        let headers: usize = m
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        (128 + m.uri.len() + m.etag.len() + reads + headers) as u64
    }
}

#[derive(Clone)]
struct VaryBytes;

impl Weighter<String, Arc<[HeaderName]>> for VaryBytes {
    fn weight(&self, uri: &String, names: &Arc<[HeaderName]>) -> u64 {
        (64 + uri.len() + names.iter().map(|n| n.as_str().len() + 16).sum::<usize>()) as u64
    }
}

pub(crate) struct Manifests {
    /// Page key -> manifest.
    pages: Cache<[u8; 32], Arc<Manifest>, ByBytes>,
    /// Path and query -> the names its last response varied on (to build
    /// the page key of a request before any response).
    vary: Cache<String, Arc<[HeaderName]>, VaryBytes>,
}

impl Manifests {
    pub(crate) fn new(max_bytes: u64) -> Manifests {
        let max_bytes = max_bytes.max(4096);
        let vary_bytes = (max_bytes / 8).max(1024);
        Manifests {
            pages: Cache::with_weighter((max_bytes / 512).max(16) as usize, max_bytes, ByBytes),
            vary: Cache::with_weighter((vary_bytes / 128).max(16) as usize, vary_bytes, VaryBytes),
        }
    }

    pub(crate) fn get(&self, uri: &str, request: &HeaderMap) -> Option<Arc<Manifest>> {
        let vary = self.vary.get(uri)?;
        let key = page_key(uri, &vary, request);
        let m = self.pages.get(&key)?;
        // A digest match on another page is out of reach (2^-128); the check
        // costs nothing.
        (m.uri == uri && *m.vary == *vary).then_some(m)
    }

    pub(crate) fn insert(&self, m: Manifest) -> Arc<Manifest> {
        let m = Arc::new(m);
        if self.vary.get(&m.uri).as_deref() != Some(&m.vary[..]) {
            self.vary.insert(m.uri.clone(), m.vary.clone().into());
        }
        self.pages.insert(m.key, m.clone());
        m
    }
}
