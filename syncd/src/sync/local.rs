//! The local versioner: turns local changes into versions.
//!
//! Store operations that change shared state mark the inodes they touch
//! dirty (before the change), and wake this task. It takes the dirty
//! inodes, [`TAKE`] at a time (`Store::take_dirty`: round-robin over the
//! dirty inodes, oldest mark first within a take), and for each one, on
//! the blocking pool under the engine's index lock:
//!
//! - reads what the store knows of it (`Store::local_object`);
//! - a kind that is not shared (fifo, socket, device): the mark is cleared;
//! - a live inode: the record it would have now ([`state_record`]): names,
//!   permission bits, mtime, size, symlink target, and for files the
//!   BLAKE3 hash of each chunk. The recorded hashes are reused when size
//!   and mtime are the recorded ones; otherwise every chunk of the content
//!   generation is hashed, except chunks of a partial file that are not
//!   here, which keep the hash they are expected to have (their bytes
//!   are the version's, still at the peer);
//! - a gone inode with a live recorded version: a tombstone;
//! - the same state as recorded: the mark is cleared, no version;
//! - else a new version: the recorded vector bumped with this device
//!   (`{device: 1}` for a new object), committed with the mark
//!   (`Store::commit_local` clears the mark only if no change came since).
//!
//! A partial file with a missing chunk that straddles its truncation limit
//! (part of it is a version's bytes that are not here, part local zeros or
//! writes) cannot be hashed: the chunk is fetched first through the data
//! path, outside the lock, and the inode stays dirty and is retried with a
//! growing backoff if that fails.
//!
//! Hashing a large file takes long (a second or more per GiB here), and
//! applies from peers wait for the index lock meanwhile. So a file of at
//! least [`HASH_UNLOCKED_MIN`] bytes is hashed first, outside the lock
//! ([`prehash`]); under the lock the hashes are used only if the file's
//! content generation, size, mtime and presence are still those hashed,
//! else it is hashed again there, as smaller files are.
//!
//! After each commit the new local sequence number is published (waking
//! the index streams that serve peers, so the change is announced at
//! once), and after each round the sessions are told (so records refused
//! as `Busy` are retried).
//!
//! Coalescing. A store transaction across the index's trees is the
//! dearest step of a version (sled writes its log for each), and a burst
//! of small changes (a `tar x`, a build, a loop of `create`s) used to
//! make about two versions per new file (the empty file right after its
//! `create`, then its content at `close`) and one of the directory per
//! file. So:
//! - in a burst (a round that versions something starts less than
//!   [`BURST_GAP`] after the previous one) the versioner pauses for
//!   [`COALESCE`] after each round, and what changes during the pause is
//!   versioned together in the next round (a file created, written and
//!   closed within it makes one version, its directory one). Outside a
//!   burst nothing waits: the `create` of a lone file is versioned at
//!   once and its `close` in the round right after, so a single change
//!   reaches the peers as fast as before;
//! - the small versions of a round are decided under one hold of the
//!   index lock and committed in one transaction, [`BATCH_MAX`] at a
//!   time; large files (hashed outside the lock) are committed each on
//!   its own after them.
//!
//! The `keibi_syncd_local_versions_total` metric shows the effect: 2,000
//! new files (`bench/workloads.py create`) made 3,588 versions without
//! it, about 2,120 with it; extracting a 582-file tarball 1,865, about
//! 820. The cost: a change that follows another within [`BURST_GAP`]
//! reaches the peers up to [`COALESCE`] later.

use super::engine::SyncEngine;
use super::model::{CHUNK_SIZE, ObjRec, VersionVector, chunk_count, chunk_range};
use crate::store::objects::{DirtyMark, LocalObject, LocalState};
use ipc_schema::{FileKind, FsError, Ino, Timestamp};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Dirty inodes taken per round.
pub const TAKE: usize = 256;

