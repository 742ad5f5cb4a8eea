//! Content files: the bytes of regular files, one ordinary file per inode
//! and *content generation* under `<state>/content/`, created with mode
//! 0600 (only syncd's user can open them). Generation 0 is named by the
//! inode number in 16 hex digits (`<ino:016x>`, the only name before store
//! format 3); generation g > 0 is `<ino:016x>.<g:08x>`.
//!
//! A generation is a whole version of the bytes. Local writes change the
//! current generation in place; a version applied from a peer starts the
//! next one (a new, sparse file filled from the old one where chunks match
//! and from the peer on demand), so syncd never rewrites bytes under a
//! descriptor that mountd (or the kernel, for a passthrough file) holds:
//! an open handle keeps reading the generation it opened. The store
//! records the current generation in the inode ([`crate::store::records`])
//! and each handle's generation in the open table ([`crate::opens`]); an
//! older generation is removed at its last release (or, after a crash, by
//! the start-up scan, which removes every file that is not the current
//! generation of an inode).
//!
//! syncd rarely touches the bytes itself: it opens a content file with the
//! access mode an `open` asked for and passes the descriptor to mountd,
//! which reads and writes through it. So a regular file's size, blocks,
//! atime and mtime are read from the content file (`stat`) whenever syncd
//! answers, and `setattr` changes them here (truncate, `futimens`).
//!
//! A content file is created before the transaction that links its inode
//! into the tree and removed only after the transaction that frees the
//! inode is durable (`store/reclaim.rs`), so a crash never leaves the store
//! naming a missing file; it leaves at most unreferenced files, which the
//! store's start-up scan removes ([`ContentDir::list`]). Only a power cut
//! can lose the directory entry of a new content file that is named by a
//! durable record (the entry is made durable by `fsync`/`fsyncdir` on the
//! mount, [`ContentDir::sync_dir`], and for spares before they are used);
//! the start-up scan recreates such a file empty and says so.
//!
//! Every operation on one file is a single `*at` system call relative to a
//! descriptor of the content directory held open for the daemon's life, so
//! the kernel resolves one name, not the whole state directory path, and
//! each answer needs one `stat` at most: `create_open` hands back the
//! descriptor of the new file, and [`ContentDir::update`] truncates, sets
//! times and stats through one descriptor.

use ipc_schema::{StatFs, TimeSet, Timestamp};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};
use nix::unistd::UnlinkatFlags;
use std::fs::{File, FileTimes};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Mode of a new content file.
const CONTENT_MODE: u32 = 0o600;

/// What the store needs from a content file's `stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentStat {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_uid`.
    pub uid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    /// Preferred I/O size.
    pub blksize: u32,
    /// Last access.
    pub atime: Timestamp,
    /// Last modification.
    pub mtime: Timestamp,
    /// Last status change.
    pub ctime: Timestamp,
}

impl From<&FileStat> for ContentStat {
    fn from(m: &FileStat) -> Self {
        let ts = |secs: i64, nanos: i64| Timestamp {
            secs,
            nanos: nanos.clamp(0, 999_999_999) as u32,
        };
        ContentStat {
            dev: m.st_dev,
            ino: m.st_ino,
            uid: m.st_uid,
            size: u64::try_from(m.st_size).unwrap_or(0),
            blocks: u64::try_from(m.st_blocks).unwrap_or(0),
            blksize: u32::try_from(m.st_blksize).unwrap_or(u32::MAX),
            atime: ts(m.st_atime, m.st_atime_nsec),
            mtime: ts(m.st_mtime, m.st_mtime_nsec),
            ctime: ts(m.st_ctime, m.st_ctime_nsec),
        }
    }
}

impl ContentStat {
    /// `fstat` of an open content file.
    pub fn of(fd: impl AsFd) -> io::Result<ContentStat> {
        nix::sys::stat::fstat(fd)
            .map(|s| ContentStat::from(&s))
            .map_err(io::Error::from)
    }
}

/// The name of the content file of `ino` generation `generation` inside
/// the content directory: 16 lower-case hex digits, and for a generation
/// above 0 a dot and at least 8 more.
fn file_name(ino: u64, generation: u64) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut name = Vec::with_capacity(if generation == 0 { 16 } else { 33 });
    for i in 0..16 {
        name.push(HEX[((ino >> (60 - 4 * i)) & 0xf) as usize]);
    }
    if generation > 0 {
        name.extend_from_slice(format!(".{generation:08x}").as_bytes());
    }
    name
}

