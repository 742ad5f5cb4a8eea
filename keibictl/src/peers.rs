//! `keibictl peer add|list|remove|bench`: asking syncd, and showing the
//! answer as a table for people or JSON for scripts.
//!
//! The JSON is serde's form of the protocol types (`PeerInfo`,
//! `BenchReport`) field for field. Exit statuses ([`Failure::code`]): 1
//! when syncd could not be reached or the command failed, 2 for a bad
//! fingerprint or address (as for a bad command line), 3 for a peer that
//! was never added, or one that is not connected (`bench`).

use crate::progress::size;
use ipc_schema::transport::{connect_control, context_with_timeout};
use ipc_schema::{BenchReport, PeerCtlError, PeerInfo};
use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tarpc::client::RpcError;

/// Exit status: a bad fingerprint or address (like a bad command line).
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status: the peer was never added, or is not connected.
pub const EXIT_NO_PEER: u8 = 3;

/// Why a peer command failed, and the exit status that says so.
#[derive(Debug)]
pub struct Failure {
    /// The exit status.
    pub code: u8,
    /// The reason, one line.
    pub reason: String,
}

impl Failure {
    fn failed(reason: String) -> Failure {
        Failure { code: 1, reason }
    }
}

impl From<PeerCtlError> for Failure {
    fn from(e: PeerCtlError) -> Failure {
        let code = match e {
            PeerCtlError::BadFingerprint(_)
            | PeerCtlError::BadAddress(_)
            | PeerCtlError::IsSelf => EXIT_BAD_INPUT,
            PeerCtlError::UnknownPeer(_) | PeerCtlError::NotConnected(_) => EXIT_NO_PEER,
            PeerCtlError::Failed(_) => 1,
        };
        Failure {
            code,
            reason: e.to_string(),
        }
    }
}

/// Connect and call, the whole exchange bounded by `timeout`.
macro_rules! ask {
    ($socket:expr, $timeout:expr, |$client:ident, $ctx:ident| $call:expr) => {{
        let socket: &Path = $socket;
        let timeout: Duration = $timeout;
        let exchange = async {
            let $client = connect_control(socket)
                .await
                .map_err(|e| Failure::failed(e.to_string()))?;
            let $ctx = context_with_timeout(timeout);
            $call
                .await
                .map_err(|e| Failure::failed(rpc_reason(socket, timeout, &e)))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(Failure::failed(no_answer(socket, timeout))),
        }
    }};
}

/// `peer add`.
pub async fn add(
    socket: &Path,
    timeout: Duration,
    fingerprint: String,
    addr: Option<String>,
    name: Option<String>,
) -> Result<PeerInfo, Failure> {
    Ok(ask!(socket, timeout, |c, ctx| c.peer_add(
        ctx,
        fingerprint,
        addr,
        name
    ))??)
}

/// `peer list`.
pub async fn list(socket: &Path, timeout: Duration) -> Result<Vec<PeerInfo>, Failure> {
    ask!(socket, timeout, |c, ctx| c.peer_list(ctx))
}

/// `peer remove`.
pub async fn remove(
    socket: &Path,
    timeout: Duration,
    fingerprint: String,
) -> Result<PeerInfo, Failure> {
    Ok(ask!(socket, timeout, |c, ctx| c.peer_remove(ctx, fingerprint))??)
}

/// `peer bench`.
pub async fn bench(
    socket: &Path,
    timeout: Duration,
    fingerprint: String,
    bytes: u64,
    streams: u32,
) -> Result<BenchReport, Failure> {
    Ok(ask!(socket, timeout, |c, ctx| c.peer_bench(
        ctx,
        fingerprint,
        bytes,
        streams
    ))??)
}

