//! `keibictl id`, `peer add`, `peer list`, `peer remove` and `peer bench`
//! with `--json` on a real syncd, and their errors with exit statuses
//! (README): 2 for a bad fingerprint or address (the message names what is
//! wrong), 3 for an unknown peer or one that is not connected.

use harness::Watchdog;
use harness::peers::{NodeConfig, PeerNode, state};
use harness::process::assert_exit;
use serde_json::Value;
use std::process::Output;
use std::time::Duration;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every field of the PeerInfo JSON, as docs/protocol.md lists them.
const PEER_INFO_FIELDS: [&str; 14] = [
    "fingerprint",
    "name",
    "addr",
    "state",
    "direction",
    "remote_addr",
    "last_seen_unix_ms",
    "rtt_us",
    "bytes_sent",
    "bytes_received",
    "protocol_version",
    "rekeys",
    "last_error",
    "next_attempt_ms",
];

#[track_caller]
fn assert_peer_info(p: &Value) {
    let obj = p
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {p}"));
    for f in PEER_INFO_FIELDS {
        assert!(obj.contains_key(f), "PeerInfo without `{f}`: {p}");
    }
}

/// The fingerprint grouped in fours, lower case, as people may type it.
fn typed_by_hand(fp: &str) -> String {
    fp.to_lowercase()
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("-")
}

#[test]
fn id_reports_the_bound_listen_address() {
    let _w = Watchdog::arm("peer-cli-id", Duration::from_secs(60));
    let a = PeerNode::start("alice", NodeConfig::default());
    let id = a.id();
    assert_eq!(id["fingerprint"].as_str(), Some(a.fingerprint()));
    assert_eq!(a.fingerprint().len(), 52);
    assert_eq!(id["listen"], serde_json::json!([a.addr()]), "{id}");
    // Bound for real: something accepts a TCP connection there.
    std::net::TcpStream::connect(a.addr()).expect("syncd listens on its listen address");
    // The text form groups the fingerprint for reading aloud.
    let out = a.ctl(&["id"]);
    assert_exit(&out, 0, "keibictl id");
    let text = String::from_utf8_lossy(&out.stdout);
    let grouped: String = a
        .fingerprint()
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(text.contains(&grouped), "grouped fingerprint in: {text}");
}

#[test]
fn add_list_remove_with_json() {
    let _w = Watchdog::arm("peer-cli-json", Duration::from_secs(120));
    let a = PeerNode::start("alice", NodeConfig::default());
    let b = PeerNode::start("bob", NodeConfig::default());
    assert_eq!(a.peers(), Vec::<Value>::new(), "no peers at first");

    // Grouped, lower case, with dashes: accepted and normalised.
    let added = a.peer_add(&typed_by_hand(b.fingerprint()), None, Some("bob"));
    assert_peer_info(&added);
    assert_eq!(added["fingerprint"].as_str(), Some(b.fingerprint()));
    assert_eq!(added["name"].as_str(), Some("bob"));
    assert_eq!(added["addr"], Value::Null);
    assert_eq!(state(&added), "idle", "no address, not connected: {added}");

    let list = a.peers();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_peer_info(&list[0]);
    assert_eq!(list[0]["fingerprint"].as_str(), Some(b.fingerprint()));

    // Adding it again updates the address and the name.
    let again = a.peer_add(b.fingerprint(), Some(&b.addr()), Some("robert"));
    assert_eq!(again["addr"].as_str(), Some(b.addr().as_str()));
    assert_eq!(again["name"].as_str(), Some("robert"));
    assert_eq!(a.peers().len(), 1, "still one entry");

    // It persists across a restart (flushed on add).
    let mut a = a;
    a.restart();
    let list = a.peers();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"].as_str(), Some("robert"));
    assert_eq!(list[0]["addr"].as_str(), Some(b.addr().as_str()));

    // The table names it too.
    let out = a.ctl(&["peer", "list"]);
    assert_exit(&out, 0, "peer list");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("robert"),
        "{out:?}"
    );

    let removed = a.peer_remove(b.fingerprint());
    assert_peer_info(&removed);
    assert_eq!(removed["fingerprint"].as_str(), Some(b.fingerprint()));
    assert_eq!(a.peers(), Vec::<Value>::new());
    a.restart();
    assert_eq!(a.peers(), Vec::<Value>::new(), "the removal persists");
}

