//! Where mountd keeps its lock and ops socket, and what it does with a
//! mountpoint that already has a mount:
//!
//! - a live keibi mount served by another mountd (another lock directory)
//!   is never unmounted, nor is one whose mountd is frozen: the second
//!   mountd refuses with exit 3;
//! - mountd refuses a lock directory an unprivileged user can change (the
//!   old default `/run/keibi/mounts` inside syncd's runtime directory);
//!   with the default `/run/keibi-mountd`, syncd's user can neither move,
//!   replace nor reach the lock or the ops socket;
//! - `--syncd-config` gives mountd syncd's socket from syncd's own file;
//! - a ~3000-byte mountpoint mounts, `keibictl debug ops` reaches it, and
//!   its lock still keeps a second mountd out.

use harness::binaries::{binary, mountd, probe};
use harness::daemons::{make_dir, mountd_command};
use harness::extra_mountd::ExtraMountd;
use harness::mounts::keibi_mounts_at;
use harness::{Options, SYNCD_UID, run_as, run_bounded, setup};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);
const START: Duration = Duration::from_secs(20);

/// A mountd command like the fixture's, for `mnt` with `lock_dir`.
fn mountd_for(fx: &harness::KeibiFixture, mnt: &Path, lock_dir: &Path, log: &Path) -> Command {
    mountd_command(
        mnt,
        &fx.fs_socket(),
        lock_dir,
        Duration::from_secs(2),
        true,
        log,
    )
}

#[test]
fn a_live_mount_of_another_mountd_is_never_unmounted() {
    let (_w, fx) = setup("live mount kept", LIMIT, Options::default());
    fs::write(fx.path("before"), b"kept").expect("write through the first mount");
    let other_locks = fx.root().join("locks-b");
    make_dir(&other_locks, 0, 0, 0o755);
    let log = fx.root().join("mountd-b.log");
    let mut second = ExtraMountd::spawn(
        &mut mountd_for(&fx, &fx.mnt(), &other_locks, &log),
        &fx.mnt(),
        &log,
        false,
    );
    let st = second.wait_exit(START);
    let text = second.log();
    assert_eq!(
        st.code(),
        Some(3),
        "the second mountd (another lock dir) refuses with exit 3:\n{text}"
    );
    assert!(
        text.contains("already a live keibi mount"),
        "the refusal says why:\n{text}"
    );
    assert_eq!(
        keibi_mounts_at(&fx.mnt()),
        1,
        "the first mount is still there"
    );
    assert_eq!(fs::read(fx.path("before")).expect("read"), b"kept");
    fs::write(fx.path("after"), b"still served").expect("the first mount still works");
    assert!(
        fs::read_dir(fx.mnt())
            .expect("list")
            .any(|e| e.expect("entry").file_name() == "after")
    );
}

#[test]
fn a_lock_dir_in_syncds_runtime_dir_is_refused() {
    // The fixture's run/ is syncd's (nobody's, 0755), like /run/keibi under
    // the packaged units; the old default put mountd's locks below it.
    let (_w, fx) = setup("lock dir refused", LIMIT, Options::default());
    let mnt = fx.root().join("mnt2");
    make_dir(&mnt, 0, 0, 0o755);
    let log = fx.root().join("mountd-b.log");
    let lock_dir = fx.run_dir().join("mounts");
    let mut m = ExtraMountd::spawn(
        &mut mountd_for(&fx, &mnt, &lock_dir, &log),
        &mnt,
        &log,
        true,
    );
    let st = m.wait_exit(START);
    let text = m.log();
    assert_eq!(st.code(), Some(2), "refused as a usage error:\n{text}");
    assert!(
        text.contains("refusing the lock directory") && text.contains("owned by uid 65534"),
        "the message names the directory and its owner:\n{text}"
    );
    assert_eq!(keibi_mounts_at(&mnt), 0, "nothing was mounted");
}