/// The first wait before retrying an inode that could not be versioned.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a chunk fetch for versioning may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Space the versioner leaves free on the state directory's filesystem:
/// below it, local changes wait (they stay marked dirty) instead of being
/// written as versions. A version of a large file is a large record, and
/// once sled fails to write its log for lack of space it cannot flush
/// again, not even the unlink that would free the space; so on a full
/// disk only the filesystem's own operations write to the store.
const FREE_RESERVE: u64 = 16 << 20;
/// Small versions committed per store transaction (see
/// [`version_dirty`]). Each is decided under the index lock, which is
/// held until their commit: small files are hashed under it, so this
/// bounds how long an apply from a peer may wait for the lock (at most
/// this many files below [`HASH_UNLOCKED_MIN`] hashed).
pub const BATCH_MAX: usize = 64;
/// The pause after a round of a burst, before the next one (see the
/// module doc, "Coalescing").
pub const COALESCE: Duration = Duration::from_millis(5);
/// A round that versions something and starts less than this after the
/// previous such round is part of a burst.
pub const BURST_GAP: Duration = Duration::from_millis(10);
/// When nothing wakes the versioner, it looks anyway this often (a mark
/// whose wake-up was lost is versioned at the latest then).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Files at least this large are hashed before the index lock is taken
/// ([`prehash`]); smaller ones, quick to hash, under it.
const HASH_UNLOCKED_MIN: u64 = 4 * CHUNK_SIZE;

/// What became of one dirty inode.
#[derive(Debug)]
enum Step {
    /// Versioned, or nothing to version.
    Done,
    /// A chunk must be fetched first: (inode, generation, chunk range).
    NeedsFetch(Ino, u64, u64, u64),
    /// Failed; retry later.
    Failed(String),
}

/// Run the versioner until the runtime stops.
pub async fn run(engine: Arc<SyncEngine>) {
    let wake = engine.store.dirty_notify();
    // Inodes that failed, with when to try again and the next backoff.
    let mut later: HashMap<Ino, (Instant, Duration)> = HashMap::new();
    // When the last round that versioned something started.
    let mut last_worked: Option<Instant> = None;
    loop {
        let notified = wake.notified();
        let started = Instant::now();
        let worked = round(&engine, &mut later).await;
        engine.versioned.notify_waiters();
        if worked {
            // In a burst, let the changes gather: what changes during the
            // pause is versioned in the next round, together.
            let burst = last_worked.is_some_and(|t| started.duration_since(t) < BURST_GAP);
            last_worked = Some(started);
            if burst {
                tokio::time::sleep(COALESCE).await;
            }
            continue;
        }
        let wait = later
            .values()
            .map(|(at, _)| at.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(IDLE_POLL)
            .min(IDLE_POLL);
        let _ = tokio::time::timeout(wait, notified).await;
    }
}

/// One round: version what is dirty and due. Answers whether it
/// versioned anything (then another round follows at once).
async fn round(engine: &Arc<SyncEngine>, later: &mut HashMap<Ino, (Instant, Duration)>) -> bool {
    let now = Instant::now();
    let due: Vec<Ino> = later
        .iter()
        .filter(|(_, (at, _))| *at <= now)
        .map(|(ino, _)| *ino)
        .collect();
    let skip: Vec<Ino> = later
        .keys()
        .filter(|ino| !due.contains(ino))
        .copied()
        .collect();
    let e = engine.clone();
    let result = tokio::task::spawn_blocking(move || version_dirty(&e, &skip)).await;
    let (steps, any_done) = match result {
        Ok(Ok(r)) => r,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "versioning local changes failed");
            return false;
        }
        Err(err) => {
            tracing::warn!(error = %err, "versioning local changes failed");
            return false;
        }
    };
    engine.publish_seq();
    for (ino, step) in steps {
        match step {
            Step::Done => {
                later.remove(&ino);
            }
            Step::NeedsFetch(ino, generation, start, end) => {
                let fetched = engine
                    .data()
                    .ensure(ino, generation, start, end - start, FETCH_TIMEOUT)
                    .await;
                match fetched {
                    Ok(()) => {
                        later.remove(&ino);
                    }
                    Err(e) => {
                        tracing::info!(ino = ino.0, error = %e, "cannot fetch a chunk needed to version a local change; will retry");
                        backoff(later, ino);
                    }
                }
            }
            Step::Failed(e) => {
                tracing::warn!(ino = ino.0, error = %e, "cannot version a local change; will retry");
                backoff(later, ino);
            }
        }
    }
    any_done
}

