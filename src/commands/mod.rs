//! Commands a job can name, and what they return.
//!
//! A command's result is an [`Output`]: bytes in memory or a file on disk,
//! with a MIME type. Post-tasks take it from there.

mod builtin;
mod render_demo;

use std::path::PathBuf;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use builtin::Builtin;

use crate::params::Schema;

/// Where a result's bytes are.
#[derive(Debug, Clone)]
pub enum Body {
    Bytes(Vec<u8>),
    /// A file, streamed by the tasks rather than read into memory.
    File(PathBuf),
}

/// A command's result.
#[derive(Debug, Clone)]
pub struct Output {
    pub body: Body,
    pub mime: mime::Mime,
}

impl Output {
    pub fn bytes(bytes: Vec<u8>, mime: mime::Mime) -> Self {
        Self {
            body: Body::Bytes(bytes),
            mime,
        }
    }

    /// A JSON value as `application/json`.
    pub fn json(value: &Value) -> Self {
        Self::bytes(
            serde_json::to_vec(value).expect("a JSON value always serializes"),
            mime::APPLICATION_JSON,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command ran and failed; worth another try.
    #[error("{0}")]
    Failed(String),
    /// The run was cancelled (shutdown, interruption) before it finished.
    #[error("cancelled")]
    Cancelled,
}

/// How a command runs.
#[derive(Debug, Clone)]
pub enum CommandKind {
    Builtin(Builtin),
}

/// A command a job may name: its schema and how to run it.
#[derive(Debug, Clone)]
pub struct Command {
    pub name: String,
    pub schema: Schema,
    pub kind: CommandKind,
}

impl Command {
    pub fn builtin(builtin: Builtin) -> Self {
        Self {
            name: builtin.name().to_owned(),
            schema: builtin.schema(),
            kind: CommandKind::Builtin(builtin),
        }
    }

    /// Runs the command with parameters already checked against its schema.
    pub async fn run(
        &self,
        params: &Map<String, Value>,
        cancel: &CancellationToken,
    ) -> Result<Output, CommandError> {
        match &self.kind {
            CommandKind::Builtin(b) => b.run(params, cancel).await,
        }
    }
}
