//! A network attacker between two paired syncd, played by the test relay
//! ([`harness::relay`]): alice dials bob through it. A tampered, replayed,
//! reflected or reordered frame, and a `u32::MAX` length prefix, each close
//! only that connection: the receiver logs the specific reason, the two
//! reconnect afterwards (the relay applies its fault once), and bob keeps
//! serving carol, who is connected to him directly, on the same connection
//! throughout. The oversize prefix fails at once (not after the keepalive)
//! and bob's peak memory does not grow by anything like the claimed size.
//!
//! A relay without a fault shows what a passive eavesdropper sees: the
//! bytes of a known plaintext (the `Bulk` pattern that `peer bench`
//! streams, and the software string of the handshake's Hello) never appear
//! on the wire.

use harness::Watchdog;
use harness::peers::{NodeConfig, PeerNode, connect, state, u64_field};
use harness::relay::{Dir, Fault, Relay};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const CHACHA: &str = "chacha20-poly1305";

/// alice → relay → bob, and carol → bob directly.
struct Setup {
    alice: PeerNode,
    bob: PeerNode,
    carol: PeerNode,
    relay: Relay,
}

fn setup(cfg: NodeConfig, fault: Option<Fault>, needle: &[u8]) -> Setup {
    let alice = PeerNode::start("alice", cfg.clone());
    let bob = PeerNode::start("bob", cfg.clone());
    let carol = PeerNode::start("carol", NodeConfig::default());
    let relay = Relay::start(bob.addr().parse().expect("bob's address"), fault, needle);
    // bob first, so that alice's first dial is not refused as unpaired.
    bob.add(&alice, false);
    alice.peer_add(bob.fingerprint(), Some(&relay.addr()), Some("bob"));
    connect(&carol, &bob);
    Setup {
        alice,
        bob,
        carol,
        relay,
    }
}

/// Wait until alice and bob are connected again on a connection the relay
/// accepted after the one that took the fault.
fn wait_reconnected_after_fault(relay: &Relay, alice: &PeerNode, bob: &PeerNode) {
    let faulted = relay
        .records()
        .iter()
        .position(|r| r.faulted)
        .expect("one connection took the fault");
    harness::poll_until("alice and bob to reconnect", WAIT, || {
        let pa = alice.peer(bob.fingerprint())?;
        let pb = bob.peer(alice.fingerprint())?;
        (relay.connections() > faulted + 1
            && state(&pa) == "connected"
            && state(&pb) == "connected")
            .then_some(())
    });
}

/// Run `fault` with alice and bob offering only `aead`, and check that
/// bob, who receives the bad frame, logs a line with `reason`, the
/// connection closes and comes back, and carol's connection to bob is
/// untouched. Only ChaCha20-Poly1305 leaves a frame that fails as it
/// was, so only under it can the receiver name a replay, a reflection
/// or a reordering (docs/protocol.md 7.2.1).
fn fault_closes_only_that_connection(name: &str, aead: &str, fault: Fault, reason: &str) {
    let _w = Watchdog::arm(name, Duration::from_secs(180));
    let cfg = NodeConfig {
        aead: Some(aead.to_string()),
        ..NodeConfig::default()
    };
    let s = setup(cfg, Some(fault), b"");
    // carol's connection as bob sees it (carol's port changes if she
    // reconnects).
    let carol_at_bob = s.bob.wait_connected(&s.carol, WAIT);
    harness::poll_until("the relay to apply its fault", WAIT, || {
        s.relay.fault_applied().then_some(())
    });
    // Every fault here reaches bob (a reflected frame is bob's own,
    // sent back to him).
    let detector = &s.bob;
    let line = {
        let log = detector.wait_log(&format!("{reason:?}"), WAIT, |log| log.contains(reason));
        log.lines()
            .find(|l| l.contains(reason))
            .expect("found above")
            .to_string()
    };
    eprintln!("{}: {line}", detector.name());
    // The faulted connection is gone and a new one came up through the
    // relay.
    wait_reconnected_after_fault(&s.relay, &s.alice, &s.bob);
    // carol: still connected to bob on the same TCP connection, and bob
    // still answers her.
    let now = s.bob.peer(s.carol.fingerprint()).expect("carol listed");
    assert_eq!(state(&now), "connected", "{now}");
    assert_eq!(
        now["remote_addr"], carol_at_bob["remote_addr"],
        "same connection"
    );
    let r = s.carol.bench(s.bob.fingerprint(), 256 * 1024, 1);
    assert_eq!(u64_field(&r, "bytes"), 256 * 1024, "{r}");
    // And the new alice–bob connection works.
    let r = s.alice.bench(s.bob.fingerprint(), 256 * 1024, 1);
    assert_eq!(u64_field(&r, "bytes"), 256 * 1024, "{r}");
}

