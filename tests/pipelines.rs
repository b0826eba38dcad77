//! Dependencies and holds (SPEC §12): frames mapped through steps and
//! chunking (OpenCue #1448), a failed parent frame cancelling exactly its
//! dependants, each dependant released once by two workers and by the
//! sweep after a worker killed before its release, an array held by hand
//! and released, a dependant array held by hand while it waits for its
//! parents (their ends release none of it; its release sends each child
//! once), a hold of an unknown job refused naming `job_id` (these
//! on both backends: on SQS the held jobs are in the S3 ledger, and a
//! hold's queued messages are held at receive), and bad dependencies
//! refused naming the field.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::harness::{Backend, Farm, Settings, repo_path};

scenarios!(
    opencue_1448_no_child_starts_before_the_parent_frames_it_covers,
    a_failed_parent_frame_cancels_exactly_its_dependants_and_finish_runs_all,
    two_workers_settling_the_last_parent_frames_release_each_dependant_once,
    a_worker_killed_before_its_release_is_swept_once,
    a_held_dependant_cancelled_by_hand_is_never_released,
    an_array_held_after_5_of_20_frames_runs_none_until_released,
    a_dependant_array_held_by_hand_stays_held_when_its_parents_end,
    a_hold_of_an_unknown_job_is_refused_naming_job_id,
);

pub(crate) const LONG: Duration = Duration::from_secs(90);

/// A farm on the embedded queue with the `step` fixture (frames, frames
/// that fail, seconds), an events file, `slots` slots, and a sweep of held
/// jobs every second after a 2 s grace.
async fn farm(slots: usize, max_receive_count: u32) -> Farm {
    farm_on(Backend::Local, slots, max_receive_count).await
}

/// [`farm`] on `backend` (on SQS the held jobs are kept in the S3 ledger).
async fn farm_on(backend: Backend, slots: usize, max_receive_count: u32) -> Farm {
    Farm::new(backend, settings(slots, max_receive_count)).await
}

/// [`farm`]'s settings.
pub(crate) fn settings(slots: usize, max_receive_count: u32) -> Settings {
    Settings {
        max_receive_count,
        extra_allowed: vec!["step"],
        worker_toml: format!("slots = {slots}\ndead_letter_sweep = \"1s\""),
        queue_manager_toml: "release_grace = \"2s\"\nmax_dependencies = 3".into(),
        extra_toml: format!(
            r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"

[commands.step]
kind = "process"
program = "{fixture}"
args = ["{{frames}}", "{{fail}}", "{{seconds}}"]
[commands.step.parameters]
fail = {{ type = "string", default = "" }}
seconds = {{ type = "number", min = 0, default = 0 }}
"#,
            fixture = repo_path("tests/fixtures/pipeline_step.py"),
        ),
        ..Settings::default()
    }
}

/// Submits an array; its id.
pub(crate) async fn array(farm: &Farm, params: Value) -> String {
    let reply = farm.rpc("queue_manager_submit_job", params).await;
    reply["result"]["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"))
        .to_owned()
}

pub(crate) fn step(frames: &str, chunk: u32, fail: &str, seconds: f64, depends_on: Value) -> Value {
    json!({"command": "step", "frames": frames, "chunk_size": chunk,
           "parameters": {"fail": fail, "seconds": seconds}, "depends_on": depends_on})
}

pub(crate) fn time(event: &Value) -> DateTime<Utc> {
    event["time"].as_str().unwrap().parse().unwrap()
}

/// Events of `kind` of array `id`'s children, by child index.
pub(crate) fn by_child(events: &[Value], kind: &str, id: &str) -> HashMap<u64, Vec<Value>> {
    let mut found: HashMap<u64, Vec<Value>> = HashMap::new();
    for e in events
        .iter()
        .filter(|e| e["type"] == kind && e["array"]["job_id"] == id)
    {
        found
            .entry(e["array"]["index"].as_u64().unwrap())
            .or_default()
            .push(e.clone());
    }
    found
}

/// Each of the first `size` children of every array in `ids` was released
/// once and ran once.
pub(crate) fn released_and_ran_once(events: &[Value], ids: &[&str], size: u64) {
    for id in ids {
        let released = by_child(events, "JobReleased", id);
        let started = by_child(events, "JobStarted", id);
        for index in 0..size {
            assert_eq!(
                released[&index].len(),
                1,
                "{id} child {index} released once"
            );
            assert_eq!(started[&index].len(), 1, "{id} child {index} ran once");
        }
    }
}

