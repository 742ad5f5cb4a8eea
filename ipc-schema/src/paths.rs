//! Where a mount's files live, shared by keibi-mountd (which makes them)
//! and keibictl (which finds them).
//!
//! Each mountpoint has an anchor directory `<lock dir>/<escaped
//! mountpoint>/` holding its single-instance `lock` and mountd's `ops.sock`
//! (`keibictl debug ops`). The escaping is systemd's (`systemd-escape
//! --path`), so the directory has the name of the mountpoint's
//! `keibi-mountd@.service` instance.

use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Name of mountd's debug socket in the anchor directory.
pub const OPS_SOCKET: &str = "ops.sock";

/// The anchor directory of `mountpoint` (an absolute path) under `lock_dir`.
pub fn mount_anchor(lock_dir: &Path, mountpoint: &Path) -> PathBuf {
    lock_dir.join(escape_path(mountpoint))
}

/// systemd's escaping of an absolute path: components joined by `-`, bytes
/// other than ASCII alphanumerics, `:`, `_` and a non-leading `.` written
/// as `\xNN`; `/` alone is `-`. `/mnt/my keibi` → `mnt-my\x20keibi`.
pub fn escape_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let parts: Vec<&[u8]> = bytes
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    if parts.is_empty() {
        return "-".to_string();
    }
    let mut out = String::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for (j, &b) in part.iter().enumerate() {
            let plain = b.is_ascii_alphanumeric()
                || b == b':'
                || b == b'_'
                || (b == b'.' && !(i == 0 && j == 0));
            if plain {
                out.push(b as char);
            } else {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_systemd() {
        assert_eq!(escape_path(Path::new("/")), "-");
        assert_eq!(escape_path(Path::new("/mnt/keibi")), "mnt-keibi");
        assert_eq!(escape_path(Path::new("/mnt//keibi/")), "mnt-keibi");
        assert_eq!(escape_path(Path::new("/tmp/my keibi")), "tmp-my\\x20keibi");
        assert_eq!(escape_path(Path::new("/a-b/c_d.e")), "a\\x2db-c_d.e");
        assert_eq!(escape_path(Path::new("/.hidden")), "\\x2ehidden");
        assert_eq!(
            mount_anchor(Path::new("/run/keibi/mounts"), Path::new("/mnt/keibi")),
            PathBuf::from("/run/keibi/mounts/mnt-keibi")
        );
    }
}
