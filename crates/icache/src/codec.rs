//! The byte format of entries on remote backends.
//!
//! ```text
//! "iC" 0x01 flags [version: u64 LE] [deps: u32 LE count, (u32 LE len, bytes)*]
//!              [instance: u32 LE len, bytes] payload
//! ```
//!
//! flags: bit 0 = the payload is UTF-8 text, bit 1 = a version follows, bit 2 =
//! a list of dependency tokens follows, bit 3 = the id of the server instance
//! that stored it follows (see `backend` on restarts and rollbacks), bit 4 = the
//! payload is a Python pickle stored by the Django binding
//! ([`ICache::set_versioned_pickle`](crate::ICache::set_versioned_pickle)):
//! only that method sets it, so bytes stored through any `set_*_bytes` are
//! never taken for a pickle, whatever they start with (bits 0 and 4 together
//! do not parse). Anything that does not parse (foreign
//! bytes written by another client, a truncated value) decodes to `None`, which
//! callers treat as a miss: never a panic.

use std::sync::Arc;

use bytes::Bytes;

const MAGIC: &[u8; 3] = b"iC\x01";
const TEXT: u8 = 1;
const VERSIONED: u8 = 2;
const DEPS: u8 = 4;
const INSTANCE: u8 = 8;
const PICKLE: u8 = 16;

/// A stored value: text (returned as `Arc<str>`) or bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Payload {
    Text(Arc<str>),
    Bytes(Bytes),
    /// Bytes the Python binding marked as one of its pickles (bit 4 of the
    /// flags): the only payload `django_icache` unpickles.
    Pickle(Bytes),
}

impl Payload {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Text(s) => s.as_bytes(),
            Payload::Bytes(b) | Payload::Pickle(b) => b,
        }
    }

    /// The payload as text; bytes that are not UTF-8 give `None`, and so does
    /// a pickle (it is never text).
    pub(crate) fn into_text(self) -> Option<Arc<str>> {
        match self {
            Payload::Text(s) => Some(s),
            Payload::Bytes(b) => std::str::from_utf8(&b).ok().map(Arc::from),
            Payload::Pickle(_) => None,
        }
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        match self {
            Payload::Text(s) => Bytes::from(s.as_bytes().to_vec()),
            Payload::Bytes(b) | Payload::Pickle(b) => b,
        }
    }
}

/// One cached value with what it was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The version of the tokens it was computed under (`None` for plain `set`).
    pub(crate) version: Option<u64>,
    /// Tokens beyond the caller's own that the value depends on (nested blocks).
    pub(crate) deps: Vec<Box<str>>,
    pub(crate) payload: Payload,
}

impl Entry {
    pub(crate) fn plain(payload: Payload) -> Self {
        Entry {
            version: None,
            deps: Vec::new(),
            payload,
        }
    }

    pub(crate) fn versioned(payload: Payload, version: u64) -> Self {
        Entry {
            version: Some(version),
            deps: Vec::new(),
            payload,
        }
    }

    /// Approximate size in memory, for the memory backend's byte bound.
    pub(crate) fn weight(&self) -> usize {
        self.payload.as_bytes().len() + self.deps.iter().map(|d| d.len() + 16).sum::<usize>() + 64
    }
}

#[cfg(any(feature = "redis", feature = "memcached", test))]
pub(crate) fn encode(entry: &Entry, instance: Option<&str>) -> Vec<u8> {
    let payload = entry.payload.as_bytes();
    let mut out = Vec::with_capacity(
        payload.len() + 16 + entry.deps.iter().map(|d| d.len() + 4).sum::<usize>(),
    );
    out.extend_from_slice(MAGIC);
    let mut flags = 0;
    match entry.payload {
        Payload::Text(_) => flags |= TEXT,
        Payload::Pickle(_) => flags |= PICKLE,
        Payload::Bytes(_) => {}
    }
    if entry.version.is_some() {
        flags |= VERSIONED;
    }
    if !entry.deps.is_empty() {
        flags |= DEPS;
    }
    if instance.is_some() {
        flags |= INSTANCE;
    }
    out.push(flags);
    if let Some(v) = entry.version {
        out.extend_from_slice(&v.to_le_bytes());
    }
    if !entry.deps.is_empty() {
        out.extend_from_slice(&len_u32(entry.deps.len()).to_le_bytes());
        for dep in &entry.deps {
            out.extend_from_slice(&len_u32(dep.len()).to_le_bytes());
            out.extend_from_slice(dep.as_bytes());
        }
    }
    if let Some(id) = instance {
        out.extend_from_slice(&len_u32(id.len()).to_le_bytes());
        out.extend_from_slice(id.as_bytes());
    }
    out.extend_from_slice(payload);
    out
}

#[cfg(any(feature = "redis", feature = "memcached", test))]
fn len_u32(n: usize) -> u32 {
    // Token names and counts beyond 4 GiB are not representable in any backend we
    // support; saturating keeps encode total, and decode then rejects the entry.
    u32::try_from(n).unwrap_or(u32::MAX)
}

struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Option<Bytes> {
        let end = self.pos.checked_add(n)?;
        if end > self.buf.len() {
            return None;
        }
        let out = self.buf.slice(self.pos..end);
        self.pos = end;
        Some(out)
    }
    fn u32(&mut self) -> Option<usize> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Some(u64::from_le_bytes(a))
    }
}

