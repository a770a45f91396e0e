//! Builds the bare-metal tier-2 test guest (test-guest/guest.S) with binutils `as` + `ld`
//! into `$OUT_DIR/test-guest.elf`; `kiln_vmm::test_guest::ELF` embeds it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{shown} failed ({s}); the test guest needs binutils (`as`, `ld`)"),
        Err(e) => panic!("cannot run {shown}: {e}; the test guest needs binutils (`as`, `ld`)"),
    }
}

fn main() {
    let dir = Path::new("test-guest");
    let src = dir.join("guest.S");
    let script = dir.join("guest.ld");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", script.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let obj = out.join("test-guest.o");
    let elf = out.join("test-guest.elf");
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-nostdlib",
            "-static",
            "--build-id=none",
        ])
        .arg("--no-warn-rwx-segments")
        .arg("-T")
        .arg(&script)
        .arg("-o")
        .arg(&elf)
        .arg(&obj));
}
