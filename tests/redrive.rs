//! SQS redrive, exact: a job the queue's redrive policy moved goes back
//! under the message id its submit returned, and a redrive that fails part
//! way deletes from the dead-letter queue exactly the dead letters it sent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::{Value, json};

use crate::harness::{AWS_ENV, Aws, Farm, Moto, Settings, fault_proxy, forwarded};

const LONG: Duration = Duration::from_secs(60);

/// A farm on moto whose jobs wait in the queue: `serve` submits, and its
/// own worker listens to another queue. renderq's budget is 2 tries, so
/// the redrive policy moves a message at its fourth receive.
async fn parked_farm(moto: &Moto) -> (Farm, crate::harness::Proc) {
    let farm = Farm::on_moto(
        moto,
        Settings {
            max_receive_count: 2,
            extra_toml: format!(
                "{}\n[queues.elsewhere]\nbackend = \"local\"\npath = \"elsewhere\"\n",
                crate::harness::AUDIT_AND_ASSETS
            ),
            ..Settings::default()
        },
    )
    .await;
    let submitter = farm.config_variant("submitter", |text| {
        text.replace("listen_queue = \"renders\"", "listen_queue = \"elsewhere\"")
    });
    let serve = farm.serve_with(&AWS_ENV, &submitter).await;
    (farm, serve)
}

/// Receives every visible message of the queue (hidden for a minute).
async fn receive_all(aws: &Aws, url: &str) -> Vec<aws_sdk_sqs::types::Message> {
    let mut messages = Vec::new();
    loop {
        let batch = aws
            .sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default();
        if batch.is_empty() {
            return messages;
        }
        messages.extend(batch);
    }
}

/// Makes messages visible again at once.
async fn release(aws: &Aws, url: &str, messages: &[aws_sdk_sqs::types::Message]) {
    for message in messages {
        aws.sqs
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(message.receipt_handle().unwrap())
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
    }
}

/// Approximate messages (visible and hidden) in a queue.
async fn depth(aws: &Aws, url: &str) -> u64 {
    let attributes = aws
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap_or_default();
    [
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
    ]
    .iter()
    .map(|name| attributes[name].parse::<u64>().unwrap())
    .sum()
}

/// Lets SQS's own redrive policy move all `n` queued messages, as it does
/// those of workers that died during every try: each is received and let
/// go three times (the policy's count), and the next receive moves them,
/// as they are, to the dead-letter queue.
async fn let_the_redrive_policy_move(aws: &Aws, n: usize) {
    for _ in 0..3 {
        let messages = receive_all(aws, &aws.queue_url).await;
        assert_eq!(messages.len(), n);
        release(aws, &aws.queue_url, &messages).await;
    }
    assert!(receive_all(aws, &aws.queue_url).await.is_empty());
    assert_eq!(depth(aws, &aws.dlq_url).await, n as u64);
}

/// The message ids the envelopes of the queue's messages name, by how many
/// messages name each; the messages are let go again.
async fn envelope_ids(aws: &Aws) -> BTreeMap<String, usize> {
    let messages = receive_all(aws, &aws.queue_url).await;
    let mut ids = BTreeMap::new();
    for message in &messages {
        let envelope: Value = serde_json::from_str(message.body().unwrap()).unwrap();
        let id = envelope["message_id"].as_str().unwrap_or("none").to_owned();
        *ids.entry(id).or_default() += 1;
    }
    release(aws, &aws.queue_url, &messages).await;
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_the_redrive_policy_moved_is_redriven_under_its_message_id() {
    let (farm, _serve) = parked_farm(Moto::shared()).await;
    let aws = farm.aws.as_ref().unwrap();
    let message_id = farm.submit(json!({"command": "get_version"})).await;
    let_the_redrive_policy_move(aws, 1).await;
    let (code, listing, err) = farm.cli(&["dlq", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(listing.starts_with(&message_id), "{listing}");

    // By its id in upper case.
    let (code, out, err) = farm.cli(&["dlq", "redrive", "--message", &message_id.to_uppercase()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("redrove 1"), "{out}");
    assert_eq!(depth(aws, &aws.dlq_url).await, 0);
    // A new SQS message, whose envelope names the submit's id.
    assert_eq!(
        envelope_ids(aws).await,
        BTreeMap::from([(message_id.clone(), 1)])
    );

    // A worker runs it under that id.
    let _worker = farm.spawn("worker", &AWS_ENV);
    let done = farm
        .wait_for_events(|e| e["type"] == "JobSucceeded", 1, LONG)
        .await;
    assert_eq!(done[0]["message_id"], message_id.as_str(), "{}", done[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_whose_third_send_fails_deletes_exactly_the_two_it_sent() {
    let moto = Moto::shared();
    let (farm, _serve) = parked_farm(moto).await;
    let aws = farm.aws.as_ref().unwrap();
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "get_version", "frames": "1-3"}),
        )
        .await;
    let array = reply["result"]["job_id"].as_str().unwrap().to_owned();
    let children: Vec<String> = reply["result"]["message_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    let_the_redrive_policy_move(aws, 3).await;

    // The third child's send back is refused, once, by a proxy in front of
    // moto (SendMessageBatch answers for each entry, as SQS does). Only a
    // redriven body names its message id, so nothing else is refused.
    let dir = tempfile::tempdir().unwrap();
    let needle = format!("\"message_id\":\"{}\"", children[2]);
    let (proxy, count, _proxy) = fault_proxy(moto, &needle, 1, dir.path());
    let endpoint = moto.endpoint();
    let through_proxy = farm.config_variant("proxied", |text| {
        text.replace(
            &format!("endpoint_url = \"{endpoint}\"\nregion = \"us-east-1\"\nstatus_bucket"),
            &format!("endpoint_url = \"{proxy}\"\nregion = \"us-east-1\"\nstatus_bucket"),
        )
    });
    assert!(
        std::fs::read_to_string(&through_proxy)
            .unwrap()
            .contains(&proxy)
    );

    let started = Instant::now();
    let (code, out, err) = farm.cli_with(&through_proxy, &["dlq", "redrive", "--job", &array]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("2 dead letter(s) put back; 1 could not be and stay in the dead-letter queue")
            && err.contains("injected by the test proxy"),
        "{err}"
    );
    assert_eq!(forwarded(&count), 2);
    // The two sent are gone from the dead-letter queue; the third stays,
    // listed under its own id.
    let (code, listing, err) = farm.cli(&["dlq", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(listing.lines().count(), 1, "{listing}");
    assert!(listing.starts_with(&children[2]), "{listing}");
    assert_eq!(
        envelope_ids(aws).await,
        BTreeMap::from([(children[0].clone(), 1), (children[1].clone(), 1)])
    );

    // Again: only the third is sent.
    let (code, out, err) = farm.cli_with(&through_proxy, &["dlq", "redrive", "--job", &array]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("redrove 1"), "{out}");
    assert_eq!(forwarded(&count), 3);
    assert_eq!(depth(aws, &aws.dlq_url).await, 0);
    assert_eq!(
        envelope_ids(aws).await,
        children.iter().map(|id| (id.clone(), 1)).collect()
    );
    assert!(started.elapsed() < LONG);
}
