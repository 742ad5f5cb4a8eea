//! [`Pair`]: two complete keibi nodes, `a` and `b`, each a syncd, a
//! mountd and a mount (a [`KeibiFixture`] each), paired with each other,
//! and the link between them under the test's control.
//!
//! Two modes ([`LinkMode`]), and a relayed variant of loopback:
//! - **loopback**: both syncd listen on free ports of 127.0.0.1. Quick;
//!   the link can only be broken by stopping or killing a syncd.
//! - **netns**: each syncd runs in a network namespace of its own
//!   (`ip netns exec`), the two namespaces joined by a veth pair that the
//!   fixture makes (`a` is 10.203.0.1, `b` is 10.203.0.2, a /24 that exists
//!   only between these two namespaces) and removes again. mountd stays in
//!   the root namespace: syncd's sockets are filesystem paths, which every
//!   network namespace reaches. The link can then fail as real networks
//!   do: [`Pair::cut`] (`ip link set down`), [`Pair::stall`] (an nftables
//!   table that silently drops every packet of one namespace: no RST, no
//!   ICMP), [`Pair::slow`] (a `tc tbf` qdisc on both ends).
//!
//! - **relayed** ([`Pair::start_relayed`]): loopback, and `a` dials a
//!   [`Relay`] in the test process instead of `b`: every frame is held for
//!   a set delay, and the relay can be armed with a fault such as a
//!   mid-stream reset ([`crate::relay::Fault::Reset`]). This kernel has no
//!   `netem`, so delay and resets come from the relay.
//!
//! In both modes [`Pair::stop_syncd`]/[`Pair::cont_syncd`] freeze and thaw
//! a syncd (SIGSTOP/SIGCONT) and [`Pair::kill_syncd`] +
//! [`Pair::restart_syncd`] kill one with SIGKILL and start it again on the
//! same state.
//!
//! Pairing: `a` adds `b` with `b`'s address (so `a` dials), `b` adds `a`
//! without one (`b` waits to be dialed), exactly as `keibictl peer add` is
//! documented; both know each other by fingerprint. [`Pair::start`]
//! returns once both list each other as connected.
//!
//! Cleanup: each node's fixture stops its daemons and unmounts on `Drop`;
//! the namespaces (and with them the veth ends and any nftables table or
//! qdisc inside) are deleted after the nodes, on every path including a
//! panic, and registered with the [`crate::watchdog`] for a hang. A test
//! binary killed from outside leaves its namespaces behind: the next
//! `Pair::start` deletes namespaces of this fixture's naming whose process
//! is gone.

use crate::ctl::Ctl;
use crate::daemons::{KeibiFixture, Options, duration_arg};
use crate::peers::free_port;
use crate::process::run_bounded;
use crate::relay::Relay;
use crate::wait::poll_until;
use crate::watchdog;
use serde_json::Value;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Where the two syncd meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkMode {
    /// 127.0.0.1, free ports.
    Loopback,
    /// Two network namespaces joined by a veth pair.
    Netns,
}

/// One of the two nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The node that dials.
    A,
    /// The node that is dialed.
    B,
}

impl Side {
    /// The other node.
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// How to start a [`Pair`].
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// Loopback or network namespaces.
    pub mode: LinkMode,
    /// Template for both nodes' fixtures (deadline, passthrough, log
    /// filters, ...). `syncd_config` and `syncd_netns` are set by the pair.
    pub node: Options,
    /// `peer_timeout` of both syncd (keepalive and handshake bound).
    pub peer_timeout: Duration,
    /// `peer_reconnect_max` of both syncd.
    pub reconnect_max: Duration,
    /// More lines for both syncd's configuration file.
    pub config_extra: String,
    /// Extra environment (test hooks) for `a`'s syncd.
    pub env_a: Vec<(String, String)>,
    /// Extra environment (test hooks) for `b`'s syncd.
    pub env_b: Vec<(String, String)>,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            mode: LinkMode::Netns,
            node: Options::default(),
            peer_timeout: Duration::from_secs(2),
            reconnect_max: Duration::from_secs(1),
            config_extra: String::new(),
            env_a: Vec::new(),
            env_b: Vec::new(),
        }
    }
}

impl PairOptions {
    /// The defaults in `mode`.
    pub fn new(mode: LinkMode) -> PairOptions {
        PairOptions {
            mode,
            ..PairOptions::default()
        }
    }
}

