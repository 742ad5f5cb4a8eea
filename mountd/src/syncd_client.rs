//! The connection to keibi-syncd, kept alive by a background task, and the
//! one way to call it: with a deadline.
//!
//! A [`Connector`] task owns the connecting: it makes a fresh fd channel
//! ([`fdpass::channel_pair`]) and its reader ([`FdInbox::spawn_reader`]),
//! connects to the filesystem socket (handing syncd its end of the channel
//! in the handshake, and noting syncd's uid from `SO_PEERCRED`), and
//! registers the mount (`reconnect: false` the first time, `true` after,
//! with the list of handles mountd holds, read from the handle table after
//! the old connection was withdrawn, so that syncd's open counts become
//! exactly mountd's; see `crate::handles`).
//! It publishes the [`Connection`] through a `tokio::sync::watch`, then
//! waits until the connection breaks: the fd channel closes (syncd died or
//! closed it) or a call saw a transport error. It then publishes `None`
//! and connects again, with a backoff from 50 ms to 1 s.
//!
//! [`SyncdClient::call`] waits for a connection and makes the call, all of
//! it bounded by one deadline, which is also put in the tarpc context so
//! syncd drops the request when it passes. mountd starts serving before
//! syncd is up; calls made then wait for a connection until their deadline
//! and fail with `ETIMEDOUT`. A deadline miss is logged at warn with the
//! operation, the inode and the time waited, and every call is counted in
//! the metrics with its time and outcome ([`crate::metrics::syncd_call`]).
//!
//! No lock is involved: the watch channel's guard is dropped before any
//! await.

use crate::attr_cache::AttrCache;
use crate::handles::HandleTable;
use crate::passthrough::Passthrough;
use ipc_schema::fdpass::{self, FdInbox};
use ipc_schema::service::FilesystemClient;
use ipc_schema::{FsError, MountInfo, fs_err, transport};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tarpc::client::RpcError;
use tarpc::context::Context;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Bound on one connection attempt (connect, handshake, `register_mount`),
/// so a stopped syncd cannot hold the connector.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call waits while syncd is marked stalled.
const STALLED_WAIT: Duration = Duration::from_millis(50);
/// Pause between probes of a stalled syncd.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Shortest deadline a probe gets.
const MIN_PROBE_DEADLINE: Duration = Duration::from_millis(500);

/// Calls whose deadline miss is not logged here: the health probe, and
/// the calls of [`SyncdClient::call_untracked`], whose callers say what a
/// miss means.
const QUIET_OPS: [&str; 3] = ["probe", "changes", "fetch_range"];

/// One live connection to syncd.
pub struct Connection {
    /// The tarpc client of the filesystem service.
    pub client: FilesystemClient,
    /// Descriptors syncd sends for `open`/`create`, by handle.
    pub inbox: FdInbox,
    /// syncd's uid, from `SO_PEERCRED` of the filesystem socket.
    pub syncd_uid: u32,
    /// Where syncd's invalidation stream stood when this process first
    /// registered its mount, before syncd answered it anything: see
    /// [`crate::inval`]. `None` on later connections, and when syncd
    /// did not say.
    pub stream_start: Option<StreamPosition>,
    generation: u64,
    broken: Notify,
}

/// A place in syncd's invalidation stream: its run and the sequence number
/// to ask from (`Filesystem::changes(epoch, after, ..)`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamPosition {
    /// syncd's run.
    pub epoch: u64,
    /// The last sequence number already accounted for.
    pub after: u64,
}

impl Connection {
    /// Which connection this is (1 for the first, counting reconnections).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Tell the connector this connection is unusable.
    fn mark_broken(&self) {
        self.broken.notify_one();
    }
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// syncd answered with an error, or the call failed for a reason that
    /// has an errno.
    Fs(FsError),
    /// The deadline passed before syncd answered.
    Deadline {
        /// How long the call waited.
        waited: Duration,
    },
}

