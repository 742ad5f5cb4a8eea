//! Serving a chunk to a peer (`Request::Chunk{gid, index, hash}`).
//!
//! The peer names the object, the chunk's index and the hash it expects.
//! The store answers the bytes only if that is the hash its current
//! version records for the chunk and the chunk is present here
//! (`Store::read_chunk`, which also hashes the bytes while the file may
//! have changed since that version), so a peer is not sent bytes of
//! another version, and a chunk this side has not fetched yet (or holds
//! other bytes of) is answered `NotFound`: the asking side then tries
//! another peer. The asking side verifies every chunk it gets. The store call runs on the
//! blocking pool, never on a runtime worker; the bytes go out in pieces of
//! at most [`MAX_CHUNK`] through the stream's [`ChunkSink`], which waits for
//! the asker's credit.
//!
//! Test hook: with `KEIBI_TEST_CORRUPT_CHUNKS=1` every chunk served has one
//! byte flipped after it was verified ([`crate::fault::corrupt_chunks`]),
//! so the end-to-end test of hash refusal has a real peer that lies.

use crate::peer::msg::{MAX_CHUNK, RemoteError, RemoteErrorKind};
use crate::peer::requests::ChunkSink;
use crate::store::Store;
use crate::sync::model::{CHUNK_SIZE, ChunkHash, Gid};
use std::sync::Arc;

/// Serve chunk `index` of `gid` that must hash to `hash` into `sink`.
pub async fn serve_chunk(
    store: Arc<Store>,
    gid: Gid,
    index: u64,
    hash: ChunkHash,
    sink: ChunkSink,
) -> Result<(), RemoteError> {
    let read = tokio::task::spawn_blocking(move || {
        crate::fault::store_gate();
        store.read_chunk(&gid, index, &hash)
    })
    .await;
    let bytes = match read {
        Ok(Ok(Some(bytes))) => bytes,
        Ok(Ok(None)) => {
            return Err(RemoteError::new(
                RemoteErrorKind::NotFound,
                format!(
                    "chunk {index} of {} with hash {} is not here",
                    gid.hex(),
                    hash.hex()
                ),
            ));
        }
        Ok(Err(e)) => {
            tracing::warn!(gid = %gid.hex(), index, error = %e, "reading a chunk to serve");
            return Err(RemoteError::new(
                RemoteErrorKind::Failed,
                format!("reading chunk {index}: {}", e.message),
            ));
        }
        Err(e) => {
            return Err(RemoteError::new(
                RemoteErrorKind::Failed,
                format!("reading chunk {index}: {e}"),
            ));
        }
    };
    let fingerprint = sink.peer().fingerprint.clone();
    send_chunk(bytes, sink).await?;
    crate::metrics::peer_chunk(&fingerprint, crate::metrics::Direction::Sent);
    Ok(())
}

/// Send a chunk's verified bytes (the test hook may spoil them first).
pub async fn send_chunk(mut bytes: Vec<u8>, mut sink: ChunkSink) -> Result<(), RemoteError> {
    if bytes.len() as u64 > CHUNK_SIZE {
        return Err(RemoteError::new(
            RemoteErrorKind::Failed,
            format!("a chunk of {} bytes exceeds {CHUNK_SIZE}", bytes.len()),
        ));
    }
    if crate::fault::corrupt_chunks() {
        spoil(&mut bytes);
    }
    for piece in bytes.chunks(MAX_CHUNK) {
        sink.send_slice(piece).await?;
    }
    Ok(())
}

/// Flip every bit of the middle byte (the corrupt-chunks test hook).
pub fn spoil(bytes: &mut [u8]) {
    let middle = bytes.len() / 2;
    if let Some(b) = bytes.get_mut(middle) {
        *b ^= 0xFF;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spoiled_bytes_no_longer_hash_the_same() {
        let mut bytes = vec![7u8; 1000];
        let before = ChunkHash::of(&bytes);
        spoil(&mut bytes);
        assert_ne!(ChunkHash::of(&bytes), before);
        assert_eq!(bytes.iter().filter(|b| **b != 7).count(), 1);
        let mut empty: Vec<u8> = Vec::new();
        spoil(&mut empty);
        assert!(empty.is_empty());
    }
}