/// The inode and generation a content file name stands for (`None` for
/// other names).
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let hex = |s: &str| {
        (!s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
    };
    let (ino, generation) = match name.split_once('.') {
        None => (name, None),
        Some((i, g)) => (i, Some(g)),
    };
    if ino.len() != 16 {
        return None;
    }
    let ino = hex(ino)?;
    match generation {
        None => Some((ino, 0)),
        Some(g) if g.len() >= 8 => Some((ino, hex(g).filter(|g| *g > 0)?)),
        Some(_) => None,
    }
}

/// The content directory of a state directory.
#[derive(Debug)]
pub struct ContentDir {
    dir: PathBuf,
    /// The directory itself (`O_PATH`), the base of every `*at` call.
    fd: OwnedFd,
}

impl ContentDir {
    /// Use (and create if needed, mode 0700) `<state_dir>/content`.
    pub fn new(state_dir: &Path) -> io::Result<ContentDir> {
        let dir = state_dir.join("content");
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let fd = nix::fcntl::open(
            &dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)?;
        Ok(ContentDir { dir, fd })
    }

    /// Path of the content file of `ino` (generation 0).
    #[cfg(test)]
    pub fn path(&self, ino: u64) -> PathBuf {
        self.dir.join(format!("{ino:016x}"))
    }

    /// Path of the content file of `ino` generation `generation`.
    #[cfg(test)]
    pub fn path_gen(&self, ino: u64, generation: u64) -> PathBuf {
        self.dir
            .join(String::from_utf8_lossy(&file_name(ino, generation)).as_ref())
    }

    fn open_at(&self, ino: u64, generation: u64, flags: OFlag) -> io::Result<OwnedFd> {
        nix::fcntl::openat(
            &self.fd,
            &file_name(ino, generation)[..],
            flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(CONTENT_MODE),
        )
        .map_err(io::Error::from)
    }

    /// Create the (empty) content file of a new inode (generation 0).
    pub fn create(&self, ino: u64) -> io::Result<()> {
        self.create_open(ino, OFlag::O_WRONLY).map(drop)
    }

    /// Create the (empty) content file of `ino` generation `generation`
    /// and keep it open with `access`.
    pub fn create_gen(&self, ino: u64, generation: u64, access: OFlag) -> io::Result<OwnedFd> {
        self.open_at(
            ino,
            generation,
            (access & OFlag::O_ACCMODE) | OFlag::O_CREAT | OFlag::O_EXCL,
        )
    }

    /// Create the (empty) content file of a new inode and keep it open
    /// with `access` (`O_RDONLY`, `O_WRONLY` or `O_RDWR`): the descriptor
    /// is the same as [`ContentDir::open`] would give.
    pub fn create_open(&self, ino: u64, access: OFlag) -> io::Result<OwnedFd> {
        self.open_at(
            ino,
            0,
            (access & OFlag::O_ACCMODE) | OFlag::O_CREAT | OFlag::O_EXCL,
        )
    }

    /// Open a spare content file (made ahead of time, see
    /// [`crate::spares`]) for its new inode `ino` with `access`, and set
    /// its access and modification times (and so its change time) to now:
    /// the file looks as if made by this call.
    pub fn open_spare(&self, ino: u64, access: OFlag) -> io::Result<OwnedFd> {
        let fd = self.open(ino, 0, access)?;
        let now = nix::sys::time::TimeSpec::UTIME_NOW;
        nix::sys::stat::futimens(&fd, &now, &now).map_err(io::Error::from)?;
        Ok(fd)
    }

    /// Open the content file of `ino` generation `generation` with `access`
    /// (`O_RDONLY`, `O_WRONLY` or `O_RDWR`) and nothing else but
    /// close-on-exec.
    pub fn open(&self, ino: u64, generation: u64, access: OFlag) -> io::Result<OwnedFd> {
        self.open_at(ino, generation, access & OFlag::O_ACCMODE)
    }

