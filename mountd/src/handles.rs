//! The open-handle table (failure mode 2 in `failure-modes.md`).
//!
//! Every open regular file has one [`Handle`]: the content descriptor syncd
//! sent (validated), syncd's [`HandleId`] for the open, and for
//! passthrough opens the inode's backing id. The table maps the FUSE file
//! handle to an `Arc<Handle>`. FUSE file handles are mountd's own numbers,
//! never reused. An operation takes a clone of the `Arc` and lets go of the
//! table lock before its syscall; `release` removes the entry. The
//! descriptor is closed when the last `Arc` drops, so a `pwrite` racing with
//! `release` still writes to the file it was meant for, and a descriptor
//! number is never reused while an operation may use it. No lock is held
//! during any I/O.
//!
//! The table is also the list of what mountd holds that it gives syncd on
//! a reconnect ([`HandleTable::held`]): the installed handles and the opens
//! whose descriptor was taken but not yet installed
//! ([`HandleTable::begin_opening`]), so that syncd's counts equal mountd's.
//!
//! The table also counts, per inode, the handles open for writing: writes
//! on them change the file's size and times without syncd knowing, so
//! attributes read earlier must not be handed to the kernel for such an
//! inode (see [`crate::dir_handles`]).
//!
//! Locks: the table's `RwLock` is a leaf lock; nothing else is locked while
//! it is held (the passthrough registry's lock, in
//! [`crate::passthrough`], is never taken together with it).
//!
//! [`HandleId`]: ipc_schema::HandleId

use crate::ondemand::PartialState;
use fuser::BackingId;
use ipc_schema::{HandleId, HeldHandle, Ino};
use std::collections::HashMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// One open of a regular file.
#[derive(Debug)]
pub struct Handle {
    /// The keibi inode it opens.
    pub ino: u64,
    /// syncd's name for this open (unique across syncd restarts).
    pub syncd_handle: HandleId,
    /// The content file, as syncd opened it (validated by
    /// [`crate::fd_check`]). Used with `pread`/`pwrite`/`fsync`/`lseek`.
    pub file: File,
    /// The inode's backing id when this open is a passthrough open. Kept
    /// here so the id lives until the last handle of the inode is
    /// released.
    pub backing: Option<Arc<BackingId>>,
    /// Opened with write access.
    pub writable: bool,
    /// Answered plain through the page cache ([`crate::passthrough::Mode::Plain`]):
    /// its release must be told to the passthrough registry.
    pub cached_plain: bool,
    /// Set when the file's bytes are not all local: the chunks present
    /// ([`crate::ondemand`]).
    pub partial: Option<PartialState>,
}

#[derive(Default)]
struct Map {
    by_fh: HashMap<u64, Arc<Handle>>,
    /// Inode → number of its handles open for writing (never 0).
    writers: HashMap<u64, usize>,
    /// Opens whose descriptor was taken from syncd but that are not in
    /// `by_fh` yet: syncd's handle → inode.
    opening: HashMap<HandleId, u64>,
}

/// File handle → open handle.
pub struct HandleTable {
    map: RwLock<Map>,
    next: AtomicU64,
}

impl Default for HandleTable {
    fn default() -> Self {
        HandleTable {
            map: RwLock::new(Map::default()),
            next: AtomicU64::new(1),
        }
    }
}

impl HandleTable {
    /// Add `handle` under a new file handle, which is returned. Ends its
    /// [`HandleTable::begin_opening`].
    pub fn insert(&self, handle: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        m.opening.remove(&handle.syncd_handle);
        if handle.writable {
            *m.writers.entry(handle.ino).or_default() += 1;
        }
        m.by_fh.insert(fh, Arc::new(handle));
        crate::metrics::handle_opened();
        fh
    }

