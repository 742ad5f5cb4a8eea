//! Bad input: clients of another protocol version, clients that are not
//! root on the filesystem socket, garbage on the sockets, names that are
//! too long, and a state directory that runs out of space.

use harness::daemons::control_answers;
use harness::{
    OTHER_UID, Options, Pattern, SYNCD_UID, assert_errno, hash_file, hash_reader, poll_until,
    run_as, run_bounded, setup,
};
use ipc_schema::PROTOCOL_VERSION;
use ipc_schema::handshake::{self, HandshakeError, Refusal, ServiceKind};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn numbers_in(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn speak_version(path: &Path, service: ServiceKind, version: u32) -> Result<(), HandshakeError> {
    let mut s = UnixStream::connect(path).expect("connect");
    let pair = ipc_schema::fdpass::channel_pair().expect("socketpair");
    let fd = (service == ServiceKind::Filesystem).then(|| pair.1.as_raw_fd());
    handshake::client_speaking(&mut s, service, fd, version)
}

#[test]
fn another_protocol_version_is_refused_naming_both_versions() {
    let (_w, fx) = setup("protocol version", LIMIT, Options::default());
    for (sock, service) in [
        (fx.fs_socket(), ServiceKind::Filesystem),
        (fx.control_socket(), ServiceKind::Control),
    ] {
        match speak_version(&sock, service, 999) {
            Err(HandshakeError::Refused {
                reason,
                server_version,
                message,
            }) => {
                assert_eq!(
                    reason,
                    Refusal::VersionMismatch as u8,
                    "{service:?}: {message}"
                );
                assert_eq!(server_version, PROTOCOL_VERSION);
                let nums = numbers_in(&message);
                assert!(
                    nums.contains(&999) && nums.contains(&(PROTOCOL_VERSION as u64)),
                    "{service:?}: the message names both versions: {message:?}"
                );
            }
            other => panic!("{service:?}: version 999 must be refused, got {other:?}"),
        }
        speak_version(&sock, service, PROTOCOL_VERSION)
            .unwrap_or_else(|e| panic!("{service:?}: our own version is accepted: {e}"));
    }
    fs::write(fx.path("after"), b"ok").expect("the mount still works");
}

#[test]
fn only_root_may_use_the_filesystem_socket() {
    let (_w, fx) = setup("fs socket credentials", LIMIT, Options::default());
    let probe = harness::binaries::probe();
    let sock = fx.fs_socket();
    // Positive control: root is let in.
    let out = run_bounded(Command::new(&probe).arg(&sock), Duration::from_secs(20));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "accepted",
        "root is accepted on the filesystem socket"
    );
    // syncd's own uid can reach the socket file, so this is SO_PEERCRED's
    // refusal, naming both uids.
    let out = run_as(
        SYNCD_UID,
        &format!("exec '{}' '{}'", probe.display(), sock.display()),
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        line.starts_with(&format!("refused {} ", Refusal::PermissionDenied as u8)),
        "uid {SYNCD_UID} must be refused with PermissionDenied: {line:?}"
    );
    let nums = numbers_in(&line);
    assert!(
        nums.contains(&(SYNCD_UID as u64)) && nums.contains(&0),
        "the refusal names the peer's uid and the allowed uid: {line:?}"
    );
    // Any other user: refused, or kept out by the socket's permissions.
    let out = run_as(
        OTHER_UID,
        &format!("exec '{}' '{}'", probe.display(), sock.display()),
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        line.starts_with(&format!("refused {} ", Refusal::PermissionDenied as u8))
            || line.starts_with(&format!("connect-error {} ", libc::EACCES)),
        "uid {OTHER_UID} must not get in: {line:?}"
    );
    assert_ne!(out.status.code(), Some(0));
    fs::write(fx.path("after"), b"ok").expect("the mount still works");
}

/// Read `s` to its end: the server must close it (EOF or a reset) before
/// the stream's read timeout, not leave it hanging.
#[track_caller]
fn closed_within_timeout(s: &mut UnixStream, after: &str) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("after {after} the server neither answered nor closed: {e}"),
    }
}

