//! Tests of the whole channel over real TCP sockets on 127.0.0.1.

use super::frame::FrameType;
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
        omit_offer: false,
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

/// A connected pair whose socket buffers are small (64 KiB asked), so
/// that a writer blocks soon when nobody reads.
async fn small_buffered_tcp_pair() -> (TcpStream, TcpStream) {
    let ls = tokio::net::TcpSocket::new_v4().expect("socket");
    ls.set_recv_buffer_size(1 << 16).expect("rcvbuf");
    ls.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let l = ls.listen(1).expect("listen");
    let addr = l.local_addr().expect("addr");
    let cs = tokio::net::TcpSocket::new_v4().expect("socket");
    cs.set_send_buffer_size(1 << 16).expect("sndbuf");
    let (a, b) = tokio::join!(cs.connect(addr), l.accept());
    (a.expect("connect"), b.expect("accept").0)
}

/// A finished pair: (initiator's, responder's).
pub(super) async fn established(cfg: &ChannelConfig) -> (Established, Established) {
    let (a, b) = tcp_pair().await;
    established_on(a, b, cfg).await
}

/// A finished pair over the given streams.
async fn established_on(
    a: TcpStream,
    b: TcpStream,
    cfg: &ChannelConfig,
) -> (Established, Established) {
    let (ka, kb) = (keys(1), keys(2));
    let fp_a = fingerprint_of(&ka.public());
    let fp_b = fingerprint_of(&kb.public());
    let paired = move |fp: &str| fp == fp_a;
    let (pi, pr) = (params(1, 1), params(1, 1));
    let (i, r) = tokio::join!(
        handshake::initiate_with(a, &ka, &fp_b, cfg, &pi),
        handshake::respond_with(b, &kb, &paired, cfg, &pr),
    );
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
    let err = i.expect_err("the initiator never gets the READY");
    assert!(
        err.to_string()
            .contains("has most likely not added this machine's fingerprint"),
        "{err}"
    );
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
    handshake_over_with(a, b, pr, &cfg()).await
}

async fn handshake_over_with(a: TcpStream, b: TcpStream, pr: Params, c: &ChannelConfig) -> Both {
    let (ka, kb) = (keys(1), keys(2));
    let fp_a = fingerprint_of(&ka.public());
    let fp_b = fingerprint_of(&kb.public());
    let paired = move |fp: &str| fp == fp_a;
    let pi = params(1, 1);
    tokio::join!(
        handshake::initiate_with(a, &ka, &fp_b, c, &pi),
        handshake::respond_with(b, &kb, &paired, c, &pr),
    )
}

#[tokio::test]
async fn tampered_mlkem_ciphertext_in_message_2_fails_the_handshake() {
    // Message 2: e (32) || encrypted static (32 + 16) || encrypted payload.
    // The payload is Hello { min, max, software, mlkem_ct } and a short
    // Offer (a few bytes), then Noise's 16-byte tag: 500 bytes before the
    // tag is in the middle of the 1088-byte ciphertext; flip one there.
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

/// What the frame relay does to frame `n` (counted from 0 = READY) of
/// the initiator → responder direction.
#[derive(Debug, Clone, Copy)]
enum Attack {
    /// Flip one bit of the sealed body.
    Flip(usize),
    /// Forward it, then forward it again.
    Replay(usize),
    /// Forward frame n+1 before frame n.
    Swap(usize),
    /// Send it back to the initiator instead.
    Reflect(usize),
    /// Forward half of it, then end the stream.
    Truncate(usize),
    /// Send a length prefix of u32::MAX instead, and nothing after it
    /// (the connection stays open).
    Oversize(usize),
}

async fn read_hs_msg(r: &mut tokio::net::tcp::OwnedReadHalf) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await.ok()?;
    let mut msg = len.to_vec();
    msg.resize(2 + u16::from_be_bytes(len) as usize, 0);
    r.read_exact(&mut msg[2..]).await.ok()?;
    Some(msg)
}

async fn read_raw_frame(r: &mut tokio::net::tcp::OwnedReadHalf) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.ok()?;
    let mut f = len.to_vec();
    f.resize(4 + u32::from_be_bytes(len) as usize, 0);
    r.read_exact(&mut f[4..]).await.ok()?;
    Some(f)
}

