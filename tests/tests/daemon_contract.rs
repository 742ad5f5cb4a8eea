//! The daemons' process contract: who they run as, how they stop, what
//! they leave behind, and mountd coming up before syncd.

use harness::daemons::{make_dir, syncd_command, terminate};
use harness::process::{check_output, signal, wait_child};
use harness::{OTHER_UID, Options, SYNCD_UID, binaries, bounded, run_bounded, setup};
use nix::sys::signal::Signal;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn syncd_refuses_to_run_as_root_without_allow_root() {
    let _w = harness::Watchdog::arm("syncd as root", LIMIT);
    let dir = tempfile::Builder::new()
        .prefix("kb")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let out = run_bounded(
        Command::new(binaries::syncd())
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--fs-socket")
            .arg(dir.path().join("fs.sock"))
            .arg("--control-socket")
            .arg(dir.path().join("control.sock")),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit 2 as root: {stderr}");
    assert!(
        stderr.contains("--allow-root"),
        "the message names the flag: {stderr}"
    );
    assert!(!dir.path().join("fs.sock").exists(), "no socket was made");
}

#[test]
fn mountd_refuses_to_run_unprivileged() {
    let _w = harness::Watchdog::arm("mountd as non-root", LIMIT);
    let dir = tempfile::Builder::new()
        .prefix("kb")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mnt = dir.path().join("mnt");
    make_dir(&mnt, OTHER_UID, OTHER_UID, 0o755);
    make_dir(&dir.path().join("locks"), OTHER_UID, OTHER_UID, 0o755);
    let out = run_bounded(
        Command::new("setpriv")
            .arg(format!("--reuid={OTHER_UID}"))
            .arg(format!("--regid={OTHER_UID}"))
            .arg("--clear-groups")
            .arg(binaries::mountd())
            .arg(&mnt)
            .arg("--syncd-socket")
            .arg(dir.path().join("fs.sock"))
            .arg("--lock-dir")
            .arg(dir.path().join("locks")),
        Duration::from_secs(20),
    );
    assert!(
        !out.status.success(),
        "mountd must refuse to run as uid {OTHER_UID}"
    );
    assert_eq!(harness::mounts::keibi_mounts_at(&mnt), 0, "nothing mounted");
}

#[test]
fn syncd_stops_on_sigterm_and_sigint_removing_its_sockets() {
    let (_w, mut fx) = setup("syncd signals", LIMIT, Options::default());
    let md = fs::metadata(fx.control_socket()).expect("control socket");
    assert!(md.file_type().is_socket());
    assert_eq!(
        md.mode() & 0o777,
        0o660,
        "the control socket's default mode"
    );
    assert_eq!(md.uid(), SYNCD_UID);
    let fs_md = fs::metadata(fx.fs_socket()).expect("fs socket");
    assert!(fs_md.file_type().is_socket());
    assert_eq!(
        fs_md.mode() & 0o777,
        0o666,
        "the fs socket is world-connectable (SO_PEERCRED admits mountd)"
    );
    let (st, by_itself) = fx.stop_syncd();
    assert!(by_itself && st.success(), "SIGTERM: exit 0 ({st})");
    assert!(!fx.fs_socket().exists(), "SIGTERM removes the fs socket");
    assert!(
        !fx.control_socket().exists(),
        "SIGTERM removes the control socket"
    );

    // SIGINT, on a separate instance.
    let state = fx.root().join("state-int");
    make_dir(&state, SYNCD_UID, SYNCD_UID, 0o700);
    let (fs_sock, ctl) = (
        fx.run_dir().join("i-fs.sock"),
        fx.run_dir().join("i-ctl.sock"),
    );
    let mut child = syncd_command(&state, &fs_sock, &ctl, &fx.root().join("sigint.log"))
        .spawn()
        .expect("spawn syncd");
    harness::watchdog::register_pid(child.id());
    harness::poll_until(
        "the second syncd to answer",
        Duration::from_secs(20),
        || harness::daemons::control_answers(&ctl).then_some(()),
    );
    signal(child.id(), Signal::SIGINT);
    let st = wait_child(&mut child, Duration::from_secs(10));
    if st.is_none() {
        terminate(&mut child, Duration::from_secs(1));
    }
    harness::watchdog::unregister_pid(child.id());
    assert!(
        st.is_some_and(|s| s.success()),
        "SIGINT: exit 0 within 10 s ({st:?})"
    );
    assert!(
        !fs_sock.exists() && !ctl.exists(),
        "SIGINT removes the sockets"
    );
    fx.start_syncd();
}

#[test]
fn mountd_stops_on_sigint_and_unmounts() {
    let (_w, mut fx) = setup("mountd SIGINT", LIMIT, Options::default());
    let pid = fx.mountd_pid().expect("mountd runs");
    signal(pid, Signal::SIGINT);
    harness::poll_until(
        "mountd to exit after SIGINT",
        Duration::from_secs(5),
        || {
            // Not reaped yet: an exited child is a zombie.
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .next()?
                .to_string();
            (state == "Z").then_some(())
        },
    );
    let (st, by_itself, unmounted) = fx.stop_mountd();
    assert!(
        by_itself && st.success() && unmounted,
        "SIGINT: exit 0 ({st})"
    );
    fx.start_mountd();
}

#[test]
fn mountd_comes_up_before_syncd_and_works_once_syncd_is_there() {
    let (_w, mut fx) = setup(
        "mountd before syncd",
        LIMIT,
        Options {
            defer_syncd: true,
            ..Options::default()
        },
    );
    let deadline = fx.options().deadline;
    let p = fx.path("early");
    let started = Instant::now();
    let r = bounded(deadline + Duration::from_secs(1), move || {
        fs::write(&p, b"x")
    })
    .unwrap_or_else(|waited| panic!("a create without syncd hung for {waited:?}"));
    let e = r.expect_err("a create with no syncd cannot succeed");
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ETIMEDOUT),
        "no syncd: ETIMEDOUT at the deadline (after {:?})",
        started.elapsed()
    );
    fx.start_syncd();
    fx.wait_writable(Duration::from_secs(20));
    fs::write(fx.path("late"), b"works").expect("write once syncd is up");
    assert_eq!(fs::read(fx.path("late")).expect("read"), b"works");
}

