//! Bad input of every kind, and isolation between users and apps.

use icache::ICache;

use crate::support::MemcachedServer;
use crate::{Ctx, Kind};

suite!(bad_input = crate::bad_input::cases:
    tokens_and_keys_of_every_kind,
    values_from_empty_to_ten_megabytes,
    user_a_never_gets_user_b_block,
    prefixes_keep_fragments_and_tokens_apart,
);

fn odd_strings() -> Vec<String> {
    let mut v: Vec<String> = vec![
        String::new(),
        " ".into(),
        "  ".into(),
        "\t\n\r".into(),
        (0u8..32).map(char::from).collect(),
        "\u{7f}\u{80}\u{ff}".into(),
        "ünïcödé 🎬 日本語".into(),
        "a\u{0430}".into(), // Latin a + Cyrillic а
        "aa".into(),
        "\u{200b}".into(), // zero-width space
        "#".into(),
        "a#b".into(),
        "key with spaces".into(),
        "ic:g:movies".into(),
        "x".repeat(250),
        "x".repeat(251),
    ];
    v.push("m".repeat(1 << 20)); // 1 MB
    let mut long = "m".repeat(1 << 20);
    long.push('!');
    v.push(long);
    v
}

pub mod cases {
    use super::*;

    pub fn tokens_and_keys_of_every_kind(ctx: &Ctx) {
        let c = &ctx.cache;
        let strings = odd_strings();
        let refs: Vec<&str> = strings.iter().map(String::as_str).collect();
        // Tokens: each its own generation.
        let before = c.generations(&refs).expect("generations");
        assert!(before.iter().all(|&g| g > 1));
        for (i, t) in refs.iter().enumerate() {
            c.incr(t).expect("incr");
            let after = c.generations(&refs).expect("generations");
            for (j, (b, a)) in before.iter().zip(&after).enumerate() {
                let bumps = u64::from(j <= i);
                assert_eq!(*a, b + bumps, "token {j} after bumping {i}");
            }
        }
        // Keys: each its own entry, versioned, plain and fragment.
        for (i, k) in refs.iter().enumerate() {
            c.set_versioned(k, format!("v{i}"), 1)
                .expect("set_versioned");
            c.set(k, format!("p{i}"), None).expect("set");
        }
        for (i, k) in refs.iter().enumerate() {
            assert_eq!(
                c.get_versioned(k, 1).expect("get").as_deref(),
                Some(format!("v{i}").as_str()),
                "key {i}"
            );
            assert_eq!(
                c.get(k).expect("get").as_deref(),
                Some(format!("p{i}").as_str()),
                "key {i}"
            );
            let f = c
                .fragment("t", &[k], || Ok::<_, ()>(format!("f{i}")))
                .expect("fragment");
            assert_eq!(f, format!("f{i}"));
        }
        for (i, k) in refs.iter().enumerate() {
            let f = c
                .fragment("t", &[k], || Ok::<_, ()>("rendered again".to_string()))
                .expect("fragment");
            assert_eq!(
                f,
                format!("f{i}"),
                "fragment {i} was not a hit of its own entry"
            );
        }
    }

    pub fn values_from_empty_to_ten_megabytes(ctx: &Ctx) {
        // In process, a value must fit in one of the store's four shards
        // beside what else is there: with the default 64 MiB, two 10 MB
        // values in one 16 MiB shard evict each other (and the generations
        // with them), which is a miss, not a bug. Give it the room.
        let roomy;
        let c = if ctx.kind == crate::Kind::Memory {
            roomy = icache::ICache::from_url("memory://?max_bytes=268435456").expect("open");
            &roomy
        } else {
            &ctx.cache
        };
        for size in [0usize, 1, 1000, 1 << 20, 10 << 20] {
            let value = "v".repeat(size);
            c.set_versioned("sized", value.as_str(), size as u64)
                .expect("set");
            let got = c
                .get_versioned("sized", size as u64)
                .expect("get")
                .expect("hit");
            assert_eq!(got.len(), size);
            let f = c
                .fragment("t", &["sized", &size.to_string()], || {
                    Ok::<_, ()>(value.clone())
                })
                .expect("fragment");
            assert_eq!(f.len(), size);
            let hit = c
                .fragment("t", &["sized", &size.to_string()], || {
                    Ok::<_, ()>(String::new())
                })
                .expect("fragment");
            assert_eq!(hit.len(), size, "{size}: not a hit");
        }
    }

