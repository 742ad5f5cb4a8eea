//! The engine's data path ([`DataPath`]) made of the fetcher
//! ([`super::fetch`]), the chunk server ([`super::serve`]) and the
//! invalidation queue ([`super::inval`]).

use super::engine::DataPath;
use super::fetch::Fetcher;
use super::inval::InvalQueue;
use super::model::{ChunkHash, Gid};
use crate::peer::msg::RemoteError;
use crate::peer::requests::ChunkSink;
use crate::store::Store;
use futures::future::BoxFuture;
use ipc_schema::{FsError, Ino, Inval};
use std::sync::Arc;
use std::time::Duration;

/// The real data path.
pub struct Wired {
    /// The store (chunks are served from it).
    pub store: Arc<Store>,
    /// Fetches chunks from peers.
    pub fetcher: Arc<Fetcher>,
    /// What mountd long-polls.
    pub invals: Arc<InvalQueue>,
    /// `eager_fetch_max`.
    pub eager_fetch_max: u64,
}

impl DataPath for Wired {
    fn prefetch(&self, ino: Ino) {
        self.fetcher.prefetch(ino);
    }

    fn push_invals(&self, invals: Vec<Inval>) {
        self.invals.push(invals);
    }

    fn eager_fetch_max(&self) -> u64 {
        self.eager_fetch_max
    }

    fn ensure(
        &self,
        ino: Ino,
        generation: u64,
        offset: u64,
        len: u64,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<(), FsError>> {
        let fetcher = self.fetcher.clone();
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            fetcher
                .ensure(ino, generation, offset, len, deadline, false)
                .await
                .map(|_| ())
        })
    }

    fn serve_chunk(
        &self,
        gid: Gid,
        index: u64,
        hash: ChunkHash,
        sink: ChunkSink,
    ) -> BoxFuture<'static, Result<(), RemoteError>> {
        Box::pin(super::serve::serve_chunk(
            self.store.clone(),
            gid,
            index,
            hash,
            sink,
        ))
    }
}
