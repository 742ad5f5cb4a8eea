//! Directory listings served from mountd's per-handle read-ahead, checked
//! on a real mount through libc's `opendir`/`readdir`/`telldir`/`seekdir`/
//! `rewinddir`.
//!
//! mountd answers the kernel's directory reads from a buffer of entries it
//! asked syncd for ahead of time (`mountd/src/dir_handles.rs`). Three
//! things must hold however the buffer is used:
//!
//! 1. positions are stable: with 3,000 files, `seekdir` to a position from
//!    `telldir` (forward and back) and `rewinddir` give the same entries as
//!    the first pass;
//! 2. names created and removed while a listing runs never make it list a
//!    name twice nor skip a file that existed throughout;
//! 3. attributes handed out with entries never hide a change made on this
//!    mount in the middle of a listing: a chmod, a truncate, a write
//!    through a file opened before the listing and a write-then-close show
//!    up in `fstatat` during the rest of the listing and in `stat` of the
//!    path right after it.
//!
//! Each check runs with and without FUSE passthrough, and each of those
//! with the default attribute TTL and with `--attr-ttl 0s` (the fixture
//! has no option for it, so that mountd is started here, see
//! [`TtlZeroMountd`]).

use harness::daemons::{START_TIMEOUT, STOP_TIMEOUT, log_tail, mountd_command, terminate};
use harness::{KeibiFixture, Options, bounded, mounts, poll_until, setup, watchdog};
use std::collections::{BTreeSet, HashMap};
use std::ffi::CStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

/// Files in the test directory.
const N: usize = 3000;
/// Limit of one whole test (fixture start, three checks, teardown).
const LIMIT: Duration = Duration::from_secs(300);
/// Limit of one check.
const PHASE: Duration = Duration::from_secs(120);

/// Name of test file `i` (`f00042`).
fn f_name(i: usize) -> String {
    format!("f{i:05}")
}

/// Name of file `i` created during a listing (`g00042`).
fn g_name(i: usize) -> String {
    format!("g{i:05}")
}

/// `(prefix, number)` of a test name like `f00042`; `None` for others.
fn parse(name: &[u8]) -> Option<(u8, usize)> {
    let (&first, digits) = name.split_first()?;
    if !(first == b'f' || first == b'g') || digits.len() != 5 {
        return None;
    }
    std::str::from_utf8(digits)
        .ok()?
        .parse()
        .ok()
        .map(|n| (first, n))
}

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// An open directory stream (`DIR *`), closed on drop.
struct Dir {
    dir: *mut libc::DIR,
    path: PathBuf,
}

impl Dir {
    fn open(path: &Path) -> Dir {
        let c = harness::sys::cpath(path);
        // SAFETY: valid NUL-terminated path; the result is checked.
        let dir = unsafe { libc::opendir(c.as_ptr()) };
        assert!(
            !dir.is_null(),
            "opendir {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Dir {
            dir,
            path: path.to_path_buf(),
        }
    }

    /// The next name, `None` at the end; panics on a read error.
    fn next_name(&mut self) -> Option<Vec<u8>> {
        // SAFETY: errno is thread-local; zeroing it tells the end of the
        // stream (errno unchanged) from an error (errno set).
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: self.dir is a live stream from opendir.
        let e = unsafe { libc::readdir(self.dir) };
        if e.is_null() {
            // SAFETY: reading the thread-local errno.
            let errno = unsafe { *libc::__errno_location() };
            assert_eq!(
                errno,
                0,
                "readdir {}: {}",
                self.path.display(),
                std::io::Error::from_raw_os_error(errno)
            );
            return None;
        }
        // SAFETY: readdir returned a valid dirent whose d_name is
        // NUL-terminated; it is copied before the next call on the stream.
        let name = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) };
        Some(name.to_bytes().to_vec())
    }

    /// The next `n` names; panics if the stream ends first.
    fn take(&mut self, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|j| {
                self.next_name().unwrap_or_else(|| {
                    panic!(
                        "{}: listing ended {j} entries into {n}",
                        self.path.display()
                    )
                })
            })
            .collect()
    }

    /// Every remaining name.
    fn rest(&mut self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.next_name()).collect()
    }

    fn tell(&self) -> libc::c_long {
        // SAFETY: self.dir is a live stream.
        let pos = unsafe { libc::telldir(self.dir) };
        assert!(pos >= 0, "telldir: {}", std::io::Error::last_os_error());
        pos
    }

    fn seek(&mut self, pos: libc::c_long) {
        // SAFETY: self.dir is a live stream; pos came from telldir on it.
        unsafe { libc::seekdir(self.dir, pos) }
    }

    fn rewind(&mut self) {
        // SAFETY: self.dir is a live stream.
        unsafe { libc::rewinddir(self.dir) }
    }

    /// `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`.
    fn stat_at(&self, name: &[u8]) -> libc::stat {
        let c = std::ffi::CString::new(name).expect("directory entries have no NUL byte");
        // SAFETY: an all-zero stat is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: dirfd of a live stream, a valid C string and a pointer
        // to a live struct.
        let r = unsafe {
            libc::fstatat(
                libc::dirfd(self.dir),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(
            r,
            0,
            "fstatat {}/{} during the listing: {}",
            self.path.display(),
            show(name),
            std::io::Error::last_os_error()
        );
        st
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: self.dir came from opendir and is closed only here.
        unsafe { libc::closedir(self.dir) };
    }
}

/// The whole listing of `dir` in one pass.
fn list(dir: &Path) -> Vec<Vec<u8>> {
    Dir::open(dir).rest()
}

/// Assert `names` has no duplicate and is exactly `.`, `..` and `want`.
#[track_caller]
fn assert_exactly(names: &[Vec<u8>], want: &BTreeSet<String>, what: &str) {
    let mut got = BTreeSet::new();
    for n in names {
        assert!(got.insert(show(n)), "{what}: {} listed twice", show(n));
    }
    let mut want = want.clone();
    want.insert(".".into());
    want.insert("..".into());
    let missing: Vec<_> = want.difference(&got).take(10).collect();
    let extra: Vec<_> = got.difference(&want).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: {} names listed, {} expected; missing (first 10) {missing:?}, unexpected (first \
         10) {extra:?}",
        got.len(),
        want.len()
    );
}

