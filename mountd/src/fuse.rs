//! The FUSE adapter: fuser's [`Filesystem`] trait over [`Keibi`].
//!
//! Each method translates fuser's arguments into keibi's types, then does
//! one of two things:
//!
//! - answers inline, for bounded local work: `pread`/`pwrite`/`lseek`/
//!   `fallocate` on a descriptor mountd holds, `flush`, `release`,
//!   `opendir`/`releasedir`, `access`, and `readdir`/`readdirplus` when
//!   the directory handle's read-ahead holds the entries asked for
//!   ([`crate::dir_handles`]);
//! - hands the reply to a tokio task that awaits syncd (with the deadline)
//!   and answers from there, so no dispatch thread ever waits on syncd;
//!   this includes `read`/`write`/`fallocate` of a partial file that
//!   touch chunks not on this machine yet ([`crate::ondemand`]).
//!
//! Every operation handed to a task is listed in the in-flight registry
//! ([`InFlight`]) until it answers, with what it waits on, so that
//! `keibictl debug ops` can show a stuck mount (see [`crate::ops_socket`]).
//!
//! Both paths end in [`finish`], which sends the reply, logs the
//! operation at debug (op, inode, handle, duration in ms, result) and
//! counts it in the metrics ([`crate::metrics::fuse_op`]).
//!
//! Unsupported: `copy_file_range` answers `ENOSYS` (the kernel then copies
//! with reads and writes, or passthrough does it), POSIX locks are left to
//! the kernel (local to this machine), `ioctl` answers `ENOTTY` (reflink
//! `EOPNOTSUPP`) and `poll` `ENOSYS` (always ready, as a local file).

use crate::dir_handles::{ReadAhead, ttl_left};
use crate::fs::{Keibi, XattrReply};
use crate::passthrough::Mode;
use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use ipc_schema::inflight::InFlight;
use ipc_schema::{
    Attr, Caller, DirEntry, FileKind, FsError, Name, SetAttr, TimeSet, Timestamp, XattrSet, fs_err,
};
use std::ffi::OsStr;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `FICLONE` and `FICLONERANGE` (`linux/fs.h`): reflink copies.
const FICLONE: u32 = 0x4004_9409;
const FICLONERANGE: u32 = 0x4020_940d;
/// Largest write the kernel sends (the kernel caps requests at 1 MiB).
const MAX_WRITE: u32 = 1 << 20;

/// The fuser filesystem.
pub struct KeibiFs {
    keibi: Arc<Keibi>,
    ttl: Duration,
    rt: tokio::runtime::Handle,
    inflight: Arc<InFlight>,
}

impl KeibiFs {
    /// The adapter over `keibi`; attributes and entries are valid for `ttl`.
    /// Operations answered from tasks are listed in `inflight`.
    pub fn new(
        keibi: Arc<Keibi>,
        ttl: Duration,
        rt: tokio::runtime::Handle,
        inflight: Arc<InFlight>,
    ) -> Self {
        KeibiFs {
            keibi,
            ttl,
            rt,
            inflight,
        }
    }

    /// List `log`'s operation as in flight, waiting on syncd, until the
    /// guard drops.
    fn track(&self, log: &OpLog) -> ipc_schema::inflight::OpGuard {
        self.inflight.register(
            log.op,
            Some(log.ino),
            log.fh,
            format!("keibi-syncd ({})", log.op),
        )
    }

    /// Answer inline.
    fn inline<R: Answer, T>(
        &self,
        log: OpLog,
        reply: R,
        result: Result<T, FsError>,
        ok: impl FnOnce(R, T),
    ) {
        finish(log, reply, result, ok);
    }

    /// Answer from a tokio task running `work`.
    fn spawn<R, T, Fut, Ok>(&self, log: OpLog, reply: R, work: Fut, ok: Ok)
    where
        R: Answer,
        T: Send + 'static,
        Fut: Future<Output = Result<T, FsError>> + Send + 'static,
        Ok: FnOnce(R, T) + Send + 'static,
    {
        let guard = self.track(&log);
        self.rt.spawn(async move {
            let result = work.await;
            finish(log, reply, result, ok);
            drop(guard);
        });
    }

