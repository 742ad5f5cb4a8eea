//! The metadata store: inodes, directory entries and extended attributes in
//! sled, content in ordinary files ([`crate::content`]).
//!
//! [`Store`] is what the filesystem service calls; each of its methods is one
//! filesystem operation, blocking (sled and file syscalls), atomic (one sled
//! transaction for everything that changes more than one key), and answers
//! with the errno the kernel will see. The layout is in [`records`], names
//! are checked by [`names`], and the operations are grouped by subject:
//! [`entries`] (the namespace: mkdir, link, unlink, rename, ...), [`files`]
//! (open, create, release, orphans) and [`xattrs`]. The shared index of
//! the sync engine (global ids, versions, the change log, dirty marks) is
//! [`objects`]; versions from peers are applied by [`apply`]; which chunks
//! of a file are local is [`presence`]. Each tree has one owning module.
//!
//! Cost per operation. A sled transaction seals and writes sled's log
//! buffer twice (on sled's own I/O threads, waking all of them), whether
//! or not durability was asked for; on a two-CPU machine that was most of
//! an operation's time. So transactions are kept for what must change
//! several keys at once, and nothing else writes: a change of one inode's
//! record is one compare-and-swap ([`Store::update_inode`]), reads never
//! write, and the common `release` writes nothing. Durability is still
//! only promised by `fsync` ([`Store::fsync`] flushes the store); sled
//! otherwise writes its log in the background every 500 ms.
//!
//! Inode numbers come from durable reservations ([`inos`]) and are never
//! reused, not even after a crash, so a number the kernel still caches can
//! never name another file. The root is inode 1.
//!
//! Crash safety. sled recovers a prefix of its log after a crash, so the
//! store always comes back as it was at some moment: every transaction is
//! all or nothing, and a later one is never kept without the earlier ones.
//! What lives outside sled is ordered around that: a content file exists
//! before the transaction that names it, and is removed only after the
//! transaction that stops naming it is durable ([`reclaim`]); the same
//! holds for each content generation (a version from a peer starts a new
//! one, [`apply`]; the old one goes at its last release). At start,
//! [`Store::load`] removes what a crash left behind (content files and
//! extended attributes of inodes that have no record) and recreates, empty,
//! the content file of a named regular file that a power cut lost (with a
//! warning; [`Store::check`] lists it). `docs/architecture.md` states the
//! guarantees.

pub mod check;
pub mod entries;
pub mod files;
pub mod inos;
// The sync engine is what calls the index's API; parts of it are unused
// until the engine is wired in.
#[allow(dead_code)]
pub mod apply;
pub mod names;
#[allow(dead_code)]
pub mod objects;
pub mod peers;
#[allow(dead_code)]
pub mod presence;
pub mod reclaim;
pub mod records;
#[cfg(test)]
pub mod test_support;
pub mod tx;
pub mod xattrs;

use crate::content::{ContentDir, ContentStat};
use crate::opens::OpenTable;
use crate::space::{Change, Space};
use crate::spares::Spares;
use inos::InoAlloc;
use ipc_schema::{
    Attr, DirCookie, DirEntry, FileKind, FsError, Ino, Name, SetAttr, StatFs, TimeSet, Timestamp,
    fs_err,
};
use nix::fcntl::OFlag;
use reclaim::Reclaimer;
use records::{
    FORMAT_VERSION, InodeRec, META_FORMAT, META_NEXT_INO, be_u64, cookie_key, decode, dirent_key,
    ino_key,
};
use sled::Transactional;
use sled::transaction::TransactionError;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tx::{Tx, TxResult};

/// Block size reported for inodes without content.
const BLKSIZE: u32 = 4096;

/// Counts for `keibictl status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Regular files (linked ones; orphans not counted).
    pub files: u64,
    /// Directories, the root included.
    pub directories: u64,
    /// Symlinks, fifos, sockets, device nodes.
    pub others: u64,
    /// Sum of regular file sizes.
    pub bytes: u64,
}

