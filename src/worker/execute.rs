//! Running one job: the checks, the inputs, the command ([`Worker::run_command`]);
//! then each task on each output ([`Worker::run_tasks`]), which a slot may
//! leave running while its next job starts.

use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{JobError, Worker};
use crate::commands::usage::UsageCell;
use crate::commands::{CommandError, Progress, ProgressSink, RunContext};
use crate::events::ledger::thumbnail_name;
use crate::events::observe::Subject;
use crate::fleet::drain::Registered;
use crate::job::Output;
use crate::job::inputs::Staged;
use crate::job::output::Thumbnail;
use crate::job::{Envelope, Vars, mime_ext};
use crate::storage::cache::{Cache, CacheError};
use crate::tasks::{Task, TaskError};
use crate::worker::delivery::Delivery;
use crate::worker::staging::Stager;

/// A job whose command has run: what its tasks need.
#[derive(Debug)]
pub(super) struct Ran {
    outputs: Vec<Output>,
    tasks: Vec<Task>,
    /// `${frame}` for an output that shows no frame of its own.
    first_frame: String,
}

impl Worker {
    /// Makes the job's working folder and places its inputs in it, when
    /// it has any.
    async fn stage(
        &self,
        queue: &str,
        envelope: &Envelope,
        abort: &CancellationToken,
    ) -> Result<(Option<Arc<crate::workspace::TempFolder>>, Option<Staged>), JobError> {
        if envelope.inputs.is_empty() {
            return Ok((None, None));
        }
        self.catalog
            .check_inputs(queue, &envelope.inputs)
            .map_err(|e| JobError::Refused(format!("invalid job: {e}")))?;
        let cache = self
            .cache
            .get_or_try_init(|| async {
                let (root, max_size) = (self.config.cache_root(), self.config.cache.max_size);
                let job_user = self.config.job_user();
                let jobs = self
                    .workspace
                    .dir()
                    .map_err(|e| CacheError::Retryable(format!("work folder: {e}")))?
                    .to_owned();
                tokio::task::spawn_blocking(move || Cache::open(&root, max_size, &jobs, &job_user))
                    .await
                    .map_err(|e| CacheError::Retryable(e.to_string()))?
            })
            .await
            .map_err(|e| JobError::Retryable(format!("input cache: {e}")))?;
        let dir = self
            .workspace
            .temp_dir("renderq-job-")
            .map_err(|e| JobError::Retryable(format!("cannot make a working folder: {e}")))?;
        let stager = Stager {
            cache,
            buckets: &self.tasks.buckets,
            download_concurrency: self.config.cache.download_concurrency,
            max_manifest_files: self.config.cache.max_manifest_files,
        };
        let staged = stager.stage(&envelope.inputs, dir.path(), abort).await?;
        // Given once its inputs' folders are all made.
        self.workspace.give(dir.path()).map_err(|e| {
            JobError::Retryable(format!(
                "cannot give the working folder to the job user: {e}"
            ))
        })?;
        self.observer.metrics().staged(&staged, cache.size());
        Ok((Some(Arc::new(dir)), Some(staged)))
    }

