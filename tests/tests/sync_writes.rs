//! `O_SYNC` and `O_DSYNC` writes are durable when `write` returns: the
//! file's name (syncd's store) and its bytes (the content file).
//!
//! Each check opens a file with the flag, writes, and the moment `write`
//! returns SIGKILLs keibi-syncd (in the `kill_both` variants keibi-mountd
//! too), then starts the daemons again: the name must be there with all
//! its bytes. The kill comes within microseconds of the write, far inside
//! the store's 0.5 s background flush, so only a flush made before `write`
//! returned can keep the name. With passthrough the kernel syncs the
//! content file itself and never asks keibi, which is why syncd flushes its
//! store when it answers an open with either flag.
//!
//! A process kill leaves the page cache intact, so it cannot show that the
//! bytes reached the disk. For that the test reads the content file's page
//! cache state with `cachestat(2)` right after the write: no dirty page and
//! none under writeback, i.e. the bytes were written and waited for, as
//! `fsync` would.
//!
//! Every variant runs with and without passthrough and checks which of the
//! two really served the opens.

use harness::{KeibiFixture, Options, Pattern, poll_until, setup, sys};
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);
/// Rounds of create, write, kill, restart per variant.
const ROUNDS: usize = 3;
/// Bytes written per file (not a multiple of the page size, so the last
/// page is partial).
const LEN: usize = 3 * 4096 + 123;

/// `cachestat(2)` (Linux 6.5): page cache state of a file's range.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default, Debug)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The syscall number of `cachestat` (the same on every architecture that
/// uses the common table).
const SYS_CACHESTAT: libc::c_long = 451;

fn cachestat(f: &fs::File) -> Cachestat {
    let range = CachestatRange { off: 0, len: 0 };
    let mut cs = Cachestat::default();
    // SAFETY: a descriptor we own, a valid range struct and a valid output
    // struct of the layout the kernel expects; flags 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "cachestat: {} (the test needs Linux 6.5 or later)",
        std::io::Error::last_os_error()
    );
    cs
}

/// Whether the kill takes mountd down with syncd.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kill {
    Syncd,
    Both,
}

/// Create `rel` with `flags` (plus `O_CREAT|O_EXCL|O_WRONLY`), write `data`
/// with one `write`, and the moment it returns kill the daemons. Returns
/// the file's inode number.
fn write_then_kill(
    fx: &mut KeibiFixture,
    rel: &str,
    flags: libc::c_int,
    data: &[u8],
    kill: Kill,
) -> u64 {
    let mut f = sys::open(
        &fx.path(rel),
        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | flags,
        0o644,
    )
    .unwrap_or_else(|e| panic!("create {rel}: {e}"));
    let ino = f.metadata().expect("fstat").ino();
    f.write_all(data).expect("write");
    crash(fx, kill);
    drop(f);
    ino
}

fn crash(fx: &mut KeibiFixture, kill: Kill) {
    fx.kill9_syncd();
    if kill == Kill::Both {
        fx.kill9_mountd();
        // Take the dead mount away here, so that only the new mountd's
        // mount can satisfy the restart's wait (a new mountd clearing a
        // dead mount is `liveness.rs`'s subject, not this file's).
        harness::mounts::detach_all(&fx.mnt());
    }
}

fn restart(fx: &mut KeibiFixture, kill: Kill) {
    fx.start_syncd();
    if kill == Kill::Both {
        fx.start_mountd();
    }
    fx.wait_writable(Duration::from_secs(20));
}

/// The content file of `ino` under syncd's state directory has no dirty
/// page and none under writeback.
fn content_is_clean(fx: &KeibiFixture, ino: u64, what: &str) {
    let path = fx.state_dir().join("content").join(format!("{ino:016x}"));
    let f = fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let cs = cachestat(&f);
    assert!(
        cs.nr_dirty == 0 && cs.nr_writeback == 0,
        "{what}: the content file still has unwritten pages when write returned: {cs:?}"
    );
}

fn assert_there(fx: &KeibiFixture, rel: &str, ino: u64, data: &[u8], what: &str) {
    let p = fx.path(rel);
    let md =
        fs::metadata(&p).unwrap_or_else(|e| panic!("{what}: {rel} is gone after the crash: {e}"));
    assert_eq!(
        (md.ino(), md.len()),
        (ino, data.len() as u64),
        "{what}: {rel} after the crash"
    );
    let got = fs::read(&p).unwrap_or_else(|e| panic!("{what}: read {rel}: {e}"));
    assert!(got == data, "{what}: {rel} has other bytes after the crash");
}

fn sync_writes_survive(fx: &mut KeibiFixture, flag: libc::c_int, kill: Kill) {
    let flag_name = if flag == libc::O_SYNC {
        "O_SYNC"
    } else {
        "O_DSYNC"
    };
    for round in 0..ROUNDS {
        let what = format!("{flag_name} round {round}");
        let rel = format!("sync-{round}");
        let data = Pattern::new(round as u64 + 1).bytes(0, LEN);
        let ino = write_then_kill(fx, &rel, flag, &data, kill);
        content_is_clean(fx, ino, &what);
        restart(fx, kill);
        assert_there(fx, &rel, ino, &data, &what);
    }

    // A file created without the flag, then opened with it: the first
    // synchronous write makes the name durable too.
    let what = format!("{flag_name} on a file created without it");
    let p = fx.path("late");
    fs::File::create(&p).expect("create late");
    let mut f = sys::open(&p, libc::O_WRONLY | libc::O_APPEND | flag, 0).expect("open late");
    let ino = f.metadata().expect("fstat").ino();
    let data = Pattern::new(99).bytes(0, LEN);
    f.write_all(&data).expect("write late");
    crash(fx, kill);
    drop(f);
    content_is_clean(fx, ino, &what);
    restart(fx, kill);
    assert_there(fx, "late", ino, &data, &what);

    // One more open after the last restart, so the I/O path check sees an
    // open of the current mountd in every variant.
    let n = poll_until("the files to list", Duration::from_secs(10), || {
        fs::read_dir(fx.mnt()).ok().map(|d| d.count())
    });
    assert!(n > ROUNDS, "all files listed ({n})");
    let check = fs::read(fx.path("sync-0")).expect("read sync-0");
    assert_eq!(check.len(), LEN);
    fx.assert_io_path();
}

/// `$name::{passthrough, plain}` with `flag` and `kill`.
macro_rules! variants {
    ($name:ident, $flag:expr, $kill:expr) => {
        mod $name {
            use super::*;

            #[test]
            fn passthrough() {
                let (_w, mut fx) = setup(
                    concat!(stringify!($name), "::passthrough"),
                    LIMIT,
                    Options::default(),
                );
                sync_writes_survive(&mut fx, $flag, $kill);
            }

            #[test]
            fn plain() {
                let (_w, mut fx) = setup(
                    concat!(stringify!($name), "::plain"),
                    LIMIT,
                    Options {
                        passthrough: false,
                        ..Options::default()
                    },
                );
                sync_writes_survive(&mut fx, $flag, $kill);
            }
        }
    };
}

variants!(o_sync_kill_syncd, libc::O_SYNC, Kill::Syncd);
variants!(o_dsync_kill_syncd, libc::O_DSYNC, Kill::Syncd);
variants!(o_sync_kill_both, libc::O_SYNC, Kill::Both);
variants!(o_dsync_kill_both, libc::O_DSYNC, Kill::Both);
