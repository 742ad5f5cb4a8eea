//! Spare content files, made ahead of time.
//!
//! Every new regular file needs a new content file, and making a file is the
//! slowest step of `create`: the filesystem allocates an inode for it. On
//! ext4 without a journal that was measured at 40 µs to over 500 µs per
//! file once many files had been deleted (the allocator skips inodes freed
//! in the last minutes, one by one). So a background thread keeps a few
//! empty content files ready, each under a fresh inode number from the
//! store's counter, and `create` takes one: it opens it with the access
//! mode asked for and sets its times to now, instead of making a file while
//! the caller waits. When none is ready, `create` makes one itself as
//! before.
//!
//! Crash consistency is unchanged. A spare is a content file whose inode
//! was never committed, exactly like the file a `create` makes before its
//! transaction: the scan at start removes spares a crash left behind, and
//! [`Spares::stop`] removes them at a clean shutdown. Their numbers come
//! from the store's durable reservations, so no number is ever handed out
//! twice; a spare that is never used leaves a gap, nothing more. The filler
//! makes spares in small batches and syncs the content directory before it
//! offers a batch, so a file made from a spare has a durable directory
//! entry before any record naming it can be durable (a power cut cannot
//! leave its name pointing at nothing).
//!
//! The queue's lock is a leaf: held only to push, pop or look at the
//! queue, never while making a file or taking another lock.

use crate::content::ContentDir;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How many spare files the filler keeps ready.
const TARGET: usize = 64;
/// The filler starts again when the queue is down to this many.
const LOW_WATER: usize = TARGET / 2;
/// How long the filler waits after it failed to make a file.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Spares made before each sync of the content directory.
const BATCH: usize = 8;

/// Makes one spare: takes a new inode number and creates its content file.
pub type MakeSpare = Box<dyn Fn() -> io::Result<u64> + Send>;
/// Makes the names of the spares made so far durable (syncs the content
/// directory).
pub type SyncSpares = Box<dyn Fn() -> io::Result<()> + Send>;

/// The spare content files and the thread that makes them.
#[derive(Default)]
pub struct Spares {
    shared: Arc<Shared>,
    filler: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Inode numbers whose (empty) content file exists, oldest first.
    ready: VecDeque<u64>,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under this lock is one push, pop or flag: a panic
        // elsewhere cannot leave it half done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Spares {
    /// Start the filler thread, which makes spares with `make` and offers
    /// each batch after `sync`. Does nothing if it runs already.
    pub fn start(&self, make: MakeSpare, sync: SyncSpares) -> io::Result<()> {
        let mut filler = self.filler.lock().unwrap_or_else(|p| p.into_inner());
        if filler.is_some() {
            return Ok(());
        }
        self.shared.lock().stop = false;
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("keibi-spares".into())
            .spawn(move || fill(&shared, &*make, &*sync))?;
        *filler = Some(handle);
        Ok(())
    }

    /// Take a spare's inode number; its content file exists and is empty.
    /// Below [`LOW_WATER`] this wakes the filler.
    /// `None` when none is ready (or the filler does not run).
    pub fn take(&self) -> Option<u64> {
        let mut st = self.shared.lock();
        let ino = st.ready.pop_front()?;
        if st.ready.len() <= LOW_WATER {
            self.shared.wake.notify_one();
        }
        Some(ino)
    }

    /// How many spares are ready.
    #[cfg(test)]
    pub fn ready(&self) -> usize {
        self.shared.lock().ready.len()
    }

    /// The inode numbers of the spares ready now, oldest first.
    pub fn ready_list(&self) -> Vec<u64> {
        self.shared.lock().ready.iter().copied().collect()
    }

    /// Stop the filler, wait for it, and remove the spare files nobody
    /// took. Returns how many were removed.
    pub fn stop(&self, content: &ContentDir) -> usize {
        let handle = self.filler.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::warn!("the spare file thread panicked");
        }
        let left: Vec<u64> = self.shared.lock().ready.drain(..).collect();
        for &ino in &left {
            if let Err(e) = content.remove(ino, 0) {
                tracing::warn!(ino, error = %e, "cannot remove a spare content file");
            }
        }
        left.len()
    }
}