/// A relay that understands the framing (3 handshake messages, then u32
/// frames) and applies `attack` to the initiator → responder frames.
/// Returns (initiator's stream, responder's stream).
async fn frame_relay(attack: Attack) -> (TcpStream, TcpStream) {
    let (init_side, relay_a) = tcp_pair().await;
    let (relay_b, resp_side) = tcp_pair().await;
    tokio::spawn(async move {
        let (mut ar, aw) = relay_a.into_split();
        let (mut br, mut bw) = relay_b.into_split();
        let aw = Arc::new(tokio::sync::Mutex::new(aw));
        for m in 0..3 {
            if m % 2 == 0 {
                let Some(msg) = read_hs_msg(&mut ar).await else {
                    return;
                };
                let _ = bw.write_all(&msg).await;
            } else {
                let Some(msg) = read_hs_msg(&mut br).await else {
                    return;
                };
                let _ = aw.lock().await.write_all(&msg).await;
            }
        }
        // responder → initiator: pass through.
        let back = Arc::clone(&aw);
        tokio::spawn(async move {
            while let Some(f) = read_raw_frame(&mut br).await {
                if back.lock().await.write_all(&f).await.is_err() {
                    return;
                }
            }
        });
        let mut n = 0usize;
        let mut held: Option<Vec<u8>> = None;
        while let Some(mut f) = read_raw_frame(&mut ar).await {
            let out: Vec<Vec<u8>> = match attack {
                Attack::Flip(k) if k == n => {
                    let last = f.len() - 1;
                    f[last / 2 + 2] ^= 0x01;
                    vec![f]
                }
                Attack::Replay(k) if k == n => vec![f.clone(), f],
                Attack::Swap(k) if k == n => {
                    held = Some(f);
                    vec![]
                }
                Attack::Swap(k) if k + 1 == n => {
                    let first = held.take().expect("held frame");
                    vec![f, first]
                }
                Attack::Reflect(k) if k == n => {
                    let _ = aw.lock().await.write_all(&f).await;
                    vec![]
                }
                Attack::Truncate(k) if k == n => {
                    let _ = bw.write_all(&f[..f.len() / 2]).await;
                    let _ = bw.shutdown().await;
                    // Keep the initiator's side open; stop relaying.
                    std::future::pending::<()>().await;
                    vec![]
                }
                Attack::Oversize(k) if k == n => {
                    let _ = bw.write_all(&u32::MAX.to_be_bytes()).await;
                    std::future::pending::<()>().await;
                    vec![]
                }
                _ => vec![f],
            };
            for f in out {
                if bw.write_all(&f).await.is_err() {
                    return;
                }
            }
            n += 1;
        }
    });
    (init_side, resp_side)
}

/// A channel through `frame_relay(attack)`: (initiator's, responder's).
/// ChaCha20-Poly1305, whose failed opens keep the frame, so that the
/// receiver can name the attack.
async fn attacked(attack: Attack) -> (Established, Established) {
    attacked_with(attack, AeadKind::ChaCha20Poly1305).await
}

async fn attacked_with(attack: Attack, kind: AeadKind) -> (Established, Established) {
    let (a, b) = frame_relay(attack).await;
    let c = ChannelConfig {
        aeads: vec![kind],
        ..cfg()
    };
    let (i, r) = handshake_over_with(a, b, params(1, 1), &c).await;
    let (i, r) = (i.expect("initiator"), r.expect("responder"));
    assert_eq!((i.aead, r.aead), (kind, kind));
    (i, r)
}

/// Send DATA frames 1..=4 (frame 0 was READY) and return what the
/// responder got before its error, and the error.
async fn deliver(i: &mut Established, r: &mut Established) -> (Vec<Vec<u8>>, ChannelError) {
    for k in 1..=4u8 {
        i.tx.send(&[k; 100]).await.expect("send");
    }
    let mut got = Vec::new();
    let mut buf = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), r.rx.recv(&mut buf)).await {
            Ok(Ok(())) => got.push(buf.clone()),
            Ok(Err(e)) => return (got, e),
            Err(_) => panic!("no error within 10 s; got {} frames", got.len()),
        }
    }
}

fn first_byte(frames: &[Vec<u8>]) -> Vec<u8> {
    frames.iter().map(|f| f[0]).collect()
}

