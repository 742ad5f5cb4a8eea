//! Named values of the filesystem protocol.
//!
//! Numbers that mean different things get different types (`Ino`,
//! `HandleId`, `DirCookie`), so a signature reads like its documentation and
//! the compiler catches a swapped argument.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An inode number. Assigned by syncd, never reused, stable across restarts.
/// [`Ino::ROOT`] is the shared folder's root directory.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct Ino(pub u64);

impl Ino {
    /// The root directory of the share (FUSE's `FUSE_ROOT_ID`).
    pub const ROOT: Ino = Ino(1);
}

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ino {}", self.0)
    }
}

/// One open of a regular file, as syncd knows it. Returned by
/// `open`/`create`, tags the descriptor sent over the fd channel, given
/// back in `release`, and listed in `register_mount` after a reconnect.
/// Unique across syncd restarts: the top 24 bits are syncd's handle epoch
/// (a stored counter incremented at every start), the low 40 bits count
/// the opens of one syncd run. mountd still gives the kernel its own file
/// handles.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandleId(pub u64);

impl fmt::Display for HandleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fh {}", self.0)
    }
}

/// Position in a directory listing. `readdir` returns entries whose cookie
/// is greater than the one given; 0 starts from the beginning. A cookie
/// stays valid while entries are added and removed (it is not an index).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirCookie(pub u64);

/// One path component: arbitrary bytes except `/` and NUL (not
/// necessarily UTF-8), validated by syncd before it becomes an entry.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(pub Vec<u8>);

impl Name {
    /// The longest name accepted, in bytes (as `NAME_MAX` on ext4).
    pub const MAX_LEN: usize = 255;

    /// Borrow the name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl From<&[u8]> for Name {
    fn from(b: &[u8]) -> Self {
        Name(b.to_vec())
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(s.as_bytes().to_vec())
    }
}

/// What kind of inode this is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A regular file with content.
    File,
    /// A directory.
    Directory,
    /// A symbolic link; its target is stored in the metadata store.
    Symlink,
    /// A named pipe (`mkfifo`).
    Fifo,
    /// A Unix socket node.
    Socket,
    /// A character device node (metadata only: the mount is `nodev`).
    CharDevice,
    /// A block device node (metadata only: the mount is `nodev`).
    BlockDevice,
}

/// A point in time, as seconds and nanoseconds since the Unix epoch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timestamp {
    /// Whole seconds since 1970-01-01T00:00:00Z (negative before it).
    pub secs: i64,
    /// Nanoseconds within the second, `0..1_000_000_000`.
    pub nanos: u32,
}

impl Timestamp {
    /// The current time of the system clock.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }
}

/// The attributes of an inode, as `stat` shows them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// Kind of inode.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Last access.
    pub atime: Timestamp,
    /// Last content change.
    pub mtime: Timestamp,
    /// Last status change.
    pub ctime: Timestamp,
    /// Creation.
    pub crtime: Timestamp,
    /// Permission bits including setuid, setgid and sticky (`0o7777` mask).
    pub perm: u16,
    /// Number of hard links (for a directory: 2 + its subdirectories).
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Preferred I/O size.
    pub blksize: u32,
    /// Device number of a device node (`st_rdev`, the kernel's encoding);
    /// 0 for every other kind.
    pub rdev: u32,
    /// Whether the inode has any extended attribute. mountd answers
    /// `getxattr`/`listxattr` of an inode without any from this, with no
    /// round trip: the kernel asks for `security.capability` before every
    /// write and `ls -l` asks for `security.selinux` of every file, so those
    /// questions must neither cost a call nor wait on a stalled syncd.
    pub has_xattrs: bool,
}

/// A new value for a timestamp in `setattr`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    /// The server's current time (`UTIME_NOW`).
    Now,
    /// This time.
    At(Timestamp),
}

/// The changes of one `setattr`; `None` leaves a field alone.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New permission bits (`0o7777` mask).
    pub perm: Option<u16>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate or extend with a hole).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSet>,
    /// New modification time.
    pub mtime: Option<TimeSet>,
}

/// Who asks, for operations that create inodes: their owner comes from the
/// caller, as on a local disk.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Effective uid of the calling process.
    pub uid: u32,
    /// Effective gid of the calling process.
    pub gid: u32,
    /// Its pid (for logs).
    pub pid: u32,
}

/// One entry of a directory listing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Resume point: the next `readdir` after this entry passes this cookie.
    pub cookie: DirCookie,
    /// The entry's name (`.` and `..` included).
    pub name: Name,
    /// The inode it names.
    pub ino: Ino,
    /// Its kind.
    pub kind: FileKind,
    /// Its attributes, present when `readdir` was asked for them (readdirplus).
    pub attr: Option<Attr>,
}