pub(crate) async fn completed(farm: &Farm, id: &str) -> Value {
    let done = farm
        .wait_for_events(
            |e| e["type"] == "ArrayJobCompleted" && e["job_id"] == id,
            1,
            LONG,
        )
        .await;
    done[0]["detail"].clone()
}

async fn opencue_1448_no_child_starts_before_the_parent_frames_it_covers(backend: Backend) {
    let farm = farm_on(backend, 2, 3).await;
    let _serve = farm.serve(&[]).await;
    // 20 frames: parent children of 3, dependant children of 2.
    let parent = array(&farm, step("1001-1200x10", 3, "", 0.1, json!([]))).await;
    let child = array(
        &farm,
        step(
            "1001-1200x10",
            2,
            "",
            0.0,
            json!([{"job_id": parent, "frames": "same"}]),
        ),
    )
    .await;
    assert_eq!(completed(&farm, &child).await["succeeded"], 10);
    let events = farm.events();
    let parent_done = by_child(&events, "JobSucceeded", &parent);
    let child_started = by_child(&events, "JobStarted", &child);
    let frames: Vec<i64> = (1001..=1200).step_by(10).collect();
    let parent_chunks: Vec<&[i64]> = frames.chunks(3).collect();
    for (c, chunk) in frames.chunks(2).enumerate() {
        let started = time(&child_started[&(c as u64)][0]);
        for frame in chunk {
            let p = parent_chunks
                .iter()
                .position(|p| p.contains(frame))
                .unwrap();
            let done = time(&parent_done[&(p as u64)][0]);
            assert!(
                done <= started,
                "child {c} (frame {frame}) started at {started} before parent child {p} \
                 succeeded at {done}"
            );
        }
    }
    // Each dependant child was released once, naming its parent.
    let released = by_child(&events, "JobReleased", &child);
    assert_eq!(released.len(), 10);
    assert!(released.values().all(|r| r.len() == 1), "{released:?}");
    let by = released[&1][0]["detail"]["released_by"].as_str().unwrap();
    assert!(by.starts_with(&parent), "{by}");
}

async fn a_failed_parent_frame_cancels_exactly_its_dependants_and_finish_runs_all(
    backend: Backend,
) {
    let farm = farm_on(backend, 2, 2).await;
    let _serve = farm.serve(&[]).await;
    let parent = array(&farm, step("1-4", 1, "3", 0.0, json!([]))).await;
    let on_success = array(
        &farm,
        step(
            "1-4",
            1,
            "",
            0.0,
            json!([{"job_id": parent, "frames": "same"}]),
        ),
    )
    .await;
    let on_finish = array(
        &farm,
        step(
            "1-4",
            1,
            "",
            0.0,
            json!([{"job_id": parent, "frames": "same", "on": "finish"}]),
        ),
    )
    .await;
    let after_all = farm
        .submit(json!({"command": "step", "depends_on": [{"job_id": parent}]}))
        .await;
    assert_eq!(
        completed(&farm, &on_success).await,
        json!({"size": 4, "succeeded": 3, "dead_lettered": 0, "cancelled": 1})
    );
    assert_eq!(completed(&farm, &on_finish).await["succeeded"], 4);
    let events = farm.events();
    let cancelled = by_child(&events, "JobCancelled", &on_success);
    assert_eq!(cancelled.keys().collect::<Vec<_>>(), [&2], "frame 3 only");
    let reason = cancelled[&2][0]["detail"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&parent) && reason.contains("child 2") && reason.contains("dead-lettered"),
        "{reason}"
    );
    assert!(!by_child(&events, "JobStarted", &on_success).contains_key(&2));
    // The `all` dependant on success is cancelled too, with the reason.
    let whole = farm
        .wait_for_events(
            |e| e["type"] == "JobCancelled" && e["job_id"] == after_all.as_str(),
            1,
            LONG,
        )
        .await;
    assert!(
        whole[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains(&parent)
    );
    // The parent's own completion lists nothing new.
    assert_eq!(
        completed(&farm, &parent).await,
        json!({"size": 4, "succeeded": 3, "dead_lettered": 1, "cancelled": 0})
    );
}

