//! The end-to-end test harness: real daemons, a real FUSE mount, real
//! signals.
//!
//! A [`KeibiFixture`] owns one complete keibi instance in a short temporary
//! directory under `/tmp`: a `keibi-syncd` running as `nobody` with its own
//! state directory and sockets, and a `keibi-mountd` (root) mounted on a
//! mountpoint inside the same directory. Tests drive the mount with plain
//! syscalls and programs, and the fixture's methods restart, freeze or kill
//! the daemons. Every fixture is independent, so test binaries (and tests
//! inside one binary) can run in parallel.
//!
//! Rules the harness keeps, so tests can rely on them:
//! - every wait is a poll with a deadline ([`wait`]); nothing sleeps to
//!   synchronise;
//! - every child process is killed and every mount detached on every path:
//!   the fixture's `Drop`, and for a test that hangs in the kernel, the
//!   [`watchdog`], which kills what the fixtures registered before it
//!   aborts the test binary;
//! - nothing skips: a missing `/dev/fuse`, binary or program is a failure
//!   with a message saying what to do.
//!
//! Children are started with `PR_SET_PDEATHSIG = SIGKILL`, which Linux ties
//! to the *thread* that spawned them: start and restart daemons only from
//! the test's own thread, never from a helper thread that ends earlier.

pub mod binaries;
pub mod ctl;
pub mod daemons;
pub mod data;
pub mod extra_mountd;
pub mod io_path;
pub mod mounts;
pub mod pair;
pub mod peers;
pub mod process;
pub mod relay;
pub mod sync_helpers;
pub mod sys;
pub mod tree;
pub mod wait;
pub mod watchdog;

pub use daemons::{KeibiFixture, Options};
pub use data::{Pattern, hash_bytes, hash_file, hash_reader};
pub use pair::{LinkMode, Pair, PairOptions, Side};
pub use process::{errno_of, run_as, run_bounded};
pub use wait::{bounded, poll_until};
pub use watchdog::Watchdog;

/// uid and gid the test syncd runs as (`nobody:nogroup`).
pub const SYNCD_UID: u32 = 65534;

/// An unprivileged uid that is neither root nor syncd's, for permission
/// tests.
pub const OTHER_UID: u32 = 4242;

/// Arm a watchdog of `limit` for the test `name` and start a fixture with
/// `opts`. Bind the pair as `let (_watchdog, fx) = ...`: locals drop in
/// reverse order, so the fixture is torn down while the watchdog still
/// guards against a hang.
pub fn setup(name: &str, limit: std::time::Duration, opts: Options) -> (Watchdog, KeibiFixture) {
    let w = Watchdog::arm(name, limit);
    (w, KeibiFixture::start(opts))
}

/// Assert that `r` failed with `errno`; `what` names the operation.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(r: std::io::Result<T>, errno: i32, what: &str) {
    match r {
        Err(e) if e.raw_os_error() == Some(errno) => {}
        Err(e) => panic!(
            "{what}: expected {}, got error {e} ({})",
            ipc_schema::error::errno_name(errno),
            e.raw_os_error()
                .map(ipc_schema::error::errno_name)
                .unwrap_or_default()
        ),
        Ok(v) => panic!(
            "{what}: expected {}, but it succeeded with {v:?}",
            ipc_schema::error::errno_name(errno)
        ),
    }
}
