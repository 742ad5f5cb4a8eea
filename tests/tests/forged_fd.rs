//! A forged descriptor from a compromised syncd is refused.
//!
//! The test serves a fake syncd itself (the real handshake, then tarpc's
//! `Filesystem` service) to a real keibi-mountd. Its listening socket is
//! made while the serving thread's effective uid is `nobody`, so mountd's
//! `SO_PEERCRED` sees syncd's usual uid. Its `open` sends descriptors a
//! real syncd could not (or should not) hand over:
//!
//! - `opath`: an `O_PATH` descriptor of a root-owned 0600 file;
//! - `ro_lie`: a read-only descriptor of a root-owned file, announced with
//!   syncd's uid;
//! - `ro_truth`: the same, announced with its true owner (root);
//! - `victim`: a read-only descriptor of a root-owned 0644 file, opened for
//!   writing (with passthrough the kernel would reopen it read-write with
//!   mountd's root credentials).
//!
//! Every such open must fail, and the secret bytes must never show. A
//! legitimate file (owned by `nobody`, announced truthfully) is the
//! positive control: it must read, so the fake is known to work.

use futures::StreamExt;
use harness::{Options, setup};
use ipc_schema::fdpass::FdSender;
use ipc_schema::handshake::{self, ServiceKind};
use ipc_schema::service::Filesystem;
use ipc_schema::*;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};

const SECRET: &[u8] = b"TOP-SECRET-BYTES-never-to-be-shown";
const LEGIT: &[u8] = b"legitimate content";

#[derive(Clone)]
struct FakeFile {
    name: &'static str,
    ino: u64,
    backing: PathBuf,
    /// Flags of the fake syncd's own open of the backing file.
    open_flags: i32,
    /// The owner announced in `ContentId`.
    announced_uid: u32,
}

#[derive(Clone)]
struct FakeSyncd {
    files: Arc<Vec<FakeFile>>,
    sender: Arc<FdSender>,
    next: Arc<AtomicU64>,
}

fn ts() -> Timestamp {
    Timestamp::now()
}

fn dir_attr() -> Attr {
    Attr {
        ino: Ino::ROOT,
        kind: FileKind::Directory,
        size: 0,
        blocks: 0,
        atime: ts(),
        mtime: ts(),
        ctime: ts(),
        crtime: ts(),
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        blksize: 4096,
        rdev: 0,
        has_xattrs: false,
    }
}

fn file_attr(f: &FakeFile) -> Attr {
    let size = fs::metadata(&f.backing).map(|m| m.len()).unwrap_or(0);
    Attr {
        ino: Ino(f.ino),
        kind: FileKind::File,
        size,
        blocks: size.div_ceil(512),
        atime: ts(),
        mtime: ts(),
        ctime: ts(),
        crtime: ts(),
        perm: 0o666,
        nlink: 1,
        uid: 0,
        gid: 0,
        blksize: 4096,
        rdev: 0,
        has_xattrs: false,
    }
}

fn rofs<T>() -> Result<T, FsError> {
    Err(fs_err!(EROFS, "the fake syncd is read-only"))
}

impl FakeSyncd {
    fn file(&self, ino: Ino) -> Result<&FakeFile, FsError> {
        self.files
            .iter()
            .find(|f| f.ino == ino.0)
            .ok_or_else(|| fs_err!(ENOENT, "no {ino}"))
    }

    fn attr(&self, ino: Ino) -> Result<Attr, FsError> {
        if ino == Ino::ROOT {
            Ok(dir_attr())
        } else {
            self.file(ino).map(file_attr)
        }
    }
}

