//! [`PeerNode`]: one `keibi-syncd` without a mount, listening for peers on
//! a free port of 127.0.0.1, driven through `keibictl --json`.
//!
//! The peer-channel tests start two or three of these in one test and pair
//! them. Each node owns a short temporary directory under `/tmp`:
//!
//! ```text
//! /tmp/kbXXXXXX/          0755 root
//!   syncd.toml            listen = ["127.0.0.1:PORT"], short peer timers
//!   state/                syncd's state directory (nobody): store, identity
//!   run/fs.sock           filesystem socket (unused: no mountd)
//!   run/control.sock      control socket, for keibictl
//!   syncd.log             syncd's stdout and stderr, appended across restarts
//! ```
//!
//! syncd runs as `nobody`, exactly as in [`crate::KeibiFixture`] (the same
//! [`crate::daemons::syncd_command`]). Every wait is a bounded poll. `Drop`
//! SIGCONTs and stops syncd (SIGTERM, then SIGKILL), prints the tail of the
//! log when the test is panicking, and removes the directory (kept with
//! `KEIBI_TEST_KEEP=1`).
//!
//! The peer state is read from `keibictl peer list --json` as untyped JSON
//! ([`serde_json::Value`]): the tests check the documented field names
//! themselves, so a renamed field fails a test instead of being absorbed
//! by a shared type.

use crate::daemons::{
    START_TIMEOUT, control_answers, duration_arg, log_tail, make_dir, spawn_registered,
    syncd_command, terminate,
};
use crate::process::{run_bounded, signal};
use crate::wait::{poll_until, try_poll_until};
use crate::{SYNCD_UID, binaries, watchdog};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::Duration;

/// The test hook that makes syncd claim another peer protocol version.
pub const PROTOCOL_ENV: &str = "KEIBI_TEST_PEER_PROTOCOL";

/// How a [`PeerNode`]'s syncd is configured.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `peer_timeout`: keepalive and handshake bound.
    pub peer_timeout: Duration,
    /// `peer_reconnect_max`: the longest pause between dial attempts.
    pub reconnect_max: Duration,
    /// `peer_rekey_bytes` (syncd's default when `None`).
    pub rekey_bytes: Option<u64>,
    /// `peer_rekey_interval` (syncd's default when `None`).
    pub rekey_interval: Option<Duration>,
    /// Listen on 127.0.0.1 (false: `listen = []`, dial only).
    pub listen: bool,
    /// Listen on this port instead of a free one (e.g. to take the place of
    /// a stopped node).
    pub port: Option<u16>,
    /// Extra environment for syncd (test hooks).
    pub env: Vec<(String, String)>,
    /// `peer_aead` (syncd's default, `auto`, when `None`).
    pub aead: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            peer_timeout: Duration::from_secs(2),
            reconnect_max: Duration::from_secs(2),
            rekey_bytes: None,
            rekey_interval: None,
            listen: true,
            port: None,
            env: Vec::new(),
            aead: None,
        }
    }
}

/// A port of 127.0.0.1 that nothing listens on now (the kernel's choice
/// for a listener bound to port 0, closed again).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local address").port()
}

/// One syncd listening for peers. See the module docs.
pub struct PeerNode {
    name: String,
    cfg: NodeConfig,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    port: u16,
    syncd: Option<Child>,
    fingerprint: String,
}

