//! Hole punching: `{% nocache %}…{% endnocache %}` (and
//! `{% call icache_nocache() %}…{% endcall %}`) inside a cached block is
//! rendered on every request, hit or miss, with the current render's values.
//!
//! # How a hole travels
//!
//! * The rewrite gives each hole an id (template, position, digest of its
//!   source) and registers the hole's source under it, in this process.
//! * While a block's body renders, `icache_nocache` does not render its body:
//!   it writes a **marker** holding this render's nonce and an index into a
//!   table kept in the render's state (index → hole id).
//! * When the body is done, its markers are taken out and the stored entry
//!   is **header + body**: the header lists each hole's byte offset in the
//!   body and its id. Nothing in the body itself marks a hole.
//! * Whenever a block's entry (a hit, or the render just stored) is written
//!   out: if it is the outermost block being rendered, each hole is rendered
//!   from its registered source with the variables visible at that block's
//!   opening tag and spliced in at its offset; if it sits inside another
//!   block's body, markers go back in (with the current nonce), so the outer
//!   block stores the holes in its own header and fills them on its hits.
//!
//! # Why a user value can never become a hole
//!
//! Stored content is data, and data holds user text. So:
//!
//! * The marker carries a 128-bit random nonce made for this render, never
//!   stored, never shown to the template's values: text from data cannot
//!   hold it except by guessing it. Markers are looked for only in a body
//!   during whose render holes were met, and only markers with this nonce and
//!   an index of this render's table count; any other text is left as it is.
//! * Stored entries keep holes as offsets in a header **beside** the body,
//!   never as text in it: a hit never scans the body. A body that merely
//!   begins with text that looks like the header (a user value at the very
//!   start) is stored with an explicit empty header, so it is read back as
//!   text with no holes.
//! * A header names holes by id, and an id is only ever looked up in the
//!   sources this process's rewrite registered: even a forged entry (someone
//!   who can write to the cache server) can only make the application render
//!   its own hole templates, never template text taken from the store.
//!
//! # Cost
//!
//! A body with no hole is stored and served as before: one comparison of its
//! first bytes with the header on a hit, no scan. A hole costs a compile and
//! render of its (small) source on every request that shows it.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};

use minijinja::value::Value;
use minijinja::{Error, ErrorKind, State};

/// The first bytes of a stored body that has holes (or that had to be
/// protected from looking as if it had).
pub(super) const HEADER: &str = "\u{0}icache-holes:1\u{0}";

/// The markers' delimiters: control characters that escaping, `upper` and
/// `lower` leave alone, so a marker survives the filters around a hole.
const OPEN: char = '\u{1e}';
const CLOSE: char = '\u{1f}';

/// Hole sources registered by the rewrite, by id; bounded by bytes (a hole
/// whose source was evicted makes its block render fresh, never wrong).
static SOURCES: LazyLock<quick_cache::sync::Cache<Arc<str>, Arc<str>, SourceBytes>> =
    LazyLock::new(|| quick_cache::sync::Cache::with_weighter(4096, 64 * 1024 * 1024, SourceBytes));

#[derive(Clone)]
struct SourceBytes;

impl quick_cache::Weighter<Arc<str>, Arc<str>> for SourceBytes {
    fn weight(&self, id: &Arc<str>, src: &Arc<str>) -> u64 {
        (id.len() + src.len() + 64) as u64
    }
}

/// Called by the rewrite for each hole.
pub(super) fn register(id: &str, source: &str) {
    // Rendered as a template of its own, the source would lose a final
    // newline (MiniJinja drops one unless told to keep it); inside its
    // template it keeps it. An empty comment after it keeps it either way.
    let source: Arc<str> = if source.ends_with('\n') {
        format!("{source}{{# #}}").into()
    } else {
        source.into()
    };
    SOURCES.insert(id.into(), source);
}

fn source(id: &str) -> Option<Arc<str>> {
    SOURCES.get(id)
}

