//! The control socket answers while every store call is blocked.
//!
//! syncd is started with its test-only fault point `KEIBI_TEST_STORE_STALL`
//! naming a file; while the file exists every store call of syncd waits
//! (see `syncd/src/fault.rs`). With more filesystem operations stuck in
//! the store than syncd has runtime workers, `keibictl status` and
//! `keibictl debug ops` must each finish within one second (wall clock,
//! process start to exit: a liveness bound, not a speed test), `status`
//! saying its figures are stale, `debug ops` listing the stuck requests.
//! Once the file is removed every stuck operation completes with its
//! normal result and `status` counts afresh.

use harness::binaries::binary;
use harness::{Options, poll_until, run_bounded, setup};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);
/// What keibictl may take while the store is blocked.
const BOUND: Duration = Duration::from_secs(1);
/// The fault point's variable (`syncd/src/fault.rs`).
const STALL_ENV: &str = "KEIBI_TEST_STORE_STALL";

/// One keibictl run: exit code, parsed JSON, stderr, wall time.
struct Answer {
    code: Option<i32>,
    json: Value,
    stderr: String,
    took: Duration,
}

fn keibictl(control: &Path, args: &[&str]) -> Answer {
    let started = Instant::now();
    let out = run_bounded(
        Command::new(binary("keibictl"))
            .arg("--socket")
            .arg(control)
            // Far above the bound: a late answer shows as a slow run, not
            // as keibictl giving up.
            .args(["--timeout", "10s"])
            .args(args),
        Duration::from_secs(30),
    );
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    Answer {
        code: out.status.code(),
        json,
        stderr,
        took,
    }
}

/// An operation on the mount that needs the store, and what it gave.
enum Outcome {
    /// `stat` of a name that does not exist (a `lookup` of its directory,
    /// whose entry the kernel dropped, then the name's).
    Missing(std::io::Result<std::fs::Metadata>),
    /// Creating and writing a new file (`create`, then the write).
    Created(std::io::Result<()>),
}

fn start_ops(dirs: &[PathBuf]) -> Vec<(PathBuf, JoinHandle<Outcome>)> {
    dirs.iter()
        .enumerate()
        .map(|(i, d)| {
            if i % 4 == 3 {
                let p = d.join("new-file");
                let path = p.clone();
                (
                    p,
                    std::thread::spawn(move || {
                        Outcome::Created(std::fs::write(&path, b"written while stuck"))
                    }),
                )
            } else {
                let p = d.join("missing");
                let path = p.clone();
                (
                    p,
                    std::thread::spawn(move || Outcome::Missing(std::fs::metadata(&path))),
                )
            }
        })
        .collect()
}

/// FUSE operations of the mount waiting on syncd, from mountd's ops socket
/// (which answers with or without syncd).
fn waiting_on_syncd(control: &Path, mnt: &Path, lock_dir: &Path) -> usize {
    let mnt_s = mnt.display().to_string();
    let lock_s = lock_dir.display().to_string();
    let a = keibictl(
        control,
        &[
            "debug",
            "ops",
            "--json",
            "--mount",
            &mnt_s,
            "--lock-dir",
            &lock_s,
        ],
    );
    a.json["mounts"][&mnt_s].as_array().map_or(0, |ops| {
        ops.iter()
            .filter(|op| {
                op["waiting_on"]
                    .as_str()
                    .is_some_and(|w| w.starts_with("keibi-syncd"))
                    && op["age_ms"].as_u64().is_some_and(|ms| ms >= 200)
            })
            .count()
    })
}