    /// The handle `fh`, as an owned reference.
    pub fn get(&self, fh: u64) -> Option<Arc<Handle>> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.by_fh.get(&fh).cloned()
    }

    /// Count syncd's `handle` of `ino` as held from now on, before it is
    /// installed; end with [`HandleTable::insert`] or
    /// [`HandleTable::end_opening`].
    pub fn begin_opening(&self, handle: HandleId, ino: u64) {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        m.opening.insert(handle, ino);
    }

    /// The open of `handle` failed before it was installed.
    pub fn end_opening(&self, handle: HandleId) {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        m.opening.remove(&handle);
    }

    /// Every syncd handle mountd holds: installed, or being installed.
    pub fn held(&self) -> Vec<HeldHandle> {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        let installed = m.by_fh.values().map(|h| (h.syncd_handle, h.ino));
        let opening = m.opening.iter().map(|(h, i)| (*h, *i));
        installed
            .chain(opening)
            .map(|(handle, ino)| HeldHandle {
                handle,
                ino: Ino(ino),
            })
            .collect()
    }

    /// Whether `ino` has a handle open for writing.
    pub fn has_writer(&self, ino: u64) -> bool {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        m.writers.contains_key(&ino)
    }

    /// The file `ino` was truncated to `size` through this mount: lower
    /// the size below which its partial handles fetch missing chunks.
    pub fn truncated(&self, ino: u64, size: u64) {
        let m = self.map.read().unwrap_or_else(|p| p.into_inner());
        for h in m.by_fh.values().filter(|h| h.ino == ino) {
            if let Some(p) = &h.partial {
                p.lower_size(size);
            }
        }
    }

    /// Remove `fh`. In-flight operations keep their references; the
    /// descriptor closes when the last one is dropped.
    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        let mut m = self.map.write().unwrap_or_else(|p| p.into_inner());
        let h = m.by_fh.remove(&fh)?;
        crate::metrics::handle_closed();
        if h.writable
            && let Some(n) = m.writers.get_mut(&h.ino)
        {
            *n -= 1;
            if *n == 0 {
                m.writers.remove(&h.ino);
            }
        }
        Some(h)
    }

    /// Number of open handles.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_fh
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_removed_handle_stays_usable_by_holders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        let table = HandleTable::default();
        let fh = table.insert(Handle {
            ino: 2,
            syncd_handle: HandleId(1),
            file,
            backing: None,
            partial: None,
            cached_plain: false,
            writable: false,
        });
        let held = table.get(fh).expect("the handle just inserted");
        // release races with an in-flight write:
        assert!(table.remove(fh).is_some());
        assert!(table.get(fh).is_none());
        assert_eq!(table.len(), 0);
        held.file
            .write_all_at(b"still here", 0)
            .expect("pwrite after release");
        drop(held);
        assert_eq!(std::fs::read(&path).expect("read"), b"still here");
    }

    #[test]
    fn file_handles_are_never_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = HandleTable::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            let file = File::open(dir.path()).expect("open");
            // syncd reusing its numbers (after a restart) changes nothing.
            let fh = table.insert(Handle {
                ino: 2,
                syncd_handle: HandleId(1),
                file,
                backing: None,
                partial: None,
                cached_plain: false,
                writable: false,
            });
            assert!(seen.insert(fh), "file handle {fh} given twice");
            assert!(table.remove(fh).is_some());
        }
    }

    #[test]
    fn held_lists_installed_and_opening_handles() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = HandleTable::default();
        table.begin_opening(HandleId(7), 3);
        table.begin_opening(HandleId(8), 4);
        let fh = table.insert(Handle {
            ino: 3,
            syncd_handle: HandleId(7),
            file: File::open(dir.path()).expect("open"),
            backing: None,
            partial: None,
            cached_plain: false,
            writable: false,
        });
        table.end_opening(HandleId(8));
        table.begin_opening(HandleId(9), 5);
        let mut held: Vec<_> = table.held().iter().map(|h| (h.handle.0, h.ino.0)).collect();
        held.sort();
        assert_eq!(held, vec![(7, 3), (9, 5)]);
        table.remove(fh);
        table.end_opening(HandleId(9));
        assert!(table.held().is_empty());
    }

    #[test]
    fn counts_writers_per_inode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = HandleTable::default();
        let open = |ino, writable| {
            table.insert(Handle {
                ino,
                syncd_handle: HandleId(1),
                file: File::open(dir.path()).expect("open"),
                backing: None,
                partial: None,
                cached_plain: false,
                writable,
            })
        };
        let reader = open(7, false);
        assert!(!table.has_writer(7));
        let w1 = open(7, true);
        let w2 = open(7, true);
        assert!(table.has_writer(7));
        assert!(!table.has_writer(8));
        table.remove(w1);
        assert!(table.has_writer(7), "one writer left");
        table.remove(w2);
        assert!(!table.has_writer(7));
        table.remove(reader);
        assert!(!table.has_writer(7));
    }
}
