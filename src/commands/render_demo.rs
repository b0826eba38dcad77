//! `render_demo`: a small deterministic ray tracer, so the whole pipeline
//! produces real images with no GPU and no external program.
//!
//! The scene (spheres on a checkered floor under a sun, with shadows and
//! reflections) is seen from a camera that orbits with `frame`, so every
//! frame is a different image; the same parameters always give the same
//! bytes.

use std::ops::{Add, Mul, Sub};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::{CommandError, Output, Progress, RunContext};
use crate::job::params::{Param, ParamType, Schema};

pub fn schema() -> Schema {
    Schema::default()
        .with(
            "width",
            Param::new(ParamType::Integer)
                .default_value(640)
                .range(1.0, 4096.0),
        )
        .with(
            "height",
            Param::new(ParamType::Integer)
                .default_value(360)
                .range(1.0, 4096.0),
        )
        .with(
            "frame",
            Param::new(ParamType::Integer)
                .default_value(1)
                .range(0.0, 1_000_000.0),
        )
        .with(
            "samples",
            Param::new(ParamType::Integer)
                .default_value(1)
                .range(1.0, 64.0),
        )
}

/// What to render, read from checked parameters.
#[derive(Debug, Clone, Copy)]
struct Shot {
    width: u32,
    height: u32,
    frame: u32,
    samples: u32,
}

impl Shot {
    fn from_params(params: &Map<String, Value>) -> Self {
        let get = |name, default| {
            params
                .get(name)
                .and_then(Value::as_u64)
                .map_or(default, |v| v as u32)
        };
        Self {
            width: get("width", 640),
            height: get("height", 360),
            frame: get("frame", 1),
            samples: get("samples", 1),
        }
    }
}

/// Renders the `frame` parameter, or each frame of an array chunk (one
/// output per frame).
pub async fn run(
    params: &Map<String, Value>,
    ctx: &RunContext,
) -> Result<Vec<Output>, CommandError> {
    let shot = Shot::from_params(params);
    if ctx.frames.is_empty() {
        return Ok(vec![render_png(shot, ctx).await?]);
    }
    let mut outputs = Vec::with_capacity(ctx.frames.len());
    for &frame in &ctx.frames {
        let shot = Shot {
            frame: u32::try_from(frame).unwrap_or(0),
            ..shot
        };
        outputs.push(
            render_png(shot, ctx)
                .await?
                .for_frame(frame, format!("frame_{frame:04}")),
        );
    }
    Ok(outputs)
}

async fn render_png(shot: Shot, ctx: &RunContext) -> Result<Output, CommandError> {
    let (cancel, progress) = (ctx.cancel.clone(), ctx.progress.clone());
    let png = tokio::task::spawn_blocking(move || {
        let pixels = render(shot, &cancel, &progress).ok_or(CommandError::Cancelled)?;
        encode_png(shot.width, shot.height, &pixels)
            .map_err(|e| CommandError::Failed(format!("PNG encoding failed: {e}")))
    })
    .await
    .map_err(|e| CommandError::Failed(format!("renderer panicked: {e}")))??;
    Ok(Output::bytes(png, mime::IMAGE_PNG))
}

fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct V3(f64, f64, f64);

impl Add for V3 {
    type Output = V3;
    fn add(self, o: V3) -> V3 {
        V3(self.0 + o.0, self.1 + o.1, self.2 + o.2)
    }
}

impl Sub for V3 {
    type Output = V3;
    fn sub(self, o: V3) -> V3 {
        V3(self.0 - o.0, self.1 - o.1, self.2 - o.2)
    }
}

impl Mul<f64> for V3 {
    type Output = V3;
    fn mul(self, k: f64) -> V3 {
        V3(self.0 * k, self.1 * k, self.2 * k)
    }
}

impl V3 {
    fn dot(self, o: V3) -> f64 {
        self.0 * o.0 + self.1 * o.1 + self.2 * o.2
    }
    fn cross(self, o: V3) -> V3 {
        V3(
            self.1 * o.2 - self.2 * o.1,
            self.2 * o.0 - self.0 * o.2,
            self.0 * o.1 - self.1 * o.0,
        )
    }
    fn unit(self) -> V3 {
        self * (1.0 / self.dot(self).sqrt())
    }
}

