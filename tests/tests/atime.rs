//! What keibi does with atime (docs/semantics.md, "Times"):
//!
//! - a regular file's atime is its content file's, so reading the file
//!   updates it by the rules of the filesystem holding syncd's state
//!   directory (`relatime` here: an atime older than the mtime is
//!   advanced), with and without passthrough;
//! - the keibi mount's own `noatime` changes nothing for regular files
//!   (the content file's filesystem decides);
//! - listing a directory does not change its atime.
//!
//! Attributes are read with `statx(AT_STATX_FORCE_SYNC)`, which makes the
//! kernel ask mountd instead of answering from its attribute cache.

use harness::{KeibiFixture, Options, setup};
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LIMIT: Duration = Duration::from_secs(120);
/// 2001-09-09: older than any mtime the test makes.
const OLD: i64 = 1_000_000_000;

fn fresh_atime(path: &Path) -> i64 {
    let c = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: statx into a zeroed struct we own.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_ATIME,
            &mut st,
        )
    };
    assert_eq!(
        r,
        0,
        "statx {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    st.stx_atime.tv_sec
}

/// The mount options of the filesystem holding `path` (the longest
/// mountpoint above it in mountinfo).
fn mount_options_of(path: &Path) -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (mp, opts) = (f[4], f[5]);
        if path.starts_with(mp) && best.as_ref().is_none_or(|(l, _)| mp.len() > *l) {
            best = Some((mp.len(), opts.to_string()));
        }
    }
    best.expect("some mount holds the path").1
}

fn set_times(path: &Path, atime: i64, mtime: i64) {
    harness::sys::utimens(path, (atime, 0), (mtime, 0)).expect("utimensat");
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn file_atime_follows_the_content_file(fx: &KeibiFixture) {
    let state_noatime = mount_options_of(&fx.state_dir())
        .split(',')
        .any(|o| o == "noatime");
    let f = fx.path("read-me");
    fs::write(&f, vec![3u8; 64 * 1024]).expect("write");
    let start = now();
    set_times(&f, OLD, start);
    assert_eq!(fresh_atime(&f), OLD);
    assert_eq!(fs::read(&f).expect("read").len(), 64 * 1024);
    let after = fresh_atime(&f);
    if state_noatime {
        assert_eq!(after, OLD, "the state directory's filesystem is noatime");
    } else {
        assert!(
            after >= start,
            "a read advances an atime older than the mtime: {after}"
        );
    }

    // noatime on the keibi mount itself: the content file still decides.
    let st = std::process::Command::new("mount")
        .args(["-o", "remount,bind,noatime"])
        .arg(fx.mnt())
        .status()
        .expect("run mount");
    assert!(st.success(), "mount -o remount,bind,noatime");
    assert!(
        mount_options_of(&fx.mnt())
            .split(',')
            .any(|o| o == "noatime")
    );
    set_times(&f, OLD, start);
    fs::read(&f).expect("read");
    let after = fresh_atime(&f);
    if !state_noatime {
        assert!(
            after >= start,
            "noatime on the keibi mount: atime still advances: {after}"
        );
    }

    let d = fx.path("dir");
    fs::create_dir(&d).expect("mkdir");
    fs::write(d.join("x"), b"x").expect("write");
    set_times(&d, OLD, start);
    assert_eq!(fs::read_dir(&d).expect("list").count(), 1);
    assert_eq!(fresh_atime(&d), OLD, "listing a directory leaves its atime");
}

#[test]
fn file_atime_follows_the_content_file_passthrough() {
    let (_w, fx) = setup("atime", LIMIT, Options::default());
    file_atime_follows_the_content_file(&fx);
}

#[test]
fn file_atime_follows_the_content_file_plain() {
    let (_w, fx) = setup(
        "atime",
        LIMIT,
        Options {
            passthrough: false,
            ..Options::default()
        },
    );
    file_atime_follows_the_content_file(&fx);
}
