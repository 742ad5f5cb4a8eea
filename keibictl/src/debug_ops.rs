//! `keibictl debug ops`: what each daemon is waiting on, right now.
//!
//! Two kinds of source are asked at the same time, each bounded by the
//! `--timeout`: keibi-syncd over its control socket (`Control::debug_ops`,
//! its filesystem requests in flight) and each named mount's keibi-mountd
//! directly over its ops socket (`MountDebug::ops`, its FUSE operations in
//! flight). mountd is asked directly so that a frozen syncd, the usual
//! reason for a hang, does not hide what the mount waits on.
//!
//! A mount's ops socket is `<lock dir>/<anchor>/ops.sock`, with the
//! mountpoint made absolute without touching it (a `stat` of a stuck mount
//! could hang) and named as mountd names it ([`ipc_schema::paths`]: a
//! fixed-length hash of the path, so any mountpoint's socket fits in
//! `sun_path`).
//!
//! syncd is also asked for its peer requests in flight
//! (`Control::debug_peer_ops`: requests this machine sent to its peers and
//! requests it serves for them, with peer, age and bytes so far).
//!
//! And for the chunk fetches in flight (`Control::debug_fetches`: the
//! inode, the chunk, the peer asked, the age, and whether a reader waits
//! for it or it is read-ahead).
//!
//! The answer succeeds when at least one source answered; a source that did
//! not is named on one line, and the others are still shown.

use ipc_schema::transport::{connect_control, connect_mount_debug, context_with_timeout};
use ipc_schema::{FetchInFlight, OpInFlight, PeerOpInFlight};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tarpc::client::RpcError;

/// Where to find the mounts to ask.
pub struct Targets {
    /// Mountpoints; their sockets are found under `lock_dir`.
    pub mounts: Vec<PathBuf>,
    /// Ops sockets named directly.
    pub sockets: Vec<PathBuf>,
    /// mountd's lock directory.
    pub lock_dir: PathBuf,
}

/// What every source said: `Err` is why it did not answer.
pub struct Report {
    /// syncd's requests in flight.
    pub syncd: Result<Vec<OpInFlight>, String>,
    /// syncd's peer requests in flight.
    pub peers: Result<Vec<PeerOpInFlight>, String>,
    /// syncd's chunk fetches in flight.
    pub fetches: Result<Vec<FetchInFlight>, String>,
    /// Each mount (its mountpoint, or the socket named) and its operations.
    pub mounts: Vec<(String, Result<Vec<OpInFlight>, String>)>,
}

impl Report {
    /// Whether any source answered.
    pub fn any_answer(&self) -> bool {
        self.syncd.is_ok()
            || self.peers.is_ok()
            || self.fetches.is_ok()
            || self.mounts.iter().any(|(_, r)| r.is_ok())
    }
}

/// Ask syncd (on `control`) and every mount in `targets`, concurrently.
pub async fn gather(control: &Path, targets: &Targets, timeout: Duration) -> Report {
    let mut sources: Vec<(String, PathBuf)> = Vec::new();
    for m in &targets.mounts {
        let abs = std::path::absolute(m).unwrap_or_else(|_| m.clone());
        let sock = ipc_schema::paths::ops_socket(&targets.lock_dir, &abs);
        sources.push((abs.display().to_string(), sock));
    }
    for s in &targets.sockets {
        sources.push((s.display().to_string(), s.clone()));
    }
    let syncd = syncd_ops(control, timeout);
    let peers = peer_ops(control, timeout);
    let fetches = fetches(control, timeout);
    let mounts = futures::future::join_all(
        sources
            .into_iter()
            .map(|(label, sock)| async move { (label, mount_ops(&sock, timeout).await) }),
    );
    let (syncd, peers, fetches, mounts) = tokio::join!(syncd, peers, fetches, mounts);
    Report {
        syncd,
        peers,
        fetches,
        mounts,
    }
}

async fn fetches(control: &Path, timeout: Duration) -> Result<Vec<FetchInFlight>, String> {
    let exchange = async {
        let client = connect_control(control).await.map_err(|e| e.to_string())?;
        client
            .debug_fetches(context_with_timeout(timeout))
            .await
            .map_err(|e| rpc_reason(timeout, e))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(no_answer(timeout)),
    }
}

async fn peer_ops(control: &Path, timeout: Duration) -> Result<Vec<PeerOpInFlight>, String> {
    let exchange = async {
        let client = connect_control(control).await.map_err(|e| e.to_string())?;
        client
            .debug_peer_ops(context_with_timeout(timeout))
            .await
            .map_err(|e| rpc_reason(timeout, e))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(no_answer(timeout)),
    }
}

async fn syncd_ops(control: &Path, timeout: Duration) -> Result<Vec<OpInFlight>, String> {
    let exchange = async {
        let client = connect_control(control).await.map_err(|e| e.to_string())?;
        client
            .debug_ops(context_with_timeout(timeout))
            .await
            .map_err(|e| rpc_reason(timeout, e))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(no_answer(timeout)),
    }
}

