//! MiniJinja integration (feature `minijinja`): the `icache` call-block function
//! and the seed's own `{% icache %}` syntax.
//!
//! ```
//! # fn main() -> Result<(), minijinja::Error> {
//! let cache = icache::ICache::memory();
//! let mut env = minijinja::Environment::new();
//! icache::minijinja::register(&mut env, cache.clone());
//!
//! // The seed's syntax, accepted verbatim through a source rewrite:
//! const SOURCE: &str = "{% load icache %}\
//! {% icache 'movies-personal-rating' 'movies' user.id %}<ul>{{ user.name }}</ul>{% endicache %}";
//! env.add_template_owned("inline.html", icache::minijinja::rewrite("inline.html", SOURCE)?)?;
//!
//! // The call-block form, no rewrite needed:
//! env.add_template("call.html",
//!     "{% call icache('movies', user.id, name='list') %}<ol>{{ user.name }}</ol>{% endcall %}")?;
//!
//! let ctx = minijinja::context! { user => minijinja::context! { id => 42, name => "Ann & Bob" } };
//! let page = env.get_template("inline.html")?.render(&ctx)?;
//! assert_eq!(page, "<ul>Ann &amp; Bob</ul>");
//! // Rendered again: served from the cache, byte for byte the same.
//! assert_eq!(env.get_template("inline.html")?.render(&ctx)?, page);
//! assert_eq!(cache.stats().hits, 1);
//! assert_eq!(env.get_template("call.html")?.render(&ctx)?, "<ol>Ann &amp; Bob</ol>");
//! # Ok(()) }
//! ```
//!
//! For templates loaded from files, wrap the loader so every template is
//! rewritten: `env.set_loader(icache::minijinja::loader(minijinja::path_loader("templates")))`.
//!
//! # Block identity
//!
//! Every argument is a token (part of the key and of the version). Besides its
//! arguments, an entry's key holds the template's name and the auto-escape
//! mode, and:
//!
//! * for `{% icache %}` blocks (and `{% call icache(…) %}` blocks in templates
//!   that went through [`rewrite()`] or [`loader`]): the block's line, column and a
//!   digest of its source, injected by the rewrite. Two blocks never share an
//!   entry, and editing a block's body invalidates its entries;
//! * for call blocks added without the rewrite: the `name=` argument if given.
//!   MiniJinja does not tell a function where it is called from, so two such
//!   blocks in one template with the same arguments and no `name=` would
//!   share an entry: the second one met in a render is an error that says to
//!   add `name=` (a single unnamed call block works as it is).
//!
//! # Tokens are expressions
//!
//! Each argument of `{% icache … %}` is a token: a quoted literal or any
//! template expression, whose value (as a string) is the token. A token ends
//! where one complete expression ends, read with MiniJinja's own expression
//! grammar, so whitespace around operators is not a separator:
//!
//! ```text
//! {% icache 'items' 'user:' ~ user.id %}        two tokens: "items", "user:42"
//! {% icache 'items' user.name | upper %}        two tokens
//! {% icache 'page' page + 1 f(a, 'b c') %}     three tokens
//! {% icache 'x' a if b else c (y is odd) %}     three tokens
//! {% icache 'movies' user.id name='list' %}     two tokens and the option name=
//! ```
//!
//! Adjacent string literals are separate tokens (`'a' 'b'`), and a bracket
//! after whitespace starts a new one (`'a' (b)`); a test takes one argument
//! without parentheses as in MiniJinja (`x is divisibleby 3`), so write
//! `(x is defined) y` to end it. Each token is checked with MiniJinja's parser
//! when the template is rewritten: a bad one (`'user:' ~`), like an unclosed
//! block, is an error naming the template, the line and the text the user
//! wrote, never the rewritten call.
//!
//! # Per-request parts: `{% nocache %}`
//!
//! A CSRF token, a flash message or a "hello, Ann" inside a cached block
//! would be served to everyone. Mark such a part as a hole: it is rendered on
//! every request, on hits too, with the current values; the rest of the
//! block stays cached.
//!
//! ```
//! # fn main() -> Result<(), minijinja::Error> {
//! let cache = icache::ICache::memory();
//! let mut env = minijinja::Environment::new();
//! icache::minijinja::register(&mut env, cache.clone());
//! env.set_loader(icache::minijinja::loader(|name: &str| {
//!     Ok((name == "form.html").then(|| {
//!         "{% icache 'movies' %}<form>{% nocache %}<input name=csrf value=\"{{ csrf }}\">\
//!          {% endnocache %}{{ movies }}</form>{% endicache %}".to_string()
//!     }))
//! }));
//! let page = |csrf: &str, movies: &str| {
//!     env.get_template("form.html")?.render(minijinja::context! { csrf, movies })
//! };
//! assert_eq!(page("k1", "Alien")?, "<form><input name=csrf value=\"k1\">Alien</form>");
//! // A hit: the cached list, this request's token.
//! assert_eq!(page("k2", "Brazil")?, "<form><input name=csrf value=\"k2\">Alien</form>");
//! # Ok(()) }
//! ```
//!
//! The call-block form is `{% call icache_nocache() %}…{% endcall %}`, the same
//! thing; both need the template to go through [`loader`] or [`rewrite()`],
//! which records each hole's source (MiniJinja does not hand a function the
//! source of its body). Outside a cached block a hole is plain template text.
//! Inside a cached block of a template that skipped the rewrite, a hole
//! could not be rendered again on a hit: the blocks around it render
//! uncached (output right, nothing stored), with a warning once per
//! template; a per-request value is never cached for everyone.
//!
//! **What a hole sees**: the variables visible at the opening tag of the
//! outermost cached block around it: the render's context, globals, imports,
//! and variables set before that block (the variable of a `{% for %}` around
//! the block, a macro's arguments when the block is in the macro). Variables
//! set **inside** the block (by a loop or a `{% set %}` in its body) are not,
//! because a hit does not run the body: a hole shows
//! the same on a miss and on a hit. Pass what it needs through the context,
//! or open the cached block inside the loop (the rewrite logs a warning for a
//! hole that uses a name set inside its block). A hole's output is not passed
//! through filters applied around it inside the block. It is escaped as the
//! template it is written in escapes.
//!
//! Nested blocks work: a hole in an inner block is a hole of the outer one's
//! stored body too, and is filled on the outer block's hits. Holes cannot
//! hold blocks or other holes.
//!
//! **Cost**: a body with no hole is stored and served exactly as without
//! this feature (a hit compares its first bytes, no scan). A hole costs a
//! compile and a render of its own (small) source on every request (once
//! per request when a loop inside the block meets it many times: it sees
//! the same variables each time).
//!
//! **Why data cannot fake a hole**: stored bodies keep their holes as byte
//! offsets in a header beside the text, never as markers in it, so a hit
//! never looks for holes in the content; a body that merely begins like that
//! header is stored with an explicit empty one. While a block renders, holes
//! are marked with a random number made for that render, which no value
//! can know. A header names holes by id, and ids only resolve to hole sources
//! this process's rewrite registered: a stored entry never supplies template
//! code.
//!
//! # A block met twice in one render
//!
//! A block in a loop whose loop variable is not a token
//! (`{% for m in movies %}{% icache 'movie' %}{{ m.title }}{% endicache %}`) is
//! one entry for every iteration: all of them show the first (`<1><1><1>`).
//! Such a block, met again in the same render with the same tokens, is
//! logged once per block (a `tracing` warning, also seen by `log` users),
//! naming the block and the loop variables (or macro arguments) in scope that
//! its tokens do not use: add the one that tells the renders apart
//! (`{% icache 'movie' m.id %}`). Unnamed call blocks without a position are an
//! error in that case (see below).
//!
//! # A block with no token
//!
//! `{% icache %}` with no token (and no block with tokens inside it) can never
//! be invalidated by a bump: it shows its first render until the backend
//! evicts it. It works, and is logged once per block, saying how to flush it:
//! give it a token for what it shows and bump that (`cache.incr("movies")`,
//! or `icache bump movies`). To refresh it as it is, flush: `cache.flush()`
//! (or `icache flush`) makes every cached block miss once; editing the
//! block's source also gives it a new entry.
//!
//! # Undefined tokens
//!
//! A token that is undefined or `none` (a typo: `user.idd`, a missing
//! variable) would make every user's block the same entry. Such a block is
//! rendered **uncached**, with a warning (once per template and process);
//! with [`register_strict`] it is an error instead. Only the arguments
//! themselves are checked: an undefined value inside an expression
//! (`'user:' ~ user.idd`) is MiniJinja's to catch; use MiniJinja's strict
//! undefined behavior to make that an error too.
//!
//! # Nested blocks, escaping, errors
//!
//! A block inside another adds its tokens to the outer one: bumping an inner
//! token invalidates the outer block too. The cached body is the already
//! escaped output and is returned as a safe string: output is byte for byte
//! what the block renders without the cache. An error inside a block is the
//! template's error and nothing is cached; backend trouble is never an error
//! (the block renders uncached).

