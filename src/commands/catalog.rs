//! What a job may ask for: the allowed commands with their schemas, the
//! queues, the buckets and the postback policy. The submit half checks a job
//! against it before sending; the worker checks again on receive, because a
//! message can be inserted straight into the queue.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::commands::{Builtin, Command};
use crate::config::{Config, Invalid};
use crate::job::TaskSpec;
use crate::job::inputs::InputSpec;
use crate::job::params::FieldError;
use crate::tasks::{HostPolicy, Task};

#[derive(Debug, Clone)]
pub struct Catalog {
    commands: BTreeMap<String, Command>,
    buckets: BTreeSet<String>,
    /// The buckets each queue's jobs may read inputs from
    /// ([`Config::input_buckets`]).
    input_buckets: BTreeMap<String, BTreeSet<String>>,
    hosts: HostPolicy,
    /// Most entries in a job's `inputs` (`queue_manager.max_inputs`).
    max_inputs: usize,
}

/// A job that passed every check, ready to run.
#[derive(Debug, Clone)]
pub struct ValidJob<'a> {
    pub command: &'a Command,
    /// Parameters with defaults filled in.
    pub parameters: Map<String, Value>,
    pub tasks: Vec<Task>,
}

impl Catalog {
    /// Builds every `[commands.NAME]` once (so each is checked, allowed or
    /// not) and keeps the allowed ones. Errors name the key; the caller
    /// locates it in the file with [`Config::locate`].
    pub fn from_config(config: &Config) -> Result<Self, Invalid> {
        let mut defined = BTreeMap::new();
        for (name, table) in &config.commands {
            if Builtin::from_name(name).is_some() {
                return Err(Invalid::new(
                    format!("commands.{name}"),
                    format!("`{name}` is a built-in command"),
                ));
            }
            defined.insert(name.as_str(), Command::from_config(name, table, config)?);
        }
        let commands = config
            .queue_manager
            .allow_commands
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let command = match Builtin::from_name(name) {
                    Some(builtin) => Command::builtin(builtin),
                    None => defined.get(name.as_str()).cloned().ok_or_else(|| {
                        Invalid::new(
                            format!("queue_manager.allow_commands[{i}]"),
                            format!(
                                "unknown command `{name}`: neither built in nor a [commands.{name}] table"
                            ),
                        )
                    })?,
                };
                Ok((name.clone(), command))
            })
            .collect::<Result<_, Invalid>>()?;
        Ok(Self {
            commands,
            buckets: config.buckets.keys().cloned().collect(),
            input_buckets: (config.queues.keys())
                .map(|queue| (queue.clone(), config.input_buckets(queue)))
                .collect(),
            hosts: HostPolicy::from_config(&config.http_post),
            max_inputs: config.queue_manager.max_inputs,
        })
    }

    /// Stops the long-lived processes behind commands (adaptors).
    /// Stops every command's adaptors, all at once.
    pub async fn stop(&self) {
        futures_util::future::join_all(self.commands.values().map(Command::stop)).await;
    }

    pub fn commands(&self) -> impl Iterator<Item = &Command> {
        self.commands.values()
    }

    /// How long a run of `name` usually takes, if its config says.
    pub fn typical_duration(&self, name: &str) -> Option<std::time::Duration> {
        self.commands.get(name)?.typical_duration
    }

    pub fn validate(
        &self,
        command: &str,
        parameters: &Map<String, Value>,
        tasks: &[TaskSpec],
    ) -> Result<ValidJob<'_>, FieldError> {
        let command = self.commands.get(command).ok_or_else(|| {
            FieldError::new("command", format!("command `{command}` is not allowed"))
        })?;
        let parameters = command.schema.apply(parameters)?;
        let tasks = tasks
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let task = Task::parse(spec, i)?;
                self.check_task(&task, i)?;
                Ok(task)
            })
            .collect::<Result<_, FieldError>>()?;
        Ok(ValidJob {
            command,
            parameters,
            tasks,
        })
    }

    /// Checks the inputs of a job on `queue`: their buckets exist and the
    /// queue may read them (`input_buckets`), their paths stay in the
    /// job's folder, their keys are keys.
    pub fn check_inputs(&self, queue: &str, inputs: &[InputSpec]) -> Result<(), FieldError> {
        let readable = self.input_buckets.get(queue);
        crate::job::inputs::check(inputs, self.max_inputs, |bucket| {
            if !self.buckets.contains(bucket) {
                Err(format!("no bucket `{bucket}` is configured"))
            } else if !readable.is_some_and(|r| r.contains(bucket)) {
                Err(format!(
                    "queue `{queue}` may not read inputs from bucket `{bucket}` (queues.{queue}.input_buckets)"
                ))
            } else {
                Ok(())
            }
        })
    }

    /// Checks what a task refers to outside itself.
    fn check_task(&self, task: &Task, index: usize) -> Result<(), FieldError> {
        match task {
            Task::S3Upload(t) if !self.buckets.contains(&t.bucket) => Err(FieldError::new(
                format!("tasks[{index}].config.bucket"),
                format!("no bucket `{}` is configured", t.bucket),
            )),
            Task::S3Upload(_) => Ok(()),
            Task::HttpPost(t) => {
                let field = || format!("tasks[{index}].config.postback_uri");
                let prefix = t.postback_uri.literal_prefix();
                if !prefix.starts_with("http://") && !prefix.starts_with("https://") {
                    return Err(FieldError::new(
                        field(),
                        "must start with http:// or https://",
                    ));
                }
                // The host can be checked now when it is written out before
                // the first variable; otherwise the worker checks it.
                let host_written = t.postback_uri.is_literal()
                    || prefix
                        .split_once("://")
                        .is_some_and(|(_, rest)| rest.contains(['/', '?', '#']));
                if host_written {
                    let url = reqwest::Url::parse(prefix)
                        .map_err(|e| FieldError::new(field(), e.to_string()))?;
                    self.hosts
                        .check_url(&url)
                        .map_err(|e| FieldError::new(field(), e))?;
                }
                Ok(())
            }
        }
    }
}

