//! Several worker processes on one embedded queue.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Backend, Farm, Settings};

/// Many jobs, three worker processes (plus the one inside serve): every job
/// runs exactly once and the queue ends empty.
#[tokio::test(flavor = "multi_thread")]
async fn workers_in_several_processes_never_share_a_job() {
    let farm = Farm::new(Backend::Local, Settings::default()).await;
    let serve = farm.serve(&[]).await;
    let workers: Vec<_> = (0..3).map(|_| farm.spawn("worker", &[])).collect();
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(
            farm.submit(json!({"command": "sleep", "parameters": {"seconds": 0.05},
                               "tasks": [{"name": "s3_upload", "config": {"bucket": "results", "key": "p/${message_id}.${mime_ext}"}}]}))
                .await,
        );
    }
    assert_eq!(
        farm.wait_until_drained(Duration::from_secs(60)).await,
        (0, 0, 0)
    );
    let logs: String = workers
        .iter()
        .chain([&serve])
        .map(|p| p.log_text())
        .collect();
    for id in &ids {
        let runs = logs
            .lines()
            .filter(|l| l.contains(id.as_str()) && l.contains("Executing command"))
            .count();
        assert_eq!(runs, 1, "job {id} ran {runs} times");
        assert!(farm.bucket_root().join(format!("p/{id}.json")).exists());
    }
    let busy = workers
        .iter()
        .filter(|w| w.log_text().contains("Executing command"))
        .count();
    assert!(busy >= 1, "the extra worker processes took some jobs");
}
