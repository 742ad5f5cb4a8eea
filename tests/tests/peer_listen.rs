//! Binding the peer `listen` addresses on a real syncd: a port that is
//! taken stops syncd at start with exit status 1 and one line naming the
//! address and the errno (before any local socket exists); the IPv4 and
//! IPv6 wildcards on one port are two sockets that coexist
//! (`IPV6_V6ONLY`), both reported by `keibictl id`.

use harness::daemons::{control_answers, spawn_registered, syncd_command, terminate};
use harness::process::run_bounded;
use harness::wait::poll_until;
use harness::{SYNCD_UID, binaries};
use ipc_schema::PeerIdentity;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A directory syncd (nobody) can make its state directory in, with a
/// config file holding `listen`.
fn workdir(listen: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    nix::unistd::chown(
        dir.path(),
        Some(nix::unistd::Uid::from_raw(SYNCD_UID)),
        Some(nix::unistd::Gid::from_raw(SYNCD_UID)),
    )
    .expect("chown to syncd's user");
    let config = dir.path().join("syncd.toml");
    fs::write(&config, format!("listen = {listen}\n")).expect("write config");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).expect("chmod");
    dir
}

fn command(dir: &Path) -> Command {
    let mut cmd = syncd_command(
        &dir.join("state"),
        &dir.join("fs.sock"),
        &dir.join("control.sock"),
        &dir.join("syncd.log"),
    );
    cmd.arg("--config").arg(dir.join("syncd.toml"));
    cmd
}

#[test]
fn a_taken_listen_port_stops_syncd_naming_the_address_and_errno() {
    let _w = harness::Watchdog::arm("peer-listen-taken", Duration::from_secs(60));
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let addr = holder.local_addr().expect("address");
    let dir = workdir(&format!("[\"{addr}\"]"));
    let out = run_bounded(&mut command(dir.path()), Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = err
        .lines()
        .find(|l| l.contains("cannot listen"))
        .unwrap_or_else(|| panic!("no line about listening: {err}"));
    assert!(
        line.contains(&addr.to_string()) && line.contains("EADDRINUSE"),
        "names the address and the errno: {line}"
    );
    assert!(
        !dir.path().join("control.sock").exists() && !dir.path().join("fs.sock").exists(),
        "no local socket was bound"
    );
    drop(holder);
}

#[test]
fn ipv4_and_ipv6_wildcards_on_one_port_both_bind() {
    let _w = harness::Watchdog::arm("peer-listen-dual", Duration::from_secs(60));
    let port = harness::peers::free_port();
    let dir = workdir(&format!("[\"0.0.0.0:{port}\", \"[::]:{port}\"]"));
    let mut child = spawn_registered(&mut command(dir.path()), "keibi-syncd");
    let control = dir.path().join("control.sock");
    let exited = poll_until("syncd to answer", Duration::from_secs(20), || {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(Some(st));
        }
        control_answers(&control).then_some(None)
    });
    if let Some(st) = exited {
        let log = fs::read_to_string(dir.path().join("syncd.log")).unwrap_or_default();
        panic!("syncd exited at start ({st}):\n{log}");
    }
    let out = run_bounded(
        Command::new(binaries::binary("keibictl"))
            .arg("--socket")
            .arg(&control)
            .args(["id", "--json"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let id: PeerIdentity = serde_json::from_slice(&out.stdout).expect("a PeerIdentity");
    assert_eq!(
        id.listen,
        [format!("0.0.0.0:{port}"), format!("[::]:{port}")],
        "both bound"
    );
    // Both really accept.
    for a in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        std::net::TcpStream::connect(&a).unwrap_or_else(|e| panic!("connect {a}: {e}"));
    }
    let (st, clean) = terminate(&mut child, Duration::from_secs(10));
    assert!(clean && st.success(), "syncd stopped cleanly: {st}");
}
