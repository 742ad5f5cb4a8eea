//! keibi-syncd: the unprivileged daemon that owns keibi's state.
//!
//! It keeps the metadata store (sled) and the content files of one state
//! directory, and serves them on two Unix sockets: the filesystem socket for
//! keibi-mountd (which alone talks to the kernel) and the control socket for
//! keibictl. See `docs/architecture.md`.
//!
//! Startup, in order: flags and their `KEIBI_*` environment variables;
//! refuse root unless `--allow-root` (exit 2); the config file under them
//! ([`config`]); logging, to stderr or the journal
//! ([`ipc_schema::logging`]); take the single-instance lock on the state
//! directory (exit 3 when another syncd holds it, naming its pid); load the
//! peer identity, or make it at the first start (exit 4 when the file is
//! there but corrupt, unreadable, of another version or readable by
//! others, see [`identity`]); open the
//! store (and start making spare content files, see [`spares`]); bind
//! every peer `listen` address (exit 1 naming the address and the errno
//! when one cannot be, see [`peer::listen`]); load the paired peers and
//! start dialing them ([`peer::manager`]), the sync engine first (it ties
//! the store to this device and serves the peers' requests, see
//! [`sync::engine`]); bind both sockets (and the metrics endpoint when
//! one is configured, served on the control runtime, see [`metrics`]);
//! serve. SIGTERM or SIGINT removes the unused spares, reclaims the
//! freed inodes, flushes the store, removes the socket files, stops the
//! runtimes and, when all of their work ended in time, marks the stop
//! clean so that the next start skips its scan (see `store::check`); it
//! exits 0. Other startup failures exit 1.
//!
//! Two tokio runtimes. The filesystem runtime (multi-threaded, threads
//! `keibi-fs`) serves mountd; its workers may run short store reads
//! themselves (see [`service`]), so a slow disk can hold all of them. The
//! control runtime (single-threaded, on the main thread, with its own
//! blocking pool) serves keibictl, the signals and the lock file: nothing
//! the filesystem service does can take its thread, so `keibictl status`
//! and `debug ops` answer while the store is stuck.
//!
//! A third runtime (multi-threaded, two workers, threads `keibi-net`)
//! carries the peer channel: listeners, dialers, handshakes, connections
//! and `peer bench`. Nothing on it blocks on the store (store writes go to
//! its blocking pool), and neither other runtime waits on it except
//! `peer bench`'s answer, bounded by its deadline.

mod census;
mod channel;
mod config;
mod content;
mod control;
mod daemon;
mod fault;
mod identity;
mod listener;
mod metrics;
mod opens;
mod peer;
mod service;
mod space;
mod spares;
mod store;
mod sync;

use config::{Cli, Config};
use daemon::Daemon;
use ipc_schema::lockfile::{InstanceLock, LockError};
use std::os::unix::fs::DirBuilderExt;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::Store;
use tokio::signal::unix::{SignalKind, signal};

/// How often the instance lock file is checked and repaired.
const LOCK_REPAIR_EVERY: Duration = Duration::from_secs(2);

/// How long the filesystem runtime's tasks get to finish at exit.
const FS_SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// How long the network runtime gets at exit to send the peers' CLOSE
/// frames.
const NET_SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// How long the control runtime's tasks (keibictl calls) get to finish
/// at exit.
const CONTROL_SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// File mode of the metrics socket: syncd's user and group.
const METRICS_SOCKET_MODE: u32 = 0o660;

/// Worker threads of the network runtime.
const NET_WORKERS: usize = 2;

/// Worker threads of the filesystem runtime: one. Every mountd request is
/// a round trip that a second worker only lengthens: tokio wakes an idle
/// worker to steal each task that becomes ready, and on a virtual machine
/// waking a thread on another CPU costs tens of microseconds. Measured on
/// the 2-CPU development machine with `bench/ipc.sh` (tarpc on a Unix
/// socket between two processes): a round trip costs about 190 µs with
/// two workers on each side, 85 µs with one, against a floor of 60 µs for
/// a blocking write and read of 64 bytes. The store calls that may wait on
/// the disk run on the blocking pool (see `service.rs`), so one worker is
/// never the only thread doing them.
const FS_WORKERS: usize = 1;

/// Exit status: startup failure.
const EXIT_FAILURE: u8 = 1;
/// Exit status: refusing to run as root.
const EXIT_ROOT: u8 = 2;
/// Exit status: another instance holds the state directory.
const EXIT_LOCKED: u8 = 3;
/// Exit status: the identity file is corrupt, unreadable, of another
/// version or readable by others (it is left as it is).
const EXIT_IDENTITY: u8 = 4;

