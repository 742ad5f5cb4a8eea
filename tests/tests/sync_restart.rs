//! A restart of either syncd in the middle of sync (SIGKILL, then start
//! on the same state) loses nothing and duplicates nothing: both trees
//! converge to exactly what was written, without conflict copies.

use harness::Watchdog;
use harness::pair::{LinkMode, Pair, Side};
use harness::sync_helpers::{PROPAGATION, write_pattern};
use harness::tree::{Kind, conflict_copies, wait_converged};
use std::path::PathBuf;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);

#[test]
fn syncd_killed_mid_sync_on_either_side_converges_without_loss_or_duplicates() {
    let _w = Watchdog::arm("restart", LIMIT);
    let mut p = Pair::start_mode(LinkMode::Netns);
    let mut expect: Vec<PathBuf> = Vec::new();
    let mut hashes = Vec::new();
    for d in 0..4 {
        std::fs::create_dir(p.a.path(format!("d{d}"))).expect("mkdir");
        for f in 0..60 {
            let rel = format!("d{d}/f{f}.txt");
            std::fs::write(p.a.path(&rel), format!("{rel}\n").repeat(f + 1)).expect("write");
            expect.push(rel.into());
        }
    }
    hashes.push(write_pattern(&p.a.path("d0/big.bin"), 2, 24 << 20));
    expect.push("d0/big.bin".into());

    // The receiver dies while it applies a's changes, then the sender
    // while b catches up again.
    p.kill_syncd(Side::B);
    p.restart_syncd(Side::B);
    for f in 0..20 {
        std::fs::write(p.b.path(format!("from-b-{f}")), format!("{f}\n")).expect("write on b");
        expect.push(format!("from-b-{f}").into());
    }
    p.kill_syncd(Side::A);
    p.restart_syncd(Side::A);
    p.wait_connected(Duration::from_secs(30));

    let t = wait_converged(&p.a.mnt(), &p.b.mnt(), PROPAGATION * 3);
    assert!(
        conflict_copies(&t).is_empty(),
        "no conflict copies: {:?}",
        conflict_copies(&t)
    );
    let mut files: Vec<PathBuf> = t
        .iter()
        .filter(|(_, e)| e.kind == Kind::File)
        .map(|(p, _)| p.clone())
        .collect();
    files.sort();
    expect.sort();
    assert_eq!(files, expect, "exactly the files written, once each");
    assert_eq!(
        t[std::path::Path::new("d0/big.bin")].hash.as_deref(),
        Some(hashes[0].as_str())
    );
    for d in 0..4 {
        for f in 0..60 {
            let rel = format!("d{d}/f{f}.txt");
            assert_eq!(
                std::fs::read(p.b.path(&rel)).expect("read on b"),
                format!("{rel}\n").repeat(f + 1).into_bytes()
            );
        }
    }
}
