//! Splitting the arguments of a seed-syntax tag (`{% icache 'items' 'user:' ~ user.id %}`)
//! into one template expression per token.
//!
//! The seed separates tokens by whitespace, but template expressions have
//! whitespace of their own (`'user:' ~ user.id`, `user.name | upper`,
//! `a if b else c`). So a token ends where one complete expression ends, read
//! with MiniJinja's own expression grammar (its parser's precedence levels,
//! `compiler/parser.rs` in MiniJinja 3.1): after an operand, a binary operator,
//! `~`, a filter `|`, a test `is`, `in`, `not in`, `and`, `or`, `.` or a
//! ternary `if … else` continue the expression; anything else that can start
//! an operand starts the next token. Two exceptions keep the seed's meaning
//! where MiniJinja's grammar would join tokens: adjacent string literals
//! (`'a' 'b'`, which MiniJinja concatenates) are two tokens, and a bracket
//! after whitespace (`'a' (b)`, `x [1]`) starts a new token instead of calling
//! or indexing the previous one.
//!
//! The split only decides where tokens end; each piece is then checked by the
//! engine's own parser, so a bad expression is reported with the user's text
//! and line, before the rewritten template is compiled.

/// One lexed piece of a tag's arguments.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tok<'a> {
    Ident(&'a str),
    Str,
    Num,
    Op(&'a str),
    Open,
    Close,
    /// Something MiniJinja would reject: kept, so its parser says what.
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Lexed<'a> {
    tok: Tok<'a>,
    start: usize,
    end: usize,
    /// Whitespace right before it.
    spaced: bool,
}

/// One argument of a seed-syntax tag.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Arg<'a> {
    /// `Some(name)` for `name=value`.
    pub(super) keyword: Option<&'a str>,
    /// The expression's text, as the user wrote it.
    pub(super) text: &'a str,
    /// Its byte offset in the arguments.
    pub(super) at: usize,
    /// A single string literal (written as it is, not parenthesised).
    pub(super) literal: bool,
}

/// Why the arguments cannot be split: where, and what.
pub(super) type SplitError = (usize, String);

const OPS: [&str; 22] = [
    "**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "|", ".", ",", ":", "=", "<",
    ">", "!", "?", ";",
];

fn lex(src: &str) -> Result<Vec<Lexed<'_>>, SplitError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut spaced = true;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            spaced = true;
            i += 1;
            continue;
        }
        let start = i;
        let tok = match c {
            b'\'' | b'"' => {
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => {
                            return Err((start, format!("unterminated string {}", &src[start..])));
                        }
                        Some(b'\\') => i += 2,
                        Some(&q) if q == c => {
                            i += 1;
                            break;
                        }
                        Some(_) => i += 1,
                    }
                }
                Tok::Str
            }
            b'0'..=b'9' => {
                while i < bytes.len() {
                    let d = bytes[i];
                    let exp_sign = matches!(d, b'+' | b'-')
                        && matches!(bytes[i - 1], b'e' | b'E')
                        && !src[start..i].starts_with("0x");
                    let fraction = d == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
                    if d.is_ascii_alphanumeric() || d == b'_' || exp_sign || fraction {
                        i += 1;
                    } else {
                        break;
                    }
                }
                Tok::Num
            }
            b'(' | b'[' | b'{' => {
                i += 1;
                Tok::Open
            }
            b')' | b']' | b'}' => {
                i += 1;
                Tok::Close
            }
            _ if c == b'_' || c.is_ascii_alphabetic() || c >= 0x80 => {
                // Non-ASCII letters: MiniJinja's `unicode` feature allows
                // them in names; its parser has the last word either way.
                let len = src[i..]
                    .char_indices()
                    .find(|&(_, ch)| !(ch == '_' || ch.is_alphanumeric()))
                    .map_or(src.len() - i, |(n, _)| n);
                i += len.max(src[i..].chars().next().map_or(1, char::len_utf8));
                Tok::Ident(&src[start..i])
            }
            _ => match OPS.iter().find(|op| src[i..].starts_with(**op)) {
                Some(op) => {
                    i += op.len();
                    Tok::Op(op)
                }
                None => {
                    i += src[i..].chars().next().map_or(1, char::len_utf8);
                    Tok::Other
                }
            },
        };
        out.push(Lexed {
            tok,
            start,
            end: i,
            spaced,
        });
        spaced = false;
    }
    Ok(out)
}

/// A recursive-descent walk over MiniJinja's expression grammar that only
/// finds where an expression ends (nothing is built). Lenient: where the
/// grammar expects an operand and finds none, the expression simply ends
/// there, and the engine's parser reports the error on that piece.
struct Walk<'t, 'a> {
    toks: &'t [Lexed<'a>],
    i: usize,
    /// Nesting of `parse_*` calls, bounded like MiniJinja's own parser so
    /// that hostile input cannot overflow the stack.
    depth: usize,
}

const MAX_DEPTH: usize = 150;

