//! keibi's local sockets (syncd's filesystem and control sockets, mountd's
//! ops socket, and the clients of all three), on `interprocess`'s tokio
//! local sockets.
//!
//! What `interprocess` does here: the socket names (filesystem paths,
//! [`GenericFilePath`]), binding with a file mode ([`ListenerOptions`]
//! with `mode`, applied with `fchmod` before `bind`, so the file never
//! exists with a looser mode than asked for), accepting, connecting, and
//! the peer's credentials (`peer_creds`, `SO_PEERCRED` on Linux).
//!
//! What it cannot express, kept here with std and nix:
//! - **Descriptors.** The handshake's preamble carries the fd channel as an
//!   `SCM_RIGHTS` message, and the channel itself is a `SOCK_SEQPACKET`
//!   pair (`crate::fdpass`); `interprocess` has neither. The handshake runs
//!   on the connection's own descriptor, taken out of the tokio stream
//!   for it ([`with_blocking`]) and handed back afterwards.
//! - **The exact mode.** The mode `interprocess` sets is reduced by the
//!   process umask; [`listen`] sets the requested mode again on the file
//!   after `bind` (a umask can only remove bits, so this only widens the
//!   mode up to what was asked for).
//! - **Owner and group** of the socket file (`chown`, nix).
//! - **What is at the path before binding.** A socket file left by a dead
//!   process is removed; anything else is an error. `interprocess`'s
//!   `try_overwrite` would remove whatever is there, so it stays off, and
//!   so does its name reclamation: the daemons remove their socket files
//!   themselves at shutdown.

use crate::handshake::{self, ClientHello, Refusal};
use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use interprocess::os::unix::uds_local_socket::tokio::Stream as UdStream;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdStream;
use std::path::Path;

pub use interprocess::local_socket::tokio::{Listener, Stream};

/// Who is at the other end of a connection, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid.
    pub uid: u32,
    /// Process id (0 if the kernel did not say).
    pub pid: i32,
}

/// Bind a listening socket at `path` with file `mode` and, if given,
/// `owner` and `group`. A stale socket file at the path is replaced (the
/// caller holds the lock that makes it stale); anything else there is an
/// error. Must run inside the tokio runtime that will serve it.
pub fn listen(
    path: &Path,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> io::Result<Listener> {
    let ctx = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
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
    let name = path
        .to_fs_name::<GenericFilePath>()
        .map_err(|e| ctx("naming", e))?;
    let listener = ListenerOptions::new()
        .name(name)
        .mode(mode as libc::mode_t)
        .reclaim_name(false)
        .try_overwrite(false)
        .create_tokio()
        .map_err(|e| ctx("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ctx("setting the mode of", e))?;
    if owner.is_some() || group.is_some() {
        nix::unistd::chown(
            path,
            owner.map(nix::unistd::Uid::from_raw),
            group.map(nix::unistd::Gid::from_raw),
        )
        .map_err(|e| ctx("changing the owner of", e.into()))?;
    }
    Ok(listener)
}

/// Wait for the next connection on `listener`.
pub async fn accept(listener: &Listener) -> io::Result<Stream> {
    listener.accept().await
}

/// The credentials of the process at the other end of `stream`.
pub fn peer(stream: &Stream) -> io::Result<Peer> {
    let creds = stream.peer_creds()?;
    let uid = creds.euid().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel reported no uid for the peer",
        )
    })?;
    Ok(Peer {
        uid,
        pid: creds.pid().unwrap_or(0),
    })
}

/// Connect to the socket at `path`.
pub async fn connect(path: &Path) -> io::Result<Stream> {
    let name = path.to_fs_name::<GenericFilePath>()?;
    Stream::connect(name).await
}