    pub fn user_a_never_gets_user_b_block(ctx: &Ctx) {
        let c = &ctx.cache;
        // Pairs of argument lists that a naive join would confuse.
        let pairs: &[(&[&str], &[&str])] = &[
            (&["user", "a|b"], &["user", "a", "b"]),
            (&["user", "a#b"], &["user#a", "b"]),
            (&["1:a"], &["1", "a"]),
            (&["2:ab"], &["ab"]),
            (&["a\u{0430}"], &["aa"]),
            (&["x\0"], &["x"]),
            (&[""], &[]),
            (&["", ""], &[""]),
            (&[" "], &[""]),
        ];
        for (n, (a, b)) in pairs.iter().enumerate() {
            // Each pair in its own block, so pairs cannot meet each other.
            let name = format!("pair{n}");
            let a: Vec<&str> = std::iter::once(name.as_str())
                .chain(a.iter().copied())
                .collect();
            let b: Vec<&str> = std::iter::once(name.as_str())
                .chain(b.iter().copied())
                .collect();
            let (a, b) = (&a[..], &b[..]);
            let fa = c
                .fragment("t", a, || Ok::<_, ()>(format!("A{n}")))
                .expect("a");
            let fb = c
                .fragment("t", b, || Ok::<_, ()>(format!("B{n}")))
                .expect("b");
            assert_eq!(
                (fa.as_str(), fb.as_str()),
                (format!("A{n}").as_str(), format!("B{n}").as_str()),
                "pair {n}"
            );
            let fa = c
                .fragment("t", a, || Ok::<_, ()>("miss".into()))
                .expect("a");
            let fb = c
                .fragment("t", b, || Ok::<_, ()>("miss".into()))
                .expect("b");
            assert_eq!(
                (fa, fb),
                (format!("A{n}"), format!("B{n}")),
                "pair {n} after hits"
            );
        }
        // Long arguments that differ only at the very end.
        let long_a = format!("{}a", "u".repeat(100_000));
        let long_b = format!("{}b", "u".repeat(100_000));
        let fa = c
            .fragment("t", &[&long_a], || Ok::<_, ()>("A".into()))
            .expect("a");
        let fb = c
            .fragment("t", &[&long_b], || Ok::<_, ()>("B".into()))
            .expect("b");
        assert_eq!((fa.as_str(), fb.as_str()), ("A", "B"));
    }

    pub fn prefixes_keep_fragments_and_tokens_apart(ctx: &Ctx) {
        let one = ctx.open("prefix=app-one");
        let two = ctx.open("prefix=app-two");
        assert_eq!(
            one.fragment("t", &["movies"], || Ok::<_, ()>("one".into()))
                .expect("f"),
            "one"
        );
        assert_eq!(
            two.fragment("t", &["movies"], || Ok::<_, ()>("two".into()))
                .expect("f"),
            "two"
        );
        let g1 = one.generations(&["movies"]).expect("g");
        two.incr("movies").expect("incr");
        assert_eq!(one.generations(&["movies"]).expect("g"), g1);
        assert_eq!(
            one.fragment("t", &["movies"], || Ok::<_, ()>("miss".into()))
                .expect("f"),
            "one"
        );
    }
}

/// memcached's default item limit (1 MB): a large block is served, not
/// stored, and counted; a large `set_versioned` is a clear error.
#[test]
fn memcached_item_limit_is_a_clear_skip() {
    let Some(server) = MemcachedServer::start_with(&["-I", "1m"]) else {
        return;
    };
    let c = ICache::from_url(&format!("{}?timeout_ms=2000", server.url())).expect("open");
    let big = "b".repeat(2 << 20);
    let out = c
        .fragment("t", &["big"], || Ok::<_, ()>(big.clone()))
        .expect("served");
    assert_eq!(out.len(), big.len());
    let s = c.stats();
    assert_eq!((s.too_large, s.stores, s.errors), (1, 0, 0), "{s:?}");
    let e = c
        .set_versioned("big", big.as_str(), 1)
        .expect_err("too large");
    assert!(e.is_too_large(), "{e}");
    assert!(
        e.to_string().contains("-I"),
        "the message says what to change: {e}"
    );
    // Everything else still works.
    c.set_versioned("small", "ok", 1).expect("set");
    assert_eq!(
        c.get_versioned("small", 1).expect("get").as_deref(),
        Some("ok")
    );
    let _ = Kind::Memcached;
}
