//! [`KeibiFixture`]: one keibi instance (syncd as `nobody`, mountd as root,
//! a FUSE mount) in its own temporary directory.
//!
//! Layout of the directory (short, under `/tmp`, so socket paths stay far
//! below the 108-byte limit of `sun_path`):
//!
//! ```text
//! /tmp/kbXXXXXX/          0755 root
//!   state/                syncd's state directory (nobody), optionally a tmpfs
//!   run/fs.sock           syncd's filesystem socket (run/ is nobody's, 0755)
//!   run/control.sock      syncd's control socket
//!   mnt/                  the mountpoint
//!   locks/                mountd's lock directory
//!   scratch/              root's local-disk space for comparisons
//!   syncd.log mountd.log  the daemons' stdout and stderr (appended across restarts)
//! ```
//!
//! Start and stop are bounded polls. `Drop` always stops mountd (SIGTERM,
//! then SIGKILL and a lazy unmount), then syncd (SIGCONT first, in case a
//! test froze it), unmounts a tmpfs state directory, prints the tail of both
//! logs if the test is panicking, and removes the directory.

use crate::process::{signal, wait_child};
use crate::wait::{poll_until, try_poll_until};
use crate::{SYNCD_UID, binaries, mounts, watchdog};
use nix::sys::signal::Signal;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// How long a daemon may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How to start a fixture.
#[derive(Clone, Debug)]
pub struct Options {
    /// mountd's `--deadline` for calls to syncd.
    pub deadline: Duration,
    /// Whether mountd may use FUSE passthrough (`--no-passthrough` if not).
    pub passthrough: bool,
    /// Put syncd's state directory on a tmpfs of this many bytes.
    pub state_tmpfs_bytes: Option<u64>,
    /// Do not start a syncd; point mountd at this socket instead (a fake
    /// syncd served by the test).
    pub external_syncd_socket: Option<PathBuf>,
    /// Do not start syncd with the fixture (mountd comes up alone; start
    /// syncd later with [`KeibiFixture::start_syncd`]).
    pub defer_syncd: bool,
    /// `RUST_LOG` for syncd.
    pub syncd_log_filter: String,
    /// `RUST_LOG` for mountd. It must keep `keibi_mountd` at `info` or
    /// more: [`KeibiFixture::start_mountd`] waits for its "mounted" line.
    pub mountd_log_filter: String,
    /// Extra environment for syncd (test-only fault points).
    pub syncd_env: Vec<(String, String)>,
    /// mountd's `--fsync-deadline` (mountd's default when `None`).
    pub fsync_deadline: Option<Duration>,
    /// A configuration file for syncd: this text is written to
    /// `syncd.toml` in the fixture's directory and passed with `--config`,
    /// in place of the fixture's dial-only one.
    pub syncd_config: Option<String>,
    /// Extra arguments for syncd, after the fixture's own (a later
    /// `--config` replaces the fixture's dial-only one).
    pub syncd_args: Vec<String>,
    /// Extra arguments for mountd, after the fixture's own.
    pub mountd_args: Vec<String>,
    /// Run syncd inside this network namespace (`ip netns exec NAME`),
    /// see [`crate::pair`]. mountd stays in the root namespace: the Unix
    /// sockets are paths, which every network namespace reaches.
    pub syncd_netns: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        let filter = |var: &str| std::env::var(var).unwrap_or_else(|_| "info,tarpc=off".into());
        Options {
            deadline: Duration::from_secs(2),
            passthrough: true,
            state_tmpfs_bytes: None,
            external_syncd_socket: None,
            defer_syncd: false,
            syncd_log_filter: filter("KEIBI_TEST_SYNCD_LOG"),
            mountd_log_filter: filter("KEIBI_TEST_MOUNTD_LOG"),
            syncd_env: Vec::new(),
            fsync_deadline: None,
            syncd_config: None,
            syncd_args: Vec::new(),
            mountd_args: Vec::new(),
            syncd_netns: None,
        }
    }
}

