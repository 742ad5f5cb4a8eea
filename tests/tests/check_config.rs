//! `keibi-syncd --check-config FILE`: a valid file prints every effective
//! setting (the file, flags over it, defaults for the rest) and exits 0,
//! touching nothing; an invalid or missing one exits 1 naming the problem.

use harness::binaries::syncd;
use harness::run_bounded;
use std::process::{Command, Output};
use std::time::Duration;

fn check(file: &std::path::Path, extra: &[&str]) -> Output {
    run_bounded(
        Command::new(syncd())
            .arg("--check-config")
            .arg(file)
            .args(extra),
        Duration::from_secs(30),
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn valid_file_prints_the_effective_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("syncd.toml");
    let state = dir.path().join("never-created");
    std::fs::write(
        &file,
        format!(
            "state_dir = \"{}\"\nfetch_parallel = 3\npeer_timeout = \"1500ms\"\n",
            state.display()
        ),
    )
    .expect("write the file");
    let out = check(&file, &["--fs-socket", "/tmp/flag.sock"]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}{}", text(&out.stderr));
    for line in [
        format!("state_dir = \"{}\"", state.display()),
        "fetch_parallel = 3".to_string(),
        "peer_timeout = \"1s 500ms\"".to_string(),
        // A flag over the file.
        "fs_socket = \"/tmp/flag.sock\"".to_string(),
        // Defaults for what neither sets.
        "control_socket = \"/run/keibi/control.sock\"".to_string(),
        "listen = [\"0.0.0.0:58150\", \"[::]:58150\"]".to_string(),
    ] {
        assert!(
            said.lines().any(|l| l == line),
            "missing {line:?} in:\n{said}"
        );
    }
    assert!(
        !state.exists(),
        "--check-config created the state directory"
    );
}

#[test]
fn invalid_or_missing_file_exits_1_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (content, says) in [
        ("fetch_parallel = 0\n", "fetch_parallel = 0"),
        ("peer_timeout = \"soon\"\n", "peer_timeout"),
        ("colour = \"blue\"\n", "colour"),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, content).expect("write the file");
        let out = check(&file, &[]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{content}: {err}");
        assert!(
            err.contains(says),
            "{content}: the message does not name {says:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{content}: printed settings anyway");
    }
    let missing = dir.path().join("missing.toml");
    let out = check(&missing, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot read config file"),
        "{}",
        text(&out.stderr)
    );
}
