//! The shared index in the store: global ids, versions, the local change
//! log, and what changed locally since it was last versioned.
//!
//! | tree        | key                              | value                     |
//! |-------------|----------------------------------|---------------------------|
//! | `objects`   | gid (16 bytes)                   | [`ObjRec`] (postcard)     |
//! | `gid_ino`   | gid                              | ino (u64 BE)              |
//! | `ino_gid`   | ino (u64 BE)                     | gid                       |
//! | `obj_seq`   | gid                              | local seq (u64 BE)        |
//! | `changes`   | local seq (u64 BE)               | gid                       |
//! | `dirty`     | ino (u64 BE)                     | mark (u64 BE)             |
//! | `links`     | ino ++ parent ino ++ name        | empty                     |
//! | `peer_seq`  | peer fingerprint                 | their seq applied (u64 BE)|
//! | `presence`  | ino (u64 BE)                     | [`PresenceRec`] (postcard)|
//! | `present_bits` | ino (u64 BE)                  | [`PresentBits`] (postcard)|
//!
//! `present_bits` holds the bits of a partial file that change while its
//! chunks arrive, so that marking a chunk present rewrites a few hundred
//! bytes, not the file's list of hashes (see [`super::presence`]).
//!
//! # Global ids
//!
//! The root is [`Gid::ROOT`]; an object made here is `Gid::new(device,
//! ino)`, so a local inode's gid is known before it is first versioned
//! ([`Store::gid_of`]); `ino_gid`/`gid_ino` are written when an object is
//! first versioned ([`Store::commit_local`]) or applied from a peer
//! ([`Store::apply_remote`]), and removed by its tombstone's commit (not
//! by the purge of the inode: a deleted inode still knows its gid until
//! its tombstone is recorded).
//!
//! # The change log
//!
//! Every record stored gets the next local sequence number: `changes`
//! maps it to the gid, `obj_seq` the gid to its latest number (the older
//! entry is removed, so the log holds each object once). Commits run one
//! at a time (the sequence lock, below), and the counter moves after the
//! transaction commits, so a reader of [`Store::changes_since`] never
//! skips a number that appears later.
//!
//! # Dirty marks
//!
//! Every store operation that changes shared state (create, mkdir,
//! symlink, link, unlink, rmdir, rename, setattr, the release of a handle
//! opened for writing, fsync, the freeing of an orphan) writes
//! `dirty[ino] = mark`, from one counter, in the same transaction as its
//! change (or, for operations that write no transaction, just before it):
//! one sled insert per operation, nothing more. The engine takes the
//! dirty inodes ([`Store::take_dirty`]), builds a version from
//! [`Store::local_object`], and [`Store::commit_local`] clears the mark
//! only if it is still the one taken: a change made meanwhile leaves the
//! inode dirty. A spurious mark costs one comparison with the recorded
//! version. [`Store::dirty_notify`] wakes the engine.
//!
//! # Locks
//!
//! `apply` (one [`Store::apply_remote`] at a time) → the open table →
//! `seq` (one commit to the change log at a time) → a sled transaction.
//! None is held across I/O with another process.

use super::records::{InodeRec, be_u64, decode, ino_key};
use super::{Store, store_err};
use crate::sync::model::{ChunkHash, DeviceId, EntryName, Gid, ObjRec};
use ipc_schema::{FileKind, FsError, Ino, Inval, Timestamp, fs_err};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What the store knows of one inode for versioning it
/// ([`Store::local_object`]).
#[derive(Clone, Debug)]
pub struct LocalObject {
    /// The inode.
    pub ino: Ino,
    /// Its global id.
    pub gid: Gid,
    /// The last version recorded for it (local or from a peer), if any.
    pub recorded: Option<ObjRec>,
    /// Its state now; `None` when the inode is gone (deleted).
    pub now: Option<LocalState>,
}

