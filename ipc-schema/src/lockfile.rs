//! Single-instance locks for the daemons (failure mode 4 in
//! `failure-modes.md`).
//!
//! A lock is two `flock`s, each taken the same way: open, `flock(LOCK_EX |
//! LOCK_NB)`, then check that the descriptor's inode is still the inode at
//! the path, and start again if it is not (someone replaced the file between
//! our open and our lock). A lock file is never unlinked to "recover" it: a
//! held `flock` always belongs to a live process, because the kernel drops
//! it when the holder dies.
//!
//! 1. The **anchor**: a directory that is the resource itself (syncd's state
//!    directory) or stands for it. Directories cannot be replaced while they
//!    hold files, so removing or replacing the lock *file* under a running
//!    holder does not let a second instance in: it still meets the anchor's
//!    lock.
//! 2. The **lock file** in the anchor, which records the holder's pid for
//!    the message a second instance prints. A holder calls
//!    [`InstanceLock::repair`] now and then to put it back if it was removed
//!    or replaced.
//!
//! The holder's pid is read from `/proc/locks` (by the anchor's device and
//! inode), which is right even if the lock file was tampered with; the file's
//! contents are the fallback.

use nix::fcntl::{Flock, FlockArg, OFlag, open};
use nix::sys::stat::{Mode, fstat, stat};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How many times a lock is retried when the path changes under it.
const RETRIES: usize = 32;

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it.
    #[error("{what} is in use by {}", holder_text(*.pid))]
    Held {
        /// What is locked, for the message (`"state directory /var/lib/keibi"`).
        what: String,
        /// The holder's pid, when it could be found.
        pid: Option<u32>,
    },
    /// Opening or locking failed.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("another process (pid {p})"),
        None => "another process (pid unknown)".to_string(),
    }
}

/// A held instance lock; dropping it releases both locks.
pub struct InstanceLock {
    anchor_path: PathBuf,
    file_path: PathBuf,
    _anchor: Flock<OwnedFd>,
    file: Flock<File>,
}

impl std::fmt::Debug for InstanceLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceLock")
            .field("anchor", &self.anchor_path)
            .field("file", &self.file_path)
            .finish()
    }
}

impl InstanceLock {
    /// Take the lock on `anchor` (a directory) and its lock file
    /// `anchor/file_name`, then write our pid into the file. `what` names
    /// the resource in the error message.
    pub fn acquire(anchor: &Path, file_name: &str, what: &str) -> Result<InstanceLock, LockError> {
        let anchor_lock = lock_verified(anchor, what, |p| {
            open(
                p,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(io::Error::from)
        })?;
        let file_path = anchor.join(file_name);
        let file_lock = lock_verified(&file_path, what, |p| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
        })?;
        let mut lock = InstanceLock {
            anchor_path: anchor.to_path_buf(),
            file_path,
            _anchor: anchor_lock,
            file: file_lock,
        };
        lock.write_pid().map_err(|source| LockError::Io {
            path: lock.file_path.clone(),
            source,
        })?;
        Ok(lock)
    }

    fn write_pid(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        let mut f: &File = &self.file;
        f.write_all(format!("{}\n", std::process::id()).as_bytes())?;
        f.sync_all()
    }

