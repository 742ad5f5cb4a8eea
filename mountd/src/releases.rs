//! Releases that reach syncd eventually.
//!
//! FUSE `release` (and `flush`) are answered at once and never wait on
//! syncd (failure mode 3). syncd still has to hear about every release,
//! because it counts opens to know when an unlinked file can be freed.
//! So a release is put in this queue and a background task delivers it:
//! each call has the usual deadline; a release that fails for lack of an
//! answer (deadline, no connection) stays queued and is tried again after
//! a backoff (50 ms doubling to 2 s), across reconnects. Since syncd's
//! handle ids are unique across its restarts, a queued release can be
//! sent on any later connection: the worst it can meet is a handle syncd
//! has already forgotten, which it ignores.
//!
//! On a reconnect mountd lists the handles it holds (`register_mount`),
//! and queued releases are not in that list, so syncd drops them there
//! already; the queued call that follows is then a harmless no-op.
//!
//! The same task collects descriptors that syncd sent for an open nobody
//! waits for any more (mountd's call timed out before the answer came):
//! once a descriptor has sat in the connection's inbox for longer than any
//! open could wait for it, it is closed and its handle released
//! ([`ipc_schema::fdpass::FdInbox::take_unclaimed`]).
//!
//! # Forgets
//!
//! The same task tells syncd which inodes the kernel no longer references
//! (their lookup count reached zero, see [`crate::attr_cache`]), so that it
//! can free unlinked ones: [`Releases::queue_forget`], delivered in
//! batches (one `forget` call carries up to [`FORGET_BATCH`] inodes) and
//! retried like releases. A forget must never reach syncd after the kernel
//! was given the inode again and then removed its last name: syncd would
//! free an inode the kernel references. So an inode given to the kernel
//! again leaves the queue ([`Releases::referenced_again`]); if its forget
//! is already on its way, the forget has *crossed* the new reference, and
//! removals (`unlink`, `rename`) wait until that call is over
//! ([`Releases::crossings_settled`]) before they are sent: the forget then
//! reaches syncd before the removal, while the inode still has its name,
//! and does nothing. syncd applies a forget only before its deadline (under
//! the open-table lock), and removals wait [`CROSSING_GRACE`] beyond a
//! missed deadline, so a late forget cannot land after a removal either.
//! Crossings are rare (the kernel must evict an inode and look it up again
//! within one call to syncd), so removals almost never wait.
//!
//! The queue's lock is a leaf, held only to insert or remove.

use crate::syncd_client::{CallError, Retry, SyncdClient};
use ipc_schema::{HandleId, Ino};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Most inodes in one `forget` call.
pub const FORGET_BATCH: usize = 4096;
/// How long removals still wait after a crossed forget missed its
/// deadline: longer than the deadline of the call can differ between
/// mountd and syncd (tarpc sends it as time left, so syncd's is later by
/// the time the request took to arrive).
pub const CROSSING_GRACE: Duration = Duration::from_secs(1);

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the inbox is checked for unclaimed descriptors.
const REAP_INTERVAL: Duration = Duration::from_millis(500);
/// How long forgets gather before they are sent, so that a removal of
/// many files (`rm -r`, whose every unlink makes the kernel forget an
/// inode) costs a few `forget` calls rather than one per file. Nothing
/// waits for a forget: it only lets syncd free an unlinked inode's
/// content a little later. An inode given to the kernel again meanwhile
/// just leaves the queue ([`Releases::referenced_again`]).
const FORGET_GATHER: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Pending {
    /// Handles whose release is still to be delivered.
    releases: BTreeSet<HandleId>,
    /// Inodes whose forget is still to be delivered.
    forgets: BTreeSet<Ino>,
    /// The inodes of the `forget` call on its way, if one is.
    in_flight: BTreeSet<Ino>,
    /// When the oldest queued forget was queued (see [`FORGET_GATHER`]).
    forgets_since: Option<Instant>,
    /// Inodes of that call given to the kernel again meanwhile.
    crossed: BTreeSet<Ino>,
    /// Until when removals wait after a crossed call missed its deadline.
    hold_until: Option<Instant>,
}

/// syncd handles whose release, and inodes whose forget, is still to be
/// delivered.
#[derive(Default)]
pub struct Releases {
    pending: Mutex<Pending>,
    wake: Notify,
    /// Woken when a crossed `forget` call is over.
    settled: Notify,
}

impl Releases {
    /// Queue the release of `handle`; returns at once.
    pub fn queue(&self, handle: HandleId) {
        self.lock().releases.insert(handle);
        self.wake.notify_one();
    }

    /// How many releases wait for delivery.
    pub fn pending(&self) -> usize {
        self.lock().releases.len()
    }

