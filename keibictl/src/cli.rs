//! The command line: global options first, then a subcommand.
//!
//! ```text
//! keibictl [--socket PATH] [--timeout DURATION] status [--files] [--json]
//! keibictl [--socket PATH] [--timeout DURATION] check [--repair] [--json]
//! keibictl [--socket PATH] [--timeout DURATION] id [--json]
//! keibictl [--socket PATH] [--timeout DURATION] peer add FINGERPRINT [--addr HOST:PORT]
//!          [--name NAME] [--json]
//! keibictl [--socket PATH] [--timeout DURATION] peer list [--json]
//! keibictl [--socket PATH] [--timeout DURATION] peer remove FINGERPRINT [--json]
//! keibictl [--socket PATH] peer bench FINGERPRINT [--bytes SIZE] [--streams N]
//!          [--time-limit DURATION] [--json]
//! keibictl [--socket PATH] [--timeout DURATION] debug ops [--mount MOUNTPOINT ...]
//!          [--mountd-socket PATH ...] [--lock-dir DIR] [--json]
//! keibictl [--timeout DURATION] debug passthrough (--mount MOUNTPOINT | --mountd-socket PATH)
//!          [--lock-dir DIR] [--json]
//! keibictl [--socket PATH] [--timeout DURATION] wait [--synced] [--json]
//! keibictl [--socket PATH] [--timeout DURATION] prefetch PATH... [--json]
//! keibictl json-schema [NAME]
//! ```
//!
//! Durations use humantime's syntax (`5s`, `500ms`, `1m`). `--timeout`
//! bounds each command as a whole: 5 s by default, 1 min for `wait` and
//! `prefetch` (whose every call to syncd is bounded by the rest of it, and
//! by 5 s).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// keibictl: ask keibi-syncd about its state.
#[derive(Parser, Debug)]
#[command(name = "keibictl", version, about)]
pub struct Args {
    /// keibi-syncd's control socket.
    #[arg(long, global = true, default_value = "/run/keibi/control.sock")]
    pub socket: PathBuf,

