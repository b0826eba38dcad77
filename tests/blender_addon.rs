//! The Blender add-on (`clients/blender/`) in Debian's Blender, loaded with
//! `--addons`, against an embedded farm whose `assets` bucket is on moto
//! behind a proxy that counts the client's requests: "Submit to renderq"
//! renders a scene whose texture lies outside its folder; an unchanged
//! scene uploads nothing; a changed texture uploads that file alone; a
//! missing texture or a refused command stops the submit before any upload.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::blender::{blender_render_toml, have_blender, make_scene_in};
use crate::harness::{AWS_ENV, Aws, Backend, Farm, Moto, Server, Settings, repo_path};

const LONG: Duration = Duration::from_secs(300);

/// A farm with `blender_render`, its `assets` bucket on moto; the counting
/// proxy in front of that bucket (for the client) and its count file.
struct AddonFarm {
    farm: Farm,
    bucket: String,
    proxy: String,
    count: PathBuf,
    _proxy: Server,
}

async fn addon_farm() -> AddonFarm {
    let moto = Moto::shared();
    let bucket = Aws::create(&moto.endpoint(), 3).await.bucket;
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_allowed: vec!["blender_render"],
            worker_toml: "slots = 2".into(),
            extra_toml: format!(
                r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"

[buckets.assets]
backend = "s3"
bucket = "{bucket}"
endpoint_url = "{endpoint}"
region = "us-east-1"
{render}"#,
                endpoint = moto.endpoint(),
                render = blender_render_toml(),
            ),
            ..Settings::default()
        },
    )
    .await;
    let count = farm.dir.path().join("s3-requests.json");
    let (proxy, server) = Server::python(
        "tests/fixtures/s3_count_proxy.py",
        &[
            &moto.port.to_string(),
            &bucket,
            "0",
            "0",
            count.to_str().unwrap(),
        ],
    );
    AddonFarm {
        farm,
        bucket,
        proxy,
        count,
        _proxy: server,
    }
}