use minijinja::value::{Kwargs, Rest, Value};
use minijinja::{Environment, Error, ErrorKind, State};

use std::sync::Arc;

use crate::ICache;
use crate::fragment::Html;

mod args;
mod holes;
mod rewrite;
pub use rewrite::rewrite;
#[cfg(feature = "tera")]
pub(crate) use rewrite::rewrite_for_tera;

/// Template values made from stored fragments kept in process (the memory
/// backend, the near cache), by the
/// address of the stored text. A hit then costs no copy before the output:
/// MiniJinja can only make a safe string from a `String`, so without this a
/// hit would copy the HTML twice (into a `String`, then into the value). The
/// stored `Arc` is kept alongside, so its address is not reused while the
/// value is cached. Bounded by bytes; entries evicted here are just remade.
struct SafeValues {
    values: quick_cache::sync::Cache<usize, (Arc<str>, Value), ByLen>,
}

#[derive(Clone)]
struct ByLen;

impl quick_cache::Weighter<usize, (Arc<str>, Value)> for ByLen {
    fn weight(&self, _: &usize, v: &(Arc<str>, Value)) -> u64 {
        // The stored text is shared with the cache; the value is a copy.
        v.0.len() as u64 + 64
    }
}

/// What the reused template values may hold.
const SAFE_VALUES_BYTES: u64 = 16 * 1024 * 1024;

