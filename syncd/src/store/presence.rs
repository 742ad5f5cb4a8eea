//! Which chunks of a file are local: the `presence` tree.
//!
//! A version applied from a peer starts a new content generation, sparse,
//! with the chunks that could be copied from local content already in it
//! ([`super::apply`]); the rest are fetched on demand (`sync/fetch.rs`).
//! While some are missing the file has a [`PresenceRec`]: the expected
//! hash of every chunk and a bitmap of the ones present and verified. The
//! record goes when the file is complete.
//!
//! Layout. The record in `presence` (the hashes, one per chunk: 128 KiB
//! for a 1 GiB file) is written when the version is applied and hardly
//! ever again. What changes while chunks arrive is a small
//! [`PresentBits`] in `present_bits` (the bitmaps, the size and the
//! limit: about 1 KiB for a 1 GiB file), so marking a chunk present
//! rewrites that, not the hashes. A `PresentBits` counts only while its
//! gid, generation and size are the record's (a generation is never used
//! twice for an inode, so bits of an older version are never mistaken for
//! the current one's); the bits of a file are then the `PresentBits`,
//! else the record's own. A store written before the tree existed has
//! records and no bits: they read as before, and the first chunk marked
//! makes the bits from the record. A record that completes goes with its
//! bits, in one transaction. An older keibi-syncd reading this store sees
//! only the record's bits and fetches again what the tree says is present
//! (slower, never less safe: truncates rewrite the record's limit too).
//!
//! Order and crash safety. A fetched chunk's bytes are written into the
//! generation file, and only then is its bit set ([`Store::mark_present`]).
//! sled keeps a prefix of its log, but the content file's bytes are in
//! the page cache until the kernel writes them: after a power cut a bit
//! may be set for bytes that never reached the disk. Two things make that
//! harmless:
//! - every [`SYNC_BATCH`] chunks marked since the last sync, and before
//!   the mark that completes a file, the content file is synced
//!   (`fdatasync`); after a periodic sync the bits that were set *before*
//!   it started are recorded in `synced`: their bytes were written before
//!   their bit was set, so before the sync, so they are on disk;
//! - at every start the present chunks that are not `synced` (at most
//!   about [`SYNC_BATCH`] per file in flight, plus every present chunk of
//!   a record written before `present_bits` existed) are hashed again and
//!   the bits of those that do not verify are cleared
//!   ([`Store::verify_presence`]); they are fetched again when read. The
//!   file is then synced and every bit left is recorded as synced.
//!
//! So after any crash a chunk whose bit is set is either synced (on disk
//! since before the bit said so) or checked at start, and a complete file
//! was synced before its record went. The start-up check costs at most
//! about `SYNC_BATCH` chunk hashes per partial file, not the whole file.
//!
//! Truncation. A truncate (setattr size, `O_TRUNC`) of a partial file
//! needs no fetch: chunks that start at or beyond the record's `limit`
//! (the smallest size since the version arrived) count as present, so the
//! truncate only lowers `limit`; a file whose every chunk counts as
//! present is complete. A later write beyond `limit` is local data, never
//! overwritten by a fetch (a fetch writes only the part of a chunk below
//! `limit`). The limit is a promise about bytes the next write may put
//! there, so a truncate that lowers it flushes the store before it
//! answers.
//!
//! The inode's size lock ([`SizeLocks`]) makes a truncate and a fetched
//! chunk's write exclude each other: a truncate holds it from its
//! `ftruncate` until its limit is recorded, and [`Store::write_chunk`]
//! from reading the limit until its `pwrite` returned. So a truncate
//! lands wholly before a fetched write (which then writes only below the
//! new limit) or wholly after it (and cuts what it wrote); fetched bytes
//! never land beyond a size a truncate set, never bring back bytes it
//! cut, and never overwrite bytes written after it. The lock is never
//! held across an `.await` or a peer call: the fetcher takes it on the
//! blocking pool, with the chunk's bytes already verified in memory.
//!
//! Local writes into fetched chunks. mountd fetches a missing chunk
//! before a write into it, and writes into chunks only once syncd said
//! they are present (in the answer of the open or of a `fetch_range`
//! through that handle). Such a chunk's bytes then differ from its
//! version's hash, so the start-up check must never look at it: before
//! syncd tells a handle that may write (opened for writing, or kept by
//! mountd across a restart of syncd) which chunks are present, it syncs
//! the content file if some present chunk is not synced yet, records every
//! present chunk as synced, and flushes the store
//! ([`Store::settle_for_writer`]). A chunk a writer may touch is thus
//! synced, durably, before the writer can touch it, and is never hashed
//! again at start nor fetched again; a chunk whose bytes a crash tore
//! during a fetch was never told to a writer, so it is unsynced and still
//! checked at start.

