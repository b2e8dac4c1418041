//! How user strings become backend keys.
//!
//! Any string is a valid token or key. Short, plain names stay readable so an
//! operator can find `movies` in `redis-cli`; everything else is hashed with
//! SHA-256 (collision resistant, so user-controlled input cannot make two
//! entries share a key). The readable and hashed forms live under different tags,
//! so they can never collide with each other either. Every key fits memcached:
//! at most 64 (prefix) + 5 + 64 bytes, no whitespace or control bytes.

use sha2::{Digest, Sha256};

/// Which namespace a key lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Space {
    /// A token's generation counter.
    Gen,
    /// An entry stored by `set_versioned` or a fragment.
    Versioned,
    /// A plain `set`/`get` entry.
    Plain,
    /// A cached fragment (`fragment`, template blocks).
    Fragment,
    /// A fill lease: who renders one (block, version) (`fill=lease`).
    Lease,
}

impl Space {
    fn tags(self) -> (char, char) {
        match self {
            Space::Gen => ('g', 'G'),
            Space::Versioned => ('v', 'V'),
            Space::Plain => ('k', 'K'),
            Space::Fragment => ('f', 'F'),
            Space::Lease => ('l', 'L'),
        }
    }
}

/// A key before it is encoded for a backend: the namespace and the user's string.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key<'a> {
    pub(crate) space: Space,
    pub(crate) name: &'a str,
}

impl<'a> Key<'a> {
    pub(crate) fn gen_(name: &'a str) -> Self {
        Key {
            space: Space::Gen,
            name,
        }
    }
    pub(crate) fn versioned(name: &'a str) -> Self {
        Key {
            space: Space::Versioned,
            name,
        }
    }
    pub(crate) fn fragment(name: &'a str) -> Self {
        Key {
            space: Space::Fragment,
            name,
        }
    }
    pub(crate) fn lease(name: &'a str) -> Self {
        Key {
            space: Space::Lease,
            name,
        }
    }
    pub(crate) fn plain(name: &'a str) -> Self {
        Key {
            space: Space::Plain,
            name,
        }
    }
}

/// Longest name kept readable in a backend key.
const READABLE_MAX: usize = 64;

fn is_readable(name: &str) -> bool {
    name.len() <= READABLE_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'#'))
        // The marker that ends the prefix never appears after it, so a key
        // splits one way only (see `encode`).
        && !name.starts_with("ic:")
        && !name.contains(":ic:")
}

/// Longest `?prefix=` used verbatim in keys; longer ones are hashed.
pub(crate) const PREFIX_MAX: usize = 64;

/// The form of a `?prefix=` that goes into keys. Any prefix is accepted:
/// one of at most 64 printable ASCII bytes (colons included: `myapp:prod`
/// is the Redis convention) is used verbatim, so `SCAN MATCH myapp:prod*`
/// finds every key; anything else (spaces, control bytes, non-ASCII, longer)
/// is replaced by `~` and its SHA-256, which no verbatim prefix can equal
/// (a verbatim prefix never starts with `~`).
pub(crate) fn key_prefix(prefix: &str) -> String {
    let verbatim = prefix.len() <= PREFIX_MAX
        && !prefix.starts_with('~')
        && prefix.bytes().all(|b| b.is_ascii_graphic());
    if verbatim {
        prefix.to_owned()
    } else {
        format!("~{}", sha256_hex(prefix.as_bytes()))
    }
}

/// Hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(64);
    push_sha256_hex(&mut out, bytes);
    out
}

fn push_sha256_hex(out: &mut String, bytes: &[u8]) {
    let digest = Sha256::digest(bytes);
    for b in digest.iter() {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
}

/// The key of a Redis database's instance marker for `prefix` (a
/// [`key_prefix`]): `[prefix:]ic:g:ic:instance`, under the readable
/// generation tag (so `near=tracking`'s key prefixes cover it) with a name
/// no token can have (readable names never start with `ic:`).
#[cfg(feature = "redis")]
pub(crate) fn instance_marker(prefix: &str) -> String {
    let mut key = encode(prefix, Key::gen_("x"));
    key.pop();
    key.push_str("ic:instance");
    key
}

/// The key as remote backends store it: `[prefix:]ic:<tag>:<name or hash>`,
/// `prefix` being a [`key_prefix`].
///
/// No two (prefix, space, name) give the same key, though prefixes and
/// readable names may both hold colons: the tag is one letter, and neither a
/// readable name nor a hash contains `:ic:` or starts with `ic:`, so the
/// *last* `:ic:` of a key is the one that ends its prefix (`myapp:prod` +
/// `k` is `myapp:prod:ic:g:k`, `myapp` + `prod:k` is `myapp:ic:g:prod:k`).
pub(crate) fn encode(prefix: &str, key: Key<'_>) -> String {
    let mut out = String::with_capacity(prefix.len() + 6 + 64);
    encode_into(&mut out, prefix, key);
    out
}

/// [`encode`] appended to `out` (a request being built: no allocation per
/// key).
pub(crate) fn encode_into(out: &mut String, prefix: &str, key: Key<'_>) {
    let (plain_tag, hashed_tag) = key.space.tags();
    if !prefix.is_empty() {
        out.push_str(prefix);
        out.push(':');
    }
    out.push_str("ic:");
    if is_readable(key.name) {
        out.push(plain_tag);
        out.push(':');
        out.push_str(key.name);
    } else {
        out.push(hashed_tag);
        out.push(':');
        push_sha256_hex(out, key.name.as_bytes());
    }
}

/// Joins several parts into one name without ambiguity: each part is preceded
/// by its length, so `["a#b"]` and `["a", "b"]` can never give the same name.
#[cfg(test)]
pub(crate) fn join_parts<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    join_parts_into(&mut out, parts);
    out
}

