//! A fault-injection storm sized for CI: three workers, one of them killed
//! with SIGKILL every second, a fifth of the runs failing on purpose. In the
//! end every job is exactly one object or one dead letter with a reason, and
//! nothing is left behind: no temporary file, no job folder, no process.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::crash::files_under;
use crate::harness::{Backend, Farm, Proc, Settings, alive, repo_path};

const JOBS: usize = 200;
const WORKERS: usize = 3;
const STORM: Duration = Duration::from_secs(20);
const FAILURE_PERCENT: u32 = 20;

#[tokio::test(flavor = "multi_thread")]
async fn storm_of_kills_and_failures_loses_nothing_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = repo_path("tests/fixtures/storm_job.py");
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: format!(
                r#"
[commands.storm]
kind = "process"
program = "{fixture}"
args = ["{{pids}}", "{FAILURE_PERCENT}"]
timeout = "30s"
[commands.storm.parameters]
pids = {{ type = "string", required = true }}
"#
            ),
            extra_allowed: vec!["storm"],
            visibility_timeout: "2s",
            retry_delay: "100ms",
            max_receive_count: 3,
            ..Settings::default()
        },
    )
    .await;
    let pids = dir.path().join("pids");
    let config = renderq::config::Config::load(&farm.config).unwrap();
    let queue = renderq::queue::Queue::open("renders", &config.queues["renders"])
        .await
        .unwrap();
    let body = json!({"command": "storm", "parameters": {"pids": pids},
                      "tasks": [{"name": "s3_upload", "config": {"bucket": "results", "key": "s/${message_id}.${mime_ext}"}}]})
    .to_string();
    let mut ids = Vec::with_capacity(JOBS);
    for _ in 0..JOBS {
        ids.push(queue.send(&body).await.unwrap());
    }

    let mut workers: Vec<Proc> = (0..WORKERS).map(|_| farm.spawn("worker", &[])).collect();
    let started = Instant::now();
    let mut kills = 0;
    let mut seed = std::process::id() as usize;
    while started.elapsed() < STORM {
        tokio::time::sleep(Duration::from_secs(1)).await;
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let victim = (seed >> 33) % WORKERS;
        workers[victim].signal(Signal::SIGKILL);
        workers[victim] = farm.spawn("worker", &[]);
        kills += 1;
    }
    farm.wait_until_drained(Duration::from_secs(180)).await;
    for worker in &workers {
        worker.signal(Signal::SIGTERM);
    }
    for worker in &mut workers {
        assert_eq!(worker.wait_exit(Duration::from_secs(60)), Some(0));
    }

    // Every job ended as one object or one dead letter with its reason.
    let (code, listing, _) = farm.cli(&["dlq", "list"]);
    assert_eq!(code, 0);
    let mut dead = HashSet::new();
    for line in listing.lines() {
        let fields: Vec<_> = line.split('\t').collect();
        assert!(
            fields.len() == 3 && !fields[2].is_empty(),
            "no reason: {line}"
        );
        assert!(dead.insert(fields[0].to_owned()), "listed twice: {line}");
    }
    let mut succeeded = 0;
    for id in &ids {
        let object = farm.bucket_root().join(format!("s/{id}.json")).exists();
        assert!(
            object != dead.contains(id),
            "job {id}: object {object}, dead letter {}",
            dead.contains(id)
        );
        succeeded += usize::from(object);
    }
    assert_eq!(
        dead.len() + succeeded,
        JOBS,
        "nothing else in the dead-letter queue"
    );
    println!(
        "storm: {JOBS} jobs, {kills} kills, {succeeded} succeeded, {} dead-lettered",
        dead.len()
    );

    // Nothing left behind.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let tmp = files_under(&farm.bucket_root().join(".renderq-tmp"));
        let work = files_under(&farm.work_dir());
        let folders = farm.job_folders();
        let survivors: Vec<i32> = crate::commands::starts(&pids)
            .into_iter()
            .filter(|pid| alive(*pid))
            .collect();
        if tmp.is_empty() && work.is_empty() && folders.is_empty() && survivors.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: temp files {tmp:?}, work files {work:?}, job folders {folders:?}, processes {survivors:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