use super::objects::{PresenceRec, bit, dec, enc, set_bit};
use super::records::{InodeRec, be_u64, decode, ino_key};
use super::{Store, content_err, store_err};
use crate::sync::model::{CHUNK_SIZE, ChunkHash, Gid, chunk_count, chunk_range};
use ipc_schema::{FileKind, FsError, HandleId, Ino, Partial, fs_err};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

/// After this many chunks marked present and not yet synced, the content
/// file is synced and they are recorded as synced (see the module doc):
/// at most this many chunks of a file are hashed again at start.
pub const SYNC_BATCH: u32 = 64;

/// How many size locks there are (inodes share them by number).
const SIZE_LOCKS: usize = 64;

/// The per-inode size locks (see the module doc, "Truncation"): striped,
/// an inode takes the one of its number. Lock order: taken before the
/// open-table lock and before any sled transaction; no size lock is taken
/// while another is held; never held across an `.await`, an IPC call or
/// a peer call.
pub(crate) struct SizeLocks {
    locks: Vec<Mutex<()>>,
    /// Tests: run between the read of the limit and the `pwrite` of
    /// [`Store::write_chunk`].
    #[cfg(test)]
    pub(crate) between: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Tests: how many callers wait for a size lock.
    #[cfg(test)]
    pub(crate) waiting: std::sync::atomic::AtomicUsize,
}

impl SizeLocks {
    pub(crate) fn new() -> SizeLocks {
        SizeLocks {
            locks: (0..SIZE_LOCKS).map(|_| Mutex::new(())).collect(),
            #[cfg(test)]
            between: Mutex::new(None),
            #[cfg(test)]
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The size lock of `ino`.
    pub(crate) fn lock(&self, ino: Ino) -> MutexGuard<'_, ()> {
        let m = &self.locks[(ino.0 % SIZE_LOCKS as u64) as usize];
        #[cfg(test)]
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let g = m.lock().unwrap_or_else(|p| p.into_inner());
        #[cfg(test)]
        self.waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        g
    }

    #[cfg(test)]
    fn run_between(&self) {
        if let Some(f) = self
            .between
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            f();
        }
    }
}

/// The part of a partial file's presence that changes while its chunks
/// arrive (tree `present_bits`; see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentBits {
    /// The object (as in the record).
    pub gid: Gid,
    /// The content generation (as in the record).
    pub generation: u64,
    /// The version's size (as in the record).
    pub size: u64,
    /// The record's limit, lowered by truncates.
    pub limit: u64,
    /// Bitmap of the chunks present and verified (the record's and those
    /// marked since).
    pub present: Vec<u64>,
    /// Bitmap of the present chunks whose bytes were synced to disk before
    /// their bit here was written (a subset of `present`).
    pub synced: Vec<u64>,
}

impl PresentBits {
    /// The bits of a record as it is (nothing synced yet).
    pub fn of(p: &PresenceRec) -> PresentBits {
        PresentBits {
            gid: p.gid,
            generation: p.generation,
            size: p.size,
            limit: p.limit,
            present: p.present.clone(),
            synced: Vec::new(),
        }
    }

    /// How many chunks the version has.
    pub fn chunks(&self) -> u64 {
        chunk_count(self.size)
    }

    /// Whether chunk `index` counts as present.
    pub fn has(&self, index: u64) -> bool {
        let (start, _) = chunk_range(index, self.size);
        start >= self.limit || bit(&self.present, index)
    }

    /// Whether every chunk counts as present.
    pub fn complete(&self) -> bool {
        (0..self.chunks()).all(|i| self.has(i))
    }

    /// How many chunks are present but not synced.
    pub fn unsynced(&self) -> u32 {
        self.present
            .iter()
            .enumerate()
            .map(|(w, p)| (p & !self.synced.get(w).copied().unwrap_or(0)).count_ones())
            .sum()
    }

    /// Whether these bits are about the version of `head`.
    fn matches(&self, head: &RecHead) -> bool {
        self.gid == head.gid && self.generation == head.generation && self.size == head.size
    }
}

/// The fields of a [`PresenceRec`] before its hashes, in the same order, so
/// that postcard decodes them from the front of an encoded record without
/// reading the hashes.
#[derive(Deserialize)]
struct RecHead {
    gid: Gid,
    generation: u64,
    size: u64,
}

fn rec_head(bytes: &[u8]) -> Result<RecHead, FsError> {
    postcard::take_from_bytes::<RecHead>(bytes)
        .map(|(h, _)| h)
        .map_err(|e| fs_err!(EIO, "corrupt presence record in the index: {e}"))
}