/// [`join_parts`] into an existing string (no allocation beyond its growth:
/// this runs on every block lookup).
#[inline]
pub(crate) fn join_parts_into<'a>(out: &mut String, parts: impl IntoIterator<Item = &'a str>) {
    for part in parts {
        push_decimal(out, part.len());
        out.push(':');
        out.push_str(part);
    }
}

/// Appends `n` in decimal, without the formatting machinery (hot path).
#[inline]
pub(crate) fn push_decimal(out: &mut String, mut n: usize) {
    // The usual lengths of names and tokens: one or two digits.
    if n < 10 {
        out.push(char::from(b'0' + n as u8));
        return;
    }
    if n < 100 {
        out.push(char::from(b'0' + (n / 10) as u8));
        out.push(char::from(b'0' + (n % 10) as u8));
        return;
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written: pushed as chars, no UTF-8 check.
    for d in &digits[i..] {
        out.push(char::from(*d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_names_stay_readable() {
        assert_eq!(encode("", Key::gen_("movies")), "ic:g:movies");
        assert_eq!(encode("shop", Key::gen_("user:42")), "shop:ic:g:user:42");
    }

    #[test]
    fn other_names_are_hashed_and_fit_memcached() {
        for name in ["with space", "a\nb", "", "ü", &"x".repeat(100_000)] {
            let k = encode(&"p".repeat(PREFIX_MAX), Key::versioned(name));
            assert!(k.len() <= 250, "{k}");
            assert!(k.bytes().all(|b| b.is_ascii_graphic()), "{k}");
        }
    }

    #[test]
    fn readable_and_hashed_forms_never_meet() {
        // A readable name that looks like a hash still gets the lowercase tag.
        let hash = sha256_hex(b"with space");
        assert_ne!(
            encode("", Key::plain(&hash)),
            encode("", Key::plain("with space"))
        );
    }

    #[test]
    fn spaces_are_apart() {
        assert_ne!(encode("", Key::gen_("a")), encode("", Key::versioned("a")));
        assert_ne!(encode("", Key::plain("a")), encode("", Key::versioned("a")));
    }

    #[test]
    fn decimals() {
        for n in [0usize, 7, 10, 99, 12345, usize::MAX] {
            let mut s = String::new();
            push_decimal(&mut s, n);
            assert_eq!(s, n.to_string());
        }
    }

    #[test]
    fn parts_join_unambiguously() {
        assert_ne!(join_parts(["a#b"]), join_parts(["a", "b"]));
        assert_ne!(join_parts(["ab", ""]), join_parts(["a", "b"]));
        assert_ne!(join_parts(["1:a"]), join_parts(["1", "a"]));
    }

    #[test]
    fn any_prefix_is_accepted_and_kept_apart() {
        assert_eq!(key_prefix("shop-1.eu_west"), "shop-1.eu_west");
        assert_eq!(key_prefix("myapp:prod"), "myapp:prod");
        for odd in ["a b", "é", "~x", &"p".repeat(65), "a\nb"] {
            let p = key_prefix(odd);
            assert!(p.starts_with('~') && p.len() == 65, "{p}");
        }
        // The example: a colon in the prefix or in the key.
        let a = encode(&key_prefix("myapp:prod"), Key::gen_("k"));
        let b = encode(&key_prefix("myapp"), Key::gen_("prod:k"));
        assert_eq!(a, "myapp:prod:ic:g:k");
        assert_ne!(a, b);
        // A prefix that imitates our marker cannot meet a shorter prefix's
        // readable name that does too.
        let c = encode(&key_prefix("a:ic:g:x"), Key::gen_("k"));
        let d = encode(&key_prefix("a"), Key::gen_("x:ic:g:k"));
        assert_ne!(c, d);
        assert!(c.starts_with("a:ic:g:x:"));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn space() -> impl Strategy<Value = Space> {
            prop_oneof![
                Just(Space::Gen),
                Just(Space::Versioned),
                Just(Space::Plain),
                Just(Space::Fragment)
            ]
        }

        proptest! {
            #[test]
            fn distinct_names_give_distinct_keys(a in ".{0,80}", b in ".{0,80}", sa in space(), sb in space()) {
                let ka = encode("p", Key { space: sa, name: &a });
                let kb = encode("p", Key { space: sb, name: &b });
                prop_assert_eq!(ka == kb, a == b && sa == sb);
            }

            #[test]
            fn every_key_fits_memcached(name in any::<String>(), prefix in any::<String>(), sp in space()) {
                let k = encode(&key_prefix(&prefix), Key { space: sp, name: &name });
                prop_assert!(k.len() <= 250);
                prop_assert!(k.bytes().all(|b| b.is_ascii_graphic()));
            }

            #[test]
            fn prefixes_and_names_never_meet(
                pa in "[a-z:ic~ ]{0,12}", pb in "[a-z:ic~ ]{0,12}",
                na in "[a-z:ic]{0,12}", nb in "[a-z:ic]{0,12}",
                sa in space(), sb in space(),
            ) {
                let ka = encode(&key_prefix(&pa), Key { space: sa, name: &na });
                let kb = encode(&key_prefix(&pb), Key { space: sb, name: &nb });
                prop_assert_eq!(ka == kb, pa == pb && na == nb && sa == sb);
            }

            #[test]
            fn joined_parts_are_unambiguous(a in proptest::collection::vec(".{0,6}", 0..5), b in proptest::collection::vec(".{0,6}", 0..5)) {
                let ja = join_parts(a.iter().map(String::as_str));
                let jb = join_parts(b.iter().map(String::as_str));
                prop_assert_eq!(ja == jb, a == b);
            }
        }
    }
}
