//! The control service (keibictl → syncd): read-only status, the
//! filesystem requests in flight for `keibictl debug ops`, and the
//! consistency check of `keibictl check` (a full scan, run on the blocking
//! pool so the control socket keeps answering its other calls).

use crate::daemon::Daemon;
use ipc_schema::service::Control;
use ipc_schema::{
    CheckReport, FsError, KEIBI_VERSION, MountStatus, OpInFlight, PROTOCOL_VERSION, Status, fs_err,
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

impl Control for ControlServer {
    async fn status(self, _: Context) -> Status {
        let daemon = self.daemon.clone();
        // Counting scans the store and stats content files: blocking work.
        let (counts, mounts) = tokio::task::spawn_blocking(move || {
            let counts = daemon.store.counts().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "status: cannot count the store");
                Default::default()
            });
            let mounts = daemon
                .mounts
                .list()
                .into_iter()
                .map(|(conn, info, since)| MountStatus {
                    info,
                    connected_secs: since.elapsed().as_secs(),
                    open_handles: daemon.store.open_handles(conn),
                })
                .collect::<Vec<_>>();
            (counts, mounts)
        })
        .await
        .unwrap_or_default();
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
}
