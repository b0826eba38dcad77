//! SQS-only behaviour, against moto: losing the endpoint, and start-up
//! errors that name the queue and the reason.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{AWS_ENV, Aws, BIN, Farm, Moto, Settings, free_port};

const LONG: Duration = Duration::from_secs(60);

fn upload(key: &str) -> serde_json::Value {
    json!({"name": "s3_upload", "config": {"bucket": "results", "key": key}})
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_recovers_when_the_endpoint_comes_back() {
    let moto = Moto::start_on(free_port());
    let farm = Farm::on_moto(&moto, Settings::default()).await;
    let serve = farm.serve(&[]).await;
    let first = farm
        .submit(json!({"command": "get_version", "tasks": [upload("a-${message_id}.json")]}))
        .await;
    farm.wait_for_object(&format!("a-{first}.json"), LONG).await;

    moto.stop();
    // While the endpoint is gone a submit says so, and nothing is lost
    // silently: the client is told to try again.
    let refused = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "get_version"}),
        )
        .await;
    assert_eq!(refused["error"]["code"], -32000, "{refused}");
    serve.wait_for_log("queue error", LONG);

    // Back again (moto keeps state in memory, so the queue and bucket are
    // created anew under the same names).
    moto.start();
    let aws = farm.aws.as_ref().unwrap();
    Aws::create_named(&moto.endpoint(), &aws.bucket, 3).await;
    let started = Instant::now();
    let second = farm
        .submit(json!({"command": "get_version", "tasks": [upload("b-${message_id}.json")]}))
        .await;
    farm.wait_for_object(&format!("b-{second}.json"), LONG)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "took {:?}",
        started.elapsed()
    );
}

/// Runs `check-config` and `worker` on a config whose queue is `queue_toml`;
/// both must fail fast, naming the queue.
fn assert_refused(queue_toml: &str, env: &[(&str, &str)], expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("workers.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[queue_manager]
allow_commands = ["get_version"]
default_queue = "renders"
listen_queue = "renders"

[queues.renders]
{queue_toml}
"#
        ),
    )
    .unwrap();
    for subcommand in ["check-config", "worker"] {
        let out = Command::new(BIN)
            .args([subcommand, "--config"])
            .arg(&config)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{subcommand} should fail: {stderr}");
        assert!(stderr.contains("queue `renders`"), "{subcommand}: {stderr}");
        assert!(
            stderr.to_lowercase().contains(expect),
            "{subcommand}: expected {expect:?} in {stderr}"
        );
    }
}

#[test]
fn missing_queue_is_named_at_start() {
    let endpoint = Moto::shared().endpoint();
    assert_refused(
        &format!(
            r#"backend = "sqs"
url = "{endpoint}/123456789012/no-such-queue-{}"
endpoint_url = "{endpoint}"
region = "us-east-1""#,
            uuid::Uuid::new_v4().simple()
        ),
        &AWS_ENV,
        "nonexistentqueue",
    );
}

#[test]
fn refused_endpoint_is_named_at_start() {
    let port = free_port();
    assert_refused(
        &format!(
            r#"backend = "sqs"
url = "http://127.0.0.1:{port}/123456789012/renders"
endpoint_url = "http://127.0.0.1:{port}"
region = "us-east-1""#
        ),
        &AWS_ENV,
        "connect",
    );
}

