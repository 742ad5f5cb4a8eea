//! Sealing and opening transport frames, per direction.
//!
//! Each direction has its own 32-byte key and a 64-bit frame counter
//! that starts at 0 for every key. A frame is
//! `len: u32 BE || AEAD(key, nonce = 0u32 || counter LE, aad = len,
//! type || body)`, the AEAD being the connection's (ChaCha20-Poly1305 or
//! AES-256-GCM, chosen in the handshake: see [`super::aead`]). Because the receiver opens frame `n` only
//! with counter `n` of its own direction's key, a replayed, reordered or
//! dropped frame fails to authenticate, and so does a frame reflected
//! back to its sender (the other direction's key differs). When that
//! happens [`Opener`] tries, once and only to name the cause in the
//! error, nearby counters of both keys (see [`Opener::diagnose`]; only
//! under ChaCha20-Poly1305, since ring's AES-256-GCM wipes the bytes of
//! a frame that fails); the connection is closed either way.
//!
//! Rekeying (REKEY frame, empty body): the sender seals a REKEY frame
//! with the old key, then replaces its key with
//! `HKDF-SHA256(salt = none, ikm = old).expand("keibi v1 rekey")` and
//! restarts the counter; the receiver does the same after opening it.
//! No answer is awaited, so traffic never pauses. Keys live in
//! `Zeroizing` buffers and the AEAD state zeroizes itself on drop, so an
//! old key is wiped as soon as it is replaced.
//!
//! Copies: a DATA payload is copied once into the sender's reused frame
//! buffer and sealed in place; the receiver reads the sealed body into
//! a buffer (no zero-fill) and opens it in place. [`SecureReceiver::recv`]
//! copies the body out to the caller and keeps the buffer;
//! [`SecureReceiver::recv_bytes`] gives a large body to the caller in that
//! buffer itself (a [`Bytes`] view past the type byte), so bulk data is
//! not copied on the receiving side at all. Both halves are cancel-safe (see
//! [`SecureSender::send`] and [`SecureReceiver::recv`]), which the
//! connection's `select!` loops rely on.

use super::aead::{Aead, AeadKind};
use super::frame::{self, FrameType, HEADER_LEN, TAG_LEN};
use super::{ChannelConfig, ChannelError, MAX_PAYLOAD};
use bytes::Bytes;
use hkdf::Hkdf;
use sha2::Sha256;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use zeroize::Zeroizing;

/// HKDF info for the next key of a direction.
const REKEY_INFO: &[u8] = b"keibi v1 rekey";
/// Longest CLOSE reason (bytes of UTF-8).
#[allow(dead_code)] // used by recv/close, called from peer/conn.rs
pub const MAX_CLOSE_REASON: usize = 1024;
/// How far from the expected counter [`Opener::diagnose`] looks.
const DIAGNOSE_WINDOW: u64 = 16;
/// Read buffer of the receiving half: small frames are read many at a
/// time; large bodies bypass it.
const READ_BUFFER: usize = 16 * 1024;
/// [`SecureReceiver::recv_bytes`] hands a DATA frame with a body at least
/// this long to the caller in the buffer it was read and opened in; a
/// shorter body is copied out and the buffer kept for the next frame.
const HAND_OVER: usize = 16 * 1024;

/// One direction's key and counter.
pub(super) struct DirKey {
    pub(super) key: Zeroizing<[u8; 32]>,
    aead: Aead,
    pub(super) counter: u64,
}

impl DirKey {
    pub(super) fn new(kind: AeadKind, key: Zeroizing<[u8; 32]>) -> DirKey {
        let aead = Aead::new(kind, &key);
        DirKey {
            key,
            aead,
            counter: 0,
        }
    }

    /// Replace the key by its successor and restart the counter; the old
    /// key is zeroized (its `Zeroizing` buffer drops, and so does the
    /// AEAD state: see [`super::aead`] for what each kind wipes).
    fn rekey(&mut self) {
        *self = DirKey::new(self.aead.kind(), next_key(&self.key));
    }

