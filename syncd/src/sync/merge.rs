//! The merge rules: what to do with a version of an object that arrives
//! from a peer, given the version recorded here. Pure functions: no store,
//! no clock, no network, so that every peer that sees the same two versions
//! decides the same thing, and so that the rules are tested exhaustively.
//!
//! [`decide`] compares the two version vectors:
//!
//! - the remote one is older or equal, with the same state: ignore it;
//! - it is newer: store it as it is;
//! - they are concurrent: both peers compute the same outcome, whose
//!   version vector is the merge of both (no bump), so that each side
//!   stores an identical record and the exchange stops there:
//!   - two tombstones, or the same state: that state, merged vector;
//!   - an edit against a delete: the edit (a live directory against a
//!     directory's tombstone: the live one);
//!   - directories, symlinks, or files with the same content: the winner
//!     by ([`winner_key`]: newer `mtime`, then the greater `modified_by`),
//!     no copy;
//!   - files with different content: the winner as above, and the loser is
//!     kept as a **conflict copy** ([`conflict_copy`]), a new object next to
//!     the loser's first name, named by [`conflict_name`].
//!
//! A conflict copy must be the same object on every peer, whatever order
//! the versions arrived in (with three concurrent versions, one peer may
//! see the loser as the outcome of an earlier merge, with a merged vector).
//! So its id is derived from what does not depend on the order: the
//! original object and the loser's content ([`copy_gid`]); its version
//! vector is empty (a fresh object that no device has changed yet); and
//! two copies with the same id and an equal vector but different names
//! (the same content lost twice, by versions with different times) are
//! settled by the same winner rule ([`decide`] treats an equal vector with
//! a different state like a concurrent one).
//!
//! The name rule of two different objects that claim one name
//! ([`collision_loser`]) is in the same terms: the one with the older
//! (mtime, modified_by) moves to its conflict name.

use super::model::{Causality, DeviceId, EntryName, Gid, ObjRec, VersionVector};
use ipc_schema::{FileKind, Timestamp};
use std::cmp::Ordering;

/// What to do with a remote version (lives for one decision, so the size
/// of its records does not matter).
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// We have this version or a newer one: nothing to do.
    Ignore,
    /// Make the local tree show `rec` (after making `copy`, if any).
    Store {
        /// The record to store (the remote one, or the outcome of a
        /// conflict, which may equal the local state with a merged vector).
        rec: ObjRec,
        /// The loser of a conflict, kept as a new object.
        copy: Option<ConflictCopy>,
        /// Whether a conflict was resolved (a copy made or a delete
        /// undone), for the status counters.
        conflict: bool,
    },
}

/// A conflict copy to make before the winner is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictCopy {
    /// The new object.
    pub rec: ObjRec,
    /// Whether its content is the local version's (then it is seeded from
    /// the local content file; otherwise it is fetched like any remote
    /// version).
    pub from_local: bool,
}

/// The order of two versions in a conflict: the greater key wins.
/// `mtime`, then `modified_by`, then (only for versions that are equal in
/// both, which a well-behaved peer never makes) the encoded record, so the
/// order is total and the same everywhere.
pub fn winner_key(rec: &ObjRec) -> (Timestamp, DeviceId, Vec<u8>) {
    (
        rec.mtime,
        rec.modified_by,
        postcard::to_allocvec(rec).unwrap_or_default(),
    )
}

/// Whether `a` wins over `b` (see [`winner_key`]).
fn wins(a: &ObjRec, b: &ObjRec) -> bool {
    (a.mtime, a.modified_by).cmp(&(b.mtime, b.modified_by)) == Ordering::Greater
        || ((a.mtime, a.modified_by) == (b.mtime, b.modified_by) && winner_key(a) > winner_key(b))
}

/// Decide what to do with `remote`, given the version recorded here
/// (`None`: the object is not known here).
pub fn decide(local: Option<&ObjRec>, remote: &ObjRec) -> Outcome {
    let Some(local) = local else {
        return store(remote.clone(), None, false);
    };
    match remote.vv.compare(&local.vv) {
        Causality::Older => Outcome::Ignore,
        // An equal vector with another author or state (two peers that
        // settled a tie alike but for who "made" it, or copies of one
        // content) is settled by the winner rule, so that records converge
        // exactly: the author takes part in later tie-breaks.
        Causality::Equal if remote.same_state(local) && remote.modified_by == local.modified_by => {
            Outcome::Ignore
        }
        Causality::Newer => store(remote.clone(), None, false),
        Causality::Equal | Causality::Concurrent => concurrent(local, remote),
    }
}

fn store(rec: ObjRec, copy: Option<ConflictCopy>, conflict: bool) -> Outcome {
    Outcome::Store {
        rec,
        copy,
        conflict,
    }
}

/// Both versions are concurrent (or claim the same vector with different
/// states): the outcome every peer computes alike.
fn concurrent(local: &ObjRec, remote: &ObjRec) -> Outcome {
    let vv = local.vv.merged(&remote.vv);
    let with_vv = |rec: &ObjRec| ObjRec {
        vv: vv.clone(),
        ..rec.clone()
    };
    let remote_wins = wins(remote, local);
    let (winner, loser) = if remote_wins {
        (remote, local)
    } else {
        (local, remote)
    };
    // Edit against delete: the live version wins, whatever the times.
    if local.deleted != remote.deleted {
        let live = if local.deleted { remote } else { local };
        return store(with_vv(live), None, true);
    }
    if local.deleted || local.same_state(remote) {
        return store(with_vv(winner), None, false);
    }
    let copy = if winner.kind == FileKind::File
        && loser.kind == FileKind::File
        && !winner.same_content(loser)
    {
        conflict_copy(loser).map(|rec| ConflictCopy {
            rec,
            from_local: remote_wins,
        })
    } else {
        None
    };
    let conflict = copy.is_some();
    store(with_vv(winner), copy, conflict)
}

