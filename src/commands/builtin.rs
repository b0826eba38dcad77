//! Commands compiled into renderq.

use std::time::Duration;

use super::{CommandError, Output, RunContext, render_demo};
use crate::job::params::{Param, ParamType, Schema};
use serde_json::{Map, Value, json};

/// The built-in commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// Returns renderq's version as a JSON string.
    GetVersion,
    /// Waits `seconds`, for load tests and drills.
    Sleep,
    /// Ray-traces a small scene to a PNG on the CPU.
    RenderDemo,
}

impl Builtin {
    pub const ALL: [Builtin; 3] = [Builtin::GetVersion, Builtin::Sleep, Builtin::RenderDemo];

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Builtin::GetVersion => "get_version",
            Builtin::Sleep => "sleep",
            Builtin::RenderDemo => "render_demo",
        }
    }

    pub fn schema(self) -> Schema {
        match self {
            Builtin::GetVersion => Schema::default(),
            Builtin::Sleep => Schema::default().with(
                "seconds",
                Param::new(ParamType::Number)
                    .default_value(1)
                    .range(0.0, 86_400.0),
            ),
            Builtin::RenderDemo => render_demo::schema(),
        }
    }

    pub async fn run(
        self,
        params: &Map<String, Value>,
        ctx: &RunContext,
    ) -> Result<Vec<Output>, CommandError> {
        match self {
            Builtin::GetVersion => Ok(vec![Output::json(&json!(crate::VERSION))]),
            Builtin::Sleep => {
                let seconds = params.get("seconds").and_then(Value::as_f64).unwrap_or(1.0);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs_f64(seconds)) => {
                        Ok(vec![Output::json(&json!({ "slept": seconds }))])
                    }
                    _ = ctx.cancel.cancelled() => Err(CommandError::Cancelled),
                }
            }
            Builtin::RenderDemo => render_demo::run(params, ctx).await,
        }
    }
}
