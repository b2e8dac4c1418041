//! `ICache::flush()` and `?salt=`: what no token or template digest sees.
//! A flush is one bump of the flush token, part of every block's version: every
//! block misses once, on every handle; another salt is another key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use icache::ICache;

use crate::Ctx;

/// The block these tests cache; `ran` counts its renders.
fn block(cache: &ICache, name: &str, tokens: &[&str], ran: &AtomicU64) -> String {
    cache
        .fragment(name, tokens, || {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(format!("<p>{name}</p>"))
        })
        .expect("blocks never fail")
}

/// Renders of `name` on `cache` until one is a hit (a tracking handle may
/// see a bump up to `max_lag_ms` late); the renders it took.
fn until_hit(cache: &ICache, name: &str, tokens: &[&str]) -> u64 {
    let ran = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = ran.load(Ordering::SeqCst);
        block(cache, name, tokens, &ran);
        if ran.load(Ordering::SeqCst) == before {
            return before;
        }
        assert!(Instant::now() < deadline, "{name}: never a hit");
    }
}

pub fn flush_makes_every_block_miss_once_across_handles(ctx: &Ctx) {
    let a = &ctx.cache;
    // The memory backend is per handle: its second handle is a clone.
    let b = &if ctx.kind == crate::Kind::Memory {
        a.clone()
    } else {
        ctx.open("")
    };
    let ran = AtomicU64::new(0);
    for name in ["with-tokens", "tokenless"] {
        let tokens: &[&str] = if name == "tokenless" {
            &[]
        } else {
            &["movies"]
        };
        block(a, name, tokens, &ran);
        block(b, name, tokens, &ran);
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        2,
        "two blocks, each rendered once"
    );
    let generation = a.flush().expect("flush");
    assert!(generation > 1);
    // Another handle may see a bump `max_lag` late (near=tracking's bound).
    std::thread::sleep(b.max_lag() * 2);
    // One handle renders each block again; then both hit.
    block(b, "with-tokens", &["movies"], &ran);
    block(b, "tokenless", &[], &ran);
    assert_eq!(
        ran.load(Ordering::SeqCst),
        4,
        "each block rendered once after the flush"
    );
    assert_eq!(until_hit(a, "with-tokens", &["movies"]), 0);
    assert_eq!(until_hit(b, "tokenless", &[]), 0);
    // `icache bump icache:flush` is the same thing.
    a.incr(ICache::FLUSH_TOKEN).expect("bump");
    std::thread::sleep(b.max_lag() * 2);
    block(b, "with-tokens", &["movies"], &ran);
    assert_eq!(ran.load(Ordering::SeqCst), 5);
}

pub fn salt_changes_every_block_key(ctx: &Ctx) {
    if ctx.kind == crate::Kind::Memory {
        // A salt on memory:// is a new handle, and so a new store: every
        // block misses by construction. The keyed path is checked anyway.
        let salted = ICache::from_url("memory://?salt=v2").expect("open");
        let ran = AtomicU64::new(0);
        block(&salted, "list", &["movies"], &ran);
        block(&salted, "list", &["movies"], &ran);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        return;
    }
    let v1 = ctx.open("salt=deploy-1");
    let v1_again = ctx.open("salt=deploy-1");
    let v2 = ctx.open("salt=deploy-2");
    let plain = ctx.open("");
    let ran = AtomicU64::new(0);
    block(&v1, "list", &["movies"], &ran);
    block(&v1_again, "list", &["movies"], &ran);
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "the same salt shares entries"
    );
    block(&v2, "list", &["movies"], &ran);
    assert_eq!(ran.load(Ordering::SeqCst), 2, "another salt misses");
    block(&plain, "list", &["movies"], &ran);
    assert_eq!(
        ran.load(Ordering::SeqCst),
        3,
        "no salt is a salt of its own"
    );
    // Both deploys keep their entries side by side (a rolling deploy).
    assert_eq!(until_hit(&v1, "list", &["movies"]), 0);
    assert_eq!(until_hit(&v2, "list", &["movies"]), 0);
    // Tokens and bumps are shared whatever the salt.
    v1.incr("movies").expect("incr");
    std::thread::sleep(v2.max_lag() * 2);
    block(&v2, "list", &["movies"], &ran);
    assert_eq!(ran.load(Ordering::SeqCst), 4, "a bump reaches every salt");
    assert!(
        !v1.url().contains("deploy-1"),
        "the salt is not shown: {}",
        v1.url()
    );
}
