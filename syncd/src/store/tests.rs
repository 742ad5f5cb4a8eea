//! Store tests on a temporary state directory: namespace semantics and
//! their errnos, persistence, readdir cookies, orphans, xattrs.

use super::*;
use crate::opens::ConnId;
use ipc_schema::{Caller, RenameFlags, XattrSet};
use nix::fcntl::{FcntlArg, fcntl};

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

fn errno<T: std::fmt::Debug>(r: Result<T, FsError>) -> i32 {
    r.expect_err("expected an error").errno
}

fn file(s: &Store, parent: Ino, name: &str) -> Ino {
    s.mknod(parent, &n(name), FileKind::File, 0o644, 0, ME)
        .expect("make file")
        .ino
}

fn dir(s: &Store, parent: Ino, name: &str) -> Ino {
    s.mkdir(parent, &n(name), 0o755, ME).expect("mkdir").ino
}

fn names_in(s: &Store, d: Ino) -> Vec<String> {
    s.readdir(d, DirCookie(2), 100_000, false)
        .expect("readdir")
        .into_iter()
        .map(|e| String::from_utf8_lossy(e.name.as_bytes()).into_owned())
        .collect()
}

fn nlink(s: &Store, ino: Ino) -> u32 {
    s.getattr(ino).expect("getattr").nlink
}

fn content_exists(dir: &tempfile::TempDir, ino: Ino) -> bool {
    dir.path()
        .join("content")
        .join(format!("{:016x}", ino.0))
        .exists()
}

#[test]
fn new_store_has_a_root_owned_by_the_share_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Store::load(dir.path(), (7, 8)).expect("store");
    let a = s.getattr(ROOT).expect("root");
    assert_eq!(
        (a.kind, a.perm, a.uid, a.gid, a.nlink),
        (FileKind::Directory, 0o755, 7, 8, 2)
    );
    let l = s.readdir(ROOT, DirCookie(0), 10, false).expect("readdir");
    assert_eq!(l.len(), 2);
    assert_eq!(
        (l[0].name.as_bytes(), l[0].cookie),
        (&b"."[..], DirCookie(1))
    );
    assert_eq!((l[1].name.as_bytes(), l[1].ino), (&b".."[..], ROOT));
}

#[test]
fn directory_nlink_counts_subdirectories() {
    let (_d, s) = fresh();
    let a = dir(&s, ROOT, "a");
    file(&s, ROOT, "f");
    assert_eq!(nlink(&s, ROOT), 3);
    dir(&s, a, "b");
    assert_eq!(nlink(&s, a), 3);
    s.rmdir(a, &n("b")).expect("rmdir");
    assert_eq!(nlink(&s, a), 2);
    assert_eq!(errno(s.lookup(a, &n("b"))), libc::ENOENT);
}

#[test]
fn unlink_and_rmdir_errnos() {
    let (_d, s) = fresh();
    let a = dir(&s, ROOT, "a");
    let f = file(&s, a, "f");
    assert_eq!(errno(s.unlink(ROOT, &n("a"))), libc::EISDIR);
    assert_eq!(errno(s.unlink(ROOT, &n("nope"))), libc::ENOENT);
    assert_eq!(errno(s.unlink(f, &n("x"))), libc::ENOTDIR);
    assert_eq!(errno(s.rmdir(a, &n("f"))), libc::ENOTDIR);
    assert_eq!(errno(s.rmdir(ROOT, &n("a"))), libc::ENOTEMPTY);
    assert_eq!(errno(s.rmdir(ROOT, &n(".."))), libc::EINVAL);
    assert_eq!(errno(s.mkdir(ROOT, &n("a"), 0o755, ME)), libc::EEXIST);
    assert_eq!(errno(s.mkdir(f, &n("x"), 0o755, ME)), libc::ENOTDIR);
    assert_eq!(errno(s.mkdir(Ino(999), &n("x"), 0o755, ME)), libc::ENOENT);
    s.unlink(a, &n("f")).expect("unlink");
    assert_eq!(errno(s.getattr(f)), libc::ENOENT);
    s.rmdir(ROOT, &n("a")).expect("rmdir");
    assert_eq!(nlink(&s, ROOT), 2);
}

