//! Dependencies across queues (issue 27): a dependant array on queue
//! `comps` waiting `frames: same` for a parent array on queue `renders`,
//! two queues of one config and one backend (two embedded queues, or two
//! SQS queues on moto with their S3 ledgers). Released frame by frame by the
//! worker that settled the parent frame when it opens both queues, and by
//! the dependant queue's sweep when it does not; a failed parent frame
//! cancels exactly its dependants; two workers settling the last parent
//! frames release each dependant once, and so does the sweep after a
//! worker killed between its settle and the release; a parent on a queue
//! the endpoint does not serve is refused naming `depends_on[0].job_id`,
//! and so is one on a queue of the other backend.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::harness::{Aws, Backend, Farm, Moto, free_port};
use crate::pipelines::{
    LONG, array, by_child, completed, released_and_ran_once, settings, step, time,
};

scenarios!(
    a_dependant_on_another_queue_runs_frame_by_frame_and_a_failed_frame_cancels_its_own,
    a_parent_whose_worker_cannot_reach_the_dependants_queue_is_swept_and_an_unserved_one_refused,
    two_workers_settling_the_last_parent_frames_release_each_dependant_on_another_queue_once,
    a_worker_killed_before_releasing_on_another_queue_is_swept_once,
);

/// Both queues, listened to by every process.
const BOTH: &str = r#"["renders", "comps"]"#;

/// The second queue's section of the config (cut from a variant), of
/// `backend` (on SQS a fresh queue, its ledger in the farm's bucket).
async fn comps(backend: Backend, max_receive_count: u32) -> String {
    match backend {
        Backend::Local => "\n[queues.comps]\nbackend = \"local\"\npath = \"comps\"\n".into(),
        Backend::Sqs => {
            let endpoint = Moto::shared().endpoint();
            let aws = Aws::create(&endpoint, max_receive_count).await;
            format!(
                "\n[queues.comps]\nbackend = \"sqs\"\nurl = \"{}\"\nendpoint_url = \"{endpoint}\"\n\
                 region = \"us-east-1\"\nstatus_bucket = \"results\"\n",
                aws.queue_url
            )
        }
    }
}

/// A farm on `backend` with queues `renders` (the default) and `comps`
/// (`comps`: its section), its process listening on `listen`.
async fn farm(backend: Backend, comps: &str, listen: &str, max_receive_count: u32) -> Farm {
    let mut settings = settings(2, max_receive_count);
    settings.worker_toml += &format!("\nlisten_queues = {listen}");
    settings.extra_toml += comps;
    if backend == Backend::Sqs {
        // An embedded queue beside the SQS ones: the other backend.
        settings.extra_toml += "\n[queues.side]\nbackend = \"local\"\npath = \"side\"\n";
    }
    Farm::new(backend, settings).await
}

/// `step` on queue `comps`, each child after the same frames of `parent`.
fn dependant(frames: &str, parent: &str) -> Value {
    let mut params = step(
        frames,
        1,
        "",
        0.0,
        json!([{"job_id": parent, "frames": "same"}]),
    );
    params["queue_name"] = json!("comps");
    params
}

/// Each child of `child` started after the same child of `parent`
/// succeeded, and was released once, by it.
fn started_after_its_parent_frame(events: &[Value], parent: &str, child: &str, skip: &[u64]) {
    let parent_done = by_child(events, "JobSucceeded", parent);
    let started = by_child(events, "JobStarted", child);
    let released = by_child(events, "JobReleased", child);
    for (index, runs) in &started {
        let done = time(&parent_done[index][0]);
        let start = time(&runs[0]);
        assert!(
            done <= start,
            "child {index} started at {start}, before its parent frame succeeded at {done}"
        );
        assert_eq!(released[index].len(), 1, "{:?}", released[index]);
        let by = released[index][0]["detail"]["released_by"]
            .as_str()
            .unwrap();
        assert_eq!(by, format!("{parent} child {index}"));
        assert_eq!(
            released[index][0]["queue"], "comps",
            "{}",
            released[index][0]
        );
    }
    for index in skip {
        assert!(!started.contains_key(index), "child {index} ran");
        assert!(!released.contains_key(index), "child {index} was released");
    }
}