/// Where the content file of an open lives; mountd checks the descriptor it
/// receives against this before it uses it (see `docs/architecture.md`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentId {
    /// `st_dev` of the content file.
    pub dev: u64,
    /// `st_ino` of the content file (in the state directory's filesystem,
    /// not a keibi inode number).
    pub ino: u64,
    /// `st_uid` of the content file: syncd's uid.
    pub uid: u32,
}

/// The answer to `open` and `create`. The descriptor itself travels on the
/// fd channel, tagged with `handle`, and is sent before this answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// syncd's name for this open (valid on this connection only).
    pub handle: HandleId,
    /// Attributes after the open (after `O_TRUNC`, if asked).
    pub attr: Attr,
    /// Identity of the content file whose descriptor was sent.
    pub content: ContentId,
    /// Set when the file's bytes are not all local (protocol version 6).
    pub partial: Option<Partial>,
    /// For `create`: the directory's attributes after the new name was
    /// added (protocol version 8); `None` for `open`, and when syncd could
    /// not read them.
    pub parent: Option<Attr>,
}

/// The answer to a call that adds a name (`mkdir`, `mknod`, `symlink`,
/// `link`; protocol version 8).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Made {
    /// The attributes of the inode the new name refers to.
    pub attr: Attr,
    /// The directory's attributes after the change; `None` when syncd
    /// could not read them (the change was made all the same).
    pub parent: Option<Attr>,
}

/// The attributes of the directories whose names a call changed (`unlink`,
/// `rmdir`, `rename`; protocol version 8), read after the change; `None`
/// when syncd could not read them (the change was made all the same).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct DirsAfter {
    /// The directory of the (old) name.
    pub parent: Option<Attr>,
    /// `rename` into another directory: that directory.
    pub new_parent: Option<Attr>,
}

/// `rename` flags (`renameat2`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RenameFlags {
    /// `RENAME_NOREPLACE`: fail with `EEXIST` if the target exists.
    pub noreplace: bool,
    /// `RENAME_EXCHANGE`: swap the two entries atomically.
    pub exchange: bool,
}

/// `setxattr` mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XattrSet {
    /// Create or replace.
    #[default]
    Any,
    /// `XATTR_CREATE`: fail with `EEXIST` if it exists.
    Create,
    /// `XATTR_REPLACE`: fail with `ENODATA` if it does not exist.
    Replace,
}

/// Filesystem statistics (`statfs`), those of the state directory's
/// filesystem, where content lives.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    /// Total blocks of `bsize` bytes.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Blocks available to unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

/// What mountd tells syncd about itself when it connects.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct MountInfo {
    /// Absolute path of the mountpoint.
    pub mountpoint: String,
    /// mountd's pid.
    pub pid: u32,
    /// Whether FUSE passthrough is in use for this mount.
    pub passthrough: bool,
    /// True when this is a reconnection of a mount that stayed up (syncd
    /// restarted); false for a fresh mount, which lets syncd drop state
    /// left by an earlier mount (open counts of unlinked files).
    pub reconnect: bool,
}

/// A handle mountd still holds, listed in `register_mount` on a reconnect.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldHandle {
    /// syncd's id of the open.
    pub handle: HandleId,
    /// The inode it opens.
    pub ino: Ino,
}

/// A mount connected to syncd, as `keibictl status` shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct MountStatus {
    /// What the mount said about itself.
    pub info: MountInfo,
    /// Seconds since it connected.
    pub connected_secs: u64,
    /// Files it has open now.
    pub open_handles: u64,
}

/// syncd's state, for `keibictl status`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct Status {
    /// syncd's release version.
    pub version: String,
    /// syncd's IPC protocol version.
    pub protocol_version: u32,
    /// syncd's pid.
    pub pid: u32,
    /// Seconds since syncd started.
    pub uptime_secs: u64,
    /// The state directory.
    pub state_dir: String,
    /// Mounts connected now.
    pub mounts: Vec<MountStatus>,
    /// Regular files in the share.
    pub files: u64,
    /// Directories in the share (the root included).
    pub directories: u64,
    /// Other inodes (symlinks, fifos, sockets, device nodes).
    pub others: u64,
    /// Bytes of content (sum of file sizes).
    pub bytes: u64,
    /// Whether `files`, `directories`, `others`, `bytes` and each mount's
    /// `open_handles` were counted for this answer. syncd waits for its
    /// count of the store only a moment; when the store is slower, the
    /// figures are those of the last count that finished.
    pub counts_fresh: bool,
    /// How old those figures are, in milliseconds; `None` when no count
    /// has finished since syncd started (the figures are then 0).
    pub counts_age_ms: Option<u64>,
}

