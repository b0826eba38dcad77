//! `http_post`: POSTs the result to a templated URL.
//!
//! The operator's `[http_post]` policy ([`policy`]) decides where jobs may
//! post; every redirect hop is checked against it too, so neither a DNS
//! record nor a redirect can steer a postback to the metadata service. An
//! attempt is cut when it stalls, never while a large result still moves.

mod policy;

use policy::GuardedResolver;
pub use policy::HostPolicy;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use hmac::{Hmac, Mac};
use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use sha2::Sha256;

use super::TaskError;
use crate::config::HttpPostConfig;
use crate::job::{Body, Output};
use crate::job::{Template, Vars};
use crate::retry::Backoff;

/// Longest wait between two attempts of one postback.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Header carrying `sha256=<hex HMAC of the body>` when a secret is set.
pub const SIGNATURE_HEADER: &str = "X-Renderq-Signature";

/// An `http_post` task's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPost {
    /// URL template, e.g. `https://api.example.com/done/${message_id}`.
    pub postback_uri: Template,
    /// Extra request headers.
    #[serde(default, deserialize_with = "headers")]
    pub headers: BTreeMap<String, String>,
    /// Follow 3xx responses (each hop is checked against the host policy).
    #[serde(default)]
    pub follow_redirects: bool,
    /// Check the server's TLS certificate.
    #[serde(default = "yes")]
    pub verify_ssl: bool,
}

fn yes() -> bool {
    true
}

fn headers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let map = BTreeMap::<String, String>::deserialize(d)?;
    for (name, value) in &map {
        HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| serde::de::Error::custom(format!("invalid header name `{name}`")))?;
        HeaderValue::from_str(value)
            .map_err(|_| serde::de::Error::custom(format!("invalid value for header `{name}`")))?;
    }
    Ok(map)
}

/// Sends postbacks under the operator's policy, with retries.
#[derive(Debug, Clone)]
pub struct HttpPoster {
    policy: HostPolicy,
    timeout: Duration,
    /// One client per (follow_redirects, verify_ssl) pair, built on first
    /// use: a worker that never posts never pays for a TLS client.
    clients: Arc<[OnceLock<reqwest::Client>; 4]>,
    attempts: u32,
    retry: Backoff,
    /// HMAC key for the signature header; read from the environment.
    secret: Option<Arc<[u8]>>,
}

impl HttpPoster {
    pub fn new(config: &HttpPostConfig, secret: Option<String>) -> Self {
        Self {
            policy: HostPolicy::from_config(config),
            timeout: config.timeout,
            clients: Arc::default(),
            attempts: config.attempts,
            retry: Backoff::new(config.retry_delay, MAX_RETRY_DELAY),
            secret: secret.map(|s| Arc::from(s.into_bytes())),
        }
    }

