//! `kind = "adaptor"`: a long-lived application process, started once and
//! reused for many jobs, in the Open Job Description lifecycle
//! (start → run × N → stop → cleanup; cancel).
//!
//! The protocol is JSON, one object per line. The worker writes to the
//! adaptor's stdin:
//!
//! - `{"type": "init", "init_data": {...}}` once, after start;
//! - `{"type": "run", "id": "run-7", "job_id": "...", "parameters": {...}, "workdir": "/tmp/..."}`
//!   per job; `id` is fresh for every run;
//! - `{"type": "cancel", "id": "run-7"}` to abandon that run;
//! - `{"type": "stop"}` before the worker exits.
//!
//! The adaptor writes to its stdout (and logs only to stderr):
//!
//! - `{"type": "ready"}` in answer to `init`;
//! - `{"type": "progress", "id": "run-7", "percent": 42.5}` and
//!   `{"type": "status", "id": "run-7", "message": "..."}` while the run is
//!   on (a status may leave out `id`);
//! - per run, exactly one answer echoing its `id`: `{"type": "result", "id": ..., "path": "out.png", "mime": "image/png"}`
//!   (a file; relative paths are taken from the run's `workdir`; `mime` is
//!   optional), `{"type": "result", "id": ..., "json": ...}`, or
//!   `{"type": "fail", "id": ..., "message": "..."}`. A `cancel` for a run
//!   already answered gets no answer;
//! - `{"type": "stopped"}` in answer to `stop`, then it exits.
//!
//! Processes are pooled: a slot takes an idle one or starts a new one, so
//! there is never more than one per busy slot. Each process has a turn
//! ([`protocol::Turn`]: idle, running a run, cancelling it). One that
//! crashes, overruns its timeout or says anything its turn does not expect
//! is killed, never pooled again; the next job starts a fresh one. An
//! answer for an earlier run (a second answer, or one said while idle)
//! means the process is out of step: whatever it says next would be taken
//! for the next job's answer. The job in turn did nothing wrong, so it is
//! handed back without using a try ([`CommandError::OutOfTurn`]).

mod process;
mod protocol;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::usage::RunMeter;
use super::{CommandError, Output, ProcessGroup, Progress, RunContext, program, workdir};
use crate::workspace::Workspace;
use process::{AdaptorProcess, Broken, GRACE};
use protocol::{Answer, Heard, RunId, Turn};

#[derive(Debug)]
pub struct AdaptorCommand {
    pub(super) name: String,
    pub(super) program: PathBuf,
    /// Arguments, rendered once at start-up.
    pub(super) args: Vec<String>,
    pub(super) env: Vec<String>,
    pub(super) init_data: Map<String, Value>,
    pub(super) start_timeout: Duration,
    pub(super) timeout: Duration,
    pub(super) workspace: Arc<Workspace>,
    /// Adaptor processes not running a job.
    pub(super) idle: Mutex<Vec<AdaptorProcess>>,
    /// Processes started so far (each start is also logged).
    pub(super) starts: AtomicU64,
    /// Run ids handed out so far: the next run gets one more. Every id up
    /// to this one was a real run, which tells a stale answer from a
    /// made-up one.
    pub(super) runs: AtomicU64,
}

