//! Differential test: the same random operation sequences applied to a
//! directory on the mount and to a directory on local disk (ext4) must give
//! the same result for every operation (success, or the same errno) and the
//! same final trees (names, kinds, sizes, contents, permissions, link
//! counts, symlink targets).
//!
//! Paths come from a small pool so that sequences collide often (rename
//! over existing names, rmdir of non-empty directories, links into
//! directories that were just removed...). Cases default to 64 of up to 60
//! operations; `PROPTEST_CASES` overrides the count and
//! `PROPTEST_RNG_SEED` fixes the seed.

use harness::{KeibiFixture, Options, Pattern, setup};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const PATHS: &[&str] = &[
    "a", "b", "c", "d1", "d2", "d1/a", "d1/b", "d2/a", "d1/d3", "d1/d3/a",
];
const TARGETS: &[&str] = &["a", "b", "d1", "d1/a", "nowhere", "d2/a"];

#[derive(Clone, Debug)]
enum Op {
    Create(usize, u32),
    Write(usize, u64, usize, u64),
    Truncate(usize, u64),
    Rename(usize, usize),
    Unlink(usize),
    Mkdir(usize),
    Rmdir(usize),
    Link(usize, usize),
    Symlink(usize, usize),
    Chmod(usize, u32),
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PATHS.len();
    prop_oneof![
        3 => (p.clone(), 0o000u32..0o1000).prop_map(|(a, m)| Op::Create(a, m | 0o600)),
        4 => (p.clone(), 0u64..100_000, 0usize..20_000, any::<u64>())
            .prop_map(|(a, o, l, s)| Op::Write(a, o, l, s)),
        2 => (p.clone(), 0u64..120_000).prop_map(|(a, s)| Op::Truncate(a, s)),
        3 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        2 => p.clone().prop_map(Op::Unlink),
        3 => p.clone().prop_map(Op::Mkdir),
        2 => p.clone().prop_map(Op::Rmdir),
        1 => (p.clone(), p.clone()).prop_map(|(a, b)| Op::Link(a, b)),
        1 => (0..TARGETS.len(), p.clone()).prop_map(|(t, a)| Op::Symlink(t, a)),
        1 => (p, 0o000u32..0o10000).prop_map(|(a, m)| Op::Chmod(a, m)),
    ]
}

/// The same start for every case, so that random operations find
/// directories and files to work on.
fn prelude() -> Vec<Op> {
    let at = |p: &str| PATHS.iter().position(|q| *q == p).expect("a pool path");
    vec![
        Op::Mkdir(at("d1")),
        Op::Mkdir(at("d2")),
        Op::Mkdir(at("d1/d3")),
        Op::Create(at("a"), 0o644),
        Op::Write(at("a"), 0, 5000, 1),
        Op::Create(at("d1/a"), 0o600),
        Op::Create(at("d1/d3/a"), 0o640),
    ]
}

/// Apply `op` under `root`; the result is `Ok` or the errno.
fn apply(root: &Path, op: &Op) -> Result<(), i32> {
    let at = |i: usize| root.join(PATHS[i]);
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(-1);
    match *op {
        Op::Create(a, mode) => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode)
            .open(at(a))
            .map(drop)
            .map_err(errno),
        Op::Write(a, off, len, seed) => {
            let f = OpenOptions::new().write(true).open(at(a)).map_err(errno)?;
            f.write_all_at(&Pattern::new(seed).bytes(off, len), off)
                .map_err(errno)
        }
        Op::Truncate(a, size) => {
            let c = harness::sys::cpath(&at(a));
            // SAFETY: valid C string.
            if unsafe { libc::truncate(c.as_ptr(), size as i64) } == 0 {
                Ok(())
            } else {
                Err(errno(std::io::Error::last_os_error()))
            }
        }
        Op::Rename(a, b) => fs::rename(at(a), at(b)).map_err(errno),
        Op::Unlink(a) => fs::remove_file(at(a)).map_err(errno),
        Op::Mkdir(a) => fs::create_dir(at(a)).map_err(errno),
        Op::Rmdir(a) => fs::remove_dir(at(a)).map_err(errno),
        Op::Link(a, b) => fs::hard_link(at(a), at(b)).map_err(errno),
        Op::Symlink(t, a) => std::os::unix::fs::symlink(TARGETS[t], at(a)).map_err(errno),
        Op::Chmod(a, mode) => {
            fs::set_permissions(at(a), fs::Permissions::from_mode(mode)).map_err(errno)
        }
    }
}