    /// The client for one (follow_redirects, verify_ssl) pair.
    fn client(&self, follow: bool, verify: bool) -> Result<&reqwest::Client, TaskError> {
        let cell = &self.clients[usize::from(follow) * 2 + usize::from(verify)];
        if let Some(client) = cell.get() {
            return Ok(client);
        }
        let hop_policy = self.policy.clone();
        let redirect = if follow {
            reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    attempt.error("more than 5 redirects")
                } else if let Err(e) = hop_policy.check_url(attempt.url()) {
                    attempt.error(format!("redirect refused: {e}"))
                } else {
                    attempt.follow()
                }
            })
        } else {
            reqwest::redirect::Policy::none()
        };
        // No overall timeout: a large result that keeps moving may take as
        // long as it needs; `Progress::watch` cuts an attempt that stalls.
        let client = reqwest::Client::builder()
            .redirect(redirect)
            .danger_accept_invalid_certs(!verify)
            .dns_resolver(Arc::new(GuardedResolver(self.policy.clone())))
            .user_agent(concat!("renderq/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                TaskError::Permanent(format!(
                    "building the HTTP client: {}",
                    crate::error_chain(&e)
                ))
            })?;
        // A racing first use may have won; either client will do.
        Ok(cell.get_or_init(|| client))
    }

    pub async fn post(
        &self,
        task: &HttpPost,
        output: &Output,
        vars: &Vars<'_>,
    ) -> Result<String, TaskError> {
        let rendered = task.postback_uri.render(vars);
        let url = Url::parse(&rendered)
            .map_err(|e| TaskError::Permanent(format!("postback_uri `{rendered}`: {e}")))?;
        self.policy.check_url(&url).map_err(TaskError::Permanent)?;

        let read_error = |path: &std::path::Path, e: std::io::Error| {
            TaskError::Retryable(format!("cannot read result {}: {e}", path.display()))
        };
        let mut headers = HeaderMap::new();
        let content_type = HeaderValue::from_str(output.mime.as_ref())
            .map_err(|e| TaskError::Permanent(format!("content type: {e}")))?;
        headers.insert(CONTENT_TYPE, content_type);
        for (name, value) in &task.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(name, value);
            }
        }
        if let Some(secret) = &self.secret {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
            match &output.body {
                Body::Bytes(bytes) => mac.update(bytes),
                // Signed chunk by chunk, never held whole in memory.
                Body::File(path) => {
                    use tokio::io::AsyncReadExt;
                    let mut file = tokio::fs::File::open(path)
                        .await
                        .map_err(|e| read_error(path, e))?;
                    let mut chunk = vec![0; 1 << 16];
                    loop {
                        let n = file
                            .read(&mut chunk)
                            .await
                            .map_err(|e| read_error(path, e))?;
                        if n == 0 {
                            break;
                        }
                        mac.update(&chunk[..n]);
                    }
                }
            }
            let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            headers.insert(
                SIGNATURE_HEADER,
                HeaderValue::from_str(&signature).expect("hex is a valid header value"),
            );
        }

        let client = self.client(task.follow_redirects, task.verify_ssl)?;
        let mut last_error = TaskError::Retryable(String::new());
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                tokio::time::sleep(self.retry.delay(attempt - 1)).await;
            }
            let progress = Progress::start();
            let (body, length) = request_body(&output.body, &progress)
                .await
                .map_err(|(path, e)| read_error(&path, e))?;
            let request = client
                .post(url.clone())
                .headers(headers.clone())
                // A streamed file keeps its length: no chunked encoding.
                .header(reqwest::header::CONTENT_LENGTH, length)
                .body(body)
                .send();
            last_error = match progress.watch(self.timeout, request).await {
                None => TaskError::Retryable(format!(
                    "{url}: no progress for {}",
                    humantime::format_duration(self.timeout)
                )),
                Some(Ok(response)) if response.status().is_success() => return Ok(url.to_string()),
                Some(Ok(response)) => status_error(&url, response.status()),
                Some(Err(e)) if e.is_redirect() => {
                    TaskError::Permanent(format!("{url}: {}", crate::error_chain(&e)))
                }
                Some(Err(e)) => TaskError::Retryable(format!("{url}: {}", crate::error_chain(&e))),
            };
            tracing::warn!(attempt, error = %last_error, "http_post attempt failed");
            if matches!(last_error, TaskError::Permanent(_)) {
                break;
            }
        }
        Err(last_error)
    }
}

/// When an attempt last moved. An attempt is cut only when it stalls for
/// the configured timeout (connecting, sending, or awaiting the answer after
/// the last byte), so a 1 GiB result on a slow link is not cut half-way.
#[derive(Debug, Clone)]
struct Progress {
    started: Instant,
    /// Milliseconds from `started` to the last chunk the server took.
    moved_ms: Arc<AtomicU64>,
}

impl Progress {
    fn start() -> Self {
        Self {
            started: Instant::now(),
            moved_ms: Arc::default(),
        }
    }

    fn mark(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.moved_ms.store(ms, Ordering::Relaxed);
    }

    fn last_moved(&self) -> Instant {
        self.started + Duration::from_millis(self.moved_ms.load(Ordering::Relaxed))
    }

    /// Runs `request` until it ends, or `None` once it has made no progress
    /// for `limit`.
    async fn watch<F: std::future::Future>(
        &self,
        limit: Duration,
        request: F,
    ) -> Option<F::Output> {
        tokio::pin!(request);
        loop {
            let deadline = self.last_moved() + limit;
            tokio::select! {
                answer = &mut request => return Some(answer),
                () = tokio::time::sleep_until(deadline.into()) => {
                    if self.last_moved() + limit <= Instant::now() {
                        return None;
                    }
                }
            }
        }
    }
}

