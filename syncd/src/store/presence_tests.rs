//! Tests of presence against local writes and truncates: a chunk a writer
//! may write into survives a restart (it is never taken for a torn fetch),
//! a torn fetch is still caught, and a truncate never lets fetched bytes
//! land beyond the size it set. Plain tests on a temporary state
//! directory, with real content files.

use super::*;
use crate::opens::ConnId;
use crate::store::test_support::reopen;
use crate::sync::model::{DeviceId, EntryName, ObjRec, VersionVector, chunk_count};
use ipc_schema::{SetAttr, Timestamp};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const CONN: ConnId = ConnId(1);
const DEV: DeviceId = DeviceId([1; 8]);
const PEER: DeviceId = DeviceId([2; 8]);
const OWNER: (u32, u32) = (4321, 8765);
const CHUNKS: u64 = 4;

/// The version's bytes: different in every chunk.
fn version_bytes() -> Vec<u8> {
    (0..CHUNKS * CHUNK_SIZE)
        .map(|i| ((i * 13 + i / CHUNK_SIZE) % 251) as u8 | 1)
        .collect()
}

/// Chunk `i` of `all` in the pieces a peer sends it in (at most
/// `MAX_CHUNK` bytes each).
fn chunk(all: &[u8], i: u64) -> Vec<bytes::Bytes> {
    let (a, b) = chunk_range(i, all.len() as u64);
    all[a as usize..b as usize]
        .chunks(crate::peer::msg::MAX_CHUNK)
        .map(bytes::Bytes::copy_from_slice)
        .collect()
}

/// A store with a file from the peer, nothing of it local yet.
fn partial_file(dir: &std::path::Path, content: &[u8]) -> (Store, Ino) {
    let s = Store::load(dir, OWNER).expect("store");
    s.attach_device(DEV).expect("attach");
    s.connect(CONN);
    let size = content.len() as u64;
    let rec = ObjRec {
        gid: Gid::new(PEER, 1),
        vv: VersionVector([(PEER, 1)].into_iter().collect()),
        modified_by: PEER,
        deleted: false,
        kind: FileKind::File,
        names: vec![EntryName {
            parent: Gid::ROOT,
            name: b"f".to_vec(),
        }],
        perm: 0o644,
        mtime: Timestamp {
            secs: 1_700_000_000,
            nanos: 0,
        },
        size,
        chunks: (0..chunk_count(size))
            .map(|i| ChunkHash::of(&chunk(content, i).concat()))
            .collect(),
        target: Vec::new(),
    };
    let ino = s.apply_remote(&rec, None).expect("apply").ino.expect("ino");
    (s, ino)
}

fn generation(s: &Store, ino: Ino) -> u64 {
    s.presence_bits(ino)
        .expect("bits")
        .expect("partial")
        .generation
}

fn present(s: &Store, ino: Ino, i: u64) -> bool {
    s.presence_bits(ino)
        .expect("bits")
        .is_some_and(|b| bit(&b.present, i))
}

fn read_content(s: &Store, ino: Ino) -> Vec<u8> {
    let rec = s.read_inode(ino.0).expect("read").expect("inode");
    std::fs::read(s.content.path_gen(ino.0, rec.generation)).expect("content")
}