    /// `readdir`/`readdirplus` at `offset`: inline from the directory
    /// handle's read-ahead when it holds the entries that follow, else
    /// from a tokio task (the prefetch on its way, or syncd). What the
    /// reply does not take is kept for the next request.
    fn list<R: DirReply>(
        &self,
        op: &'static str,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: R,
    ) {
        let l = log(op, ino, Some(fh));
        let (ttl, plus) = (self.ttl, R::PLUS);
        if let Some(mut ahead) = self.keibi.read_ahead(fh.0, ino.0, offset, plus)
            && (fill(&self.keibi, &mut ahead, &mut reply, ttl, false) > 0 || ahead.at_end())
        {
            self.keibi.keep_ahead(fh.0, ino.0, ahead, true);
            return self.inline(l, reply, Ok(()), |r, ()| r.ok());
        }
        let k = self.keibi.clone();
        self.spawn(
            l,
            reply,
            async move {
                let (ahead, fresh) = k.next_entries(fh.0, ino.0, offset, plus).await?;
                Ok((k, ahead, fresh))
            },
            move |mut r, (k, mut ahead, fresh): (Arc<Keibi>, ReadAhead, bool)| {
                fill(&k, &mut ahead, &mut r, ttl, fresh);
                r.ok();
                k.keep_ahead(fh.0, ino.0, ahead, !fresh);
            },
        );
    }

    /// An entry reply closure. Each entry given to the kernel counts one
    /// lookup of its inode (until `forget`; see `crate::attr_cache`). The
    /// attributes' TTL is [`Keibi::attr_ttl`] for a request sent now (the
    /// closure is made before the request is sent); the entry keeps the
    /// normal TTL.
    fn entry(&self) -> impl FnOnce(ReplyEntry, Attr) + Send + 'static {
        let (ttl, k) = (self.ttl, self.keibi.clone());
        let since = k.ticket();
        move |r, a| {
            k.entry_given(&a, since);
            let attr_ttl = k.attr_ttl(a.ino.0, ttl, since);
            r.entry_with_ttls(&attr_ttl, &ttl, &file_attr(&a), Generation(0));
            k.settle(a.ino.0, since, attr_ttl);
        }
    }

    /// An attribute reply closure, with the TTL of [`Keibi::attr_ttl`] for
    /// a request sent now.
    fn attr(&self) -> impl FnOnce(ReplyAttr, Attr) + Send + 'static {
        let (ttl, k) = (self.ttl, self.keibi.clone());
        let since = k.ticket();
        move |r, a| {
            let attr_ttl = k.attr_ttl(a.ino.0, ttl, since);
            r.attr(&attr_ttl, &file_attr(&a));
            k.settle(a.ino.0, since, attr_ttl);
        }
    }
}

/// A reply that can carry an errno.
trait Answer: Send + 'static {
    fn fail(self, e: Errno);
}

macro_rules! answers {
    ($($t:ty),*) => { $(impl Answer for $t { fn fail(self, e: Errno) { self.error(e) } })* };
}
answers!(
    ReplyEmpty,
    ReplyData,
    ReplyEntry,
    ReplyAttr,
    ReplyOpen,
    ReplyWrite,
    ReplyStatfs,
    ReplyCreate,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyXattr,
    ReplyLseek,
    fuser::ReplyIoctl,
    fuser::ReplyPoll
);

/// What the debug line of one operation says.
struct OpLog {
    op: &'static str,
    ino: u64,
    fh: Option<u64>,
    start: Instant,
}

fn log(op: &'static str, ino: INodeNo, fh: Option<FileHandle>) -> OpLog {
    OpLog {
        op,
        ino: ino.0,
        fh: fh.map(|f| f.0),
        start: Instant::now(),
    }
}

/// Send the reply (or its errno) and log the operation.
fn finish<R: Answer, T>(log: OpLog, reply: R, result: Result<T, FsError>, ok: impl FnOnce(R, T)) {
    let took = log.start.elapsed();
    crate::metrics::fuse_op(log.op, took, result.is_ok());
    let ms = took.as_secs_f64() * 1000.0;
    match result {
        Ok(v) => {
            ok(reply, v);
            tracing::debug!(op = log.op, ino = log.ino, fh = log.fh, ms, result = "ok");
        }
        Err(e) => {
            reply.fail(Errno::from_i32(e.errno));
            tracing::debug!(
                op = log.op,
                ino = log.ino,
                fh = log.fh,
                ms,
                result = %e.errno_name(),
                error = %e.message
            );
        }
    }
}

