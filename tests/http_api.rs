//! The JSON-RPC endpoint over real HTTP: every bad input gets exactly its
//! answer, and nothing reaches the queue.

use serde_json::{Value, json};

use crate::harness::{Backend, Farm, Settings};

fn submit(params: Value) -> String {
    json!({"jsonrpc": "2.0", "method": "queue_manager_submit_job", "params": params, "id": 1})
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_their_error_codes_and_enqueue_nothing() {
    let farm = Farm::new(Backend::Local, Settings::default()).await;
    let _serve = farm.serve(&[]).await;
    let key = "k/${message_id}.${mime_ext}";
    let cases: Vec<(String, i64, Option<&str>)> = vec![
        ("{\"jsonrpc\": \"2.0\", ".into(), -32700, None),
        (r#"{"hello": "world"}"#.into(), -32600, None),
        (
            r#"{"jsonrpc": "2.0", "method": "drop_tables", "id": 1}"#.into(),
            -32601,
            None,
        ),
        (submit(json!({"command": "rm_rf"})), -32602, Some("command")),
        (
            submit(json!({"command": "get_version", "queue_name": "nope"})),
            -32602,
            Some("queue_name"),
        ),
        (
            submit(
                json!({"command": "get_version", "tasks": [{"name": "ftp_upload", "config": {}}]}),
            ),
            -32602,
            Some("tasks[0].name"),
        ),
        (
            submit(
                json!({"command": "get_version", "tasks": [{"name": "s3_upload", "config": {"bucket": "nope", "key": key}}]}),
            ),
            -32602,
            Some("tasks[0].config.bucket"),
        ),
        (
            submit(
                json!({"command": "get_version", "tasks": [{"name": "s3_upload", "config": {"bucket": "results"}}]}),
            ),
            -32602,
            Some("tasks[0].config.key"),
        ),
        (
            submit(
                json!({"command": "get_version", "tasks": [{"name": "s3_upload", "config": {"bucket": "results", "key": "${user}.png"}}]}),
            ),
            -32602,
            Some("tasks[0].config.key"),
        ),
        (
            submit(
                json!({"command": "get_version", "tasks": [{"name": "http_post", "config": {"postback_uri": "http://169.254.169.254/x"}}]}),
            ),
            -32602,
            Some("tasks[0].config.postback_uri"),
        ),
        (
            submit(json!({"command": "render_demo", "parameters": {"width": "wide"}})),
            -32602,
            Some("parameters.width"),
        ),
        (
            submit(json!({"command": "render_demo", "parameters": {"colour": "red"}})),
            -32602,
            Some("parameters.colour"),
        ),
        (submit(json!({"parameters": {}})), -32602, Some("command")),
    ];
    for (body, code, field) in cases {
        let response = farm.post_raw(body.clone(), None).await;
        assert_eq!(response.status(), 200, "{body}");
        let reply: Value = response.json().await.unwrap();
        assert_eq!(reply["error"]["code"], code, "{body} -> {reply}");
        if let Some(field) = field {
            assert_eq!(reply["error"]["data"]["field"], field, "{body} -> {reply}");
        }
    }
    assert_eq!(farm.stats(), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_body_gets_413() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            max_body_bytes: 1024,
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[]).await;
    let big = submit(json!({"command": "get_version", "parameters": {"pad": "x".repeat(4096)}}));
    assert_eq!(farm.post_raw(big, None).await.status(), 413);
    assert_eq!(farm.stats(), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn token_is_required_when_configured() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            auth_token_env: Some("RENDERQ_TEST_TOKEN"),
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[("RENDERQ_TEST_TOKEN", "s3cret")]).await;
    let body = submit(json!({"command": "get_version"}));
    assert_eq!(farm.post_raw(body.clone(), None).await.status(), 401);
    assert_eq!(
        farm.post_raw(body.clone(), Some("wrong")).await.status(),
        401
    );
    // 401 comes before the body is read: even garbage gets it.
    assert_eq!(farm.post_raw("{garbage", None).await.status(), 401);
    assert_eq!(farm.stats(), (0, 0, 0));
    let ok = farm.post_raw(body, Some("s3cret")).await;
    assert_eq!(ok.status(), 200);
    let reply: Value = ok.json().await.unwrap();
    assert!(reply["result"].is_string(), "{reply}");
    // Job control is behind the same token.
    let id = uuid::Uuid::new_v4().to_string();
    for method in ["queue_manager_cancel_job", "queue_manager_redrive"] {
        let body = json!({"jsonrpc": "2.0", "method": method, "params": {"job_id": id}, "id": 1})
            .to_string();
        assert_eq!(farm.post_raw(body.clone(), None).await.status(), 401);
        assert_eq!(
            farm.post_raw(body, Some("s3cret")).await.status(),
            200,
            "{method}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn list_commands_and_stats() {
    let farm = Farm::new(Backend::Local, Settings::default()).await;
    let _serve = farm.serve(&[]).await;
    let reply = farm.rpc("queue_manager_list_commands", json!({})).await;
    let names: Vec<_> = reply["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["get_version", "render_demo", "sleep"]);
    let stats = farm
        .rpc(
            "queue_manager_queue_stats",
            json!({"queue_name": "renders"}),
        )
        .await;
    assert_eq!(stats["result"]["dead_lettered"], 0, "{stats}");
}
