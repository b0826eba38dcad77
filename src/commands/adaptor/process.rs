//! One adaptor process: its pipes, its turn in the protocol, and how it is
//! killed or stopped.

use std::time::Duration;

use futures_util::FutureExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::protocol::{Heard, Message, OutOfTurn, RunId, Turn};
use crate::commands::ProcessGroup;
use crate::workspace::TempFolder;

/// How long a stopping or cancelled adaptor gets before it is killed.
pub(super) const GRACE: Duration = Duration::from_secs(5);

/// Why talking to an adaptor went wrong; every case retires the process.
#[derive(Debug, thiserror::Error)]
pub(super) enum Broken {
    #[error("adaptor exited")]
    Exited,
    #[error("adaptor broke the protocol: {0}")]
    Protocol(String),
    #[error("adaptor I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// It answered for an earlier run: out of step with the worker.
    #[error("adaptor answered for {said} {turn}")]
    Stale { said: RunId, turn: Turn },
}

impl From<OutOfTurn> for Broken {
    fn from(error: OutOfTurn) -> Self {
        match error {
            OutOfTurn::Protocol(why) => Self::Protocol(why),
            OutOfTurn::Stale { said, turn } => Self::Stale { said, turn },
        }
    }
}

#[derive(Debug)]
pub(in crate::commands) struct AdaptorProcess {
    /// The GPU it was started on; it serves only jobs of that GPU's slots.
    pub(super) gpu: Option<u32>,
    /// Where it is in the protocol.
    pub(super) turn: Turn,
    child: Child,
    group: ProcessGroup,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// A line read in part: kept across reads, so that a read cut short
    /// (by a cancel) loses nothing.
    line: Vec<u8>,
    /// The adaptor's own working folder, removed when it is dropped.
    _home: TempFolder,
}

impl AdaptorProcess {
    /// Wraps a child spawned with piped stdin and stdout.
    pub(super) fn new(
        mut child: Child,
        group: ProcessGroup,
        gpu: Option<u32>,
        home: TempFolder,
    ) -> Self {
        Self {
            gpu,
            turn: Turn::Starting,
            group,
            stdin: child.stdin.take().expect("stdin is piped"),
            stdout: BufReader::new(child.stdout.take().expect("stdout is piped")),
            child,
            line: Vec::new(),
            _home: home,
        }
    }

    /// Its process id, while it runs.
    pub(super) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub(super) async fn send(&mut self, message: &Value) -> Result<(), Broken> {
        let mut line = serde_json::to_vec(message).expect("a JSON value always serializes");
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Reads one line and parses it. Cancel-safe: a line read in part is
    /// finished by the next call.
    async fn recv(&mut self) -> Result<Message, Broken> {
        if self.stdout.read_until(b'\n', &mut self.line).await? == 0 {
            return Err(Broken::Exited);
        }
        let line = std::mem::take(&mut self.line);
        let text = String::from_utf8_lossy(&line);
        serde_json::from_str(&text)
            .map_err(|e| Broken::Protocol(format!("{e} in {:?}", text.trim_end())))
    }

    /// Reads the next line and checks it against the turn. `issued` is
    /// the highest run id handed out so far.
    pub(super) async fn hear(&mut self, issued: RunId) -> Result<Heard, Broken> {
        let message = self.recv().await?;
        Ok(self.turn.hear(message, issued)?)
    }

    /// Whether an idle process is still fit for a run: it must have said
    /// nothing since its last answer (whatever it said would be taken for
    /// the next run's answer) and must still be running. Looks only at
    /// what has arrived; a line still on its way is caught by the run's
    /// own turn.
    pub(super) fn check_idle(&mut self, issued: RunId) -> Result<(), Broken> {
        let waiting = !self.line.is_empty() || !self.stdout.buffer().is_empty();
        let arrived = match self.stdout.fill_buf().now_or_never() {
            None => waiting,
            Some(Ok([])) if !waiting => return Err(Broken::Exited),
            Some(Ok(_)) => true,
            Some(Err(error)) => return Err(error.into()),
        };
        if !arrived {
            return Ok(());
        }
        // What it said, named as well as it can be: a whole line is
        // judged as an answer while idle, a part line as itself.
        let mut said = std::mem::take(&mut self.line);
        said.extend_from_slice(self.stdout.buffer());
        let first = said.split(|&b| b == b'\n').next().unwrap_or_default();
        let text = String::from_utf8_lossy(first);
        let judged = serde_json::from_str::<Message>(&text)
            .ok()
            .and_then(|message| self.turn.hear(message, issued).err());
        Err(judged.map_or_else(
            || Broken::Protocol(format!("said {:?} while idle", text.trim_end())),
            Broken::from,
        ))
    }

    pub(super) async fn kill(mut self) {
        self.group.kill();
        let _ = self.child.wait().await;
    }

    /// Asks the adaptor to stop; kills it if it does not within the grace.
    /// Returns whether it stopped by itself.
    pub(super) async fn stop(mut self) -> bool {
        let stopped = tokio::time::timeout(GRACE, async {
            self.send(&json!({"type": "stop"})).await?;
            // It is going away: whatever else it says no longer matters.
            while !matches!(self.recv().await?, Message::Stopped) {}
            self.child.wait().await.map_err(Broken::from)
        })
        .await;
        self.kill().await;
        matches!(stopped, Ok(Ok(_)))
    }
}