#[test]
fn a_tampered_frame_closes_only_that_connection() {
    fault_closes_only_that_connection(
        "peer-tamper-flip",
        CHACHA,
        Fault::FlipBit {
            dir: Dir::Out,
            frame: 2,
        },
        "failed authentication",
    );
}

#[test]
fn a_replayed_frame_closes_only_that_connection() {
    fault_closes_only_that_connection(
        "peer-tamper-replay",
        CHACHA,
        Fault::Replay {
            dir: Dir::Out,
            frame: 2,
        },
        "is a replay of frame 2",
    );
}

#[test]
fn a_reflected_frame_closes_only_that_connection() {
    // bob's frame 2 to alice is also sent back to bob.
    fault_closes_only_that_connection(
        "peer-tamper-reflect",
        CHACHA,
        Fault::Reflect {
            dir: Dir::Back,
            frame: 2,
        },
        "is a reflection of our own frame",
    );
}

#[test]
fn reordered_frames_close_only_that_connection() {
    fault_closes_only_that_connection(
        "peer-tamper-swap",
        CHACHA,
        Fault::Swap {
            dir: Dir::Out,
            frame: 2,
        },
        "arrived out of order",
    );
}

/// Under AES-256-GCM (ring wipes a frame that fails to open) the same
/// attacks close only that connection too, with an unnamed cause.
#[test]
fn under_aes_gcm_a_replayed_or_reordered_frame_closes_only_that_connection() {
    for (name, fault) in [
        (
            "peer-tamper-aes-replay",
            Fault::Replay {
                dir: Dir::Out,
                frame: 2,
            },
        ),
        (
            "peer-tamper-aes-swap",
            Fault::Swap {
                dir: Dir::Out,
                frame: 2,
            },
        ),
    ] {
        fault_closes_only_that_connection(
            name,
            "aes-256-gcm",
            fault,
            "aes-256-gcm wiped the frame, so which cannot be told",
        );
    }
}

#[test]
fn an_oversize_length_fails_at_once_without_allocating_it() {
    let _w = Watchdog::arm("peer-tamper-oversize", Duration::from_secs(180));
    // A keepalive of 20 s: the close must come from the length check, well
    // before the keepalive could end the connection.
    let cfg = NodeConfig {
        peer_timeout: Duration::from_secs(20),
        ..NodeConfig::default()
    };
    let alice = PeerNode::start("alice", cfg.clone());
    let bob = PeerNode::start("bob", cfg);
    let carol = PeerNode::start("carol", NodeConfig::default());
    connect(&carol, &bob);
    let carol_at_bob = bob.wait_connected(&carol, WAIT);
    // Frame 1 is alice's first after READY (her first keepalive ping,
    // sent as soon as the connection is up).
    let relay = Relay::start(
        bob.addr().parse().expect("bob's address"),
        Some(Fault::Oversize {
            dir: Dir::Out,
            frame: 1,
        }),
        b"",
    );
    let hwm_before = bob.vm_hwm_kib();
    bob.add(&alice, false);
    alice.peer_add(bob.fingerprint(), Some(&relay.addr()), Some("bob"));
    harness::poll_until("the relay to inject the length", WAIT, || {
        relay.fault_applied().then_some(())
    });
    let at = relay.fault_applied_at().expect("applied");
    // bob closes the connection: the relay's pump reading from bob sees
    // the end of the stream.
    let ended = harness::poll_until("bob to close the connection", WAIT, || {
        relay.records().iter().find(|r| r.faulted)?.back.ended
    });
    let took = ended.saturating_duration_since(at);
    assert!(
        took < Duration::from_secs(10),
        "bob closed {took:?} after the bad length: not at once (keepalive is 20 s)"
    );
    let reason = format!("frame length {} is over the limit", u32::MAX);
    bob.wait_log(&reason, WAIT, |log| log.contains(&reason));
    let hwm_after = bob.vm_hwm_kib();
    assert!(
        hwm_after < hwm_before + 32 * 1024,
        "bob's VmHWM grew from {hwm_before} KiB to {hwm_after} KiB after a 4 GiB length prefix"
    );
    eprintln!("closed {took:?} after the bad length; VmHWM {hwm_before} -> {hwm_after} KiB");
    // The other peer is untouched, and alice comes back.
    let now = bob.peer(carol.fingerprint()).expect("carol listed");
    assert_eq!(state(&now), "connected");
    assert_eq!(
        now["remote_addr"], carol_at_bob["remote_addr"],
        "same connection"
    );
    let r = carol.bench(bob.fingerprint(), 256 * 1024, 1);
    assert_eq!(u64_field(&r, "bytes"), 256 * 1024, "{r}");
    wait_reconnected_after_fault(&relay, &alice, &bob);
}

