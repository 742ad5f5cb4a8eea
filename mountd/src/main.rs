//! keibi-mountd: the privileged FUSE daemon of a keibi mount.
//!
//! It owns the mount, the open-handle table and a short attribute cache;
//! everything else (metadata, content files) belongs to keibi-syncd, which
//! it calls over the filesystem socket with a deadline on every call.
//!
//! Start-up, in order: command line (syncd's socket from `--syncd-socket`,
//! else from syncd's configuration file, [`syncd_config`]); root check;
//! the lock directory and the mountpoint's anchor in it, checked to be
//! root's alone ([`lock_dir`]); the mountpoint's single-instance lock
//! (`<lock dir>/<anchor>/lock`, exit 3 when another mountd holds it);
//! clearing a dead mount left at the mountpoint, or refusing (exit 3) when
//! a live keibi mount of another mountd is there ([`mount`]); a tokio
//! runtime (two workers) for the calls to syncd; the FUSE session (mount
//! and `init`); the connector to syncd, which keeps reconnecting in the
//! background (the mount serves at once, operations that need syncd fail
//! with `ETIMEDOUT` until it is up); the ops socket
//! (`<lock dir>/<anchor>/ops.sock`) for `keibictl debug ops`; the
//! metrics endpoint, when `--metrics-socket` or `--metrics-listen` asks
//! for one ([`metrics`]).
//!
//! Shutdown: `SIGTERM`/`SIGINT` detach the mount (`umount2(MNT_DETACH)`),
//! wait for the session to end and exit 0. If the mount goes away by
//! itself (someone ran `umount`), mountd exits 0 too.
//!
//! Started under the name `mount.fuse.keibi` (a symlink), the binary is
//! mount(8)'s helper instead ([`mount_helper`]), and `--generate-docs DIR`
//! writes its man page and completions (the `clidoc` crate).

mod attr_cache;
mod dir_handles;
mod fd_check;
mod fs;
mod fuse;
mod handles;
mod held;
mod inval;
mod kernel_inval;
mod known_dirs;
mod lock_dir;
mod metrics;
mod mount;
mod mount_helper;
mod ondemand;
mod ops_socket;
mod passthrough;
mod releases;
mod sync_data;
mod syncd_client;
mod syncd_config;

use clap::Parser;
use ipc_schema::lockfile::{InstanceLock, LockError};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Worker threads of mountd's runtime: one. Its tasks only wait (on
/// syncd, on timers) and reply; anything that blocks runs on the blocking
/// pool. A second worker makes every round trip to syncd longer: tokio
/// wakes an idle worker to steal each task that becomes ready, and waking
/// a thread on another CPU costs tens of microseconds on a virtual
/// machine (`bench/ipc.sh`: about 190 µs per round trip with two workers
/// on each side, 85 µs with one; see syncd's `FS_WORKERS`).
const RUNTIME_WORKERS: usize = 1;

/// The `--attr-ttl` cap on kernels that cannot drop every cached entry
/// at once (see `kernel_inval::entry_ttl_cap`): the TTL keibi used before
/// it cached entries for long.
const SHORT_TTL: Duration = Duration::from_secs(1);
/// `--attr-ttl`'s default (its clap default says the same).
const DEFAULT_ATTR_TTL: Duration = Duration::from_secs(60);
/// How long shutdown waits for the FUSE session to end after detaching.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);
/// How often the lock file is checked and put back if it was tampered with.
const LOCK_REPAIR_INTERVAL: Duration = Duration::from_secs(2);

/// Exit status: a usage or environment error (not root, bad arguments).
const EXIT_USAGE: u8 = 2;
/// Exit status: another keibi-mountd serves this mountpoint.
const EXIT_LOCKED: u8 = 3;

