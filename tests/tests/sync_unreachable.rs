//! A peer that is gone never hangs a reader (docs/semantics.md, "When the
//! peer is unreachable"):
//! - metadata and bytes already local keep working with the link cut; a
//!   read of bytes only the peer has fails at once with `EIO` when no peer
//!   is connected; local writes go on and reach the peer when the link is
//!   back;
//! - with the peer stalled (nftables drops everything, no RST) or frozen
//!   (SIGSTOP), the peer still counts as connected and such a read fails
//!   with `ETIMEDOUT` at the read deadline, and works once the peer is back;
//! - a peer killed with SIGKILL during a large read: the reader gets one of
//!   the documented errnos within the deadline, no task is left in `D`
//!   state, and after the peer restarts the read succeeds without fetching
//!   the chunks that had arrived again (b's byte counter);
//! - the reading side's own syncd killed with SIGKILL three times during
//!   a large read: no read hangs, and the file completes byte for byte.

use harness::daemons::duration_arg;
use harness::pair::{LinkMode, Pair, PairOptions, Side};
use harness::sync_helpers::{
    CHUNK, PROPAGATION, not_local_entry, read_all_bounded, tasks_in_d_state, wait_content,
    wait_size, write_pattern,
};
use harness::tree::blake3_file;
use harness::{Watchdog, poll_until};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(600);
/// mountd's `--read-deadline` in these tests.
const DEADLINE: Duration = Duration::from_secs(2);
/// Slack over the deadline for a failed read to come back (scheduling on
/// a loaded 2-core machine).
const SLACK: Duration = Duration::from_secs(3);

fn opts(peer_timeout: Duration) -> PairOptions {
    opts_with(peer_timeout, DEADLINE)
}

fn opts_with(peer_timeout: Duration, read_deadline: Duration) -> PairOptions {
    let mut o = PairOptions::new(LinkMode::Netns);
    o.node.mountd_args = vec!["--read-deadline".into(), duration_arg(read_deadline)];
    o.peer_timeout = peer_timeout;
    o
}

/// Files of `size` bytes above syncd's eager-fetch size stay remote until
/// read.
const REMOTE_SIZE: u64 = 8 << 20;

fn errno_name(e: i32) -> String {
    ipc_schema::error::errno_name(e).to_string()
}

#[test]
fn with_the_link_cut_metadata_and_local_bytes_work_and_remote_reads_fail_with_eio() {
    let _w = Watchdog::arm("cut", LIMIT);
    let p = Pair::start(opts(Duration::from_secs(2)));
    std::fs::create_dir(p.a.path("dir")).expect("mkdir");
    std::fs::write(p.a.path("dir/small.txt"), b"small and eager\n").expect("write");
    write_pattern(&p.a.path("dir/remote.bin"), 5, REMOTE_SIZE);
    wait_size(&p.b.path("dir/remote.bin"), REMOTE_SIZE, PROPAGATION);
    wait_content(
        &p.b.path("dir/small.txt"),
        b"small and eager\n",
        PROPAGATION,
    );

    p.cut();
    p.wait_disconnected(Side::B, Duration::from_secs(30));
    // Metadata: lookups, stat, listing, all from b's store.
    let names: Vec<String> = std::fs::read_dir(p.b.path("dir"))
        .expect("list dir on b")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(
        std::fs::metadata(p.b.path("dir/remote.bin"))
            .expect("stat")
            .len(),
        REMOTE_SIZE
    );
    // Local bytes.
    assert_eq!(
        std::fs::read(p.b.path("dir/small.txt")).expect("read a local file"),
        b"small and eager\n"
    );
    // Bytes only a has: EIO, at once.
    let (r, took) = read_all_bounded(&p.b.path("dir/remote.bin"), DEADLINE * 10);
    match r {
        Ok(Err(e)) => assert_eq!(
            e,
            libc::EIO,
            "expected EIO with no peer connected, got {}",
            errno_name(e)
        ),
        Ok(Ok(n)) => panic!("read {n} bytes that only the unreachable peer has"),
        Err(t) => panic!("the read hung for {t:?}"),
    }
    assert!(took <= DEADLINE + SLACK, "EIO took {took:?}");
    // Local writes go on, and reach a once the link is back.
    std::fs::write(p.b.path("dir/from-b.txt"), b"written while cut\n").expect("write on b");
    // keibictl status: a is unreachable (since when) and b's change waits.
    let a_fp = p.a.fingerprint().to_string();
    let sync_of_a = |st: &serde_json::Value| -> serde_json::Value {
        st["sync"]["peers"]
            .as_array()
            .and_then(|v| v.iter().find(|x| x["fingerprint"].as_str() == Some(&a_fp)))
            .cloned()
            .unwrap_or_else(|| panic!("status --json has no sync entry for a: {st}"))
    };
    let entry = poll_until(
        "b's status to count its change as pending",
        PROPAGATION,
        || {
            let e = sync_of_a(&p.b.ctl().status());
            (e["pending_out"].as_u64()? >= 1).then_some(e)
        },
    );
    assert_eq!(entry["connected"], false, "{entry}");
    assert!(entry["unreachable_since"].as_i64().is_some(), "{entry}");
    p.restore();
    p.wait_connected(Duration::from_secs(30));
    wait_content(
        &p.a.path("dir/from-b.txt"),
        b"written while cut\n",
        PROPAGATION,
    );
    poll_until("b's status to show a in sync again", PROPAGATION, || {
        let e = sync_of_a(&p.b.ctl().status());
        (e["connected"] == true && e["pending_out"].as_u64()? == 0).then_some(())
    });
    // And the remote file reads on b again.
    let want = blake3_file(&p.a.path("dir/remote.bin")).expect("hash on a");
    harness::sync_helpers::wait_hash(&p.b.path("dir/remote.bin"), &want, PROPAGATION);
}

