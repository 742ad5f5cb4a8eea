//! [`Ctl`]: `keibictl` pointed at one syncd's control socket, with its
//! `--json` output parsed as untyped JSON.
//!
//! The tests read documented field names themselves (no shared types), so
//! a renamed field fails a test instead of being absorbed.

use crate::binaries;
use crate::daemons::duration_arg;
use crate::process::run_bounded;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

/// keibictl for the control socket `socket`; `name` labels messages.
#[derive(Clone, Debug)]
pub struct Ctl {
    name: String,
    socket: PathBuf,
}

impl Ctl {
    /// keibictl for the syncd whose control socket is `socket`.
    pub fn new(name: &str, socket: PathBuf) -> Ctl {
        binaries::binary("keibictl");
        Ctl {
            name: name.to_string(),
            socket,
        }
    }

    /// Run `keibictl --socket S --timeout LIMIT ARGS` (the process is
    /// killed 30 s after `limit`).
    pub fn run_within(&self, limit: Duration, args: &[&str]) -> Output {
        run_bounded(
            Command::new(binaries::binary("keibictl"))
                .arg("--socket")
                .arg(&self.socket)
                .arg("--timeout")
                .arg(duration_arg(limit))
                .args(args),
            limit + Duration::from_secs(30),
        )
    }

    /// [`Self::run_within`] with a 60 s limit.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_within(Duration::from_secs(60), args)
    }

    /// Run keibictl with `args` (which should include `--json`), assert exit
    /// status 0 and parse stdout as JSON.
    #[track_caller]
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
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

    /// This syncd's fingerprint (`keibictl id --json`, field `fingerprint`).
    #[track_caller]
    pub fn fingerprint(&self) -> String {
        self.json(&["id", "--json"])["fingerprint"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: keibictl id --json has no `fingerprint`", self.name))
            .to_string()
    }

    /// `keibictl peer list --json`.
    #[track_caller]
    pub fn peers(&self) -> Vec<Value> {
        match self.json(&["peer", "list", "--json"]) {
            Value::Array(v) => v,
            other => panic!("{}: peer list --json is not an array: {other}", self.name),
        }
    }

    /// The entry of `fingerprint` in `peer list --json`, if any.
    #[track_caller]
    pub fn peer(&self, fingerprint: &str) -> Option<Value> {
        self.peers()
            .into_iter()
            .find(|p| p["fingerprint"].as_str() == Some(fingerprint))
    }

    /// `keibictl status --json`.
    #[track_caller]
    pub fn status(&self) -> Value {
        self.json(&["status", "--json"])
    }

    /// `keibictl status --files --json`: the files whose bytes are not all
    /// local.
    #[track_caller]
    pub fn not_local(&self) -> Value {
        self.json(&["status", "--files", "--json"])
    }
}
