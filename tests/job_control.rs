//! Job control: cancelling a job or an array, and putting back one job's,
//! or one array's, dead letters.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::harness::{Backend, Farm, Settings, repo_path};

scenarios!(
    redrive_one_array_puts_back_exactly_its_dead_letters,
    a_cancelled_array_stops_and_completes_once,
    a_cancelled_adaptor_job_is_not_retried_and_the_adaptor_is_kept,
    cancel_answers_what_it_did,
    an_urgent_job_takes_the_next_free_slot,
);

/// The visibility timeout of the cancel tests: on SQS a running job is
/// stopped within one heartbeat, a third of it.
fn visibility(backend: Backend) -> &'static str {
    match backend {
        Backend::Local => "30s",
        Backend::Sqs => "3s",
    }
}

/// How long after a cancel a running job may still be running.
fn stop_bound(backend: Backend) -> Duration {
    match backend {
        Backend::Local => Duration::from_secs(2),
        // One heartbeat (1 s), and the slot's kill and settle.
        Backend::Sqs => Duration::from_millis(2500),
    }
}

/// How long after a cancel a job may still announce its start: on the
/// embedded queue only one that was received and checked just before the
/// cancel (queued messages are deleted, received ones are checked at
/// once); on SQS within the period workers reuse what they read of the
/// ledger (one heartbeat).
fn start_bound(backend: Backend) -> Duration {
    match backend {
        Backend::Local => Duration::from_millis(100),
        Backend::Sqs => Duration::from_millis(1500),
    }
}

fn time(event: &Value) -> DateTime<Utc> {
    event["time"].as_str().unwrap().parse().unwrap()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z'))
    })
}

/// Objects under `prefix` in the results bucket.
async fn uploaded(farm: &Farm, prefix: &str) -> usize {
    match &farm.aws {
        None => crate::harness::files_under(&farm.bucket_root().join(prefix)).len(),
        Some(aws) => aws
            .s3
            .list_objects_v2()
            .bucket(&aws.bucket)
            .prefix(prefix)
            .send()
            .await
            .unwrap()
            .key_count
            .unwrap_or(0) as usize,
    }
}

