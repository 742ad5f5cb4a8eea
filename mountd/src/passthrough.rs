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
//! passthrough or direct I/O: they share the inode's page cache) or in
//! passthrough mode, with one backing file. An open answered without
//! passthrough while a passthrough open of the inode is live fails with
//! `EIO` (direct I/O or not), and so does a passthrough open while a
//! cached open is live, or one with another backing file. An open with
//! `FOPEN_DIRECT_IO` (and no passthrough) takes neither mode. The
//! registry keeps, per inode, either the live backing id with the content
//! file it was registered for, or the content file and number of the live
//! cached handles, and decides each open ([`Passthrough::mode_for`]):
//!
//! - while cached handles of the inode are live, new opens are plain: a
//!   cached one for the same content file, a direct-I/O one for another
//!   (a newer version from a peer), so that the pages of one version never
//!   answer reads of the other and each handle reads the version it
//!   opened;
//! - plain (cached) too: an open whose file is not all local
//!   ([`crate::ondemand`]), and a read-only open of an inode a peer changed
//!   during this run ([`Passthrough::peer_changed_inode`]): a read-only
//!   passthrough open would tie the inode to one version's backing file
//!   while it is open, and the next version from the peer could then not
//!   be opened beside it;
//! - while a passthrough open of the inode is live, an open of the same
//!   complete content file shares its backing id; an open of another
//!   content file (a version from a peer that arrived while a handle
//!   opened before the peer's first change was open) or of a partial file
//!   cannot get a mode of its own: read-only, it shares the live backing id
//!   and reads the version that is open (logged); for writing it fails
//!   with `EBUSY` rather than write into a version syncd no longer keeps.
//!
//! Which inodes a peer changed: those of `Inval::Inode` items, partial
//! opens, and the inodes that names announced by `Inval::Entry` items turn
//! out to be at their next `lookup`, `create` or `readdirplus`
//! ([`Passthrough::entry_seen`]). Both sets are bounded
//! ([`MAX_PEER_MARKS`]; when full they start again empty, which only
//! lets more opens use passthrough).
//!
//! Every decision is counted (passthrough or plain), and [`Passthrough::status`]
//! reports the counts with the negotiated state on mountd's ops socket
//! (`keibictl debug passthrough`), so a user or a test can see that opens
//! really went through the kernel rather than trusting a flag.
//!
//! Locks: `inodes` and `peer` are leaf locks, never held together.
//! `inodes` is held across the registration
//! ioctl (a bounded call into the kernel that never waits on another
//! process) so two concurrent opens of one inode cannot register two ids.

use fuser::BackingId;
use ipc_schema::{ContentId, PassthroughStatus};
use std::collections::{HashMap, HashSet};
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
    /// What peers changed in this run (see the module doc).
    peer: Mutex<PeerMarks>,
}

/// Most inodes (and, separately, announced names) remembered as changed
/// by a peer.
pub const MAX_PEER_MARKS: usize = 1 << 20;

#[derive(Default)]
struct PeerMarks {
    inos: HashSet<u64>,
    /// Names a peer added or changed whose inode is not known yet.
    names: HashSet<(u64, Vec<u8>)>,
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
    /// This many cached (plain, not direct I/O) handles of this content
    /// file are live (never 0).
    Plain { content: ContentId, handles: usize },
}