/// One node: a [`KeibiFixture`] (it derefs to it: `node.path("f")`,
/// `node.mnt()`, ...) and what the pair knows of it.
pub struct Node {
    name: String,
    fx: KeibiFixture,
    ctl: Ctl,
    addr: String,
    fingerprint: String,
    netns: Option<String>,
}

impl Node {
    /// `a` or `b`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// keibictl for this node's syncd.
    pub fn ctl(&self) -> &Ctl {
        &self.ctl
    }

    /// The peer address its syncd listens on (`IP:PORT`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Its fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Its network namespace (netns mode).
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The fixture, mutably (restarts).
    pub fn fx_mut(&mut self) -> &mut KeibiFixture {
        &mut self.fx
    }
}

impl std::ops::Deref for Node {
    type Target = KeibiFixture;
    fn deref(&self) -> &KeibiFixture {
        &self.fx
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut KeibiFixture {
        &mut self.fx
    }
}

/// The two namespaces and the veth pair between them.
struct Net {
    ns: [String; 2],
    veth: [String; 2],
}

/// The subnet of the veth pair: it exists only between the two namespaces.
const NET_PREFIX: &str = "10.203.0";
/// The port both syncd listen on in netns mode (each namespace has its
/// own port space).
const NETNS_PORT: u16 = 7070;
/// How namespace names start (`kbt-PID-N-a`).
const NETNS_TAG: &str = "kbt-";

static SERIAL: AtomicU32 = AtomicU32::new(0);

/// Run `ip ARGS` (bounded); panics with its output when it fails.
#[track_caller]
pub fn ip(args: &[&str]) {
    run_checked("ip", args);
}

#[track_caller]
fn run_checked(program: &str, args: &[&str]) -> String {
    let out = run_bounded(Command::new(program).args(args), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}\n(the netns tests need root, iproute2 and nftables: \
         scripts/test.sh installs them)",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Delete namespaces named by this fixture for a process that is gone
/// (a test binary killed before its `Drop` ran).
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_TAG) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_bounded(
                Command::new("ip").args(["netns", "del", &name]),
                Duration::from_secs(30),
            );
        }
    }
}

impl Net {
    fn create() -> Net {
        remove_stale_namespaces();
        let pid = std::process::id();
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let ns = [
            format!("{NETNS_TAG}{pid}-{n}-a"),
            format!("{NETNS_TAG}{pid}-{n}-b"),
        ];
        // Interface names are at most 15 bytes: "kv" + hex pid + hex n + side.
        let veth = [format!("kv{pid:x}x{n:x}a"), format!("kv{pid:x}x{n:x}b")];
        let net = Net { ns, veth };
        for ns in &net.ns {
            ip(&["netns", "add", ns]);
            watchdog::register_netns(ns);
        }
        ip(&[
            "link",
            "add",
            &net.veth[0],
            "netns",
            &net.ns[0],
            "type",
            "veth",
            "peer",
            "name",
            &net.veth[1],
            "netns",
            &net.ns[1],
        ]);
        for i in 0..2 {
            let addr = format!("{NET_PREFIX}.{}/24", i + 1);
            ip(&["-n", &net.ns[i], "addr", "add", &addr, "dev", &net.veth[i]]);
            ip(&["-n", &net.ns[i], "link", "set", "lo", "up"]);
            ip(&["-n", &net.ns[i], "link", "set", &net.veth[i], "up"]);
        }
        net
    }

    fn index(side: Side) -> usize {
        match side {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = run_bounded(
                Command::new("ip").args(["netns", "del", ns]),
                Duration::from_secs(30),
            );
            watchdog::unregister_netns(ns);
        }
    }
}

/// Two paired nodes. See the module docs.
pub struct Pair {
    /// The node that dials.
    pub a: Node,
    /// The node that is dialed.
    pub b: Node,
    // Declared after the nodes: dropped after their daemons stopped.
    net: Option<Net>,
    /// The relay a dials instead of b ([`Pair::start_relayed`]).
    relay: Option<Relay>,
    opts: PairOptions,
}

fn config_text(listen: &str, opts: &PairOptions) -> String {
    format!(
        "listen = [\"{listen}\"]\npeer_timeout = \"{}\"\npeer_reconnect_max = \"{}\"\n{}\n",
        duration_arg(opts.peer_timeout),
        duration_arg(opts.reconnect_max),
        opts.config_extra
    )
}

