//! Environment variables as the second source of a binary's flags.
//!
//! A flag declared with clap's `env = "KEIBI_..."` takes its value from
//! the command line, else from that variable (clap's own rule). [`parse`]
//! adds what clap leaves out: when a value from the environment is
//! invalid, clap's message names only the flag; here it names the
//! variable too, so a bad `KEIBI_DEADLINE` in a unit file is not taken for
//! a bad `--deadline` that nobody typed. It also hands back the
//! `ArgMatches`, whose `value_source` tells a caller which values came from
//! the environment (`keibi-syncd --check-config` prints that).

use clap::error::ErrorKind;
use clap::{ArgMatches, Command, FromArgMatches};
use std::ffi::{OsStr, OsString};

/// Parse this process's command line (and environment) into `P`. On an
/// error, print it and exit with status 2 (clap's usage status), naming
/// the environment variable when a value from one is at fault.
pub fn parse<P: FromArgMatches + clap::CommandFactory>() -> (P, ArgMatches) {
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut cmd = P::command();
    let matches = match cmd.clone().try_get_matches_from(&args) {
        Ok(m) => m,
        Err(e) => {
            if matches!(
                e.kind(),
                ErrorKind::InvalidValue | ErrorKind::ValueValidation
            ) && let Some(why) = bad_env_value(&cmd, &args, |v| std::env::var_os(v))
            {
                eprintln!("{}: {why}", cmd.get_name());
                std::process::exit(2);
            }
            e.exit()
        }
    };
    match P::from_arg_matches(&matches) {
        Ok(p) => (p, matches),
        Err(e) => e.format(&mut cmd).exit(),
    }
}

/// The first flag whose value comes from its environment variable (it is
/// not on the command line `args`) and which that value fails to parse
/// as: `environment variable KEIBI_X = "v": invalid value 'v' for
/// '--x <X>': <why>`.
pub fn bad_env_value(
    cmd: &Command,
    args: &[OsString],
    getenv: impl Fn(&OsStr) -> Option<OsString>,
) -> Option<String> {
    for arg in cmd.get_arguments() {
        let (Some(var), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        if given(args, long) {
            continue;
        }
        let Some(value) = getenv(var) else {
            continue;
        };
        // The flag alone in a command of its own, the value on its command
        // line: the same parser and checks as the real parse.
        let probe = Command::new("env")
            .no_binary_name(true)
            .arg(arg.clone().required(false));
        let mut given = OsString::from(format!("--{long}="));
        given.push(&value);
        if let Err(e) = probe.try_get_matches_from([given]) {
            let why = e
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ")
                .to_string();
            return Some(format!(
                "environment variable {} = {:?}: {why}",
                var.to_string_lossy(),
                value.to_string_lossy()
            ));
        }
    }
    None
}

/// Whether `--long` (alone or as `--long=VALUE`) is among `args`, before
/// any `--`.
fn given(args: &[OsString], long: &str) -> bool {
    let flag = format!("--{long}");
    let with_value = format!("--{long}=");
    args.iter()
        .skip(1)
        .map(|a| a.to_string_lossy())
        .take_while(|a| a != "--")
        .any(|a| a == flag || a.starts_with(&with_value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, value_parser};

    fn cmd() -> Command {
        Command::new("demo")
            .arg(
                Arg::new("threads")
                    .long("threads")
                    .env("DEMO_THREADS")
                    .value_parser(value_parser!(u16)),
            )
            .arg(Arg::new("name").long("name").env("DEMO_NAME"))
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_bad_value_from_the_environment_is_named_by_its_variable() {
        let env = |v: &OsStr| (v == "DEMO_THREADS").then(|| OsString::from("many"));
        let why = bad_env_value(&cmd(), &os(&["demo"]), env).expect("the variable is bad");
        assert!(why.contains("DEMO_THREADS = \"many\""), "{why}");
        assert!(why.contains("--threads"), "{why}");
        // The same value on the command line is clap's to report.
        assert_eq!(
            bad_env_value(&cmd(), &os(&["demo", "--threads", "3"]), env),
            None
        );
        assert_eq!(
            bad_env_value(&cmd(), &os(&["demo", "--threads=3"]), env),
            None
        );
        // A good value is no error.
        let good = |v: &OsStr| (v == "DEMO_THREADS").then(|| OsString::from("4"));
        assert_eq!(bad_env_value(&cmd(), &os(&["demo"]), good), None);
    }

    #[test]
    fn a_flag_after_double_dash_is_not_given() {
        assert!(!given(&os(&["demo", "--", "--threads"]), "threads"));
        assert!(given(&os(&["demo", "--threads", "1"]), "threads"));
        assert!(!given(&os(&["demo", "--threadsx"]), "threads"));
    }
}
