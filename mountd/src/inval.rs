//! The invalidation stream: what a peer changed, dropped from every cache
//! at once instead of after a TTL.
//!
//! When syncd applies a change that came from a peer, it queues the
//! invalidations it implies ([`Inval`]: an entry of a directory, an
//! inode's attributes and bytes, or everything). One task here long-polls
//! them (`Filesystem::changes(epoch, after, 10 s)`, with a deadline a
//! little longer than the wait) and, for each batch:
//!
//! - drops mountd's own caches: the attributes of the inode or the
//!   directory (which also ends the extended-attribute shortcut for it, as
//!   that reads the cached attributes), the cached entry, and every
//!   directory read-ahead (the mount's change counter moves, see
//!   [`crate::fs`]); a reply to a request sent before is not cached
//!   afterwards ([`crate::attr_cache`]);
//! - queues the kernel's notifications (`inval_entry`, `inval_inode` of
//!   the whole file) for the notifier thread of [`crate::kernel_inval`],
//!   so they are never written from a FUSE callback or under a lock a
//!   callback takes; the queue never blocks this task.
//!
//! Each item also tells the passthrough registry what a peer changed, so
//! that read-only opens of such files are not tied to one version's
//! backing file ([`crate::passthrough`]).
//!
//! [`Inval::All`] (mountd asked for changes syncd no longer keeps, or
//! syncd restarted: the epoch differs) drops all of mountd's caches and
//! the kernel's attributes and pages of every inode it references; the
//! kernel's entries then end with their TTL (`--attr-ttl`), as the kernel
//! has no call to drop them all.
//!
//! syncd unreachable or slow: the poll is asked again, with a backoff from
//! 100 ms to 5 s; it resumes where it was (`after`) on a new connection,
//! or from everything when syncd restarted. A syncd that does not serve
//! the call (`ENOSYS`, an older syncd) is logged once and asked again
//! every [`UNSUPPORTED_RETRY`].

use crate::attr_cache::AttrCache;
use crate::kernel_inval::KernelInval;
use crate::passthrough::Passthrough;
use crate::sync_data::SyncData;
use crate::syncd_client::{CallError, StreamPosition};
use ipc_schema::{ChangeBatch, Inval};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long one poll waits for a change at syncd.
pub const POLL_WAIT: Duration = Duration::from_secs(10);
/// Backoff after a failed poll: first and longest.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long to wait before asking a syncd that answered `ENOSYS` again.
pub const UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);

/// Applies invalidations to mountd's caches and queues the kernel's.
pub struct Invalidator {
    cache: Arc<AttrCache>,
    /// The mount's change counter (directory read-ahead, see
    /// [`crate::fs`]).
    changes: Arc<AtomicU64>,
    kernel: KernelInval,
    /// Told which inodes and names a peer changed (it decides how they
    /// are opened).
    passthrough: Arc<Passthrough>,
}

impl Invalidator {
    /// Over these caches, notifying the kernel through `kernel`.
    pub fn new(
        cache: Arc<AttrCache>,
        changes: Arc<AtomicU64>,
        kernel: KernelInval,
        passthrough: Arc<Passthrough>,
    ) -> Self {
        Invalidator {
            cache,
            changes,
            kernel,
            passthrough,
        }
    }

    /// Apply `items`, oldest first.
    pub fn apply(&self, items: &[Inval]) {
        self.apply_items(items, true);
    }

    /// Apply the first batch of a stream that starts from everything: its
    /// `Inval::All` (a new reader always gets one) drops what was cached
    /// before the stream started, which is no loss worth a note.
    fn apply_first(&self, items: &[Inval]) {
        tracing::info!("invalidation stream started");
        self.apply_items(items, false);
    }

    fn apply_items(&self, items: &[Inval], note_loss: bool) {
        if items.is_empty() {
            return;
        }
        // Any read-ahead asked before this point may hold a removed or
        // renamed name, or old attributes: none is used after it.
        self.changes.fetch_add(1, Ordering::SeqCst);
        for item in items {
            match item {
                Inval::Entry { parent, name } => {
                    self.cache.forget_entry(parent.0, name.as_bytes());
                    // Its mtime, size and link count changed too.
                    self.cache.invalidate(parent.0);
                    self.kernel.entry(parent.0, name.as_bytes());
                    self.passthrough
                        .peer_changed_entry(parent.0, name.as_bytes());
                }
                Inval::Inode { ino } => {
                    self.cache.invalidate(ino.0);
                    self.kernel.inode(ino.0);
                    // The kernel may be making the inode from an entry
                    // reply that predates the change; see
                    // `AttrCache::names_given_lately`.
                    for (parent, name) in self.cache.names_given_lately(ino.0) {
                        self.kernel.entry(parent, &name);
                    }
                    self.passthrough.peer_changed_inode(ino.0);
                }
                Inval::All => {
                    if note_loss {
                        tracing::info!(
                            "invalidation stream: items were lost (syncd restarted, or this mount fell behind); dropping every cache"
                        );
                    }
                    self.cache.clear();
                    // Entries (and absences) the kernel cached before.
                    self.kernel.all_entries();
                    for ino in self.cache.referenced_inos() {
                        self.kernel.inode(ino.0);
                    }
                }
            }
        }
    }
}

