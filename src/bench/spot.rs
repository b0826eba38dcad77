//! `renderq bench --spot`: time from a spot interruption notice to the
//! interrupted job's message being receivable again, with an in-process
//! stand-in for IMDS, on the embedded queue or (with `--sqs-endpoint`) SQS.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::{get, put};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::sqs::create_queue_pair;
use super::{BenchArgs, CONFIG};
use crate::api::submit::SubmitRequest;
use crate::app::App;
use crate::config::Config;
use crate::fleet::lifecycle::Shutdown;

/// Serves IMDSv2 with a spot notice once `notice` holds a document.
async fn fake_imds(notice: Arc<Mutex<Option<String>>>) -> anyhow::Result<String> {
    let app = axum::Router::new()
        .route(
            "/latest/api/token",
            put(|| async { ([("x-aws-ec2-metadata-token-ttl-seconds", "21600")], "t") }),
        )
        .route("/latest/meta-data/instance-id", get(|| async { "i-bench" }))
        .route(
            "/latest/meta-data/autoscaling/target-lifecycle-state",
            get(|| async { "InService" }),
        )
        .route(
            "/latest/meta-data/spot/instance-action",
            get(move || {
                let document = notice.lock().expect("notice lock").clone();
                async move {
                    match document {
                        Some(body) => (axum::http::StatusCode::OK, body),
                        None => (axum::http::StatusCode::NOT_FOUND, String::new()),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let runs = args.jobs.unwrap_or(20);
    let notice = Arc::new(Mutex::new(None));
    let imds = fake_imds(notice.clone()).await?;
    let dir = tempfile::tempdir()?;
    let queue = match &args.sqs_endpoint {
        Some(endpoint) => {
            let sdk = crate::aws::sdk_config(None, Some(endpoint)).await;
            let client = aws_sdk_sqs::Client::new(&sdk);
            let name = format!(
                "bench-spot-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            );
            let url = create_queue_pair(&client, &name).await?;
            format!("backend = \"sqs\"\nurl = \"{url}\"\nendpoint_url = \"{endpoint}\"")
        }
        None => "backend = \"local\"\npath = \"queue\"".into(),
    };
    let config = CONFIG
        .replace("backend = \"local\"\npath = \"queue\"", &queue)
        .replace("allow_commands = [\"get_version\"]", "allow_commands = [\"get_version\", \"sleep\"]")
        .replace(
            "wait_time = \"1s\"",
            &format!("wait_time = \"1s\"\nimds = \"{imds}\"\nstop_margin = \"1s\"\ndrain_timeout = \"10s\""),
        );
    let path = dir.path().join("workers.toml");
    std::fs::write(&path, config)?;
    let app = App::build(Config::load(&path)?).await?;
    let queue = app
        .queues
        .get("bench")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no bench queue"))?;
    let never = CancellationToken::new();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        *notice.lock().expect("notice lock") = None;
        app.submitter()
            .submit(SubmitRequest {
                command: "sleep".into(),
                parameters: serde_json::json!({"seconds": 60})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                ..super::no_op()
            })
            .await?;
        let worker = Arc::new(app.worker());
        let shutdown = Shutdown::new();
        crate::fleet::imds::watch(
            &crate::config::ImdsSetting::parse(&imds).map_err(anyhow::Error::msg)?,
            shutdown.clone(),
            crate::fleet::imds::Deadlines {
                margin: Duration::from_secs(1),
                drain: Duration::from_secs(10),
                rebalance: None,
            },
        );
        let running = tokio::spawn({
            let (worker, shutdown) = (worker.clone(), shutdown.clone());
            async move { worker.run(shutdown).await }
        });
        while worker.running().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let at = (chrono::Utc::now() + chrono::Duration::seconds(30))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        *notice.lock().expect("notice lock") =
            Some(serde_json::json!({"action": "terminate", "time": at}).to_string());
        let noticed = Instant::now();
        let back = loop {
            if let Some(message) = queue
                .receive(1, Duration::from_secs(1), Duration::from_secs(30), &never)
                .await?
                .pop()
            {
                let back = noticed.elapsed();
                queue.delete(&message.receipt).await?;
                break back;
            }
        };
        running.await?;
        times.push(back);
    }
    println!(
        "spot notice to message receivable again, {runs} runs on {}: {} (IMDS polled every 500 ms)",
        super::backend_name(args),
        super::median_and_max(&mut times)
    );
    Ok(())
}