/// The id of the conflict copy that keeps `loser`'s content: derived from
/// the object and the content only, so that every peer makes the same one
/// whatever order it saw the versions in (see the module doc).
pub fn copy_gid(loser: &ObjRec) -> Gid {
    let mut h = blake3::Hasher::new_derive_key("keibi conflict copy v2");
    h.update(&loser.gid.0);
    h.update(&loser.size.to_be_bytes());
    for c in &loser.chunks {
        h.update(&c.0);
    }
    let mut g = [0u8; 16];
    g.copy_from_slice(&h.finalize().as_bytes()[..16]);
    Gid(g)
}

/// The conflict copy of a losing file version: a new object with its
/// content and attributes, at [`conflict_name`] next to its first name,
/// with an empty version vector. `None` if the loser has no name (a
/// tombstone: never a copy).
pub fn conflict_copy(loser: &ObjRec) -> Option<ObjRec> {
    let first = loser.names.first()?;
    Some(ObjRec {
        gid: copy_gid(loser),
        vv: VersionVector::default(),
        modified_by: loser.modified_by,
        deleted: false,
        kind: loser.kind,
        names: vec![EntryName {
            parent: first.parent,
            name: conflict_name(&first.name, loser.mtime, loser.modified_by),
        }],
        perm: loser.perm,
        mtime: loser.mtime,
        size: loser.size,
        chunks: loser.chunks.clone(),
        target: loser.target.clone(),
    })
}

/// The longest name, in bytes.
const NAME_MAX: usize = 255;

/// `STEM.sync-conflict-YYYYMMDD-HHMMSS-<first 8 hex digits of the
/// device>.EXT`, with the time in UTC. `EXT` is what follows the last `.`
/// when there is one not at the start (so `.bashrc` has none); the stem
/// is cut (at a character boundary when the name is UTF-8) so that the
/// whole name fits in 255 bytes, and an extension too long to leave room
/// for a stem counts as part of the stem.
pub fn conflict_name(name: &[u8], mtime: Timestamp, by: DeviceId) -> Vec<u8> {
    let when = time::OffsetDateTime::from_unix_timestamp(mtime.secs)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let suffix = format!(
        ".sync-conflict-{:04}{:02}{:02}-{:02}{:02}{:02}-{}",
        when.year(),
        u8::from(when.month()),
        when.day(),
        when.hour(),
        when.minute(),
        when.second(),
        &by.hex()[..8]
    );
    let (mut stem, ext) = match name.iter().rposition(|b| *b == b'.') {
        Some(dot) if dot > 0 && suffix.len() + (name.len() - dot) < NAME_MAX => {
            (&name[..dot], &name[dot..])
        }
        _ => (name, &name[name.len()..]),
    };
    let room = NAME_MAX - suffix.len() - ext.len();
    if stem.len() > room {
        let mut cut = room;
        if std::str::from_utf8(stem).is_ok() {
            while cut > 0 && (stem[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
        }
        stem = &stem[..cut];
    }
    let mut out = Vec::with_capacity(stem.len() + suffix.len() + ext.len());
    out.extend_from_slice(stem);
    out.extend_from_slice(suffix.as_bytes());
    out.extend_from_slice(ext);
    out
}

/// The name a conflict copy was made from: `name` without its
/// `.sync-conflict-YYYYMMDD-HHMMSS-XXXXXXXX` part (`None` if it has none;
/// a stem cut to fit 255 bytes is not restored).
pub fn original_name(name: &[u8]) -> Option<Vec<u8>> {
    const MARK: &[u8] = b".sync-conflict-";
    const LEN: usize = 39; // MARK, 8 digits, '-', 6 digits, '-', 8 hex
    let at = name.windows(MARK.len()).rposition(|w| w == MARK)?;
    if name.len() < at + LEN || at == 0 {
        return None;
    }
    let mut out = name[..at].to_vec();
    out.extend_from_slice(&name[at + LEN..]);
    Some(out)
}

/// Of two different objects that claim the same name, whether `a` is the
/// one that moves to its conflict name (the older by (mtime,
/// modified_by), then by id, so both peers pick the same).
pub fn collision_loser(a: &ObjRec, b: &ObjRec) -> bool {
    (a.mtime, a.modified_by, a.gid) < (b.mtime, b.modified_by, b.gid)
}

/// `rec` with the name `at` replaced by its conflict name (for the loser
/// of a name collision; the version vector is unchanged).
pub fn renamed_for_collision(rec: &ObjRec, at: &EntryName) -> ObjRec {
    let mut out = rec.clone();
    for n in out.names.iter_mut() {
        if n == at {
            n.name = conflict_name(&n.name, rec.mtime, rec.modified_by);
        }
    }
    out.names.sort();
    out
}

#[cfg(test)]
#[path = "merge_tests.rs"]
pub(crate) mod tests;
