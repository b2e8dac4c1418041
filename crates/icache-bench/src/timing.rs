//! Timing with plain loops: warm-up, calibrated batches, medians.
//!
//! The cases of one comparison are measured in alternating batches (A, B, C,
//! then C, A, B, … in a new random order each round) rather than one after
//! the other, so a burst of noise from the shared machine falls on all of
//! them alike and the ratios stay meaningful even when the absolute times
//! drift.

use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use icache_demo::db::Seq;

/// How long to measure.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Run each case this long before timing it (also calibrates batches).
    pub warmup: Duration,
    /// Target length of one batch.
    pub batch: Duration,
    /// Batches per case; the median batch is the result.
    pub batches: usize,
    /// One round of the multi-threaded throughput test.
    pub round: Duration,
    /// Rounds of the throughput test; the median is the result.
    pub rounds: usize,
}

/// One case of a comparison: a name (for messages) and the operation.
pub struct Case<'a> {
    name: String,
    op: Box<dyn FnMut() + 'a>,
}

impl<'a> Case<'a> {
    /// A case running `op` once per iteration.
    pub fn new(name: impl Into<String>, op: impl FnMut() + 'a) -> Self {
        Case {
            name: name.into(),
            op: Box::new(op),
        }
    }
}

/// Median nanoseconds per operation of each case, in the order given.
pub fn interleaved(plan: &Plan, cases: &mut [Case<'_>]) -> Vec<f64> {
    // Warm-up doubles as calibration: how many iterations fill one batch.
    let iters: Vec<u64> = cases
        .iter_mut()
        .map(|case| {
            let started = Instant::now();
            let mut n = 0u64;
            while n < 3 || started.elapsed() < plan.warmup {
                (case.op)();
                n += 1;
            }
            let per_op = started.elapsed().as_secs_f64() / n as f64;
            ((plan.batch.as_secs_f64() / per_op).ceil() as u64).max(1)
        })
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(plan.batches); cases.len()];
    let mut order: Vec<usize> = (0..cases.len()).collect();
    let mut rng = Seq(0x1cac_4e00_be9c_0001);
    for _ in 0..plan.batches.max(1) {
        // A new order every round: which case runs right after which changes
        // too (on a VM, a round trip right after a CPU-bound batch can cost
        // more than one after another round trip).
        shuffle(&mut rng, &mut order);
        for &i in &order {
            let (case, n) = (&mut cases[i], iters[i]);
            let started = Instant::now();
            for _ in 0..n {
                (case.op)();
            }
            samples[i].push(started.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    samples
        .into_iter()
        .zip(cases.iter())
        .map(|(s, case)| {
            let m = median(s);
            assert!(
                m.is_finite() && m > 0.0,
                "case {:?} measured {m} ns per operation",
                case.name
            );
            m
        })
        .collect()
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The `q` quantile (0..=1) of sorted `values`, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Operations per second with each of `threads` thread counts calling `op`
/// in a loop: the median of `plan.rounds` rounds of `plan.round` each. The
/// rounds of the different counts alternate, as batches do in
/// [`interleaved`], so a burst of noise does not fall on one count only.
pub fn throughput(plan: &Plan, threads: &[usize], op: &(dyn Fn() + Sync)) -> Vec<f64> {
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); threads.len()];
    for _ in 0..plan.rounds.max(1) {
        for (&n, out) in threads.iter().zip(&mut rates) {
            out.push(one_round(plan.round, n, op));
        }
    }
    threads
        .iter()
        .zip(rates)
        .map(|(n, r)| {
            let rate = median(r);
            assert!(
                rate.is_finite() && rate > 0.0,
                "{n} threads measured {rate} operations per second"
            );
            rate
        })
        .collect()
}

fn one_round(length: Duration, threads: usize, op: &(dyn Fn() + Sync)) -> f64 {
    let go = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let mut started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                // One call before the start: connections are open and warm.
                op();
                go.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    op();
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
        go.wait();
        started = Instant::now();
        std::thread::sleep(length);
        stop.store(true, Ordering::Relaxed);
    });
    // Until every thread has finished its last operation: all counted
    // operations fall inside the window.
    total.into_inner() as f64 / started.elapsed().as_secs_f64()
}

/// Fisher-Yates, with the demo's deterministic generator (splitmix64).
fn shuffle(rng: &mut Seq, v: &mut [usize]) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}
