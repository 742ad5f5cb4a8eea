//! [`ExtraMountd`]: a keibi-mountd a test starts beside its fixture (on
//! another mountpoint, with another lock directory or options), stopped
//! and unmounted when dropped, even when the test panics.

use crate::daemons::{STOP_TIMEOUT, log_tail, terminate};
use crate::process::wait_child;
use crate::wait::poll_until;
use crate::{mounts, watchdog};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

/// A mountd started by a test (see the module doc).
pub struct ExtraMountd {
    child: Option<Child>,
    mnt: PathBuf,
    log: PathBuf,
    /// Whether dropping it may detach what is mounted at `mnt` (not when
    /// the mountpoint belongs to the fixture's own mountd).
    owns_mount: bool,
}

impl ExtraMountd {
    /// Spawn `cmd` (a mountd command for `mnt` whose output goes to
    /// `log`). With `owns_mount`, dropping it also detaches every mount at
    /// `mnt`.
    pub fn spawn(cmd: &mut Command, mnt: &Path, log: &Path, owns_mount: bool) -> ExtraMountd {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start keibi-mountd ({cmd:?}): {e}"));
        watchdog::register_pid(child.id());
        if owns_mount {
            watchdog::register_mount(mnt.to_path_buf());
        }
        ExtraMountd {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            log: log.to_path_buf(),
            owns_mount,
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Wait until a `fuse.keibi` mount at the mountpoint answers a
    /// listing; panics with the log if mountd exits first.
    pub fn wait_mounted(&mut self, timeout: Duration) {
        let (mnt, log) = (self.mnt.clone(), self.log.clone());
        let child = self.child.as_mut().expect("mountd runs");
        poll_until("the extra keibi-mountd's mount", timeout, || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "keibi-mountd exited before its mount was up ({st})\n{}",
                    log_tail(&log, 40)
                );
            }
            (mounts::keibi_mounts_at(&mnt) > 0 && std::fs::read_dir(&mnt).is_ok()).then_some(())
        });
    }

    /// Wait for mountd to exit by itself (a refusal); panics with the log
    /// if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("mountd was started");
        let st = wait_child(child, timeout).unwrap_or_else(|| {
            panic!(
                "keibi-mountd was expected to refuse and exit, but it still runs after {timeout:?}\n{}",
                log_tail(&self.log, 40)
            )
        });
        watchdog::unregister_pid(child.id());
        self.child = None;
        st
    }
}

impl Drop for ExtraMountd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, STOP_TIMEOUT);
        }
        if self.owns_mount {
            mounts::detach_all(&self.mnt);
            watchdog::unregister_mount(&self.mnt);
        }
        if std::thread::panicking() {
            eprintln!("{}", log_tail(&self.log, 60));
        }
    }
}
