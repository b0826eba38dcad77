//! The README's command lines: every `renderq …` in its code blocks names a
//! subcommand that exists (checked with `--help`).

use crate::harness::{BIN, repo_path};

/// `renderq` command lines in the README's code blocks, and the lines of
/// its usage block (`renderq [--config PATH] … <command>` followed by one
/// subcommand per line).
fn command_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    let (mut in_block, mut shell) = (false, false);
    let mut in_usage = false;
    let mut lines = Vec::new();
    for line in readme.lines() {
        if let Some(fence) = line.trim_start().strip_prefix("```") {
            in_block = !in_block;
            shell = fence == "sh";
            in_usage = false;
            continue;
        }
        if !in_block {
            continue;
        }
        // A command: a line of a `sh` block, or one after a `$ ` prompt
        // (the rest of such blocks is output).
        let trimmed = line.trim_start();
        let command = match trimmed.strip_prefix("$ ") {
            Some(prompted) => prompted,
            None if shell || trimmed.starts_with("renderq [") => trimmed,
            None => "",
        };
        match command.strip_prefix("renderq ") {
            Some(rest) if rest.starts_with('[') => in_usage = true,
            Some(rest) => lines.push(rest.to_owned()),
            // Usage lines: a subcommand at the start; descriptions indented.
            None if in_usage && !line.starts_with(' ') && !line.is_empty() => {
                lines.push(line.to_owned())
            }
            None => {}
        }
    }
    lines
}

/// The subcommand path a line starts with.
fn subcommand_path(line: &str) -> Vec<&str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [group @ ("queue" | "dlq" | "events"), sub, ..] => vec![group, sub],
        [first, ..] => vec![first],
        [] => vec![],
    }
}

