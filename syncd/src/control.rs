//! The control service (keibictl → syncd): read-only status, the
//! filesystem requests in flight for `keibictl debug ops`, and the
//! consistency check of `keibictl check`, and the peer identity of
//! `keibictl id`.
//!
//! It runs on the control runtime (see `main.rs`), which shares no thread
//! with the filesystem service, and none of its methods waits on the store
//! on a runtime thread: `status` takes the store's figures from [`census`]
//! (bounded wait, then the cache), `debug_ops` reads the in-flight registry
//! (a leaf lock), and `check` (a full scan) runs on the blocking pool.
//!
//! The sync commands: `sync_status` copies the per-peer progress (a leaf
//! lock) and waits for the store's figures at most [`census::WAIT`]
//! (then shows them as 0); `not_local` reads the store on the blocking
//! pool, bounded by the request's deadline; `debug_fetches` copies the
//! fetcher's registry; `prefetch` resolves paths on the blocking pool and
//! starts chunk fetches without waiting for them ([`crate::sync::prefetch`]).
//!
//! The peer commands talk to the peer manager ([`crate::peer::manager`]):
//! `peer_list` and `debug_peer_ops` copy its table under a leaf lock;
//! `peer_add` and `peer_remove` write the store on the blocking pool;
//! `peer_bench` runs on the network runtime and is awaited here, bounded
//! by the request's deadline.

use crate::census::{self, Census};
use crate::daemon::Daemon;
use ipc_schema::service::Control;
use ipc_schema::{
    BenchReport, CheckReport, FetchInFlight, FsError, KEIBI_VERSION, MountStatus, NotLocal,
    OpInFlight, PROTOCOL_VERSION, PeerCtlError, PeerIdentity, PeerInfo, PeerOpInFlight,
    PrefetchFile, Status, SyncStatus, fs_err,
};
use std::sync::Arc;
use tarpc::context::Context;

/// The control service; one clone per request.
#[derive(Clone)]
pub struct ControlServer {
    daemon: Arc<Daemon>,
}

impl ControlServer {
    /// A server over the daemon's shared state.
    pub fn new(daemon: Arc<Daemon>) -> ControlServer {
        ControlServer { daemon }
    }
}

/// A little before the caller's deadline, so an answer (if only an empty
/// one) still reaches it.
fn before_deadline(ctx: &Context) -> tokio::time::Instant {
    let now = std::time::Instant::now();
    let left = ctx.deadline.saturating_duration_since(now);
    tokio::time::Instant::from_std(now + left.saturating_sub(left / 10))
}

impl Control for ControlServer {
    async fn status(self, _: Context) -> Status {
        // Never waits on the store for more than a moment (see `census`).
        let report = Census::report(&self.daemon, census::WAIT).await;
        let mounts = self
            .daemon
            .mounts
            .list()
            .into_iter()
            .map(|(conn, info, since)| MountStatus {
                info,
                connected_secs: since.elapsed().as_secs(),
                open_handles: report.figures.handles.get(&conn).copied().unwrap_or(0),
            })
            .collect();
        let counts = report.figures.counts;
        Status {
            version: KEIBI_VERSION.to_string(),
            protocol_version: PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_secs: self.daemon.started.elapsed().as_secs(),
            state_dir: self.daemon.store.state_dir().display().to_string(),
            mounts,
            files: counts.files,
            directories: counts.directories,
            others: counts.others,
            bytes: counts.bytes,
            counts_fresh: report.fresh,
            counts_age_ms: report.age.map(|a| a.as_millis() as u64),
        }
    }

    async fn debug_ops(self, _: Context) -> Vec<OpInFlight> {
        // Only the registry's leaf lock: answers while the store is stuck.
        self.daemon.inflight.snapshot()
    }

