//! Fetching chunks on demand: the bytes of a remote version, from a peer
//! that has them, verified, into the sparse content file.
//!
//! A file that arrived from a peer starts as a content generation whose
//! chunks are missing, with a presence record ([`PresenceRec`]: the
//! expected hash of every chunk and a bitmap of those present). A read of
//! a missing range comes here as [`Fetcher::ensure`] (mountd's
//! `fetch_range`, with the read's deadline); the sync engine calls it too
//! before rehashing a partial file, and [`Fetcher::prefetch`] fetches a
//! whole small file in the background as soon as its version arrives.
//!
//! One chunk, one fetch. Each missing chunk is a *flight*: a task that asks
//! the connected peers for it in turn (`Request::Chunk{gid, index, hash}`,
//! a stream of at most `CHUNK_SIZE` bytes), collects the bytes, checks
//! their length and BLAKE3 hash, and only then writes them. Bytes that do
//! not match are refused (logged with the peer; nothing is written) and the
//! next peer is asked; a peer that answers `NotFound`, fails or times out
//! is skipped the same way. When no peer is connected, or none had the
//! chunk, the flight fails with `EIO` at once: a reader never waits for a
//! peer that is not there. The bytes below the presence `limit` (a file
//! truncated since the version arrived keeps only those) are `pwrite`n into
//! the generation's file, then the chunk is marked present (the bit is
//! written after the bytes; at start the store re-hashes present chunks
//! not yet synced, so a power cut between the two cannot leave a wrong
//! chunk marked present). The limit is read and the bytes written under
//! the inode's size lock, which a truncate holds from its `ftruncate`
//! until its limit is recorded (`Store::write_chunk`), so fetched bytes
//! never land beyond a size a truncate set. A chunk already marked
//! present is never written again, and mountd writes into a chunk only
//! once a present bit said so, which syncd makes durable and synced
//! before a handle that may write learns it (`Store::settle_for_writer`):
//! bytes written locally into a fetched chunk are never overwritten by a
//! later fetch, nor taken for a torn fetch at start, also after a crash.
//!
//! Dedup: flights are keyed by (inode, generation, chunk); a second reader
//! of a chunk already in flight waits for the same flight. Parallelism and
//! priority: each file has two sets of `fetch_parallel` request slots
//! (semaphores), one for read-ahead and one for demanded chunks, so at
//! most `fetch_parallel` read-ahead flights and `fetch_parallel` demanded
//! flights of one file ask peers at once, each kind queueing in order. A
//! demanded chunk never waits behind read-ahead: a read-ahead flight
//! still waiting for a slot when a reader comes to need its chunk is
//! promoted (woken, it waits for a demanded slot instead). Deadlines: the waiting
//! reader gives up at its deadline with `ETIMEDOUT`, but the flight goes on
//! in the background (bounded by [`CHUNK_TIMEOUT`] per peer), so the next
//! read finds the chunk present.
//!
//! Read-ahead: a demanded read that continues where the last one of the
//! same file ended, or inside what was read ahead for it, is sequential:
//! its window doubles (from one chunk up to `fetch_readahead_max` bytes),
//! and the missing chunks of the window after the read are started as
//! background flights. A read elsewhere resets the window to nothing. The
//! window is kept per inode ([`Readahead`]).
//!
//! What the fetcher reads of the store is small: the presence bits
//! ([`PresentBits`], not the record with every chunk's hash) once per
//! demand (none per chunk: a flight goes straight to the peers, see
//! [`Fetcher::start`] for why it never fetches a chunk that is present),
//! and the hashes of a version once per file (kept with the file's state
//! while it is fetched).
//!
//! Locks: one `Mutex<State>` (the flights and the per-file state), and one
//! small mutex per flight (the peer being asked, for `debug_fetches`).
//! Neither is held across an `.await`, a store call or a peer call; the
//! state lock is never taken while a flight's is held (the flight's is a
//! leaf). Store calls run on the blocking pool, except the two short
//! reads of [`Fetcher::ensure`]'s presence look, made on the calling task
//! (see `Fetcher::version`).

use crate::peer::conn::PeerConn;
use crate::peer::manager::Manager;
use crate::peer::msg::{MAX_CHUNK, RemoteErrorKind, Request};
use crate::peer::requests::RequestError;
use crate::store::Store;
use crate::store::objects::PresenceRec;
use crate::store::presence::PresentBits;
use crate::sync::model::{CHUNK_SIZE, ChunkHash, Gid, chunk_count, chunk_range};
use bytes::Bytes;
use ipc_schema::{FetchInFlight, FsError, Ino, fs_err};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

