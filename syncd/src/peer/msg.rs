//! The peer messages: what two syncd say to each other inside the channel.
//!
//! One [`Msg`] travels in one DATA frame of the encrypted channel
//! (`docs/protocol.md`, "Peer messages"), encoded with postcard (serde; a
//! varint for each integer and for each enum variant's index, a varint length
//! before each byte string). The frame bounds a message: [`Msg::encode`]
//! refuses anything longer than [`MAX_PAYLOAD`], and [`Msg::decode`] refuses
//! a longer input, trailing bytes after the message, and any variant index it
//! does not know, with an error that names what was wrong. Decoding never
//! allocates more than its input holds (postcard checks every length against
//! the bytes that remain), so a hostile peer can make us allocate at most one
//! frame's worth per message.
//!
//! Ids are per direction: each side numbers the requests it sends, from 1,
//! increasing. The message type says whose numbering an id is in: `Request`
//! and `Cancel` carry the sender's own ids, `Reply`, `Chunk` and `End` the
//! ids of requests the receiver sent, and `Credit` the id of a stream the
//! sender of the credit is receiving (a request it sent).
//!
//! Chunk data costs one copy on the sending side: the sender copies it
//! into the message ([`encode_chunk`] from a borrowed slice; both it and
//! [`Msg::encode`] reserve the exact size first). The receiving side
//! copies none: [`Msg::decode_frame`] answers a `Chunk`'s data as a
//! [`Bytes`] view into the frame's own buffer, which the channel hands
//! over ([`crate::channel::SecureReceiver::recv_bytes`]). (Other byte
//! strings are `serde_bytes`, one slice copy, not a sequence of `u8`s.)
//!
//! Versions: variants are only ever appended (postcard numbers them in
//! declaration order), never reordered or removed; a new request kind is
//! sent only to peers whose negotiated protocol version knows it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The largest payload of one channel DATA frame, so the largest encoded
/// message (the channel checks the frame; this layer never builds a larger
/// message).
pub const MAX_PAYLOAD: usize = crate::channel::MAX_PAYLOAD;

/// The largest data of one [`Msg::Chunk`] and of an [`Request::Echo`] or
/// [`Reply::Echo`]: room for the message's own header inside
/// [`MAX_PAYLOAD`].
pub const MAX_CHUNK: usize = 192 * 1024;

/// The longest [`RemoteError::message`] that is sent; longer ones are cut
/// (at a character boundary) when the error is made.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// One message between two peers (one per DATA frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Keepalive probe; the receiver answers [`Msg::Pong`] with the same `seq`.
    Ping { seq: u64 },
    /// Answer to [`Msg::Ping`]; its delay is the round-trip time.
    Pong { seq: u64 },
    /// A new request, numbered `id` by its sender. `timeout_ms` is how long
    /// the requester waits; the serving side gives up after it too.
    Request {
        id: u64,
        timeout_ms: u32,
        req: Request,
    },
    /// The answer to a unary request; ends it.
    Reply {
        id: u64,
        reply: Result<Reply, RemoteError>,
    },
    /// Data of a stream request (at most [`MAX_CHUNK`] bytes, never empty),
    /// sent only within the credit the requester granted.
    Chunk {
        id: u64,
        /// Encoded as a byte string (a length, then the bytes).
        data: Bytes,
    },
    /// The end of a stream request, after its last chunk.
    End {
        id: u64,
        result: Result<(), RemoteError>,
    },
    /// The receiver of stream `id` grants its sender `bytes` more bytes of
    /// chunk data.
    Credit { id: u64, bytes: u32 },
    /// The requester gave up on request `id`: the serving side stops.
    Cancel { id: u64 },
}

/// The variant names of [`Msg`], in wire order (index = variant number).
const MSG_NAMES: [&str; 8] = [
    "Ping", "Pong", "Request", "Reply", "Chunk", "End", "Credit", "Cancel",
];

