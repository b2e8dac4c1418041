//! The short forms a page is known by at the edge: a token's surrogate key
//! and a page's ETag. Both are SHA-256 digests, so user-controlled tokens
//! can neither collide nor break a header.

use sha2::{Digest, Sha256};

/// RFC 4648 base32, lower case: case-insensitive tag stores (Cloudflare's
/// cache tags) see the same key, and it is a header-safe token everywhere.
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Base32 of the first 16 bytes (128 bits: a collision needs ~2^64 tokens).
fn base32_128(digest: &[u8]) -> String {
    let mut out = String::with_capacity(26);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in &digest[..16] {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// Feeds `s` length-prefixed, so that no two sequences of strings digest
/// alike (`["a b"]` vs `["a", "b"]`).
fn feed(h: &mut Sha256, s: &[u8]) {
    h.update((s.len() as u64).to_le_bytes());
    h.update(s);
}

/// The surrogate key of a token: 26 characters of `[a-z2-7]`, the same in
/// the page's header and in every purge (Varnish xkey, Fastly, Cloudflare).
///
/// # Example
///
/// ```
/// let key = icache_http::surrogate_key("user:42");
/// assert_eq!(key.len(), 26);
/// assert_eq!(key, icache_http::surrogate_key("user:42"));
/// assert_ne!(key, icache_http::surrogate_key("user:43"));
/// ```
pub fn surrogate_key(token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"icache-http/surrogate-key/1\0");
    feed(&mut h, token.as_bytes());
    base32_128(&h.finalize())
}

/// A page's weak ETag (with its quotes, `W/"…"`) from its key, every token
/// read with its generation, and its blocks' identities. Order and
/// repetitions do not matter: the same set of reads gives the same tag.
pub(crate) fn etag(page_key: &[u8], reads: &[(String, u64)], identities: &[Vec<String>]) -> String {
    let mut reads: Vec<&(String, u64)> = reads.iter().collect();
    reads.sort();
    reads.dedup();
    let mut ids: Vec<&Vec<String>> = identities.iter().collect();
    ids.sort();
    ids.dedup();
    let mut h = Sha256::new();
    h.update(b"icache-http/etag/1\0");
    feed(&mut h, page_key);
    h.update((reads.len() as u64).to_le_bytes());
    for (token, generation) in reads {
        feed(&mut h, token.as_bytes());
        h.update(generation.to_le_bytes());
    }
    h.update((ids.len() as u64).to_le_bytes());
    for id in ids {
        h.update((id.len() as u64).to_le_bytes());
        for part in id {
            feed(&mut h, part.as_bytes());
        }
    }
    format!("W/\"{}\"", base32_128(&h.finalize()))
}

/// A digest of a sequence of byte strings (manifest keys).
pub(crate) fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        feed(&mut h, p);
    }
    h.finalize().into()
}

/// RFC 9110 §13.1.2: does an `If-None-Match` value match `etag` by weak
/// comparison (`W/` ignored on both sides, `*` matches any)?
pub(crate) fn if_none_match(header: &[u8], etag: &str) -> bool {
    let opaque = |t: &[u8]| -> Option<Vec<u8>> {
        let t = t.trim_ascii();
        let t = t.strip_prefix(b"W/").unwrap_or(t);
        (t.len() >= 2 && t[0] == b'"' && t[t.len() - 1] == b'"').then(|| t.to_vec())
    };
    let Some(ours) = opaque(etag.as_bytes()) else {
        return false;
    };
    if header.trim_ascii() == b"*" {
        return true;
    }
    // Entity tags cannot contain commas (`etagc` excludes them), so a split
    // on commas is exact.
    header
        .split(|&b| b == b',')
        .filter_map(opaque)
        .any(|theirs| theirs == ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_short_case_free_and_distinct() {
        let k = surrogate_key("movies");
        assert_eq!(k.len(), 26);
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        );
        assert_ne!(surrogate_key("a b"), surrogate_key("a"));
        assert_ne!(surrogate_key(""), surrogate_key(" "));
    }

    #[test]
    fn etags_ignore_order_and_repeats_only() {
        let r = |v: &[(&str, u64)]| {
            v.iter()
                .map(|(t, g)| ((*t).to_owned(), *g))
                .collect::<Vec<_>>()
        };
        let id = |s: &str| vec![s.to_owned()];
        let a = etag(b"/p", &r(&[("a", 1), ("b", 2)]), &[id("x"), id("y")]);
        assert!(a.starts_with("W/\"") && a.ends_with('"'));
        assert_eq!(
            a,
            etag(
                b"/p",
                &r(&[("b", 2), ("a", 1), ("a", 1)]),
                &[id("y"), id("x")]
            )
        );
        assert_ne!(
            a,
            etag(b"/q", &r(&[("a", 1), ("b", 2)]), &[id("x"), id("y")])
        );
        assert_ne!(
            a,
            etag(b"/p", &r(&[("a", 1), ("b", 3)]), &[id("x"), id("y")])
        );
        assert_ne!(a, etag(b"/p", &r(&[("a", 1), ("b", 2)]), &[id("x")]));
        // Identities are sequences, not concatenations.
        assert_ne!(
            etag(b"/p", &[], &[vec!["ab".into()]]),
            etag(b"/p", &[], &[vec!["a".into(), "b".into()]])
        );
    }

    #[test]
    fn if_none_match_is_weak_and_takes_lists() {
        let tag = "W/\"abc\"";
        assert!(if_none_match(b"W/\"abc\"", tag));
        assert!(if_none_match(b"\"abc\"", tag));
        assert!(if_none_match(b"\"x\", W/\"abc\"", tag));
        assert!(if_none_match(b" * ", tag));
        assert!(!if_none_match(b"\"abd\"", tag));
        assert!(!if_none_match(b"abc", tag));
        assert!(!if_none_match(b"", tag));
    }
}
