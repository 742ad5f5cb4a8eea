//! The ops socket: `keibictl debug ops` asks mountd itself what it is
//! waiting on.
//!
//! The socket is `ops.sock` in the mountpoint's lock anchor directory
//! (`<lock dir>/<anchor>/`, [`ipc_schema::paths`]), mode 0600, and it admits only
//! uid 0 (`SO_PEERCRED`, checked before anything else is answered). It is
//! an `interprocess` local socket ([`ipc_schema::local_socket`]). Each
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
use ipc_schema::handshake::{ClientHello, Refusal, ServiceKind};
use ipc_schema::inflight::InFlight;
use ipc_schema::local_socket::{self, Listener, Stream};
use ipc_schema::service::MountDebug;
use ipc_schema::{OpInFlight, PROTOCOL_VERSION, PassthroughStatus, transport};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};

/// The only uid the socket admits.
const ROOT: u32 = 0;

/// Bind `ops.sock` in `anchor` with mode 0600 (see
/// [`local_socket::listen`]). A socket file left there is replaced: we
/// hold the mountpoint's lock, so no live mountd owns it. Must run inside
/// the tokio runtime.
pub fn bind(anchor: &Path) -> io::Result<(Listener, SocketFile)> {
    let path = anchor.join(ipc_schema::paths::OPS_SOCKET);
    let listener = local_socket::listen(&path, 0o600, None, None)?;
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
pub async fn serve(listener: Listener, inflight: Arc<InFlight>, passthrough: Arc<Passthrough>) {
    loop {
        match local_socket::accept(&listener).await {
            Ok(stream) => {
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

async fn serve_one(stream: Stream, server: DebugServer) {
    let uid = match local_socket::peer(&stream) {
        Ok(p) => p.uid,
        Err(e) => {
            tracing::warn!(error = %e, "ops socket: cannot read the peer's credentials");
            return;
        }
    };
    let stream = match local_socket::serve_handshake(stream, move |h| check_hello(h, uid)).await {
        Ok((s, _)) => s,
        Err(why) => {
            tracing::warn!(uid, "ops socket: connection refused: {why}");
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

/// Judge the client's preamble: root only, this protocol version, the
/// debug service. `Err` refuses it with a reason.
fn check_hello(hello: &ClientHello, uid: u32) -> Result<(), (Refusal, String)> {
    if uid != ROOT {
        return Err((
            Refusal::PermissionDenied,
            format!("the ops socket admits only uid {ROOT}; this client runs as uid {uid}"),
        ));
    }
    if hello.version != PROTOCOL_VERSION {
        return Err((
            Refusal::VersionMismatch,
            format!(
                "protocol version mismatch: this keibi-mountd speaks version {PROTOCOL_VERSION}, the client speaks version {}; run binaries from the same keibi release",
                hello.version
            ),
        ));
    }
    if hello.service != ServiceKind::Debug as u8 {
        return Err((
            Refusal::BadPreamble,
            format!(
                "this is a keibi-mountd ops socket; the client asked for service {}",
                hello.service
            ),
        ));
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
    use std::os::unix::fs::PermissionsExt;

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
