//! The fleet runtime: spot and autoscaling notices from a stand-in for the
//! EC2 instance metadata service, draining to a deadline, and signals.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use nix::sys::signal::Signal;
use serde_json::json;

use crate::harness::{Backend, Farm, Settings, alive, free_port};

const LONG: Duration = Duration::from_secs(60);

/// A local IMDSv2: a token, an instance id, and the two notices the test
/// sets.
#[derive(Clone, Default)]
pub struct FakeImds {
    /// The body of `spot/instance-action`, 404 while `None`.
    spot: Arc<Mutex<Option<String>>>,
    /// `autoscaling/target-lifecycle-state`.
    lifecycle: Arc<Mutex<String>>,
    /// `instance-id`.
    instance_id: Arc<Mutex<String>>,
    /// Every request, the token's included, is answered 503 until then.
    unavailable_until: Arc<Mutex<Option<Instant>>>,
    /// The body of `events/recommendations/rebalance`, 404 while `None`.
    rebalance: Arc<Mutex<Option<String>>>,
    /// The token `PUT` is answered 403.
    refuse_token: Arc<std::sync::atomic::AtomicBool>,
    port: u16,
}

impl FakeImds {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let imds = FakeImds {
            lifecycle: Arc::new(Mutex::new("InService".into())),
            instance_id: Arc::new(Mutex::new("i-0abc".into())),
            port: listener.local_addr().unwrap().port(),
            ..FakeImds::default()
        };
        let token_ok = |headers: &HeaderMap| headers.get("x-aws-ec2-metadata-token").is_some();
        let rebalance = imds.rebalance.clone();
        let (spot, lifecycle, instance, until, refuse) = (
            imds.spot.clone(),
            imds.lifecycle.clone(),
            imds.instance_id.clone(),
            imds.unavailable_until.clone(),
            imds.refuse_token.clone(),
        );
        let unavailable = axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let down = until.lock().unwrap().is_some_and(|t| Instant::now() < t);
                async move {
                    if down {
                        StatusCode::SERVICE_UNAVAILABLE.into_response()
                    } else {
                        next.run(request).await
                    }
                }
            },
        );
        let app = axum::Router::new()
            .route(
                "/latest/api/token",
                put(move || {
                    let refused = refuse.load(std::sync::atomic::Ordering::SeqCst);
                    async move {
                        if refused {
                            return StatusCode::FORBIDDEN.into_response();
                        }
                        (
                            [("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
                            "token-1",
                        )
                            .into_response()
                    }
                }),
            )
            .route(
                "/latest/meta-data/instance-id",
                get(move |h: HeaderMap| {
                    let id = instance.lock().unwrap().clone();
                    async move {
                        if token_ok(&h) {
                            (StatusCode::OK, id)
                        } else {
                            (StatusCode::UNAUTHORIZED, String::new())
                        }
                    }
                }),
            )
            // For usage and cost: a g5.xlarge bought on demand.
            .route(
                "/latest/meta-data/instance-type",
                get(|| async { "g5.xlarge" }),
            )
            .route(
                "/latest/meta-data/instance-life-cycle",
                get(|| async { "on-demand" }),
            )
            .route(
                "/latest/meta-data/spot/instance-action",
                get(move |h: HeaderMap| {
                    let spot = spot.lock().unwrap().clone();
                    async move {
                        match (token_ok(&h), spot) {
                            (false, _) => (StatusCode::UNAUTHORIZED, String::new()),
                            (true, Some(body)) => (StatusCode::OK, body),
                            (true, None) => (StatusCode::NOT_FOUND, String::new()),
                        }
                    }
                }),
            )
            .route(
                "/latest/meta-data/events/recommendations/rebalance",
                get(move || {
                    let body = rebalance.lock().unwrap().clone();
                    async move {
                        match body {
                            Some(body) => (StatusCode::OK, body),
                            None => (StatusCode::NOT_FOUND, String::new()),
                        }
                    }
                }),
            )
            .route(
                "/latest/meta-data/autoscaling/target-lifecycle-state",
                get(move || {
                    let state = lifecycle.lock().unwrap().clone();
                    async move { state }
                }),
            )
            .layer(unavailable);
        tokio::spawn(async move { axum::serve(listener, app).await });
        imds
    }

    /// Names the instance `instance-id` answers with.
    pub fn set_instance_id(&self, id: &str) {
        *self.instance_id.lock().unwrap() = id.to_owned();
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A spot interruption `seconds` from now.
    pub fn interrupt_in(&self, seconds: i64) {
        let at = (chrono::Utc::now() + chrono::Duration::seconds(seconds))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        *self.spot.lock().unwrap() = Some(json!({"action": "terminate", "time": at}).to_string());
    }
}

/// A queue no worker of these tests listens to, for the submitter's own
/// worker.
const ELSEWHERE: &str = r#"
[queues.elsewhere]
backend = "local"
path = "elsewhere"
"#;

/// `serve` as a submitter only: its worker listens to another queue, and
/// it watches no IMDS.
async fn submitter(farm: &Farm, imds: &FakeImds) -> crate::harness::Proc {
    let config = farm.config_variant("submitter", |text| {
        text.replace("listen_queue = \"renders\"", "listen_queue = \"elsewhere\"")
            .replace(&format!("imds = \"{}\"", imds.url()), "")
    });
    farm.serve_with(&[], &config).await
}

/// Two `sleep 11` commands that report no progress: one usually takes
/// 10 s, the other a minute.
const TYPICAL: &str = r#"
[commands.usually_10s]
kind = "process"
program = "sleep"
args = ["11"]
typical_duration = "10s"

[commands.usually_60s]
kind = "process"
program = "sleep"
args = ["11"]
typical_duration = "60s"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_job_is_judged_by_its_commands_typical_duration() {
    let imds = FakeImds::start().await;
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: format!("{TYPICAL}{ELSEWHERE}{}", crate::harness::AUDIT_AND_ASSETS),
            extra_allowed: vec!["usually_10s", "usually_60s"],
            ..fleet_settings(&imds, "slots = 2")
        },
    )
    .await;
    let _submitter = submitter(&farm, &imds).await;
    let mut worker = farm.spawn("worker", &[]);
    worker.wait_for_log("Watching instance metadata", LONG);
    let fits = farm.submit(json!({"command": "usually_10s"})).await;
    let long = farm.submit(json!({"command": "usually_60s"})).await;
    farm.wait_for_events(|e| e["type"] == "JobStarted", 2, LONG)
        .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    // 8 s in, a notice due in 20 s: 2 s left of 10 fits, 52 s of 60 not.
    imds.interrupt_in(20);
    let back = farm
        .wait_for_events(|e| e["type"] == "JobRequeued", 1, LONG)
        .await;
    assert_eq!(back[0]["message_id"], long.as_str(), "{back:?}");
    let done = farm
        .wait_for_events(|e| e["type"] == "JobSucceeded", 1, LONG)
        .await;
    assert_eq!(done[0]["message_id"], fits.as_str(), "{done:?}");
    assert_eq!(worker.wait_exit(LONG), Some(0), "{}", worker.log_text());
    assert_eq!(farm.stats().0, 1, "the long job is queued again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_recommendation_stops_taking_jobs_and_lets_the_running_one_finish() {
    let imds = FakeImds::start().await;
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: format!("{ELSEWHERE}{}", crate::harness::AUDIT_AND_ASSETS),
            ..fleet_settings(&imds, "rebalance = \"finish-current\"")
        },
    )
    .await;
    let _submitter = submitter(&farm, &imds).await;
    let mut worker = farm.spawn("worker", &[]);
    worker.wait_for_log("Watching instance metadata", LONG);
    let running = farm
        .submit(json!({"command": "sleep", "parameters": {"seconds": 3}}))
        .await;
    worker.wait_for_log("Executing command: sleep.", LONG);
    *imds.rebalance.lock().unwrap() = Some(r#"{"noticeTime": "2026-12-03T20:00:00Z"}"#.into());
    worker.wait_for_log("Stop requested.", LONG);
    assert!(worker.log_text().contains("rebalance recommendation"));
    let later = farm.submit(json!({"command": "get_version"})).await;
    assert_eq!(worker.wait_exit(LONG), Some(0), "{}", worker.log_text());
    let ended: Vec<_> = farm
        .events()
        .into_iter()
        .filter(|e| e["type"] == "JobSucceeded" || e["type"] == "JobRequeued")
        .collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0]["type"], "JobSucceeded");
    assert_eq!(ended[0]["message_id"], running.as_str());
    assert_eq!(farm.stats().0, 1, "{later} waits for another worker");
}

