//! Progress of the commands people wait on (`wait`, `prefetch`, `peer
//! bench`), on stderr.
//!
//! Three ways, chosen once per command ([`Mode::pick`]): an `indicatif`
//! bar (bytes, rate and ETA when the total is known, else a spinner with
//! the elapsed time) when stderr is a terminal; plain lines when it is not
//! (a log, a pipe), at most one per second and only when the message
//! changed; nothing with `--json`, so stdout carries only the JSON and
//! stderr only real warnings.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// An indicatif bar on the terminal.
    Bar,
    /// Plain lines on stderr, at most one a second.
    Lines,
    /// Nothing (`--json`).
    Quiet,
}

impl Mode {
    /// Quiet with `--json`, a bar when stderr is a terminal, else lines.
    pub fn pick(json: bool) -> Mode {
        if json {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        }
    }
}

/// The least time between two plain lines.
const LINE_EVERY: Duration = Duration::from_secs(1);

/// One command's progress.
pub struct Progress {
    mode: Mode,
    /// `what`: the command, at the start of each plain line.
    what: &'static str,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Option<(Instant, String)>,
}

impl Progress {
    /// Progress of `what` in bytes (`total` known: bar, rate, ETA).
    pub fn bytes(mode: Mode, what: &'static str, total: u64) -> Progress {
        let bar = (mode == Mode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress::with(mode, what, bar)
    }

    /// Progress of `what` in words ([`Self::say`]: the changes pending,
    /// falling to 0): a spinner with the elapsed time and the message.
    pub fn changes(mode: Mode, what: &'static str) -> Progress {
        let bar = (mode == Mode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{elapsed_precise}] {spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_prefix(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress::with(mode, what, bar)
    }

    fn with(mode: Mode, what: &'static str, bar: Option<ProgressBar>) -> Progress {
        Progress {
            mode,
            what,
            bar,
            started: Instant::now(),
            last_line: None,
        }
    }

    /// Bytes done so far (and the total, if it changed).
    pub fn set_bytes(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done.min(total));
        }
        if self.mode == Mode::Lines {
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let line = format!(
                "{} of {} ({:.1} MB/s)",
                size(done),
                size(total),
                done as f64 / secs / 1e6
            );
            self.line(line, false);
        }
    }

    /// The state in words (`3 changes pending ...`).
    pub fn say(&mut self, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.clone());
        }
        if self.mode == Mode::Lines {
            self.line(message, true);
        }
    }

    /// A plain line, at most one per [`LINE_EVERY`]; with `only_changes`,
    /// only when it differs from the last one printed.
    fn line(&mut self, text: String, only_changes: bool) {
        let now = Instant::now();
        if let Some((at, last)) = &self.last_line
            && (now.duration_since(*at) < LINE_EVERY || (only_changes && *last == text))
        {
            return;
        }
        eprintln!(
            "keibictl: {}: {text} ({}s)",
            self.what,
            self.started.elapsed().as_secs()
        );
        self.last_line = Some((now, text));
    }

    /// A line that must be seen (a peer not waited for): above the bar, or
    /// on stderr (also with `--json`: it is a warning, not progress).
    pub fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("keibictl: {text}")),
            None => eprintln!("keibictl: {text}"),
        }
    }

    /// Remove the bar (the outcome is printed after it).
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `1234567` → `1.2 MiB`.
pub fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_quiet_and_sizes_read_well() {
        assert_eq!(Mode::pick(true), Mode::Quiet);
        assert_eq!(size(1000), "1000 B");
        assert_eq!(size(3 << 20), "3.0 MiB");
    }

    #[test]
    fn plain_lines_come_at_most_once_a_second_and_only_on_change() {
        let mut p = Progress::changes(Mode::Lines, "wait");
        p.say("a".into());
        let first = p.last_line.clone().expect("the first line is printed");
        p.say("b".into());
        assert_eq!(p.last_line, Some(first.clone()), "not within a second");
        // A second later, the same text is not printed again.
        p.last_line = Some((first.0 - LINE_EVERY, "b".into()));
        p.say("b".into());
        assert_eq!(p.last_line.as_ref().map(|l| l.1.as_str()), Some("b"));
        assert!(p.last_line.as_ref().expect("line").0 < first.0);
        p.say("c".into());
        assert_eq!(p.last_line.as_ref().map(|l| l.1.as_str()), Some("c"));
    }
}
