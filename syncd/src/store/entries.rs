//! The namespace: making, linking, removing and renaming entries.
//!
//! Each operation is one transaction ([`Store::tx`]) that keeps these true:
//! every entry has its inode and its cookie; a directory's `entries` is its
//! number of entries and its `nlink` is 2 + its subdirectories; a
//! directory's `parent` names the directory holding it; the parents of a
//! changed entry get new mtime and ctime, the inode whose links changed a
//! new ctime. An inode whose last link goes is freed in the same
//! transaction, unless it is a non-directory that is open or that the
//! kernel of the mount that removed it still references: then it becomes
//! an orphan (see [`super::files`] and [`crate::opens`]). Content files and
//! extended attributes of freed inodes are removed after the commit
//! ([`Store::purge`]).
//!
//! `unlink` and `rename` take the connection the removal came on (`None`
//! for callers that are no mount, whose removals free at once).

use super::Store;
use super::names;
use super::records::InodeRec;
use super::tx::{Records, Tx, TxResult, fail};
use crate::opens::{ConnId, OpenTable};
use ipc_schema::{Attr, Caller, FileKind, FsError, Ino, Name, RenameFlags, Timestamp, fs_err};

/// Longest symlink target accepted (`PATH_MAX` without its NUL).
const MAX_TARGET: usize = 4095;

/// What an operation freed, to purge after the commit.
type Freed = Option<(u64, FileKind, u64)>;

/// What dropping a link did to the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dropped {
    /// It still has links.
    Linked,
    /// It became an orphan that the removing mount's kernel references
    /// (record it in the open table after the commit).
    Referenced(u64),
    /// It became an orphan kept by open handles alone.
    Open,
    /// It was freed (purge after the commit): inode, kind, content
    /// generation.
    Freed(u64, FileKind, u64),
}

impl Dropped {
    fn freed(self) -> Freed {
        match self {
            Dropped::Freed(ino, kind, generation) => Some((ino, kind, generation)),
            _ => None,
        }
    }
}

/// The record of a new inode of `kind` made by `caller` in directory `dir`:
/// owned by the caller; in a set-group-ID directory it takes the
/// directory's group, and a new subdirectory keeps the set-group-ID bit.
pub(crate) fn new_child(
    dir: &InodeRec,
    kind: FileKind,
    perm: u16,
    caller: Caller,
    now: Timestamp,
) -> InodeRec {
    let setgid_dir = dir.perm & (libc::S_ISGID as u16) != 0;
    let gid = if setgid_dir { dir.gid } else { caller.gid };
    let mut perm = perm & 0o7777;
    if setgid_dir && kind == FileKind::Directory {
        perm |= libc::S_ISGID as u16;
    }
    InodeRec::new(kind, perm, caller.uid, gid, now)
}

fn dec_nlink(dir: &mut InodeRec) {
    dir.nlink = dir.nlink.saturating_sub(1);
}

pub(super) fn touch(dir: &mut InodeRec, now: Timestamp) {
    dir.mtime = now;
    dir.ctime = now;
}

/// Drop one link of `ino` (record in `recs`), removed through connection
/// `by`; free it when none is left, unless it is open or the kernel of
/// `by`'s mount references it (see [`crate::opens`]): then it becomes an
/// orphan. Directories never come here.
pub(super) fn drop_link(
    t: &Tx<'_>,
    recs: &mut Records<'_, '_>,
    opens: &OpenTable,
    by: Option<ConnId>,
    ino: u64,
    now: Timestamp,
) -> TxResult<Dropped> {
    let rec = recs.get(ino)?;
    rec.nlink = rec.nlink.saturating_sub(1);
    rec.ctime = now;
    if rec.nlink > 0 {
        return Ok(Dropped::Linked);
    }
    let (kind, generation) = (rec.kind, rec.generation);
    if opens.can_reference(by) {
        t.mark_orphan(ino)?;
        return Ok(Dropped::Referenced(ino));
    }
    if opens.count(Ino(ino)) > 0 {
        t.mark_orphan(ino)?;
        return Ok(Dropped::Open);
    }
    recs.delete(ino);
    Ok(Dropped::Freed(ino, kind, generation))
}