#[test]
fn missing_credentials_are_named_at_start() {
    let endpoint = Moto::shared().endpoint();
    assert_refused(
        &format!(
            r#"backend = "sqs"
url = "{endpoint}/123456789012/renders"
endpoint_url = "{endpoint}"
region = "us-east-1""#
        ),
        &[("AWS_EC2_METADATA_DISABLED", "true")],
        "credentials",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_without_redrive_policy_is_refused() {
    let endpoint = Moto::shared().endpoint();
    let (sqs, _) = crate::harness::aws_clients(&endpoint).await;
    let url = sqs
        .create_queue()
        .queue_name(format!("no-dlq-{}", uuid::Uuid::new_v4().simple()))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let toml = format!(
        "backend = \"sqs\"\nurl = \"{url}\"\nendpoint_url = \"{endpoint}\"\nregion = \"us-east-1\""
    );
    tokio::task::spawn_blocking(move || assert_refused(&toml, &AWS_ENV, "redrive policy"))
        .await
        .unwrap();
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

async fn open_uploads(farm: &Farm) -> usize {
    let aws = farm.aws.as_ref().unwrap();
    aws.s3
        .list_multipart_uploads()
        .bucket(&aws.bucket)
        .send()
        .await
        .unwrap()
        .uploads
        .unwrap_or_default()
        .len()
}

#[tokio::test(flavor = "multi_thread")]
async fn large_result_streams_as_multipart_in_bounded_memory() {
    let farm = crate::harness::big_file_farm(crate::harness::Backend::Sqs).await;
    let serve = farm.serve(&[]).await;
    let id = farm
        .submit(
            json!({"command": "big_file", "parameters": {"size_mib": 200},
                       "tasks": [upload("big/${message_id}.${mime_ext}")]}),
        )
        .await;
    farm.wait_until_drained(Duration::from_secs(300)).await;

    let aws = farm.aws.as_ref().unwrap();
    let head = aws
        .s3
        .head_object()
        .bucket(&aws.bucket)
        .key(format!("big/{id}.bin"))
        .send()
        .await
        .expect("the object is there");
    assert_eq!(head.content_length, Some(200 * 1024 * 1024));
    let etag = head.e_tag.unwrap_or_default();
    assert!(
        etag.trim_matches('"').ends_with("-25"),
        "25 parts of 8 MiB: {etag}"
    );
    assert_eq!(
        open_uploads(&farm).await,
        0,
        "no multipart upload left open"
    );

    let peak = peak_rss_kib(serve.child.id());
    println!("worker peak resident memory during a 200 MiB multipart upload: {peak} KiB");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB is over 64 MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_failing_halfway_is_aborted_and_the_job_retried() {
    let farm = crate::harness::big_file_farm(crate::harness::Backend::Sqs).await;
    let serve = farm.serve(&[]).await;
    let id = farm
        .submit(
            json!({"command": "big_file", "parameters": {"size_mib": 200},
                       "tasks": [upload("big/${message_id}.${mime_ext}")]}),
        )
        .await;
    let key = format!("big/{id}.bin");

    // Pull the file from under the upload once it has started.
    serve.wait_for_log("Executing task: s3_upload.", LONG);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let result = farm
        .job_folders()
        .into_iter()
        .map(|dir| dir.join("big.bin"))
        .find(|p| p.exists())
        .expect("the job's result file");
    std::fs::File::options()
        .write(true)
        .open(&result)
        .unwrap()
        .set_len(1024)
        .unwrap();

    serve.wait_for_log("Job failed, returning to queue for a retry.", LONG);
    let aws = farm.aws.as_ref().unwrap();
    let partial = aws
        .s3
        .head_object()
        .bucket(&aws.bucket)
        .key(&key)
        .send()
        .await;
    assert!(partial.is_err(), "no partial object under the final key");
    assert_eq!(
        open_uploads(&farm).await,
        0,
        "the failed multipart upload was aborted"
    );

    // The retry writes the file again and uploads all of it.
    farm.wait_until_drained(Duration::from_secs(300)).await;
    let head = aws
        .s3
        .head_object()
        .bucket(&aws.bucket)
        .key(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length, Some(200 * 1024 * 1024));
    assert!(serve.log_text().contains("attempt=2"));
    assert_eq!(open_uploads(&farm).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_bucket_is_named_at_start() {
    let endpoint = Moto::shared().endpoint();
    let aws = Aws::create(&endpoint, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("workers.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[queue_manager]
allow_commands = ["get_version"]
default_queue = "renders"
listen_queue = "renders"

[queues.renders]
backend = "sqs"
url = "{}"
endpoint_url = "{endpoint}"
region = "us-east-1"

[buckets.results]
backend = "s3"
bucket = "no-such-bucket-{}"
endpoint_url = "{endpoint}"
region = "us-east-1"
"#,
            aws.queue_url,
            uuid::Uuid::new_v4().simple()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .envs(AWS_ENV)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bucket `results`") && stderr.contains("no-such-bucket"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_the_redrive_policy_moved_is_counted_and_its_array_completes_once() {
    let metrics_port = free_port();
    let farm = Farm::new(
        crate::harness::Backend::Sqs,
        Settings {
            // Budget 2, so the redrive policy's count is 3. The test's own
            // receive below uses one of each child's tries.
            max_receive_count: 2,
            worker_toml: "dead_letter_sweep = \"1s\"".into(),
            extra_toml: format!(
                "{}\n[queues.elsewhere]\nbackend = \"local\"\npath = \"elsewhere\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
                crate::harness::AUDIT_AND_ASSETS
            ),
            ..Settings::default()
        },
    )
    .await;
    // A submitter whose own worker listens elsewhere, so that the children
    // wait in the queue.
    let submitter = farm.config_variant("submitter", |text| {
        text.replace("listen_queue = \"renders\"", "listen_queue = \"elsewhere\"")
            .replace(&format!("listen = \"127.0.0.1:{metrics_port}\""), "")
    });
    let _serve = farm.serve_with(&AWS_ENV, &submitter).await;
    let reply = farm
        .rpc(
            "queue_manager_submit_job",
            json!({"command": "get_version", "frames": "1-3"}),
        )
        .await;
    let job_id = reply["result"]["job_id"].as_str().unwrap().to_owned();

    // Child 0's workers die during each of its tries: the test receives it
    // and lets it go, three times (the redrive policy's count), while it
    // holds the other two; at the next receive SQS's redrive policy moves
    // it, as it is (no renderq note), to the dead-letter queue.
    let aws = farm.aws.as_ref().unwrap();
    let receive = || async {
        aws.sqs
            .receive_message()
            .queue_url(&aws.queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default()
    };
    let release = |receipt: String| async move {
        aws.sqs
            .change_message_visibility()
            .queue_url(&aws.queue_url)
            .receipt_handle(receipt)
            .visibility_timeout(0)
            .send()
            .await
            .unwrap();
    };
    let (mut held, mut child0) = (Vec::new(), None);
    while held.len() + usize::from(child0.is_some()) < 3 {
        for message in receive().await {
            let receipt = message.receipt_handle().unwrap().to_owned();
            if message.body().unwrap().contains("\"index\":0,") {
                child0 = Some(receipt);
            } else {
                held.push(receipt);
            }
        }
    }
    for _ in 0..2 {
        release(child0.take().unwrap()).await;
        let again = receive().await;
        assert_eq!(again.len(), 1, "only child 0 is visible");
        child0 = Some(again[0].receipt_handle().unwrap().to_owned());
    }
    release(child0.take().unwrap()).await;
    for receipt in held {
        release(receipt).await;
    }
    // And a message that is no renderq job at all.
    aws.sqs
        .send_message()
        .queue_url(&aws.dlq_url)
        .message_body("hello")
        .send()
        .await
        .unwrap();

    let worker = farm.spawn("worker", &AWS_ENV);
    let done = farm
        .wait_for_events(|e| e["type"] == "ArrayJobCompleted", 1, LONG)
        .await;
    assert_eq!(done[0]["job_id"], job_id.as_str());
    assert_eq!(
        done[0]["detail"],
        json!({"size": 3, "succeeded": 2, "dead_lettered": 1, "cancelled": 0})
    );
    worker.wait_for_log("A dead letter that is not a renderq job: skipped.", LONG);
    // Later sweeps pass both by: still one completion, one skip.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let completions = farm
        .events()
        .iter()
        .filter(|e| e["type"] == "ArrayJobCompleted")
        .count();
    assert_eq!(completions, 1);
    let log = worker.log_text();
    assert_eq!(
        log.matches("not a renderq job: skipped").count(),
        1,
        "{log}"
    );
    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("renderq_dead_letters_swept_total{result=\"skipped\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("renderq_dead_letters_swept_total{result=\"counted\"} 1"),
        "{metrics}"
    );
    // `dlq list` says why each is there, even while a reader (here the
    // test, as a sweep does each second) holds them out of sight. The
    // worker's sweep may hold them just now: receive until the test holds
    // some.
    let mut held = 0;
    for _ in 0..10 {
        held = aws
            .sqs
            .receive_message()
            .queue_url(&aws.dlq_url)
            .max_number_of_messages(10)
            .visibility_timeout(1)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap()
            .messages()
            .len();
        if held > 0 {
            break;
        }
    }
    assert!(held > 0, "the test never held a dead letter");
    let (code, out, err) = farm.cli(&["dlq", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("moved by the queue's redrive policy"), "{out}");
    assert!(out.contains("not a renderq job"), "{out}");
}
