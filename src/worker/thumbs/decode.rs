//! The decode itself: an image's header checked against a pixel budget,
//! then the image decoded and shrunk to a JPEG. Only the sandbox's child
//! process runs it on a job's output (see [`super::sandbox`]); a benchmark
//! runs it in-process as the baseline.

use std::io::{BufRead, Seek, SeekFrom};

use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, ImageFormat, ImageReader, Limits};

/// A thumbnail's width (its height keeps the image's proportions).
pub const WIDTH: u32 = 320;
/// A thumbnail's greatest height, for very tall images.
const MAX_HEIGHT: u32 = WIDTH * 8;
/// Bytes a decoded pixel takes at most: four 32-bit floats (an EXR).
const BYTES_PER_PIXEL: u64 = 16;
/// How much larger than its display window an EXR's data window may be:
/// overscan is a few percent a side; a data window four times the frame
/// is not a render of that frame.
const MAX_OVERSCAN: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The header asks for more than the budget: nothing was decoded.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Image(#[from] image::ImageError),
    #[error("cannot read its OpenEXR header: {0}")]
    ExrHeader(#[from] exr::error::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A JPEG thumbnail of the PNG, JPEG or OpenEXR image `reader` holds
/// (its format told by its first bytes), at most `WIDTH` pixels wide,
/// refused unhurt when its header asks for more than `max_pixels`.
pub fn thumbnail(mut reader: impl BufRead + Seek, max_pixels: u64) -> Result<Vec<u8>, DecodeError> {
    let format = ImageReader::new(&mut reader)
        .with_guessed_format()?
        .format();
    reader.seek(SeekFrom::Start(0))?;
    let format = match format {
        Some(format @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::OpenExr)) => format,
        Some(other) => {
            return Err(DecodeError::Refused(format!(
                "{other:?} images get no thumbnail (PNG, JPEG and OpenEXR do)"
            )));
        }
        None => {
            return Err(DecodeError::Refused(
                "not a PNG, JPEG or OpenEXR image".into(),
            ));
        }
    };
    if format == ImageFormat::OpenExr {
        check_exr(&mut reader, max_pixels)?;
    } else {
        let (width, height) = ImageReader::with_format(&mut reader, format).into_dimensions()?;
        check_area("it", width as u64, height as u64, max_pixels)?;
    }
    reader.seek(SeekFrom::Start(0))?;

    let mut decoder = ImageReader::with_format(reader, format);
    // The budget again, as the decoders' own allocation limit.
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(BYTES_PER_PIXEL));
    decoder.limits(limits);
    let image = decoder.decode()?;
    // Only ever smaller; float (EXR) pixels are clamped to 0–1 on the way
    // to 8 bits.
    let small = if image.width() > WIDTH || image.height() > MAX_HEIGHT {
        image.thumbnail(WIDTH, MAX_HEIGHT)
    } else {
        image
    };
    let small = DynamicImage::ImageRgb8(small.to_rgb8());
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, 80).encode_image(&small)?;
    Ok(jpeg)
}

/// Every part of an EXR: its data window (the pixels stored, which the
/// decoder allocates for) and its display window (the frame, which the
/// decoded image is the size of) within the budget, and the data window
/// not far larger than the frame.
fn check_exr(reader: impl BufRead, max_pixels: u64) -> Result<(), DecodeError> {
    let meta = exr::meta::MetaData::read_from_buffered(reader, false)?;
    for header in &meta.headers {
        let data = header.layer_size;
        let display = header.shared_attributes.display_window.size;
        let (data_width, data_height) = (data.width() as u64, data.height() as u64);
        let (display_width, display_height) = (display.width() as u64, display.height() as u64);
        check_area(
            "its display window",
            display_width,
            display_height,
            max_pixels,
        )?;
        check_area("its data window", data_width, data_height, max_pixels)?;
        let data_area = data_width.saturating_mul(data_height);
        let display_area = display_width.saturating_mul(display_height).max(1);
        if data_area > display_area.saturating_mul(MAX_OVERSCAN) {
            return Err(DecodeError::Refused(format!(
                "its data window ({data_width}x{data_height}) is over {MAX_OVERSCAN} times \
                 its display window ({display_width}x{display_height})"
            )));
        }
    }
    Ok(())
}

fn check_area(what: &str, width: u64, height: u64, max_pixels: u64) -> Result<(), DecodeError> {
    if width.saturating_mul(height) > max_pixels {
        return Err(DecodeError::Refused(format!(
            "{what} is {width}x{height} pixels, over the budget of {max_pixels}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        DynamicImage::ImageRgb8(image::RgbImage::new(width, height))
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        bytes
    }

    #[test]
    fn a_small_png_gets_a_jpeg_at_most_width_wide() {
        let jpeg = thumbnail(Cursor::new(png(640, 100)), 1_000_000).unwrap();
        let small = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((small.width(), small.height()), (WIDTH, 50));
    }

    #[test]
    fn an_image_over_the_budget_is_refused_from_its_header() {
        let error = thumbnail(Cursor::new(png(100, 100)), 9_999).unwrap_err();
        assert!(
            matches!(&error, DecodeError::Refused(m) if m.contains("100x100")),
            "{error}"
        );
    }

    #[test]
    fn what_is_not_an_image_is_refused() {
        let error = thumbnail(Cursor::new(b"GIF89a....".to_vec()), 1_000).unwrap_err();
        assert!(matches!(error, DecodeError::Refused(_)), "{error}");
        let error = thumbnail(Cursor::new(b"hello".to_vec()), 1_000).unwrap_err();
        assert!(matches!(error, DecodeError::Refused(_)), "{error}");
    }
}