/// The state of a live inode, in the index's terms.
#[derive(Clone, Debug)]
pub struct LocalState {
    /// `File`, `Directory`, `Symlink`; other kinds are not shared.
    pub kind: FileKind,
    /// Permission bits.
    pub perm: u16,
    /// Last content change (files: of the content file).
    pub mtime: Timestamp,
    /// Size (files: of the content file).
    pub size: u64,
    /// Every name, as (parent gid, name), sorted.
    pub names: Vec<EntryName>,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Files: the content generation (which content file is current).
    pub generation: u64,
    /// Files: set when the bytes are not all local.
    pub presence: Option<PresenceRec>,
}

/// The fields of an [`ObjRec`] that come before its chunk hashes, in the
/// same order, so that postcard decodes them from the front of an encoded
/// `ObjRec` ([`Store::object_head`]).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ObjHead {
    pub gid: Gid,
    pub vv: crate::sync::model::VersionVector,
    pub modified_by: DeviceId,
    pub deleted: bool,
    pub kind: FileKind,
    pub names: Vec<EntryName>,
    pub perm: u16,
    pub mtime: Timestamp,
    pub size: u64,
}

/// Which chunks of a file's current content generation are present and
/// verified; kept only while some are missing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRec {
    /// The object.
    pub gid: Gid,
    /// The content generation the bits are about.
    pub generation: u64,
    /// Size of that content.
    pub size: u64,
    /// The expected hash of every chunk.
    pub chunks: Vec<ChunkHash>,
    /// Bitmap: chunk `i` present is bit `i % 64` of word `i / 64`.
    pub present: Vec<u64>,
    /// The smallest size the file was truncated to since the version
    /// arrived (initially `size`): chunks that start at or beyond it count
    /// as present (they are local zeros or local writes).
    pub limit: u64,
}

impl PresenceRec {
    /// Whether chunk `index` counts as present.
    pub fn has(&self, index: u64) -> bool {
        let (start, _) = crate::sync::model::chunk_range(index, self.size);
        start >= self.limit || bit(&self.present, index)
    }

    /// Whether every chunk counts as present.
    pub fn complete(&self) -> bool {
        (0..self.chunks.len() as u64).all(|i| self.has(i))
    }
}

/// Bit `index` of `bits`.
pub fn bit(bits: &[u64], index: u64) -> bool {
    bits.get((index / 64) as usize)
        .is_some_and(|w| w & (1 << (index % 64)) != 0)
}

/// Set bit `index` of `bits` (growing it).
pub fn set_bit(bits: &mut Vec<u64>, index: u64) {
    let w = (index / 64) as usize;
    if bits.len() <= w {
        bits.resize(w + 1, 0);
    }
    bits[w] |= 1 << (index % 64);
}

/// A dirty inode taken by [`Store::take_dirty`]: its mark lets
/// [`Store::commit_local`] clear it only if nothing changed it since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyMark {
    /// The inode.
    pub ino: Ino,
    /// The mark value when taken.
    pub mark: u64,
}

/// Local content to copy chunks from when a version is applied (the
/// previous content of the same file, or the loser of a conflict).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed {
    /// The inode whose content to copy from.
    pub ino: Ino,
    /// Its content generation.
    pub generation: u64,
}

/// What [`Store::apply_remote`] did.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    /// The local inode of the object now (`None` for a tombstone).
    pub ino: Option<Ino>,
    /// The local sequence number the record got.
    pub seq: u64,
    /// What mountd must invalidate.
    pub invals: Vec<Inval>,
    /// Whether the file's bytes are not all local after it.
    pub partial: bool,
}

/// Why [`Store::apply_remote`] did not apply a record. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A name's parent directory is not known here (yet), or is deleted.
    #[error("parent {0:?} is not here")]
    MissingParent(Gid),
    /// Another object holds one of the names.
    #[error("{at:?} is taken by {existing:?}")]
    Collision {
        /// The name.
        at: EntryName,
        /// The object holding it.
        existing: Gid,
    },
    /// A tombstone of a directory that still has entries here.
    #[error("directory is not empty here")]
    NotEmpty,
    /// The record is malformed or hostile (bad name, wrong chunk count,
    /// kind change, a directory cycle): refused, with the reason.
    #[error("refused: {0}")]
    Invalid(String),
    /// The local inode is dirty or open for writing: its local changes
    /// are versioned first; try again after.
    #[error("the local object has changes not yet versioned")]
    Busy,
    /// The store or the content directory failed.
    #[error("{0}")]
    Fs(FsError),
}

