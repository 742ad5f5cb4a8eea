//! Asking the kernel to drop what it caches (attributes, pages, entries),
//! from a thread of its own.
//!
//! Two users:
//!
//! - Attributes of an inode opened for writing. A store into a shared
//!   `mmap` of a passthrough file goes straight to the content file (the
//!   kernel maps the backing file, see `fs/fuse/passthrough.c`: its mmap
//!   hook only marks atime), so the FUSE inode never learns that mtime and
//!   ctime changed, and a `stat` answered from the kernel's attribute
//!   cache shows the old times until the attribute TTL ends. While an
//!   inode has a handle open for writing, mountd therefore answers its
//!   attributes with a TTL of 0 (see `Keibi::attr_ttl`), and when such a
//!   handle is opened it asks the kernel here to forget the attributes it
//!   cached before (at `lookup`, with the normal TTL).
//! - Changes a peer made ([`crate::inval`]): the inode's attributes and
//!   pages, and entries of a directory.
//!
//! Notifications are written to `/dev/fuse` by one thread that only does
//! that, never from a FUSE callback or while holding a lock a callback can
//! take: the kernel may hold the inode's lock while it waits for a reply,
//! and a notification written from the thread that owes that reply could
//! deadlock (libfuse documents the same). `ENOENT` (the kernel no longer
//! knows the inode or the entry) is success.

use fuser::{INodeNo, Notifier};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc;

/// One notification for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// Drop the inode's attributes (not its pages).
    Attrs(u64),
    /// Drop the inode's attributes and all its cached pages.
    Inode(u64),
    /// Drop the entry `name` of directory `parent` (and the directory's
    /// attributes).
    Entry(u64, Vec<u8>),
}

/// The sending side, held by the filesystem; cheap to clone.
#[derive(Clone)]
pub struct KernelInval {
    tx: mpsc::Sender<Note>,
}

/// The queue of notifications, until [`InvalQueue::start`] gives it the
/// session's notifier.
pub struct InvalQueue {
    rx: mpsc::Receiver<Note>,
}

/// A sender and its queue (notifications queue up until it starts).
pub fn channel() -> (KernelInval, InvalQueue) {
    let (tx, rx) = mpsc::channel();
    (KernelInval { tx }, InvalQueue { rx })
}

impl KernelInval {
    /// Ask for the kernel's cached attributes of `ino` to be dropped. Never
    /// blocks.
    pub fn attrs_of(&self, ino: u64) {
        self.send(Note::Attrs(ino));
    }

    /// Ask for the kernel's attributes and pages of `ino` to be dropped.
    /// Never blocks.
    pub fn inode(&self, ino: u64) {
        self.send(Note::Inode(ino));
    }

    /// Ask for the kernel's entry `parent/name` to be dropped. Never
    /// blocks.
    pub fn entry(&self, parent: u64, name: &[u8]) {
        self.send(Note::Entry(parent, name.to_vec()));
    }

    fn send(&self, note: Note) {
        // A closed queue means the session is over: nothing to invalidate.
        let _ = self.tx.send(note);
    }
}

impl InvalQueue {
    /// Start the thread that sends the notifications; it ends when every
    /// [`KernelInval`] is dropped.
    pub fn start(self, notifier: Notifier) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("keibi-inval".into())
            .spawn(move || {
                for note in self.rx {
                    let r = match &note {
                        // An offset below 0: attributes only, no page cache.
                        Note::Attrs(ino) => notifier.inval_inode(INodeNo(*ino), -1, 0),
                        // Offset 0, length 0: every page.
                        Note::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                        Note::Entry(parent, name) => {
                            notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
                        }
                    };
                    match r {
                        Ok(()) => tracing::trace!(?note, "kernel cache invalidated"),
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => {
                            tracing::debug!(?note, error = %e, "cannot invalidate the kernel's cache")
                        }
                    }
                }
            })
            .map(drop)
    }

    /// The notifications queued so far (tests stand in for the kernel).
    #[cfg(test)]
    pub fn drain(&self) -> Vec<Note> {
        self.rx.try_iter().collect()
    }
}
