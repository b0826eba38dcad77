//! A command's result: bytes in memory or a file on disk, with a MIME type
//! and the frame it shows. Post-tasks take it from there.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

/// A thumbnail kept for the monitor: its name beside the ledger, and the
/// frame its output shows (when the command said).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thumbnail {
    pub name: String,
    pub frame: Option<i64>,
}

/// Where a result's bytes are.
#[derive(Debug, Clone)]
pub enum Body {
    Bytes(Vec<u8>),
    /// A file, streamed by the tasks rather than read into memory.
    File(PathBuf),
}

/// A command's result (a command may give several: one per frame).
#[derive(Debug, Clone)]
pub struct Output {
    pub body: Body,
    pub mime: mime::Mime,
    /// The frame it shows, when the command knows.
    pub frame: Option<i64>,
    /// `${output_name}`: a file's name without extension, else `result`.
    pub name: String,
    /// The job's working folder, holding a file result; it is removed once
    /// the last clone of the output is dropped, after the tasks ran.
    _workdir: Option<Arc<crate::workspace::TempFolder>>,
}

impl Output {
    pub fn bytes(bytes: Vec<u8>, mime: mime::Mime) -> Self {
        Self {
            body: Body::Bytes(bytes),
            mime,
            frame: None,
            name: "result".into(),
            _workdir: None,
        }
    }

    /// A file inside `workdir`, which lives as long as the output.
    pub fn file(
        path: PathBuf,
        mime: mime::Mime,
        workdir: Arc<crate::workspace::TempFolder>,
    ) -> Self {
        let name = path
            .file_stem()
            .map_or_else(|| "result".into(), |s| s.to_string_lossy().into_owned());
        Self {
            body: Body::File(path),
            mime,
            frame: None,
            name,
            _workdir: Some(workdir),
        }
    }

    /// The MIME type of a file result its command did not name, from its
    /// extension. OpenEXR, the format renders are kept in, is
    /// `image/x-exr`, which mime_guess does not know.
    pub fn mime_of(path: &Path) -> mime::Mime {
        let exr = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("exr"));
        if exr {
            return "image/x-exr".parse().expect("a valid MIME type");
        }
        mime_guess::from_path(path).first_or_octet_stream()
    }

    /// The same output, marked as showing `frame`, named `name`.
    pub fn for_frame(self, frame: i64, name: String) -> Self {
        Self {
            frame: Some(frame),
            name,
            ..self
        }
    }

    /// Marks a file output with the frame its name shows (the last number
    /// in it), when that frame is one of `frames`.
    pub fn with_frame_from_name(mut self, frames: &[i64]) -> Self {
        let digits: String = {
            let tail: String = self
                .name
                .chars()
                .rev()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect();
            tail.chars().rev().collect()
        };
        self.frame = digits.parse().ok().filter(|f| frames.contains(f));
        self
    }

    /// A JSON value as `application/json`.
    pub fn json(value: &Value) -> Self {
        Self::bytes(
            serde_json::to_vec(value).expect("a JSON value always serializes"),
            mime::APPLICATION_JSON,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_result_s_type_comes_from_its_extension_exr_included() {
        let of = |name: &str| Output::mime_of(Path::new(name)).essence_str().to_owned();
        assert_eq!(of("out/frame_0001.exr"), "image/x-exr");
        assert_eq!(of("FRAME.EXR"), "image/x-exr");
        assert_eq!(of("frame.png"), "image/png");
        assert_eq!(of("frame.jpg"), "image/jpeg");
        assert_eq!(of("no_extension"), "application/octet-stream");
    }
}