    /// The AEAD this direction uses.
    pub(super) fn kind(&self) -> AeadKind {
        self.aead.kind()
    }
}

/// The key that follows `key` at a rekey.
pub(super) fn next_key(key: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut next = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit: this cannot fail.
    let _ = Hkdf::<Sha256>::new(None, key).expand(REKEY_INFO, &mut next[..]);
    next
}

/// What the sender side shares with the receiver side, only so that the
/// receiver can recognise a reflected frame (one of our own) in its error.
#[derive(Default)]
pub(super) struct OwnTx {
    key: Mutex<Zeroizing<[u8; 32]>>,
    counter: AtomicU64,
}

/// Seals frames of one direction.
pub(super) struct Sealer {
    pub(super) dir: DirKey,
    /// Sealed bytes (with headers) under the current key.
    under_key: u64,
    key_since: Instant,
    rekey_bytes: u64,
    rekey_interval: Duration,
    pub(super) rekeys: u64,
    own: Arc<OwnTx>,
}

impl Sealer {
    pub(super) fn new(
        kind: AeadKind,
        key: Zeroizing<[u8; 32]>,
        cfg: &ChannelConfig,
        own: Arc<OwnTx>,
    ) -> Sealer {
        if let Ok(mut k) = own.key.lock() {
            **k = *key;
        }
        Sealer {
            dir: DirKey::new(kind, key),
            under_key: 0,
            key_since: Instant::now(),
            rekey_bytes: cfg.rekey_bytes,
            rekey_interval: cfg.rekey_interval,
            rekeys: 0,
            own,
        }
    }