/// The stream's position ([`StreamPosition`]: syncd's run and the last
/// sequence number applied) moves as batches are taken in.
impl StreamPosition {
    /// Take `batch` in: the items to apply (with [`Inval::All`] first when
    /// syncd's run changed and it did not say so itself).
    fn take(&mut self, batch: ChangeBatch) -> Vec<Inval> {
        let mut items = batch.items;
        if batch.epoch != self.epoch && self.epoch != 0 && items.first() != Some(&Inval::All) {
            items.insert(0, Inval::All);
        }
        self.epoch = batch.epoch;
        self.after = batch.next;
        items
    }
}

/// How long the stream waits for this process's first connection to
/// learn where syncd's stream stood; after that it starts from everything.
const FIRST_CONNECTION_WAIT: Duration = Duration::from_secs(60);

/// Poll syncd's invalidations for the life of the process and apply them.
///
/// The stream starts where syncd's stood when this process first
/// registered its mount, when syncd said (nothing cached can predate it);
/// else from everything, with an [`Inval::All`] first.
pub async fn run(source: Arc<dyn SyncData>, inval: Invalidator) {
    let mut pos = StreamPosition::default();
    if let Some(start) = source.stream_start(FIRST_CONNECTION_WAIT).await {
        pos = start;
        tracing::info!(
            epoch = pos.epoch,
            after = pos.after,
            "invalidation stream started"
        );
    }
    let mut backoff = MIN_BACKOFF;
    let mut unsupported_told = false;
    let mut failures = 0u32;
    loop {
        match source.changes(pos.epoch, pos.after, POLL_WAIT).await {
            Ok(batch) => {
                let first = pos.epoch == 0;
                let items = pos.take(batch);
                tracing::trace!(n = items.len(), after = pos.after, "invalidations");
                if first {
                    inval.apply_first(&items);
                } else {
                    inval.apply(&items);
                }
                backoff = MIN_BACKOFF;
                failures = 0;
                unsupported_told = false;
                continue;
            }
            Err(CallError::Fs(e)) if e.errno == libc::ENOSYS => {
                if !unsupported_told {
                    tracing::info!(
                        error = %e.message,
                        "keibi-syncd does not send invalidations; changes from peers show after the attribute TTL"
                    );
                    unsupported_told = true;
                }
                tokio::time::sleep(UNSUPPORTED_RETRY).await;
                continue;
            }
            Err(e) => {
                failures += 1;
                let e = e.into_fs("changes");
                if failures == 1 {
                    tracing::debug!(errno = %e.errno_name(), error = %e.message, "invalidation poll failed; retrying");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_inval::{self, InvalQueue, Note};
    use futures::future::BoxFuture;
    use ipc_schema::{Attr, FileKind, FsError, HandleId, Ino, Name, Timestamp};
    use std::collections::VecDeque;
    use std::sync::Mutex;

    fn attr(ino: u64) -> Attr {
        Attr {
            ino: Ino(ino),
            kind: FileKind::File,
            size: 1,
            blocks: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            crtime: Timestamp::default(),
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            has_xattrs: false,
        }
    }

    fn setup() -> (Invalidator, Arc<AttrCache>, Arc<AtomicU64>, InvalQueue) {
        let cache = Arc::new(AttrCache::new(64));
        let changes = Arc::new(AtomicU64::new(0));
        let (k, q) = kernel_inval::channel();
        (
            Invalidator::new(
                cache.clone(),
                changes.clone(),
                k,
                Arc::new(Passthrough::new(true)),
            ),
            cache,
            changes,
            q,
        )
    }

    #[test]
    fn an_entry_drops_the_name_the_directory_and_read_aheads() {
        let (inv, cache, changes, q) = setup();
        let t = cache.ticket();
        cache.put_entry(t, 1, b"f", &attr(5));
        cache.put_attr(t, &attr(1));
        inv.apply(&[Inval::Entry {
            parent: Ino(1),
            name: Name(b"f".to_vec()),
        }]);
        assert_eq!(cache.entry_ino(1, b"f"), None);
        assert_eq!(cache.attr(1), None, "the directory's attributes");
        assert!(cache.attr(5).is_some(), "the inode itself did not change");
        assert_eq!(changes.load(Ordering::SeqCst), 1, "read-aheads are void");
        assert_eq!(q.drain(), vec![Note::Entry(1, b"f".to_vec())]);
    }

    #[test]
    fn an_inode_drops_its_attributes_and_the_xattr_shortcut() {
        let (inv, cache, _, q) = setup();
        let t = cache.ticket();
        cache.put_attr(t, &attr(7));
        assert!(cache.attr(7).is_some_and(|a| !a.has_xattrs));
        inv.apply(&[Inval::Inode { ino: Ino(7) }]);
        // The shortcut answers from these attributes: gone, so the next
        // getxattr asks syncd.
        assert_eq!(cache.attr(7), None);
        assert!(!cache.put_attr(t, &attr(7)), "a reply sent before");
        assert_eq!(q.drain(), vec![Note::Inode(7)]);
    }

    #[test]
    fn all_drops_everything_and_every_referenced_inode() {
        let (inv, cache, changes, q) = setup();
        let t = cache.ticket();
        cache.put_entry(t, 1, b"a", &attr(3));
        cache.put_attr(t, &attr(9));
        cache.looked_up(&attr(3), cache.ticket());
        inv.apply(&[Inval::All]);
        assert_eq!(cache.len(), (0, 0));
        assert_eq!(changes.load(Ordering::SeqCst), 1);
        // Every cached entry and absence goes too (a long entry TTL is
        // only correct with this).
        assert_eq!(q.drain(), vec![Note::Epoch, Note::Inode(3)]);
    }

    #[test]
    fn an_inode_also_drops_the_names_it_was_given_under_lately() {
        let (inv, cache, _, q) = setup();
        // A lookup of d/f answered just now: the kernel may still be making
        // the inode, which an inval_inode alone would miss.
        cache.put_entry(cache.ticket(), 4, b"f", &attr(9));
        inv.apply(&[Inval::Inode { ino: Ino(9) }]);
        assert_eq!(
            q.drain(),
            vec![Note::Inode(9), Note::Entry(4, b"f".to_vec())]
        );
        // An inode given under no name lately: the inode alone.
        inv.apply(&[Inval::Inode { ino: Ino(10) }]);
        assert_eq!(q.drain(), vec![Note::Inode(10)]);
    }

    #[test]
    fn what_a_peer_changed_is_opened_plain_when_read_only() {
        use crate::passthrough::{Mode, OpenKind};
        use ipc_schema::ContentId;
        let cache = Arc::new(AttrCache::new(64));
        let (k, _q) = kernel_inval::channel();
        let pt = Arc::new(Passthrough::new(true));
        pt.set_granted(true);
        let inv = Invalidator::new(cache, Arc::new(AtomicU64::new(0)), k, pt.clone());
        let open = OpenKind {
            content: ContentId {
                dev: 1,
                ino: 1,
                uid: 1,
            },
            partial: false,
            writable: false,
        };
        inv.apply(&[
            Inval::Inode { ino: Ino(8) },
            Inval::Entry {
                parent: Ino(1),
                name: Name(b"new".to_vec()),
            },
        ]);
        let r = pt.mode_for(8, open, || panic!("must not register"));
        assert!(matches!(r, Ok(Mode::Plain)));
        pt.entry_seen(1, b"new", 9);
        let r = pt.mode_for(9, open, || panic!("must not register"));
        assert!(matches!(r, Ok(Mode::Plain)));
    }

    #[test]
    fn an_empty_batch_changes_nothing() {
        let (inv, cache, changes, q) = setup();
        cache.put_attr(cache.ticket(), &attr(2));
        inv.apply(&[]);
        assert!(cache.attr(2).is_some());
        assert_eq!(changes.load(Ordering::SeqCst), 0);
        assert!(q.drain().is_empty());
    }

    #[test]
    fn a_new_epoch_means_all() {
        let mut pos = StreamPosition::default();
        let batch = |epoch, next, items| ChangeBatch { epoch, next, items };
        // The first answer of a run: taken as it is.
        let items = pos.take(batch(7, 3, vec![Inval::Inode { ino: Ino(2) }]));
        assert_eq!(items, vec![Inval::Inode { ino: Ino(2) }]);
        assert_eq!(pos, StreamPosition { epoch: 7, after: 3 });
        // Same run: as it is.
        assert!(pos.take(batch(7, 3, vec![])).is_empty());
        // syncd restarted without saying All: mountd adds it.
        let items = pos.take(batch(8, 1, vec![Inval::Inode { ino: Ino(4) }]));
        assert_eq!(items, vec![Inval::All, Inval::Inode { ino: Ino(4) }]);
        // ... but not twice.
        let items = pos.take(batch(9, 1, vec![Inval::All]));
        assert_eq!(items, vec![Inval::All]);
        assert_eq!(pos, StreamPosition { epoch: 9, after: 1 });
    }

    /// A syncd that answers `changes` from a script, then waits forever.
    struct Scripted {
        answers: Mutex<VecDeque<Result<ChangeBatch, CallError>>>,
        asked: Mutex<Vec<(u64, u64)>>,
        start: Option<StreamPosition>,
    }

    impl SyncData for Scripted {
        fn fetch_range(
            &self,
            _: HandleId,
            _: u64,
            _: u64,
            _: tokio::time::Instant,
        ) -> BoxFuture<'static, Result<Vec<u64>, FsError>> {
            Box::pin(async { Err(FsError::new(libc::ENOSYS, "not here")) })
        }

        fn changes(
            &self,
            epoch: u64,
            after: u64,
            _: Duration,
        ) -> BoxFuture<'static, Result<ChangeBatch, CallError>> {
            self.asked.lock().expect("lock").push((epoch, after));
            let next = self.answers.lock().expect("lock").pop_front();
            Box::pin(async move {
                match next {
                    Some(a) => a,
                    None => futures::future::pending().await,
                }
            })
        }

        fn stream_start(&self, _: Duration) -> BoxFuture<'static, Option<StreamPosition>> {
            let start = self.start;
            Box::pin(async move { start })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_resumes_after_errors_and_backs_off_on_enosys() {
        let (inv, cache, _, q) = setup();
        cache.put_attr(cache.ticket(), &attr(5));
        let src = Arc::new(Scripted {
            answers: Mutex::new(VecDeque::from(vec![
                Err(CallError::Fs(FsError::new(libc::ENOSYS, "stub"))),
                Ok(ChangeBatch {
                    epoch: 4,
                    next: 10,
                    items: vec![Inval::All],
                }),
                Err(CallError::Deadline {
                    waited: Duration::from_secs(13),
                }),
                Ok(ChangeBatch {
                    epoch: 4,
                    next: 11,
                    items: vec![Inval::Inode { ino: Ino(5) }],
                }),
            ])),
            asked: Mutex::new(Vec::new()),
            start: None,
        });
        let task = tokio::spawn(run(src.clone(), inv));
        // Right after ENOSYS nothing is asked again for a while.
        tokio::time::sleep(UNSUPPORTED_RETRY / 2).await;
        assert_eq!(src.asked.lock().expect("lock").len(), 1);
        tokio::time::sleep(UNSUPPORTED_RETRY).await;
        assert_eq!(
            *src.asked.lock().expect("lock"),
            vec![(0, 0), (0, 0), (4, 10), (4, 10), (4, 11)],
            "asked again after ENOSYS, then resumed where it was after the missed poll"
        );
        assert_eq!(cache.attr(5), None);
        // The first batch's `All` dropped every kernel entry.
        assert_eq!(q.drain(), vec![Note::Epoch, Note::Inode(5)]);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_starts_where_syncd_stood_drops_nothing_cached_since() {
        let (inv, cache, _, q) = setup();
        let t = cache.ticket();
        cache.put_attr(t, &attr(1));
        cache.put_attr(t, &attr(6));
        let src = Arc::new(Scripted {
            answers: Mutex::new(VecDeque::from(vec![Ok(ChangeBatch {
                epoch: 4,
                next: 12,
                items: vec![Inval::Inode { ino: Ino(6) }],
            })])),
            asked: Mutex::new(Vec::new()),
            start: Some(StreamPosition {
                epoch: 4,
                after: 11,
            }),
        });
        let task = tokio::spawn(run(src.clone(), inv));
        tokio::time::sleep(POLL_WAIT).await;
        assert_eq!(
            *src.asked.lock().expect("lock"),
            vec![(4, 11), (4, 12)],
            "asked from the start position on"
        );
        assert!(cache.attr(1).is_some(), "no All: the root stays cached");
        assert_eq!(cache.attr(6), None, "the change after the start applies");
        assert_eq!(q.drain(), vec![Note::Inode(6)]);
        task.abort();
    }
}
