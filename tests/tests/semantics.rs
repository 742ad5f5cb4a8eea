//! Claims of `docs/semantics.md` that no other test covers, checked on a
//! real mount: `O_DIRECT` (aligned and unaligned), POSIX ACLs,
//! `copy_file_range` (the syscall and `cp`), and symlink targets.
//!
//! Data-path checks run with and without passthrough and check which of
//! the two served the opens.

use harness::{KeibiFixture, Options, Pattern, assert_errno, run_bounded, setup, sys};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
/// Alignment and size unit for `O_DIRECT` (the page size; a multiple of
/// every block size the state directory may have).
const ALIGN: usize = 4096;

/// Define `$name::passthrough` and `$name::plain` running `$body(&fx)`,
/// then checking the I/O path the opens took.
macro_rules! both_modes {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;

            #[test]
            fn passthrough() {
                let (_w, fx) = setup(
                    concat!(stringify!($name), "::passthrough"),
                    LIMIT,
                    Options::default(),
                );
                $body(&fx);
                fx.assert_io_path();
            }

            #[test]
            fn plain() {
                let (_w, fx) = setup(
                    concat!(stringify!($name), "::plain"),
                    LIMIT,
                    Options {
                        passthrough: false,
                        ..Options::default()
                    },
                );
                $body(&fx);
                fx.assert_io_path();
            }
        }
    };
}

/// A zeroed heap buffer aligned to [`ALIGN`].
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = Layout::from_size_align(len, ALIGN).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation of {len} bytes failed");
        Aligned { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// `O_DIRECT`: page-aligned reads and writes work and are coherent with a
/// buffered descriptor of the same file. Unaligned ones work without
/// passthrough and follow the content file's filesystem with it (see
/// below).
fn o_direct(fx: &KeibiFixture) {
    let p = fx.path("direct");
    let len = 4 * ALIGN;
    let old = Pattern::new(1).bytes(0, len);
    fs::write(&p, &old).expect("write with buffered I/O");
    let buffered = OpenOptions::new()
        .read(true)
        .open(&p)
        .expect("open buffered");
    let mut seen = vec![0u8; len];
    buffered
        .read_exact_at(&mut seen, 0)
        .expect("buffered read (fills the page cache)");
    assert!(seen == old);

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .expect("open O_DIRECT");
    let new = Pattern::new(2).bytes(0, 2 * ALIGN);
    let mut buf = Aligned::new(2 * ALIGN);
    buf.as_mut().copy_from_slice(&new);
    f.write_all_at(buf.as_mut(), ALIGN as u64)
        .expect("aligned O_DIRECT write");
    let mut back = Aligned::new(len);
    f.read_exact_at(back.as_mut(), 0)
        .expect("aligned O_DIRECT read");
    let mut want = old.clone();
    want[ALIGN..3 * ALIGN].copy_from_slice(&new);
    assert!(
        back.as_mut() == &want[..],
        "O_DIRECT reads what O_DIRECT wrote"
    );
    buffered
        .read_exact_at(&mut seen, 0)
        .expect("buffered read after the O_DIRECT write");
    assert!(
        seen == want,
        "a buffered descriptor sees the O_DIRECT write (no stale page cache)"
    );

    // Unaligned offsets, lengths and buffer addresses. Without
    // passthrough mountd serves O_DIRECT with `pread`/`pwrite` on a
    // descriptor that is not `O_DIRECT`: anything goes. With passthrough
    // the kernel does direct I/O on the content file, so the mount accepts
    // exactly what `O_DIRECT` on a file of the state directory's
    // filesystem accepts: compared here with such a file (the scratch
    // directory is on that filesystem), which must refuse at least the
    // 7-byte offset for the comparison to mean anything.
    let reference_path = fx.scratch().join("direct-reference");
    fs::write(&reference_path, &want).expect("write the reference file");
    let reference = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&reference_path)
        .expect("open the reference file O_DIRECT");
    let cases = [
        // (offset, length, buffer shift)
        (512, 512, 0),
        (7, 1000, 0),
        (0, 513, 0),
        (512, 512, 1),
        (7, 1000, 1),
    ];
    for (i, (off, len, shift)) in cases.into_iter().enumerate() {
        let data = Pattern::new(10 + i as u64).bytes(0, len);
        let mut wbuf = Aligned::new(2 * ALIGN);
        wbuf.as_mut()[shift..shift + len].copy_from_slice(&data);
        let wbuf = &wbuf.as_mut()[shift..shift + len];
        let local = reference.write_at(wbuf, off as u64);
        let allowed = !fx.options().passthrough || local.is_ok();
        if i == 1 {
            assert_errno(
                local.as_ref().map(drop).map_err(clone_err),
                libc::EINVAL,
                "O_DIRECT at offset 7 on the state directory's filesystem",
            );
        }
        let what = format!(
            "O_DIRECT write of {len} bytes at {off} from buffer+{shift} (on the state \
             filesystem: {local:?})"
        );
        let w = f.write_at(wbuf, off as u64);
        if allowed {
            assert_eq!(w.unwrap_or_else(|e| panic!("{what}: {e}")), len, "{what}");
            want[off..off + len].copy_from_slice(&data);
        } else {
            assert_errno(w, libc::EINVAL, &what);
        }
        let mut rbuf = Aligned::new(2 * ALIGN);
        let rbuf = &mut rbuf.as_mut()[shift..shift + len];
        let local = reference.read_at(rbuf, off as u64);
        let allowed = !fx.options().passthrough || local.is_ok();
        let what = format!(
            "O_DIRECT read of {len} bytes at {off} into buffer+{shift} (on the state \
             filesystem: {local:?})"
        );
        let r = f.read_at(rbuf, off as u64);
        if allowed {
            assert_eq!(r.unwrap_or_else(|e| panic!("{what}: {e}")), len, "{what}");
            assert!(rbuf[..] == want[off..off + len], "{what}");
        } else {
            assert_errno(r, libc::EINVAL, &what);
        }
    }
    assert!(
        fs::read(&p).expect("read all") == want,
        "the file has every allowed write"
    );
}

