//! Where a mount's files live, shared by keibi-mountd (which makes them)
//! and keibictl (which finds them).
//!
//! Each mountpoint has an anchor directory `<lock dir>/<anchor name>/`
//! holding its single-instance `lock`, mountd's `ops.sock` (`keibictl
//! debug ops`) and a `mountpoint` file with the full mountpoint path, for
//! people and tools that list the lock directory.
//!
//! The anchor name has a fixed length whatever the mountpoint: `m-` and the
//! first 128 bits of the SHA-256 of the absolute mountpoint's bytes, in
//! hex. A name derived by escaping the path would grow with it: past 255
//! bytes it cannot be a directory name, and long before that the socket
//! path exceeds the 108 bytes of `sun_path`. With the default lock
//! directory (`/run/keibi-mountd`) the ops socket path is 61 bytes for any
//! mountpoint.
//!
//! [`escape_path`] (systemd's escaping) still names the mountpoint's
//! `keibi-mountd@.service` instance.

use sha2::{Digest, Sha256};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Name of mountd's debug socket in the anchor directory.
pub const OPS_SOCKET: &str = "ops.sock";

/// Name of the single-instance lock file in the anchor directory.
pub const LOCK_FILE: &str = "lock";

/// Name of the file in the anchor directory that holds the mountpoint
/// (its bytes, then a newline).
pub const MOUNTPOINT_FILE: &str = "mountpoint";

/// mountd's default lock directory: root's own, not syncd's runtime
/// directory.
pub const DEFAULT_LOCK_DIR: &str = "/run/keibi-mountd";

/// Longest socket path `bind`/`connect` accept (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The anchor directory of `mountpoint` (an absolute path) under `lock_dir`.
pub fn mount_anchor(lock_dir: &Path, mountpoint: &Path) -> PathBuf {
    lock_dir.join(anchor_name(mountpoint))
}

/// The anchor directory's name for `mountpoint`: `m-` and 32 hex digits.
pub fn anchor_name(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let digest = Sha256::digest(mountpoint.as_os_str().as_bytes());
    let mut out = String::with_capacity(34);
    out.push_str("m-");
    for b in &digest[..16] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The ops socket of `mountpoint` under `lock_dir`.
pub fn ops_socket(lock_dir: &Path, mountpoint: &Path) -> PathBuf {
    mount_anchor(lock_dir, mountpoint).join(OPS_SOCKET)
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
    }

    #[test]
    fn anchor_names_have_a_fixed_length() {
        // SHA-256("/mnt/keibi") starts with these 16 bytes (checked with
        // `printf %s /mnt/keibi | sha256sum`).
        let want = format!("m-{}", &sha256_hex("/mnt/keibi")[..32]);
        assert_eq!(anchor_name(Path::new("/mnt/keibi")), want);
        let deep = format!("/{}", "d".repeat(200)).repeat(15);
        let name = anchor_name(Path::new(&deep));
        assert_eq!(name.len(), 34);
        assert_ne!(name, anchor_name(Path::new("/mnt/keibi2")));
        let sock = ops_socket(Path::new(DEFAULT_LOCK_DIR), Path::new(&deep));
        assert_eq!(sock.as_os_str().len(), 61);
        assert!(sock.as_os_str().len() <= MAX_SOCKET_PATH);
        assert_eq!(
            mount_anchor(Path::new("/run/keibi-mountd"), Path::new("/mnt/keibi")),
            PathBuf::from(format!("/run/keibi-mountd/{want}"))
        );
    }

    fn sha256_hex(s: &str) -> String {
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin
                    .take()
                    .expect("stdin is piped")
                    .write_all(s.as_bytes())?;
                c.wait_with_output()
            })
            .expect("run sha256sum (coreutils)");
        String::from_utf8_lossy(&out.stdout)[..64].to_string()
    }
}
