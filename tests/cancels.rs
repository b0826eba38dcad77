//! Cancels that must be exact: after a prune emptied the ledger's cancel
//! table, by an id spelt in upper case, and by the message id a submit
//! returned; and ids that are no ids, refused with nothing changed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::harness::{Backend, Farm, Settings, repo_path};

scenarios!(an_id_in_upper_case_cancels_a_running_job);

const LONG: Duration = Duration::from_secs(60);

/// How long after a cancel a running job may still run (SPEC §10): 2 s on
/// the embedded queue; on SQS one heartbeat (a third of the 3 s
/// visibility), and the slot's kill and settle.
fn stop_bound(backend: Backend) -> Duration {
    match backend {
        Backend::Local => Duration::from_secs(2),
        Backend::Sqs => Duration::from_millis(2500),
    }
}

/// A farm with a `frame` command that runs `seconds` (a process tree, its
/// pids written under `pids`), an audit file of events, and `more` TOML.
async fn farm(backend: Backend, pids: &std::path::Path, more: &str, manager: &str) -> Farm {
    Farm::new(
        backend,
        Settings {
            visibility_timeout: match backend {
                Backend::Local => "30s",
                Backend::Sqs => "3s",
            },
            extra_allowed: vec!["frame"],
            queue_manager_toml: manager.into(),
            extra_toml: format!(
                r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"

[commands.frame]
kind = "process"
program = "python3"
args = ["{fixture}", "{{frame}}", "{pids}", "{{seconds}}", "{{workdir}}/frame_{{frame}}.txt"]
output = "{{workdir}}/frame_{{frame}}.txt"
[commands.frame.parameters]
frame = {{ type = "integer", min = 0, default = 1 }}
seconds = {{ type = "integer", min = 0, default = 60 }}
{more}"#,
                fixture = repo_path("tests/fixtures/cancel_frame.py"),
                pids = pids.display(),
            ),
            ..Settings::default()
        },
    )
    .await
}

fn time(event: &Value) -> DateTime<Utc> {
    event["time"].as_str().unwrap().parse().unwrap()
}

