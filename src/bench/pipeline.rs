//! `renderq bench --pipeline`: a no-op array (--jobs frames, default 1,000)
//! and a `same` dependant array of the same frames, drained by two slots
//! of one worker on the embedded queue. Measured: from a parent child's
//! settle (its `JobSucceeded`, published right after its message was
//! deleted) to its dependant's message being sent (its `JobReleased`,
//! published right after the send), from the events' own times (whole
//! milliseconds); and the ledger transactions a released child cost.
//! With `--sqs-endpoint` (e.g. a local moto): the same on an SQS queue
//! whose ledger is in a bucket there, and every S3 call the ledger made
//! while the two arrays ran, per released child.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::ledger::{Counter, counted_client};
use super::sqs::create_queue_pair;
use super::{BenchArgs, CONFIG, median_and_max, no_op};
use crate::api::submit::{SubmitRequest, Submitted};
use crate::app::App;
use crate::config::Config;
use crate::events::ledger::Ledger;
use crate::job::depends::{DependsOn, Frames, On};
use crate::worker::Outcome;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let frames = args.jobs.unwrap_or(1_000);
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("workers.toml");
    let audit = "\n[events.targets.audit]\nkind = \"file\"\npath = \"events.jsonl\"\n";
    let s3 = match &args.sqs_endpoint {
        None => {
            std::fs::write(&config_path, format!("{CONFIG}{audit}"))?;
            None
        }
        Some(endpoint) => {
            let s3_endpoint = args.s3_endpoint.as_deref().unwrap_or(endpoint);
            let (config, s3) = on_sqs(endpoint, s3_endpoint).await?;
            std::fs::write(&config_path, format!("{config}{audit}"))?;
            Some(s3)
        }
    };
    let mut app = App::build(Config::load(&config_path)?).await?;
    if let Some((client, bucket, _)) = &s3 {
        // The same ledger, through a client that counts its calls.
        let ledger = Ledger::s3(client.clone(), bucket.clone(), STATUS_PREFIX, "bench");
        app.ledgers.replace("bench", ledger);
    }
    let calls = || s3.as_ref().map_or(0, |(_, _, counter)| counter.calls());
    let submitter = app.submitter();
    let array = |depends_on| SubmitRequest {
        frames: Some(format!("1-{frames}")),
        depends_on,
        ..no_op()
    };
    let Submitted::Array { job_id: parent, .. } = submitter.submit(array(Vec::new())).await? else {
        anyhow::bail!("an array submit came back as a plain job");
    };
    let started = Instant::now();
    let edge = DependsOn {
        job_id: parent.clone(),
        frames: Frames::Same,
        on: On::Success,
    };
    let Submitted::Array { job_id: child, .. } = submitter.submit(array(vec![edge])).await? else {
        anyhow::bail!("an array submit came back as a plain job");
    };
    println!(
        "{frames}-frame `same` dependant held in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );

    if let Some((client, bucket, _)) = &s3 {
        println!(
            "one S3 ledger write here: {}",
            write_times(client, bucket).await?
        );
    }

    // Two slots drain both arrays.
    let calls_before = calls();
    let worker = Arc::new(app.worker());
    let (never, stop) = (CancellationToken::new(), CancellationToken::new());
    let started = Instant::now();
    let mut slots = tokio::task::JoinSet::new();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..2 {
        let (worker, never, stop, done) =
            (worker.clone(), never.clone(), stop.clone(), done.clone());
        slots.spawn(async move {
            while !stop.is_cancelled() {
                // Empty: dependants not released yet.
                if let Outcome::Processed { .. } = worker.process_next(&stop, &never).await? {
                    let ran = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    if ran == 2 * frames {
                        // The other slot waits for a message: stop it.
                        stop.cancel();
                    }
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(slot) = slots.join_next().await {
        slot??;
    }
    println!(
        "{} jobs through 2 slots in {:.2?}",
        2 * frames,
        started.elapsed()
    );
    let ledger_calls = calls() - calls_before;
    app.publisher.close(Duration::from_secs(10)).await;

    let text = std::fs::read_to_string(dir.path().join("events.jsonl"))?;
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let time = |e: &Value| -> Option<DateTime<Utc>> { e["time"].as_str()?.parse().ok() };
    let mut settled: HashMap<u64, DateTime<Utc>> = HashMap::new();
    let mut released: HashMap<u64, (DateTime<Utc>, usize)> = HashMap::new();
    for e in &events {
        let index = e["array"]["index"].as_u64();
        match (e["type"].as_str(), e["array"]["job_id"].as_str(), index) {
            (Some("JobSucceeded"), Some(id), Some(i)) if id == parent => {
                settled.insert(i, time(e).context("an event without a time")?);
            }
            (Some("JobReleased"), Some(id), Some(i)) if id == child => {
                let entry = released
                    .entry(i)
                    .or_insert((time(e).context("an event without a time")?, 0));
                entry.1 += 1;
            }
            _ => {}
        }
    }
    anyhow::ensure!(
        released.len() == frames && released.values().all(|(_, n)| *n == 1),
        "{} of {frames} dependants released, some more than once",
        released.len()
    );
    let latencies = released
        .iter()
        .filter_map(|(i, (at, _))| Some((*at - *settled.get(i)?).num_milliseconds()));
    println!(
        "parent child settled -> dependant's message sent, {}",
        spread(latencies.collect())
    );
    if let Some((_, _, counter)) = &s3 {
        // When each dependant child's claim landed (the last, should one
        // have lost a race), from its parent child's settle (negative: a
        // claim lands before the settle), and from it to the send.
        let claims: HashMap<u64, DateTime<Utc>> = (counter.claims().into_iter())
            .filter_map(|(held, at)| {
                let index = held.strip_prefix(&format!("{child}/"))?.parse().ok()?;
                Some((index, at.into()))
            })
            .collect();
        let (mut ledger, mut send) = (Vec::new(), Vec::new());
        for (i, (sent, _)) in &released {
            if let (Some(settle), Some(claim)) = (settled.get(i), claims.get(i)) {
                ledger.push((*claim - *settle).num_milliseconds());
                send.push((*sent - *claim).num_milliseconds());
            }
        }
        println!(
            "parent child settled -> the dependant's claim landed (negative: before), {}",
            spread(ledger)
        );
        println!(
            "the dependant's claim landed -> its message sent, {}",
            spread(send)
        );
        println!(
            "S3 ledger calls while both arrays ran: {ledger_calls}, {:.2} per released child \
             (the parent's and the dependant's settles included)",
            ledger_calls as f64 / frames as f64
        );
    } else {
        println!(
            "ledger per released child (embedded): the parent child's record, one transaction \
             spending its edges and claiming the dependant, one marking it sent"
        );
    }
    Ok(())
}

const STATUS_PREFIX: &str = "renderq-status";

/// p50, p99 and max of whole milliseconds, and over how many.
fn spread(mut ms: Vec<i64>) -> String {
    ms.sort_unstable();
    let Some(&max) = ms.last() else {
        return "none measured".into();
    };
    let pct = |p: f64| ms[((ms.len() as f64 * p) as usize).min(ms.len() - 1)];
    format!(
        "over {} children (whole ms): p50 {} ms, p99 {} ms, max {max} ms",
        ms.len(),
        pct(0.50),
        pct(0.99)
    )
}

/// What one conditional write costs on this server: 50 small objects
/// written with `If-None-Match: *`, median and max.
async fn write_times(client: &aws_sdk_s3::Client, bucket: &str) -> anyhow::Result<String> {
    let mut times = Vec::new();
    for i in 0..50 {
        let started = Instant::now();
        client
            .put_object()
            .bucket(bucket)
            .key(format!("bench-writes/{i}"))
            .if_none_match("*")
            .body(b"{}".to_vec().into())
            .send()
            .await?;
        times.push(started.elapsed());
    }
    Ok(format!(
        "{} (50 `If-None-Match` PUTs)",
        median_and_max(&mut times)
    ))
}

/// A queue pair at `endpoint` and a bucket at `s3_endpoint`: the config of
/// an SQS queue `bench` whose ledger is in the bucket, and an S3 client
/// (counting its calls) with the bucket's name.
async fn on_sqs(
    endpoint: &str,
    s3_endpoint: &str,
) -> anyhow::Result<(String, (aws_sdk_s3::Client, String, Counter))> {
    let sdk = crate::aws::sdk_config(Some("us-east-1"), Some(endpoint)).await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let url = create_queue_pair(
        &aws_sdk_sqs::Client::new(&sdk),
        &format!("renderq-pipeline-{}", &tag[..10]),
    )
    .await?;
    let (client, counter) = counted_client(s3_endpoint).await;
    let bucket = format!("bench-pipeline-{}", &tag[..8]);
    client.create_bucket().bucket(&bucket).send().await?;
    let config = format!(
        r#"
[queue_manager]
allow_commands = ["get_version"]
default_queue = "bench"
listen_queue = "bench"

[server]
listen = "127.0.0.1:0"

[worker]
wait_time = "1s"

[queues.bench]
backend = "sqs"
url = "{url}"
endpoint_url = "{endpoint}"
region = "us-east-1"
status_bucket = "status"
status_prefix = "{STATUS_PREFIX}"

[buckets.status]
backend = "s3"
bucket = "{bucket}"
endpoint_url = "{s3_endpoint}"
region = "us-east-1"
"#
    );
    Ok((config, (client, bucket, counter)))
}
