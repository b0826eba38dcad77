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