fn clone_err(e: &std::io::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(0))
}
both_modes!(o_direct_aligned_and_unaligned, o_direct);

/// `copy_file_range` between two files of the mount: mountd answers the
/// FUSE request `ENOSYS`, and the kernel then copies through its own
/// read and write path, so the call succeeds and copies the bytes; `cp
/// --reflink=never` and `cp --reflink=auto` copy; `cp --reflink=always`
/// fails (no reflink).
fn copy_range(fx: &KeibiFixture) {
    let (src, dst) = (fx.path("src"), fx.path("dst"));
    let data = Pattern::new(4).bytes(0, 300_000);
    fs::write(&src, &data).expect("write src");
    let fin = fs::File::open(&src).expect("open src");
    let fout = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&dst)
        .expect("create dst");
    let mut copied = 0usize;
    // The first call reaches mountd; later ones are the kernel's alone.
    for round in 0..2 {
        let mut off_in: libc::loff_t = 0;
        let mut off_out: libc::loff_t = 0;
        copied = 0;
        while copied < data.len() {
            // SAFETY: two descriptors we own, valid offset pointers.
            let n = unsafe {
                libc::copy_file_range(
                    fin.as_raw_fd(),
                    &mut off_in,
                    fout.as_raw_fd(),
                    &mut off_out,
                    data.len() - copied,
                    0,
                )
            };
            assert!(
                n > 0,
                "copy_file_range (call {round}) after {copied} bytes: {}",
                if n == 0 {
                    "returned 0 before the end".to_string()
                } else {
                    std::io::Error::last_os_error().to_string()
                }
            );
            copied += n as usize;
        }
    }
    assert_eq!(copied, data.len());
    drop(fout);
    assert!(
        fs::read(&dst).expect("read dst") == data,
        "copy_file_range copied the bytes"
    );

    for (how, ok) in [
        ("--reflink=never", true),
        ("--reflink=auto", true),
        ("--reflink=always", false),
    ] {
        let to = fx.path(format!("cp{how}"));
        let out = run_bounded(
            Command::new("cp").arg(how).arg(&src).arg(&to),
            Duration::from_secs(60),
        );
        assert_eq!(
            out.status.success(),
            ok,
            "cp {how}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if ok {
            assert!(fs::read(&to).expect("read the copy") == data, "cp {how}");
        }
    }
}

