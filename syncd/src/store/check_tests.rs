//! Tests of crash recovery and consistency: stores broken on purpose, and
//! what the start-up scan, `check` and `check --repair` say and do; one
//! broken entry in a listing; device nodes; the format 1 → 2 migration;
//! inode number reservations.

use super::records::{
    DirentRec, InodeRecV1, META_CLEAN_STOP, cookie_key, dirent_key, encode, ino_key, xattr_key,
};
use super::*;
use crate::opens::ConnId;
use ipc_schema::{Caller, CheckKind, CheckReport, XattrSet};
use std::time::Duration;

const ROOT: Ino = Ino::ROOT;
const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
    pid: 1,
};
const CONN: ConnId = ConnId(1);

fn fresh() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::load(dir.path(), (0, 0)).expect("store");
    s.connect(CONN);
    (dir, s)
}

fn n(s: &str) -> Name {
    Name::from(s)
}

fn file(s: &Store, parent: Ino, name: &str) -> Ino {
    s.mknod(parent, &n(name), FileKind::File, 0o644, 0, ME)
        .expect("mknod")
        .ino
}

/// Every finding, as (kind, ino, repaired).
fn kinds(r: &CheckReport) -> Vec<(CheckKind, Option<u64>, bool)> {
    let mut v: Vec<_> = r
        .findings
        .iter()
        .map(|f| (f.kind, f.ino.map(|i| i.0), f.repaired))
        .collect();
    v.sort();
    v
}

fn check(s: &Store, repair: bool) -> CheckReport {
    s.check_with(repair, Duration::ZERO).expect("check")
}

#[test]
fn a_healthy_store_checks_clean() {
    let (_d, s) = fresh();
    let a = s.mkdir(ROOT, &n("a"), 0o755, ME).expect("mkdir").ino;
    let f = file(&s, a, "f");
    s.link(f, ROOT, &n("f2")).expect("link");
    s.symlink(ROOT, &n("l"), b"a/f", ME).expect("symlink");
    s.setxattr(f, &n("user.x"), b"1", XattrSet::Any)
        .expect("setxattr");
    let g = file(&s, ROOT, "g");
    s.unlink(ROOT, &n("g")).expect("unlink");
    let r = check(&s, false);
    assert_eq!(kinds(&r), vec![], "{r:?}");
    assert!(r.inodes >= 4 && r.entries >= 4 && r.content_files >= 1);
    assert_eq!(errno_of(s.getattr(g)), libc::ENOENT);
}

fn errno_of<T: std::fmt::Debug>(r: Result<T, FsError>) -> i32 {
    r.expect_err("expected an error").errno
}

#[test]
fn missing_content_is_reported_skipped_in_listings_and_recreated_by_repair() {
    let (_d, s) = fresh();
    let good = file(&s, ROOT, "good");
    let bad = file(&s, ROOT, "bad");
    let other = file(&s, ROOT, "other");
    s.content.remove(bad.0, 0).expect("break the store");
    // The listing serves every other entry.
    let listed: Vec<String> = s
        .readdir(ROOT, DirCookie(0), 100, true)
        .expect("readdirplus of a directory with one broken entry")
        .into_iter()
        .map(|e| String::from_utf8_lossy(e.name.as_bytes()).into_owned())
        .collect();
    assert_eq!(listed, vec![".", "..", "good", "other"]);
    assert_eq!(
        s.readdir(ROOT, DirCookie(0), 100, false)
            .expect("readdir")
            .len(),
        5,
        "a plain readdir still names it"
    );
    let e = s.lookup(ROOT, &n("bad")).expect_err("its own lookup fails");
    assert_eq!(e.errno, libc::EIO);
    assert!(e.message.contains("content file missing"), "{e}");
    assert!(s.lookup(ROOT, &n("good")).is_ok() && s.getattr(other).is_ok());

    let r = check(&s, false);
    assert_eq!(
        kinds(&r),
        vec![(CheckKind::MissingContent, Some(bad.0), false)]
    );
    assert_eq!(r.unrepaired(), 1);
    let r = check(&s, true);
    assert_eq!(
        kinds(&r),
        vec![(CheckKind::MissingContent, Some(bad.0), true)]
    );
    assert_eq!(r.unrepaired(), 0);
    assert_eq!(s.lookup(ROOT, &n("bad")).expect("repaired").size, 0);
    assert_eq!(kinds(&check(&s, false)), vec![]);
    assert!(s.getattr(good).is_ok());
}