#[test]
fn names_are_checked() {
    let (_d, s) = fresh();
    let long = Name(vec![b'x'; 256]);
    assert_eq!(errno(s.mkdir(ROOT, &long, 0o755, ME)), libc::ENAMETOOLONG);
    assert_eq!(errno(s.lookup(ROOT, &long)), libc::ENAMETOOLONG);
    assert_eq!(errno(s.mkdir(ROOT, &n("a/b"), 0o755, ME)), libc::EINVAL);
    assert_eq!(errno(s.mkdir(ROOT, &n(""), 0o755, ME)), libc::EINVAL);
    let ok = Name(vec![b'x'; 255]);
    s.mkdir(ROOT, &ok, 0o755, ME).expect("255 bytes");
    let odd = Name(vec![0xff, 0xfe]);
    let f = s
        .mknod(ROOT, &odd, FileKind::Fifo, 0o644, 0, ME)
        .expect("non-UTF-8");
    assert_eq!(s.lookup(ROOT, &odd).expect("lookup").ino, f.ino);
}

#[test]
fn link_counts_and_refuses_directories() {
    let (d, s) = fresh();
    let a = dir(&s, ROOT, "a");
    let f = file(&s, ROOT, "f");
    assert_eq!(errno(s.link(a, ROOT, &n("a2"))), libc::EPERM);
    assert_eq!(errno(s.link(f, ROOT, &n("a"))), libc::EEXIST);
    assert_eq!(s.link(f, a, &n("g")).expect("link").nlink, 2);
    assert_eq!(s.lookup(a, &n("g")).expect("lookup").ino, f);
    s.unlink(ROOT, &n("f")).expect("unlink");
    assert_eq!(nlink(&s, f), 1);
    assert!(content_exists(&d, f));
    s.unlink(a, &n("g")).expect("unlink");
    s.settle();
    assert!(!content_exists(&d, f), "last link frees the content");
}

#[test]
fn rename_replaces_files_and_frees_the_old_one() {
    let (d, s) = fresh();
    let f = file(&s, ROOT, "f");
    let g = file(&s, ROOT, "g");
    s.rename(ROOT, &n("f"), ROOT, &n("g"), RenameFlags::default())
        .expect("rename");
    assert_eq!(s.lookup(ROOT, &n("g")).expect("lookup").ino, f);
    assert_eq!(errno(s.lookup(ROOT, &n("f"))), libc::ENOENT);
    assert_eq!(errno(s.getattr(g)), libc::ENOENT);
    s.settle();
    assert!(!content_exists(&d, g));
    assert_eq!(names_in(&s, ROOT), vec!["g"]);
}

#[test]
fn rename_kind_rules() {
    let (_d, s) = fresh();
    let a = dir(&s, ROOT, "a");
    let b = dir(&s, ROOT, "b");
    dir(&s, b, "inner");
    file(&s, ROOT, "f");
    let none = RenameFlags::default();
    assert_eq!(
        errno(s.rename(ROOT, &n("f"), ROOT, &n("a"), none)),
        libc::EISDIR
    );
    assert_eq!(
        errno(s.rename(ROOT, &n("a"), ROOT, &n("f"), none)),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(s.rename(ROOT, &n("a"), ROOT, &n("b"), none)),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(s.rename(ROOT, &n("x"), ROOT, &n("y"), none)),
        libc::ENOENT
    );
    assert_eq!(
        errno(s.rename(ROOT, &n("b"), b, &n("b2"), none)),
        libc::EINVAL
    );
    let inner = s.lookup(b, &n("inner")).expect("inner").ino;
    assert_eq!(
        errno(s.rename(ROOT, &n("b"), inner, &n("deeper"), none)),
        libc::EINVAL,
        "a directory cannot move into its own subtree"
    );
    // An empty directory can be replaced by a directory.
    s.rmdir(b, &n("inner")).expect("rmdir");
    s.rename(ROOT, &n("a"), ROOT, &n("b"), none)
        .expect("dir over empty dir");
    assert_eq!(s.lookup(ROOT, &n("b")).expect("lookup").ino, a);
    assert_eq!(errno(s.getattr(b)), libc::ENOENT);
    assert_eq!(nlink(&s, ROOT), 3);
}

