//! The fetcher's logic against an in-memory store and real peer
//! connections over the in-memory channel (the serving side a test handler
//! that can hold requests, lie about bytes or lack a chunk).

use super::*;
use crate::peer::conn::{self, ConnConfig, PeerLabel, memory};
use crate::peer::msg::{RemoteError, Reply};
use crate::peer::requests::{ChunkSink, DefaultHandler, RequestHandler};
use futures::future::BoxFuture;
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize};

const INO: Ino = Ino(42);
const GENERATION: u64 = 3;
/// Three whole chunks and a short last one.
const SIZE: u64 = 3 * CHUNK_SIZE + 1000;

fn gid() -> Gid {
    Gid([9; 16])
}

/// The content of the test file: different in every chunk.
fn content(size: u64) -> Vec<u8> {
    (0..size)
        .map(|i| ((i * 7 + i / CHUNK_SIZE) % 251) as u8)
        .collect()
}

fn hashes(bytes: &[u8]) -> Vec<ChunkHash> {
    bytes
        .chunks(CHUNK_SIZE as usize)
        .map(ChunkHash::of)
        .collect()
}

/// The store: presence records and sparse generation files in a temp dir.
struct MemStore {
    dir: tempfile::TempDir,
    recs: Mutex<HashMap<Ino, PresenceRec>>,
    generation: AtomicU64,
}

impl MemStore {
    /// A partial file `INO` of `size` bytes with nothing present.
    fn with_file(size: u64) -> Arc<MemStore> {
        let bytes = content(size);
        let store = MemStore {
            dir: tempfile::tempdir().expect("temp dir"),
            recs: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(GENERATION),
        };
        let file = File::create(store.path(INO, GENERATION)).expect("create the content file");
        file.set_len(size).expect("sparse file");
        store.recs.lock().expect("lock").insert(
            INO,
            PresenceRec {
                gid: gid(),
                generation: GENERATION,
                size,
                limit: size,
                chunks: hashes(&bytes),
                present: vec![0; chunk_count(size).div_ceil(64) as usize],
            },
        );
        Arc::new(store)
    }

    fn path(&self, ino: Ino, generation: u64) -> std::path::PathBuf {
        self.dir.path().join(format!("{}.{generation}", ino.0))
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(self.path(INO, GENERATION)).expect("read the content file")
    }

    fn rec(&self) -> Option<PresenceRec> {
        self.recs.lock().expect("lock").get(&INO).cloned()
    }

    /// Chunk `index` present (with `bytes` written there, as a local write
    /// into a fetched chunk would leave it).
    fn set_present(&self, index: u64, bytes: &[u8]) {
        let file = s_open(&self.path(INO, GENERATION));
        file.write_all_at(bytes, index * CHUNK_SIZE)
            .expect("write local bytes");
        let mut recs = self.recs.lock().expect("lock");
        let rec = recs.get_mut(&INO).expect("partial");
        rec.present[(index / 64) as usize] |= 1 << (index % 64);
    }
}

fn s_open(path: &std::path::Path) -> File {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the content file")
}

impl ChunkStore for MemStore {
    fn presence(&self, ino: Ino) -> Result<Option<PresenceRec>, FsError> {
        Ok(self.recs.lock().expect("lock").get(&ino).cloned())
    }

    fn generation(&self, _: Ino) -> Result<(u64, u64), FsError> {
        let generation = self.generation.load(Ordering::SeqCst);
        let size = std::fs::metadata(self.path(INO, generation)).map_or(0, |m| m.len());
        Ok((generation, size))
    }

    /// As the store does it, without truncates to exclude (this store
    /// has none while a chunk is written).
    fn write_chunk(
        &self,
        ino: Ino,
        generation: u64,
        index: u64,
        pieces: &[Bytes],
    ) -> Result<(), FsError> {
        let bytes = pieces.concat();
        let mut recs = self.recs.lock().expect("lock");
        let Some(rec) = recs.get_mut(&ino) else {
            return Ok(());
        };
        if rec.generation != generation {
            return Err(fs_err!(EIO, "another version"));
        }
        if rec.has(index) {
            return Ok(());
        }
        let (start, _) = chunk_range(index, rec.size);
        let file = s_open(&self.path(ino, generation));
        let len = file.metadata().expect("stat").len();
        let upto = (start + bytes.len() as u64).min(rec.limit).min(len);
        if upto > start {
            file.write_all_at(&bytes[..(upto - start) as usize], start)
                .expect("write the chunk");
        }
        rec.present[(index / 64) as usize] |= 1 << (index % 64);
        if rec.complete() {
            recs.remove(&ino);
        }
        Ok(())
    }
}

