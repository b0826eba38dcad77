//! Inputs from jobs that do not trust each other, and from clients that
//! are not renderq: a job that rewrites its inputs, buckets that share a
//! name, sizes that lie, missing `Data/` objects, and manifests written by
//! AWS Deadline Cloud's own uploader.

use serde_json::{Value, json};

use crate::harness::{Farm, files_under};
use crate::inputs::{ended, farm, put_asset, s3_farm, upload, xxh128};

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Issue 25's attack: a job writes as many bytes as each of its inputs has
/// (making it writable first), puts mode and mtime back; the next job gets
/// the admitted bytes, from the cache, and the cache holds only them.
/// `user`: the worker's own user (root when `None`). A job running as the
/// worker's user gets files it may rewrite (copies); one running as a job
/// user (`job_user`) is refused every write. Returns how the worker said
/// it places inputs.
pub(crate) async fn rewritten_inputs_do_not_reach_the_next_job(
    farm: &Farm,
    user: Option<&str>,
    job_user: bool,
) -> String {
    let scene = b"the admitted scene".to_vec();
    let texture = b"pixels".repeat(1000);
    let notes = b"notes".to_vec();
    put_asset(farm, "shots/010/scene.txt", &scene);
    let mut paths = Vec::new();
    for (path, bytes) in [("tex/wood.png", &texture), ("notes.txt", &notes)] {
        put_asset(farm, &format!("Data/{}.xxh128", xxh128(bytes)), bytes);
        paths.push(json!({"path": path, "hash": xxh128(bytes), "size": bytes.len(), "mtime": 1_700_000_000_000_000i64}));
    }
    let manifest = json!({"hashAlg": "xxh128", "manifestVersion": "2023-03-03", "paths": paths,
        "totalSize": texture.len() + notes.len()});
    put_asset(
        farm,
        "manifests/shot010.json",
        manifest.to_string().as_bytes(),
    );
    let serve = match user {
        None => farm.serve(&[]).await,
        Some(user) => farm.serve_as(user).await,
    };
    let inputs = json!([
        {"bucket": "assets", "key": "shots/010/scene.txt", "path": "scene.txt"},
        {"bucket": "assets", "manifest": "manifests/shot010.json", "path": "shot010/"}
    ]);
    let attack = farm
        .submit(
            json!({"command": "attack_inputs", "inputs": inputs, "tasks": [upload("attack.json")]}),
        )
        .await;
    let end = ended(farm, &attack).await;
    assert_eq!(end["type"], "JobSucceeded", "{end}");
    let (report, _) = farm.object("attack.json").await.unwrap();
    let report: Value = serde_json::from_slice(&report).unwrap();
    println!("the attack: {report}");
    for path in ["scene.txt", "shot010/tex/wood.png", "shot010/notes.txt"] {
        let done = report[path].as_str().unwrap_or_default();
        match job_user {
            false => assert_eq!(done, "rewritten, size, mtime and mode restored", "{report}"),
            true => assert!(done.starts_with("refused: "), "{report}"),
        }
    }

    let next = farm
        .submit(json!({"command": "list_inputs", "inputs": inputs, "tasks": [upload("next.json")]}))
        .await;
    assert_eq!(ended(farm, &next).await["type"], "JobSucceeded");
    let (listing, _) = farm.object("next.json").await.unwrap();
    let listing: Value = serde_json::from_slice(&listing).unwrap();
    for (path, bytes) in [
        ("scene.txt", &scene),
        ("shot010/tex/wood.png", &texture),
        ("shot010/notes.txt", &notes),
    ] {
        assert_eq!(listing[path]["sha256"], sha256(bytes), "{path}: {listing}");
    }
    let started = farm
        .events()
        .into_iter()
        .find(|e| e["type"] == "JobStarted" && e["message_id"] == next.as_str())
        .unwrap();
    assert_eq!(
        started["detail"]["inputs"]["bytes_from_cache"],
        scene.len() + texture.len() + notes.len(),
        "served from the cache, which the attack did not reach: {started}"
    );
    let admitted = [sha256(&scene), sha256(&texture), sha256(&notes)];
    let blobs = files_under(&farm.work_dir().join("renderq-cache/blobs"));
    assert_eq!(blobs.len(), 3, "{blobs:?}");
    for blob in blobs {
        assert!(
            admitted.contains(&sha256(&std::fs::read(&blob).unwrap())),
            "{blob:?}"
        );
    }
    let log = serve.log_text();
    let placement = log
        .lines()
        .find(|line| line.contains("inputs reach job folders as"))
        .unwrap_or_else(|| panic!("the worker never said how it places inputs:\n{log}"));
    println!("{placement}");
    placement.to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_rewrites_its_inputs_and_restores_mtime_and_mode_changes_no_later_job() {
    rewritten_inputs_do_not_reach_the_next_job(&farm().await, None, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_rewrites_its_inputs_changes_no_later_job_of_an_unprivileged_worker() {
    let Some(user) = crate::harness::unprivileged_user() else {
        return;
    };
    rewritten_inputs_do_not_reach_the_next_job(&farm().await, Some(user), false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_xfs_inputs_are_reflink_copies_that_no_job_can_write_back() {
    let farm = farm().await;
    // The work folder (job folders and the cache under it) on XFS.
    let xfs = renderq::bench::cache::xfs::Mounted::xfs(
        &farm.dir.path().join("xfs.img"),
        &farm.work_dir(),
        300,
    );
    let Ok(_xfs) = xfs.map_err(|why| println!("SKIPPED: cannot mount an XFS image here: {why}"))
    else {
        return;
    };
    let placement = rewritten_inputs_do_not_reach_the_next_job(&farm, None, false).await;
    assert!(placement.contains("reflink copies"), "{placement}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sizes_that_lie_are_refused_and_the_cache_keeps_serving_what_it_held() {
    let farm = farm().await;
    let texture = b"pixels".repeat(1000);
    let hash = xxh128(&texture);
    put_asset(&farm, &format!("Data/{hash}.xxh128"), &texture);
    let manifest = |size: u64| {
        json!({"hashAlg": "xxh128", "manifestVersion": "2023-03-03",
            "paths": [{"path": "tex/wood.png", "hash": hash, "size": size, "mtime": 0}]})
        .to_string()
    };
    put_asset(
        &farm,
        "manifests/good.json",
        manifest(texture.len() as u64).as_bytes(),
    );
    put_asset(&farm, "manifests/huge.json", manifest(1 << 63).as_bytes());
    put_asset(
        &farm,
        "manifests/other.json",
        manifest(texture.len() as u64 + 1).as_bytes(),
    );
    let _serve = farm.serve(&[]).await;
    let job = |manifest: &str| {
        json!({"command": "list_inputs",
            "inputs": [{"bucket": "assets", "manifest": format!("manifests/{manifest}.json"), "path": "m/"}]})
    };
    let good = farm.submit(job("good")).await;
    assert_eq!(ended(&farm, &good).await["type"], "JobSucceeded");
    for (manifest, why) in [
        (
            "huge",
            "9223372036854775808 bytes; more than the input cache may hold (worker.cache.max_size",
        ),
        (
            "other",
            "6001 bytes are claimed, but the content is 6000 bytes",
        ),
    ] {
        let id = farm.submit(job(manifest)).await;
        let end = ended(&farm, &id).await;
        assert_eq!(end["type"], "JobDeadLettered", "{end}");
        assert_eq!(end["attempt"], 1, "no retry: {end}");
        let reason = end["detail"]["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{manifest}: {reason}");
        assert!(reason.contains("tex/wood.png"), "names the file: {reason}");
    }
    let again = farm.submit(job("good")).await;
    assert_eq!(ended(&farm, &again).await["type"], "JobSucceeded");
    let started = farm
        .events()
        .into_iter()
        .find(|e| e["type"] == "JobStarted" && e["message_id"] == again.as_str())
        .unwrap();
    assert_eq!(
        started["detail"]["inputs"]["bytes_from_cache"],
        texture.len(),
        "{started}"
    );
    assert_eq!(
        started["detail"]["inputs"]["bytes_downloaded"], 0,
        "{started}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_data_object_or_a_short_one_is_dead_lettered_at_once() {
    let farm = s3_farm("").await;
    let aws = farm.aws.as_ref().unwrap();
    let small = b"eleven byte".to_vec();
    let hash = xxh128(&small);
    aws.s3
        .put_object()
        .bucket(&aws.bucket)
        .key(format!("Data/{hash}.xxh128"))
        .body(small.clone().into())
        .send()
        .await
        .unwrap();
    let missing = xxh128(b"never uploaded");
    for (name, hash, size) in [("missing", &missing, 14u64), ("short", &hash, 20 << 20)] {
        let manifest = json!({"hashAlg": "xxh128", "manifestVersion": "2023-03-03",
            "paths": [{"path": "a.bin", "hash": hash, "size": size, "mtime": 0}]});
        aws.s3
            .put_object()
            .bucket(&aws.bucket)
            .key(format!("manifests/{name}.json"))
            .body(manifest.to_string().into_bytes().into())
            .send()
            .await
            .unwrap();
    }
    let _serve = farm.serve(&crate::harness::AWS_ENV).await;
    for (name, why) in [
        ("missing", format!("Data/{missing}.xxh128: no such object")),
        // (Whichever range answers first: the one that shows the object's
        // size, or the one past its end.)
        ("short", "20971520 bytes claimed".to_owned()),
    ] {
        let id = farm
            .submit(json!({"command": "list_inputs",
                "inputs": [{"bucket": "assets", "manifest": format!("manifests/{name}.json"), "path": "m/"}]}))
            .await;
        let end = ended(&farm, &id).await;
        assert_eq!(end["type"], "JobDeadLettered", "{end}");
        assert_eq!(end["attempt"], 1, "no retry: {end}");
        let reason = end["detail"]["reason"].as_str().unwrap();
        assert!(reason.contains(&why), "{name}: {reason}");
        assert!(reason.contains("bucket `assets`"), "{reason}");
    }
    assert!(files_under(&farm.work_dir().join("renderq-cache/blobs")).is_empty());
}

/// Sets a file's modification time in microseconds since the epoch
/// (negative before 1970).
fn set_mtime_us(path: &std::path::Path, micros: i64) {
    let time = renderq::storage::cache::from_micros(micros);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(time)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_written_by_deadlines_own_uploader_is_staged_without_a_data_prefix() {
    use std::os::unix::ffi::OsStrExt;
    let farm = s3_farm("").await;
    let aws = farm.aws.as_ref().unwrap();
    // A shot as an artist's disk holds it: two files of one content with
    // their own times, two empty files, a name that is not UTF-8 and a
    // file last changed before 1970.
    let same = b"same".repeat(10);
    let files: [(&[u8], &[u8], i64, &str); 7] = [
        (
            b"scene.txt",
            b"the scene",
            1_700_000_000_123_456,
            "scene.txt",
        ),
        (b"tex/a.png", &same, 1_700_000_001_000_000, "tex/a.png"),
        (b"tex/b.png", &same, 1_600_000_000_123_456, "tex/b.png"),
        (b"empty1.txt", b"", 1_700_000_002_000_000, "empty1.txt"),
        (
            b"sub/empty2.txt",
            b"",
            1_500_000_000_000_001,
            "sub/empty2.txt",
        ),
        (
            b"bad\xffname.txt",
            b"bad name",
            1_700_000_003_000_000,
            r"bad\xffname.txt",
        ),
        (b"old.txt", b"before 1970", -86_400_500_000, "old.txt"),
    ];
    let shot = farm.dir.path().join("artist/shot");
    for (name, bytes, mtime, _) in &files {
        let path = shot.join(std::ffi::OsStr::from_bytes(name));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        set_mtime_us(&path, *mtime);
    }
    let out = std::process::Command::new("python3")
        .arg(crate::harness::repo_path(
            "tests/fixtures/deadline_upload.py",
        ))
        .arg(crate::harness::Moto::shared().endpoint())
        .arg(&aws.bucket)
        .arg("JobAttachments")
        .arg(&shot)
        .output()
        .expect("run the deadline uploader");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uploaded: Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = uploaded["manifest"].as_str().unwrap();
    println!("Deadline's uploader wrote {manifest}");
    assert!(
        manifest.starts_with("JobAttachments/Manifests/farm-"),
        "{manifest}"
    );

    let _serve = farm.serve(&crate::harness::AWS_ENV).await;
    let id = farm
        .submit(json!({"command": "list_inputs",
            "inputs": [{"bucket": "assets", "manifest": manifest, "path": "shot/"}],
            "tasks": [upload("deadline.json")]}))
        .await;
    let end = ended(&farm, &id).await;
    assert_eq!(end["type"], "JobSucceeded", "{end}");
    let (listing, _) = farm.object("deadline.json").await.unwrap();
    let listing: Value = serde_json::from_slice(&listing).unwrap();
    assert_eq!(listing.as_object().unwrap().len(), files.len(), "{listing}");
    for (_, bytes, mtime, shown) in &files {
        let placed = &listing[format!("shot/{shown}")];
        assert_eq!(placed["sha256"], sha256(bytes), "{shown}: {listing}");
        assert_eq!(placed["size"], bytes.len(), "{shown}");
        assert_eq!(
            placed["mtime_us"], *mtime,
            "{shown}: its own manifest mtime"
        );
    }

    // On this warm worker: the same store named without its trailing
    // slash is the same store; a store that does not hold the files gets
    // no hit from the one that does.
    for (prefix, served) in [("JobAttachments/Data", true), ("Elsewhere/Data/", false)] {
        let id = farm
            .submit(json!({"command": "list_inputs",
                "inputs": [{"bucket": "assets", "manifest": manifest, "path": "shot/", "data_prefix": prefix}]}))
            .await;
        let end = ended(&farm, &id).await;
        if served {
            assert_eq!(end["type"], "JobSucceeded", "{prefix}: {end}");
        } else {
            assert_eq!(end["type"], "JobDeadLettered", "{prefix}: {end}");
            let reason = end["detail"]["reason"].as_str().unwrap();
            assert!(
                reason.contains("Elsewhere/Data/") && reason.contains("no such object"),
                "{reason}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_blob_crosses_a_bucket_identity() {
    let farm = farm().await;
    // Two buckets that one config calls `assets` and another config calls
    // `assets` too, holding different bytes of the same size and time
    // under one key (the same version, as far as a folder can tell).
    let scene = |folder: &str, bytes: &[u8]| {
        let path = farm.dir.path().join(folder).join("scene.txt");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        set_mtime_us(&path, 1_700_000_000_000_000);
    };
    scene("assets", b"scene of A");
    scene("assets-b", b"scene of B");
    // Two buckets of one config with the same content under one hash.
    let texture = b"pixels".repeat(100);
    let hash = xxh128(&texture);
    let manifest = json!({"hashAlg": "xxh128", "manifestVersion": "2023-03-03",
        "paths": [{"path": "wood.png", "hash": hash, "size": texture.len(), "mtime": 0}]})
    .to_string();
    for folder in ["assets", "other"] {
        let root = farm.dir.path().join(folder);
        std::fs::create_dir_all(root.join("Data")).unwrap();
        std::fs::write(root.join(format!("Data/{hash}.xxh128")), &texture).unwrap();
        std::fs::create_dir_all(root.join("manifests")).unwrap();
        std::fs::write(root.join("manifests/m.json"), &manifest).unwrap();
    }
    let other = "\n[buckets.other]\nbackend = \"local\"\npath = \"other\"\n";
    let text = std::fs::read_to_string(&farm.config).unwrap();
    std::fs::write(&farm.config, format!("{text}{other}")).unwrap();
    // The second config: its `assets` is another folder, and `art` is the
    // first config's `assets` under another name. One cache path for both.
    let second = farm.config_variant("second", |text| {
        text.replace("path = \"assets\"", "path = \"assets-b\"")
            + "\n[buckets.art]\nbackend = \"local\"\npath = \"assets\"\n"
    });

    // (bucket, input, served from the cache?) per job, in order.
    let run = |serve_config: &std::path::Path, jobs: Vec<(Value, &'static str)>| {
        let serve_config = serve_config.to_owned();
        let farm = &farm;
        async move {
            let serve = farm.serve_with(&[], &serve_config).await;
            let mut seen = Vec::new();
            for (input, name) in jobs {
                let id = farm
                    .submit(json!({"command": "list_inputs", "inputs": [input],
                        "tasks": [upload(&format!("{name}.json"))]}))
                    .await;
                assert_eq!(ended(farm, &id).await["type"], "JobSucceeded");
                let (listing, _) = farm.object(&format!("{name}.json")).await.unwrap();
                let started = farm
                    .events()
                    .into_iter()
                    .find(|e| e["type"] == "JobStarted" && e["message_id"] == id.as_str())
                    .unwrap();
                seen.push((
                    serde_json::from_slice::<Value>(&listing).unwrap(),
                    started["detail"]["inputs"]["bytes_from_cache"]
                        .as_u64()
                        .unwrap(),
                ));
            }
            drop(serve);
            seen
        }
    };
    let object = |bucket: &str| json!({"bucket": bucket, "key": "scene.txt", "path": "scene.txt"});
    let manifest =
        |bucket: &str| json!({"bucket": bucket, "manifest": "manifests/m.json", "path": "m/"});
    let first = run(
        &farm.config,
        vec![
            (object("assets"), "a-scene"),
            (manifest("assets"), "a-manifest"),
            (manifest("other"), "other-manifest"),
        ],
    )
    .await;
    assert_eq!(first[0].0["scene.txt"]["text"], "scene of A");
    assert_eq!(first[1].1, 0, "first use of `assets`' texture");
    assert_eq!(
        first[2].1, 0,
        "`other` holds the same bytes, but is another bucket"
    );
    let second = run(
        &second,
        vec![(object("assets"), "b-scene"), (object("art"), "art-scene")],
    )
    .await;
    assert_eq!(
        second[0].0["scene.txt"]["text"], "scene of B",
        "another config's `assets` never gets the first one's blob"
    );
    assert_eq!(second[0].1, 0);
    assert_eq!(second[1].0["scene.txt"]["text"], "scene of A");
    assert_eq!(
        second[1].1, 10,
        "the same folder under another name shares its blob"
    );
    let blobs = files_under(&farm.work_dir().join("renderq-cache/blobs"));
    assert_eq!(
        blobs.len(),
        4,
        "A's scene, B's scene, two textures: {blobs:?}"
    );
}