impl<'a> Walk<'_, 'a> {
    fn peek(&self) -> Option<Tok<'a>> {
        self.toks.get(self.i).map(|t| t.tok)
    }
    fn spaced(&self) -> bool {
        self.toks.get(self.i).is_some_and(|t| t.spaced)
    }
    fn is_op(&self, ops: &[&str]) -> bool {
        matches!(self.peek(), Some(Tok::Op(o)) if ops.contains(&o))
    }
    fn is_word(&self, words: &[&str]) -> bool {
        matches!(self.peek(), Some(Tok::Ident(w)) if words.contains(&w))
    }

    fn expr(&mut self) {
        if self.depth > MAX_DEPTH {
            // Too deep to follow: the rest is one piece, for the parser
            // to judge.
            self.i = self.toks.len();
            return;
        }
        self.depth += 1;
        self.ifexpr();
        self.depth -= 1;
    }

    fn ifexpr(&mut self) {
        self.or();
        while self.is_word(&["if"]) {
            self.i += 1;
            self.or();
            if self.is_word(&["else"]) {
                self.i += 1;
                self.expr();
            }
        }
    }

    fn or(&mut self) {
        self.and();
        while self.is_word(&["or"]) {
            self.i += 1;
            self.and();
        }
    }

    fn and(&mut self) {
        self.not();
        while self.is_word(&["and"]) {
            self.i += 1;
            self.not();
        }
    }

    fn not(&mut self) {
        let mut guard = 0;
        while self.is_word(&["not"]) && guard < MAX_DEPTH {
            self.i += 1;
            guard += 1;
        }
        self.compare();
    }

    fn compare(&mut self) {
        self.math1();
        loop {
            if self.is_op(&["==", "!=", "<", "<=", ">", ">="]) || self.is_word(&["in"]) {
                self.i += 1;
            } else if self.is_word(&["not"])
                && matches!(
                    self.toks.get(self.i + 1).map(|t| t.tok),
                    Some(Tok::Ident("in"))
                )
            {
                self.i += 2;
            } else {
                break;
            }
            self.math1();
        }
    }

    fn binary(&mut self, ops: &[&str], operand: fn(&mut Self)) {
        operand(self);
        while self.is_op(ops) {
            self.i += 1;
            operand(self);
        }
    }

    fn math1(&mut self) {
        self.binary(&["+", "-"], Self::concat);
    }
    fn concat(&mut self) {
        self.binary(&["~"], Self::math2);
    }
    fn math2(&mut self) {
        self.binary(&["*", "/", "//", "%"], Self::pow);
    }
    fn pow(&mut self) {
        self.binary(&["**"], Self::unary);
    }

    fn unary(&mut self) {
        self.unary_only();
        self.postfix();
        self.filters();
    }

    fn unary_only(&mut self) {
        let mut guard = 0;
        while self.is_op(&["-"]) && guard < MAX_DEPTH {
            self.i += 1;
            guard += 1;
        }
        self.primary();
    }

    fn primary(&mut self) {
        match self.peek() {
            Some(Tok::Ident(_) | Tok::Str | Tok::Num) => self.i += 1,
            Some(Tok::Open) => self.group(),
            // No operand: the expression ends (the parser will say why).
            _ => {}
        }
    }

    /// A bracketed group, to its matching close (or the end).
    fn group(&mut self) {
        let mut depth = 0usize;
        while let Some(t) = self.peek() {
            self.i += 1;
            match t {
                Tok::Open => depth += 1,
                Tok::Close => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return;
                    }
                }
                _ => {}
            }
        }
    }

    /// A bracket right after the previous piece (no whitespace).
    fn tight_open(&self) -> bool {
        self.peek() == Some(Tok::Open) && !self.spaced()
    }

    fn postfix(&mut self) {
        loop {
            if self.is_op(&["."]) {
                self.i += 1;
                if matches!(self.peek(), Some(Tok::Ident(_) | Tok::Num)) {
                    self.i += 1;
                }
            } else if self.tight_open() {
                self.group();
            } else {
                break;
            }
        }
    }

    fn dotted_name(&mut self) {
        if matches!(self.peek(), Some(Tok::Ident(_))) {
            self.i += 1;
            while self.is_op(&["."]) {
                self.i += 1;
                if matches!(self.peek(), Some(Tok::Ident(_))) {
                    self.i += 1;
                }
            }
        }
    }

    fn filters(&mut self) {
        loop {
            if self.is_op(&["|"]) {
                self.i += 1;
                self.dotted_name();
                if self.tight_open() {
                    self.group();
                }
            } else if self.is_word(&["is"]) {
                self.i += 1;
                if self.is_word(&["not"]) {
                    self.i += 1;
                }
                self.dotted_name();
                if self.tight_open() {
                    self.group();
                } else if (matches!(
                    self.peek(),
                    Some(Tok::Ident(_) | Tok::Str | Tok::Num | Tok::Open)
                ) || self.is_op(&["-", "+"]))
                    && !self.is_word(&["and", "or", "else", "is", "if", "not", "in"])
                {
                    // MiniJinja's one-argument test without parentheses
                    // (`x is divisibleby 3`, `x is eq 'a'`): the operand
                    // after a test name is its argument, as in MiniJinja.
                    // `(x is defined) y` ends the test.
                    if self.is_op(&["+"]) {
                        self.i += 1;
                    }
                    self.unary_only();
                    self.postfix();
                }
            } else {
                break;
            }
        }
    }
}

