//! `process` and `adaptor` commands with real programs from `examples/` and
//! `tests/fixtures/`, and `renderq run`.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::harness::{BIN, Backend, Farm, Settings, alive, png_size, repo_path};

const LONG: Duration = Duration::from_secs(60);

/// `[commands.*]` tables for the example programs and fixtures.
pub fn commands_toml(starts_file: &str) -> String {
    let gradient = repo_path("examples/commands/gradient.py");
    let argv_json = repo_path("examples/commands/argv_json.py");
    let spawner = repo_path("tests/fixtures/spawn_children.py");
    let fail = repo_path("tests/fixtures/fail_exit_zero.py");
    let adaptor = repo_path("examples/adaptor/scene_adaptor.py");
    let silent = repo_path("tests/fixtures/silent_adaptor.py");
    let garbage = repo_path("tests/fixtures/garbage_adaptor.py");
    format!(
        r#"
[commands.gradient]
kind = "process"
program = "python3"
args = ["{gradient}", "{{width}}", "{{height}}", "{{frame}}", "{{workdir}}/frame_{{frame:04}}.png"]
output = "{{workdir}}/frame_{{frame:04}}.png"
timeout = "30s"
[commands.gradient.parameters]
width = {{ type = "integer", min = 1, max = 512, default = 32 }}
height = {{ type = "integer", min = 1, max = 512, default = 24 }}
frame = {{ type = "integer", min = 0, default = 1 }}

[commands.argv_json]
kind = "process"
program = "python3"
args = ["{argv_json}", "{{text}}", "--label={{text}}"]
[commands.argv_json.parameters]
text = {{ type = "string", required = true }}

[commands.spawner]
kind = "process"
program = "python3"
args = ["{spawner}", "{{pidfile}}"]
timeout = "1s"
[commands.spawner.parameters]
pidfile = {{ type = "string", required = true }}

[commands.sleeper]
kind = "process"
program = "python3"
args = ["{spawner}", "{{pidfile}}"]
timeout = "60s"
[commands.sleeper.parameters]
pidfile = {{ type = "string", required = true }}

[commands.fails_quietly]
kind = "process"
program = "{fail}"

[commands.writes_nothing]
kind = "process"
program = "python3"
args = ["-c", "import sys; print('Error: Python file \"render.py\" could not be opened'); print('Blender quit'); sys.exit(0)"]
output = "{{workdir}}/frame_*.png"

[commands.scene]
kind = "adaptor"
program = "python3"
args = ["{adaptor}"]
init_data = {{ scene = "courtyard", load_seconds = 0.2, starts_file = "{starts_file}" }}
start_timeout = "10s"
timeout = "30s"
[commands.scene.parameters]
frame = {{ type = "integer", min = 0, default = 1 }}
width = {{ type = "integer", min = 1, max = 512, default = 32 }}
height = {{ type = "integer", min = 1, max = 512, default = 24 }}
seconds = {{ type = "number", min = 0, max = 30, default = 0 }}

[commands.silent]
kind = "adaptor"
program = "{silent}"
start_timeout = "1s"

[commands.garbage]
kind = "adaptor"
program = "{garbage}"
start_timeout = "5s"
"#
    )
}

async fn farm_with_commands(starts_file: &str) -> Farm {
    Farm::new(
        Backend::Local,
        Settings {
            extra_toml: commands_toml(starts_file),
            extra_allowed: vec!["gradient", "argv_json", "scene"],
            ..Settings::default()
        },
    )
    .await
}

fn upload(key: &str) -> Value {
    json!({"name": "s3_upload", "config": {"bucket": "results", "key": key}})
}