struct Sphere {
    center: V3,
    radius: f64,
    color: V3,
    /// Share of the colour that comes from the reflection.
    mirror: f64,
}

struct Scene {
    spheres: Vec<Sphere>,
    sun: V3,
}

enum Surface {
    Floor,
    Sphere(usize),
}

impl Scene {
    fn for_frame(frame: u32) -> Self {
        let bob = (frame as f64 * 0.5).sin() * 0.3;
        Scene {
            spheres: vec![
                Sphere {
                    center: V3(0.0, 1.0, 0.0),
                    radius: 1.0,
                    color: V3(0.85, 0.2, 0.15),
                    mirror: 0.25,
                },
                Sphere {
                    center: V3(-2.2, 0.7, 0.8),
                    radius: 0.7,
                    color: V3(0.15, 0.35, 0.9),
                    mirror: 0.1,
                },
                Sphere {
                    center: V3(2.0, 0.5, -0.6),
                    radius: 0.5,
                    color: V3(0.95, 0.75, 0.2),
                    mirror: 0.6,
                },
                Sphere {
                    center: V3(0.9, 0.55 + bob, 1.7),
                    radius: 0.3,
                    color: V3(0.2, 0.8, 0.3),
                    mirror: 0.0,
                },
            ],
            sun: V3(-0.5, 1.0, 0.6).unit(),
        }
    }

    fn hit(&self, origin: V3, dir: V3) -> Option<(f64, Surface)> {
        let mut best: Option<(f64, Surface)> = None;
        if dir.1 < -1e-9 {
            let t = -origin.1 / dir.1;
            if t > 1e-6 {
                best = Some((t, Surface::Floor));
            }
        }
        for (i, s) in self.spheres.iter().enumerate() {
            let oc = origin - s.center;
            let b = oc.dot(dir);
            let disc = b * b - (oc.dot(oc) - s.radius * s.radius);
            if disc < 0.0 {
                continue;
            }
            let t = -b - disc.sqrt();
            if t > 1e-6 && best.as_ref().is_none_or(|(bt, _)| t < *bt) {
                best = Some((t, Surface::Sphere(i)));
            }
        }
        best
    }

    fn trace(&self, origin: V3, dir: V3, depth: u32) -> V3 {
        let Some((t, surface)) = self.hit(origin, dir) else {
            let up = dir.1.max(0.0);
            return V3(0.95, 0.97, 1.0) * (1.0 - up) + V3(0.35, 0.55, 0.9) * up;
        };
        let point = origin + dir * t;
        let (normal, color, mirror) = match surface {
            Surface::Floor => {
                let check = ((point.0.floor() + point.2.floor()) as i64).rem_euclid(2) == 0;
                let color = if check {
                    V3(0.9, 0.9, 0.9)
                } else {
                    V3(0.25, 0.25, 0.28)
                };
                (V3(0.0, 1.0, 0.0), color, 0.1)
            }
            Surface::Sphere(i) => {
                let s = &self.spheres[i];
                ((point - s.center).unit(), s.color, s.mirror)
            }
        };
        let lift = point + normal * 1e-4;
        let lit = self.hit(lift, self.sun).is_none();
        let diffuse = if lit {
            normal.dot(self.sun).max(0.0)
        } else {
            0.0
        };
        let mut shade = color * (0.15 + 0.85 * diffuse);
        if mirror > 0.0 && depth < 3 {
            let reflected = dir - normal * (2.0 * dir.dot(normal));
            shade = shade * (1.0 - mirror) + self.trace(lift, reflected, depth + 1) * mirror;
        }
        if lit && matches!(surface, Surface::Sphere(_)) {
            let half = (self.sun - dir).unit();
            shade = shade + V3(1.0, 1.0, 1.0) * normal.dot(half).max(0.0).powi(60) * 0.6;
        }
        shade
    }
}