async fn two_workers_settling_the_last_parent_frames_release_each_dependant_once(backend: Backend) {
    let farm = farm_on(backend, 1, 3).await;
    let _serve = farm.serve(&[]).await;
    let _worker = farm.spawn("worker", &[]);
    for _ in 0..3 {
        // Two parent children of the same length, one per worker.
        let parent = array(&farm, step("1-2", 1, "", 0.3, json!([]))).await;
        let same = array(
            &farm,
            step(
                "1-2",
                1,
                "",
                0.0,
                json!([{"job_id": parent, "frames": "same"}]),
            ),
        )
        .await;
        let all = array(
            &farm,
            step(
                "1-2",
                1,
                "",
                0.0,
                json!([{"job_id": parent, "frames": "all"}]),
            ),
        )
        .await;
        completed(&farm, &same).await;
        completed(&farm, &all).await;
        released_and_ran_once(&farm.events(), &[&same, &all], 2);
    }
}

async fn a_worker_killed_before_its_release_is_swept_once(backend: Backend) {
    let farm = farm_on(backend, 1, 3).await;
    let mut halting = farm
        .serve(&[("RENDERQ_TEST_HALT_BEFORE_RELEASE", "1")])
        .await;
    let parent = farm.submit(json!({"command": "step"})).await;
    let child = farm
        .submit(json!({"command": "step", "depends_on": [{"job_id": parent}]}))
        .await;
    halting.wait_for_log("halting before the release", LONG);
    halting.signal(Signal::SIGKILL);
    halting.wait_exit(LONG);
    let events = farm.events();
    assert!(
        !events
            .iter()
            .any(|e| e["type"] == "JobReleased" && e["job_id"] == child.as_str()),
        "released before the kill"
    );
    let _worker = farm.spawn("worker", &[]);
    farm.wait_for_events(
        |e| e["type"] == "JobSucceeded" && e["job_id"] == child.as_str(),
        1,
        LONG,
    )
    .await;
    // A few more sweeps pass: still once.
    let settled = Instant::now();
    while settled.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = farm.events();
    let count = |kind: &str| {
        events
            .iter()
            .filter(|e| e["type"] == kind && e["job_id"] == child.as_str())
            .count()
    };
    assert_eq!(count("JobReleased"), 1);
    assert_eq!(count("JobStarted"), 1);
    assert_eq!(count("JobSucceeded"), 1);
}

async fn an_array_held_after_5_of_20_frames_runs_none_until_released(backend: Backend) {
    let farm = farm_on(backend, 1, 3).await;
    let _serve = farm.serve(&[]).await;
    let id = array(&farm, step("1-20", 1, "", 0.2, json!([]))).await;
    farm.wait_for_events(
        |e| e["type"] == "JobSucceeded" && e["array"]["job_id"] == id.as_str(),
        5,
        LONG,
    )
    .await;
    let reply = farm.rpc("queue_manager_hold", json!({"job_id": id})).await;
    let held_at = Utc::now();
    assert_eq!(reply["result"]["outcome"], "held", "{reply}");
    let moved = reply["result"]["moved"].as_u64().unwrap();
    match backend {
        // Moved from the queue into the ledger at once.
        Backend::Local => assert!(moved >= 10, "{reply}"),
        // SQS cannot take them out by id: held at receive (the hold
        // answered once every worker's receive sees it).
        Backend::Sqs => assert_eq!(moved, 0, "{reply}"),
    }
    // While held: the one running ends, and nothing starts.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, status, _) = farm.cli(&["status", &id]);
    assert_eq!(code, 0);
    assert!(status.contains("completed=false"), "{status}");
    let released_at = Utc::now();
    let (code, out, err) = farm.cli(&["release", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"released\""), "{out}");
    assert_eq!(
        completed(&farm, &id).await,
        json!({"size": 20, "succeeded": 20, "dead_lettered": 0, "cancelled": 0})
    );
    let events = farm.events();
    let started_while_held: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "JobStarted" && e["array"]["job_id"] == id.as_str())
        .filter(|e| {
            // Received before the hold was recorded: it runs (a receive is
            // checked within milliseconds of it).
            let at = time(e);
            at > held_at + chrono::Duration::milliseconds(50) && at < released_at
        })
        .collect();
    assert!(started_while_held.is_empty(), "{started_while_held:?}");
    let succeeded = by_child(&events, "JobSucceeded", &id);
    assert_eq!(succeeded.len(), 20);
    assert!(succeeded.values().all(|s| s.len() == 1));
    assert_eq!(
        events
            .iter()
            .filter(|e| e["type"] == "ArrayJobCompleted" && e["job_id"] == id.as_str())
            .count(),
        1
    );
}

