//! Which chunks of a file are local: the `presence` tree.
//!
//! A version applied from a peer starts a new content generation, sparse,
//! with the chunks that could be copied from local content already in it
//! ([`super::apply`]); the rest are fetched on demand (`sync/fetch.rs`).
//! While some are missing the file has a [`PresenceRec`]: the expected
//! hash of every chunk and a bitmap of the ones present and verified. The
//! record goes when the file is complete.
//!
//! Order. A fetched chunk's bytes are written into the generation file,
//! and only then is its bit set ([`Store::mark_present`]). sled keeps a
//! prefix of its log, but the content file's bytes are in the page cache
//! until the kernel writes them: after a power cut a bit may be set for
//! bytes that never reached the disk. So at every start the present chunks
//! of every partial file are hashed again and the bits of those that do
//! not verify are cleared ([`Store::verify_presence`]); they are fetched
//! again when read.
//!
//! Truncation. A truncate (setattr size, `O_TRUNC`) of a partial file
//! needs no fetch: chunks that start at or beyond the record's `limit`
//! (the smallest size since the version arrived) count as present, so the
//! truncate only lowers `limit`; a file whose every chunk counts as
//! present is complete. A later write beyond `limit` is local data, never
//! overwritten by a fetch (a fetch writes only the part of a chunk below
//! `limit`).

use super::objects::{PresenceRec, dec, enc, set_bit};
use super::records::{InodeRec, be_u64, decode, ino_key};
use super::{Store, content_err, store_err};
use crate::sync::model::{CHUNK_SIZE, ChunkHash, Gid, chunk_range};
use ipc_schema::{FileKind, FsError, HandleId, Ino, Partial, fs_err};
use std::os::unix::fs::FileExt;

impl Store {
    /// The presence record of `ino`, if its bytes are not all local.
    pub fn presence(&self, ino: Ino) -> Result<Option<PresenceRec>, FsError> {
        match self
            .idx
            .presence
            .get(ino_key(ino.0))
            .map_err(|e| store_err("reading presence", e))?
        {
            Some(v) => dec(&v, "presence record").map(Some),
            None => Ok(None),
        }
    }

