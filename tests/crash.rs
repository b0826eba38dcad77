//! Crash hygiene: what a worker killed with SIGKILL leaves behind (nothing),
//! messages no worker can decode (dead-lettered, the queue keeps moving),
//! and the failure budget across interruptions.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::commands::{commands_toml, starts};
use crate::harness::{Backend, Farm, Proc, Settings, alive};

const LONG: Duration = Duration::from_secs(60);

/// Waits until `path` lists at least `n` pids; returns them.
async fn wait_for_pids(path: &Path, n: usize) -> Vec<i32> {
    let deadline = Instant::now() + LONG;
    loop {
        let pids = starts(path);
        if pids.len() >= n {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "{} never listed {n} pids",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits up to `within` for every pid to be gone; panics naming a survivor.
async fn assert_all_gone(pids: &[i32], within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while let Some(pid) = pids.iter().find(|p| alive(**p)) {
        assert!(
            Instant::now() < deadline,
            "{what}: process {pid} is still alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `within` for the job folders to be removed.
async fn assert_no_job_folders(farm: &Farm, within: Duration) {
    let deadline = Instant::now() + within;
    while !farm.job_folders().is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            farm.job_folders()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| alive(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// The children of `parent` (the reaper, for a renderq process).
fn children_of(parent: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

async fn crash_farm(dir: &Path) -> Farm {
    Farm::new(
        Backend::Local,
        Settings {
            extra_toml: commands_toml(&dir.join("starts").display().to_string()),
            extra_allowed: vec!["sleeper", "scene"],
            visibility_timeout: "2s",
            ..Settings::default()
        },
    )
    .await
}

/// A farm whose `serve` runs a `sleeper` job: returns the farm, the serve
/// process, the job's pid file and its pids (the program and the two
/// children it started).
async fn sleeper_running(dir: &Path) -> (Farm, Proc, std::path::PathBuf, Vec<i32>) {
    let farm = crash_farm(dir).await;
    let serve = farm.serve(&[]).await;
    let pidfile = dir.join("pids");
    farm.submit(json!({"command": "sleeper", "parameters": {"pidfile": pidfile}}))
        .await;
    let pids = wait_for_pids(&pidfile, 3).await;
    (farm, serve, pidfile, pids)
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_worker_leaves_no_process_and_the_job_runs_once_more() {
    let dir = tempfile::tempdir().unwrap();
    let (farm, serve, pidfile, first) = sleeper_running(dir.path()).await;
    assert!(!farm.job_folders().is_empty());

    serve.signal(Signal::SIGKILL);
    assert_all_gone(
        &first,
        Duration::from_secs(2),
        "after kill -9 of the worker",
    )
    .await;
    assert_no_job_folders(&farm, Duration::from_secs(2)).await;
    drop(serve);

    std::fs::remove_file(&pidfile).unwrap();
    let worker = farm.spawn("worker", &[]);
    let second = wait_for_pids(&pidfile, 3).await;
    assert!(second.iter().all(|pid| !first.contains(pid)));
    assert!(second.iter().all(|pid| alive(*pid)));
    assert_eq!(
        processes_mentioning(&pidfile.display().to_string()).len(),
        1,
        "one copy of the job runs"
    );
    drop(worker);
    assert_all_gone(&second, Duration::from_secs(2), "after the second worker").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_worker_leaves_no_adaptor() {
    let dir = tempfile::tempdir().unwrap();
    let farm = crash_farm(dir.path()).await;
    let serve = farm.serve(&[]).await;
    farm.submit(json!({"command": "scene", "parameters": {"seconds": 30}}))
        .await;
    serve.wait_for_log("rendering frame", LONG);
    let adaptor = wait_for_pids(&dir.path().join("starts"), 1).await;
    serve.signal(Signal::SIGKILL);
    assert_all_gone(
        &adaptor,
        Duration::from_secs(2),
        "the adaptor after kill -9",
    )
    .await;
    assert_no_job_folders(&farm, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn next_worker_sweeps_up_when_the_reaper_died_too() {
    let dir = tempfile::tempdir().unwrap();
    let (farm, serve, _, pids) = sleeper_running(dir.path()).await;
    let reapers: Vec<i32> = children_of(serve.pid().as_raw())
        .into_iter()
        .filter(|pid| !pids.contains(pid))
        .collect();
    assert_eq!(reapers.len(), 1, "one reaper per worker: {reapers:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(reapers[0]), Signal::SIGKILL).unwrap();
    serve.signal(Signal::SIGKILL);
    // The program dies with its parent; what it started does not.
    assert_all_gone(&pids[..1], Duration::from_secs(2), "the program").await;
    assert!(pids[1..].iter().all(|pid| alive(*pid)));
    assert!(!farm.job_folders().is_empty());
    drop(serve);

    let worker: Proc = farm.spawn("worker", &[]);
    worker.wait_for_log("Cleaned up after dead workers.", LONG);
    assert_all_gone(&pids, Duration::from_secs(2), "after the sweep").await;
    // The job is running again, in a fresh folder of the new worker.
    let folders = farm.job_folders();
    assert!(folders.len() <= 1, "{folders:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_rows_are_dead_lettered_and_do_not_stall_the_queue() {
    let farm = Farm::new(Backend::Local, Settings::default()).await;
    let serve = farm.serve(&[]).await;
    // Rows written straight into the store, as a careless tool might.
    let conn = rusqlite::Connection::open(farm.dir.path().join("queue/queue.sqlite3")).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let insert = "INSERT INTO messages (id, body, sent_at, visible_at) VALUES (?1, ?2, 0, 0)";
    conn.execute(
        insert,
        rusqlite::params!["blob-row", vec![0xffu8, 0x00, 0x9f]],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO messages (id, body, sent_at, visible_at)
         VALUES ('bad-text-row', CAST(X'7B22C328' AS TEXT), 0, 0)",
        [],
    )
    .unwrap();
    drop(conn);

    let started = Instant::now();
    let id = farm
        .submit(json!({"command": "get_version", "tasks": [
            {"name": "s3_upload", "config": {"bucket": "results", "key": "v/${message_id}.json"}}]}))
        .await;
    farm.wait_for_object(&format!("v/{id}.json"), LONG).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the job behind the bad rows waited {:?}",
        started.elapsed()
    );
    let (code, out, _) = farm.cli(&["dlq", "list"]);
    assert_eq!(code, 0);
    for row in ["blob-row", "bad-text-row"] {
        let line = out
            .lines()
            .find(|l| l.contains(row))
            .unwrap_or_else(|| panic!("{row} in {out}"));
        assert!(line.contains("not valid UTF-8"), "{line}");
    }
    assert!(
        !serve.log_text().contains("queue error"),
        "{}",
        serve.log_text()
    );
}

scenarios!(
    interruption_keeps_the_failure_budget_and_the_message_id,
    job_lost_on_its_last_try_is_dead_lettered_as_worker_lost,
    idle_worker_stops_without_cancelling_anything,
);

/// Try 1 fails, try 2 is interrupted by shutdown, tries 2 and 3 fail: the
/// job runs 4 times in all (an interruption uses no try, earlier failures
/// still count), and `dlq list` names the id the submit returned.
async fn interruption_keeps_the_failure_budget_and_the_message_id(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = crate::harness::repo_path("tests/fixtures/fail_or_hang.py");
    let farm = Farm::new(
        backend,
        Settings {
            extra_toml: format!(
                r#"
[commands.flaky]
kind = "process"
program = "{fixture}"
args = ["{{runs}}", "{{hang_while}}"]
[commands.flaky.parameters]
runs = {{ type = "string", required = true }}
hang_while = {{ type = "string", required = true }}
"#
            ),
            extra_allowed: vec!["flaky"],
            retry_delay: "1s",
            drain_timeout: "300ms",
            max_receive_count: 3,
            ..Settings::default()
        },
    )
    .await;
    let (runs, marker) = (dir.path().join("runs"), dir.path().join("hang"));
    let mut serve = farm.serve(&[]).await;
    let id = farm
        .submit(json!({"command": "flaky", "parameters": {"runs": runs, "hang_while": marker}}))
        .await;
    wait_for_pids(&runs, 1).await;
    std::fs::write(&marker, "").unwrap();
    serve.wait_for_log("Job failed, returning to queue for a retry.", LONG);
    wait_for_pids(&runs, 2).await;
    serve.signal(Signal::SIGTERM);
    assert_eq!(serve.wait_exit(LONG), Some(0), "{}", serve.log_text());
    assert!(
        serve
            .log_text()
            .contains("Job interrupted, returning to queue.")
    );
    std::fs::remove_file(&marker).unwrap();

    let worker = farm.spawn("worker", &[]);
    let started = Instant::now();
    while farm.stats().2 == 0 {
        assert!(
            started.elapsed() < LONG,
            "never dead-lettered:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(starts(&runs).len(), 4, "{}", worker.log_text());
    assert!(worker.log_text().contains(&format!("message_id={id}")));
    let (_, listing, _) = farm.cli(&["dlq", "list"]);
    let line = listing
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} not in:\n{listing}"));
    let fields: Vec<_> = line.split('\t').collect();
    assert_eq!(fields[1], "3", "{line}");
    assert!(fields[2].contains("after 3 tries"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_worker_leaves_no_temporary_file_in_the_bucket() {
    let farm = crate::harness::big_file_farm(Backend::Local).await;
    let serve = farm.serve(&[]).await;
    farm.submit(json!({"command": "big_file", "parameters": {"size_mib": 300},
                       "tasks": [{"name": "s3_upload", "config": {"bucket": "results", "key": "big/${message_id}.bin"}}]}))
        .await;
    serve.wait_for_log("Executing task: s3_upload.", LONG);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !files_under(&farm.bucket_root().join(".renderq-tmp")).is_empty(),
        "the write is under way"
    );
    serve.signal(Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let files = files_under(&farm.bucket_root());
        let half_written: Vec<_> = files.iter().filter(|f| !f.ends_with(".json")).collect();
        if half_written.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {half_written:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every file below `root`, as paths relative to it.
pub fn files_under(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn reserved_and_folder_keys_are_refused_at_submit() {
    let farm = Farm::new(Backend::Local, Settings::default()).await;
    let _serve = farm.serve(&[]).await;
    for key in [
        ".renderq-meta/${message_id}.json",
        "out/.renderq-tmp/${message_id}",
        "out/${message_id}/",
        "../${message_id}",
    ] {
        let reply = farm
            .rpc(
                "queue_manager_submit_job",
                json!({"command": "get_version", "tasks": [
                    {"name": "s3_upload", "config": {"bucket": "results", "key": key}}]}),
            )
            .await;
        assert_eq!(reply["error"]["code"], -32602, "{key}: {reply}");
        assert_eq!(
            reply["error"]["data"]["field"], "tasks[0].config.key",
            "{key}: {reply}"
        );
    }
    assert_eq!(farm.stats(), (0, 0, 0), "nothing was sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_string_frame_renders_without_quotes() {
    let argv_json = crate::harness::repo_path("examples/commands/argv_json.py");
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: format!(
                r#"
[commands.shot]
kind = "process"
program = "python3"
args = ["{argv_json}", "{{frame}}"]
[commands.shot.parameters]
frame = {{ type = "string", pattern = "^[a-z0-9]+$" }}
"#
            ),
            extra_allowed: vec!["shot"],
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[]).await;
    farm.submit(json!({"command": "shot", "parameters": {"frame": "abc"}, "tasks": [
        {"name": "s3_upload", "config": {"bucket": "results", "key": "f/${frame}/x.${mime_ext}"}}]}))
        .await;
    farm.wait_for_object("f/abc/x.json", LONG).await;
}

async fn job_lost_on_its_last_try_is_dead_lettered_as_worker_lost(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let farm = Farm::new(
        backend,
        Settings {
            extra_toml: commands_toml(&dir.path().join("starts").display().to_string()),
            extra_allowed: vec!["sleeper"],
            visibility_timeout: "2s",
            max_receive_count: 1,
            ..Settings::default()
        },
    )
    .await;
    let serve = farm.serve(&[]).await;
    let pidfile = dir.path().join("pids");
    let id = farm
        .submit(json!({"command": "sleeper", "parameters": {"pidfile": pidfile}}))
        .await;
    wait_for_pids(&pidfile, 3).await;
    serve.signal(Signal::SIGKILL);
    let _worker = farm.spawn("worker", &[]);
    let started = Instant::now();
    while farm.stats().2 == 0 {
        assert!(started.elapsed() < LONG, "never dead-lettered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, listing, _) = farm.cli(&["dlq", "list"]);
    let line = listing
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} not in:\n{listing}"));
    assert!(line.contains("worker lost"), "{line}");
}

async fn idle_worker_stops_without_cancelling_anything(backend: Backend) {
    let farm = Farm::new(
        backend,
        Settings {
            drain_timeout: "300ms",
            ..Settings::default()
        },
    )
    .await;
    let mut worker = farm.spawn("worker", &[]);
    worker.wait_for_log("Worker started.", LONG);
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.signal(Signal::SIGTERM);
    assert_eq!(worker.wait_exit(LONG), Some(0));
    let log = worker.log_text();
    assert!(!log.contains("cancelling running jobs"), "{log}");
    assert!(log.contains("Worker stopped."), "{log}");
}