impl AdaptorCommand {
    async fn start(
        &self,
        progress: &Progress,
        gpu: Option<u32>,
    ) -> Result<AdaptorProcess, CommandError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            CommandError::Failed(format!("adaptor `{}`: {what}: {e}", self.name))
        };
        let home = self
            .workspace
            .job_dir("renderq-adaptor-")
            .map_err(|e| failed("cannot make a working folder", &e))?;
        let child = program(&self.program, &self.env, gpu, self.workspace.job_user())
            .args(&self.args)
            .current_dir(home.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| failed(&format!("cannot start {}", self.program.display()), &e))?;
        let starts = self.starts.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(adaptor = %self.name, starts, "Starting adaptor.");
        let group = ProcessGroup::of(&child, &self.workspace);
        let mut process = AdaptorProcess::new(child, group, gpu, home);
        let init = json!({"type": "init", "init_data": self.init_data});
        let ready = tokio::time::timeout(self.start_timeout, async {
            process.send(&init).await?;
            loop {
                match process.hear(self.issued()).await? {
                    Heard::Ready => return Ok::<_, Broken>(()),
                    Heard::Progress(percent) => progress.percent(percent),
                    Heard::Status(message) => progress.status(&message),
                    Heard::Answer(_) => unreachable!("a start hears no answers"),
                }
            }
        })
        .await;
        match ready {
            Ok(Ok(())) => Ok(process),
            Ok(Err(broken)) => {
                process.kill().await;
                Err(failed("start failed", &broken))
            }
            Err(_) => {
                process.kill().await;
                Err(failed(
                    "no `ready` in time",
                    &humantime::format_duration(self.start_timeout),
                ))
            }
        }
    }

    /// The highest run id handed out so far.
    fn issued(&self) -> RunId {
        RunId(self.runs.load(Ordering::Relaxed))
    }

    /// An idle process of the slot's GPU that has kept quiet since its
    /// last answer, or a new one. One that spoke while idle, or died, is
    /// killed here, before any job was given to it.
    async fn checkout(&self, ctx: &RunContext) -> Result<AdaptorProcess, CommandError> {
        loop {
            let idle = {
                let mut idle = self.idle.lock().expect("adaptor pool lock");
                idle.iter()
                    .rposition(|p| p.gpu == ctx.gpu)
                    .map(|at| idle.remove(at))
            };
            let Some(mut process) = idle else {
                return self.start(&ctx.progress, ctx.gpu).await;
            };
            match process.check_idle(self.issued()) {
                Ok(()) => return Ok(process),
                Err(broken) => {
                    self.retire(process, &broken).await;
                }
            }
        }
    }

    /// Kills a process that broke the protocol, with a warning that says
    /// how (a stale answer names the run it belonged to).
    async fn retire(&self, process: AdaptorProcess, broken: &Broken) {
        match broken {
            Broken::Stale { said, turn } => tracing::warn!(
                adaptor = %self.name, stale = %said, %turn,
                "adaptor answered for another run; killing it, it is never reused"
            ),
            other => tracing::warn!(adaptor = %self.name, error = %other, "killing the adaptor"),
        }
        process.kill().await;
    }

    pub async fn run(
        &self,
        params: &Map<String, Value>,
        ctx: &RunContext,
    ) -> Result<Vec<Output>, CommandError> {
        let workdir = workdir(&self.workspace, ctx)?;
        // A start can take a while (Blender loads for seconds): a cancel
        // does not wait for it. A process cut off mid-start is killed as
        // its guard drops; a pooled one is never cut off (checking it
        // does not wait).
        let mut process = tokio::select! {
            process = self.checkout(ctx) => process?,
            _ = ctx.cancel.cancelled() => return Err(CommandError::Cancelled),
        };
        if ctx.cancel.is_cancelled() {
            // It was given nothing yet, so it is still in step.
            self.idle.lock().expect("adaptor pool lock").push(process);
            return Err(CommandError::Cancelled);
        }
        let meter = process.pid().and_then(RunMeter::start);
        let id = RunId(self.runs.fetch_add(1, Ordering::Relaxed) + 1);
        let run = json!({"type": "run", "id": id.to_string(), "job_id": ctx.job_id,
                         "parameters": params, "frames": ctx.frames, "workdir": workdir.path()});

        let answered = tokio::select! {
            answer = tokio::time::timeout(self.timeout, async {
                process.send(&run).await?;
                // Only a run the adaptor was wholly given is its turn.
                process.turn = Turn::Running(id);
                loop {
                    match process.hear(self.issued()).await? {
                        Heard::Answer(answer) => return Ok(answer),
                        Heard::Progress(percent) => ctx.progress.percent(percent),
                        Heard::Status(message) => ctx.progress.status(&message),
                        Heard::Ready => unreachable!("a run hears no `ready`"),
                    }
                }
            }) => answer.unwrap_or_else(|_| Err(Broken::Protocol(format!(
                "no result within {}", humantime::format_duration(self.timeout)
            )))),
            _ = ctx.cancel.cancelled() => {
                self.cancel(process, id).await;
                return Err(CommandError::Cancelled);
            }
        };
        if let Some(used) = meter.as_ref().and_then(RunMeter::finish) {
            ctx.usage.set(used);
        }
        let answer = match answered {
            Ok(answer) => answer,
            Err(broken) => {
                let error = match &broken {
                    Broken::Stale { said, .. } => CommandError::OutOfTurn(format!(
                        "adaptor `{}` answered for {said} while running {id}: \
                             out of step, so it was killed and is never reused",
                        self.name
                    )),
                    other => CommandError::Failed(format!("adaptor `{}`: {other}", self.name)),
                };
                self.retire(process, &broken).await;
                return Err(error);
            }
        };
        // The adaptor answered in turn (result or fail): keep it for the
        // next job.
        self.idle.lock().expect("adaptor pool lock").push(process);
        match answer {
            Answer::Result {
                path, paths, mime, ..
            } if path.is_some() || !paths.is_empty() => path
                .into_iter()
                .chain(paths)
                .map(|path| {
                    let path = workdir.path().join(path);
                    if !path.is_file() {
                        return Err(CommandError::Failed(format!(
                            "adaptor result {} does not exist",
                            path.display()
                        )));
                    }
                    let mime = mime
                        .as_deref()
                        .and_then(|m| m.parse().ok())
                        .unwrap_or_else(|| Output::mime_of(&path));
                    Ok(Output::file(path, mime, workdir.clone()).with_frame_from_name(&ctx.frames))
                })
                .collect(),
            Answer::Result {
                json: Some(value), ..
            } => Ok(vec![Output::json(&value)]),
            Answer::Result { .. } => Err(CommandError::Failed(format!(
                "adaptor `{}` answered a `result` with no `path`, `paths` or `json`",
                self.name
            ))),
            Answer::Fail(message) => Err(CommandError::Failed(message)),
        }
    }

    /// Sends `cancel` for run `id`; a process that gives the run its one
    /// answer within the grace is kept, any other is killed.
    async fn cancel(&self, mut process: AdaptorProcess, id: RunId) {
        if process.turn != Turn::Running(id) {
            // Cut short while `run` was being written: the adaptor may
            // hold half a line, so nothing more can be said to it.
            process.kill().await;
            return;
        }
        process.turn = Turn::Cancelling(id);
        let answered = tokio::time::timeout(GRACE, async {
            process
                .send(&json!({"type": "cancel", "id": id.to_string()}))
                .await?;
            loop {
                if let Heard::Answer(_) = process.hear(self.issued()).await? {
                    return Ok::<_, Broken>(());
                }
            }
        })
        .await;
        match answered {
            Ok(Ok(())) => self.idle.lock().expect("adaptor pool lock").push(process),
            Ok(Err(broken)) => self.retire(process, &broken).await,
            Err(_) => {
                tracing::warn!(adaptor = %self.name, run = %id, "adaptor did not answer `cancel` in time; killing it");
                process.kill().await;
            }
        }
    }

    /// Stops every idle adaptor process (on worker shutdown).
    pub async fn stop_all(&self) {
        let idle: Vec<_> = std::mem::take(&mut *self.idle.lock().expect("adaptor pool lock"));
        // Together: shutdown waits for the slowest, not for their sum.
        futures_util::future::join_all(idle.into_iter().map(|process| async {
            if !process.stop().await {
                tracing::warn!(adaptor = %self.name, "adaptor did not stop cleanly; killed it");
            }
            tracing::info!(adaptor = %self.name, "Stopped adaptor.");
        }))
        .await;
    }
}

/// Renders adaptor arguments once: only `{config_dir}` is known at start.
pub(super) fn render_args(args: &[super::argv::ArgTemplate], config_dir: &Path) -> Vec<String> {
    let params = Map::new();
    let vars = super::argv::ArgVars {
        params: &params,
        workdir: config_dir,
        config_dir,
        job_id: "",
    };
    args.iter().map(|a| a.render(&vars)).collect()
}
