//! The worker's input cache: files kept between jobs, shared by every slot
//! and by every worker process that names the same folder.
//!
//! A cache is a small database: its [`index`] (SQLite, `index.sqlite3`)
//! says what is there, how large it is, the modification time it was
//! admitted with, and when it was last used. Beside it, `blobs/v2/DOMAIN/…`
//! are the files. DOMAIN is a digest of the bucket's identity (endpoint,
//! region and bucket name; a local bucket's folder), never of its name in
//! `workers.toml`, so a blob is shared only by jobs that read the same
//! bucket. Within it, a manifest's file is named by its data prefix and
//! content hash, a plain object by a digest of its key and version, so a
//! hit is always what the job's own key would have fetched.
//!
//! One order of locks: a blob's lock file (`locks/`, `flock`), then the
//! index. Whoever holds a blob's lock may fetch it, check it, place it or
//! delete it; so however many slots or processes want one blob at once, it
//! is downloaded once, and nobody sees it half-written (downloads go to
//! `tmp/` and are renamed into place after their hash was checked). A lock
//! file goes with its blob ([`lock`]), and a blob a killed process renamed
//! into place without recording it is counted when the cache next opens
//! ([`recover`]).
//!
//! A job never gets a blob it could write ([`placement`]): running as its
//! own user it gets a hard link to a blob the worker owns, read-only;
//! running as the worker's user, a clone or a copy. Either way nothing it
//! does to its files reaches the cache, and the cache's folder is the
//! worker's alone (0700). Before each
//! use a blob's size and modification time are still compared with the
//! index (a blob changed behind the cache's back is fetched again), and a
//! size that differs from the one a job claims fails that job only.
//! [`eviction`] deletes the least recently used blobs past `max_size`.

mod blob;
mod eviction;
mod index;
mod lock;
pub mod placement;
mod recover;

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use self::blob::Blob;
use self::index::{Index, Row};
use self::lock::BlobLock;
use self::placement::Placement;
use crate::access::{self, JobUser};
use crate::workspace::Workspace;

/// Why an input could not be placed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// No retry will help: a missing object, a hash or size that does not
    /// match.
    #[error("{0}")]
    Permanent(String),
    /// The network, the disk, or the cache itself; try again later.
    #[error("{0}")]
    Retryable(String),
}

fn retryable(context: &str) -> impl Fn(std::io::Error) -> CacheError + '_ {
    move |e| CacheError::Retryable(format!("{context}: {e}"))
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
    index: Index,
    /// How blobs reach job folders, decided when the cache was opened.
    placement: Placement,
    /// This process's folder for downloads in progress.
    tmp: Arc<Workspace>,
}

