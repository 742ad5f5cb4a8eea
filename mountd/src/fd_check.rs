//! Validation of every content descriptor syncd sends, before mountd uses
//! it or registers it for passthrough.
//!
//! mountd runs as root and syncd does not. With FUSE passthrough the
//! kernel keeps the backing file's path and reopens it, on every user
//! open, with the user's flags and mountd's credentials, without a
//! permission check; the access mode of the descriptor that was passed is
//! ignored. A compromised syncd could therefore hand over an `O_PATH` or
//! read-only descriptor of a file it may not write (or read), and users of
//! the mount would get root's access to it. So a descriptor is only used
//! when all of these hold:
//!
//! - `fcntl(F_GETFL)`: not `O_PATH`, and its access mode covers the access
//!   the open asked for (a read-write open needs a read-write descriptor);
//! - `fstat`: a regular file, whose `st_dev`/`st_ino` are the
//!   [`ContentId`] syncd announced in its answer, and whose owner is both
//!   the uid announced there and the uid of the process at the other end
//!   of the filesystem socket (`SO_PEERCRED`).
//!
//! The last rule confines syncd to files it owns: files it could have
//! opened itself anyway.

use ipc_schema::ContentId;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::stat::{SFlag, fstat};
use std::fmt;
use std::os::fd::AsFd;

/// The access an open asked for, or a descriptor grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `O_RDONLY`.
    Read,
    /// `O_WRONLY`.
    Write,
    /// `O_RDWR`.
    ReadWrite,
}

impl Access {
    /// The access mode of `open(2)` flags.
    pub fn of_flags(flags: i32) -> Access {
        match flags & libc::O_ACCMODE {
            libc::O_WRONLY => Access::Write,
            libc::O_RDWR => Access::ReadWrite,
            _ => Access::Read,
        }
    }

    /// Whether a descriptor with this access serves an open asking `want`.
    pub fn covers(self, want: Access) -> bool {
        self == want || self == Access::ReadWrite
    }
}

/// Why a descriptor was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Check `fd` against what syncd announced (`content`), the access the
/// open asked for (`want`) and syncd's uid as the socket saw it.
pub fn validate(
    fd: impl AsFd,
    want: Access,
    content: &ContentId,
    syncd_uid: u32,
) -> Result<(), Refused> {
    let fd = fd.as_fd();
    let raw_flags =
        fcntl(fd, FcntlArg::F_GETFL).map_err(|e| Refused(format!("fcntl(F_GETFL): {e}")))?;
    let flags = OFlag::from_bits_retain(raw_flags);
    if flags.contains(OFlag::O_PATH) {
        return Err(Refused("the descriptor is O_PATH".into()));
    }
    let has = Access::of_flags(raw_flags);
    if !has.covers(want) {
        return Err(Refused(format!(
            "the descriptor grants {has:?} access, the open asks for {want:?}"
        )));
    }
    let st = fstat(fd).map_err(|e| Refused(format!("fstat: {e}")))?;
    let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    if kind != SFlag::S_IFREG {
        return Err(Refused(format!(
            "not a regular file (mode {:o})",
            st.st_mode
        )));
    }
    if st.st_dev != content.dev || st.st_ino != content.ino {
        return Err(Refused(format!(
            "the descriptor is dev {} ino {}, syncd announced dev {} ino {}",
            st.st_dev, st.st_ino, content.dev, content.ino
        )));
    }
    if content.uid != syncd_uid {
        return Err(Refused(format!(
            "syncd announced owner uid {}, but syncd runs as uid {syncd_uid}",
            content.uid
        )));
    }
    if st.st_uid != syncd_uid {
        return Err(Refused(format!(
            "the file is owned by uid {}, not by syncd's uid {syncd_uid}",
            st.st_uid
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

    fn content_of(file: &File, uid: u32) -> ContentId {
        let m = file.metadata().expect("metadata");
        ContentId {
            dev: m.dev(),
            ino: m.ino(),
            uid,
        }
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn temp_file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("content");
        std::fs::write(&path, b"secret").expect("write");
        (dir, path)
    }

    #[test]
    fn accepts_a_matching_descriptor() {
        let (_d, path) = temp_file();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let c = content_of(&f, me());
        assert_eq!(validate(&f, Access::ReadWrite, &c, me()), Ok(()));
        assert_eq!(validate(&f, Access::Read, &c, me()), Ok(()));
        assert_eq!(validate(&f, Access::Write, &c, me()), Ok(()));
    }

    #[test]
    fn refuses_o_path() {
        let (_d, path) = temp_file();
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&path)
            .expect("open O_PATH");
        let c = {
            let m = std::fs::metadata(&path).expect("metadata");
            ContentId {
                dev: m.dev(),
                ino: m.ino(),
                uid: me(),
            }
        };
        let e = validate(&f, Access::Read, &c, me()).expect_err("O_PATH must be refused");
        assert!(e.0.contains("O_PATH"), "{e}");
    }

    #[test]
    fn refuses_a_read_only_descriptor_for_a_write_open() {
        let (_d, path) = temp_file();
        let f = File::open(&path).expect("open read-only");
        let c = content_of(&f, me());
        for want in [Access::Write, Access::ReadWrite] {
            let e = validate(&f, want, &c, me()).expect_err("narrower access must be refused");
            assert!(e.0.contains("access"), "{e}");
        }
    }

    #[test]
    fn refuses_a_file_owned_by_another_uid() {
        // The file is ours; syncd (as the socket reports it) is another uid
        // and claims that uid: the file is not syncd's.
        let (_d, path) = temp_file();
        let f = File::open(&path).expect("open");
        let other = me().wrapping_add(1);
        let c = content_of(&f, other);
        let e = validate(&f, Access::Read, &c, other).expect_err("foreign owner must be refused");
        assert!(e.0.contains("owned by uid"), "{e}");
        // syncd lying about its own uid is refused too.
        let c = content_of(&f, me());
        let e = validate(&f, Access::Read, &c, other).expect_err("uid mismatch must be refused");
        assert!(e.0.contains("announced owner uid"), "{e}");
    }

    #[test]
    fn refuses_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = File::open(dir.path()).expect("open dir");
        let c = content_of(&f, me());
        let e = validate(&f, Access::Read, &c, me()).expect_err("a directory must be refused");
        assert!(e.0.contains("not a regular file"), "{e}");
    }

    #[test]
    fn refuses_another_file_than_announced() {
        let (_d, path) = temp_file();
        let f = File::open(&path).expect("open");
        let (_d2, other_path) = temp_file();
        let other = File::open(&other_path).expect("open other");
        let c = content_of(&other, me());
        let e = validate(&f, Access::Read, &c, me()).expect_err("wrong inode must be refused");
        assert!(e.0.contains("syncd announced dev"), "{e}");
    }
}