impl From<FsError> for ApplyError {
    fn from(e: FsError) -> Self {
        ApplyError::Fs(e)
    }
}

/// Key of `meta` holding the device this store is tied to.
const META_DEVICE: &[u8] = b"device";

/// Bytes of one encoded [`ChunkHash`] in a record (postcard writes each
/// of its 32 `u8`s as one byte; a unit test checks it).
const CHUNK_HASH_LEN: usize = 32;

/// The trees and counters of the shared index (see the module doc).
pub(crate) struct Index {
    pub objects: sled::Tree,
    pub gid_ino: sled::Tree,
    pub ino_gid: sled::Tree,
    pub obj_seq: sled::Tree,
    pub changes: sled::Tree,
    pub dirty: sled::Tree,
    pub peer_seq: sled::Tree,
    pub presence: sled::Tree,
    /// The bits of `presence` that change as chunks arrive.
    pub present_bits: sled::Tree,
    /// The next dirty mark.
    pub marks: AtomicU64,
    /// Where the next [`Store::take_dirty`] starts (an inode number).
    dirty_cursor: AtomicU64,
    /// The last local sequence number committed.
    pub seq: AtomicU64,
    /// Held across a commit to the change log (see the module doc).
    seq_lock: Mutex<()>,
    /// Held across one [`Store::apply_remote`].
    pub(crate) apply_lock: Mutex<()>,
    /// The device, once attached.
    device: Mutex<Option<DeviceId>>,
    /// Wakes the engine after a dirty mark.
    notify: Arc<tokio::sync::Notify>,
    /// The last local sequence number, for those who wait for it.
    seq_watch: tokio::sync::watch::Sender<u64>,
    /// Tests: see [`Store::set_log_read_hook`].
    #[cfg(test)]
    log_read_hook: Mutex<Option<LogReadHook>>,
}

/// Tests: called by [`Store::changes_since`] between reading a log entry
/// (its number and gid) and its record.
#[cfg(test)]
pub(crate) type LogReadHook = Box<dyn Fn(u64, &Gid) + Send + Sync>;

impl Index {
    /// Open the index's trees of `db` and load its counters.
    pub(crate) fn open(db: &sled::Db, meta: &sled::Tree) -> Result<Index, FsError> {
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| store_err(&format!("opening tree {name}"), e))
        };
        let dirty = tree("dirty")?;
        let mut marks = 1u64;
        for item in dirty.iter() {
            let (_, v) = item.map_err(|e| store_err("reading dirty marks", e))?;
            marks = marks.max(be_u64(&v).unwrap_or(0).saturating_add(1));
        }
        let changes = tree("changes")?;
        let seq = match changes
            .last()
            .map_err(|e| store_err("reading the change log", e))?
        {
            Some((k, _)) => be_u64(&k).unwrap_or(0),
            None => 0,
        };
        let device = meta
            .get(META_DEVICE)
            .map_err(|e| store_err("reading the device", e))?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(DeviceId);
        Ok(Index {
            objects: tree("objects")?,
            gid_ino: tree("gid_ino")?,
            ino_gid: tree("ino_gid")?,
            obj_seq: tree("obj_seq")?,
            changes,
            dirty,
            peer_seq: tree("peer_seq")?,
            presence: tree("presence")?,
            present_bits: tree("present_bits")?,
            marks: AtomicU64::new(marks),
            dirty_cursor: AtomicU64::new(0),
            seq: AtomicU64::new(seq),
            seq_lock: Mutex::new(()),
            apply_lock: Mutex::new(()),
            device: Mutex::new(device),
            notify: Arc::new(tokio::sync::Notify::new()),
            seq_watch: tokio::sync::watch::Sender::new(seq),
            #[cfg(test)]
            log_read_hook: Mutex::new(None),
        })
    }

    pub(crate) fn lock_seq(&self) -> MutexGuard<'_, ()> {
        self.seq_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence number the next commit gets (call with the sequence
    /// lock held).
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst) + 1
    }

    /// A commit of `seq` is durable in sled's order: publish it (with the
    /// sequence lock still held).
    pub(crate) fn published(&self, seq: u64) {
        self.seq.store(seq, Ordering::SeqCst);
        self.seq_watch.send_replace(seq);
    }
}

