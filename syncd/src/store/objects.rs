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
//!
//! (Design and invariants: written by the owner of this module.)

use super::Store;
use crate::sync::model::{ChunkHash, DeviceId, EntryName, Gid, ObjRec};
use ipc_schema::{FileKind, FsError, Ino, Inval, Timestamp};
use serde::{Deserialize, Serialize};

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
    /// The store or the content directory failed.
    #[error("{0}")]
    Fs(FsError),
}

#[allow(unused_variables)]
impl Store {
    /// This store's device id (set by [`Store::attach_device`]).
    pub fn device(&self) -> DeviceId {
        todo!("store::objects")
    }

    /// Tie the store to the device `device` (the identity's key). The
    /// first time (or after a migration), every existing inode gets its
    /// global id and is marked dirty, so it is versioned and announced.
    /// Refuses a store tied to another device.
    pub fn attach_device(&self, device: DeviceId) -> Result<(), FsError> {
        todo!("store::objects")
    }

    /// Up to `limit` dirty inodes, oldest mark first.
    pub fn take_dirty(&self, limit: usize) -> Result<Vec<DirtyMark>, FsError> {
        todo!("store::objects")
    }

    /// How many inodes are dirty.
    pub fn dirty_count(&self) -> u64 {
        todo!("store::objects")
    }

    /// The versioning view of `ino`.
    pub fn local_object(&self, ino: Ino) -> Result<LocalObject, FsError> {
        todo!("store::objects")
    }

    /// Open the content file of `ino` generation `generation` for reading (to
    /// hash it).
    pub fn open_content(&self, ino: Ino, generation: u64) -> Result<std::fs::File, FsError> {
        todo!("store::objects")
    }

    /// Record `rec` as the new local version of `mark.ino` and append it
    /// to the change log; clear the dirty mark if it is still `mark`.
    /// Answers the new local sequence number.
    pub fn commit_local(&self, mark: DirtyMark, rec: &ObjRec) -> Result<u64, FsError> {
        todo!("store::objects")
    }

    /// Clear a dirty mark without a new version (nothing shared changed).
    pub fn clear_dirty(&self, mark: DirtyMark) -> Result<(), FsError> {
        todo!("store::objects")
    }

    /// The last local sequence number.
    pub fn local_seq(&self) -> u64 {
        todo!("store::objects")
    }

    /// Records changed after local sequence `seq`, up to `limit`, in
    /// sequence order.
    pub fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<(u64, ObjRec)>, FsError> {
        todo!("store::objects")
    }

    /// The recorded version of `gid`.
    pub fn object(&self, gid: &Gid) -> Result<Option<ObjRec>, FsError> {
        todo!("store::objects")
    }

    /// The local inode of `gid`, if it has one (not for tombstones).
    pub fn ino_of(&self, gid: &Gid) -> Result<Option<Ino>, FsError> {
        todo!("store::objects")
    }

    /// The last sequence number of peer `fingerprint` applied here.
    pub fn peer_applied(&self, fingerprint: &str) -> Result<u64, FsError> {
        todo!("store::objects")
    }

    /// Remember that changes of `fingerprint` up to `seq` are applied
    /// (flushed with the records they cover).
    pub fn set_peer_applied(&self, fingerprint: &str, seq: u64) -> Result<(), FsError> {
        todo!("store::objects")
    }

    /// Make the local tree show `rec` (a version from a peer, or the
    /// outcome of a conflict): create, move, link, unlink, change
    /// attributes, and for new content start a new content generation
    /// (sparse, of `rec.size`, chunks copied from `seed` where the hash at
    /// the same index matches, the rest marked missing). One sled
    /// transaction; nothing is marked dirty; the record gets a new local
    /// sequence number (so it is passed on). Names are validated; files
    /// belong to the share owner.
    pub fn apply_remote(&self, rec: &ObjRec, seed: Option<Seed>) -> Result<Applied, ApplyError> {
        todo!("store::apply")
    }

    /// The presence record of `ino`, if its bytes are not all local.
    pub fn presence(&self, ino: Ino) -> Result<Option<PresenceRec>, FsError> {
        todo!("store::presence")
    }

    /// The inode and content generation an open handle reads.
    pub fn handle_version(&self, handle: ipc_schema::HandleId) -> Option<(Ino, u64)> {
        todo!("store::presence")
    }

    /// Open `ino`'s content generation `generation` for writing fetched chunks.
    pub fn open_for_fill(&self, ino: Ino, generation: u64) -> Result<std::fs::File, FsError> {
        todo!("store::presence")
    }

    /// Mark chunk `index` of `ino` generation `generation` present (its bytes are
    /// written and verified). Answers the presence bitmap after it
    /// (empty: the file is complete and the record is gone).
    pub fn mark_present(&self, ino: Ino, generation: u64, index: u64) -> Result<Vec<u64>, FsError> {
        todo!("store::presence")
    }

    /// The bytes of chunk `index` of `gid`'s current version, if they are
    /// present here and hash to `hash` (checked before answering).
    pub fn read_chunk(
        &self,
        gid: &Gid,
        index: u64,
        hash: &ChunkHash,
    ) -> Result<Option<Vec<u8>>, FsError> {
        todo!("store::presence")
    }

    /// Every partial file: (ino, presence), up to `limit`.
    pub fn partial_files(&self, limit: usize) -> Result<Vec<(Ino, PresenceRec)>, FsError> {
        todo!("store::presence")
    }

    /// The path of `ino` from the root (`/a/b`), for listings.
    pub fn path_of(&self, ino: Ino) -> Result<String, FsError> {
        todo!("store::objects")
    }
}
