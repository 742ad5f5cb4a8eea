//! Handle race (failure mode 2): handles opened and closed as fast as
//! possible while other handles of the same files are written and read.
//! Any error at all fails the test (EBADF and EIO are what a freed-handle
//! race would show), and every file ends with exactly the bytes last
//! written. Runs with passthrough and with mountd's own `pread`/`pwrite`.

use harness::{KeibiFixture, Options, Pattern, hash_bytes, hash_file, hash_reader, setup};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const FILES: usize = 32;
const WRITERS: usize = 4;
const CHURNERS: usize = 4;
const ROUNDS: usize = 60;

type Errors = Arc<Mutex<Vec<String>>>;

fn note(errors: &Errors, what: String) {
    errors.lock().unwrap_or_else(|e| e.into_inner()).push(what);
}

fn size_of(file: usize, round: usize) -> usize {
    16 * 1024 + (file * 7717 + round * 104_729) % (256 * 1024)
}

fn writers_and_churners(fx: &KeibiFixture) {
    let dir = fx.path("race");
    fs::create_dir(&dir).expect("mkdir");
    let paths: Arc<Vec<PathBuf>> =
        Arc::new((0..FILES).map(|i| dir.join(format!("f{i}"))).collect());
    for p in paths.iter() {
        fs::write(p, b"").expect("create");
    }
    let errors: Errors = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));

    let churners: Vec<_> = (0..CHURNERS)
        .map(|c| {
            let (paths, errors, stop, churned) =
                (paths.clone(), errors.clone(), stop.clone(), churned.clone());
            std::thread::spawn(move || {
                let mut i = c;
                let mut buf = vec![0u8; 4096];
                while !stop.load(Ordering::SeqCst) {
                    let p = &paths[i % FILES];
                    i = i.wrapping_mul(31).wrapping_add(7);
                    if let Err(e) = fs::metadata(p) {
                        note(&errors, format!("stat {}: {e}", p.display()));
                    }
                    match File::open(p) {
                        Ok(f) => {
                            if let Err(e) = f.metadata() {
                                note(&errors, format!("fstat {}: {e}", p.display()));
                            }
                            if let Err(e) = f.read_at(&mut buf, 0) {
                                note(&errors, format!("read {}: {e}", p.display()));
                            }
                            // Dropping closes: flush + release race the
                            // writers' handles of the same inode.
                        }
                        Err(e) => note(&errors, format!("open {}: {e}", p.display())),
                    }
                    churned.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (paths, errors) = (paths.clone(), errors.clone());
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    for file in (w..FILES).step_by(WRITERS) {
                        let p = &paths[file];
                        let data = Pattern::new((file * 1000 + round) as u64)
                            .bytes(0, size_of(file, round));
                        let r = OpenOptions::new()
                            .write(true)
                            .truncate(true)
                            .open(p)
                            .and_then(|mut f| {
                                // Two writes on one handle, the second
                                // positioned, then close.
                                let half = data.len() / 2;
                                f.write_all(&data[..half])?;
                                f.write_all_at(&data[half..], half as u64)
                            });
                        if let Err(e) = r {
                            note(&errors, format!("write {} round {round}: {e}", p.display()));
                        }
                    }
                }
            })
        })
        .collect();
    for t in writers {
        t.join().expect("writer thread");
    }
    stop.store(true, Ordering::SeqCst);
    for t in churners {
        t.join().expect("churner thread");
    }
    let errors = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        errors.is_empty(),
        "{} operations failed (first 20): {:#?}",
        errors.len(),
        &errors[..errors.len().min(20)]
    );
    assert!(churned.load(Ordering::Relaxed) > 100, "the churners ran");
    for (file, p) in paths.iter().enumerate() {
        let want =
            Pattern::new((file * 1000 + ROUNDS - 1) as u64).bytes(0, size_of(file, ROUNDS - 1));
        assert_eq!(
            hash_file(p).expect("hash"),
            hash_bytes(&want),
            "{} holds its last write",
            p.display()
        );
    }
}

