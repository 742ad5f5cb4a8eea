//! Applying a peer's record here: the merge decision ([`super::merge`]),
//! then `Store::apply_remote`, and what follows from its answer.
//!
//! Every function here runs on the blocking pool, under the engine's
//! index lock (taken by [`apply_one`]), so the decision and the write are
//! one step (see `engine.rs`).
//!
//! Answers of the store, and what is done about them:
//! - applied: the invalidations go to mountd, a small file left partial
//!   is fetched at once (`eager_fetch_max`);
//! - `MissingParent`: deferred until the parent arrives (the session
//!   retries after each batch);
//! - `Collision`: deferred (a rename over a file comes with the replaced
//!   file's tombstone, later in the batch or in the next one); once it has
//!   waited a second (`session::COLLISION_GRACE`), on the final pass
//!   the object with the older (mtime, modified_by) moves to its conflict
//!   name ([`merge::collision_loser`]), the same choice on every peer;
//! - `Busy` (the local inode has changes not yet versioned, or a handle
//!   open for writing): retried after the versioner ran, when the local
//!   change is a version and the decision sees it;
//! - `NotEmpty` (a directory's tombstone, but something was created in it
//!   here that the deleter had not seen): deferred while the session has
//!   other tombstones waiting (the deletes of its entries, refused as
//!   `Busy` for a moment); then the directory is kept and made a
//!   new local version (`merged(local, tombstone)` bumped with this
//!   device), so the deleting peer gets it back with its new children;
//! - `Invalid`: logged with the peer and the reason, skipped (never
//!   applied, never passed on);
//! - a store failure: deferred and retried.
//!
//! The copy rule. A file's local version `L` may have lost a conflict on a
//! peer: the peer then sends the conflict copy of `L` (a new object,
//! [`merge::copy_gid`]`(L)`, with `L`'s chunks) and, later in its log, its
//! winner, whose merged vector supersedes `L` (so no conflict is seen
//! here). The copy's bytes may exist only here, in `L`'s content. So the
//! content of `L` is never replaced (by a newer version or a tombstone)
//! before the copy of `L` is complete here, if it is here:
//! - a copy record that arrives is seeded from the file at its original
//!   name ([`copy_seed`]), and a copy made here from `L` ([`make_copy`])
//!   from `L`'s content;
//! - before a record replaces `L`'s content, a copy of `L` that is here
//!   but partial (it arrived when its seed was not at hand, or was moved
//!   by the collision rule) is filled from `L` (`Store::fill_from`);
//! - a record that would replace `L`'s content waits
//!   ([`Wait::CopyFirst`]) while the copy of `L` is itself a deferred
//!   record of the same session (`held`).
//!
//! This relies on the copy coming before the winner, which each peer's log
//! guarantees (the copy is recorded first, and `Store::changes_since` sends
//! each record at the number it was committed at). A winner and a copy
//! that reach us from two different peers, the winner first, are not
//! covered: the copy is then fetched from whichever peer still has its
//! bytes.

use super::engine::SyncEngine;
use super::merge::{self, ConflictCopy, Outcome};
use super::model::{EntryName, Gid, ObjRec};
use crate::store::objects::{Applied, ApplyError, DirtyMark, Seed};
use ipc_schema::FsError;

/// Why a record waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Its parent directory is not here (yet).
    MissingParent(Gid),
    /// Another object holds one of its names.
    Collision {
        /// The name.
        at: EntryName,
        /// Who holds it.
        existing: Gid,
    },
    /// The local object has changes not yet versioned.
    Busy,
    /// A directory's tombstone, but the directory is not empty here.
    NotEmpty,
    /// It would replace the content of a local version whose conflict
    /// copy (this gid) is a deferred record of the session: it waits
    /// until the copy is applied (and seeded from that content).
    CopyFirst(Gid),
    /// The store failed; retried later.
    Failed(String),
}

/// What became of one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Applied, or nothing to do.
    Done,
    /// Refused for good (invalid); logged.
    Skipped,
    /// To retry.
    Deferred(Wait),
}

/// What to settle now rather than defer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settle {
    /// A name collision: the collision rule.
    pub collision: bool,
    /// A directory's tombstone meeting a directory that is not empty:
    /// keep the directory.
    pub not_empty: bool,
}

/// Decide on and apply `rec`, a record of peer `peer`; `settle` says what
/// to resolve now instead of deferring it; `held` says whether a gid is
/// a record of the session that is deferred (see the copy rule in the
/// module doc).
pub fn apply_one(
    engine: &SyncEngine,
    peer: &str,
    rec: &ObjRec,
    settle: Settle,
    held: &dyn Fn(&Gid) -> bool,
) -> Fate {
    let _index = engine.lock_index();
    let fate = decide_and_apply(engine, peer, rec, settle, held);
    engine.publish_seq();
    fate
}