async fn mount_ops(sock: &Path, timeout: Duration) -> Result<Vec<OpInFlight>, String> {
    let exchange = async {
        let client = connect_mount_debug(sock).await.map_err(|e| e.to_string())?;
        client
            .ops(context_with_timeout(timeout))
            .await
            .map_err(|e| rpc_reason(timeout, e))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(no_answer(timeout)),
    }
}

fn rpc_reason(timeout: Duration, e: RpcError) -> String {
    match e {
        RpcError::DeadlineExceeded => no_answer(timeout),
        RpcError::Shutdown => "closed the connection before answering".into(),
        other => format!("request failed: {other}"),
    }
}

fn no_answer(timeout: Duration) -> String {
    format!(
        "no answer within {} (stalled?)",
        humantime::format_duration(timeout)
    )
}

/// The report as tables, one per source that answered, and one line per
/// source that did not.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    section(&mut out, "keibi-syncd", &report.syncd);
    peer_section(&mut out, &report.peers);
    fetch_section(&mut out, &report.fetches);
    for (label, r) in &report.mounts {
        section(&mut out, &format!("keibi-mountd {label}"), r);
    }
    out
}

fn section(out: &mut String, source: &str, r: &Result<Vec<OpInFlight>, String>) {
    match r {
        Err(why) => {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "{source}: {why}");
        }
        Ok(ops) if ops.is_empty() => {
            let _ = writeln!(out, "{source}: nothing in flight");
        }
        Ok(ops) => {
            let mut rows = vec![[
                "SOURCE".to_string(),
                "OP".into(),
                "INO".into(),
                "FH".into(),
                "AGE".into(),
                "WAITING ON".into(),
            ]];
            for op in ops {
                rows.push([
                    source.to_string(),
                    op.op.clone(),
                    op.ino.map_or("-".into(), |i| i.to_string()),
                    op.fh.map_or("-".into(), |f| f.to_string()),
                    format!("{}ms", op.age_ms),
                    op.waiting_on.clone(),
                ]);
            }
            out.push_str(&crate::render::table(&rows));
        }
    }
    out.push('\n');
}

fn peer_section(out: &mut String, r: &Result<Vec<PeerOpInFlight>, String>) {
    match r {
        Err(why) => {
            let _ = writeln!(out, "keibi-syncd peers: {why}");
        }
        Ok(ops) if ops.is_empty() => {
            let _ = writeln!(out, "keibi-syncd peers: nothing in flight");
        }
        Ok(ops) => {
            let mut rows =
                vec![["PEER", "NAME", "REQUEST", "DIRECTION", "AGE", "BYTES"].map(String::from)];
            for op in ops {
                rows.push([
                    crate::render::grouped(&op.peer),
                    op.name.clone().unwrap_or_else(|| "-".into()),
                    op.request.clone(),
                    if op.outgoing { "sent" } else { "serving" }.into(),
                    format!("{}ms", op.age_ms),
                    op.bytes.to_string(),
                ]);
            }
            out.push_str(&crate::render::table(&rows));
        }
    }
    out.push('\n');
}

fn fetch_section(out: &mut String, r: &Result<Vec<FetchInFlight>, String>) {
    match r {
        Err(why) => {
            let _ = writeln!(out, "keibi-syncd fetches: {why}");
        }
        Ok(fetches) if fetches.is_empty() => {
            let _ = writeln!(out, "keibi-syncd fetches: nothing in flight");
        }
        Ok(fetches) => {
            let mut rows = vec![["INO", "CHUNK", "PEER", "AGE", "FOR"].map(String::from)];
            for f in fetches {
                rows.push([
                    f.ino.to_string(),
                    f.chunk.to_string(),
                    crate::render::grouped(&f.peer),
                    format!("{}ms", f.age_ms),
                    if f.demanded { "read" } else { "ahead" }.into(),
                ]);
            }
            out.push_str(&crate::render::table(&rows));
        }
    }
    out.push('\n');
}

/// The report as one JSON object: `{"syncd": [...] | null, "peers": [...]
/// | null, "fetches": [...] | null, "mounts": {"<mountpoint>": [...] |
/// null}}` (null: the source did not answer).
pub fn json(report: &Report) -> Result<String, String> {
    crate::output::to_json(&crate::output::DebugOpsOutput {
        syncd: report.syncd.as_ref().ok().cloned(),
        peers: report.peers.as_ref().ok().cloned(),
        fetches: report.fetches.as_ref().ok().cloned(),
        mounts: report
            .mounts
            .iter()
            .map(|(label, r)| (label.clone(), r.as_ref().ok().cloned()))
            .collect(),
    })
}