/// The bits of a record (`head`, encoded as `rec`) given the `present_bits`
/// value `stored`: that value when it is about the same version, else the
/// record's own.
fn bits_of(rec: &[u8], stored: Option<&[u8]>) -> Result<PresentBits, FsError> {
    let head = rec_head(rec)?;
    if let Some(v) = stored
        && let Ok(b) = postcard::from_bytes::<PresentBits>(v)
        && b.matches(&head)
    {
        return Ok(b);
    }
    Ok(PresentBits::of(&dec(rec, "presence record")?))
}

/// What a change of [`PresentBits`] asks [`Store::update_bits`] to do.
enum Change {
    /// Leave them as they are.
    Keep,
    /// Write them.
    Write,
}

/// Why [`Store::update_bits`] did not write.
enum Refused {
    /// The change would complete the file, which needs a sync first.
    NeedsSync,
    /// A store error.
    Failed(FsError),
}

impl Store {
    /// The presence record of `ino`, if its bytes are not all local, with
    /// the bits of `present_bits` merged in.
    pub fn presence(&self, ino: Ino) -> Result<Option<PresenceRec>, FsError> {
        let Some((rec, stored)) = self.presence_raw(ino)? else {
            return Ok(None);
        };
        let mut p: PresenceRec = dec(&rec, "presence record")?;
        let head = RecHead {
            gid: p.gid,
            generation: p.generation,
            size: p.size,
        };
        if let Some(v) = stored
            && let Ok(b) = postcard::from_bytes::<PresentBits>(&v)
            && b.matches(&head)
        {
            p.limit = p.limit.min(b.limit);
            if p.present.len() < b.present.len() {
                p.present.resize(b.present.len(), 0);
            }
            for (w, bits) in p.present.iter_mut().zip(&b.present) {
                *w |= bits;
            }
        }
        Ok(Some(p))
    }

    /// The presence bits of `ino` without its hashes (the cheap question
    /// of the fetcher), if its bytes are not all local.
    pub fn presence_bits(&self, ino: Ino) -> Result<Option<PresentBits>, FsError> {
        let Some((rec, stored)) = self.presence_raw(ino)? else {
            return Ok(None);
        };
        bits_of(&rec, stored.as_deref()).map(Some)
    }

    /// The encoded presence record of `ino` and its `present_bits` value,
    /// as stored (`None`: the file is all local).
    fn presence_raw(&self, ino: Ino) -> Result<Option<(sled::IVec, Option<sled::IVec>)>, FsError> {
        let key = ino_key(ino.0);
        let Some(rec) = self
            .idx
            .presence
            .get(key)
            .map_err(|e| store_err("reading presence", e))?
        else {
            return Ok(None);
        };
        let stored = self
            .idx
            .present_bits
            .get(key)
            .map_err(|e| store_err("reading presence bits", e))?;
        Ok(Some((rec, stored)))
    }

    /// What an open of `ino` generation `generation` tells mountd about
    /// missing bytes (`None`: all local).
    pub(crate) fn partial_of(&self, ino: Ino, generation: u64) -> Result<Option<Partial>, FsError> {
        Ok(self
            .presence_bits(ino)?
            .filter(|p| p.generation == generation)
            .map(|p| Partial {
                chunk_size: CHUNK_SIZE,
                size: p.limit,
                present: p.present,
            }))
    }

    /// The inode and content generation an open handle reads.
    pub fn handle_version(&self, handle: HandleId) -> Option<(Ino, u64)> {
        self.lock_opens().version_of(handle)
    }

    /// Whether `handle` may write (see [`crate::opens::OpenTable::may_write`]).
    pub fn handle_may_write(&self, handle: HandleId) -> bool {
        self.lock_opens().may_write(handle)
    }

    /// Open `ino`'s content generation `generation` for writing fetched chunks.
    pub fn open_for_fill(&self, ino: Ino, generation: u64) -> Result<std::fs::File, FsError> {
        self.content
            .open(ino.0, generation, nix::fcntl::OFlag::O_WRONLY)
            .map(std::fs::File::from)
            .map_err(|e| content_err(format!("opening {ino} generation {generation}"), &e))
    }