impl PeerNode {
    /// Start a node called `name` (used as its peer name by [`pair`] and
    /// in messages) and wait until its control socket answers.
    pub fn start(name: &str, cfg: NodeConfig) -> PeerNode {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the end-to-end tests must run as root (they start syncd as nobody)"
        );
        binaries::syncd();
        binaries::binary("keibictl");
        let dir = tempfile::Builder::new()
            .prefix("kb")
            .tempdir_in("/tmp")
            .expect("create a temporary directory under /tmp");
        let root = dir.path().to_path_buf();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the node directory");
        let mut node = PeerNode {
            name: name.to_string(),
            port: cfg.port.unwrap_or_else(free_port),
            cfg,
            dir: Some(dir),
            root,
            syncd: None,
            fingerprint: String::new(),
        };
        watchdog::register_log(node.log_path());
        make_dir(&node.state_dir(), SYNCD_UID, SYNCD_UID, 0o700);
        make_dir(&node.root.join("run"), SYNCD_UID, SYNCD_UID, 0o755);
        // A free port can be taken by someone else between our probe and
        // syncd's bind: try another one a few times (only when we chose).
        let mut attempts = 0;
        loop {
            node.write_config();
            match node.try_start() {
                Ok(()) => break,
                Err(why)
                    if node.cfg.port.is_none()
                        && attempts < 4
                        && why.contains("Address already in use") =>
                {
                    attempts += 1;
                    node.port = free_port();
                }
                Err(why) => panic!("{why}"),
            }
        }
        node.fingerprint = node.id()["fingerprint"]
            .as_str()
            .expect("keibictl id --json has a string `fingerprint`")
            .to_string();
        node
    }

    fn write_config(&self) {
        let mut text = String::new();
        if self.cfg.listen {
            text.push_str(&format!("listen = [\"127.0.0.1:{}\"]\n", self.port));
        } else {
            text.push_str("listen = []\n");
        }
        text.push_str(&format!(
            "peer_timeout = \"{}\"\npeer_reconnect_max = \"{}\"\n",
            duration_arg(self.cfg.peer_timeout),
            duration_arg(self.cfg.reconnect_max)
        ));
        if let Some(b) = self.cfg.rekey_bytes {
            text.push_str(&format!("peer_rekey_bytes = {b}\n"));
        }
        if let Some(d) = self.cfg.rekey_interval {
            text.push_str(&format!("peer_rekey_interval = \"{}\"\n", duration_arg(d)));
        }
        if let Some(a) = &self.cfg.aead {
            text.push_str(&format!("peer_aead = \"{a}\"\n"));
        }
        std::fs::write(self.config_path(), text).expect("write syncd.toml");
        std::fs::set_permissions(self.config_path(), std::fs::Permissions::from_mode(0o644))
            .expect("chmod syncd.toml");
    }

    /// Start syncd; `Err` with the log tail when it exits during start-up.
    fn try_start(&mut self) -> Result<(), String> {
        assert!(
            self.syncd.is_none(),
            "{}: syncd is already running",
            self.name
        );
        let mut cmd = syncd_command(
            &self.state_dir(),
            &self.root.join("run/fs.sock"),
            &self.control_socket(),
            &self.log_path(),
        );
        cmd.arg("--config").arg(self.config_path());
        cmd.envs(self.cfg.env.iter().map(|(k, v)| (k, v)));
        let log_len = std::fs::metadata(self.log_path())
            .map(|m| m.len())
            .unwrap_or(0);
        let mut child = spawn_registered(&mut cmd, "keibi-syncd");
        let ctl = self.control_socket();
        let exited = poll_until(
            &format!("{}: keibi-syncd's control socket to answer", self.name),
            START_TIMEOUT,
            || {
                if let Ok(Some(st)) = child.try_wait() {
                    return Some(Some(st));
                }
                control_answers(&ctl).then_some(None)
            },
        );
        if let Some(st) = exited {
            watchdog::unregister_pid(child.id());
            let log = self.log();
            let new = log.get(log_len as usize..).unwrap_or(&log);
            return Err(format!(
                "{}: keibi-syncd exited during start-up ({st}):\n{new}",
                self.name
            ));
        }
        self.syncd = Some(child);
        Ok(())
    }

    /// Start syncd again after [`Self::stop`] or [`Self::kill9`] (same
    /// port, same state, same identity).
    pub fn start_again(&mut self) {
        if let Err(why) = self.try_start() {
            panic!("{why}");
        }
    }

    /// Stop syncd with SIGTERM (SIGKILL after 10 s); its exit status and
    /// whether it exited by itself.
    pub fn stop(&mut self) -> (ExitStatus, bool) {
        let mut child = self.syncd.take().expect("syncd is not running");
        terminate(&mut child, Duration::from_secs(10))
    }

    /// Restart syncd gracefully; panics unless it exited cleanly.
    pub fn restart(&mut self) {
        let (st, clean) = self.stop();
        assert!(
            clean && st.success(),
            "{}: keibi-syncd did not exit cleanly on SIGTERM ({st})\n{}",
            self.name,
            log_tail(&self.log_path(), 40)
        );
        self.start_again();
    }

    /// SIGKILL syncd and reap it.
    pub fn kill9(&mut self) {
        let mut child = self.syncd.take().expect("syncd is not running");
        let _ = child.kill();
        let _ = child.wait();
        watchdog::unregister_pid(child.id());
    }

    /// Freeze syncd (SIGSTOP): its sockets stay open and silent.
    pub fn freeze(&self) {
        signal(self.pid(), Signal::SIGSTOP);
    }

    /// Thaw syncd (SIGCONT).
    pub fn thaw(&self) {
        signal(self.pid(), Signal::SIGCONT);
    }

    /// syncd's pid; panics when it is not running.
    pub fn pid(&self) -> u32 {
        self.syncd.as_ref().expect("syncd is not running").id()
    }

    /// The node's name (its peer name on the other nodes, see [`pair`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's fingerprint (52 characters, ungrouped).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The peer listen port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The peer listen address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The node's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// syncd's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// syncd's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("run/control.sock")
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("syncd.toml")
    }

    /// syncd's log file.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("syncd.log")
    }

    /// syncd's log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// Poll (at most `timeout`) until the log satisfies `check`; returns
    /// the log.
    pub fn wait_log(&self, what: &str, timeout: Duration, check: impl Fn(&str) -> bool) -> String {
        poll_until(
            &format!("{}: {what} in syncd's log", self.name),
            timeout,
            || {
                let log = self.log();
                check(&log).then_some(log)
            },
        )
    }

    /// syncd's peak resident set (`VmHWM` of /proc/PID/status), in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status of syncd");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// Run `keibictl --socket <control> --timeout 60s <args>` (bounded).
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_within(Duration::from_secs(60), args)
    }

    /// Run keibictl with `--timeout limit` (the process is killed 30 s
    /// after that).
    pub fn ctl_within(&self, limit: Duration, args: &[&str]) -> Output {
        run_bounded(
            Command::new(binaries::binary("keibictl"))
                .arg("--socket")
                .arg(self.control_socket())
                .arg("--timeout")
                .arg(duration_arg(limit))
                .args(args),
            limit + Duration::from_secs(30),
        )
    }

    /// Run keibictl with `args` (which should include `--json`), assert
    /// exit status 0 and parse stdout as JSON.
    #[track_caller]
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        self.ctl_json_within(Duration::from_secs(60), args)
    }

    /// [`Self::ctl_json`] with keibictl's `--timeout limit`.
    #[track_caller]
    pub fn ctl_json_within(&self, limit: Duration, args: &[&str]) -> Value {
        let out = self.ctl_within(limit, args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: keibictl {args:?} failed: {}\nstdout: {}\nstderr: {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: keibictl {args:?} did not print JSON ({e}): {}",
                self.name,
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `keibictl id --json`.
    pub fn id(&self) -> Value {
        self.ctl_json(&["id", "--json"])
    }

    /// `keibictl status --json`.
    pub fn status(&self) -> Value {
        self.ctl_json(&["status", "--json"])
    }

    /// `keibictl peer add FP [--addr ADDR] [--name NAME] --json`.
    #[track_caller]
    pub fn peer_add(&self, fingerprint: &str, addr: Option<&str>, name: Option<&str>) -> Value {
        let mut args = vec!["peer", "add", fingerprint, "--json"];
        if let Some(a) = addr {
            args.extend(["--addr", a]);
        }
        if let Some(n) = name {
            args.extend(["--name", n]);
        }
        self.ctl_json(&args)
    }

    /// Add `other` as a peer named by its node name; with its address when
    /// `dial` (this node then dials it), without otherwise (this node waits
    /// for it to dial).
    #[track_caller]
    pub fn add(&self, other: &PeerNode, dial: bool) -> Value {
        let addr = other.addr();
        self.peer_add(
            other.fingerprint(),
            dial.then_some(addr.as_str()),
            Some(other.name()),
        )
    }

    /// `keibictl peer list --json`.
    pub fn peers(&self) -> Vec<Value> {
        match self.ctl_json(&["peer", "list", "--json"]) {
            Value::Array(v) => v,
            other => panic!("{}: peer list --json is not an array: {other}", self.name),
        }
    }

    /// The entry of `fingerprint` in `peer list --json`, if any.
    pub fn peer(&self, fingerprint: &str) -> Option<Value> {
        self.peers()
            .into_iter()
            .find(|p| p["fingerprint"].as_str() == Some(fingerprint))
    }

    /// `keibictl peer remove FP --json`.
    #[track_caller]
    pub fn peer_remove(&self, fingerprint: &str) -> Value {
        self.ctl_json(&["peer", "remove", fingerprint, "--json"])
    }

    /// `keibictl peer bench FP --bytes B --streams S --json`, given up to
    /// 240 s (the debug build's crypto is slow: a few MB/s).
    #[track_caller]
    pub fn bench(&self, fingerprint: &str, bytes: u64, streams: u32) -> Value {
        self.ctl_json_within(
            Duration::from_secs(240),
            &[
                "peer",
                "bench",
                fingerprint,
                "--bytes",
                &bytes.to_string(),
                "--streams",
                &streams.to_string(),
                "--json",
            ],
        )
    }

    /// Poll until `check` holds for this node's entry of `fingerprint`;
    /// returns that entry.
    #[track_caller]
    pub fn wait_peer(
        &self,
        fingerprint: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        poll_until(
            &format!("{}: peer {fingerprint} {what}", self.name),
            timeout,
            || self.peer(fingerprint).filter(&check),
        )
    }

    /// Poll until this node lists `other` as `connected`.
    #[track_caller]
    pub fn wait_connected(&self, other: &PeerNode, timeout: Duration) -> Value {
        self.wait_peer(other.fingerprint(), "connected", timeout, |p| {
            state(p) == "connected"
        })
    }

    /// Poll until this node lists `other` in a state other than
    /// `connected`; `None` if it stays connected for `timeout`.
    pub fn try_wait_disconnected(&self, other: &PeerNode, timeout: Duration) -> Option<Value> {
        try_poll_until(timeout, || {
            self.peer(other.fingerprint())
                .filter(|p| state(p) != "connected")
        })
    }
}

impl Drop for PeerNode {
    fn drop(&mut self) {
        if let Some(mut s) = self.syncd.take() {
            terminate(&mut s, Duration::from_secs(10));
        }
        if std::thread::panicking() {
            eprintln!("[{}] {}", self.name, log_tail(&self.log_path(), 80));
        }
        watchdog::unregister_log(&self.log_path());
        if std::env::var_os("KEIBI_TEST_KEEP").is_some()
            && let Some(d) = self.dir.take()
        {
            eprintln!("keeping {} ({})", d.keep().display(), self.name);
        }
    }
}

/// Pair `a` and `b`: `a` adds `b` with its address (so `a` dials), `b`
/// adds `a` without one (so `b` waits to be dialed).
pub fn pair(a: &PeerNode, b: &PeerNode) {
    a.add(b, true);
    b.add(a, false);
}

/// Pair `a` and `b` (see [`pair`]) and wait until both list each other as
/// connected.
pub fn connect(a: &PeerNode, b: &PeerNode) {
    pair(a, b);
    a.wait_connected(b, Duration::from_secs(30));
    b.wait_connected(a, Duration::from_secs(30));
}

/// The `state` field of a PeerInfo.
pub fn state(p: &Value) -> &str {
    p["state"]
        .as_str()
        .unwrap_or_else(|| panic!("PeerInfo without a string `state`: {p}"))
}

/// An unsigned field of a JSON object; panics naming it when it is
/// missing or not an unsigned integer.
#[track_caller]
pub fn u64_field(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not an unsigned integer in {v}"))
}

/// The TCP connections established now between a port of `ports` on
/// 127.0.0.1 and anything, counted once each: a socket whose local port
/// is one of `ports` (the accepting side of a loopback connection).
pub fn established_to(ports: &[u16]) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    text.lines()
        .skip(1)
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let (Some(local), Some(st)) = (cols.get(1), cols.get(3)) else {
                return false;
            };
            let port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            *st == "01" && port.is_some_and(|p| ports.contains(&p))
        })
        .count()
}