/// How long one peer may take to send one chunk before the next is asked.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// How many files' read-ahead state is kept (those with flights in the
/// air are always kept).
const FILES_KEPT: usize = 1024;

/// The store as the fetcher uses it (a seam, so the fetcher's logic is
/// tested with an in-memory store). Every method blocks.
pub trait ChunkStore: Send + Sync + 'static {
    /// The presence record of `ino`, if its bytes are not all local.
    fn presence(&self, ino: Ino) -> Result<Option<PresenceRec>, FsError>;
    /// The presence bits of `ino` (the record without its hashes).
    fn presence_bits(&self, ino: Ino) -> Result<Option<PresentBits>, FsError> {
        Ok(self.presence(ino)?.map(|p| PresentBits::of(&p)))
    }
    /// The current content generation of `ino` and the size of its
    /// content file.
    fn generation(&self, ino: Ino) -> Result<(u64, u64), FsError>;
    /// Write the verified bytes of chunk `index` of generation
    /// `generation` (`pieces`, one after the other, as they arrived)
    /// below the presence limit and mark it present, unless
    /// it counts as present already or the file is complete; `EIO` when
    /// another generation replaced it (`Store::write_chunk`: the limit is
    /// read and the bytes written under the inode's size lock, which
    /// truncates take too).
    fn write_chunk(
        &self,
        ino: Ino,
        generation: u64,
        index: u64,
        pieces: &[Bytes],
    ) -> Result<(), FsError>;
}

impl ChunkStore for Store {
    fn presence(&self, ino: Ino) -> Result<Option<PresenceRec>, FsError> {
        crate::fault::store_gate();
        Store::presence(self, ino)
    }

    fn presence_bits(&self, ino: Ino) -> Result<Option<PresentBits>, FsError> {
        crate::fault::store_gate();
        Store::presence_bits(self, ino)
    }

    fn generation(&self, ino: Ino) -> Result<(u64, u64), FsError> {
        crate::fault::store_gate();
        let Some(rec) = self.read_inode(ino.0)? else {
            return Err(fs_err!(ENOENT, "{ino} is gone"));
        };
        let size = self
            .open_content(ino, rec.generation)?
            .metadata()
            .map_err(|e| fs_err!(EIO, "{ino}: stat of the content file: {e}"))?
            .len();
        Ok((rec.generation, size))
    }

    fn write_chunk(
        &self,
        ino: Ino,
        generation: u64,
        index: u64,
        pieces: &[Bytes],
    ) -> Result<(), FsError> {
        crate::fault::store_gate();
        Store::write_chunk(self, ino, generation, index, pieces)
    }
}

/// Where the connected peers come from (a seam for the tests).
pub trait PeerSource: Send + Sync + 'static {
    /// The connected peers (fingerprint, connection), in a stable order.
    fn connected(&self) -> Vec<(String, PeerConn)>;
}

impl PeerSource for Manager {
    fn connected(&self) -> Vec<(String, PeerConn)> {
        self.list()
            .into_iter()
            .filter_map(|info| {
                let conn = self.live_conn(&info.fingerprint).flatten()?;
                Some((info.fingerprint, conn))
            })
            .collect()
    }
}

/// The fetcher's settings (from the configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchConfig {
    /// At most this many chunk requests of one file in flight
    /// (`fetch_parallel`).
    pub parallel: usize,
    /// The largest read-ahead window in bytes (`fetch_readahead_max`).
    pub readahead_max: u64,
    /// How long one peer may take to send one chunk.
    pub chunk_timeout: Duration,
}

impl FetchConfig {
    /// The settings of `config`.
    pub fn of(config: &crate::config::Config) -> FetchConfig {
        FetchConfig {
            parallel: config.fetch_parallel,
            readahead_max: config.fetch_readahead_max,
            chunk_timeout: CHUNK_TIMEOUT,
        }
    }
}

/// The read-ahead state of one file (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readahead {
    /// Where the last demanded read started.
    last_offset: u64,
    /// The end of what was read or read ahead after it.
    ahead_end: u64,
    /// The window in bytes (0: none).
    window: u64,
}

