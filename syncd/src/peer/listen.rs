//! Listening for peers: binding every `listen` address at start, and the
//! accept loop that runs the responder's handshake on each connection.
//!
//! Binding happens before syncd serves anything, so a port that is taken
//! stops syncd at once (exit 1, a line naming the address and the errno)
//! instead of leaving a daemon that peers cannot reach. IPv6 sockets get
//! `IPV6_V6ONLY`, so `0.0.0.0:P` and `[::]:P` are two sockets that coexist
//! on every system whatever its `bindv6only` default; `SO_REUSEADDR` lets a
//! restarted syncd bind while old connections sit in `TIME_WAIT`.
//!
//! Every accepted connection gets its own task: the handshake (bounded by
//! `peer_timeout`), then the manager's bookkeeping. A peer that is not
//! paired is refused by the handshake itself, right after the message that
//! reveals its identity, and logged with its fingerprint; nothing it sends
//! is read after that. At most [`MAX_HANDSHAKES`] handshakes run at once;
//! connections beyond that are closed unanswered, so a flood of
//! unauthenticated connections costs a bounded amount of memory and CPU.

use super::manager::{Direction, Manager};
use crate::channel::{self, ChannelError};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Handshakes that may run at once, over all listen addresses.
pub const MAX_HANDSHAKES: usize = 64;

/// Pause after a failed `accept` (e.g. out of descriptors), so the loop
/// does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The listen backlog.
const BACKLOG: i32 = 128;

/// Bind every address in `addrs` (see the module doc). The error names the
/// address and the errno (`EADDRINUSE`, `EADDRNOTAVAIL`, `EACCES`, ...).
pub fn bind(addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>, String> {
    addrs.iter().map(|a| bind_one(*a)).collect()
}

fn bind_one(addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let named = |what: &str, e: std::io::Error| {
        let errno = e
            .raw_os_error()
            .map(|n| format!("{:?}", nix::errno::Errno::from_raw(n)))
            .unwrap_or_else(|| "EIO".into());
        format!("cannot listen for peers on {addr}: {what}: {errno}: {e}")
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| named("socket", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| named("SO_REUSEADDR", e))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(|e| named("IPV6_V6ONLY", e))?;
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| named("O_NONBLOCK", e))?;
    socket.bind(&addr.into()).map_err(|e| named("bind", e))?;
    socket.listen(BACKLOG).map_err(|e| named("listen", e))?;
    Ok(socket.into())
}

/// Accept peers on `listener` forever (on the network runtime).
pub async fn serve(listener: std::net::TcpListener, manager: Arc<Manager>) {
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(address = %local, error = %e, "cannot serve peers on this address");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(address = %local, error = %e, "accepting a peer connection failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, limit = MAX_HANDSHAKES, "too many peer handshakes at once; connection closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let manager = manager.clone();
        tokio::spawn(async move {
            let is_paired = |fp: &str| manager.is_paired(fp);
            let result =
                channel::respond(stream, manager.keys(), &is_paired, manager.channel_config())
                    .await;
            drop(slot);
            match result {
                Ok(est) => manager.register(est, Direction::Inbound, remote),
                Err(ChannelError::NotPaired { fingerprint }) => tracing::warn!(
                    %remote,
                    peer = %fingerprint,
                    "refused a peer that is not paired (`keibictl peer add` it on this machine to accept it)"
                ),
                Err(e) => tracing::info!(%remote, error = %e, "inbound peer handshake failed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_v6_any_on_one_port_coexist_and_a_taken_port_names_the_errno() {
        let v4 = bind(&["127.0.0.1:0".parse().expect("addr")]).expect("bind v4");
        let port = v4[0].local_addr().expect("addr").port();
        // The same port on the IPv6 wildcard: a separate socket thanks to
        // IPV6_V6ONLY (skipped only where the machine has no IPv6 at all).
        let v6: SocketAddr = format!("[::]:{port}").parse().expect("v6");
        match bind(&[v6]) {
            Ok(l) => assert_eq!(l[0].local_addr().expect("addr").port(), port),
            Err(e) => assert!(e.contains("EAFNOSUPPORT"), "{e}"),
        }
        let again: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let err = bind(&[again]).expect_err("port taken");
        assert!(err.contains(&again.to_string()), "{err}");
        assert!(err.contains("EADDRINUSE"), "{err}");
    }
}
