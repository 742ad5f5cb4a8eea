//! Opening regular files, and the life of unlinked-but-open files.
//!
//! `open` and `create` register a handle in the open table, open the
//! content file with exactly the access mode asked for (mountd gets this
//! descriptor; it must not be able to do more with it than the open
//! allows), apply `O_TRUNC` themselves, and describe the file
//! ([`ipc_schema::ContentId`]) so mountd can check the descriptor it
//! receives. The handle is registered *before* the inode can be unlinked
//! by anyone else (under the open-table lock, which `unlink` and `rename`
//! hold across their transactions, for `open` and for `create` of an
//! existing name; before the commit that makes the name visible for a new
//! file), so an unlink racing with an open either happens first (the open
//! fails with ENOENT, or `create` makes a new file) or sees the file open
//! and leaves an orphan.
//!
//! Each answer costs as little as it can: `create` hands over the very
//! descriptor its content file was made (or a spare opened) with, one
//! `fstat` of the descriptor gives both the attributes and the
//! `ContentId`, and a `release` writes nothing unless it frees an orphan.
//!
//! An orphan (link count 0, still open or still referenced by the kernel
//! of the mount that removed it, see [`crate::opens`]) keeps its record,
//! its content file and an `orphans` mark; it can still be opened by
//! number and answers `getattr` with `nlink` 0, as on a local disk. The
//! last `release` or mountd's `forget` ([`Store::forget`]), whichever
//! comes last, frees it. Handles and kernel references of a connection
//! that ended are parked until its mount registers again
//! ([`Store::register_mount`]), which settles them against the lists of
//! handles mountd still holds and inodes its kernel still references, and
//! frees every orphan nobody holds.
//!
//! Handle ids are unique across restarts: [`Store::begin_handle_epoch`]
//! gives each syncd run its own epoch (see [`crate::opens`]).

use super::entries::new_child;
use super::records::{InodeRec, be_u64, ino_key};
use super::tx::fail;
use super::{Store, content_err, names, store_err};
use crate::content::ContentStat;
use crate::opens::{ConnId, MountKey, Settled, next_handle, set_handle_epoch};
use ipc_schema::{
    Caller, ContentId, FileKind, FsError, HandleId, Ino, Name, Opened, Timestamp, fs_err,
};
use nix::fcntl::OFlag;
use std::io;
use std::os::fd::OwnedFd;

