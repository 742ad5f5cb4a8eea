//! The command line: global options first, then a subcommand.
//!
//! ```text
//! keibictl [--socket PATH] [--timeout DURATION] status [--json]
//! keibictl [--socket PATH] [--timeout DURATION] check [--repair] [--json]
//! keibictl [--socket PATH] [--timeout DURATION] id [--json]
//! keibictl [--socket PATH] [--timeout DURATION] debug ops [--mount MOUNTPOINT ...]
//!          [--mountd-socket PATH ...] [--lock-dir DIR] [--json]
//! keibictl [--timeout DURATION] debug passthrough (--mount MOUNTPOINT | --mountd-socket PATH)
//!          [--lock-dir DIR] [--json]
//! ```
//!
//! Durations use humantime's syntax (`5s`, `500ms`, `1m`).

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

    /// How long to wait for syncd, connect and answer together (e.g. `5s`, `500ms`).
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Versions, uptime, state directory, connected mounts, file and byte counts.
    Status {
        /// Print the status as JSON (one object) instead of a table.
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
    /// Look inside the daemons.
    Debug {
        /// What to look at.
        #[command(subcommand)]
        what: DebugCommand,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let a = Args::try_parse_from(["keibictl", "status"]).expect("parse");
        assert_eq!(a.socket, PathBuf::from("/run/keibi/control.sock"));
        assert_eq!(a.timeout, Duration::from_secs(5));
        assert!(matches!(a.command, Command::Status { json: false }));
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
        assert_eq!(a.timeout, Duration::from_millis(250));
        assert!(matches!(a.command, Command::Status { json: true }));
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
    fn zero_or_garbage_timeout_is_refused() {
        assert!(Args::try_parse_from(["keibictl", "--timeout", "0s", "status"]).is_err());
        assert!(Args::try_parse_from(["keibictl", "--timeout", "soon", "status"]).is_err());
    }
}