#[test]
fn rename_of_a_directory_moves_its_links_and_dotdot() {
    let (_d, s) = fresh();
    let a = dir(&s, ROOT, "a");
    let b = dir(&s, ROOT, "b");
    let c = dir(&s, a, "c");
    assert_eq!((nlink(&s, a), nlink(&s, b)), (3, 2));
    s.rename(a, &n("c"), b, &n("c"), RenameFlags::default())
        .expect("rename");
    assert_eq!((nlink(&s, a), nlink(&s, b)), (2, 3));
    let dotdot = s.readdir(c, DirCookie(1), 1, false).expect("readdir");
    assert_eq!(dotdot[0].ino, b, "'..' follows the move");
    assert_eq!(s.lookup(c, &n("..")).expect("lookup ..").ino, b);
}

#[test]
fn rename_noreplace_and_same_inode() {
    let (_d, s) = fresh();
    let f = file(&s, ROOT, "f");
    file(&s, ROOT, "g");
    let noreplace = RenameFlags {
        noreplace: true,
        exchange: false,
    };
    assert_eq!(
        errno(s.rename(ROOT, &n("f"), ROOT, &n("g"), noreplace)),
        libc::EEXIST
    );
    s.rename(ROOT, &n("f"), ROOT, &n("h"), noreplace)
        .expect("free target");
    assert_eq!(s.lookup(ROOT, &n("h")).expect("h").ino, f);
    // Two links of one inode: rename does nothing.
    s.link(f, ROOT, &n("h2")).expect("link");
    s.rename(ROOT, &n("h"), ROOT, &n("h2"), RenameFlags::default())
        .expect("same inode");
    assert_eq!(s.lookup(ROOT, &n("h")).expect("h").ino, f);
    assert_eq!(s.lookup(ROOT, &n("h2")).expect("h2").ino, f);
    assert_eq!(nlink(&s, f), 2);
    let both = RenameFlags {
        noreplace: true,
        exchange: true,
    };
    assert_eq!(
        errno(s.rename(ROOT, &n("h"), ROOT, &n("g"), both)),
        libc::EINVAL
    );
}

#[test]
fn rename_exchange_swaps_across_directories() {
    let (_d, s) = fresh();
    let a = dir(&s, ROOT, "a");
    let sub = dir(&s, a, "sub");
    let f = file(&s, ROOT, "f");
    let ex = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    assert_eq!(
        errno(s.rename(ROOT, &n("f"), a, &n("missing"), ex)),
        libc::ENOENT
    );
    s.rename(ROOT, &n("f"), a, &n("sub"), ex).expect("exchange");
    assert_eq!(s.lookup(ROOT, &n("f")).expect("f").ino, sub);
    assert_eq!(s.lookup(a, &n("sub")).expect("sub").ino, f);
    assert_eq!(nlink(&s, a), 2, "a lost its subdirectory");
    assert_eq!(nlink(&s, ROOT), 4, "root gained one");
    assert_eq!(s.lookup(sub, &n("..")).expect("..").ino, ROOT);
    // Exchanging a directory with something inside it is refused.
    let inner = dir(&s, sub, "inner");
    file(&s, inner, "x");
    assert_eq!(
        errno(s.rename(ROOT, &n("f"), inner, &n("x"), ex)),
        libc::EINVAL
    );
}

#[test]
fn inode_numbers_and_tree_survive_reopening() {
    let dir_ = tempfile::tempdir().expect("tempdir");
    let (a, f, l, biggest);
    {
        let s = Store::load(dir_.path(), (0, 0)).expect("store");
        a = dir(&s, ROOT, "a");
        f = file(&s, a, "f");
        l = s.symlink(a, &n("l"), b"f", ME).expect("symlink").ino;
        let gone = file(&s, ROOT, "gone");
        s.unlink(ROOT, &n("gone")).expect("unlink");
        biggest = gone;
        s.setxattr(f, &n("user.k"), b"v", XattrSet::Any)
            .expect("xattr");
        s.flush().expect("flush");
    }
    let s = reopen(dir_.path());
    assert_eq!(s.lookup(ROOT, &n("a")).expect("a").ino, a);
    assert_eq!(s.lookup(a, &n("f")).expect("f").ino, f);
    assert_eq!(s.readlink(l).expect("readlink"), b"f");
    assert_eq!(s.getxattr(f, &n("user.k")).expect("xattr"), b"v");
    let next = file(&s, ROOT, "new");
    assert!(
        next.0 > biggest.0,
        "numbers are never reused ({next:?} after {biggest:?})"
    );
    assert_eq!(names_in(&s, a), vec!["f", "l"]);
}

