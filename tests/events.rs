//! Lifecycle events on every kind of target, per-job subscriptions, array
//! jobs and their one `ArrayJobCompleted`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::harness::{AWS_ENV, Backend, Farm, Moto, Receiver, Settings, free_port, repo_path};

const LONG: Duration = Duration::from_secs(90);

const AUDIT: &str = r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"
"#;

fn upload(key: &str) -> Value {
    json!({"name": "s3_upload", "config": {"bucket": "results", "key": key}})
}

fn of_type<'a>(kind: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |e| e["type"] == kind
}

async fn eventbridge(endpoint: &str) -> aws_sdk_eventbridge::Client {
    let config = aws_sdk_eventbridge::Config::builder()
        .behavior_version_latest()
        .endpoint_url(endpoint)
        .region(aws_sdk_eventbridge::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_eventbridge::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .build();
    aws_sdk_eventbridge::Client::from_conf(config)
}

/// An EventBridge bus `name` whose rule routes renderq's events to a new
/// SQS queue `name-bus`; returns the queue's URL.
pub async fn bus_routed_to_queue(endpoint: &str, sqs: &aws_sdk_sqs::Client, name: &str) -> String {
    let queue = format!("{name}-bus");
    let url = sqs
        .create_queue()
        .queue_name(&queue)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let bridge = eventbridge(endpoint).await;
    bridge.create_event_bus().name(name).send().await.unwrap();
    bridge
        .put_rule()
        .name(name)
        .event_bus_name(name)
        .event_pattern(json!({"source": ["renderq"]}).to_string())
        .send()
        .await
        .unwrap();
    bridge
        .put_targets()
        .rule(name)
        .event_bus_name(name)
        .targets(
            aws_sdk_eventbridge::types::Target::builder()
                .id("q")
                .arn(format!("arn:aws:sqs:us-east-1:123456789012:{queue}"))
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    url
}

/// Receives from `url` until `done` holds for what arrived.
pub async fn drain_queue(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + LONG;
    let mut bodies = Vec::new();
    while !done(&bodies) {
        assert!(Instant::now() < deadline, "only got {bodies:?}");
        let received = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap();
        for message in received.messages.unwrap_or_default() {
            bodies.push(serde_json::from_str(message.body().unwrap()).unwrap());
        }
    }
    bodies
}

#[tokio::test(flavor = "multi_thread")]
async fn one_jobs_events_reach_a_file_an_sqs_queue_and_an_eventbridge_bus() {
    let moto = Moto::shared();
    let endpoint = moto.endpoint();
    let (sqs, _) = crate::harness::aws_clients(&endpoint).await;
    let name = format!("ev-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let pipeline = sqs
        .create_queue()
        .queue_name(format!("{name}-pipe"))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let routed = bus_routed_to_queue(&endpoint, &sqs, &name).await;

    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: format!(
                r#"{AUDIT}
[events.targets.pipeline]
kind = "sqs"
url = "{pipeline}"
endpoint_url = "{endpoint}"
region = "us-east-1"

[events.targets.bus]
kind = "eventbridge"
bus = "{name}"
endpoint_url = "{endpoint}"
region = "us-east-1"

[events.targets.mine]
kind = "file"
path = "mine.jsonl"
events = []
"#
            ),
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&AWS_ENV).await;
    let id = farm
        .submit(
            json!({"command": "get_version", "tasks": [upload("v/${message_id}.json")],
                       "notifications": [{"events": ["JobSucceeded"], "target": "mine",
                                          "vars": {"project": "courtyard"}}]}),
        )
        .await;
    let ours = |e: &Value| e["message_id"] == id.as_str();
    let file = farm
        .wait_for_events(|e| ours(e) && e["type"] == "JobSucceeded", 1, LONG)
        .await;
    assert_eq!(
        file[0]["detail"]["outputs"][0],
        format!("file://{}/v/{id}.json", farm.bucket_root().display())
    );
    assert_eq!(file[0]["vars"]["project"], "courtyard", "the job's vars");
    let kinds: Vec<String> = farm
        .events()
        .iter()
        .filter(|e| ours(e))
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    for kind in [
        "JobSubmitted",
        "JobStarted",
        "TaskSucceeded",
        "JobSucceeded",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    let ids: HashSet<_> = farm
        .events()
        .iter()
        .map(|e| e["event_id"].clone())
        .collect();
    assert_eq!(ids.len(), farm.events().len(), "event ids are unique");

    let mine: Vec<Value> = std::fs::read_to_string(farm.dir.path().join("mine.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(mine.len(), 1, "only the subscribed type: {mine:?}");
    assert_eq!(
        (
            mine[0]["type"].as_str(),
            mine[0]["vars"]["project"].as_str()
        ),
        (Some("JobSucceeded"), Some("courtyard"))
    );

    let succeeded = |events: &[Value]| {
        events
            .iter()
            .any(|e| e["type"] == "JobSucceeded" && e["message_id"] == id.as_str())
    };
    drain_queue(&sqs, &pipeline, succeeded).await;
    // `events watch` reads an sqs target in batches, and deletes what it
    // read: a second pass finds nothing.
    farm.submit(json!({"command": "get_version"})).await;
    farm.wait_for_events(|e| e["type"] == "JobSucceeded", 2, LONG)
        .await;
    let watch = || {
        crate::harness::renderq_ok(
            &["events", "watch", "--target", "pipeline", "--once"],
            &farm.config,
            &AWS_ENV,
        )
    };
    let count = |summary: &str, field: &str| -> u64 {
        summary
            .split(['\t', '\n'])
            .find_map(|f| f.strip_prefix(field)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(0)
    };
    let mut read = 0;
    for _ in 0..20 {
        let summary = watch();
        read += count(&summary, "applied") + count(&summary, "duplicates");
        if read >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(read >= 3, "submitted, started, succeeded: {read}");
    let again = watch();
    assert_eq!(
        count(&again, "applied") + count(&again, "duplicates"),
        0,
        "{again}"
    );
    let routed = drain_queue(&sqs, &routed, |bodies| {
        bodies.iter().any(|b| {
            b["detail"]["type"] == "JobSucceeded" && b["detail"]["message_id"] == id.as_str()
        })
    })
    .await;
    assert!(routed.iter().all(|b| b["source"] == "renderq"));
    assert!(routed.iter().any(|b| b["detail-type"] == "JobSucceeded"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_subscriptions_and_frame_specs_name_their_field() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: AUDIT.into(),
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[]).await;
    let cases = [
        (
            json!({"notifications": [{"target": "nowhere"}]}),
            "notifications[0].target",
        ),
        (
            json!({"notifications": [{"target": "audit", "events": ["JobExploded"]}]}),
            "notifications[0].events[0]",
        ),
        (json!({"frames": "5-1"}), "frames"),
        (json!({"frames": "1-"}), "frames"),
        (json!({"frames": "a-b"}), "frames"),
        (json!({"frames": "1-10x0"}), "frames"),
        (json!({"frames": "1-100000"}), "frames"),
        (json!({"frames": "1-10", "chunk_size": 0}), "chunk_size"),
    ];
    for (extra, field) in cases {
        let mut params = json!({"command": "render_demo"});
        params
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let reply = farm.rpc("queue_manager_submit_job", params.clone()).await;
        assert_eq!(reply["error"]["code"], -32602, "{params}: {reply}");
        assert_eq!(reply["error"]["data"]["field"], field, "{params}: {reply}");
    }
    assert_eq!(farm.stats(), (0, 0, 0), "nothing was sent");
}

scenarios!(
    array_of_20_frames_lands_20_pngs_and_completes_once,
    racing_last_children_complete_each_array_once,
    array_with_a_failing_child_completes_with_it_dead_lettered,
    killed_worker_is_reported_as_lost_on_the_next_receive,
    submit_wait_follows_an_array_to_its_end,
);

async fn array_farm(backend: Backend, extra: &str, settings: Settings) -> Farm {
    Farm::new(
        backend,
        Settings {
            extra_toml: format!("{AUDIT}{extra}"),
            ..settings
        },
    )
    .await
}

async fn submit_array(farm: &Farm, params: Value) -> (String, Vec<String>) {
    let reply = farm.rpc("queue_manager_submit_job", params).await;
    let result = &reply["result"];
    let ids = result["message_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"));
    (
        result["job_id"].as_str().unwrap().to_owned(),
        ids.iter().map(|i| i.as_str().unwrap().to_owned()).collect(),
    )
}

fn completions(farm: &Farm, job_id: &str) -> Vec<Value> {
    farm.events()
        .into_iter()
        .filter(|e| e["type"] == "ArrayJobCompleted" && e["job_id"] == job_id)
        .collect()
}

async fn array_of_20_frames_lands_20_pngs_and_completes_once(backend: Backend) {
    let farm = array_farm(backend, "", Settings::default()).await;
    let _serve = farm.serve(&[]).await;
    let _worker = farm.spawn("worker", &[]);
    let (job_id, children) = submit_array(
        &farm,
        json!({"command": "render_demo", "frames": "1-20", "chunk_size": 3,
               "parameters": {"width": 32, "height": 24},
               "tasks": [upload("shots/${job_id}/${frame}.${mime_ext}")]}),
    )
    .await;
    assert_eq!(children.len(), 7);
    for frame in 1..=20 {
        let (bytes, kind) = farm
            .wait_for_object(&format!("shots/{job_id}/{frame}.png"), LONG)
            .await;
        assert_eq!(
            (kind.as_str(), crate::harness::png_size(&bytes)),
            ("image/png", (32, 24))
        );
    }
    farm.wait_for_events(
        |e| e["type"] == "ArrayJobCompleted" && e["job_id"] == job_id.as_str(),
        1,
        LONG,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done = completions(&farm, &job_id);
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(
        done[0]["detail"],
        json!({"size": 7, "succeeded": 7, "dead_lettered": 0, "cancelled": 0})
    );
}

async fn racing_last_children_complete_each_array_once(backend: Backend) {
    let farm = array_farm(backend, "", Settings::default()).await;
    let _serve = farm.serve(&[]).await;
    let _worker = farm.spawn("worker", &[]);
    let mut arrays = Vec::new();
    for _ in 0..50 {
        let (job_id, _) = submit_array(
            &farm,
            json!({"command": "get_version", "frames": "1-2",
                   "tasks": [upload("race/${job_id}/${array_index}.json")]}),
        )
        .await;
        arrays.push(job_id);
    }
    farm.wait_for_events(of_type("ArrayJobCompleted"), 50, LONG * 2)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for event in farm
        .events()
        .iter()
        .filter(|e| e["type"] == "ArrayJobCompleted")
    {
        *counts
            .entry(event["job_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for job_id in &arrays {
        assert_eq!(counts.get(job_id), Some(&1), "array {job_id}");
    }
}

const FRAME_JOB: &str = r#"
[commands.frame_job]
kind = "process"
program = "FIXTURE"
args = ["{frames}", "{mode}", "{pids}"]
[commands.frame_job.parameters]
mode = { type = "string", required = true }
pids = { type = "string", required = true }
"#;

/// An array farm that can run the `frame_job` fixture.
async fn frame_job_farm(backend: Backend, settings: Settings) -> Farm {
    let command = FRAME_JOB.replace("FIXTURE", &repo_path("tests/fixtures/frame_job.py"));
    array_farm(
        backend,
        &command,
        Settings {
            extra_allowed: vec!["frame_job"],
            ..settings
        },
    )
    .await
}

async fn array_with_a_failing_child_completes_with_it_dead_lettered(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let farm = frame_job_farm(
        backend,
        Settings {
            max_receive_count: 2,
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[]).await;
    let (job_id, _) = submit_array(
        &farm,
        json!({"command": "frame_job", "frames": "11-13",
               "parameters": {"mode": "fail:13", "pids": dir.path().join("pids")}}),
    )
    .await;
    let done = farm
        .wait_for_events(
            |e| e["type"] == "ArrayJobCompleted" && e["job_id"] == job_id.as_str(),
            1,
            LONG,
        )
        .await;
    assert_eq!(
        done[0]["detail"],
        json!({"size": 3, "succeeded": 2, "dead_lettered": 1, "cancelled": 0})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn child_whose_workers_keep_dying_still_completes_its_array_once() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let farm = frame_job_farm(
        Backend::Local,
        Settings {
            max_receive_count: 2,
            visibility_timeout: "2s",
            ..Settings::default()
        },
    )
    .await;
    let mut worker = farm.serve(&[]).await;
    let (job_id, _) = submit_array(
        &farm,
        json!({"command": "frame_job", "frames": "11-13",
               "parameters": {"mode": "hang:13", "pids": pids}}),
    )
    .await;
    let deadline = Instant::now() + LONG;
    let mut kills = 0;
    while completions(&farm, &job_id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "never completed after {kills} kills"
        );
        if kills > 0 {
            worker = farm.spawn("worker", &[]);
        }
        // Frames 11 and 12 are quick; a third run is the hanging frame 13.
        let before = crate::commands::starts(&pids).len();
        let started = Instant::now();
        while crate::commands::starts(&pids).len() == before
            && completions(&farm, &job_id).is_empty()
            && started.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if completions(&farm, &job_id).is_empty() {
            worker.signal(Signal::SIGKILL);
            kills += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done = completions(&farm, &job_id);
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(
        done[0]["detail"],
        json!({"size": 3, "succeeded": 2, "dead_lettered": 1, "cancelled": 0})
    );
    assert!(kills >= 2, "{kills} kills");
}

async fn killed_worker_is_reported_as_lost_on_the_next_receive(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let farm = array_farm(
        backend,
        &crate::commands::commands_toml(&dir.path().join("starts").display().to_string()),
        Settings {
            extra_allowed: vec!["sleeper"],
            visibility_timeout: "2s",
            ..Settings::default()
        },
    )
    .await;
    let serve = farm.serve(&[]).await;
    let pidfile = dir.path().join("pids");
    let id = farm
        .submit(json!({"command": "sleeper", "parameters": {"pidfile": pidfile}}))
        .await;
    serve.wait_for_log("Executing command: sleeper.", LONG);
    serve.signal(Signal::SIGKILL);
    let _worker = farm.spawn("worker", &[]);
    let lost = farm
        .wait_for_events(
            |e| e["type"] == "JobRequeued" && e["message_id"] == id.as_str(),
            1,
            LONG,
        )
        .await;
    assert_eq!(lost[0]["detail"]["reason"], "worker lost");
    assert_eq!(lost[0]["attempt"], 2);
}

/// The same 50 jobs, with a webhook target up and then down: a target that
/// is down must not slow jobs, and its events arrive once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_down_webhook_does_not_slow_jobs_and_catches_up() {
    async fn run_50(url: &str) -> (Farm, crate::harness::Proc, Duration) {
        let farm = Farm::new(
            Backend::Local,
            Settings {
                extra_toml: format!("[events.targets.hook]\nkind = \"webhook\"\nurl = \"{url}\"\n"),
                ..Settings::default()
            },
        )
        .await;
        let serve = farm.serve(&[]).await;
        let started = Instant::now();
        for _ in 0..50 {
            farm.submit(json!({"command": "get_version"})).await;
        }
        farm.wait_until_drained(LONG).await;
        let took = started.elapsed();
        (farm, serve, took)
    }
    let up = Receiver::start(0).await;
    let (_, _, with_up) = run_50(&format!("http://{}/events", up.addr)).await;
    let port = free_port();
    let (_farm, serve, with_down) = run_50(&format!("http://127.0.0.1:{port}/events")).await;
    println!("50 jobs: {with_up:?} with the webhook up, {with_down:?} with it down");
    assert!(
        with_down.as_secs_f64() <= with_up.as_secs_f64() * 1.1 + 0.5,
        "down {with_down:?} vs up {with_up:?}"
    );

    // Bring the target up on the same port: the buffered events arrive.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = {
        let hits = hits.clone();
        axum::Router::new().fallback(move || {
            hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { axum::http::StatusCode::OK }
        })
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    let deadline = Instant::now() + LONG;
    // 50 jobs × (submitted, started, succeeded) at least.
    while hits.load(std::sync::atomic::Ordering::Relaxed) < 150 {
        assert!(
            Instant::now() < deadline,
            "{} events arrived:\n{}",
            hits.load(std::sync::atomic::Ordering::Relaxed),
            serve.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn submit_wait_follows_an_array_to_its_end(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let farm = frame_job_farm(
        backend,
        Settings {
            max_receive_count: 1,
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[]).await;
    let pids = dir.path().join("pids").display().to_string();
    let submit = |mode: &str| {
        farm.cli(&[
            "submit",
            "frame_job",
            "--frames",
            "1-6",
            "--chunk-size",
            "2",
            "--wait",
            "--params",
            &json!({"mode": mode, "pids": pids}).to_string(),
        ])
    };
    let (code, out, err) = submit("fail:none");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("size=3\tsucceeded=3\tdead_lettered=0"),
        "{out}"
    );
    let (code, out, err) = submit("fail:4");
    assert_ne!(code, 0, "{out}{err}");
    assert!(out.contains("succeeded=2\tdead_lettered=1"), "{out}");
    assert!(err.contains("dead-lettered"), "{err}");
    // `renderq status` reads the same table.
    let array_id = out.lines().next().unwrap();
    let (code, status, _) = farm.cli(&["status", array_id]);
    assert_eq!(code, 0);
    assert!(status.contains("completed=true"), "{status}");
    // --timeout gives up on a job that runs on.
    let (code, out, err) = farm.cli(&[
        "submit",
        "sleep",
        "--params",
        r#"{"seconds": 30}"#,
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("has not ended after 1s"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn events_watch_gives_the_same_table_for_repeats_in_any_order() {
    let farm = array_farm(Backend::Local, "", Settings::default()).await;
    let serve = farm.serve(&[]).await;
    let (job_id, _) = submit_array(
        &farm,
        json!({"command": "get_version", "frames": "1-4", "chunk_size": 2,
               "tasks": [upload("w/${job_id}/${array_index}.json")]}),
    )
    .await;
    let failing = Receiver::answering(usize::MAX, axum::http::StatusCode::FORBIDDEN).await;
    let lost = farm
        .submit(
            json!({"command": "get_version", "tasks": [{"name": "http_post",
            "config": {"postback_uri": format!("http://{}/x", failing.addr)}}]}),
        )
        .await;
    farm.wait_for_events(
        |e| e["type"] == "ArrayJobCompleted" && e["job_id"] == job_id.as_str(),
        1,
        LONG,
    )
    .await;
    farm.wait_for_events(
        |e| e["type"] == "JobDeadLettered" && e["message_id"] == lost.as_str(),
        1,
        LONG,
    )
    .await;
    drop(serve);

    let lines: Vec<String> = std::fs::read_to_string(farm.dir.path().join("events.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let mut shuffled: Vec<String> = lines.iter().chain(&lines).cloned().collect();
    // A fixed shuffle: reversed, then every third swapped forward.
    shuffled.reverse();
    for i in (3..shuffled.len()).step_by(3) {
        shuffled.swap(i, i / 3);
    }
    shuffled.insert(1, "not an event".into());
    shuffled.insert(4, lines[0].replace("\"protocol\":1", "\"protocol\":99"));
    let watch = |name: &str, text: String| {
        std::fs::write(farm.dir.path().join(format!("{name}.jsonl")), text + "\n").unwrap();
        let config = std::fs::read_to_string(&farm.config).unwrap().replace(
            "status = \"status.sqlite3\"",
            &format!("status = \"{name}.sqlite3\"\n[events.targets.{name}]\nkind = \"file\"\npath = \"{name}.jsonl\"\nevents = []"),
        );
        let path = farm.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let summary = crate::harness::renderq_ok(
            &["events", "watch", "--target", name, "--once"],
            &path,
            &[],
        );
        let table = renderq::events::status::StatusTable::open(
            &farm.dir.path().join(format!("{name}.sqlite3")),
        )
        .unwrap();
        (summary, table.dump().unwrap())
    };
    let (once, in_order) = watch("once", lines.join("\n"));
    let (twice, any_order) = watch("twice", shuffled.join("\n"));
    assert!(
        once.contains(&format!("applied={}\tduplicates=0\tskipped=0", lines.len())),
        "{once}"
    );
    assert!(
        twice.contains(&format!(
            "applied={}\tduplicates={}\tskipped=2",
            lines.len(),
            lines.len()
        )),
        "{twice}"
    );
    assert_eq!(in_order, any_order);
    assert!(
        in_order.iter().any(|row| row.contains("dead_lettered")),
        "{in_order:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_works_with_no_events_table_and_says_so_when_turned_off() {
    let mut farm = array_farm(Backend::Local, "", Settings::default()).await;
    let text = std::fs::read_to_string(&farm.config).unwrap();
    let bare = text.replace("[events]\nstatus = \"status.sqlite3\"\n", "");
    assert!(!bare.contains("status ="), "{bare}");
    std::fs::write(&farm.config, &bare).unwrap();
    let _serve = farm.serve(&[]).await;
    let (code, out, err) = farm.cli(&["submit", "get_version", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    let job_id = out.lines().next().unwrap().to_owned();
    let (code, status, err) = farm.cli(&["status", &job_id]);
    assert_eq!(code, 0, "{err}");
    assert!(status.contains("succeeded"), "{status}");
    // Beside the embedded queue's state.
    assert!(farm.dir.path().join("queue/status.sqlite3").exists());

    farm.config = farm.config_variant("off", |text| {
        format!("{text}\n[events]\nstatus = \"off\"\n")
    });
    let (code, _, err) = farm.cli(&["status", &job_id]);
    assert_ne!(code, 0);
    assert!(err.contains(r#"[events] status is "off""#), "{err}");
}

/// A burst many times a target's buffer: the status table's buffer is
/// bounded in bytes, not by `events.buffer`, so every job's end is in the
/// table (a missed `JobSucceeded` would show a job running for ever).
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_submits_leaves_every_jobs_end_in_the_status_table() {
    let mut farm = array_farm(Backend::Local, "", Settings::default()).await;
    let text = std::fs::read_to_string(&farm.config).unwrap();
    let small = text.replace(
        "[events]\nstatus = \"status.sqlite3\"\n",
        "[events]\nstatus = \"status.sqlite3\"\nbuffer = 4\n",
    );
    assert_ne!(small, text, "the farm's config has its status table");
    farm.config = farm.config_variant("small-buffer", |_| small.clone());
    let _serve = farm.serve(&[]).await;
    let jobs = 300;
    let submits = (0..jobs).map(|_| farm.submit(json!({"command": "get_version"})));
    let ids = futures_util::future::join_all(submits).await;
    for id in &ids {
        let status = farm.final_status(id).await;
        assert_eq!(status["result"]["state"], "succeeded", "{id}: {status}");
    }
    let (code, out, err) = farm.cli(&["status", &ids[jobs - 1]]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("state=succeeded"), "{out}");
}