/// `copy_range` on a mount whose mountd logs every FUSE operation, then
/// the log shows mountd was asked exactly once and answered `ENOSYS`.
fn copy_range_logged(passthrough: bool) {
    let (_w, fx) = setup(
        "copy_file_range",
        LIMIT,
        Options {
            passthrough,
            mountd_log_filter: "info,keibi_mountd::fuse=debug,tarpc=off".into(),
            ..Options::default()
        },
    );
    copy_range(&fx);
    fx.assert_io_path();
    let log = fx.mountd_log();
    let asked: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("op=\"copy_file_range\""))
        .collect();
    assert!(
        asked.len() == 1 && asked[0].contains("ENOSYS"),
        "mountd is asked once and answers ENOSYS; later calls stay in the kernel: {asked:#?}"
    );
}

mod copy_file_range_and_cp {
    #[test]
    fn passthrough() {
        super::copy_range_logged(true);
    }

    #[test]
    fn plain() {
        super::copy_range_logged(false);
    }
}

/// A POSIX ACL as `system.posix_acl_access` carries it: version 2, then
/// (tag, perm, id) entries: owner rw, user 4242 r, group r, mask r, other r.
fn acl_blob() -> Vec<u8> {
    const UNDEFINED: u32 = u32::MAX;
    let entries: [(u16, u16, u32); 5] = [
        (0x01, 6, UNDEFINED),
        (0x02, 4, harness::OTHER_UID),
        (0x04, 4, UNDEFINED),
        (0x10, 4, UNDEFINED),
        (0x20, 4, UNDEFINED),
    ];
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// POSIX ACLs: setting one fails with `EOPNOTSUPP` (what `setfacl`
/// reports as "Operation not supported"), reading or removing one finds
/// nothing (`ENODATA`), and the ACL names never show in `listxattr`.
#[test]
fn posix_acls_are_not_supported() {
    let (_w, fx) = setup("posix acls", LIMIT, Options::default());
    let f = fx.path("f");
    fs::write(&f, b"x").expect("write");
    let d = fx.path("d");
    fs::create_dir(&d).expect("mkdir");
    let blob = acl_blob();
    assert_errno(
        sys::setxattr(&f, "system.posix_acl_access", &blob, 0),
        libc::EOPNOTSUPP,
        "setting an access ACL",
    );
    assert_errno(
        sys::setxattr(&d, "system.posix_acl_default", &blob, 0),
        libc::EOPNOTSUPP,
        "setting a default ACL",
    );
    assert_errno(
        sys::getxattr(&f, "system.posix_acl_access"),
        libc::ENODATA,
        "reading an access ACL",
    );
    assert_errno(
        sys::getxattr(&d, "system.posix_acl_default"),
        libc::ENODATA,
        "reading a default ACL",
    );
    assert_errno(
        sys::removexattr(&f, "system.posix_acl_access"),
        libc::ENODATA,
        "removing an access ACL",
    );
    let names = sys::listxattr(&f).expect("listxattr");
    assert!(names.is_empty(), "no ACL names listed: {names:?}");
    // Mode bits still work.
    fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o640)).expect("chmod");
}

/// Symlink targets are stored bytes, not resolved: dangling, absolute and
/// outside-the-mount targets are kept as given. A target must be 1 to
/// 4095 bytes: the kernel refuses an empty one (`ENOENT`) and a longer one
/// (`ENAMETOOLONG`) before keibi sees it, and syncd checks the same limits
/// (and refuses a NUL byte, `EINVAL`) for requests that do not come from
/// the kernel (its unit tests).
#[test]
fn symlink_targets() {
    let (_w, fx) = setup("symlink targets", LIMIT, Options::default());
    let longest = "a/".repeat(2047) + "b";
    assert_eq!(longest.len(), 4095);
    for (i, target) in ["/etc/passwd", "../../../../outside", "dangling", &longest]
        .iter()
        .enumerate()
    {
        let l = fx.path(format!("l{i}"));
        std::os::unix::fs::symlink(target, &l)
            .unwrap_or_else(|e| panic!("symlink of {} bytes: {e}", target.len()));
        assert_eq!(
            fs::read_link(&l).expect("readlink").as_os_str().len(),
            target.len()
        );
        assert_eq!(fs::read_link(&l).expect("readlink").to_str(), Some(*target));
    }
    let too_long = "a".repeat(4096);
    assert_errno(
        std::os::unix::fs::symlink(&too_long, fx.path("long")),
        libc::ENAMETOOLONG,
        "a 4096-byte target",
    );
    assert_errno(
        std::os::unix::fs::symlink("", fx.path("empty")),
        libc::ENOENT,
        "an empty target",
    );
}

