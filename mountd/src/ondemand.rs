//! On-demand reads: the state of a handle whose file is not all local, and
//! the decision whether an I/O on it must first ask syncd for bytes.
//!
//! syncd answers an open of a file whose bytes are not all on this
//! machine with [`Partial`]: the chunk size, the size below which chunks
//! exist (the version's size, lowered by truncates since) and a bitmap of
//! the chunks that are present and verified in the (sparse) content file.
//! Such a handle is never a passthrough open (the kernel would read the
//! holes as zeros); mountd keeps the bitmap with the handle and:
//!
//! - a `read` whose chunks below `size` are all present is a `pread` on
//!   the dispatch thread, as for any plain open: it never waits on the
//!   network;
//! - otherwise the read goes to a tokio task, which calls
//!   `fetch_range(handle, offset, len)` with the read deadline
//!   (`--read-deadline`), merges the bitmap it answers, then `pread`s.
//!   Its errors are the read's: `EIO` when no reachable peer has a chunk,
//!   `ETIMEDOUT` at the deadline; a syncd without the call (`ENOSYS`)
//!   gives `EIO`;
//! - a `write` (or an `fallocate` that changes bytes) touching a missing
//!   chunk below `size` fetches it first the same way, so a later fetch
//!   can never overwrite written bytes; writes at or beyond `size` need
//!   nothing;
//! - a `setattr` of the size through this mount lowers `size` of the
//!   inode's partial handles (syncd lowers its own limit, and chunks at or
//!   beyond it count present).
//!
//! Bits only ever get set: presence of a chunk of one version never goes
//! back while a handle has it open.
//!
//! Locks: `present` is a leaf lock held only for bit operations.

use ipc_schema::{FsError, Partial, fs_err};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The presence of the chunks of one partial handle's version.
#[derive(Debug)]
pub struct PartialState {
    chunk_size: u64,
    /// Chunks exist below this offset only.
    size: AtomicU64,
    /// Chunk `i` is bit `i % 64` of word `i / 64`.
    present: Mutex<Vec<u64>>,
}

impl PartialState {
    /// The state syncd answered in `open`; a chunk size of 0 is refused.
    pub fn new(p: &Partial) -> Result<Self, FsError> {
        if p.chunk_size == 0 {
            return Err(fs_err!(EIO, "keibi-syncd answered a chunk size of 0"));
        }
        Ok(PartialState {
            chunk_size: p.chunk_size,
            size: AtomicU64::new(p.size),
            present: Mutex::new(p.present.clone()),
        })
    }

    /// The part of `[offset, offset + len)` that lies below `size`, as a
    /// range of chunk indexes (empty when none does).
    fn chunks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset
            .saturating_add(len)
            .min(self.size.load(Ordering::SeqCst));
        if end <= offset {
            return 0..0;
        }
        offset / self.chunk_size..(end - 1) / self.chunk_size + 1
    }

    /// Whether some chunk of `[offset, offset + len)` below `size` is
    /// missing, so that the I/O must first ask syncd to fetch it.
    pub fn missing(&self, offset: u64, len: u64) -> bool {
        let chunks = self.chunks(offset, len);
        if chunks.is_empty() {
            return false;
        }
        let present = self.present.lock().unwrap_or_else(|p| p.into_inner());
        chunks.into_iter().any(|i| !bit(&present, i))
    }

    /// Merge a bitmap syncd answered (bits are only ever added).
    pub fn merge(&self, bitmap: &[u64]) {
        let mut present = self.present.lock().unwrap_or_else(|p| p.into_inner());
        if present.len() < bitmap.len() {
            present.resize(bitmap.len(), 0);
        }
        for (w, b) in present.iter_mut().zip(bitmap) {
            *w |= b;
        }
    }

    /// The file was truncated to `size` through this mount: chunks at or
    /// beyond it need no fetch from now on.
    pub fn lower_size(&self, size: u64) {
        self.size.fetch_min(size, Ordering::SeqCst);
    }
}

fn bit(words: &[u64], i: u64) -> bool {
    let (w, b) = ((i / 64) as usize, i % 64);
    words.get(w).is_some_and(|word| word & (1 << b) != 0)
}

/// The error a read or write gets when syncd could not make its bytes
/// present: syncd's (`EIO`, `ETIMEDOUT`, ...), except that a syncd that
/// does not know the call answers `EIO`, which a reader understands.
pub fn fetch_error(e: FsError) -> FsError {
    if e.errno == libc::ENOSYS {
        fs_err!(
            EIO,
            "the bytes are not on this machine and keibi-syncd cannot fetch them: {}",
            e.message
        )
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(size: u64, present: Vec<u64>) -> PartialState {
        PartialState::new(&Partial {
            chunk_size: 100,
            size,
            present,
        })
        .expect("valid")
    }

    #[test]
    fn present_chunks_need_no_fetch() {
        // Chunks 0 and 2 present, 1 and 3 missing.
        let s = state(400, vec![0b0101]);
        assert!(!s.missing(0, 100));
        assert!(!s.missing(10, 50));
        assert!(!s.missing(200, 100));
        assert!(s.missing(0, 101), "touches chunk 1");
        assert!(s.missing(150, 10));
        assert!(s.missing(250, 100), "touches chunk 3");
        assert!(s.missing(99, 2), "a range across a chunk boundary");
    }

    #[test]
    fn nothing_at_or_beyond_size_is_missing() {
        let s = state(250, vec![0b001]);
        assert!(!s.missing(250, 4096), "at the size");
        assert!(!s.missing(1000, 10), "beyond it");
        assert!(s.missing(240, 4096), "chunk 2 straddles the size");
        assert!(!s.missing(0, 0), "an empty range");
        assert!(!s.missing(u64::MAX - 1, 10), "no overflow");
    }

    #[test]
    fn merged_bits_stay_and_short_bitmaps_count_missing() {
        let s = state(64 * 100 * 2, vec![]);
        assert!(s.missing(0, 1), "no bitmap word yet: missing");
        s.merge(&[0b1, 1 << 1]);
        assert!(!s.missing(0, 100));
        assert!(!s.missing(65 * 100, 100), "chunk 65 is bit 1 of word 1");
        assert!(s.missing(100, 1));
        // A later, smaller answer never clears a bit.
        s.merge(&[0b10]);
        assert!(!s.missing(0, 200));
        assert!(!s.missing(65 * 100, 100));
    }

    #[test]
    fn truncating_lowers_what_needs_a_fetch() {
        let s = state(1000, vec![0b1]);
        assert!(s.missing(100, 100));
        s.lower_size(100);
        assert!(!s.missing(100, 100), "beyond the new size");
        s.lower_size(500);
        assert!(!s.missing(100, 100), "the size never grows back");
    }

    #[test]
    fn enosys_reads_as_eio_and_other_errors_pass() {
        assert_eq!(
            fetch_error(FsError::new(libc::ENOSYS, "stub")).errno,
            libc::EIO
        );
        assert_eq!(
            fetch_error(FsError::new(libc::ETIMEDOUT, "slow")).errno,
            libc::ETIMEDOUT
        );
    }

    #[test]
    fn a_chunk_size_of_zero_is_refused() {
        let r = PartialState::new(&Partial {
            chunk_size: 0,
            size: 10,
            present: vec![],
        });
        assert_eq!(r.map_err(|e| e.errno).err(), Some(libc::EIO));
    }
}