fn backoff(later: &mut HashMap<Ino, (Instant, Duration)>, ino: Ino) {
    let next = later
        .get(&ino)
        .map(|(_, b)| (*b * 2).min(BACKOFF_MAX))
        .unwrap_or(BACKOFF_MIN);
    later.insert(ino, (Instant::now() + next, next));
}

/// Take dirty inodes (skipping those in `skip`) and version each. Answers
/// the step of each and whether any was taken and settled.
///
/// Small changes are decided under one hold of the index lock and
/// committed together, [`BATCH_MAX`] at a time (one store transaction, see
/// the module doc, "Coalescing"); large files follow, each hashed first
/// without the lock ([`prehash`]) and committed on its own. Each commit is
/// published at once, so a large file hashed later in the round does not
/// hold back the announcement of the others.
fn version_dirty(engine: &SyncEngine, skip: &[Ino]) -> Result<(Vec<(Ino, Step)>, bool), FsError> {
    if let Some(free) = nearly_full(engine.store.state_dir()) {
        tracing::debug!(
            free,
            "the state directory's filesystem is nearly full; versioning waits"
        );
        return Ok((Vec::new(), false));
    }
    let marks = engine.store.take_dirty(TAKE + skip.len())?;
    let mut steps = Vec::new();
    let mut large = Vec::new();
    let mut batch = Batch::default();
    for mark in marks.into_iter().filter(|m| !skip.contains(&m.ino)) {
        if is_large(engine, mark.ino) {
            large.push(mark);
            continue;
        }
        if batch.index.is_none() {
            batch.index = Some(engine.lock_index());
        }
        match version_one(engine, mark, None) {
            Ok(Decided::Commit(rec)) => batch.pending.push((mark, rec)),
            Ok(Decided::Step(step)) => steps.push((mark.ino, step)),
            Err(e) => steps.push((mark.ino, Step::Failed(e.to_string()))),
        }
        if batch.pending.len() >= BATCH_MAX {
            batch.commit(engine, &mut steps);
        }
    }
    batch.commit(engine, &mut steps);
    for mark in large {
        let pre = prehash(engine, mark.ino);
        let step = {
            let _index = engine.lock_index();
            match version_one(engine, mark, pre.as_ref()) {
                Ok(Decided::Commit(rec)) => match engine.store.commit_local(mark, &rec) {
                    Ok(seq) => {
                        tracing::debug!(ino = mark.ino.0, gid = ?rec.gid, seq, deleted = rec.deleted, "local version");
                        Step::Done
                    }
                    Err(e) => Step::Failed(e.to_string()),
                },
                Ok(Decided::Step(step)) => step,
                Err(e) => Step::Failed(e.to_string()),
            }
        };
        engine.publish_seq();
        steps.push((mark.ino, step));
    }
    let any_done = steps.iter().any(|(_, step)| matches!(step, Step::Done));
    Ok((steps, any_done))
}

/// The versions of small changes decided under one hold of the index
/// lock, not yet committed.
#[derive(Default)]
struct Batch<'a> {
    index: Option<std::sync::MutexGuard<'a, ()>>,
    pending: Vec<(crate::store::objects::DirtyMark, ObjRec)>,
}

impl Batch<'_> {
    /// Commit what is pending in one transaction, publish it and let the
    /// index lock go.
    fn commit(&mut self, engine: &SyncEngine, steps: &mut Vec<(Ino, Step)>) {
        let pending = std::mem::take(&mut self.pending);
        if !pending.is_empty() {
            let result = engine.store.commit_local_batch(&pending);
            for (mark, rec) in &pending {
                let step = match &result {
                    Ok(seq) => {
                        tracing::debug!(ino = mark.ino.0, gid = ?rec.gid, last_seq = seq, deleted = rec.deleted, "local version");
                        Step::Done
                    }
                    Err(e) => Step::Failed(e.to_string()),
                };
                steps.push((mark.ino, step));
            }
        }
        self.index = None;
        engine.publish_seq();
    }
}