/// A serving peer's behaviour.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Serves {
    /// The right bytes.
    Good,
    /// The bytes with one flipped.
    Lies,
    /// `NotFound` for everything.
    Nothing,
}

/// The serving side of one in-memory peer.
struct ChunkServer {
    bytes: Vec<u8>,
    serves: Serves,
    /// Requests wait while this is false.
    open: watch::Receiver<bool>,
    /// Chunk indexes asked, in order.
    asked: Mutex<Vec<u64>>,
    now: AtomicUsize,
    most: AtomicUsize,
}

struct Handler(Arc<ChunkServer>);

impl RequestHandler for Handler {
    fn call(&self, req: Request) -> BoxFuture<'static, Result<Reply, RemoteError>> {
        DefaultHandler.call(req)
    }

    fn stream(&self, req: Request, sink: ChunkSink) -> BoxFuture<'static, Result<(), RemoteError>> {
        let server = self.0.clone();
        Box::pin(async move {
            let Request::Chunk {
                gid: g,
                index,
                hash,
            } = req
            else {
                return Err(RemoteError::new(
                    RemoteErrorKind::Unsupported,
                    "chunks only",
                ));
            };
            server.asked.lock().expect("lock").push(index);
            let now = server.now.fetch_add(1, Ordering::SeqCst) + 1;
            server.most.fetch_max(now, Ordering::SeqCst);
            let mut open = server.open.clone();
            let _ = open.wait_for(|o| *o).await;
            server.now.fetch_sub(1, Ordering::SeqCst);
            let (start, end) = chunk_range(index, server.bytes.len() as u64);
            let mut bytes = server.bytes[start as usize..end as usize].to_vec();
            if server.serves == Serves::Nothing || g != gid() || ChunkHash::of(&bytes) != hash {
                return Err(RemoteError::new(RemoteErrorKind::NotFound, "not here"));
            }
            if server.serves == Serves::Lies {
                crate::sync::serve::spoil(&mut bytes);
            }
            crate::sync::serve::send_chunk(bytes, sink).await
        })
    }
}

#[derive(Default)]
struct MemPeers(Mutex<Vec<(String, PeerConn)>>);

impl PeerSource for MemPeers {
    fn connected(&self) -> Vec<(String, PeerConn)> {
        self.0.lock().expect("lock").clone()
    }
}

struct Fixture {
    store: Arc<MemStore>,
    fetcher: Arc<Fetcher>,
    servers: Vec<Arc<ChunkServer>>,
    /// Opens every server's gate.
    gate: watch::Sender<bool>,
    /// The serving ends (a connection ends when its last handle goes).
    _serving: Vec<PeerConn>,
}

fn cfg(parallel: usize, readahead_max: u64) -> FetchConfig {
    FetchConfig {
        parallel,
        readahead_max,
        chunk_timeout: Duration::from_secs(30),
    }
}

