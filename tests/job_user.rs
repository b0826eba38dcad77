//! `[worker] run_as`: jobs run as a user of their own, who can reach its
//! own folder and inputs and nothing of the worker's; a worker that cannot
//! switch users, or a user that does not exist, stops the worker at start.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{AUDIT_AND_ASSETS, Backend, Farm, Settings, files_under, repo_path};
use crate::inputs::{ended, put_asset, upload};

/// A farm whose jobs run as `user`, with the commands that read, attack
/// and probe; its folder may be passed through (as `/var/lib` may), so the
/// worker's own modes are all that keep a job out.
async fn farm(user: &str) -> Farm {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_allowed: vec!["list_inputs", "attack_inputs", "probe_reach", "slow"],
            worker_toml: format!("run_as = \"{user}\"\n"),
            extra_toml: format!(
                r#"{AUDIT_AND_ASSETS}
[commands.list_inputs]
kind = "process"
program = "{python}"
args = ["{list}"]

[commands.attack_inputs]
kind = "process"
program = "{python}"
args = ["{attack}"]

[commands.probe_reach]
kind = "process"
program = "{python}"
args = ["{probe}", "{{targets}}"]
[commands.probe_reach.parameters]
targets = {{ type = "string", required = true }}

[commands.slow]
kind = "adaptor"
program = "{python}"
args = ["{adaptor}", "{{config_dir}}/adaptor-starts", "{{config_dir}}/adaptor-cancels"]
[commands.slow.parameters]
seconds = {{ type = "number", min = 0, default = 0 }}
"#,
                list = repo_path("tests/fixtures/list_inputs.py"),
                attack = repo_path("tests/fixtures/attack_inputs.py"),
                probe = repo_path("tests/fixtures/probe_reach.py"),
                adaptor = repo_path("tests/fixtures/cancellable_adaptor.py"),
                python = python(),
            ),
            ..Settings::default()
        },
    )
    .await;
    for dir in [farm.dir.path().to_owned(), farm.work_dir()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Where the adaptor (running as the job user) records its starts.
    for name in ["adaptor-starts", "adaptor-cancels"] {
        let path = farm.dir.path().join(name);
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    farm
}

/// A Python the job user can run (root's own may be in a folder it cannot
/// enter, as pyenv's shims under `/root` are).
fn python() -> &'static str {
    ["/usr/local/bin/python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a system python3")
}

