//! The sandbox image outputs are decoded in: a child process, the renderq
//! binary itself run as `renderq thumbnail`, that reads the image on its
//! standard input and writes the JPEG on its standard output. It runs
//! under `RLIMIT_AS` (memory), `RLIMIT_CPU` and no core dumps, with a
//! clean environment (no credentials), and is killed past a wall-clock
//! bound. Whatever a hostile or damaged image does to the decoder (an
//! allocation of 120 GB aborts, a loop spins) ends that child: the worker
//! loses a thumbnail, never itself.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use nix::sys::resource::{Resource, setrlimit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::decode::{DecodeError, thumbnail};
use crate::access::JobUser;
use crate::config::ThumbnailsConfig;
use crate::job::{Body, Output};

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "thumbnail";
/// The child's exit status when the header asked for more than the budget.
const EXIT_REFUSED: u8 = 3;
/// The child's exit status when the image could not be decoded.
const EXIT_FAILED: u8 = 1;
/// Most bytes of JPEG taken from a child (a 320x2560 JPEG is far less).
const MAX_JPEG: u64 = 4 * 1024 * 1024;
/// How much of the child's standard error is kept as the reason.
const MAX_REASON: usize = 1024;

/// Why an output got no thumbnail.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Its header asked for more than the budget; nothing was decoded.
    #[error("refused: {0}")]
    Refused(String),
    /// The decoder read it and found it damaged or unsupported.
    #[error("cannot decode it: {0}")]
    Failed(String),
    #[error("the decoder went over its CPU time limit ({0} s)")]
    CpuTime(u64),
    /// Killed by a signal: an abort (an allocation over `RLIMIT_AS`), a
    /// crash, or the hard CPU limit.
    #[error("the decoder was killed by {signal}{}", with_reason(.reason))]
    Crashed { signal: String, reason: String },
    #[error("the decoder took over {0:?} and was killed")]
    TimedOut(Duration),
    #[error("the decoder's answer is not a JPEG of at most {MAX_JPEG} bytes")]
    BadAnswer,
    #[error("cannot run the decoder {}: {source}", .program.display())]
    Start {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn with_reason(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

/// Runs the sandboxed decoder: the program and the limits it runs under.
#[derive(Debug, Clone)]
pub struct Thumbnailer {
    /// The renderq binary.
    program: PathBuf,
    max_pixels: u64,
    /// `RLIMIT_AS`, bytes.
    max_memory: u64,
    /// `RLIMIT_CPU` (soft; the hard limit, SIGKILL, is a second later).
    cpu_seconds: u64,
    timeout: Duration,
    /// Who the decoder runs as: the job user, who may read the output
    /// anyway, so a decoder taken over reaches nothing of the worker's.
    user: JobUser,
}

impl Thumbnailer {
    /// A thumbnailer with `config`'s limits, running `config.program` or
    /// else this process's own executable.
    pub fn new(config: &ThumbnailsConfig, user: JobUser) -> std::io::Result<Self> {
        let program = match &config.program {
            Some(program) => program.clone(),
            None => std::env::current_exe()?,
        };
        Ok(Self {
            program,
            max_pixels: config.max_pixels,
            max_memory: config.max_memory,
            // RLIMIT_CPU counts whole seconds; a fraction rounds up.
            cpu_seconds: config.max_cpu_time.as_secs_f64().ceil() as u64,
            timeout: config.timeout,
            user,
        })
    }

    /// A JPEG thumbnail of an image output, made in a child process.
    pub async fn make(&self, output: &Output) -> Result<Vec<u8>, SandboxError> {
        let mut command = crate::commands::program(&self.program, &[], None, &self.user);
        command
            .arg(SUBCOMMAND)
            .arg("--max-pixels")
            .arg(self.max_pixels.to_string())
            .current_dir("/")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let bytes = match &output.body {
            Body::Bytes(bytes) => {
                command.stdin(Stdio::piped());
                Some(bytes)
            }
            // The file itself as standard input: the child can seek in it
            // and needs no access to the job's folder.
            Body::File(path) => {
                let file = tokio::fs::File::open(path).await?.into_std().await;
                command.stdin(Stdio::from(file));
                None
            }
        };
        let (memory, cpu) = (self.max_memory, self.cpu_seconds);
        // SAFETY: setrlimit is a plain system call, safe between fork and
        // exec; nothing else runs there.
        unsafe {
            command.pre_exec(move || {
                setrlimit(Resource::RLIMIT_AS, memory, memory)?;
                setrlimit(Resource::RLIMIT_CPU, cpu, cpu + 1)?;
                // An abort under a 2 GiB limit must not write a 2 GiB core.
                setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| SandboxError::Start {
            program: self.program.clone(),
            source,
        })?;
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let ran = tokio::time::timeout(self.timeout, async {
            let feed = async {
                if let (Some(mut stdin), Some(bytes)) = (stdin, bytes) {
                    // A child that stops reading (a refused header) closes
                    // the pipe: its exit status tells why, not this write.
                    let _ = stdin.write_all(bytes).await;
                }
            };
            let (_, jpeg, reason) = tokio::join!(feed, read_jpeg(stdout), read_reason(stderr));
            Ok::<_, std::io::Error>((child.wait().await?, jpeg?, reason))
        })
        .await;
        let (status, jpeg, reason) = match ran {
            Ok(ran) => ran?,
            Err(_) => {
                // kill_on_drop would do it too; this also reaps it.
                let _ = child.kill().await;
                return Err(SandboxError::TimedOut(self.timeout));
            }
        };
        if let Some(signal) = status.signal() {
            use nix::sys::signal::Signal;
            return Err(match Signal::try_from(signal) {
                Ok(Signal::SIGXCPU) => SandboxError::CpuTime(self.cpu_seconds),
                Ok(signal) => SandboxError::Crashed {
                    signal: signal.as_str().to_owned(),
                    reason,
                },
                Err(_) => SandboxError::Crashed {
                    signal: format!("signal {signal}"),
                    reason,
                },
            });
        }
        match status.code() {
            Some(0) => match jpeg {
                Some(jpeg) if jpeg.starts_with(&[0xFF, 0xD8]) => Ok(jpeg),
                _ => Err(SandboxError::BadAnswer),
            },
            Some(code) if code == i32::from(EXIT_REFUSED) => Err(SandboxError::Refused(reason)),
            _ => Err(SandboxError::Failed(reason)),
        }
    }
}

/// The child's standard output, or `None` when it is over `MAX_JPEG` (a
/// child that goes on writing blocks on the pipe until the wall-clock
/// bound kills it).
async fn read_jpeg(stdout: Option<impl AsyncRead + Unpin>) -> std::io::Result<Option<Vec<u8>>> {
    let Some(stdout) = stdout else {
        return Ok(None);
    };
    let mut jpeg = Vec::new();
    stdout.take(MAX_JPEG + 1).read_to_end(&mut jpeg).await?;
    Ok((jpeg.len() as u64 <= MAX_JPEG).then_some(jpeg))
}

/// The first line of the child's standard error; the rest is read and
/// dropped, so the child never blocks on a full pipe.
async fn read_reason(stderr: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stderr) = stderr else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stderr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = MAX_REASON.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    // The first line says it (the child's own error, or Rust's abort
    // message); what follows is a backtrace hint.
    let text = String::from_utf8_lossy(&kept);
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or_default()
        .to_owned()
}

/// `renderq thumbnail`: the child's side. Reads an image on standard
/// input (a file it can seek in, or a pipe it reads to the end), writes
/// its JPEG thumbnail on standard output; on failure one line on standard
/// error and exit status 3 (refused from its header) or 1.
pub fn child_main(max_pixels: u64) -> ExitCode {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    let made = (|| -> Result<Vec<u8>, DecodeError> {
        let mut input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
        if input.stream_position().is_ok() {
            thumbnail(std::io::BufReader::new(input), max_pixels)
        } else {
            let mut bytes = Vec::new();
            input.read_to_end(&mut bytes)?;
            thumbnail(std::io::Cursor::new(bytes), max_pixels)
        }
    })();
    match made {
        Ok(jpeg) => match std::io::stdout().lock().write_all(&jpeg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("cannot write the thumbnail: {error}");
                ExitCode::from(EXIT_FAILED)
            }
        },
        Err(error @ DecodeError::Refused(_)) => {
            eprintln!("{error}");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
