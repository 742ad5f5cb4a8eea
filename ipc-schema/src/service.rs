//! The tarpc services. Each method is one line of the protocol; its
//! arguments and results are named types from [`crate::types`].
//!
//! Every call is made with a deadline in its tarpc `Context`; syncd drops a
//! request whose deadline has passed, and mountd answers the kernel when it
//! passes whether syncd answered or not.

// `mknod` carries eight values (with the context); the generated client and
// server methods take them one by one.
#![allow(clippy::too_many_arguments)]

use crate::error::FsError;
use crate::types::*;

/// The filesystem service: keibi-mountd → keibi-syncd, on the filesystem
/// socket (root only). Metadata lives in syncd; file bytes do not cross
/// this service: `open`/`create` send a descriptor on the fd channel.
#[tarpc::service]
pub trait Filesystem {
    /// Say who this mount is; the first call on a connection. On a
    /// reconnect, `held` lists every handle mountd still holds and
    /// `referenced` every inode the kernel still references (its lookup
    /// count is above zero); both are empty for a fresh mount. syncd's
    /// open counts and kernel references of unlinked inodes become exactly
    /// these.
    async fn register_mount(
        info: MountInfo,
        held: Vec<HeldHandle>,
        referenced: Vec<Ino>,
    ) -> Result<(), FsError>;
    /// The kernel no longer references `inos` (their lookup counts reached
    /// zero, `FUSE_FORGET`): an unlinked inode among them that is not open
    /// is freed. Inodes syncd holds no reference of for this mount are
    /// ignored, so a forget may be sent late or twice.
    async fn forget(inos: Vec<Ino>) -> Result<(), FsError>;
    /// Look `name` up in directory `parent`.
    async fn lookup(parent: Ino, name: Name) -> Result<Attr, FsError>;
    /// Attributes of an inode.
    async fn getattr(ino: Ino) -> Result<Attr, FsError>;
    /// Change attributes (mode, owner, size, times).
    async fn setattr(ino: Ino, changes: SetAttr) -> Result<Attr, FsError>;
    /// List a directory: up to `limit` entries with cookies after `after`,
    /// `.` and `..` first; with their attributes if `plus`.
    async fn readdir(
        dir: Ino,
        after: DirCookie,
        limit: u32,
        plus: bool,
    ) -> Result<Vec<DirEntry>, FsError>;
    /// Make a directory (`perm` already masked by the caller's umask).
    async fn mkdir(parent: Ino, name: Name, perm: u16, caller: Caller) -> Result<Made, FsError>;
    /// Make a fifo, socket or device node (`rdev`: the device number of a
    /// device node, the kernel's encoding; ignored for other kinds).
    async fn mknod(
        parent: Ino,
        name: Name,
        kind: FileKind,
        perm: u16,
        rdev: u32,
        caller: Caller,
    ) -> Result<Made, FsError>;
    /// Make a symbolic link to `target`.
    async fn symlink(
        parent: Ino,
        name: Name,
        target: Vec<u8>,
        caller: Caller,
    ) -> Result<Made, FsError>;
    /// Read a symbolic link's target.
    async fn readlink(ino: Ino) -> Result<Vec<u8>, FsError>;
    /// Add a hard link to `ino` as `new_parent/new_name`.
    async fn link(ino: Ino, new_parent: Ino, new_name: Name) -> Result<Made, FsError>;
    /// Remove a non-directory entry.
    async fn unlink(parent: Ino, name: Name) -> Result<DirsAfter, FsError>;
    /// Remove an empty directory.
    async fn rmdir(parent: Ino, name: Name) -> Result<DirsAfter, FsError>;
    /// Rename (`renameat2` semantics, with its flags).
    async fn rename(
        parent: Ino,
        name: Name,
        new_parent: Ino,
        new_name: Name,
        flags: RenameFlags,
    ) -> Result<DirsAfter, FsError>;
    /// Create and open a regular file; `flags` are the `open(2)` flags.
    async fn create(
        parent: Ino,
        name: Name,
        perm: u16,
        flags: i32,
        caller: Caller,
    ) -> Result<Opened, FsError>;
    /// Open a regular file; `flags` are the `open(2)` flags (`O_TRUNC` is
    /// applied here).
    async fn open(ino: Ino, flags: i32) -> Result<Opened, FsError>;
    /// Forget an open; the last release of an unlinked file frees it.
    /// Releasing an unknown handle is not an error (ids are never reused).
    async fn release(handle: HandleId) -> Result<(), FsError>;
    /// Make the inode's metadata and content durable on local disk.
    async fn fsync(ino: Ino, datasync: bool) -> Result<(), FsError>;
    /// Statistics of the filesystem holding the content.
    async fn statfs() -> Result<StatFs, FsError>;
    /// Set an extended attribute.
    async fn setxattr(ino: Ino, name: Name, value: Vec<u8>, mode: XattrSet) -> Result<(), FsError>;
    /// Get an extended attribute (ENODATA when absent).
    async fn getxattr(ino: Ino, name: Name) -> Result<Vec<u8>, FsError>;
    /// List extended attribute names.
    async fn listxattr(ino: Ino) -> Result<Vec<Name>, FsError>;
    /// Remove an extended attribute (ENODATA when absent).
    async fn removexattr(ino: Ino, name: Name) -> Result<(), FsError>;
    /// Make the chunks of `[offset, offset + len)` of the version open as
    /// `handle` present (fetching and verifying what is missing) and
    /// answer the handle's presence bitmap ([`Partial::present`]).
    /// `EIO` when no reachable peer has a chunk, `ETIMEDOUT` at the
    /// call's deadline (protocol version 6).
    async fn fetch_range(handle: HandleId, offset: u64, len: u64) -> Result<Vec<u64>, FsError>;
    /// The invalidations after sequence number `after` of run `epoch`,
    /// waiting up to `wait_ms` for one to come (a long poll; protocol
    /// version 6).
    async fn changes(epoch: u64, after: u64, wait_ms: u32) -> Result<ChangeBatch, FsError>;
}

