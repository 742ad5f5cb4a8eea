//! Dialing a peer: one task per peer that has an address, on the network
//! runtime, for as long as the peer is paired and its address unchanged
//! (the manager aborts the task on `peer remove` and replaces it when the
//! address changes).
//!
//! The task loops: while the peer is connected (in either direction) it
//! waits for that connection to end; otherwise it resolves the address
//! (host names are looked up at every dial, so a changed DNS record is
//! followed), connects to each resolved address in turn, runs the
//! initiator's handshake expecting the peer's fingerprint, and hands the
//! channel to the manager. A failure waits [`Backoff`] before the next try:
//! 1 s doubling up to `peer_reconnect_max`, each wait varied by ±50 % at
//! random so that machines restarted together do not dial in step. A
//! connection that was established resets the backoff; so does a fresh
//! `peer add` (a new task). After a connection ends the task waits one
//! first step (0.5 to 1.5 s) before dialing again, so a peer that accepts
//! and then drops every connection is not dialed in a tight loop.

use super::manager::{Direction, Manager};
use crate::channel;
use crate::store::peers::parse_addr;
use rand::RngExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// The first wait after a failed dial.
pub const BACKOFF_START: Duration = Duration::from_secs(1);

/// Exponential backoff with ±50 % jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Waits from [`BACKOFF_START`] doubling up to `max` (at least the
    /// start).
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: BACKOFF_START.min(max),
            max: max.max(Duration::from_millis(1)),
        }
    }

    /// Back to the first step.
    pub fn reset(&mut self) {
        self.next = BACKOFF_START.min(self.max);
    }

    /// The nominal wait of the next step (before jitter).
    #[cfg(test)]
    pub fn nominal(&self) -> Duration {
        self.next
    }

    /// The wait before the next attempt: the nominal step times a random
    /// factor in [0.5, 1.5); the step then doubles, up to the maximum.
    pub fn next_wait(&mut self) -> Duration {
        let factor: f64 = rand::rng().random_range(0.5..1.5);
        let wait = self.next.mul_f64(factor);
        self.next = (self.next * 2).min(self.max);
        wait
    }
}

/// Dial `fingerprint` at `addr` until the task is aborted (see the module
/// doc).
pub async fn run(manager: Arc<Manager>, fingerprint: String, addr: String) {
    let mut backoff = Backoff::new(manager.reconnect_max());
    loop {
        match manager.live_conn(&fingerprint) {
            None => return, // removed
            Some(Some(conn)) => {
                let reason = conn.closed().await;
                tracing::debug!(peer = %fingerprint, %reason, "dialer: connection ended");
                backoff.reset();
                let wait = backoff.next_wait();
                manager.set_waiting(&fingerprint, None, wait);
                tokio::time::sleep(wait).await;
                continue;
            }
            Some(None) => {}
        }
        manager.set_connecting(&fingerprint);
        match dial_once(&manager, &fingerprint, &addr).await {
            Ok(()) => backoff.reset(),
            Err(why) => {
                let wait = backoff.next_wait();
                tracing::info!(
                    peer = %fingerprint,
                    %addr,
                    error = %why,
                    retry_in_ms = wait.as_millis() as u64,
                    "cannot connect to peer"
                );
                manager.set_waiting(&fingerprint, Some(why), wait);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// One dial: resolve, connect (each address in turn), handshake, hand over.
pub(super) async fn dial_once(
    manager: &Arc<Manager>,
    fingerprint: &str,
    addr: &str,
) -> Result<(), String> {
    let bound = manager.peer_timeout();
    let target = parse_addr(addr)?;
    let resolved: Vec<SocketAddr> = match tokio::time::timeout(
        bound,
        tokio::net::lookup_host((target.host.as_str(), target.port)),
    )
    .await
    {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => return Err(format!("cannot resolve {target}: {e}")),
        Err(_) => return Err(format!("resolving {target} took more than {bound:?}")),
    };
    if resolved.is_empty() {
        return Err(format!("{target} resolves to no address"));
    }
    let mut errors = Vec::new();
    for sa in resolved {
        let stream = match tokio::time::timeout(bound, TcpStream::connect(sa)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                errors.push(format!("{sa}: {e}"));
                continue;
            }
            Err(_) => {
                errors.push(format!("{sa}: no answer within {bound:?}"));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let est = channel::initiate(stream, manager.keys(), fingerprint, manager.channel_config())
            .await
            .map_err(|e| {
                if matches!(e, channel::ChannelError::WrongPeer { .. }) {
                    tracing::warn!(peer = %fingerprint, remote = %sa, error = %e, "refused: the machine at the peer's address has another identity");
                }
                format!("{sa}: {e}")
            })?;
        manager.register(est, Direction::Outbound, sa);
        return Ok(());
    }
    Err(errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_maximum_with_jitter_within_half() {
        let max = Duration::from_secs(30);
        let mut b = Backoff::new(max);
        let mut nominal = BACKOFF_START;
        for _ in 0..12 {
            assert_eq!(b.nominal(), nominal);
            let w = b.next_wait();
            assert!(
                w >= nominal.mul_f64(0.5) && w < nominal.mul_f64(1.5),
                "{w:?} outside [{:?}, {:?})",
                nominal.mul_f64(0.5),
                nominal.mul_f64(1.5)
            );
            nominal = (nominal * 2).min(max);
        }
        assert_eq!(b.nominal(), max);
        b.reset();
        assert_eq!(b.nominal(), BACKOFF_START);
    }

    #[test]
    fn jitter_spreads_the_waits() {
        // Two machines restarted together must not dial in step: many
        // draws of the first step are not all alike, and cover both halves.
        let waits: Vec<Duration> = (0..200)
            .map(|_| Backoff::new(Duration::from_secs(30)).next_wait())
            .collect();
        assert!(waits.iter().any(|w| *w < BACKOFF_START.mul_f64(0.9)));
        assert!(waits.iter().any(|w| *w > BACKOFF_START.mul_f64(1.1)));
    }

    #[test]
    fn a_maximum_below_the_start_caps_the_first_step() {
        let mut b = Backoff::new(Duration::from_millis(200));
        assert_eq!(b.nominal(), Duration::from_millis(200));
        let w = b.next_wait();
        assert!(w < Duration::from_millis(300), "{w:?}");
    }
}
