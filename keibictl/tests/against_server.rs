//! keibictl against a small in-process control server that speaks the real
//! handshake and tarpc transport of `ipc_schema`: the table and the JSON
//! show what the server said, and a server of another protocol version is
//! refused with both versions named.

use futures::StreamExt;
use ipc_schema::handshake::{self, Refusal};
use ipc_schema::service::Control;
use ipc_schema::{
    BenchReport, MountInfo, MountStatus, PROTOCOL_VERSION, PeerCtlError, PeerIdentity, PeerInfo,
    Status,
};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};

const BIN: &str = env!("CARGO_BIN_EXE_keibictl");

#[derive(Clone)]
struct Fixed(Status);

impl Control for Fixed {
    async fn status(self, _: Context) -> Status {
        self.0
    }

    async fn debug_ops(self, _: Context) -> Vec<ipc_schema::OpInFlight> {
        Vec::new()
    }

    async fn identity(self, _: Context) -> PeerIdentity {
        sample_identity()
    }

    /// Refuses a fingerprint containing "BAD" and an address containing
    /// "bad", as syncd would; adds anything else.
    async fn peer_add(
        self,
        _: Context,
        fingerprint: String,
        addr: Option<String>,
        name: Option<String>,
    ) -> Result<PeerInfo, PeerCtlError> {
        if fingerprint.contains("BAD") {
            return Err(PeerCtlError::BadFingerprint(format!(
                "{fingerprint:?}: 3 characters, a fingerprint has 52"
            )));
        }
        if addr.as_deref().is_some_and(|a| a.contains("bad")) {
            return Err(PeerCtlError::BadAddress("port \"bad\"".into()));
        }
        Ok(PeerInfo {
            fingerprint,
            addr,
            name,
            ..sample_peer()
        })
    }

    async fn peer_list(self, _: Context) -> Vec<PeerInfo> {
        vec![sample_peer()]
    }

    /// Knows no peer.
    async fn peer_remove(self, _: Context, fingerprint: String) -> Result<PeerInfo, PeerCtlError> {
        Err(PeerCtlError::UnknownPeer(fingerprint))
    }

    /// Every peer is known and not connected.
    async fn peer_bench(
        self,
        _: Context,
        fingerprint: String,
        _bytes: u64,
        _streams: u32,
    ) -> Result<BenchReport, PeerCtlError> {
        Err(PeerCtlError::NotConnected(fingerprint))
    }

    async fn debug_peer_ops(self, _: Context) -> Vec<ipc_schema::PeerOpInFlight> {
        Vec::new()
    }

    async fn sync_status(self, _: Context) -> ipc_schema::SyncStatus {
        let peer = |name: &str, connected: bool| ipc_schema::PeerSync {
            fingerprint: "B".repeat(52),
            name: Some(name.into()),
            connected,
            unreachable_since: (!connected).then_some(1_764_480_000),
            pending_out: if connected { 0 } else { 3 },
            pending_in: 0,
            acked_seq: 0,
            applied_seq: 0,
            deferred: 0,
            caught_up: connected,
        };
        ipc_schema::SyncStatus {
            device: "0123456789abcdef".into(),
            local_seq: 99,
            dirty: 0,
            peers: vec![peer("laptop", true), peer("desk", false)],
            partial_files: 1,
            missing_bytes: 1 << 20,
            conflicts: 2,
            figures_fresh: true,
        }
    }

    async fn not_local(self, _: Context, _limit: u32) -> Vec<ipc_schema::NotLocal> {
        vec![ipc_schema::NotLocal {
            path: "/videos/big.mkv".into(),
            ino: 77,
            size: 3 << 20,
            present_bytes: 2 << 20,
        }]
    }

    async fn debug_fetches(self, _: Context) -> Vec<ipc_schema::FetchInFlight> {
        Vec::new()
    }

    /// `/big` is half local; anything else does not exist.
    async fn prefetch(self, _: Context, paths: Vec<String>) -> Vec<ipc_schema::PrefetchFile> {
        paths
            .into_iter()
            .map(|path| ipc_schema::PrefetchFile {
                ino: (path == "/big").then_some(7),
                size: if path == "/big" { 2 << 20 } else { 0 },
                present_bytes: if path == "/big" { 1 << 20 } else { 0 },
                error: (path != "/big").then(|| format!("{path}: no such entry (ENOENT)")),
                path,
            })
            .collect()
    }