/// With the peer unresponsive but still connected, a read of remote bytes
/// fails with ETIMEDOUT at the deadline; after `unblock` it succeeds.
fn unresponsive_peer_read_times_out(
    name: &str,
    block: impl FnOnce(&Pair),
    unblock: impl FnOnce(&Pair),
) {
    let _w = Watchdog::arm(name, LIMIT);
    // A long keepalive bound, so the connection outlives the read.
    let p = Pair::start(opts(Duration::from_secs(30)));
    let want = write_pattern(&p.a.path("remote.bin"), 9, REMOTE_SIZE);
    wait_size(&p.b.path("remote.bin"), REMOTE_SIZE, PROPAGATION);
    block(&p);
    assert!(p.connected(Side::B), "b still counts a as connected");
    let (r, took) = read_all_bounded(&p.b.path("remote.bin"), DEADLINE * 10);
    match r {
        Ok(Err(e)) => assert_eq!(
            e,
            libc::ETIMEDOUT,
            "expected ETIMEDOUT from a connected but silent peer, got {}",
            errno_name(e)
        ),
        Ok(Ok(n)) => panic!("read {n} bytes from a peer that cannot answer"),
        Err(t) => panic!("the read hung for {t:?}"),
    }
    assert!(
        took >= DEADLINE.mul_f64(0.9) && took <= DEADLINE + SLACK,
        "ETIMEDOUT after {took:?}, the deadline is {DEADLINE:?}"
    );
    unblock(&p);
    harness::sync_helpers::wait_hash(&p.b.path("remote.bin"), &want, PROPAGATION);
}

#[test]
fn a_stalled_peer_makes_remote_reads_time_out_then_work_again() {
    unresponsive_peer_read_times_out("stall", |p| p.stall(Side::A), |p| p.unstall(Side::A));
}

#[test]
fn a_frozen_peer_makes_remote_reads_time_out_then_work_again() {
    unresponsive_peer_read_times_out(
        "sigstop",
        |p| p.stop_syncd(Side::A),
        |p| p.cont_syncd(Side::A),
    );
}

