//! Framing on the TCP stream, before and after the handshake.
//!
//! Handshake messages travel as `u16 big endian length || Noise message`
//! (Noise caps a message at 65,535 bytes, so the prefix cannot claim
//! more). Transport frames travel as `u32 big endian length || sealed`,
//! where the length is checked against [`MAX_FRAME`] (and against the
//! smallest possible frame) before a single byte of the body is read or a
//! buffer is grown for it: a hostile peer that claims 4 GiB costs us
//! nothing but the four bytes it sent.
//!
//! A clean end of stream between frames is [`ChannelError::Eof`]; one in
//! the middle of a frame is a [`ChannelError::BadFrame`] that says how much
//! of the frame had arrived.

use super::{ChannelError, MAX_FRAME};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of the length prefix of a transport frame.
pub const HEADER_LEN: usize = 4;
/// Bytes of a Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// The smallest sealed frame: a type byte and the tag.
pub const MIN_FRAME: usize = 1 + TAG_LEN;
/// The largest handshake message (Noise's limit).
pub const MAX_HANDSHAKE_MSG: usize = 65_535;

/// The type byte that starts every frame's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// One peer message.
    Data = 0,
    /// The sender's key changes after this frame.
    Rekey = 1,
    /// Key confirmation, the first frame each way.
    Ready = 2,
    /// The sender closes; the body is the reason.
    Close = 3,
}

impl FrameType {
    /// The type of a plaintext's first byte, if it is one.
    pub fn from_byte(b: u8) -> Option<FrameType> {
        Some(match b {
            0 => FrameType::Data,
            1 => FrameType::Rekey,
            2 => FrameType::Ready,
            3 => FrameType::Close,
            _ => return None,
        })
    }
}

/// Check a transport frame's length prefix; returns the sealed length.
pub fn check_header(header: [u8; HEADER_LEN]) -> Result<usize, ChannelError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(ChannelError::Oversize {
            len: len as u64,
            cap: MAX_FRAME as u64,
        });
    }
    if len < MIN_FRAME {
        return Err(ChannelError::BadFrame(format!(
            "frame length {len} is shorter than the smallest frame ({MIN_FRAME} bytes)"
        )));
    }
    Ok(len)
}

/// Reads transport frames, one at a time, so that a read cancelled at
/// any `.await` (a `select!` that picked another branch) loses nothing:
/// the header bytes read so far live here, the body bytes in the
/// caller's buffer, and the next call carries on where this one stopped.
#[derive(Debug, Default)]
pub struct FrameReader {
    header: [u8; HEADER_LEN],
    got: usize,
}

impl FrameReader {
    /// Read one frame: its header, checked, and its sealed body into
    /// `body` (cleared when a new frame starts; grown to the frame's
    /// length at most). Pass the same `body` again after a cancelled call.
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        body: &mut Vec<u8>,
    ) -> Result<[u8; HEADER_LEN], ChannelError> {
        if self.got < HEADER_LEN {
            while self.got < HEADER_LEN {
                let n = r.read(&mut self.header[self.got..]).await?;
                if n == 0 {
                    return Err(if self.got == 0 {
                        ChannelError::Eof
                    } else {
                        ChannelError::BadFrame(format!(
                            "truncated: end of stream after {} of the {HEADER_LEN} length bytes",
                            self.got
                        ))
                    });
                }
                self.got += n;
            }
            body.clear();
        }
        // Checked before anything of the body is read or allocated (and
        // again, harmlessly, when a cancelled read resumes).
        let len = check_header(self.header)?;
        body.reserve_exact(len.saturating_sub(body.len()));
        while body.len() < len {
            // `read_buf` fills the spare capacity without zeroing it
            // first; the `take` keeps each read inside this frame.
            let n = (&mut *r)
                .take((len - body.len()) as u64)
                .read_buf(body)
                .await?;
            if n == 0 {
                return Err(ChannelError::BadFrame(format!(
                    "truncated: end of stream after {} of the {len} bytes of a frame",
                    body.len()
                )));
            }
        }
        self.got = 0;
        Ok(self.header)
    }
}

