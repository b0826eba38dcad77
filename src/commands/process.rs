//! `kind = "process"`: an external program, started afresh for every job.
//!
//! The argv is built from templates (never a shell), the program runs in a
//! fresh working folder with only the allowed environment variables, in its
//! own process group. A timeout, a cancel, or simply the program's exit ends
//! the whole group, so nothing it started outlives the job.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use super::argv::{ArgTemplate, ArgVars};
use futures_util::FutureExt;
use futures_util::future::FusedFuture;

use super::{CommandError, Output, ProcessGroup, Progress, RunContext, program, usage, workdir};
use crate::workspace::Workspace;

/// Most standard output kept as a result; more fails the job.
const MAX_STDOUT: usize = 64 * 1024 * 1024;
/// How much of the end of standard error (and of standard output that is
/// not the result) goes into a failure's reason.
const STDERR_TAIL: usize = 2048;
/// After SIGTERM on cancel, how long the program gets before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct ProcessCommand {
    pub(super) program: PathBuf,
    pub(super) args: Vec<ArgTemplate>,
    /// The result file; `None` means standard output is the result.
    pub(super) output: Option<ArgTemplate>,
    pub(super) output_mime: Option<mime::Mime>,
    pub(super) timeout: Duration,
    /// Names of the environment variables passed on.
    pub(super) env: Vec<String>,
    /// Where per-job working folders are made.
    pub(super) workspace: Arc<Workspace>,
    pub(super) config_dir: PathBuf,
}

/// A line of the Open Job Description stdout protocol.
#[derive(Debug, Clone, PartialEq)]
enum OpenJd {
    Progress(f64),
    Status(String),
    Fail(String),
}

fn openjd(line: &[u8]) -> Option<OpenJd> {
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let (key, value) = line.split_once(':')?;
    let value = value.trim().to_owned();
    match key {
        "openjd_progress" => value.parse().ok().map(OpenJd::Progress),
        "openjd_status" => Some(OpenJd::Status(value)),
        "openjd_fail" => Some(OpenJd::Fail(value)),
        _ => None,
    }
}

/// What standard output brought: the result (when it is the result), or
/// else its last lines, for a failure's reason.
#[derive(Default)]
struct Stdout {
    kept: Vec<u8>,
    fail: Option<String>,
    overflow: bool,
    tail: Vec<u8>,
}

/// Reads standard output: protocol lines go to `progress`, the rest is kept
/// (when it is the result) or its end remembered (when it is not).
async fn read_stdout(stdout: impl AsyncRead + Unpin, progress: Progress, keep: bool) -> Stdout {
    let mut reader = BufReader::new(stdout);
    let (mut kept, mut fail, mut overflow) = (Vec::new(), None, false);
    let mut tail = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        match openjd(&line) {
            Some(OpenJd::Progress(p)) => progress.percent(p),
            Some(OpenJd::Status(s)) => progress.status(&s),
            Some(OpenJd::Fail(reason)) => {
                progress.status(&format!("failed: {reason}"));
                fail = Some(reason);
            }
            None if keep && kept.len() + line.len() <= MAX_STDOUT => kept.extend_from_slice(&line),
            None if keep => overflow = true,
            None => {
                tail.extend_from_slice(&line);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
        }
    }
    Stdout {
        kept,
        fail,
        overflow,
        tail: last_bytes(tail),
    }
}

/// The last `STDERR_TAIL` bytes of `bytes`.
fn last_bytes(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.drain(..bytes.len().saturating_sub(STDERR_TAIL));
    bytes
}

/// Keeps the last `STDERR_TAIL` bytes of standard error.
async fn read_tail(stderr: impl AsyncRead + Unpin) -> String {
    let mut reader = BufReader::new(stderr);
    let mut tail = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * STDERR_TAIL {
            tail.drain(..tail.len() - STDERR_TAIL);
        }
    }
    String::from_utf8_lossy(&last_bytes(tail)).trim().to_owned()
}

/// The environment a child gets: the allowed variables that are set.
pub(super) fn allowed_env(names: &[String]) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect()
}