/// A mount's FUSE passthrough state, for `keibictl debug passthrough`:
/// what was asked for and granted, and how each open was answered.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct PassthroughStatus {
    /// mountd asked for passthrough (it was not started with
    /// `--no-passthrough`).
    pub wanted: bool,
    /// The kernel granted the passthrough capability in FUSE `init`.
    pub granted: bool,
    /// Passthrough was switched off after the kernel refused to register a
    /// backing file before any passthrough open had succeeded.
    pub disabled: bool,
    /// Opens (`open` and `create`) answered with passthrough: the kernel
    /// does their reads and writes on the content file.
    pub passthrough_opens: u64,
    /// Opens answered without passthrough: their reads and writes go
    /// through mountd (`pread`/`pwrite`).
    pub plain_opens: u64,
}

/// One operation a daemon is serving now, for `keibictl debug ops`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct OpInFlight {
    /// The operation: a FUSE op name (mountd) or a filesystem service
    /// method name (syncd).
    pub op: String,
    /// The inode it is about, when it has one.
    pub ino: Option<u64>,
    /// The file or directory handle it is about, when it has one.
    pub fh: Option<u64>,
    /// Milliseconds since it started.
    pub age_ms: u64,
    /// What it waits on: `keibi-syncd (lookup)`, `fd channel`,
    /// `connection to keibi-syncd`, `store`, `blocking pool`.
    pub waiting_on: String,
}

/// What `keibictl check` found wrong in the store (`Control::check`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub enum CheckKind {
    /// A named regular file whose content file is missing (repair:
    /// recreate it empty).
    MissingContent,
    /// A content file that no inode record names (repair: remove it).
    UnreferencedContent,
    /// A directory entry whose inode has no record (repair: remove the
    /// entry).
    EntryWithoutInode,
    /// An inode whose link count differs from the entries naming it
    /// (repair: set it to the count, unless no entry names it at all).
    LinkCount,
    /// A directory whose `entries` count or next cookie disagrees with its
    /// entries (repair: set them).
    DirectoryCounts,
    /// A directory whose parent pointer disagrees with the entry naming it
    /// (repair: set it).
    DirectoryParent,
    /// An inode with no name, not open, kept by the store (an orphan
    /// without open handles, or a linked inode that no entry reaches).
    /// Orphans are freed by the next fresh mount; not repaired here,
    /// because a mount that reconnected may still hold it open.
    Unreachable,
    /// An orphan mark and a link count that disagree (repair: mark or
    /// unmark).
    OrphanMark,
    /// A readdir cookie without its entry, or an entry without its cookie
    /// (repair: remove the cookie, or give the entry a new one).
    Cookie,
    /// Extended attributes of an inode that has no record (repair: remove
    /// them).
    XattrsWithoutInode,
    /// A record that cannot be decoded (not repaired).
    Corrupt,
    /// Repaired by syncd's start-up scan in this run (a named regular file
    /// whose content file a power cut lost, recreated empty).
    RecoveredAtStart,
}

/// One inconsistency `check` found.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct CheckFinding {
    /// What kind.
    pub kind: CheckKind,
    /// The inode it is about, when it has one.
    pub ino: Option<Ino>,
    /// What exactly, for people.
    pub detail: String,
    /// Whether it was repaired (only with `repair`, or at start).
    pub repaired: bool,
}

/// The answer of `Control::check`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct CheckReport {
    /// Inode records scanned.
    pub inodes: u64,
    /// Directory entries scanned.
    pub entries: u64,
    /// Content files scanned.
    pub content_files: u64,
    /// Every inconsistency found now.
    pub findings: Vec<CheckFinding>,
    /// What syncd's start-up scan repaired in this run (not counted as
    /// findings: the store was consistent afterwards).
    pub recovered_at_start: Vec<CheckFinding>,
}

impl CheckReport {
    /// How many findings were not repaired.
    pub fn unrepaired(&self) -> usize {
        self.findings.iter().filter(|f| !f.repaired).count()
    }
}

/// syncd's peer identity, for `keibictl id` (`Control::identity`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct PeerIdentity {
    /// The fingerprint: base32 (RFC 4648, upper case, no padding) of
    /// SHA-256 over a domain-separation label and the public key; 52
    /// characters, not grouped (keibictl groups it for people).
    pub fingerprint: String,
    /// The X25519 static public key, 64 lower-case hex digits.
    pub public_key: String,
    /// The peer listen addresses (`listen` in syncd.toml), all bound
    /// (syncd does not start when one cannot be); empty means dial only.
    pub listen: Vec<String>,
}