/// Run `f` on the connection as a blocking std stream in tokio's blocking
/// pool (the handshake: `SCM_RIGHTS` and timeouts, see the module doc),
/// then give the connection back to tokio. Must run inside a tokio runtime.
pub async fn with_blocking<T, F>(stream: Stream, f: F) -> io::Result<(Stream, T)>
where
    T: Send + 'static,
    F: FnOnce(&mut StdStream) -> T + Send + 'static,
{
    let Stream::UdSocket(ud) = stream;
    let mut std_stream = StdStream::from(OwnedFd::try_from(ud)?);
    let (std_stream, out) = tokio::task::spawn_blocking(move || {
        std_stream.set_nonblocking(false)?;
        let out = f(&mut std_stream);
        std_stream.set_nonblocking(true)?;
        Ok::<_, io::Error>((std_stream, out))
    })
    .await
    .map_err(io::Error::other)??;
    let ud = UdStream::try_from(OwnedFd::from(std_stream))?;
    Ok((Stream::from(ud), out))
}

/// The server's side of the [handshake](crate::handshake) on an accepted
/// connection: read the preamble (a malformed one is refused as such),
/// let `judge` accept it or refuse it with a reason the client will print,
/// and answer. Returns the connection, ready for tarpc, and the descriptor
/// that rode with the preamble; or why the client was refused.
pub async fn serve_handshake<J>(
    stream: Stream,
    judge: J,
) -> Result<(Stream, Option<OwnedFd>), String>
where
    J: FnOnce(&ClientHello) -> Result<(), (Refusal, String)> + Send + 'static,
{
    let (stream, outcome) = with_blocking(stream, move |s| {
        let hello = match handshake::read_hello(s) {
            Ok(h) => h,
            Err(e) => {
                let msg = format!("bad preamble: {e}");
                let _ = handshake::refuse(s, Refusal::BadPreamble, &msg);
                return Err(msg);
            }
        };
        if let Err((why, msg)) = judge(&hello) {
            let _ = handshake::refuse(s, why, &msg);
            return Err(msg);
        }
        handshake::accept(s).map_err(|e| format!("answering the handshake: {e}"))?;
        Ok(hello.fd)
    })
    .await
    .map_err(|e| format!("handshake: {e}"))?;
    Ok((stream, outcome?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::ServiceKind;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listen_sets_the_exact_mode_and_replaces_only_sockets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        // The usual umask (022) would leave 0644 without the chmod.
        drop(listen(&path, 0o666, None, None).expect("bind"));
        let md = std::fs::symlink_metadata(&path).expect("stat");
        assert_eq!(md.mode() & 0o777, 0o666);
        // The file left behind is a stale socket: replaced.
        let again = listen(&path, 0o600, None, None).expect("rebind over a stale socket");
        assert_eq!(
            std::fs::symlink_metadata(&path).expect("stat").mode() & 0o777,
            0o600
        );
        drop(again);
        // Owner and group: another user's when we may (root), else ours.
        let (uid, gid) = if nix::unistd::geteuid().is_root() {
            (65534, 65534)
        } else {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        };
        drop(listen(&path, 0o660, Some(uid), Some(gid)).expect("bind with an owner"));
        let md = std::fs::symlink_metadata(&path).expect("stat");
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o777), (uid, gid, 0o660));
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").expect("write");
        let err = listen(&plain, 0o600, None, None).expect_err("not a socket");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&plain).expect("still there"), b"x");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshake_and_peer_credentials_over_interprocess() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("h.sock");
        let listener = listen(&path, 0o600, None, None).expect("bind");
        let server = tokio::spawn(async move {
            let stream = listener.accept().await.expect("accept");
            let who = peer(&stream).expect("peer credentials");
            let (_stream, fd) = serve_handshake(stream, |h| {
                if h.service == ServiceKind::Control as u8 {
                    Ok(())
                } else {
                    Err((Refusal::BadPreamble, "wrong service".into()))
                }
            })
            .await
            .expect("accepted");
            (who, fd.is_some())
        });
        let client = connect(&path).await.expect("connect");
        let (_client, answer) = with_blocking(client, |s| {
            handshake::client(s, ServiceKind::Control, None).map_err(|e| e.to_string())
        })
        .await
        .expect("blocking handshake");
        answer.expect("the server accepts");
        let (who, had_fd) = server.await.expect("server task");
        assert_eq!(who.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(who.pid, std::process::id() as i32);
        assert!(!had_fd);
    }
}