#[test]
fn readdir_cookies_stay_valid_while_entries_change() {
    let (_d, s) = fresh();
    for i in 0..10 {
        file(&s, ROOT, &format!("e{i}"));
    }
    let first = s.readdir(ROOT, DirCookie(0), 5, false).expect("readdir");
    assert_eq!(first.len(), 5, ". .. e0 e1 e2");
    let resume = first[4].cookie;
    // Remove some already listed and some not yet listed; add new ones.
    s.unlink(ROOT, &n("e0")).expect("unlink");
    s.unlink(ROOT, &n("e5")).expect("unlink");
    file(&s, ROOT, "new1");
    s.rename(
        ROOT,
        &n("e1"),
        ROOT,
        &n("e1-renamed"),
        RenameFlags::default(),
    )
    .expect("rename");
    let rest: Vec<String> = s
        .readdir(ROOT, resume, 1000, false)
        .expect("readdir")
        .into_iter()
        .map(|e| String::from_utf8_lossy(e.name.as_bytes()).into_owned())
        .collect();
    assert_eq!(
        rest,
        vec!["e3", "e4", "e6", "e7", "e8", "e9", "new1", "e1-renamed"],
        "nothing listed twice, nothing unchanged skipped"
    );
    // Cookies strictly increase along a listing.
    let all = s
        .readdir(ROOT, DirCookie(0), 1000, true)
        .expect("readdir plus");
    assert!(all.windows(2).all(|w| w[0].cookie < w[1].cookie));
    assert!(all.iter().all(|e| e.attr.is_some_and(|a| a.ino == e.ino)));
}

#[test]
fn unlinked_open_file_lives_until_its_last_release() {
    let (d, s) = fresh();
    let o = s
        .create(ROOT, &n("f"), 0o644, libc::O_RDWR, ME, CONN)
        .expect("create");
    let ino = o.opened.attr.ino;
    let o2 = s.open(ino, libc::O_RDONLY, CONN).expect("open");
    s.unlink(ROOT, &n("f")).expect("unlink");
    assert_eq!(errno(s.lookup(ROOT, &n("f"))), libc::ENOENT);
    let a = s.getattr(ino).expect("orphan getattr");
    assert_eq!(a.nlink, 0);
    assert!(content_exists(&d, ino));
    assert_eq!(
        s.counts().expect("counts").files,
        0,
        "orphans are not counted"
    );
    s.release(o.opened.handle).expect("release");
    assert!(s.getattr(ino).is_ok(), "still open once");
    s.release(o2.opened.handle).expect("release");
    assert_eq!(errno(s.getattr(ino)), libc::ENOENT);
    s.settle();
    assert!(!content_exists(&d, ino));
    s.release(o2.opened.handle)
        .expect("a second release is harmless");
}

#[test]
fn orphans_of_a_gone_mount_are_freed_by_a_fresh_mount() {
    let dir_ = tempfile::tempdir().expect("tempdir");
    let ino;
    {
        let s = Store::load(dir_.path(), (0, 0)).expect("store");
        s.connect(CONN);
        ino = s
            .create(ROOT, &n("f"), 0o644, libc::O_WRONLY, ME, CONN)
            .expect("create")
            .opened
            .attr
            .ino;
        s.unlink(ROOT, &n("f")).expect("unlink");
        assert_eq!(s.disconnect(CONN), 1);
        assert!(
            s.getattr(ino).is_ok(),
            "kept: mountd may reconnect with the fd"
        );
        s.flush().expect("flush");
    }
    let s = reopen(dir_.path());
    assert_eq!(s.getattr(ino).expect("orphan survives a restart").nlink, 0);
    let other = ConnId(2);
    s.connect(other);
    let held = s
        .create(ROOT, &n("g"), 0o644, libc::O_RDWR, ME, other)
        .expect("create");
    s.unlink(ROOT, &n("g")).expect("unlink");
    assert_eq!(
        s.free_orphans().expect("free"),
        1,
        "only the one nobody holds"
    );
    assert_eq!(errno(s.getattr(ino)), libc::ENOENT);
    s.settle();
    assert!(!content_exists(&dir_, ino));
    assert!(s.getattr(held.opened.attr.ino).is_ok());
}

