//! Askama integration (feature `askama`): a cached sub-template, written
//! into an outer template like any value, rendered only on a miss.
//!
//! ```
//! use askama::Template;
//!
//! #[derive(Template)]
//! #[template(source = "<ul>{% for m in movies %}<li>{{ m }}</li>{% endfor %}</ul>", ext = "html")]
//! struct List { movies: Vec<String> }
//!
//! #[derive(Template)]
//! #[template(source = "<h1>Movies</h1>{{ list }}", ext = "html")]
//! struct Page<'a> { list: icache::askama::Cached<'a, List> }
//!
//! let cache = icache::ICache::memory();
//! let user_id = 42.to_string();
//! let tokens = ["movies", user_id.as_str()];
//! // The closure (and the query in it) runs only on a miss.
//! let page = |titles: &[&str]| {
//!     let movies: Vec<String> = titles.iter().map(|t| t.to_string()).collect();
//!     Page { list: icache::askama::cached(&cache, "list", &tokens, move || List { movies: movies.clone() }) }
//!         .render()
//! };
//! let first = page(&["Alien", "Brazil <3"])?;
//! assert_eq!(first, "<h1>Movies</h1><ul><li>Alien</li><li>Brazil &#60;3</li></ul>");
//! assert_eq!(page(&["not rendered"])?, first); // a hit
//! # Ok::<(), askama::Error>(())
//! ```
//!
//! The inner template's output is stored already escaped and written into
//! the outer one without escaping it again ([`Cached`] is `HtmlSafe`), so the
//! page is byte for byte what it is without the cache. A block is identified
//! by its template type, its name and its tokens; blocks inside it add their
//! tokens to it, and everything else is as for [`ICache::fragment`].
//!
//! ## In an async handler
//!
//! [`Cached`] is `Send` and takes owned tokens (`vec![…]`, `[String; N]`,
//! see [`Tokens`]), so a page can be built, held across an `.await` and
//! rendered in the handler. Rendering is sync: on `memory://` it never
//! blocks; on Redis or memcached each block is a round trip that blocks
//! the executor's thread, so render in `tokio::task::spawn_blocking`
//! inside [`Scope::run`](crate::Scope::run) (the blocks then still report
//! to the task's [`observe_async`](crate::observe_async) and enclosing
//! [`fragment_async`](ICache::fragment_async)); the README shows it.
//!
//! Tested with Askama 0.16.

use std::fmt;

use askama::filters::HtmlSafe;
use askama::{FastWritable, Template, Values};

use crate::fragment::Html;
use crate::{ICache, Tokens};

/// A cached sub-template: see the [module docs](self).
///
/// `Send` (and `Sync`): a page holding it can be built, moved across an
/// `.await` and rendered in an async handler.
pub struct Cached<'a, T> {
    cache: &'a ICache,
    name: &'a str,
    tokens: Tokens<'a>,
    make: Box<dyn Fn() -> T + Send + Sync + 'a>,
    stale: Option<bool>,
}

/// A block named `name` with `tokens` (borrowed, `&["movies", &user_id]`,
/// or owned, `vec![…]`, `[String; N]`: see [`Tokens`]), whose HTML is the
/// template `make()` returns, rendered only on a miss.
pub fn cached<'a, T, F>(
    cache: &'a ICache,
    name: &'a str,
    tokens: impl Into<Tokens<'a>>,
    make: F,
) -> Cached<'a, T>
where
    T: Template,
    F: Fn() -> T + Send + Sync + 'a,
{
    Cached {
        cache,
        name,
        tokens: tokens.into(),
        make: Box::new(make),
        stale: None,
    }
}

impl<T: Template> Cached<'_, T> {
    /// This block's `stale` choice, whatever the handle's `stale=`: `true`
    /// serves its previous body while another render holds the lease for
    /// the new version (see [`BlockOptions`](crate::BlockOptions)).
    #[must_use]
    pub fn stale_render(mut self, on: bool) -> Self {
        self.stale = Some(on);
        self
    }

    fn html(&self, values: &dyn Values) -> askama::Result<Html> {
        crate::lease::choose_for_next_block(self.stale);
        self.tokens.with(|tokens| {
            self.cache.block_html(
                &["askama", std::any::type_name::<T>(), self.name],
                tokens,
                || (self.make)().render_with_values(values),
            )
        })
    }
}

impl<T: Template> fmt::Display for Cached<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.html(askama::NO_VALUES).map_err(|_| fmt::Error)? {
            Html::Cached(html) => f.write_str(&html),
            Html::Rendered(html) => f.write_str(&html),
        }
    }
}

impl<T: Template> FastWritable for Cached<'_, T> {
    fn write_into(&self, dest: &mut dyn fmt::Write, values: &dyn Values) -> askama::Result<()> {
        match self.html(values)? {
            Html::Cached(html) => dest.write_str(&html)?,
            Html::Rendered(html) => dest.write_str(&html)?,
        }
        Ok(())
    }
}

/// Its output is the inner template's, escaped by it already.
impl<T: Template> HtmlSafe for Cached<'_, T> {}