/// The store of one state directory. Share it (`Arc`); all methods take
/// `&self` and may run concurrently.
pub struct Store {
    db: sled::Db,
    inodes: sled::Tree,
    dirents: sled::Tree,
    cookies: sled::Tree,
    xattrs: sled::Tree,
    orphans: sled::Tree,
    /// Counters and the format version (`meta`).
    meta: sled::Tree,
    /// The names of each inode (`dirents` turned around).
    links: sled::Tree,
    /// The shared index ([`objects`]).
    idx: objects::Index,
    /// Owner of files that arrive from a peer.
    share_owner: (u32, u32),
    content: Arc<ContentDir>,
    /// Content files made ahead of time for new regular files.
    spares: Spares,
    /// Room kept for sled's log on a full disk ([`crate::space`]).
    space: Space,
    /// Inode numbers.
    inos: Arc<InoAlloc>,
    /// Freed inodes whose content files and xattrs wait for a flush.
    reclaim: Reclaimer,
    /// What the start-up scan repaired (for [`Store::check`]). A leaf
    /// lock, held only to copy the list.
    recovered: Mutex<Vec<check::Finding>>,
    state_dir: PathBuf,
    /// Open handles. The only lock in the store besides leaf locks (the
    /// spares' queue, see [`crate::spares`]; the reclaimer's queue,
    /// [`reclaim`]; the inode allocator, [`inos`], held across the flush
    /// of a new reservation; the start-up findings) and the size locks
    /// (`size_locks`, taken before this one). Lock order: taken before a
    /// sled transaction starts and released after it commits, never the
    /// other way round; no other lock is taken while it is held, and it is
    /// never held across an IPC call or a wait on another process. It is
    /// held across the transactions that can drop a link count to zero
    /// (unlink, rename over a file) and the check in `open`, so "is this
    /// inode open?" and "free it" cannot interleave.
    opens: Mutex<OpenTable>,
    /// False while no inode has ever had an extended attribute in this
    /// store (the `xattrs` tree was empty at load and no `setxattr` ran
    /// since): then [`Store::has_xattrs`] answers without a scan. Set
    /// before the first attribute is written, never cleared.
    xattrs_seen: AtomicBool,
    /// `check --repair` runs against the clean-stop mark
    /// ([`check::Repairs`]).
    repairs: check::Repairs,
    /// Per-inode size locks: a truncate against a fetched chunk's write
    /// ([`presence::SizeLocks`]; taken before `opens` and any sled
    /// transaction).
    size_locks: presence::SizeLocks,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

/// A store failure as an errno: EIO, or ENOSPC when the disk is full.
pub fn store_err(context: &str, e: sled::Error) -> FsError {
    let errno = match &e {
        sled::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC) => libc::ENOSPC,
        _ => libc::EIO,
    };
    FsError::new(errno, format!("{context}: store: {e}"))
}

/// A content file failure: its own errno, except that a missing content
/// file is an inconsistency (EIO), not a missing name.
pub fn content_err(context: impl std::fmt::Display, e: &std::io::Error) -> FsError {
    if e.kind() == std::io::ErrorKind::NotFound {
        FsError::new(libc::EIO, format!("{context}: content file missing: {e}"))
    } else {
        FsError::io(context, e)
    }
}

impl Store {
    /// [`Store::load_with`] with the default cache (tests).
    #[cfg(test)]
    pub fn load(state_dir: &Path, share_owner: (u32, u32)) -> Result<Store, FsError> {
        Store::load_with(state_dir, share_owner, crate::config::DEFAULT_STORE_CACHE)
    }

