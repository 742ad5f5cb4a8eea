//! FUSE passthrough: whether it is in use, and the backing id of each
//! inode.
//!
//! Passthrough is asked for in `init` (unless `--no-passthrough`); the
//! kernel may refuse the capability. Even when granted, registering a
//! backing file can fail for reasons of the environment (no
//! `CAP_SYS_ADMIN` in the initial user namespace: `EPERM`; a kernel built
//! without it: `EOPNOTSUPP`/`ENOSYS`; content on a stacked filesystem:
//! `ELOOP`). If that happens before any passthrough open has succeeded,
//! passthrough is switched off for the session (logged once) and every
//! open falls back to `pread`/`pwrite` in mountd. After a success it is not
//! switched off, because one inode must never have passthrough and plain
//! opens at once (the kernel answers `EIO`); the failing open gets `EIO`.
//!
//! The kernel allows one backing file per inode at a time, so the id is
//! shared by all open handles of an inode: the registry keeps a `Weak`
//! per inode, the handles keep the `Arc`s, and the id is closed when the
//! last handle of the inode is released.
//!
//! # One inode, one I/O mode (the kernel's `fs/fuse/iomode.c`)
//!
//! The kernel puts an inode either in cached mode (opens answered without
//! passthrough) or in passthrough mode, with one backing file: an open
//! answered without passthrough while a passthrough open of the inode is
//! live fails with `EIO`, and so does a passthrough open while a plain
//! open is live, or one with another backing file. The registry therefore
//! keeps, per inode, either the live backing id with the content file it
//! was registered for, or the number of live plain handles, and decides
//! each open from that ([`Passthrough::mode_for`]):
//!
//! - while plain handles of the inode are live, new opens are plain too
//!   (a plain `pread` of the descriptor syncd sent is right for any open);
//! - an open whose file is not all local ([`crate::ondemand`]) must be
//!   plain: it is, unless a passthrough open of the inode is live;
//! - while a passthrough open of the inode is live, an open of another
//!   content file (a newer version from a peer) or of a partial file
//!   cannot get its own mode: read-only, it shares the live backing id and
//!   reads the version that is open (logged); for writing it fails with
//!   `EBUSY` rather than write into a version syncd no longer keeps.
//!
//! Every decision is counted (passthrough or plain), and [`Passthrough::status`]
//! reports the counts with the negotiated state on mountd's ops socket
//! (`keibictl debug passthrough`), so a user or a test can see that opens
//! really went through the kernel rather than trusting a flag.
//!
//! Locks: `inodes` is a leaf lock. It is held across the registration
//! ioctl (a bounded call into the kernel that never waits on another
//! process) so two concurrent opens of one inode cannot register two ids.

use fuser::BackingId;
use ipc_schema::{ContentId, PassthroughStatus};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Passthrough state of the session.
pub struct Passthrough {
    /// Asked for on the command line (not `--no-passthrough`).
    wanted: bool,
    /// The kernel granted the capability in `init`.
    granted: AtomicBool,
    /// Switched off after a registration failure (before any success).
    disabled: AtomicBool,
    /// At least one passthrough open succeeded.
    used: AtomicBool,
    /// Opens answered with passthrough.
    passthrough_opens: AtomicU64,
    /// Opens answered with plain I/O.
    plain_opens: AtomicU64,
    /// Set once FUSE `init` has been answered (so `granted` is known).
    initialized: tokio::sync::watch::Sender<bool>,
    inodes: Mutex<HashMap<u64, InodeIo>>,
}

/// The I/O mode the kernel holds an inode in, as far as mountd's answers
/// put it there.
enum InodeIo {
    /// Passthrough opens are live, with this backing id of this content
    /// file.
    Passthrough {
        content: ContentId,
        id: Weak<BackingId>,
    },
    /// This many plain handles are live (never 0).
    Plain { handles: usize },
}

impl InodeIo {
    fn live(&self) -> bool {
        match self {
            InodeIo::Passthrough { id, .. } => id.strong_count() > 0,
            InodeIo::Plain { handles } => *handles > 0,
        }
    }
}

/// What [`Passthrough::mode_for`] needs to know of an open.
#[derive(Clone, Copy, Debug)]
pub struct OpenKind {
    /// The content file syncd opened.
    pub content: ContentId,
    /// Its bytes are not all local: reads must reach mountd.
    pub partial: bool,
    /// Opened with write access.
    pub writable: bool,
}

/// How an open is to be answered.
pub enum Mode {
    /// Through the kernel, with this backing id.
    Passthrough(Arc<BackingId>),
    /// With `pread`/`pwrite` in mountd.
    Plain,
}