    /// Checks the job, stages its inputs and runs its command.
    pub(super) async fn run_command(
        &self,
        delivery: &Delivery,
        subject: &Subject,
        (abort, progress_cell): (&CancellationToken, &Arc<Mutex<Option<f64>>>),
        gpu: Option<u32>,
        usage: &UsageCell,
    ) -> Result<Ran, JobError> {
        let envelope = delivery
            .envelope
            .as_ref()
            .map_err(|e| JobError::Refused(e.clone()))?;
        let job = self
            .catalog
            .validate(&envelope.command, &envelope.parameters, &envelope.tasks)
            .map_err(|e| JobError::Refused(format!("invalid job: {e}")))?;

        let waited = envelope
            .submitted_at
            .as_deref()
            .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
            .and_then(|at| {
                (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
                    .to_std()
                    .ok()
            });
        let (workdir, staged) = self
            .stage(self.source(delivery).queue.name(), envelope, abort)
            .await?;
        self.observer.started(subject, waited, staged.as_ref());
        let frames = envelope
            .array
            .as_ref()
            .map(|a| a.frames.clone())
            .unwrap_or_default();
        let progress = {
            let (observer, subject, cell) = (
                self.observer.clone(),
                subject.clone(),
                progress_cell.clone(),
            );
            Progress::with_sink(ProgressSink(Arc::new(move |percent| {
                Registered::report(&cell, percent);
                observer.progress(&subject, percent)
            })))
        };
        let ctx = RunContext {
            cancel: abort.clone(),
            progress,
            job_id: envelope.job_id.clone(),
            frames: frames.clone(),
            gpu,
            workdir,
            usage: usage.clone(),
        };
        let command_started = Instant::now();
        let outputs = job.command.run(&job.parameters, &ctx).await;
        usage.ran_for(command_started.elapsed());
        let outputs = outputs.map_err(|e| match e {
            CommandError::Cancelled => JobError::Interrupted,
            CommandError::OutOfTurn(reason) => JobError::HandedBack(reason),
            CommandError::Failed(reason) => {
                JobError::Retryable(format!("command {} failed: {reason}", job.command.name))
            }
        })?;
        info!(
            outputs = outputs.len(),
            "Executed command: {}.", job.command.name
        );

        let first_frame = frames.first().map(i64::to_string).unwrap_or_else(|| {
            match job.parameters.get("frame") {
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            }
        });
        Ok(Ran {
            outputs,
            tasks: job.tasks,
            first_frame,
        })
    }

    /// Makes the image outputs' thumbnails, then runs the tasks in order,
    /// each on every output; returns where the outputs went, and the
    /// thumbnails with the frames they show.
    pub(super) async fn run_tasks(
        &self,
        delivery: &Delivery,
        subject: &Subject,
        ran: Ran,
        abort: &CancellationToken,
    ) -> Result<(Vec<String>, Vec<Thumbnail>), JobError> {
        let Ran {
            outputs,
            tasks,
            first_frame,
        } = ran;
        let names = self.thumbnails(delivery, &outputs, abort).await;
        let thumbnails = with_frames(names, &delivery.message_id, &outputs);
        let envelope = delivery
            .envelope
            .as_ref()
            .map_err(|e| JobError::Refused(e.clone()))?;
        let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
        let mut locations = Vec::new();
        for task in &tasks {
            info!("Executing task: {}.", task.name());
            for output in &outputs {
                let ext = mime_ext(&output.mime);
                let vars = Vars {
                    message_id: &delivery.message_id,
                    job_id: envelope.template_job_id(),
                    mime_ext: &ext,
                    command: &envelope.command,
                    array_index: envelope
                        .array
                        .as_ref()
                        .map(|a| a.index.to_string())
                        .unwrap_or_default(),
                    frame: output
                        .frame
                        .map_or_else(|| first_frame.clone(), |f| f.to_string()),
                    output_name: output.name.clone(),
                    date: date.clone(),
                };
                let task_started = Instant::now();
                let ran = tokio::select! {
                    ran = task.run(&self.tasks, output, &vars) => ran,
                    _ = abort.cancelled() => return Err(JobError::Interrupted),
                };
                match ran {
                    Ok(location) => {
                        self.observer.task_ended(
                            subject,
                            task.name(),
                            Ok(&location),
                            task_started.elapsed(),
                        );
                        locations.push(location);
                    }
                    Err(error) => {
                        self.observer.task_ended(
                            subject,
                            task.name(),
                            Err(&error.to_string()),
                            task_started.elapsed(),
                        );
                        return Err(match error {
                            TaskError::Retryable(e) => {
                                JobError::Retryable(format!("task {} failed: {e}", task.name()))
                            }
                            TaskError::Permanent(e) => JobError::Permanent(format!(
                                "task {} failed for good: {e}",
                                task.name()
                            )),
                        });
                    }
                }
            }
        }
        Ok((locations, thumbnails))
    }
}

/// Each thumbnail with the frame of the output it was made of (a name is
/// `thumbnail_name` of that output's position).
fn with_frames(names: Vec<String>, message_id: &str, outputs: &[Output]) -> Vec<Thumbnail> {
    let frame_of: std::collections::HashMap<String, Option<i64>> = outputs
        .iter()
        .enumerate()
        .map(|(n, output)| (thumbnail_name(message_id, n), output.frame))
        .collect();
    names
        .into_iter()
        .map(|name| Thumbnail {
            frame: frame_of.get(&name).copied().flatten(),
            name,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thumbnail_carries_the_frame_of_its_own_output() {
        let png = || Output::bytes(Vec::new(), mime::IMAGE_PNG);
        let outputs = vec![
            png().for_frame(5, "frame_0005".into()),
            Output::bytes(Vec::new(), mime::TEXT_PLAIN),
            png().for_frame(7, "frame_0007".into()),
            png(),
        ];
        // Output 1 is not an image and output 0's thumbnail failed: the
        // names left are those of outputs 2 and 3.
        let names = vec![thumbnail_name("m", 2), thumbnail_name("m", 3)];
        assert_eq!(
            with_frames(names, "m", &outputs),
            [
                Thumbnail {
                    name: thumbnail_name("m", 2),
                    frame: Some(7)
                },
                Thumbnail {
                    name: thumbnail_name("m", 3),
                    frame: None
                },
            ]
        );
    }
}