/// Read one transport frame with a fresh [`FrameReader`] (for a reader
/// that is never cancelled mid-frame: tests, benches).
#[cfg(test)]
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    body: &mut Vec<u8>,
) -> Result<[u8; HEADER_LEN], ChannelError> {
    FrameReader::default().read(r, body).await
}

/// Write one handshake message with its `u16` length prefix.
pub async fn write_handshake<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &[u8],
) -> Result<(), ChannelError> {
    let len = u16::try_from(msg.len()).map_err(|_| {
        ChannelError::Handshake(format!(
            "message of {} bytes is over Noise's limit",
            msg.len()
        ))
    })?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(())
}

/// Read one handshake message (its length is at most 65,535 by
/// construction) into `msg`.
pub async fn read_handshake<R: AsyncRead + Unpin>(
    r: &mut R,
    msg: &mut Vec<u8>,
) -> Result<(), ChannelError> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ChannelError::Eof),
        Err(e) => return Err(e.into()),
    }
    let len = usize::from(u16::from_be_bytes(len));
    msg.clear();
    msg.resize(len, 0);
    match r.read_exact(msg).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ChannelError::Handshake(
            format!("truncated: end of stream inside a handshake message of {len} bytes"),
        )),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_limits() {
        assert!(matches!(
            check_header(u32::MAX.to_be_bytes()),
            Err(ChannelError::Oversize { len, cap }) if len == u32::MAX as u64 && cap == MAX_FRAME as u64
        ));
        assert!(matches!(
            check_header((MAX_FRAME as u32 + 1).to_be_bytes()),
            Err(ChannelError::Oversize { .. })
        ));
        assert_eq!(
            check_header((MAX_FRAME as u32).to_be_bytes()).expect("cap"),
            MAX_FRAME
        );
        assert!(matches!(
            check_header((MIN_FRAME as u32 - 1).to_be_bytes()),
            Err(ChannelError::BadFrame(m)) if m.contains("shorter")
        ));
    }

    #[tokio::test]
    async fn eof_between_frames_and_inside_one() {
        let mut body = Vec::new();
        let mut empty: &[u8] = &[];
        assert!(matches!(
            read_frame(&mut empty, &mut body).await,
            Err(ChannelError::Eof)
        ));
        let mut half: &[u8] = &[0, 0];
        assert!(matches!(
            read_frame(&mut half, &mut body).await,
            Err(ChannelError::BadFrame(m)) if m.contains("2 of the 4")
        ));
        let mut short: &[u8] = &[0, 0, 0, 40, 1, 2, 3];
        assert!(matches!(
            read_frame(&mut short, &mut body).await,
            Err(ChannelError::BadFrame(m)) if m.contains("3 of the 40")
        ));
        let mut whole: &[u8] = &[
            0, 0, 0, 17, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 99,
        ];
        let header = read_frame(&mut whole, &mut body).await.expect("frame");
        assert_eq!(header, [0, 0, 0, 17]);
        assert_eq!(body, (1..=17).collect::<Vec<u8>>());
        assert_eq!(whole, &[99], "nothing past the frame is read");
    }

    #[tokio::test]
    async fn a_cancelled_read_resumes_where_it_stopped() {
        // The frame arrives in pieces; each read attempt is cut short
        // (like a select! that picked a timer) while data is missing.
        let (mut tx, mut rx) = tokio::io::duplex(64);
        let frame: Vec<u8> = [0u8, 0, 0, 20].into_iter().chain(1..=20u8).collect();
        let mut reader = FrameReader::default();
        let mut body = Vec::new();
        for piece in [&frame[..2], &frame[2..9], &frame[9..]] {
            let attempt = tokio::time::timeout(
                std::time::Duration::from_millis(20),
                reader.read(&mut rx, &mut body),
            )
            .await;
            assert!(attempt.is_err(), "incomplete: the read waits");
            tx.write_all(piece).await.expect("write");
        }
        let header = reader.read(&mut rx, &mut body).await.expect("frame");
        assert_eq!(header, [0, 0, 0, 20]);
        assert_eq!(body, (1..=20).collect::<Vec<u8>>());
    }
}
