//! `renderq submit`: the JSON-RPC client side, and `--wait`, which follows
//! a job or an array to its end with a progress bar.

use clap::Args;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::config::{Config, optional_secret};
use crate::events::status::Status;

/// `renderq submit`: the job, where to send it, and whether to follow it.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The command to run, e.g. render_demo.
    pub command: String,
    /// Parameters as a JSON object.
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// Post-tasks as a JSON array.
    #[arg(long, default_value = "[]")]
    pub tasks: String,
    /// Inputs as a JSON array (objects or manifests placed in the job's
    /// folder).
    #[arg(long, default_value = "[]")]
    pub inputs: String,
    /// Queue to submit to (default: queue_manager.default_queue).
    #[arg(long)]
    pub queue: Option<String>,
    /// Endpoint URL (default: http://<server.listen>/).
    #[arg(long)]
    pub url: Option<String>,
    /// Make an array job of these frames (`1-100`, `1-100x5`, `1,5,9-12`).
    #[arg(long)]
    pub frames: Option<String>,
    /// Frames per child of an array job.
    #[arg(long)]
    pub chunk_size: Option<u32>,
    /// Wait for another job first: `ID[:same][:finish]` (`same`: each
    /// child waits only for the parent children holding its frames;
    /// `finish`: released even if the parent fails). Repeatable.
    #[arg(long, value_name = "ID[:same][:finish]", value_parser = crate::job::depends::DependsOn::parse_after)]
    pub after: Vec<crate::job::depends::DependsOn>,
    /// Follow the job (or array) to its end with a progress bar; exit
    /// non-zero if anything was dead-lettered. Reads the status table.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up (exit status 1) after this long, e.g. `2h`.
    #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
    pub timeout: Option<Duration>,
    /// What people call the job (`shot010_lighting_v3`).
    #[arg(long)]
    pub name: Option<String>,
    /// Who submits it.
    #[arg(long)]
    pub owner: Option<String>,
    /// A metadata entry, `KEY=VALUE` (again for more).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
}

/// A JSON-RPC client for one endpoint.
struct Client {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Client {
    fn new(config: &Config, url: Option<String>) -> anyhow::Result<Self> {
        let token = optional_secret(
            config,
            "server.auth_token_env",
            config.server.auth_token_env.as_deref(),
        )?;
        Ok(Self {
            http: reqwest::Client::new(),
            url: url.unwrap_or_else(|| format!("http://{}/", config.server.listen)),
            token,
        })
    }