#[test]
fn every_readme_command_line_names_a_real_subcommand() {
    let lines = command_lines();
    assert!(lines.len() >= 10, "{lines:?}");
    for line in lines {
        let path = subcommand_path(&line);
        let out = std::process::Command::new(BIN)
            .args(&path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`renderq {}` is not a command (from `{line}`): {}",
            path.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The README's curl example, sent as written to `serve` running on a copy
/// of the repository's `workers.toml` (on a free port), lands its PNG where
/// the README says.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_curl_example_renders_where_it_says() {
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    let start = readme.find("curl -s http://127.0.0.1:8080/").unwrap();
    let body_start = start + readme[start..].find("-d '").unwrap() + 4;
    let body_end = body_start + readme[body_start..].find("}'").unwrap() + 1;
    let body = &readme[body_start..body_end];

    let dir = tempfile::tempdir().unwrap();
    let port = crate::harness::free_port();
    let config = std::fs::read_to_string(repo_path("workers.toml"))
        .unwrap()
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    let path = dir.path().join("workers.toml");
    std::fs::write(&path, config).unwrap();
    let mut serve = std::process::Command::new(crate::harness::BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let reply: serde_json::Value = loop {
        match client
            .post(&url)
            .header("Content-Type", "application/json")
            .body(body.to_owned())
            .send()
            .await
        {
            Ok(response) => break response.json().await.unwrap(),
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("serve never answered: {e}"),
        }
    };
    let id = reply["result"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"));
    let png = dir
        .path()
        .join(format!("var/results/renders/demo-{id}.png"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !png.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            png.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = serve.kill();
    let _ = serve.wait();
}

/// The fenced blocks of the README section that starts with `heading`
/// (up to the next `## `): `(language, text)`, list indentation removed.
fn section_blocks(heading: &str) -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    let start = readme.find(heading).unwrap_or_else(|| panic!("{heading}"));
    let end = readme[start..]
        .find("\n## ")
        .map_or(readme.len(), |at| start + at);
    let mut blocks = Vec::new();
    let mut open: Option<(String, String, usize)> = None;
    for line in readme[start..end].lines() {
        let indent = line.len() - line.trim_start().len();
        match (line.trim_start().strip_prefix("```"), open.take()) {
            (Some(fence), None) => open = Some((fence.to_owned(), String::new(), indent)),
            (Some(_), Some((lang, text, _))) => blocks.push((lang, text)),
            (None, Some((lang, mut text, indent))) => {
                text.push_str(line.get(indent..).unwrap_or(""));
                text.push('\n');
                open = Some((lang, text, indent));
            }
            (None, None) => {}
        }
    }
    blocks
}

/// Applies a README TOML block to a config: a block whose every key is a
/// line of the config replaces those lines ("change these lines"); any
/// other block is appended ("add").
fn apply_toml(config: &str, block: &str) -> String {
    let key = |line: &str| line.split_once(" = ").map(|(k, _)| k.trim().to_owned());
    let keys: Vec<String> = block.lines().filter_map(key).collect();
    let replaces = !keys.is_empty()
        && block.lines().all(|l| key(l).is_some())
        && keys
            .iter()
            .all(|k| config.lines().any(|l| l.starts_with(&format!("{k} = "))));
    if !replaces {
        return format!("{config}\n{block}");
    }
    config
        .lines()
        .map(|line| {
            block
                .lines()
                .find(|b| key(b).is_some_and(|k| line.starts_with(&format!("{k} = "))))
                .unwrap_or(line)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The README's "From Blender" steps as written, in a folder laid out as
/// a clone (the repository's `workers.toml`, on a free port, beside
/// `examples/`): its TOML changes applied, its shell lines run in order,
/// with three stand-ins: `pip install ./clients/python` is the client's
/// source on `PYTHONPATH`, `renderq serve` is started here (and waited
/// for), and 240 frames are 8, to keep the suite quick.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_blender_steps_render_in_a_fresh_clone() {
    if !crate::blender::have_blender() {
        return;
    }
    let blocks = section_blocks("### From Blender");
    let dir = tempfile::tempdir().unwrap();
    let port = crate::harness::free_port();
    let mut config = std::fs::read_to_string(repo_path("workers.toml"))
        .unwrap()
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    for (_, block) in blocks.iter().filter(|(lang, _)| lang == "toml") {
        config = apply_toml(&config, block);
    }
    std::fs::write(dir.path().join("workers.toml"), &config).unwrap();
    std::os::unix::fs::symlink(repo_path("examples"), dir.path().join("examples")).unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(BIN, bin.join("renderq")).unwrap();
    let submit = bin.join("renderq-submit-blender");
    std::fs::write(
        &submit,
        "#!/bin/sh\nexec python3 -m renderq_client.blender \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&submit, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let env = [
        ("PATH", path.as_str()),
        ("PYTHONPATH", &repo_path("clients/python/src")),
        ("RENDERQ_URL", &format!("http://127.0.0.1:{port}/")),
        (
            "XDG_CACHE_HOME",
            &dir.path().join("cache").display().to_string(),
        ),
    ];

    let mut serve = None;
    let mut submitted = String::new();
    let lines: Vec<String> = blocks
        .iter()
        .filter(|(lang, _)| lang == "sh")
        .flat_map(|(_, text)| text.lines().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert!(lines.len() >= 4, "{lines:?}");
    for line in lines {
        if line.starts_with("python3 -m pip install ./clients/python") {
            continue;
        }
        if line.trim() == "renderq serve" {
            let mut command = std::process::Command::new(BIN);
            command.arg("serve").current_dir(dir.path()).envs(env);
            serve = Some(crate::harness::Server(crate::harness::spawn_owned(command)));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(std::time::Instant::now() < deadline, "serve did not start");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            continue;
        }
        let line = line.replace("--frames 1-240", "--frames 1-8");
        let out = std::process::Command::new("bash")
            .args(["-c", &line])
            .current_dir(dir.path())
            .envs(env)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`{line}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if line.starts_with("renderq-submit-blender") {
            submitted = String::from_utf8_lossy(&out.stdout).into_owned();
        }
    }
    assert!(serve.is_some(), "the README starts `renderq serve`");
    let outcome: serde_json::Value =
        serde_json::from_str(submitted.lines().next().unwrap_or_default()).unwrap();
    let job = outcome["job_id"].as_str().unwrap();
    for frame in 1..=8 {
        let png = dir
            .path()
            .join(format!("var/results/renders/{job}/{frame}.png"));
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert_eq!(crate::harness::png_size(&bytes), (64, 36));
    }
}