/// `peer bench` with progress in `mode`: while the bench runs, the peer's
/// `bytes_received` is read from `peer_list` (on its own connection, every
/// 250 ms, each call bounded by 1 s) and shown against `bytes` with rate
/// and ETA. The bytes counted are all the connection received, the test
/// data and any sync traffic alongside; the report's own figures are the
/// bench's.
pub async fn bench_watched(
    socket: &Path,
    timeout: Duration,
    fingerprint: String,
    bytes: u64,
    streams: u32,
    mode: crate::progress::Mode,
) -> Result<BenchReport, Failure> {
    if mode == crate::progress::Mode::Quiet {
        return bench(socket, timeout, fingerprint, bytes, streams).await;
    }
    let mut progress = crate::progress::Progress::bytes(mode, "bench", bytes);
    // The watcher connects only once the bench's own connection is up, so
    // that it never takes the place of the bench's (a control socket with
    // a short backlog, or a server that accepts once, would refuse the
    // bench instead).
    let bench_connected = tokio::sync::Notify::new();
    let watch = async {
        bench_connected.notified().await;
        let tick = Duration::from_millis(250);
        let call = Duration::from_secs(1);
        let mut start: Option<u64> = None;
        let mut client = None;
        loop {
            if client.is_none() {
                client = tokio::time::timeout(call, connect_control(socket))
                    .await
                    .ok()
                    .and_then(Result::ok);
            }
            if let Some(c) = &client {
                match tokio::time::timeout(call, c.peer_list(context_with_timeout(call))).await {
                    Ok(Ok(list)) => {
                        let norm = |f: &str| f.to_ascii_uppercase().replace([' ', '-'], "");
                        if let Some(p) = list
                            .iter()
                            .find(|p| norm(&p.fingerprint) == norm(&fingerprint))
                        {
                            let from = *start.get_or_insert(p.bytes_received);
                            progress.set_bytes(p.bytes_received.saturating_sub(from), bytes);
                        }
                    }
                    _ => client = None,
                }
            }
            tokio::time::sleep(tick).await;
        }
    };
    let exchange = async {
        let c = connect_control(socket)
            .await
            .map_err(|e| Failure::failed(e.to_string()))?;
        bench_connected.notify_one();
        let ctx = context_with_timeout(timeout);
        c.peer_bench(ctx, fingerprint.clone(), bytes, streams)
            .await
            .map_err(|e| Failure::failed(rpc_reason(socket, timeout, &e)))
    };
    let bounded = async {
        match tokio::time::timeout(timeout, exchange).await {
            Ok(answer) => Ok(answer??),
            Err(_) => Err(Failure::failed(no_answer(socket, timeout))),
        }
    };
    let answer = tokio::select! {
        answer = bounded => answer,
        _ = watch => Err(Failure::failed("internal: the progress watcher ended".into())),
    };
    progress.finish();
    answer
}

fn no_answer(socket: &Path, timeout: Duration) -> String {
    format!(
        "keibi-syncd did not answer on {} within {} (ETIMEDOUT)",
        socket.display(),
        humantime::format_duration(timeout)
    )
}

fn rpc_reason(socket: &Path, timeout: Duration, e: &RpcError) -> String {
    match e {
        RpcError::DeadlineExceeded => no_answer(socket, timeout),
        RpcError::Shutdown => format!(
            "keibi-syncd closed the connection on {} before answering",
            socket.display()
        ),
        other => format!(
            "request to keibi-syncd on {} failed: {other}",
            socket.display()
        ),
    }
}

/// One peer for people (after `add` or `remove`): `what` and a table.
pub fn one_text(what: &str, peer: &PeerInfo) -> String {
    format!(
        "{what}\n{}",
        table(std::slice::from_ref(peer), now_unix_ms())
    )
}

/// The peers as a table, then one line per peer with a last error.
pub fn table(peers: &[PeerInfo], now_unix_ms: u64) -> String {
    if peers.is_empty() {
        return "no peers (pair with `keibictl peer add FINGERPRINT --addr HOST:PORT`)\n".into();
    }
    let mut rows = vec![
        [
            "NAME",
            "FINGERPRINT",
            "ADDRESS",
            "STATE",
            "LAST SEEN",
            "RTT",
            "SENT",
            "RECEIVED",
            "PROTOCOL",
        ]
        .map(String::from),
    ];
    for p in peers {
        rows.push([
            p.name.clone().unwrap_or_else(|| "-".into()),
            crate::render::grouped(&p.fingerprint),
            p.addr.clone().unwrap_or_else(|| "-".into()),
            state(p),
            last_seen(p.last_seen_unix_ms, now_unix_ms),
            p.rtt_us.map_or("-".into(), rtt),
            size(p.bytes_sent),
            size(p.bytes_received),
            p.protocol_version.map_or("-".into(), |v| v.to_string()),
        ]);
    }
    let mut out = crate::render::table(&rows);
    for p in peers {
        if let (Some(err), false) = (&p.last_error, p.state == "connected") {
            let who = p
                .name
                .clone()
                .unwrap_or_else(|| p.fingerprint[..8.min(p.fingerprint.len())].to_string());
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{who}: last error: {err}");
        }
    }
    out
}

