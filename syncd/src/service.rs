//! The filesystem service (mountd → syncd), one server per connection.
//!
//! Thin on purpose: each method runs one [`Store`] operation and logs it at
//! debug level with its duration and result. `open` and `create` also send
//! the content descriptor on the connection's fd channel before answering,
//! as the protocol requires (see `ipc_schema::fdpass`).
//!
//! **Where a store call runs** ([`Where`]). Most run on the request's own
//! task: the reads (`lookup`, `getattr`, `readlink`, `getxattr`,
//! `listxattr`) and the changes that are a few sled reads and one
//! transaction (`mkdir`, `mknod`, `symlink`, `link`, `unlink`, `rmdir`,
//! `rename`, `setxattr`, `removexattr`, `release`, `forget`, `setattr`
//! without a size, `create`, a read-only `open`). A sled transaction does
//! not wait for its log to be written (sled writes it on its own threads),
//! so these take microseconds to a few hundred; one inode allocation in
//! 1,024 waits for a flush (`store::inos`). The calls that may wait for the
//! disk or take long run on tokio's blocking pool: `fsync`, `statfs`,
//! `readdir`, `register_mount` (it may scan for orphans), a `setattr` that
//! changes the size (truncating a large content file), an `open` or
//! `create` with `O_SYNC`/`O_DSYNC` (they flush the store) and a writable
//! `open` (of a partly local file it syncs the present chunks first).
//!
//! Why not the pool for everything: a hop to the blocking pool and back
//! wakes two threads, and on a virtual machine a wake-up on another CPU
//! costs tens of microseconds, more than the operation (measured per
//! `lookup` from mountd: about 40 µs of syncd CPU run here, 50-70 µs
//! through `spawn_blocking`, 75-90 µs inside `block_in_place`, which
//! hands the worker's queue to another thread on each call). Measured with
//! `bench/ops.sh` and `bench/workloads.py` (2,000 files, medians of five
//! interleaved runs): running the changes here cut `rm -rf` by about a
//! fifth and a tarball's extraction by about a third (see
//! `docs/architecture.md`, "Threads of the filesystem path").
//!
//! Calls run here hold the runtime's worker while they run, so this
//! service runs on a runtime of its own, the filesystem runtime, with one
//! worker (see `main.rs`). When the disk is slow, a stuck call holds that
//! worker (and the tasks queued behind it, the connection's own task
//! included), which stalls this service only: it needs the store anyway.
//! mountd's deadlines bound what its callers wait. The control service has
//! a runtime, a thread and a blocking pool of its own, so `keibictl status`
//! and `debug ops` answer however many store calls are stuck. Every store
//! call passes the test-only fault point [`crate::fault::store_gate`]
//! first.
//!
//! Both paths list the request in the daemon's in-flight registry while it
//! runs, for `keibictl debug ops` (`Control::debug_ops`).
//!
//! Every change asks the store first whether there is room for it
//! ([`Store::admit`], one atomic load; see [`crate::space`]): on a full
//! state directory changes that add records get `ENOSPC` before those that
//! change or remove them, and an unlink that frees content is always let
//! through ([`Store::admit_unlink`]).
//!
//! tarpc drops a request whose deadline passed at its next `.await`; the
//! blocking operation itself still completes, so the store never sees half
//! an operation. An `open` or `create` that completes after its deadline
//! releases its handle instead of sending the descriptor (see [`send_fd`]).

use crate::daemon::Daemon;
use crate::opens::{ConnId, MountKey};
use crate::space::Change;
use crate::store::Store;
use crate::store::files::OpenFile;
use ipc_schema::fdpass::FdSender;
use ipc_schema::service::Filesystem;
use ipc_schema::*;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;
use tarpc::context::Context;

/// Format a log detail only when debug logging is on.
macro_rules! detail {
    ($($t:tt)*) => {
        if tracing::enabled!(tracing::Level::DEBUG) { format!($($t)*) } else { String::new() }
    };
}

