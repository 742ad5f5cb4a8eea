//! keibictl against a small in-process control server that speaks the real
//! handshake and tarpc transport of `ipc_schema`: the table and the JSON
//! show what the server said, and a server of another protocol version is
//! refused with both versions named.

use futures::StreamExt;
use ipc_schema::handshake::{self, Refusal};
use ipc_schema::service::Control;
use ipc_schema::{MountInfo, MountStatus, PROTOCOL_VERSION, PeerIdentity, Status};
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
        "not bound yet",
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