/// What the comparison sees of one entry.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    File {
        perm: u32,
        nlink: u64,
        size: u64,
        content: Vec<u8>,
    },
    Dir {
        perm: u32,
        nlink: u64,
    },
    Symlink {
        target: PathBuf,
    },
    Other {
        perm: u32,
    },
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
            let e = e.expect("entry");
            let r = rel.join(e.file_name());
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).expect("lstat");
            let ft = md.file_type();
            let perm = md.mode() & 0o7777;
            let node = if ft.is_symlink() {
                Node::Symlink {
                    target: fs::read_link(&p).expect("readlink"),
                }
            } else if ft.is_dir() {
                stack.push(r.clone());
                Node::Dir {
                    perm,
                    nlink: md.nlink(),
                }
            } else if ft.is_file() {
                Node::File {
                    perm,
                    nlink: md.nlink(),
                    size: md.len(),
                    content: fs::read(&p).expect("read"),
                }
            } else {
                Node::Other { perm }
            };
            out.insert(r, node);
        }
    }
    out
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn run_differential(fx: &KeibiFixture, name: &str) {
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 256,
        max_shrink_time: 60_000,
        ..Config::default()
    };
    let counter = AtomicUsize::new(0);
    let (oks, errs) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let mut runner = TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(op(), 1..=60), |ops| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let on_mount = fx.path(format!("{name}-{n}"));
        let on_disk = fx.scratch().join(format!("{name}-{n}"));
        fs::create_dir(&on_mount).expect("mkdir on the mount");
        fs::create_dir(&on_disk).expect("mkdir on local disk");
        for (i, op) in prelude().iter().chain(ops.iter()).enumerate() {
            let want = apply(&on_disk, op);
            let got = apply(&on_mount, op);
            match want {
                Ok(()) => oks.fetch_add(1, Ordering::Relaxed),
                Err(_) => errs.fetch_add(1, Ordering::Relaxed),
            };
            if want != got {
                return Err(TestCaseError::fail(format!(
                    "op {i} {op:?}: local disk gave {}, the mount gave {}",
                    show(want),
                    show(got)
                )));
            }
        }
        let (want, got) = (snapshot(&on_disk), snapshot(&on_mount));
        if want != got {
            return Err(TestCaseError::fail(format!(
                "final trees differ:\nlocal disk: {want:#?}\nmount: {got:#?}"
            )));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The sequences must mostly do things, not just collect errnos.
    let (oks, errs) = (oks.into_inner(), errs.into_inner());
    eprintln!("{name}: {oks} operations succeeded, {errs} failed alike on both sides");
    assert!(
        oks * 2 > errs,
        "too few operations succeeded ({oks} ok, {errs} errors): the generator is off"
    );
}

fn show(r: Result<(), i32>) -> String {
    match r {
        Ok(()) => "Ok".into(),
        Err(e) => ipc_schema::error::errno_name(e),
    }
}

#[test]
fn random_sequences_match_local_disk_passthrough() {
    let (_w, fx) = setup(
        "differential passthrough",
        Duration::from_secs(300),
        Options::default(),
    );
    run_differential(&fx, "pt");
    fx.assert_io_path();
}

#[test]
fn random_sequences_match_local_disk_plain() {
    let (_w, fx) = setup(
        "differential plain",
        Duration::from_secs(300),
        Options {
            passthrough: false,
            ..Options::default()
        },
    );
    run_differential(&fx, "plain");
    fx.assert_io_path();
}
