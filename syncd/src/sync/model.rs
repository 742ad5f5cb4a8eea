//! The shared index's data model: what one peer tells another about a file.
//!
//! Every file, directory and symlink of the share has a global id
//! ([`Gid`]) that names it on every peer, whatever its local inode number.
//! An object's state is one [`ObjRec`]: its names (parent id and name,
//! more than one for hard links), its attributes, the BLAKE3 hashes of its
//! fixed-size chunks ([`CHUNK_SIZE`]) and a version vector
//! ([`VersionVector`]): one counter per device that changed it. A delete
//! is a record with `deleted` set (a tombstone), so a delete that races an
//! edit is seen as concurrent, never as older or newer.
//!
//! These types are the wire format of index exchange (postcard) and the
//! stored form of the `objects` tree; a change of their layout changes
//! both the store format and the peer protocol version.

use ipc_schema::{FileKind, Timestamp};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

/// Bytes per chunk: every chunk of a file but the last is this long.
pub const CHUNK_SIZE: u64 = 256 * 1024;

/// The number of chunks of a file of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// The byte range `[start, end)` of chunk `index` in a file of `size` bytes.
pub fn chunk_range(index: u64, size: u64) -> (u64, u64) {
    let start = index.saturating_mul(CHUNK_SIZE).min(size);
    (start, start.saturating_add(CHUNK_SIZE).min(size))
}

/// A device: the first 8 bytes of its X25519 public key. Short enough to
/// appear in every version vector, long enough that two paired devices
/// never share one by chance.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 8]);

impl DeviceId {
    /// The device of a public key.
    pub fn of_public_key(key: &[u8; 32]) -> DeviceId {
        let mut d = [0u8; 8];
        d.copy_from_slice(&key[..8]);
        DeviceId(d)
    }

    /// Lower-case hex, 16 digits (as in conflict names and logs).
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.hex())
    }
}

/// The global id of a file, directory or symlink. The root of the share is
/// [`Gid::ROOT`]; an object made on a device is `device ++ local inode
/// number at creation (u64 BE)`; a conflict copy's id is derived from the
/// version it keeps ([`Gid::conflict_copy`]), so every peer that resolves
/// the same conflict makes the same object.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// The root directory of the share.
    pub const ROOT: Gid = Gid([0; 16]);

    /// The id of an object created on `device` as local inode `ino`.
    pub fn new(device: DeviceId, ino: u64) -> Gid {
        let mut g = [0u8; 16];
        g[..8].copy_from_slice(&device.0);
        g[8..].copy_from_slice(&ino.to_be_bytes());
        Gid(g)
    }

    /// The id of the conflict copy that keeps version `vv` of `of`.
    pub fn conflict_copy(of: &Gid, vv: &VersionVector) -> Gid {
        let mut h = blake3::Hasher::new_derive_key("keibi conflict copy v1");
        h.update(&of.0);
        for (d, c) in &vv.0 {
            h.update(&d.0);
            h.update(&c.to_be_bytes());
        }
        let mut g = [0u8; 16];
        g.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Gid(g)
    }

    /// Lower-case hex, 32 digits.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gid({})", self.hex())
    }
}

/// The BLAKE3 hash of one chunk's bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(bytes).as_bytes())
    }

    /// The hash of the bytes of `pieces` one after the other (the same as
    /// [`ChunkHash::of`] their concatenation).
    pub fn of_pieces<P: AsRef<[u8]>>(pieces: &[P]) -> ChunkHash {
        let mut hasher = blake3::Hasher::new();
        for piece in pieces {
            hasher.update(piece.as_ref());
        }
        ChunkHash(*hasher.finalize().as_bytes())
    }

    /// Lower-case hex, 64 digits.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({}..)", &self.hex()[..12])
    }
}

/// How two version vectors relate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Causality {
    /// Same counters.
    Equal,
    /// The left one has seen everything the right one has, and more.
    Newer,
    /// The right one has seen everything the left one has, and more.
    Older,
    /// Each has changes the other has not seen.
    Concurrent,
}

/// One counter per device that changed an object. Devices absent count 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(pub BTreeMap<DeviceId, u64>);

impl VersionVector {
    /// The counter of `device`.
    pub fn get(&self, device: DeviceId) -> u64 {
        self.0.get(&device).copied().unwrap_or(0)
    }

    /// This vector with `device`'s counter raised by one (a new version
    /// made on `device`).
    pub fn bumped(&self, device: DeviceId) -> VersionVector {
        let mut v = self.clone();
        let c = v.0.entry(device).or_insert(0);
        *c = c.saturating_add(1);
        v
    }

    /// The smallest vector that has seen both: the counter-wise maximum.
    pub fn merged(&self, other: &VersionVector) -> VersionVector {
        let mut v = self.clone();
        for (d, c) in &other.0 {
            let e = v.0.entry(*d).or_insert(0);
            *e = (*e).max(*c);
        }
        v
    }

    /// How `self` relates to `other`.
    pub fn compare(&self, other: &VersionVector) -> Causality {
        let mut newer = false;
        let mut older = false;
        for d in self.0.keys().chain(other.0.keys()) {
            match self.get(*d).cmp(&other.get(*d)) {
                Ordering::Greater => newer = true,
                Ordering::Less => older = true,
                Ordering::Equal => {}
            }
        }
        match (newer, older) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Newer,
            (false, true) => Causality::Older,
            (true, true) => Causality::Concurrent,
        }
    }
}

