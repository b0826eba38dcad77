//! The web monitor in a real browser: Debian's Chromium, driven by
//! Playwright for Python (tests/fixtures/monitor_browser.py).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{AUDIT_AND_ASSETS, Backend, Farm, Settings, repo_path};

const LONG: Duration = Duration::from_secs(180);

/// Debian's Chromium, when it and Playwright are here. Under CI they must
/// be (`.ci/run` installs `chromium`, tests/requirements.txt Playwright);
/// elsewhere the test is skipped, saying what to install.
fn browser() -> Option<String> {
    // Playwright wants a path, not a name.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find_map(|name| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|file| file.is_file())
                .map(|file| file.display().to_string())
        });
    let playwright = Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .status()
        .is_ok_and(|s| s.success());
    match (chromium, playwright) {
        (Some(chromium), true) => Some(chromium),
        (None, _) => {
            crate::harness::skip(
                "Chromium",
                "Debian package `chromium`, which .ci/run installs",
            );
            None
        }
        (_, false) => {
            crate::harness::skip(
                "Playwright for Python",
                "PyPI package `playwright`, in tests/requirements.txt",
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_monitor_fills_an_array_grid_live_and_redrives_a_dead_letter() {
    let Some(chromium) = browser() else {
        return;
    };
    let farm = Farm::new(
        Backend::Local,
        Settings {
            max_receive_count: 1,
            extra_allowed: vec!["flaky"],
            // serve's own worker listens elsewhere: the renders queue fills
            // until the test starts a worker for it.
            worker_toml: "listen_queues = [\"idle\"]".into(),
            extra_toml: format!(
                r#"{AUDIT_AND_ASSETS}
[queues.idle]
backend = "local"
path = "idle"

[commands.flaky]
kind = "process"
program = "python3"
args = ["-c", "import os, sys; sys.exit(1 if os.path.exists('{{config_dir}}/broken') else 0)"]
"#
            ),
            ..Settings::default()
        },
    )
    .await;
    let worker_config = farm.config_variant("worker", |text| {
        text.replace(
            "listen_queues = [\"idle\"]",
            "listen_queues = [\"renders\"]",
        )
    });
    let serve = farm.serve(&[]).await;

    // A dead letter, made by a worker that runs only until it exists.
    let broken = farm.dir.path().join("broken");
    std::fs::write(&broken, b"").unwrap();
    let dead = farm.submit(json!({"command": "flaky"})).await;
    {
        let _worker = farm.spawn_with("worker", &[], &worker_config);
        farm.wait_for_events(|e| e["type"] == "JobDeadLettered", 1, LONG)
            .await;
    }
    std::fs::remove_file(&broken).unwrap();

    let output = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("monitor");
    let _ = std::fs::remove_dir_all(&output);
    std::fs::create_dir_all(&output).unwrap();
    let mut script = Command::new("python3")
        .arg(repo_path("tests/fixtures/monitor_browser.py"))
        .args([&farm.url().trim_end_matches('/').to_owned(), &chromium])
        .arg(&output)
        .arg(&dead)
        .spawn()
        .unwrap();
    // The page shows the array queued; then a worker renders it.
    let deadline = Instant::now() + LONG;
    while !output.join("ready").exists() {
        if let Some(status) = script.try_wait().unwrap() {
            panic!(
                "the browser script ended early ({status}); serve log:\n{}",
                serve.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the browser never opened the array page"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _worker = farm.spawn_with("worker", &[], &worker_config);
    let status = tokio::task::spawn_blocking(move || script.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "the browser script failed; serve log:\n{}",
        serve.log_text()
    );
    let screenshot = std::fs::read(output.join("array-page.png")).unwrap();
    assert!(screenshot.starts_with(b"\x89PNG"), "a PNG screenshot");
    println!("screenshot: {}", output.join("array-page.png").display());
}
