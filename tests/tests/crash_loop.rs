//! Crash loop: a churn of atomic saves, creates, unlinks, renames, appends
//! and fsynced files on the mount while keibi-syncd is killed with SIGKILL
//! at a random moment and restarted (and, every fifth round, keibi-mountd
//! too, with a remount). After every round:
//!
//! - every directory lists, and every entry in it can be `lstat`ed (as
//!   `ls -l` does);
//! - every regular file reads fully (as many bytes as its size);
//! - every file the workload fsynced (file and directory) before the kill,
//!   and recorded in its log on local disk, has exactly its bytes;
//! - `keibictl check` finds nothing.
//!
//! An older version of a file is fine (unsynced changes may be lost); EIO,
//! a missing or torn fsynced file fails the test, naming the round and
//! the path.
//!
//! Rounds: `KEIBI_CRASH_ROUNDS` (default 100); `scripts/crash-loop.sh N`
//! runs it with N. The random choices come from `KEIBI_CRASH_SEED` (default:
//! the clock), printed at the start so a failure can be replayed.

use harness::process::{run_bounded, signal, wait_child};
use harness::{Options, Pattern, binaries, setup, watchdog};
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// mountd's fsync deadline here: a churn process killed while its fsync
/// waits on the killed syncd exits when mountd answers that fsync.
const FSYNC_DEADLINE: Duration = Duration::from_secs(3);

/// The same generator as the workload's (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}"))
    })
}

/// Wait for `d`: here it picks the random moment of a kill, it does not
/// stand in for a condition.
fn pause(d: Duration) {
    let end = std::time::Instant::now() + d;
    while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
        std::thread::park_timeout(left);
    }
}

#[test]
fn kill_9_of_syncd_under_churn_never_leaves_a_broken_name() {
    let rounds = env_u64("KEIBI_CRASH_ROUNDS").unwrap_or(100);
    let seed = env_u64("KEIBI_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    eprintln!("crash loop: {rounds} rounds, KEIBI_CRASH_SEED={seed}");
    let limit = Duration::from_secs(120 + rounds * 10);
    let (_w, mut fx) = setup(
        "crash loop",
        limit,
        Options {
            deadline: Duration::from_secs(1),
            fsync_deadline: Some(FSYNC_DEADLINE),
            ..Options::default()
        },
    );
    let mut rng = Rng(seed | 1);
    let dir = fx.path("churn");
    fs::create_dir(&dir).expect("mkdir churn");
    let log = fx.scratch().join("durable.log");
    let churn_err = fx.scratch().join("churn.err");
    for round in 1..=rounds {
        let mut churn = Command::new(binaries::binary("keibi-churn"))
            .arg(&dir)
            .arg(&log)
            .arg((seed ^ round.wrapping_mul(0x9E37_79B9)).to_string())
            .arg(round.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&churn_err)
                    .expect("open churn.err"),
            )
            .spawn()
            .expect("start keibi-churn");
        watchdog::register_pid(churn.id());
        pause(Duration::from_millis(100 + rng.below(700)));
        fx.kill9_syncd();
        // The workload goes on against a dead syncd for a moment: those
        // operations fail and were never acknowledged.
        pause(Duration::from_millis(rng.below(300)));
        signal(churn.id(), Signal::SIGKILL);
        // A process killed while its fsync waits for syncd stays until
        // mountd answers that fsync, at the latest at the fsync deadline:
        // fuser does not pass FUSE_INTERRUPT on, and the kernel waits for
        // the answer of a request it has sent.
        wait_child(&mut churn, FSYNC_DEADLINE + Duration::from_secs(20))
            .unwrap_or_else(|| panic!("round {round}: keibi-churn did not die on SIGKILL"));
        watchdog::unregister_pid(churn.id());
        let remount = round % 5 == 0;
        if remount {
            fx.kill9_mountd();
        }
        fx.start_syncd();
        if remount {
            fx.start_mountd();
        }
        fx.wait_writable(Duration::from_secs(20));
        let read = verify_tree(round, &fx.mnt());
        verify_durable(round, &dir, &log, &read, &fx.mnt());
        verify_check(round, &fx.control_socket());
    }
    let recorded = fs::read_to_string(&log).unwrap_or_default().lines().count();
    eprintln!("crash loop: {rounds} rounds passed, {recorded} fsynced files verified");
    assert!(
        recorded > 0,
        "the workload never got a file fsynced: the test tested nothing"
    );
}

/// How long a verification step retries an operation that timed out.
const SLOW_SYNCD: Duration = Duration::from_secs(30);

/// Run `op` until it succeeds or fails with anything but `ETIMEDOUT`
/// (syncd answering slower than mountd's deadline on a loaded machine is
/// not what this test is about: it was never told to lose anything), for
/// at most [`SLOW_SYNCD`]. Any other error fails the test, naming the
/// round and the path.
fn must<T>(round: u64, what: &str, p: &Path, mut op: impl FnMut() -> std::io::Result<T>) -> T {
    let deadline = std::time::Instant::now() + SLOW_SYNCD;
    loop {
        match op() {
            Ok(v) => return v,
            Err(e)
                if e.raw_os_error() == Some(libc::ETIMEDOUT)
                    && std::time::Instant::now() < deadline =>
            {
                pause(Duration::from_millis(50));
            }
            Err(e) => panic!("round {round}: {what} {}: {e}", p.display()),
        }
    }
}

