//! A folder as a bucket. Each object is written to a temporary file, synced,
//! then renamed over its final name, so no reader ever sees half an object.
//! Its content type goes in a sidecar under `.renderq-meta/`, written the
//! same way before the object itself; a sidecar whose object never came (a
//! writer killed between the two) is removed when the bucket is next
//! opened, once it is older than any write under way could be.
//!
//! Temporary files live outside the key space, under `.renderq-tmp/` in a
//! folder per process (see [`crate::workspace`]), so a process killed
//! mid-write leaves nothing among the objects, and what it left there is
//! removed by its reaper or when the bucket is next opened.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::StorageError;
use crate::job::{Body, Output};
use crate::workspace::Workspace;

/// Folder holding each object's metadata, mirroring the object keys.
pub const META_DIR: &str = ".renderq-meta";
/// Folder holding writes in progress.
pub const TMP_DIR: &str = ".renderq-tmp";

#[derive(Debug, Clone)]
pub struct LocalBucket {
    name: String,
    root: PathBuf,
    /// This process's folder for writes in progress.
    tmp: Arc<Workspace>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    content_type: String,
}

impl LocalBucket {
    /// A handle on the folder, for reading and writing.
    pub fn new(name: &str, root: &Path) -> Self {
        Self {
            name: name.to_owned(),
            root: root.to_owned(),
            tmp: Arc::new(Workspace::new(&root.join(TMP_DIR))),
        }
    }

    /// A handle for a process that writes, after removing what writers that
    /// died left half-written.
    pub fn open(name: &str, root: &Path) -> Self {
        crate::workspace::sweep(&root.join(TMP_DIR));
        let removed = sweep_sidecars(root, &root.join(META_DIR), SIDECAR_STALE);
        if removed > 0 {
            tracing::info!(
                bucket = name,
                removed,
                "Removed metadata left without its object."
            );
        }
        Self::new(name, root)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where an object's file is.
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The content type stored with an object, if the object exists.
    pub fn content_type(&self, key: &str) -> Option<String> {
        let meta = std::fs::read(self.root.join(META_DIR).join(format!("{key}.json"))).ok()?;
        serde_json::from_slice::<Meta>(&meta)
            .ok()
            .map(|m| m.content_type)
    }

    pub async fn put(
        &self,
        key: &str,
        output: &Output,
        content_type: &str,
    ) -> Result<String, StorageError> {
        let (root, key_owned, output, tmp) = (
            self.root.clone(),
            key.to_owned(),
            output.clone(),
            self.tmp.clone(),
        );
        let meta = serde_json::to_vec(&Meta {
            content_type: content_type.to_owned(),
        })
        .expect("metadata always serializes");
        tokio::task::spawn_blocking(move || {
            let path = root.join(&key_owned);
            let tmp = tmp.dir()?;
            write_atomically(
                tmp,
                &root.join(META_DIR).join(format!("{key_owned}.json")),
                |f| f.write_all(&meta),
            )?;
            write_atomically(tmp, &path, |f| match &output.body {
                Body::Bytes(bytes) => f.write_all(bytes),
                Body::File(source) => std::io::copy(&mut std::fs::File::open(source)?, f).map(drop),
            })?;
            Ok(format!("file://{}", path.display()))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r: std::io::Result<String>| r.map_err(|e| e.to_string()))
        .map_err(|message| StorageError {
            bucket: self.name.clone(),
            message: format!("{key}: {message}"),
            permanent: false,
        })
    }
}

/// A sidecar without its object younger than this may be a write under
/// way in another process; older, its writer died.
const SIDECAR_STALE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the sidecars under `dir` (mirroring the keys under `root`) whose
/// object does not exist and that were last written over `stale` ago.
/// Returns how many.
fn sweep_sidecars(root: &Path, dir: &Path, stale: std::time::Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let Ok(relative) = path.strip_prefix(root.join(META_DIR)) else {
            continue;
        };
        if kind.is_dir() {
            removed += sweep_sidecars(root, &path, stale);
            continue;
        }
        let Some(key) = relative.to_str().and_then(|k| k.strip_suffix(".json")) else {
            continue;
        };
        let old = (entry.metadata().and_then(|m| m.modified()))
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age > stale));
        if old && !root.join(key).exists() && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Fills a temporary file in `tmp`, syncs it and renames it to `path`.
fn write_atomically(
    tmp: &Path,
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    // Readable like any file this process makes (0644 with the usual
    // umask), not the owner-only mode of a temporary file: a web server or
    // another user may serve the results folder.
    let mut tmp = tempfile::Builder::new()
        .prefix("put-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(tmp)?;
    fill(tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_sidecar_without_its_object_is_swept_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join(META_DIR).join("shots");
        std::fs::create_dir_all(&meta).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let sidecar = |name: &str, modified| {
            let path = meta.join(format!("{name}.json"));
            std::fs::write(&path, r#"{"content_type":"image/png"}"#).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(modified)
                .unwrap();
            path
        };
        // Killed between the writes an hour ago; a write under way now; a
        // whole object.
        let orphan = sidecar("lost.png", old);
        let young = sidecar("writing.png", std::time::SystemTime::now());
        let whole = sidecar("kept.png", old);
        std::fs::create_dir_all(dir.path().join("shots")).unwrap();
        std::fs::write(dir.path().join("shots/kept.png"), b"png").unwrap();
        LocalBucket::open("results", dir.path());
        assert!(!orphan.exists());
        assert!(young.exists() && whole.exists());
        let bucket = LocalBucket::new("results", dir.path());
        assert_eq!(
            bucket.content_type("shots/kept.png").as_deref(),
            Some("image/png")
        );
    }

    #[tokio::test]
    async fn put_writes_object_and_content_type() {
        let dir = tempfile::tempdir().unwrap();
        let bucket = LocalBucket::new("results", dir.path());
        let output = Output::bytes(b"{}".to_vec(), mime::APPLICATION_JSON);
        let url = bucket
            .put("a/b.json", &output, "application/json")
            .await
            .unwrap();
        assert!(url.ends_with("a/b.json"));
        assert_eq!(std::fs::read(dir.path().join("a/b.json")).unwrap(), b"{}");
        assert_eq!(
            bucket.content_type("a/b.json").as_deref(),
            Some("application/json")
        );
        let names = |path: PathBuf| -> Vec<String> {
            std::fs::read_dir(path)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(dir.path().join("a")), ["b.json"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("a/b.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o644, 0o644, "readable by all: {mode:o}");
        let tmp = bucket.tmp.dir().unwrap().to_owned();
        assert!(names(tmp).is_empty(), "no temporary file is left");
    }

    #[test]
    fn opening_removes_writes_left_by_dead_processes() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join(TMP_DIR).join("renderq-1-1");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join("put-abc"), b"half").unwrap();
        LocalBucket::open("results", dir.path());
        assert!(!dead.exists());
    }
}