fn all_f() -> BTreeSet<String> {
    (0..N).map(f_name).collect()
}

fn create(p: &Path) {
    File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
}

/// Check 1: `telldir`/`seekdir` forward and back and `rewinddir` give the
/// entries of the first pass.
fn seek_tell_rewind(dir: &Path) {
    let mut d = Dir::open(dir);
    let marks = [10usize, 1000, 2500];
    let mut pos: HashMap<usize, libc::c_long> = HashMap::new();
    let mut first = Vec::new();
    loop {
        if marks.contains(&first.len()) {
            pos.insert(first.len(), d.tell());
        }
        match d.next_name() {
            Some(n) => first.push(n),
            None => break,
        }
    }
    assert_eq!(first.len(), N + 2, "first pass: {N} files plus . and ..");
    assert_exactly(&first, &all_f(), "first pass");
    assert_eq!(pos.len(), marks.len(), "a position at every mark");

    // Forward from the end to a late mark, then back, further back, and
    // forward again.
    for (round, &m) in [2500usize, 1000, 10, 2500, 1000].iter().enumerate() {
        d.seek(pos[&m]);
        let n = 500.min(first.len() - m);
        let got = d.take(n);
        for (j, name) in got.iter().enumerate() {
            assert_eq!(
                show(name),
                show(&first[m + j]),
                "seek #{round} to the position after {m} entries: entry {j} differs"
            );
        }
        if m + n == first.len() {
            assert_eq!(
                d.next_name().map(|n| show(&n)),
                None,
                "seek #{round}: the listing ends where the first pass ended"
            );
        }
    }

    d.rewind();
    let again = d.rest();
    assert_eq!(again.len(), first.len(), "after rewinddir: entry count");
    for (j, (a, b)) in first.iter().zip(&again).enumerate() {
        assert_eq!(show(b), show(a), "after rewinddir: entry {j} differs");
    }

    // A seek right after the rewound pass, as the C check did.
    d.seek(pos[&1000]);
    let got = d.take(10);
    for (j, name) in got.iter().enumerate() {
        assert_eq!(
            show(name),
            show(&first[1000 + j]),
            "second seek to 1000: entry {j} differs"
        );
    }
}