/// After the commit of a removal, with the open table still locked:
/// record the kernel reference of an inode it left referenced.
fn note_dropped(
    opens: &mut OpenTable,
    by: Option<ConnId>,
    dropped: Result<Dropped, FsError>,
) -> Result<Dropped, FsError> {
    if let (Ok(Dropped::Referenced(ino)), Some(conn)) = (&dropped, by) {
        opens.reference(Ino(*ino), conn);
    }
    dropped
}

impl Store {
    /// Make a directory.
    pub fn mkdir(
        &self,
        parent: Ino,
        name: &Name,
        perm: u16,
        caller: Caller,
    ) -> Result<Attr, FsError> {
        self.new_node(
            parent,
            name,
            FileKind::Directory,
            perm,
            caller,
            Vec::new(),
            0,
        )
    }

    /// Make a fifo, a socket node, a device node (metadata only: its mode
    /// and device number `rdev`; the mount is `nodev`, so it cannot be
    /// opened as a device) or an empty regular file. Directories and
    /// symlinks have their own operations (EINVAL here).
    pub fn mknod(
        &self,
        parent: Ino,
        name: &Name,
        kind: FileKind,
        perm: u16,
        rdev: u32,
        caller: Caller,
    ) -> Result<Attr, FsError> {
        match kind {
            FileKind::Fifo | FileKind::Socket | FileKind::File => {
                self.new_node(parent, name, kind, perm, caller, Vec::new(), 0)
            }
            FileKind::CharDevice | FileKind::BlockDevice => {
                self.new_node(parent, name, kind, perm, caller, Vec::new(), rdev)
            }
            FileKind::Directory | FileKind::Symlink => {
                Err(fs_err!(EINVAL, "mknod cannot make a {kind:?}"))
            }
        }
    }

    /// Make a symbolic link to `target`.
    pub fn symlink(
        &self,
        parent: Ino,
        name: &Name,
        target: &[u8],
        caller: Caller,
    ) -> Result<Attr, FsError> {
        if target.is_empty() {
            return Err(fs_err!(ENOENT, "empty symlink target"));
        }
        if target.len() > MAX_TARGET {
            return Err(fs_err!(
                ENAMETOOLONG,
                "symlink target of {} bytes is longer than {MAX_TARGET}",
                target.len()
            ));
        }
        if target.contains(&0) {
            return Err(fs_err!(EINVAL, "symlink target contains NUL"));
        }
        self.new_node(
            parent,
            name,
            FileKind::Symlink,
            0o777,
            caller,
            target.to_vec(),
            0,
        )
    }

