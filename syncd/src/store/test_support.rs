//! Helpers shared by the store's and the sync engine's unit tests.

use super::Store;
use crate::opens::ConnId;
use ipc_schema::{Caller, Ino, Name};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// Open the store of `dir` again after the previous `Store` was dropped,
/// with `owner` as the share owner. sled releases its file lock only when
/// its I/O threads have finished the last writes of the dropped database,
/// a moment after the drop; until then opening fails with "could not
/// acquire lock", so poll for that (bounded).
pub fn reopen(dir: &Path, owner: (u32, u32)) -> Store {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Store::load(dir, owner) {
            Ok(s) => return s,
            Err(e) if e.message.contains("could not acquire lock") => {
                assert!(
                    Instant::now() < deadline,
                    "the dropped store kept its lock: {e}"
                );
                std::thread::yield_now();
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

/// A regular file `name` in `parent` holding `bytes`, created by `caller`
/// on `conn`, written and released (closed).
pub fn file_with(
    s: &Store,
    parent: Ino,
    name: &str,
    bytes: &[u8],
    caller: Caller,
    conn: ConnId,
) -> Ino {
    let f = s
        .create(
            parent,
            &Name::from(name),
            0o644,
            libc::O_RDWR | libc::O_CREAT,
            caller,
            conn,
        )
        .expect("create");
    std::fs::File::from(f.fd).write_all(bytes).expect("write");
    s.release(f.opened.handle).expect("release");
    f.opened.attr.ino
}
