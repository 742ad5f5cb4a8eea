//! mountd's lock directory: where each mountpoint's anchor (its
//! single-instance lock, the ops socket and the `mountpoint` file) lives,
//! and the check that nobody but root can move or replace them.
//!
//! The lock and the root-only ops socket protect nothing if an
//! unprivileged user can rename a directory on their path: the lock would
//! be bypassed (a second mountd would find no lock) and the socket's
//! permissions could be swapped for a socket of the user's own. So the
//! lock directory is created by mountd (default
//! [`ipc_schema::paths::DEFAULT_LOCK_DIR`], mode 0755, owned by root), and
//! before use every directory from `/` down to the anchor, along the path
//! as given and along its resolved form, must be owned by root and not
//! writable by group or others, unless it has the sticky bit (`/tmp`):
//! there only an entry's owner can rename or remove it, and every entry
//! below is itself checked to be root's. Anything else is refused with a
//! message naming the directory. POSIX ACLs granting write access are not
//! checked.
//!
//! The directory must not be keibi-syncd's runtime directory
//! (`/run/keibi`): systemd gives that to the `keibi` user.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

/// Create `lock_dir` (and missing parents, mode 0755) and the anchor
/// `anchor` below it, then check that the whole path is root's alone (see
/// the module doc). Returns a message fit for the user on failure.
pub fn prepare(lock_dir: &Path, anchor: &Path) -> Result<(), String> {
    for dir in [lock_dir, anchor] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| format!("cannot create the lock directory {}: {e}", dir.display()))?;
    }
    check_root_only(anchor).map_err(|why| {
        format!(
            "refusing the lock directory {}: {why}; the mountpoint's lock and ops socket must live \
             where only root can rename or replace them (the default {} is made that way; never \
             put it inside keibi-syncd's runtime directory)",
            lock_dir.display(),
            ipc_schema::paths::DEFAULT_LOCK_DIR
        )
    })
}

/// Check that `dir` and every directory above it, along the path as given
/// and along its resolved form, can be changed by root only.
pub fn check_root_only(dir: &Path) -> Result<(), String> {
    let given = std::path::absolute(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    check_chain(&given)?;
    let resolved = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if resolved != given {
        check_chain(&resolved)?;
    }
    Ok(())
}

/// Check every prefix of the absolute path `path` with `lstat` (a symlink
/// on the way is judged by its owner; its target's path is checked when
/// the resolved form is).
fn check_chain(path: &Path) -> Result<(), String> {
    let mut prefix = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => prefix.push("/"),
            Component::Normal(n) => prefix.push(n),
            Component::CurDir => continue,
            Component::ParentDir => prefix.push(".."),
            Component::Prefix(_) => continue,
        }
        let md =
            std::fs::symlink_metadata(&prefix).map_err(|e| format!("{}: {e}", prefix.display()))?;
        judge(&prefix, md.uid(), md.mode(), md.file_type().is_symlink())?;
    }
    Ok(())
}

/// The rule for one path element.
fn judge(path: &Path, uid: u32, mode: u32, symlink: bool) -> Result<(), String> {
    if uid != 0 {
        return Err(format!(
            "{} is owned by uid {uid}, not root",
            path.display()
        ));
    }
    let sticky = mode & libc::S_ISVTX != 0;
    if !symlink && mode & 0o022 != 0 && !sticky {
        return Err(format!(
            "{} is writable by its group or by others (mode {:04o})",
            path.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Record `mountpoint` in the anchor's `mountpoint` file (its bytes and a
/// newline), for people and tools listing the lock directory. Written to a
/// temporary name and renamed, so a reader never sees half of it.
pub fn record_mountpoint(anchor: &Path, mountpoint: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let tmp = anchor.join(format!("{}.tmp", ipc_schema::paths::MOUNTPOINT_FILE));
    let mut bytes = mountpoint.as_os_str().as_bytes().to_vec();
    bytes.push(b'\n');
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, anchor.join(ipc_schema::paths::MOUNTPOINT_FILE))
}

/// Fail when the ops socket of `anchor` would not fit in `sun_path`.
pub fn check_socket_fits(anchor: &Path) -> Result<(), String> {
    let sock = anchor.join(ipc_schema::paths::OPS_SOCKET);
    let len = sock.as_os_str().len();
    if len > ipc_schema::paths::MAX_SOCKET_PATH {
        return Err(format!(
            "the ops socket path {} is {len} bytes, more than a socket path can hold ({}); \
             choose a shorter --lock-dir (the anchor name below it has a fixed length)",
            sock.display(),
            ipc_schema::paths::MAX_SOCKET_PATH
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn judges_owner_and_write_bits() {
        let p = Path::new("/x");
        assert!(judge(p, 0, 0o40755, false).is_ok());
        assert!(judge(p, 0, 0o41777, false).is_ok(), "sticky like /tmp");
        assert!(judge(p, 0, 0o40775, false).is_err());
        assert!(judge(p, 0, 0o40757, false).is_err());
        assert!(judge(p, 65534, 0o40755, false).is_err());
        assert!(judge(p, 0, 0o120777, true).is_ok(), "a root symlink");
        assert!(judge(p, 1000, 0o120777, true).is_err());
    }

    #[test]
    fn refuses_a_directory_an_unprivileged_user_owns() {
        // Tests of mountd run as root (it is a root daemon).
        let base = tempfile::Builder::new()
            .prefix("kblk")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let good = base.path().join("locks");
        prepare(&good, &good.join("m-1")).expect("a root-owned lock dir is fine");
        let mode = std::fs::metadata(&good).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);

        let theirs = base.path().join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        let err = prepare(&theirs.join("mounts"), &theirs.join("mounts/m-1"))
            .expect_err("a lock dir below nobody's directory must be refused");
        assert!(err.contains("owned by uid 65534"), "{err}");

        let open = base.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = prepare(&open, &open.join("m-1")).expect_err("world-writable");
        assert!(err.contains("writable by its group or by others"), "{err}");
    }

    #[test]
    fn long_lock_dirs_are_refused_before_binding() {
        let short = Path::new("/run/keibi-mountd/m-0123456789abcdef0123456789abcdef");
        assert!(check_socket_fits(short).is_ok());
        let long = PathBuf::from(format!("/{}/m-0", "l".repeat(120)));
        assert!(check_socket_fits(&long).is_err());
    }
}