/// The reasons of the sources that did not answer, one line each.
pub fn failures(report: &Report) -> Vec<String> {
    let mut out = Vec::new();
    if let Err(e) = &report.syncd {
        out.push(format!("keibi-syncd: {e}"));
    }
    if let Err(e) = &report.peers {
        out.push(format!("keibi-syncd peers: {e}"));
    }
    if let Err(e) = &report.fetches {
        out.push(format!("keibi-syncd fetches: {e}"));
    }
    for (label, r) in &report.mounts {
        if let Err(e) = r {
            out.push(format!("keibi-mountd {label}: {e}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(name: &str) -> OpInFlight {
        OpInFlight {
            op: name.into(),
            ino: Some(1),
            fh: None,
            age_ms: 1500,
            waiting_on: format!("keibi-syncd ({name})"),
        }
    }

    #[test]
    fn a_silent_syncd_is_one_line_and_mounts_still_show() {
        let r = Report {
            syncd: Err(no_answer(Duration::from_secs(5))),
            peers: Err(no_answer(Duration::from_secs(5))),
            fetches: Err(no_answer(Duration::from_secs(5))),
            mounts: vec![("/mnt/keibi".into(), Ok(vec![op("lookup")]))],
        };
        assert!(r.any_answer());
        let t = table(&r);
        assert!(
            t.contains("keibi-syncd: no answer within 5s (stalled?)"),
            "{t}"
        );
        let row = t
            .lines()
            .find(|l| l.contains("lookup"))
            .expect("lookup row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "keibi-mountd",
                "/mnt/keibi",
                "lookup",
                "1",
                "-",
                "1500ms",
                "keibi-syncd",
                "(lookup)"
            ]
        );
        let v: serde_json::Value = serde_json::from_str(&json(&r).expect("json")).expect("parse");
        assert!(v["syncd"].is_null());
        assert_eq!(v["mounts"]["/mnt/keibi"][0]["op"], "lookup");
        assert_eq!(v["mounts"]["/mnt/keibi"][0]["age_ms"], 1500);
    }

    #[test]
    fn no_answer_anywhere_is_a_failure() {
        let r = Report {
            syncd: Err("cannot connect".into()),
            peers: Err("cannot connect".into()),
            fetches: Err("cannot connect".into()),
            mounts: vec![("/mnt/keibi".into(), Err("cannot connect".into()))],
        };
        assert!(!r.any_answer());
        assert_eq!(failures(&r).len(), 4);
    }

    #[test]
    fn peer_requests_are_listed_under_peers() {
        let r = Report {
            syncd: Ok(Vec::new()),
            peers: Ok(vec![PeerOpInFlight {
                peer: "B".repeat(52),
                name: Some("desk".into()),
                request: "Bulk".into(),
                outgoing: true,
                age_ms: 250,
                bytes: 4096,
            }]),
            fetches: Ok(Vec::new()),
            mounts: Vec::new(),
        };
        let t = table(&r);
        let row = t.lines().find(|l| l.contains("Bulk")).expect("row");
        assert!(row.contains(&["BBBB"; 13].join(" ")), "{t}");
        assert!(
            row.contains("desk")
                && row.contains("sent")
                && row.contains("250ms")
                && row.contains("4096"),
            "{t}"
        );
        let v: serde_json::Value = serde_json::from_str(&json(&r).expect("json")).expect("parse");
        assert_eq!(v["peers"][0]["request"], "Bulk");
        assert_eq!(v["peers"][0]["outgoing"], true);
        assert_eq!(v["peers"][0]["bytes"], 4096);
    }

    #[test]
    fn chunk_fetches_have_their_own_section_and_json_key() {
        let r = Report {
            syncd: Ok(Vec::new()),
            peers: Ok(Vec::new()),
            fetches: Ok(vec![
                FetchInFlight {
                    ino: 42,
                    chunk: 7,
                    peer: "C".repeat(52),
                    age_ms: 120,
                    demanded: true,
                },
                FetchInFlight {
                    ino: 42,
                    chunk: 8,
                    peer: "C".repeat(52),
                    age_ms: 80,
                    demanded: false,
                },
            ]),
            mounts: Vec::new(),
        };
        let t = table(&r);
        let rows: Vec<Vec<&str>> = t
            .lines()
            .filter(|l| l.starts_with("42 "))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows.len(), 2, "{t}");
        assert_eq!(rows[0][..2], ["42", "7"]);
        assert_eq!(rows[0].last(), Some(&"read"));
        assert_eq!(rows[1].last(), Some(&"ahead"));
        assert!(t.contains("120ms"), "{t}");
        let v: serde_json::Value = serde_json::from_str(&json(&r).expect("json")).expect("parse");
        assert_eq!(v["fetches"][0]["chunk"], 7);
        assert_eq!(v["fetches"][1]["demanded"], false);
        let empty = Report {
            fetches: Ok(Vec::new()),
            ..r
        };
        assert!(table(&empty).contains("keibi-syncd fetches: nothing in flight"));
    }
}
