//! What a new user meets in the first hour: clear answers for common
//! mistakes, and safe defaults.

use serde_json::json;

use crate::harness::{Backend, Farm, Settings, free_port};

#[tokio::test(flavor = "multi_thread")]
async fn a_variable_without_its_dollar_is_refused_with_a_hint() {
    let farm = Farm::new(Backend::Local, Settings::default()).await;
    let _serve = farm.serve(&[]).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "get_version", "tasks": [
                {"name": "s3_upload", "config": {"bucket": "results", "key": "r/{message_id}.png"}}]}),
        )
        .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    assert_eq!(reply["error"]["data"]["field"], "tasks[0].config.key");
    assert!(
        reply["error"]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("did you mean `${message_id}`?")
    );
    assert_eq!(farm.stats(), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_endpoint_says_what_it_is_and_an_empty_dlq_says_so() {
    let farm = Farm::new(Backend::Local, Settings::default()).await;
    let _serve = farm.serve(&[]).await;
    let about: serde_json::Value = reqwest::get(farm.url())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(about["service"], "renderq");
    assert!(
        about["methods"]
            .as_array()
            .unwrap()
            .contains(&json!("queue_manager_submit_job"))
    );
    let (code, out, err) = farm.cli(&["dlq", "list"]);
    assert_eq!((code, out.as_str()), (0, ""));
    assert!(
        err.contains("no dead-lettered messages in renderq")
            || err.contains("no dead-lettered messages in renders"),
        "{err}"
    );
}

#[test]
fn submitting_to_a_stopped_endpoint_suggests_serve() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("workers.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!("[queue_manager]\nallow_commands = [\"get_version\"]\ndefault_queue = \"q\"\nlisten_queue = \"q\"\n[server]\nlisten = \"127.0.0.1:{port}\"\n[queues.q]\nbackend = \"local\"\npath = \"q\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(crate::harness::BIN)
        .args(["submit", "get_version", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is `renderq serve` running"), "{stderr}");
}

#[test]
fn serving_other_machines_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("workers.toml");
    let text = "[queue_manager]\nallow_commands = [\"get_version\"]\ndefault_queue = \"q\"\nlisten_queue = \"q\"\n[server]\nlisten = \"0.0.0.0:0\"\n[queues.q]\nbackend = \"local\"\npath = \"q\"\n";
    std::fs::write(&config, text).unwrap();
    for command in ["serve", "check-config"] {
        let out = std::process::Command::new(crate::harness::BIN)
            .args([command, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}");
        assert!(
            stderr.contains("`server.auth_token_env`") && stderr.contains("allow_anonymous"),
            "{command}: {stderr}"
        );
    }
    std::fs::write(
        &config,
        text.replace(
            "listen = \"0.0.0.0:0\"",
            "listen = \"0.0.0.0:0\"\nallow_anonymous = true",
        ),
    )
    .unwrap();
    crate::harness::renderq_ok(&["check-config"], &config, &[]);
}
