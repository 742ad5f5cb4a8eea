//! What the store keeps, and how it is laid out in sled.
//!
//! | tree      | key                               | value                  |
//! |-----------|-----------------------------------|------------------------|
//! | `inodes`  | ino (u64 BE)                      | [`InodeRec`] (bincode) |
//! | `dirents` | parent (u64 BE) ++ name bytes     | [`DirentRec`] (bincode)|
//! | `cookies` | parent (u64 BE) ++ cookie (u64 BE)| name bytes             |
//! | `xattrs`  | ino (u64 BE) ++ name bytes        | value bytes            |
//! | `orphans` | ino (u64 BE)                      | empty                  |
//! | `meta`    | `"next_ino"`, `"format"`          | u64 BE                 |
//! | `meta`    | `"clean_stop"`                    | handle epoch (u64 BE)  |
//! | `links`   | ino ++ parent ino ++ name bytes   | empty                  |
//!
//! `links` is `dirents` turned around: the names of an inode (a file's
//! hard links, a directory's one name), for the shared index, which names
//! an object by its parents and names. Every operation that adds or
//! removes an entry changes both in one transaction ([`super::tx::Tx`]).
//! The trees of the shared index are listed in [`super::objects`].
//!
//! Big-endian keys make sled's byte order the numeric order, so a prefix
//! scan of `cookies` under one directory lists it in cookie order: that is
//! how `readdir` resumes from a cookie while entries come and go. An entry
//! keeps its cookie for as long as it stays in its directory.
//!
//! Records are bincode 1.3 of plain structs. A change of their layout bumps
//! [`FORMAT_VERSION`], which the store checks when it opens; an older
//! store is migrated then ([`migrate`]), keeping every inode and its
//! number.
//!
//! Formats: 1, the first; 2 adds `rdev` to [`InodeRec`] (device nodes); 3
//! adds `generation` (which content file is current, see
//! [`crate::content`]), the `links` tree (built from `dirents` by the
//! migration) and the trees of the shared index (empty after a migration;
//! [`super::Store::attach_device`] fills them).

use ipc_schema::{FileKind, Timestamp};
use serde::{Deserialize, Serialize};

/// Layout version of the records below; stored under `meta/format`.
pub const FORMAT_VERSION: u64 = 3;

/// Key of the inode counter in `meta`: the next number to hand out.
pub const META_NEXT_INO: &[u8] = b"next_ino";
/// Key of the layout version in `meta`.
pub const META_FORMAT: &[u8] = b"format";
/// Key of the clean-stop mark in `meta`: present only between a clean
/// stop and the next start ([`super::Store::mark_clean`]).
pub const META_CLEAN_STOP: &[u8] = b"clean_stop";

/// First cookie handed to a directory entry; 1 and 2 are `.` and `..`.
pub const FIRST_ENTRY_COOKIE: u64 = 3;

/// One inode's metadata.
///
/// For regular files, size, blocks, atime and mtime live in the content
/// file (writes happen there, in mountd or the kernel); the `atime` and
/// `mtime` fields here are used for every other kind.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InodeRec {
    /// Kind of inode.
    pub kind: FileKind,
    /// Permission bits (`0o7777` mask).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard links; for a directory 2 + its subdirectories. A regular file
    /// at 0 is an orphan: unlinked but still open.
    pub nlink: u32,
    /// Last access (not for regular files).
    pub atime: Timestamp,
    /// Last modification (not for regular files).
    pub mtime: Timestamp,
    /// Last status change.
    pub ctime: Timestamp,
    /// Creation.
    pub crtime: Timestamp,
    /// Symlink target; empty otherwise.
    pub target: Vec<u8>,
    /// Directories: the directory containing this one (the root: itself).
    pub parent: u64,
    /// Directories: how many entries it holds (`.` and `..` not counted).
    pub entries: u64,
    /// Directories: the cookie the next new entry gets.
    pub next_cookie: u64,
    /// Device nodes: the device number (`st_rdev`, the kernel's encoding);
    /// 0 otherwise. Since format 2.
    pub rdev: u32,
    /// Regular files: the content generation, i.e. which content file holds
    /// the bytes (0: `<ino>`, g: `<ino>.<g>`); a version applied from a
    /// peer starts a new one. 0 otherwise. Since format 3.
    pub generation: u64,
}

