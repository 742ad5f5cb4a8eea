//! The two-node fixture itself ([`harness::pair`]): both modes come up
//! paired and connected, and every link control does what it claims to
//! the peer connection (cut and stall are noticed by the keepalive, a
//! restored link reconnects, a killed syncd restarts on its state), and
//! nothing is left behind (namespaces gone after `Drop`).

use harness::pair::{LinkMode, Pair, PairOptions, Side};
use harness::{Watchdog, poll_until};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);
const NOTICE: Duration = Duration::from_secs(20);

fn namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn loopback_pair_connects_and_survives_a_killed_syncd() {
    let _w = Watchdog::arm("loopback_pair", LIMIT);
    let mut p = Pair::start_mode(LinkMode::Loopback);
    assert!(p.a.addr().starts_with("127.0.0.1:"), "{}", p.a.addr());
    assert!(p.a.netns().is_none());
    // Both mounts answer.
    std::fs::write(p.a.path("on-a"), b"a").expect("write on a's mount");
    std::fs::write(p.b.path("on-b"), b"b").expect("write on b's mount");
    p.kill_syncd(Side::B);
    p.wait_disconnected(Side::A, NOTICE);
    p.restart_syncd(Side::B);
    p.wait_connected(Duration::from_secs(30));
}

#[test]
fn netns_pair_link_controls() {
    let _w = Watchdog::arm("netns_pair", LIMIT);
    let names;
    {
        let mut p = Pair::start(PairOptions::new(LinkMode::Netns));
        let ns_a = p.a.netns().expect("a has a namespace").to_string();
        let ns_b = p.b.netns().expect("b has a namespace").to_string();
        names = [ns_a.clone(), ns_b.clone()];
        assert!(namespaces().contains(&ns_a) && namespaces().contains(&ns_b));
        // syncd really runs inside its namespace: its /proc/PID/ns/net is
        // the namespace's, not ours.
        let pid = p.a.syncd_pid().expect("a's syncd runs");
        let inside = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("stat syncd's netns");
        let named = std::fs::metadata(format!("/run/netns/{ns_a}"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("stat the named netns");
        assert_eq!(inside, named, "a's syncd is not in namespace {ns_a}");

        // Cut: noticed by the keepalive; restore: reconnects.
        p.cut();
        p.wait_disconnected(Side::A, NOTICE);
        p.wait_disconnected(Side::B, NOTICE);
        p.restore();
        p.wait_connected(Duration::from_secs(30));

        // Stall (no RST): noticed too; unstall: reconnects.
        p.stall(Side::B);
        p.wait_disconnected(Side::A, NOTICE);
        p.unstall(Side::B);
        p.wait_connected(Duration::from_secs(30));

        // SIGSTOP: the peer's keepalive gives up; SIGCONT: back.
        p.stop_syncd(Side::B);
        p.wait_disconnected(Side::A, NOTICE);
        p.cont_syncd(Side::B);
        p.wait_connected(Duration::from_secs(30));

        // A slow link still carries the connection.
        p.slow("8mbit");
        let before = p.bytes_received(Side::A);
        poll_until("keepalive bytes over the slow link", NOTICE, || {
            (p.bytes_received(Side::A) > before).then_some(())
        });
        p.unslow();

        // SIGKILL and restart of the dialer.
        p.kill_syncd(Side::A);
        p.wait_disconnected(Side::B, NOTICE);
        p.restart_syncd(Side::A);
        p.wait_connected(Duration::from_secs(30));
    }
    let left = namespaces();
    for n in &names {
        assert!(!left.contains(n), "namespace {n} left behind: {left:?}");
    }
}