/// `--check-config FILE`: print the effective settings, FILE with the
/// environment and the other flags over it (exit 0; a value from an
/// environment variable is marked with a comment naming it), or why they
/// are invalid (exit 1). FILE replaces any `--config`. Needs no privilege
/// and touches nothing.
fn check_config(mut cli: Cli, file: std::path::PathBuf) -> ExitCode {
    cli.config = Some(file);
    match Config::load(&cli) {
        Ok(config) => {
            print!(
                "{}",
                config::mark_env_sources(&config.effective_toml(), &cli.from_env)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keibi-syncd: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn main() -> ExitCode {
    // `keibi-syncd --generate-docs DIR`: man page and completions.
    if let Some(code) =
        clidoc::generate_if_asked(|| vec![(<Cli as clap::CommandFactory>::command(), "8")])
    {
        return code;
    }
    let cli = Cli::parse_env();
    if let Some(file) = cli.check_config.clone() {
        return check_config(cli, file);
    }
    if nix::unistd::geteuid().is_root() && !cli.allow_root {
        eprintln!(
            "keibi-syncd: refusing to run as root: syncd needs no privilege; run it as an unprivileged user (the packaged service uses `keibi`), or pass --allow-root to insist"
        );
        return ExitCode::from(EXIT_ROOT);
    }
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_FAILURE, &e),
    };
    ipc_schema::logging::init(config.log_target, "keibi-syncd");
    keep_frame_buffers_in_the_heap();
    // Before any peer connection or conflict can happen, so none goes
    // uncounted; served once the sockets are bound (`run`).
    if config.metrics.is_some() {
        metrics::enable();
    }
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
    {
        return fail(
            EXIT_FAILURE,
            &format!(
                "cannot create state directory {}: {e}",
                config.state_dir.display()
            ),
        );
    }
    let what = format!("state directory {}", config.state_dir.display());
    let lock = match InstanceLock::acquire(&config.state_dir, "lock", &what) {
        Ok(l) => l,
        Err(e @ LockError::Held { .. }) => return fail(EXIT_LOCKED, &e.to_string()),
        Err(e) => return fail(EXIT_FAILURE, &e.to_string()),
    };
    let id = match identity::Identity::load_or_create(&config.state_dir) {
        Ok((id, origin)) => {
            tracing::info!(
                file = %id.path().display(),
                fingerprint = %identity::group(&id.fingerprint()),
                created = origin == identity::Origin::Created,
                "peer identity"
            );
            id
        }
        Err(e) => return fail(EXIT_IDENTITY, &e.to_string()),
    };
    fault::init();
    let store = match Store::load_with(&config.state_dir, config.share_owner, config.store_cache) {
        Ok(s) => Arc::new(s),
        Err(e) => return fail(EXIT_FAILURE, &format!("cannot open the store: {e}")),
    };
    if let Err(e) = store.begin_handle_epoch() {
        return fail(EXIT_FAILURE, &format!("cannot start the handle epoch: {e}"));
    }
    if let Err(e) = store.start_spares() {
        // Only a cost: every create then makes its content file itself.
        tracing::warn!(error = %e, "no spare content files");
    }
    let fs_runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(FS_WORKERS)
        .enable_all()
        .thread_name("keibi-fs")
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FAILURE, &format!("cannot start the runtime: {e}")),
    };
    let net_runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(NET_WORKERS)
        .enable_all()
        .thread_name("keibi-net")
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FAILURE, &format!("cannot start the runtime: {e}")),
    };
    let device = sync::model::DeviceId::of_public_key(&id.public_key());
    let engine = {
        // The versioner runs on the network runtime, next to the sessions.
        let _in_net = net_runtime.enter();
        match sync::engine::SyncEngine::start(store.clone(), device) {
            Ok(e) => e,
            Err(e) => return fail(EXIT_FAILURE, &format!("cannot start the sync engine: {e}")),
        }
    };
    tracing::info!(device = %device.hex(), local_seq = store.local_seq(), "sync engine started");
    let listeners = match peer::listen::bind(&config.listen) {
        Ok(l) => l,
        Err(e) => return fail(EXIT_FAILURE, &e),
    };
    let peers_store = match store.peers() {
        Ok(p) => p,
        Err(e) => return fail(EXIT_FAILURE, &format!("cannot open the peers: {e}")),
    };
    let manager = match peer::manager::Manager::start(
        channel::LocalKeys::new(id.secret().to_bytes()),
        peers_store,
        net_runtime.handle().clone(),
        peer::manager::ManagerConfig {
            channel: channel::ChannelConfig {
                handshake_timeout: config.peer_timeout,
                rekey_bytes: config.peer_rekey_bytes,
                rekey_interval: config.peer_rekey_interval,
                aeads: channel::aead_offer(config.peer_aead),
            },
            conn: peer::conn::ConnConfig {
                keepalive_timeout: config.peer_timeout,
                ..peer::conn::ConnConfig::default()
            },
            reconnect_max: config.peer_reconnect_max,
            peer_timeout: config.peer_timeout,
        },
        engine.handler(),
    ) {
        Ok(m) => m,
        Err(e) => return fail(EXIT_FAILURE, &format!("cannot load the peers: {e}")),
    };
    let fetcher = sync::fetch::Fetcher::new(
        store.clone(),
        manager.clone(),
        sync::fetch::FetchConfig::of(&config),
        net_runtime.handle().clone(),
    );
    let invals = Arc::new(sync::inval::InvalQueue::new());
    engine.set_data_path(Arc::new(sync::wired::Wired {
        store: store.clone(),
        fetcher: fetcher.clone(),
        invals: invals.clone(),
        eager_fetch_max: config.eager_fetch_max,
    }));
    let identity = ipc_schema::PeerIdentity {
        fingerprint: id.fingerprint(),
        public_key: id.public_key().iter().map(|b| format!("{b:02x}")).collect(),
        listen: listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .collect(),
    };
    drop(id);
    for l in listeners {
        if let Ok(address) = l.local_addr() {
            tracing::info!(%address, "listening for peers");
        }
        net_runtime.spawn(peer::listen::serve(l, manager.clone()));
    }
    let control_runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("keibi-control")
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(EXIT_FAILURE, &format!("cannot start the runtime: {e}")),
    };
    let result = control_runtime.block_on(run(
        config,
        lock,
        store.clone(),
        identity,
        manager,
        (engine, fetcher, invals),
        fs_runtime.handle(),
    ));
    // Requests still running after the flush have nobody to answer.
    // The control runtime's calls only read the store, except a repair,
    // which the mark itself excludes (see `store::check`): a long one (a
    // census of a large store) need not end for the stop to be clean.
    control_runtime.shutdown_timeout(CONTROL_SHUTDOWN_WAIT);
    let late: Vec<&str> = [
        ("filesystem", fs_runtime, FS_SHUTDOWN_WAIT),
        ("network", net_runtime, NET_SHUTDOWN_WAIT),
    ]
    .into_iter()
    .filter_map(|(name, runtime, wait)| (!stop_runtime(runtime, wait)).then_some(name))
    .collect();
    if let Err(e) = result {
        return fail(EXIT_FAILURE, &e);
    }
    if !late.is_empty() {
        tracing::info!(
            runtimes = ?late,
            "not marking the stop clean: work on these runtimes did not end in time; the next start scans the store"
        );
    } else {
        // Nothing runs that could change the store: the next start may
        // skip its scan (see `store::check`).
        match store.mark_clean() {
            Ok(true) => tracing::info!("stop marked clean"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot mark the stop clean; the next start scans the store")
            }
        }
    }
    ExitCode::SUCCESS
}

