//! Tests of the whole channel over real TCP sockets on 127.0.0.1.

use super::handshake::{self, Params};
use super::*;
use crate::identity::fingerprint_of;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn keys(seed: u8) -> LocalKeys {
    LocalKeys::new([seed; 32])
}

fn params(min: u32, max: u32) -> Params {
    Params {
        min,
        max,
        software: format!("test {min}..{max}"),
        corrupt_ct: false,
    }
}

fn cfg() -> ChannelConfig {
    ChannelConfig {
        handshake_timeout: Duration::from_secs(10),
        ..ChannelConfig::default()
    }
}

/// A connected pair of TCP streams on 127.0.0.1: (dialer's, listener's).
pub(super) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    (a.expect("connect"), b.expect("accept").0)
}

type Both = (
    Result<Established, ChannelError>,
    Result<Established, ChannelError>,
);

/// Run both sides of a handshake on a fresh TCP pair.
async fn handshake_with(
    init: &LocalKeys,
    resp: &LocalKeys,
    expected: &str,
    paired: impl Fn(&str) -> bool + Send + Sync + 'static,
    pi: Params,
    pr: Params,
    cfg: &ChannelConfig,
) -> Both {
    let (a, b) = tcp_pair().await;
    let paired: Arc<dyn Fn(&str) -> bool + Send + Sync> = Arc::new(paired);
    tokio::join!(
        handshake::initiate_with(a, init, expected, cfg, &pi),
        handshake::respond_with(b, resp, &*paired, cfg, &pr),
    )
}

/// A finished pair: (initiator's, responder's).
pub(super) async fn established(cfg: &ChannelConfig) -> (Established, Established) {
    let (a, b) = (keys(1), keys(2));
    let fp_a = fingerprint_of(&a.public());
    let fp_b = fingerprint_of(&b.public());
    let (i, r) = handshake_with(
        &a,
        &b,
        &fp_b,
        move |fp| fp == fp_a,
        params(1, 1),
        params(1, 1),
        cfg,
    )
    .await;
    (i.expect("initiator"), r.expect("responder"))
}

#[tokio::test]
async fn handshake_agrees_on_keys_version_and_identities() {
    let (a, b) = (keys(1), keys(2));
    let fp_a = fingerprint_of(&a.public());
    let fp_b = fingerprint_of(&b.public());
    let grouped = crate::identity::group(&fp_b).to_lowercase();
    let fa = fp_a.clone();
    let (i, r) = handshake_with(
        &a,
        &b,
        &grouped, // typed by a person: grouped, lower case
        move |fp| fp == fa,
        params(1, 3),
        params(2, 5),
        &cfg(),
    )
    .await;
    let (i, r) = (i.expect("initiator"), r.expect("responder"));
    assert_eq!(i.version, 3);
    assert_eq!(r.version, 3);
    assert_eq!(i.remote_public, b.public());
    assert_eq!(r.remote_public, a.public());
    assert_eq!(i.remote_fingerprint, fp_b);
    assert_eq!(r.remote_fingerprint, fp_a);
    assert_eq!(i.remote_software, "test 2..5");
    assert_eq!(r.remote_software, "test 1..3");
    // Per-direction keys: each sender's key is the other side's receive
    // key, and the two directions differ.
    assert_eq!(*i.tx.sealer.dir.key, *r.rx.opener.dir.key);
    assert_eq!(*r.tx.sealer.dir.key, *i.rx.opener.dir.key);
    assert_ne!(*i.tx.sealer.dir.key, *i.rx.opener.dir.key);
    // READY used counter 0 each way.
    assert_eq!(i.tx.sealer.dir.counter, 1);
    assert_eq!(r.rx.opener.dir.counter, 1);
    assert!(i.handshake_time > Duration::ZERO);
}

#[tokio::test]
async fn two_handshakes_give_different_keys() {
    let (i1, _r1) = established(&cfg()).await;
    let (i2, _r2) = established(&cfg()).await;
    assert_ne!(*i1.tx.sealer.dir.key, *i2.tx.sealer.dir.key);
}

