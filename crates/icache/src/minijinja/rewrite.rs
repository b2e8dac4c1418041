//! The source rewrite that turns the seed's `{% load icache %}` /
//! `{% icache … %}…{% endicache %}` syntax into MiniJinja call blocks.
//!
//! MiniJinja has no custom tags, so the seed's syntax cannot be parsed by it;
//! instead the template's text is edited before MiniJinja sees it. To edit
//! only real tags, the scan below follows MiniJinja's own lexer (default
//! delimiters): `{% raw %}` sections, `{# comments #}` and string literals
//! inside `{{ … }}` and `{% … %}` are skipped exactly as MiniJinja skips
//! them, so text that merely looks like a tag is never touched.

use std::fmt::Write as _;

use minijinja::{Error, ErrorKind};

use super::{BLOCK_KW, HOLE_KW, LOOP_KW};
use crate::keys::sha256_hex;

/// Rewrites the seed's syntax into MiniJinja call blocks:
///
/// ```text
/// {% load icache %}                                   → (removed)
/// {% icache 'movies' user.id %}…{% endicache %}       → {% call icache('movies', (user.id), __icache_block="…") %}…{% endcall %}
/// ```
///
/// Each argument is a token: a quoted literal, or any template expression
/// whose value (as a string) becomes the token. A token ends where one
/// complete expression ends, by MiniJinja's expression grammar, so
/// `{% icache 'items' 'user:' ~ user.id user.name | upper %}` has three
/// tokens (whitespace around operators, `~`, filters, tests, `in`,
/// `and`/`or` and a ternary `if … else` is not a separator). Adjacent string
/// literals stay separate tokens, and a bracket after whitespace starts a
/// new one (`'a' (b)` is two tokens). `name='…'` and `stale=true` (serve
/// the previous body while another render holds the lease) are options, as
/// in the call-block form. Each block gets its identity
/// (template, line, column, digest of its source); hand-written
/// `{% call icache(…) %}` blocks get one too. Lines are kept, so template
/// errors point at the right line. `{% raw %}` sections, comments and string
/// literals are left alone. Templates are read with MiniJinja's default
/// delimiters (`{% %}`, `{{ }}`, `{# #}`).
///
/// # Errors
///
/// A syntax error naming the template, the line and the user's own text for
/// a token that is not a valid expression (`'user:' ~`, checked by
/// MiniJinja's parser before the rewritten template exists), an unclosed
/// `{% icache %}`, a stray `{% endicache %}`, an unterminated quoted token or
/// an unterminated tag. Never panics, whatever the input.
///
/// ```
/// let err = icache::minijinja::rewrite("page.html", "\n{% icache 'a %}x{% endicache %}").unwrap_err();
/// assert!(err.to_string().contains("page.html line 2"), "{err}");
/// ```
pub fn rewrite(name: &str, source: &str) -> Result<String, Error> {
    Rewriter::new(name, source, Target::MiniJinja).run()
}

/// The seed's syntax for Tera: each block becomes a lookup, a hit branch and
/// a `{% filter %}` section that stores the body (see `crate::tera`).
/// Hand-written `{% call icache %}` blocks are MiniJinja's and left alone.
#[cfg(feature = "tera")]
pub(crate) fn rewrite_for_tera(name: &str, source: &str) -> Result<String, Error> {
    Rewriter::new(name, source, Target::Tera).run()
}

/// Which engine the rewrite writes for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    MiniJinja,
    #[cfg(feature = "tera")]
    Tera,
}

/// One `{% … %}` tag found in the source (never a `raw`/`endraw` one).
struct Tag<'a> {
    /// Byte range of the whole tag, `{%` to `%}`.
    start: usize,
    end: usize,
    /// `{%-` / `{%+` and `-%}` / `+%}` markers, kept as they were.
    open_mark: &'a str,
    close_mark: &'a str,
    /// The text between the markers, trimmed.
    body: &'a str,
}

/// Why a scan stopped: where the construct began, and what is wrong.
type ScanError = (usize, &'static str);

/// Walks a template's tags the way MiniJinja's lexer does, skipping
/// everything that is not a tag: text, `{{ … }}`, `{# … #}` and whole
/// `{% raw %}…{% endraw %}` sections.
struct Scanner<'a> {
    src: &'a str,
    pos: usize,
}

/// A whitespace-control marker (`-` or `+`) at `i`, as MiniJinja reads one
/// right after `{%`, `{{` or `{#`.
fn ws_mark(bytes: &[u8], i: usize) -> usize {
    usize::from(matches!(bytes.get(i), Some(b'-' | b'+')))
}

/// If `s` starts with `[-+]? ws* word ws* [-+]? %}` (the `skip_ws_control`
/// flag allows the leading marker), the length of that prefix: MiniJinja's
/// test for `raw` and `endraw` tags, which are recognised by their text alone.
fn basic_tag(s: &str, word: &str, skip_ws_control: bool) -> Option<usize> {
    let mut rest = s;
    if skip_ws_control {
        rest = rest.strip_prefix(['-', '+']).unwrap_or(rest);
    }
    rest = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
    rest = rest.strip_prefix(word)?;
    rest = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
    rest = rest.strip_prefix(['-', '+']).unwrap_or(rest);
    rest.starts_with("%}").then(|| s.len() - rest.len() + 2)
}

