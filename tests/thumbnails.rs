//! Image outputs decoded in the thumbnail sandbox: a hostile or damaged
//! image costs its thumbnail (one warning naming the job and the file),
//! never the job or the worker; an 8K half-float EXR gets its thumbnail
//! within the default limits.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{AUDIT_AND_ASSETS, BIN, Backend, Farm, Proc, Settings, files_under};
use renderq::bench::thumbs::{exr_881_bytes, exr_bomb, exr_half_rgba};
use renderq::config::ThumbnailsConfig;
use renderq::worker::thumbs::sandbox::SandboxError;
use renderq::worker::thumbs::{Thumbnailer, WIDTH};

const LONG: Duration = Duration::from_secs(180);

/// A farm whose `emit` command copies a file from the farm's folder into
/// the job's folder as its output (its type from its extension: no
/// `output_mime`), with events in `events.jsonl`, and `more_toml`.
async fn emitting_farm(more_toml: &str) -> Farm {
    Farm::new(
        Backend::Local,
        Settings {
            extra_toml: format!(
                r#"{AUDIT_AND_ASSETS}
{more_toml}
[commands.emit]
kind = "process"
program = "cp"
args = ["{{config_dir}}/{{file}}", "{{workdir}}/{{file}}"]
output = "{{workdir}}/{{file}}"
timeout = "60s"
[commands.emit.parameters]
file = {{ type = "string", required = true, pattern = "^[a-z0-9_]+\\.(exr|png)$" }}
"#
            ),
            extra_allowed: vec!["emit"],
            ..Settings::default()
        },
    )
    .await
}

/// Submits `emit` of `file` and waits for its `JobSucceeded`.
async fn emit(farm: &Farm, file: &str) -> Value {
    let message_id = farm
        .submit(json!({"command": "emit", "parameters": {"file": file}}))
        .await;
    let found = farm
        .wait_for_events(
            |e| e["message_id"] == message_id && e["type"] == "JobSucceeded",
            1,
            LONG,
        )
        .await;
    found[0].clone()
}

/// The thumbnails kept beside the queue's ledger for a message.
fn kept_thumbnails(farm: &Farm, message_id: &str) -> usize {
    files_under(farm.dir.path())
        .iter()
        .filter(|p| {
            let p = p.to_string_lossy();
            p.contains("/thumbnails/") && p.contains(message_id)
        })
        .count()
}

/// The worker's "no thumbnail" warnings that name `file`.
fn warnings_about(serve: &Proc, file: &str) -> Vec<String> {
    serve
        .log_text()
        .lines()
        .filter(|line| line.contains("no thumbnail") && line.contains(file))
        .map(str::to_owned)
        .collect()
}