#[tokio::test]
async fn tampered_frame_fails_authentication() {
    let (mut i, mut r) = attacked(Attack::Flip(2)).await;
    let (got, err) = deliver(&mut i, &mut r).await;
    assert_eq!(first_byte(&got), [1]);
    assert!(
        matches!(&err, ChannelError::BadFrame(m) if m.contains("frame 2") && m.contains("failed authentication")),
        "{err}"
    );
}

/// Under AES-256-GCM a frame that fails is wiped by ring, so the cause
/// cannot be named; every attack still closes the channel, and no frame
/// after the attacked one is delivered.
#[tokio::test]
async fn under_aes_gcm_every_attack_fails_authentication_unnamed() {
    for (attack, delivered) in [
        (Attack::Flip(2), vec![1]),
        (Attack::Replay(2), vec![1, 2]),
        (Attack::Swap(2), vec![1]),
    ] {
        let (mut i, mut r) = attacked_with(attack, AeadKind::Aes256Gcm).await;
        let (got, err) = deliver(&mut i, &mut r).await;
        assert_eq!(first_byte(&got), delivered);
        assert!(
            matches!(&err, ChannelError::BadFrame(m) if m.contains("failed authentication") && m.contains("aes-256-gcm")),
            "{err}"
        );
    }
}

#[tokio::test]
async fn replayed_frame_is_named_a_replay() {
    let (mut i, mut r) = attacked(Attack::Replay(2)).await;
    let (got, err) = deliver(&mut i, &mut r).await;
    assert_eq!(first_byte(&got), [1, 2], "the original is delivered once");
    assert!(
        matches!(&err, ChannelError::BadFrame(m) if m.contains("frame 3 is a replay of frame 2")),
        "{err}"
    );
}

#[tokio::test]
async fn reordered_frames_are_named_out_of_order() {
    let (mut i, mut r) = attacked(Attack::Swap(2)).await;
    let (got, err) = deliver(&mut i, &mut r).await;
    assert_eq!(first_byte(&got), [1]);
    assert!(
        matches!(&err, ChannelError::BadFrame(m) if m.contains("frame 2 arrived out of order") && m.contains("sealed as frame 3")),
        "{err}"
    );
}

#[tokio::test]
async fn reflected_frame_is_named_a_reflection() {
    let (mut i, _r) = attacked(Attack::Reflect(1)).await;
    i.tx.send(b"to the responder").await.expect("send");
    let mut buf = Vec::new();
    let err = tokio::time::timeout(Duration::from_secs(10), i.rx.recv(&mut buf))
        .await
        .expect("bounded")
        .expect_err("reflection");
    assert!(
        matches!(&err, ChannelError::BadFrame(m) if m.contains("reflection of our own frame 1")),
        "{err}"
    );
}

#[tokio::test]
async fn truncated_frame_is_named_truncated() {
    let (mut i, mut r) = attacked(Attack::Truncate(3)).await;
    let (got, err) = deliver(&mut i, &mut r).await;
    assert_eq!(first_byte(&got), [1, 2]);
    assert!(
        matches!(&err, ChannelError::BadFrame(m) if m.contains("truncated") && m.contains("of the 117 bytes")),
        "{err}"
    );
}

#[tokio::test]
async fn oversize_length_fails_at_once_without_reading_or_allocating() {
    let (mut i, mut r) = attacked(Attack::Oversize(2)).await;
    i.tx.send(&[1; 100]).await.expect("send");
    i.tx.send(&[2; 100]).await.expect("send");
    let mut buf = Vec::new();
    r.rx.recv(&mut buf).await.expect("frame 1");
    let mut fresh = Vec::new();
    // The relay sends 4 bytes and then nothing while keeping the socket
    // open: the error must come from the prefix alone.
    let err = tokio::time::timeout(Duration::from_secs(5), r.rx.recv(&mut fresh))
        .await
        .expect("the receiver must not wait for the 4 GiB body")
        .expect_err("oversize");
    assert!(
        matches!(err, ChannelError::Oversize { len, cap } if len == u32::MAX as u64 && cap == MAX_FRAME as u64),
        "{err}"
    );
    assert_eq!(fresh.capacity(), 0, "the caller's buffer is untouched");
    assert!(
        r.rx.body.capacity() < 1024,
        "nothing allocated for the body: {}",
        r.rx.body.capacity()
    );
}

