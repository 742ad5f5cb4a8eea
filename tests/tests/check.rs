//! `keibictl check` on a live syncd, and one broken entry in a directory:
//! the content file of one file is removed behind syncd's back. Only that
//! name fails (`EIO`), `ls -l` still lists the rest, `keibictl check`
//! reports it (exit 1), `--repair` recreates the content empty (exit 0),
//! and a last check is clean.

use harness::process::run_bounded;
use harness::{Options, binaries, poll_until, setup};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn keibictl(control: &Path, args: &[&str]) -> Output {
    run_bounded(
        Command::new(binaries::binary("keibictl"))
            .arg("--socket")
            .arg(control)
            .arg("--timeout")
            .arg("30s")
            .args(args),
        Duration::from_secs(60),
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_lost_content_file_costs_one_name_and_check_repairs_it() {
    // A content file removed behind syncd's back is not announced: the
    // kernel sees the loss only once its cached attributes expire, so the
    // mount gets a short TTL.
    let opts = Options {
        mountd_args: vec!["--attr-ttl".into(), "1s".into()],
        ..Options::default()
    };
    let (_w, fx) = setup("check", Duration::from_secs(120), opts);
    let dir = fx.path("d");
    fs::create_dir(&dir).expect("mkdir");
    for i in 0..5 {
        fs::write(dir.join(format!("f{i}")), format!("bytes {i}")).expect("write");
    }
    fs::File::open(&dir)
        .expect("open dir")
        .sync_all()
        .expect("fsync dir");
    let out = keibictl(&fx.control_socket(), &["check"]);
    assert_eq!(out.status.code(), Some(0), "clean at first: {out:?}");
    assert!(text(&out.stdout).contains("clean"), "{out:?}");

    let bad = fs::metadata(dir.join("f2")).expect("stat").ino();
    let content = fx.state_dir().join("content").join(format!("{bad:016x}"));
    fs::remove_file(&content).expect("remove the content file behind syncd's back");

    // Once the kernel's cached attributes expire, only f2 fails, with EIO.
    let err = poll_until(
        "lstat of the broken name to fail",
        Duration::from_secs(20),
        || fs::symlink_metadata(dir.join("f2")).err(),
    );
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "the broken name: {err}"
    );
    let ls = run_bounded(
        Command::new("ls").arg("-l").arg(&dir),
        Duration::from_secs(30),
    );
    let listed = text(&ls.stdout);
    for i in [0, 1, 3, 4] {
        assert!(
            listed.contains(&format!("f{i}")),
            "ls -l lists f{i} despite the broken f2:\n{listed}\n{}",
            text(&ls.stderr)
        );
        assert_eq!(
            fs::read(dir.join(format!("f{i}"))).expect("read"),
            format!("bytes {i}").as_bytes()
        );
    }

    let out = keibictl(&fx.control_socket(), &["check"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report = text(&out.stdout);
    assert!(
        report.contains("MissingContent") && report.contains(&format!("ino {bad}")),
        "{report}"
    );
    assert!(
        text(&out.stderr).contains("1 inconsistency found"),
        "{out:?}"
    );

    let out = keibictl(&fx.control_socket(), &["check", "--repair", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["findings"][0]["kind"], "MissingContent");
    assert_eq!(v["findings"][0]["repaired"], true);

    let out = keibictl(&fx.control_socket(), &["check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "clean after the repair: {out:?}"
    );
    let md = poll_until(
        "the repaired name to answer",
        Duration::from_secs(20),
        || fs::symlink_metadata(dir.join("f2")).ok(),
    );
    assert_eq!((md.ino(), md.len()), (bad, 0), "recreated empty");
    let out = keibictl(&fx.control_socket(), &["status"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