#[test]
fn an_entry_without_its_inode_costs_only_itself_and_repair_removes_it() {
    let (_d, s) = fresh();
    let d = s.mkdir(ROOT, &n("d"), 0o755, ME).expect("mkdir").ino;
    let keep = file(&s, d, "keep");
    let gone = file(&s, d, "gone");
    let sub = s.mkdir(d, &n("sub"), 0o755, ME).expect("mkdir").ino;
    s.inodes.remove(ino_key(gone.0)).expect("break the store");
    s.inodes.remove(ino_key(sub.0)).expect("break the store");
    let listed = s.readdir(d, DirCookie(0), 100, true).expect("readdirplus");
    assert_eq!(listed.len(), 3, "., .. and keep: {listed:?}");
    let e = s
        .lookup(d, &n("gone"))
        .expect_err("lookup of the broken entry");
    assert_eq!(e.errno, libc::EIO, "{e}");
    assert!(s.lookup(d, &n("keep")).is_ok());

    let r = check(&s, false);
    assert_eq!(
        kinds(&r),
        vec![
            (CheckKind::UnreferencedContent, Some(gone.0), false),
            (CheckKind::EntryWithoutInode, Some(gone.0), false),
            (CheckKind::EntryWithoutInode, Some(sub.0), false),
        ]
    );
    let r = check(&s, true);
    assert_eq!(r.unrepaired(), 0, "{r:?}");
    assert_eq!(kinds(&check(&s, false)), vec![]);
    assert_eq!(errno_of(s.lookup(d, &n("gone"))), libc::ENOENT);
    let dir = s.getattr(d).expect("getattr");
    assert_eq!(dir.nlink, 2, "the removed subdirectory no longer counts");
    assert!(s.getattr(keep).is_ok());
    s.rmdir(ROOT, &n("d")).expect_err("d still holds keep");
    s.unlink(d, &n("keep")).expect("unlink");
    s.rmdir(ROOT, &n("d"))
        .expect("empty after the repair: the counts are right");
}

#[test]
fn link_counts_directory_counts_and_cookies_are_checked_and_repaired() {
    let (_d, s) = fresh();
    let d = s.mkdir(ROOT, &n("d"), 0o755, ME).expect("mkdir").ino;
    let f = file(&s, d, "f");
    let _g = file(&s, d, "g");
    // Wrong link count.
    s.update_inode(f.0, |r| r.nlink = 5).expect("break nlink");
    // Wrong directory counts.
    s.update_inode(d.0, |r| {
        r.entries = 9;
        r.nlink = 7;
    })
    .expect("break counts");
    // A stray cookie, and an entry whose cookie is gone.
    s.cookies
        .insert(cookie_key(d.0, 1000), &b"nothing"[..])
        .expect("stray cookie");
    let dg: DirentRec = records::decode(
        &s.dirents
            .get(dirent_key(d.0, b"g"))
            .expect("get")
            .expect("entry g"),
    )
    .expect("decode");
    s.cookies
        .remove(cookie_key(d.0, dg.cookie))
        .expect("drop g's cookie");
    let r = check(&s, false);
    let found: Vec<CheckKind> = kinds(&r).into_iter().map(|k| k.0).collect();
    assert_eq!(
        found,
        vec![
            CheckKind::LinkCount,
            CheckKind::DirectoryCounts,
            CheckKind::Cookie,
            CheckKind::Cookie,
        ]
    );
    let r = check(&s, true);
    assert_eq!(r.unrepaired(), 0, "{r:?}");
    assert!(r.findings.iter().all(|f| f.repaired));
    assert_eq!(kinds(&check(&s, false)), vec![]);
    assert_eq!(s.getattr(f).expect("getattr").nlink, 1);
    let names: Vec<_> = s
        .readdir(d, DirCookie(0), 100, false)
        .expect("readdir")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![n("."), n(".."), n("f"), n("g")]);
}

#[test]
fn leftovers_of_freed_inodes_are_reported_and_removed() {
    let (_d, s) = fresh();
    // Content of an inode that was never committed, and xattrs of one
    // that is gone.
    s.content.create(999_999).expect("stray content file");
    s.xattrs
        .insert(xattr_key(888_888, b"user.a"), &b"v"[..])
        .expect("stray xattr");
    s.note_xattrs();
    let r = check(&s, false);
    assert_eq!(
        kinds(&r),
        vec![
            (CheckKind::UnreferencedContent, Some(999_999), false),
            (CheckKind::XattrsWithoutInode, Some(888_888), false),
        ]
    );
    // A content file changed a moment ago may be a create in flight: the
    // default check leaves it alone.
    assert_eq!(
        kinds(&s.check(false).expect("check")),
        vec![(CheckKind::XattrsWithoutInode, Some(888_888), false)]
    );
    let r = check(&s, true);
    assert_eq!(r.unrepaired(), 0, "{r:?}");
    assert!(s.content.stat(999_999, 0).is_err());
    assert_eq!(kinds(&check(&s, false)), vec![]);
}

