//! Thumbnails of a job's image outputs, for the monitor: a JPEG about
//! `WIDTH` pixels wide of every PNG, JPEG or OpenEXR output, made after the
//! command ended and kept beside the queue's ledger. One that cannot be
//! made (or kept) is left out with a warning: it never fails the job.

use image::codecs::jpeg::JpegEncoder;
use tracing::{debug, warn};

use super::Worker;
use crate::events::ledger::thumbnail_name;
use crate::job::{Body, Output};
use crate::worker::delivery::Delivery;

/// A thumbnail's width (its height keeps the image's proportions).
pub const WIDTH: u32 = 320;

/// Outputs of these types get a thumbnail.
fn is_image(mime: &mime::Mime) -> bool {
    matches!(
        mime.essence_str(),
        "image/png" | "image/jpeg" | "image/x-exr" | "image/aces"
    )
}

/// A JPEG thumbnail of an image output.
pub fn make(output: &Output) -> Result<Vec<u8>, image::ImageError> {
    let image = match &output.body {
        Body::Bytes(bytes) => image::load_from_memory(bytes)?,
        Body::File(path) => image::ImageReader::open(path)?
            .with_guessed_format()?
            .decode()?,
    };
    // Only ever smaller; float (EXR) pixels are clamped to 0–1 on the way
    // to 8 bits.
    let small = if image.width() > WIDTH {
        image.thumbnail(WIDTH, WIDTH * 8)
    } else {
        image
    };
    let small = image::DynamicImage::ImageRgb8(small.to_rgb8());
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, 80).encode_image(&small)?;
    Ok(jpeg)
}

impl Worker {
    /// Makes and keeps a thumbnail of each image output; returns their
    /// names, for `JobSucceeded`.
    pub(super) async fn thumbnails(&self, delivery: &Delivery, outputs: &[Output]) -> Vec<String> {
        let Some(ledger) = &self.source(delivery).ledger else {
            return Vec::new();
        };
        let mut names = Vec::new();
        for (n, output) in outputs.iter().enumerate() {
            if !is_image(&output.mime) {
                continue;
            }
            let output = output.clone();
            let made = tokio::task::spawn_blocking(move || make(&output)).await;
            let jpeg = match made {
                Ok(Ok(jpeg)) => jpeg,
                Ok(Err(error)) => {
                    warn!(%error, output = n, "cannot make a thumbnail");
                    continue;
                }
                Err(error) => {
                    warn!(%error, output = n, "cannot make a thumbnail");
                    continue;
                }
            };
            let name = thumbnail_name(&delivery.message_id, n);
            match ledger.put_thumbnail(&name, jpeg).await {
                Ok(()) => {
                    debug!(%name, "thumbnail kept");
                    names.push(name);
                }
                Err(error) => warn!(%error, "cannot keep a thumbnail"),
            }
        }
        names
    }
}
