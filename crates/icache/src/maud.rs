//! maud integration (feature `maud`): a cached block that implements
//! [`maud::Render`], so it sits inside `html!` like any other value.
//!
//! ```
//! use maud::html;
//!
//! let cache = icache::ICache::memory();
//! let user_id = 42.to_string();
//! let page = |movies: &[&str]| {
//!     html! {
//!         h1 { "Movies" }
//!         (icache::maud::cached(&cache, "list", &["movies", &user_id], || html! {
//!             ul { @for m in movies { li { (m) } } }
//!         }))
//!     }
//!     .into_string()
//! };
//! let first = page(&["Alien", "Brazil <3"]);
//! assert_eq!(first, "<h1>Movies</h1><ul><li>Alien</li><li>Brazil &lt;3</li></ul>");
//! // A hit: the block's body does not run (its data would be stale here).
//! assert_eq!(page(&["not", "rendered"]), first);
//! cache.incr("movies")?;
//! assert!(page(&["Cube"]).contains("<li>Cube</li>"));
//! # Ok::<(), icache::Error>(())
//! ```
//!
//! The body runs only on a miss (put the database query inside it); its
//! output is stored already escaped and written back as it is, so the page
//! is byte for byte what it is without the cache. A block is identified by
//! its name and tokens; blocks inside the body add their tokens to it, and
//! everything else is as for [`ICache::fragment`].
//!
//! ## In an async handler
//!
//! [`Cached`] is `Send` when its body is, and takes owned tokens
//! (`vec![…]`, `[String; N]`, see [`Tokens`]). Rendering is sync: fine on
//! `memory://`; on Redis or memcached build and render the markup in
//! `tokio::task::spawn_blocking` inside [`Scope::run`](crate::Scope::run),
//! so the executor's thread never waits for the backend and the blocks
//! still report to the task's [`observe_async`](crate::observe_async).
//!
//! Tested with maud 0.27.

use std::convert::Infallible;

use maud::{Markup, Render};

use crate::fragment::Html;
use crate::{ICache, Tokens};

/// A cached maud block: see the [module docs](self).
///
/// `Send` when its body is: a page can hold it across an `.await`.
#[must_use = "a cached block renders only when written into html!"]
pub struct Cached<'a, F> {
    cache: &'a ICache,
    name: &'a str,
    tokens: Tokens<'a>,
    body: F,
    stale: Option<bool>,
}

/// A block named `name` with `tokens` (borrowed, `&["movies", &user_id]`,
/// or owned, `vec![…]`, `[String; N]`: see [`Tokens`]), whose HTML is
/// `body()` on a miss.
pub fn cached<'a, F>(
    cache: &'a ICache,
    name: &'a str,
    tokens: impl Into<Tokens<'a>>,
    body: F,
) -> Cached<'a, F>
where
    F: Fn() -> Markup,
{
    Cached {
        cache,
        name,
        tokens: tokens.into(),
        body,
        stale: None,
    }
}

impl<F> Cached<'_, F> {
    /// This block's `stale` choice, whatever the handle's `stale=`: `true`
    /// serves its previous body while another render holds the lease for
    /// the new version (see [`BlockOptions`](crate::BlockOptions)).
    pub fn stale_render(mut self, on: bool) -> Self {
        self.stale = Some(on);
        self
    }
}

impl<F> Render for Cached<'_, F>
where
    F: Fn() -> Markup,
{
    fn render_to(&self, buffer: &mut String) {
        crate::lease::choose_for_next_block(self.stale);
        let out = self.tokens.with(|tokens| {
            self.cache.block_html(&["maud", self.name], tokens, || {
                Ok::<_, Infallible>((self.body)().into_string())
            })
        });
        match out {
            Ok(Html::Cached(html)) => buffer.push_str(&html),
            Ok(Html::Rendered(html)) => buffer.push_str(&html),
            Err(never) => match never {},
        }
    }
}