/// Submits a long `frame` job, waits for it to start, cancels it by
/// `spell(job id)`, and checks that it stopped within the bound: one
/// `JobCancelled`, no retry, nothing left queued.
async fn cancel_while_running(farm: &Farm, backend: Backend, spell: impl Fn(&str) -> String) {
    let message_id = farm.submit(json!({"command": "frame"})).await;
    let started = farm
        .wait_for_events(
            |e| e["type"] == "JobStarted" && e["message_id"] == message_id.as_str(),
            1,
            LONG,
        )
        .await;
    let job_id = started[0]["job_id"].as_str().unwrap();
    let asked = Utc::now();
    let reply = farm
        .rpc("queue_manager_cancel_job", json!({"job_id": spell(job_id)}))
        .await;
    let report = &reply["result"];
    assert_eq!(report["outcome"], "cancelled", "{reply}");
    assert_eq!(report["job_id"], job_id, "recorded in its one spelling");
    let cancelled = farm
        .wait_for_events(
            |e| e["type"] == "JobCancelled" && e["message_id"] == message_id.as_str(),
            1,
            LONG,
        )
        .await;
    let took = (time(&cancelled[0]) - asked).to_std().unwrap_or_default();
    assert!(took < stop_bound(backend), "stopped after {took:?}");
    let events = farm.events();
    assert!(
        !events.iter().any(|e| e["message_id"] == message_id.as_str()
            && matches!(
                e["type"].as_str(),
                Some("JobFailed" | "JobSucceeded" | "JobDeadLettered")
            )),
        "{events:?}"
    );
    let deadline = std::time::Instant::now() + LONG;
    while farm.stats() != (0, 0, 0) {
        assert!(std::time::Instant::now() < deadline, "{:?}", farm.stats());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn an_id_in_upper_case_cancels_a_running_job(backend: Backend) {
    let pids = tempfile::tempdir().unwrap();
    let farm = farm(backend, pids.path(), "", "").await;
    let _serve = farm.serve(&[]).await;
    cancel_while_running(&farm, backend, |id| id.to_uppercase()).await;

    // Ids that are no ids are refused, naming the field, and change nothing.
    let reply = farm
        .rpc("queue_manager_cancel_job", json!({"job_id": "FRAME-7"}))
        .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    assert_eq!(reply["error"]["data"]["field"], "job_id", "{reply}");
    let reason = reply["error"]["data"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("`FRAME-7` is not a message or job id (a UUID)"),
        "{reason}"
    );
    let reply = farm
        .rpc("queue_manager_job_status", json!({"job_id": "x y"}))
        .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    let (code, _, err) = farm.cli(&["status", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("`nope` is not a message or job id"), "{err}");
    let (code, _, err) = farm.cli(&["dlq", "redrive", "--message", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("--message"), "{err}");
    let cancels = farm
        .events()
        .iter()
        .filter(|e| e["type"] == "JobCancelled")
        .count();
    assert_eq!(cancels, 1);
    // Upper case reads the status table too.
    let job_id = farm
        .events()
        .into_iter()
        .find(|e| e["type"] == "JobCancelled")
        .unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_uppercase();
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let (code, out, err) = farm.cli(&["status", &job_id]);
        if code == 0 && out.contains("state=cancelled") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out}{err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The embedded ledger numbers its cancels; a prune that empties the table
/// must not make a worker that has read up to row N miss the rows after.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_after_a_prune_emptied_the_cancel_table_stops_a_running_job() {
    let pids = tempfile::tempdir().unwrap();
    let farm = farm(Backend::Local, pids.path(), "", "retention = \"1s\"").await;
    let _serve = farm.serve(&[]).await;
    // Three cancels, and a job after them: its receive reads the ledger,
    // so the worker has read up to the third.
    for _ in 0..3 {
        let reply = farm
            .rpc(
                "queue_manager_cancel_job",
                json!({"job_id": uuid::Uuid::new_v4().to_string()}),
            )
            .await;
        assert_eq!(reply["result"]["outcome"], "cancelled", "{reply}");
    }
    let seen = farm.submit(json!({"command": "get_version"})).await;
    farm.wait_for_events(
        |e| e["type"] == "JobSucceeded" && e["message_id"] == seen.as_str(),
        1,
        LONG,
    )
    .await;
    // Older than the retention (rows are dated in whole seconds), then
    // pruned: the table is empty.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, out, err) = farm.cli(&["prune"]);
    assert_eq!(code, 0, "{err}");
    let pruned: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(pruned >= 3, "{out}");
    let ledger = rusqlite::Connection::open(farm.dir.path().join("queue/ledger.sqlite3")).unwrap();
    let left: i64 = ledger
        .query_row("SELECT COUNT(*) FROM cancelled", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0, "the prune emptied the cancel table");

    cancel_while_running(&farm, Backend::Local, str::to_owned).await;
}

/// On the embedded queue a cancel by the message id a submit returned
/// deletes that queued message at once, announces it, and counts it for
/// its array as a cancel by the array's id would.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_by_message_id_deletes_the_queued_message_and_counts_it() {
    let pids = tempfile::tempdir().unwrap();
    // A queue no worker listens to: what is sent there stays queued.
    let farm = farm(
        Backend::Local,
        pids.path(),
        "\n[queues.parked]\nbackend = \"local\"\npath = \"parked\"\n",
        "",
    )
    .await;
    let _serve = farm.serve(&[]).await;
    let parked = |mut job: Value| {
        job["queue_name"] = json!("parked");
        job
    };
    let plain = farm.submit(parked(json!({"command": "frame"}))).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            parked(json!({"command": "frame", "frames": "1-2"})),
        )
        .await;
    let array = reply["result"]["job_id"].as_str().unwrap().to_owned();
    let children: Vec<String> = reply["result"]["message_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    let visible = || {
        let (code, out, err) = farm.cli(&["queue", "stats", "--queue", "parked"]);
        assert_eq!(code, 0, "{err}");
        out
    };
    assert!(visible().contains("visible=3"), "{}", visible());

    // Bad input first: nothing changes.
    let reply = farm
        .rpc("queue_manager_cancel_job", json!({"job_id": "child-1"}))
        .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    assert!(visible().contains("visible=3"), "{}", visible());

    for (n, id) in [&plain, &children[0], &children[1]].into_iter().enumerate() {
        // The second by its id in upper case.
        let spelt = if n == 1 {
            id.to_uppercase()
        } else {
            id.clone()
        };
        let reply = farm
            .rpc("queue_manager_cancel_job", json!({"job_id": spelt}))
            .await;
        let result = &reply["result"];
        assert_eq!(result["outcome"], "cancelled", "{reply}");
        assert_eq!(result["skipped_queued"], 1, "{reply}");
        assert_eq!(result["cancelled"], 0, "{reply}");
        assert!(
            visible().contains(&format!("visible={}", 2 - n)),
            "{}",
            visible()
        );
        farm.wait_for_events(
            |e| e["type"] == "JobCancelled" && e["message_id"] == id.as_str(),
            1,
            LONG,
        )
        .await;
    }
    let completed = farm
        .wait_for_events(|e| e["type"] == "ArrayJobCompleted", 1, LONG)
        .await;
    assert_eq!(completed[0]["job_id"], array.as_str());
    assert_eq!(
        completed[0]["detail"],
        json!({"size": 2, "succeeded": 0, "dead_lettered": 0, "cancelled": 2})
    );
    // Nothing ran.
    assert!(!farm.events().iter().any(|e| e["type"] == "JobStarted"));
}
