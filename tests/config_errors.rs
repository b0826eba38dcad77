//! A broken workers.toml stops every command with the file, line and key.

use std::process::Command;

use crate::harness::BIN;

fn run(args: &[&str], config: &std::path::Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn repo_config() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/workers.toml")).unwrap()
}

#[test]
fn repo_workers_toml_checks_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    std::fs::write(&path, repo_config()).unwrap();
    let out = crate::harness::renderq_ok(&["check-config"], &path, &[]);
    assert!(out.contains("ok"));
}

#[test]
fn every_command_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    let broken = repo_config().replace("slots = 1", "slots = 1\nslotz = 2");
    std::fs::write(&path, &broken).unwrap();
    let line = broken.lines().position(|l| l == "slotz = 2").unwrap() + 1;
    for args in [
        &["check-config"][..],
        &["serve"],
        &["worker"],
        &["queue", "stats"],
        &["dlq", "list"],
    ] {
        let (code, stderr) = run(args, &path);
        assert_ne!(code, 0, "{args:?} should fail");
        let expected = format!("{}:{line}: `worker.slotz`", path.display());
        assert!(stderr.contains(&expected), "{args:?}: {stderr}");
    }
}

#[test]
fn dangling_reference_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    let broken = repo_config().replace("listen_queue = \"renders\"", "listen_queue = \"rendrs\"");
    std::fs::write(&path, &broken).unwrap();
    let (code, stderr) = run(&["check-config"], &path);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("`queue_manager.listen_queue`") && stderr.contains("rendrs"),
        "{stderr}"
    );
}

#[test]
fn missing_token_variable_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    let config = repo_config().replace("# auth_token_env", "auth_token_env");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env_remove("RENDERQ_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server.auth_token_env") && stderr.contains("RENDERQ_TOKEN"),
        "{stderr}"
    );
}

#[test]
fn unusable_work_dir_is_reported_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    std::fs::write(dir.path().join("a-file"), "").unwrap();
    for work_dir in ["no/such/folder", "a-file"] {
        let config = repo_config().replace(
            "slots = 1",
            &format!("slots = 1\nwork_dir = \"{work_dir}\""),
        );
        std::fs::write(&path, &config).unwrap();
        let line = config
            .lines()
            .position(|l| l.starts_with("work_dir"))
            .unwrap()
            + 1;
        for args in [&["check-config"][..], &["worker"]] {
            let (code, stderr) = run(args, &path);
            assert_ne!(code, 0, "{work_dir}: {args:?} should fail");
            let expected = format!("{}:{line}: `worker.work_dir`", path.display());
            assert!(
                stderr.contains(&expected) && stderr.contains(work_dir),
                "{work_dir}: {args:?}: {stderr}"
            );
        }
    }
}

#[test]
fn unknown_allowed_command_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    let broken = repo_config().replace("\"render_demo\"]", "\"render_demo\", \"rm_rf\"]");
    std::fs::write(&path, &broken).unwrap();
    let line = broken.lines().position(|l| l.contains("rm_rf")).unwrap() + 1;
    let (code, stderr) = run(&["check-config"], &path);
    assert_ne!(code, 0);
    let expected = format!(
        "{}:{line}: `queue_manager.allow_commands[3]`",
        path.display()
    );
    assert!(
        stderr.contains(&expected) && stderr.contains("rm_rf"),
        "{stderr}"
    );
}

#[test]
fn sizes_are_written_with_units_and_a_bad_one_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    let sized = repo_config()
        .replace("max_body_bytes = 262144", "max_body_bytes = \"256KiB\"")
        .replace(
            "[worker]\n",
            "[worker]\ncache = { max_size = \"100GiB\" }\n",
        );
    std::fs::write(&path, &sized).unwrap();
    let out = crate::harness::renderq_ok(&["check-config"], &path, &[]);
    assert!(out.contains("ok"), "{out}");

    let broken = sized.replace("\"256KiB\"", "\"256 KiBs\"");
    std::fs::write(&path, &broken).unwrap();
    let line = (broken.lines())
        .position(|l| l.starts_with("max_body_bytes"))
        .unwrap()
        + 1;
    let (code, stderr) = run(&["check-config"], &path);
    assert_ne!(code, 0);
    let expected = format!("{}:{line}: `server.max_body_bytes`", path.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("`256 KiBs` is not a size"), "{stderr}");
}
