//! A job's inputs (SPEC §6a): objects placed in its working folder before
//! the command runs, one object by key or many through an AWS Deadline
//! Cloud job-attachments manifest ([`super::manifest`]). Here: what a job
//! may ask for. Pure.

use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use crate::job::params::FieldError;

/// One entry of a job's `inputs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// A `[buckets.NAME]`.
    pub bucket: String,
    /// One object, placed at `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A manifest whose files are placed under the folder `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// Where a manifest's files are stored by hash (`PREFIX<hash>.xxh128`;
    /// a `/` is added to a prefix without one). By default found from
    /// Deadline Cloud's layout: a manifest at `ROOT/Manifests/…` has its
    /// files under `ROOT/Data/`; any other manifest, under `Data/` one
    /// folder above its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_prefix: Option<String>,
    /// Relative to the job's working folder.
    pub path: String,
    /// The object (or manifest) as the submit half found it; workers fetch
    /// exactly this. Recorded at submit, whatever the request said; absent
    /// in a message inserted straight into the queue (a worker then reads
    /// whatever is there when it stages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<Pin>,
}

/// What an input's object was at submit (SPEC §6b). Every child of an
/// array carries the same pin, so all of them render the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// Its size then.
    pub size: u64,
    /// What changes when the object does, and what the cache keys it by:
    /// its version id, else its ETag; a folder's object, its size and
    /// modification time in nanoseconds (`SIZE-NANOS`), which costs one
    /// `stat` where a content hash would cost reading the whole file.
    pub version: String,
    /// Its ETag (S3): every GET sends `If-Match` with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Its version id, on a versioned bucket: every GET names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

impl Pin {
    /// The reason a job fails when its input is no longer what it pinned.
    pub fn changed(bucket: &str, key: &str) -> String {
        format!(
            "bucket `{bucket}` `{key}`: changed since submit; resubmit to render the new version"
        )
    }
}

/// What an input brings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind<'a> {
    Object { key: &'a str },
    Manifest { key: &'a str },
}

impl InputSpec {
    /// Its kind; `None` unless exactly one of `key` and `manifest` is set
    /// (checked at submit).
    pub fn kind(&self) -> Option<InputKind<'_>> {
        match (&self.key, &self.manifest) {
            (Some(key), None) => Some(InputKind::Object { key }),
            (None, Some(key)) => Some(InputKind::Manifest { key }),
            _ => None,
        }
    }

    /// The key prefix a manifest's files are stored under, ending in `/`
    /// (or empty: the bucket's top).
    pub fn data_prefix(&self) -> String {
        if let Some(prefix) = &self.data_prefix {
            return if prefix.is_empty() || prefix.ends_with('/') {
                prefix.clone()
            } else {
                format!("{prefix}/")
            };
        }
        let manifest = self.manifest.as_deref().unwrap_or_default();
        let folders: Vec<&str> = match manifest.rsplit_once('/') {
            Some((folder, _)) => folder.split('/').collect(),
            None => Vec::new(),
        };
        // Deadline Cloud: ROOT/Manifests/farm-…/queue-…/Inputs/<guid>/…_input
        // beside ROOT/Data/.
        let root = match folders.iter().rposition(|f| *f == "Manifests") {
            Some(at) => &folders[..at],
            None => &folders[..folders.len().saturating_sub(1)],
        };
        if root.is_empty() {
            "Data/".into()
        } else {
            format!("{}/Data/", root.join("/"))
        }
    }
}

/// Checks a job's inputs without looking at any bucket: each names one
/// object or one manifest, its path is relative and stays in the working
/// folder, no two share a path, and there are at most `max` of them.
/// `readable` says whether a bucket may be read, and if not, why.
pub fn check(
    inputs: &[InputSpec],
    max: usize,
    readable: impl Fn(&str) -> Result<(), String>,
) -> Result<(), FieldError> {
    if inputs.len() > max {
        return Err(FieldError::new(
            "inputs",
            format!(
                "{} inputs; at most {max} a job (queue_manager.max_inputs)",
                inputs.len()
            ),
        ));
    }
    let mut paths: Vec<Vec<&str>> = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        readable(&input.bucket).map_err(|e| FieldError::new(format!("inputs[{i}].bucket"), e))?;
        let (field, key) = match input.kind() {
            Some(InputKind::Object { key }) => ("key", key),
            Some(InputKind::Manifest { key }) => ("manifest", key),
            None => {
                return Err(FieldError::new(
                    format!("inputs[{i}]"),
                    "give exactly one of `key` (an object) and `manifest`",
                ));
            }
        };
        crate::job::check_key(key)
            .map_err(|e| FieldError::new(format!("inputs[{i}].{field}"), e))?;
        check_path(&input.path).map_err(|e| FieldError::new(format!("inputs[{i}].path"), e))?;
        let path: Vec<&str> = input
            .path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        // One inside another would place a file where another input goes.
        if let Some(j) = paths.iter().position(|other: &Vec<&str>| {
            let shorter = other.len().min(path.len());
            other[..shorter] == path[..shorter]
        }) {
            return Err(FieldError::new(
                format!("inputs[{i}].path"),
                if paths[j] == path {
                    format!("`{}` is given twice", input.path)
                } else {
                    format!("`{}` overlaps inputs[{j}].path", input.path)
                },
            ));
        }
        paths.push(path);
    }
    Ok(())
}

