//! Usage and cost (SPEC §13): what a try used in its end event, the
//! slot's GPU from `nvidia-smi` (and one that hangs), its cost at the
//! instance's price in the event, the status table and `renderq status`,
//! arrays summing their children, budgets, and bad prices and budgets.

use std::time::Duration;

use serde_json::{Value, json};

use crate::fleet::FakeImds;
use crate::harness::{Backend, Farm, Settings, repo_path};

const LONG: Duration = Duration::from_secs(90);
const MIB: f64 = 1024.0 * 1024.0;

/// Commands for these tests: `use_memory` allocates and burns CPU,
/// itself or in a child it waits for; `nap` sleeps as a process.
fn commands() -> String {
    format!(
        r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"

[commands.use_memory]
kind = "process"
program = "python3"
args = ["{fixture}", "{{mode}}", "{{mb}}", "{{seconds}}"]
[commands.use_memory.parameters]
mode = {{ type = "string", enum = ["self", "child"] }}
mb = {{ type = "integer", min = 1 }}
seconds = {{ type = "number", min = 0 }}

[commands.nap]
kind = "process"
program = "sleep"
args = ["{{seconds}}"]
[commands.nap.parameters]
seconds = {{ type = "integer", min = 0, default = 1 }}
"#,
        fixture = repo_path("tests/fixtures/use_memory.py"),
    )
}

fn settings(worker: &str, more: &str) -> Settings {
    Settings {
        extra_toml: format!("{}{more}", commands()),
        extra_allowed: vec!["use_memory", "nap"],
        worker_toml: worker.into(),
        ..Settings::default()
    }
}

