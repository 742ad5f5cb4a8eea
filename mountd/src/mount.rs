//! The mountpoint: making its path absolute, and clearing a dead mount
//! left by an earlier mountd.
//!
//! The single-instance lock of a mountpoint lives in its anchor directory
//! under the lock directory ([`ipc_schema::paths`], [`crate::lock_dir`]).
//!
//! A mountd killed with `SIGKILL` leaves its mount behind with no daemon:
//! every access fails with `ENOTCONN` ("Transport endpoint is not
//! connected"). Such a mount, and only such a mount, is lazily unmounted
//! (`umount2(MNT_DETACH)`): processes still inside it keep what they have,
//! and the path is free for the new mount. Holding our lock proves only
//! that no mountd *with the same lock directory* serves the path; a
//! `fuse.keibi` mount there that still answers belongs to a live mountd
//! (another lock directory, another installation) and is never touched:
//! start-up is refused instead. A mount whose `stat` does not answer
//! within [`STAT_LIMIT`] (a frozen daemon) is not dead either and is left
//! alone the same way.

use nix::mount::{MntFlags, umount2};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The filesystem type our mounts show in `/proc/self/mountinfo`.
pub const FSTYPE: &str = "fuse.keibi";

/// The mountpoint as an absolute path. Symlinks are resolved when the path
/// can be resolved; a dead mount cannot be (`ENOTCONN`), so then the path
/// is made absolute without touching it.
pub fn absolute_mountpoint(path: &Path) -> io::Result<PathBuf> {
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => std::path::absolute(path),
        Err(e) => Err(e),
    }
}

/// How long the check of an existing mount waits for `stat`.
pub const STAT_LIMIT: Duration = Duration::from_secs(5);

/// What `stat` of the mountpoint says about a mount there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `ENOTCONN`: the mount's daemon is gone.
    Dead,
    /// It answered (with attributes or another error).
    Answers,
    /// No answer within the limit (a frozen daemon).
    Silent,
}

/// `statx(AT_STATX_FORCE_SYNC)` of `path` on a thread of its own, bounded
/// by `limit` (a mount served by a frozen daemon would block the caller in
/// the kernel). `FORCE_SYNC` makes the kernel ask the daemon: a plain
/// `stat` of a dead mount's root can be answered from the attribute cache
/// for a while. A thread stuck in such a call is left behind.
pub fn probe(path: &Path, limit: Duration) -> Probe {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Probe::Answers;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("keibi-mount-probe".into())
        .spawn(move || {
            // SAFETY: statx into a zeroed struct owned by this frame, with
            // a NUL-terminated path that outlives the call.
            let mut st: libc::statx = unsafe { std::mem::zeroed() };
            let r = unsafe {
                libc::statx(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    libc::AT_STATX_FORCE_SYNC,
                    libc::STATX_BASIC_STATS,
                    &mut st,
                )
            };
            let errno = (r != 0).then(|| io::Error::last_os_error().raw_os_error());
            let _ = tx.send(errno.flatten());
        });
    if spawned.is_err() {
        return Probe::Silent;
    }
    match rx.recv_timeout(limit) {
        Ok(Some(libc::ENOTCONN)) => Probe::Dead,
        Ok(_) => Probe::Answers,
        Err(_) => Probe::Silent,
    }
}

/// Why the mountpoint cannot be used.
#[derive(Debug)]
pub enum ClearError {
    /// A keibi mount that is not dead is there.
    Live(String),
    /// Unmounting a dead mount failed.
    Io(io::Error),
}

/// Mount points of type [`FSTYPE`] at `path` in a mountinfo text.
pub fn keibi_mounts_at(mountinfo: &str, path: &Path) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let want = path.as_os_str().as_bytes();
    mountinfo
        .lines()
        .filter(|line| {
            // "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - fuse.keibi keibi rw,..."
            let Some((left, right)) = line.split_once(" - ") else {
                return false;
            };
            let fstype = right.split(' ').next().unwrap_or("");
            let mount_point = left.split(' ').nth(4).unwrap_or("");
            fstype == FSTYPE && unescape_mountinfo(mount_point) == want
        })
        .count()
}

/// Undo mountinfo's octal escapes (`\040` for a space, `\011`, `\012`,
/// `\134`).
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = (digits[0] - b'0') as u32 * 64
                    + (digits[1] - b'0') as u32 * 8
                    + (digits[2] - b'0') as u32;
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Lazily unmount every dead mount stacked at `path` (see the module
/// doc); refuse when a keibi mount there is alive. Returns how many mounts
/// were detached. Call only while holding the mountpoint's lock.
pub fn clear_dead_mounts(path: &Path) -> Result<usize, ClearError> {
    let mut cleared = 0;
    // Mounts can be stacked; a bound keeps a failing detach from looping.
    for _ in 0..16 {
        let state = probe(path, STAT_LIMIT);
        if state == Probe::Dead {
            tracing::warn!(
                mountpoint = %path.display(),
                "a mount whose daemon is gone is at the mountpoint (ENOTCONN); unmounting it lazily"
            );
            detach(path).map_err(ClearError::Io)?;
            cleared += 1;
            continue;
        }
        let listed = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| keibi_mounts_at(&t, path))
            .unwrap_or(0);
        if listed == 0 {
            return Ok(cleared);
        }
        return Err(ClearError::Live(match state {
            Probe::Silent => format!(
                "a keibi mount at {} does not answer stat within {} s: its keibi-mountd may be \
                 frozen; it is not unmounted (if its daemon is gone, unmount it with umount -l)",
                path.display(),
                STAT_LIMIT.as_secs()
            ),
            _ => format!(
                "{} is already a live keibi mount, served by another keibi-mountd (one with \
                 another --lock-dir, or another installation); it is not unmounted. Stop that \
                 keibi-mountd first",
                path.display()
            ),
        }));
    }
    Err(ClearError::Io(io::Error::other(format!(
        "{}: mounts are still stacked after 16 lazy unmounts",
        path.display()
    ))))
}

/// `umount2(path, MNT_DETACH)`.
pub fn detach(path: &Path) -> io::Result<()> {
    umount2(path, MntFlags::MNT_DETACH).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("umount2({}, MNT_DETACH): {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keibi_mounts_in_mountinfo() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
90 22 0:50 / /tmp/m\\0401 rw,nosuid,nodev,relatime - fuse.keibi keibi rw,user_id=0,group_id=0,default_permissions,allow_other
91 22 0:51 / /tmp/m2 rw,nosuid,nodev,relatime - fuse.other other rw
92 22 0:52 / /tmp/m2 rw,nosuid,nodev,relatime shared:5 - fuse.keibi keibi rw
";
        assert_eq!(keibi_mounts_at(text, Path::new("/tmp/m 1")), 1);
        assert_eq!(keibi_mounts_at(text, Path::new("/tmp/m2")), 1);
        assert_eq!(keibi_mounts_at(text, Path::new("/proc")), 0);
        assert_eq!(keibi_mounts_at(text, Path::new("/tmp/m3")), 0);
    }

    #[test]
    fn a_plain_directory_answers_and_has_nothing_to_clear() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(probe(dir.path(), STAT_LIMIT), Probe::Answers);
        assert_eq!(
            probe(&dir.path().join("missing"), STAT_LIMIT),
            Probe::Answers,
            "ENOENT is an answer, not a dead mount"
        );
        assert!(matches!(clear_dead_mounts(dir.path()), Ok(0)));
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mountinfo("a\\040b\\134c\\"), b"a b\\c\\".to_vec());
    }
}