fn decide_and_apply(
    engine: &SyncEngine,
    peer: &str,
    rec: &ObjRec,
    settle: Settle,
    held: &dyn Fn(&Gid) -> bool,
) -> Fate {
    let store = &engine.store;
    let local = match store.object(&rec.gid) {
        Ok(l) => l,
        Err(e) => return Fate::Deferred(Wait::Failed(e.to_string())),
    };
    let (out, copy, conflict) = match merge::decide(local.as_ref(), rec) {
        Outcome::Ignore => return Fate::Done,
        Outcome::Store {
            rec,
            copy,
            conflict,
        } => (rec, copy, conflict),
    };
    if let Some(copy) = copy {
        match make_copy(engine, peer, &out.gid, &copy) {
            Fate::Done => {}
            other => return other,
        }
    }
    // A conflict copy made by a peer: its bytes are likely those of the
    // object at the original name here (the peer resolved a conflict our
    // version lost, and its winner, next in its log, replaces our
    // content): seed it from there (every chunk is verified by its hash).
    let seed = if local.is_none() {
        copy_seed(engine, &out)
    } else {
        None
    };
    if let Some(l) = local.as_ref()
        && replaces_content(l, &out)
    {
        let copy = merge::copy_gid(l);
        if held(&copy) {
            return Fate::Deferred(Wait::CopyFirst(copy));
        }
        if let Err(e) = complete_copy_of(engine, l, copy) {
            return Fate::Deferred(Wait::Failed(e.to_string()));
        }
    }
    match store.apply_remote(&out, seed) {
        Ok(applied) => {
            after_apply(engine, &out, applied);
            if conflict {
                engine.count_conflict();
                tracing::info!(peer, gid = ?out.gid, "conflict resolved");
            }
            Fate::Done
        }
        Err(ApplyError::NotEmpty) if settle.not_empty => {
            resurrect(engine, peer, local.as_ref(), &out)
        }
        Err(ApplyError::Collision { at, existing }) if settle.collision => {
            settle_collision(engine, peer, &out, seed, at, existing)
        }
        Err(e) => fate_of(peer, &out, e),
    }
}

/// Make a conflict copy (through the merge rules, so a copy that is here
/// already is not made twice).
fn make_copy(engine: &SyncEngine, peer: &str, of: &Gid, copy: &ConflictCopy) -> Fate {
    let store = &engine.store;
    let existing = match store.object(&copy.rec.gid) {
        Ok(e) => e,
        Err(e) => return Fate::Deferred(Wait::Failed(e.to_string())),
    };
    let rec = match merge::decide(existing.as_ref(), &copy.rec) {
        Outcome::Ignore => return Fate::Done,
        Outcome::Store { rec, .. } => rec,
    };
    // Seeded from the local version either way: all of it when the loser
    // is ours, the chunks it shares with the winner otherwise (each chunk
    // is verified by its hash).
    let seed = match local_seed(engine, of) {
        Ok(seed) => seed,
        Err(e) => return Fate::Deferred(Wait::Failed(e.to_string())),
    };
    match store.apply_remote(&rec, seed) {
        Ok(applied) => {
            tracing::info!(peer, copy = ?rec.gid, name = %String::from_utf8_lossy(&rec.names[0].name), ours = copy.from_local, "conflict copy made");
            after_apply(engine, &rec, applied);
            Fate::Done
        }
        Err(e) => fate_of(peer, &rec, e),
    }
}

/// Whether storing `out` replaces the content of the local file version
/// `local` (a newer version with other bytes, or a tombstone).
fn replaces_content(local: &ObjRec, out: &ObjRec) -> bool {
    local.kind == ipc_schema::FileKind::File
        && !local.deleted
        && (out.deleted || !out.same_content(local))
}

/// The copy rule's fill (see the module doc): if the conflict copy
/// `copy` of the local version `local` is here but partial, copy into it
/// every missing chunk that `local`'s content has.
fn complete_copy_of(engine: &SyncEngine, local: &ObjRec, copy: Gid) -> Result<(), FsError> {
    let store = &engine.store;
    let Some(ino) = store.ino_of(&copy)? else {
        return Ok(());
    };
    if store.presence(ino)?.is_none() {
        return Ok(());
    }
    let Some(seed) = local_seed(engine, &local.gid)? else {
        return Ok(());
    };
    let left = store.fill_from(ino, seed)?;
    tracing::info!(copy = ?copy, complete = left.is_empty(), "conflict copy filled from the version it keeps, before that version is replaced");
    Ok(())
}

/// The local content a conflict copy of the local version starts from:
/// the current content generation of the object `of` (whose local version
/// lost).
fn local_seed(engine: &SyncEngine, of: &Gid) -> Result<Option<Seed>, FsError> {
    let Some(ino) = engine.store.ino_of(of)? else {
        return Ok(None);
    };
    let obj = engine.store.local_object(ino)?;
    Ok(obj.now.map(|now| Seed {
        ino,
        generation: now.generation,
    }))
}

