//! Tests of the engine without a network: two real stores on temporary
//! directories, each with its engine, joined by two peer connections over
//! the in-memory frame pair of `peer::conn` (the real multiplexer, the
//! real index streams and sessions). The data path copies chunks straight
//! from the other store (verified by `read_chunk`), so that file bytes
//! arrive too.

use super::engine::{DataPath, SyncEngine};
use super::model::{ChunkHash, DeviceId, Gid, ObjRec, chunk_range};
use crate::opens::ConnId;
use crate::peer::conn::{self, ConnConfig, PeerConn, PeerLabel, memory};
use crate::peer::msg::RemoteError;
use crate::peer::requests::ChunkSink;
use crate::store::Store;
use futures::future::BoxFuture;
use ipc_schema::{Caller, FileKind, FsError, Ino, Inval, Name, RenameFlags};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
    pid: 1,
};
const CONN: ConnId = ConnId(1);

/// A data path that fills chunks from another store.
struct CopyFrom {
    other: OnceLock<Arc<Store>>,
    me: OnceLock<Arc<Store>>,
    invals: Mutex<Vec<Inval>>,
    /// No peer to copy from (as when none is connected).
    offline: std::sync::atomic::AtomicBool,
}

impl CopyFrom {
    fn fill(&self, ino: Ino) {
        if self.offline.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let (Some(me), Some(other)) = (self.me.get(), self.other.get()) else {
            return;
        };
        let Ok(Some(p)) = me.presence(ino) else {
            return;
        };
        let Ok(f) = me.open_for_fill(ino, p.generation) else {
            return;
        };
        for (i, hash) in p.chunks.iter().enumerate() {
            let i = i as u64;
            if let Ok(Some(bytes)) = other.read_chunk(&p.gid, i, hash) {
                let (start, _) = chunk_range(i, p.size);
                if f.write_all_at(&bytes, start).is_ok() {
                    let _ = me.mark_present(ino, p.generation, i);
                }
            }
        }
    }
}

impl DataPath for CopyFrom {
    fn prefetch(&self, ino: Ino) {
        self.fill(ino);
    }
    fn push_invals(&self, invals: Vec<Inval>) {
        self.invals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(invals);
    }
    fn eager_fetch_max(&self) -> u64 {
        u64::MAX
    }
    fn ensure(
        &self,
        ino: Ino,
        _: u64,
        _: u64,
        _: u64,
        _: Duration,
    ) -> BoxFuture<'static, Result<(), FsError>> {
        self.fill(ino);
        Box::pin(async { Ok(()) })
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
                crate::peer::msg::RemoteErrorKind::NotFound,
                "not used",
            ))
        })
    }
}

struct Node {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    engine: Arc<SyncEngine>,
    data: Arc<CopyFrom>,
    name: &'static str,
}

fn node(name: &'static str, device: u8) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::load(dir.path(), (4321, 8765)).expect("store"));
    store.connect(CONN);
    let engine = SyncEngine::start(store.clone(), DeviceId([device; 8])).expect("engine");
    let data = Arc::new(CopyFrom {
        other: OnceLock::new(),
        me: OnceLock::new(),
        invals: Mutex::new(Vec::new()),
        offline: std::sync::atomic::AtomicBool::new(false),
    });
    let _ = data.me.set(store.clone());
    engine.set_data_path(data.clone());
    Node {
        _dir: dir,
        store,
        engine,
        data,
        name,
    }
}

/// Two nodes that know of each other's stores (for the chunk copies).
fn pair() -> (Node, Node) {
    let a = node("a", 1);
    let b = node("b", 2);
    let _ = a.data.other.set(b.store.clone());
    let _ = b.data.other.set(a.store.clone());
    (a, b)
}