/// One name of an object: the directory holding it and the name in it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntryName {
    /// The directory (its [`Gid`]).
    pub parent: Gid,
    /// The name, as bytes (validated on receipt, see `store::names`).
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
}

/// The state of one object at one version: what index exchange sends and
/// the `objects` tree keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjRec {
    /// Which object.
    pub gid: Gid,
    /// Its version.
    pub vv: VersionVector,
    /// The device that made this version (for the conflict rule and the
    /// conflict copy's name).
    pub modified_by: DeviceId,
    /// A tombstone: the object was deleted at this version. `names` and
    /// `chunks` are then empty.
    pub deleted: bool,
    /// `File`, `Directory` or `Symlink` (other kinds are not shared).
    pub kind: FileKind,
    /// Its names, sorted; one unless it is a hard-linked file; empty iff
    /// deleted. The root has none.
    pub names: Vec<EntryName>,
    /// Permission bits (`0o7777`).
    pub perm: u16,
    /// Last content change.
    pub mtime: Timestamp,
    /// Size in bytes (files: of the content; symlinks: of the target).
    pub size: u64,
    /// Files: the hash of each chunk, in order (`chunk_count(size)` of
    /// them). Empty for other kinds.
    pub chunks: Vec<ChunkHash>,
    /// Symlinks: the target. Empty for other kinds.
    #[serde(with = "serde_bytes")]
    pub target: Vec<u8>,
}

impl ObjRec {
    /// Whether `self` and `other` describe the same state (everything but
    /// the version vector and who made it), so that a concurrent pair of
    /// them is no real conflict.
    pub fn same_state(&self, other: &ObjRec) -> bool {
        self.gid == other.gid
            && self.deleted == other.deleted
            && self.kind == other.kind
            && self.names == other.names
            && self.perm == other.perm
            && self.mtime == other.mtime
            && self.size == other.size
            && self.chunks == other.chunks
            && self.target == other.target
    }

    /// Whether the content (size and chunks, or the symlink target) of
    /// `self` and `other` is the same.
    pub fn same_content(&self, other: &ObjRec) -> bool {
        self.size == other.size && self.chunks == other.chunks && self.target == other.target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_of_pieces_is_the_hash_of_their_bytes_in_order() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let whole = ChunkHash::of(&bytes);
        for cut in [0, 1, 1024, 196_608, 299_999, 300_000] {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(ChunkHash::of_pieces(&[a, b]), whole, "cut at {cut}");
            if !a.is_empty() && !b.is_empty() {
                assert_ne!(ChunkHash::of_pieces(&[b, a]), whole, "swapped at {cut}");
            }
        }
        let empty: [&[u8]; 0] = [];
        assert_eq!(ChunkHash::of_pieces(&empty), ChunkHash::of(&[]));
    }

    fn vv(pairs: &[(u8, u64)]) -> VersionVector {
        VersionVector(pairs.iter().map(|(d, c)| (DeviceId([*d; 8]), *c)).collect())
    }

    #[test]
    fn compare_covers_all_four_relations() {
        assert_eq!(vv(&[(1, 1)]).compare(&vv(&[(1, 1)])), Causality::Equal);
        assert_eq!(vv(&[(1, 2)]).compare(&vv(&[(1, 1)])), Causality::Newer);
        assert_eq!(
            vv(&[(1, 1)]).compare(&vv(&[(1, 1), (2, 1)])),
            Causality::Older
        );
        assert_eq!(
            vv(&[(1, 2)]).compare(&vv(&[(1, 1), (2, 1)])),
            Causality::Concurrent
        );
        assert_eq!(vv(&[]).compare(&vv(&[(1, 0)])), Causality::Equal);
    }

    #[test]
    fn merged_dominates_both_and_bumped_dominates_merged() {
        let a = vv(&[(1, 2)]);
        let b = vv(&[(1, 1), (2, 1)]);
        let m = a.merged(&b);
        assert_eq!(m, vv(&[(1, 2), (2, 1)]));
        assert_eq!(m.compare(&a), Causality::Newer);
        assert_eq!(m.compare(&b), Causality::Newer);
        assert_eq!(m.bumped(DeviceId([3; 8])).compare(&m), Causality::Newer);
    }

    #[test]
    fn chunk_ranges_cover_the_file() {
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(CHUNK_SIZE), 1);
        assert_eq!(chunk_count(CHUNK_SIZE + 1), 2);
        assert_eq!(chunk_range(1, CHUNK_SIZE + 5), (CHUNK_SIZE, CHUNK_SIZE + 5));
        assert_eq!(chunk_range(3, 10), (10, 10));
    }

    #[test]
    fn conflict_copy_id_depends_on_object_and_version() {
        let g = Gid::new(DeviceId([1; 8]), 42);
        let a = Gid::conflict_copy(&g, &vv(&[(1, 1)]));
        assert_eq!(a, Gid::conflict_copy(&g, &vv(&[(1, 1)])));
        assert_ne!(a, Gid::conflict_copy(&g, &vv(&[(1, 2)])));
        assert_ne!(a, g);
    }
}
