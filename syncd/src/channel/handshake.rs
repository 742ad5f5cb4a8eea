//! The handshake: Noise XX with an ephemeral ML-KEM-768 exchange inside.
//!
//! ```text
//! initiator (dials)                                   responder (listens)
//! 1  -> e                    payload Msg1 { mlkem_ek }          (clear, hashed)
//! 2  <- e, ee, s, es         payload Hello { min, max, software, mlkem_ct }
//!                                    || Offer { aeads }         (encrypted)
//!    initiator: fingerprint(rs) == the peer it dialed? else WrongPeer
//! 3  -> s, se                payload Hello { min, max, software }
//!                                    || Offer { aeads }         (encrypted)
//!    responder: is_paired(fingerprint(rs))? else NotPaired
//!    both: version = min(max_a, max_b) if the ranges meet, else Version
//!    both: aead = aead::choose(offer_a, offer_b), else Aead
//!    both: k = HKDF-SHA256(salt = h, ikm = k_i2r || k_r2i || ss)
//!          -> "keibi v1 i2r", "keibi v1 r2i"
//! 4  <-> READY frame each way, sealed with the new keys (key confirmation)
//! ```
//!
//! `k_i2r, k_r2i` are snow's split keys (they depend on the X25519
//! agreements ee, es, se), `ss` is the ML-KEM shared secret the responder
//! encapsulated to the initiator's ephemeral encapsulation key, and `h`
//! is the Noise handshake hash (it covers the ML-KEM key and ciphertext,
//! the prologue and both static keys). Recovering the transport keys
//! needs both the split keys (X25519) and `ss` (ML-KEM). A wrong `ss`
//! (say, a ciphertext changed inside message 2 by someone who could
//! forge Noise's encryption) leaves the two sides with different keys,
//! and the READY frame fails to open.
//!
//! `Offer` follows the Hello in the same payload. A keibi without it
//! (before the AEAD choice existed) stops decoding at the Hello's end and
//! never reads it; a Hello without it is an offer of ChaCha20-Poly1305
//! alone. Either way the two sides agree on ChaCha20-Poly1305.
//!
//! The whole exchange, READY frames included, runs under
//! `ChannelConfig::handshake_timeout`.

use super::aead::{self, AeadKind};
use super::frame::{self, FrameType, MAX_HANDSHAKE_MSG};
use super::resolver::KeibiResolver;
use super::transport::{self, SecureReceiver, SecureSender};
use super::{ChannelConfig, ChannelError, Established, LocalKeys};
use crate::identity::fingerprint_of;
use hkdf::Hkdf;
use ml_kem::kem::{Decapsulate, Encapsulate, Kem};
use ml_kem::{KeyExport, MlKem768};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use snow::{Builder, HandshakeState};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use zeroize::{Zeroize, Zeroizing};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_SHA256";
/// The Noise prologue (hashed first, so only keibi peers of this channel
/// version can complete a handshake with each other).
pub const PROLOGUE: &[u8] = b"keibi peer channel v1";
/// Bytes of an ML-KEM-768 encapsulation key.
pub const MLKEM_EK_LEN: usize = 1184;
/// Bytes of an ML-KEM-768 ciphertext.
pub const MLKEM_CT_LEN: usize = 1088;
/// HKDF info of the initiator-to-responder key.
const INFO_I2R: &[u8] = b"keibi v1 i2r";
/// HKDF info of the responder-to-initiator key.
const INFO_R2I: &[u8] = b"keibi v1 r2i";
/// Longest software string accepted in a Hello.
const MAX_SOFTWARE: usize = 256;

/// Payload of message 1.
#[derive(Serialize, Deserialize)]
struct Msg1 {
    mlkem_ek: Vec<u8>,
}

/// Payload of messages 2 and 3.
#[derive(Serialize, Deserialize)]
struct Hello {
    min: u32,
    max: u32,
    software: String,
    mlkem_ct: Vec<u8>,
}

/// Follows the [`Hello`] in messages 2 and 3: the transport AEADs the
/// sender accepts, as [`aead::AeadKind::id`] bytes, in its order of
/// preference.
#[derive(Serialize, Deserialize)]
struct Offer {
    aeads: Vec<u8>,
}

