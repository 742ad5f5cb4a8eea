//! The two Unix sockets and their accept loops.
//!
//! Both are `interprocess` local sockets ([`ipc_schema::local_socket`]:
//! binding with mode, owner and group, accepting, peer credentials). The
//! filesystem socket is served on the filesystem runtime, the control
//! socket on the control runtime (see `main.rs`); each runtime's own
//! blocking pool runs its handshakes, so stuck store calls cannot delay a
//! keibictl handshake.
//!
//! Every connection starts with the [handshake](ipc_schema::handshake),
//! run on a blocking copy of the stream in the blocking pool (it has its own
//! timeout, so a client that connects and says nothing holds no task). The
//! server checks, in order: the preamble, the peer's credentials
//! (`SO_PEERCRED`; the filesystem socket admits only `mountd_uid`), the
//! protocol version, the service, and for the filesystem socket the fd
//! channel riding with the preamble. A refused client gets the reason as
//! text. Then tarpc serves the connection, each request in its own task so
//! that one slow request does not hold the others of its connection.
//!
//! The filesystem socket file is world-connectable (0666) on purpose: the
//! credential check is what admits mountd, and anyone else gets a refusal
//! that says why, instead of a bare EACCES.

use crate::control::ControlServer;
use crate::daemon::Daemon;
use crate::service::FsServer;
use futures::StreamExt;
use ipc_schema::PROTOCOL_VERSION;
use ipc_schema::fdpass::FdSender;
use ipc_schema::handshake::{self, ClientHello, Refusal, ServiceKind};
use ipc_schema::local_socket::{self, Listener, Peer, Stream};
use ipc_schema::service::{Control, Filesystem};
use ipc_schema::transport;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tarpc::server::{BaseChannel, Channel};

/// How long sending one descriptor to mountd may block.
const FD_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Mode of the filesystem socket (see the module doc).
pub const FS_SOCKET_MODE: u32 = 0o666;

/// Bind a listening socket at `path` with file `mode` and, if given, owner
/// and group (see [`local_socket::listen`]), making its directory first. A
/// stale socket file at the path is replaced (we hold the instance lock,
/// so no live syncd of this state directory owns it); anything else there
/// is an error. Must run inside the tokio runtime that will serve it.
pub fn bind(
    path: &Path,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> io::Result<Listener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("creating the directory of {}: {e}", path.display()),
            )
        })?;
    }
    local_socket::listen(path, mode, owner, group)
}

/// Accept mountd connections on the filesystem socket forever.
pub async fn serve_filesystem(listener: Listener, daemon: Arc<Daemon>, mountd_uid: u32) {
    accept_loop(listener, "filesystem", move |stream| {
        let daemon = daemon.clone();
        async move {
            let conn = daemon.next_conn();
            let Some((stream, fd, cred)) =
                handshake_server(stream, ServiceKind::Filesystem, Some(mountd_uid)).await
            else {
                return;
            };
            let Some(fd) = fd else { return };
            let sender = match FdSender::new(fd, FD_SEND_TIMEOUT) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "filesystem client: unusable fd channel");
                    return;
                }
            };
            tracing::info!(
                conn = conn.0,
                uid = cred.uid,
                pid = cred.pid,
                "mountd connected"
            );
            // The open table's lock may be held across a transaction or an
            // orphan scan: take it in the blocking pool, not on a worker.
            let store = daemon.store.clone();
            let connected = tokio::task::spawn_blocking(move || {
                crate::fault::store_gate();
                store.connect(conn)
            })
            .await;
            if let Err(e) = connected {
                tracing::warn!(conn = conn.0, error = %e, "cannot register the connection");
                return;
            }
            let server = FsServer::new(daemon.clone(), conn, sender);
            BaseChannel::with_defaults(transport::framed(stream))
                .execute(server.serve())
                .for_each(|f| async {
                    tokio::spawn(f);
                })
                .await;
            let store = daemon.store.clone();
            let dropped = tokio::task::spawn_blocking(move || {
                crate::fault::store_gate();
                store.disconnect(conn)
            })
            .await
            .unwrap_or(0);
            daemon.mounts.remove(conn);
            tracing::info!(
                conn = conn.0,
                dropped_handles = dropped,
                "mountd disconnected"
            );
        }
    })
    .await
}

/// Accept keibictl connections on the control socket forever.
pub async fn serve_control(listener: Listener, daemon: Arc<Daemon>) {
    accept_loop(listener, "control", move |stream| {
        let daemon = daemon.clone();
        async move {
            let Some((stream, _, cred)) =
                handshake_server(stream, ServiceKind::Control, None).await
            else {
                return;
            };
            tracing::debug!(uid = cred.uid, pid = cred.pid, "control client connected");
            BaseChannel::with_defaults(transport::framed(stream))
                .execute(ControlServer::new(daemon).serve())
                .for_each(|f| async {
                    tokio::spawn(f);
                })
                .await;
        }
    })
    .await
}

async fn accept_loop<F, Fut>(listener: Listener, what: &'static str, handle: F)
where
    F: Fn(Stream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match local_socket::accept(&listener).await {
            Ok(stream) => {
                tokio::spawn(handle(stream));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(socket = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Run the server side of the handshake; `None` when the client was
/// refused or failed (already logged).
async fn handshake_server(
    stream: Stream,
    kind: ServiceKind,
    allowed_uid: Option<u32>,
) -> Option<(Stream, Option<OwnedFd>, Peer)> {
    let cred = match local_socket::peer(&stream) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the peer's credentials");
            return None;
        }
    };
    match local_socket::serve_handshake(stream, move |h| check_hello(h, kind, allowed_uid, cred))
        .await
    {
        Ok((s, fd)) => Some((s, fd, cred)),
        Err(why) => {
            tracing::warn!(uid = cred.uid, pid = cred.pid, socket = ?kind, "connection refused: {why}");
            None
        }
    }
}

/// Judge the client's preamble: `Err` refuses it with a reason.
fn check_hello(
    hello: &ClientHello,
    kind: ServiceKind,
    allowed_uid: Option<u32>,
    cred: Peer,
) -> Result<(), (Refusal, String)> {
    if let Some(uid) = allowed_uid
        && cred.uid != uid
    {
        return Err((
            Refusal::PermissionDenied,
            format!(
                "the filesystem socket admits only uid {uid} (keibi-mountd); this client runs as uid {}",
                cred.uid
            ),
        ));
    }
    if hello.version != PROTOCOL_VERSION {
        return Err((
            Refusal::VersionMismatch,
            handshake::version_mismatch_message(hello.version, PROTOCOL_VERSION),
        ));
    }
    if hello.service != kind as u8 {
        return Err((
            Refusal::BadPreamble,
            format!(
                "this is the {} socket; the client asked for service {}",
                socket_name(kind),
                hello.service
            ),
        ));
    }
    if kind == ServiceKind::Filesystem && hello.fd.is_none() {
        return Err((
            Refusal::BadPreamble,
            "the filesystem preamble carried no fd channel".to_string(),
        ));
    }
    Ok(())
}

fn socket_name(kind: ServiceKind) -> &'static str {
    match kind {
        ServiceKind::Filesystem => "filesystem",
        ServiceKind::Control => "control",
        ServiceKind::Debug => "mountd ops",
    }
}

/// Remove our socket files at shutdown.
pub fn remove_sockets(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = std::fs::remove_file(p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove socket");
        }
    }
}
