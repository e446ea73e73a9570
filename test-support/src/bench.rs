//! What the benchmarks share: a `main` that runs one async function and reports its error, and
//! latency figures (quantiles, calls per second) in the JSON the tables are printed from.

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Runs `run` on a 2-thread runtime: exit 0, or 1 with `name: error` on stderr.
pub fn main<E: std::fmt::Display, F: Future<Output = Result<(), E>>>(name: &str, run: impl FnOnce() -> F) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Timed calls, sorted, and the wall time they took together.
pub struct Latencies {
    samples: Vec<Duration>,
    wall: Duration,
}

impl Latencies {
    pub fn new(mut samples: Vec<Duration>, wall: Duration) -> Self {
        samples.sort_unstable();
        Latencies { samples, wall }
    }

    /// `n` calls one after another, each timed; stops at the first that fails.
    pub async fn sequential<E, Fut: Future<Output = Result<(), E>>>(
        n: usize,
        mut call: impl FnMut() -> Fut,
    ) -> Result<Latencies, E> {
        let mut samples = Vec::with_capacity(n);
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            call().await?;
            samples.push(t.elapsed());
        }
        Ok(Latencies::new(samples, start.elapsed()))
    }

    /// Parts timed apart (rounds that took turns with other figures) as one: their samples, and
    /// the wall time they took together.
    pub fn join(parts: impl IntoIterator<Item = Latencies>) -> Latencies {
        let (mut samples, mut wall) = (Vec::new(), Duration::ZERO);
        for part in parts {
            samples.extend(part.samples);
            wall += part.wall;
        }
        Latencies::new(samples, wall)
    }

    /// The `q` quantile (the nearest rank); zero with no samples.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.samples.len() as f64 * q).ceil() as usize).clamp(1, self.samples.len()) - 1;
        self.samples[i]
    }

    /// How many calls were timed.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn per_sec(&self) -> f64 {
        self.samples.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn json(&self) -> Value {
        let us = |d: Duration| d.as_micros() as u64;
        json!({
            "calls": self.samples.len(),
            "p50_us": us(self.quantile(0.50)),
            "p99_us": us(self.quantile(0.99)),
            "max_us": us(self.quantile(1.0)),
            "per_sec": self.per_sec().round(),
            "wall_s": self.wall.as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_ranks() {
        let ms = |n: u64| Duration::from_millis(n);
        let l = Latencies::new((1..=100).rev().map(ms).collect(), Duration::from_secs(2));
        assert_eq!((l.quantile(0.5), l.quantile(0.99), l.quantile(1.0)), (ms(50), ms(99), ms(100)));
        assert_eq!(l.per_sec(), 50.0);
        assert_eq!(Latencies::new(vec![], Duration::ZERO).quantile(0.5), Duration::ZERO);
    }
}
