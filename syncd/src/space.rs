//! Room for the metadata store when the state filesystem is full.
//!
//! sled (0.34) gives up for good after one failed write of its own log: it
//! keeps the error and refuses every later operation until the process
//! restarts. Its log grows in the state directory's filesystem, and the
//! content files fill the same filesystem, written by mountd or, with FUSE
//! passthrough, by the kernel itself, so syncd cannot refuse a content
//! write. Without care a full disk would break the store: the next change
//! that needs a new block of log fails, and from then on even the `unlink`
//! that would free space answers `EIO`.
//!
//! So syncd keeps space that content cannot take, in two places:
//!
//! - **Headroom** in sled's log file (`<state>/db/db`): blocks allocated
//!   past its end with `fallocate(FALLOC_FL_KEEP_SIZE)` (and any hole
//!   inside it filled). sled's writes land in blocks its file already owns,
//!   so they need no free space. The file's size does not change, so sled
//!   reads exactly what it wrote; a crash leaves nothing to repair.
//! - **The reserve**, a file of its own (`<state>/space-reserve`), also
//!   allocated with `fallocate`. When the filesystem has no free block left
//!   for the headroom, the reserve is shrunk by what the headroom needs and
//!   the freed blocks are allocated to the log at once.
//!
//! At every start both are given back before sled opens its store (sled
//! writes a snapshot while it opens, which a full disk would refuse:
//! [`release_room`]) and allocated again after.
//!
//! A thread (`keibi-space`) tends both: it reads the log file's size and
//! allocated blocks (one `fstat`), allocates headroom back to the target
//! whenever it is down by a quarter (sled shrinks its file when its last
//! segments are free, which drops the headroom with them), and regrows the
//! reserve once the headroom is whole. It runs every [`EVERY`] and after
//! every [`CHECK_AFTER`] admitted changes, so the answer of [`Space::admit`]
//! lags sled's log by about that many changes at most (the thread may be
//! slower to run on a busy machine; the last quarter of room covers it).
//!
//! From the headroom and reserve left (both targets are [`room_for`] the
//! filesystem's size) it sets a level that every change requested through
//! the mount (and every version applied from a peer) reads, one atomic
//! load, before it starts:
//!
//! - *ok*: at least one target's worth is left: everything is admitted.
//! - *tight*: less than that (the disk is full and the reserve used up):
//!   changes that add to the store (create, mkdir, mknod, symlink, link,
//!   setxattr, versions from peers) get `ENOSPC`; the rest (unlink, rmdir,
//!   rename, setattr, truncate, removexattr) still run, so space can be
//!   freed.
//! - *critical*: less than a quarter of a target: every change requested
//!   gets `ENOSPC` but the unlink of a regular file that frees content (it
//!   has allocated blocks and no other link; `Store::admit_unlink`), so
//!   space can always be freed through the mount. What else keeps running
//!   is what frees (`release`, `forget`, the reclaim of freed inodes) and
//!   what writes nothing new (`fsync`), which the last quarter covers.
//!
//! Content that is freed returns blocks to the filesystem, the thread
//! allocates them to the headroom and the reserve, and the level comes
//! back to ok. This relies on the filesystem keeping allocated blocks
//! allocated when a file is overwritten, which holds for ext4, xfs and
//! tmpfs but not for copy-on-write filesystems (btrfs, ZFS), where the
//! headroom guarantees nothing.

use ipc_schema::{FsError, fs_err};
use nix::fcntl::{FallocateFlags, Flock, FlockArg, fallocate};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The reserve file, in the state directory.
pub const RESERVE_FILE: &str = "space-reserve";
/// Smallest headroom (and reserve): four of sled's 512 KiB segments.
const MIN_ROOM: u64 = 2 << 20;
/// Largest headroom (and reserve).
const MAX_ROOM: u64 = 16 << 20;
/// How often the thread looks when nothing wakes it.
const EVERY: Duration = Duration::from_millis(200);
/// What the reserve gives the headroom beyond what it misses.
const SLACK: u64 = 64 << 10;
/// Admitted changes between two looks of the thread.
const CHECK_AFTER: u32 = 32;

