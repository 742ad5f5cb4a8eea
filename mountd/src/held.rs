//! The inodes the kernel holds, compactly: their lookup counts and what
//! is known of their extended attributes (see [`crate::attr_cache`], which
//! owns the one [`HeldMap`] and its lock).
//!
//! The kernel may hold every inode of a huge tree: after `ls -lR` of a
//! million files it held all of them, and this map was the largest thing
//! in mountd. A hash table of `u64 → u64` costs 16 bytes a slot, and a
//! table of a million entries has 2^21 slots (it grows at seven eighths
//! full): 35 MB. Most entries fit in 8 bytes (an inode number below 2^32,
//! syncd hands them out from 2 upwards; a count below 2^30), so they are
//! kept in a `u32 → u32` table (19 MB for the same million), and only the
//! others in a second, full-width one. Every operation looks in both; an
//! entry lives in exactly one of them.

use ipc_schema::Attr;
use std::collections::HashMap;

/// What is known of an inode's extended attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xattrs {
    /// Nothing current.
    Unknown = 0,
    /// It has none.
    None = 1,
    /// It has some.
    Some = 2,
}

impl Xattrs {
    /// What `attr` says.
    pub fn of(attr: &Attr) -> Xattrs {
        if attr.has_xattrs {
            Xattrs::Some
        } else {
            Xattrs::None
        }
    }

    fn from_bits(bits: u64) -> Xattrs {
        match bits {
            1 => Xattrs::None,
            2 => Xattrs::Some,
            _ => Xattrs::Unknown,
        }
    }
}

/// An inode the kernel holds: its lookup count (the kernel's is a `u64`;
/// kept up to 2^62 - 1, which one inode would take centuries to reach
/// without a forget) and [`Xattrs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    count: u64,
    xattrs: Xattrs,
}

impl Held {
    const MAX_COUNT: u64 = (1 << 62) - 1;

    /// Not looked up yet (count 0).
    pub fn new(xattrs: Xattrs) -> Held {
        Held { count: 0, xattrs }
    }

    /// The lookup count.
    pub fn count(self) -> u64 {
        self.count
    }

    /// Set the lookup count (saturating).
    pub fn set_count(&mut self, count: u64) {
        self.count = count.min(Held::MAX_COUNT);
    }

    /// What is known of its extended attributes.
    pub fn xattrs(self) -> Xattrs {
        self.xattrs
    }

    /// Set what is known of its extended attributes.
    pub fn set_xattrs(&mut self, x: Xattrs) {
        self.xattrs = x;
    }

    /// The 4-byte form (count in the low 30 bits, [`Xattrs`] in the top
    /// two), if the count fits.
    fn small(self) -> Option<u32> {
        let count = u32::try_from(self.count)
            .ok()
            .filter(|c| *c < SMALL_COUNT)?;
        Some(count | ((self.xattrs as u32) << 30))
    }

    fn of_small(v: u32) -> Held {
        Held {
            count: u64::from(v & (SMALL_COUNT - 1)),
            xattrs: Xattrs::from_bits(u64::from(v >> 30)),
        }
    }
}

/// Counts from this up do not fit the small form.
const SMALL_COUNT: u32 = 1 << 30;

/// Inode → [`Held`], in two tables (see the module doc).
#[derive(Debug, Default)]
pub struct HeldMap {
    /// Inodes below 2^32 with a count below 2^30.
    small: HashMap<u32, u32>,
    /// Every other one.
    wide: HashMap<u64, Held>,
}

impl HeldMap {
    /// The entry of `ino`.
    pub fn get(&self, ino: u64) -> Option<Held> {
        match u32::try_from(ino).ok().and_then(|i| self.small.get(&i)) {
            Some(v) => Some(Held::of_small(*v)),
            None => self.wide.get(&ino).copied(),
        }
    }

    /// Whether the kernel holds `ino`.
    pub fn contains(&self, ino: u64) -> bool {
        self.get(ino).is_some()
    }

    /// Set the entry of `ino`, in whichever table it fits.
    pub fn put(&mut self, ino: u64, held: Held) {
        match (u32::try_from(ino).ok(), held.small()) {
            (Some(i), Some(v)) => {
                self.small.insert(i, v);
                if !self.wide.is_empty() {
                    self.wide.remove(&ino);
                }
            }
            (i, _) => {
                if let Some(i) = i {
                    self.small.remove(&i);
                }
                self.wide.insert(ino, held);
            }
        }
    }

    /// Change the entry of `ino`, if there is one, with `f`.
    pub fn update(&mut self, ino: u64, f: impl FnOnce(&mut Held)) {
        if let Some(mut h) = self.get(ino) {
            f(&mut h);
            self.put(ino, h);
        }
    }

