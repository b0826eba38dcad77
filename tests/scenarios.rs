//! End-to-end scenarios, written once and run on every backend: submit over
//! HTTP to a running `renderq serve`, then look at the bucket and the queue.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::harness::{Backend, Farm, Receiver, Settings, png_size};

scenarios!(
    render_demo_png_lands_in_bucket,
    get_version_uploads_json,
    failing_task_dead_letters_after_max_receives_then_redrives,
    killed_worker_job_is_finished_by_another,
    http_post_delivers_png_through_retries,
    sigterm_finishes_running_job_and_exits_zero,
    drain_deadline_hands_job_back_without_using_a_try,
    bad_direct_inserts_are_dead_lettered_and_never_run,
    long_job_outlives_visibility_timeout_and_runs_once,
);

const LONG: Duration = Duration::from_secs(30);

fn upload(key: &str) -> serde_json::Value {
    json!({"name": "s3_upload", "config": {"bucket": "results", "key": key}})
}

async fn render_demo_png_lands_in_bucket(backend: Backend) {
    let farm = Farm::new(backend, Settings::default()).await;
    let _serve = farm.serve(&[]).await;
    let id = farm
        .submit(json!({
            "command": "render_demo",
            "parameters": {"width": 64, "height": 48, "frame": 12},
            "tasks": [upload("renders/demo-${message_id}.${mime_ext}")],
        }))
        .await;
    let (bytes, content_type) = farm
        .wait_for_object(&format!("renders/demo-{id}.png"), LONG)
        .await;
    assert_eq!(content_type, "image/png");
    assert_eq!(png_size(&bytes), (64, 48));
    assert_eq!(farm.wait_until_drained(LONG).await, (0, 0, 0));
}

async fn get_version_uploads_json(backend: Backend) {
    let farm = Farm::new(backend, Settings::default()).await;
    let _serve = farm.serve(&[]).await;
    let id = farm
        .submit(json!({"command": "get_version", "tasks": [upload("tests/version-${message_id}.${mime_ext}")]}))
        .await;
    let (bytes, content_type) = farm
        .wait_for_object(&format!("tests/version-{id}.json"), LONG)
        .await;
    assert_eq!(content_type, "application/json");
    let version: String = serde_json::from_slice(&bytes).expect("a JSON string");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
}

async fn failing_task_dead_letters_after_max_receives_then_redrives(backend: Backend) {
    // The visibility timeout is long: only back-off can make this quick.
    let farm = Farm::new(
        backend,
        Settings {
            visibility_timeout: "60s",
            retry_delay: "200ms",
            max_receive_count: 3,
            ..Settings::default()
        },
    )
    .await;
    let always_failing = Receiver::start(usize::MAX).await;
    let mut serve = farm.serve(&[]).await;
    let started = Instant::now();
    let id = farm
        .submit(json!({
            "command": "get_version",
            "tasks": [{"name": "http_post", "config": {
                "postback_uri": format!("http://{}/hook/${{message_id}}", always_failing.addr)}}],
        }))
        .await;
    while farm.stats().2 == 0 {
        assert!(
            started.elapsed() < LONG,
            "never dead-lettered:\n{}",
            serve.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}: retries waited out the visibility timeout",
        started.elapsed()
    );
    // Three receives, each making the task's three attempts.
    assert_eq!(always_failing.hits().len(), 9);
    assert_eq!(farm.stats(), (0, 0, 1));

    let (code, listing, _) = farm.cli(&["dlq", "list"]);
    assert_eq!(code, 0);
    let line = listing
        .lines()
        .find(|l| l.starts_with(&id))
        .expect("dead letter listed");
    let fields: Vec<_> = line.split('\t').collect();
    assert_eq!(fields[1], "3", "{line}");
    assert!(
        fields[2].contains("500"),
        "reason should carry the last error: {line}"
    );

    serve.signal(Signal::SIGTERM);
    assert_eq!(serve.wait_exit(LONG), Some(0));
    let (code, out, _) = farm.cli(&["dlq", "redrive"]);
    assert_eq!(code, 0);
    assert!(out.contains("redrove 1"), "{out}");
    assert_eq!(farm.stats(), (1, 0, 0));
}

async fn killed_worker_job_is_finished_by_another(backend: Backend) {
    let farm = Farm::new(
        backend,
        Settings {
            visibility_timeout: "3s",
            ..Settings::default()
        },
    )
    .await;
    let mut first = farm.serve(&[]).await;
    let id = farm
        .submit(json!({"command": "sleep", "parameters": {"seconds": 3},
                       "tasks": [upload("slept-${message_id}.${mime_ext}")]}))
        .await;
    first.wait_for_log("Executing command: sleep.", LONG);
    first.signal(Signal::SIGKILL);
    first.wait_exit(LONG);
    assert_eq!(
        farm.stats().1,
        1,
        "the job is still held by the dead worker"
    );

    let second = farm.spawn("worker", &[]);
    farm.wait_for_object(&format!("slept-{id}.json"), LONG)
        .await;
    assert!(
        second.log_text().contains("attempt=2"),
        "{}",
        second.log_text()
    );
    assert_eq!(farm.wait_until_drained(LONG).await, (0, 0, 0));
}

