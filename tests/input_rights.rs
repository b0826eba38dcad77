//! Which buckets a queue's jobs may read (`input_buckets`), checked at
//! submit and again on receive.

use serde_json::json;

use crate::inputs::{ended, farm, put_asset};

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_reads_inputs_only_from_its_input_buckets() {
    let farm = farm().await;
    let text = std::fs::read_to_string(&farm.config).unwrap();
    let text = text.replacen(
        "path = \"queue\"\n",
        "path = \"queue\"\ninput_buckets = [\"assets\"]\n",
        1,
    );
    std::fs::write(&farm.config, text).unwrap();
    put_asset(&farm, "scene.txt", b"the scene");
    std::fs::create_dir_all(farm.dir.path().join("results")).unwrap();
    std::fs::write(farm.dir.path().join("results/secret.png"), b"a result").unwrap();
    let _serve = farm.serve(&[]).await;

    let from_results = json!([{"bucket": "results", "key": "secret.png", "path": "x.png"}]);
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "list_inputs", "inputs": from_results}),
        )
        .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    assert_eq!(
        reply["error"]["data"]["field"], "inputs[0].bucket",
        "{reply}"
    );
    let reason = reply["error"]["data"]["reason"].to_string();
    assert!(reason.contains("input_buckets"), "{reply}");
    assert_eq!(farm.stats().0, 0, "nothing queued");

    // Inserted straight into the queue: dead-lettered on its first try,
    // naming the bucket, and never run.
    let id = farm
        .insert(
            &json!({"command": "list_inputs", "inputs": from_results,
                    "tasks": [crate::inputs::upload("leaked.json")]})
            .to_string(),
        )
        .await;
    let end = ended(&farm, &id).await;
    assert_eq!(end["type"], "JobDeadLettered", "{end}");
    let reason = end["detail"]["reason"].as_str().unwrap();
    assert!(reason.contains("inputs[0].bucket"), "{reason}");
    assert!(reason.contains("`results`"), "{reason}");
    assert_eq!(end["attempt"], 1, "no retry: {end}");
    assert!(farm.object("leaked.json").await.is_none());

    // The bucket it may read still works.
    let id = farm
        .submit(json!({"command": "list_inputs",
                       "inputs": [{"bucket": "assets", "key": "scene.txt", "path": "scene.txt"}]}))
        .await;
    assert_eq!(ended(&farm, &id).await["type"], "JobSucceeded");
}

/// Requests for the scene the count proxy passed on, by method.
fn scene_requests(count: &std::path::Path) -> (u64, u64) {
    let counted: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(count).unwrap_or_else(|_| "{}".into()))
            .unwrap();
    let of = |method: &str| counted["by_method"][method].as_u64().unwrap_or(0);
    (of("HEAD"), of("GET"))
}

async fn put_scene(farm: &crate::harness::Farm, text: &str) {
    let aws = farm.aws.as_ref().unwrap();
    aws.s3
        .put_object()
        .bucket(&aws.bucket)
        .key(SCENE)
        .body(text.as_bytes().to_vec().into())
        .send()
        .await
        .unwrap();
}

const SCENE: &str = "shots/010/scene.txt";

