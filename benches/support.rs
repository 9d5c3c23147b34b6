//! Helpers both bench binaries use.

#![allow(dead_code)]

use std::time::Duration;

use rand::Rng;

/// Length of one measured round: `TENANTRY_BENCH_SECONDS` (default 3).
pub fn seconds_per_round() -> Duration {
    let seconds = std::env::var("TENANTRY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(seconds)
}

/// The `p` quantile (0..=1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// A short random lowercase id for names unique to one run.
pub fn run_id() -> String {
    let mut rng = rand::rng();
    (0..6)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}
