//! Tests of the shared index in the store: global ids, dirty marks, the
//! change log, applying versions from a peer, content generations and
//! presence. Plain tests on a temporary state directory.

use super::objects::{ApplyError, DirtyMark, Seed};
use super::*;
use crate::opens::ConnId;
use crate::sync::model::{
    CHUNK_SIZE, ChunkHash, DeviceId, EntryName, Gid, ObjRec, VersionVector, chunk_range,
};
use ipc_schema::{Caller, Inval, RenameFlags};
use std::os::unix::fs::FileExt;

const ROOT: Ino = Ino::ROOT;
const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
    pid: 1,
};
const CONN: ConnId = ConnId(1);
const DEV: DeviceId = DeviceId([1; 8]);
const PEER: DeviceId = DeviceId([2; 8]);
const OWNER: (u32, u32) = (4321, 8765);

fn fresh() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::load(dir.path(), OWNER).expect("store");
    s.attach_device(DEV).expect("attach");
    s.connect(CONN);
    (dir, s)
}

fn n(s: &str) -> Name {
    Name::from(s)
}

fn marks(s: &Store) -> Vec<Ino> {
    let mut v: Vec<Ino> = s
        .take_dirty(usize::MAX)
        .expect("take")
        .into_iter()
        .map(|m| m.ino)
        .collect();
    v.sort();
    v
}

fn clear_all(s: &Store) {
    for m in s.take_dirty(usize::MAX).expect("take") {
        s.clear_dirty(m).expect("clear");
    }
}

/// Deterministic content of `len` bytes (seeded).
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0] ^ seed)
        .collect()
}

fn chunks_of(b: &[u8]) -> Vec<ChunkHash> {
    let size = b.len() as u64;
    (0..crate::sync::model::chunk_count(size))
        .map(|i| {
            let (s, e) = chunk_range(i, size);
            ChunkHash::of(&b[s as usize..e as usize])
        })
        .collect()
}

fn ts(secs: i64) -> Timestamp {
    Timestamp { secs, nanos: 0 }
}

fn vv(c: u64) -> VersionVector {
    VersionVector([(PEER, c)].into_iter().collect())
}

/// A file record from the peer.
fn remote_file(gid: Gid, parent: Gid, name: &str, content: &[u8], version: u64) -> ObjRec {
    ObjRec {
        gid,
        vv: vv(version),
        modified_by: PEER,
        deleted: false,
        kind: FileKind::File,
        names: vec![EntryName {
            parent,
            name: name.as_bytes().to_vec(),
        }],
        perm: 0o640,
        mtime: ts(1_700_000_000 + version as i64),
        size: content.len() as u64,
        chunks: chunks_of(content),
        target: Vec::new(),
    }
}

fn remote_dir(gid: Gid, parent: Gid, name: &str) -> ObjRec {
    ObjRec {
        gid,
        vv: vv(1),
        modified_by: PEER,
        deleted: false,
        kind: FileKind::Directory,
        names: vec![EntryName {
            parent,
            name: name.as_bytes().to_vec(),
        }],
        perm: 0o750,
        mtime: ts(1_600_000_000),
        size: 0,
        chunks: Vec::new(),
        target: Vec::new(),
    }
}

fn tombstone(of: &ObjRec) -> ObjRec {
    ObjRec {
        deleted: true,
        names: Vec::new(),
        chunks: Vec::new(),
        vv: of.vv.bumped(PEER),
        ..of.clone()
    }
}

fn read_all(s: &Store, ino: Ino) -> Vec<u8> {
    let rec = s.read_inode(ino.0).expect("read").expect("inode");
    std::fs::read(s.content.path_gen(ino.0, rec.generation)).expect("content")
}

/// Fetch chunk `i` of `content` into `ino` as the data path does.
fn fill_chunk(s: &Store, ino: Ino, content: &[u8], i: u64) -> Vec<u64> {
    let p = s.presence(ino).expect("presence").expect("partial");
    let (a, b) = chunk_range(i, p.size);
    let f = s.open_for_fill(ino, p.generation).expect("open for fill");
    f.write_all_at(&content[a as usize..b as usize], a)
        .expect("write");
    s.mark_present(ino, p.generation, i).expect("mark")
}

#[test]
fn attach_gives_gids_marks_everything_once_and_refuses_another_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (f, d) = {
        let s = Store::load(dir.path(), OWNER).expect("store");
        s.connect(CONN);
        let d = s.mkdir(ROOT, &n("d"), 0o755, ME).expect("mkdir").ino;
        let f = file_with(&s, d, "f", b"hello");
        s.mknod(ROOT, &n("fifo"), FileKind::Fifo, 0o644, 0, ME)
            .expect("fifo");
        // Operations before the attach mark too; the attach marks all.
        s.attach_device(DEV).expect("attach");
        assert_eq!(marks(&s), vec![d, f], "shared kinds, not the root");
        assert_eq!(s.gid_of(f).expect("gid"), Gid::new(DEV, f.0));
        assert_eq!(s.ino_of(&Gid::new(DEV, d.0)).expect("ino"), Some(d));
        assert_eq!(s.ino_of(&Gid::ROOT).expect("root"), Some(ROOT));
        assert_eq!(s.device(), DEV);
        (f, d)
    };
    let s = reopen(dir.path());
    s.attach_device(DEV).expect("same device again");
    assert_eq!(s.dirty_count(), 2, "the second attach marks nothing new");
    let e = s.attach_device(PEER).expect_err("another device");
    assert_eq!(e.errno, libc::EINVAL);
    assert!(e.message.contains("identity"), "{e}");
    assert_eq!(s.gid_of(d).expect("gid"), Gid::new(DEV, d.0));
    let _ = f;
}