/// 64 bytes of the `Bulk` stream's pattern (byte i is i mod 251) from
/// offset 1000, the way syncd's peer messages define it.
fn bulk_pattern_sample() -> Vec<u8> {
    (1000u64..1064).map(|i| (i % 251) as u8).collect()
}

#[test]
fn a_known_plaintext_never_appears_on_the_wire() {
    let _w = Watchdog::arm("peer-wire-plaintext", Duration::from_secs(180));
    let needle = bulk_pattern_sample();
    let s = setup(NodeConfig::default(), None, &needle);
    s.alice.wait_connected(&s.bob, WAIT);
    let bytes: u64 = 4 << 20;
    let r = s.alice.bench(s.bob.fingerprint(), bytes, 2);
    assert_eq!(u64_field(&r, "bytes"), bytes, "{r}");
    let rec = s.relay.records();
    assert_eq!(rec.len(), 1, "one connection");
    let back = &rec[0].back;
    assert!(
        back.bytes >= bytes,
        "the bench's data went through the relay: {} bytes",
        back.bytes
    );
    assert_eq!(back.needle_hits, 0, "the Bulk pattern appeared in clear");
    assert_eq!(rec[0].out.needle_hits, 0);
    // The Hello's software string travels encrypted in handshake messages
    // 2 and 3.
    let software = format!("keibi-syncd {}", env!("CARGO_PKG_VERSION"));
    for m in rec[0].out.handshake.iter().chain(&rec[0].back.handshake) {
        assert!(
            !m.windows(software.len()).any(|w| w == software.as_bytes()),
            "{software:?} in a handshake message"
        );
    }
    assert_eq!(rec[0].out.handshake.len(), 2);
    assert_eq!(rec[0].back.handshake.len(), 1);
    // No frame starts with a length the sealed data does not explain, and
    // no frame header shows a plaintext message type: every frame is at
    // least a type byte and a 16-byte tag long.
    for head in rec[0].out.heads.iter().chain(&rec[0].back.heads) {
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
        assert!(
            len >= 17,
            "a frame of {len} bytes is too short to be sealed"
        );
    }
}

#[test]
fn a_stalled_connection_is_detected_and_replaced() {
    let _w = Watchdog::arm("peer-tamper-stall", Duration::from_secs(180));
    let cfg = NodeConfig::default();
    let bound = cfg.peer_timeout * 3;
    // From alice's frame 2 on, the relay forwards nothing either way but
    // keeps both sockets open: a silent network, not a closed one.
    let s = setup(
        cfg,
        Some(Fault::Stall {
            dir: Dir::Out,
            frame: 2,
        }),
        b"",
    );
    harness::poll_until("the relay to stall", WAIT, || {
        s.relay.fault_applied().then_some(())
    });
    let pa = s
        .alice
        .try_wait_disconnected(&s.bob, bound)
        .expect("alice notices the silent connection within 3 × peer_timeout");
    s.bob
        .try_wait_disconnected(&s.alice, bound)
        .expect("bob notices it too");
    assert!(pa["last_error"].as_str().is_some(), "{pa}");
    wait_reconnected_after_fault(&s.relay, &s.alice, &s.bob);
    let r = s.alice.bench(s.bob.fingerprint(), 256 * 1024, 1);
    assert_eq!(u64_field(&r, "bytes"), 256 * 1024, "{r}");
    assert_eq!(
        state(&s.bob.peer(s.carol.fingerprint()).expect("carol listed")),
        "connected"
    );
}
