//! The store against the kernel: random sequences of namespace operations
//! applied both to a [`Store`] and to a real directory, comparing every
//! result (success or errno) and the final trees; plus the store's own
//! invariants after every step, and the same under concurrent threads.

use super::records::{DirentRec, InodeRec, decode};
use super::*;
use crate::opens::ConnId;
use ipc_schema::{Caller, RenameFlags};
use nix::fcntl::{AT_FDCWD, OFlag, RenameFlags as NixRenameFlags, renameat2};
use nix::sys::stat::Mode;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

const ME: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 1,
};
const CONN: ConnId = ConnId(1);

/// Paths of one or two components over a small alphabet, so operations
/// collide often.
fn path() -> impl Strategy<Value = String> {
    let c = prop::sample::select(vec!["a", "b", "c"]);
    prop::collection::vec(c, 1..=2).prop_map(|v| v.join("/"))
}

#[derive(Clone, Debug)]
enum Op {
    Mkdir(String),
    Create(String),
    Symlink(String),
    Unlink(String),
    Rmdir(String),
    Link(String, String),
    Rename(String, String, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => path().prop_map(Op::Mkdir),
        3 => path().prop_map(Op::Create),
        1 => path().prop_map(Op::Symlink),
        2 => path().prop_map(Op::Unlink),
        2 => path().prop_map(Op::Rmdir),
        1 => (path(), path()).prop_map(|(a, b)| Op::Link(a, b)),
        4 => (path(), path(), 0u8..3).prop_map(|(a, b, f)| Op::Rename(a, b, f)),
    ]
}

type Outcome = Result<(), i32>;

fn on_disk(root: &Path, op: &Op) -> Outcome {
    let p = |s: &str| root.join(s);
    let r = match op {
        Op::Mkdir(a) => nix::unistd::mkdir(&p(a), Mode::from_bits_truncate(0o755)),
        Op::Create(a) => nix::fcntl::open(
            &p(a),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY,
            Mode::from_bits_truncate(0o644),
        )
        .map(drop),
        Op::Symlink(a) => nix::unistd::symlinkat("t", AT_FDCWD, &p(a)),
        Op::Unlink(a) => nix::unistd::unlink(&p(a)),
        Op::Rmdir(a) => std::fs::remove_dir(p(a))
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
        Op::Link(a, b) => nix::unistd::linkat(
            AT_FDCWD,
            &p(a),
            AT_FDCWD,
            &p(b),
            nix::fcntl::AtFlags::empty(),
        ),
        Op::Rename(a, b, f) => renameat2(AT_FDCWD, &p(a), AT_FDCWD, &p(b), nix_flags(*f)),
    };
    r.map_err(|e| e as i32)
}

fn nix_flags(f: u8) -> NixRenameFlags {
    match f {
        1 => NixRenameFlags::RENAME_NOREPLACE,
        2 => NixRenameFlags::RENAME_EXCHANGE,
        _ => NixRenameFlags::empty(),
    }
}

/// Resolve a path to (parent, last name) the way the kernel walks it for
/// the store: every symlink in these tests dangles, so walking through one
/// is ENOENT.
fn resolve(s: &Store, path: &str) -> Result<(Ino, Name), i32> {
    let parts: Vec<&str> = path.split('/').collect();
    let mut dir = Ino::ROOT;
    for part in &parts[..parts.len() - 1] {
        let a = s.lookup(dir, &Name::from(*part)).map_err(|e| e.errno)?;
        match a.kind {
            FileKind::Directory => dir = a.ino,
            FileKind::Symlink => return Err(libc::ENOENT),
            _ => return Err(libc::ENOTDIR),
        }
    }
    Ok((dir, Name::from(parts[parts.len() - 1])))
}

fn in_store(s: &Store, op: &Op) -> Outcome {
    let e = |r: Result<(), FsError>| r.map_err(|e| e.errno);
    match op {
        Op::Mkdir(a) => {
            let (d, n) = resolve(s, a)?;
            e(s.mkdir(d, &n, 0o755, ME).map(drop))
        }
        Op::Create(a) => {
            let (d, n) = resolve(s, a)?;
            let o = s
                .create(
                    d,
                    &n,
                    0o644,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    ME,
                    CONN,
                )
                .map_err(|e| e.errno)?;
            e(s.release(o.opened.handle))
        }
        Op::Symlink(a) => {
            let (d, n) = resolve(s, a)?;
            e(s.symlink(d, &n, b"t", ME).map(drop))
        }
        Op::Unlink(a) => {
            let (d, n) = resolve(s, a)?;
            e(s.unlink(d, &n))
        }
        Op::Rmdir(a) => {
            let (d, n) = resolve(s, a)?;
            e(s.rmdir(d, &n))
        }
        Op::Link(a, b) => {
            let (d, n) = resolve(s, a)?;
            // linkat without AT_SYMLINK_FOLLOW links the entry itself.
            let ino = s.lookup(d, &n).map_err(|e| e.errno)?.ino;
            let (nd, nn) = resolve(s, b)?;
            e(s.link(ino, nd, &nn).map(drop))
        }
        Op::Rename(a, b, f) => {
            let (d, n) = resolve(s, a)?;
            let (nd, nn) = resolve(s, b)?;
            let flags = RenameFlags {
                noreplace: *f == 1,
                exchange: *f == 2,
            };
            e(s.rename(d, &n, nd, &nn, flags))
        }
    }
}