/// A dependant array already held for its parents, held by hand too: its
/// parents' ends release none of it (past the sweep's grace), `renderq
/// status` shows it held, and its release sends each child once.
async fn a_dependant_array_held_by_hand_stays_held_when_its_parents_end(backend: Backend) {
    let farm = farm_on(backend, 2, 3).await;
    let _serve = farm.serve(&[]).await;
    // Long enough for the hold to land before the first parent frame ends.
    let parent = array(&farm, step("1-4", 1, "", 4.0, json!([]))).await;
    let same = json!([{"job_id": parent, "frames": "same"}]);
    let dependant = array(&farm, step("1-4", 1, "", 0.0, same)).await;
    let held = farm
        .wait_for_events(
            |e| e["type"] == "JobHeld" && e["array"]["job_id"] == dependant.as_str(),
            4,
            LONG,
        )
        .await;
    let reply = farm
        .rpc("queue_manager_hold", json!({"job_id": dependant}))
        .await;
    assert_eq!(reply["result"]["outcome"], "held", "{reply}");
    let parent_done = completed(&farm, &parent).await;
    assert_eq!(parent_done["succeeded"], 4, "{parent_done}");
    // Past the last settle's release, a sweep and its grace (2 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ran = |events: &[Value], kind: &str| by_child(events, kind, &dependant);
    let events = farm.events();
    assert!(
        ran(&events, "JobReleased").is_empty(),
        "released while held"
    );
    assert!(ran(&events, "JobStarted").is_empty(), "started while held");
    let (code, status, err) = farm.cli(&["status", &dependant]);
    assert_eq!(code, 0, "{err}");
    assert!(
        status.contains("succeeded=0") && status.contains("completed=false"),
        "{status}"
    );
    for child in &held {
        let child = child["job_id"].as_str().unwrap();
        let (code, status, err) = farm.cli(&["status", child]);
        assert_eq!(code, 0, "{err}");
        assert!(status.contains("state=held"), "{status}");
    }
    let (code, out, err) = farm.cli(&["release", &dependant]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"released\""), "{out}");
    assert_eq!(
        completed(&farm, &dependant).await,
        json!({"size": 4, "succeeded": 4, "dead_lettered": 0, "cancelled": 0})
    );
    let events = farm.events();
    let (released, started) = (ran(&events, "JobReleased"), ran(&events, "JobStarted"));
    for index in 0..4 {
        assert_eq!(released[&index].len(), 1, "child {index} released once");
        assert_eq!(released[&index][0]["detail"]["released_by"], "hand");
        assert_eq!(started[&index].len(), 1, "child {index} ran once");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_dependencies_are_refused_naming_the_field_and_a_held_job_says_what_it_waits_for() {
    let farm = farm(1, 3).await;
    let _serve = farm.serve(&[]).await;
    let refused = |reply: &Value, field: &str, words: &[&str]| {
        assert_eq!(reply["error"]["code"], -32602, "{reply}");
        assert_eq!(reply["error"]["data"]["field"], field, "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        for word in words {
            assert!(message.contains(word), "{word}: {message}");
        }
    };
    let unknown = "6f1c1b9e-5b53-4d0e-9a4e-1f4a9c1d2e3f";
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "step", "depends_on": [{"job_id": unknown}]}),
        )
        .await;
    refused(&reply, "depends_on[0].job_id", &[unknown, "no job"]);

    // A long parent, so that what follows is held.
    let parent = array(&farm, step("1-10x2", 1, "", 30.0, json!([]))).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            step(
                "1-4",
                2,
                "",
                0.0,
                json!([{"job_id": parent, "frames": "same"}]),
            ),
        )
        .await;
    refused(&reply, "depends_on[0].frames", &["frame 2", &parent]);

    let twice = json!([{"job_id": parent}, {"job_id": parent.to_uppercase()}]);
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "step", "depends_on": twice}),
        )
        .await;
    refused(&reply, "depends_on[1].job_id", &["named twice"]);

    let many =
        json!([{"job_id": parent}, {"job_id": parent}, {"job_id": parent}, {"job_id": parent}]);
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "step", "depends_on": many}),
        )
        .await;
    refused(&reply, "depends_on", &["max_dependencies"]);

    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "step", "depends_on": [{"job_id": parent, "frames": "same"}]}),
        )
        .await;
    refused(&reply, "depends_on[0].frames", &["same"]);

    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "step", "depends_on": [{"job_id": parent, "on": "sometimes"}]}),
        )
        .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");

    // A held job: `renderq status` says so, and what it waits for.
    let (code, out, err) = farm.cli(&[
        "submit",
        "step",
        "--url",
        &farm.url(),
        "--after",
        &format!("{parent}:finish"),
    ]);
    assert_eq!(code, 0, "{err}");
    let held = out.trim().to_owned();
    farm.wait_for_events(
        |e| e["type"] == "JobHeld" && e["job_id"] == held.as_str(),
        1,
        LONG,
    )
    .await;
    let status = held_status(&farm, &held).await;
    assert!(
        status.contains(&format!("waits_for\tparent={parent}")),
        "{status}"
    );
    // Cancelling the parent releases an `on: finish` dependant.
    cancel(&farm, &parent).await;
    wait_for(&farm, "JobSucceeded", &held).await;
}

