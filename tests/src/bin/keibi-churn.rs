//! `keibi-churn DIR LOG SEED ROUND`: the workload of the crash-loop test
//! (`tests/tests/crash_loop.rs`). Runs until killed.
//!
//! In `DIR` (on the mount) it loops over, chosen at random from `SEED`:
//!
//! - atomic saves: write `save<i>.tmp` (no fsync), rename it over
//!   `save<i>`, as editors do;
//! - creates of `c<n>`, unlinks and renames of those, appends to `log<i>`;
//! - `mkdir d<i>` with a file in it, or removing both again;
//! - durable files: write `durable/r<ROUND>-<n>` from a known pattern,
//!   `fsync` it and its directory, and only then append a line
//!   `<relative path> <seed> <length>` to `LOG` (on local disk, outside
//!   the mount) and `fsync` `LOG`. Those files are never touched again.
//!
//! Every error is ignored (counted on stderr at the end of each 100
//! operations): while syncd is down the mount answers `ETIMEDOUT`,
//! `ENOTCONN` or `EIO`, and an operation that failed was never
//! acknowledged, so the test expects nothing of it.

use harness::Pattern;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A small deterministic generator (xorshift64*): no dependency needed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, log, seed, round] = &args[..] else {
        eprintln!("usage: keibi-churn DIR LOG SEED ROUND");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    let log = PathBuf::from(log);
    let seed: u64 = seed.parse().unwrap_or(1);
    let round: u64 = round.parse().unwrap_or(0);
    let mut rng = Rng(seed | 1);
    let mut log_file = match OpenOptions::new().create(true).append(true).open(&log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("keibi-churn: cannot open {}: {e}", log.display());
            std::process::exit(2);
        }
    };
    let _ = fs::create_dir_all(dir.join("durable"));
    let mut durable_n = 0u64;
    let mut errors = 0u64;
    let mut ops = 0u64;
    loop {
        let ok = match rng.below(20) {
            0..=7 => save(&dir, &mut rng),
            8..=10 => create(&dir, &mut rng),
            11..=12 => unlink(&dir, &mut rng),
            13..=14 => rename(&dir, &mut rng),
            15..=17 => append(&dir, &mut rng),
            18 => subdir(&dir, &mut rng),
            _ => {
                durable_n += 1;
                let rel = format!("durable/r{round}-{durable_n}");
                durable(&dir, &rel, &mut rng, &mut log_file)
            }
        };
        ops += 1;
        if ok.is_err() {
            errors += 1;
        }
        if ops.is_multiple_of(100) {
            eprintln!("keibi-churn: {ops} operations, {errors} failed");
        }
    }
}

fn content(rng: &mut Rng) -> Vec<u8> {
    let len = rng.below(16 * 1024) as usize;
    Pattern::new(rng.next()).bytes(0, len)
}

fn save(dir: &Path, rng: &mut Rng) -> std::io::Result<()> {
    let i = rng.below(8);
    let tmp = dir.join(format!("save{i}.tmp"));
    fs::write(&tmp, content(rng))?;
    fs::rename(&tmp, dir.join(format!("save{i}")))
}

fn create(dir: &Path, rng: &mut Rng) -> std::io::Result<()> {
    fs::write(dir.join(format!("c{}", rng.below(64))), content(rng))
}

fn unlink(dir: &Path, rng: &mut Rng) -> std::io::Result<()> {
    fs::remove_file(dir.join(format!("c{}", rng.below(64))))
}

fn rename(dir: &Path, rng: &mut Rng) -> std::io::Result<()> {
    fs::rename(
        dir.join(format!("c{}", rng.below(64))),
        dir.join(format!("c{}", rng.below(64))),
    )
}

/// mkdir `d<i>` with a file in it, or remove both again.
fn subdir(dir: &Path, rng: &mut Rng) -> std::io::Result<()> {
    let d = dir.join(format!("d{}", rng.below(4)));
    if d.is_dir() {
        fs::remove_file(d.join("f")).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        fs::remove_dir(&d)
    } else {
        fs::create_dir(&d)?;
        fs::write(d.join("f"), content(rng))
    }
}

fn append(dir: &Path, rng: &mut Rng) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("log{}", rng.below(4))))?;
    let len = rng.below(2048) as usize;
    f.write_all(&Pattern::new(rng.next()).bytes(0, len))
}

fn durable(dir: &Path, rel: &str, rng: &mut Rng, log: &mut File) -> std::io::Result<()> {
    let seed = rng.next();
    let len = rng.below(8 * 1024) as usize;
    let path = dir.join(rel);
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)?;
    f.write_all(&Pattern::new(seed).bytes(0, len))?;
    f.sync_all()?;
    drop(f);
    File::open(dir.join("durable"))?.sync_all()?;
    // Acknowledged: the file and its name are durable. Record it.
    writeln!(log, "{rel} {seed} {len}")?;
    log.sync_all()
}