async fn http_post_delivers_png_through_retries(backend: Backend) {
    let farm = Farm::new(backend, Settings::default()).await;
    let flaky = Receiver::start(2).await;
    let _serve = farm.serve(&[]).await;
    let id = farm
        .submit(json!({
            "command": "render_demo",
            "parameters": {"width": 32, "height": 24},
            "tasks": [{"name": "http_post", "config": {
                "postback_uri": format!("http://{}/done/${{message_id}}", flaky.addr)}}],
        }))
        .await;
    farm.wait_until_drained(LONG).await;
    let hits = flaky.hits();
    assert_eq!(hits.len(), 3, "500, 500, then 200");
    let delivered = hits.last().unwrap();
    assert_eq!(delivered.path, format!("/done/{id}"));
    assert_eq!(delivered.content_type, "image/png");
    assert_eq!(png_size(&delivered.body), (32, 24));
    assert_eq!(farm.stats(), (0, 0, 0));
}

async fn sigterm_finishes_running_job_and_exits_zero(backend: Backend) {
    let farm = Farm::new(backend, Settings::default()).await;
    let mut serve = farm.serve(&[]).await;
    let id = farm
        .submit(json!({"command": "sleep", "parameters": {"seconds": 1},
                       "tasks": [upload("short-${message_id}.${mime_ext}")]}))
        .await;
    serve.wait_for_log("Executing command: sleep.", LONG);
    serve.signal(Signal::SIGTERM);
    assert_eq!(serve.wait_exit(LONG), Some(0), "{}", serve.log_text());
    assert!(
        serve
            .log_text()
            .contains("Job processed, removing from queue.")
    );
    farm.wait_for_object(&format!("short-{id}.json"), Duration::from_secs(1))
        .await;
    assert_eq!(farm.stats(), (0, 0, 0));
}

async fn drain_deadline_hands_job_back_without_using_a_try(backend: Backend) {
    let farm = Farm::new(
        backend,
        Settings {
            drain_timeout: "300ms",
            max_receive_count: 1,
            ..Settings::default()
        },
    )
    .await;
    let mut serve = farm.serve(&[]).await;
    let id = farm
        .submit(json!({"command": "sleep", "parameters": {"seconds": 2},
                       "tasks": [upload("long-${message_id}.${mime_ext}")]}))
        .await;
    serve.wait_for_log("Executing command: sleep.", LONG);
    serve.signal(Signal::SIGTERM);
    assert_eq!(serve.wait_exit(LONG), Some(0), "{}", serve.log_text());
    assert!(
        serve
            .log_text()
            .contains("Job interrupted, returning to queue.")
    );
    assert_eq!(farm.stats(), (1, 0, 0), "handed back, visible at once");

    // With max_receive_count = 1, a used-up try would dead-letter it now.
    let worker = farm.spawn("worker", &[]);
    farm.wait_for_object(&format!("long-{id}.json"), LONG).await;
    assert!(
        worker.log_text().contains("attempt=1"),
        "{}",
        worker.log_text()
    );
    assert_eq!(farm.wait_until_drained(LONG).await, (0, 0, 0));
}

async fn bad_direct_inserts_are_dead_lettered_and_never_run(backend: Backend) {
    let farm = Farm::new(backend, Settings::default()).await;
    let serve = farm.serve(&[]).await;
    let bad = [
        ("not json at all", "malformed message body"),
        (r#"{"command": "rm_rf", "parameters": {}}"#, "not allowed"),
        (
            r#"{"command": "render_demo", "parameters": {"width": "huge"}}"#,
            "parameters.width",
        ),
        (
            r#"{"command": "get_version", "tasks": [{"name": "ftp_upload"}]}"#,
            "tasks[0].name",
        ),
    ];
    for (body, _) in bad {
        farm.insert(body).await;
    }
    let good = farm
        .insert(&json!({"command": "get_version", "tasks": [upload("direct-${message_id}.${mime_ext}")]}).to_string())
        .await;
    farm.wait_for_object(&format!("direct-{good}.json"), LONG)
        .await;
    assert_eq!(farm.wait_until_drained(LONG).await, (0, 0, 4));

    let (_, listing, _) = farm.cli(&["dlq", "list"]);
    for (_, reason) in bad {
        let line = listing
            .lines()
            .find(|l| l.contains(reason))
            .unwrap_or_else(|| panic!("no {reason:?} in:\n{listing}"));
        assert_eq!(
            line.split('\t').nth(1),
            Some("1"),
            "dead-lettered on its first receive: {line}"
        );
    }
    let log = serve.log_text();
    assert_eq!(
        log.matches("Executing command").count(),
        1,
        "only the good job ran:\n{log}"
    );
}

async fn long_job_outlives_visibility_timeout_and_runs_once(backend: Backend) {
    // Two workers watch the queue while a job runs three times longer than
    // the visibility timeout: only the heartbeat keeps the second one off it.
    let farm = Farm::new(
        backend,
        Settings {
            visibility_timeout: "2s",
            ..Settings::default()
        },
    )
    .await;
    let serve = farm.serve(&[]).await;
    let other = farm.spawn("worker", &[]);
    let id = farm
        .submit(json!({"command": "sleep", "parameters": {"seconds": 6},
                       "tasks": [upload("long-${message_id}.${mime_ext}")]}))
        .await;
    farm.wait_for_object(&format!("long-{id}.json"), LONG).await;
    assert_eq!(farm.wait_until_drained(LONG).await, (0, 0, 0));
    let logs = serve.log_text() + &other.log_text();
    let runs = logs
        .lines()
        .filter(|l| l.contains(&id) && l.contains("Received job from queue."))
        .count();
    assert_eq!(runs, 1, "received more than once:\n{logs}");
}
