//! The peer manager: which peers are paired, which are connected, and the
//! one place connections are admitted.
//!
//! It keeps an in-memory table of the paired peers (loaded from the store's
//! `peers` tree at start, changed by `peer add` / `peer remove`), and for
//! each peer its connection state: the live connection (a
//! [`PeerConn`] from the multiplexer), the dialer's state (connecting,
//! waiting until the next attempt), the last error. Connections come from
//! two places, both on the network runtime: the dialer of each peer that
//! has an address ([`super::dial`]) and the listeners ([`super::listen`]);
//! both hand the finished handshake to [`Manager::register`].
//!
//! The duplicate rule. Two machines that dial each other at the same time
//! end with two connections. Each side keeps the connection whose
//! initiator has the smaller X25519 public key and closes the other with
//! CLOSE "duplicate connection"; both sides see the same two initiators,
//! so both keep the same connection, whatever order they learn of them in
//! ([`keep_new`]). Two connections with the same initiator mean the
//! initiator dialed again because it lost the first (a restart, a network
//! change): the new one is kept.
//!
//! Removal. `peer remove` drops the peer from the table (so the handshake's
//! `is_paired` refuses it from then on), aborts its dialer, closes its
//! connection with CLOSE "unpaired", and removes it from the store.
//!
//! Last seen. The time data last arrived from a peer is written to the
//! store when its connection ends and every [`LAST_SEEN_EVERY`] while it is
//! connected, so `peer list` shows it across restarts.
//!
//! Locks: `admin` (a `std::sync::Mutex<()>`) serialises `add` and `remove`
//! over the store write and the table update; it is taken only on the
//! blocking pool, never on a runtime thread. `table` is taken after
//! `admin` when both are held, is never held across an `.await`, a store
//! call or a network call, and nothing else is locked while it is held.

use super::conn::{self, ConnConfig, FrameTx, PeerConn, PeerLabel};
use super::msg::{MAX_CHUNK, Request, bulk_pattern_byte};
use super::requests::RequestHandler;
use crate::channel::{ChannelConfig, Established, LocalKeys, SecureSender};
use crate::store::peers::{PeerRecord, Peers, parse_addr, parse_fingerprint};
use ipc_schema::{BenchReport, PeerCtlError, PeerInfo, PeerOpInFlight};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

/// How often the last-seen times of connected peers are written.
pub const LAST_SEEN_EVERY: Duration = Duration::from_secs(60);

/// The longest name `peer add --name` accepts, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// The most streams `peer bench` runs at once.
pub const MAX_BENCH_STREAMS: u32 = 64;

/// What the manager needs from the configuration.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Handshake bound and rekey limits.
    pub channel: ChannelConfig,
    /// Keepalive and flow control of each connection.
    pub conn: ConnConfig,
    /// The longest wait between two dials.
    pub reconnect_max: Duration,
    /// `peer_timeout`: the bound on name resolution, connect and handshake.
    pub peer_timeout: Duration,
}

/// Who dialed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// This syncd.
    Outbound,
    /// The peer.
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Of two live connections with one peer, whether the newer one stays
/// (see the module doc). Arguments: the X25519 public key of each one's
/// initiator.
pub fn keep_new(old_initiator: &[u8; 32], new_initiator: &[u8; 32]) -> bool {
    if old_initiator == new_initiator {
        // The same side dialed again: it lost the old one.
        true
    } else {
        new_initiator < old_initiator
    }
}

/// Rekeys of a connection's sending direction, read after each frame
/// (the sender itself moves into the connection's writer task).
#[derive(Default)]
struct Counters {
    tx_rekeys: AtomicU64,
}

/// The sending half with its rekey count published.
struct CountedTx {
    inner: SecureSender,
    counters: Arc<Counters>,
}

impl FrameTx for CountedTx {
    async fn send(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let r = FrameTx::send(&mut self.inner, payload).await;
        self.counters
            .tx_rekeys
            .store(self.inner.rekeys(), Ordering::Relaxed);
        r
    }

    async fn close(&mut self, reason: &str) -> std::io::Result<()> {
        FrameTx::close(&mut self.inner, reason).await
    }
}

