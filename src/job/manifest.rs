//! AWS Deadline Cloud job-attachments manifests (`2023-03-03`, xxh128), read
//! as Deadline's own client writes them: names that are not UTF-8 as lone
//! surrogate escapes, times before 1970 as negative microseconds. Pure.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

use super::inputs::check_path;

/// The manifest version and hash this build reads.
pub const MANIFEST_VERSION: &str = "2023-03-03";
pub const HASH_ALG: &str = "xxh128";

/// An AWS Deadline Cloud job-attachments manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub manifest_version: String,
    pub hash_alg: String,
    pub total_size: Option<u64>,
    pub paths: Vec<ManifestFile>,
}

/// A manifest as it is written; a path is kept as written until decoded.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Written<'a> {
    manifest_version: String,
    hash_alg: String,
    #[serde(default)]
    total_size: Option<u64>,
    #[serde(borrow)]
    paths: Vec<WrittenFile<'a>>,
}

#[derive(Deserialize)]
struct WrittenFile<'a> {
    #[serde(borrow)]
    path: &'a serde_json::value::RawValue,
    hash: String,
    size: u64,
    mtime: i64,
}

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// Relative to the input's folder.
    pub path: FilePath,
    /// Its xxh128, 32 hex digits.
    pub hash: String,
    pub size: u64,
    /// Microseconds since the epoch (negative before 1970).
    pub mtime: i64,
}

/// A file's path in a manifest, as the bytes of a file name. Deadline
/// Cloud writes a name that is not UTF-8 the way Python reads it, each
/// byte that is not UTF-8 as a lone surrogate escape (`bad\udcffname.txt`
/// for the byte 0xFF), and its own download makes them bytes again
/// (`surrogateescape`); so does this.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FilePath(Vec<u8>);

impl FilePath {
    /// Decodes a JSON string as written (with its quotes).
    fn decode(written: &str) -> Result<Self, String> {
        let inner = written
            .strip_prefix('"')
            .and_then(|w| w.strip_suffix('"'))
            .ok_or_else(|| format!("path {written} is not a string"))?;
        let mut bytes = Vec::with_capacity(inner.len());
        let mut chars = inner.chars();
        let hex4 = |chars: &mut std::str::Chars| -> Result<u32, String> {
            let digits: String = chars.take(4).collect();
            u32::from_str_radix(&digits, 16)
                .ok()
                .filter(|_| digits.len() == 4)
                .ok_or_else(|| format!("path {written}: `\\u{digits}` is not an escape"))
        };
        while let Some(c) = chars.next() {
            if c != '\\' {
                let mut buffer = [0; 4];
                bytes.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
                continue;
            }
            let decoded = match chars.next() {
                Some('"') => '"',
                Some('\\') => '\\',
                Some('/') => '/',
                Some('b') => '\u{8}',
                Some('f') => '\u{c}',
                Some('n') => '\n',
                Some('r') => '\r',
                Some('t') => '\t',
                Some('u') => {
                    let unit = hex4(&mut chars)?;
                    match unit {
                        0xD800..=0xDBFF => {
                            let rest = chars.as_str();
                            let low = rest
                                .strip_prefix("\\u")
                                .and_then(|r| r.get(..4))
                                .and_then(|d| u32::from_str_radix(d, 16).ok())
                                .filter(|low| (0xDC00..=0xDFFF).contains(low));
                            let Some(low) = low else {
                                return Err(format!(
                                    "path {written}: a lone surrogate `\\u{unit:04x}` stands for no byte"
                                ));
                            };
                            chars = rest[6..].chars();
                            char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                                .expect("a surrogate pair is a char")
                        }
                        // Python's surrogateescape: the byte 0x80..=0xFF.
                        0xDC80..=0xDCFF => {
                            bytes.push((unit - 0xDC00) as u8);
                            continue;
                        }
                        0xDC00..=0xDFFF => {
                            return Err(format!(
                                "path {written}: a lone surrogate `\\u{unit:04x}` stands for no byte"
                            ));
                        }
                        _ => char::from_u32(unit).expect("not a surrogate"),
                    }
                }
                _ => return Err(format!("path {written} has a bad escape")),
            };
            let mut buffer = [0; 4];
            bytes.extend_from_slice(decoded.encode_utf8(&mut buffer).as_bytes());
        }
        Ok(Self(bytes))
    }

    /// As a path under the input's folder.
    pub fn as_path(&self) -> &Path {
        use std::os::unix::ffi::OsStrExt;
        Path::new(std::ffi::OsStr::from_bytes(&self.0))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// UTF-8 as it is, any other byte as `\xNN`.
impl std::fmt::Display for FilePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for chunk in self.0.utf8_chunks() {
            f.write_str(chunk.valid())?;
            for byte in chunk.invalid() {
                write!(f, "\\x{byte:02x}")?;
            }
        }
        Ok(())
    }
}

