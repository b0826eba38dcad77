//! The adaptor protocol as values: what an adaptor may say, the run ids
//! that tie its answers to runs, and the turn each process is at, which
//! decides whether a line is in turn. Pure: no processes here.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

/// A run's id: fresh for every `run` a command sends, echoed by every
/// answer to it. On the wire it is an opaque string, `run-7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct RunId(pub(super) u64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "run-{}", self.0)
    }
}

impl RunId {
    /// The id an adaptor echoed, if it has the form the worker gives.
    fn parse(text: &str) -> Option<Self> {
        text.strip_prefix("run-")?.parse().ok().map(Self)
    }
}

/// A line from the adaptor. Ids are optional here so that a missing one
/// gets a message naming the field rather than a generic parse error.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Message {
    Ready,
    Progress {
        #[serde(default)]
        id: Option<String>,
        percent: f64,
    },
    Status {
        #[serde(default)]
        id: Option<String>,
        message: String,
    },
    Result {
        #[serde(default)]
        id: Option<String>,
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
        #[serde(default)]
        id: Option<String>,
        message: String,
    },
    Stopped,
}

impl Message {
    /// The protocol's name for the message, for errors.
    fn kind(&self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Progress { .. } => "progress",
            Self::Status { .. } => "status",
            Self::Result { .. } => "result",
            Self::Fail { .. } => "fail",
            Self::Stopped => "stopped",
        }
    }

    /// The run the message names, as written.
    pub(super) fn id(&self) -> Option<&str> {
        match self {
            Self::Progress { id, .. }
            | Self::Status { id, .. }
            | Self::Result { id, .. }
            | Self::Fail { id, .. } => id.as_deref(),
            Self::Ready | Self::Stopped => None,
        }
    }
}

/// The one answer a run gets.
#[derive(Debug)]
pub(super) enum Answer {
    Result {
        path: Option<PathBuf>,
        paths: Vec<PathBuf>,
        json: Option<Value>,
        mime: Option<String>,
    },
    Fail(String),
}

/// What an in-turn line means.
#[derive(Debug)]
pub(super) enum Heard {
    /// `ready`: the start is done.
    Ready,
    Progress(f64),
    Status(String),
    /// The run's one answer: the process is idle again.
    Answer(Answer),
}

/// Where one adaptor process is in the protocol. Anything it says that
/// its turn does not expect retires it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Turn {
    /// Sent `init`, waiting for `ready`.
    Starting,
    /// Between runs (in the pool): it has nothing to say.
    Idle,
    /// Sent this `run`: its progress and status, then one answer.
    Running(RunId),
    /// Sent `cancel` for this run: its one answer is still due.
    Cancelling(RunId),
}

impl fmt::Display for Turn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Starting => f.write_str("while starting"),
            Self::Idle => f.write_str("while idle"),
            Self::Running(id) => write!(f, "while running {id}"),
            Self::Cancelling(id) => write!(f, "while cancelling {id}"),
        }
    }
}

/// Why a line was not in turn; either way the process is retired.
#[derive(Debug, thiserror::Error)]
pub(super) enum OutOfTurn {
    /// It answered for an earlier run (a second answer to it, or one it
    /// owed before): it is out of step with the worker, through no fault
    /// of the run in turn.
    #[error("answered for {said} {turn}")]
    Stale { said: RunId, turn: Turn },
    /// It said something the protocol never allows here.
    #[error("{0}")]
    Protocol(String),
}

