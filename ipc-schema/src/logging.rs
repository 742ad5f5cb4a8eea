//! The daemons' logging: text lines on stderr, or structured records to
//! the systemd journal.
//!
//! Both daemons call [`init`] once, after their command line is parsed.
//! Where the records go ([`LogTarget`]):
//!
//! - `stderr`: one text line per event, `RUST_LOG`-style filter, UTC
//!   RFC 3339 timestamps with milliseconds, colour only on a terminal.
//! - `journal`: the journal's native protocol (`tracing-journald`), one
//!   datagram per event to `/run/systemd/journal/socket`: `MESSAGE`,
//!   `PRIORITY` (error 3, warn 4, info 6, debug and trace 7, the syslog
//!   levels `journalctl -p` filters on), `TARGET` (the module), `CODE_FILE`,
//!   `CODE_LINE`, `SYSLOG_IDENTIFIER` (the daemon's name), and every field
//!   of the event as `F_<NAME>` (upper case: `op` is `F_OP`), so
//!   `journalctl F_OP=lookup` selects them. Fields of enclosing spans come
//!   the same way, with `SPAN_NAME`. The journal keeps its own timestamp.
//! - `auto` (the default): the journal when stderr is connected to it,
//!   which is how systemd runs a service with `StandardError=journal`
//!   (its default): systemd then sets `JOURNAL_STREAM` to the device and
//!   inode of that stream, `DEV:INO`, and stderr's `fstat` matches them
//!   (`systemd.exec(5)`, "Environment variables in spawned processes").
//!   Anything else, stderr.
//!
//! `RUST_LOG` filters both targets alike (default `info,tarpc=off`: tarpc
//! logs every expired deadline at error level, and the daemons report
//! those themselves). When the journal is asked for but its socket cannot
//! be opened, the records go to stderr instead, after one warning line
//! saying why: logging never stops a daemon from starting. `log` records
//! (fuser's) are forwarded to the same place.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The filter when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info,tarpc=off";

/// Where log records go (`--log-target`, `log_target`,
/// `KEIBI_LOG_TARGET`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogTarget {
    /// The journal when stderr is connected to it (`JOURNAL_STREAM`), else
    /// stderr.
    #[default]
    Auto,
    /// The journal's native socket (stderr if it cannot be opened).
    Journal,
    /// Text lines on stderr.
    Stderr,
}

impl LogTarget {
    /// The name `FromStr` accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            LogTarget::Auto => "auto",
            LogTarget::Journal => "journal",
            LogTarget::Stderr => "stderr",
        }
    }
}

impl fmt::Display for LogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(LogTarget::Auto),
            "journal" => Ok(LogTarget::Journal),
            "stderr" => Ok(LogTarget::Stderr),
            _ => Err(format!(
                "{s:?} is not a log target: one of auto, journal, stderr"
            )),
        }
    }
}

/// Install the subscriber for `target`; `identifier` is the journal's
/// `SYSLOG_IDENTIFIER` (the daemon's name). Returns where the records
/// actually go (never `Auto`). A second call does nothing but answer.
pub fn init(target: LogTarget, identifier: &str) -> LogTarget {
    let journal = match target {
        LogTarget::Journal => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => stderr_is_the_journal(),
    };
    if journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_syslog_identifier(identifier.to_string())
                    .with_priority_mappings(syslog_priorities());
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(layer)
                    .try_init();
                return LogTarget::Journal;
            }
            Err(e) => {
                init_stderr();
                tracing::warn!(
                    error = %e,
                    socket = "/run/systemd/journal/socket",
                    "cannot open the journal's socket; logging to stderr instead"
                );
                return LogTarget::Stderr;
            }
        }
    }
    init_stderr();
    LogTarget::Stderr
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
}

fn init_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_timer(UtcMillis)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// tracing's levels on the syslog priorities (`tracing-journald`'s own
/// default puts info at 5, "notice", one above what `journalctl -p info`
/// users expect of routine lines).
fn syslog_priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    tracing_journald::PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

/// Whether stderr is the stream systemd connected to the journal:
/// `JOURNAL_STREAM` names its device and inode.
pub fn stderr_is_the_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    #[allow(clippy::useless_conversion)] // dev_t and ino_t differ by target
    let (dev, ino) = (u64::from(st.st_dev), u64::from(st.st_ino));
    journal_stream_is(&var.to_string_lossy(), dev, ino)
}

/// Whether `JOURNAL_STREAM`'s value, `DEV:INO` in decimal, names this
/// device and inode.
pub fn journal_stream_is(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// `2025-01-31T12:34:56.789Z`.
struct UtcMillis;

impl FormatTime for UtcMillis {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        write_rfc3339_millis(w, d.as_secs(), d.subsec_millis())
    }
}

fn write_rfc3339_millis(w: &mut impl fmt::Write, secs: u64, millis: u32) -> fmt::Result {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    write!(
        w,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        let mut s = String::new();
        write_rfc3339_millis(&mut s, 0, 0).expect("format");
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        let mut s = String::new();
        // 2024-02-29T23:59:59.007Z
        write_rfc3339_millis(&mut s, 1_709_251_199, 7).expect("format");
        assert_eq!(s, "2024-02-29T23:59:59.007Z");
    }

    #[test]
    fn journal_stream_must_name_this_device_and_inode() {
        assert!(journal_stream_is("8:12345", 8, 12345));
        assert!(journal_stream_is("8:12345\n", 8, 12345));
        assert!(!journal_stream_is("8:12346", 8, 12345));
        assert!(!journal_stream_is("9:12345", 8, 12345));
        assert!(!journal_stream_is("8", 8, 12345));
        assert!(!journal_stream_is("", 8, 12345));
        assert!(!journal_stream_is("x:y", 8, 12345));
    }

    #[test]
    fn log_targets_parse_by_name_only() {
        for t in [LogTarget::Auto, LogTarget::Journal, LogTarget::Stderr] {
            assert_eq!(t.as_str().parse::<LogTarget>(), Ok(t));
        }
        let err = "syslog".parse::<LogTarget>().expect_err("unknown");
        assert!(err.contains("auto, journal, stderr"), "{err}");
    }
}
