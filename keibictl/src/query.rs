//! Asking syncd: connect to the control socket (the handshake checks the
//! protocol version), then call the method.
//!
//! One timeout bounds the whole exchange. It is applied twice on purpose: as
//! the tarpc deadline, so syncd drops a request nobody waits for any more,
//! and as a local timer around connect + call, so a syncd that accepted the
//! connection but stopped (`SIGSTOP`) cannot hold keibictl past it.

use ipc_schema::transport::{connect_control, context_with_timeout};
use ipc_schema::{CheckReport, NotLocal, PeerIdentity, Status, SyncStatus};
use std::path::Path;
use std::time::Duration;
use tarpc::client::RpcError;

/// syncd's status and its sync status (one connection), or the reason
/// they could not be had.
pub async fn status_with_sync(
    socket: &Path,
    timeout: Duration,
) -> Result<(Status, SyncStatus), String> {
    let exchange = async {
        let client = connect_control(socket).await.map_err(|e| e.to_string())?;
        let status = client
            .status(context_with_timeout(timeout))
            .await
            .map_err(|e| rpc_reason(socket, timeout, &e))?;
        let sync = client
            .sync_status(context_with_timeout(timeout))
            .await
            .map_err(|e| rpc_reason(socket, timeout, &e))?;
        Ok((status, sync))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(no_answer(socket, timeout)),
    }
}

/// The files whose bytes are not all local (at most `limit`), or the
/// reason they could not be had.
pub async fn not_local(
    socket: &Path,
    timeout: Duration,
    limit: u32,
) -> Result<Vec<NotLocal>, String> {
    let exchange = async {
        let client = connect_control(socket).await.map_err(|e| e.to_string())?;
        client
            .not_local(context_with_timeout(timeout), limit)
            .await
            .map_err(|e| rpc_reason(socket, timeout, &e))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(no_answer(socket, timeout)),
    }
}

/// The report of syncd's consistency check (with `repair`, after its
/// repairs), or the reason it could not be had.
pub async fn check(socket: &Path, timeout: Duration, repair: bool) -> Result<CheckReport, String> {
    let exchange = async {
        let client = connect_control(socket).await.map_err(|e| e.to_string())?;
        client
            .check(context_with_timeout(timeout), repair)
            .await
            .map_err(|e| rpc_reason(socket, timeout, &e))?
            .map_err(|e| format!("keibi-syncd could not check its store: {e}"))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(no_answer(socket, timeout)),
    }
}

/// syncd's peer identity, or the reason it could not be had.
pub async fn identity(socket: &Path, timeout: Duration) -> Result<PeerIdentity, String> {
    let exchange = async {
        let client = connect_control(socket).await.map_err(|e| e.to_string())?;
        client
            .identity(context_with_timeout(timeout))
            .await
            .map_err(|e| rpc_reason(socket, timeout, &e))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(no_answer(socket, timeout)),
    }
}

fn no_answer(socket: &Path, timeout: Duration) -> String {
    format!(
        "keibi-syncd did not answer on {} within {} (ETIMEDOUT)",
        socket.display(),
        humantime::format_duration(timeout)
    )
}

fn rpc_reason(socket: &Path, timeout: Duration, e: &RpcError) -> String {
    match e {
        RpcError::DeadlineExceeded => no_answer(socket, timeout),
        RpcError::Shutdown => format!(
            "keibi-syncd closed the connection on {} before answering",
            socket.display()
        ),
        other => format!(
            "request to keibi-syncd on {} failed: {other}",
            socket.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_socket_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        let err = status_with_sync(&path, Duration::from_secs(2))
            .await
            .expect_err("no socket there");
        assert!(err.contains("control.sock"), "{err}");
    }

    #[test]
    fn silent_server_times_out_within_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        // Accepts (the kernel queues the connection) but never answers.
        let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let started = std::time::Instant::now();
        let err = runtime
            .block_on(status_with_sync(&path, Duration::from_millis(300)))
            .expect_err("nobody answers");
        runtime.shutdown_background();
        assert!(err.contains("did not answer"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }
}
