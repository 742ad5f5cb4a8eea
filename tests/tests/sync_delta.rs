//! A 256 MiB file written on a reads byte-identical on b; then a one-chunk
//! edit in its middle on a reaches b as about one chunk on the wire (b's
//! `bytes_received` from a, `keibictl peer list --json`), not the file.

use harness::Watchdog;
use harness::pair::{LinkMode, Pair, PairOptions, Side};
use harness::sync_helpers::{
    CHUNK, PROPAGATION, patch_file, pattern_hash_with, wait_hash, wait_size, write_pattern,
};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(900);
const SIZE: u64 = 256 << 20;

#[test]
fn a_256mib_file_travels_and_a_one_chunk_edit_moves_about_one_chunk() {
    let _w = Watchdog::arm("delta", LIMIT);
    // A long keepalive bound: the byte counters are per connection, so
    // the connection must not be replaced while it is measured (on a
    // loaded machine a 2 s bound can expire during a 256 MiB transfer).
    let mut o = PairOptions::new(LinkMode::Netns);
    o.peer_timeout = Duration::from_secs(30);
    let p = Pair::start(o);
    let conn = p.peer_info(Side::B)["remote_addr"].clone();
    let hash = write_pattern(&p.a.path("big.bin"), 11, SIZE);
    wait_size(&p.b.path("big.bin"), SIZE, PROPAGATION);
    // Reading it on b fetches every chunk from a, verified.
    let before_full = p.bytes_received(Side::B);
    wait_hash(&p.b.path("big.bin"), &hash, Duration::from_secs(600));
    assert_eq!(
        p.peer_info(Side::B)["remote_addr"],
        conn,
        "the connection was replaced during the transfer (its byte counters restarted)"
    );
    let full = p.bytes_received(Side::B) - before_full;
    assert!(
        full >= SIZE,
        "b read 256 MiB that only a had, but received {full} bytes from a"
    );

    // One chunk-sized edit in the middle, inside one chunk.
    let at = SIZE / 2 + 1000;
    let patch = vec![0x5au8; 4096];
    let before = p.bytes_received(Side::B);
    patch_file(&p.a.path("big.bin"), at, &patch);
    let new_hash = pattern_hash_with(11, SIZE, at, &patch);
    wait_hash(&p.b.path("big.bin"), &new_hash, Duration::from_secs(300));
    let moved = p.bytes_received(Side::B).saturating_sub(before);
    // The chunk itself, the new version's record (1024 chunk hashes of 32
    // bytes) and keepalives: far below 4 chunks.
    assert!(
        (CHUNK / 2..=4 * CHUNK).contains(&moved),
        "a one-chunk edit of a 256 MiB file moved {moved} bytes from a to b (expected about one \
         chunk, {CHUNK})"
    );
    assert_eq!(
        p.peer_info(Side::B)["remote_addr"],
        conn,
        "the connection was replaced during the test (its byte counters restarted)"
    );
}