#[test]
fn start_up_recreates_a_lost_content_file_and_removes_strays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (f, stray) = {
        let s = Store::load(dir.path(), (0, 0)).expect("store");
        let f = file(&s, ROOT, "f");
        s.flush().expect("flush");
        // As a power cut can leave it: the record durable, the content
        // file's directory entry not; plus an unreferenced file and the
        // xattrs of an inode that is gone.
        s.content.remove(f.0, 0).expect("lose the content file");
        s.content.create(777_777).expect("stray");
        s.xattrs
            .insert(xattr_key(666_666, b"user.a"), &b"v"[..])
            .expect("stray xattr");
        (f, 777_777)
    };
    let s = reopen(dir.path());
    let a = s.lookup(ROOT, &n("f")).expect("the name works again");
    assert_eq!((a.ino, a.size), (f, 0));
    assert!(s.content.stat(stray, 0).is_err(), "stray removed at start");
    assert!(s.xattrs.scan_prefix(ino_key(666_666)).next().is_none());
    let r = check(&s, false);
    assert_eq!(kinds(&r), vec![], "consistent after the start-up scan");
    assert_eq!(r.recovered_at_start.len(), 1);
    assert_eq!(r.recovered_at_start[0].kind, CheckKind::RecoveredAtStart);
    assert_eq!(r.recovered_at_start[0].ino, Some(f));
}

#[test]
fn freeing_leaves_the_content_to_the_reclaimer() {
    let (d, s) = fresh();
    let path = |ino: Ino| d.path().join("content").join(format!("{:016x}", ino.0));
    let f = file(&s, ROOT, "f");
    let g = file(&s, ROOT, "g");
    let h = file(&s, ROOT, "h");
    s.hold_reclaim(true);
    // Unlink, rename over, and an orphan's last release: none of them
    // removes the content file itself (a crash right after could roll the
    // store back to a state that names it).
    s.unlink(ROOT, &n("f")).expect("unlink");
    s.rename(
        ROOT,
        &n("g"),
        ROOT,
        &n("h"),
        ipc_schema::RenameFlags::default(),
    )
    .expect("rename over h");
    let o = s.open(g, libc::O_RDONLY, CONN).expect("open");
    s.unlink(ROOT, &n("h")).expect("unlink the open g");
    s.release(o.opened.handle).expect("last release");
    for ino in [f, g, h] {
        assert!(path(ino).exists(), "{ino} kept until the reclaimer runs");
        assert_eq!(errno_of(s.getattr(ino)), libc::ENOENT);
    }
    s.hold_reclaim(false);
    s.settle();
    for ino in [f, g, h] {
        assert!(!path(ino).exists(), "{ino} reclaimed");
    }
}

#[test]
fn after_reclaiming_the_store_on_disk_no_longer_names_the_file() {
    let (d, s) = fresh();
    let f = file(&s, ROOT, "f");
    let path = d.path().join("content").join(format!("{:016x}", f.0));
    s.unlink(ROOT, &n("f")).expect("unlink");
    s.settle();
    assert!(!path.exists(), "reclaimed once the unlink is durable");
    // The files on disk right now (a copy, as a crash would leave them)
    // no longer name the file.
    let copy = tempfile::tempdir().expect("tempdir");
    copy_dir(&d.path().join("db"), &copy.path().join("db"));
    std::fs::create_dir(copy.path().join("content")).expect("mkdir");
    let c = Store::load(copy.path(), (0, 0)).expect("load the copy");
    assert_eq!(errno_of(c.lookup(ROOT, &n("f"))), libc::ENOENT);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("readdir") {
        let e = e.expect("entry");
        let t = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).expect("copy");
        }
    }
}

#[test]
fn inode_numbers_are_reserved_durably_before_use() {
    let (d, s) = fresh();
    let mut seen = Vec::new();
    for i in 0..10 {
        seen.push(file(&s, ROOT, &format!("f{i}")).0);
    }
    // The files on disk now, as a kill -9 would leave them (nothing was
    // flushed on purpose): the reservation is there, so a store started
    // from them hands out numbers above every number handed out.
    let copy = tempfile::tempdir().expect("tempdir");
    copy_dir(&d.path().join("db"), &copy.path().join("db"));
    let c = Store::load(copy.path(), (0, 0)).expect("load the copy");
    let next = file(&c, ROOT, "new").0;
    let max = *seen.iter().max().expect("some");
    assert!(
        next > max,
        "new number {next} above every used one (max {max})"
    );
}