/// A 100000x100000 RGBA PNG: a valid signature and header, then the first
/// two bytes of a zlib stream as its only pixel data.
fn huge_png() -> Vec<u8> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, 100_000, 100_000);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().expect("a PNG header");
        writer
            .write_chunk(png::chunk::IDAT, &[0x78, 0x9c])
            .expect("an IDAT chunk");
        // Dropping the writer ends the file (IEND).
    }
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_and_damaged_image_outputs_cost_their_thumbnail_not_the_job_or_the_worker() {
    let farm = emitting_farm("").await;
    let bomb = exr_bomb();
    assert_eq!(bomb.len(), 881);
    std::fs::write(farm.dir.path().join("bomb.exr"), &bomb).unwrap();
    std::fs::write(farm.dir.path().join("huge.png"), huge_png()).unwrap();
    let whole = exr_half_rgba(256, 256).unwrap();
    std::fs::write(
        farm.dir.path().join("truncated.exr"),
        &whole[..whole.len() / 2],
    )
    .unwrap();
    std::fs::write(farm.dir.path().join("small.exr"), &whole).unwrap();
    let mut serve = farm.serve(&[]).await;

    for file in ["bomb.exr", "huge.png", "truncated.exr"] {
        let succeeded = emit(&farm, file).await;
        let message_id = succeeded["message_id"].as_str().unwrap();
        let job_id = succeeded["job_id"].as_str().unwrap();
        assert_eq!(succeeded["detail"]["thumbnails"], json!([]), "{file}");
        assert_eq!(kept_thumbnails(&farm, message_id), 0, "{file}");
        // The job's end is published after its thumbnails were tried, so
        // the warning is in the log by now.
        let warnings = warnings_about(&serve, file);
        assert_eq!(warnings.len(), 1, "{file}: {warnings:#?}");
        assert!(warnings[0].contains(job_id), "{}", warnings[0]);
        assert!(
            serve.child.try_wait().unwrap().is_none(),
            "serve died on {file}:\n{}",
            serve.log_text()
        );
    }
    let log = serve.log_text();
    assert!(
        log.contains("refused: its data window is 1000000000x1 pixels"),
        "{log}"
    );
    assert!(log.contains("refused: it is 100000x100000 pixels"), "{log}");

    // The same worker carries on, and still makes thumbnails: of an EXR
    // whose type came from its extension.
    let succeeded = emit(&farm, "small.exr").await;
    let message_id = succeeded["message_id"].as_str().unwrap();
    assert_eq!(
        succeeded["detail"]["thumbnails"],
        json!([format!("{message_id}/0.jpg")])
    );
    assert_eq!(kept_thumbnails(&farm, message_id), 1);
    assert_eq!(warnings_about(&serve, "small.exr"), Vec::<String>::new());
    assert!(serve.child.try_wait().unwrap().is_none());
    serve.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(serve.wait_exit(LONG), Some(0), "{}", serve.log_text());
}

/// The default memory and CPU limits are what the decode's cost is held
/// to; the wall-clock bound only guards against a starved child, so it is
/// lifted here, where the test machine's load would decide it.
#[tokio::test(flavor = "multi_thread")]
async fn an_8k_half_float_exr_output_gets_its_thumbnail_within_the_default_memory_and_cpu_limits() {
    let farm = emitting_farm("[worker.thumbnails]\ntimeout = \"10m\"").await;
    let exr = exr_half_rgba(7680, 4320).unwrap();
    std::fs::write(farm.dir.path().join("frame_8k.exr"), &exr).unwrap();
    let _serve = farm.serve(&[]).await;
    let succeeded = emit(&farm, "frame_8k.exr").await;
    let message_id = succeeded["message_id"].as_str().unwrap();
    let thumbnail = files_under(farm.dir.path())
        .into_iter()
        .find(|p| {
            p.to_string_lossy()
                .contains(&format!("/thumbnails/{message_id}/0.jpg"))
        })
        .expect("a thumbnail kept");
    let jpeg = image::open(&thumbnail).expect("a JPEG");
    assert_eq!((jpeg.width(), jpeg.height()), (WIDTH, WIDTH * 4320 / 7680));
}

/// The limits alone, with the header check's budget lifted and a display
/// window as wide as the data window (so the overscan check passes too):
/// the decoder's allocation fails inside the child's address-space limit,
/// and the caller gets an error, not an abort.
#[tokio::test(flavor = "multi_thread")]
async fn the_address_space_limit_stops_the_exr_bomb_when_the_header_check_lets_it_through() {
    let sandbox = Thumbnailer::new(
        &ThumbnailsConfig {
            max_pixels: u64::MAX / 64,
            program: Some(BIN.into()),
            ..ThumbnailsConfig::default()
        },
        renderq::access::JobUser::Worker,
    )
    .unwrap();
    let wide = [0, 0, 999_999_999, 0];
    let output =
        renderq::job::Output::bytes(exr_881_bytes(wide, wide), "image/x-exr".parse().unwrap());
    let error = sandbox.make(&output).await.unwrap_err();
    // Rust aborts when an allocation fails.
    assert!(
        matches!(&error, SandboxError::Crashed { signal, .. } if signal == "SIGABRT"),
        "{error}"
    );
}