/// Serve a keibi share at MOUNTPOINT through FUSE (runs as root).
#[derive(Parser, Debug)]
#[command(name = "keibi-mountd", version)]
struct Args {
    /// Where to mount the share.
    mountpoint: PathBuf,
    /// keibi-syncd's filesystem socket [default: `fs_socket` of
    /// keibi-syncd's configuration file, else /run/keibi/fs.sock].
    #[arg(long, env = "KEIBI_SYNCD_SOCKET")]
    syncd_socket: Option<PathBuf>,
    /// keibi-syncd's configuration file, read for its `fs_socket` only
    /// [default: /etc/keibi/syncd.toml, if it exists].
    #[arg(long, env = "KEIBI_SYNCD_CONFIG")]
    syncd_config: Option<PathBuf>,
    /// Longest wait for keibi-syncd on any operation but fsync (e.g. 2s, 500ms).
    #[arg(long, env = "KEIBI_DEADLINE", default_value = "2s", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Longest wait of a read (or write) for bytes of a file that are not
    /// on this machine yet, fetched from a peer; then it fails (ETIMEDOUT).
    #[arg(long, env = "KEIBI_READ_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    read_deadline: Duration,
    /// Longest wait of fsync/fsyncdir for local durability (the content
    /// file and syncd's store), never shortened while syncd is slow.
    #[arg(long, env = "KEIBI_FSYNC_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    fsync_deadline: Duration,
    /// How long the kernel may cache attributes and entries, including
    /// the absence of a name (attributes of a file open for writing on this
    /// mount are not cached). Changes from peers are invalidated at once;
    /// TTLs above 1 s are capped at 1 s on kernels before 6.16 (see `kernel_inval`).
    #[arg(long, env = "KEIBI_ATTR_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    attr_ttl: Duration,
    /// Attributes (and, separately, entries) mountd remembers for answers
    /// while keibi-syncd misses a deadline; the lookup counts and the
    /// xattr knowledge of every inode the kernel holds are kept apart,
    /// whatever this is.
    #[arg(long, value_name = "N", default_value_t = attr_cache::DEFAULT_CAPACITY, value_parser = clap::value_parser!(usize))]
    attr_cache: usize,
    /// FUSE dispatch threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// Do not use FUSE passthrough (all reads and writes go through mountd).
    #[arg(long)]
    no_passthrough: bool,
    /// Where mountpoint locks and ops sockets live; created 0755 root, and
    /// refused unless only root can change it and every directory above it.
    #[arg(long, default_value = ipc_schema::paths::DEFAULT_LOCK_DIR)]
    lock_dir: PathBuf,
    /// Where log records go: auto (the systemd journal when stderr is
    /// connected to it, else stderr), journal, or stderr. `RUST_LOG`
    /// filters them.
    #[arg(
        long,
        env = "KEIBI_LOG_TARGET",
        default_value = "auto",
        value_name = "auto|journal|stderr"
    )]
    log_target: ipc_schema::logging::LogTarget,
    /// Serve metrics (OpenMetrics text, answered to an HTTP GET) on this
    /// Unix socket, created mode 0660 (root's); off unless given.
    #[arg(long, value_name = "PATH")]
    metrics_socket: Option<PathBuf>,
    /// Serve metrics on this loopback TCP address instead (IP:PORT, e.g.
    /// 127.0.0.1:9811; any other address is refused).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

fn main() -> ExitCode {
    // Started as /usr/sbin/mount.fuse.keibi by mount(8).
    if mount_helper::invoked_as_helper() {
        return mount_helper::main();
    }
    // `keibi-mountd --generate-docs DIR`: man pages (keibi-mountd and the
    // mount helper) and completions.
    if let Some(code) = clidoc::generate_if_asked(|| {
        vec![
            (<Args as clap::CommandFactory>::command(), "8"),
            (mount_helper::command(), "8"),
        ]
    }) {
        return code;
    }
    // Flags, else their KEIBI_* environment variables, else defaults.
    let (args, _) = clidoc::env::parse::<Args>();
    ipc_schema::logging::init(args.log_target, "keibi-mountd");
    return_large_frees();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("keibi-mountd: {message}");
            ExitCode::from(code)
        }
    }
}