impl SafeValues {
    fn new() -> Arc<Self> {
        Arc::new(SafeValues {
            values: quick_cache::sync::Cache::with_weighter(1024, SAFE_VALUES_BYTES, ByLen),
        })
    }

    fn value(&self, text: Arc<str>) -> Value {
        let at = Arc::as_ptr(&text) as *const u8 as usize;
        if let Some((kept, value)) = self.values.get(&at)
            && Arc::ptr_eq(&kept, &text)
        {
            return value;
        }
        let value = Value::from_safe_string(text.to_string());
        self.values.insert(at, (text, value.clone()));
        value
    }
}

/// The keyword the rewrite injects to identify a block.
const BLOCK_KW: &str = "__icache_block";

/// The keyword the rewrite injects into `icache_nocache` calls: the hole's
/// id, under which its source was registered.
const HOLE_KW: &str = "__icache_hole";

/// The keyword the rewrite injects, for a block inside `{% for %}` loops or
/// macros, with the loop variables and macro arguments its tokens do not
/// mention: the likely missing token when the block is met twice.
const LOOP_KW: &str = "__icache_loop";

/// Registers the `icache` function, used as a call block:
/// `{% call icache('movies', user.id) %}…{% endcall %}`.
///
/// Arguments become tokens as strings (`42` → `"42"`, strings as they are).
/// A block with an undefined or `none` token renders uncached, with a
/// warning (see [`register_strict`]). Keyword `name=` identifies a
/// hand-written block.
pub fn register(env: &mut Environment<'_>, cache: ICache) {
    register_with(env, cache, false);
}