pub fn starts(path: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn process_file_and_stdout_results_are_uploaded_with_their_types() {
    let dir = tempfile::tempdir().unwrap();
    let farm = farm_with_commands(&dir.path().join("starts").display().to_string()).await;
    let serve = farm.serve(&[]).await;
    let png = farm
        .submit(
            json!({"command": "gradient", "parameters": {"width": 40, "height": 30, "frame": 3},
                       "tasks": [upload("g-${message_id}.${mime_ext}")]}),
        )
        .await;
    let (bytes, content_type) = farm.wait_for_object(&format!("g-{png}.png"), LONG).await;
    assert_eq!(
        (content_type.as_str(), png_size(&bytes)),
        ("image/png", (40, 30))
    );

    let json_id = farm
        .submit(
            json!({"command": "argv_json", "parameters": {"text": "hello"},
                       "tasks": [upload("a-${message_id}.${mime_ext}")]}),
        )
        .await;
    let (bytes, content_type) = farm
        .wait_for_object(&format!("a-{json_id}.json"), LONG)
        .await;
    assert_eq!(content_type, "application/json");
    let printed: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(printed["argv"], json!(["hello", "--label=hello"]));
    assert!(
        serve.log_text().contains("Progress."),
        "openjd_progress lines are logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn injection_attempts_stay_literal_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let farm = farm_with_commands(&dir.path().join("starts").display().to_string()).await;
    let _serve = farm.serve(&[("RENDERQ_TEST_SECRET", "hunter2")]).await;
    for (i, text) in ["; rm -rf /", "$(id)", "`id` && echo pwned", "a b\nc"]
        .iter()
        .enumerate()
    {
        let id = farm
            .submit(json!({"command": "argv_json", "parameters": {"text": text},
                           "tasks": [upload(&format!("inj{i}-${{message_id}}.json"))]}))
            .await;
        let (bytes, _) = farm
            .wait_for_object(&format!("inj{i}-{id}.json"), LONG)
            .await;
        let printed: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            printed["argv"],
            json!([text, format!("--label={text}")]),
            "passed literally"
        );
        let env = printed["env"].as_array().unwrap();
        assert!(
            !env.contains(&json!("RENDERQ_TEST_SECRET")),
            "the worker's environment leaked: {env:?}"
        );
    }
    let refused = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "argv_json", "parameters": {"text": "--output=/etc/passwd"}}),
        )
        .await;
    assert_eq!(refused["error"]["code"], -32602);
    assert_eq!(refused["error"]["data"]["field"], "parameters.text");
    assert_eq!(farm.wait_until_drained(LONG).await, (0, 0, 0));
}

