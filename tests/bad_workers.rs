//! Bad workers: a worker whose every job fails (here: a `process` command
//! that exits 1 only where an environment variable says the disk is
//! full) gives a job back unrun after failing it `blocklist_after` times,
//! stops taking jobs after `sick_after` consecutive failures (saying so in
//! an event, on `/healthz` and to its autoscaling group), and the jobs
//! all end on the healthy worker beside it without losing a try to it.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Backend, Farm, Proc, Settings, free_port};

const LONG: Duration = Duration::from_secs(60);

/// The command, and a queue for the submitter's own worker to listen to.
const FLAKY: &str = r#"
[commands.flaky]
kind = "process"
program = "sh"
args = ["-c", 'if [ -n "$RENDERQ_TEST_DISK_FULL" ]; then echo "disk full" >&2; exit 1; fi']
env = ["RENDERQ_TEST_DISK_FULL"]

[queues.elsewhere]
backend = "local"
path = "elsewhere"

[events.targets.audit]
kind = "file"
path = "events.jsonl"
"#;

const BROKEN: [(&str, &str); 1] = [("RENDERQ_TEST_DISK_FULL", "1")];

fn settings(worker_toml: &str) -> Settings {
    Settings {
        max_receive_count: 5,
        retry_delay: "200ms",
        extra_allowed: vec!["flaky"],
        extra_toml: FLAKY.into(),
        worker_toml: worker_toml.into(),
        health_toml: "",
        ..Settings::default()
    }
}

/// `serve` as a submitter only: its worker listens to another queue, and
/// `worker_toml` (the workers' own settings) is left out.
async fn submitter(farm: &Farm, worker_toml: &str) -> Proc {
    let config = farm.config_variant("submitter", |text| {
        text.replace("listen_queue = \"renders\"", "listen_queue = \"elsewhere\"")
            .replace(worker_toml, "")
    });
    farm.serve_with(&[], &config).await
}

