//! Commands a job can name, and what they return.
//!
//! Three kinds: built-ins compiled in, external `process` programs started
//! per job, and long-lived `adaptor` programs reused across jobs. A
//! command's result is an [`Output`]: bytes in memory or a file on disk,
//! with a MIME type. Post-tasks take it from there.

mod adaptor;
mod argv;
mod builtin;
pub mod catalog;
mod process;
mod render_demo;
pub mod usage;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use adaptor::AdaptorCommand;
pub use builtin::Builtin;
pub use process::ProcessCommand;

use crate::access::JobUser;
use crate::config::{CommandConfig, Config, Invalid};
use crate::job::Output;
use crate::job::params::Schema;
use crate::workspace::{GroupRecord, Workspace};
use argv::{ArgTemplate, BUILT_IN_VARS};

/// The job's working folder: the one the worker staged inputs in, or a
/// fresh one, removed when the last guard is dropped.
fn workdir(
    workspace: &Workspace,
    ctx: &RunContext,
) -> Result<Arc<crate::workspace::TempFolder>, CommandError> {
    if let Some(dir) = &ctx.workdir {
        return Ok(dir.clone());
    }
    workspace
        .job_dir("renderq-job-")
        .map(Arc::new)
        .map_err(|e| CommandError::Failed(format!("cannot make a working folder: {e}")))
}

/// An external program, ready to spawn: a clean environment with only the
/// allowed variables, its own process group, and SIGKILL as its
/// parent-death signal, so it cannot outlive a worker that is `kill -9`ed;
/// run as the job user (see [`crate::access`]).
pub(crate) fn program(
    path: &Path,
    env: &[String],
    gpu: Option<u32>,
    user: &JobUser,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(path);
    command
        .env_clear()
        .envs(process::allowed_env(env))
        .process_group(0)
        .kill_on_drop(true);
    if let Some(gpu) = gpu {
        command
            .env("CUDA_VISIBLE_DEVICES", gpu.to_string())
            .env("NVIDIA_VISIBLE_DEVICES", gpu.to_string());
    }
    let parent = nix::unistd::getpid();
    let account = match user {
        JobUser::Account(account) => Some(account.clone()),
        JobUser::Worker => None,
    };
    // SAFETY: setgroups, setgid, setuid, prctl and getppid are
    // async-signal-safe, the account was copied before the fork, and
    // nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // First: changing user clears the parent-death signal.
            if let Some(account) = &account {
                account.become_in_child()?;
            }
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died before the signal was armed.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("the worker exited"));
            }
            Ok(())
        });
    }
    command
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command ran and failed; worth another try.
    #[error("{0}")]
    Failed(String),
    /// The run was cancelled (shutdown, interruption) before it finished.
    #[error("cancelled")]
    Cancelled,
    /// The program went out of step through no fault of the job (an
    /// adaptor answered for another run): it was killed, and the job runs
    /// again on another process without using a try.
    #[error("{0}")]
    OutOfTurn(String),
}

/// Where a running command reports progress and status. Progress lines are
/// throttled, so a chatty program cannot flood the logs.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The job's span, so reports from other threads are attributed.
    span: tracing::Span,
    last: Arc<Mutex<Option<Instant>>>,
    /// Also told of every report that gets through (the job's events).
    sink: Option<ProgressSink>,
}

/// Where throttled progress reports go besides the log.
#[derive(Clone)]
pub struct ProgressSink(pub Arc<dyn Fn(f64) + Send + Sync>);

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

/// Least time between two logged progress reports (the last one, 100 %,
/// always gets through).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

impl Progress {
    /// Reports into the current span.
    pub fn new() -> Self {
        Self {
            span: tracing::Span::current(),
            last: Arc::default(),
            sink: None,
        }
    }

    /// Reports into the current span and to `sink`.
    pub fn with_sink(sink: ProgressSink) -> Self {
        Self {
            sink: Some(sink),
            ..Self::new()
        }
    }