#[tokio::test]
async fn data_flows_both_ways_and_close_carries_the_reason() {
    let (mut i, mut r) = established(&cfg()).await;
    let mut buf = Vec::new();
    for n in [0usize, 1, 1000, MAX_PAYLOAD] {
        let msg: Vec<u8> = (0..n).map(|x| (x * 7 + n) as u8).collect();
        let (sent, got) = tokio::join!(i.tx.send(&msg), r.rx.recv(&mut buf));
        sent.expect("send");
        got.expect("recv");
        assert_eq!(buf, msg, "payload of {n} bytes");
        r.tx.send(&msg).await.expect("send back");
        i.rx.recv(&mut buf).await.expect("recv back");
        assert_eq!(buf, msg);
    }
    assert!(matches!(
        i.tx.send(&vec![0u8; MAX_PAYLOAD + 1]).await,
        Err(ChannelError::Oversize { len, cap }) if len == MAX_PAYLOAD as u64 + 1 && cap == MAX_PAYLOAD as u64
    ));
    assert_eq!(i.tx.bytes_sent(), r.rx.bytes_received());
    i.tx.close("shutting down").await.expect("close");
    let err = r.rx.recv(&mut buf).await.expect_err("closed");
    assert!(
        matches!(&err, ChannelError::Closed(m) if m == "shutting down"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_peer_is_refused_by_the_dialer() {
    let (a, b, c) = (keys(1), keys(2), keys(3));
    let fp_a = fingerprint_of(&a.public());
    let fp_c = fingerprint_of(&c.public());
    let fp_b = fingerprint_of(&b.public());
    let (i, r) = handshake_with(
        &a,
        &b,
        &fp_c,
        move |fp| fp == fp_a,
        params(1, 1),
        params(1, 1),
        &cfg(),
    )
    .await;
    let err = i.expect_err("wrong peer");
    assert!(
        matches!(&err, ChannelError::WrongPeer { expected, got } if *expected == fp_c && *got == fp_b),
        "{err}"
    );
    assert!(err.to_string().contains(&fp_c) && err.to_string().contains(&fp_b));
    assert!(r.is_err(), "the responder fails too (the dialer hung up)");
}

#[tokio::test]
async fn unpaired_peer_is_refused_by_the_listener() {
    let (a, b) = (keys(1), keys(2));
    let fp_a = fingerprint_of(&a.public());
    let fp_b = fingerprint_of(&b.public());
    let (i, r) = handshake_with(&a, &b, &fp_b, |_| false, params(1, 1), params(1, 1), &cfg()).await;
    let err = r.expect_err("not paired");
    assert!(
        matches!(&err, ChannelError::NotPaired { fingerprint } if *fingerprint == fp_a),
        "{err}"
    );
    assert!(err.to_string().contains(&fp_a));
    assert!(i.is_err(), "the initiator never gets the READY");
}

#[tokio::test]
async fn version_mismatch_names_both_versions_on_both_sides() {
    let (a, b) = (keys(1), keys(2));
    let fp_a = fingerprint_of(&a.public());
    let fp_b = fingerprint_of(&b.public());
    let (i, r) = handshake_with(
        &a,
        &b,
        &fp_b,
        move |fp| fp == fp_a,
        params(1, 1),
        params(2, 2),
        &cfg(),
    )
    .await;
    let ei = i.expect_err("initiator");
    let er = r.expect_err("responder");
    assert!(
        matches!(
            ei,
            ChannelError::Version {
                ours: (1, 1),
                theirs: (2, 2)
            }
        ),
        "{ei}"
    );
    assert!(
        matches!(
            er,
            ChannelError::Version {
                ours: (2, 2),
                theirs: (1, 1)
            }
        ),
        "{er}"
    );
    let msg = ei.to_string();
    assert!(msg.contains("1..=1") && msg.contains("2..=2"), "{msg}");
}

#[tokio::test]
async fn handshake_times_out_against_a_silent_peer() {
    let (a, _b) = tcp_pair().await;
    let cfg = ChannelConfig {
        handshake_timeout: Duration::from_millis(200),
        ..ChannelConfig::default()
    };
    let started = std::time::Instant::now();
    let err = initiate(a, &keys(1), &fingerprint_of(&keys(2).public()), &cfg)
        .await
        .expect_err("silent");
    assert!(matches!(err, ChannelError::Timeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "bounded");
}

/// A relay between the two sides that passes handshake messages through
/// and lets `edit` change message `index` (0-based) on the way.
async fn relay_editing_handshake(
    index: usize,
    edit: impl Fn(&mut Vec<u8>) + Send + 'static,
) -> (TcpStream, TcpStream) {
    let (init_side, relay_a) = tcp_pair().await;
    let (relay_b, resp_side) = tcp_pair().await;
    tokio::spawn(async move {
        let (mut ar, mut aw) = relay_a.into_split();
        let (mut br, mut bw) = relay_b.into_split();
        // Messages alternate: 0 a->b, 1 b->a, 2 a->b; then raw copying.
        for m in 0..3 {
            let (from, to): (
                &mut tokio::net::tcp::OwnedReadHalf,
                &mut tokio::net::tcp::OwnedWriteHalf,
            ) = if m % 2 == 0 {
                (&mut ar, &mut bw)
            } else {
                (&mut br, &mut aw)
            };
            let mut len = [0u8; 2];
            if from.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
            if from.read_exact(&mut msg).await.is_err() {
                return;
            }
            if m == index {
                edit(&mut msg);
            }
            let _ = to.write_all(&(msg.len() as u16).to_be_bytes()).await;
            let _ = to.write_all(&msg).await;
        }
        let _ = tokio::join!(
            tokio::io::copy(&mut ar, &mut bw),
            tokio::io::copy(&mut br, &mut aw)
        );
    });
    (init_side, resp_side)
}

async fn handshake_over(a: TcpStream, b: TcpStream, pr: Params) -> Both {
    let (ka, kb) = (keys(1), keys(2));
    let fp_a = fingerprint_of(&ka.public());
    let fp_b = fingerprint_of(&kb.public());
    let paired = move |fp: &str| fp == fp_a;
    let (c, pi) = (cfg(), params(1, 1));
    tokio::join!(
        handshake::initiate_with(a, &ka, &fp_b, &c, &pi),
        handshake::respond_with(b, &kb, &paired, &c, &pr),
    )
}

#[tokio::test]
async fn tampered_mlkem_ciphertext_in_message_2_fails_the_handshake() {
    // Message 2: e (32) || encrypted static (32 + 16) || encrypted payload.
    // The payload is Hello { min, max, software, mlkem_ct }: the last
    // 1088 + 16 bytes are the ciphertext and the tag; flip one in the
    // middle of the ciphertext.
    let (a, b) = relay_editing_handshake(1, |m| {
        let at = m.len() - 16 - 500;
        m[at] ^= 0x40;
    })
    .await;
    let (i, r) = handshake_over(a, b, params(1, 1)).await;
    let ei = i.expect_err("initiator");
    assert!(
        matches!(&ei, ChannelError::Handshake(m) if m.contains("message 2")),
        "{ei}"
    );
    assert!(r.is_err(), "responder");
}

#[tokio::test]
async fn tampered_mlkem_key_in_message_1_fails_the_handshake() {
    // Message 1 is e (32) || postcard(Msg1): the ML-KEM key is in clear,
    // but hashed into the transcript.
    let (a, b) = relay_editing_handshake(0, |m| m[100] ^= 1).await;
    let (i, r) = handshake_over(a, b, params(1, 1)).await;
    let ei = i.expect_err("initiator");
    assert!(matches!(&ei, ChannelError::Handshake(_)), "{ei}");
    assert!(r.is_err());
}

#[tokio::test]
async fn forged_mlkem_ciphertext_fails_key_confirmation() {
    // A ciphertext changed before Noise encrypts it (what an attacker who
    // broke X25519 but not ML-KEM could send): ML-KEM's implicit
    // rejection gives the initiator another secret, so the keys differ
    // and neither READY opens.
    let (a, b) = tcp_pair().await;
    let mut pr = params(1, 1);
    pr.corrupt_ct = true;
    let (i, r) = handshake_over(a, b, pr).await;
    for e in [i.expect_err("initiator"), r.expect_err("responder")] {
        assert!(
            matches!(&e, ChannelError::Handshake(m) if m.contains("key confirmation")),
            "{e}"
        );
    }
}
