//! The one error type of the IPC protocol.
//!
//! Every failure that reaches the kernel is an errno, so the error carries
//! one from where it is made; the message says what failed, for the log and
//! for `keibictl`. Build them with [`fs_err!`](crate::fs_err).

use serde::{Deserialize, Serialize};
use std::fmt;

/// An error with the errno the kernel (or a `keibictl` exit status) will see.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct FsError {
    /// A Linux errno value (`libc::ENOENT`, ...).
    pub errno: i32,
    /// What failed, with its context.
    pub message: String,
}

impl FsError {
    /// An error with this errno and message.
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        FsError {
            errno,
            message: message.into(),
        }
    }

    /// An error from an I/O error, keeping its errno (EIO if it has none).
    pub fn io(context: impl fmt::Display, e: &std::io::Error) -> Self {
        FsError::new(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("{context}: {e}"),
        )
    }

    /// The symbolic name of the errno (`"ENOENT"`), for messages.
    pub fn errno_name(&self) -> String {
        errno_name(self.errno)
    }
}

/// The symbolic name of a Linux errno (`"ENOENT"`), or `"errno N"`.
pub fn errno_name(errno: i32) -> String {
    match nix::errno::Errno::from_raw(errno) {
        nix::errno::Errno::UnknownErrno => format!("errno {errno}"),
        // `Errno`'s Debug form is its symbolic name.
        e => format!("{e:?}"),
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.errno_name())
    }
}

impl fmt::Debug for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for FsError {}

/// Build an [`FsError`]: `fs_err!(ENOENT, "no entry {name:?} in {parent}")`.
/// The first argument is a `libc` errno constant's name.
#[macro_export]
macro_rules! fs_err {
    ($errno:ident, $($fmt:tt)+) => {
        $crate::FsError::new(::libc::$errno, format!($($fmt)+))
    };
}
