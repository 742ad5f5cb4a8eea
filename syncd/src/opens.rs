//! Who has which file open.
//!
//! POSIX lets a file be unlinked while it is open and used until the last
//! close. mountd holds the descriptors, but the inode (its attributes, its
//! content file) belongs to syncd, so syncd counts opens: each `open` and
//! `create` adds a handle, each `release` removes one. An inode whose link
//! count reaches 0 while it has handles becomes an orphan and is freed at
//! its last release (see `store/files.rs`).
//!
//! # Handle ids
//!
//! A [`HandleId`] is unique across syncd restarts, not only within one
//! process: its top [`EPOCH_BITS`] bits are the *handle epoch*, a counter in
//! the store that every syncd start increments (durably, before the first
//! handle is given out), and its low bits count the handles of this
//! process. mountd keeps the handles of files that stay open across a
//! syncd restart and tells the new syncd about them (below); with a
//! per-process counter, an old id and a new one could be the same number,
//! and a late `release` of the old handle would close the new one.
//!
//! # Connections and mounts
//!
//! Handles belong to the filesystem connection they were opened on, and a
//! connection to the mount (`mountpoint`, mountd's pid: a [`MountKey`])
//! that registered on it. When a connection ends its handles are *parked*,
//! not dropped: mountd may only have lost the connection and still hold
//! the descriptors. The mount's next `register_mount` settles them
//! ([`OpenTable::register`]):
//!
//! - a reconnect (same mountpoint and pid) lists every handle mountd still
//!   holds; those are moved to the new connection (or added, after a
//!   syncd restart), and every other handle of that mount's earlier
//!   connections is dropped. The counts then match mountd's exactly. A
//!   handle added after a restart counts as one that may write
//!   ([`OpenTable::may_write`]: its access mode is not known here), so
//!   the chunks it is told are present are made durable first, as for a
//!   writer (see `store/presence.rs`).
//! - a fresh mount of the mountpoint (a new mountd: the old one is gone,
//!   since one mountpoint has one mountd) drops every handle of earlier
//!   connections of that mountpoint.
//!
//! The inodes left without handles are then freed if they are orphans.
//! Registering also ends the mount's earlier connections, so an `open`
//! that finishes on one of them afterwards is refused instead of adding a
//! handle nobody will release.
//!
//! # Kernel references
//!
//! The kernel also holds inodes without opening them: every entry it was
//! given (a lookup, a create, a readdirplus entry) counts until it sends
//! `forget`, and while it counts the kernel may open the inode by number,
//! or `fstat` it through an `O_PATH` descriptor or a working directory. A
//! local disk keeps an unlinked inode for as long as it is referenced this
//! way, so an `open` racing an `unlink` gets the (now unlinked) file and
//! `fstat` its attributes with `nlink` 0. keibi does the same: mountd
//! mirrors the kernel's lookup counts and tells syncd when one reaches
//! zero (`forget`), and this table keeps, per connection like handles, the
//! *kernel references* of unlinked inodes ([`OpenTable::reference`]).
//!
//! The rule is: a non-directory whose link count reaches 0 through a
//! removal made on a connection of a registered mount is referenced by that
//! mount's kernel. This is exact, not a guess: the kernel removes a name
//! only through a dentry that holds the inode, so at that moment its
//! lookup count is at least one, and after it no name leads to the inode
//! any more. The reference ends when mountd's `forget` for the inode
//! arrives on the connection that holds it, when the connection ends
//! without a mount, or when the mount registers again (a reconnect lists
//! the inodes the kernel still references, like the handles it holds; a
//! fresh mount references nothing). An inode with neither handles nor
//! references is freed if it is an orphan. Removed directories are not
//! kept (mountd answers `fstat` of one from its own cache, see
//! `docs/architecture.md`).
//!
//! # Content generations
//!
//! Each handle also records the content generation it opened (see
//! [`crate::content`]) and whether it may write. When a version from a
//! peer starts a new generation, the old one is *retired*
//! ([`OpenTable::retire`]): its file stays while a handle has it open, and
//! the last handle of it to go puts it on the list of generations nobody
//! uses ([`OpenTable::take_unpinned`]), which the store hands to its
//! reclaimer. Handles that mountd reports after a syncd restart get the
//! inode's current generation (the start-up scan removed every other
//! file, and their descriptors keep what they read).
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