/// A worker with its metrics listener (for `/healthz`) on a port of its
/// own; `env` makes it broken.
fn worker(farm: &Farm, name: &str, env: &[(&str, &str)]) -> (Proc, u16) {
    let port = free_port();
    let config = farm.config_variant(name, |text| {
        format!("{text}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
    });
    let worker = farm.spawn_with("worker", env, &config);
    worker.wait_for_log("Serving /metrics.", LONG);
    (worker, port)
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

async fn health(port: u16) -> (u16, String) {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The scenario, on a farm made with `settings(worker_toml)`; returns the
/// bad worker, which is sick by then.
async fn twenty_jobs_beside_a_bad_worker(farm: &Farm, worker_toml: &str) -> Proc {
    let _submitter = submitter(farm, worker_toml).await;
    let (bad, bad_port) = worker(farm, "bad", &BROKEN);
    assert_eq!(health(bad_port).await.0, 200);

    // Alone, it fails the first job twice, then gives it back unrun.
    let first = farm
        .submit(json!({"command": "flaky", "parameters": {}}))
        .await;
    let declined = farm
        .wait_for_events(
            |e| e["type"] == "JobRequeued" && e["message_id"] == first.as_str(),
            1,
            LONG,
        )
        .await;
    assert!(
        declined[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("failed the job 2 times"),
        "{declined:?}"
    );
    let bad_id = declined[0]["worker"]["id"].clone();
    let events = farm.events();
    let failed = of_type(&events, "JobFailed");
    assert_eq!(failed.len(), 2, "no third try: {failed:?}");

    // Three more jobs' failures make five in a row: it stops.
    let mut ids = vec![first.clone()];
    for _ in 1..20 {
        ids.push(
            farm.submit(json!({"command": "flaky", "parameters": {}}))
                .await,
        );
    }
    let unhealthy = farm
        .wait_for_events(|e| e["type"] == "WorkerUnhealthy", 1, LONG)
        .await;
    assert_eq!(unhealthy[0]["worker"]["id"], bad_id);
    assert_eq!(unhealthy[0]["detail"]["tries"], 5);
    assert!(
        unhealthy[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("disk full"),
        "{unhealthy:?}"
    );
    let (code, text) = health(bad_port).await;
    assert_eq!(code, 503);
    assert!(text.contains("5 consecutive failed tries"), "{text}");

    // The healthy worker runs all twenty; the bad one runs nothing more.
    let (_healthy, _) = worker(farm, "healthy", &[]);
    let succeeded = farm
        .wait_for_events(|e| e["type"] == "JobSucceeded", 20, LONG)
        .await;
    assert!(succeeded.iter().all(|e| e["worker"]["id"] != bad_id));
    let mut done: Vec<&str> = succeeded
        .iter()
        .map(|e| e["message_id"].as_str().unwrap())
        .collect();
    done.sort_unstable();
    done.dedup();
    ids.sort_unstable();
    assert_eq!(done, ids.iter().map(String::as_str).collect::<Vec<_>>());
    let events = farm.events();
    assert!(of_type(&events, "JobDeadLettered").is_empty());
    // The fifth failure closes the slot; the one job its slot had already
    // started beside that failure's settle (the slot's next job runs while
    // its previous one settles) may still fail, nothing after.
    let failures = of_type(&events, "JobFailed").len();
    assert!((5..=6).contains(&failures), "{failures} failures");
    // The first job's hand-backs used no try: two failures, then the
    // third try succeeded.
    let first_done = succeeded
        .iter()
        .find(|e| e["message_id"] == first.as_str())
        .unwrap();
    assert_eq!(first_done["attempt"], 3);
    // It still says why, and the monitor's worker list says so too.
    assert_eq!(health(bad_port).await.0, 503);
    bad
}

async fn a_bad_worker_gives_jobs_back_then_stops(backend: Backend) {
    let farm = Farm::new(backend, settings("")).await;
    let mut bad = twenty_jobs_beside_a_bad_worker(&farm, "").await;
    assert!(bad.log_text().contains("Worker unhealthy"));
    assert_eq!(
        bad.child.try_wait().unwrap(),
        None,
        "it waits to be restarted"
    );
}

scenarios!(a_bad_worker_gives_jobs_back_then_stops);

#[tokio::test(flavor = "multi_thread")]
async fn a_sick_worker_in_an_autoscaling_group_marks_its_instance_unhealthy() {
    let endpoint = crate::harness::Moto::shared().endpoint();
    let client = crate::fleet::autoscaling_client(&endpoint).await;
    let group = format!("sick-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    client
        .create_launch_configuration()
        .launch_configuration_name(&group)
        .image_id("ami-12c6146b")
        .instance_type("g5.xlarge")
        .send()
        .await
        .unwrap();
    client
        .create_auto_scaling_group()
        .auto_scaling_group_name(&group)
        .launch_configuration_name(&group)
        .min_size(1)
        .max_size(1)
        .desired_capacity(1)
        .availability_zones("us-east-1a")
        .send()
        .await
        .unwrap();
    let describe = || async {
        client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(&group)
            .send()
            .await
            .unwrap()
            .auto_scaling_groups()[0]
            .instances()[0]
            .clone()
    };
    let instance = describe().await;
    assert_eq!(instance.health_status(), Some("Healthy"));
    let imds = crate::fleet::FakeImds::start().await;
    imds.set_instance_id(instance.instance_id().unwrap());
    let worker_toml = format!(
        "imds = \"{}\"\n[worker.autoscaling]\ngroup = \"{group}\"\nprotect_when_busy = false\nendpoint_url = \"{endpoint}\"\nregion = \"us-east-1\"\n",
        imds.url()
    );
    let mut farm = Farm::new(Backend::Local, settings(&worker_toml)).await;
    farm.env = (crate::harness::AWS_ENV.iter())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let bad = twenty_jobs_beside_a_bad_worker(&farm, &worker_toml).await;
    let deadline = Instant::now() + LONG;
    while describe().await.health_status() != Some("Unhealthy") {
        assert!(
            Instant::now() < deadline,
            "never marked unhealthy:\n{}",
            bad.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(bad.log_text().contains("Instance marked unhealthy"));
}

#[test]
fn a_zero_or_negative_threshold_is_refused_naming_its_key() {
    for (line, key) in [
        ("blocklist_after = 0", "worker.blocklist_after"),
        ("sick_after = 0", "worker.sick_after"),
        ("sick_after = -1", "worker.sick_after"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workers.toml");
        std::fs::write(
            &path,
            format!(
                "[queue_manager]\nallow_commands = [\"get_version\"]\ndefault_queue = \"q\"\nlisten_queue = \"q\"\n[worker]\n{line}\n[queues.q]\nbackend = \"local\"\npath = \"q\"\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(crate::harness::BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{line} was taken");
        assert!(stderr.contains(&format!("`{key}`")), "{line}: {stderr}");
    }
}