/// `mmap` (shared and private, written), `sendfile`, `splice`, `readv`
/// and `writev`, and `EFBIG` past the state filesystem's largest file.
fn mapped_and_spliced(fx: &KeibiFixture) {
    let p = fx.path("mapped");
    let data = Pattern::new(5).bytes(0, 3 * ALIGN);
    fs::write(&p, &data).expect("write");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open");
    let len = data.len();
    // SAFETY: a fresh mapping of `len` bytes of a file we hold open; it is
    // only used through the slice below and unmapped before `f` closes.
    let shared = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        shared,
        libc::MAP_FAILED,
        "mmap MAP_SHARED: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the mapping is `len` bytes, readable and writable.
    let view = unsafe { std::slice::from_raw_parts_mut(shared.cast::<u8>(), len) };
    assert!(view[..] == data[..], "the mapping shows the file");
    view[100..105].copy_from_slice(b"MAPPD");
    // SAFETY: the mapping above; MS_SYNC writes it back.
    assert_eq!(
        unsafe { libc::msync(shared, len, libc::MS_SYNC) },
        0,
        "msync"
    );
    // SAFETY: unmapping what we mapped; `view` is not used after.
    assert_eq!(unsafe { libc::munmap(shared, len) }, 0);
    let mut want = data.clone();
    want[100..105].copy_from_slice(b"MAPPD");
    assert!(
        fs::read(&p).expect("read") == want,
        "a shared mapping's store reaches the file"
    );

    // SAFETY: as above, a private mapping.
    let private = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        private,
        libc::MAP_FAILED,
        "mmap MAP_PRIVATE: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the private mapping is `len` bytes, readable and writable.
    let pview = unsafe { std::slice::from_raw_parts_mut(private.cast::<u8>(), len) };
    pview[0..4].copy_from_slice(b"PRIV");
    // SAFETY: unmapping what we mapped.
    assert_eq!(unsafe { libc::munmap(private, len) }, 0);
    assert!(
        fs::read(&p).expect("read") == want,
        "a private mapping's store stays private"
    );

    // writev and readv.
    let v = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(fx.path("vectored"))
        .expect("create");
    let written = (&v)
        .write_vectored(&[
            std::io::IoSlice::new(b"abc"),
            std::io::IoSlice::new(b"defg"),
        ])
        .expect("writev");
    assert_eq!(written, 7);
    let (mut a, mut b) = ([0u8; 2], [0u8; 5]);
    let mut r = fs::File::open(fx.path("vectored")).expect("open");
    let got = r
        .read_vectored(&mut [
            std::io::IoSliceMut::new(&mut a),
            std::io::IoSliceMut::new(&mut b),
        ])
        .expect("readv");
    assert_eq!((got, &a, &b), (7, b"ab", b"cdefg"));

    // sendfile from one file of the mount to another.
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(fx.path("sent"))
        .expect("create");
    let mut off: libc::off_t = 0;
    let mut sent = 0usize;
    while sent < len {
        // SAFETY: two descriptors we own and a valid offset pointer.
        let n = unsafe { libc::sendfile(out.as_raw_fd(), f.as_raw_fd(), &mut off, len - sent) };
        assert!(
            n > 0,
            "sendfile after {sent} bytes: {}",
            std::io::Error::last_os_error()
        );
        sent += n as usize;
    }
    drop(out);
    assert!(
        fs::read(fx.path("sent")).expect("read") == want,
        "sendfile copied the file"
    );

    // splice: file → pipe → file.
    let mut pipe = [0; 2];
    // SAFETY: a two-element array for pipe2.
    assert_eq!(
        unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
        0
    );
    let spliced = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(fx.path("spliced"))
        .expect("create");
    let (mut in_off, mut out_off): (libc::loff_t, libc::loff_t) = (0, 0);
    let mut moved = 0usize;
    while moved < len {
        let chunk = (len - moved).min(ALIGN);
        // SAFETY: descriptors we own and valid offset pointers.
        let n = unsafe {
            libc::splice(
                f.as_raw_fd(),
                &mut in_off,
                pipe[1],
                std::ptr::null_mut(),
                chunk,
                0,
            )
        };
        assert!(
            n > 0,
            "splice into the pipe: {}",
            std::io::Error::last_os_error()
        );
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: as above.
            let m = unsafe {
                libc::splice(
                    pipe[0],
                    std::ptr::null_mut(),
                    spliced.as_raw_fd(),
                    &mut out_off,
                    left,
                    0,
                )
            };
            assert!(
                m > 0,
                "splice out of the pipe: {}",
                std::io::Error::last_os_error()
            );
            left -= m as usize;
        }
        moved += n as usize;
    }
    // SAFETY: closing the pipe we made.
    unsafe {
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
    drop(spliced);
    assert!(
        fs::read(fx.path("spliced")).expect("read") == want,
        "splice copied the file"
    );

    // Past the largest file of the state filesystem (ext4: 16 TiB).
    assert_errno(f.write_at(b"x", 17 << 40), libc::EFBIG, "a write at 17 TiB");
}
both_modes!(mmap_sendfile_splice_readv_efbig, mapped_and_spliced);

