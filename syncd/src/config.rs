//! Configuration: a TOML file, environment variables over it, then
//! command-line flags over both.
//!
//! The file is `/etc/keibi/syncd.toml` when it exists (the system
//! service's), or the one named by `--config` (or `KEIBI_CONFIG`), which
//! must then exist. Precedence, highest first: a flag on the command line,
//! its `KEIBI_*` environment variable, the file's key of the same name,
//! the default. Only the settings people change most have a variable (see
//! [`Cli`]; `docs/configuration.md` has the table of every key). Names of
//! users and groups are resolved here, so a typo stops syncd before it
//! binds anything.

use crate::channel::AeadKind;
use clap::Parser;
use ipc_schema::logging::LogTarget;
use ipc_schema::metrics_endpoint::Endpoint;
use nix::unistd::{Group, User};
use serde::Deserialize;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The config file used when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/keibi/syncd.toml";
const DEFAULT_STATE_DIR: &str = "/var/lib/keibi";
const DEFAULT_FS_SOCKET: &str = "/run/keibi/fs.sock";
const DEFAULT_CONTROL_SOCKET: &str = "/run/keibi/control.sock";
const DEFAULT_CONTROL_MODE: u32 = 0o660;
/// The peer port when `listen` is not set (in the dynamic range, not
/// assigned by IANA).
pub const DEFAULT_PEER_PORT: u16 = 58150;
/// `peer_timeout` when not set.
const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// `peer_reconnect_max` when not set.
const DEFAULT_PEER_RECONNECT_MAX: Duration = Duration::from_secs(30);
/// `peer_rekey_bytes` when not set: 1 GiB.
const DEFAULT_PEER_REKEY_BYTES: u64 = 1 << 30;
/// The smallest `peer_rekey_bytes` accepted (a key per frame or two would
/// only cost time).
const MIN_PEER_REKEY_BYTES: u64 = 65536;
/// `peer_rekey_interval` when not set.
const DEFAULT_PEER_REKEY_INTERVAL: Duration = Duration::from_secs(600);
/// `eager_fetch_max` when not set: 1 MiB.
const DEFAULT_EAGER_FETCH_MAX: u64 = 1 << 20;
/// `store_cache` when not set: 64 MiB.
pub const DEFAULT_STORE_CACHE: u64 = 64 << 20;
/// The smallest `store_cache` accepted.
const MIN_STORE_CACHE: u64 = 1 << 20;
/// `fetch_parallel` when not set.
const DEFAULT_FETCH_PARALLEL: usize = 8;
/// The largest `fetch_parallel` accepted (a file has this many read-ahead
/// and as many demanded requests in flight; a connection carries at most
/// 128 requests at once, shared by every file).
const MAX_FETCH_PARALLEL: usize = 64;
/// `fetch_readahead_max` when not set: 8 MiB.
const DEFAULT_FETCH_READAHEAD_MAX: u64 = 8 << 20;

/// keibi-syncd: the unprivileged daemon that owns keibi's metadata store
/// and content, serving keibi-mountd and keibictl over Unix sockets.
///
/// A flag given twice counts once, with its last value.
#[derive(Parser, Debug, Default)]
#[command(name = "keibi-syncd", version, args_override_self = true)]
pub struct Cli {
    /// TOML config file [default: /etc/keibi/syncd.toml, if it exists]
    #[arg(long, value_name = "PATH", env = "KEIBI_CONFIG")]
    pub config: Option<PathBuf>,
    /// State directory: store, content files, lock [default: /var/lib/keibi]
    #[arg(long, value_name = "DIR", env = "KEIBI_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Filesystem socket, for keibi-mountd [default: /run/keibi/fs.sock]
    #[arg(long, value_name = "PATH", env = "KEIBI_FS_SOCKET")]
    pub fs_socket: Option<PathBuf>,
    /// Control socket, for keibictl [default: /run/keibi/control.sock]
    #[arg(long, value_name = "PATH", env = "KEIBI_CONTROL_SOCKET")]
    pub control_socket: Option<PathBuf>,
    /// File mode of the control socket, in octal [default: 0660]
    #[arg(long, value_name = "OCTAL")]
    pub control_socket_mode: Option<String>,
    /// Owner of the control socket (name or uid)
    #[arg(long, value_name = "USER")]
    pub control_socket_owner: Option<String>,
    /// Group of the control socket (name or gid)
    #[arg(long, value_name = "GROUP")]
    pub control_socket_group: Option<String>,
    /// The only uid allowed on the filesystem socket [default: 0]
    #[arg(long, value_name = "UID")]
    pub mountd_uid: Option<u32>,
    /// Owner of the share's root directory when it is first created [default: 0:0]
    #[arg(long, value_name = "UID:GID")]
    pub share_owner: Option<String>,
    /// Where peers connect: IP:PORT addresses separated by commas, or
    /// `none` to only dial [default: 0.0.0.0:58150,[::]:58150]
    #[arg(long, value_name = "ADDRS", env = "KEIBI_LISTEN")]
    pub listen: Option<String>,
    /// Where log records go: auto (the systemd journal when stderr is
    /// connected to it, else stderr), journal, or stderr [default: auto]
    #[arg(long, value_name = "auto|journal|stderr", env = "KEIBI_LOG_TARGET")]
    pub log_target: Option<LogTarget>,
    /// Run even as root (not recommended: syncd needs no privilege)
    #[arg(long)]
    pub allow_root: bool,
    /// Serve metrics (OpenMetrics text, answered to an HTTP GET) on this
    /// Unix socket, created mode 0660 [default: off]
    #[arg(long, value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,
    /// Serve metrics on this loopback TCP address instead (IP:PORT, e.g.
    /// 127.0.0.1:9810; any other address is refused) [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Check this config file (with any other flags over it), print the
    /// effective settings as TOML and exit: 0 valid, 1 invalid
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<PathBuf>,
    /// The settings whose value came from their environment variable (not
    /// the command line): (key, variable), filled by [`Cli::parse_env`].
    #[arg(skip)]
    pub from_env: Vec<(String, String)>,
}

