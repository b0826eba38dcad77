//! The one back-off policy: the worker's retries of failed jobs, its waits
//! on an unreachable queue, and `http_post`'s retries all use it.

use std::time::Duration;

/// Exponential back-off: `base × 2^(tries−1)`, capped at `max`, less up to
/// a tenth at random, so that jobs that failed together do not all come
/// back at the same moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The wait after the `tries`th failure (1 for the first).
    pub fn delay(&self, tries: u32) -> Duration {
        self.ceiling(tries).mul_f64(1.0 - fastrand::f64() / 10.0)
    }

    /// The wait before jitter.
    pub fn ceiling(&self, tries: u32) -> Duration {
        self.base
            .saturating_mul(2u32.saturating_pow(tries.saturating_sub(1)))
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_jitters_down_by_at_most_a_tenth() {
        let backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
        assert_eq!(backoff.ceiling(1), Duration::from_secs(5));
        assert_eq!(backoff.ceiling(2), Duration::from_secs(10));
        assert_eq!(backoff.ceiling(4), Duration::from_secs(40));
        assert_eq!(backoff.ceiling(5), Duration::from_secs(60));
        assert_eq!(backoff.ceiling(40), Duration::from_secs(60));
        for tries in 1..8 {
            let delay = backoff.delay(tries);
            let ceiling = backoff.ceiling(tries);
            assert!(
                delay <= ceiling && delay >= ceiling.mul_f64(0.9),
                "{delay:?}"
            );
        }
    }
}