fn ok(r: libc::c_int, what: &str) {
    assert_eq!(r, 0, "{what}: {}", std::io::Error::last_os_error());
}

fn errno_of_call(r: libc::c_int) -> std::io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The rows of the operations table that behave "as a local disk" or
/// are refused, each checked once (with passthrough).
#[test]
fn local_disk_rules_and_refusals() {
    let (_w, mut fx) = setup("local disk rules", LIMIT, Options::default());
    let f = fx.path("f");
    fs::write(&f, b"data").expect("write");
    let c = sys::cpath(&f);

    // statx: no birth time.
    // SAFETY: statx is plain data; zeroed is valid.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and output struct.
    ok(
        unsafe {
            libc::statx(
                libc::AT_FDCWD,
                c.as_ptr(),
                0,
                libc::STATX_ALL | libc::STATX_BTIME,
                &mut st,
            )
        },
        "statx",
    );
    assert_eq!(st.stx_mask & libc::STATX_BTIME, 0, "no birth time reported");
    assert_ne!(st.stx_mask & libc::STATX_MTIME, 0, "mtime reported");

    // The mount: fuse.keibi, source keibi, nosuid and nodev.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mnt = fx.mnt().display().to_string();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mnt.as_str()))
        .unwrap_or_else(|| panic!("{mnt} in mountinfo"));
    let (before, after) = line.split_once(" - ").expect("mountinfo separator");
    let opts = before.split(' ').nth(5).expect("mount options");
    assert!(
        opts.split(',').any(|o| o == "nosuid") && opts.split(',').any(|o| o == "nodev"),
        "{line}"
    );
    let mut tail = after.split(' ');
    assert_eq!(
        (tail.next(), tail.next()),
        (Some("fuse.keibi"), Some("keibi")),
        "{line}"
    );

    // Case-sensitive names.
    fs::write(fx.path("Case"), b"upper").expect("write Case");
    fs::write(fx.path("case"), b"lower").expect("write case");
    assert_eq!(fs::read(fx.path("Case")).expect("read"), b"upper");
    assert_eq!(fs::read(fx.path("case")).expect("read"), b"lower");

    // ioctl: ENOTTY, reflink EOPNOTSUPP.
    let file = fs::File::open(&f).expect("open");
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long into `flags`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    assert_errno(errno_of_call(r), libc::ENOTTY, "ioctl FS_IOC_GETFLAGS");
    let clone = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(fx.path("clone"))
        .expect("create");
    // SAFETY: FICLONE takes the source descriptor as its argument.
    let r = unsafe { libc::ioctl(clone.as_raw_fd(), libc::FICLONE, file.as_raw_fd()) };
    assert_errno(errno_of_call(r), libc::EOPNOTSUPP, "ioctl FICLONE");

    // O_TMPFILE and RENAME_WHITEOUT.
    assert_errno(
        sys::open(&fx.mnt(), libc::O_TMPFILE | libc::O_RDWR, 0o600),
        libc::EOPNOTSUPP,
        "O_TMPFILE",
    );
    assert_errno(
        sys::renameat2(&f, &fx.path("w"), libc::RENAME_WHITEOUT),
        libc::EINVAL,
        "RENAME_WHITEOUT",
    );

    // fallocate: the modes FUSE passes on work, the others EOPNOTSUPP.
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .expect("open rw");
    sys::fallocate(&rw, libc::FALLOC_FL_ZERO_RANGE, 0, 2).expect("FALLOC_FL_ZERO_RANGE");
    assert_eq!(fs::read(&f).expect("read"), b"\0\0ta");
    assert_errno(
        sys::fallocate(&rw, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096),
        libc::EOPNOTSUPP,
        "FALLOC_FL_COLLAPSE_RANGE",
    );

    // flock and OFD locks: the kernel's, between descriptors of this
    // machine.
    let other = fs::File::open(&f).expect("open again");
    // SAFETY: flock on descriptors we own.
    ok(
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        "flock",
    );
    // SAFETY: as above.
    let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_errno(errno_of_call(r), libc::EWOULDBLOCK, "a second flock");
    let lock = |fd: &fs::File| {
        // SAFETY: flock is plain data; zeroed then filled.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_RDLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        // SAFETY: F_OFD_SETLK with a valid struct flock.
        errno_of_call(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) })
    };
    let wlock = |fd: &fs::File| {
        // SAFETY: as above.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        // SAFETY: as above.
        errno_of_call(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) })
    };
    wlock(&rw).expect("OFD write lock");
    assert_errno(
        lock(&other),
        libc::EAGAIN,
        "OFD read lock against a write lock",
    );

    // inotify sees changes made through the mount.
    // SAFETY: plain syscalls; the descriptor is closed below.
    let ino_fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(ino_fd >= 0, "inotify_init1");
    let dir = sys::cpath(&fx.mnt());
    // SAFETY: valid descriptor and C string.
    let wd = unsafe { libc::inotify_add_watch(ino_fd, dir.as_ptr(), libc::IN_CREATE) };
    assert!(
        wd >= 0,
        "inotify_add_watch: {}",
        std::io::Error::last_os_error()
    );
    fs::write(fx.path("watched"), b"x").expect("create watched");
    let mut buf = [0u8; 4096];
    // SAFETY: reading into our buffer.
    let n = unsafe { libc::read(ino_fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: closing our descriptor.
    unsafe { libc::close(ino_fd) };
    assert!(
        n > 0,
        "an inotify event for the create: {}",
        std::io::Error::last_os_error()
    );
    assert!(
        buf[..n as usize].windows(7).any(|w| w == b"watched"),
        "the event names the new file"
    );

    // A Unix socket bound on the mount: a socket node, usable locally.
    let sock = fx.path("sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind on the mount");
    assert!(std::os::unix::fs::FileTypeExt::is_socket(
        &fs::symlink_metadata(&sock).expect("lstat").file_type()
    ));
    let mut client = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    std::io::Write::write_all(&mut client, b"hi").expect("send");
    let mut got = [0u8; 2];
    std::io::Read::read_exact(&mut server, &mut got).expect("receive");
    assert_eq!(&got, b"hi");

    // utimensat with UTIME_OMIT and UTIME_NOW.
    let before = fs::metadata(&f).expect("stat");
    sys::utimens(&f, (1_000_000_000, 0), (1_000_000_000, 0)).expect("set times");
    let ts = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: valid C string and two timespecs.
    ok(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) },
        "utimensat",
    );
    let md = fs::metadata(&f).expect("stat");
    assert_eq!(md.atime(), 1_000_000_000, "UTIME_OMIT kept atime");
    assert!(md.mtime() >= before.mtime(), "UTIME_NOW set mtime to now");

    // Writes, truncation and entry changes move mtime and ctime.
    let d = fx.path("timed");
    fs::create_dir(&d).expect("mkdir");
    let tf = d.join("t");
    fs::write(&tf, b"t").expect("write");
    let past = (1_000_000_000, 0);
    for p in [&d, &tf] {
        sys::utimens(p, past, past).expect("set times to the past");
    }
    let (d0, f0) = (
        fs::metadata(&d).expect("stat").ctime(),
        fs::metadata(&tf).expect("stat").ctime(),
    );
    OpenOptions::new()
        .append(true)
        .open(&tf)
        .and_then(|mut w| w.write_all(b"more"))
        .expect("append");
    let md = fs::metadata(&tf).expect("stat");
    assert!(
        md.mtime() > past.0 && md.ctime() >= f0,
        "a write moves mtime and ctime"
    );
    sys::utimens(&tf, past, past).expect("set times to the past");
    OpenOptions::new()
        .write(true)
        .open(&tf)
        .and_then(|w| w.set_len(1))
        .expect("truncate");
    assert!(
        fs::metadata(&tf).expect("stat").mtime() > past.0,
        "a truncate moves mtime"
    );
    fs::write(d.join("new"), b"").expect("create in the directory");
    let md = fs::metadata(&d).expect("stat");
    assert!(
        md.mtime() > past.0 && md.ctime() >= d0,
        "a new entry moves the directory's times"
    );
    sys::utimens(&d, past, past).expect("set times to the past");
    fs::remove_file(d.join("new")).expect("unlink");
    assert!(
        fs::metadata(&d).expect("stat").mtime() > past.0,
        "an unlink moves the directory's mtime"
    );

    // xattr limits and rules.
    assert_errno(
        sys::setxattr(&f, &format!("user.{}", "n".repeat(251)), b"v", 0),
        libc::ERANGE,
        "a 256-byte xattr name",
    );
    assert_errno(
        sys::setxattr(&f, "user.big", &vec![0u8; 65537], 0),
        libc::E2BIG,
        "a 64 KiB + 1 value",
    );
    sys::setxattr(&f, "user.max", &vec![7u8; 65536], 0).expect("a 64 KiB value");
    assert_eq!(
        sys::getxattr(&f, "user.max").expect("getxattr").len(),
        65536
    );
    let name = std::ffi::CString::new("user.max").expect("name");
    let mut small = [0u8; 10];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            small.as_mut_ptr().cast(),
            small.len(),
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ERANGE),
        "a buffer too small"
    );
    sys::setxattr(&f, "trusted.t", b"root", 0).expect("trusted.* as root");
    sys::setxattr(&f, "security.s", b"label", 0).expect("security.*");
    assert_eq!(sys::getxattr(&f, "security.s").expect("getxattr"), b"label");
    std::os::unix::fs::symlink("f", fx.path("sl")).expect("symlink");
    let sl = sys::cpath(&fx.path("sl"));
    // SAFETY: valid C strings and value.
    let r = unsafe { libc::lsetxattr(sl.as_ptr(), name.as_ptr(), b"x".as_ptr().cast(), 1, 0) };
    assert_errno(errno_of_call(r), libc::EPERM, "user.* on a symlink");
    let out = harness::run_as(
        harness::OTHER_UID,
        &format!(
            "python3 -c \"import os; print(os.getxattr('{}', 'trusted.t'))\" 2>&1; echo rc=$?",
            f.display()
        ),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        !said.contains("b'root'") && said.contains("rc=1"),
        "trusted.* is hidden from other users: {said}"
    );

    // chown rules for an owner who is not root.
    let mine = fx.path("mine");
    fs::write(&mine, b"x").expect("write");
    std::os::unix::fs::chown(&mine, Some(harness::OTHER_UID), Some(0)).expect("chown");
    let m = mine.display();
    let out = harness::run_as(
        harness::OTHER_UID,
        &format!(
            "chgrp {} '{m}' && echo own-group-ok; chgrp 0 '{m}' 2>&1; chown 0 '{m}' 2>&1; true",
            harness::OTHER_UID
        ),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("own-group-ok"),
        "an owner moves the file to their group: {said}"
    );
    assert_eq!(
        said.matches("Operation not permitted").count(),
        2,
        "another group and another owner are refused: {said}"
    );
    let md = fs::metadata(&mine).expect("stat");
    assert_eq!(
        (md.uid(), md.gid()),
        (harness::OTHER_UID, harness::OTHER_UID)
    );

    // st_dev is the FUSE mount's device number (as in mountinfo), given
    // anew at each mount; st_ino stays.
    drop((file, rw, other, clone, client, server, listener));
    let md = fs::metadata(&f).expect("stat");
    assert_eq!(md.dev(), mount_dev(&fx), "st_dev is the mount's device");
    let ino = md.ino();
    fx.restart_mountd();
    let md = fs::metadata(&f).expect("stat after remount");
    assert_eq!(md.ino(), ino, "the inode number survives the remount");
    assert_eq!(md.dev(), mount_dev(&fx), "st_dev is the new mount's device");
}

/// The device number of the fixture's mount, from `/proc/self/mountinfo`.
fn mount_dev(fx: &KeibiFixture) -> u64 {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mnt = fx.mnt().display().to_string();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(mnt.as_str()))
        .unwrap_or_else(|| panic!("{mnt} in mountinfo"));
    let (major, minor) = line
        .split(' ')
        .nth(2)
        .and_then(|mm| mm.split_once(':'))
        .expect("major:minor in mountinfo");
    libc::makedev(major.parse().expect("major"), minor.parse().expect("minor"))
}