/// A small deterministic hash, so anti-aliasing jitter is the same every run.
fn jitter(x: u32, y: u32, s: u32) -> (f64, f64) {
    let mut h =
        x.wrapping_mul(0x9E37_79B1) ^ y.wrapping_mul(0x85EB_CA77) ^ s.wrapping_mul(0xC2B2_AE3D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    ((h & 0xFFFF) as f64 / 65536.0, (h >> 16) as f64 / 65536.0)
}

/// Renders RGB8 pixels, or `None` if cancelled part way.
fn render(shot: Shot, cancel: &CancellationToken, progress: &Progress) -> Option<Vec<u8>> {
    let scene = Scene::for_frame(shot.frame);
    let angle = shot.frame as f64 * 0.1;
    let eye = V3(6.0 * angle.sin(), 2.5, 6.0 * angle.cos());
    let target = V3(0.0, 0.8, 0.0);
    let forward = (target - eye).unit();
    let right = forward.cross(V3(0.0, 1.0, 0.0)).unit();
    let up = right.cross(forward);
    let (w, h) = (shot.width as f64, shot.height as f64);
    let scale = (50f64.to_radians() / 2.0).tan();
    let aspect = w / h;

    let mut pixels = Vec::with_capacity((shot.width * shot.height * 3) as usize);
    for y in 0..shot.height {
        if cancel.is_cancelled() {
            return None;
        }
        progress.percent(100.0 * y as f64 / shot.height as f64);
        for x in 0..shot.width {
            let mut sum = V3(0.0, 0.0, 0.0);
            for s in 0..shot.samples {
                let (jx, jy) = if shot.samples == 1 {
                    (0.5, 0.5)
                } else {
                    jitter(x, y, s)
                };
                let px = (2.0 * (x as f64 + jx) / w - 1.0) * aspect * scale;
                let py = (1.0 - 2.0 * (y as f64 + jy) / h) * scale;
                let dir = (forward + right * px + up * py).unit();
                sum = sum + scene.trace(eye, dir, 0);
            }
            let c = sum * (1.0 / shot.samples as f64);
            for channel in [c.0, c.1, c.2] {
                pixels.push((channel.clamp(0.0, 1.0).powf(1.0 / 2.2) * 255.0 + 0.5) as u8);
            }
        }
    }
    progress.percent(100.0);
    Some(pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shot(frame: u32) -> Shot {
        Shot {
            width: 48,
            height: 32,
            frame,
            samples: 2,
        }
    }

    #[test]
    fn same_parameters_give_same_image() {
        let cancel = CancellationToken::new();
        assert_eq!(
            render(shot(3), &cancel, &Progress::new()),
            render(shot(3), &cancel, &Progress::new())
        );
    }

    #[test]
    fn frames_differ() {
        let cancel = CancellationToken::new();
        assert_ne!(
            render(shot(1), &cancel, &Progress::new()),
            render(shot(2), &cancel, &Progress::new())
        );
    }

    #[test]
    fn image_is_not_blank() {
        let pixels = render(shot(1), &CancellationToken::new(), &Progress::new()).unwrap();
        let distinct: std::collections::BTreeSet<_> = pixels.chunks(3).collect();
        assert!(distinct.len() > 50, "only {} colours", distinct.len());
    }

    #[test]
    fn cancel_stops_rendering() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(render(shot(1), &cancel, &Progress::new()).is_none());
    }

    #[tokio::test]
    async fn run_returns_a_png_or_one_per_frame_of_a_chunk() {
        let params = serde_json::json!({"width": 16, "height": 8})
            .as_object()
            .unwrap()
            .clone();
        let mut ctx = RunContext {
            cancel: CancellationToken::new(),
            progress: Progress::new(),
            job_id: "test".into(),
            frames: Vec::new(),
            gpu: None,
            workdir: None,
            usage: Default::default(),
        };
        let out = run(&params, &ctx).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].mime, mime::IMAGE_PNG);
        let crate::job::Body::Bytes(bytes) = &out[0].body else {
            panic!("expected bytes")
        };
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

        ctx.frames = vec![4, 5, 6];
        let out = run(&params, &ctx).await.unwrap();
        let frames: Vec<_> = out.iter().map(|o| (o.frame, o.name.as_str())).collect();
        assert_eq!(
            frames,
            [
                (Some(4), "frame_0004"),
                (Some(5), "frame_0005"),
                (Some(6), "frame_0006")
            ]
        );
    }
}