/// Stop `runtime`, waiting up to `wait` for its tasks and threads;
/// answers whether every one of them ended within it.
fn stop_runtime(runtime: tokio::runtime::Runtime, wait: Duration) -> bool {
    let started = std::time::Instant::now();
    runtime.shutdown_timeout(wait);
    started.elapsed() < wait
}

/// Serve the peer channel's frame-sized buffers (up to 256 KiB, one or
/// two per frame) from the heap. glibc otherwise maps each allocation
/// over 128 KiB with its own `mmap` and unmaps it when freed, so every
/// received frame faults its pages in afresh (about a tenth of the
/// receiver's CPU in a profile of `keibictl peer bench`). With a fixed
/// threshold of 1 MiB, and freed memory at the top of the heap kept up to
/// 32 MiB, those buffers are reused. Only a cost if it fails.
fn keep_frame_buffers_in_the_heap() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets allocator parameters; it is called
        // before any other thread exists.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20) == 1
        };
        if !ok {
            tracing::warn!("mallopt failed; large buffers stay mmap'd");
        }
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("keibi-syncd: {message}");
    ExitCode::from(code)
}

/// Serve until SIGTERM or SIGINT. Runs on the control runtime; the
/// filesystem socket is bound and served on `fs` (see the module doc).
async fn run(
    config: Config,
    lock: InstanceLock,
    store: Arc<Store>,
    identity: ipc_schema::PeerIdentity,
    peers: Arc<peer::manager::Manager>,
    (sync, fetcher, invals): (
        Arc<sync::engine::SyncEngine>,
        Arc<sync::fetch::Fetcher>,
        Arc<sync::inval::InvalQueue>,
    ),
    fs: &tokio::runtime::Handle,
) -> Result<(), String> {
    // Handlers first: once a socket exists, SIGTERM must mean "shut down
    // cleanly", never the default action.
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    let daemon = Arc::new(Daemon::new(
        store.clone(),
        identity,
        peers.clone(),
        sync,
        fetcher,
        invals,
    ));
    let fs_listener = {
        // Registered with the filesystem runtime's reactor.
        let _in_fs = fs.enter();
        listener::bind(&config.fs_socket, listener::FS_SOCKET_MODE, None, None)
            .map_err(|e| e.to_string())?
    };
    let sockets = vec![config.fs_socket.clone(), config.control_socket.clone()];
    let control_listener = match listener::bind(
        &config.control_socket,
        config.control_socket_mode,
        config.control_socket_owner,
        config.control_socket_group,
    ) {
        Ok(l) => l,
        Err(e) => {
            listener::remove_sockets(&sockets[..1]);
            return Err(e.to_string());
        }
    };
    fs.spawn(listener::serve_filesystem(
        fs_listener,
        daemon.clone(),
        config.mountd_uid,
    ));
    tokio::spawn(listener::serve_control(control_listener, daemon.clone()));
    let _metrics_file = match &config.metrics {
        Some(endpoint) => match serve_metrics(endpoint, daemon.clone()) {
            Ok(f) => Some(f),
            Err(e) => {
                listener::remove_sockets(&sockets);
                return Err(e);
            }
        },
        None => None,
    };
    tokio::spawn(keep_lock_file(Arc::new(Mutex::new(lock))));
    tracing::info!(
        version = ipc_schema::KEIBI_VERSION,
        protocol = ipc_schema::PROTOCOL_VERSION,
        state_dir = %config.state_dir.display(),
        fs_socket = %config.fs_socket.display(),
        control_socket = %config.control_socket.display(),
        mountd_uid = config.mountd_uid,
        "keibi-syncd ready"
    );
    let signal_name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = signal_name, "shutting down");
    let flushed = tokio::task::spawn_blocking(move || {
        peers.shutdown("keibi-syncd is shutting down");
        store.shutdown()
    })
    .await;
    listener::remove_sockets(&sockets);
    match flushed {
        Ok(Ok(())) => {
            tracing::info!("store flushed; bye");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("flushing the store at shutdown: {e}")),
        Err(e) => Err(format!("flushing the store at shutdown: {e}")),
    }
}

