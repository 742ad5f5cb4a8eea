//! Claims of `docs/semantics.md` that no other test covers, checked on a
//! real mount: `O_DIRECT` (aligned and unaligned), POSIX ACLs,
//! `copy_file_range` (the syscall and `cp`), and symlink targets.
//!
//! Data-path checks run with and without passthrough and check which of
//! the two served the opens.

use harness::{KeibiFixture, Options, Pattern, assert_errno, run_bounded, setup, sys};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
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
both_modes!(copy_file_range_and_cp, copy_range);

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
