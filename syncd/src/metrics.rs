//! syncd's metrics, served on the opt-in metrics endpoint
//! (`metrics_socket` or `metrics_listen` in the configuration, see
//! [`ipc_schema::metrics_endpoint`]). The families are listed, with what
//! each counts, in `docs/metrics.md`.
//!
//! Two kinds of figures:
//! - **Counted where they happen**, through the hooks below: filesystem
//!   requests and their time ([`ipc_request`], from the service's log
//!   line), bytes each way per peer connection ([`PeerCounters`], next to
//!   the connection's own byte counts), chunks served and fetched per peer
//!   ([`peer_chunk`]), chunk fetches ([`chunk_fetch`]), the chunks a read
//!   found present or had to fetch ([`read_chunks`]), conflicts
//!   ([`conflict`]), local versions committed ([`local_versions`]). Each is an atomic add, or a histogram observation
//!   under `prometheus-client`'s own short leaf lock.
//! - **Read at scrape time** ([`Scraped`]): the store's files and bytes
//!   from the census that `keibictl status` uses (a scan in the blocking
//!   pool, waited for at most [`crate::census::WAIT`], else the last
//!   figures with their age: a scrape never scans the store itself nor
//!   waits on it), and the peers and mounts connected (each a copy under a
//!   leaf lock).
//!
//! Recording is off until [`enable`] is called at start-up, which syncd
//! does only when an endpoint is configured; the hooks then return at once.
//! The endpoint is served on the control runtime, so a scrape answers
//! while the filesystem runtime or the store is stuck (with figures of
//! that age).
//!
//! Labels are bounded: `method` is a filesystem-service method name,
//! `peer` the first 8 characters of a paired peer's fingerprint (as
//! `keibictl peer list` shows it), `direction` `sent` or `received`,
//! `result` one of a few fixed words. No path or inode is ever a label.

use crate::census::Report;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Latency buckets of the filesystem requests, in seconds: 25 µs (a
/// lookup answered from sled's cache) to 10 s (a `fetch_range` waiting on
/// a peer).
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 10.0,
];

/// How many characters of a fingerprint name a peer in labels.
const PEER_LABEL_CHARS: usize = 8;

