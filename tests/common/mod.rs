//! Shared helpers for the integration tests: fixture paths and tolerance checks.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::{Kind, Tensor};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn pipeline(name: &str) -> PathBuf {
    fixtures().join("pipelines").join(name)
}

pub const PIPELINES: [&str; 2] = ["tiny-a", "tiny-b"];

/// max|a − b| / max|b|.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size(), "shape mismatch");
    let diff = (ours.to_kind(Kind::Double) - reference.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    let scale = reference
        .to_kind(Kind::Double)
        .abs()
        .max()
        .double_value(&[]);
    diff / scale.max(1e-12)
}

pub fn assert_close(ours: &Tensor, reference: &Tensor, tol: f64, what: &str) {
    let e = rel_err(ours, reference);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    eprintln!("{what}: relative error {e:.2e}");
}

/// Copies a fixture pipeline folder into a temp dir so a test can break it.
pub fn copy_pipeline(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_dir(&pipeline(name), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).expect("copy");
        }
    }
}

/// Edits a JSON file in place.
pub fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).expect("ser")).expect("write");
}

/// Runs the built `loracast` binary (one torch thread).
pub fn loracast(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loracast"))
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run loracast")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failing command: non-zero exit, one `error:` line naming `needle`, no panic, and nothing
/// written at `out`.
pub fn assert_fails(args: &[&str], out: Option<&Path>, needle: &str) {
    let o = loracast(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    assert!(
        err.contains(needle),
        "{args:?}: {err:?} does not mention {needle:?}"
    );
    if let Some(out) = out {
        assert!(!out.exists(), "{args:?} left {}", out.display());
    }
}

/// (max, mean) per-channel level difference of two u8 images of the same size.
pub fn image_diff(ours: &[u8], theirs: &[u8]) -> (u8, f64) {
    assert_eq!(ours.len(), theirs.len(), "image size");
    let max = ours.iter().zip(theirs).map(|(a, b)| a.abs_diff(*b)).max();
    let sum: f64 = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| a.abs_diff(*b) as f64)
        .sum();
    (max.unwrap_or(0), sum / ours.len().max(1) as f64)
}
