//! Real renders: Debian's Blender renders a 20-frame array whose scene and
//! texture come from a bucket as inputs, once as a one-shot `process`
//! command per chunk and once through the adaptor that keeps the scene
//! loaded; and the adaptor stops a long frame on a cancel, then renders
//! the next job's own scene.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{
    AUDIT_AND_ASSETS, Backend, Farm, Settings, alive, files_under, png_size, repo_path,
};

const LONG: Duration = Duration::from_secs(240);

/// Whether Blender is here. Under CI it must be (`.ci/run` installs it);
/// elsewhere a missing Blender skips the test, saying so.
pub(crate) fn have_blender() -> bool {
    let found = Command::new("blender")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        crate::harness::skip(
            "Blender",
            "Debian package `blender`, which .ci/run installs",
        );
    }
    found
}

/// The `blender_render` command as the README gives it, with
/// `examples/blender/render_frames.py` from this repository.
pub(crate) fn blender_render_toml() -> String {
    format!(
        r#"
[commands.blender_render]
kind = "process"
program = "blender"
args = ["-b", "--factory-startup", "{{workdir}}/{{scene}}", "--python", "{render}",
        "--", "--frames", "{{frames}}", "--frame", "{{frame}}", "--out", "{{workdir}}/frame_"]
output = "{{workdir}}/frame_*.png"
timeout = "10m"
[commands.blender_render.parameters]
scene = {{ type = "string", required = true, pattern = "^[A-Za-z0-9_./-]+\\.blend$" }}
frame = {{ type = "integer", default = 1 }}
"#,
        render = repo_path("examples/blender/render_frames.py"),
    )
}

/// A farm of `slots` slots with the `blender_render` and `blender_adaptor`
/// commands, and a 64-pixel test shot in `assets/shots/010`.
async fn blender_farm(slots: u32) -> Farm {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_allowed: vec!["blender_render", "blender_adaptor"],
            worker_toml: format!("slots = {slots}"),
            extra_toml: format!(
                r#"{AUDIT_AND_ASSETS}
{render}
[commands.blender_adaptor]
kind = "adaptor"
program = "python3"
args = ["{adaptor}"]
timeout = "10m"
init_data = {{ loads_file = "loads.txt" }}
[commands.blender_adaptor.parameters]
scene = {{ type = "string", required = true, pattern = "^[A-Za-z0-9_./-]+\\.blend$" }}
frame = {{ type = "integer", default = 1 }}
"#,
                render = blender_render_toml(),
                adaptor = repo_path("examples/blender/adaptor.py"),
            ),
            ..Settings::default()
        },
    )
    .await;
    make_scene(&farm, 64, 4);
    farm
}

/// (Re)writes the test shot in the farm's `assets` bucket: a scene of
/// `size` pixels across, rendered with `samples` samples.
fn make_scene(farm: &Farm, size: u32, samples: u32) {
    make_scene_in(&farm.dir.path().join("assets/shots/010"), size, samples);
}

