//! docs/semantics.md, "Between peers": close-to-open consistency (a
//! descriptor open on b keeps reading the version it opened while a new
//! one arrives from a; the next open sees the new one), and what is not
//! shared: extended attributes, fifos, and owners (files from a peer
//! belong to the receiving syncd's `share_owner`).

use harness::pair::{LinkMode, Pair, PairOptions};
use harness::sync_helpers::{PROPAGATION, wait_content};
use harness::{Watchdog, assert_errno, sys};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);

fn an_open_descriptor_keeps_the_version_it_opened(passthrough: bool) {
    let _w = Watchdog::arm("close_to_open", LIMIT);
    let mut o = PairOptions::new(LinkMode::Netns);
    o.node.passthrough = passthrough;
    let p = Pair::start(o);
    let v1 = b"version one, as b opened it\n".repeat(100);
    let v2 = b"version two, from a\n".repeat(300);
    std::fs::write(p.a.path("doc.txt"), &v1).expect("write v1 on a");
    wait_content(&p.b.path("doc.txt"), &v1, PROPAGATION);
    let held = std::fs::File::open(p.b.path("doc.txt")).expect("open on b");

    std::fs::write(p.a.path("doc.txt"), &v2).expect("write v2 on a");
    // A new open on b sees the new version...
    wait_content(&p.b.path("doc.txt"), &v2, PROPAGATION);
    // ...while the descriptor opened before still reads the old one.
    let mut buf = vec![0u8; v1.len() + 100];
    let n = held
        .read_at(&mut buf, 0)
        .expect("pread the held descriptor");
    assert!(
        buf[..n] == v1[..],
        "the descriptor opened before the new version arrived reads {n} bytes starting {:?}, \
         not the version it opened",
        String::from_utf8_lossy(&buf[..n.min(40)])
    );
    if passthrough {
        // b's read-only opens of a file a peer changed are plain (page
        // cache) opens; the open of the new version beside the held one
        // could not share its page cache, so it was a direct-I/O open.
        let log = p.b.mountd_log();
        assert!(
            log.contains("this open reads its own version with direct I/O"),
            "b's mountd did not open the new version with direct I/O:\n{log}"
        );
    }
    drop(held);
    assert!(std::fs::read(p.b.path("doc.txt")).expect("reopen") == v2);
}

/// The one case the kernel does not allow (one backing file per inode):
/// b holds a passthrough open of a file it wrote itself when a's version
/// arrives. An open for writing then fails with `EBUSY` (it would write
/// into a version syncd no longer keeps), a read-only open reads the held
/// version; once the held descriptor is closed, both work on a's version.
#[test]
fn an_open_for_writing_beside_a_held_passthrough_open_of_an_older_version_is_ebusy() {
    let _w = Watchdog::arm("ebusy_beside_passthrough", LIMIT);
    let p = Pair::start(PairOptions::new(LinkMode::Netns));
    let v1 = b"written on b\n".repeat(50);
    let v2 = b"a's version, longer than b's\n".repeat(80);
    std::fs::write(p.b.path("mine.txt"), &v1).expect("write v1 on b");
    wait_content(&p.a.path("mine.txt"), &v1, PROPAGATION);
    // Written here and never changed by a peer in this run: passthrough.
    let held = std::fs::File::open(p.b.path("mine.txt")).expect("open on b");

    std::fs::write(p.a.path("mine.txt"), &v2).expect("write v2 on a");
    // b's store has a's version once its size shows (attributes come
    // from the store, not from the held descriptor).
    harness::wait::poll_until("b to apply a's version", PROPAGATION, || {
        (std::fs::metadata(p.b.path("mine.txt")).ok()?.size() == v2.len() as u64).then_some(())
    });
    assert_errno(
        std::fs::OpenOptions::new()
            .write(true)
            .open(p.b.path("mine.txt")),
        libc::EBUSY,
        "open for writing beside the held passthrough open",
    );
    let mut buf = vec![0u8; v2.len() + 100];
    let beside = std::fs::File::open(p.b.path("mine.txt")).expect("read-only open beside it");
    let n = beside.read_at(&mut buf, 0).expect("pread beside");
    assert!(
        buf[..n] == v1[..],
        "a read-only open beside the held one reads {n} bytes, not the held version"
    );
    drop(beside);
    drop(held);
    assert!(std::fs::read(p.b.path("mine.txt")).expect("reopen") == v2);
    std::fs::OpenOptions::new()
        .append(true)
        .open(p.b.path("mine.txt"))
        .expect("open for writing once the old version is closed");
}

#[test]
fn an_open_descriptor_keeps_the_version_it_opened_passthrough() {
    an_open_descriptor_keeps_the_version_it_opened(true);
}

#[test]
fn an_open_descriptor_keeps_the_version_it_opened_plain() {
    an_open_descriptor_keeps_the_version_it_opened(false);
}

#[test]
fn xattrs_fifos_and_owners_are_not_shared() {
    let _w = Watchdog::arm("not_shared", LIMIT);
    let mut o = PairOptions::new(LinkMode::Netns);
    o.config_extra = "share_owner = \"1234:1235\"\n".into();
    let p = Pair::start(o);
    let f = p.a.path("owned.txt");
    std::fs::write(&f, b"content\n").expect("write on a");
    std::os::unix::fs::chown(&f, Some(4242), Some(4243)).expect("chown on a");
    sys::setxattr(&f, "user.note", b"stays on a", 0).expect("setxattr on a");
    nix::unistd::mkfifo(
        &p.a.path("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .expect("mkfifo on a");
    // A marker written last: once it is on b, everything before was seen.
    std::fs::write(p.a.path("marker"), b"last\n").expect("write marker");
    wait_content(&p.b.path("marker"), b"last\n", PROPAGATION);
    wait_content(&p.b.path("owned.txt"), b"content\n", PROPAGATION);

    let md = std::fs::metadata(p.b.path("owned.txt")).expect("stat on b");
    assert_eq!(
        (md.uid(), md.gid()),
        (1234, 1235),
        "a file from a peer belongs to b's share owner"
    );
    assert_errno(
        sys::getxattr(&p.b.path("owned.txt"), "user.note"),
        libc::ENODATA,
        "the xattr set on a, read on b",
    );
    assert!(
        std::fs::symlink_metadata(p.b.path("pipe")).is_err(),
        "the fifo stays on a"
    );
    // Still there on a.
    assert_eq!(
        sys::getxattr(&f, "user.note").expect("getxattr on a"),
        b"stays on a"
    );
    assert!(std::fs::symlink_metadata(p.a.path("pipe")).is_ok());
}