/// A duration as mountd's `--deadline` parses it (`2s`, `500ms`).
pub fn duration_arg(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The last `lines` lines of a log file, framed with its name.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(cannot read: {e})"));
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    format!(
        "----- last {} lines of {} -----\n{}\n----- end of {} -----",
        all.len() - from,
        path.display(),
        all[from..].join("\n"),
        path.display()
    )
}

/// Make `path` a directory owned by `uid:gid` with `mode`.
pub fn make_dir(path: &Path, uid: u32, gid: u32, mode: u32) {
    if !path.exists() {
        std::fs::create_dir(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
    }
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Let the kernel kill `cmd`'s process when the spawning thread dies, so a
/// test binary killed from outside leaves no daemons behind.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours; the
    // closure runs in the forked child before exec (after any uid change,
    // which would otherwise clear the setting).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// How many times mountd's log at `path` says it mounted.
fn mounted_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("keibi_mountd: mounted"))
                .count()
        })
        .unwrap_or(0)
}

/// A file opened for appending a daemon's output to.
pub fn append_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

/// A `keibi-syncd` command running as `nobody` on these paths, its output
/// appended to `log`. Used by the fixture and by tests that start extra
/// instances.
///
/// The syncd is dial only: `--config` names a file beside the state
/// directory holding `listen = []`, because syncd binds its peer port
/// (58150) by default and tests run side by side. A later `--config` on
/// the command replaces it (syncd takes the last of a repeated flag).
pub fn syncd_command(state: &Path, fs_sock: &Path, control_sock: &Path, log: &Path) -> Command {
    let config = state
        .parent()
        .unwrap_or(Path::new("/"))
        .join("syncd-dial-only.toml");
    std::fs::write(&config, "listen = []\n")
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", config.display()));
    let mut cmd = Command::new(binaries::syncd());
    cmd.arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(state)
        .arg("--fs-socket")
        .arg(fs_sock)
        .arg("--control-socket")
        .arg(control_sock)
        .uid(SYNCD_UID)
        .gid(SYNCD_UID)
        .current_dir("/")
        .env(
            "RUST_LOG",
            std::env::var("KEIBI_TEST_SYNCD_LOG").unwrap_or_else(|_| "info,tarpc=off".into()),
        )
        .stdin(Stdio::null())
        .stdout(append_log(log))
        .stderr(append_log(log));
    // std drops supplementary groups itself when root sets a uid without
    // explicit groups.
    die_with_parent(&mut cmd);
    cmd
}

/// [`syncd_command`], but run inside the network namespace `netns`:
/// `ip netns exec NETNS setpriv --reuid nobody ... keibi-syncd ...`, started
/// as root. `ip netns exec` and `setpriv` both exec (no fork), so the
/// child's pid is syncd's own, for signals. The credential change clears
/// the parent-death signal, so `setpriv --pdeathsig SIGKILL` sets it again
/// for syncd itself.
pub fn syncd_command_in_netns(
    netns: &str,
    state: &Path,
    fs_sock: &Path,
    control_sock: &Path,
    log: &Path,
) -> Command {
    // Reuse syncd_command's arguments and environment, not its uid.
    let plain = syncd_command(state, fs_sock, control_sock, log);
    let mut cmd = Command::new("ip");
    cmd.arg("netns")
        .arg("exec")
        .arg(netns)
        .arg("setpriv")
        .arg(format!("--reuid={SYNCD_UID}"))
        .arg(format!("--regid={SYNCD_UID}"))
        .arg("--clear-groups")
        .arg("--pdeathsig=SIGKILL")
        .arg(plain.get_program())
        .args(plain.get_args())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(append_log(log))
        .stderr(append_log(log));
    for (k, v) in plain.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    die_with_parent(&mut cmd);
    cmd
}

