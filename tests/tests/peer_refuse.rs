//! Peers that must not get in: an unpaired peer, a peer at the right
//! address with the right name but another key, and a man in the middle (a
//! third syncd with its own key, listening where A believes B is, and
//! dialing B in turn). Each is refused in the handshake, before any
//! application data; the refusal is logged with the fingerprints involved;
//! and nothing the intruder sent reaches the victim's store: its peer list
//! and `keibictl status` counts are unchanged and its real peer stays
//! connected.

use harness::Watchdog;
use harness::peers::{NodeConfig, PeerNode, connect, state};
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Whether `line` names `fp` (ungrouped, or grouped in fours with spaces
/// or dashes, as keibictl shows it).
fn names_fp(line: &str, fp: &str) -> bool {
    let grouped = |sep: &str| {
        fp.as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(sep)
    };
    line.contains(fp) || line.contains(&grouped(" ")) || line.contains(&grouped("-"))
}

/// What an intruder could change: the peer entries (fingerprint, name,
/// address) and the share's counts.
fn snapshot(node: &PeerNode) -> (Vec<(Value, Value, Value)>, Value) {
    let mut peers: Vec<_> = node
        .peers()
        .into_iter()
        .map(|p| {
            (
                p["fingerprint"].clone(),
                p["name"].clone(),
                p["addr"].clone(),
            )
        })
        .collect();
    peers.sort_by_key(|p| p.0.to_string());
    let s = node.status();
    let counts = serde_json::json!([s["files"], s["directories"], s["others"], s["bytes"]]);
    (peers, counts)
}

/// Panic if `node`'s log shows a connection with `fp` ever completing.
#[track_caller]
fn assert_never_connected(node: &PeerNode, fp: &str) {
    if let Some(l) = node
        .log()
        .lines()
        .find(|l| l.contains("peer connected") && names_fp(l, fp))
    {
        panic!("{}: a connection with {fp} completed: {l}", node.name());
    }
}

/// Poll until `node`'s log has a line naming every fingerprint of `fps`
/// and containing one of `words` (case-insensitive); returns that line.
fn wait_refusal(node: &PeerNode, fps: &[&str], words: &[&str]) -> String {
    let log = node.wait_log(
        &format!("a refusal naming {fps:?} ({words:?})"),
        WAIT,
        |log| {
            log.lines().any(|l| {
                let low = l.to_lowercase();
                fps.iter().all(|fp| names_fp(l, fp)) && words.iter().any(|w| low.contains(w))
            })
        },
    );
    log.lines()
        .find(|l| {
            let low = l.to_lowercase();
            fps.iter().all(|fp| names_fp(l, fp)) && words.iter().any(|w| low.contains(w))
        })
        .expect("found above")
        .to_string()
}

#[test]
fn an_unpaired_peer_is_refused_and_changes_nothing() {
    let _w = Watchdog::arm("peer-unpaired", Duration::from_secs(120));
    let a = PeerNode::start("alice", NodeConfig::default());
    let b = PeerNode::start("bob", NodeConfig::default());
    let c = PeerNode::start("mallory", NodeConfig::default());
    connect(&a, &b);
    let before = snapshot(&b);
    // Mallory knows bob's fingerprint and address; bob never added her.
    c.add(&b, true);
    let line = wait_refusal(&b, &[c.fingerprint()], &["not paired", "unpaired"]);
    eprintln!("refusal: {line}");
    let pc = c.wait_peer(b.fingerprint(), "has a last_error", WAIT, |p| {
        p["last_error"].as_str().is_some()
    });
    assert_ne!(state(&pc), "connected", "{pc}");
    assert!(
        pc["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not added this machine's fingerprint")),
        "the refused side is told the likely cause: {pc}"
    );
    assert!(
        b.peer(c.fingerprint()).is_none(),
        "not added by the attempt"
    );
    assert_eq!(snapshot(&b), before, "bob's peers and store are unchanged");
    assert_never_connected(&b, c.fingerprint());
    assert_never_connected(&c, b.fingerprint());
    assert_eq!(
        state(&b.peer(a.fingerprint()).expect("alice listed")),
        "connected",
        "bob's real peer is still connected"
    );
    assert_eq!(
        state(&a.peer(b.fingerprint()).expect("bob listed")),
        "connected"
    );
}

