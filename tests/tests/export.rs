//! File handles (`name_to_handle_at`/`open_by_handle_at`) on the mount:
//! keibi's inode numbers are stable and never reused, and mountd asks the
//! kernel for FUSE export support, so a handle taken on the mount opens
//! the same file or directory after the kernel dropped its caches and
//! after a remount (a new mountd, whose kernel inode cache starts empty),
//! and a handle of a deleted file gives `ESTALE`.
//!
//! NFS re-export itself is not tested: this kernel has no NFS server
//! (`CONFIG_NFSD` is not set).

use harness::{KeibiFixture, Options, assert_errno, setup};
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

/// `struct file_handle` with room for any handle FUSE makes.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 128],
}

fn handle_of(path: &Path) -> FileHandle {
    let c = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    let mut h = FileHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let mut mount_id = 0;
    // SAFETY: `h` is a file_handle with 128 bytes of room, as handle_bytes
    // says; both pointers live across the call.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            c.as_ptr(),
            (&mut h as *mut FileHandle).cast::<libc::file_handle>(),
            &mut mount_id,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at({}): {}",
        path.display(),
        io::Error::last_os_error()
    );
    h
}

fn open_by_handle(mount: &File, h: &FileHandle, flags: i32) -> io::Result<File> {
    let mut copy = FileHandle {
        handle_bytes: h.handle_bytes,
        handle_type: h.handle_type,
        f_handle: h.f_handle,
    };
    // SAFETY: as above; the kernel reads the handle and returns a new fd
    // that we own.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&mut copy as *mut FileHandle).cast::<libc::file_handle>(),
            flags | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn drop_kernel_caches() {
    fs::write("/proc/sys/vm/drop_caches", b"2").expect("echo 2 > /proc/sys/vm/drop_caches");
}

struct Handles {
    file: FileHandle,
    dir: FileHandle,
    deleted: FileHandle,
    file_ino: u64,
    dir_ino: u64,
}

/// Every handle opens what it named (the deleted one: ESTALE).
fn check_handles(fx: &KeibiFixture, h: &Handles, when: &str) {
    let mount = File::open(fx.mnt()).expect("open the mount's root");
    let mut f = open_by_handle(&mount, &h.file, libc::O_RDONLY)
        .unwrap_or_else(|e| panic!("{when}: open_by_handle_at of the file: {e}"));
    let mut text = String::new();
    f.read_to_string(&mut text).expect("read");
    assert_eq!(text, "handle me", "{when}: contents");
    assert_eq!(f.metadata().expect("fstat").ino(), h.file_ino, "{when}");

    let d = open_by_handle(&mount, &h.dir, libc::O_RDONLY | libc::O_DIRECTORY)
        .unwrap_or_else(|e| panic!("{when}: open_by_handle_at of the directory: {e}"));
    assert_eq!(d.metadata().expect("fstat").ino(), h.dir_ino, "{when}");
    let names: Vec<_> = fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd()))
        .expect("list the directory through its fd")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec!["f"], "{when}: the directory's entries");

    assert_errno(
        open_by_handle(&mount, &h.deleted, libc::O_RDONLY),
        libc::ESTALE,
        &format!("{when}: open_by_handle_at of a deleted file"),
    );
}

fn handles_outlive_the_kernel_caches(passthrough: bool) {
    let (_w, mut fx) = setup(
        "file handles",
        LIMIT,
        Options {
            passthrough,
            ..Options::default()
        },
    );
    fs::create_dir(fx.path("d")).expect("mkdir");
    fs::write(fx.path("d/f"), "handle me").expect("write");
    fs::write(fx.path("gone"), "bye").expect("write");
    let h = Handles {
        file: handle_of(&fx.path("d/f")),
        dir: handle_of(&fx.path("d")),
        deleted: handle_of(&fx.path("gone")),
        file_ino: fs::metadata(fx.path("d/f")).expect("stat").ino(),
        dir_ino: fs::metadata(fx.path("d")).expect("stat").ino(),
    };
    fs::remove_file(fx.path("gone")).expect("unlink");

    drop_kernel_caches();
    check_handles(&fx, &h, "after drop_caches");
    assert_passthrough(&fx, passthrough);

    // A new mountd and a new mount: the kernel knows no inode of it yet,
    // so every handle is resolved by asking mountd for the inode number.
    fx.restart_mountd();
    check_handles(&fx, &h, "after a remount");
}

#[test]
fn handles_outlive_the_kernel_caches_passthrough() {
    handles_outlive_the_kernel_caches(true);
}

#[test]
fn handles_outlive_the_kernel_caches_plain() {
    handles_outlive_the_kernel_caches(false);
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