impl Manifest {
    /// Parses and checks a manifest: version, hash algorithm, and every
    /// file's path and hash. At most `max_files` files.
    pub fn parse(bytes: &[u8], max_files: usize) -> Result<Self, String> {
        let written: Written =
            serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
        let paths = written
            .paths
            .into_iter()
            .map(|file| {
                Ok(ManifestFile {
                    path: FilePath::decode(file.path.get()).map_err(|e| format!("paths: {e}"))?,
                    hash: file.hash,
                    size: file.size,
                    mtime: file.mtime,
                })
            })
            .collect::<Result<_, String>>()?;
        let manifest = Manifest {
            manifest_version: written.manifest_version,
            hash_alg: written.hash_alg,
            total_size: written.total_size,
            paths,
        };
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
            // Bytes that are not UTF-8 are never `/`, `.` or a control
            // character: checking the text they show as checks them.
            check_path(&file.path.to_string()).map_err(|e| format!("paths: {e}"))?;
            if !seen.insert(file.path.as_bytes()) {
                return Err(format!("paths: `{}` is listed twice", file.path));
            }
            if file.hash.len() != 32 || !file.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "paths: `{}` has hash `{}`, not 32 hex digits",
                    file.path, file.hash
                ));
            }
        }
        if let Some(total) = manifest.total_size
            && manifest.bytes() > total
        {
            return Err(format!(
                "its files claim {} bytes, more than its own totalSize {total}",
                manifest.bytes()
            ));
        }
        Ok(manifest)
    }

    /// Bytes of all its files (`u64::MAX` for sizes that add up past it).
    pub fn bytes(&self) -> u64 {
        self.paths
            .iter()
            .fold(0u64, |sum, f| sum.saturating_add(f.size))
    }

    /// Its largest file.
    pub fn largest(&self) -> Option<&ManifestFile> {
        self.paths.iter().max_by_key(|f| f.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_file(path: &str, size: &str, mtime: &str, total: &str) -> String {
        format!(
            r#"{{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{{"hash":"0123456789abcdef0123456789abcdef","mtime":{mtime},"path":"{path}","size":{size}}}]{total}}}"#
        )
    }

    #[test]
    fn names_that_are_not_utf8_are_the_bytes_deadline_escaped() {
        let manifest = Manifest::parse(
            one_file(r"tex/bad\udcffname.txt", "3", "0", "").as_bytes(),
            10,
        )
        .unwrap();
        let path = &manifest.paths[0].path;
        assert_eq!(path.as_bytes(), b"tex/bad\xffname.txt");
        assert_eq!(path.to_string(), r"tex/bad\xffname.txt");
        // Escapes of real characters, pairs included, are those characters.
        let manifest = Manifest::parse(
            one_file(r"caf\u00e9/\ud83c\udfac.txt", "3", "0", "").as_bytes(),
            10,
        )
        .unwrap();
        assert_eq!(manifest.paths[0].path.to_string(), "café/🎬.txt");
        // A surrogate that stands for no byte names no file.
        for bad in [r"a\ud800.txt", r"a\udc10.txt"] {
            let err = Manifest::parse(one_file(bad, "3", "0", "").as_bytes(), 10).unwrap_err();
            assert!(err.contains("stands for no byte"), "{err}");
        }
        let err = Manifest::parse(one_file(r"../\udcff", "3", "0", "").as_bytes(), 10).unwrap_err();
        assert!(err.contains("leaves the job folder"), "{err}");
    }

    #[test]
    fn sizes_are_added_without_overflow_and_held_to_the_total() {
        let mtime_before_1970 = "-86400500000";
        let manifest = Manifest::parse(
            one_file("a", "3", mtime_before_1970, r#","totalSize":3"#).as_bytes(),
            10,
        )
        .unwrap();
        assert_eq!(manifest.paths[0].mtime, -86_400_500_000);
        let huge = (1u64 << 63).to_string();
        let err = Manifest::parse(
            one_file("a", &huge, "0", r#","totalSize":3"#).as_bytes(),
            10,
        )
        .unwrap_err();
        assert!(err.contains("more than its own totalSize 3"), "{err}");
        let two = format!(
            r#"{{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{{"hash":"0123456789abcdef0123456789abcdef","mtime":0,"path":"a","size":{max}}},{{"hash":"0123456789abcdef0123456789abcdef","mtime":0,"path":"b","size":{max}}}]}}"#,
            max = u64::MAX
        );
        let manifest = Manifest::parse(two.as_bytes(), 10).unwrap();
        assert_eq!(manifest.bytes(), u64::MAX);
        assert_eq!(manifest.largest().unwrap().size, u64::MAX);
    }
}