/// The tree below a directory on disk: path → (kind letter, link count
/// for non-directories).
fn disk_tree(root: &Path) -> BTreeMap<String, (char, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let e = e.expect("entry");
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            let md = std::fs::symlink_metadata(e.path()).expect("lstat");
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push((e.path(), format!("{name}/")));
                'd'
            } else if ft.is_symlink() {
                'l'
            } else {
                'f'
            };
            out.insert(name, (kind, if kind == 'd' { 0 } else { md.nlink() }));
        }
    }
    out
}

fn store_tree(s: &Store) -> BTreeMap<String, (char, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(Ino::ROOT, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for e in s
            .readdir(dir, DirCookie(2), 100_000, true)
            .expect("readdir")
        {
            let name = format!("{prefix}{}", String::from_utf8_lossy(e.name.as_bytes()));
            let a = e.attr.expect("plus");
            let kind = match e.kind {
                FileKind::Directory => {
                    stack.push((e.ino, format!("{name}/")));
                    'd'
                }
                FileKind::Symlink => 'l',
                _ => 'f',
            };
            out.insert(
                name,
                (kind, if kind == 'd' { 0 } else { u64::from(a.nlink) }),
            );
        }
    }
    out
}

/// What must hold in the store after any operation: entries, cookies and
/// inodes agree; link counts are right; no content file is missing.
fn check_invariants(s: &Store) {
    let mut inodes: BTreeMap<u64, InodeRec> = BTreeMap::new();
    for item in s.inodes.iter() {
        let (k, v) = item.expect("inode");
        inodes.insert(
            records::be_u64(&k).expect("key"),
            decode(&v).expect("record"),
        );
    }
    let mut entries_of: BTreeMap<u64, u64> = BTreeMap::new();
    let mut subdirs_of: BTreeMap<u64, u32> = BTreeMap::new();
    let mut links_of: BTreeMap<u64, u32> = BTreeMap::new();
    let mut cookies = 0;
    for item in s.dirents.iter() {
        let (k, v) = item.expect("dirent");
        let parent = records::be_u64(&k).expect("key");
        let d: DirentRec = decode(&v).expect("dirent record");
        let child = inodes.get(&d.ino).expect("every entry has its inode");
        assert_eq!(child.kind, d.kind);
        *entries_of.entry(parent).or_default() += 1;
        *links_of.entry(d.ino).or_default() += 1;
        if child.is_dir() {
            *subdirs_of.entry(parent).or_default() += 1;
            assert_eq!(child.parent, parent, "a directory's parent is where it is");
        }
        let name = s
            .cookies
            .get(records::cookie_key(parent, d.cookie))
            .expect("cookie read")
            .expect("every entry has its cookie");
        assert_eq!(&name[..], &k[8..]);
        cookies += 1;
    }
    assert_eq!(s.cookies.len(), cookies, "no cookie without an entry");
    for (ino, rec) in &inodes {
        if rec.is_dir() {
            assert_eq!(rec.entries, entries_of.get(ino).copied().unwrap_or(0));
            assert_eq!(rec.nlink, 2 + subdirs_of.get(ino).copied().unwrap_or(0));
            assert!(rec.next_cookie > 2);
        } else {
            let links = links_of.get(ino).copied().unwrap_or(0);
            assert_eq!(rec.nlink, links, "link count of ino {ino}");
            assert!(
                links > 0
                    || s.orphans
                        .contains_key(records::ino_key(*ino))
                        .expect("orphans")
            );
        }
        if rec.kind == FileKind::File {
            assert!(s.content.stat(*ino, 0).is_ok(), "content of ino {ino}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    #[test]
    fn store_behaves_like_the_kernel(ops in prop::collection::vec(op(), 1..40)) {
        let state = tempfile::tempdir().expect("state");
        let disk = tempfile::tempdir().expect("disk");
        let s = Store::load(state.path(), (0, 0)).expect("store");
        s.connect(CONN);
        for (i, op) in ops.iter().enumerate() {
            let want = on_disk(disk.path(), op);
            let got = in_store(&s, op);
            prop_assert_eq!(got, want, "step {}: {:?}", i, op);
            check_invariants(&s);
        }
        prop_assert_eq!(store_tree(&s), disk_tree(disk.path()));
    }
}

#[test]
fn concurrent_operations_keep_the_store_consistent() {
    let state = tempfile::tempdir().expect("state");
    let s = std::sync::Arc::new(Store::load(state.path(), (0, 0)).expect("store"));
    s.connect(CONN);
    for d in ["x", "y"] {
        s.mkdir(Ino::ROOT, &Name::from(d), 0o755, ME)
            .expect("mkdir");
    }
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut seed = t * 7919 + 1;
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let paths = ["a", "b", "x/a", "x/b", "y/a", "y/b", "x/c", "y/c"];
                for _ in 0..300 {
                    let a = paths[(next() % 8) as usize];
                    let b = paths[(next() % 8) as usize];
                    let op = match next() % 6 {
                        0 => Op::Create(a.into()),
                        1 => Op::Mkdir(a.into()),
                        2 => Op::Unlink(a.into()),
                        3 => Op::Rmdir(a.into()),
                        4 => Op::Link(a.into(), b.into()),
                        _ => Op::Rename(a.into(), b.into(), (next() % 3) as u8),
                    };
                    // Outcomes race; only consistency is checked.
                    let _ = in_store(&s, &op);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    check_invariants(&s);
}
