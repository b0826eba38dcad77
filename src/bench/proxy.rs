//! A TCP proxy that makes a link look like a distant one: every byte
//! arrives `latency` late, and each connection carries at most `rate`
//! bytes/s each way. For `bench --uploads`, `bench --inputs`, and tests of
//! slow transfers.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The proxy's unit of transfer.
const CHUNK: usize = 64 * 1024;
/// Chunks waiting in the proxy per direction of a connection.
const CHUNKS: usize = 64;
/// How far a connection may run ahead of its rate before it is paused: the
/// timer's resolution is a millisecond, so pausing after every chunk would
/// cap the rate below the one asked for.
const SLACK: Duration = Duration::from_millis(10);

/// An S3-compatible server reached through the proxy, with a fresh bucket
/// on it for one benchmark.
pub(super) struct SlowS3 {
    /// The proxy's URL: what renderq (or the AWS CLI) is pointed at.
    pub proxy_url: String,
    /// A client straight to the server, for setting up and checking.
    pub s3: aws_sdk_s3::Client,
    pub bucket: String,
    /// Requests that went through the proxy (see [`Requests`]).
    pub requests: Requests,
}

impl SlowS3 {
    /// Starts the proxy in front of `endpoint` (with `--latency` and
    /// `--rate-mib`) and makes the bucket.
    pub async fn start(endpoint: &str, args: &super::BenchArgs) -> anyhow::Result<Self> {
        let upstream = reqwest::Url::parse(endpoint)?
            .socket_addrs(|| None)?
            .into_iter()
            .next()
            .context("S3 endpoint has no address")?;
        let requests = Requests::default();
        let proxy = counting_proxy(
            upstream,
            args.latency,
            args.rate_mib * 1024 * 1024,
            requests.clone(),
        )
        .await?;
        let sdk = crate::aws::sdk_config(Some("us-east-1"), Some(endpoint)).await;
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(true)
                .build(),
        );
        let bucket = format!(
            "renderq-bench-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        s3.create_bucket().bucket(&bucket).send().await?;
        Ok(Self {
            proxy_url: format!("http://{proxy}"),
            s3,
            bucket,
            requests,
        })
    }
}

/// HTTP requests a proxy carried, counted by the blank line that ends their
/// headers: exact for requests without a body (GET, HEAD), which are all
/// that staging inputs sends.
#[derive(Debug, Clone, Default)]
pub struct Requests(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Requests {
    pub fn take(&self) -> u64 {
        self.0.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts the header ends in `chunk`, which follows `tail` (the last
    /// three bytes before it), and returns the new tail.
    fn count(&self, tail: &[u8], chunk: &[u8]) -> Vec<u8> {
        let mut joined = tail.to_vec();
        joined.extend_from_slice(chunk);
        let ends = joined.windows(4).filter(|w| *w == b"\r\n\r\n").count();
        self.0
            .fetch_add(ends as u64, std::sync::atomic::Ordering::Relaxed);
        joined[joined.len().saturating_sub(3)..].to_vec()
    }
}

/// Starts the proxy in front of `upstream` on a free local port; it runs
/// as long as the runtime does.
pub async fn latency_proxy(
    upstream: SocketAddr,
    latency: Duration,
    rate: u64,
) -> std::io::Result<SocketAddr> {
    counting_proxy(upstream, latency, rate, Requests::default()).await
}

/// [`latency_proxy`], counting the requests it carries.
pub async fn counting_proxy(
    upstream: SocketAddr,
    latency: Duration,
    rate: u64,
    requests: Requests,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let requests = requests.clone();
            tokio::spawn(async move {
                if let Ok(server) = TcpStream::connect(upstream).await {
                    let (from_client, to_client) = client.into_split();
                    let (from_server, to_server) = server.into_split();
                    let _ = tokio::join!(
                        paced(from_client, to_server, latency, rate, Some(requests)),
                        paced(from_server, to_client, latency, rate, None),
                    );
                }
            });
        }
    });
    Ok(address)
}

/// Copies `from` to `to`, each chunk `latency` late, at most `rate` bytes/s.
async fn paced(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    latency: Duration,
    rate: u64,
    requests: Option<Requests>,
) -> std::io::Result<()> {
    let (chunks, mut delayed) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS);
    let read = async move {
        let mut tail = Vec::new();
        loop {
            let mut chunk = vec![0; CHUNK];
            let n = from.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            chunk.truncate(n);
            if let Some(requests) = &requests {
                tail = requests.count(&tail, &chunk);
            }
            if chunks
                .send((Instant::now() + latency, chunk))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    };
    let write = async move {
        // The time the link is free again at the capped rate.
        let mut free_at = Instant::now();
        while let Some((due, chunk)) = delayed.recv().await {
            tokio::time::sleep_until(due).await;
            free_at = free_at.max(Instant::now())
                + Duration::from_secs_f64(chunk.len() as f64 / rate as f64);
            to.write_all(&chunk).await?;
            if free_at > Instant::now() + SLACK {
                tokio::time::sleep_until(free_at).await;
            }
        }
        to.shutdown().await
    };
    let (read, write) = tokio::join!(read, write);
    read.and(write)
}
