//! The binary's contract with scripts: exit 1 and one `keibictl: ` line on
//! stderr when syncd cannot be reached or does not answer in time.

use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_keibictl");

fn assert_one_line_failure(out: &std::process::Output) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.starts_with("keibictl: "), "{err:?}");
}

#[test]
fn no_socket_exits_1_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let out = Command::new(BIN)
        .args(["--socket"])
        .arg(&sock)
        .args(["status", "--json"])
        .output()
        .expect("run keibictl");
    assert_one_line_failure(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("control.sock"));
}

#[test]
fn silent_socket_exits_1_within_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let started = Instant::now();
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(&sock)
        .args(["--timeout", "300ms", "status"])
        .output()
        .expect("run keibictl");
    assert_one_line_failure(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not answer"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn bad_usage_is_not_a_connection_failure() {
    let out = Command::new(BIN)
        .args(["status", "--bogus"])
        .output()
        .expect("run keibictl");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
