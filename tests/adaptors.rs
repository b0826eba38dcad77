//! The adaptor protocol's run ids, with real adaptor processes that are out
//! of step with the worker: each is killed and never reused, and the next
//! job gets its own result.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::commands::starts;
use crate::harness::{Farm, Proc, Settings, alive, repo_path};

const LONG: Duration = Duration::from_secs(60);

/// A one-slot farm whose `wrong` command is `out_of_turn_adaptor.py MODE`,
/// with the adaptor's starts recorded in `starts_file`.
async fn farm(mode: &str, starts_file: &Path) -> Farm {
    Farm::new(
        crate::harness::Backend::Local,
        Settings {
            worker_toml: "slots = 1".into(),
            extra_allowed: vec!["wrong"],
            extra_toml: format!(
                r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"

[commands.wrong]
kind = "adaptor"
program = "{fixture}"
args = ["{mode}", "{starts}"]
[commands.wrong.parameters]
tag = {{ type = "string", required = true }}
seconds = {{ type = "number", min = 0, default = 0 }}
"#,
                fixture = repo_path("tests/fixtures/out_of_turn_adaptor.py"),
                starts = starts_file.display(),
            ),
            ..Settings::default()
        },
    )
    .await
}

/// Submits a `wrong` job; returns its message id.
async fn submit(farm: &Farm, tag: &str, seconds: u64) -> String {
    farm.submit(json!({"command": "wrong", "parameters": {"tag": tag, "seconds": seconds},
                       "tasks": [{"name": "s3_upload",
                                  "config": {"bucket": "results", "key": "out/${message_id}.${mime_ext}"}}]}))
        .await
}

/// The JSON result a job uploaded, once the job has ended (its event is
/// published after the upload).
async fn result(farm: &Farm, message_id: &str) -> Value {
    farm.wait_for_events(
        |e| e["type"] == "JobSucceeded" && e["message_id"] == message_id,
        1,
        LONG,
    )
    .await;
    let (bytes, _) = farm
        .wait_for_object(&format!("out/{message_id}.json"), LONG)
        .await;
    serde_json::from_slice(&bytes).expect("a JSON result")
}

/// What happened to one job, in order: its start and end events.
fn events_of(farm: &Farm, message_id: &str) -> Vec<String> {
    farm.events()
        .iter()
        .filter(|e| e["message_id"] == message_id)
        .filter_map(|e| e["type"].as_str())
        .filter(|t| t.starts_with("Job") && !matches!(*t, "JobSubmitted" | "JobProgress"))
        .map(str::to_owned)
        .collect()
}

/// The process that broke the protocol is dead, the next job's result came
/// from a second process, and the log's warning names the adaptor and the
/// run the stale answer belonged to.
fn assert_replaced(serve: &Proc, starts_file: &Path, result: &Value, tag: &str, stale: &str) {
    let pids = starts(starts_file);
    assert_eq!(
        pids.len(),
        2,
        "one fresh process after the broken one: {pids:?}"
    );
    assert_eq!(*result, json!({"tag": tag, "pid": pids[1]}));
    assert!(
        !alive(pids[0]),
        "the process that answered out of turn was killed"
    );
    let log = serve.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("adaptor answered for another run"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(
        warning.contains("WARN") && warning.contains("adaptor=wrong") && warning.contains(stale),
        "{warning}"
    );
    println!("{warning}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adaptor_that_answers_a_cancel_twice_is_killed_and_the_next_job_gets_its_own_result() {
    let files = tempfile::tempdir().unwrap();
    let starts_file = files.path().join("starts");
    let farm = farm("cancel-twice", &starts_file).await;
    let serve = farm.serve(&[]).await;

    let first = submit(&farm, "A", 60).await;
    // The adaptor's progress: it has the run.
    let running = farm
        .wait_for_events(|e| e["type"] == "JobProgress", 1, LONG)
        .await;
    let job_id = running[0]["job_id"].as_str().unwrap();
    let (code, _, err) = farm.cli(&["cancel", job_id]);
    assert_eq!(code, 0, "{err}");
    farm.wait_for_events(|e| e["type"] == "JobCancelled", 1, LONG)
        .await;

    // The second `fail` for run-1 is caught when the idle process is taken
    // for this job, or else as this job's answer: either way this job's
    // result is its own, from a fresh process.
    let second = submit(&farm, "B", 0).await;
    let result = result(&farm, &second).await;
    assert_replaced(&serve, &starts_file, &result, "B", "stale=run-1");
    assert_eq!(
        events_of(&farm, &first),
        ["JobStarted", "JobCancelled"],
        "the cancelled job ended once"
    );
    // Caught at the handover, the job never saw the broken process;
    // caught as its answer, it was handed back once.
    let second_events = events_of(&farm, &second);
    assert!(
        second_events == ["JobStarted", "JobSucceeded"]
            || second_events == ["JobStarted", "JobRequeued", "JobStarted", "JobSucceeded"],
        "{second_events:?}"
    );
    assert_eq!(farm.wait_until_drained(LONG).await, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adaptor_that_answers_with_a_stale_run_id_is_killed_and_the_job_runs_again_unharmed() {
    let files = tempfile::tempdir().unwrap();
    let starts_file = files.path().join("starts");
    let farm = farm("stale-id", &starts_file).await;
    let serve = farm.serve(&[]).await;

    let first = submit(&farm, "A", 0).await;
    let first_result = result(&farm, &first).await;
    assert_eq!(first_result["tag"], "A");

    // The process answers run-2 with run-1's id: it is killed, and the job
    // is handed back without using a try and runs on a fresh process.
    let second = submit(&farm, "B", 0).await;
    let result = result(&farm, &second).await;
    assert_replaced(&serve, &starts_file, &result, "B", "stale=run-1");
    assert_eq!(first_result["pid"], starts(&starts_file)[0]);

    let events = farm.events();
    let requeued: Vec<&Value> = events
        .iter()
        .filter(|e| e["message_id"] == second.as_str() && e["type"] == "JobRequeued")
        .collect();
    assert_eq!(requeued.len(), 1, "{events:?}");
    let reason = requeued[0]["detail"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("adaptor `wrong` answered for run-1 while running run-2"),
        "{reason}"
    );
    assert_eq!(
        events_of(&farm, &second),
        ["JobStarted", "JobRequeued", "JobStarted", "JobSucceeded"]
    );
    let succeeded = events
        .iter()
        .find(|e| e["message_id"] == second.as_str() && e["type"] == "JobSucceeded")
        .unwrap();
    assert_eq!(
        succeeded["attempt"], 1,
        "the hand-back used no try: {succeeded}"
    );
    assert_eq!(farm.wait_until_drained(LONG).await, (0, 0, 0));
}
