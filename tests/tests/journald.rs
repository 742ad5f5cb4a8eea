//! Logs to the systemd journal, received by the test itself.
//!
//! `tracing-journald` always sends to `/run/systemd/journal/socket`, so each
//! daemon runs in a private mount namespace (`unshare -m`) with a tmpfs over
//! `/run/systemd` and the test's own directory bound at
//! `/run/systemd/journal`: the test binds a Unix datagram socket there
//! (`<dir>/journal/socket`), reads each datagram and parses the journal's
//! native protocol (`KEY=value` lines, or `KEY`, a 64-bit little-endian
//! length and the raw value, for values with a newline). No journald is
//! needed, and one running on the machine is not touched.
//!
//! "Run by systemd" is what systemd tells a service: `JOURNAL_STREAM` set
//! to the device and inode of its stderr. The daemons' stderr is a file,
//! whose device and inode the test puts there.

use harness::daemons::{START_TIMEOUT, STOP_TIMEOUT, make_dir, spawn_registered, terminate};
use harness::{SYNCD_UID, Watchdog, binaries, bounded, poll_until};
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// One journal entry: its fields in order (a key may repeat).
#[derive(Clone)]
struct Entry(Vec<(String, Vec<u8>)>);

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, String::from_utf8_lossy(v))))
            .finish()
    }
}

impl Entry {
    /// The first value of `key`, as text.
    fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    fn message(&self) -> String {
        self.get("MESSAGE").unwrap_or_default()
    }

    fn priority(&self) -> u8 {
        self.get("PRIORITY")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("an entry without a numeric PRIORITY: {self:?}"))
    }
}

/// Parse one datagram of the native protocol: `KEY=value\n`, or
/// `KEY\n` + u64 LE length + value + `\n` (the form for binary values and
/// values holding a newline).
fn parse_native(mut buf: &[u8]) -> Result<Entry, String> {
    let mut fields = Vec::new();
    while !buf.is_empty() {
        let nl = buf
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("a field without a newline: {buf:?}"))?;
        let line = &buf[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            let key = String::from_utf8(line[..eq].to_vec()).map_err(|e| e.to_string())?;
            fields.push((key, line[eq + 1..].to_vec()));
            buf = &buf[nl + 1..];
        } else {
            let key = String::from_utf8(line.to_vec()).map_err(|e| e.to_string())?;
            let rest = &buf[nl + 1..];
            let len_bytes: [u8; 8] = rest
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("{key}: no length"))?;
            let len = u64::from_le_bytes(len_bytes) as usize;
            let value = rest
                .get(8..8 + len)
                .ok_or_else(|| format!("{key}: value shorter than its length {len}"))?;
            if rest.get(8 + len) != Some(&b'\n') {
                return Err(format!("{key}: no newline after the value"));
            }
            fields.push((key, value.to_vec()));
            buf = &rest[8 + len + 1..];
        }
        let key = &fields.last().expect("just pushed").0;
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!("not a journal field name: {key:?}"));
        }
    }
    Ok(Entry(fields))
}

#[test]
fn the_parser_reads_both_forms_of_a_field() {
    let mut buf = b"MESSAGE=hello\nPRIORITY=6\n".to_vec();
    buf.extend_from_slice(b"F_TEXT\n");
    buf.extend_from_slice(&(11u64).to_le_bytes());
    buf.extend_from_slice(b"two\nlines=x\n");
    buf.extend_from_slice(b"TARGET=a::b\n");
    let e = parse_native(&buf).expect("parses");
    assert_eq!(e.message(), "hello");
    assert_eq!(e.priority(), 6);
    assert_eq!(e.get("F_TEXT").as_deref(), Some("two\nlines=x"));
    assert_eq!(e.get("TARGET").as_deref(), Some("a::b"));
    assert!(parse_native(b"MESSAGE=no newline").is_err());
    assert!(parse_native(b"lower=case\n").is_err());
    let mut short = b"F_X\n".to_vec();
    short.extend_from_slice(&(5u64).to_le_bytes());
    short.extend_from_slice(b"ab\n");
    assert!(parse_native(&short).is_err());
}

/// The test's directory, its journal socket and the daemon's stderr file.
struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    journal: UnixDatagram,
    entries: Vec<Entry>,
}