impl<'a> Scanner<'a> {
    /// Finds the end of a `{{ … }}` or `{% … %}` whose inside starts at
    /// `from`: the first `close` (or `-close`, `+close`) outside string
    /// literals and outside brackets, as MiniJinja's lexer ends them.
    /// Returns where the end marker (with its `-`/`+`) starts and ends.
    fn construct_end(&self, from: usize, close: &str) -> Option<(usize, usize)> {
        let bytes = self.src.as_bytes();
        let close = close.as_bytes();
        let mut depth: isize = 0;
        let mut i = from;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'\'' | b'"' => {
                    // A string literal: a backslash escapes the next byte
                    // (always ASCII for the escapes that matter: `\'`, `\"`,
                    // `\\`), the same quote ends it.
                    i += 1;
                    loop {
                        match bytes.get(i) {
                            None => return None,
                            Some(b'\\') => i += 2,
                            Some(&c) if c == b => break,
                            Some(_) => i += 1,
                        }
                    }
                }
                _ if depth == 0 && bytes[i..].starts_with(close) => {
                    return Some((i, i + close.len()));
                }
                b'-' | b'+' if depth == 0 && bytes[i + 1..].starts_with(close) => {
                    return Some((i, i + 1 + close.len()));
                }
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                _ => {}
            }
            i += 1;
        }
        None
    }

    /// The next tag other than `raw`/`endraw`, or `None` at the end.
    fn next_tag(&mut self) -> Result<Option<Tag<'a>>, ScanError> {
        let src: &'a str = self.src;
        let bytes = src.as_bytes();
        loop {
            let Some(off) = src[self.pos..].find('{') else {
                self.pos = src.len();
                return Ok(None);
            };
            let at = self.pos + off;
            match bytes.get(at + 1) {
                Some(b'#') => {
                    // MiniJinja ends a comment at the first `#}`, whatever
                    // is inside.
                    let end = src[at + 2..]
                        .find("#}")
                        .ok_or((at, "unterminated comment: no '#}' before the end"))?;
                    self.pos = at + 2 + end + 2;
                }
                Some(b'{') => {
                    let from = at + 2 + ws_mark(bytes, at + 2);
                    let (_, end) = self
                        .construct_end(from, "}}")
                        .ok_or((at, "unterminated expression: no '}}' before the end"))?;
                    self.pos = end;
                }
                Some(b'%') => {
                    let mark = ws_mark(bytes, at + 2);
                    let from = at + 2 + mark;
                    if let Some(len) = basic_tag(&src[from..], "raw", false) {
                        self.pos = self.skip_raw(at, from + len)?;
                        continue;
                    }
                    let (close_at, end) = self
                        .construct_end(from, "%}")
                        .ok_or((at, "unterminated tag: no '%}' before the end"))?;
                    self.pos = end;
                    let close_mark = &src[close_at..end - 2];
                    return Ok(Some(Tag {
                        start: at,
                        end,
                        open_mark: &src[at + 2..from],
                        close_mark,
                        body: src[from..close_at].trim(),
                    }));
                }
                _ => self.pos = at + 1,
            }
        }
    }

    /// Skips a raw section whose content starts at `from`; returns the end
    /// of its `{% endraw %}`. As in MiniJinja, the content is not lexed at
    /// all: the first `{%` that reads as `endraw` ends it.
    fn skip_raw(&self, at: usize, from: usize) -> Result<usize, ScanError> {
        let mut p = from;
        while let Some(off) = self.src[p..].find("{%") {
            let inner = p + off + 2;
            if let Some(len) = basic_tag(&self.src[inner..], "endraw", true) {
                return Ok(inner + len);
            }
            p = inner;
        }
        Err((at, "unclosed {% raw %}: no {% endraw %} before the end"))
    }
}

/// `s` as a MiniJinja string literal. MiniJinja knows `\\`, `\"`, `\n`… and
/// `\uXXXX` (not Rust's `\u{…}`): quotes and backslashes are escaped, control
/// characters (newlines included, so the template keeps its line count)
/// become `\uXXXX`, and everything else, non-ASCII included, is written as is.
fn string_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            // Control characters are all below U+00A0: four hex digits suffice.
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A tag's text for an error message, shortened if long.
fn shown(tag: &str) -> String {
    let tag = tag.split_whitespace().collect::<Vec<_>>().join(" ");
    match tag.char_indices().nth(120) {
        Some((cut, _)) => format!("`{}…`", &tag[..cut]),
        None => format!("`{tag}`"),
    }
}

/// What to put in place of a byte range of the source.
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

struct OpenBlock {
    /// Edit index of the opening tag (its text is completed at the close).
    edit: usize,
    body_start: usize,
    line: usize,
    col: usize,
    /// `{% icache %}` (true) or a hand-written `{% call icache(…) %}`.
    seed_form: bool,
    args: String,
    open_mark: String,
    close_mark: String,
    /// Loop variables and macro arguments in scope that its tokens do not
    /// mention: named in the warning when the block is met twice in one
    /// render with the same tokens.
    unused_scope: Vec<String>,
    /// Names bound inside its body (loops, macros, `{% set %}`): a hole in
    /// it cannot see them (it sees what the block's opening sees).
    inner_names: Vec<String>,
}

/// What an open `{% call %}` is, so its `{% endcall %}` closes the right thing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CallKind {
    /// Not ours.
    Other,
    /// `{% call icache(…) %}`.
    Block,
    /// `{% call icache_nocache() %}`.
    Hole,
}

/// An open `{% nocache %}` (or `{% call icache_nocache() %}`).
struct OpenHole {
    edit: usize,
    body_start: usize,
    line: usize,
    col: usize,
    seed_form: bool,
    open_mark: String,
    close_mark: String,
}

/// A `{% for %}` or `{% macro %}` around the current position, and the
/// names it binds.
struct Scope {
    macro_: bool,
    names: Vec<String>,
}

struct Rewriter<'a> {
    name: &'a str,
    src: &'a str,
    edits: Vec<Edit>,
    target: Target,
    scopes: Vec<Scope>,
}

/// The identifiers in `text` (words of letters, digits and `_` not starting
/// with a digit).
fn identifiers(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| {
            w.chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
        })
}

/// The insides of the `{{ … }}` and `{% … %}` in `body` (roughly: for a
/// warning about the names they use, not for rewriting).
fn template_code(body: &str) -> impl Iterator<Item = &str> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let at = rest.find("{{").into_iter().chain(rest.find("{%")).min()?;
        let close = if rest[at..].starts_with("{{") {
            "}}"
        } else {
            "%}"
        };
        let inside = &rest[at + 2..];
        let end = inside.find(close).unwrap_or(inside.len());
        rest = &inside[end..];
        Some(&inside[..end])
    })
}

/// The names a `{% for … in … %}` binds (`item`, or `k, v`).
fn for_targets(args: &str) -> Vec<String> {
    let target = args
        .split_whitespace()
        .take_while(|w| *w != "in")
        .collect::<Vec<_>>()
        .join(" ");
    identifiers(&target).map(str::to_owned).collect()
}

