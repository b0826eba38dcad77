//! JSON-RPC 2.0: request and response types and method dispatch, with no
//! HTTP in sight (the server module only routes bytes here).
//!
//! Errors map to JSON-RPC codes without leaking internals: a refused job is
//! -32602 with `data.field` naming what to fix; a queue that cannot be
//! reached is -32000; an input's bucket that cannot be read to pin it,
//! -32002.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use std::sync::Arc;

use crate::api::control::{Control, ControlError};
use crate::api::rerender::{RerenderRequest, explain};
use crate::api::submit::{SubmitError, SubmitRequest, Submitted, Submitter};
use crate::events::status::StatusTable;
use crate::job::params::{FieldError, deserialize_named};
use crate::queue::QueueError;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;
pub const QUEUE_UNAVAILABLE: i64 = -32000;
pub const STATUS_UNAVAILABLE: i64 = -32001;
/// An input's bucket could not be read at submit, to pin the input.
pub const INPUT_UNAVAILABLE: i64 = -32002;

#[derive(Debug, Deserialize)]
struct Request {
    jsonrpc: String,
    method: String,
    #[serde(default)]
    params: Option<Value>,
    /// Absent for a notification; `Some(Value::Null)` for `"id": null`.
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Response {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<RpcError>,
    id: Value,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }
}

impl From<FieldError> for RpcError {
    fn from(e: FieldError) -> Self {
        Self {
            code: INVALID_PARAMS,
            message: format!("Invalid params: {e}"),
            data: Some(json!({ "field": e.field, "reason": e.reason })),
        }
    }
}

impl From<SubmitError> for RpcError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid(field) => field.into(),
            SubmitError::Input { field, source } => {
                tracing::warn!(%field, error = %source, "cannot pin an input");
                Self {
                    code: INPUT_UNAVAILABLE,
                    message: format!("Input unavailable: {source}"),
                    data: Some(json!({ "field": field, "bucket": source.bucket })),
                }
            }
            SubmitError::Queue {
                queue,
                source,
                sent,
                not_sent,
            } => {
                tracing::error!(%queue, error = %source, sent = sent.len(), "submit failed");
                let mut data = json!({ "queue": queue });
                let mut message = String::from("Queue unavailable");
                if let Some(not_sent) = not_sent {
                    // Part of an array went out; those children will run.
                    message = if not_sent.recorded {
                        format!(
                            "Queue unavailable: {} children of array {} were queued and will \
                             run, and the array completes with them; frames `{}` were not \
                             queued: submit them as a new array",
                            sent.len(),
                            not_sent.job_id,
                            not_sent.frames
                        )
                    } else {
                        format!(
                            "Queue unavailable: {} children of array {} were queued and will \
                             run, but the array cannot complete (its ledger could not be told \
                             what was not sent); frames `{}` were not queued",
                            sent.len(),
                            not_sent.job_id,
                            not_sent.frames
                        )
                    };
                    data["job_id"] = json!(not_sent.job_id);
                    data["sent_message_ids"] = json!(sent);
                    data["not_sent_frames"] = json!(not_sent.frames);
                    data["completes_with_sent"] = json!(not_sent.recorded);
                }
                Self {
                    code: QUEUE_UNAVAILABLE,
                    message,
                    data: Some(data),
                }
            }
        }
    }
}

impl From<ControlError> for RpcError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Field(field) => field.into(),
            ControlError::Queue {
                queue,
                source:
                    QueueError::PartlyRedriven {
                        redriven,
                        left,
                        reason,
                    },
            } => {
                tracing::error!(%queue, redriven, left, %reason, "redrive failed part way");
                Self {
                    code: QUEUE_UNAVAILABLE,
                    message: format!(
                        "Queue unavailable: {redriven} dead letters were put back; {left} \
                         could not be and stay in the dead-letter queue (a redrive again \
                         tries them, and sends none twice)"
                    ),
                    data: Some(json!({"queue": queue, "redriven": redriven, "left": left})),
                }
            }
            ControlError::Queue { queue, source } => SubmitError::Queue {
                queue,
                source,
                sent: Vec::new(),
                not_sent: None,
            }
            .into(),
            ControlError::Ledger(e) => {
                tracing::error!(error = %e, "job control failed");
                RpcError::new(QUEUE_UNAVAILABLE, format!("Ledger unavailable: {e}"))
            }
        }
    }
}

fn method_not_found(method: &str) -> RpcError {
    RpcError::new(METHOD_NOT_FOUND, format!("Method not found: {method}"))
}

