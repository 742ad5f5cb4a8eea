//! Validation of names before they become directory entries.
//!
//! A name is one path component. Whatever sends it (the kernel through
//! mountd today, a peer later), syncd checks it here: nothing that could
//! step outside its directory or confuse a path walk gets stored.

use ipc_schema::{FsError, Name, fs_err};

/// Check a name for a new or looked-up entry: not empty, not `.` or `..`,
/// no `/` or NUL (EINVAL), at most [`Name::MAX_LEN`] bytes (ENAMETOOLONG).
pub fn validate(name: &Name) -> Result<(), FsError> {
    let b = name.as_bytes();
    if b.len() > Name::MAX_LEN {
        return Err(fs_err!(
            ENAMETOOLONG,
            "name of {} bytes is longer than {} bytes",
            b.len(),
            Name::MAX_LEN
        ));
    }
    if b.is_empty() {
        return Err(fs_err!(EINVAL, "empty name"));
    }
    if b == b"." || b == b".." {
        return Err(fs_err!(EINVAL, "{name:?} cannot be a directory entry"));
    }
    if b.contains(&b'/') {
        return Err(fs_err!(EINVAL, "name {name:?} contains '/'"));
    }
    if b.contains(&0) {
        return Err(fs_err!(EINVAL, "name {name:?} contains NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(n: &[u8]) -> Option<i32> {
        validate(&Name::from(n)).err().map(|e| e.errno)
    }

    #[test]
    fn accepts_ordinary_and_odd_names() {
        assert_eq!(errno(b"a"), None);
        assert_eq!(errno(b"...".as_slice()), None);
        assert_eq!(errno(b".hidden"), None);
        assert_eq!(errno(&[0xff, 0xfe, b'x']), None, "non-UTF-8 is fine");
        assert_eq!(errno(&[b'n'; 255]), None, "255 bytes is the limit");
    }

    #[test]
    fn refuses_bad_names_with_their_errno() {
        assert_eq!(errno(&[b'n'; 256]), Some(libc::ENAMETOOLONG));
        assert_eq!(errno(b""), Some(libc::EINVAL));
        assert_eq!(errno(b"."), Some(libc::EINVAL));
        assert_eq!(errno(b".."), Some(libc::EINVAL));
        assert_eq!(errno(b"a/b"), Some(libc::EINVAL));
        assert_eq!(errno(b"/"), Some(libc::EINVAL));
        assert_eq!(errno(b"a\0b"), Some(libc::EINVAL));
    }
}