    /// The target of symlink `ino`.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>, FsError> {
        let rec = self
            .read_inode(ino.0)?
            .ok_or_else(|| fs_err!(ENOENT, "no inode {ino}"))?;
        if rec.kind != FileKind::Symlink {
            return Err(fs_err!(EINVAL, "{ino} is not a symlink"));
        }
        Ok(rec.target)
    }

    #[allow(clippy::too_many_arguments)]
    fn new_node(
        &self,
        parent: Ino,
        name: &Name,
        kind: FileKind,
        perm: u16,
        caller: Caller,
        target: Vec<u8>,
        rdev: u32,
    ) -> Result<Attr, FsError> {
        names::validate(name)?;
        let ino = if kind == FileKind::File {
            self.new_content(nix::fcntl::OFlag::O_RDONLY)?.0
        } else {
            self.alloc_ino()?
        };
        let now = Timestamp::now();
        let made = self.tx(|t| {
            let mut dir = t.need_dir(parent.0)?;
            if t.entry(parent.0, name.as_bytes())?.is_some() {
                return fail(fs_err!(EEXIST, "{name:?} exists in {parent}"));
            }
            let mut rec = new_child(&dir, kind, perm, caller, now);
            rec.target = target.clone();
            rec.rdev = rdev;
            if kind == FileKind::Directory {
                rec.parent = parent.0;
                dir.nlink += 1;
            }
            t.put(ino, &rec)?;
            t.add_entry(parent.0, &mut dir, name.as_bytes(), ino, kind)?;
            touch(&mut dir, now);
            t.put(parent.0, &dir)?;
            if super::objects::shared_kind(kind) {
                t.mark_dirty(ino)?;
            }
            Ok(rec)
        });
        match made {
            Ok(rec) => {
                self.wake_engine();
                self.attr_of(ino, &rec)
            }
            Err(e) => {
                if kind == FileKind::File {
                    let _ = self.content.remove(ino, 0);
                }
                Err(e)
            }
        }
    }

    /// Add the name `new_parent/new_name` for `ino`. Directories cannot be
    /// linked (EPERM).
    pub fn link(&self, ino: Ino, new_parent: Ino, new_name: &Name) -> Result<Attr, FsError> {
        names::validate(new_name)?;
        let now = Timestamp::now();
        let rec = self.tx(|t| {
            let mut rec = t.need(ino.0)?;
            let mut dir = t.need_dir(new_parent.0)?;
            if t.entry(new_parent.0, new_name.as_bytes())?.is_some() {
                return fail(fs_err!(EEXIST, "{new_name:?} exists in {new_parent}"));
            }
            if rec.is_dir() {
                return fail(fs_err!(
                    EPERM,
                    "{ino} is a directory; directories cannot be linked"
                ));
            }
            if rec.nlink == 0 {
                return fail(fs_err!(ENOENT, "{ino} has been unlinked"));
            }
            t.add_entry(new_parent.0, &mut dir, new_name.as_bytes(), ino.0, rec.kind)?;
            touch(&mut dir, now);
            t.put(new_parent.0, &dir)?;
            rec.nlink += 1;
            rec.ctime = now;
            t.put(ino.0, &rec)?;
            t.mark_dirty(ino.0)?;
            Ok(rec)
        })?;
        self.wake_engine();
        self.attr_of(ino.0, &rec)
    }

    /// Remove the non-directory entry `name` of `parent` (EISDIR for a
    /// directory), not on behalf of any mount.
    #[cfg(test)]
    pub fn unlink(&self, parent: Ino, name: &Name) -> Result<(), FsError> {
        self.unlink_by(None, parent, name)
    }

    /// Remove the non-directory entry `name` of `parent` (EISDIR for a
    /// directory) for the mount on connection `by`.
    pub fn unlink_by(&self, by: Option<ConnId>, parent: Ino, name: &Name) -> Result<(), FsError> {
        names::validate(name)?;
        let now = Timestamp::now();
        let mut opens = self.lock_opens();
        let dropped = self.tx(|t| {
            let mut recs = Records::new(t);
            let d = match t.entry(parent.0, name.as_bytes())? {
                Some(d) => d,
                None => {
                    t.need_dir(parent.0)?;
                    return fail(fs_err!(ENOENT, "no entry {name:?} in {parent}"));
                }
            };
            if d.kind == FileKind::Directory {
                return fail(fs_err!(EISDIR, "{name:?} in {parent} is a directory"));
            }
            let dir = recs.get(parent.0)?;
            t.remove_entry(parent.0, dir, name.as_bytes(), &d)?;
            touch(dir, now);
            t.mark_dirty(d.ino)?;
            let dropped = drop_link(t, &mut recs, &opens, by, d.ino, now)?;
            recs.commit()?;
            Ok(dropped)
        });
        let dropped = note_dropped(&mut opens, by, dropped);
        drop(opens);
        if let Some((ino, kind, generation)) = dropped?.freed() {
            self.purge(ino, kind, generation);
        }
        self.wake_engine();
        Ok(())
    }

    /// Remove the empty directory `name` of `parent`.
    pub fn rmdir(&self, parent: Ino, name: &Name) -> Result<(), FsError> {
        names::validate(name)?;
        let now = Timestamp::now();
        let freed = self.tx(|t| {
            let mut recs = Records::new(t);
            let d = match t.entry(parent.0, name.as_bytes())? {
                Some(d) => d,
                None => {
                    t.need_dir(parent.0)?;
                    return fail(fs_err!(ENOENT, "no entry {name:?} in {parent}"));
                }
            };
            if d.kind != FileKind::Directory {
                return fail(fs_err!(ENOTDIR, "{name:?} in {parent} is not a directory"));
            }
            if recs.get(d.ino)?.entries > 0 {
                return fail(fs_err!(
                    ENOTEMPTY,
                    "directory {name:?} in {parent} is not empty"
                ));
            }
            recs.delete(d.ino);
            t.mark_dirty(d.ino)?;
            let dir = recs.get(parent.0)?;
            t.remove_entry(parent.0, dir, name.as_bytes(), &d)?;
            dir.nlink = dir.nlink.saturating_sub(1);
            touch(dir, now);
            recs.commit()?;
            Ok(d.ino)
        })?;
        self.purge(freed, FileKind::Directory, 0);
        self.wake_engine();
        Ok(())
    }

    /// Rename `parent/name` to `new_parent/new_name` with `renameat2`
    /// semantics: replacing a file, or an empty directory with a directory;
    /// EISDIR/ENOTDIR when the kinds do not fit, ENOTEMPTY for a full
    /// target directory, EEXIST with `noreplace`, a swap with `exchange`,
    /// EINVAL for moving a directory into its own subtree. Two names of one
    /// inode: nothing happens. Not on behalf of any mount.
    #[cfg(test)]
    pub fn rename(
        &self,
        parent: Ino,
        name: &Name,
        new_parent: Ino,
        new_name: &Name,
        flags: RenameFlags,
    ) -> Result<(), FsError> {
        self.rename_by(None, parent, name, new_parent, new_name, flags)
    }

    /// [`Store::rename`] for the mount on connection `by` (a file replaced
    /// by the rename stays while its kernel references it).
    pub fn rename_by(
        &self,
        by: Option<ConnId>,
        parent: Ino,
        name: &Name,
        new_parent: Ino,
        new_name: &Name,
        flags: RenameFlags,
    ) -> Result<(), FsError> {
        names::validate(name)?;
        names::validate(new_name)?;
        if flags.noreplace && flags.exchange {
            return Err(fs_err!(
                EINVAL,
                "RENAME_NOREPLACE and RENAME_EXCHANGE together"
            ));
        }
        let now = Timestamp::now();
        let mut opens = self.lock_opens();
        let dropped = self.tx(|t| {
            self.rename_tx(
                t,
                (&opens, by),
                parent.0,
                name,
                new_parent.0,
                new_name,
                flags,
                now,
            )
        });
        let dropped = note_dropped(&mut opens, by, dropped);
        drop(opens);
        if let Some((ino, kind, generation)) = dropped?.freed() {
            self.purge(ino, kind, generation);
        }
        self.wake_engine();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_tx(
        &self,
        t: &Tx<'_>,
        (opens, by): (&OpenTable, Option<ConnId>),
        p: u64,
        name: &Name,
        np: u64,
        new_name: &Name,
        flags: RenameFlags,
        now: Timestamp,
    ) -> TxResult<Dropped> {
        let (n, nn) = (name.as_bytes(), new_name.as_bytes());
        t.need_dir(p)?;
        t.need_dir(np)?;
        let Some(src) = t.entry(p, n)? else {
            return fail(fs_err!(ENOENT, "no entry {name:?} in {}", Ino(p)));
        };
        let dst = t.entry(np, nn)?;
        // The checks run in the order Linux's renameat2 runs them, so the
        // errno is the one a local disk gives when several apply.
        if flags.noreplace && dst.is_some() {
            return fail(fs_err!(EEXIST, "{new_name:?} exists in {}", Ino(np)));
        }
        if flags.exchange && dst.is_none() {
            return fail(fs_err!(
                ENOENT,
                "no entry {new_name:?} in {} to exchange with",
                Ino(np)
            ));
        }
        let src_dir = src.kind == FileKind::Directory;
        if src_dir && p != np && t.is_ancestor(src.ino, np)? {
            return fail(fs_err!(
                EINVAL,
                "cannot move directory {name:?} into its own subtree"
            ));
        }
        if let Some(dst) = dst
            && dst.kind == FileKind::Directory
            && p != np
            && t.is_ancestor(dst.ino, p)?
        {
            return fail(if flags.exchange {
                fs_err!(
                    EINVAL,
                    "cannot move directory {new_name:?} into its own subtree"
                )
            } else {
                fs_err!(ENOTEMPTY, "{new_name:?} contains {name:?}")
            });
        }
        if dst.is_some_and(|d| d.ino == src.ino) {
            // The same entry, or two links of one inode: rename(2) does
            // nothing and succeeds.
            return Ok(Dropped::Linked);
        }
        let mut recs = Records::new(t);
        let mut dropped = Dropped::Linked;
        t.mark_dirty(src.ino)?;
        if let Some(dst) = dst {
            t.mark_dirty(dst.ino)?;
        }

        if let (true, Some(dst)) = (flags.exchange, dst) {
            let dst_dir = dst.kind == FileKind::Directory;
            // Names stay where they are (with their cookies); the inodes
            // they point at swap.
            t.set_entry(
                p,
                n,
                &super::records::DirentRec {
                    ino: dst.ino,
                    kind: dst.kind,
                    cookie: src.cookie,
                },
            )?;
            t.set_entry(
                np,
                nn,
                &super::records::DirentRec {
                    ino: src.ino,
                    kind: src.kind,
                    cookie: dst.cookie,
                },
            )?;
            if p != np {
                if src_dir {
                    recs.get(src.ino)?.parent = np;
                    dec_nlink(recs.get(p)?);
                    recs.get(np)?.nlink += 1;
                }
                if dst_dir {
                    recs.get(dst.ino)?.parent = p;
                    dec_nlink(recs.get(np)?);
                    recs.get(p)?.nlink += 1;
                }
            }
            recs.get(dst.ino)?.ctime = now;
        } else {
            if let Some(dst) = dst {
                let dst_dir = dst.kind == FileKind::Directory;
                match (src_dir, dst_dir) {
                    (true, false) => {
                        return fail(fs_err!(
                            ENOTDIR,
                            "cannot replace non-directory {new_name:?} with a directory"
                        ));
                    }
                    (false, true) => {
                        return fail(fs_err!(
                            EISDIR,
                            "cannot replace directory {new_name:?} with a non-directory"
                        ));
                    }
                    _ => {}
                }
                let ndir = recs.get(np)?;
                t.remove_entry(np, ndir, nn, &dst)?;
                if dst_dir {
                    if recs.get(dst.ino)?.entries > 0 {
                        return fail(fs_err!(ENOTEMPTY, "directory {new_name:?} is not empty"));
                    }
                    recs.delete(dst.ino);
                    dec_nlink(recs.get(np)?);
                    dropped = Dropped::Freed(dst.ino, FileKind::Directory, 0);
                } else {
                    dropped = drop_link(t, &mut recs, opens, by, dst.ino, now)?;
                }
            }
            let dir = recs.get(p)?;
            t.remove_entry(p, dir, n, &src)?;
            let ndir = recs.get(np)?;
            t.add_entry(np, ndir, nn, src.ino, src.kind)?;
            if src_dir && p != np {
                recs.get(src.ino)?.parent = np;
                dec_nlink(recs.get(p)?);
                recs.get(np)?.nlink += 1;
            }
        }
        recs.get(src.ino)?.ctime = now;
        touch(recs.get(p)?, now);
        touch(recs.get(np)?, now);
        recs.commit()?;
        Ok(dropped)
    }
}