/// Decode a Hello and the Offer after it, if any (an older peer's Hello
/// has none: it offers ChaCha20-Poly1305 alone).
fn decode_hello(what: &str, bytes: &[u8]) -> Result<(Hello, Vec<AeadKind>), ChannelError> {
    let (hello, rest): (Hello, &[u8]) = postcard::take_from_bytes(bytes)
        .map_err(|e| ChannelError::Handshake(format!("{what}: {e}")))?;
    if rest.is_empty() {
        return Ok((hello, vec![AeadKind::ChaCha20Poly1305]));
    }
    let offer: Offer = decode(what, rest)?;
    Ok((hello, aead::decode_offer(&offer.aeads)))
}

/// A Hello followed by our Offer.
fn encode_hello(
    hello: &Hello,
    aeads: &[AeadKind],
    params: &Params,
) -> Result<Vec<u8>, ChannelError> {
    let mut out = encode(hello)?;
    #[cfg(test)]
    if params.omit_offer {
        return Ok(out);
    }
    let _ = params;
    out.extend(encode(&Offer {
        aeads: aead::encode_offer(aeads),
    })?);
    Ok(out)
}

/// What one side claims; tests vary it.
#[derive(Debug, Clone)]
pub(super) struct Params {
    pub(super) min: u32,
    pub(super) max: u32,
    pub(super) software: String,
    /// Tests only: the responder flips a bit of its ML-KEM ciphertext
    /// before it encrypts message 2 (a forged ciphertext that Noise's
    /// encryption would otherwise have caught).
    #[cfg(test)]
    pub(super) corrupt_ct: bool,
    /// Test hook: send the Hello without the Offer after it, as a keibi
    /// from before the AEAD choice does.
    #[cfg(test)]
    pub(super) omit_offer: bool,
}

impl Params {
    /// This build's claim (or the test hook's, see `fault.rs`).
    fn ours() -> Params {
        let (min, max) = crate::fault::peer_protocol_range();
        Params {
            min,
            max,
            software: format!("keibi-syncd {}", env!("CARGO_PKG_VERSION")),
            #[cfg(test)]
            corrupt_ct: false,
            #[cfg(test)]
            omit_offer: false,
        }
    }
}

/// Dial side: run the handshake on `stream`, requiring that the peer's
/// static key has `expected_fingerprint` (52 base32 characters; case,
/// spaces and `-` are ignored).
#[allow(dead_code)] // called by the peer manager (peer/dial.rs)
pub async fn initiate(
    stream: TcpStream,
    me: &LocalKeys,
    expected_fingerprint: &str,
    cfg: &ChannelConfig,
) -> Result<Established, ChannelError> {
    initiate_with(stream, me, expected_fingerprint, cfg, &Params::ours()).await
}

/// Listen side: run the handshake on `stream`, accepting only a peer
/// whose fingerprint `is_paired` approves.
#[allow(dead_code)] // called by the peer manager (peer/listen.rs)
pub async fn respond(
    stream: TcpStream,
    me: &LocalKeys,
    is_paired: &(dyn Fn(&str) -> bool + Send + Sync),
    cfg: &ChannelConfig,
) -> Result<Established, ChannelError> {
    respond_with(stream, me, is_paired, cfg, &Params::ours()).await
}

pub(super) async fn initiate_with(
    stream: TcpStream,
    me: &LocalKeys,
    expected_fingerprint: &str,
    cfg: &ChannelConfig,
    params: &Params,
) -> Result<Established, ChannelError> {
    let expected = normalize(expected_fingerprint);
    tokio::time::timeout(
        cfg.handshake_timeout,
        run(stream, me, Role::Initiator(&expected), cfg, params),
    )
    .await
    .map_err(|_| ChannelError::Timeout("the handshake"))?
}

pub(super) async fn respond_with(
    stream: TcpStream,
    me: &LocalKeys,
    is_paired: &(dyn Fn(&str) -> bool + Send + Sync),
    cfg: &ChannelConfig,
    params: &Params,
) -> Result<Established, ChannelError> {
    tokio::time::timeout(
        cfg.handshake_timeout,
        run(stream, me, Role::Responder(is_paired), cfg, params),
    )
    .await
    .map_err(|_| ChannelError::Timeout("the handshake"))?
}