#[test]
fn open_after_disconnect_is_refused() {
    let (_d, s) = fresh();
    let f = file(&s, ROOT, "f");
    s.disconnect(CONN);
    assert_eq!(errno(s.open(f, libc::O_RDONLY, CONN)), libc::ESHUTDOWN);
}

#[test]
fn open_uses_the_requested_access_mode_and_truncates() {
    let (_d, s) = fresh();
    let o = s
        .create(
            ROOT,
            &n("f"),
            0o640,
            libc::O_WRONLY | libc::O_CREAT,
            ME,
            CONN,
        )
        .expect("create");
    let fl = fcntl(&o.fd, FcntlArg::F_GETFL).expect("getfl");
    assert_eq!(fl & libc::O_ACCMODE, libc::O_WRONLY);
    assert_eq!(o.opened.attr.perm, 0o640);
    assert_eq!((o.opened.attr.uid, o.opened.attr.gid), (1000, 1000));
    nix::sys::uio::pwrite(&o.fd, b"hello", 0).expect("pwrite");
    let ino = o.opened.attr.ino;
    assert_eq!(s.getattr(ino).expect("getattr").size, 5);
    let st = nix::sys::stat::fstat(&o.fd).expect("fstat");
    assert_eq!(
        (
            o.opened.content.dev,
            o.opened.content.ino,
            o.opened.content.uid
        ),
        (st.st_dev, st.st_ino, st.st_uid)
    );
    let ro = s
        .open(ino, libc::O_RDONLY | libc::O_TRUNC, CONN)
        .expect("open");
    assert_eq!(ro.opened.attr.size, 5, "O_TRUNC needs write access");
    let fl = fcntl(&ro.fd, FcntlArg::F_GETFL).expect("getfl");
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
    for flag in [libc::O_APPEND, libc::O_DIRECT] {
        let x = s.open(ino, libc::O_RDWR | flag, CONN).expect("open");
        let fl = fcntl(&x.fd, FcntlArg::F_GETFL).expect("getfl");
        assert_eq!(fl & flag, 0, "user flags are not passed to syncd's open");
    }
    let rw = s
        .open(ino, libc::O_RDWR | libc::O_TRUNC, CONN)
        .expect("open");
    assert_eq!(rw.opened.attr.size, 0);
    assert_eq!(
        errno(s.create(ROOT, &n("f"), 0o644, libc::O_RDWR | libc::O_EXCL, ME, CONN)),
        libc::EEXIST
    );
    let again = s
        .create(ROOT, &n("f"), 0o644, libc::O_RDWR, ME, CONN)
        .expect("create of an existing file opens it");
    assert_eq!(again.opened.attr.ino, ino);
    assert_eq!(errno(s.open(ROOT, libc::O_RDONLY, CONN)), libc::EISDIR);
}

#[test]
fn setattr_changes_mode_owner_size_and_times() {
    let (_d, s) = fresh();
    let f = file(&s, ROOT, "f");
    let d = dir(&s, ROOT, "d");
    let t = Timestamp {
        secs: 1_234_567,
        nanos: 89,
    };
    let before = s.getattr(f).expect("getattr").ctime;
    let a = s
        .setattr(
            f,
            &SetAttr {
                perm: Some(0o4711),
                uid: Some(5),
                gid: Some(6),
                size: Some(1 << 20),
                atime: Some(TimeSet::At(t)),
                mtime: Some(TimeSet::At(t)),
            },
        )
        .expect("setattr");
    assert_eq!((a.perm, a.uid, a.gid, a.size), (0o4711, 5, 6, 1 << 20));
    assert_eq!((a.atime, a.mtime), (t, t));
    assert!(a.ctime >= before);
    let a = s
        .setattr(
            d,
            &SetAttr {
                mtime: Some(TimeSet::At(t)),
                ..Default::default()
            },
        )
        .expect("setattr dir");
    assert_eq!(a.mtime, t);
    let size = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    assert_eq!(errno(s.setattr(d, &size)), libc::EISDIR);
    assert_eq!(errno(s.setattr(Ino(4242), &size)), libc::ENOENT);
}

