//! `kind = "adaptor"`: a long-lived application process, started once and
//! reused for many jobs, in the Open Job Description lifecycle
//! (start → run × N → stop → cleanup; cancel).
//!
//! The protocol is JSON, one object per line. The worker writes to the
//! adaptor's stdin:
//!
//! - `{"type": "init", "init_data": {...}}` once, after start;
//! - `{"type": "run", "job_id": "...", "parameters": {...}, "workdir": "/tmp/..."}` per job;
//! - `{"type": "cancel"}` to abandon the current run;
//! - `{"type": "stop"}` before the worker exits.
//!
//! The adaptor writes to its stdout (and logs only to stderr):
//!
//! - `{"type": "ready"}` in answer to `init`;
//! - `{"type": "progress", "percent": 42.5}` and `{"type": "status", "message": "..."}` at any time;
//! - per run, exactly one of `{"type": "result", "path": "out.png", "mime": "image/png"}`
//!   (a file; relative paths are taken from the run's `workdir`; `mime` is
//!   optional), `{"type": "result", "json": ...}`, or `{"type": "fail", "message": "..."}`;
//! - `{"type": "stopped"}` in answer to `stop`, then it exits.
//!
//! Processes are pooled: a slot takes an idle one or starts a new one, so
//! there is never more than one per busy slot. One that crashes, breaks the
//! protocol or overruns its timeout is killed; the next job starts a fresh
//! one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::{CommandError, Output, ProcessGroup, Progress, RunContext, program, workdir};
use crate::workspace::Workspace;

/// How long a stopping or cancelled adaptor gets before it is killed.
const GRACE: Duration = Duration::from_secs(5);

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
}

/// A message from the adaptor.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Ready,
    Progress {
        percent: f64,
    },
    Status {
        message: String,
    },
    Result {
        #[serde(default)]
        path: Option<PathBuf>,
        /// Several files, e.g. one per frame of an array chunk.
        #[serde(default)]
        paths: Vec<PathBuf>,
        #[serde(default)]
        json: Option<Value>,
        #[serde(default)]
        mime: Option<String>,
    },
    Fail {
        message: String,
    },
    Stopped,
}

/// Why talking to an adaptor went wrong; every case retires the process.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("adaptor exited")]
    Exited,
    #[error("adaptor broke the protocol: {0}")]
    Protocol(String),
    #[error("adaptor I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug)]
pub(super) struct AdaptorProcess {
    /// The GPU it was started on; it serves only jobs of that GPU's slots.
    gpu: Option<u32>,
    child: Child,
    group: ProcessGroup,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The adaptor's own working folder, removed when it is dropped.
    _home: crate::workspace::TempFolder,
}

