//! mount(8) with keibi's helper, `mount.fuse.keibi` (keibi-mountd run
//! under that name):
//!
//! - `mount -t fuse.keibi keibi MNT -o ...` returns once the mount is up;
//!   the mount works, the options reach keibi-mountd; `umount MNT` leaves
//!   no mount and no mountd;
//! - an fstab line with `mount -a` does the same;
//! - a wrong option fails with a message naming it, and nothing is
//!   mounted or started;
//! - without keibi-syncd the mount fails with a message saying so, and
//!   nothing is mounted or started.
//!
//! mount(8) looks for helpers only in /sbin (here /usr/sbin), so each test
//! puts the symlink `/usr/sbin/mount.fuse.keibi` -> this build's
//! keibi-mountd there while it runs (one test at a time) and removes it
//! after, also when the test fails. An existing helper that is not such a
//! symlink (an installed package) fails the test rather than being
//! replaced. The fixture's own mountd is stopped first; the helper's mount
//! uses the fixture's syncd and lock directory.

use harness::binaries::mountd;
use harness::mounts::keibi_mounts_at;
use harness::{KeibiFixture, Options, poll_until, run_bounded, setup, watchdog};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
const HELPER: &str = "/usr/sbin/mount.fuse.keibi";
const MOUNT_LIMIT: Duration = Duration::from_secs(40);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The helper symlink, present while this lives.
struct Helper {
    _turn: MutexGuard<'static, ()>,
}

impl Helper {
    fn install() -> Helper {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let target = mountd();
        match std::fs::read_link(HELPER) {
            Ok(old) if is_test_leftover(&old) => {
                std::fs::remove_file(HELPER).expect("remove a stale test helper");
            }
            Ok(old) => panic!(
                "{HELPER} already exists (-> {}); the test will not replace an installed helper",
                old.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => panic!("{HELPER} exists and is not a symlink; the test will not replace it"),
        }
        std::os::unix::fs::symlink(&target, HELPER).expect("install the mount helper symlink");
        Helper { _turn: turn }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(HELPER);
    }
}

/// A helper symlink left by an earlier run of these tests that was killed:
/// it leads to a keibi-mountd in a checkout's target directory.
fn is_test_leftover(old: &Path) -> bool {
    old.file_name().is_some_and(|n| n == "keibi-mountd")
        && old.components().any(|c| c.as_os_str() == "target")
}

/// Start the fixture (syncd and its own mountd), then stop its mountd so
/// that the helper can mount the same mountpoint.
fn fixture(name: &str) -> (watchdog::Watchdog, KeibiFixture) {
    let (w, mut fx) = setup(name, LIMIT, Options::default());
    let (st, clean, unmounted) = fx.stop_mountd();
    assert!(
        clean && st.success() && unmounted,
        "the fixture's mountd did not stop cleanly"
    );
    (w, fx)
}

/// The `-o` options pointing the helper at the fixture.
fn fixture_options(fx: &KeibiFixture) -> String {
    format!(
        "syncd_socket={},lock_dir={}",
        fx.fs_socket().display(),
        fx.lock_dir().display()
    )
}

fn mount(args: &[&str]) -> Output {
    run_bounded(Command::new("mount").args(args), MOUNT_LIMIT)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Live keibi-mountd processes serving `mnt` (zombies have no cmdline).
fn mountd_pids(mnt: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        use std::os::unix::ffi::OsStrExt;
        if argv.len() > 1
            && argv[0].ends_with(b"keibi-mountd")
            && argv[1] == mnt.as_os_str().as_bytes()
        {
            pids.push(pid);
        }
    }
    pids
}

/// The helper-started mountd's log.
fn helper_log(fx: &KeibiFixture) -> PathBuf {
    ipc_schema::paths::mount_anchor(&fx.lock_dir(), &fx.mnt()).join("mountd.log")
}

/// The mount is up with exactly one mountd, and it works.
fn assert_mounted_and_working(fx: &KeibiFixture, how: &Output) -> u32 {
    assert!(
        how.status.success(),
        "mount failed ({}): {}{}",
        how.status,
        text(&how.stdout),
        text(&how.stderr)
    );
    // No polling: the helper returns only once the mount is up.
    assert_eq!(
        keibi_mounts_at(&fx.mnt()),
        1,
        "no fuse.keibi mount after mount returned"
    );
    watchdog::register_mount(fx.mnt());
    let pids = mountd_pids(&fx.mnt());
    assert_eq!(
        pids.len(),
        1,
        "expected one keibi-mountd for the mountpoint: {pids:?}"
    );
    watchdog::register_pid(pids[0]);
    std::fs::write(fx.path("hello.txt"), b"through the helper").expect("write on the mount");
    assert_eq!(
        std::fs::read(fx.path("hello.txt")).expect("read it back"),
        b"through the helper"
    );
    pids[0]
}

/// `umount` leaves no mount, and mountd exits by itself, cleanly.
fn assert_umount_stops_mountd(fx: &KeibiFixture, pid: u32) {
    let out = run_bounded(Command::new("umount").arg(fx.mnt()), MOUNT_LIMIT);
    assert!(out.status.success(), "umount failed: {}", text(&out.stderr));
    assert_eq!(
        keibi_mounts_at(&fx.mnt()),
        0,
        "a mount is left after umount"
    );
    poll_until(
        "keibi-mountd to exit after umount",
        Duration::from_secs(10),
        || mountd_pids(&fx.mnt()).is_empty().then_some(()),
    );
    watchdog::unregister_pid(pid);
    watchdog::unregister_mount(&fx.mnt());
    let log =
        std::fs::read_to_string(helper_log(fx)).expect("read the helper-started mountd's log");
    assert!(
        log.contains("the mount went away; exiting"),
        "mountd did not log a clean exit:\n{log}"
    );
}

/// Nothing mounted, no mountd started.
fn assert_nothing_left(fx: &KeibiFixture) {
    assert_eq!(keibi_mounts_at(&fx.mnt()), 0, "a mount was left behind");
    assert!(
        mountd_pids(&fx.mnt()).is_empty(),
        "a keibi-mountd was left running"
    );
}

#[test]
fn mount_t_fuse_keibi_mounts_and_umount_stops_mountd() {
    let (_w, fx) = fixture("mount_t_fuse_keibi_mounts_and_umount_stops_mountd");
    let _helper = Helper::install();
    let opts = format!("{},deadline=3s,attr_ttl=500ms", fixture_options(&fx));
    let mnt = fx.mnt().display().to_string();
    let out = mount(&["-t", "fuse.keibi", "-o", &opts, "keibi", &mnt]);
    let pid = assert_mounted_and_working(&fx, &out);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("mountd's cmdline");
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(text).collect();
    for pair in [["--deadline", "3s"], ["--attr-ttl", "500ms"]] {
        assert!(
            args.windows(2).any(|w| w == pair),
            "mountd was not given {pair:?}: {args:?}"
        );
    }
    assert_umount_stops_mountd(&fx, pid);
}

#[test]
fn fstab_line_mounts_with_mount_a() {
    let (_w, fx) = fixture("fstab_line_mounts_with_mount_a");
    let _helper = Helper::install();
    let fstab = fx.root().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test fstab\nkeibi {} fuse.keibi defaults,_netdev,{} 0 0\n",
            fx.mnt().display(),
            fixture_options(&fx)
        ),
    )
    .expect("write the fstab");
    let out = mount(&["-a", "-T", &fstab.display().to_string()]);
    let pid = assert_mounted_and_working(&fx, &out);
    assert_umount_stops_mountd(&fx, pid);
}