#[test]
fn garbage_on_the_sockets_harms_nothing() {
    let (_w, fx) = setup("garbage", LIMIT, Options::default());
    for sock in [fx.fs_socket(), fx.control_socket()] {
        let mut s = UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .expect("send garbage");
        // The server answers a refusal or just closes; it must not hang.
        closed_within_timeout(&mut s, "garbage preamble");
    }
    // A valid handshake followed by a frame header claiming 1 GiB.
    let mut s = UnixStream::connect(fx.control_socket()).expect("connect");
    handshake::client(&mut s, ServiceKind::Control, None).expect("handshake");
    s.write_all(&(1u32 << 30).to_be_bytes())
        .expect("send a huge frame length");
    // syncd may close the connection as soon as it reads the length, so
    // this write may meet EPIPE: that is the refusal we want, not an error.
    let _ = s.write_all(&[0u8; 4096]);
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    closed_within_timeout(&mut s, "a 1 GiB frame length");
    assert!(control_answers(&fx.control_socket()), "syncd still serves");
    fs::write(fx.path("after"), b"ok").expect("the mount still works");
    assert_eq!(fs::read(fx.path("after")).expect("read"), b"ok");
}

#[test]
fn a_256_byte_name_gets_enametoolong() {
    let (_w, fx) = setup("256-byte name", LIMIT, Options::default());
    assert_errno(
        File::create(fx.path("n".repeat(256))),
        libc::ENAMETOOLONG,
        "create with a 256-byte name",
    );
    File::create(fx.path("n".repeat(255))).expect("255 bytes is fine");
}

fn full_state_dir(passthrough: bool) {
    let (_w, mut fx) = setup(
        "ENOSPC",
        Duration::from_secs(180),
        Options {
            passthrough,
            state_tmpfs_bytes: Some(64 << 20),
            ..Options::default()
        },
    );
    const KEPT: u64 = 4 << 20;
    let kept = fx.path("kept");
    let want = hash_reader(Pattern::new(4).reader(KEPT)).expect("hash");
    {
        let mut f = File::create(&kept).expect("create kept");
        std::io::copy(&mut Pattern::new(4).reader(KEPT), &mut f).expect("write kept");
        f.sync_all().expect("fsync kept");
    }
    let filler = fx.path("filler");
    let mut f = File::create(&filler).expect("create filler");
    let chunk = Pattern::new(5).bytes(0, 1 << 20);
    let mut failed = None;
    for i in 0..128 {
        if let Err(e) = f.write_all(&chunk) {
            failed = Some((i, e));
            break;
        }
    }
    let (at, e) = failed.expect("writing 128 MiB into a 64 MiB state directory must fail");
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "the writer sees ENOSPC (after {at} MiB), got {e}"
    );
    drop(f);
    assert_eq!(
        hash_file(&kept).expect("hash kept"),
        (KEPT, want.1),
        "fsynced file intact"
    );
    fs::remove_file(&filler).expect("unlink the filler on a full state directory");
    // The filler's space comes back once the kernel forgets the unlinked
    // inode and syncd has made the free durable (the content file goes
    // only then).
    let free = |fx: &harness::KeibiFixture| {
        nix::sys::statvfs::statvfs(&fx.state_dir())
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0)
    };
    poll_until(
        "the unlinked filler's space to come back",
        Duration::from_secs(20),
        || (free(&fx) >= (at as u64 / 2) << 20).then_some(()),
    );
    fx.restart_both();
    assert_eq!(
        hash_file(&kept).expect("hash kept after restart"),
        (KEPT, want.1),
        "fsynced file intact after restarting both daemons"
    );
    fs::write(fx.path("after"), b"space again").expect("write after freeing space");
    fx.assert_io_path();
}

#[test]
fn full_state_dir_gives_enospc_and_loses_nothing_fsynced_passthrough() {
    full_state_dir(true);
}

#[test]
fn full_state_dir_gives_enospc_and_loses_nothing_fsynced_plain() {
    full_state_dir(false);
}

/// Operations done and refused with ENOSPC, by name.
#[derive(Debug, Default)]
struct Counts {
    done: std::collections::BTreeMap<String, u64>,
    refused: std::collections::BTreeMap<String, u64>,
}