/// The headroom and the reserve each take a sixteenth of the filesystem,
/// between [`MIN_ROOM`] and [`MAX_ROOM`].
pub fn room_for(fs_bytes: u64) -> u64 {
    (fs_bytes / 16).clamp(MIN_ROOM, MAX_ROOM)
}

/// What a change asks of the store, for [`Space::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Adds records (create, mkdir, link, setxattr, a version from a
    /// peer): refused from *tight* on.
    Adds,
    /// Changes or removes records (unlink, rename, setattr): refused only
    /// when *critical* (see `Store::admit_unlink` for the exception).
    Frees,
}

/// How much room the store has left (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Everything is admitted.
    Ok = 0,
    /// Only changes that free are admitted.
    Tight = 1,
    /// No change requested is admitted.
    Critical = 2,
}

impl Level {
    fn from_u8(v: u8) -> Level {
        match v {
            0 => Level::Ok,
            1 => Level::Tight,
            _ => Level::Critical,
        }
    }
}

/// The level for `left` bytes of headroom and reserve, each targeted at
/// `room`.
fn level_of(left: u64, room: u64) -> Level {
    if left >= room {
        Level::Ok
    } else if left >= room / 4 {
        Level::Tight
    } else {
        Level::Critical
    }
}

/// Give back the room the last run kept, so that sled finds free space to
/// open its store (it writes a snapshot while it opens) even on a full
/// disk: remove the reserve file, and truncate sled's log `log_path` to
/// its own size, which frees the blocks allocated past its end (ext4 and
/// tmpfs drop them on a truncate to the same size) without changing a
/// byte. The truncate happens under sled's own lock (an exclusive `flock`
/// of the log file, which sled takes when it opens the store and holds
/// until its last write), so it never races a sled that still writes; if
/// the lock is taken the log is left alone. Before opening the store;
/// [`Space::start`] allocates both again.
pub fn release_room(state_dir: &Path, log_path: &Path) {
    let path = state_dir.join(RESERVE_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the space reserve")
        }
    }
    let trimmed = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(log_path)
        .and_then(|f| {
            let locked = Flock::lock(f, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| io::Error::from(e))?;
            let len = locked.metadata()?.len();
            locked.set_len(len)
            // The lock goes with the descriptor, before sled opens.
        });
    match trimmed {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
            tracing::debug!(path = %log_path.display(), "the store's log is locked; its headroom stays");
        }
        Err(e) => {
            tracing::warn!(path = %log_path.display(), error = %e, "cannot free the headroom of the store's log")
        }
    }
}

/// The headroom and reserve of one store, and the thread that tends them.
/// Dropping it stops the thread.
pub struct Space {
    /// `None` when they could not be set up (logged): all is admitted.
    shared: Option<Arc<Shared>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    /// sled's log file, open for writing (only `fallocate` uses it).
    log: File,
    /// The reserve file.
    reserve: File,
    /// Target of the headroom, and of the reserve.
    room: u64,
    /// A [`Level`].
    level: AtomicU8,
    /// Changes admitted, to wake the thread every [`CHECK_AFTER`].
    changes: AtomicU32,
    /// Set to stop the thread. A leaf lock: held only to read or set it,
    /// or while the thread waits on `wake`.
    stop: Mutex<bool>,
    wake: Condvar,
}

/// What one look found, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// Bytes allocated past the end of the log.
    pub headroom: u64,
    /// Bytes allocated to the reserve file.
    pub reserve: u64,
    /// The level they give.
    pub level: Level,
}

impl Space {
    /// A `Space` that admits everything and tends nothing.
    pub fn none() -> Space {
        Space {
            shared: None,
            thread: Mutex::new(None),
        }
    }