impl Cli {
    /// Parse the command line and the `KEIBI_*` variables (exit 2 on an
    /// invalid value, naming the flag or the variable), noting which
    /// settings the environment gave.
    pub fn parse_env() -> Cli {
        let (mut cli, matches) = clidoc::env::parse::<Cli>();
        let command = <Cli as clap::CommandFactory>::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if let Some(var) = arg.get_env()
                && matches.value_source(id) == Some(clap::parser::ValueSource::EnvVariable)
            {
                cli.from_env
                    .push((id.to_string(), var.to_string_lossy().into_owned()));
            }
        }
        cli
    }

    /// Where the flag of `key` was given, for error messages: its
    /// environment variable, or the flag itself.
    fn origin(&self, key: &str) -> String {
        match self.from_env.iter().find(|(k, _)| k == key) {
            Some((_, var)) => format!("environment variable {var}"),
            None => format!("--{}", key.replace('_', "-")),
        }
    }
}

/// The keys of the config file; all optional.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    fs_socket: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    control_socket_mode: Option<String>,
    control_socket_owner: Option<String>,
    control_socket_group: Option<String>,
    mountd_uid: Option<u32>,
    share_owner: Option<String>,
    listen: Option<Vec<String>>,
    peer_timeout: Option<String>,
    peer_reconnect_max: Option<String>,
    peer_rekey_bytes: Option<u64>,
    peer_rekey_interval: Option<String>,
    peer_aead: Option<String>,
    eager_fetch_max: Option<u64>,
    store_cache: Option<u64>,
    fetch_parallel: Option<usize>,
    fetch_readahead_max: Option<u64>,
    log_target: Option<String>,
    metrics_socket: Option<PathBuf>,
    metrics_listen: Option<String>,
}

/// The settings syncd runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// State directory.
    pub state_dir: PathBuf,
    /// Filesystem socket path.
    pub fs_socket: PathBuf,
    /// Control socket path.
    pub control_socket: PathBuf,
    /// Control socket file mode.
    pub control_socket_mode: u32,
    /// Control socket owner uid, if one is configured.
    pub control_socket_owner: Option<u32>,
    /// Control socket group gid, if one is configured.
    pub control_socket_group: Option<u32>,
    /// The uid allowed on the filesystem socket.
    pub mountd_uid: u32,
    /// Owner (uid, gid) of a newly created share root.
    pub share_owner: (u32, u32),
    /// Whether running as root is allowed.
    pub allow_root: bool,
    /// Where the peer channel listens (`listen`); empty: dial only.
    pub listen: Vec<SocketAddr>,
    /// How long a peer may stay silent before its connection is declared
    /// dead; also the bound on a whole handshake (`peer_timeout`).
    pub peer_timeout: Duration,
    /// The longest wait between two dials of an unreachable peer
    /// (`peer_reconnect_max`).
    pub peer_reconnect_max: Duration,
    /// Sealed bytes after which a direction changes its key
    /// (`peer_rekey_bytes`).
    pub peer_rekey_bytes: u64,
    /// Time after which a direction changes its key
    /// (`peer_rekey_interval`).
    pub peer_rekey_interval: Duration,
    /// The transport AEAD this machine offers peers (`peer_aead`): `None`
    /// for `auto` (AES-256-GCM first when the CPU has it in hardware,
    /// then ChaCha20-Poly1305), or the only one it offers.
    pub peer_aead: Option<AeadKind>,
    /// Files from a peer up to this size are fetched whole as soon as
    /// their version arrives (`eager_fetch_max`); larger ones on demand.
    pub eager_fetch_max: u64,
    /// The store's cache (`store_cache`, bytes): sled's `cache_capacity`.
    pub store_cache: u64,
    /// At most this many read-ahead chunk requests of one file in flight,
    /// and as many demanded ones (`fetch_parallel`).
    pub fetch_parallel: usize,
    /// The largest read-ahead window of a sequential reader, in bytes
    /// (`fetch_readahead_max`; 0: no read-ahead).
    pub fetch_readahead_max: u64,
    /// Where log records go (`log_target`).
    pub log_target: LogTarget,
    /// Where the metrics endpoint listens (`metrics_socket` or
    /// `metrics_listen`); `None`: no endpoint.
    pub metrics: Option<Endpoint>,
}

impl Config {
    /// Read the config file (if any) and apply the flags over it.
    pub fn load(cli: &Cli) -> Result<Config, String> {
        let file = match &cli.config {
            Some(p) => read_file(p)?,
            None if Path::new(DEFAULT_CONFIG).exists() => read_file(Path::new(DEFAULT_CONFIG))?,
            None => FileConfig::default(),
        };
        Config::merge(cli, file)
    }

