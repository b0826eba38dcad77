//! `renderq bench --thumbnails`: what the thumbnail sandbox costs. A
//! 1920x1080 PNG and an 8K (7680x4320) RGBA half-float EXR, each decoded
//! to its thumbnail in this process (the same decode function the child
//! runs, with no limits around it) and in the sandbox (a `renderq
//! thumbnail` child under the default limits), and the 881-byte EXR bomb
//! refused by the sandbox. Also the images the integration tests use.

use crate::access::JobUser;
use std::io::Cursor;
use std::time::{Duration, Instant};

use exr::prelude::{Encoding, Image, SpecificChannels, WritableImage, f16};

use crate::config::ThumbnailsConfig;
use crate::job::Output;
use crate::worker::thumbs::Thumbnailer;

/// An RGB PNG of gradients.
pub fn png(width: u32, height: u32) -> anyhow::Result<Vec<u8>> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image)
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

/// An RGBA half-float EXR in ZIP-compressed scan lines (as renderers write
/// them), of gradients with a little noise so it compresses as a render
/// does rather than to nothing.
pub fn exr_half_rgba(width: usize, height: usize) -> anyhow::Result<Vec<u8>> {
    let channels = SpecificChannels::rgba(|exr::math::Vec2(x, y): exr::math::Vec2<usize>| {
        let noise = ((x * 7919 + y * 104_729) % 97) as f32 / 970.0;
        (
            f16::from_f32(x as f32 / width as f32 + noise),
            f16::from_f32(y as f32 / height as f32),
            f16::from_f32(0.25 + noise),
            f16::from_f32(1.0),
        )
    });
    let mut bytes = Vec::new();
    Image::from_encoded_channels((width, height), Encoding::SMALL_LOSSLESS, channels)
        .write()
        .to_buffered(Cursor::new(&mut bytes))?;
    Ok(bytes)
}

/// The 881-byte EXR bomb: a valid scan-line header whose data window is
/// 10^9 pixels wide and whose display window is one pixel, then a token
/// chunk. Decoded in-process, it makes the decoder ask for about 120 GB.
pub fn exr_bomb() -> Vec<u8> {
    exr_881_bytes([0, 0, 999_999_999, 0], [0, 0, 0, 0])
}

/// An 881-byte float RGBA scan-line EXR with these windows (`[x_min,
/// y_min, x_max, y_max]`, inclusive), whose one chunk holds what is left
/// of the 881 bytes.
pub fn exr_881_bytes(data_window: [i32; 4], display_window: [i32; 4]) -> Vec<u8> {
    fn attribute(out: &mut Vec<u8>, name: &str, kind: &str, value: &[u8]) {
        for text in [name, kind] {
            out.extend_from_slice(text.as_bytes());
            out.push(0);
        }
        out.extend_from_slice(&(value.len() as i32).to_le_bytes());
        out.extend_from_slice(value);
    }
    let ints =
        |values: &[i32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let mut out = vec![0x76, 0x2f, 0x31, 0x01, 2, 0, 0, 0];
    let mut channels = Vec::new();
    for name in ["A", "B", "G", "R"] {
        channels.extend_from_slice(name.as_bytes());
        channels.push(0);
        // Pixel type 2 (float), linear 0, three reserved bytes, sampling 1x1.
        channels.extend_from_slice(&ints(&[2]));
        channels.extend_from_slice(&[0, 0, 0, 0]);
        channels.extend_from_slice(&ints(&[1, 1]));
    }
    channels.push(0);
    attribute(&mut out, "channels", "chlist", &channels);
    attribute(&mut out, "compression", "compression", &[0]);
    attribute(&mut out, "dataWindow", "box2i", &ints(&data_window));
    attribute(&mut out, "displayWindow", "box2i", &ints(&display_window));
    attribute(&mut out, "lineOrder", "lineOrder", &[0]);
    attribute(&mut out, "pixelAspectRatio", "float", &1f32.to_le_bytes());
    attribute(&mut out, "screenWindowCenter", "v2f", &[0; 8]);
    attribute(&mut out, "screenWindowWidth", "float", &1f32.to_le_bytes());
    out.push(0);
    // One scan line, one chunk: its offset, then the chunk (line 0, and
    // what is left of the 881 bytes as its data).
    let chunk_at = out.len() as u64 + 8;
    out.extend_from_slice(&chunk_at.to_le_bytes());
    let data = 881usize.saturating_sub(out.len() + 8);
    out.extend_from_slice(&ints(&[0, data as i32]));
    out.resize(out.len() + data, 0);
    out
}

/// The median of `runs` timed calls of `f`.
async fn median<F, Fut, T>(runs: usize, mut f: F) -> anyhow::Result<(Duration, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(f().await?);
        times.push(started.elapsed());
    }
    times.sort();
    Ok((times[runs / 2], last.expect("at least one run")))
}