    /// Set up the headroom of sled's log `log_path` and the reserve in
    /// `state_dir`, sized for the filesystem, and start the thread. On a
    /// failure this logs a warning and returns a `Space` that admits
    /// everything: the store still works, without the protection.
    pub fn start(state_dir: &Path, log_path: &Path) -> Space {
        match Self::try_start(state_dir, log_path) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep room for the store on a full disk; it may fail when the disk fills");
                Space::none()
            }
        }
    }

    fn try_start(state_dir: &Path, log_path: &Path) -> io::Result<Space> {
        let fs = nix::sys::statvfs::statvfs(state_dir).map_err(io::Error::from)?;
        let fs_bytes = fs.blocks().saturating_mul(fs.fragment_size());
        let log = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(log_path)?;
        let reserve_path: PathBuf = state_dir.join(RESERVE_FILE);
        let reserve = OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&reserve_path)?;
        let shared = Arc::new(Shared {
            log,
            reserve,
            room: room_for(fs_bytes),
            level: AtomicU8::new(Level::Ok as u8),
            changes: AtomicU32::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        // A filesystem without fallocate ends here: run without the room.
        let first = shared.tend()?;
        tracing::info!(
            room = shared.room,
            headroom = first.headroom,
            reserve = first.reserve,
            level = ?first.level,
            "room kept for the store on a full disk"
        );
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("keibi-space".into())
            .spawn(move || s.run())?;
        Ok(Space {
            shared: Some(shared),
            thread: Mutex::new(Some(handle)),
        })
    }

    /// Admit a change requested through the mount or from a peer, or
    /// refuse it with `ENOSPC` when the store is short of room (see the
    /// module doc). One atomic load; every [`CHECK_AFTER`] calls it also
    /// wakes the thread.
    pub fn admit(&self, change: Change) -> Result<(), FsError> {
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        if sh.changes.fetch_add(1, Ordering::Relaxed) % CHECK_AFTER == CHECK_AFTER - 1 {
            sh.wake.notify_one();
        }
        match (Level::from_u8(sh.level.load(Ordering::Relaxed)), change) {
            (Level::Ok, _) | (Level::Tight, Change::Frees) => Ok(()),
            (level, _) => Err(fs_err!(
                ENOSPC,
                "the state directory is full: the room kept for the metadata store is {} ({change:?} refused); free space to continue",
                if level == Level::Tight {
                    "low"
                } else {
                    "almost used up"
                }
            )),
        }
    }

    /// Set the level, as the thread would (tests of what is admitted).
    #[cfg(test)]
    pub fn force_level(&self, level: Level) {
        if let Some(sh) = &self.shared {
            sh.level.store(level as u8, Ordering::Relaxed);
        }
    }

    /// Look now (the thread's work, done on the caller's thread) and say
    /// what is left.
    #[cfg(test)]
    pub fn tend_now(&self) -> Option<Room> {
        self.shared.as_ref().map(|s| s.tend().expect("look"))
    }
}

impl Drop for Space {
    fn drop(&mut self) {
        if let Some(sh) = &self.shared {
            *sh.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
            sh.wake.notify_all();
        }
        let handle = self
            .thread
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::warn!("the space thread panicked");
        }
    }
}

/// Bytes a file has allocated.
fn allocated(f: &File) -> io::Result<(u64, u64)> {
    let m = f.metadata()?;
    Ok((m.len(), m.blocks().saturating_mul(512)))
}

/// `fallocate` of `len` bytes at `offset`, keeping the size if `keep`.
fn allocate(f: &File, keep: bool, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    let mode = if keep {
        FallocateFlags::FALLOC_FL_KEEP_SIZE
    } else {
        FallocateFlags::empty()
    };
    fallocate(f, mode, offset, len).map_err(io::Error::from)
}

