//! Content descriptors from syncd to mountd.
//!
//! mountd makes a `SOCK_SEQPACKET` socket pair for each connection and hands
//! one end to syncd in the [handshake](crate::handshake). On `open` and
//! `create`, syncd opens the content file, sends the descriptor on that pair
//! as one message (`HandleId` as 8 little-endian bytes + one `SCM_RIGHTS`
//! descriptor), and only then answers the tarpc call. By the time mountd
//! reads the answer the descriptor is already queued in its socket; the
//! [`FdInbox`] matches the two by handle.
//!
//! A seqpacket socket keeps message boundaries (one descriptor per message,
//! never merged) and, unlike a datagram socket, reports the other side's
//! death as end-of-file.

use crate::types::HandleId;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Make the pair: `(mountd's end, syncd's end)`.
pub fn channel_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// syncd's end: sends descriptors.
pub struct FdSender {
    sock: OwnedFd,
}

impl FdSender {
    /// Wrap syncd's end of the pair. Sends block at most `timeout`, so a
    /// mountd that stops reading cannot hold a syncd thread.
    pub fn new(sock: OwnedFd, timeout: Duration) -> io::Result<Self> {
        let tv =
            nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SendTimeout, &tv)
            .map_err(io::Error::from)?;
        Ok(FdSender { sock })
    }

    /// Send `fd` tagged with `handle`. Blocking (call it from a blocking
    /// context).
    pub fn send(&self, handle: HandleId, fd: BorrowedFd<'_>) -> io::Result<()> {
        let tag = handle.0.to_le_bytes();
        let iov = [IoSlice::new(&tag)];
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)?;
        Ok(())
    }
}

/// mountd's end: descriptors received, waiting for the `open` answer that
/// names them. A descriptor whose answer never came (mountd's call timed
/// out) stays until the owner collects it with
/// [`FdInbox::take_unclaimed`], which closes it and names its handle, so
/// that the open can be released.
#[derive(Clone, Default)]
pub struct FdInbox {
    inner: Arc<InboxInner>,
}

#[derive(Default)]
struct InboxInner {
    /// Descriptors by handle. Locked only to insert or remove; never held
    /// across an await or a syscall.
    fds: Mutex<HashMap<HandleId, (OwnedFd, Instant)>>,
    arrived: Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl FdInbox {
    /// Read descriptors from mountd's end of the pair on a dedicated thread
    /// until syncd closes it. Returns the inbox the thread fills.
    pub fn spawn_reader(sock: OwnedFd) -> io::Result<FdInbox> {
        let inbox = FdInbox::default();
        let filler = inbox.clone();
        std::thread::Builder::new()
            .name("keibi-fd-inbox".into())
            .spawn(move || filler.read_loop(sock))?;
        Ok(inbox)
    }

    fn read_loop(&self, sock: OwnedFd) {
        loop {
            match recv_one(sock.as_raw_fd()) {
                Ok(Some((handle, fd))) => {
                    if let Ok(mut fds) = self.inner.fds.lock() {
                        fds.insert(handle, (fd, Instant::now()));
                    }
                    self.inner.arrived.notify_waiters();
                }
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "fd channel failed");
                    break;
                }
            }
        }
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.arrived.notify_waiters();
    }

    /// Whether the channel has closed (syncd closed its end or died).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait until the channel closes: syncd closed its end or died. Lets the
    /// holder of a connection notice a dead syncd without making a call.
    pub async fn closed(&self) {
        loop {
            let notified = self.inner.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Close every descriptor that arrived more than `older_than` ago and
    /// was never taken (nobody waits for it any more), and return their
    /// handles.
    pub fn take_unclaimed(&self, older_than: Duration) -> Vec<HandleId> {
        let now = Instant::now();
        let Ok(mut fds) = self.inner.fds.lock() else {
            return Vec::new();
        };
        let old: Vec<HandleId> = fds
            .iter()
            .filter(|(_, (_, t))| now.duration_since(*t) >= older_than)
            .map(|(h, _)| *h)
            .collect();
        let closing: Vec<_> = old.iter().filter_map(|h| fds.remove(h)).collect();
        drop(fds);
        drop(closing);
        old
    }

    /// Take the descriptor for `handle`, waiting until `deadline` for it.
    pub async fn take(
        &self,
        handle: HandleId,
        deadline: tokio::time::Instant,
    ) -> io::Result<OwnedFd> {
        loop {
            let notified = self.inner.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some((fd, _)) = self
                .inner
                .fds
                .lock()
                .ok()
                .and_then(|mut m| m.remove(&handle))
            {
                return Ok(fd);
            }
            if self.inner.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!("fd channel closed before the descriptor of {handle} arrived"),
                ));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the descriptor of {handle} did not arrive"),
                ));
            }
        }
    }
}

/// Receive one tagged descriptor; `None` at end of file.
fn recv_one(sock: RawFd) -> io::Result<Option<(HandleId, OwnedFd)>> {
    let mut tag = [0u8; 8];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut tag)];
    let msg = recvmsg::<()>(
        sock,
        &mut iov,
        Some(&mut cmsg_space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let bytes = msg.bytes;
    let mut fd = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel installed `r` for this message; we are
                // its only owner.
                let owned = unsafe { OwnedFd::from_raw_fd(r) };
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    if bytes == 0 && fd.is_none() {
        return Ok(None);
    }
    match (bytes, fd) {
        (8, Some(fd)) => Ok(Some((HandleId(u64::from_le_bytes(tag)), fd))),
        (n, _) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed fd message: {n} bytes"),
        )),
    }
}