/// Run `script` as syncd's user and return (exit code, stdout+stderr).
fn as_syncd_user(script: &str) -> (Option<i32>, String) {
    let out = run_as(SYNCD_UID, script);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn denied(text: &str) -> bool {
    text.contains("Permission denied") || text.contains("Operation not permitted")
}

#[test]
fn syncds_user_cannot_move_replace_or_reach_the_default_lock_and_ops_socket() {
    let (_w, fx) = setup("default lock dir", LIMIT, Options::default());
    let mnt = fx.root().join("mnt2");
    make_dir(&mnt, 0, 0, 0o755);
    let log = fx.root().join("mountd-b.log");
    // No --lock-dir: the default, /run/keibi-mountd.
    let mut cmd = Command::new(mountd());
    cmd.arg(&mnt)
        .arg("--syncd-socket")
        .arg(fx.fs_socket())
        .env("RUST_LOG", "info,tarpc=off")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).expect("log"))
        .stderr(fs::File::options().append(true).open(&log).expect("log"));
    let mut m = ExtraMountd::spawn(&mut cmd, &mnt, &log, true);
    m.wait_mounted(START);
    let lock_dir = PathBuf::from(ipc_schema::paths::DEFAULT_LOCK_DIR);
    let anchor = ipc_schema::paths::mount_anchor(&lock_dir, &mnt);
    let lock = anchor.join("lock");
    let sock = anchor.join("ops.sock");
    let recorded = fs::read(anchor.join("mountpoint")).expect("the anchor records the mountpoint");
    assert_eq!(recorded, format!("{}\n", mnt.display()).into_bytes());
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(&lock_dir).expect("stat the lock dir");
    assert_eq!((md.uid(), md.mode() & 0o7777), (0, 0o755), "root's, 0755");
    let lock_ino = fs::metadata(&lock).expect("lock").ino();

    // A file of syncd's user, in a directory it owns, to put in the lock's place.
    let evil = fx.run_dir().join("evil").display().to_string();
    let attempts = [
        format!("mv {} {}.moved", lock_dir.display(), lock_dir.display()),
        format!("mv {} {}.moved", anchor.display(), anchor.display()),
        format!("rm -f {}", lock.display()),
        format!("echo x > {evil} && mv -f {evil} {}", lock.display()),
        format!("ln -sf /tmp/elsewhere {}", sock.display()),
        format!("mkdir {}/m-evil", lock_dir.display()),
    ];
    for a in &attempts {
        let (code, text) = as_syncd_user(a);
        assert!(
            code != Some(0) && denied(&text),
            "as uid {SYNCD_UID}, `{a}` must fail with EACCES/EPERM; got {code:?}: {text}"
        );
    }
    // connect(2) needs write permission on the socket file: EACCES.
    let out = run_bounded(
        Command::new("setpriv")
            .arg(format!("--reuid={SYNCD_UID}"))
            .arg(format!("--regid={SYNCD_UID}"))
            .arg("--clear-groups")
            .arg(probe())
            .arg(&sock),
        Duration::from_secs(30),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with(&format!("connect-error {}", libc::EACCES)),
        "connecting to the ops socket as uid {SYNCD_UID} fails with EACCES: {said}"
    );
    assert_eq!(
        fs::metadata(&lock).expect("lock still there").ino(),
        lock_ino
    );
    // The lock still keeps a second mountd out.
    let log2 = fx.root().join("mountd-c.log");
    let mut cmd = Command::new(mountd());
    cmd.arg(&mnt)
        .arg("--syncd-socket")
        .arg(fx.fs_socket())
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log2).expect("log"))
        .stderr(fs::File::options().append(true).open(&log2).expect("log"));
    let mut second = ExtraMountd::spawn(&mut cmd, &mnt, &log2, false);
    assert_eq!(second.wait_exit(START).code(), Some(3), "{}", second.log());
    drop(m);
    let _ = fs::remove_dir_all(&anchor);
}

