//! The sync engine: the tasks that keep this folder and the peers' in
//! step, and what they share.
//!
//! [`SyncEngine::start`] (in `main`, after the store and before the peer
//! manager) ties the store to this device, then starts the local versioner
//! ([`super::local`]), which turns local changes into versions. The engine's
//! [`SyncHandler`] serves the peers' requests (`Index`, `Notify`, `Chunk`,
//! and part 1's `Ping`/`Echo`/`Bulk`), and its `connected` hook, called by
//! the peer manager for every new connection, starts a session
//! ([`super::session`]) that pulls the peer's change log and applies it.
//!
//! Applying. Every change to the index (a local version, or a remote record
//! decided by [`super::merge`] and applied by `Store::apply_remote`) happens
//! on the blocking pool under one lock, [`SyncEngine::index_lock`], so that
//! the decision (which reads the recorded version) and the store write are
//! one step: two sessions, or a session and the versioner, never decide on
//! a version that another is replacing. Nothing else is locked while it is
//! held, and it is never held across an `.await`. After each change the
//! new local sequence number is published on a `watch` channel, which
//! wakes the index streams serving the peers.
//!
//! The data path (fetching chunks, serving them, telling mountd what
//! changed) is behind [`DataPath`], so that the engine does not depend on
//! how it is built; `main` passes the real one.

use super::index::{SentTracker, serve_index};
use super::model::{ChunkHash, DeviceId, Gid};
use super::status::PeerBook;
use crate::peer::conn::PeerConn;
use crate::peer::msg::{RemoteError, RemoteErrorKind, Reply, Request};
use crate::peer::requests::{ChunkSink, DefaultHandler, RequestHandler};
use crate::store::Store;
use futures::future::BoxFuture;
use ipc_schema::{FsError, Ino, Inval};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{Notify, watch};

/// What the engine needs of the data path (chunk transfer and
/// invalidation).
pub trait DataPath: Send + Sync + 'static {
    /// Fetch every missing chunk of `ino` in the background.
    fn prefetch(&self, ino: Ino);
    /// Tell mountd what changed.
    fn push_invals(&self, invals: Vec<Inval>);
    /// Files up to this size are fetched as soon as their version arrives.
    fn eager_fetch_max(&self) -> u64;
    /// Make the chunks of `ino` generation `generation` covering
    /// `[offset, offset + len)` present (within `timeout`).
    fn ensure(
        &self,
        ino: Ino,
        generation: u64,
        offset: u64,
        len: u64,
        timeout: std::time::Duration,
    ) -> BoxFuture<'static, Result<(), FsError>>;
    /// Serve a peer's `Chunk` request.
    fn serve_chunk(
        &self,
        gid: Gid,
        index: u64,
        hash: ChunkHash,
        sink: ChunkSink,
    ) -> BoxFuture<'static, Result<(), RemoteError>>;
}

/// The sync engine (see the module doc). Shared as `Arc<SyncEngine>`.
pub struct SyncEngine {
    /// The store.
    pub(super) store: Arc<Store>,
    /// This device.
    pub(super) device: DeviceId,
    /// The data path (set once the peer manager exists; until then
    /// nothing is fetched).
    data: std::sync::OnceLock<Arc<dyn DataPath>>,
    /// The local sequence number, published after each change.
    seq_tx: watch::Sender<u64>,
    /// Serialises decisions and writes of the index (see the module doc;
    /// a leaf lock, taken only on the blocking pool).
    index: Mutex<()>,
    /// Woken each time the versioner finished a round (sessions retry the
    /// records that were refused as `Busy`).
    pub(super) versioned: Notify,
    /// The per-peer sync state for `keibictl status`.
    pub(super) book: PeerBook,
    /// Conflicts resolved since start.
    pub(super) conflicts: AtomicU64,
}

impl SyncEngine {
    /// Tie the store to `device` and start the local versioner on the
    /// current runtime. Blocks on the store (call it before serving).
    pub fn start(store: Arc<Store>, device: DeviceId) -> Result<Arc<SyncEngine>, FsError> {
        store.attach_device(device)?;
        let (seq_tx, _) = watch::channel(store.local_seq());
        let engine = Arc::new(SyncEngine {
            store,
            device,
            data: std::sync::OnceLock::new(),
            seq_tx,
            index: Mutex::new(()),
            versioned: Notify::new(),
            book: PeerBook::default(),
            conflicts: AtomicU64::new(0),
        });
        tokio::spawn(super::local::run(engine.clone()));
        Ok(engine)
    }

