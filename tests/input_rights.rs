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