/// The filesystem service of one mountd connection.
#[derive(Clone)]
pub struct FsServer {
    daemon: Arc<Daemon>,
    conn: ConnId,
    fds: Arc<FdSender>,
}

impl FsServer {
    /// A server for connection `conn`, sending descriptors on `fds`.
    pub fn new(daemon: Arc<Daemon>, conn: ConnId, fds: FdSender) -> FsServer {
        FsServer {
            daemon,
            conn,
            fds: Arc::new(fds),
        }
    }

    /// Run a store operation on tokio's blocking pool (sled and file
    /// syscalls block), and log it.
    async fn run<T, F>(&self, op: &'static str, detail: String, f: F) -> Result<T, FsError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, FsError> + Send + 'static,
    {
        let store = self.daemon.store.clone();
        let start = Instant::now();
        let _inflight = self
            .daemon
            .inflight
            .register(op, None, None, "blocking pool");
        let result = tokio::task::spawn_blocking(move || {
            crate::fault::store_gate();
            f(&store)
        })
        .await
        .unwrap_or_else(|e| Err(fs_err!(EIO, "{op}: the operation failed: {e}")));
        self.log(op, &detail, start, &result);
        result
    }

    /// Run a store operation right here on the task ([`Where::Here`]):
    /// reads in sled's cache, at most one transaction and at most one
    /// `stat` or open of a content file take less than the hand-off to
    /// the blocking pool and back (see the module doc). An `open` or
    /// `create` run here also sends its descriptor to mountd, on a
    /// `SOCK_SEQPACKET` channel whose buffer holds hundreds of them, so it
    /// waits only when mountd has stopped reading it (at most the
    /// channel's send timeout). When the disk is slow this holds the
    /// worker of the filesystem runtime, which serves nothing but this
    /// service.
    fn run_here<T>(
        &self,
        op: &'static str,
        detail: String,
        f: impl FnOnce(&Store) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        let start = Instant::now();
        let _inflight = self.daemon.inflight.register(op, None, None, "store");
        crate::fault::store_gate();
        let result = f(&self.daemon.store);
        self.log(op, &detail, start, &result);
        result
    }

    /// Run a store operation where [`Where`] says: on the request's own
    /// task ([`FsServer::run_here`]) or on the blocking pool
    /// ([`FsServer::run`]).
    async fn run_at<T, F>(
        &self,
        at: Where,
        op: &'static str,
        detail: String,
        f: F,
    ) -> Result<T, FsError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, FsError> + Send + 'static,
    {
        match at {
            Where::Here => self.run_here(op, detail, f),
            Where::Pool => self.run(op, detail, f).await,
        }
    }

    /// Tell every other mount of this syncd what a change made through
    /// this one did ([`crate::sync::inval::InvalQueue::push_from`]): their
    /// kernels may cache the names and attributes it changed for the whole
    /// attribute TTL, and their own lists of names (mountd's
    /// `known_dirs`) must not miss it. This mount is not told.
    fn announce(&self, items: Vec<Inval>) {
        self.daemon.invals.push_from(self.conn.0, items);
    }

    fn log<T>(&self, op: &'static str, detail: &str, start: Instant, result: &Result<T, FsError>) {
        let took = start.elapsed();
        crate::metrics::ipc_request(op, took, result.is_ok());
        let ms = took.as_secs_f64() * 1000.0;
        match result {
            Ok(_) => tracing::debug!(op, conn = self.conn.0, %detail, ms, "ok"),
            Err(e) if matches!(e.errno, libc::EIO | libc::ENOSPC) => {
                tracing::warn!(op, conn = self.conn.0, %detail, ms, error = %e, "failed")
            }
            Err(e) => tracing::debug!(op, conn = self.conn.0, %detail, ms, error = %e, "failed"),
        }
    }
}

/// The longest a `changes` long poll waits.
const MAX_CHANGES_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long before a call's deadline a waiting call answers, so that its
/// answer (`ETIMEDOUT`, or an empty batch) reaches mountd before mountd
/// gives up on it.
const ANSWER_MARGIN: std::time::Duration = std::time::Duration::from_millis(100);

/// When a call with tarpc deadline `deadline` must answer: [`ANSWER_MARGIN`]
/// before it (or at once when that has passed).
fn answer_by(deadline: std::time::Instant) -> tokio::time::Instant {
    let now = std::time::Instant::now();
    let left = deadline
        .saturating_duration_since(now)
        .saturating_sub(ANSWER_MARGIN);
    tokio::time::Instant::now() + left
}

/// Send an open's descriptor, then hand back the answer; if the descriptor
/// cannot be sent the open is undone. An open finished after its
/// request's `deadline` is undone too, without sending anything: mountd
/// has stopped waiting for it, so nobody would claim the descriptor or
/// release the handle. (If the deadline passes just after the check,
/// mountd finds a descriptor nobody waits for, closes it and releases
/// the handle itself.)
fn send_fd(
    store: &Store,
    fds: &FdSender,
    f: OpenFile,
    deadline: std::time::Instant,
) -> Result<Opened, FsError> {
    let handle = f.opened.handle;
    if Instant::now() >= deadline {
        let _ = store.release(handle);
        return Err(FsError::new(
            libc::ETIMEDOUT,
            format!("{handle} was opened after mountd's deadline; released it"),
        ));
    }
    if let Err(e) = fds.send(handle, f.fd.as_fd()) {
        let _ = store.release(handle);
        return Err(FsError::new(
            libc::EIO,
            format!("sending the descriptor of {handle} to mountd: {e}"),
        ));
    }
    Ok(f.opened)
}

/// The attributes of directory `dir` after a change of its names, for the
/// answer (mountd answers the kernel's next `getattr` of it with them);
/// `None`, logged, when they cannot be read: the change is made, and its
/// answer must say so.
fn dir_attr(store: &Store, dir: Ino) -> Option<Attr> {
    store
        .getattr(dir)
        .inspect_err(
            |e| tracing::debug!(%dir, error = %e, "no attributes of the directory after a change"),
        )
        .ok()
}

/// The answer of a call that added a name in `parent` for `attr`.
fn made(store: &Store, attr: Attr, parent: Ino) -> Made {
    Made {
        attr,
        parent: dir_attr(store, parent),
    }
}

/// The answer of a call that removed or moved names of `parent` (and of
/// `new_parent`, a rename into another directory).
fn dirs_after(store: &Store, parent: Ino, new_parent: Option<Ino>) -> DirsAfter {
    DirsAfter {
        parent: dir_attr(store, parent),
        new_parent: new_parent.and_then(|d| dir_attr(store, d)),
    }
}

/// For an open or create with `O_SYNC` or `O_DSYNC`, make the store
/// durable before answering: with passthrough the kernel syncs only the
/// content file after each write and never asks keibi, so a new file's
/// name and inode must already be on disk when the first write returns
/// (without passthrough the kernel sends an `fsync` after each write, which
/// flushes the store again). If the flush fails, the open is undone.
fn durable_if_sync(store: &Store, flags: i32, f: &OpenFile) -> Result<(), FsError> {
    if flags & (libc::O_SYNC | libc::O_DSYNC) == 0 {
        return Ok(());
    }
    store.flush().inspect_err(|_| {
        let _ = store.release(f.opened.handle);
    })
}

/// Where a store operation runs: on the request's own task, or on tokio's
/// blocking pool (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    /// On the request's task: the operation is a few sled reads and at
    /// most one transaction, which does not wait for sled's log to be
    /// written (rarely a flush: one inode allocation in 1,024).
    Here,
    /// On the blocking pool: the operation may wait for the disk (a flush,
    /// an `fdatasync`, a truncate of a large content file) or may be long.
    Pool,
}

