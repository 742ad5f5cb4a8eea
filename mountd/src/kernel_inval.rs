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
//!   pages, and entries of a directory. When mountd may have missed some
//!   (`Inval::All`), every entry the kernel caches, positive and negative,
//!   is dropped at once with `FUSE_NOTIFY_INC_EPOCH` (Linux 6.16, FUSE
//!   7.44): the kernel then looks every name up again. fuser 0.18 has no
//!   call for it, so [`Note::Epoch`] is written to `/dev/fuse` by hand (a
//!   `fuse_out_header` with `unique` 0 and the notification code in
//!   `error`, no body). This is what makes long entry TTLs and cached
//!   negative entries correct (see [`entry_ttl_cap`]).
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
    /// Drop every entry the kernel caches (`FUSE_NOTIFY_INC_EPOCH`).
    Epoch,
}

/// `FUSE_NOTIFY_INC_EPOCH` (not in fuser 0.18's ABI list).
const FUSE_NOTIFY_INC_EPOCH: i32 = 8;

/// The first Linux release with `FUSE_NOTIFY_INC_EPOCH`.
const EPOCH_SINCE: (u32, u32) = (6, 16);

/// The longest entry and attribute TTL that stays correct on the kernel
/// `release` (`uname -r`): `ttl` where the kernel can drop every entry at
/// once ([`Note::Epoch`]), else at most `fallback`. Without that, entries
/// cached before an `Inval::All` (a restart of syncd, or a mountd that fell
/// behind the invalidation stream) could stay in the kernel for a whole
/// TTL, so the TTL is kept short there.
pub fn entry_ttl_cap(
    release: &str,
    ttl: std::time::Duration,
    fallback: std::time::Duration,
) -> std::time::Duration {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let num = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
    match (num(parts.next()), num(parts.next())) {
        (Some(major), Some(minor)) if (major, minor) >= EPOCH_SINCE => ttl,
        _ => ttl.min(fallback),
    }
}

/// Write `FUSE_NOTIFY_INC_EPOCH` to the session's `/dev/fuse` descriptor.
fn inc_epoch(dev: &std::fs::File) -> std::io::Result<()> {
    use std::io::Write;
    let mut msg = [0u8; 16];
    msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
    msg[4..8].copy_from_slice(&FUSE_NOTIFY_INC_EPOCH.to_ne_bytes());
    // unique (bytes 8..16) stays 0: a notification.
    let mut dev = dev;
    let n = dev.write(&msg)?;
    if n != msg.len() {
        return Err(std::io::Error::other(format!("short write of {n} bytes")));
    }
    Ok(())
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

    /// Ask for every entry the kernel caches to be dropped. Never blocks.
    pub fn all_entries(&self) {
        self.send(Note::Epoch);
    }

    fn send(&self, note: Note) {
        // A closed queue means the session is over: nothing to invalidate.
        let _ = self.tx.send(note);
    }
}

impl InvalQueue {
    /// Start the thread that sends the notifications; it ends when every
    /// [`KernelInval`] is dropped. `dev` is a descriptor of the session's
    /// `/dev/fuse` (for [`Note::Epoch`]).
    pub fn start(self, notifier: Notifier, dev: std::fs::File) -> std::io::Result<()> {
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
                        Note::Epoch => inc_epoch(&dev),
                    };
                    match r {
                        Ok(()) => tracing::trace!(?note, "kernel cache invalidated"),
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) if note == Note::Epoch => {
                            tracing::warn!(error = %e, "the kernel cannot drop all its cached entries; names a peer changed may show late, for up to --attr-ttl")
                        }
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

#[cfg(test)]
mod tests {
    use super::entry_ttl_cap;
    use std::time::Duration;

    #[test]
    fn long_ttls_only_where_the_kernel_can_drop_every_entry() {
        let (long, short) = (Duration::from_secs(60), Duration::from_secs(1));
        assert_eq!(entry_ttl_cap("6.18.44-fc-v595", long, short), long);
        assert_eq!(entry_ttl_cap("6.16.0", long, short), long);
        assert_eq!(entry_ttl_cap("7.0.1-arch1", long, short), long);
        assert_eq!(entry_ttl_cap("6.15.9", long, short), short);
        assert_eq!(entry_ttl_cap("6.1.0-28-amd64", long, short), short);
        assert_eq!(entry_ttl_cap("unknown", long, short), short);
        // A TTL already below the cap is kept.
        let tiny = Duration::from_millis(200);
        assert_eq!(entry_ttl_cap("6.1.0", tiny, short), tiny);
    }
}