#[test]
fn device_nodes_keep_kind_and_rdev_across_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rdev_c = (1 << 8) | 3; // 1:3, /dev/null
    let rdev_b = (8 << 8) | 1; // 8:1
    let (c, b) = {
        let s = Store::load(dir.path(), (0, 0)).expect("store");
        let c = s
            .mknod(ROOT, &n("null"), FileKind::CharDevice, 0o666, rdev_c, ME)
            .expect("mknod c");
        let b = s
            .mknod(ROOT, &n("sda1"), FileKind::BlockDevice, 0o660, rdev_b, ME)
            .expect("mknod b");
        assert_eq!((c.kind, c.rdev, c.size), (FileKind::CharDevice, rdev_c, 0));
        assert_eq!((b.kind, b.rdev), (FileKind::BlockDevice, rdev_b));
        let f = s
            .mknod(ROOT, &n("fifo"), FileKind::Fifo, 0o644, 1234, ME)
            .expect("mknod p");
        assert_eq!(f.rdev, 0, "rdev only for devices");
        assert_eq!(
            errno_of(s.open(c.ino, libc::O_RDONLY, CONN)),
            libc::ENXIO,
            "no content to open"
        );
        s.flush().expect("flush");
        (c, b)
    };
    let s = reopen(dir.path());
    assert_eq!(s.getattr(c.ino).expect("getattr"), c);
    assert_eq!(s.getattr(b.ino).expect("getattr"), b);
    assert_eq!(kinds(&check(&s, false)), vec![]);
}

#[test]
fn a_format_1_store_opens_with_every_inode_and_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = Timestamp {
        secs: 1_700_000_000,
        nanos: 5,
    };
    {
        // A format 1 store as the previous release wrote it: the root, a
        // directory, a file with content, a symlink; counter at 6.
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .expect("sled");
        let inodes = db.open_tree("inodes").expect("tree");
        let dirents = db.open_tree("dirents").expect("tree");
        let cookies = db.open_tree("cookies").expect("tree");
        let meta = db.open_tree("meta").expect("tree");
        let v1 = |kind, perm, nlink, parent, entries, target: &[u8]| InodeRecV1 {
            kind,
            perm,
            uid: 7,
            gid: 8,
            nlink,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            target: target.to_vec(),
            parent,
            entries,
            next_cookie: 3 + entries,
        };
        let recs = [
            (1u64, v1(FileKind::Directory, 0o755, 3, 1, 3, b"")),
            (2, v1(FileKind::Directory, 0o700, 2, 1, 0, b"")),
            (3, v1(FileKind::File, 0o644, 1, 0, 0, b"")),
            (5, v1(FileKind::Symlink, 0o777, 1, 0, 0, b"d/f")),
        ];
        for (ino, r) in &recs {
            inodes.insert(ino_key(*ino), encode(r)).expect("insert");
        }
        for (cookie, name, ino, kind) in [
            (3u64, "d", 2u64, FileKind::Directory),
            (4, "f", 3, FileKind::File),
            (5, "l", 5, FileKind::Symlink),
        ] {
            let d = DirentRec { ino, kind, cookie };
            dirents
                .insert(dirent_key(1, name.as_bytes()), encode(&d))
                .expect("insert");
            cookies
                .insert(cookie_key(1, cookie), name.as_bytes())
                .expect("insert");
        }
        meta.insert(records::META_NEXT_INO, &6u64.to_be_bytes())
            .expect("insert");
        meta.insert(records::META_FORMAT, &1u64.to_be_bytes())
            .expect("insert");
        db.flush().expect("flush");
        let content = crate::content::ContentDir::new(dir.path()).expect("content");
        content.create(3).expect("content of ino 3");
        std::fs::write(content.path(3), b"format one bytes").expect("write");
    }
    let s = reopen(dir.path());
    let d = s.lookup(ROOT, &n("d")).expect("d");
    assert_eq!(
        (d.ino, d.kind, d.perm, d.uid),
        (Ino(2), FileKind::Directory, 0o700, 7)
    );
    let f = s.lookup(ROOT, &n("f")).expect("f");
    assert_eq!((f.ino, f.size, f.rdev, f.crtime), (Ino(3), 16, 0, now));
    assert_eq!(s.readlink(Ino(5)).expect("readlink"), b"d/f");
    assert_eq!(s.getattr(ROOT).expect("root").nlink, 3);
    assert_eq!(kinds(&check(&s, false)), vec![]);
    assert!(
        file(&s, ROOT, "new").0 >= 6,
        "numbers go on from the counter"
    );
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(s.lookup(ROOT, &n("f")).expect("f again").ino, Ino(3));
}