/// Every directory lists, every entry `lstat`s, every file reads fully.
/// Returns the bytes of every regular file, by path.
fn verify_tree(round: u64, root: &Path) -> HashMap<PathBuf, Vec<u8>> {
    let mut files = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let names = must(round, "listing", &d, || {
            fs::read_dir(&d)?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<Vec<_>>>()
        });
        for p in names {
            let md = must(round, "lstat", &p, || fs::symlink_metadata(&p));
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                let bytes = read_fully(round, &p);
                files.insert(p, bytes);
            }
        }
    }
    files
}

fn read_fully(round: u64, p: &Path) -> Vec<u8> {
    let mut f = must(round, "open", p, || File::open(p));
    let size = must(round, "fstat", p, || f.metadata()).size();
    let mut buf = Vec::new();
    must(round, "read", p, || {
        buf.clear();
        std::io::Seek::rewind(&mut f)?;
        f.read_to_end(&mut buf)
    });
    assert_eq!(
        buf.len() as u64,
        size,
        "round {round}: {} read {} bytes of {size}",
        p.display(),
        buf.len()
    );
    buf
}

/// Every file the log says was fsynced is in the tree (as `verify_tree`
/// read it) with exactly its bytes.
fn verify_durable(
    round: u64,
    dir: &Path,
    log: &Path,
    read: &HashMap<PathBuf, Vec<u8>>,
    mnt: &Path,
) {
    let text = match fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => panic!("reading {}: {e}", log.display()),
    };
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        // A line torn by the kill was never complete: its file was not
        // acknowledged.
        let [rel, seed, len] = parts[..] else {
            continue;
        };
        let (Ok(seed), Ok(len)) = (seed.parse::<u64>(), len.parse::<usize>()) else {
            continue;
        };
        let p: PathBuf = dir.join(rel);
        let got = read
            .get(&p)
            .unwrap_or_else(|| panic!("{}", missing(round, &p, read, mnt)));
        assert!(
            *got == Pattern::new(seed).bytes(0, len),
            "round {round}: fsynced file {} is torn: {} bytes, expected {len}",
            p.display(),
            got.len()
        );
    }
}

/// The failure message for an fsynced file `p` that the tree walk did not
/// read: what the walk saw in its directory, and what a second listing and
/// a direct `lstat` of the path say now (a name left out of a listing, a
/// wrong file type, or a name really gone tell different bugs apart).
fn missing(round: u64, p: &Path, read: &HashMap<PathBuf, Vec<u8>>, mnt: &Path) -> String {
    let dir = p.parent().unwrap_or(p);
    let walked = read.keys().filter(|k| k.parent() == Some(dir)).count();
    let listed: Result<Vec<String>, std::io::Error> = fs::read_dir(dir).and_then(|it| {
        it.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect()
    });
    let listing = match &listed {
        Ok(names) => format!(
            "{} names now, {} it",
            names.len(),
            if names
                .iter()
                .any(|n| Some(n.as_str()) == p.file_name().and_then(|f| f.to_str()))
            {
                "including"
            } else {
                "not including"
            }
        ),
        Err(e) => format!("listing fails now: {e}"),
    };
    let lstat = match fs::symlink_metadata(p) {
        Ok(md) => format!(
            "lstat now: {:?}, {} bytes, inode {}",
            md.file_type(),
            md.len(),
            md.ino()
        ),
        Err(e) => format!("lstat now: {e}"),
    };
    format!(
        "round {round}: fsynced file {} is missing from the tree walk ({walked} files read in its \
         directory, {} in all); {listing}; {lstat}; file systems at the mountpoint now: {:?}",
        p.display(),
        read.len(),
        harness::mounts::fs_types_at(mnt)
    )
}

/// `keibictl check` finds nothing.
fn verify_check(round: u64, control: &Path) {
    let out = run_bounded(
        Command::new(binaries::binary("keibictl"))
            .arg("--socket")
            .arg(control)
            .arg("--timeout")
            .arg("60s")
            .arg("check"),
        Duration::from_secs(90),
    );
    assert!(
        out.status.success(),
        "round {round}: keibictl check ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Inode numbers are never handed out twice, even when a `kill -9` makes
/// syncd lose its latest writes (the counter among them): numbers come
/// from durable reservations. A storm of creates runs while syncd is
/// killed; every number a create returned is recorded, and after the
/// restart a new file's number must be above all of them.
#[test]
fn inode_numbers_are_not_reused_after_kill_9_of_syncd() {
    let (_w, mut fx) = setup(
        "inode numbers after kill -9",
        Duration::from_secs(300),
        Options {
            deadline: Duration::from_millis(500),
            ..Options::default()
        },
    );
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut seen: Vec<u64> = Vec::new();
    for round in 0..10u64 {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (dir, stop2) = (fx.path(format!("storm{round}")), stop.clone());
        fs::create_dir(&dir).expect("mkdir");
        let storm = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut i = 0u64;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                // A number the kernel was told: the create succeeded.
                if let Ok(f) = File::create(dir.join(format!("f{i}")))
                    && let Ok(md) = f.metadata()
                {
                    got.push(md.ino());
                }
            }
            got
        });
        pause(Duration::from_millis(50 + rng.below(400)));
        fx.kill9_syncd();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let got = storm.join().expect("the create storm");
        assert!(!got.is_empty(), "round {round}: no create succeeded");
        seen.extend(got);
        fx.start_syncd();
        fx.wait_writable(Duration::from_secs(20));
        let p = fx.path(format!("after-{round}"));
        fs::write(&p, b"y").expect("create after the restart");
        let ino = fs::metadata(&p).expect("stat").ino();
        let max = seen.iter().copied().max().expect("files were made");
        assert!(
            ino > max,
            "round {round}: a file made after kill -9 got inode {ino}, but {max} was handed \
             out before the kill"
        );
        seen.push(ino);
    }
}
