//! `keibictl wait [--synced]`: wait for keibi-syncd, for scripts.
//!
//! Without `--synced`, until syncd answers on its control socket (a
//! `Control::identity` call, which waits on nothing in syncd): what a
//! script needs after `systemctl start keibi-syncd`. With `--synced`, then
//! until [`pending`] finds nothing in `Control::sync_status`: no local
//! change unversioned, the store's figures fresh, and with every
//! connected peer nothing to send, nothing to apply and nothing waiting,
//! and the peer's first `CaughtUp` of this connection arrived. Peers that
//! are not connected are not waited for; each is named once on stderr.
//! With no peer connected (or none paired) only the local versioning is
//! waited for. Files whose bytes are not local do not count: fetching
//! them is on demand (`keibictl prefetch` makes them local).
//!
//! A refused connection (another protocol version, no permission) ends
//! the wait at once: waiting does not change it.
//!
//! Bounds: the whole wait ends at `--timeout`; every connect and call is
//! bounded by the rest of it and by [`CALL_MAX`]; between looks it sleeps
//! [`POLL_MIN`] doubling to [`POLL_MAX`]. One connection is kept while it
//! works and made again when it breaks (syncd restarting).

use crate::output::WaitOutput;
use crate::progress::{Mode, Progress};
use ipc_schema::handshake::HandshakeError;
use ipc_schema::service::ControlClient;
use ipc_schema::transport::{ConnectError, connect_control, context_with_timeout};
use ipc_schema::{PeerSync, SyncStatus};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

/// The longest any one connect or call may take.
pub const CALL_MAX: Duration = Duration::from_secs(5);
/// The first pause between two looks.
pub const POLL_MIN: Duration = Duration::from_millis(50);
/// The longest pause between two looks.
pub const POLL_MAX: Duration = Duration::from_millis(500);