    /// One name without content; `repair` repairs it.
    async fn check(
        self,
        _: Context,
        repair: bool,
    ) -> Result<ipc_schema::CheckReport, ipc_schema::FsError> {
        Ok(ipc_schema::CheckReport {
            inodes: 5,
            entries: 4,
            content_files: 2,
            findings: vec![ipc_schema::CheckFinding {
                kind: ipc_schema::CheckKind::MissingContent,
                ino: Some(ipc_schema::Ino(42)),
                detail: "ino 42 is a regular file with 1 name(s) and no content file".into(),
                repaired: repair,
            }],
            recovered_at_start: Vec::new(),
        })
    }
}

fn sample() -> Status {
    Status {
        version: "9.8.7".into(),
        protocol_version: PROTOCOL_VERSION,
        pid: 31337,
        uptime_secs: 90,
        state_dir: "/srv/keibi-state".into(),
        mounts: vec![MountStatus {
            info: MountInfo {
                mountpoint: "/mnt/somewhere".into(),
                pid: 4711,
                passthrough: false,
                reconnect: true,
            },
            connected_secs: 5,
            open_handles: 7,
        }],
        files: 12,
        directories: 3,
        others: 2,
        bytes: 4096,
        counts_fresh: true,
        counts_age_ms: Some(1),
    }
}

fn sample_identity() -> PeerIdentity {
    PeerIdentity {
        fingerprint: "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJKLMNOPQRST".into(),
        public_key: "0123456789abcdef".repeat(4),
        listen: vec!["0.0.0.0:58150".into(), "[::]:58150".into()],
    }
}

fn sample_peer() -> PeerInfo {
    PeerInfo {
        fingerprint: "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJKLMNOPQRST".into(),
        name: Some("desk".into()),
        addr: Some("192.0.2.7:58150".into()),
        state: "connected".into(),
        direction: Some("outbound".into()),
        remote_addr: Some("192.0.2.7:58150".into()),
        last_seen_unix_ms: Some(1),
        rtt_us: Some(420),
        bytes_sent: 1000,
        bytes_received: 2000,
        protocol_version: Some(1),
        rekeys: 0,
        last_error: None,
        next_attempt_ms: None,
    }
}

/// Serve one connection on `sock` from a thread: accept it, or refuse it
/// as a server of another version would.
fn serve_once(sock: &Path, refuse_version: bool) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(sock).expect("bind");
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let hello = handshake::read_hello(&mut stream).expect("hello");
        assert_eq!(hello.service, handshake::ServiceKind::Control as u8);
        if refuse_version {
            let msg = handshake::version_mismatch_message(hello.version, hello.version + 1);
            handshake::refuse(&mut stream, Refusal::VersionMismatch, &msg).expect("refuse");
            return;
        }
        handshake::accept(&mut stream).expect("accept handshake");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            stream.set_nonblocking(true).expect("nonblocking");
            let stream = tokio::net::UnixStream::from_std(stream).expect("tokio stream");
            let channel = BaseChannel::with_defaults(ipc_schema::transport::framed(stream));
            channel
                .execute(Fixed(sample()).serve())
                .for_each(|answer| answer)
                .await;
        });
    })
}

fn keibictl(sock: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run keibictl")
}

#[test]
fn table_shows_the_servers_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "9.8.7",
        "31337",
        "1m 30s",
        "/srv/keibi-state",
        "/mnt/somewhere",
        "4711",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    server.join().expect("server thread");
}

#[test]
fn status_shows_a_sync_line_per_peer_and_files_lists_what_is_not_local() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["status"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let sync: Vec<&str> = text.lines().filter(|l| l.starts_with("sync:")).collect();
    assert_eq!(sync.len(), 2, "{text}");
    assert!(
        sync[0].contains("laptop") && sync[0].ends_with("in sync"),
        "{text}"
    );
    assert!(
        sync[1].contains("desk")
            && sync[1].contains("unreachable since 2025-11-30T05:20:00Z")
            && sync[1].contains("3 changes pending"),
        "{text}"
    );
    assert!(text.contains("conflicts    2"), "{text}");

    let sock = dir.path().join("control2.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["status", "--files"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("/videos/big.mkv") && text.contains("3145728"),
        "{text}"
    );

    let sock = dir.path().join("control3.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["status", "--files", "--json"]);
    server.join().expect("server thread");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v[0]["present_bytes"], 2 << 20);
}

#[test]
fn check_exit_status_says_whether_something_is_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["check"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("MissingContent") && text.contains("ino 42"),
        "{text}"
    );
    assert!(text.contains("1 found, 1 not repaired"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("keibictl: 1 inconsistency found"), "{err}");

    let sock = dir.path().join("control2.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["check", "--repair", "--json"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["findings"][0]["kind"], "MissingContent");
    assert_eq!(v["findings"][0]["repaired"], true);
    assert_eq!(v["inodes"], 5);
}

#[test]
fn json_is_the_status_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let got: Status = serde_json::from_slice(&out.stdout).expect("stdout is a Status");
    assert_eq!(got, sample());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["sync"]["local_seq"], 99);
    assert_eq!(v["sync"]["peers"][1]["name"], "desk");
    server.join().expect("server thread");
}