/// A folder of DMI data: an EC2 instance's, or (`None`) another machine's.
fn dmi(vendor: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sys_vendor"), vendor.unwrap_or("QEMU")).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn on_ec2_an_imds_down_at_boot_is_read_again_and_a_later_notice_is_acted_on() {
    let imds = FakeImds::start().await;
    *imds.unavailable_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(3));
    let started = Instant::now();
    let ec2 = dmi(Some("Amazon EC2\n"));
    let elsewhere = dmi(None);
    let farm = Farm::new(
        Backend::Local,
        Settings {
            worker_toml: "imds = \"auto\"\nstop_margin = \"1s\"".into(),
            ..Settings::default()
        },
    )
    .await;
    let url = imds.url();
    let (ec2_dir, elsewhere_dir) = (
        ec2.path().display().to_string(),
        elsewhere.path().display().to_string(),
    );
    let on_ec2 = farm.spawn(
        "worker",
        &[
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &url),
            ("RENDERQ_DMI_DIR", &ec2_dir),
        ],
    );
    let off_ec2 = farm.spawn(
        "worker",
        &[
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &url),
            ("RENDERQ_DMI_DIR", &elsewhere_dir),
        ],
    );
    off_ec2.wait_for_log("not on EC2: not watching", LONG);
    on_ec2.wait_for_log("Watching instance metadata", LONG);
    assert!(started.elapsed() >= Duration::from_secs(3));
    let at_5s = Duration::from_secs(5).saturating_sub(started.elapsed());
    tokio::time::sleep(at_5s).await;
    imds.interrupt_in(30);
    let noticed = Instant::now();
    on_ec2.wait_for_log("Stop requested.", LONG);
    let acted = noticed.elapsed();
    assert!(acted < Duration::from_secs(1), "acted on after {acted:?}");
    let log = on_ec2.log_text();
    assert_eq!(
        log.matches("Instance metadata not answering").count(),
        1,
        "one warning:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    println!(
        "spot notice on a simulated EC2 whose IMDS was down at boot: acted on after {acted:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_is_a_notice_due_now_plus_the_margin() {
    let imds = FakeImds::start().await;
    imds.refuse_token
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let farm = Farm::new(Backend::Local, fleet_settings(&imds, "")).await;
    let worker = farm.spawn("worker", &[]);
    worker.wait_for_log("IMDS refused a token: taken as a notice", LONG);
    worker.wait_for_log("Stop requested.", LONG);
    let log = worker.log_text();
    let line = log.lines().find(|l| l.contains("Stop requested.")).unwrap();
    assert!(line.contains("spot interruption"), "{line}");
    // stop_margin = "1s": due now plus the margin.
    let in_s: f64 = line
        .split("in_s=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(in_s <= 1.0, "{line}");
}

fn fleet_settings(imds: &FakeImds, extra_worker: &str) -> Settings {
    Settings {
        max_receive_count: 1,
        worker_toml: format!(
            "imds = \"{}\"\nstop_margin = \"1s\"\n{extra_worker}",
            imds.url()
        ),
        ..Settings::default()
    }
}

scenarios!(spot_notice_hands_a_long_job_back_at_once);

async fn spot_notice_hands_a_long_job_back_at_once(backend: Backend) {
    let imds = FakeImds::start().await;
    let farm = Farm::new(backend, fleet_settings(&imds, "")).await;
    let mut first = farm.serve(&[]).await;
    first.wait_for_log("Watching instance metadata", LONG);
    let id = farm
        .submit(json!({"command": "sleep", "parameters": {"seconds": 6},
                       "tasks": [{"name": "s3_upload", "config": {"bucket": "results", "key": "spot/${message_id}.json"}}]}))
        .await;
    first.wait_for_log("Executing command: sleep.", LONG);
    // The second worker is not on a doomed instance.
    let elsewhere = farm.config_variant("elsewhere", |c| {
        c.replace(&format!("imds = \"{}\"", imds.url()), "")
    });
    let second = farm.spawn_with("worker", &[], &elsewhere);
    second.wait_for_log("Worker started.", LONG);

    imds.interrupt_in(4);
    let noticed = Instant::now();
    second.wait_for_log("Received job from queue.", LONG);
    let back_in = noticed.elapsed();
    assert!(
        back_in < Duration::from_secs(2),
        "receivable again after {back_in:?}"
    );
    assert_eq!(
        first.wait_exit(Duration::from_secs(4)),
        Some(0),
        "{}",
        first.log_text()
    );
    assert!(
        noticed.elapsed() < Duration::from_secs(4),
        "exited before the deadline"
    );
    assert!(
        first
            .log_text()
            .contains("Job interrupted, returning to queue.")
    );

    farm.wait_for_object(&format!("spot/{id}.json"), LONG).await;
    // max_receive_count = 1: a counted interruption would have dead-lettered it.
    assert!(
        second.log_text().contains("attempt=1"),
        "{}",
        second.log_text()
    );
    assert_eq!(farm.wait_until_drained(LONG).await, (0, 0, 0));
    println!("spot notice to receivable again: {back_in:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_fits_before_the_deadline_finishes() {
    let imds = FakeImds::start().await;
    let farm = Farm::new(
        Backend::Local,
        fleet_settings(&imds, "unknown_eta = \"run-to-deadline\""),
    )
    .await;
    let mut serve = farm.serve(&[]).await;
    serve.wait_for_log("Watching instance metadata", LONG);
    let id = farm
        .submit(json!({"command": "sleep", "parameters": {"seconds": 1},
                       "tasks": [{"name": "s3_upload", "config": {"bucket": "results", "key": "fit/${message_id}.json"}}]}))
        .await;
    serve.wait_for_log("Executing command: sleep.", LONG);
    imds.interrupt_in(8);
    assert_eq!(
        serve.wait_exit(Duration::from_secs(8)),
        Some(0),
        "{}",
        serve.log_text()
    );
    assert!(
        !serve.log_text().contains("Job interrupted"),
        "{}",
        serve.log_text()
    );
    assert!(farm.object(&format!("fit/{id}.json")).await.is_some());
    assert_eq!(farm.stats(), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn autoscaling_termination_stops_the_worker() {
    let imds = FakeImds::start().await;
    let farm = Farm::new(Backend::Local, fleet_settings(&imds, "")).await;
    let mut serve = farm.serve(&[]).await;
    serve.wait_for_log("Watching instance metadata", LONG);
    *imds.lifecycle.lock().unwrap() = "Terminated".into();
    assert_eq!(serve.wait_exit(LONG), Some(0));
    assert!(
        serve.log_text().contains("autoscaling termination"),
        "{}",
        serve.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_notice_is_taken_on_the_safe_side() {
    let imds = FakeImds::start().await;
    let farm = Farm::new(Backend::Local, fleet_settings(&imds, "")).await;
    let mut serve = farm.serve(&[]).await;
    serve.wait_for_log("Watching instance metadata", LONG);
    *imds.spot.lock().unwrap() = Some("{not json".into());
    assert_eq!(serve.wait_exit(LONG), Some(0));
    let log = serve.log_text();
    assert!(
        log.contains("unreadable spot instance-action") && log.contains("spot interruption"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_imds_url_is_one_warning_no_delay_and_read_again() {
    let port = free_port();
    let farm = Farm::new(
        Backend::Local,
        Settings {
            worker_toml: format!("imds = \"http://127.0.0.1:{port}\""),
            ..Settings::default()
        },
    )
    .await;
    let started = Instant::now();
    let serve = farm.serve(&[]).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "start-up took {:?}",
        started.elapsed()
    );
    // An explicit URL is never given up on, but warned about once.
    serve.wait_for_log("Instance metadata not answering", Duration::from_secs(2));
    let id = farm
        .submit(json!({"command": "get_version", "tasks": [
        {"name": "s3_upload", "config": {"bucket": "results", "key": "u/${message_id}.json"}}]}))
        .await;
    farm.wait_for_object(&format!("u/{id}.json"), LONG).await;
    assert_eq!(
        serve
            .log_text()
            .matches("Instance metadata not answering")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_kills_the_process_tree_before_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: crate::commands::commands_toml(
                &dir.path().join("starts").display().to_string(),
            ),
            extra_allowed: vec!["sleeper"],
            drain_timeout: "60s",
            ..Settings::default()
        },
    )
    .await;
    let mut serve = farm.serve(&[]).await;
    let pidfile = dir.path().join("pids");
    farm.submit(json!({"command": "sleeper", "parameters": {"pidfile": pidfile}}))
        .await;
    let deadline = Instant::now() + LONG;
    while crate::commands::starts(&pidfile).len() < 3 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pids = crate::commands::starts(&pidfile);
    serve.signal(Signal::SIGTERM);
    serve.wait_for_log("Worker stopping", LONG);
    serve.signal(Signal::SIGTERM);
    assert_eq!(serve.wait_exit(Duration::from_secs(5)), Some(130));
    assert!(
        serve
            .log_text()
            .contains("Second signal: killed running commands")
    );
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the second signal");
    }
}

/// `PATH` with the fake `nvidia-smi` (two GPUs) first.
fn fake_gpu_path() -> String {
    format!(
        "{}:{}",
        crate::harness::repo_path("tests/fixtures/fakebin"),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn each_gpu_slot_sees_only_its_gpu() {
    let fixture = crate::harness::repo_path("tests/fixtures/gpu_env.py");
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: format!(
                "[commands.gpu_env]\nkind = \"process\"\nprogram = \"python3\"\nargs = [\"{fixture}\"]\n"
            ),
            extra_allowed: vec!["gpu_env"],
            worker_toml: "gpus = \"auto\"".into(),
            ..Settings::default()
        },
    )
    .await;
    let path = fake_gpu_path();
    let serve = farm.serve(&[("PATH", &path)]).await;
    assert!(serve.log_text().contains("slots=2"), "{}", serve.log_text());
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            farm.submit(json!({"command": "gpu_env", "tasks": [
                {"name": "s3_upload", "config": {"bucket": "results", "key": "gpu/${message_id}.json"}}]}))
                .await,
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    for id in &ids {
        let (bytes, _) = farm.wait_for_object(&format!("gpu/{id}.json"), LONG).await;
        let env: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            env["CUDA_VISIBLE_DEVICES"], env["NVIDIA_VISIBLE_DEVICES"],
            "{env}"
        );
        seen.insert(env["CUDA_VISIBLE_DEVICES"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["0", "1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gpu_that_is_not_there_is_a_config_error() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            worker_toml: "gpus = [0, 3]".into(),
            ..Settings::default()
        },
    )
    .await;
    let out = std::process::Command::new(crate::harness::BIN)
        .args(["check-config", "--config"])
        .arg(&farm.config)
        .env("PATH", fake_gpu_path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`worker.gpus`") && stderr.contains("GPU 3"),
        "{stderr}"
    );
}

/// `/metrics` at `url`, parsed by Prometheus's reference parser.
pub async fn scrape(url: &str) -> serde_json::Map<String, serde_json::Value> {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    let mut parser = std::process::Command::new("python3")
        .arg(crate::harness::repo_path("tests/fixtures/parse_metrics.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    parser
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = parser.wait_with_output().unwrap();
    assert!(out.status.success(), "not Prometheus text:\n{text}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_move_as_jobs_run() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            worker_toml: "gpus = \"auto\"".into(),
            ..Settings::default()
        },
    )
    .await;
    let path = fake_gpu_path();
    let _serve = farm.serve(&[("PATH", &path)]).await;
    let url = format!("{}metrics", farm.url());
    let before = scrape(&url).await;
    assert_eq!(before["renderq_slots"], 2.0);
    for _ in 0..3 {
        let id = farm.submit(json!({"command": "render_demo", "parameters": {"width": 16, "height": 16},
            "tasks": [{"name": "s3_upload", "config": {"bucket": "results", "key": "m/${message_id}.png"}}]})).await;
        farm.wait_for_object(&format!("m/{id}.png"), LONG).await;
    }
    farm.wait_until_drained(LONG).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = scrape(&url).await;
    assert_eq!(
        after["renderq_jobs_total{outcome=\"succeeded\"}"], 3.0,
        "{after:?}"
    );
    assert_eq!(after["renderq_job_duration_seconds_count"], 3.0);
    assert_eq!(
        after["renderq_task_duration_seconds_count{task=\"s3_upload\"}"],
        3.0
    );
    assert_eq!(after["renderq_queue_wait_seconds_count"], 3.0);
    assert!(
        after["renderq_receive_calls_total{result=\"message\"}"]
            .as_f64()
            .unwrap()
            >= 3.0
    );
    assert_eq!(after["renderq_slots_busy"], 0.0);
    for series in [
        "renderq_heartbeats_total",
        "renderq_visibility_extensions_failed_total",
        "renderq_events_dropped_total{reason=\"buffer_full\"}",
        "renderq_events_dropped_total{reason=\"too_large\"}",
        "renderq_adaptor_starts_total",
    ] {
        assert!(after.contains_key(series), "{series} in {after:?}");
    }
    // The fake nvidia-smi says GPU 0 is 37 % busy.
    let deadline = Instant::now() + LONG;
    while scrape(&url)
        .await
        .get("renderq_gpu_utilization_ratio{gpu=\"0\"}")
        .and_then(|v| v.as_f64())
        != Some(0.37)
    {
        assert!(Instant::now() < deadline, "no GPU sample");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_serves_metrics_and_health_when_asked() {
    let port = free_port();
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
            ..Settings::default()
        },
    )
    .await;
    let worker = farm.spawn("worker", &[]);
    worker.wait_for_log("Serving /metrics.", LONG);
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    assert!(health.status().is_success());
    let metrics = scrape(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(metrics["renderq_slots"], 1.0);
}

pub(crate) async fn autoscaling_client(endpoint: &str) -> aws_sdk_autoscaling::Client {
    let config = aws_sdk_autoscaling::Config::builder()
        .behavior_version_latest()
        .endpoint_url(endpoint)
        .region(aws_sdk_autoscaling::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_autoscaling::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .build();
    aws_sdk_autoscaling::Client::from_conf(config)
}

async fn is_protected(client: &aws_sdk_autoscaling::Client, instance: &str) -> bool {
    client
        .describe_auto_scaling_instances()
        .instance_ids(instance)
        .send()
        .await
        .unwrap()
        .auto_scaling_instances()[0]
        .protected_from_scale_in()
        .unwrap_or(false)
}

/// A moto autoscaling group of one instance, the IMDS stand-in naming it,
/// and a farm whose worker protects it while busy.
async fn protected_farm() -> (aws_sdk_autoscaling::Client, String, Farm, FakeImds) {
    let endpoint = crate::harness::Moto::shared().endpoint();
    let client = autoscaling_client(&endpoint).await;
    let group = format!("asg-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
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
    let instance = client
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(&group)
        .send()
        .await
        .unwrap()
        .auto_scaling_groups()[0]
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned();
    let imds = FakeImds::start().await;
    *imds.instance_id.lock().unwrap() = instance.clone();
    let farm = Farm::new(
        Backend::Local,
        fleet_settings(
            &imds,
            &format!(
                "[worker.autoscaling]\ngroup = \"{group}\"\nidle_before_unprotect = \"1s\"\nendpoint_url = \"{endpoint}\"\nregion = \"us-east-1\"\n"
            ),
        ),
    )
    .await;
    (client, instance, farm, imds)
}

/// Waits until the instance's protection is `on`.
async fn until_protected(
    client: &aws_sdk_autoscaling::Client,
    instance: &str,
    on: bool,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + LONG;
    while is_protected(client, instance).await != on {
        assert!(
            Instant::now() < deadline,
            "protection never {on}:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_in_protection_follows_the_busy_state() {
    let (client, instance, farm, _imds) = protected_farm().await;
    let serve = farm.serve(&crate::harness::AWS_ENV).await;
    assert!(!is_protected(&client, &instance).await);
    farm.submit(json!({"command": "sleep", "parameters": {"seconds": 3}}))
        .await;
    serve.wait_for_log("Executing command: sleep.", LONG);
    until_protected(&client, &instance, true, || serve.log_text()).await;
    farm.wait_until_drained(LONG).await;
    until_protected(&client, &instance, false, || serve.log_text()).await;
    // One call to protect, one to unprotect: never one per job.
    assert_eq!(
        serve
            .log_text()
            .matches("Scale-in protection changed.")
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_worker_leaves_an_idle_instance_unprotected() {
    let (client, instance, farm, _imds) = protected_farm().await;
    // A busy worker dies: its protection stays on.
    let killed = farm.serve(&crate::harness::AWS_ENV).await;
    farm.submit(json!({"command": "sleep", "parameters": {"seconds": 30}}))
        .await;
    until_protected(&client, &instance, true, || killed.log_text()).await;
    killed.signal(nix::sys::signal::Signal::SIGKILL);
    drop(killed);
    assert!(is_protected(&client, &instance).await);
    // Started again and idle (the killed job's message is still hidden),
    // it sets protection to the truth.
    let mut serve = farm.serve(&crate::harness::AWS_ENV).await;
    until_protected(&client, &instance, false, || serve.log_text()).await;
    assert!(serve.log_text().contains("Scale-in protection set."));
    // Busy again and stopped by SIGTERM: off once it has stopped.
    farm.submit(json!({"command": "sleep", "parameters": {"seconds": 2}}))
        .await;
    until_protected(&client, &instance, true, || serve.log_text()).await;
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(serve.wait_exit(LONG), Some(0));
    assert!(
        !is_protected(&client, &instance).await,
        "{}",
        serve.log_text()
    );
}

/// A stand-in for the autoscaling API that records every action and
/// answers each with an empty success (moto does not implement the
/// lifecycle-action calls).
async fn recording_autoscaling() -> (String, Arc<Mutex<Vec<String>>>) {
    let calls: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorded = calls.clone();
    let app = axum::Router::new().fallback(move |body: String| {
        let action = body
            .split('&')
            .find_map(|p| p.strip_prefix("Action="))
            .unwrap_or("Unknown")
            .to_owned();
        recorded.lock().unwrap().push(body);
        async move {
            (
                [("content-type", "text/xml")],
                format!(
                    "<{action}Response xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"><{action}Result></{action}Result><ResponseMetadata><RequestId>r-1</RequestId></ResponseMetadata></{action}Response>"
                ),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_with_three_stubborn_adaptors_and_a_full_event_buffer_ends_before_its_deadline() {
    let (endpoint, calls) = recording_autoscaling().await;
    // A slow webhook (1 s an event) that notes its deliveries in the same
    // list as the autoscaling calls, to see which came first.
    let delivered = calls.clone();
    let webhook = axum::Router::new().fallback(move || {
        let delivered = delivered.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            delivered.lock().unwrap().push("Action=Webhook".into());
            StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let webhook_url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, webhook).await });
    let imds = FakeImds::start().await;
    let adaptor = crate::harness::repo_path("tests/fixtures/stubborn_adaptor.py");
    let farm = Farm::new(
        Backend::Local,
        Settings {
            drain_timeout: "12s",
            extra_allowed: vec!["stubborn"],
            extra_toml: format!(
                r#"
[commands.stubborn]
kind = "adaptor"
program = "{adaptor}"

[events]
buffer = 4
[events.targets.slow]
kind = "webhook"
url = "{webhook_url}"
"#
            ),
            ..fleet_settings(
                &imds,
                &format!(
                    "slots = 3\n[worker.autoscaling]\ngroup = \"fleet\"\nprotect_when_busy = false\nlifecycle_hook = \"drain\"\nendpoint_url = \"{endpoint}\"\nregion = \"us-east-1\"\n"
                ),
            )
        },
    )
    .await;
    let text = std::fs::read_to_string(&farm.config).unwrap();
    std::fs::write(
        &farm.config,
        text.replace("[events]\nstatus = \"status.sqlite3\"\n", ""),
    )
    .unwrap();
    let mut serve = farm.serve(&crate::harness::AWS_ENV).await;
    serve.wait_for_log("Watching instance metadata", LONG);
    // One adaptor per slot, each left idle (and so kept) after its job.
    for _ in 0..3 {
        farm.submit(json!({"command": "stubborn"})).await;
    }
    for _ in 0..30 {
        if serve.log_text().matches("Job processed").count() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    *imds.lifecycle.lock().unwrap() = "Terminated".into();
    let noticed = Instant::now();
    assert_eq!(serve.wait_exit(LONG), Some(0), "{}", serve.log_text());
    let took = noticed.elapsed();
    println!("shutdown with 3 stubborn adaptors and a full event buffer: {took:?} (deadline 12 s)");
    let log = serve.log_text();
    assert_eq!(
        log.matches("adaptor did not stop cleanly").count(),
        3,
        "{log}"
    );
    assert!(took < Duration::from_secs(12), "took {took:?}: {log}");
    let calls = calls.lock().unwrap().clone();
    let actions: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.split('&').find_map(|p| p.strip_prefix("Action=")))
        .collect();
    assert_eq!(
        actions.last(),
        Some(&"CompleteLifecycleAction"),
        "{actions:?}"
    );
    assert!(actions.contains(&"Webhook"), "{actions:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn termination_hook_gets_heartbeats_then_continue() {
    let (endpoint, calls) = recording_autoscaling().await;
    let imds = FakeImds::start().await;
    let farm = Farm::new(
        Backend::Local,
        Settings {
            drain_timeout: "20s",
            ..fleet_settings(
                &imds,
                &format!(
                    "unknown_eta = \"run-to-deadline\"\n[worker.autoscaling]\ngroup = \"fleet\"\nprotect_when_busy = false\nlifecycle_hook = \"drain\"\nhook_heartbeat = \"300ms\"\nendpoint_url = \"{endpoint}\"\nregion = \"us-east-1\"\n"
                ),
            )
        },
    )
    .await;
    let mut serve = farm.serve(&crate::harness::AWS_ENV).await;
    serve.wait_for_log("Watching instance metadata", LONG);
    farm.submit(json!({"command": "sleep", "parameters": {"seconds": 2}}))
        .await;
    serve.wait_for_log("Executing command: sleep.", LONG);
    *imds.lifecycle.lock().unwrap() = "Terminated".into();
    assert_eq!(serve.wait_exit(LONG), Some(0), "{}", serve.log_text());
    let calls = calls.lock().unwrap().clone();
    let actions: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.split('&').find_map(|p| p.strip_prefix("Action=")))
        .collect();
    let heartbeats = actions
        .iter()
        .filter(|a| **a == "RecordLifecycleActionHeartbeat")
        .count();
    assert!(heartbeats >= 2, "{actions:?}");
    assert_eq!(
        actions.last(),
        Some(&"CompleteLifecycleAction"),
        "{actions:?}"
    );
    let complete = calls.last().unwrap();
    for field in [
        "LifecycleHookName=drain",
        "AutoScalingGroupName=fleet",
        "InstanceId=i-0abc",
        "LifecycleActionResult=CONTINUE",
    ] {
        assert!(complete.contains(field), "{field} in {complete}");
    }
    assert_eq!(
        farm.stats(),
        (0, 0, 0),
        "the job finished before the instance went"
    );
}
