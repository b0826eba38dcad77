//! The examples of the JSON-RPC 2.0 specification, section 7, with
//! renderq's methods where the spec's `subtract`, `sum`, `update`,
//! `foobar` and `get_data` stand; every answer exactly as written there.

use super::*;
use serde_json::json;

async fn rpc() -> (Rpc, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::config::Config::from_toml(
        "[queue_manager]\nallow_commands = [\"get_version\"]\ndefault_queue = \"q\"\nlisten_queue = \"q\"\n[queues.q]\nbackend = \"local\"\npath = \"q\"\n",
        dir.path(),
    )
    .unwrap();
    let queues = crate::queue::Queues::open(&config.queues).await.unwrap();
    let submitter = Submitter::new(
        Arc::new(crate::commands::catalog::Catalog::from_config(&config).unwrap()),
        queues,
        "q".into(),
        crate::events::publish::Publisher::default(),
        crate::events::ledger::Ledgers::default(),
        (&config.queue_manager).into(),
        crate::storage::Buckets::default(),
    );
    let control = Control::new(
        Default::default(),
        Default::default(),
        Default::default(),
        None,
        "q".into(),
        100,
    );
    (Rpc::new(submitter, control, None), dir)
}

async fn answer(rpc: &Rpc, body: &str) -> Option<Value> {
    rpc.handle(body.as_bytes())
        .await
        .map(|text| serde_json::from_str(&text).unwrap())
}

/// Only the parts the spec fixes: jsonrpc, id, result, error code.
fn shape(reply: &Value) -> Value {
    let one = |r: &Value| match r.get("error") {
        Some(e) => json!({"jsonrpc": r["jsonrpc"], "id": r["id"], "code": e["code"]}),
        None => {
            json!({"jsonrpc": r["jsonrpc"], "id": r["id"], "result": r["result"].is_null()})
        }
    };
    match reply {
        Value::Array(items) => Value::Array(items.iter().map(one).collect()),
        single => one(single),
    }
}

#[tokio::test]
async fn every_section_7_example() {
    let (rpc, _dir) = rpc().await;
    // Positional params to an unknown method: method not found first.
    let r = answer(
        &rpc,
        r#"{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        shape(&r),
        json!({"jsonrpc": "2.0", "id": 1, "code": -32601})
    );
    let r = answer(
        &rpc,
        r#"{"jsonrpc":"2.0","method":"sum","params":[1,2,4],"id":"1"}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        shape(&r),
        json!({"jsonrpc": "2.0", "id": "1", "code": -32601})
    );
    // A call by name that succeeds.
    let r = answer(
        &rpc,
        r#"{"jsonrpc": "2.0", "method": "queue_manager_list_commands", "params": {}, "id": 3}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        shape(&r),
        json!({"jsonrpc": "2.0", "id": 3, "result": false})
    );
    // Notifications get no answer, even to unknown methods.
    assert_eq!(
        answer(
            &rpc,
            r#"{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}"#
        )
        .await,
        None
    );
    assert_eq!(
        answer(&rpc, r#"{"jsonrpc": "2.0", "method": "foobar"}"#).await,
        None
    );
    // A method that does not exist.
    let r = answer(&rpc, r#"{"jsonrpc": "2.0", "method": "foobar", "id": "1"}"#)
        .await
        .unwrap();
    assert_eq!(
        shape(&r),
        json!({"jsonrpc": "2.0", "id": "1", "code": -32601})
    );
    // Invalid JSON.
    let r = answer(
        &rpc,
        r#"{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]"#,
    )
    .await
    .unwrap();
    assert_eq!(
        shape(&r),
        json!({"jsonrpc": "2.0", "id": null, "code": -32700})
    );
    // An invalid request object.
    let r = answer(&rpc, r#"{"jsonrpc": "2.0", "method": 1, "params": "bar"}"#)
        .await
        .unwrap();
    assert_eq!(
        shape(&r),
        json!({"jsonrpc": "2.0", "id": null, "code": -32600})
    );
    // A batch that is not valid JSON.
    let r = answer(&rpc, r#"[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},{"jsonrpc": "2.0", "method""#).await.unwrap();
    assert_eq!(
        shape(&r),
        json!({"jsonrpc": "2.0", "id": null, "code": -32700})
    );
    // An empty array.
    let r = answer(&rpc, "[]").await.unwrap();
    assert_eq!(
        shape(&r),
        json!({"jsonrpc": "2.0", "id": null, "code": -32600})
    );
    // A batch of one invalid item, and of three.
    let r = answer(&rpc, "[1]").await.unwrap();
    assert_eq!(
        shape(&r),
        json!([{"jsonrpc": "2.0", "id": null, "code": -32600}])
    );
    let r = answer(&rpc, "[1,2,3]").await.unwrap();
    assert_eq!(
        shape(&r),
        json!([
        {"jsonrpc": "2.0", "id": null, "code": -32600},
        {"jsonrpc": "2.0", "id": null, "code": -32600},
        {"jsonrpc": "2.0", "id": null, "code": -32600}])
    );
    // The mixed batch.
    let r = answer(
        &rpc,
        r#"[
        {"jsonrpc": "2.0", "method": "queue_manager_list_commands", "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "queue_manager_list_commands", "id": "9"}
    ]"#,
    )
    .await
    .unwrap();
    assert_eq!(
        shape(&r),
        json!([
        {"jsonrpc": "2.0", "id": "1", "result": false},
        {"jsonrpc": "2.0", "id": "2", "code": -32601},
        {"jsonrpc": "2.0", "id": null, "code": -32600},
        {"jsonrpc": "2.0", "id": "5", "code": -32601},
        {"jsonrpc": "2.0", "id": "9", "result": false}])
    );
    // An all-notification batch: no answer at all.
    assert_eq!(
        answer(
            &rpc,
            r#"[
        {"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}
    ]"#
        )
        .await,
        None
    );
    // An id that is neither a string, a number nor null.
    for id in [r#"{"a": 1}"#, "[1]", "true"] {
        let r = answer(
            &rpc,
            &format!(
                r#"{{"jsonrpc": "2.0", "method": "queue_manager_list_commands", "id": {id}}}"#
            ),
        )
        .await
        .unwrap();
        assert_eq!(
            shape(&r),
            json!({"jsonrpc": "2.0", "id": null, "code": -32600}),
            "{id}"
        );
    }
}

#[test]
fn integer_limits_read_as_integers() {
    let schema = crate::commands::Builtin::RenderDemo.schema().describe();
    assert_eq!(schema["width"]["max"], json!(4096), "{schema}");
}
