//! Whether this worker is fit to run a job, judged from how its own tries
//! ended (pure: `settle` feeds it every try's end, the slot asks it before
//! a job runs).
//!
//! - Per job: after `blocklist_after` failed tries of one job (an array's
//!   children count as the array), the worker gives that job's messages
//!   back unrun, for as long as it lives.
//! - Per worker: after `sick_after` consecutive failed tries, of at least
//!   two jobs, the worker is sick: it takes no job again.
//!
//! Only tries that ran and failed count; a success ends a run of failures,
//! and what ended through no fault of the worker (a cancel, a hand-back,
//! a refusal at validation) counts neither way.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// Jobs whose failures are remembered; the oldest is forgotten past this,
/// so a worker that lives for months does not grow.
const REMEMBERED_JOBS: usize = 10_000;

/// Reasons kept for the `WorkerUnhealthy` event and `/healthz`.
const REASONS_KEPT: usize = 5;

/// How a try ended, as far as the worker's health goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TryEnd {
    /// It ran and succeeded.
    Succeeded,
    /// It ran and failed, for this reason.
    Failed(String),
    /// It ended through no fault of the worker.
    Neutral,
}

/// Whether a job may run here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Run,
    /// This worker failed it `failures` times already.
    Blocklisted {
        failures: u32,
    },
    /// This worker takes no job any more.
    Sick,
}

/// Why the worker stopped taking jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sickness {
    /// Consecutive failed tries.
    pub tries: u32,
    /// Different jobs among them.
    pub jobs: usize,
    /// The last few failures' reasons, most recent last.
    pub reasons: Vec<String>,
}

impl std::fmt::Display for Sickness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} consecutive failed tries of {} jobs; last: {}",
            self.tries,
            self.jobs,
            self.reasons.last().map_or("", String::as_str)
        )
    }
}

#[derive(Debug)]
pub struct Health {
    blocklist_after: u32,
    sick_after: u32,
    /// Failed tries by job, and the jobs in the order first failed.
    failures: HashMap<String, u32>,
    order: VecDeque<String>,
    /// The current run of failed tries: (job, reason), oldest first.
    streak: VecDeque<(String, String)>,
    sick: Option<Sickness>,
}

impl Health {
    /// `blocklist_after` and `sick_after` are at least 1 (the config
    /// checks them).
    pub fn new(blocklist_after: u32, sick_after: u32) -> Self {
        Self {
            blocklist_after,
            sick_after,
            failures: HashMap::new(),
            order: VecDeque::new(),
            streak: VecDeque::new(),
            sick: None,
        }
    }

    /// Whether `job` may run here now.
    pub fn admits(&self, job: &str) -> Admission {
        if self.sick.is_some() {
            return Admission::Sick;
        }
        match self.failures.get(job) {
            Some(&failures) if failures >= self.blocklist_after => {
                Admission::Blocklisted { failures }
            }
            _ => Admission::Run,
        }
    }

    /// Notes how a try of `job` ended. `Some` once, when this try made the
    /// worker sick.
    pub fn record(&mut self, job: &str, end: TryEnd) -> Option<Sickness> {
        match end {
            TryEnd::Neutral => return None,
            TryEnd::Succeeded => {
                self.streak.clear();
                return None;
            }
            TryEnd::Failed(reason) => {
                self.count_failure(job);
                self.streak.push_back((job.to_owned(), reason));
                // Only the last `sick_after` tries can make it sick.
                while self.streak.len() > self.sick_after as usize {
                    self.streak.pop_front();
                }
            }
        }
        if self.sick.is_some() || self.streak.len() < self.sick_after as usize {
            return None;
        }
        let mut jobs: Vec<&str> = self.streak.iter().map(|(j, _)| j.as_str()).collect();
        jobs.sort_unstable();
        jobs.dedup();
        if jobs.len() < 2 {
            return None;
        }
        let sickness = Sickness {
            tries: self.streak.len() as u32,
            jobs: jobs.len(),
            reasons: (self.streak.iter())
                .skip(self.streak.len().saturating_sub(REASONS_KEPT))
                .map(|(_, reason)| reason.clone())
                .collect(),
        };
        self.sick = Some(sickness.clone());
        Some(sickness)
    }