impl AddonFarm {
    /// PUTs the client sent to the bucket so far.
    fn puts(&self) -> u64 {
        std::fs::read_to_string(&self.count)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|c| c["by_method"]["PUT"].as_u64())
            .unwrap_or(0)
    }

    /// The environment Blender and the client run in: the add-on where
    /// `--addons` finds it, the client's source, moto's credentials, and a
    /// cache of farm copies of its own.
    fn env(&self) -> Vec<(String, String)> {
        let scripts = self.farm.dir.path().join("blender-scripts");
        let addons = scripts.join("addons");
        if !addons.exists() {
            std::fs::create_dir_all(&addons).unwrap();
            std::os::unix::fs::symlink(
                repo_path("clients/blender/renderq_blender"),
                addons.join("renderq_blender"),
            )
            .unwrap();
        }
        let mut env: Vec<(String, String)> = AWS_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.extend([
            ("AWS_DEFAULT_REGION".into(), "us-east-1".into()),
            ("BLENDER_USER_SCRIPTS".into(), scripts.display().to_string()),
            ("PYTHONPATH".into(), repo_path("clients/python/src")),
            ("RENDERQ_PYTHON".into(), "python3".into()),
            (
                "XDG_CACHE_HOME".into(),
                self.farm.dir.path().join("cache").display().to_string(),
            ),
        ]);
        env
    }

    /// "Submit to renderq" on `scene`, with the panel's settings filled in
    /// (and `command`): the operator's reports, from Blender's output.
    fn operator(&self, scene: &Path, command: &str) -> String {
        let expr = format!(
            r#"
import bpy
s = bpy.context.scene.renderq
s.url = "{url}"
s.bucket = "assets"
s.bucket_url = "s3://{bucket}"
s.endpoint_url = "{proxy}"
s.command = "{command}"
s.frames = "1-10"
s.chunk_size = 5
try:
    print("OPERATOR", bpy.ops.renderq.submit())
except RuntimeError as e:
    print("OPERATOR", "refused")
"#,
            url = self.farm.url(),
            bucket = self.bucket,
            proxy = self.proxy,
        );
        let out = Command::new("blender")
            .args(["-b", "--factory-startup", "--addons", "renderq_blender"])
            .arg(scene)
            .args(["--python-expr", &expr])
            .envs(self.env())
            .output()
            .expect("run blender");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.contains("OPERATOR"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// `renderq-submit-blender SCENE --frames 1-10 --chunk 5 ARGS`.
    fn submit_cli(&self, scene: &Path, args: &[&str]) -> Output {
        Command::new("python3")
            .args(["-m", "renderq_client.blender"])
            .arg(scene)
            .args([
                "--frames",
                "1-10",
                "--chunk",
                "5",
                "--url",
                &self.farm.url(),
            ])
            .args(["--bucket-url", &format!("s3://{}", self.bucket)])
            .args(["--endpoint-url", &self.proxy])
            .args(args)
            .envs(self.env())
            .output()
            .expect("run renderq-submit-blender")
    }
}

/// A 32×18 shot whose texture is outside the scene's folder, named by an
/// absolute path: `artist/shot/scene.blend` and `artist/library/checker.png`.
fn shot_with_outside_texture(root: &Path) -> (PathBuf, PathBuf) {
    let shot = root.join("artist/shot");
    make_scene_in(&shot, 32, 2);
    let library = root.join("artist/library");
    std::fs::create_dir_all(&library).unwrap();
    let texture = library.join("checker.png");
    std::fs::rename(shot.join("textures/checker.png"), &texture).unwrap();
    std::fs::remove_dir(shot.join("textures")).unwrap();
    let scene = shot.join("scene.blend");
    let moved = Command::new("blender")
        .args(["-b", "--factory-startup"])
        .arg(&scene)
        .args(["--python-expr", &format!(
            "import bpy; bpy.data.images['checker'].filepath = {:?}; bpy.ops.wm.save_mainfile()",
            texture.display().to_string()
        )])
        .output()
        .unwrap();
    assert!(moved.status.success());
    (scene, texture)
}

/// Pixels of a PNG that are the checker's blue, and that are Cycles'
/// missing-texture magenta.
fn blue_and_magenta(png: &[u8]) -> (usize, usize) {
    let image = image::load_from_memory(png).unwrap().to_rgb8();
    let (mut blue, mut magenta) = (0, 0);
    for p in image.pixels() {
        let [r, g, b] = p.0.map(i32::from);
        if b > 60 && b > r + 30 && b > g + 10 {
            blue += 1;
        }
        if r > 150 && b > 150 && g < 90 {
            magenta += 1;
        }
    }
    (blue, magenta)
}

/// The job id in the operator's report (`renderq: job ID (...)`).
fn reported_job(text: &str) -> String {
    let at = text
        .find("renderq: job ")
        .unwrap_or_else(|| panic!("{text}"));
    text[at + 13..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_addon_submits_a_scene_with_an_outside_texture_and_the_farm_renders_it() {
    if !have_blender() {
        return;
    }
    let farm = addon_farm().await;
    let (scene, texture) = shot_with_outside_texture(farm.farm.dir.path());
    let _serve = farm.farm.serve(&AWS_ENV).await;

    // A command the farm refuses: the JSON-RPC error in the report area,
    // nothing uploaded.
    let refused = farm.operator(&scene, "no_such_command");
    assert!(refused.contains("OPERATOR refused"), "{refused}");
    assert!(
        refused.contains("no_such_command") && refused.contains("field command"),
        "{refused}"
    );
    assert_eq!(farm.puts(), 0, "nothing uploaded for a refused submit");

    let text = farm.operator(&scene, "blender_render");
    assert!(text.contains("OPERATOR {'FINISHED'}"), "{text}");
    let job = reported_job(&text);
    // The scene, the texture and the manifest.
    assert_eq!(farm.puts(), 3, "{text}");
    let done = farm
        .farm
        .wait_for_events(
            |e| e["type"] == "ArrayJobCompleted" && e["job_id"] == job.as_str(),
            1,
            LONG,
        )
        .await;
    assert_eq!(done[0]["detail"]["succeeded"], 2, "{done:?}");
    for frame in 1..=10 {
        let (png, _) = farm
            .farm
            .object(&format!("renders/{job}/{frame}.png"))
            .await
            .unwrap_or_else(|| panic!("frame {frame} missing"));
        assert_eq!(crate::harness::png_size(&png), (32, 18));
        let (blue, magenta) = blue_and_magenta(&png);
        assert!(blue > 0, "frame {frame}: the texture's blue is not there");
        assert_eq!(magenta, 0, "frame {frame}: Blender found no texture");
    }

    // The same scene again, from the shell: nothing uploaded.
    let again = farm.submit_cli(&scene, &[]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let outcome: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(outcome["uploaded"], serde_json::json!([]), "{outcome}");
    assert_eq!(farm.puts(), 3, "{outcome}");

    // One texture changed: that file (and the new manifest) alone.
    let mut changed = image::RgbImage::new(16, 16);
    for p in changed.pixels_mut() {
        *p = image::Rgb([20, 200, 40]);
    }
    changed.save(&texture).unwrap();
    let hash = format!(
        "{:032x}",
        xxhash_rust::xxh3::xxh3_128(&std::fs::read(&texture).unwrap())
    );
    let third = farm.submit_cli(&scene, &[]);
    assert!(
        third.status.success(),
        "{}",
        String::from_utf8_lossy(&third.stderr)
    );
    let outcome: Value = serde_json::from_slice(&third.stdout).unwrap();
    let uploaded = outcome["uploaded"].as_array().unwrap();
    assert_eq!(uploaded.len(), 2, "{outcome}");
    assert_eq!(uploaded[0], format!("Data/{hash}.xxh128"), "{outcome}");
    assert!(uploaded[1].as_str().unwrap().starts_with("Manifests/"));
    assert_eq!(farm.puts(), 5, "{outcome}");

    // A missing texture: named, and refused unless --allow-missing.
    std::fs::remove_file(&texture).unwrap();
    let missing = farm.submit_cli(&scene, &[]);
    assert!(!missing.status.success());
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(said.contains("Missing files: checker"), "{said}");
    assert!(said.contains("--allow-missing"), "{said}");
    assert_eq!(farm.puts(), 5);
    let anyway = farm.submit_cli(&scene, &["--allow-missing"]);
    assert!(
        anyway.status.success(),
        "{}",
        String::from_utf8_lossy(&anyway.stderr)
    );
}

/// `clients/blender/make_zip.py`'s zip installs and enables from
/// preferences (as Edit › Preferences › Add-ons › Install… does), and
/// brings the operator and the panel.
#[test]
fn the_addon_zip_installs_from_preferences() {
    if !have_blender() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("renderq_blender.zip");
    let made = Command::new("python3")
        .arg(repo_path("clients/blender/make_zip.py"))
        .arg(&zip)
        .output()
        .unwrap();
    assert!(made.status.success());
    let expr = format!(
        "import bpy\n\
         bpy.ops.preferences.addon_install(filepath={zip:?})\n\
         bpy.ops.preferences.addon_enable(module='renderq_blender')\n\
         print('INSTALLED', hasattr(bpy.types, 'RENDER_PT_renderq'), \
               bpy.ops.renderq.submit.get_rna_type().name)",
        zip = zip.display().to_string()
    );
    let out = Command::new("blender")
        .args(["-b", "--factory-startup", "--python-expr", &expr])
        .env("BLENDER_USER_SCRIPTS", dir.path().join("scripts"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("INSTALLED True Submit to renderq"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
