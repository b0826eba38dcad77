//! Failures that no retry can fix are dead-lettered at once, with the reason.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Backend, Farm, Receiver, Settings};

const LONG: Duration = Duration::from_secs(60);

scenarios!(postback_answering_403_dead_letters_after_one_try);

async fn postback_answering_403_dead_letters_after_one_try(backend: Backend) {
    let farm = Farm::new(backend, Settings::default()).await;
    let forbidden = Receiver::answering(usize::MAX, axum::http::StatusCode::FORBIDDEN).await;
    let _serve = farm.serve(&[]).await;
    let id = farm
        .submit(
            json!({"command": "get_version", "tasks": [{"name": "http_post", "config": {
            "postback_uri": format!("http://{}/hook/${{message_id}}", forbidden.addr)}}]}),
        )
        .await;
    let fields = dead_letter_of(&farm, &id).await;
    assert_eq!(forbidden.hits().len(), 1, "one POST, no retry");
    assert_eq!(fields[1], "1", "{fields:?}");
    assert!(fields[2].contains("403"), "{fields:?}");
}

/// Waits for the job to be dead-lettered; returns its `dlq list` fields.
async fn dead_letter_of(farm: &Farm, id: &str) -> Vec<String> {
    let started = Instant::now();
    while farm.stats().2 == 0 {
        assert!(started.elapsed() < LONG, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, listing, _) = farm.cli(&["dlq", "list"]);
    let line = listing
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{id} not in:\n{listing}"));
    line.split('\t').map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_bucket_dead_letters_after_one_try() {
    let farm = Farm::new(Backend::Sqs, Settings::default()).await;
    let serve = farm.serve(&[]).await;
    let aws = farm.aws.as_ref().unwrap();
    aws.s3
        .delete_bucket()
        .bucket(&aws.bucket)
        .send()
        .await
        .unwrap();
    farm.submit(json!({"command": "get_version", "tasks": [
        {"name": "s3_upload", "config": {"bucket": "results", "key": "v/${message_id}.json"}}]}))
        .await;
    // `dlq list` opens the buckets too, so read the dead-letter queue here.
    serve.wait_for_log("moving to the dead-letter queue", LONG);
    let dead = aws
        .sqs
        .receive_message()
        .queue_url(&aws.dlq_url)
        .message_attribute_names("All")
        .wait_time_seconds(5)
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    let attribute = |name: &str| {
        dead[0].message_attributes().unwrap()[name]
            .string_value()
            .unwrap()
            .to_owned()
    };
    assert_eq!(attribute("renderq_receive_count"), "1");
    assert!(
        attribute("renderq_reason").contains("NoSuchBucket"),
        "{}",
        attribute("renderq_reason")
    );
}

/// A worker whose receipt goes stale (its message's visibility lapsed and
/// another worker received it) stops its copy of the job instead of running
/// on beside the other: one run completes, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_receipt_went_stale_stops_its_copy() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            visibility_timeout: "3s",
            extra_toml: crate::harness::AUDIT_AND_ASSETS.into(),
            ..Settings::default()
        },
    )
    .await;
    let first = farm.serve(&[]).await;
    let id = farm
        .submit(json!({"command": "sleep", "parameters": {"seconds": 4}}))
        .await;
    farm.wait_for_events(|e| e["type"] == "JobStarted", 1, LONG)
        .await;
    // The message's visibility lapses under the running job, as after a
    // pause longer than the visibility timeout; a second worker takes it.
    let db = rusqlite::Connection::open(farm.dir.path().join("queue/queue.sqlite3")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute("UPDATE messages SET visible_at = 0", [])
        .unwrap();
    let stolen = Instant::now();
    let _second = farm.spawn("worker", &[]);
    let stopped = farm
        .wait_for_events(
            |e| {
                e["type"] == "JobRequeued"
                    && e["message_id"] == id.as_str()
                    && e["detail"]["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("another worker"))
            },
            1,
            LONG,
        )
        .await;
    assert_eq!(stopped.len(), 1);
    assert!(
        stolen.elapsed() < Duration::from_secs(3),
        "stopped within a heartbeat or two"
    );
    assert!(
        first
            .log_text()
            .contains("Another worker holds the job's message now")
    );
    farm.wait_for_events(|e| e["type"] == "JobSucceeded", 1, LONG)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = farm.events();
    let runs = |kind: &str| events.iter().filter(|e| e["type"] == kind).count();
    assert_eq!(runs("JobSucceeded"), 1, "{events:?}");
    assert_eq!(runs("JobStarted"), 2, "one copy each");
    assert_eq!(farm.stats(), (0, 0, 0));
}