impl AdaptorProcess {
    async fn send(&mut self, message: &Value) -> Result<(), Broken> {
        let mut line = serde_json::to_vec(message).expect("a JSON value always serializes");
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Message, Broken> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line).await? == 0 {
            return Err(Broken::Exited);
        }
        serde_json::from_str(&line)
            .map_err(|e| Broken::Protocol(format!("{e} in {:?}", line.trim_end())))
    }

    /// Waits for the answer to `init` or `run`, passing progress on.
    async fn answer(&mut self, progress: &Progress) -> Result<Message, Broken> {
        loop {
            match self.recv().await? {
                Message::Progress { percent } => progress.percent(percent),
                Message::Status { message } => progress.status(&message),
                other => return Ok(other),
            }
        }
    }

    async fn kill(mut self) {
        self.group.kill();
        let _ = self.child.wait().await;
    }

    /// Asks the adaptor to stop; kills it if it does not within the grace.
    async fn stop(mut self) {
        let stopped = tokio::time::timeout(GRACE, async {
            self.send(&json!({"type": "stop"})).await?;
            loop {
                if let Message::Stopped = self.recv().await? {
                    break;
                }
            }
            self.child.wait().await.map_err(Broken::from)
        })
        .await;
        if !matches!(stopped, Ok(Ok(_))) {
            tracing::warn!("adaptor did not stop cleanly; killing it");
        }
        self.kill().await;
    }
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
            .temp_dir("renderq-adaptor-")
            .map_err(|e| failed("cannot make a working folder", &e))?;
        let mut child = program(&self.program, &self.env, gpu)
            .args(&self.args)
            .current_dir(home.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| failed(&format!("cannot start {}", self.program.display()), &e))?;
        let starts = self.starts.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(adaptor = %self.name, starts, "Starting adaptor.");
        let mut process = AdaptorProcess {
            gpu,
            group: ProcessGroup::of(&child, &self.workspace),
            stdin: child.stdin.take().expect("stdin is piped"),
            stdout: BufReader::new(child.stdout.take().expect("stdout is piped")),
            child,
            _home: home,
        };
        let init = json!({"type": "init", "init_data": self.init_data});
        let ready = tokio::time::timeout(self.start_timeout, async {
            process.send(&init).await?;
            process.answer(progress).await
        })
        .await;
        match ready {
            Ok(Ok(Message::Ready)) => Ok(process),
            Ok(Ok(other)) => {
                process.kill().await;
                Err(failed(
                    "expected `ready` after `init`",
                    &format!("{other:?}"),
                ))
            }
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

    pub async fn run(
        &self,
        params: &Map<String, Value>,
        ctx: &RunContext,
    ) -> Result<Vec<Output>, CommandError> {
        let idle = {
            let mut idle = self.idle.lock().expect("adaptor pool lock");
            idle.iter()
                .rposition(|p| p.gpu == ctx.gpu)
                .map(|at| idle.remove(at))
        };
        let mut process = match idle {
            Some(process) => process,
            None => self.start(&ctx.progress, ctx.gpu).await?,
        };
        let workdir = workdir(&self.workspace, ctx)?;
        let run = json!({"type": "run", "job_id": ctx.job_id, "parameters": params,
                         "frames": ctx.frames, "workdir": workdir.path()});

        let answered = tokio::select! {
            answer = tokio::time::timeout(self.timeout, async {
                process.send(&run).await?;
                process.answer(&ctx.progress).await
            }) => answer.unwrap_or_else(|_| Err(Broken::Protocol(format!(
                "no result within {}", humantime::format_duration(self.timeout)
            )))),
            _ = ctx.cancel.cancelled() => {
                self.cancel(process).await;
                return Err(CommandError::Cancelled);
            }
        };
        let message = match answered {
            Ok(message) => message,
            Err(broken) => {
                process.kill().await;
                return Err(CommandError::Failed(format!(
                    "adaptor `{}`: {broken}",
                    self.name
                )));
            }
        };
        let result = match message {
            Message::Result {
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
            Message::Result {
                json: Some(value), ..
            } => Ok(vec![Output::json(&value)]),
            Message::Fail { message } => Err(CommandError::Failed(message)),
            other => {
                process.kill().await;
                return Err(CommandError::Failed(format!(
                    "adaptor `{}` broke the protocol: unexpected {other:?} during a run",
                    self.name
                )));
            }
        };
        // The adaptor answered properly (result or fail): keep it for the next job.
        self.idle.lock().expect("adaptor pool lock").push(process);
        result
    }

    /// Sends `cancel`; a process that answers within the grace is kept,
    /// one that does not is killed.
    async fn cancel(&self, mut process: AdaptorProcess) {
        let answered = tokio::time::timeout(GRACE, async {
            process.send(&json!({"type": "cancel"})).await?;
            loop {
                if let Message::Fail { .. } | Message::Result { .. } = process.recv().await? {
                    return Ok::<_, Broken>(());
                }
            }
        })
        .await;
        match answered {
            Ok(Ok(())) => self.idle.lock().expect("adaptor pool lock").push(process),
            _ => process.kill().await,
        }
    }

    /// Stops every idle adaptor process (on worker shutdown).
    pub async fn stop_all(&self) {
        let idle: Vec<_> = std::mem::take(&mut *self.idle.lock().expect("adaptor pool lock"));
        // Together: shutdown waits for the slowest, not for their sum.
        futures_util::future::join_all(idle.into_iter().map(|process| async {
            process.stop().await;
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
