//! Timing shared by the overhead benches: the median of rounds, and ns per call of a closure.

use std::time::{Duration, Instant};

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// ns per call of `f`: the median of `rounds` rounds of `round_time`, `f` called `batch` times
/// between clock reads (the clock's cost stays out of short calls).
#[allow(dead_code)]
pub fn per_call(rounds: usize, round_time: Duration, batch: u64, f: &mut dyn FnMut()) -> f64 {
    let rounds = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < round_time {
                for _ in 0..batch {
                    f();
                }
                n += batch;
            }
            start.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    median(rounds)
}