impl Readahead {
    /// A demanded read of `[offset, offset + len)`: update the window and
    /// answer the byte range to read ahead (empty when none).
    pub fn on_read(&mut self, offset: u64, len: u64, max: u64) -> (u64, u64) {
        let end = offset.saturating_add(len);
        let sequential =
            offset <= self.ahead_end && offset.saturating_add(CHUNK_SIZE) >= self.last_offset;
        self.window = if sequential {
            self.window
                .saturating_mul(2)
                .clamp(CHUNK_SIZE, max.max(CHUNK_SIZE))
        } else {
            0
        };
        if max == 0 {
            self.window = 0;
        }
        self.last_offset = offset;
        self.ahead_end = end.saturating_add(self.window);
        (end, self.ahead_end)
    }
}

/// A chunk of a file's content generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ChunkKey {
    ino: Ino,
    generation: u64,
    index: u64,
}

/// What a flight needs to know of its chunk.
#[derive(Clone, Copy, Debug)]
struct ChunkSpec {
    key: ChunkKey,
    gid: Gid,
    hash: ChunkHash,
    /// The chunk's length in the version (its last chunk is shorter).
    len: u64,
}

/// One chunk being fetched.
struct Flight {
    done: watch::Sender<Option<Result<(), FsError>>>,
    started: Instant,
    demanded: AtomicBool,
    /// Woken when a waiting read-ahead flight becomes demanded.
    promoted: Notify,
    /// The peer being asked ("" while waiting for a slot).
    peer: Mutex<String>,
}

impl Flight {
    fn set_peer(&self, fingerprint: &str) {
        let mut peer = self.peer.lock().unwrap_or_else(|p| p.into_inner());
        fingerprint.clone_into(&mut peer);
    }
}

/// Per file: read-ahead, the request slots, and the hashes of the
/// version being fetched.
struct FileState {
    readahead: Readahead,
    /// Slots of read-ahead flights.
    slots: Arc<Semaphore>,
    /// Slots of demanded flights.
    demand_slots: Arc<Semaphore>,
    /// The generation the hashes are of, and each chunk's hash.
    hashes: Option<(u64, Gid, Arc<Vec<ChunkHash>>)>,
    /// The chunks that flights of generation `.0` made present (a bitmap),
    /// so that a flight is not started again for a chunk whose flight
    /// ended after the caller read the presence bits ([`Fetcher::start`]).
    landed: (u64, Vec<u64>),
}

impl FileState {
    /// A flight made chunk `index` of `generation` present.
    fn land(&mut self, generation: u64, index: u64) {
        if self.landed.0 != generation {
            self.landed = (generation, Vec::new());
        }
        let word = (index / 64) as usize;
        if self.landed.1.len() <= word {
            self.landed.1.resize(word + 1, 0);
        }
        self.landed.1[word] |= 1 << (index % 64);
    }

    /// Whether a flight made chunk `index` of `generation` present.
    fn landed(&self, generation: u64, index: u64) -> bool {
        self.landed.0 == generation && bit(&self.landed.1, index)
    }
}

#[derive(Default)]
struct State {
    flights: HashMap<ChunkKey, Arc<Flight>>,
    files: HashMap<Ino, FileState>,
}

/// The fetcher (see the module doc). Shared as `Arc<Fetcher>`.
pub struct Fetcher {
    store: Arc<dyn ChunkStore>,
    peers: Arc<dyn PeerSource>,
    cfg: FetchConfig,
    /// Where flights run (the network runtime).
    rt: Handle,
    state: Mutex<State>,
}

/// Is chunk `index` set in `bitmap`?
pub fn bit(bitmap: &[u64], index: u64) -> bool {
    bitmap
        .get((index / 64) as usize)
        .is_some_and(|w| w & (1 << (index % 64)) != 0)
}

/// What [`Fetcher::ensure`] finds of the version it is asked about.
enum Version {
    /// Some chunks are missing.
    Partial(PresentBits),
    /// Every chunk is here; the content's size.
    Complete(u64),
}

/// The state of file `ino` (made if new). When [`FILES_KEPT`] files are
/// known, those no flight holds (or waits for) a slot of are forgotten
/// first.
fn file_state(st: &mut State, ino: Ino, parallel: usize) -> &mut FileState {
    if st.files.len() >= FILES_KEPT && !st.files.contains_key(&ino) {
        st.files.retain(|_, f| {
            Arc::strong_count(&f.slots) > 1 || Arc::strong_count(&f.demand_slots) > 1
        });
    }
    st.files.entry(ino).or_insert_with(|| FileState {
        readahead: Readahead::default(),
        slots: Arc::new(Semaphore::new(parallel)),
        demand_slots: Arc::new(Semaphore::new(parallel)),
        hashes: None,
        landed: (0, Vec::new()),
    })
}