#[test]
fn mountd_takes_syncds_socket_from_syncds_config() {
    let (_w, fx) = setup("syncd config", LIMIT, Options::default());
    let mnt = fx.root().join("mnt2");
    make_dir(&mnt, 0, 0, 0o755);
    let cfg = fx.root().join("syncd.toml");
    fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\nfs_socket = \"{}\"\ncontrol_socket = \"{}\"\n",
            fx.state_dir().display(),
            fx.fs_socket().display(),
            fx.control_socket().display()
        ),
    )
    .expect("write syncd.toml");
    let log = fx.root().join("mountd-b.log");
    let mut cmd = Command::new(mountd());
    cmd.arg(&mnt)
        .arg("--syncd-config")
        .arg(&cfg)
        .arg("--lock-dir")
        .arg(fx.lock_dir())
        .env("RUST_LOG", "info,tarpc=off")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).expect("log"))
        .stderr(fs::File::options().append(true).open(&log).expect("log"));
    let mut m = ExtraMountd::spawn(&mut cmd, &mnt, &log, true);
    m.wait_mounted(START);
    fs::write(mnt.join("via-config"), b"same store").expect("write through the second mount");
    assert_eq!(
        fs::read(fx.path("via-config")).expect("the fixture's mount sees it"),
        b"same store"
    );
    assert!(
        m.log().contains(&fx.fs_socket().display().to_string()),
        "{}",
        m.log()
    );
}

#[test]
fn a_deep_mountpoint_mounts_and_answers_debug_ops() {
    let (_w, fx) = setup("deep mountpoint", LIMIT, Options::default());
    let mut deep = fx.root().join("deep");
    make_dir(&deep, 0, 0, 0o755);
    while deep.as_os_str().len() < 3000 {
        deep.push("d".repeat(200));
        fs::create_dir(&deep).expect("mkdir a deep component");
    }
    let len = deep.as_os_str().len();
    assert!((3000..3300).contains(&len), "{len}");
    let log = fx.root().join("mountd-deep.log");
    let mut m = ExtraMountd::spawn(
        &mut mountd_for(&fx, &deep, &fx.lock_dir(), &log),
        &deep,
        &log,
        true,
    );
    m.wait_mounted(START);
    fs::write(deep.join("f"), b"deep").expect("write on the deep mount");
    assert_eq!(fs::read(fx.path("f")).expect("same store"), b"deep");

    let out = run_bounded(
        Command::new(binary("keibictl"))
            .arg("--socket")
            .arg(fx.control_socket())
            .args(["debug", "ops", "--json", "--mount"])
            .arg(&deep)
            .arg("--lock-dir")
            .arg(fx.lock_dir()),
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "keibictl debug ops: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert!(
        json["mounts"][deep.display().to_string()].is_array(),
        "mountd of the deep mount answered: {stdout}"
    );

    let log2 = fx.root().join("mountd-deep2.log");
    let mut second = ExtraMountd::spawn(
        &mut mountd_for(&fx, &deep, &fx.lock_dir(), &log2),
        &deep,
        &log2,
        false,
    );
    assert_eq!(
        second.wait_exit(START).code(),
        Some(3),
        "the lock keeps a second mountd out:\n{}",
        second.log()
    );
    assert_eq!(keibi_mounts_at(&deep), 1);
}

#[test]
fn a_frozen_mount_of_another_mountd_is_not_unmounted_either() {
    let (_w, fx) = setup("frozen mount kept", LIMIT, Options::default());
    fs::write(fx.path("before"), b"kept").expect("write through the first mount");
    let other_locks = fx.root().join("locks-b");
    make_dir(&other_locks, 0, 0, 0o755);
    let log = fx.root().join("mountd-b.log");
    let first = fx.mountd_pid().expect("mountd runs");
    harness::process::signal(first, nix::sys::signal::Signal::SIGSTOP);
    let mut second = ExtraMountd::spawn(
        &mut mountd_for(&fx, &fx.mnt(), &other_locks, &log),
        &fx.mnt(),
        &log,
        false,
    );
    let st = second.wait_exit(START);
    harness::process::signal(first, nix::sys::signal::Signal::SIGCONT);
    let text = second.log();
    assert_eq!(st.code(), Some(3), "refused with exit 3:\n{text}");
    assert!(text.contains("does not answer stat"), "{text}");
    assert_eq!(
        keibi_mounts_at(&fx.mnt()),
        1,
        "the first mount is still there"
    );
    assert_eq!(
        fs::read(fx.path("before")).expect("read after SIGCONT"),
        b"kept"
    );
}
