//! `keibictl debug ops` reads a frozen mount: with syncd stopped by
//! SIGSTOP and a `stat` stuck waiting on it, keibictl (asking mountd's ops
//! socket directly) lists the `lookup` waiting on keibi-syncd, says syncd
//! did not answer, and itself returns within its timeout; after SIGCONT the
//! list empties.

use harness::binaries::binary;
use harness::{Options, poll_until, run_bounded, setup};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);
/// keibictl's `--timeout` in this test.
const TIMEOUT: Duration = Duration::from_secs(2);
/// What keibictl may take: its timeout plus two seconds.
const KEIBICTL_BOUND: Duration = Duration::from_secs(4);

/// One `keibictl debug ops --json` run: exit code, parsed stdout, stderr,
/// and how long it took.
struct Answer {
    code: Option<i32>,
    json: Value,
    stderr: String,
    took: Duration,
}

fn debug_ops(control: &Path, mnt: &Path, lock_dir: &Path) -> Answer {
    let started = Instant::now();
    let out = run_bounded(
        Command::new(binary("keibictl"))
            .arg("--socket")
            .arg(control)
            .arg("--timeout")
            .arg(format!("{}s", TIMEOUT.as_secs()))
            .args(["debug", "ops", "--json", "--mount"])
            .arg(mnt)
            .arg("--lock-dir")
            .arg(lock_dir),
        Duration::from_secs(30),
    );
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("keibictl printed no JSON ({e}): {stdout:?}"));
    Answer {
        code: out.status.code(),
        json,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
    }
}

/// The mount's operations in an answer.
fn mount_ops<'a>(a: &'a Answer, mnt: &Path) -> &'a Value {
    &a.json["mounts"][mnt.display().to_string()]
}

#[test]
fn frozen_syncd_ops_are_listed_by_mountd() {
    let (_w, fx) = setup(
        "debug ops",
        LIMIT,
        Options {
            deadline: Duration::from_secs(10),
            ..Options::default()
        },
    );
    let mnt = fx.mnt();
    let (control, lock_dir) = (fx.control_socket(), fx.lock_dir());

    let idle = debug_ops(&control, &mnt, &lock_dir);
    assert_eq!(idle.code, Some(0), "stderr: {}", idle.stderr);
    assert!(
        idle.json["syncd"].is_array(),
        "syncd answers: {}",
        idle.json
    );
    assert!(
        mount_ops(&idle, &mnt).is_array(),
        "mountd answers: {}",
        idle.json
    );

    // The root's attributes are cached again after mountd's first poll of
    // the invalidation stream dropped every cache (a reply that crossed it
    // went out with TTL 0): the `stat`s below then wait on their lookups,
    // not on a getattr of the root, which would fail with nothing cached.
    poll_until("mountd's invalidation stream to start", LIMIT / 4, || {
        fx.mountd_log()
            .contains("invalidation stream started")
            .then_some(())
    });
    std::fs::metadata(&mnt).expect("stat the mount's root");
    fx.freeze_syncd();
    // Keep a lookup in flight for as long as syncd is frozen: each `stat`
    // of a new name waits on syncd until the deadline, then the next one
    // starts, so the check below cannot miss the window on a slow machine.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stat = {
        let (stop, dir) = (stop.clone(), fx.mnt());
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = std::fs::metadata(dir.join(format!("never-seen-{i}")));
                i += 1;
            }
        })
    };

    let frozen = poll_until("a lookup waiting on keibi-syncd", LIMIT / 2, || {
        let a = debug_ops(&control, &mnt, &lock_dir);
        assert!(
            a.took < KEIBICTL_BOUND,
            "keibictl took {:?} (timeout {TIMEOUT:?})",
            a.took
        );
        let waiting = mount_ops(&a, &mnt).as_array()?.iter().any(|op| {
            op["op"] == "lookup"
                && op["waiting_on"]
                    .as_str()
                    .is_some_and(|w| w.starts_with("keibi-syncd"))
                && op["age_ms"].as_u64().is_some_and(|ms| ms > 0)
        });
        if !waiting {
            eprintln!("not yet ({:?}): {}\nstderr: {}", a.took, a.json, a.stderr);
        }
        waiting.then_some(a)
    });
    eprintln!(
        "while frozen ({:?}): {}\nstderr: {}",
        frozen.took, frozen.json, frozen.stderr
    );
    assert_eq!(
        frozen.code,
        Some(0),
        "mountd answered, so keibictl succeeds"
    );
    assert!(
        frozen.json["syncd"].is_null(),
        "frozen syncd reported as not answering: {}",
        frozen.json
    );
    assert!(
        frozen.stderr.contains("keibi-syncd") && frozen.stderr.contains("no answer"),
        "stderr names the silent syncd: {}",
        frozen.stderr
    );

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    fx.thaw_syncd();
    poll_until("the stat thread to end after SIGCONT", LIMIT / 4, || {
        stat.is_finished().then_some(())
    });
    stat.join().expect("the stat thread");
    poll_until("an empty ops list after SIGCONT", LIMIT / 4, || {
        let a = debug_ops(&control, &mnt, &lock_dir);
        let empty = mount_ops(&a, &mnt).as_array().is_some_and(|v| v.is_empty())
            && a.json["syncd"].is_array();
        empty.then_some(())
    });
}