impl Where {
    /// A `create` with `flags`: on the pool when it asks for `O_SYNC` or
    /// `O_DSYNC` (it flushes the store, [`durable_if_sync`]), else here:
    /// it makes a new, complete file (when the name exists it opens that
    /// file, and in the rare case of a partly local one waits here for
    /// the sync [`Where::for_open`] describes).
    fn for_create(flags: i32) -> Where {
        if flags & (libc::O_SYNC | libc::O_DSYNC) != 0 {
            Where::Pool
        } else {
            Where::Here
        }
    }

    /// An `open` with `flags`: as [`Where::for_create`], and also on the
    /// pool when it may write: a writable open of a file that is only
    /// partly local makes its present chunks durable first
    /// (`Store::settle_for_writer`).
    fn for_open(flags: i32) -> Where {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            Where::Pool
        } else {
            Where::for_create(flags)
        }
    }

    /// A `setattr`: a change of size truncates or extends the content
    /// file, which can take long for a large file: on the pool.
    fn for_setattr(changes: &SetAttr) -> Where {
        if changes.size.is_some() {
            Where::Pool
        } else {
            Where::Here
        }
    }
}

impl Filesystem for FsServer {
    async fn register_mount(
        self,
        _: Context,
        info: MountInfo,
        held: Vec<HeldHandle>,
        referenced: Vec<Ino>,
    ) -> Result<(), FsError> {
        tracing::info!(
            conn = self.conn.0,
            mountpoint = %info.mountpoint,
            pid = info.pid,
            passthrough = info.passthrough,
            reconnect = info.reconnect,
            held = held.len(),
            referenced = referenced.len(),
            "mount registered"
        );
        let fresh = !info.reconnect;
        let key = MountKey {
            mountpoint: info.mountpoint.clone(),
            pid: info.pid,
        };
        let conn = self.conn;
        let held: Vec<(HandleId, Ino)> = held.iter().map(|h| (h.handle, h.ino)).collect();
        let (settled, freed) = self
            .run("register_mount", String::new(), move |s| {
                s.register_mount(conn, key, fresh, &held, &referenced)
            })
            .await?;
        self.daemon.mounts.register(self.conn, info);
        if settled.kept > 0
            || settled.dropped > 0
            || settled.refs_kept > 0
            || settled.refs_dropped > 0
            || freed > 0
        {
            tracing::info!(
                conn = conn.0,
                kept = settled.kept,
                dropped = settled.dropped,
                refs_kept = settled.refs_kept,
                refs_dropped = settled.refs_dropped,
                freed,
                "settled the handles and kernel references of the mount's earlier connections; freed unlinked files nobody holds"
            );
        }
        Ok(())
    }

