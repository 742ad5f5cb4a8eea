//! Man pages and shell completions, as each binary writes them with
//! `--generate-docs DIR` (the package installs these files):
//!
//! - every page (keibi-syncd.8, keibi-mountd.8, mount.fuse.keibi.8,
//!   keibictl.1) renders with `groff -man -ww` without a single warning,
//!   and `man -l` shows it under its name;
//! - sourcing each bash completion registers it: `complete -p NAME`
//!   succeeds and names the completion function.

use harness::binaries::binary;
use harness::run_bounded;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn generate(dir: &Path) {
    for b in ["keibi-syncd", "keibi-mountd", "keibictl"] {
        let out = run_bounded(
            Command::new(binary(b)).arg("--generate-docs").arg(dir),
            LIMIT,
        );
        assert!(
            out.status.success(),
            "{b} --generate-docs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn man_pages_render_without_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    generate(dir.path());
    for (page, name) in [
        ("keibi-syncd.8", "keibi-syncd"),
        ("keibi-mountd.8", "keibi-mountd"),
        ("mount.fuse.keibi.8", "mount.fuse.keibi"),
        ("keibictl.1", "keibictl"),
    ] {
        let path = dir.path().join("man").join(page);
        let out = run_bounded(
            Command::new("groff")
                .args(["-man", "-ww", "-z", "-Tutf8"])
                .arg(&path),
            LIMIT,
        );
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "groff -man -ww {page}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = run_bounded(
            Command::new("man")
                .arg("-l")
                .arg(&path)
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "80"),
            LIMIT,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(name) && out.stderr.is_empty(),
            "man -l {page} ({}): {}\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bash_completions_register() {
    let dir = tempfile::tempdir().expect("tempdir");
    generate(dir.path());
    for b in ["keibi-syncd", "keibi-mountd", "keibictl"] {
        let file = dir.path().join("bash").join(b);
        let script = format!("source {} && complete -p {b}", file.display());
        let out = run_bounded(Command::new("bash").args(["--norc", "-c", &script]), LIMIT);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.contains(&format!(" {b}")) && said.contains("-F"),
            "complete -p {b} after sourcing {}: {said}{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
