//! `Control::prefetch` (`keibictl prefetch`): make named files local.
//!
//! Each call is one step per file: the path is resolved in the store (on
//! the blocking pool, entry by entry from the root), and the fetcher keeps
//! up to [`WINDOW`] of the file's missing chunks in flight
//! ([`Fetcher::prefetch_step`]), as read-ahead, so readers of the mount
//! still go first. The answer is each file's state before the step;
//! keibictl calls again until every file is local or its own deadline
//! passes, and so shows progress and retries chunks whose fetch failed
//! (no peer connected, a peer without the chunk). Nothing waits here for
//! a chunk: the call answers as soon as the fetches are started.

use super::fetch::Fetcher;
use super::model::{CHUNK_SIZE, chunk_range};
use crate::store::Store;
use crate::store::presence::PresentBits;
use ipc_schema::{FileKind, FsError, Ino, Name, PrefetchFile, fs_err};
use std::sync::Arc;

/// Chunks of one file kept in flight by a step (64 MiB): with keibictl
/// calling a few times a second this does not limit the rate, and a huge
/// file never has more than this many flights queued at once.
pub const WINDOW: usize = (64 << 20) / CHUNK_SIZE as usize;

/// The inode at `path` (from the share's root, `/` separated; empty
/// components and `.` are skipped, `..` is refused) and its attributes.
fn resolve(store: &Store, path: &str) -> Result<ipc_schema::Attr, FsError> {
    let mut attr = store.getattr(Ino::ROOT)?;
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(fs_err!(EINVAL, "{path:?}: `..` is not allowed"));
        }
        attr = store.lookup(attr.ino, &Name::from(part))?;
    }
    Ok(attr)
}

/// Bytes of a file of `size` bytes that are present, given its presence
/// bits (`None`: all of it).
fn present_bytes(size: u64, bits: Option<&PresentBits>) -> u64 {
    let Some(bits) = bits else { return size };
    let missing: u64 = (0..bits.chunks())
        .filter(|i| !bits.has(*i))
        .map(|i| {
            let (start, end) = chunk_range(i, bits.size);
            end.min(bits.limit).min(size).saturating_sub(start)
        })
        .sum();
    size.saturating_sub(missing)
}

/// The answer for `path` before anything is known of it.
pub fn unknown(path: String) -> PrefetchFile {
    PrefetchFile {
        path,
        ino: None,
        size: 0,
        present_bytes: 0,
        error: None,
    }
}

/// One step for the file at `path` (see the module doc).
pub async fn step(store: Arc<Store>, fetcher: &Arc<Fetcher>, path: String) -> PrefetchFile {
    let mut file = unknown(path.clone());
    let looked = tokio::task::spawn_blocking(move || resolve(&store, &path)).await;
    let attr = match looked {
        Ok(Ok(attr)) => attr,
        Ok(Err(e)) => {
            file.error = Some(e.to_string());
            return file;
        }
        Err(e) => {
            file.error = Some(fs_err!(EIO, "the lookup failed: {e}").to_string());
            return file;
        }
    };
    file.ino = Some(attr.ino.0);
    file.size = attr.size;
    if attr.kind != FileKind::File {
        file.error = Some(
            fs_err!(
                EINVAL,
                "{} is not a regular file ({:?})",
                file.path,
                attr.kind
            )
            .to_string(),
        );
        return file;
    }
    match fetcher.prefetch_step(attr.ino, WINDOW).await {
        Ok(bits) => file.present_bytes = present_bytes(attr.size, bits.as_ref()),
        Err(e) => file.error = Some(e.to_string()),
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::model::Gid;

    #[test]
    fn present_bytes_count_present_chunks_and_clip_at_the_limit_and_size() {
        let size = 3 * CHUNK_SIZE + 100;
        let bits = |present: u64, limit: u64| PresentBits {
            gid: Gid([1; 16]),
            generation: 1,
            size,
            limit,
            present: vec![present],
            synced: Vec::new(),
        };
        assert_eq!(present_bytes(size, None), size);
        assert_eq!(present_bytes(size, Some(&bits(0, size))), 0);
        // Chunks 0 and 3 (the short one) present.
        assert_eq!(
            present_bytes(size, Some(&bits(0b1001, size))),
            CHUNK_SIZE + 100
        );
        // Truncated locally to 1.5 chunks: only chunk 0 and half of 1 count.
        let cut = CHUNK_SIZE + CHUNK_SIZE / 2;
        assert_eq!(present_bytes(cut, Some(&bits(0, cut))), 0);
        assert_eq!(present_bytes(cut, Some(&bits(0b1, cut))), CHUNK_SIZE);
    }
}