/// What a peer can ask. Part 2 appends the sync requests (e.g. `GetIndex`,
/// `Subscribe`, `GetChunk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Unary: answered with [`Reply::Pong`].
    Ping,
    /// Unary: answered with [`Reply::Echo`] of the same data (at most
    /// [`MAX_CHUNK`] bytes).
    Echo {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Stream: `bytes` bytes of a fixed pattern ([`bulk_pattern_byte`]), in
    /// chunks. Used to test the channel and to measure its throughput.
    Bulk { bytes: u64 },
    /// Stream: the records of the serving peer's change log after its
    /// sequence number `since`, then the live changes as they happen
    /// (the stream stays open). The stream's bytes are items, each a u32
    /// BE length then a postcard [`crate::sync::index::IndexItem`] (at
    /// most [`MAX_INDEX_ITEM`] bytes).
    Index { since: u64 },
    /// Unary, answered with [`Reply::Ack`]: the sender's change log now
    /// ends at `seq` (a hint to pull; lossy and idempotent).
    Notify { seq: u64 },
    /// Stream: the bytes of chunk `index` of object `gid`, which must hash
    /// to `hash` (at most `CHUNK_SIZE` bytes). `NotFound` when the serving
    /// peer does not have exactly those bytes.
    Chunk {
        /// The object.
        gid: crate::sync::model::Gid,
        /// The chunk's index in the file.
        index: u64,
        /// Its expected BLAKE3 hash.
        hash: crate::sync::model::ChunkHash,
    },
}

/// The largest index item accepted (a record of a file of about 64 GiB).
#[allow(dead_code)]
pub const MAX_INDEX_ITEM: usize = 8 << 20;

impl Request {
    /// The request's name, for the in-flight registry and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping => "Ping",
            Request::Echo { .. } => "Echo",
            Request::Bulk { .. } => "Bulk",
            Request::Index { .. } => "Index",
            Request::Notify { .. } => "Notify",
            Request::Chunk { .. } => "Chunk",
        }
    }

    /// Whether the request is answered with a stream (`Chunk`s then `End`)
    /// rather than one `Reply`. Both sides decide this from the request
    /// alone, so a `Reply` to a stream (or a `Chunk` to a unary request) is
    /// a protocol error.
    pub fn is_stream(&self) -> bool {
        matches!(
            self,
            Request::Bulk { .. } | Request::Index { .. } | Request::Chunk { .. }
        )
    }
}

/// The byte at `offset` of a [`Request::Bulk`] stream: a fixed pattern, so
/// the receiver can check every byte without the sender storing anything.
pub fn bulk_pattern_byte(offset: u64) -> u8 {
    // 251 is prime, so the pattern does not line up with any power-of-two
    // chunk size, and a chunk that is lost, repeated or reordered shows.
    (offset % 251) as u8
}

/// The answer to a unary request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to [`Request::Ping`].
    Pong,
    /// Answer to [`Request::Echo`].
    Echo {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Answer to [`Request::Notify`].
    Ack,
}

/// Why the serving peer could not answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// The class of failure.
    pub kind: RemoteErrorKind,
    /// What happened, for the user (at most [`MAX_ERROR_MESSAGE`] bytes).
    pub message: String,
}

/// The class of a [`RemoteError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    /// This peer does not serve that request.
    Unsupported,
    /// The request's arguments are out of bounds (e.g. too large).
    Invalid,
    /// The serving side cannot take the request now (for handlers that
    /// shed load; the connection itself never answers with it).
    Busy,
    /// The request's deadline passed on the serving side.
    Timeout,
    /// Serving failed.
    Failed,
    /// The serving peer does not have what was asked (a chunk it no
    /// longer holds, or holds other bytes of).
    NotFound,
}