/// A file of `size` bytes, nothing present, and one peer per entry of
/// `peers` (named `p0`, `p1`, ...), all gates `open`.
fn fixture(size: u64, peers: &[Serves], open: bool, config: FetchConfig) -> Fixture {
    let store = MemStore::with_file(size);
    let (gate, gate_rx) = watch::channel(open);
    let mem_peers = Arc::new(MemPeers::default());
    let mut servers = Vec::new();
    let mut serving = Vec::new();
    for (n, serves) in peers.iter().enumerate() {
        let server = Arc::new(ChunkServer {
            bytes: content(size),
            serves: *serves,
            open: gate_rx.clone(),
            asked: Mutex::new(Vec::new()),
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        let ((a_tx, a_rx), (b_tx, b_rx)) = memory::pair(64);
        let label = |name: &str| PeerLabel {
            fingerprint: name.to_owned(),
            name: None,
        };
        let client = conn::spawn(
            a_tx,
            a_rx,
            label(&format!("p{n}")),
            Arc::new(DefaultHandler),
            ConnConfig::default(),
        );
        serving.push(conn::spawn(
            b_tx,
            b_rx,
            label("us"),
            Arc::new(Handler(server.clone())),
            ConnConfig::default(),
        ));
        mem_peers
            .0
            .lock()
            .expect("lock")
            .push((format!("p{n}"), client));
        servers.push(server);
    }
    let fetcher = Fetcher::new(store.clone(), mem_peers, config, Handle::current());
    Fixture {
        store,
        fetcher,
        servers,
        gate,
        _serving: serving,
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

fn asked(server: &ChunkServer) -> Vec<u64> {
    server.asked.lock().expect("lock").clone()
}

/// Wait (bounded) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < give_up, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn chunk_bytes(all: &[u8], index: u64) -> &[u8] {
    let (start, end) = chunk_range(index, all.len() as u64);
    &all[start as usize..end as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_fetches_only_missing_chunks_verified_and_never_overwrites_present_ones() {
    let f = fixture(SIZE, &[Serves::Good], true, cfg(8, 0));
    // Chunk 1 is present with bytes written locally.
    let local = vec![0xEE; CHUNK_SIZE as usize];
    f.store.set_present(1, &local);
    let bitmap = f
        .fetcher
        .ensure(INO, GENERATION, 0, SIZE, far(), true)
        .await
        .expect("fetched");
    let want = content(SIZE);
    let got = f.store.bytes();
    assert_eq!(got.len() as u64, SIZE);
    for index in [0, 2, 3] {
        assert!(
            chunk_bytes(&got, index) == chunk_bytes(&want, index),
            "chunk {index} holds the peer's bytes"
        );
    }
    assert!(
        chunk_bytes(&got, 1) == &local[..],
        "the present chunk kept its local bytes"
    );
    let mut asked_for = asked(&f.servers[0]);
    asked_for.sort();
    assert_eq!(asked_for, vec![0, 2, 3]);
    // Complete: the record is gone and every bit of the answer is set.
    assert!(f.store.rec().is_none());
    assert!(
        (0..chunk_count(SIZE)).all(|i| bit(&bitmap, i)),
        "{bitmap:?}"
    );
    assert!(f.fetcher.debug_fetches().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_of_a_file_answers_its_bitmap() {
    let f = fixture(SIZE, &[Serves::Good], true, cfg(8, 0));
    let bitmap = f
        .fetcher
        .ensure(INO, GENERATION, CHUNK_SIZE + 10, 20, far(), true)
        .await
        .expect("fetched");
    assert_eq!(bitmap, vec![0b10]);
    assert_eq!(asked(&f.servers[0]), vec![1]);
    let rec = f.store.rec().expect("still partial");
    assert_eq!(rec.present, vec![0b10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_in_flight_is_fetched_once_for_every_reader() {
    let f = fixture(SIZE, &[Serves::Good], false, cfg(8, 0));
    let readers: Vec<_> = (0..3)
        .map(|n| {
            let fetcher = f.fetcher.clone();
            tokio::spawn(async move {
                fetcher
                    .ensure(INO, GENERATION, n * 100, 100, far(), n != 0)
                    .await
            })
        })
        .collect();
    // Reader 0 reads ahead; the flight turns demanded when reader 1 or 2
    // joins it, which may come after the peer was asked.
    until("the peer was asked and a demanding reader joined", || {
        !asked(&f.servers[0]).is_empty() && f.fetcher.debug_fetches().iter().any(|x| x.demanded)
    })
    .await;
    let fetches = f.fetcher.debug_fetches();
    assert_eq!(fetches.len(), 1, "{fetches:?}");
    assert_eq!((fetches[0].ino, fetches[0].chunk), (INO.0, 0));
    assert_eq!(fetches[0].peer, "p0");
    assert!(fetches[0].demanded);
    f.gate.send_replace(true);
    for r in readers {
        let bitmap = r.await.expect("no panic").expect("fetched");
        assert!(bit(&bitmap, 0));
    }
    assert_eq!(
        asked(&f.servers[0]),
        vec![0],
        "one request for three readers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_fetch_parallel_chunks_of_a_file_are_asked_at_once() {
    let size = 10 * CHUNK_SIZE;
    let f = fixture(size, &[Serves::Good], false, cfg(2, 0));
    let reader = {
        let fetcher = f.fetcher.clone();
        tokio::spawn(async move { fetcher.ensure(INO, GENERATION, 0, size, far(), true).await })
    };
    until("two chunks were asked", || asked(&f.servers[0]).len() == 2).await;
    // Ten flights exist; two of them hold the file's slots.
    until("all flights exist", || {
        f.fetcher.debug_fetches().len() == 10
    })
    .await;
    assert_eq!(asked(&f.servers[0]).len(), 2);
    f.gate.send_replace(true);
    reader.await.expect("no panic").expect("fetched");
    assert_eq!(asked(&f.servers[0]).len(), 10);
    assert_eq!(f.servers[0].most.load(Ordering::SeqCst), 2);
    assert!(f.store.bytes() == content(size));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_do_not_match_their_hash_are_refused_and_the_next_peer_is_asked() {
    // Chunk 0 is asked of p0 first (chunks are spread over the peers by
    // index); p0 lies.
    let f = fixture(SIZE, &[Serves::Lies, Serves::Good], true, cfg(8, 0));
    f.fetcher
        .ensure(INO, GENERATION, 0, 10, far(), true)
        .await
        .expect("fetched from the honest peer");
    assert_eq!(asked(&f.servers[0]), vec![0]);
    assert_eq!(asked(&f.servers[1]), vec![0]);
    let want = content(SIZE);
    assert!(chunk_bytes(&f.store.bytes(), 0) == chunk_bytes(&want, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_alone_gives_eio_and_nothing_is_written() {
    let f = fixture(SIZE, &[Serves::Lies], true, cfg(8, 0));
    let err = f
        .fetcher
        .ensure(INO, GENERATION, 0, 10, far(), true)
        .await
        .expect_err("refused");
    assert_eq!(err.errno, libc::EIO);
    assert!(err.message.contains("hash"), "{err}");
    assert!(f.store.bytes().iter().all(|b| *b == 0), "nothing written");
    assert_eq!(f.store.rec().expect("partial").present, vec![0]);
    // A failed flight is forgotten: the next read asks again.
    assert!(f.fetcher.debug_fetches().is_empty());
    let again = f.fetcher.ensure(INO, GENERATION, 0, 10, far(), true).await;
    assert_eq!(again.expect_err("refused again").errno, libc::EIO);
    assert_eq!(asked(&f.servers[0]), vec![0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_chunk_is_skipped() {
    let f = fixture(SIZE, &[Serves::Nothing, Serves::Good], true, cfg(8, 0));
    f.fetcher
        .ensure(INO, GENERATION, 0, 10, far(), true)
        .await
        .expect("fetched from the second peer");
    assert_eq!(asked(&f.servers[1]), vec![0]);
    // Nobody has it: EIO naming why.
    let f = fixture(SIZE, &[Serves::Nothing], true, cfg(8, 0));
    let err = f
        .fetcher
        .ensure(INO, GENERATION, 0, 10, far(), true)
        .await
        .expect_err("nobody has it");
    assert_eq!(err.errno, libc::EIO);
    assert!(err.message.contains("does not have"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connected_peer_is_eio_at_once() {
    let f = fixture(SIZE, &[], true, cfg(8, 0));
    // The deadline is far; only an answer without waiting ends this in
    // the test's bound.
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        f.fetcher.ensure(INO, GENERATION, 0, 10, far(), true),
    )
    .await
    .expect("answered without waiting for the deadline");
    let err = answer.expect_err("no peer");
    assert_eq!(err.errno, libc::EIO);
    assert!(err.message.contains("no peer is connected"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_gives_etimedout_and_the_fetch_completes_later() {
    let f = fixture(SIZE, &[Serves::Good], false, cfg(8, 0));
    let err = f
        .fetcher
        .ensure(
            INO,
            GENERATION,
            0,
            10,
            Instant::now() + Duration::from_millis(100),
            true,
        )
        .await
        .expect_err("the peer holds the chunk past the deadline");
    assert_eq!(err.errno, libc::ETIMEDOUT);
    assert_eq!(f.fetcher.debug_fetches().len(), 1, "still in flight");
    f.gate.send_replace(true);
    until("the chunk is present", || {
        f.store.rec().is_some_and(|r| bit(&r.present, 0))
    })
    .await;
    let want = content(SIZE);
    assert!(chunk_bytes(&f.store.bytes(), 0) == chunk_bytes(&want, 0));
    // The next read needs no peer.
    let bitmap = f
        .fetcher
        .ensure(INO, GENERATION, 0, 10, far(), true)
        .await
        .expect("present");
    assert!(bit(&bitmap, 0));
    assert_eq!(asked(&f.servers[0]), vec![0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_version_is_eio() {
    let f = fixture(SIZE, &[Serves::Good], true, cfg(8, 0));
    let err = f
        .fetcher
        .ensure(INO, GENERATION - 1, 0, 10, far(), true)
        .await
        .expect_err("old generation");
    assert_eq!(err.errno, libc::EIO);
    assert!(err.message.contains("replaced"), "{err}");
    assert!(asked(&f.servers[0]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_part_below_the_limit_is_written_and_chunks_beyond_it_are_not_fetched() {
    let f = fixture(SIZE, &[Serves::Good], true, cfg(8, 0));
    // Truncated to the middle of chunk 1 since the version arrived.
    let limit = CHUNK_SIZE + 100;
    {
        let mut recs = f.store.recs.lock().expect("lock");
        recs.get_mut(&INO).expect("partial").limit = limit;
    }
    File::options()
        .write(true)
        .open(f.store.path(INO, GENERATION))
        .expect("open")
        .set_len(limit)
        .expect("truncate");
    let bitmap = f
        .fetcher
        .ensure(INO, GENERATION, 0, SIZE, far(), true)
        .await
        .expect("fetched");
    assert!(bit(&bitmap, 0) && bit(&bitmap, 1), "{bitmap:?}");
    let mut asked_for = asked(&f.servers[0]);
    asked_for.sort();
    assert_eq!(asked_for, vec![0, 1], "chunks 2 and 3 count as present");
    let got = f.store.bytes();
    assert_eq!(got.len() as u64, limit, "nothing written past the limit");
    assert!(got[..] == content(SIZE)[..limit as usize]);
    assert!(f.store.rec().is_none(), "complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_replaced_during_the_fetch_is_eio_and_its_chunk_is_not_written() {
    let f = fixture(SIZE, &[Serves::Good], false, cfg(8, 0));
    let reader = {
        let fetcher = f.fetcher.clone();
        tokio::spawn(async move { fetcher.ensure(INO, GENERATION, 0, 10, far(), true).await })
    };
    until("the peer was asked", || !asked(&f.servers[0]).is_empty()).await;
    // A newer version arrives, complete (copied from local content).
    f.store.recs.lock().expect("lock").remove(&INO);
    f.store.generation.store(GENERATION + 1, Ordering::SeqCst);
    f.gate.send_replace(true);
    let err = reader
        .await
        .expect("no panic")
        .expect_err("the old version cannot be completed");
    assert_eq!(err.errno, libc::EIO);
    assert!(err.message.contains("replaced"), "{err}");
    // The flight found the record gone and wrote nothing.
    assert!(f.store.bytes().iter().all(|b| *b == 0));
}

#[test]
fn readahead_doubles_on_sequential_reads_and_resets_on_a_jump() {
    const K: u64 = 1024;
    let max = 8 * CHUNK_SIZE;
    let mut r = Readahead::default();
    // The first read from the start is sequential: one chunk ahead.
    assert_eq!(r.on_read(0, 128 * K, max), (128 * K, 128 * K + CHUNK_SIZE));
    assert_eq!(r.window, CHUNK_SIZE);
    // Reads inside what was read ahead (the kernel's reads of chunks
    // already present never come here) count as sequential.
    assert_eq!(
        r.on_read(256 * K, 128 * K, max),
        (384 * K, 384 * K + 2 * CHUNK_SIZE)
    );
    let mut offset = 384 * K;
    for want in [4, 8, 8, 8] {
        r.on_read(offset, 128 * K, max);
        assert_eq!(r.window, want * CHUNK_SIZE, "capped at the maximum");
        offset += 128 * K;
    }
    // A jump resets it: nothing read ahead.
    let (from, to) = r.on_read(100 * CHUNK_SIZE, 4096, max);
    assert_eq!(from, to);
    assert_eq!(r.window, 0);
    // Going back more than a chunk is no sequential read either.
    r.on_read(100 * CHUNK_SIZE + 4096, 4096, max);
    assert_eq!(r.window, CHUNK_SIZE);
    r.on_read(50 * CHUNK_SIZE, 4096, max);
    assert_eq!(r.window, 0);
    // A maximum of 0 turns read-ahead off.
    let mut off = Readahead::default();
    for n in 0..4 {
        let (from, to) = off.on_read(n * 4096, 4096, 0);
        assert_eq!(from, to);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_fetch_ahead_in_a_growing_window() {
    let size = 16 * CHUNK_SIZE;
    let f = fixture(size, &[Serves::Good], true, cfg(8, 4 * CHUNK_SIZE));
    let idle = |f: &Fixture| f.fetcher.debug_fetches().is_empty();
    let asked_set = |f: &Fixture| asked(&f.servers[0]).into_iter().collect::<BTreeSet<u64>>();
    f.fetcher
        .ensure(INO, GENERATION, 0, 4096, far(), true)
        .await
        .expect("fetched");
    until("the read-ahead is done", || idle(&f)).await;
    assert_eq!(asked_set(&f), BTreeSet::from([0, 1]), "one chunk ahead");
    // The next read, inside the read-ahead: two chunks ahead of its end
    // (which is inside chunk 1), so up into chunk 3.
    f.fetcher
        .ensure(INO, GENERATION, CHUNK_SIZE, 4096, far(), true)
        .await
        .expect("fetched");
    until("the read-ahead is done", || idle(&f)).await;
    assert_eq!(asked_set(&f), BTreeSet::from([0, 1, 2, 3]));
    f.fetcher
        .ensure(INO, GENERATION, 2 * CHUNK_SIZE, 4096, far(), true)
        .await
        .expect("fetched");
    until("the read-ahead is done", || idle(&f)).await;
    // Window 4 chunks after the read in chunk 2: up into chunk 6.
    assert_eq!(asked_set(&f), (0..=6).collect::<BTreeSet<u64>>());
    // Read-ahead chunks are not demanded; nothing was asked twice.
    assert_eq!(asked(&f.servers[0]).len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fetches_the_whole_file() {
    let f = fixture(SIZE, &[Serves::Good], true, cfg(2, 0));
    f.fetcher.prefetch(INO);
    until("the file is complete", || f.store.rec().is_none()).await;
    assert!(f.store.bytes() == content(SIZE));
    assert_eq!(asked(&f.servers[0]).len(), 4);
}

#[test]
fn idle_files_are_forgotten_once_enough_are_known_and_busy_ones_kept() {
    let mut st = State::default();
    for n in 0..FILES_KEPT as u64 {
        file_state(&mut st, Ino(n), 4);
    }
    // A flight holds file 7's slots.
    let held = file_state(&mut st, Ino(7), 4).slots.clone();
    held.try_acquire().expect("a free slot").forget();
    assert_eq!(st.files.len(), FILES_KEPT);
    file_state(&mut st, Ino(FILES_KEPT as u64), 4);
    let mut kept: Vec<u64> = st.files.keys().map(|i| i.0).collect();
    kept.sort();
    assert_eq!(kept, vec![7, FILES_KEPT as u64]);
    // The busy file kept its semaphore (and so its slot count).
    let again = file_state(&mut st, Ino(7), 4).slots.clone();
    assert!(Arc::ptr_eq(&held, &again));
    assert_eq!(again.available_permits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_file_answers_a_bitmap_of_all_its_chunks() {
    // More chunks than one bitmap word holds; made complete without a
    // fetch (sparse file, record gone).
    let size = 70 * CHUNK_SIZE;
    let f = fixture(size, &[], true, cfg(8, 0));
    f.store.recs.lock().expect("lock").remove(&INO);
    let bitmap = f
        .fetcher
        .ensure(INO, GENERATION, 0, 10, far(), true)
        .await
        .expect("complete");
    assert!((0..70).all(|i| bit(&bitmap, i)), "{bitmap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demanded_chunk_overtakes_the_read_ahead_queued_before_it() {
    let size = 10 * CHUNK_SIZE;
    // One slot of each kind; the peer holds every request until the gate
    // opens.
    let f = fixture(size, &[Serves::Good], false, cfg(1, 0));
    f.fetcher.prefetch(INO);
    until("every chunk is queued for read-ahead", || {
        f.fetcher.debug_fetches().len() == 10
    })
    .await;
    until("one read-ahead chunk is asked", || {
        asked(&f.servers[0]).len() == 1
    })
    .await;
    // It holds the only read-ahead slot; the other nine wait for it.
    let first = asked(&f.servers[0])[0];
    let wanted = if first == 9 { 8 } else { 9 };
    // A reader needs a chunk queued for read-ahead.
    let reader = {
        let fetcher = f.fetcher.clone();
        tokio::spawn(async move {
            fetcher
                .ensure(INO, GENERATION, wanted * CHUNK_SIZE, 4096, far(), true)
                .await
        })
    };
    until(
        "the demanded chunk is asked while read-ahead still waits",
        || asked(&f.servers[0]) == vec![first, wanted],
    )
    .await;
    assert!(
        f.fetcher
            .debug_fetches()
            .iter()
            .any(|x| x.chunk == wanted && x.demanded)
    );
    f.gate.send_replace(true);
    reader.await.expect("no panic").expect("fetched");
    until("the file is complete", || f.store.rec().is_none()).await;
    assert!(f.store.bytes() == content(size));
    let mut all = asked(&f.servers[0]);
    all.sort();
    assert_eq!(all, (0..10).collect::<Vec<u64>>(), "each chunk asked once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_step_keeps_at_most_its_window_in_flight_and_steps_complete_the_file() {
    // Ten chunks, the server's gate shut: the first step starts two.
    let size = 10 * CHUNK_SIZE;
    let f = fixture(size, &[Serves::Good], false, cfg(8, 0));
    let bits = f.fetcher.prefetch_step(INO, 2).await.expect("step");
    assert!(bits.is_some_and(|b| !b.complete()), "partial before");
    until("two chunks are asked", || asked(&f.servers[0]).len() == 2).await;
    // A second step while both are in the air starts nothing new.
    f.fetcher.prefetch_step(INO, 2).await.expect("step");
    assert_eq!(f.fetcher.debug_fetches().len(), 2);
    let mut first = asked(&f.servers[0]);
    first.sort();
    assert_eq!(first, vec![0, 1], "the first chunks, in order");
    // Open the gate and step until the file is complete.
    f.gate.send_replace(true);
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        if f.fetcher
            .prefetch_step(INO, 2)
            .await
            .expect("step")
            .is_none()
        {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "the steps never completed the file"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(f.store.rec().is_none(), "complete");
    assert!(
        f.store.bytes() == content(size),
        "the peer's bytes, every chunk"
    );
    let mut all = asked(&f.servers[0]);
    all.sort();
    assert_eq!(all, (0..10).collect::<Vec<_>>(), "each chunk asked once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_whose_flight_landed_after_the_bits_were_read_is_not_fetched_again() {
    let f = fixture(SIZE, &[Serves::Good], true, cfg(8, 0));
    // The presence bits as a reader read them before anything was fetched.
    let stale = f.store.presence_bits(INO).expect("bits").expect("partial");
    f.fetcher
        .ensure(INO, GENERATION, 0, 1, far(), true)
        .await
        .expect("fetched");
    assert_eq!(asked(&f.servers[0]), vec![0]);
    // Chunk 0 is missing in the stale bits; its flight has landed since.
    assert!(!stale.has(0));
    let hashes = f.fetcher.hashes(INO, &stale).await.expect("hashes");
    let spec = f.fetcher.spec(INO, &stale, &hashes, 0);
    let flight = f.fetcher.start(spec, true);
    assert_eq!(
        flight.done.borrow().clone(),
        Some(Ok(())),
        "answered as landed at once"
    );
    // A chunk no flight fetched is asked for as usual.
    let spec = f.fetcher.spec(INO, &stale, &hashes, 2);
    let mut done = f.fetcher.start(spec, true).done.subscribe();
    let result = done.wait_for(Option::is_some).await.expect("ends").clone();
    assert_eq!(result, Some(Ok(())));
    assert_eq!(
        asked(&f.servers[0]),
        vec![0, 2],
        "chunk 0 was not asked again"
    );
}
