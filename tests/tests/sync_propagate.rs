//! Every kind of change made on one node's mount shows on the other's,
//! both ways, byte-identical: create, write, append, overwrite in place,
//! mkdir (nested), symlink, hard link, chmod, truncate, times, rename of a
//! file, of a directory and over an existing file, unlink, rmdir; and a
//! thousand small files. Two real nodes in network namespaces joined by a
//! veth pair ([`harness::pair`]); convergence is a walk of both mounts
//! (names, kinds, modes, sizes, BLAKE3 of contents, symlink targets).

use harness::pair::{LinkMode, Pair, Side};
use harness::sync_helpers::{PROPAGATION, patch_file, wait_gone, write_pattern};
use harness::tree::{Kind, wait_converged};
use harness::{Watchdog, sys};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Make every kind of change on `src`'s mount, phase by phase, and check
/// after each phase that `dst`'s mount shows the same tree.
fn every_change_kind(p: &Pair, src: Side, dst: Side) {
    let (s, d) = (p.node(src), p.node(dst));
    let (sm, dm) = (s.mnt(), d.mnt());

    // Phase 1: creates of every shared kind.
    std::fs::write(s.path("f.txt"), b"hello\n").expect("create f.txt");
    std::fs::create_dir_all(s.path("dir/sub")).expect("mkdir -p dir/sub");
    let _ = write_pattern(&s.path("dir/sub/data.bin"), 7, 3 << 20);
    write_pattern(&s.path("trunc.bin"), 8, 2 << 20);
    std::os::unix::fs::symlink("dir/sub/data.bin", s.path("link")).expect("symlink");
    std::fs::hard_link(s.path("f.txt"), s.path("f-hard.txt")).expect("hard link");
    std::fs::write(s.path("exec.sh"), b"#!/bin/sh\necho hi\n").expect("create exec.sh");
    chmod(&s.path("exec.sh"), 0o755);
    std::fs::write(s.path("empty"), b"").expect("create empty");
    let t = wait_converged(&sm, &dm, PROPAGATION);
    assert_eq!(t[Path::new("link")].kind, Kind::Symlink);
    assert_eq!(t[Path::new("exec.sh")].mode, 0o755);
    assert_eq!(t[Path::new("dir/sub/data.bin")].size, 3 << 20);

    // Phase 2: changes of content, size, mode and times.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(s.path("f.txt"))
            .expect("open f.txt to append");
        f.write_all(b"more\n").expect("append");
    }
    patch_file(
        &s.path("dir/sub/data.bin"),
        (3 << 20) / 2,
        b"PATCHED IN THE MIDDLE",
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.path("trunc.bin"))
        .and_then(|f| f.set_len(100_000))
        .expect("truncate trunc.bin");
    chmod(&s.path("exec.sh"), 0o700);
    // 2020-01-02T03:04:05.5Z, set after the append so that it stays.
    let when = (1_577_934_245i64, 500_000_000i64);
    sys::utimens(&s.path("f.txt"), when, when).expect("utimensat f.txt");
    let t = wait_converged(&sm, &dm, PROPAGATION);
    assert_eq!(t[Path::new("f.txt")].size, 11);
    assert_eq!(t[Path::new("trunc.bin")].size, 100_000);
    assert_eq!(t[Path::new("exec.sh")].mode, 0o700);
    let mut seen = None;
    let ok = harness::wait::try_poll_until(PROPAGATION, || {
        let md = std::fs::metadata(d.path("f.txt")).ok()?;
        seen = Some((md.mtime(), md.mtime_nsec()));
        (md.mtime() == when.0 && md.mtime_nsec() == when.1).then_some(())
    });
    let src_md = std::fs::metadata(s.path("f.txt")).expect("stat f.txt where it was set");
    assert!(
        ok.is_some(),
        "f.txt's mtime on {} stayed {seen:?}; set to {when:?} on {} (which shows {:?})",
        d.name(),
        s.name(),
        (src_md.mtime(), src_md.mtime_nsec())
    );
    // The hard link is one file there too.
    let (a, b) = (
        std::fs::metadata(d.path("f.txt")).expect("stat f.txt"),
        std::fs::metadata(d.path("f-hard.txt")).expect("stat f-hard.txt"),
    );
    assert_eq!(
        a.ino(),
        b.ino(),
        "f.txt and f-hard.txt are one inode on {}",
        d.name()
    );
    assert_eq!(a.nlink(), 2);

    // Phase 3: renames (a file, a directory with content, over a file).
    std::fs::rename(s.path("f.txt"), s.path("g.txt")).expect("rename f.txt");
    std::fs::rename(s.path("dir"), s.path("dir2")).expect("rename dir");
    std::fs::rename(s.path("exec.sh"), s.path("empty")).expect("rename over empty");
    let t = wait_converged(&sm, &dm, PROPAGATION);
    assert!(t.contains_key(Path::new("dir2/sub/data.bin")));
    assert!(!t.contains_key(Path::new("dir")));
    assert_eq!(t[Path::new("empty")].mode, 0o700);

    // Phase 4: deletes.
    std::fs::remove_file(s.path("g.txt")).expect("unlink g.txt");
    std::fs::remove_file(s.path("link")).expect("unlink link");
    std::fs::remove_file(s.path("dir2/sub/data.bin")).expect("unlink data.bin");
    std::fs::remove_dir(s.path("dir2/sub")).expect("rmdir sub");
    std::fs::remove_dir(s.path("dir2")).expect("rmdir dir2");
    wait_gone(&d.path("dir2"), PROPAGATION);
    let t = wait_converged(&sm, &dm, PROPAGATION);
    let names: Vec<_> = t.keys().map(|p| p.display().to_string()).collect();
    assert_eq!(names, ["", "empty", "f-hard.txt", "trunc.bin"], "{t:?}");
    assert_eq!(
        std::fs::read(d.path("f-hard.txt")).expect("read f-hard.txt"),
        b"hello\nmore\n"
    );
}

#[test]
fn every_change_kind_travels_from_a_to_b() {
    let _w = Watchdog::arm("a_to_b", LIMIT);
    let p = Pair::start_mode(LinkMode::Netns);
    every_change_kind(&p, Side::A, Side::B);
}

#[test]
fn every_change_kind_travels_from_b_to_a() {
    let _w = Watchdog::arm("b_to_a", LIMIT);
    let p = Pair::start_mode(LinkMode::Netns);
    every_change_kind(&p, Side::B, Side::A);
}

#[test]
fn a_thousand_small_files_travel_and_their_delete_too() {
    let _w = Watchdog::arm("thousand", LIMIT);
    let p = Pair::start_mode(LinkMode::Netns);
    for d in 0..10 {
        let dir = p.b.path(format!("d{d}"));
        std::fs::create_dir(&dir).expect("mkdir");
        for f in 0..100 {
            std::fs::write(
                dir.join(format!("f{f}")),
                format!("file {d}/{f}\n").repeat(f + 1),
            )
            .expect("write a small file");
        }
    }
    let t = wait_converged(&p.b.mnt(), &p.a.mnt(), PROPAGATION * 3);
    let files = t.values().filter(|e| e.kind == Kind::File).count();
    assert_eq!(files, 1000);
    for d in 0..10 {
        std::fs::remove_dir_all(p.b.path(format!("d{d}"))).expect("rm -r");
    }
    let t = wait_converged(&p.b.mnt(), &p.a.mnt(), PROPAGATION * 3);
    assert_eq!(t.len(), 1, "only the root is left: {t:?}");
}