/// A `keibi-mountd` command (root) for these paths, its output appended to
/// `log`.
pub fn mountd_command(
    mnt: &Path,
    syncd_socket: &Path,
    lock_dir: &Path,
    deadline: Duration,
    passthrough: bool,
    log: &Path,
) -> Command {
    let mut cmd = Command::new(binaries::mountd());
    cmd.arg(mnt)
        .arg("--syncd-socket")
        .arg(syncd_socket)
        .arg("--lock-dir")
        .arg(lock_dir)
        .arg("--deadline")
        .arg(duration_arg(deadline))
        .current_dir("/")
        .env(
            "RUST_LOG",
            std::env::var("KEIBI_TEST_MOUNTD_LOG").unwrap_or_else(|_| "info,tarpc=off".into()),
        )
        .stdin(Stdio::null())
        .stdout(append_log(log))
        .stderr(append_log(log));
    if !passthrough {
        cmd.arg("--no-passthrough");
    }
    die_with_parent(&mut cmd);
    cmd
}

/// Whether the control socket at `path` accepts a keibi handshake now.
pub fn control_answers(path: &Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    ipc_schema::handshake::client(&mut s, ipc_schema::handshake::ServiceKind::Control, None).is_ok()
}

/// Spawn `cmd`, registering the child for emergency cleanup.
pub fn spawn_registered(cmd: &mut Command, what: &str) -> Child {
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
    watchdog::register_pid(child.id());
    child
}

/// SIGTERM `child` (after SIGCONT), wait up to `timeout`, then SIGKILL.
/// Returns the exit status and whether it exited by itself.
pub fn terminate(child: &mut Child, timeout: Duration) -> (ExitStatus, bool) {
    let pid = child.id();
    if let Ok(Some(st)) = child.try_wait() {
        watchdog::unregister_pid(pid);
        return (st, true);
    }
    signal(pid, Signal::SIGCONT);
    signal(pid, Signal::SIGTERM);
    let r = match wait_child(child, timeout) {
        Some(st) => (st, true),
        None => {
            let _ = child.kill();
            let st = child.wait().expect("wait for a killed child");
            (st, false)
        }
    };
    watchdog::unregister_pid(pid);
    r
}

/// One keibi instance: syncd, mountd, a mount. See the module docs.
pub struct KeibiFixture {
    opts: Options,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    syncd: Option<Child>,
    mountd: Option<Child>,
    tmpfs: bool,
}

impl KeibiFixture {
    /// Start syncd and mountd with the default options and wait for the
    /// mount.
    pub fn start_default() -> KeibiFixture {
        KeibiFixture::start(Options::default())
    }