#[test]
fn setattr_answers_what_getattr_sees() {
    let (_d, s) = fresh();
    let f = file(&s, ROOT, "f");
    for changes in [
        SetAttr {
            size: Some(4096),
            ..Default::default()
        },
        SetAttr {
            atime: Some(TimeSet::Now),
            mtime: Some(TimeSet::Now),
            ..Default::default()
        },
        SetAttr {
            perm: Some(0o600),
            ..Default::default()
        },
        SetAttr::default(),
    ] {
        let before = s.getattr(f).expect("getattr").ctime;
        let a = s.setattr(f, &changes).expect("setattr");
        assert_eq!(a, s.getattr(f).expect("getattr"), "{changes:?}");
        assert!(a.ctime >= before, "{changes:?}: ctime moves on");
    }
}

#[test]
fn concurrent_setattrs_of_one_inode_lose_no_change() {
    let (_d, s) = fresh();
    let f = file(&s, ROOT, "f");
    let rounds = 300u32;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..rounds {
                let perm = Some(0o600 | (i as u16 & 0o7));
                let c = SetAttr {
                    perm,
                    ..Default::default()
                };
                s.setattr(f, &c).expect("chmod");
            }
        });
        scope.spawn(|| {
            for i in 0..rounds {
                let c = SetAttr {
                    uid: Some(i),
                    ..Default::default()
                };
                s.setattr(f, &c).expect("chown");
            }
        });
    });
    let a = s.getattr(f).expect("getattr");
    assert_eq!(
        (a.perm, a.uid),
        (0o600 | ((rounds - 1) as u16 & 0o7), rounds - 1),
        "each writer's last change is kept"
    );
}

#[test]
fn create_hands_over_the_descriptor_that_made_the_file() {
    let (_d, s) = fresh();
    for (i, access) in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR]
        .into_iter()
        .enumerate()
    {
        let name = n(&format!("f{i}"));
        let o = s
            .create(
                ROOT,
                &name,
                0o644,
                access | libc::O_CREAT | libc::O_TRUNC,
                ME,
                CONN,
            )
            .expect("create");
        let fl = fcntl(&o.fd, FcntlArg::F_GETFL).expect("getfl");
        assert_eq!(fl & libc::O_ACCMODE, access);
        assert_eq!(fl & (libc::O_APPEND | libc::O_DIRECT), 0);
        let st = nix::sys::stat::fstat(&o.fd).expect("fstat");
        assert_eq!(
            (o.opened.content.ino, st.st_size),
            (st.st_ino, 0),
            "the new, empty content file"
        );
        assert_eq!(
            o.opened.attr,
            s.getattr(o.opened.attr.ino).expect("getattr")
        );
        s.release(o.opened.handle).expect("release");
        assert!(s.getattr(o.opened.attr.ino).is_ok(), "linked: kept");
    }
}

#[test]
fn has_xattrs_follows_the_attributes_and_survives_reopening() {
    let dir_ = tempfile::tempdir().expect("tempdir");
    let (f, g);
    {
        let s = Store::load(dir_.path(), (0, 0)).expect("store");
        f = file(&s, ROOT, "f");
        g = file(&s, ROOT, "g");
        assert!(!s.getattr(f).expect("getattr").has_xattrs);
        s.setxattr(f, &n("user.a"), b"1", XattrSet::Any)
            .expect("setxattr");
        assert!(s.getattr(f).expect("getattr").has_xattrs);
        assert!(!s.getattr(g).expect("getattr").has_xattrs);
        s.setxattr(g, &n("user.b"), b"2", XattrSet::Any)
            .expect("setxattr");
        s.removexattr(g, &n("user.b")).expect("removexattr");
        assert!(!s.getattr(g).expect("getattr").has_xattrs);
        s.flush().expect("flush");
    }
    let s = reopen(dir_.path());
    assert!(s.getattr(f).expect("getattr").has_xattrs);
    assert!(!s.getattr(g).expect("getattr").has_xattrs);
    let listed = s.readdir(ROOT, DirCookie(2), 10, true).expect("readdir");
    let flags: Vec<bool> = listed
        .iter()
        .map(|e| e.attr.as_ref().expect("plus").has_xattrs)
        .collect();
    assert_eq!(flags, vec![true, false]);
}

