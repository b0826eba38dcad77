//! The Python client (`clients/python/`) against real servers: every
//! endpoint method and its errors, `attach` to S3 (moto) and to a local
//! bucket, and interop with AWS Deadline Cloud's own library. The client
//! runs from its source folder, as scripts under `clients/python/tests/`
//! whose JSON output these tests check.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{AUDIT_AND_ASSETS, AWS_ENV, Backend, Farm, Moto, Settings, repo_path};
use crate::inputs::{ended, s3_farm, upload};

const LONG: Duration = Duration::from_secs(120);

/// `python3 SCRIPT ARGS` with the client's source on `PYTHONPATH` and
/// `env`; asserts success; returns its last stdout line as JSON.
pub(crate) fn client_script(script: &str, args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = Command::new("python3")
        .arg(repo_path(script))
        .args(args)
        .env("PYTHONPATH", repo_path("clients/python/src"))
        .envs(env.iter().copied())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{script} printed {stdout}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_submits_waits_cancels_redrives_and_raises_code_and_field() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            auth_token_env: Some("RQ_CLIENT_TOKEN"),
            extra_allowed: vec!["fails_quietly"],
            extra_toml: format!(
                r#"{AUDIT_AND_ASSETS}
[commands.fails_quietly]
kind = "process"
program = "{fail}"
"#,
                fail = repo_path("tests/fixtures/fail_exit_zero.py")
            ),
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[("RQ_CLIENT_TOKEN", "s3cret")]).await;
    let out = client_script(
        "clients/python/tests/api_roundtrip.py",
        &[&farm.url()],
        &[("RENDERQ_TOKEN", "s3cret")],
    );

    assert_eq!(
        out["commands"],
        json!(["fails_quietly", "get_version", "render_demo", "sleep"])
    );
    assert_eq!(out["plain"]["kind"], "job", "{out}");
    assert_eq!(out["plain"]["state"], "succeeded", "{out}");
    assert_eq!(
        out["plain_progress"].as_array().unwrap().last().unwrap(),
        "succeeded",
        "wait reports each new status, the final one last: {out}"
    );
    assert_eq!(out["array_ids"], 2);
    assert_eq!(out["array"]["kind"], "array", "{out}");
    assert_eq!(out["array"]["size"], 2, "{out}");
    assert_eq!(out["array"]["succeeded"], 2, "{out}");
    assert_eq!(out["cancelled"]["state"], "cancelled", "{out}");
    assert_eq!(out["failed"]["state"], "dead_lettered", "{out}");
    assert!(
        out["failed"]["reason"]
            .as_str()
            .unwrap()
            .contains("licence server unreachable"),
        "{out}"
    );
    assert_eq!(out["redrive"]["redriven"], 1, "{out}");
    assert_eq!(out["stats_before_redrive"]["dead_lettered"], 1, "{out}");
    // The notification the array asked for, with its vars.
    let completed = farm
        .wait_for_events(|e| e["type"] == "ArrayJobCompleted", 1, LONG)
        .await;
    assert!(
        completed.iter().any(|e| e["vars"]["shot"] == "010"),
        "{completed:?}"
    );

    // Errors: the JSON-RPC code (or the HTTP status before any JSON was
    // read) and `data.field`.
    assert_eq!(out["bad_token"]["code"], 401, "{out}");
    assert_eq!(out["unknown_command"]["code"], -32602, "{out}");
    assert_eq!(out["unknown_command"]["field"], "command", "{out}");
    assert_eq!(out["refused_field"]["code"], -32602, "{out}");
    assert_eq!(out["refused_field"]["field"], "inputs[0].path", "{out}");
    assert_eq!(out["unknown_method"]["code"], -32601, "{out}");
    assert_eq!(out["unknown_method"]["field"], Value::Null, "{out}");
    assert_eq!(out["no_such_job"]["field"], "job_id", "{out}");
}

/// Moto's credentials and region, for the client's boto3.
fn aws_env() -> Vec<(&'static str, &'static str)> {
    let mut env = AWS_ENV.to_vec();
    env.push(("AWS_DEFAULT_REGION", "us-east-1"));
    env
}

/// Runs `list_inputs` on `input`; returns its listing of the job folder.
async fn staged(farm: &Farm, input: &Value, name: &str) -> Value {
    let id = farm
        .submit(json!({"command": "list_inputs", "inputs": [input], "tasks": [upload(name)]}))
        .await;
    let end = ended(farm, &id).await;
    assert_eq!(end["type"], "JobSucceeded", "{end}");
    let (listing, _) = farm.object(name).await.unwrap();
    serde_json::from_slice(&listing).unwrap()
}