/// [`register`], but a block with an undefined or `none` token is an error
/// (MiniJinja's `UndefinedError`) rather than an uncached render.
///
/// ```
/// # fn main() -> Result<(), minijinja::Error> {
/// let mut env = minijinja::Environment::new();
/// icache::minijinja::register_strict(&mut env, icache::ICache::memory());
/// env.add_template("t", "{% call icache('p', user.idd) %}hi{% endcall %}")?;
/// let err = env.get_template("t")?.render(minijinja::context! { user => minijinja::context! { id => 1 } }).unwrap_err();
/// assert!(err.to_string().contains("undefined or none"));
/// # Ok(()) }
/// ```
pub fn register_strict(env: &mut Environment<'_>, cache: ICache) {
    register_with(env, cache, true);
}

/// Unnamed call blocks without a position, met in this render: (template,
/// tokens).
#[derive(Default)]
struct Unnamed(std::collections::HashSet<(String, Vec<String>)>);

/// What one render (one MiniJinja `State`) keeps about its blocks.
#[derive(Default)]
struct RenderState {
    /// Positioned blocks met in this render, by a hash of (block, tokens):
    /// a second meeting is a block in a loop or a macro whose tokens miss
    /// what tells its renders apart. (A collision only costs a false
    /// warning.)
    positioned: std::collections::HashSet<u64>,
    /// Block calls so far: a body whose render met no other block has no
    /// nested tokens either.
    met: std::cell::Cell<u64>,
    /// `{% nocache %}` sections met, and blocks rendering.
    holes: holes::Holes,
    /// Holes met inside a block being rendered that cannot be rendered
    /// again on a hit (their template skipped the rewrite, so their source
    /// is unknown): every block around them renders uncached.
    unstorable: std::cell::Cell<u64>,
}

/// Why a block's body is not returned as a body to store.
enum BodyError {
    /// The template's own error.
    Template(Error),
    /// The body holds a hole that cannot be rendered again on a hit: shown
    /// to this request, never stored (an error to the block engine, which
    /// then stores nothing and tells the blocks around it).
    Unstorable(String),
}

/// A block body as MiniJinja hands it back.
fn body_text(v: Value) -> String {
    match v.as_str() {
        Some(s) => s.to_owned(),
        None => v.to_string(),
    }
}

/// Adds `by` to the number of block bodies rendering in this render.
fn rendering(state: &State, by: isize) {
    if let Some(r) = state.get_extension::<RenderState>() {
        r.holes
            .depth
            .set(r.holes.depth.get().saturating_add_signed(by));
    }
}

