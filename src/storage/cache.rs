//! The worker's input cache: files kept between jobs, shared by every slot
//! and by every worker process that names the same folder.
//!
//! A cache is a small database: its index (SQLite, `index.sqlite3`) says
//! what is there, how large it is, the modification time it was left with,
//! and when it was last used. Beside it, `blobs/BUCKET/NAME` are the files,
//! named by content hash (or, for a plain object, by a digest of its key
//! and version), so a job only ever gets content its own bucket holds.
//!
//! One order of locks: a blob's lock file (`locks/`, `flock`), then the
//! index. Whoever holds a blob's lock may fetch it, check it, link it or
//! delete it; so however many slots or processes want one blob at once, it
//! is downloaded once, and nobody sees it half-written (downloads go to
//! `tmp/` and are renamed into place after their hash was checked).
//!
//! Files reach a job's folder as hard links (a copy across file systems).
//! A job could write through its link, so before each use the file's size
//! and modification time are compared with the index, and a changed file is
//! fetched again. A file linked into a running job has more than one link,
//! and is never evicted.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{Connection, OptionalExtension, params};

use crate::workspace::Workspace;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blobs (
    name      TEXT PRIMARY KEY,
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    last_used INTEGER NOT NULL
);
";

/// Why an input could not be placed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// No retry will help: a missing object, a hash that does not match.
    #[error("{0}")]
    Permanent(String),
    /// The network, the disk, or the cache itself; try again later.
    #[error("{0}")]
    Retryable(String),
}

fn retryable(context: &str) -> impl Fn(std::io::Error) -> CacheError + '_ {
    move |e| CacheError::Retryable(format!("{context}: {e}"))
}

/// One file the cache may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `BUCKET/NAME`: the bucket's config name, then a content hash or a
    /// digest of key and version.
    pub name: String,
    pub size: u64,
    /// The xxh128 its content must have (a manifest's files); `None` for a
    /// plain object, whose hash is computed but not known beforehand.
    pub hash: Option<String>,
    /// The modification time it is placed with (a manifest's).
    pub mtime: Option<SystemTime>,
}

/// Where a placed file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Download,
}

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    max_size: u64,
    index: Arc<Mutex<Connection>>,
    /// This process's folder for downloads in progress.
    tmp: Arc<Workspace>,
}