    async fn lookup(self, _: Context, parent: Ino, name: Name) -> Result<Attr, FsError> {
        let d = detail!("{parent} {name:?}");
        self.run_here("lookup", d, |s| s.lookup(parent, &name))
    }

    async fn getattr(self, _: Context, ino: Ino) -> Result<Attr, FsError> {
        self.run_here("getattr", detail!("{ino}"), |s| s.getattr(ino))
    }

    async fn setattr(self, _: Context, ino: Ino, changes: SetAttr) -> Result<Attr, FsError> {
        let d = detail!("{ino} {changes:?}");
        let r = self
            .run_at(Where::for_setattr(&changes), "setattr", d, move |s| {
                s.admit(Change::Frees)?;
                s.setattr(ino, &changes)
            })
            .await;
        if r.is_ok() {
            self.announce(vec![Inval::Inode { ino }]);
        }
        r
    }

    async fn readdir(
        self,
        _: Context,
        dir: Ino,
        after: DirCookie,
        limit: u32,
        plus: bool,
    ) -> Result<Vec<DirEntry>, FsError> {
        let d = detail!("{dir} after {} limit {limit} plus {plus}", after.0);
        self.run("readdir", d, move |s| s.readdir(dir, after, limit, plus))
            .await
    }

    async fn mkdir(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        perm: u16,
        caller: Caller,
    ) -> Result<Made, FsError> {
        let d = detail!("{parent} {name:?} {perm:o}");
        let n = name.clone();
        let r = self
            .run_at(Where::Here, "mkdir", d, move |s| {
                s.admit(Change::Adds)?;
                let attr = s.mkdir(parent, &name, perm, caller)?;
                Ok(made(s, attr, parent))
            })
            .await;
        if r.is_ok() {
            self.announce(vec![Inval::Entry { parent, name: n }]);
        }
        r
    }