#[test]
fn a_chunk_written_after_its_fetch_survives_a_restart_and_a_torn_fetch_is_still_fetched_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = version_bytes();
    let local0 = vec![0xA0u8; 4096];
    let local1 = vec![0xB1u8; 4096];
    let ino = {
        let (s, ino) = partial_file(dir.path(), &content);
        let g = generation(&s, ino);
        // Chunk 0 fetched (by a reader), then the file opened for writing:
        // the open tells the writer chunk 0 is present.
        s.write_chunk(ino, g, 0, &chunk(&content, 0))
            .expect("fetch chunk 0");
        let w = s.open(ino, libc::O_RDWR, CONN).expect("open for writing");
        let told = w.opened.partial.as_ref().expect("partial").present.clone();
        assert!(bit(&told, 0), "the writer is told chunk 0 is present");
        let wf = std::fs::File::from(w.fd);
        // Chunk 1 fetched for the writer (mountd's fetch before a write;
        // syncd settles before it answers a handle that may write).
        s.write_chunk(ino, g, 1, &chunk(&content, 1))
            .expect("fetch chunk 1");
        s.settle_for_writer(ino).expect("settle for the writer");
        // The local writes into both fetched chunks.
        wf.write_all_at(&local0, 100).expect("write into chunk 0");
        wf.write_all_at(&local1, CHUNK_SIZE + 100)
            .expect("write into chunk 1");
        // Chunk 2 fetched by a reader, and a crash tears its bytes (its
        // bit was written, its bytes were not).
        s.write_chunk(ino, g, 2, &chunk(&content, 2))
            .expect("fetch chunk 2");
        s.open_for_fill(ino, g)
            .expect("open")
            .write_all_at(&[0u8; 64], 2 * CHUNK_SIZE + 9)
            .expect("tear chunk 2");
        s.flush().expect("flush");
        ino
    };
    // The restart: the start-up check hashes present chunks not synced.
    let s = reopen(dir.path(), OWNER);
    assert!(present(&s, ino, 0), "chunk 0, written locally, kept");
    assert!(present(&s, ino, 1), "chunk 1, written locally, kept");
    assert!(!present(&s, ino, 2), "the torn chunk 2 is missing again");
    // A later fetch of every chunk writes over none of the local bytes.
    let g = generation(&s, ino);
    for i in 0..CHUNKS {
        s.write_chunk(ino, g, i, &chunk(&content, i))
            .expect("fetch");
    }
    assert!(s.presence(ino).expect("presence").is_none(), "complete");
    let mut want = content.clone();
    want[100..100 + local0.len()].copy_from_slice(&local0);
    let at1 = (CHUNK_SIZE + 100) as usize;
    want[at1..at1 + local1.len()].copy_from_slice(&local1);
    assert!(
        read_content(&s, ino) == want,
        "the file is the version with both local writes, chunk 2 fetched again"
    );
}

/// Write fetched chunk `index` of `content` into `ino` with `truncate`
/// run on another thread from between the write's read of the limit and
/// its `pwrite`: the write goes on once the truncate finished (it did not
/// wait for the write) or waits for the size lock (it does). Returns
/// when both are done.
fn write_chunk_racing(
    s: &Arc<Store>,
    ino: Ino,
    content: &[u8],
    index: u64,
    truncate: impl FnOnce(&Store) + Send + 'static,
) {
    let g = generation(s, ino);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s2, done2) = (s.clone(), done.clone());
    let truncator: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::new(Mutex::new(None));
    let t2 = truncator.clone();
    let hook = move || {
        let (s3, done3) = (s2.clone(), done2.clone());
        let t = std::thread::spawn(move || {
            truncate(&s3);
            done3.store(true, Ordering::SeqCst);
        });
        *t2.lock().expect("lock") = Some(t);
        let until = Instant::now() + Duration::from_secs(10);
        while !done2.load(Ordering::SeqCst) && s2.size_locks.waiting.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < until,
                "the truncate neither ran nor waited"
            );
            std::thread::yield_now();
        }
    };
    *s.size_locks.between.lock().expect("lock") = Some(Box::new(hook));
    s.write_chunk(ino, g, index, &chunk(content, index))
        .expect("the fetched chunk");
    truncator
        .lock()
        .expect("lock")
        .take()
        .expect("the hook ran")
        .join()
        .expect("the truncate");
    assert!(done.load(Ordering::SeqCst));
}

