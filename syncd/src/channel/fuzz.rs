//! Fuzz-style property tests of the frame decoder and opener (the code
//! that reads what a peer sends before anything is authenticated).
//!
//! Properties, for random byte streams and for streams of authentic
//! frames mutated at random (bits flipped, bytes overwritten, length
//! prefixes replaced, bytes inserted, ranges duplicated, the stream cut):
//!
//! - decoding never panics;
//! - no buffer ever grows past [`MAX_FRAME`], whatever a prefix claims;
//! - a frame is returned only if it is authentic and in order: what
//!   opens is always a prefix of what was sealed, and an unmutated
//!   stream opens whole.
//!
//! The number of cases comes from `PROPTEST_CASES` (default 64, so the
//! ordinary test run stays short); `scripts/fuzz.sh` runs a long one.
//! The tests are named `fuzz_` so that script can select them.

use super::aead::AeadKind;
use super::frame::{self, FrameType};
use super::transport::{self, Opener};
use super::{ChannelConfig, MAX_FRAME};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::time::Duration;
use zeroize::Zeroizing;

/// Cases per fuzz test: `PROPTEST_CASES`, else 64.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// One change to a byte stream.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        value: u8,
    },
    /// Replace 4 bytes (often a length prefix) with `value`.
    Length {
        at: usize,
        value: u32,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Duplicate {
        at: usize,
        len: usize,
    },
    Cut {
        at: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let len = prop_oneof![
        Just(u32::MAX),
        Just(MAX_FRAME as u32 + 1),
        Just(MAX_FRAME as u32),
        Just(0u32),
        Just(16u32),
        Just(17u32),
        any::<u32>(),
    ];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        (any::<usize>(), len).prop_map(|(at, value)| Mutation::Length { at, value }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..300).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
        any::<usize>().prop_map(|at| Mutation::Cut { at }),
    ]
}

fn apply(stream: &mut Vec<u8>, m: &Mutation) {
    if stream.is_empty() {
        return;
    }
    let n = stream.len();
    match m {
        Mutation::Flip { at, bit } => stream[at % n] ^= 1 << bit,
        Mutation::Set { at, value } => stream[at % n] = *value,
        Mutation::Length { at, value } => {
            let at = at % n;
            for (i, b) in value.to_be_bytes().iter().enumerate() {
                if let Some(x) = stream.get_mut(at + i) {
                    *x = *b;
                }
            }
        }
        Mutation::Insert { at, bytes } => {
            let at = at % (n + 1);
            stream.splice(at..at, bytes.iter().copied());
        }
        Mutation::Duplicate { at, len } => {
            let at = at % n;
            let end = (at + len).min(n);
            let copy = stream[at..end].to_vec();
            stream.splice(end..end, copy);
        }
        Mutation::Cut { at } => stream.truncate(at % n),
    }
}

/// Decode `stream` until the first error; returns the opened plaintexts
/// (`type || body`), checking the buffer cap after every read.
fn decode_all(stream: &[u8], opener: &mut Opener) -> Result<Vec<Vec<u8>>, TestCaseError> {
    let mut r = stream;
    let mut buf = Vec::new();
    let mut opened = Vec::new();
    loop {
        let read = futures::executor::block_on(frame::read_frame(&mut r, &mut buf));
        prop_assert!(
            buf.capacity() <= MAX_FRAME,
            "buffer grew to {}",
            buf.capacity()
        );
        let Ok(header) = read else {
            return Ok(opened);
        };
        match opener.open(header, &mut buf) {
            Ok(_) => opened.push(buf.clone()),
            Err(_) => return Ok(opened),
        }
    }
}

fn test_cfg() -> ChannelConfig {
    ChannelConfig {
        handshake_timeout: Duration::from_secs(5),
        // Small, so that streams carry REKEY frames too.
        rekey_bytes: 3000,
        rekey_interval: Duration::from_secs(3600),
        aeads: vec![AeadKind::ChaCha20Poly1305],
    }
}

fn kind(aes: bool) -> AeadKind {
    if aes {
        AeadKind::Aes256Gcm
    } else {
        AeadKind::ChaCha20Poly1305
    }
}

/// A sealed stream of `bodies` as DATA frames (REKEY frames slip in on
/// their own), and an opener for it.
fn sealed(bodies: &[Vec<u8>], key: [u8; 32], kind: AeadKind) -> (Vec<u8>, Opener) {
    let cfg = test_cfg();
    let (mut sealer, _) = transport::pair(kind, Zeroizing::new(key), Zeroizing::new([0; 32]), &cfg);
    let (_, opener) = transport::pair(kind, Zeroizing::new([1; 32]), Zeroizing::new(key), &cfg);
    let mut stream = Vec::new();
    for b in bodies {
        sealer.seal(FrameType::Data, b, &mut stream).expect("seal");
    }
    (stream, opener)
}

fn bodies() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<u8>(), 64..2500),
        ],
        1..8,
    )
}

#[test]
fn fuzz_frame_decoder_mutated_frames() {
    let strategy = (
        bodies(),
        any::<[u8; 32]>(),
        prop::collection::vec(mutation(), 0..4),
        any::<bool>(),
    );
    let mut runner = runner();
    let result = runner.run(&strategy, |(bodies, key, mutations, aes)| {
        let (mut stream, mut opener) = sealed(&bodies, key, kind(aes));
        // Unmutated, everything opens, in order, REKEYs included.
        let expected = decode_all(&stream, &mut opener.clone_for_test())?;
        let data: Vec<&[u8]> = expected
            .iter()
            .filter(|p| p[0] == FrameType::Data as u8)
            .map(|p| &p[1..])
            .collect();
        prop_assert_eq!(data.len(), bodies.len());
        for (got, sent) in data.iter().zip(&bodies) {
            prop_assert_eq!(*got, sent.as_slice());
        }
        for m in &mutations {
            apply(&mut stream, m);
        }
        let opened = decode_all(&stream, &mut opener)?;
        prop_assert!(opened.len() <= expected.len());
        for (i, (got, want)) in opened.iter().zip(&expected).enumerate() {
            prop_assert_eq!(got, want, "frame {} opened to something never sent", i);
        }
        Ok(())
    });
    eprintln!(
        "fuzz_frame_decoder_mutated_frames: {} cases",
        runner.config().cases
    );
    result.expect("property holds");
}

#[test]
fn fuzz_frame_decoder_random_bytes() {
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..4096),
        any::<[u8; 32]>(),
        any::<bool>(),
        any::<bool>(),
    );
    let mut runner = runner();
    let result = runner.run(&strategy, |(mut bytes, key, plausible, aes)| {
        if plausible && bytes.len() >= 4 {
            // A believable length prefix, so the body reaches the opener.
            let len = (bytes.len() - 4).max(frame::MIN_FRAME) as u32;
            bytes[..4].copy_from_slice(&len.to_be_bytes());
        }
        let (_, mut opener) = transport::pair(
            kind(aes),
            Zeroizing::new([1; 32]),
            Zeroizing::new(key),
            &test_cfg(),
        );
        let opened = decode_all(&bytes, &mut opener)?;
        prop_assert!(opened.is_empty(), "random bytes opened");
        Ok(())
    });
    eprintln!(
        "fuzz_frame_decoder_random_bytes: {} cases",
        runner.config().cases
    );
    result.expect("property holds");
}