    async fn mknod(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        kind: FileKind,
        perm: u16,
        rdev: u32,
        caller: Caller,
    ) -> Result<Made, FsError> {
        let d = detail!("{parent} {name:?} {kind:?} {perm:o} rdev {rdev:#x}");
        let n = name.clone();
        let r = self
            .run_at(Where::Here, "mknod", d, move |s| {
                s.admit(Change::Adds)?;
                let attr = s.mknod(parent, &name, kind, perm, rdev, caller)?;
                Ok(made(s, attr, parent))
            })
            .await;
        if r.is_ok() {
            self.announce(vec![Inval::Entry { parent, name: n }]);
        }
        r
    }

    async fn symlink(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        target: Vec<u8>,
        caller: Caller,
    ) -> Result<Made, FsError> {
        let d = detail!("{parent} {name:?}");
        let n = name.clone();
        let r = self
            .run_at(Where::Here, "symlink", d, move |s| {
                s.admit(Change::Adds)?;
                let attr = s.symlink(parent, &name, &target, caller)?;
                Ok(made(s, attr, parent))
            })
            .await;
        if r.is_ok() {
            self.announce(vec![Inval::Entry { parent, name: n }]);
        }
        r
    }

    async fn readlink(self, _: Context, ino: Ino) -> Result<Vec<u8>, FsError> {
        self.run_here("readlink", detail!("{ino}"), |s| s.readlink(ino))
    }

    async fn link(
        self,
        _: Context,
        ino: Ino,
        new_parent: Ino,
        new_name: Name,
    ) -> Result<Made, FsError> {
        let d = detail!("{ino} to {new_parent} {new_name:?}");
        let n = new_name.clone();
        let r = self
            .run_at(Where::Here, "link", d, move |s| {
                s.admit(Change::Adds)?;
                let attr = s.link(ino, new_parent, &new_name)?;
                Ok(made(s, attr, new_parent))
            })
            .await;
        if r.is_ok() {
            self.announce(vec![
                Inval::Entry {
                    parent: new_parent,
                    name: n,
                },
                Inval::Inode { ino },
            ]);
        }
        r
    }

    async fn unlink(self, _: Context, parent: Ino, name: Name) -> Result<DirsAfter, FsError> {
        let d = detail!("{parent} {name:?}");
        let conn = self.conn;
        let n = name.clone();
        let r = self
            .run_at(Where::Here, "unlink", d, move |s| {
                s.admit_unlink(parent, &name)?;
                s.unlink_by(Some(conn), parent, &name)?;
                Ok(dirs_after(s, parent, None))
            })
            .await;
        if r.is_ok() {
            self.announce(vec![Inval::Entry { parent, name: n }]);
        }
        r
    }

    async fn rmdir(self, _: Context, parent: Ino, name: Name) -> Result<DirsAfter, FsError> {
        let d = detail!("{parent} {name:?}");
        let n = name.clone();
        let r = self
            .run_at(Where::Here, "rmdir", d, move |s| {
                s.admit(Change::Frees)?;
                s.rmdir(parent, &name)?;
                Ok(dirs_after(s, parent, None))
            })
            .await;
        if r.is_ok() {
            self.announce(vec![Inval::Entry { parent, name: n }]);
        }
        r
    }