#[test]
fn control_socket_answers_while_every_store_call_is_blocked() {
    // The stall file lives where syncd (nobody) can see it.
    let stall_dir = tempfile::Builder::new()
        .prefix("kbstall")
        .tempdir_in("/tmp")
        .expect("a directory for the stall file");
    std::fs::set_permissions(stall_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the stall directory");
    let stall = stall_dir.path().join("stall");
    let (_w, fx) = setup(
        "control liveness",
        LIMIT,
        Options {
            // Long enough that no stuck call gives up while we look.
            deadline: Duration::from_secs(60),
            syncd_env: vec![(STALL_ENV.into(), stall.display().to_string())],
            ..Options::default()
        },
    );
    let (mnt, control, lock_dir) = (fx.mnt(), fx.control_socket(), fx.lock_dir());
    assert!(
        fx.syncd_log().contains(STALL_ENV),
        "syncd did not report the armed fault point:\n{}",
        fx.syncd_log()
    );

    // More stuck operations than syncd has runtime workers (one per CPU).
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let stuck = (2 * cpus).max(8);
    let dirs: Vec<PathBuf> = (0..stuck).map(|i| mnt.join(format!("d{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir(d).expect("mkdir before the stall");
    }
    let before = keibictl(&control, &["status", "--json"]);
    assert_eq!(before.code, Some(0), "status: {}", before.stderr);
    assert_eq!(before.json["counts_fresh"], true, "{}", before.json);
    assert_eq!(
        before.json["directories"],
        (stuck + 1) as u64,
        "{}",
        before.json
    );

    // Every operation below must need the store: the kernel forgets the
    // directories' entries, so each path walk looks its directory up in
    // syncd. (mountd answers some things itself: the absence of a name in
    // a directory made through it, and the root's attributes once after a
    // change in the root.)
    std::fs::write("/proc/sys/vm/drop_caches", b"2").expect("echo 2 > drop_caches");
    std::fs::write(&stall, b"").expect("create the stall file");
    let ops = start_ops(&dirs);
    poll_until(
        "every operation to wait on the blocked store",
        LIMIT / 3,
        || (waiting_on_syncd(&control, &mnt, &lock_dir) >= stuck).then_some(()),
    );

    for round in 0..3 {
        let status = keibictl(&control, &["status", "--json"]);
        eprintln!(
            "round {round}: status took {:?}: {}",
            status.took, status.json
        );
        assert!(
            status.took < BOUND,
            "keibictl status took {:?} while the store was blocked (bound {BOUND:?}); stderr: {}",
            status.took,
            status.stderr
        );
        assert_eq!(status.code, Some(0), "status: {}", status.stderr);
        assert_eq!(
            status.json["counts_fresh"], false,
            "a blocked store cannot give fresh counts: {}",
            status.json
        );
        assert!(
            status.json["counts_age_ms"].as_u64().is_some(),
            "the figures of the count before the stall, with their age: {}",
            status.json
        );
        assert_eq!(
            status.json["mounts"].as_array().map(Vec::len),
            Some(1),
            "the connected mount: {}",
            status.json
        );

        let ops_answer = keibictl(&control, &["debug", "ops", "--json"]);
        eprintln!(
            "round {round}: debug ops took {:?}: {}",
            ops_answer.took, ops_answer.json
        );
        assert!(
            ops_answer.took < BOUND,
            "keibictl debug ops took {:?} while the store was blocked (bound {BOUND:?}); stderr: {}",
            ops_answer.took,
            ops_answer.stderr
        );
        assert_eq!(ops_answer.code, Some(0), "debug ops: {}", ops_answer.stderr);
        let in_syncd = ops_answer.json["syncd"]
            .as_array()
            .map_or(0, |ops| ops.len());
        assert!(
            in_syncd >= 1,
            "syncd lists the requests stuck in its store: {}",
            ops_answer.json
        );
    }

    std::fs::remove_file(&stall).expect("remove the stall file");
    let mut results = Vec::new();
    for (path, op) in ops {
        poll_until(
            "a stuck operation to finish after the store is unblocked",
            LIMIT / 4,
            || op.is_finished().then_some(()),
        );
        results.push((path, op.join().expect("operation thread")));
    }
    let mut created = 0u64;
    for (path, outcome) in results {
        match outcome {
            Outcome::Missing(r) => match r {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => panic!("stat {}: expected ENOENT, got {other:?}", path.display()),
            },
            Outcome::Created(r) => {
                r.unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
                let got = std::fs::read(&path).expect("read the new file back");
                assert_eq!(got, b"written while stuck", "{}", path.display());
                created += 1;
            }
        }
    }
    assert!(created >= 1, "the mix includes creates");

    let after = poll_until("a fresh status after the stall", LIMIT / 4, || {
        let a = keibictl(&control, &["status", "--json"]);
        (a.code == Some(0) && a.json["counts_fresh"] == true).then_some(a)
    });
    assert_eq!(after.json["files"], created, "{}", after.json);
    poll_until("nothing left in flight in syncd", LIMIT / 4, || {
        let a = keibictl(&control, &["debug", "ops", "--json"]);
        (a.json["syncd"].as_array().map(Vec::len) == Some(0)).then_some(())
    });
}