#[test]
fn the_right_name_with_another_key_is_refused_both_ways() {
    let _w = Watchdog::arm("peer-wrong-key", Duration::from_secs(120));
    let a = PeerNode::start("alice", NodeConfig::default());
    let mut b = PeerNode::start("bob", NodeConfig::default());
    connect(&a, &b);
    let port = b.port();
    let b_fp = b.fingerprint().to_string();
    b.stop();
    a.try_wait_disconnected(&b, WAIT)
        .expect("alice sees bob go away");
    let before = snapshot(&a);
    // Another syncd, with its own key, takes bob's address and calls
    // itself bob; it has added alice and dials her too.
    let impostor = PeerNode::start(
        "bob",
        NodeConfig {
            port: Some(port),
            ..NodeConfig::default()
        },
    );
    assert_ne!(impostor.fingerprint(), b_fp);
    impostor.add(&a, true);
    // alice dials bob's address and finds the wrong key.
    let line = wait_refusal(&a, &[&b_fp, impostor.fingerprint()], &["wrong", "expected"]);
    eprintln!("alice refused: {line}");
    // The impostor dials alice and is not paired.
    let line = wait_refusal(&a, &[impostor.fingerprint()], &["not paired", "unpaired"]);
    eprintln!("alice refused: {line}");
    let pa = a.wait_peer(&b_fp, "has a last_error", WAIT, |p| {
        p["last_error"].as_str().is_some()
    });
    assert_ne!(state(&pa), "connected", "{pa}");
    assert_ne!(
        state(&impostor.peer(a.fingerprint()).expect("listed")),
        "connected"
    );
    assert_eq!(
        snapshot(&a),
        before,
        "alice's peers and store are unchanged"
    );
}

#[test]
fn a_man_in_the_middle_is_refused_by_both_victims() {
    let _w = Watchdog::arm("peer-mitm", Duration::from_secs(120));
    let a = PeerNode::start("alice", NodeConfig::default());
    let b = PeerNode::start("bob", NodeConfig::default());
    let c = PeerNode::start("mallory", NodeConfig::default());
    // alice has bob's true fingerprint, but the address she has for him
    // leads to mallory (a poisoned DNS name or a routed address).
    a.peer_add(b.fingerprint(), Some(&c.addr()), Some("bob"));
    b.add(&a, false);
    // mallory terminates alice's side and dials bob with her own key.
    c.add(&a, false);
    c.add(&b, true);
    let a_before = snapshot(&a);
    let b_before = snapshot(&b);
    let line = wait_refusal(
        &a,
        &[b.fingerprint(), c.fingerprint()],
        &["wrong", "expected"],
    );
    eprintln!("alice refused: {line}");
    let line = wait_refusal(&b, &[c.fingerprint()], &["not paired", "unpaired"]);
    eprintln!("bob refused: {line}");
    assert_ne!(
        state(&a.peer(b.fingerprint()).expect("listed")),
        "connected"
    );
    assert_ne!(
        state(&b.peer(a.fingerprint()).expect("listed")),
        "connected"
    );
    for (p, who) in [
        (c.peer(a.fingerprint()).expect("listed"), "alice"),
        (c.peer(b.fingerprint()).expect("listed"), "bob"),
    ] {
        assert_ne!(state(&p), "connected", "mallory is connected to {who}: {p}");
    }
    assert_eq!(snapshot(&a), a_before);
    assert_eq!(snapshot(&b), b_before);
    for (node, fp) in [
        (&a, c.fingerprint()),
        (&b, c.fingerprint()),
        (&c, a.fingerprint()),
        (&c, b.fingerprint()),
    ] {
        assert_never_connected(node, fp);
    }
}

#[test]
fn a_handshake_flood_does_not_disturb_an_established_peer() {
    let _w = Watchdog::arm("peer-flood", Duration::from_secs(180));
    let a = PeerNode::start("alice", NodeConfig::default());
    let b = PeerNode::start("bob", NodeConfig::default());
    connect(&a, &b);
    let alice_at_bob = b.peer(a.fingerprint()).expect("alice listed");
    // 200 connections to bob's port: half say nothing, half send a
    // handshake message of the largest length with garbage in it.
    let mut flood = Vec::new();
    for i in 0..200 {
        let Ok(mut s) = std::net::TcpStream::connect(b.addr()) else {
            continue;
        };
        if i % 2 == 1 {
            use std::io::Write;
            let mut junk = vec![0xffu8, 0xff];
            junk.extend(std::iter::repeat_n(0x42u8, 65535));
            let _ = s.write_all(&junk);
        }
        flood.push(s);
    }
    assert!(flood.len() >= 100, "opened {} connections", flood.len());
    b.wait_log("the handshake limit at work", WAIT, |log| {
        log.contains("too many peer handshakes")
    });
    // The established connection is untouched and works.
    let now = b.peer(a.fingerprint()).expect("alice listed");
    assert_eq!(state(&now), "connected", "{now}");
    assert_eq!(
        now["remote_addr"], alice_at_bob["remote_addr"],
        "same connection"
    );
    let r = a.bench(b.fingerprint(), 256 * 1024, 1);
    assert_eq!(r["bytes"].as_u64(), Some(256 * 1024), "{r}");
    // Once the flood is gone, a new paired peer gets in.
    drop(flood);
    let c = PeerNode::start("carol", NodeConfig::default());
    connect(&c, &b);
    assert!(b.peers().len() == 2);
}
