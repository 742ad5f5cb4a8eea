//! A restart of either syncd in the middle of sync (SIGKILL, then start
//! on the same state) loses nothing and duplicates nothing: both trees
//! converge to exactly what was written, without conflict copies.
//!
//! "In the middle" is proven, not hoped for: the link is slowed so that a
//! batch takes seconds to cross, and as soon as the receiver shows the
//! first file of the batch the sender's namespace is stalled (every packet
//! dropped), which freezes the receiver's progress. The receiver is killed
//! only if it then shows some of the batch but not all of it with its
//! bytes local; otherwise (the batch crossed before the stall) the link is
//! released and a new batch is tried, a bounded number of times.

use harness::Watchdog;
use harness::pair::{LinkMode, Pair, PairOptions, Side};
use harness::sync_helpers::{PROPAGATION, not_local_entry, wait_content, write_pattern};
use harness::tree::{Kind, conflict_copies, wait_converged};
use harness::wait::try_poll_until;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);
/// Batches tried before giving up on catching the receiver mid-sync.
const ATTEMPTS: usize = 5;
/// The link's rate while a batch crosses.
const SLOW: &str = "256kbit";

/// What `on` has of `batch` (paths relative to the mounts) while the link
/// is stalled: how many names it shows, and whether any of those still
/// waits for its bytes.
fn progress(p: &Pair, on: Side, batch: &[PathBuf]) -> (usize, bool) {
    let node = p.node(on);
    let shown: Vec<&PathBuf> = batch.iter().filter(|r| node.path(r).exists()).collect();
    let files = node.ctl().not_local();
    let waiting = shown.iter().any(|r| {
        r.to_str()
            .is_some_and(|s| not_local_entry(&files, s).is_some())
    });
    (shown.len(), waiting)
}

/// Write batches from `from` until one is caught crossing to the other
/// side: `from` is then stalled with the other side part way through it.
/// Returns every file written.
fn catch_mid_sync(p: &Pair, from: Side, tag: &str) -> Vec<PathBuf> {
    let to = from.other();
    let mut written = Vec::new();
    p.slow(SLOW);
    for attempt in 0..ATTEMPTS {
        let dir = format!("{tag}{attempt}");
        std::fs::create_dir(p.node(from).path(&dir)).expect("mkdir");
        let mut batch = Vec::new();
        for f in 0..60 {
            let rel = PathBuf::from(format!("{dir}/f{f}.txt"));
            std::fs::write(
                p.node(from).path(&rel),
                format!("{}\n", rel.display()).repeat(f + 1),
            )
            .expect("write");
            batch.push(rel);
        }
        written.extend(batch.iter().cloned());
        let first = p.node(to).path(&batch[0]);
        try_poll_until(PROPAGATION, || first.exists().then_some(()))
            .unwrap_or_else(|| panic!("{} never showed on {to:?}", batch[0].display()));
        p.stall(from);
        let (shown, waiting) = progress(p, to, &batch);
        eprintln!(
            "attempt {attempt}: {to:?} shows {shown} of {} names, bytes still to come: {waiting}",
            batch.len()
        );
        if shown < batch.len() || waiting {
            return written;
        }
        p.unstall(from);
    }
    panic!("the batch crossed before the stall {ATTEMPTS} times: never caught mid-sync");
}

#[test]
fn syncd_killed_mid_sync_on_either_side_converges_without_loss_or_duplicates() {
    let _w = Watchdog::arm("restart", LIMIT);
    let mut p = Pair::start_mode(LinkMode::Netns);
    let mut expect: Vec<PathBuf> = Vec::new();
    let big = write_pattern(&p.a.path("big.bin"), 2, 24 << 20);
    expect.push("big.bin".into());

    // The receiver dies part way through a batch from a.
    expect.extend(catch_mid_sync(&p, Side::A, "a"));
    p.kill_syncd(Side::B);
    p.restart_syncd(Side::B);
    p.unstall(Side::A);
    p.unslow();

    // Then the receiver of a batch from b, the other way round.
    p.wait_connected(Duration::from_secs(60));
    expect.extend(catch_mid_sync(&p, Side::B, "b"));
    p.kill_syncd(Side::A);
    p.restart_syncd(Side::A);
    p.unstall(Side::B);
    p.unslow();
    p.wait_connected(Duration::from_secs(60));

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
        t[std::path::Path::new("big.bin")].hash.as_deref(),
        Some(big.as_str())
    );
    for rel in expect
        .iter()
        .filter(|r| r.extension().is_some_and(|e| e == "txt"))
    {
        let f: usize = rel
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.strip_prefix('f'))
            .and_then(|n| n.parse().ok())
            .expect("file names are f<n>.txt");
        let want = format!("{}\n", rel.display()).repeat(f + 1).into_bytes();
        for side in [Side::A, Side::B] {
            assert_eq!(
                std::fs::read(p.node(side).path(rel)).expect("read"),
                want,
                "{} on {side:?}",
                rel.display(),
            );
        }
    }
}

/// A file held open for writing across a SIGKILL and restart of its
/// syncd: mountd keeps the handle, and syncd, which cannot know a kept
/// handle's access mode, counts its release as a writer's, so what was
/// written through it after the restart is versioned and reaches the
/// peer. (Before, a kept handle counted as a reader's at its release and
/// the write stayed on this machine until the file changed again.)
#[test]
fn writes_through_a_handle_kept_across_a_syncd_restart_reach_the_peer() {
    let _w = Watchdog::arm("sync_restart::kept_handle", Duration::from_secs(300));
    let mut p = Pair::start(PairOptions::new(LinkMode::Loopback));
    let (a, b) = (p.a.path("kept.txt"), p.b.path("kept.txt"));
    std::fs::write(&a, b"before\n").expect("create on a");
    wait_content(&b, b"before\n", PROPAGATION);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .expect("open for writing on a");
    p.kill_syncd(Side::A);
    p.restart_syncd(Side::A);
    f.write_all(b"after, and longer\n")
        .expect("write through the kept handle");
    drop(f);
    wait_content(&b, b"after, and longer\n", PROPAGATION);
}
