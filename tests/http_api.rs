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

/// What a page on another site (or a rebound name) can send without a
/// preflight: a `text/plain` body, its `Origin`, `Sec-Fetch-Site`, and a
/// `Host` that is its own name. Each is refused saying why, and nothing
/// reaches the queue, on the endpoint and on the monitor's forms alike.
#[tokio::test(flavor = "multi_thread")]
async fn cross_site_and_foreign_host_requests_are_refused_and_enqueue_nothing() {
    let farm = Farm::new(
        Backend::Local,
        Settings {
            // The endpoint's own worker listens elsewhere: the queue keeps
            // whatever gets in.
            worker_toml: "listen_queues = [\"idle\"]".into(),
            extra_toml: "[queues.idle]\nbackend = \"local\"\npath = \"idle\"\n".into(),
            ..Settings::default()
        },
    )
    .await;
    let _serve = farm.serve(&[]).await;
    let body = submit(json!({"command": "get_version"}));
    let host = format!("127.0.0.1:{}", farm.port);
    let foreign_host = format!("rebound.evil.example:{}", farm.port);
    let json = "application/json";
    let form = "application/x-www-form-urlencoded";
    let cancel = format!("job_id={}&csrf=x", uuid::Uuid::new_v4());
    let cross_site = [
        ("origin", "http://evil.example", "Origin"),
        ("sec-fetch-site", "cross-site", "cross-site"),
        ("host", foreign_host.as_str(), "Host"),
    ];
    // (path, content type, header, body, status, what the answer names)
    let mut cases = vec![
        ("", Some("text/plain"), None, &body, 415, "application/json"),
        ("rpc", None, None, &body, 415, "application/json"),
    ];
    for (name, value, reason) in cross_site {
        cases.push(("", Some(json), Some((name, value)), &body, 403, reason));
        cases.push(("rpc", Some(json), Some((name, value)), &body, 403, reason));
        // The monitor's forms: their own type, the same site rules.
        cases.push((
            "ui/cancel",
            Some(form),
            Some((name, value)),
            &cancel,
            403,
            reason,
        ));
    }
    let client = reqwest::Client::new();
    for (path, content_type, header, body, status, reason) in cases {
        let mut request = client
            .post(format!("{}{path}", farm.url()))
            .body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        let response = request.send().await.unwrap();
        let got = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(got, status, "{header:?} to /{path}: {text}");
        assert!(text.contains(reason), "{header:?} to /{path}: {text}");
    }
    assert_eq!(farm.stats(), (0, 0, 0), "nothing was submitted");
    // The same request from the endpoint's own page, or from a client that
    // says nothing of sites, goes through.
    let own = client
        .post(farm.url())
        .header("content-type", "application/json; charset=utf-8")
        .header("origin", format!("http://{host}"))
        .header("sec-fetch-site", "same-origin")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let reply: Value = own.json().await.unwrap();
    assert!(reply["result"].is_string(), "{reply}");
    assert_eq!(farm.stats(), (1, 0, 0));
}