#[test]
fn every_shared_change_marks_its_inode_and_wakes_the_engine() {
    let (_d, s) = fresh();
    let notify = s.dirty_notify();
    let d = s.mkdir(ROOT, &n("d"), 0o755, ME).expect("mkdir").ino;
    assert_eq!(marks(&s), vec![d], "mkdir");
    clear_all(&s);
    let f = file_with(&s, ROOT, "f", b"x");
    assert_eq!(marks(&s), vec![f], "create and the writer's release");
    clear_all(&s);
    let l = s.symlink(ROOT, &n("l"), b"f", ME).expect("symlink").ino;
    s.link(f, d, &n("f2")).expect("link");
    assert_eq!(marks(&s), vec![f, l], "symlink, link");
    clear_all(&s);
    s.rename(ROOT, &n("l"), d, &n("l2"), RenameFlags::default())
        .expect("rename");
    assert_eq!(marks(&s), vec![l], "rename");
    clear_all(&s);
    let g = file_with(&s, ROOT, "g", b"y");
    clear_all(&s);
    s.rename(ROOT, &n("g"), ROOT, &n("f"), RenameFlags::default())
        .expect("rename over");
    assert_eq!(marks(&s), vec![f, g], "the moved and the replaced");
    clear_all(&s);
    s.setattr(
        g,
        &SetAttr {
            perm: Some(0o600),
            ..SetAttr::default()
        },
    )
    .expect("chmod");
    assert_eq!(marks(&s), vec![g], "setattr");
    clear_all(&s);
    s.setattr(
        g,
        &SetAttr {
            atime: Some(TimeSet::Now),
            ..SetAttr::default()
        },
    )
    .expect("touch -a");
    assert_eq!(marks(&s), vec![], "atime is not shared");
    let r = s.open(g, libc::O_RDONLY, CONN).expect("open");
    s.release(r.opened.handle).expect("release");
    assert_eq!(marks(&s), vec![], "a reader's release writes nothing");
    s.fsync(g, false).expect("fsync");
    assert_eq!(marks(&s), vec![g], "fsync");
    clear_all(&s);
    s.unlink(d, &n("f2")).expect("unlink");
    s.unlink(d, &n("l2")).expect("unlink");
    s.rmdir(ROOT, &n("d")).expect("rmdir");
    let mut want = vec![f, d, l];
    want.sort();
    assert_eq!(marks(&s), want, "unlink, rmdir");
    // The notify has a permit stored.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), notify.notified())
            .await
            .expect("woken");
    });
}

#[test]
fn a_writer_dropped_without_a_release_marks_its_file() {
    use crate::opens::MountKey;
    let (_d, s) = fresh();
    let key = |pid| MountKey {
        mountpoint: "/mnt".into(),
        pid,
    };
    s.register_mount(CONN, key(1), true, &[], &[])
        .expect("register");
    let f = s
        .create(ROOT, &n("w"), 0o644, libc::O_RDWR | libc::O_CREAT, ME, CONN)
        .expect("create");
    let r = s
        .create(ROOT, &n("r"), 0o644, libc::O_RDWR | libc::O_CREAT, ME, CONN)
        .expect("create");
    s.release(r.opened.handle).expect("release");
    let reader = s
        .open(r.opened.attr.ino, libc::O_RDONLY, CONN)
        .expect("open");
    clear_all(&s);
    assert_eq!(s.disconnect(CONN), 2, "parked, not dropped");
    assert_eq!(marks(&s), vec![]);
    // mountd died; a fresh mount drops what it held.
    let fresh_conn = ConnId(2);
    s.connect(fresh_conn);
    s.register_mount(fresh_conn, key(2), true, &[], &[])
        .expect("fresh mount");
    assert_eq!(
        marks(&s),
        vec![f.opened.attr.ino],
        "the writer, not the reader"
    );
    let _ = reader;
}

#[test]
fn take_dirty_is_oldest_first_and_a_newer_mark_survives_commit() {
    let (_d, s) = fresh();
    let a = file_with(&s, ROOT, "a", b"1");
    let b = file_with(&s, ROOT, "b", b"2");
    // a is changed again after b: its mark is newer.
    s.fsync(a, false).expect("fsync");
    let taken = s.take_dirty(10).expect("take");
    assert_eq!(taken.iter().map(|m| m.ino).collect::<Vec<_>>(), vec![b, a]);
    assert_eq!(s.take_dirty(1).expect("take").len(), 1);
    let mark_a = taken[1];
    s.fsync(a, false).expect("changed meanwhile");
    let lo = s.local_object(a).expect("local");
    let mut rec = remote_file(lo.gid, Gid::ROOT, "a", b"1", 1);
    rec.modified_by = DEV;
    s.commit_local(mark_a, &rec).expect("commit");
    assert!(marks(&s).contains(&a), "a newer mark stays");
    s.clear_dirty(mark_a).expect("stale clear is a no-op");
    assert!(marks(&s).contains(&a));
    s.clear_dirty(taken[0]).expect("clear b");
    assert_eq!(marks(&s), vec![a]);
}

#[test]
fn take_dirty_reads_a_bounded_slice_and_goes_round_every_dirty_inode() {
    let (_d, s) = fresh();
    let inos: Vec<Ino> = (0..5)
        .map(|i| file_with(&s, ROOT, &format!("f{i}"), b"x"))
        .collect();
    // Nothing is cleared between takes: each take of 2 goes on from where
    // the last one stopped, so three takes see all five (a take that
    // always started from the oldest marks would see the same two).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let taken = s.take_dirty(2).expect("take");
        assert!(!taken.is_empty() && taken.len() <= 2, "{taken:?}");
        assert!(
            taken.windows(2).all(|w| w[0].mark < w[1].mark),
            "oldest mark first within a take: {taken:?}"
        );
        seen.extend(taken.iter().map(|m| m.ino));
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), inos);
}

#[test]
fn local_object_describes_names_content_and_deletion() {
    let (_d, s) = fresh();
    let d = s.mkdir(ROOT, &n("d"), 0o700, ME).expect("mkdir").ino;
    let f = file_with(&s, d, "f", &bytes(1000, 1));
    s.link(f, ROOT, &n("hard")).expect("link");
    let t = ts(1_234_567);
    s.setattr(
        f,
        &SetAttr {
            mtime: Some(TimeSet::At(t)),
            ..SetAttr::default()
        },
    )
    .expect("mtime");
    let lo = s.local_object(f).expect("local");
    assert_eq!(lo.gid, Gid::new(DEV, f.0));
    assert!(lo.recorded.is_none());
    let now = lo.now.expect("live");
    assert_eq!(
        (now.kind, now.size, now.mtime, now.perm),
        (FileKind::File, 1000, t, 0o644)
    );
    let mut want = vec![
        EntryName {
            parent: Gid::new(DEV, d.0),
            name: b"f".to_vec(),
        },
        EntryName {
            parent: Gid::ROOT,
            name: b"hard".to_vec(),
        },
    ];
    want.sort();
    assert_eq!(now.names, want);
    assert!(now.presence.is_none());
    let sl = s.symlink(d, &n("s"), b"../x", ME).expect("symlink").ino;
    let ls = s.local_object(sl).expect("local").now.expect("live");
    assert_eq!((ls.size, ls.target.as_slice()), (4, &b"../x"[..]));
    assert_eq!(s.path_of(f).expect("path"), "/hard", "the first name");
    assert_eq!(s.path_of(sl).expect("path"), "/d/s");
    assert_eq!(s.path_of(d).expect("path"), "/d");
    assert_eq!(s.path_of(ROOT).expect("path"), "/");
    s.unlink(d, &n("f")).expect("unlink");
    s.unlink(ROOT, &n("hard")).expect("unlink");
    s.settle();
    let gone = s.local_object(f).expect("local of a deleted inode");
    assert!(gone.now.is_none());
    assert_eq!(gone.gid, Gid::new(DEV, f.0));
}

