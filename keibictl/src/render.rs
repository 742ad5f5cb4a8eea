//! Turning a [`Status`] into text: a table for people, JSON for scripts.
//!
//! The JSON is serde's form of `ipc_schema::Status` as is, so scripts see
//! the same field names as the protocol (`uptime_secs`, `mounts[].info.pid`,
//! ...), and a new field in the protocol shows up without a change here;
//! the sync state is under the key `sync` (serde's form of
//! `ipc_schema::SyncStatus`).

use ipc_schema::{CheckReport, MountStatus, NotLocal, PeerIdentity, PeerSync, Status, SyncStatus};
use std::fmt::Write;
use std::time::Duration;

/// The status as one pretty-printed JSON object and a newline, with the
/// sync state under `sync` ([`crate::output::StatusOutput`]).
pub fn status_json(status: &Status, sync: &SyncStatus) -> Result<String, String> {
    crate::output::to_json(&crate::output::StatusOutput {
        status: status.clone(),
        sync: sync.clone(),
    })
}

/// The sync part of `status` for people: this device, the local change
/// log, and one `sync:` line per peer: `in sync`, `N changes pending`
/// (ours not yet pulled, theirs not yet applied, theirs waiting here), or
/// `unreachable since T` (UTC). `now` is the current time (seconds since
/// the epoch), for the age.
pub fn sync_text(sync: &SyncStatus, now: i64) -> String {
    let mut out = String::new();
    let rows = [
        ("device", sync.device.clone()),
        ("local seq", sync.local_seq.to_string()),
        ("unversioned", sync.dirty.to_string()),
        (
            "not local",
            format!(
                "{} files, {} missing",
                sync.partial_files,
                bytes(sync.missing_bytes)
            ),
        ),
        ("conflicts", sync.conflicts.to_string()),
    ];
    for (key, value) in rows {
        let _ = writeln!(out, "{key:<12} {value}");
    }
    if sync.peers.is_empty() {
        let _ = writeln!(out, "sync:        no paired peers");
    }
    for p in &sync.peers {
        let who = match &p.name {
            Some(n) => format!("{n} ({})", short(&p.fingerprint)),
            None => short(&p.fingerprint),
        };
        let _ = writeln!(out, "sync:        {who}: {}", peer_state(p, now));
    }
    out
}

/// One peer's sync state in words.
pub fn peer_state(p: &PeerSync, now: i64) -> String {
    if !p.connected {
        return match p.unreachable_since {
            Some(t) => format!(
                "unreachable since {} ({} ago){}",
                utc(t),
                seconds(now.saturating_sub(t).max(0) as u64),
                pending_suffix(p)
            ),
            None => format!("never connected{}", pending_suffix(p)),
        };
    }
    let pending = p.pending_out + p.pending_in + p.deferred;
    if pending == 0 && !p.caught_up {
        "catching up (the peer has not yet said how far its log goes)".into()
    } else if pending == 0 {
        "in sync".into()
    } else {
        format!(
            "{pending} changes pending ({} to send, {} to apply, {} waiting)",
            p.pending_out, p.pending_in, p.deferred
        )
    }
}

fn pending_suffix(p: &PeerSync) -> String {
    if p.pending_out == 0 {
        String::new()
    } else {
        format!(", {} changes pending", p.pending_out)
    }
}

