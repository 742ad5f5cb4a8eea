//! The view of the store inside one sled transaction.
//!
//! Every operation that changes more than one key runs as one multi-tree
//! transaction ([`super::Store::tx`]), so a crash or a concurrent operation
//! never sees half of it: an entry without its inode, a cookie without its
//! entry, a directory whose counts disagree with its entries. sled may run
//! the closure more than once (on conflict), so closures only read and
//! write through this view and keep side effects (content files) outside.

use super::records::{
    DirentRec, InodeRec, cookie_key, decode, dirent_key, encode, ino_key, link_key,
};
use ipc_schema::{FileKind, FsError, Ino, fs_err};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Result inside a transaction closure; `Abort` carries the errno.
pub type TxResult<T> = Result<T, ConflictableTransactionError<FsError>>;

/// Abort the transaction with `e`.
pub fn fail<T>(e: FsError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// The trees, as one transaction sees them.
pub struct Tx<'a> {
    /// `inodes` tree.
    pub inodes: &'a TransactionalTree,
    /// `dirents` tree.
    pub dirents: &'a TransactionalTree,
    /// `cookies` tree.
    pub cookies: &'a TransactionalTree,
    /// `xattrs` tree.
    pub xattrs: &'a TransactionalTree,
    /// `orphans` tree.
    pub orphans: &'a TransactionalTree,
    /// `dirty` tree (see [`super::objects`]).
    pub dirty: &'a TransactionalTree,
    /// `links` tree (see [`super::records`]).
    pub links: &'a TransactionalTree,
    /// The store's dirty mark counter.
    pub marks: &'a AtomicU64,
}