#[test]
fn commits_make_a_log_that_holds_each_object_once_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, ga) = {
        let s = Store::load(dir.path(), OWNER).expect("store");
        s.attach_device(DEV).expect("attach");
        s.connect(CONN);
        let mut seqs = s.seq_watch();
        let a = file_with(&s, ROOT, "a", b"aa");
        let b = file_with(&s, ROOT, "b", b"bb");
        let commit = |ino: Ino, name: &str, body: &[u8], v: u64| {
            let m = s
                .take_dirty(100)
                .expect("take")
                .into_iter()
                .find(|m| m.ino == ino)
                .unwrap_or(DirtyMark { ino, mark: 0 });
            let mut rec = remote_file(s.gid_of(ino).expect("gid"), Gid::ROOT, name, body, v);
            rec.modified_by = DEV;
            s.commit_local(m, &rec).expect("commit")
        };
        assert_eq!(commit(a, "a", b"aa", 1), 1);
        assert_eq!(commit(b, "b", b"bb", 1), 2);
        assert_eq!(commit(a, "a", b"aa", 2), 3);
        assert_eq!(*seqs.borrow_and_update(), 3);
        assert_eq!(s.local_seq(), 3);
        let log = s.changes_since(0, 10).expect("log");
        assert_eq!(
            log.iter().map(|(q, r)| (*q, r.gid)).collect::<Vec<_>>(),
            vec![
                (2, s.gid_of(b).expect("gid")),
                (3, s.gid_of(a).expect("gid"))
            ]
        );
        assert_eq!(s.changes_since(2, 10).expect("log").len(), 1);
        assert_eq!(s.changes_since(0, 1).expect("log").len(), 1);
        assert!(s.changes_since(3, 10).expect("log").is_empty());
        assert_eq!(s.dirty_count(), 0);
        s.set_peer_applied("fp", 42).expect("set");
        s.flush().expect("flush");
        (a, s.gid_of(a).expect("gid"))
    };
    let s = reopen(dir.path());
    assert_eq!(s.local_seq(), 3);
    assert_eq!(s.peer_applied("fp").expect("get"), 42);
    assert_eq!(s.peer_applied("other").expect("get"), 0);
    assert_eq!(s.object(&ga).expect("object").expect("recorded").vv, vv(2));
    assert_eq!(s.ino_of(&ga).expect("ino"), Some(a));
    // A tombstone commit removes the maps.
    s.connect(CONN);
    s.unlink(ROOT, &n("a")).expect("unlink");
    let m = s.take_dirty(10).expect("take")[0];
    let mut t = tombstone(&s.object(&ga).expect("o").expect("rec"));
    t.modified_by = DEV;
    assert_eq!(s.commit_local(m, &t).expect("commit"), 4);
    assert_eq!(s.ino_of(&ga).expect("ino"), None);
    assert!(s.object(&ga).expect("o").expect("tombstone").deleted);
}

#[test]
fn a_batch_commit_numbers_its_versions_in_order_and_clears_only_their_current_marks() {
    let (_d, s) = fresh();
    s.attach_device(DEV).expect("attach");
    let files: Vec<Ino> = (0..5)
        .map(|i| file_with(&s, ROOT, &format!("f{i}"), &[i as u8]))
        .collect();
    let taken = s.take_dirty(100).expect("take");
    // f4 changes again after it was taken: its newer mark must stay.
    s.fsync(files[4], false).expect("fsync");
    let mut batch = Vec::new();
    for (i, &ino) in files.iter().enumerate() {
        let mark = *taken.iter().find(|m| m.ino == ino).expect("marked");
        let name = format!("f{i}");
        let mut rec = remote_file(s.gid_of(ino).expect("gid"), Gid::ROOT, &name, &[i as u8], 1);
        rec.modified_by = DEV;
        batch.push((mark, rec));
    }
    let mut seqs = s.seq_watch();
    assert_eq!(s.commit_local_batch(&[]).expect("empty batch"), 0);
    assert_eq!(s.commit_local_batch(&batch).expect("commit"), 5);
    assert_eq!(*seqs.borrow_and_update(), 5);
    let log = s.changes_since(0, 10).expect("log");
    assert_eq!(
        log.iter().map(|(q, r)| (*q, r.gid)).collect::<Vec<_>>(),
        files
            .iter()
            .zip(1..)
            .map(|(&ino, q)| (q, s.gid_of(ino).expect("gid")))
            .collect::<Vec<_>>(),
        "one entry per version, numbered in the batch's order"
    );
    let left = marks(&s);
    assert!(left.contains(&files[4]), "the newer mark of f4 stays");
    for ino in &files[..4] {
        assert!(!left.contains(ino), "{ino} was versioned");
    }
    // A version of one of them later moves it to the end of the log.
    let m = DirtyMark {
        ino: files[0],
        mark: 0,
    };
    let mut rec = batch[0].1.clone();
    rec.vv = vv(2);
    assert_eq!(s.commit_local_batch(&[(m, rec)]).expect("commit"), 6);
    let log = s.changes_since(0, 10).expect("log");
    assert_eq!(log.len(), 5, "each object once");
    assert_eq!(
        log.last().map(|(q, r)| (*q, r.gid)),
        Some((6, s.gid_of(files[0]).expect("gid")))
    );
}