/// [`InodeRec`] as format 2 stored it (no `generation`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InodeRecV2 {
    /// As [`InodeRec::kind`].
    pub kind: FileKind,
    /// As [`InodeRec::perm`].
    pub perm: u16,
    /// As [`InodeRec::uid`].
    pub uid: u32,
    /// As [`InodeRec::gid`].
    pub gid: u32,
    /// As [`InodeRec::nlink`].
    pub nlink: u32,
    /// As [`InodeRec::atime`].
    pub atime: Timestamp,
    /// As [`InodeRec::mtime`].
    pub mtime: Timestamp,
    /// As [`InodeRec::ctime`].
    pub ctime: Timestamp,
    /// As [`InodeRec::crtime`].
    pub crtime: Timestamp,
    /// As [`InodeRec::target`].
    pub target: Vec<u8>,
    /// As [`InodeRec::parent`].
    pub parent: u64,
    /// As [`InodeRec::entries`].
    pub entries: u64,
    /// As [`InodeRec::next_cookie`].
    pub next_cookie: u64,
    /// As [`InodeRec::rdev`].
    pub rdev: u32,
}

impl From<InodeRecV2> for InodeRec {
    fn from(r: InodeRecV2) -> InodeRec {
        InodeRec {
            kind: r.kind,
            perm: r.perm,
            uid: r.uid,
            gid: r.gid,
            nlink: r.nlink,
            atime: r.atime,
            mtime: r.mtime,
            ctime: r.ctime,
            crtime: r.crtime,
            target: r.target,
            parent: r.parent,
            entries: r.entries,
            next_cookie: r.next_cookie,
            rdev: r.rdev,
            generation: 0,
        }
    }
}

/// [`InodeRec`] as format 1 stored it (no `rdev`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InodeRecV1 {
    /// As [`InodeRec::kind`].
    pub kind: FileKind,
    /// As [`InodeRec::perm`].
    pub perm: u16,
    /// As [`InodeRec::uid`].
    pub uid: u32,
    /// As [`InodeRec::gid`].
    pub gid: u32,
    /// As [`InodeRec::nlink`].
    pub nlink: u32,
    /// As [`InodeRec::atime`].
    pub atime: Timestamp,
    /// As [`InodeRec::mtime`].
    pub mtime: Timestamp,
    /// As [`InodeRec::ctime`].
    pub ctime: Timestamp,
    /// As [`InodeRec::crtime`].
    pub crtime: Timestamp,
    /// As [`InodeRec::target`].
    pub target: Vec<u8>,
    /// As [`InodeRec::parent`].
    pub parent: u64,
    /// As [`InodeRec::entries`].
    pub entries: u64,
    /// As [`InodeRec::next_cookie`].
    pub next_cookie: u64,
}

impl From<InodeRecV1> for InodeRec {
    fn from(r: InodeRecV1) -> InodeRec {
        InodeRec {
            kind: r.kind,
            perm: r.perm,
            uid: r.uid,
            gid: r.gid,
            nlink: r.nlink,
            atime: r.atime,
            mtime: r.mtime,
            ctime: r.ctime,
            crtime: r.crtime,
            target: r.target,
            parent: r.parent,
            entries: r.entries,
            next_cookie: r.next_cookie,
            rdev: 0,
            generation: 0,
        }
    }
}