    /// Start syncd (unless the options name an external one) and mountd,
    /// and wait until the mount answers. Panics (after cleaning up) if
    /// anything fails: a missing `/dev/fuse` or a failed mount is a test
    /// failure, not a skip.
    pub fn start(opts: Options) -> KeibiFixture {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the end-to-end tests need FUSE (modprobe fuse, or run them in a \
             machine or container with /dev/fuse)"
        );
        assert!(
            nix::unistd::geteuid().is_root(),
            "the end-to-end tests must run as root (they mount, and start syncd as nobody)"
        );
        // Look the binaries up first: a missing one fails before any setup.
        binaries::syncd();
        binaries::mountd();
        let dir = tempfile::Builder::new()
            .prefix("kb")
            .tempdir_in("/tmp")
            .expect("create a temporary directory under /tmp");
        let root = dir.path().to_path_buf();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the fixture directory");
        let mut fx = KeibiFixture {
            opts,
            dir: Some(dir),
            root,
            syncd: None,
            mountd: None,
            tmpfs: false,
        };
        watchdog::register_log(fx.syncd_log_path());
        watchdog::register_log(fx.mountd_log_path());
        make_dir(&fx.state_dir(), SYNCD_UID, SYNCD_UID, 0o700);
        if let Some(bytes) = fx.opts.state_tmpfs_bytes {
            mounts::mount_tmpfs(&fx.state_dir(), bytes);
            watchdog::register_mount(fx.state_dir());
            fx.tmpfs = true;
            make_dir(&fx.state_dir(), SYNCD_UID, SYNCD_UID, 0o700);
        }
        make_dir(&fx.run_dir(), SYNCD_UID, SYNCD_UID, 0o755);
        make_dir(&fx.mnt(), 0, 0, 0o755);
        make_dir(&fx.lock_dir(), 0, 0, 0o755);
        make_dir(&fx.scratch(), 0, 0, 0o755);
        if fx.opts.external_syncd_socket.is_none() && !fx.opts.defer_syncd {
            fx.start_syncd();
        }
        fx.start_mountd();
        fx
    }

    /// The fixture's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The mountpoint.
    pub fn mnt(&self) -> PathBuf {
        self.root.join("mnt")
    }

    /// `rel` inside the mount.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt().join(rel)
    }

    /// syncd's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The directory of syncd's sockets.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// syncd's filesystem socket (or the external one).
    pub fn fs_socket(&self) -> PathBuf {
        match &self.opts.external_syncd_socket {
            Some(p) => p.clone(),
            None => self.run_dir().join("fs.sock"),
        }
    }

    /// syncd's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join("control.sock")
    }

    /// mountd's lock directory.
    pub fn lock_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    /// A root-owned directory on local disk for comparisons.
    pub fn scratch(&self) -> PathBuf {
        self.root.join("scratch")
    }

    /// syncd's log file.
    pub fn syncd_log_path(&self) -> PathBuf {
        self.root.join("syncd.log")
    }

    /// mountd's log file.
    pub fn mountd_log_path(&self) -> PathBuf {
        self.root.join("mountd.log")
    }

    /// syncd's log so far.
    pub fn syncd_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.syncd_log_path()).unwrap_or_default())
            .into_owned()
    }

    /// mountd's log so far.
    pub fn mountd_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.mountd_log_path()).unwrap_or_default())
            .into_owned()
    }

    /// The options the fixture was started with.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The options, to change before a restart (e.g. syncd's test hooks
    /// in `syncd_env`, used by the next [`Self::start_syncd`]).
    pub fn options_mut(&mut self) -> &mut Options {
        &mut self.opts
    }

    /// syncd's pid, while it runs.
    pub fn syncd_pid(&self) -> Option<u32> {
        self.syncd.as_ref().map(|c| c.id())
    }

    /// mountd's pid, while it runs.
    pub fn mountd_pid(&self) -> Option<u32> {
        self.mountd.as_ref().map(|c| c.id())
    }

    /// Start syncd and wait until its control socket accepts a handshake.
    pub fn start_syncd(&mut self) {
        assert!(self.syncd.is_none(), "syncd is already running");
        let mut cmd = match &self.opts.syncd_netns {
            Some(ns) => syncd_command_in_netns(
                ns,
                &self.state_dir(),
                &self.fs_socket(),
                &self.control_socket(),
                &self.syncd_log_path(),
            ),
            None => syncd_command(
                &self.state_dir(),
                &self.fs_socket(),
                &self.control_socket(),
                &self.syncd_log_path(),
            ),
        };
        if let Some(text) = &self.opts.syncd_config {
            let path = self.root.join("syncd.toml");
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
            cmd.arg("--config").arg(path);
        }
        cmd.args(&self.opts.syncd_args);
        cmd.env("RUST_LOG", &self.opts.syncd_log_filter);
        cmd.envs(self.opts.syncd_env.iter().map(|(k, v)| (k, v)));
        let child = spawn_registered(&mut cmd, "keibi-syncd");
        self.syncd = Some(child);
        let ctl = self.control_socket();
        let log = self.syncd_log_path();
        let child = self.syncd.as_mut().expect("just set");
        let exited = poll_until(
            "keibi-syncd's control socket to accept a handshake",
            START_TIMEOUT,
            || {
                if let Ok(Some(st)) = child.try_wait() {
                    return Some(Some(st));
                }
                control_answers(&ctl).then_some(None)
            },
        );
        if let Some(st) = exited {
            watchdog::unregister_pid(child.id());
            self.syncd = None;
            panic!(
                "keibi-syncd exited during start-up ({st})\n{}",
                log_tail(&log, 60)
            );
        }
    }

    /// Stop syncd (SIGCONT, SIGTERM, up to 10 s, then SIGKILL); returns its
    /// exit status and whether it exited by itself.
    pub fn stop_syncd(&mut self) -> (ExitStatus, bool) {
        let mut child = self.syncd.take().expect("syncd is not running");
        terminate(&mut child, Duration::from_secs(10))
    }

    /// Restart syncd gracefully (SIGTERM, then start and wait).
    pub fn restart_syncd(&mut self) {
        let (st, clean) = self.stop_syncd();
        assert!(
            clean && st.success(),
            "keibi-syncd did not exit cleanly on SIGTERM ({st}, exited by itself: {clean})\n{}",
            log_tail(&self.syncd_log_path(), 40)
        );
        self.start_syncd();
    }

    /// SIGKILL syncd and reap it (start it again with [`Self::start_syncd`]).
    pub fn kill9_syncd(&mut self) {
        let mut child = self.syncd.take().expect("syncd is not running");
        let _ = child.kill();
        let _ = child.wait();
        watchdog::unregister_pid(child.id());
    }

    /// SIGKILL mountd and reap it, leaving its mount behind dead
    /// ("Transport endpoint is not connected") for the next mountd to clear.
    pub fn kill9_mountd(&mut self) {
        let mut child = self.mountd.take().expect("mountd is not running");
        let _ = child.kill();
        let _ = child.wait();
        watchdog::unregister_pid(child.id());
    }

    /// Freeze syncd (SIGSTOP), and wait until every thread of it is
    /// stopped: SIGSTOP takes effect asynchronously (a thread waiting for
    /// a CPU stops only when it runs), and a request answered after this
    /// returned would make a test's "syncd is frozen" claim false.
    pub fn freeze_syncd(&self) {
        let pid = self.syncd_pid().expect("syncd is not running");
        signal(pid, Signal::SIGSTOP);
        wait_stopped(pid);
    }

    /// Thaw syncd (SIGCONT).
    pub fn thaw_syncd(&self) {
        signal(
            self.syncd_pid().expect("syncd is not running"),
            Signal::SIGCONT,
        );
    }

    /// Start mountd and wait until `/proc/self/mountinfo` shows a
    /// `fuse.keibi` mount at the mountpoint and (when a syncd is there to
    /// answer) `stat` and a listing of it work.
    pub fn start_mountd(&mut self) {
        assert!(self.mountd.is_none(), "mountd is already running");
        let mut cmd = mountd_command(
            &self.mnt(),
            &self.fs_socket(),
            &self.lock_dir(),
            self.opts.deadline,
            self.opts.passthrough,
            &self.mountd_log_path(),
        );
        cmd.env("RUST_LOG", &self.opts.mountd_log_filter);
        if let Some(d) = self.opts.fsync_deadline {
            cmd.arg("--fsync-deadline").arg(duration_arg(d));
        }
        cmd.args(&self.opts.mountd_args);
        // The new mountd says "mounted" in its log once its mount is on top;
        // until then a mount that answers may be an earlier one it has yet to
        // clear away (the crash loop once walked the bare directory between).
        let log = self.mountd_log_path();
        let mounted_before = mounted_lines(&log);
        let child = spawn_registered(&mut cmd, "keibi-mountd");
        watchdog::register_mount(self.mnt());
        self.mountd = Some(child);
        let mnt = self.mnt();
        // Without a syncd nothing can answer stat: only the mount table
        // says the mount is up.
        let served = self.syncd.is_some() || self.opts.external_syncd_socket.is_some();
        let child = self.mountd.as_mut().expect("just set");
        let exited = poll_until(
            "a fuse.keibi mount at the mountpoint that answers stat",
            START_TIMEOUT,
            || {
                if let Ok(Some(st)) = child.try_wait() {
                    return Some(Some(st));
                }
                // A directory listing always reaches the daemon, so a dead
                // mount whose root attributes the kernel still caches does
                // not pass for a live one.
                (mounted_lines(&log) > mounted_before
                    && mounts::keibi_mounts_at(&mnt) > 0
                    && (!served
                        || (std::fs::metadata(&mnt).is_ok() && std::fs::read_dir(&mnt).is_ok())))
                .then_some(None)
            },
        );
        if let Some(st) = exited {
            watchdog::unregister_pid(child.id());
            self.mountd = None;
            panic!(
                "keibi-mountd exited before the mount was up ({st})\n{}",
                log_tail(&log, 60)
            );
        }
    }

    /// Stop mountd: SIGTERM, up to 5 s, then SIGKILL and a lazy unmount.
    /// Returns its exit status, whether it exited by itself, and whether
    /// the mount was gone when it had.
    pub fn stop_mountd(&mut self) -> (ExitStatus, bool, bool) {
        let mut child = self.mountd.take().expect("mountd is not running");
        let (st, clean) = terminate(&mut child, STOP_TIMEOUT);
        let unmounted = mounts::keibi_mounts_at(&self.mnt()) == 0;
        mounts::detach_all(&self.mnt());
        watchdog::unregister_mount(&self.mnt());
        (st, clean, unmounted)
    }

    /// Restart mountd gracefully and wait for the new mount.
    pub fn restart_mountd(&mut self) {
        let (st, clean, unmounted) = self.stop_mountd();
        assert!(
            clean && st.success() && unmounted,
            "keibi-mountd did not exit cleanly on SIGTERM ({st}, exited by itself: {clean}, \
             unmounted: {unmounted})\n{}",
            log_tail(&self.mountd_log_path(), 40)
        );
        self.start_mountd();
    }

    /// Restart both daemons: mountd down, syncd restarted, mountd up.
    pub fn restart_both(&mut self) {
        let (st, clean, unmounted) = self.stop_mountd();
        assert!(
            clean && st.success() && unmounted,
            "keibi-mountd did not exit cleanly on SIGTERM ({st}, exited by itself: {clean}, \
             unmounted: {unmounted})\n{}",
            log_tail(&self.mountd_log_path(), 40)
        );
        self.restart_syncd();
        self.start_mountd();
    }

    /// Poll until a new file can be created on the mount (after a syncd
    /// restart, mountd reconnects by itself).
    pub fn wait_writable(&self, timeout: Duration) {
        let probe = self.path(".keibi-test-writable");
        poll_until("the mount to accept a new file", timeout, || {
            let ok = std::fs::write(&probe, b"x").is_ok();
            if ok {
                let _ = std::fs::remove_file(&probe);
            }
            ok.then_some(())
        });
    }
}

