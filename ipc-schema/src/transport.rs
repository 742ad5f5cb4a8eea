//! The tarpc transport on a local socket stream: length-delimited frames of
//! at most [`MAX_FRAME`] bytes, bincode inside; plus the client-side
//! connect helpers, which connect with [`local_socket`] and run the
//! [handshake](crate::handshake) first.

use crate::handshake::{self, HandshakeError, ServiceKind};
use crate::local_socket::{self, Stream};
use crate::service::{ControlClient, FilesystemClient, MountDebugClient};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use tarpc::serde_transport::Transport;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio::io::{AsyncRead, AsyncWrite};

/// The largest frame either side accepts. A frame over it closes the
/// connection (and is logged) instead of being allocated.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Wrap a connected stream (handshake done) in a tarpc transport.
pub fn framed<S, Item, SinkItem>(stream: S) -> Transport<S, Item, SinkItem, Bincode<Item, SinkItem>>
where
    S: AsyncRead + AsyncWrite,
    Item: for<'de> serde::Deserialize<'de>,
    SinkItem: serde::Serialize,
{
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec();
    tarpc::serde_transport::new(Framed::new(stream, codec), Bincode::default())
}

/// Why a connection to syncd failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket could not be reached.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The handshake failed or was refused.
    #[error("{path}: {source}")]
    Handshake {
        /// The socket path.
        path: String,
        /// The error.
        source: HandshakeError,
    },
}

async fn connect_raw(
    path: &Path,
    service: ServiceKind,
    fd: Option<OwnedFd>,
) -> Result<Stream, ConnectError> {
    let p = path.display().to_string();
    let io_err = |source| ConnectError::Connect {
        path: p.clone(),
        source,
    };
    let stream = local_socket::connect(path).await.map_err(io_err)?;
    let (stream, done) = local_socket::with_blocking(stream, move |s| {
        handshake::client(s, service, fd.as_ref().map(|f| f.as_raw_fd()))
    })
    .await
    .map_err(io_err)?;
    done.map_err(|source| ConnectError::Handshake { path: p, source })?;
    Ok(stream)
}

/// Connect to syncd's filesystem socket, handing it `fd_channel` (syncd's
/// end of the [`fdpass`](crate::fdpass) pair).
pub async fn connect_filesystem(
    path: &Path,
    fd_channel: OwnedFd,
) -> Result<FilesystemClient, ConnectError> {
    let stream = connect_raw(path, ServiceKind::Filesystem, Some(fd_channel)).await?;
    let config = tarpc::client::Config::default();
    Ok(FilesystemClient::new(config, framed(stream)).spawn())
}

/// [`connect_filesystem`], also returning the uid of the process that
/// listens on the socket, as `SO_PEERCRED` reported it at connect time.
/// mountd checks the owner of every content descriptor against it.
pub async fn connect_filesystem_with_peer_uid(
    path: &Path,
    fd_channel: OwnedFd,
) -> Result<(FilesystemClient, u32), ConnectError> {
    let stream = connect_raw(path, ServiceKind::Filesystem, Some(fd_channel)).await?;
    let uid = local_socket::peer(&stream)
        .map_err(|source| ConnectError::Connect {
            path: path.display().to_string(),
            source,
        })?
        .uid;
    let config = tarpc::client::Config::default();
    Ok((FilesystemClient::new(config, framed(stream)).spawn(), uid))
}

/// Connect to syncd's control socket.
pub async fn connect_control(path: &Path) -> Result<ControlClient, ConnectError> {
    let stream = connect_raw(path, ServiceKind::Control, None).await?;
    Ok(ControlClient::new(tarpc::client::Config::default(), framed(stream)).spawn())
}

/// Connect to a keibi-mountd's ops socket (root only).
pub async fn connect_mount_debug(path: &Path) -> Result<MountDebugClient, ConnectError> {
    let stream = connect_raw(path, ServiceKind::Debug, None).await?;
    Ok(MountDebugClient::new(tarpc::client::Config::default(), framed(stream)).spawn())
}

/// A tarpc context whose deadline is `timeout` from now.
pub fn context_with_timeout(timeout: std::time::Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = std::time::Instant::now() + timeout;
    ctx
}
