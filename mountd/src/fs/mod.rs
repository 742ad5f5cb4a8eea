//! The filesystem's operations, knowing nothing of fuser: each one either
//! works on a descriptor mountd holds (bounded local work, called inline
//! by the dispatch thread) or calls syncd with a deadline (an `async fn`
//! the [`crate::fuse`] adapter runs on a tokio task).
//!
//! Deadline rule (see `docs/architecture.md`): when syncd does not answer
//! in time, `getattr` answers the last attributes mountd saw for the inode
//! and `lookup` the last entry it saw for the name; every other operation
//! answers `ETIMEDOUT`. Reads, writes, `flush` and `release` never wait on
//! syncd: they use the descriptor in the [`HandleTable`], and `release`
//! queues the news for syncd ([`crate::releases`], delivered and retried
//! in the background). After one missed deadline syncd
//! counts as stalled and calls wait only briefly until it answers again
//! ([`crate::syncd_client`]), so a command that makes several calls in a
//! row (`stat`: lookup then getattr) still answers within about one
//! deadline.
//!
//! Opening is two steps so that no borrow of the FUSE reply lives across
//! an await: [`Keibi::open_fd`] / [`Keibi::create_fd`] (async: syncd opens
//! the content file, the descriptor arrives on the fd channel, it is
//! validated by [`fd_check`]) then [`Keibi::install`] (sync: passthrough
//! registration and the handle table).
//!
//! Directories: `opendir` gives each open directory its own handle with a
//! read-ahead of entries ([`crate::dir_handles`]), so most `readdir`s are
//! answered inline without syncd. Whether a read-ahead may still be used
//! depends on the mount's change counter: every operation that changes
//! names or attributes through this mount (and the last close of a file
//! written here) counts once when it is sent and once when it is answered,
//! so a read-ahead asked for before or during a change is never used
//! after it.

mod dirs;
mod files;
mod meta;
mod names;
mod xattrs;

use crate::attr_cache::{AttrCache, Ticket};
use crate::dir_handles::{self, DirHandles, ReadAhead};
use crate::fd_check::{self, Access};
use crate::handles::{Handle, HandleTable};
use crate::inval::Invalidator;
use crate::kernel_inval::KernelInval;
use crate::ondemand::{self, PartialState};
use crate::passthrough::OpenKind;
use crate::passthrough::{Mode, Passthrough};
use crate::releases::Releases;
use crate::sync_data::SyncData;
use crate::syncd_client::{CallError, Retry, SyncdClient};
use fuser::BackingId;
use ipc_schema::{
    Attr, Caller, DirCookie, DirEntry, FileKind, FsError, HandleId, Ino, Made, Name, Opened,
    RenameFlags, SetAttr, StatFs, XattrSet, fs_err,
};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Extra time to wait for a descriptor whose `open` answer has arrived:
/// syncd sends it before answering, so it is normally already queued.
const FD_GRACE: Duration = Duration::from_millis(100);
/// Margin beyond the longest an open can wait for its descriptor, after
/// which a descriptor nobody took is closed and its open released.
const UNCLAIMED_MARGIN: Duration = Duration::from_secs(1);

/// The state behind the FUSE adapter.
pub struct Keibi {
    client: SyncdClient,
    cache: Arc<AttrCache>,
    handles: Arc<HandleTable>,
    /// Releases on their way to syncd.
    releases: Arc<Releases>,
    dirs: DirHandles,
    /// Counts changes made through this mount (see the module doc).
    changes: Arc<AtomicU64>,
    passthrough: Arc<Passthrough>,
    deadline: Duration,
    /// How long `fsync`/`fsyncdir` wait for local durability (mountd's
    /// `sync_all` and syncd's store flush together).
    fsync_deadline: Duration,
    /// Drops the kernel's cached attributes of inodes opened for writing.
    attr_inval: Option<KernelInval>,
    /// syncd's calls for bytes that are not local ([`crate::ondemand`]).
    data: Arc<dyn SyncData>,
    /// How long a read or write waits for missing bytes to be fetched.
    read_deadline: Duration,
    rt: tokio::runtime::Handle,
}

/// The default of `--read-deadline`.
pub const DEFAULT_READ_DEADLINE: Duration = Duration::from_secs(10);

/// The default of `--fsync-deadline`.
pub const DEFAULT_FSYNC_DEADLINE: Duration = Duration::from_secs(30);

/// Counts a change on the mount when made and again when dropped: hold it
/// for as long as the change may be in flight at syncd.
struct Change<'a>(&'a AtomicU64);

