//! Compiles the XDP program (`bpf/ingest.c`) for the BPF target with clang, into OUT_DIR, for
//! `include_bytes!`. `-g` gives the BTF that aya needs for the `.maps` section; the multiarch
//! include directory has `asm/types.h`, which the uapi headers include.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("ingest.o");
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}-linux-gnu", std::env::consts::ARCH));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", "bpf/ingest.c", "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} could not compile bpf/ingest.c ({s}); see the messages above"),
        Err(e) => panic!(
            "cannot run {clang} to compile the XDP program ({e}): scripts/setup.sh installs clang \
             (apt-get install clang)"
        ),
    }
    println!("cargo:rerun-if-changed=bpf/ingest.c");
    println!("cargo:rerun-if-changed=bpf/helpers.h");
    println!("cargo:rerun-if-env-changed=CLANG");
}