/// A fingerprint as typed: upper case, without spaces or `-`.
fn normalize(fingerprint: &str) -> String {
    fingerprint
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// The initiator's error when the responder hangs up instead of sending
/// READY.
fn refused_after_message_3() -> ChannelError {
    ChannelError::Handshake(
        "the peer closed the connection after message 3, before key confirmation: it has most likely not added this machine's fingerprint (there: keibictl peer add <this machine's fingerprint>)".to_string(),
    )
}

enum Role<'a> {
    Initiator(&'a str),
    Responder(&'a (dyn Fn(&str) -> bool + Send + Sync)),
}

fn noise_err(stage: &str) -> impl Fn(snow::Error) -> ChannelError + '_ {
    move |e| ChannelError::Handshake(format!("{stage}: {e}"))
}

fn builder<'a>(me: &'a LocalKeys) -> Result<Builder<'a>, ChannelError> {
    let params = NOISE_PARAMS.parse().map_err(noise_err("protocol name"))?;
    Builder::with_resolver(params, Box::new(KeibiResolver))
        .local_private_key(me.secret())
        .and_then(|b| b.prologue(PROLOGUE))
        .map_err(noise_err("setup"))
}

/// The peer's static key once the handshake has it.
fn remote_static(hs: &HandshakeState) -> Result<[u8; 32], ChannelError> {
    hs.get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| ChannelError::Handshake("no remote static key".into()))
}

