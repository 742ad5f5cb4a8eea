//! The peer identity on a real syncd: `keibictl id --json` gives a
//! fingerprint that survives a restart; the identity file is mode 0600 and
//! owned by syncd's user; a truncated identity file stops the next syncd
//! with exit status 4 and a message naming the file, and the file is left
//! as it was (never regenerated).

use harness::process::run_bounded;
use harness::{Options, SYNCD_UID, binaries, setup};
use ipc_schema::PeerIdentity;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// syncd's exit status for an identity file it cannot use (README).
const EXIT_IDENTITY: i32 = 4;

fn id(control: &Path) -> PeerIdentity {
    let out = run_bounded(
        Command::new(binaries::binary("keibictl"))
            .arg("--socket")
            .arg(control)
            .args(["id", "--json"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(0), "keibictl id: {out:?}");
    serde_json::from_slice(&out.stdout).expect("keibictl id --json prints a PeerIdentity")
}

#[test]
fn identity_persists_is_private_and_a_corrupt_file_stops_syncd() {
    let (_w, mut fx) = setup("identity", Duration::from_secs(120), Options::default());
    let first = id(&fx.control_socket());
    assert_eq!(first.fingerprint.len(), 52, "{first:?}");
    assert!(
        first
            .fingerprint
            .bytes()
            .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(&c)),
        "not base32: {first:?}"
    );
    assert_eq!(first.public_key.len(), 64, "{first:?}");
    // The fixture's syncd is dial only (`listen = []`, see
    // `syncd_command`); the peer tests check bound addresses.
    assert!(first.listen.is_empty(), "{first:?}");

    let file = fx.state_dir().join("identity");
    let meta = fs::metadata(&file).expect("the identity file exists");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "{meta:?}");
    assert_eq!(meta.uid(), SYNCD_UID, "owned by syncd's user");

    fx.restart_syncd();
    let again = id(&fx.control_socket());
    assert_eq!(again, first, "the same identity after a restart");

    let (st, clean) = fx.stop_syncd();
    assert!(clean && st.success(), "syncd stopped cleanly: {st}");
    let bytes = fs::read(&file).expect("read identity");
    let truncated = &bytes[..bytes.len() / 2];
    fs::write(&file, truncated).expect("truncate the identity file");
    let modified = fs::metadata(&file)
        .expect("stat")
        .modified()
        .expect("mtime");

    let out = run_bounded(
        &mut harness::daemons::syncd_command(
            &fx.state_dir(),
            &fx.fs_socket(),
            &fx.control_socket(),
            &fx.syncd_log_path(),
        ),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_IDENTITY), "{out:?}");
    assert!(
        err.contains(&file.display().to_string()) && err.contains("corrupt"),
        "the message names the file and what is wrong: {err}"
    );
    assert_eq!(
        fs::read(&file).expect("read identity"),
        truncated,
        "the file is left as it was"
    );
    assert_eq!(
        fs::metadata(&file)
            .expect("stat")
            .modified()
            .expect("mtime"),
        modified,
        "not rewritten"
    );
    assert!(
        !fx.control_socket().exists(),
        "syncd stopped before binding its sockets"
    );
}

#[test]
fn a_bad_listen_address_stops_syncd_with_a_config_error() {
    let _w = harness::Watchdog::arm("identity-listen", Duration::from_secs(60));
    let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = dir.path().join("syncd.toml");
    fs::write(
        &config,
        "listen = [\"0.0.0.0:58150\", \"peer.example:58150\"]\n",
    )
    .expect("write config");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run_bounded(
        harness::daemons::syncd_command(
            &dir.path().join("state"),
            &dir.path().join("fs.sock"),
            &dir.path().join("control.sock"),
            &dir.path().join("syncd.log"),
        )
        .arg("--config")
        .arg(&config),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        err.contains("listen address \"peer.example:58150\" is not IP:PORT"),
        "{err}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "nothing made before the config is good"
    );
}