    pub fn percent(&self, percent: f64) {
        let mut last = self.last.lock().expect("progress lock");
        let due = last.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) || percent >= 100.0;
        if due {
            *last = Some(Instant::now());
            self.span.in_scope(|| tracing::info!(percent, "Progress."));
            if let Some(sink) = &self.sink {
                (sink.0)(percent);
            }
        }
    }

    pub fn status(&self, message: &str) {
        self.span.in_scope(|| tracing::info!(%message, "Status."));
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// What a command runs with besides its parameters.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// Cancelled when the job must stop (shutdown past the drain deadline).
    pub cancel: CancellationToken,
    pub progress: Progress,
    /// The job's id, for `{job_id}` and the adaptor's `run` message.
    pub job_id: String,
    /// An array chunk's frames (empty for a plain job): a command may
    /// render them all and give an output for each.
    pub frames: Vec<i64>,
    /// The GPU the slot is pinned to: external programs see only it.
    pub gpu: Option<u32>,
    /// The job's working folder, already made (with its inputs staged);
    /// `None`: the command makes one if it needs one.
    pub workdir: Option<Arc<crate::workspace::TempFolder>>,
    /// Where an external program's CPU time and peak memory are left.
    pub usage: usage::UsageCell,
}

/// A child's process group; signals reach everything the child started.
/// Dropping the guard kills the group, so a run that is abandoned (its
/// future dropped on `max_runtime`, say) leaves no process behind; the
/// group is recorded in the workspace so that it is killed even if the
/// worker dies first.
#[derive(Debug)]
struct ProcessGroup {
    pgid: Option<nix::unistd::Pid>,
    /// Dropped after the kill (fields drop after `Drop::drop`).
    _record: Option<GroupRecord>,
}

