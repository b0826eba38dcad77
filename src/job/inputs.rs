//! A job's inputs (SPEC §6a): objects placed in its working folder before
//! the command runs, one object by key or many through an AWS Deadline
//! Cloud job-attachments manifest. Here: what a job may ask for, and the
//! manifest format. Pure.

use std::collections::HashSet;
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
    /// Where a manifest's files are stored by hash (`PREFIX<hash>.xxh128`);
    /// by default `Data/` beside the manifest's folder, as Deadline Cloud
    /// lays out `ROOT/Manifests/…` and `ROOT/Data/…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_prefix: Option<String>,
    /// Relative to the job's working folder.
    pub path: String,
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

    /// The key prefix a manifest's files are stored under.
    pub fn data_prefix(&self) -> String {
        if let Some(prefix) = &self.data_prefix {
            return prefix.clone();
        }
        let manifest = self.manifest.as_deref().unwrap_or_default();
        let folder = manifest.rsplit_once('/').map_or("", |(folder, _)| folder);
        match folder.rsplit_once('/') {
            Some((root, _)) => format!("{root}/Data/"),
            None => "Data/".into(),
        }
    }
}

/// Checks a job's inputs without looking at any bucket: each names one
/// object or one manifest, its path is relative and stays in the working
/// folder, no two share a path, and there are at most `max` of them.
/// `buckets` says which bucket names exist.
pub fn check(
    inputs: &[InputSpec],
    max: usize,
    bucket_exists: impl Fn(&str) -> bool,
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
        if !bucket_exists(&input.bucket) {
            return Err(FieldError::new(
                format!("inputs[{i}].bucket"),
                format!("no bucket `{}` is configured", input.bucket),
            ));
        }
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

/// The manifest version and hash this build reads.
pub const MANIFEST_VERSION: &str = "2023-03-03";
pub const HASH_ALG: &str = "xxh128";

/// An AWS Deadline Cloud job-attachments manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub manifest_version: String,
    pub hash_alg: String,
    #[serde(default)]
    pub total_size: Option<u64>,
    pub paths: Vec<ManifestFile>,
}

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ManifestFile {
    /// Relative to the input's folder.
    pub path: String,
    /// Its xxh128, 32 hex digits.
    pub hash: String,
    pub size: u64,
    /// Microseconds since the epoch.
    pub mtime: i64,
}

impl Manifest {
    /// Parses and checks a manifest: version, hash algorithm, and every
    /// file's path and hash. At most `max_files` files.
    pub fn parse(bytes: &[u8], max_files: usize) -> Result<Self, String> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
        if manifest.manifest_version != MANIFEST_VERSION {
            return Err(format!(
                "manifestVersion `{}`; this build reads `{MANIFEST_VERSION}`",
                manifest.manifest_version
            ));
        }
        if manifest.hash_alg != HASH_ALG {
            return Err(format!(
                "hashAlg `{}`; this build reads `{HASH_ALG}`",
                manifest.hash_alg
            ));
        }
        if manifest.paths.len() > max_files {
            return Err(format!(
                "{} files; at most {max_files} (worker.cache.max_manifest_files)",
                manifest.paths.len()
            ));
        }
        let mut seen = HashSet::new();
        for file in &manifest.paths {
            check_path(&file.path).map_err(|e| format!("paths: {e}"))?;
            if !seen.insert(file.path.as_str()) {
                return Err(format!("paths: `{}` is listed twice", file.path));
            }
            if file.hash.len() != 32 || !file.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "paths: `{}` has hash `{}`, not 32 hex digits",
                    file.path, file.hash
                ));
            }
        }
        Ok(manifest)
    }

    /// Bytes of all its files.
    pub fn bytes(&self) -> u64 {
        self.paths.iter().map(|f| f.size).sum()
    }
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

    fn object(path: &str) -> InputSpec {
        InputSpec {
            bucket: "assets".into(),
            key: Some("shots/010/scene.blend".into()),
            manifest: None,
            data_prefix: None,
            path: path.into(),
        }
    }

    #[test]
    fn paths_must_stay_in_the_job_folder() {
        let exists = |b: &str| b == "assets";
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
    }
}