#[tokio::test]
async fn rekey_by_bytes_loses_and_duplicates_nothing() {
    let cfg = ChannelConfig {
        handshake_timeout: Duration::from_secs(10),
        rekey_bytes: 16_384,
        rekey_interval: Duration::from_secs(3600),
        ..ChannelConfig::default()
    };
    let (mut i, mut r) = established(&cfg).await;
    let first_key = *i.tx.sealer.dir.key;
    const N: u32 = 600;
    let sender = tokio::spawn(async move {
        for k in 0..N {
            // Varying sizes, a sequence number first.
            let len = 4 + (k as usize * 37) % 1500;
            let mut msg = vec![(k % 251) as u8; len];
            msg[..4].copy_from_slice(&k.to_be_bytes());
            i.tx.send(&msg).await.expect("send");
        }
        i
    });
    let mut buf = Vec::new();
    for k in 0..N {
        r.rx.recv(&mut buf).await.expect("recv");
        assert_eq!(
            u32::from_be_bytes(buf[..4].try_into().expect("4")),
            k,
            "in order, none lost or repeated"
        );
        assert_eq!(buf.len(), 4 + (k as usize * 37) % 1500);
        assert!(buf[4..].iter().all(|b| *b == (k % 251) as u8));
    }
    let i = sender.await.expect("sender");
    // About 450 KB through 16 KiB keys.
    assert!(i.tx.rekeys() > 20, "rekeys: {}", i.tx.rekeys());
    assert_eq!(i.tx.rekeys(), r.rx.rekeys());
    assert_ne!(*i.tx.sealer.dir.key, first_key, "the key changed");
    assert_eq!(
        *i.tx.sealer.dir.key, *r.rx.opener.dir.key,
        "both sides agree"
    );
    assert_eq!(i.tx.bytes_sent(), r.rx.bytes_received());
}

#[tokio::test]
async fn rekey_by_time() {
    let cfg = ChannelConfig {
        handshake_timeout: Duration::from_secs(10),
        rekey_bytes: 1 << 30,
        rekey_interval: Duration::ZERO,
        ..ChannelConfig::default()
    };
    let (mut i, mut r) = established(&cfg).await;
    let mut buf = Vec::new();
    for k in 0..3u8 {
        i.tx.send(&[k]).await.expect("send");
        r.rx.recv(&mut buf).await.expect("recv");
        assert_eq!(buf, [k]);
    }
    assert_eq!(i.tx.rekeys(), 3);
    assert_eq!(r.rx.rekeys(), 3);
}

#[test]
fn rekey_keys_follow_the_documented_derivation() {
    use hkdf::Hkdf;
    let old = [5u8; 32];
    let mut expect = [0u8; 32];
    Hkdf::<sha2::Sha256>::new(None, &old)
        .expand(b"keibi v1 rekey", &mut expect)
        .expect("expand");
    let next = super::transport::next_key(&old);
    assert_eq!(*next, expect);
    assert_ne!(*next, old);
}

/// Seal frame(s) with the initiator's sealer and write them raw to the
/// responder, bypassing `send`.
async fn inject(i: &mut Established, frames: &[(u8, Vec<u8>)]) {
    let mut raw = Vec::new();
    for (ty, body) in frames {
        i.tx.sealer.seal_one(*ty, body, &mut raw).expect("seal");
    }
    i.tx.write_raw(&raw).await.expect("write");
}

async fn recv_err(r: &mut Established) -> ChannelError {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.rx.recv(&mut buf))
        .await
        .expect("bounded")
        .expect_err("must fail")
}

#[tokio::test]
async fn unknown_type_ready_after_handshake_and_rekey_with_body_are_refused() {
    for (frame, want) in [
        ((9u8, vec![]), "unknown type 9"),
        ((2u8, vec![]), "READY frame after the handshake"),
        ((1u8, vec![0u8; 3]), "REKEY frame 1 has a body of 3 bytes"),
        ((3u8, vec![b'x'; 1025]), "CLOSE reason of 1025 bytes"),
    ] {
        let (mut i, mut r) = established(&cfg()).await;
        inject(&mut i, &[frame]).await;
        let err = recv_err(&mut r).await;
        assert!(
            matches!(&err, ChannelError::BadFrame(m) if m.contains(want)),
            "{want}: {err}"
        );
    }
}