/// Blocks already warned about (a repeated block, a block with no token):
/// each warning once per block and process. Past `WARNED_MAX` blocks no more
/// are remembered, so at most that many such warnings are logged.
#[derive(Default)]
struct Warned(std::sync::Mutex<std::collections::HashSet<(&'static str, String)>>);

const WARNED_MAX: usize = 1024;

impl Warned {
    /// Should the warning `what` about `block` be logged (the first time)?
    fn first(&self, what: &'static str, block: &str) -> bool {
        let Ok(mut seen) = self.0.lock() else {
            return false;
        };
        if seen.len() >= WARNED_MAX || seen.contains(&(what, block.to_owned())) {
            return false;
        }
        seen.insert((what, block.to_owned()))
    }
}

/// `template.html line 3 col 5` from a block identity injected by the
/// rewrite (`name:line:col:digest`; the name may hold `:` itself).
fn block_place(block: &str) -> String {
    let mut parts = block.rsplitn(4, ':');
    let (_digest, col, line, name) = (parts.next(), parts.next(), parts.next(), parts.next());
    match (name, line, col) {
        (Some(name), Some(line), Some(col)) => format!("{name:?} line {line} col {col}"),
        _ => format!("{block:?}"),
    }
}

fn register_with(env: &mut Environment<'_>, cache: ICache, strict: bool) {
    env.add_function("icache_nocache", nocache);
    let shared = SafeValues::new();
    let warned_blocks = Arc::new(Warned::default());
    // Templates already warned about for undefined tokens.
    let warned: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
    env.add_function(
        "icache",
        move |state: &mut State, args: Rest<Value>, kwargs: Kwargs| -> Result<Value, Error> {
            let caller: Value = kwargs.get("caller").map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "icache() must be used as a call block: {% call icache('token') %}…{% endcall %}",
                )
            })?;
            let name: Option<String> = kwargs.get("name")?;
            let block: Option<String> = kwargs.get(BLOCK_KW)?;
            let scope: Option<String> = kwargs.get(LOOP_KW)?;
            // `stale=true`: serve the previous body while another render
            // holds the lease (`stale=render` for this block).
            let stale: Option<bool> = kwargs.get("stale")?;
            kwargs.assert_all_used()?;
            let template = state.name().to_owned();
            if let Some(i) = args.iter().position(|v| v.is_undefined() || v.is_none()) {
                let what = format!(
                    "icache block in template {template:?}: token {} is undefined or none, \
                     so every value of it would share one cache entry",
                    i + 1
                );
                if strict {
                    return Err(Error::new(ErrorKind::UndefinedError, what));
                }
                let first = warned
                    .lock()
                    .map(|mut w| w.insert(template.clone()))
                    .unwrap_or(false);
                if first {
                    tracing::warn!("{what}; it is rendered uncached (this warning once per template)");
                }
                let body = caller.call(state, &[])?;
                return Ok(Value::from_safe_string(match body.as_str() {
                    Some(s) => s.to_owned(),
                    None => body.to_string(),
                }));
            }
            let tokens: Vec<String> = args.iter().map(token_string).collect();
            let render_state = state.get_or_insert_extension(RenderState::default());
            render_state.met.set(render_state.met.get() + 1);
            let met_before = render_state.met.get();
            let holes_before = render_state.holes.count();
            let unstorable_before = render_state.unstorable.get();
            // Warns about a block with no token at all (own or nested): it
            // is told after a render, the only time its nested blocks are
            // known.
            let tokenless = |state: &State| {
                let met = state
                    .get_extension::<RenderState>()
                    .map_or(met_before, |r| r.met.get());
                let which = block.as_deref().or(name.as_deref()).unwrap_or("");
                if met == met_before
                    && tokens.is_empty()
                    && warned_blocks.first("tokenless", &format!("{template}\0{which}"))
                {
                    let place = match (&block, &name) {
                        (Some(b), _) => block_place(b),
                        (None, Some(n)) => format!("{n:?} in template {template:?}"),
                        (None, None) => format!("in template {template:?}"),
                    };
                    tracing::warn!(
                        "icache block {place} has no tokens, so no bump can ever invalidate it: it \
                         shows its first render until the entry is evicted. Give it a token for the \
                         data it shows and bump that after a change (`cache.incr(\"movies\")`, or \
                         `icache bump movies` from the command line). To refresh it as it is, flush: \
                         `cache.flush()` (or `icache flush`) makes every cached block miss once; editing \
                         the block's source also gives it a new entry (this warning once per block)"
                    );
                }
            };
            if let Some(block) = &block {
                use std::hash::BuildHasher;
                static SEED: std::sync::LazyLock<std::collections::hash_map::RandomState> =
                    std::sync::LazyLock::new(Default::default);
                if !render_state.positioned.insert(SEED.hash_one((block, &tokens)))
                    && warned_blocks.first("repeated", block)
                {
                    let missing = match scope.as_deref() {
                        Some(names) => format!(
                            "probably one of the loop variables or macro arguments in scope that its \
                             tokens do not use: {names}"
                        ),
                        None => "probably a loop variable, or a macro argument".to_owned(),
                    };
                    tracing::warn!(
                        "icache block {} was met twice in one render with the same tokens {tokens:?}: \
                         every meeting shares one cache entry, so all of them show the first one's \
                         output. A token is missing, {missing}: add what tells the renders apart \
                         (`{{% icache 'item' item.id %}}`) (this warning once per block)",
                        block_place(block)
                    );
                }
            }
            if block.is_none() && name.is_none() {
                let seen = state.get_or_insert_extension(Unnamed::default());
                if !seen.0.insert((template.clone(), tokens.clone())) {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!(
                            "an unnamed {{% call icache(…) %}} block with the tokens {tokens:?} was met twice in one render of \
                             template {template:?} (two blocks, or one block in a loop or a macro): they would share one \
                             cache entry, and the second would show the first's output. Give each a name=, or make the \
                             tokens differ (or load the template through icache::minijinja::loader, which tells blocks \
                             apart by their position)"
                        ),
                    ));
                }
            }
            let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let escape = format!("{:?}", state.auto_escape());
            let identity = [
                "minijinja",
                &template,
                &escape,
                block.as_deref().unwrap_or(""),
                name.as_deref().unwrap_or(""),
            ];
            crate::lease::choose_for_next_block(stale);
            let html = cache.block_html(&identity, &tokens, || {
                rendering(state, 1);
                let body = caller.call(state, &[]).map(body_text);
                rendering(state, -1);
                tokenless(state);
                let body = body.map_err(BodyError::Template)?;
                let Some(r) = state.get_extension::<RenderState>() else {
                    return Ok(body);
                };
                // Holes met while it rendered leave the body as markers:
                // stored as a header of hole offsets beside the text.
                let body = r.holes.store_form(body, holes_before);
                if r.unstorable.get() != unstorable_before {
                    return Err(BodyError::Unstorable(body));
                }
                Ok(body)
            });
            let html = match html {
                Ok(html) => html,
                Err(BodyError::Template(e)) => return Err(e),
                Err(BodyError::Unstorable(body)) => Html::Rendered(body),
            };
            let stored: &str = match &html {
                Html::Rendered(s) => s,
                Html::Cached(s) => s,
            };
            if stored.starts_with(holes::HEADER) {
                return with_holes(state, &caller, stored);
            }
            Ok(match html {
                Html::Rendered(s) => Value::from_safe_string(s),
                // The memory backend and the near cache hand out the same
                // stored text on every hit: reuse the template value made
                // from it the first time.
                Html::Cached(s) if cache.keeps_bodies_in_process() => shared.value(s),
                Html::Cached(s) => Value::from_safe_string(s.to_string()),
            })
        },
    );
}