async fn a_dependant_on_another_queue_runs_frame_by_frame_and_a_failed_frame_cancels_its_own(
    backend: Backend,
) {
    let comps = comps(backend, 2).await;
    let farm = farm(backend, &comps, BOTH, 2).await;
    let _serve = farm.serve(&[]).await;
    // Six frames of a second each on two slots; frame 3 fails.
    let parent = array(&farm, step("1-6", 1, "3", 1.0, json!([]))).await;
    let child = array(&farm, dependant("1-6", &parent)).await;
    // Plain jobs on `comps` after the whole parent: on success (cancelled
    // by frame 3) and on finish (run).
    let whole = |on: &str| {
        json!({"command": "step", "queue_name": "comps",
               "depends_on": [{"job_id": parent, "on": on}]})
    };
    let on_success = farm.submit(whole("success")).await;
    let on_finish = farm.submit(whole("finish")).await;
    // While held, `renderq status` names the parent and its queue.
    let line = format!("waits_for\tparent={parent}\tchildren ");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, status, _) = farm.cli(&["status", &child]);
        let waits = status.lines().find(|l| l.starts_with(&line));
        if let Some(waits) = waits {
            assert!(waits.ends_with("\tqueue=renders"), "{waits}");
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        completed(&farm, &child).await,
        json!({"size": 6, "succeeded": 5, "dead_lettered": 0, "cancelled": 1})
    );
    let events = farm.events();
    started_after_its_parent_frame(&events, &parent, &child, &[2]);
    let cancelled = by_child(&events, "JobCancelled", &child);
    assert_eq!(cancelled.keys().collect::<Vec<_>>(), [&2], "frame 3 only");
    let reason = cancelled[&2][0]["detail"]["reason"].as_str().unwrap();
    assert_eq!(reason, format!("parent job {parent} child 2 dead-lettered"));
    // Frame by frame: the first dependant frame was sent to `comps` before
    // the last parent frame ended. (When it starts is the worker's to say:
    // `renders` is listed first, so its frames go first.)
    let first = (by_child(&events, "JobReleased", &child).values())
        .map(|runs| time(&runs[0]))
        .min()
        .unwrap();
    let last = (by_child(&events, "JobSucceeded", &parent).values())
        .map(|runs| time(&runs[0]))
        .max()
        .unwrap();
    assert!(
        first < last,
        "first child released {first}, last parent end {last}"
    );
    let ended = |id: &str, kind: &str| {
        let id = id.to_owned();
        let kind = kind.to_owned();
        move |e: &Value| e["job_id"] == id.as_str() && e["type"] == kind.as_str()
    };
    let cancelled = farm
        .wait_for_events(ended(&on_success, "JobCancelled"), 1, LONG)
        .await;
    let reason = cancelled[0]["detail"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&parent) && reason.contains("dead-lettered"),
        "{reason}"
    );
    let succeeded = farm
        .wait_for_events(ended(&on_finish, "JobSucceeded"), 1, LONG)
        .await;
    assert_eq!(succeeded[0]["queue"], "comps");
    let events = farm.events();
    assert!(!events.iter().any(ended(&on_success, "JobStarted")));
    let released: Vec<&Value> = events
        .iter()
        .filter(|e| ended(&on_finish, "JobReleased")(e))
        .collect();
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(released[0]["detail"]["released_by"], parent.as_str());
}

