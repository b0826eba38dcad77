//! A folder as a bucket. Each object is written to a temporary file beside
//! its final name, synced, then renamed over it, so no reader ever sees half
//! an object. Its content type goes in a sidecar under `.renderq-meta/`,
//! written the same way before the object itself.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::StorageError;
use crate::commands::{Body, Output};

/// Folder holding each object's metadata, mirroring the object keys.
pub const META_DIR: &str = ".renderq-meta";

#[derive(Debug, Clone)]
pub struct LocalBucket {
    name: String,
    root: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    content_type: String,
}

impl LocalBucket {
    pub fn new(name: &str, root: &Path) -> Self {
        Self {
            name: name.to_owned(),
            root: root.to_owned(),
        }
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
        let (root, key_owned, output) = (self.root.clone(), key.to_owned(), output.clone());
        let meta = serde_json::to_vec(&Meta {
            content_type: content_type.to_owned(),
        })
        .expect("metadata always serializes");
        tokio::task::spawn_blocking(move || {
            let path = root.join(&key_owned);
            write_atomically(
                &root.join(META_DIR).join(format!("{key_owned}.json")),
                |f| f.write_all(&meta),
            )?;
            write_atomically(&path, |f| match &output.body {
                Body::Bytes(bytes) => f.write_all(bytes),
                Body::File(source) => std::io::copy(&mut std::fs::File::open(source)?, f).map(drop),
            })?;
            Ok(format!("file://{}", path.display()))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r: std::io::Result<String>| r.map_err(|e| e.to_string()))
        .map_err(|message| StorageError::Write {
            bucket: self.name.clone(),
            message: format!("{key}: {message}"),
        })
    }
}

fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    fill(tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("a"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
