//! `examples/pipeline/` end to end with Debian's Blender and ffmpeg: its
//! commands (taken from the example's own `workers.toml`) and its
//! `submit.py`. Must-show 1 of issue 27: 24 rendered PNGs, 24 composites,
//! one MP4 that ffprobe reads as 24 frames, each composite started after
//! its own render frame and released (frame by frame) before the last
//! render finished.
//! The same three stages also run one after the other, without
//! dependencies (`submit.py --sequential`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{AUDIT_AND_ASSETS, Backend, Farm, Settings, png_size, repo_path};

const LONG: Duration = Duration::from_secs(600);

fn have(program: &str, package: &str) -> bool {
    let found = Command::new(program)
        .arg(if program == "blender" {
            "--version"
        } else {
            "-version"
        })
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        crate::harness::skip(program, &format!("Debian package `{package}`"));
    }
    found
}

/// The example's command tables, with `{config_dir}` paths made this
/// farm's: its scripts in the repository, its results bucket the farm's.
fn example_commands(farm: &Farm) -> String {
    let text = std::fs::read_to_string(repo_path("examples/pipeline/workers.toml")).unwrap();
    let commands = &text[text.find("[commands.").expect("command tables")..];
    commands
        .replace(
            "{config_dir}/var/results",
            farm.bucket_root().to_str().unwrap(),
        )
        .replace("{config_dir}/..", &repo_path("examples"))
        .replace("{config_dir}", &repo_path("examples/pipeline"))
}

/// A farm set up as the example's `workers.toml` is: two slots, one queue,
/// and the test shot in `assets`.
async fn pipeline_farm() -> Farm {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_allowed: vec!["blender_render", "pipeline_composite", "pipeline_encode"],
            worker_toml: "slots = 2".into(),
            ..Settings::default()
        },
    )
    .await;
    let extra = format!("{AUDIT_AND_ASSETS}\n{}", example_commands(&farm));
    let config = std::fs::read_to_string(&farm.config).unwrap() + &extra;
    std::fs::write(&farm.config, config).unwrap();
    let made = Command::new("blender")
        .args(["-b", "--factory-startup", "--python"])
        .arg(repo_path("examples/blender/make_scene.py"))
        .arg("--")
        .arg(farm.dir.path().join("assets/shots/010"))
        .args(["64", "2"])
        .output()
        .expect("run blender");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    farm
}

/// Runs `submit.py` against the farm; its JSON answer.
async fn submit(farm: &Farm, extra: &[&str]) -> Value {
    let mut command = Command::new("python3");
    command
        .arg(repo_path("examples/pipeline/submit.py"))
        .args([
            "--url",
            &farm.url(),
            "--timeout",
            "500",
            "--owner",
            "pipeline-test",
        ])
        .args(extra);
    let out = tokio::task::spawn_blocking(move || command.output().expect("run submit.py"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "submit.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("submit.py prints JSON")
}

/// The PNGs under `dir`, by frame.
fn frames_in(dir: &Path) -> Vec<u32> {
    let mut frames: Vec<u32> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".png")?.parse().ok()
        })
        .collect();
    frames.sort_unstable();
    frames
}

/// Checks the three stages' outputs: 24 renders, 24 composites of the
/// same size, and an MP4 of 24 frames.
async fn check_outputs(farm: &Farm, ids: &Value) {
    // The movie is the last stage's: once it is there, so is the rest.
    let movie = ids["movie"].as_str().unwrap();
    let (_, content_type) = farm.wait_for_object(movie, LONG).await;
    assert_eq!(content_type, "video/mp4");
    let root = farm.bucket_root();
    let renders = root.join(format!("renders/{}", ids["render"].as_str().unwrap()));
    let comps = root.join(format!("comps/{}", ids["composite"].as_str().unwrap()));
    let all: Vec<u32> = (1..=24).collect();
    assert_eq!(frames_in(&renders), all);
    assert_eq!(frames_in(&comps), all);
    let comp = std::fs::read(comps.join("12.png")).unwrap();
    assert_eq!(png_size(&comp), (64, 36));
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames,codec_name",
            "-of",
            "json",
        ])
        .arg(root.join(movie))
        .output()
        .expect("run ffprobe");
    let probed: Value = serde_json::from_slice(&probe.stdout).expect("ffprobe JSON");
    let stream = &probed["streams"][0];
    assert_eq!(stream["nb_read_frames"], "24", "{probed}");
    assert_eq!(stream["codec_name"], "h264", "{probed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_stages_run_one_after_the_other_without_dependencies() {
    if !have("blender", "blender") || !have("ffmpeg", "ffmpeg") {
        return;
    }
    let farm = pipeline_farm().await;
    let _serve = farm.serve(&[]).await;
    let ids = submit(&farm, &["--sequential"]).await;
    check_outputs(&farm, &ids).await;
    let encoded = farm
        .wait_for_events(
            |e| e["type"] == "JobSucceeded" && e["message_id"] == ids["encode"],
            1,
            LONG,
        )
        .await;
    assert_eq!(encoded[0]["name"], "shot010_encode");
    assert_eq!(encoded[0]["owner"], "pipeline-test");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_example_renders_composites_and_encodes_with_frame_level_release() {
    if !have("blender", "blender") || !have("ffmpeg", "ffmpeg") {
        return;
    }
    let farm = pipeline_farm().await;
    let _serve = farm.serve(&[]).await;
    let ids = submit(&farm, &[]).await;
    check_outputs(&farm, &ids).await;

    // Frame-level release: each composite was released by the render child
    // that holds its frame (not by the whole array), so the first ones were
    // in the queue before the last render child succeeded; and none started
    // before its render ended.
    let events = farm.events();
    let of = |array: &Value, kind: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["type"] == kind && e["array"]["job_id"] == *array)
            .collect()
    };
    let rendered = of(&ids["render"], "JobSucceeded");
    let started = of(&ids["composite"], "JobStarted");
    let released = of(&ids["composite"], "JobReleased");
    assert_eq!(rendered.len(), 12);
    assert_eq!(started.len(), 24);
    assert_eq!(released.len(), 24, "each composite released once");
    let render_done = |frame: i64| {
        rendered
            .iter()
            .find(|e| {
                e["detail"]["outputs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|o| o.as_str().unwrap().ends_with(&format!("/{frame}.png")))
            })
            .map(|e| crate::harness::event_millis(e))
            .unwrap_or_else(|| panic!("no render of frame {frame}"))
    };
    let frame_of = |e: &Value| i64::from(e["array"]["index"].as_u64().unwrap() as u32) + 1;
    let last_render = rendered
        .iter()
        .map(|e| crate::harness::event_millis(e))
        .max()
        .unwrap();
    for start in &started {
        let frame = frame_of(start);
        assert!(
            crate::harness::event_millis(start) >= render_done(frame),
            "composite of frame {frame} started before its render ended"
        );
    }
    let first_release = released
        .iter()
        .map(|e| crate::harness::event_millis(e))
        .min()
        .unwrap();
    assert!(
        first_release < last_render,
        "no composite was released before the last render frame finished"
    );
}