#[tokio::test]
async fn close_reason_is_cut_to_1_kib_on_a_char_boundary() {
    let (mut i, mut r) = established(&cfg()).await;
    // 'é' is 2 bytes: 1023 of them plus one would pass 1 KiB mid-char.
    let long = format!("a{}", "é".repeat(1000));
    i.tx.close(&long).await.expect("close");
    let err = recv_err(&mut r).await;
    let ChannelError::Closed(reason) = err else {
        panic!("{err}");
    };
    assert_eq!(reason.len(), 1023);
    assert!(long.starts_with(&reason));
}

fn numbered(k: u32) -> Vec<u8> {
    let mut msg = vec![(k % 251) as u8; MAX_PAYLOAD];
    msg[..4].copy_from_slice(&k.to_be_bytes());
    msg
}

/// The number in a `numbered` message, checking the rest is intact.
fn number_of(buf: &[u8]) -> u32 {
    assert_eq!(buf.len(), MAX_PAYLOAD);
    let k = u32::from_be_bytes(buf[..4].try_into().expect("4"));
    assert!(buf[4..].iter().all(|b| *b == (k % 251) as u8), "intact");
    k
}

#[tokio::test]
async fn cancelled_receives_lose_nothing() {
    // Two frames arrive in pieces, cut inside the length prefix and
    // inside the body; after each piece the receiver gives up waiting
    // (like a select! whose timer fired). The next call must carry on
    // with the partial frame, not start a new one.
    let (mut i, mut r) = established(&cfg()).await;
    let first = numbered(7);
    let mut raw = Vec::new();
    i.tx.sealer
        .seal_one(FrameType::Data as u8, &first, &mut raw)
        .expect("seal");
    i.tx.sealer
        .seal_one(FrameType::Data as u8, b"second", &mut raw)
        .expect("seal");
    let split = raw.len() - (4 + 1 + 6 + 16);
    let cuts = [0, 2, 3000, 200_000, split + 2, split + 9, raw.len()];
    let mut buf = Vec::new();
    let mut got = Vec::new();
    let mut cancelled = 0;
    for w in cuts.windows(2) {
        i.tx.write_raw(&raw[w[0]..w[1]]).await.expect("write");
        loop {
            match tokio::time::timeout(Duration::from_millis(50), r.rx.recv(&mut buf)).await {
                Err(_) => {
                    cancelled += 1;
                    break;
                }
                Ok(res) => {
                    res.expect("recv");
                    got.push(buf.clone());
                }
            }
        }
    }
    assert_eq!(got.len(), 2);
    assert_eq!(number_of(&got[0]), 7);
    assert_eq!(got[1], b"second");
    assert_eq!(
        cancelled, 6,
        "every piece but the frames' ends left a call waiting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_sends_never_break_the_stream() {
    // Nobody reads, so the socket buffers fill and sends block mid-frame;
    // the sender gives up on each after 5 ms. A cancelled send may or may
    // not deliver its message (its frame is finished by the next send),
    // but the stream never carries a broken frame.
    let (a, b) = small_buffered_tcp_pair().await;
    let (mut i, mut r) = established_on(a, b, &cfg()).await;
    const N: u32 = 16;
    let mut cancelled = 0u32;
    for k in 0..N {
        match tokio::time::timeout(Duration::from_millis(5), i.tx.send(&numbered(k))).await {
            Ok(res) => res.expect("send"),
            Err(_) => cancelled += 1,
        }
    }
    let sender = tokio::spawn(async move {
        i.tx.send(b"end").await.expect("last send");
        i
    });
    let mut buf = Vec::new();
    let mut got = Vec::new();
    loop {
        r.rx.recv(&mut buf).await.expect("recv");
        if buf == b"end" {
            break;
        }
        got.push(number_of(&buf));
    }
    sender.await.expect("sender");
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, no repeats: {got:?}"
    );
    assert!(
        got.len() as u32 >= N - cancelled,
        "only cancelled sends may be missing"
    );
    assert!(cancelled > 0, "some sends were really cancelled");
}