    /// Change the presence bits of `ino` with `change`, atomically (one
    /// sled transaction over `presence` and `present_bits`). Bits that are
    /// complete afterwards remove the record and the bits, unless
    /// `may_complete` is false: then nothing is written and the answer is
    /// [`Refused::NeedsSync`]. `with_record` also rewrites the record's
    /// limit and bitmap from the bits (for the rare changes an older
    /// keibi-syncd must see too). Answers the bits after the change
    /// (`None`: no record, or complete now).
    fn update_bits(
        &self,
        ino: Ino,
        may_complete: bool,
        with_record: bool,
        change: impl Fn(&mut PresentBits) -> Change,
    ) -> Result<Option<PresentBits>, Refused> {
        use sled::Transactional;
        let key = ino_key(ino.0);
        let ix = &self.idx;
        let r = (&ix.presence, &ix.present_bits).transaction(|(presence, bits)| {
            let abort = |e: FsError| ConflictableTransactionError::Abort(Refused::Failed(e));
            let Some(rec) = presence.get(key)? else {
                return Ok(None);
            };
            let stored = bits.get(key)?;
            let mut b = bits_of(&rec, stored.as_deref()).map_err(abort)?;
            if let Change::Keep = change(&mut b) {
                return Ok((!b.complete()).then_some(b));
            }
            if b.complete() {
                if !may_complete {
                    return Err(ConflictableTransactionError::Abort(Refused::NeedsSync));
                }
                presence.remove(&key[..])?;
                bits.remove(&key[..])?;
                return Ok(None);
            }
            if with_record {
                let mut p: PresenceRec = dec(&rec, "presence record").map_err(abort)?;
                p.limit = b.limit;
                p.present = b.present.clone();
                presence.insert(&key[..], enc(&p))?;
            }
            bits.insert(&key[..], enc(&b))?;
            Ok(Some(b))
        });
        r.map_err(|e| match e {
            TransactionError::Abort(r) => r,
            TransactionError::Storage(e) => Refused::Failed(store_err("writing presence", e)),
        })
    }

    /// [`Store::update_bits`] for a change that neither completes the file
    /// nor touches the record (a chunk marked present): a
    /// compare-and-swap of the `present_bits` value alone, retried when it
    /// changed meanwhile, instead of a transaction. A change that would
    /// complete the file is refused with [`Refused::NeedsSync`] (the
    /// caller syncs, then completes it in a transaction).
    ///
    /// Why. Every sled transaction writes sled's log twice on its I/O
    /// threads (it rolls the log buffer before and after), and this runs
    /// once per fetched chunk: about 23% of the fetching syncd's CPU
    /// samples were those threads during a cold read. A single-key swap
    /// only adds to the log buffer (measured: 27% less CPU per GiB in the
    /// fetching syncd, see `docs/architecture.md`).
    ///
    /// Why it is as safe. The record is read first, outside a
    /// transaction, and may change before the swap: a new version's record
    /// (written by an apply, which leaves `present_bits` alone) makes the
    /// swapped bits stale, and stale bits count for nothing (they name
    /// another generation or size; [`bits_of`] then falls back to the
    /// record, and the start-up check removes them); a completion removes
    /// the bits, so a swap that expected them fails and the retry finds no
    /// record. A transaction holds sled's concurrency-control write lock
    /// from its first read to its commit, and a single-key operation the
    /// read side, so a transaction reads the bits either before or after
    /// a swap, never loses a bit set by one. Order on disk is as before:
    /// the bytes were written before the bit, and sled keeps a prefix of
    /// its log.
    fn set_bits(
        &self,
        ino: Ino,
        change: impl Fn(&mut PresentBits) -> Change,
    ) -> Result<Option<PresentBits>, Refused> {
        let key = ino_key(ino.0);
        loop {
            let Some((rec, stored)) = self.presence_raw(ino).map_err(Refused::Failed)? else {
                return Ok(None);
            };
            let mut b = bits_of(&rec, stored.as_deref()).map_err(Refused::Failed)?;
            if let Change::Keep = change(&mut b) {
                return Ok((!b.complete()).then_some(b));
            }
            if b.complete() {
                return Err(Refused::NeedsSync);
            }
            let swapped = self
                .idx
                .present_bits
                .compare_and_swap(key, stored, Some(enc(&b)))
                .map_err(|e| Refused::Failed(store_err("writing presence bits", e)))?;
            if swapped.is_ok() {
                return Ok(Some(b));
            }
        }
    }

