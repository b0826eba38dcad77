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

/// Four worker processes of four slots each drain 2,000 jobs: every job is
/// executed exactly once (counted from the executions, not the deletes).
#[tokio::test(flavor = "multi_thread")]
async fn sixteen_slots_in_four_processes_run_each_of_2000_jobs_once() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            worker_toml: "slots = 4".into(),
            ..Settings::default()
        },
    )
    .await;
    let config = renderq::config::Config::load(&farm.config).unwrap();
    let queue = renderq::queue::Queue::open("renders", &config.queues["renders"])
        .await
        .unwrap();
    let body = json!({"command": "get_version"}).to_string();
    let mut ids = Vec::new();
    for _ in 0..200 {
        let sent = queue.send_batch(&vec![body.clone(); 10]).await.unwrap();
        ids.extend(sent.into_iter().map(Result::unwrap));
    }
    let workers: Vec<_> = (0..4).map(|_| farm.spawn("worker", &[])).collect();
    assert_eq!(
        farm.wait_until_drained(Duration::from_secs(120)).await,
        (0, 0, 0)
    );
    let mut runs = std::collections::HashMap::new();
    for worker in &workers {
        for line in worker.log_text().lines() {
            if line.contains("Executing command: get_version.")
                && let Some(id) = line
                    .split("message_id=")
                    .nth(1)
                    .and_then(|rest| rest.split([' ', '}']).next())
            {
                *runs.entry(id.to_owned()).or_insert(0) += 1;
            }
        }
    }
    for id in &ids {
        assert_eq!(runs.get(id), Some(&1), "job {id}");
    }
    assert_eq!(runs.len(), ids.len());
}