/// A path inside the job's folder: relative, without `..`, without
/// control characters, not empty.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.trim_matches('/').is_empty() {
        return Err("must name a file or folder".into());
    }
    if path.chars().any(char::is_control) {
        return Err(format!("`{}` has a control character", path.escape_debug()));
    }
    for component in Path::new(path).components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(format!("`{path}` leaves the job folder (`..`)")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "`{path}` is absolute; give a path relative to the job folder"
                ));
            }
        }
    }
    Ok(())
}

/// What staging a job's inputs did, for `JobStarted` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Staged {
    pub files: u64,
    pub bytes_downloaded: u64,
    pub bytes_from_cache: u64,
    pub downloads: u64,
    pub hits: u64,
    pub seconds: f64,
}

impl Staged {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "files": self.files,
            "bytes_downloaded": self.bytes_downloaded,
            "bytes_from_cache": self.bytes_from_cache,
            "seconds": self.seconds,
        })
    }

    /// Counts one file placed, from the cache or downloaded.
    pub fn count(&mut self, from_cache: bool, size: u64) {
        self.files += 1;
        if from_cache {
            self.hits += 1;
            self.bytes_from_cache += size;
        } else {
            self.downloads += 1;
            self.bytes_downloaded += size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::manifest::Manifest;

    fn object(path: &str) -> InputSpec {
        InputSpec {
            bucket: "assets".into(),
            key: Some("shots/010/scene.blend".into()),
            manifest: None,
            data_prefix: None,
            path: path.into(),
            pin: None,
        }
    }

    #[test]
    fn paths_must_stay_in_the_job_folder() {
        let exists = |b: &str| {
            if b == "assets" {
                Ok(())
            } else {
                Err(format!("no bucket `{b}`"))
            }
        };
        assert!(check(&[object("scene.blend"), object("tex/a.png")], 10, exists).is_ok());
        for (inputs, field, why) in [
            (
                vec![object("../x")],
                "inputs[0].path",
                "leaves the job folder",
            ),
            (
                vec![object("a/../../x")],
                "inputs[0].path",
                "leaves the job folder",
            ),
            (vec![object("/etc/passwd")], "inputs[0].path", "absolute"),
            (vec![object("")], "inputs[0].path", "must name"),
            (
                vec![object("a"), object("a")],
                "inputs[1].path",
                "given twice",
            ),
            (vec![object("a"); 3], "inputs", "at most 2"),
        ] {
            let err = check(&inputs, 2, exists).unwrap_err();
            assert_eq!(err.field, field, "{inputs:?}");
            assert!(err.reason.contains(why), "{}", err.reason);
        }
        let mut elsewhere = object("a");
        elsewhere.bucket = "nope".into();
        assert_eq!(
            check(&[elsewhere], 2, exists).unwrap_err().field,
            "inputs[0].bucket"
        );
        let mut both = object("a");
        both.manifest = Some("m.json".into());
        assert_eq!(check(&[both], 2, exists).unwrap_err().field, "inputs[0]");
    }

    #[test]
    fn manifests_are_checked_and_their_store_found_beside_them() {
        let good = br#"{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{"hash":"0123456789abcdef0123456789abcdef","mtime":1700000000000000,"path":"tex/a.png","size":3}],"totalSize":3}"#;
        let manifest = Manifest::parse(good, 10).unwrap();
        assert_eq!(manifest.bytes(), 3);
        let text = String::from_utf8_lossy(good);
        for (bad, why) in [
            (text.replace("2023-03-03", "2025-12-04"), "manifestVersion"),
            (text.replace("\"xxh128\"", "\"sha256\""), "hashAlg"),
            (
                text.replace("tex/a.png", "../a.png"),
                "leaves the job folder",
            ),
            (
                text.replace("0123456789abcdef0123456789abcdef", "xyz"),
                "not 32 hex digits",
            ),
            ("{}".to_owned(), "not a manifest"),
        ] {
            let err = Manifest::parse(bad.as_bytes(), 10).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        let input = |manifest: &str| InputSpec {
            manifest: Some(manifest.into()),
            key: None,
            ..object("x/")
        };
        assert_eq!(input("manifests/shot010.json").data_prefix(), "Data/");
        assert_eq!(input("Root/Manifests/m.json").data_prefix(), "Root/Data/");
        assert_eq!(input("m.json").data_prefix(), "Data/");
        // Deadline Cloud's own layout, under a root of one or more folders.
        assert_eq!(
            input("JobAttachments/Manifests/farm-1/queue-2/Inputs/0a1b/9f_input").data_prefix(),
            "JobAttachments/Data/"
        );
        assert_eq!(
            input("a/b/Manifests/farm-1/queue-2/Inputs/0a1b/9f_input").data_prefix(),
            "a/b/Data/"
        );
        assert_eq!(
            input("Manifests/farm-1/queue-2/Inputs/0a1b/9f_input").data_prefix(),
            "Data/"
        );
        let given = |prefix: &str| InputSpec {
            data_prefix: Some(prefix.into()),
            ..input("m.json")
        };
        assert_eq!(given("Root/Data").data_prefix(), "Root/Data/");
        assert_eq!(given("Root/Data/").data_prefix(), "Root/Data/");
        assert_eq!(given("").data_prefix(), "");
    }
}