/// The receiving half with its rekey count published.
struct CountedRx {
    inner: crate::channel::SecureReceiver,
    counters: Arc<RxCounters>,
}

#[derive(Default)]
struct RxCounters {
    rx_rekeys: AtomicU64,
}

impl conn::FrameRx for CountedRx {
    async fn recv(&mut self) -> std::io::Result<bytes::Bytes> {
        let r = conn::FrameRx::recv(&mut self.inner).await;
        self.counters
            .rx_rekeys
            .store(self.inner.rekeys(), Ordering::Relaxed);
        r
    }
}

/// A live connection.
#[derive(Clone)]
struct Live {
    id: u64,
    conn: PeerConn,
    direction: Direction,
    remote_addr: SocketAddr,
    version: u32,
    initiator: [u8; 32],
    tx: Arc<Counters>,
    rx: Arc<RxCounters>,
}

impl Live {
    fn rekeys(&self) -> u64 {
        self.tx.tx_rekeys.load(Ordering::Relaxed) + self.rx.rx_rekeys.load(Ordering::Relaxed)
    }
}

/// What the dialer is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialing {
    /// Not dialing (no address, or connected).
    No,
    /// Resolving, connecting or in the handshake.
    Connecting,
    /// Backing off until then.
    Waiting(Instant),
}

/// One paired peer.
struct Entry {
    name: Option<String>,
    addr: Option<String>,
    last_seen_unix_ms: Option<u64>,
    live: Option<Live>,
    dialing: Dialing,
    last_error: Option<String>,
    dialer: Option<AbortHandle>,
}

impl Entry {
    fn from_record(rec: PeerRecord) -> Entry {
        Entry {
            name: rec.name,
            addr: rec.addr,
            last_seen_unix_ms: rec.last_seen_unix_ms,
            live: None,
            dialing: Dialing::No,
            last_error: None,
            dialer: None,
        }
    }

    fn info(&self, fingerprint: &str) -> PeerInfo {
        let now = Instant::now();
        let (state, next_attempt_ms) = match (&self.live, self.dialing) {
            (Some(_), _) => ("connected", None),
            (None, Dialing::Connecting) => ("connecting", None),
            (None, Dialing::Waiting(at)) => (
                "waiting",
                Some(at.saturating_duration_since(now).as_millis() as u64),
            ),
            (None, Dialing::No) if self.addr.is_some() => ("connecting", None),
            (None, Dialing::No) => ("idle", None),
        };
        let mut info = PeerInfo {
            fingerprint: fingerprint.to_string(),
            name: self.name.clone(),
            addr: self.addr.clone(),
            state: state.into(),
            direction: None,
            remote_addr: None,
            last_seen_unix_ms: self.last_seen_unix_ms,
            rtt_us: None,
            bytes_sent: 0,
            bytes_received: 0,
            protocol_version: None,
            rekeys: 0,
            last_error: self.last_error.clone(),
            next_attempt_ms,
        };
        if let Some(live) = &self.live {
            let stats = live.conn.stats();
            info.direction = Some(live.direction.as_str().into());
            info.remote_addr = Some(live.remote_addr.to_string());
            info.last_seen_unix_ms = Some(unix_ms_at(stats.last_received));
            info.rtt_us = stats.rtt.map(|d| d.as_micros() as u64);
            info.bytes_sent = stats.bytes_sent;
            info.bytes_received = stats.bytes_received;
            info.protocol_version = Some(live.version);
            info.rekeys = live.rekeys();
        }
        info
    }
}

/// The peer manager (see the module doc). Shared as `Arc<Manager>`.
pub struct Manager {
    keys: LocalKeys,
    my_public: [u8; 32],
    my_fingerprint: String,
    store: Peers,
    net: Handle,
    cfg: ManagerConfig,
    handler: Arc<dyn RequestHandler>,
    /// Serialises add and remove (see the module doc for the lock order).
    admin: Mutex<()>,
    /// The paired peers, by fingerprint (a leaf lock, see the module doc).
    table: Mutex<BTreeMap<String, Entry>>,
    next_conn: AtomicU64,
}

