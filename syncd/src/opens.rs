//! Who has which file open.
//!
//! POSIX lets a file be unlinked while it is open and used until the last
//! close. mountd holds the descriptors, but the inode (its attributes, its
//! content file) belongs to syncd, so syncd counts opens: each `open` and
//! `create` adds a handle, each `release` removes one. An inode whose link
//! count reaches 0 while it has handles becomes an orphan and is freed at
//! its last release (see `store/files.rs`).
//!
//! Handles belong to the filesystem connection they were opened on. When a
//! connection ends, its handles are dropped (mountd's process, or at least
//! its connection, is gone). Orphans left without handles are then freed by
//! the next fresh mount (`register_mount` with `reconnect: false`), because
//! a mountd that only lost its connection still holds their descriptors.
//!
//! This table is plain data; the store wraps it in a mutex (see the lock
//! order in `store/mod.rs`).

use ipc_schema::{HandleId, Ino};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

/// One filesystem connection (one mountd connection), numbered by syncd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "conn {}", self.0)
    }
}

static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

/// A new handle id, unique in this process (a counter from 1).
pub fn next_handle() -> HandleId {
    HandleId(NEXT_HANDLE.fetch_add(1, Ordering::Relaxed))
}

/// Open handles by id, open counts by inode, and live connections.
#[derive(Debug, Default)]
pub struct OpenTable {
    handles: HashMap<HandleId, (Ino, ConnId)>,
    counts: HashMap<Ino, u32>,
    live: HashSet<ConnId>,
}

impl OpenTable {
    /// Start accepting handles for `conn`.
    pub fn connect(&mut self, conn: ConnId) {
        self.live.insert(conn);
    }

    /// Record `handle` on `ino` for `conn`. Returns false (and records
    /// nothing) if `conn` has already gone: an open that finishes after its
    /// connection ended must not pin the inode.
    pub fn add(&mut self, handle: HandleId, ino: Ino, conn: ConnId) -> bool {
        if !self.live.contains(&conn) {
            return false;
        }
        self.handles.insert(handle, (ino, conn));
        *self.counts.entry(ino).or_insert(0) += 1;
        true
    }

    /// Forget `handle`. Returns its inode and how many handles that inode
    /// still has, or `None` for an unknown handle.
    pub fn remove(&mut self, handle: HandleId) -> Option<(Ino, u32)> {
        let (ino, _) = self.handles.remove(&handle)?;
        Some((ino, self.decrement(ino)))
    }

    /// Forget every handle of `conn`; returns the inodes left with none.
    pub fn disconnect(&mut self, conn: ConnId) -> Vec<Ino> {
        self.live.remove(&conn);
        let gone: Vec<(HandleId, Ino)> = self
            .handles
            .iter()
            .filter(|(_, (_, c))| *c == conn)
            .map(|(h, (i, _))| (*h, *i))
            .collect();
        let mut closed = Vec::new();
        for (h, ino) in gone {
            self.handles.remove(&h);
            if self.decrement(ino) == 0 {
                closed.push(ino);
            }
        }
        closed
    }

    /// How many handles `ino` has.
    pub fn count(&self, ino: Ino) -> u32 {
        self.counts.get(&ino).copied().unwrap_or(0)
    }

    /// How many handles `conn` has.
    pub fn handles_of(&self, conn: ConnId) -> u64 {
        self.handles.values().filter(|(_, c)| *c == conn).count() as u64
    }

    fn decrement(&mut self, ino: Ino) -> u32 {
        match self.counts.get_mut(&ino) {
            Some(n) if *n > 1 => {
                *n -= 1;
                *n
            }
            _ => {
                self.counts.remove(&ino);
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_handles_and_connections() {
        let mut t = OpenTable::default();
        let (a, b) = (ConnId(1), ConnId(2));
        assert!(!t.add(HandleId(1), Ino(5), a), "unknown connection");
        t.connect(a);
        t.connect(b);
        assert!(t.add(HandleId(1), Ino(5), a));
        assert!(t.add(HandleId(2), Ino(5), b));
        assert!(t.add(HandleId(3), Ino(6), a));
        assert_eq!(t.count(Ino(5)), 2);
        assert_eq!(t.handles_of(a), 2);
        assert_eq!(t.remove(HandleId(2)), Some((Ino(5), 1)));
        assert_eq!(t.remove(HandleId(2)), None, "released twice");
        let mut closed = t.disconnect(a);
        closed.sort();
        assert_eq!(closed, vec![Ino(5), Ino(6)]);
        assert_eq!(t.count(Ino(5)), 0);
        assert!(!t.add(HandleId(4), Ino(5), a), "gone connection");
        assert!(next_handle().0 >= 1);
    }
}
