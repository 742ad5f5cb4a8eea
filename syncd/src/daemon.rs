//! What every connection of this daemon shares: the store, the mounts that
//! are connected, the filesystem requests in flight, the cached store
//! figures of `keibictl status`, when the daemon started, its peer
//! identity, the peer manager and the sync engine.

use crate::census::Census;
use crate::opens::ConnId;
use crate::peer::manager::Manager;
use crate::store::Store;
use crate::sync::engine::SyncEngine;
use crate::sync::fetch::Fetcher;
use crate::sync::inval::InvalQueue;
use ipc_schema::inflight::InFlight;
use ipc_schema::{MountInfo, PeerIdentity};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The daemon's shared state.
pub struct Daemon {
    /// The metadata store.
    pub store: Arc<Store>,
    /// Mounts that said who they are (`register_mount`).
    pub mounts: Mounts,
    /// Filesystem requests being served now (`keibictl debug ops`).
    pub inflight: Arc<InFlight>,
    /// The store's figures for `keibictl status`, cached.
    pub census: Census,
    /// When the daemon started.
    pub started: Instant,
    /// The peer identity as `keibictl id` shows it.
    pub identity: PeerIdentity,
    /// The paired peers and their connections.
    pub peers: Arc<Manager>,
    /// The sync engine.
    pub sync: Arc<SyncEngine>,
    /// On-demand chunk fetches (`fetch_range`, `debug_fetches`).
    pub fetcher: Arc<Fetcher>,
    /// Invalidations for mountd (`changes`).
    pub invals: Arc<InvalQueue>,
    next_conn: AtomicU64,
}

impl Daemon {
    /// Shared state around `store`, answering `keibictl id` with
    /// `identity`, with the peer manager `peers`, the sync engine
    /// `sync`, the chunk fetcher
    /// `fetcher` and the invalidation queue `invals`.
    pub fn new(
        store: Arc<Store>,
        identity: PeerIdentity,
        peers: Arc<Manager>,
        sync: Arc<SyncEngine>,
        fetcher: Arc<Fetcher>,
        invals: Arc<InvalQueue>,
    ) -> Daemon {
        Daemon {
            store,
            mounts: Mounts::default(),
            inflight: InFlight::new(),
            census: Census::default(),
            started: Instant::now(),
            identity,
            peers,
            sync,
            fetcher,
            invals,
            next_conn: AtomicU64::new(1),
        }
    }

    /// A number for a new connection.
    pub fn next_conn(&self) -> ConnId {
        ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed))
    }
}

/// The registered mounts, by connection. Its lock is a leaf: held only to
/// insert, remove or copy, never while taking another lock.
#[derive(Default)]
pub struct Mounts {
    by_conn: Mutex<BTreeMap<ConnId, (MountInfo, Instant)>>,
}

impl Mounts {
    /// Record what the mount on `conn` said about itself.
    pub fn register(&self, conn: ConnId, info: MountInfo) {
        self.lock().insert(conn, (info, Instant::now()));
    }

    /// Forget the mount on `conn`.
    pub fn remove(&self, conn: ConnId) {
        self.lock().remove(&conn);
    }

    /// The mounts connected now, with when they connected.
    pub fn list(&self) -> Vec<(ConnId, MountInfo, Instant)> {
        self.lock()
            .iter()
            .map(|(c, (i, t))| (*c, i.clone(), *t))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ConnId, (MountInfo, Instant)>> {
        self.by_conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}
