//! Invalidation (issue item 3): what a peer changed shows on this mount at
//! once, not after the kernel's cache TTL. Both mounts run with an
//! attribute and entry TTL of 60 s, so every check below, bounded well
//! under it, can only pass because mountd's invalidation stream told the
//! kernel (`inval_inode`, `inval_entry`) and dropped its own caches: the
//! cached attributes and pages of a file a rewrote, the positive entry of
//! a file a removed, the negative entry of a name a created. (With the
//! invalidation task switched off, the check of the rewrite timed out
//! after 15 s.)

use harness::daemons::Options;
use harness::pair::{LinkMode, Pair, PairOptions};
use harness::process::signal;
use harness::sync_helpers::{PROPAGATION, not_local_entry, write_pattern};
use harness::wait::poll_until;
use harness::{Watchdog, assert_errno};
use nix::sys::signal::Signal;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);
/// Far below the TTL the kernel was given.
const SOON: Duration = Duration::from_secs(15);

#[test]
fn a_peers_changes_show_before_the_cache_ttl_ends() {
    let _w = Watchdog::arm("sync_inval", LIMIT);
    let p = Pair::start(PairOptions {
        node: Options {
            mountd_args: vec!["--attr-ttl".into(), "60s".into()],
            ..Options::default()
        },
        ..PairOptions::new(LinkMode::Loopback)
    });
    let (a, b) = (p.a.path("f.txt"), p.b.path("f.txt"));

    // b looks the name up before it exists: mountd answers a negative
    // entry, which the kernel caches for the 60 s TTL, so b sees the name
    // below only because a's create was announced.
    assert_errno(
        std::fs::metadata(&b),
        libc::ENOENT,
        "stat before a creates it",
    );
    std::fs::write(&a, b"one\n").expect("create on a");
    poll_until("b to see the new name", SOON, || {
        (std::fs::read(&b).ok()? == b"one\n").then_some(())
    });

    // b caches the attributes and the pages; a rewrites the file longer.
    let before = std::fs::metadata(&b).expect("stat on b");
    assert_eq!(before.len(), 4);
    assert_eq!(std::fs::read(&b).expect("read on b"), b"one\n");
    let v2 = b"two, and longer than one\n";
    std::fs::write(&a, v2).expect("rewrite on a");
    poll_until("b to see the new size and bytes", SOON, || {
        let len = std::fs::metadata(&b).ok()?.len();
        (len == v2.len() as u64 && std::fs::read(&b).ok()? == v2).then_some(())
    });

    // a removes it: b's positive entry goes too.
    std::fs::remove_file(&a).expect("unlink on a");
    poll_until("b to see the name gone", SOON, || {
        std::fs::metadata(&b).is_err().then_some(())
    });
    assert_errno(
        std::fs::metadata(&b),
        libc::ENOENT,
        "stat after a removed it",
    );
}

/// More changes than syncd's invalidation queue keeps (4,096 items).
const OVERFLOW: usize = 4_400;

/// b's syncd applied a's file `name`, larger than the eager-fetch size:
/// it is listed as not local on b (seen through b's control socket, not
/// b's mount).
fn applied_on_b(p: &Pair, name: &str) {
    poll_until(&format!("b's syncd to apply {name}"), PROPAGATION, || {
        not_local_entry(&p.b.ctl().not_local(), name).map(|_| ())
    });
}

#[test]
fn a_mount_that_fell_behind_the_stream_drops_every_cache() {
    // A TTL far longer than the test (whose 4,400 creates can take most
    // of a minute on a busy machine), so no entry can end by itself.
    let _w = Watchdog::arm("sync_inval all", LIMIT);
    let p = Pair::start(PairOptions {
        node: Options {
            mountd_args: vec!["--attr-ttl".into(), "3600s".into()],
            ..Options::default()
        },
        ..PairOptions::new(LinkMode::Loopback)
    });
    let (a, b) = (p.a.path("x.txt"), p.b.path("x.txt"));
    std::fs::write(&a, b"one\n").expect("create on a");
    poll_until("b to read x.txt", PROPAGATION, || {
        (std::fs::read(&b).ok()? == b"one\n").then_some(())
    });
    assert_eq!(std::fs::metadata(&b).expect("stat on b").len(), 4);
    // b's kernel caches an absence (a negative entry) and a name.
    let (late_a, late_b) = (p.a.path("late.txt"), p.b.path("late.txt"));
    assert_errno(
        std::fs::metadata(&late_b),
        libc::ENOENT,
        "late.txt before a creates it",
    );
    std::fs::write(p.a.path("gone.txt"), b"gone\n").expect("create gone.txt on a");
    let gone_b = p.b.path("gone.txt");
    poll_until("b to see gone.txt", PROPAGATION, || {
        std::fs::metadata(&gone_b).ok().map(drop)
    });

    // b's mountd stops reading the stream. Whatever poll it had waiting
    // is answered by the first change (first.bin), before x.txt changes.
    let mountd = p.b.mountd_pid().expect("b's mountd runs");
    signal(mountd, Signal::SIGSTOP);
    write_pattern(&p.a.path("first.bin"), 1, 2 << 20);
    applied_on_b(&p, "first.bin");
    let v2 = b"two, and longer than one\n";
    std::fs::write(&a, v2).expect("rewrite on a");
    std::fs::write(&late_a, b"late\n").expect("create late.txt on a");
    std::fs::remove_file(p.a.path("gone.txt")).expect("unlink gone.txt on a");
    std::fs::create_dir(p.a.path("many")).expect("mkdir on a");
    for i in 0..OVERFLOW {
        std::fs::write(p.a.path(format!("many/{i}")), b"").expect("create on a");
    }
    write_pattern(&p.a.path("last.bin"), 2, 2 << 20);
    applied_on_b(&p, "last.bin");
    signal(mountd, Signal::SIGCONT);

    // x.txt's own invalidation is no longer kept: only the "drop
    // everything" answer can make b's kernel forget its attributes and
    // pages before the 60 s TTL.
    poll_until("b to see x.txt's new size and bytes", SOON, || {
        let len = std::fs::metadata(&b).ok()?.len();
        (len == v2.len() as u64 && std::fs::read(&b).ok()? == v2).then_some(())
    });
    // The kernel's entries go too (FUSE_NOTIFY_INC_EPOCH): the cached
    // absence of late.txt and the cached name gone.txt (whose inode the
    // kernel still references; without the epoch its stale entry would
    // stat as a removed file with link count 0).
    poll_until("b to see late.txt", SOON, || {
        (std::fs::read(&late_b).ok()? == b"late\n").then_some(())
    });
    poll_until("b to see gone.txt gone", SOON, || {
        std::fs::metadata(&gone_b).is_err().then_some(())
    });
    assert_errno(
        std::fs::metadata(&gone_b),
        libc::ENOENT,
        "gone.txt after a removed it",
    );
    let log = std::fs::read_to_string(p.b.mountd_log_path()).expect("b's mountd log");
    assert!(
        log.contains("dropping every cache"),
        "b's mountd never took the drop-everything path"
    );
}