impl Passthrough {
    /// The state before `init`.
    pub fn new(wanted: bool) -> Self {
        Passthrough {
            wanted,
            granted: AtomicBool::new(false),
            disabled: AtomicBool::new(false),
            used: AtomicBool::new(false),
            passthrough_opens: AtomicU64::new(0),
            plain_opens: AtomicU64::new(0),
            initialized: tokio::sync::watch::Sender::new(false),
            inodes: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `init` should ask the kernel for passthrough.
    pub fn wanted(&self) -> bool {
        self.wanted
    }

    /// Record the kernel's answer in `init`.
    pub fn set_granted(&self, granted: bool) {
        self.granted.store(granted, Ordering::SeqCst);
    }

    /// Record that FUSE `init` is done (called whether or not
    /// passthrough was wanted).
    pub fn set_initialized(&self) {
        self.initialized.send_replace(true);
    }

    /// Wait until FUSE `init` is done, at most `limit`, so what mountd
    /// reports about passthrough (in `register_mount`) is the kernel's
    /// answer and not the state before it.
    pub async fn initialized_within(&self, limit: std::time::Duration) {
        let mut rx = self.initialized.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|done| *done)).await;
    }

    /// Whether new opens use passthrough.
    pub fn active(&self) -> bool {
        self.wanted && self.granted.load(Ordering::SeqCst) && !self.disabled.load(Ordering::SeqCst)
    }

    /// The negotiated state and the counts of opens, for the ops socket.
    pub fn status(&self) -> PassthroughStatus {
        PassthroughStatus {
            wanted: self.wanted,
            granted: self.granted.load(Ordering::SeqCst),
            disabled: self.disabled.load(Ordering::SeqCst),
            passthrough_opens: self.passthrough_opens.load(Ordering::SeqCst),
            plain_opens: self.plain_opens.load(Ordering::SeqCst),
        }
    }

    /// Decide how to answer an open of `ino` (see the module doc): reuse
    /// the inode's backing id, or register one with `register` (which
    /// wraps the reply's `open_backing`), or answer plain. Counts the
    /// answer. A plain answer must be ended with
    /// [`Passthrough::plain_released`] when its handle is released.
    pub fn mode_for(
        &self,
        ino: u64,
        open: OpenKind,
        register: impl FnOnce() -> io::Result<BackingId>,
    ) -> Result<Mode, io::Error> {
        let mode = self.decide(ino, open, register)?;
        let counter = match mode {
            Mode::Passthrough(_) => &self.passthrough_opens,
            Mode::Plain => &self.plain_opens,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(mode)
    }

    /// A handle of `ino` answered [`Mode::Plain`] was released.
    pub fn plain_released(&self, ino: u64) {
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(InodeIo::Plain { handles }) = inodes.get_mut(&ino) {
            *handles = handles.saturating_sub(1);
            if *handles == 0 {
                inodes.remove(&ino);
            }
        }
    }

    fn decide(
        &self,
        ino: u64,
        open: OpenKind,
        register: impl FnOnce() -> io::Result<BackingId>,
    ) -> Result<Mode, io::Error> {
        if !self.active() {
            return Ok(Mode::Plain);
        }
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        match inodes.get_mut(&ino) {
            Some(InodeIo::Plain { handles }) if *handles > 0 => {
                *handles += 1;
                return Ok(Mode::Plain);
            }
            Some(InodeIo::Passthrough { content, id }) => {
                if let Some(id) = id.upgrade() {
                    if *content == open.content && !open.partial {
                        return Ok(Mode::Passthrough(id));
                    }
                    if open.writable {
                        tracing::info!(
                            ino,
                            "refused an open for writing: an older version of the file is open through passthrough"
                        );
                        return Err(io::Error::from_raw_os_error(libc::EBUSY));
                    }
                    tracing::info!(
                        ino,
                        "an older version of the file is open through passthrough; this open reads that version"
                    );
                    return Ok(Mode::Passthrough(id));
                }
            }
            _ => {}
        }
        inodes.retain(|_, io| io.live());
        if open.partial {
            inodes.insert(ino, InodeIo::Plain { handles: 1 });
            return Ok(Mode::Plain);
        }
        match register() {
            Ok(id) => {
                let id = Arc::new(id);
                inodes.insert(
                    ino,
                    InodeIo::Passthrough {
                        content: open.content,
                        id: Arc::downgrade(&id),
                    },
                );
                self.used.store(true, Ordering::SeqCst);
                Ok(Mode::Passthrough(id))
            }
            Err(e) if is_unsupported(&e) && !self.used.load(Ordering::SeqCst) => {
                if !self.disabled.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        error = %e,
                        "FUSE passthrough is not usable here; reads and writes go through keibi-mountd instead"
                    );
                }
                Ok(Mode::Plain)
            }
            Err(e) => Err(e),
        }
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS | libc::ELOOP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_when_not_wanted_or_not_granted() {
        let p = Passthrough::new(false);
        p.set_granted(true);
        assert!(matches!(
            p.mode_for(2, open(false, false), || panic!("must not register")),
            Ok(Mode::Plain)
        ));
        let p = Passthrough::new(true);
        assert!(matches!(
            p.mode_for(2, open(false, false), || panic!("must not register")),
            Ok(Mode::Plain)
        ));
    }