fn state(p: &PeerInfo) -> String {
    match (p.state.as_str(), &p.direction, p.next_attempt_ms) {
        ("connected", Some(d), _) => format!("connected ({d})"),
        ("waiting", _, Some(ms)) => format!(
            "waiting (retry in {})",
            humantime::format_duration(Duration::from_millis(ms - ms % 100))
        ),
        ("idle", _, _) => "idle (waits for the peer to dial)".into(),
        (s, _, _) => s.to_string(),
    }
}

fn last_seen(at: Option<u64>, now: u64) -> String {
    match at {
        None => "never".into(),
        Some(t) => {
            let ago = now.saturating_sub(t) / 1000;
            if ago == 0 {
                "now".into()
            } else {
                format!(
                    "{} ago",
                    humantime::format_duration(Duration::from_secs(ago))
                )
            }
        }
    }
}

fn rtt(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else {
        format!("{:.1}ms", us as f64 / 1000.0)
    }
}

/// A bench report for people.
pub fn bench_text(r: &BenchReport) -> String {
    format!(
        "{} in {:.3} s over {} stream{}: {:.1} MB/s ({} rekeys)\n",
        size(r.bytes),
        r.seconds,
        r.streams,
        if r.streams == 1 { "" } else { "s" },
        r.mb_per_s,
        r.rekeys
    )
}

/// The current Unix time in milliseconds.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(state: &str) -> PeerInfo {
        PeerInfo {
            fingerprint: "A".repeat(52),
            name: Some("desk".into()),
            addr: Some("192.0.2.7:58150".into()),
            state: state.into(),
            direction: (state == "connected").then(|| "outbound".into()),
            remote_addr: (state == "connected").then(|| "192.0.2.7:58150".into()),
            last_seen_unix_ms: Some(1_000_000),
            rtt_us: (state == "connected").then_some(1234),
            bytes_sent: 3 << 20,
            bytes_received: 512,
            protocol_version: (state == "connected").then_some(1),
            rekeys: 0,
            last_error: Some("connection refused".into()),
            next_attempt_ms: (state == "waiting").then_some(2500),
        }
    }

    #[test]
    fn the_table_shows_every_column() {
        let t = table(&[peer("connected"), peer("waiting")], 1_065_000);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{t}");
        for col in [
            "FINGERPRINT",
            "ADDRESS",
            "STATE",
            "LAST SEEN",
            "RTT",
            "SENT",
            "RECEIVED",
            "PROTOCOL",
        ] {
            assert!(lines[0].contains(col), "{col}: {t}");
        }
        let grouped = ["AAAA"; 13].join(" ");
        assert!(lines[1].contains(&grouped), "{t}");
        assert!(lines[1].contains("connected (outbound)"), "{t}");
        assert!(lines[1].contains("1m 5s ago"), "{t}");
        assert!(lines[1].contains("1.2ms"), "{t}");
        assert!(lines[1].contains("3.0 MiB"), "{t}");
        assert!(lines[1].contains("512 B"), "{t}");
        assert!(lines[2].contains("waiting (retry in 2s 500ms)"), "{t}");
        // The last error is shown for the peer that is not connected only.
        assert_eq!(
            t.matches("last error: connection refused").count(),
            1,
            "{t}"
        );
    }

    #[test]
    fn json_is_the_protocol_type_field_for_field() {
        let p = peer("connected");
        let v: serde_json::Value =
            serde_json::from_str(&crate::output::to_json(&p).expect("json")).expect("parse");
        assert_eq!(v["fingerprint"], "A".repeat(52));
        assert_eq!(v["state"], "connected");
        assert_eq!(v["rtt_us"], 1234);
        assert_eq!(v["protocol_version"], 1);
        assert_eq!(v["next_attempt_ms"], serde_json::Value::Null);
        let back: PeerInfo = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, p);
    }

    #[test]
    fn errors_map_to_exit_statuses() {
        assert_eq!(
            Failure::from(PeerCtlError::BadFingerprint("x".into())).code,
            2
        );
        assert_eq!(Failure::from(PeerCtlError::BadAddress("x".into())).code, 2);
        assert_eq!(Failure::from(PeerCtlError::IsSelf).code, 2);
        assert_eq!(Failure::from(PeerCtlError::UnknownPeer("x".into())).code, 3);
        assert_eq!(
            Failure::from(PeerCtlError::NotConnected("x".into())).code,
            3
        );
        assert_eq!(Failure::from(PeerCtlError::Failed("x".into())).code, 1);
    }

    #[test]
    fn no_peers_says_how_to_add_one() {
        assert!(table(&[], 0).contains("keibictl peer add"));
        assert_eq!(last_seen(None, 5), "never");
        assert_eq!(rtt(250), "250µs");
    }
}
