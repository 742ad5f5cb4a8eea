//! The primitives snow runs the Noise handshake with.
//!
//! snow is built without its default features, so it brings no crypto of
//! its own; [`KeibiResolver`] hands it the crates the rest of keibi uses:
//!
//! | Noise name  | crate                         |
//! |-------------|-------------------------------|
//! | `25519`     | x25519-dalek (`StaticSecret`) |
//! | `ChaChaPoly`| chacha20poly1305              |
//! | `SHA256`    | sha2                          |
//! | RNG         | the OS, through getrandom     |
//!
//! Anything else (`448`, `AESGCM`, `BLAKE2s`, ...) resolves to `None`, so
//! snow refuses a protocol name that asks for it. Secrets held here
//! (the DH private key, the cipher key) are wiped when dropped.

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use sha2::{Digest, Sha256};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::CryptoResolver;
use snow::types::{Cipher, Dh, Hash, Random};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

/// Length of a ChaCha20-Poly1305 tag.
const TAG_LEN: usize = 16;

/// snow's crypto, from keibi's crates.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeibiResolver;

impl CryptoResolver for KeibiResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(OsRandom))
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::<Dh25519>::default()),
            _ => None,
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        match choice {
            HashChoice::SHA256 => Some(Box::<HashSha256>::default()),
            _ => None,
        }
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        match choice {
            CipherChoice::ChaChaPoly => Some(Box::<CipherChaChaPoly>::default()),
            _ => None,
        }
    }
}

/// Randomness from the operating system.
struct OsRandom;

impl Random for OsRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        getrandom::fill(dest).map_err(|_| snow::Error::Rng)
    }
}

/// An X25519 key pair (x25519-dalek). The private key is zeroized on drop.
#[derive(Default)]
struct Dh25519 {
    private: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

impl Dh for Dh25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        // snow checks the length before it calls `set`; anything else is
        // a bug in snow, and a zero key would then fail every agreement.
        if privkey.len() == 32 {
            self.private.copy_from_slice(privkey);
        } else {
            self.private.zeroize();
        }
        let secret = StaticSecret::from(*self.private);
        self.public = PublicKey::from(&secret).to_bytes();
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut key = Zeroizing::new([0u8; 32]);
        rng.try_fill_bytes(&mut key[..])?;
        self.set(&key[..]);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.private[..]
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        // snow passes its whole key slot (56 bytes); the key is the start.
        let their: [u8; 32] = pubkey
            .get(..32)
            .and_then(|k| k.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let secret = StaticSecret::from(*self.private);
        let shared = secret.diffie_hellman(&PublicKey::from(their));
        // A low-order point gives an all-zero secret: refuse it, so a
        // peer cannot force a known DH output.
        if !shared.was_contributory() {
            return Err(snow::Error::Dh);
        }
        let dst = out.get_mut(..32).ok_or(snow::Error::Dh)?;
        dst.copy_from_slice(shared.as_bytes());
        Ok(())
    }
}

/// ChaCha20-Poly1305 (RFC 8439) with Noise's nonce: 4 zero bytes, then
/// the 64-bit counter little endian.
#[derive(Default)]
struct CipherChaChaPoly {
    key: Zeroizing<[u8; 32]>,
}

impl CipherChaChaPoly {
    fn aead(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(&(*self.key).into())
    }
}

/// The 12-byte nonce Noise (and keibi's frames) use for counter `n`.
pub fn nonce(n: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&n.to_le_bytes());
    bytes.into()
}