/// Serve the metrics on `endpoint` from the control runtime (see
/// [`metrics`]); the socket file's guard, which removes it at exit.
fn serve_metrics(
    endpoint: &ipc_schema::metrics_endpoint::Endpoint,
    daemon: Arc<Daemon>,
) -> Result<ipc_schema::metrics_endpoint::SocketFile, String> {
    use ipc_schema::metrics_endpoint as me;
    let (bound, file) = me::bind(endpoint, METRICS_SOCKET_MODE)
        .map_err(|e| format!("cannot serve metrics on {endpoint}: {e}"))?;
    let m = metrics::enable();
    let render: me::Render = Arc::new(move || {
        let daemon = daemon.clone();
        Box::pin(async move {
            let census = census::Census::report(&daemon, census::WAIT).await;
            let peers = daemon.peers.list();
            let scraped = metrics::Scraped {
                census,
                peers_paired: peers.len() as u64,
                peers_connected: peers.iter().filter(|p| p.state == "connected").count() as u64,
                mounts_connected: daemon.mounts.list().len() as u64,
            };
            m.render(&scraped)
        })
    });
    tokio::spawn(me::serve(bound, render, me::Limits::default()));
    tracing::info!(%endpoint, "serving metrics");
    Ok(file)
}

/// Every [`LOCK_REPAIR_EVERY`], put the lock file back if someone removed
/// or replaced it (the directory lock keeps others out meanwhile).
async fn keep_lock_file(lock: Arc<Mutex<InstanceLock>>) {
    let mut tick = tokio::time::interval(LOCK_REPAIR_EVERY);
    loop {
        tick.tick().await;
        let lock = lock.clone();
        let repaired = tokio::task::spawn_blocking(move || {
            let mut l = lock.lock().unwrap_or_else(|p| p.into_inner());
            l.repair()
                .map_err(|e| (l.file_path().display().to_string(), e))
        })
        .await;
        match repaired {
            Ok(Ok(true)) => tracing::warn!("the lock file was removed or replaced; restored it"),
            Ok(Ok(false)) => {}
            Ok(Err((path, e))) => tracing::warn!(path, error = %e, "cannot check the lock file"),
            Err(e) => tracing::warn!(error = %e, "lock file check failed"),
        }
    }
}