impl Manager {
    /// Load the paired peers from `store` and start dialing those with an
    /// address, on `net`. Blocks on the store (call it before serving).
    pub fn start(
        keys: LocalKeys,
        store: Peers,
        net: Handle,
        cfg: ManagerConfig,
        handler: Arc<dyn RequestHandler>,
    ) -> Result<Arc<Manager>, String> {
        let my_public = keys.public();
        let records = store.list().map_err(|e| e.to_string())?;
        let table = records
            .into_iter()
            .map(|(fp, rec)| (fp, Entry::from_record(rec)))
            .collect();
        let manager = Arc::new(Manager {
            keys,
            my_public,
            my_fingerprint: crate::identity::fingerprint_of(&my_public),
            store,
            net,
            cfg,
            handler,
            admin: Mutex::new(()),
            table: Mutex::new(table),
            next_conn: AtomicU64::new(1),
        });
        {
            let mut table = manager.lock();
            for (fp, entry) in table.iter_mut() {
                if let Some(addr) = &entry.addr {
                    entry.dialer = Some(manager.spawn_dialer(fp.clone(), addr.clone()));
                }
            }
            tracing::info!(peers = table.len(), "paired peers loaded");
        }
        manager
            .net
            .spawn(write_last_seen_now_and_then(Arc::downgrade(&manager)));
        Ok(manager)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn_dialer(self: &Arc<Self>, fingerprint: String, addr: String) -> AbortHandle {
        self.net
            .spawn(super::dial::run(self.clone(), fingerprint, addr))
            .abort_handle()
    }

    /// This syncd's static keys, for the handshakes.
    pub fn keys(&self) -> &LocalKeys {
        &self.keys
    }

    /// Handshake bound and rekey limits.
    pub fn channel_config(&self) -> &ChannelConfig {
        &self.cfg.channel
    }

    /// The longest wait between two dials.
    pub fn reconnect_max(&self) -> Duration {
        self.cfg.reconnect_max
    }

    /// `peer_timeout`.
    pub fn peer_timeout(&self) -> Duration {
        self.cfg.peer_timeout
    }

    /// Whether `fingerprint` is paired (the responder's check).
    pub fn is_paired(&self, fingerprint: &str) -> bool {
        self.lock().contains_key(fingerprint)
    }

    /// For the dialer: `None` when the peer was removed, `Some(Some(conn))`
    /// while it is connected, `Some(None)` when it is not.
    pub fn live_conn(&self, fingerprint: &str) -> Option<Option<PeerConn>> {
        self.lock()
            .get(fingerprint)
            .map(|e| e.live.as_ref().map(|l| l.conn.clone()))
    }

    /// The dialer started an attempt.
    pub fn set_connecting(&self, fingerprint: &str) {
        if let Some(e) = self.lock().get_mut(fingerprint) {
            e.dialing = Dialing::Connecting;
        }
    }

    /// The dialer waits `wait` before the next attempt; `error` is why the
    /// last one failed (`None`: the connection ended, its reason is
    /// already recorded).
    pub fn set_waiting(&self, fingerprint: &str, error: Option<String>, wait: Duration) {
        if let Some(e) = self.lock().get_mut(fingerprint) {
            e.dialing = Dialing::Waiting(Instant::now() + wait);
            if let Some(error) = error {
                e.last_error = Some(error);
            }
        }
    }

    /// Admit a finished handshake: start the connection, apply the
    /// duplicate rule, and watch for its end. Runs on the network runtime.
    pub fn register(self: &Arc<Self>, est: Established, direction: Direction, remote: SocketAddr) {
        let Established {
            remote_public,
            remote_fingerprint: fingerprint,
            version,
            aead,
            remote_software,
            handshake_time,
            tx,
            rx,
        } = est;
        let initiator = match direction {
            Direction::Outbound => self.my_public,
            Direction::Inbound => remote_public,
        };
        let tx_counters = Arc::new(Counters::default());
        let rx_counters = Arc::new(RxCounters::default());
        let name = self.lock().get(&fingerprint).and_then(|e| e.name.clone());
        let conn = conn::spawn(
            CountedTx {
                inner: tx,
                counters: tx_counters.clone(),
            },
            CountedRx {
                inner: rx,
                counters: rx_counters.clone(),
            },
            PeerLabel {
                fingerprint: fingerprint.clone(),
                name,
            },
            self.handler.clone(),
            self.cfg.conn.clone(),
        );
        let live = Live {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            conn: conn.clone(),
            direction,
            remote_addr: remote,
            version,
            initiator,
            tx: tx_counters,
            rx: rx_counters,
        };
        let id = live.id;
        // Decide under the lock, act after it.
        let (refuse, replaced) = {
            let mut table = self.lock();
            match table.get_mut(&fingerprint) {
                None => (Some("unpaired"), None),
                Some(entry) => match &entry.live {
                    Some(old) if !keep_new(&old.initiator, &initiator) => {
                        (Some("duplicate connection"), None)
                    }
                    _ => {
                        let old = entry.live.replace(live);
                        entry.dialing = Dialing::No;
                        entry.last_error = None;
                        (None, old)
                    }
                },
            }
        };
        if let Some(reason) = refuse {
            tracing::info!(peer = %fingerprint, %remote, direction = direction.as_str(), reason, "peer connection closed at once");
            conn.close(reason);
            return;
        }
        if let Some(old) = replaced {
            tracing::info!(peer = %fingerprint, old_remote = %old.remote_addr, "closing the older of two connections with the peer");
            old.conn.close("duplicate connection");
        }
        tracing::info!(
            peer = %fingerprint,
            %remote,
            direction = direction.as_str(),
            version,
            aead = aead.name(),
            software = %remote_software,
            handshake_ms = handshake_time.as_secs_f64() * 1000.0,
            "peer connected"
        );
        self.handler.connected(conn.clone());
        let me = self.clone();
        self.net.spawn(async move {
            let reason = conn.closed().await;
            me.on_closed(&fingerprint, id, reason.to_string(), &conn);
        });
    }

    /// The connection `id` with `fingerprint` ended.
    fn on_closed(&self, fingerprint: &str, id: u64, reason: String, conn: &PeerConn) {
        let seen = unix_ms_at(conn.stats().last_received);
        let was_live = {
            let mut table = self.lock();
            match table.get_mut(fingerprint) {
                Some(e) if e.live.as_ref().is_some_and(|l| l.id == id) => {
                    e.live = None;
                    e.last_error = Some(reason.clone());
                    e.last_seen_unix_ms = Some(seen);
                    true
                }
                _ => false,
            }
        };
        if was_live {
            tracing::info!(peer = %fingerprint, %reason, "peer disconnected");
            let store = self.store.clone();
            let fp = fingerprint.to_string();
            self.net.spawn_blocking(move || {
                if let Err(e) = store.set_last_seen(&fp, seen) {
                    tracing::warn!(peer = %fp, error = %e, "cannot record when the peer was last seen");
                }
            });
        }
    }

    /// `peer add` (see `Control::peer_add`). Runs the store write on the
    /// blocking pool of the caller's runtime.
    pub async fn add(
        self: &Arc<Self>,
        fingerprint: &str,
        addr: Option<String>,
        name: Option<String>,
    ) -> Result<PeerInfo, PeerCtlError> {
        let fp = parse_fingerprint(fingerprint).map_err(PeerCtlError::BadFingerprint)?;
        if fp == self.my_fingerprint {
            return Err(PeerCtlError::IsSelf);
        }
        let addr = match addr {
            Some(a) => Some(
                parse_addr(&a)
                    .map_err(PeerCtlError::BadAddress)?
                    .to_string(),
            ),
            None => None,
        };
        let name = match name.map(|n| n.trim().to_string()) {
            Some(n) if n.is_empty() => None,
            Some(n) if n.chars().count() > MAX_NAME_CHARS || n.chars().any(char::is_control) => {
                return Err(PeerCtlError::Failed(format!(
                    "name {n:?}: at most {MAX_NAME_CHARS} characters, no control characters"
                )));
            }
            other => other,
        };
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.add_blocking(fp, addr, name))
            .await
            .map_err(|e| PeerCtlError::Failed(format!("peer add failed: {e}")))?
    }