/// The most orphans one transaction frees ([`Store::forget`]).
const FREED_PER_TX: usize = 256;

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
            check_openable(ino, &rec)?;
            if !opens.add_open(handle, ino, conn, rec.generation, writes(flags)) {
                return Err(fs_err!(ESHUTDOWN, "{conn} has closed"));
            }
            rec
        };
        self.finish_open(ino.0, rec, handle, flags)
    }

    /// Create regular file `name` in `parent` and open it for `conn`. An
    /// existing entry gives EEXIST with `O_EXCL`, and is opened otherwise.
    ///
    /// The name is resolved and an existing file's handle registered in
    /// one critical section (the open-table lock, which `unlink` and
    /// `rename` hold across their transactions), so the file cannot vanish
    /// between the two. A new file is made when the name is free; if
    /// another `create` took the name meanwhile, the loop opens that one.
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
        // Each round that does not return saw a concurrent create take the
        // name; the bound only guards against a pathological livelock.
        for _ in 0..CREATE_ROUNDS {
            if let Some(opened) = self.open_existing(parent, name, flags, conn)? {
                return Ok(opened);
            }
            if let Some(made) = self.create_new(parent, name, perm, flags, caller, conn)? {
                return Ok(made);
            }
        }
        Err(fs_err!(
            EAGAIN,
            "create of {name:?} in {parent}: the name kept changing"
        ))
    }

    /// If `parent/name` exists: EEXIST with `O_EXCL`, else open it.
    /// `None` when the name is free.
    fn open_existing(
        &self,
        parent: Ino,
        name: &Name,
        flags: i32,
        conn: ConnId,
    ) -> Result<Option<OpenFile>, FsError> {
        let flags = flags & !libc::O_CREAT;
        let handle = next_handle();
        let (ino, rec) = {
            let mut opens = self.lock_opens();
            let Some(ino) = self.entry_ino(parent, name)? else {
                return Ok(None);
            };
            if flags & libc::O_EXCL != 0 {
                return Err(fs_err!(EEXIST, "{name:?} exists in {parent}"));
            }
            // Entry and record go in one transaction, and no unlink or
            // rename commits while the lock is held: the record is there.
            let rec = self.read_inode(ino)?.ok_or_else(|| {
                fs_err!(EIO, "entry {name:?} in {parent} names missing {}", Ino(ino))
            })?;
            check_openable(Ino(ino), &rec)?;
            if !opens.add_open(handle, Ino(ino), conn, rec.generation, writes(flags)) {
                return Err(fs_err!(ESHUTDOWN, "{conn} has closed"));
            }
            (ino, rec)
        };
        self.finish_open(ino, rec, handle, flags).map(Some)
    }

    /// Make `parent/name` as a new file and open it. `None` if the name
    /// was taken meanwhile (the caller opens that file instead).
    fn create_new(
        &self,
        parent: Ino,
        name: &Name,
        perm: u16,
        flags: i32,
        caller: Caller,
        conn: ConnId,
    ) -> Result<Option<OpenFile>, FsError> {
        let excl = flags & libc::O_EXCL != 0;
        // The content file exists before the transaction that names it,
        // and the descriptor mountd gets is the one made for it here (one
        // open, no truncation: the file is new and empty).
        let access = OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE;
        let (ino, fd) = self.new_content(access)?;
        let handle = next_handle();
        if !self
            .lock_opens()
            .add_open(handle, Ino(ino), conn, 0, writes(flags))
        {
            drop(fd);
            let _ = self.content.remove(ino, 0);
            return Err(fs_err!(ESHUTDOWN, "{conn} has closed"));
        }
        let now = Timestamp::now();
        let made = self.tx(|t| {
            let mut dir = t.need_dir(parent.0)?;
            if t.entry(parent.0, name.as_bytes())?.is_some() {
                if excl {
                    return fail(fs_err!(EEXIST, "{name:?} exists in {parent}"));
                }
                return Ok(None);
            }
            let rec = new_child(&dir, FileKind::File, perm, caller, now);
            t.put(ino, &rec)?;
            t.add_entry(parent.0, &mut dir, name.as_bytes(), ino, FileKind::File)?;
            dir.mtime = now;
            dir.ctime = now;
            t.put(parent.0, &dir)?;
            t.mark_dirty(ino)?;
            Ok(Some(rec))
        });
        match made {
            Ok(Some(rec)) => {
                self.wake_engine();
                self.describe_open(ino, &rec, handle, fd).map(Some)
            }
            other => {
                self.lock_opens().remove(handle);
                drop(fd);
                let _ = self.content.remove(ino, 0);
                other.map(|_| None)
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
                .open(ino, rec.generation, access)
                .map_err(|e| content_err(format!("opening {}", Ino(ino)), &e))?;
            if flags & libc::O_TRUNC != 0 && access != OFlag::O_RDONLY {
                // Against a fetched chunk's write (see `presence`).
                let _size = self.size_locks.lock(Ino(ino));
                nix::unistd::ftruncate(&fd, 0).map_err(|e| {
                    FsError::io(format!("truncating {}", Ino(ino)), &io::Error::from(e))
                })?;
                // Truncated to nothing: a partial file is complete now,
                // without fetching anything.
                self.lower_limit(Ino(ino), rec.generation, 0)?;
            }
            Ok(fd)
        })();
        let described = match opened {
            Ok(fd) => self.describe_open(ino, &rec, handle, fd)?,
            Err(e) => {
                let _ = self.release(handle);
                return Err(e);
            }
        };
        // A writer of a partial file may write into every chunk the answer
        // calls present: make them durable first (see `presence`).
        if writes(flags)
            && described.opened.partial.is_some()
            && let Err(e) = self.settle_for_writer(Ino(ino))
        {
            let _ = self.release(handle);
            return Err(e);
        }
        Ok(described)
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
            .and_then(|cs| Ok((cs, self.has_xattrs(ino)?)))
            .and_then(|(cs, x)| Ok((cs, x, self.partial_of(Ino(ino), rec.generation)?)));
        let (cs, has_xattrs, partial) = match described {
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
                partial,
                parent: None,
            },
            fd,
        })
    }

    /// Forget `handle`; the last release of an orphan frees it. Releasing an
    /// unknown handle (already released, or opened before syncd restarted)
    /// is not an error.
    ///
    /// The release of a handle opened for writing marks the file dirty
    /// (its writes, passthrough ones included, are versioned now); the
    /// last release of a content generation that is no longer current
    /// removes it.
    pub fn release(&self, handle: HandleId) -> Result<(), FsError> {
        self.release_written(handle).map(drop)
    }

    /// [`Store::release`], answering the inode when the handle may have
    /// written to it (it was marked dirty): other mounts of this syncd
    /// are told its attributes changed.
    pub fn release_written(&self, handle: HandleId) -> Result<Option<Ino>, FsError> {
        let mut opens = self.lock_opens();
        let Some((ino, left, write)) = opens.remove_open(handle) else {
            return Ok(None);
        };
        let unpinned = opens.take_unpinned();
        let freed = if left > 0 || opens.held(ino) {
            None
        } else {
            self.free_if_orphan(ino.0)?
        };
        drop(opens);
        self.purge_unpinned(unpinned);
        // (The usual last release, of a linked file, opened for reading,
        // wrote nothing.)
        if let Some((kind, generation)) = freed {
            self.purge(ino.0, kind, generation);
            self.wake_engine();
        } else if write {
            self.mark_dirty(ino.0)?;
            return Ok(Some(ino));
        }
        Ok(None)
    }

    /// Remove the retired generations whose last handle went.
    pub(crate) fn purge_unpinned(&self, unpinned: Vec<(Ino, u64)>) {
        for (ino, generation) in unpinned {
            self.purge_generation(ino.0, generation);
        }
    }

    /// mountd on `conn` says its kernel no longer references `inos` (their
    /// lookup counts reached zero): end those references and free the
    /// orphans that are now neither open nor referenced. Inodes this
    /// connection holds no reference of are ignored (linked ones, and
    /// ones already settled). Returns how many were freed.
    ///
    /// Nothing is done once `until` (the request's deadline) has passed,
    /// checked under the open-table lock: mountd lets a removal that may
    /// have crossed this forget go only after the deadline (see mountd's
    /// `releases.rs`), and the removal takes the same lock, so a forget
    /// never lands after it.
    pub fn forget(
        &self,
        conn: ConnId,
        inos: &[Ino],
        until: std::time::Instant,
    ) -> Result<usize, FsError> {
        let freed = {
            let mut opens = self.lock_opens();
            if std::time::Instant::now() >= until {
                return Err(fs_err!(
                    ETIMEDOUT,
                    "forget of {} inodes arrived after its deadline; not applied",
                    inos.len()
                ));
            }
            let unreferenced: Vec<u64> = inos
                .iter()
                .filter(|&&ino| opens.forget(ino, conn))
                .map(|ino| ino.0)
                .collect();
            self.free_orphans_among(&unreferenced)?
        };
        for &(ino, kind, generation) in &freed {
            self.purge(ino, kind, generation);
        }
        if !freed.is_empty() {
            self.wake_engine();
        }
        Ok(freed.len())
    }

    /// Free `ino` if it is an orphan; returns its kind if it was freed.
    /// Call with the open table locked and the inode neither open nor
    /// referenced; purge after unlocking.
    ///
    /// The record is read first, outside a transaction: a linked file (the
    /// common case) needs no write at all. The read is reliable because a
    /// link count only reaches zero under the open-table lock, which the
    /// caller holds; the transaction checks again.
    /// The freeing marks the inode dirty (the engine then records its
    /// tombstone, if it had not already).
    fn free_if_orphan(&self, ino: u64) -> Result<Option<(FileKind, u64)>, FsError> {
        Ok(self
            .free_orphans_among(&[ino])?
            .pop()
            .map(|(_, kind, generation)| (kind, generation)))
    }

    /// [`Store::free_if_orphan`] for each of `inos`, in one transaction
    /// for up to [`FREED_PER_TX`] orphans: the kernel forgets the inodes
    /// of an `rm -r` in batches, and each transaction costs two writes of
    /// sled's log. Returns (inode, kind, generation) of each freed one.
    /// On an error, those freed by earlier transactions are not returned
    /// (and not purged): their content files are left to the check at the
    /// next start, as with any other interrupted removal.
    fn free_orphans_among(&self, inos: &[u64]) -> Result<Vec<(u64, FileKind, u64)>, FsError> {
        let mut orphans = Vec::new();
        for &ino in inos {
            if let Some(rec) = self.read_inode(ino)?
                && rec.nlink == 0
                && !rec.is_dir()
            {
                orphans.push(ino);
            }
        }
        let mut freed = Vec::with_capacity(orphans.len());
        for batch in orphans.chunks(FREED_PER_TX) {
            let done = self.tx(|t| {
                let mut done = Vec::with_capacity(batch.len());
                for &ino in batch {
                    if let Some(rec) = t.inode(ino)?
                        && rec.nlink == 0
                        && !rec.is_dir()
                    {
                        t.drop_inode(ino)?;
                        t.mark_dirty(ino)?;
                        done.push((ino, rec.kind, rec.generation));
                    }
                }
                Ok(done)
            })?;
            freed.extend(done);
        }
        Ok(freed)
    }

    /// Accept handles for a new filesystem connection.
    pub fn connect(&self, conn: ConnId) {
        self.lock_opens().connect(conn);
    }

    /// The connection `conn` ended: its handles are parked until its
    /// mount registers again (see [`crate::opens`]). Returns how many
    /// handles it had.
    pub fn disconnect(&self, conn: ConnId) -> usize {
        let (had, unpinned, writers) = {
            let mut opens = self.lock_opens();
            let had = opens.disconnect(conn).0;
            (had, opens.take_unpinned(), opens.take_dropped_writers())
        };
        self.purge_unpinned(unpinned);
        self.mark_dropped_writers(writers);
        had
    }

    /// Handles opened for writing were dropped without a release: their
    /// writes are versioned as a release would have them.
    fn mark_dropped_writers(&self, writers: Vec<Ino>) {
        for ino in writers {
            if let Err(e) = self.mark_dirty(ino.0) {
                tracing::warn!(ino = ino.0, error = %e, "cannot mark a dropped writer's file dirty");
            }
        }
    }

    /// How many handles `conn` has open.
    pub fn open_handles(&self, conn: ConnId) -> u64 {
        self.lock_opens().handles_of(conn)
    }

    /// The mount `key` registered on `conn`: settle the handles and kernel
    /// references of its earlier connections against `held` (the handles
    /// mountd still holds, on a reconnect; nothing for a fresh mount) and
    /// `referenced` (the inodes its kernel still references; only the
    /// orphans among them matter, the rest are left out), then free every
    /// orphan that is neither open nor referenced. Returns what was
    /// settled and how many orphans were freed.
    pub fn register_mount(
        &self,
        conn: ConnId,
        key: MountKey,
        fresh: bool,
        held: &[(HandleId, Ino)],
        referenced: &[Ino],
    ) -> Result<(Settled, usize), FsError> {
        let settled = {
            let mut opens = self.lock_opens();
            // Read under the lock: no link count reaches zero meanwhile.
            let mut orphans = Vec::new();
            for &ino in referenced {
                let marked = self
                    .orphans
                    .contains_key(ino_key(ino.0))
                    .map_err(|e| store_err("reading orphans", e))?;
                if marked {
                    orphans.push(ino);
                }
            }
            let settled = opens.register(conn, key, fresh, held, &orphans);
            // Handles kept across a syncd restart read the current
            // generation (the start-up scan removed the others).
            for &(h, ino) in held {
                if let Some(rec) = self.read_inode(ino.0)? {
                    opens.set_generation(h, rec.generation);
                }
            }
            let unpinned = opens.take_unpinned();
            let writers = opens.take_dropped_writers();
            drop(opens);
            self.purge_unpinned(unpinned);
            self.mark_dropped_writers(writers);
            settled
        };
        let freed = self.free_orphans()?;
        Ok((settled, freed))
    }

    /// Give this syncd run its handle epoch: the stored counter plus one,
    /// made durable before any handle is given out, so no handle id of an
    /// earlier run can be given again (see [`crate::opens`]). Call once at
    /// start, before serving. Returns the epoch.
    pub fn begin_handle_epoch(&self) -> Result<u64, FsError> {
        let next = self
            .meta
            .update_and_fetch(META_HANDLE_EPOCH, |old| {
                let n = old.and_then(be_u64).unwrap_or(0);
                Some(n.wrapping_add(1).to_be_bytes().to_vec())
            })
            .map_err(|e| store_err("advancing the handle epoch", e))?;
        let epoch = next
            .as_deref()
            .and_then(be_u64)
            .ok_or_else(|| fs_err!(EIO, "the handle epoch is corrupt"))?;
        self.flush()?;
        set_handle_epoch(epoch);
        Ok(epoch)
    }

    /// Free every orphan that is neither open nor referenced by a kernel:
    /// nobody can reach it any more (after a mount registered and its
    /// handles and references were settled). Returns how many were freed.
    pub fn free_orphans(&self) -> Result<usize, FsError> {
        let mut freed = Vec::new();
        {
            let opens = self.lock_opens();
            for item in self.orphans.iter() {
                let (k, _) = item.map_err(|e| store_err("listing orphans", e))?;
                let Some(ino) = be_u64(&k) else { continue };
                if opens.held(Ino(ino)) {
                    continue;
                }
                if let Some((kind, generation)) = self.free_if_orphan(ino)? {
                    freed.push((ino, kind, generation));
                } else if self.read_inode(ino)?.is_none() {
                    // A mark without its inode: drop the mark.
                    let _ = self.orphans.remove(k);
                }
            }
        }
        for &(ino, kind, generation) in &freed {
            self.purge(ino, kind, generation);
        }
        if !freed.is_empty() {
            self.wake_engine();
        }
        Ok(freed.len())
    }
}

