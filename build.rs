//! Link settings for the `renderq` executable, each applied only where a
//! probe shows the toolchain takes it (elsewhere the binary links as
//! before):
//!
//! - **Packed relative relocations** (`-z pack-relative-relocs`, DT_RELR).
//!   The binary is position-independent, and its tens of thousands of
//!   relative relocations otherwise take 1.7 MB of `.rela.dyn` that the
//!   loader reads into every process at start. Packed, they take 20 KB.
//!   Support needs binutils 2.38 and glibc 2.36: a C program is linked with
//!   the flag and run.
//! - **Start-up code first** (release builds): the functions an idle worker
//!   and `serve` run, listed in `deploy/startup/symbols.txt`, are laid out
//!   together at the start of the text (lld's `--symbol-ordering-file`,
//!   the linker rustc uses by default on x86-64 Linux). Scattered, they
//!   touched about 150 different 64 KiB stretches of the 38 MB text, and
//!   the kernel maps each such stretch whole on its first use: 12.5 MB of
//!   an idle worker's 19 MB resident. Names the list has that the binary
//!   lacks are skipped. Function names carry hashes of the crate, which
//!   change with the rustc version and with Cargo.lock: after either,
//!   run `deploy/startup/regenerate.sh` again. A small Rust program is
//!   linked with the flags, the way this crate will be.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const RELR: &str = "-Wl,-z,pack-relative-relocs";
const ORDER: &str = "deploy/startup/symbols.txt";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={ORDER}");
    let (Ok(target), Ok(host)) = (env::var("TARGET"), env::var("HOST")) else {
        return;
    };
    // The probes must run here, so only native Linux builds try them.
    if target != host || !target.contains("-linux-gnu") {
        return;
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    if probe_c(&out).unwrap_or(false) {
        println!("cargo:rustc-link-arg-bins={RELR}");
    }
    let order = Path::new(&env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it")).join(ORDER);
    if env::var("PROFILE").as_deref() == Ok("release") && order.is_file() {
        let flags = [
            format!("-Wl,--symbol-ordering-file={}", order.display()),
            "-Wl,--no-warn-symbol-ordering".to_owned(),
        ];
        if probe_rust(&out, &target, &flags).unwrap_or(false) {
            for flag in flags {
                println!("cargo:rustc-link-arg-bins={flag}");
            }
        }
    }
}

/// Whether a C program linked with the RELR flag builds and runs here.
fn probe_c(dir: &Path) -> std::io::Result<bool> {
    let source = dir.join("relr_probe.c");
    let program = dir.join("relr_probe");
    std::fs::write(&source, "int main(void) { return 0; }\n")?;
    let linker = env::var("RUSTC_LINKER").unwrap_or_else(|_| "cc".into());
    let linked = Command::new(linker)
        .args(["-fPIE", "-pie", RELR, "-o"])
        .arg(&program)
        .arg(&source)
        .output()?;
    if !linked.status.success() || !linked.stderr.is_empty() {
        // A linker that warns about the flag would ignore it anyway.
        return Ok(false);
    }
    Ok(Command::new(&program).status()?.success())
}

/// Whether rustc, with this build's own flags, links a program given
/// `flags` without a word of complaint.
fn probe_rust(dir: &Path, target: &str, flags: &[String]) -> std::io::Result<bool> {
    let source = dir.join("order_probe.rs");
    std::fs::write(&source, "fn main() {}\n")?;
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut command = Command::new(rustc);
    command.args(["--edition", "2021", "--target", target, "-o"]);
    command.arg(dir.join("order_probe")).arg(&source);
    // The linker this build will use: a configured one, and the flags.
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        command.arg("-C").arg(format!("linker={linker}"));
    }
    let encoded = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    command.args(encoded.split('\x1f').filter(|f| !f.is_empty()));
    for flag in flags {
        command.arg("-C").arg(format!("link-arg={flag}"));
    }
    let linked = command.output()?;
    Ok(linked.status.success() && linked.stderr.is_empty())
}