/// Which mount a connection serves: its mountpoint and mountd's pid.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MountKey {
    /// The mountpoint, as mountd reported it.
    pub mountpoint: String,
    /// mountd's pid.
    pub pid: u32,
}

/// Bits of a handle id that hold the handle epoch (the rest count the
/// handles of one syncd process: 2^40 opens per run, 2^24 runs).
pub const EPOCH_BITS: u32 = 24;
const COUNTER_BITS: u32 = 64 - EPOCH_BITS;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;

static EPOCH: AtomicU64 = AtomicU64::new(0);
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

/// Set this process's handle epoch (from the store, once at start, before
/// any handle is given out).
pub fn set_handle_epoch(epoch: u64) {
    EPOCH.store(epoch & ((1 << EPOCH_BITS) - 1), Ordering::SeqCst);
}

/// A new handle id, never given out before by this store: the handle epoch
/// and a per-process counter from 1.
pub fn next_handle() -> HandleId {
    let n = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed) & COUNTER_MASK;
    HandleId((EPOCH.load(Ordering::SeqCst) << COUNTER_BITS) | n)
}

#[derive(Debug)]
struct Conn {
    /// Accepting new handles (the connection is up and no later
    /// connection of its mount has registered).
    live: bool,
    /// The mount that registered on it, if any yet.
    mount: Option<MountKey>,
}

/// One open handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Handle {
    ino: Ino,
    conn: ConnId,
    /// The content generation it reads.
    generation: u64,
    /// Opened for writing.
    write: bool,
    /// Reported by mountd after a syncd restart: how it was opened is not
    /// known, so it may write (see [`OpenTable::may_write`]).
    restored: bool,
}

/// Open handles by id, open counts by inode, kernel references of
/// unlinked inodes, and connections.
#[derive(Debug, Default)]
pub struct OpenTable {
    handles: HashMap<HandleId, Handle>,
    counts: HashMap<Ino, u32>,
    /// Handles per (inode, generation).
    gens: HashMap<(Ino, u64), u32>,
    /// Handles opened for writing, per inode.
    writers: HashMap<Ino, u32>,
    /// Generations that are no longer current but still open.
    retired: HashSet<(Ino, u64)>,
    /// Retired generations whose last handle went: to remove.
    unpinned: Vec<(Ino, u64)>,
    /// Inodes of write handles dropped without a release (their
    /// connection's mount went away): to mark dirty, as a release would.
    dropped_writers: Vec<Ino>,
    /// Unlinked inodes a mount's kernel still references, with the
    /// connections (one per mount) that hold the references.
    refs: HashMap<Ino, Vec<ConnId>>,
    conns: HashMap<ConnId, Conn>,
}

/// What [`OpenTable::register`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Handles mountd still holds that were moved to the new connection or
    /// added.
    pub kept: usize,
    /// Handles of earlier connections of the mount that mountd no longer
    /// holds, dropped.
    pub dropped: usize,
    /// Inodes left without any handle by the drop.
    pub closed: Vec<Ino>,
    /// Kernel references of earlier connections of the mount that mountd
    /// still reports (moved to the new connection or added).
    pub refs_kept: usize,
    /// Kernel references of earlier connections that mountd no longer
    /// reports, dropped.
    pub refs_dropped: usize,
}

impl OpenTable {
    /// Start accepting handles for `conn`.
    pub fn connect(&mut self, conn: ConnId) {
        self.conns.insert(
            conn,
            Conn {
                live: true,
                mount: None,
            },
        );
    }

    /// Record `handle` on `ino` for `conn`. Returns false (and records
    /// nothing) if `conn` is no longer live: an open that finishes after
    /// its connection ended must not pin the inode.
    #[cfg(test)]
    pub fn add(&mut self, handle: HandleId, ino: Ino, conn: ConnId) -> bool {
        self.add_open(handle, ino, conn, 0, false)
    }