/// A bitmap with every chunk of `[0, upto)` set (a complete file).
fn all_present(upto: u64) -> Vec<u64> {
    vec![u64::MAX; chunk_count(upto).div_ceil(64) as usize]
}

impl Fetcher {
    /// A fetcher of `store`'s chunks from `peers`, running its flights on
    /// `rt`.
    pub fn new(
        store: Arc<dyn ChunkStore>,
        peers: Arc<dyn PeerSource>,
        cfg: FetchConfig,
        rt: Handle,
    ) -> Arc<Fetcher> {
        Arc::new(Fetcher {
            store,
            peers,
            cfg: FetchConfig {
                parallel: cfg.parallel.max(1),
                ..cfg
            },
            rt,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run a store call on the blocking pool.
    async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn ChunkStore) -> Result<T, FsError> + Send + 'static,
    ) -> Result<T, FsError> {
        let store = self.store.clone();
        self.rt
            .spawn_blocking(move || f(&*store))
            .await
            .unwrap_or_else(|e| Err(fs_err!(EIO, "a store call of the fetcher failed: {e}")))
    }

    /// Make the chunks of `[offset, offset + len)` of `ino`'s generation
    /// `generation` present, fetching what is missing, and answer the
    /// presence bitmap (every bit set when the file is complete).
    /// `demanded`: a reader waits (read-ahead follows sequential demand).
    /// `EIO` when no connected peer has a chunk, `ETIMEDOUT` at `deadline`
    /// (the fetch goes on in the background).
    pub async fn ensure(
        self: &Arc<Self>,
        ino: Ino,
        generation: u64,
        offset: u64,
        len: u64,
        deadline: Instant,
        demanded: bool,
    ) -> Result<Vec<u64>, FsError> {
        let rec = match self.version(ino, generation)? {
            Version::Partial(rec) => rec,
            Version::Complete(size) => {
                return Ok(all_present(size.max(offset.saturating_add(len))));
            }
        };
        let limit = rec.limit;
        let end = offset.saturating_add(len).min(limit);
        let wanted = self.missing(&rec, offset, end);
        if demanded && end > offset {
            let needed = (end - 1) / CHUNK_SIZE - offset / CHUNK_SIZE + 1;
            let misses = wanted.len() as u64;
            crate::metrics::read_chunks(needed.saturating_sub(misses), misses);
        }
        let ahead = if demanded {
            let (from, to) = self.readahead(ino, offset, len);
            self.missing(&rec, from, to.min(limit))
        } else {
            Vec::new()
        };
        let hashes = if wanted.is_empty() && ahead.is_empty() {
            None
        } else {
            Some(self.hashes(ino, &rec).await?)
        };
        let mut waits = Vec::with_capacity(wanted.len());
        if let Some(hashes) = &hashes {
            for index in wanted {
                let flight = self.start(self.spec(ino, &rec, hashes, index), demanded);
                waits.push(flight.done.subscribe());
            }
            for index in ahead {
                self.start(self.spec(ino, &rec, hashes, index), false);
            }
        }
        let all = futures::future::join_all(waits.into_iter().map(|mut rx| async move {
            match rx.wait_for(Option::is_some).await {
                Ok(done) => done.clone().unwrap_or(Ok(())),
                Err(_) => Err(fs_err!(EIO, "{ino}: a chunk fetch ended without an answer")),
            }
        }));
        let results = match tokio::time::timeout_at(deadline, all).await {
            Ok(results) => results,
            Err(_) => {
                return Err(fs_err!(
                    ETIMEDOUT,
                    "{ino}: the chunks of bytes {offset}..{end} did not arrive before the deadline (they are still being fetched)"
                ));
            }
        };
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(e);
        }
        match self.version(ino, generation)? {
            Version::Partial(now) => Ok(now.present),
            Version::Complete(size) => Ok(all_present(size.max(offset.saturating_add(len)))),
        }
    }