async fn a_parent_whose_worker_cannot_reach_the_dependants_queue_is_swept_and_an_unserved_one_refused(
    backend: Backend,
) {
    // This process serves both queues and works `comps` only; the parent's
    // worker has `renders` alone in its config (and its own endpoint).
    let comps = comps(backend, 3).await;
    let farm = farm(backend, &comps, r#"["comps"]"#, 3).await;
    let _serve = farm.serve(&[]).await;
    let port = free_port();
    let renders_only = farm.config_variant("renders-only", |text| {
        text.replace(&comps, "")
            .replace(
                r#"listen_queues = ["comps"]"#,
                r#"listen_queues = ["renders"]"#,
            )
            .replace(
                &format!("listen = \"127.0.0.1:{}\"", farm.port),
                &format!("listen = \"127.0.0.1:{port}\""),
            )
    });
    let other = farm.spawn_with("serve", &[], &renders_only);
    let parent = array(&farm, step("1-3", 1, "", 0.5, json!([]))).await;
    let child = array(&farm, dependant("1-3", &parent)).await;
    assert_eq!(completed(&farm, &child).await["succeeded"], 3);
    let events = farm.events();
    started_after_its_parent_frame(&events, &parent, &child, &[]);
    assert!(
        other.log_text().contains("its sweep releases them"),
        "{}",
        other.log_text()
    );

    // That endpoint serves `renders` only: a parent on `comps` is unknown.
    let reply = rpc_at(
        port,
        json!({"command": "step", "depends_on": [{"job_id": child}]}),
    )
    .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    assert_eq!(
        reply["error"]["data"]["field"], "depends_on[0].job_id",
        "{reply}"
    );
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&child) && message.contains("queues this endpoint serves"),
        "{message}"
    );
    if backend == Backend::Sqs {
        // A dependant on an embedded queue of a parent on an SQS queue.
        let reply = farm
            .rpc(
                "queue_manager_submit_job",
                json!({"command": "step", "queue_name": "side",
                       "depends_on": [{"job_id": parent}]}),
            )
            .await;
        assert_eq!(reply["error"]["code"], -32602, "{reply}");
        assert_eq!(reply["error"]["data"]["field"], "depends_on[0].job_id");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains("other backend"), "{message}");
    }
}

async fn two_workers_settling_the_last_parent_frames_release_each_dependant_on_another_queue_once(
    backend: Backend,
) {
    let comps = comps(backend, 3).await;
    let mut settings = settings(1, 3);
    settings.worker_toml += &format!("\nlisten_queues = {BOTH}");
    settings.extra_toml += &comps;
    let farm = Farm::new(backend, settings).await;
    let _serve = farm.serve(&[]).await;
    let _worker = farm.spawn("worker", &[]);
    for _ in 0..3 {
        // Two parent children of the same length, one per worker.
        let parent = array(&farm, step("1-2", 1, "", 0.3, json!([]))).await;
        let same = array(&farm, dependant("1-2", &parent)).await;
        let mut params = dependant("1-2", &parent);
        params["depends_on"][0]["frames"] = json!("all");
        let all = array(&farm, params).await;
        completed(&farm, &same).await;
        completed(&farm, &all).await;
        released_and_ran_once(&farm.events(), &[&same, &all], 2);
    }
}

async fn a_worker_killed_before_releasing_on_another_queue_is_swept_once(backend: Backend) {
    let comps = comps(backend, 3).await;
    let farm = farm(backend, &comps, BOTH, 3).await;
    let mut halting = farm
        .serve(&[("RENDERQ_TEST_HALT_BEFORE_RELEASE", "1")])
        .await;
    let parent = farm.submit(json!({"command": "step"})).await;
    let child = farm
        .submit(json!({"command": "step", "queue_name": "comps",
                       "depends_on": [{"job_id": parent}]}))
        .await;
    halting.wait_for_log("halting before the release", LONG);
    halting.signal(Signal::SIGKILL);
    halting.wait_exit(LONG);
    let count = |kind: &str| {
        (farm.events().iter())
            .filter(|e| e["type"] == kind && e["job_id"] == child.as_str())
            .count()
    };
    assert_eq!(count("JobReleased"), 0, "released before the kill");
    // The parent's end is in its ledger; the new worker's sweep reads it.
    let _worker = farm.spawn("worker", &[]);
    farm.wait_for_events(
        |e| e["type"] == "JobSucceeded" && e["job_id"] == child.as_str(),
        1,
        LONG,
    )
    .await;
    // A few more sweeps pass: still once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count("JobReleased"), 1);
    assert_eq!(count("JobStarted"), 1);
    assert_eq!(count("JobSucceeded"), 1);
}

/// `queue_manager_submit_job` on the endpoint at `port`, once it answers.
async fn rpc_at(port: u16, params: Value) -> Value {
    let body = json!({"jsonrpc": "2.0", "method": "queue_manager_submit_job",
                      "params": params, "id": 1});
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sent = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/"))
            .json(&body)
            .send()
            .await;
        if let Ok(reply) = sent {
            return reply.json().await.expect("JSON reply");
        }
        assert!(Instant::now() < deadline, "the endpoint never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
