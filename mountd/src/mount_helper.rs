//! `mount.fuse.keibi`: keibi-mountd as mount(8)'s helper for the type
//! `fuse.keibi`, so that `mount -t fuse.keibi keibi /mnt/keibi` and an
//! fstab line work.
//!
//! The package installs `/usr/sbin/mount.fuse.keibi` as a symlink to
//! keibi-mountd; run under that name (or `mount.keibi`), the binary parses
//! mount(8)'s helper command line (`SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]
//! [-t TYPE]`) instead of its own, and:
//!
//! 1. checks every option before anything happens (an unknown or
//!    unsupported option is an error naming it, exit 1, and nothing is
//!    mounted or started; `-s` ignores unknown ones);
//! 2. checks that keibi-syncd answers on its filesystem socket (the
//!    preamble handshake mountd itself does, so a wrong uid or protocol
//!    is named too), retrying for `syncd_wait` (default 5 s) to ride out
//!    a syncd that is still starting; otherwise exit 32 with what to do;
//! 3. refuses (exit 32) when a live keibi mount is already there;
//! 4. starts keibi-mountd for the mountpoint in a session of its own,
//!    with the options as its flags, its output going to
//!    `<lock dir>/<anchor>/mountd.log` (rewritten at each mount);
//! 5. waits until `/proc/self/mountinfo` shows the `fuse.keibi` mount
//!    (exit 0), or until mountd exits (exit 32, with mountd's log), or
//!    for `mount_timeout` (default 10 s), after which it stops mountd
//!    (SIGTERM, then SIGKILL) and clears any mount it left: no half mount.
//!
//! `umount MOUNTPOINT` needs no helper: mountd exits by itself (status 0)
//! when its mount goes away. Exit statuses follow mount(8): 0 mounted, 1
//! bad invocation or not root, 32 mount failure.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// mount(8)'s status for a bad invocation (options, permissions).
const EXIT_USAGE: u8 = 1;
/// mount(8)'s status for a failed mount.
const EXIT_MOUNT_FAILED: u8 = 32;

/// How long the helper waits for the mount by default.
const DEFAULT_MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it waits for keibi-syncd's socket by default.
const DEFAULT_SYNCD_WAIT: Duration = Duration::from_secs(5);
/// How often it looks at the mount table and mountd.
const POLL: Duration = Duration::from_millis(20);
/// How long a stopped mountd gets to exit before SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(3);
/// The log file of a helper-started mountd, in its anchor directory.
pub const LOG_FILE: &str = "mountd.log";

/// The names the binary answers to as a mount helper.
const HELPER_NAMES: [&str; 2] = ["mount.fuse.keibi", "mount.keibi"];

/// Whether the binary was started as a mount helper (by its name).
pub fn invoked_as_helper() -> bool {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| HELPER_NAMES.iter().any(|h| n == *h))
        })
        .unwrap_or(false)
}

/// Run as the mount helper; the exit code follows mount(8).
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("mount.fuse.keibi: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn usage(message: impl Into<String>) -> Failure {
    (EXIT_USAGE, message.into())
}

fn failed(message: impl Into<String>) -> Failure {
    (EXIT_MOUNT_FAILED, message.into())
}

/// What mount(8) asked for.
#[derive(Debug, PartialEq)]
struct Request {
    mountpoint: PathBuf,
    /// `-f`: check everything, mount nothing.
    fake: bool,
    /// `-v`: say what is started.
    verbose: bool,
    options: MountOptions,
}

/// The `-o` options, checked.
#[derive(Debug, PartialEq)]
struct MountOptions {
    /// keibi-mountd's flags, in order.
    mountd_args: Vec<OsString>,
    syncd_socket: Option<PathBuf>,
    syncd_config: Option<PathBuf>,
    lock_dir: PathBuf,
    mount_timeout: Duration,
    syncd_wait: Duration,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            mountd_args: Vec::new(),
            syncd_socket: None,
            syncd_config: None,
            lock_dir: PathBuf::from(ipc_schema::paths::DEFAULT_LOCK_DIR),
            mount_timeout: DEFAULT_MOUNT_TIMEOUT,
            syncd_wait: DEFAULT_SYNCD_WAIT,
        }
    }
}