/// The control service: keibictl → keibi-syncd, on the control socket.
#[tarpc::service]
pub trait Control {
    /// Versions, uptime, mounts, counts.
    async fn status() -> Status;
    /// The filesystem requests syncd is serving now, oldest first
    /// (`op` is the method name).
    async fn debug_ops() -> Vec<OpInFlight>;
    /// Scan the store and the content directory and report every
    /// inconsistency; with `repair`, fix what can be fixed without
    /// guessing and say so in each finding. Runs while the store serves.
    async fn check(repair: bool) -> Result<CheckReport, FsError>;
    /// This syncd's peer identity: its fingerprint, public key and the
    /// configured listen addresses (protocol version 4).
    async fn identity() -> PeerIdentity;
    /// Pair with a peer, or change the address and name of one already
    /// added: syncd dials `addr` when given, and accepts the peer's
    /// connections from now on (protocol version 5).
    async fn peer_add(
        fingerprint: String,
        addr: Option<String>,
        name: Option<String>,
    ) -> Result<PeerInfo, PeerCtlError>;
    /// Every paired peer and its connection, by fingerprint.
    async fn peer_list() -> Vec<PeerInfo>;
    /// Unpair a peer: its connection is closed at once and it is neither
    /// dialed nor accepted any more. Answers what it was.
    async fn peer_remove(fingerprint: String) -> Result<PeerInfo, PeerCtlError>;
    /// Ask the connected peer for `bytes` of test data over `streams`
    /// concurrent streams and time it.
    async fn peer_bench(
        fingerprint: String,
        bytes: u64,
        streams: u32,
    ) -> Result<BenchReport, PeerCtlError>;
    /// The peer requests in flight (sent and served), oldest first.
    async fn debug_peer_ops() -> Vec<PeerOpInFlight>;
    /// Sync state: local sequence, per-peer progress, partial files
    /// (protocol version 6).
    async fn sync_status() -> SyncStatus;
    /// Files whose bytes are not all local, up to `limit` (protocol
    /// version 6).
    async fn not_local(limit: u32) -> Vec<NotLocal>;
    /// Chunk fetches in flight, oldest first (protocol version 6).
    async fn debug_fetches() -> Vec<FetchInFlight>;
    /// Make the files at `paths` (in the share, from its root) local:
    /// start fetching every missing chunk of each from the connected
    /// peers, in the background, and answer each file's state now.
    /// Chunks already in flight are not asked twice; calling it again
    /// retries chunks whose fetch failed. Progress is read by calling it
    /// again (protocol version 7).
    async fn prefetch(paths: Vec<String>) -> Vec<PrefetchFile>;
}

/// The debug service: keibictl → keibi-mountd, on the mount's ops socket
/// (`<lock dir>/<anchor>/ops.sock`, [`crate::paths`], root only). Served by
/// mountd itself, so it answers while syncd is frozen.
#[tarpc::service]
pub trait MountDebug {
    /// The FUSE operations mountd is waiting on now, oldest first.
    async fn ops() -> Vec<OpInFlight>;
    /// Whether this mount's opens go through FUSE passthrough, and how
    /// many opens went each way since it was mounted.
    async fn passthrough() -> PassthroughStatus;
}