/// The filler: whenever the queue is down to [`LOW_WATER`], make spares
/// until there are [`TARGET`], offering them [`BATCH`] at a time after
/// `sync`.
fn fill(shared: &Shared, make: &dyn Fn() -> io::Result<u64>, sync: &dyn Fn() -> io::Result<()>) {
    let mut filling = true;
    let mut failing = false;
    loop {
        let want = {
            let mut st = shared.lock();
            loop {
                if st.stop {
                    return;
                }
                if st.ready.len() >= TARGET {
                    filling = false;
                }
                if filling || st.ready.len() <= LOW_WATER {
                    break;
                }
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            (TARGET - st.ready.len().min(TARGET)).clamp(1, BATCH)
        };
        filling = true;
        let mut batch = Vec::with_capacity(want);
        let mut made = Ok(());
        for _ in 0..want {
            match make() {
                Ok(ino) => batch.push(ino),
                Err(e) => {
                    made = Err(e);
                    break;
                }
            }
        }
        if !batch.is_empty() {
            match sync() {
                // Offered only once their names are durable.
                Ok(()) => shared.lock().ready.extend(batch),
                Err(e) => {
                    // Not offered: left for the scan at the next start.
                    made = Err(e);
                }
            }
        }
        match made {
            Ok(()) => {
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot make a spare content file; creates make their own");
                }
                failing = true;
                let st = shared.lock();
                if st.stop {
                    return;
                }
                drop(
                    shared
                        .wake
                        .wait_timeout(st, RETRY_AFTER)
                        .unwrap_or_else(|p| p.into_inner()),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn keeps_spares_ready_and_removes_the_rest_at_stop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content = Arc::new(ContentDir::new(dir.path()).expect("content dir"));
        let next = Arc::new(AtomicU64::new(100));
        let spares = Spares::default();
        assert_eq!(spares.take(), None, "nothing before the filler runs");
        let (c, n) = (content.clone(), next.clone());
        spares
            .start(
                Box::new(move || {
                    let ino = n.fetch_add(1, Ordering::SeqCst);
                    c.create(ino).map(|()| ino)
                }),
                Box::new(|| Ok(())),
            )
            .expect("start");
        wait_for("a full queue", || spares.ready() == TARGET);
        // Take every spare there is: the queue runs dry, which wakes the
        // filler, and it fills the queue up again.
        let mut taken = Vec::new();
        while let Some(ino) = spares.take() {
            assert_eq!(content.stat(ino, 0).expect("its content file").size, 0);
            taken.push(ino);
        }
        assert!(taken.len() >= TARGET);
        wait_for("the refill", || spares.ready() == TARGET);
        let mut unique = taken.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), taken.len(), "every number once");
        let ready = spares.ready_list();
        assert!(ready.iter().all(|ino| !taken.contains(ino)));
        assert_eq!(spares.stop(&content), TARGET);
        for ino in ready {
            assert!(content.stat(ino, 0).is_err(), "spare {ino} removed at stop");
        }
        for ino in taken {
            assert!(content.stat(ino, 0).is_ok(), "taken file {ino} kept");
        }
        assert_eq!(spares.take(), None);
    }

    #[test]
    fn a_failing_filler_leaves_creates_to_make_their_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content = ContentDir::new(dir.path()).expect("content dir");
        let tries = Arc::new(AtomicU64::new(0));
        let spares = Spares::default();
        let t = tries.clone();
        spares
            .start(
                Box::new(move || {
                    t.fetch_add(1, Ordering::SeqCst);
                    Err(io::Error::from_raw_os_error(libc::ENOSPC))
                }),
                Box::new(|| Ok(())),
            )
            .expect("start");
        wait_for("a try", || tries.load(Ordering::SeqCst) > 0);
        assert_eq!(spares.take(), None);
        let stopping = Instant::now();
        assert_eq!(spares.stop(&content), 0);
        assert!(
            stopping.elapsed() < RETRY_AFTER / 2,
            "stop does not wait out the retry pause"
        );
    }
}
