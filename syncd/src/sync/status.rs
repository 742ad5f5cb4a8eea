//! What `keibictl status` shows of sync: per peer, how far each side got.
//!
//! The [`PeerBook`] is written by the sessions (what we pulled and applied
//! of a peer, what is deferred, connected or not) and by the index streams
//! we serve (the last of our sequence numbers queued to the peer), and
//! read by `Control::sync_status`. Its lock is a leaf: held only to copy or
//! update a few numbers, never across an `.await` or another lock.

use super::engine::SyncEngine;
use super::model::chunk_range;
use crate::store::objects::PresenceRec;
use ipc_schema::{FsError, NotLocal, PeerInfo, PeerSync, SyncStatus};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// The most partial files `status` counts (it says so when there are
/// more: the count is then a lower bound).
pub const COUNT_PARTIAL_MAX: usize = 100_000;

/// What one peer's sync looks like from here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerProgress {
    /// A session is running on a live connection.
    pub connected: bool,
    /// Sessions running (a replaced connection's session may end after
    /// its successor's started).
    pub sessions: u32,
    /// When the last session ended (seconds since the epoch), while no
    /// session runs.
    pub unreachable_since: Option<i64>,
    /// The last of our sequence numbers sent to the peer on its stream.
    pub sent_seq: u64,
    /// The peer's last sequence number it told us of (`CaughtUp`).
    pub peer_seq: u64,
    /// The peer's sequence number applied here.
    pub applied_seq: u64,
    /// Records of the peer waiting here (parent missing, busy, ...).
    pub deferred: u64,
    /// The peer's first `CaughtUp` of the running session arrived, so
    /// `peer_seq` is this session's (cleared when a session starts).
    pub caught_up: bool,
}

/// The per-peer progress, by fingerprint (see the module doc).
#[derive(Default)]
pub struct PeerBook {
    peers: Mutex<BTreeMap<String, PeerProgress>>,
}

impl PeerBook {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, PeerProgress>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the progress of `fingerprint`.
    pub fn update(&self, fingerprint: &str, f: impl FnOnce(&mut PeerProgress)) {
        let mut peers = self.lock();
        f(peers.entry(fingerprint.to_owned()).or_default());
    }

    /// The serving side queued our changes up to `seq` to `fingerprint`.
    pub fn sent(&self, fingerprint: &str, seq: u64) {
        self.update(fingerprint, |p| p.sent_seq = p.sent_seq.max(seq));
    }

    /// A session with `fingerprint` started.
    pub fn session_started(&self, fingerprint: &str) {
        self.update(fingerprint, |p| {
            p.sessions += 1;
            p.connected = true;
            p.unreachable_since = None;
            p.caught_up = false;
        });
    }

    /// The session with `fingerprint` ended.
    pub fn session_ended(&self, fingerprint: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.update(fingerprint, |p| {
            p.sessions = p.sessions.saturating_sub(1);
            if p.sessions == 0 {
                p.connected = false;
                p.unreachable_since = Some(now);
                p.deferred = 0;
            }
        });
    }

    /// The progress of `fingerprint`, if a session ever ran.
    pub fn get(&self, fingerprint: &str) -> Option<PeerProgress> {
        self.lock().get(fingerprint).cloned()
    }
}

/// Changes of ours the peer has not pulled: `local_seq - sent`.
pub fn pending_out(local_seq: u64, sent: u64) -> u64 {
    local_seq.saturating_sub(sent)
}

/// Changes of the peer not applied here: `peer_seq - applied`.
pub fn pending_in(peer_seq: u64, applied: u64) -> u64 {
    peer_seq.saturating_sub(applied)
}

/// Bytes of a partial file that are present and verified.
pub fn present_bytes(p: &PresenceRec) -> u64 {
    let count = p.chunks.len() as u64;
    (0..count)
        .filter(|i| {
            p.present
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        })
        .map(|i| {
            let (start, end) = chunk_range(i, p.size);
            end - start
        })
        .sum()
}

/// What the store says for the status: inodes not yet versioned, files
/// not all local, bytes missing (blocking: reads the store).
pub fn store_figures(engine: &SyncEngine) -> Result<(u64, u64, u64), FsError> {
    let store = engine.store();
    let partial = store.partial_files(COUNT_PARTIAL_MAX)?;
    let missing_bytes = partial
        .iter()
        .map(|(_, p)| p.size.saturating_sub(present_bytes(p)))
        .sum();
    Ok((store.dirty_count(), partial.len() as u64, missing_bytes))
}

/// The sync status from the per-peer progress (never waits) and the
/// store's figures (`None` when the store did not answer in time: shown
/// as 0). `peers` is the peer manager's list (names, connection state,
/// last seen).
pub fn sync_status(
    engine: &SyncEngine,
    peers: Vec<PeerInfo>,
    figures: Option<(u64, u64, u64)>,
) -> SyncStatus {
    let local_seq = engine.store().local_seq();
    let peers = peers
        .into_iter()
        .map(|info| {
            let progress = engine.book.get(&info.fingerprint).unwrap_or_default();
            let connected = info.state == "connected" && progress.connected;
            let unreachable_since = if connected {
                None
            } else {
                progress
                    .unreachable_since
                    .or(info.last_seen_unix_ms.map(|ms| (ms / 1000) as i64))
            };
            PeerSync {
                fingerprint: info.fingerprint,
                name: info.name,
                connected,
                unreachable_since,
                pending_out: pending_out(local_seq, progress.sent_seq),
                pending_in: pending_in(progress.peer_seq, progress.applied_seq),
                acked_seq: progress.sent_seq,
                applied_seq: progress.applied_seq,
                deferred: progress.deferred,
                caught_up: connected && progress.caught_up,
            }
        })
        .collect();
    let figures_fresh = figures.is_some();
    let (dirty, partial_files, missing_bytes) = figures.unwrap_or_default();
    SyncStatus {
        device: engine.device().hex(),
        local_seq,
        dirty,
        peers,
        partial_files,
        missing_bytes,
        conflicts: engine.conflicts.load(Ordering::Relaxed),
        figures_fresh,
    }
}

/// Files whose bytes are not all local, up to `limit` (blocking).
pub fn not_local(engine: &SyncEngine, limit: usize) -> Result<Vec<NotLocal>, FsError> {
    let store = engine.store();
    let mut out = Vec::new();
    for (ino, p) in store.partial_files(limit)? {
        let path = store
            .path_of(ino)
            .unwrap_or_else(|_| format!("<inode {}>", ino.0));
        out.push(NotLocal {
            path,
            ino: ino.0,
            size: p.size,
            present_bytes: present_bytes(&p),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_end_records_since_when_and_a_start_clears_it() {
        let book = PeerBook::default();
        assert_eq!(book.get("p"), None);
        book.session_started("p");
        book.sent("p", 7);
        book.sent("p", 3);
        let p = book.get("p").expect("known");
        assert!(p.connected);
        assert_eq!(p.sent_seq, 7, "sent only moves forward");
        book.session_ended("p");
        let p = book.get("p").expect("known");
        assert!(!p.connected);
        assert!(p.unreachable_since.is_some());
        book.update("p", |p| p.caught_up = true);
        book.session_started("p");
        let p = book.get("p").expect("known");
        assert_eq!(p.unreachable_since, None);
        assert!(!p.caught_up, "a new session has not caught up yet");
        // A replaced connection's session ends after its successor started.
        book.session_started("p");
        book.session_ended("p");
        assert!(book.get("p").expect("known").connected, "still connected");
        assert_eq!(pending_out(10, 7), 3);
        assert_eq!(pending_in(4, 9), 0);
    }
}
