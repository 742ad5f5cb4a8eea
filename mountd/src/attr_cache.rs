//! The last known attributes and directory entries, for answers when
//! syncd misses the deadline, for the extended-attribute shortcut, and
//! for inodes the kernel still holds after they were removed.
//!
//! The kernel already caches attributes and entries for `--attr-ttl`; this
//! cache is not consulted on the normal path of `getattr` and `lookup`.
//! When syncd does not answer a `getattr` or `lookup` in time, mountd
//! answers with what it saw last (which is what a local disk would have
//! said a moment ago) instead of an error, so `stat` and `ls -l` keep
//! working while syncd is stalled. `getxattr`/`listxattr` of an inode
//! whose last known attributes say it has none are answered here too.
//!
//! Size is bounded with two generations: entries go into the young
//! generation; when it holds half the capacity, the old generation is
//! dropped and the young one becomes old. A hit in the old generation is
//! moved back to the young one. That approximates LRU with O(1) work and
//! no per-entry bookkeeping.
//!
//! # Never back in time
//!
//! Replies cross: a `getattr` sent before a `setxattr` can come back after
//! it, carrying `has_xattrs: false`, and caching it would hide the new
//! attribute (the shortcut would answer ENODATA). So every request takes a
//! [`Ticket`] (the cache's change counter) before it is sent, and every
//! change made through this mount (`setattr`, `setxattr`, `link`, ...)
//! bumps the counter for its inodes when its answer arrives
//! ([`AttrCache::changed`]). A reply is cached only if no change of that
//! inode completed after its request was sent. This is sound because
//! syncd answers a change only after it is applied, and a request sent
//! after that answer is served after it: an accepted reply saw every
//! completed change. A rejected reply may be newer than the cache, but
//! only changes made through this mount are counted (every change is, with
//! no peers yet), so after a change completes the cache holds that
//! change's own answer, or a reply to a request sent after it, or (when
//! two changes crossed) nothing; `setxattr` only ever sets the mark. The
//! counter per inode is remembered for [`CHANGE_MEMORY`], longer than any
//! request can wait. syncd keeps no version of its own for this: with one
//! writer (this mount) the order of completion here is the order that
//! matters; peers will bring versions from syncd.
//!
//! # Removed inodes the kernel still holds
//!
//! The kernel keeps a lookup count per inode it was told about (every
//! entry reply: `lookup`, `create`, `mkdir`, `readdirplus`, ...) and sends
//! `forget` when it drops it. The cache mirrors those counts, and keeps
//! the last attributes of every such *directory* outside the bounded
//! generations ([`AttrCache::looked_up`], [`AttrCache::forget`]). Inode
//! numbers are never reused, so when syncd says an inode the kernel still
//! asks about does not exist, it was removed while referenced (an
//! `O_PATH` descriptor, an open or working directory that was removed):
//! mountd then answers `getattr` with its last attributes and `nlink` 0,
//! as a local disk would ([`AttrCache::removed`]): a directory's from that
//! map, any other inode's from the bounded generations while they hold
//! it. They are the last attributes mountd saw, so a removed file's size
//! is the one it had when last seen.
//!
//! Only directories keep their attributes beside the count because the
//! kernel may hold every inode of a huge tree (after `ls -l` of 100,000
//! files it held all of them), and a full copy of the attributes of each
//! was most of mountd's memory there (about 140 bytes per inode, on top
//! of the bounded generations); a count is 8 bytes ([`crate::held`]). For other inodes the
//! copy was a fallback only (see below).
//!
//! These counts also decide how long syncd keeps an unlinked inode: when
//! one reaches zero mountd tells syncd (`forget`, queued in
//! [`crate::releases`]), and a reconnect lists the inodes whose count is
//! above zero ([`AttrCache::referenced_inos`]). syncd keeps a removed
//! non-directory while the kernel references it, so for those this cache's
//! attributes are only a fallback; for removed directories they are the
//! answer.
//!
//! One `Mutex` guards everything; it is held only for map operations.

use crate::held::{Held, HeldMap, Xattrs};
use crate::known_dirs::KnownDirs;
use ipc_schema::{Attr, FileKind, Ino};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the completion of a change is remembered: longer than any
/// request to syncd can wait for its answer.
pub const CHANGE_MEMORY: Duration = Duration::from_secs(120);
/// Remembered changes kept before old ones are pruned.
const CHANGES_BEFORE_PRUNE: usize = 4096;
/// Announced peer changes are remembered this long: longer than any
/// request can wait for its answer, so no ticket older than a forgotten
/// announcement is still in use ([`AttrCache::peer_changed_since`]).
const PEER_CHANGE_MEMORY: Duration = CHANGE_MEMORY;