/// Options mount(8) or fstab may pass that change nothing here.
const IGNORED: [&str; 11] = [
    "rw", "defaults", "auto", "noauto", "nouser", "_netdev", "nofail", "nosuid", "nodev", "exec",
    "relatime",
];

/// Options that would change the mount in a way keibi does not support.
const UNSUPPORTED: [(&str, &str); 8] = [
    ("ro", "read-only mounts are not supported"),
    ("noexec", "noexec is not supported"),
    (
        "noatime",
        "keibi keeps atime as relatime does; noatime is not supported",
    ),
    (
        "strictatime",
        "keibi keeps atime as relatime does; strictatime is not supported",
    ),
    ("sync", "synchronous mounts are not supported (use fsync)"),
    (
        "dirsync",
        "synchronous mounts are not supported (use fsync)",
    ),
    ("suid", "keibi mounts are always nosuid"),
    ("dev", "keibi mounts are always nodev"),
];

/// The helper's command line as mount(8) passes it; also the source of
/// its man page (`keibi-mountd --generate-docs`).
pub fn command() -> clap::Command {
    use clap::{Arg, ArgAction, Command};
    let flag = |name: &'static str, short: char, help: &'static str| {
        Arg::new(name)
            .short(short)
            .action(ArgAction::SetTrue)
            .help(help)
    };
    Command::new("mount.fuse.keibi")
        .about("mount(8) helper for keibi: mount -t fuse.keibi keibi MOUNTPOINT")
        .long_about(
            "mount(8) runs this helper for the filesystem type fuse.keibi. It checks the \
             options, checks that keibi-syncd answers, starts keibi-mountd for MOUNTPOINT and \
             returns once the mount is up; on any failure nothing is left mounted or running. \
             umount MOUNTPOINT stops that keibi-mountd.",
        )
        .version(env!("CARGO_PKG_VERSION"))
        .arg(
            Arg::new("source")
                .required(true)
                .value_name("SOURCE")
                .help("Ignored; write keibi"),
        )
        .arg(
            Arg::new("mountpoint")
                .required(true)
                .value_name("MOUNTPOINT")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Where to mount the share"),
        )
        .arg(
            Arg::new("options")
                .short('o')
                .value_name("OPTIONS")
                .action(ArgAction::Append)
                .help(
                    "Comma-separated: deadline=, read_deadline=, fsync_deadline=, attr_ttl= \
                     (durations: keibi-mountd's flags of the same name), threads=N, attr_cache=N, \
                     no_passthrough, syncd_socket=PATH, syncd_config=FILE, lock_dir=DIR, \
                     metrics_socket=PATH, metrics_listen=ADDR, syncd_wait=DURATION (default 5s), mount_timeout=DURATION (default 10s); \
                     rw, defaults, auto, noauto, nouser, _netdev, nofail, nosuid, nodev, exec, \
                     relatime, x-* and comment= are accepted and change nothing; ro, noexec, \
                     noatime, strictatime, sync, dirsync, suid and dev are refused",
                ),
        )
        .arg(flag("sloppy", 's', "Ignore unknown options"))
        .arg(flag("fake", 'f', "Check everything, mount nothing"))
        .arg(flag("verbose", 'v', "Show the keibi-mountd command"))
        .arg(flag("no_mtab", 'n', "Accepted (there is no mtab to write)"))
        .arg(
            Arg::new("type")
                .short('t')
                .value_name("TYPE")
                .help("Accepted (fuse.keibi)"),
        )
        .after_help(
            "Exit status: 0 mounted; 1 a bad option or not root (nothing started); 32 the mount \
             failed (keibi-syncd not answering, a keibi mount already there, keibi-mountd \
             exited or timed out; nothing left mounted or running).",
        )
}

fn parse_args(args: &[OsString]) -> Result<Request, Failure> {
    let matches = match command().no_binary_name(true).try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version: print, exit 0
        Err(e) => return Err(usage(e.render().to_string().trim_end().to_string())),
    };
    let mut req = Request {
        mountpoint: matches
            .get_one::<PathBuf>("mountpoint")
            .cloned()
            .unwrap_or_default(),
        fake: matches.get_flag("fake"),
        verbose: matches.get_flag("verbose"),
        options: MountOptions::default(),
    };
    let sloppy = matches.get_flag("sloppy");
    for text in matches.get_many::<String>("options").into_iter().flatten() {
        parse_options(text, sloppy, &mut req.options)?;
    }
    Ok(req)
}