/// Check 2: creating and unlinking other files during a listing lists no
/// name twice and skips no file that existed throughout.
fn changes_during_listing(dir: &Path) {
    let mut d = Dir::open(dir);
    let mut seen: BTreeSet<(u8, usize)> = BTreeSet::new();
    let mut unlinked: BTreeSet<usize> = BTreeSet::new();
    let mut created = 0usize;
    let mut k = 0usize;
    while let Some(name) = d.next_name() {
        if name == b"." || name == b".." {
            continue;
        }
        let id = parse(&name)
            .unwrap_or_else(|| panic!("unexpected name {} in the listing", show(&name)));
        assert!(
            id.0 == b'f' && id.1 < N || id.0 == b'g' && id.1 < created,
            "{} listed but never existed",
            show(&name)
        );
        assert!(seen.insert(id), "{} listed twice", show(&name));
        k += 1;
        if k.is_multiple_of(50) {
            // Remove a file near the end (not read yet early on, already
            // read later) and add a new one.
            let victim = N - 1 - 2 * (k / 50);
            let p = dir.join(f_name(victim));
            fs::remove_file(&p).unwrap_or_else(|e| panic!("unlink {}: {e}", p.display()));
            unlinked.insert(victim);
            create(&dir.join(g_name(created)));
            created += 1;
        }
    }
    drop(d);
    assert!(
        created >= N / 50,
        "only {created} files were created during the listing"
    );
    let skipped: Vec<String> = (0..N)
        .filter(|i| !unlinked.contains(i) && !seen.contains(&(b'f', *i)))
        .map(f_name)
        .collect();
    assert!(
        skipped.is_empty(),
        "{} files that existed throughout were skipped: {:?}",
        skipped.len(),
        &skipped[..skipped.len().min(20)]
    );

    // A fresh listing shows exactly what is there now.
    let mut now: BTreeSet<String> = (0..N)
        .filter(|i| !unlinked.contains(i))
        .map(f_name)
        .collect();
    now.extend((0..created).map(g_name));
    assert_exactly(&list(dir), &now, "listing after the changes");

    // Back to f00000..f02999 for the next check.
    for j in 0..created {
        let p = dir.join(g_name(j));
        fs::remove_file(&p).unwrap_or_else(|e| panic!("unlink {}: {e}", p.display()));
    }
    for &i in &unlinked {
        create(&dir.join(f_name(i)));
    }
    assert_exactly(&list(dir), &all_f(), "listing after restoring the files");
}

/// What check 3 changes, and what `stat` must show afterwards.
const CHMODDED: usize = 300;
const TRUNCATED: usize = 350;
const WRITTEN_OPEN: usize = 400;
const WRITTEN_CLOSED: usize = 450;

/// Assert the mode or size check 3 expects of file `i`, if it is one of
/// the changed ones; returns whether it was.
#[track_caller]
fn assert_changed(i: usize, mode: u32, size: u64, when: &str) -> bool {
    let name = f_name(i);
    match i {
        CHMODDED => assert_eq!(
            mode & 0o7777,
            0o600,
            "{name} mode {when} (after chmod 0600)"
        ),
        TRUNCATED => assert_eq!(size, 5000, "{name} size {when} (after truncate to 5000)"),
        WRITTEN_OPEN => assert_eq!(
            size, 7000,
            "{name} size {when} (after writing 7000 bytes through a handle opened before the \
             listing)"
        ),
        WRITTEN_CLOSED => assert_eq!(
            size, 1234,
            "{name} size {when} (after writing 1234 bytes and closing)"
        ),
        _ => return false,
    }
    true
}

/// Check 3: changes made here in the middle of a listing show in
/// `fstatat` for the rest of it and in `stat` of the path after it.
fn attributes_after_changes(dir: &Path) {
    let mut wf = OpenOptions::new()
        .write(true)
        .open(dir.join(f_name(WRITTEN_OPEN)))
        .expect("open the file to write during the listing");
    let mut d = Dir::open(dir);
    let mut k = 0usize;
    let mut changed = false;
    let mut checked = BTreeSet::new();
    let mut other_sizes = Vec::new();
    while let Some(name) = d.next_name() {
        let Some((b'f', i)) = parse(&name) else {
            continue;
        };
        let st = d.stat_at(&name);
        if [CHMODDED, TRUNCATED, WRITTEN_OPEN, WRITTEN_CLOSED].contains(&i) {
            assert!(
                changed,
                "{} came before the change point (entries are listed in creation order)",
                show(&name)
            );
        }
        if assert_changed(
            i,
            st.st_mode,
            st.st_size as u64,
            "in fstatat during the listing",
        ) {
            checked.insert(i);
        } else if st.st_size != 0 {
            other_sizes.push((show(&name), st.st_size));
        }
        k += 1;
        if k == 100 {
            changed = true;
            let p = dir.join(f_name(CHMODDED));
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod 0600");
            let p = dir.join(f_name(TRUNCATED));
            let c = harness::sys::cpath(&p);
            // SAFETY: valid C string.
            let r = unsafe { libc::truncate(c.as_ptr(), 5000) };
            assert_eq!(r, 0, "truncate: {}", std::io::Error::last_os_error());
            wf.write_all(&[0u8; 7000])
                .expect("write through the handle opened before the listing");
            let mut f = OpenOptions::new()
                .write(true)
                .open(dir.join(f_name(WRITTEN_CLOSED)))
                .expect("open for the write-then-close");
            f.write_all(&[0u8; 1234]).expect("write before close");
            drop(f);
        }
    }
    drop(d);
    assert!(changed, "the listing reached the change point");
    assert_eq!(
        checked.len(),
        4,
        "every changed file was stat'ed during the listing (saw {checked:?})"
    );
    assert!(
        other_sizes.is_empty(),
        "unchanged files have size 0; got {:?}",
        &other_sizes[..other_sizes.len().min(10)]
    );

    // Right after the listing, by path, while the handle is still open and
    // again after it is closed.
    let by_path = |when: &str| {
        for i in [CHMODDED, TRUNCATED, WRITTEN_OPEN, WRITTEN_CLOSED] {
            let p = dir.join(f_name(i));
            let md =
                fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
            assert!(assert_changed(i, md.mode(), md.len(), when));
        }
        for i in [0, CHMODDED + 1, N - 1] {
            let p = dir.join(f_name(i));
            let md =
                fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
            assert_eq!(
                (md.mode() & 0o7777, md.len()),
                (0o644, 0),
                "{} {when}: unchanged",
                p.display()
            );
        }
    };
    by_path("by path right after the listing");
    drop(wf);
    by_path("by path after closing the handle");
}