    fn add_blocking(
        self: &Arc<Self>,
        fp: String,
        addr: Option<String>,
        name: Option<String>,
    ) -> Result<PeerInfo, PeerCtlError> {
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let rec = self
            .store
            .add(&fp, addr.clone(), name.clone(), unix_ms_now())
            .map_err(|e| PeerCtlError::Failed(e.to_string()))?;
        let mut table = self.lock();
        let entry = table
            .entry(fp.clone())
            .or_insert_with(|| Entry::from_record(rec.clone()));
        entry.name = name;
        // A fresh dialer: a new address is dialed at once, and an add
        // resets the backoff of an unreachable peer.
        if let Some(d) = entry.dialer.take() {
            d.abort();
        }
        entry.addr = addr.clone();
        entry.dialing = Dialing::No;
        if let Some(a) = addr {
            entry.dialer = Some(self.spawn_dialer(fp.clone(), a));
        }
        tracing::info!(peer = %fp, addr = ?entry.addr, name = ?entry.name, "peer added");
        Ok(entry.info(&fp))
    }

    /// `peer remove` (see `Control::peer_remove`).
    pub async fn remove(self: &Arc<Self>, fingerprint: &str) -> Result<PeerInfo, PeerCtlError> {
        let fp = parse_fingerprint(fingerprint).map_err(PeerCtlError::BadFingerprint)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.remove_blocking(fp))
            .await
            .map_err(|e| PeerCtlError::Failed(format!("peer remove failed: {e}")))?
    }

    fn remove_blocking(&self, fp: String) -> Result<PeerInfo, PeerCtlError> {
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        // Out of the table first: from now on the handshake refuses it.
        let Some(mut entry) = self.lock().remove(&fp) else {
            return Err(PeerCtlError::UnknownPeer(fp));
        };
        let info = entry.info(&fp);
        if let Some(d) = entry.dialer.take() {
            d.abort();
        }
        if let Some(live) = entry.live.take() {
            live.conn.close("unpaired");
        }
        tracing::info!(peer = %fp, "peer removed; its connection is closed");
        self.store
            .remove(&fp)
            .map_err(|e| PeerCtlError::Failed(e.to_string()))?;
        Ok(info)
    }

    /// `peer list`: every paired peer, by fingerprint.
    pub fn list(&self) -> Vec<PeerInfo> {
        self.lock().iter().map(|(fp, e)| e.info(fp)).collect()
    }

    /// The peer requests in flight on every connection.
    pub fn ops(&self) -> Vec<PeerOpInFlight> {
        let conns: Vec<(String, Option<String>, PeerConn)> = self
            .lock()
            .iter()
            .filter_map(|(fp, e)| {
                e.live
                    .as_ref()
                    .map(|l| (fp.clone(), e.name.clone(), l.conn.clone()))
            })
            .collect();
        let mut out: Vec<PeerOpInFlight> = conns
            .into_iter()
            .flat_map(|(fp, name, conn)| {
                conn.in_flight().into_iter().map(move |op| PeerOpInFlight {
                    peer: fp.clone(),
                    name: name.clone(),
                    request: op.request,
                    outgoing: op.outgoing,
                    age_ms: op.age.as_millis() as u64,
                    bytes: op.bytes,
                })
            })
            .collect();
        out.sort_by_key(|op| std::cmp::Reverse(op.age_ms));
        out
    }

    /// `peer bench`: `streams` concurrent `Bulk` requests totalling
    /// `bytes`, run on the network runtime and bounded by `limit`.
    pub async fn bench(
        &self,
        fingerprint: &str,
        bytes: u64,
        streams: u32,
        limit: Duration,
    ) -> Result<BenchReport, PeerCtlError> {
        let fp = parse_fingerprint(fingerprint).map_err(PeerCtlError::BadFingerprint)?;
        if bytes == 0 || streams == 0 || streams > MAX_BENCH_STREAMS {
            return Err(PeerCtlError::Failed(format!(
                "bench: bytes must be at least 1 and streams from 1 to {MAX_BENCH_STREAMS}"
            )));
        }
        let live = match self.lock().get(&fp) {
            None => return Err(PeerCtlError::UnknownPeer(fp)),
            Some(Entry { live: None, .. }) => return Err(PeerCtlError::NotConnected(fp)),
            Some(Entry {
                live: Some(live), ..
            }) => live.clone(),
        };
        let run = self.net.spawn(bench_on(live, bytes, streams, limit));
        run.await
            .map_err(|e| PeerCtlError::Failed(format!("bench failed: {e}")))?
    }

    /// At shutdown: close every connection with `reason` and write the
    /// last-seen times (blocks on the store).
    pub fn shutdown(&self, reason: &str) {
        let live: Vec<(String, Live)> = self
            .lock()
            .iter_mut()
            .filter_map(|(fp, e)| e.live.take().map(|l| (fp.clone(), l)))
            .collect();
        for (fp, l) in live {
            let seen = unix_ms_at(l.conn.stats().last_received);
            l.conn.close(reason);
            if let Err(e) = self.store.set_last_seen(&fp, seen) {
                tracing::warn!(peer = %fp, error = %e, "cannot record when the peer was last seen");
            }
        }
    }
}