/// Splits a seed tag's arguments into one expression per token (and
/// `name=value` keywords).
pub(super) fn split(src: &str) -> Result<Vec<Arg<'_>>, SplitError> {
    let toks = lex(src)?;
    let mut out = Vec::new();
    let mut w = Walk {
        toks: &toks,
        i: 0,
        depth: 0,
    };
    while w.i < toks.len() {
        // A comma between tokens is accepted as a separator.
        if w.is_op(&[","]) {
            w.i += 1;
            continue;
        }
        let keyword = match (
            toks.get(w.i).map(|t| t.tok),
            toks.get(w.i + 1).map(|t| t.tok),
        ) {
            (Some(Tok::Ident(name)), Some(Tok::Op("="))) => {
                w.i += 2;
                Some(name)
            }
            _ => None,
        };
        let first = w.i;
        if first >= toks.len() {
            let at = toks[first - 1].start;
            let name = keyword.unwrap_or("");
            return Err((at, format!("option `{name}=` has no value")));
        }
        w.expr();
        if w.i == first {
            // Nothing an expression can start with (a stray `)` or `*`):
            // one piece, for the parser to reject by name.
            w.i += 1;
        }
        let (start, end) = (toks[first].start, toks[w.i - 1].end);
        out.push(Arg {
            keyword,
            text: &src[start..end.max(start)],
            at: start,
            literal: w.i == first + 1 && toks[first].tok == Tok::Str,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(src: &str) -> Vec<String> {
        split(src)
            .expect("splits")
            .iter()
            .map(|a| match a.keyword {
                Some(k) => format!("{k}={}", a.text),
                None => a.text.to_owned(),
            })
            .collect()
    }

    #[test]
    fn tokens_end_where_an_expression_ends() {
        for (src, want) in [
            (
                "'items' 'user:' ~ user.id",
                vec!["'items'", "'user:' ~ user.id"],
            ),
            ("'a' user.name | upper", vec!["'a'", "user.name | upper"]),
            ("a + 1 b", vec!["a + 1", "b"]),
            ("f(x, 'y z') 'q'", vec!["f(x, 'y z')", "'q'"]),
            ("'with spaces' x", vec!["'with spaces'", "x"]),
            ("a if b else c d", vec!["a if b else c", "d"]),
            ("(x is defined) y", vec!["(x is defined)", "y"]),
            ("x is defined and y z", vec!["x is defined and y", "z"]),
            ("x is divisibleby 3 y", vec!["x is divisibleby 3", "y"]),
            ("x is not eq 'b' 'c'", vec!["x is not eq 'b'", "'c'"]),
            ("a in b not c", vec!["a in b", "not c"]),
            ("a not in b and c or d", vec!["a not in b and c or d"]),
            ("'a' 'b'", vec!["'a'", "'b'"]),
            ("'a' (b)", vec!["'a'", "(b)"]),
            (
                "items[0].id x|default('n')",
                vec!["items[0].id", "x|default('n')"],
            ),
            ("-1 a - 1 a -1", vec!["-1", "a - 1", "a -1"]),
            ("x.y|join(', ') ~ '!'", vec!["x.y|join(', ') ~ '!'"]),
            ("{'a': 1}['a'] [1, 2]", vec!["{'a': 1}['a']", "[1, 2]"]),
            (
                "'movies' user.id name='list'",
                vec!["'movies'", "user.id", "name='list'"],
            ),
            ("'a', 'b'", vec!["'a'", "'b'"]),
            (
                "a ** 2 // 3 % 4 * 5 / 6 == 7",
                vec!["a ** 2 // 3 % 4 * 5 / 6 == 7"],
            ),
            ("", vec![]),
        ] {
            assert_eq!(texts(src), want, "{src:?}");
        }
    }

    #[test]
    fn incomplete_expressions_stay_one_piece() {
        assert_eq!(texts("'user:' ~"), vec!["'user:' ~"]);
        assert_eq!(texts("a | "), vec!["a |"]);
        assert_eq!(texts(") x"), vec![")", "x"]);
        assert!(split("'open").is_err());
        assert!(split("name=").is_err());
        assert!(split("x name =").is_err());
    }

    #[test]
    fn hostile_input_does_not_overflow() {
        let deep = "(".repeat(10_000) + &"-".repeat(10_000) + &"not ".repeat(10_000);
        let _ = split(&deep);
        let _ = split(&"a if ".repeat(5_000));
    }
}
