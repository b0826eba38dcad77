//! The cache against its own promises: one download, hits, sizes that lie,
//! a hash that does not match, eviction order.

use super::*;

fn blob(name: &str, size: u64) -> Blob {
    Blob {
        name: format!("b/{name}"),
        size,
        hash: None,
        mtime: None,
    }
}

/// A cache of `max_size` bytes in `dir/c`, for jobs in `dir/jobs`.
fn open_cache(dir: &tempfile::TempDir, max_size: u64) -> Cache {
    Cache::open(
        &dir.path().join("c"),
        max_size,
        &dir.path().join("jobs"),
        &JobUser::Worker,
    )
    .unwrap()
}

/// A fetch that writes `n` bytes of `fill` and counts its calls.
fn writer(
    fill: u8,
    n: usize,
    calls: &Arc<std::sync::atomic::AtomicUsize>,
) -> impl FnOnce(
    PathBuf,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<String, CacheError>> + Send>,
> {
    let calls = calls.clone();
    move |path| {
        Box::pin(async move {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::fs::write(&path, vec![fill; n]).unwrap();
            Ok(xxh128_file(&path).unwrap())
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_download_however_many_ask_at_once_then_hits() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(&dir, 1 << 30);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let jobs: Vec<_> = (0..4)
        .map(|i| dir.path().join(format!("job{i}/a")))
        .collect();
    let placed = futures_join(jobs.iter().map(|dest| {
        let (cache, calls) = (cache.clone(), calls.clone());
        let dest = dest.clone();
        async move {
            cache
                .place(&blob("a", 10), &dest, writer(7, 10, &calls))
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(placed.iter().filter(|s| **s == Source::Download).count(), 1);
    for dest in &jobs {
        assert_eq!(std::fs::read(dest).unwrap(), vec![7; 10]);
    }
    assert_eq!(cache.size(), 10);
}

async fn futures_join<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_job_that_rewrites_its_file_does_not_reach_the_cache() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(&dir, 1 << 30);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let first = dir.path().join("job1/a");
    cache
        .place(&blob("a", 4), &first, writer(1, 4, &calls))
        .await
        .unwrap();
    // The job makes its file writable, writes as many bytes and puts
    // the time and mode back.
    let meta = std::fs::metadata(&first).unwrap();
    std::fs::set_permissions(&first, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&first, b"evil").unwrap();
    std::fs::set_permissions(&first, meta.permissions()).unwrap();
    File::options()
        .write(true)
        .open(&first)
        .or_else(|_| File::open(&first))
        .unwrap()
        .set_modified(meta.modified().unwrap())
        .ok();
    let second = dir.path().join("job2/a");
    let source = cache
        .place(&blob("a", 4), &second, writer(1, 4, &calls))
        .await
        .unwrap();
    assert_eq!(source, Source::Cache, "the blob itself was never written");
    assert_eq!(std::fs::read(&second).unwrap(), vec![1; 4]);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn sizes_that_lie_fail_their_job_and_keep_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(&dir, 100);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    cache
        .place(
            &blob("a", 10),
            &dir.path().join("job1/a"),
            writer(1, 10, &calls),
        )
        .await
        .unwrap();
    for (claimed, why) in [
        (1u64 << 63, "more than the input cache may hold"),
        (u64::MAX, "more than the input cache may hold"),
        (11, "11 bytes are claimed, but the content is 10 bytes"),
    ] {
        let err = cache
            .place(
                &blob("a", claimed),
                &dir.path().join("job2/a"),
                writer(1, 10, &calls),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CacheError::Permanent(m) if m.contains(why)),
            "{claimed}: {err}"
        );
    }
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "nothing fetched"
    );
    assert_eq!(cache.size(), 10, "nothing evicted");
    let source = cache
        .place(
            &blob("a", 10),
            &dir.path().join("job3/a"),
            writer(1, 10, &calls),
        )
        .await
        .unwrap();
    assert_eq!(source, Source::Cache);
    assert_eq!(
        std::fs::read(dir.path().join("job3/a")).unwrap(),
        vec![1; 10]
    );
}

#[tokio::test]
async fn a_wrong_hash_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(&dir, 1 << 30);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let wrong = Blob {
        hash: Some("0".repeat(32)),
        ..blob("h", 4)
    };
    let dest = dir.path().join("job/h");
    let err = cache
        .place(&wrong, &dest, writer(1, 4, &calls))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CacheError::Permanent(m) if m.contains("the manifest says")),
        "{err}"
    );
    assert!(!dest.exists());
    assert_eq!(cache.size(), 0);
    let leftovers = walk(&dir.path().join("c/tmp")) + walk(&dir.path().join("c/blobs"));
    assert_eq!(leftovers, 0, "nothing partial in the cache");
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn eviction_takes_the_oldest_file_never_one_being_placed() {
    let dir = tempfile::tempdir().unwrap();
    // Room for two of the three 10-byte files.
    let cache = open_cache(&dir, 25);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (name, fill) in [("a", 1), ("b", 2)] {
        cache
            .place(
                &blob(name, 10),
                &dir.path().join(format!("job/{name}")),
                writer(fill, 10, &calls),
            )
            .await
            .unwrap();
    }
    // `a` is the oldest, but another slot holds its lock (placing it).
    cache.index.set_last_used("b/a", 1);
    cache.index.set_last_used("b/b", 2);
    let held = cache.lock("b/a").await.unwrap();
    cache
        .place(
            &blob("c", 10),
            &dir.path().join("new/c"),
            writer(3, 10, &calls),
        )
        .await
        .unwrap();
    drop(held);
    assert!(dir.path().join("c/blobs/b/a").exists(), "held: kept");
    assert!(
        !dir.path().join("c/blobs/b/b").exists(),
        "idle and older: evicted"
    );
    assert_eq!(cache.size(), 20);
    assert_eq!(
        std::fs::read(dir.path().join("job/b")).unwrap(),
        vec![2; 10],
        "a placed file outlives its blob"
    );
}

#[tokio::test]
async fn blobs_of_the_first_layout_are_never_served_and_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let (root, jobs) = (dir.path().join("c"), dir.path().join("jobs"));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        // As a worker of the first layout kept it: under the bucket's name.
        let old = Cache::open(&root, 25, &jobs, &JobUser::Worker).unwrap();
        old.place(
            &blob("a", 10),
            &dir.path().join("old/a"),
            writer(1, 10, &calls),
        )
        .await
        .unwrap();
    }
    let cache = Cache::open(&root, 25, &jobs, &JobUser::Worker).unwrap();
    let identity = "s3 endpoint=aws region=us-east-1 bucket=b";
    for (key, fill) in [("a", 2), ("c", 3)] {
        let source = cache
            .place(
                &Blob::object(identity, key, "etag", 10),
                &dir.path().join(format!("new/{key}")),
                writer(fill, 10, &calls),
            )
            .await
            .unwrap();
        assert_eq!(source, Source::Download, "{key}");
    }
    assert_eq!(
        std::fs::read(dir.path().join("new/a")).unwrap(),
        vec![2; 10]
    );
    assert!(
        !root.join("blobs/b/a").exists(),
        "the first layout's blob was evicted first"
    );
    assert_eq!(cache.size(), 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn making_room_walks_the_index_a_batch_at_a_time_past_held_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(&dir, 100);
    let name = |i: usize| format!("v2/x/{i:02}");
    let row = |size| index::Row { size, mtime_ns: 0 };
    // The total is kept as rows come, change size and go.
    cache.index.record(&name(0), row(5)).unwrap();
    cache.index.record(&name(0), row(1)).unwrap();
    cache.index.record("v2/x/gone", row(7)).unwrap();
    cache.index.forget("v2/x/gone").unwrap();
    assert_eq!(cache.size(), 1);
    for i in 1..80 {
        cache.index.record(&name(i), row(1)).unwrap();
    }
    for i in 0..80 {
        cache.index.set_last_used(&name(i), i as i64);
    }
    assert_eq!(cache.size(), 80);
    // The whole first batch is held by other slots: room comes from the
    // next one, oldest first, and no more than is needed.
    let mut held = Vec::new();
    for i in 0..64 {
        held.push(cache.lock(&name(i)).await.unwrap());
    }
    let room = cache.clone();
    tokio::task::spawn_blocking(move || room.make_room(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cache.size(), 70);
    let kept = |i| cache.index.row(&name(i)).unwrap().is_some();
    assert!((0..64).all(kept), "held blobs stay");
    assert!((64..74).all(|i| !kept(i)), "the ten oldest free ones go");
    assert!((74..80).all(kept), "no more than needed goes");
    drop(held);
}

fn lock_files(dir: &tempfile::TempDir) -> usize {
    std::fs::read_dir(dir.path().join("c/locks"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn lock_files_go_with_failed_downloads_and_evicted_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(&dir, 25);
    for i in 0..20 {
        let failed = cache
            .place(
                &blob(&format!("missing{i}"), 10),
                &dir.path().join(format!("jobs/f{i}")),
                |_| async { Err(CacheError::Permanent("no such object".into())) },
            )
            .await;
        assert!(failed.is_err());
    }
    assert_eq!(lock_files(&dir), 0, "a failed download leaves no lock file");
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for name in ["a", "b", "c", "d"] {
        cache
            .place(
                &blob(name, 10),
                &dir.path().join(format!("jobs/{name}")),
                writer(1, 10, &calls),
            )
            .await
            .unwrap();
    }
    // 25 bytes hold two blobs of 10: two were evicted, and their locks too.
    let blobs = std::fs::read_dir(dir.path().join("c/blobs/b"))
        .unwrap()
        .count();
    assert_eq!(blobs, 2);
    assert_eq!(lock_files(&dir), blobs);
}

#[test]
fn a_waiter_on_a_removed_lock_takes_the_new_one_not_the_unlinked_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lock");
    let first = BlobLock::take(&path, true).unwrap().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = {
        let path = path.clone();
        std::thread::spawn(move || {
            let lock = BlobLock::take(&path, true).unwrap().unwrap();
            tx.send(()).unwrap();
            // Hold it a moment: nobody else may hold this blob meanwhile.
            std::thread::sleep(Duration::from_millis(200));
            drop(lock);
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    first.remove();
    rx.recv().unwrap();
    assert!(path.exists(), "the waiter made the lock file anew");
    assert!(
        BlobLock::take(&path, false).unwrap().is_none(),
        "the waiter holds the file the path names"
    );
    waiter.join().unwrap();
    assert!(BlobLock::take(&path, false).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_admitted_without_its_index_row_is_counted_when_the_cache_opens() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_cache(&dir, 1 << 20);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    cache
        .place(
            &blob("a", 10),
            &dir.path().join("jobs/a"),
            writer(3, 10, &calls),
        )
        .await
        .unwrap();
    // Killed between the rename and the insert: the file is there, its row
    // is not. A stale lock file of a blob long gone lies beside it.
    cache.index.forget("b/a").unwrap();
    std::fs::write(dir.path().join("c/locks/b%gone"), b"").unwrap();
    drop(cache);
    let cache = open_cache(&dir, 1 << 20);
    assert_eq!(cache.size(), 10, "the unindexed blob is counted");
    assert!(!dir.path().join("c/locks/b%gone").exists());
    // Counted as the least recently used: the first to go.
    assert_eq!(cache.index.least_used(None, 1).unwrap()[0].last_used, 0);
    // And it is whole, so it serves the next job without a download.
    let source = cache
        .place(
            &blob("a", 10),
            &dir.path().join("jobs/a2"),
            writer(3, 10, &calls),
        )
        .await
        .unwrap();
    assert_eq!(source, Source::Cache);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}