static METRICS: OnceLock<SyncdMetrics> = OnceLock::new();

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodResult {
    method: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDirection {
    peer: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

/// Which way bytes or chunks went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// To the peer.
    Sent,
    /// From the peer.
    Received,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The figures read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Scraped {
    /// The census (store files and bytes, and their age).
    pub census: Report,
    /// Paired peers.
    pub peers_paired: u64,
    /// Paired peers with a live connection.
    pub peers_connected: u64,
    /// Mounts connected to the filesystem socket.
    pub mounts_connected: u64,
}

/// Every metric of syncd, and the registry that encodes them.
pub struct SyncdMetrics {
    registry: Registry,
    ipc_requests: Family<MethodResult, Counter>,
    ipc_duration: Family<Method, Histogram, fn() -> Histogram>,
    peer_bytes: Family<PeerDirection, Counter>,
    peer_chunks: Family<PeerDirection, Counter>,
    chunk_fetches: Family<Outcome, Counter>,
    read_chunks: Family<Outcome, Counter>,
    conflicts: Counter,
    local_versions: Counter,
    store_files: Gauge,
    store_directories: Gauge,
    store_bytes: Gauge,
    store_age: Gauge<f64, AtomicU64>,
    peers_paired: Gauge,
    peers_connected: Gauge,
    mounts_connected: Gauge,
}

impl Default for SyncdMetrics {
    fn default() -> Self {
        SyncdMetrics::new()
    }
}

impl SyncdMetrics {
    /// Fresh metrics, all zero, registered under `keibi_syncd_`.
    pub fn new() -> SyncdMetrics {
        let mut r = Registry::with_prefix("keibi_syncd");
        let ipc_requests = Family::<MethodResult, Counter>::default();
        r.register(
            "ipc_requests",
            "Filesystem-socket requests from keibi-mountd answered, by method and result (ok or error)",
            ipc_requests.clone(),
        );
        let ipc_duration: Family<Method, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        r.register(
            "ipc_request_duration_seconds",
            "Time syncd took to answer a filesystem-socket request, by method",
            ipc_duration.clone(),
        );
        let peer_bytes = Family::<PeerDirection, Counter>::default();
        r.register(
            "peer_bytes",
            "Peer-channel frame bytes, by peer (first 8 characters of its fingerprint) and direction",
            peer_bytes.clone(),
        );
        let peer_chunks = Family::<PeerDirection, Counter>::default();
        r.register(
            "peer_chunks",
            "File chunks served to a peer (sent) or fetched and verified from it (received)",
            peer_chunks.clone(),
        );
        let chunk_fetches = Family::<Outcome, Counter>::default();
        r.register(
            "chunk_fetches",
            "Chunk fetches ended, by result (ok: written and marked present; failed: no connected peer gave it)",
            chunk_fetches.clone(),
        );
        let read_chunks = Family::<Outcome, Counter>::default();
        r.register(
            "read_chunks",
            "Chunks of a partial file that a read needed, by result (hit: present here; miss: fetched from a peer)",
            read_chunks.clone(),
        );
        let conflicts = Counter::default();
        r.register(
            "conflicts",
            "Conflicts resolved (each keeps the losing version as a conflict copy or undoes a delete)",
            conflicts.clone(),
        );
        let local_versions = Counter::default();
        r.register(
            "local_versions",
            "Versions of local changes committed to the index (each is announced to the peers)",
            local_versions.clone(),
        );
        let store_files = Gauge::default();
        r.register(
            "store_files",
            "Regular files in the share (from the last store census)",
            store_files.clone(),
        );
        let store_directories = Gauge::default();
        r.register(
            "store_directories",
            "Directories in the share, the root included (from the last store census)",
            store_directories.clone(),
        );
        let store_bytes = Gauge::default();
        r.register(
            "store_bytes",
            "Sum of the regular files' sizes (from the last store census)",
            store_bytes.clone(),
        );
        let store_age = Gauge::<f64, AtomicU64>::default();
        r.register(
            "store_census_age_seconds",
            "Age of the store census the store_* figures come from (-1: none finished yet)",
            store_age.clone(),
        );
        let peers_paired = Gauge::default();
        r.register("peers_paired", "Paired peers", peers_paired.clone());
        let peers_connected = Gauge::default();
        r.register(
            "peers_connected",
            "Paired peers with a live connection",
            peers_connected.clone(),
        );
        let mounts_connected = Gauge::default();
        r.register(
            "mounts_connected",
            "keibi-mountd instances connected to the filesystem socket",
            mounts_connected.clone(),
        );
        // Series with fixed labels exist from the start (at 0), so a
        // scraper sees every family of a fresh syncd; those labelled by
        // method or peer appear at their first use.
        for result in ["ok", "failed"] {
            drop(chunk_fetches.get_or_create(&Outcome { result }));
        }
        for result in ["hit", "miss"] {
            drop(read_chunks.get_or_create(&Outcome { result }));
        }
        SyncdMetrics {
            registry: r,
            ipc_requests,
            ipc_duration,
            peer_bytes,
            peer_chunks,
            chunk_fetches,
            read_chunks,
            conflicts,
            local_versions,
            store_files,
            store_directories,
            store_bytes,
            store_age,
            peers_paired,
            peers_connected,
            mounts_connected,
        }
    }

    fn ipc_request(&self, method: &'static str, took: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.ipc_requests
            .get_or_create(&MethodResult { method, result })
            .inc();
        self.ipc_duration
            .get_or_create(&Method { method })
            .observe(took.as_secs_f64());
    }

    fn peer_counter(
        &self,
        family: &Family<PeerDirection, Counter>,
        fp: &str,
        d: Direction,
    ) -> Counter {
        family.get_or_create_owned(&PeerDirection {
            peer: peer_label(fp),
            direction: d.label(),
        })
    }

    /// The OpenMetrics text of every metric, with `scraped` as the
    /// scrape-time figures.
    pub fn render(&self, scraped: &Scraped) -> String {
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let counts = &scraped.census.figures.counts;
        self.store_files.set(gauge(counts.files));
        self.store_directories.set(gauge(counts.directories));
        self.store_bytes.set(gauge(counts.bytes));
        self.store_age
            .set(scraped.census.age.map_or(-1.0, |a| a.as_secs_f64()));
        self.peers_paired.set(gauge(scraped.peers_paired));
        self.peers_connected.set(gauge(scraped.peers_connected));
        self.mounts_connected.set(gauge(scraped.mounts_connected));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a `fmt::Write` error, which a String never gives.
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// A peer's label: the first [`PEER_LABEL_CHARS`] characters of its
/// fingerprint.
fn peer_label(fingerprint: &str) -> String {
    fingerprint.chars().take(PEER_LABEL_CHARS).collect()
}

/// Start recording (once, at start-up, when an endpoint is configured);
/// the metrics to render.
pub fn enable() -> &'static SyncdMetrics {
    METRICS.get_or_init(SyncdMetrics::new)
}

/// A filesystem request `method` was answered after `took`.
pub fn ipc_request(method: &'static str, took: Duration, ok: bool) {
    if let Some(m) = METRICS.get() {
        m.ipc_request(method, took, ok);
    }
}

/// The byte counters of one peer connection, taken once when it starts
/// (so a frame costs an atomic add, not a label lookup).
#[derive(Clone, Debug)]
pub struct PeerCounters {
    sent: Counter,
    received: Counter,
}

impl PeerCounters {
    /// The counters of the peer with `fingerprint`; `None` while metrics
    /// are off.
    pub fn of(fingerprint: &str) -> Option<PeerCounters> {
        let m = METRICS.get()?;
        // The peer's chunk series too, at 0 until its first chunk.
        for d in [Direction::Sent, Direction::Received] {
            m.peer_counter(&m.peer_chunks, fingerprint, d);
        }
        Some(PeerCounters {
            sent: m.peer_counter(&m.peer_bytes, fingerprint, Direction::Sent),
            received: m.peer_counter(&m.peer_bytes, fingerprint, Direction::Received),
        })
    }

    /// `n` bytes went `direction`.
    pub fn add(&self, direction: Direction, n: u64) {
        match direction {
            Direction::Sent => self.sent.inc_by(n),
            Direction::Received => self.received.inc_by(n),
        };
    }
}

/// A chunk went to or came from the peer with `fingerprint`.
pub fn peer_chunk(fingerprint: &str, direction: Direction) {
    if let Some(m) = METRICS.get() {
        m.peer_chunks
            .get_or_create(&PeerDirection {
                peer: peer_label(fingerprint),
                direction: direction.label(),
            })
            .inc();
    }
}

/// A chunk fetch ended (`ok`: the chunk is present now).
pub fn chunk_fetch(ok: bool) {
    if let Some(m) = METRICS.get() {
        let result = if ok { "ok" } else { "failed" };
        m.chunk_fetches.get_or_create(&Outcome { result }).inc();
    }
}

/// A read of a partial file needed `hits` chunks that were present and
/// `misses` that were not.
pub fn read_chunks(hits: u64, misses: u64) {
    if let Some(m) = METRICS.get() {
        for (result, n) in [("hit", hits), ("miss", misses)] {
            if n > 0 {
                m.read_chunks.get_or_create(&Outcome { result }).inc_by(n);
            }
        }
    }
}

/// A conflict was resolved.
pub fn conflict() {
    if let Some(m) = METRICS.get() {
        m.conflicts.inc();
    }
}

/// `n` local versions were committed.
pub fn local_versions(n: u64) {
    if let Some(m) = METRICS.get() {
        m.local_versions.inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::{Figures, Report};
    use crate::store::Counts;

    #[test]
    fn counted_and_scraped_figures_show_in_the_text() {
        let m = SyncdMetrics::new();
        m.ipc_request("lookup", Duration::from_micros(40), true);
        m.ipc_request("lookup", Duration::from_micros(40), false);
        let fp = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJKLMNOPQRST";
        let c = PeerCounters {
            sent: m.peer_counter(&m.peer_bytes, fp, Direction::Sent),
            received: m.peer_counter(&m.peer_bytes, fp, Direction::Received),
        };
        c.add(Direction::Sent, 100);
        c.add(Direction::Received, 7);
        c.add(Direction::Received, 3);
        m.conflicts.inc();
        m.local_versions.inc_by(3);
        let scraped = Scraped {
            census: Report {
                figures: Figures {
                    counts: Counts {
                        files: 3,
                        directories: 2,
                        others: 0,
                        bytes: 4096,
                    },
                    ..Figures::default()
                },
                age: Some(Duration::from_millis(1500)),
                fresh: false,
            },
            peers_paired: 2,
            peers_connected: 1,
            mounts_connected: 1,
        };
        let text = m.render(&scraped);
        for line in [
            "keibi_syncd_ipc_requests_total{method=\"lookup\",result=\"ok\"} 1",
            "keibi_syncd_ipc_requests_total{method=\"lookup\",result=\"error\"} 1",
            "keibi_syncd_ipc_request_duration_seconds_count{method=\"lookup\"} 2",
            "keibi_syncd_ipc_request_duration_seconds_bucket{le=\"0.00005\",method=\"lookup\"} 2",
            "keibi_syncd_peer_bytes_total{peer=\"ABCDEFGH\",direction=\"sent\"} 100",
            "keibi_syncd_peer_bytes_total{peer=\"ABCDEFGH\",direction=\"received\"} 10",
            "keibi_syncd_conflicts_total 1",
            "keibi_syncd_local_versions_total 3",
            "keibi_syncd_store_files 3",
            "keibi_syncd_store_directories 2",
            "keibi_syncd_store_bytes 4096",
            "keibi_syncd_store_census_age_seconds 1.5",
            "keibi_syncd_peers_paired 2",
            "keibi_syncd_peers_connected 1",
            "keibi_syncd_mounts_connected 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        let none = m.render(&Scraped::default());
        assert!(
            none.contains("keibi_syncd_store_census_age_seconds -1.0\n"),
            "{none}"
        );
    }
}