fn duration(key: &str, value: &str) -> Result<Duration, Failure> {
    humantime::parse_duration(value).map_err(|e| {
        usage(format!(
            "option {key}={value}: not a duration ({e}); write e.g. 2s or 500ms"
        ))
    })
}

fn parse_options(text: &str, sloppy: bool, out: &mut MountOptions) -> Result<(), Failure> {
    for item in text.split(',').filter(|s| !s.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let need = |v: Option<&str>| -> Result<String, Failure> {
            match v {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(usage(format!("option {key} needs a value ({key}=...)"))),
            }
        };
        match key {
            "deadline" | "read_deadline" | "fsync_deadline" | "attr_ttl" => {
                let v = need(value)?;
                duration(key, &v)?;
                out.mountd_args
                    .push(format!("--{}", key.replace('_', "-")).into());
                out.mountd_args.push(v.into());
            }
            "threads" => {
                let v = need(value)?;
                match v.parse::<u16>() {
                    Ok(n) if (1..=64).contains(&n) => {}
                    _ => {
                        return Err(usage(format!(
                            "option threads={v}: write a number from 1 to 64"
                        )));
                    }
                }
                out.mountd_args.push("--threads".into());
                out.mountd_args.push(v.into());
            }
            "attr_cache" => {
                let v = need(value)?;
                if v.parse::<usize>().is_err() {
                    return Err(usage(format!("option attr_cache={v}: write a number")));
                }
                out.mountd_args.push("--attr-cache".into());
                out.mountd_args.push(v.into());
            }
            "no_passthrough" if value.is_none() => out.mountd_args.push("--no-passthrough".into()),
            "metrics_socket" => {
                let v = need(value)?;
                out.mountd_args.push("--metrics-socket".into());
                out.mountd_args.push(v.into());
            }
            "metrics_listen" => {
                let v = need(value)?;
                ipc_schema::metrics_endpoint::parse_listen(&v)
                    .map_err(|e| usage(format!("option metrics_listen={v}: {e}")))?;
                out.mountd_args.push("--metrics-listen".into());
                out.mountd_args.push(v.into());
            }
            "syncd_socket" => out.syncd_socket = Some(PathBuf::from(need(value)?)),
            "syncd_config" => out.syncd_config = Some(PathBuf::from(need(value)?)),
            "lock_dir" => out.lock_dir = PathBuf::from(need(value)?),
            "mount_timeout" => out.mount_timeout = duration(key, &need(value)?)?,
            "syncd_wait" => out.syncd_wait = duration(key, &need(value)?)?,
            k if value.is_none() && IGNORED.contains(&k) => {}
            k if k.starts_with("x-") || k == "comment" => {}
            k => {
                if let Some((_, why)) = UNSUPPORTED.iter().find(|(u, _)| *u == k) {
                    return Err(usage(format!("option {k}: {why}")));
                }
                if !sloppy {
                    return Err(usage(format!(
                        "unknown option {item:?} (known: deadline=, read_deadline=, fsync_deadline=, \
                         attr_ttl=, threads=, attr_cache=, no_passthrough, syncd_socket=, syncd_config=, \
                         lock_dir=, metrics_socket=, metrics_listen=, mount_timeout=, syncd_wait=)"
                    )));
                }
            }
        }
    }
    Ok(())
}