/// The message's job id, from the events (the submit returns the message
/// id).
fn job_id_of(farm: &Farm, message_id: &str) -> String {
    farm.events()
        .iter()
        .find(|e| e["message_id"] == message_id)
        .and_then(|e| e["job_id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| message_id.to_owned())
}

async fn succeeded(farm: &Farm, message_id: &str) -> Value {
    farm.wait_for_events(
        |e| e["type"] == "JobSucceeded" && e["message_id"] == message_id,
        1,
        LONG,
    )
    .await
    .remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_and_a_child_it_forks_are_measured() {
    let farm = Farm::new(Backend::Local, settings("slots = 2", "")).await;
    let _serve = farm.serve(&[]).await;
    for mode in ["self", "child"] {
        let id = farm
            .submit(json!({"command": "use_memory",
                           "parameters": {"mode": mode, "mb": 300, "seconds": 1.0}}))
            .await;
        let event = succeeded(&farm, &id).await;
        let usage = &event["detail"]["usage"];
        let peak = usage["peak_rss_bytes"].as_f64().unwrap_or(0.0) / MIB;
        assert!(
            (270.0..=330.0).contains(&peak),
            "{mode}: peak RSS {peak:.0} MiB is not within 10 % of 300: {usage}"
        );
        let cpu = usage["cpu_s"].as_f64().unwrap_or(0.0);
        assert!(cpu >= 0.9, "{mode}: CPU {cpu} s: {usage}");
        assert!(usage["wall_s"].as_f64().unwrap() >= cpu * 0.9, "{usage}");
        // Off EC2 and without prices: neither instance nor cost.
        assert!(usage.get("instance_type").is_none(), "{usage}");
        assert!(usage.get("cost_usd").is_none(), "{usage}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adaptor_run_is_measured_on_its_own() {
    let adaptor = format!(
        r#"
[commands.hog]
kind = "adaptor"
program = "{}"
[commands.hog.parameters]
mb = {{ type = "integer", min = 1 }}
seconds = {{ type = "number", min = 0 }}
"#,
        repo_path("tests/fixtures/usage_adaptor.py")
    );
    let mut settings = settings("slots = 1", &adaptor);
    settings.extra_allowed.push("hog");
    let farm = Farm::new(Backend::Local, settings).await;
    let _serve = farm.serve(&[]).await;
    let (mut cpus, mut peaks) = (Vec::new(), Vec::new());
    // One process runs both: the second run's peak is its own, not the
    // first's.
    for (mb, seconds) in [(300, 1.0), (50, 0.0)] {
        let id = farm
            .submit(json!({"command": "hog", "parameters": {"mb": mb, "seconds": seconds}}))
            .await;
        let usage = succeeded(&farm, &id).await["detail"]["usage"].clone();
        let cpu = usage["cpu_s"].as_f64().unwrap_or(-1.0);
        // No upper bound of its own: touching 300 MiB costs CPU (page
        // faults, zeroing) that a loaded virtual machine inflates (1 s on
        // CI, 2.7 s on a clean-clone run here).
        assert!(cpu >= seconds * 0.9, "{usage}");
        cpus.push(cpu);
        peaks.push(usage["peak_rss_bytes"].as_f64().unwrap_or(0.0) / MIB);
    }
    // The second run burns no CPU and touches a sixth of the memory: a
    // figure counted from the adaptor's start would be at least the
    // first's, one of its own is below it by more than the burnt second.
    assert!(cpus[1] < cpus[0] - 0.5, "{cpus:?}");
    assert!((270.0..=330.0).contains(&peaks[0]), "{peaks:?}");
    assert!(peaks[1] >= 50.0 && peaks[1] < 120.0, "{peaks:?}");
}

/// A fake `nvidia-smi` with one GPU using 7 GiB at 80 %; its queries hang
/// while `FAKE_GPU=hang`. Returns `PATH` with it first.
fn fake_gpu(farm: &Farm) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = farm.dir.path().join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("nvidia-smi");
    std::fs::write(
        &script,
        r#"#!/bin/sh
case "$*" in
  *--query-gpu=index,uuid,name,memory.total*) echo "0, GPU-11111111-aaaa, NVIDIA L4, 23034" ;;
  *--query-gpu=index,utilization.gpu,memory.used*)
    if [ "$FAKE_GPU" = hang ]; then exec sleep 20; fi
    echo "0, 80, 7168" ;;
  *) exit 2 ;;
esac
"#,
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_slots_gpu_memory_is_in_the_event_and_a_hanging_nvidia_smi_delays_nothing() {
    let farm = Farm::new(Backend::Local, settings("gpus = \"auto\"", "")).await;
    let path = fake_gpu(&farm);
    let serve = farm.serve(&[("PATH", &path)]).await;
    let id = farm
        .submit(json!({"command": "nap", "parameters": {"seconds": 1}}))
        .await;
    let usage = succeeded(&farm, &id).await["detail"]["usage"].clone();
    assert_eq!(usage["gpu_memory_peak_bytes"], json!(7u64 << 30), "{usage}");
    assert!(
        (usage["gpu_utilization_mean"].as_f64().unwrap() - 0.8).abs() < 1e-9,
        "{usage}"
    );
    drop(serve);

    let serve = farm.serve(&[("PATH", &path), ("FAKE_GPU", "hang")]).await;
    // Longer than the query's bound (2 s): it is cut off while the job runs.
    for _ in 0..2 {
        let id = farm
            .submit(json!({"command": "nap", "parameters": {"seconds": 3}}))
            .await;
        let event = succeeded(&farm, &id).await;
        let usage = &event["detail"]["usage"];
        assert!(usage.get("gpu_memory_peak_bytes").is_none(), "{usage}");
        assert!(usage["cpu_s"].is_number(), "the rest is there: {usage}");
        // Not held for the hanging query.
        let took = event["detail"]["duration_ms"].as_u64().unwrap();
        assert!(took < 3700, "the job took {took} ms");
    }
    let warnings = serve
        .log_text()
        .matches("cannot read the slot's GPU: usage without GPU figures")
        .count();
    assert_eq!(warnings, 1, "{}", serve.log_text());
}

/// The IMDS stand-in's g5.xlarge at $3.06/h on demand, shared by 2 slots.
fn priced_settings(imds: &FakeImds) -> Settings {
    settings(
        &format!("slots = 2\nimds = \"{}\"", imds.url()),
        "[fleet.price]\n\"g5.xlarge\" = { on_demand = 3.06, spot = 1.0 }\n",
    )
}

/// `name=value` of a `renderq status` line.
fn field(line: &str, name: &str) -> Option<f64> {
    line.split('\t')
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ten_second_job_on_half_a_306_instance_costs_000425_and_an_array_sums() {
    let imds = FakeImds::start().await;
    let farm = Farm::new(Backend::Local, priced_settings(&imds)).await;
    let _serve = farm.serve(&[]).await;
    let id = farm
        .submit(json!({"command": "nap", "parameters": {"seconds": 10}}))
        .await;
    let event = succeeded(&farm, &id).await;
    let usage = &event["detail"]["usage"];
    assert_eq!(usage["instance_type"], "g5.xlarge", "{usage}");
    assert_eq!(usage["lifecycle"], "on-demand", "{usage}");
    let cost = usage["cost_usd"].as_f64().unwrap();
    // 10 s × $3.06/h ÷ 2 slots, and the milliseconds `sleep` takes to
    // start and exit on a busy machine (up to 1 %).
    assert!((0.00425..0.0043).contains(&cost), "{cost}: {usage}");
    let job_id = job_id_of(&farm, &id);
    // The status table is written a batch at a time: wait for the end.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let out = loop {
        let (code, out, err) = farm.cli(&["status", &job_id]);
        assert_eq!(code, 0, "{err}");
        if out.contains("cost_usd=") || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let shown = field(out.trim(), "cost_usd").unwrap_or_else(|| panic!("{out}"));
    assert!((shown - cost).abs() < 1e-6, "{out}");
    assert!(out.contains("instance_type=g5.xlarge"), "{out}");
    let reply = farm
        .rpc("queue_manager_job_status", json!({"job_id": job_id}))
        .await;
    let table = reply["result"]["cost_usd"].as_f64();
    assert!(table.is_some_and(|t| (t - cost).abs() < 1e-12), "{reply}");

    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "nap", "frames": "1-3", "parameters": {"seconds": 1}}),
        )
        .await;
    let array_id = reply["result"]["job_id"].as_str().unwrap().to_owned();
    farm.wait_for_events(
        |e| e["type"] == "ArrayJobCompleted" && e["job_id"] == array_id.as_str(),
        1,
        LONG,
    )
    .await;
    let children: f64 = farm
        .events()
        .iter()
        .filter(|e| e["type"] == "JobSucceeded" && e["array"]["job_id"] == array_id.as_str())
        .map(|e| e["detail"]["usage"]["cost_usd"].as_f64().unwrap())
        .sum();
    assert!(children > 3.0 * 0.000425 * 0.99, "{children}");
    farm.final_status(&array_id).await;
    let (code, out, err) = farm.cli(&["status", &array_id]);
    assert_eq!(code, 0, "{err}");
    let shown = field(out.trim(), "cost_usd").unwrap_or_else(|| panic!("{out}"));
    assert!(
        (shown - children).abs() < 1e-6,
        "{shown} vs {children}: {out}"
    );
}

#[test]
fn a_bad_price_is_a_config_error_naming_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    let base =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/workers.toml")).unwrap();
    for (table, key) in [
        ("per_hour = -3", "fleet.price.per_hour"),
        ("\"g5.xlarge\" = \"three\"", "fleet.price.\"g5.xlarge\""),
        (
            "\"g5.xlarge\" = { reserved = 1.0 }",
            "fleet.price.\"g5.xlarge\".reserved",
        ),
    ] {
        std::fs::write(&path, format!("{base}\n[fleet.price]\n{table}\n")).unwrap();
        let out = std::process::Command::new(crate::harness::BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{table}");
        assert!(stderr.contains(key), "{table}: {stderr}");
    }
}

scenarios!(a_budget_stops_an_array_within_one_child_and_is_reached_once);

async fn a_budget_stops_an_array_within_one_child_and_is_reached_once(backend: Backend) {
    let imds = FakeImds::start().await;
    let farm = Farm::new(
        backend,
        Settings {
            // On SQS a heartbeat a second.
            visibility_timeout: match backend {
                Backend::Local => "30s",
                Backend::Sqs => "3s",
            },
            ..priced_settings(&imds)
        },
    )
    .await;
    let _serve = farm.serve(&[]).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "nap", "frames": "1-100", "parameters": {"seconds": 1},
                   "budget": {"usd": 0.01}}),
        )
        .await;
    let array_id = reply["result"]["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"))
        .to_owned();
    let of_array = |e: &Value| e["array"]["job_id"] == array_id.as_str();
    let ended = |e: &Value, kind: &str| of_array(e) && e["type"] == kind;
    farm.wait_for_events(
        |e| e["type"] == "BudgetReached" && e["job_id"] == array_id.as_str(),
        1,
        Duration::from_secs(120),
    )
    .await;
    // The children not started stay out of the queue, held in the ledger
    // (an `ArrayJobCompleted` waits for a release): moved there at once on
    // the embedded queue, at receive on SQS.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let events = farm.events();
        let count = |kind: &str| events.iter().filter(|e| ended(e, kind)).count();
        if count("JobSucceeded") + count("JobHeld") == 100 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} succeeded and {} held",
            count("JobSucceeded"),
            count("JobHeld")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = farm.events();
    let reached: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "BudgetReached")
        .collect();
    assert_eq!(reached.len(), 1, "{reached:?}");
    assert_eq!(reached[0]["job_id"], array_id.as_str());
    assert_eq!(reached[0]["detail"]["budget_usd"], 0.01);
    assert_eq!(reached[0]["detail"]["stopped"], "held");
    let costs: Vec<f64> = events
        .iter()
        .filter(|e| of_array(e))
        .filter_map(|e| e["detail"]["usage"]["cost_usd"].as_f64())
        .collect();
    let child = 0.000425;
    let spent: f64 = costs.iter().sum();
    assert!(spent >= 0.01, "stopped before the budget: {spent}");
    // Children running when it was reached finish: two slots, each of
    // which may also have received its next child already.
    assert!(
        spent < 0.01 + 3.0 * child,
        "ran on past the budget by more than the children in hand: {spent} ({} tries)",
        costs.len()
    );
    let succeeded = events
        .iter()
        .filter(|e| of_array(e) && e["type"] == "JobSucceeded")
        .count();
    // $0.01 at $0.000425 a child: the 24th reaches it.
    assert!((23..=27).contains(&succeeded), "{succeeded} children ran");
    // It stops starting children within one child (a slot's next one,
    // received before the budget was reached) of the budget.
    let reached_at = crate::harness::event_millis(reached[0]);
    let started_after = events
        .iter()
        .filter(|e| of_array(e) && e["type"] == "JobStarted")
        .filter(|e| crate::harness::event_millis(e) > reached_at)
        .count();
    assert!(
        started_after <= 2,
        "{started_after} children started after the budget was reached"
    );
    assert!(
        !events
            .iter()
            .any(|e| e["type"] == "ArrayJobCompleted" && e["job_id"] == array_id.as_str()),
        "completed while held"
    );
    let started = events
        .iter()
        .filter(|e| of_array(e) && e["type"] == "JobStarted")
        .count();
    assert!(started <= succeeded + 2, "{started} started");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_below_zero_or_on_a_single_job_is_refused_naming_the_field() {
    let farm = Farm::new(Backend::Local, settings("", "")).await;
    let _serve = farm.serve(&[]).await;
    for (job, field) in [
        (
            json!({"command": "nap", "frames": "1-3", "budget": {"usd": -1}}),
            "budget.usd",
        ),
        (json!({"command": "nap", "budget": {"usd": 5}}), "budget"),
    ] {
        let reply = farm.rpc("queue_manager_submit_job", job.clone()).await;
        assert_eq!(reply["error"]["code"], -32602, "{job}: {reply}");
        assert!(reply["error"].to_string().contains(field), "{reply}");
    }
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "nap", "frames": "1-3", "budget": {"dollars": 5}}),
        )
        .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
}
