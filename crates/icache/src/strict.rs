//! `near=tracking&strict=true`: bumps that no trusting reader can miss.
//!
//! Under `near=tracking` a reader trusts its in-process generations only
//! while a ping it sent at most `max_lag` ago has been answered on its
//! tracking connection, and Redis sends a bump's invalidation before it
//! answers any command that came after the bump (see
//! `backend/redis/tracking.rs`). So once `max_lag` has passed since the
//! server applied a bump, a reader trusts its table only on the strength of
//! a ping sent after the bump, answered after the invalidation: no trusting
//! table still holds the old generation. A strict bump waits exactly that
//! long before it returns (Chubby's lease argument): reads stay 0 round
//! trips, and the promise is "never stale" again, at the cost of `max_lag`
//! per bump. The wait starts when the answer arrived, which is after the
//! server applied the bump, so it errs on the safe side; it measures time on
//! this machine's monotonic clock, as readers measure theirs.

use crate::config::{Config, Near};

/// Waits, after a bump the server confirmed, for as long as a reader may
/// still trust a table without it (nothing unless `strict=true`).
pub(crate) fn after_bump(config: &Config) {
    if let (true, Near::Tracking { max_lag }) = (config.strict, config.near) {
        std::thread::sleep(max_lag);
    }
}
