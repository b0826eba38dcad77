//! The web monitor in a real browser: Debian's Chromium, driven by
//! Playwright for Python (tests/fixtures/monitor_browser.py).

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{AUDIT_AND_ASSETS, BIN, Backend, Farm, Proc, Settings, free_port, repo_path};

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

/// Without `[metrics] ui`, a worker's metrics port has no monitor, even
/// with a token on the endpoint; with it, the monitor there asks for the
/// endpoint's token first.
#[tokio::test(flavor = "multi_thread")]
async fn a_workers_metrics_port_serves_the_monitor_only_when_asked_and_behind_sign_in() {
    let metrics_port = free_port();
    let farm = Farm::new(
        Backend::Local,
        Settings {
            auth_token_env: Some("RENDERQ_TEST_TOKEN"),
            extra_toml: format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
            ..Settings::default()
        },
    )
    .await;
    let token = [("RENDERQ_TEST_TOKEN", "s3cret")];
    let base = format!("http://127.0.0.1:{metrics_port}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: &str| http.get(format!("{base}{path}")).send();
    {
        let worker = farm.spawn("worker", &token);
        worker.wait_for_log("Serving /metrics.", LONG);
        assert_eq!(get("/metrics").await.unwrap().status(), 200);
        assert_eq!(get("/healthz").await.unwrap().status(), 200);
        for path in ["/ui", "/ui/jobs", "/ui/dead", "/ui/live", "/ui/login"] {
            assert_eq!(get(path).await.unwrap().status(), 404, "{path}");
        }
    }
    let config = farm.config_variant("monitor", |text| {
        text.replace("[metrics]\n", "[metrics]\nui = \"read-only\"\n")
    });
    let worker = farm.spawn_with("worker", &token, &config);
    worker.wait_for_log("Serving /metrics.", LONG);
    for path in ["/ui", "/ui/jobs", "/ui/dead", "/ui/live"] {
        let response = get(path).await.unwrap();
        assert_eq!(response.status(), 303, "{path}");
        assert_eq!(response.headers()["location"], "/ui/login", "{path}");
    }
    let sign_in = |token: &'static str| {
        http.post(format!("{base}/ui/login"))
            .header("origin", &base)
            .form(&[("token", token)])
            .send()
    };
    assert_eq!(sign_in("wrong").await.unwrap().status(), 401);
    let signed = sign_in("s3cret").await.unwrap();
    assert_eq!(signed.status(), 303);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap();
    let session = cookie.split(';').next().unwrap().to_owned();
    let page = http
        .get(format!("{base}/ui"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Overview"));
}

/// Raises this test process's open-file limit to its hard limit (its
/// sockets), and says whether `needed` descriptors fit.
fn raise_own_open_file_limit(needed: u64) -> bool {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard >= needed
}

/// `renderq serve` on the farm's config, started with an open-file soft
/// limit of `soft`; returns once it answers `/healthz`.
async fn serve_with_soft_limit(farm: &Farm, soft: u32) -> Proc {
    let log = farm.dir.path().join("serve-limited.log");
    let child = Command::new("sh")
        .args(["-c", &format!("ulimit -Sn {soft} && exec \"$0\" \"$@\"")])
        .arg(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&farm.config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let serve = Proc { child, log };
    let deadline = Instant::now() + LONG;
    while !reqwest::get(format!("{}healthz", farm.url()))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "serve never became healthy:\n{}",
            serve.log_text()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    serve
}

/// A process's open-file limits (soft, hard), from /proc.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut numbers = line["Max open files".len()..].split_whitespace();
    (
        numbers.next().unwrap().to_owned(),
        numbers.next().unwrap().to_owned(),
    )
}

/// Opens `/ui/live` on a raw socket; the answer's status code and the
/// socket (kept open while the stream lasts).
async fn open_live(port: u16) -> (u16, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!("GET /ui/live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        assert_eq!(socket.read(&mut byte).await.unwrap(), 1, "the answer ended");
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {line}"));
    (status, socket)
}

/// 2,000 live pages at once: the first 256 (`server.max_live_streams`'s
/// default) stream, the rest get 503 (and their connections are closed),
/// and a job submitted while they are all open runs and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_live_pages_get_503_past_the_cap_and_a_job_still_succeeds() {
    const PAGES: usize = 2000;
    const CAP: usize = 256;
    assert!(
        raise_own_open_file_limit(PAGES as u64 + 256),
        "this test needs {} open files (the hard limit, `ulimit -Hn`, is lower)",
        PAGES + 256
    );
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: AUDIT_AND_ASSETS.into(),
            ..Settings::default()
        },
    )
    .await;
    // As a login shell leaves it: a soft limit far below the hard one.
    let serve = serve_with_soft_limit(&farm, 1024).await;
    let (soft, hard) = open_file_limits(serve.child.id());
    assert_eq!(soft, hard, "serve raised its soft limit to the hard limit");
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..PAGES {
        let (status, socket) = open_live(farm.port).await;
        match status {
            200 => open.push(socket),
            503 => refused += 1,
            other => panic!("/ui/live answered {other}"),
        }
    }
    assert_eq!((open.len(), refused), (CAP, PAGES - CAP));
    let id = farm.submit(json!({"command": "get_version"})).await;
    let done = farm
        .wait_for_events(
            |e| e["message_id"] == id.as_str() && e["type"] == "JobSucceeded",
            1,
            LONG,
        )
        .await;
    assert_eq!(done.len(), 1);
    // Still capped, and a page that closes frees its place.
    assert_eq!(open_live(farm.port).await.0, 503);
    drop(open.pop());
    let deadline = Instant::now() + LONG;
    while open_live(farm.port).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "a closed page's stream stays taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !serve.log_text().contains("Too many open files"),
        "{}",
        serve.log_text()
    );
}

/// The monitor on a metrics port other machines reach needs a token, as
/// the endpoint does: without one the worker does not start.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_will_not_show_the_monitor_to_the_network_without_a_token() {
    let port = free_port();
    let farm = Farm::new(
        Backend::Local,
        Settings {
            extra_toml: format!("[metrics]\nlisten = \"0.0.0.0:{port}\"\nui = \"read-only\"\n"),
            ..Settings::default()
        },
    )
    .await;
    let mut worker = farm.spawn("worker", &[]);
    let code = worker.wait_exit(LONG);
    assert_ne!(code, Some(0), "{}", worker.log_text());
    assert!(code.is_some(), "the worker died by a signal");
    let log = worker.log_text();
    assert!(
        log.contains("metrics.listen") && log.contains("auth_token_env"),
        "{log}"
    );
}