#[test]
fn a_remote_file_arrives_partial_fills_verified_and_serves_its_chunks() {
    let (d, s) = fresh();
    let content = bytes(2 * CHUNK_SIZE as usize + 100, 7);
    let gid = Gid::new(PEER, 77);
    let rec = remote_file(gid, Gid::ROOT, "remote", &content, 1);
    let before = s.local_seq();
    let applied = s.apply_remote(&rec, None).expect("apply");
    let ino = applied.ino.expect("ino");
    assert!(applied.partial);
    assert_eq!(applied.seq, before + 1);
    // The new inode counts as changed by a peer too (see
    // `commit_live`): its name and the inode.
    assert_eq!(
        applied.invals,
        vec![
            Inval::Entry {
                parent: ROOT,
                name: n("remote")
            },
            Inval::Inode { ino }
        ]
    );
    assert_eq!(s.dirty_count(), 0, "nothing marked dirty");
    assert_eq!(s.changes_since(before, 10).expect("log")[0].1, rec);
    let attr = s.lookup(ROOT, &n("remote")).expect("lookup");
    assert_eq!(
        (attr.size, attr.mtime, attr.perm),
        (rec.size, rec.mtime, 0o640)
    );
    assert_eq!(
        (attr.uid, attr.gid),
        OWNER,
        "files from a peer belong to the share owner"
    );
    // Open answers what is missing.
    let f = s.open(ino, libc::O_RDONLY, CONN).expect("open");
    let p = f.opened.partial.clone().expect("partial");
    assert_eq!((p.chunk_size, p.size), (CHUNK_SIZE, rec.size));
    assert!(p.present.iter().all(|w| *w == 0));
    assert_eq!(s.handle_version(f.opened.handle), Some((ino, 0)));
    s.release(f.opened.handle).expect("release");
    // Nothing to serve yet.
    assert_eq!(s.read_chunk(&gid, 0, &rec.chunks[0]).expect("read"), None);
    assert_eq!(fill_chunk(&s, ino, &content, 1), vec![0b10]);
    assert_eq!(
        s.getattr(ino).expect("getattr").mtime,
        rec.mtime,
        "a fill leaves the version's mtime"
    );
    assert_eq!(
        s.read_chunk(&gid, 1, &rec.chunks[1])
            .expect("read")
            .as_deref(),
        Some(&content[CHUNK_SIZE as usize..2 * CHUNK_SIZE as usize])
    );
    assert_eq!(
        s.read_chunk(&gid, 1, &rec.chunks[0]).expect("read"),
        None,
        "other hash"
    );
    assert_eq!(s.partial_files(10).expect("partial").len(), 1);
    assert_eq!(s.path_of(ino).expect("path"), "/remote");
    fill_chunk(&s, ino, &content, 0);
    assert_eq!(
        fill_chunk(&s, ino, &content, 2),
        Vec::<u64>::new(),
        "complete"
    );
    assert!(s.presence(ino).expect("presence").is_none());
    assert!(
        s.open(ino, libc::O_RDONLY, CONN)
            .expect("open")
            .opened
            .partial
            .is_none()
    );
    assert_eq!(read_all(&s, ino), content);
    assert_eq!(
        s.mark_present(ino, 5, 0).expect("complete already"),
        Vec::<u64>::new()
    );
    let _ = d;
}

#[test]
fn a_settled_file_serves_its_recorded_chunks_without_hashing_and_a_changing_one_hashes_them() {
    let (d, s) = fresh();
    let content = bytes(3 * CHUNK_SIZE as usize + 100, 9);
    let gid = Gid::new(PEER, 78);
    let rec = remote_file(gid, Gid::ROOT, "served", &content, 1);
    let ino = s.apply_remote(&rec, None).expect("apply").ino.expect("ino");
    for i in 0..4 {
        fill_chunk(&s, ino, &content, i);
    }
    assert!(s.presence(ino).expect("presence").is_none(), "complete");
    // The recorded hash of each chunk, read from the encoded record.
    for (i, h) in rec.chunks.iter().enumerate() {
        let (head, hash) = s
            .object_chunk(&gid, i as u64)
            .expect("read")
            .expect("record");
        assert_eq!((head.size, hash), (rec.size, Some(*h)), "chunk {i}");
    }
    assert_eq!(
        s.object_chunk(&gid, 4).expect("read").expect("record").1,
        None
    );
    assert_eq!(s.object_chunk(&Gid::new(PEER, 99), 0).expect("read"), None);
    let chunk = |i: usize| {
        content[i * CHUNK_SIZE as usize..((i + 1) * CHUNK_SIZE as usize).min(content.len())]
            .to_vec()
    };
    assert_eq!(
        s.read_chunk(&gid, 3, &rec.chunks[3]).expect("read"),
        Some(chunk(3))
    );
    assert_eq!(
        s.read_chunk(&gid, 1, &rec.chunks[0]).expect("read"),
        None,
        "not the recorded hash"
    );
    // Bytes changed behind the store's back (a failing disk): a settled
    // file serves them unhashed, and the asking side's check refuses them.
    let generation = s
        .read_inode(ino.0)
        .expect("read")
        .expect("inode")
        .generation;
    let f = s.open_for_fill(ino, generation).expect("open");
    f.write_all_at(b"rot", 10).expect("write");
    let served = s
        .read_chunk(&gid, 0, &rec.chunks[0])
        .expect("read")
        .expect("served");
    assert_ne!(ChunkHash::of(&served), rec.chunks[0]);
    // A file that may have changed since its version is hashed: marked
    // dirty, ...
    s.mark_dirty(ino.0).expect("mark");
    assert_eq!(s.read_chunk(&gid, 0, &rec.chunks[0]).expect("read"), None);
    assert_eq!(
        s.read_chunk(&gid, 1, &rec.chunks[1]).expect("read"),
        Some(chunk(1))
    );
    clear_all(&s);
    assert!(
        s.read_chunk(&gid, 0, &rec.chunks[0])
            .expect("read")
            .is_some()
    );
    // ... or open for writing.
    let w = s.open(ino, libc::O_RDWR, CONN).expect("open");
    assert_eq!(s.read_chunk(&gid, 0, &rec.chunks[0]).expect("read"), None);
    assert_eq!(
        s.read_chunk(&gid, 2, &rec.chunks[2]).expect("read"),
        Some(chunk(2))
    );
    s.release(w.opened.handle).expect("release");
    let _ = d;
}

#[test]
fn a_new_version_is_a_new_generation_seeded_from_the_old_and_kept_for_open_handles() {
    let (_d, s) = fresh();
    let v1 = bytes(3 * CHUNK_SIZE as usize, 1);
    let gid = Gid::new(PEER, 5);
    let rec1 = remote_file(gid, Gid::ROOT, "f", &v1, 1);
    let ino = s
        .apply_remote(&rec1, None)
        .expect("apply")
        .ino
        .expect("ino");
    for i in 0..3 {
        fill_chunk(&s, ino, &v1, i);
    }
    let reader = s.open(ino, libc::O_RDONLY, CONN).expect("open v1");
    // Version 2 changes the middle chunk only.
    let mut v2 = v1.clone();
    v2[CHUNK_SIZE as usize + 10] ^= 0xff;
    let rec2 = remote_file(gid, Gid::ROOT, "f", &v2, 2);
    let applied = s.apply_remote(&rec2, None).expect("apply v2");
    assert_eq!(applied.invals, vec![Inval::Inode { ino }]);
    let p = s.presence(ino).expect("p").expect("partial");
    assert_eq!(
        (p.generation, p.present.clone()),
        (1, vec![0b101]),
        "chunks 0 and 2 copied"
    );
    assert!(s.content.path_gen(ino.0, 0).exists(), "kept while open");
    assert_eq!(s.handle_version(reader.opened.handle), Some((ino, 0)));
    // The open handle still reads version 1.
    let mut old = vec![0u8; v1.len()];
    std::fs::File::from(reader.fd)
        .read_exact_at(&mut old, 0)
        .expect("read");
    assert_eq!(old, v1);
    let fresh_open = s.open(ino, libc::O_RDONLY, CONN).expect("open v2");
    assert_eq!(s.handle_version(fresh_open.opened.handle), Some((ino, 1)));
    s.release(fresh_open.opened.handle).expect("release");
    s.release(reader.opened.handle).expect("release v1");
    s.settle();
    assert!(
        !s.content.path_gen(ino.0, 0).exists(),
        "removed at its last release"
    );
    fill_chunk(&s, ino, &v2, 1);
    assert_eq!(read_all(&s, ino), v2);
    // Version 3: only the mtime changes: no new generation.
    let mut rec3 = rec2.clone();
    rec3.vv = vv(3);
    rec3.mtime = ts(1_800_000_000);
    s.apply_remote(&rec3, None).expect("apply v3");
    let a = s.getattr(ino).expect("getattr");
    assert_eq!((a.mtime, a.size), (rec3.mtime, v2.len() as u64));
    assert_eq!(
        s.read_inode(ino.0).expect("r").expect("inode").generation,
        1
    );
    // Not open: version 4's switch removes generation 1 at once.
    let rec4 = remote_file(gid, Gid::ROOT, "f", b"short", 4);
    assert!(
        s.apply_remote(&rec4, None).expect("v4").partial,
        "no chunk in common"
    );
    s.settle();
    assert!(!s.content.path_gen(ino.0, 1).exists());
}