/// The first 8 characters of a fingerprint, then `…`.
fn short(fingerprint: &str) -> String {
    let head: String = fingerprint.chars().take(8).collect();
    if fingerprint.chars().count() > 8 {
        format!("{head}…")
    } else {
        head
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(secs: i64) -> String {
    let d = Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + d).to_string()
}

/// The files not all local as a table: path, size and bytes present (in
/// bytes).
pub fn not_local_table(list: &[NotLocal]) -> String {
    if list.is_empty() {
        return "every file is local\n".into();
    }
    let mut rows = vec![["PATH", "SIZE", "PRESENT"].map(String::from)];
    for f in list {
        rows.push([
            f.path.clone(),
            f.size.to_string(),
            f.present_bytes.to_string(),
        ]);
    }
    table(&rows)
}

/// The files not all local as a JSON array and a newline.
pub fn not_local_json(list: &[NotLocal]) -> Result<String, String> {
    let mut s = serde_json::to_string_pretty(list)
        .map_err(|e| format!("cannot encode the list as JSON: {e}"))?;
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
    table(&rows)
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

/// Rows as a table: columns left-aligned to their widest cell, two spaces
/// apart, trailing spaces trimmed, one line per row.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
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

#[cfg(test)]
pub(crate) mod tests {
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
        let text = status_json(&s, &SyncStatus::default()).expect("json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("parse");
        assert_eq!(v["pid"], 4242);
        assert!(v["sync"].is_object());
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

    /// A peer "bob", connected (and caught up) or not, with nothing
    /// pending (also used by `wait`'s tests).
    pub(crate) fn peer(connected: bool) -> PeerSync {
        PeerSync {
            fingerprint: "ABCDEFGHIJKL".into(),
            name: Some("bob".into()),
            connected,
            unreachable_since: None,
            pending_out: 0,
            pending_in: 0,
            acked_seq: 0,
            applied_seq: 0,
            deferred: 0,
            caught_up: connected,
        }
    }

    #[test]
    fn each_peer_gets_a_sync_line_in_words() {
        let in_sync = peer(true);
        let pending = PeerSync {
            pending_out: 2,
            pending_in: 3,
            deferred: 1,
            ..peer(true)
        };
        let gone = PeerSync {
            unreachable_since: Some(1_764_480_000),
            pending_out: 4,
            ..peer(false)
        };
        assert_eq!(peer_state(&in_sync, 0), "in sync");
        let fresh = PeerSync {
            caught_up: false,
            ..peer(true)
        };
        assert!(peer_state(&fresh, 0).starts_with("catching up"));
        assert_eq!(
            peer_state(&pending, 0),
            "6 changes pending (2 to send, 3 to apply, 1 waiting)"
        );
        assert_eq!(
            peer_state(&gone, 1_764_480_090),
            "unreachable since 2025-11-30T05:20:00Z (1m 30s ago), 4 changes pending"
        );
        let sync = SyncStatus {
            device: "0123456789abcdef".into(),
            local_seq: 17,
            peers: vec![in_sync, gone],
            partial_files: 2,
            missing_bytes: 3 << 20,
            conflicts: 1,
            ..SyncStatus::default()
        };
        let t = sync_text(&sync, 1_764_480_090);
        let lines: Vec<&str> = t.lines().filter(|l| l.starts_with("sync:")).collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(lines[0].ends_with("bob (ABCDEFGH…): in sync"), "{t}");
        assert!(
            lines[1].contains("unreachable since 2025-11-30T05:20:00Z"),
            "{t}"
        );
        assert!(
            t.contains("not local    2 files, 3145728 (3.0 MiB) missing"),
            "{t}"
        );
        assert!(t.contains("conflicts    1"), "{t}");
        let j = status_json(&sample(), &sync).expect("json");
        let v: serde_json::Value = serde_json::from_str(&j).expect("parse");
        assert_eq!(v["sync"]["local_seq"], 17);
        assert_eq!(v["sync"]["peers"][1]["unreachable_since"], 1_764_480_000);
        assert_eq!(v["pid"], 4242, "the status fields stay where they were");
    }

    #[test]
    fn files_not_local_are_listed_with_size_and_presence() {
        assert_eq!(not_local_table(&[]), "every file is local\n");
        let list = vec![NotLocal {
            path: "/big/file.bin".into(),
            ino: 9,
            size: 4 << 20,
            present_bytes: 1 << 20,
        }];
        let t = not_local_table(&list);
        let row: Vec<&str> = t.lines().nth(1).expect("row").split_whitespace().collect();
        assert_eq!(row, ["/big/file.bin", "4194304", "1048576"]);
        let v: serde_json::Value =
            serde_json::from_str(&not_local_json(&list).expect("json")).expect("parse");
        assert_eq!(v[0]["path"], "/big/file.bin");
        assert_eq!(v[0]["present_bytes"], 1 << 20);
    }
}