    async fn rename(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        new_parent: Ino,
        new_name: Name,
        flags: RenameFlags,
    ) -> Result<DirsAfter, FsError> {
        let d = detail!("{parent} {name:?} to {new_parent} {new_name:?} {flags:?}");
        let conn = self.conn;
        let (n, nn) = (name.clone(), new_name.clone());
        let r = self
            .run_at(Where::Here, "rename", d, move |s| {
                s.admit(Change::Frees)?;
                s.rename_by(Some(conn), parent, &name, new_parent, &new_name, flags)?;
                Ok(dirs_after(
                    s,
                    parent,
                    (new_parent != parent).then_some(new_parent),
                ))
            })
            .await;
        if r.is_ok() {
            self.announce(vec![
                Inval::Entry { parent, name: n },
                Inval::Entry {
                    parent: new_parent,
                    name: nn,
                },
            ]);
        }
        r
    }

    async fn create(
        self,
        ctx: Context,
        parent: Ino,
        name: Name,
        perm: u16,
        flags: i32,
        caller: Caller,
    ) -> Result<Opened, FsError> {
        let d = detail!("{parent} {name:?} {perm:o} flags {flags:#o}");
        let (conn, fds, deadline) = (self.conn, self.fds.clone(), ctx.deadline);
        let n = name.clone();
        let r = self
            .run_at(Where::for_create(flags), "create", d, move |s| {
                s.admit(Change::Adds)?;
                let f = s.create(parent, &name, perm, flags, caller, conn)?;
                durable_if_sync(s, flags, &f)?;
                let mut opened = send_fd(s, &fds, f, deadline)?;
                opened.parent = dir_attr(s, parent);
                Ok(opened)
            })
            .await;
        if r.is_ok() {
            self.announce(vec![Inval::Entry { parent, name: n }]);
        }
        r
    }

    async fn open(self, ctx: Context, ino: Ino, flags: i32) -> Result<Opened, FsError> {
        let d = detail!("{ino} flags {flags:#o}");
        let (conn, fds, deadline) = (self.conn, self.fds.clone(), ctx.deadline);
        self.run_at(Where::for_open(flags), "open", d, move |s| {
            let f = s.open(ino, flags, conn)?;
            durable_if_sync(s, flags, &f)?;
            send_fd(s, &fds, f, deadline)
        })
        .await
    }

    async fn release(self, _: Context, handle: HandleId) -> Result<(), FsError> {
        let written = self
            .run_at(Where::Here, "release", detail!("{handle}"), move |s| {
                s.release_written(handle)
            })
            .await?;
        if let Some(ino) = written {
            self.announce(vec![Inval::Inode { ino }]);
        }
        Ok(())
    }

    async fn forget(self, ctx: Context, inos: Vec<Ino>) -> Result<(), FsError> {
        let d = detail!("{} inodes", inos.len());
        let (conn, until) = (self.conn, ctx.deadline);
        let freed = self
            .run_at(Where::Here, "forget", d, move |s| {
                s.forget(conn, &inos, until)
            })
            .await?;
        if freed > 0 {
            tracing::debug!(conn = conn.0, freed, "forget freed unlinked inodes");
        }
        Ok(())
    }

    async fn fsync(self, _: Context, ino: Ino, datasync: bool) -> Result<(), FsError> {
        let d = detail!("{ino} datasync {datasync}");
        self.run("fsync", d, move |s| s.fsync(ino, datasync)).await
    }

    async fn statfs(self, _: Context) -> Result<StatFs, FsError> {
        self.run("statfs", String::new(), |s| s.statfs()).await
    }

    async fn setxattr(
        self,
        _: Context,
        ino: Ino,
        name: Name,
        value: Vec<u8>,
        mode: XattrSet,
    ) -> Result<(), FsError> {
        let d = detail!("{ino} {name:?} {} bytes {mode:?}", value.len());
        let r = self
            .run_at(Where::Here, "setxattr", d, move |s| {
                s.admit(Change::Adds)?;
                s.setxattr(ino, &name, &value, mode)
            })
            .await;
        if r.is_ok() {
            self.announce(vec![Inval::Inode { ino }]);
        }
        r
    }

    async fn getxattr(self, _: Context, ino: Ino, name: Name) -> Result<Vec<u8>, FsError> {
        let d = detail!("{ino} {name:?}");
        self.run_here("getxattr", d, |s| s.getxattr(ino, &name))
    }

