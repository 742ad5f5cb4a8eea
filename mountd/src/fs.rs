//! The filesystem's operations, knowing nothing of fuser: each one either
//! works on a descriptor mountd holds (bounded local work, called inline
//! by the dispatch thread) or calls syncd with a deadline (an `async fn`
//! the [`crate::fuse`] adapter runs on a tokio task).
//!
//! Deadline rule (see `docs/architecture.md`): when syncd does not answer
//! in time, `getattr` answers the last attributes mountd saw for the inode
//! and `lookup` the last entry it saw for the name; every other operation
//! answers `ETIMEDOUT`. Reads, writes, `flush` and `release` never wait on
//! syncd: they use the descriptor in the [`HandleTable`], and `release`
//! queues the news for syncd ([`crate::releases`], delivered and retried
//! in the background). After one missed deadline syncd
//! counts as stalled and calls wait only briefly until it answers again
//! ([`crate::syncd_client`]), so a command that makes several calls in a
//! row (`stat`: lookup then getattr) still answers within about one
//! deadline.
//!
//! Opening is two steps so that no borrow of the FUSE reply lives across
//! an await: [`Keibi::open_fd`] / [`Keibi::create_fd`] (async: syncd opens
//! the content file, the descriptor arrives on the fd channel, it is
//! validated by [`fd_check`]) then [`Keibi::install`] (sync: passthrough
//! registration and the handle table).
//!
//! Directories: `opendir` gives each open directory its own handle with a
//! read-ahead of entries ([`crate::dir_handles`]), so most `readdir`s are
//! answered inline without syncd. Whether a read-ahead may still be used
//! depends on the mount's change counter: every operation that changes
//! names or attributes through this mount (and the last close of a file
//! written here) counts once when it is sent and once when it is answered,
//! so a read-ahead asked for before or during a change is never used
//! after it.

use crate::attr_cache::{AttrCache, Ticket};
use crate::attr_inval::AttrInval;
use crate::dir_handles::{self, DirHandles, ReadAhead};
use crate::fd_check::{self, Access};
use crate::handles::{Handle, HandleTable};
use crate::passthrough::{Mode, Passthrough};
use crate::releases::Releases;
use crate::syncd_client::{CallError, Retry, SyncdClient};
use fuser::BackingId;
use ipc_schema::{
    Attr, Caller, DirCookie, DirEntry, FileKind, FsError, HandleId, Ino, Name, Opened, RenameFlags,
    SetAttr, StatFs, XattrSet, fs_err,
};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Extra time to wait for a descriptor whose `open` answer has arrived:
/// syncd sends it before answering, so it is normally already queued.
const FD_GRACE: Duration = Duration::from_millis(100);
/// Margin beyond the longest an open can wait for its descriptor, after
/// which a descriptor nobody took is closed and its open released.
const UNCLAIMED_MARGIN: Duration = Duration::from_secs(1);

/// The state behind the FUSE adapter.
pub struct Keibi {
    client: SyncdClient,
    cache: Arc<AttrCache>,
    handles: Arc<HandleTable>,
    /// Releases on their way to syncd.
    releases: Arc<Releases>,
    dirs: DirHandles,
    /// Counts changes made through this mount (see the module doc).
    changes: AtomicU64,
    passthrough: Arc<Passthrough>,
    deadline: Duration,
    /// How long `fsync`/`fsyncdir` wait for local durability (mountd's
    /// `sync_all` and syncd's store flush together).
    fsync_deadline: Duration,
    /// Drops the kernel's cached attributes of inodes opened for writing.
    attr_inval: Option<AttrInval>,
    rt: tokio::runtime::Handle,
}

/// The default of `--fsync-deadline`.
pub const DEFAULT_FSYNC_DEADLINE: Duration = Duration::from_secs(30);

/// Counts a change on the mount when made and again when dropped: hold it
/// for as long as the change may be in flight at syncd.
struct Change<'a>(&'a AtomicU64);