/// Migrate a store of format `from` to [`FORMAT_VERSION`]: every inode
/// record is rewritten in the new layout, the `links` tree is built from
/// `dirents`, and the format mark set, in one transaction (a crash leaves
/// the old store or the new one), then flushed. Inode numbers, entries,
/// cookies, xattrs and content files do not change (every file keeps
/// content generation 0, the file it had).
pub fn migrate(
    db: &sled::Db,
    inodes: &sled::Tree,
    meta: &sled::Tree,
    from: u64,
) -> Result<(), String> {
    use sled::Transactional;
    if !(1..FORMAT_VERSION).contains(&from) {
        return Err(format!("no migration from format {from}"));
    }
    let mut recs = Vec::new();
    for item in inodes.iter() {
        let (k, v) = item.map_err(|e| format!("reading inodes: {e}"))?;
        let undecodable =
            |e: bincode1::Error| format!("record of inode {:?} cannot be decoded: {e}", be_u64(&k));
        let rec = match from {
            1 => InodeRec::from(decode::<InodeRecV1>(&v).map_err(undecodable)?),
            _ => InodeRec::from(decode::<InodeRecV2>(&v).map_err(undecodable)?),
        };
        recs.push((k, encode(&rec)));
    }
    let dirents = db
        .open_tree("dirents")
        .map_err(|e| format!("opening dirents: {e}"))?;
    let links = db
        .open_tree("links")
        .map_err(|e| format!("opening links: {e}"))?;
    let mut link_keys = Vec::new();
    for item in dirents.iter() {
        let (k, v) = item.map_err(|e| format!("reading dirents: {e}"))?;
        let d: DirentRec = decode(&v).map_err(|e| format!("an entry cannot be decoded: {e}"))?;
        let (Some(parent), Some(name)) = (be_u64(&k), k.get(8..)) else {
            return Err("an entry key is too short".into());
        };
        link_keys.push(link_key(d.ino, parent, name));
    }
    let n = recs.len();
    (inodes, meta, &links)
        .transaction(|(inodes, meta, links)| {
            for (k, v) in &recs {
                inodes.insert(k, v.as_slice())?;
            }
            for k in &link_keys {
                links.insert(k.as_slice(), &[][..])?;
            }
            meta.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes())?;
            Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
        })
        .map_err(|e| format!("rewriting the inode records: {e:?}"))?;
    db.flush().map_err(|e| format!("flushing: {e}"))?;
    tracing::info!(
        inodes = n,
        links = link_keys.len(),
        from,
        to = FORMAT_VERSION,
        "migrated the store"
    );
    Ok(())
}

impl InodeRec {
    /// A fresh record of `kind`, with all times `now` and one link (two for
    /// a directory).
    pub fn new(kind: FileKind, perm: u16, uid: u32, gid: u32, now: Timestamp) -> Self {
        InodeRec {
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            target: Vec::new(),
            parent: 0,
            entries: 0,
            next_cookie: FIRST_ENTRY_COOKIE,
            rdev: 0,
            generation: 0,
        }
    }

    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == FileKind::Directory
    }
}

/// One directory entry: what a name in a directory points at.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirentRec {
    /// The inode it names.
    pub ino: u64,
    /// Its kind (copied from the inode, never changes).
    pub kind: FileKind,
    /// Its readdir cookie in this directory.
    pub cookie: u64,
}

/// Serialize a record.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs into a Vec cannot fail: no maps with
    // non-string keys, no sequences of unknown length.
    bincode1::serialize(v).unwrap_or_default()
}

/// Deserialize a record.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, bincode1::Error> {
    bincode1::deserialize(bytes)
}

/// Key of an inode (and of an orphan mark).
pub fn ino_key(ino: u64) -> [u8; 8] {
    ino.to_be_bytes()
}

/// Key of an entry `name` in directory `parent`.
pub fn dirent_key(parent: u64, name: &[u8]) -> Vec<u8> {
    prefixed(parent, name)
}

/// Key of the name `name` in directory `parent` of inode `ino` in `links`.
pub fn link_key(ino: u64, parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + name.len());
    k.extend_from_slice(&ino.to_be_bytes());
    k.extend_from_slice(&parent.to_be_bytes());
    k.extend_from_slice(name);
    k
}

/// Key of the cookie `cookie` in directory `parent`.
pub fn cookie_key(parent: u64, cookie: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&parent.to_be_bytes());
    k[8..].copy_from_slice(&cookie.to_be_bytes());
    k
}

/// Key of the extended attribute `name` of `ino`.
pub fn xattr_key(ino: u64, name: &[u8]) -> Vec<u8> {
    prefixed(ino, name)
}

fn prefixed(n: u64, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + rest.len());
    k.extend_from_slice(&n.to_be_bytes());
    k.extend_from_slice(rest);
    k
}

/// Read a big-endian u64 from the first 8 bytes of `b`.
pub fn be_u64(b: &[u8]) -> Option<u64> {
    let a: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut r = InodeRec::new(FileKind::Symlink, 0o777, 5, 6, Timestamp::now());
        r.target = b"a/b".to_vec();
        let back: InodeRec = decode(&encode(&r)).expect("decode");
        assert_eq!(back, r);
        let d = DirentRec {
            ino: 9,
            kind: FileKind::File,
            cookie: 3,
        };
        assert_eq!(decode::<DirentRec>(&encode(&d)).expect("decode"), d);
    }

    #[test]
    fn cookie_keys_sort_numerically() {
        assert!(cookie_key(1, 255) < cookie_key(1, 256));
        assert!(cookie_key(1, u64::MAX) < cookie_key(2, 0));
    }
}
