//! The last known attributes and directory entries, for answers when
//! syncd misses the deadline.
//!
//! The kernel already caches attributes and entries for `--attr-ttl`; this
//! cache is not consulted on the normal path. It exists for one purpose:
//! when syncd does not answer a `getattr` or `lookup` in time, mountd
//! answers with what it saw last (which is what a local disk would have
//! said a moment ago) instead of an error, so `stat` and `ls -l` keep
//! working while syncd is stalled.
//!
//! Size is bounded with two generations: entries go into the young
//! generation; when it holds half the capacity, the old generation is
//! dropped and the young one becomes old. A hit in the old generation is
//! moved back to the young one. That approximates LRU with O(1) work and
//! no per-entry bookkeeping.
//!
//! One `Mutex` guards everything; it is held only for map operations.

use ipc_schema::Attr;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// Default number of attributes (and, separately, entries) remembered.
pub const DEFAULT_CAPACITY: usize = 100_000;

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
}

/// Last known attributes per inode and `(parent, name) → inode` entries.
pub struct AttrCache {
    maps: Mutex<Maps>,
}

impl AttrCache {
    /// A cache remembering at most `capacity` attributes and as many entries.
    pub fn new(capacity: usize) -> Self {
        AttrCache {
            maps: Mutex::new(Maps {
                attrs: TwoGen::new(capacity),
                entries: TwoGen::new(capacity),
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Maps) -> T) -> T {
        // A panic while holding the lock leaves plain maps behind, which
        // are still consistent: keep using them.
        let mut g = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Remember `attr` as the latest attributes of its inode.
    pub fn put_attr(&self, attr: &Attr) {
        self.with(|m| m.attrs.put(attr.ino.0, *attr));
    }

    /// Record that `ino` now has an extended attribute (after `setxattr`).
    pub fn mark_has_xattrs(&self, ino: u64) {
        self.with(|m| {
            if let Some(mut a) = m.attrs.get(&ino) {
                a.has_xattrs = true;
                m.attrs.put(ino, a);
            }
        });
    }

    /// The last known attributes of `ino`.
    pub fn attr(&self, ino: u64) -> Option<Attr> {
        self.with(|m| m.attrs.get(&ino))
    }

    /// Remember that `parent/name` is `attr.ino`, with these attributes.
    pub fn put_entry(&self, parent: u64, name: &[u8], attr: &Attr) {
        self.with(|m| {
            m.entries.put((parent, name.to_vec()), attr.ino.0);
            m.attrs.put(attr.ino.0, *attr);
        });
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
    use ipc_schema::{FileKind, Ino, Timestamp};

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
    fn remembers_attrs_and_entries() {
        let c = AttrCache::new(100);
        c.put_entry(1, b"a", &attr(5));
        assert_eq!(c.attr(5).map(|a| a.size), Some(5));
        assert_eq!(c.entry(1, b"a").map(|a| a.ino), Some(Ino(5)));
        let mut newer = attr(5);
        newer.size = 99;
        c.put_attr(&newer);
        assert_eq!(c.entry(1, b"a").map(|a| a.size), Some(99));
        c.forget_entry(1, b"a");
        assert_eq!(c.entry(1, b"a"), None);
        assert!(c.attr(5).is_some());
    }

    #[test]
    fn stays_bounded_and_keeps_recent_items() {
        let c = AttrCache::new(10);
        for i in 0..1000 {
            c.put_attr(&attr(i));
            // Keep touching inode 0: it must survive every rotation.
            assert!(c.attr(0).is_some(), "recently used item evicted at {i}");
        }
        let (attrs, _) = c.len();
        assert!(attrs <= 10, "cache holds {attrs} attrs");
        assert!(c.attr(999).is_some());
        assert!(c.attr(500).is_none());
    }
}