/// Join `a` and `b` by a connection (each side's handler and session,
/// as the peer manager does).
fn connect(a: &Node, b: &Node) -> (PeerConn, PeerConn) {
    let ((a_tx, a_rx), (b_tx, b_rx)) = memory::pair(64);
    let label = |n: &str| PeerLabel {
        fingerprint: format!("FP-{n}"),
        name: Some(n.to_owned()),
    };
    let handler_a = a.engine.handler();
    let handler_b = b.engine.handler();
    let ca = conn::spawn(
        a_tx,
        a_rx,
        label(b.name),
        handler_a.clone(),
        ConnConfig::default(),
    );
    let cb = conn::spawn(
        b_tx,
        b_rx,
        label(a.name),
        handler_b.clone(),
        ConnConfig::default(),
    );
    handler_a.connected(ca.clone());
    handler_b.connected(cb.clone());
    (ca, cb)
}

fn n(s: &str) -> Name {
    Name::from(s)
}

fn overwrite(s: &Store, ino: Ino, bytes: &[u8]) {
    let f = s
        .open(ino, libc::O_RDWR | libc::O_TRUNC, CONN)
        .expect("open");
    std::fs::File::from(f.fd).write_all(bytes).expect("write");
    s.release(f.opened.handle).expect("release");
}

fn read(s: &Store, ino: Ino) -> Vec<u8> {
    let f = s.open(ino, libc::O_RDONLY, CONN).expect("open");
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(f.fd), &mut out).expect("read");
    s.release(f.opened.handle).expect("release");
    out
}

/// Every name in the tree under `dir`, with kind and (for files) bytes;
/// the bytes not here are copied from the other node first, as a read
/// through the mount fetches them.
fn tree(node: &Node, dir: Ino, prefix: &str, out: &mut BTreeMap<String, (FileKind, Vec<u8>)>) {
    let s = &node.store;
    let entries = s
        .readdir(dir, ipc_schema::DirCookie(0), 10_000, false)
        .expect("readdir");
    for e in entries {
        let name = String::from_utf8_lossy(&e.name.0).into_owned();
        if name == "." || name == ".." {
            continue;
        }
        let path = format!("{prefix}/{name}");
        let attr = s.lookup(dir, &e.name).expect("lookup");
        let content = match attr.kind {
            FileKind::File => {
                node.data.fill(attr.ino);
                read(s, attr.ino)
            }
            FileKind::Symlink => s.readlink(attr.ino).expect("readlink"),
            _ => Vec::new(),
        };
        out.insert(path.clone(), (attr.kind, content));
        if attr.kind == FileKind::Directory {
            tree(node, attr.ino, &path, out);
        }
    }
}

fn tree_of(node: &Node) -> BTreeMap<String, (FileKind, Vec<u8>)> {
    let mut out = BTreeMap::new();
    tree(node, Ino::ROOT, "", &mut out);
    out
}

/// Every record of the index, by gid.
fn records(s: &Store) -> BTreeMap<Gid, ObjRec> {
    s.changes_since(0, usize::MAX)
        .expect("changes")
        .into_iter()
        .map(|(_, r)| (r.gid, r))
        .collect()
}

