//! Opening regular files, and the life of unlinked-but-open files.
//!
//! `open` and `create` register a handle in the open table, open the
//! content file with exactly the access mode asked for (mountd gets this
//! descriptor; it must not be able to do more with it than the open
//! allows), apply `O_TRUNC` themselves, and describe the file
//! ([`ipc_schema::ContentId`]) so mountd can check the descriptor it
//! receives. The handle is registered *before* the inode can be unlinked
//! by anyone else (under the open-table lock for `open`; before the commit
//! that makes the name visible for `create`), so an unlink racing with an
//! open either happens first (the open fails with ENOENT) or sees the file
//! open and leaves an orphan.
//!
//! Each answer costs as little as it can: `create` hands over the very
//! descriptor its content file was made (or a spare opened) with, one
//! `fstat` of the descriptor gives both the attributes and the
//! `ContentId`, and a `release` writes nothing unless it frees an orphan.
//!
//! An orphan (link count 0, still open) keeps its record, its content file
//! and an `orphans` mark. The last `release` frees it. Handles of a
//! connection that ended are forgotten without freeing anything (that
//! mountd may come back with the descriptors still open); a fresh mount
//! ([`Store::free_orphans`]) frees every orphan nobody has open.

use super::entries::new_child;
use super::records::{InodeRec, be_u64};
use super::tx::fail;
use super::{Store, content_err, names, store_err};
use crate::content::ContentStat;
use crate::opens::{ConnId, next_handle};
use ipc_schema::{
    Caller, ContentId, FileKind, FsError, HandleId, Ino, Name, Opened, Timestamp, fs_err,
};
use nix::fcntl::OFlag;
use std::io;
use std::os::fd::OwnedFd;

/// A successful open: the answer for mountd and the descriptor to send it
/// (before the answer).
#[derive(Debug)]
pub struct OpenFile {
    /// The answer.
    pub opened: Opened,
    /// The content file, opened with the requested access mode.
    pub fd: OwnedFd,
}

impl Store {
    /// Open regular file `ino` for `conn` with `open(2)` `flags`.
    pub fn open(&self, ino: Ino, flags: i32, conn: ConnId) -> Result<OpenFile, FsError> {
        let handle = next_handle();
        let rec = {
            let mut opens = self.lock_opens();
            let rec = self
                .read_inode(ino.0)?
                .ok_or_else(|| fs_err!(ENOENT, "no inode {ino}"))?;
            match rec.kind {
                FileKind::File => {}
                FileKind::Directory => return Err(fs_err!(EISDIR, "{ino} is a directory")),
                FileKind::Symlink => return Err(fs_err!(ELOOP, "{ino} is a symlink")),
                k => return Err(fs_err!(ENXIO, "{ino} is a {k:?}; it has no content")),
            }
            if !opens.add(handle, ino, conn) {
                return Err(fs_err!(ESHUTDOWN, "{conn} has closed"));
            }
            rec
        };
        self.finish_open(ino.0, rec, handle, flags)
    }

    /// Create regular file `name` in `parent` and open it for `conn`. An
    /// existing entry gives EEXIST with `O_EXCL`, and is opened otherwise.
    pub fn create(
        &self,
        parent: Ino,
        name: &Name,
        perm: u16,
        flags: i32,
        caller: Caller,
        conn: ConnId,
    ) -> Result<OpenFile, FsError> {
        names::validate(name)?;
        let excl = flags & libc::O_EXCL != 0;
        if let Some(existing) = self.entry_ino(parent, name)? {
            if excl {
                return Err(fs_err!(EEXIST, "{name:?} exists in {parent}"));
            }
            return self.open(Ino(existing), flags & !libc::O_CREAT, conn);
        }
        // The content file exists before the transaction that names it,
        // and the descriptor mountd gets is the one made for it here (one
        // open, no truncation: the file is new and empty).
        let access = OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE;
        let (ino, fd) = self.new_content(access)?;
        let handle = next_handle();
        if !self.lock_opens().add(handle, Ino(ino), conn) {
            drop(fd);
            let _ = self.content.remove(ino);
            return Err(fs_err!(ESHUTDOWN, "{conn} has closed"));
        }
        let now = Timestamp::now();
        let made = self.tx(|t| {
            let mut dir = t.need_dir(parent.0)?;
            if let Some(d) = t.entry(parent.0, name.as_bytes())? {
                if excl {
                    return fail(fs_err!(EEXIST, "{name:?} exists in {parent}"));
                }
                return Ok(Err(d.ino));
            }
            let rec = new_child(&dir, FileKind::File, perm, caller, now);
            t.put(ino, &rec)?;
            t.add_entry(parent.0, &mut dir, name.as_bytes(), ino, FileKind::File)?;
            dir.mtime = now;
            dir.ctime = now;
            t.put(parent.0, &dir)?;
            Ok(Ok(rec))
        });
        match made {
            Ok(Ok(rec)) => self.describe_open(ino, &rec, handle, fd),
            other => {
                self.lock_opens().remove(handle);
                drop(fd);
                let _ = self.content.remove(ino);
                match other {
                    Ok(Err(existing)) => self.open(Ino(existing), flags & !libc::O_CREAT, conn),
                    Err(e) => Err(e),
                    Ok(Ok(_)) => Err(fs_err!(EIO, "unreachable create outcome")),
                }
            }
        }
    }

