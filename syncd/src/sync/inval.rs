//! The invalidation queue: what mountd must drop from the kernel's caches
//! and its own after syncd applied a change that came from a peer, or
//! after another mount of this syncd changed something.
//!
//! The sync engine [`InvalQueue::push`]es the [`Inval`]s of each record it
//! applies; mountd long-polls them with `Filesystem::changes(epoch, after,
//! wait_ms)`, which is [`InvalQueue::wait`]. Each item gets the next
//! sequence number (from 1); a batch answers the items after `after`, oldest
//! first, and `next`, the sequence number to ask after next time.
//!
//! Bounded memory: the queue keeps the last [`KEEP`] items. A mountd that
//! asks after a sequence number older than that (it was away, or slow) has
//! lost items, and gets one [`Inval::All`] instead: drop every cache. The
//! same happens when the epoch it names is not this run's (`epoch` is a
//! random number per syncd start, never 0): syncd restarted, and what
//! mountd knew of the old run's sequence means nothing now. So mountd
//! never misses an invalidation; at worst it drops more than it needed.
//!
//! Several mounts of one syncd: a change made through one mount is pushed
//! with that mount's connection as its origin ([`InvalQueue::push_from`],
//! from the filesystem service), and every other mount is told of it
//! like a peer's change; the mount that made it is not (its kernel and
//! caches already have it), and is not even woken for it.
//!
//! Waiting never holds the lock: a waiter registers for the wake-up
//! ([`Notify`]) first, then looks at the queue under the lock, releases it
//! and sleeps; `push` wakes every waiter after releasing the lock. The lock
//! is a leaf: nothing else is locked while it is held.

use ipc_schema::{ChangeBatch, Inval};
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// How many invalidations the queue keeps.
pub const KEEP: usize = 4096;

/// The most items one batch answers (the rest come with the next call).
pub const MAX_BATCH: usize = 1024;

/// A mount's own items wake it once per this many items pushed, so that
/// its position moves on (at half of [`KEEP`] behind) long before its own
/// items could push what it has not read out of the queue.
const WAKE_EVERY: usize = KEEP / 4;

/// Counts a long poll of `reader` in the ring while it waits.
struct Waiting<'a> {
    queue: &'a InvalQueue,
    reader: u64,
}

impl<'a> Waiting<'a> {
    fn new(queue: &'a InvalQueue, reader: u64) -> Self {
        *queue.lock().waiting.entry(reader).or_default() += 1;
        Waiting { queue, reader }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut ring = self.queue.lock();
        if let Some(n) = ring.waiting.get_mut(&self.reader) {
            *n -= 1;
            if *n == 0 {
                ring.waiting.remove(&self.reader);
            }
        }
    }
}

/// The queue (see the module doc). Shared as `Arc<InvalQueue>`.
pub struct InvalQueue {
    epoch: u64,
    ring: Mutex<Ring>,
    wake: Notify,
}

/// The kept items and the last sequence number given out.
#[derive(Default)]
struct Ring {
    /// `(seq, item, origin)`, oldest first, consecutive seqs; `origin` is
    /// the connection of the mount whose change it announces (0: a peer's
    /// change), which is not told of its own changes.
    items: VecDeque<(u64, Inval, u64)>,
    /// Origin → the sequence number of its newest item, so that a mount
    /// woken by its own changes finds out without reading them (one entry
    /// per connection that ever changed something, and one for peers).
    newest: HashMap<u64, u64>,
    /// Reader → how many of its long polls wait now ([`InvalQueue::wait_for`]).
    waiting: HashMap<u64, usize>,
    /// The sequence number of the newest item (0: none yet).
    last: u64,
}

impl Default for InvalQueue {
    fn default() -> Self {
        InvalQueue::new()
    }
}

impl InvalQueue {
    /// An empty queue with a fresh random epoch.
    pub fn new() -> InvalQueue {
        let mut epoch = 0;
        while epoch == 0 {
            epoch = rand::random::<u64>();
        }
        InvalQueue::with_epoch(epoch)
    }

    /// An empty queue of run `epoch` (tests).
    pub fn with_epoch(epoch: u64) -> InvalQueue {
        InvalQueue {
            epoch,
            ring: Mutex::new(Ring::default()),
            wake: Notify::new(),
        }
    }

    /// This run's epoch.
    #[cfg(test)]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append `items` (each gets the next sequence number) and wake the
    /// waiters. Items beyond [`KEEP`] push the oldest out.
    pub fn push(&self, items: Vec<Inval>) {
        self.push_from(0, items);
    }