/// The chunk hashes of a file's content, computed before the index lock
/// was taken, with the state they were computed from.
#[derive(Debug)]
struct Prehashed {
    generation: u64,
    size: u64,
    mtime: Timestamp,
    presence: Option<crate::store::objects::PresenceRec>,
    chunks: Vec<super::model::ChunkHash>,
}

impl Prehashed {
    /// Whether these hashes are those of `now` (same content generation,
    /// size, mtime and presence): a write or a fetch since changes one
    /// of them, and the file is hashed again under the lock.
    fn fits(&self, now: &LocalState) -> bool {
        self.generation == now.generation
            && self.size == now.size
            && self.mtime == now.mtime
            && self.presence == now.presence
    }
}

/// Hash the content of `ino` without the index lock when it is a file of
/// at least [`HASH_UNLOCKED_MIN`] bytes whose recorded hashes cannot be
/// reused. The lock serialises decisions and writes of the index, not
/// reads of content files (a local writer does not take it either), so
/// hashing needs no lock; [`version_one`] uses the hashes only if the
/// file's state is still the one hashed ([`Prehashed::fits`]). `None`:
/// nothing to hash here (small, unchanged, not a file, or it cannot be
/// read now; then [`version_one`] does as it always did).
fn prehash(engine: &SyncEngine, ino: Ino) -> Option<Prehashed> {
    let obj = engine.store.local_object(ino).ok()?;
    let now = obj.now.as_ref()?;
    if now.kind != FileKind::File || now.size < HASH_UNLOCKED_MIN || reusable(&obj, now) {
        return None;
    }
    let chunks = file_chunks(engine, &obj, now, None).ok()?.ok()?;
    Some(Prehashed {
        generation: now.generation,
        size: now.size,
        mtime: now.mtime,
        presence: now.presence.clone(),
        chunks,
    })
}

/// Whether `ino` is a file whose hashing [`prehash`] does without the
/// index lock: at least [`HASH_UNLOCKED_MIN`] bytes, recorded hashes not
/// reusable. `false` when it cannot be read now ([`version_one`] then
/// does as it always did).
fn is_large(engine: &SyncEngine, ino: Ino) -> bool {
    let Ok(obj) = engine.store.local_object(ino) else {
        return false;
    };
    obj.now.as_ref().is_some_and(|now| {
        now.kind == FileKind::File && now.size >= HASH_UNLOCKED_MIN && !reusable(&obj, now)
    })
}

/// What [`version_one`] decided.
#[derive(Debug)]
enum Decided {
    /// A new version, to be committed (with the dirty mark) while the
    /// index lock is still held.
    Commit(ObjRec),
    /// Nothing to commit.
    Step(Step),
}

/// Decide the version of one dirty inode (under the index lock), with
/// the hashes of [`prehash`] if it made them. A mark with nothing to
/// version is cleared here.
fn version_one(
    engine: &SyncEngine,
    mark: DirtyMark,
    pre: Option<&Prehashed>,
) -> Result<Decided, FsError> {
    let store = &engine.store;
    let obj = store.local_object(mark.ino)?;
    let rec = match &obj.now {
        None => match &obj.recorded {
            Some(r) if !r.deleted => Some(tombstone(r)),
            _ => None,
        },
        Some(now) if !is_shared(now.kind) => None,
        Some(now) => match state_record(engine, &obj, now, pre)? {
            Ok(rec) => Some(rec),
            Err(fetch) => return Ok(Decided::Step(fetch)),
        },
    };
    let Some(mut rec) = rec else {
        store.clear_dirty(mark)?;
        return Ok(Decided::Step(Step::Done));
    };
    if let Some(recorded) = &obj.recorded
        && recorded.same_state(&rec)
    {
        store.clear_dirty(mark)?;
        return Ok(Decided::Step(Step::Done));
    }
    rec.vv = match &obj.recorded {
        Some(r) => r.vv.bumped(engine.device),
        None => VersionVector::default().bumped(engine.device),
    };
    rec.modified_by = engine.device;
    Ok(Decided::Commit(rec))
}