fn start_node(name: &str, opts: &PairOptions, net: Option<&Net>, side: Side) -> Node {
    let (addr, netns) = match net {
        Some(net) => (
            format!("{NET_PREFIX}.{}:{NETNS_PORT}", Net::index(side) + 1),
            Some(net.ns[Net::index(side)].clone()),
        ),
        None => (format!("127.0.0.1:{}", free_port()), None),
    };
    let mut fo = opts.node.clone();
    fo.syncd_config = Some(config_text(&addr, opts));
    fo.syncd_netns = netns.clone();
    fo.syncd_env.extend(
        match side {
            Side::A => &opts.env_a,
            Side::B => &opts.env_b,
        }
        .iter()
        .cloned(),
    );
    let fx = KeibiFixture::start(fo);
    let ctl = Ctl::new(name, fx.control_socket());
    let fingerprint = ctl.fingerprint();
    Node {
        name: name.to_string(),
        fx,
        ctl,
        addr,
        fingerprint,
        netns,
    }
}

impl Pair {
    /// Start both nodes, pair them and wait until they are connected.
    pub fn start(opts: PairOptions) -> Pair {
        Pair::start_with(opts, None)
    }

    /// Start both nodes on loopback with a [`Relay`] between them: a dials
    /// the relay, which holds every frame for `delay` and forwards it to
    /// b (and can be armed with a fault: [`Pair::relay`]). b never dials
    /// a, so every connection goes through the relay.
    pub fn start_relayed(mut opts: PairOptions, delay: Duration) -> Pair {
        opts.mode = LinkMode::Loopback;
        Pair::start_with(opts, Some(delay))
    }

    fn start_with(opts: PairOptions, relay_delay: Option<Duration>) -> Pair {
        let net = (opts.mode == LinkMode::Netns).then(Net::create);
        let a = start_node("a", &opts, net.as_ref(), Side::A);
        let b = start_node("b", &opts, net.as_ref(), Side::B);
        let relay = relay_delay.map(|d| {
            let upstream = b
                .addr
                .parse()
                .unwrap_or_else(|e| panic!("b's address {}: {e}", b.addr));
            Relay::start_delayed(upstream, None, b"", d)
        });
        let dial = relay.as_ref().map_or_else(|| b.addr.clone(), Relay::addr);
        let pair = Pair {
            a,
            b,
            net,
            relay,
            opts,
        };
        pair.a.ctl.json(&[
            "peer",
            "add",
            &pair.b.fingerprint,
            "--addr",
            &dial,
            "--name",
            "b",
            "--json",
        ]);
        pair.b
            .ctl
            .json(&["peer", "add", &pair.a.fingerprint, "--name", "a", "--json"]);
        pair.wait_connected(Duration::from_secs(30));
        pair
    }

    /// [`Pair::start`] with the defaults of `mode`.
    pub fn start_mode(mode: LinkMode) -> Pair {
        Pair::start(PairOptions::new(mode))
    }

    /// The relay between the nodes of [`Pair::start_relayed`].
    #[track_caller]
    pub fn relay(&self) -> &Relay {
        self.relay
            .as_ref()
            .unwrap_or_else(|| panic!("relay() needs a pair from Pair::start_relayed"))
    }

    /// The options the pair was started with.
    pub fn options(&self) -> &PairOptions {
        &self.opts
    }