impl Drop for KeibiFixture {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if let Some(mut m) = self.mountd.take() {
            terminate(&mut m, STOP_TIMEOUT);
        }
        mounts::detach_all(&self.mnt());
        watchdog::unregister_mount(&self.mnt());
        if let Some(mut s) = self.syncd.take() {
            terminate(&mut s, Duration::from_secs(10));
        }
        if self.tmpfs {
            let state = self.state_dir();
            let _ = try_poll_until(Duration::from_secs(5), || {
                nix::mount::umount2(&state, nix::mount::MntFlags::empty())
                    .ok()
                    .or_else(|| (!mounts::is_mountpoint(&state)).then_some(()))
            });
            mounts::detach_all(&state);
            watchdog::unregister_mount(&state);
        }
        if panicking {
            eprintln!("{}", log_tail(&self.syncd_log_path(), 60));
            eprintln!("{}", log_tail(&self.mountd_log_path(), 60));
        }
        watchdog::unregister_log(&self.syncd_log_path());
        watchdog::unregister_log(&self.mountd_log_path());
        if std::env::var_os("KEIBI_TEST_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        } else if !mounts::is_mountpoint(&self.mnt()) {
            // Dropping the TempDir removes it; never walk into a mount.
            self.dir.take();
        } else if let Some(d) = self.dir.take() {
            eprintln!(
                "leaving {}: something is still mounted at its mountpoint",
                d.keep().display()
            );
        }
    }
}

/// Wait until every thread of `pid` is stopped (state `T` or `t` in
/// `/proc/PID/task/*/stat`).
pub fn wait_stopped(pid: u32) {
    crate::wait::poll_until(
        "every thread of the process to stop",
        Duration::from_secs(10),
        || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
            let all = tasks.filter_map(Result::ok).all(|t| {
                std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                    // "pid (comm) S ...": the state follows the last ')'.
                    s.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
                })
            });
            all.then_some(())
        },
    );
}
