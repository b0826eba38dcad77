//! `renderq bench --inputs URL`: 20 jobs on one worker share one large
//! input from an S3-compatible server, reached through the slow-link proxy
//! of `bench --uploads`. Reports the bytes downloaded (want the input's
//! size, once), the staging time of a cache hit (the input is pinned, so a
//! hit asks the server nothing), the first download's rate against `aws s3
//! cp` of the same object through the same proxy, and the worker's peak
//! resident memory; then placing that input as a copy and as a reflink
//! clone ([`super::cache`]), making room with a small and a large index,
//! and a cold manifest of many small files staged 8 at a time and one at a
//! time ([`super::manifest`]).

use std::path::Path;
use std::process::Stdio;

use anyhow::Context;
use tokio::time::Instant;

use super::proxy::SlowS3;
use super::{BenchArgs, work_until_drained};
use crate::config::Config;
use crate::queue::Queue;

/// Jobs sharing the input.
const JOBS: usize = 20;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let endpoint = args.inputs.as_deref().context("--inputs needs a URL")?;
    let size = args.size_mib * 1024 * 1024;
    let slow = SlowS3::start(endpoint, args).await?;
    let (proxy_url, bucket) = (slow.proxy_url.clone(), slow.bucket.clone());
    let dir = tempfile::tempdir()?;
    let config_path = config(dir.path(), &slow, endpoint, 8)?;
    // Job folders and the cache on XFS where an image can be mounted here,
    // so that a hit is placed as a clone, not 1 GiB copied.
    let xfs = super::cache::xfs::Mounted::xfs(
        &dir.path().join("xfs.img"),
        &dir.path().join("work"),
        args.size_mib * 2 + 300,
    );
    put_input(dir.path(), &config_path, size).await?;
    println!(
        "{JOBS} jobs sharing one {} MiB input, through a proxy adding {:?} and capping each connection at {} MiB/s; inputs placed {}:",
        args.size_mib,
        args.latency,
        args.rate_mib,
        match &xfs {
            Ok(_) => "as reflink clones (job folders and cache on an XFS image)".to_owned(),
            Err(why) => format!("as plain copies (no XFS image: {why})"),
        }
    );

    let config = Config::load(&config_path)?;
    let queue = Queue::open("bench", &config.queues["bench"]).await?;
    let app = crate::app::App::build(config).await?;
    for _ in 0..JOBS {
        let request = serde_json::from_value(serde_json::json!({
            "command": "noop",
            "inputs": [{"bucket": "assets", "key": "input.bin", "path": "input.bin"}]
        }))?;
        app.submitter().submit(request).await?;
    }
    let (took, peak) = work_until_drained(&config_path, &queue).await?;

    let staged: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("events.jsonl"))?
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["type"] == "JobStarted")
        .map(|e| e["detail"]["inputs"].clone())
        .collect();
    let downloaded: u64 = staged
        .iter()
        .filter_map(|s| s["bytes_downloaded"].as_u64())
        .sum();
    let mut hits: Vec<f64> = staged
        .iter()
        .filter(|s| s["bytes_downloaded"] == 0)
        .filter_map(|s| s["seconds"].as_f64())
        .collect();
    hits.sort_by(f64::total_cmp);
    let first = staged
        .iter()
        .find(|s| s["bytes_downloaded"].as_u64() > Some(0))
        .and_then(|s| s["seconds"].as_f64())
        .context("no job downloaded the input")?;
    println!(
        "  {JOBS} jobs in {took:.1?}; bytes downloaded: {downloaded} ({:.2}× the input)",
        downloaded as f64 / size as f64
    );
    if let (Some(median), Some(max)) = (hits.get(hits.len() / 2), hits.last()) {
        println!(
            "  staging a cache hit: median {:.2} ms, max {:.2} ms ({} hits)",
            median * 1e3,
            max * 1e3,
            hits.len()
        );
    }
    println!(
        "  first download: {first:.1} s = {:.1} MiB/s; worker peak RSS {:.1} MiB",
        args.size_mib as f64 / first,
        peak as f64 / 1024.0
    );
    aws_cp(&proxy_url, &bucket, dir.path(), args.size_mib).await;
    let cached = cached_blob(&dir.path().join("work/cache/blobs")).context("the cached input")?;
    super::cache::placement(&cached, args.size_mib)?;
    drop(xfs);
    drop(dir);
    super::cache::eviction().await?;
    super::manifest::run(&slow, endpoint, args.files).await?;
    overlap(&proxy_url, &bucket, args).await
}

/// A worker config in `dir` with one slot and an input cache: the bucket
/// `assets` through the proxy, `direct` straight to `endpoint`, a no-op
/// command, and events to `events.jsonl`.
pub(super) fn config(
    dir: &Path,
    s3: &SlowS3,
    endpoint: &str,
    download_concurrency: usize,
) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("workers.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[queue_manager]
allow_commands = ["noop"]
default_queue = "bench"
listen_queue = "bench"
[worker]
wait_time = "1s"
work_dir = "work"
[worker.cache]
path = "work/cache"
download_concurrency = {download_concurrency}
[queues.bench]
backend = "local"
path = "queue"
[buckets.assets]
backend = "s3"
bucket = "{bucket}"
endpoint_url = "{proxy}"
region = "us-east-1"
[buckets.direct]
backend = "s3"
bucket = "{bucket}"
endpoint_url = "{endpoint}"
region = "us-east-1"
[commands.noop]
kind = "process"
program = "true"
[events.targets.audit]
kind = "file"
path = "events.jsonl"
"#,
            bucket = s3.bucket,
            proxy = s3.proxy_url,
        ),
    )?;
    std::fs::create_dir_all(dir.join("work"))?;
    Ok(path)
}