/// A built-in or `[commands.NAME]` command, allowed or not (for
/// `renderq run`, which tries commands out before they are allowed).
pub fn command(config: &Config, name: &str) -> Result<Command, Invalid> {
    match (Builtin::from_name(name), config.commands.get(name)) {
        (Some(builtin), _) => Ok(Command::builtin(builtin)),
        (None, Some(c)) => Command::from_config(name, c, config),
        (None, None) => Err(Invalid::new(
            format!("commands.{name}"),
            format!("no command `{name}`: neither built in nor a [commands.{name}] table"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn catalog() -> Catalog {
        let config = Config::from_toml(
            r#"
[queue_manager]
allow_commands = ["get_version", "render_demo"]
default_queue = "q"
listen_queue = "q"
[queues.q]
backend = "local"
path = "q"
[buckets.results]
backend = "local"
path = "r"
[http_post]
allow_hosts = ["127.0.0.1"]
"#,
            std::path::Path::new("/tmp"),
        )
        .unwrap();
        Catalog::from_config(&config).unwrap()
    }

    fn tasks(v: Value) -> Vec<TaskSpec> {
        serde_json::from_value(v).unwrap()
    }

    fn field(command: &str, params: Value, t: Value) -> String {
        catalog()
            .validate(command, params.as_object().unwrap(), &tasks(t))
            .unwrap_err()
            .field
    }

    #[test]
    fn valid_job_gets_defaults() {
        let c = catalog();
        let job = c
            .validate(
                "render_demo",
                &Map::new(),
                &tasks(json!([{"name": "s3_upload", "config": {"bucket": "results", "key": "r/${message_id}.${mime_ext}"}}])),
            )
            .unwrap();
        assert_eq!(job.parameters["width"], 640);
        assert_eq!(job.tasks.len(), 1);
    }

    #[test]
    fn unknown_allowed_command_names_its_array_entry() {
        let config = Config::from_toml(
            r#"
[queue_manager]
allow_commands = ["get_version", "rm_rf"]
default_queue = "q"
listen_queue = "q"
[queues.q]
backend = "local"
path = "q"
"#,
            std::path::Path::new("/tmp"),
        )
        .unwrap();
        let err = Catalog::from_config(&config).unwrap_err();
        assert_eq!(err.key, "queue_manager.allow_commands[1]");
        assert!(err.message.contains("rm_rf"), "{}", err.message);
    }

    #[test]
    fn each_bad_input_names_its_field() {
        assert_eq!(field("rm", json!({}), json!([])), "command");
        assert_eq!(
            field("render_demo", json!({"width": "x"}), json!([])),
            "parameters.width"
        );
        assert_eq!(
            field(
                "get_version",
                json!({}),
                json!([{"name": "s3_upload", "config": {"bucket": "nope", "key": "k"}}])
            ),
            "tasks[0].config.bucket"
        );
        assert_eq!(
            field(
                "get_version",
                json!({}),
                json!([{"name": "http_post", "config": {"postback_uri": "http://10.0.0.1/x"}}])
            ),
            "tasks[0].config.postback_uri"
        );
        assert_eq!(
            field(
                "get_version",
                json!({}),
                json!([{"name": "http_post", "config": {"postback_uri": "file:///etc/passwd"}}])
            ),
            "tasks[0].config.postback_uri"
        );
    }

    #[test]
    fn a_queue_reads_inputs_from_its_list_or_from_every_bucket_but_the_ledgers() {
        let toml = |list: &str| {
            format!(
                r#"
[queue_manager]
allow_commands = ["get_version"]
default_queue = "open"
listen_queue = "open"
[queues.open]
backend = "sqs"
url = "http://127.0.0.1:1/q"
status_bucket = "ledger"
[queues.shut]
backend = "local"
path = "q"
{list}
[buckets.ledger]
backend = "s3"
bucket = "l"
[buckets.assets]
backend = "local"
path = "a"
[buckets.results]
backend = "local"
path = "r"
"#
            )
        };
        let config = Config::from_toml(
            &toml("input_buckets = [\"assets\"]"),
            std::path::Path::new("/tmp"),
        )
        .unwrap();
        let catalog = Catalog::from_config(&config).unwrap();
        let input = |bucket: &str| InputSpec {
            bucket: bucket.into(),
            key: Some("k".into()),
            manifest: None,
            data_prefix: None,
            path: "k".into(),
            pin: None,
        };
        let refused = |queue: &str, bucket: &str| {
            catalog
                .check_inputs(queue, &[input(bucket)])
                .err()
                .map(|e| (e.field, e.reason))
        };
        assert_eq!(refused("open", "assets"), None);
        assert_eq!(refused("open", "results"), None);
        let (field, reason) = refused("open", "ledger").unwrap();
        assert_eq!(field, "inputs[0].bucket");
        assert!(reason.contains("may not read"), "{reason}");
        assert_eq!(refused("shut", "assets"), None);
        let (field, reason) = refused("shut", "results").unwrap();
        assert_eq!(field, "inputs[0].bucket");
        assert!(reason.contains("queues.shut.input_buckets"), "{reason}");
        let (_, reason) = refused("shut", "nope").unwrap();
        assert!(reason.contains("no bucket `nope`"), "{reason}");

        let err = Config::from_toml(
            &toml("input_buckets = [\"assets\", \"nope\"]"),
            std::path::Path::new("/tmp"),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("queues.shut.input_buckets[1]"),
            "{err}"
        );
    }
}