    /// What an open of `ino` generation `generation` tells mountd about
    /// missing bytes (`None`: all local).
    pub(crate) fn partial_of(&self, ino: Ino, generation: u64) -> Result<Option<Partial>, FsError> {
        Ok(self
            .presence(ino)?
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

    /// Open `ino`'s content generation `generation` for writing fetched chunks.
    pub fn open_for_fill(&self, ino: Ino, generation: u64) -> Result<std::fs::File, FsError> {
        self.content
            .open(ino.0, generation, nix::fcntl::OFlag::O_WRONLY)
            .map(std::fs::File::from)
            .map_err(|e| content_err(format!("opening {ino} generation {generation}"), &e))
    }

    /// Change the presence record of `ino` with `change` (which answers
    /// false to leave it as it is), atomically; a record that is complete
    /// afterwards is removed. Answers the record after the change.
    fn update_presence(
        &self,
        ino: Ino,
        change: impl Fn(&mut PresenceRec) -> bool,
    ) -> Result<Option<PresenceRec>, FsError> {
        let key = ino_key(ino.0);
        loop {
            let Some(old) = self
                .idx
                .presence
                .get(key)
                .map_err(|e| store_err("reading presence", e))?
            else {
                return Ok(None);
            };
            let mut p: PresenceRec = dec(&old, "presence record")?;
            if !change(&mut p) {
                return Ok(Some(p));
            }
            let new = if p.complete() { None } else { Some(enc(&p)) };
            let swapped = self
                .idx
                .presence
                .compare_and_swap(key, Some(&old), new)
                .map_err(|e| store_err("writing presence", e))?;
            if swapped.is_ok() {
                return Ok((!p.complete()).then_some(p));
            }
        }
    }

    /// Mark chunk `index` of `ino` generation `generation` present (its bytes are
    /// written and verified). Answers the presence bitmap after it
    /// (empty: the file is complete and the record is gone).
    pub fn mark_present(&self, ino: Ino, generation: u64, index: u64) -> Result<Vec<u64>, FsError> {
        let stale = std::cell::Cell::new(false);
        let set = std::cell::Cell::new(false);
        let after = self.update_presence(ino, |p| {
            if p.generation != generation || index >= p.chunks.len() as u64 {
                stale.set(true);
                return false;
            }
            set_bit(&mut p.present, index);
            set.set(true);
            true
        })?;
        if stale.get() {
            return Err(fs_err!(
                ESTALE,
                "chunk {index} of {ino} generation {generation}: the file has another version now"
            ));
        }
        if set.get() {
            self.restore_mtime(ino, generation)?;
        }
        Ok(after.map(|p| p.present).unwrap_or_default())
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
        // was changed here and versioned).
        let mtime = match self.object(&self.gid_of(ino)?)? {
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
            // Only below the limit: beyond it are local bytes.
            let upto = (end.min(p.limit) - start) as usize;
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
    /// from `size` on count as present from now on.
    pub(crate) fn lower_limit(&self, ino: Ino, generation: u64, size: u64) -> Result<(), FsError> {
        self.update_presence(ino, |p| {
            if p.generation != generation || p.limit <= size {
                return false;
            }
            p.limit = size;
            true
        })
        .map(drop)
    }

    /// The bytes of chunk `index` of `gid`'s current version, if they are
    /// present here and hash to `hash` (checked before answering).
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
        if let Some(p) = self.presence(ino)?
            && p.generation == rec.generation
            && !p.has(index)
        {
            return Ok(None);
        }
        // The range of the chunk in the recorded version (the one peers
        // know); the local file may be longer or shorter if it changed.
        let size = match self.object(gid)? {
            Some(o) if !o.deleted => o.size,
            _ => return Ok(None),
        };
        let (start, end) = chunk_range(index, size);
        if start >= end {
            return Ok(None);
        }
        let file = self.open_content(ino, rec.generation)?;
        let mut buf = vec![0u8; (end - start) as usize];
        match file.read_exact_at(&mut buf, start) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(FsError::io(format!("reading a chunk of {ino}"), &e)),
        }
        Ok((ChunkHash::of(&buf) == *hash).then_some(buf))
    }

    /// Every partial file: (ino, presence), up to `limit`.
    pub fn partial_files(&self, limit: usize) -> Result<Vec<(Ino, PresenceRec)>, FsError> {
        let mut out = Vec::new();
        for item in self.idx.presence.iter() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| store_err("reading presence", e))?;
            if let Some(ino) = be_u64(&k) {
                out.push((Ino(ino), dec(&v, "presence record")?));
            }
        }
        Ok(out)
    }

    /// At start: hash the present chunks of every partial file again and
    /// clear the bits of those that do not verify (a power cut can keep a
    /// bit whose bytes were lost); drop records of generations that are
    /// not current, and lower `limit` to the file's size (a crash between
    /// a truncate and its record). Returns what it repaired.
    pub(crate) fn verify_presence(&self) -> Result<Vec<super::check::Finding>, FsError> {
        use ipc_schema::{CheckFinding, CheckKind};
        let mut found = Vec::new();
        for (ino, p) in self.partial_files(usize::MAX)? {
            let key = ino_key(ino.0);
            let rec = self
                .inodes
                .get(key)
                .map_err(|e| store_err("reading inodes", e))?
                .and_then(|v| decode::<InodeRec>(&v).ok());
            let current = rec
                .as_ref()
                .is_some_and(|r| r.kind == FileKind::File && r.generation == p.generation);
            if !current {
                self.idx
                    .presence
                    .remove(key)
                    .map_err(|e| store_err("writing presence", e))?;
                continue;
            }
            let file = self.open_content(ino, p.generation)?;
            let len = file
                .metadata()
                .map_err(|e| FsError::io(format!("stat of {ino}"), &e))?
                .len();
            let mut fixed = p.clone();
            fixed.limit = fixed.limit.min(len);
            let mut cleared = 0u64;
            let mut buf = Vec::new();
            for (i, hash) in p.chunks.iter().enumerate() {
                let i = i as u64;
                let (start, end) = chunk_range(i, p.size);
                if start >= fixed.limit || !super::objects::bit(&p.present, i) {
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
            if fixed == p {
                continue;
            }
            let new = if fixed.complete() {
                None
            } else {
                Some(enc(&fixed))
            };
            let _ = self
                .idx
                .presence
                .compare_and_swap(key, Some(enc(&p)), new)
                .map_err(|e| store_err("writing presence", e))?;
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