/// Whether objects of `kind` are shared.
pub fn is_shared(kind: FileKind) -> bool {
    matches!(
        kind,
        FileKind::File | FileKind::Directory | FileKind::Symlink
    )
}

/// The tombstone of a deleted object (vector and author set by the
/// caller).
fn tombstone(recorded: &ObjRec) -> ObjRec {
    ObjRec {
        gid: recorded.gid,
        vv: recorded.vv.clone(),
        modified_by: recorded.modified_by,
        deleted: true,
        kind: recorded.kind,
        names: Vec::new(),
        perm: recorded.perm,
        mtime: Timestamp::now(),
        size: 0,
        chunks: Vec::new(),
        target: Vec::new(),
    }
}

/// The record of a live inode's state now (vector and author set by the
/// caller), or the fetch it needs first.
fn state_record(
    engine: &SyncEngine,
    obj: &LocalObject,
    now: &LocalState,
    pre: Option<&Prehashed>,
) -> Result<Result<ObjRec, Step>, FsError> {
    let chunks = if now.kind == FileKind::File {
        match file_chunks(engine, obj, now, pre)? {
            Ok(c) => c,
            Err(step) => return Ok(Err(step)),
        }
    } else {
        Vec::new()
    };
    let mut names = now.names.clone();
    names.sort();
    Ok(Ok(ObjRec {
        gid: obj.gid,
        vv: VersionVector::default(),
        modified_by: engine.device,
        deleted: false,
        kind: now.kind,
        names,
        perm: now.perm & 0o7777,
        mtime: now.mtime,
        size: if now.kind == FileKind::Symlink {
            now.target.len() as u64
        } else if now.kind == FileKind::File {
            now.size
        } else {
            0
        },
        chunks,
        target: if now.kind == FileKind::Symlink {
            now.target.clone()
        } else {
            Vec::new()
        },
    }))
}

/// Whether the recorded hashes of `obj` are those of its content `now`
/// (same size and mtime).
fn reusable(obj: &LocalObject, now: &LocalState) -> bool {
    obj.recorded.as_ref().is_some_and(|r| {
        !r.deleted
            && r.size == now.size
            && r.mtime == now.mtime
            && r.chunks.len() as u64 == chunk_count(r.size)
    })
}

/// The chunk hashes of a file's current content (those of `pre` when
/// they were made from this state).
fn file_chunks(
    engine: &SyncEngine,
    obj: &LocalObject,
    now: &LocalState,
    pre: Option<&Prehashed>,
) -> Result<Result<Vec<super::model::ChunkHash>, Step>, FsError> {
    if reusable(obj, now)
        && let Some(r) = &obj.recorded
    {
        return Ok(Ok(r.chunks.clone()));
    }
    if let Some(p) = pre
        && p.fits(now)
    {
        return Ok(Ok(p.chunks.clone()));
    }
    let count = chunk_count(now.size);
    // Chunks that are not here keep their expected hash; one that is
    // partly past the truncation limit must be fetched first.
    if let Some(p) = &now.presence
        && p.generation == now.generation
    {
        let limit = p.limit.min(now.size);
        for i in 0..count {
            let (start, end) = chunk_range(i, now.size);
            let here = bit(&p.present, i) || start >= limit;
            if !here && end > limit && start < limit {
                return Ok(Err(Step::NeedsFetch(
                    obj.ino,
                    now.generation,
                    start,
                    limit - start,
                )));
            }
        }
    }
    let file = engine.store.open_content(obj.ino, now.generation)?;
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let (start, end) = chunk_range(i, now.size);
        if let Some(p) = &now.presence
            && p.generation == now.generation
            && !bit(&p.present, i)
            && end <= p.limit.min(now.size)
            && let Some(h) = p.chunks.get(i as usize)
        {
            out.push(*h);
            continue;
        }
        let len = (end - start) as usize;
        file.read_exact_at(&mut buf[..len], start).map_err(|e| {
            ipc_schema::fs_err!(
                EIO,
                "reading chunk {i} of inode {} to hash it: {e}",
                obj.ino.0
            )
        })?;
        out.push(super::model::ChunkHash::of(&buf[..len]));
    }
    Ok(Ok(out))
}