    fn merge(cli: &Cli, file: FileConfig) -> Result<Config, String> {
        let mode = match cli.control_socket_mode.clone().or(file.control_socket_mode) {
            Some(m) => parse_mode(&m)?,
            None => DEFAULT_CONTROL_MODE,
        };
        let owner = cli
            .control_socket_owner
            .clone()
            .or(file.control_socket_owner)
            .map(|u| resolve_user(&u))
            .transpose()?;
        let group = cli
            .control_socket_group
            .clone()
            .or(file.control_socket_group)
            .map(|g| resolve_group(&g))
            .transpose()?;
        let share_owner = match cli.share_owner.clone().or(file.share_owner) {
            Some(s) => parse_owner(&s)?,
            None => (0, 0),
        };
        let listen = match (&cli.listen, file.listen) {
            (Some(list), _) => {
                parse_listen_list(list).map_err(|e| format!("{}: {e}", cli.origin("listen")))?
            }
            (None, Some(addrs)) => parse_listen(&addrs)?,
            (None, None) => default_listen(),
        };
        let log_target = match (cli.log_target, file.log_target) {
            (Some(t), _) => t,
            (None, Some(t)) => t.parse().map_err(|e| format!("log_target = {e}"))?,
            (None, None) => LogTarget::default(),
        };
        let duration = |key: &str, value: Option<String>, default: Duration| match value {
            Some(v) => parse_positive_duration(key, &v),
            None => Ok(default),
        };
        let peer_rekey_bytes = file.peer_rekey_bytes.unwrap_or(DEFAULT_PEER_REKEY_BYTES);
        if peer_rekey_bytes < MIN_PEER_REKEY_BYTES {
            return Err(format!(
                "peer_rekey_bytes = {peer_rekey_bytes} is below the minimum, {MIN_PEER_REKEY_BYTES}"
            ));
        }
        let peer_aead = match file.peer_aead.as_deref() {
            None | Some("auto") => None,
            Some(name) => Some(AeadKind::from_name(name).ok_or_else(|| {
                format!(
                    "peer_aead = {name:?} is not one of \"auto\", \"{}\", \"{}\"",
                    AeadKind::ChaCha20Poly1305,
                    AeadKind::Aes256Gcm
                )
            })?),
        };
        let fetch_parallel = file.fetch_parallel.unwrap_or(DEFAULT_FETCH_PARALLEL);
        if !(1..=MAX_FETCH_PARALLEL).contains(&fetch_parallel) {
            return Err(format!(
                "fetch_parallel = {fetch_parallel} is not between 1 and {MAX_FETCH_PARALLEL}"
            ));
        }
        let store_cache = file.store_cache.unwrap_or(DEFAULT_STORE_CACHE);
        if store_cache < MIN_STORE_CACHE {
            return Err(format!(
                "store_cache = {store_cache} is below the smallest accepted, {MIN_STORE_CACHE} (bytes)"
            ));
        }
        let metrics = Endpoint::from_options(
            cli.metrics_socket
                .as_deref()
                .or(file.metrics_socket.as_deref()),
            cli.metrics_listen
                .as_deref()
                .or(file.metrics_listen.as_deref()),
            "metrics_socket and metrics_listen",
        )?;
        Ok(Config {
            metrics,
            eager_fetch_max: file.eager_fetch_max.unwrap_or(DEFAULT_EAGER_FETCH_MAX),
            store_cache,
            fetch_parallel,
            fetch_readahead_max: file
                .fetch_readahead_max
                .unwrap_or(DEFAULT_FETCH_READAHEAD_MAX),
            listen,
            peer_timeout: duration("peer_timeout", file.peer_timeout, DEFAULT_PEER_TIMEOUT)?,
            peer_reconnect_max: duration(
                "peer_reconnect_max",
                file.peer_reconnect_max,
                DEFAULT_PEER_RECONNECT_MAX,
            )?,
            peer_rekey_bytes,
            peer_rekey_interval: duration(
                "peer_rekey_interval",
                file.peer_rekey_interval,
                DEFAULT_PEER_REKEY_INTERVAL,
            )?,
            peer_aead,
            state_dir: cli
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            fs_socket: cli
                .fs_socket
                .clone()
                .or(file.fs_socket)
                .unwrap_or_else(|| DEFAULT_FS_SOCKET.into()),
            control_socket: cli
                .control_socket
                .clone()
                .or(file.control_socket)
                .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.into()),
            control_socket_mode: mode,
            control_socket_owner: owner,
            control_socket_group: group,
            mountd_uid: cli.mountd_uid.or(file.mountd_uid).unwrap_or(0),
            share_owner,
            allow_root: cli.allow_root,
            log_target,
        })
    }
}