impl CallError {
    /// The error the kernel gets: syncd's, or `ETIMEDOUT`.
    pub fn into_fs(self, op: &str) -> FsError {
        match self {
            CallError::Fs(e) => e,
            CallError::Deadline { waited } => fs_err!(
                ETIMEDOUT,
                "{op}: keibi-syncd did not answer within {} ms",
                waited.as_millis()
            ),
        }
    }
}

impl From<CallError> for FsError {
    fn from(e: CallError) -> FsError {
        e.into_fs("call")
    }
}

/// Whether a call may be sent again on a new connection after the old one
/// broke mid-call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Reads: sending twice is harmless.
    Idempotent,
    /// Changes: the first attempt may have been applied; fail with `EIO`
    /// instead of risking a second application.
    Once,
}

/// Where and how to connect.
pub struct ConnectConfig {
    /// syncd's filesystem socket.
    pub socket: PathBuf,
    /// The mountpoint, for `register_mount`.
    pub mountpoint: String,
    /// Passthrough state, reported in `register_mount`.
    pub passthrough: Arc<Passthrough>,
}

/// Where the connector reads the handles mountd holds and the inodes the
/// kernel references (set once the handle table and the cache exist).
type HeldSource = Arc<OnceLock<(Arc<HandleTable>, Arc<AttrCache>)>>;

/// The calling side; cheap to clone.
#[derive(Clone)]
pub struct SyncdClient {
    rx: watch::Receiver<Option<Arc<Connection>>>,
    health: Arc<Health>,
    held: HeldSource,
}

/// Whether syncd is keeping up. One missed deadline marks it stalled;
/// while it is, calls wait at most [`STALLED_WAIT`], so a `stat` that
/// makes several calls in a row answers within one deadline, not one per
/// call. Calls made with [`SyncdClient::call_durable`] (`fsync`) are
/// exempt: they always wait for their full deadline. Any answer from
/// syncd (or a new connection) clears it, and a probe with the full
/// deadline runs in the background until one comes.
#[derive(Default)]
struct Health {
    stalled: AtomicBool,
}

impl Health {
    fn stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Returns whether this call changed the state.
    fn set_stalled(&self, stalled: bool) -> bool {
        self.stalled.swap(stalled, Ordering::SeqCst) != stalled
    }
}

/// The connecting side, started once the FUSE session is initialised.
pub struct Connector {
    config: ConnectConfig,
    tx: watch::Sender<Option<Arc<Connection>>>,
    health: Arc<Health>,
    held: HeldSource,
}

/// A client and its (not yet started) connector.
pub fn new(config: ConnectConfig) -> (SyncdClient, Connector) {
    let (tx, rx) = watch::channel(None);
    let health = Arc::new(Health::default());
    let held = HeldSource::default();
    (
        SyncdClient {
            rx,
            health: health.clone(),
            held: held.clone(),
        },
        Connector {
            config,
            tx,
            health,
            held,
        },
    )
}

/// Count a finished call in the metrics ([`crate::metrics::syncd_call`]).
fn record<T>(op: &'static str, start: Instant, r: &Result<T, CallError>) {
    use crate::metrics::CallOutcome;
    let outcome = match r {
        Ok(_) => CallOutcome::Answered,
        Err(CallError::Fs(_)) => CallOutcome::Failed,
        Err(CallError::Deadline { .. }) => CallOutcome::DeadlineMissed,
    };
    crate::metrics::syncd_call(op, start.elapsed(), outcome);
}

