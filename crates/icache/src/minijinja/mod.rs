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

fn register_with(env: &mut Environment<'_>, cache: ICache, strict: bool) {
    let shared = SafeValues::new();
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
            let html = cache.block_html(&identity, &tokens, || {
                caller.call(state, &[]).map(|v| match v.as_str() {
                    Some(s) => s.to_owned(),
                    None => v.to_string(),
                })
            })?;
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