/// What `pending` finds: `None` when in sync, else what is left, for
/// people, and the number of changes left.
pub fn pending(sync: &SyncStatus) -> Option<(String, u64)> {
    let mut parts = Vec::new();
    let mut changes = 0;
    if !sync.figures_fresh {
        parts.push("the store did not answer in time".to_string());
    }
    if sync.dirty > 0 {
        parts.push(format!("{} local changes unversioned", sync.dirty));
        changes += sync.dirty;
    }
    for p in sync.peers.iter().filter(|p| p.connected) {
        let left = p.pending_out + p.pending_in + p.deferred;
        if left > 0 {
            parts.push(format!(
                "{}: {left} changes ({} to send, {} to apply, {} waiting)",
                who(p),
                p.pending_out,
                p.pending_in,
                p.deferred
            ));
            changes += left;
        } else if !p.caught_up {
            parts.push(format!("{}: has not said how far its log goes yet", who(p)));
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some((parts.join("; "), changes))
    }
}

/// A peer for people: its name and the start of its fingerprint.
fn who(p: &PeerSync) -> String {
    let short: String = p.fingerprint.chars().take(8).collect();
    match &p.name {
        Some(n) => format!("{n} ({short}…)"),
        None => format!("{short}…"),
    }
}

/// How the wait ended.
pub struct Outcome {
    /// The JSON (and the facts for the text).
    pub report: WaitOutput,
    /// syncd refused the connection (protocol version, permission): the
    /// wait stopped at once (`report.pending` says why).
    pub refused: bool,
}

/// Wait as the module doc says, showing progress in `mode`.
pub async fn run(socket: &Path, timeout: Duration, synced: bool, mode: Mode) -> Outcome {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut progress = Progress::changes(mode, "wait");
    let mut client: Option<ControlClient> = None;
    let mut pause = POLL_MIN;
    let mut pending_now = "keibi-syncd has not answered yet".to_string();
    let mut last: Option<SyncStatus> = None;
    let mut told: BTreeSet<String> = BTreeSet::new();
    let mut not_waited_for = Vec::new();
    let mut done = false;
    let mut refused = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let call = (deadline - now).min(CALL_MAX);
        if client.is_none() {
            match tokio::time::timeout(call, connect_control(socket)).await {
                Ok(Ok(c)) => client = Some(c),
                Ok(Err(
                    e @ ConnectError::Handshake {
                        source: HandshakeError::Refused { .. },
                        ..
                    },
                )) => {
                    // A version mismatch or a permission refused does not
                    // pass by waiting.
                    pending_now = format!("keibi-syncd refused the connection: {e}");
                    refused = true;
                    break;
                }
                Ok(Err(e)) => pending_now = format!("keibi-syncd does not answer: {e}"),
                Err(_) => {
                    pending_now = format!(
                        "keibi-syncd did not answer on {} within {}",
                        socket.display(),
                        humantime::format_duration(call)
                    )
                }
            }
        }
        if let Some(c) = &client {
            let answer = if synced {
                tokio::time::timeout(call, c.sync_status(context_with_timeout(call)))
                    .await
                    .map(|r| r.map(Some))
            } else {
                tokio::time::timeout(call, c.identity(context_with_timeout(call)))
                    .await
                    .map(|r| r.map(|_| None))
            };
            match answer {
                Ok(Ok(None)) => {
                    done = true;
                    break;
                }
                Ok(Ok(Some(sync))) => {
                    not_waited_for = sync
                        .peers
                        .iter()
                        .filter(|p| !p.connected)
                        .map(|p| p.fingerprint.clone())
                        .collect();
                    for p in sync.peers.iter().filter(|p| !p.connected) {
                        if told.insert(p.fingerprint.clone()) {
                            progress
                                .note(&format!("not waiting for peer {}: not connected", who(p)));
                        }
                    }
                    if sync.peers.is_empty() && told.insert(String::new()) {
                        progress.note(
                            "no paired peers: waiting only for local changes to be versioned",
                        );
                    }
                    let left = pending(&sync);
                    last = Some(sync);
                    match left {
                        None => {
                            done = true;
                            break;
                        }
                        Some((what, changes)) => {
                            progress.say(format!("{changes} changes pending: {what}"));
                            pending_now = what;
                        }
                    }
                }
                Ok(Err(e)) => {
                    pending_now = format!("keibi-syncd did not answer: {e}");
                    client = None;
                }
                Err(_) => {
                    pending_now = format!(
                        "keibi-syncd did not answer within {}",
                        humantime::format_duration(call)
                    );
                    client = None;
                }
            }
        } else {
            progress.say(pending_now.clone());
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(POLL_MAX);
    }
    progress.finish();
    Outcome {
        refused,
        report: WaitOutput {
            until: if synced { "synced" } else { "answer" }.into(),
            done,
            waited_ms: started.elapsed().as_millis() as u64,
            pending: (!done).then_some(pending_now),
            not_waited_for,
            sync: last,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::peer;

    fn sync(peers: Vec<PeerSync>) -> SyncStatus {
        SyncStatus {
            peers,
            figures_fresh: true,
            ..SyncStatus::default()
        }
    }

    #[test]
    fn in_sync_means_nothing_left_with_connected_peers_only() {
        assert_eq!(pending(&sync(vec![])), None, "no peers: only local");
        assert_eq!(pending(&sync(vec![peer(true)])), None);
        let gone = PeerSync {
            pending_out: 5,
            ..peer(false)
        };
        assert_eq!(
            pending(&sync(vec![peer(true), gone])),
            None,
            "an unreachable peer is not waited for"
        );
    }

    #[test]
    fn each_kind_of_pending_work_is_named() {
        let s = SyncStatus {
            dirty: 2,
            ..sync(vec![])
        };
        assert_eq!(pending(&s), Some(("2 local changes unversioned".into(), 2)));
        let busy = PeerSync {
            pending_out: 1,
            pending_in: 2,
            deferred: 3,
            ..peer(true)
        };
        let (what, n) = pending(&sync(vec![busy])).expect("pending");
        assert_eq!(n, 6);
        assert_eq!(
            what,
            "bob (ABCDEFGH…): 6 changes (1 to send, 2 to apply, 3 waiting)"
        );
        let fresh = PeerSync {
            caught_up: false,
            ..peer(true)
        };
        let (what, n) = pending(&sync(vec![fresh])).expect("pending");
        assert_eq!(n, 0);
        assert!(what.contains("has not said how far its log goes"), "{what}");
        let stale = SyncStatus {
            figures_fresh: false,
            ..sync(vec![])
        };
        assert!(pending(&stale).is_some(), "stale figures are not trusted");
    }
}