#[test]
fn a_seed_names_other_local_content() {
    let (_d, s) = fresh();
    let body = bytes(CHUNK_SIZE as usize + 9, 3);
    let local = file_with(&s, ROOT, "local", &body);
    let rec = remote_file(Gid::new(PEER, 9), Gid::ROOT, "copy", &body, 1);
    let applied = s
        .apply_remote(
            &rec,
            Some(Seed {
                ino: local,
                generation: 0,
            }),
        )
        .expect("apply");
    assert!(!applied.partial, "every chunk copied and verified");
    assert_eq!(read_all(&s, applied.ino.expect("ino")), body);
}

#[test]
fn a_partial_file_fills_from_local_content_with_the_same_chunks() {
    let (_d, s) = fresh();
    let body = bytes(2 * CHUNK_SIZE as usize + 3, 5);
    let local = file_with(&s, ROOT, "mine", &body);
    let mut other = body.clone();
    other[5] ^= 1;
    // A copy of another version: chunk 0 differs, 1 and 2 are the same.
    let rec = remote_file(Gid::new(PEER, 8), Gid::ROOT, "copy", &other, 1);
    let ino = s.apply_remote(&rec, None).expect("apply").ino.expect("ino");
    assert_eq!(
        s.presence(ino).expect("p").expect("partial").present,
        Vec::<u64>::new()
    );
    let after = s
        .fill_from(
            ino,
            Seed {
                ino: local,
                generation: 0,
            },
        )
        .expect("fill");
    assert_eq!(after, vec![0b110]);
    assert_eq!(
        s.read_chunk(&rec.gid, 2, &rec.chunks[2])
            .expect("read")
            .as_deref(),
        Some(&other[2 * CHUNK_SIZE as usize..])
    );
    assert_eq!(
        s.read_chunk(&rec.gid, 0, &rec.chunks[0]).expect("read"),
        None
    );
    assert_eq!(
        s.fill_from(local, Seed { ino, generation: 0 })
            .expect("complete file"),
        Vec::<u64>::new()
    );
}

#[test]
fn directories_symlinks_moves_links_and_tombstones_apply() {
    let (_d, s) = fresh();
    let dg = Gid::new(PEER, 1);
    let d = s
        .apply_remote(&remote_dir(dg, Gid::ROOT, "d"), None)
        .expect("dir")
        .ino
        .expect("ino");
    let a = s.getattr(d).expect("getattr");
    assert_eq!(
        (a.kind, a.perm, a.mtime),
        (FileKind::Directory, 0o750, ts(1_600_000_000))
    );
    let sg = Gid::new(PEER, 2);
    let link = ObjRec {
        gid: sg,
        vv: vv(1),
        modified_by: PEER,
        deleted: false,
        kind: FileKind::Symlink,
        names: vec![EntryName {
            parent: dg,
            name: b"s".to_vec(),
        }],
        perm: 0o777,
        mtime: ts(5),
        size: 6,
        chunks: Vec::new(),
        target: b"../../".to_vec(),
    };
    let si = s
        .apply_remote(&link, None)
        .expect("symlink")
        .ino
        .expect("ino");
    assert_eq!(s.readlink(si).expect("readlink"), b"../../");
    // A file with two names, then moved and unlinked from one.
    let fg = Gid::new(PEER, 3);
    let mut f = remote_file(fg, dg, "f", b"", 1);
    f.names.push(EntryName {
        parent: Gid::ROOT,
        name: b"hard".to_vec(),
    });
    f.names.sort();
    let fi = s.apply_remote(&f, None).expect("file").ino.expect("ino");
    assert_eq!(s.getattr(fi).expect("getattr").nlink, 2);
    assert_eq!(s.lookup(ROOT, &n("hard")).expect("lookup").ino, fi);
    let mut moved = remote_file(fg, Gid::ROOT, "renamed", b"", 2);
    moved.names.sort();
    let applied = s.apply_remote(&moved, None).expect("move");
    assert_eq!(applied.ino, Some(fi));
    assert_eq!(s.getattr(fi).expect("getattr").nlink, 1);
    assert!(applied.invals.contains(&Inval::Entry {
        parent: d,
        name: n("f")
    }));
    assert!(applied.invals.contains(&Inval::Entry {
        parent: ROOT,
        name: n("renamed")
    }));
    assert_eq!(errno(s.lookup(ROOT, &n("hard"))), libc::ENOENT);
    // A directory rename keeps the inode and the counts.
    let mut dr = remote_dir(dg, Gid::ROOT, "d2");
    dr.vv = vv(2);
    assert_eq!(s.apply_remote(&dr, None).expect("rename dir").ino, Some(d));
    assert_eq!(s.lookup(ROOT, &n("d2")).expect("lookup").ino, d);
    assert_eq!(s.path_of(si).expect("path"), "/d2/s");
    // Tombstones: a non-empty directory refuses, then goes once empty.
    assert!(matches!(
        s.apply_remote(&tombstone(&dr), None),
        Err(ApplyError::NotEmpty)
    ));
    let gone = s.apply_remote(&tombstone(&link), None).expect("rm symlink");
    assert_eq!(gone.ino, None);
    assert_eq!(errno(s.readlink(si)), libc::ENOENT);
    s.apply_remote(&tombstone(&dr), None).expect("rmdir");
    assert_eq!(errno(s.lookup(ROOT, &n("d2"))), libc::ENOENT);
    assert_eq!(s.ino_of(&dg).expect("ino"), None);
    // A tombstone of something never seen is recorded.
    let ghost = tombstone(&remote_file(Gid::new(PEER, 99), Gid::ROOT, "g", b"", 1));
    s.apply_remote(&ghost, None).expect("ghost");
    assert!(s.object(&ghost.gid).expect("o").expect("rec").deleted);
    let report = s.check(false).expect("check");
    assert!(report.findings.is_empty(), "{:?}", report.findings);
}