/// The bench itself, on the network runtime.
async fn bench_on(
    live: Live,
    bytes: u64,
    streams: u32,
    limit: Duration,
) -> Result<BenchReport, PeerCtlError> {
    let rekeys_before = live.rekeys();
    let per = bytes / u64::from(streams);
    let first = per + bytes % u64::from(streams);
    let started = Instant::now();
    let work = futures::future::try_join_all((0..streams).map(|i| {
        let conn = live.conn.clone();
        let want = if i == 0 { first } else { per };
        async move {
            if want == 0 {
                return Ok(0u64);
            }
            let mut s = conn
                .stream(Request::Bulk { bytes: want }, limit)
                .await
                .map_err(|e| format!("stream {i}: {e}"))?;
            let mut got = 0u64;
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(|e| format!("stream {i}: {e}"))?;
                if let Some(at) = pattern_mismatch(got, &chunk) {
                    return Err(format!(
                        "stream {i}: byte {at} is not the Bulk pattern (data lost, repeated or reordered)"
                    ));
                }
                got += chunk.len() as u64;
            }
            if got != want {
                return Err(format!("stream {i}: asked for {want} bytes, got {got}"));
            }
            Ok(got)
        }
    }));
    let got: u64 = match tokio::time::timeout(limit, work).await {
        Ok(Ok(v)) => v.into_iter().sum(),
        Ok(Err(e)) => return Err(PeerCtlError::Failed(format!("bench: {e}"))),
        Err(_) => {
            return Err(PeerCtlError::Failed(format!(
                "bench: not done within {limit:?}"
            )));
        }
    };
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    Ok(BenchReport {
        bytes: got,
        streams,
        seconds,
        mb_per_s: got as f64 / seconds / 1e6,
        rekeys: live.rekeys() - rekeys_before,
    })
}

