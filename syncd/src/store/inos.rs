//! Inode numbers: handed out from durable reservations, so that no number
//! is ever handed out twice, even when a crash rolls the store back.
//!
//! sled writes its log in the background (every 500 ms), and a `kill -9`
//! or a power cut loses whatever it had not written. If the counter itself
//! were rolled back, numbers handed out after its last durable value would
//! be handed out again, and a number the kernel (or, later, a peer) still
//! knows could name another file. So the counter in `meta/next_ino` is a
//! *bound*: every number below it may have been handed out. Numbers are
//! handed out from memory up to the bound; when they run out, a new bound
//! [`BLOCK`] higher is written and flushed (`db.flush()`) *before* the
//! first number above the old bound is handed out. At start the next number
//! is the stored bound, so a crash costs at most one unused block.

use super::records::{META_NEXT_INO, be_u64};
use super::store_err;
use ipc_schema::{FsError, fs_err};
use std::sync::Mutex;

/// How many numbers one durable reservation covers.
pub const BLOCK: u64 = 1024;

/// The inode number allocator of one store. Its lock is a leaf, held
/// across the flush of a new reservation (one in [`BLOCK`] allocations).
pub struct InoAlloc {
    db: sled::Db,
    meta: sled::Tree,
    /// (next number to hand out, reserved bound: exclusive).
    state: Mutex<(u64, u64)>,
}

impl InoAlloc {
    /// The allocator of the store whose counter is in `meta`: numbers
    /// start at the stored bound (2 in a new store).
    pub fn load(db: sled::Db, meta: sled::Tree) -> Result<InoAlloc, FsError> {
        let stored = meta
            .get(META_NEXT_INO)
            .map_err(|e| store_err("reading the inode counter", e))?;
        let bound = match stored {
            None => 2,
            Some(v) => be_u64(&v)
                .filter(|&n| n >= 2)
                .ok_or_else(|| fs_err!(EIO, "inode counter is corrupt"))?,
        };
        Ok(InoAlloc {
            db,
            meta,
            state: Mutex::new((bound, bound)),
        })
    }

    /// A new inode number, never handed out before (not even by a run of
    /// syncd whose last writes a crash lost).
    pub fn alloc(&self) -> Result<u64, FsError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0 >= st.1 {
            let bound =
                st.0.checked_add(BLOCK)
                    .ok_or_else(|| fs_err!(ENOSPC, "inode numbers exhausted"))?;
            self.meta
                .insert(META_NEXT_INO, &bound.to_be_bytes())
                .map_err(|e| store_err("reserving inode numbers", e))?;
            self.db
                .flush()
                .map_err(|e| store_err("reserving inode numbers", e))?;
            st.1 = bound;
        }
        let n = st.0;
        st.0 += 1;
        Ok(n)
    }
}
