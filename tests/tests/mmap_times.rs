//! Times after a store through a shared mapping: a process maps a file
//! shared, reads and writes the mapping and exits; `stat` right after
//! shows the new mtime and ctime at once, as on a local disk (`make`,
//! rsync and backup tools compare them), with and without passthrough.
//!
//! The scenario waits 2 s between writing the file and mapping it: that
//! wait is part of what is tested (the kernel's cached attributes, taken
//! at open, are older than the store), not a synchronisation.

use harness::{Options, setup};
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LIMIT: Duration = Duration::from_secs(120);

/// In a child process: open `path` read-write, map 4 KiB shared, read the
/// first byte, `fstat` the file, store `byte` at offset 100, unmap and
/// exit (without msync, as most programs do). Only async-signal-safe calls
/// run after fork.
fn store_through_mapping(path: &Path, byte: u8) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path");
    // SAFETY: fork in a test process; the child makes only raw syscalls
    // (open, mmap, loads and stores in the new mapping, munmap, close) and
    // leaves with _exit, touching no lock or allocator state.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => unsafe {
            let fd = libc::open(c.as_ptr(), libc::O_RDWR);
            if fd < 0 {
                libc::_exit(2);
            }
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            if p == libc::MAP_FAILED {
                libc::_exit(3);
            }
            let bytes = p as *mut u8;
            let first = std::ptr::read_volatile(bytes);
            // Programs look at the size of what they mapped (Python's
            // mmap.size(), editors): this fetches attributes after the
            // mmap (which marked only atime stale) and before the store.
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 || st.st_size != 4096 {
                libc::_exit(4);
            }
            std::ptr::write_volatile(bytes.add(100), byte ^ first ^ first);
            libc::munmap(p, 4096);
            libc::close(fd);
            libc::_exit(0);
        },
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            assert_eq!(r, pid, "waitpid");
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "the mapping child failed (status {status:#x})"
            );
        }
    }
}

fn times(md: &fs::Metadata) -> ((i64, i64), (i64, i64)) {
    ((md.mtime(), md.mtime_nsec()), (md.ctime(), md.ctime_nsec()))
}

fn times_after_a_shared_mapping_store(passthrough: bool) {
    let (_w, fx) = setup(
        "mmap times",
        LIMIT,
        Options {
            passthrough,
            ..Options::default()
        },
    );
    let path = fx.path("mapped");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("create");
    f.write_all(&[1u8; 4096]).expect("write 4 KiB");
    f.sync_all().expect("fsync");
    drop(f);
    let before = times(&fs::metadata(&path).expect("stat"));

    std::thread::sleep(Duration::from_secs(2));
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    // stat first, as `make` does, so the kernel holds fresh attributes
    // when the file is mapped.
    assert_eq!(times(&fs::metadata(&path).expect("stat")), before);
    store_through_mapping(&path, 0x5a);
    let after = fs::metadata(&path).expect("stat right after the writer exited");
    let (mtime, ctime) = times(&after);
    assert!(
        mtime > before.0 && mtime.0 >= started,
        "mtime after the store: {mtime:?}, before: {:?} (the store began at {started})",
        before.0
    );
    assert!(
        ctime > before.1 && ctime.0 >= started,
        "ctime after the store: {ctime:?}, before: {:?}",
        before.1
    );
    assert_eq!(
        fs::read(&path).expect("read")[100],
        0x5a,
        "the store is in the file"
    );
    assert_passthrough(&fx, passthrough);
}

#[test]
fn times_after_a_shared_mapping_store_passthrough() {
    times_after_a_shared_mapping_store(true);
}

#[test]
fn times_after_a_shared_mapping_store_plain() {
    times_after_a_shared_mapping_store(false);
}

/// The passthrough variant runs with passthrough on (the kernel granted it
/// and no registration failed), the plain one with it off.
fn assert_passthrough(fx: &harness::KeibiFixture, on: bool) {
    let log = fx.mountd_log();
    if on {
        assert!(
            log.contains("FUSE passthrough enabled") && !log.contains("not usable here"),
            "passthrough must be on for this variant:\n{log}"
        );
    } else {
        assert!(log.contains("disabled by --no-passthrough"), "{log}");
    }
}
