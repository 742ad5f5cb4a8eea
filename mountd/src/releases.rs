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
//! The queue's lock is a leaf, held only to insert or remove.

use crate::syncd_client::{CallError, Retry, SyncdClient};
use ipc_schema::HandleId;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the inbox is checked for unclaimed descriptors.
const REAP_INTERVAL: Duration = Duration::from_millis(500);

/// syncd handles whose release is still to be delivered.
#[derive(Default)]
pub struct Releases {
    pending: Mutex<BTreeSet<HandleId>>,
    wake: Notify,
}

impl Releases {
    /// Queue the release of `handle`; returns at once.
    pub fn queue(&self, handle: HandleId) {
        self.lock().insert(handle);
        self.wake.notify_one();
    }

    /// How many releases wait for delivery.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<HandleId>> {
        // A set of numbers stays consistent even if a holder panicked.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
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
                    self.lock().insert(h);
                }
            }
            let batch: Vec<HandleId> = self.lock().iter().copied().collect();
            if batch.is_empty() {
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
                self.lock().remove(&h);
            }
            if stalled {
                tracing::debug!(
                    pending = self.pending(),
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
}