#[test]
fn files_made_from_spares_look_new_and_unused_spares_go_at_stop() {
    let (d, s) = fresh();
    s.start_spares().expect("start");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.spares.ready() == 0 {
        assert!(std::time::Instant::now() < deadline, "no spare made");
        std::thread::yield_now();
    }
    // Age the spares, so a file made from one shows whether its times
    // were set when it was taken.
    let old = TimeSet::At(Timestamp {
        secs: 1_000,
        nanos: 0,
    });
    for ino in s.spares.ready_list() {
        s.content
            .update(ino, 0, None, Some(old), Some(old))
            .expect("age a spare");
    }
    let recent = Timestamp {
        secs: Timestamp::now().secs - 60,
        nanos: 0,
    };
    let o = s
        .create(ROOT, &n("c"), 0o600, libc::O_RDWR | libc::O_CREAT, ME, CONN)
        .expect("create");
    let m = s
        .mknod(ROOT, &n("m"), FileKind::File, 0o644, 0, ME)
        .expect("mknod");
    for a in [o.opened.attr, m] {
        assert_eq!((a.size, a.nlink, a.kind), (0, 1, FileKind::File));
        assert!(
            a.atime > recent && a.mtime > recent && a.ctime > recent,
            "times of a new file: {a:?}"
        );
        assert_eq!(a, s.getattr(a.ino).expect("getattr"));
    }
    let fl = fcntl(&o.fd, FcntlArg::F_GETFL).expect("getfl");
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDWR);
    let unused = s.spares.ready_list();
    assert!(s.stop_spares() >= unused.len());
    for ino in unused {
        assert!(!content_exists(&d, Ino(ino)), "spare {ino} removed at stop");
    }
    assert!(content_exists(&d, o.opened.attr.ino) && content_exists(&d, m.ino));
    let later = file(&s, ROOT, "later");
    assert!(later.0 > m.ino.0, "numbers keep growing without spares");
}

#[test]
fn setgid_directories_pass_on_their_group() {
    let (_d, s) = fresh();
    let d = dir(&s, ROOT, "shared");
    s.setattr(
        d,
        &SetAttr {
            perm: Some(0o2775),
            gid: Some(50),
            ..Default::default()
        },
    )
    .expect("setattr");
    let sub = s.mkdir(d, &n("sub"), 0o755, ME).expect("mkdir");
    assert_eq!((sub.gid, sub.perm), (50, 0o2755));
    let f = s
        .mknod(d, &n("f"), FileKind::File, 0o644, 0, ME)
        .expect("file");
    assert_eq!((f.gid, f.perm), (50, 0o644));
    let plain = s.mkdir(ROOT, &n("plain"), 0o755, ME).expect("mkdir");
    assert_eq!(plain.gid, ME.gid);
}

#[test]
fn symlinks_and_special_nodes() {
    let (_d, s) = fresh();
    let l = s.symlink(ROOT, &n("l"), b"../target", ME).expect("symlink");
    assert_eq!((l.kind, l.size), (FileKind::Symlink, 9));
    assert_eq!(s.readlink(l.ino).expect("readlink"), b"../target");
    assert_eq!(errno(s.readlink(ROOT)), libc::EINVAL);
    assert_eq!(errno(s.symlink(ROOT, &n("e"), b"", ME)), libc::ENOENT);
    assert_eq!(
        errno(s.symlink(ROOT, &n("long"), &[b'a'; 4096], ME)),
        libc::ENAMETOOLONG
    );
    assert_eq!(errno(s.symlink(ROOT, &n("nul"), b"a\0b", ME)), libc::EINVAL);
    let max = s
        .symlink(ROOT, &n("max"), &[b'a'; 4095], ME)
        .expect("a 4095-byte target");
    assert_eq!(s.readlink(max.ino).expect("readlink").len(), 4095);
    let fifo = s
        .mknod(ROOT, &n("p"), FileKind::Fifo, 0o600, 0, ME)
        .expect("fifo");
    assert_eq!(fifo.kind, FileKind::Fifo);
    assert_eq!(
        errno(s.mknod(ROOT, &n("d"), FileKind::Directory, 0o755, 0, ME)),
        libc::EINVAL
    );
    let c = s.counts().expect("counts");
    assert_eq!((c.files, c.directories, c.others), (0, 1, 3));
}