/// Run the three checks on a fresh directory of `N` files.
fn run_checks(mnt: &Path) {
    let dir = mnt.join("d");
    fs::create_dir(&dir).expect("mkdir d");
    // Files are created with mode 0644 whatever the test's umask.
    for i in 0..N {
        let p = dir.join(f_name(i));
        create(&p);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod 0644");
    }
    for (what, check) in [
        ("telldir/seekdir/rewinddir", seek_tell_rewind as fn(&Path)),
        ("changes during a listing", changes_during_listing),
        ("attributes after changes", attributes_after_changes),
    ] {
        let d = dir.clone();
        if let Err(waited) = bounded(PHASE, move || check(&d)) {
            panic!("check `{what}` did not finish within {waited:?}");
        }
    }
}

/// A keibi-mountd with `--attr-ttl 0s` in place of the fixture's own
/// (whose options have no attribute TTL). Stopped and its mount detached
/// on drop; declare it after the fixture so it goes first.
struct TtlZeroMountd {
    child: Option<Child>,
    mnt: PathBuf,
}

impl TtlZeroMountd {
    fn replace(fx: &mut KeibiFixture) -> TtlZeroMountd {
        let (st, clean, unmounted) = fx.stop_mountd();
        assert!(
            clean && st.success() && unmounted,
            "the fixture's mountd did not stop cleanly ({st}, {clean}, {unmounted})"
        );
        let mut cmd = mountd_command(
            &fx.mnt(),
            &fx.fs_socket(),
            &fx.lock_dir(),
            fx.options().deadline,
            fx.options().passthrough,
            &fx.mountd_log_path(),
        );
        cmd.arg("--attr-ttl").arg("0s");
        cmd.env("RUST_LOG", &fx.options().mountd_log_filter);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        watchdog::register_pid(child.id());
        watchdog::register_mount(fx.mnt());
        let mut me = TtlZeroMountd {
            child: Some(child),
            mnt: fx.mnt(),
        };
        let mnt = fx.mnt();
        let log = fx.mountd_log_path();
        let child = me.child.as_mut().expect("just set");
        let exited = poll_until("the --attr-ttl 0s mount to answer", START_TIMEOUT, || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Some(st));
            }
            (mounts::keibi_mounts_at(&mnt) > 0
                && fs::metadata(&mnt).is_ok()
                && fs::read_dir(&mnt).is_ok())
            .then_some(None)
        });
        if let Some(st) = exited {
            panic!(
                "keibi-mountd --attr-ttl 0s exited before the mount was up ({st})\n{}",
                log_tail(&log, 40)
            );
        }
        me
    }
}

impl Drop for TtlZeroMountd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, STOP_TIMEOUT);
        }
        mounts::detach_all(&self.mnt);
        watchdog::unregister_mount(&self.mnt);
    }
}

fn opts(passthrough: bool) -> Options {
    Options {
        passthrough,
        ..Options::default()
    }
}

#[test]
fn passthrough() {
    let (_w, fx) = setup("readdir::passthrough", LIMIT, opts(true));
    run_checks(&fx.mnt());
    fx.assert_io_path();
}

#[test]
fn plain() {
    let (_w, fx) = setup("readdir::plain", LIMIT, opts(false));
    run_checks(&fx.mnt());
    fx.assert_io_path();
}

#[test]
fn passthrough_attr_ttl_0() {
    let (_w, mut fx) = setup("readdir::passthrough_attr_ttl_0", LIMIT, opts(true));
    let _m = TtlZeroMountd::replace(&mut fx);
    run_checks(&fx.mnt());
    fx.assert_io_path();
}

#[test]
fn plain_attr_ttl_0() {
    let (_w, mut fx) = setup("readdir::plain_attr_ttl_0", LIMIT, opts(false));
    let _m = TtlZeroMountd::replace(&mut fx);
    run_checks(&fx.mnt());
    fx.assert_io_path();
}