/// The seed of a new file named as a conflict copy
/// ([`merge::conflict_name`]): the object at the original name in the same
/// directory, if it is a file here.
fn copy_seed(engine: &SyncEngine, rec: &ObjRec) -> Option<Seed> {
    if rec.kind != ipc_schema::FileKind::File {
        return None;
    }
    let first = rec.names.first()?;
    let original = merge::original_name(&first.name)?;
    let store = &engine.store;
    let parent = store.ino_of(&first.parent).ok()??;
    let attr = store.lookup(parent, &ipc_schema::Name(original)).ok()?;
    if attr.kind != ipc_schema::FileKind::File {
        return None;
    }
    let obj = store.local_object(attr.ino).ok()?;
    obj.now.map(|now| Seed {
        ino: attr.ino,
        generation: now.generation,
    })
}

/// After a successful apply: invalidations, eager fetch, and the log.
fn after_apply(engine: &SyncEngine, rec: &ObjRec, applied: Applied) {
    if !applied.invals.is_empty() {
        engine.data().push_invals(applied.invals);
    }
    if let Some(ino) = applied.ino
        && applied.partial
        && rec.size <= engine.data().eager_fetch_max()
    {
        engine.data().prefetch(ino);
    }
    tracing::debug!(gid = ?rec.gid, seq = applied.seq, deleted = rec.deleted, "applied");
}

/// A directory's tombstone met a directory that is not empty here: keep
/// it, as a new local version that has seen the delete.
fn resurrect(engine: &SyncEngine, peer: &str, local: Option<&ObjRec>, tomb: &ObjRec) -> Fate {
    let store = &engine.store;
    let Some(local) = local.filter(|l| !l.deleted) else {
        return Fate::Deferred(Wait::Failed("not empty, but not recorded".into()));
    };
    let ino = match store.ino_of(&local.gid) {
        Ok(Some(ino)) => ino,
        Ok(None) => return Fate::Deferred(Wait::Failed("not empty, but no inode".into())),
        Err(e) => return Fate::Deferred(Wait::Failed(e.to_string())),
    };
    let rec = ObjRec {
        vv: local.vv.merged(&tomb.vv).bumped(engine.device),
        modified_by: engine.device,
        ..local.clone()
    };
    // Mark 0 is never a live mark: a dirty mark set meanwhile stays.
    match store.commit_local(DirtyMark { ino, mark: 0 }, &rec) {
        Ok(seq) => {
            engine.count_conflict();
            tracing::info!(peer, gid = ?rec.gid, seq, "a deleted directory has new entries here: kept");
            Fate::Done
        }
        Err(e) => Fate::Deferred(Wait::Failed(e.to_string())),
    }
}

/// Two objects claim one name after the batch: the older moves to its
/// conflict name (its record rewritten, version vector unchanged).
fn settle_collision(
    engine: &SyncEngine,
    peer: &str,
    rec: &ObjRec,
    seed: Option<Seed>,
    at: EntryName,
    existing: Gid,
) -> Fate {
    let store = &engine.store;
    let other = match store.object(&existing) {
        Ok(Some(o)) => o,
        Ok(None) => {
            return Fate::Deferred(Wait::Failed("the name's holder is not recorded".into()));
        }
        Err(e) => return Fate::Deferred(Wait::Failed(e.to_string())),
    };
    if merge::collision_loser(rec, &other) {
        let moved = merge::renamed_for_collision(rec, &at);
        // (A conflict copy moved here keeps the seed of its first name.)
        match store.apply_remote(&moved, seed) {
            Ok(applied) => {
                engine.count_conflict();
                after_apply(engine, &moved, applied);
                Fate::Done
            }
            Err(e) => fate_of(peer, &moved, e),
        }
    } else {
        let moved = merge::renamed_for_collision(&other, &at);
        if let Err(e) = store
            .apply_remote(&moved, None)
            .map(|a| after_apply(engine, &moved, a))
        {
            return fate_of(peer, &moved, e);
        }
        engine.count_conflict();
        match store.apply_remote(rec, seed) {
            Ok(applied) => {
                after_apply(engine, rec, applied);
                Fate::Done
            }
            Err(e) => fate_of(peer, rec, e),
        }
    }
}

fn fate_of(peer: &str, rec: &ObjRec, e: ApplyError) -> Fate {
    match e {
        ApplyError::MissingParent(gid) => Fate::Deferred(Wait::MissingParent(gid)),
        ApplyError::Collision { at, existing } => Fate::Deferred(Wait::Collision { at, existing }),
        ApplyError::Busy => Fate::Deferred(Wait::Busy),
        ApplyError::Invalid(reason) => {
            tracing::warn!(peer, gid = ?rec.gid, %reason, "refused a record from the peer");
            Fate::Skipped
        }
        ApplyError::NotEmpty => Fate::Deferred(Wait::NotEmpty),
        ApplyError::Fs(e) => {
            tracing::warn!(peer, gid = ?rec.gid, error = %e, "applying a record failed; will retry");
            Fate::Deferred(Wait::Failed(e.to_string()))
        }
    }
}