#[test]
fn xattrs_follow_setxattr_flags() {
    let (_d, s) = fresh();
    let f = file(&s, ROOT, "f");
    let k = n("user.k");
    assert_eq!(errno(s.getxattr(f, &k)), libc::ENODATA);
    assert_eq!(
        errno(s.setxattr(f, &k, b"1", XattrSet::Replace)),
        libc::ENODATA
    );
    s.setxattr(f, &k, b"1", XattrSet::Create).expect("create");
    assert_eq!(
        errno(s.setxattr(f, &k, b"2", XattrSet::Create)),
        libc::EEXIST
    );
    s.setxattr(f, &k, b"2", XattrSet::Replace).expect("replace");
    assert_eq!(s.getxattr(f, &k).expect("get"), b"2");
    s.setxattr(f, &n("user.other"), b"", XattrSet::Any)
        .expect("empty value");
    let mut names: Vec<_> = s.listxattr(f).expect("list");
    names.sort();
    assert_eq!(names, vec![n("user.k"), n("user.other")]);
    let big = vec![0u8; xattrs::MAX_VALUE + 1];
    assert_eq!(errno(s.setxattr(f, &k, &big, XattrSet::Any)), libc::E2BIG);
    s.removexattr(f, &k).expect("remove");
    assert_eq!(errno(s.removexattr(f, &k)), libc::ENODATA);
    assert_eq!(errno(s.getxattr(Ino(999), &k)), libc::ENOENT);
    s.unlink(ROOT, &n("f")).expect("unlink");
    s.settle();
    assert!(s.xattrs.scan_prefix(records::ino_key(f.0)).next().is_none());
}

#[test]
fn fsync_and_statfs_answer() {
    let (_d, s) = fresh();
    let f = file(&s, ROOT, "f");
    s.fsync(f, false).expect("fsync");
    s.fsync(ROOT, true).expect("fsync dir");
    assert_eq!(errno(s.fsync(Ino(999), false)), libc::ENOENT);
    let st = s.statfs().expect("statfs");
    assert!(st.blocks > 0 && st.namelen == 255);
}

#[test]
fn lookup_of_dot_names_any_inode_itself() {
    // The kernel decodes a file handle by looking up "." in the inode it
    // names (FUSE export support), whatever its kind.
    let (_d, s) = fresh();
    let d = dir(&s, ROOT, "d");
    let f = s
        .mknod(d, &n("p"), FileKind::Fifo, 0o644, 0, ME)
        .expect("mknod")
        .ino;
    assert_eq!(s.lookup(f, &n(".")).expect("lookup . of a fifo").ino, f);
    assert_eq!(s.lookup(d, &n(".")).expect("lookup . of a dir").ino, d);
    assert_eq!(s.lookup(d, &n("..")).expect("lookup ..").ino, ROOT);
    assert_eq!(errno(s.lookup(f, &n(".."))), libc::ENOTDIR);
    assert_eq!(errno(s.lookup(Ino(9999), &n("."))), libc::ENOENT);
}

fn reopen(dir: &std::path::Path) -> Store {
    super::test_support::reopen(dir, (0, 0))
}

#[test]
fn a_store_short_of_room_admits_only_what_frees() {
    use crate::space::{Change, Level};
    let (_d, s) = fresh();
    let empty = file(&s, ROOT, "empty");
    let full = super::test_support::file_with(&s, ROOT, "full", &[7u8; 8192], ME, CONN);
    assert!(s.getattr(full).expect("getattr").blocks > 0);
    assert!(s.admit(Change::Adds).is_ok());
    s.space.force_level(Level::Tight);
    assert_eq!(errno(s.admit(Change::Adds)), libc::ENOSPC);
    assert!(s.admit(Change::Frees).is_ok());
    assert!(s.admit_unlink(ROOT, &n("empty")).is_ok());
    s.space.force_level(Level::Critical);
    assert_eq!(errno(s.admit(Change::Frees)), libc::ENOSPC);
    assert_eq!(errno(s.admit_unlink(ROOT, &n("empty"))), libc::ENOSPC);
    assert_eq!(errno(s.admit_unlink(ROOT, &n("missing"))), libc::ENOSPC);
    // A second link: unlinking one frees nothing.
    s.link(full, ROOT, &n("again")).expect("link");
    assert_eq!(errno(s.admit_unlink(ROOT, &n("full"))), libc::ENOSPC);
    s.unlink(ROOT, &n("again")).expect("unlink");
    assert!(s.admit_unlink(ROOT, &n("full")).is_ok(), "frees content");
    assert!(s.getattr(empty).is_ok());
}
