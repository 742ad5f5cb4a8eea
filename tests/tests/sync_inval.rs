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
use harness::wait::poll_until;
use harness::{Watchdog, assert_errno};
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
