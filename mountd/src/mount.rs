//! The mountpoint: its lock directory name, and clearing a dead mount left
//! by an earlier mountd.
//!
//! The single-instance lock of a mountpoint lives in
//! `<lock dir>/<escaped mountpoint>/lock` ([`ipc_schema::paths`]).
//!
//! A mountd killed with `SIGKILL` leaves its mount behind with no daemon:
//! every access fails with `ENOTCONN` ("Transport endpoint is not
//! connected"). Once we hold the mountpoint's lock, no live keibi-mountd
//! serves it, so such a mount, or any `fuse.keibi` mount still listed at
//! the path in `/proc/self/mountinfo`, is lazily unmounted
//! (`umount2(MNT_DETACH)`): processes still inside it keep what they have,
//! and the path is free for the new mount.

use nix::mount::{MntFlags, umount2};
use std::io;
use std::path::{Path, PathBuf};

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

/// Whether `path` is a mount whose daemon is gone.
pub fn is_dead_mount(path: &Path) -> bool {
    matches!(nix::sys::stat::stat(path), Err(nix::errno::Errno::ENOTCONN))
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

/// Lazily unmount whatever dead or leftover keibi mount is at `path`.
/// Returns how many mounts were detached. Call only while holding the
/// mountpoint's lock.
pub fn clear_stale_mounts(path: &Path) -> io::Result<usize> {
    let mut cleared = 0;
    // Mounts can be stacked; a bound keeps a failing detach from looping.
    for _ in 0..16 {
        let dead = is_dead_mount(path);
        let listed = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| keibi_mounts_at(&t, path))
            .unwrap_or(0);
        if !dead && listed == 0 {
            break;
        }
        tracing::warn!(
            mountpoint = %path.display(),
            dead,
            "a keibi mount without a live keibi-mountd is at the mountpoint; unmounting it lazily"
        );
        detach(path)?;
        cleared += 1;
    }
    Ok(cleared)
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
    fn unescapes_octal() {
        assert_eq!(unescape_mountinfo("a\\040b\\134c\\"), b"a b\\c\\".to_vec());
    }
}
