//! Logging to stderr: `RUST_LOG`-style filter (default `info,tarpc=off`;
//! tarpc logs every deadline expiry itself, and mountd's own warn line
//! already says it), UTC RFC 3339 timestamps with milliseconds.

use std::fmt;
use std::io::IsTerminal;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// Install the subscriber. fuser's `log` records are forwarded too.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,tarpc=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(UtcMillis)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
}