    /// Calls `method`; returns its result, or its error as an error.
    async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let mut request = self.http.post(&self.url).json(&json!({
            "jsonrpc": "2.0", "method": method, "params": params, "id": 1
        }));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow::anyhow!(
                    "nothing answers at {}: is `renderq serve` running (with this config)?",
                    self.url
                )
            } else {
                anyhow::anyhow!("cannot reach {}: {}", self.url, crate::error_chain(&e))
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "{} answered {status}: {}",
                self.url,
                response.text().await.unwrap_or_default()
            );
        }
        let mut reply: Value = response.json().await.context("reply is not JSON")?;
        if let Value::Object(error) = &reply["error"] {
            // The message already says the field and the reason; show only
            // what else the data holds (e.g. the children already sent).
            let extra: serde_json::Map<String, Value> = error
                .get("data")
                .and_then(Value::as_object)
                .map(|data| {
                    data.iter()
                        .filter(|(k, _)| !matches!(k.as_str(), "field" | "reason"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            bail!(
                "{method} refused ({}): {}{}",
                error.get("code").unwrap_or(&Value::Null),
                error.get("message").and_then(Value::as_str).unwrap_or(""),
                if extra.is_empty() {
                    String::new()
                } else {
                    format!(" {}", Value::Object(extra))
                }
            );
        }
        Ok(reply["result"].take())
    }
}

/// Submits a job (or an array); prints its id. With `--wait`, follows it
/// to the end and fails if anything was dead-lettered.
pub async fn submit(config: &Config, args: SubmitArgs) -> anyhow::Result<()> {
    let parameters: Value = serde_json::from_str(&args.params).context("--params is not JSON")?;
    let tasks: Value = serde_json::from_str(&args.tasks).context("--tasks is not JSON")?;
    let inputs: Value = serde_json::from_str(&args.inputs).context("--inputs is not JSON")?;
    let mut params = json!({ "command": args.command, "parameters": parameters, "tasks": tasks });
    if inputs.as_array().is_none_or(|a| !a.is_empty()) {
        params["inputs"] = inputs;
    }
    if let Some(queue) = args.queue {
        params["queue_name"] = queue.into();
    }
    if let Some(frames) = args.frames {
        params["frames"] = frames.into();
    }
    if let Some(chunk_size) = args.chunk_size {
        params["chunk_size"] = chunk_size.into();
    }
    if let Some(name) = args.name {
        params["name"] = name.into();
    }
    if let Some(owner) = args.owner {
        params["owner"] = owner.into();
    }
    if !args.meta.is_empty() {
        let mut metadata = serde_json::Map::new();
        for entry in &args.meta {
            let (key, value) = entry
                .split_once('=')
                .with_context(|| format!("--meta `{entry}` is not KEY=VALUE"))?;
            metadata.insert(key.to_owned(), value.into());
        }
        params["metadata"] = metadata.into();
    }
    if !args.after.is_empty() {
        params["depends_on"] = serde_json::to_value(&args.after)?;
    }
    let client = Client::new(config, args.url)?;
    let result = client.call("queue_manager_submit_job", params).await?;
    let id = match &result {
        Value::String(message_id) => message_id.clone(),
        array => array["job_id"]
            .as_str()
            .with_context(|| format!("unexpected result: {result}"))?
            .to_owned(),
    };
    println!("{id}");
    if args.wait {
        wait(&client, &id, args.timeout).await?;
    }
    Ok(())
}

/// Polls the job's status until it is final (or `timeout` passed),
/// showing progress.
async fn wait(client: &Client, id: &str, timeout: Option<Duration>) -> anyhow::Result<()> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let bar = ProgressBar::new_spinner();
    let final_status = loop {
        let status = match client
            .call("queue_manager_job_status", json!({ "job_id": id }))
            .await
        {
            Ok(value) => Some(serde_json::from_value::<Status>(value)?),
            // Not in the table until its first event arrives.
            Err(e) if e.to_string().contains("no such job") => None,
            Err(e) => return Err(e),
        };
        match &status {
            Some(Status::Array(array)) => {
                if bar.length() != Some(array.size.into()) {
                    bar.set_length(array.size.into());
                    bar.set_style(
                        ProgressStyle::with_template("{bar:40} {pos}/{len} children {msg}")
                            .expect("a valid template"),
                    );
                }
                bar.set_position((array.succeeded + array.dead_lettered + array.cancelled).into());
                bar.set_message(format!(
                    "({} dead-lettered, {} cancelled, {} running)",
                    array.dead_lettered, array.cancelled, array.running
                ));
            }
            Some(Status::Job(job)) => {
                bar.set_message(format!(
                    "{} (attempt {}{})",
                    job.state,
                    job.attempt,
                    job.progress
                        .map(|p| format!(", {p:.0}%"))
                        .unwrap_or_default()
                ));
                bar.tick();
            }
            None => bar.set_message("submitted"),
        }
        if let Some(status) = status.filter(Status::is_final) {
            break status;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            bar.finish_and_clear();
            bail!(
                "{id} has not ended after {}: it goes on; `renderq status {id}` follows it",
                humantime::format_duration(timeout.unwrap_or_default())
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    bar.finish_and_clear();
    println!("{final_status}");
    if final_status.has_dead_letters() {
        bail!("dead-lettered: see `renderq dlq list`");
    }
    Ok(())
}