/// Decodes what [`encode`] wrote, with the instance id it was stored under;
/// `None` for anything else.
pub(crate) fn decode(buf: Bytes) -> Option<(Entry, Option<Box<str>>)> {
    let mut r = Reader { buf, pos: 0 };
    if r.take(3)?.as_ref() != MAGIC {
        return None;
    }
    let flags = r.take(1)?[0];
    if flags & !(TEXT | VERSIONED | DEPS | INSTANCE | PICKLE) != 0
        || flags & (TEXT | PICKLE) == TEXT | PICKLE
    {
        return None;
    }
    let version = if flags & VERSIONED != 0 {
        Some(r.u64()?)
    } else {
        None
    };
    let mut deps = Vec::new();
    if flags & DEPS != 0 {
        let count = r.u32()?;
        // Each dep needs at least 4 bytes: bound the allocation by what is there.
        if count > (r.buf.len() - r.pos) / 4 {
            return None;
        }
        deps.reserve(count);
        for _ in 0..count {
            let len = r.u32()?;
            let bytes = r.take(len)?;
            deps.push(Box::from(std::str::from_utf8(&bytes).ok()?));
        }
    }
    let instance = if flags & INSTANCE != 0 {
        let len = r.u32()?;
        let bytes = r.take(len)?;
        Some(Box::from(std::str::from_utf8(&bytes).ok()?))
    } else {
        None
    };
    let rest = r.buf.slice(r.pos..);
    let payload = if flags & TEXT != 0 {
        Payload::Text(Arc::from(std::str::from_utf8(&rest).ok()?))
    } else if flags & PICKLE != 0 {
        Payload::Pickle(rest)
    } else {
        Payload::Bytes(rest)
    };
    Some((
        Entry {
            version,
            deps,
            payload,
        },
        instance,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(e: Entry) {
        assert_eq!(
            decode(Bytes::from(encode(&e, None))),
            Some((e.clone(), None))
        );
        assert_eq!(
            decode(Bytes::from(encode(&e, Some("run-1")))),
            Some((e, Some(Box::from("run-1"))))
        );
    }

    #[test]
    fn entries_roundtrip() {
        roundtrip(Entry::plain(Payload::Text(Arc::from(""))));
        roundtrip(Entry::plain(Payload::Bytes(Bytes::from_static(b"\0\xff"))));
        roundtrip(Entry::versioned(
            Payload::Text(Arc::from("<ul>…</ul>")),
            u64::MAX,
        ));
        roundtrip(Entry {
            version: Some(7),
            deps: vec![Box::from("movies"), Box::from("")],
            payload: Payload::Bytes(Bytes::new()),
        });
        roundtrip(Entry::versioned(
            Payload::Pickle(Bytes::from_static(b"\x80\x05K\x01.")),
            3,
        ));
    }

    #[test]
    fn bytes_that_look_like_a_pickle_stay_bytes() {
        // Whatever a set_*_bytes caller stores, only the flag makes a pickle.
        let e = Entry::versioned(Payload::Bytes(Bytes::from_static(b"\x80\x05\xffiCpyp")), 1);
        let got = decode(Bytes::from(encode(&e, None))).map(|(entry, _)| entry.payload);
        assert!(matches!(got, Some(Payload::Bytes(_))), "{got:?}");
    }

    #[test]
    fn foreign_bytes_are_none() {
        for junk in [
            &b""[..],
            b"iC",
            b"iC\x01",
            b"iC\x02\x00",
            b"iC\x01\x80",
            b"iC\x01\x02\x01",
            b"iC\x01\x04\xff\xff\xff\xff",
            b"iC\x01\x01\xff\xfe",
            b"iC\x01\x11pickle-and-text",
            b"iC\x01\x20",
            b"42",
            b"hello world",
        ] {
            assert_eq!(decode(Bytes::copy_from_slice(junk)), None, "{junk:?}");
        }
    }

    #[test]
    fn every_truncation_is_none_or_shorter_payload() {
        let full = encode(
            &Entry {
                version: Some(1),
                deps: vec![Box::from("abc")],
                payload: Payload::Text(Arc::from("xyz")),
            },
            Some("id"),
        );
        for n in 0..full.len() {
            // A truncated payload may still decode (it is just shorter text), but
            // nothing before the payload may decode, and nothing may panic.
            let d = decode(Bytes::copy_from_slice(&full[..n]));
            if n < full.len() - 3 {
                assert_eq!(d, None, "{n}");
            }
        }
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = decode(Bytes::from(bytes));
            }

            #[test]
            fn decode_never_panics_after_our_magic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let mut v = b"iC\x01".to_vec();
                v.extend(bytes);
                let _ = decode(Bytes::from(v));
            }

            #[test]
            fn roundtrips(text in ".*", bin in any::<bool>(), pickle in any::<bool>(), version in any::<Option<u64>>(),
                          deps in proptest::collection::vec(".{0,10}", 0..4), instance in any::<Option<String>>()) {
                let payload = match (bin, pickle) {
                    (true, false) => Payload::Bytes(Bytes::from(text.clone().into_bytes())),
                    (_, true) => Payload::Pickle(Bytes::from(text.clone().into_bytes())),
                    (false, false) => Payload::Text(Arc::from(text.as_str())),
                };
                let e = Entry { version, deps: deps.into_iter().map(Box::from).collect(), payload };
                let got = decode(Bytes::from(encode(&e, instance.as_deref())));
                prop_assert_eq!(got, Some((e, instance.map(Box::from))));
            }
        }
    }
}