impl Cache {
    /// Opens (or makes) the cache in `root`, after removing downloads that
    /// processes which died left behind, and decides how blobs are placed
    /// in job folders made under `jobs`.
    pub fn open(
        root: &Path,
        max_size: u64,
        jobs: &Path,
        job_user: &JobUser,
    ) -> Result<Self, CacheError> {
        for dir in ["blobs", "locks", "tmp"] {
            std::fs::create_dir_all(root.join(dir)).map_err(retryable("cache folder"))?;
        }
        // The worker's alone: a job reaches its inputs through links in
        // its own folder, never through this one.
        access::seal(root).map_err(retryable("cache folder"))?;
        crate::workspace::sweep(&root.join("tmp"));
        let index = Index::open(&root.join("index.sqlite3"))?;
        recover::recover(root, &index)?;
        let tmp = Workspace::new(&root.join("tmp"));
        let placement = Placement::probe(
            tmp.dir().map_err(retryable("cache download folder"))?,
            jobs,
            job_user,
        );
        tracing::info!(
            cache = %root.display(),
            jobs = %jobs.display(),
            placement = placement.as_str(),
            "input cache: inputs reach job folders as {}",
            match placement {
                Placement::Link { .. } => "read-only hard links to the cache's own files (jobs run as another user)",
                Placement::Reflink => "reflink copies (copy-on-write clones)",
                Placement::Copy => "plain copies (the file system cannot clone between these folders)",
            }
        );
        Ok(Self {
            root: root.to_owned(),
            max_size,
            index,
            placement,
            tmp: Arc::new(tmp),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Bytes the index accounts for.
    pub fn size(&self) -> u64 {
        self.index.size().unwrap_or(0)
    }

    /// Refuses, for good, a size that could never fit in the cache (before
    /// anything is evicted for it).
    pub fn admissible(&self, size: u64) -> Result<(), CacheError> {
        if size > self.max_size {
            return Err(CacheError::Permanent(format!(
                "{size} bytes; more than the input cache may hold (worker.cache.max_size = {})",
                self.max_size
            )));
        }
        Ok(())
    }

    fn blob_path(&self, name: &str) -> PathBuf {
        self.root.join("blobs").join(name)
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(name.replace('/', "%"))
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
        self.admissible(blob.size)?;
        let lock = self.lock(&blob.name).await?;
        let path = self.blob_path(&blob.name);
        let placed = self.place_locked(blob, &path, dest, fetch).await;
        // The lock file goes with the blob: none is left for a download
        // that failed.
        blocking(move || {
            if std::fs::symlink_metadata(&path).is_err() {
                lock.remove();
            }
            Ok(())
        })
        .await?;
        placed
    }

    /// [`Cache::place`] once the blob's lock is held.
    async fn place_locked<F, Fut>(
        &self,
        blob: &Blob,
        path: &Path,
        dest: &Path,
        fetch: F,
    ) -> Result<Source, CacheError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<String, CacheError>>,
    {
        let cache = self.clone();
        let (found, blob_) = (path.to_owned(), blob.clone());
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
                    "the content's xxh128 is {hash}, the manifest says {expected}"
                )));
            }
            let got = std::fs::metadata(&tmp).map_err(retryable("cache"))?.len();
            if got != blob.size {
                return Err(CacheError::Permanent(format!(
                    "the object is {got} bytes, not the {} bytes claimed",
                    blob.size
                )));
            }
            let cache = self.clone();
            let (name, path_, mtime) = (blob.name.clone(), path.to_owned(), blob.mtime);
            blocking(move || cache.admit(&name, &tmp, &path_, mtime)).await?;
            // Renamed into place: nothing left to remove.
            drop(partial);
        }
        let cache = self.clone();
        let (blob_, path, dest) = (blob.clone(), path.to_owned(), dest.to_owned());
        blocking(move || cache.put(&blob_, &path, &dest)).await?;
        Ok(source)
    }

    /// Takes the blob's lock, waiting for whoever holds it (another slot
    /// or process fetching it).
    async fn lock(&self, name: &str) -> Result<BlobLock, CacheError> {
        let path = self.lock_path(name);
        blocking(move || Ok(BlobLock::take(&path, true)?.expect("a waiting lock is taken"))).await
    }

    /// Whether the blob is there, unchanged since it was admitted. A
    /// changed or unknown file is removed; a blob whose size differs from
    /// the one claimed stays for the jobs that ask for it right, and this
    /// job fails.
    fn lookup(&self, blob: &Blob, path: &Path) -> Result<Source, CacheError> {
        let Ok(meta) = std::fs::metadata(path) else {
            self.index.forget(&blob.name)?;
            return Ok(Source::Download);
        };
        let on_disk = Row {
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
        };
        if self.index.row(&blob.name)? == Some(on_disk) {
            if on_disk.size != blob.size {
                return Err(CacheError::Permanent(format!(
                    "{} bytes are claimed, but the content is {} bytes (the cached copy stays)",
                    blob.size, on_disk.size
                )));
            }
            return Ok(Source::Cache);
        }
        tracing::warn!(blob = %blob.name, "cached input changed or unknown; fetching it again");
        std::fs::remove_file(path).map_err(retryable("cache"))?;
        self.index.forget(&blob.name)?;
        Ok(Source::Download)
    }

    /// Moves a checked download into place (synced, then renamed, then the
    /// folder synced), read-only, modified at `mtime`
    /// (a manifest's: the time its first job's file gets, so that a linked
    /// file shows it), and records it.
    fn admit(
        &self,
        name: &str,
        tmp: &Path,
        path: &Path,
        mtime: Option<SystemTime>,
    ) -> Result<(), CacheError> {
        let file = File::options()
            .write(true)
            .open(tmp)
            .map_err(retryable("cache"))?;
        if let Some(mtime) = mtime {
            file.set_modified(mtime).map_err(retryable("cache"))?;
        }
        file.set_permissions(std::fs::Permissions::from_mode(access::INPUT_FILE))
            .map_err(retryable("cache"))?;
        // On disk before it is visible: after a power loss a blob is whole
        // or absent, never a file of the right size full of zeros.
        file.sync_all().map_err(retryable("cache"))?;
        drop(file);
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(retryable("cache"))?;
        std::fs::rename(tmp, path).map_err(retryable("cache"))?;
        // The rename itself, before the index says the blob is there.
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(retryable("cache"))?;
        let meta = std::fs::metadata(path).map_err(retryable("cache"))?;
        self.index.record(
            name,
            Row {
                size: meta.len(),
                mtime_ns: mtime_ns(&meta),
            },
        )
    }

    /// Places the blob at `dest` as this cache places files, and marks it
    /// used.
    fn put(&self, blob: &Blob, path: &Path, dest: &Path) -> Result<(), CacheError> {
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(retryable("job folder"))?;
        }
        let mtime = match blob.mtime {
            Some(mtime) => mtime,
            None => std::fs::metadata(path)
                .and_then(|m| m.modified())
                .map_err(retryable("cache"))?,
        };
        match self.placement.place(path, dest, mtime) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CacheError::Permanent(format!(
                    "{} is placed twice (inputs overlap)",
                    dest.display()
                )));
            }
            Err(e) => return Err(retryable("job folder")(e)),
        }
        self.index.touch(&blob.name)
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
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
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

/// A manifest's mtime (microseconds since the epoch, negative before 1970)
/// as a time, as Deadline Cloud's own download sets it.
pub fn from_micros(micros: i64) -> SystemTime {
    let since = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        SystemTime::UNIX_EPOCH + since
    } else {
        SystemTime::UNIX_EPOCH - since
    }
}

#[cfg(test)]
mod tests;
