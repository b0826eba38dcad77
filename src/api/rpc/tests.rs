use super::*;
use std::sync::Arc;

use crate::commands::catalog::Catalog;
use crate::config::Config;
use crate::queue::Queues;

/// An endpoint on an embedded queue `q` in `dir` (the HTTP tests' too).
pub(crate) async fn rpc(dir: &tempfile::TempDir) -> (Rpc, Queues) {
    let config = Config::from_toml(
        r#"
[queue_manager]
allow_commands = ["get_version", "render_demo"]
default_queue = "q"
listen_queue = "q"
[queues.q]
backend = "local"
path = "q"
[buckets.results]
backend = "local"
path = "r"
"#,
        dir.path(),
    )
    .unwrap();
    let queues = Queues::open(&config.queues).await.unwrap();
    let submitter = Submitter::new(
        Arc::new(Catalog::from_config(&config).unwrap()),
        queues.clone(),
        "q".into(),
        crate::events::publish::Publisher::default(),
        crate::events::ledger::Ledgers::default(),
        (&config.queue_manager).into(),
        crate::storage::Buckets::default(),
    );
    let control = Control::new(
        queues.clone(),
        Default::default(),
        Default::default(),
        None,
        "q".into(),
        100,
    );
    (Rpc::new(submitter, control, None), queues)
}

async fn call(rpc: &Rpc, body: &str) -> Value {
    serde_json::from_str(&rpc.handle(body.as_bytes()).await.unwrap()).unwrap()
}

async fn visible(queues: &Queues) -> u64 {
    queues.get("q").unwrap().stats().await.unwrap().visible
}

#[tokio::test]
async fn submit_returns_message_id() {
    let dir = tempfile::tempdir().unwrap();
    let (rpc, queues) = rpc(&dir).await;
    let reply = call(
            &rpc,
            r#"{"jsonrpc":"2.0","method":"queue_manager_submit_job","params":{"command":"get_version"},"id":7}"#,
        )
        .await;
    assert_eq!(reply["id"], 7);
    assert!(
        reply["result"].as_str().is_some_and(|id| id.len() == 36),
        "{reply}"
    );
    assert_eq!(visible(&queues).await, 1);
}

#[tokio::test]
async fn standard_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (rpc, queues) = rpc(&dir).await;
    let code = |v: Value| v["error"]["code"].as_i64().unwrap();
    assert_eq!(code(call(&rpc, "{not json").await), PARSE_ERROR);
    assert_eq!(code(call(&rpc, r#"{"foo":1}"#).await), INVALID_REQUEST);
    assert_eq!(code(call(&rpc, "[]").await), INVALID_REQUEST);
    assert_eq!(
        code(call(&rpc, r#"{"jsonrpc":"2.0","method":"nope","id":1}"#).await),
        METHOD_NOT_FOUND
    );
    let refused = call(
        &rpc,
        r#"{"jsonrpc":"2.0","method":"queue_manager_submit_job","params":{"command":"rm"},"id":1}"#,
    )
    .await;
    assert_eq!(code(refused.clone()), INVALID_PARAMS);
    assert_eq!(refused["error"]["data"]["field"], "command");
    let unknown_queue = call(
            &rpc,
            r#"{"jsonrpc":"2.0","method":"queue_manager_submit_job","params":{"command":"get_version","queue_name":"zz"},"id":1}"#,
        )
        .await;
    assert_eq!(unknown_queue["error"]["data"]["field"], "queue_name");
    assert_eq!(visible(&queues).await, 0);
}

#[tokio::test]
async fn notifications_get_no_reply_and_batches_mix() {
    let dir = tempfile::tempdir().unwrap();
    let (rpc, queues) = rpc(&dir).await;
    let note = r#"{"jsonrpc":"2.0","method":"queue_manager_submit_job","params":{"command":"get_version"}}"#;
    assert!(rpc.handle(note.as_bytes()).await.is_none());
    assert_eq!(visible(&queues).await, 1);

    let batch = format!(
        r#"[{note}, {{"jsonrpc":"2.0","method":"queue_manager_list_commands","id":"a"}}, {{"jsonrpc":"2.0","method":"nope","id":null}}]"#
    );
    let reply = call(&rpc, &batch).await;
    let replies = reply.as_array().unwrap();
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[0]["id"], "a");
    assert!(replies[0]["result"].as_array().unwrap().len() == 2);
    assert_eq!(replies[1]["id"], Value::Null);
    assert_eq!(replies[1]["error"]["code"], METHOD_NOT_FOUND);
}

#[tokio::test]
async fn queue_stats_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (rpc, _) = rpc(&dir).await;
    let reply = call(
        &rpc,
        r#"{"jsonrpc":"2.0","method":"queue_manager_queue_stats","id":1}"#,
    )
    .await;
    assert_eq!(reply["result"]["queue"], "q");
    assert_eq!(reply["result"]["visible"], 0);
}

#[test]
fn a_redrive_that_failed_part_way_says_how_many_went_back_and_how_many_stayed() {
    let error: RpcError = ControlError::Queue {
        queue: "q".into(),
        source: QueueError::PartlyRedriven {
            redriven: 2,
            left: 1,
            reason: "SendMessageBatch: InternalError".into(),
        },
    }
    .into();
    assert_eq!(error.code, QUEUE_UNAVAILABLE);
    assert_eq!(
        error.data,
        Some(serde_json::json!({"queue": "q", "redriven": 2, "left": 1}))
    );
    assert!(
        error
            .message
            .contains("2 dead letters were put back; 1 could not be"),
        "{}",
        error.message
    );
    assert!(
        !error.message.contains("InternalError"),
        "the backend's words stay in the log"
    );
}