    async fn listxattr(self, _: Context, ino: Ino) -> Result<Vec<Name>, FsError> {
        self.run_here("listxattr", detail!("{ino}"), |s| s.listxattr(ino))
    }

    async fn removexattr(self, _: Context, ino: Ino, name: Name) -> Result<(), FsError> {
        let d = detail!("{ino} {name:?}");
        let r = self
            .run_at(Where::Here, "removexattr", d, move |s| {
                s.admit(Change::Frees)?;
                s.removexattr(ino, &name)
            })
            .await;
        if r.is_ok() {
            self.announce(vec![Inval::Inode { ino }]);
        }
        r
    }

    async fn fetch_range(
        self,
        ctx: Context,
        handle: HandleId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u64>, FsError> {
        let d = detail!("{handle} {offset}+{len}");
        let start = Instant::now();
        let version = {
            let _inflight =
                self.daemon
                    .inflight
                    .register("fetch_range", None, Some(handle.0), "store");
            crate::fault::store_gate();
            self.daemon.store.handle_version(handle)
        };
        let result = match version {
            None => Err(fs_err!(EBADF, "fetch_range: {handle} is not open")),
            Some((ino, generation)) => {
                let _inflight = self.daemon.inflight.register(
                    "fetch_range",
                    Some(ino.0),
                    Some(handle.0),
                    "peers",
                );
                let fetched = self
                    .daemon
                    .fetcher
                    .ensure(ino, generation, offset, len, answer_by(ctx.deadline), true)
                    .await;
                match fetched {
                    // A handle that may write writes into what it is told
                    // is present: make that durable first (`presence`).
                    Ok(bits) if self.daemon.store.handle_may_write(handle) => {
                        let store = self.daemon.store.clone();
                        tokio::task::spawn_blocking(move || store.settle_for_writer(ino))
                            .await
                            .unwrap_or_else(|e| Err(fs_err!(EIO, "fetch_range: {e}")))
                            .map(|()| bits)
                    }
                    other => other,
                }
            }
        };
        self.log("fetch_range", &d, start, &result);
        result
    }

    async fn changes(
        self,
        ctx: Context,
        epoch: u64,
        after: u64,
        wait_ms: u32,
    ) -> Result<ChangeBatch, FsError> {
        let left = answer_by(ctx.deadline).saturating_duration_since(tokio::time::Instant::now());
        let wait = std::time::Duration::from_millis(u64::from(wait_ms))
            .min(MAX_CHANGES_WAIT)
            .min(left);
        let batch = self
            .daemon
            .invals
            .wait_for(epoch, after, wait, self.conn.0)
            .await;
        tracing::debug!(
            op = "changes",
            conn = self.conn.0,
            epoch,
            after,
            next = batch.next,
            items = batch.items.len(),
            "ok"
        );
        Ok(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calls that may wait for the disk go to the blocking pool; the
    /// rest run on the request's task.
    #[test]
    fn only_calls_that_may_wait_for_the_disk_leave_the_task() {
        assert_eq!(Where::for_open(libc::O_RDONLY), Where::Here);
        assert_eq!(Where::for_open(libc::O_WRONLY), Where::Pool);
        assert_eq!(Where::for_open(libc::O_RDWR), Where::Pool);
        assert_eq!(Where::for_open(libc::O_RDONLY | libc::O_SYNC), Where::Pool);
        assert_eq!(Where::for_open(libc::O_RDONLY | libc::O_DSYNC), Where::Pool);
        let create = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
        assert_eq!(Where::for_create(create), Where::Here);
        assert_eq!(Where::for_create(create | libc::O_DSYNC), Where::Pool);
        let times = SetAttr {
            perm: Some(0o600),
            mtime: Some(TimeSet::Now),
            ..SetAttr::default()
        };
        assert_eq!(Where::for_setattr(&times), Where::Here);
        let truncate = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        assert_eq!(Where::for_setattr(&truncate), Where::Pool);
    }
}