    /// How long to wait for syncd, connect and answer together (e.g. `5s`,
    /// `500ms`); for `wait` and `prefetch`, the bound on the whole wait.
    /// Default: 5s; 1m for `wait` and `prefetch`.
    #[arg(long, global = true, value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The default `--timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default `--timeout` of `wait` and `prefetch`.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(60);

impl Args {
    /// `--timeout`, or the command's default.
    pub fn timeout(&self) -> Duration {
        let default = match self.command {
            Command::Wait { .. } | Command::Prefetch { .. } => DEFAULT_WAIT_TIMEOUT,
            _ => DEFAULT_TIMEOUT,
        };
        self.timeout.unwrap_or(default)
    }
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Versions, uptime, state directory, connected mounts, file and byte
    /// counts, and sync: per peer "in sync", "N changes pending" or
    /// "unreachable since T", files not all local, conflicts.
    Status {
        /// List the files whose bytes are not all local instead (path,
        /// size, bytes present).
        #[arg(long)]
        files: bool,
        /// Print the status as JSON (one object; `sync` holds the sync
        /// state) instead of a table; with `--files`, a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Scan syncd's store and content directory for inconsistencies (a
    /// name without content, content without a name, wrong link counts,
    /// orphans, ...). Exit status 0 when nothing is (left) wrong, 1
    /// otherwise. Runs on a live syncd; give a big store a longer
    /// `--timeout`.
    Check {
        /// Fix what can be fixed without guessing, and say what was done.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON (one object) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// This machine's peer identity: the fingerprint to compare when
    /// pairing (grouped for reading aloud), the public key, and the
    /// configured listen addresses.
    Id {
        /// Print the identity as JSON (one object) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Wait for keibi-syncd, for scripts: until it answers on its control
    /// socket (after a start), or with `--synced` until this machine is in
    /// sync with every connected peer. Peers that are not connected are
    /// not waited for (named on stderr). Exit status 0 when done, 4 when
    /// `--timeout` (default 1m) passed first, saying what is pending, 1
    /// when syncd refuses the connection (protocol version, permission).
    Wait {
        /// Also wait until no local change is unversioned and, with every
        /// connected peer, nothing is left to send, to apply or waiting
        /// here (the peer has told this connection how far its log goes).
        #[arg(long)]
        synced: bool,
        /// Print the outcome as JSON (one object), also at the timeout;
        /// no progress on stderr.
        #[arg(long)]
        json: bool,
    },
    /// Make files local: fetch every missing chunk of each named file from
    /// the connected peers, showing bytes, rate and ETA. Exit status 0 when
    /// every file is local, 1 when a path is not a file of the share, 4 when
    /// `--timeout` (default 1m) passed first (the fetches go on).
    Prefetch {
        /// Files to fetch: paths under a mountpoint of this keibi-syncd,
        /// or paths in the share from its root (`/dir/file`, as
        /// `status --files` lists them).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Print the outcome as JSON (one object); no progress on stderr.
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of a command's `--json` output (the files
    /// under docs/json-schema/); without a name, list the names.
    JsonSchema {
        /// The output: status, status-files, check, id, peer-add,
        /// peer-list, peer-remove, peer-bench, debug-ops,
        /// debug-passthrough, wait, prefetch.
        name: Option<String>,
    },
    /// Pair with other machines, list them and their connections, unpair.
    Peer {
        /// What to do.
        #[command(subcommand)]
        what: PeerCommand,
    },
    /// Look inside the daemons.
    Debug {
        /// What to look at.
        #[command(subcommand)]
        what: DebugCommand,
    },
}

/// `keibictl peer ...`.
#[derive(Subcommand, Debug)]
pub enum PeerCommand {
    /// Pair with a machine: accept its connections, and dial it when an
    /// address is given. Both machines must add each other. Adding a peer
    /// again changes its address and name.
    Add {
        /// The peer's fingerprint, as its `keibictl id` shows it (groups,
        /// spaces, dashes and case do not matter).
        fingerprint: String,
        /// Where to dial it: HOST:PORT, or HOST for port 58150. Without
        /// it, this machine waits for the peer to dial.
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
        /// A name for the peer, shown by `peer list`.
        #[arg(long)]
        name: Option<String>,
        /// Print the peer as JSON (one object).
        #[arg(long)]
        json: bool,
    },
    /// Every paired peer: name, fingerprint, address, state, last seen,
    /// round-trip time, bytes sent and received, protocol version.
    List {
        /// Print a JSON array of peers instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Unpair a peer: its connection is closed at once, and it is neither
    /// dialed nor accepted any more.
    Remove {
        /// The peer's fingerprint.
        fingerprint: String,
        /// Print the removed peer as JSON (one object).
        #[arg(long)]
        json: bool,
    },
    /// Measure the channel to a connected peer: ask it for `--bytes` of
    /// test data over `--streams` concurrent streams and report MB/s.
    Bench {
        /// The peer's fingerprint.
        fingerprint: String,
        /// How much data, in total (e.g. `1GiB`, `512MiB`, `100MB`, `4096`).
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        bytes: u64,
        /// Concurrent streams (1 to 64).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        streams: u32,
        /// The bound on the whole bench (it replaces `--timeout`).
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        time_limit: Duration,
        /// Print the report as JSON (one object).
        #[arg(long)]
        json: bool,
    },
}

/// `keibictl debug ...`.
#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// Every IPC request in flight in keibi-syncd and every FUSE operation
    /// in flight in the named mounts' keibi-mountd, with age and what it
    /// waits on. mountd is asked directly, so this works while syncd is
    /// frozen.
    Ops {
        /// A keibi mountpoint whose mountd to ask (repeatable).
        #[arg(long = "mount", value_name = "MOUNTPOINT")]
        mounts: Vec<PathBuf>,
        /// A keibi-mountd ops socket to ask (repeatable).
        #[arg(long = "mountd-socket", value_name = "PATH")]
        mountd_sockets: Vec<PathBuf>,
        /// keibi-mountd's lock directory (where the ops sockets live).
        #[arg(long, default_value = ipc_schema::paths::DEFAULT_LOCK_DIR)]
        lock_dir: PathBuf,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Whether a mount's reads and writes go through FUSE passthrough:
    /// what keibi-mountd asked for, what the kernel granted, and how many
    /// opens went each way since the mount (asked of mountd directly).
    Passthrough {
        /// The keibi mountpoint whose mountd to ask.
        #[arg(
            long = "mount",
            value_name = "MOUNTPOINT",
            required_unless_present = "mountd_socket",
            conflicts_with = "mountd_socket"
        )]
        mount: Option<PathBuf>,
        /// The keibi-mountd ops socket to ask.
        #[arg(long = "mountd-socket", value_name = "PATH")]
        mountd_socket: Option<PathBuf>,
        /// keibi-mountd's lock directory (where the ops sockets live).
        #[arg(long, default_value = "/run/keibi/mounts")]
        lock_dir: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err("the timeout must be greater than zero".into());
    }
    Ok(d)
}

/// A byte count: digits, optionally followed by `B`, `K`/`KB` (1000),
/// `KiB` (1024), `M`/`MB`, `MiB`, `G`/`GB`, `GiB`, `T`/`TB`, `TiB`
/// (case-insensitive, spaces allowed). Zero is refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 1GiB, 512MiB, 100MB or 4096"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1000 * 1000,
        "mib" => 1 << 20,
        "g" | "gb" => 1000 * 1000 * 1000,
        "gib" => 1 << 30,
        "t" | "tb" => 1000 * 1000 * 1000 * 1000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
            ));
        }
    };
    match n.checked_mul(mult) {
        Some(0) => Err("the size must be greater than zero".into()),
        Some(v) => Ok(v),
        None => Err(format!("{s:?} is too large")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_commands_parse() {
        let a = Args::try_parse_from([
            "keibictl",
            "peer",
            "add",
            "ABCD EFGH",
            "--addr",
            "host:1",
            "--name",
            "desk",
            "--json",
        ])
        .expect("parse");
        match a.command {
            Command::Peer {
                what:
                    PeerCommand::Add {
                        fingerprint,
                        addr,
                        name,
                        json,
                    },
            } => {
                assert_eq!(fingerprint, "ABCD EFGH");
                assert_eq!(addr.as_deref(), Some("host:1"));
                assert_eq!(name.as_deref(), Some("desk"));
                assert!(json);
            }
            other => panic!("parsed as {other:?}"),
        }
        let a = Args::try_parse_from(["keibictl", "peer", "bench", "FP"]).expect("parse");
        assert!(matches!(
            a.command,
            Command::Peer {
                what: PeerCommand::Bench {
                    bytes: 1073741824,
                    streams: 1,
                    json: false,
                    ..
                }
            }
        ));
        let a = Args::try_parse_from([
            "keibictl",
            "peer",
            "bench",
            "FP",
            "--bytes",
            "100MB",
            "--streams",
            "4",
        ])
        .expect("parse");
        assert!(matches!(
            a.command,
            Command::Peer {
                what: PeerCommand::Bench {
                    bytes: 100_000_000,
                    streams: 4,
                    ..
                }
            }
        ));
        assert!(
            Args::try_parse_from(["keibictl", "peer", "bench", "FP", "--streams", "0"]).is_err()
        );
        assert!(
            Args::try_parse_from(["keibictl", "peer", "bench", "FP", "--streams", "65"]).is_err()
        );
        assert!(Args::try_parse_from(["keibictl", "peer", "add"]).is_err());
        assert!(matches!(
            Args::try_parse_from(["keibictl", "peer", "list", "--json"])
                .expect("parse")
                .command,
            Command::Peer {
                what: PeerCommand::List { json: true }
            }
        ));
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1 gib"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("3k"), Ok(3000));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        for bad in [
            "",
            "0",
            "0MiB",
            "GiB",
            "1.5GiB",
            "1 parsec",
            "-1",
            "99999999999TiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults() {
        let a = Args::try_parse_from(["keibictl", "status"]).expect("parse");
        assert_eq!(a.socket, PathBuf::from("/run/keibi/control.sock"));
        assert_eq!(a.timeout(), Duration::from_secs(5));
        assert!(matches!(
            a.command,
            Command::Status {
                json: false,
                files: false
            }
        ));
    }

    #[test]
    fn options_before_and_after_the_subcommand() {
        let a = Args::try_parse_from([
            "keibictl",
            "--socket",
            "/tmp/c.sock",
            "status",
            "--json",
            "--timeout",
            "250ms",
        ])
        .expect("parse");
        assert_eq!(a.socket, PathBuf::from("/tmp/c.sock"));
        assert_eq!(a.timeout(), Duration::from_millis(250));
        assert!(matches!(
            a.command,
            Command::Status {
                json: true,
                files: false
            }
        ));
    }

    #[test]
    fn debug_ops_takes_several_mounts() {
        let a = Args::try_parse_from([
            "keibictl", "debug", "ops", "--mount", "/mnt/a", "--mount", "/mnt/b", "--json",
        ])
        .expect("parse");
        match a.command {
            Command::Debug {
                what:
                    DebugCommand::Ops {
                        mounts,
                        mountd_sockets,
                        lock_dir,
                        json,
                    },
            } => {
                assert_eq!(mounts, [PathBuf::from("/mnt/a"), PathBuf::from("/mnt/b")]);
                assert!(mountd_sockets.is_empty());
                assert_eq!(lock_dir, PathBuf::from("/run/keibi-mountd"));
                assert!(json);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn debug_passthrough_needs_one_target() {
        assert!(Args::try_parse_from(["keibictl", "debug", "passthrough"]).is_err());
        assert!(
            Args::try_parse_from([
                "keibictl",
                "debug",
                "passthrough",
                "--mount",
                "/mnt/a",
                "--mountd-socket",
                "/x.sock"
            ])
            .is_err()
        );
        let a = Args::try_parse_from(["keibictl", "debug", "passthrough", "--mount", "/mnt/a"])
            .expect("parse");
        assert!(matches!(
            a.command,
            Command::Debug {
                what: DebugCommand::Passthrough {
                    mount: Some(_),
                    mountd_socket: None,
                    json: false,
                    ..
                }
            }
        ));
    }

    #[test]
    fn check_takes_repair_and_json() {
        let a = Args::try_parse_from(["keibictl", "check"]).expect("parse");
        assert!(matches!(
            a.command,
            Command::Check {
                repair: false,
                json: false
            }
        ));
        let a = Args::try_parse_from(["keibictl", "check", "--repair", "--json"]).expect("parse");
        assert!(matches!(
            a.command,
            Command::Check {
                repair: true,
                json: true
            }
        ));
    }

    #[test]
    fn id_takes_json() {
        let a = Args::try_parse_from(["keibictl", "id"]).expect("parse");
        assert!(matches!(a.command, Command::Id { json: false }));
        let a = Args::try_parse_from(["keibictl", "id", "--json"]).expect("parse");
        assert!(matches!(a.command, Command::Id { json: true }));
    }

    #[test]
    fn wait_and_prefetch_default_to_a_minute_and_take_timeout() {
        let a = Args::try_parse_from(["keibictl", "wait"]).expect("parse");
        assert!(matches!(
            a.command,
            Command::Wait {
                synced: false,
                json: false
            }
        ));
        assert_eq!(a.timeout(), Duration::from_secs(60));
        let a = Args::try_parse_from(["keibictl", "wait", "--synced", "--timeout", "3s", "--json"])
            .expect("parse");
        assert!(matches!(
            a.command,
            Command::Wait {
                synced: true,
                json: true
            }
        ));
        assert_eq!(a.timeout(), Duration::from_secs(3));
        assert!(Args::try_parse_from(["keibictl", "prefetch"]).is_err());
        let a = Args::try_parse_from(["keibictl", "prefetch", "/a", "b/c"]).expect("parse");
        match &a.command {
            Command::Prefetch { paths, json } => {
                assert_eq!(paths, &[PathBuf::from("/a"), PathBuf::from("b/c")]);
                assert!(!json);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert_eq!(a.timeout(), Duration::from_secs(60));
    }

    #[test]
    fn zero_or_garbage_timeout_is_refused() {
        assert!(Args::try_parse_from(["keibictl", "--timeout", "0s", "status"]).is_err());
        assert!(Args::try_parse_from(["keibictl", "--timeout", "soon", "status"]).is_err());
    }
}
