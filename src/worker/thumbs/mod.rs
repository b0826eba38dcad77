//! Thumbnails of a job's image outputs, for the monitor: a JPEG about
//! `WIDTH` pixels wide of every PNG, JPEG or OpenEXR output, made after the
//! command ended and kept beside the queue's ledger.
//!
//! The worker never decodes an output itself: [`sandbox`] runs the decode
//! ([`decode`]) in a child process under memory, CPU and time limits, after
//! a header check against a pixel budget. One that cannot be made (refused,
//! damaged, over a limit, or not kept) is left out with one warning naming
//! the job and the file: it never fails the job.

use std::fmt;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Worker;
use crate::events::ledger::thumbnail_name;
use crate::job::{Body, Output};
use crate::worker::delivery::Delivery;

pub mod decode;
pub mod sandbox;

pub use decode::WIDTH;
pub use sandbox::Thumbnailer;

/// Outputs of these types get a thumbnail.
fn is_image(mime: &mime::Mime) -> bool {
    matches!(
        mime.essence_str(),
        "image/png" | "image/jpeg" | "image/x-exr" | "image/aces"
    )
}

/// A JPEG thumbnail of an output, decoded in this process with the default
/// pixel budget and no other limit: the benchmarks' baseline for the
/// sandbox. The worker never calls it.
pub fn make(output: &Output) -> Result<Vec<u8>, decode::DecodeError> {
    let max_pixels = crate::config::ThumbnailsConfig::default().max_pixels;
    match &output.body {
        Body::Bytes(bytes) => decode::thumbnail(std::io::Cursor::new(bytes), max_pixels),
        Body::File(path) => decode::thumbnail(
            std::io::BufReader::new(std::fs::File::open(path)?),
            max_pixels,
        ),
    }
}

/// An output as a warning names it: its file, or its name for bytes.
struct FileName<'a>(&'a Output);

impl fmt::Display for FileName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0.body {
            Body::File(path) => write!(f, "{}", path.display()),
            Body::Bytes(_) => write!(f, "{} ({})", self.0.name, self.0.mime),
        }
    }
}

impl Worker {
    /// Makes and keeps a thumbnail of each image output, until `abort`
    /// (the job is being handed back: its tasks will not run either);
    /// returns their names, for `JobSucceeded`.
    pub(super) async fn thumbnails(
        &self,
        delivery: &Delivery,
        outputs: &[Output],
        abort: &CancellationToken,
    ) -> Vec<String> {
        let (Some(ledger), Some(thumbnailer)) = (&self.source(delivery).ledger, &self.thumbnailer)
        else {
            return Vec::new();
        };
        let job_id = delivery.envelope.as_ref().map_or("", |e| e.job_id.as_str());
        let mut names = Vec::new();
        for (n, output) in outputs.iter().enumerate() {
            if !is_image(&output.mime) {
                continue;
            }
            let made = tokio::select! {
                made = thumbnailer.make(output) => made,
                _ = abort.cancelled() => break,
            };
            let jpeg = match made {
                Ok(jpeg) => jpeg,
                Err(error) => {
                    warn!(%job_id, file = %FileName(output), %error, "no thumbnail for an image output");
                    continue;
                }
            };
            let name = thumbnail_name(&delivery.message_id, n);
            match ledger.put_thumbnail(&name, jpeg).await {
                Ok(()) => {
                    debug!(%name, "thumbnail kept");
                    names.push(name);
                }
                Err(error) => {
                    warn!(%job_id, file = %FileName(output), %error, "cannot keep a thumbnail")
                }
            }
        }
        names
    }
}