impl Filesystem for FakeSyncd {
    async fn register_mount(
        self,
        _: Context,
        _info: MountInfo,
        _held: Vec<HeldHandle>,
        _referenced: Vec<Ino>,
    ) -> Result<(), FsError> {
        Ok(())
    }
    async fn lookup(self, _: Context, parent: Ino, name: Name) -> Result<Attr, FsError> {
        if parent != Ino::ROOT {
            return Err(fs_err!(ENOENT, "not a directory we have"));
        }
        self.files
            .iter()
            .find(|f| f.name.as_bytes() == name.as_bytes())
            .map(file_attr)
            .ok_or_else(|| fs_err!(ENOENT, "no entry {name:?}"))
    }
    async fn getattr(self, _: Context, ino: Ino) -> Result<Attr, FsError> {
        self.attr(ino)
    }
    async fn setattr(self, _: Context, _ino: Ino, _c: SetAttr) -> Result<Attr, FsError> {
        rofs()
    }
    async fn readdir(
        self,
        _: Context,
        dir: Ino,
        after: DirCookie,
        limit: u32,
        plus: bool,
    ) -> Result<Vec<DirEntry>, FsError> {
        if dir != Ino::ROOT {
            return Err(fs_err!(ENOTDIR, "{dir} is not a directory"));
        }
        let mut all = vec![
            (
                1u64,
                Name::from("."),
                Ino::ROOT,
                FileKind::Directory,
                dir_attr(),
            ),
            (
                2,
                Name::from(".."),
                Ino::ROOT,
                FileKind::Directory,
                dir_attr(),
            ),
        ];
        for (i, f) in self.files.iter().enumerate() {
            all.push((
                3 + i as u64,
                Name::from(f.name),
                Ino(f.ino),
                FileKind::File,
                file_attr(f),
            ));
        }
        Ok(all
            .into_iter()
            .filter(|e| e.0 > after.0)
            .take(limit as usize)
            .map(|(c, name, ino, kind, attr)| DirEntry {
                cookie: DirCookie(c),
                name,
                ino,
                kind,
                attr: plus.then_some(attr),
            })
            .collect())
    }
    async fn mkdir(
        self,
        _: Context,
        _p: Ino,
        _n: Name,
        _m: u16,
        _c: Caller,
    ) -> Result<Made, FsError> {
        rofs()
    }
    async fn mknod(
        self,
        _: Context,
        _p: Ino,
        _n: Name,
        _k: FileKind,
        _m: u16,
        _r: u32,
        _c: Caller,
    ) -> Result<Made, FsError> {
        rofs()
    }
    async fn symlink(
        self,
        _: Context,
        _p: Ino,
        _n: Name,
        _t: Vec<u8>,
        _c: Caller,
    ) -> Result<Made, FsError> {
        rofs()
    }
    async fn readlink(self, _: Context, _ino: Ino) -> Result<Vec<u8>, FsError> {
        Err(fs_err!(EINVAL, "not a symlink"))
    }
    async fn link(self, _: Context, _i: Ino, _p: Ino, _n: Name) -> Result<Made, FsError> {
        rofs()
    }
    async fn unlink(self, _: Context, _p: Ino, _n: Name) -> Result<DirsAfter, FsError> {
        rofs()
    }
    async fn rmdir(self, _: Context, _p: Ino, _n: Name) -> Result<DirsAfter, FsError> {
        rofs()
    }
    async fn rename(
        self,
        _: Context,
        _p: Ino,
        _n: Name,
        _np: Ino,
        _nn: Name,
        _f: RenameFlags,
    ) -> Result<DirsAfter, FsError> {
        rofs()
    }
    async fn create(
        self,
        _: Context,
        _p: Ino,
        _n: Name,
        _m: u16,
        _f: i32,
        _c: Caller,
    ) -> Result<Opened, FsError> {
        rofs()
    }
    async fn open(self, _: Context, ino: Ino, _flags: i32) -> Result<Opened, FsError> {
        let f = self.file(ino)?.clone();
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(f.open_flags | libc::O_CLOEXEC)
            .open(&f.backing)
            .map_err(|e| FsError::io("fake open", &e))?;
        let st = file.metadata().map_err(|e| FsError::io("fake fstat", &e))?;
        let handle = HandleId(self.next.fetch_add(1, Ordering::SeqCst));
        let sender = self.sender.clone();
        let file =
            tokio::task::spawn_blocking(move || sender.send(handle, file.as_fd()).map(|_| file))
                .await
                .map_err(|e| fs_err!(EIO, "join: {e}"))?
                .map_err(|e| FsError::io("send fd", &e))?;
        drop(file);
        Ok(Opened {
            handle,
            attr: file_attr(&f),
            content: ContentId {
                dev: st.dev(),
                ino: st.ino(),
                uid: f.announced_uid,
            },
            partial: None,
            parent: None,
        })
    }
    async fn release(self, _: Context, _h: HandleId) -> Result<(), FsError> {
        Ok(())
    }
    async fn fetch_range(
        self,
        _: Context,
        _h: HandleId,
        _offset: u64,
        _len: u64,
    ) -> Result<Vec<u64>, FsError> {
        Err(fs_err!(ENOSYS, "not served by this fake"))
    }
    async fn changes(
        self,
        _: Context,
        _epoch: u64,
        _after: u64,
        _wait_ms: u32,
    ) -> Result<ChangeBatch, FsError> {
        Err(fs_err!(ENOSYS, "not served by this fake"))
    }
    async fn forget(self, _: Context, _inos: Vec<Ino>) -> Result<(), FsError> {
        Ok(())
    }
    async fn fsync(self, _: Context, _i: Ino, _d: bool) -> Result<(), FsError> {
        Ok(())
    }
    async fn statfs(self, _: Context) -> Result<StatFs, FsError> {
        Ok(StatFs {
            blocks: 1000,
            bfree: 500,
            bavail: 500,
            files: 100,
            ffree: 50,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        })
    }
    async fn setxattr(
        self,
        _: Context,
        _i: Ino,
        _n: Name,
        _v: Vec<u8>,
        _m: XattrSet,
    ) -> Result<(), FsError> {
        rofs()
    }
    async fn getxattr(self, _: Context, _i: Ino, name: Name) -> Result<Vec<u8>, FsError> {
        Err(fs_err!(ENODATA, "no xattr {name:?}"))
    }
    async fn listxattr(self, _: Context, _i: Ino) -> Result<Vec<Name>, FsError> {
        Ok(Vec::new())
    }
    async fn removexattr(self, _: Context, _i: Ino, name: Name) -> Result<(), FsError> {
        Err(fs_err!(ENODATA, "no xattr {name:?}"))
    }
}