impl Turn {
    /// Checks one line against the turn and moves the turn on. `issued`
    /// is the highest run id handed out so far: a smaller one than the
    /// current run's was a real, earlier run.
    pub(super) fn hear(&mut self, message: Message, issued: RunId) -> Result<Heard, OutOfTurn> {
        let protocol = |what: String| Err(OutOfTurn::Protocol(what));
        let current = match *self {
            Self::Starting => {
                return match message {
                    Message::Ready => {
                        *self = Self::Idle;
                        Ok(Heard::Ready)
                    }
                    // Loading can take a while; say so if it likes.
                    Message::Progress { id: None, percent } => Ok(Heard::Progress(percent)),
                    Message::Status { id: None, message } => Ok(Heard::Status(message)),
                    other => protocol(format!("expected `ready` after `init`, got {other:?}")),
                };
            }
            Self::Idle => {
                return match message.id().and_then(RunId::parse) {
                    Some(said) if said <= issued => Err(OutOfTurn::Stale { said, turn: *self }),
                    _ => protocol(format!("said {message:?} while idle")),
                };
            }
            Self::Running(id) | Self::Cancelling(id) => id,
        };
        match message.id() {
            // A status line may be about the adaptor rather than the run.
            None if matches!(message, Message::Status { .. }) => {}
            None if matches!(message, Message::Ready | Message::Stopped) => {
                return protocol(format!("unexpected `{}` {self}", message.kind()));
            }
            None => {
                return protocol(format!(
                    "`{}` without the run's `id` {self} (answers echo the `id` of `run`)",
                    message.kind()
                ));
            }
            Some(text) => match RunId::parse(text) {
                Some(said) if said == current => {}
                Some(said) if said <= issued => return Err(OutOfTurn::Stale { said, turn: *self }),
                _ => {
                    return protocol(format!(
                        "`{}` for `{text}`, a run it was never given, {self}",
                        message.kind()
                    ));
                }
            },
        }
        Ok(match message {
            Message::Progress { percent, .. } => Heard::Progress(percent),
            Message::Status { message, .. } => Heard::Status(message),
            Message::Result {
                path,
                paths,
                json,
                mime,
                ..
            } => {
                *self = Self::Idle;
                Heard::Answer(Answer::Result {
                    path,
                    paths,
                    json,
                    mime,
                })
            }
            Message::Fail { message, .. } => {
                *self = Self::Idle;
                Heard::Answer(Answer::Fail(message))
            }
            Message::Ready | Message::Stopped => unreachable!("refused above: they carry no id"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> Message {
        serde_json::from_str(text).expect("a protocol line")
    }

    const ISSUED: RunId = RunId(9);

    #[test]
    fn ids_round_trip_and_refuse_other_forms() {
        assert_eq!(RunId(42).to_string(), "run-42");
        assert_eq!(RunId::parse("run-42"), Some(RunId(42)));
        for text in ["42", "run-", "run-x", "job-42", "run--1"] {
            assert_eq!(RunId::parse(text), None, "{text}");
        }
    }

    #[test]
    fn a_run_hears_its_own_reports_then_one_answer() {
        let mut turn = Turn::Running(RunId(9));
        let heard = turn.hear(
            line(r#"{"type":"progress","id":"run-9","percent":50}"#),
            ISSUED,
        );
        assert!(matches!(heard, Ok(Heard::Progress(p)) if p == 50.0));
        let heard = turn.hear(line(r#"{"type":"status","message":"loading"}"#), ISSUED);
        assert!(
            matches!(heard, Ok(Heard::Status(_))),
            "a status may name no run"
        );
        let heard = turn.hear(line(r#"{"type":"result","id":"run-9","json":1}"#), ISSUED);
        assert!(matches!(heard, Ok(Heard::Answer(Answer::Result { .. }))));
        assert_eq!(turn, Turn::Idle);
        // A second answer to the same run is out of turn.
        let again = turn.hear(
            line(r#"{"type":"fail","id":"run-9","message":"x"}"#),
            ISSUED,
        );
        assert!(matches!(
            again,
            Err(OutOfTurn::Stale {
                said: RunId(9),
                turn: Turn::Idle
            })
        ));
    }

    #[test]
    fn an_answer_for_an_earlier_run_is_stale() {
        for turn in [Turn::Running(RunId(9)), Turn::Cancelling(RunId(9))] {
            for text in [
                r#"{"type":"fail","id":"run-8","message":"cancelled"}"#,
                r#"{"type":"result","id":"run-3","json":{}}"#,
                r#"{"type":"progress","id":"run-8","percent":1}"#,
            ] {
                let mut now = turn;
                match now.hear(line(text), ISSUED) {
                    Err(OutOfTurn::Stale { said, turn: was }) => {
                        assert!(said < RunId(9));
                        assert_eq!(was, turn);
                    }
                    other => panic!("{text} {turn}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_missing_or_unknown_id_breaks_the_protocol() {
        let cases = [
            (r#"{"type":"result","json":{}}"#, "without the run's `id`"),
            (
                r#"{"type":"progress","percent":3}"#,
                "without the run's `id`",
            ),
            (
                r#"{"type":"fail","id":"run-10","message":"x"}"#,
                "never given",
            ),
            (
                r#"{"type":"fail","id":"job-1","message":"x"}"#,
                "never given",
            ),
            (r#"{"type":"ready"}"#, "unexpected `ready`"),
        ];
        for (text, expected) in cases {
            let mut turn = Turn::Running(RunId(9));
            match turn.hear(line(text), ISSUED) {
                Err(OutOfTurn::Protocol(why)) => assert!(why.contains(expected), "{why}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_start_hears_only_ready_and_reports() {
        let mut turn = Turn::Starting;
        assert!(matches!(
            turn.hear(line(r#"{"type":"status","message":"loading"}"#), ISSUED),
            Ok(Heard::Status(_))
        ));
        assert!(matches!(
            turn.hear(line(r#"{"type":"ready"}"#), ISSUED),
            Ok(Heard::Ready)
        ));
        assert_eq!(turn, Turn::Idle);
        let mut turn = Turn::Starting;
        assert!(matches!(
            turn.hear(line(r#"{"type":"result","id":"run-1","json":1}"#), ISSUED),
            Err(OutOfTurn::Protocol(_))
        ));
    }
}
