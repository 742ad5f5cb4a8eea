//! A fault point for tests only: hold every store call.
//!
//! When keibi-syncd starts with the environment variable
//! [`STALL_ENV`] (`KEIBI_TEST_STORE_STALL`) naming a path, every store call
//! waits, before it touches the store, for as long as a file exists at that
//! path (checked every [`POLL`]). "Every store call" means each operation
//! of the filesystem service (on whichever thread it runs), the open-table
//! bookkeeping of a connection (`connect`/`disconnect`), and the scan that
//! counts the store for `keibictl status`. It stands in for a disk that
//! stops answering, so that the end-to-end test
//! `tests/tests/control_liveness.rs` can show the control socket answering
//! while the store is stuck.
//!
//! It is not a feature: nothing in a deployment sets the variable, and
//! syncd logs a warning at start when it is set. Unset, the check is one
//! load of an initialised [`OnceLock`] per store call.
//!
//! A second hook, [`PEER_PROTOCOL_ENV`] (`KEIBI_TEST_PEER_PROTOCOL=<n>`),
//! makes syncd claim peer protocol version `n` (min = max = n) in the
//! peer handshake instead of [`crate::channel::PEER_PROTOCOL_VERSION`], so
//! that an end-to-end test can show two syncd refusing each other with
//! both versions named. A value that is not a number is ignored with a
//! warning.
//!
//! A third hook, [`CORRUPT_CHUNKS_ENV`] (`KEIBI_TEST_CORRUPT_CHUNKS=1`),
//! makes syncd flip one byte of every file chunk it serves to a peer
//! ([`corrupt_chunks`], used by `sync::serve`), so that an end-to-end test
//! can show the receiving side refusing bytes that do not match their hash.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that arms the fault point (tests only).
pub const STALL_ENV: &str = "KEIBI_TEST_STORE_STALL";

/// How often a held store call looks at the file again.
const POLL: Duration = Duration::from_millis(10);

static STALL_FILE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// The environment variable that overrides the peer protocol version
/// claimed in handshakes (tests only).
pub const PEER_PROTOCOL_ENV: &str = "KEIBI_TEST_PEER_PROTOCOL";

static PEER_PROTOCOL: OnceLock<Option<u32>> = OnceLock::new();

fn peer_protocol_override() -> Option<u32> {
    *PEER_PROTOCOL.get_or_init(|| parse_peer_protocol(&std::env::var(PEER_PROTOCOL_ENV).ok()?))
}

/// The version a [`PEER_PROTOCOL_ENV`] value asks for, if it is a number.
fn parse_peer_protocol(raw: &str) -> Option<u32> {
    match raw.trim().parse() {
        Ok(n) => {
            tracing::warn!(
                version = n,
                "test hook {PEER_PROTOCOL_ENV} is armed: peer handshakes claim protocol version {n}"
            );
            Some(n)
        }
        Err(_) => {
            tracing::warn!(value = %raw, "{PEER_PROTOCOL_ENV} is not a number; ignored");
            None
        }
    }
}

/// The (min, max) peer protocol versions this syncd claims: both
/// [`crate::channel::PEER_PROTOCOL_VERSION`], or the test hook's value.
pub fn peer_protocol_range() -> (u32, u32) {
    let v = peer_protocol_override().unwrap_or(crate::channel::PEER_PROTOCOL_VERSION);
    (v, v)
}

/// The environment variable that makes served chunks wrong (tests only).
pub const CORRUPT_CHUNKS_ENV: &str = "KEIBI_TEST_CORRUPT_CHUNKS";

static CORRUPT_CHUNKS: OnceLock<bool> = OnceLock::new();

/// Whether every served chunk gets one byte flipped (the
/// [`CORRUPT_CHUNKS_ENV`] hook is set to `1`).
pub fn corrupt_chunks() -> bool {
    *CORRUPT_CHUNKS.get_or_init(|| {
        let on = std::env::var(CORRUPT_CHUNKS_ENV).is_ok_and(|v| v.trim() == "1");
        if on {
            tracing::warn!(
                "test hook {CORRUPT_CHUNKS_ENV} is armed: every chunk served to a peer has a byte flipped"
            );
        }
        on
    })
}

/// Read [`STALL_ENV`] once, at start (before any store call).
pub fn init() {
    let file = STALL_FILE.get_or_init(|| std::env::var_os(STALL_ENV).map(PathBuf::from));
    if let Some(p) = file {
        tracing::warn!(
            path = %p.display(),
            "test fault point {STALL_ENV} is armed: store calls wait while this file exists"
        );
    }
    peer_protocol_override();
    corrupt_chunks();
}

/// Wait while the stall file exists (tests only; returns at once when the
/// fault point is not armed). Blocking: call it where the store call
/// itself would block.
#[inline]
pub fn store_gate() {
    if let Some(Some(file)) = STALL_FILE.get() {
        while file.exists() {
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_protocol_values() {
        assert_eq!(parse_peer_protocol("2"), Some(2));
        assert_eq!(parse_peer_protocol(" 7\n"), Some(7));
        assert_eq!(parse_peer_protocol("two"), None);
        assert_eq!(parse_peer_protocol(""), None);
        assert_eq!(parse_peer_protocol("-1"), None);
    }
}