pub async fn run() -> anyhow::Result<()> {
    let limits = ThumbnailsConfig::default();
    let sandbox = Thumbnailer::new(&limits, JobUser::Worker)?;
    println!(
        "thumbnail sandbox limits: {} Mpx, {} MiB address space, {} s CPU, {} s wall",
        limits.max_pixels / 1_000_000,
        limits.max_memory / (1024 * 1024),
        limits.max_cpu_time.as_secs(),
        limits.timeout.as_secs()
    );
    let dir = tempfile::tempdir()?;
    let workdir =
        std::sync::Arc::new(crate::workspace::Workspace::new(dir.path()).temp_dir("bench-")?);
    let exr_mime: mime::Mime = "image/x-exr".parse()?;
    let cases = [
        (
            "1920x1080 PNG",
            "frame.png",
            png(1920, 1080)?,
            mime::IMAGE_PNG,
            10,
        ),
        (
            "7680x4320 RGBA half EXR (ZIP)",
            "frame.exr",
            exr_half_rgba(7680, 4320)?,
            exr_mime.clone(),
            3,
        ),
    ];
    for (what, name, bytes, mime, runs) in cases {
        let path = workdir.path().join(name);
        std::fs::write(&path, &bytes)?;
        let output = Output::file(path, mime, workdir.clone());
        let (inline, size) = median(runs, || {
            let output = output.clone();
            async move {
                let made =
                    tokio::task::spawn_blocking(move || crate::worker::thumbs::make(&output));
                Ok(made.await??.len())
            }
        })
        .await?;
        let (sandbox, output) = (&sandbox, &output);
        let before = children()?;
        let (boxed, _) = median(runs, move || async move {
            Ok(sandbox.make(output).await?.len())
        })
        .await?;
        let after = children()?;
        let cpu = (cpu_time(&after) - cpu_time(&before)) / runs as u32;
        println!(
            "thumbnail of a {what} ({} KiB file, {} KiB JPEG): in-process {:.1} ms, sandboxed {:.1} ms \
             ({:+.1} ms), the child's CPU time {:.1} ms, largest child's peak RSS so far {} MiB",
            bytes.len() / 1024,
            size / 1024,
            ms(inline),
            ms(boxed),
            ms(boxed) - ms(inline),
            ms(cpu),
            after.max_rss() / 1024
        );
    }
    let bomb = &Output::bytes(exr_bomb(), exr_mime);
    let sandbox = &sandbox;
    let (refused, error) = median(10, move || async move {
        match sandbox.make(bomb).await {
            Ok(_) => anyhow::bail!("the EXR bomb got a thumbnail"),
            Err(error) => Ok(error.to_string()),
        }
    })
    .await?;
    println!(
        "the 881-byte EXR bomb, sandboxed: {:.1} ms ({error})",
        ms(refused)
    );
    // With the budget lifted and a display window as wide as the data
    // window (which passes the overscan check), only the limits stop it.
    let unchecked = Thumbnailer::new(
        &ThumbnailsConfig {
            max_pixels: u64::MAX / 64,
            ..limits
        },
        JobUser::Worker,
    )?;
    let wide = [0, 0, 999_999_999, 0];
    let started = Instant::now();
    match unchecked
        .make(&Output::bytes(exr_881_bytes(wide, wide), bomb.mime.clone()))
        .await
    {
        Ok(_) => anyhow::bail!("the EXR bomb got a thumbnail with the budget lifted"),
        Err(error) => println!(
            "an 881-byte EXR 10^9 px wide, pixel budget lifted, stopped by the limits alone: {:.1} ms ({error})",
            ms(started.elapsed())
        ),
    }
    Ok(())
}

/// What this process's waited-for children used, together.
fn children() -> nix::Result<nix::sys::resource::Usage> {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
}

fn cpu_time(usage: &nix::sys::resource::Usage) -> Duration {
    let micros = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    micros(usage.user_time()) + micros(usage.system_time())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