fn errno<T: std::fmt::Debug>(r: Result<T, FsError>) -> i32 {
    r.expect_err("expected an error").errno
}

#[test]
fn hostile_and_malformed_records_are_refused_and_change_nothing() {
    let (d, s) = fresh();
    let before = s.local_seq();
    let listing = |s: &Store| {
        s.readdir(ROOT, ipc_schema::DirCookie(0), 100, false)
            .expect("readdir")
            .len()
    };
    let entries = listing(&s);
    let ok = remote_file(Gid::new(PEER, 1), Gid::ROOT, "ok", b"abc", 1);
    let long = "x".repeat(300);
    for name in ["../x", "a/b", ".", "..", "", "nul\0x", long.as_str()] {
        let mut r = ok.clone();
        r.names[0].name = name.as_bytes().to_vec();
        assert!(
            matches!(s.apply_remote(&r, None), Err(ApplyError::Invalid(_))),
            "{name:?}"
        );
    }
    let mut r = ok.clone();
    r.chunks.push(r.chunks[0]);
    assert!(
        matches!(s.apply_remote(&r, None), Err(ApplyError::Invalid(_))),
        "chunk count"
    );
    let mut r = ok.clone();
    r.names.push(r.names[0].clone());
    assert!(
        matches!(s.apply_remote(&r, None), Err(ApplyError::Invalid(_))),
        "duplicate"
    );
    let mut r = remote_dir(Gid::new(PEER, 2), Gid::ROOT, "d");
    r.names.push(EntryName {
        parent: Gid::ROOT,
        name: b"e".to_vec(),
    });
    assert!(
        matches!(s.apply_remote(&r, None), Err(ApplyError::Invalid(_))),
        "two dir names"
    );
    let mut r = ok.clone();
    r.kind = FileKind::Fifo;
    assert!(
        matches!(s.apply_remote(&r, None), Err(ApplyError::Invalid(_))),
        "fifo"
    );
    let mut r = ok.clone();
    r.kind = FileKind::Symlink;
    r.chunks.clear();
    r.target = vec![b'a'; 5000];
    r.size = 5000;
    assert!(
        matches!(s.apply_remote(&r, None), Err(ApplyError::Invalid(_))),
        "long target"
    );
    let mut root = remote_dir(Gid::ROOT, Gid::ROOT, "x");
    assert!(
        matches!(s.apply_remote(&root, None), Err(ApplyError::Invalid(_))),
        "named root"
    );
    root.names.clear();
    assert!(
        matches!(
            s.apply_remote(&tombstone(&root), None),
            Err(ApplyError::Invalid(_))
        ),
        "root deleted"
    );
    assert_eq!(s.local_seq(), before, "nothing recorded");
    assert_eq!(listing(&s), entries, "nothing made");
    // A parent nobody knows; then a directory moved under itself.
    let orphan = remote_file(Gid::new(PEER, 3), Gid::new(PEER, 42), "f", b"", 1);
    assert!(matches!(
        s.apply_remote(&orphan, None),
        Err(ApplyError::MissingParent(g)) if g == Gid::new(PEER, 42)
    ));
    let a = remote_dir(Gid::new(PEER, 10), Gid::ROOT, "a");
    let b = remote_dir(Gid::new(PEER, 11), a.gid, "b");
    s.apply_remote(&a, None).expect("a");
    s.apply_remote(&b, None).expect("b");
    let mut cyc = remote_dir(a.gid, b.gid, "a");
    cyc.vv = vv(2);
    assert!(
        matches!(s.apply_remote(&cyc, None), Err(ApplyError::Invalid(_))),
        "cycle"
    );
    // A kind change of a known object.
    let mut kind = remote_file(a.gid, Gid::ROOT, "a", b"", 3);
    kind.vv = vv(3);
    assert!(
        matches!(s.apply_remote(&kind, None), Err(ApplyError::Invalid(_))),
        "kind"
    );
    let report = s.check(false).expect("check");
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    let content_files = std::fs::read_dir(d.path().join("content"))
        .expect("ls")
        .count();
    assert!(
        content_files <= 16,
        "no stray content files: {content_files}"
    );
}

#[test]
fn collisions_and_busy_objects_are_refused() {
    let (_d, s) = fresh();
    let mine = file_with(&s, ROOT, "same", b"mine");
    let theirs = remote_file(Gid::new(PEER, 1), Gid::ROOT, "same", b"theirs", 1);
    match s.apply_remote(&theirs, None) {
        Err(ApplyError::Collision { at, existing }) => {
            assert_eq!(at.name, b"same");
            assert_eq!(existing, Gid::new(DEV, mine.0));
        }
        other => panic!("expected a collision: {other:?}"),
    }
    assert_eq!(s.lookup(ROOT, &n("same")).expect("lookup").ino, mine);
    // A remote object changed locally and not yet versioned: Busy.
    let r = remote_file(Gid::new(PEER, 2), Gid::ROOT, "r", b"one", 1);
    let ino = s.apply_remote(&r, None).expect("apply").ino.expect("ino");
    fill_chunk(&s, ino, b"one", 0);
    clear_all(&s);
    s.setattr(
        ino,
        &SetAttr {
            perm: Some(0o600),
            ..SetAttr::default()
        },
    )
    .expect("chmod");
    let r2 = remote_file(r.gid, Gid::ROOT, "r", b"two", 2);
    assert!(matches!(s.apply_remote(&r2, None), Err(ApplyError::Busy)));
    clear_all(&s);
    let w = s.open(ino, libc::O_WRONLY, CONN).expect("open for writing");
    assert!(
        matches!(s.apply_remote(&r2, None), Err(ApplyError::Busy)),
        "open for writing"
    );
    s.release(w.opened.handle).expect("release");
    clear_all(&s);
    s.apply_remote(&r2, None).expect("applies after");
}