fn id(args: &[&str]) -> String {
    let out = std::process::Command::new("id")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// What a worker that is not root needs to run jobs as another user, as
/// the systemd unit's `AmbientCapabilities` gives them.
const WORKER_CAPS: &str = "+chown,+dac_override,+kill,+setgid,+setuid";

/// Runs a job as `user` that tries to reach the worker's state and reports;
/// the worker runs as root, or (`worker`) as that user holding
/// [`WORKER_CAPS`] only.
async fn a_job_reaches_its_own_folder_and_nothing_of_the_workers(user: &str, worker: Option<&str>) {
    let farm = farm(user).await;
    put_asset(&farm, "shots/010/scene.txt", b"the scene");
    let serve = match worker {
        None => farm.serve(&[]).await,
        Some(worker) => farm.serve_holding(worker, WORKER_CAPS).await,
    };
    let inputs = json!([{"bucket": "assets", "key": "shots/010/scene.txt", "path": "scene.txt"}]);
    // A first job fills the cache.
    let first = farm
        .submit(
            json!({"command": "list_inputs", "inputs": inputs, "tasks": [upload("first.json")]}),
        )
        .await;
    let end = ended(&farm, &first).await;
    assert_eq!(end["type"], "JobSucceeded", "{end}");

    let dir = farm.dir.path();
    let queue_file = files_under(&dir.join("queue"))
        .into_iter()
        .find(|f| f.file_name().is_some_and(|n| n == "queue.sqlite3"))
        .expect("the embedded queue's file");
    let cache = farm.work_dir().join("renderq-cache");
    let blob = files_under(&cache.join("blobs"))
        .pop()
        .expect("a cached blob");
    let targets = json!({
        "the cache": cache,
        "the cache's index": cache.join("index.sqlite3"),
        "a cached blob": blob,
        "the queue folder": dir.join("queue"),
        "the queue file": queue_file,
        "the status table": dir.join("status.sqlite3"),
        "the results bucket": farm.bucket_root(),
        "the events file": dir.join("events.jsonl"),
    });
    let probe = farm
        .submit(
            json!({"command": "probe_reach", "parameters": {"targets": targets.to_string()},
            "inputs": inputs, "tasks": [upload("probe.json")]}),
        )
        .await;
    let end = ended(&farm, &probe).await;
    assert_eq!(end["type"], "JobSucceeded", "{end}");
    let (report, _) = farm.object("probe.json").await.unwrap();
    let report: Value = serde_json::from_slice(&report).unwrap();
    println!("the probe: {report:#}");
    for (name, _) in targets.as_object().unwrap() {
        let done = report[name].as_str().unwrap_or_default();
        assert!(done.starts_with("denied: "), "{name}: {report:#}");
    }
    for name in ["the worker's folder", "its process record"] {
        let done = report[name].as_str().unwrap_or_default();
        assert!(done.starts_with("denied: "), "{name}: {report:#}");
    }
    assert_eq!(report["its own folder"], "read and written", "{report:#}");
    // Its own user and groups, none of the worker's (root's).
    assert_eq!(report["uid"].to_string(), id(&["-u", user]));
    let mut groups: Vec<u64> = id(&["-G", user])
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    groups.sort();
    groups.dedup();
    assert_eq!(report["groups"], json!(groups), "{report:#}");
    let log = serve.log_text();
    assert!(
        log.contains("inputs reach job folders as read-only hard links"),
        "{log}"
    );
    assert!(!log.contains("jobs run as root"), "{log}");
    for caps in ["CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(report[caps], "0000000000000000", "{caps}: {report:#}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_user_reaches_its_own_folder_and_nothing_of_the_workers() {
    let Some(user) = crate::harness::unprivileged_user() else {
        return;
    };
    a_job_reaches_its_own_folder_and_nothing_of_the_workers(user, None).await;
}

/// As the Dockerfile and the systemd unit run it: a worker that is not
/// root, holding only the capabilities switching takes; its jobs (as
/// `nobody`) hold none of them.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_is_not_root_runs_jobs_as_their_user_with_its_capabilities_alone() {
    let Some(worker) = crate::harness::unprivileged_user() else {
        return;
    };
    a_job_reaches_its_own_folder_and_nothing_of_the_workers("nobody", Some(worker)).await;
}

/// A line of `/proc/PID/status`, after its name.
fn proc_status(pid: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line[field.len()..].trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adaptor_runs_as_the_job_user_with_its_groups_and_no_capability() {
    let Some(user) = crate::harness::unprivileged_user() else {
        return;
    };
    let farm = farm(user).await;
    let _serve = farm.serve(&[]).await;
    let job = farm
        .submit(json!({"command": "slow", "parameters": {"seconds": 0}}))
        .await;
    let end = ended(&farm, &job).await;
    assert_eq!(end["type"], "JobSucceeded", "{end}");
    // Kept running for the next job: its credentials can be read.
    let starts = std::fs::read_to_string(farm.dir.path().join("adaptor-starts")).unwrap();
    let pid = starts
        .lines()
        .last()
        .expect("the adaptor recorded its start");
    let uid = id(&["-u", user]);
    assert_eq!(proc_status(pid, "Uid:"), [uid.as_str(); 4].join("\t"));
    let gid = id(&["-g", user]);
    assert_eq!(proc_status(pid, "Gid:"), [gid.as_str(); 4].join("\t"));
    let sorted = |text: String| {
        let mut list: Vec<u32> = text
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        list.sort();
        list.dedup();
        list
    };
    assert_eq!(
        sorted(proc_status(pid, "Groups:")),
        sorted(id(&["-G", user]))
    );
    for caps in ["CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(proc_status(pid, caps), "0000000000000000", "{caps}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_user_that_rewrites_its_inputs_is_refused_and_changes_no_later_job() {
    let Some(user) = crate::harness::unprivileged_user() else {
        return;
    };
    let placement = crate::untrusted_inputs::rewritten_inputs_do_not_reach_the_next_job(
        &farm(user).await,
        None,
        true,
    )
    .await;
    assert!(
        placement.contains("placement=\"link\"") || placement.contains("placement=link"),
        "{placement}"
    );
}

/// Waits for a worker that must refuse to start; returns its log.
fn refused(mut worker: crate::harness::Proc) -> String {
    let code = worker.wait_exit(Duration::from_secs(30));
    assert_ne!(code, Some(0), "{}", worker.log_text());
    worker.log_text()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_as_naming_no_user_or_a_worker_that_cannot_switch_stops_the_worker() {
    let Some(user) = crate::harness::unprivileged_user() else {
        return;
    };
    let farm = farm(user).await;
    let nobody = farm.config_variant("nobody", |text| {
        text.replace(
            &format!("run_as = \"{user}\""),
            "run_as = \"no-such-renderq-user\"",
        )
    });
    let log = refused(farm.spawn_with("worker", &[], &nobody));
    assert!(log.contains("`worker.run_as`"), "{log}");
    assert!(log.contains("no user `no-such-renderq-user`"), "{log}");

    // A work_dir, or a command's program, the job user cannot reach: the
    // worker says so at start rather than failing every job.
    let dir = farm.dir.path().to_owned();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let log = refused(farm.spawn_with("worker", &[], &farm.config));
    assert!(
        log.contains("`worker.run_as`: jobs cannot reach work_dir"),
        "{log}"
    );
    assert!(
        log.contains(&format!("{user} cannot pass {}", dir.display())),
        "{log}"
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = dir.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let hidden = private.join("python3");
    std::fs::write(&hidden, format!("#!/bin/sh\nexec {} \"$@\"\n", python())).unwrap();
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o755)).unwrap();
    let unreachable = farm.config_variant("unreachable", |text| {
        text.replacen(
            &format!("program = \"{}\"", python()),
            &format!("program = \"{}\"", hidden.display()),
            1,
        )
    });
    let log = refused(farm.spawn_with("worker", &[], &unreachable));
    assert!(
        log.contains("`commands.list_inputs.program`: cannot be run as worker.run_as"),
        "{log}"
    );

    // The worker itself unprivileged, asked to run jobs as a user.
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{user}:{user}")])
        .arg(farm.dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let log = refused(farm.spawn_as(Some(user), "worker", &[], &farm.config));
    assert!(log.contains("`worker.run_as`"), "{log}");
    assert!(log.contains("cannot run jobs as renderq-test"), "{log}");
    assert!(log.contains("CAP_SETUID"), "{log}");
    assert!(
        files_under(&farm.work_dir()).is_empty(),
        "a refused worker left files: {:?}",
        files_under(&farm.work_dir())
    );

    // As root without run_as: it says once that jobs run as root.
    let plain = farm.config_variant("plain", |text| {
        text.replace(&format!("run_as = \"{user}\""), "")
    });
    let worker = farm.spawn_with("worker", &[], &plain);
    worker.wait_for_log("jobs run as root", Duration::from_secs(30));
    let log = worker.log_text();
    assert_eq!(log.matches("jobs run as root").count(), 1, "{log}");
    assert!(log.contains("WARN"), "{log}");
}