/// Writes out a stored body that has holes: filled with this request's
/// values (the outermost block), or as markers for the block around it.
/// Anything unreadable (corrupt bytes, a hole whose source this process does
/// not know) renders the body fresh, uncached.
fn with_holes(state: &mut State, caller: &Value, stored: &str) -> Result<Value, Error> {
    let filled = match (state.get_extension::<RenderState>(), holes::decode(stored)) {
        (Some(render_state), Some((holes, body))) => {
            holes::write_out(state, &render_state.holes, &holes, body)?
        }
        _ => None,
    };
    match filled {
        Some(out) => Ok(Value::from_safe_string(out)),
        None => caller
            .call(state, &[])
            .map(|v| Value::from_safe_string(body_text(v))),
    }
}

/// `icache_nocache`, the call-block form of `{% nocache %}`.
fn nocache(state: &mut State, kwargs: Kwargs) -> Result<Value, Error> {
    let caller: Value = kwargs.get("caller").map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            "icache_nocache() must be used as a call block: {% call icache_nocache() %}…{% endcall %}",
        )
    })?;
    let hole: Option<String> = kwargs.get(HOLE_KW)?;
    kwargs.assert_all_used()?;
    let render_state = state.get_or_insert_extension(RenderState::default());
    if render_state.holes.depth.get() == 0 {
        // Not inside a block being rendered (outside any block, or in a
        // block rendered fresh): plain template text.
        return caller
            .call(state, &[])
            .map(|v| Value::from_safe_string(body_text(v)));
    }
    let Some(hole) = hole else {
        // The template skipped the rewrite, so the hole's source is unknown
        // and a hit could not render it: the blocks around it render
        // uncached, and the per-request part is never stored.
        render_state
            .unstorable
            .set(render_state.unstorable.get() + 1);
        let template = state.name().to_owned();
        if NOCACHE_WARNED.first("nocache-without-rewrite", &template) {
            tracing::warn!(
                "icache: a {{% call icache_nocache() %}} section inside a cached block of template \
                 {template:?}, which did not go through icache::minijinja::loader or \
                 icache::minijinja::rewrite: its source is unknown, so it could not be rendered again \
                 on a hit, and the blocks around it render uncached on every request. Load the \
                 template through the loader (or add it with rewrite()) to cache them (this warning \
                 once per template)"
            );
        }
        return caller
            .call(state, &[])
            .map(|v| Value::from_safe_string(body_text(v)));
    };
    Ok(Value::from_safe_string(
        render_state.holes.marker(hole.into()),
    ))
}