impl Config {
    /// Every setting, in the config file's own syntax (keys sorted): what
    /// `--check-config` prints. Feeding it back as the config file gives
    /// the same settings. The control socket's owner and group, when not
    /// set, are left out (syncd's own user and group), as are the metrics
    /// keys when the endpoint is off, and `allow_root`, which is a flag
    /// only.
    pub fn effective_toml(&self) -> String {
        use toml::Value;
        let text = |s: String| Value::String(s);
        let path = |p: &Path| Value::String(p.display().to_string());
        let int = |n: u64| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
        let duration = |d: Duration| text(humantime::format_duration(d).to_string());
        let mut t = toml::Table::new();
        t.insert("state_dir".into(), path(&self.state_dir));
        t.insert("fs_socket".into(), path(&self.fs_socket));
        t.insert("control_socket".into(), path(&self.control_socket));
        t.insert(
            "control_socket_mode".into(),
            text(format!("{:04o}", self.control_socket_mode)),
        );
        if let Some(uid) = self.control_socket_owner {
            t.insert("control_socket_owner".into(), text(uid.to_string()));
        }
        if let Some(gid) = self.control_socket_group {
            t.insert("control_socket_group".into(), text(gid.to_string()));
        }
        t.insert("mountd_uid".into(), int(u64::from(self.mountd_uid)));
        t.insert(
            "share_owner".into(),
            text(format!("{}:{}", self.share_owner.0, self.share_owner.1)),
        );
        t.insert(
            "listen".into(),
            Value::Array(self.listen.iter().map(|a| text(a.to_string())).collect()),
        );
        t.insert("peer_timeout".into(), duration(self.peer_timeout));
        t.insert(
            "peer_reconnect_max".into(),
            duration(self.peer_reconnect_max),
        );
        t.insert("peer_rekey_bytes".into(), int(self.peer_rekey_bytes));
        t.insert(
            "peer_rekey_interval".into(),
            duration(self.peer_rekey_interval),
        );
        t.insert(
            "peer_aead".into(),
            text(self.peer_aead.map_or("auto", |k| k.name()).to_string()),
        );
        t.insert("eager_fetch_max".into(), int(self.eager_fetch_max));
        t.insert("store_cache".into(), int(self.store_cache));
        t.insert("fetch_parallel".into(), int(self.fetch_parallel as u64));
        t.insert("fetch_readahead_max".into(), int(self.fetch_readahead_max));
        t.insert("log_target".into(), text(self.log_target.to_string()));
        match &self.metrics {
            Some(Endpoint::Unix(p)) => {
                t.insert("metrics_socket".into(), path(p));
            }
            Some(Endpoint::Tcp(a)) => {
                t.insert("metrics_listen".into(), text(a.to_string()));
            }
            None => {}
        }
        t.to_string()
    }
}

/// `text` (from [`Config::effective_toml`]) with a comment on the line of
/// each key whose value came from an environment variable:
/// `state_dir = "/srv/k"  # from KEIBI_STATE_DIR`. Still valid TOML.
pub fn mark_env_sources(text: &str, from_env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        out.push_str(line);
        let key = line.split(" = ").next().unwrap_or_default();
        if let Some((_, var)) = from_env.iter().find(|(k, _)| k == key) {
            out.push_str("  # from ");
            out.push_str(var);
        }
        out.push('\n');
    }
    out
}

fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

/// Parse an octal file mode: `0660`, `660` or `0o660`.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim().trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "control socket mode {s:?} is not an octal mode between 0000 and 0777"
        )),
    }
}

/// `0.0.0.0:PORT` and `[::]:PORT` with [`DEFAULT_PEER_PORT`].
fn default_listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PEER_PORT)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, DEFAULT_PEER_PORT)),
    ]
}

/// Parse `--listen`/`KEIBI_LISTEN`: addresses separated by commas (as
/// [`parse_listen`]), or `none` for none.
fn parse_listen_list(list: &str) -> Result<Vec<SocketAddr>, String> {
    let list = list.trim();
    if list == "none" {
        return Ok(Vec::new());
    }
    if list.is_empty() {
        return Err(
            "empty: give IP:PORT addresses separated by commas, or none to only dial".into(),
        );
    }
    let addrs: Vec<String> = list.split(',').map(|a| a.trim().to_string()).collect();
    parse_listen(&addrs)
}

/// Parse the `listen` addresses: each `IP:PORT` (IPv6 in brackets), port
/// not 0 (peers must know where to dial), no address twice.
fn parse_listen(addrs: &[String]) -> Result<Vec<SocketAddr>, String> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
    for a in addrs {
        let addr: SocketAddr = a.trim().parse().map_err(|_| {
            format!(
                "listen address {a:?} is not IP:PORT (e.g. \"0.0.0.0:{DEFAULT_PEER_PORT}\" or \"[::]:{DEFAULT_PEER_PORT}\"; host names are not accepted)"
            )
        })?;
        if addr.port() == 0 {
            return Err(format!(
                "listen address {a:?} has port 0; peers need a fixed port to dial"
            ));
        }
        if out.contains(&addr) {
            return Err(format!("listen address {a:?} is given twice"));
        }
        out.push(addr);
    }
    Ok(out)
}

/// Parse a duration in humantime's syntax (`5s`, `500ms`, `10m`); zero is
/// refused.
fn parse_positive_duration(key: &str, s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d.is_zero() => Err(format!("{key} = {s:?}: must be more than zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!(
            "{key} = {s:?} is not a duration like \"5s\", \"500ms\" or \"10m\": {e}"
        )),
    }
}

/// Parse `UID:GID`.
fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let err = || format!("share owner {s:?} is not UID:GID (numbers)");
    let (u, g) = s.split_once(':').ok_or_else(err)?;
    Ok((
        u.trim().parse().map_err(|_| err())?,
        g.trim().parse().map_err(|_| err())?,
    ))
}

fn resolve_user(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    match User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!("control socket owner: no user named {s:?}")),
        Err(e) => Err(format!("control socket owner: looking up user {s:?}: {e}")),
    }
}