/// 10,000 files of 1 KiB (deadline-cloud #478), to a local bucket so that
/// the suite stays quick (against moto the same attach took 64 s, and 10
/// listing calls when unchanged: README, Benchmarks).
#[tokio::test(flavor = "multi_thread")]
async fn attach_of_10000_small_files_uploads_each_once_and_the_worker_stages_them() {
    let farm = crate::inputs::farm().await;
    let bucket = farm.dir.path().join("assets");
    let shot = tempfile::tempdir().unwrap();
    let folder = shot.path().to_str().unwrap();
    let attach = |make: bool| {
        let mut args = vec![
            bucket.to_str().unwrap(),
            "assets",
            folder,
            "--dest",
            "many/",
        ];
        if make {
            args.extend(["--make", "10000", "1024"]);
        }
        client_script("clients/python/tests/attach_folder.py", &args, &[])
    };
    let first = attach(true);
    println!(
        "attach of 10,000 files of 1 KiB to a local bucket: {} s, calls {}",
        first["seconds"], first["calls"]
    );
    assert_eq!(first["files"], 10_000, "{first}");
    assert_eq!(
        first["uploaded"], 10_001,
        "every file and the manifest: {first}"
    );
    assert_eq!(first["calls"]["puts"], 10_001, "{first}");

    let second = attach(false);
    println!(
        "again, unchanged: {} s, calls {}",
        second["seconds"], second["calls"]
    );
    assert_eq!(second["uploaded"], 0, "{second}");
    assert_eq!(second["calls"]["puts"], 0, "{second}");
    assert_eq!(second["input"], first["input"], "the same manifest");

    let _serve = farm.serve(&[]).await;
    let submitted = std::time::Instant::now();
    let id = farm
        .submit(json!({"command": "list_inputs", "inputs": [first["input"]],
                       "tasks": [upload("many.json")]}))
        .await;
    let end = farm
        .wait_for_events(
            |e| {
                e["message_id"] == id.as_str()
                    && matches!(e["type"].as_str(), Some("JobSucceeded" | "JobDeadLettered"))
            },
            1,
            Duration::from_secs(600),
        )
        .await;
    assert_eq!(end[0]["type"], "JobSucceeded", "{end:?}");
    let started = farm
        .events()
        .into_iter()
        .find(|e| e["type"] == "JobStarted" && e["message_id"] == id.as_str())
        .unwrap();
    println!(
        "the worker staged them: {}; succeeded {:?} after the submit",
        started["detail"]["inputs"],
        submitted.elapsed()
    );
    let (listing, _) = farm.object("many.json").await.unwrap();
    let listing: Value = serde_json::from_slice(&listing).unwrap();
    assert_eq!(listing.as_object().unwrap().len(), 10_000);
    let file = &listing["many/part004/file04321.bin"];
    assert_eq!(file["size"], 1024, "{file}");
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_to_a_local_bucket_uploads_only_what_it_lacks() {
    let farm = crate::inputs::farm().await;
    let bucket = farm.dir.path().join("assets");
    let shot = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("scene.txt", "the scene"),
        ("tex/a.png", "a"),
        ("tex/b.png", "a"),
        ("c.txt", "c"),
    ] {
        let path = shot.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let attach = || {
        client_script(
            "clients/python/tests/attach_folder.py",
            &[
                bucket.to_str().unwrap(),
                "assets",
                shot.path().to_str().unwrap(),
            ],
            &[],
        )
    };
    let first = attach();
    // Four files, three contents, and the manifest.
    assert_eq!(first["uploaded"], 4, "{first}");
    assert_eq!(first["files"], 4, "{first}");
    // An upload cut short: one object never arrived. The next attach
    // sends that one alone (the manifest is already there).
    let data = bucket.join("Data");
    let gone = std::fs::read_dir(&data)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&gone).unwrap();
    let second = attach();
    let name = gone.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        second["uploaded_keys"],
        json!([format!("Data/{name}")]),
        "{second}"
    );

    let _serve = farm.serve(&[]).await;
    let listing = staged(&farm, &first["input"], "local.json").await;
    assert_eq!(
        listing["inputs/scene.txt"]["text"], "the scene",
        "{listing}"
    );
    assert_eq!(listing["inputs/tex/b.png"]["size"], 1, "{listing}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deadline_cloud_and_the_client_read_each_others_manifests() {
    let farm = s3_farm("").await;
    let aws = farm.aws.as_ref().unwrap();
    let endpoint = Moto::shared().endpoint();
    let shot = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("scene.txt", "the scene"),
        ("tex/a.png", "same"),
        ("tex/b.png", "same"),
        ("sub/empty.txt", ""),
    ] {
        let path = shot.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let folder = shot.path().to_str().unwrap();
    let theirs = client_script(
        "tests/fixtures/deadline_upload.py",
        &[&endpoint, &aws.bucket, "JobAttachments", folder],
        &aws_env(),
    );
    let theirs = theirs["manifest"].as_str().unwrap();
    let out = client_script(
        "clients/python/tests/deadline_interop.py",
        &[&endpoint, &aws.bucket, "JobAttachments", folder, theirs],
        &aws_env(),
    );
    // Deadline's library parses the client's manifest, and it lists what
    // Deadline's own lists: paths, hashes, sizes and mtimes.
    assert_eq!(out["ours"], out["deadline"], "{out}");
    assert_eq!(out["ours"].as_array().unwrap().len(), 4, "{out}");
    // Deadline's uploader left every Data/ object: the client sends only
    // its manifest.
    let uploaded = out["uploaded_keys"].as_array().unwrap();
    assert_eq!(uploaded.len(), 1, "{out}");
    assert!(
        uploaded[0]
            .as_str()
            .unwrap()
            .starts_with("JobAttachments/Manifests/"),
        "{out}"
    );

    // And renderq stages the client's manifest to those files.
    let _serve = farm.serve(&AWS_ENV).await;
    let listing = staged(&farm, &out["input"], "interop.json").await;
    for row in out["deadline"].as_array().unwrap() {
        let placed = &listing[format!("shot/{}", row[0].as_str().unwrap())];
        assert_eq!(placed["size"], row[2], "{listing}");
        assert_eq!(placed["mtime_us"], row[3], "{listing}");
    }
}
