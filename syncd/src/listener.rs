//! The two Unix sockets and their accept loops.
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
use ipc_schema::handshake::{self, Refusal, ServiceKind};
use ipc_schema::service::{Control, Filesystem};
use ipc_schema::transport;
use nix::unistd::{Gid, Uid};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{UnixListener, UnixStream};

/// How long sending one descriptor to mountd may block.
const FD_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Mode of the filesystem socket (see the module doc).
pub const FS_SOCKET_MODE: u32 = 0o666;

/// Bind a listening socket at `path` with file `mode` and, if given, owner
/// and group. A stale socket file at the path is replaced (we hold the
/// instance lock, so no live syncd of this state directory owns it);
/// anything else there is an error. Must run inside the tokio runtime.
pub fn bind(
    path: &Path,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> io::Result<UnixListener> {
    let ctx = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| ctx("creating the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| ctx("removing the stale socket", e))?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx("checking", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| ctx("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ctx("setting the mode of", e))?;
    if owner.is_some() || group.is_some() {
        nix::unistd::chown(path, owner.map(Uid::from_raw), group.map(Gid::from_raw))
            .map_err(|e| ctx("changing the owner of", e.into()))?;
    }
    Ok(listener)
}

/// Accept mountd connections on the filesystem socket forever.
pub async fn serve_filesystem(listener: UnixListener, daemon: Arc<Daemon>, mountd_uid: u32) {
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
pub async fn serve_control(listener: UnixListener, daemon: Arc<Daemon>) {
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

async fn accept_loop<F, Fut>(listener: UnixListener, what: &'static str, handle: F)
where
    F: Fn(UnixStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
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

/// The peer's credentials, as the kernel reports them.
#[derive(Clone, Copy, Debug)]
struct Peer {
    uid: u32,
    pid: i32,
}

/// Run the server side of the handshake; `None` when the client was
/// refused or failed (already logged).
async fn handshake_server(
    stream: UnixStream,
    kind: ServiceKind,
    allowed_uid: Option<u32>,
) -> Option<(UnixStream, Option<OwnedFd>, Peer)> {
    let cred = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            pid: c.pid().unwrap_or(0),
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the peer's credentials");
            return None;
        }
    };
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take the connection");
            return None;
        }
    };
    let outcome = tokio::task::spawn_blocking(move || {
        let mut s = std_stream;
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        let fd = check_hello(&mut s, kind, allowed_uid, cred)?;
        handshake::accept(&mut s).map_err(|e| format!("answering the handshake: {e}"))?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok::<_, String>((s, fd))
    })
    .await;
    match outcome {
        Ok(Ok((s, fd))) => match UnixStream::from_std(s) {
            Ok(s) => Some((s, fd, cred)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot register the connection");
                None
            }
        },
        Ok(Err(why)) => {
            tracing::warn!(uid = cred.uid, pid = cred.pid, socket = ?kind, "connection refused: {why}");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "handshake task failed");
            None
        }
    }
}

/// Read and judge the client's preamble; refuse it with a reason, or
/// return the descriptor it carried.
fn check_hello(
    s: &mut std::os::unix::net::UnixStream,
    kind: ServiceKind,
    allowed_uid: Option<u32>,
    cred: Peer,
) -> Result<Option<OwnedFd>, String> {
    let refuse = |s: &mut std::os::unix::net::UnixStream, why: Refusal, msg: String| {
        let _ = handshake::refuse(s, why, &msg);
        Err(msg)
    };
    let hello = match handshake::read_hello(s) {
        Ok(h) => h,
        Err(e) => return refuse(s, Refusal::BadPreamble, format!("bad preamble: {e}")),
    };
    if let Some(uid) = allowed_uid
        && cred.uid != uid
    {
        return refuse(
            s,
            Refusal::PermissionDenied,
            format!(
                "the filesystem socket admits only uid {uid} (keibi-mountd); this client runs as uid {}",
                cred.uid
            ),
        );
    }
    if hello.version != PROTOCOL_VERSION {
        return refuse(
            s,
            Refusal::VersionMismatch,
            handshake::version_mismatch_message(hello.version, PROTOCOL_VERSION),
        );
    }
    if hello.service != kind as u8 {
        return refuse(
            s,
            Refusal::BadPreamble,
            format!(
                "this is the {} socket; the client asked for service {}",
                socket_name(kind),
                hello.service
            ),
        );
    }
    if kind == ServiceKind::Filesystem && hello.fd.is_none() {
        return refuse(
            s,
            Refusal::BadPreamble,
            "the filesystem preamble carried no fd channel".to_string(),
        );
    }
    Ok(hello.fd)
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
