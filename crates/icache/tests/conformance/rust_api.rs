//! The Rust block API (`fragment(name, tokens, body)`) on every backend:
//! identity by name (a user's helper around `fragment` keeps its callers'
//! blocks apart), tokens of any string type, and what an observer is told.

use std::convert::Infallible;

use icache::{ICache, Outcome};

use crate::Ctx;

suite!(rust_api = crate::rust_api::cases:
    a_helper_keeps_blocks_apart_by_name,
    owned_and_borrowed_tokens_are_one_block,
    events_carry_every_read,
);

/// A user's own helper around `fragment`, as the issue wrote it: nothing in
/// it knows which block it serves but the name it is given.
fn cached_block<E>(
    cache: &ICache,
    name: &str,
    tokens: &[&str],
    body: impl FnOnce() -> Result<String, E>,
) -> Result<String, E> {
    cache.fragment(name, tokens, body)
}

fn ok(s: &str) -> Result<String, Infallible> {
    Ok(s.to_owned())
}

pub mod cases {
    use super::*;

    /// A "list" block and a "count" block with the same tokens, through one
    /// helper: with call-site identity both were the helper's one block, and
    /// the count showed the list.
    pub fn a_helper_keeps_blocks_apart_by_name(ctx: &Ctx) {
        let cache = &ctx.cache;
        let tokens = ["items", "user:7"];
        for round in 0..2 {
            let list = cached_block(cache, "list", &tokens, || ok("<ul><li>a</li></ul>"));
            let count = cached_block(cache, "count", &tokens, || ok("1 item"));
            assert_eq!(list.as_deref(), Ok("<ul><li>a</li></ul>"), "round {round}");
            assert_eq!(count.as_deref(), Ok("1 item"), "round {round}");
        }
        // Each one is a hit of its own entry now, and a bump renders both.
        let hit = cached_block(cache, "count", &tokens, || ok("not rendered"));
        assert_eq!(hit.as_deref(), Ok("1 item"));
        cache.incr("items").expect("incr");
        let list = cached_block(cache, "list", &tokens, || ok("<ul></ul>"));
        let count = cached_block(cache, "count", &tokens, || ok("0 items"));
        assert_eq!(
            (list.as_deref(), count.as_deref()),
            (Ok("<ul></ul>"), Ok("0 items"))
        );
    }

    /// `&[&str]`, `Vec<String>`, `[String; N]` and `&[String]` are the same
    /// tokens: one entry.
    pub fn owned_and_borrowed_tokens_are_one_block(ctx: &Ctx) {
        let cache = &ctx.cache;
        let user_id = 42.to_string();
        let first = cache.fragment("owned", &["movies", &user_id], || ok("<p>42</p>"));
        assert_eq!(first.as_deref(), Ok("<p>42</p>"));
        let vec: Vec<String> = vec!["movies".into(), user_id.clone()];
        let array: [String; 2] = ["movies".into(), user_id.clone()];
        let slice: &[String] = &vec;
        for (kind, html) in [
            ("Vec<String>", cache.fragment("owned", &vec, || ok("miss"))),
            (
                "[String; 2]",
                cache.fragment("owned", &array, || ok("miss")),
            ),
            ("&[String]", cache.fragment("owned", slice, || ok("miss"))),
        ] {
            assert_eq!(html.as_deref(), Ok("<p>42</p>"), "{kind}");
        }
        // More tokens than fit on the stack take the other path: same rules.
        let many: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
        assert_eq!(
            cache.fragment("many", &many, || ok("40")).as_deref(),
            Ok("40")
        );
        let borrowed: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            cache.fragment("many", &borrowed, || ok("miss")).as_deref(),
            Ok("40")
        );
        cache.incr("t39").expect("incr");
        assert_eq!(
            cache.fragment("many", &many, || ok("again")).as_deref(),
            Ok("again")
        );
    }

    /// `BlockEvent::reads`: every token the output was computed from, own
    /// and nested, with the generation it was computed at; the same on the
    /// hit that serves it, and new generations after a bump.
    pub fn events_carry_every_read(ctx: &Ctx) {
        let cache = &ctx.cache;
        let page = || {
            cache.fragment("page", &["page"], || {
                let inner = cache.fragment("item", &["item:1"], || ok("<li/>"))?;
                Ok::<_, Infallible>(format!("<ul>{inner}</ul>"))
            })
        };
        let expected = |cache: &ICache| -> Vec<(String, u64)> {
            // Sorted by token, as `without_flush` sorts the reads.
            let g = cache.generations(&["item:1", "page"]).expect("gens");
            vec![("item:1".into(), g[0]), ("page".into(), g[1])]
        };
        // Every block also reads the flush token (`ICache::flush`): present
        // in each block's reads, with its current generation.
        let flush = cache
            .generations(&[ICache::FLUSH_TOKEN])
            .expect("gens")
            .first()
            .copied()
            .expect("one generation");
        let without_flush = |reads: &[(String, u64)]| -> Vec<(String, u64)> {
            assert!(
                reads.contains(&(ICache::FLUSH_TOKEN.to_owned(), flush)),
                "no flush token in {reads:?}"
            );
            let mut r: Vec<_> = reads
                .iter()
                .filter(|(t, _)| t != ICache::FLUSH_TOKEN)
                .cloned()
                .collect();
            r.sort();
            r
        };
        let (html, events) = icache::observe(page);
        assert_eq!(html.as_deref(), Ok("<ul><li/></ul>"));
        let outer = events.last().expect("events");
        assert_eq!(outer.outcome, Outcome::Stored, "{events:?}");
        assert_eq!(without_flush(&outer.reads), expected(cache));
        assert_eq!(
            without_flush(&events[0].reads),
            expected(cache)[..1].to_vec()
        );
        let (_, events) = icache::observe(page);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].outcome, Outcome::Hit);
        assert_eq!(without_flush(&events[0].reads), expected(cache));
        cache.incr("item:1").expect("incr");
        let (_, events) = icache::observe(page);
        let outer = events.last().expect("events");
        assert_eq!(outer.outcome, Outcome::Stored, "{events:?}");
        assert_eq!(without_flush(&outer.reads), expected(cache));
    }
}