impl Tx<'_> {
    /// The record of `ino`, if any.
    pub fn inode(&self, ino: u64) -> TxResult<Option<InodeRec>> {
        match self.inodes.get(ino_key(ino))? {
            None => Ok(None),
            Some(v) => match decode(&v) {
                Ok(r) => Ok(Some(r)),
                Err(e) => fail(fs_err!(EIO, "corrupt record of {}: {e}", Ino(ino))),
            },
        }
    }

    /// The record of `ino`; ENOENT if there is none.
    pub fn need(&self, ino: u64) -> TxResult<InodeRec> {
        match self.inode(ino)? {
            Some(r) => Ok(r),
            None => fail(fs_err!(ENOENT, "no inode {}", Ino(ino))),
        }
    }

    /// The record of directory `ino`; ENOENT if absent, ENOTDIR if it is
    /// not a directory.
    pub fn need_dir(&self, ino: u64) -> TxResult<InodeRec> {
        let r = self.need(ino)?;
        if !r.is_dir() {
            return fail(fs_err!(ENOTDIR, "{} is not a directory", Ino(ino)));
        }
        Ok(r)
    }

    /// Write the record of `ino`.
    pub fn put(&self, ino: u64, rec: &InodeRec) -> TxResult<()> {
        self.inodes.insert(&ino_key(ino), encode(rec))?;
        Ok(())
    }

    /// Delete the record of `ino` (and its orphan mark). Its extended
    /// attributes are removed after the commit (a prefix scan is not
    /// possible in a transaction; nothing can reach them meanwhile).
    pub fn drop_inode(&self, ino: u64) -> TxResult<()> {
        self.inodes.remove(&ino_key(ino))?;
        self.orphans.remove(&ino_key(ino))?;
        Ok(())
    }

    /// Mark `ino` dirty: its shared state changes in this transaction, so
    /// the sync engine versions it (see [`super::objects`]).
    pub fn mark_dirty(&self, ino: u64) -> TxResult<()> {
        let mark = self.marks.fetch_add(1, Ordering::Relaxed);
        self.dirty.insert(&ino_key(ino), &mark.to_be_bytes())?;
        Ok(())
    }

    /// Mark `ino` as unlinked but open.
    pub fn mark_orphan(&self, ino: u64) -> TxResult<()> {
        self.orphans.insert(&ino_key(ino), &[][..])?;
        Ok(())
    }

    /// The entry `name` of directory `parent`, if any.
    pub fn entry(&self, parent: u64, name: &[u8]) -> TxResult<Option<DirentRec>> {
        match self.dirents.get(dirent_key(parent, name))? {
            None => Ok(None),
            Some(v) => match decode(&v) {
                Ok(d) => Ok(Some(d)),
                Err(e) => fail(fs_err!(EIO, "corrupt entry in {}: {e}", Ino(parent))),
            },
        }
    }

    /// Overwrite an existing entry's target (RENAME_EXCHANGE), keeping its
    /// cookie.
    pub fn set_entry(&self, parent: u64, name: &[u8], d: &DirentRec) -> TxResult<()> {
        if let Some(old) = self.entry(parent, name)? {
            self.links.remove(link_key(old.ino, parent, name))?;
        }
        self.dirents.insert(dirent_key(parent, name), encode(d))?;
        self.links.insert(link_key(d.ino, parent, name), &[][..])?;
        Ok(())
    }

    /// Add entry `name` → `ino` to directory `parent` (record `dir`, which
    /// the caller writes back): a fresh cookie, one more entry.
    pub fn add_entry(
        &self,
        parent: u64,
        dir: &mut InodeRec,
        name: &[u8],
        ino: u64,
        kind: FileKind,
    ) -> TxResult<()> {
        let cookie = dir.next_cookie;
        dir.next_cookie += 1;
        dir.entries += 1;
        let d = DirentRec { ino, kind, cookie };
        self.dirents.insert(dirent_key(parent, name), encode(&d))?;
        self.cookies.insert(&cookie_key(parent, cookie), name)?;
        self.links.insert(link_key(ino, parent, name), &[][..])?;
        Ok(())
    }

    /// Remove entry `name` (found as `d`) from directory `parent` (record
    /// `dir`, which the caller writes back).
    pub fn remove_entry(
        &self,
        parent: u64,
        dir: &mut InodeRec,
        name: &[u8],
        d: &DirentRec,
    ) -> TxResult<()> {
        self.dirents.remove(dirent_key(parent, name))?;
        self.cookies.remove(&cookie_key(parent, d.cookie))?;
        self.links.remove(link_key(d.ino, parent, name))?;
        dir.entries = dir.entries.saturating_sub(1);
        Ok(())
    }

    /// Whether directory `ancestor` is `ino` or one of its ancestors.
    pub fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> TxResult<bool> {
        // Bounded walk: a cycle in parent pointers would be corruption.
        for _ in 0..1_000_000 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == Ino::ROOT.0 {
                return Ok(false);
            }
            ino = self.need(ino)?.parent;
        }
        fail(fs_err!(
            EIO,
            "directory parent chain too long at {}",
            Ino(ino)
        ))
    }
}

/// Inode records read and changed during one transaction, written back
/// together by [`Records::commit`]. Operations that touch the same record
/// twice (rename within one directory) then see one copy of it.
pub struct Records<'t, 'a> {
    tx: &'t Tx<'a>,
    recs: BTreeMap<u64, Option<InodeRec>>,
}

impl<'t, 'a> Records<'t, 'a> {
    /// An empty set over `tx`.
    pub fn new(tx: &'t Tx<'a>) -> Self {
        Records {
            tx,
            recs: BTreeMap::new(),
        }
    }

    /// The record of `ino` for changing; ENOENT if there is none.
    pub fn get(&mut self, ino: u64) -> TxResult<&mut InodeRec> {
        if !self.recs.contains_key(&ino) {
            let r = self.tx.need(ino)?;
            self.recs.insert(ino, Some(r));
        }
        match self.recs.get_mut(&ino) {
            Some(Some(r)) => Ok(r),
            _ => fail(fs_err!(ENOENT, "no inode {}", Ino(ino))),
        }
    }

    /// Delete the record of `ino` at commit.
    pub fn delete(&mut self, ino: u64) {
        self.recs.insert(ino, None);
    }

    /// Write every changed record.
    pub fn commit(self) -> TxResult<()> {
        for (ino, r) in &self.recs {
            match r {
                Some(r) => self.tx.put(*ino, r)?,
                None => self.tx.drop_inode(*ino)?,
            }
        }
        Ok(())
    }
}
