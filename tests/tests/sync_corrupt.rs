//! A peer that sends chunks whose bytes do not match their hash (syncd's
//! test hook `KEIBI_TEST_CORRUPT_CHUNKS=1` flips one byte of every chunk
//! it serves): the receiver refuses every such chunk, the read fails
//! cleanly (an errno, in time), nothing is counted present, and once the
//! peer serves honest bytes again the file reads byte-identical, so no
//! wrong byte was kept in the cache.

use harness::Watchdog;
use harness::pair::{LinkMode, Pair, PairOptions, Side};
use harness::sync_helpers::{
    PROPAGATION, not_local_entry, read_all_bounded, wait_size, write_pattern,
};
use harness::tree::blake3_file;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);
const SIZE: u64 = 4 << 20;
/// mountd's `--read-deadline` here.
const READ_DEADLINE: Duration = Duration::from_secs(2);

#[test]
fn chunks_that_do_not_match_their_hash_are_refused_and_never_cached() {
    let _w = Watchdog::arm("corrupt", LIMIT);
    let mut o = PairOptions::new(LinkMode::Netns);
    o.env_a = vec![("KEIBI_TEST_CORRUPT_CHUNKS".into(), "1".into())];
    o.node.mountd_args = vec!["--read-deadline".into(), "2s".into()];
    let mut p = Pair::start(o);
    let want = write_pattern(&p.a.path("victim.bin"), 33, SIZE);
    wait_size(&p.b.path("victim.bin"), SIZE, PROPAGATION);

    let limit = READ_DEADLINE * 10;
    for _ in 0..2 {
        let (r, took) = read_all_bounded(&p.b.path("victim.bin"), limit);
        match r {
            Ok(Err(e)) => assert!(
                e == libc::EIO || e == libc::ETIMEDOUT,
                "expected EIO or ETIMEDOUT for chunks that fail verification, got {}",
                ipc_schema::error::errno_name(e)
            ),
            Ok(Ok(n)) => panic!("read {n} bytes although every chunk served was corrupt"),
            Err(t) => panic!("the read hung for {t:?}"),
        }
        assert!(
            took <= p.options().node.deadline + Duration::from_secs(3),
            "{took:?}"
        );
    }
    let entry = not_local_entry(&p.b.ctl().not_local(), "victim.bin")
        .expect("victim.bin is listed as not local on b");
    assert_eq!(
        entry["present_bytes"].as_u64(),
        Some(0),
        "no corrupt chunk counts as present: {entry}"
    );
    assert!(
        p.b.syncd_log().to_lowercase().contains("hash"),
        "b's log says why the chunks were refused"
    );

    // a serves honest bytes again: the file reads right, so nothing wrong
    // was written to b's cache.
    p.a.options_mut().syncd_env.clear();
    p.kill_syncd(Side::A);
    p.restart_syncd(Side::A);
    p.wait_connected(Duration::from_secs(30));
    let (r, _) = read_all_bounded(&p.b.path("victim.bin"), Duration::from_secs(120));
    assert_eq!(r, Ok(Ok(SIZE)));
    assert_eq!(blake3_file(&p.b.path("victim.bin")).expect("hash"), want);
}
