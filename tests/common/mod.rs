//! Helpers the CLI test files share.

use std::process::Command;

/// Runs the `corepin` binary with `args`, which must fail with exactly one line on stderr;
/// returns that line.
pub fn one_error_line(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} must fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim().lines().count(), 1, "one line for {args:?}: {err}");
    err
}