impl Setup {
    fn new() -> Setup {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests need root (a private mount namespace per daemon)"
        );
        let dir = tempfile::Builder::new()
            .prefix("kbj")
            .tempdir_in("/tmp")
            .expect("create a temporary directory under /tmp");
        let root = dir.path().to_path_buf();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        make_dir(&root.join("journal"), 0, 0, 0o755);
        let socket = root.join("journal/socket");
        let journal = UnixDatagram::bind(&socket).expect("bind the journal socket");
        // syncd runs as nobody and must be able to send to it.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))
            .expect("chmod the journal socket");
        Setup {
            _dir: dir,
            root,
            journal,
            entries: Vec::new(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Every datagram that has arrived by now, parsed (empty ones, the
    /// layer's check that the socket answers, are skipped).
    fn drain(&mut self) -> &[Entry] {
        self.journal.set_nonblocking(true).expect("nonblocking");
        let mut buf = vec![0u8; 1 << 17];
        loop {
            match self.journal.recv(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    let e = parse_native(&buf[..n]).unwrap_or_else(|err| {
                        panic!(
                            "a datagram that is not a journal entry ({err}): {:?}",
                            String::from_utf8_lossy(&buf[..n])
                        )
                    });
                    self.entries.push(e);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("recv on the journal socket: {e}"),
            }
        }
        &self.entries
    }

    /// Wait (bounded) for an entry whose MESSAGE is `message`.
    fn wait_for(&mut self, message: &str, timeout: Duration) -> Entry {
        poll_until(&format!("a journal entry {message:?}"), timeout, || {
            self.drain()
                .iter()
                .find(|e| e.message() == message)
                .cloned()
        })
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.path("stderr.log")).unwrap_or_default()
    }
}

/// How the daemon sees the journal.
#[derive(Clone, Copy, PartialEq)]
enum Journal {
    /// The test's socket at /run/systemd/journal/socket.
    Bound,
    /// /run/systemd/journal exists but holds no socket.
    Missing,
}

/// `program args` in a private mount namespace where
/// /run/systemd/journal is the test's directory (or empty), as `uid`, its
/// stdout and stderr appended to `<dir>/stderr.log`, and `JOURNAL_STREAM`
/// naming that file when `systemd_like`. `unshare`, `sh` and `setpriv` all
/// exec, so the child's pid is the daemon's.
fn start_in_namespace(
    s: &Setup,
    journal: Journal,
    systemd_like: bool,
    uid: u32,
    program: &Path,
    args: &[OsString],
    env: &[(&str, &str)],
) -> Child {
    let script = r#"set -e
if [ -d /run/systemd ]; then
    mount -t tmpfs -o mode=0755,size=64k keibi-test /run/systemd
else
    mount -t tmpfs -o mode=0755,size=64k keibi-test /run
    mkdir /run/systemd
fi
mkdir /run/systemd/journal
if [ "$KEIBI_TEST_JOURNAL" != none ]; then
    mount --bind "$KEIBI_TEST_JOURNAL" /run/systemd/journal
fi
unset KEIBI_TEST_JOURNAL
exec "$@"
"#;
    let stderr_path = s.path("stderr.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&stderr_path)
        .expect("open the stderr file");
    let meta = log.metadata().expect("stat the stderr file");
    let mut cmd = Command::new("unshare");
    cmd.arg("-m")
        .arg("--propagation")
        .arg("private")
        .arg("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg("--pdeathsig=SIGKILL")
        .arg(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env(
            "KEIBI_TEST_JOURNAL",
            match journal {
                Journal::Bound => s.path("journal").into_os_string(),
                Journal::Missing => "none".into(),
            },
        )
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup the stderr file"))
        .stderr(log);
    if systemd_like {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: prctl only, in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    spawn_registered(&mut cmd, "a daemon in a private mount namespace")
}

/// A syncd as `nobody` on the setup's paths, dial only.
fn start_syncd(
    s: &Setup,
    journal: Journal,
    systemd_like: bool,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Daemon {
    make_dir(&s.path("state"), SYNCD_UID, SYNCD_UID, 0o700);
    make_dir(&s.path("run"), SYNCD_UID, SYNCD_UID, 0o755);
    let mut args: Vec<OsString> = vec![
        "--state-dir".into(),
        s.path("state").into(),
        "--fs-socket".into(),
        s.path("run/fs.sock").into(),
        "--control-socket".into(),
        s.path("run/control.sock").into(),
        "--listen".into(),
        "none".into(),
        // No /etc/keibi/syncd.toml of the machine.
        "--config".into(),
        "/dev/null".into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    let child = start_in_namespace(
        s,
        journal,
        systemd_like,
        SYNCD_UID,
        &binaries::syncd(),
        &args,
        env,
    );
    Daemon(Some(child))
}

/// Stops the daemon (SIGTERM, then SIGKILL) even when the test panics.
struct Daemon(Option<Child>);

impl Daemon {
    fn pid(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// SIGTERM; the exit code.
    fn stop(&mut self) -> Option<i32> {
        let mut child = self.0.take().expect("running");
        let (status, by_itself) = terminate(&mut child, STOP_TIMEOUT);
        assert!(
            by_itself,
            "the daemon did not exit within {STOP_TIMEOUT:?} of SIGTERM"
        );
        status.code()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            terminate(&mut c, STOP_TIMEOUT);
        }
    }
}

#[test]
fn syncd_run_by_systemd_sends_structured_entries_to_the_journal() {
    let _w = Watchdog::arm(
        "syncd_run_by_systemd_sends_structured_entries_to_the_journal",
        LIMIT,
    );
    let mut s = Setup::new();
    let mut d = start_syncd(
        &s,
        Journal::Bound,
        true,
        &[("RUST_LOG", "info,tarpc=off")],
        &[],
    );
    let ready = s.wait_for("keibi-syncd ready", START_TIMEOUT);
    assert_eq!(ready.priority(), 6, "info is PRIORITY 6: {ready:?}");
    assert_eq!(
        ready.get("TARGET").as_deref(),
        Some("keibi_syncd"),
        "{ready:?}"
    );
    assert_eq!(
        ready.get("SYSLOG_IDENTIFIER").as_deref(),
        Some("keibi-syncd"),
        "{ready:?}"
    );
    assert_eq!(
        ready.get("F_STATE_DIR"),
        Some(s.path("state").display().to_string()),
        "{ready:?}"
    );
    assert_eq!(
        ready.get("F_CONTROL_SOCKET"),
        Some(s.path("run/control.sock").display().to_string()),
        "{ready:?}"
    );
    assert_eq!(
        ready.get("F_PROTOCOL"),
        Some(ipc_schema::PROTOCOL_VERSION.to_string()),
        "{ready:?}"
    );
    assert!(
        ready
            .get("CODE_FILE")
            .is_some_and(|f| f.ends_with("main.rs")),
        "{ready:?}"
    );
    assert!(
        ready
            .get("CODE_LINE")
            .is_some_and(|l| l.parse::<u32>().is_ok()),
        "{ready:?}"
    );
    // Another module's entry carries its own target and fields.
    let engine = s.wait_for("sync engine started", START_TIMEOUT);
    assert!(
        engine.get("F_DEVICE").is_some_and(|d| !d.is_empty()),
        "{engine:?}"
    );
    let identity = s.wait_for("peer identity", START_TIMEOUT);
    assert_eq!(
        identity.get("F_CREATED").as_deref(),
        Some("true"),
        "{identity:?}"
    );
    assert_eq!(d.stop(), Some(0));
    s.wait_for("store flushed; bye", STOP_TIMEOUT);
    // The records went to the journal only, not also to stderr.
    let stderr = s.stderr_text();
    assert!(
        !stderr.contains("keibi-syncd ready"),
        "also on stderr:\n{stderr}"
    );
}

#[test]
fn rust_log_still_filters_what_reaches_the_journal() {
    let _w = Watchdog::arm("rust_log_still_filters_what_reaches_the_journal", LIMIT);
    let mut s = Setup::new();
    let _d = start_syncd(&s, Journal::Bound, true, &[("RUST_LOG", "warn")], &[]);
    let control = s.path("run/control.sock");
    poll_until("syncd's control socket", START_TIMEOUT, || {
        control.exists().then_some(())
    });
    // A warning on demand: syncd puts back a removed lock file (checked
    // every 2 s) and says so at warn level. Every info line of the start
    // ("keibi-syncd ready" among them) was logged before, on the same
    // thread as that check.
    std::fs::remove_file(s.path("state/lock")).expect("remove syncd's lock file");
    let warned = s.wait_for(
        "the lock file was removed or replaced; restored it",
        Duration::from_secs(20),
    );
    assert_eq!(warned.priority(), 4, "warn is PRIORITY 4: {warned:?}");
    let entries = s.drain().to_vec();
    let chatty: Vec<_> = entries.iter().filter(|e| e.priority() > 4).collect();
    assert!(
        chatty.is_empty(),
        "RUST_LOG=warn let these through: {chatty:?}"
    );
    assert!(
        !entries.iter().any(|e| e.message() == "keibi-syncd ready"),
        "{entries:?}"
    );
}

#[test]
fn without_a_matching_journal_stream_syncd_logs_to_stderr() {
    let _w = Watchdog::arm(
        "without_a_matching_journal_stream_syncd_logs_to_stderr",
        LIMIT,
    );
    let mut s = Setup::new();
    // The socket is there, but JOURNAL_STREAM names another file: stderr
    // is not the journal's, so `auto` keeps to stderr.
    let _d = start_syncd(&s, Journal::Bound, false, &[("JOURNAL_STREAM", "1:2")], &[]);
    poll_until("\"keibi-syncd ready\" on stderr", START_TIMEOUT, || {
        s.stderr_text().contains("keibi-syncd ready").then_some(())
    });
    assert!(
        s.drain().is_empty(),
        "entries in the journal: {:?}",
        s.entries
    );
    // `--log-target journal` sends there whatever JOURNAL_STREAM says.
    let mut t = Setup::new();
    let _e = start_syncd(&t, Journal::Bound, false, &[], &["--log-target", "journal"]);
    t.wait_for("keibi-syncd ready", START_TIMEOUT);
}

#[test]
fn a_journal_that_cannot_be_reached_falls_back_to_stderr_with_one_warning() {
    let _w = Watchdog::arm(
        "a_journal_that_cannot_be_reached_falls_back_to_stderr_with_one_warning",
        LIMIT,
    );
    let s = Setup::new();
    let mut d = start_syncd(
        &s,
        Journal::Missing,
        false,
        &[("KEIBI_LOG_TARGET", "journal")],
        &[],
    );
    poll_until("\"keibi-syncd ready\" on stderr", START_TIMEOUT, || {
        s.stderr_text().contains("keibi-syncd ready").then_some(())
    });
    let stderr = s.stderr_text();
    let warnings: Vec<_> = stderr
        .lines()
        .filter(|l| l.contains("cannot open the journal's socket"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("WARN"), "{stderr}");
    assert_eq!(d.stop(), Some(0), "{}", s.stderr_text());
}

#[test]
fn mountd_run_by_systemd_sends_its_operations_with_their_fields() {
    let _w = Watchdog::arm(
        "mountd_run_by_systemd_sends_its_operations_with_their_fields",
        LIMIT,
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test mounts"
    );
    let mut s = Setup::new();
    make_dir(&s.path("mnt"), 0, 0, 0o755);
    make_dir(&s.path("locks"), 0, 0, 0o755);
    // No syncd: the mount serves at once and its operations fail after
    // the deadline, which is all this test needs of them.
    let args: Vec<OsString> = vec![
        s.path("mnt").into(),
        "--syncd-socket".into(),
        s.path("no-syncd.sock").into(),
        "--lock-dir".into(),
        s.path("locks").into(),
        "--deadline".into(),
        "300ms".into(),
    ];
    let mut d = Daemon(Some(start_in_namespace(
        &s,
        Journal::Bound,
        true,
        0,
        &binaries::mountd(),
        &args,
        &[("RUST_LOG", "info,keibi_mountd::fuse=debug,tarpc=off")],
    )));
    let mounted = s.wait_for("mounted", START_TIMEOUT);
    assert_eq!(mounted.priority(), 6, "{mounted:?}");
    assert_eq!(
        mounted.get("TARGET").as_deref(),
        Some("keibi_mountd"),
        "{mounted:?}"
    );
    assert_eq!(
        mounted.get("SYSLOG_IDENTIFIER").as_deref(),
        Some("keibi-mountd"),
        "{mounted:?}"
    );
    assert_eq!(
        mounted.get("F_MOUNTPOINT"),
        Some(s.path("mnt").display().to_string()),
        "{mounted:?}"
    );
    assert_eq!(
        mounted.get("F_DEADLINE_MS").as_deref(),
        Some("300"),
        "{mounted:?}"
    );
    // The mount exists in mountd's namespace only: reach it through
    // /proc/PID/root. Its getattr fails (no syncd) and is logged at debug.
    let through = PathBuf::from(format!("/proc/{}/root{}", d.pid(), s.path("mnt").display()));
    let stat = bounded(Duration::from_secs(20), move || {
        std::fs::metadata(&through).map(|_| ())
    })
    .expect("stat through the mount returned");
    assert!(stat.is_err(), "getattr without syncd succeeded");
    let op = poll_until(
        "a journal entry of mountd's getattr",
        Duration::from_secs(20),
        || {
            s.drain()
                .iter()
                .find(|e| {
                    e.get("F_OP").as_deref() == Some("getattr")
                        && e.get("TARGET").as_deref() == Some("keibi_mountd::fuse")
                })
                .cloned()
        },
    );
    assert_eq!(op.priority(), 7, "debug is PRIORITY 7: {op:?}");
    assert_eq!(
        op.get("TARGET").as_deref(),
        Some("keibi_mountd::fuse"),
        "{op:?}"
    );
    assert_eq!(op.get("F_INO").as_deref(), Some("1"), "{op:?}");
    assert_eq!(op.get("F_RESULT").as_deref(), Some("ETIMEDOUT"), "{op:?}");
    assert!(
        op.get("F_ERROR").is_some() && op.get("F_MS").is_some(),
        "{op:?}"
    );
    assert_eq!(d.stop(), Some(0), "{}", s.stderr_text());
    // Sent before mountd exited.
    s.wait_for("unmounting", Duration::from_secs(1));
}