#[test]
fn version_mismatch_is_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let server = serve_once(&sock, true);
    let out = keibictl(&sock, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err:?}");
    let ours = PROTOCOL_VERSION.to_string();
    let theirs = (PROTOCOL_VERSION + 1).to_string();
    assert!(
        err.contains("protocol version mismatch") && err.contains(&ours) && err.contains(&theirs),
        "{err:?}"
    );
    server.join().expect("server thread");
}

#[test]
fn id_shows_the_grouped_fingerprint_and_json_the_structure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["id"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "ABCD EFGH IJKL MNOP QRST UVWX YZ23 4567 ABCD EFGH IJKL MNOP QRST",
        &"0123456789abcdef".repeat(4),
        "0.0.0.0:58150 [::]:58150",
        "0.0.0.0:58150 [::]:58150 (bound)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }

    let sock = dir.path().join("control2.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["id", "--json"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let got: PeerIdentity = serde_json::from_slice(&out.stdout).expect("stdout is a PeerIdentity");
    assert_eq!(got, sample_identity());
}

#[test]
fn id_without_syncd_fails_with_the_socket_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("absent.sock");
    let out = keibictl(&sock, &["id", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("keibictl: ") && err.contains("absent.sock"),
        "{err}"
    );
}

#[test]
fn peer_list_shows_the_peers_and_json_is_peer_info() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["peer", "list"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "desk",
        "ABCD EFGH IJKL",
        "192.0.2.7:58150",
        "connected",
        "420µs",
        "1000 B",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let sock = dir.path().join("control2.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["peer", "list", "--json"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let got: Vec<PeerInfo> = serde_json::from_slice(&out.stdout).expect("a PeerInfo array");
    assert_eq!(got, vec![sample_peer()]);
}

#[test]
fn peer_errors_have_their_exit_statuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&[&str], i32, &str); 5] = [
        (&["peer", "add", "BAD"], 2, "bad fingerprint"),
        (
            &["peer", "add", "GOOD", "--addr", "host:bad"],
            2,
            "bad address",
        ),
        (&["peer", "remove", "NOBODY"], 3, "no peer NOBODY"),
        (&["peer", "bench", "OFFLINE"], 3, "not connected"),
        (&["peer", "add", "GOOD", "--name", "n", "--json"], 0, ""),
    ];
    for (i, (args, code, says)) in cases.into_iter().enumerate() {
        let sock = dir.path().join(format!("control{i}.sock"));
        let server = serve_once(&sock, false);
        let out = keibictl(&sock, args);
        server.join().expect("server thread");
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        if code == 0 {
            let got: PeerInfo = serde_json::from_slice(&out.stdout).expect("a PeerInfo");
            assert_eq!(
                (got.fingerprint.as_str(), got.name.as_deref()),
                ("GOOD", Some("n"))
            );
        } else {
            assert_eq!(err.lines().count(), 1, "{err:?}");
            assert!(err.contains(says), "{args:?}: {err}");
        }
    }
}

#[test]
fn wait_synced_skips_the_unreachable_peer_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["wait", "--synced", "--json", "--timeout", "10s"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["done"], true);
    assert_eq!(v["until"], "synced");
    assert_eq!(v["not_waited_for"][0], "B".repeat(52));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not waiting for peer desk") && err.contains("not connected"),
        "{err}"
    );
}

#[test]
fn wait_without_syncd_times_out_with_its_own_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("absent.sock");
    let started = std::time::Instant::now();
    let out = keibictl(&sock, &["wait", "--timeout", "400ms"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("keibictl: timed out after 400ms") && last.contains("absent.sock"),
        "{err}"
    );
}

#[test]
fn prefetch_reports_a_missing_path_and_times_out_on_a_file_that_stays_partial() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["prefetch", "/nope", "--json"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["done"], false);
    assert!(
        v["files"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("ENOENT")),
        "{v}"
    );

    let sock = dir.path().join("control2.sock");
    let server = serve_once(&sock, false);
    let out = keibictl(&sock, &["prefetch", "/big", "--timeout", "700ms"]);
    server.join().expect("server thread");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/big") && text.contains("fetching"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1.0 MiB still missing"), "{err}");
}

#[test]
fn wait_stops_at_once_when_syncd_refuses_the_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("control.sock");
    let server = serve_once(&sock, true);
    let started = std::time::Instant::now();
    let out = keibictl(&sock, &["wait", "--timeout", "30s"]);
    server.join().expect("server thread");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused the connection") && err.contains("protocol version mismatch"),
        "{err}"
    );
}
