//! Draining to a deadline: which running jobs can finish before the
//! process must be gone, and which are better handed back at once so that
//! another worker can start them sooner.
//!
//! A job's expected remaining time comes from its progress (elapsed ÷
//! fraction done), or, while it reported none, from its command's
//! `typical_duration` (less the time it ran; a job past it is expected to
//! end any moment, until it has run twice as long). A job with neither, or
//! that ran past twice its typical duration, has an unknown end: on an
//! instance notice
//! it is released at once unless `unknown_eta = "run-to-deadline"`; on a
//! signal it runs until the drain deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::UnknownEta;

/// A running job, as the drain sees it.
#[derive(Debug)]
struct Running {
    cancel: CancellationToken,
    started: Instant,
    /// Its command's `typical_duration`.
    typical: Option<Duration>,
    /// Latest percent done, from the command's progress reports.
    progress: Arc<Mutex<Option<f64>>>,
}

/// The jobs running in this process.
#[derive(Debug, Default)]
pub struct RunningJobs {
    next: AtomicU64,
    jobs: Mutex<HashMap<u64, Running>>,
}

/// A job's place in [`RunningJobs`]; it leaves when this is dropped.
#[derive(Debug)]
pub struct Registered<'a> {
    id: u64,
    jobs: &'a RunningJobs,
    /// Where the job's progress goes.
    pub progress: Arc<Mutex<Option<f64>>>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.jobs.lock().remove(&self.id);
    }
}

impl Registered<'_> {
    /// Records a progress report.
    pub fn report(progress: &Mutex<Option<f64>>, percent: f64) {
        if let Ok(mut p) = progress.lock() {
            *p = Some(percent);
        }
    }
}

/// Expected time left: elapsed × (100 − p) ÷ p, once some progress is known.
pub fn eta(elapsed: Duration, percent: Option<f64>) -> Option<Duration> {
    let p = percent.filter(|p| *p > 0.0)?.min(100.0);
    Some(elapsed.mul_f64((100.0 - p) / p))
}

impl RunningJobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Running>> {
        self.jobs.lock().expect("running jobs lock")
    }

    pub fn register(&self, cancel: CancellationToken, typical: Option<Duration>) -> Registered<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let progress = Arc::new(Mutex::new(None));
        self.lock().insert(
            id,
            Running {
                cancel,
                started: Instant::now(),
                typical,
                progress: progress.clone(),
            },
        );
        Registered {
            id,
            jobs: self,
            progress,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cancels (so hands back) every job not expected to end by `cutoff`;
    /// `unknown` decides for jobs that reported no progress. Returns how
    /// many were cancelled now.
    pub fn release_late(&self, cutoff: Instant, unknown: UnknownEta) -> usize {
        let now = Instant::now();
        let mut released = 0;
        for job in self.lock().values() {
            if job.cancel.is_cancelled() {
                continue;
            }
            let percent = *job.progress.lock().expect("progress lock");
            let elapsed = now - job.started;
            let left = eta(elapsed, percent).or_else(|| {
                job.typical
                    .filter(|typical| *typical * 2 > elapsed)
                    .map(|typical| typical.saturating_sub(elapsed))
            });
            let late = match left {
                Some(left) => now + left > cutoff,
                None => unknown == UnknownEta::Release,
            };
            if late {
                job.cancel.cancel();
                released += 1;
            }
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_follows_progress() {
        let ten = Duration::from_secs(10);
        assert_eq!(eta(ten, None), None);
        assert_eq!(eta(ten, Some(0.0)), None);
        assert_eq!(eta(ten, Some(50.0)), Some(ten));
        assert_eq!(eta(ten, Some(25.0)), Some(Duration::from_secs(30)));
        assert_eq!(eta(ten, Some(100.0)), Some(Duration::ZERO));
    }

    #[tokio::test]
    async fn only_jobs_that_cannot_make_it_are_released() {
        let jobs = RunningJobs::default();
        let (quick, slow, silent) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let q = jobs.register(quick.clone(), None);
        let s = jobs.register(slow.clone(), None);
        let _u = jobs.register(silent.clone(), None);
        tokio::time::sleep(Duration::from_millis(100)).await;
        *q.progress.lock().unwrap() = Some(90.0);
        *s.progress.lock().unwrap() = Some(1.0);
        let cutoff = Instant::now() + Duration::from_secs(2);
        assert_eq!(jobs.release_late(cutoff, UnknownEta::RunToDeadline), 1);
        assert!(!quick.is_cancelled() && slow.is_cancelled() && !silent.is_cancelled());
        assert_eq!(jobs.release_late(cutoff, UnknownEta::Release), 1);
        assert!(silent.is_cancelled() && !quick.is_cancelled());
        drop(q);
        assert_eq!(jobs.len(), 2);
    }

    #[tokio::test]
    async fn a_silent_job_is_judged_by_its_typical_duration() {
        let jobs = RunningJobs::default();
        let (short, long, overdue) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let _s = jobs.register(short.clone(), Some(Duration::from_secs(1)));
        let _l = jobs.register(long.clone(), Some(Duration::from_secs(60)));
        let _o = jobs.register(overdue.clone(), Some(Duration::from_millis(1)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let cutoff = Instant::now() + Duration::from_secs(5);
        // Past twice its typical duration, a job's end is unknown again.
        assert_eq!(jobs.release_late(cutoff, UnknownEta::RunToDeadline), 1);
        assert!(!short.is_cancelled() && long.is_cancelled() && !overdue.is_cancelled());
        assert_eq!(jobs.release_late(cutoff, UnknownEta::Release), 1);
        assert!(overdue.is_cancelled() && !short.is_cancelled());
    }
}