    /// Mark chunk `index` of `ino` generation `generation` present (its bytes are
    /// written and verified). Answers the presence bitmap after it
    /// (empty: the file is complete and the record is gone). Syncs the
    /// content file before the mark that completes it, and every
    /// [`SYNC_BATCH`] unsynced chunks (see the module doc).
    pub fn mark_present(&self, ino: Ino, generation: u64, index: u64) -> Result<Vec<u64>, FsError> {
        let stale = std::cell::Cell::new(false);
        let set = std::cell::Cell::new(false);
        let change = |b: &mut PresentBits| {
            stale.set(false);
            set.set(false);
            if b.generation != generation || index >= b.chunks() {
                stale.set(true);
                return Change::Keep;
            }
            if bit(&b.present, index) {
                return Change::Keep;
            }
            set_bit(&mut b.present, index);
            set.set(true);
            Change::Write
        };
        let after = match self.set_bits(ino, change) {
            Ok(after) => after,
            Err(Refused::Failed(e)) => return Err(e),
            Err(Refused::NeedsSync) => {
                // The last chunk: every byte of the file is written;
                // make them durable before the record goes.
                self.sync_content(ino, generation)?;
                match self.update_bits(ino, true, false, change) {
                    Ok(after) => after,
                    Err(Refused::Failed(e)) => return Err(e),
                    Err(Refused::NeedsSync) => {
                        return Err(fs_err!(EIO, "{ino}: presence refused to complete"));
                    }
                }
            }
        };
        if stale.get() {
            return Err(fs_err!(
                ESTALE,
                "chunk {index} of {ino} generation {generation}: the file has another version now"
            ));
        }
        if let Some(b) = &after
            && b.unsynced() >= SYNC_BATCH
        {
            self.sync_present(ino, generation, b.present.clone())?;
        }
        if set.get() {
            self.restore_mtime(ino, generation)?;
        }
        Ok(after.map(|p| p.present).unwrap_or_default())
    }

    /// Write the verified bytes of fetched chunk `index` of `ino`
    /// generation `generation` (the whole chunk, as the version has it, in
    /// `pieces` one after the other: as the peer's messages brought them)
    /// into the content file, the part below the presence `limit` only and
    /// never past the file's end, then mark the chunk present. Nothing is
    /// written when the chunk counts as present already (fetched meanwhile,
    /// or at or beyond the limit) or the file is complete; `EIO` when
    /// another version replaced this one.
    ///
    /// The limit is read and the bytes written under the inode's size lock
    /// (see the module doc, "Truncation").
    pub fn write_chunk(
        &self,
        ino: Ino,
        generation: u64,
        index: u64,
        pieces: &[bytes::Bytes],
    ) -> Result<(), FsError> {
        {
            let _size = self.size_locks.lock(ino);
            let Some(rec) = self.presence_bits(ino)? else {
                return Ok(());
            };
            if rec.generation != generation {
                return Err(fs_err!(
                    EIO,
                    "{ino}: generation {generation} was replaced by {} while chunk {index} was fetched",
                    rec.generation
                ));
            }
            if rec.has(index) {
                return Ok(());
            }
            #[cfg(test)]
            self.size_locks.run_between();
            let (start, _) = chunk_range(index, rec.size);
            let file = self.open_for_fill(ino, generation)?;
            let len = file
                .metadata()
                .map_err(|e| FsError::io(format!("{ino}: stat before writing a chunk"), &e))?
                .len();
            let upto = rec.limit.min(len);
            let mut at = start;
            for piece in pieces {
                if at >= upto {
                    break;
                }
                let take = (upto - at).min(piece.len() as u64) as usize;
                file.write_all_at(&piece[..take], at).map_err(|e| {
                    FsError::io(format!("{ino}: writing fetched chunk {index}"), &e)
                })?;
                at += take as u64;
            }
        }
        self.mark_present(ino, generation, index)?;
        Ok(())
    }

    /// Before a handle that may write learns which chunks of `ino` are
    /// present: make every present chunk durable and recorded as synced,
    /// and flush the store, so that no chunk a writer may write into is
    /// hashed again at start, or fetched again, after a crash (see the
    /// module doc, "Local writes into fetched chunks"). The caller reads
    /// the bits it answers before calling this: bits are only ever added
    /// while syncd runs, so those are among the ones made durable here.
    pub fn settle_for_writer(&self, ino: Ino) -> Result<(), FsError> {
        if let Some(b) = self.presence_bits(ino)?
            && b.unsynced() > 0
        {
            self.sync_present(ino, b.generation, b.present.clone())?;
        }
        self.flush_store()
    }

    /// `fdatasync` of `ino` generation `generation`'s content.
    fn sync_content(&self, ino: Ino, generation: u64) -> Result<(), FsError> {
        self.open_content(ino, generation)?
            .sync_data()
            .map_err(|e| FsError::io(format!("syncing {ino} generation {generation}"), &e))
    }