impl<'a> Change<'a> {
    fn begin(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Change(counter)
    }
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// An answer to `getxattr`/`listxattr`.
pub enum XattrReply {
    /// The size of the value (the caller asked with size 0).
    Size(u32),
    /// The value.
    Data(Vec<u8>),
}

/// A descriptor syncd sent for an open, validated, not yet installed.
pub struct OpenedFd {
    /// syncd's answer.
    pub opened: Opened,
    /// The content file.
    pub fd: OwnedFd,
    /// Opened with write access.
    pub writable: bool,
}

impl Keibi {
    /// The filesystem over `client`, answering within `deadline`;
    /// attributes given to the kernel are valid for `attr_ttl`.
    pub fn new(
        client: SyncdClient,
        passthrough: Arc<Passthrough>,
        deadline: Duration,
        cache: AttrCache,
        attr_ttl: Duration,
        rt: tokio::runtime::Handle,
    ) -> Self {
        let handles = Arc::new(HandleTable::default());
        let cache = Arc::new(cache);
        client.report_handles_of(handles.clone(), cache.clone());
        let releases = Arc::new(Releases::default());
        rt.spawn(releases.clone().deliver(
            client.clone(),
            deadline,
            deadline + FD_GRACE + UNCLAIMED_MARGIN,
        ));
        Keibi {
            client,
            cache,
            handles,
            releases,
            dirs: DirHandles::new(attr_ttl),
            changes: AtomicU64::new(0),
            passthrough,
            deadline,
            fsync_deadline: DEFAULT_FSYNC_DEADLINE,
            attr_inval: None,
            rt,
        }
    }

    /// Use `d` as the deadline of `fsync`/`fsyncdir` instead of
    /// [`DEFAULT_FSYNC_DEADLINE`].
    pub fn with_fsync_deadline(mut self, d: Duration) -> Self {
        self.fsync_deadline = d;
        self
    }

    /// Invalidate the kernel's cached attributes of an inode through
    /// `inval` when a handle opens it for writing ([`crate::attr_inval`]).
    pub fn with_attr_inval(mut self, inval: AttrInval) -> Self {
        self.attr_inval = Some(inval);
        self
    }

    /// The attribute TTL to give the kernel for `ino`: 0 while a handle of
    /// this mount has it open for writing (stores through a shared mapping
    /// change its times without the kernel noticing, see
    /// [`crate::attr_inval`]), else `ttl`.
    pub fn attr_ttl(&self, ino: u64, ttl: Duration) -> Duration {
        if self.handles.has_writer(ino) {
            Duration::ZERO
        } else {
            ttl
        }
    }

    /// The passthrough state (for `init`).
    pub fn passthrough(&self) -> &Passthrough {
        &self.passthrough
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.deadline
    }

    fn change(&self) -> Change<'_> {
        Change::begin(&self.changes)
    }

    fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// `lookup`, or the last known entry when syncd misses the deadline.
    pub async fn lookup(&self, parent: u64, name: Name) -> Result<Attr, FsError> {
        let n = name.clone();
        let ticket = self.cache.ticket();
        let r = self
            .client
            .call(
                "lookup",
                parent,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| {
                    let n = n.clone();
                    async move { c.client.lookup(ctx, Ino(parent), n).await }
                },
            )
            .await;
        match r {
            Ok(a) => {
                self.cache.put_entry(ticket, parent, name.as_bytes(), &a);
                Ok(a)
            }
            Err(CallError::Deadline { waited }) => {
                match self.cache.entry(parent, name.as_bytes()) {
                    Some(a) => {
                        tracing::info!(
                            op = "lookup",
                            ino = parent,
                            waited_ms = waited.as_millis() as u64,
                            "answered with the last known entry"
                        );
                        Ok(a)
                    }
                    None => Err(CallError::Deadline { waited }.into_fs("lookup")),
                }
            }
            Err(CallError::Fs(e)) => {
                if e.errno == libc::ENOENT {
                    self.cache.forget_entry(parent, name.as_bytes());
                }
                Err(e)
            }
        }
    }

