//! Job inputs through the worker's cache: objects and Deadline Cloud
//! manifests placed in the job's folder, what bad inputs get, and what a
//! job cannot do to the cache.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{AUDIT_AND_ASSETS, Backend, Farm, Settings, files_under};

const LONG: Duration = Duration::from_secs(60);

/// A farm with an `assets` bucket and commands that read their inputs.
pub(crate) async fn farm() -> Farm {
    Farm::new(
        Backend::Local,
        Settings {
            extra_allowed: vec!["list_inputs", "attack_inputs"],
            extra_toml: format!(
                r#"{AUDIT_AND_ASSETS}
[commands.list_inputs]
kind = "process"
program = "python3"
args = ["{list}"]

[commands.attack_inputs]
kind = "process"
program = "python3"
args = ["{attack}"]
"#,
                list = crate::harness::repo_path("tests/fixtures/list_inputs.py"),
                attack = crate::harness::repo_path("tests/fixtures/attack_inputs.py")
            ),
            ..Settings::default()
        },
    )
    .await
}

pub(crate) fn put_asset(farm: &Farm, key: &str, bytes: &[u8]) {
    let path = farm.dir.path().join("assets").join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

pub(crate) fn upload(key: &str) -> Value {
    json!({"name": "s3_upload", "config": {"bucket": "results", "key": key}})
}

pub(crate) fn xxh128(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// Waits for the job's end: its result object, or its dead letter.
pub(crate) async fn ended(farm: &Farm, message_id: &str) -> Value {
    farm.wait_for_events(
        |e| {
            e["message_id"] == message_id
                && matches!(e["type"].as_str(), Some("JobSucceeded" | "JobDeadLettered"))
        },
        1,
        LONG,
    )
    .await
    .remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_and_manifests_are_placed_and_cached() {
    let farm = farm().await;
    put_asset(&farm, "shots/010/scene.txt", b"the scene");
    let texture = b"pixels".repeat(1000);
    let hash = xxh128(&texture);
    put_asset(&farm, &format!("Data/{hash}.xxh128"), &texture);
    let manifest = json!({"hashAlg": "xxh128", "manifestVersion": "2023-03-03",
        "paths": [{"path": "tex/wood.png", "hash": hash, "size": texture.len(), "mtime": 1_700_000_000_123_456i64}],
        "totalSize": texture.len()});
    put_asset(
        &farm,
        "manifests/shot010.json",
        manifest.to_string().as_bytes(),
    );
    let _serve = farm.serve(&[]).await;

    let inputs = json!([
        {"bucket": "assets", "key": "shots/010/scene.txt", "path": "scene.txt"},
        {"bucket": "assets", "manifest": "manifests/shot010.json", "path": "shot010/"}
    ]);
    let mut started = Vec::new();
    for run in ["first", "second"] {
        let id = farm
            .submit(json!({"command": "list_inputs", "inputs": inputs,
                           "tasks": [upload(&format!("{run}.json"))]}))
            .await;
        assert_eq!(ended(&farm, &id).await["type"], "JobSucceeded");
        let (listing, _) = farm.object(&format!("{run}.json")).await.unwrap();
        let listing: Value = serde_json::from_slice(&listing).unwrap();
        assert_eq!(listing["scene.txt"]["text"], "the scene", "{listing}");
        let wood = &listing["shot010/tex/wood.png"];
        assert_eq!(wood["size"], texture.len(), "{listing}");
        assert_eq!(
            wood["mtime_us"], 1_700_000_000_123_456i64,
            "the manifest's mtime"
        );
        started.extend(
            farm.events()
                .into_iter()
                .filter(|e| e["type"] == "JobStarted" && e["message_id"] == id.as_str()),
        );
    }
    let inputs_of = |i: usize| started[i]["detail"]["inputs"].clone();
    assert_eq!(inputs_of(0)["files"], 2);
    assert_eq!(inputs_of(0)["bytes_downloaded"], 9 + texture.len());
    assert_eq!(inputs_of(1)["bytes_downloaded"], 0, "{:?}", inputs_of(1));
    assert_eq!(inputs_of(1)["bytes_from_cache"], 9 + texture.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_are_refused_or_dead_lettered_with_their_reason() {
    let farm = farm().await;
    let content = b"not what the manifest says";
    let claimed = xxh128(b"something else");
    put_asset(&farm, &format!("Data/{claimed}.xxh128"), content);
    let manifest = |hash: &str, version: &str| {
        json!({"hashAlg": "xxh128", "manifestVersion": version,
            "paths": [{"path": "a.bin", "hash": hash, "size": content.len(), "mtime": 0}]})
        .to_string()
    };
    put_asset(
        &farm,
        "manifests/wrong_hash.json",
        manifest(&claimed, "2023-03-03").as_bytes(),
    );
    put_asset(
        &farm,
        "manifests/old.json",
        manifest(&claimed, "2020-01-01").as_bytes(),
    );
    let _serve = farm.serve(&[]).await;

    // Refused at submit, nothing queued.
    for (input, field) in [
        (
            json!({"bucket": "assets", "key": "a", "path": "../escape"}),
            "inputs[0].path",
        ),
        (
            json!({"bucket": "assets", "key": "a", "path": "/etc/x"}),
            "inputs[0].path",
        ),
        (
            json!({"bucket": "nope", "key": "a", "path": "a"}),
            "inputs[0].bucket",
        ),
        (
            json!({"bucket": "assets", "key": "../../etc/passwd", "path": "a"}),
            "inputs[0].key",
        ),
        // Pinned at submit: a missing object is known then.
        (
            json!({"bucket": "assets", "key": "shots/missing.blend", "path": "a"}),
            "inputs[0].key",
        ),
    ] {
        let reply = farm
            .rpc(
                "queue_manager_submit_job",
                json!({"command": "list_inputs", "inputs": [input]}),
            )
            .await;
        assert_eq!(reply["error"]["code"], -32602, "{reply}");
        assert_eq!(reply["error"]["data"]["field"], field, "{reply}");
    }

    // Dead-lettered on the first try, naming what is wrong (the missing
    // object inserted straight into the queue, past the submit's check).
    for (input, why, inserted) in [
        (
            json!({"bucket": "assets", "key": "shots/missing.blend", "path": "a"}),
            "shots/missing.blend: no such object",
            true,
        ),
        (
            json!({"bucket": "assets", "manifest": "manifests/wrong_hash.json", "path": "m/"}),
            "the manifest says",
            false,
        ),
        (
            json!({"bucket": "assets", "manifest": "manifests/old.json", "path": "m/"}),
            "manifestVersion `2020-01-01`",
            false,
        ),
    ] {
        let job = json!({"command": "list_inputs", "inputs": [input]});
        let id = if inserted {
            farm.insert(&job.to_string()).await
        } else {
            farm.submit(job).await
        };
        let end = ended(&farm, &id).await;
        assert_eq!(end["type"], "JobDeadLettered", "{end}");
        let reason = end["detail"]["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{reason}");
        assert_eq!(end["attempt"], 1, "no retry: {end}");
    }
    // Nothing partial: no download left over, no blob admitted, no job
    // folder left behind.
    let cache = farm.work_dir().join("renderq-cache");
    assert_eq!(
        files_under(&cache.join("tmp")),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(
        files_under(&cache.join("blobs")),
        Vec::<std::path::PathBuf>::new()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(farm.job_folders(), Vec::<std::path::PathBuf>::new());
}

/// An `assets` bucket on moto (the farm's S3 bucket) and two slots.
pub(crate) async fn s3_farm(extra: &str) -> Farm {
    let moto = crate::harness::Moto::shared();
    let endpoint = moto.endpoint();
    let farm = Farm::on_moto(
        moto,
        Settings {
            extra_allowed: vec!["list_inputs"],
            worker_toml: "slots = 2\n".to_owned() + extra,
            extra_toml: format!(
                r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"

[buckets.assets]
backend = "s3"
bucket = "{bucket}"
endpoint_url = "{endpoint}"
region = "us-east-1"

[commands.list_inputs]
kind = "process"
program = "python3"
args = ["{list}"]
"#,
                bucket = "BUCKET",
                list = crate::harness::repo_path("tests/fixtures/list_inputs.py")
            ),
            ..Settings::default()
        },
    )
    .await;
    let bucket = farm.aws.as_ref().unwrap().bucket.clone();
    let text = std::fs::read_to_string(&farm.config)
        .unwrap()
        .replace("BUCKET", &bucket);
    std::fs::write(&farm.config, text).unwrap();
    farm
}

/// Puts `mib` MiB of random bytes at `key` in the farm's S3 bucket.
async fn put_big(farm: &Farm, key: &str, mib: usize) -> Vec<u8> {
    let aws = farm.aws.as_ref().unwrap();
    let bytes: Vec<u8> = (0..mib * 1024 * 1024).map(|_| fastrand::u8(..)).collect();
    aws.s3
        .put_object()
        .bucket(&aws.bucket)
        .key(key)
        .body(bytes.clone().into())
        .send()
        .await
        .unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn two_slots_wanting_one_200_mib_object_download_it_once() {
    let moto = crate::harness::Moto::shared();
    let farm = s3_farm("").await;
    let bytes = put_big(&farm, "big/plate.exr", 200).await;
    // The assets bucket is reached through the counting proxy, so requests
    // are counted as the server gets them, whatever its log looks like.
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count.json");
    let (proxy, _proxy) = crate::harness::Server::python(
        "tests/fixtures/s3_count_proxy.py",
        &[
            &moto.port.to_string(),
            "/big/plate.exr",
            "0",
            "0",
            &count.to_string_lossy(),
        ],
    );
    route_assets_through(&farm, &moto.endpoint(), &proxy);
    let serve = farm.serve(&crate::harness::AWS_ENV).await;
    let input = json!([{"bucket": "assets", "key": "big/plate.exr", "path": "plate.exr"}]);
    let ids = [
        farm.submit(json!({"command": "list_inputs", "inputs": input}))
            .await,
        farm.submit(json!({"command": "list_inputs", "inputs": input}))
            .await,
    ];
    for id in &ids {
        assert_eq!(ended(&farm, id).await["type"], "JobSucceeded");
    }
    let started: Vec<Value> = farm
        .events()
        .into_iter()
        .filter(|e| e["type"] == "JobStarted")
        .collect();
    let downloaded: u64 = started
        .iter()
        .map(|e| e["detail"]["inputs"]["bytes_downloaded"].as_u64().unwrap())
        .sum();
    assert_eq!(downloaded, bytes.len() as u64, "one download: {started:?}");
    let metrics = crate::fleet::scrape(&format!("{}metrics", farm.url())).await;
    assert_eq!(
        metrics["renderq_input_cache_files_total{result=\"miss\"}"],
        1.0
    );
    assert_eq!(
        metrics["renderq_input_cache_files_total{result=\"hit\"}"],
        1.0
    );
    // At the server: one object's worth of ranged GETs (16 MiB each).
    let counted: Value = serde_json::from_str(&std::fs::read_to_string(&count).unwrap()).unwrap();
    let (gets, heads) = (&counted["by_method"]["GET"], &counted["by_method"]["HEAD"]);
    println!("at the bucket: {gets} GETs and {heads} HEADs of the object");
    assert_eq!(gets, 13, "200 MiB in 16 MiB ranges, fetched once");
    assert_eq!(
        heads, 2,
        "one at each submit, to pin it; the workers ask none"
    );
    // The ranged parts were put together right.
    let blobs = files_under(&farm.work_dir().join("renderq-cache/blobs"));
    assert_eq!(blobs.len(), 1);
    assert!(
        std::fs::read(&blobs[0]).unwrap() == bytes,
        "the cached copy is the object"
    );
    drop(serve);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_range_cut_short_is_taken_up_where_it_stopped_not_fetched_again() {
    let moto = crate::harness::Moto::shared();
    let farm = s3_farm("").await;
    let bytes = put_big(&farm, "big/cut.bin", 40).await;
    // The first two GETs of the object are cut halfway through their body
    // (after the submit's HEAD, which passes).
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("count.json");
    let (proxy, _proxy) = crate::harness::Server::python(
        "tests/fixtures/s3_count_proxy.py",
        &[
            &moto.port.to_string(),
            "/big/cut.bin",
            "1",
            "2",
            &count.to_string_lossy(),
            "cut",
        ],
    );
    route_assets_through(&farm, &moto.endpoint(), &proxy);
    let serve = farm.serve(&crate::harness::AWS_ENV).await;
    let id = farm
        .submit(json!({"command": "list_inputs",
            "inputs": [{"bucket": "assets", "key": "big/cut.bin", "path": "cut.bin"}]}))
        .await;
    assert_eq!(ended(&farm, &id).await["type"], "JobSucceeded");
    let events = farm.events();
    assert!(
        !events
            .iter()
            .any(|e| e["type"] == "JobRequeued" || e["type"] == "JobFailed"),
        "the download succeeded in its first try: {events:?}"
    );
    let counted: Value = serde_json::from_str(&std::fs::read_to_string(&count).unwrap()).unwrap();
    assert_eq!(counted["failed"], 2, "{counted}");
    let ranges: Vec<&str> = counted["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    println!("ranges asked for: {ranges:?}");
    // Three ranges of 16 MiB, and two that take up a cut one mid-way: no
    // range was asked for from its start twice.
    assert_eq!(ranges.len(), 5, "{ranges:?}");
    let starts: Vec<u64> = ranges
        .iter()
        .map(|r| {
            r["bytes=".len()..]
                .split('-')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let mut unique = starts.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), starts.len(), "{ranges:?}");
    assert_eq!(
        starts.iter().filter(|s| *s % (16 << 20) != 0).count(),
        2,
        "{ranges:?}"
    );
    let blobs = files_under(&farm.work_dir().join("renderq-cache/blobs"));
    assert!(
        std::fs::read(&blobs[0]).unwrap() == bytes,
        "the pieces were put together right"
    );
    drop(serve);
}

/// Points the farm's `assets` bucket at `url` instead of `endpoint` (a
/// proxy in front of it).
pub(crate) fn route_assets_through(farm: &Farm, endpoint: &str, url: &str) {
    let text = std::fs::read_to_string(&farm.config).unwrap();
    let (head, tail) = text.split_once("[buckets.assets]").unwrap();
    let from = format!("endpoint_url = \"{endpoint}\"");
    let tail = tail.replacen(&from, &format!("endpoint_url = \"{url}\""), 1);
    std::fs::write(&farm.config, format!("{head}[buckets.assets]{tail}")).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_notice_during_a_slow_download_hands_the_job_back_without_a_try() {
    let moto = crate::harness::Moto::shared();
    // The assets bucket is reached through a slow link: 1 MiB/s a
    // connection.
    let upstream = format!("127.0.0.1:{}", moto.port).parse().unwrap();
    let slow = renderq::bench::proxy::latency_proxy(upstream, Duration::from_millis(5), 1 << 20)
        .await
        .unwrap();
    let imds = crate::fleet::FakeImds::start().await;
    let farm = s3_farm(&format!(
        "imds = \"{}\"\nstop_margin = \"1s\"\n",
        imds.url()
    ))
    .await;
    put_big(&farm, "big/slow.bin", 32).await;
    route_assets_through(&farm, &moto.endpoint(), &format!("http://{slow}"));

    let serve = farm.serve(&crate::harness::AWS_ENV).await;
    serve.wait_for_log("Watching instance metadata", LONG);
    let id = farm
        .submit(json!({"command": "list_inputs",
            "inputs": [{"bucket": "assets", "key": "big/slow.bin", "path": "slow.bin"}]}))
        .await;
    // Wait until the download is under way; then the instance is told it
    // will be reclaimed in a minute.
    let downloads = farm.work_dir().join("renderq-cache/tmp");
    let deadline = std::time::Instant::now() + LONG;
    while files_under(&downloads).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no download started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let partial = files_under(&downloads);
    imds.interrupt_in(60);
    let requeued = farm
        .wait_for_events(
            |e| e["type"] == "JobRequeued" && e["message_id"] == id.as_str(),
            1,
            LONG,
        )
        .await;
    assert_eq!(
        requeued[0]["detail"]["reason"], "interrupted",
        "{requeued:?}"
    );
    assert!(
        !farm.events().iter().any(|e| e["type"] == "JobFailed"),
        "the interruption used no try"
    );
    assert!(files_under(&farm.work_dir().join("renderq-cache/blobs")).is_empty());
    // (A receive already under way on the other slot may take the job
    // again; its own download is not this one.)
    assert!(
        partial.iter().all(|p| !p.exists()),
        "the partial download is removed: {partial:?}"
    );
    assert_eq!(
        farm.stats().0 + farm.stats().1,
        1,
        "the job is back in the queue"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slots_next_job_runs_while_the_last_ones_upload_goes_up() {
    // A postback target that takes 1.5 s to answer: a slow upload.
    let app = axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        "ok"
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let farm = farm().await;
    let post = json!([{"name": "http_post", "config": {"postback_uri": format!("http://{target}/${{message_id}}")}}]);
    let _serve = farm.serve(&[]).await;
    let first = farm
        .submit(json!({"command": "get_version", "tasks": post}))
        .await;
    let second = farm
        .submit(json!({"command": "get_version", "tasks": post}))
        .await;
    for id in [&first, &second] {
        assert_eq!(ended(&farm, id).await["type"], "JobSucceeded");
    }
    let time_of = |kind: &str, id: &str| {
        let event = farm
            .events()
            .into_iter()
            .find(|e| e["type"] == kind && e["message_id"] == id)
            .unwrap_or_else(|| panic!("no {kind} for {id}"));
        chrono::DateTime::parse_from_rfc3339(event["time"].as_str().unwrap()).unwrap()
    };
    // One slot: the second job started while the first one's upload was
    // still going, and each was deleted only after its own upload.
    assert!(time_of("JobStarted", &second) < time_of("JobSucceeded", &first));
    assert!(time_of("TaskSucceeded", &first) <= time_of("JobSucceeded", &first));
    assert!(time_of("TaskSucceeded", &second) <= time_of("JobSucceeded", &second));
}