    /// This device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The data path ([`NoDataPath`] until [`SyncEngine::set_data_path`]).
    pub fn data(&self) -> &dyn DataPath {
        match self.data.get() {
            Some(d) => d.as_ref(),
            None => &NoDataPath,
        }
    }

    /// Set the data path (once; later calls are ignored).
    pub fn set_data_path(&self, data: Arc<dyn DataPath>) {
        let _ = self.data.set(data);
    }

    /// The handler of peer requests (given to the peer manager).
    pub fn handler(self: &Arc<Self>) -> Arc<dyn RequestHandler> {
        Arc::new(SyncHandler {
            engine: self.clone(),
        })
    }

    /// Take the index lock (blocking pool only; see the module doc).
    pub(super) fn lock_index(&self) -> MutexGuard<'_, ()> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publish the store's local sequence number (after a change).
    pub(super) fn publish_seq(&self) {
        let seq = self.store.local_seq();
        self.seq_tx.send_if_modified(|s| {
            if seq > *s {
                *s = seq;
                true
            } else {
                false
            }
        });
    }

    /// A conflict was resolved.
    pub(super) fn count_conflict(&self) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
        crate::metrics::conflict();
    }
}

/// Serves the peers' requests: the sync requests here, part 1's through
/// [`DefaultHandler`].
pub struct SyncHandler {
    engine: Arc<SyncEngine>,
}

impl RequestHandler for SyncHandler {
    fn call(&self, req: Request) -> BoxFuture<'static, Result<Reply, RemoteError>> {
        match req {
            // A hint only: the index stream already carries every change.
            Request::Notify { .. } => Box::pin(async { Ok(Reply::Ack) }),
            other => DefaultHandler.call(other),
        }
    }

    fn stream(&self, req: Request, sink: ChunkSink) -> BoxFuture<'static, Result<(), RemoteError>> {
        match req {
            Request::Index { since } => {
                let engine = self.engine.clone();
                let fingerprint = sink.peer().fingerprint.clone();
                let tracker: SentTracker = {
                    let engine = engine.clone();
                    Arc::new(move |seq| engine.book.sent(&fingerprint, seq))
                };
                Box::pin(serve_index(
                    engine.store.clone(),
                    engine.seq_tx.subscribe(),
                    since,
                    sink,
                    tracker,
                ))
            }
            Request::Chunk { gid, index, hash } => {
                self.engine.data().serve_chunk(gid, index, hash, sink)
            }
            Request::Bulk { .. } => DefaultHandler.stream(req, sink),
            other => Box::pin(async move {
                Err(RemoteError::new(
                    RemoteErrorKind::Unsupported,
                    format!("{} is not a stream here", other.name()),
                ))
            }),
        }
    }

    fn connected(&self, conn: PeerConn) {
        tokio::spawn(super::session::run(self.engine.clone(), conn));
    }
}

/// The data path of a syncd that cannot move file bytes: nothing is
/// fetched or served (reads of bytes that are not local fail). Used
/// before the real one is set, and in unit tests.
pub struct NoDataPath;

impl DataPath for NoDataPath {
    fn prefetch(&self, _: Ino) {}
    fn push_invals(&self, _: Vec<Inval>) {}
    fn eager_fetch_max(&self) -> u64 {
        0
    }
    fn ensure(
        &self,
        _: Ino,
        _: u64,
        _: u64,
        _: u64,
        _: std::time::Duration,
    ) -> BoxFuture<'static, Result<(), FsError>> {
        Box::pin(async { Err(ipc_schema::fs_err!(EIO, "no data path")) })
    }
    fn serve_chunk(
        &self,
        _: Gid,
        _: u64,
        _: ChunkHash,
        _: ChunkSink,
    ) -> BoxFuture<'static, Result<(), RemoteError>> {
        Box::pin(async {
            Err(RemoteError::new(
                RemoteErrorKind::NotFound,
                "chunks are not served here",
            ))
        })
    }
}
