//! Applying a version from a peer to the local tree ([`Store::apply_remote`]).
//!
//! A record is first checked on its own ([`validate`]: kinds, names,
//! chunk counts, symlink targets; a hostile or malformed record is
//! refused with [`ApplyError::Invalid`] and changes nothing), then against
//! the local tree, and applied in **one** sled transaction over the
//! namespace and the index: the entries added and removed, the inode's
//! attributes, its content generation and presence record, the object's
//! record with a new local sequence number, and the gid ↔ ino maps.
//! Nothing is marked dirty: the change is the peer's, not a new local one.
//! Names are local directory entries only, keyed by inode numbers; no
//! path is ever built or followed, so no record can make syncd touch
//! anything outside its content directory.
//!
//! New content goes to a new content generation (`<ino>.<g+1>`, or
//! generation 0 of a new inode), made **before** the transaction: sparse,
//! of the version's size, with every chunk that local content already has
//! copied in (from the seed: the file's current generation unless the
//! caller names another, e.g. the loser of a conflict), each verified by
//! hashing the bytes copied, and a [`PresenceRec`] for the rest. If the
//! transaction does not commit, the new file is removed. After it commits,
//! the old generation is retired: removed at once through the reclaimer
//! (after the flush that makes the switch durable) if no handle has it
//! open, else at its last release; a crash leaves it to the start-up
//! scan. An open handle keeps reading the generation it opened
//! (close-to-open).
//!
//! A local inode that is dirty or open for writing is [`ApplyError::Busy`]:
//! its local changes are versioned first, then the engine decides again.

use super::entries::{Dropped, drop_link, touch};
use super::objects::{Applied, ApplyError, PresenceRec, Seed, enc, gid_from, set_bit, shared_kind};
use super::records::{InodeRec, ino_key};
use super::tx::{Records, Tx, TxResult};
use super::{Store, content_err, names};
use crate::sync::model::{ChunkHash, Gid, ObjRec, chunk_count, chunk_range};
use ipc_schema::{FileKind, FsError, Ino, Inval, Name, Timestamp};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Longest symlink target a peer may send.
const MAX_TARGET: usize = 4096;

/// Result inside an apply transaction.
type ATx<T> = Result<T, ConflictableTransactionError<ApplyError>>;

/// The index's trees inside an apply transaction.
struct IdxTx<'a> {
    objects: &'a TransactionalTree,
    gid_ino: &'a TransactionalTree,
    ino_gid: &'a TransactionalTree,
    obj_seq: &'a TransactionalTree,
    changes: &'a TransactionalTree,
    presence: &'a TransactionalTree,
}

fn lift<T>(r: TxResult<T>) -> ATx<T> {
    r.map_err(|e| match e {
        ConflictableTransactionError::Abort(e) => {
            ConflictableTransactionError::Abort(ApplyError::Fs(e))
        }
        ConflictableTransactionError::Conflict => ConflictableTransactionError::Conflict,
        ConflictableTransactionError::Storage(e) => ConflictableTransactionError::Storage(e),
    })
}

fn refuse<T>(e: ApplyError) -> ATx<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn invalid(why: impl Into<String>) -> ApplyError {
    ApplyError::Invalid(why.into())
}