/// One paired peer and its connection, for `keibictl peer list`
/// (`Control::peer_list`, `peer_add`, `peer_remove`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct PeerInfo {
    /// The peer's fingerprint, 52 characters, not grouped.
    pub fingerprint: String,
    /// The name given with `peer add --name`.
    pub name: Option<String>,
    /// Where syncd dials it (`host:port` or `host`); `None`: it never
    /// dials this peer and waits for it to connect.
    pub addr: Option<String>,
    /// `connected`, `connecting` (a dial or handshake under way),
    /// `waiting` (backing off until `next_attempt_ms`) or `idle` (no
    /// address and not connected: waiting for the peer to dial).
    pub state: String,
    /// Who dialed the live connection: `outbound` (this syncd) or
    /// `inbound` (the peer); `None` when not connected.
    pub direction: Option<String>,
    /// The peer's IP address and port of the live connection.
    pub remote_addr: Option<String>,
    /// When data last arrived from the peer (Unix time, milliseconds);
    /// kept across restarts.
    pub last_seen_unix_ms: Option<u64>,
    /// Smoothed round-trip time of the keepalive pings, microseconds.
    pub rtt_us: Option<u64>,
    /// Bytes sent on the live connection (frame payloads).
    pub bytes_sent: u64,
    /// Bytes received on the live connection (frame payloads).
    pub bytes_received: u64,
    /// The peer protocol version negotiated on the live connection.
    pub protocol_version: Option<u32>,
    /// Key changes on the live connection, both directions together.
    pub rekeys: u64,
    /// Why the last connection or attempt ended, when it did.
    pub last_error: Option<String>,
    /// Milliseconds until the next dial, while `waiting`.
    pub next_attempt_ms: Option<u64>,
}

/// Why a peer command failed (`Control::peer_add`, `peer_remove`,
/// `peer_bench`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum PeerCtlError {
    /// The fingerprint is not 52 base32 characters that decode to 32
    /// bytes; says what is wrong.
    BadFingerprint(String),
    /// No peer with this fingerprint was added.
    UnknownPeer(String),
    /// The fingerprint is this syncd's own.
    IsSelf,
    /// The address is not `host:port` or `host`; says what is wrong.
    BadAddress(String),
    /// The peer is not connected now (the fingerprint).
    NotConnected(String),
    /// Anything else (the store failed, the bench's requests failed).
    Failed(String),
}

impl fmt::Display for PeerCtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerCtlError::BadFingerprint(why) => write!(f, "bad fingerprint: {why}"),
            PeerCtlError::UnknownPeer(fp) => write!(f, "no peer {fp} was added"),
            PeerCtlError::IsSelf => write!(f, "this is this machine's own fingerprint"),
            PeerCtlError::BadAddress(why) => write!(f, "bad address: {why}"),
            PeerCtlError::NotConnected(fp) => write!(f, "peer {fp} is not connected"),
            PeerCtlError::Failed(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for PeerCtlError {}

/// The answer of `Control::peer_bench`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct BenchReport {
    /// Payload bytes received.
    pub bytes: u64,
    /// Concurrent streams.
    pub streams: u32,
    /// From the first request sent to the last byte received.
    pub seconds: f64,
    /// `bytes / seconds / 1e6`.
    pub mb_per_s: f64,
    /// Key changes on the connection during the bench, both directions.
    pub rekeys: u64,
}

/// A peer request in flight, for `keibictl debug ops`
/// (`Control::debug_peer_ops`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct PeerOpInFlight {
    /// The peer's fingerprint.
    pub peer: String,
    /// The peer's name, if it was given one.
    pub name: Option<String>,
    /// The request (`Ping`, `Echo`, `Bulk`, ...).
    pub request: String,
    /// True when this syncd asked; false when it serves the peer.
    pub outgoing: bool,
    /// Milliseconds since it started.
    pub age_ms: u64,
    /// Bytes moved so far.
    pub bytes: u64,
}

/// A file whose bytes are not all on this machine (protocol version 6):
/// part of [`Opened`]. mountd must not use passthrough for such an open,
/// and reads a range at once only when every chunk it touches is marked
/// present; otherwise it first calls `Filesystem::fetch_range`. A write
/// touching a missing chunk below `size` fetches it first too, so that a
/// fetch never overwrites written bytes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Partial {
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Size of the version this handle reads (chunks exist below it only).
    pub size: u64,
    /// Bitmap of chunks present and verified: chunk `i` is bit `i % 64` of
    /// word `i / 64`.
    pub present: Vec<u64>,
}