/// Give every large block (over [`MMAP_THRESHOLD`]) its own mapping, so
/// that freeing it returns its memory to the system at once. By default
/// glibc raises that threshold to the size of each mapped block freed, so
/// after the first big hash table is outgrown, the bigger ones come from
/// the heap, and what they leave when they grow again stays in mountd's
/// RSS: with the kernel holding a million inodes (after `ls -lR` of a
/// million files, `bench/million.sh`) that was 96 MiB of RSS, 72 MiB with
/// a fixed threshold. 2 MiB keeps the read buffers (at most 1 MiB, one per
/// plain read) in the heap, reused rather than mapped and faulted in
/// afresh for every read. Only a cost if it fails.
fn return_large_frees() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets an allocator parameter; no other
        // thread exists yet.
        if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) } != 1 {
            tracing::warn!("mallopt failed; freed large tables may stay in RSS");
        }
    }
}

/// See [`return_large_frees`].
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: i32 = 2 << 20;

struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn run(args: Args) -> Result<(), Failure> {
    if !nix::unistd::geteuid().is_root() {
        return Err(fail(
            EXIT_USAGE,
            "must run as root (it mounts the share for every local user and registers passthrough files)",
        ));
    }
    let (syncd_socket, socket_source) = syncd_config::resolve(
        args.syncd_socket.as_deref(),
        args.syncd_config.as_deref(),
        Path::new(syncd_config::DEFAULT_SYNCD_CONFIG),
    )
    .map_err(|e| fail(EXIT_USAGE, e))?;
    let metrics_endpoint = ipc_schema::metrics_endpoint::Endpoint::from_options(
        args.metrics_socket.as_deref(),
        args.metrics_listen.as_deref(),
        "--metrics-socket and --metrics-listen",
    )
    .map_err(|e| fail(EXIT_USAGE, e))?;
    let mountpoint = mount::absolute_mountpoint(&args.mountpoint)
        .map_err(|e| fail(1, format!("mountpoint {}: {e}", args.mountpoint.display())))?;
    let anchor = ipc_schema::paths::mount_anchor(&args.lock_dir, &mountpoint);
    lock_dir::check_socket_fits(&anchor).map_err(|e| fail(EXIT_USAGE, e))?;
    lock_dir::prepare(&args.lock_dir, &anchor).map_err(|e| fail(EXIT_USAGE, e))?;
    let lock = take_lock(&anchor, &mountpoint)?;
    lock_dir::record_mountpoint(&anchor, &mountpoint).map_err(|e| {
        fail(
            1,
            format!("cannot record the mountpoint in {}: {e}", anchor.display()),
        )
    })?;

    let cleared = mount::clear_dead_mounts(&mountpoint).map_err(|e| match e {
        mount::ClearError::Live(why) => fail(EXIT_LOCKED, why),
        mount::ClearError::Io(e) => fail(
            1,
            format!(
                "cannot clear the dead mount at {}: {e}",
                mountpoint.display()
            ),
        ),
    })?;
    if cleared > 0 {
        tracing::warn!(mountpoint = %mountpoint.display(), cleared, "cleared dead mounts");
    }
    let meta = std::fs::metadata(&mountpoint)
        .map_err(|e| fail(1, format!("mountpoint {}: {e}", mountpoint.display())))?;
    if !meta.is_dir() {
        return Err(fail(
            1,
            format!("mountpoint {} is not a directory", mountpoint.display()),
        ));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .thread_name("keibi-mountd-rt")
        .enable_all()
        .build()
        .map_err(|e| fail(1, format!("cannot start the tokio runtime: {e}")))?;

    // Handlers before the mount exists: from the moment the mount is
    // visible, SIGTERM must mean "unmount and exit 0", never the default
    // action (which would leave a dead mount).
    let signals = rt
        .block_on(async { StopSignals::install() })
        .map_err(|e| fail(1, format!("cannot install signal handlers: {e}")))?;

    let inflight = ipc_schema::inflight::InFlight::new();
    let (ops_listener, ops_file) = rt
        .block_on(async { ops_socket::bind(&anchor) })
        .map_err(|e| fail(1, format!("cannot open the ops socket: {e}")))?;
    let passthrough = Arc::new(passthrough::Passthrough::new(!args.no_passthrough));
    rt.spawn(ops_socket::serve(
        ops_listener,
        inflight.clone(),
        passthrough.clone(),
    ));

    let (client, connector) = syncd_client::new(syncd_client::ConnectConfig {
        socket: syncd_socket.clone(),
        mountpoint: mountpoint.display().to_string(),
        passthrough: passthrough.clone(),
    });
    // Bound before the mount exists, so a bad endpoint leaves no mount.
    let _metrics_file = match &metrics_endpoint {
        Some(endpoint) => Some(start_metrics(&rt, endpoint, client.clone())?),
        None => None,
    };
    let (attr_inval, inval_queue) = kernel_inval::channel();
    let keibi = Arc::new(
        fs::Keibi::new(
            client,
            passthrough,
            args.deadline,
            attr_cache::AttrCache::new(args.attr_cache.max(2)),
            args.attr_ttl,
            rt.handle().clone(),
        )
        .with_fsync_deadline(args.fsync_deadline)
        .with_read_deadline(args.read_deadline)
        .with_attr_inval(attr_inval),
    );
    let invalidation = keibi.invalidation();
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let attr_ttl = kernel_inval::entry_ttl_cap(&release, args.attr_ttl, SHORT_TTL);
    if attr_ttl < args.attr_ttl && args.attr_ttl == DEFAULT_ATTR_TTL {
        tracing::info!(
            kernel = %release,
            attr_ttl_ms = attr_ttl.as_millis() as u64,
            "this kernel cannot drop all cached entries at once (FUSE_NOTIFY_INC_EPOCH, Linux 6.16); the attribute TTL is 1 s"
        );
    } else if attr_ttl < args.attr_ttl {
        tracing::warn!(
            kernel = %release,
            attr_ttl_ms = attr_ttl.as_millis() as u64,
            "this kernel cannot drop all cached entries at once (FUSE_NOTIFY_INC_EPOCH, Linux 6.16); --attr-ttl is capped"
        );
    }
    let adapter = fuse::KeibiFs::new(keibi, attr_ttl, rt.handle().clone(), inflight);

    let mut config = fuser::Config::default();
    config.n_threads = Some(usize::from(args.threads));
    config.clone_fd = true;
    config.acl = fuser::SessionACL::All;
    config.mount_options = vec![
        fuser::MountOption::FSName("keibi".into()),
        // fuser's own mount(2) path ignores `Subtype` (it only reaches
        // fusermount); the kernel takes the subtype as a mount option, and
        // /proc/self/mountinfo then shows the type `fuse.keibi`.
        fuser::MountOption::CUSTOM("subtype=keibi".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    let session = fuser::Session::new(adapter, &mountpoint, &config)
        .map_err(|e| fail(1, format!("cannot mount {}: {e}", mountpoint.display())))?;
    let dev = session
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| fail(1, format!("cannot duplicate the /dev/fuse descriptor: {e}")))?;
    inval_queue
        .start(session.notifier(), std::fs::File::from(dev))
        .map_err(|e| fail(1, format!("cannot start a thread: {e}")))?;
    // Changes from peers: polled from syncd, notified to the kernel by
    // the thread just started.
    if let Some((data, invalidator)) = invalidation {
        rt.spawn(inval::run(data, invalidator));
    }
    let background = session
        .spawn()
        .map_err(|e| fail(1, format!("cannot start the FUSE session: {e}")))?;
    tracing::info!(
        mountpoint = %mountpoint.display(),
        syncd_socket = %syncd_socket.display(),
        syncd_socket_from = ?socket_source,
        deadline_ms = args.deadline.as_millis() as u64,
        fsync_deadline_ms = args.fsync_deadline.as_millis() as u64,
        threads = args.threads,
        "mounted"
    );
    connector.spawn(rt.handle());

    // The session thread is joined on its own thread, so the runtime can
    // wait for either a signal or the end of the session.
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("keibi-session-join".into())
        .spawn(move || {
            let r = background.join();
            let _ = ended_tx.send(r);
        })
        .map_err(|e| fail(1, format!("cannot start a thread: {e}")))?;

    let lock = Arc::new(Mutex::new(lock));
    rt.spawn(repair_lock_forever(lock.clone()));

    let outcome = rt.block_on(serve_until_stopped(&mountpoint, signals, ended_rx));
    drop(ops_file);
    drop(lock);
    // Tasks still waiting on syncd hold replies for a mount that is gone;
    // there is nothing to wait for.
    rt.shutdown_background();
    outcome
}

/// Start recording metrics and serve them on `endpoint` (on `rt`); the
/// socket file's guard, which removes it at exit.
fn start_metrics(
    rt: &tokio::runtime::Runtime,
    endpoint: &ipc_schema::metrics_endpoint::Endpoint,
    client: syncd_client::SyncdClient,
) -> Result<ipc_schema::metrics_endpoint::SocketFile, Failure> {
    use ipc_schema::metrics_endpoint as me;
    let (bound, file) = rt
        .block_on(async { me::bind(endpoint, 0o660) })
        .map_err(|e| fail(1, format!("cannot serve metrics on {endpoint}: {e}")))?;
    let metrics = metrics::enable();
    let render: me::Render = Arc::new(move || {
        let text = metrics.render(client.current_generation().is_some());
        Box::pin(async move { text })
    });
    rt.spawn(me::serve(bound, render, me::Limits::default()));
    tracing::info!(%endpoint, "serving metrics");
    Ok(file)
}

fn take_lock(anchor: &Path, mountpoint: &Path) -> Result<InstanceLock, Failure> {
    let what = format!("mountpoint {}", mountpoint.display());
    InstanceLock::acquire(anchor, ipc_schema::paths::LOCK_FILE, &what).map_err(|e| match e {
        LockError::Held { .. } => fail(EXIT_LOCKED, e.to_string()),
        LockError::Io { .. } => fail(1, e.to_string()),
    })
}

async fn repair_lock_forever(lock: Arc<Mutex<InstanceLock>>) {
    let mut tick = tokio::time::interval(LOCK_REPAIR_INTERVAL);
    loop {
        tick.tick().await;
        let lock = lock.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut l = lock.lock().unwrap_or_else(|p| p.into_inner());
            l.repair()
        })
        .await;
        match r {
            Ok(Ok(true)) => {
                tracing::warn!("the mountpoint's lock file was removed or replaced; put it back")
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot check the mountpoint's lock file"),
            Err(e) => tracing::warn!(error = %e, "lock check task failed"),
        }
    }
}

/// SIGTERM and SIGINT, caught from before the mount exists.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Install the handlers (inside the runtime).
    fn install() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

async fn serve_until_stopped(
    mountpoint: &Path,
    mut signals: StopSignals,
    mut ended: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
) -> Result<(), Failure> {
    let why = tokio::select! {
        _ = signals.term.recv() => "SIGTERM",
        _ = signals.int.recv() => "SIGINT",
        r = &mut ended => {
            match r {
                Ok(Ok(())) | Err(_) => tracing::info!(mountpoint = %mountpoint.display(), "the mount went away; exiting"),
                Ok(Err(e)) => tracing::warn!(error = %e, "the FUSE session ended with an error; exiting"),
            }
            return Ok(());
        }
    };
    tracing::info!(signal = why, mountpoint = %mountpoint.display(), "unmounting");
    if let Err(e) = mount::detach(mountpoint) {
        tracing::warn!(error = %e, "lazy unmount failed");
    }
    match tokio::time::timeout(SHUTDOWN_WAIT, ended).await {
        Ok(_) => tracing::info!("unmounted"),
        Err(_) => tracing::warn!(
            "the mount is detached but still in use by open files; exiting, which ends the session"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Args;
    use clap::CommandFactory;

    /// docs/configuration.md's table of mountd's flags names every flag
    /// and, where it has one, its environment variable.
    #[test]
    fn every_flag_and_variable_is_in_the_configuration_table() {
        let doc = include_str!("../../docs/configuration.md");
        let section = doc
            .split("## keibi-mountd")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("docs/configuration.md has a keibi-mountd section");
        for arg in Args::command().get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            if long == "help" || long == "version" {
                continue;
            }
            let row = section
                .lines()
                .find(|l| l.starts_with(&format!("| `--{long}` |")))
                .unwrap_or_else(|| panic!("--{long} is missing from docs/configuration.md"));
            if let Some(var) = arg.get_env() {
                let var = var.to_string_lossy();
                assert!(var.starts_with("KEIBI_"), "{var}");
                assert!(row.contains(&format!("`{var}`")), "{row}");
            }
        }
    }
}