impl<'a> Change<'a> {
    fn begin(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Change(counter)
    }
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// An answer to `getxattr`/`listxattr`.
pub enum XattrReply {
    /// The size of the value (the caller asked with size 0).
    Size(u32),
    /// The value.
    Data(Vec<u8>),
}

/// A descriptor syncd sent for an open, validated, not yet installed.
pub struct OpenedFd {
    /// syncd's answer.
    pub opened: Opened,
    /// The content file.
    pub fd: OwnedFd,
    /// Opened with write access.
    pub writable: bool,
}

impl Keibi {
    /// The filesystem over `client`, answering within `deadline`;
    /// attributes given to the kernel are valid for `attr_ttl`.
    pub fn new(
        client: SyncdClient,
        passthrough: Arc<Passthrough>,
        deadline: Duration,
        cache: AttrCache,
        attr_ttl: Duration,
        rt: tokio::runtime::Handle,
    ) -> Self {
        let handles = Arc::new(HandleTable::default());
        let cache = Arc::new(cache);
        client.report_handles_of(handles.clone(), cache.clone());
        let releases = Arc::new(Releases::default());
        rt.spawn(releases.clone().deliver(
            client.clone(),
            deadline,
            deadline + FD_GRACE + UNCLAIMED_MARGIN,
        ));
        Keibi {
            data: Arc::new(client.clone()),
            read_deadline: DEFAULT_READ_DEADLINE,
            client,
            cache,
            handles,
            releases,
            dirs: DirHandles::new(attr_ttl),
            changes: Arc::new(AtomicU64::new(0)),
            passthrough,
            deadline,
            fsync_deadline: DEFAULT_FSYNC_DEADLINE,
            attr_inval: None,
            rt,
        }
    }

    /// Use `d` as the deadline of `fsync`/`fsyncdir` instead of
    /// [`DEFAULT_FSYNC_DEADLINE`].
    pub fn with_fsync_deadline(mut self, d: Duration) -> Self {
        self.fsync_deadline = d;
        self
    }

    /// Wait at most `d` for missing bytes of a partial file instead of
    /// [`DEFAULT_READ_DEADLINE`].
    pub fn with_read_deadline(mut self, d: Duration) -> Self {
        self.read_deadline = d;
        self
    }

    /// Ask `data` instead of the syncd client for missing bytes (tests use
    /// a fake syncd).
    #[cfg(test)]
    pub fn with_data(mut self, data: Arc<dyn SyncData>) -> Self {
        self.data = data;
        self
    }

    /// Invalidate the kernel's cached attributes of an inode through
    /// `inval` when a handle opens it for writing ([`crate::attr_inval`]).
    pub fn with_attr_inval(mut self, inval: KernelInval) -> Self {
        self.attr_inval = Some(inval);
        self
    }

    /// The attribute TTL to give the kernel for `ino` in the answer to a
    /// request sent at ticket `since` ([`Keibi::ticket`]): 0 while a
    /// handle of this mount has it open for writing (stores through a
    /// shared mapping change its times without the kernel noticing, see
    /// [`crate::attr_inval`]) and when a peer's change of it was announced
    /// after the request was sent ([`AttrCache::peer_changed_since`]: the
    /// reply may be older than the announcement), else `ttl`.
    pub fn attr_ttl(&self, ino: u64, ttl: Duration, since: Ticket) -> Duration {
        if self.handles.has_writer(ino) {
            Duration::ZERO
        } else {
            self.create_ttl(ino, ttl, since)
        }
    }

    /// After an entry for `parent/name` (positive or negative) went to the
    /// kernel in answer to a lookup sent at `since`: if a peer's change of
    /// `parent` (any of its names) or an `All` was announced since, that
    /// announcement's `inval_entry` may have reached the kernel before the
    /// reply (the kernel then had nothing to drop, and keeps the reply's
    /// entry, perhaps an absence, for the whole TTL), so ask again for the
    /// entry to be dropped; the notification thread writes it after this
    /// reply. An announcement applied after this check queues its own
    /// notification after this reply too.
    pub fn settle_name(&self, parent: u64, name: &[u8], since: Ticket) {
        if self.cache.peer_changed_since(since, parent)
            && let Some(k) = &self.attr_inval
        {
            k.entry(parent, name);
        }
    }

    /// The TTL of a `create` reply, which has one for the entry and the
    /// attributes: the full `ttl` (the name exists now, and its attributes
    /// are the ones just made), 0 when a peer's change of the inode was
    /// announced after the request was sent.
    pub fn create_ttl(&self, ino: u64, ttl: Duration, since: Ticket) -> Duration {
        if self.cache.peer_changed_since(since, ino) {
            Duration::ZERO
        } else {
            ttl
        }
    }

