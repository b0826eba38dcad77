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

    /// Runs `op` up to `tries` times, waiting after each failure that
    /// `transient` accepts; the last error (or the first one that is not
    /// transient) is returned. For calls retried in place, where giving up
    /// would cost more than waiting (a finished render's delete, an array
    /// child's ledger write).
    pub async fn retry<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
        &self,
        tries: u32,
        what: &str,
        transient: impl Fn(&E) -> bool,
        mut op: impl FnMut() -> F,
    ) -> Result<T, E> {
        let mut failures = 0;
        loop {
            match op().await {
                Err(error) if failures + 1 < tries && transient(&error) => {
                    failures += 1;
                    let delay = self.delay(failures);
                    tracing::warn!(%error, ?delay, "{what} failed; trying again");
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
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

    #[tokio::test]
    async fn retries_in_place_what_is_transient_and_no_more_than_asked() {
        let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
        let calls = std::cell::Cell::new(0);
        let flaky = || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 3 {
                    Err(format!("try {n}"))
                } else {
                    Ok(n)
                }
            }
        };
        assert_eq!(backoff.retry(5, "call", |_| true, flaky).await, Ok(3));
        calls.set(0);
        assert_eq!(
            backoff.retry(2, "call", |_| true, flaky).await,
            Err("try 2".into())
        );
        calls.set(0);
        assert_eq!(
            backoff.retry(5, "call", |_| false, flaky).await,
            Err("try 1".into())
        );
    }

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
