//! Which way a fixture's reads and writes went: through FUSE passthrough
//! (the kernel on the content file) or through mountd's `pread`/`pwrite`.
//!
//! keibi-mountd falls back from passthrough to its own I/O without failing
//! anything, so a test that means to cover passthrough must check that it
//! was really used. [`KeibiFixture::passthrough_status`] asks mountd with
//! `keibictl debug passthrough --json` (on its ops socket), and
//! [`KeibiFixture::assert_io_path`] checks the counts against the
//! fixture's options: with passthrough, it was granted by the kernel, never
//! switched off, and every open went through it; without, no open did.
//! Both require at least one open, so a test that opened nothing cannot
//! pass the check by accident. Kernels from 6.9 on support passthrough;
//! the tests run on such a kernel, so passthrough being off there is a
//! failure, never a skip.
//!
//! `keibictl status --json` also says `passthrough` per mount (the state
//! when mountd connected to syncd); when the fixture runs its own syncd it
//! is checked to agree.

use crate::KeibiFixture;
use crate::binaries::binary;
use crate::process::{check_output, run_bounded};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

impl KeibiFixture {
    /// mountd's passthrough state and open counts, as
    /// `keibictl debug passthrough --json` prints them.
    pub fn passthrough_status(&self) -> Value {
        let out = run_bounded(
            Command::new(binary("keibictl"))
                .arg("--timeout")
                .arg("5s")
                .args(["debug", "passthrough", "--json", "--mount"])
                .arg(self.mnt())
                .arg("--lock-dir")
                .arg(self.lock_dir()),
            Duration::from_secs(30),
        );
        let text = check_output("keibictl debug passthrough", &out);
        serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("keibictl debug passthrough printed no JSON ({e}): {text:?}")
        })
    }

    /// syncd's status, as `keibictl status --json` prints it.
    pub fn status_json(&self) -> Value {
        let out = run_bounded(
            Command::new(binary("keibictl"))
                .arg("--socket")
                .arg(self.control_socket())
                .args(["--timeout", "5s", "status", "--json"]),
            Duration::from_secs(30),
        );
        let text = check_output("keibictl status", &out);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("keibictl status printed no JSON ({e}): {text:?}"))
    }

    /// What `keibictl status --json` says of this mount's passthrough.
    pub fn status_passthrough(&self) -> bool {
        let v = self.status_json();
        let mounts = v["mounts"].as_array().expect("status has mounts");
        assert_eq!(mounts.len(), 1, "one mount connected: {v}");
        mounts[0]["info"]["passthrough"]
            .as_bool()
            .unwrap_or_else(|| panic!("status reports passthrough per mount: {v}"))
    }

    /// Assert that the opens of this mount so far went the way the options
    /// say (see the module docs), and that at least one open happened.
    #[track_caller]
    pub fn assert_io_path(&self) {
        let st = self.passthrough_status();
        let count = |k: &str| st[k].as_u64().unwrap_or_else(|| panic!("no {k} in {st}"));
        let (pt, plain) = (count("passthrough_opens"), count("plain_opens"));
        if self.options().passthrough {
            assert_eq!(
                (
                    st["wanted"].as_bool(),
                    st["granted"].as_bool(),
                    st["disabled"].as_bool()
                ),
                (Some(true), Some(true), Some(false)),
                "passthrough was asked for but is not in use (this kernel supports it): {st}"
            );
            assert!(
                pt > 0 && plain == 0,
                "with passthrough every open must go through it: {pt} did, {plain} did not"
            );
        } else {
            assert_eq!(
                st["wanted"].as_bool(),
                Some(false),
                "--no-passthrough was given: {st}"
            );
            assert!(
                pt == 0 && plain > 0,
                "without passthrough no open may use it: {pt} did, {plain} did not"
            );
        }
        if self.syncd_pid().is_some() {
            assert_eq!(
                self.status_passthrough(),
                self.options().passthrough,
                "keibictl status disagrees with mountd about passthrough"
            );
        }
    }
}
