//! `keibi-syncd --check-config FILE`: a valid file prints every effective
//! setting (the file, `KEIBI_*` variables over it, flags over both,
//! defaults for the rest; values from a variable marked) and exits 0,
//! touching nothing; an invalid or missing one exits 1 naming the problem,
//! a bad variable names the variable. Also mountd's variables.

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

/// `--check-config FILE` with these environment variables (and no other
/// `KEIBI_*` of the test's own environment).
fn check_env(file: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(syncd());
    cmd.arg("--check-config").arg(file).args(extra);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KEIBI_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    run_bounded(&mut cmd, Duration::from_secs(30))
}

#[test]
fn environment_variables_override_the_file_and_flags_override_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("syncd.toml");
    std::fs::write(
        &file,
        "state_dir = \"/from/file\"\nfs_socket = \"/file/fs.sock\"\ncontrol_socket = \"/file/control.sock\"\nlisten = [\"127.0.0.1:4000\"]\nlog_target = \"stderr\"\n",
    )
    .expect("write the file");
    let out = check_env(
        &file,
        &["--control-socket", "/flag/control.sock"],
        &[
            ("KEIBI_STATE_DIR", "/from/env"),
            ("KEIBI_LISTEN", "127.0.0.1:5000,[::1]:5001"),
            ("KEIBI_LOG_TARGET", "journal"),
            // The flag wins over its variable.
            ("KEIBI_CONTROL_SOCKET", "/env/control.sock"),
        ],
    );
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}{}", text(&out.stderr));
    for line in [
        "state_dir = \"/from/env\"  # from KEIBI_STATE_DIR",
        "listen = [\"127.0.0.1:5000\", \"[::1]:5001\"]  # from KEIBI_LISTEN",
        "log_target = \"journal\"  # from KEIBI_LOG_TARGET",
        "control_socket = \"/flag/control.sock\"",
        // No variable set: the file's value.
        "fs_socket = \"/file/fs.sock\"",
    ] {
        assert!(
            said.lines().any(|l| l == line),
            "missing {line:?} in:\n{said}"
        );
    }
    assert_eq!(said.matches("# from").count(), 3, "{said}");
    // `--listen none` (a flag) over the variable: dial only.
    let out = check_env(
        &file,
        &["--listen", "none"],
        &[("KEIBI_LISTEN", "127.0.0.1:5000")],
    );
    let said = text(&out.stdout);
    assert!(said.lines().any(|l| l == "listen = []"), "{said}");
}

#[test]
fn a_bad_environment_value_is_refused_naming_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("syncd.toml");
    std::fs::write(&file, "").expect("write the file");
    for (var, value, code, says) in [
        (
            "KEIBI_LISTEN",
            "somewhere:1",
            1,
            "environment variable KEIBI_LISTEN: listen address \"somewhere:1\" is not IP:PORT",
        ),
        (
            "KEIBI_LISTEN",
            "",
            1,
            "environment variable KEIBI_LISTEN: empty",
        ),
        (
            "KEIBI_LOG_TARGET",
            "syslog",
            2,
            "environment variable KEIBI_LOG_TARGET = \"syslog\"",
        ),
        (
            "KEIBI_STATE_DIR",
            "",
            2,
            "environment variable KEIBI_STATE_DIR = \"\"",
        ),
    ] {
        let out = check_env(&file, &[], &[(var, value)]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{var}={value:?}: {err}");
        assert!(err.contains(says), "{var}={value:?}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{var}={value:?}: printed settings anyway"
        );
    }
}

#[test]
fn mountd_refuses_a_bad_environment_value_naming_the_variable() {
    let mut cmd = Command::new(harness::binaries::mountd());
    cmd.arg("/nonexistent-mountpoint")
        .env("KEIBI_DEADLINE", "soon");
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with("keibi-mountd: environment variable KEIBI_DEADLINE = \"soon\": invalid value 'soon' for '--deadline"),
        "{err}"
    );
    // With --deadline given, the bad variable is not read: the error is
    // the flag's own (a bad --threads), not the variable's.
    let mut cmd = Command::new(harness::binaries::mountd());
    cmd.arg("/nonexistent-mountpoint")
        .args(["--deadline", "1s", "--threads", "0"])
        .env("KEIBI_DEADLINE", "soon");
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--threads"), "{err}");
    assert!(!err.contains("KEIBI_DEADLINE"), "{err}");
}