impl Response {
    fn reply(id: Value, outcome: Result<Value, RpcError>) -> Self {
        let (result, error) = match outcome {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        Self {
            jsonrpc: "2.0",
            result,
            error,
            id,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsParams {
    #[serde(default)]
    queue_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobStatusParams {
    /// A job id, an array's id, or a message id.
    job_id: String,
}

/// `queue_manager_redrive` and `queue_manager_cancel_job`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobControlParams {
    /// A job's id, or an array's: all its children.
    job_id: String,
    #[serde(default)]
    queue_name: Option<String>,
}

/// The JSON-RPC methods of the submit half.
#[derive(Debug, Clone)]
pub struct Rpc {
    submitter: Submitter,
    control: Control,
    /// For `queue_manager_job_status`, when configured.
    status: Option<Arc<StatusTable>>,
}

impl Rpc {
    pub fn new(submitter: Submitter, control: Control, status: Option<Arc<StatusTable>>) -> Self {
        Self {
            submitter,
            control,
            status,
        }
    }

    /// Handles one HTTP body: a request or a batch. Returns the JSON to send
    /// back, or `None` when everything in it was a notification.
    pub async fn handle(&self, body: &[u8]) -> Option<String> {
        let parse_error = |e: serde_json::Error| {
            let error = RpcError::new(PARSE_ERROR, format!("Parse error: {e}"));
            Some(to_json(&Response::reply(Value::Null, Err(error))))
        };
        let mut budget = self.submitter.limits().max_request_messages;
        let is_batch = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
        if !is_batch {
            return match serde_json::from_slice(body) {
                Ok(single) => self
                    .handle_one(single, &mut budget)
                    .await
                    .map(|r| to_json(&r)),
                Err(e) => parse_error(e),
            };
        }
        // A batch's requests are counted before any is parsed into a tree.
        let items: Vec<&RawValue> = match serde_json::from_slice(body) {
            Ok(items) => items,
            Err(e) => return parse_error(e),
        };
        let limit = self.submitter.limits().max_batch;
        if items.is_empty() || items.len() > limit {
            let error = match items.len() {
                0 => RpcError::new(INVALID_REQUEST, "Invalid Request: empty batch"),
                n => RpcError {
                    code: INVALID_REQUEST,
                    message: format!(
                        "Invalid Request: a batch of {n} requests; at most {limit} \
                         (queue_manager.max_batch)"
                    ),
                    data: Some(json!({"field": "batch", "limit": limit})),
                },
            };
            return Some(to_json(&Response::reply(Value::Null, Err(error))));
        }
        let mut replies = Vec::new();
        for item in items {
            // Checked as JSON already; anything else is an invalid request.
            let value = serde_json::from_str(item.get()).unwrap_or(Value::Null);
            replies.extend(self.handle_one(value, &mut budget).await);
        }
        (!replies.is_empty()).then(|| to_json(&replies))
    }

    /// Handles one request; `budget` is what is left of the messages the
    /// whole HTTP request may queue.
    async fn handle_one(&self, value: Value, budget: &mut u32) -> Option<Response> {
        let id_hint = value.get("id").cloned().unwrap_or(Value::Null);
        let request: Request = match serde_json::from_value(value) {
            Ok(r) => r,
            Err(e) => {
                let error = RpcError::new(INVALID_REQUEST, format!("Invalid Request: {e}"));
                return Some(Response::reply(id_hint, Err(error)));
            }
        };
        if request.jsonrpc != "2.0" {
            let error = RpcError::new(INVALID_REQUEST, "Invalid Request: jsonrpc must be \"2.0\"");
            return Some(Response::reply(id_hint, Err(error)));
        }
        // JSON-RPC 2.0 §4: an id is a string, a number or null.
        if request
            .id
            .as_ref()
            .is_some_and(|id| !matches!(id, Value::String(_) | Value::Number(_) | Value::Null))
        {
            let error = RpcError::new(
                INVALID_REQUEST,
                "Invalid Request: id must be a string, a number or null",
            );
            return Some(Response::reply(Value::Null, Err(error)));
        }
        let outcome = self.call(&request.method, request.params, budget).await;
        request.id.map(|id| Response::reply(id, outcome))
    }

    async fn call(
        &self,
        method: &str,
        params: Option<Value>,
        budget: &mut u32,
    ) -> Result<Value, RpcError> {
        // The method is checked before its params.
        const METHODS: [&str; 9] = [
            "queue_manager_submit_job",
            "queue_manager_rerender",
            "queue_manager_list_commands",
            "queue_manager_queue_stats",
            "queue_manager_job_status",
            "queue_manager_redrive",
            "queue_manager_cancel_job",
            "queue_manager_hold",
            "queue_manager_release",
        ];
        if !METHODS.contains(&method) {
            return Err(method_not_found(method));
        }
        let params = match params {
            None | Some(Value::Null) => json!({}),
            Some(p @ Value::Object(_)) => p,
            Some(_) => {
                return Err(FieldError::new("params", "params must be an object (by name)").into());
            }
        };
        match method {
            "queue_manager_submit_job" => {
                let request: SubmitRequest = deserialize_named(params, "")?;
                let prepared = self.submitter.prepare(request).await?;
                let Some(left) = budget.checked_sub(prepared.messages()) else {
                    let limit = self.submitter.limits().max_request_messages;
                    return Err(FieldError::new(
                        "frames",
                        format!(
                            "this request would queue more than {limit} messages in all \
                             (queue_manager.max_request_messages)"
                        ),
                    )
                    .into());
                };
                *budget = left;
                Ok(match self.submitter.send(prepared).await? {
                    Submitted::Job { message_id } => Value::String(message_id),
                    Submitted::Array {
                        job_id,
                        message_ids,
                    } => json!({"job_id": job_id, "message_ids": message_ids}),
                })
            }
            "queue_manager_rerender" => {
                let request: RerenderRequest = deserialize_named(params, "")?;
                let id = request.job_id.clone();
                match self.submitter.rerender(request).await {
                    Ok(done) => Ok(serde_json::to_value(done).expect("a re-render serializes")),
                    Err(e) => Err(explain(e, &id, self.status.clone()).await.into()),
                }
            }
            "queue_manager_list_commands" => Ok(self.list_commands()),
            "queue_manager_job_status" => {
                let p: JobStatusParams = deserialize_named(params, "")?;
                self.job_status(&p.job_id).await
            }
            "queue_manager_queue_stats" => {
                let p: StatsParams = deserialize_named(params, "")?;
                self.queue_stats(p.queue_name).await
            }
            "queue_manager_redrive" => {
                let p: JobControlParams = deserialize_named(params, "")?;
                let report = self.control.redrive(&p.job_id, p.queue_name).await?;
                Ok(serde_json::to_value(report).expect("a report serializes"))
            }
            "queue_manager_cancel_job" => {
                let p: JobControlParams = deserialize_named(params, "")?;
                let report = self.control.cancel(&p.job_id, p.queue_name).await?;
                Ok(serde_json::to_value(report).expect("a report serializes"))
            }
            "queue_manager_hold" | "queue_manager_release" => {
                let p: JobControlParams = deserialize_named(params, "")?;
                let report = if method == "queue_manager_hold" {
                    self.control.hold(&p.job_id, p.queue_name).await?
                } else {
                    self.control.release(&p.job_id, p.queue_name).await?
                };
                Ok(serde_json::to_value(report).expect("a report serializes"))
            }
            other => Err(method_not_found(other)),
        }
    }

    async fn job_status(&self, id: &str) -> Result<Value, RpcError> {
        let Some(table) = self.status.clone() else {
            return Err(RpcError::new(
                STATUS_UNAVAILABLE,
                "No status table: [events] status is \"off\" in workers.toml",
            ));
        };
        let id = crate::api::control::job_id(id)?.to_string();
        let found = tokio::task::spawn_blocking(move || table.get(&id))
            .await
            .map_err(|e| RpcError::new(INTERNAL_ERROR, e.to_string()))?
            .map_err(|e| {
                tracing::error!(error = %e, "status table unreadable");
                RpcError::new(STATUS_UNAVAILABLE, "Status table unavailable")
            })?;
        match found {
            Some(status) => Ok(serde_json::to_value(status).expect("a status serializes")),
            None => Err(FieldError::new("job_id", "no such job (yet)").into()),
        }
    }

    fn list_commands(&self) -> Value {
        let commands: Vec<Value> = self
            .submitter
            .catalog()
            .commands()
            .map(|c| json!({ "name": c.name, "parameters": c.schema.describe() }))
            .collect();
        Value::Array(commands)
    }

    async fn queue_stats(&self, queue_name: Option<String>) -> Result<Value, RpcError> {
        let (name, queue) = self.control.queue(queue_name)?;
        let stats = queue.stats().await.map_err(unavailable(&name))?;
        Ok(json!({
            "queue": name,
            "visible": stats.visible,
            "in_flight": stats.in_flight,
            "dead_lettered": stats.dead_lettered,
        }))
    }
}

/// A queue that failed a call other than a submit.
fn unavailable(queue: &str) -> impl FnOnce(QueueError) -> SubmitError + '_ {
    move |source| SubmitError::Queue {
        queue: queue.to_owned(),
        source,
        sent: Vec::new(),
        not_sent: None,
    }
}

fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot serialize a JSON-RPC reply");
        format!(r#"{{"jsonrpc":"2.0","error":{{"code":{INTERNAL_ERROR},"message":"Internal error"}},"id":null}}"#)
    })
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod spec_examples;