#[test]
fn truncating_a_partial_file_needs_no_fetch() {
    let (_d, s) = fresh();
    let content = bytes(4 * CHUNK_SIZE as usize, 9);
    let rec = remote_file(Gid::new(PEER, 1), Gid::ROOT, "big", &content, 1);
    let ino = s.apply_remote(&rec, None).expect("apply").ino.expect("ino");
    fill_chunk(&s, ino, &content, 0);
    s.setattr(
        ino,
        &SetAttr {
            size: Some(CHUNK_SIZE + 5),
            ..SetAttr::default()
        },
    )
    .expect("truncate");
    let p = s.presence(ino).expect("p").expect("still partial: chunk 1");
    assert_eq!(p.limit, CHUNK_SIZE + 5);
    let f = s.open(ino, libc::O_RDWR, CONN).expect("open");
    assert_eq!(
        f.opened.partial.as_ref().map(|p| p.size),
        Some(CHUNK_SIZE + 5)
    );
    s.release(f.opened.handle).expect("release");
    s.setattr(
        ino,
        &SetAttr {
            size: Some(CHUNK_SIZE),
            ..SetAttr::default()
        },
    )
    .expect("truncate to one chunk");
    assert!(
        s.presence(ino).expect("p").is_none(),
        "chunk 0 is all that is left"
    );
    // O_TRUNC of another partial file makes it complete.
    let rec = remote_file(Gid::new(PEER, 2), Gid::ROOT, "other", &content, 1);
    let other = s.apply_remote(&rec, None).expect("apply").ino.expect("ino");
    let f = s
        .open(other, libc::O_WRONLY | libc::O_TRUNC, CONN)
        .expect("open O_TRUNC");
    assert!(f.opened.partial.is_none());
    assert_eq!(f.opened.attr.size, 0);
    assert!(s.presence(other).expect("p").is_none());
    s.release(f.opened.handle).expect("release");
}

#[test]
fn start_up_clears_bits_of_chunks_that_do_not_verify_and_removes_old_generations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = bytes(3 * CHUNK_SIZE as usize, 4);
    let ino = {
        let s = Store::load(dir.path(), OWNER).expect("store");
        s.attach_device(DEV).expect("attach");
        s.connect(CONN);
        let rec = remote_file(Gid::new(PEER, 1), Gid::ROOT, "f", &content, 1);
        let ino = s.apply_remote(&rec, None).expect("apply").ino.expect("ino");
        fill_chunk(&s, ino, &content, 0);
        fill_chunk(&s, ino, &content, 1);
        // A power cut lost chunk 1's bytes but kept its bit.
        let f = s.open_for_fill(ino, 0).expect("open");
        f.write_all_at(&[0u8; 100], CHUNK_SIZE + 7).expect("damage");
        // A crash left an old generation behind.
        s.content
            .create_gen(ino.0, 7, nix::fcntl::OFlag::O_WRONLY)
            .expect("stray generation");
        s.flush().expect("flush");
        ino
    };
    let s = reopen(dir.path());
    let p = s.presence(ino).expect("p").expect("partial");
    assert_eq!(p.present, vec![0b1], "chunk 1 marked missing again");
    assert!(!s.content.path_gen(ino.0, 7).exists());
    assert!(
        s.check(false)
            .expect("check")
            .recovered_at_start
            .iter()
            .any(|f| f.detail.contains("did not verify"))
    );
}

#[test]
fn a_format_2_store_migrates_with_links_and_generation_zero() {
    use super::records::{InodeRecV2, META_FORMAT, cookie_key, dirent_key, encode, ino_key};
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .expect("sled");
        let inodes = db.open_tree("inodes").expect("tree");
        let dirents = db.open_tree("dirents").expect("tree");
        let cookies = db.open_tree("cookies").expect("tree");
        let meta = db.open_tree("meta").expect("tree");
        let now = ts(1000);
        let v2 = |kind, nlink, entries| InodeRecV2 {
            kind,
            perm: 0o755,
            uid: 7,
            gid: 8,
            nlink,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            target: Vec::new(),
            parent: 1,
            entries,
            next_cookie: 3 + entries,
            rdev: 0,
        };
        inodes
            .insert(ino_key(1), encode(&v2(FileKind::Directory, 2, 2)))
            .expect("root");
        inodes
            .insert(ino_key(3), encode(&v2(FileKind::File, 2, 0)))
            .expect("file");
        for (cookie, name) in [(3u64, "a"), (4, "b")] {
            let d = records::DirentRec {
                ino: 3,
                kind: FileKind::File,
                cookie,
            };
            dirents
                .insert(dirent_key(1, name.as_bytes()), encode(&d))
                .expect("dirent");
            cookies
                .insert(cookie_key(1, cookie), name.as_bytes())
                .expect("cookie");
        }
        meta.insert("next_ino", &5u64.to_be_bytes()).expect("meta");
        meta.insert(META_FORMAT, &2u64.to_be_bytes()).expect("meta");
        db.flush().expect("flush");
        std::fs::create_dir_all(dir.path().join("content")).expect("mkdir");
        std::fs::write(dir.path().join("content/0000000000000003"), b"kept").expect("content");
    }
    let s = reopen(dir.path());
    s.attach_device(DEV).expect("attach");
    assert_eq!(s.getattr(Ino(3)).expect("getattr").size, 4);
    let lo = s.local_object(Ino(3)).expect("local");
    let names: Vec<&[u8]> = lo
        .now
        .as_ref()
        .expect("live")
        .names
        .iter()
        .map(|n| n.name.as_slice())
        .collect();
    assert_eq!(names, vec![&b"a"[..], &b"b"[..]]);
    assert_eq!(marks(&s), vec![Ino(3)]);
    assert!(s.check(false).expect("check").findings.is_empty());
}

fn reopen(dir: &std::path::Path) -> Store {
    super::test_support::reopen(dir, OWNER)
}

/// A file `name` in `parent` with `bytes`, closed.
fn file_with(s: &Store, parent: Ino, name: &str, bytes: &[u8]) -> Ino {
    super::test_support::file_with(s, parent, name, bytes, ME, CONN)
}

/// The raw value of `ino` in tree `tree`.
fn raw(tree: &sled::Tree, ino: Ino) -> Option<sled::IVec> {
    tree.get(super::records::ino_key(ino.0)).expect("read tree")
}

#[test]
fn marking_a_chunk_present_rewrites_the_small_bits_not_the_record_of_hashes() {
    let (_d, s) = fresh();
    let content = bytes(3 * CHUNK_SIZE as usize, 11);
    let rec = remote_file(Gid::new(PEER, 9), Gid::ROOT, "f", &content, 1);
    let ino = s.apply_remote(&rec, None).expect("apply").ino.expect("ino");
    let record = raw(&s.idx.presence, ino).expect("a presence record");
    assert!(raw(&s.idx.present_bits, ino).is_none(), "no bits yet");
    assert_eq!(fill_chunk(&s, ino, &content, 1), vec![0b10]);
    assert_eq!(
        raw(&s.idx.presence, ino).expect("record kept"),
        record,
        "the record of hashes is not rewritten"
    );
    let bits = raw(&s.idx.present_bits, ino).expect("bits written");
    assert!(bits.len() < record.len(), "{} bytes", bits.len());
    let p = s.presence(ino).expect("presence").expect("partial");
    assert_eq!(
        (p.present.clone(), p.chunks),
        (vec![0b10], rec.chunks.clone())
    );
    // Complete: the record and the bits go together.
    fill_chunk(&s, ino, &content, 0);
    assert_eq!(fill_chunk(&s, ino, &content, 2), Vec::<u64>::new());
    assert!(raw(&s.idx.presence, ino).is_none());
    assert!(raw(&s.idx.present_bits, ino).is_none());
    assert_eq!(read_all(&s, ino), content);
}

