//! The ops socket: `keibictl debug ops` asks mountd itself what it is
//! waiting on.
//!
//! The socket is `ops.sock` in the mountpoint's lock anchor directory
//! (`<lock dir>/<escaped mountpoint>/`), mode 0600, and it admits only
//! uid 0 (`SO_PEERCRED`, checked before anything else is answered). Each
//! connection runs the [handshake](ipc_schema::handshake) for
//! [`ServiceKind::Debug`] in the blocking pool (it has its own timeout),
//! then tarpc serves [`MountDebug`] from the in-flight registry and the
//! passthrough counters.
//!
//! It runs on mountd's tokio runtime and never talks to syncd: answering
//! takes only the registry's leaf lock, so it works while syncd is frozen
//! and every FUSE operation is stuck waiting for it.

use crate::passthrough::Passthrough;
use futures::StreamExt;
use ipc_schema::handshake::{self, Refusal, ServiceKind};
use ipc_schema::inflight::InFlight;
use ipc_schema::service::MountDebug;
use ipc_schema::{OpInFlight, PROTOCOL_VERSION, PassthroughStatus, transport};
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{UnixListener, UnixStream};

/// The only uid the socket admits.
const ROOT: u32 = 0;

/// Bind `ops.sock` in `anchor` with mode 0600. A socket file left there is
/// replaced: we hold the mountpoint's lock, so no live mountd owns it.
/// Must run inside the tokio runtime.
pub fn bind(anchor: &Path) -> io::Result<(UnixListener, SocketFile)> {
    let path = anchor.join(ipc_schema::paths::OPS_SOCKET);
    let ctx = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    match std::fs::symlink_metadata(&path) {
        Ok(md) if md.file_type().is_socket() => {
            std::fs::remove_file(&path).map_err(|e| ctx("removing the stale socket", e))?
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
    let listener = UnixListener::bind(&path).map_err(|e| ctx("binding", e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ctx("setting the mode of", e))?;
    Ok((listener, SocketFile(path)))
}

/// The bound socket's file; dropping it removes the file (at exit, or when
/// start-up fails after binding).
pub struct SocketFile(PathBuf);

impl SocketFile {
    /// Where the socket is.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove the ops socket");
        }
    }
}

/// Accept `keibictl debug ops` connections forever.
pub async fn serve(listener: UnixListener, inflight: Arc<InFlight>, passthrough: Arc<Passthrough>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let server = DebugServer {
                    inflight: inflight.clone(),
                    passthrough: passthrough.clone(),
                };
                tokio::spawn(serve_one(stream, server));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "ops socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_one(stream: UnixStream, server: DebugServer) {
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            tracing::warn!(error = %e, "ops socket: cannot read the peer's credentials");
            return;
        }
    };
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "ops socket: cannot take the connection");
            return;
        }
    };
    let outcome = tokio::task::spawn_blocking(move || {
        let mut s = std_stream;
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        check_hello(&mut s, uid)?;
        handshake::accept(&mut s).map_err(|e| format!("answering the handshake: {e}"))?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok::<_, String>(s)
    })
    .await;
    let stream = match outcome {
        Ok(Ok(s)) => match UnixStream::from_std(s) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "ops socket: cannot register the connection");
                return;
            }
        },
        Ok(Err(why)) => {
            tracing::warn!(uid, "ops socket: connection refused: {why}");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "ops socket: handshake task failed");
            return;
        }
    };
    BaseChannel::with_defaults(transport::framed(stream))
        .execute(server.serve())
        .for_each(|f| async {
            tokio::spawn(f);
        })
        .await;
}

/// Read and judge the client's preamble: root only, this protocol version,
/// the debug service.
fn check_hello(s: &mut std::os::unix::net::UnixStream, uid: u32) -> Result<(), String> {
    let refuse = |s: &mut std::os::unix::net::UnixStream, why: Refusal, msg: String| {
        let _ = handshake::refuse(s, why, &msg);
        Err(msg)
    };
    let hello = match handshake::read_hello(s) {
        Ok(h) => h,
        Err(e) => return refuse(s, Refusal::BadPreamble, format!("bad preamble: {e}")),
    };
    if uid != ROOT {
        return refuse(
            s,
            Refusal::PermissionDenied,
            format!("the ops socket admits only uid {ROOT}; this client runs as uid {uid}"),
        );
    }
    if hello.version != PROTOCOL_VERSION {
        return refuse(
            s,
            Refusal::VersionMismatch,
            format!(
                "protocol version mismatch: this keibi-mountd speaks version {PROTOCOL_VERSION}, the client speaks version {}; run binaries from the same keibi release",
                hello.version
            ),
        );
    }
    if hello.service != ServiceKind::Debug as u8 {
        return refuse(
            s,
            Refusal::BadPreamble,
            format!(
                "this is a keibi-mountd ops socket; the client asked for service {}",
                hello.service
            ),
        );
    }
    Ok(())
}

/// The debug service over the registry and the passthrough counters.
#[derive(Clone)]
struct DebugServer {
    inflight: Arc<InFlight>,
    passthrough: Arc<Passthrough>,
}

impl MountDebug for DebugServer {
    async fn ops(self, _: Context) -> Vec<OpInFlight> {
        self.inflight.snapshot()
    }

    async fn passthrough(self, _: Context) -> PassthroughStatus {
        self.passthrough.status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_the_registry_to_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, file) = bind(dir.path()).expect("bind");
        let path = file.path().to_path_buf();
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let inflight = InFlight::new();
        let _g = inflight.register("lookup", Some(1), None, "keibi-syncd (lookup)");
        let pt = Arc::new(Passthrough::new(true));
        pt.set_granted(true);
        tokio::spawn(serve(listener, inflight.clone(), pt));
        let client = transport::connect_mount_debug(&path)
            .await
            .expect("connect (tests run as root)");
        let ops = client
            .ops(transport::context_with_timeout(Duration::from_secs(5)))
            .await
            .expect("ops");
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].op, "lookup");
        assert_eq!(ops[0].waiting_on, "keibi-syncd (lookup)");
        let pt = client
            .passthrough(transport::context_with_timeout(Duration::from_secs(5)))
            .await
            .expect("passthrough");
        assert!(pt.wanted && pt.granted && !pt.disabled);
        drop(file);
        assert!(!path.exists());
    }
}