/// Directories' attributes from change answers kept for a `getattr`
/// before they are all dropped (only one of them is usually waited for).
const FRESH_KEPT: usize = 1024;

/// How long the names an entry was given under are remembered: longer
/// than the kernel takes from reading an entry reply to making the inode
/// it names, even on a loaded machine ([`AttrCache::names_given_lately`]).
pub const GIVEN_MEMORY: Duration = Duration::from_secs(5);
/// Inodes in `given` below which it is never pruned.
const GIVEN_PRUNE_MIN: usize = 4096;
/// Names remembered per inode (hard links) in `given`.
const GIVEN_PER_INODE: usize = 4;

/// Default number of attributes (and, separately, entries) remembered.
/// A remembered attribute costs about 130 bytes in each generation, an
/// entry about 80; the kernel's own cache holds many more, and what must
/// reach every inode it holds (the xattr knowledge, the lookup counts)
/// is kept per held inode instead, in 8 bytes ([`crate::held`]).
pub const DEFAULT_CAPACITY: usize = 16_384;

struct TwoGen<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    half: usize,
}

impl<K: Hash + Eq, V: Clone> TwoGen<K, V> {
    fn new(capacity: usize) -> Self {
        TwoGen {
            young: HashMap::new(),
            old: HashMap::new(),
            half: (capacity / 2).max(1),
        }
    }

    fn put(&mut self, k: K, v: V) {
        if self.young.len() >= self.half && !self.young.contains_key(&k) {
            self.old = std::mem::take(&mut self.young);
        }
        self.old.remove(&k);
        self.young.insert(k, v);
    }

    fn get(&mut self, k: &K) -> Option<V>
    where
        K: Clone,
    {
        if let Some(v) = self.young.get(k) {
            return Some(v.clone());
        }
        let v = self.old.remove(k)?;
        self.put(k.clone(), v.clone());
        Some(v)
    }