fn resolve_group(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    match Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("control socket group: no group named {s:?}")),
        Err(e) => Err(format!("control socket group: looking up group {s:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_toml_reads_back_as_the_same_settings() {
        let file: FileConfig = toml::from_str(
            r#"
            state_dir = "/srv/keibi"
            control_socket_mode = "0640"
            control_socket_group = "0"
            share_owner = "1000:1000"
            listen = ["127.0.0.1:4000"]
            peer_timeout = "1500ms"
            peer_rekey_interval = "1h 30m"
            fetch_parallel = 3
            metrics_socket = "/run/keibi/metrics.sock"
            "#,
        )
        .expect("toml");
        let tcp: FileConfig = toml::from_str(r#"metrics_listen = "[::1]:9810""#).expect("toml");
        for config in [
            Config::merge(&Cli::default(), tcp).expect("metrics on a port"),
            Config::merge(&Cli::default(), FileConfig::default()).expect("defaults"),
            Config::merge(&Cli::default(), file).expect("config"),
        ] {
            let text = config.effective_toml();
            let again: FileConfig = toml::from_str(&text).expect("the output is a valid file");
            assert_eq!(
                Config::merge(&Cli::default(), again).expect("the output is valid"),
                config,
                "{text}"
            );
        }
    }

    #[test]
    fn defaults_without_file_or_flags() {
        let c = Config::merge(&Cli::default(), FileConfig::default()).expect("config");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/keibi"));
        assert_eq!(c.fs_socket, PathBuf::from("/run/keibi/fs.sock"));
        assert_eq!(c.control_socket, PathBuf::from("/run/keibi/control.sock"));
        assert_eq!(c.control_socket_mode, 0o660);
        assert_eq!(c.mountd_uid, 0);
        assert_eq!(c.share_owner, (0, 0));
        assert!(!c.allow_root);
        assert_eq!(
            c.listen,
            [
                "0.0.0.0:58150".parse::<SocketAddr>().expect("v4"),
                "[::]:58150".parse().expect("v6")
            ]
        );
    }

    #[test]
    fn peer_keys_have_defaults_and_are_parsed() {
        let c = Config::merge(&Cli::default(), FileConfig::default()).expect("config");
        assert_eq!(c.peer_timeout, Duration::from_secs(5));
        assert_eq!(c.peer_reconnect_max, Duration::from_secs(30));
        assert_eq!(c.peer_rekey_bytes, 1 << 30);
        assert_eq!(c.peer_rekey_interval, Duration::from_secs(600));
        let file: FileConfig = toml::from_str(
            r#"
            peer_timeout = "1500ms"
            peer_reconnect_max = "2m"
            peer_rekey_bytes = 65536
            peer_rekey_interval = "30s"
            "#,
        )
        .expect("toml");
        let c = Config::merge(&Cli::default(), file).expect("config");
        assert_eq!(c.peer_timeout, Duration::from_millis(1500));
        assert_eq!(c.peer_reconnect_max, Duration::from_secs(120));
        assert_eq!(c.peer_rekey_bytes, 65536);
        assert_eq!(c.peer_rekey_interval, Duration::from_secs(30));
    }

    #[test]
    fn bad_peer_keys_are_refused_naming_the_key() {
        for (line, says) in [
            ("peer_timeout = \"soon\"", "peer_timeout"),
            ("peer_timeout = \"0s\"", "more than zero"),
            ("peer_reconnect_max = \"5\"", "peer_reconnect_max"),
            ("peer_rekey_interval = \"\"", "peer_rekey_interval"),
            ("peer_rekey_bytes = 65535", "minimum, 65536"),
        ] {
            let file: FileConfig = toml::from_str(line).expect("toml");
            let err = Config::merge(&Cli::default(), file).expect_err(line);
            assert!(err.contains(says), "{line}: {err}");
        }
        // A negative count is no u64: refused by the TOML layer, naming the key.
        let err = toml::from_str::<FileConfig>("peer_rekey_bytes = -1").expect_err("negative");
        assert!(err.to_string().contains("peer_rekey_bytes"), "{err}");
    }

    #[test]
    fn peer_aead_is_auto_by_default_and_names_one_kind() {
        let c = Config::merge(&Cli::default(), FileConfig::default()).expect("config");
        assert_eq!(c.peer_aead, None);
        for (line, want) in [
            ("peer_aead = \"auto\"", None),
            (
                "peer_aead = \"chacha20-poly1305\"",
                Some(AeadKind::ChaCha20Poly1305),
            ),
            ("peer_aead = \"aes-256-gcm\"", Some(AeadKind::Aes256Gcm)),
        ] {
            let file: FileConfig = toml::from_str(line).expect("toml");
            let c = Config::merge(&Cli::default(), file).expect(line);
            assert_eq!(c.peer_aead, want, "{line}");
            assert!(c.effective_toml().contains(line), "{line}");
        }
        let file: FileConfig = toml::from_str("peer_aead = \"aes\"").expect("toml");
        let err = Config::merge(&Cli::default(), file).expect_err("unknown kind");
        assert!(
            err.contains("peer_aead = \"aes\"") && err.contains("chacha20-poly1305"),
            "{err}"
        );
    }

    #[test]
    fn fetch_keys_have_defaults_and_are_parsed() {
        let c = Config::merge(&Cli::default(), FileConfig::default()).expect("config");
        assert_eq!(c.eager_fetch_max, 1 << 20);
        assert_eq!(c.fetch_parallel, 8);
        assert_eq!(c.fetch_readahead_max, 8 << 20);
        let file: FileConfig = toml::from_str(
            r#"
            eager_fetch_max = 0
            fetch_parallel = 2
            fetch_readahead_max = 1048576
            "#,
        )
        .expect("toml");
        let c = Config::merge(&Cli::default(), file).expect("config");
        assert_eq!(c.eager_fetch_max, 0);
        assert_eq!(c.fetch_parallel, 2);
        assert_eq!(c.fetch_readahead_max, 1 << 20);
        for bad in ["fetch_parallel = 0", "fetch_parallel = 65"] {
            let file: FileConfig = toml::from_str(bad).expect("toml");
            let err = Config::merge(&Cli::default(), file).expect_err(bad);
            assert!(err.contains("fetch_parallel"), "{bad}: {err}");
        }
        let err = toml::from_str::<FileConfig>("eager_fetch_max = -1").expect_err("negative");
        assert!(err.to_string().contains("eager_fetch_max"), "{err}");
    }

    #[test]
    fn store_cache_has_a_default_a_floor_and_is_parsed() {
        let c = Config::merge(&Cli::default(), FileConfig::default()).expect("config");
        assert_eq!(c.store_cache, 64 << 20);
        let file: FileConfig = toml::from_str("store_cache = 16777216").expect("toml");
        let c = Config::merge(&Cli::default(), file).expect("config");
        assert_eq!(c.store_cache, 16 << 20);
        let file: FileConfig = toml::from_str("store_cache = 1000").expect("toml");
        let err = Config::merge(&Cli::default(), file).expect_err("below the floor");
        assert!(
            err.contains("store_cache") && err.contains("1048576"),
            "{err}"
        );
    }

    #[test]
    fn listen_is_parsed_and_empty_means_dial_only() {
        let file: FileConfig =
            toml::from_str(r#"listen = ["127.0.0.1:4000", "[::1]:4001"]"#).expect("toml");
        let c = Config::merge(&Cli::default(), file).expect("config");
        assert_eq!(
            c.listen,
            [
                "127.0.0.1:4000".parse::<SocketAddr>().expect("v4"),
                "[::1]:4001".parse().expect("v6")
            ]
        );
        let file: FileConfig = toml::from_str("listen = []").expect("toml");
        let c = Config::merge(&Cli::default(), file).expect("config");
        assert!(c.listen.is_empty());
    }

    #[test]
    fn packaged_example_parses_and_shows_the_default_listen() {
        // Every commented-out `key = value` line of the example, switched on.
        let text: String = include_str!("../../packaging/syncd.toml")
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.contains(" = ") && !l.starts_with(' '))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(text.contains("listen = "), "{text}");
        let file: FileConfig = toml::from_str(&text).expect("the example parses");
        let listen =
            parse_listen(file.listen.as_deref().expect("listen in the example")).expect("valid");
        assert_eq!(listen, default_listen());
        // The peer keys' values are the defaults.
        let defaults = Config::merge(&Cli::default(), FileConfig::default()).expect("defaults");
        let duration = |key: &str, v: Option<String>| {
            parse_positive_duration(key, &v.unwrap_or_else(|| panic!("{key} in the example")))
                .expect("valid")
        };
        assert_eq!(
            duration("peer_timeout", file.peer_timeout),
            defaults.peer_timeout
        );
        assert_eq!(
            duration("peer_reconnect_max", file.peer_reconnect_max),
            defaults.peer_reconnect_max
        );
        assert_eq!(
            duration("peer_rekey_interval", file.peer_rekey_interval),
            defaults.peer_rekey_interval
        );
        assert_eq!(file.peer_rekey_bytes, Some(defaults.peer_rekey_bytes));
        assert_eq!(file.eager_fetch_max, Some(defaults.eager_fetch_max));
        assert_eq!(file.store_cache, Some(defaults.store_cache));
        assert_eq!(file.fetch_parallel, Some(defaults.fetch_parallel));
        assert_eq!(file.fetch_readahead_max, Some(defaults.fetch_readahead_max));
        assert_eq!(
            file.log_target.as_deref(),
            Some(defaults.log_target.as_str())
        );
    }

    #[test]
    fn bad_listen_addresses_are_refused_with_the_address() {
        for (bad, says) in [
            ("localhost:4000", "is not IP:PORT"),
            ("0.0.0.0", "is not IP:PORT"),
            ("::1:4000", "is not IP:PORT"),
            ("1.2.3.4:70000", "is not IP:PORT"),
            ("1.2.3.4:0", "port 0"),
        ] {
            let file: FileConfig = toml::from_str(&format!("listen = [{bad:?}]")).expect("toml");
            let err = Config::merge(&Cli::default(), file).expect_err(bad);
            assert!(err.contains(bad) && err.contains(says), "{bad}: {err}");
        }
        let file: FileConfig =
            toml::from_str(r#"listen = ["1.2.3.4:5", "1.2.3.4:5"]"#).expect("toml");
        let err = Config::merge(&Cli::default(), file).expect_err("twice");
        assert!(err.contains("twice"), "{err}");
        // Not a list of strings: a TOML error, naming the key.
        let err = toml::from_str::<FileConfig>("listen = \"0.0.0.0:1\"").expect_err("string");
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn metrics_are_off_by_default_and_listen_only_on_loopback() {
        let c = Config::merge(&Cli::default(), FileConfig::default()).expect("config");
        assert_eq!(c.metrics, None);
        assert!(!c.effective_toml().contains("metrics"));
        let file: FileConfig =
            toml::from_str(r#"metrics_socket = "/run/keibi/metrics.sock""#).expect("toml");
        let c = Config::merge(&Cli::default(), file).expect("config");
        assert_eq!(
            c.metrics,
            Some(Endpoint::Unix("/run/keibi/metrics.sock".into()))
        );
        let file: FileConfig =
            toml::from_str(r#"metrics_listen = "127.0.0.1:9810""#).expect("toml");
        let c = Config::merge(&Cli::default(), file).expect("config");
        assert_eq!(
            c.metrics,
            Some(Endpoint::Tcp("127.0.0.1:9810".parse().expect("addr")))
        );
        for (text, says) in [
            (
                r#"metrics_listen = "0.0.0.0:9810""#,
                "not a loopback address",
            ),
            (r#"metrics_listen = "localhost:9810""#, "not IP:PORT"),
            (
                "metrics_socket = \"/m\"\nmetrics_listen = \"127.0.0.1:9810\"",
                "not both",
            ),
        ] {
            let file: FileConfig = toml::from_str(text).expect("toml");
            let err = Config::merge(&Cli::default(), file).expect_err(text);
            assert!(err.contains(says), "{text}: {err}");
        }
        // A flag replaces the file's key of the same name.
        let file: FileConfig = toml::from_str(r#"metrics_listen = "[::1]:1""#).expect("toml");
        let cli =
            Cli::try_parse_from(["keibi-syncd", "--metrics-listen", "127.0.0.1:2"]).expect("cli");
        let c = Config::merge(&cli, file).expect("config");
        assert_eq!(
            c.metrics,
            Some(Endpoint::Tcp("127.0.0.1:2".parse().expect("addr")))
        );
    }

    #[test]
    fn flags_override_the_file() {
        let file: FileConfig = toml::from_str(
            r#"
            state_dir = "/srv/keibi"
            fs_socket = "/tmp/fs.sock"
            control_socket_mode = "0600"
            control_socket_group = "0"
            mountd_uid = 5
            share_owner = "1000:1000"
            "#,
        )
        .expect("toml");
        let cli = Cli::try_parse_from([
            "keibi-syncd",
            "--state-dir",
            "/other",
            "--control-socket-mode",
            "640",
        ])
        .expect("cli");
        let c = Config::merge(&cli, file).expect("config");
        assert_eq!(c.state_dir, PathBuf::from("/other"));
        assert_eq!(c.fs_socket, PathBuf::from("/tmp/fs.sock"));
        assert_eq!(c.control_socket_mode, 0o640);
        assert_eq!(c.control_socket_group, Some(0));
        assert_eq!(c.mountd_uid, 5);
        assert_eq!(c.share_owner, (1000, 1000));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("1777").is_err());
        assert_eq!(parse_mode("0o660"), Ok(0o660));
        assert!(parse_owner("1000").is_err());
        assert!(toml::from_str::<FileConfig>("unknown_key = 1").is_err());
        assert!(resolve_user("no-such-user-keibi-test").is_err());
        assert_eq!(resolve_user("root"), Ok(0));
    }

    #[test]
    fn the_last_of_a_repeated_flag_counts() {
        let cli = Cli::try_parse_from([
            "keibi-syncd",
            "--config",
            "/first.toml",
            "--state-dir",
            "/a",
            "--config",
            "/second.toml",
        ])
        .expect("a repeated flag is accepted");
        assert_eq!(cli.config, Some(PathBuf::from("/second.toml")));
        assert_eq!(cli.state_dir, Some(PathBuf::from("/a")));
    }

    #[test]
    fn the_listen_flag_or_variable_overrides_the_file() {
        let file = || toml::from_str::<FileConfig>(r#"listen = ["127.0.0.1:4000"]"#).expect("toml");
        let cli = Cli {
            listen: Some("127.0.0.1:5000, [::1]:5001".into()),
            ..Cli::default()
        };
        let c = Config::merge(&cli, file()).expect("config");
        assert_eq!(
            c.listen,
            [
                "127.0.0.1:5000".parse::<SocketAddr>().expect("v4"),
                "[::1]:5001".parse().expect("v6")
            ]
        );
        let cli = Cli {
            listen: Some("none".into()),
            ..Cli::default()
        };
        assert!(
            Config::merge(&cli, file())
                .expect("config")
                .listen
                .is_empty()
        );
        let c = Config::merge(&Cli::default(), file()).expect("config");
        assert_eq!(
            c.listen,
            ["127.0.0.1:4000".parse::<SocketAddr>().expect("v4")]
        );
    }

    #[test]
    fn a_bad_value_names_the_variable_or_the_flag_it_came_from() {
        for (value, says) in [("nowhere", "\"nowhere\" is not IP:PORT"), ("", "empty")] {
            let from_env = Cli {
                listen: Some(value.into()),
                from_env: vec![("listen".into(), "KEIBI_LISTEN".into())],
                ..Cli::default()
            };
            let err = Config::merge(&from_env, FileConfig::default()).expect_err(value);
            assert!(
                err.starts_with("environment variable KEIBI_LISTEN: ") && err.contains(says),
                "{err}"
            );
            let from_flag = Cli {
                listen: Some(value.into()),
                ..Cli::default()
            };
            let err = Config::merge(&from_flag, FileConfig::default()).expect_err(value);
            assert!(err.starts_with("--listen: ") && err.contains(says), "{err}");
        }
    }

    #[test]
    fn log_target_comes_from_the_flag_then_the_file_then_auto() {
        let file = || toml::from_str::<FileConfig>(r#"log_target = "journal""#).expect("toml");
        let c = Config::merge(&Cli::default(), FileConfig::default()).expect("config");
        assert_eq!(c.log_target, LogTarget::Auto);
        let c = Config::merge(&Cli::default(), file()).expect("config");
        assert_eq!(c.log_target, LogTarget::Journal);
        let cli = Cli::try_parse_from(["keibi-syncd", "--log-target", "stderr"]).expect("cli");
        assert_eq!(
            Config::merge(&cli, file()).expect("config").log_target,
            LogTarget::Stderr
        );
        let bad = toml::from_str::<FileConfig>(r#"log_target = "syslog""#).expect("toml");
        let err = Config::merge(&Cli::default(), bad).expect_err("syslog");
        assert!(
            err.contains("log_target") && err.contains("syslog"),
            "{err}"
        );
        assert!(Cli::try_parse_from(["keibi-syncd", "--log-target", "syslog"]).is_err());
    }

    #[test]
    fn values_from_the_environment_are_marked_and_the_output_still_parses() {
        let c = Config::merge(&Cli::default(), FileConfig::default()).expect("config");
        let from_env = vec![
            ("state_dir".to_string(), "KEIBI_STATE_DIR".to_string()),
            ("listen".to_string(), "KEIBI_LISTEN".to_string()),
        ];
        let text = mark_env_sources(&c.effective_toml(), &from_env);
        assert!(
            text.lines()
                .any(|l| l == "state_dir = \"/var/lib/keibi\"  # from KEIBI_STATE_DIR"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("listen = [") && l.ends_with("  # from KEIBI_LISTEN")),
            "{text}"
        );
        assert_eq!(text.matches("# from").count(), 2, "{text}");
        let again: FileConfig = toml::from_str(&text).expect("still a valid file");
        assert_eq!(Config::merge(&Cli::default(), again).expect("valid"), c);
    }

    #[test]
    fn every_variable_is_named_after_its_key() {
        let command = <Cli as clap::CommandFactory>::command();
        let mut vars = Vec::new();
        for arg in command.get_arguments() {
            if let Some(var) = arg.get_env() {
                let want = format!("KEIBI_{}", arg.get_id().as_str().to_uppercase());
                assert_eq!(var.to_string_lossy(), want);
                vars.push(want);
            }
        }
        assert!(vars.len() >= 6, "{vars:?}");
    }

    /// The keys of [`FileConfig`], as serde knows them: the list its
    /// "unknown field" error gives.
    fn file_keys() -> Vec<String> {
        let err = toml::from_str::<FileConfig>("not_a_key_of_keibi = 1")
            .expect_err("unknown key")
            .to_string();
        let list = err
            .split("expected one of ")
            .nth(1)
            .unwrap_or_else(|| panic!("serde's message changed: {err}"));
        let keys: Vec<String> = list
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert!(keys.len() >= 17, "{err}");
        keys
    }

    #[test]
    fn every_key_is_in_the_configuration_table_and_only_those() {
        let doc = include_str!("../../docs/configuration.md");
        let section = doc
            .split("## keibi-syncd")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("docs/configuration.md has a keibi-syncd section");
        let rows: Vec<&str> = section.lines().filter(|l| l.starts_with("| `")).collect();
        let documented: Vec<String> = rows
            .iter()
            .filter_map(|r| r.split('`').nth(1))
            .map(str::to_string)
            .collect();
        let keys = file_keys();
        for key in &keys {
            assert!(
                documented.contains(key),
                "key {key} is missing from the table in docs/configuration.md"
            );
        }
        for key in &documented {
            assert!(
                keys.contains(key),
                "docs/configuration.md lists {key}, which is no key of the config file"
            );
        }
        // Each row names the key's flag and variable, if it has them.
        let command = <Cli as clap::CommandFactory>::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            let Some(row) = rows.iter().find(|r| r.starts_with(&format!("| `{id}` |"))) else {
                continue;
            };
            if let Some(long) = arg.get_long() {
                assert!(row.contains(&format!("`--{long}`")), "{row}");
            }
            if let Some(var) = arg.get_env() {
                assert!(
                    row.contains(&format!("`{}`", var.to_string_lossy())),
                    "{row}"
                );
            }
        }
        // And the default of each, as --check-config prints it.
        let defaults: toml::Table = Config::merge(&Cli::default(), FileConfig::default())
            .expect("defaults")
            .effective_toml()
            .parse()
            .expect("toml");
        for (key, value) in defaults {
            let row = rows
                .iter()
                .find(|r| r.starts_with(&format!("| `{key}` |")))
                .expect("documented");
            let shown = match value {
                toml::Value::String(s) if !key.ends_with("dir") && !key.ends_with("socket") => {
                    format!("`\"{s}\"`")
                }
                toml::Value::String(s) => format!("`{s}`"),
                other => format!("`{other}`"),
            };
            assert!(
                row.contains(&shown),
                "the default of {key} is {shown}: {row}"
            );
        }
    }

    #[test]
    fn missing_explicit_config_is_an_error() {
        let cli = Cli {
            config: Some("/nonexistent/keibi.toml".into()),
            ..Cli::default()
        };
        assert!(Config::load(&cli).is_err());
    }
}
