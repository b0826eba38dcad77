//! Job control: putting back one job's, or one array's, dead letters.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Backend, Farm, Settings};

scenarios!(redrive_one_array_puts_back_exactly_its_dead_letters);

const LONG: Duration = Duration::from_secs(60);

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