    /// Open (or create) the store of `state_dir`: sled at `<state>/db`,
    /// content in `<state>/content`. A new store gets a root directory
    /// owned by `share_owner` (uid, gid) with mode 0755. `cache` is the
    /// bytes of sled's cache (`store_cache` in the configuration): what it
    /// keeps of the store in memory. With a million files, keibi-syncd's
    /// RSS after `ls -lR` of all of them was 498 MiB with 64 MiB (the
    /// default), 404 MiB with 16 MiB and 380 MiB with 8 MiB (README,
    /// "Benchmarks").
    pub fn load_with(
        state_dir: &Path,
        share_owner: (u32, u32),
        cache: u64,
    ) -> Result<Store, FsError> {
        let content = ContentDir::new(state_dir).map_err(|e| {
            FsError::io(format!("content directory in {}", state_dir.display()), &e)
        })?;
        let db_path = state_dir.join("db");
        // Free the room kept last time so sled can open on a full disk.
        crate::space::release_room(state_dir, &db_path.join("db"));
        let db = sled::Config::new()
            .path(&db_path)
            .cache_capacity(cache)
            .open()
            .map_err(|e| store_err(&format!("opening {}", db_path.display()), e))?;
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| store_err(&format!("opening tree {name}"), e))
        };
        let xattrs = tree("xattrs")?;
        // An error here only costs the shortcut.
        let xattrs_seen = !matches!(xattrs.first(), Ok(None));
        let (inodes, meta) = (tree("inodes")?, tree("meta")?);
        init(&db, &inodes, &meta, state_dir, share_owner)?;
        let content = Arc::new(content);
        let reclaim = Reclaimer::start(reclaim::Target {
            db: db.clone(),
            xattrs: xattrs.clone(),
            content: content.clone(),
        })
        .map_err(|e| FsError::io("starting the reclaim thread", &e))?;
        let store = Store {
            inos: Arc::new(InoAlloc::load(db.clone(), meta.clone())?),
            idx: objects::Index::open(&db, &meta)?,
            links: tree("links")?,
            share_owner,
            meta,
            inodes,
            dirents: tree("dirents")?,
            cookies: tree("cookies")?,
            xattrs,
            xattrs_seen: AtomicBool::new(xattrs_seen),
            repairs: check::Repairs::default(),
            orphans: tree("orphans")?,
            db,
            content,
            spares: Spares::default(),
            space: Space::start(state_dir, &db_path.join("db")),
            reclaim,
            recovered: Mutex::new(Vec::new()),
            state_dir: state_dir.to_path_buf(),
            opens: Mutex::new(OpenTable::default()),
            size_locks: presence::SizeLocks::new(),
        };
        let mut recovered = if store.take_clean_mark()? {
            tracing::info!("start-up scan skipped: the last stop was clean");
            Vec::new()
        } else {
            let started = std::time::Instant::now();
            let found = store.recover()?;
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                repaired = found.len(),
                "start-up scan done (the last stop was not clean)"
            );
            found
        };
        recovered.extend(store.verify_presence()?);
        *store.recovered.lock().unwrap_or_else(|p| p.into_inner()) = recovered;
        Ok(store)
    }

    /// Admit a change requested through the mount or from a peer, or
    /// refuse it with `ENOSPC` while the state directory is too full for
    /// the store to stay safe ([`crate::space`]). One atomic load.
    pub fn admit(&self, change: Change) -> Result<(), FsError> {
        self.space.admit(change)
    }

    /// [`Store::admit`] for the unlink of `name` in `parent`: when no
    /// other change is admitted, an unlink that frees content (a regular
    /// file with allocated blocks and no other link) still is, so space
    /// can always be freed through the mount. The lookup runs only then.
    pub fn admit_unlink(&self, parent: Ino, name: &Name) -> Result<(), FsError> {
        self.space
            .admit(Change::Frees)
            .or_else(|refused| match self.lookup(parent, name) {
                Ok(a) if a.kind == FileKind::File && a.blocks > 0 && a.nlink == 1 => Ok(()),
                _ => Err(refused),
            })
    }

    /// What the start-up scan repaired, in this run.
    pub(crate) fn recovered_at_start(&self) -> Vec<check::Finding> {
        self.recovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Make a new store (root directory, counters, format), or check the
/// format of an existing one and migrate it if it is older.
fn init(
    db: &sled::Db,
    inodes: &sled::Tree,
    meta: &sled::Tree,
    state_dir: &Path,
    share_owner: (u32, u32),
) -> Result<(), FsError> {
    {
        let format = meta
            .get(META_FORMAT)
            .map_err(|e| store_err("reading the format version", e))?;
        match format.as_deref().and_then(be_u64) {
            Some(FORMAT_VERSION) => return Ok(()),
            Some(v) if v < FORMAT_VERSION => {
                return records::migrate(db, inodes, meta, v).map_err(|e| {
                    fs_err!(
                        EIO,
                        "migrating the store in {} from format {v}: {e}",
                        state_dir.display()
                    )
                });
            }
            Some(v) => {
                return Err(fs_err!(
                    EIO,
                    "the store in {} has format {v}; this keibi-syncd reads format {FORMAT_VERSION}",
                    state_dir.display()
                ));
            }
            None => {}
        }
        let now = Timestamp::now();
        let mut root = InodeRec::new(
            FileKind::Directory,
            0o755,
            share_owner.0,
            share_owner.1,
            now,
        );
        root.parent = Ino::ROOT.0;
        (inodes, meta)
            .transaction(|(inodes, meta)| {
                if inodes.get(ino_key(Ino::ROOT.0))?.is_none() {
                    inodes.insert(&ino_key(Ino::ROOT.0), records::encode(&root))?;
                }
                if meta.get(META_NEXT_INO)?.is_none() {
                    meta.insert(META_NEXT_INO, &2u64.to_be_bytes())?;
                }
                meta.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Abort(()) => fs_err!(EIO, "initialising the store aborted"),
                TransactionError::Storage(e) => store_err("initialising the store", e),
            })
        // Not flushed here: if this is lost in a crash, the next start
        // makes the same root again.
    }
}

impl Store {
    /// The paired peers (the `peers` tree, see [`peers`]).
    pub fn peers(&self) -> Result<peers::Peers, peers::PeersError> {
        peers::Peers::open(&self.db)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Run `f` as one transaction over all trees.
    pub(crate) fn tx<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, FsError> {
        (
            &self.inodes,
            &self.dirents,
            &self.cookies,
            &self.xattrs,
            &self.orphans,
            &self.idx.dirty,
            &self.links,
        )
            .transaction(
                |(inodes, dirents, cookies, xattrs, orphans, dirty, links)| {
                    f(&Tx {
                        inodes,
                        dirents,
                        cookies,
                        xattrs,
                        orphans,
                        dirty,
                        links,
                        marks: &self.idx.marks,
                    })
                },
            )
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => store_err("transaction", e),
            })
    }

    /// Note that an extended attribute is about to be written (before the
    /// transaction that writes it, so no reader can see the attribute and
    /// still take the shortcut in [`Store::has_xattrs`]).
    pub(crate) fn note_xattrs(&self) {
        self.xattrs_seen.store(true, Ordering::Release);
    }

    pub(crate) fn lock_opens(&self) -> MutexGuard<'_, OpenTable> {
        // The table stays consistent even if a holder panicked: every
        // change to it is a single insert or remove.
        self.opens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new inode number, never handed out before.
    pub(crate) fn alloc_ino(&self) -> Result<u64, FsError> {
        self.inos.alloc()
    }

    /// Start making spare content files in the background (see
    /// [`crate::spares`]); `create` then rarely waits for the filesystem
    /// to make a file.
    pub fn start_spares(&self) -> Result<(), FsError> {
        let (inos, content) = (self.inos.clone(), self.content.clone());
        let dir = self.content.clone();
        self.spares
            .start(
                Box::new(move || {
                    let ino = inos
                        .alloc()
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    content.create(ino).map(|()| ino)
                }),
                Box::new(move || dir.sync_dir()),
            )
            .map_err(|e| FsError::io("starting the spare file thread", &e))
    }

    /// Stop making spare content files and remove the unused ones. Returns
    /// how many were removed.
    pub fn stop_spares(&self) -> usize {
        self.spares.stop(&self.content)
    }

    /// A new inode number and its new, empty content file, open with
    /// `access`: a spare if one is ready (its times set to now, as if made
    /// just now), else made here.
    pub(crate) fn new_content(&self, access: OFlag) -> Result<(u64, OwnedFd), FsError> {
        if let Some(ino) = self.spares.take() {
            match self.content.open_spare(ino, access) {
                Ok(fd) => return Ok((ino, fd)),
                Err(e) => {
                    tracing::warn!(ino, error = %e, "cannot use a spare content file");
                    let _ = self.content.remove(ino, 0);
                }
            }
        }
        let ino = self.alloc_ino()?;
        let fd = self
            .content
            .create_open(ino, access)
            .map_err(|e| FsError::io(format!("creating the content of {}", Ino(ino)), &e))?;
        Ok((ino, fd))
    }

    /// The record of `ino`, read outside a transaction.
    pub(crate) fn read_inode(&self, ino: u64) -> Result<Option<InodeRec>, FsError> {
        let v = self
            .inodes
            .get(ino_key(ino))
            .map_err(|e| store_err(&format!("reading {}", Ino(ino)), e))?;
        match v {
            None => Ok(None),
            Some(v) => decode(&v)
                .map(Some)
                .map_err(|e| fs_err!(EIO, "corrupt record of {}: {e}", Ino(ino))),
        }
    }

    fn need_inode(&self, ino: u64) -> Result<InodeRec, FsError> {
        self.read_inode(ino)?
            .ok_or_else(|| fs_err!(ENOENT, "no inode {}", Ino(ino)))
    }

    /// Change the record of `ino` alone with `change`, atomically, and
    /// return the new record; ENOENT if there is none.
    ///
    /// A single-key compare-and-swap, retried if the record changed
    /// meanwhile. It needs no transaction: sled runs each transaction under
    /// a global write lock that single-key writes wait for, so a swap never
    /// lands inside a transaction, and the log records it atomically. It is
    /// much cheaper than a transaction, which makes sled seal and write its
    /// log buffer (twice) whether or not anyone asked for durability.
    pub(crate) fn update_inode(
        &self,
        ino: u64,
        change: impl Fn(&mut InodeRec),
    ) -> Result<InodeRec, FsError> {
        let key = ino_key(ino);
        loop {
            let old = self
                .inodes
                .get(key)
                .map_err(|e| store_err(&format!("reading {}", Ino(ino)), e))?
                .ok_or_else(|| fs_err!(ENOENT, "no inode {}", Ino(ino)))?;
            let mut rec: InodeRec =
                decode(&old).map_err(|e| fs_err!(EIO, "corrupt record of {}: {e}", Ino(ino)))?;
            change(&mut rec);
            let swapped = self
                .inodes
                .compare_and_swap(key, Some(&old), Some(records::encode(&rec)))
                .map_err(|e| store_err(&format!("writing {}", Ino(ino)), e))?;
            if swapped.is_ok() {
                return Ok(rec);
            }
        }
    }

    /// Whether `ino` has any extended attribute.
    pub(crate) fn has_xattrs(&self, ino: u64) -> Result<bool, FsError> {
        if !self.xattrs_seen.load(Ordering::Acquire) {
            return Ok(false);
        }
        match self.xattrs.scan_prefix(records::ino_key(ino)).next() {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(store_err(&format!("reading xattrs of {}", Ino(ino)), e)),
        }
    }

    /// The attributes of `ino` whose record is `rec`.
    pub(crate) fn attr_of(&self, ino: u64, rec: &InodeRec) -> Result<Attr, FsError> {
        if rec.kind == FileKind::File {
            let cs = self
                .content
                .stat(ino, rec.generation)
                .map_err(|e| content_err(format!("stat of {}", Ino(ino)), &e))?;
            Ok(make_attr(ino, rec, Some(&cs), self.has_xattrs(ino)?))
        } else {
            Ok(make_attr(ino, rec, None, self.has_xattrs(ino)?))
        }
    }

    /// The inode entry `name` of `parent` names, if any (read outside a
    /// transaction).
    pub(crate) fn entry_ino(&self, parent: Ino, name: &Name) -> Result<Option<u64>, FsError> {
        let Some(v) = self
            .dirents
            .get(dirent_key(parent.0, name.as_bytes()))
            .map_err(|e| store_err("lookup", e))?
        else {
            return Ok(None);
        };
        let d: records::DirentRec =
            decode(&v).map_err(|e| fs_err!(EIO, "corrupt entry in {parent}: {e}"))?;
        Ok(Some(d.ino))
    }

    /// Look `name` up in `parent`.
    pub fn lookup(&self, parent: Ino, name: &Name) -> Result<Attr, FsError> {
        let need_dir = || {
            let dir = self.need_inode(parent.0)?;
            if !dir.is_dir() {
                return Err(fs_err!(ENOTDIR, "{parent} is not a directory"));
            }
            Ok(dir)
        };
        let ino = match name.as_bytes() {
            // "." of any inode: the kernel looks an inode up by number
            // this way to decode a file handle (FUSE export support), and
            // only when it does not hold the inode. An unlinked inode kept
            // for a kernel reference or an open handle (an orphan) is then
            // not this kernel's to revive: ENOENT, which the kernel turns
            // into ESTALE, as a local disk answers for a deleted file.
            b"." => {
                let rec = self.need_inode(parent.0)?;
                if rec.nlink == 0 && !rec.is_dir() {
                    return Err(fs_err!(ENOENT, "{parent} has been removed"));
                }
                parent.0
            }
            b".." => need_dir()?.parent,
            _ => {
                names::validate(name)?;
                // Only directories have entries, so a found entry proves
                // `parent` is one; only a miss needs its record, for the
                // errno.
                match self.entry_ino(parent, name)? {
                    Some(ino) => ino,
                    None => {
                        need_dir()?;
                        return Err(fs_err!(ENOENT, "no entry {name:?} in {parent}"));
                    }
                }
            }
        };
        let Some(rec) = self.read_inode(ino)? else {
            // The entry may have gone between the two reads: that is
            // ENOENT. An entry that is still there names a missing inode:
            // damage (`keibictl check` reports it).
            if ino != parent.0 && self.entry_ino(parent, name)? == Some(ino) {
                return Err(fs_err!(
                    EIO,
                    "entry {name:?} in {parent} names {}, which has no record (run `keibictl check`)",
                    Ino(ino)
                ));
            }
            return Err(fs_err!(ENOENT, "no entry {name:?} in {parent}"));
        };
        self.attr_of(ino, &rec)
    }

    /// Attributes of `ino` (orphans included: an unlinked file that is still
    /// open answers until its last release).
    pub fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        let rec = self.need_inode(ino.0)?;
        self.attr_of(ino.0, &rec)
    }

    /// Apply `changes` to `ino`. Size and, for regular files, times go to
    /// the content file; the rest to the store. ctime becomes now.
    ///
    /// Only the inode's own record changes, so it is written with one
    /// compare-and-swap instead of a transaction (see [`Store::update_inode`]).
    pub fn setattr(&self, ino: Ino, changes: &SetAttr) -> Result<Attr, FsError> {
        let rec = self.need_inode(ino.0)?;
        let is_file = rec.kind == FileKind::File;
        if changes.size.is_some() {
            match rec.kind {
                FileKind::File => {}
                FileKind::Directory => return Err(fs_err!(EISDIR, "{ino} is a directory")),
                _ => return Err(fs_err!(EINVAL, "{ino} is not a regular file")),
            }
        }
        let content_changes =
            changes.size.is_some() || changes.atime.is_some() || changes.mtime.is_some();
        // Before the change (see `objects`): a crash after it leaves a
        // spurious mark at worst. Only atime changes are not shared. The
        // engine may take this mark before the change lands, so the same
        // mark is written again after it (below).
        let atime_only = changes.atime.is_some()
            && changes.size.is_none()
            && changes.mtime.is_none()
            && changes.perm.is_none()
            && changes.uid.is_none()
            && changes.gid.is_none();
        if !atime_only && objects::shared_kind(rec.kind) {
            self.mark_dirty(ino.0)?;
        }
        let cs = if is_file && content_changes {
            // A size change and a fetched chunk's write exclude each other
            // (see `presence`, "Truncation").
            let _size = changes.size.map(|_| self.size_locks.lock(ino));
            let cs = self
                .content
                .update(
                    ino.0,
                    rec.generation,
                    changes.size,
                    changes.atime,
                    changes.mtime,
                )
                .map_err(|e| content_err(format!("changing the content of {ino}"), &e))?;
            if let Some(size) = changes.size {
                // A truncate of a partial file needs no fetch: the chunks
                // from `size` on are local now.
                self.lower_limit(ino, rec.generation, size)?;
            }
            Some(cs)
        } else {
            None
        };
        let now = Timestamp::now();
        let at = |t: TimeSet| match t {
            TimeSet::Now => now,
            TimeSet::At(t) => t,
        };
        let rec = self.update_inode(ino.0, |rec| {
            if let Some(p) = changes.perm {
                rec.perm = p & 0o7777;
            }
            if let Some(u) = changes.uid {
                rec.uid = u;
            }
            if let Some(g) = changes.gid {
                rec.gid = g;
            }
            if rec.kind != FileKind::File {
                if let Some(a) = changes.atime {
                    rec.atime = at(a);
                }
                if let Some(m) = changes.mtime {
                    rec.mtime = at(m);
                }
            }
            rec.ctime = now;
        })?;
        // And after it: the engine may have taken the first mark and seen
        // the state before the change (then found nothing to version and
        // cleared it); this mark makes it look again.
        if !atime_only && objects::shared_kind(rec.kind) {
            self.mark_dirty(ino.0)?;
        }
        match cs {
            Some(cs) => Ok(make_attr(ino.0, &rec, Some(&cs), self.has_xattrs(ino.0)?)),
            None => self.attr_of(ino.0, &rec),
        }
    }

    /// Up to `limit` entries of directory `dir` whose cookies are after
    /// `after`: `.` (cookie 1), `..` (cookie 2), then the entries in the
    /// order they were added. With `plus`, each carries its attributes; an
    /// entry removed while the listing is read is left out.
    ///
    /// A damaged entry costs only itself: an entry whose record cannot be
    /// decoded, or (with `plus`) whose attributes cannot be read (its
    /// inode record or content file is missing), is left out with a
    /// warning, and the rest of the listing is served. Its own `lookup`
    /// still fails with the error (`EIO` and a message), and
    /// [`Store::check`] reports it.
    pub fn readdir(
        &self,
        dir: Ino,
        after: DirCookie,
        limit: u32,
        plus: bool,
    ) -> Result<Vec<DirEntry>, FsError> {
        let rec = self.need_inode(dir.0)?;
        if !rec.is_dir() {
            return Err(fs_err!(ENOTDIR, "{dir} is not a directory"));
        }
        let limit = limit.max(1) as usize;
        let mut out = Vec::new();
        let dots: [(&[u8], u64, u64); 2] = [(b".", 1, dir.0), (b"..", 2, rec.parent)];
        for (name, cookie, ino) in dots {
            if after.0 < cookie && out.len() < limit {
                let attr = if plus {
                    let got = if ino == dir.0 {
                        self.attr_of(ino, &rec)
                    } else {
                        self.need_inode(ino).and_then(|r| self.attr_of(ino, &r))
                    };
                    match got {
                        Ok(a) => Some(a),
                        Err(e) => {
                            tracing::warn!(dir = dir.0, ino, error = %e, "readdir: leaving out an entry whose attributes cannot be read");
                            continue;
                        }
                    }
                } else {
                    None
                };
                out.push(DirEntry {
                    cookie: DirCookie(cookie),
                    name: Name::from(name),
                    ino: Ino(ino),
                    kind: FileKind::Directory,
                    attr,
                });
            }
        }
        let start = after.0.saturating_add(1).max(records::FIRST_ENTRY_COOKIE);
        let range = cookie_key(dir.0, start)..=cookie_key(dir.0, u64::MAX);
        for item in self.cookies.range(range) {
            if out.len() >= limit {
                break;
            }
            let (k, name) = item.map_err(|e| store_err("readdir", e))?;
            let cookie = k.get(8..).and_then(be_u64).unwrap_or(0);
            let Some(v) = self
                .dirents
                .get(dirent_key(dir.0, &name))
                .map_err(|e| store_err("readdir", e))?
            else {
                continue;
            };
            let d: records::DirentRec = match decode(&v) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(dir = dir.0, name = ?Name(name.to_vec()), error = %e, "readdir: leaving out a corrupt entry");
                    continue;
                }
            };
            let attr = if plus {
                // No record: the entry was removed meanwhile (or is
                // damaged; `check` says which).
                match self
                    .read_inode(d.ino)
                    .and_then(|r| r.map(|r| self.attr_of(d.ino, &r)).transpose())
                {
                    Ok(Some(a)) => Some(a),
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(dir = dir.0, ino = d.ino, name = ?Name(name.to_vec()), error = %e, "readdir: leaving out an entry whose attributes cannot be read");
                        continue;
                    }
                }
            } else {
                None
            };
            out.push(DirEntry {
                cookie: DirCookie(cookie),
                name: Name(name.to_vec()),
                ino: Ino(d.ino),
                kind: d.kind,
                attr,
            });
        }
        Ok(out)
    }

    /// Make `ino` durable: its content file (for a regular file), the
    /// names in the content directory, then the whole store. The content
    /// directory goes first, so every content file the store names once
    /// the flush returns has a durable name.
    pub fn fsync(&self, ino: Ino, datasync: bool) -> Result<(), FsError> {
        let rec = self.need_inode(ino.0)?;
        if rec.kind == FileKind::File {
            // Passthrough writes reach syncd only as this and the release.
            self.mark_dirty(ino.0)?;
            self.content
                .sync(ino.0, rec.generation, datasync)
                .map_err(|e| content_err(format!("fsync of {ino}"), &e))?;
            return self.flush_store();
        }
        self.flush()
    }

    /// Write everything to disk: the content directory's names, then the
    /// store.
    pub fn flush(&self) -> Result<(), FsError> {
        self.content
            .sync_dir()
            .map_err(|e| FsError::io("syncing the content directory", &e))?;
        self.flush_store()
    }

    fn flush_store(&self) -> Result<(), FsError> {
        self.db
            .flush()
            .map(drop)
            .map_err(|e| store_err("flushing", e))
    }

    /// A clean shutdown: stop making spares (and remove them), reclaim
    /// every freed inode, and flush.
    pub fn shutdown(&self) -> Result<(), FsError> {
        self.stop_spares();
        self.reclaim.drain();
        self.flush()
    }

    /// Wait until every freed inode so far has been reclaimed (tests).
    #[cfg(test)]
    pub(crate) fn settle(&self) {
        assert!(self.reclaim.settle(), "the reclaimer did not settle");
    }

    /// Hold or let go the reclaimer (tests).
    #[cfg(test)]
    pub(crate) fn hold_reclaim(&self, held: bool) {
        self.reclaim.hold(held);
    }

    /// Statistics of the filesystem holding the content.
    pub fn statfs(&self) -> Result<StatFs, FsError> {
        self.content
            .statfs()
            .map_err(|e| FsError::io("statfs of the state directory", &e))
    }

    /// Count inodes and content bytes (a full scan).
    pub fn counts(&self) -> Result<Counts, FsError> {
        let mut c = Counts::default();
        for item in self.inodes.iter() {
            let (k, v) = item.map_err(|e| store_err("counting", e))?;
            let Ok(rec) = decode::<InodeRec>(&v) else {
                continue;
            };
            if rec.nlink == 0 {
                continue;
            }
            match rec.kind {
                FileKind::File => {
                    c.files += 1;
                    if let Some(ino) = be_u64(&k) {
                        c.bytes += self
                            .content
                            .stat(ino, rec.generation)
                            .map(|s| s.size)
                            .unwrap_or(0);
                    }
                }
                FileKind::Directory => c.directories += 1,
                _ => c.others += 1,
            }
        }
        Ok(c)
    }

    /// Hand what is left of a freed inode (its content file, its extended
    /// attributes) to the reclaimer, which removes it once the transaction
    /// that freed it is durable ([`reclaim`]). Call after that transaction
    /// committed.
    pub(crate) fn purge(&self, ino: u64, kind: FileKind, generation: u64) {
        self.reclaim.push(reclaim::Freed::Inode {
            ino,
            kind,
            generation,
        });
    }

    /// Hand an old content generation of `ino` that no handle has open to
    /// the reclaimer (after the transaction that made another one current
    /// committed).
    pub(crate) fn purge_generation(&self, ino: u64, generation: u64) {
        self.reclaim
            .push(reclaim::Freed::Generation { ino, generation });
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop_spares();
        self.reclaim.drain();
    }
}