    /// [`InvalQueue::push`] of a change made through the mount on
    /// connection `origin` (not 0): every other mount of this syncd is
    /// told, that one is not ([`InvalQueue::wait_for`]).
    pub fn push_from(&self, origin: u64, items: Vec<Inval>) {
        if items.is_empty() {
            return;
        }
        let wake = {
            let mut ring = self.lock();
            let before = ring.last;
            for item in items {
                ring.last += 1;
                let seq = ring.last;
                ring.items.push_back((seq, item, origin));
            }
            let last = ring.last;
            ring.newest.insert(origin, last);
            let excess = ring.items.len().saturating_sub(KEEP);
            ring.items.drain(..excess);
            // Wake only readers that are told of these items; every
            // `WAKE_EVERY` items, every reader (its position may have to
            // move on past its own items, see `ready`).
            let step = WAKE_EVERY as u64;
            origin == 0
                || before / step != last / step
                || ring
                    .waiting
                    .iter()
                    .any(|(reader, n)| *n > 0 && (*reader == 0 || *reader != origin))
        };
        if wake {
            self.wake.notify_waiters();
        }
    }

    /// The batch after `after` of run `epoch` for the mount on connection
    /// `reader` (0: everything), if one is ready without waiting (`None`:
    /// nothing new for it). Items of `reader`'s own changes are left out;
    /// when only those came, the position moves on only once they fill
    /// half the queue, so that a mount is not woken for its own changes
    /// and still never falls behind the kept items because of them.
    fn ready(&self, epoch: u64, after: u64, reader: u64) -> Option<ChangeBatch> {
        let ring = self.lock();
        let all = || ChangeBatch {
            epoch: self.epoch,
            next: ring.last,
            items: vec![Inval::All],
        };
        if epoch != self.epoch || after > ring.last {
            return Some(all());
        }
        if after == ring.last {
            return None;
        }
        let oldest = ring.items.front().map_or(ring.last + 1, |(seq, _, _)| *seq);
        if after + 1 < oldest {
            // Items after `after` were pushed out.
            return Some(all());
        }
        let skip = (after + 1 - oldest) as usize;
        let own_only = !ring
            .newest
            .iter()
            .any(|(origin, seq)| (reader == 0 || *origin != reader) && *seq > after);
        if own_only && ((ring.last - after) as usize) < KEEP / 2 {
            return None;
        }
        let taken: Vec<&(u64, Inval, u64)> = ring.items.iter().skip(skip).take(MAX_BATCH).collect();
        let next = taken.last().map_or(after, |(seq, _, _)| *seq);
        let items: Vec<Inval> = taken
            .iter()
            .filter(|(_, _, origin)| reader == 0 || *origin != reader)
            .map(|(_, item, _)| item.clone())
            .collect();
        // Items for `reader` exist (perhaps beyond this batch): even an
        // empty batch moves its position on, so it asks again from there.
        Some(ChangeBatch {
            epoch: self.epoch,
            next,
            items,
        })
    }

    /// The invalidations after sequence number `after` of run `epoch`:
    /// at once if there are any (or [`Inval::All`] when `epoch` is not
    /// this run's or items after `after` were dropped), else the first to
    /// come within `max_wait`, else an empty batch with `next == after`.
    #[cfg(test)]
    pub async fn wait(&self, epoch: u64, after: u64, max_wait: Duration) -> ChangeBatch {
        self.wait_for(epoch, after, max_wait, 0).await
    }