    /// Record `handle` on `ino` generation `generation` for `conn`, opened
    /// for writing if `write`. Returns false (and records nothing) if
    /// `conn` is no longer live: an open that finishes after its
    /// connection ended must not pin the inode.
    pub fn add_open(
        &mut self,
        handle: HandleId,
        ino: Ino,
        conn: ConnId,
        generation: u64,
        write: bool,
    ) -> bool {
        if !self.conns.get(&conn).is_some_and(|c| c.live) {
            return false;
        }
        self.insert(
            handle,
            Handle {
                ino,
                conn,
                generation,
                write,
                restored: false,
            },
        );
        true
    }

    fn insert(&mut self, handle: HandleId, h: Handle) {
        if let Some(old) = self.handles.insert(handle, h) {
            // Never happens (ids are unique); keep the counts right anyway.
            self.decrement(&old);
        }
        *self.counts.entry(h.ino).or_insert(0) += 1;
        *self.gens.entry((h.ino, h.generation)).or_insert(0) += 1;
        if h.write {
            *self.writers.entry(h.ino).or_insert(0) += 1;
        }
    }

    /// Forget `handle`. Returns its inode and how many handles that inode
    /// still has, or `None` for an unknown handle.
    pub fn remove(&mut self, handle: HandleId) -> Option<(Ino, u32)> {
        self.remove_open(handle).map(|(ino, left, _)| (ino, left))
    }

    /// [`OpenTable::remove`], also answering whether the handle may have
    /// written ([`OpenTable::may_write`]: opened for writing, or kept by
    /// mountd across a syncd restart, whose access mode is not known
    /// here; its release must version the file like a writer's).
    pub fn remove_open(&mut self, handle: HandleId) -> Option<(Ino, u32, bool)> {
        let h = self.handles.remove(&handle)?;
        let left = self.decrement(&h);
        self.forget_conn_if_done(h.conn);
        Some((h.ino, left, h.write || h.restored))
    }

    /// The inode and generation `handle` reads.
    pub fn version_of(&self, handle: HandleId) -> Option<(Ino, u64)> {
        self.handles.get(&handle).map(|h| (h.ino, h.generation))
    }

    /// Whether `handle` may write: opened for writing, or kept by mountd
    /// across a syncd restart (its access mode is not known here).
    pub fn may_write(&self, handle: HandleId) -> bool {
        self.handles
            .get(&handle)
            .is_some_and(|h| h.write || h.restored)
    }

    /// Whether a handle of `ino` may write.
    pub fn has_writer(&self, ino: Ino) -> bool {
        self.writers.contains_key(&ino)
    }

    /// How many content files of old generations are still kept: open, or
    /// waiting to be removed. None may be left for a clean stop to skip
    /// the next start-up scan (see `store::check`).
    pub fn old_generations_kept(&self) -> usize {
        self.retired.len() + self.unpinned.len()
    }

    /// Generation `generation` of `ino` is no longer current: answers true
    /// if no handle has it open (remove it now); else it is removed when
    /// its last handle goes ([`OpenTable::take_unpinned`]).
    pub fn retire(&mut self, ino: Ino, generation: u64) -> bool {
        if self.gens.contains_key(&(ino, generation)) {
            self.retired.insert((ino, generation));
            false
        } else {
            true
        }
    }

    /// Retired generations whose last handle went since the last call.
    pub fn take_unpinned(&mut self) -> Vec<(Ino, u64)> {
        std::mem::take(&mut self.unpinned)
    }

    /// Inodes of write handles dropped since the last call without a
    /// release (see [`OpenTable::disconnect`], [`OpenTable::register`]).
    pub fn take_dropped_writers(&mut self) -> Vec<Ino> {
        std::mem::take(&mut self.dropped_writers)
    }

    /// Set the generation of a handle (re-registered after a restart).
    pub fn set_generation(&mut self, handle: HandleId, generation: u64) {
        if let Some(h) = self.handles.get(&handle).copied() {
            self.decrement(&h);
            self.insert(handle, Handle { generation, ..h });
        }
    }