impl ProcessGroup {
    /// The group led by `child` (spawned by [`program`]).
    fn of(child: &tokio::process::Child, workspace: &Workspace) -> Self {
        let pgid = child.id().map(|id| nix::unistd::Pid::from_raw(id as i32));
        Self {
            pgid,
            _record: pgid.and_then(|pgid| workspace.record_group(pgid)),
        }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pgid) = self.pgid {
            // ESRCH just means everyone is gone already.
            let _ = nix::sys::signal::killpg(pgid, signal);
        }
    }

    fn kill(&self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How a command runs.
#[derive(Debug, Clone)]
pub enum CommandKind {
    Builtin(Builtin),
    Process(Arc<ProcessCommand>),
    Adaptor(Arc<AdaptorCommand>),
}

/// A command a job may name: its schema and how to run it.
#[derive(Debug, Clone)]
pub struct Command {
    pub name: String,
    pub schema: Schema,
    pub kind: CommandKind,
    /// `typical_duration`: how long a run usually takes, if said.
    pub typical_duration: Option<Duration>,
}

impl Command {
    /// The program an external command runs (none for a built-in).
    pub fn program(&self) -> Option<&Path> {
        match &self.kind {
            CommandKind::Builtin(_) => None,
            CommandKind::Process(process) => Some(&process.program),
            CommandKind::Adaptor(adaptor) => Some(&adaptor.program),
        }
    }

    pub fn builtin(builtin: Builtin) -> Self {
        Self {
            name: builtin.name().to_owned(),
            schema: builtin.schema(),
            kind: CommandKind::Builtin(builtin),
            typical_duration: None,
        }
    }

    /// Builds a `[commands.NAME]` command, checking its program, templates
    /// and parameter schema; errors name the key.
    pub fn from_config(name: &str, config: &CommandConfig, root: &Config) -> Result<Self, Invalid> {
        let key = |rest: &str| format!("commands.{name}.{rest}");
        let (program, args, parameters, typical_duration) = match config {
            CommandConfig::Process(c) => (&c.program, &c.args, &c.parameters, c.typical_duration),
            CommandConfig::Adaptor(c) => (&c.program, &c.args, &c.parameters, c.typical_duration),
        };
        let schema = Schema::from_specs(parameters)
            .map_err(|(param, e)| Invalid::new(key(&format!("parameters.{param}")), e))?;
        let program =
            find_program(program, &root.config_dir).map_err(|e| Invalid::new(key("program"), e))?;
        let known = |var: &str| BUILT_IN_VARS.contains(&var) || schema.contains(var);
        let parse = |text: &str, what: String, adaptor: bool| -> Result<ArgTemplate, Invalid> {
            let template = ArgTemplate::parse(text).map_err(|e| Invalid::new(what.clone(), e))?;
            if let Some(var) = template.vars().find(|v| {
                if adaptor {
                    *v != "config_dir"
                } else {
                    !known(v)
                }
            }) {
                let hint = if adaptor {
                    "an adaptor's arguments can only use {config_dir}"
                } else {
                    "not a parameter, workdir, config_dir or job_id"
                };
                return Err(Invalid::new(
                    what,
                    format!("unknown placeholder `{{{var}}}`: {hint}"),
                ));
            }
            Ok(template)
        };
        let adaptor = matches!(config, CommandConfig::Adaptor(_));
        let args = args
            .iter()
            .enumerate()
            .map(|(i, a)| parse(a, key(&format!("args[{i}]")), adaptor))
            .collect::<Result<Vec<_>, _>>()?;
        let workspace = Arc::new(Workspace::for_jobs(
            &root.worker.work_root(),
            root.worker.job_user(),
        ));

        let kind = match config {
            CommandConfig::Process(c) => CommandKind::Process(Arc::new(ProcessCommand {
                program,
                args,
                output: c
                    .output
                    .as_deref()
                    .map(|o| parse(o, key("output"), false))
                    .transpose()?,
                output_mime: c
                    .output_mime
                    .as_deref()
                    .map(|m| {
                        m.parse()
                            .map_err(|e| Invalid::new(key("output_mime"), format!("{e}")))
                    })
                    .transpose()?,
                timeout: c.timeout,
                env: c.env.clone(),
                workspace,
                config_dir: root.config_dir.clone(),
            })),
            CommandConfig::Adaptor(c) => CommandKind::Adaptor(Arc::new(AdaptorCommand {
                name: name.to_owned(),
                program,
                args: adaptor::render_args(&args, &root.config_dir),
                env: c.env.clone(),
                init_data: c.init_data.clone(),
                start_timeout: c.start_timeout,
                timeout: c.timeout,
                workspace,
                idle: Mutex::default(),
                starts: Default::default(),
                runs: Default::default(),
            })),
        };
        Ok(Self {
            name: name.to_owned(),
            schema,
            kind,
            typical_duration,
        })
    }

    /// Runs the command with parameters already checked against its schema.
    pub async fn run(
        &self,
        params: &Map<String, Value>,
        ctx: &RunContext,
    ) -> Result<Vec<Output>, CommandError> {
        match &self.kind {
            CommandKind::Builtin(b) => b.run(params, ctx).await,
            CommandKind::Process(p) => p.run(params, ctx).await,
            CommandKind::Adaptor(a) => a.run(params, ctx).await,
        }
    }

    /// Adaptor processes started so far (0 for other kinds).
    pub fn adaptor_starts(&self) -> u64 {
        match &self.kind {
            CommandKind::Adaptor(a) => a.starts.load(std::sync::atomic::Ordering::Relaxed),
            _ => 0,
        }
    }

    /// Stops long-lived processes (adaptors); a no-op for other kinds.
    pub async fn stop(&self) {
        if let CommandKind::Adaptor(a) = &self.kind {
            a.stop_all().await;
        }
    }
}

/// Finds a program: a path (relative to the config's folder) or a bare name
/// on `PATH`. It must be an executable file.
fn find_program(program: &str, config_dir: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = config_dir.join(program);
        return if executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "program {} is missing or not executable",
                path.display()
            ))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| format!("program `{program}` is not on PATH"))
}