/// Waits for an event of `kind` of job `id`.
/// `renderq status ID` once it shows the job held.
async fn held_status(farm: &Farm, id: &str) -> String {
    let deadline = Instant::now() + LONG;
    loop {
        let (_, status, _) = farm.cli(&["status", id]);
        if status.contains("state=held") {
            return status;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for(farm: &Farm, kind: &str, id: &str) {
    farm.wait_for_events(|e| e["type"] == kind && e["job_id"] == id, 1, LONG)
        .await;
}

/// Cancels job `id` by hand, which must answer `cancelled`.
async fn cancel(farm: &Farm, id: &str) {
    let reply = farm
        .rpc("queue_manager_cancel_job", json!({"job_id": id}))
        .await;
    assert_eq!(reply["result"]["outcome"], "cancelled", "{reply}");
}

async fn a_held_dependant_cancelled_by_hand_is_never_released(backend: Backend) {
    let farm = farm_on(backend, 2, 3).await;
    let _serve = farm.serve(&[]).await;
    let parent = farm
        .submit(json!({"command": "step", "parameters": {"seconds": 2}}))
        .await;
    let cancelled = farm
        .submit(json!({"command": "step", "depends_on": [{"job_id": parent}]}))
        .await;
    let witness = farm
        .submit(json!({"command": "step", "depends_on": [{"job_id": parent}]}))
        .await;
    wait_for(&farm, "JobHeld", &cancelled).await;
    // `renderq status` says what it waits for (on SQS from the S3 ledger).
    let status = held_status(&farm, &cancelled).await;
    assert!(
        status.contains(&format!("waits_for\tparent={parent}\tthe whole job")),
        "{status}"
    );
    // So does its page in the monitor (once the status table has it),
    // linking to the parent.
    let deadline = Instant::now() + LONG;
    let page = loop {
        let page = reqwest::get(format!("{}ui/jobs/{cancelled}", farm.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if page.contains("Waits for") {
            break page;
        }
        assert!(Instant::now() < deadline, "{page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let waits = page.split("Waits for").nth(1).unwrap();
    assert!(
        waits.contains(&format!("href=\"/ui/jobs/{parent}\"")) && waits.contains("the whole job"),
        "{page}"
    );
    cancel(&farm, &cancelled).await;
    wait_for(&farm, "JobCancelled", &cancelled).await;
    // The witness waits for the same parent: released by the same end.
    wait_for(&farm, "JobSucceeded", &witness).await;
    let events = farm.events();
    assert!(
        !events.iter().any(|e| e["job_id"] == cancelled.as_str()
            && (e["type"] == "JobReleased" || e["type"] == "JobStarted")),
        "a cancelled held job was released or run"
    );
}

async fn a_hold_of_an_unknown_job_is_refused_naming_job_id(backend: Backend) {
    let farm = farm_on(backend, 1, 3).await;
    let _serve = farm.serve(&[]).await;
    let unknown = "6f1c1b9e-5b53-4d0e-9a4e-1f4a9c1d2e3f";
    let reply = farm
        .rpc("queue_manager_hold", json!({"job_id": unknown}))
        .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    assert_eq!(reply["error"]["data"]["field"], "job_id", "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains(unknown),
        "{reply}"
    );
    // A known job is held, and the same hold again says so.
    let job = farm.submit(json!({"command": "get_version"})).await;
    let reply = farm.rpc("queue_manager_hold", json!({"job_id": job})).await;
    assert_eq!(reply["result"]["outcome"], "held", "{reply}");
    let reply = farm.rpc("queue_manager_hold", json!({"job_id": job})).await;
    assert_eq!(reply["result"]["outcome"], "already_held", "{reply}");
    let reply = farm
        .rpc("queue_manager_release", json!({"job_id": unknown}))
        .await;
    assert_eq!(reply["result"]["outcome"], "not_held", "{reply}");
}