#[test]
fn keibictl_status_reports_the_mount() {
    let (_w, fx) = setup("keibictl status", LIMIT, Options::default());
    fs::write(fx.path("one"), b"12345").expect("write");
    let out = run_bounded(
        Command::new(binaries::binary("keibictl"))
            .arg("--socket")
            .arg(fx.control_socket())
            .args(["status", "--json"])
            .stdin(Stdio::null()),
        Duration::from_secs(20),
    );
    let text = check_output("keibictl status --json", &out);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("keibictl status --json is not JSON ({e}): {text}"));
    let flat = v.to_string();
    assert!(
        flat.contains(&fx.state_dir().display().to_string()),
        "the state directory is reported: {flat}"
    );
    assert!(
        flat.contains(&fx.mnt().display().to_string()),
        "the connected mount is reported: {flat}"
    );
    // Unreachable socket: exit 1 with a one-line reason.
    let out = run_bounded(
        Command::new(binaries::binary("keibictl"))
            .arg("--socket")
            .arg(fx.root().join("nonexistent.sock"))
            .arg("status"),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "unreachable: exit 1 ({stderr})");
    assert!(
        stderr.starts_with("keibictl: ") && stderr.trim_end().lines().count() == 1,
        "one line starting with `keibictl: `: {stderr:?}"
    );
}

/// A mountd stopped on drop, its mount detached: cleanup for the test below
/// even when an assertion fails.
struct EarlyMountd {
    child: std::process::Child,
    mnt: std::path::PathBuf,
}

impl Drop for EarlyMountd {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
        harness::mounts::detach_all(&self.mnt);
    }
}

#[test]
fn mountd_sigterm_as_soon_as_the_mount_shows_exits_0_and_unmounts() {
    // The handlers must be in place before the mount is visible: a SIGTERM
    // that arrives right after the mount appears must still unmount and
    // exit 0, not kill mountd by the default action and leave a dead mount.
    let (_w, mut fx) = setup("mountd early SIGTERM", LIMIT, Options::default());
    let (st, by_itself, unmounted) = fx.stop_mountd();
    assert!(by_itself && st.success() && unmounted, "first stop ({st})");
    let mnt = fx.mnt();
    for round in 0..10 {
        let child = harness::daemons::mountd_command(
            &mnt,
            &fx.fs_socket(),
            &fx.lock_dir(),
            fx.options().deadline,
            fx.options().passthrough,
            &fx.mountd_log_path(),
        )
        .spawn()
        .expect("start keibi-mountd");
        harness::watchdog::register_pid(child.id());
        let mut m = EarlyMountd {
            child,
            mnt: mnt.clone(),
        };
        harness::poll_until(
            "the mount to show in mountinfo",
            Duration::from_secs(20),
            || (harness::mounts::keibi_mounts_at(&mnt) > 0).then_some(()),
        );
        signal(m.child.id(), Signal::SIGTERM);
        let st = wait_child(&mut m.child, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("round {round}: mountd did not exit after SIGTERM"));
        assert!(st.success(), "round {round}: exit status {st}");
        assert_eq!(
            harness::mounts::keibi_mounts_at(&mnt),
            0,
            "round {round}: the mount is gone"
        );
    }
    fx.start_mountd();
}
