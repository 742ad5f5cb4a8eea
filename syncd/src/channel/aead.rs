//! The transport AEADs, and which one a connection uses.
//!
//! Two are implemented, both with 32-byte keys, 96-bit counter nonces and
//! 16-byte tags, so the frame format does not depend on the choice:
//!
//! - **ChaCha20-Poly1305** (RFC 8439, the `chacha20poly1305` crate), fast
//!   on every CPU. Every keibi speaks it; it is the fallback.
//! - **AES-256-GCM** (NIST SP 800-38D, `ring`), several times faster where
//!   the CPU has AES and carry-less multiply instructions (x86-64 AES-NI
//!   and PCLMULQDQ, ARMv8 AES and PMULL), and slow without them. Measured
//!   on this project's 2-CPU build machine (AVX2 and VAES, no AVX-512),
//!   1 MiB buffers, one core: about 3 GB/s, against about 1.2 GB/s for
//!   ChaCha20-Poly1305; encryption was the largest single cost of a cold
//!   read from a peer (`docs/benchmarks.md`).
//!
//! The choice follows TLS practice: each side lists the AEADs it accepts
//! in its order of preference (AES-256-GCM first only when its own CPU
//! has the instructions), in the encrypted Hello of handshake message 2
//! or 3, and a connection uses AES-256-GCM only when **both** lists put
//! it first; otherwise ChaCha20-Poly1305. So a machine without AES
//! hardware never has to run it in software, and both sides compute the
//! same choice from the same two lists. The lists are inside the Noise
//! transcript, which the transport keys are derived from, so an attacker
//! who changed one would leave the two sides with different keys and the
//! READY frames would not open. A peer whose Hello carries no list (an
//! older keibi) gets ChaCha20-Poly1305.
//!
//! One difference in key hygiene: the ChaCha20-Poly1305 state wipes its
//! key on drop (the crate's `zeroize` feature); ring's AES key schedule
//! is freed at a rekey or at the end of the connection without being
//! wiped, so it stays in syncd's freed heap memory until reused. Reading
//! it takes the access to syncd's memory that would reveal the current
//! keys anyway; `channel_aead = "chacha20-poly1305"` in `syncd.toml`
//! (see the README) makes a machine offer only ChaCha20-Poly1305.

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Tag};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use super::frame::TAG_LEN;

/// One transport AEAD. The byte values are sent in the Hello; never
/// reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AeadKind {
    /// ChaCha20-Poly1305 (id 1).
    ChaCha20Poly1305,
    /// AES-256-GCM (id 2).
    Aes256Gcm,
}

impl AeadKind {
    /// Every kind, for tests and lookups.
    pub const ALL: [AeadKind; 2] = [AeadKind::ChaCha20Poly1305, AeadKind::Aes256Gcm];

    /// The byte that names this kind in a Hello.
    pub fn id(self) -> u8 {
        match self {
            AeadKind::ChaCha20Poly1305 => 1,
            AeadKind::Aes256Gcm => 2,
        }
    }

    /// The kind a Hello byte names, if any (unknown bytes are skipped:
    /// a later keibi may offer more).
    pub fn from_id(id: u8) -> Option<AeadKind> {
        AeadKind::ALL.into_iter().find(|k| k.id() == id)
    }