/// The outcome of one metadata operation on a full state directory: done,
/// or refused with ENOSPC. Anything else (EIO from a store that gave up)
/// fails the test.
#[track_caller]
fn done_or_enospc<T>(r: std::io::Result<T>, what: &str, enospc: &mut Counts) -> bool {
    match r {
        Ok(_) => {
            *enospc.done.entry(what.to_string()).or_default() += 1;
            true
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
            *enospc.refused.entry(what.to_string()).or_default() += 1;
            false
        }
        Err(e) => panic!("{what} on a full state directory: expected success or ENOSPC, got {e}"),
    }
}

/// Fill the state directory through the mount, then make the metadata
/// store write a lot (thousands of creates, renames, chmods, truncates
/// and unlinks with long names) while it stays full: every operation must
/// succeed or give ENOSPC, and renames, chmods, truncates and unlinks must
/// go on once creates are refused. syncd, killed with SIGKILL, must start
/// again on the full disk (the last free page taken by another file); the
/// unlinks that free space must work, the reserve must be made again,
/// writes must work again once space is freed, and nothing fsynced may be
/// lost.
fn metadata_on_full_state_dir(passthrough: bool) {
    use std::os::unix::fs::PermissionsExt;
    let (_w, mut fx) = setup(
        "metadata on a full state directory",
        Duration::from_secs(300),
        Options {
            passthrough,
            state_tmpfs_bytes: Some(32 << 20),
            ..Options::default()
        },
    );
    const KEPT: u64 = 1 << 20;
    let kept = fx.path("kept");
    let want = hash_reader(Pattern::new(6).reader(KEPT)).expect("hash");
    {
        let mut f = File::create(&kept).expect("create kept");
        std::io::copy(&mut Pattern::new(6).reader(KEPT), &mut f).expect("write kept");
        f.sync_all().expect("fsync kept");
    }
    fs::create_dir(fx.path("many")).expect("mkdir many");
    // A file with content, unlinked when the store refuses the most.
    let victim = fx.path("victim");
    fs::write(&victim, Pattern::new(9).bytes(0, 256 << 10)).expect("write victim");
    let filler = fx.path("filler");
    let mut f = File::create(&filler).expect("create filler");
    let chunk = Pattern::new(7).bytes(0, 1 << 20);
    let mut failed = None;
    for i in 0..128 {
        if let Err(e) = f.write_all(&chunk) {
            failed = Some((i, e));
            break;
        }
    }
    let (at, e) = failed.expect("writing 128 MiB into a 32 MiB state directory must fail");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "after {at} MiB: {e}");
    drop(f);
    let log = fx.state_dir().join("db").join("db");
    let log_before = fs::metadata(&log).expect("sled's log file").len();
    // Names of 240 bytes make every record big, so the store's log must
    // grow while the filesystem is full. Rounds go on until the store has
    // refused something for lack of room, and one more round after that.
    let many = fx.path("many");
    let name = |i: usize| many.join(format!("{i:06}-{}", "n".repeat(233)));
    let renamed = |i: usize| many.join(format!("{i:06}-{}", "r".repeat(233)));
    let mut enospc = Counts::default();
    // (number, where the file is now) of every file made and not unlinked.
    let mut left: Vec<(usize, std::path::PathBuf)> = Vec::new();
    let mut refused_in = None;
    let mut frees_after_refusal = 0;
    for round in 0..12 {
        for i in round * 400..(round + 1) * 400 {
            if done_or_enospc(File::create(name(i)), "create", &mut enospc) {
                left.push((i, name(i)));
            }
        }
        if refused_in.is_none() && !enospc.refused.is_empty() {
            refused_in = Some(round);
        }
        let before = enospc.done.values().sum::<u64>();
        let mut still = Vec::new();
        for (i, mut at) in left.drain(..) {
            // A rename refused leaves the file where it was.
            let other = if at == name(i) { renamed(i) } else { name(i) };
            if done_or_enospc(fs::rename(&at, &other), "rename", &mut enospc) {
                at = other;
            }
            done_or_enospc(
                fs::set_permissions(&at, fs::Permissions::from_mode(0o600 + (i as u32 % 64))),
                "chmod",
                &mut enospc,
            );
            done_or_enospc(
                File::options()
                    .write(true)
                    .open(&at)
                    .and_then(|f| f.set_len(0)),
                "truncate",
                &mut enospc,
            );
            // Unlink half of this round's, so the next round's creates
            // reuse nothing.
            if i / 400 == round
                && i % 2 == 0
                && done_or_enospc(fs::remove_file(&at), "unlink", &mut enospc)
            {
                continue;
            }
            still.push((i, at));
        }
        left = still;
        if let Some(r) = refused_in {
            frees_after_refusal += enospc.done.values().sum::<u64>() - before;
            // Until the store refuses even renames, for a few rounds.
            if enospc.refused.contains_key("rename") || round >= r + 2 {
                break;
            }
        }
    }
    assert!(
        refused_in.is_some(),
        "the test must use up the room kept for the store (no operation got ENOSPC)"
    );
    assert!(
        frees_after_refusal > 0,
        "renames, chmods, truncates and unlinks go on once creates are refused: {enospc:?}"
    );
    let log_after = fs::metadata(&log).expect("sled's log file").len();
    eprintln!(
        "sled's log grew from {log_before} to {log_after} bytes on the full state directory; \
         {enospc:?}"
    );
    assert!(
        log_after > log_before,
        "the test must make the store write new log space on the full disk \
         ({log_before} -> {log_after} bytes)"
    );
    assert_eq!(
        hash_file(&kept).expect("hash kept"),
        (KEPT, want.1),
        "fsynced file intact"
    );
    let reserve = fx.state_dir().join("space-reserve");
    let reserve_blocks = || {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&reserve)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    };
    // The state directory is 32 MiB: 2 MiB of headroom and of reserve.
    assert!(
        reserve_blocks() < 2 << 20,
        "the reserve went to the store's log: {} bytes left",
        reserve_blocks()
    );
    // syncd starts on the full disk: make the store durable (fsync is
    // always admitted), SIGKILL syncd and start it again.
    File::open(&kept)
        .and_then(|f| f.sync_all())
        .expect("fsync on a full state directory");
    fx.kill9_syncd();
    // Whatever space is left on the filesystem, another program takes.
    let other = fx.state_dir().join("other-program");
    {
        let mut f = File::create(&other).expect("create other-program");
        let page = [0u8; 4096];
        let e = loop {
            if let Err(e) = f.write_all(&page) {
                break e;
            }
        };
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling up: {e}");
    }
    fx.start_syncd();
    poll_until(
        "the mount to list a directory after syncd's restart",
        Duration::from_secs(30),
        || fs::read_dir(fx.path("many")).ok().map(|d| d.count()),
    );
    for (i, at) in left.iter_mut().take(20) {
        let other = if *at == name(*i) {
            renamed(*i)
        } else {
            name(*i)
        };
        if done_or_enospc(fs::rename(&at, &other), "rename after restart", &mut enospc) {
            *at = other;
        }
    }
    // An unlink that frees content is admitted whatever the level.
    fs::remove_file(&other).expect("remove other-program");
    fs::remove_file(&victim).expect("unlink a file with content on a full state directory");
    fs::remove_file(&filler).expect("unlink the filler on a full state directory");
    // Once the filler's space is back (its content file goes after the
    // free is durable), writes work again.
    let after = fx.path("after");
    let data = Pattern::new(8).bytes(0, 1 << 20);
    poll_until(
        "a write to work after freeing space",
        Duration::from_secs(30),
        || {
            let r = File::create(&after).and_then(|mut f| {
                f.write_all(&data)?;
                f.sync_all()
            });
            match r {
                Ok(()) => Some(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => None,
                Err(e) => {
                    panic!("writing after freeing space: expected success or ENOSPC, got {e}")
                }
            }
        },
    );
    for (_, at) in &left {
        fs::remove_file(at).expect("unlink after freeing space");
    }
    poll_until(
        "the reserve to be made again",
        Duration::from_secs(10),
        || (reserve_blocks() >= 2 << 20).then_some(()),
    );
    File::create(fx.path("new")).expect("create after freeing space");
    fx.restart_both();
    assert_eq!(
        hash_file(&kept).expect("hash kept after restart"),
        (KEPT, want.1),
        "fsynced file intact after restarting both daemons"
    );
    assert_eq!(
        fs::read(&after).expect("read after"),
        data,
        "fsynced after restart"
    );
    fx.assert_io_path();
}

#[test]
fn metadata_on_a_full_state_dir_never_breaks_the_store_passthrough() {
    metadata_on_full_state_dir(true);
}

#[test]
fn metadata_on_a_full_state_dir_never_breaks_the_store_plain() {
    metadata_on_full_state_dir(false);
}
