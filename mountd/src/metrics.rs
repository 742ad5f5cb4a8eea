//! mountd's metrics, served on the opt-in metrics endpoint
//! (`--metrics-socket PATH` or `--metrics-listen ADDR`, see
//! [`ipc_schema::metrics_endpoint`]). The families are listed, with what
//! each counts, in `docs/metrics.md`.
//!
//! Recording is off until [`enable`] is called at start-up (only when an
//! endpoint is configured): the hooks on the hot paths ([`fuse_op`],
//! [`syncd_call`], [`partial_io`], [`handle_opened`], [`handle_closed`])
//! then find the process-wide [`MountMetrics`] and update it; otherwise
//! they return at once. An update is an atomic add, or for a histogram a short leaf lock
//! inside `prometheus-client` (one observation); a family's map is locked
//! for a lookup (or, the first time a label value is seen, an insert). No
//! hook waits on syncd, the network or the kernel, and a scrape takes the
//! same leaf locks only while it writes the text, so a scrape never holds
//! up a FUSE dispatch thread for more than that.
//!
//! Labels are bounded: `op` is one of the fixed names of the FUSE
//! operations ([`crate::fuse`]) or of the calls to syncd
//! ([`crate::syncd_client`]), `result` is `ok` or `error` (`hit` or
//! `miss` for partial files). No path, inode
//! or handle ever becomes a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::time::Duration;

/// Latency buckets, in seconds: 50 µs to 10 s (a FUSE operation answered
/// from mountd's cache takes microseconds; a call to syncd ends at its
/// deadline, 2 s by default, a read of remote bytes at 10 s).
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// The process-wide metrics, once [`enable`]d.
static METRICS: OnceLock<MountMetrics> = OnceLock::new();

/// An operation's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: &'static str,
}

/// An operation's name and how it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpResult {
    op: &'static str,
    result: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

type LatencyFamily = Family<Op, Histogram, fn() -> Histogram>;

/// Every metric of mountd, and the registry that encodes them.
pub struct MountMetrics {
    registry: Registry,
    fuse_ops: Family<OpResult, Counter>,
    fuse_duration: LatencyFamily,
    syncd_calls: Family<OpResult, Counter>,
    syncd_duration: LatencyFamily,
    deadline_misses: Family<Op, Counter>,
    open_handles: Gauge,
    syncd_connected: Gauge,
    partial_io: Family<Outcome, Counter>,
    known_absent: Counter,
    getattr_from_change: Counter,
}

/// How an I/O on a partial file was served.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

impl MountMetrics {
    /// Fresh metrics, all zero, registered under `keibi_mountd_`.
    pub fn new() -> MountMetrics {
        let mut registry = Registry::with_prefix("keibi_mountd");
        let fuse_ops = Family::<OpResult, Counter>::default();
        registry.register(
            "fuse_operations",
            "FUSE operations answered, by operation and result (ok, or error: any errno)",
            fuse_ops.clone(),
        );
        let fuse_duration: LatencyFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "fuse_operation_duration_seconds",
            "Time from a FUSE request's arrival to its answer, by operation",
            fuse_duration.clone(),
        );
        let syncd_calls = Family::<OpResult, Counter>::default();
        registry.register(
            "syncd_calls",
            "Calls to keibi-syncd over the filesystem socket, by call and result (error: syncd's error, a broken connection or a deadline miss)",
            syncd_calls.clone(),
        );
        let syncd_duration: LatencyFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "syncd_call_duration_seconds",
            "Time of a call to keibi-syncd, waiting for a connection included, by call",
            syncd_duration.clone(),
        );
        let deadline_misses = Family::<Op, Counter>::default();
        registry.register(
            "syncd_deadline_misses",
            "Calls to keibi-syncd that got no answer within their deadline, by call",
            deadline_misses.clone(),
        );
        let open_handles = Gauge::default();
        registry.register(
            "open_handles",
            "File handles open on the mount now",
            open_handles.clone(),
        );
        let syncd_connected = Gauge::default();
        registry.register(
            "syncd_connected",
            "1 while mountd has a live connection to keibi-syncd, else 0",
            syncd_connected.clone(),
        );
        let partial_io = Family::<Outcome, Counter>::default();
        registry.register(
            "partial_io",
            "Reads, writes and fallocates on a file whose bytes are not all on this machine, by result (hit: every chunk touched was present; miss: keibi-syncd had to fetch some first)",
            partial_io.clone(),
        );
        // Fixed labels exist from the start (at 0), so a scraper sees the
        // family on a fresh mount; those labelled by operation appear at
        // its first use.
        for result in ["hit", "miss"] {
            drop(partial_io.get_or_create(&Outcome { result }));
        }
        let known_absent = Counter::default();
        registry.register(
            "lookups_answered_absent",
            "Lookups of a name answered as absent by mountd itself, without keibi-syncd: the directory was made through this mount and mountd knows every name in it",
            known_absent.clone(),
        );
        let getattr_from_change = Counter::default();
        registry.register(
            "getattrs_answered_from_changes",
            "Getattrs of a directory answered by mountd itself with the attributes the answer of a change of its names through this mount carried, without keibi-syncd",
            getattr_from_change.clone(),
        );
        MountMetrics {
            known_absent,
            getattr_from_change,
            partial_io,
            registry,
            fuse_ops,
            fuse_duration,
            syncd_calls,
            syncd_duration,
            deadline_misses,
            open_handles,
            syncd_connected,
        }
    }

    fn fuse_op(&self, op: &'static str, took: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.fuse_ops.get_or_create(&OpResult { op, result }).inc();
        self.fuse_duration
            .get_or_create(&Op { op })
            .observe(took.as_secs_f64());
    }

    fn syncd_call(&self, op: &'static str, took: Duration, outcome: CallOutcome) {
        let result = if outcome == CallOutcome::Answered {
            "ok"
        } else {
            "error"
        };
        self.syncd_calls
            .get_or_create(&OpResult { op, result })
            .inc();
        self.syncd_duration
            .get_or_create(&Op { op })
            .observe(took.as_secs_f64());
        if outcome == CallOutcome::DeadlineMissed {
            self.deadline_misses.get_or_create(&Op { op }).inc();
        }
    }

    /// The OpenMetrics text of every metric; `syncd_connected` is what the
    /// caller read from the syncd client just before.
    pub fn render(&self, syncd_connected: bool) -> String {
        self.syncd_connected.set(i64::from(syncd_connected));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a `fmt::Write` error, which a String never gives.
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

impl Default for MountMetrics {
    fn default() -> Self {
        MountMetrics::new()
    }
}

/// How a call to syncd ended, for [`syncd_call`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// syncd answered (with success).
    Answered,
    /// syncd answered with an error, or the connection failed.
    Failed,
    /// The deadline passed first.
    DeadlineMissed,
}