impl Cache {
    /// Opens (or makes) the cache in `root`, after removing downloads that
    /// processes which died left behind.
    pub fn open(root: &Path, max_size: u64) -> Result<Self, CacheError> {
        for dir in ["blobs", "locks", "tmp"] {
            std::fs::create_dir_all(root.join(dir)).map_err(retryable("cache folder"))?;
        }
        crate::workspace::sweep(&root.join("tmp"));
        let index = crate::sqlite::open(&root.join("index.sqlite3"), SCHEMA)
            .map_err(|e| CacheError::Retryable(format!("cache index: {e}")))?;
        Ok(Self {
            root: root.to_owned(),
            max_size,
            index: Arc::new(Mutex::new(index)),
            tmp: Arc::new(Workspace::new(&root.join("tmp"))),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes the index accounts for.
    pub fn size(&self) -> u64 {
        let index = self.index.lock().expect("cache index lock");
        index
            .query_row("SELECT COALESCE(SUM(size), 0) FROM blobs", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_or(0, |n| n.max(0) as u64)
    }

    /// Puts `blob` at `dest` (which must not exist yet): from the cache if
    /// it holds it unchanged, else through `fetch`, which writes it to the
    /// path it is given and returns its xxh128.
    pub async fn place<F, Fut>(
        &self,
        blob: &Blob,
        dest: &Path,
        fetch: F,
    ) -> Result<Source, CacheError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<String, CacheError>>,
    {
        let lock = self.lock(&blob.name).await?;
        let path = self.root.join("blobs").join(&blob.name);
        let cache = self.clone();
        let (found, blob_) = (path.clone(), blob.clone());
        let source = blocking(move || cache.lookup(&blob_, &found)).await?;
        if source == Source::Download {
            let cache = self.clone();
            let size = blob.size;
            blocking(move || cache.make_room(size)).await?;
            let tmp = self
                .tmp
                .dir()
                .map_err(retryable("cache download folder"))?
                .join(uuid::Uuid::new_v4().simple().to_string());
            // Removed however this ends (a failure, a hash that does not
            // match, a cancelled staging) unless it was moved into place.
            let partial = tempfile::TempPath::try_from_path(&tmp).map_err(retryable("cache"))?;
            let hash = fetch(tmp.clone()).await?;
            if let Some(expected) = &blob.hash
                && !expected.eq_ignore_ascii_case(&hash)
            {
                return Err(CacheError::Permanent(format!(
                    "{}: the content's xxh128 is {hash}, the manifest says {expected}",
                    blob.name
                )));
            }
            let cache = self.clone();
            let (blob_, path_) = (blob.clone(), path.clone());
            blocking(move || cache.admit(&blob_, &tmp, &path_)).await?;
            // Renamed into place: nothing left to remove.
            drop(partial);
        }
        let cache = self.clone();
        let (name, dest) = (blob.name.clone(), dest.to_owned());
        blocking(move || cache.link(&name, &path, &dest)).await?;
        drop(lock);
        Ok(source)
    }

    /// Takes the blob's lock, waiting for whoever holds it (another slot
    /// or process fetching it).
    async fn lock(&self, name: &str) -> Result<Flock<File>, CacheError> {
        let path = self.root.join("locks").join(name.replace('/', "%"));
        blocking(move || {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(retryable("cache lock"))?;
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| CacheError::Retryable(format!("cache lock: {e}")))
        })
        .await
    }

    /// Whether the blob is there, unchanged since it was admitted; a
    /// changed or unknown file is removed.
    fn lookup(&self, blob: &Blob, path: &Path) -> Result<Source, CacheError> {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(_) => return Ok(Source::Download),
        };
        let known: Option<(i64, i64)> = self
            .index
            .lock()
            .expect("cache index lock")
            .query_row(
                "SELECT size, mtime_ns FROM blobs WHERE name = ?1",
                [&blob.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| CacheError::Retryable(format!("cache index: {e}")))?;
        if known == Some((meta.len() as i64, mtime_ns(&meta))) && meta.len() == blob.size {
            return Ok(Source::Cache);
        }
        tracing::warn!(blob = %blob.name, "cached input changed or unknown; fetching it again");
        std::fs::remove_file(path).map_err(retryable("cache"))?;
        self.forget(&blob.name)?;
        Ok(Source::Download)
    }

    /// Deletes the least recently used files no running job uses until
    /// `needed` more bytes fit within `max_size`, and checks that the disk
    /// has room for them.
    fn make_room(&self, needed: u64) -> Result<(), CacheError> {
        let index_error = |e: rusqlite::Error| CacheError::Retryable(format!("cache index: {e}"));
        let candidates: Vec<(String, i64)> = {
            let index = self.index.lock().expect("cache index lock");
            let mut stmt = index
                .prepare("SELECT name, size FROM blobs ORDER BY last_used")
                .map_err(index_error)?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(index_error)?
                .collect::<Result<_, _>>()
                .map_err(index_error)?
        };
        let mut total: u64 = candidates.iter().map(|(_, size)| *size as u64).sum();
        for (name, size) in candidates {
            if total + needed <= self.max_size {
                break;
            }
            let path = self.root.join("blobs").join(&name);
            // Being fetched or placed elsewhere: kept.
            let lock = self.root.join("locks").join(name.replace('/', "%"));
            let Ok(file) = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock)
            else {
                continue;
            };
            let Ok(_held) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
                continue;
            };
            // Linked into a running job's folder (checked under the lock,
            // so no link is made meanwhile): kept.
            if std::fs::metadata(&path).is_ok_and(|m| m.nlink() > 1) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => continue,
            }
            self.forget(&name)?;
            total = total.saturating_sub(size as u64);
            tracing::info!(blob = %name, bytes = size, "evicted from the input cache");
        }
        let stat = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| CacheError::Retryable(format!("cache: {e}")))?;
        let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        if free < needed {
            return Err(CacheError::Retryable(format!(
                "needs {}, {} free under {}",
                gib(needed),
                gib(free),
                self.root.display()
            )));
        }
        Ok(())
    }

    /// Moves a checked download into place and records it.
    fn admit(&self, blob: &Blob, tmp: &Path, path: &Path) -> Result<(), CacheError> {
        let file = File::options()
            .write(true)
            .open(tmp)
            .map_err(retryable("cache"))?;
        if let Some(mtime) = blob.mtime {
            file.set_modified(mtime).map_err(retryable("cache"))?;
        }
        let mut permissions = file.metadata().map_err(retryable("cache"))?.permissions();
        permissions.set_readonly(true);
        file.set_permissions(permissions)
            .map_err(retryable("cache"))?;
        drop(file);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(retryable("cache"))?;
        }
        std::fs::rename(tmp, path).map_err(retryable("cache"))?;
        let meta = std::fs::metadata(path).map_err(retryable("cache"))?;
        self.index
            .lock()
            .expect("cache index lock")
            .execute(
                "INSERT OR REPLACE INTO blobs (name, size, mtime_ns, last_used) VALUES (?1, ?2, ?3, ?4)",
                params![blob.name, meta.len() as i64, mtime_ns(&meta), crate::sqlite::now_s()],
            )
            .map_err(|e| CacheError::Retryable(format!("cache index: {e}")))?;
        Ok(())
    }

    /// Links (or copies) the blob to `dest` and marks it used.
    fn link(&self, name: &str, path: &Path, dest: &Path) -> Result<(), CacheError> {
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(retryable("job folder"))?;
        }
        match std::fs::hard_link(path, dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CacheError::Permanent(format!(
                    "{} is placed twice (inputs overlap)",
                    dest.display()
                )));
            }
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EXDEV as i32) => {
                // Another file system: a fresh copy, which nothing can
                // write back.
                let mut from = File::open(path).map_err(retryable("cache"))?;
                let mut to = File::options()
                    .write(true)
                    .create_new(true)
                    .open(dest)
                    .map_err(retryable("job folder"))?;
                std::io::copy(&mut from, &mut to).map_err(retryable("job folder"))?;
                if let Ok(modified) = from.metadata().and_then(|m| m.modified()) {
                    let _ = to.set_modified(modified);
                }
            }
            Err(e) => return Err(retryable("job folder")(e)),
        }
        self.index
            .lock()
            .expect("cache index lock")
            .execute(
                "UPDATE blobs SET last_used = ?2 WHERE name = ?1",
                params![name, crate::sqlite::now_s()],
            )
            .map_err(|e| CacheError::Retryable(format!("cache index: {e}")))?;
        Ok(())
    }

    fn forget(&self, name: &str) -> Result<(), CacheError> {
        self.index
            .lock()
            .expect("cache index lock")
            .execute("DELETE FROM blobs WHERE name = ?1", [name])
            .map(drop)
            .map_err(|e| CacheError::Retryable(format!("cache index: {e}")))
    }
}