    fn remove(&mut self, k: &K) {
        self.young.remove(k);
        self.old.remove(k);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

struct Maps {
    attrs: TwoGen<u64, Attr>,
    entries: TwoGen<(u64, Vec<u8>), u64>,
    /// Inode → the counter value when its last change completed, and when.
    changed: HashMap<u64, (u64, Instant)>,
    /// Inodes the kernel holds: its lookup count, and whether the inode
    /// has extended attributes ([`crate::held`]).
    referenced: HeldMap,
    /// The last attributes of the directories in `referenced`.
    held_dirs: HashMap<u64, Attr>,
    /// Replies to requests sent before this counter value are not kept
    /// for any inode (set when everything was dropped, [`AttrCache::clear`]).
    floor: u64,
    /// Inode → the counter value and time of the last announcement of a
    /// peer's change of it ([`AttrCache::invalidate`]); see
    /// [`AttrCache::peer_changed_since`].
    peer_changed: HashMap<u64, (u64, Instant)>,
    /// Directories whose attributes came in the answer of a change of
    /// their names made through this mount, and may answer the kernel's
    /// next `getattr` of them ([`AttrCache::take_fresh`]).
    fresh: HashMap<u64, Attr>,
    /// Inode → the names (parent, name) entries for it were given under
    /// lately, and when ([`AttrCache::names_given_lately`]).
    given: HashMap<u64, Vec<(u64, Vec<u8>, Instant)>>,
    /// `given` is pruned when it holds more inodes than this.
    given_prune_at: usize,
}

impl Maps {
    /// Whether a reply to a request sent at `since` may be cached for `ino`.
    fn current(&self, since: Ticket, ino: u64) -> bool {
        since.0 >= self.floor && self.changed.get(&ino).is_none_or(|(c, _)| *c <= since.0)
    }

    fn store(&mut self, attr: &Attr) {
        self.attrs.put(attr.ino.0, *attr);
        self.referenced
            .update(attr.ino.0, |h| h.set_xattrs(Xattrs::of(attr)));
        if let Some(a) = self.held_dirs.get_mut(&attr.ino.0) {
            *a = *attr;
        }
    }

    /// Forget the attributes of `ino` (a reply that may be stale, a
    /// change elsewhere), also what is known of its extended attributes.
    fn drop_attr(&mut self, ino: u64) {
        self.attrs.remove(&ino);
        self.referenced
            .update(ino, |h| h.set_xattrs(Xattrs::Unknown));
    }
}

/// The cache's change counter when a request was sent (see the module
/// doc): take it before sending.
/// `Ticket::default()` is the oldest (before every change).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// Last known attributes per inode and `(parent, name) → inode` entries.
pub struct AttrCache {
    maps: Mutex<Maps>,
    counter: AtomicU64,
    /// Directories whose every name is known; announcements drop them
    /// here too ([`AttrCache::invalidate`], [`AttrCache::clear`]). Its
    /// lock is never taken while `maps` is held.
    pub known: KnownDirs,
}

impl AttrCache {
    /// A cache remembering at most `capacity` attributes and as many entries.
    pub fn new(capacity: usize) -> Self {
        AttrCache {
            maps: Mutex::new(Maps {
                attrs: TwoGen::new(capacity),
                entries: TwoGen::new(capacity),
                changed: HashMap::new(),
                referenced: HeldMap::default(),
                held_dirs: HashMap::new(),
                floor: 0,
                peer_changed: HashMap::new(),
                fresh: HashMap::new(),
                given: HashMap::new(),
                given_prune_at: GIVEN_PRUNE_MIN,
            }),
            counter: AtomicU64::new(0),
            known: KnownDirs::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Maps) -> T) -> T {
        // A panic while holding the lock leaves plain maps behind, which
        // are still consistent: keep using them.
        let mut g = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// The ticket of a request about to be sent.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.counter.load(Ordering::SeqCst))
    }

    /// Remember `attr`, the answer to a request sent at `since`, as the
    /// latest attributes of its inode, unless a change of that inode
    /// completed after `since`. Returns whether it was kept.
    pub fn put_attr(&self, since: Ticket, attr: &Attr) -> bool {
        self.with(|m| {
            let ok = m.current(since, attr.ino.0);
            if ok {
                m.store(attr);
            }
            ok
        })
    }

    /// A change of `ino`, sent at `since`, completed; `reply` is the
    /// inode's attributes in its answer, if it has them. The reply is kept
    /// unless another change of `ino` completed after `since` (then the
    /// cached attributes, older than this change, are dropped).
    pub fn changed(&self, since: Ticket, ino: u64, reply: Option<&Attr>) {
        self.with(|m| {
            self.change_completed(m, since, ino, reply);
        });
    }

    /// [`AttrCache::changed`] under the lock; returns whether `reply` was
    /// kept.
    fn change_completed(
        &self,
        m: &mut Maps,
        since: Ticket,
        ino: u64,
        reply: Option<&Attr>,
    ) -> bool {
        let ok = m.current(since, ino);
        match reply {
            Some(a) if ok => m.store(a),
            Some(_) => m.drop_attr(ino),
            None => {}
        }
        self.note_change(m, ino);
        ok
    }

    /// A change of the names of directory `dir`, sent at `since`,
    /// completed; `reply` is the directory's attributes its answer carried
    /// (read by syncd right after the change). As [`AttrCache::changed`];
    /// besides, when they are kept, they answer the next `getattr` of
    /// `dir` once ([`AttrCache::take_fresh`]).
    ///
    /// The kernel drops a directory's attributes after every change of
    /// its names and asks for them again before the next lookup in it
    /// (its permission check needs them), so each `create`, `unlink`,
    /// `mkdir`, ... would cost a second call to syncd. Answering from the
    /// reply is as current as asking: nothing changed `dir` since, or the
    /// entry would be gone (every change of it through this mount, every
    /// announcement of another mount's or a peer's, and everything
    /// dropped at once remove it), and crossing replies of concurrent
    /// changes keep nothing ([`Maps::current`]). Once only, so that the
    /// shortcut never answers twice what it answered once.
    pub fn dir_changed(&self, since: Ticket, dir: u64, reply: Option<&Attr>) {
        self.with(|m| {
            let ok = self.change_completed(m, since, dir, reply);
            if let Some(a) = reply.filter(|a| ok && a.ino.0 == dir) {
                if m.fresh.len() >= FRESH_KEPT {
                    m.fresh.clear();
                }
                m.fresh.insert(dir, *a);
            }
        });
    }

    /// The attributes of `ino` a change of its names answered, if nothing
    /// changed it since and no `getattr` took them yet
    /// ([`AttrCache::dir_changed`]).
    pub fn take_fresh(&self, ino: u64) -> Option<Attr> {
        self.with(|m| m.fresh.remove(&ino))
    }

    /// A `setxattr` of `ino` completed: the inode has an extended
    /// attribute now (kept even if replies cross: the mark only makes
    /// mountd ask syncd).
    pub fn set_xattr_done(&self, ino: u64) {
        self.with(|m| {
            if let Some(mut a) = m.attrs.get(&ino) {
                a.has_xattrs = true;
                m.attrs.put(ino, a);
            }
            m.referenced.update(ino, |h| h.set_xattrs(Xattrs::Some));
            if let Some(a) = m.held_dirs.get_mut(&ino) {
                a.has_xattrs = true;
            }
            self.note_change(m, ino);
        });
    }

    fn note_change(&self, m: &mut Maps, ino: u64) {
        m.fresh.remove(&ino);
        let now = Instant::now();
        let c = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
        m.changed.insert(ino, (c, now));
        if m.changed.len() > CHANGES_BEFORE_PRUNE {
            m.changed
                .retain(|_, (_, at)| now.duration_since(*at) < CHANGE_MEMORY);
        }
    }

    /// `ino` changed elsewhere (a peer's change syncd applied): forget its
    /// attributes, and keep no reply to a request sent before now.
    pub fn invalidate(&self, ino: u64) {
        self.known.unsure(ino);
        self.with(|m| {
            m.drop_attr(ino);
            self.note_change(m, ino);
            let now = Instant::now();
            let c = m.changed.get(&ino).map_or(0, |(c, _)| *c);
            m.peer_changed.insert(ino, (c, now));
            if m.peer_changed.len() > CHANGES_BEFORE_PRUNE {
                m.peer_changed
                    .retain(|_, (_, at)| now.duration_since(*at) < PEER_CHANGE_MEMORY);
            }
        });
    }

    /// Anything may have changed elsewhere: forget every attribute and
    /// entry, and keep no reply to a request sent before now. The kernel's
    /// lookup counts stay (they are the kernel's, not a cache).
    pub fn clear(&self) {
        self.known.clear();
        self.with(|m| {
            m.attrs = TwoGen::new(m.attrs.half * 2);
            m.entries = TwoGen::new(m.entries.half * 2);
            m.referenced.set_all_xattrs(Xattrs::Unknown);
            m.floor = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
            m.fresh.clear();
        });
    }

    /// Whether a peer's change of `ino` was announced (or everything was
    /// dropped) after the request answered at ticket `since` was sent.
    /// Such a reply may carry attributes syncd read before it applied the
    /// change, and reach the kernel after the announcement invalidated the
    /// kernel's copy (or before the kernel knew the inode, which makes
    /// the notification a no-op): the kernel would then keep the old
    /// attributes for a whole TTL. So such a reply goes out with TTL 0
    /// (the kernel asks again), and a `stat` on this machine sees a peer's
    /// change as soon as syncd has applied it. Replies to requests sent
    /// after the announcement keep the full TTL: they saw the change.
    pub fn peer_changed_since(&self, since: Ticket, ino: u64) -> bool {
        self.with(|m| {
            m.floor > since.0 || m.peer_changed.get(&ino).is_some_and(|(c, _)| *c > since.0)
        })
    }

    /// The last known attributes of `ino`.
    pub fn attr(&self, ino: u64) -> Option<Attr> {
        self.with(|m| m.attrs.get(&ino))
    }

    /// Whether `ino` is known to have no extended attribute at all: its
    /// last known attributes say so, or, for an inode the kernel holds
    /// whose attributes left the bounded generations, the last ones stored
    /// while it was held did and nothing changed it since.
    pub fn known_without_xattrs(&self, ino: u64) -> bool {
        self.with(|m| match m.attrs.get(&ino) {
            Some(a) => !a.has_xattrs,
            None => m
                .referenced
                .get(ino)
                .is_some_and(|h| h.xattrs() == Xattrs::None),
        })
    }

    /// The kernel was given an entry for `attr.ino` (its lookup count grew
    /// by one), from the answer to a request sent at `since`. Returns true
    /// if the kernel did not reference the inode before (the count was
    /// zero).
    pub fn looked_up(&self, attr: &Attr, since: Ticket) -> bool {
        self.with(|m| {
            let ino = attr.ino.0;
            // The same rule as for storing attributes: `attr` counts only
            // if nothing changed the inode after its request was sent;
            // else what the generations hold (kept under that rule).
            let known = if m.current(since, ino) {
                Some(*attr)
            } else {
                m.attrs.get(&ino)
            };
            let xattrs = known.as_ref().map_or(Xattrs::Unknown, Xattrs::of);
            let mut held = m.referenced.get(ino).unwrap_or(Held::new(xattrs));
            held.set_xattrs(xattrs);
            held.set_count(held.count() + 1);
            m.referenced.put(ino, held);
            let first = held.count() == 1;
            if first && attr.kind == FileKind::Directory {
                m.held_dirs.insert(ino, known.unwrap_or(*attr));
            }
            first
        })
    }

    /// The kernel dropped `n` lookups of `ino`. Returns true if that
    /// brought its count to zero (the kernel references it no more).
    pub fn forget(&self, ino: u64, n: u64) -> bool {
        self.with(|m| {
            let Some(mut held) = m.referenced.get(ino) else {
                return false;
            };
            held.set_count(held.count().saturating_sub(n));
            if held.count() == 0 {
                m.referenced.remove(ino);
                m.held_dirs.remove(&ino);
                return true;
            }
            m.referenced.put(ino, held);
            false
        })
    }

    /// Every inode the kernel references now (lookup count above zero),
    /// for a reconnect's `register_mount`.
    pub fn referenced_inos(&self) -> Vec<Ino> {
        self.with(|m| m.referenced.inos().map(Ino).collect())
    }

    /// The attributes to answer for `ino`, which syncd says does not exist:
    /// its last known ones with `nlink` 0 if the kernel still holds it (a
    /// directory's are kept while it does, another inode's only while the
    /// bounded generations hold them).
    pub fn removed(&self, ino: u64) -> Option<Attr> {
        self.with(|m| {
            if !m.referenced.contains(ino) {
                return None;
            }
            let last = match m.held_dirs.get(&ino) {
                Some(a) => Some(*a),
                None => m.attrs.get(&ino),
            };
            last.map(|a| Attr { nlink: 0, ..a })
        })
    }

    /// How many inodes the kernel holds, as far as mountd counted.
    #[cfg(test)]
    pub fn referenced(&self) -> usize {
        self.with(|m| m.referenced.len())
    }

    /// Remember that `parent/name` is `attr.ino`, with these attributes
    /// (the answer to a request sent at `since`; see [`AttrCache::put_attr`]).
    ///
    /// The name is also remembered for [`GIVEN_MEMORY`] as one the kernel
    /// may be making an inode for ([`AttrCache::names_given_lately`]): call
    /// this before the entry goes to the kernel.
    pub fn put_entry(&self, since: Ticket, parent: u64, name: &[u8], attr: &Attr) {
        self.with(|m| {
            if attr.kind != FileKind::Directory {
                Self::note_given(m, parent, name, attr.ino.0);
            }
            m.entries.put((parent, name.to_vec()), attr.ino.0);
            if m.current(since, attr.ino.0) {
                m.store(attr);
            }
        });
    }

    fn note_given(m: &mut Maps, parent: u64, name: &[u8], ino: u64) {
        let now = Instant::now();
        if m.given.len() >= m.given_prune_at {
            m.given.retain(|_, names| {
                names.retain(|(_, _, at)| now.duration_since(*at) < GIVEN_MEMORY);
                !names.is_empty()
            });
            // Pruned again only after it doubled: O(1) per entry given,
            // also while a large listing fills it.
            m.given_prune_at = (m.given.len() * 2).max(GIVEN_PRUNE_MIN);
        }
        // Most inodes are given under one name: no room for four.
        let names = m.given.entry(ino).or_insert_with(|| Vec::with_capacity(1));
        names.retain(|(p, n, _)| !(*p == parent && n == name));
        if names.len() >= GIVEN_PER_INODE {
            names.remove(0);
        }
        names.push((parent, name.to_vec(), now));
    }

    /// The names entries for `ino` were given under in the last
    /// [`GIVEN_MEMORY`].
    ///
    /// An announcement of a peer's change of `ino` drops the kernel's
    /// attributes of it (`inval_inode`), but the kernel can only drop them
    /// from an inode it has: an entry reply it has read but not yet made
    /// the inode of (a lookup or `readdirplus` of a name new to it) makes
    /// the inode afterwards, with the reply's older attributes, for the
    /// whole TTL. The kernel orders an `inval_entry` of the name after
    /// such a lookup (both take the directory's lock), so the invalidation
    /// stream drops these names too ([`crate::inval`]), and the next
    /// access looks the name up again. Directories are left out: dropping
    /// a directory's entry would also detach whatever is mounted on it,
    /// and a change of a directory's own attributes is rare; they keep the
    /// (documented) window.
    pub fn names_given_lately(&self, ino: u64) -> Vec<(u64, Vec<u8>)> {
        let now = Instant::now();
        self.with(|m| {
            m.given.get(&ino).map_or_else(Vec::new, |names| {
                names
                    .iter()
                    .filter(|(_, _, at)| now.duration_since(*at) < GIVEN_MEMORY)
                    .map(|(p, n, _)| (*p, n.clone()))
                    .collect()
            })
        })
    }

    /// The inode `parent/name` named when last seen.
    pub fn entry_ino(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.with(|m| m.entries.get(&(parent, name.to_vec())))
    }

    /// The last known attributes of what `parent/name` named.
    pub fn entry(&self, parent: u64, name: &[u8]) -> Option<Attr> {
        self.with(|m| {
            let ino = m.entries.get(&(parent, name.to_vec()))?;
            m.attrs.get(&ino)
        })
    }

    /// Forget `parent/name` (it was removed or renamed, or syncd said
    /// ENOENT).
    pub fn forget_entry(&self, parent: u64, name: &[u8]) {
        self.with(|m| m.entries.remove(&(parent, name.to_vec())));
    }

    /// How many attributes and entries are remembered.
    #[cfg(test)]
    pub fn len(&self) -> (usize, usize) {
        self.with(|m| (m.attrs.len(), m.entries.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidate_drops_attributes_and_replies_sent_before() {
        let c = AttrCache::new(16);
        let t = c.ticket();
        assert!(c.put_attr(t, &attr(3)));
        let before = c.ticket();
        c.invalidate(3);
        assert_eq!(c.attr(3), None);
        assert!(
            !c.put_attr(before, &attr(3)),
            "a reply sent before the change"
        );
        assert!(c.put_attr(c.ticket(), &attr(3)), "a reply sent after it");
        assert!(
            c.put_attr(before, &attr(4)),
            "other inodes are not affected"
        );
    }

    #[test]
    fn clear_drops_everything_but_the_kernels_counts() {
        let c = AttrCache::new(16);
        let t = c.ticket();
        c.put_entry(t, 1, b"a", &attr(3));
        c.put_attr(t, &attr(4));
        assert!(c.looked_up(&attr(3), c.ticket()));
        c.clear();
        assert_eq!(c.len(), (0, 0));
        assert_eq!(c.entry(1, b"a"), None);
        assert_eq!(c.referenced(), 1, "lookup counts stay");
        assert!(!c.put_attr(t, &attr(5)), "no reply sent before the clear");
        assert!(c.put_attr(c.ticket(), &attr(5)));
    }
    use ipc_schema::Timestamp;

    fn attr(ino: u64) -> Attr {
        Attr {
            ino: Ino(ino),
            kind: FileKind::File,
            size: ino,
            blocks: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            crtime: Timestamp::default(),
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            blksize: 4096,
            rdev: 0,
            has_xattrs: false,
        }
    }

    #[test]
    fn a_change_answers_its_directorys_next_getattr_once_unless_it_changed_since() {
        let c = AttrCache::new(16);
        // Answered once, and kept as the last known attributes.
        c.dir_changed(c.ticket(), 1, Some(&attr(1)));
        assert_eq!(c.take_fresh(1), Some(attr(1)));
        assert_eq!(c.take_fresh(1), None, "once only");
        assert_eq!(c.attr(1), Some(attr(1)));
        // Two changes crossed: the answer of the one sent first came last
        // and may lack the other's effect; neither answers.
        let (t1, t2) = (c.ticket(), c.ticket());
        let mut after_both = attr(1);
        after_both.size = 2;
        c.dir_changed(t2, 1, Some(&after_both));
        c.dir_changed(t1, 1, Some(&attr(1)));
        assert_eq!(c.take_fresh(1), None, "a crossed answer");
        assert_eq!(c.attr(1), None);
        // Dropped by any later change of the directory: through this
        // mount, announced, or everything at once.
        for drop in [
            &(|c: &AttrCache| c.changed(c.ticket(), 1, None)) as &dyn Fn(&AttrCache),
            &|c: &AttrCache| c.set_xattr_done(1),
            &|c: &AttrCache| c.invalidate(1),
            &|c: &AttrCache| c.clear(),
            &|c: &AttrCache| c.dir_changed(c.ticket(), 1, None),
        ] {
            c.dir_changed(c.ticket(), 1, Some(&attr(1)));
            drop(&c);
            assert_eq!(c.take_fresh(1), None);
        }
        // Others are not affected; an answer about another inode is
        // never taken for the directory's.
        c.dir_changed(c.ticket(), 1, Some(&attr(1)));
        c.invalidate(2);
        c.dir_changed(c.ticket(), 3, Some(&attr(4)));
        assert_eq!(c.take_fresh(1), Some(attr(1)));
        assert_eq!(c.take_fresh(3), None);
        // Bounded.
        for d in 0..(FRESH_KEPT as u64 * 3) {
            c.dir_changed(c.ticket(), d, Some(&attr(d)));
        }
        assert!(c.with(|m| m.fresh.len()) <= FRESH_KEPT);
    }

    #[test]
    fn names_given_lately_are_remembered_for_a_while_and_bounded() {
        let c = AttrCache::new(16);
        c.put_entry(c.ticket(), 1, b"a", &attr(7));
        c.put_entry(c.ticket(), 2, b"b", &attr(7));
        c.put_entry(c.ticket(), 1, b"a", &attr(7));
        let mut names = c.names_given_lately(7);
        names.sort();
        assert_eq!(names, vec![(1, b"a".to_vec()), (2, b"b".to_vec())]);
        assert!(c.names_given_lately(8).is_empty());
        for i in 0..10u8 {
            c.put_entry(c.ticket(), 3, &[i], &attr(7));
        }
        assert_eq!(c.names_given_lately(7).len(), GIVEN_PER_INODE);
        // Old names go (the time is moved back instead of waiting).
        c.with(|m| {
            for names in m.given.values_mut() {
                for (_, _, at) in names.iter_mut() {
                    *at -= GIVEN_MEMORY;
                }
            }
        });
        assert!(c.names_given_lately(7).is_empty());
        // Pruned as it grows: many inodes given long ago do not stay.
        for ino in 100..(100 + 3 * GIVEN_PRUNE_MIN as u64) {
            c.put_entry(c.ticket(), 1, b"x", &attr(ino));
            if ino == 100 + GIVEN_PRUNE_MIN as u64 {
                c.with(|m| {
                    for names in m.given.values_mut() {
                        for (_, _, at) in names.iter_mut() {
                            *at -= GIVEN_MEMORY;
                        }
                    }
                });
            }
        }
        assert!(c.with(|m| m.given.len()) <= 2 * GIVEN_PRUNE_MIN + 1);
    }

    #[test]
    fn remembers_attrs_and_entries() {
        let c = AttrCache::new(100);
        c.put_entry(c.ticket(), 1, b"a", &attr(5));
        assert_eq!(c.attr(5).map(|a| a.size), Some(5));
        assert_eq!(c.entry(1, b"a").map(|a| a.ino), Some(Ino(5)));
        let mut newer = attr(5);
        newer.size = 99;
        c.put_attr(c.ticket(), &newer);
        assert_eq!(c.entry(1, b"a").map(|a| a.size), Some(99));
        c.forget_entry(1, b"a");
        assert_eq!(c.entry(1, b"a"), None);
        assert!(c.attr(5).is_some());
    }

    #[test]
    fn stays_bounded_and_keeps_recent_items() {
        let c = AttrCache::new(10);
        for i in 0..1000 {
            c.put_attr(c.ticket(), &attr(i));
            // Keep touching inode 0: it must survive every rotation.
            assert!(c.attr(0).is_some(), "recently used item evicted at {i}");
        }
        let (attrs, _) = c.len();
        assert!(attrs <= 10, "cache holds {attrs} attrs");
        assert!(c.attr(999).is_some());
        assert!(c.attr(500).is_none());
    }

    #[test]
    fn a_reply_sent_before_a_change_cannot_undo_it() {
        let c = AttrCache::new(100);
        c.put_attr(c.ticket(), &attr(5));
        // A getattr is sent, then a setxattr completes, then the getattr's
        // answer (no xattrs) arrives.
        let getattr_sent = c.ticket();
        c.set_xattr_done(5);
        assert!(!c.put_attr(getattr_sent, &attr(5)), "stale reply refused");
        assert_eq!(c.attr(5).map(|a| a.has_xattrs), Some(true));
        // A request sent after the change is cached.
        let mut fresh = attr(5);
        fresh.has_xattrs = true;
        fresh.size = 7;
        assert!(c.put_attr(c.ticket(), &fresh));
        assert_eq!(c.attr(5).map(|a| a.size), Some(7));
        // Other inodes are not affected.
        assert!(c.put_attr(getattr_sent, &attr(6)));
    }

    #[test]
    fn crossing_changes_leave_nothing_stale() {
        let c = AttrCache::new(100);
        c.put_attr(c.ticket(), &attr(5));
        let chmod_sent = c.ticket();
        let mut chowned = attr(5);
        chowned.uid = 9;
        c.changed(c.ticket(), 5, Some(&chowned));
        // The chmod's answer (older than the chown's) arrives last.
        let mut chmodded = attr(5);
        chmodded.perm = 0o600;
        c.changed(chmod_sent, 5, Some(&chmodded));
        assert_eq!(c.attr(5), None, "neither answer is known to be the latest");
    }

    fn dir_attr(ino: u64) -> Attr {
        Attr {
            kind: FileKind::Directory,
            perm: 0o755,
            nlink: 2,
            ..attr(ino)
        }
    }

    #[test]
    fn a_held_inode_stays_known_without_xattrs_after_its_attributes_left_until_it_changes() {
        let c = AttrCache::new(2);
        let fill = |c: &AttrCache| {
            for ino in 100..104 {
                c.put_attr(c.ticket(), &attr(ino));
            }
        };
        for ino in [5, 6, 7, 8] {
            c.put_attr(c.ticket(), &attr(ino));
            c.looked_up(&attr(ino), c.ticket());
        }
        let mut with = attr(9);
        with.has_xattrs = true;
        c.put_attr(c.ticket(), &with);
        c.looked_up(&with, c.ticket());
        // A stale reply is refused, and the reference it comes with does
        // not take its word either.
        let sent = c.ticket();
        c.changed(c.ticket(), 10, None);
        assert!(!c.put_attr(sent, &attr(10)));
        c.looked_up(&attr(10), sent);
        fill(&c);
        assert_eq!(c.attr(5), None, "out of the generations");
        assert!(c.known_without_xattrs(5), "held: still known");
        assert!(!c.known_without_xattrs(9), "it has some");
        assert!(!c.known_without_xattrs(10), "never known");
        assert!(!c.known_without_xattrs(11), "not held");
        // Each way of learning of a change forgets it.
        c.set_xattr_done(5);
        c.invalidate(6);
        let crossing = c.ticket();
        c.changed(c.ticket(), 7, Some(&attr(7)));
        c.changed(crossing, 7, Some(&attr(7)));
        fill(&c);
        for ino in [5, 6, 7] {
            assert!(!c.known_without_xattrs(ino), "{ino} changed");
        }
        assert!(c.known_without_xattrs(8));
        c.clear();
        assert!(!c.known_without_xattrs(8), "everything dropped");
        // Stored again while held: known again, after eviction too.
        c.put_attr(c.ticket(), &attr(8));
        fill(&c);
        assert!(c.known_without_xattrs(8));
        // The count is kept beside it.
        assert!(!c.forget(8, 0));
        assert!(c.forget(8, 1));
        assert!(!c.known_without_xattrs(8), "no longer held");
    }

    #[test]
    fn removed_inodes_answer_while_the_kernel_holds_them() {
        // A capacity of 2: the generations keep at most two attributes.
        let c = AttrCache::new(2);
        c.put_attr(c.ticket(), &dir_attr(5));
        assert!(c.looked_up(&dir_attr(5), c.ticket()), "first reference");
        assert!(!c.looked_up(&dir_attr(5), c.ticket()));
        assert_eq!(c.referenced_inos(), vec![Ino(5)]);
        assert_eq!(c.removed(5).map(|a| (a.nlink, a.size)), Some((0, 5)));
        let mut grown = dir_attr(5);
        grown.size = 50;
        c.put_attr(c.ticket(), &grown);
        assert_eq!(c.removed(5).map(|a| a.size), Some(50));
        // A file: answered from the generations while they hold it.
        c.put_attr(c.ticket(), &attr(6));
        assert!(c.looked_up(&attr(6), c.ticket()));
        assert_eq!(c.removed(6).map(|a| (a.nlink, a.size)), Some((0, 6)));
        // Other attributes push both out of the generations: the
        // directory's stay, the file's are gone.
        for ino in 10..14 {
            c.put_attr(c.ticket(), &attr(ino));
        }
        assert_eq!(c.attr(5), None);
        assert_eq!(c.removed(5).map(|a| (a.nlink, a.size)), Some((0, 50)));
        assert_eq!(c.removed(6), None);
        assert!(!c.forget(5, 1));
        assert!(c.removed(5).is_some(), "one lookup left");
        assert!(c.forget(5, 1), "the last lookup");
        assert!(!c.forget(5, 1), "forgotten already");
        assert_eq!(c.removed(5), None);
        assert!(c.forget(6, 1));
        assert!(c.referenced_inos().is_empty());
        assert_eq!(c.referenced(), 0);
        assert_eq!(c.removed(7), None, "never given to the kernel");
    }

    #[test]
    fn a_peer_change_shortens_the_ttl_only_of_replies_to_requests_sent_before_it() {
        let c = AttrCache::new(16);
        let before = c.ticket();
        assert!(!c.peer_changed_since(before, 3));
        c.invalidate(3);
        assert!(
            c.peer_changed_since(before, 3),
            "the reply may predate the change"
        );
        assert!(!c.peer_changed_since(before, 4), "only the inode announced");
        assert!(
            !c.peer_changed_since(c.ticket(), 3),
            "a request sent after the announcement saw the change"
        );
        // A change made through this mount is not a peer's: the kernel
        // orders those itself (its attribute version).
        let t = c.ticket();
        c.changed(t, 3, None);
        assert!(!c.peer_changed_since(t, 3));
        let in_flight = c.ticket();
        c.clear();
        assert!(
            c.peer_changed_since(in_flight, 4),
            "after All every inode counts"
        );
        assert!(
            !c.peer_changed_since(c.ticket(), 4),
            "but only for requests sent before it"
        );
    }
}
