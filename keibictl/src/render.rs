//! Turning a [`Status`] into text: a table for people, JSON for scripts.
//!
//! The JSON is serde's form of `ipc_schema::Status` as is, so scripts see
//! the same field names as the protocol (`uptime_secs`, `mounts[].info.pid`,
//! ...), and a new field in the protocol shows up without a change here.

use ipc_schema::{CheckReport, MountStatus, PeerIdentity, Status};
use std::fmt::Write;
use std::time::Duration;

/// The status as one pretty-printed JSON object and a newline.
pub fn status_json(status: &Status) -> Result<String, String> {
    let mut s = serde_json::to_string_pretty(status)
        .map_err(|e| format!("cannot encode the status as JSON: {e}"))?;
    s.push('\n');
    Ok(s)
}

/// A check report as one pretty-printed JSON object and a newline.
pub fn check_json(report: &CheckReport) -> Result<String, String> {
    let mut s = serde_json::to_string_pretty(report)
        .map_err(|e| format!("cannot encode the report as JSON: {e}"))?;
    s.push('\n');
    Ok(s)
}

/// The peer identity as one pretty-printed JSON object and a newline
/// (the fingerprint ungrouped, as the protocol carries it).
pub fn identity_json(id: &PeerIdentity) -> Result<String, String> {
    let mut s = serde_json::to_string_pretty(id)
        .map_err(|e| format!("cannot encode the identity as JSON: {e}"))?;
    s.push('\n');
    Ok(s)
}

/// The peer identity for people: the fingerprint in groups of four
/// characters (for reading aloud), the public key, the listen addresses.
pub fn identity_text(id: &PeerIdentity) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "fingerprint  {}", grouped(&id.fingerprint));
    let _ = writeln!(out, "public key   {}", id.public_key);
    if id.listen.is_empty() {
        let _ = writeln!(out, "listen       none (dial only)");
    } else {
        let _ = writeln!(out, "listen       {} (bound)", id.listen.join(" "));
    }
    out
}

