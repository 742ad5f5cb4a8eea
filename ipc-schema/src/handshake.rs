//! The connection preamble, exchanged before tarpc starts.
//!
//! ```text
//! client → server   "KEIBI\0"  u32-le protocol version  u8 service
//!                   (filesystem service: one SCM_RIGHTS descriptor rides
//!                    with these bytes, the client's end of the fd channel)
//! server → client   u8 status  u32-le server version  u16-le length  message
//! ```
//!
//! Status 0 accepts; any other value refuses and the server closes the
//! connection after the message. Checking the version here, rather than in
//! a tarpc call, means a client of another version is refused before any
//! bincode frame (whose layout may have changed) is decoded.
//!
//! Both sides run the preamble on a blocking socket with a timeout, so a
//! peer that connects and says nothing cannot hold a task.

use crate::PROTOCOL_VERSION;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const MAGIC: &[u8; 6] = b"KEIBI\0";
const HELLO_LEN: usize = 6 + 4 + 1;
/// How long either side waits for the other's preamble.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which service a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ServiceKind {
    /// [`crate::service::Filesystem`], mountd's.
    Filesystem = 1,
    /// [`crate::service::Control`], keibictl's.
    Control = 2,
    /// [`crate::service::MountDebug`], keibictl's, on mountd's ops socket.
    Debug = 3,
}

/// Why the server refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    /// The protocol versions differ.
    VersionMismatch = 1,
    /// The peer's credentials do not allow this socket.
    PermissionDenied = 2,
    /// The preamble was not keibi's, or named the wrong service.
    BadPreamble = 3,
}

/// A failed handshake, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The server refused; `message` is its reason.
    #[error("{message}")]
    Refused {
        /// The refusal code.
        reason: u8,
        /// The server's protocol version.
        server_version: u32,
        /// The server's explanation.
        message: String,
    },
    /// The other side did not speak keibi's preamble.
    #[error("not a keibi socket: {0}")]
    Garbage(String),
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What the server learned from a client's preamble.
pub struct ClientHello {
    /// The client's protocol version.
    pub version: u32,
    /// The service it asked for.
    pub service: u8,
    /// The descriptor that came with the preamble, if any.
    pub fd: Option<OwnedFd>,
}

/// Client side: send the preamble (with `fd` attached, if given) and read
/// the server's answer. Returns `Ok(())` when accepted.
pub fn client(
    stream: &mut UnixStream,
    service: ServiceKind,
    fd: Option<RawFd>,
) -> Result<(), HandshakeError> {
    client_speaking(stream, service, fd, PROTOCOL_VERSION)
}

/// [`client`], claiming protocol `version`: lets tests (and future clients)
/// check how a server treats another version.
pub fn client_speaking(
    stream: &mut UnixStream,
    service: ServiceKind,
    fd: Option<RawFd>,
    version: u32,
) -> Result<(), HandshakeError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut hello = [0u8; HELLO_LEN];
    hello[..6].copy_from_slice(MAGIC);
    hello[6..10].copy_from_slice(&version.to_le_bytes());
    hello[10] = service as u8;
    let iov = [IoSlice::new(&hello)];
    let fds;
    let cmsgs: &[ControlMessage] = match fd {
        Some(fd) => {
            fds = [fd];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if sent != HELLO_LEN {
        stream.write_all(&hello[sent..])?;
    }
    let mut head = [0u8; 7];
    stream.read_exact(&mut head).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeError::Garbage("the server closed the connection during the handshake".into())
        } else {
            HandshakeError::Io(e)
        }
    })?;
    let status = head[0];
    let server_version = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    let len = u16::from_le_bytes([head[5], head[6]]) as usize;
    let mut msg = vec![0u8; len];
    stream.read_exact(&mut msg)?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    if status == 0 {
        Ok(())
    } else {
        Err(HandshakeError::Refused {
            reason: status,
            server_version,
            message: String::from_utf8_lossy(&msg).into_owned(),
        })
    }
}

/// Server side, first half: read a client's preamble (and the descriptor
/// riding with it). The caller decides, then calls [`accept`] or [`refuse`].
pub fn read_hello(stream: &mut UnixStream) -> Result<ClientHello, HandshakeError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut buf = [0u8; HELLO_LEN];
    let mut got = 0;
    let mut fd = None;
    while got < HELLO_LEN {
        let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let n = msg.bytes;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for r in raw {
                    // SAFETY: the kernel just installed `r` in our table
                    // for this message; nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(r) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        if n == 0 {
            return Err(HandshakeError::Garbage(
                "connection closed during the preamble".into(),
            ));
        }
        got += n;
    }
    if &buf[..6] != MAGIC {
        return Err(HandshakeError::Garbage("bad magic in the preamble".into()));
    }
    Ok(ClientHello {
        version: u32::from_le_bytes([buf[6], buf[7], buf[8], buf[9]]),
        service: buf[10],
        fd,
    })
}

/// Server side: accept the connection; tarpc may start after this.
pub fn accept(stream: &mut UnixStream) -> io::Result<()> {
    answer(stream, 0, "")?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)
}

/// Server side: refuse with a reason the client will print.
pub fn refuse(stream: &mut UnixStream, why: Refusal, message: &str) -> io::Result<()> {
    answer(stream, why as u8, message)
}

/// The message for a version mismatch, naming both versions.
pub fn version_mismatch_message(client: u32, server: u32) -> String {
    format!(
        "protocol version mismatch: this keibi-syncd speaks version {server}, the client speaks version {client}; run binaries from the same keibi release"
    )
}

fn answer(stream: &mut UnixStream, status: u8, message: &str) -> io::Result<()> {
    let msg = &message.as_bytes()[..message.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(7 + msg.len());
    out.push(status);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    out.extend_from_slice(msg);
    stream.write_all(&out)
}