    /// Sync `ino`'s content and then record the chunks of `written` (bits
    /// set before the sync started) as synced.
    fn sync_present(&self, ino: Ino, generation: u64, written: Vec<u64>) -> Result<(), FsError> {
        self.sync_content(ino, generation)?;
        let r = self.update_bits(ino, true, false, |b| {
            if b.generation != generation {
                return Change::Keep;
            }
            let mut changed = false;
            if b.synced.len() < written.len() {
                b.synced.resize(written.len(), 0);
            }
            for (w, s) in b.synced.iter_mut().enumerate() {
                let add = written.get(w).copied().unwrap_or(0)
                    & b.present.get(w).copied().unwrap_or(0)
                    & !*s;
                changed |= add != 0;
                *s |= add;
            }
            if changed { Change::Write } else { Change::Keep }
        });
        match r {
            Ok(_) => Ok(()),
            Err(Refused::Failed(e)) => Err(e),
            Err(Refused::NeedsSync) => Err(fs_err!(EIO, "{ino}: presence refused to complete")),
        }
    }

    /// Put the version's mtime back on generation `generation` of `ino`
    /// after fetched bytes were written into it, unless the file is being
    /// changed here (open for writing, or dirty: its mtime is local then).
    fn restore_mtime(&self, ino: Ino, generation: u64) -> Result<(), FsError> {
        if self.lock_opens().has_writer(ino)
            || self
                .idx
                .dirty
                .contains_key(ino_key(ino.0))
                .map_err(|e| store_err("reading dirty", e))?
        {
            return Ok(());
        }
        // The recorded version's mtime (a local version's, once the file
        // was changed here and versioned), read without its hashes.
        let mtime = match self.object_head(&self.gid_of(ino)?)? {
            Some(o) if !o.deleted => o.mtime,
            _ => return Ok(()),
        };
        let cs = self
            .content
            .stat(ino.0, generation)
            .map_err(|e| content_err(format!("stat of {ino}"), &e))?;
        if cs.mtime != mtime {
            self.content
                .update(
                    ino.0,
                    generation,
                    None,
                    None,
                    Some(ipc_schema::TimeSet::At(mtime)),
                )
                .map_err(|e| content_err(format!("setting the mtime of {ino}"), &e))?;
        }
        Ok(())
    }

    /// Copy into `ino`'s current generation every missing chunk that the
    /// local content `seed` has with the expected hash (verified by
    /// hashing the bytes copied), synced, and mark them present. Answers
    /// the bitmap after (empty: complete, or not partial).
    ///
    /// For the sync engine: a conflict copy that arrived from a peer before
    /// this side resolved the conflict itself is partial here, while its
    /// bytes are the local version that is about to be replaced; fill it
    /// from that version first.
    pub fn fill_from(&self, ino: Ino, seed: super::objects::Seed) -> Result<Vec<u64>, FsError> {
        let Some(p) = self.presence(ino)? else {
            return Ok(Vec::new());
        };
        let Ok(src) = self.open_content(seed.ino, seed.generation) else {
            return Ok(p.present);
        };
        let dst = self.open_for_fill(ino, p.generation)?;
        let mut copied = Vec::new();
        let mut buf = Vec::new();
        for (i, want) in p.chunks.iter().enumerate() {
            let i = i as u64;
            if p.has(i) {
                continue;
            }
            let (start, end) = chunk_range(i, p.size);
            buf.resize((end - start) as usize, 0);
            if src.read_exact_at(&mut buf, start).is_err() || ChunkHash::of(&buf) != *want {
                continue;
            }
            // Only below the limit, read under the size lock: beyond it
            // are local bytes (see the module doc, "Truncation").
            let _size = self.size_locks.lock(ino);
            let limit = match self.presence_bits(ino)? {
                Some(b) if b.generation == p.generation => b.limit,
                _ => break,
            };
            if start >= limit {
                continue;
            }
            let upto = (end.min(limit) - start) as usize;
            dst.write_all_at(&buf[..upto], start)
                .map_err(|e| FsError::io(format!("filling {ino}"), &e))?;
            copied.push(i);
        }
        if copied.is_empty() {
            return Ok(p.present);
        }
        dst.sync_data()
            .map_err(|e| FsError::io(format!("syncing {ino}"), &e))?;
        let mut after = p.present;
        for i in copied {
            after = self.mark_present(ino, p.generation, i)?;
        }
        Ok(after)
    }

    /// A truncate of `ino` (generation `generation`) to `size`: chunks
    /// from `size` on count as present from now on. Rewrites the record
    /// too, so that an older keibi-syncd never fetches into the truncated
    /// range. A lowered limit is flushed before this returns (the next
    /// write may put local bytes beyond it). Call with the inode's size
    /// lock held, from before the `ftruncate` (see the module doc).
    pub(crate) fn lower_limit(&self, ino: Ino, generation: u64, size: u64) -> Result<(), FsError> {
        let lowered = std::cell::Cell::new(false);
        let change = |b: &mut PresentBits| {
            lowered.set(false);
            if b.generation != generation || b.limit <= size {
                return Change::Keep;
            }
            b.limit = size;
            lowered.set(true);
            Change::Write
        };
        self.lower_limit_with(ino, generation, change)?;
        if lowered.get() {
            self.flush_store()?;
        }
        Ok(())
    }

