//! Helpers of the two-node sync tests: waiting for a file to arrive,
//! writing patterned files, reading with a bound and an errno, and
//! checking that no task of a process is stuck in `D` state.

use crate::data::Pattern;
use crate::tree::blake3_file;
use crate::wait::{bounded, poll_until};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a change may take to show on the other node in these tests
/// (debug builds on a 2-core machine; the goal on loopback is far less,
/// measured by bench/sync.sh, not here).
pub const PROPAGATION: Duration = Duration::from_secs(60);

/// Bytes of a chunk (syncd's `CHUNK_SIZE`).
pub const CHUNK: u64 = 256 * 1024;

/// Write `len` bytes of `Pattern::new(seed)` to a new file at `path`
/// (1 MiB writes), close it; returns the BLAKE3 of the bytes, hex.
pub fn write_pattern(path: &Path, seed: u64, len: u64) -> String {
    let p = Pattern::new(seed);
    let mut f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(1 << 20) as usize;
        let buf = p.bytes(off, n);
        f.write_all(&buf)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        h.update(&buf);
        off += n as u64;
    }
    drop(f);
    h.finalize().to_hex().to_string()
}

/// BLAKE3 of `len` bytes of `Pattern::new(seed)`, with `patch` written at
/// `at` over them.
pub fn pattern_hash_with(seed: u64, len: u64, at: u64, patch: &[u8]) -> String {
    let p = Pattern::new(seed);
    let mut h = blake3::Hasher::new();
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(1 << 20) as usize;
        let mut buf = p.bytes(off, n);
        let (s, e) = (off, off + n as u64);
        let (ps, pe) = (at, at + patch.len() as u64);
        if ps < e && pe > s {
            let from = ps.max(s);
            let to = pe.min(e);
            buf[(from - s) as usize..(to - s) as usize]
                .copy_from_slice(&patch[(from - ps) as usize..(to - ps) as usize]);
        }
        h.update(&buf);
        off = e;
    }
    h.finalize().to_hex().to_string()
}

/// Overwrite `bytes` at `offset` of the existing file `path`, then close.
pub fn patch_file(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(bytes, offset)
        .unwrap_or_else(|e| panic!("pwrite {}: {e}", path.display()));
}

/// Poll until the file at `path` reads as exactly `content`.
#[track_caller]
pub fn wait_content(path: &Path, content: &[u8], timeout: Duration) {
    poll_until(
        &format!(
            "{} to read as the expected {} bytes",
            path.display(),
            content.len()
        ),
        timeout,
        || (std::fs::read(path).ok().as_deref() == Some(content)).then_some(()),
    );
}

/// Poll until `stat` of `path` shows `size` bytes.
#[track_caller]
pub fn wait_size(path: &Path, size: u64, timeout: Duration) {
    poll_until(
        &format!("{} to show size {size}", path.display()),
        timeout,
        || (std::fs::metadata(path).ok()?.len() == size).then_some(()),
    );
}

/// Poll until the content of `path` hashes to `hash` (BLAKE3 hex).
#[track_caller]
pub fn wait_hash(path: &Path, hash: &str, timeout: Duration) {
    poll_until(
        &format!("{} to hash to {}", path.display(), &hash[..16]),
        timeout,
        || (blake3_file(path).ok().as_deref() == Some(hash)).then_some(()),
    );
}

/// Poll until nothing is at `path` (`lstat` says ENOENT).
#[track_caller]
pub fn wait_gone(path: &Path, timeout: Duration) {
    poll_until(&format!("{} to be gone", path.display()), timeout, || {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(()),
            _ => None,
        }
    });
}

/// Read the whole file at `path` on another thread, bounded by `limit`:
/// `Ok(Ok(len))` when it read, `Ok(Err(errno))` when the read failed, and
/// `Err(elapsed)` when it was still blocked after `limit`; with the time
/// the read took.
pub fn read_all_bounded(
    path: &Path,
    limit: Duration,
) -> (Result<Result<u64, i32>, Duration>, Duration) {
    let path: PathBuf = path.to_path_buf();
    let t0 = Instant::now();
    let r = bounded(limit, move || {
        let mut f = std::fs::File::open(&path).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
        std::io::copy(&mut f, &mut std::io::sink()).map_err(|e| e.raw_os_error().unwrap_or(-1))
    });
    (r, t0.elapsed())
}

/// The tasks (threads) of `pid` whose state is `D` (uninterruptible
/// sleep), as "tid (name)".
pub fn tasks_in_d_state(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // "tid (comm) S ...": the state follows the last ')'.
            let close = stat.rfind(')')?;
            let state = stat[close + 1..].split_whitespace().next()?;
            (state == "D")
                .then(|| format!("{} {}", t.file_name().to_string_lossy(), &stat[..=close]))
        })
        .collect()
}

/// The `not_local` entry of `keibictl status --files --json` whose path
/// ends with `name`, if any.
pub fn not_local_entry(files: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    let list = match files {
        serde_json::Value::Array(v) => v.clone(),
        other => other["files"].as_array().cloned().unwrap_or_default(),
    };
    list.into_iter()
        .find(|f| f["path"].as_str().is_some_and(|p| p.ends_with(name)))
}