/// The one file under `dir` (the cache's blobs).
fn cached_blob(dir: &Path) -> Option<std::path::PathBuf> {
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                return Some(path);
            }
        }
    }
    None
}

/// Three renders of one second on one slot, each uploading a 100 MiB
/// result through the proxy: the idle time between one render's end and
/// the next one's start, against how long each upload took after its
/// render (what the gap was when uploads did not overlap).
async fn overlap(proxy_url: &str, bucket: &str, args: &BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let marks = dir.path().join("marks");
    let config_path = dir.path().join("workers.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
[queue_manager]
allow_commands = ["render"]
default_queue = "bench"
listen_queue = "bench"
[worker]
wait_time = "1s"
[queues.bench]
backend = "local"
path = "queue"
[buckets.results]
backend = "s3"
bucket = "{bucket}"
endpoint_url = "{proxy_url}"
region = "us-east-1"
[commands.render]
kind = "process"
program = "sh"
args = ["-c", "echo start $(date +%s%N) >> {marks}; sleep 1; head -c 104857600 /dev/urandom > out.bin; echo end $(date +%s%N) >> {marks}"]
output = "{{workdir}}/out.bin"
[events.targets.audit]
kind = "file"
path = "events.jsonl"
"#,
            marks = marks.display()
        ),
    )?;
    let config = Config::load(&config_path)?;
    let queue = Queue::open("bench", &config.queues["bench"]).await?;
    let app = crate::app::App::build(config).await?;
    for i in 0..3 {
        let request = serde_json::from_value(serde_json::json!({
            "command": "render",
            "tasks": [{"name": "s3_upload", "config": {"bucket": "results", "key": format!("overlap-{i}.bin")}}]
        }))?;
        app.submitter().submit(request).await?;
    }
    work_until_drained(&config_path, &queue).await?;
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    for line in std::fs::read_to_string(&marks)?.lines() {
        let (kind, ns) = line.split_once(' ').context("a mark")?;
        let at = ns.parse::<i64>()? as f64 / 1e9;
        if kind == "start" {
            starts.push(at)
        } else {
            ends.push(at)
        }
    }
    let deleted: Vec<f64> = std::fs::read_to_string(dir.path().join("events.jsonl"))?
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["type"] == "JobSucceeded")
        .filter_map(|e| chrono::DateTime::parse_from_rfc3339(e["time"].as_str()?).ok())
        .map(|t| t.timestamp_nanos_opt().unwrap_or(0) as f64 / 1e9)
        .collect();
    let gaps: Vec<String> = starts
        .iter()
        .skip(1)
        .zip(&ends)
        .map(|(s, e)| format!("{:.0} ms", (s - e) * 1e3))
        .collect();
    let uploads: Vec<String> = deleted
        .iter()
        .zip(&ends)
        .map(|(d, e)| format!("{:.2} s", d - e))
        .collect();
    println!(
        "  1 s renders with a 100 MiB upload each at {} MiB/s a connection: idle gap between renders {}; each upload ended {} after its render (the gap without overlap)",
        args.rate_mib,
        gaps.join(", "),
        uploads.join(", ")
    );
    Ok(())
}

/// Puts a sparse `size`-byte object at `input.bin` with renderq's own
/// multipart upload, straight to the server.
async fn put_input(dir: &Path, config_path: &Path, size: u64) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let bucket = crate::storage::Bucket::open("direct", &config.buckets["direct"]).await;
    let workdir = std::sync::Arc::new(crate::workspace::Workspace::new(dir).temp_dir("put-")?);
    let file = workdir.path().join("input.bin");
    std::fs::File::create(&file)?.set_len(size)?;
    let output = crate::job::Output::file(file, mime::APPLICATION_OCTET_STREAM, workdir);
    bucket
        .put("input.bin", &output, "application/octet-stream", None)
        .await?;
    Ok(())
}

/// The same object through the same proxy with the AWS CLI, if installed.
async fn aws_cp(proxy_url: &str, bucket: &str, dir: &Path, size_mib: u64) {
    let started = Instant::now();
    let status = tokio::process::Command::new("aws")
        .args([
            "s3",
            "cp",
            "--only-show-errors",
            "--endpoint-url",
            proxy_url,
        ])
        .arg(format!("s3://{bucket}/input.bin"))
        .arg(dir.join("aws.bin"))
        .stdout(Stdio::null())
        .status()
        .await;
    match status {
        Ok(status) if status.success() => {
            let took = started.elapsed().as_secs_f64();
            println!(
                "  aws s3 cp of the same object: {took:.1} s = {:.1} MiB/s",
                size_mib as f64 / took
            );
        }
        Ok(status) => println!("  aws s3 cp: failed ({status})"),
        Err(error) => println!("  aws s3 cp: not run ({error}; `pip install awscli`)"),
    }
}