    /// If the lock file was removed or replaced, put a fresh one (locked,
    /// with our pid) in its place. Returns whether it had to. The anchor
    /// lock is what excludes other instances; this keeps the file and its
    /// pid truthful for people and for their error messages.
    pub fn repair(&mut self) -> io::Result<bool> {
        let ours = fstat(self.file.as_fd()).map_err(io::Error::from)?;
        match stat(&self.file_path) {
            Ok(st) if st.st_ino == ours.st_ino && st.st_dev == ours.st_dev => return Ok(false),
            Ok(_) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let tmp = self
            .file_path
            .with_extension(format!("new.{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)?;
        let locked =
            Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| io::Error::from(e))?;
        std::fs::rename(&tmp, &self.file_path)?;
        self.file = locked;
        self.write_pid()?;
        Ok(true)
    }

    /// The lock file's path.
    pub fn file_path(&self) -> &Path {
        &self.file_path
    }
}

/// open → flock → verify inode → retry.
fn lock_verified<T: AsFd + nix::fcntl::Flockable>(
    path: &Path,
    what: &str,
    open_it: impl Fn(&Path) -> io::Result<T>,
) -> Result<Flock<T>, LockError> {
    let io_err = |source: io::Error| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    for _ in 0..RETRIES {
        let handle = open_it(path).map_err(io_err)?;
        let locked = match Flock::lock(handle, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((h, nix::errno::Errno::EWOULDBLOCK)) => {
                let pid = holder_pid(h.as_fd()).or_else(|| pid_in_file(path));
                return Err(LockError::Held {
                    what: what.to_string(),
                    pid,
                });
            }
            Err((_, e)) => return Err(io_err(e.into())),
        };
        let ours = fstat(locked.as_fd()).map_err(|e| io_err(e.into()))?;
        match stat(path) {
            Ok(st) if st.st_ino == ours.st_ino && st.st_dev == ours.st_dev => return Ok(locked),
            // Replaced or removed between our open and our lock: the lock
            // we hold is on an inode nobody else will look at. Again.
            Ok(_) | Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(io_err(e.into())),
        }
    }
    Err(io_err(io::Error::other(
        "the path kept changing while it was being locked",
    )))
}

fn pid_in_file(path: &Path) -> Option<u32> {
    let target = if path.is_dir() { return None } else { path };
    let mut s = String::new();
    File::open(target).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The pid holding a `flock` on the inode of `fd`, from `/proc/locks`.
fn holder_pid(fd: std::os::fd::BorrowedFd<'_>) -> Option<u32> {
    let st = fstat(fd).ok()?;
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    find_flock_holder(&text, st.st_dev, st.st_ino)
}

/// Parse `/proc/locks` for an `FLOCK` on `(dev, ino)`. Lines look like
/// `1: FLOCK  ADVISORY  WRITE 4242 fd:01:123456 0 EOF`, where the device is
/// `major:minor` in hex.
pub fn find_flock_holder(text: &str, dev: u64, ino: u64) -> Option<u32> {
    let major = libc::major(dev);
    let minor = libc::minor(dev);
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "->" marks a blocked waiter, not a holder.
        if fields.len() < 6 || fields[1] != "FLOCK" || fields.contains(&"->") {
            continue;
        }
        let mut parts = fields[5].split(':');
        let (Some(ma), Some(mi), Some(i)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let ok = u32::from_str_radix(ma, 16).ok() == Some(major)
            && u32::from_str_radix(mi, 16).ok() == Some(minor)
            && i.parse::<u64>().ok() == Some(ino);
        if ok {
            return fields[4].parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_locks() {
        let dev = libc::makedev(0xfd, 0x01);
        let text = "1: POSIX  ADVISORY  WRITE 11 fd:01:99 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fd:01:123456 0 EOF\n";
        assert_eq!(find_flock_holder(text, dev, 123456), Some(4242));
        assert_eq!(find_flock_holder(text, dev, 99), None);
    }

    #[test]
    fn second_lock_in_process_is_refused_and_names_us() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = InstanceLock::acquire(dir.path(), "lock", "test dir").expect("first lock");
        match InstanceLock::acquire(dir.path(), "lock", "test dir") {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second lock should be refused, got {other:?}"),
        }
        drop(first);
        InstanceLock::acquire(dir.path(), "lock", "test dir").expect("lock after release");
    }

    #[test]
    fn removed_or_replaced_lock_file_keeps_others_out_and_is_repaired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut held = InstanceLock::acquire(dir.path(), "lock", "test dir").expect("lock");
        std::fs::remove_file(dir.path().join("lock")).expect("remove");
        assert!(matches!(
            InstanceLock::acquire(dir.path(), "lock", "test dir"),
            Err(LockError::Held { .. })
        ));
        std::fs::write(dir.path().join("lock"), "1\n").expect("replace");
        assert!(matches!(
            InstanceLock::acquire(dir.path(), "lock", "test dir"),
            Err(LockError::Held { .. })
        ));
        assert!(held.repair().expect("repair"));
        let pid = std::fs::read_to_string(dir.path().join("lock")).expect("read");
        assert_eq!(pid.trim(), std::process::id().to_string());
        assert!(!held.repair().expect("second repair is a no-op"));
    }
}
