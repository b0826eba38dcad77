//! `renderq bench --cancel`: time from a cancel to its running job being
//! stopped (its process killed, its message deleted), on the embedded
//! queue or (with `--sqs-endpoint`) SQS, whose ledger is then a bucket on
//! the same endpoint.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::sqs::create_queue_pair;
use super::{BenchArgs, CONFIG};
use crate::api::submit::{SubmitRequest, Submitted};
use crate::app::App;
use crate::config::Config;
use crate::fleet::lifecycle::Shutdown;

/// The visibility timeout of the SQS runs: a heartbeat every 2 s.
const SQS_VISIBILITY: &str = "6s";

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let runs = args.jobs.unwrap_or(20);
    let dir = tempfile::tempdir()?;
    let (queue, visibility) = match &args.sqs_endpoint {
        Some(endpoint) => {
            let sdk = crate::aws::sdk_config(Some("us-east-1"), Some(endpoint)).await;
            let name = format!(
                "bench-cancel-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            );
            let url = create_queue_pair(&aws_sdk_sqs::Client::new(&sdk), &name).await?;
            aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&sdk)
                    .force_path_style(true)
                    .build(),
            )
            .create_bucket()
            .bucket(&name)
            .send()
            .await?;
            let queue = format!(
                "backend = \"sqs\"\nurl = \"{url}\"\nendpoint_url = \"{endpoint}\"\n\
                 region = \"us-east-1\"\nstatus_bucket = \"ledger\"\n\n\
                 [buckets.ledger]\nbackend = \"s3\"\nbucket = \"{name}\"\n\
                 endpoint_url = \"{endpoint}\"\nregion = \"us-east-1\""
            );
            (queue, SQS_VISIBILITY)
        }
        None => ("backend = \"local\"\npath = \"queue\"".into(), "120s"),
    };
    let config = CONFIG
        .replace("backend = \"local\"\npath = \"queue\"", &queue)
        .replace(
            "allow_commands = [\"get_version\"]",
            "allow_commands = [\"get_version\", \"sleep\"]",
        )
        .replace(
            "wait_time = \"1s\"",
            &format!("wait_time = \"1s\"\nvisibility_timeout = \"{visibility}\""),
        );
    let path = dir.path().join("workers.toml");
    std::fs::write(&path, config)?;
    let app = App::build(Config::load(&path)?).await?;
    let (worker, control) = (Arc::new(app.worker()), app.control());
    let shutdown = Shutdown::new();
    let running = tokio::spawn({
        let (worker, shutdown) = (worker.clone(), shutdown.clone());
        async move { worker.run(shutdown).await }
    });
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let submitted = app
            .submitter()
            .submit(SubmitRequest {
                command: "sleep".into(),
                parameters: serde_json::json!({"seconds": 600})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                ..super::no_op()
            })
            .await?;
        let Submitted::Job { message_id } = submitted else {
            anyhow::bail!("a plain job came back as an array");
        };
        while worker.running().is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // At a random moment of the job's heartbeat period (a v4 UUID is
        // random).
        let phase = (uuid::Uuid::new_v4().as_u128() % 2000) as u64;
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let asked = Instant::now();
        control.cancel(&message_id, None).await?;
        while !worker.running().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(asked.elapsed());
    }
    shutdown.request(
        crate::fleet::lifecycle::StopReason::Signal("SIGTERM"),
        Instant::now() + Duration::from_secs(30),
    );
    running.await?;
    println!(
        "cancel to stopped, {runs} runs on {} (visibility {visibility}): {}",
        super::backend_name(args),
        super::median_and_max(&mut times)
    );
    Ok(())
}