#[test]
fn a_truncate_during_a_fetched_write_never_lets_fetched_bytes_past_its_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = version_bytes();
    let (s, ino) = partial_file(dir.path(), &content);
    let s = Arc::new(s);
    let g = generation(&s, ino);
    const CUT: u64 = 100;
    let size = content.len() as u64;
    // Truncate to CUT and extend again while chunk 1's write is between
    // its read of the limit and its pwrite.
    write_chunk_racing(&s, ino, &content, 1, move |s| {
        for size in [CUT, size] {
            let change = SetAttr {
                size: Some(size),
                ..SetAttr::default()
            };
            s.setattr(ino, &change).expect("truncate");
        }
    });
    let got = read_content(&s, ino);
    assert_eq!(got.len() as u64, size, "the size the truncates set");
    assert!(
        got[CUT as usize..].iter().all(|b| *b == 0),
        "beyond the cut only the zeros of the extension, no fetched byte"
    );
    // And later fetches keep to the new limit too.
    for i in 0..CHUNKS {
        s.write_chunk(ino, g, i, &chunk(&content, i))
            .expect("fetch");
    }
    let got = read_content(&s, ino);
    assert!(got[..CUT as usize] == content[..CUT as usize]);
    assert!(got[CUT as usize..].iter().all(|b| *b == 0));
}

#[test]
fn an_o_trunc_open_and_write_during_a_fetched_write_are_not_overwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = version_bytes();
    let (s, ino) = partial_file(dir.path(), &content);
    let s = Arc::new(s);
    let local = vec![0x5Au8; (2 * CHUNK_SIZE) as usize];
    let written = local.clone();
    // O_TRUNC, then new bytes over chunks 0 and 1, while chunk 1's
    // fetched write is between its read of the limit and its pwrite.
    write_chunk_racing(&s, ino, &content, 1, move |s| {
        let f = s
            .open(ino, libc::O_RDWR | libc::O_TRUNC, CONN)
            .expect("open with O_TRUNC");
        std::fs::File::from(f.fd)
            .write_all_at(&written, 0)
            .expect("the new bytes");
        s.release(f.opened.handle).expect("release");
    });
    assert!(s.presence(ino).expect("presence").is_none(), "complete");
    assert!(
        read_content(&s, ino) == local,
        "the bytes written after the O_TRUNC, none of the fetched chunk"
    );
}

/// Chunks marked present by many threads at once (each a swap of the
/// bits alone), while another thread keeps rewriting the same bits in
/// transactions (recording them synced): no bit is lost, every chunk's
/// bytes are the version's, and the last mark completes the file.
#[test]
fn marks_swapped_in_beside_transactions_on_the_same_bits_lose_nothing() {
    // A lost bit needs an unlucky interleaving: several rounds.
    for _ in 0..6 {
        marks_beside_transactions();
    }
}

fn marks_beside_transactions() {
    const MANY: u64 = 96;
    let dir = tempfile::tempdir().expect("tempdir");
    let content: Vec<u8> = (0..MANY * CHUNK_SIZE - 1000)
        .map(|i| ((i * 7 + i / CHUNK_SIZE) % 253) as u8)
        .collect();
    let (s, ino) = partial_file(dir.path(), &content);
    let s = Arc::new(s);
    let g = generation(&s, ino);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let settler = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u32;
            while !stop.load(Ordering::SeqCst) {
                s.settle_for_writer(ino).expect("settle");
                rounds += 1;
            }
            rounds
        })
    };
    let content = Arc::new(content);
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (s, content) = (s.clone(), content.clone());
            std::thread::spawn(move || {
                // Every chunk but the last, spread over the threads.
                for i in (t..MANY - 1).step_by(4) {
                    s.write_chunk(ino, g, i, &chunk(&content, i))
                        .expect("write chunk");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    stop.store(true, Ordering::SeqCst);
    assert!(settler.join().expect("settler") > 0, "the transactions ran");
    let b = s.presence_bits(ino).expect("bits").expect("still partial");
    for i in 0..MANY - 1 {
        assert!(bit(&b.present, i), "chunk {i} lost its bit");
    }
    assert!(!bit(&b.present, MANY - 1));
    s.write_chunk(ino, g, MANY - 1, &chunk(&content, MANY - 1))
        .expect("the last chunk");
    assert_eq!(s.presence_bits(ino).expect("bits"), None, "complete");
    assert_eq!(read_content(&s, ino), *content);
}
