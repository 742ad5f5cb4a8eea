//! `fsync` waits for local durability with its own deadline
//! (`--fsync-deadline`, 30 s by default), which the stalled mode of the
//! syncd client never shortens: after a metadata call missed its deadline
//! (syncd frozen by SIGSTOP), an `fsync` still succeeds once syncd answers
//! again, whether it was issued while syncd was frozen (and waited longer
//! than the metadata deadline) or right after SIGCONT.

use harness::binaries::binary;
use harness::{Options, assert_errno, poll_until, run_bounded, setup};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);
/// mountd's metadata deadline in this test.
const DEADLINE: Duration = Duration::from_secs(1);

/// The age in ms of the oldest `op` in flight in mountd, from
/// `keibictl debug ops` (mountd's own ops socket, answered while syncd is
/// frozen).
fn in_flight_age_ms(fx: &harness::KeibiFixture, op: &str) -> Option<u64> {
    let out = run_bounded(
        Command::new(binary("keibictl"))
            .arg("--socket")
            .arg(fx.control_socket())
            .args(["--timeout", "1s", "debug", "ops", "--json", "--mount"])
            .arg(fx.mnt())
            .arg("--lock-dir")
            .arg(fx.lock_dir()),
        Duration::from_secs(30),
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    json["mounts"][fx.mnt().display().to_string()]
        .as_array()?
        .iter()
        .filter(|o| o["op"] == op)
        .filter_map(|o| o["age_ms"].as_u64())
        .max()
}

/// Make syncd miss a deadline: freeze it and `stat` a name nobody has
/// seen, which waits for the metadata deadline and fails with ETIMEDOUT.
fn miss_a_deadline(fx: &harness::KeibiFixture, name: &str) {
    fx.freeze_syncd();
    assert_errno(
        fs::metadata(fx.path(name)),
        libc::ETIMEDOUT,
        "stat of a new name while syncd is frozen",
    );
}

fn fsync_in_background(f: &File, dir: bool) -> mpsc::Receiver<std::io::Result<()>> {
    let f = f.try_clone().expect("dup");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(if dir {
            f.sync_all()
        } else {
            f.sync_data().and(f.sync_all())
        });
    });
    rx
}

#[test]
fn fsync_after_a_missed_deadline_succeeds() {
    let (_w, fx) = setup(
        "fsync after a missed deadline",
        LIMIT,
        Options {
            deadline: DEADLINE,
            ..Options::default()
        },
    );
    let path = fx.path("db");
    let mut f = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("create");
    f.write_all(&[7u8; 4096]).expect("write");
    let dir = File::open(fx.mnt()).expect("open the mount's root");

    // 1. fsync issued while syncd is frozen and marked stalled: it waits
    //    (longer than the metadata deadline), then succeeds after SIGCONT.
    miss_a_deadline(&fx, "never-1");
    let file_sync = fsync_in_background(&f, false);
    let dir_sync = fsync_in_background(&dir, true);
    poll_until(
        "the fsync to wait on the frozen syncd for three metadata deadlines",
        Duration::from_secs(30),
        || {
            for (what, rx) in [("fsync", &file_sync), ("fsync of the directory", &dir_sync)] {
                if let Ok(r) = rx.try_recv() {
                    panic!("{what} returned while syncd was still frozen: {r:?}");
                }
            }
            in_flight_age_ms(&fx, "fsync")
                .is_some_and(|ms| ms > 3 * DEADLINE.as_millis() as u64)
                .then_some(())
        },
    );
    fx.thaw_syncd();
    let r = file_sync
        .recv_timeout(Duration::from_secs(30))
        .expect("fsync returns once syncd answers");
    assert!(r.is_ok(), "fsync after SIGCONT: {r:?}");
    let r = dir_sync
        .recv_timeout(Duration::from_secs(30))
        .expect("fsync of the directory returns once syncd answers");
    assert!(r.is_ok(), "fsync of the directory after SIGCONT: {r:?}");

    // 2. fsync right after SIGCONT, while the client may still count syncd
    //    as stalled.
    for round in 0..5 {
        miss_a_deadline(&fx, &format!("never-2-{round}"));
        fx.thaw_syncd();
        f.write_all(&[round as u8; 4096]).expect("write");
        f.sync_all()
            .unwrap_or_else(|e| panic!("round {round}: fsync right after SIGCONT: {e}"));
        dir.sync_all()
            .unwrap_or_else(|e| panic!("round {round}: fsync of the directory: {e}"));
    }
    drop(f);
    assert_eq!(fs::metadata(&path).expect("stat").len(), 6 * 4096);
    assert!(Path::new(&path).exists());
}