    fn lower_limit_with(
        &self,
        ino: Ino,
        generation: u64,
        change: impl Fn(&mut PresentBits) -> Change,
    ) -> Result<(), FsError> {
        match self.update_bits(ino, false, true, &change) {
            Ok(_) => Ok(()),
            Err(Refused::Failed(e)) => Err(e),
            Err(Refused::NeedsSync) => {
                // Complete by the truncate: the chunks below `size` were
                // all marked (each synced or checked at start as usual);
                // sync anyway, as for any completing mark.
                self.sync_content(ino, generation)?;
                match self.update_bits(ino, true, true, change) {
                    Ok(_) => Ok(()),
                    Err(Refused::Failed(e)) => Err(e),
                    Err(Refused::NeedsSync) => {
                        Err(fs_err!(EIO, "{ino}: presence refused to complete"))
                    }
                }
            }
        }
    }

    /// The bytes of chunk `index` of `gid`'s current version, if they are
    /// present here and are the chunk whose hash is `hash`.
    ///
    /// `hash` must be the hash the version records for that chunk. The
    /// bytes are then hashed only when they may have changed since the
    /// version was made: while a handle that may write has the file open,
    /// or while it is marked dirty (written, not yet versioned again).
    /// Otherwise the content file holds exactly the bytes that were hashed
    /// into the version (or verified when fetched), and hashing them again
    /// would only repeat the check that the asking side makes of every
    /// chunk anyway before it writes it (`sync::fetch`; hashing was the
    /// largest single cost of serving a chunk): a disk that corrupted
    /// them is caught there, and the bytes are refused.
    pub fn read_chunk(
        &self,
        gid: &Gid,
        index: u64,
        hash: &ChunkHash,
    ) -> Result<Option<Vec<u8>>, FsError> {
        let Some(ino) = self.ino_of(gid)? else {
            return Ok(None);
        };
        let Some(rec) = self.read_inode(ino.0)? else {
            return Ok(None);
        };
        if rec.kind != FileKind::File {
            return Ok(None);
        }
        if let Some(p) = self.presence_bits(ino)?
            && p.generation == rec.generation
            && !p.has(index)
        {
            return Ok(None);
        }
        // The range of the chunk in the recorded version (the one peers
        // know); the local file may be longer or shorter if it changed.
        let size = match self.object_chunk(gid, index)? {
            Some((o, Some(recorded))) if !o.deleted && recorded == *hash => o.size,
            _ => return Ok(None),
        };
        let (start, end) = chunk_range(index, size);
        if start >= end {
            return Ok(None);
        }
        let mut file = self.open_content(ino, rec.generation)?;
        // Read into spare capacity: a chunk is served at network speed,
        // and zeroing a buffer only to overwrite it was a measurable part
        // of serving one.
        let want = end - start;
        let mut buf = Vec::with_capacity(want as usize);
        let read = file
            .seek(SeekFrom::Start(start))
            .and_then(|_| (&mut file).take(want).read_to_end(&mut buf));
        if let Err(e) = read {
            return Err(FsError::io(format!("reading a chunk of {ino}"), &e));
        }
        if buf.len() as u64 != want {
            // The file is shorter now: not the recorded version.
            return Ok(None);
        }
        // Asked after the read: a write during it left the file open for
        // writing or marked dirty.
        let may_have_changed = self.lock_opens().has_writer(ino)
            || self
                .idx
                .dirty
                .contains_key(ino_key(ino.0))
                .map_err(|e| store_err("reading dirty", e))?;
        Ok((!may_have_changed || ChunkHash::of(&buf) == *hash).then_some(buf))
    }

    /// Every partial file: (ino, presence), up to `limit`.
    pub fn partial_files(&self, limit: usize) -> Result<Vec<(Ino, PresenceRec)>, FsError> {
        let mut out = Vec::new();
        for item in self.idx.presence.iter() {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item.map_err(|e| store_err("reading presence", e))?;
            if let Some(ino) = be_u64(&k)
                && let Some(p) = self.presence(Ino(ino))?
            {
                out.push((Ino(ino), p));
            }
        }
        Ok(out)
    }