/// Key in the `meta` tree of the handle epoch counter (big-endian u64).
pub(super) const META_HANDLE_EPOCH: &[u8] = b"handle_epoch";

/// How many times `create` goes round when the name keeps changing.
const CREATE_ROUNDS: usize = 64;

/// Whether `open(2)` `flags` allow writing.
fn writes(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

/// EISDIR, ELOOP or ENXIO unless `rec` is a regular file.
fn check_openable(ino: Ino, rec: &InodeRec) -> Result<(), FsError> {
    match rec.kind {
        FileKind::File => Ok(()),
        FileKind::Directory => Err(fs_err!(EISDIR, "{ino} is a directory")),
        FileKind::Symlink => Err(fs_err!(ELOOP, "{ino} is a symlink")),
        k => Err(fs_err!(ENXIO, "{ino} is a {k:?}; it has no content")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_schema::RenameFlags;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const ME: Caller = Caller {
        uid: 1000,
        gid: 1000,
        pid: 1,
    };

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::load(dir.path(), (0, 0)).expect("store");
        (dir, Arc::new(s))
    }

    fn key(pid: u32) -> MountKey {
        MountKey {
            mountpoint: "/mnt".into(),
            pid,
        }
    }

    /// Item: `create` of an existing name must never answer ENOENT because
    /// the file was unlinked between the name check and the open. Many
    /// creators and one unlinker on one name; any ENOENT fails.
    #[test]
    fn create_racing_unlink_never_gives_enoent() {
        let (_d, s) = store();
        let conn = ConnId(1);
        s.connect(conn);
        s.register_mount(conn, key(1), true, &[], &[])
            .expect("register");
        let name = Name::from("x");
        let stop = Arc::new(AtomicBool::new(false));
        let unlinker = {
            let (s, stop, name) = (s.clone(), stop.clone(), name.clone());
            std::thread::spawn(move || {
                let mut unlinked = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    match s.unlink(Ino::ROOT, &name) {
                        Ok(()) => unlinked += 1,
                        Err(e) if e.errno == libc::ENOENT => {}
                        Err(e) => panic!("unlink: {e}"),
                    }
                }
                unlinked
            })
        };
        let creators: Vec<_> = (0..4)
            .map(|_| {
                let (s, name) = (s.clone(), name.clone());
                std::thread::spawn(move || {
                    for _ in 0..1500 {
                        let flags = libc::O_RDWR | libc::O_CREAT;
                        match s.create(Ino::ROOT, &name, 0o644, flags, ME, conn) {
                            Ok(f) => s.release(f.opened.handle).expect("release"),
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        let results: Vec<_> = creators
            .into_iter()
            .map(|c| c.join().expect("creator thread"))
            .collect();
        stop.store(true, Ordering::SeqCst);
        let unlinked = unlinker.join().expect("unlinker thread");
        for r in results {
            if let Err(e) = r {
                panic!("create failed: {e}");
            }
        }
        assert!(unlinked > 0, "the unlinker never removed the file");
        assert_eq!(s.lock_opens().count(Ino(2)), 0);
    }

    /// A reconnect lists what mountd holds: handles of the old connection
    /// that it no longer holds are dropped and their orphans freed; the
    /// held ones keep their orphans alive; counts match the list.
    #[test]
    fn register_mount_settles_counts_and_frees_unheld_orphans() {
        let (_d, s) = store();
        let (old, new) = (ConnId(1), ConnId(2));
        s.connect(old);
        s.register_mount(old, key(7), true, &[], &[])
            .expect("register");
        let flags = libc::O_RDWR | libc::O_CREAT;
        let kept = s
            .create(Ino::ROOT, &Name::from("kept"), 0o644, flags, ME, old)
            .expect("create");
        let lost = s
            .create(Ino::ROOT, &Name::from("lost"), 0o644, flags, ME, old)
            .expect("create");
        s.unlink(Ino::ROOT, &Name::from("kept")).expect("unlink");
        s.unlink(Ino::ROOT, &Name::from("lost")).expect("unlink");
        assert_eq!(s.disconnect(old), 2);
        let (ki, li) = (kept.opened.attr.ino, lost.opened.attr.ino);
        assert!(s.getattr(li).is_ok(), "parked, not freed, at disconnect");
        s.connect(new);
        let (settled, freed) = s
            .register_mount(new, key(7), false, &[(kept.opened.handle, ki)], &[])
            .expect("register");
        assert_eq!((settled.kept, settled.dropped, freed), (1, 1, 1));
        assert_eq!(s.getattr(li).map_err(|e| e.errno), Err(libc::ENOENT));
        assert_eq!(s.getattr(ki).expect("held orphan").nlink, 0);
        assert_eq!(s.open_handles(new), 1);
        s.release(kept.opened.handle).expect("release");
        assert_eq!(s.getattr(ki).map_err(|e| e.errno), Err(libc::ENOENT));
    }

    fn content_exists(dir: &tempfile::TempDir, ino: Ino) -> bool {
        dir.path()
            .join("content")
            .join(format!("{:016x}", ino.0))
            .exists()
    }

    fn far() -> std::time::Instant {
        std::time::Instant::now() + std::time::Duration::from_secs(60)
    }

    /// A registered mount with a file `name` that is not open.
    fn mounted_file(name: &str) -> (tempfile::TempDir, Arc<Store>, ConnId, Ino) {
        let (d, s) = store();
        let conn = ConnId(1);
        s.connect(conn);
        s.register_mount(conn, key(7), true, &[], &[])
            .expect("register");
        let f = create_rw(&s, conn, name);
        s.release(f.opened.handle).expect("release");
        (d, s, conn, f.opened.attr.ino)
    }

    /// `name` made in the root directory by `conn`, open read-write.
    fn create_rw(s: &Store, conn: ConnId, name: &str) -> OpenFile {
        s.create(
            Ino::ROOT,
            &Name::from(name),
            0o644,
            libc::O_RDWR | libc::O_CREAT,
            ME,
            conn,
        )
        .expect("create")
    }

    /// Item: an unlink through a mount leaves the inode to the kernel that
    /// still references it: its attributes (nlink 0) and content stay, it
    /// can be opened by number (as an open racing the unlink does), and a
    /// release does not free it; mountd's forget does, content included.
    #[test]
    fn unlink_leaves_a_referenced_orphan_until_forget() {
        let (d, s, conn, ino) = mounted_file("f");
        s.unlink_by(Some(conn), Ino::ROOT, &Name::from("f"))
            .expect("unlink");
        let attr = s.getattr(ino).expect("a referenced orphan answers getattr");
        assert_eq!((attr.nlink, attr.kind), (0, FileKind::File));
        assert!(content_exists(&d, ino));
        // Decoding a file handle (lookup of ".") does not revive it.
        let dot = s.lookup(ino, &Name::from(".")).map_err(|e| e.errno);
        assert_eq!(dot.map(|a| a.ino), Err(libc::ENOENT));
        let f = s
            .open(ino, libc::O_RDWR, conn)
            .expect("open of a referenced orphan");
        assert_eq!(f.opened.attr.nlink, 0);
        s.release(f.opened.handle).expect("release");
        s.settle();
        assert!(s.getattr(ino).is_ok(), "the kernel still references it");
        let report = s.check(false).expect("check");
        assert!(
            report.findings.is_empty(),
            "a referenced orphan is no damage: {:?}",
            report.findings
        );
        // A forget from another connection is not this mount's.
        assert_eq!(s.forget(ConnId(9), &[ino], far()).expect("forget"), 0);
        assert_eq!(s.forget(conn, &[ino], far()).expect("forget"), 1);
        assert_eq!(s.getattr(ino).map_err(|e| e.errno), Err(libc::ENOENT));
        s.settle();
        assert!(!content_exists(&d, ino), "space returned");
        assert_eq!(s.forget(conn, &[ino], far()).expect("again"), 0);
    }

    /// One forget of many inodes (as mountd sends them after an `rm -r`)
    /// frees every unreferenced orphan among them, across more than one
    /// transaction, and nothing else: a linked file and an open orphan in
    /// the same batch stay.
    #[test]
    fn a_batch_forget_frees_exactly_the_orphans_nobody_holds() {
        let (d, s, conn, kept) = mounted_file("kept");
        let n = FREED_PER_TX + 44;
        let mut gone = Vec::new();
        for i in 0..n {
            let f = create_rw(&s, conn, &format!("f{i}"));
            s.release(f.opened.handle).expect("release");
            gone.push(f.opened.attr.ino);
        }
        let open = create_rw(&s, conn, "open");
        let open_ino = open.opened.attr.ino;
        for i in 0..n {
            s.unlink_by(Some(conn), Ino::ROOT, &Name::from(format!("f{i}").as_str()))
                .expect("unlink");
        }
        s.unlink_by(Some(conn), Ino::ROOT, &Name::from("open"))
            .expect("unlink");
        let mut batch = gone.clone();
        batch.push(kept);
        batch.push(open_ino);
        assert_eq!(s.forget(conn, &batch, far()).expect("forget"), n);
        for &ino in &gone {
            assert_eq!(s.getattr(ino).map_err(|e| e.errno), Err(libc::ENOENT));
        }
        assert_eq!(s.getattr(kept).expect("linked").nlink, 1);
        assert_eq!(s.getattr(open_ino).expect("open orphan").nlink, 0);
        s.settle();
        assert!(
            gone.iter().all(|&ino| !content_exists(&d, ino)),
            "space returned"
        );
        assert!(content_exists(&d, kept) && content_exists(&d, open_ino));
        s.release(open.opened.handle).expect("release");
        assert_eq!(s.getattr(open_ino).map_err(|e| e.errno), Err(libc::ENOENT));
        let report = s.check(false).expect("check");
        assert!(report.findings.is_empty(), "{:?}", report.findings);
    }

    /// An open handle and the kernel's reference both keep an orphan: the
    /// last of the two to go frees it.
    #[test]
    fn forget_of_an_open_orphan_waits_for_the_release() {
        let (d, s, conn, ino) = mounted_file("f");
        let f = s.open(ino, libc::O_RDONLY, conn).expect("open");
        let flags = RenameFlags::default();
        let g = create_rw(&s, conn, "g");
        s.release(g.opened.handle).expect("release");
        // Replaced by a rename: the same rule as unlink.
        s.rename_by(
            Some(conn),
            Ino::ROOT,
            &Name::from("g"),
            Ino::ROOT,
            &Name::from("f"),
            flags,
        )
        .expect("rename over");
        assert_eq!(s.forget(conn, &[ino], far()).expect("forget"), 0);
        assert_eq!(s.getattr(ino).expect("open orphan").nlink, 0);
        s.release(f.opened.handle).expect("release");
        assert_eq!(s.getattr(ino).map_err(|e| e.errno), Err(libc::ENOENT));
        s.settle();
        assert!(!content_exists(&d, ino));
    }

    /// A forget that syncd gets after its deadline is not applied (mountd
    /// sends it again; see `Store::forget`).
    #[test]
    fn a_late_forget_is_not_applied() {
        let (_d, s, conn, ino) = mounted_file("f");
        s.unlink_by(Some(conn), Ino::ROOT, &Name::from("f"))
            .expect("unlink");
        let past = std::time::Instant::now();
        let e = s.forget(conn, &[ino], past).expect_err("late");
        assert_eq!(e.errno, libc::ETIMEDOUT);
        assert!(s.getattr(ino).is_ok());
    }

    /// A reconnect keeps the references mountd lists and frees the orphans
    /// it does not list; a fresh mount frees them all. A removal that no
    /// mount made (or made on a connection without a mount) frees at once.
    #[test]
    fn registration_settles_kernel_references() {
        let (_d, s, conn, a) = mounted_file("a");
        let b = {
            let f = s
                .create(
                    Ino::ROOT,
                    &Name::from("b"),
                    0o644,
                    libc::O_RDWR | libc::O_CREAT,
                    ME,
                    conn,
                )
                .expect("create");
            s.release(f.opened.handle).expect("release");
            f.opened.attr.ino
        };
        for n in ["a", "b"] {
            s.unlink_by(Some(conn), Ino::ROOT, &Name::from(n))
                .expect("unlink");
        }
        s.disconnect(conn);
        assert!(s.getattr(a).is_ok() && s.getattr(b).is_ok(), "parked");
        let new = ConnId(2);
        s.connect(new);
        let (settled, freed) = s
            .register_mount(new, key(7), false, &[], &[a, Ino::ROOT])
            .expect("reconnect");
        assert_eq!((settled.refs_kept, settled.refs_dropped, freed), (1, 1, 1));
        assert_eq!(s.getattr(b).map_err(|e| e.errno), Err(libc::ENOENT));
        assert_eq!(s.getattr(a).expect("still referenced").nlink, 0);
        // The reference moved to the new connection: its forget counts.
        assert_eq!(s.forget(conn, &[a], far()).expect("old conn"), 0);
        assert!(s.getattr(a).is_ok());
        // A fresh mount of the mountpoint (mountd restarted) frees it.
        let fresh = ConnId(3);
        s.disconnect(new);
        s.connect(fresh);
        let (_, freed) = s
            .register_mount(fresh, key(8), true, &[], &[a])
            .expect("fresh mount");
        assert_eq!(freed, 1);
        assert_eq!(s.getattr(a).map_err(|e| e.errno), Err(libc::ENOENT));
        // Removals outside a mount free at once.
        let c = {
            let f = s
                .create(
                    Ino::ROOT,
                    &Name::from("c"),
                    0o644,
                    libc::O_RDWR | libc::O_CREAT,
                    ME,
                    fresh,
                )
                .expect("create");
            s.release(f.opened.handle).expect("release");
            f.opened.attr.ino
        };
        s.unlink_by(None, Ino::ROOT, &Name::from("c"))
            .expect("unlink");
        assert_eq!(s.getattr(c).map_err(|e| e.errno), Err(libc::ENOENT));
    }

    /// A syncd restart loses the table; the reconnect's list brings the
    /// references back, and they keep the orphans the kernel holds.
    #[test]
    fn references_survive_a_syncd_restart_through_the_reconnect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ino = {
            let s = Store::load(dir.path(), (0, 0)).expect("store");
            let conn = ConnId(1);
            s.connect(conn);
            s.register_mount(conn, key(7), true, &[], &[])
                .expect("register");
            let f = s
                .create(
                    Ino::ROOT,
                    &Name::from("f"),
                    0o644,
                    libc::O_RDWR | libc::O_CREAT,
                    ME,
                    conn,
                )
                .expect("create");
            s.release(f.opened.handle).expect("release");
            s.unlink_by(Some(conn), Ino::ROOT, &Name::from("f"))
                .expect("unlink");
            s.flush().expect("flush");
            f.opened.attr.ino
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let s = loop {
            match Store::load(dir.path(), (0, 0)) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.message.contains("lock"), "reopen: {e}");
                    std::thread::yield_now();
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        let conn = ConnId(1);
        s.connect(conn);
        let (_, freed) = s
            .register_mount(conn, key(7), false, &[], &[ino])
            .expect("reconnect");
        assert_eq!(freed, 0);
        assert_eq!(s.getattr(ino).expect("kept").nlink, 0);
        assert_eq!(s.forget(conn, &[ino], far()).expect("forget"), 1);
    }

    #[test]
    fn handle_epochs_grow_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = {
            let s = Store::load(dir.path(), (0, 0)).expect("store");
            s.begin_handle_epoch().expect("epoch")
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let second = loop {
            match Store::load(dir.path(), (0, 0)) {
                Ok(s) => break s.begin_handle_epoch().expect("epoch"),
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.message.contains("lock"), "reopen: {e}");
                    std::thread::yield_now();
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        assert!(second > first, "epoch {second} after {first}");
    }
}
