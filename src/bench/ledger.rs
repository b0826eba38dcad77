//! `renderq bench --ledger URL`: what the S3 ledger costs per array child.
//! Arrays of 10, 1,000 and 10,000 children are settled against the
//! S3-compatible server at URL (e.g. a local moto) by 4 ledgers (as 4
//! worker processes would have) of 4 concurrent settlers each, and every
//! S3 call they make is counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use aws_sdk_s3::config::interceptors::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError;
use aws_smithy_types::config_bag::{Storable, StoreReplace};
use tokio::time::Instant;

use crate::events::ledger::{ChildState, Ledger};

/// Counts the requests a client sends (retries included), and notes when
/// each claim of a held object (an `If-Match` PUT under `deps/held/`)
/// landed.
#[derive(Debug, Clone, Default)]
pub(super) struct Counter {
    calls: Arc<AtomicU64>,
    claims: Arc<Mutex<Vec<(String, SystemTime)>>>,
}

impl Counter {
    pub(super) fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The held objects' conditional writes that landed: the key's path
    /// after `deps/held/` (`JOB/INDEX`), and when the answer came.
    pub(super) fn claims(&self) -> Vec<(String, SystemTime)> {
        self.claims.lock().expect("claims lock").clone()
    }
}

/// An S3 client for `endpoint` whose every request `Counter` counts.
pub(super) async fn counted_client(endpoint: &str) -> (aws_sdk_s3::Client, Counter) {
    let sdk = crate::aws::sdk_config(Some("us-east-1"), Some(endpoint)).await;
    let counter = Counter::default();
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .interceptor(counter.clone())
            .build(),
    );
    (client, counter)
}

impl Intercept for Counter {
    fn name(&self) -> &'static str {
        "bench call counter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let request = context.request();
        if request.method() == "PUT"
            && request.headers().get("if-match").is_some()
            && let Some((_, held)) = request.uri().split_once("/deps/held/")
        {
            let held = held.split('?').next().unwrap_or(held).to_owned();
            cfg.interceptor_state().store_put(Claiming(held));
        }
        Ok(())
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(Claiming(held)) = cfg.load::<Claiming>()
            && context.response().status().is_success()
        {
            let at = SystemTime::now();
            (self.claims.lock().expect("claims lock")).push((held.clone(), at));
        }
        Ok(())
    }
}

/// The held object a conditional PUT would claim, kept in its request's
/// bag from its sending to its answer (the request is gone by then).
#[derive(Debug, Clone)]
struct Claiming(String);

impl Storable for Claiming {
    type Storer = StoreReplace<Self>;
}

const WORKERS: u32 = 4;
const SLOTS: u32 = 4;

pub async fn run(endpoint: &str) -> anyhow::Result<()> {
    let (client, counter) = counted_client(endpoint).await;
    let bucket = format!(
        "bench-ledger-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    client.create_bucket().bucket(&bucket).send().await?;
    for size in [10u32, 1_000, 10_000] {
        let array_id = uuid::Uuid::new_v4().to_string();
        let before = counter.calls();
        let started = Instant::now();
        let mut tasks = Vec::new();
        let completions = Arc::new(AtomicU64::new(0));
        for worker in 0..WORKERS {
            // A ledger each: settles batch only within one process.
            let ledger = Ledger::s3(client.clone(), bucket.clone(), "renderq-status", "bench");
            for slot in 0..SLOTS {
                let (ledger, array_id, completions) =
                    (ledger.clone(), array_id.clone(), completions.clone());
                let first = worker * SLOTS + slot;
                tasks.push(tokio::spawn(async move {
                    for index in (first..size).step_by((WORKERS * SLOTS) as usize) {
                        let claimed = ledger
                            .children_settled(&array_id, size, vec![index], ChildState::Succeeded)
                            .await?;
                        if claimed.is_some() {
                            completions.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    anyhow::Ok(())
                }));
            }
        }
        for task in tasks {
            task.await??;
        }
        let calls = counter.calls() - before;
        println!(
            "{size} children, {WORKERS} ledgers × {SLOTS} settlers: {calls} S3 calls, {:.2} per child, {} completion(s), {:.1} s",
            calls as f64 / size as f64,
            completions.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