#[test]
fn errors_have_their_exit_status_and_name_what_is_wrong() {
    let _w = Watchdog::arm("peer-cli-errors", Duration::from_secs(120));
    let a = PeerNode::start("alice", NodeConfig::default());
    let b = PeerNode::start("bob", NodeConfig::default());
    let fp = b.fingerprint().to_string();

    // Bad fingerprints: too short, not base32, and one character changed
    // (still base32 of the right length, but the last character carries
    // bits beyond 256, so it is not a key's fingerprint or it is a
    // different one: both are refused or unknown, never silently mapped).
    let short = &fp[..51];
    let out = a.ctl(&["peer", "add", short, "--json"]);
    assert_exit(&out, 2, "peer add with 51 characters");
    assert!(
        stderr(&out).contains("52"),
        "names the length: {}",
        stderr(&out)
    );
    let mut not_base32 = fp.clone();
    not_base32.replace_range(0..1, "1");
    let out = a.ctl(&["peer", "add", &not_base32, "--json"]);
    assert_exit(&out, 2, "peer add with a non-base32 character");
    assert!(!stderr(&out).is_empty(), "{out:?}");

    // Its own fingerprint.
    let out = a.ctl(&["peer", "add", a.fingerprint(), "--json"]);
    assert_exit(&out, 2, "peer add of one's own fingerprint");

    // A bad address.
    let out = a.ctl(&["peer", "add", &fp, "--addr", "127.0.0.1:notaport", "--json"]);
    assert_exit(&out, 2, "peer add with a bad address");
    assert!(
        stderr(&out).contains("notaport"),
        "names the address: {}",
        stderr(&out)
    );
    assert_eq!(a.peers(), Vec::<Value>::new(), "nothing was added");

    // Unknown peers: remove and bench.
    let out = a.ctl(&["peer", "remove", &fp, "--json"]);
    assert_exit(&out, 3, "peer remove of a peer not added");
    assert!(stderr(&out).contains(&fp), "names it: {}", stderr(&out));
    let out = a.ctl(&["peer", "bench", &fp, "--bytes", "1000", "--json"]);
    assert_exit(&out, 3, "peer bench of a peer not added");

    // Added but not connected (b has not added a): bench says so, exit 3.
    a.peer_add(&fp, None, Some("bob"));
    let out = a.ctl(&["peer", "bench", &fp, "--bytes", "1000", "--json"]);
    assert_exit(&out, 3, "peer bench of a peer that is not connected");

    // A bad fingerprint for remove is exit 2 as well.
    let out = a.ctl(&["peer", "remove", short, "--json"]);
    assert_exit(&out, 2, "peer remove with a bad fingerprint");

    // syncd unreachable: exit 1.
    let mut a = a;
    a.stop();
    let out = a.ctl(&["peer", "list", "--json"]);
    assert_exit(&out, 1, "peer list with syncd stopped");
}

#[test]
fn an_unprivileged_user_cannot_pair_or_list_peers() {
    let _w = Watchdog::arm("peer-cli-unprivileged", Duration::from_secs(60));
    let a = PeerNode::start("alice", NodeConfig::default());
    let b = PeerNode::start("bob", NodeConfig::default());
    // The control socket is 0660 nobody:nogroup here; OTHER_UID is in
    // neither.
    let keibictl = harness::binaries::binary("keibictl");
    for args in [
        format!("peer add {} --json", b.fingerprint()),
        "peer list --json".to_string(),
    ] {
        let out = harness::run_as(
            harness::OTHER_UID,
            &format!(
                "{} --socket {} {args}",
                keibictl.display(),
                a.control_socket().display()
            ),
        );
        assert_exit(
            &out,
            1,
            &format!("keibictl {args} as uid {}", harness::OTHER_UID),
        );
        assert!(
            stderr(&out).to_lowercase().contains("permission denied"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(a.peers(), Vec::<Value>::new(), "nothing was added");
}
