//! Index exchange: the items of an `Index{since}` stream, their framing,
//! and the serving side.
//!
//! A peer pulls our change log with one long-lived `Index{since}` stream
//! per connection. The stream's bytes are items, each a u32 BE length and
//! then a postcard [`IndexItem`] of at most [`MAX_INDEX_ITEM`] bytes: the
//! records of every change after `since`, in sequence order (catch-up),
//! then `CaughtUp{seq}` once, then the records of each later change as the
//! local sequence moves (live), each burst followed by another `CaughtUp`
//! (a heartbeat that also tells the puller how far our log goes). Items do
//! not line up with the connection's chunks: the [`ItemReader`] joins and
//! splits them, and refuses a length over the bound before buffering it,
//! so a hostile peer makes us hold at most one item's worth.
//!
//! The serving side ([`serve_index`]) reads the store on the blocking pool
//! in pages of [`PAGE`] records, and waits for more on a
//! `tokio::sync::watch` of the local sequence number that the versioner
//! and the appliers publish after each commit. Credit-based flow control
//! of the stream (see `peer::conn`) slows it down to what the puller
//! takes. The stream ends only when the puller cancels it or the
//! connection ends.
//!
//! Test hook: with `KEIBI_TEST_INJECT_INDEX=<file>` (a JSON array of
//! [`ObjRec`]), the serving side sends those records after the first
//! catch-up, numbered after the real log, so that tests can make a real
//! peer send hostile records.

use super::model::ObjRec;
use crate::peer::msg::{MAX_CHUNK, MAX_INDEX_ITEM, RemoteError, RemoteErrorKind};
use crate::peer::requests::ChunkSink;
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::watch;

/// Records read from the change log per store call.
pub const PAGE: usize = 256;

/// One item of an index stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexItem {
    /// A record of the serving peer's change log, at its sequence `seq`.
    Rec {
        /// The serving peer's sequence number of this change.
        seq: u64,
        /// The object's state.
        rec: ObjRec,
    },
    /// Everything up to `seq` was sent.
    CaughtUp {
        /// The serving peer's last sequence number.
        seq: u64,
    },
}

/// An item that cannot be framed or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// An item longer than [`MAX_INDEX_ITEM`].
    #[error("an index item of {0} bytes exceeds {MAX_INDEX_ITEM}")]
    TooLarge(usize),
    /// Bytes that are not one item.
    #[error("malformed index item: {0}")]
    Malformed(String),
}