    /// At start: hash the present chunks of every partial file that are
    /// not recorded as synced again and clear the bits of those that do
    /// not verify (a power cut can keep a bit whose bytes were lost), then
    /// sync the file and record every bit left as synced; drop records of
    /// generations that are not current, and bits without their record,
    /// and lower `limit` to the file's size (a crash between a truncate
    /// and its record). Returns what it repaired.
    pub(crate) fn verify_presence(&self) -> Result<Vec<super::check::Finding>, FsError> {
        use ipc_schema::{CheckFinding, CheckKind};
        use sled::Transactional;
        let mut found = Vec::new();
        // Bits whose record is gone (completed or replaced meanwhile).
        for item in self.idx.present_bits.iter() {
            let (k, _) = item.map_err(|e| store_err("reading presence bits", e))?;
            if !self
                .idx
                .presence
                .contains_key(&k)
                .map_err(|e| store_err("reading presence", e))?
            {
                self.idx
                    .present_bits
                    .remove(&k)
                    .map_err(|e| store_err("writing presence bits", e))?;
            }
        }
        let keys: Vec<u64> = self
            .idx
            .presence
            .iter()
            .keys()
            .filter_map(|k| k.ok().and_then(|k| be_u64(&k)))
            .collect();
        for ino in keys.into_iter().map(Ino) {
            let key = ino_key(ino.0);
            let Some(rec_bytes) = self
                .idx
                .presence
                .get(key)
                .map_err(|e| store_err("reading presence", e))?
            else {
                continue;
            };
            let stored = self
                .idx
                .present_bits
                .get(key)
                .map_err(|e| store_err("reading presence bits", e))?;
            let p: PresenceRec = dec(&rec_bytes, "presence record")?;
            let b = bits_of(&rec_bytes, stored.as_deref())?;
            let rec = self
                .inodes
                .get(key)
                .map_err(|e| store_err("reading inodes", e))?
                .and_then(|v| decode::<InodeRec>(&v).ok());
            let current = rec
                .as_ref()
                .is_some_and(|r| r.kind == FileKind::File && r.generation == p.generation);
            if !current {
                (&self.idx.presence, &self.idx.present_bits)
                    .transaction(|(presence, bits)| {
                        presence.remove(&key[..])?;
                        bits.remove(&key[..])?;
                        Ok::<_, ConflictableTransactionError<()>>(())
                    })
                    .map_err(|e| fs_err!(EIO, "writing presence: {e:?}"))?;
                continue;
            }
            let file = self.open_content(ino, p.generation)?;
            let len = file
                .metadata()
                .map_err(|e| FsError::io(format!("stat of {ino}"), &e))?
                .len();
            let mut fixed = b.clone();
            fixed.limit = fixed.limit.min(len);
            let mut cleared = 0u64;
            let mut buf = Vec::new();
            for (i, hash) in p.chunks.iter().enumerate() {
                let i = i as u64;
                let (start, end) = chunk_range(i, p.size);
                if start >= fixed.limit || !bit(&b.present, i) || bit(&b.synced, i) {
                    continue;
                }
                buf.resize((end - start) as usize, 0);
                let ok =
                    file.read_exact_at(&mut buf, start).is_ok() && ChunkHash::of(&buf) == *hash;
                if !ok {
                    fixed.present[(i / 64) as usize] &= !(1u64 << (i % 64));
                    cleared += 1;
                }
            }
            // Every bit left is verified content now: make it durable and
            // say so, so that the next start need not hash it again.
            if fixed.unsynced() > 0 {
                file.sync_data()
                    .map_err(|e| FsError::io(format!("syncing {ino}"), &e))?;
                fixed.synced = fixed.present.clone();
            }
            if fixed != b {
                let mut new_rec = p.clone();
                new_rec.limit = fixed.limit;
                new_rec.present = fixed.present.clone();
                let complete = fixed.complete();
                let (rec_v, bits_v) = (enc(&new_rec), enc(&fixed));
                (&self.idx.presence, &self.idx.present_bits)
                    .transaction(|(presence, bits)| {
                        if complete {
                            presence.remove(&key[..])?;
                            bits.remove(&key[..])?;
                        } else {
                            presence.insert(&key[..], rec_v.as_slice())?;
                            bits.insert(&key[..], bits_v.as_slice())?;
                        }
                        Ok::<_, ConflictableTransactionError<()>>(())
                    })
                    .map_err(|e| fs_err!(EIO, "writing presence: {e:?}"))?;
            }
            if cleared > 0 {
                tracing::warn!(
                    ino = ino.0,
                    cleared,
                    "chunks marked present did not verify at start (a power cut?); they will be fetched again"
                );
                found.push(CheckFinding {
                    kind: CheckKind::RecoveredAtStart,
                    ino: Some(ino),
                    detail: format!(
                        "{ino}: {cleared} chunks marked present did not verify at start; marked missing"
                    ),
                    repaired: true,
                });
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
#[path = "presence_tests.rs"]
mod tests;
