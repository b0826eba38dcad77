//! Post-tasks: what happens to a command's result. They run in order after
//! the command; any failure fails the job (which is then retried), so every
//! task must be idempotent: the same job run twice writes the same key.

mod http_post;
mod s3_upload;

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use http_post::{HostPolicy, HttpPost, HttpPoster, SIGNATURE_HEADER};
pub use s3_upload::S3Upload;

use crate::job::Output;
use crate::job::params::{FieldError, deserialize_named};
use crate::job::{TaskSpec, Vars};
use crate::storage::Buckets;

/// The known post-tasks, with their checked configs.
#[derive(Debug, Clone)]
pub enum Task {
    S3Upload(S3Upload),
    HttpPost(HttpPost),
}

/// What a task needs at run time, shared by all jobs.
#[derive(Debug, Clone)]
pub struct TaskRunner {
    pub buckets: Buckets,
    pub http: HttpPoster,
}

/// Why a post-task failed; decides between another try and the
/// dead-letter queue.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// May work next time: connection errors, 5xx, 408, 429, throttling.
    #[error("{0}")]
    Retryable(String),
    /// Will fail the same way every time: a 4xx answer, a refused host, a
    /// missing bucket or denied access, a bad key.
    #[error("{0}")]
    Permanent(String),
}

impl Task {
    /// Parses the `index`th task of a job; errors name the field.
    pub fn parse(spec: &TaskSpec, index: usize) -> Result<Self, FieldError> {
        match spec.name.as_str() {
            "s3_upload" => config(spec, index).map(Task::S3Upload),
            "http_post" => config(spec, index).map(Task::HttpPost),
            other => Err(FieldError::new(
                format!("tasks[{index}].name"),
                format!("unknown task `{other}` (known: s3_upload, http_post)"),
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Task::S3Upload(_) => "s3_upload",
            Task::HttpPost(_) => "http_post",
        }
    }

    /// Runs the task on `output`; returns where the result went.
    pub async fn run(
        &self,
        runner: &TaskRunner,
        output: &Output,
        vars: &Vars<'_>,
    ) -> Result<String, TaskError> {
        match self {
            Task::S3Upload(t) => t.run(&runner.buckets, output, vars).await,
            Task::HttpPost(t) => runner.http.post(t, output, vars).await,
        }
    }
}

fn config<T: DeserializeOwned>(spec: &TaskSpec, index: usize) -> Result<T, FieldError> {
    deserialize_named(
        Value::Object(spec.config.clone()),
        &format!("tasks[{index}].config"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(name: &str, config: Value) -> TaskSpec {
        TaskSpec {
            name: name.into(),
            config: config.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn unknown_task_names_the_name_field() {
        let err = Task::parse(&spec("ftp_upload", json!({})), 2).unwrap_err();
        assert_eq!(err.field, "tasks[2].name");
    }

    #[test]
    fn missing_field_is_named() {
        let err = Task::parse(&spec("s3_upload", json!({"key": "k"})), 0).unwrap_err();
        assert_eq!(err.field, "tasks[0].config.bucket");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Task::parse(
            &spec("s3_upload", json!({"bucket": "b", "key": "k", "kee": 1})),
            0,
        )
        .unwrap_err();
        assert_eq!(err.field, "tasks[0].config.kee");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Task::parse(&spec("s3_upload", json!({"bucket": 3, "key": "k"})), 1).unwrap_err();
        assert_eq!(err.field, "tasks[1].config.bucket");
    }

    #[test]
    fn unknown_template_variable_is_named() {
        let err = Task::parse(
            &spec("s3_upload", json!({"bucket": "b", "key": "${nope}"})),
            0,
        )
        .unwrap_err();
        assert_eq!(err.field, "tasks[0].config.key");
        assert!(err.reason.contains("${nope}"), "{}", err.reason);
    }
}