    /// The name used in logs and in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            AeadKind::ChaCha20Poly1305 => "chacha20-poly1305",
            AeadKind::Aes256Gcm => "aes-256-gcm",
        }
    }

    /// The kind a configuration name means.
    pub fn from_name(name: &str) -> Option<AeadKind> {
        AeadKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl std::fmt::Display for AeadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether this CPU runs AES-256-GCM in hardware (AES rounds and the
/// carry-less multiply GHASH needs).
pub fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// What this machine offers, in its order of preference: AES-256-GCM
/// first when the CPU has it in hardware, then ChaCha20-Poly1305; only
/// ChaCha20-Poly1305 when `only` says so.
pub fn offer(only: Option<AeadKind>) -> Vec<AeadKind> {
    match only {
        Some(k) => vec![k],
        None if aes_in_hardware() => vec![AeadKind::Aes256Gcm, AeadKind::ChaCha20Poly1305],
        None => vec![AeadKind::ChaCha20Poly1305, AeadKind::Aes256Gcm],
    }
}

/// The AEAD of a connection between two offers (the order of the two
/// arguments does not matter): AES-256-GCM when both prefer it,
/// otherwise ChaCha20-Poly1305. `None` when the offers share nothing
/// (only possible when a side was configured to offer only one kind).
pub fn choose(a: &[AeadKind], b: &[AeadKind]) -> Option<AeadKind> {
    if a.first() == Some(&AeadKind::Aes256Gcm) && b.first() == Some(&AeadKind::Aes256Gcm) {
        return Some(AeadKind::Aes256Gcm);
    }
    if a.contains(&AeadKind::ChaCha20Poly1305) && b.contains(&AeadKind::ChaCha20Poly1305) {
        return Some(AeadKind::ChaCha20Poly1305);
    }
    (a.contains(&AeadKind::Aes256Gcm) && b.contains(&AeadKind::Aes256Gcm))
        .then_some(AeadKind::Aes256Gcm)
}

/// Encode an offer for the Hello (one id byte per kind).
pub fn encode_offer(offer: &[AeadKind]) -> Vec<u8> {
    offer.iter().map(|k| k.id()).collect()
}

/// Decode a Hello's offer, skipping unknown ids and repeats.
pub fn decode_offer(ids: &[u8]) -> Vec<AeadKind> {
    let mut out = Vec::new();
    for k in ids.iter().filter_map(|&id| AeadKind::from_id(id)) {
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

/// A keyed AEAD of either kind; sealing and opening work in place with
/// the tag apart, as the frame format keeps it.
pub enum Aead {
    /// ChaCha20-Poly1305 (its state wipes the key on drop).
    ChaCha(Box<ChaCha20Poly1305>),
    /// AES-256-GCM.
    Aes(Box<LessSafeKey>),
}

/// The nonce of frame `n`: 4 zero bytes, then the counter little-endian
/// (as Noise's ChaChaPoly and keibi's frames have always used).
fn nonce_bytes(n: u64) -> [u8; 12] {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&n.to_le_bytes());
    bytes
}

impl Aead {
    /// Key an AEAD of `kind` with `key`.
    pub fn new(kind: AeadKind, key: &[u8; 32]) -> Aead {
        match kind {
            AeadKind::ChaCha20Poly1305 => Aead::ChaCha(Box::new(ChaCha20Poly1305::new(key.into()))),
            AeadKind::Aes256Gcm => match UnboundKey::new(&AES_256_GCM, key) {
                Ok(k) => Aead::Aes(Box::new(LessSafeKey::new(k))),
                // ring refuses only a key of the wrong length, and a
                // `[u8; 32]` is AES-256's length.
                Err(_) => unreachable!("AES-256-GCM takes a 32-byte key"),
            },
        }
    }

    /// Whether a failed [`Aead::open`] leaves the sealed bytes as they
    /// were, so that other counters can be tried on them (the transport's
    /// diagnosis of a replayed or reordered frame).
    pub fn keeps_bytes_on_failure(&self) -> bool {
        matches!(self, Aead::ChaCha(_))
    }

    /// The kind of this AEAD.
    pub fn kind(&self) -> AeadKind {
        match self {
            Aead::ChaCha(_) => AeadKind::ChaCha20Poly1305,
            Aead::Aes(_) => AeadKind::Aes256Gcm,
        }
    }

    /// Encrypt `in_out` in place under nonce `n` and `aad`; the tag.
    pub fn seal(&self, n: u64, aad: &[u8], in_out: &mut [u8]) -> Result<[u8; TAG_LEN], ()> {
        self.seal_with_nonce(nonce_bytes(n), aad, in_out)
    }

    /// Decrypt `in_out` in place under nonce `n` and `aad` if `tag`
    /// verifies. When it does not, ChaCha20-Poly1305 leaves `in_out` as
    /// it was, and AES-256-GCM (ring) zeroes it: see
    /// [`Aead::keeps_bytes_on_failure`].
    pub fn open(
        &self,
        n: u64,
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), ()> {
        self.open_with_nonce(nonce_bytes(n), aad, in_out, tag)
    }

    fn seal_with_nonce(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], ()> {
        match self {
            Aead::ChaCha(a) => a
                .encrypt_inout_detached(&nonce.into(), aad, in_out.into())
                .map(|t| t.into())
                .map_err(|_| ()),
            Aead::Aes(k) => k
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    in_out,
                )
                .map_err(|_| ())
                .and_then(|t| <[u8; TAG_LEN]>::try_from(t.as_ref()).map_err(|_| ())),
        }
    }

    fn open_with_nonce(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), ()> {
        match self {
            Aead::ChaCha(a) => a
                .decrypt_inout_detached(&nonce.into(), aad, in_out.into(), &Tag::from(*tag))
                .map_err(|_| ()),
            Aead::Aes(k) => k
                .open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    ring::aead::Tag::from(*tag),
                    in_out,
                    0..,
                )
                .map(|_| ())
                .map_err(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_is_chosen_only_when_both_sides_prefer_it() {
        use AeadKind::*;
        assert_eq!(
            choose(
                &[Aes256Gcm, ChaCha20Poly1305],
                &[Aes256Gcm, ChaCha20Poly1305]
            ),
            Some(Aes256Gcm)
        );
        assert_eq!(
            choose(
                &[Aes256Gcm, ChaCha20Poly1305],
                &[ChaCha20Poly1305, Aes256Gcm]
            ),
            Some(ChaCha20Poly1305)
        );
        assert_eq!(
            choose(
                &[ChaCha20Poly1305, Aes256Gcm],
                &[Aes256Gcm, ChaCha20Poly1305]
            ),
            Some(ChaCha20Poly1305)
        );
        assert_eq!(choose(&[Aes256Gcm, ChaCha20Poly1305], &[]), None);
        assert_eq!(
            choose(&[ChaCha20Poly1305], &[Aes256Gcm, ChaCha20Poly1305]),
            Some(ChaCha20Poly1305)
        );
        assert_eq!(
            choose(&[Aes256Gcm], &[ChaCha20Poly1305, Aes256Gcm]),
            Some(Aes256Gcm)
        );
        assert_eq!(choose(&[Aes256Gcm], &[ChaCha20Poly1305]), None);
    }

    #[test]
    fn offers_round_trip_and_skip_unknown_ids_and_repeats() {
        let o = offer(None);
        assert_eq!(decode_offer(&encode_offer(&o)), o);
        assert_eq!(
            decode_offer(&[9, 2, 2, 0, 1, 255]),
            vec![AeadKind::Aes256Gcm, AeadKind::ChaCha20Poly1305]
        );
        assert_eq!(
            offer(Some(AeadKind::ChaCha20Poly1305)),
            vec![AeadKind::ChaCha20Poly1305]
        );
        assert_eq!(
            offer(None).first() == Some(&AeadKind::Aes256Gcm),
            aes_in_hardware()
        );
    }

    /// RFC 8439 section 2.8.2 (ChaCha20-Poly1305) and the McGrew–Viega
    /// GCM test case 16 (AES-256, 96-bit IV, with AAD): each kind seals
    /// the published plaintext to the published ciphertext and tag and
    /// opens it back; a changed tag byte fails without revealing the
    /// plaintext.
    #[test]
    fn both_kinds_match_published_vectors() {
        fn hex(s: &str) -> Vec<u8> {
            let s: String = s.split_whitespace().collect();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
                .collect()
        }
        struct V {
            kind: AeadKind,
            key: &'static str,
            nonce: &'static str,
            aad: &'static str,
            pt: &'static [u8],
            ct: &'static str,
            tag: &'static str,
        }
        let vectors = [
            V {
                kind: AeadKind::ChaCha20Poly1305,
                key: "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f",
                nonce: "070000004041424344454647",
                aad: "50515253c0c1c2c3c4c5c6c7",
                pt: b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.",
                ct: "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6
                     3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36
                     92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc
                     3ff4def08e4b7a9de576d26586cec64b6116",
                tag: "1ae10b594f09e26a7e902ecbd0600691",
            },
            V {
                kind: AeadKind::Aes256Gcm,
                key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
                nonce: "cafebabefacedbaddecaf888",
                aad: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
                pt: &[],
                ct: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa
                     8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
                tag: "76fc6ece0f4e1768cddf8853bb2d551b",
            },
        ];
        let gcm_pt = hex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        for v in vectors {
            let key: [u8; 32] = hex(v.key).try_into().expect("key");
            let nonce: [u8; 12] = hex(v.nonce).try_into().expect("nonce");
            // keibi's nonces are 4 zero bytes and a counter; these vectors
            // use arbitrary nonces, so they go through the same cipher
            // calls with the published nonce.
            let aad = hex(v.aad);
            let pt = if v.pt.is_empty() {
                gcm_pt.clone()
            } else {
                v.pt.to_vec()
            };
            let a = Aead::new(v.kind, &key);
            let mut buf = pt.clone();
            let tag = a.seal_with_nonce(nonce, &aad, &mut buf).expect("seal");
            assert_eq!(buf, hex(v.ct), "{} ciphertext", v.kind);
            assert_eq!(tag.to_vec(), hex(v.tag), "{} tag", v.kind);
            let mut bad = tag;
            bad[0] ^= 1;
            let before = buf.clone();
            assert!(a.open_with_nonce(nonce, &aad, &mut buf, &bad).is_err());
            if a.keeps_bytes_on_failure() {
                assert_eq!(buf, before, "{}: a failed open changed the buffer", v.kind);
            } else {
                assert_ne!(buf, pt, "{}: a failed open revealed the plaintext", v.kind);
                buf = before;
            }
            a.open_with_nonce(nonce, &aad, &mut buf, &tag)
                .expect("open");
            assert_eq!(buf, pt, "{} plaintext", v.kind);
        }
    }

    #[test]
    fn the_kinds_do_not_open_each_others_frames() {
        let key = [7u8; 32];
        let chacha = Aead::new(AeadKind::ChaCha20Poly1305, &key);
        let aes = Aead::new(AeadKind::Aes256Gcm, &key);
        let mut buf = b"one frame".to_vec();
        let tag = aes.seal(3, b"hdr", &mut buf).expect("seal");
        assert!(chacha.open(3, b"hdr", &mut buf.clone(), &tag).is_err());
        assert!(aes.open(4, b"hdr", &mut buf.clone(), &tag).is_err());
        aes.open(3, b"hdr", &mut buf, &tag).expect("open");
        assert_eq!(buf, b"one frame");
    }
}
