//! Directories whose every name mountd knows, so that a `lookup` of a
//! name that is not there is answered without asking syncd.
//!
//! Creating a file costs the kernel a `lookup` of the new name first (it
//! finds no cached entry for a name it never saw), and a program that
//! probes for names (git, tar, compilers) asks for many that do not
//! exist. Each such lookup was a round trip to syncd that only said
//! `ENOENT`. A directory made through this mount starts empty, and every
//! name added to or removed from it afterwards passes through mountd
//! (a change made through this mount) or is announced by syncd's
//! invalidation stream (a peer's change, [`crate::inval`]). So mountd can
//! keep the full list of names of such a directory, and answer the
//! absence of any other name itself, as a negative entry.
//!
//! The rules that keep a list exact, or drop it:
//!
//! - `mkdir` through this mount that syncd answered: the new directory is
//!   known, empty ([`KnownDirs::made`]).
//! - A change through this mount that syncd answered adds or removes the
//!   name ([`KnownDirs::added`], [`KnownDirs::removed`]); one whose outcome
//!   is unknown or that failed (a deadline, an error) drops the directory's
//!   list ([`KnownDirs::unsure`]): mountd no longer knows.
//! - A peer's change of any name of the directory (`Inval::Entry`, which
//!   also invalidates the directory's attributes), or of the directory
//!   itself, drops its list; `Inval::All` drops every list
//!   ([`KnownDirs::clear`]).
//! - syncd answering `ENOENT` for a name mountd listed drops the list.
//!
//! An absence answered from a list is as fresh as a negative entry the
//! kernel caches, which the same invalidations drop. Lists are bounded
//! ([`MAX_NAMES`] names in all): a name that would pass the bound drops
//! its directory's list instead. A removed directory's list is dropped
//! when mountd knows its inode; otherwise it stays until the bound or an
//! invalidation clears it, which costs memory only (inode numbers are
//! never reused).
//!
//! One `Mutex`, held only for map operations; it is a leaf (nothing else
//! is locked while it is held).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// Most names kept across all known directories.
pub const MAX_NAMES: usize = 100_000;

#[derive(Default)]
struct Lists {
    dirs: HashMap<u64, HashSet<Vec<u8>>>,
    names: usize,
}

impl Lists {
    fn drop_dir(&mut self, dir: u64) {
        if let Some(set) = self.dirs.remove(&dir) {
            self.names -= set.len();
        }
    }
}

/// The directories whose names mountd knows (see the module doc).
#[derive(Default)]
pub struct KnownDirs {
    lists: Mutex<Lists>,
}

impl KnownDirs {
    fn with<T>(&self, f: impl FnOnce(&mut Lists) -> T) -> T {
        // Plain maps stay consistent even if a holder panicked.
        let mut g = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// `dir` was just made through this mount: it has no names.
    pub fn made(&self, dir: u64) {
        self.with(|l| {
            l.drop_dir(dir);
            l.dirs.insert(dir, HashSet::new());
        });
    }

    /// `parent/name` was made through this mount (syncd answered).
    pub fn added(&self, parent: u64, name: &[u8]) {
        self.with(|l| {
            let full = l.names >= MAX_NAMES;
            let Some(set) = l.dirs.get_mut(&parent) else {
                return;
            };
            if set.contains(name) {
                return;
            }
            if full {
                l.drop_dir(parent);
                return;
            }
            set.insert(name.to_vec());
            l.names += 1;
        });
    }

    /// `parent/name` was removed through this mount (syncd answered).
    pub fn removed(&self, parent: u64, name: &[u8]) {
        self.with(|l| {
            if let Some(set) = l.dirs.get_mut(&parent)
                && set.remove(name)
            {
                l.names -= 1;
            }
        });
    }

    /// mountd no longer knows every name of `dir` (or `dir` is gone).
    pub fn unsure(&self, dir: u64) {
        self.with(|l| l.drop_dir(dir));
    }

    /// Forget every list.
    pub fn clear(&self) {
        self.with(|l| *l = Lists::default());
    }

    /// Whether `parent/name` is known not to exist. Never for `.` and
    /// `..`, which every directory has (the kernel looks them up by inode
    /// number to open a file handle, `FUSE_EXPORT_SUPPORT`).
    pub fn absent(&self, parent: u64, name: &[u8]) -> bool {
        if name == b"." || name == b".." {
            return false;
        }
        self.with(|l| l.dirs.get(&parent).is_some_and(|s| !s.contains(name)))
    }

    /// Whether mountd lists `parent/name` (known to exist).
    pub fn listed(&self, parent: u64, name: &[u8]) -> bool {
        self.with(|l| l.dirs.get(&parent).is_some_and(|s| s.contains(name)))
    }

    /// Names kept in all (for the bound's test).
    #[cfg(test)]
    fn names(&self) -> usize {
        self.with(|l| l.names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_directory_made_here_answers_absences() {
        let k = KnownDirs::default();
        assert!(
            !k.absent(1, b"a"),
            "nothing is known of a directory seen only"
        );
        k.made(2);
        assert!(k.absent(2, b"a"));
        k.added(2, b"a");
        assert!(!k.absent(2, b"a"));
        assert!(k.listed(2, b"a"));
        assert!(k.absent(2, b"b"));
        k.removed(2, b"a");
        assert!(k.absent(2, b"a"));
        k.added(1, b"x");
        assert!(
            !k.absent(1, b"y"),
            "adding to an unknown directory knows nothing"
        );
        assert!(!k.absent(2, b"."), "every directory has .");
        assert!(!k.absent(2, b".."), "and ..");
    }

    #[test]
    fn an_unsure_change_or_an_announcement_drops_the_list() {
        let k = KnownDirs::default();
        k.made(2);
        k.made(3);
        k.added(2, b"a");
        k.unsure(2);
        assert!(!k.absent(2, b"b"));
        assert!(k.absent(3, b"b"));
        k.clear();
        assert!(!k.absent(3, b"b"));
        assert_eq!(k.names(), 0);
    }

    #[test]
    fn the_bound_drops_the_directory_that_would_pass_it() {
        let k = KnownDirs::default();
        k.made(2);
        k.made(3);
        for i in 0..MAX_NAMES {
            k.added(2, format!("f{i}").as_bytes());
        }
        assert_eq!(k.names(), MAX_NAMES);
        k.added(2, b"f0");
        assert!(k.absent(2, b"new"), "a name already listed costs nothing");
        k.added(2, b"one-more");
        assert!(!k.absent(2, b"new"), "dropped rather than wrong");
        assert_eq!(k.names(), 0);
        k.added(3, b"x");
        assert!(k.listed(3, b"x"), "room again");
    }
}