impl RemoteError {
    /// An error of `kind`; `message` is cut to [`MAX_ERROR_MESSAGE`] bytes.
    pub fn new(kind: RemoteErrorKind, message: impl Into<String>) -> RemoteError {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE {
            let mut cut = MAX_ERROR_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        RemoteError { kind, message }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for RemoteError {}

/// A message that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoding would not fit one frame.
    #[error("a {kind} message of {len} bytes exceeds the {max}-byte frame payload")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    /// postcard failed (not expected for these types).
    #[error("encoding a {kind} message: {err}")]
    Postcard { kind: &'static str, err: String },
}

/// Bytes that are not one valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is longer than any frame payload.
    #[error("message of {len} bytes exceeds the {max}-byte frame payload")]
    TooLong { len: usize, max: usize },
    /// The frame is empty.
    #[error("empty message")]
    Empty,
    /// The first varint names no message type this version knows.
    #[error("unknown message type {0} (this version knows 0..={max})", max = MSG_NAMES.len() - 1)]
    UnknownType(u32),
    /// The message's fields do not decode (truncated, a varint too long, an
    /// unknown request or reply variant, invalid UTF-8, ...).
    #[error("malformed {kind} message: {err}")]
    Malformed { kind: &'static str, err: String },
    /// A valid message followed by more bytes.
    #[error("{extra} trailing bytes after a {kind} message")]
    Trailing { kind: &'static str, extra: usize },
}

impl Msg {
    /// The message type's name (as in the protocol document).
    pub fn kind(&self) -> &'static str {
        let index = match self {
            Msg::Ping { .. } => 0,
            Msg::Pong { .. } => 1,
            Msg::Request { .. } => 2,
            Msg::Reply { .. } => 3,
            Msg::Chunk { .. } => 4,
            Msg::End { .. } => 5,
            Msg::Credit { .. } => 6,
            Msg::Cancel { .. } => 7,
        };
        MSG_NAMES[index]
    }

    /// Encode into a new buffer of exactly the message's size, refusing
    /// anything longer than [`MAX_PAYLOAD`].
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let kind = self.kind();
        let len =
            postcard::experimental::serialized_size(self).map_err(|e| EncodeError::Postcard {
                kind,
                err: e.to_string(),
            })?;
        if len > MAX_PAYLOAD {
            return Err(EncodeError::TooLarge {
                kind,
                len,
                max: MAX_PAYLOAD,
            });
        }
        postcard::to_extend(self, Vec::with_capacity(len)).map_err(|e| EncodeError::Postcard {
            kind,
            err: e.to_string(),
        })
    }

    /// Decode one whole frame payload.
    pub fn decode(bytes: &[u8]) -> Result<Msg, DecodeError> {
        if bytes.len() > MAX_PAYLOAD {
            return Err(DecodeError::TooLong {
                len: bytes.len(),
                max: MAX_PAYLOAD,
            });
        }
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        // The variant index comes first; read it alone to name the type in
        // errors (and to tell an unknown type from a malformed known one).
        let kind = match postcard::take_from_bytes::<u32>(bytes) {
            Ok((index, _)) => match MSG_NAMES.get(index as usize) {
                Some(name) => *name,
                None => return Err(DecodeError::UnknownType(index)),
            },
            Err(e) => {
                return Err(DecodeError::Malformed {
                    kind: "?",
                    err: e.to_string(),
                });
            }
        };
        match postcard::take_from_bytes::<Msg>(bytes) {
            Ok((msg, [])) => Ok(msg),
            Ok((_, rest)) => Err(DecodeError::Trailing {
                kind,
                extra: rest.len(),
            }),
            Err(e) => Err(DecodeError::Malformed {
                kind,
                err: e.to_string(),
            }),
        }
    }
}

/// The variant index of [`Msg::Chunk`] (postcard numbers variants in
/// declaration order).
const CHUNK_INDEX: u32 = 4;

impl Msg {
    /// [`Msg::decode`] of a whole frame payload held in `frame`: the same
    /// message (or the same error), except that a `Chunk`'s data is a
    /// view into `frame` rather than a copy. The `Chunk` encoding is read
    /// by hand (the variant index, the id and the data's length, each a
    /// varint, then exactly that many bytes); anything else, including a
    /// `Chunk` that does not parse that way, goes through `decode`.
    pub fn decode_frame(frame: Bytes) -> Result<Msg, DecodeError> {
        if frame.len() <= MAX_PAYLOAD
            && let Ok((CHUNK_INDEX, rest)) = postcard::take_from_bytes::<u32>(&frame)
            && let Ok((id, rest)) = postcard::take_from_bytes::<u64>(rest)
            && let Ok((len, rest)) = postcard::take_from_bytes::<u64>(rest)
            && usize::try_from(len) == Ok(rest.len())
        {
            let start = frame.len() - rest.len();
            return Ok(Msg::Chunk {
                id,
                data: frame.slice(start..),
            });
        }
        Msg::decode(&frame)
    }
}

/// The encoding of `Msg::Chunk { id, data }` from borrowed data (the
/// variant index, the id, then the data as a byte string: postcard encodes
/// a tuple as its elements in order, so the bytes are the same), copying
/// the data once, into a buffer of the exact size.
pub fn encode_chunk(id: u64, data: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let fields = (CHUNK_INDEX, id, serde_bytes::Bytes::new(data));
    let kind = "Chunk";
    let len =
        postcard::experimental::serialized_size(&fields).map_err(|e| EncodeError::Postcard {
            kind,
            err: e.to_string(),
        })?;
    if len > MAX_PAYLOAD {
        return Err(EncodeError::TooLarge {
            kind,
            len,
            max: MAX_PAYLOAD,
        });
    }
    postcard::to_extend(&fields, Vec::with_capacity(len)).map_err(|e| EncodeError::Postcard {
        kind,
        err: e.to_string(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn remote_error() -> impl Strategy<Value = RemoteError> {
        (
            prop_oneof![
                Just(RemoteErrorKind::Unsupported),
                Just(RemoteErrorKind::Invalid),
                Just(RemoteErrorKind::Busy),
                Just(RemoteErrorKind::Timeout),
                Just(RemoteErrorKind::Failed),
            ],
            ".{0,40}",
        )
            .prop_map(|(kind, message)| RemoteError::new(kind, message))
    }

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..max)
    }

    /// Any message, with ids from `ids` (shared with the connection's fuzz
    /// test, which wants ids that name live requests).
    pub(crate) fn msg_with_ids(
        ids: impl Strategy<Value = u64> + Clone + 'static,
    ) -> impl Strategy<Value = Msg> {
        let request = prop_oneof![
            Just(Request::Ping),
            bytes(300).prop_map(|data| Request::Echo { data }),
            any::<u64>().prop_map(|bytes| Request::Bulk { bytes }),
        ];
        let reply = prop_oneof![
            Just(Reply::Pong),
            bytes(300).prop_map(|data| Reply::Echo { data }),
        ];
        prop_oneof![
            any::<u64>().prop_map(|seq| Msg::Ping { seq }),
            any::<u64>().prop_map(|seq| Msg::Pong { seq }),
            (ids.clone(), any::<u32>(), request).prop_map(|(id, timeout_ms, req)| Msg::Request {
                id,
                timeout_ms,
                req
            }),
            (ids.clone(), prop::result::maybe_ok(reply, remote_error()))
                .prop_map(|(id, reply)| Msg::Reply { id, reply }),
            (ids.clone(), bytes(2000)).prop_map(|(id, data)| Msg::Chunk {
                id,
                data: data.into()
            }),
            (
                ids.clone(),
                prop::result::maybe_ok(Just(()), remote_error())
            )
                .prop_map(|(id, result)| Msg::End { id, result }),
            (ids.clone(), any::<u32>()).prop_map(|(id, bytes)| Msg::Credit { id, bytes }),
            ids.prop_map(|id| Msg::Cancel { id }),
        ]
    }

    fn msg() -> impl Strategy<Value = Msg> {
        msg_with_ids(any::<u64>())
    }

    /// The heap bytes a decoded message holds: what decoding allocated.
    fn held_bytes(msg: &Msg) -> usize {
        let err = |e: &RemoteError| e.message.len();
        match msg {
            Msg::Request {
                req: Request::Echo { data },
                ..
            } => data.len(),
            Msg::Reply {
                reply: Ok(Reply::Echo { data }),
                ..
            } => data.len(),
            Msg::Reply { reply: Err(e), .. } | Msg::End { result: Err(e), .. } => err(e),
            Msg::Chunk { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// What every decode of untrusted bytes must satisfy: no panic (the
    /// caller is inside proptest, which reports panics as failures), the
    /// result holds no more than the input, and a success re-encodes to at
    /// most as many bytes (postcard accepts overlong varints, so not always
    /// the same bytes) that decode to the same message; and
    /// [`Msg::decode_frame`] answers exactly what `decode` answers.
    fn check_decode(input: &[u8]) -> Result<(), TestCaseError> {
        prop_assert_eq!(
            Msg::decode_frame(Bytes::copy_from_slice(input)),
            Msg::decode(input)
        );
        if let Ok(msg) = Msg::decode(input) {
            prop_assert!(held_bytes(&msg) <= input.len());
            let again = msg
                .encode()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(again.len() <= input.len());
            prop_assert_eq!(Msg::decode(&again), Ok(msg));
        }
        Ok(())
    }

    #[test]
    fn every_message_round_trips_and_names_its_kind() {
        let msgs = [
            Msg::Ping { seq: 1 },
            Msg::Pong { seq: u64::MAX },
            Msg::Request {
                id: 7,
                timeout_ms: 5000,
                req: Request::Bulk { bytes: 1 << 30 },
            },
            Msg::Reply {
                id: 7,
                reply: Ok(Reply::Echo {
                    data: vec![1, 2, 3],
                }),
            },
            Msg::Chunk {
                id: 9,
                data: vec![0xAB; MAX_CHUNK].into(),
            },
            Msg::End {
                id: 9,
                result: Err(RemoteError::new(RemoteErrorKind::Busy, "full")),
            },
            Msg::Credit {
                id: 9,
                bytes: 4 << 20,
            },
            Msg::Cancel { id: 9 },
        ];
        for (index, msg) in msgs.iter().enumerate() {
            let bytes = msg.encode().expect("encodes");
            assert!(bytes.len() <= MAX_PAYLOAD);
            assert_eq!(bytes[0] as usize, index, "variant index of {}", msg.kind());
            assert_eq!(msg.kind(), MSG_NAMES[index]);
            assert_eq!(&Msg::decode(&bytes).expect("decodes"), msg);
        }
    }

    #[test]
    fn encoding_examples_in_the_protocol_document() {
        let examples: [(Msg, &[u8]); 4] = [
            (Msg::Ping { seq: 5 }, &[0x00, 0x05]),
            (
                Msg::Request {
                    id: 1,
                    timeout_ms: 5000,
                    req: Request::Ping,
                },
                &[0x02, 0x01, 0x88, 0x27, 0x00],
            ),
            (
                Msg::Credit {
                    id: 1,
                    bytes: 4 << 20,
                },
                &[0x06, 0x01, 0x80, 0x80, 0x80, 0x02],
            ),
            (
                Msg::Chunk {
                    id: 3,
                    data: vec![0xaa, 0xbb].into(),
                },
                &[0x04, 0x03, 0x02, 0xaa, 0xbb],
            ),
        ];
        for (msg, bytes) in examples {
            assert_eq!(msg.encode().expect("encodes"), bytes, "{msg:?}");
        }
    }

    #[test]
    fn encode_chunk_matches_the_message_encoding() {
        assert_eq!(MSG_NAMES[4], "Chunk");
        for (id, len) in [(0u64, 1usize), (1, 127), (300, 128), (u64::MAX, MAX_CHUNK)] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let expected = Msg::Chunk {
                id,
                data: data.clone().into(),
            }
            .encode()
            .expect("encodes");
            assert_eq!(
                encode_chunk(id, &data).expect("encodes"),
                expected,
                "id {id}, {len} bytes"
            );
        }
        assert!(matches!(
            encode_chunk(1, &vec![0; MAX_PAYLOAD]),
            Err(EncodeError::TooLarge { kind: "Chunk", .. })
        ));
    }

    #[test]
    fn chunk_data_is_a_byte_string_not_a_sequence() {
        // A byte string: a length then the raw bytes, so a chunk's overhead is
        // a few bytes, whatever its content.
        let data = vec![0xFF; 1000];
        let bytes = Msg::Chunk {
            id: 1,
            data: data.into(),
        }
        .encode()
        .expect("encodes");
        assert_eq!(bytes.len(), 1 + 1 + 2 + 1000);
    }

    #[test]
    fn encode_refuses_more_than_a_frame() {
        let msg = Msg::Chunk {
            id: 1,
            data: vec![0; MAX_PAYLOAD].into(),
        };
        match msg.encode() {
            Err(EncodeError::TooLarge {
                kind: "Chunk",
                len,
                max,
            }) => {
                assert!(len > MAX_PAYLOAD);
                assert_eq!(max, MAX_PAYLOAD);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn decode_names_what_is_wrong() {
        assert_eq!(Msg::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(Msg::decode(&[8]), Err(DecodeError::UnknownType(8)));
        let err = Msg::decode(&[200, 1]).expect_err("varint 200 is not a type");
        assert_eq!(err, DecodeError::UnknownType(200));
        assert!(
            err.to_string().contains("unknown message type 200"),
            "{err}"
        );

        let mut ping = Msg::Ping { seq: 3 }.encode().expect("encodes");
        ping.push(0);
        assert_eq!(
            Msg::decode(&ping),
            Err(DecodeError::Trailing {
                kind: "Ping",
                extra: 1
            })
        );

        // A Request whose request variant (index 3) this version does not know.
        let err = Msg::decode(&[2, 1, 100, 3]).expect_err("unknown request variant");
        assert!(
            matches!(
                err,
                DecodeError::Malformed {
                    kind: "Request",
                    ..
                }
            ),
            "{err:?}"
        );

        // A chunk that claims more bytes than the frame holds.
        let err = Msg::decode(&[4, 1, 0xFF, 0xFF, 0x03, 1, 2]).expect_err("short chunk");
        assert!(
            matches!(err, DecodeError::Malformed { kind: "Chunk", .. }),
            "{err:?}"
        );

        let big = vec![4u8; MAX_PAYLOAD + 1];
        assert_eq!(
            Msg::decode(&big),
            Err(DecodeError::TooLong {
                len: MAX_PAYLOAD + 1,
                max: MAX_PAYLOAD
            })
        );
    }

    #[test]
    fn remote_error_messages_are_cut_at_a_character_boundary() {
        let e = RemoteError::new(RemoteErrorKind::Failed, "é".repeat(MAX_ERROR_MESSAGE));
        assert!(e.message.len() <= MAX_ERROR_MESSAGE);
        assert!(e.message.len() >= MAX_ERROR_MESSAGE - 1);
        let short = RemoteError::new(RemoteErrorKind::Failed, "short");
        assert_eq!(short.message, "short");
    }

    #[test]
    fn bulk_pattern_repeats_every_251_bytes() {
        assert_eq!(bulk_pattern_byte(0), 0);
        assert_eq!(bulk_pattern_byte(250), 250);
        assert_eq!(bulk_pattern_byte(251), 0);
        assert_eq!(bulk_pattern_byte(251 * 1000 + 7), 7);
    }

    proptest! {
        /// Any message round-trips and fits a frame.
        #[test]
        fn any_message_round_trips(m in msg()) {
            let bytes = m.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(bytes.len() <= MAX_PAYLOAD);
            prop_assert_eq!(Msg::decode_frame(Bytes::from(bytes.clone())), Ok(m.clone()));
            prop_assert_eq!(Msg::decode(&bytes), Ok(m));
        }

        /// The message decoder's fuzz target: arbitrary bytes never panic
        /// and never decode into more than they hold. (Case count:
        /// `PROPTEST_CASES`.)
        #[test]
        fn fuzz_decode_arbitrary_bytes(input in prop::collection::vec(any::<u8>(), 0..600)) {
            check_decode(&input)?;
        }

        /// The decoder's fuzz target on near-valid input: a valid encoding
        /// with bytes flipped, overwritten, cut short or extended.
        #[test]
        fn fuzz_decode_mutated_messages(
            m in msg(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
        ) {
            let mut input = m.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (at, value, op) in edits {
                if input.is_empty() {
                    input.push(value);
                    continue;
                }
                let i = at.index(input.len());
                match op {
                    0 => input[i] ^= value | 1,
                    1 => input[i] = value,
                    2 => input.truncate(i),
                    _ => input.insert(i, value),
                }
            }
            check_decode(&input)?;
        }
    }
}