/// Check `rec` on its own: what any peer may send.
pub fn validate(rec: &ObjRec) -> Result<(), ApplyError> {
    if !shared_kind(rec.kind) {
        return Err(invalid(format!("kind {:?} is not shared", rec.kind)));
    }
    let root = rec.gid == Gid::ROOT;
    if root && rec.kind != FileKind::Directory {
        return Err(invalid("the root is a directory"));
    }
    if root && rec.deleted {
        return Err(invalid("the root cannot be deleted"));
    }
    if root && !rec.names.is_empty() {
        return Err(invalid("the root has no name"));
    }
    if rec.deleted {
        if !rec.names.is_empty() || !rec.chunks.is_empty() {
            return Err(invalid("a tombstone has names or chunks"));
        }
        return Ok(());
    }
    if !root && rec.names.is_empty() {
        return Err(invalid("a live object has no name"));
    }
    let mut seen = BTreeSet::new();
    for n in &rec.names {
        names::validate(&Name(n.name.clone()))
            .map_err(|e| invalid(format!("name {:?}: {}", Name(n.name.clone()), e.message)))?;
        if n.parent == rec.gid {
            return Err(invalid("an object inside itself"));
        }
        if !seen.insert(n) {
            return Err(invalid(format!("name {:?} twice", Name(n.name.clone()))));
        }
    }
    match rec.kind {
        FileKind::Directory => {
            if !root && rec.names.len() != 1 {
                return Err(invalid("a directory has exactly one name"));
            }
            if !rec.chunks.is_empty() || !rec.target.is_empty() {
                return Err(invalid("a directory has chunks or a target"));
            }
        }
        FileKind::File => {
            if rec.chunks.len() as u64 != chunk_count(rec.size) {
                return Err(invalid(format!(
                    "{} chunks for {} bytes",
                    rec.chunks.len(),
                    rec.size
                )));
            }
            if !rec.target.is_empty() {
                return Err(invalid("a file has a target"));
            }
        }
        _ => {
            let len = rec.target.len();
            if len as u64 != rec.size || !(1..=MAX_TARGET).contains(&len) {
                return Err(invalid(format!(
                    "symlink target of {len} bytes (size {})",
                    rec.size
                )));
            }
            if rec.target.contains(&0) {
                return Err(invalid("symlink target contains NUL"));
            }
            if !rec.chunks.is_empty() {
                return Err(invalid("a symlink has chunks"));
            }
        }
    }
    Ok(())
}

/// New content made for a version before its transaction.
struct NewContent {
    generation: u64,
    presence: Option<PresenceRec>,
}

impl Store {
    /// Make the local tree show `rec` (a version from a peer, or the
    /// outcome of a conflict): create, move, link, unlink, change
    /// attributes, and for new content start a new content generation
    /// (sparse, of `rec.size`, chunks copied from `seed` where the hash at
    /// the same index matches, the rest marked missing). One sled
    /// transaction; nothing is marked dirty; the record gets a new local
    /// sequence number (so it is passed on). Names are validated; files
    /// belong to the share owner.
    pub fn apply_remote(&self, rec: &ObjRec, seed: Option<Seed>) -> Result<Applied, ApplyError> {
        validate(rec)?;
        self.admit(crate::space::Change::Adds)?;
        let _apply = self
            .idx
            .apply_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(old) = self.object(&rec.gid)?
            && old.kind != rec.kind
        {
            return Err(invalid(format!(
                "kind changes from {:?} to {:?}",
                old.kind, rec.kind
            )));
        }
        let existing = match self.ino_of(&rec.gid)? {
            Some(ino) => self.read_inode(ino.0)?.map(|r| (ino.0, r)),
            None => None,
        };
        if let Some((ino, r)) = &existing {
            if r.kind != rec.kind {
                return Err(invalid(format!(
                    "kind changes from {:?} to {:?}",
                    r.kind, rec.kind
                )));
            }
            let dirty = self
                .idx
                .dirty
                .contains_key(ino_key(*ino))
                .map_err(|e| super::store_err("reading dirty", e))?;
            if dirty {
                return Err(ApplyError::Busy);
            }
        }
        if rec.deleted {
            return self.apply_tombstone(rec, existing);
        }
        self.apply_live(rec, existing, seed)
    }

