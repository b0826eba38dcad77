//! `renderq bench --uploads URL`: one large file result put
//! into an S3-compatible bucket through a proxy that makes the link look
//! like a distant one (a delay on every byte sent, a rate cap on every
//! connection), by a `renderq worker` at upload concurrency 1 and 8, and by
//! `aws s3 cp` when the AWS CLI is installed. Reports the time and the
//! uploader's peak resident memory (VmHWM).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use super::proxy::SlowS3;
use super::{BenchArgs, proc_status_kib, work_until_drained};
use crate::api::submit::SubmitRequest;
use crate::config::Config;
use crate::queue::Queue;

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let endpoint = args.uploads.as_deref().context("--uploads needs a URL")?;
    let size = args.size_mib * 1024 * 1024;
    let SlowS3 {
        proxy_url,
        s3,
        bucket,
        ..
    } = SlowS3::start(endpoint, args).await?;
    println!(
        "{} MiB through a proxy adding {:?} to every request and capping each connection at {} MiB/s:",
        args.size_mib, args.latency, args.rate_mib
    );

    let dir = tempfile::tempdir()?;
    for concurrency in [1, 8] {
        let (took, peak) =
            renderq_upload(dir.path(), &proxy_url, &bucket, size, concurrency).await?;
        let key = format!("renderq-{concurrency}.bin");
        check_and_delete(&s3, &bucket, &key, size).await?;
        report(
            &format!("renderq, upload_concurrency {concurrency}"),
            size,
            took,
            peak,
        );
    }

    // The same file and link for the AWS CLI (its defaults: 8 MiB parts,
    // 10 requests at once).
    let file = dir.path().join("big.bin");
    std::fs::File::create(&file)?.set_len(size)?;
    let aws = tokio::process::Command::new("aws")
        .args([
            "s3",
            "cp",
            "--only-show-errors",
            "--endpoint-url",
            &proxy_url,
        ])
        .arg(&file)
        .arg(format!("s3://{bucket}/aws.bin"))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    match aws {
        Err(error) => println!("  aws s3 cp: not run ({error}; `pip install awscli`)"),
        Ok(child) => {
            let (took, peak) = run_to_end(child).await?;
            check_and_delete(&s3, &bucket, "aws.bin", size).await?;
            report("aws s3 cp", size, took, peak);
        }
    }
    s3.delete_bucket().bucket(&bucket).send().await?;
    Ok(())
}

fn report(who: &str, size: u64, took: Duration, peak_kib: u64) {
    println!(
        "  {who}: {took:.1?} = {:.1} MiB/s, peak RSS {:.1} MiB",
        size as f64 / (1024.0 * 1024.0) / took.as_secs_f64(),
        peak_kib as f64 / 1024.0
    );
}

/// Puts one `size`-byte file result into `bucket` with a `renderq worker`
/// process; returns the time from the worker's start to the job's delete,
/// and the worker's peak resident memory in KiB.
async fn renderq_upload(
    dir: &Path,
    endpoint: &str,
    bucket: &str,
    size: u64,
    concurrency: usize,
) -> anyhow::Result<(Duration, u64)> {
    let config_path = dir.join(format!("upload-{concurrency}.toml"));
    let queue_path = dir.join(format!("queue-{concurrency}"));
    // A sparse file: the disk plays no part in the figure.
    std::fs::write(
        &config_path,
        format!(
            r#"
[queue_manager]
allow_commands = ["big_file"]
default_queue = "bench"
listen_queue = "bench"
[worker]
wait_time = "1s"
[queues.bench]
backend = "local"
path = "{queue}"
[buckets.results]
backend = "s3"
bucket = "{bucket}"
endpoint_url = "{endpoint}"
region = "us-east-1"
upload_concurrency = {concurrency}
[commands.big_file]
kind = "process"
program = "truncate"
args = ["-s", "{size}", "{{workdir}}/big.bin"]
output = "{{workdir}}/big.bin"
"#,
            queue = queue_path.display()
        ),
    )?;
    let config = Config::load(&config_path)?;
    let queue = Queue::open("bench", &config.queues["bench"]).await?;
    let app = crate::app::App::build(config).await?;
    let request: SubmitRequest = serde_json::from_value(serde_json::json!({
        "command": "big_file",
        "tasks": [{"name": "s3_upload", "config": {
            "bucket": "results", "key": format!("renderq-{concurrency}.bin")}}]
    }))?;
    app.submitter().submit(request).await?;

    work_until_drained(&config_path, &queue).await
}

/// Waits for `child`, watching its peak resident memory; returns how long
/// it ran and that peak in KiB.
async fn run_to_end(mut child: tokio::process::Child) -> anyhow::Result<(Duration, u64)> {
    let started = Instant::now();
    let pid = child.id().context("exited at once")?;
    let mut peak = 0;
    loop {
        // VmHWM only grows, so the last reading before the exit is the
        // peak (up to the last 10 ms).
        if let Some(now) = proc_status_kib(pid, "VmHWM") {
            peak = now;
        }
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                anyhow::ensure!(status.success(), "exited with {status}");
                return Ok((started.elapsed(), peak));
            }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
}

async fn check_and_delete(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    size: u64,
) -> anyhow::Result<()> {
    let head = s3.head_object().bucket(bucket).key(key).send().await?;
    anyhow::ensure!(
        head.content_length == Some(size as i64),
        "{key} has {:?} bytes, not {size}",
        head.content_length
    );
    s3.delete_object().bucket(bucket).key(key).send().await?;
    Ok(())
}
