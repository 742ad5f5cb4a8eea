//! Persistence: after the daemons restart, the same tree, the same bytes
//! and the same inode numbers; inode numbers are never reused.

use harness::sys;
use harness::{KeibiFixture, Options, Pattern, hash_file, setup};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What must survive a restart, per path.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    size: u64,
    mtime: (i64, i64),
    hash: Option<(u64, u64)>,
    target: Option<PathBuf>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn record(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).expect("readdir") {
            let e = e.expect("entry");
            let r = rel.join(e.file_name());
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).expect("lstat");
            let ft = md.file_type();
            if ft.is_dir() {
                stack.push(r.clone());
            }
            let xattrs = if ft.is_symlink() {
                Vec::new()
            } else {
                sys::listxattr(&p)
                    .expect("listxattr")
                    .into_iter()
                    .map(|n| {
                        let name =
                            String::from_utf8(n.clone()).expect("xattr names are ASCII here");
                        (n, sys::getxattr(&p, &name).expect("getxattr"))
                    })
                    .collect()
            };
            out.insert(
                r,
                Entry {
                    ino: md.ino(),
                    mode: md.mode(),
                    uid: md.uid(),
                    gid: md.gid(),
                    nlink: md.nlink(),
                    size: if ft.is_dir() { 0 } else { md.len() },
                    mtime: if ft.is_file() {
                        (md.mtime(), md.mtime_nsec())
                    } else {
                        (0, 0)
                    },
                    hash: ft.is_file().then(|| hash_file(&p).expect("hash")),
                    target: ft
                        .is_symlink()
                        .then(|| fs::read_link(&p).expect("readlink")),
                    xattrs,
                },
            );
        }
    }
    out
}

/// A tree with every kind of thing the store keeps.
fn build_tree(fx: &KeibiFixture) {
    let m = fx.mnt();
    fs::create_dir_all(m.join("src/deep/er")).expect("mkdir -p");
    for i in 0..50 {
        let len = (i * 7919) % 300_000;
        fs::write(
            m.join(format!("src/file{i}")),
            Pattern::new(i as u64).bytes(0, len),
        )
        .expect("write");
    }
    fs::write(m.join("src/deep/er/nested"), b"nested bytes").expect("write");
    let sparse = File::create(m.join("sparse")).expect("create");
    sparse.write_all_at(b"end", 5 << 20).expect("sparse write");
    drop(sparse);
    std::os::unix::fs::symlink("src/file1", m.join("link")).expect("symlink");
    fs::hard_link(m.join("src/file2"), m.join("hardlink")).expect("link");
    fs::set_permissions(m.join("src/file3"), fs::Permissions::from_mode(0o4711)).expect("chmod");
    std::os::unix::fs::chown(m.join("src/file4"), Some(4242), Some(4243)).expect("chown");
    sys::setxattr(&m.join("src/file5"), "user.kept", b"across restarts", 0).expect("setxattr");
    sys::utimens(&m.join("src/file6"), (1_000, 1), (2_000, 2)).expect("utimes");
    fs::create_dir(m.join("empty")).expect("mkdir");
    fs::write(m.join("renamed-from"), b"moved").expect("write");
    fs::rename(m.join("renamed-from"), m.join("renamed-to")).expect("rename");
    fs::write(m.join("gone"), b"x").expect("write");
    fs::remove_file(m.join("gone")).expect("unlink");
    // One fsync makes everything before it durable (it flushes the store).
    let last = OpenOptions::new()
        .write(true)
        .open(m.join("src/file0"))
        .expect("open");
    last.sync_all().expect("fsync");
}

fn max_ino(t: &BTreeMap<PathBuf, Entry>) -> u64 {
    t.values().map(|e| e.ino).max().unwrap_or(1)
}

#[test]
fn same_tree_bytes_and_inodes_after_restarting_both_daemons() {
    let (_w, mut fx) = setup(
        "persistence restart",
        Duration::from_secs(120),
        Options::default(),
    );
    build_tree(&fx);
    let before = record(&fx.mnt());
    assert!(
        before.len() > 55,
        "the tree was built: {} entries",
        before.len()
    );
    fx.restart_both();
    let after = record(&fx.mnt());
    assert_eq!(after, before, "tree after restarting syncd and mountd");
    fx.restart_mountd();
    assert_eq!(
        record(&fx.mnt()),
        before,
        "tree after restarting mountd alone"
    );
    fs::write(fx.path("new-after-restart"), b"n").expect("create after restart");
    let ino = fs::metadata(fx.path("new-after-restart"))
        .expect("stat")
        .ino();
    assert!(
        ino > max_ino(&before),
        "a new inode number ({ino}) is never one used before (max {})",
        max_ino(&before)
    );
}

#[test]
fn fsynced_tree_survives_kill_9_of_syncd() {
    let (_w, mut fx) = setup(
        "persistence kill -9",
        Duration::from_secs(120),
        Options::default(),
    );
    build_tree(&fx);
    let before = record(&fx.mnt());
    fx.kill9_syncd();
    fx.start_syncd();
    fx.wait_writable(Duration::from_secs(20));
    let after = record(&fx.mnt());
    assert_eq!(after, before, "tree after kill -9 of syncd and a restart");
    fx.restart_both();
    assert_eq!(
        record(&fx.mnt()),
        before,
        "and after a clean restart of both"
    );
}

/// How many times syncd's log (all its runs so far) says `what`.
fn said(fx: &KeibiFixture, what: &str) -> usize {
    fx.syncd_log().matches(what).count()
}

#[test]
fn a_clean_stop_skips_the_next_start_up_scan_and_a_kill_does_not() {
    const MARKED: &str = "stop marked clean";
    const SKIPPED: &str = "start-up scan skipped";
    const SCANNED: &str = "start-up scan done";
    let (_w, mut fx) = setup(
        "persistence clean stop",
        Duration::from_secs(120),
        Options::default(),
    );
    build_tree(&fx);
    let before = record(&fx.mnt());
    assert_eq!(said(&fx, SCANNED), 1, "the first start scans (no mark)");
    // A content file that no inode names, as a crash between making a
    // content file and naming it leaves: the scan removes it.
    let stray = fx.state_dir().join("content").join("0000fffffffffff0");

    let (st, by_itself) = fx.stop_syncd();
    assert!(st.success() && by_itself, "SIGTERM: {st}");
    assert_eq!(said(&fx, MARKED), 1, "a clean stop is marked");
    fs::write(&stray, b"").expect("plant a stray content file");
    fx.start_syncd();
    fx.wait_writable(Duration::from_secs(20));
    assert_eq!(said(&fx, SKIPPED), 1, "the start after it skips the scan");
    assert_eq!(said(&fx, SCANNED), 1);
    assert!(stray.exists(), "the skipped scan removed a file");
    assert_eq!(record(&fx.mnt()), before, "tree after a clean restart");

    fx.kill9_syncd();
    fx.start_syncd();
    fx.wait_writable(Duration::from_secs(20));
    assert_eq!(said(&fx, SCANNED), 2, "the start after a kill scans");
    assert_eq!(said(&fx, SKIPPED), 1, "the mark was used twice");
    assert!(!stray.exists(), "the scan after a kill kept the stray");
    assert_eq!(
        record(&fx.mnt()),
        before,
        "tree after kill -9 and a restart"
    );
}