    /// Append one sealed frame of type `ty` with `body` to `out`, first a
    /// REKEY frame when this one would pass the byte limit or the key is
    /// older than the interval.
    pub(super) fn seal(
        &mut self,
        ty: FrameType,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ChannelError> {
        let frame_len = (HEADER_LEN + 1 + body.len() + TAG_LEN) as u64;
        if ty != FrameType::Ready
            && (self.under_key + frame_len > self.rekey_bytes
                || self.key_since.elapsed() >= self.rekey_interval
                || self.dir.counter >= u64::MAX - 1)
        {
            self.seal_one(FrameType::Rekey as u8, &[], out)?;
            self.dir.rekey();
            self.under_key = 0;
            self.key_since = Instant::now();
            self.rekeys += 1;
            if let Ok(mut k) = self.own.key.lock() {
                **k = *self.dir.key;
            }
        }
        self.seal_one(ty as u8, body, out)
    }

    /// Seal one frame with type byte `ty` (any byte: tests use unknown ones).
    pub(super) fn seal_one(
        &mut self,
        ty: u8,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ChannelError> {
        let sealed_len = 1 + body.len() + TAG_LEN;
        let header = u32::try_from(sealed_len)
            .map_err(|_| ChannelError::Oversize {
                len: sealed_len as u64,
                cap: super::MAX_FRAME as u64,
            })?
            .to_be_bytes();
        let start = out.len();
        out.reserve(HEADER_LEN + sealed_len);
        out.extend_from_slice(&header);
        out.push(ty);
        out.extend_from_slice(body);
        let n = self.dir.counter;
        let tag = self
            .dir
            .aead
            .seal(n, &header, &mut out[start + HEADER_LEN..])
            .map_err(|_| ChannelError::BadFrame("frame too long to seal".into()))?;
        out.extend_from_slice(&tag);
        self.dir.counter += 1;
        self.own.counter.store(self.dir.counter, Ordering::Relaxed);
        self.under_key += (HEADER_LEN + sealed_len) as u64;
        Ok(())
    }
}

/// Opens frames of one direction.
pub(super) struct Opener {
    pub(super) dir: DirKey,
    pub(super) rekeys: u64,
    own: Arc<OwnTx>,
}

impl Opener {
    pub(super) fn new(kind: AeadKind, key: Zeroizing<[u8; 32]>, own: Arc<OwnTx>) -> Opener {
        Opener {
            dir: DirKey::new(kind, key),
            rekeys: 0,
            own,
        }
    }

    /// An opener in the same state with the same key (tests).
    #[cfg(test)]
    pub(super) fn clone_for_test(&self) -> Opener {
        let mut o = Opener::new(self.dir.kind(), self.dir.key.clone(), Arc::clone(&self.own));
        o.dir.counter = self.dir.counter;
        o
    }

    /// Open the sealed frame `buf` (as read after `header`) in place: on
    /// success `buf` holds `type || body` and the type is returned. REKEY
    /// is applied here; the caller handles the other types.
    pub(super) fn open(
        &mut self,
        header: [u8; HEADER_LEN],
        buf: &mut Vec<u8>,
    ) -> Result<FrameType, ChannelError> {
        let len = buf.len();
        if len < frame::MIN_FRAME || u32::from_be_bytes(header) as usize != len {
            return Err(ChannelError::BadFrame(format!(
                "frame of {len} bytes does not match its length prefix {}",
                u32::from_be_bytes(header)
            )));
        }
        if self.dir.counter == u64::MAX {
            return Err(ChannelError::BadFrame(
                "frame counter exhausted without a rekey".into(),
            ));
        }
        let (sealed, tag) = buf.split_at_mut(len - TAG_LEN);
        let tag = <[u8; TAG_LEN]>::try_from(&*tag)
            .map_err(|_| ChannelError::BadFrame("frame shorter than a tag".into()))?;
        let n = self.dir.counter;
        if self.dir.aead.open(n, &header, sealed, &tag).is_err() {
            return Err(ChannelError::BadFrame(self.diagnose(header, sealed, &tag)));
        }
        self.dir.counter += 1;
        buf.truncate(len - TAG_LEN);
        let ty = FrameType::from_byte(buf[0]).ok_or_else(|| {
            ChannelError::BadFrame(format!("frame {n} has unknown type {}", buf[0]))
        })?;
        if ty == FrameType::Rekey {
            if buf.len() != 1 {
                return Err(ChannelError::BadFrame(format!(
                    "REKEY frame {n} has a body of {} bytes",
                    buf.len() - 1
                )));
            }
            self.dir.rekey();
            self.rekeys += 1;
        }
        Ok(ty)
    }

    /// Why frame `counter` failed to open, as far as can be told: try the
    /// counters near the expected one under our receive key (a replay or
    /// a reordered/dropped frame) and the recent counters of our own send
    /// key (a reflection). Runs once, on the way to closing, and costs at
    /// most `3 * DIAGNOSE_WINDOW` tag checks of this frame. A check that
    /// fails leaves `sealed` as it was; the first that succeeds decrypts
    /// it, and the search stops there.
    fn diagnose(&self, header: [u8; HEADER_LEN], sealed: &mut [u8], tag: &[u8; TAG_LEN]) -> String {
        let n = self.dir.counter;
        let len = sealed.len() + TAG_LEN;
        if !self.dir.aead.keeps_bytes_on_failure() {
            return format!(
                "frame {n} of {len} bytes failed authentication (tampered, forged, replayed, reordered or reflected: {} wiped the frame, so which cannot be told): closing",
                self.dir.kind()
            );
        }
        let mut opens = |aead: &Aead, c: u64| aead.open(c, &header, sealed, tag).is_ok();
        for c in n.saturating_sub(DIAGNOSE_WINDOW)..n {
            if opens(&self.dir.aead, c) {
                return format!(
                    "frame {n} is a replay of frame {c} (its counter was already used): closing"
                );
            }
        }
        for c in n + 1..=n.saturating_add(DIAGNOSE_WINDOW) {
            if opens(&self.dir.aead, c) {
                return format!(
                    "frame {n} arrived out of order: it was sealed as frame {c} (frames reordered or dropped): closing"
                );
            }
        }
        let own_key = self.own.key.lock().map(|k| **k).ok().map(Zeroizing::new);
        if let Some(own_key) = own_key {
            let aead = Aead::new(self.dir.kind(), &own_key);
            let sent = self.own.counter.load(Ordering::Relaxed);
            for c in (sent.saturating_sub(DIAGNOSE_WINDOW)..sent).rev() {
                if opens(&aead, c) {
                    return format!(
                        "frame {n} is a reflection of our own frame {c} (sealed with our sending key): closing"
                    );
                }
            }
        }
        format!("frame {n} of {len} bytes failed authentication (tampered or forged): closing")
    }
}

/// The sending half of a channel: seals DATA frames onto the TCP write
/// half, rekeying by itself.
pub struct SecureSender {
    w: OwnedWriteHalf,
    pub(super) sealer: Sealer,
    /// Sealed bytes not yet (all) written; `buf[..written]` went out.
    buf: Vec<u8>,
    written: usize,
    bytes_sent: u64,
}

impl std::fmt::Debug for SecureSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureSender")
            .field("bytes_sent", &self.bytes_sent)
            .field("rekeys", &self.sealer.rekeys)
            .finish()
    }
}