impl SyncdClient {
    /// Call syncd: `f` makes the tarpc call on a connection with the given
    /// context. Waiting for a connection and the call itself both end at
    /// `deadline`. `op` and `ino` name the call in the deadline log line.
    pub async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        ino: u64,
        deadline: Instant,
        retry: Retry,
        f: F,
    ) -> Result<T, CallError>
    where
        F: Fn(Arc<Connection>, Context) -> Fut,
        Fut: Future<Output = Result<Result<T, FsError>, RpcError>>,
    {
        let shortened = if self.health.stalled() {
            deadline.min(Instant::now() + STALLED_WAIT)
        } else {
            deadline
        };
        self.call_and_track(op, ino, deadline, shortened, retry, f)
            .await
    }

    /// Call syncd for durability (`fsync`, `fsyncdir`): like
    /// [`SyncdClient::call`], but the deadline is never shortened by the
    /// stalled mode. A program that asked for durability waits for it
    /// (up to its own, longer deadline): sqlite and git treat a failed
    /// `fsync` as fatal, so failing it fast because an earlier, unrelated
    /// call was slow would turn one slow moment into a broken database.
    pub async fn call_durable<T, F, Fut>(
        &self,
        op: &'static str,
        ino: u64,
        deadline: Instant,
        f: F,
    ) -> Result<T, CallError>
    where
        F: Fn(Arc<Connection>, Context) -> Fut,
        Fut: Future<Output = Result<Result<T, FsError>, RpcError>>,
    {
        self.call_and_track(op, ino, deadline, deadline, Retry::Idempotent, f)
            .await
    }

    /// Make the call until `wait_until` and keep [`Health`] up to date; a
    /// probe started by a miss gets what was left of `deadline`.
    async fn call_and_track<T, F, Fut>(
        &self,
        op: &'static str,
        ino: u64,
        deadline: Instant,
        wait_until: Instant,
        retry: Retry,
        f: F,
    ) -> Result<T, CallError>
    where
        F: Fn(Arc<Connection>, Context) -> Fut,
        Fut: Future<Output = Result<Result<T, FsError>, RpcError>>,
    {
        let full = deadline.saturating_duration_since(Instant::now());
        let start = Instant::now();
        let r = self.call_until(op, ino, wait_until, retry, f).await;
        record(op, start, &r);
        match &r {
            Err(CallError::Deadline { .. }) => {
                if self.health.set_stalled(true) {
                    tracing::warn!(
                        "keibi-syncd is not answering; operations that need it fail fast until it does"
                    );
                    tokio::spawn(self.clone().probe_until_answered(full));
                }
            }
            _ => self.answered(),
        }
        r
    }

    /// Call syncd like [`SyncdClient::call`] but outside the stalled
    /// bookkeeping: the full deadline always, a miss does not mark syncd
    /// stalled and is not logged here. For calls whose wait says nothing
    /// about syncd's health: the invalidation long poll (it waits by
    /// design) and `fetch_range` (it waits on a peer).
    pub async fn call_untracked<T, F, Fut>(
        &self,
        op: &'static str,
        ino: u64,
        deadline: Instant,
        retry: Retry,
        f: F,
    ) -> Result<T, CallError>
    where
        F: Fn(Arc<Connection>, Context) -> Fut,
        Fut: Future<Output = Result<Result<T, FsError>, RpcError>>,
    {
        let start = Instant::now();
        let r = self.call_until(op, ino, deadline, retry, f).await;
        record(op, start, &r);
        r
    }

    /// The generation of the live connection, if there is one.
    pub fn current_generation(&self) -> Option<u64> {
        self.rx.borrow().as_ref().map(|c| c.generation)
    }

    /// Where syncd's invalidation stream stood when this process first
    /// connected, if the first connection is the live one: waits up to
    /// `wait` for a connection.
    pub async fn first_stream_position(&self, wait: Duration) -> Option<StreamPosition> {
        let conn = tokio::time::timeout(wait, self.connection(1))
            .await
            .ok()??;
        if conn.generation == 1 {
            conn.stream_start
        } else {
            None
        }
    }

    /// The live connection, if there is one.
    pub fn current_connection(&self) -> Option<Arc<Connection>> {
        self.rx.borrow().clone()
    }

    /// Name the handle table whose handles, and the cache whose referenced
    /// inodes, a reconnect reports to syncd. Set once, before the
    /// connector starts.
    pub fn report_handles_of(&self, table: Arc<HandleTable>, cache: Arc<AttrCache>) {
        let _ = self.held.set((table, cache));
    }

    fn answered(&self) {
        if self.health.set_stalled(false) {
            tracing::info!("keibi-syncd answers again");
        }
    }

    /// While syncd is marked stalled, ask it something cheap with a full
    /// deadline until it answers.
    async fn probe_until_answered(self, deadline: Duration) {
        while self.health.stalled() {
            let until = Instant::now() + deadline.max(MIN_PROBE_DEADLINE);
            let r = self
                .call_until("probe", 1, until, Retry::Idempotent, |c, ctx| async move {
                    c.client.getattr(ctx, ipc_schema::Ino::ROOT).await
                })
                .await;
            if !matches!(r, Err(CallError::Deadline { .. })) {
                self.answered();
                return;
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    async fn call_until<T, F, Fut>(
        &self,
        op: &'static str,
        ino: u64,
        deadline: Instant,
        retry: Retry,
        f: F,
    ) -> Result<T, CallError>
    where
        F: Fn(Arc<Connection>, Context) -> Fut,
        Fut: Future<Output = Result<Result<T, FsError>, RpcError>>,
    {
        let start = Instant::now();
        let missed = || {
            let waited = start.elapsed();
            if !QUIET_OPS.contains(&op) {
                tracing::warn!(
                    op,
                    ino,
                    waited_ms = waited.as_millis() as u64,
                    "deadline passed: keibi-syncd did not answer"
                );
            }
            CallError::Deadline { waited }
        };
        let mut min_generation = 0;
        loop {
            let conn =
                match tokio::time::timeout_at(deadline, self.connection(min_generation)).await {
                    Err(_) => return Err(missed()),
                    Ok(None) => {
                        return Err(CallError::Fs(fs_err!(
                            EIO,
                            "{op}: the connection to keibi-syncd was shut down"
                        )));
                    }
                    Ok(Some(c)) => c,
                };
            let mut ctx = tarpc::context::current();
            ctx.deadline = deadline.into_std();
            match tokio::time::timeout_at(deadline, f(conn.clone(), ctx)).await {
                Err(_) | Ok(Err(RpcError::DeadlineExceeded)) => return Err(missed()),
                Ok(Ok(Ok(v))) => return Ok(v),
                Ok(Ok(Err(e))) => return Err(CallError::Fs(e)),
                Ok(Err(RpcError::Server(e))) => {
                    return Err(CallError::Fs(fs_err!(
                        EIO,
                        "{op}: keibi-syncd aborted the request: {e}"
                    )));
                }
                Ok(Err(e)) => {
                    conn.mark_broken();
                    let unsent = matches!(e, RpcError::Send(_));
                    if retry == Retry::Idempotent || unsent {
                        tracing::debug!(op, ino, error = %e, "connection to keibi-syncd broke; retrying on a new one");
                        min_generation = conn.generation + 1;
                        continue;
                    }
                    return Err(CallError::Fs(fs_err!(
                        EIO,
                        "{op}: the connection to keibi-syncd broke during the call: {e}"
                    )));
                }
            }
        }
    }

    /// The current connection, once one of at least `min_generation` is up.
    /// `None` when the connector is gone.
    async fn connection(&self, min_generation: u64) -> Option<Arc<Connection>> {
        let mut rx = self.rx.clone();
        let got = rx
            .wait_for(|c| c.as_ref().is_some_and(|c| c.generation >= min_generation))
            .await
            .ok()?;
        got.as_ref().cloned()
    }
}

impl Connector {
    /// Run the connect/reconnect loop on `rt` for the life of the process.
    pub fn spawn(self, rt: &tokio::runtime::Handle) {
        rt.spawn(self.run());
    }

    async fn run(self) {
        let mut backoff = MIN_BACKOFF;
        let mut generation = 0u64;
        let mut failures = 0u32;
        loop {
            let attempt = tokio::time::timeout(
                CONNECT_TIMEOUT,
                connect_once(&self.config, generation > 0, generation + 1, &self.held),
            )
            .await
            .unwrap_or_else(|_| Err("the connection attempt timed out".to_string()));
            match attempt {
                Ok(conn) => {
                    generation = conn.generation;
                    failures = 0;
                    backoff = MIN_BACKOFF;
                    tracing::info!(
                        socket = %self.config.socket.display(),
                        syncd_uid = conn.syncd_uid,
                        generation,
                        "connected to keibi-syncd"
                    );
                    let conn = Arc::new(conn);
                    self.health.set_stalled(false);
                    self.tx.send_replace(Some(conn.clone()));
                    tokio::select! {
                        _ = conn.inbox.closed() => {}
                        _ = conn.broken.notified() => {}
                    }
                    self.tx.send_replace(None);
                    tracing::warn!("lost the connection to keibi-syncd; reconnecting");
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(
                            socket = %self.config.socket.display(),
                            error = %e,
                            "cannot reach keibi-syncd; retrying in the background"
                        );
                    } else {
                        tracing::debug!(error = %e, failures, "cannot reach keibi-syncd");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

async fn connect_once(
    config: &ConnectConfig,
    reconnect: bool,
    generation: u64,
    held: &HeldSource,
) -> Result<Connection, String> {
    let (mine, theirs) =
        fdpass::channel_pair().map_err(|e| format!("cannot make the fd channel: {e}"))?;
    let inbox =
        FdInbox::spawn_reader(mine).map_err(|e| format!("cannot start the fd reader: {e}"))?;
    let (client, syncd_uid) = transport::connect_filesystem_with_peer_uid(&config.socket, theirs)
        .await
        .map_err(|e| e.to_string())?;
    // Report passthrough as the kernel answered it in `init`, which runs
    // on the session thread at the same time as this first connection.
    config.passthrough.initialized_within(CONNECT_TIMEOUT).await;
    let info = MountInfo {
        mountpoint: config.mountpoint.clone(),
        pid: std::process::id(),
        passthrough: config.passthrough.active(),
        reconnect,
    };
    // Read now: no connection is published, so no open can be added to
    // the table unseen (an open checks the connection after counting its
    // handle, see `Keibi::receive_fd`), and no entry from syncd can reach
    // the kernel. A fresh mount holds nothing. (A forget queued meanwhile
    // is sent on the new connection after this.)
    let (held, referenced) = match (reconnect, held.get()) {
        (true, Some((table, cache))) => (table.held(), cache.referenced_inos()),
        _ => (Vec::new(), Vec::new()),
    };
    client
        .register_mount(
            transport::context_with_timeout(CONNECT_TIMEOUT),
            info,
            held,
            referenced,
        )
        .await
        .map_err(|e| format!("register_mount: {e}"))?
        .map_err(|e| format!("register_mount refused: {e}"))?;
    // The first connection of this process: syncd has answered it nothing
    // yet (no connection is published), so the kernel and mountd cache
    // nothing of syncd's, and every change from here on is in the stream
    // after this position. Starting there spares the `Inval::All` a reader
    // new to syncd gets, which would drop what the mount cached in its
    // first moments. A syncd that cannot say (an error, an older syncd)
    // leaves the stream to start with that `All`.
    let stream_start = if reconnect {
        None
    } else {
        match client
            .changes(transport::context_with_timeout(CONNECT_TIMEOUT), 0, 0, 0)
            .await
        {
            Ok(Ok(batch)) => Some(StreamPosition {
                epoch: batch.epoch,
                after: batch.next,
            }),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "no invalidation stream position; the stream starts with everything");
                None
            }
            Err(e) => return Err(format!("changes: {e}")),
        }
    };
    Ok(Connection {
        client,
        inbox,
        syncd_uid,
        stream_start,
        generation,
        broken: Notify::new(),
    })
}