    /// Open the content file of `ino` generation `generation` for syncd's
    /// own reading (hashing, serving a chunk to a peer, copying chunks),
    /// with `O_NOATIME`: those reads are not accesses by a program, and
    /// must not move the file's atime (syncd owns the file, so the flag is
    /// allowed; without it on a filesystem that refuses it).
    pub fn open_internal(&self, ino: u64, generation: u64) -> io::Result<OwnedFd> {
        match self.open_at(ino, generation, OFlag::O_RDONLY | OFlag::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                self.open_at(ino, generation, OFlag::O_RDONLY)
            }
            other => other,
        }
    }

    /// `stat` of the content file of `ino` generation `generation`.
    pub fn stat(&self, ino: u64, generation: u64) -> io::Result<ContentStat> {
        nix::sys::stat::fstatat(
            &self.fd,
            &file_name(ino, generation)[..],
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map(|s| ContentStat::from(&s))
        .map_err(io::Error::from)
    }

    /// Set the size and/or the access and modification times of the
    /// content file of `ino` generation `generation` through one
    /// descriptor, and `stat` it.
    pub fn update(
        &self,
        ino: u64,
        generation: u64,
        size: Option<u64>,
        atime: Option<TimeSet>,
        mtime: Option<TimeSet>,
    ) -> io::Result<ContentStat> {
        let access = if size.is_some() {
            OFlag::O_WRONLY
        } else {
            OFlag::O_RDONLY
        };
        let file = File::from(self.open(ino, generation, access)?);
        if let Some(size) = size {
            file.set_len(size)?;
        }
        if atime.is_some() || mtime.is_some() {
            let mut times = FileTimes::new();
            if let Some(a) = atime {
                times = times.set_accessed(system_time(a));
            }
            if let Some(m) = mtime {
                times = times.set_modified(system_time(m));
            }
            file.set_times(times)?;
        }
        ContentStat::of(&file)
    }

    /// Remove the content file of `ino` generation `generation`; a missing
    /// file is not an error.
    pub fn remove(&self, ino: u64, generation: u64) -> io::Result<()> {
        match nix::unistd::unlinkat(
            &self.fd,
            &file_name(ino, generation)[..],
            UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Make the content file of `ino` generation `generation` (and its
    /// name in the content directory) durable.
    pub fn sync(&self, ino: u64, generation: u64, datasync: bool) -> io::Result<()> {
        let f = File::from(self.open(ino, generation, OFlag::O_RDONLY)?);
        if datasync {
            f.sync_data()?;
        } else {
            f.sync_all()?;
        }
        File::open(&self.dir)?.sync_all()
    }

    /// Statistics of the filesystem holding the content.
    pub fn statfs(&self) -> io::Result<StatFs> {
        let s = nix::sys::statvfs::statvfs(&self.dir).map_err(io::Error::from)?;
        Ok(StatFs {
            blocks: s.blocks(),
            bfree: s.blocks_free(),
            bavail: s.blocks_available(),
            files: s.files(),
            ffree: s.files_free(),
            bsize: s.block_size() as u32,
            namelen: ipc_schema::Name::MAX_LEN as u32,
            frsize: s.fragment_size() as u32,
        })
    }

    /// The inode number and generation of every content file (other names
    /// are left alone).
    pub fn list(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if let Some(id) = name.to_str().and_then(parse_name) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Write everything of the filesystem holding the state directory to
    /// disk (`syncfs`): the store's own files included, whatever sled has
    /// or has not synced itself.
    pub fn sync_filesystem(&self) -> io::Result<()> {
        // syncfs needs a descriptor that is not O_PATH.
        let dir = File::open(&self.dir)?;
        nix::unistd::syncfs(&dir).map_err(io::Error::from)
    }

    /// Make the names in the content directory durable (`fsync` of the
    /// directory): a content file created since the last call survives a
    /// power cut once this returns.
    pub fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

fn system_time(t: TimeSet) -> SystemTime {
    match t {
        TimeSet::Now => SystemTime::now(),
        TimeSet::At(ts) => {
            let nanos = Duration::from_nanos(u64::from(ts.nanos));
            if ts.secs >= 0 {
                UNIX_EPOCH + Duration::from_secs(ts.secs as u64) + nanos
            } else {
                UNIX_EPOCH - Duration::from_secs(ts.secs.unsigned_abs()) + nanos
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_open_truncate_times_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ContentDir::new(dir.path()).expect("content dir");
        c.create(0x2a).expect("create");
        assert!(c.path(0x2a).ends_with("000000000000002a"));
        let md = std::fs::metadata(c.path(0x2a)).expect("stat");
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert!(c.create(0x2a).is_err(), "create is exclusive");
        let cs = c.update(0x2a, 0, Some(5000), None, None).expect("truncate");
        assert_eq!(cs.size, 5000);
        assert_eq!(c.stat(0x2a, 0).expect("stat"), cs);
        let fd = c.open(0x2a, 0, OFlag::O_RDONLY).expect("open");
        let fl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).expect("getfl");
        assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
        let t = Timestamp {
            secs: 1_000_000,
            nanos: 5,
        };
        let cs = c
            .update(0x2a, 0, None, None, Some(TimeSet::At(t)))
            .expect("times");
        assert_eq!((cs.mtime, cs.size), (t, 5000));
        assert_eq!(c.stat(0x2a, 0).expect("stat").mtime, t);
        c.sync(0x2a, 0, true).expect("sync");
        c.remove(0x2a, 0).expect("remove");
        c.remove(0x2a, 0).expect("removing twice is fine");
    }

    #[test]
    fn create_open_keeps_the_new_file_open_with_the_access_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ContentDir::new(dir.path()).expect("content dir");
        for (ino, access) in [
            (7, OFlag::O_RDONLY),
            (8, OFlag::O_WRONLY),
            (9, OFlag::O_RDWR),
        ] {
            let fd = c.create_open(ino, access).expect("create_open");
            let fl = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).expect("getfl");
            assert_eq!(fl & libc::O_ACCMODE, access.bits());
            let cs = ContentStat::of(&fd).expect("fstat");
            assert_eq!(c.stat(ino, 0).expect("stat"), cs, "the same file");
            let md = std::fs::metadata(c.path(ino)).expect("stat");
            assert_eq!(md.permissions().mode() & 0o777, 0o600);
            assert_eq!(
                c.create_open(ino, access).expect_err("exclusive").kind(),
                io::ErrorKind::AlreadyExists
            );
        }
    }

    #[test]
    fn file_names_are_sixteen_hex_digits_and_a_generation() {
        for ino in [0, 1, 0x2a, 0xdead_beef, u64::MAX] {
            assert_eq!(&file_name(ino, 0)[..], format!("{ino:016x}").as_bytes());
            assert_eq!(parse_name(&format!("{ino:016x}")), Some((ino, 0)));
            for g in [1, 0xffff_ffff, u64::MAX] {
                let n = String::from_utf8(file_name(ino, g)).expect("ascii");
                assert_eq!(n, format!("{ino:016x}.{g:08x}"));
                assert_eq!(parse_name(&n), Some((ino, g)));
            }
        }
        for bad in [
            "x",
            "000000000000002",
            "000000000000002a.",
            "000000000000002a.1",
            "000000000000002a.00000000",
            "000000000000002A",
            "000000000000002a.0000000g",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn internal_reads_leave_atime_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ContentDir::new(dir.path()).expect("content dir");
        let fd = c.create_gen(3, 1, OFlag::O_WRONLY).expect("create");
        nix::unistd::write(&fd, b"abc").expect("write");
        let old = Timestamp {
            secs: 1_000_000_000,
            nanos: 0,
        };
        // atime older than mtime: a plain read would move it (relatime).
        c.update(3, 1, None, Some(TimeSet::At(old)), None)
            .expect("age atime");
        let mut buf = [0u8; 3];
        let f = File::from(c.open_internal(3, 1).expect("open"));
        std::io::Read::read_exact(&mut &f, &mut buf).expect("read");
        assert_eq!(&buf, b"abc");
        assert_eq!(c.stat(3, 1).expect("stat").atime, old);
    }

    #[test]
    fn generations_are_separate_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ContentDir::new(dir.path()).expect("content dir");
        c.create(5).expect("create");
        let fd = c
            .create_gen(5, 2, OFlag::O_WRONLY)
            .expect("create generation 2");
        nix::unistd::write(&fd, b"abc").expect("write");
        assert_eq!(c.stat(5, 2).expect("stat").size, 3);
        assert_eq!(c.stat(5, 0).expect("stat").size, 0);
        assert!(c.path_gen(5, 2).ends_with("0000000000000005.00000002"));
        let mut l = c.list().expect("list");
        l.sort_unstable();
        assert_eq!(l, vec![(5, 0), (5, 2)]);
        c.remove(5, 2).expect("remove");
        assert_eq!(c.list().expect("list"), vec![(5, 0)]);
    }

    #[test]
    fn list_names_only_content_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = ContentDir::new(dir.path()).expect("content dir");
        c.create(2).expect("create");
        c.create(0xabc).expect("create");
        std::fs::write(dir.path().join("content/other"), b"x").expect("write");
        let mut l = c.list().expect("list");
        l.sort_unstable();
        assert_eq!(l, vec![(2, 0), (0xabc, 0)]);
        c.sync_dir().expect("sync the directory");
    }
}