    /// `getattr`, or the last known attributes when syncd misses the
    /// deadline.
    ///
    /// An inode syncd does not know but the kernel still holds was removed
    /// while referenced: it answers its last known attributes with
    /// `nlink` 0 (see [`crate::attr_cache`]).
    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let ticket = self.cache.ticket();
        let r = self
            .client
            .call(
                "getattr",
                ino,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| async move { c.client.getattr(ctx, Ino(ino)).await },
            )
            .await;
        match r {
            Ok(a) => {
                self.cache.put_attr(ticket, &a);
                Ok(a)
            }
            Err(CallError::Fs(e)) if e.errno == libc::ENOENT => match self.cache.removed(ino) {
                Some(a) => {
                    tracing::debug!(ino, "removed but still referenced: nlink 0");
                    Ok(a)
                }
                None => Err(e),
            },
            Err(CallError::Deadline { waited }) => match self.cache.attr(ino) {
                Some(a) => {
                    tracing::info!(
                        op = "getattr",
                        ino,
                        waited_ms = waited.as_millis() as u64,
                        "answered with the last known attributes"
                    );
                    Ok(a)
                }
                None => Err(CallError::Deadline { waited }.into_fs("getattr")),
            },
            Err(CallError::Fs(e)) => Err(e),
        }
    }

    /// `setattr`.
    pub async fn setattr(&self, ino: u64, changes: SetAttr) -> Result<Attr, FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let a = self
            .client
            .call(
                "setattr",
                ino,
                self.deadline(),
                Retry::Once,
                |c, ctx| async move { c.client.setattr(ctx, Ino(ino), changes).await },
            )
            .await
            .map_err(|e| e.into_fs("setattr"))?;
        self.cache.changed(ticket, ino, Some(&a));
        Ok(a)
    }

    /// `readlink`.
    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        self.client
            .call(
                "readlink",
                ino,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| async move { c.client.readlink(ctx, Ino(ino)).await },
            )
            .await
            .map_err(|e| e.into_fs("readlink"))
    }

    /// The answer of a change that made `parent/name` (sent at `ticket`):
    /// the new entry's inode and the parent changed.
    fn created(
        &self,
        ticket: Ticket,
        parent: u64,
        name: &Name,
        r: Result<Attr, CallError>,
        op: &str,
    ) -> Result<Attr, FsError> {
        let a = r.map_err(|e| e.into_fs(op))?;
        self.cache.changed(ticket, a.ino.0, Some(&a));
        self.cache.changed(ticket, parent, None);
        self.cache.put_entry(ticket, parent, name.as_bytes(), &a);
        Ok(a)
    }

    /// A change that removed or replaced `parent/name` (sent at `ticket`)
    /// completed: the parent and the inode the name had (if known) changed.
    fn removed_entry(&self, ticket: Ticket, parent: u64, name: &[u8], ino: Option<u64>) {
        if let Some(ino) = ino {
            self.cache.changed(ticket, ino, None);
        }
        self.cache.changed(ticket, parent, None);
        self.cache.forget_entry(parent, name);
    }

    /// `mkdir` (`perm` already masked by the umask).
    pub async fn mkdir(
        &self,
        parent: u64,
        name: Name,
        perm: u16,
        caller: Caller,
    ) -> Result<Attr, FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let n = name.clone();
        let r = self
            .client
            .call("mkdir", parent, self.deadline(), Retry::Once, |c, ctx| {
                let n = n.clone();
                async move { c.client.mkdir(ctx, Ino(parent), n, perm, caller).await }
            })
            .await;
        self.created(ticket, parent, &name, r, "mkdir")
    }

    /// `mknod` of a fifo, socket or device node (stored as metadata with
    /// its `rdev`; the mount is `nodev`); a regular file is created and
    /// closed again.
    pub async fn mknod(
        &self,
        parent: u64,
        name: Name,
        mode: u32,
        perm: u16,
        rdev: u32,
        caller: Caller,
    ) -> Result<Attr, FsError> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFREG | 0 => {
                let got = self
                    .create_fd(parent, name, perm, libc::O_RDONLY, caller)
                    .await?;
                let attr = got.opened.attr;
                drop(got.fd);
                self.abandon(got.opened.handle);
                return Ok(attr);
            }
            other => return Err(fs_err!(EINVAL, "mknod: unknown file type {other:#o}")),
        };
        let _change = self.change();
        let ticket = self.cache.ticket();
        let n = name.clone();
        let r = self
            .client
            .call("mknod", parent, self.deadline(), Retry::Once, |c, ctx| {
                let n = n.clone();
                async move {
                    c.client
                        .mknod(ctx, Ino(parent), n, kind, perm, rdev, caller)
                        .await
                }
            })
            .await;
        self.created(ticket, parent, &name, r, "mknod")
    }

    /// `symlink`.
    pub async fn symlink(
        &self,
        parent: u64,
        name: Name,
        target: Vec<u8>,
        caller: Caller,
    ) -> Result<Attr, FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let n = name.clone();
        let r = self
            .client
            .call("symlink", parent, self.deadline(), Retry::Once, |c, ctx| {
                let n = n.clone();
                let t = target.clone();
                async move { c.client.symlink(ctx, Ino(parent), n, t, caller).await }
            })
            .await;
        self.created(ticket, parent, &name, r, "symlink")
    }

    /// `link`.
    pub async fn link(&self, ino: u64, new_parent: u64, new_name: Name) -> Result<Attr, FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let n = new_name.clone();
        let r = self
            .client
            .call("link", ino, self.deadline(), Retry::Once, |c, ctx| {
                let n = n.clone();
                async move { c.client.link(ctx, Ino(ino), Ino(new_parent), n).await }
            })
            .await;
        self.created(ticket, new_parent, &new_name, r, "link")
    }

    /// `unlink`.
    pub async fn unlink(&self, parent: u64, name: Name) -> Result<(), FsError> {
        let _change = self.change();
        let deadline = self.deadline();
        self.releases.crossings_settled(deadline).await;
        let ticket = self.cache.ticket();
        let n = name.clone();
        let ino = self.cache.entry_ino(parent, name.as_bytes());
        self.cache.forget_entry(parent, name.as_bytes());
        let r = self
            .client
            .call("unlink", parent, deadline, Retry::Once, |c, ctx| {
                let n = n.clone();
                async move { c.client.unlink(ctx, Ino(parent), n).await }
            })
            .await;
        self.removed_entry(ticket, parent, name.as_bytes(), ino);
        r.map_err(|e| e.into_fs("unlink"))
    }

    /// `rmdir`.
    pub async fn rmdir(&self, parent: u64, name: Name) -> Result<(), FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let n = name.clone();
        let ino = self.cache.entry_ino(parent, name.as_bytes());
        self.cache.forget_entry(parent, name.as_bytes());
        let r = self
            .client
            .call("rmdir", parent, self.deadline(), Retry::Once, |c, ctx| {
                let n = n.clone();
                async move { c.client.rmdir(ctx, Ino(parent), n).await }
            })
            .await;
        self.removed_entry(ticket, parent, name.as_bytes(), ino);
        r.map_err(|e| e.into_fs("rmdir"))
    }

    /// `rename`.
    pub async fn rename(
        &self,
        parent: u64,
        name: Name,
        new_parent: u64,
        new_name: Name,
        flags: RenameFlags,
    ) -> Result<(), FsError> {
        let _change = self.change();
        let deadline = self.deadline();
        self.releases.crossings_settled(deadline).await;
        let ticket = self.cache.ticket();
        let src = self.cache.entry_ino(parent, name.as_bytes());
        let dst = self.cache.entry_ino(new_parent, new_name.as_bytes());
        self.cache.forget_entry(parent, name.as_bytes());
        self.cache.forget_entry(new_parent, new_name.as_bytes());
        let r = self
            .client
            .call("rename", parent, deadline, Retry::Once, |c, ctx| {
                let (n, nn) = (name.clone(), new_name.clone());
                async move {
                    c.client
                        .rename(ctx, Ino(parent), n, Ino(new_parent), nn, flags)
                        .await
                }
            })
            .await;
        self.removed_entry(ticket, parent, name.as_bytes(), src);
        self.removed_entry(ticket, new_parent, new_name.as_bytes(), dst);
        r.map_err(|e| e.into_fs("rename"))
    }

    /// `readdir`: up to `limit` entries after `after`, with attributes if
    /// `plus` (then remembered for deadline answers).
    pub async fn readdir(
        &self,
        dir: u64,
        after: u64,
        limit: u32,
        plus: bool,
    ) -> Result<Vec<DirEntry>, FsError> {
        let op = if plus { "readdirplus" } else { "readdir" };
        let ticket = self.cache.ticket();
        let entries = self
            .client
            .call(
                op,
                dir,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| async move {
                    c.client
                        .readdir(ctx, Ino(dir), DirCookie(after), limit, plus)
                        .await
                },
            )
            .await
            .map_err(|e| e.into_fs(op))?;
        for e in &entries {
            if let Some(a) = &e.attr
                && e.name.as_bytes() != b"."
                && e.name.as_bytes() != b".."
            {
                self.cache.put_entry(ticket, dir, e.name.as_bytes(), a);
            }
        }
        Ok(entries)
    }

    /// `opendir`: a new directory handle for `dir`.
    pub fn opendir(&self, dir: u64) -> u64 {
        self.dirs.open(dir)
    }

    /// `releasedir`: forget the handle and its read-ahead.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.release(fh);
    }

    /// The read-ahead of handle `fh` if it answers a request at `offset`
    /// (bounded local work, for the dispatch thread). Its entries go to
    /// the kernel while [`Keibi::usable_ahead`] accepts them.
    pub fn read_ahead(&self, fh: u64, dir: u64, offset: u64, plus: bool) -> Option<ReadAhead> {
        self.dirs.take(fh, dir, offset, plus, self.changes())
    }

    /// Whether an entry of a read-ahead may go to the kernel: not with
    /// attributes while its file is open for writing on this mount (they
    /// may be older than the kernel's).
    pub fn usable_ahead(&self, e: &DirEntry, plus: bool) -> bool {
        !plus || !self.handles.has_writer(e.ino.0)
    }

    /// Ask syncd for the entries after `offset`, a batch larger than one
    /// reply: what the reply does not take is kept with
    /// [`Keibi::keep_ahead`].
    pub async fn read_dir_batch(
        &self,
        dir: u64,
        offset: u64,
        plus: bool,
    ) -> Result<ReadAhead, FsError> {
        let changes = self.changes();
        let asked_at = std::time::Instant::now();
        let batch = dir_handles::batch(plus);
        let entries = self.readdir(dir, offset, batch, plus).await?;
        Ok(ReadAhead::new(
            offset, entries, batch, plus, asked_at, changes,
        ))
    }

    /// The entries after `offset` for a request the read-ahead of `fh`
    /// could not answer inline: from the prefetch on its way if it
    /// continues there (waited for within the deadline), else fresh from
    /// syncd. The flag says which: entries fresh from syncd may all go to
    /// the kernel, the others only while [`Keibi::usable_ahead`] accepts
    /// them.
    pub async fn next_entries(
        &self,
        fh: u64,
        dir: u64,
        offset: u64,
        plus: bool,
    ) -> Result<(ReadAhead, bool), FsError> {
        if let Some(mut done) = self.dirs.coming(fh, dir, offset, plus) {
            // Returns once the fetch is over, however it ended.
            let _ = tokio::time::timeout_at(self.deadline(), done.changed()).await;
            if let Some(a) = self.read_ahead(fh, dir, offset, plus)
                && a.front_usable(|e| self.usable_ahead(e, plus))
            {
                return Ok((a, false));
            }
        }
        Ok((self.read_dir_batch(dir, offset, plus).await?, true))
    }

    /// Keep what a reply did not take for the next request on `fh`; with
    /// `reading_on` (the reply came from a read-ahead), fetch the next
    /// batch in the background when this one runs low.
    pub fn keep_ahead(self: &Arc<Self>, fh: u64, dir: u64, ahead: ReadAhead, reading_on: bool) {
        let Some(p) = self.dirs.keep(fh, dir, ahead, reading_on) else {
            return;
        };
        let k = self.clone();
        self.rt.spawn(async move {
            let batch = k.read_dir_batch(dir, p.after, p.plus).await.ok();
            k.dirs.arrived(fh, dir, batch);
            // Wakes the requests waiting for this batch.
            drop(p.done);
        });
    }

    /// Ask syncd to open `ino`, and take and validate the descriptor.
    pub async fn open_fd(&self, ino: u64, flags: i32) -> Result<OpenedFd, FsError> {
        // O_TRUNC changes the size; a writer changes it later.
        let _change = (Access::of_flags(flags) != Access::Read || flags & libc::O_TRUNC != 0)
            .then(|| self.change());
        let ticket = self.cache.ticket();
        let deadline = self.deadline();
        let r = self
            .client
            .call("open", ino, deadline, Retry::Once, |c, ctx| async move {
                Ok(c.client
                    .open(ctx, Ino(ino), flags)
                    .await?
                    .map(|o| (o, c.clone())))
            })
            .await;
        // The kernel found a name for `ino` and opens it by number. syncd
        // keeps an unlinked inode while the kernel references it (see
        // `crate::releases`), so this only meets an inode syncd really
        // freed (the limits in docs/architecture.md). ESTALE makes the
        // kernel look the name up again and retry once (as for NFS),
        // which opens or creates whatever the name is now.
        let r = r.map_err(|e| match e {
            CallError::Fs(e) if e.errno == libc::ENOENT => {
                CallError::Fs(FsError::new(libc::ESTALE, e.message))
            }
            e => e,
        });
        self.receive_fd("open", ino, flags, deadline, ticket, r)
            .await
    }

    /// Ask syncd to create and open `parent/name`, and take and validate
    /// the descriptor.
    pub async fn create_fd(
        &self,
        parent: u64,
        name: Name,
        perm: u16,
        flags: i32,
        caller: Caller,
    ) -> Result<OpenedFd, FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let deadline = self.deadline();
        let n = name.clone();
        let r = self
            .client
            .call("create", parent, deadline, Retry::Once, |c, ctx| {
                let n = n.clone();
                async move {
                    Ok(c.client
                        .create(ctx, Ino(parent), n, perm, flags, caller)
                        .await?
                        .map(|o| (o, c.clone())))
                }
            })
            .await;
        let got = self
            .receive_fd("create", parent, flags, deadline, ticket, r)
            .await?;
        self.cache.changed(ticket, parent, None);
        self.cache
            .put_entry(ticket, parent, name.as_bytes(), &got.opened.attr);
        Ok(got)
    }

    /// Take the descriptor of an open syncd answered, and validate it.
    ///
    /// The handle counts as held (for a reconnect's list, see
    /// [`HandleTable::held`]) from before the connection is checked: if
    /// the connection it was opened on is no longer the current one, a
    /// reconnect may already have told syncd what mountd holds without it,
    /// so the open fails (EIO) and is released rather than kept unknown to
    /// syncd. Every failure after syncd answered releases the handle.
    async fn receive_fd(
        &self,
        op: &'static str,
        ino: u64,
        flags: i32,
        deadline: Instant,
        ticket: Ticket,
        r: Result<(Opened, Arc<crate::syncd_client::Connection>), CallError>,
    ) -> Result<OpenedFd, FsError> {
        let (opened, conn) = r.map_err(|e| e.into_fs(op))?;
        self.handles.begin_opening(opened.handle, opened.attr.ino.0);
        if self.client.current_generation() != Some(conn.generation()) {
            self.abandon(opened.handle);
            return Err(fs_err!(
                EIO,
                "{op}: the connection to keibi-syncd changed during the open"
            ));
        }
        let wait_until = deadline.max(Instant::now() + FD_GRACE);
        let fd = match conn.inbox.take(opened.handle, wait_until).await {
            Ok(fd) => fd,
            Err(e) => {
                self.abandon(opened.handle);
                return Err(FsError::io(
                    format!("{op}: descriptor of {}", opened.handle),
                    &e,
                ));
            }
        };
        if let Err(why) = fd_check::validate(
            &fd,
            Access::of_flags(flags),
            &opened.content,
            conn.syncd_uid,
        ) {
            tracing::warn!(op, ino, syncd_handle = opened.handle.0, reason = %why, "refused the content descriptor keibi-syncd sent");
            drop(fd);
            self.abandon(opened.handle);
            return Err(fs_err!(EIO, "{op}: refused the content descriptor: {why}"));
        }
        if flags & libc::O_TRUNC != 0 {
            self.cache
                .changed(ticket, opened.attr.ino.0, Some(&opened.attr));
        } else {
            self.cache.put_attr(ticket, &opened.attr);
        }
        Ok(OpenedFd {
            opened,
            fd,
            writable: Access::of_flags(flags) != Access::Read,
        })
    }

    /// Put an opened descriptor in the handle table, deciding passthrough
    /// with `register` (the reply's `open_backing`). Returns the FUSE file
    /// handle and how the open is to be answered.
    pub fn install(
        &self,
        got: OpenedFd,
        register: impl FnOnce(&OwnedFd) -> io::Result<BackingId>,
    ) -> Result<(u64, Mode), FsError> {
        let ino = got.opened.attr.ino.0;
        let syncd_handle = got.opened.handle;
        let mode = match self.passthrough.mode_for(ino, || register(&got.fd)) {
            Ok(m) => m,
            Err(e) => {
                self.abandon(syncd_handle);
                return Err(FsError::io(
                    format!("registering {syncd_handle} of ino {ino} for passthrough"),
                    &e,
                ));
            }
        };
        let backing = match &mode {
            Mode::Passthrough(id) => Some(id.clone()),
            Mode::Plain => None,
        };
        let writable = got.writable;
        let fh = self.handles.insert(Handle {
            ino,
            syncd_handle,
            file: File::from(got.fd),
            backing,
            writable,
        });
        if writable && let Some(inval) = &self.attr_inval {
            // From now on attributes go out with TTL 0; drop what the
            // kernel cached before.
            inval.attrs_of(ino);
        }
        tracing::trace!(fh, ino, syncd_handle = syncd_handle.0, "handle opened");
        Ok((fh, mode))
    }

    /// An open that was not installed is over: stop counting it as held
    /// and release it.
    pub fn abandon(&self, syncd_handle: HandleId) {
        self.handles.end_opening(syncd_handle);
        self.releases.queue(syncd_handle);
    }

    /// `release`: drop the table's reference and tell syncd.
    pub fn release(&self, fh: u64) {
        if let Some(h) = self.handles.remove(fh) {
            if h.writable {
                // Its writes changed the file's size and times: count the
                // change, as the module doc says.
                drop(self.change());
            }
            tracing::trace!(
                fh,
                ino = h.ino,
                passthrough = h.backing.is_some(),
                "handle closed"
            );
            // Delivered in the background, retried until syncd has it
            // (see `crate::releases`).
            self.releases.queue(h.syncd_handle);
        }
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        self.handles
            .get(fh)
            .ok_or_else(|| fs_err!(EBADF, "no open file handle {fh}"))
    }

    /// `read`: `pread` on the handle's descriptor; short only at the end of
    /// the file.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let h = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match h.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FsError::io(format!("pread of fh {fh}"), &e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// `write`: `pwrite` of all of `data` on the handle's descriptor.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let h = self.handle(fh)?;
        h.file
            .write_all_at(data, offset)
            .map_err(|e| FsError::io(format!("pwrite of fh {fh}"), &e))?;
        Ok(data.len() as u32)
    }

    /// `fallocate` on the handle's descriptor.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<(), FsError> {
        let h = self.handle(fh)?;
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
            return Err(fs_err!(EFBIG, "fallocate: range out of bounds"));
        };
        // SAFETY: fallocate on a descriptor we own (kept open by `h`); no
        // memory is passed.
        let r = unsafe { libc::fallocate(h.file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(FsError::io(
                format!("fallocate of fh {fh}"),
                &io::Error::last_os_error(),
            ))
        }
    }

    /// `lseek`: `SEEK_DATA`/`SEEK_HOLE` (and `SEEK_END`) on the handle's
    /// descriptor; the kernel keeps the file position itself.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64, FsError> {
        match whence {
            libc::SEEK_SET => Ok(offset),
            libc::SEEK_DATA | libc::SEEK_HOLE | libc::SEEK_END => {
                let h = self.handle(fh)?;
                // SAFETY: lseek on a descriptor we own (kept open by `h`).
                // Its file position is never used: I/O is pread/pwrite.
                let r = unsafe { libc::lseek(h.file.as_raw_fd(), offset, whence) };
                if r >= 0 {
                    Ok(r)
                } else {
                    Err(FsError::io(
                        format!("lseek of fh {fh}"),
                        &io::Error::last_os_error(),
                    ))
                }
            }
            _ => Err(fs_err!(EINVAL, "lseek: whence {whence} is not supported")),
        }
    }

    /// `fsync`: the content descriptor (if this handle is open), then the
    /// store (syncd), all within the fsync deadline, which the stalled
    /// mode of the syncd client never shortens (see
    /// [`SyncdClient::call_durable`]).
    pub async fn fsync(&self, ino: u64, fh: Option<u64>, datasync: bool) -> Result<(), FsError> {
        let deadline = Instant::now() + self.fsync_deadline;
        if let Some(h) = fh.and_then(|fh| self.handles.get(fh)) {
            let local = tokio::task::spawn_blocking(move || {
                if datasync {
                    h.file.sync_data()
                } else {
                    h.file.sync_all()
                }
            });
            let r = tokio::time::timeout_at(deadline, local)
                .await
                .map_err(|_| {
                    fs_err!(
                        ETIMEDOUT,
                        "fsync of ino {ino}: the content file did not sync within {} ms",
                        self.fsync_deadline.as_millis()
                    )
                })?
                .map_err(|e| fs_err!(EIO, "fsync task failed: {e}"))?;
            r.map_err(|e| FsError::io(format!("fsync of ino {ino}"), &e))?;
        }
        self.client
            .call_durable("fsync", ino, deadline, |c, ctx| async move {
                c.client.fsync(ctx, Ino(ino), datasync).await
            })
            .await
            .map_err(|e| e.into_fs("fsync"))
    }

    /// `statfs`.
    pub async fn statfs(&self) -> Result<StatFs, FsError> {
        self.client
            .call(
                "statfs",
                1,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| async move { c.client.statfs(ctx).await },
            )
            .await
            .map_err(|e| e.into_fs("statfs"))
    }

    /// `setxattr`.
    pub async fn setxattr(
        &self,
        ino: u64,
        name: Name,
        value: Vec<u8>,
        mode: XattrSet,
    ) -> Result<(), FsError> {
        let _change = self.change();
        let r = self
            .client
            .call("setxattr", ino, self.deadline(), Retry::Once, |c, ctx| {
                let (n, v) = (name.clone(), value.clone());
                async move { c.client.setxattr(ctx, Ino(ino), n, v, mode).await }
            })
            .await;
        // Marked whatever the outcome: a call that timed out may have been
        // applied, and the mark only makes getxattr ask syncd.
        self.cache.set_xattr_done(ino);
        r.map_err(|e| e.into_fs("setxattr"))
    }

    /// Whether the last known attributes of `ino` say it has no extended
    /// attribute at all, so `getxattr`/`listxattr` can be answered here.
    /// Every `setxattr` passes through this mount and marks the inode, and
    /// a reply sent before that mark can no longer replace it (see
    /// [`crate::attr_cache`]), so the flag cannot hide an attribute set
    /// here.
    fn known_without_xattrs(&self, ino: u64) -> bool {
        self.cache.attr(ino).is_some_and(|a| !a.has_xattrs)
    }

    /// `getxattr` answered without syncd, when the inode is known to have
    /// no extended attributes (`ls -l` asks two names of every file, and
    /// the kernel asks `security.capability` before every write): bounded
    /// local work, for the dispatch thread.
    pub fn getxattr_local(&self, ino: u64) -> Option<Result<XattrReply, FsError>> {
        self.known_without_xattrs(ino)
            .then(|| Err(fs_err!(ENODATA, "{} has no extended attributes", Ino(ino))))
    }

    /// `listxattr` answered without syncd, as [`Keibi::getxattr_local`].
    pub fn listxattr_local(&self, ino: u64, size: u32) -> Option<Result<XattrReply, FsError>> {
        self.known_without_xattrs(ino)
            .then(|| sized(Vec::new(), size))
    }

    /// `getxattr`: the size when `size` is 0, else the value, or `ERANGE`.
    /// An inode known to have no attributes answers `ENODATA` at once.
    pub async fn getxattr(&self, ino: u64, name: Name, size: u32) -> Result<XattrReply, FsError> {
        if self.known_without_xattrs(ino) {
            return Err(fs_err!(ENODATA, "{} has no extended attributes", Ino(ino)));
        }
        let v = self
            .client
            .call(
                "getxattr",
                ino,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| {
                    let n = name.clone();
                    async move { c.client.getxattr(ctx, Ino(ino), n).await }
                },
            )
            .await
            .map_err(|e| e.into_fs("getxattr"))?;
        sized(v, size)
    }

    /// `listxattr`: NUL-terminated names, sized as for `getxattr`.
    pub async fn listxattr(&self, ino: u64, size: u32) -> Result<XattrReply, FsError> {
        if self.known_without_xattrs(ino) {
            return sized(Vec::new(), size);
        }
        let names = self
            .client
            .call(
                "listxattr",
                ino,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| async move { c.client.listxattr(ctx, Ino(ino)).await },
            )
            .await
            .map_err(|e| e.into_fs("listxattr"))?;
        let mut v = Vec::new();
        for n in names {
            v.extend_from_slice(n.as_bytes());
            v.push(0);
        }
        sized(v, size)
    }

    /// `removexattr`.
    pub async fn removexattr(&self, ino: u64, name: Name) -> Result<(), FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let r = self
            .client
            .call(
                "removexattr",
                ino,
                self.deadline(),
                Retry::Once,
                |c, ctx| {
                    let n = name.clone();
                    async move { c.client.removexattr(ctx, Ino(ino), n).await }
                },
            )
            .await;
        self.cache.changed(ticket, ino, None);
        r.map_err(|e| e.into_fs("removexattr"))
    }

    /// The kernel was given an entry for `attr.ino` (its lookup count of
    /// the inode grew by one; see [`crate::attr_cache`]). A forget of the
    /// inode still queued for syncd is void now.
    pub fn entry_given(&self, attr: &Attr) {
        if self.cache.looked_up(attr) {
            self.releases.referenced_again(attr.ino);
        }
    }

    /// The kernel forgot `n` lookups of `ino`. When it references the
    /// inode no more, syncd is told (queued, never waited for here): an
    /// unlinked inode is freed then.
    pub fn forget(&self, ino: u64, n: u64) {
        if self.cache.forget(ino, n) {
            self.releases.queue_forget(Ino(ino));
        }
    }
}

fn sized(v: Vec<u8>, size: u32) -> Result<XattrReply, FsError> {
    let len = u32::try_from(v.len()).map_err(|_| fs_err!(E2BIG, "xattr value too large"))?;
    if size == 0 {
        Ok(XattrReply::Size(len))
    } else if len > size {
        Err(fs_err!(
            ERANGE,
            "xattr needs {len} bytes, the buffer has {size}"
        ))
    } else {
        Ok(XattrReply::Data(v))
    }
}
