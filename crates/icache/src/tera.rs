//! Tera integration (feature `tera`): the seed's `{% icache %}` syntax in
//! Tera 2 templates.
//!
//! Tera has no custom tags and no call blocks, so [`rewrite`] turns each
//! block into what Tera runs: a lookup (the version is read before the body),
//! a branch that writes the stored HTML on a hit (the body, and the data it
//! loads, are skipped), and a `{% filter %}` section that renders the body
//! and stores it on a miss. Render through [`render`], which keeps the two
//! halves of each block together and cleans up after an error.
//!
//! ```
//! # fn main() -> Result<(), tera::Error> {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//!
//! let cache = icache::ICache::memory();
//! let queries = Arc::new(AtomicUsize::new(0));
//! let mut tera = tera::Tera::default();
//! icache::tera::register(&mut tera, cache.clone());
//! let q = queries.clone();
//! tera.register_function("movies", move |_: tera::Kwargs, _: &tera::State| {
//!     q.fetch_add(1, Ordering::SeqCst); // the database query
//!     vec!["Alien", "Brazil <3"]
//! });
//! let source = "{% load icache %}{% icache 'movies' user %}<ul>{% for m in movies() %}<li>{{ m }}</li>{% endfor %}</ul>{% endicache %}";
//! tera.add_raw_template("list.html", &icache::tera::rewrite("list.html", source)?)?;
//! let mut ctx = tera::Context::new();
//! ctx.insert("user", &42);
//! let first = icache::tera::render(&tera, "list.html", &ctx)?;
//! assert_eq!(first, "<ul><li>Alien</li><li>Brazil &lt;3</li></ul>");
//! assert_eq!(icache::tera::render(&tera, "list.html", &ctx)?, first);
//! assert_eq!(queries.load(Ordering::SeqCst), 1, "the hit skipped the query");
//! # Ok(()) }
//! ```
//!
//! What holds as for the other engines: the version is read before the body
//! renders, a hit skips the body, a bump re-renders, blocks nested inside a
//! block add their tokens to it, the output is identical to the uncached
//! render (the stored HTML is written with `| safe`: it was escaped when it
//! was rendered), a block's identity is its template, position, a digest of
//! its source and its tokens, and an undefined or `none` token renders the
//! block uncached.
//!
//! Tokens are template expressions, split where one complete expression ends
//! as in the MiniJinja form (`{% icache 'items' 'user:' ~ user %}` has two);
//! each is checked with Tera's parser, and a bad one is an error naming the
//! template, line and the text written. `{% nocache %}` holes are MiniJinja's
//! only: the rewrite rejects them here (see the README, "Per-request parts in
//! Askama, maud and Tera", for the placeholder pattern).
//!
//! **In an async handler**: [`render`] is sync. On `memory://` it never
//! blocks; on Redis or memcached each block is a round trip that would block
//! the executor's thread, so call it in `tokio::task::spawn_blocking` inside
//! [`Scope::run`](crate::Scope::run) (its blocks then still report to the
//! task's [`observe_async`](crate::observe_async)). Tested with Tera 2.4.
//!
//! **What Tera cannot do here: single-flight.** The body is rendered by
//! Tera's VM between the lookup and the store, not by a closure icache
//! could run once and share, so concurrent misses of one block each render
//! it (each stores the same output). A Tera template rendered with
//! `Tera::render` instead of [`render`] renders its blocks uncached (with a
//! warning): without the scope, a render that fails halfway could leave a
//! block's bookkeeping behind.

use std::cell::RefCell;
use std::collections::HashMap;

use tera::{Context, Error, Kwargs, State, Tera, Value};

use crate::ICache;
use crate::fragment::{Begun, Unfinished, frame_depth, unwind_frames};

thread_local! {
    /// Blocks begun and not finished yet in this thread's [`render`]s;
    /// `None` outside a render.
    static TICKETS: RefCell<Option<Tickets>> = const { RefCell::new(None) };
}

#[derive(Default)]
struct Tickets {
    next: u64,
    open: HashMap<u64, (ICache, Unfinished)>,
}