/// Build `stat` attributes from a record and, for a regular file, its
/// content file.
fn make_attr(ino: u64, rec: &InodeRec, cs: Option<&ContentStat>, has_xattrs: bool) -> Attr {
    let (size, blocks, atime, mtime, ctime, blksize) = match cs {
        Some(cs) => (
            cs.size,
            cs.blocks,
            cs.atime,
            cs.mtime,
            rec.ctime.max(cs.ctime),
            cs.blksize,
        ),
        None => {
            let size = match rec.kind {
                FileKind::Symlink => rec.target.len() as u64,
                FileKind::Directory => u64::from(BLKSIZE),
                _ => 0,
            };
            (
                size,
                size.div_ceil(512),
                rec.atime,
                rec.mtime,
                rec.ctime,
                BLKSIZE,
            )
        }
    };
    Attr {
        ino: Ino(ino),
        kind: rec.kind,
        size,
        blocks,
        atime,
        mtime,
        ctime,
        crtime: rec.crtime,
        perm: rec.perm,
        nlink: rec.nlink,
        uid: rec.uid,
        gid: rec.gid,
        blksize,
        rdev: rec.rdev,
        has_xattrs,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod differential_tests;

#[cfg(test)]
mod check_tests;

#[cfg(test)]
mod objects_tests;
