//! Asking the kernel to drop the attributes it caches for an inode, from
//! a thread of its own.
//!
//! Why: a store into a shared `mmap` of a passthrough file goes straight
//! to the content file (the kernel maps the backing file, see
//! `fs/fuse/passthrough.c`: its mmap hook only marks atime), so the FUSE
//! inode never learns that mtime and ctime changed, and a `stat` answered
//! from the kernel's attribute cache shows the old times until the
//! attribute TTL ends. While an inode has a handle open for writing,
//! mountd therefore answers its attributes with a TTL of 0 (see
//! `Keibi::attr_ttl`), and when such a handle is opened it asks the kernel
//! here to forget the attributes it cached before (at `lookup`, with the
//! normal TTL).
//!
//! Notifications are written to `/dev/fuse` by one thread that only does
//! that, never from a FUSE callback or while holding a lock a callback can
//! take: the kernel may hold the inode's lock while it waits for a reply,
//! and a notification written from the thread that owes that reply could
//! deadlock (libfuse documents the same). `ENOENT` (the kernel no longer
//! knows the inode) is success.

use fuser::{INodeNo, Notifier};
use std::sync::mpsc;

/// The sending side, held by the filesystem; cheap to clone.
#[derive(Clone)]
pub struct AttrInval {
    tx: mpsc::Sender<u64>,
}

/// The queue of inodes to invalidate, until [`InvalQueue::start`] gives it
/// the session's notifier.
pub struct InvalQueue {
    rx: mpsc::Receiver<u64>,
}

/// A sender and its queue (notifications queue up until it starts).
pub fn channel() -> (AttrInval, InvalQueue) {
    let (tx, rx) = mpsc::channel();
    (AttrInval { tx }, InvalQueue { rx })
}

impl AttrInval {
    /// Ask for the kernel's cached attributes of `ino` to be dropped. Never
    /// blocks.
    pub fn attrs_of(&self, ino: u64) {
        // A closed queue means the session is over: nothing to invalidate.
        let _ = self.tx.send(ino);
    }
}

impl InvalQueue {
    /// Start the thread that sends the notifications; it ends when every
    /// [`AttrInval`] is dropped.
    pub fn start(self, notifier: Notifier) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("keibi-inval".into())
            .spawn(move || {
                for ino in self.rx {
                    // An offset below 0: attributes only, no page cache.
                    match notifier.inval_inode(INodeNo(ino), -1, 0) {
                        Ok(()) => tracing::trace!(ino, "kernel attributes invalidated"),
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => {
                            tracing::debug!(ino, error = %e, "cannot invalidate the kernel's attributes")
                        }
                    }
                }
            })
            .map(drop)
    }
}