    /// Remove the entry of `ino`.
    pub fn remove(&mut self, ino: u64) {
        if let Ok(i) = u32::try_from(ino) {
            self.small.remove(&i);
        }
        self.wide.remove(&ino);
    }

    /// Set what is known of every entry's extended attributes to `x`.
    pub fn set_all_xattrs(&mut self, x: Xattrs) {
        for v in self.small.values_mut() {
            let mut h = Held::of_small(*v);
            h.set_xattrs(x);
            // Same count, so it still fits.
            *v = h.small().unwrap_or(*v);
        }
        for h in self.wide.values_mut() {
            h.set_xattrs(x);
        }
    }

    /// Every inode held.
    pub fn inos(&self) -> impl Iterator<Item = u64> + '_ {
        self.small
            .keys()
            .map(|&i| u64::from(i))
            .chain(self.wide.keys().copied())
    }

    /// How many inodes are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.small.len() + self.wide.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(count: u64, xattrs: Xattrs) -> Held {
        let mut h = Held::new(xattrs);
        h.set_count(count);
        h
    }

    #[test]
    fn entries_read_back_as_written_whichever_table_holds_them() {
        let mut m = HeldMap::default();
        let cases = [
            (2, held(1, Xattrs::None)),
            (u64::from(u32::MAX), held(7, Xattrs::Some)),
            (1 << 32, held(3, Xattrs::Unknown)),
            (u64::MAX, held(u64::MAX, Xattrs::Some)),
            (9, held(u64::from(SMALL_COUNT) - 1, Xattrs::Some)),
            (10, held(u64::from(SMALL_COUNT), Xattrs::None)),
        ];
        for (ino, h) in cases {
            m.put(ino, h);
        }
        for (ino, h) in cases {
            let want = held(h.count().min(Held::MAX_COUNT), h.xattrs());
            assert_eq!(m.get(ino), Some(want), "ino {ino}");
        }
        assert_eq!(m.len(), cases.len());
        let mut inos: Vec<u64> = m.inos().collect();
        inos.sort_unstable();
        let mut want: Vec<u64> = cases.iter().map(|(i, _)| *i).collect();
        want.sort_unstable();
        assert_eq!(inos, want);
        assert_eq!(m.small.len(), 3, "small inodes with small counts");
        assert_eq!(m.wide.len(), 3);
    }

    #[test]
    fn an_entry_moves_between_tables_as_its_count_grows_and_shrinks() {
        let mut m = HeldMap::default();
        m.put(5, held(u64::from(SMALL_COUNT) - 1, Xattrs::Some));
        m.update(5, |h| h.set_count(h.count() + 1));
        assert_eq!(m.get(5), Some(held(u64::from(SMALL_COUNT), Xattrs::Some)));
        assert_eq!((m.small.len(), m.wide.len()), (0, 1), "moved to wide");
        m.update(5, |h| h.set_count(h.count() - 2));
        assert_eq!(
            m.get(5),
            Some(held(u64::from(SMALL_COUNT) - 2, Xattrs::Some))
        );
        assert_eq!((m.small.len(), m.wide.len()), (1, 0), "back to small");
        m.remove(5);
        assert_eq!(m.get(5), None);
        assert!(!m.contains(5));
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn every_entry_takes_the_xattrs_set_for_all_and_keeps_its_count() {
        let mut m = HeldMap::default();
        m.put(3, held(2, Xattrs::Some));
        m.put(1 << 40, held(4, Xattrs::None));
        m.set_all_xattrs(Xattrs::Unknown);
        assert_eq!(m.get(3), Some(held(2, Xattrs::Unknown)));
        assert_eq!(m.get(1 << 40), Some(held(4, Xattrs::Unknown)));
    }

    #[test]
    fn a_count_saturates_and_keeps_its_xattrs_apart_in_both_forms() {
        let mut h = Held::new(Xattrs::Some);
        h.set_count(u64::MAX);
        assert_eq!((h.count(), h.xattrs()), (Held::MAX_COUNT, Xattrs::Some));
        for (count, x) in [(3, Xattrs::None), (SMALL_COUNT - 1, Xattrs::Unknown)] {
            h.set_count(u64::from(count));
            h.set_xattrs(x);
            let small = h.small().expect("fits the small form");
            assert_eq!(Held::of_small(small), h);
        }
    }

    #[test]
    fn updating_an_absent_inode_adds_nothing() {
        let mut m = HeldMap::default();
        m.update(8, |h| h.set_count(1));
        assert_eq!(m.len(), 0);
    }
}
