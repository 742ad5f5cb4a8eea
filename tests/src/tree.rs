//! Comparing two mounts: a walk of each tree that records, per path, the
//! kind, permission bits, size, BLAKE3 of the content and symlink target;
//! [`wait_converged`] polls until two mounts show the same tree.
//!
//! Convergence is judged in two steps so that polling stays cheap: the
//! metadata of both trees (names, kinds, modes, sizes, targets) must match
//! first; only then are the contents of every file hashed, on both sides
//! (reading on the mount that lacks bytes makes it fetch them, exactly as a
//! user's read would). An error on the way (a file that vanished between
//! the listing and the read, a read of bytes not yet reachable) counts as
//! "not converged yet".

use crate::wait::try_poll_until;
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Names the harness itself makes on a mount (see
/// `KeibiFixture::wait_writable`), left out of every comparison.
const HARNESS_NAMES: &[&str] = &[".keibi-test-writable"];

/// What a path is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (a fifo, socket or device), by its `ls -l` letter.
    Other(char),
}

/// One path of a tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its kind.
    pub kind: Kind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Size in bytes (files and symlinks; 0 for directories, whose size is
    /// not part of what is shared).
    pub size: u64,
    /// BLAKE3 of the content, hex (files, once hashed).
    pub hash: Option<String>,
    /// The target (symlinks).
    pub target: Option<Vec<u8>>,
}

/// A tree: relative path → entry. The root itself is the empty path.
pub type Tree = BTreeMap<PathBuf, Entry>;

/// BLAKE3 of a file's content, hex.
pub fn blake3_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// BLAKE3 of bytes, hex.
pub fn blake3_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn kind_of(ft: std::fs::FileType) -> Kind {
    if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Other('p')
    } else if ft.is_socket() {
        Kind::Other('s')
    } else if ft.is_char_device() {
        Kind::Other('c')
    } else {
        Kind::Other('b')
    }
}

/// Walk `root` (not following symlinks) and record every path's metadata;
/// with `hashes`, also the BLAKE3 of every file's content.
pub fn snapshot(root: &Path, hashes: bool) -> std::io::Result<Tree> {
    let mut tree = Tree::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let path = root.join(&rel);
        let md = std::fs::symlink_metadata(&path)?;
        let kind = kind_of(md.file_type());
        let mut e = Entry {
            kind: kind.clone(),
            mode: md.mode() & 0o7777,
            size: if kind == Kind::Dir { 0 } else { md.len() },
            hash: None,
            target: None,
        };
        match kind {
            Kind::Dir => {
                for d in std::fs::read_dir(&path)? {
                    let d = d?;
                    let name = d.file_name();
                    if HARNESS_NAMES
                        .iter()
                        .any(|h| name.as_bytes() == h.as_bytes())
                    {
                        continue;
                    }
                    todo.push(rel.join(name));
                }
            }
            Kind::Symlink => {
                e.target = Some(std::fs::read_link(&path)?.as_os_str().as_bytes().to_vec())
            }
            Kind::File if hashes => {
                e.hash = Some(blake3_file(&path).map_err(|err| {
                    std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
                })?)
            }
            _ => {}
        }
        tree.insert(rel, e);
    }
    Ok(tree)
}

/// The differences between two trees, one line each, at most `max`.
pub fn diff(a: &Tree, b: &Tree, max: usize) -> String {
    let mut out = Vec::new();
    for (p, ea) in a {
        match b.get(p) {
            None => out.push(format!("only in A: {} {:?}", p.display(), ea)),
            Some(eb) if eb != ea => out.push(format!(
                "differs: {}\n  A: {ea:?}\n  B: {eb:?}",
                p.display()
            )),
            _ => {}
        }
    }
    for (p, eb) in b {
        if !a.contains_key(p) {
            out.push(format!("only in B: {} {:?}", p.display(), eb));
        }
    }
    let n = out.len();
    out.truncate(max);
    if n > max {
        out.push(format!("... and {} more", n - max));
    }
    out.join("\n")
}

/// Poll (at most `timeout`) until the trees at `a` and `b` are the same,
/// contents included; returns the tree. Panics with the last difference
/// when they are not by then.
#[track_caller]
pub fn wait_converged(a: &Path, b: &Path, timeout: Duration) -> Tree {
    let mut last = String::from("(no walk finished)");
    let r = try_poll_until(timeout, || {
        let (ta, tb) = match (snapshot(a, false), snapshot(b, false)) {
            (Ok(ta), Ok(tb)) => (ta, tb),
            (ra, rb) => {
                last = format!("walk failed: A: {:?} B: {:?}", ra.err(), rb.err());
                return None;
            }
        };
        if ta != tb {
            last = diff(&ta, &tb, 20);
            return None;
        }
        match (snapshot(a, true), snapshot(b, true)) {
            (Ok(ta), Ok(tb)) if ta == tb => Some(ta),
            (Ok(ta), Ok(tb)) => {
                last = diff(&ta, &tb, 20);
                None
            }
            (ra, rb) => {
                last = format!("hashing failed: A: {:?} B: {:?}", ra.err(), rb.err());
                None
            }
        }
    });
    match r {
        Some(t) => t,
        None => panic!(
            "the trees at {} and {} did not converge within {timeout:?}; last difference:\n{last}",
            a.display(),
            b.display()
        ),
    }
}

/// The paths of `tree` whose last component contains `.sync-conflict-`.
pub fn conflict_copies(tree: &Tree) -> Vec<PathBuf> {
    tree.keys()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".sync-conflict-"))
        })
        .cloned()
        .collect()
}