/// Start recording (once, at start-up, when an endpoint is configured);
/// the metrics to render.
pub fn enable() -> &'static MountMetrics {
    METRICS.get_or_init(MountMetrics::new)
}

/// A FUSE operation was answered after `took`.
pub fn fuse_op(op: &'static str, took: Duration, ok: bool) {
    if let Some(m) = METRICS.get() {
        m.fuse_op(op, took, ok);
    }
}

/// A call to syncd ended after `took`.
pub fn syncd_call(op: &'static str, took: Duration, outcome: CallOutcome) {
    if let Some(m) = METRICS.get() {
        m.syncd_call(op, took, outcome);
    }
}

/// An I/O on a partial file found every chunk it touches present
/// (`missing` false) or had to have some fetched.
pub fn partial_io(missing: bool) {
    if let Some(m) = METRICS.get() {
        let result = if missing { "miss" } else { "hit" };
        m.partial_io.get_or_create(&Outcome { result }).inc();
    }
}

/// A lookup was answered as absent from mountd's own list of the
/// directory's names ([`crate::known_dirs`]).
pub fn known_absent() {
    if let Some(m) = METRICS.get() {
        m.known_absent.inc();
    }
}

/// A `getattr` of a directory was answered with the attributes a change
/// of its names carried ([`crate::attr_cache::AttrCache::dir_changed`]).
pub fn getattr_from_change() {
    if let Some(m) = METRICS.get() {
        m.getattr_from_change.inc();
    }
}

/// A file handle was added to the handle table.
pub fn handle_opened() {
    if let Some(m) = METRICS.get() {
        m.open_handles.inc();
    }
}

/// A file handle was removed from the handle table.
pub fn handle_closed() {
    if let Some(m) = METRICS.get() {
        m.open_handles.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_calls_and_misses_show_in_the_text_by_name() {
        let m = MountMetrics::new();
        m.fuse_op("lookup", Duration::from_micros(300), true);
        m.fuse_op("lookup", Duration::from_micros(300), false);
        m.syncd_call("getattr", Duration::from_millis(2), CallOutcome::Answered);
        m.syncd_call(
            "getattr",
            Duration::from_secs(2),
            CallOutcome::DeadlineMissed,
        );
        m.open_handles.inc();
        m.partial_io
            .get_or_create(&Outcome { result: "miss" })
            .inc();
        let text = m.render(true);
        for line in [
            "keibi_mountd_fuse_operations_total{op=\"lookup\",result=\"ok\"} 1",
            "keibi_mountd_fuse_operations_total{op=\"lookup\",result=\"error\"} 1",
            "keibi_mountd_fuse_operation_duration_seconds_count{op=\"lookup\"} 2",
            "keibi_mountd_fuse_operation_duration_seconds_bucket{le=\"0.0005\",op=\"lookup\"} 2",
            "keibi_mountd_fuse_operation_duration_seconds_bucket{le=\"0.00025\",op=\"lookup\"} 0",
            "keibi_mountd_syncd_calls_total{op=\"getattr\",result=\"ok\"} 1",
            "keibi_mountd_syncd_calls_total{op=\"getattr\",result=\"error\"} 1",
            "keibi_mountd_syncd_deadline_misses_total{op=\"getattr\"} 1",
            "keibi_mountd_open_handles 1",
            "keibi_mountd_syncd_connected 1",
            "keibi_mountd_partial_io_total{result=\"miss\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(m.render(false).contains("keibi_mountd_syncd_connected 0\n"));
    }
}