impl InodeIo {
    fn live(&self) -> bool {
        match self {
            InodeIo::Passthrough { id, .. } => id.strong_count() > 0,
            InodeIo::Plain { handles, .. } => *handles > 0,
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
    /// With `pread`/`pwrite` in mountd, through the kernel's page cache
    /// (ended with [`Passthrough::plain_released`]).
    Plain,
    /// With `pread`/`pwrite` in mountd, with `FOPEN_DIRECT_IO`: no page
    /// cache, so another version's cached handles are not disturbed.
    PlainDirect,
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
            peer: Mutex::new(PeerMarks::default()),
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
            Mode::Plain | Mode::PlainDirect => &self.plain_opens,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(mode)
    }

    /// A handle of `ino` answered [`Mode::Plain`] was released.
    pub fn plain_released(&self, ino: u64) {
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(InodeIo::Plain { handles, .. }) = inodes.get_mut(&ino) {
            *handles = handles.saturating_sub(1);
            if *handles == 0 {
                inodes.remove(&ino);
            }
        }
    }

    /// A peer changed `ino` (its content or attributes).
    pub fn peer_changed_inode(&self, ino: u64) {
        let mut p = self.peer.lock().unwrap_or_else(|p| p.into_inner());
        if p.inos.len() >= MAX_PEER_MARKS {
            p.inos.clear();
        }
        p.inos.insert(ino);
    }

    /// A peer added or changed the name `parent/name`; its inode is
    /// marked when [`Passthrough::entry_seen`] learns it.
    pub fn peer_changed_entry(&self, parent: u64, name: &[u8]) {
        let mut p = self.peer.lock().unwrap_or_else(|p| p.into_inner());
        if p.names.len() >= MAX_PEER_MARKS {
            p.names.clear();
        }
        p.names.insert((parent, name.to_vec()));
    }

    /// syncd said `parent/name` is `ino` (`lookup`, `create`,
    /// `readdirplus`): if a peer announced that name, `ino` is marked.
    pub fn entry_seen(&self, parent: u64, name: &[u8], ino: u64) {
        let mut p = self.peer.lock().unwrap_or_else(|p| p.into_inner());
        if p.names.is_empty() {
            return;
        }
        if p.names.remove(&(parent, name.to_vec())) {
            if p.inos.len() >= MAX_PEER_MARKS {
                p.inos.clear();
            }
            p.inos.insert(ino);
        }
    }

    fn changed_by_peer(&self, ino: u64) -> bool {
        let p = self.peer.lock().unwrap_or_else(|p| p.into_inner());
        p.inos.contains(&ino)
    }

    fn decide(
        &self,
        ino: u64,
        open: OpenKind,
        register: impl FnOnce() -> io::Result<BackingId>,
    ) -> Result<Mode, io::Error> {
        if open.partial {
            self.peer_changed_inode(ino);
        }
        let by_peer = self.changed_by_peer(ino);
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        match inodes.get_mut(&ino) {
            Some(InodeIo::Plain { content, handles }) if *handles > 0 => {
                if *content == open.content {
                    *handles += 1;
                    return Ok(Mode::Plain);
                }
                tracing::info!(
                    ino,
                    "another version of the file is open; this open reads its own version with direct I/O"
                );
                return Ok(Mode::PlainDirect);
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
        let plain = InodeIo::Plain {
            content: open.content,
            handles: 1,
        };
        if !self.active() || open.partial || (by_peer && !open.writable) {
            inodes.insert(ino, plain);
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
                inodes.insert(ino, plain);
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
        let _ = p.mode_for(7, open(false, true), || {
            asked = true;
            Err(io::Error::from_raw_os_error(libc::EBADF))
        });
        assert!(!asked, "one plain handle of inode 7 is still live");
        // That open was plain too: release it and the one before.
        p.plain_released(7);
        p.plain_released(7);
        // The file came from a peer (its open was partial): read-only
        // opens stay plain, a writer may use passthrough again.
        let r = p.mode_for(7, open(false, false), || panic!("must not register"));
        assert!(matches!(r, Ok(Mode::Plain)));
        p.plain_released(7);
        let mut asked = false;
        let _ = p.mode_for(7, open(false, true), || {
            asked = true;
            Err(io::Error::from_raw_os_error(libc::EBADF))
        });
        assert!(asked, "the last plain handle is gone: passthrough again");
        let st = p.status();
        assert_eq!((st.passthrough_opens, st.plain_opens), (0, 4));
    }

    fn other_version(partial: bool, writable: bool) -> OpenKind {
        OpenKind {
            content: ContentId {
                dev: 1,
                ino: 11,
                uid: 65534,
            },
            ..open(partial, writable)
        }
    }

    fn registers(p: &Passthrough, ino: u64, o: OpenKind) -> bool {
        let mut asked = false;
        let _ = p.mode_for(ino, o, || {
            asked = true;
            Err(io::Error::from_raw_os_error(libc::EBADF))
        });
        asked
    }

    #[test]
    fn another_version_beside_cached_handles_is_direct_io() {
        let p = active();
        // A handle of version 1 is open through the page cache ...
        let r = p.mode_for(7, open(true, false), || panic!("must not register"));
        assert!(matches!(r, Ok(Mode::Plain)));
        // ... and version 2 arrives: its opens bypass the page cache, so
        // neither version's pages answer the other's reads.
        for o in [other_version(true, false), other_version(false, true)] {
            let r = p.mode_for(7, o, || panic!("must not register"));
            assert!(matches!(r, Ok(Mode::PlainDirect)));
        }
        // Direct-I/O handles are not counted: one release ends the mode.
        p.plain_released(7);
        assert!(registers(&p, 7, other_version(false, true)));
        let st = p.status();
        assert_eq!(st.plain_opens, 3);
    }

    #[test]
    fn read_only_opens_of_what_a_peer_changed_are_plain() {
        let p = active();
        p.peer_changed_inode(4);
        let r = p.mode_for(4, open(false, false), || panic!("must not register"));
        assert!(matches!(r, Ok(Mode::Plain)));
        p.plain_released(4);
        assert!(registers(&p, 4, open(false, true)), "writers may use it");
        // A name a peer announced marks the inode it turns out to be.
        assert!(registers(&p, 5, open(false, false)));
        p.peer_changed_entry(1, b"new.txt");
        p.entry_seen(1, b"other", 5);
        assert!(registers(&p, 5, open(false, false)), "another name");
        p.entry_seen(1, b"new.txt", 5);
        let r = p.mode_for(5, open(false, false), || panic!("must not register"));
        assert!(matches!(r, Ok(Mode::Plain)));
        // A partial open marks its inode too.
        let _ = p.mode_for(6, open(true, false), || panic!("must not register"));
        p.plain_released(6);
        let r = p.mode_for(6, open(false, false), || panic!("must not register"));
        assert!(matches!(r, Ok(Mode::Plain)));
    }

    #[test]
    fn peer_marks_are_bounded() {
        let p = active();
        for ino in 0..MAX_PEER_MARKS as u64 + 1 {
            p.peer_changed_inode(ino);
        }
        let n = p.peer.lock().expect("lock").inos.len();
        assert!(n <= MAX_PEER_MARKS, "{n} marks kept");
    }

    #[test]
    fn without_passthrough_versions_still_keep_their_pages_apart() {
        let p = Passthrough::new(false);
        let r = p.mode_for(3, open(false, false), || panic!("must not register"));
        assert!(matches!(r, Ok(Mode::Plain)));
        let r = p.mode_for(3, other_version(false, false), || {
            panic!("must not register")
        });
        assert!(matches!(r, Ok(Mode::PlainDirect)));
    }

    #[test]
    fn releasing_unknown_plain_handles_is_harmless() {
        let p = active();
        p.plain_released(3);
        let _ = p.mode_for(3, open(true, false), || panic!("must not register"));
        p.plain_released(3);
        p.plain_released(3);
        let mut asked = false;
        let _ = p.mode_for(3, open(false, true), || {
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