    /// Whether generation `generation` of `ino` is partial (with its
    /// presence record) or current and complete (with its size); `EIO`
    /// when a newer version replaced it, since peers serve only the
    /// current version.
    ///
    /// Read on the calling task, not the blocking pool: one small record
    /// (and, for a complete file, its inode record and a `stat`), as short
    /// as the store reads the filesystem service makes on its task (see
    /// `service.rs`). [`Fetcher::ensure`] asks this twice per demand, and
    /// each trip to the pool and back cost two thread wake-ups on the
    /// cold read's busiest path.
    fn version(&self, ino: Ino, generation: u64) -> Result<Version, FsError> {
        let current = match self.store.presence_bits(ino)? {
            Some(rec) if rec.generation == generation => return Ok(Version::Partial(rec)),
            Some(rec) => rec.generation,
            None => {
                let (current, size) = self.store.generation(ino)?;
                if current == generation {
                    return Ok(Version::Complete(size));
                }
                current
            }
        };
        Err(fs_err!(
            EIO,
            "{ino}: the version open here (generation {generation}) was replaced by generation {current}; its missing bytes are no longer served"
        ))
    }

    /// Fetch every missing chunk of `ino` in the background (an eager
    /// fetch of a small file). Failures are logged.
    pub fn prefetch(self: &Arc<Self>, ino: Ino) {
        let this = self.clone();
        self.rt.spawn(async move {
            let rec = match this.store_call(move |s| s.presence_bits(ino)).await {
                Ok(Some(rec)) => rec,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(%ino, error = %e, "prefetch: no presence record");
                    return;
                }
            };
            let missing = this.missing(&rec, 0, rec.limit);
            if missing.is_empty() {
                return;
            }
            let hashes = match this.hashes(ino, &rec).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(%ino, error = %e, "prefetch: no presence record");
                    return;
                }
            };
            for index in missing {
                this.start(this.spec(ino, &rec, &hashes, index), false);
            }
        });
    }

    /// One step of making `ino` local (`Control::prefetch`, called again
    /// until the file is complete): start fetches of its missing chunks,
    /// in order, as read-ahead, until `window` of the file's chunks are in
    /// flight. Chunks already in flight are not asked again; a chunk whose
    /// fetch failed is asked again by the next step. Answers the presence
    /// bits as read before the step (`None`: the file is complete).
    pub async fn prefetch_step(
        self: &Arc<Self>,
        ino: Ino,
        window: usize,
    ) -> Result<Option<PresentBits>, FsError> {
        // The flights before the bits: a flight that ends meanwhile marks
        // its chunk present before it leaves the table, so a chunk missing
        // from the bits and absent here is not being fetched.
        let in_air: std::collections::HashSet<u64> = self
            .lock()
            .flights
            .keys()
            .filter(|k| k.ino == ino)
            .map(|k| k.index)
            .collect();
        let Some(rec) = self.store_call(move |s| s.presence_bits(ino)).await? else {
            return Ok(None);
        };
        let new: Vec<u64> = self
            .missing(&rec, 0, rec.limit)
            .into_iter()
            .filter(|i| !in_air.contains(i))
            .take(window.saturating_sub(in_air.len()))
            .collect();
        if new.is_empty() {
            return Ok(Some(rec));
        }
        let hashes = self.hashes(ino, &rec).await?;
        for index in new {
            self.start(self.spec(ino, &rec, &hashes, index), false);
        }
        Ok(Some(rec))
    }

    /// The chunk fetches in flight, oldest first.
    pub fn debug_fetches(&self) -> Vec<FetchInFlight> {
        let flights: Vec<(ChunkKey, Arc<Flight>)> = self
            .lock()
            .flights
            .iter()
            .map(|(k, f)| (*k, f.clone()))
            .collect();
        let now = Instant::now();
        let mut out: Vec<FetchInFlight> = flights
            .into_iter()
            .map(|(key, f)| FetchInFlight {
                ino: key.ino.0,
                chunk: key.index,
                peer: f.peer.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                age_ms: now.saturating_duration_since(f.started).as_millis() as u64,
                demanded: f.demanded.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by_key(|f| std::cmp::Reverse(f.age_ms));
        out
    }

    /// The missing chunks that overlap `[from, to)` (chunks entirely at or
    /// beyond the limit count present: the caller clips `to`).
    fn missing(&self, rec: &PresentBits, from: u64, to: u64) -> Vec<u64> {
        if from >= to {
            return Vec::new();
        }
        let first = from / CHUNK_SIZE;
        let last = (to - 1) / CHUNK_SIZE;
        (first..=last.min(chunk_count(rec.size).saturating_sub(1)))
            .filter(|i| !bit(&rec.present, *i))
            .collect()
    }

    /// The hash of every chunk of the version `rec` is about: kept with the
    /// file's state, read from the store (the whole record) once per
    /// version.
    async fn hashes(&self, ino: Ino, rec: &PresentBits) -> Result<Arc<Vec<ChunkHash>>, FsError> {
        let (generation, gid) = (rec.generation, rec.gid);
        {
            let mut st = self.lock();
            let file = file_state(&mut st, ino, self.cfg.parallel);
            if let Some((g, id, h)) = &file.hashes
                && *g == generation
                && *id == gid
            {
                return Ok(h.clone());
            }
        }
        let full = self.store_call(move |s| s.presence(ino)).await?;
        let Some(full) = full.filter(|p| p.generation == generation && p.gid == gid) else {
            return Err(fs_err!(
                EIO,
                "{ino}: the version open here (generation {generation}) was replaced meanwhile"
            ));
        };
        let hashes = Arc::new(full.chunks);
        let mut st = self.lock();
        let file = file_state(&mut st, ino, self.cfg.parallel);
        file.hashes = Some((generation, gid, hashes.clone()));
        Ok(hashes)
    }

    fn spec(&self, ino: Ino, rec: &PresentBits, hashes: &[ChunkHash], index: u64) -> ChunkSpec {
        let (start, end) = chunk_range(index, rec.size);
        ChunkSpec {
            key: ChunkKey {
                ino,
                generation: rec.generation,
                index,
            },
            gid: rec.gid,
            hash: hashes
                .get(index as usize)
                .copied()
                .unwrap_or(ChunkHash([0; 32])),
            len: end - start,
        }
    }

    /// Update `ino`'s read-ahead for a demanded read; answer the range to
    /// read ahead.
    fn readahead(&self, ino: Ino, offset: u64, len: u64) -> (u64, u64) {
        let mut st = self.lock();
        let file = file_state(&mut st, ino, self.cfg.parallel);
        file.readahead.on_read(offset, len, self.cfg.readahead_max)
    }

    /// The flight of `spec`'s chunk: the one in the air, a new one, or
    /// (when a flight made the chunk present since the caller read the
    /// presence bits) one that has landed already.
    ///
    /// A caller reads the bits before it looks for a flight here; a flight
    /// marks its chunk present, then leaves the table and notes the chunk
    /// as landed in the same critical section. So a chunk missing from the
    /// caller's bits is either in the air here, or landed here, or not
    /// being fetched. (The landed bits of a file whose state was dropped,
    /// beyond [`FILES_KEPT`], are lost: its chunk is then fetched again and
    /// [`ChunkStore::write_chunk`] leaves the present chunk as it is.)
    fn start(self: &Arc<Self>, spec: ChunkSpec, demanded: bool) -> Arc<Flight> {
        let mut st = self.lock();
        if let Some(flight) = st.flights.get(&spec.key) {
            if demanded && !flight.demanded.swap(true, Ordering::SeqCst) {
                // Still waiting for a read-ahead slot, perhaps: wake it
                // to wait for a demanded one instead.
                flight.promoted.notify_one();
            }
            return flight.clone();
        }
        let landed = st
            .files
            .get(&spec.key.ino)
            .is_some_and(|f| f.landed(spec.key.generation, spec.key.index));
        let flight = Arc::new(Flight {
            done: watch::channel(landed.then_some(Ok(()))).0,
            started: Instant::now(),
            demanded: AtomicBool::new(demanded),
            promoted: Notify::new(),
            peer: Mutex::new(String::new()),
        });
        if landed {
            return flight;
        }
        st.flights.insert(spec.key, flight.clone());
        let file = file_state(&mut st, spec.key.ino, self.cfg.parallel);
        let (slots, demand_slots) = (file.slots.clone(), file.demand_slots.clone());
        drop(st);
        let this = self.clone();
        let task_flight = flight.clone();
        self.rt.spawn(async move {
            let slot = loop {
                if task_flight.demanded.load(Ordering::SeqCst) {
                    break demand_slots.clone().acquire_owned().await;
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => break slot,
                    () = task_flight.promoted.notified() => {}
                }
            };
            let result = match slot {
                Ok(_slot) => this.fly(&spec, &task_flight).await,
                Err(_) => Err(fs_err!(EIO, "the fetcher is shutting down")),
            };
            if let Err(e) = &result {
                tracing::debug!(ino = %spec.key.ino, chunk = spec.key.index, error = %e, "chunk fetch failed");
            }
            crate::metrics::chunk_fetch(result.is_ok());
            {
                let mut st = this.lock();
                st.flights.remove(&spec.key);
                if result.is_ok()
                    && let Some(file) = st.files.get_mut(&spec.key.ino)
                {
                    file.land(spec.key.generation, spec.key.index);
                }
            }
            task_flight.done.send_replace(Some(result));
        });
        flight
    }

    /// Fetch one chunk from the first connected peer that has it, verify
    /// it, write it and mark it present.
    async fn fly(&self, spec: &ChunkSpec, flight: &Flight) -> Result<(), FsError> {
        let ino = spec.key.ino;
        let index = spec.key.index;
        // No look at the presence bits first: the caller found the chunk
        // missing in them, and `start` does not start a flight for a chunk
        // that a flight made present since (see there).
        let mut peers = self.peers.connected();
        if peers.is_empty() {
            return Err(fs_err!(
                EIO,
                "{ino}: chunk {index} is not here and no peer is connected"
            ));
        }
        // Spread a file's chunks over the peers.
        let turn = (index % peers.len() as u64) as usize;
        peers.rotate_left(turn);
        let mut refusals = Vec::new();
        for (fingerprint, conn) in peers {
            flight.set_peer(&fingerprint);
            match self.ask(&conn, spec).await {
                Ok(bytes) => {
                    crate::metrics::peer_chunk(&fingerprint, crate::metrics::Direction::Received);
                    return self.write(spec, bytes).await;
                }
                Err(why) => {
                    tracing::debug!(%ino, chunk = index, peer = %fingerprint, %why, "peer did not give the chunk");
                    refusals.push(format!("{fingerprint}: {why}"));
                }
            }
        }
        Err(fs_err!(
            EIO,
            "{ino}: no connected peer gave chunk {index} ({})",
            refusals.join("; ")
        ))
    }

    /// Ask one peer for the chunk: its bytes as the pieces they arrived in
    /// (each in the buffer the channel received it in: hashed and written
    /// from there, never copied into one), checked (length and hash).
    async fn ask(&self, conn: &PeerConn, spec: &ChunkSpec) -> Result<Vec<Bytes>, String> {
        let req = Request::Chunk {
            gid: spec.gid,
            index: spec.key.index,
            hash: spec.hash,
        };
        let mut stream = conn
            .stream(req, self.cfg.chunk_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let mut pieces = Vec::with_capacity(spec.len.div_ceil(MAX_CHUNK as u64) as usize);
        let mut got = 0u64;
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| match e {
                RequestError::Remote(r) if r.kind == RemoteErrorKind::NotFound => {
                    "it does not have the chunk".to_owned()
                }
                other => other.to_string(),
            })?;
            got += piece.len() as u64;
            if got > spec.len {
                // Dropping the stream cancels it.
                return Err(format!(
                    "refused: it sent more than the chunk's {} bytes",
                    spec.len
                ));
            }
            pieces.push(piece);
        }
        if got != spec.len {
            return Err(format!(
                "refused: it sent {got} bytes, the chunk has {}",
                spec.len
            ));
        }
        if ChunkHash::of_pieces(&pieces) != spec.hash {
            tracing::warn!(
                peer = %conn.label(),
                ino = %spec.key.ino,
                chunk = spec.key.index,
                gid = %spec.gid.hex(),
                "refused a chunk whose bytes do not match its hash; nothing written, asking the next peer"
            );
            return Err("refused: the bytes do not match the chunk's hash".to_owned());
        }
        Ok(pieces)
    }

    /// Write a verified chunk's bytes below the presence limit and mark it
    /// present (unless it was marked present meanwhile, or the version or
    /// its presence record is gone).
    async fn write(&self, spec: &ChunkSpec, pieces: Vec<Bytes>) -> Result<(), FsError> {
        let key = spec.key;
        self.store_call(move |s| s.write_chunk(key.ino, key.generation, key.index, &pieces))
            .await
    }
}

#[cfg(test)]
#[path = "fetch_tests.rs"]
mod tests;