    async fn check(self, _: Context, repair: bool) -> Result<CheckReport, FsError> {
        let store = self.daemon.store.clone();
        tracing::info!(repair, "check: scanning the store");
        let report = tokio::task::spawn_blocking(move || store.check(repair))
            .await
            .unwrap_or_else(|e| Err(fs_err!(EIO, "check failed: {e}")))?;
        tracing::info!(
            inodes = report.inodes,
            findings = report.findings.len(),
            unrepaired = report.unrepaired(),
            "check: done"
        );
        Ok(report)
    }

    async fn identity(self, _: Context) -> PeerIdentity {
        // Computed at start; nothing to wait on.
        self.daemon.identity.clone()
    }

    async fn peer_add(
        self,
        _: Context,
        fingerprint: String,
        addr: Option<String>,
        name: Option<String>,
    ) -> Result<PeerInfo, PeerCtlError> {
        self.daemon.peers.add(&fingerprint, addr, name).await
    }

    async fn peer_list(self, _: Context) -> Vec<PeerInfo> {
        self.daemon.peers.list()
    }

    async fn peer_remove(self, _: Context, fingerprint: String) -> Result<PeerInfo, PeerCtlError> {
        self.daemon.peers.remove(&fingerprint).await
    }

    async fn peer_bench(
        self,
        ctx: Context,
        fingerprint: String,
        bytes: u64,
        streams: u32,
    ) -> Result<BenchReport, PeerCtlError> {
        // Done a little before the caller's deadline, so the answer (a
        // report or why not) still reaches it.
        let left = ctx
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        let limit = left
            .saturating_sub(left / 10)
            .max(std::time::Duration::from_millis(1));
        self.daemon
            .peers
            .bench(&fingerprint, bytes, streams, limit)
            .await
    }

    async fn debug_peer_ops(self, _: Context) -> Vec<PeerOpInFlight> {
        self.daemon.peers.ops()
    }

    async fn sync_status(self, _: Context) -> SyncStatus {
        // The per-peer progress never waits; the store's figures get at
        // most the census wait, like `status`.
        let peers = self.daemon.peers.list();
        let sync = self.daemon.sync.clone();
        let work = tokio::task::spawn_blocking(move || crate::sync::status::store_figures(&sync));
        let figures = match tokio::time::timeout(census::WAIT, work).await {
            Ok(Ok(Ok(f))) => Some(f),
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "sync status: the store failed");
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "sync status failed");
                None
            }
            Err(_) => None,
        };
        crate::sync::status::sync_status(&self.daemon.sync, peers, figures)
    }

    async fn not_local(self, ctx: Context, limit: u32) -> Vec<NotLocal> {
        let sync = self.daemon.sync.clone();
        let work = tokio::task::spawn_blocking(move || {
            crate::sync::status::not_local(&sync, limit as usize)
        });
        match tokio::time::timeout_at(before_deadline(&ctx), work).await {
            Ok(Ok(Ok(list))) => list,
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "not_local: the store failed");
                Vec::new()
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "not_local failed");
                Vec::new()
            }
            Err(_) => Vec::new(),
        }
    }

    async fn debug_fetches(self, _: Context) -> Vec<FetchInFlight> {
        self.daemon.fetcher.debug_fetches()
    }

    async fn prefetch(self, ctx: Context, paths: Vec<String>) -> Vec<PrefetchFile> {
        // Each file's step starts fetches and answers; it never waits for
        // a chunk (see `sync::prefetch`), only for the store, and that
        // not past the caller's deadline.
        let deadline = before_deadline(&ctx);
        let steps = paths.into_iter().map(|path| {
            let step = crate::sync::prefetch::step(
                self.daemon.store.clone(),
                &self.daemon.fetcher,
                path.clone(),
            );
            async move {
                match tokio::time::timeout_at(deadline, step).await {
                    Ok(file) => file,
                    Err(_) => PrefetchFile {
                        error: Some(
                            fs_err!(ETIMEDOUT, "the store did not answer in time").to_string(),
                        ),
                        ..crate::sync::prefetch::unknown(path)
                    },
                }
            }
        });
        futures::future::join_all(steps).await
    }
}