    /// After a `create` reply with `ttl_given` ([`Keibi::create_ttl`]):
    /// the new file is open for writing, so its attributes must not stay
    /// cached ([`Keibi::attr_ttl`]): ask the kernel to drop them, keeping
    /// the entry (the notification is written after the reply, which the
    /// kernel has taken in already).
    pub fn after_create(&self, ino: u64, since: Ticket, ttl_given: Duration) {
        if ttl_given > Duration::ZERO
            && let Some(k) = &self.attr_inval
        {
            if self.handles.has_writer(ino) {
                k.attrs_of(ino);
            } else {
                self.settle(ino, since, ttl_given);
            }
        }
    }

    /// The ticket of a request about to be sent, for [`Keibi::attr_ttl`]
    /// and [`Keibi::settle`]: take it before the request.
    pub fn ticket(&self) -> Ticket {
        self.cache.ticket()
    }

    /// After attributes of `ino` (answering a request sent at `since`)
    /// went to the kernel with a TTL above 0: if a peer's change of it was
    /// announced since the TTL was chosen, the announcement's own
    /// notification may have reached the kernel before the reply did, so
    /// ask again for the kernel's copy to be dropped. The notification
    /// thread writes it after this reply, which the kernel has taken in
    /// already (a reply is processed in the write that sends it).
    pub fn settle(&self, ino: u64, since: Ticket, ttl_given: Duration) {
        if ttl_given > Duration::ZERO
            && self.cache.peer_changed_since(since, ino)
            && let Some(k) = &self.attr_inval
        {
            k.attrs_of(ino);
        }
    }

    /// The invalidation stream's half of the filesystem: its caches and
    /// syncd's calls ([`crate::inval`]). `None` without a kernel
    /// notifier ([`Keibi::with_attr_inval`]).
    pub fn invalidation(&self) -> Option<(Arc<dyn SyncData>, Invalidator)> {
        let kernel = self.attr_inval.clone()?;
        Some((
            self.data.clone(),
            Invalidator::new(
                self.cache.clone(),
                self.changes.clone(),
                kernel,
                self.passthrough.clone(),
            ),
        ))
    }

    /// The passthrough state (for `init`).
    pub fn passthrough(&self) -> &Passthrough {
        &self.passthrough
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.deadline
    }

    fn change(&self) -> Change<'_> {
        Change::begin(&self.changes)
    }

    fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// The kernel was given an entry for `attr.ino` (its lookup count of
    /// the inode grew by one; see [`crate::attr_cache`]), from the answer
    /// to a request sent at `since`. A forget of the inode still queued
    /// for syncd is void now.
    pub fn entry_given(&self, attr: &Attr, since: Ticket) {
        if self.cache.looked_up(attr, since) {
            self.releases.referenced_again(attr.ino);
        }
    }

    /// The kernel forgot `n` lookups of `ino`. When it references the
    /// inode no more, syncd is told (queued, never waited for here): an
    /// unlinked inode is freed then.
    pub fn forget(&self, ino: u64, n: u64) {
        if self.cache.forget(ino, n) {
            self.releases.queue_forget(Ino(ino));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_inval::{self, Note};
    use crate::syncd_client::{self, ConnectConfig};

    fn keibi(dir: &std::path::Path) -> (Keibi, kernel_inval::InvalQueue) {
        let passthrough = Arc::new(Passthrough::new(true));
        let (client, _connector) = syncd_client::new(ConnectConfig {
            socket: dir.join("no-syncd.sock"),
            mountpoint: "/nowhere".into(),
            passthrough: passthrough.clone(),
        });
        let (k, q) = kernel_inval::channel();
        let keibi = Keibi::new(
            client,
            passthrough,
            Duration::from_secs(1),
            AttrCache::new(16),
            Duration::from_secs(60),
            tokio::runtime::Handle::current(),
        )
        .with_attr_inval(k);
        (keibi, q)
    }

    #[tokio::test]
    async fn a_lookup_answer_that_crossed_an_announcement_of_its_directory_is_dropped_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k, q) = keibi(dir.path());
        let since = k.ticket();
        k.settle_name(1, b"x", since);
        assert!(q.drain().is_empty(), "nothing announced: the entry stays");
        // A peer's change of a name in directory 1 is announced while the
        // lookup is out.
        k.cache.invalidate(1);
        k.settle_name(1, b"x", since);
        assert_eq!(q.drain(), vec![Note::Entry(1, b"x".to_vec())]);
        k.settle_name(1, b"x", k.ticket());
        assert!(
            q.drain().is_empty(),
            "a lookup sent after it saw the change"
        );
        k.settle_name(2, b"x", since);
        assert!(q.drain().is_empty(), "another directory");
        k.cache.clear();
        k.settle_name(2, b"x", since);
        assert_eq!(q.drain(), vec![Note::Entry(2, b"x".to_vec())], "after All");
    }
}
