//! `renderq bench --sqs-endpoint URL`: one slot on SQS against a bare SDK
//! receive-and-delete loop, and the calls an idle worker makes.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::{BenchArgs, drain, no_op};
use crate::app::App;
use crate::config::Config;

/// Creates a queue and its dead-letter queue; returns the queue's URL.
pub(super) async fn create_queue_pair(
    client: &aws_sdk_sqs::Client,
    name: &str,
) -> anyhow::Result<String> {
    use aws_sdk_sqs::types::QueueAttributeName;
    let dlq = client
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .send()
        .await?;
    let dlq_url = dlq.queue_url.context("no dead-letter queue URL")?;
    let arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await?
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .context("no dead-letter queue ARN")?;
    let policy = json!({"deadLetterTargetArn": arn, "maxReceiveCount": "3"}).to_string();
    let queue = client
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::RedrivePolicy, policy)
        .send()
        .await?;
    queue.queue_url.context("no queue URL")
}

pub async fn run(args: &BenchArgs, endpoint: &str) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;

    let jobs = args.jobs.unwrap_or(500);
    let sdk = crate::aws::sdk_config(Some("us-east-1"), Some(endpoint)).await;
    let client = aws_sdk_sqs::Client::new(&sdk);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let worker_url = create_queue_pair(&client, &format!("renderq-bench-{}", &tag[..10])).await?;
    let bare_url = create_queue_pair(&client, &format!("renderq-bare-{}", &tag[..10])).await?;

    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("workers.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
[queue_manager]
allow_commands = ["get_version"]
default_queue = "bench"
listen_queue = "bench"

[queues.bench]
backend = "sqs"
url = "{worker_url}"
endpoint_url = "{endpoint}"
region = "us-east-1"
"#
        ),
    )?;
    let app = App::build(Config::load(&config_path)?).await?;
    let crate::queue::Queue::Sqs(queue) = app.queues.get("bench").context("bench queue")? else {
        anyhow::bail!("bench queue is not SQS");
    };
    let submitter = app.submitter();
    let worker = app.worker();

    for _ in 0..jobs {
        submitter.submit(no_op()).await?;
    }
    let before = queue.calls().total();
    let receives_before = queue.calls().receive.load(Relaxed);
    let worker_rate = drain(&worker, jobs).await?;
    let calls = queue.calls().total() - before;
    let receives = queue.calls().receive.load(Relaxed) - receives_before;
    println!(
        "renderq worker, one slot: {jobs} jobs = {worker_rate:.1} jobs/s; {:.2} SQS calls per job ({:.2} receives)",
        calls as f64 / jobs as f64,
        receives as f64 / jobs as f64
    );

    // The same work as a bare SDK loop: receive one, delete it.
    for _ in 0..jobs {
        client
            .send_message()
            .queue_url(&bare_url)
            .message_body("{}")
            .send()
            .await?;
    }
    let started = Instant::now();
    let mut done = 0;
    while done < jobs {
        let received = client
            .receive_message()
            .queue_url(&bare_url)
            .max_number_of_messages(1)
            .wait_time_seconds(20)
            .visibility_timeout(120)
            .send()
            .await?;
        for message in received.messages.unwrap_or_default() {
            client
                .delete_message()
                .queue_url(&bare_url)
                .receipt_handle(message.receipt_handle.unwrap_or_default())
                .send()
                .await?;
            done += 1;
        }
    }
    let bare_rate = jobs as f64 / started.elapsed().as_secs_f64();
    println!(
        "bare SDK receive+delete loop: {jobs} messages = {bare_rate:.1} msgs/s; renderq reaches {:.0} %",
        100.0 * worker_rate / bare_rate
    );

    // Idle workers of 8 slots: receive calls per minute of long polling,
    // on one queue and on two in priority order.
    let urgent_url = create_queue_pair(&client, &format!("renderq-urgent-{}", &tag[..10])).await?;
    let idle = Duration::from_secs(args.idle_seconds);
    for queues in [
        vec![("bench", &worker_url)],
        vec![("urgent", &urgent_url), ("bench", &worker_url)],
    ] {
        let per_minute = idle_receives(dir.path(), endpoint, &queues, 8, idle).await?;
        println!(
            "idle worker, 8 slots, {} listen queue(s): {per_minute:.1} receive calls per minute",
            queues.len()
        );
    }

    for url in [worker_url, bare_url, urgent_url] {
        client
            .delete_queue()
            .queue_url(format!("{url}-dlq"))
            .send()
            .await?;
        client.delete_queue().queue_url(url).send().await?;
    }
    Ok(())
}

/// Runs an idle worker with `slots` on `queues` (name, URL; most urgent
/// first) for `idle`; returns its receive calls per minute.
async fn idle_receives(
    dir: &std::path::Path,
    endpoint: &str,
    queues: &[(&str, &String)],
    slots: usize,
    idle: Duration,
) -> anyhow::Result<f64> {
    use std::sync::atomic::Ordering::Relaxed;

    let names: Vec<String> = queues.iter().map(|(name, _)| format!("{name:?}")).collect();
    let mut text = format!(
        "[queue_manager]\nallow_commands = [\"get_version\"]\ndefault_queue = \"bench\"\n\
         listen_queue = \"bench\"\n\n[worker]\nslots = {slots}\nlisten_queues = [{}]\n",
        names.join(", ")
    );
    for (name, url) in queues {
        text.push_str(&format!(
            "\n[queues.{name}]\nbackend = \"sqs\"\nurl = \"{url}\"\nendpoint_url = \"{endpoint}\"\n\
             region = \"us-east-1\"\n"
        ));
    }
    let path = dir.join("idle.toml");
    std::fs::write(&path, text)?;
    let app = App::build(Config::load(&path)?).await?;
    let receives = || {
        queues
            .iter()
            .filter_map(|(name, _)| match app.queues.get(name) {
                Some(crate::queue::Queue::Sqs(q)) => Some(q.calls().receive.load(Relaxed)),
                _ => None,
            })
            .sum::<u64>()
    };
    let worker = std::sync::Arc::new(app.worker());
    let shutdown = crate::fleet::lifecycle::Shutdown::new();
    let running = tokio::spawn({
        let (worker, shutdown) = (worker.clone(), shutdown.clone());
        async move { worker.run(shutdown).await }
    });
    // Past the first round of polls, which every start makes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (before, started) = (receives(), Instant::now());
    tokio::time::sleep(idle).await;
    let calls = receives() - before;
    let per_minute = calls as f64 * 60.0 / started.elapsed().as_secs_f64();
    shutdown.request(
        crate::fleet::lifecycle::StopReason::Signal("SIGTERM"),
        tokio::time::Instant::now() + Duration::from_secs(30),
    );
    running.await?;
    Ok(per_minute)
}
