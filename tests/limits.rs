//! What one request may cost: every limit of `[queue_manager]` refuses a
//! hostile or careless request before it is expanded, built or sent, and a
//! batch the queue refuses in part is sent again only in part.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{AWS_ENV, Backend, Farm, Moto, Server, Settings, fault_proxy, forwarded};

const LONG: Duration = Duration::from_secs(90);

const AUDIT: &str = r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"
"#;

/// A process's peak resident memory (VmHWM), in KiB.
fn peak_kib(pid: nix::unistd::Pid) -> u64 {
    crate::sqs::peak_rss_kib(pid.as_raw() as u32)
}

fn submit_job(params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "queue_manager_submit_job", "params": params})
}

async fn post(farm: &Farm, body: String) -> Value {
    farm.post_raw(body, None)
        .await
        .json()
        .await
        .expect("JSON reply")
}

/// Asserts that `reply` is an error with `code` naming `field`; returns its
/// message.
fn refused(reply: &Value, code: i64, field: &str) -> String {
    assert_eq!(reply["error"]["code"], code, "{reply}");
    assert_eq!(reply["error"]["data"]["field"], field, "{reply}");
    reply["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_requests_are_refused_before_they_cost_anything() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            max_body_bytes: 1024 * 1024,
            extra_allowed: vec!["note"],
            queue_manager_toml: "max_request_messages = 10".into(),
            extra_toml: r#"
[events.targets.t]
kind = "file"
path = "t.jsonl"
events = []

[commands.note]
kind = "process"
program = "true"
[commands.note.parameters]
note = { type = "string" }
frame = { type = "integer" }
"#
            .into(),
            ..Settings::default()
        },
    )
    .await;
    let serve = farm.serve(&[]).await;
    farm.submit(json!({"command": "get_version"})).await;
    let before = peak_kib(serve.pid());

    // One child of ten million frames: refused on chunk_size, then on the
    // frame count, before a frame is expanded.
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "render_demo", "frames": "0-10000000", "chunk_size": 4294967295u32}),
        )
        .await;
    let message = refused(&reply, -32602, "chunk_size");
    assert!(
        message.contains("queue_manager.max_chunk_size"),
        "{message}"
    );
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "render_demo", "frames": "0-10000000", "chunk_size": 10000}),
        )
        .await;
    let message = refused(&reply, -32602, "frames");
    assert!(message.contains("more than 100000 frames"), "{message}");

    // A million-frame range written over and over, up to the body limit.
    let spec = vec!["0-999999"; 120_000].join(",");
    let spec = &spec[..spec[..1000 * 1000].rfind(',').unwrap()];
    let started = Instant::now();
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "render_demo", "frames": spec}),
        )
        .await;
    let took = started.elapsed();
    refused(&reply, -32602, "frames");
    println!(
        "{} KB of repeated ranges refused in {took:?}",
        spec.len() / 1000
    );
    assert!(took < Duration::from_millis(500), "took {took:?}");

    // A 250 KiB job made into 10,000 children would queue 2.5 GB.
    let note = "n".repeat(250 * 1024);
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "note", "parameters": {"note": note}, "frames": "1-10000"}),
        )
        .await;
    let message = refused(&reply, -32602, "frames");
    assert!(
        message.contains("queue_manager.max_array_bytes"),
        "{message}"
    );
    // Once the body is larger than a message may be, it is refused as such.
    let note = "n".repeat(300 * 1024);
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "note", "parameters": {"note": note}}),
        )
        .await;
    let message = refused(&reply, -32602, "parameters");
    assert!(
        message.contains("queue_manager.max_message_bytes"),
        "{message}"
    );

    // The frames and children above cost the endpoint next to nothing.
    let after = peak_kib(serve.pid());
    println!("endpoint peak: {before} KiB before the array requests, {after} KiB after");
    assert!(
        after.saturating_sub(before) < 20 * 1024,
        "peak grew from {before} to {after} KiB"
    );

    // 2,500 array submits in one batch.
    let batch: Vec<Value> = (0..2500)
        .map(|_| submit_job(json!({"command": "get_version", "frames": "1-10"})))
        .collect();
    let reply = post(&farm, Value::Array(batch).to_string()).await;
    let message = refused(&reply, -32600, "batch");
    assert!(message.contains("queue_manager.max_batch"), "{message}");

    // A batch may queue at most max_request_messages (10) messages in all.
    let batch: Vec<Value> = (0..3)
        .map(|_| submit_job(json!({"command": "get_version", "frames": "1-4"})))
        .collect();
    let replies = post(&farm, Value::Array(batch).to_string()).await;
    let replies = replies.as_array().unwrap();
    assert!(replies[0]["result"]["job_id"].is_string(), "{replies:?}");
    assert!(replies[1]["result"]["job_id"].is_string(), "{replies:?}");
    let message = refused(&replies[2], -32602, "frames");
    assert!(
        message.contains("queue_manager.max_request_messages"),
        "{message}"
    );

    // 17,000 subscriptions to one target: refused before they are merged.
    let many = vec![json!({"target": "t"}); 17_000];
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "get_version", "notifications": many}),
        )
        .await;
    let message = refused(&reply, -32602, "notifications");
    assert!(
        message.contains("queue_manager.max_notifications"),
        "{message}"
    );
    // The same subscription three times is merged into one.
    let same = vec![json!({"target": "t", "events": ["JobSubmitted"]}); 3];
    let merged = farm
        .submit(json!({"command": "get_version", "notifications": same}))
        .await;
    let deadline = Instant::now() + LONG;
    let copies = loop {
        let text = std::fs::read_to_string(farm.dir.path().join("t.jsonl")).unwrap_or_default();
        let copies = text.lines().filter(|l| l.contains(&merged)).count();
        if copies > 0 || Instant::now() > deadline {
            break copies;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(copies, 1, "one subscription after merging");
    println!(
        "endpoint peak after the batch and subscription requests: {} KiB",
        peak_kib(serve.pid())
    );
}

/// A farm on moto whose queue is reached through the fault proxy.
struct ArrayFarm {
    farm: Farm,
    count: std::path::PathBuf,
    _proxy: Server,
    _dir: tempfile::TempDir,
}

async fn array_farm(moto: &Moto, needle: &str, times: i32) -> ArrayFarm {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, count, server) = fault_proxy(moto, needle, times, dir.path());
    let farm = Farm::on_moto(
        moto,
        Settings {
            sqs_endpoint: Some(proxy),
            extra_toml: AUDIT.into(),
            ..Settings::default()
        },
    )
    .await;
    ArrayFarm {
        farm,
        count,
        _proxy: server,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_sqs_refuses_is_sent_again_alone_and_the_array_completes() {
    let moto = Moto::shared();
    let ArrayFarm { farm, count, .. } = &array_farm(moto, "\"index\":3,", 1).await;
    let _serve = farm.serve(&AWS_ENV).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "get_version", "frames": "1-20"}),
        )
        .await;
    let job_id = reply["result"]["job_id"]
        .as_str()
        .expect("submitted")
        .to_owned();
    let ids = reply["result"]["message_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 20);
    assert_eq!(
        forwarded(count),
        20,
        "nine entries, then the refused one alone, then ten"
    );
    let completed = farm
        .wait_for_events(|e| e["type"] == "ArrayJobCompleted", 1, LONG)
        .await;
    assert_eq!(completed[0]["job_id"], job_id.as_str());
    assert_eq!(
        completed[0]["detail"],
        json!({"size": 20, "succeeded": 20, "dead_lettered": 0, "cancelled": 0})
    );
    // Every child ran once.
    let succeeded = farm
        .events()
        .iter()
        .filter(|e| e["type"] == "JobSucceeded")
        .count();
    assert_eq!(succeeded, 20);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let completions = farm
        .events()
        .iter()
        .filter(|e| e["type"] == "ArrayJobCompleted")
        .count();
    assert_eq!(completions, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn children_that_cannot_be_sent_are_named_and_the_array_completes_without_them() {
    let moto = Moto::shared();
    let ArrayFarm { farm, count, .. } = &array_farm(moto, "\"index\":3,", -1).await;
    let _serve = farm.serve(&AWS_ENV).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "get_version", "frames": "1-20"}),
        )
        .await;
    assert_eq!(reply["error"]["code"], -32000, "{reply}");
    let data = &reply["error"]["data"];
    // Child 3 (frame 4) failed every try; the batches after it were not sent.
    assert_eq!(data["not_sent_frames"], "4,11-20", "{reply}");
    assert_eq!(data["sent_message_ids"].as_array().unwrap().len(), 9);
    assert_eq!(data["completes_with_sent"], true);
    assert_eq!(forwarded(count), 9, "the nine others, once");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("submit them as a new array"), "{message}");
    let completed = farm
        .wait_for_events(|e| e["type"] == "ArrayJobCompleted", 1, LONG)
        .await;
    assert_eq!(completed[0]["job_id"], data["job_id"]);
    assert_eq!(
        completed[0]["detail"],
        json!({"size": 20, "succeeded": 9, "dead_lettered": 0, "cancelled": 0, "not_sent": 11})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_over_the_entry_limit_is_dropped_once_and_its_batch_delivered_once() {
    let moto = Moto::shared();
    let endpoint = moto.endpoint();
    let (sqs, _) = crate::harness::aws_clients(&endpoint).await;
    let name = format!("big-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let routed = crate::events::bus_routed_to_queue(&endpoint, &sqs, &name).await;
    let farm = Farm::new(
        Backend::Local,
        Settings {
            max_body_bytes: 1024 * 1024,
            queue_manager_toml: "max_message_bytes = 1048576".into(),
            extra_toml: format!(
                r#"
[events.targets.bus]
kind = "eventbridge"
bus = "{name}"
endpoint_url = "{endpoint}"
region = "us-east-1"
events = []
"#
            ),
            ..Settings::default()
        },
    )
    .await;
    let serve = farm.serve(&AWS_ENV).await;
    // Three subscriptions; the middle one's copy of every event carries
    // 300 KiB of variables, more than an EventBridge entry may hold.
    let subscription =
        |vars: Value| json!({"target": "bus", "events": ["JobSubmitted"], "vars": vars});
    farm.submit(json!({"command": "get_version", "notifications": [
        subscription(json!({"n": "small-1"})),
        subscription(json!({"blob": "b".repeat(300 * 1024)})),
        subscription(json!({"n": "small-2"})),
    ]}))
    .await;
    let mut arrived = crate::events::drain_queue(&sqs, &routed, |b| b.len() >= 2).await;
    // Anything sent twice would follow within the retry delays.
    for _ in 0..3 {
        let more = sqs
            .receive_message()
            .queue_url(&routed)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        for message in more.messages.unwrap_or_default() {
            arrived.push(serde_json::from_str(message.body().unwrap()).unwrap());
        }
    }
    let mut small: Vec<&str> = arrived
        .iter()
        .map(|b| b["detail"]["vars"]["n"].as_str().unwrap())
        .collect();
    small.sort();
    assert_eq!(
        small,
        ["small-1", "small-2"],
        "each once, and never the large one"
    );

    let metrics = crate::fleet::scrape(&format!("{}metrics", farm.url())).await;
    assert_eq!(
        metrics["renderq_events_dropped_total{reason=\"too_large\"}"],
        1.0
    );
    assert_eq!(
        metrics["renderq_events_dropped_total{reason=\"out_of_tries\"}"],
        0.0
    );
    let log = serve.log_text();
    assert!(
        log.contains("event dropped: the target will never take it"),
        "{log}"
    );
    assert!(
        log.contains("JobSubmitted of"),
        "the reason names the event and its size: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_deletes_status_and_ledger_records_past_the_retention() {
    let farm = Farm::new(Backend::Local, Settings::default()).await;
    let serve = farm.serve(&[]).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "get_version", "frames": "1-2"}),
        )
        .await;
    let job_id = reply["result"]["job_id"].as_str().unwrap().to_owned();
    serve.wait_for_log("Array job completed", LONG);
    // Wait for the status table to see the completion.
    let deadline = Instant::now() + LONG;
    while !farm.cli(&["status", &job_id]).1.contains("complete") {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            farm.cli(&["status", &job_id])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(serve);

    // The default retention (7 days) keeps everything.
    let kept = crate::harness::renderq_ok(&["prune"], &farm.config, &[]);
    assert!(kept.contains("Pruned 0 records older than 7days"), "{kept}");
    let (code, status, _) = farm.cli(&["status", &job_id]);
    assert_eq!(code, 0, "{status}");

    // A retention of one second, two seconds later (rows keep whole
    // seconds), drops it all.
    std::thread::sleep(Duration::from_millis(2100));
    let short = farm.config_variant("short", |text| {
        text.replace(
            "listen_queue = \"renders\"",
            "listen_queue = \"renders\"\nretention = \"1s\"",
        )
    });
    let pruned = crate::harness::renderq_ok(&["prune"], &short, &[]);
    let count: u64 = pruned
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{pruned}"));
    // Status: events seen, two jobs, one array; ledger: two children and
    // the completion.
    assert!(count >= 6, "{pruned}");
    let (code, _, err) = farm.cli(&["status", &job_id]);
    assert_ne!(code, 0);
    assert!(err.contains("no job or array"), "{err}");
}
