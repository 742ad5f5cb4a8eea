//! Sync through a relay that delays every frame, and through a connection
//! reset in the middle of a transfer (this kernel has no `netem`: the
//! relay in the test process is the network, see `harness::relay`).
//!
//! - Changes cross a link that holds every frame for 20 ms, both ways,
//!   byte-identical, and the relay counted the bytes (so they went over
//!   the network, through it).
//! - A reset (RST both ways, a torn frame) while b reads a large file of
//!   a: the read succeeds or fails with a documented errno (`EIO`,
//!   `ETIMEDOUT`) within the read deadline and a margin, never hangs; a
//!   reconnects through the relay; the file then reads with exactly a's
//!   bytes; and what crossed in total stays near one copy of the file,
//!   so verified chunks were not fetched again.

use harness::Watchdog;
use harness::pair::{Pair, PairOptions};
use harness::relay::{Dir, Fault};
use harness::sync_helpers::{PROPAGATION, read_all_bounded, wait_hash, write_pattern};
use harness::tree::{blake3_file, wait_converged};
use harness::wait::poll_until;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);
const MIB: u64 = 1 << 20;

/// Bytes the relay forwarded in `dir` over all connections.
fn relayed(p: &Pair, dir: Dir) -> u64 {
    p.relay().records().iter().map(|c| c.dir(dir).bytes).sum()
}

#[test]
fn changes_cross_a_delayed_link_both_ways_byte_identical() {
    let _w = Watchdog::arm("relay delay", LIMIT);
    let p = Pair::start_relayed(PairOptions::default(), Duration::from_millis(20));
    std::fs::create_dir(p.a.path("from-a")).expect("mkdir on a");
    for f in 0..40 {
        std::fs::write(
            p.a.path(format!("from-a/f{f}")),
            format!("a {f}\n").repeat(f + 1),
        )
        .expect("write on a");
    }
    let big = write_pattern(&p.a.path("from-a/big.bin"), 7, 3 * MIB);
    for f in 0..10 {
        std::fs::write(p.b.path(format!("from-b-{f}")), format!("b {f}\n")).expect("write on b");
    }
    std::fs::rename(p.a.path("from-a/f0"), p.a.path("from-a/renamed")).expect("rename on a");
    let t = wait_converged(&p.a.mnt(), &p.b.mnt(), PROPAGATION * 2);
    assert!(t.contains_key(std::path::Path::new("from-a/renamed")));
    assert!(!t.contains_key(std::path::Path::new("from-a/f0")));
    wait_hash(&p.b.path("from-a/big.bin"), &big, PROPAGATION);
    let out = relayed(&p, Dir::Out);
    assert!(
        out > 3 * MIB,
        "the relay forwarded only {out} bytes from a to b: big.bin did not cross through it"
    );
    assert!(relayed(&p, Dir::Back) > 0, "nothing crossed from b to a");
    let frames: u64 = p.relay().records().iter().map(|c| c.out.frames).sum();
    assert!(frames > 0, "the relay saw no transport frame");
}

#[test]
fn a_reset_mid_transfer_never_hangs_and_resumes_without_refetching() {
    let _w = Watchdog::arm("relay reset", LIMIT);
    let p = Pair::start_relayed(PairOptions::default(), Duration::ZERO);
    let size = 16 * MIB;
    let hash = write_pattern(&p.a.path("large.bin"), 11, size);
    let on_b = p.b.path("large.bin");
    poll_until("large.bin's name on b", PROPAGATION, || {
        std::fs::metadata(&on_b)
            .ok()
            .filter(|m| m.len() == size)
            .map(|_| ())
    });

    // Aim the reset a few frames into the transfer b's read starts.
    let live = p.relay().records();
    let passed = live.last().map_or(0, |c| c.out.frames);
    p.relay().arm(Fault::Reset {
        dir: Dir::Out,
        frame: passed + 6,
    });
    let before = relayed(&p, Dir::Out);
    let deadline = Duration::from_secs(10); // mountd's default --read-deadline
    let (r, took) = read_all_bounded(&on_b, deadline * 3);
    assert!(
        p.relay().fault_applied(),
        "the reset never happened: the read gave {r:?}; connections: {:?}",
        p.relay()
            .records()
            .iter()
            .map(|c| (c.out.frames, c.out.bytes, c.back.frames))
            .collect::<Vec<_>>()
    );
    match r {
        Ok(Ok(n)) => assert_eq!(n, size, "a read that succeeds reads everything"),
        Ok(Err(errno)) => assert!(
            errno == libc::EIO || errno == libc::ETIMEDOUT,
            "the read failed with errno {errno}, not EIO or ETIMEDOUT"
        ),
        Err(elapsed) => panic!("the read was still blocked after {elapsed:?}"),
    }
    eprintln!("read across the reset: {r:?} in {took:?}");

    // a dials the relay again; the next connection passes through.
    poll_until("a second connection through the relay", PROPAGATION, || {
        (p.relay().connections() >= 2).then_some(())
    });
    p.wait_connected(PROPAGATION);
    wait_hash(&on_b, &hash, PROPAGATION);
    assert_eq!(
        blake3_file(&on_b).expect("hash on b"),
        hash,
        "b reads exactly a's bytes"
    );
    let moved = relayed(&p, Dir::Out) - before;
    // One copy, plus the chunks in flight at the reset (fetch_parallel 8 and
    // read-ahead: at most about 24 chunks of 256 KiB), plus framing.
    assert!(
        moved < size + 7 * MIB,
        "{moved} bytes crossed for a {size}-byte file: verified chunks were fetched again"
    );
    assert!(
        moved >= size,
        "only {moved} bytes crossed for a {size}-byte file: the data did not come through the relay"
    );
    assert_eq!(p.relay().connections(), p.relay().records().len());
}
