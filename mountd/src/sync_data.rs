//! The calls of mountd's sync paths to syncd, behind a trait so that the
//! logic that makes them ([`crate::ondemand`], [`crate::inval`]) is unit
//! tested against a fake syncd, without a mount or a socket.
//!
//! Both calls go outside the stalled bookkeeping of
//! [`SyncdClient`] ([`SyncdClient::call_untracked`]): the invalidation
//! long poll waits by design, and `fetch_range` waits on a peer, so
//! neither says anything about whether syncd itself keeps up.

use crate::syncd_client::{CallError, Retry, StreamPosition, SyncdClient};
use futures::future::BoxFuture;
use ipc_schema::{ChangeBatch, FsError, HandleId};
use std::time::Duration;
use tokio::time::Instant;

/// How much longer than the long poll's own wait mountd waits for its
/// answer before it counts as missed.
pub const POLL_MARGIN: Duration = Duration::from_secs(3);

/// What mountd asks syncd for files that are not all local and for the
/// changes a peer made.
pub trait SyncData: Send + Sync + 'static {
    /// `Filesystem::fetch_range`: make the chunks of `[offset, offset +
    /// len)` of the version open as `handle` present, by `deadline`;
    /// answers the handle's presence bitmap.
    fn fetch_range(
        &self,
        handle: HandleId,
        offset: u64,
        len: u64,
        deadline: Instant,
    ) -> BoxFuture<'static, Result<Vec<u64>, FsError>>;

    /// `Filesystem::changes`: the invalidations after `after` of run
    /// `epoch`, waiting up to `wait` for one.
    fn changes(
        &self,
        epoch: u64,
        after: u64,
        wait: Duration,
    ) -> BoxFuture<'static, Result<ChangeBatch, CallError>>;

    /// Where the invalidation stream stood before syncd answered this
    /// process anything, if syncd said so (waits up to `wait` for the
    /// first connection). `None`: start from the beginning, with
    /// [`ipc_schema::Inval::All`].
    fn stream_start(&self, wait: Duration) -> BoxFuture<'static, Option<StreamPosition>> {
        let _ = wait;
        Box::pin(async { None })
    }
}

impl SyncData for SyncdClient {
    fn fetch_range(
        &self,
        handle: HandleId,
        offset: u64,
        len: u64,
        deadline: Instant,
    ) -> BoxFuture<'static, Result<Vec<u64>, FsError>> {
        let c = self.clone();
        Box::pin(async move {
            c.call_untracked(
                "fetch_range",
                0,
                deadline,
                Retry::Idempotent,
                |c, ctx| async move { c.client.fetch_range(ctx, handle, offset, len).await },
            )
            .await
            .map_err(|e| e.into_fs("fetch_range"))
        })
    }

    fn changes(
        &self,
        epoch: u64,
        after: u64,
        wait: Duration,
    ) -> BoxFuture<'static, Result<ChangeBatch, CallError>> {
        let c = self.clone();
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        Box::pin(async move {
            let deadline = Instant::now() + wait + POLL_MARGIN;
            c.call_untracked(
                "changes",
                1,
                deadline,
                Retry::Idempotent,
                |c, ctx| async move { c.client.changes(ctx, epoch, after, wait_ms).await },
            )
            .await
        })
    }

    fn stream_start(&self, wait: Duration) -> BoxFuture<'static, Option<StreamPosition>> {
        let c = self.clone();
        Box::pin(async move { c.first_stream_position(wait).await })
    }
}
