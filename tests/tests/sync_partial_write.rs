//! A write into a file that is only partly on this machine (issue item 4):
//! mountd fetches the chunk it touches first, so the written bytes land on
//! the peer's bytes, are never overwritten by a later fetch, and nothing
//! else of the file has to come over before the write. (With mountd's
//! fetch before such a write switched off, b's copy lost the patch: the
//! chunk's later fetch wrote the peer's bytes over it.)

use harness::Watchdog;
use harness::pair::{LinkMode, Pair, PairOptions};
use harness::sync_helpers::{CHUNK, PROPAGATION, not_local_entry, wait_content, wait_size};
use harness::wait::poll_until;
use std::os::unix::fs::FileExt;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);
const SIZE: u64 = 32 * CHUNK;

/// a writes big.bin (`SIZE` bytes, byte `i` is `i * mul % modulus`);
/// once b shows its size, b still lists it as not all local (it is
/// larger than the eager fetch). Answers the bytes.
fn big_and_partial_on_b(p: &Pair, mul: u64, modulus: u64) -> Vec<u8> {
    let want: Vec<u8> = (0..SIZE).map(|i| (i * mul % modulus) as u8).collect();
    std::fs::write(p.a.path("big.bin"), &want).expect("write on a");
    wait_size(&p.b.path("big.bin"), SIZE, PROPAGATION);
    let present = poll_until("b to list big.bin as not local", PROPAGATION, || {
        not_local_entry(&p.b.ctl().not_local(), "big.bin")?["present_bytes"].as_u64()
    });
    assert!(
        present < SIZE,
        "big.bin is partial on b ({present} bytes present)"
    );
    want
}

#[test]
fn a_write_into_a_missing_chunk_keeps_the_peers_bytes_around_it() {
    let _w = Watchdog::arm("sync_partial_write", LIMIT);
    let p = Pair::start(PairOptions::new(LinkMode::Loopback));
    let mut want = big_and_partial_on_b(&p, 31, 251);

    let at = 5 * CHUNK + 100;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p.b.path("big.bin"))
        .expect("open for writing on b");
    f.write_all_at(b"PATCHED ON B", at).expect("pwrite on b");
    drop(f);
    want[at as usize..at as usize + 12].copy_from_slice(b"PATCHED ON B");

    // b reads the peer's bytes around the patch, the patch, and the rest.
    let got = std::fs::read(p.b.path("big.bin")).expect("read on b");
    assert_eq!(got.len() as u64, SIZE);
    assert!(
        got == want,
        "b's copy differs from a's bytes with the patch"
    );
    // And the edit travels back.
    wait_content(&p.a.path("big.bin"), &want, PROPAGATION);
}

/// A chunk fetched for a write and then written (and fsynced) keeps the
/// written bytes across a SIGKILL of syncd: the start-up check does not
/// take them for a torn fetch, and a later read does not fetch the
/// peer's bytes over them. (Before the fix the start-up check hashed the
/// chunk, found the local bytes, cleared its bit, and the read after the
/// restart fetched the old chunk again or failed.)
#[test]
fn a_write_into_a_fetched_chunk_survives_a_sigkill_of_syncd() {
    use harness::pair::Side;
    let _w = Watchdog::arm("sync_partial_write_kill", LIMIT);
    let mut p = Pair::start(PairOptions::new(LinkMode::Loopback));
    let mut want = big_and_partial_on_b(&p, 17, 253);

    let at = 7 * CHUNK + 4000;
    let patch = b"WRITTEN ON B BEFORE THE KILL";
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p.b.path("big.bin"))
        .expect("open for writing on b");
    f.write_all_at(patch, at).expect("pwrite on b");
    f.sync_all().expect("fsync on b");
    drop(f);
    want[at as usize..at as usize + patch.len()].copy_from_slice(patch);

    p.kill_syncd(Side::B);
    p.restart_syncd(Side::B);
    p.wait_connected(PROPAGATION);

    let got = std::fs::read(p.b.path("big.bin")).expect("read on b after the restart");
    assert_eq!(got.len() as u64, SIZE);
    let at = at as usize;
    assert!(
        got[at..at + patch.len()] == patch[..],
        "the fsynced write is there after the restart: found {:?}",
        String::from_utf8_lossy(&got[at..at + patch.len()])
    );
    assert!(got == want, "b's copy is a's bytes with the write");
    wait_content(&p.a.path("big.bin"), &want, PROPAGATION);
}
