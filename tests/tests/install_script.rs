//! `packaging/install.sh` as `sudo` runs it: with a minimal environment
//! (`env -i`, sudo's `secure_path`, no `~/.cargo/bin` on PATH), staged
//! with `--destdir` so nothing outside a temporary directory is touched.
//!
//! - A staged install with binaries given by `--bin-dir` puts every file
//!   in place with its mode, keeps an existing `syncd.toml`, and creates no
//!   user.
//! - Without any cargo to find, the script fails and says exactly what to
//!   do.
//! - Under sudo (`SUDO_USER` set, `HOME` and `PATH` root's), the invoking
//!   user's rustup cargo is found in their `~/.cargo/bin` (the function
//!   the script uses, sourced from `scripts/lib/packages.sh`). The release
//!   build itself is not run here (it takes minutes).

use harness::binaries::profile_dir;
use harness::process::check_output;
use harness::run_bounded;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// sudo's default `secure_path` on Debian.
const SECURE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package is inside the repository")
        .to_path_buf()
}

/// Run `bash args...` in the repository with only `env` set.
fn bash(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new("/usr/bin/env");
    cmd.arg("-i");
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg("/bin/bash").args(args).current_dir(repo());
    run_bounded(&mut cmd, Duration::from_secs(60))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{} was not installed: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn keibi_user() -> bool {
    Command::new("getent")
        .args(["passwd", "keibi"])
        .status()
        .expect("run getent")
        .success()
}

#[test]
fn staged_install_with_a_minimal_path() {
    let dest = tempfile::tempdir().expect("tempdir");
    let d = dest.path().to_str().expect("utf-8 temp path");
    let bins = profile_dir();
    let bins = bins.to_str().expect("utf-8 target path");
    let user_before = keibi_user();
    let env = [("PATH", SECURE_PATH), ("HOME", "/nonexistent")];
    let out = bash(
        &env,
        &["packaging/install.sh", "--bin-dir", bins, "--destdir", d],
    );
    check_output("install.sh --destdir", &out);
    for b in ["keibi-syncd", "keibi-mountd", "keibictl"] {
        assert_eq!(
            mode(&dest.path().join("usr/local/bin").join(b)),
            0o755,
            "{b}"
        );
    }
    for f in [
        "etc/systemd/system/keibi-syncd.service",
        "etc/systemd/system/keibi-mountd@.service",
        "usr/lib/sysusers.d/keibi.conf",
        "etc/keibi/syncd.toml",
        "usr/local/share/doc/keibi/README.md",
        "usr/local/share/doc/keibi/configuration.md",
    ] {
        assert_eq!(mode(&dest.path().join(f)), 0o644, "{f}");
    }
    assert_eq!(
        keibi_user(),
        user_before,
        "a staged install creates no user"
    );

    // A second run keeps the configuration and puts the example beside it.
    let conf = dest.path().join("etc/keibi/syncd.toml");
    std::fs::write(&conf, "# edited\n").expect("edit syncd.toml");
    let out = bash(
        &env,
        &["packaging/install.sh", "--bin-dir", bins, "--destdir", d],
    );
    let stdout = check_output("install.sh --destdir, again", &out);
    assert!(stdout.contains("kept"), "says it kept the config: {stdout}");
    assert_eq!(std::fs::read_to_string(&conf).expect("read"), "# edited\n");
    assert_eq!(
        mode(&dest.path().join("etc/keibi/syncd.toml.example")),
        0o644
    );
}

#[test]
fn without_cargo_it_says_what_to_do() {
    let dest = tempfile::tempdir().expect("tempdir");
    let d = dest.path().to_str().expect("utf-8 temp path");
    // No cargo on PATH, no HOME with one, no SUDO_USER.
    let out = bash(
        &[("PATH", "/usr/bin:/bin"), ("HOME", "/nonexistent")],
        &["packaging/install.sh", "--destdir", d],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    for hint in [
        "cargo not found",
        "--no-build",
        "CARGO=",
        "https://rustup.rs",
    ] {
        assert!(err.contains(hint), "the message mentions {hint:?}: {err}");
    }
    assert!(
        std::fs::read_dir(dest.path())
            .expect("list")
            .next()
            .is_none(),
        "nothing was installed"
    );
}

#[test]
fn under_sudo_the_invoking_users_cargo_is_found() {
    let root_home = text(
        &Command::new("getent")
            .args(["passwd", "root"])
            .output()
            .expect("getent")
            .stdout,
    )
    .trim()
    .split(':')
    .nth(5)
    .expect("root's home in passwd")
    .to_string();
    let cargo = Path::new(&root_home).join(".cargo/bin/cargo");
    // sudo from `root`'s own account: HOME and PATH reset, cargo only in the
    // invoking user's ~/.cargo/bin.
    let script = ". scripts/lib/packages.sh
        if locate_cargo; then echo \"on-path $KEIBI_CARGO\"; exit 0; fi
        if invoker_cargo; then echo \"invoker $KEIBI_CARGO $KEIBI_CARGO_USER $KEIBI_CARGO_HOME\"; exit 0; fi
        echo none";
    let out = bash(
        &[
            ("PATH", SECURE_PATH),
            ("HOME", "/nonexistent"),
            ("SUDO_USER", "root"),
        ],
        &["-c", script],
    );
    let said = check_output("locate_cargo / invoker_cargo", &out);
    let on_secure_path = SECURE_PATH
        .split(':')
        .any(|d| Path::new(d).join("cargo").exists());
    let want = if on_secure_path {
        "on-path".to_string()
    } else if cargo.exists() {
        format!("invoker {} root {root_home}", cargo.display())
    } else {
        "none".to_string()
    };
    assert!(
        said.trim().starts_with(&want),
        "expected {want:?}, the script said {said:?}"
    );
    assert!(
        on_secure_path || cargo.exists(),
        "this test needs rustup's cargo in root's ~/.cargo/bin (where scripts/test.sh \
         finds it), to check that sudo's reset PATH does not hide it"
    );
}