/// Encode an index record (postcard).
pub(crate) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain structs into a Vec: cannot fail.
    postcard::to_allocvec(v).unwrap_or_default()
}

/// Decode an index record.
pub(crate) fn dec<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T, FsError> {
    postcard::from_bytes(b).map_err(|e| fs_err!(EIO, "corrupt {what} in the index: {e}"))
}

/// Whether `kind` is shared with peers.
pub fn shared_kind(kind: FileKind) -> bool {
    matches!(
        kind,
        FileKind::File | FileKind::Directory | FileKind::Symlink
    )
}

impl Store {
    /// This store's device id (set by [`Store::attach_device`]); all
    /// zeros before it is attached.
    pub fn device(&self) -> DeviceId {
        self.idx
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(DeviceId([0; 8]))
    }

    /// What wakes the sync engine after a store operation marked an inode
    /// dirty (`notify_one` after each).
    pub fn dirty_notify(&self) -> Arc<tokio::sync::Notify> {
        self.idx.notify.clone()
    }

    /// The last local sequence number, as it moves.
    pub fn seq_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.idx.seq_watch.subscribe()
    }

    /// Wake the engine (after a dirty mark was written).
    pub(crate) fn wake_engine(&self) {
        self.idx.notify.notify_one();
    }

    /// Mark `ino` dirty outside a transaction (for operations that write
    /// none: setattr, release, fsync), then wake the engine.
    pub(crate) fn mark_dirty(&self, ino: u64) -> Result<(), FsError> {
        let mark = self.idx.marks.fetch_add(1, Ordering::Relaxed);
        self.idx
            .dirty
            .insert(ino_key(ino), &mark.to_be_bytes())
            .map_err(|e| store_err(&format!("marking {} dirty", Ino(ino)), e))?;
        self.wake_engine();
        Ok(())
    }

    /// Tie the store to the device `device` (the identity's key). The
    /// first time (or after a migration), every existing inode gets its
    /// global id and is marked dirty, so it is versioned and announced.
    /// Refuses a store tied to another device.
    pub fn attach_device(&self, device: DeviceId) -> Result<(), FsError> {
        let mut current = self.idx.device.lock().unwrap_or_else(|p| p.into_inner());
        match *current {
            Some(d) if d == device => return Ok(()),
            Some(d) => {
                return Err(fs_err!(
                    EINVAL,
                    "the store in {} belongs to device {}, but this identity is device {}: the identity file was replaced; restore it, or start with a new state directory",
                    self.state_dir.display(),
                    d.hex(),
                    device.hex()
                ));
            }
            None => {}
        }
        let (mut gid_ino, mut ino_gid, mut dirty) = (
            sled::Batch::default(),
            sled::Batch::default(),
            sled::Batch::default(),
        );
        let mut n = 0u64;
        for item in self.inodes.iter() {
            let (k, v) = item.map_err(|e| store_err("scanning inodes", e))?;
            let (Some(ino), Ok(rec)) = (be_u64(&k), decode::<InodeRec>(&v)) else {
                continue;
            };
            let gid = if ino == Ino::ROOT.0 {
                Gid::ROOT
            } else {
                Gid::new(device, ino)
            };
            gid_ino.insert(&gid.0[..], &ino.to_be_bytes()[..]);
            ino_gid.insert(&ino.to_be_bytes()[..], &gid.0[..]);
            if ino != Ino::ROOT.0 && shared_kind(rec.kind) && rec.nlink > 0 {
                let mark = self.idx.marks.fetch_add(1, Ordering::Relaxed);
                dirty.insert(&ino.to_be_bytes()[..], &mark.to_be_bytes()[..]);
                n += 1;
            }
        }
        let e = |e| store_err("giving inodes their global ids", e);
        self.idx.gid_ino.apply_batch(gid_ino).map_err(e)?;
        self.idx.ino_gid.apply_batch(ino_gid).map_err(e)?;
        self.idx.dirty.apply_batch(dirty).map_err(e)?;
        // Last: a crash before it makes the next start do all of it again.
        self.meta
            .insert(META_DEVICE, &device.0[..])
            .map_err(|e| store_err("recording the device", e))?;
        self.flush_store()?;
        *current = Some(device);
        drop(current);
        tracing::info!(device = %device.hex(), dirty = n, "store attached to its device");
        self.wake_engine();
        Ok(())
    }

    /// Up to `limit` dirty inodes, oldest mark first. Reads at most
    /// `limit` marks, not the whole tree: each take goes on in inode order
    /// from where the last one stopped, wrapping around, so every dirty
    /// inode is taken within a few takes however many there are. When at
    /// most `limit` inodes are dirty (the usual case) that is all of them,
    /// oldest mark first; a larger backlog is taken in inode order, which
    /// is roughly the order of creation.
    pub fn take_dirty(&self, limit: usize) -> Result<Vec<DirtyMark>, FsError> {
        let start = self.idx.dirty_cursor.load(Ordering::Relaxed);
        let from = ino_key(start);
        let mut taken = Vec::new();
        let mut next = start;
        let tree = &self.idx.dirty;
        for item in tree.range(from..).chain(tree.range(..from)) {
            if taken.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| store_err("reading dirty marks", e))?;
            if let (Some(ino), Some(mark)) = (be_u64(&k), be_u64(&v)) {
                taken.push(DirtyMark {
                    ino: Ino(ino),
                    mark,
                });
                next = ino.wrapping_add(1);
            }
        }
        self.idx.dirty_cursor.store(next, Ordering::Relaxed);
        taken.sort_unstable_by_key(|m| m.mark);
        Ok(taken)
    }

    /// How many inodes are dirty.
    pub fn dirty_count(&self) -> u64 {
        self.idx.dirty.len() as u64
    }

    /// The global id of local inode `ino`: recorded, or the one it gets
    /// when first versioned.
    pub fn gid_of(&self, ino: Ino) -> Result<Gid, FsError> {
        if ino == Ino::ROOT {
            return Ok(Gid::ROOT);
        }
        match self
            .idx
            .ino_gid
            .get(ino_key(ino.0))
            .map_err(|e| store_err("reading ino_gid", e))?
        {
            Some(v) => gid_from(&v),
            None => Ok(Gid::new(self.device(), ino.0)),
        }
    }

    /// The names of `ino`: (parent inode, name), from `links`.
    pub(crate) fn links_of(&self, ino: u64) -> Result<Vec<(u64, Vec<u8>)>, FsError> {
        let mut out = Vec::new();
        for item in self.links.scan_prefix(ino_key(ino)) {
            let (k, _) = item.map_err(|e| store_err("reading links", e))?;
            let Some(parent) = k.get(8..).and_then(be_u64) else {
                continue;
            };
            out.push((parent, k[16..].to_vec()));
        }
        Ok(out)
    }

    /// The versioning view of `ino`.
    pub fn local_object(&self, ino: Ino) -> Result<LocalObject, FsError> {
        let gid = self.gid_of(ino)?;
        let recorded = self.object(&gid)?;
        let now = match self.read_inode(ino.0)? {
            Some(rec) if rec.nlink > 0 => Some(self.local_state(ino, &rec)?),
            _ => None,
        };
        Ok(LocalObject {
            ino,
            gid,
            recorded,
            now,
        })
    }

    fn local_state(&self, ino: Ino, rec: &InodeRec) -> Result<LocalState, FsError> {
        let mut names = Vec::new();
        if ino != Ino::ROOT {
            for (parent, name) in self.links_of(ino.0)? {
                names.push(EntryName {
                    parent: self.gid_of(Ino(parent))?,
                    name,
                });
            }
        }
        names.sort();
        let (mtime, size, presence) = match rec.kind {
            FileKind::File => {
                let cs = self
                    .content
                    .stat(ino.0, rec.generation)
                    .map_err(|e| super::content_err(format!("stat of {ino}"), &e))?;
                let presence = self
                    .presence(ino)?
                    .filter(|p| p.generation == rec.generation);
                (cs.mtime, cs.size, presence)
            }
            FileKind::Symlink => (rec.mtime, rec.target.len() as u64, None),
            _ => (rec.mtime, 0, None),
        };
        Ok(LocalState {
            kind: rec.kind,
            perm: rec.perm & 0o7777,
            mtime,
            size,
            names,
            target: rec.target.clone(),
            generation: rec.generation,
            presence,
        })
    }

    /// Open the content file of `ino` generation `generation` for reading (to
    /// hash it), without moving its atime.
    pub fn open_content(&self, ino: Ino, generation: u64) -> Result<std::fs::File, FsError> {
        self.content
            .open_internal(ino.0, generation)
            .map(std::fs::File::from)
            .map_err(|e| super::content_err(format!("opening {ino} generation {generation}"), &e))
    }

    /// Record `rec` as the new local version of `mark.ino` and append it
    /// to the change log; clear the dirty mark if it is still `mark`.
    /// Answers the new local sequence number.
    pub fn commit_local(&self, mark: DirtyMark, rec: &ObjRec) -> Result<u64, FsError> {
        self.commit_local_batch(&[(mark, rec.clone())])
    }

    /// [`Store::commit_local`] of several versions (of distinct inodes) in
    /// one transaction, in order: each gets the next sequence number.
    /// Answers the last; nothing is recorded when it fails.
    pub fn commit_local_batch(&self, batch: &[(DirtyMark, ObjRec)]) -> Result<u64, FsError> {
        use sled::Transactional;
        let ix = &self.idx;
        let _seq = ix.lock_seq();
        let first = ix.next_seq();
        if batch.is_empty() {
            return Ok(first - 1);
        }
        let items: Vec<(u64, &DirtyMark, &ObjRec, Vec<u8>)> = batch
            .iter()
            .zip(first..)
            .map(|((mark, rec), seq)| (seq, mark, rec, enc(rec)))
            .collect();
        (
            &ix.objects,
            &ix.obj_seq,
            &ix.changes,
            &ix.gid_ino,
            &ix.ino_gid,
            &ix.dirty,
            &ix.presence,
        )
            .transaction(
                |(objects, obj_seq, changes, gid_ino, ino_gid, dirty, presence)| {
                    for (seq, mark, rec, value) in &items {
                        let ino = ino_key(mark.ino.0);
                        let g = &rec.gid.0[..];
                        objects.insert(g, value.as_slice())?;
                        if let Some(old) = obj_seq.insert(g, &seq.to_be_bytes())? {
                            changes.remove(old)?;
                        }
                        changes.insert(&seq.to_be_bytes(), g)?;
                        if rec.deleted {
                            ino_gid.remove(&ino)?;
                            gid_ino.remove(g)?;
                            presence.remove(&ino)?;
                        } else {
                            ino_gid.insert(&ino, g)?;
                            gid_ino.insert(g, &ino)?;
                        }
                        if dirty.get(ino)?.as_deref().and_then(be_u64) == Some(mark.mark) {
                            dirty.remove(&ino)?;
                        }
                    }
                    Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                },
            )
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => {
                    store_err("committing a local version", e)
                }
                sled::transaction::TransactionError::Abort(()) => {
                    fs_err!(EIO, "committing a local version aborted")
                }
            })?;
        let last = first + batch.len() as u64 - 1;
        ix.published(last);
        crate::metrics::local_versions(batch.len() as u64);
        Ok(last)
    }

    /// Clear a dirty mark without a new version (nothing shared changed).
    pub fn clear_dirty(&self, mark: DirtyMark) -> Result<(), FsError> {
        let _ = self
            .idx
            .dirty
            .compare_and_swap(
                ino_key(mark.ino.0),
                Some(&mark.mark.to_be_bytes()[..]),
                None as Option<&[u8]>,
            )
            .map_err(|e| store_err("clearing a dirty mark", e))?;
        Ok(())
    }

    /// The last local sequence number.
    pub fn local_seq(&self) -> u64 {
        self.idx.seq.load(Ordering::SeqCst)
    }

    /// Records changed after local sequence `seq`, up to `limit`, in
    /// sequence order: each one as it was recorded at its number.
    ///
    /// The log is read while commits go on, so an object may be recorded
    /// again (at a higher number) between reading its entry and its
    /// record. Such an entry is skipped: the newer record comes at its own
    /// number, after the records committed before it. Sending it at the
    /// old number would put it before them: a peer's conflict winner (its
    /// merged vector supersedes our losing version) would arrive before
    /// the conflict copy that keeps our version, and our bytes would be
    /// replaced before the copy could be seeded from them.
    pub fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<(u64, ObjRec)>, FsError> {
        let mut out = Vec::new();
        let upto = self.local_seq();
        if seq >= upto {
            return Ok(out);
        }
        let range = seq.saturating_add(1).to_be_bytes()..=upto.to_be_bytes();
        for item in self.idx.changes.range(range) {
            if out.len() >= limit {
                break;
            }
            let (k, g) = item.map_err(|e| store_err("reading the change log", e))?;
            let (Some(s), Ok(gid)) = (be_u64(&k), gid_from(&g)) else {
                continue;
            };
            #[cfg(test)]
            if let Some(hook) = self
                .idx
                .log_read_hook
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                hook(s, &gid);
            }
            if let Some(rec) = self.record_at(s, &gid)? {
                out.push((s, rec));
            }
        }
        Ok(out)
    }

    /// The record of `gid` if it is still the one committed at local
    /// sequence `seq` (`None` if it was recorded again since).
    fn record_at(&self, seq: u64, gid: &Gid) -> Result<Option<ObjRec>, FsError> {
        let Some(rec) = self.object(gid)? else {
            return Ok(None);
        };
        // A commit writes `objects` and `obj_seq` in one transaction and
        // numbers only grow: if the number is still `seq` after the record
        // was read, the record read is the one committed at `seq`.
        let now = self
            .idx
            .obj_seq
            .get(gid.0)
            .map_err(|e| store_err("reading obj_seq", e))?
            .as_deref()
            .and_then(be_u64);
        Ok((now == Some(seq)).then_some(rec))
    }

    /// Tests: the last number in the change log (committed; it may not
    /// be published yet).
    #[cfg(test)]
    pub(crate) fn log_end(&self) -> u64 {
        self.idx
            .changes
            .last()
            .ok()
            .flatten()
            .and_then(|(k, _)| be_u64(&k))
            .unwrap_or(0)
    }

    /// Tests: call `hook(seq, gid)` in [`Store::changes_since`] between
    /// reading a log entry and its record (to force a commit there).
    #[cfg(test)]
    pub(crate) fn set_log_read_hook(&self, hook: Option<LogReadHook>) {
        *self
            .idx
            .log_read_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// The recorded version of `gid`.
    pub fn object(&self, gid: &Gid) -> Result<Option<ObjRec>, FsError> {
        match self
            .idx
            .objects
            .get(gid.0)
            .map_err(|e| store_err("reading objects", e))?
        {
            Some(v) => dec(&v, "object").map(Some),
            None => Ok(None),
        }
    }

    /// The head of `gid`'s record (everything before its chunk hashes),
    /// decoded without the hashes: what a caller that needs only the size
    /// or the mtime reads (a 1 GiB file's record holds 128 KiB of hashes).
    pub fn object_head(&self, gid: &Gid) -> Result<Option<ObjHead>, FsError> {
        match self
            .idx
            .objects
            .get(gid.0)
            .map_err(|e| store_err("reading objects", e))?
        {
            Some(v) => postcard::take_from_bytes::<ObjHead>(&v)
                .map(|(head, _)| Some(head))
                .map_err(|e| fs_err!(EIO, "corrupt object in the index: {e}")),
            None => Ok(None),
        }
    }

    /// The head of `gid`'s record and the recorded hash of its chunk
    /// `index` (`None` for the hash when the record has no such chunk),
    /// read from the encoded record without decoding the other hashes: a
    /// postcard sequence is its length (a varint) followed by its
    /// elements, and a [`ChunkHash`] is always 32 bytes there.
    pub fn object_chunk(
        &self,
        gid: &Gid,
        index: u64,
    ) -> Result<Option<(ObjHead, Option<ChunkHash>)>, FsError> {
        let Some(v) = self
            .idx
            .objects
            .get(gid.0)
            .map_err(|e| store_err("reading objects", e))?
        else {
            return Ok(None);
        };
        let corrupt = |e: postcard::Error| fs_err!(EIO, "corrupt object in the index: {e}");
        let (head, rest) = postcard::take_from_bytes::<ObjHead>(&v).map_err(corrupt)?;
        let (count, hashes) = postcard::take_from_bytes::<u64>(rest).map_err(corrupt)?;
        if index >= count {
            return Ok(Some((head, None)));
        }
        let at = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_mul(CHUNK_HASH_LEN))
            .and_then(|from| hashes.get(from..from.checked_add(CHUNK_HASH_LEN)?));
        let Some(bytes) = at else {
            return Err(fs_err!(
                EIO,
                "corrupt object in the index: {} has {count} chunk hashes in fewer bytes",
                gid.hex()
            ));
        };
        let (hash, _) = postcard::take_from_bytes::<ChunkHash>(bytes).map_err(corrupt)?;
        Ok(Some((head, Some(hash))))
    }

    /// The local inode of `gid`, if it has one (not for tombstones).
    pub fn ino_of(&self, gid: &Gid) -> Result<Option<Ino>, FsError> {
        if *gid == Gid::ROOT {
            return Ok(Some(Ino::ROOT));
        }
        Ok(self
            .idx
            .gid_ino
            .get(gid.0)
            .map_err(|e| store_err("reading gid_ino", e))?
            .as_deref()
            .and_then(be_u64)
            .map(Ino))
    }

    /// The last sequence number of peer `fingerprint` applied here.
    pub fn peer_applied(&self, fingerprint: &str) -> Result<u64, FsError> {
        Ok(self
            .idx
            .peer_seq
            .get(fingerprint.as_bytes())
            .map_err(|e| store_err("reading peer_seq", e))?
            .as_deref()
            .and_then(be_u64)
            .unwrap_or(0))
    }

    /// Remember that changes of `fingerprint` up to `seq` are applied
    /// (flushed with the records they cover: sled keeps a prefix of its
    /// log, and this write comes after theirs).
    pub fn set_peer_applied(&self, fingerprint: &str, seq: u64) -> Result<(), FsError> {
        self.idx
            .peer_seq
            .insert(fingerprint.as_bytes(), &seq.to_be_bytes())
            .map_err(|e| store_err("writing peer_seq", e))?;
        Ok(())
    }

    /// The path of `ino` from the root (`/a/b`), for listings.
    pub fn path_of(&self, ino: Ino) -> Result<String, FsError> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut at = ino.0;
        // Bounded: a cycle would be damage.
        for _ in 0..4096 {
            if at == Ino::ROOT.0 {
                parts.reverse();
                let mut out = String::new();
                for p in &parts {
                    out.push('/');
                    out.push_str(&String::from_utf8_lossy(p));
                }
                if out.is_empty() {
                    out.push('/');
                }
                return Ok(out);
            }
            let mut links = self.links_of(at)?;
            links.sort();
            let Some((parent, name)) = links.into_iter().next() else {
                return Err(fs_err!(ENOENT, "{} has no name", Ino(at)));
            };
            parts.push(name);
            at = parent;
        }
        Err(fs_err!(EIO, "the path of {ino} is too deep"))
    }
}

/// A gid from its 16 bytes.
pub(crate) fn gid_from(b: &[u8]) -> Result<Gid, FsError> {
    <[u8; 16]>::try_from(b)
        .map(Gid)
        .map_err(|_| fs_err!(EIO, "corrupt gid in the index"))
}
