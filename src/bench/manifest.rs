//! A cold manifest of many small files, for `renderq bench --inputs`:
//! staged with `download_concurrency` 8 and one at a time, through the
//! slow-link proxy, with the requests each staging made.

use anyhow::Context;
use tokio::time::Instant;

use super::proxy::SlowS3;
use super::work_until_drained;
use crate::config::Config;
use crate::queue::Queue;

/// Bytes of each file.
const FILE: usize = 1024;

/// Puts `files` files of 1 KiB (each its own content) and their manifest
/// in the bucket, then stages the manifest cold once per concurrency.
pub async fn run(s3: &SlowS3, endpoint: &str, files: usize) -> anyhow::Result<()> {
    if files == 0 {
        return Ok(());
    }
    let started = Instant::now();
    put_shot(s3, files).await?;
    println!(
        "a cold manifest of {files} files of 1 KiB (written in {:.1?}), one job staging it:",
        started.elapsed()
    );
    for concurrency in [8, 1] {
        let dir = tempfile::tempdir()?;
        let config_path = super::inputs::config(dir.path(), s3, endpoint, concurrency)?;
        let config = Config::load(&config_path)?;
        let queue = Queue::open("bench", &config.queues["bench"]).await?;
        let app = crate::app::App::build(config).await?;
        let request = serde_json::from_value(serde_json::json!({
            "command": "noop",
            "inputs": [{"bucket": "assets", "manifest": "Manifests/shot_input", "path": "shot"}]
        }))?;
        app.submitter().submit(request).await?;
        // Only the staging's requests: the submit's HEAD is not counted.
        s3.requests.take();
        work_until_drained(&config_path, &queue).await?;
        let requests = s3.requests.take();
        let staged = std::fs::read_to_string(dir.path().join("events.jsonl"))?
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|e| e["type"] == "JobStarted")
            .map(|e| e["detail"]["inputs"].clone())
            .context("the job never started")?;
        println!(
            "  download_concurrency {concurrency}: staged {} files ({} bytes downloaded) in {:.1} s, {requests} requests to S3",
            staged["files"],
            staged["bytes_downloaded"],
            staged["seconds"].as_f64().unwrap_or_default(),
        );
    }
    Ok(())
}

/// The files under `Data/<hash>.xxh128`, 32 at a time, straight to the
/// server, and their manifest under `Manifests/`.
async fn put_shot(s3: &SlowS3, files: usize) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let mut paths = Vec::with_capacity(files);
    let mut puts = futures_util::stream::iter(0..files)
        .map(|i| {
            let mut bytes = vec![0u8; FILE];
            bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
            fastrand::fill(&mut bytes[8..]);
            let hash = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes));
            let put = s3
                .s3
                .put_object()
                .bucket(&s3.bucket)
                .key(format!("Data/{hash}.xxh128"))
                .body(bytes.into())
                .send();
            async move { put.await.map(|_| (i, hash)) }
        })
        .buffer_unordered(32);
    while let Some(put) = puts.next().await {
        let (i, hash) = put?;
        paths.push(serde_json::json!({
            "hash": hash,
            "mtime": 1_700_000_000_000_000i64,
            "path": format!("textures/{:03}/tex{i:05}.png", i % 100),
            "size": FILE,
        }));
    }
    paths.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    let manifest = serde_json::json!({
        "hashAlg": "xxh128",
        "manifestVersion": "2023-03-03",
        "paths": paths,
        "totalSize": files * FILE,
    });
    s3.s3
        .put_object()
        .bucket(&s3.bucket)
        .key("Manifests/shot_input")
        .body(serde_json::to_vec(&manifest)?.into())
        .send()
        .await?;
    Ok(())
}
