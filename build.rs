//! Links `renderq` with packed relative relocations (`-z pack-relative-relocs`,
//! DT_RELR) where the toolchain and the C library support them.
//!
//! The binary is position-independent, and its tens of thousands of relative
//! relocations otherwise take 1.7 MB of `.rela.dyn` that the loader reads
//! into every process at start: about a tenth of an idle worker's resident
//! memory. Packed, they take 20 KB. Support needs binutils 2.38 and glibc
//! 2.36, so a probe program is linked and run first; elsewhere the binary is
//! linked as before.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let (Ok(target), Ok(host)) = (env::var("TARGET"), env::var("HOST")) else {
        return;
    };
    // The probe must run here, so only native Linux builds try it.
    if target != host || !target.contains("-linux-gnu") {
        return;
    }
    if probe().unwrap_or(false) {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    }
}

/// Whether a program linked with the flag builds and runs on this machine.
fn probe() -> std::io::Result<bool> {
    let dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = dir.join("relr_probe.c");
    let program = dir.join("relr_probe");
    std::fs::write(&source, "int main(void) { return 0; }\n")?;
    let linker = env::var("RUSTC_LINKER").unwrap_or_else(|_| "cc".into());
    let linked = Command::new(linker)
        .args(["-fPIE", "-pie", FLAG, "-o"])
        .arg(&program)
        .arg(&source)
        .output()?;
    if !linked.status.success() || !linked.stderr.is_empty() {
        // A linker that warns about the flag would ignore it anyway.
        return Ok(false);
    }
    Ok(Command::new(&program).status()?.success())
}