/// Both sides' offers and the AEAD the handshake must settle on (or
/// `None`: the handshake fails with [`ChannelError::Aead`]).
#[tokio::test]
async fn the_handshake_chooses_aes_gcm_only_when_both_prefer_it() {
    use AeadKind::{Aes256Gcm as Aes, ChaCha20Poly1305 as ChaCha};
    let cases: [(Vec<AeadKind>, Vec<AeadKind>, Option<AeadKind>); 5] = [
        (vec![Aes, ChaCha], vec![Aes, ChaCha], Some(Aes)),
        (vec![Aes, ChaCha], vec![ChaCha, Aes], Some(ChaCha)),
        (vec![ChaCha], vec![Aes, ChaCha], Some(ChaCha)),
        (vec![Aes], vec![ChaCha, Aes], Some(Aes)),
        (vec![Aes], vec![ChaCha], None),
    ];
    for (ours, theirs, want) in cases {
        let (a, b) = tcp_pair().await;
        let (ka, kb) = (keys(1), keys(2));
        let fp_a = fingerprint_of(&ka.public());
        let fp_b = fingerprint_of(&kb.public());
        let paired = move |fp: &str| fp == fp_a;
        let ci = ChannelConfig {
            aeads: ours.clone(),
            ..cfg()
        };
        let cr = ChannelConfig {
            aeads: theirs.clone(),
            ..cfg()
        };
        let (pi, pr) = (params(1, 1), params(1, 1));
        let (i, r) = tokio::join!(
            handshake::initiate_with(a, &ka, &fp_b, &ci, &pi),
            handshake::respond_with(b, &kb, &paired, &cr, &pr),
        );
        match want {
            Some(kind) => {
                let (mut i, mut r) = (i.expect("initiator"), r.expect("responder"));
                assert_eq!((i.aead, r.aead), (kind, kind), "{ours:?} / {theirs:?}");
                // The frames really are sealed with it: data crosses both ways.
                i.tx.send(b"ping").await.expect("send");
                let mut buf = Vec::new();
                r.rx.recv(&mut buf).await.expect("recv");
                assert_eq!(buf, b"ping");
                r.tx.send(b"pong").await.expect("send");
                i.rx.recv(&mut buf).await.expect("recv");
                assert_eq!(buf, b"pong");
            }
            None => {
                let ei = i.expect_err("initiator");
                assert!(
                    matches!(&ei, ChannelError::Aead { ours: o, theirs: t } if o == "aes-256-gcm" && t == "chacha20-poly1305"),
                    "{ei}"
                );
                assert!(matches!(r, Err(ChannelError::Aead { .. })), "{r:?}");
            }
        }
    }
}

/// A peer from before the AEAD choice sends a Hello without an Offer and
/// seals with ChaCha20-Poly1305: a new peer that prefers AES-256-GCM
/// reads the missing Offer as ChaCha20-Poly1305 alone and agrees, from
/// either side. (That the old peer skips our Offer is tested in
/// `handshake::tests`.)
#[tokio::test]
async fn a_hello_without_an_offer_means_chacha20_poly1305() {
    let new = ChannelConfig {
        aeads: vec![AeadKind::Aes256Gcm, AeadKind::ChaCha20Poly1305],
        ..cfg()
    };
    let old = ChannelConfig {
        aeads: vec![AeadKind::ChaCha20Poly1305],
        ..cfg()
    };
    let old_params = Params {
        omit_offer: true,
        ..params(1, 1)
    };
    for old_side_is_initiator in [false, true] {
        let (a, b) = tcp_pair().await;
        let (ka, kb) = (keys(1), keys(2));
        let fp_a = fingerprint_of(&ka.public());
        let fp_b = fingerprint_of(&kb.public());
        let paired = move |fp: &str| fp == fp_a;
        let ((ci, pi), (cr, pr)) = if old_side_is_initiator {
            ((&old, old_params.clone()), (&new, params(1, 1)))
        } else {
            ((&new, params(1, 1)), (&old, old_params.clone()))
        };
        let (i, r) = tokio::join!(
            handshake::initiate_with(a, &ka, &fp_b, ci, &pi),
            handshake::respond_with(b, &kb, &paired, cr, &pr),
        );
        let (i, r) = (i.expect("initiator"), r.expect("responder"));
        assert_eq!(
            (i.aead, r.aead),
            (AeadKind::ChaCha20Poly1305, AeadKind::ChaCha20Poly1305),
            "old side initiator: {old_side_is_initiator}"
        );
    }
}