/// Submits an array of 20 children reading the scene; each uploads what
/// it found to `NAME-INDEX.json`. Returns the children's message ids.
async fn submit_array(farm: &crate::harness::Farm, name: &str) -> Vec<String> {
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "list_inputs", "frames": "1-20",
                   "inputs": [{"bucket": "assets", "key": SCENE, "path": "scene.txt"}],
                   "tasks": [crate::inputs::upload(&format!("{name}-${{array_index}}.json"))]}),
        )
        .await;
    (reply["result"]["message_ids"].as_array())
        .unwrap_or_else(|| panic!("{reply}"))
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_array_renders_the_scene_it_was_submitted_with() {
    use crate::harness::AWS_ENV;
    let moto = crate::harness::Moto::shared();
    let farm = crate::inputs::s3_farm("").await;
    put_scene(&farm, "v1").await;
    // The assets bucket is reached through the counting proxy.
    let count = farm.dir.path().join("scene-count.json");
    let (proxy, _proxy) = crate::harness::Server::python(
        "tests/fixtures/s3_count_proxy.py",
        &[
            &moto.port.to_string(),
            &format!("/{SCENE}"),
            "0",
            "0",
            &count.to_string_lossy(),
        ],
    );
    crate::inputs::route_assets_through(&farm, &moto.endpoint(), &proxy);
    // The endpoint's own worker listens elsewhere; workers A and B take the
    // renders, each with a cache of its own (under its work_dir).
    let endpoint = farm.config_variant("endpoint", |t| {
        t.replace("slots = 2\n", "listen_queues = [\"idle\"]\n")
            + "\n[queues.idle]\nbackend = \"local\"\npath = \"idle\"\n"
    });
    let worker = |name: &str| {
        std::fs::create_dir_all(farm.dir.path().join(name)).unwrap();
        farm.config_variant(name, |t| {
            t.replace("slots = 2\n", "slots = 1\n")
                .replace("work_dir = \"work\"", &format!("work_dir = \"{name}\""))
        })
    };
    let (config_a, config_b) = (worker("work-a"), worker("work-b"));
    let _serve = farm.serve_with(&AWS_ENV, &endpoint).await;
    let mut a = farm.spawn_with("worker", &AWS_ENV, &config_a);

    // 1. Twenty children, one worker: one GET for all of them, and the
    //    submit's one HEAD; the 19 hits (the 20th included) ask nothing.
    let first = submit_array(&farm, "first").await;
    for id in &first {
        assert_eq!(ended(&farm, id).await["type"], "JobSucceeded");
    }
    assert_eq!(scene_requests(&count), (1, 1), "HEAD at submit, one GET");
    for i in 0..20 {
        let (listing, _) = farm.object(&format!("first-{i}.json")).await.unwrap();
        let listing: serde_json::Value = serde_json::from_slice(&listing).unwrap();
        assert_eq!(listing["scene.txt"]["text"], "v1", "child {i}: {listing}");
    }

    // 2. Another array, pinned to v1; the scene is overwritten after its
    //    fifth child started on A. A (which has v1 cached) is stopped, and
    //    B, with an empty cache, takes the rest.
    let second = submit_array(&farm, "second").await;
    let started = |farm: &crate::harness::Farm| {
        (farm.events().iter())
            .filter(|e| {
                e["type"] == "JobStarted" && second.iter().any(|id| e["message_id"] == id.as_str())
            })
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while started(&farm) < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "5 children never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    a.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(a.wait_exit(std::time::Duration::from_secs(30)), Some(0));
    assert_eq!(scene_requests(&count), (2, 1), "A's hits asked nothing");
    put_scene(&farm, "v2, saved over the first").await;
    let _b = farm.spawn_with("worker", &AWS_ENV, &config_b);

    let (mut succeeded, mut failed) = (0, 0);
    for (i, id) in second.iter().enumerate() {
        let end = ended(&farm, id).await;
        if end["type"] == "JobSucceeded" {
            succeeded += 1;
            let (listing, _) = farm.object(&format!("second-{i}.json")).await.unwrap();
            let listing: serde_json::Value = serde_json::from_slice(&listing).unwrap();
            assert_eq!(listing["scene.txt"]["text"], "v1", "child {i}: {listing}");
        } else {
            failed += 1;
            let reason = end["detail"]["reason"].as_str().unwrap();
            assert!(
                reason.contains("changed since submit; resubmit to render the new version")
                    && reason.contains(SCENE),
                "{reason}"
            );
            assert_eq!(end["attempt"], 1, "no retry: {end}");
            assert!(farm.object(&format!("second-{i}.json")).await.is_none());
        }
    }
    println!("second array: {succeeded} rendered v1 on A, {failed} refused on B");
    assert!(succeeded >= 5, "the children started before the change");
    assert!(failed >= 1, "B fetched nothing but the pinned version");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_folder_input_is_pinned_by_size_and_mtime() {
    let farm = farm().await;
    put_asset(&farm, "scene.txt", b"the scene");
    let _serve = farm.serve(&[]).await;
    // What the endpoint records for a folder's object.
    let input = json!({"bucket": "assets", "key": "scene.txt", "path": "scene.txt"});
    let id = farm
        .submit(json!({"command": "list_inputs", "inputs": [input],
                       "tasks": [crate::inputs::upload("pinned.json")]}))
        .await;
    assert_eq!(ended(&farm, &id).await["type"], "JobSucceeded");
    // A pin this object no longer matches (as if it had been saved over
    // since): refused for good, naming the bucket and key, never run.
    let mut stale = input.clone();
    stale["pin"] = json!({"size": 9, "version": "9-1"});
    let id = farm
        .insert(
            &json!({"command": "list_inputs", "inputs": [stale],
                    "tasks": [crate::inputs::upload("stale.json")]})
            .to_string(),
        )
        .await;
    let end = ended(&farm, &id).await;
    assert_eq!(end["type"], "JobDeadLettered", "{end}");
    let reason = end["detail"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("bucket `assets`")
            && reason.contains("scene.txt")
            && reason.contains("changed since submit"),
        "{reason}"
    );
    assert_eq!(end["attempt"], 1, "no retry: {end}");
    assert!(farm.object("stale.json").await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_versioned_bucket_a_job_gets_the_version_it_was_submitted_with() {
    use crate::harness::AWS_ENV;
    use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
    let farm = crate::inputs::s3_farm("").await;
    let aws = farm.aws.as_ref().unwrap();
    aws.s3
        .put_bucket_versioning()
        .bucket(&aws.bucket)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
    put_scene(&farm, "v1").await;
    // Submitted while no worker listens; saved over before one starts.
    let endpoint = farm.config_variant("endpoint", |t| {
        t.replace("slots = 2\n", "listen_queues = [\"idle\"]\n")
            + "\n[queues.idle]\nbackend = \"local\"\npath = \"idle\"\n"
    });
    let _serve = farm.serve_with(&AWS_ENV, &endpoint).await;
    let id = farm
        .submit(json!({"command": "list_inputs",
                       "inputs": [{"bucket": "assets", "key": SCENE, "path": "scene.txt"}],
                       "tasks": [crate::inputs::upload("versioned.json")]}))
        .await;
    // Without the version id the worker's GET (If-Match the first ETag)
    // would meet the second version and fail "changed since submit".
    put_scene(&farm, "v2, saved over the first").await;
    let _worker = farm.spawn_with("worker", &AWS_ENV, &farm.config);
    let end = ended(&farm, &id).await;
    assert_eq!(end["type"], "JobSucceeded", "{end}");
    let (listing, _) = farm.object("versioned.json").await.unwrap();
    let listing: serde_json::Value = serde_json::from_slice(&listing).unwrap();
    assert_eq!(listing["scene.txt"]["text"], "v1", "{listing}");
}