/// Poll `check` until it holds (30 s at most: the whole unit suite may
/// run beside it on two cores).
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every local change of `s` is a version and its log is published (the
/// dirty marks go in the commit's transaction, the sequence number moves
/// just after it: a log read in between would miss the commit).
fn versioned(s: &Store) -> bool {
    s.dirty_count() == 0 && s.log_end() == s.local_seq()
}

/// Both trees and both indexes equal, and nothing left to version.
async fn converged(a: &Node, b: &Node) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let done = versioned(&a.store)
            && versioned(&b.store)
            && records(&a.store) == records(&b.store)
            && tree_of(a) == tree_of(b);
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the two nodes did not converge:\na: {:?}\n{:#?}\n{:?}\nb: {:?}\n{:#?}\n{:?}",
            tree_of(a),
            records(&a.store),
            a.engine.book.get("FP-b"),
            tree_of(b),
            records(&b.store),
            b.engine.book.get("FP-a"),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_edits_renames_and_deletes_cross_both_ways() {
    let (a, b) = pair();
    let _link = connect(&a, &b);
    // On a: a directory with a file, a symlink.
    let d = a
        .store
        .mkdir(Ino::ROOT, &n("docs"), 0o755, ME)
        .expect("mkdir")
        .ino;
    let f = write_file(&a.store, d, "note.txt", b"hello from a");
    a.store
        .symlink(Ino::ROOT, &n("link"), b"docs/note.txt", ME)
        .expect("symlink");
    converged(&a, &b).await;
    let on_b = tree_of(&b);
    assert_eq!(
        on_b.get("/docs/note.txt"),
        Some(&(FileKind::File, b"hello from a".to_vec()))
    );
    assert_eq!(
        on_b.get("/link"),
        Some(&(FileKind::Symlink, b"docs/note.txt".to_vec()))
    );
    // mountd is told what changed on b.
    assert!(
        !b.data.invals.lock().expect("lock").is_empty(),
        "invalidations for mountd"
    );
    // On b: an edit and a rename of a's file; a new file.
    let fb = b
        .store
        .lookup(
            b.store.lookup(Ino::ROOT, &n("docs")).expect("d").ino,
            &n("note.txt"),
        )
        .expect("f")
        .ino;
    overwrite(&b.store, fb, b"edited on b, longer than before");
    let db = b.store.lookup(Ino::ROOT, &n("docs")).expect("docs").ino;
    b.store
        .rename(
            db,
            &n("note.txt"),
            Ino::ROOT,
            &n("moved.txt"),
            RenameFlags::default(),
        )
        .expect("rename");
    write_file(&b.store, db, "from-b", b"b's bytes");
    converged(&a, &b).await;
    let on_a = tree_of(&a);
    assert_eq!(
        on_a.get("/moved.txt"),
        Some(&(FileKind::File, b"edited on b, longer than before".to_vec()))
    );
    assert_eq!(on_a.get("/docs/note.txt"), None);
    assert_eq!(
        on_a.get("/docs/from-b"),
        Some(&(FileKind::File, b"b's bytes".to_vec()))
    );
    // The same inode on a: a rename is a rename, not a delete and create.
    assert_eq!(
        a.store
            .lookup(Ino::ROOT, &n("moved.txt"))
            .expect("moved")
            .ino,
        f
    );
    // Deletes, of a file and a whole directory, from a.
    a.store.unlink(Ino::ROOT, &n("moved.txt")).expect("unlink");
    a.store.unlink(d, &n("from-b")).expect("unlink");
    a.store.rmdir(Ino::ROOT, &n("docs")).expect("rmdir");
    converged(&a, &b).await;
    let on_b = tree_of(&b);
    assert_eq!(on_b.keys().collect::<Vec<_>>(), ["/link"]);
    // Nothing is deferred and both peers are in sync.
    let figures = super::status::store_figures(&b.engine).expect("figures");
    assert_eq!(figures, (0, 0, 0), "nothing unversioned, every file local");
    let status = super::status::sync_status(&b.engine, Vec::new(), Some(figures));
    assert_eq!(status.conflicts, 0);
    assert_eq!(b.engine.book.get("FP-a").expect("a").deferred, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_while_apart_end_with_one_conflict_copy_on_both() {
    let (a, b) = pair();
    {
        let (ca, _) = connect(&a, &b);
        write_file(&a.store, Ino::ROOT, "shared.txt", b"base");
        converged(&a, &b).await;
        ca.close("cut");
    }
    // The link is gone; both edit the file.
    let fa = a.store.lookup(Ino::ROOT, &n("shared.txt")).expect("a").ino;
    let fb = b.store.lookup(Ino::ROOT, &n("shared.txt")).expect("b").ino;
    until("the sessions end", || {
        a.engine.book.get("FP-b").is_some_and(|p| !p.connected)
            && b.engine.book.get("FP-a").is_some_and(|p| !p.connected)
    })
    .await;
    overwrite(&a.store, fa, b"edit made on a");
    overwrite(&b.store, fb, b"edit made on b!");
    until("both edits versioned", || {
        versioned(&a.store) && versioned(&b.store)
    })
    .await;
    let _link = connect(&a, &b);
    converged(&a, &b).await;
    let t = tree_of(&a);
    assert_eq!(t.len(), 2, "the file and one conflict copy: {t:?}");
    let contents: Vec<&Vec<u8>> = t.values().map(|(_, c)| c).collect();
    assert!(contents.contains(&&b"edit made on a".to_vec()), "{t:?}");
    assert!(contents.contains(&&b"edit made on b!".to_vec()), "{t:?}");
    let copy = t
        .keys()
        .find(|k| k.contains(".sync-conflict-"))
        .expect("a conflict copy");
    assert!(
        copy.starts_with("/shared.sync-conflict-") && copy.ends_with(".txt"),
        "{copy}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_against_delete_keeps_the_edit_and_a_deleted_directory_keeps_new_files() {
    let (a, b) = pair();
    {
        let (ca, _) = connect(&a, &b);
        let d = a
            .store
            .mkdir(Ino::ROOT, &n("dir"), 0o755, ME)
            .expect("mkdir")
            .ino;
        write_file(&a.store, d, "old", b"old file");
        write_file(&a.store, Ino::ROOT, "kept.txt", b"v1");
        converged(&a, &b).await;
        ca.close("cut");
    }
    until("the sessions end", || {
        a.engine.book.get("FP-b").is_some_and(|p| !p.connected)
            && b.engine.book.get("FP-a").is_some_and(|p| !p.connected)
    })
    .await;
    // a deletes the directory (and its file) and edits kept.txt ...
    let da = a.store.lookup(Ino::ROOT, &n("dir")).expect("dir").ino;
    a.store.unlink(da, &n("old")).expect("unlink");
    a.store.rmdir(Ino::ROOT, &n("dir")).expect("rmdir");
    let ka = a.store.lookup(Ino::ROOT, &n("kept.txt")).expect("kept").ino;
    overwrite(&a.store, ka, b"v2 edited on a");
    // ... while b creates a file in the directory and deletes kept.txt.
    let db = b.store.lookup(Ino::ROOT, &n("dir")).expect("dir").ino;
    write_file(&b.store, db, "new", b"made on b");
    b.store.unlink(Ino::ROOT, &n("kept.txt")).expect("unlink");
    until("all versioned", || {
        versioned(&a.store) && versioned(&b.store)
    })
    .await;
    let _link = connect(&a, &b);
    converged(&a, &b).await;
    let t = tree_of(&a);
    assert_eq!(
        t.get("/kept.txt"),
        Some(&(FileKind::File, b"v2 edited on a".to_vec())),
        "the edit wins over the delete: {t:?}"
    );
    assert_eq!(
        t.get("/dir/new"),
        Some(&(FileKind::File, b"made on b".to_vec())),
        "the directory is kept with the new file: {t:?}"
    );
    assert_eq!(t.get("/dir/old"), None, "the delete of the old file stands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_name_created_on_both_sides_is_a_conflict_not_a_merge() {
    let (a, b) = pair();
    write_file(&a.store, Ino::ROOT, "same", b"a's file");
    write_file(&b.store, Ino::ROOT, "same", b"b's file");
    until("both versioned", || {
        versioned(&a.store) && versioned(&b.store)
    })
    .await;
    let _link = connect(&a, &b);
    converged(&a, &b).await;
    let t = tree_of(&a);
    assert_eq!(t.len(), 2, "{t:?}");
    assert!(t.contains_key("/same"), "{t:?}");
    let contents: Vec<&Vec<u8>> = t.values().map(|(_, c)| c).collect();
    assert!(contents.contains(&&b"a's file".to_vec()) && contents.contains(&&b"b's file".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_delete_that_comes_before_its_entries_delete_does_not_keep_the_directory() {
    let (a, b) = pair();
    let d = a
        .store
        .mkdir(Ino::ROOT, &n("dir"), 0o755, ME)
        .expect("mkdir")
        .ino;
    write_file(&a.store, d, "f", b"in the directory");
    until("a versioned", || versioned(&a.store)).await;
    let created: Vec<(u64, ObjRec)> = a.store.changes_since(0, usize::MAX).expect("changes");
    let b2 = b.engine.clone();
    let left = tokio::task::spawn_blocking(move || {
        super::session::apply_batch(&b2, "FP-a", created, Vec::new())
    })
    .await
    .expect("apply");
    assert!(left.is_empty(), "{left:?}");
    let seen = a.store.local_seq();
    a.store.unlink(d, &n("f")).expect("unlink");
    a.store.rmdir(Ino::ROOT, &n("dir")).expect("rmdir");
    until("a versioned", || versioned(&a.store)).await;
    // The directory's tombstone first, then its entry's, in one batch.
    let mut deletes = a.store.changes_since(seen, usize::MAX).expect("changes");
    assert_eq!(deletes.len(), 2);
    deletes.sort_by_key(|(_, r)| r.kind != FileKind::Directory);
    let b2 = b.engine.clone();
    let left = tokio::task::spawn_blocking(move || {
        super::session::apply_batch(&b2, "FP-a", deletes, Vec::new())
    })
    .await
    .expect("apply");
    assert!(left.is_empty(), "nothing waits: {left:?}");
    assert!(tree_of(&b).is_empty(), "the directory is gone too");
    assert_eq!(
        b.engine
            .conflicts
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no directory was kept"
    );
}

/// Apply every record of `from` after its sequence `after` to `to`, as a
/// session would; answers `from`'s last sequence number.
async fn pull(from: &Node, to: &Node, after: u64) -> u64 {
    let recs = from
        .store
        .changes_since(after, usize::MAX)
        .expect("changes");
    let last = recs.last().map_or(after, |(s, _)| *s);
    let engine = to.engine.clone();
    let peer = format!("FP-{}", from.name);
    let left = tokio::task::spawn_blocking(move || {
        super::session::apply_batch(&engine, &peer, recs, Vec::new())
    })
    .await
    .expect("apply");
    assert!(left.is_empty(), "nothing waits: {left:?}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_resolved_first_does_not_make_our_losing_edit_vanish() {
    let (a, b) = pair();
    let fa = write_file(&a.store, Ino::ROOT, "f.txt", b"base");
    until("a versioned", || versioned(&a.store)).await;
    let a_seq = pull(&a, &b, 0).await;
    let b_seq = b.store.local_seq();
    // b edits, then a (later, so a's edit wins).
    let fb = b.store.lookup(Ino::ROOT, &n("f.txt")).expect("f on b").ino;
    overwrite(&b.store, fb, b"b's edit, which loses");
    until("b versioned", || versioned(&b.store)).await;
    std::thread::sleep(Duration::from_millis(20));
    overwrite(&a.store, fa, b"a's edit, which wins");
    until("a versioned", || versioned(&a.store)).await;
    // a sees b's edit first: it keeps its own and records a copy of b's
    // (bytes not here: only b has them).
    pull(&b, &a, b_seq).await;
    // Then b gets a's log: the copy, then a's winner with the merged
    // vector, which is newer than b's edit (b never sees a conflict).
    pull(&a, &b, a_seq).await;
    let t = tree_of(&b);
    assert_eq!(
        t.get("/f.txt"),
        Some(&(FileKind::File, b"a's edit, which wins".to_vec()))
    );
    let copy = t
        .iter()
        .find(|(k, _)| k.contains(".sync-conflict-"))
        .expect("a conflict copy on b");
    assert_eq!(
        copy.1.1,
        b"b's edit, which loses".to_vec(),
        "b's edit is kept in the copy, from b's own bytes"
    );
    // And a can get the copy's bytes from b.
    converged(&a, &b).await;
}

/// The order that lost a losing edit's bytes: b's log is read for a
/// (the entry of b's edit) while b resolves the conflict with a's edit (b
/// records a copy of a's edit, then its winner again, with the merged
/// vector). If the read sent the winner at the entry's old number, a would
/// apply it before the copy (its vector supersedes a's edit: no conflict
/// seen here), and the copy, coming next, could no longer be seeded from
/// a's bytes, which no other node has. The interleaving is forced by the
/// store's log-read hook, which lets b resolve between the read of the
/// entry and the read of its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_winner_recorded_while_the_log_is_read_does_not_overtake_the_copy_of_our_edit() {
    let (a, b) = pair();
    let fa = write_file(&a.store, Ino::ROOT, "f.txt", b"base");
    until("a versioned", || versioned(&a.store)).await;
    let a_seq = pull(&a, &b, 0).await;
    let b_seq = b.store.local_seq();
    // a edits, then b: b's edit wins (a later or equal mtime, and the
    // greater device id on a tie).
    overwrite(&a.store, fa, b"a's edit, which loses");
    let fb = b.store.lookup(Ino::ROOT, &n("f.txt")).expect("f on b").ino;
    overwrite(&b.store, fb, b"b's edit, which wins");
    until("both versioned", || {
        versioned(&a.store) && versioned(&b.store)
    })
    .await;
    let gid = b.store.gid_of(fb).expect("gid");
    // b gets a's edit (and resolves) between reading its log's entry of
    // the file and reading the record.
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let fired = fired.clone();
        let engine_b = b.engine.clone();
        let store_a = a.store.clone();
        b.store.set_log_read_hook(Some(Box::new(move |_, g| {
            if *g != gid || fired.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let recs = store_a.changes_since(a_seq, usize::MAX).expect("a's log");
            let left = super::session::apply_batch(&engine_b, "FP-a", recs, Vec::new());
            assert!(left.is_empty(), "b applies a's edit: {left:?}");
        })));
    }
    let store_b = b.store.clone();
    let read = tokio::task::spawn_blocking(move || store_b.changes_since(b_seq, usize::MAX))
        .await
        .expect("join")
        .expect("b's log");
    b.store.set_log_read_hook(None);
    assert!(
        fired.load(std::sync::atomic::Ordering::SeqCst),
        "the conflict was resolved on b during the read"
    );
    let copies = |s: &Store| {
        records(s)
            .values()
            .filter(|r| {
                r.names
                    .iter()
                    .any(|n| n.name.windows(15).any(|w| w == b".sync-conflict-"))
            })
            .count()
    };
    assert_eq!(copies(&b.store), 1, "b made the copy of a's edit");
    // a applies what that read gave, then the rest of b's log, as the
    // live stream sends it.
    let last = read.last().map_or(b_seq, |(s, _)| *s);
    let engine_a = a.engine.clone();
    let left = tokio::task::spawn_blocking(move || {
        super::session::apply_batch(&engine_a, "FP-b", read, Vec::new())
    })
    .await
    .expect("apply");
    assert!(left.is_empty(), "nothing waits: {left:?}");
    pull(&b, &a, last).await;
    let t = tree_of(&a);
    assert_eq!(
        t.get("/f.txt"),
        Some(&(FileKind::File, b"b's edit, which wins".to_vec())),
        "{t:?}"
    );
    let copy = t
        .iter()
        .find(|(k, _)| k.contains(".sync-conflict-"))
        .expect("a conflict copy on a");
    assert_eq!(
        copy.1.1,
        b"a's edit, which loses".to_vec(),
        "a's edit is kept in the copy: {t:?}"
    );
    let _link = connect(&a, &b);
    converged(&a, &b).await;
}

/// Two nodes where a's edit of `f.txt` lost to b's on b: b holds the
/// conflict copy of a's edit (its bytes not there) and its winner. Answers
/// b's log after the base version (the copy, then the winner) and the
/// copy's record.
async fn b_resolved_against_a(a: &Node, b: &Node) -> (Vec<(u64, ObjRec)>, ObjRec) {
    let fa = write_file(&a.store, Ino::ROOT, "f.txt", b"base");
    until("a versioned", || versioned(&a.store)).await;
    let a_seq = pull(a, b, 0).await;
    let b_seq = b.store.local_seq();
    overwrite(&a.store, fa, b"a's edit, which loses");
    let fb = b.store.lookup(Ino::ROOT, &n("f.txt")).expect("f on b").ino;
    overwrite(&b.store, fb, b"b's edit, which wins");
    until("both versioned", || {
        versioned(&a.store) && versioned(&b.store)
    })
    .await;
    pull(a, b, a_seq).await;
    let log = b.store.changes_since(b_seq, usize::MAX).expect("b's log");
    let copy = log
        .iter()
        .map(|(_, r)| r.clone())
        .find(|r| {
            r.names
                .iter()
                .any(|n| n.name.starts_with(b"f.sync-conflict-"))
        })
        .expect("b made a copy");
    assert_eq!(log.len(), 2, "the copy, then the winner: {log:?}");
    (log, copy)
}

/// The content of a's copy of its own losing edit, and of `f.txt`.
fn copy_and_file_on_a(a: &Node) -> (Vec<u8>, Vec<u8>) {
    let t = tree_of(a);
    let copy = t
        .iter()
        .find(|(k, v)| k.contains(".sync-conflict-") && v.1 != b"squatter")
        .map(|(_, v)| v.1.clone())
        .unwrap_or_else(|| panic!("a conflict copy on a: {t:?}"));
    let file = t.get("/f.txt").map(|v| v.1.clone()).expect("f.txt on a");
    (copy, file)
}

/// A copy of our version that is here but partial (here: applied without
/// its seed) is filled from our version before a winner replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_copy_of_our_version_is_filled_before_the_winner_replaces_it() {
    let (a, b) = pair();
    let (log, copy) = b_resolved_against_a(&a, &b).await;
    let store_a = a.store.clone();
    let c = copy.clone();
    let applied = tokio::task::spawn_blocking(move || store_a.apply_remote(&c, None))
        .await
        .expect("join")
        .expect("the copy applied without a seed");
    let ino = applied.ino.expect("the copy's inode");
    assert!(
        a.store.presence(ino).expect("presence").is_some(),
        "the copy is partial on a"
    );
    // Then b's log: the copy (here already) and the winner.
    pull(&b, &a, log[0].0 - 1).await;
    assert!(
        a.store.presence(ino).expect("presence").is_none(),
        "the copy was completed from a's edit before it was replaced"
    );
    let (copy_bytes, file) = copy_and_file_on_a(&a);
    assert_eq!(copy_bytes, b"a's edit, which loses".to_vec());
    assert_eq!(file, b"b's edit, which wins".to_vec());
    let _link = connect(&a, &b);
    converged(&a, &b).await;
}

/// A copy of our version that must wait (its name is held here) keeps the
/// winner from replacing our version until it is applied, seeded from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_winner_waits_for_a_deferred_copy_of_our_version() {
    let (a, b) = pair();
    let (log, copy) = b_resolved_against_a(&a, &b).await;
    // A file made on a holds the copy's name.
    let name = String::from_utf8(copy.names[0].name.clone()).expect("utf-8 name");
    write_file(&a.store, Ino::ROOT, &name, b"squatter");
    until("a versioned", || versioned(&a.store)).await;
    let engine = a.engine.clone();
    let left = tokio::task::spawn_blocking(move || {
        super::session::apply_batch(&engine, "FP-b", log, Vec::new())
    })
    .await
    .expect("apply");
    let waits: Vec<&super::apply::Wait> = left.iter().map(|d| &d.wait).collect();
    assert!(
        matches!(
            waits.as_slice(),
            [
                super::apply::Wait::Collision { .. },
                super::apply::Wait::CopyFirst(g)
            ] if *g == copy.gid
        ),
        "the copy waits for its name, the winner for the copy: {waits:?}"
    );
    let fa = a.store.lookup(Ino::ROOT, &n("f.txt")).expect("f").ino;
    assert_eq!(read(&a.store, fa), b"a's edit, which loses".to_vec());
    // Once the collision grace is over (moved back here instead of
    // waiting for it), the copy moves to its conflict name, then the
    // winner is applied.
    let left: Vec<super::session::Deferred> = left
        .into_iter()
        .map(|d| super::session::Deferred {
            since: std::time::Instant::now() - super::session::COLLISION_GRACE,
            ..d
        })
        .collect();
    let engine = a.engine.clone();
    let left = tokio::task::spawn_blocking(move || {
        super::session::apply_batch(&engine, "FP-b", Vec::new(), left)
    })
    .await
    .expect("apply");
    assert!(left.is_empty(), "nothing waits: {left:?}");
    let (copy_bytes, file) = copy_and_file_on_a(&a);
    assert_eq!(copy_bytes, b"a's edit, which loses".to_vec());
    assert_eq!(file, b"b's edit, which wins".to_vec());
    let _link = connect(&a, &b);
    converged(&a, &b).await;
}

/// A small file whose eager fetch failed (no peer had its bytes then) is
/// fetched when a peer connects, without a read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_eager_fetch_is_retried_when_a_peer_connects() {
    let (a, b) = pair();
    write_file(&a.store, Ino::ROOT, "small.txt", b"fetched eagerly");
    until("a versioned", || versioned(&a.store)).await;
    b.data
        .offline
        .store(true, std::sync::atomic::Ordering::SeqCst);
    pull(&a, &b, 0).await;
    let ino = b
        .store
        .lookup(Ino::ROOT, &n("small.txt"))
        .expect("small.txt on b")
        .ino;
    assert!(
        b.store.presence(ino).expect("presence").is_some(),
        "the eager fetch failed: the file is not all local on b"
    );
    b.data
        .offline
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let _link = connect(&a, &b);
    until("the file is fetched once a peer is connected", || {
        b.store.presence(ino).expect("presence").is_none()
    })
    .await;
    assert_eq!(read(&b.store, ino), b"fetched eagerly".to_vec());
}

fn write_file(s: &Store, parent: Ino, name: &str, bytes: &[u8]) -> Ino {
    crate::store::test_support::file_with(s, parent, name, bytes, ME, CONN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_counts_as_caught_up_once_the_peers_caught_up_arrives_and_a_new_one_starts_over()
{
    let (a, b) = pair();
    let caught_up = |n: &Node, fp: &str| n.engine.book.get(fp).is_some_and(|p| p.caught_up);
    {
        let (ca, _) = connect(&a, &b);
        until("both sessions caught up", || {
            caught_up(&a, "FP-b") && caught_up(&b, "FP-a")
        })
        .await;
        ca.close("cut");
    }
    until("the sessions end", || {
        a.engine.book.get("FP-b").is_some_and(|p| !p.connected)
            && b.engine.book.get("FP-a").is_some_and(|p| !p.connected)
    })
    .await;
    // `keibictl wait --synced` reads it through `sync_status`: a peer
    // that is not connected is never caught up there.
    assert!(caught_up(&a, "FP-b"), "the book keeps the last session's");
    // A new session starts over, and catches up again.
    a.engine.book.session_started("FP-b");
    assert!(!caught_up(&a, "FP-b"), "a new session has not caught up");
    a.engine.book.session_ended("FP-b");
    let _link = connect(&a, &b);
    until("caught up again", || {
        caught_up(&a, "FP-b") && caught_up(&b, "FP-a")
    })
    .await;
}