    /// [`InvalQueue::wait`] for the mount on connection `reader`, which is
    /// not told of its own changes ([`InvalQueue::push_from`]).
    pub async fn wait_for(
        &self,
        epoch: u64,
        after: u64,
        max_wait: Duration,
        reader: u64,
    ) -> ChangeBatch {
        let deadline = tokio::time::Instant::now() + max_wait;
        let _waiting = Waiting::new(self, reader);
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            // Registered before looking, so a push in between wakes us.
            woken.as_mut().enable();
            if let Some(batch) = self.ready(epoch, after, reader) {
                return batch;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return ChangeBatch {
                    epoch: self.epoch,
                    next: after,
                    items: Vec::new(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn inode(ino: u64) -> Inval {
        Inval::Inode {
            ino: ipc_schema::Ino(ino),
        }
    }

    #[tokio::test]
    async fn items_come_in_order_with_their_next_seq() {
        let q = InvalQueue::with_epoch(7);
        q.push(vec![inode(1), inode(2)]);
        q.push(vec![inode(3)]);
        let b = q.wait(7, 0, Duration::ZERO).await;
        assert_eq!(b.epoch, 7);
        assert_eq!(b.next, 3);
        assert_eq!(b.items, vec![inode(1), inode(2), inode(3)]);
        let b = q.wait(7, 2, Duration::ZERO).await;
        assert_eq!((b.next, b.items), (3, vec![inode(3)]));
    }

    #[tokio::test]
    async fn nothing_new_waits_then_answers_empty() {
        let q = InvalQueue::with_epoch(7);
        q.push(vec![inode(1)]);
        let b = q.wait(7, 1, Duration::from_millis(20)).await;
        assert_eq!(b.epoch, 7);
        assert_eq!(b.next, 1);
        assert!(b.items.is_empty());
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_a_push() {
        let q = Arc::new(InvalQueue::with_epoch(7));
        let waiter = tokio::spawn({
            let q = q.clone();
            // A bound far beyond the test's own, so only the push ends it.
            async move { q.wait(7, 0, Duration::from_secs(600)).await }
        });
        // Push until the waiter has its batch (a push before it registered
        // is answered at once too, so no ordering is assumed).
        q.push(vec![inode(5)]);
        let b = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the push woke the waiter")
            .expect("the waiter did not panic");
        assert_eq!((b.next, b.items), (1, vec![inode(5)]));
    }

    #[tokio::test]
    async fn another_epoch_gets_all() {
        let q = InvalQueue::with_epoch(7);
        q.push(vec![inode(1)]);
        let b = q.wait(0, 0, Duration::ZERO).await;
        assert_eq!((b.epoch, b.next, b.items), (7, 1, vec![Inval::All]));
        // An empty queue too: a restarted syncd has nothing queued, but
        // mountd's caches are of the old run.
        let q = InvalQueue::with_epoch(8);
        let b = q.wait(7, 5, Duration::ZERO).await;
        assert_eq!((b.epoch, b.next, b.items), (8, 0, vec![Inval::All]));
    }

    #[tokio::test]
    async fn a_seq_that_was_pushed_out_gets_all() {
        let q = InvalQueue::with_epoch(7);
        q.push((0..KEEP as u64 + 10).map(inode).collect());
        // Items 1..=10 are gone: asking after 9 lost item 10.
        let b = q.wait(7, 9, Duration::ZERO).await;
        assert_eq!((b.next, b.items), (KEEP as u64 + 10, vec![Inval::All]));
        // After 10, item 11 onwards are all kept.
        let b = q.wait(7, 10, Duration::ZERO).await;
        assert_eq!(b.items.len(), MAX_BATCH);
        assert_eq!(b.items[0], inode(10));
        assert_eq!(b.next, 10 + MAX_BATCH as u64);
        // A seq from the future (not of this run's numbering) gets All.
        let b = q.wait(7, KEEP as u64 + 11, Duration::ZERO).await;
        assert_eq!(b.items, vec![Inval::All]);
    }

    #[test]
    fn epochs_are_random_and_never_zero() {
        let a = InvalQueue::new();
        let b = InvalQueue::new();
        assert_ne!(a.epoch(), 0);
        assert_ne!(a.epoch(), b.epoch());
    }

    #[tokio::test]
    async fn a_mount_is_not_told_of_its_own_changes() {
        let q = InvalQueue::with_epoch(7);
        q.push_from(3, vec![inode(1)]);
        q.push(vec![inode(2)]);
        q.push_from(4, vec![inode(5)]);
        let b = q.wait_for(7, 0, Duration::ZERO, 3).await;
        assert_eq!((b.next, b.items), (3, vec![inode(2), inode(5)]));
        let b = q.wait_for(7, 0, Duration::ZERO, 4).await;
        assert_eq!((b.next, b.items), (3, vec![inode(1), inode(2)]));
        // Only its own changes since: nothing to answer, the position
        // stays where it was.
        q.push_from(3, vec![inode(6)]);
        let b = q.wait_for(7, 3, Duration::from_millis(20), 3).await;
        assert_eq!((b.next, b.items.len()), (3, 0));
        // Once its own fill half the kept items, the position moves on
        // (it would otherwise fall behind the kept items).
        for i in 0..KEEP as u64 / 2 {
            q.push_from(3, vec![inode(100 + i)]);
        }
        let b = q.wait_for(7, 3, Duration::ZERO, 3).await;
        assert!(b.items.is_empty());
        assert!(b.next > 3, "moved on to {}", b.next);
    }

    #[tokio::test]
    async fn a_mounts_own_changes_do_not_wake_it_but_anothers_do() {
        let q = Arc::new(InvalQueue::with_epoch(7));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.wait_for(7, 0, Duration::from_secs(600), 3).await }
        });
        while q.lock().waiting.get(&3).copied().unwrap_or(0) == 0 {
            tokio::task::yield_now().await;
        }
        q.push_from(3, vec![inode(1)]);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "woken by its own change");
        q.push_from(4, vec![inode(2)]);
        let b = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by another mount's change")
            .expect("waiter");
        assert_eq!((b.next, b.items), (2, vec![inode(2)]));
        assert!(q.lock().waiting.is_empty(), "the count went with the poll");
    }

    #[tokio::test]
    async fn another_mounts_change_behind_a_batch_of_own_ones_still_comes() {
        let q = InvalQueue::with_epoch(7);
        for i in 0..MAX_BATCH as u64 + 10 {
            q.push_from(3, vec![inode(100 + i)]);
        }
        q.push_from(4, vec![inode(2)]);
        let b = q.wait_for(7, 0, Duration::ZERO, 3).await;
        assert_eq!((b.next, b.items.len()), (MAX_BATCH as u64, 0));
        let b = q.wait_for(7, b.next, Duration::ZERO, 3).await;
        assert_eq!(b.items, vec![inode(2)]);
    }
}