/// Runs `renderq run` against a config holding the test commands.
fn run_cli(farm: &Farm, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("run")
        .args(args)
        .arg("--config")
        .arg(&farm.config)
        .current_dir(farm.dir.path())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_kills_the_program_and_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let farm = farm_with_commands(&dir.path().join("starts").display().to_string()).await;
    let pidfile = dir.path().join("pids");
    let params = json!({"pidfile": pidfile}).to_string();
    let (code, _, stderr) = run_cli(&farm, &["spawner", "--params", &params]);
    assert_ne!(code, 0);
    assert!(stderr.contains("timed out after 1s"), "{stderr}");
    let pids = starts(&pidfile);
    assert_eq!(pids.len(), 3, "the program and its two children");
    std::thread::sleep(Duration::from_millis(200));
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the timeout");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openjd_fail_fails_a_program_that_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let farm = farm_with_commands(&dir.path().join("starts").display().to_string()).await;
    let (code, _, stderr) = run_cli(&farm, &["fails_quietly"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("licence server unreachable"), "{stderr}");
}

/// Blender exits 0 when its `--python` script is missing, saying so on
/// standard output: the reason shows those last lines.
#[tokio::test(flavor = "multi_thread")]
async fn a_program_that_exits_zero_without_its_output_fails_with_its_last_lines() {
    let dir = tempfile::tempdir().unwrap();
    let farm = farm_with_commands(&dir.path().join("starts").display().to_string()).await;
    let (code, _, stderr) = run_cli(&farm, &["writes_nothing"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("wrote no output file"), "{stderr}");
    assert!(
        stderr.contains("stdout: Error: Python file \"render.py\" could not be opened"),
        "{stderr}"
    );
    assert!(stderr.contains("Blender quit"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_writes_render_demo_png_and_prints_its_path() {
    let farm = Farm::new(Backend::Local, Settings::default()).await;
    let (code, stdout, stderr) = run_cli(
        &farm,
        &["render_demo", "--params", r#"{"width":64,"height":64}"#],
    );
    assert_eq!(code, 0, "{stderr}");
    let (path, mime) = stdout.trim().split_once('\t').expect("PATH\tMIME");
    assert_eq!(mime, "image/png");
    assert!(
        path.starts_with("renderq-run/"),
        "not loose in the working folder: {path}"
    );
    let bytes = std::fs::read(farm.dir.path().join(path)).unwrap();
    assert_eq!(png_size(&bytes), (64, 64));

    let params_file = farm.dir.path().join("params.json");
    std::fs::write(&params_file, r#"{"width": 16, "height": 8}"#).unwrap();
    let (code, stdout, _) = run_cli(
        &farm,
        &[
            "render_demo",
            "--params",
            &format!("file://{}", params_file.display()),
            "--output",
            "x.png",
        ],
    );
    assert_eq!((code, stdout.trim()), (0, "x.png\timage/png"));
    assert_eq!(
        png_size(&std::fs::read(farm.dir.path().join("x.png")).unwrap()),
        (16, 8)
    );

    // A JSON result with nowhere named goes to stdout.
    let (code, stdout, _) = run_cli(&farm, &["get_version"]);
    assert_eq!(
        (code, stdout.trim()),
        (0, format!("\"{}\"", env!("CARGO_PKG_VERSION")).as_str())
    );

    let (code, _, stderr) = run_cli(&farm, &["render_demo", "--params", r#"{"width":"wide"}"#]);
    assert_ne!(code, 0);
    assert!(stderr.contains("parameters.width"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn adaptor_starts_once_for_many_jobs_and_stops_with_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let starts_file = dir.path().join("starts");
    let farm = farm_with_commands(&starts_file.display().to_string()).await;
    let mut serve = farm.serve(&[]).await;
    for frame in 1..=5 {
        let id = farm
            .submit(json!({"command": "scene", "parameters": {"frame": frame, "width": 48, "height": 32},
                           "tasks": [upload("scene/${message_id}.${mime_ext}")]}))
            .await;
        let (bytes, content_type) = farm.wait_for_object(&format!("scene/{id}.png"), LONG).await;
        assert_eq!(
            (content_type.as_str(), png_size(&bytes)),
            ("image/png", (48, 32))
        );
    }
    let pids = starts(&starts_file);
    assert_eq!(pids.len(), 1, "one start for five jobs");
    assert!(alive(pids[0]));
    let log = serve.log_text();
    assert!(
        log.contains("Progress.") && log.contains("rendering frame 5"),
        "{log}"
    );

    serve.signal(Signal::SIGTERM);
    assert_eq!(serve.wait_exit(LONG), Some(0));
    assert!(serve.log_text().contains("Stopped adaptor."));
    assert!(!alive(pids[0]), "the adaptor is stopped with the worker");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_adaptor_is_restarted_and_its_job_retried() {
    let dir = tempfile::tempdir().unwrap();
    let starts_file = dir.path().join("starts");
    let farm = farm_with_commands(&starts_file.display().to_string()).await;
    let serve = farm.serve(&[]).await;
    let id = farm
        .submit(
            json!({"command": "scene", "parameters": {"frame": 9, "seconds": 3},
                       "tasks": [upload("k/${message_id}.${mime_ext}")]}),
        )
        .await;
    serve.wait_for_log("rendering frame 9", LONG);
    let first = starts(&starts_file)[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).unwrap();

    farm.wait_for_object(&format!("k/{id}.png"), LONG).await;
    let pids = starts(&starts_file);
    assert_eq!(pids.len(), 2, "restarted once");
    assert!(
        serve.log_text().contains("adaptor exited"),
        "{}",
        serve.log_text()
    );
    assert!(serve.log_text().contains("attempt=2"));
    assert_eq!(farm.wait_until_drained(LONG).await, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn unresponsive_or_garbled_adaptors_fail_with_a_clear_reason() {
    let dir = tempfile::tempdir().unwrap();
    let farm = farm_with_commands(&dir.path().join("starts").display().to_string()).await;
    let started = std::time::Instant::now();
    let (code, _, stderr) = run_cli(&farm, &["silent"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("no `ready` in time"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));

    let (code, _, stderr) = run_cli(&farm, &["garbage"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("broke the protocol"), "{stderr}");
}

#[test]
fn missing_program_is_reported_by_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("workers.toml");
    let repo = std::fs::read_to_string(repo_path("workers.toml")).unwrap();
    std::fs::write(
        &config,
        format!(
            "{repo}\n[commands.blender]\nkind = \"process\"\nprogram = \"/opt/blender-9/blender\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`commands.blender.program`") && stderr.contains("/opt/blender-9/blender"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_past_the_drain_deadline_kills_the_process_tree_and_requeues() {
    let dir = tempfile::tempdir().unwrap();
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: commands_toml(&dir.path().join("starts").display().to_string()),
            extra_allowed: vec!["sleeper"],
            drain_timeout: "300ms",
            ..Settings::default()
        },
    )
    .await;
    let mut serve = farm.serve(&[]).await;
    let pidfile = dir.path().join("pids");
    farm.submit(json!({"command": "sleeper", "parameters": {"pidfile": pidfile}}))
        .await;
    let deadline = std::time::Instant::now() + LONG;
    while starts(&pidfile).len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the program never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    serve.signal(Signal::SIGTERM);
    assert_eq!(serve.wait_exit(LONG), Some(0), "{}", serve.log_text());
    assert!(
        serve
            .log_text()
            .contains("Job interrupted, returning to queue.")
    );
    for pid in starts(&pidfile) {
        assert!(!alive(pid), "process {pid} outlived the shutdown");
    }
    assert_eq!(farm.stats(), (1, 0, 0), "handed back for another worker");
}