/// The framing of one item: u32 BE length, then postcard.
pub fn encode_item(item: &IndexItem) -> Result<Vec<u8>, ItemError> {
    let body = postcard::to_allocvec(item).map_err(|e| ItemError::Malformed(e.to_string()))?;
    if body.len() > MAX_INDEX_ITEM {
        return Err(ItemError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Joins the chunks of an index stream into items.
#[derive(Default)]
pub struct ItemReader {
    buf: Vec<u8>,
}

impl ItemReader {
    /// Add a chunk of the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole item, `Ok(None)` when more bytes are needed. An
    /// error (a length over the bound, bytes that do not decode) means
    /// the stream is broken.
    pub fn next_item(&mut self) -> Result<Option<IndexItem>, ItemError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_INDEX_ITEM {
            return Err(ItemError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let item = match postcard::from_bytes::<IndexItem>(&self.buf[4..4 + len]) {
            Ok(item) => item,
            Err(e) => return Err(ItemError::Malformed(e.to_string())),
        };
        self.buf.drain(..4 + len);
        Ok(Some(item))
    }

    /// Bytes buffered (at most one item and a chunk).
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Where the serving side reports how far a puller got (for
/// `pending_out`): called with the seq of the last item queued.
pub type SentTracker = Arc<dyn Fn(u64) + Send + Sync>;

/// Serve `Index{since}`: catch-up, `CaughtUp`, then live changes until the
/// stream is cancelled. `seq_rx` carries the local sequence number.
pub async fn serve_index(
    store: Arc<Store>,
    mut seq_rx: watch::Receiver<u64>,
    since: u64,
    mut sink: ChunkSink,
    sent: SentTracker,
) -> Result<(), RemoteError> {
    let mut after = since;
    let mut injected = false;
    let mut out = Vec::new();
    loop {
        // Drain the log after `after`, a page at a time.
        loop {
            let s = store.clone();
            let from = after;
            let page = tokio::task::spawn_blocking(move || s.changes_since(from, PAGE))
                .await
                .map_err(|e| failed(format!("reading the change log: {e}")))?
                .map_err(|e| failed(format!("reading the change log: {e}")))?;
            let n = page.len();
            for (seq, rec) in page {
                after = seq;
                push_item(&mut out, &IndexItem::Rec { seq, rec })?;
                flush_full(&mut sink, &mut out).await?;
            }
            if n < PAGE {
                break;
            }
        }
        if !injected {
            injected = true;
            for rec in injected_records() {
                push_item(&mut out, &IndexItem::Rec { seq: after, rec })?;
            }
        }
        push_item(&mut out, &IndexItem::CaughtUp { seq: after })?;
        flush_all(&mut sink, &mut out).await?;
        sent(after);
        // Wait until the log moves past `after`.
        loop {
            if *seq_rx.borrow_and_update() > after {
                break;
            }
            if seq_rx.changed().await.is_err() {
                return Ok(());
            }
        }
    }
}

fn failed(message: String) -> RemoteError {
    RemoteError::new(RemoteErrorKind::Failed, message)
}

fn push_item(out: &mut Vec<u8>, item: &IndexItem) -> Result<(), RemoteError> {
    let bytes = encode_item(item).map_err(|e| failed(e.to_string()))?;
    out.extend_from_slice(&bytes);
    Ok(())
}

/// Send whole chunks of `out`, keeping the rest for later.
async fn flush_full(sink: &mut ChunkSink, out: &mut Vec<u8>) -> Result<(), RemoteError> {
    if out.len() < MAX_CHUNK {
        return Ok(());
    }
    let whole = out.len() - out.len() % MAX_CHUNK;
    for piece in out[..whole].chunks(MAX_CHUNK) {
        sink.send_slice(piece).await?;
    }
    out.drain(..whole);
    Ok(())
}

/// Send everything in `out`.
async fn flush_all(sink: &mut ChunkSink, out: &mut Vec<u8>) -> Result<(), RemoteError> {
    for piece in out.chunks(MAX_CHUNK) {
        sink.send_slice(piece).await?;
    }
    out.clear();
    Ok(())
}

/// The records of `KEIBI_TEST_INJECT_INDEX`, if set (see the module doc).
fn injected_records() -> Vec<ObjRec> {
    let Some(path) = std::env::var_os("KEIBI_TEST_INJECT_INDEX") else {
        return Vec::new();
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(path = ?path, error = %e, "KEIBI_TEST_INJECT_INDEX: cannot read");
            return Vec::new();
        }
    };
    match serde_json::from_str::<Vec<ObjRec>>(&text) {
        Ok(recs) => {
            tracing::warn!(
                records = recs.len(),
                "KEIBI_TEST_INJECT_INDEX: sending test records"
            );
            recs
        }
        Err(e) => {
            tracing::error!(path = ?path, error = %e, "KEIBI_TEST_INJECT_INDEX: not a JSON array of records");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::model::{ChunkHash, DeviceId, EntryName, Gid, VersionVector};
    use ipc_schema::{FileKind, Timestamp};

    fn rec(chunks: usize) -> ObjRec {
        ObjRec {
            gid: Gid::new(DeviceId([1; 8]), 7),
            vv: VersionVector::default().bumped(DeviceId([1; 8])),
            modified_by: DeviceId([1; 8]),
            deleted: false,
            kind: FileKind::File,
            names: vec![EntryName {
                parent: Gid::ROOT,
                name: b"a.txt".to_vec(),
            }],
            perm: 0o644,
            mtime: Timestamp { secs: 5, nanos: 6 },
            size: chunks as u64 * crate::sync::model::CHUNK_SIZE,
            chunks: vec![ChunkHash([9; 32]); chunks],
            target: Vec::new(),
        }
    }

    #[test]
    fn items_round_trip_across_any_chunking() {
        let items = vec![
            IndexItem::Rec {
                seq: 1,
                rec: rec(1),
            },
            IndexItem::Rec {
                seq: 2,
                rec: rec(5000),
            },
            IndexItem::CaughtUp { seq: 2 },
        ];
        let mut bytes = Vec::new();
        for i in &items {
            bytes.extend(encode_item(i).expect("encodes"));
        }
        for piece in [1usize, 3, 4, 1000, MAX_CHUNK] {
            let mut reader = ItemReader::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(piece) {
                reader.push(chunk);
                while let Some(item) = reader.next_item().expect("valid") {
                    got.push(item);
                }
            }
            assert_eq!(got, items, "chunks of {piece}");
            assert_eq!(reader.buffered(), 0);
        }
    }

    #[test]
    fn an_item_over_the_bound_is_refused_both_ways() {
        // 32 bytes per hash: this many hashes exceed the bound.
        let big = rec(MAX_INDEX_ITEM / 32 + 1);
        assert!(matches!(
            encode_item(&IndexItem::Rec { seq: 1, rec: big }),
            Err(ItemError::TooLarge(_))
        ));
        let mut reader = ItemReader::default();
        reader.push(&((MAX_INDEX_ITEM as u32) + 1).to_be_bytes());
        assert_eq!(
            reader.next_item(),
            Err(ItemError::TooLarge(MAX_INDEX_ITEM + 1))
        );
        // The largest allowed length is accepted (waits for its bytes).
        let mut reader = ItemReader::default();
        reader.push(&(MAX_INDEX_ITEM as u32).to_be_bytes());
        assert_eq!(reader.next_item(), Ok(None));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut reader = ItemReader::default();
        reader.push(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(reader.next_item(), Err(ItemError::Malformed(_))));
        let mut reader = ItemReader::default();
        reader.push(&[0, 0, 0, 0]);
        assert!(matches!(reader.next_item(), Err(ItemError::Malformed(_))));
    }
}
