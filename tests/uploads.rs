//! Multipart uploads go up several parts at a time, still in bounded
//! memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::harness::{Backend, Moto, big_file_farm};

/// A proxy in front of `target` that counts how many `UploadPart` requests
/// are open at once (and remembers the most).
async fn counting_proxy(target: String) -> (String, Arc<AtomicUsize>) {
    let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = reqwest::Client::new();
    let seen = most.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let (client, target, open, most) =
            (client.clone(), target.clone(), open.clone(), seen.clone());
        async move {
            let (parts, body) = request.into_parts();
            let is_part = parts.uri.query().is_some_and(|q| q.contains("partNumber="));
            if is_part {
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
            }
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let mut forward = client.request(parts.method.clone(), format!("{target}{path}"));
            for (name, value) in &parts.headers {
                forward = forward.header(name, value);
            }
            let answer = forward.body(body).send().await.unwrap();
            if is_part {
                open.fetch_sub(1, Ordering::SeqCst);
            }
            let mut response = axum::http::Response::builder().status(answer.status());
            for (name, value) in answer.headers() {
                response = response.header(name, value);
            }
            response
                .body(axum::body::Body::from(answer.bytes().await.unwrap()))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, most)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_gib_result_goes_up_several_parts_at_a_time_in_bounded_memory() {
    let farm = big_file_farm(Backend::Sqs).await;
    let (proxy, most) = counting_proxy(Moto::shared().endpoint()).await;
    // The bucket (only) is reached through the proxy.
    let through_proxy = farm.config_variant("proxied", |text| {
        let (queues, buckets) = text.split_at(text.find("[buckets.results]").unwrap());
        let moto = format!("endpoint_url = \"{}\"", Moto::shared().endpoint());
        format!(
            "{queues}{}",
            buckets.replacen(&moto, &format!("endpoint_url = \"{proxy}\""), 1)
        )
    });
    let serve = farm.spawn_with("serve", &[], &through_proxy);
    serve.wait_for_log("Listening for JSON-RPC.", Duration::from_secs(30));
    let id = farm
        .submit(json!({"command": "big_file", "parameters": {"size_mib": 1024},
                       "tasks": [{"name": "s3_upload", "config": {"bucket": "results", "key": "big/${message_id}.bin"}}]}))
        .await;
    let (_, _, dead_lettered) = farm.wait_until_drained(Duration::from_secs(300)).await;
    // The upload succeeded the first time: an object left behind by a
    // completion whose answer the worker could not read does not count.
    assert_eq!(dead_lettered, 0, "{}", serve.log_text());
    let log = serve.log_text();
    assert_eq!(
        log.matches("Job processed, removing from queue.").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("Task failed"), "{log}");
    let aws = farm.aws.as_ref().unwrap();
    let key = format!("big/{id}.bin");
    let head = aws
        .s3
        .head_object()
        .bucket(&aws.bucket)
        .key(&key)
        .send()
        .await
        .expect("the object is there");
    assert_eq!(head.content_length, Some(1024 * 1024 * 1024));
    let at_once = most.load(Ordering::SeqCst);
    assert!(
        at_once > 1,
        "parts overlapped: at most {at_once} open at once"
    );
    let peak = crate::sqs::peak_rss_kib(serve.child.id());
    println!(
        "1 GiB in 128 parts, up to {at_once} at once; worker peak RSS {peak} KiB (debug build)"
    );
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB is over 64 MiB");
    // moto keeps objects in memory.
    let _ = aws
        .s3
        .delete_object()
        .bucket(&aws.bucket)
        .key(&key)
        .send()
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_gib_postback_streams_from_disk_in_bounded_memory() {
    // A server that counts what it receives and keeps none of it.
    let received = Arc::new(AtomicUsize::new(0));
    let counted = received.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let counted = counted.clone();
        async move {
            use http_body_util::BodyExt;
            let mut body = request.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    counted.fetch_add(data.len(), Ordering::SeqCst);
                }
            }
            axum::http::StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let farm = big_file_farm(Backend::Local).await;
    let serve = farm.serve(&[]).await;
    farm.submit(json!({"command": "big_file", "parameters": {"size_mib": 1024},
                       "tasks": [{"name": "http_post", "config": {"postback_uri": format!("http://{addr}/big")}}]}))
        .await;
    farm.wait_until_drained(Duration::from_secs(300)).await;
    assert_eq!(received.load(Ordering::SeqCst), 1024 * 1024 * 1024);
    let peak = crate::sqs::peak_rss_kib(serve.child.id());
    println!("1 GiB postback: worker peak RSS {peak} KiB (debug build)");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB is over 64 MiB");
}