fn run(args: &[OsString]) -> Result<(), Failure> {
    let req = parse_args(args)?;
    if !nix::unistd::geteuid().is_root() {
        return Err(usage(
            "must run as root (keibi-mountd mounts for every local user)",
        ));
    }
    let opts = &req.options;
    let mountpoint = crate::mount::absolute_mountpoint(&req.mountpoint)
        .map_err(|e| failed(format!("mountpoint {}: {e}", req.mountpoint.display())))?;
    let (socket, _) = crate::syncd_config::resolve(
        opts.syncd_socket.as_deref(),
        opts.syncd_config.as_deref(),
        Path::new(crate::syncd_config::DEFAULT_SYNCD_CONFIG),
    )
    .map_err(usage)?;
    check_syncd(&socket, opts.syncd_wait)?;
    if keibi_mounts_at(&mountpoint) > 0
        && crate::mount::probe(&mountpoint, crate::mount::STAT_LIMIT) != crate::mount::Probe::Dead
    {
        return Err(failed(format!(
            "{} is already a keibi mount (umount it first)",
            mountpoint.display()
        )));
    }
    let anchor = ipc_schema::paths::mount_anchor(&opts.lock_dir, &mountpoint);
    crate::lock_dir::check_socket_fits(&anchor).map_err(usage)?;
    let mut cmd = mountd_command(&req, &mountpoint, &socket)?;
    if req.verbose {
        eprintln!("mount.fuse.keibi: running {cmd:?}");
    }
    if req.fake {
        return Ok(());
    }
    crate::lock_dir::prepare(&opts.lock_dir, &anchor).map_err(usage)?;
    let log_path = anchor.join(LOG_FILE);
    let log = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| failed(format!("cannot open {}: {e}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(|e| failed(format!("cannot open {}: {e}", log_path.display())))?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
    // SAFETY: setsid is async-signal-safe and touches no memory of ours;
    // it detaches mountd from mount(8)'s session and terminal.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| failed(format!("cannot start keibi-mountd: {e}")))?;
    wait_for_mount(&mut child, &mountpoint, opts.mount_timeout, &log_path)
}

/// keibi-mountd for `mountpoint` with the options as flags.
fn mountd_command(req: &Request, mountpoint: &Path, socket: &Path) -> Result<Command, Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| failed(format!("cannot find keibi-mountd (this binary): {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg(mountpoint)
        .arg("--syncd-socket")
        .arg(socket)
        .arg("--lock-dir")
        .arg(&req.options.lock_dir)
        .args(&req.options.mountd_args);
    Ok(cmd)
}

/// Succeed once keibi-syncd accepts mountd's handshake on `socket`, trying
/// again until `wait` has passed. The preamble carries an fd channel, as
/// mountd's does (syncd refuses a filesystem preamble without one); both
/// ends close right after, and syncd sees a client that went away before
/// registering a mount.
fn check_syncd(socket: &Path, wait: Duration) -> Result<(), Failure> {
    use ipc_schema::handshake::{self, ServiceKind};
    use std::os::fd::AsRawFd;
    let start = Instant::now();
    loop {
        let (_mine, theirs) = ipc_schema::fdpass::channel_pair()
            .map_err(|e| failed(format!("cannot make an fd channel: {e}")))?;
        let why = match std::os::unix::net::UnixStream::connect(socket) {
            Ok(mut s) => {
                match handshake::client(&mut s, ServiceKind::Filesystem, Some(theirs.as_raw_fd())) {
                    Ok(()) => return Ok(()),
                    // A refusal will not change by waiting.
                    Err(e) => {
                        return Err(failed(format!(
                            "keibi-syncd at {} refused keibi-mountd: {e}",
                            socket.display()
                        )));
                    }
                }
            }
            Err(e) => e,
        };
        if start.elapsed() >= wait {
            return Err(failed(format!(
                "keibi-syncd is not answering at {} ({why}); start it first \
                 (systemctl start keibi-syncd), or name its socket with -o syncd_socket=PATH",
                socket.display()
            )));
        }
        std::thread::sleep(POLL.max(Duration::from_millis(100)));
    }
}

fn keibi_mounts_at(mountpoint: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| crate::mount::keibi_mounts_at(&info, mountpoint))
        .unwrap_or(0)
}

/// Wait until the mount is up; on any failure stop mountd and leave no
/// mount behind.
fn wait_for_mount(
    child: &mut Child,
    mountpoint: &Path,
    timeout: Duration,
    log_path: &Path,
) -> Result<(), Failure> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return Err(failed(format!(
                    "keibi-mountd exited ({status}) before the mount was up:\n{}",
                    log_text(log_path)
                )));
            }
            Ok(None) => {}
            Err(e) => return Err(failed(format!("cannot watch keibi-mountd: {e}"))),
        }
        if keibi_mounts_at(mountpoint) > 0 {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            stop(child, mountpoint);
            return Err(failed(format!(
                "no mount at {} after {}; stopped keibi-mountd (its log: {}):\n{}",
                mountpoint.display(),
                humantime::format_duration(timeout),
                log_path.display(),
                log_text(log_path)
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// SIGTERM (mountd unmounts), then SIGKILL; then clear what is left.
fn stop(child: &mut Child, mountpoint: &Path) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < STOP_WAIT {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(POLL);
    }
    if !matches!(child.try_wait(), Ok(Some(_))) {
        let _ = child.kill();
        let _ = child.wait();
    }
    for _ in 0..16 {
        if keibi_mounts_at(mountpoint) == 0 || crate::mount::detach(mountpoint).is_err() {
            break;
        }
    }
}

fn log_text(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => t.trim_end().to_string(),
        Ok(_) => "(its log is empty)".into(),
        Err(e) => format!("(cannot read its log {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn options_become_mountd_flags() {
        let req = parse_args(&args(&[
            "keibi",
            "/mnt/k",
            "-o",
            "rw,deadline=3s,attr_ttl=500ms,threads=4,attr_cache=4096,no_passthrough,_netdev,x-systemd.automount",
            "-n",
        ]))
        .expect("valid");
        assert_eq!(req.mountpoint, PathBuf::from("/mnt/k"));
        assert_eq!(
            req.options.mountd_args,
            args(&[
                "--deadline",
                "3s",
                "--attr-ttl",
                "500ms",
                "--threads",
                "4",
                "--attr-cache",
                "4096",
                "--no-passthrough"
            ])
        );
        let refused = parse_args(&args(&["keibi", "/m", "-o", "attr_cache=lots"]));
        assert!(
            refused
                .is_err_and(|(code, msg)| code == EXIT_USAGE
                    && msg.contains("attr_cache=lots: write a number")),
            "a cache size that is not a number is refused"
        );
        let req = parse_args(&args(&[
            "keibi",
            "/m",
            "-osyncd_socket=/s,syncd_wait=1s",
            "-fv",
        ]))
        .expect("valid");
        assert_eq!(req.options.syncd_socket, Some(PathBuf::from("/s")));
        assert_eq!(req.options.syncd_wait, Duration::from_secs(1));
        assert!(req.fake && req.verbose);
        let req = parse_args(&args(&[
            "keibi",
            "/m",
            "-o",
            "metrics_socket=/run/k/m.sock",
            "-o",
            "metrics_listen=[::1]:9811",
        ]))
        .expect("valid");
        assert_eq!(
            req.options.mountd_args,
            args(&[
                "--metrics-socket",
                "/run/k/m.sock",
                "--metrics-listen",
                "[::1]:9811"
            ])
        );
    }

    #[test]
    fn bad_options_are_named() {
        let err = |a: &[&str]| parse_args(&args(a)).expect_err("must be refused");
        let (code, msg) = err(&["keibi", "/m", "-o", "deadline=soon"]);
        assert_eq!(code, EXIT_USAGE);
        assert!(
            msg.contains("deadline=soon") && msg.contains("not a duration"),
            "{msg}"
        );
        let (_, msg) = err(&["keibi", "/m", "-o", "colour=blue"]);
        assert!(msg.contains("unknown option \"colour=blue\""), "{msg}");
        let (_, msg) = err(&["keibi", "/m", "-o", "ro"]);
        assert!(msg.contains("read-only"), "{msg}");
        for (option, why) in UNSUPPORTED {
            let (code, msg) = err(&["keibi", "/m", "-o", option]);
            assert_eq!(code, EXIT_USAGE);
            assert_eq!(msg, format!("option {option}: {why}"));
        }
        let (_, msg) = err(&["keibi", "/m", "-o", "threads=0"]);
        assert!(msg.contains("threads=0"), "{msg}");
        let (_, msg) = err(&["keibi", "/m", "-o", "deadline"]);
        assert!(msg.contains("needs a value"), "{msg}");
        let (code, msg) = err(&["keibi", "/m", "-o", "metrics_listen=0.0.0.0:9811"]);
        assert_eq!(code, EXIT_USAGE);
        assert!(msg.contains("not a loopback address"), "{msg}");
        let (_, msg) = err(&["keibi", "/m", "-o", "metrics_socket"]);
        assert!(msg.contains("needs a value"), "{msg}");
        let (_, msg) = err(&["/m"]);
        assert!(msg.contains("MOUNTPOINT"), "{msg}");
        // Sloppy (-s) ignores unknown options, never unsupported ones.
        parse_args(&args(&["keibi", "/m", "-s", "-o", "colour=blue"])).expect("sloppy");
        err(&["keibi", "/m", "-s", "-o", "ro"]);
    }
}