/// Bind and listen on `path` with this thread's effective uid set to
/// `uid`, so `SO_PEERCRED` of connections reports `uid`; the change is
/// undone before returning (it is per thread: a raw `setresuid` syscall,
/// not libc's process-wide wrapper).
fn listen_as(uid: u32, path: &Path) -> std::os::unix::net::UnixListener {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: raw setresuid on this thread only; -1 keeps real and
        // saved uids (root), so the change can be undone below.
        let r = unsafe { libc::syscall(libc::SYS_setresuid, -1i64, uid as i64, -1i64) };
        assert_eq!(r, 0, "setresuid: {}", std::io::Error::last_os_error());
        let l = std::os::unix::net::UnixListener::bind(&path);
        // SAFETY: as above; the saved uid 0 allows returning to euid 0.
        let back = unsafe { libc::syscall(libc::SYS_setresuid, -1i64, 0i64, -1i64) };
        assert_eq!(
            back,
            0,
            "setresuid back: {}",
            std::io::Error::last_os_error()
        );
        l.unwrap_or_else(|e| panic!("bind {}: {e}", path.display()))
    })
    .join()
    .expect("listener thread")
}

async fn serve(listener: tokio::net::UnixListener, files: Arc<Vec<FakeFile>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let files = files.clone();
        tokio::spawn(async move {
            let Ok(mut std_stream) = stream.into_std() else {
                return;
            };
            let hello = tokio::task::spawn_blocking(move || {
                std_stream.set_nonblocking(false)?;
                let hello = handshake::read_hello(&mut std_stream)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                handshake::accept(&mut std_stream)?;
                std_stream.set_nonblocking(true)?;
                Ok::<_, std::io::Error>((hello, std_stream))
            })
            .await;
            let Ok(Ok((hello, std_stream))) = hello else {
                return;
            };
            if hello.service != ServiceKind::Filesystem as u8 {
                return;
            }
            let Some(fd) = hello.fd else { return };
            let Ok(sender) = FdSender::new(fd, Duration::from_secs(5)) else {
                return;
            };
            let Ok(stream) = tokio::net::UnixStream::from_std(std_stream) else {
                return;
            };
            let fake = FakeSyncd {
                files,
                sender: Arc::new(sender),
                next: Arc::new(AtomicU64::new(1)),
            };
            BaseChannel::with_defaults(transport::framed(stream))
                .execute(fake.serve())
                .for_each(|f| async {
                    tokio::spawn(f);
                })
                .await;
        });
    }
}