/// Rewrites the seed's `{% icache … %}…{% endicache %}` blocks (and
/// `{% load icache %}`) of a Tera template; see the [module docs](self).
///
/// # Errors
///
/// A template error naming the template and line for an unclosed block, a
/// stray `{% endicache %}` or an unterminated token.
pub fn rewrite(name: &str, source: &str) -> Result<String, Error> {
    crate::minijinja::rewrite_for_tera(name, source).map_err(|e| Error::message(e.to_string()))
}

/// Registers `icache_get` and `icache_put`, which rewritten blocks call.
pub fn register(tera: &mut Tera, cache: ICache) {
    tera.register_function("icache_get", Get(cache));
    tera.register_filter("icache_put", Put);
}

/// Renders `name` with `ctx`, keeping each block's lookup and store
/// together; use it instead of `Tera::render` for templates with blocks.
///
/// # Errors
///
/// The template's error; nothing half-done is stored.
pub fn render(tera: &Tera, name: &str, ctx: &Context) -> Result<String, Error> {
    let outer = TICKETS.with(|t| t.borrow_mut().replace(Tickets::default()));
    let depth = frame_depth();
    let out = tera.render(name, ctx);
    // Blocks an error left unfinished: their frames go, nothing is stored,
    // and a block around this render (whose body may catch the error and
    // write a fallback) learns that it depends on tokens nobody recorded.
    if frame_depth() > depth {
        unwind_frames(depth);
        crate::fragment::report_unknown();
    }
    TICKETS.with(|t| *t.borrow_mut() = outer);
    out
}

/// `icache_get(tokens=[…], block="…")`: `{hit, html, ticket}`.
struct Get(ICache);

impl tera::Function<Result<Value, Error>> for Get {
    fn call(&self, kwargs: Kwargs, _: &State) -> Result<Value, Error> {
        let tokens: Vec<Value> = kwargs.must_get("tokens")?;
        let block: String = kwargs.must_get("block")?;
        let miss = |ticket: u64| {
            let mut m: HashMap<&str, Value> = HashMap::new();
            m.insert("hit", Value::from(false));
            m.insert("ticket", Value::from(ticket));
            Value::from(m)
        };
        if tokens.iter().any(|t| t.is_undefined() || t.is_none()) {
            tracing::warn!(
                block,
                "icache: a Tera block has an undefined or none token; rendered uncached"
            );
            return Ok(miss(0));
        }
        if TICKETS.with(|t| t.borrow().is_none()) {
            tracing::warn!(
                "icache: a Tera template with blocks was rendered without icache::tera::render; blocks render uncached"
            );
            return Ok(miss(0));
        }
        let tokens: Vec<String> = tokens
            .iter()
            .map(|t| t.as_str().map_or_else(|| t.to_string(), str::to_owned))
            .collect();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let begun = self.0.keyed(&["tera", &block], &refs, |identity, tokens| {
            self.0.blocks().begin(self.0.core(), identity, tokens)
        });
        match begun {
            Begun::Hit(html) => {
                let mut m: HashMap<&str, Value> = HashMap::new();
                m.insert("hit", Value::from(true));
                m.insert("html", Value::from(html.to_string()));
                Ok(Value::from(m))
            }
            Begun::Uncached => Ok(miss(0)),
            Begun::Render(begun) => {
                let ticket = TICKETS.with(|t| {
                    let mut t = t.borrow_mut();
                    let t = t.get_or_insert_with(Tickets::default);
                    t.next += 1;
                    let ticket = t.next;
                    t.open.insert(ticket, (self.0.clone(), begun));
                    ticket
                });
                Ok(miss(ticket))
            }
        }
    }
}

/// `body | icache_put(ticket=…)`: stores the body rendered on a miss and
/// writes it out as it is (already escaped).
struct Put;

impl tera::Filter<String, Result<Value, Error>> for Put {
    fn call(&self, body: String, kwargs: Kwargs, _: &State) -> Result<Value, Error> {
        let ticket: u64 = kwargs.must_get("ticket")?;
        let open = TICKETS.with(|t| t.borrow_mut().as_mut().and_then(|t| t.open.remove(&ticket)));
        if let Some((cache, begun)) = open {
            cache.blocks().finish(cache.core(), begun, body.clone());
        }
        Ok(Value::safe_string(&body))
    }

    fn is_safe(&self) -> bool {
        true
    }
}