    fn count_failure(&mut self, job: &str) {
        if let Some(count) = self.failures.get_mut(job) {
            *count += 1;
            return;
        }
        if self.order.len() >= REMEMBERED_JOBS
            && let Some(oldest) = self.order.pop_front()
        {
            self.failures.remove(&oldest);
        }
        self.failures.insert(job.to_owned(), 1);
        self.order.push_back(job.to_owned());
    }
}

/// That the worker is sick, and why: set once, read by `/healthz`, and
/// awaited by whoever must act on it (the slots, the autoscaling group).
#[derive(Debug, Clone, Default)]
pub struct SickFlag {
    inner: Arc<(OnceLock<String>, CancellationToken)>,
}

impl SickFlag {
    /// Raises the flag; `false` if it was up already.
    pub fn raise(&self, reason: String) -> bool {
        let raised = self.inner.0.set(reason).is_ok();
        self.inner.1.cancel();
        raised
    }

    /// Why the worker is sick; `None` while it is well.
    pub fn reason(&self) -> Option<&str> {
        self.inner.0.get().map(String::as_str)
    }

    /// Cancelled when the flag goes up.
    pub fn token(&self) -> &CancellationToken {
        &self.inner.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> TryEnd {
        TryEnd::Failed("exit status 1".into())
    }

    #[test]
    fn a_job_failed_blocklist_after_times_is_blocklisted_for_good() {
        let mut health = Health::new(2, 5);
        assert_eq!(health.record("a", failed()), None);
        assert_eq!(health.admits("a"), Admission::Run);
        assert_eq!(health.record("a", failed()), None);
        assert_eq!(health.admits("a"), Admission::Blocklisted { failures: 2 });
        // A success elsewhere ends the run of failures, not the blocklist.
        health.record("b", TryEnd::Succeeded);
        assert_eq!(health.admits("a"), Admission::Blocklisted { failures: 2 });
        assert_eq!(health.admits("b"), Admission::Run);
    }

    #[test]
    fn sick_after_consecutive_failures_of_two_jobs_and_only_once() {
        let mut health = Health::new(2, 5);
        for job in ["a", "b", "c", "d"] {
            assert_eq!(health.record(job, failed()), None);
        }
        let sickness = health.record("e", failed()).expect("fifth failure");
        assert_eq!(sickness.tries, 5);
        assert_eq!(sickness.jobs, 5);
        assert_eq!(sickness.reasons.len(), 5);
        assert!(sickness.to_string().contains("exit status 1"));
        assert_eq!(health.admits("z"), Admission::Sick);
        assert_eq!(health.record("f", failed()), None, "announced once");
    }

    #[test]
    fn failures_of_one_job_alone_never_make_it_sick() {
        let mut health = Health::new(100, 3);
        for _ in 0..10 {
            assert_eq!(health.record("a", failed()), None);
        }
        assert!(health.record("b", failed()).is_some());
    }

    #[test]
    fn a_success_ends_the_run_and_neutral_ends_count_neither_way() {
        let mut health = Health::new(2, 3);
        health.record("a", failed());
        health.record("b", failed());
        health.record("c", TryEnd::Succeeded);
        health.record("d", failed());
        health.record("e", TryEnd::Neutral);
        assert_eq!(health.record("f", failed()), None, "two since the success");
        assert!(health.record("g", failed()).is_some());
    }

    #[test]
    fn old_jobs_are_forgotten_past_the_bound() {
        let mut health = Health::new(1, u32::MAX);
        for i in 0..=REMEMBERED_JOBS {
            health.record(&i.to_string(), failed());
        }
        assert_eq!(health.admits("0"), Admission::Run, "forgotten");
        assert!(matches!(
            health.admits(&REMEMBERED_JOBS.to_string()),
            Admission::Blocklisted { .. }
        ));
    }

    #[test]
    fn the_flag_goes_up_once_and_wakes_its_waiters() {
        let flag = SickFlag::default();
        assert_eq!(flag.reason(), None);
        assert!(flag.raise("full disk".into()));
        assert!(!flag.raise("again".into()));
        assert_eq!(flag.reason(), Some("full disk"));
        assert!(flag.clone().token().is_cancelled());
    }
}