impl Cipher for CipherChaChaPoly {
    fn name(&self) -> &'static str {
        "ChaChaPoly"
    }

    fn set(&mut self, key: &[u8; 32]) {
        self.key.copy_from_slice(key);
    }

    fn encrypt(&self, nonce_n: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        // snow sizes `out` for plaintext + tag; it cannot report an
        // error here, so an impossible short buffer yields 0 bytes (which
        // the peer then fails to decrypt).
        let len = plaintext.len();
        let Some(dst) = out.get_mut(..len + TAG_LEN) else {
            return 0;
        };
        let (body, tag_out) = dst.split_at_mut(len);
        body.copy_from_slice(plaintext);
        match self
            .aead()
            .encrypt_inout_detached(&nonce(nonce_n), authtext, body.into())
        {
            Ok(tag) => {
                tag_out.copy_from_slice(&tag);
                len + TAG_LEN
            }
            Err(_) => 0,
        }
    }

    fn decrypt(
        &self,
        nonce_n: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let len = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(snow::Error::Decrypt)?;
        let dst = out.get_mut(..len).ok_or(snow::Error::Decrypt)?;
        dst.copy_from_slice(&ciphertext[..len]);
        let tag = Tag::try_from(&ciphertext[len..]).map_err(|_| snow::Error::Decrypt)?;
        self.aead()
            .decrypt_inout_detached(&nonce(nonce_n), authtext, dst.into(), &tag)
            .map_err(|_| snow::Error::Decrypt)?;
        Ok(len)
    }
}

/// SHA-256 (sha2).
#[derive(Default)]
struct HashSha256 {
    hasher: Sha256,
}

impl Hash for HashSha256 {
    fn name(&self) -> &'static str {
        "SHA256"
    }

    fn block_len(&self) -> usize {
        64
    }

    fn hash_len(&self) -> usize {
        32
    }

    fn reset(&mut self) {
        Digest::reset(&mut self.hasher);
    }

    fn input(&mut self, data: &[u8]) {
        Digest::update(&mut self.hasher, data);
    }

    fn result(&mut self, out: &mut [u8]) {
        let digest = self.hasher.finalize_reset();
        if let Some(dst) = out.get_mut(..32) {
            dst.copy_from_slice(&digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_only_the_chosen_primitives() {
        let r = KeibiResolver;
        assert!(r.resolve_dh(&DHChoice::Curve25519).is_some());
        assert!(r.resolve_dh(&DHChoice::Curve448).is_none());
        assert!(r.resolve_hash(&HashChoice::SHA256).is_some());
        assert!(r.resolve_hash(&HashChoice::Blake2s).is_none());
        assert!(r.resolve_cipher(&CipherChoice::ChaChaPoly).is_some());
        assert!(r.resolve_cipher(&CipherChoice::AESGCM).is_none());
        let mut rng = r.resolve_rng().expect("rng");
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        rng.try_fill_bytes(&mut a).expect("fill");
        rng.try_fill_bytes(&mut b).expect("fill");
        assert_ne!(a, b);
    }

    #[test]
    fn x25519_matches_rfc7748_and_refuses_low_order_points() {
        // RFC 7748 section 6.1.
        let hex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
                .collect();
            v.try_into().expect("32 bytes")
        };
        let alice = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let bob_pub = hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        let shared = hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        let mut dh = Dh25519::default();
        dh.set(&alice);
        assert_eq!(
            dh.pubkey(),
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let mut out = [0u8; 32];
        dh.dh(&bob_pub, &mut out).expect("dh");
        assert_eq!(out, shared);
        assert!(matches!(dh.dh(&[0u8; 32], &mut out), Err(snow::Error::Dh)));
    }

    #[test]
    fn cipher_round_trips_and_rejects_a_flipped_bit() {
        let mut c = CipherChaChaPoly::default();
        c.set(&[9u8; 32]);
        let mut sealed = [0u8; 5 + TAG_LEN];
        assert_eq!(c.encrypt(3, b"ad", b"hello", &mut sealed), 5 + TAG_LEN);
        let mut out = [0u8; 5];
        assert_eq!(c.decrypt(3, b"ad", &sealed, &mut out).expect("open"), 5);
        assert_eq!(&out, b"hello");
        assert!(c.decrypt(4, b"ad", &sealed, &mut out).is_err(), "nonce");
        assert!(c.decrypt(3, b"ax", &sealed, &mut out).is_err(), "aad");
        sealed[0] ^= 1;
        assert!(c.decrypt(3, b"ad", &sealed, &mut out).is_err(), "bit");
        assert!(c.decrypt(3, b"ad", &sealed[..10], &mut out).is_err());
    }
}