#[test]
fn presence_survives_a_restart_and_a_store_with_bits_only_in_its_records_reads_as_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let content = bytes(4 * CHUNK_SIZE as usize, 12);
    let (a, b) = {
        let s = Store::load(dir.path(), OWNER).expect("store");
        s.attach_device(DEV).expect("attach");
        s.connect(CONN);
        let rec_a = remote_file(Gid::new(PEER, 1), Gid::ROOT, "a", &content, 1);
        let a = s
            .apply_remote(&rec_a, None)
            .expect("apply")
            .ino
            .expect("ino");
        fill_chunk(&s, a, &content, 0);
        fill_chunk(&s, a, &content, 2);
        // `b` as a store written before `present_bits` existed leaves it:
        // chunk 3's bit in the record, no bits value.
        let rec_b = remote_file(Gid::new(PEER, 2), Gid::ROOT, "b", &content, 1);
        let b = s
            .apply_remote(&rec_b, None)
            .expect("apply")
            .ino
            .expect("ino");
        fill_chunk(&s, b, &content, 3);
        let mut old = s.presence(b).expect("p").expect("partial");
        assert_eq!(old.present, vec![0b1000]);
        old.present = vec![0b1000];
        s.idx
            .presence
            .insert(super::records::ino_key(b.0), super::objects::enc(&old))
            .expect("old record");
        s.idx
            .present_bits
            .remove(super::records::ino_key(b.0))
            .expect("no bits");
        s.flush().expect("flush");
        (a, b)
    };
    let s = reopen(dir.path());
    assert_eq!(
        s.presence(a).expect("p").expect("partial").present,
        vec![0b101]
    );
    assert_eq!(
        s.presence(b).expect("p").expect("partial").present,
        vec![0b1000],
        "a record without bits reads as it was"
    );
    // The old record goes on: the next marks make its bits from it.
    for i in 0..3 {
        fill_chunk(&s, b, &content, i);
    }
    assert!(s.presence(b).expect("p").is_none(), "complete");
    assert!(raw(&s.idx.present_bits, b).is_none());
    assert_eq!(read_all(&s, b), content);
}

#[test]
fn bits_of_an_older_version_of_the_file_never_count_for_the_new_one() {
    let (_d, s) = fresh();
    let v1 = bytes(3 * CHUNK_SIZE as usize, 21);
    let v2 = bytes(3 * CHUNK_SIZE as usize, 22);
    let gid = Gid::new(PEER, 4);
    let ino = s
        .apply_remote(&remote_file(gid, Gid::ROOT, "f", &v1, 1), None)
        .expect("apply")
        .ino
        .expect("ino");
    fill_chunk(&s, ino, &v1, 0);
    assert!(raw(&s.idx.present_bits, ino).is_some());
    s.apply_remote(&remote_file(gid, Gid::ROOT, "f", &v2, 2), None)
        .expect("apply v2");
    let p = s.presence(ino).expect("p").expect("partial");
    assert_eq!(p.generation, 1);
    assert!(p.present.iter().all(|w| *w == 0), "{:?}", p.present);
    let bits = s.presence_bits(ino).expect("bits").expect("partial");
    assert!(bits.present.iter().all(|w| *w == 0));
    assert_eq!(fill_chunk(&s, ino, &v2, 2), vec![0b100]);
}

#[test]
fn start_up_hashes_again_only_the_chunks_marked_since_the_last_sync() {
    use super::presence::SYNC_BATCH;
    let dir = tempfile::tempdir().expect("tempdir");
    let chunks = u64::from(SYNC_BATCH) + 2;
    let content = bytes((chunks * CHUNK_SIZE) as usize, 31);
    let ino = {
        let s = Store::load(dir.path(), OWNER).expect("store");
        s.attach_device(DEV).expect("attach");
        s.connect(CONN);
        let rec = remote_file(Gid::new(PEER, 3), Gid::ROOT, "f", &content, 1);
        let ino = s.apply_remote(&rec, None).expect("apply").ino.expect("ino");
        for i in 0..=u64::from(SYNC_BATCH) {
            fill_chunk(&s, ino, &content, i);
        }
        let b = s.presence_bits(ino).expect("bits").expect("partial");
        assert_eq!(b.unsynced(), 1, "the first batch was synced");
        // Damage one synced chunk and the unsynced one: only the latter
        // is hashed at start (the former's bytes were on disk before its
        // bit said so; damage after that is not a crash's doing).
        let f = s.open_for_fill(ino, 0).expect("open");
        f.write_all_at(&[0u8; 10], 3 * CHUNK_SIZE + 5)
            .expect("damage");
        f.write_all_at(&[0u8; 10], u64::from(SYNC_BATCH) * CHUNK_SIZE + 5)
            .expect("damage");
        s.flush().expect("flush");
        ino
    };
    let s = reopen(dir.path());
    let b = s.presence_bits(ino).expect("bits").expect("partial");
    let last = u64::from(SYNC_BATCH);
    assert!(
        !super::objects::bit(&b.present, last),
        "re-hashed and cleared"
    );
    assert!(
        (0..last).all(|i| super::objects::bit(&b.present, i)),
        "synced chunks are not hashed again"
    );
    assert_eq!(b.unsynced(), 0, "what was checked is synced now");
}

#[test]
fn an_object_head_is_the_front_of_its_record() {
    let (_d, s) = fresh();
    let content = bytes(2 * CHUNK_SIZE as usize + 3, 41);
    let rec = remote_file(Gid::new(PEER, 8), Gid::ROOT, "h", &content, 3);
    s.apply_remote(&rec, None).expect("apply");
    let head = s.object_head(&rec.gid).expect("head").expect("present");
    assert_eq!(
        (head.gid, head.vv, head.modified_by, head.deleted, head.kind),
        (
            rec.gid,
            rec.vv.clone(),
            rec.modified_by,
            rec.deleted,
            rec.kind
        )
    );
    assert_eq!(
        (head.names, head.perm, head.mtime, head.size),
        (rec.names.clone(), rec.perm, rec.mtime, rec.size)
    );
    assert!(s.object_head(&Gid::new(PEER, 99)).expect("head").is_none());
}