#[allow(dead_code)] // the public methods are called by peer/conn.rs
impl SecureSender {
    pub(super) fn new(w: OwnedWriteHalf, sealer: Sealer, bytes_sent: u64) -> SecureSender {
        SecureSender {
            w,
            sealer,
            buf: Vec::new(),
            written: 0,
            bytes_sent,
        }
    }

    /// Send one DATA frame carrying `payload` (at most [`MAX_PAYLOAD`]).
    ///
    /// Cancel-safe in the sense that matters for the stream: when a call
    /// is dropped at an `.await`, the frame it sealed is finished by the
    /// next `send` or `close` (so it may still be delivered), and the
    /// stream never carries a broken frame.
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(ChannelError::Oversize {
                len: payload.len() as u64,
                cap: MAX_PAYLOAD as u64,
            });
        }
        self.send_frame(FrameType::Data, payload).await
    }

    /// Send a CLOSE frame with `reason` (cut to 1 KiB), then shut the
    /// write half down.
    pub async fn close(&mut self, reason: &str) -> Result<(), ChannelError> {
        let mut end = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.send_frame(FrameType::Close, &reason.as_bytes()[..end])
            .await?;
        self.w.shutdown().await?;
        Ok(())
    }

    pub(super) async fn send_frame(
        &mut self,
        ty: FrameType,
        body: &[u8],
    ) -> Result<(), ChannelError> {
        self.flush_pending().await?;
        self.sealer.seal(ty, body, &mut self.buf)?;
        self.flush_pending().await
    }

    /// Write what is sealed and not yet written. Each `write` either
    /// wrote bytes (counted in `written`) or nothing, so a call dropped at
    /// its `.await` leaves a consistent state: the next send finishes the
    /// frame first, and the stream never carries half a frame followed by
    /// another.
    async fn flush_pending(&mut self) -> Result<(), ChannelError> {
        while self.written < self.buf.len() {
            let n = self.w.write(&self.buf[self.written..]).await?;
            if n == 0 {
                return Err(ChannelError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.bytes_sent += n as u64;
        }
        self.buf.clear();
        self.written = 0;
        // Do not keep a huge buffer around after an unusual frame.
        if self.buf.capacity() > 2 * super::MAX_FRAME {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Write bytes as they are (tests inject hand-made frames).
    #[cfg(test)]
    pub(super) async fn write_raw(&mut self, raw: &[u8]) -> Result<(), ChannelError> {
        self.w.write_all(raw).await?;
        Ok(())
    }

    /// Bytes written to the socket, frame headers and tags included.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// How many times this side changed its sending key.
    pub fn rekeys(&self) -> u64 {
        self.sealer.rekeys
    }
}

/// The receiving half of a channel: reads and opens frames from the TCP
/// read half.
pub struct SecureReceiver {
    r: BufReader<OwnedReadHalf>,
    reader: frame::FrameReader,
    /// The frame being read or just opened (reused; at most `MAX_FRAME`).
    pub(super) body: Vec<u8>,
    pub(super) opener: Opener,
    bytes_received: u64,
}

impl std::fmt::Debug for SecureReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureReceiver")
            .field("bytes_received", &self.bytes_received)
            .field("rekeys", &self.opener.rekeys)
            .finish()
    }
}

/// A read half with the buffer the receiver uses.
pub(super) fn buffered(r: OwnedReadHalf) -> BufReader<OwnedReadHalf> {
    BufReader::with_capacity(READ_BUFFER, r)
}

#[allow(dead_code)] // the public methods are called by peer/conn.rs
impl SecureReceiver {
    pub(super) fn new(
        r: BufReader<OwnedReadHalf>,
        opener: Opener,
        bytes_received: u64,
    ) -> SecureReceiver {
        SecureReceiver {
            r,
            reader: frame::FrameReader::default(),
            body: Vec::new(),
            opener,
            bytes_received,
        }
    }

    /// Read frames until a DATA frame arrives and put its body in
    /// `payload` (cleared first). REKEY frames are applied on the way; a
    /// CLOSE frame gives [`ChannelError::Closed`] with the peer's reason.
    ///
    /// Cancel-safe: a call dropped at an `.await` (say, in a `select!`)
    /// loses nothing; the partly read frame is kept here and the next
    /// call finishes it. `payload` is written only when a whole DATA
    /// frame has been opened.
    pub async fn recv(&mut self, payload: &mut Vec<u8>) -> Result<(), ChannelError> {
        self.next_data().await?;
        payload.clear();
        payload.extend_from_slice(&self.body[1..]);
        Ok(())
    }

    /// [`SecureReceiver::recv`] that answers the payload as [`Bytes`]: a
    /// large one (at least [`HAND_OVER`] bytes) in the very buffer the
    /// frame was read and opened in, without a copy; a small one copied.
    /// Cancel-safe the same way.
    pub async fn recv_bytes(&mut self) -> Result<Bytes, ChannelError> {
        self.next_data().await?;
        if self.body.len() > HAND_OVER {
            // The next frame is read into a new buffer of its own size.
            Ok(Bytes::from(std::mem::take(&mut self.body)).slice(1..))
        } else {
            Ok(Bytes::copy_from_slice(&self.body[1..]))
        }
    }

    /// Read frames until a DATA frame is opened in `self.body`
    /// (`type || payload`), as [`SecureReceiver::recv`] describes.
    async fn next_data(&mut self) -> Result<(), ChannelError> {
        loop {
            let ty = self.next_frame().await?;
            let body = &self.body[1..];
            match ty {
                FrameType::Data => return Ok(()),
                FrameType::Rekey => continue,
                FrameType::Ready => {
                    return Err(ChannelError::BadFrame(
                        "READY frame after the handshake".into(),
                    ));
                }
                FrameType::Close => {
                    if body.len() > MAX_CLOSE_REASON {
                        return Err(ChannelError::BadFrame(format!(
                            "CLOSE reason of {} bytes is over {MAX_CLOSE_REASON}",
                            body.len()
                        )));
                    }
                    return Err(ChannelError::Closed(
                        String::from_utf8_lossy(body).into_owned(),
                    ));
                }
            }
        }
    }

    /// Read and open one frame into `self.body` (`type || body`).
    pub(super) async fn next_frame(&mut self) -> Result<FrameType, ChannelError> {
        let header = self.reader.read(&mut self.r, &mut self.body).await?;
        self.bytes_received += (HEADER_LEN + self.body.len()) as u64;
        self.opener.open(header, &mut self.body)
    }

    /// Bytes read from the socket in frames, headers and tags included.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// How many times the peer changed its sending key.
    pub fn rekeys(&self) -> u64 {
        self.opener.rekeys
    }
}

/// A sealer and opener pair for one side: `send_key` seals, `recv_key`
/// opens (tests and the handshake).
pub(super) fn pair(
    kind: AeadKind,
    send_key: Zeroizing<[u8; 32]>,
    recv_key: Zeroizing<[u8; 32]>,
    cfg: &ChannelConfig,
) -> (Sealer, Opener) {
    let own = Arc::new(OwnTx::default());
    (
        Sealer::new(kind, send_key, cfg, Arc::clone(&own)),
        Opener::new(kind, recv_key, own),
    )
}