/// Templates warned about for holes that skipped the rewrite.
static NOCACHE_WARNED: std::sync::LazyLock<Warned> = std::sync::LazyLock::new(Warned::default);

fn token_string(v: &Value) -> String {
    if let Some(s) = v.as_str() {
        s.to_owned()
    } else {
        v.to_string()
    }
}

/// Renders template `name` with `ctx` for an async handler: MiniJinja
/// renders synchronously (and a block's body may query a database), so the
/// render runs on tokio's blocking pool and the executor is never blocked;
/// outside a tokio runtime it runs inline.
///
/// Pair it with data loaded **inside** the block, through a function the
/// template calls (`{% icache 'movies' %}{% for m in movies() %}…`): on a hit
/// the body does not run, so the query does not either. Passing the data in
/// `ctx` instead would pay the query on every request.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), minijinja::Error> {
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
///
/// let cache = icache::ICache::memory();
/// let queries = Arc::new(AtomicUsize::new(0));
/// let mut env = minijinja::Environment::new();
/// icache::minijinja::register(&mut env, cache.clone());
/// let q = queries.clone();
/// env.add_function("movies", move || {
///     q.fetch_add(1, Ordering::SeqCst); // the database query
///     vec!["Alien", "Brazil"]
/// });
/// env.set_loader(icache::minijinja::loader(|name: &str| {
///     Ok((name == "list.html").then(|| {
///         "{% load icache %}{% icache 'movies' %}{% for m in movies() %}<li>{{ m }}</li>{% endfor %}{% endicache %}".to_string()
///     }))
/// }));
/// let env = Arc::new(env);
/// let first = icache::minijinja::render_async(env.clone(), "list.html", minijinja::context! {}).await?;
/// let again = icache::minijinja::render_async(env.clone(), "list.html", minijinja::context! {}).await?;
/// assert_eq!(first, again);
/// assert_eq!(queries.load(Ordering::SeqCst), 1, "a hit skips the query");
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// The template's error (unknown template, an error inside a block…).
pub async fn render_async(
    env: Arc<Environment<'static>>,
    name: &str,
    ctx: Value,
) -> Result<String, Error> {
    let render = {
        let name = name.to_owned();
        // The blocks rendered on the blocking thread report to the caller's
        // observation and enclosing async block.
        let scope = crate::Scope::current();
        move || scope.run(|| env.get_template(&name)?.render(ctx))
    };
    let name = name.to_owned();
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => match handle.spawn_blocking(render).await {
            Ok(out) => out,
            // A panic while rendering resumes here, as it would inline.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("the render of {name:?} did not finish: {e}"),
            )),
        },
        Err(_) => render(),
    }
}

/// Wraps a loader so that every template it loads is passed through
/// [`rewrite()`]: the seed's `{% icache %}` syntax works in template files.
///
/// ```
/// # fn main() -> Result<(), minijinja::Error> {
/// let mut env = minijinja::Environment::new();
/// icache::minijinja::register(&mut env, icache::ICache::memory());
/// env.set_loader(icache::minijinja::loader(|name: &str| {
///     Ok((name == "page.html").then(|| "{% icache 'movies' %}hi{% endicache %}".to_string()))
/// }));
/// assert_eq!(env.get_template("page.html")?.render(())?, "hi");
/// # Ok(()) }
/// ```
pub fn loader<F, R>(
    inner: F,
) -> impl Fn(&str) -> Result<Option<String>, Error> + Send + Sync + 'static
where
    F: Fn(&str) -> Result<Option<R>, Error> + Send + Sync + 'static,
    R: Into<minijinja::TemplateSource>,
{
    move |name| match inner(name)? {
        Some(source) => {
            let source: minijinja::TemplateSource = source.into();
            rewrite(name, source.source()).map(Some)
        }
        None => Ok(None),
    }
}
