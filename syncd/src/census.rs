//! The store's figures for `keibictl status`, counted without making the
//! control service wait on the store.
//!
//! Counting files and bytes scans every inode record and stats content
//! files, and each mount's open handles sit behind the open table's lock,
//! which a transaction or an orphan scan may hold for as long as the disk
//! takes. So `status` never does either itself: it starts a scan in the
//! control runtime's blocking pool (at most one at a time; a `status` that
//! finds one running waits for that one) and waits for it at most
//! [`WAIT`]. A scan that finishes in time gives fresh figures; otherwise
//! the answer carries the figures of the last scan that finished, with
//! their age, or none at all if no scan has finished since syncd started,
//! and says so (`Status::counts_fresh`, `Status::counts_age_ms`). The
//! late scan keeps running and fills the cache when the store answers.
//!
//! The cache's lock is a leaf, held only to read or replace the figures.

use crate::daemon::Daemon;
use crate::opens::ConnId;
use crate::store::Counts;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long `status` waits for a scan of the store before answering from
/// the cache.
pub const WAIT: Duration = Duration::from_millis(250);

/// One scan's result.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Inodes and bytes.
    pub counts: Counts,
    /// Open handles by connection.
    pub handles: BTreeMap<ConnId, u64>,
}

/// What `status` reports: the figures, how old they are, whether this
/// answer waited for them.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The figures (all zero when no scan has finished yet).
    pub figures: Figures,
    /// Time since the scan that produced them finished; `None` if none has.
    pub age: Option<Duration>,
    /// Whether the scan was started for (or finished during) this answer.
    pub fresh: bool,
}

/// The cache and the single running scan.
pub struct Census {
    state: Mutex<State>,
    /// Bumped when a scan finishes.
    done: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    last: Option<(Figures, Instant)>,
    running: bool,
}

impl Default for Census {
    fn default() -> Self {
        Census {
            state: Mutex::new(State::default()),
            done: watch::channel(0).0,
        }
    }
}

impl Census {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Scan the store (or join the scan running now) and wait for it at
    /// most `wait`; then report what is known. Must run inside a tokio
    /// runtime; the scan runs in that runtime's blocking pool.
    pub async fn report(daemon: &Arc<Daemon>, wait: Duration) -> Report {
        let census = &daemon.census;
        let mut done = census.done.subscribe();
        let start = {
            let mut st = census.lock();
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            let d = daemon.clone();
            // The task runs on its own; its handle is not needed.
            drop(tokio::task::spawn_blocking(move || {
                let mut finish = Finish {
                    daemon: &d,
                    figures: None,
                };
                finish.figures = Some(scan(&d));
            }));
        }
        let fresh = matches!(tokio::time::timeout(wait, done.changed()).await, Ok(Ok(())));
        let st = census.lock();
        match &st.last {
            Some((figures, at)) => Report {
                figures: figures.clone(),
                age: Some(at.elapsed()),
                fresh,
            },
            None => Report::default(),
        }
    }
}

/// Ends a scan, even one that panicked: records its figures (if any),
/// clears `running` and wakes the waiters.
struct Finish<'a> {
    daemon: &'a Daemon,
    figures: Option<Figures>,
}

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        let census = &self.daemon.census;
        let mut st = census.lock();
        if let Some(f) = self.figures.take() {
            st.last = Some((f, Instant::now()));
        }
        st.running = false;
        drop(st);
        census.done.send_modify(|n| *n += 1);
    }
}

/// Count the store and the open handles of every connected mount.
/// Blocking.
fn scan(daemon: &Daemon) -> Figures {
    crate::fault::store_gate();
    let counts = daemon.store.counts().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "status: cannot count the store");
        Counts::default()
    });
    let handles = daemon
        .mounts
        .list()
        .into_iter()
        .map(|(conn, _, _)| (conn, daemon.store.open_handles(conn)))
        .collect();
    Figures { counts, handles }
}
