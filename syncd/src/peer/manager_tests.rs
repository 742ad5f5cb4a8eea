//! Two managers in one process, each with its own store, listener and
//! identity, talking over real TCP on 127.0.0.1 through the real channel
//! and connection: pairing, the duplicate rule when both dial, refusal of
//! an unpaired peer, bench, and removal.

use super::*;
use crate::channel::ChannelConfig;
use crate::peer::listen;
use crate::peer::requests::DefaultHandler;
use crate::store::peers::Peers;

/// The bound on every wait for a state change.
const LIMIT: Duration = Duration::from_secs(20);

struct Node {
    _dir: tempfile::TempDir,
    manager: Arc<Manager>,
    store: Peers,
    public: [u8; 32],
    fingerprint: String,
    addr: String,
}

fn node(rt: &tokio::runtime::Runtime) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .cache_capacity(1 << 20)
        .open()
        .expect("sled");
    let secret = x25519_dalek::StaticSecret::random().to_bytes();
    let keys = LocalKeys::new(secret);
    let public = keys.public();
    let cfg = ManagerConfig {
        channel: ChannelConfig::default(),
        conn: ConnConfig::default(),
        reconnect_max: Duration::from_millis(500),
        peer_timeout: Duration::from_secs(5),
    };
    let store = Peers::open(&db).expect("peers");
    let manager = Manager::start(
        keys,
        store.clone(),
        rt.handle().clone(),
        cfg,
        Arc::new(DefaultHandler),
    )
    .expect("start");
    let listener = listen::bind(&["127.0.0.1:0".parse().expect("addr")])
        .expect("bind")
        .remove(0);
    let addr = listener.local_addr().expect("addr").to_string();
    rt.spawn(listen::serve(listener, manager.clone()));
    Node {
        _dir: dir,
        manager,
        store,
        public,
        fingerprint: crate::identity::fingerprint_of(&public),
        addr,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Poll `f` every 20 ms until it answers `Some`, at most [`LIMIT`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn info(n: &Node, fingerprint: &str) -> Option<PeerInfo> {
    n.manager
        .list()
        .into_iter()
        .find(|p| p.fingerprint == fingerprint)
}

#[test]
fn pair_connect_bench_and_remove_closes_the_connection() {
    let rt = runtime();
    let a = node(&rt);
    let b = node(&rt);
    // b accepts a (no address: b never dials); a dials b.
    rt.block_on(b.manager.add(
        &crate::identity::group(&a.fingerprint).to_lowercase(),
        None,
        None,
    ))
    .expect("b adds a, grouped and lower case");
    rt.block_on(
        a.manager
            .add(&b.fingerprint, Some(b.addr.clone()), Some("b".into())),
    )
    .expect("a adds b");
    let (on_a, on_b) = wait_for("both connected", || {
        let on_a = info(&a, &b.fingerprint)?;
        let on_b = info(&b, &a.fingerprint)?;
        (on_a.state == "connected" && on_b.state == "connected").then_some((on_a, on_b))
    });
    assert_eq!(on_a.direction.as_deref(), Some("outbound"));
    assert_eq!(on_b.direction.as_deref(), Some("inbound"));
    assert_eq!(on_a.remote_addr.as_deref(), Some(b.addr.as_str()));
    assert_eq!(
        on_a.protocol_version,
        Some(crate::channel::PEER_PROTOCOL_VERSION)
    );
    assert_eq!(on_a.name.as_deref(), Some("b"));
    // An RTT comes with the first keepalive pong.
    wait_for("an RTT", || info(&a, &b.fingerprint)?.rtt_us);

    let report = rt
        .block_on(
            a.manager
                .bench(&b.fingerprint, 3 << 18, 3, Duration::from_secs(15)),
        )
        .expect("bench");
    assert_eq!((report.bytes, report.streams), (3 << 18, 3));
    assert!(report.seconds > 0.0 && report.mb_per_s > 0.0, "{report:?}");
    assert!(
        info(&a, &b.fingerprint).expect("a knows b").bytes_received >= 3 << 18,
        "the bench's bytes are counted"
    );

    // Removing a on b closes the connection at once; a sees it end.
    let removed = rt
        .block_on(b.manager.remove(&a.fingerprint))
        .expect("remove");
    assert_eq!(removed.state, "connected", "answers the peer as it was");
    assert!(!b.manager.is_paired(&a.fingerprint));
    assert!(b.manager.list().is_empty());
    let after = wait_for("a sees the connection end", || {
        info(&a, &b.fingerprint).filter(|p| p.state != "connected")
    });
    assert!(after.last_error.is_some(), "{after:?}");
    // When the connection ended, a wrote when b was last seen.
    let seen = wait_for("a's store to have b's last-seen time", || {
        a.store.get(&b.fingerprint).ok()??.last_seen_unix_ms
    });
    assert_eq!(Some(seen), after.last_seen_unix_ms);
    // And a's dials are refused from now on.
    std::thread::sleep(Duration::from_millis(1500));
    assert_ne!(
        info(&a, &b.fingerprint).expect("a still has b").state,
        "connected"
    );
    assert!(b.manager.list().is_empty(), "nothing came back on b");

    // Errors.
    assert!(matches!(
        rt.block_on(b.manager.remove(&a.fingerprint)),
        Err(PeerCtlError::UnknownPeer(_))
    ));
    assert!(matches!(
        rt.block_on(b.manager.add(&b.fingerprint, None, None)),
        Err(PeerCtlError::IsSelf)
    ));
    assert!(matches!(
        rt.block_on(b.manager.add("ABC", None, None)),
        Err(PeerCtlError::BadFingerprint(_))
    ));
    assert!(matches!(
        rt.block_on(b.manager.add(&a.fingerprint, Some("x:0".into()), None)),
        Err(PeerCtlError::BadAddress(_))
    ));
    assert!(matches!(
        rt.block_on(
            b.manager
                .bench(&a.fingerprint, 1, 1, Duration::from_secs(1))
        ),
        Err(PeerCtlError::UnknownPeer(_))
    ));
    assert!(matches!(
        rt.block_on(
            a.manager
                .bench(&b.fingerprint, 1, 1, Duration::from_secs(1))
        ),
        Err(PeerCtlError::NotConnected(_))
    ));
}

#[test]
fn when_both_dial_both_keep_the_connection_of_the_smaller_key() {
    let rt = runtime();
    let a = node(&rt);
    let b = node(&rt);
    // Paired without addresses: no dialer runs; the test dials.
    rt.block_on(a.manager.add(&b.fingerprint, None, None))
        .expect("a adds b");
    rt.block_on(b.manager.add(&a.fingerprint, None, None))
        .expect("b adds a");
    // Both dial at once; each dial finishes its handshake and registers,
    // so each side sees two connections.
    let (ra, rb) = rt.block_on(async {
        tokio::join!(
            super::super::dial::dial_once(&a.manager, &b.fingerprint, &b.addr),
            super::super::dial::dial_once(&b.manager, &a.fingerprint, &a.addr),
        )
    });
    ra.expect("a's dial");
    rb.expect("b's dial");
    let kept_by_a = if a.public < b.public {
        "outbound"
    } else {
        "inbound"
    };
    let kept_by_b = if a.public < b.public {
        "inbound"
    } else {
        "outbound"
    };
    wait_for("both keep the same connection", || {
        let on_a = info(&a, &b.fingerprint)?;
        let on_b = info(&b, &a.fingerprint)?;
        (on_a.direction.as_deref() == Some(kept_by_a)
            && on_b.direction.as_deref() == Some(kept_by_b))
        .then_some(())
    });
    // It stays that way: the other connection was closed, not this one.
    std::thread::sleep(Duration::from_millis(300));
    let on_a = info(&a, &b.fingerprint).expect("a knows b");
    assert_eq!(
        (on_a.state.as_str(), on_a.direction.as_deref()),
        ("connected", Some(kept_by_a))
    );
    let on_b = info(&b, &a.fingerprint).expect("b knows a");
    assert_eq!(
        (on_b.state.as_str(), on_b.direction.as_deref()),
        ("connected", Some(kept_by_b))
    );
}

#[test]
fn an_unpaired_peer_is_refused_and_a_peer_without_address_is_idle() {
    let rt = runtime();
    let a = node(&rt);
    let b = node(&rt);
    // a dials b, which never added a.
    rt.block_on(a.manager.add(&b.fingerprint, Some(b.addr.clone()), None))
        .expect("a adds b");
    let waiting = wait_for("a backs off", || {
        info(&a, &b.fingerprint).filter(|p| p.state == "waiting" && p.last_error.is_some())
    });
    assert!(waiting.next_attempt_ms.is_some(), "{waiting:?}");
    assert!(b.manager.list().is_empty());
    // b adds a without an address: b waits for a's next dial (idle until
    // then), which now succeeds.
    let added = rt
        .block_on(b.manager.add(&a.fingerprint, None, None))
        .expect("b adds a");
    assert!(
        matches!(added.state.as_str(), "idle" | "connected"),
        "{added:?}"
    );
    let on_b = wait_for("a's retry connects", || {
        info(&b, &a.fingerprint).filter(|p| p.state == "connected")
    });
    assert_eq!(on_b.direction.as_deref(), Some("inbound"));
    assert_eq!(on_b.addr, None);
}