impl Shared {
    fn run(&self) {
        let mut failing = false;
        let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        while !*stop {
            drop(stop);
            match self.tend() {
                Ok(_) => failing = false,
                Err(e) => {
                    // The level stays as it was; the next look tries again.
                    if !failing {
                        tracing::warn!(error = %e, "cannot look after the room kept for the store");
                    }
                    failing = true;
                }
            }
            stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
            if *stop {
                break;
            }
            stop = self
                .wake
                .wait_timeout(stop, EVERY)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The headroom of the log: what it has allocated past its end, or 0
    /// while it has holes (then the whole file is allocated again).
    fn headroom(&self) -> io::Result<(u64, u64)> {
        let (size, alloc) = allocated(&self.log)?;
        Ok((size, alloc.saturating_sub(size)))
    }

    /// Top up the headroom (from the reserve if the filesystem has no
    /// free block), then the reserve, and set the level.
    fn tend(&self) -> io::Result<Room> {
        let now = self.look()?;
        let was = Level::from_u8(self.level.swap(now.level as u8, Ordering::Relaxed));
        if was != now.level {
            if now.level == Level::Ok {
                tracing::info!(
                    headroom = now.headroom,
                    reserve = now.reserve,
                    "the store has room again: every change is admitted"
                );
            } else {
                tracing::warn!(
                    headroom = now.headroom,
                    reserve = now.reserve,
                    level = ?now.level,
                    "the state directory is full: changes that need room get ENOSPC until space is freed"
                );
            }
        }
        Ok(now)
    }

    /// The work of [`Shared::tend`] but the level.
    fn look(&self) -> io::Result<Room> {
        let room = self.room;
        let (size, headroom) = self.headroom()?;
        if headroom < room - room / 4 {
            let whole = |size: u64, headroom: u64| {
                if headroom == 0 {
                    // Fill any hole sled left past the old headroom.
                    allocate(&self.log, true, 0, size + room)
                } else {
                    allocate(&self.log, true, size, room)
                }
            };
            if let Err(e) = whole(size, headroom) {
                if e.raw_os_error() != Some(libc::ENOSPC) {
                    return Err(e);
                }
                // The disk is full: hand blocks of the reserve over.
                let (_, reserve) = allocated(&self.reserve)?;
                // A little more than missing: tmpfs allocates all
                // of a range or nothing.
                let give = (room - headroom + SLACK).min(reserve);
                if give > 0 {
                    self.reserve.set_len(reserve - give)?;
                    let (size, headroom) = self.headroom()?;
                    // May fail again if content took the blocks first.
                    let _ = whole(size, headroom);
                }
            }
        } else {
            let (len, reserve) = allocated(&self.reserve)?;
            if reserve < room {
                // A full disk refuses some or all of it; the rest
                // comes at a later look.
                match allocate(&self.reserve, false, 0, room) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                        if len > reserve {
                            // Drop the part past what is allocated.
                            self.reserve.set_len(reserve)?;
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let (_, headroom) = self.headroom()?;
        let (_, reserve) = allocated(&self.reserve)?;
        let level = level_of(headroom + reserve, room);
        Ok(Room {
            headroom,
            reserve,
            level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn setup() -> (tempfile::TempDir, PathBuf, Space) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        std::fs::write(&log, vec![1u8; 100_000]).expect("a log");
        let space = Space::start(dir.path(), &log);
        (dir, log, space)
    }

    fn room(space: &Space) -> u64 {
        space.shared.as_ref().expect("started").room
    }

    #[test]
    fn sizes_scale_with_the_filesystem() {
        assert_eq!(room_for(0), MIN_ROOM);
        assert_eq!(room_for(64 << 20), 4 << 20);
        assert_eq!(room_for(1 << 40), MAX_ROOM);
    }

    #[test]
    fn levels_follow_what_is_left() {
        let room = 4 << 20;
        assert_eq!(level_of(2 * room, room), Level::Ok);
        assert_eq!(level_of(room, room), Level::Ok);
        assert_eq!(level_of(room - 1, room), Level::Tight);
        assert_eq!(level_of(room / 4, room), Level::Tight);
        assert_eq!(level_of(room / 4 - 1, room), Level::Critical);
        assert_eq!(level_of(0, room), Level::Critical);
    }

    #[test]
    fn admits_by_level() {
        let (_dir, _log, space) = setup();
        let sh = space.shared.as_ref().expect("started");
        for (level, adds, frees) in [
            (Level::Ok, true, true),
            (Level::Tight, false, true),
            (Level::Critical, false, false),
        ] {
            sh.level.store(level as u8, Ordering::Relaxed);
            assert_eq!(space.admit(Change::Adds).is_ok(), adds, "{level:?}");
            match space.admit(Change::Frees) {
                Ok(()) => assert!(frees, "{level:?}"),
                Err(e) => {
                    assert!(!frees, "{level:?}");
                    assert_eq!(e.errno, libc::ENOSPC);
                }
            }
        }
        assert!(Space::none().admit(Change::Adds).is_ok());
    }

    #[test]
    fn keeps_headroom_past_the_end_of_the_log_and_a_reserve() {
        let (dir, log, space) = setup();
        let room = room(&space);
        let r = space.tend_now().expect("started");
        assert_eq!(r.level, Level::Ok);
        assert!(r.headroom >= room, "{r:?}");
        assert!(r.reserve >= room, "{r:?}");
        assert_eq!(
            std::fs::metadata(&log).expect("log").len(),
            100_000,
            "the log's size is left alone"
        );
        assert!(dir.path().join(RESERVE_FILE).exists());
        // sled appends into the headroom: it is allocated back.
        let f = OpenOptions::new().write(true).open(&log).expect("open");
        f.write_all_at(&vec![2u8; (room - room / 8) as usize], 100_000)
            .expect("append");
        let size = std::fs::metadata(&log).expect("log").len();
        let r = space.tend_now().expect("started");
        assert!(r.headroom >= room, "topped up after an append: {r:?}");
        assert_eq!(std::fs::metadata(&log).expect("log").len(), size);
        // sled truncates its file, dropping the headroom: allocated again.
        f.set_len(50_000).expect("truncate");
        let r = space.tend_now().expect("started");
        assert!(r.headroom >= room, "topped up after a truncate: {r:?}");
        assert_eq!(std::fs::read(&log).expect("read").len(), 50_000);
        // Both go before the store opens; the log keeps its bytes.
        drop(space);
        release_room(dir.path(), &log);
        assert!(!dir.path().join(RESERVE_FILE).exists());
        let (size, alloc) = allocated(&File::open(&log).expect("log")).expect("stat");
        assert_eq!(size, 50_000);
        assert!(
            alloc < 50_000 + 4096,
            "headroom freed: {alloc} bytes allocated"
        );
        assert_eq!(
            std::fs::read(&log).expect("read")[..],
            vec![1u8; 50_000][..]
        );
        release_room(dir.path(), &log);
    }

    #[test]
    fn a_log_that_sled_holds_is_left_alone() {
        let (dir, log, space) = setup();
        let room = room(&space);
        drop(space);
        let held = Flock::lock(
            File::open(&log).expect("open"),
            FlockArg::LockExclusiveNonblock,
        )
        .map_err(|(_, e)| e)
        .expect("lock as sled does");
        release_room(dir.path(), &log);
        let (size, alloc) = allocated(&File::open(&log).expect("log")).expect("stat");
        assert_eq!(size, 100_000);
        assert!(
            alloc >= size + room,
            "headroom kept: {alloc} bytes allocated"
        );
        drop(held);
        release_room(dir.path(), &log);
        let (_, alloc) = allocated(&File::open(&log).expect("log")).expect("stat");
        assert!(
            alloc < 100_000 + 4096,
            "headroom freed once unlocked: {alloc}"
        );
    }
}
