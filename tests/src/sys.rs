//! Thin `io::Result` wrappers for the syscalls std does not offer
//! (`renameat2`, xattrs, `fallocate`, `lseek` with `SEEK_DATA`, `statvfs`,
//! `utimensat`), so tests compare errnos instead of juggling `-1`.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A path as a C string (test paths never contain NUL).
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("test paths have no NUL byte")
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)`.
pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: both strings are valid NUL-terminated paths for the call.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

/// `setxattr(path, name, value, flags)`.
pub fn setxattr(path: &Path, name: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (p, n) = (cpath(path), CString::new(name).expect("xattr name"));
    // SAFETY: valid C strings and a slice pointer/length pair.
    check(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// `getxattr(path, name)`, sized by a first call.
pub fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(path), CString::new(name).expect("xattr name"));
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid C strings; buf is writable for buf.len() bytes.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// `listxattr(path)`, split into names.
pub fn listxattr(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let p = cpath(path);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid C string; buf is writable for buf.len() bytes.
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| n.to_vec())
        .collect())
}

/// `removexattr(path, name)`.
pub fn removexattr(path: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cpath(path), CString::new(name).expect("xattr name"));
    // SAFETY: valid C strings.
    check(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) })
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(f: &impl AsRawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor the caller owns.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) })
}

/// `lseek(fd, offset, whence)`.
pub fn lseek(f: &impl AsRawFd, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: plain syscall on a descriptor the caller owns.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as i64, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// `statvfs(path)`.
pub fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let p = cpath(path);
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and a pointer to a live struct.
    check(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    Ok(st)
}

/// `utimensat(AT_FDCWD, path, [atime, mtime], AT_SYMLINK_NOFOLLOW?)` with
/// `(secs, nanos)` pairs.
pub fn utimens(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let p = cpath(path);
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid C string and a two-element timespec array.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) })
}

/// `open(path, flags, mode)` returning an owned `File`.
pub fn open(path: &Path, flags: libc::c_int, mode: libc::mode_t) -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let p = cpath(path);
    // SAFETY: valid C string; the result is checked before use.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open(2) and nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}