    /// Run `f` as one transaction over the namespace and the index.
    fn apply_tx<T>(&self, f: impl Fn(&Tx<'_>, &IdxTx<'_>) -> ATx<T>) -> Result<T, ApplyError> {
        let ix = &self.idx;
        (
            &self.inodes,
            &self.dirents,
            &self.cookies,
            &self.xattrs,
            &self.orphans,
            &ix.dirty,
            &self.links,
            &ix.objects,
            &ix.gid_ino,
            &ix.ino_gid,
            &ix.obj_seq,
            &ix.changes,
            &ix.presence,
        )
            .transaction(
                |(
                    inodes,
                    dirents,
                    cookies,
                    xattrs,
                    orphans,
                    dirty,
                    links,
                    objects,
                    gid_ino,
                    ino_gid,
                    obj_seq,
                    changes,
                    presence,
                )| {
                    f(
                        &Tx {
                            inodes,
                            dirents,
                            cookies,
                            xattrs,
                            orphans,
                            dirty,
                            links,
                            marks: &ix.marks,
                        },
                        &IdxTx {
                            objects,
                            gid_ino,
                            ino_gid,
                            obj_seq,
                            changes,
                            presence,
                        },
                    )
                },
            )
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => {
                    ApplyError::Fs(super::store_err("applying a version", e))
                }
            })
    }

    /// The local inode of each name's parent directory.
    fn parents_of(&self, rec: &ObjRec) -> Result<Vec<(u64, Vec<u8>)>, ApplyError> {
        let mut out = Vec::new();
        for n in &rec.names {
            let Some(p) = self.ino_of(&n.parent)? else {
                return Err(ApplyError::MissingParent(n.parent));
            };
            match self.read_inode(p.0)? {
                Some(r) if r.is_dir() && (r.nlink > 0) => {}
                Some(_) => {
                    return Err(invalid(format!("parent {:?} is not a directory", n.parent)));
                }
                None => return Err(ApplyError::MissingParent(n.parent)),
            }
            out.push((p.0, n.name.clone()));
        }
        Ok(out)
    }

    fn apply_live(
        &self,
        rec: &ObjRec,
        existing: Option<(u64, InodeRec)>,
        seed: Option<Seed>,
    ) -> Result<Applied, ApplyError> {
        let wanted = self.parents_of(rec)?;
        let recorded = self.object(&rec.gid)?;
        // Content: a new inode, or new bytes for an existing one.
        let (ino, new_content, fresh) = match &existing {
            Some((ino, r)) => {
                let changed = rec.kind == FileKind::File
                    && recorded
                        .as_ref()
                        .is_none_or(|o| o.deleted || !o.same_content(rec));
                let content = if changed {
                    let generation = r.generation + 1;
                    let _ = self.content.remove(*ino, generation);
                    let fd = self
                        .content
                        .create_gen(*ino, generation, nix::fcntl::OFlag::O_RDWR)
                        .map_err(|e| {
                            FsError::io(
                                format!("creating {} generation {generation}", Ino(*ino)),
                                &e,
                            )
                        })?;
                    let seed = seed.unwrap_or(Seed {
                        ino: Ino(*ino),
                        generation: r.generation,
                    });
                    Some((generation, File::from(fd), Some(seed)))
                } else {
                    None
                };
                (*ino, content, false)
            }
            None => {
                if rec.kind == FileKind::File {
                    let (ino, fd) = self.new_content(nix::fcntl::OFlag::O_RDWR)?;
                    (ino, Some((0, File::from(fd), seed)), true)
                } else {
                    (self.alloc_ino()?, None, true)
                }
            }
        };
        let made = match new_content {
            Some((generation, file, seed)) => match self.fill(ino, generation, &file, rec, seed) {
                Ok(presence) => Some(NewContent {
                    generation,
                    presence,
                }),
                Err(e) => {
                    let _ = self.content.remove(ino, generation);
                    return Err(e.into());
                }
            },
            None => None,
        };
        let result = self.commit_live(rec, ino, existing.as_ref(), &wanted, made.as_ref());
        match (&result, &made) {
            (Err(_), Some(m)) => {
                let _ = self.content.remove(ino, m.generation);
            }
            (Ok(_), None) if !fresh && rec.kind == FileKind::File => {
                // Same bytes, maybe another mtime: it lives in the content
                // file (only times change; no byte under any descriptor).
                if let Some((_, r)) = &existing
                    && let Err(e) = self.set_content_mtime(ino, r.generation, rec.mtime)
                {
                    tracing::warn!(ino, error = %e, "cannot set the mtime of an applied version");
                }
            }
            _ => {}
        }
        result
    }

    fn set_content_mtime(
        &self,
        ino: u64,
        generation: u64,
        mtime: Timestamp,
    ) -> Result<(), FsError> {
        let cs = self
            .content
            .stat(ino, generation)
            .map_err(|e| content_err(format!("stat of {}", Ino(ino)), &e))?;
        if cs.mtime != mtime {
            self.content
                .update(
                    ino,
                    generation,
                    None,
                    None,
                    Some(ipc_schema::TimeSet::At(mtime)),
                )
                .map_err(|e| content_err(format!("setting times of {}", Ino(ino)), &e))?;
        }
        Ok(())
    }

    /// Fill the new generation `generation` of `ino` (open as `file`) for
    /// `rec`: its size, every chunk `seed` has with the same hash, its
    /// mtime. Answers the presence record (`None`: complete).
    fn fill(
        &self,
        ino: u64,
        generation: u64,
        file: &File,
        rec: &ObjRec,
        seed: Option<Seed>,
    ) -> Result<Option<PresenceRec>, FsError> {
        let ctx = |what: &str| format!("{what} {} generation {generation}", Ino(ino));
        file.set_len(rec.size)
            .map_err(|e| FsError::io(ctx("sizing"), &e))?;
        let mut present = Vec::new();
        let mut copied = false;
        let n = rec.chunks.len() as u64;
        if let Some(seed) = seed
            && let Ok(src) = self.open_content(seed.ino, seed.generation)
        {
            // Which chunks are worth hashing: those the seed's recorded
            // version says are the same, and its last one (it may have
            // grown); all of them if nothing is recorded.
            let known = self
                .gid_of(seed.ino)
                .and_then(|g| self.object(&g))
                .ok()
                .flatten()
                .filter(|o| !o.deleted && o.kind == FileKind::File)
                .map(|o| o.chunks);
            let mut buf = Vec::new();
            for (i, want) in rec.chunks.iter().enumerate() {
                let candidate = match &known {
                    None => true,
                    Some(k) => k.get(i) == Some(want) || i + 1 == k.len(),
                };
                if !candidate {
                    continue;
                }
                let (start, end) = chunk_range(i as u64, rec.size);
                buf.resize((end - start) as usize, 0);
                if src.read_exact_at(&mut buf, start).is_err() || ChunkHash::of(&buf) != *want {
                    continue;
                }
                if buf.iter().any(|b| *b != 0) {
                    file.write_all_at(&buf, start)
                        .map_err(|e| FsError::io(ctx("filling"), &e))?;
                    copied = true;
                }
                set_bit(&mut present, i as u64);
            }
        }
        if copied {
            // The copied bytes count as present without a check at start,
            // and the old generation goes once this one is current: they
            // must be on disk first.
            file.sync_data()
                .map_err(|e| FsError::io(ctx("syncing"), &e))?;
        }
        let mut times = std::fs::FileTimes::new();
        times = times.set_modified(system_time(rec.mtime));
        file.set_times(times)
            .map_err(|e| FsError::io(ctx("setting the mtime of"), &e))?;
        let p = PresenceRec {
            gid: rec.gid,
            generation,
            size: rec.size,
            chunks: rec.chunks.clone(),
            present,
            limit: rec.size,
        };
        debug_assert_eq!(p.chunks.len() as u64, n);
        Ok((!p.complete()).then_some(p))
    }

    /// The transaction of a live version (see [`Store::apply_remote`]).
    fn commit_live(
        &self,
        rec: &ObjRec,
        ino: u64,
        existing: Option<&(u64, InodeRec)>,
        wanted: &[(u64, Vec<u8>)],
        made: Option<&NewContent>,
    ) -> Result<Applied, ApplyError> {
        let current: Vec<(u64, Vec<u8>)> = match existing {
            Some(_) => self.links_of(ino)?,
            None => Vec::new(),
        };
        let wanted_set: BTreeSet<&(u64, Vec<u8>)> = wanted.iter().collect();
        let current_set: BTreeSet<&(u64, Vec<u8>)> = current.iter().collect();
        let now = Timestamp::now();
        let device = self.device();
        let mut opens = self.lock_opens();
        if existing.is_some() && opens.has_writer(Ino(ino)) {
            return Err(ApplyError::Busy);
        }
        let seq_guard = self.idx.lock_seq();
        let seq = self.idx.next_seq();
        let invals = self.apply_tx(|t, ix| {
            let mut invals = Vec::new();
            match existing {
                Some((_, before)) => {
                    if t.dirty.get(ino_key(ino))?.is_some() {
                        return refuse(ApplyError::Busy);
                    }
                    match lift(t.inode(ino))? {
                        Some(r) if r.generation == before.generation && r.kind == rec.kind => {}
                        _ => return refuse(ApplyError::Busy),
                    }
                }
                None => {
                    if ix.gid_ino.get(rec.gid.0)?.is_some() {
                        return refuse(ApplyError::Busy);
                    }
                    let (uid, gid) = self.share_owner;
                    let mut r = InodeRec::new(rec.kind, rec.perm, uid, gid, now);
                    if rec.kind != FileKind::Directory {
                        r.nlink = 0;
                    }
                    lift(t.put(ino, &r))?;
                }
            }
            let mut recs = Records::new(t);
            for (p, name) in &current {
                if wanted_set.contains(&(*p, name.clone())) {
                    continue;
                }
                let Some(d) = lift(t.entry(*p, name))? else {
                    continue;
                };
                if d.ino != ino {
                    continue;
                }
                let dir = lift(recs.get(*p))?;
                lift(t.remove_entry(*p, dir, name, &d))?;
                touch(dir, now);
                if rec.kind == FileKind::Directory {
                    dir.nlink = dir.nlink.saturating_sub(1);
                } else {
                    let r = lift(recs.get(ino))?;
                    r.nlink = r.nlink.saturating_sub(1);
                }
                invals.push(Inval::Entry {
                    parent: Ino(*p),
                    name: Name(name.clone()),
                });
            }
            for (i, (p, name)) in wanted.iter().enumerate() {
                if current_set.contains(&(*p, name.clone())) {
                    continue;
                }
                let at = || rec.names[i].clone();
                if let Some(d) = lift(t.entry(*p, name))? {
                    let existing = match ix.ino_gid.get(ino_key(d.ino))? {
                        Some(g) => match gid_from(&g) {
                            Ok(g) => g,
                            Err(e) => return refuse(ApplyError::Fs(e)),
                        },
                        None if d.ino == Ino::ROOT.0 => Gid::ROOT,
                        None => Gid::new(device, d.ino),
                    };
                    return refuse(ApplyError::Collision { at: at(), existing });
                }
                match lift(t.inode(*p))? {
                    Some(r) if r.is_dir() => {}
                    _ => return refuse(ApplyError::MissingParent(at().parent)),
                }
                if rec.kind == FileKind::Directory && lift(t.is_ancestor(ino, *p))? {
                    return refuse(invalid("a directory moved into itself"));
                }
                let dir = lift(recs.get(*p))?;
                lift(t.add_entry(*p, dir, name, ino, rec.kind))?;
                touch(dir, now);
                if rec.kind == FileKind::Directory {
                    dir.nlink += 1;
                    lift(recs.get(ino))?.parent = *p;
                } else {
                    let r = lift(recs.get(ino))?;
                    if r.nlink == 0 {
                        t.orphans.remove(&ino_key(ino))?;
                    }
                    r.nlink += 1;
                }
                invals.push(Inval::Entry {
                    parent: Ino(*p),
                    name: Name(name.clone()),
                });
            }
            let r = lift(recs.get(ino))?;
            r.perm = rec.perm & 0o7777;
            if rec.kind != FileKind::File {
                r.mtime = rec.mtime;
            }
            r.target = rec.target.clone();
            if let Some(m) = made {
                r.generation = m.generation;
                match &m.presence {
                    Some(p) => {
                        ix.presence.insert(&ino_key(ino), enc(p))?;
                    }
                    None => {
                        ix.presence.remove(&ino_key(ino))?;
                    }
                }
            }
            r.ctime = now;
            if rec.gid == Gid::ROOT {
                r.parent = Ino::ROOT.0;
            }
            lift(recs.commit())?;
            record(ix, rec, seq)?;
            ix.gid_ino.insert(&rec.gid.0, &ino_key(ino))?;
            ix.ino_gid.insert(&ino_key(ino), &rec.gid.0)?;
            // Also for a new object: mountd then counts the inode as
            // changed by a peer, and answers its attributes with TTL 0
            // for a while. A lookup answered before the next version of
            // it can reach the kernel after that version's invalidation,
            // which the kernel drops while it does not know the inode
            // yet; without TTL 0 the lookup's old size would stay cached
            // for the whole attribute TTL.
            invals.push(Inval::Inode { ino: Ino(ino) });
            Ok(invals)
        })?;
        self.idx.published(seq);
        drop(seq_guard);
        let retired_now = match (existing, made) {
            (Some((_, before)), Some(_)) => opens.retire(Ino(ino), before.generation),
            _ => false,
        };
        drop(opens);
        if retired_now && let Some((_, before)) = existing {
            self.purge_generation(ino, before.generation);
        }
        Ok(Applied {
            ino: Some(Ino(ino)),
            seq,
            invals,
            partial: made.is_some_and(|m| m.presence.is_some())
                || (existing.is_some() && made.is_none() && self.presence(Ino(ino))?.is_some()),
        })
    }

    fn apply_tombstone(
        &self,
        rec: &ObjRec,
        existing: Option<(u64, InodeRec)>,
    ) -> Result<Applied, ApplyError> {
        let names = match &existing {
            Some((ino, _)) => self.links_of(*ino)?,
            None => Vec::new(),
        };
        let now = Timestamp::now();
        let opens = self.lock_opens();
        let seq_guard = self.idx.lock_seq();
        let seq = self.idx.next_seq();
        let (invals, freed) = self.apply_tx(|t, ix| {
            let mut invals = Vec::new();
            let mut freed = None;
            if let Some((ino, before)) = &existing {
                let ino = *ino;
                if t.dirty.get(ino_key(ino))?.is_some() {
                    return refuse(ApplyError::Busy);
                }
                let Some(r) = lift(t.inode(ino))? else {
                    return refuse(ApplyError::Busy);
                };
                if r.generation != before.generation {
                    return refuse(ApplyError::Busy);
                }
                if r.is_dir() && r.entries > 0 {
                    return refuse(ApplyError::NotEmpty);
                }
                let mut recs = Records::new(t);
                for (p, name) in &names {
                    let Some(d) = lift(t.entry(*p, name))? else {
                        continue;
                    };
                    if d.ino != ino {
                        continue;
                    }
                    let dir = lift(recs.get(*p))?;
                    lift(t.remove_entry(*p, dir, name, &d))?;
                    touch(dir, now);
                    if r.is_dir() {
                        dir.nlink = dir.nlink.saturating_sub(1);
                    } else {
                        if let Dropped::Freed(i, k, g) =
                            lift(drop_link(t, &mut recs, &opens, None, ino, now))?
                        {
                            freed = Some((i, k, g));
                        }
                    }
                    invals.push(Inval::Entry {
                        parent: Ino(*p),
                        name: Name(name.clone()),
                    });
                }
                if r.is_dir() {
                    recs.delete(ino);
                    freed = Some((ino, FileKind::Directory, 0));
                }
                lift(recs.commit())?;
                ix.ino_gid.remove(&ino_key(ino))?;
                ix.presence.remove(&ino_key(ino))?;
                invals.push(Inval::Inode { ino: Ino(ino) });
            }
            ix.gid_ino.remove(&rec.gid.0)?;
            record(ix, rec, seq)?;
            Ok((invals, freed))
        })?;
        self.idx.published(seq);
        drop(seq_guard);
        drop(opens);
        if let Some((ino, kind, generation)) = freed {
            self.purge(ino, kind, generation);
        }
        Ok(Applied {
            ino: None,
            seq,
            invals,
            partial: false,
        })
    }
}

/// Store `rec` with local sequence number `seq` in the index (inside the
/// transaction).
fn record(ix: &IdxTx<'_>, rec: &ObjRec, seq: u64) -> ATx<()> {
    let g = &rec.gid.0[..];
    ix.objects.insert(g, enc(rec))?;
    if let Some(old) = ix.obj_seq.insert(g, &seq.to_be_bytes())? {
        ix.changes.remove(old)?;
    }
    ix.changes.insert(&seq.to_be_bytes(), g)?;
    Ok(())
}

fn system_time(t: Timestamp) -> std::time::SystemTime {
    use std::time::{Duration, UNIX_EPOCH};
    let nanos = Duration::from_nanos(u64::from(t.nanos));
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos
    }
}
