//! Removing what is left of freed inodes, in the only safe order: first the
//! store change that stopped naming the inode is made durable, then its
//! content file and extended attributes go.
//!
//! Why. The transaction that frees an inode (the last unlink, a rename
//! over it, an orphan's last release) is in sled's memory until sled
//! writes its log (every 500 ms, or at a flush); a content file that is
//! unlinked is gone at once. If syncd dies between the two (`kill -9`, a
//! power cut), the store comes back with the *old* state, which names the
//! inode, and its content is gone: `EIO` where a local disk gives the old
//! or the new version of a file replaced by `rename`. So a freed inode is
//! queued here, and one background thread takes the whole queue, calls
//! `db.flush()` (sled recovers a prefix of its log, so after the flush
//! every freeing transaction that came before it survives any crash) and
//! only then removes the content files and the extended attributes.
//! Flushes are batched: everything freed while one flush runs goes with the
//! next one.
//!
//! A crash before the removals leaves content files nobody names and
//! extended attributes of inodes without a record; the store's start-up
//! scan removes both ([`super::Store::load`]). A clean shutdown drains the
//! queue ([`Reclaimer::drain`]).
//!
//! The queue's lock is a leaf: held only to push to or take the queue,
//! never across the flush or a removal.

use crate::content::ContentDir;
use ipc_schema::FileKind;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::records::ino_key;

/// How long the thread waits before trying again after a failed flush.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest [`Reclaimer::settle`] waits.
const SETTLE_AT_MOST: Duration = Duration::from_secs(10);

/// Something freed, to remove after the flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freed {
    /// A freed inode: its content file (generation `generation`, for a
    /// regular file) and its extended attributes.
    Inode {
        /// The inode.
        ino: u64,
        /// Its kind.
        kind: FileKind,
        /// Its content generation when freed.
        generation: u64,
    },
    /// A content generation that is no longer current and no longer open.
    Generation {
        /// The inode.
        ino: u64,
        /// The generation.
        generation: u64,
    },
}

/// What the thread needs: the database to flush and what to remove.
#[derive(Clone)]
pub struct Target {
    /// The database (its `flush` makes the freeing transactions durable).
    pub db: sled::Db,
    /// The `xattrs` tree.
    pub xattrs: sled::Tree,
    /// The content directory.
    pub content: Arc<ContentDir>,
}

/// The queue of freed inodes and the thread that reclaims them.
pub struct Reclaimer {
    shared: Arc<Shared>,
    target: Target,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the thread (work or stop).
    wake: Condvar,
    /// Wakes those waiting for the queue to empty.
    idle: Condvar,
}