    #[test]
    fn unsupported_before_first_success_turns_it_off() {
        let p = Passthrough::new(true);
        p.set_granted(true);
        assert!(p.active());
        let r = p.mode_for(2, open(false, false), || {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        });
        assert!(matches!(r, Ok(Mode::Plain)));
        assert!(!p.active());
        let st = p.status();
        assert!(st.wanted && st.granted && st.disabled);
        assert_eq!((st.passthrough_opens, st.plain_opens), (0, 1));
    }

    #[tokio::test]
    async fn the_state_is_reported_after_init() {
        let p = Arc::new(Passthrough::new(true));
        let q = p.clone();
        let waiter = tokio::spawn(async move {
            q.initialized_within(std::time::Duration::from_secs(60))
                .await;
            q.active()
        });
        p.set_granted(true);
        p.set_initialized();
        let active = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("the wait ends once init is done")
            .expect("join");
        assert!(active, "granted before the wait ended");
    }

    fn open(partial: bool, writable: bool) -> OpenKind {
        OpenKind {
            content: ContentId {
                dev: 1,
                ino: 10,
                uid: 65534,
            },
            partial,
            writable,
        }
    }

    fn active() -> Passthrough {
        let p = Passthrough::new(true);
        p.set_granted(true);
        p
    }

    #[test]
    fn a_partial_open_is_plain_and_keeps_later_opens_plain() {
        let p = active();
        let r = p.mode_for(7, open(true, false), || panic!("must not register"));
        assert!(matches!(r, Ok(Mode::Plain)));
        // The file became complete meanwhile: the kernel holds the inode in
        // cached mode, so a passthrough open would fail; plain it is.
        let r = p.mode_for(7, open(false, true), || panic!("must not register"));
        assert!(matches!(r, Ok(Mode::Plain)));
        // Another inode is not affected.
        let mut asked = false;
        let _ = p.mode_for(8, open(false, false), || {
            asked = true;
            Err(io::Error::from_raw_os_error(libc::EBADF))
        });
        assert!(asked, "inode 8 registers its own backing file");
        p.plain_released(7);
        let mut asked = false;
        let _ = p.mode_for(7, open(false, false), || {
            asked = true;
            Err(io::Error::from_raw_os_error(libc::EBADF))
        });
        assert!(!asked, "one plain handle of inode 7 is still live");
        // That open was plain too: release it and the one before.
        p.plain_released(7);
        p.plain_released(7);
        let mut asked = false;
        let _ = p.mode_for(7, open(false, false), || {
            asked = true;
            Err(io::Error::from_raw_os_error(libc::EBADF))
        });
        assert!(asked, "the last plain handle is gone: passthrough again");
        let st = p.status();
        assert_eq!((st.passthrough_opens, st.plain_opens), (0, 3));
    }

    #[test]
    fn releasing_unknown_plain_handles_is_harmless() {
        let p = active();
        p.plain_released(3);
        let _ = p.mode_for(3, open(true, false), || panic!("must not register"));
        p.plain_released(3);
        p.plain_released(3);
        let mut asked = false;
        let _ = p.mode_for(3, open(false, false), || {
            asked = true;
            Err(io::Error::from_raw_os_error(libc::EBADF))
        });
        assert!(asked);
    }

    #[test]
    fn other_failures_are_errors() {
        let p = Passthrough::new(true);
        p.set_granted(true);
        let r = p.mode_for(2, open(false, false), || {
            Err(io::Error::from_raw_os_error(libc::EBADF))
        });
        assert!(r.is_err());
        assert!(p.active());
        let st = p.status();
        assert_eq!((st.passthrough_opens, st.plain_opens), (0, 0));
    }
}
