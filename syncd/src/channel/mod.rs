//! The encrypted channel between two syncd: a Noise handshake that
//! authenticates both machines and agrees on keys, then length-prefixed
//! sealed frames over one TCP connection.
//!
//! The design, message by message, is in `docs/protocol.md` ("The peer
//! channel"). In short:
//!
//! - [`handshake`]: `Noise_XX_25519_ChaChaPoly_SHA256` run by snow with
//!   keibi's own primitives ([`resolver`]), an ephemeral ML-KEM-768
//!   encapsulation carried in messages 1 and 2, version negotiation and
//!   the transport AEAD's choice in the encrypted payloads of messages 2
//!   and 3, the fingerprint checks
//!   (the dialer checks it reached the peer it meant; the listener checks
//!   the peer is paired), then transport keys from HKDF-SHA256 over
//!   snow's split keys and the ML-KEM shared secret (so an attacker must
//!   break both X25519 and ML-KEM), confirmed by a READY frame each way.
//! - [`aead`]: ChaCha20-Poly1305 or AES-256-GCM for the frames,
//!   AES-256-GCM only when both machines have it in hardware.
//! - [`frame`]: the `u32` length prefix, checked against [`MAX_FRAME`]
//!   before anything of the body is read or allocated.
//! - [`transport`]: one key per direction, counter nonces, rekeying by
//!   bytes or time without a round trip, CLOSE frames; [`SecureSender`]
//!   and [`SecureReceiver`] own the two halves of the TCP stream so that
//!   sending and receiving run in separate tasks.
//!
//! Every failure is a [`ChannelError`] whose message names the values
//! involved; the connection is then unusable and is dropped.

mod aead;
mod frame;
mod handshake;
mod resolver;
mod transport;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vectors;

use std::io;
use std::time::Duration;
use zeroize::Zeroizing;

pub use aead::{AeadKind, offer as aead_offer};
#[allow(unused_imports)] // used by the peer manager (peer/)
pub use handshake::{initiate, respond};
pub use transport::{SecureReceiver, SecureSender};

/// The peer protocol version this build speaks (the range it accepts is
/// `[PEER_PROTOCOL_VERSION, PEER_PROTOCOL_VERSION]`, unless the test hook
/// `KEIBI_TEST_PEER_PROTOCOL` overrides it, see `fault.rs`).
pub const PEER_PROTOCOL_VERSION: u32 = 2;

/// The largest payload of one DATA frame (one peer message).
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// The largest sealed frame: type byte, payload and tag. A length prefix
/// above this closes the connection before any of the body is read.
pub const MAX_FRAME: usize = MAX_PAYLOAD + 1 + frame::TAG_LEN;

/// Limits and timers of a channel.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// The whole handshake (three Noise messages and the READY frames)
    /// must finish within this, or it fails with [`ChannelError::Timeout`].
    pub handshake_timeout: Duration,
    /// A sender rekeys before the frame that would take the bytes sealed
    /// under one key past this.
    pub rekey_bytes: u64,
    /// ... or when this much time has passed since its last key change.
    pub rekey_interval: Duration,
    /// The transport AEADs this side offers, in its order of preference
    /// (see [`aead`]); the default is [`aead::offer`]`(None)`.
    pub aeads: Vec<AeadKind>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            handshake_timeout: Duration::from_secs(5),
            rekey_bytes: 1 << 30,
            rekey_interval: Duration::from_secs(600),
            aeads: aead::offer(None),
        }
    }
}

/// This machine's static X25519 key for the handshake.
pub struct LocalKeys {
    secret: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

// The public API below is called by the peer manager and connection
// code (peer/); until that is merged only tests call some of it.
#[allow(dead_code)]
impl LocalKeys {
    /// Keys from the static secret (the identity file's).
    pub fn new(secret: [u8; 32]) -> LocalKeys {
        let secret = Zeroizing::new(secret);
        let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret));
        LocalKeys {
            secret,
            public: public.to_bytes(),
        }
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    fn secret(&self) -> &[u8; 32] {
        &self.secret
    }
}

impl std::fmt::Debug for LocalKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("LocalKeys")
            .field(
                "fingerprint",
                &crate::identity::fingerprint_of(&self.public),
            )
            .finish()
    }
}

/// A finished handshake: who the peer is, and the two ends of the channel.
#[derive(Debug)]
#[allow(dead_code)] // fields read by the peer manager (peer/)
pub struct Established {
    /// The peer's static X25519 public key.
    pub remote_public: [u8; 32],
    /// `identity::fingerprint_of(&remote_public)`, ungrouped.
    pub remote_fingerprint: String,
    /// The negotiated peer protocol version.
    pub version: u32,
    /// The transport AEAD both sides chose (see [`aead::choose`]).
    pub aead: AeadKind,
    /// The software the peer says it runs (from its Hello; informative).
    pub remote_software: String,
    /// How long the handshake took, from the first byte sent or read to
    /// the peer's READY.
    pub handshake_time: Duration,
    /// Sends DATA frames; owns the TCP write half.
    pub tx: SecureSender,
    /// Receives DATA frames; owns the TCP read half.
    pub rx: SecureReceiver,
}

/// Why a handshake or a channel failed. The connection is unusable after
/// any of these.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket failed.
    #[error("peer channel: I/O error: {0}")]
    Io(#[from] io::Error),
    /// A time bound passed (names what was waited for).
    #[error("peer channel: timed out waiting for {0}")]
    Timeout(&'static str),
    /// The Noise handshake failed (bad message, failed decryption, ...).
    #[error("peer channel: handshake failed: {0}")]
    Handshake(String),
    /// We dialed one peer and another key answered.
    #[error("peer channel: wrong peer: expected fingerprint {expected}, the peer has {got}")]
    WrongPeer {
        /// The fingerprint we dialed.
        expected: String,
        /// The fingerprint that answered.
        got: String,
    },
    /// A peer that is not paired with us connected.
    #[error("peer channel: peer {fingerprint} is not paired with this machine")]
    NotPaired {
        /// Its fingerprint.
        fingerprint: String,
    },
    /// No protocol version both sides speak.
    #[error(
        "peer channel: no common protocol version: we speak {}..={}, the peer speaks {}..={}",
        ours.0, ours.1, theirs.0, theirs.1
    )]
    Version {
        /// Our (min, max).
        ours: (u32, u32),
        /// The peer's (min, max).
        theirs: (u32, u32),
    },
    /// The two sides offer no AEAD in common (possible only when one is
    /// configured to offer a single one, `peer_aead` in syncd.toml).
    #[error("peer channel: no common AEAD: we offer {ours}, the peer offers {theirs}")]
    Aead {
        /// What we offer, by name.
        ours: String,
        /// What the peer offers, by name.
        theirs: String,
    },
    /// A length prefix above the cap (nothing of the body was read).
    #[error("peer channel: frame length {len} is over the limit of {cap} bytes")]
    Oversize {
        /// The claimed length.
        len: u64,
        /// The cap.
        cap: u64,
    },
    /// A frame that failed to open or makes no sense here.
    #[error("peer channel: bad frame: {0}")]
    BadFrame(String),
    /// The peer closed the channel on purpose, with this reason.
    #[allow(dead_code)] // built by SecureReceiver::recv, called from peer/conn.rs
    #[error("peer channel: closed by the peer: {0}")]
    Closed(String),
    /// The peer closed the connection between frames without a CLOSE.
    #[error("peer channel: connection closed by the peer (end of stream)")]
    Eof,
}