#[derive(Default)]
struct State {
    queue: Vec<Freed>,
    /// The thread holds a batch it has not finished.
    busy: bool,
    stop: bool,
    /// Tests: the thread takes nothing while set.
    #[cfg(test)]
    held: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under this lock is a push, a take or a flag.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Reclaimer {
    /// Start the reclaim thread for `target`.
    pub fn start(target: Target) -> std::io::Result<Reclaimer> {
        let shared = Arc::new(Shared::default());
        let (s, t) = (shared.clone(), target.clone());
        let handle = std::thread::Builder::new()
            .name("keibi-reclaim".into())
            .spawn(move || run(&s, &t))?;
        Ok(Reclaimer {
            shared,
            target,
            thread: Mutex::new(Some(handle)),
        })
    }

    /// Queue `freed`. After [`Reclaimer::drain`] (no thread any more) it
    /// is reclaimed here and now, in the same order: flush first.
    pub fn push(&self, freed: Freed) {
        let mut st = self.shared.lock();
        if !st.stop {
            st.queue.push(freed);
            self.shared.wake.notify_one();
            return;
        }
        drop(st);
        if reclaim(&self.target, &[freed]).is_err() {
            // Left for the start-up scan.
        }
    }

    /// Tests: stop (`true`) or let go (`false`) the thread, to see what
    /// is still there before it runs.
    #[cfg(test)]
    pub fn hold(&self, held: bool) {
        self.shared.lock().held = held;
        self.shared.wake.notify_all();
    }

    /// Wait until everything queued so far has been reclaimed, at most
    /// [`SETTLE_AT_MOST`] (a store that cannot flush never settles).
    /// Returns whether it did.
    pub fn settle(&self) -> bool {
        let deadline = std::time::Instant::now() + SETTLE_AT_MOST;
        let mut st = self.shared.lock();
        while (!st.queue.is_empty() || st.busy) && !st.stop {
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
                return false;
            };
            st = self
                .shared
                .idle
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Reclaim what is queued, stop the thread and wait for it (a clean
    /// shutdown). Later pushes are reclaimed at once by the caller.
    pub fn drain(&self) {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::warn!("the reclaim thread panicked");
        }
        let left: Vec<_> = std::mem::take(&mut self.shared.lock().queue);
        if !left.is_empty() {
            let _ = reclaim(&self.target, &left);
        }
        self.shared.idle.notify_all();
    }
}

/// The thread: take the whole queue, flush, remove; until stopped with an
/// empty queue.
fn run(shared: &Shared, target: &Target) {
    loop {
        let batch = {
            let mut st = shared.lock();
            loop {
                #[cfg(test)]
                let held = st.held && !st.stop;
                #[cfg(not(test))]
                let held = false;
                if !st.queue.is_empty() && !held {
                    break;
                }
                if st.stop {
                    return;
                }
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.busy = true;
            std::mem::take(&mut st.queue)
        };
        let done = reclaim(target, &batch);
        let mut st = shared.lock();
        st.busy = false;
        if done.is_err() {
            // Keep them (the content is still named by nothing durable
            // yet); try again after a pause, or at the next start.
            st.queue.extend(batch);
            if !st.stop {
                drop(
                    shared
                        .wake
                        .wait_timeout(st, RETRY_AFTER)
                        .unwrap_or_else(|p| p.into_inner()),
                );
            } else {
                // Stopping with a store that cannot flush: the start-up
                // scan collects the rest.
                st.queue.clear();
                shared.idle.notify_all();
                return;
            }
            continue;
        }
        if st.queue.is_empty() {
            shared.idle.notify_all();
        }
    }
}

/// Flush the store, then remove the content files and extended attributes
/// of `batch`. Err: the flush failed and nothing was removed.
fn reclaim(target: &Target, batch: &[Freed]) -> Result<(), ()> {
    if let Err(e) = target.db.flush() {
        tracing::warn!(
            error = %e,
            inodes = batch.len(),
            "cannot flush the store; freed inodes keep their content files for now"
        );
        return Err(());
    }
    if batch.iter().any(|f| matches!(f, Freed::Generation { .. }))
        && let Err(e) = target.content.sync_dir()
    {
        // The new generation's name must be durable before the old one
        // goes; try again later.
        tracing::warn!(error = %e, "cannot sync the content directory; old generations stay for now");
        return Err(());
    }
    for &freed in batch {
        match freed {
            Freed::Inode {
                ino,
                kind,
                generation,
            } => {
                if kind == FileKind::File
                    && let Err(e) = target.content.remove(ino, generation)
                {
                    tracing::warn!(ino, error = %e, "cannot remove the content file of a freed inode");
                }
                remove_xattrs(&target.xattrs, ino);
            }
            Freed::Generation { ino, generation } => {
                if let Err(e) = target.content.remove(ino, generation) {
                    tracing::warn!(ino, generation, error = %e, "cannot remove an old content generation");
                }
            }
        }
    }
    Ok(())
}

/// Remove every extended attribute of `ino` (whose record is gone).
pub fn remove_xattrs(xattrs: &sled::Tree, ino: u64) {
    for item in xattrs.scan_prefix(ino_key(ino)) {
        match item {
            Ok((k, _)) => {
                if let Err(e) = xattrs.remove(k) {
                    tracing::warn!(ino, error = %e, "cannot remove an xattr of a freed inode");
                }
            }
            Err(e) => {
                tracing::warn!(ino, error = %e, "cannot list the xattrs of a freed inode");
                break;
            }
        }
    }
}