/// Bit `i` of a presence bitmap.
fn bit(words: &[u64], i: u64) -> bool {
    words
        .get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// `Some(available bytes)` when the filesystem holding `state_dir` has
/// less than [`FREE_RESERVE`] available (`None` when it has more, or
/// cannot be asked: then versioning goes on and a write error is retried
/// like any other).
fn nearly_full(state_dir: &std::path::Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(state_dir).ok()?;
    let free = st.blocks_available().saturating_mul(st.fragment_size());
    (free < FREE_RESERVE).then_some(free)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opens::ConnId;
    use crate::store::Store;
    use crate::store::test_support::file_with;
    use crate::sync::model::{ChunkHash, DeviceId};
    use ipc_schema::Caller;
    use std::io::Write;

    const CONN: ConnId = ConnId(1);
    const ME: Caller = Caller {
        uid: 1000,
        gid: 1000,
        pid: 1,
    };

    fn hashes(bytes: &[u8]) -> Vec<ChunkHash> {
        bytes
            .chunks(CHUNK_SIZE as usize)
            .map(ChunkHash::of)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_file_is_hashed_without_the_index_lock_and_a_stale_hash_is_not_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::load(dir.path(), (4321, 8765)).expect("store"));
        store.connect(CONN);
        let engine = SyncEngine::start(store.clone(), DeviceId([1; 8])).expect("engine");
        let v1: Vec<u8> = (0..HASH_UNLOCKED_MIN + 1000)
            .map(|i| (i % 251) as u8)
            .collect();

        // The index lock is held (as an apply from a peer holds it) while
        // the file is hashed: the hashing must not need it. (Held from
        // before the file is made, so the running versioner cannot record
        // it first.)
        let (tx, rx) = std::sync::mpsc::channel();
        let (ino, pre) = {
            let _index = engine.lock_index();
            let ino = file_with(&store, Ino::ROOT, "big", &v1, ME, CONN);
            let e = engine.clone();
            std::thread::spawn(move || {
                let _ = tx.send(prehash(&e, ino));
            });
            let pre = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("prehash finished while the index lock was held")
                .expect("a large file is prehashed");
            (ino, pre)
        };
        assert_eq!(pre.chunks, hashes(&v1));

        // The file changes after it was hashed: the hashes do not fit its
        // state any more, and versioning hashes it again.
        let v2: Vec<u8> = v1.iter().map(|b| b ^ 0xff).collect();
        let f = store
            .open(ino, libc::O_RDWR | libc::O_TRUNC, CONN)
            .expect("open");
        std::fs::File::from(f.fd).write_all(&v2).expect("write");
        store.release(f.opened.handle).expect("release");
        let obj = store.local_object(ino).expect("local");
        let now = obj.now.as_ref().expect("live");
        assert!(!pre.fits(now), "a write since the hash changes mtime");
        let chunks = file_chunks(&engine, &obj, now, Some(&pre))
            .expect("hash")
            .expect("no fetch");
        assert_eq!(chunks, hashes(&v2));

        // Hashes made from the current state are used as they are.
        let fresh = prehash(&engine, ino);
        if let Some(fresh) = fresh {
            assert!(fresh.fits(now));
            assert_eq!(fresh.chunks, hashes(&v2));
        } else {
            // The versioner recorded v2 meanwhile: its hashes are reused.
            assert!(reusable(&obj_now(&store, ino), now));
        }
    }

    fn obj_now(store: &Store, ino: Ino) -> LocalObject {
        store.local_object(ino).expect("local")
    }
}
