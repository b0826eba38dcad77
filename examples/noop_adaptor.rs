//! The smallest renderq adaptor: answers every `run` at once with an empty
//! JSON result. It measures renderq's own dispatch overhead in
//! `renderq bench --dispatch --adaptor target/release/examples/noop_adaptor`
//! and shows the protocol in a few lines (see the README for all of it).

use std::io::{BufRead, Write};

use serde_json::{Value, json};

fn main() -> std::io::Result<()> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let message: Value = match serde_json::from_str(&line?) {
            Ok(message) => message,
            Err(error) => {
                eprintln!("noop_adaptor: not JSON: {error}");
                continue;
            }
        };
        let answer = match message["type"].as_str() {
            Some("init") => json!({"type": "ready"}),
            // Every answer echoes the id of its run.
            Some("run") => json!({"type": "result", "id": message["id"], "json": {}}),
            // Every run was answered at once: a `cancel` always comes
            // after its answer, and gets none.
            Some("cancel") => continue,
            Some("stop") => {
                writeln!(stdout, "{}", json!({"type": "stopped"}))?;
                return stdout.flush();
            }
            _ => continue,
        };
        writeln!(stdout, "{answer}")?;
        stdout.flush()?;
    }
    Ok(())
}