#[test]
fn wrong_option_fails_clearly_and_mounts_nothing() {
    let (_w, fx) = fixture("wrong_option_fails_clearly_and_mounts_nothing");
    let _helper = Helper::install();
    let mnt = fx.mnt().display().to_string();
    for (bad, says) in [
        ("deadline=soon", "option deadline=soon: not a duration"),
        ("colour=blue", "unknown option \"colour=blue\""),
        ("ro", "read-only mounts are not supported"),
    ] {
        let opts = format!("{},{bad}", fixture_options(&fx));
        let out = mount(&["-t", "fuse.keibi", "-o", &opts, "keibi", &mnt]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "-o {bad} was accepted");
        assert!(
            err.contains(says),
            "-o {bad}: the message does not say {says:?}: {err}"
        );
        assert_nothing_left(&fx);
    }
}

#[test]
fn missing_syncd_fails_clearly_and_mounts_nothing() {
    let (_w, mut fx) = fixture("missing_syncd_fails_clearly_and_mounts_nothing");
    let _helper = Helper::install();
    let (st, _) = fx.stop_syncd();
    assert!(st.success(), "syncd did not stop cleanly");
    let opts = format!("{},syncd_wait=1s", fixture_options(&fx));
    let mnt = fx.mnt().display().to_string();
    let out = mount(&["-t", "fuse.keibi", "-o", &opts, "keibi", &mnt]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(32), "mount's status: {err}");
    assert!(
        err.contains(&format!(
            "keibi-syncd is not answering at {}",
            fx.fs_socket().display()
        )),
        "the message does not name the missing syncd: {err}"
    );
    assert_nothing_left(&fx);
}