fn reopen(dir: &std::path::Path) -> Store {
    super::test_support::reopen(dir, (0, 0))
}

/// A content file no inode names, made behind the store's back (what a
/// crash between making a content file and naming it leaves).
fn plant_stray(s: &Store) -> std::path::PathBuf {
    s.content
        .create_gen(1 << 40, 0, nix::fcntl::OFlag::O_WRONLY)
        .expect("stray content file");
    s.content.path_gen(1 << 40, 0)
}

#[test]
fn a_clean_stop_lets_the_next_start_skip_its_scan_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stray = {
        let s = Store::load(dir.path(), (0, 0)).expect("store");
        s.connect(CONN);
        file(&s, ROOT, "f");
        s.shutdown().expect("shutdown");
        assert!(s.mark_clean().expect("mark"), "nothing is kept: marked");
        // Something the scan would remove, made after the mark: only a
        // start that skips the scan keeps it.
        plant_stray(&s)
    };
    {
        let s = reopen(dir.path());
        assert!(stray.exists(), "a start after a clean stop scanned");
        assert!(
            s.meta.get(META_CLEAN_STOP).expect("meta").is_none(),
            "the start left the mark in place"
        );
        assert!(s.lookup(ROOT, &n("f")).is_ok());
        // Dropped without a clean stop, as a kill leaves it.
    }
    let s = reopen(dir.path());
    assert!(
        !stray.exists(),
        "the start after an unclean stop did not scan (the mark was used twice)"
    );
    assert!(s.lookup(ROOT, &n("f")).is_ok());
}

#[test]
fn a_stop_is_not_marked_clean_while_an_old_generation_is_kept() {
    let (dir, s) = fresh();
    let f = s
        .create(ROOT, &n("f"), 0o644, libc::O_RDWR | libc::O_CREAT, ME, CONN)
        .expect("create");
    let ino = f.opened.attr.ino;
    // A peer's new version arrived while the file was open: its old
    // generation stays for the handle.
    assert!(!s.lock_opens().retire(ino, 0), "generation 0 is open");
    s.shutdown().expect("shutdown");
    assert!(
        !s.mark_clean().expect("mark"),
        "marked with a generation kept"
    );
    assert!(s.meta.get(META_CLEAN_STOP).expect("meta").is_none());
    drop(f);
    drop(s);
    let stray = {
        let s = reopen(dir.path());
        plant_stray(&s)
    };
    let _s = reopen(dir.path());
    assert!(
        !stray.exists(),
        "the start after an unmarked stop did not scan"
    );
}

#[test]
fn a_repair_and_the_clean_stop_mark_exclude_each_other() {
    let (_d, s) = fresh();
    {
        let _running = s.repairs.begin().expect("a repair may begin");
        assert!(
            !s.mark_clean().expect("mark"),
            "the stop was marked clean while a repair ran"
        );
    }
    assert!(s.meta.get(META_CLEAN_STOP).expect("meta").is_none());
    let e = s
        .check_with(true, Duration::ZERO)
        .expect_err("a repair began after the stop was being marked");
    assert_eq!(e.errno, libc::ESHUTDOWN, "{e}");
    assert!(check(&s, false).findings.is_empty(), "a plain check runs");
    assert!(s.mark_clean().expect("mark"), "no repair runs now");
}

#[test]
fn a_clean_stop_mark_is_void_once_another_run_started() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stray = {
        let s = Store::load(dir.path(), (0, 0)).expect("store");
        s.begin_handle_epoch().expect("epoch");
        s.shutdown().expect("shutdown");
        assert!(s.mark_clean().expect("mark"));
        // A run that knows no mark (an older keibi-syncd) started on the
        // marked store, left a stray content file and was killed.
        s.begin_handle_epoch().expect("epoch");
        plant_stray(&s)
    };
    let s = reopen(dir.path());
    assert!(!stray.exists(), "a stale mark let the start skip its scan");
    assert!(s.meta.get(META_CLEAN_STOP).expect("meta").is_none());
}