/// Runs file and index work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::Retryable(format!("cache: {e}")))?
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// `12.3 GiB`.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The xxh128 of a file, as 32 hex digits (as Deadline Cloud writes it).
pub fn xxh128_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buffer = vec![0; 1024 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(format!("{:032x}", hasher.digest128()))
}

/// A manifest's mtime (microseconds since the epoch) as a time.
pub fn from_micros(micros: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(name: &str, size: u64) -> Blob {
        Blob {
            name: format!("b/{name}"),
            size,
            hash: None,
            mtime: None,
        }
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
        let cache = Cache::open(&dir.path().join("c"), 1 << 30).unwrap();
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
    async fn a_file_written_through_its_link_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c"), 1 << 30).unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let first = dir.path().join("job1/a");
        cache
            .place(&blob("a", 4), &first, writer(1, 4, &calls))
            .await
            .unwrap();
        // The job writes through its hard link (root ignores read-only).
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(&first, b"evil").unwrap();
        let second = dir.path().join("job2/a");
        let source = cache
            .place(&blob("a", 4), &second, writer(1, 4, &calls))
            .await
            .unwrap();
        assert_eq!(source, Source::Download);
        assert_eq!(std::fs::read(&second).unwrap(), vec![1; 4]);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_wrong_hash_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c"), 1 << 30).unwrap();
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
    async fn eviction_takes_the_oldest_idle_file_never_one_in_use() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two of the three 10-byte files.
        let cache = Cache::open(&dir.path().join("c"), 25).unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // `a` is linked into a running job's folder; `b` was used after it,
        // but its job has ended.
        let running = dir.path().join("running/a");
        cache
            .place(&blob("a", 10), &running, writer(1, 10, &calls))
            .await
            .unwrap();
        let ended = dir.path().join("ended/b");
        cache
            .place(&blob("b", 10), &ended, writer(2, 10, &calls))
            .await
            .unwrap();
        std::fs::remove_file(&ended).unwrap();
        let Cache { index, .. } = &cache;
        index
            .lock()
            .unwrap()
            .execute_batch("UPDATE blobs SET last_used = 1 WHERE name = 'b/a'; UPDATE blobs SET last_used = 2 WHERE name = 'b/b';")
            .unwrap();
        cache
            .place(
                &blob("c", 10),
                &dir.path().join("new/c"),
                writer(3, 10, &calls),
            )
            .await
            .unwrap();
        assert!(dir.path().join("c/blobs/b/a").exists(), "in use: kept");
        assert!(
            !dir.path().join("c/blobs/b/b").exists(),
            "idle and older: evicted"
        );
        assert_eq!(cache.size(), 20);
    }
}