    /// Open the content file of a registered handle, truncate if asked, and
    /// describe it. On failure the handle is released again.
    fn finish_open(
        &self,
        ino: u64,
        rec: InodeRec,
        handle: HandleId,
        flags: i32,
    ) -> Result<OpenFile, FsError> {
        let opened = (|| {
            let access = OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE;
            let fd = self
                .content
                .open(ino, access)
                .map_err(|e| content_err(format!("opening {}", Ino(ino)), &e))?;
            if flags & libc::O_TRUNC != 0 && access != OFlag::O_RDONLY {
                nix::unistd::ftruncate(&fd, 0).map_err(|e| {
                    FsError::io(format!("truncating {}", Ino(ino)), &io::Error::from(e))
                })?;
            }
            Ok(fd)
        })();
        match opened {
            Ok(fd) => self.describe_open(ino, &rec, handle, fd),
            Err(e) => {
                let _ = self.release(handle);
                Err(e)
            }
        }
    }

    /// The answer to an open of `ino` (record `rec`) whose content file is
    /// open as `fd`: one `fstat` gives both the attributes and the
    /// [`ContentId`] mountd checks the descriptor against. On failure the
    /// handle is released again.
    fn describe_open(
        &self,
        ino: u64,
        rec: &InodeRec,
        handle: HandleId,
        fd: OwnedFd,
    ) -> Result<OpenFile, FsError> {
        let described = ContentStat::of(&fd)
            .map_err(|e| FsError::io(format!("fstat of {}", Ino(ino)), &e))
            .and_then(|cs| Ok((cs, self.has_xattrs(ino)?)));
        let (cs, has_xattrs) = match described {
            Ok(d) => d,
            Err(e) => {
                let _ = self.release(handle);
                return Err(e);
            }
        };
        Ok(OpenFile {
            opened: Opened {
                handle,
                attr: super::make_attr(ino, rec, Some(&cs), has_xattrs),
                content: ContentId {
                    dev: cs.dev,
                    ino: cs.ino,
                    uid: cs.uid,
                },
            },
            fd,
        })
    }

    /// Forget `handle`; the last release of an orphan frees it. Releasing an
    /// unknown handle (already released, or opened before syncd restarted)
    /// is not an error.
    pub fn release(&self, handle: HandleId) -> Result<(), FsError> {
        let mut opens = self.lock_opens();
        let Some((ino, left)) = opens.remove(handle) else {
            return Ok(());
        };
        if left > 0 {
            return Ok(());
        }
        let freed = self.free_if_orphan(ino.0)?;
        drop(opens);
        // (The usual last release, of a linked file, wrote nothing.)
        if freed {
            self.purge(ino.0, FileKind::File);
        }
        Ok(())
    }

    /// Free `ino` if it is an orphan. Call with the open table locked and
    /// the inode's count at zero; purge after unlocking.
    ///
    /// The record is read first, outside a transaction: a linked file (the
    /// common case) needs no write at all. The read is reliable because a
    /// link count only reaches zero under the open-table lock, which the
    /// caller holds; the transaction checks again.
    fn free_if_orphan(&self, ino: u64) -> Result<bool, FsError> {
        match self.read_inode(ino)? {
            Some(rec) if rec.nlink == 0 => {}
            _ => return Ok(false),
        }
        self.tx(|t| match t.inode(ino)? {
            Some(rec) if rec.nlink == 0 => {
                t.drop_inode(ino)?;
                Ok(true)
            }
            _ => Ok(false),
        })
    }

    /// Accept handles for a new filesystem connection.
    pub fn connect(&self, conn: ConnId) {
        self.lock_opens().connect(conn);
    }

    /// Forget the handles of a connection that ended.
    pub fn disconnect(&self, conn: ConnId) -> usize {
        self.lock_opens().disconnect(conn).len()
    }

    /// How many handles `conn` has open.
    pub fn open_handles(&self, conn: ConnId) -> u64 {
        self.lock_opens().handles_of(conn)
    }

    /// Free every orphan that has no handle (a fresh mount: nobody can
    /// reach them any more). Returns how many were freed.
    pub fn free_orphans(&self) -> Result<usize, FsError> {
        let mut freed = Vec::new();
        {
            let opens = self.lock_opens();
            for item in self.orphans.iter() {
                let (k, _) = item.map_err(|e| store_err("listing orphans", e))?;
                let Some(ino) = be_u64(&k) else { continue };
                if opens.count(Ino(ino)) == 0 && self.free_if_orphan(ino)? {
                    freed.push(ino);
                }
                if opens.count(Ino(ino)) == 0 && self.read_inode(ino)?.is_none() {
                    // A mark without its inode: drop the mark.
                    let _ = self.orphans.remove(k);
                }
            }
        }
        for &ino in &freed {
            self.purge(ino, FileKind::File);
        }
        Ok(freed.len())
    }
}