fn decode<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, ChannelError> {
    postcard::from_bytes(bytes).map_err(|e| ChannelError::Handshake(format!("{what}: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ChannelError> {
    postcard::to_allocvec(value).map_err(|e| ChannelError::Handshake(format!("encoding: {e}")))
}

/// `Some(version)` when the two ranges meet.
fn negotiate(ours: (u32, u32), theirs: (u32, u32)) -> Option<u32> {
    let low = ours.0.max(theirs.0);
    let high = ours.1.min(theirs.1);
    (ours.0 <= ours.1 && theirs.0 <= theirs.1 && low <= high).then_some(high)
}

/// Write a Noise message with `payload`.
async fn send_msg<W: AsyncWrite + Unpin>(
    w: &mut W,
    hs: &mut HandshakeState,
    payload: &[u8],
    buf: &mut Vec<u8>,
    stage: &str,
) -> Result<(), ChannelError> {
    buf.resize(MAX_HANDSHAKE_MSG, 0);
    let n = hs.write_message(payload, buf).map_err(noise_err(stage))?;
    frame::write_handshake(w, &buf[..n]).await
}

/// Read a Noise message; returns its payload.
async fn recv_msg<R: AsyncRead + Unpin>(
    r: &mut R,
    hs: &mut HandshakeState,
    buf: &mut Vec<u8>,
    stage: &str,
) -> Result<Vec<u8>, ChannelError> {
    frame::read_handshake(r, buf).await?;
    let mut payload = vec![0u8; MAX_HANDSHAKE_MSG];
    let n = hs
        .read_message(buf, &mut payload)
        .map_err(noise_err(stage))?;
    payload.truncate(n);
    Ok(payload)
}

/// The transport keys (initiator→responder, responder→initiator).
type Keys = (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>);

/// HKDF-SHA256(salt = h, ikm = k_i2r || k_r2i || ss).
pub(super) fn derive(hs: &mut HandshakeState, ss: &[u8; 32]) -> Keys {
    let (a, b) = hs.dangerously_get_raw_split();
    let (a, b) = (Zeroizing::new(a), Zeroizing::new(b));
    let mut ikm = Zeroizing::new([0u8; 96]);
    ikm[..32].copy_from_slice(&a[..]);
    ikm[32..64].copy_from_slice(&b[..]);
    ikm[64..].copy_from_slice(ss);
    let hk = Hkdf::<Sha256>::new(Some(hs.get_handshake_hash()), &ikm[..]);
    let mut i2r = Zeroizing::new([0u8; 32]);
    let mut r2i = Zeroizing::new([0u8; 32]);
    // 32-byte outputs are far below HKDF's limit: these cannot fail.
    let _ = hk.expand(INFO_I2R, &mut i2r[..]);
    let _ = hk.expand(INFO_R2I, &mut r2i[..]);
    (i2r, r2i)
}

async fn run(
    stream: TcpStream,
    me: &LocalKeys,
    role: Role<'_>,
    cfg: &ChannelConfig,
    params: &Params,
) -> Result<Established, ChannelError> {
    let started = Instant::now();
    // Nagle would hold back small frames (READY, pings) behind unacked data.
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = transport::buffered(r);
    let mut buf = Vec::with_capacity(MAX_HANDSHAKE_MSG);
    let ours = (params.min, params.max);
    let b = builder(me)?;
    let (mut hs, remote_public, theirs, software, ss, initiator, their_aeads) = match role {
        Role::Initiator(expected) => {
            let mut hs = b.build_initiator().map_err(noise_err("setup"))?;
            let (dk, ek) = MlKem768::generate_keypair();
            let msg1 = encode(&Msg1 {
                mlkem_ek: ek.to_bytes().to_vec(),
            })?;
            send_msg(&mut w, &mut hs, &msg1, &mut buf, "message 1").await?;
            let payload = recv_msg(&mut r, &mut hs, &mut buf, "message 2").await?;
            let remote = remote_static(&hs)?;
            let got = fingerprint_of(&remote);
            if got != expected {
                tracing::warn!(
                    expected = %expected, got = %got,
                    "peer channel: the peer we dialed answered with another key; closing"
                );
                return Err(ChannelError::WrongPeer {
                    expected: expected.to_string(),
                    got,
                });
            }
            let (hello, their_aeads) = decode_hello("message 2 payload", &payload)?;
            let ct = <[u8; MLKEM_CT_LEN]>::try_from(hello.mlkem_ct.as_slice()).map_err(|_| {
                ChannelError::Handshake(format!(
                    "ML-KEM ciphertext of {} bytes, expected {MLKEM_CT_LEN}",
                    hello.mlkem_ct.len()
                ))
            })?;
            // ML-KEM decapsulation never fails: a bad ciphertext yields
            // an unrelated secret (implicit rejection), caught by READY.
            let mut ss = dk.decapsulate(&ct.into());
            let mut ss_bytes = Zeroizing::new([0u8; 32]);
            ss_bytes.copy_from_slice(&ss);
            ss.zeroize();
            // Message 3 goes out even on a version mismatch, so that the
            // responder can log both versions too.
            let msg3 = encode_hello(
                &Hello {
                    min: params.min,
                    max: params.max,
                    software: params.software.clone(),
                    mlkem_ct: Vec::new(),
                },
                &cfg.aeads,
                params,
            )?;
            send_msg(&mut w, &mut hs, &msg3, &mut buf, "message 3").await?;
            (
                hs,
                remote,
                (hello.min, hello.max),
                hello.software,
                ss_bytes,
                true,
                their_aeads,
            )
        }
        Role::Responder(is_paired) => {
            let mut hs = b.build_responder().map_err(noise_err("setup"))?;
            let payload = recv_msg(&mut r, &mut hs, &mut buf, "message 1").await?;
            let msg1: Msg1 = decode("message 1 payload", &payload)?;
            let ek_bytes =
                <[u8; MLKEM_EK_LEN]>::try_from(msg1.mlkem_ek.as_slice()).map_err(|_| {
                    ChannelError::Handshake(format!(
                        "ML-KEM encapsulation key of {} bytes, expected {MLKEM_EK_LEN}",
                        msg1.mlkem_ek.len()
                    ))
                })?;
            let ek = ml_kem::ml_kem_768::EncapsulationKey::new(&ek_bytes.into())
                .map_err(|_| ChannelError::Handshake("invalid ML-KEM encapsulation key".into()))?;
            let (ct, mut ss) = ek.encapsulate();
            let mut ss_bytes = Zeroizing::new([0u8; 32]);
            ss_bytes.copy_from_slice(&ss);
            ss.zeroize();
            #[allow(unused_mut)] // changed by the test-only corruption below
            let mut mlkem_ct = ct.to_vec();
            #[cfg(test)]
            if params.corrupt_ct {
                mlkem_ct[0] ^= 1;
            }
            let msg2 = encode_hello(
                &Hello {
                    min: params.min,
                    max: params.max,
                    software: params.software.clone(),
                    mlkem_ct,
                },
                &cfg.aeads,
                params,
            )?;
            send_msg(&mut w, &mut hs, &msg2, &mut buf, "message 2").await?;
            let payload = recv_msg(&mut r, &mut hs, &mut buf, "message 3").await?;
            let remote = remote_static(&hs)?;
            let fingerprint = fingerprint_of(&remote);
            if !is_paired(&fingerprint) {
                tracing::warn!(
                    fingerprint = %fingerprint,
                    "peer channel: refused a peer that is not paired with this machine"
                );
                return Err(ChannelError::NotPaired { fingerprint });
            }
            let (hello, their_aeads) = decode_hello("message 3 payload", &payload)?;
            (
                hs,
                remote,
                (hello.min, hello.max),
                hello.software,
                ss_bytes,
                false,
                their_aeads,
            )
        }
    };
    let remote_fingerprint = fingerprint_of(&remote_public);
    let Some(version) = negotiate(ours, theirs) else {
        tracing::warn!(
            peer = %remote_fingerprint,
            ours = ?ours, theirs = ?theirs,
            "peer channel: no common protocol version; closing"
        );
        return Err(ChannelError::Version { ours, theirs });
    };
    let Some(aead) = aead::choose(&cfg.aeads, &their_aeads) else {
        tracing::warn!(
            peer = %remote_fingerprint,
            ours = ?cfg.aeads, theirs = ?their_aeads,
            "peer channel: no common AEAD; closing"
        );
        return Err(ChannelError::Aead {
            ours: cfg
                .aeads
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", "),
            theirs: their_aeads
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let software: String = software.chars().take(MAX_SOFTWARE).collect();
    let (i2r, r2i) = derive(&mut hs, &ss);
    drop(hs);
    let (send_key, recv_key) = if initiator { (i2r, r2i) } else { (r2i, i2r) };
    let (sealer, opener) = transport::pair(aead, send_key, recv_key, cfg);
    let mut tx = SecureSender::new(w, sealer, 0);
    let mut rx = SecureReceiver::new(r, opener, 0);
    tx.send_frame(FrameType::Ready, &[]).await?;
    match rx.next_frame().await {
        Ok(FrameType::Ready) if rx.body.len() == 1 => {}
        Ok(FrameType::Ready) => {
            return Err(ChannelError::Handshake(format!(
                "the peer's READY frame has a body of {} bytes",
                rx.body.len() - 1
            )));
        }
        Ok(ty) => {
            return Err(ChannelError::Handshake(format!(
                "expected the peer's READY frame, got {ty:?}"
            )));
        }
        Err(ChannelError::BadFrame(why)) => {
            return Err(ChannelError::Handshake(format!(
                "key confirmation failed, the peer's READY frame did not open (the two sides derived different keys): {why}"
            )));
        }
        // The responder checks its peer table after message 3 and closes
        // without a word when this machine is not in it (it owes an
        // unknown key no explanation); name the likely cause. Closing with
        // our READY still unread in its socket makes its kernel answer
        // with a reset instead of an end of stream.
        Err(ChannelError::Eof) if initiator => {
            return Err(refused_after_message_3());
        }
        Err(ChannelError::Io(e))
            if initiator && e.kind() == std::io::ErrorKind::ConnectionReset =>
        {
            return Err(refused_after_message_3());
        }
        Err(e) => return Err(e),
    }
    Ok(Established {
        remote_public,
        remote_fingerprint,
        version,
        aead,
        remote_software: software,
        handshake_time: started.elapsed(),
        tx,
        rx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keibi from before the AEAD choice decodes a Hello with
    /// `postcard::from_bytes`, which stops at the Hello's end: our Offer
    /// after it does not disturb it.
    #[test]
    fn an_old_decoder_reads_a_hello_followed_by_an_offer() {
        let hello = Hello {
            min: 2,
            max: 2,
            software: "keibi-syncd x".into(),
            mlkem_ct: vec![9; MLKEM_CT_LEN],
        };
        let params = Params::ours();
        let bytes = encode_hello(&hello, &[AeadKind::Aes256Gcm], &params).expect("encode");
        let old: Hello = decode("old", &bytes).expect("an old decoder reads it");
        assert_eq!(
            (old.min, old.max, old.software.as_str()),
            (2, 2, "keibi-syncd x")
        );
        assert_eq!(old.mlkem_ct, hello.mlkem_ct);
        let (_, offer) = decode_hello("new", &bytes).expect("new decoder");
        assert_eq!(offer, vec![AeadKind::Aes256Gcm]);
        let bare = encode(&hello).expect("encode");
        let (_, offer) = decode_hello("new", &bare).expect("no offer");
        assert_eq!(offer, vec![AeadKind::ChaCha20Poly1305]);
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate((1, 1), (1, 1)), Some(1));
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((2, 5), (1, 3)), Some(3));
        assert_eq!(negotiate((1, 1), (2, 2)), None);
        assert_eq!(negotiate((3, 4), (1, 2)), None);
        assert_eq!(
            negotiate((2, 1), (1, 2)),
            None,
            "an empty range meets nothing"
        );
    }

    #[test]
    fn fingerprints_are_normalized() {
        assert_eq!(normalize("abcd efgh-ijkl"), "ABCDEFGHIJKL");
    }
}
