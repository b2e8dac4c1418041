//! A tiny seeded generator (splitmix64): the whole schedule, and every
//! thread's choices, come from one `--seed`, so a failing run can be replayed.

use std::time::Duration;

/// splitmix64: small, fast, and good enough to draw a fault schedule.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// The generator of one named stream (`"schedule"`, `"reader"`…) of a seed,
    /// so that adding a thread or a fault kind does not shift other streams.
    pub(crate) fn derive(seed: u64, stream: &str, n: u64) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in stream.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut rng = Rng(seed ^ h ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Warm up: nearby seeds give unrelated first draws.
        rng.next_u64();
        rng
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`0` when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        let wide = u128::from(self.next_u64()) * n as u128;
        usize::try_from(wide >> 64).unwrap_or(0)
    }

    /// Uniform in `lo..hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        let span = hi.saturating_sub(lo).max(1);
        lo + ((u128::from(self.next_u64()) * u128::from(span)) >> 64) as u64
    }

    /// `true` with probability `per_mille / 1000`.
    pub(crate) fn chance(&mut self, per_mille: u64) -> bool {
        self.range(0, 1000) < per_mille
    }

    /// A duration uniform in `lo_ms..hi_ms` milliseconds.
    pub(crate) fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(self.range(lo_ms, hi_ms))
    }

    /// One element of a non-empty slice.
    pub(crate) fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn same_seed_same_draws_and_bounds_hold() {
        let mut a = Rng::derive(7, "schedule", 0);
        let mut b = Rng::derive(7, "schedule", 0);
        let mut c = Rng::derive(7, "schedule", 1);
        let (xa, xb, xc): (Vec<u64>, Vec<u64>, Vec<u64>) = (
            (0..8).map(|_| a.range(10, 20)).collect(),
            (0..8).map(|_| b.range(10, 20)).collect(),
            (0..8).map(|_| c.range(10, 20)).collect(),
        );
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
        assert!(xa.iter().all(|x| (10..20).contains(x)));
        assert!((0..1000).all(|_| a.below(3) < 3));
    }
}
