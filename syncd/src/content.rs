//! Content files: the bytes of regular files, one ordinary file per inode
//! under `<state>/content/`, named by the inode number in 16 hex digits and
//! created with mode 0600 (only syncd's user can open them).
//!
//! syncd rarely touches the bytes itself: it opens a content file with the
//! access mode an `open` asked for and passes the descriptor to mountd,
//! which reads and writes through it. So a regular file's size, blocks,
//! atime and mtime are read from the content file (`stat`) whenever syncd
//! answers, and `setattr` changes them here (truncate, `futimens`).
//!
//! A content file is created before the transaction that links its inode
//! into the tree and removed after the one that frees the inode, so the
//! store never names a missing file; a crash in between leaves at most an
//! unreferenced file, which [`ContentDir::sweep`] removes at the next start.

use ipc_schema::{StatFs, TimeSet, Timestamp};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use std::fs::{File, FileTimes, Metadata, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the store needs from a content file's `stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentStat {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_uid`.
    pub uid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Preferred I/O size.
    pub blksize: u32,
    /// Last access.
    pub atime: Timestamp,
    /// Last modification.
    pub mtime: Timestamp,
    /// Last status change.
    pub ctime: Timestamp,
}

impl From<&Metadata> for ContentStat {
    fn from(m: &Metadata) -> Self {
        let ts = |secs: i64, nanos: i64| Timestamp {
            secs,
            nanos: nanos.clamp(0, 999_999_999) as u32,
        };
        ContentStat {
            dev: m.dev(),
            ino: m.ino(),
            uid: m.uid(),
            size: m.size(),
            blocks: m.blocks(),
            blksize: m.blksize().min(u64::from(u32::MAX)) as u32,
            atime: ts(m.atime(), m.atime_nsec()),
            mtime: ts(m.mtime(), m.mtime_nsec()),
            ctime: ts(m.ctime(), m.ctime_nsec()),
        }
    }
}

/// The content directory of a state directory.
#[derive(Debug)]
pub struct ContentDir {
    dir: PathBuf,
}

impl ContentDir {
    /// Use (and create if needed, mode 0700) `<state_dir>/content`.
    pub fn new(state_dir: &Path) -> io::Result<ContentDir> {
        let dir = state_dir.join("content");
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(ContentDir { dir })
    }

    /// Path of the content file of `ino`.
    pub fn path(&self, ino: u64) -> PathBuf {
        self.dir.join(format!("{ino:016x}"))
    }

    /// Create the (empty) content file of a new inode.
    pub fn create(&self, ino: u64) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(self.path(ino))
            .map(drop)
    }

    /// Open the content file of `ino` with `access` (`O_RDONLY`, `O_WRONLY`
    /// or `O_RDWR`) and nothing else but close-on-exec.
    pub fn open(&self, ino: u64, access: OFlag) -> io::Result<OwnedFd> {
        nix::fcntl::open(
            &self.path(ino),
            (access & OFlag::O_ACCMODE) | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map_err(io::Error::from)
    }

    /// Set the size of the content file of `ino`.
    pub fn truncate(&self, ino: u64, size: u64) -> io::Result<()> {
        self.open_file(ino, true)?.set_len(size)
    }

    /// `stat` of the content file of `ino`.
    pub fn stat(&self, ino: u64) -> io::Result<ContentStat> {
        std::fs::symlink_metadata(self.path(ino)).map(|m| ContentStat::from(&m))
    }

    /// Set the access and/or modification time of the content file.
    pub fn set_times(
        &self,
        ino: u64,
        atime: Option<TimeSet>,
        mtime: Option<TimeSet>,
    ) -> io::Result<()> {
        let mut times = FileTimes::new();
        if let Some(a) = atime {
            times = times.set_accessed(system_time(a));
        }
        if let Some(m) = mtime {
            times = times.set_modified(system_time(m));
        }
        self.open_file(ino, false)?.set_times(times)
    }

    /// Remove the content file of `ino`; a missing file is not an error.
    pub fn remove(&self, ino: u64) -> io::Result<()> {
        match std::fs::remove_file(self.path(ino)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Make the content file of `ino` (and its name in the content
    /// directory) durable.
    pub fn sync(&self, ino: u64, datasync: bool) -> io::Result<()> {
        let f = self.open_file(ino, false)?;
        if datasync {
            f.sync_data()?;
        } else {
            f.sync_all()?;
        }
        File::open(&self.dir)?.sync_all()
    }

    /// Statistics of the filesystem holding the content.
    pub fn statfs(&self) -> io::Result<StatFs> {
        let s = nix::sys::statvfs::statvfs(&self.dir).map_err(io::Error::from)?;
        Ok(StatFs {
            blocks: s.blocks(),
            bfree: s.blocks_free(),
            bavail: s.blocks_available(),
            files: s.files(),
            ffree: s.files_free(),
            bsize: s.block_size() as u32,
            namelen: ipc_schema::Name::MAX_LEN as u32,
            frsize: s.fragment_size() as u32,
        })
    }

    /// Remove content files whose inode `exists` says is gone (left by a
    /// crash between creating a file and committing its inode). Returns how
    /// many were removed. Call before serving anything.
    pub fn sweep(&self, exists: impl Fn(u64) -> bool) -> io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(ino) = name
                .to_str()
                .filter(|s| s.len() == 16)
                .and_then(|s| u64::from_str_radix(s, 16).ok())
            else {
                continue;
            };
            if !exists(ino) {
                self.remove(ino)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn open_file(&self, ino: u64, write: bool) -> io::Result<File> {
        OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(self.path(ino))
    }
}

fn system_time(t: TimeSet) -> SystemTime {
    match t {
        TimeSet::Now => SystemTime::now(),
        TimeSet::At(ts) => {
            let nanos = Duration::from_nanos(u64::from(ts.nanos));
            if ts.secs >= 0 {
                UNIX_EPOCH + Duration::from_secs(ts.secs as u64) + nanos
            } else {
                UNIX_EPOCH - Duration::from_secs(ts.secs.unsigned_abs()) + nanos
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_open_truncate_times_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ContentDir::new(dir.path()).expect("content dir");
        c.create(0x2a).expect("create");
        assert!(c.path(0x2a).ends_with("000000000000002a"));
        let md = std::fs::metadata(c.path(0x2a)).expect("stat");
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert!(c.create(0x2a).is_err(), "create is exclusive");
        c.truncate(0x2a, 5000).expect("truncate");
        assert_eq!(c.stat(0x2a).expect("stat").size, 5000);
        let fd = c.open(0x2a, OFlag::O_RDONLY).expect("open");
        let fl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).expect("getfl");
        assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
        let t = Timestamp {
            secs: 1_000_000,
            nanos: 5,
        };
        c.set_times(0x2a, None, Some(TimeSet::At(t)))
            .expect("times");
        assert_eq!(c.stat(0x2a).expect("stat").mtime, t);
        c.sync(0x2a, true).expect("sync");
        c.remove(0x2a).expect("remove");
        c.remove(0x2a).expect("removing twice is fine");
    }

    #[test]
    fn sweep_removes_only_unreferenced_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ContentDir::new(dir.path()).expect("content dir");
        c.create(2).expect("create");
        c.create(3).expect("create");
        assert_eq!(c.sweep(|ino| ino == 2).expect("sweep"), 1);
        assert!(c.stat(2).is_ok());
        assert!(c.stat(3).is_err());
    }
}