    /// The node on `side`.
    pub fn node(&self, side: Side) -> &Node {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    /// The node on `side`, mutably.
    pub fn node_mut(&mut self, side: Side) -> &mut Node {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// `side`'s entry for the other node in `peer list --json`.
    #[track_caller]
    pub fn peer_info(&self, side: Side) -> Value {
        let me = self.node(side);
        let other = self.node(side.other());
        me.ctl.peer(&other.fingerprint).unwrap_or_else(|| {
            panic!(
                "{}: peer list has no entry for {}",
                me.name, other.fingerprint
            )
        })
    }

    /// Whether `side` lists the other node as connected now.
    pub fn connected(&self, side: Side) -> bool {
        self.peer_info(side)["state"].as_str() == Some("connected")
    }

    /// Poll until both nodes list each other as connected.
    #[track_caller]
    pub fn wait_connected(&self, timeout: Duration) {
        poll_until("a and b to list each other as connected", timeout, || {
            (self.connected(Side::A) && self.connected(Side::B)).then_some(())
        });
    }

    /// Poll until `side` no longer lists the other node as connected.
    #[track_caller]
    pub fn wait_disconnected(&self, side: Side, timeout: Duration) {
        poll_until(
            &format!("{} to see its peer disconnected", self.node(side).name),
            timeout,
            || (!self.connected(side)).then_some(()),
        );
    }

    /// Payload bytes `side` received from the other node on the live
    /// connection (`bytes_received` of `peer list --json`; starts at 0 on
    /// each new connection).
    #[track_caller]
    pub fn bytes_received(&self, side: Side) -> u64 {
        let p = self.peer_info(side);
        p["bytes_received"]
            .as_u64()
            .unwrap_or_else(|| panic!("`bytes_received` is not an unsigned integer in {p}"))
    }

    #[track_caller]
    fn net(&self, what: &str) -> &Net {
        self.net.as_ref().unwrap_or_else(|| {
            panic!("{what} needs a pair started in LinkMode::Netns (this one is on loopback)")
        })
    }

    /// Take the link down (`ip link set down` on both veth ends): packets
    /// stop, nothing tells the peers; each notices by its keepalive.
    pub fn cut(&self) {
        let net = self.net("cut()");
        for i in 0..2 {
            ip(&["-n", &net.ns[i], "link", "set", &net.veth[i], "down"]);
        }
    }

    /// Bring the link up again after [`Pair::cut`].
    pub fn restore(&self) {
        let net = self.net("restore()");
        for i in 0..2 {
            ip(&["-n", &net.ns[i], "link", "set", &net.veth[i], "up"]);
        }
    }

    /// In `side`'s namespace, drop every packet in and out (an nftables
    /// table `keibi_stall` with drop policies): a stall with no RST and no
    /// ICMP, the TCP connection stays open.
    pub fn stall(&self, side: Side) {
        let net = self.net("stall()");
        let ns = &net.ns[Net::index(side)];
        run_checked(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "nft",
                "add table inet keibi_stall; \
                 add chain inet keibi_stall input { type filter hook input priority -300; policy drop; }; \
                 add chain inet keibi_stall output { type filter hook output priority -300; policy drop; }",
            ],
        );
    }

    /// Remove the nftables table of [`Pair::stall`].
    pub fn unstall(&self, side: Side) {
        let net = self.net("unstall()");
        let ns = &net.ns[Net::index(side)];
        run_checked(
            "ip",
            &["netns", "exec", ns, "nft", "delete table inet keibi_stall"],
        );
    }

    /// Limit both directions of the link to `rate` (a `tc` rate such as
    /// `8mbit`) with a token bucket filter on both veth ends.
    pub fn slow(&self, rate: &str) {
        let net = self.net("slow()");
        for i in 0..2 {
            run_checked(
                "ip",
                &[
                    "netns",
                    "exec",
                    &net.ns[i],
                    "tc",
                    "qdisc",
                    "replace",
                    "dev",
                    &net.veth[i],
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    "64kb",
                    "latency",
                    "500ms",
                ],
            );
        }
    }

    /// Remove the qdiscs of [`Pair::slow`].
    pub fn unslow(&self) {
        let net = self.net("unslow()");
        for i in 0..2 {
            run_checked(
                "ip",
                &[
                    "netns",
                    "exec",
                    &net.ns[i],
                    "tc",
                    "qdisc",
                    "del",
                    "dev",
                    &net.veth[i],
                    "root",
                ],
            );
        }
    }

    /// Freeze `side`'s syncd (SIGSTOP): its sockets stay open and silent.
    pub fn stop_syncd(&self, side: Side) {
        self.node(side).freeze_syncd();
    }

    /// Thaw `side`'s syncd (SIGCONT).
    pub fn cont_syncd(&self, side: Side) {
        self.node(side).thaw_syncd();
    }

    /// SIGKILL `side`'s syncd and reap it.
    pub fn kill_syncd(&mut self, side: Side) {
        self.node_mut(side).kill9_syncd();
    }

    /// Start `side`'s syncd again (same state, identity, address and
    /// namespace) and wait until its mount accepts a new file (mountd
    /// reconnects by itself).
    pub fn restart_syncd(&mut self, side: Side) {
        let node = self.node_mut(side);
        node.start_syncd();
        node.wait_writable(Duration::from_secs(30));
    }
}