    /// The connection `conn` ended. Its handles are parked for its mount's
    /// next registration (see the module doc); a connection that never
    /// registered a mount has nobody to come back, so its handles are
    /// dropped. Returns how many handles the connection had and the inodes
    /// left without handles (only when they were dropped).
    pub fn disconnect(&mut self, conn: ConnId) -> (usize, Vec<Ino>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return (0, Vec::new());
        };
        c.live = false;
        let parks = c.mount.is_some();
        let mine = self.handles_on(|c| c == conn);
        let closed = if parks {
            Vec::new()
        } else {
            let mut closed = self.drop_handles(&mine);
            closed.extend(self.drop_refs(|c| c == conn));
            closed.sort_unstable();
            closed.dedup();
            closed.retain(|i| !self.held(*i));
            closed
        };
        self.forget_conn_if_done(conn);
        (mine.len(), closed)
    }

    /// The mount `key` registered on `conn`: settle the handles and kernel
    /// references of its earlier connections (see the module doc). With
    /// `fresh`, every handle and reference of an earlier connection of the
    /// same mountpoint is dropped; otherwise `held` lists the handles
    /// mountd still holds (and their inodes), and `referenced` the
    /// unlinked inodes its kernel still references, which are kept on
    /// `conn`, and the mount's other handles and references are dropped.
    pub fn register(
        &mut self,
        conn: ConnId,
        key: MountKey,
        fresh: bool,
        held: &[(HandleId, Ino)],
        referenced: &[Ino],
    ) -> Settled {
        let same_mount =
            |m: &MountKey| m.mountpoint == key.mountpoint && (fresh || m.pid == key.pid);
        let earlier: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(c, s)| **c != conn && s.mount.as_ref().is_some_and(same_mount))
            .map(|(c, _)| *c)
            .collect();
        for c in &earlier {
            if let Some(s) = self.conns.get_mut(c) {
                s.live = false;
            }
        }
        let theirs = self.handles_on(|c| earlier.contains(&c));
        let mut settled = Settled::default();
        if !fresh {
            for (h, ino) in held {
                match self.handles.get_mut(h) {
                    Some(x) if earlier.contains(&x.conn) || x.conn == conn => x.conn = conn,
                    Some(_) => continue,
                    None => self.insert(
                        *h,
                        Handle {
                            ino: *ino,
                            conn,
                            generation: 0,
                            write: false,
                            restored: true,
                        },
                    ),
                }
                settled.kept += 1;
            }
        }
        let gone: Vec<(HandleId, Ino)> = theirs
            .into_iter()
            .filter(|(h, _)| self.handles.get(h).is_some_and(|x| x.conn != conn))
            .collect();
        settled.dropped = gone.len();
        settled.closed = self.drop_handles(&gone);
        if !fresh {
            for ino in referenced {
                let holders = self.refs.entry(*ino).or_default();
                holders.retain(|c| !earlier.contains(c));
                if !holders.contains(&conn) {
                    holders.push(conn);
                }
                settled.refs_kept += 1;
            }
        }
        let before: usize = self.refs.values().map(Vec::len).sum();
        let unreferenced = self.drop_refs(|c| earlier.contains(&c));
        settled.refs_dropped = before - self.refs.values().map(Vec::len).sum::<usize>();
        settled.closed.extend(unreferenced);
        settled.closed.sort_unstable();
        settled.closed.dedup();
        settled.closed.retain(|i| !self.held(*i));
        for c in earlier {
            self.forget_conn_if_done(c);
        }
        if let Some(s) = self.conns.get_mut(&conn) {
            s.mount = Some(key);
        }
        settled
    }

    /// How many handles `ino` has.
    pub fn count(&self, ino: Ino) -> u32 {
        self.counts.get(&ino).copied().unwrap_or(0)
    }

    /// Whether a removal made on `conn` leaves its inode referenced by the
    /// kernel: `conn` is live and a mount registered on it.
    pub fn can_reference(&self, conn: Option<ConnId>) -> bool {
        conn.and_then(|c| self.conns.get(&c))
            .is_some_and(|c| c.live && c.mount.is_some())
    }

    /// The kernel of the mount on `conn` references unlinked `ino` (its
    /// last name was removed through `conn`; see the module doc). Call
    /// only when [`OpenTable::can_reference`] said so.
    pub fn reference(&mut self, ino: Ino, conn: ConnId) {
        let holders = self.refs.entry(ino).or_default();
        if !holders.contains(&conn) {
            holders.push(conn);
        }
    }

    /// mountd on `conn` says its kernel no longer references `ino`. Returns
    /// true when that ended the reference and `ino` is now neither open
    /// nor referenced (free it if it is an orphan).
    pub fn forget(&mut self, ino: Ino, conn: ConnId) -> bool {
        let Some(holders) = self.refs.get_mut(&ino) else {
            return false;
        };
        let before = holders.len();
        holders.retain(|c| *c != conn);
        if holders.len() == before {
            return false;
        }
        if holders.is_empty() {
            self.refs.remove(&ino);
        }
        let done = !self.held(ino);
        self.forget_conn_if_done(conn);
        done
    }

    /// Whether `ino` is open or referenced by a kernel: an orphan in that
    /// state must be kept.
    pub fn held(&self, ino: Ino) -> bool {
        self.count(ino) > 0 || self.refs.contains_key(&ino)
    }

    /// How many unlinked inodes the kernels of connected mounts reference.
    #[cfg(test)]
    pub fn kernel_refs(&self) -> usize {
        self.refs.len()
    }

    /// How many handles `conn` has.
    pub fn handles_of(&self, conn: ConnId) -> u64 {
        self.handles.values().filter(|h| h.conn == conn).count() as u64
    }

    fn handles_on(&self, pick: impl Fn(ConnId) -> bool) -> Vec<(HandleId, Ino)> {
        self.handles
            .iter()
            .filter(|(_, h)| pick(h.conn))
            .map(|(id, h)| (*id, h.ino))
            .collect()
    }

    /// Remove `gone`; returns the inodes left with no handle.
    fn drop_handles(&mut self, gone: &[(HandleId, Ino)]) -> Vec<Ino> {
        let mut closed = Vec::new();
        for (id, _) in gone {
            if let Some(h) = self.handles.remove(id) {
                if h.write {
                    self.dropped_writers.push(h.ino);
                }
                if self.decrement(&h) == 0 {
                    closed.push(h.ino);
                }
            }
        }
        closed
    }

    /// Drop the kernel references held by the connections `pick` picks;
    /// returns the inodes left neither referenced nor open.
    fn drop_refs(&mut self, pick: impl Fn(ConnId) -> bool) -> Vec<Ino> {
        let mut unheld = Vec::new();
        self.refs.retain(|ino, holders| {
            holders.retain(|c| !pick(*c));
            if holders.is_empty() {
                unheld.push(*ino);
                false
            } else {
                true
            }
        });
        unheld.retain(|i| self.count(*i) == 0);
        unheld
    }

    /// Drop the record of a connection that ended and has no handle or
    /// kernel reference left.
    fn forget_conn_if_done(&mut self, conn: ConnId) {
        if self.conns.get(&conn).is_some_and(|c| !c.live)
            && !self.handles.values().any(|h| h.conn == conn)
            && !self.refs.values().any(|h| h.contains(&conn))
        {
            self.conns.remove(&conn);
        }
    }

    fn decrement(&mut self, h: &Handle) -> u32 {
        let key = (h.ino, h.generation);
        match self.gens.get_mut(&key) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                self.gens.remove(&key);
                if self.retired.remove(&key) {
                    self.unpinned.push(key);
                }
            }
        }
        if h.write {
            match self.writers.get_mut(&h.ino) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.writers.remove(&h.ino);
                }
            }
        }
        let ino = h.ino;
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

    fn key(pid: u32) -> MountKey {
        MountKey {
            mountpoint: "/mnt".into(),
            pid,
        }
    }

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
        // Neither registered a mount: nobody can come back for them.
        let (had, mut closed) = t.disconnect(a);
        closed.sort();
        assert_eq!((had, closed), (2, vec![Ino(5), Ino(6)]));
        assert_eq!(t.count(Ino(5)), 0);
        assert!(!t.add(HandleId(4), Ino(5), a), "gone connection");
    }

    #[test]
    fn a_reconnect_keeps_exactly_the_handles_mountd_holds() {
        let mut t = OpenTable::default();
        let (old, new) = (ConnId(1), ConnId(2));
        t.connect(old);
        t.register(old, key(7), true, &[], &[]);
        for h in 1..=4 {
            assert!(t.add(HandleId(h), Ino(10 + h % 2), old));
        }
        // The connection drops: handles are parked, not dropped.
        assert_eq!(t.disconnect(old), (4, Vec::new()));
        assert_eq!(t.count(Ino(10)), 2);
        assert!(!t.add(HandleId(9), Ino(10), old), "parked, not live");
        // mountd still holds 1 and 3 (ino 11), and 5, which this syncd
        // never saw (opened before a restart).
        t.connect(new);
        let s = t.register(
            new,
            key(7),
            false,
            &[
                (HandleId(1), Ino(11)),
                (HandleId(3), Ino(11)),
                (HandleId(5), Ino(12)),
            ],
            &[],
        );
        assert_eq!((s.kept, s.dropped, s.closed), (3, 2, vec![Ino(10)]));
        assert_eq!(t.count(Ino(10)), 0);
        assert_eq!(t.count(Ino(11)), 2);
        assert_eq!(t.count(Ino(12)), 1);
        assert_eq!(t.handles_of(new), 3);
        assert_eq!(t.remove(HandleId(5)), Some((Ino(12), 0)));
        assert!(!t.conns.contains_key(&old), "the old connection is settled");
    }

    #[test]
    fn registering_ends_the_old_connection_even_before_it_closes() {
        let mut t = OpenTable::default();
        let (old, new) = (ConnId(1), ConnId(2));
        t.connect(old);
        t.register(old, key(7), true, &[], &[]);
        assert!(t.add(HandleId(1), Ino(5), old));
        // mountd reconnected before syncd noticed the old connection end.
        t.connect(new);
        let s = t.register(new, key(7), false, &[], &[]);
        assert_eq!(s.closed, vec![Ino(5)]);
        assert!(
            !t.add(HandleId(2), Ino(5), old),
            "a late open on the old one"
        );
        assert_eq!(t.disconnect(old), (0, Vec::new()));
        assert_eq!(t.count(Ino(5)), 0);
        assert!(!t.conns.contains_key(&old), "settled and ended: forgotten");
    }

    #[test]
    fn a_fresh_mount_drops_what_the_dead_mountd_held_and_spares_other_mounts() {
        let mut t = OpenTable::default();
        let (dead, other, fresh) = (ConnId(1), ConnId(2), ConnId(3));
        t.connect(dead);
        t.register(dead, key(7), true, &[], &[]);
        t.connect(other);
        t.register(
            other,
            MountKey {
                mountpoint: "/elsewhere".into(),
                pid: 8,
            },
            true,
            &[],
            &[],
        );
        assert!(t.add(HandleId(1), Ino(5), dead));
        assert!(t.add(HandleId(2), Ino(5), other));
        t.disconnect(dead);
        t.connect(fresh);
        let s = t.register(fresh, key(9), true, &[(HandleId(1), Ino(5))], &[]);
        assert_eq!((s.kept, s.dropped), (0, 1), "a fresh mount holds nothing");
        assert_eq!(t.count(Ino(5)), 1, "the other mount's handle stays");
    }

    #[test]
    fn kernel_references_follow_forget_and_registration() {
        let mut t = OpenTable::default();
        let (old, new, bare) = (ConnId(1), ConnId(2), ConnId(3));
        t.connect(bare);
        assert!(!t.can_reference(Some(bare)), "no mount registered");
        assert!(!t.can_reference(None));
        t.connect(old);
        t.register(old, key(7), true, &[], &[]);
        assert!(t.can_reference(Some(old)));
        for i in [5, 6, 7] {
            t.reference(Ino(i), old);
        }
        assert!(t.add(HandleId(1), Ino(6), old));
        assert!(t.held(Ino(5)));
        // A forget on another connection is not this mount's.
        assert!(!t.forget(Ino(5), bare));
        assert!(t.forget(Ino(5), old), "referenced no more, not open");
        assert!(!t.held(Ino(5)));
        assert!(!t.forget(Ino(5), old), "forgotten twice");
        assert!(!t.forget(Ino(6), old), "the reference ends; still open");
        assert!(t.held(Ino(6)));
        t.reference(Ino(8), old);
        // The connection drops: references are parked with the handles.
        t.disconnect(old);
        assert!(t.held(Ino(7)));
        // The reconnect reports 7 (and 9, after a syncd restart) as still
        // referenced, not 8; 6 only as open.
        t.connect(new);
        let s = t.register(
            new,
            key(7),
            false,
            &[(HandleId(1), Ino(6))],
            &[Ino(7), Ino(9)],
        );
        assert_eq!((s.refs_kept, s.refs_dropped), (2, 1));
        assert_eq!(s.closed, vec![Ino(8)], "6 is open, 7 and 9 referenced");
        assert!(t.held(Ino(9)));
        assert!(t.forget(Ino(7), new));
        // A fresh mount of the mountpoint drops what is left.
        let fresh = ConnId(4);
        t.connect(fresh);
        t.disconnect(new);
        let s = t.register(fresh, key(8), true, &[], &[]);
        assert_eq!(s.closed, vec![Ino(6), Ino(9)]);
        assert!(!t.held(Ino(9)) && !t.held(Ino(6)));
        assert_eq!(t.kernel_refs(), 0);
        // A connection without a mount keeps nothing when it ends.
        t.reference(Ino(11), bare);
        assert_eq!(t.disconnect(bare), (0, vec![Ino(11)]));
    }

    #[test]
    fn retired_generations_are_unpinned_by_their_last_handle() {
        let mut t = OpenTable::default();
        let c = ConnId(1);
        t.connect(c);
        assert!(t.add_open(HandleId(1), Ino(5), c, 0, false));
        assert!(t.add_open(HandleId(2), Ino(5), c, 0, true));
        assert!(t.has_writer(Ino(5)));
        assert_eq!(t.version_of(HandleId(2)), Some((Ino(5), 0)));
        assert!(t.retire(Ino(5), 3), "generation 3 is not open");
        assert!(!t.retire(Ino(5), 0), "generation 0 is open");
        assert!(t.add_open(HandleId(3), Ino(5), c, 1, false));
        assert_eq!(t.remove_open(HandleId(2)), Some((Ino(5), 2, true)));
        assert!(!t.has_writer(Ino(5)));
        assert!(t.take_unpinned().is_empty(), "handle 1 still reads it");
        t.remove(HandleId(1));
        assert_eq!(t.take_unpinned(), vec![(Ino(5), 0)]);
        assert!(t.take_unpinned().is_empty());
        // A disconnect without a mount drops handles the same way, and
        // reports the writers it dropped.
        assert!(!t.retire(Ino(5), 1));
        assert!(t.add_open(HandleId(4), Ino(6), c, 0, true));
        assert!(t.take_dropped_writers().is_empty(), "a release is no drop");
        t.disconnect(c);
        assert_eq!(t.take_unpinned(), vec![(Ino(5), 1)]);
        assert_eq!(t.take_dropped_writers(), vec![Ino(6)]);
        assert_eq!(t.count(Ino(5)), 0);
    }

    #[test]
    fn a_handle_may_write_if_opened_for_writing_or_kept_across_a_restart() {
        let mut t = OpenTable::default();
        let c = ConnId(1);
        t.connect(c);
        assert!(t.add_open(HandleId(1), Ino(5), c, 0, false));
        assert!(t.add_open(HandleId(2), Ino(5), c, 0, true));
        assert!(!t.may_write(HandleId(1)), "opened for reading");
        assert!(t.may_write(HandleId(2)), "opened for writing");
        assert!(!t.may_write(HandleId(9)), "unknown");
        // After a syncd restart mountd reports a handle whose access mode
        // this table never saw: it may write.
        let mut fresh = OpenTable::default();
        fresh.connect(c);
        fresh.register(c, key(7), false, &[(HandleId(3), Ino(5))], &[]);
        assert_eq!(fresh.version_of(HandleId(3)), Some((Ino(5), 0)));
        assert!(fresh.may_write(HandleId(3)), "kept across a restart");
        // Its release versions the file like a writer's.
        assert_eq!(fresh.remove_open(HandleId(3)), Some((Ino(5), 0, true)));
        assert_eq!(t.remove_open(HandleId(1)), Some((Ino(5), 1, false)));
    }

    #[test]
    fn handle_ids_carry_the_epoch() {
        set_handle_epoch(3);
        let a = next_handle();
        let b = next_handle();
        assert_eq!(a.0 >> COUNTER_BITS, 3);
        assert_ne!(a, b);
        set_handle_epoch(4);
        assert_eq!(next_handle().0 >> COUNTER_BITS, 4);
    }
}