fn large_copies_while_reading(fx: &KeibiFixture) {
    const SIZE: u64 = 64 << 20;
    const COPIES: usize = 4;
    let src = fx.scratch().join("source");
    {
        let mut f = File::create(&src).expect("create the source");
        std::io::copy(&mut Pattern::new(64).reader(SIZE), &mut f).expect("write the source");
    }
    let want = hash_reader(Pattern::new(64).reader(SIZE)).expect("hash");
    assert_eq!(hash_file(&src).expect("hash source"), want);

    let errors: Errors = Arc::default();
    let done: Arc<Mutex<Vec<PathBuf>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (errors, done, stop) = (errors.clone(), done.clone(), stop.clone());
            let mnt = fx.mnt();
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let finished = done.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if r == 0 || finished.is_empty() {
                        // Open, stat and close the copy being written.
                        let being_copied = mnt.join(format!("copy-{}", finished.len()));
                        match File::open(&being_copied) {
                            Ok(f) => {
                                if let Err(e) = f.metadata() {
                                    note(&errors, format!("fstat during copy: {e}"));
                                }
                            }
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                            Err(e) => note(&errors, format!("open during copy: {e}")),
                        }
                        n += 1;
                        continue;
                    }
                    let p = &finished[n % finished.len()];
                    n += 1;
                    match hash_file(p) {
                        Ok(h) if h == want => {}
                        Ok(h) => note(&errors, format!("{} read back as {h:?}", p.display())),
                        Err(e) => note(&errors, format!("read {}: {e}", p.display())),
                    }
                }
            })
        })
        .collect();

    for i in 0..COPIES {
        let dst = fx.path(format!("copy-{i}"));
        if i % 2 == 0 {
            fs::copy(&src, &dst).expect("copy into the mount");
        } else {
            let mut from = File::open(&src).expect("open source");
            let mut to = File::create(&dst).expect("create copy");
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = from.read(&mut buf).expect("read source");
                if n == 0 {
                    break;
                }
                to.write_all(&buf[..n]).expect("write copy");
            }
        }
        assert_eq!(
            hash_file(&dst).expect("hash copy"),
            want,
            "copy {i} matches"
        );
        done.lock().unwrap_or_else(|e| e.into_inner()).push(dst);
    }
    // Let the readers go over the finished copies once more, then stop.
    let p = fx.path(format!("copy-{}", COPIES - 1));
    assert_eq!(hash_file(&p).expect("hash"), want);
    stop.store(true, Ordering::SeqCst);
    for t in readers {
        t.join().expect("reader thread");
    }
    let errors = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(errors.is_empty(), "errors while copying: {errors:#?}");
}

#[test]
fn handles_churned_while_written_passthrough() {
    let (_w, fx) = setup(
        "handle race passthrough",
        Duration::from_secs(240),
        Options::default(),
    );
    writers_and_churners(&fx);
    fx.assert_io_path();
}

#[test]
fn handles_churned_while_written_plain() {
    let (_w, fx) = setup(
        "handle race plain",
        Duration::from_secs(240),
        Options {
            passthrough: false,
            ..Options::default()
        },
    );
    writers_and_churners(&fx);
    fx.assert_io_path();
}

#[test]
fn large_copies_while_reading_passthrough() {
    let (_w, fx) = setup(
        "large copies passthrough",
        Duration::from_secs(240),
        Options::default(),
    );
    large_copies_while_reading(&fx);
    fx.assert_io_path();
}

#[test]
fn large_copies_while_reading_plain() {
    let (_w, fx) = setup(
        "large copies plain",
        Duration::from_secs(240),
        Options {
            passthrough: false,
            ..Options::default()
        },
    );
    large_copies_while_reading(&fx);
    fx.assert_io_path();
}