/// A name from the kernel; syncd validates the rest, the length is checked
/// here so it fails the same way when syncd is away.
fn name(n: &OsStr) -> Result<Name, FsError> {
    let b = n.as_bytes();
    if b.len() > Name::MAX_LEN {
        return Err(fs_err!(ENAMETOOLONG, "name of {} bytes", b.len()));
    }
    Ok(Name(b.to_vec()))
}

/// POSIX ACLs are not supported: `default_permissions` checks mode bits
/// only, so a stored ACL would be shown but not enforced. Nothing is stored
/// under their xattr names: reading or removing one finds nothing
/// (`ENODATA`, `errno` = `not_found`), setting one fails (`EOPNOTSUPP`),
/// answered here without a round trip to syncd (`ls -l` asks on every
/// file).
fn acl_name(n: &OsStr, not_found: i32) -> Result<(), FsError> {
    if n.as_bytes().starts_with(b"system.posix_acl_") {
        return Err(FsError::new(
            not_found,
            format!("{n:?}: POSIX ACLs are not supported"),
        ));
    }
    Ok(())
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn masked(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn system_time(t: Timestamp) -> SystemTime {
    let whole = Duration::from_secs(t.secs.unsigned_abs());
    let base = if t.secs >= 0 {
        UNIX_EPOCH.checked_add(whole)
    } else {
        UNIX_EPOCH.checked_sub(whole)
    };
    base.and_then(|b| b.checked_add(Duration::from_nanos(u64::from(t.nanos.min(999_999_999)))))
        .unwrap_or(UNIX_EPOCH)
}

fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            if d.subsec_nanos() == 0 {
                Timestamp {
                    secs: -(d.as_secs() as i64),
                    nanos: 0,
                }
            } else {
                Timestamp {
                    secs: -(d.as_secs() as i64) - 1,
                    nanos: 1_000_000_000 - d.subsec_nanos(),
                }
            }
        }
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(timestamp(t)),
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.crtime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

/// Attributes for an entry syncd listed without them (`..` of the root):
/// the kernel ignores the attributes of `.` and `..` in readdirplus.
fn placeholder_attr(ino: u64, kind: FileKind) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: file_type(kind),
        perm: 0,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for KeibiFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(e) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(e);
        }
        // EXPORT_SUPPORT: the kernel may look an inode up by number
        // (LOOKUP of "." in it, and of ".." for a directory's parent), so
        // file handles (name_to_handle_at, NFS) outlive its inode cache.
        // keibi's inode numbers are stable and never reused, so the
        // generation is always 0.
        // PARALLEL_DIROPS: lookups and readdir of one directory run
        // concurrently (the kernel otherwise serialises them per
        // directory); every one is an independent call to syncd, and the
        // VFS still excludes them against changes of that directory.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_EXPORT_SUPPORT
            | InitFlags::FUSE_PARALLEL_DIROPS;
        if let Err(missing) = config.add_capabilities(wanted) {
            tracing::info!(?missing, "the kernel lacks some optional FUSE capabilities");
            let _ = config.add_capabilities(wanted & !missing);
        }
        let pt = self.keibi.passthrough();
        if pt.wanted() {
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            pt.set_granted(granted);
            if granted {
                tracing::info!("FUSE passthrough enabled");
            } else {
                tracing::warn!(
                    "the kernel does not offer FUSE passthrough; reads and writes go through keibi-mountd"
                );
            }
        } else {
            tracing::info!("FUSE passthrough disabled by --no-passthrough");
        }
        pt.set_initialized();
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        let l = log("lookup", parent, None);
        match name(n) {
            Err(e) => self.inline(l, reply, Err::<Attr, _>(e), |_, _| ()),
            Ok(n) => {
                let (k, ttl, entry) = (self.keibi.clone(), self.ttl, self.entry());
                let (since, asked) = (k.ticket(), n.clone());
                let after = k.clone();
                self.spawn(
                    l,
                    reply,
                    async move { k.lookup_entry(parent.0, n).await },
                    move |r, found| {
                        match found {
                            Some(a) => entry(r, a),
                            // Node id 0: a negative entry the kernel keeps
                            // for `ttl` ([`Keibi::lookup_entry`]).
                            None => {
                                r.entry(&ttl, &placeholder_attr(0, FileKind::File), Generation(0))
                            }
                        }
                        after.settle_name(parent.0, asked.as_bytes(), since);
                    },
                );
            }
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.keibi.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let k = self.keibi.clone();
        self.spawn(
            log("getattr", ino, fh),
            reply,
            async move { k.getattr(ino.0).await },
            self.attr(),
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
        };
        let k = self.keibi.clone();
        self.spawn(
            log("setattr", ino, fh),
            reply,
            async move { k.setattr(ino.0, changes).await },
            self.attr(),
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let k = self.keibi.clone();
        self.spawn(
            log("readlink", ino, None),
            reply,
            async move { k.readlink(ino.0).await },
            |r, t| r.data(&t),
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let l = log("mknod", parent, None);
        let n = match name(n) {
            Ok(n) => n,
            Err(e) => return self.inline(l, reply, Err::<Attr, _>(e), |_, _| ()),
        };
        let (k, c, perm) = (self.keibi.clone(), caller(req), masked(mode, umask));
        self.spawn(
            l,
            reply,
            async move { k.mknod(parent.0, n, mode, perm, rdev, c).await },
            self.entry(),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let l = log("mkdir", parent, None);
        let n = match name(n) {
            Ok(n) => n,
            Err(e) => return self.inline(l, reply, Err::<Attr, _>(e), |_, _| ()),
        };
        let (k, c, perm) = (self.keibi.clone(), caller(req), masked(mode, umask));
        self.spawn(
            l,
            reply,
            async move { k.mkdir(parent.0, n, perm, c).await },
            self.entry(),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let l = log("unlink", parent, None);
        let n = match name(n) {
            Ok(n) => n,
            Err(e) => return self.inline(l, reply, Err::<(), _>(e), |_, _| ()),
        };
        let k = self.keibi.clone();
        self.spawn(
            l,
            reply,
            async move { k.unlink(parent.0, n).await },
            |r, ()| r.ok(),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let l = log("rmdir", parent, None);
        let n = match name(n) {
            Ok(n) => n,
            Err(e) => return self.inline(l, reply, Err::<(), _>(e), |_, _| ()),
        };
        let k = self.keibi.clone();
        self.spawn(
            l,
            reply,
            async move { k.rmdir(parent.0, n).await },
            |r, ()| r.ok(),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let l = log("symlink", parent, None);
        let n = match name(link_name) {
            Ok(n) => n,
            Err(e) => return self.inline(l, reply, Err::<Attr, _>(e), |_, _| ()),
        };
        let target = target.as_os_str().as_bytes().to_vec();
        let (k, c) = (self.keibi.clone(), caller(req));
        self.spawn(
            l,
            reply,
            async move { k.symlink(parent.0, n, target, c).await },
            self.entry(),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let l = log("rename", parent, None);
        let known = RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE;
        let args = (|| {
            if !known.contains(flags) || flags == known {
                return Err(fs_err!(EINVAL, "rename flags {flags} are not supported"));
            }
            let f = ipc_schema::RenameFlags {
                noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
                exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
            };
            Ok((name(n)?, name(newname)?, f))
        })();
        match args {
            Err(e) => self.inline(l, reply, Err::<(), _>(e), |_, _| ()),
            Ok((n, nn, f)) => {
                let k = self.keibi.clone();
                self.spawn(
                    l,
                    reply,
                    async move { k.rename(parent.0, n, newparent.0, nn, f).await },
                    |r, ()| r.ok(),
                );
            }
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let l = log("link", ino, None);
        let n = match name(newname) {
            Ok(n) => n,
            Err(e) => return self.inline(l, reply, Err::<Attr, _>(e), |_, _| ()),
        };
        let k = self.keibi.clone();
        self.spawn(
            l,
            reply,
            async move { k.link(ino.0, newparent.0, n).await },
            self.entry(),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let l = log("open", ino, None);
        let k = self.keibi.clone();
        let guard = self.track(&l);
        self.rt.spawn(async move {
            let _guard = guard;
            let got = k.open_fd(ino.0, flags.0).await;
            let result = got.and_then(|got| k.install(got, |fd| reply.open_backing(fd)));
            finish(l, reply, result, |r, (fh, mode)| match mode {
                Mode::Passthrough(id) => {
                    r.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id)
                }
                Mode::Plain => r.opened(FileHandle(fh), FopenFlags::empty()),
                Mode::PlainDirect => r.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            });
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let l = log("read", ino, Some(fh));
        if self.keibi.needs_fetch(fh.0, offset, u64::from(size)) {
            // Bytes not on this machine yet: syncd fetches them (with the
            // read deadline) while the dispatch thread goes on.
            let k = self.keibi.clone();
            return self.spawn(
                l,
                reply,
                async move { k.read_fetching(fh.0, offset, size).await },
                |r, d| r.data(&d),
            );
        }
        let r = self.keibi.read(fh.0, offset, size);
        self.inline(l, reply, r, |r, d| r.data(&d));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let l = log("write", ino, Some(fh));
        if self.keibi.needs_fetch(fh.0, offset, data.len() as u64) {
            let (k, data) = (self.keibi.clone(), data.to_vec());
            return self.spawn(
                l,
                reply,
                async move { k.write_fetching(fh.0, offset, data).await },
                |r, n| r.written(n),
            );
        }
        let r = self.keibi.write(fh.0, offset, data);
        self.inline(l, reply, r, |r, n| r.written(n));
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are already in the content file (pwrite or passthrough):
        // nothing to wait for.
        self.inline(log("flush", ino, Some(fh)), reply, Ok(()), |r, ()| r.ok());
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.keibi.release(fh.0);
        self.inline(log("release", ino, Some(fh)), reply, Ok(()), |r, ()| r.ok());
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let k = self.keibi.clone();
        self.spawn(
            log("fsync", ino, Some(fh)),
            reply,
            async move { k.fsync(ino.0, Some(fh.0), datasync).await },
            |r, ()| r.ok(),
        );
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.keibi.opendir(ino.0);
        self.inline(
            log("opendir", ino, Some(FileHandle(fh))),
            reply,
            Ok(()),
            |r, ()| r.opened(FileHandle(fh), FopenFlags::empty()),
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.list("readdir", ino, fh, offset, reply);
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.list("readdirplus", ino, fh, offset, reply);
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.keibi.releasedir(fh.0);
        self.inline(log("releasedir", ino, Some(fh)), reply, Ok(()), |r, ()| {
            r.ok()
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let k = self.keibi.clone();
        self.spawn(
            log("fsyncdir", ino, Some(fh)),
            reply,
            async move { k.fsync(ino.0, None, datasync).await },
            |r, ()| r.ok(),
        );
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let k = self.keibi.clone();
        self.spawn(
            log("statfs", ino, None),
            reply,
            async move { k.statfs().await },
            |r, s| {
                r.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
                )
            },
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        n: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let l = log("setxattr", ino, None);
        let mode = match flags {
            0 => Ok(XattrSet::Any),
            libc::XATTR_CREATE => Ok(XattrSet::Create),
            libc::XATTR_REPLACE => Ok(XattrSet::Replace),
            f => Err(fs_err!(EINVAL, "setxattr flags {f:#x}")),
        };
        match mode.and_then(|m| {
            acl_name(n, libc::EOPNOTSUPP)?;
            Ok((m, name(n)?))
        }) {
            Err(e) => self.inline(l, reply, Err::<(), _>(e), |_, _| ()),
            Ok((mode, n)) => {
                let (k, v) = (self.keibi.clone(), value.to_vec());
                self.spawn(
                    l,
                    reply,
                    async move { k.setxattr(ino.0, n, v, mode).await },
                    |r, ()| r.ok(),
                );
            }
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, size: u32, reply: ReplyXattr) {
        let l = log("getxattr", ino, None);
        let n = match acl_name(n, libc::ENODATA).and_then(|()| name(n)) {
            Ok(n) => n,
            Err(e) => return self.inline(l, reply, Err::<XattrReply, _>(e), |_, _| ()),
        };
        if let Some(r) = self.keibi.getxattr_local(ino.0) {
            return self.inline(l, reply, r, xattr_answer);
        }
        let k = self.keibi.clone();
        self.spawn(
            l,
            reply,
            async move { k.getxattr(ino.0, n, size).await },
            xattr_answer,
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let l = log("listxattr", ino, None);
        if let Some(r) = self.keibi.listxattr_local(ino.0, size) {
            return self.inline(l, reply, r, xattr_answer);
        }
        let k = self.keibi.clone();
        self.spawn(
            l,
            reply,
            async move { k.listxattr(ino.0, size).await },
            xattr_answer,
        );
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let l = log("removexattr", ino, None);
        let n = match acl_name(n, libc::ENODATA).and_then(|()| name(n)) {
            Ok(n) => n,
            Err(e) => return self.inline(l, reply, Err::<(), _>(e), |_, _| ()),
        };
        let k = self.keibi.clone();
        self.spawn(
            l,
            reply,
            async move { k.removexattr(ino.0, n).await },
            |r, ()| r.ok(),
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks, this is not even called.
        self.inline(log("access", ino, None), reply, Ok(()), |r, ()| r.ok());
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let l = log("create", parent, None);
        let n = match name(n) {
            Ok(n) => n,
            Err(e) => return self.inline(l, reply, Err::<(), _>(e), |_, _| ()),
        };
        let (k, c, perm, ttl) = (
            self.keibi.clone(),
            caller(req),
            masked(mode, umask),
            self.ttl,
        );
        let guard = self.track(&l);
        let since = k.ticket();
        self.rt.spawn(async move {
            let _guard = guard;
            let got = k.create_fd(parent.0, n, perm, flags, c).await;
            let result = got.and_then(|got| {
                let attr = got.opened.attr;
                k.install(got, |fd| reply.open_backing(fd))
                    .map(|(fh, m)| (fh, attr, m))
            });
            finish(l, reply, result, |r, (fh, attr, mode)| {
                k.entry_given(&attr, since);
                let a = file_attr(&attr);
                // One TTL for the entry and the attributes (fuser has no
                // create reply with two): the entry's, so the new name is
                // not looked up again; the attributes of a file open for
                // writing are dropped right after ([`Keibi::after_create`]).
                let ttl = k.create_ttl(attr.ino.0, ttl, since);
                let ino = attr.ino.0;
                match mode {
                    Mode::Passthrough(id) => r.created_passthrough(
                        &ttl,
                        &a,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &id,
                    ),
                    Mode::Plain => {
                        r.created(&ttl, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
                    }
                    Mode::PlainDirect => r.created(
                        &ttl,
                        &a,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::FOPEN_DIRECT_IO,
                    ),
                }
                k.after_create(ino, since, ttl);
            });
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let l = log("fallocate", ino, Some(fh));
        if self.keibi.needs_fetch(fh.0, offset, length) {
            let k = self.keibi.clone();
            return self.spawn(
                l,
                reply,
                async move { k.fallocate_fetching(fh.0, offset, length, mode).await },
                |r, ()| r.ok(),
            );
        }
        let r = self.keibi.fallocate(fh.0, offset, length, mode);
        self.inline(l, reply, r, |r, ()| r.ok());
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = self.keibi.lseek(fh.0, offset, whence);
        self.inline(log("lseek", ino, Some(fh)), reply, r, |r, o| r.offset(o));
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Programs probe files with ioctls (isatty's TCGETS, FS_IOC_*);
        // ENOTTY is what a local file without that ioctl answers. Reflink
        // requests get EOPNOTSUPP, which `cp --reflink=auto` takes as
        // "copy instead".
        let e = if cmd == FICLONE || cmd == FICLONERANGE {
            fs_err!(EOPNOTSUPP, "reflink (ioctl {cmd:#x}) is not supported")
        } else {
            fs_err!(ENOTTY, "ioctl {cmd:#x} is not supported")
        };
        finish(
            log("ioctl", ino, Some(fh)),
            reply,
            Err::<(), _>(e),
            |_, _| (),
        );
    }

    fn poll(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        // ENOSYS makes the kernel treat the file as always ready, as for a
        // local file, and stop asking.
        let e = fs_err!(ENOSYS, "poll: regular files are always ready");
        finish(
            log("poll", ino, Some(fh)),
            reply,
            Err::<(), _>(e),
            |_, _| (),
        );
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let e = fs_err!(
            ENOSYS,
            "copy_file_range is not offloaded; the kernel falls back to read and write"
        );
        self.inline(
            log("copy_file_range", ino_in, Some(fh_in)),
            reply,
            Err::<u32, _>(e),
            |_, _| (),
        );
    }
}

/// A `readdir` or `readdirplus` reply.
trait DirReply: Answer {
    /// Whether it carries attributes.
    const PLUS: bool;
    /// Add `e`, its attributes valid for `ttl`; `true` when the reply is
    /// full (`e` not added).
    fn put(&mut self, e: &DirEntry, ttl: Duration) -> bool;
    /// Send it.
    fn ok(self);
}

impl DirReply for ReplyDirectory {
    const PLUS: bool = false;
    fn put(&mut self, e: &DirEntry, _ttl: Duration) -> bool {
        self.add(
            INodeNo(e.ino.0),
            e.cookie.0,
            file_type(e.kind),
            OsStr::from_bytes(e.name.as_bytes()),
        )
    }
    fn ok(self) {
        ReplyDirectory::ok(self)
    }
}

impl DirReply for ReplyDirectoryPlus {
    const PLUS: bool = true;
    fn put(&mut self, e: &DirEntry, ttl: Duration) -> bool {
        let (attr, ttl) = match &e.attr {
            Some(a) => (file_attr(a), ttl),
            None => (placeholder_attr(e.ino.0, e.kind), Duration::ZERO),
        };
        self.add(
            INodeNo(e.ino.0),
            e.cookie.0,
            OsStr::from_bytes(e.name.as_bytes()),
            &ttl,
            &attr,
            Generation(0),
        )
    }
    fn ok(self) {
        ReplyDirectoryPlus::ok(self)
    }
}

/// Move entries of `ahead` into `reply` until it is full. Entries fresh
/// from syncd for this request (`fresh`) all may go: the kernel discards
/// attributes that changed while its request was out. Older ones stop at
/// the first that [`Keibi::usable_ahead`] refuses. Attributes get what is
/// left of `ttl` since syncd was asked for them.
fn fill<R: DirReply>(
    k: &Keibi,
    ahead: &mut ReadAhead,
    reply: &mut R,
    ttl: Duration,
    fresh: bool,
) -> usize {
    let now = Instant::now();
    let since = ahead.since();
    ahead.serve(
        |e| fresh || k.usable_ahead(e, R::PLUS),
        |e, asked_at| {
            let full = reply.put(e, k.attr_ttl(e.ino.0, ttl_left(ttl, asked_at, now), since));
            // A readdirplus entry counts a lookup, except `.` and `..`.
            if !full
                && R::PLUS
                && let Some(a) = &e.attr
                && e.name.as_bytes() != b"."
                && e.name.as_bytes() != b".."
            {
                k.entry_given(a, since);
            }
            full
        },
    )
}

fn xattr_answer(r: ReplyXattr, x: XattrReply) {
    match x {
        XattrReply::Size(n) => r.size(n),
        XattrReply::Data(d) => r.data(&d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_1970() {
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp {
                secs: 1_700_000_000,
                nanos: 123,
            },
            Timestamp {
                secs: -1,
                nanos: 500_000_000,
            },
            Timestamp {
                secs: -86_400,
                nanos: 0,
            },
        ] {
            assert_eq!(timestamp(system_time(t)), t);
        }
    }

    #[test]
    fn long_names_are_refused_here() {
        let ok = OsStr::from_bytes(&[b'a'; 255]);
        assert!(name(ok).is_ok());
        let long = OsStr::from_bytes(&[b'a'; 256]);
        assert_eq!(
            name(long).map_err(|e| e.errno).err(),
            Some(libc::ENAMETOOLONG)
        );
    }

    #[test]
    fn umask_masks_permissions() {
        assert_eq!(masked(0o100666, 0o022), 0o644);
        assert_eq!(masked(0o41777, 0o077), 0o1700);
    }
}
