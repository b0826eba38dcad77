//! What the cache calls a file: its name under `blobs/` (the layout, a
//! digest of its bucket's identity, then what it is in that bucket), and
//! what a job claims of it.

use std::time::SystemTime;

use sha2::Digest;

use super::index::LAYOUT;

/// One file the cache may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// Its name under `blobs/`: the layout, its bucket's domain, then what
    /// it is (see [`Blob::object`], [`Blob::manifest_file`]).
    pub name: String,
    /// The bytes it is said to have (by a `HEAD`, or by a manifest).
    pub size: u64,
    /// The xxh128 its content must have (a manifest's files); `None` for a
    /// plain object, whose hash is computed but not known beforehand.
    pub hash: Option<String>,
    /// The modification time its placed file gets (a manifest's); `None`:
    /// the time it was admitted.
    pub mtime: Option<SystemTime>,
}

/// The folder of a bucket's blobs: a digest of what the bucket is.
fn domain(identity: &str) -> String {
    hex::encode(&sha2::Sha256::digest(identity.as_bytes())[..10])
}

impl Blob {
    /// A plain object of the bucket `identity` (see
    /// [`crate::storage::Bucket::identity`]), by key and version.
    pub fn object(identity: &str, key: &str, version: &str, size: u64) -> Self {
        let digest = sha2::Sha256::digest(format!("{key}\n{version}"));
        Self {
            name: format!(
                "{LAYOUT}{}/o-{}",
                domain(identity),
                &hex::encode(digest)[..40]
            ),
            size,
            hash: None,
            mtime: None,
        }
    }

    /// A manifest's file, stored at `{data_prefix}{hash}.xxh128` in the
    /// bucket `identity`: the same content under another prefix is another
    /// blob, so a hit is never served for a key the job could not fetch.
    pub fn manifest_file(
        identity: &str,
        data_prefix: &str,
        hash: &str,
        size: u64,
        mtime: SystemTime,
    ) -> Self {
        let prefix = sha2::Sha256::digest(data_prefix.as_bytes());
        Self {
            name: format!(
                "{LAYOUT}{}/d-{}/{}",
                domain(identity),
                &hex::encode(prefix)[..16],
                hash.to_ascii_lowercase()
            ),
            size,
            hash: Some(hash.to_ascii_lowercase()),
            mtime: Some(mtime),
        }
    }
}
