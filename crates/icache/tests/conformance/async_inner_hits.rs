//! An async block nested in an async block's body that is a **hit** adds
//! its tokens (and its own nested tokens) to the outer block, as a miss
//! does, whichever thread its lookup ran on: on a network backend the
//! lookup runs off the executor, on a blocking thread that is not rendering
//! anything.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::Ctx;

suite!(async_inner_hits = crate::async_inner_hits::cases:
    an_async_inner_hit_adds_its_tokens_to_the_outer,
);

use crate::runtime;

pub mod cases {
    use super::*;

    /// The inner block is stored first (by another page, say); the outer
    /// page then renders with the inner block a hit. A bump of the inner
    /// block's token must re-render the page.
    pub fn an_async_inner_hit_adds_its_tokens_to_the_outer(ctx: &Ctx) {
        let cache = &ctx.cache;
        let data = AtomicUsize::new(0);
        let item = || {
            cache.fragment_async("item", &["inner-hit:item"], || async {
                Ok::<_, Infallible>(format!("item {}", data.load(Ordering::SeqCst)))
            })
        };
        let page = || {
            cache.fragment_async("page", &["inner-hit:page"], || async {
                let inner = item().await?;
                Ok::<_, Infallible>(format!("<p>{inner}</p>"))
            })
        };
        runtime().block_on(async {
            assert_eq!(item().await.as_deref(), Ok("item 0"));
            assert_eq!(page().await.as_deref(), Ok("<p>item 0</p>"));
            data.store(1, Ordering::SeqCst);
            cache.incr_async("inner-hit:item").await.expect("incr");
            assert_eq!(
                page().await.as_deref(),
                Ok("<p>item 1</p>"),
                "the page was stored without the tokens of the block it found cached"
            );
        });
    }
}