/// What one render keeps about holes (part of the render's block state).
#[derive(Default)]
pub(super) struct Holes {
    /// Blocks whose bodies are rendering in this render: a hole met with
    /// none open is plain text, rendered where it stands.
    pub(super) depth: Cell<usize>,
    nonce: Cell<Option<u128>>,
    /// Marker index → hole id.
    table: RefCell<Vec<Arc<str>>>,
}

impl Holes {
    /// Holes met so far in this render.
    pub(super) fn count(&self) -> usize {
        self.table.borrow().len()
    }

    fn nonce(&self) -> u128 {
        match self.nonce.get() {
            Some(n) => n,
            None => {
                let n = rand::random::<u128>();
                self.nonce.set(Some(n));
                n
            }
        }
    }

    /// The marker for hole `id`, to write where the hole is.
    pub(super) fn marker(&self, id: Arc<str>) -> String {
        let nonce = self.nonce();
        let mut table = self.table.borrow_mut();
        table.push(id);
        format!("{OPEN}{nonce}.{}{CLOSE}", table.len() - 1)
    }

    /// The stored form of a body rendered in this render. Markers are looked
    /// for only if holes were met while it rendered (`since` < count).
    pub(super) fn store_form(&self, body: String, since: usize) -> String {
        if self.count() <= since {
            return protect(body);
        }
        let Some(nonce) = self.nonce.get() else {
            return protect(body);
        };
        let table = self.table.borrow();
        let mut holes: Vec<(usize, &str)> = Vec::new();
        let mut out = String::with_capacity(body.len());
        let mut rest = body.as_str();
        while let Some(at) = rest.find(OPEN) {
            out.push_str(&rest[..at]);
            let after = &rest[at + OPEN.len_utf8()..];
            let parsed = after.split_once(CLOSE).and_then(|(inside, tail)| {
                let (n, i) = inside.split_once('.')?;
                let (n, i): (u128, usize) = (n.parse().ok()?, i.parse().ok()?);
                (n == nonce && i >= since).then_some(())?;
                Some((table.get(i)?, tail))
            });
            match parsed {
                Some((id, tail)) => {
                    holes.push((out.len(), id));
                    rest = tail;
                }
                None => {
                    // Not one of this render's markers: text.
                    out.push(OPEN);
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        encode(&holes, &out)
    }
}

/// A body with no hole, as stored: as it is, unless it begins like a header.
fn protect(body: String) -> String {
    if body.starts_with(HEADER) {
        encode(&[], &body)
    } else {
        body
    }
}

/// `HEADER`, the hole count, `offset:id-length:id` per hole, `\0`, body.
fn encode(holes: &[(usize, &str)], body: &str) -> String {
    let mut out = String::with_capacity(HEADER.len() + 16 + body.len() + holes.len() * 64);
    out.push_str(HEADER);
    let _ = write!(out, "{}\u{0}", holes.len());
    for (at, id) in holes {
        let _ = write!(out, "{at}:{}:{id}", id.len());
    }
    out.push('\u{0}');
    out.push_str(body);
    out
}

/// A stored body with a header: its holes (offset, id) and its text. `None`
/// for anything malformed (foreign or corrupt bytes: rendered fresh).
pub(super) fn decode(stored: &str) -> Option<(Vec<(usize, &str)>, &str)> {
    let rest = stored.strip_prefix(HEADER)?;
    let (count, mut rest) = rest.split_once('\u{0}')?;
    let count: usize = count.parse().ok()?;
    let mut holes = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let (at, tail) = rest.split_once(':')?;
        let (len, tail) = tail.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let id = tail.get(..len)?;
        holes.push((at.parse().ok()?, id));
        rest = tail.get(len..)?;
    }
    let body = rest.strip_prefix('\u{0}')?;
    let mut last = 0;
    for &(at, _) in &holes {
        if at < last || !body.is_char_boundary(at) {
            return None;
        }
        last = at;
    }
    Some((holes, body))
}

/// Writes a decoded body out: holes rendered (the outermost block) or as
/// markers again (a block inside another block's body). `None` if a hole's
/// source is unknown here (the block then renders fresh).
pub(super) fn write_out(
    state: &State,
    holes_state: &Holes,
    holes: &[(usize, &str)],
    body: &str,
) -> Result<Option<String>, Error> {
    let nested = holes_state.depth.get() > 0;
    let mut out = String::with_capacity(body.len() + 64 * holes.len());
    let mut pos = 0;
    let mut ctx = None;
    // One hole met many times (in a loop inside the block) sees the same
    // variables each time, so it is rendered once per write-out.
    let mut rendered: Vec<(&str, String)> = Vec::new();
    for &(at, id) in holes {
        out.push_str(&body[pos..at]);
        pos = at;
        let Some(src) = source(id) else {
            return Ok(None);
        };
        if nested {
            out.push_str(&holes_state.marker(id.into()));
        } else if let Some((_, html)) = rendered.iter().find(|(seen, _)| *seen == id) {
            out.push_str(html);
        } else {
            let ctx = ctx.get_or_insert_with(|| context(state));
            let html = render(state, template_of(id), &src, ctx.clone())?;
            out.push_str(&html);
            rendered.push((id, html));
        }
    }
    out.push_str(&body[pos..]);
    Ok(Some(out))
}

/// The variables visible where the block opens, as a render context: the
/// template's context, globals, imports and variables set around the block.
fn context(state: &State) -> Value {
    let vars: BTreeMap<String, Value> = state
        .known_variables()
        .into_iter()
        .filter_map(|name| {
            let value = state.lookup(&name)?;
            Some((name.into_owned(), value))
        })
        .collect();
    Value::from(vars)
}

/// The template a hole was written in, from its id (`name:line:col:digest`;
/// the name may hold `:` itself).
fn template_of(id: &str) -> &str {
    let mut parts = id.rsplitn(4, ':');
    parts.nth(3).unwrap_or(id)
}

/// Renders a hole's source under the name of the template it was written
/// in (an included template's, say), so that its auto-escape mode and
/// relative includes are that template's.
fn render(state: &State, template: &str, src: &str, ctx: Value) -> Result<String, Error> {
    state
        .env()
        .render_named_str(template, src, ctx)
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("in a {{% nocache %}} section of {template:?}"),
            )
            .with_source(e)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_garbage() {
        let s = encode(&[(0, "a:1"), (3, "b"), (3, "c")], "xyz<p>");
        let (holes, body) = decode(&s).expect("decodes");
        assert_eq!(holes, vec![(0, "a:1"), (3, "b"), (3, "c")]);
        assert_eq!(body, "xyz<p>");
        for bad in [
            HEADER.to_string(),
            format!("{HEADER}1\u{0}"),
            format!("{HEADER}1\u{0}9:1:a\u{0}xy"),
            format!("{HEADER}2\u{0}1:1:a0:1:b\u{0}xy"),
            format!("{HEADER}1\u{0}1:99:a\u{0}xy"),
            format!("{HEADER}x\u{0}"),
            format!("{HEADER}1\u{0}1:1:é\u{0}éé"),
        ] {
            assert!(decode(&bad).is_none(), "{bad:?}");
        }
        // A body that only looks like a header is kept as text.
        let looks = format!("{HEADER}1\u{0}0:1:a\u{0}x");
        let stored = protect(looks.clone());
        assert_eq!(decode(&stored), Some((vec![], looks.as_str())));
        assert_eq!(protect("plain".into()), "plain");
    }

    #[test]
    fn hole_ids_name_their_template() {
        assert_eq!(template_of("a:b.html:3:5:0123"), "a:b.html");
        assert_eq!(template_of("odd"), "odd");
    }

    #[test]
    fn only_this_renders_markers_are_holes() {
        let h = Holes::default();
        let m = h.marker("id".into());
        let other = m.replace(&h.nonce().to_string(), "12345");
        let body = format!("a{m}b{other}c\u{1e}\u{1f}\u{1e}");
        let stored = h.store_form(body, 0);
        let (holes, text) = decode(&stored).expect("decodes");
        assert_eq!(holes, vec![(1, "id")]);
        assert_eq!(text, format!("ab{other}c\u{1e}\u{1f}\u{1e}"));
        // No hole met since: stored as it is, markers or not.
        assert_eq!(h.store_form(format!("x{m}"), 1), format!("x{m}"));
    }
}