    /// Queue a forget of `ino` (the kernel references it no more); returns
    /// at once.
    pub fn queue_forget(&self, ino: Ino) {
        let mut p = self.lock();
        p.forgets.insert(ino);
        p.forgets_since.get_or_insert_with(Instant::now);
        drop(p);
        self.wake.notify_one();
    }

    /// Until when queued forgets still gather before they are sent
    /// ([`FORGET_GATHER`]); `None` when they are due (or there are none).
    fn gathering_until(&self) -> Option<Instant> {
        let mut p = self.lock();
        if p.forgets.is_empty() {
            p.forgets_since = None;
        }
        let until = p.forgets_since? + FORGET_GATHER;
        (p.forgets.len() < FORGET_BATCH && until > Instant::now()).then_some(until)
    }

    /// The kernel was given `ino` again (its lookup count left zero): its
    /// queued forget is void (see the module doc).
    pub fn referenced_again(&self, ino: Ino) {
        let mut p = self.lock();
        p.forgets.remove(&ino);
        if p.in_flight.contains(&ino) {
            p.crossed.insert(ino);
        }
    }

    /// How many forgets wait for delivery.
    pub fn pending_forgets(&self) -> usize {
        self.lock().forgets.len()
    }

    /// Wait (until `deadline` at most) until no `forget` call that crossed
    /// a new reference may still reach syncd; a removal calls this before
    /// it is sent (see the module doc).
    pub async fn crossings_settled(&self, deadline: Instant) {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            let until = {
                let p = self.lock();
                if !p.crossed.is_empty() {
                    Some(deadline)
                } else {
                    p.hold_until.filter(|t| *t > Instant::now())
                }
            };
            let Some(until) = until else {
                return;
            };
            let until = until.min(deadline);
            if tokio::time::timeout_at(until, settled).await.is_err() && until >= deadline {
                return;
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Sets of numbers stay consistent even if a holder panicked.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the next batch of forgets and mark it in flight.
    fn take_forgets(&self) -> Vec<Ino> {
        let mut p = self.lock();
        let batch: Vec<Ino> = p.forgets.iter().take(FORGET_BATCH).copied().collect();
        for i in &batch {
            p.forgets.remove(i);
        }
        // What is left was due already: its time stays.
        if p.forgets.is_empty() {
            p.forgets_since = None;
        }
        p.in_flight = batch.iter().copied().collect();
        batch
    }

    /// The forget call of `batch` is over: `delivered` if syncd applied
    /// it; else it goes back to the queue, less the inodes referenced
    /// again. `answered`: syncd answered (then nothing of it can land
    /// later; without an answer removals wait a grace period more).
    fn forgets_done(&self, batch: Vec<Ino>, delivered: bool, answered: bool) {
        let mut p = self.lock();
        let crossed = std::mem::take(&mut p.crossed);
        if !answered && !crossed.is_empty() {
            p.hold_until = Some(Instant::now() + CROSSING_GRACE);
        }
        if !delivered {
            p.forgets
                .extend(batch.into_iter().filter(|i| !crossed.contains(i)));
            p.forgets_since.get_or_insert_with(Instant::now);
        }
        p.in_flight.clear();
        drop(p);
        self.settled.notify_waiters();
    }

    /// Send one batch of forgets; false if it was not applied (syncd did
    /// not answer in time, or got it too late): back off then.
    async fn deliver_forgets(&self, client: &SyncdClient, deadline: Duration) -> bool {
        let batch = self.take_forgets();
        if batch.is_empty() {
            return true;
        }
        let inos = batch.clone();
        let r = client
            .call(
                "forget",
                batch.first().map_or(0, |i| i.0),
                Instant::now() + deadline,
                Retry::Idempotent,
                |c, ctx| {
                    let inos = inos.clone();
                    async move { c.client.forget(ctx, inos).await }
                },
            )
            .await;
        let (delivered, answered) = match r {
            Ok(()) => (true, true),
            // Arrived after its deadline: syncd did nothing; send again.
            Err(CallError::Fs(e)) if e.errno == libc::ETIMEDOUT => (false, true),
            Err(CallError::Fs(e)) => {
                tracing::warn!(inodes = batch.len(), error = %e, "keibi-syncd failed a forget");
                (true, true)
            }
            Err(CallError::Deadline { .. }) => (false, false),
        };
        self.forgets_done(batch, delivered, answered);
        delivered
    }

    /// Deliver queued releases forever, each call bounded by `deadline`.
    /// Descriptors unclaimed for `unclaimed_after` are closed and
    /// released.
    pub async fn deliver(
        self: Arc<Self>,
        client: SyncdClient,
        deadline: Duration,
        unclaimed_after: Duration,
    ) {
        let mut backoff = MIN_BACKOFF;
        loop {
            if let Some(conn) = client.current_connection() {
                for h in conn.inbox.take_unclaimed(unclaimed_after) {
                    tracing::info!(
                        syncd_handle = h.0,
                        "closed a descriptor nobody waited for; releasing its open"
                    );
                    self.lock().releases.insert(h);
                }
            }
            let batch: Vec<HandleId> = self.lock().releases.iter().copied().collect();
            if batch.is_empty() && self.pending_forgets() == 0 {
                let _ = tokio::time::timeout(REAP_INTERVAL, self.wake.notified()).await;
                continue;
            }
            let mut stalled = false;
            for h in batch {
                let r = client
                    .call(
                        "release",
                        h.0,
                        Instant::now() + deadline,
                        Retry::Idempotent,
                        |c, ctx| async move { c.client.release(ctx, h).await },
                    )
                    .await;
                match r {
                    Ok(()) => {}
                    Err(CallError::Fs(e)) => {
                        // syncd answered: it has forgotten the handle
                        // either way; only freeing an orphan failed.
                        tracing::warn!(syncd_handle = h.0, error = %e, "keibi-syncd failed a release");
                    }
                    Err(CallError::Deadline { .. }) => {
                        stalled = true;
                        break;
                    }
                }
                self.lock().releases.remove(&h);
            }
            if !stalled {
                if let Some(until) = self.gathering_until() {
                    // A release queued meanwhile is sent at once.
                    let _ = tokio::time::timeout_at(until, self.wake.notified()).await;
                    continue;
                }
                stalled = !self.deliver_forgets(&client, deadline).await;
            }
            if stalled {
                tracing::debug!(
                    pending = self.pending(),
                    forgets = self.pending_forgets(),
                    backoff_ms = backoff.as_millis() as u64,
                    "releases wait for keibi-syncd"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            } else {
                backoff = MIN_BACKOFF;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_each_handle_once() {
        let r = Releases::default();
        r.queue(HandleId(3));
        r.queue(HandleId(3));
        r.queue(HandleId(1));
        assert_eq!(r.pending(), 2);
    }

    #[test]
    fn a_forget_given_again_leaves_the_queue() {
        let r = Releases::default();
        r.queue_forget(Ino(5));
        r.queue_forget(Ino(6));
        r.referenced_again(Ino(5));
        assert_eq!(r.take_forgets(), vec![Ino(6)]);
        r.forgets_done(vec![Ino(6)], true, true);
        assert_eq!(r.pending_forgets(), 0);
    }

    #[tokio::test]
    async fn removals_wait_for_a_crossed_forget() {
        let r = Arc::new(Releases::default());
        r.queue_forget(Ino(5));
        r.queue_forget(Ino(6));
        let batch = r.take_forgets();
        // Not crossed: removals go at once.
        let far = Instant::now() + Duration::from_secs(30);
        r.crossings_settled(far).await;
        r.referenced_again(Ino(5));
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.crossings_settled(far).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a crossed forget is on its way");
        // It missed its deadline: 6 goes back to the queue, 5 does not,
        // and removals wait a grace period more.
        r.forgets_done(batch, false, false);
        assert_eq!(r.pending_forgets(), 1);
        let held = Instant::now();
        waiter.await.expect("waiter");
        assert!(held.elapsed() >= CROSSING_GRACE - Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn forgets_gather_for_a_moment_and_a_batch_never_waits() {
        let r = Releases::default();
        assert_eq!(r.gathering_until(), None, "nothing queued");
        r.queue_forget(Ino(5));
        let until = r.gathering_until().expect("the first forget gathers");
        tokio::time::sleep(FORGET_GATHER / 2).await;
        r.queue_forget(Ino(6));
        assert_eq!(r.gathering_until(), Some(until), "timed from the oldest");
        tokio::time::sleep(FORGET_GATHER / 2).await;
        assert_eq!(r.gathering_until(), None, "due");
        assert_eq!(r.take_forgets(), vec![Ino(5), Ino(6)]);
        r.forgets_done(vec![Ino(5), Ino(6)], true, true);
        // A full batch goes at once.
        for i in 0..FORGET_BATCH as u64 {
            r.queue_forget(Ino(100 + i));
        }
        assert_eq!(r.gathering_until(), None, "a full batch is due");
        // A forget referenced again empties the queue: nothing gathers.
        let _ = r.take_forgets();
        r.queue_forget(Ino(7));
        r.referenced_again(Ino(7));
        assert_eq!(r.gathering_until(), None);
    }
}