fn write_file(path: &Path, bytes: &[u8], uid: u32, mode: u32) {
    fs::write(path, bytes).expect("write");
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).expect("chown");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn forged_descriptors_are_refused(passthrough: bool) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let fake_dir = tempfile::Builder::new()
        .prefix("kbf")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let root = fake_dir.path();
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).expect("chmod");
    let sock_dir = root.join("sock");
    harness::daemons::make_dir(&sock_dir, harness::SYNCD_UID, harness::SYNCD_UID, 0o755);
    let secret = root.join("secret");
    write_file(&secret, SECRET, 0, 0o600);
    let victim = root.join("victim");
    write_file(&victim, SECRET, 0, 0o644);
    let legit = root.join("legit");
    write_file(&legit, LEGIT, harness::SYNCD_UID, 0o600);
    let nobody = harness::SYNCD_UID;
    let files = Arc::new(vec![
        FakeFile {
            name: "legit",
            ino: 2,
            backing: legit,
            open_flags: libc::O_RDONLY,
            announced_uid: nobody,
        },
        FakeFile {
            name: "opath",
            ino: 3,
            backing: secret.clone(),
            open_flags: libc::O_PATH,
            announced_uid: nobody,
        },
        FakeFile {
            name: "ro_lie",
            ino: 4,
            backing: secret.clone(),
            open_flags: libc::O_RDONLY,
            announced_uid: nobody,
        },
        FakeFile {
            name: "ro_truth",
            ino: 5,
            backing: secret.clone(),
            open_flags: libc::O_RDONLY,
            announced_uid: 0,
        },
        FakeFile {
            name: "victim",
            ino: 6,
            backing: victim.clone(),
            open_flags: libc::O_RDONLY,
            announced_uid: 0,
        },
    ]);
    let sock = sock_dir.join("fs.sock");
    let listener = listen_as(nobody, &sock);
    listener.set_nonblocking(true).expect("nonblocking");
    {
        let _guard = rt.enter();
        let listener = tokio::net::UnixListener::from_std(listener).expect("tokio listener");
        rt.spawn(serve(listener, files));
    }

    let (_w, fx) = setup(
        if passthrough {
            "forged fd passthrough"
        } else {
            "forged fd plain"
        },
        Duration::from_secs(120),
        Options {
            external_syncd_socket: Some(sock),
            passthrough,
            ..Options::default()
        },
    );
    // Positive control: the fake works, and a proper descriptor is used.
    assert_eq!(
        fs::read(fx.path("legit")).expect("the legitimate file reads through the fake syncd"),
        LEGIT
    );
    for name in ["opath", "ro_lie", "ro_truth", "victim"] {
        let out = harness::run_bounded(
            Command::new("cat").arg(fx.path(name)),
            Duration::from_secs(20),
        );
        assert!(
            !out.status.success(),
            "cat of {name} (a forged descriptor) must fail"
        );
        assert!(
            !out.stdout.windows(SECRET.len()).any(|w| w == SECRET),
            "cat of {name} showed the secret bytes"
        );
        match fs::read(fx.path(name)) {
            Ok(bytes) => panic!(
                "{name}: a forged descriptor was used, read {} bytes",
                bytes.len()
            ),
            Err(e) => assert_eq!(
                e.raw_os_error(),
                Some(libc::EIO),
                "{name}: refused with EIO"
            ),
        }
    }
    // The write attack: a read-only descriptor of a root-owned file opened
    // for writing.
    let r = fs::OpenOptions::new().append(true).open(fx.path("victim"));
    assert!(
        r.is_err(),
        "opening victim for writing with a read-only descriptor must fail"
    );
    let r = fs::OpenOptions::new().write(true).open(fx.path("legit"));
    assert!(
        r.is_err(),
        "a read-only descriptor cannot serve an open for writing"
    );
    assert_eq!(
        fs::read(&victim).expect("read victim"),
        SECRET,
        "victim unchanged"
    );
    // The legitimate open went the way the options say; the forged ones
    // were refused before they counted as opens.
    fx.assert_io_path();
    drop(fx);
    drop(rt);
}

#[test]
fn forged_descriptors_are_refused_passthrough() {
    forged_descriptors_are_refused(true);
}

#[test]
fn forged_descriptors_are_refused_plain() {
    forged_descriptors_are_refused(false);
}
