//! Pages and the edge on icache: validators and purge keys from the data
//! versions a page's blocks read.
//!
//! icache knows, for every page, which tokens its blocks read and at which
//! generation. That is a validator (an `ETag` that changes exactly when the
//! page's data does) and a set of purge keys (one per token). This crate
//! puts both on the wire:
//!
//! * [`PageLayer`]: a tower layer for any `http` 1.x service (axum, hyper,
//!   …). It tags each cached page with `ETag`, a surrogate-key header and
//!   `Cache-Control`, keeps a manifest of what the page read, and answers a
//!   conditional request with `304 Not Modified` **without calling the
//!   handler** while none of those tokens moved (one round trip to read the
//!   generations; none with `near=tracking`).
//! * [`Purger`]: on every bump, the purge the proxy in front understands:
//!   Varnish (`PURGE` with `xkey-purge`, vmod xkey), Fastly (surrogate-key
//!   purge), Cloudflare (purge by cache tags). Use it from the outbox
//!   relay's `after_bump` hook ([`Purger::purge`]) or right after the bump
//!   ([`Purger::incr_and_purge`]).
//! * `deploy/varnish/icache.vcl` in the repository: Varnish caching pages
//!   with no TTL (the purge is the invalidation).
//!
//! Nothing expires by time anywhere: a proxy keeps a page until a token it
//! read is bumped, and the bump purges it.
//!
//! # Example
//!
//! ```
//! use axum::{Router, routing::get};
//! let cache = icache::ICache::memory();
//! let c = cache.clone();
//! let app: Router = Router::new()
//!     .route("/", get(move || {
//!         let c = c.clone();
//!         async move { c.fragment("list", &["movies"], || Ok::<_, String>("<ul/>".into())).unwrap_or_default() }
//!     }))
//!     .layer(icache_http::PageLayer::new(cache));
//! ```

mod key;
mod layer;
mod manifest;
mod purge;

pub use key::surrogate_key;
pub use layer::{
    DEFAULT_HEADER_BUDGET, DEFAULT_MANIFEST_BYTES, PageLayer, PageService, PageStats,
    ResponseFuture, SurrogateHeader, Tagging,
};
pub use purge::{CLOUDFLARE_API, FASTLY_API, PurgeError, PurgeErrorKind, PurgeStats, Purger};