/// The arguments a `{% macro name(a, b=1) %}` binds.
fn macro_args(args: &str) -> Vec<String> {
    let Some((_, inside)) = args.split_once('(') else {
        return Vec::new();
    };
    inside
        .split(',')
        .filter_map(|a| {
            let name = a
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .trim_end_matches(')')
                .trim();
            (!name.is_empty() && identifiers(name).next() == Some(name)).then(|| name.to_owned())
        })
        .collect()
}

fn syntax(name: &str, line: usize, msg: &str) -> Error {
    Error::new(ErrorKind::SyntaxError, format!("{name} line {line}: {msg}"))
}

impl<'a> Rewriter<'a> {
    fn new(name: &'a str, src: &'a str, target: Target) -> Self {
        Rewriter {
            name,
            src,
            edits: Vec::new(),
            target,
            scopes: Vec::new(),
        }
    }

    fn line_col(&self, pos: usize) -> (usize, usize) {
        let before = &self.src.as_bytes()[..pos.min(self.src.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        (line, col)
    }

    fn err(&self, pos: usize, msg: &str) -> Error {
        syntax(self.name, self.line_col(pos).0, msg)
    }

    fn run(mut self) -> Result<String, Error> {
        let mut stack: Vec<OpenBlock> = Vec::new();
        // Every open `call` (ours or not), so `endcall` closes the right one.
        let mut calls: Vec<CallKind> = Vec::new();
        // The open `{% nocache %}` section (they do not nest).
        let mut hole: Option<OpenHole> = None;
        let mut scanner = Scanner {
            src: self.src,
            pos: 0,
        };
        loop {
            let tag = match scanner.next_tag() {
                Ok(Some(tag)) => tag,
                Ok(None) => break,
                Err((at, msg)) => return Err(self.err(at, msg)),
            };
            let at = tag.start;
            let (word, args) = match tag.body.find(|c: char| c.is_whitespace() || c == '(') {
                Some(i) => (&tag.body[..i], tag.body[i..].trim()),
                None => (tag.body, ""),
            };
            if let Some(open) = &hole {
                let inside = match word {
                    "icache" | "endicache" | "nocache" => true,
                    "call" => {
                        let call = tag.body["call".len()..].trim_start();
                        call.starts_with("icache(") || call.starts_with("icache_nocache(")
                    }
                    _ => false,
                };
                if inside {
                    return Err(self.err(
                        at,
                        &format!(
                            "{} inside the {{% nocache %}} section opened on line {}: a section that \
                             renders on every request cannot hold cached blocks or other sections",
                            shown(&self.src[tag.start..tag.end]),
                            open.line
                        ),
                    ));
                }
            }
            match word {
                "nocache" | "endnocache" if self.target != Target::MiniJinja => {
                    return Err(self.err(
                        at,
                        "{% nocache %} is for MiniJinja templates: in Tera, render per-request parts \
                         outside the block or fill a placeholder after the render (see the README, \
                         \"Per-request parts\")",
                    ));
                }
                "nocache" => {
                    if !args.is_empty() {
                        return Err(self.err(at, "{% nocache %} takes no arguments"));
                    }
                    hole = Some(self.open_hole(&tag, true));
                }
                "endnocache" => {
                    let Some(open) = hole.take().filter(|h| h.seed_form) else {
                        return Err(self.err(at, "{% endnocache %} without an open {% nocache %}"));
                    };
                    let inner = stack
                        .first()
                        .map(|b| b.inner_names.clone())
                        .unwrap_or_default();
                    self.close_hole(open, &tag, &inner);
                }
                "load" if args.split_whitespace().any(|a| a == "icache") => {
                    let others: Vec<&str> =
                        args.split_whitespace().filter(|a| *a != "icache").collect();
                    if !others.is_empty() {
                        return Err(self.err(
                            at,
                            &format!("unknown tag library {:?} in {{% load %}}", others.join(" ")),
                        ));
                    }
                    let newlines = self.src[tag.start..tag.end].matches('\n').count();
                    self.edits.push(Edit {
                        start: tag.start,
                        end: tag.end,
                        // Lines are kept, so errors still point at the right one.
                        text: if newlines == 0 {
                            String::new()
                        } else {
                            format!("{{#{}#}}", "\n".repeat(newlines))
                        },
                    });
                }
                "icache" => {
                    let args = self.seed_args(args, &tag)?;
                    self.open(&mut stack, &tag, args, true);
                }
                "endicache" => {
                    let Some(open) = stack.pop() else {
                        return Err(self.err(at, "{% endicache %} without an open {% icache %}"));
                    };
                    if !open.seed_form {
                        return Err(self.err(
                            at,
                            "{% endicache %} closes a {% call icache %}: use {% endcall %}",
                        ));
                    }
                    if calls.last().is_some_and(|c| *c != CallKind::Block) {
                        return Err(self.err(at, "{% endicache %} before the {% endcall %} of a call block opened inside it"));
                    }
                    self.close(open, &tag, "endcall");
                }
                "call" => {
                    let call = tag.body["call".len()..].trim_start();
                    if self.target != Target::MiniJinja {
                        calls.push(CallKind::Other);
                    } else if let Some(inner) = call.strip_prefix("icache(") {
                        let inner = inner.trim_end();
                        let Some(args) = inner.strip_suffix(')') else {
                            return Err(self.err(at, "cannot read the arguments of call icache(…)"));
                        };
                        // Checked here so that a bad argument is reported
                        // with the user's text, not the rewritten call's.
                        if let Err(detail) = self.check_expression(&format!("icache({args})")) {
                            return Err(self.err(
                                at,
                                &format!(
                                    "bad arguments in {}: {detail}",
                                    shown(&self.src[tag.start..tag.end])
                                ),
                            ));
                        }
                        calls.push(CallKind::Block);
                        self.open(&mut stack, &tag, args.trim().to_string(), false);
                    } else if let Some(inner) = call.strip_prefix("icache_nocache(") {
                        if inner.trim_end().strip_suffix(')').map(str::trim) != Some("") {
                            return Err(self.err(at, "icache_nocache() takes no arguments"));
                        }
                        calls.push(CallKind::Hole);
                        hole = Some(self.open_hole(&tag, false));
                    } else {
                        calls.push(CallKind::Other);
                    }
                }
                "endcall" => match calls.pop() {
                    Some(CallKind::Hole) => {
                        if let Some(open) = hole.take() {
                            let inner = stack
                                .first()
                                .map(|b| b.inner_names.clone())
                                .unwrap_or_default();
                            self.close_hole(open, &tag, &inner);
                        }
                    }
                    Some(CallKind::Block) => {
                        let Some(open) = stack.pop() else {
                            return Err(self.err(at, "unbalanced {% endcall %}"));
                        };
                        if open.seed_form {
                            return Err(self.err(
                                at,
                                "{% endcall %} closes an {% icache %}: use {% endicache %}",
                            ));
                        }
                        self.close(open, &tag, "endcall");
                    }
                    _ => {}
                },
                "for" | "macro" => {
                    let macro_ = word == "macro";
                    let names = if macro_ {
                        macro_args(args)
                    } else {
                        for_targets(args)
                    };
                    if let Some(outer) = stack.first_mut() {
                        outer.inner_names.extend(names.iter().cloned());
                    }
                    self.scopes.push(Scope { macro_, names });
                }
                "set" => {
                    if let Some(outer) = stack.first_mut() {
                        let target = args.split_once('=').map_or(args, |(t, _)| t);
                        outer
                            .inner_names
                            .extend(identifiers(target).map(str::to_owned));
                    }
                }
                // An unbalanced end tag is MiniJinja's to report.
                "endfor" if self.scopes.last().is_some_and(|s| !s.macro_) => {
                    self.scopes.pop();
                }
                "endmacro" if self.scopes.last().is_some_and(|s| s.macro_) => {
                    self.scopes.pop();
                }
                _ => {}
            }
        }
        if let Some(open) = hole {
            return Err(syntax(
                self.name,
                open.line,
                "unclosed {% nocache %} section: no matching end tag before the end of the template",
            ));
        }
        if let Some(open) = stack.first() {
            let what = if open.seed_form {
                "{% icache %}"
            } else {
                "{% call icache %}"
            };
            let (start, end) = (self.edits[open.edit].start, self.edits[open.edit].end);
            return Err(syntax(
                self.name,
                open.line,
                &format!(
                    "unclosed {what} block {}: no matching end tag before the end of the template",
                    shown(&self.src[start..end])
                ),
            ));
        }
        Ok(self.apply())
    }

    /// Splits `{% icache %}` arguments into one expression per token
    /// (see [`args`](super::args)), each checked by the engine's own parser
    /// so that a bad one is reported with the user's line and text.
    fn seed_args(&self, args: &str, tag: &Tag<'_>) -> Result<String, Error> {
        // `args` is a slice of the source: errors point at its own line.
        let base = (args.as_ptr() as usize).saturating_sub(self.src.as_ptr() as usize);
        let shown = shown(&self.src[tag.start..tag.end]);
        let pieces = super::args::split(args)
            .map_err(|(at, msg)| self.err(base + at, &format!("{msg} in {shown}")))?;
        let mut positional = Vec::new();
        let mut keywords = Vec::new();
        for arg in pieces {
            if let Err(detail) = self.check_expression(arg.text) {
                return Err(self.err(
                    base + arg.at,
                    &format!("bad token expression `{}` in {shown}: {detail}", arg.text),
                ));
            }
            match arg.keyword {
                Some(kw @ ("name" | "stale")) if self.target == Target::MiniJinja => {
                    keywords.push(format!("{kw}=({})", arg.text));
                }
                Some(other) => {
                    let known = if self.target == Target::MiniJinja {
                        "the options are name= and stale="
                    } else {
                        "Tera blocks take no options (their position identifies them)"
                    };
                    return Err(self.err(
                        base + arg.at,
                        &format!("unknown option `{other}=` in {shown}: {known}"),
                    ));
                }
                None if arg.literal => positional.push(arg.text.to_owned()),
                None => positional.push(format!("({})", arg.text)),
            }
        }
        // Keywords go last, as MiniJinja requires, wherever they were written.
        positional.extend(keywords);
        Ok(positional.join(", "))
    }

    /// Does the engine's own parser accept `expr`? Its message if not.
    fn check_expression(&self, expr: &str) -> Result<(), String> {
        match self.target {
            Target::MiniJinja => {
                static PARSER: std::sync::LazyLock<minijinja::Environment<'static>> =
                    std::sync::LazyLock::new(minijinja::Environment::new);
                PARSER
                    .compile_expression(expr)
                    .map(|_| ())
                    .map_err(|e| e.detail().map_or_else(|| e.to_string(), str::to_owned))
            }
            #[cfg(feature = "tera")]
            Target::Tera => {
                let mut tera = tera::Tera::new();
                match tera.add_raw_template("token", &format!("{{{{ {expr} }}}}")) {
                    // Only the syntax is the rewrite's business: filters and
                    // functions the application registers later are unknown
                    // to this empty Tera, and Tera checks them itself.
                    Err(e) if matches!(e.kind(), tera::ErrorKind::SyntaxError(_)) => {
                        Err(e.to_string())
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    fn open_hole(&mut self, tag: &Tag<'_>, seed_form: bool) -> OpenHole {
        let (line, col) = self.line_col(tag.start);
        self.edits.push(Edit {
            start: tag.start,
            end: tag.end,
            text: String::new(),
        });
        OpenHole {
            edit: self.edits.len() - 1,
            body_start: tag.end,
            line,
            col,
            seed_form,
            open_mark: tag.open_mark.to_string(),
            close_mark: tag.close_mark.to_string(),
        }
    }

    /// A hole becomes `{% call icache_nocache(__icache_hole="id") %}…{% endcall %}`
    /// (its body stays, rendered where it stands outside cached blocks), and
    /// its source is registered under its id, to be rendered on every hit.
    fn close_hole(&mut self, open: OpenHole, tag: &Tag<'_>, inner_names: &[String]) {
        let body = &self.src[open.body_start..tag.start];
        let mut unseen: Vec<&str> = template_code(body)
            .flat_map(identifiers)
            .filter(|w| inner_names.iter().any(|n| n == w))
            .collect();
        unseen.sort_unstable();
        unseen.dedup();
        if !unseen.is_empty() {
            // Not an error: the name may also be in the render's context.
            tracing::warn!(
                "icache: the {{% nocache %}} section in {:?} line {} uses {}, set inside the cached \
                 block around it (by a loop, a macro or {{% set %}}): a hole sees only what that \
                 block's opening tag sees, because a hit does not run the block's body, so there \
                 it is the render's value or undefined, on hits and misses alike. Open the cached \
                 block inside the loop, or pass the value in the render's context",
                self.name,
                open.line,
                unseen.join(", ")
            );
        }
        let digest = sha256_hex(body.as_bytes());
        let id = format!("{}:{}:{}:{}", self.name, open.line, open.col, &digest[..16]);
        // Whitespace control on the tags around the body trims it where it
        // stands; the registered source is trimmed the same way.
        let mut source = body;
        if open.close_mark == "-" {
            source = source.trim_start();
        }
        if tag.open_mark == "-" {
            source = source.trim_end();
        }
        super::holes::register(&id, source);
        let open_src = &self.src[self.edits[open.edit].start..self.edits[open.edit].end];
        let missing = "\n".repeat(open_src.matches('\n').count());
        self.edits[open.edit].text = format!(
            "{{%{} call icache_nocache({HOLE_KW}={}){missing} {}%}}",
            open.open_mark,
            string_literal(&id),
            open.close_mark
        );
        if open.seed_form {
            self.replace_close(tag, |newlines| format!("endcall{newlines} "));
        }
    }

    fn open(&mut self, stack: &mut Vec<OpenBlock>, tag: &Tag<'_>, args: String, seed_form: bool) {
        let (line, col) = self.line_col(tag.start);
        let mentioned: Vec<&str> = identifiers(&args).collect();
        let unused_scope = self
            .scopes
            .iter()
            .flat_map(|s| &s.names)
            .filter(|n| !mentioned.contains(&n.as_str()))
            .cloned()
            .collect();
        self.edits.push(Edit {
            start: tag.start,
            end: tag.end,
            text: String::new(),
        });
        stack.push(OpenBlock {
            edit: self.edits.len() - 1,
            body_start: tag.end,
            line,
            col,
            seed_form,
            args,
            open_mark: tag.open_mark.to_string(),
            close_mark: tag.close_mark.to_string(),
            unused_scope,
            inner_names: Vec::new(),
        });
    }

    fn close(&mut self, open: OpenBlock, tag: &Tag<'_>, end_word: &str) {
        let body = &self.src[open.body_start..tag.start];
        let digest = sha256_hex(body.as_bytes());
        #[cfg(feature = "tera")]
        if self.target == Target::Tera {
            return self.close_for_tera(open, tag, &digest);
        }
        let id = format!("{}:{}:{}:{}", self.name, open.line, open.col, &digest[..16]);
        // The template name is anyone's text (non-ASCII, quotes, newlines):
        // escaped for MiniJinja, it cannot break the tag or add lines.
        let id = string_literal(&id);
        let sep = if open.args.trim().is_empty() {
            ""
        } else {
            ", "
        };
        let missing = self.missing_newlines(&open);
        let scope = if open.unused_scope.is_empty() {
            String::new()
        } else {
            format!(
                ", {LOOP_KW}={}",
                string_literal(&open.unused_scope.join(", "))
            )
        };
        self.edits[open.edit].text = format!(
            "{{%{} call icache({}{sep}{BLOCK_KW}={id}{scope}){missing} {}%}}",
            open.open_mark, open.args, open.close_mark
        );
        self.replace_close(tag, |newlines| format!("{end_word}{newlines} "));
    }

    /// The newlines of the opening tag that its arguments do not carry: they
    /// go back in as whitespace inside the new tag, so lines are kept.
    fn missing_newlines(&self, open: &OpenBlock) -> String {
        let open_src = &self.src[self.edits[open.edit].start..self.edits[open.edit].end];
        let missing = open_src
            .matches('\n')
            .count()
            .saturating_sub(open.args.matches('\n').count());
        "\n".repeat(missing)
    }

    /// Replaces the closing tag by `{%<mark> body(newlines) <mark>%}`, the
    /// tag's own newlines kept.
    fn replace_close(&mut self, tag: &Tag<'_>, body: impl FnOnce(&str) -> String) {
        let newlines = "\n".repeat(self.src[tag.start..tag.end].matches('\n').count());
        self.edits.push(Edit {
            start: tag.start,
            end: tag.end,
            text: format!(
                "{{%{} {}{}%}}",
                tag.open_mark,
                body(&newlines),
                tag.close_mark
            ),
        });
    }

    /// Tera has no custom tags and no call blocks: the block becomes
    /// `{% set v = icache_get(tokens=[…], block="…") %}{% if v.hit %}{{ v.html | safe }}
    /// {% else %}{% filter icache_put(ticket=v.ticket) %}…{% endfilter %}{% endif %}`,
    /// so the body is read (and its data loaded) only on a miss. The
    /// identity names the template by a digest (Tera's string literals have
    /// no escapes, and a name is anyone's text).
    #[cfg(feature = "tera")]
    fn close_for_tera(&mut self, open: OpenBlock, tag: &Tag<'_>, digest: &str) {
        let id = format!(
            "{}:{}:{}:{}",
            &sha256_hex(self.name.as_bytes())[..16],
            open.line,
            open.col,
            &digest[..16]
        );
        if open.args.trim().is_empty() {
            // Tera blocks have no per-render state to tell nested tokens
            // by: warned once, when the template is rewritten.
            tracing::warn!(
                "icache: the Tera block in {:?} line {} col {} has no tokens, so no bump can \
                 invalidate it (unless blocks inside it have tokens): give it a token for the data \
                 it shows and bump that after a change (`cache.incr(\"movies\")`, or `icache bump \
                 movies`); `cache.flush()` (or `icache flush`) makes every block miss once, and \
                 editing the block gives it a new entry",
                self.name,
                open.line,
                open.col
            );
        }
        let var = format!("__icache_{}", open.edit);
        let missing = self.missing_newlines(&open);
        self.edits[open.edit].text = format!(
            "{{%{} set {var} = icache_get(tokens=[{}], block=\"{id}\"){missing} %}}{{% if {var}.hit %}}{{{{ {var}.html | safe }}}}{{% else %}}{{% filter icache_put(ticket={var}.ticket) {}%}}",
            open.open_mark, open.args, open.close_mark
        );
        self.replace_close(tag, |newlines| format!("endfilter{newlines} %}}{{% endif "));
    }

    fn apply(mut self) -> String {
        self.edits.sort_by_key(|e| e.start);
        let mut out = String::with_capacity(self.src.len() + 64 * self.edits.len());
        let mut pos = 0;
        for e in &self.edits {
            out.push_str(&self.src[pos..e.start]);
            out.push_str(&e.text);
            pos = e.end;
        }
        out.push_str(&self.src[pos..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ICache;
    use minijinja::Environment;

    fn rw(src: &str) -> String {
        rewrite("t.html", src).expect("rewrites")
    }

    /// An environment with the `icache` function on a fresh memory cache.
    fn env_with_cache() -> (Environment<'static>, ICache) {
        let cache = ICache::memory();
        let mut env = Environment::new();
        super::super::register(&mut env, cache.clone());
        (env, cache)
    }

    #[test]
    fn seed_syntax_becomes_a_call_block() {
        let out = rw(
            "{% load icache %}{% icache 'movies-personal-rating' 'movies' user.id %}X{% endicache %}",
        );
        assert!(out.starts_with("{% call icache('movies-personal-rating', 'movies', (user.id), __icache_block=\"t.html:1:18:"), "{out}");
        assert!(out.ends_with("X{% endcall %}"), "{out}");
    }

    #[test]
    fn expression_tokens_become_one_argument_each() {
        let out =
            rw("{% icache 'items' 'user:' ~ user.id user.name | upper name='x' %}X{% endicache %}");
        assert!(
            out.starts_with("{% call icache('items', ('user:' ~ user.id), (user.name | upper), name=('x'), __icache_block="),
            "{out}"
        );
        // Filters and functions the application registers are not the
        // parser's business.
        let out = rw("{% icache x | my_filter(1) my_function() %}X{% endicache %}");
        assert!(
            out.starts_with("{% call icache((x | my_filter(1)), (my_function()), "),
            "{out}"
        );
        let err = rewrite(
            "p.html",
            "a\n{% icache 'items'\n 'user:' ~ %}x{% endicache %}",
        )
        .expect_err("incomplete")
        .to_string();
        assert!(
            err.contains("p.html line 3: bad token expression `'user:' ~` in `{% icache 'items' 'user:' ~ %}`"),
            "{err}"
        );
        assert!(err.contains("unexpected end of input"), "{err}");
    }

    #[test]
    fn whitespace_control_and_lines_are_kept() {
        let src = "a\n{%- icache x -%}\nb\n{%- endicache -%}\nc";
        let out = rw(src);
        assert!(out.contains("{%- call icache((x), "), "{out}");
        assert!(out.contains("-%}\nb\n{%- endcall -%}"), "{out}");
        assert_eq!(out.matches('\n').count(), src.matches('\n').count());
    }

    #[test]
    fn raw_and_comments_are_left_alone() {
        let src = "{% raw %}{% icache 'a' %}{% endraw %}{# {% endicache %} #}";
        assert_eq!(rw(src), src);
    }

    /// Text that only looks like a tag (inside raw sections, comments and
    /// string literals) is neither rewritten nor a reason to reject the
    /// template, and the real block after it is still cached.
    #[test]
    fn tag_lookalikes_before_a_block_are_skipped() {
        for before in [
            // Unbalanced `{%`, a stray tag and a lone quote inside raw.
            "{% raw %}{%}{% icache %}\"{% endraw %}",
            "{% raw %}{% \"{% endraw %}",
            "{% raw %}{%}'{% endraw %}",
            "{%- raw -%} {% endicache %} {%- endraw -%}",
            "{%raw%}{% endraw x %}{#{%endraw%}",
            "{# {% icache 'a' %} \" ' #}",
            "{#- {% endicache %} -#}",
            "{{ \"{% icache 'a' %}\" }}",
            "{{ '%}{% endicache %}' }}",
            "{{ \"\\\"%}\" }}",
            "{{ {'a': '}}'}['a'] }}",
            "{{ {'a': 1}}}",
            // `}}` closes the maps, not the expression: the tag is in a string.
            "{{ {'a': {'b': 1}} ~ \"{% endicache %}\" }}",
            "{% set s = \"{% endicache %}%}\" %}{{ s }}",
            "{% set d = {'k': '%}'} %}{{ d.k }}",
            "{% if ('%}' ~ \"{#\") %}yes{% endif %}",
        ] {
            let src = format!("{before}{{% icache 'x' %}}<b>{{{{ n }}}}</b>{{% endicache %}}");
            let out = rewrite("t.txt", &src).unwrap_or_else(|e| panic!("{src:?}: {e}"));
            assert!(out.starts_with(before), "{src:?} became {out:?}");
            assert!(
                out.contains("{% call icache('x', __icache_block="),
                "{out:?}"
            );

            let (mut env, cache) = env_with_cache();
            env.add_template_owned("t.txt", out)
                .unwrap_or_else(|e| panic!("{src:?}: {e}"));
            // What MiniJinja itself makes of the text before the block (both
            // names without auto-escaping).
            let mut plain = Environment::new();
            plain.add_template("before", before).expect("valid");
            let expected = format!(
                "{}<b>1</b>",
                plain
                    .get_template("before")
                    .and_then(|t| t.render(()))
                    .expect("renders")
            );
            let render = |n: i32| -> String {
                env.get_template("t.txt")
                    .and_then(|t| t.render(minijinja::context! { n }))
                    .unwrap_or_else(|e| panic!("{src:?}: {e}"))
            };
            assert_eq!(render(1), expected, "{src:?}");
            // Cached: a different `n` still shows the stored block.
            assert_eq!(render(2), expected, "{src:?}");
            assert_eq!(cache.stats().hits, 1, "{src:?}");
        }
        // The exact text of the report renders verbatim.
        let (mut env, _) = env_with_cache();
        env.add_template_owned(
            "r.txt",
            rw("{% raw %}{%}{% icache %}\"{% endraw %}{% icache 'x' %}y{% endicache %}"),
        )
        .expect("valid");
        let page = env.get_template("r.txt").and_then(|t| t.render(()));
        assert_eq!(page.expect("renders"), "{%}{% icache %}\"y");
    }

    /// Template names are anyone's text: whatever they hold, the rewritten
    /// template loads, renders, and is served from the cache the second time.
    #[test]
    fn any_template_name_works() {
        const SRC: &str =
            "{% load icache %}{% icache 'films' n %}<p>{{ n }}</p>{% endicache %}\n{{ n }}";
        let names = [
            "films/été.html",
            "映画/一覧.html",
            "emoji 🎬.html",
            "it's \"quoted\".html",
            "back\\slash\\u{e9}.html",
            "new\nline\r\n.html",
            "tab\t\0nul\u{7f}\u{85}.html",
            "tag %} {% endcall %} {# #}.html",
            "",
        ];
        for name in names {
            // Through `rewrite`…
            let (mut env, cache) = env_with_cache();
            let out = rewrite(name, SRC).unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert_eq!(out.matches('\n').count(), SRC.matches('\n').count());
            env.add_template_owned(name.to_string(), out)
                .unwrap_or_else(|e| panic!("{name:?}: {e}"));
            let render = |env: &Environment<'_>, n: i32| {
                env.get_template(name)
                    .and_then(|t| t.render(minijinja::context! { n }))
                    .unwrap_or_else(|e| panic!("{name:?}: {e}"))
            };
            assert_eq!(render(&env, 1), "<p>1</p>\n1", "{name:?}");
            assert_eq!(render(&env, 1), "<p>1</p>\n1", "{name:?}");
            assert_eq!(cache.stats().hits, 1, "{name:?}");

            // …and through `loader`.
            let (mut env, cache) = env_with_cache();
            let wanted = name.to_string();
            env.set_loader(super::super::loader(move |n: &str| {
                Ok((n == wanted).then(|| SRC.to_string()))
            }));
            assert_eq!(render(&env, 2), "<p>2</p>\n2", "{name:?}");
            assert_eq!(render(&env, 2), "<p>2</p>\n2", "{name:?}");
            assert_eq!(cache.stats().hits, 1, "{name:?}");
        }
    }

    #[test]
    fn names_become_minijinja_string_literals() {
        for s in [
            "",
            "plain",
            "été",
            "a\"b",
            "a\\b",
            "a\nb\r\t\0\u{1b}\u{9f}",
            "🎬'",
        ] {
            let lit = string_literal(s);
            assert!(!lit.contains('\n') && !lit.contains('\r'), "{lit}");
            let env = Environment::new();
            let back = env
                .compile_expression(&lit)
                .and_then(|e| e.eval(()))
                .unwrap_or_else(|e| panic!("{s:?} as {lit}: {e}"));
            assert_eq!(back.as_str(), Some(s), "{lit}");
        }
    }

    #[test]
    fn errors_name_template_and_line() {
        for (src, needle) in [
            (
                "x\n\n{% icache 'a' %}",
                "t.html line 3: unclosed {% icache %}",
            ),
            (
                "\n{% endicache %}",
                "t.html line 2: {% endicache %} without",
            ),
            (
                "{% icache 'a %}{% endicache %}",
                "t.html line 1: unterminated",
            ),
            ("{% icache 'a' ", "t.html line 1: unterminated tag"),
            ("{% call icache('a') %}{% endicache %}", "use {% endcall %}"),
            ("a\n{% raw %}{% endraw", "t.html line 2: unclosed {% raw %}"),
            ("\n\n{# x", "t.html line 3: unterminated comment"),
            ("{{ '}}' ", "t.html line 1: unterminated expression"),
        ] {
            let e = rewrite("t.html", src).expect_err(src).to_string();
            assert!(e.contains(needle), "{src:?}: {e}");
        }
    }

    #[test]
    fn never_panics_on_prefixes_of_tricky_input() {
        let src = "{% load icache %}{%- icache 'a\\'b' \"c\" f(x, 'y z')|e -%}é{{ '%}' }}{# c #}{% call icache('q') %}{% endcall %}{% endicache %}{% raw %}{% endraw %}";
        for end in 0..=src.len() {
            if src.is_char_boundary(end) {
                let _ = rewrite("t", &src[..end]);
            }
        }
        assert!(rewrite("t", src).is_ok());
    }

    mod props {
        use super::super::*;
        use super::env_with_cache;
        use minijinja::Environment;
        use proptest::prelude::*;

        /// Template-ish text: tags, quotes, braces and plain words.
        fn templateish() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![
                    Just("{% icache ".to_string()),
                    Just("{% endicache %}".to_string()),
                    Just("{% load icache %}".to_string()),
                    Just("{% call icache(".to_string()),
                    Just("{% endcall %}".to_string()),
                    Just("{% nocache %}".to_string()),
                    Just("{% endnocache %}".to_string()),
                    Just("{% call icache_nocache() %}".to_string()),
                    Just("{% raw %}".to_string()),
                    Just("{% endraw %}".to_string()),
                    Just("%}".to_string()),
                    Just("{{ x }}".to_string()),
                    Just("{#".to_string()),
                    Just("#}".to_string()),
                    Just("'".to_string()),
                    Just("\"".to_string()),
                    Just("-".to_string()),
                    Just("\n".to_string()),
                    "[a-z (),.|]{0,6}",
                    ".{0,3}",
                ],
                0..16,
            )
            .prop_map(|parts| parts.concat())
        }

        /// Text made of the bits that look like template syntax.
        fn lookalike() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![
                    Just("{%"),
                    Just("%}"),
                    Just("{{"),
                    Just("}}"),
                    Just("{#"),
                    Just("#}"),
                    Just("{% icache 'a' %}"),
                    Just("{% endicache %}"),
                    Just("{% call icache('b') %}"),
                    Just("{% endcall %}"),
                    Just("{% raw %}"),
                    Just("'"),
                    Just("\""),
                    Just("\\"),
                    Just("-"),
                    Just("("),
                    Just(")"),
                    Just("\n"),
                    Just(" "),
                    Just("é"),
                    Just("x"),
                ],
                0..12,
            )
            .prop_map(|parts| parts.concat())
        }

        /// One construct MiniJinja never reads as a tag, holding lookalike
        /// text: a raw section, a comment, or a string literal in an
        /// expression or a tag.
        fn inert() -> impl Strategy<Value = String> {
            (lookalike(), 0..5u8).prop_filter_map("would end early", |(text, kind)| {
                let quoted = |q: char| {
                    let escaped = text.replace('\\', "\\\\").replace(q, &format!("\\{q}"));
                    format!("{q}{escaped}{q}")
                };
                match kind {
                    0 => (!text.contains("endraw") && !text.contains("{%"))
                        .then(|| format!("{{% raw %}}{text}{{% endraw %}}")),
                    1 => (!text.contains("#}")).then(|| format!("{{#{text}#}}")),
                    2 => Some(format!("{{{{ {} }}}}", quoted('"'))),
                    3 => Some(format!("{{{{ {} }}}}", quoted('\''))),
                    _ => Some(format!("{{% set s = {} %}}", quoted('"'))),
                }
            })
        }

        fn inert_text() -> impl Strategy<Value = String> {
            proptest::collection::vec(inert(), 0..4).prop_map(|parts| parts.concat())
        }

        proptest! {
            #[test]
            fn rewrite_never_panics(src in templateish()) {
                let _ = rewrite("t.html", &src);
            }

            #[test]
            fn rewrite_never_panics_on_any_string(src in any::<String>()) {
                let _ = rewrite("t.html", &src);
            }

            /// Well-formed seed blocks always rewrite into a template MiniJinja
            /// accepts, with the same lines.
            #[test]
            fn seed_blocks_rewrite_into_valid_templates(
                tokens in proptest::collection::vec(prop_oneof!["'[a-z #|]{0,8}'", "[a-z]{1,5}(\\.[a-z]{1,3})?".prop_filter("not a keyword", |t| !["and", "or", "not", "in", "is", "if", "else"].contains(&t.split('.').next().unwrap_or(""))) ], 0..4),
                body in "[a-z <>&\n]{0,20}",
                nested in any::<bool>(),
            ) {
                let inner = if nested { format!("{{% icache 'in' %}}{body}{{% endicache %}}") } else { body.clone() };
                let src = format!("{{% load icache %}}\n{{% icache {} %}}{inner}{{% endicache %}}", tokens.join(" "));
                let out = rewrite("t.html", &src).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(out.matches('\n').count(), src.matches('\n').count());
                let mut env = Environment::new();
                crate::minijinja::register(&mut env, crate::ICache::memory());
                env.add_template_owned("t.html", out).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }

            /// Raw sections, comments and string literals are copied as they
            /// are, whatever tag-like text they hold.
            #[test]
            fn inert_text_is_left_alone(src in inert_text()) {
                prop_assert_eq!(rewrite("t.html", &src).map_err(|e| TestCaseError::fail(e.to_string()))?, src);
            }

            /// A block among inert text renders exactly as the same template
            /// without the `{% icache %}` tags, first rendered and then cached.
            #[test]
            fn blocks_among_inert_text_render_as_without_the_cache(
                before in inert_text(),
                inside in inert_text(),
                after in inert_text(),
            ) {
                let src = format!("{before}{{% icache 'x' %}}{inside}{{% endicache %}}{after}");
                let fail = |e: Error| TestCaseError::fail(format!("{src:?}: {e}"));
                let out = rewrite("t.txt", &src).map_err(fail)?;
                let (mut env, cache) = env_with_cache();
                env.add_template_owned("t.txt", out).map_err(fail)?;
                let mut plain = Environment::new();
                plain.add_template_owned("plain", format!("{before}{inside}{after}")).map_err(fail)?;
                let expected = plain.get_template("plain").and_then(|t| t.render(())).map_err(fail)?;
                for _ in 0..2 {
                    let page = env.get_template("t.txt").and_then(|t| t.render(())).map_err(fail)?;
                    prop_assert_eq!(&page, &expected);
                }
                prop_assert_eq!(cache.stats().hits, 1);
            }
        }

        proptest! {
            // Most random texts are not templates and pass trivially: about
            // one in five is, so run more cases than the default.
            #![proptest_config(ProptestConfig::with_cases(1024))]

            /// Where MiniJinja sees no `icache` tag, the rewrite sees none and
            /// changes nothing: its scan ends tags, expressions, comments and
            /// raw sections where MiniJinja's lexer does.
            #[test]
            fn templates_without_blocks_are_left_alone(
                parts in proptest::collection::vec(
                    prop_oneof![
                        Just("{%"), Just("%}"), Just("{{"), Just("}}"), Just("{#"), Just("#}"),
                        Just("{% raw %}"), Just("{%- raw +%}"), Just("{% endraw %}"),
                        Just("{%endraw-%}"), Just("{% if x %}"), Just("{% endif %}"),
                        Just("{% set a = "), Just("{{ x "), Just("'"), Just("\""), Just("\\"),
                        Just("("), Just(")"), Just("{"), Just("}"), Just("["), Just("]"),
                        Just("-"), Just("+"), Just("~"), Just(" "), Just("\n"), Just("x"),
                        Just("icache"),
                    ],
                    0..14,
                ),
            ) {
                let src = parts.concat();
                let mut env = Environment::new();
                // Only templates MiniJinja accepts (so `icache` is a plain
                // word, a variable or a string: never a tag, which MiniJinja
                // would reject as unknown).
                if env.add_template("t", &src).is_err() {
                    return Ok(());
                }
                prop_assert_eq!(rewrite("t", &src).map_err(|e| TestCaseError::fail(e.to_string()))?, src);
            }
        }
    }
}

#[cfg(all(test, feature = "tera"))]
mod tera_tests {
    /// Tera's parser checks a token's syntax only: filters and functions
    /// the application registers later are not known yet, and are fine.
    #[test]
    fn tera_tokens_may_use_the_applications_filters() {
        let out = super::rewrite_for_tera(
            "t.html",
            "{% icache 'a' user | my_filter(x=1) my_function() %}b{% endicache %}",
        )
        .expect("rewrites");
        assert!(
            out.contains("tokens=['a', (user | my_filter(x=1)), (my_function())]"),
            "{out}"
        );
    }
}