#[test]
fn a_peer_killed_during_a_large_read_fails_the_read_in_time_and_resumes_without_refetching() {
    let _w = Watchdog::arm("kill_mid_read", LIMIT);
    // A longer read deadline: the read must outlast the slow link's
    // queueing (read-ahead in flight before the demanded chunk).
    const READ_DEADLINE: Duration = Duration::from_secs(5);
    let mut p = Pair::start(opts_with(Duration::from_secs(2), READ_DEADLINE));
    const SIZE: u64 = 64 << 20;
    let want = write_pattern(&p.a.path("large.bin"), 21, SIZE);
    wait_size(&p.b.path("large.bin"), SIZE, PROPAGATION);
    // About 10 MB/s: the read takes several seconds.
    p.slow("80mbit");
    let reader = {
        let path = p.b.path("large.bin");
        std::thread::spawn(move || read_all_bounded(&path, Duration::from_secs(300)))
    };
    let got = poll_until(
        "b to receive part of large.bin",
        Duration::from_secs(120),
        || {
            let n = p.bytes_received(Side::B);
            assert!(
                !reader.is_finished(),
                "the read ended before a was killed, after {n} bytes"
            );
            (n >= 4 << 20).then_some(n)
        },
    );
    assert!(
        got < SIZE && !reader.is_finished(),
        "the whole file arrived before the kill"
    );
    p.kill_syncd(Side::A);
    let killed = Instant::now();
    let (r, _) = reader.join().expect("the reader thread");
    let took = killed.elapsed();
    match r {
        Ok(Err(e)) => assert!(
            e == libc::EIO || e == libc::ETIMEDOUT,
            "expected EIO or ETIMEDOUT, got {}",
            errno_name(e)
        ),
        Ok(Ok(n)) => panic!("read {n} bytes although a was killed mid-read"),
        Err(t) => panic!("the read hung for {t:?} after a was killed"),
    }
    assert!(
        took <= READ_DEADLINE + SLACK,
        "the read failed {took:?} after the kill, the deadline is {READ_DEADLINE:?}"
    );
    // The reader is done; nothing of b may be left waiting in the kernel
    // (a short disk wait of a daemon is allowed to pass).
    for pid in [p.b.mountd_pid(), p.b.syncd_pid()].into_iter().flatten() {
        let mut stuck = Vec::new();
        let clear = harness::wait::try_poll_until(Duration::from_secs(5), || {
            stuck = tasks_in_d_state(pid);
            stuck.is_empty().then_some(())
        });
        assert!(clear.is_some(), "tasks of pid {pid} in D state: {stuck:?}");
    }

    // Restart a: the rest of the file arrives, what b verified does not
    // come again.
    p.unslow();
    let kept = not_local_entry(&p.b.ctl().not_local(), "large.bin")
        .and_then(|e| e["present_bytes"].as_u64())
        .expect("large.bin is still partial on b");
    assert!(kept >= CHUNK, "b kept the verified chunks ({kept} bytes)");
    p.restart_syncd(Side::A);
    p.wait_connected(Duration::from_secs(30));
    // The read works once a is back (retried: with the 2 s read deadline
    // of this test, one read on a loaded machine may still time out while
    // the rest of the file streams in).
    harness::sync_helpers::wait_hash(&p.b.path("large.bin"), &want, Duration::from_secs(300));
    let received = p.bytes_received(Side::B);
    assert!(
        received <= SIZE - kept + (2 << 20),
        "b received {received} bytes on the new connection; {kept} of {SIZE} were already \
         verified, so at most {} should have come",
        SIZE - kept
    );
}

/// The reading side's own syncd killed with SIGKILL, three times, while a
/// large read fetches chunks (each marked present by a swap of the file's
/// presence bits): no read hangs, and in the end the file reads back byte
/// for byte, so no chunk was left marked present with bytes that were not
/// the version's (such a chunk is never fetched again, and the hash would
/// never match).
#[test]
fn the_readers_syncd_killed_mid_fetch_keeps_only_verified_chunks_and_the_file_completes() {
    let _w = Watchdog::arm("kill_reader_mid_fetch", LIMIT);
    const READ_DEADLINE: Duration = Duration::from_secs(5);
    let mut p = Pair::start(opts_with(Duration::from_secs(2), READ_DEADLINE));
    const SIZE: u64 = 64 << 20;
    let want = write_pattern(&p.a.path("large.bin"), 23, SIZE);
    wait_size(&p.b.path("large.bin"), SIZE, PROPAGATION);
    // About 10 MB/s: a read takes several seconds.
    p.slow("80mbit");
    let present = |p: &Pair| {
        not_local_entry(&p.b.ctl().not_local(), "large.bin")
            .and_then(|e| e["present_bytes"].as_u64())
    };
    let mut kept = 0;
    for round in 0..3 {
        let reader = {
            let path = p.b.path("large.bin");
            std::thread::spawn(move || read_all_bounded(&path, Duration::from_secs(300)))
        };
        let before = kept;
        let now = poll_until(
            &format!("round {round}: b to fetch 4 MiB more of large.bin"),
            Duration::from_secs(120),
            || {
                let n = present(&p).expect("large.bin is still partial on b");
                (n >= before + (4 << 20)).then_some(n)
            },
        );
        assert!(
            now < SIZE,
            "round {round}: the whole file arrived before the kill"
        );
        p.kill_syncd(Side::B);
        // The read fails or ends; either way it must not hang.
        let (r, _) = reader.join().expect("the reader thread");
        assert!(
            r.is_ok(),
            "round {round}: the read hung after b's syncd was killed"
        );
        p.restart_syncd(Side::B);
        p.wait_connected(Duration::from_secs(30));
        // What survives a kill is what sled wrote before it (its log is
        // flushed every half second) and verified again at start.
        kept = present(&p).expect("large.bin is still partial on b after the restart");
        eprintln!("round {round}: {now} bytes present at the kill, {kept} after the restart");
    }
    p.unslow();
    harness::sync_helpers::wait_hash(&p.b.path("large.bin"), &want, Duration::from_secs(300));
    assert_eq!(
        blake3_file(&p.b.path("large.bin")).expect("hash b's copy"),
        want,
        "b's copy of large.bin"
    );
}
