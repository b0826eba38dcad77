//! Taking up `[worker] run_as` at start: the checks that refuse a worker
//! whose jobs could not run as their user, and the modes that keep the
//! worker's state from them (what owns what is decided in
//! [`crate::access`]).

use anyhow::Context;

use super::App;
use crate::access::JobUser;
use crate::config::{BucketConfig, EventTargetConfig, Invalid, QueueConfig};

impl App {
    /// Takes up `[worker] run_as` before the first job: refuses a user
    /// this process cannot switch to (an error naming the setting), warns
    /// once when jobs would run as root, and with a job user keeps the
    /// worker's state out of its reach (see [`crate::access`]).
    pub(super) fn take_up_job_user(&self) -> anyhow::Result<()> {
        let job_user = self.config.worker.job_user();
        job_user
            .check()
            .map_err(|e| self.config.locate(Invalid::new("worker.run_as", e)))?;
        let JobUser::Account(account) = &job_user else {
            return Ok(());
        };
        // What the job user must reach, checked now rather than failing
        // every job later.
        let work = self.config.worker.work_root();
        if let Some(why) = account.cannot_reach(&work) {
            let message = format!("jobs cannot reach work_dir {}: {why}", work.display());
            return Err(self
                .config
                .locate(Invalid::new("worker.run_as", message))
                .into());
        }
        for command in self.catalog.commands() {
            if let Some(why) = command.program().and_then(|p| account.cannot_reach(p)) {
                let key = format!("commands.{}.program", command.name);
                let message = format!("cannot be run as worker.run_as: {why}");
                return Err(self.config.locate(Invalid::new(key, message)).into());
            }
        }
        let queues = self.config.queues.values().filter_map(|q| match q {
            QueueConfig::Local(local) => Some(local.path.clone()),
            QueueConfig::Sqs(_) => None,
        });
        let buckets = self.config.buckets.values().filter_map(|b| match b {
            BucketConfig::Local(local) => Some(local.path.clone()),
            BucketConfig::S3(_) => None,
        });
        let files = self.config.events.targets.values().filter_map(|t| match t {
            EventTargetConfig::File(file) => Some(file.path.clone()),
            _ => None,
        });
        let status = self.config.events.status.path().map(ToOwned::to_owned);
        let keep = |path: &std::path::Path| format!("cannot keep {} from jobs", path.display());
        for dir in queues.chain(buckets) {
            crate::access::seal_dir(&dir).with_context(|| keep(&dir))?;
        }
        for file in files {
            crate::access::seal_log(&file).with_context(|| keep(&file))?;
        }
        if let Some(file) = status {
            crate::access::seal(&file).with_context(|| keep(&file))?;
        }
        Ok(())
    }
}