async fn a_cancelled_array_stops_and_completes_once(backend: Backend) {
    let pids = tempfile::tempdir().unwrap();
    let farm = Farm::new(
        backend,
        Settings {
            visibility_timeout: visibility(backend),
            extra_allowed: vec!["frame"],
            worker_toml: format!("slots = {SLOTS}"),
            extra_toml: format!(
                r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"

[commands.frame]
kind = "process"
program = "python3"
args = ["{fixture}", "{{frame}}", "{pids}", "0.7", "{{workdir}}/frame_{{frame}}.txt"]
output = "{{workdir}}/frame_{{frame}}.txt"
[commands.frame.parameters]
frame = {{ type = "integer", min = 0, default = 1 }}
"#,
                fixture = repo_path("tests/fixtures/cancel_frame.py"),
                pids = pids.path().display(),
            ),
            ..Settings::default()
        },
    )
    .await;
    // Two workers: serve's, and one of its own.
    const WORKERS: u64 = 2;
    let _serve = farm.serve(&[]).await;
    let _worker = farm.spawn("worker", &[]);
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "frame", "frames": "1-50",
                   "tasks": [{"name": "s3_upload",
                              "config": {"bucket": "results", "key": "out/${message_id}.${mime_ext}"}}]}),
        )
        .await;
    let array = reply["result"]["job_id"].as_str().unwrap().to_owned();
    farm.wait_for_events(|e| e["type"] == "JobSucceeded", 5, LONG)
        .await;

    let asked = Utc::now();
    let answer = farm
        .rpc("queue_manager_cancel_job", json!({"job_id": array}))
        .await;
    let answered = Utc::now();
    assert_eq!(answer["result"]["outcome"], "cancelled", "{answer}");
    let held_and_skipped = if backend == Backend::Local {
        let running = answer["result"]["cancelled"].as_u64().unwrap();
        let skipped = answer["result"]["skipped_queued"].as_u64().unwrap();
        // A slot holds at most two children's messages: one rendering, and
        // the one before it while its upload overlaps that render (see
        // `Worker::slot_loop`).
        assert!(running <= WORKERS * SLOTS * 2, "{answer}");
        Some((running, skipped))
    } else {
        assert!(answer["result"]["cancelled"].is_null(), "{answer}");
        None
    };

    let completed = farm
        .wait_for_events(|e| e["type"] == "ArrayJobCompleted", 1, LONG)
        .await;
    // A second announcement would come from a late settle: give it time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = farm.events();
    let completions: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "ArrayJobCompleted")
        .collect();
    assert_eq!(completions.len(), 1, "{completions:?}");
    let counts = &completed[0]["detail"];
    let count = |k: &str| counts[k].as_u64().unwrap();
    assert!(count("cancelled") > 0, "{counts}");
    assert_eq!(
        count("succeeded") + count("dead_lettered") + count("cancelled"),
        50,
        "{counts}"
    );
    assert_eq!(count("size"), 50);
    // Every child deleted unrun is counted cancelled; the others the array
    // counts cancelled were held at the cancel, and stopped.
    if let Some((running, skipped)) = held_and_skipped {
        assert!(
            skipped <= count("cancelled") && count("cancelled") <= skipped + running,
            "{answer} {counts}"
        );
    }

    // No child started after the cancel (on SQS: once workers had read it).
    let late_starts: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["type"] == "JobStarted"
                && time(e) > answered + chrono::Duration::from_std(start_bound(backend)).unwrap()
        })
        .collect();
    assert!(
        late_starts.is_empty(),
        "started after the cancel: {late_starts:?}"
    );
    // The children running at the cancel were stopped within the bound.
    let of = |kind: &'static str| move |e: &&Value| e["type"] == kind && e["job_id"].is_string();
    let started: Vec<&str> = events
        .iter()
        .filter(of("JobStarted"))
        .map(|e| e["job_id"].as_str().unwrap())
        .collect();
    // Each started child's first cancel (a later one is a redelivered copy
    // discarded on receive).
    let mut stopped: std::collections::BTreeMap<&str, &Value> = Default::default();
    for event in events.iter().filter(of("JobCancelled")) {
        let job = event["job_id"].as_str().unwrap();
        if started.contains(&job) {
            stopped.entry(job).or_insert(event);
        }
    }
    let bound = chrono::Duration::from_std(start_bound(backend) + stop_bound(backend)).unwrap();
    for event in stopped.values() {
        assert!(time(event) - asked < bound, "stopped late: {event}");
    }
    // No retries and no dead letters for cancelled children (a redelivery
    // under load is reported as a lost worker, and is not a retry).
    assert!(
        !events.iter().any(|e| e["type"] == "JobFailed"
            || (e["type"] == "JobRequeued" && e["detail"]["reason"] != "worker lost")),
        "{events:?}"
    );
    assert_eq!(farm.stats(), (0, 0, 0));
    // Nothing was uploaded but the successes'. Delivery is at least once:
    // under load a child's message can come back while it still runs (a
    // late heartbeat), and its second copy be taken as cancelled before the
    // first succeeds; the array then counts that child as cancelled.
    let succeeded: std::collections::HashSet<&str> = events
        .iter()
        .filter(of("JobSucceeded"))
        .map(|e| e["message_id"].as_str().unwrap())
        .collect();
    let twice = succeeded.len() as u64 - count("succeeded");
    assert!(twice <= 2, "{} successes, {counts}", succeeded.len());
    assert_eq!(uploaded(&farm, "out/").await, succeeded.len());
    // Every process the children started is gone.
    for entry in std::fs::read_dir(pids.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for pid in text.lines().filter_map(|l| l.parse::<i32>().ok()) {
            assert!(!alive(pid), "process {pid} outlived its cancelled job");
        }
    }
    // The status table counts them (a success outranks a cancel there),
    // once its last batch is in.
    let cancelled = format!("cancelled={}", count("cancelled") - twice);
    let deadline = Instant::now() + LONG;
    loop {
        let (_, status, _) = farm.cli(&["status", &array]);
        if status.contains(&cancelled) {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second cancel does nothing more.
    let again = farm
        .rpc("queue_manager_cancel_job", json!({"job_id": array}))
        .await;
    assert_eq!(again["result"]["outcome"], "already_finished", "{again}");
}

async fn a_cancelled_adaptor_job_is_not_retried_and_the_adaptor_is_kept(backend: Backend) {
    let files = tempfile::tempdir().unwrap();
    let (starts, cancels) = (files.path().join("starts"), files.path().join("cancels"));
    let farm = Farm::new(
        backend,
        Settings {
            visibility_timeout: visibility(backend),
            extra_allowed: vec!["slow"],
            extra_toml: format!(
                r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"

[commands.slow]
kind = "adaptor"
program = "{fixture}"
args = ["{starts}", "{cancels}"]
[commands.slow.parameters]
seconds = {{ type = "number", min = 0, default = 0 }}
"#,
                fixture = repo_path("tests/fixtures/cancellable_adaptor.py"),
                starts = starts.display(),
                cancels = cancels.display(),
            ),
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[]).await;
    let upload = json!([{"name": "s3_upload",
                         "config": {"bucket": "results", "key": "out/${message_id}.${mime_ext}"}}]);
    let first = farm
        .submit(json!({"command": "slow", "parameters": {"seconds": 60}, "tasks": upload}))
        .await;
    // The adaptor's progress: it has the run (a cancel during its start
    // would stop the start instead).
    let started = farm
        .wait_for_events(|e| e["type"] == "JobProgress", 1, LONG)
        .await;
    let job_id = started[0]["job_id"].as_str().unwrap().to_owned();
    let asked = Utc::now();
    let (code, out, err) = farm.cli(&["cancel", &job_id]);
    assert_eq!(code, 0, "{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["outcome"], "cancelled", "{answer}");
    let cancelled = farm
        .wait_for_events(|e| e["type"] == "JobCancelled", 1, LONG)
        .await;
    assert_eq!(cancelled[0]["message_id"], first.as_str());
    assert!(time(&cancelled[0]) - asked < chrono::Duration::from_std(stop_bound(backend)).unwrap());
    assert_eq!(
        std::fs::read_to_string(&cancels).unwrap().lines().count(),
        1
    );

    // The next job runs on the same adaptor process.
    let second = farm
        .submit(json!({"command": "slow", "tasks": upload}))
        .await;
    farm.wait_for_object(&format!("out/{second}.txt"), LONG)
        .await;
    assert_eq!(std::fs::read_to_string(&starts).unwrap().lines().count(), 1);
    let events = farm.events();
    assert!(
        !events.iter().any(|e| e["message_id"] == first.as_str()
            && matches!(
                e["type"].as_str(),
                Some("JobFailed" | "JobRequeued" | "JobDeadLettered" | "JobSucceeded")
            )),
        "the cancelled job ended only once: {events:?}"
    );
    assert_eq!(uploaded(&farm, "out/").await, 1);
    assert_eq!(farm.stats(), (0, 0, 0));
}

async fn cancel_answers_what_it_did(backend: Backend) {
    let farm = Farm::new(
        backend,
        Settings {
            visibility_timeout: visibility(backend),
            extra_toml: crate::harness::AUDIT_AND_ASSETS.into(),
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[]).await;
    let cancel = |id: &str| farm.rpc("queue_manager_cancel_job", json!({"job_id": id}));

    // Not an id.
    let reply = cancel("frame-7").await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    assert_eq!(reply["error"]["data"]["field"], "job_id", "{reply}");
    let reply = farm
        .rpc(
            "queue_manager_cancel_job",
            json!({"job_id": uuid::Uuid::new_v4().to_string(), "queue_name": "nope"}),
        )
        .await;
    assert_eq!(reply["error"]["data"]["field"], "queue_name", "{reply}");

    // Unknown: recorded; the embedded queue can say nothing of it was there.
    let unknown = uuid::Uuid::new_v4().to_string();
    let reply = cancel(&unknown).await;
    assert_eq!(reply["result"]["outcome"], "cancelled", "{reply}");
    match backend {
        Backend::Local => {
            assert_eq!(reply["result"]["cancelled"], 0, "{reply}");
            assert_eq!(reply["result"]["skipped_queued"], 0, "{reply}");
        }
        Backend::Sqs => assert!(reply["result"]["skipped_queued"].is_null(), "{reply}"),
    }
    // Twice.
    let reply = cancel(&unknown).await;
    assert_eq!(reply["result"]["outcome"], "already_cancelled", "{reply}");

    // After completion.
    let message_id = farm.submit(json!({"command": "get_version"})).await;
    let done = farm
        .wait_for_events(|e| e["type"] == "JobSucceeded", 1, LONG)
        .await;
    assert_eq!(done[0]["message_id"], message_id.as_str());
    let job_id = done[0]["job_id"].as_str().unwrap();
    let deadline = Instant::now() + LONG;
    while !farm.cli(&["status", job_id]).1.contains("state=succeeded") {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = cancel(job_id).await;
    assert_eq!(reply["result"]["outcome"], "already_finished", "{reply}");
    let (code, out, _) = farm.cli(&["cancel", job_id]);
    assert_eq!(code, 0);
    assert!(out.contains("\"already_finished\""), "{out}");
    let (code, _, err) = farm.cli(&["cancel", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("job_id"), "{err}");
}

const LONG: Duration = Duration::from_secs(60);

/// Slots per worker in the cancel tests.
const SLOTS: u64 = 1;

async fn redrive_one_array_puts_back_exactly_its_dead_letters(backend: Backend) {
    let farm = Farm::new(
        backend,
        Settings {
            max_receive_count: 2,
            extra_allowed: vec!["flaky"],
            extra_toml: r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"

[commands.flaky]
kind = "process"
program = "python3"
args = ["-c", "import os, sys; sys.exit(1 if os.path.exists('{config_dir}/broken') else 0)"]
"#
            .into(),
            ..Settings::default()
        },
    )
    .await;
    let broken = farm.dir.path().join("broken");
    std::fs::write(&broken, b"").unwrap();
    let _serve = farm.serve(&[]).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "flaky", "frames": "1-4"}),
        )
        .await;
    let array = reply["result"]["job_id"].as_str().unwrap().to_owned();
    let other = farm.submit(json!({"command": "flaky"})).await;
    farm.wait_for_events(|e| e["type"] == "JobDeadLettered", 5, LONG)
        .await;
    let completed = farm
        .wait_for_events(|e| e["type"] == "ArrayJobCompleted", 1, LONG)
        .await;
    assert_eq!(completed[0]["detail"]["dead_lettered"], 4);

    // Bad ids are refused.
    let (code, _, err) = farm.cli(&["dlq", "redrive", "--job", "not-a-uuid"]);
    assert_ne!(code, 0);
    assert!(err.contains("is not a message or job id"), "{err}");
    let reply = farm
        .rpc("queue_manager_redrive", json!({"job_id": "x"}))
        .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    assert_eq!(reply["error"]["data"]["field"], "job_id", "{reply}");

    // The array's four come back, the other job stays.
    std::fs::remove_file(&broken).unwrap();
    let (code, out, err) = farm.cli(&["dlq", "redrive", "--job", &array]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("redrove 4"), "{out}");
    let deadline = Instant::now() + LONG;
    loop {
        let (_, status, _) = farm.cli(&["status", &array]);
        if status.contains("succeeded=4") {
            assert!(status.contains("dead_lettered=0"), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listing = farm.cli(&["dlq", "list"]).1;
    assert_eq!(listing.lines().count(), 1, "{listing}");
    assert!(listing.starts_with(&other), "{listing}");

    // One job, over JSON-RPC: by its id (a plain job's is its message id's
    // envelope's job_id, given in JobSubmitted).
    let job_id = farm
        .events()
        .into_iter()
        .find(|e| e["type"] == "JobDeadLettered" && e["message_id"] == other.as_str())
        .unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let reply = farm
        .rpc("queue_manager_redrive", json!({"job_id": job_id}))
        .await;
    assert_eq!(reply["result"]["redriven"], 1, "{reply}");
    farm.wait_for_events(
        |e| e["type"] == "JobSucceeded" && e["message_id"] == other.as_str(),
        1,
        LONG,
    )
    .await;
    // Still exactly one ArrayJobCompleted: a redrive does not announce the
    // array again; the status table counts the late successes.
    let completions = farm
        .events()
        .iter()
        .filter(|e| e["type"] == "ArrayJobCompleted")
        .count();
    assert_eq!(completions, 1);
}

/// A farm whose worker listens to `urgent` before `renders`, with `slots`.
async fn two_queue_farm(backend: Backend, slots: usize) -> Farm {
    let urgent = match backend {
        Backend::Local => "backend = \"local\"\npath = \"urgent\"".to_owned(),
        Backend::Sqs => {
            let endpoint = crate::harness::Moto::shared().endpoint();
            let name = format!(
                "urgent-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            );
            let aws = crate::harness::Aws::create_named(&endpoint, &name, 3).await;
            format!(
                "backend = \"sqs\"\nurl = \"{}\"\nendpoint_url = \"{endpoint}\"\nregion = \"us-east-1\"",
                aws.queue_url
            )
        }
    };
    Farm::new(
        backend,
        Settings {
            worker_toml: format!("slots = {slots}\nlisten_queues = [\"urgent\", \"renders\"]\n"),
            extra_toml: format!(
                "{}\n[queues.urgent]\n{urgent}\n",
                crate::harness::AUDIT_AND_ASSETS
            ),
            ..Settings::default()
        },
    )
    .await
}

async fn an_urgent_job_takes_the_next_free_slot(backend: Backend) {
    let farm = two_queue_farm(backend, 1).await;
    let _serve = farm.serve(&[]).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "sleep", "parameters": {"seconds": 0.3}, "frames": "1-200"}),
        )
        .await;
    assert!(reply["result"]["job_id"].is_string(), "{reply}");
    farm.wait_for_events(|e| e["type"] == "JobStarted", 3, LONG)
        .await;

    let urgent = farm
        .submit(
            json!({"command": "sleep", "parameters": {"seconds": 0.01}, "queue_name": "urgent"}),
        )
        .await;
    // A renders job received just before the submit may still announce
    // its start a moment after it.
    let submitted = Utc::now() + chrono::Duration::milliseconds(100);
    let started = farm
        .wait_for_events(
            |e| e["type"] == "JobStarted" && e["message_id"] == urgent.as_str(),
            1,
            LONG,
        )
        .await;
    let urgent_started = time(&started[0]);
    assert_eq!(started[0]["queue"], "urgent");
    let jumped: Vec<Value> = farm
        .events()
        .into_iter()
        .filter(|e| {
            e["type"] == "JobStarted"
                && e["queue"] == "renders"
                && time(e) > submitted
                && time(e) < urgent_started
        })
        .collect();
    assert!(jumped.is_empty(), "renders jobs started first: {jumped:?}");
    assert!(
        urgent_started - submitted < chrono::Duration::seconds(2),
        "the urgent job waited {:?}",
        urgent_started - submitted
    );
    // The renders backlog goes on afterwards.
    let after = farm
        .wait_for_events(
            |e| e["type"] == "JobStarted" && e["queue"] == "renders" && time(e) > urgent_started,
            1,
            LONG,
        )
        .await;
    assert_eq!(after.len(), 1);
}