/// One cache invalidation syncd asks mountd to do, after it applied a
/// change that came from a peer (protocol version 6).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Inval {
    /// The entry `name` in `parent` changed (appeared, went or now names
    /// another inode): `notify_inval_entry`, and drop mountd's cached
    /// entry and the directory's read-ahead.
    Entry {
        /// The directory.
        parent: Ino,
        /// The name in it.
        name: Name,
    },
    /// The inode's attributes or content changed: `notify_inval_inode`
    /// (whole range), and drop mountd's cached attributes.
    Inode {
        /// The inode.
        ino: Ino,
    },
    /// Changes were dropped before mountd read them (it asked from a
    /// sequence number older than syncd keeps, or syncd restarted): drop
    /// every cache mountd keeps.
    All,
}

/// An answer to `Filesystem::changes`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChangeBatch {
    /// Identifies this syncd run; a different value than the last batch
    /// means syncd restarted (and `items` starts with [`Inval::All`]).
    pub epoch: u64,
    /// The sequence number to ask from next time.
    pub next: u64,
    /// The invalidations, oldest first.
    pub items: Vec<Inval>,
}

/// Sync state of one peer, for `keibictl status` (protocol version 6).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct PeerSync {
    /// The peer's fingerprint.
    pub fingerprint: String,
    /// The peer's name, if it was given one.
    pub name: Option<String>,
    /// Whether it is connected now.
    pub connected: bool,
    /// Since when it has been unreachable (seconds since the epoch, UTC),
    /// when it is not connected.
    pub unreachable_since: Option<i64>,
    /// Local changes the peer has not yet pulled (as far as this side
    /// knows).
    pub pending_out: u64,
    /// Changes of the peer not yet applied here (known from its last
    /// announcement).
    pub pending_in: u64,
    /// The last local sequence number the peer acknowledged.
    pub acked_seq: u64,
    /// The peer's last sequence number applied here.
    pub applied_seq: u64,
    /// Changes from the peer that are waiting (their parent directory has
    /// not arrived yet, or they could not be applied; see the log).
    pub deferred: u64,
    /// Whether the peer told this connection how far its change log goes
    /// (its first `CaughtUp` arrived): until then `pending_in` is from an
    /// earlier connection (protocol version 7).
    pub caught_up: bool,
}

/// What `keibictl status` shows of sync (protocol version 6).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct SyncStatus {
    /// This machine's device id (16 hex digits).
    pub device: String,
    /// The local change sequence number.
    pub local_seq: u64,
    /// Local changes not yet made into versions.
    pub dirty: u64,
    /// Per paired peer.
    pub peers: Vec<PeerSync>,
    /// Files whose bytes are not all local.
    pub partial_files: u64,
    /// Bytes of those files not present locally.
    pub missing_bytes: u64,
    /// Conflicts resolved since syncd started (a conflict copy made or
    /// a delete undone).
    pub conflicts: u64,
    /// Whether `dirty`, `partial_files` and `missing_bytes` were read
    /// from the store for this answer; false when the store did not
    /// answer in time (they are then 0; protocol version 7).
    pub figures_fresh: bool,
}

/// One file of `Control::prefetch` (`keibictl prefetch`; protocol
/// version 7).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct PrefetchFile {
    /// The path asked for, in the share, from its root (`/a/b`).
    pub path: String,
    /// The local inode, when the path names one.
    pub ino: Option<u64>,
    /// Its size.
    pub size: u64,
    /// Bytes present and verified (`size` when the file is all local).
    pub present_bytes: u64,
    /// Why the file cannot be fetched (no such file, not a regular
    /// file, a store error), the errno name in parentheses at the end;
    /// `None` when it is all local or its missing chunks are being
    /// fetched.
    pub error: Option<String>,
}

/// A file whose bytes are not all local (`keibictl status --files`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct NotLocal {
    /// Its path in the share, from the root (`/a/b`), lossy UTF-8.
    pub path: String,
    /// The local inode.
    pub ino: u64,
    /// Its size.
    pub size: u64,
    /// Bytes present and verified.
    pub present_bytes: u64,
}

/// A chunk fetch in flight (`keibictl debug ops`, key `fetches`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "json-schema", derive(schemars::JsonSchema))]
pub struct FetchInFlight {
    /// The local inode.
    pub ino: u64,
    /// The chunk index.
    pub chunk: u64,
    /// The peer asked (fingerprint).
    pub peer: String,
    /// Milliseconds since it was asked.
    pub age_ms: u64,
    /// Whether a reader waits for it (false: read-ahead or eager fetch).
    pub demanded: bool,
}