/// Writes `examples/blender/make_scene.py`'s shot (`scene.blend`,
/// `textures/checker.png`) into `dir`.
pub(crate) fn make_scene_in(dir: &std::path::Path, size: u32, samples: u32) {
    let made = Command::new("blender")
        .args(["-b", "--factory-startup", "--python"])
        .arg(repo_path("examples/blender/make_scene.py"))
        .arg("--")
        .arg(dir)
        .args([size.to_string(), samples.to_string()])
        .output()
        .expect("run blender");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// Renders frames 1-20 in chunks of 4 with `command`; checks the 20 PNGs,
/// the one completion and the cache; returns the events.
async fn render_array(farm: &Farm, command: &str) -> Vec<Value> {
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({
                "command": command,
                "parameters": {"scene": "scene.blend"},
                "frames": "1-20", "chunk_size": 4,
                "inputs": [
                    {"bucket": "assets", "key": "shots/010/scene.blend", "path": "scene.blend"},
                    {"bucket": "assets", "key": "shots/010/textures/checker.png", "path": "textures/checker.png"}
                ],
                "tasks": [{"name": "s3_upload", "config": {"bucket": "results",
                           "key": "renders/${job_id}/${frame}.${mime_ext}"}}]
            }),
        )
        .await;
    let job_id = reply["result"]["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"))
        .to_owned();
    let completed = farm
        .wait_for_events(
            |e| e["type"] == "ArrayJobCompleted" && e["job_id"] == job_id.as_str(),
            1,
            LONG,
        )
        .await;
    assert_eq!(
        completed[0]["detail"],
        json!({"size": 5, "succeeded": 5, "dead_lettered": 0, "cancelled": 0})
    );
    for frame in 1..=20 {
        let (png, mime) = farm
            .object(&format!("renders/{job_id}/{frame}.png"))
            .await
            .unwrap_or_else(|| panic!("frame {frame} missing"));
        assert_eq!(mime, "image/png");
        assert_eq!(png_size(&png), (64, 36), "frame {frame}");
    }
    let events = farm.events();
    let started: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "JobStarted" && e["array"]["job_id"] == job_id.as_str())
        .collect();
    let sum = |field: &str| {
        started
            .iter()
            .map(|e| e["detail"]["inputs"][field].as_u64().unwrap())
            .sum::<u64>()
    };
    let assets = ["scene.blend", "textures/checker.png"]
        .iter()
        .map(|f| {
            std::fs::metadata(farm.dir.path().join("assets/shots/010").join(f))
                .unwrap()
                .len()
        })
        .sum::<u64>();
    assert_eq!(started.len(), 5);
    assert_eq!(sum("files"), 10);
    // Each input crossed from the bucket once; every other use was a hit.
    assert_eq!(sum("bytes_downloaded"), assets, "{started:?}");
    assert_eq!(sum("bytes_from_cache"), 4 * assets);
    events
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blender_array_renders_its_inputs_once_downloaded() {
    if !have_blender() {
        return;
    }
    let farm = blender_farm(2).await;
    let _serve = farm.serve(&[]).await;
    let events = render_array(&farm, "blender_render").await;
    assert!(
        events.iter().any(|e| e["type"] == "JobProgress"),
        "openjd_progress lines became events"
    );
    let metrics = crate::fleet::scrape(&format!("{}metrics", farm.url())).await;
    assert_eq!(
        metrics["renderq_input_cache_files_total{result=\"miss\"}"],
        2.0
    );
    assert_eq!(
        metrics["renderq_input_cache_files_total{result=\"hit\"}"],
        8.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_blender_adaptor_loads_the_scene_once_per_slot() {
    if !have_blender() {
        return;
    }
    let farm = blender_farm(2).await;
    let _serve = farm.serve(&[]).await;
    let events = render_array(&farm, "blender_adaptor").await;
    assert!(
        events.iter().any(|e| e["type"] == "JobProgress"),
        "progress from the adaptor"
    );
    // Relative to the adaptor's own folder; look for it anywhere below.
    let loads_file = files_under(farm.dir.path())
        .into_iter()
        .find(|p| p.ends_with("loads.txt"))
        .expect("loads.txt");
    let loads = std::fs::read_to_string(loads_file).unwrap();
    let loads = loads.lines().count();
    assert!(
        (1..=2).contains(&loads),
        "{loads} loads for 5 chunks on 2 slots"
    );
}

/// Submits one frame of the test shot to the adaptor; returns its message
/// id. Its PNG goes to `renders/MESSAGE_ID/1.png`.
async fn submit_frame(farm: &Farm) -> String {
    farm.submit(json!({
        "command": "blender_adaptor",
        "parameters": {"scene": "scene.blend", "frame": 1},
        "inputs": [
            {"bucket": "assets", "key": "shots/010/scene.blend", "path": "scene.blend"},
            {"bucket": "assets", "key": "shots/010/textures/checker.png", "path": "textures/checker.png"}
        ],
        "tasks": [{"name": "s3_upload", "config": {"bucket": "results",
                   "key": "renders/${message_id}/${frame}.${mime_ext}"}}]
    }))
    .await
}

/// The size of the frame a job rendered.
async fn rendered_size(farm: &Farm, message_id: &str) -> (u32, u32) {
    let (png, _) = farm
        .wait_for_object(&format!("renders/{message_id}/1.png"), LONG)
        .await;
    png_size(&png)
}

/// The adaptor's scene loads so far, as `(Blender's pid, path)`.
fn loads(farm: &Farm) -> Vec<(i32, String)> {
    files_under(farm.dir.path())
        .into_iter()
        .find(|p| p.ends_with("loads.txt"))
        .and_then(|path| std::fs::read_to_string(path).ok())
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (pid, path) = line.split_once(' ')?;
            Some((pid.parse().ok()?, path.to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_stops_a_long_blender_frame_within_2_s_and_the_slot_renders_the_next_scene() {
    if !have_blender() {
        return;
    }
    let farm = blender_farm(1).await;
    let scene_size = || {
        std::fs::metadata(farm.dir.path().join("assets/shots/010/scene.blend"))
            .unwrap()
            .len()
    };
    // A frame of hours: 640 pixels across at 100,000 samples.
    make_scene(&farm, 640, 100_000);
    let long_size = scene_size();
    let _serve = farm.serve(&[]).await;

    let long = submit_frame(&farm).await;
    // Progress comes from the render itself (Cycles' per-sample report):
    // the frame is being rendered.
    let progress = farm
        .wait_for_events(
            |e| e["type"] == "JobProgress" && e["message_id"] == long.as_str(),
            1,
            LONG,
        )
        .await;
    let job_id = progress[0]["job_id"].as_str().unwrap();
    let rendering = loads(&farm);
    assert_eq!(rendering.len(), 1, "{rendering:?}");
    let asked = chrono::Utc::now();
    let (code, _, err) = farm.cli(&["cancel", job_id]);
    assert_eq!(code, 0, "{err}");
    let cancelled = farm
        .wait_for_events(
            |e| e["type"] == "JobCancelled" && e["message_id"] == long.as_str(),
            1,
            LONG,
        )
        .await;
    let at: chrono::DateTime<chrono::Utc> = cancelled[0]["time"].as_str().unwrap().parse().unwrap();
    let took = (at - asked).to_std().unwrap_or_default();
    println!("a long Blender frame stopped {took:?} after its cancel");
    assert!(
        took < Duration::from_secs(2),
        "stopped {took:?} after the cancel"
    );
    // The adaptor answers a cancel only once that Blender is gone.
    assert!(
        !alive(rendering[0].0),
        "the Blender rendering the frame was killed"
    );

    // Another scene at the same key, the same size on disk: the slot's new
    // Blender renders it, not the one before.
    make_scene(&farm, 48, 4);
    assert_eq!(scene_size(), long_size, "the scenes differ only in content");
    let next = submit_frame(&farm).await;
    assert_eq!(rendered_size(&farm, &next).await, (48, 27));
    // The same scene again is not loaded again; a third one at the same
    // key, sent to the same Blender, is.
    let again = submit_frame(&farm).await;
    assert_eq!(rendered_size(&farm, &again).await, (48, 27));
    make_scene(&farm, 32, 4);
    assert_eq!(scene_size(), long_size, "the scenes differ only in content");
    let third = submit_frame(&farm).await;
    assert_eq!(rendered_size(&farm, &third).await, (32, 18));
    let loaded = loads(&farm);
    assert_eq!(loaded.len(), 3, "{loaded:?}");
    assert_ne!(
        loaded[1].0, rendering[0].0,
        "a new Blender after the cancel"
    );
    assert_eq!(
        loaded[2].0, loaded[1].0,
        "the same Blender for the later jobs"
    );
    assert!(
        !farm
            .events()
            .iter()
            .any(|e| e["type"] == "JobFailed" || e["type"] == "JobRequeued"),
        "{:?}",
        farm.events()
    );
}

/// Blender exits 0 when its `--python` script is missing (the README once
/// named `/opt/renderq/...`, which a clone lacks): the chunk fails with
/// Blender's own words, not only "wrote no output file".
#[tokio::test(flavor = "multi_thread")]
async fn blender_missing_its_script_fails_saying_so() {
    if !have_blender() {
        return;
    }
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_allowed: vec!["blender_render"],
            max_receive_count: 1,
            extra_toml: format!(
                "{AUDIT_AND_ASSETS}{}",
                blender_render_toml().replace(
                    &repo_path("examples/blender/render_frames.py"),
                    "/opt/renderq/examples/blender/render_frames.py",
                )
            ),
            ..Settings::default()
        },
    )
    .await;
    make_scene_in(&farm.dir.path().join("assets/shots/010"), 16, 1);
    let _serve = farm.serve(&[]).await;
    let id = farm
        .submit(serde_json::json!({"command": "blender_render",
            "parameters": {"scene": "scene.blend"},
            "inputs": [{"bucket": "assets", "key": "shots/010/scene.blend", "path": "scene.blend"}]}))
        .await;
    let end = crate::inputs::ended(&farm, &id).await;
    let reason = end["detail"]["reason"].as_str().unwrap_or_default();
    assert_eq!(end["type"], "JobDeadLettered", "{end}");
    assert!(reason.contains("wrote no output file"), "{end}");
    assert!(
        reason.contains(
            r#"Python file "/opt/renderq/examples/blender/render_frames.py" could not be opened"#
        ),
        "{end}"
    );
}