/// `s` in groups of four characters separated by spaces.
pub fn grouped(s: &str) -> String {
    s.chars()
        .collect::<Vec<_>>()
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A check report for people: one line per finding, then a summary.
pub fn check_text(report: &CheckReport) -> String {
    let mut out = String::new();
    for f in &report.recovered_at_start {
        let _ = writeln!(out, "repaired at start: {}", f.detail);
    }
    for f in &report.findings {
        let _ = writeln!(
            out,
            "{:<20} {}{}",
            format!("{:?}", f.kind),
            f.detail,
            if f.repaired { " [repaired]" } else { "" }
        );
    }
    let left = report.unrepaired();
    let _ = writeln!(
        out,
        "checked {} inodes, {} entries, {} content files: {}",
        report.inodes,
        report.entries,
        report.content_files,
        match (report.findings.len(), left) {
            (0, _) => "clean".to_string(),
            (n, 0) => format!("{n} found, all repaired"),
            (n, l) => format!("{n} found, {l} not repaired"),
        }
    );
    out
}

/// The status as a human-readable table.
pub fn status_table(status: &Status) -> String {
    let mut out = String::new();
    let rows = [
        ("version", status.version.clone()),
        ("protocol", status.protocol_version.to_string()),
        ("pid", status.pid.to_string()),
        ("uptime", seconds(status.uptime_secs)),
        ("state dir", status.state_dir.clone()),
        ("files", status.files.to_string()),
        ("directories", status.directories.to_string()),
        ("others", status.others.to_string()),
        ("bytes", bytes(status.bytes)),
        ("counted", counted(status)),
    ];
    for (key, value) in rows {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{key:<12} {value}");
    }
    let _ = writeln!(out, "mounts       {}", status.mounts.len());
    if !status.mounts.is_empty() {
        out.push('\n');
        out.push_str(&mounts_table(&status.mounts));
    }
    out
}

fn mounts_table(mounts: &[MountStatus]) -> String {
    let header = [
        "MOUNTPOINT".to_string(),
        "PID".into(),
        "PASSTHROUGH".into(),
        "OPEN HANDLES".into(),
        "CONNECTED".into(),
    ];
    let mut rows = vec![header];
    for m in mounts {
        rows.push([
            m.info.mountpoint.clone(),
            m.info.pid.to_string(),
            if m.info.passthrough { "yes" } else { "no" }.into(),
            m.open_handles.to_string(),
            seconds(m.connected_secs),
        ]);
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Whether the figures (counts and open handles) are this answer's own.
fn counted(status: &Status) -> String {
    match (status.counts_fresh, status.counts_age_ms) {
        (true, _) => "now".to_string(),
        (false, Some(ms)) => format!(
            "{} ago (stale: the store did not answer in time)",
            humantime::format_duration(Duration::from_millis(ms - ms % 100))
        ),
        (false, None) => {
            "never (unavailable: the store has not answered since keibi-syncd started; the figures are 0)"
                .to_string()
        }
    }
}

fn seconds(s: u64) -> String {
    humantime::format_duration(Duration::from_secs(s)).to_string()
}

/// `1234567` → `"1234567 (1.2 MiB)"`; small values stay plain.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return n.to_string();
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{n} ({value:.1} {})", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_schema::MountInfo;

    #[test]
    fn fingerprint_is_shown_in_groups_of_four() {
        assert_eq!(grouped("ABCDEFGHIJ"), "ABCD EFGH IJ");
        assert_eq!(grouped(""), "");
        let id = PeerIdentity {
            fingerprint: "A".repeat(52),
            public_key: "00".repeat(32),
            listen: Vec::new(),
        };
        let text = identity_text(&id);
        assert!(
            text.contains(&format!("fingerprint  {}", ["AAAA"; 13].join(" "))),
            "{text}"
        );
        assert!(text.contains("dial only"), "{text}");
        let id = PeerIdentity {
            listen: vec!["0.0.0.0:58150".into(), "[::]:58150".into()],
            ..id
        };
        let text = identity_text(&id);
        assert!(
            text.contains("listen       0.0.0.0:58150 [::]:58150 (bound)"),
            "{text}"
        );
        assert!(!text.contains("not bound"), "{text}");
    }

    fn sample() -> Status {
        Status {
            version: "0.1.0".into(),
            protocol_version: 1,
            pid: 4242,
            uptime_secs: 3723,
            state_dir: "/var/lib/keibi".into(),
            mounts: vec![MountStatus {
                info: MountInfo {
                    mountpoint: "/mnt/keibi".into(),
                    pid: 99,
                    passthrough: true,
                    reconnect: false,
                },
                connected_secs: 61,
                open_handles: 3,
            }],
            files: 10,
            directories: 2,
            others: 1,
            bytes: 3 * 1024 * 1024,
            counts_fresh: true,
            counts_age_ms: Some(3),
        }
    }

    #[test]
    fn table_shows_every_field() {
        let t = status_table(&sample());
        for needle in [
            "0.1.0",
            "protocol     1",
            "4242",
            "1h 2m 3s",
            "/var/lib/keibi",
            "files        10",
            "directories  2",
            "others       1",
            "3145728 (3.0 MiB)",
            "mounts       1",
            "/mnt/keibi",
            "yes",
            "1m 1s",
            "counted      now",
        ] {
            assert!(t.contains(needle), "missing {needle:?} in\n{t}");
        }
        let mount_line = t
            .lines()
            .find(|l| l.starts_with("/mnt/keibi"))
            .expect("mount row");
        let cells: Vec<&str> = mount_line.split_whitespace().collect();
        assert_eq!(cells[..4], ["/mnt/keibi", "99", "yes", "3"]);
    }

    #[test]
    fn json_round_trips() {
        let s = sample();
        let text = status_json(&s).expect("json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("parse");
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["mounts"][0]["info"]["mountpoint"], "/mnt/keibi");
        assert_eq!(v["mounts"][0]["open_handles"], 3);
        let back: Status = serde_json::from_str(&text).expect("decode as Status");
        assert_eq!(back, s);
    }

    #[test]
    fn stale_and_missing_counts_are_named() {
        let mut s = sample();
        s.counts_fresh = false;
        s.counts_age_ms = Some(12_345);
        let t = status_table(&s);
        assert!(t.contains("counted      12s 300ms ago (stale"), "{t}");
        s.counts_age_ms = None;
        let t = status_table(&s);
        assert!(t.contains("counted      never (unavailable"), "{t}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(0), "0");
        assert_eq!(bytes(1023), "1023");
        assert_eq!(bytes(1536), "1536 (1.5 KiB)");
    }
}