/// Where `chunk`, received at `offset` of a `Bulk` stream, first differs
/// from the pattern ([`bulk_pattern_byte`]), as an offset in the stream;
/// `None` when every byte is right. Compared slice by slice against one
/// precomputed period-aligned buffer, so checking costs about a `memcmp`.
fn pattern_mismatch(offset: u64, chunk: &[u8]) -> Option<u64> {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let pattern = PATTERN.get_or_init(|| {
        (0..(MAX_CHUNK + 251) as u64)
            .map(bulk_pattern_byte)
            .collect()
    });
    for (n, piece) in chunk.chunks(MAX_CHUNK).enumerate() {
        let start = offset + (n * MAX_CHUNK) as u64;
        let phase = (start % 251) as usize;
        let want = &pattern[phase..phase + piece.len()];
        if piece != want {
            let i = piece.iter().zip(want).position(|(a, b)| a != b)?;
            return Some(start + i as u64);
        }
    }
    None
}

/// Every [`LAST_SEEN_EVERY`], write the last-seen time of each connected
/// peer (on the blocking pool). Ends with the manager.
async fn write_last_seen_now_and_then(manager: std::sync::Weak<Manager>) {
    let mut tick = tokio::time::interval(LAST_SEEN_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(m) = manager.upgrade() else { return };
        let seen: Vec<(String, u64)> = {
            let mut table = m.lock();
            table
                .iter_mut()
                .filter_map(|(fp, e)| {
                    let l = e.live.as_ref()?;
                    let at = unix_ms_at(l.conn.stats().last_received);
                    e.last_seen_unix_ms = Some(at);
                    Some((fp.clone(), at))
                })
                .collect()
        };
        let store = m.store.clone();
        drop(m);
        let _ = tokio::task::spawn_blocking(move || {
            for (fp, at) in seen {
                if let Err(e) = store.set_last_seen(&fp, at) {
                    tracing::warn!(peer = %fp, error = %e, "cannot record when the peer was last seen");
                }
            }
        })
        .await;
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The Unix time (ms) of a monotonic instant in the past.
fn unix_ms_at(at: Instant) -> u64 {
    unix_ms_now().saturating_sub(at.elapsed().as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bench_checks_every_byte_of_the_bulk_pattern() {
        use super::pattern_mismatch;
        use crate::peer::msg::{MAX_CHUNK, bulk_pattern_byte};
        let stream: Vec<u8> = (0..3 * MAX_CHUNK as u64 + 77)
            .map(bulk_pattern_byte)
            .collect();
        // Any split into chunks of any size at the right offsets passes.
        for size in [1, 250, 251, 4096, MAX_CHUNK, 2 * MAX_CHUNK + 5] {
            let mut at = 0u64;
            for c in stream.chunks(size) {
                assert_eq!(pattern_mismatch(at, c), None, "size {size} at {at}");
                at += c.len() as u64;
            }
        }
        // A chunk at the wrong offset (lost, repeated or reordered data)
        // or with one wrong byte does not.
        assert_eq!(pattern_mismatch(1, &stream[..1000]), Some(1));
        let mut bad = stream[..5000].to_vec();
        bad[4321] ^= 0x40;
        assert_eq!(pattern_mismatch(0, &bad), Some(4321));
        assert_eq!(
            pattern_mismatch(MAX_CHUNK as u64, &stream[..MAX_CHUNK]),
            Some(MAX_CHUNK as u64),
            "a chunk repeated: MAX_CHUNK is not a multiple of 251"
        );
    }

    use super::*;

    #[test]
    fn info_states_without_a_connection() {
        let rec = |addr: Option<&str>| PeerRecord {
            name: Some("n".into()),
            addr: addr.map(String::from),
            added_unix_ms: 1,
            last_seen_unix_ms: Some(7),
        };
        let idle = Entry::from_record(rec(None)).info("FP");
        assert_eq!(idle.state, "idle");
        assert_eq!(
            (idle.direction, idle.rtt_us, idle.protocol_version),
            (None, None, None)
        );
        assert_eq!(idle.last_seen_unix_ms, Some(7), "kept from the store");
        let mut e = Entry::from_record(rec(Some("h:1")));
        assert_eq!(e.info("FP").state, "connecting", "a dialer is about to run");
        e.dialing = Dialing::Connecting;
        assert_eq!(e.info("FP").state, "connecting");
        e.dialing = Dialing::Waiting(Instant::now() + Duration::from_secs(3));
        e.last_error = Some("refused".into());
        let waiting = e.info("FP");
        assert_eq!(waiting.state, "waiting");
        let next = waiting.next_attempt_ms.expect("next attempt");
        assert!(next <= 3000 && next > 2000, "{next}");
        assert_eq!(waiting.last_error.as_deref(), Some("refused"));
        assert_eq!(
            (waiting.fingerprint.as_str(), waiting.name.as_deref()),
            ("FP", Some("n"))
        );
    }

    #[test]
    fn both_sides_keep_the_connection_of_the_smaller_initiator() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        // On either machine, in either order of arrival, the connection
        // dialed by `a` (the smaller key) stays.
        assert!(!keep_new(&a, &b), "a's first, b's arrives: keep a's");
        assert!(keep_new(&b, &a), "b's first, a's arrives: a's replaces it");
        // The same initiator again: it lost the old one; the new one stays.
        assert!(keep_new(&a, &a));
        assert!(keep_new(&b, &b));
        // The comparison is over the whole key, most significant byte first.
        let mut c = [0u8; 32];
        c[31] = 9;
        let mut d = [0u8; 32];
        d[0] = 1;
        assert!(!keep_new(&c, &d));
        assert!(keep_new(&d, &c));
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod pairing_tests;