/// A fresh request body for each attempt and its length: bytes, or the
/// file streamed from disk (never read whole into memory), each chunk
/// marking progress as the connection takes it.
async fn request_body(
    body: &Body,
    progress: &Progress,
) -> Result<(reqwest::Body, u64), (std::path::PathBuf, std::io::Error)> {
    match body {
        Body::Bytes(bytes) => Ok((reqwest::Body::from(bytes.clone()), bytes.len() as u64)),
        Body::File(path) => {
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| (path.clone(), e))?;
            let length = file.metadata().await.map_err(|e| (path.clone(), e))?.len();
            let progress = progress.clone();
            let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 16)
                .inspect(move |_| progress.mark());
            Ok((reqwest::Body::wrap_stream(stream), length))
        }
    }
}

/// What an answer other than 2xx means: the server may recover from a 5xx,
/// a 408 or a 429; any other answer will be the same next time.
fn status_error(url: &Url, status: reqwest::StatusCode) -> TaskError {
    let message = format!("{url} answered {status}");
    if status.is_server_error()
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        TaskError::Retryable(message)
    } else {
        TaskError::Permanent(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_server_trouble_is_worth_another_try() {
        let url = Url::parse("http://127.0.0.1/x").unwrap();
        for code in [500, 503, 408, 429] {
            let status = reqwest::StatusCode::from_u16(code).unwrap();
            assert!(
                matches!(status_error(&url, status), TaskError::Retryable(_)),
                "{code}"
            );
        }
        for code in [400, 403, 404, 410, 301] {
            let status = reqwest::StatusCode::from_u16(code).unwrap();
            assert!(
                matches!(status_error(&url, status), TaskError::Permanent(_)),
                "{code}"
            );
        }
    }

    /// A server that takes `pace_bytes` every `pace` and answers 200 once it
    /// has `total` bytes (headers and body), or never answers when `total`
    /// is `None`.
    async fn slow_server(
        pace_bytes: usize,
        pace: Duration,
        total: Option<usize>,
    ) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(8).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; pace_bytes];
            let mut got = 0;
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
                if total.is_some_and(|total| got >= total) {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(pace).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_slow_upload_that_keeps_moving_is_not_cut() {
        // The kernel's send buffer (up to 4 MiB) lets the sender go a third
        // of it at a time: at about 6 MiB/s, a chunk every few hundred ms.
        const LIMIT: Duration = Duration::from_secs(1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.bin");
        let size = 24 << 20;
        std::fs::write(&path, vec![7u8; size]).unwrap();
        let addr = slow_server(64 * 1024, Duration::from_millis(10), Some(size)).await;

        let started = Instant::now();
        let progress = Progress::start();
        let (body, length) = request_body(&Body::File(path), &progress).await.unwrap();
        let request = reqwest::Client::new()
            .post(format!("http://{addr}/big"))
            .header(reqwest::header::CONTENT_LENGTH, length)
            .body(body)
            .send();
        let answer = progress.watch(LIMIT, request).await;
        let took = started.elapsed();
        assert!(
            matches!(answer, Some(Ok(ref r)) if r.status().is_success()),
            "{answer:?}"
        );
        assert!(took > LIMIT * 2, "the upload took only {took:?}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_cut_after_the_timeout() {
        let addr = slow_server(64 * 1024, Duration::ZERO, None).await;
        let poster = HttpPoster::new(
            &HttpPostConfig {
                timeout: Duration::from_millis(300),
                attempts: 1,
                ..HttpPostConfig::default()
            },
            None,
        );
        let task = HttpPost {
            postback_uri: Template::parse(&format!("http://{addr}/done")).unwrap(),
            headers: BTreeMap::new(),
            follow_redirects: false,
            verify_ssl: true,
        };
        let output = Output::bytes(b"{}".to_vec(), mime::APPLICATION_JSON);
        let started = Instant::now();
        let error = poster
            .post(&task, &output, &Vars::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&error, TaskError::Retryable(m) if m.contains("no progress for 300ms")),
            "{error:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