impl ProcessCommand {
    pub async fn run(
        &self,
        params: &Map<String, Value>,
        ctx: &RunContext,
    ) -> Result<Vec<Output>, CommandError> {
        let failed = |what: &str, e: std::io::Error| CommandError::Failed(format!("{what}: {e}"));
        let workdir = workdir(&self.workspace, ctx)?;
        let mut params = params.clone();
        params.insert("frames".into(), Value::from(ctx.frames.clone()));
        let vars = ArgVars {
            params: &params,
            workdir: workdir.path(),
            config_dir: &self.config_dir,
            job_id: &ctx.job_id,
        };
        let argv: Vec<String> = self.args.iter().map(|a| a.render(&vars)).collect();
        tracing::debug!(program = %self.program.display(), ?argv, "starting process");

        let mut child = program(&self.program, &self.env, ctx.gpu, self.workspace.job_user())
            .args(&argv)
            .current_dir(workdir.path())
            .env("RENDERQ_WORKDIR", workdir.path())
            .env("RENDERQ_JOB_ID", &ctx.job_id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(&format!("cannot start {}", self.program.display()), e))?;
        let group = ProcessGroup::of(&child, &self.workspace);
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let stdout = tokio::spawn(read_stdout(
            stdout,
            ctx.progress.clone(),
            self.output.is_none(),
        ));
        let stderr = tokio::spawn(read_tail(stderr));

        // Read before the child is reaped, so it is the group's whole
        // usage (see `usage`); `fuse`: awaited again after a cancel.
        let pid = child.id();
        let mut exited = tokio::task::spawn_blocking(move || pid.map(usage::wait_exited)).fuse();
        let note = |got: Result<Option<std::io::Result<_>>, _>| {
            if let Ok(Some(Ok(used))) = got {
                ctx.usage.set(used);
            }
        };
        let ended = tokio::select! {
            got = &mut exited => {
                note(got);
                Ok(child.wait().await)
            }
            _ = tokio::time::sleep(self.timeout) => Err(CommandError::Failed(format!(
                "timed out after {}", humantime::format_duration(self.timeout)
            ))),
            _ = ctx.cancel.cancelled() => {
                group.signal(nix::sys::signal::Signal::SIGTERM);
                match tokio::time::timeout(KILL_GRACE, &mut exited).await {
                    Ok(got) => note(got),
                    Err(_) => group.kill(),
                }
                Err(CommandError::Cancelled)
            }
        };
        // Whatever happened, nothing the program started may outlive it.
        group.kill();
        if !exited.is_terminated()
            && let Ok(got) = tokio::time::timeout(KILL_GRACE, &mut exited).await
        {
            note(got);
        }
        let _ = child.wait().await;
        let stderr_tail = stderr.await.unwrap_or_default();
        let Stdout {
            kept: stdout,
            fail,
            overflow,
            tail: stdout_tail,
        } = stdout.await.unwrap_or_default();
        let with_stderr = |reason: String| {
            if stderr_tail.is_empty() {
                reason
            } else {
                format!("{reason}; stderr: {stderr_tail}")
            }
        };

        let status = ended
            .map_err(|e| match e {
                CommandError::Failed(reason) => CommandError::Failed(with_stderr(reason)),
                other => other,
            })?
            .map_err(|e| failed("waiting for the program", e))?;
        if let Some(reason) = fail {
            return Err(CommandError::Failed(reason));
        }
        if !status.success() {
            return Err(CommandError::Failed(with_stderr(format!(
                "exited with {status}"
            ))));
        }
        if overflow {
            return Err(CommandError::Failed(format!(
                "standard output is over {MAX_STDOUT} bytes; write the result to a file (`output`)"
            )));
        }

        let Some(output) = &self.output else {
            let mime = self.output_mime.clone().unwrap_or_else(|| {
                if serde_json::from_slice::<Value>(&stdout).is_ok() {
                    mime::APPLICATION_JSON
                } else if std::str::from_utf8(&stdout).is_ok() {
                    mime::TEXT_PLAIN_UTF_8
                } else {
                    mime::APPLICATION_OCTET_STREAM
                }
            });
            return Ok(vec![Output::bytes(stdout, mime)]);
        };
        // `output` may be a pattern (`{workdir}/out_*.png`): one output per
        // file it matches, each with the frame its name shows.
        let pattern = workdir.path().join(output.render(&vars));
        let mut paths: Vec<PathBuf> = glob::glob(&pattern.to_string_lossy())
            .map_err(|e| CommandError::Failed(format!("output pattern: {e}")))?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        if paths.is_empty() {
            // A program that exits 0 having done nothing (Blender whose
            // `--python` script is missing) says why on either stream.
            let stdout_tail = String::from_utf8_lossy(&stdout_tail).trim().to_owned();
            let mut reason = format!(
                "the program exited 0 but wrote no output file {}",
                pattern.display()
            );
            if !stdout_tail.is_empty() {
                reason.push_str(&format!("; stdout: {stdout_tail}"));
            }
            return Err(CommandError::Failed(with_stderr(reason)));
        }
        Ok(paths
            .into_iter()
            .map(|path| {
                let mime = self
                    .output_mime
                    .clone()
                    .unwrap_or_else(|| Output::mime_of(&path));
                Output::file(path, mime, workdir.clone()).with_frame_from_name(&ctx.frames)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openjd_lines_are_recognised() {
        assert_eq!(
            openjd(b"openjd_progress: 42.5\n"),
            Some(OpenJd::Progress(42.5))
        );
        assert_eq!(
            openjd(b"openjd_status: loading scene\n"),
            Some(OpenJd::Status("loading scene".into()))
        );
        assert_eq!(
            openjd(b"openjd_fail: no licence\n"),
            Some(OpenJd::Fail("no licence".into()))
        );
        assert_eq!(openjd(b"rendering tile 3\n"), None);
        assert_eq!(openjd(b"openjd_progress: lots\n"), None);
    }
}
