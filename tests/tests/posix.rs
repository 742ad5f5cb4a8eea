//! POSIX behaviour of every operation keibi-mountd serves, checked on a
//! real mount against what a local disk does.
//!
//! Data-path tests run twice: with FUSE passthrough (the kernel does the
//! I/O on the content file) and with `--no-passthrough` (mountd's
//! `pread`/`pwrite`), since the two paths share no code for reads and
//! writes.

use harness::sys;
use harness::{KeibiFixture, Options, Pattern, assert_errno, hash_file, hash_reader, setup};
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

fn fixture(name: &str) -> (harness::Watchdog, KeibiFixture) {
    setup(name, LIMIT, Options::default())
}

/// Define `$name::passthrough` and `$name::plain`, running `$body(&fx)` on
/// a fixture of each kind, then checking that its opens really went
/// through passthrough, or really did not ([`KeibiFixture::assert_io_path`]).
macro_rules! both_modes {
    ($name:ident, $limit:expr, $body:path) => {
        mod $name {
            use super::*;

            #[test]
            fn passthrough() {
                let (_w, fx) = setup(
                    concat!(stringify!($name), "::passthrough"),
                    $limit,
                    Options::default(),
                );
                $body(&fx);
                fx.assert_io_path();
            }

            #[test]
            fn plain() {
                let (_w, fx) = setup(
                    concat!(stringify!($name), "::plain"),
                    $limit,
                    Options {
                        passthrough: false,
                        ..Options::default()
                    },
                );
                $body(&fx);
                fx.assert_io_path();
            }
        }
    };
}

fn read_all(p: &std::path::Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[test]
fn root_is_inode_1_and_a_directory() {
    let (_w, fx) = fixture("root_is_inode_1_and_a_directory");
    let md = fs::metadata(fx.mnt()).expect("stat the mount root");
    assert!(md.is_dir());
    assert_eq!(md.ino(), 1, "the root of the share is inode 1");
    assert_errno(
        fs::metadata(fx.path("missing")),
        libc::ENOENT,
        "stat of a missing name",
    );
}

#[test]
fn getattr_setattr_chmod_chown_truncate_utimes() {
    let (_w, fx) = fixture("getattr_setattr");
    let p = fx.path("f");
    fs::write(&p, b"").expect("create f");
    let md = fs::metadata(&p).expect("stat f");
    assert!(md.is_file());
    assert_eq!((md.len(), md.uid(), md.gid(), md.nlink()), (0, 0, 0, 1));
    assert!(md.ino() > 1);

    for mode in [0o4755, 0o600, 0o1777, 0o000, 0o644] {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        assert_eq!(
            fs::metadata(&p).expect("stat").mode() & 0o7777,
            mode,
            "mode after chmod {mode:o}"
        );
    }
    std::os::unix::fs::chown(&p, Some(4242), Some(4243)).expect("chown");
    let md = fs::metadata(&p).expect("stat");
    assert_eq!((md.uid(), md.gid()), (4242, 4243));
    std::os::unix::fs::chown(&p, None, Some(0)).expect("chgrp");
    let md = fs::metadata(&p).expect("stat");
    assert_eq!((md.uid(), md.gid()), (4242, 0), "chgrp leaves the owner");

    let pat = Pattern::new(11).bytes(0, 10_000);
    fs::write(&p, &pat).expect("write");
    let f = OpenOptions::new().write(true).open(&p).expect("open");
    f.set_len(4000).expect("truncate down");
    assert_eq!(fs::metadata(&p).expect("stat").len(), 4000);
    assert_eq!(read_all(&p), pat[..4000].to_vec());
    f.set_len(20_000).expect("truncate up");
    let got = read_all(&p);
    assert_eq!(got.len(), 20_000);
    assert_eq!(&got[..4000], &pat[..4000]);
    assert!(got[4000..].iter().all(|b| *b == 0), "extension reads zeros");
    drop(f);
    // truncate(2) by path, without an open handle.
    let c = sys::cpath(&p);
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 123) }, 0, "truncate(2)");
    assert_eq!(fs::metadata(&p).expect("stat").len(), 123);
    assert_eq!(read_all(&p), pat[..123].to_vec());

    sys::utimens(
        &p,
        (1_000_000_000, 123_456_789),
        (1_100_000_000, 987_654_321),
    )
    .expect("utimes");
    let md = fs::metadata(&p).expect("stat");
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_100_000_000, 987_654_321));
    assert!(
        md.ctime() >= 1_600_000_000,
        "ctime is the time of the change, not the mtime set"
    );
}

#[test]
fn readdir_of_10000_entries() {
    let (_w, fx) = setup(
        "readdir_of_10000_entries",
        Duration::from_secs(300),
        Options::default(),
    );
    let dir = fx.path("big");
    fs::create_dir(&dir).expect("mkdir");
    let mut want = BTreeSet::new();
    for i in 0..10_000 {
        let name = format!("entry-{i:05}-{}", "n".repeat(i % 40));
        File::create(dir.join(&name)).unwrap_or_else(|e| panic!("create {name}: {e}"));
        want.insert(name);
    }
    let mut got = BTreeSet::new();
    let mut count = 0usize;
    for e in fs::read_dir(&dir).expect("readdir") {
        let e = e.expect("readdir entry");
        assert!(e.file_type().expect("d_type").is_file());
        got.insert(e.file_name().to_string_lossy().into_owned());
        count += 1;
    }
    assert_eq!(count, 10_000, "every entry exactly once");
    assert_eq!(got, want);
    // `.` and `..` come first in the raw listing.
    let out = harness::run_bounded(
        std::process::Command::new("ls").arg("-a1f").arg(&dir),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10_002, "ls -a shows the entries plus . and ..");
    assert!(lines.contains(&".") && lines.contains(&".."));
    // `ls -l` lists with attributes (readdirplus and/or a stat per entry).
    let started = std::time::Instant::now();
    let out = harness::run_bounded(
        std::process::Command::new("ls").arg("-l").arg(&dir),
        Duration::from_secs(60),
    );
    eprintln!("ls -l of 10,000 entries: {:?}", started.elapsed());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ls -l: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with('-')).count(),
        10_000,
        "ls -l shows every entry as a regular file"
    );
}

#[test]
fn mkdir_rmdir_enotempty() {
    let (_w, fx) = fixture("mkdir_rmdir_enotempty");
    let d = fx.path("d");
    fs::create_dir(&d).expect("mkdir d");
    assert_errno(
        fs::create_dir(&d),
        libc::EEXIST,
        "mkdir of an existing name",
    );
    fs::create_dir(d.join("sub")).expect("mkdir d/sub");
    fs::write(d.join("sub/file"), b"x").expect("create d/sub/file");
    let md = fs::metadata(&d).expect("stat d");
    assert!(md.is_dir());
    assert_eq!(
        md.nlink(),
        3,
        "a directory with one subdirectory has nlink 3"
    );
    assert_errno(
        fs::remove_dir(&d),
        libc::ENOTEMPTY,
        "rmdir of a non-empty dir",
    );
    assert_errno(
        fs::remove_dir(d.join("sub/file")),
        libc::ENOTDIR,
        "rmdir of a file",
    );
    assert_errno(
        fs::remove_file(d.join("sub")),
        libc::EISDIR,
        "unlink of a dir",
    );
    fs::remove_file(d.join("sub/file")).expect("unlink");
    fs::remove_dir(d.join("sub")).expect("rmdir sub");
    assert_eq!(fs::metadata(&d).expect("stat d").nlink(), 2);
    fs::remove_dir(&d).expect("rmdir d");
    assert_errno(fs::metadata(&d), libc::ENOENT, "stat after rmdir");
    assert_errno(fs::remove_dir(&d), libc::ENOENT, "rmdir of a missing dir");
}

#[test]
fn create_exclusive_and_trunc() {
    let (_w, fx) = fixture("create_exclusive_and_trunc");
    let p = fx.path("x");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .expect("O_CREAT|O_EXCL of a new name");
    f.write_all(&[7u8; 100]).expect("write");
    drop(f);
    assert_errno(
        OpenOptions::new().write(true).create_new(true).open(&p),
        libc::EEXIST,
        "O_CREAT|O_EXCL of an existing name",
    );
    assert_eq!(
        fs::metadata(&p).expect("stat").len(),
        100,
        "EEXIST left it alone"
    );
    // O_CREAT without O_EXCL opens the existing file.
    drop(
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .expect("O_CREAT"),
    );
    assert_eq!(fs::metadata(&p).expect("stat").len(), 100);
    let f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .expect("O_TRUNC");
    assert_eq!(f.metadata().expect("fstat").len(), 0, "fstat after O_TRUNC");
    drop(f);
    assert_eq!(
        fs::metadata(&p).expect("stat").len(),
        0,
        "stat after O_TRUNC"
    );
    assert_eq!(read_all(&p), Vec::<u8>::new());
    // A mode given at creation is kept (umask applies as on a local disk).
    let q = fx.path("moded");
    drop(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&q)
            .expect("create with mode"),
    );
    // SAFETY: umask only reads/sets the process mask; set it back at once.
    let mask = unsafe {
        let m = libc::umask(0);
        libc::umask(m);
        m
    };
    assert_eq!(
        fs::metadata(&q).expect("stat").mode() & 0o777,
        0o640 & !mask
    );
}

fn append_two_writers(fx: &KeibiFixture) {
    let p = fx.path("log");
    fs::write(&p, b"").expect("create");
    let record = |w: char, i: usize| format!("<{w}{i:05}{}>\n", "x".repeat(i % 37));
    let per_writer = 2000;
    let writers: Vec<_> = ['A', 'B']
        .into_iter()
        .map(|w| {
            let mut f = OpenOptions::new()
                .append(true)
                .open(&p)
                .expect("open O_APPEND");
            std::thread::spawn(move || {
                for i in 0..per_writer {
                    f.write_all(record(w, i).as_bytes()).expect("append");
                }
            })
        })
        .collect();
    for t in writers {
        t.join().expect("writer thread");
    }
    let text = String::from_utf8(read_all(&p)).expect("records are ASCII");
    let expected_len: usize = ['A', 'B']
        .iter()
        .map(|w| (0..per_writer).map(|i| record(*w, i).len()).sum::<usize>())
        .sum();
    assert_eq!(
        text.len(),
        expected_len,
        "total length of both writers' records"
    );
    let mut next = [0usize; 2];
    for line in text.lines() {
        let w = line.chars().nth(1).expect("record has a writer tag");
        let k = match w {
            'A' => 0,
            'B' => 1,
            _ => panic!("garbled record {line:?}"),
        };
        let want = record(w, next[k]);
        assert_eq!(
            format!("{line}\n"),
            want,
            "record {} of writer {w}",
            next[k]
        );
        next[k] += 1;
    }
    assert_eq!(next, [per_writer, per_writer]);
}
both_modes!(o_append_two_writers, LIMIT, append_two_writers);

fn read_write_pread_pwrite(fx: &KeibiFixture) {
    let p = fx.path("rw");
    let pat = Pattern::new(3);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("open rw");
    let data = pat.bytes(0, 3 << 20);
    f.write_all(&data).expect("write 3 MiB");
    f.seek(SeekFrom::Start(0)).expect("seek");
    let mut back = Vec::new();
    f.read_to_end(&mut back).expect("read");
    assert!(back == data, "read back what was written");
    for (off, len) in [
        (0u64, 1usize),
        (4095, 2),
        (1 << 20, 4096),
        (3 << 20, 10),
        (12345, 200_000),
    ] {
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off).expect("pread");
        let end = ((off as usize) + len).min(data.len());
        let want = if (off as usize) < data.len() {
            &data[off as usize..end]
        } else {
            &[][..]
        };
        assert_eq!(&buf[..n], want, "pread at {off} len {len}");
    }
    let patch = Pattern::new(99).bytes(0, 70_000);
    f.write_at(&patch, 1_000_000).expect("pwrite");
    f.write_at(b"tail", (3 << 20) + 100)
        .expect("pwrite past the end");
    f.sync_all().expect("fsync");
    drop(f);
    let mut want = data.clone();
    want[1_000_000..1_070_000].copy_from_slice(&patch);
    want.resize((3 << 20) + 100, 0);
    want.extend_from_slice(b"tail");
    assert!(read_all(&p) == want, "content after pwrites");
    assert_eq!(fs::metadata(&p).expect("stat").len(), want.len() as u64);
}
both_modes!(read_write_pread_pwrite_, LIMIT, read_write_pread_pwrite);

fn unlink_open_file(fx: &KeibiFixture) {
    let p = fx.path("doomed");
    let data = Pattern::new(5).bytes(0, 200_000);
    fs::write(&p, &data).expect("write");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open");
    let ino = f.metadata().expect("fstat").ino();
    fs::remove_file(&p).expect("unlink while open");
    assert_errno(fs::metadata(&p), libc::ENOENT, "stat after unlink");
    assert!(
        !fs::read_dir(fx.mnt())
            .expect("readdir")
            .any(|e| e.expect("entry").file_name() == "doomed"),
        "the name is gone from the directory"
    );
    let md = f.metadata().expect("fstat of an unlinked open file");
    assert_eq!((md.ino(), md.len(), md.nlink()), (ino, 200_000, 0));
    let mut buf = vec![0u8; data.len()];
    f.read_exact_at(&mut buf, 0)
        .expect("read the unlinked file");
    assert!(buf == data, "unlinked file still reads its bytes");
    f.write_all_at(b"more", 200_000)
        .expect("write to the unlinked file");
    let mut tail = [0u8; 4];
    f.read_exact_at(&mut tail, 200_000).expect("read back");
    assert_eq!(&tail, b"more");
    drop(f);
    assert_errno(fs::metadata(&p), libc::ENOENT, "still gone after close");
}
both_modes!(unlink_of_open_file, LIMIT, unlink_open_file);

#[test]
fn rename_over_existing_noreplace_exchange() {
    let (_w, fx) = fixture("rename_over_existing");
    let (a, b, c) = (fx.path("a"), fx.path("b"), fx.path("c"));
    fs::write(&a, b"AAAA").expect("write a");
    fs::write(&b, b"BB").expect("write b");
    let ino_a = fs::metadata(&a).expect("stat a").ino();
    let ino_b = fs::metadata(&b).expect("stat b").ino();
    fs::rename(&a, &b).expect("rename a over b");
    assert_errno(fs::metadata(&a), libc::ENOENT, "a after rename");
    assert_eq!(read_all(&b), b"AAAA");
    assert_eq!(
        fs::metadata(&b).expect("stat b").ino(),
        ino_a,
        "b is a's inode now"
    );
    assert_ne!(ino_a, ino_b, "two files, two inodes");
    assert!(
        !fs::read_dir(fx.mnt())
            .expect("readdir")
            .any(|e| e.expect("entry").ino() == ino_b),
        "the replaced inode is no longer named"
    );
    assert_eq!(
        fx.status_json()["files"],
        1,
        "the replaced file is freed: only b (a's inode) is left"
    );

    fs::write(&c, b"CCC").expect("write c");
    assert_errno(
        sys::renameat2(&b, &c, libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE over an existing name",
    );
    assert_eq!(read_all(&b), b"AAAA", "b untouched");
    assert_eq!(read_all(&c), b"CCC", "c untouched");
    sys::renameat2(&c, &fx.path("d"), libc::RENAME_NOREPLACE).expect("NOREPLACE to a new name");
    let d = fx.path("d");
    assert_errno(fs::metadata(&c), libc::ENOENT, "c after rename");
    let ino_d = fs::metadata(&d).expect("stat d").ino();

    sys::renameat2(&b, &d, libc::RENAME_EXCHANGE).expect("RENAME_EXCHANGE");
    assert_eq!(read_all(&b), b"CCC");
    assert_eq!(read_all(&d), b"AAAA");
    assert_eq!(fs::metadata(&b).expect("stat").ino(), ino_d);
    assert_eq!(fs::metadata(&d).expect("stat").ino(), ino_a);
    assert_errno(
        sys::renameat2(&b, &fx.path("nonexistent"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "RENAME_EXCHANGE with a missing target",
    );

    // Across directories, and a directory over an empty directory.
    fs::create_dir(fx.path("d1")).expect("mkdir");
    fs::create_dir(fx.path("d2")).expect("mkdir");
    fs::rename(&b, fx.path("d1/moved")).expect("rename into a subdir");
    assert_eq!(read_all(&fx.path("d1/moved")), b"CCC");
    fs::rename(fx.path("d1"), fx.path("d2")).expect("rename a dir over an empty dir");
    assert_eq!(read_all(&fx.path("d2/moved")), b"CCC");
    fs::create_dir(fx.path("d3")).expect("mkdir");
    fs::write(fx.path("d3/x"), b"").expect("create");
    assert_errno(
        fs::rename(fx.path("d2"), fx.path("d3")),
        libc::ENOTEMPTY,
        "rename a dir over a non-empty dir",
    );
}

#[test]
fn symlink_readlink_and_hard_link() {
    let (_w, fx) = fixture("symlink_and_link");
    let t = fx.path("target");
    fs::write(&t, b"through the link").expect("write");
    let l = fx.path("sym");
    std::os::unix::fs::symlink("target", &l).expect("symlink");
    assert_eq!(
        fs::read_link(&l).expect("readlink"),
        std::path::Path::new("target")
    );
    let lmd = fs::symlink_metadata(&l).expect("lstat");
    assert!(lmd.file_type().is_symlink());
    assert_eq!(
        lmd.len(),
        "target".len() as u64,
        "a symlink's size is its target's length"
    );
    assert_eq!(read_all(&l), b"through the link", "open follows the link");
    let dangling = fx.path("dangling");
    std::os::unix::fs::symlink("/nonexistent/far/away", &dangling).expect("dangling symlink");
    assert_eq!(
        fs::read_link(&dangling).expect("readlink"),
        std::path::Path::new("/nonexistent/far/away")
    );
    assert_errno(
        fs::metadata(&dangling),
        libc::ENOENT,
        "stat through a dangling link",
    );
    assert_errno(
        fs::read_link(&t),
        libc::EINVAL,
        "readlink of a regular file",
    );

    let h = fx.path("hard");
    fs::hard_link(&t, &h).expect("link");
    let (mt, mh) = (
        fs::metadata(&t).expect("stat"),
        fs::metadata(&h).expect("stat"),
    );
    assert_eq!(mt.ino(), mh.ino(), "same inode");
    assert_eq!((mt.nlink(), mh.nlink()), (2, 2));
    fs::write(&h, b"changed via the second name").expect("write via link");
    assert_eq!(read_all(&t), b"changed via the second name");
    assert_errno(
        fs::hard_link(&t, &h),
        libc::EEXIST,
        "link onto an existing name",
    );
    fs::remove_file(&t).expect("unlink first name");
    assert_eq!(fs::metadata(&h).expect("stat").nlink(), 1);
    assert_eq!(read_all(&h), b"changed via the second name");
    fs::create_dir(fx.path("dir")).expect("mkdir");
    assert_errno(
        fs::hard_link(fx.path("dir"), fx.path("dirlink")),
        libc::EPERM,
        "hard link to a directory",
    );
}

#[test]
fn statfs_reports_the_content_filesystem() {
    let (_w, fx) = fixture("statfs");
    let st = sys::statvfs(&fx.mnt()).expect("statvfs");
    assert_eq!(st.f_namemax, 255);
    assert!(st.f_bsize > 0 && st.f_blocks > 0 && st.f_files > 0);
    assert!(st.f_bfree <= st.f_blocks && st.f_bavail <= st.f_blocks);
    let local = sys::statvfs(&fx.state_dir()).expect("statvfs of the state dir");
    assert_eq!(
        st.f_blocks * st.f_frsize,
        local.f_blocks * local.f_frsize,
        "the mount reports the size of the state directory's filesystem"
    );
}

fn fsync_file_and_dir(fx: &KeibiFixture) {
    let p = fx.path("durable");
    let mut f = File::create(&p).expect("create");
    f.write_all(b"durable bytes").expect("write");
    f.sync_all().expect("fsync");
    f.sync_data().expect("fdatasync");
    drop(f);
    let dir = File::open(fx.mnt()).expect("open the root dir");
    dir.sync_all().expect("fsync of a directory");
    assert_eq!(read_all(&p), b"durable bytes");
}
both_modes!(fsync_, LIMIT, fsync_file_and_dir);

fn fallocate_and_punch_hole(fx: &KeibiFixture) {
    let p = fx.path("falloc");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("create");
    sys::fallocate(&f, 0, 0, 1 << 20).expect("fallocate 1 MiB");
    assert_eq!(f.metadata().expect("fstat").len(), 1 << 20);
    assert_eq!(
        fs::metadata(&p).expect("stat").len(),
        1 << 20,
        "stat sees the new size"
    );
    let data = Pattern::new(8).bytes(0, 1 << 20);
    f.write_all_at(&data, 0).expect("fill");
    sys::fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        64 * 1024,
        128 * 1024,
    )
    .expect("punch a hole");
    let mut back = vec![0u8; 1 << 20];
    f.read_exact_at(&mut back, 0).expect("read back");
    assert_eq!(&back[..64 * 1024], &data[..64 * 1024]);
    assert!(
        back[64 * 1024..192 * 1024].iter().all(|b| *b == 0),
        "the hole reads zeros"
    );
    assert_eq!(&back[192 * 1024..], &data[192 * 1024..]);
    assert_eq!(
        f.metadata().expect("fstat").len(),
        1 << 20,
        "KEEP_SIZE kept the size"
    );
    sys::fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20).expect("preallocate past EOF");
    assert_eq!(fs::metadata(&p).expect("stat").len(), 1 << 20);
}
both_modes!(fallocate_, LIMIT, fallocate_and_punch_hole);

fn sparse_seek_data_hole(fx: &KeibiFixture) {
    let p = fx.path("sparse");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .expect("create");
    let far = 8u64 << 20;
    f.write_all_at(&[1u8; 4096], 0).expect("write head");
    f.write_all_at(&[2u8; 4096], far).expect("write far");
    assert_eq!(f.metadata().expect("fstat").len(), far + 4096);
    let md = fs::metadata(&p).expect("stat");
    assert_eq!(md.len(), far + 4096);
    assert!(
        md.blocks() * 512 < far,
        "a sparse file does not allocate its hole ({} blocks)",
        md.blocks()
    );
    let mut mid = vec![9u8; 65536];
    f.read_exact_at(&mut mid, 1 << 20)
        .expect("read in the hole");
    assert!(mid.iter().all(|b| *b == 0));
    let hole = sys::lseek(&f, 0, libc::SEEK_HOLE).expect("SEEK_HOLE");
    assert!((4096..far).contains(&hole), "first hole at {hole}");
    let data = sys::lseek(&f, hole, libc::SEEK_DATA).expect("SEEK_DATA");
    assert_eq!(data, far, "next data after the hole");
    let end_hole = sys::lseek(&f, far, libc::SEEK_HOLE).expect("SEEK_HOLE at the end");
    assert_eq!(end_hole, far + 4096, "the implicit hole at EOF");
    assert_errno(
        sys::lseek(&f, far + 4096, libc::SEEK_DATA),
        libc::ENXIO,
        "SEEK_DATA at EOF",
    );
    let mut tail = [0u8; 4096];
    f.read_exact_at(&mut tail, far).expect("read far");
    assert!(tail.iter().all(|b| *b == 2));
}
both_modes!(sparse_file_seek_data_hole, LIMIT, sparse_seek_data_hole);

#[test]
fn xattrs() {
    let (_w, fx) = fixture("xattrs");
    let p = fx.path("x");
    fs::write(&p, b"").expect("create");
    assert_errno(
        sys::getxattr(&p, "user.none"),
        libc::ENODATA,
        "getxattr of an absent name",
    );
    sys::setxattr(&p, "user.a", b"alpha", 0).expect("setxattr");
    sys::setxattr(&p, "user.b", &[0u8, 255, 1, 2], 0).expect("setxattr binary");
    assert_eq!(sys::getxattr(&p, "user.a").expect("getxattr"), b"alpha");
    assert_eq!(
        sys::getxattr(&p, "user.b").expect("getxattr"),
        vec![0u8, 255, 1, 2]
    );
    let names: BTreeSet<Vec<u8>> = sys::listxattr(&p).expect("listxattr").into_iter().collect();
    assert!(
        names.contains(b"user.a".as_slice()) && names.contains(b"user.b".as_slice()),
        "{names:?}"
    );
    assert_errno(
        sys::setxattr(&p, "user.a", b"again", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE of an existing name",
    );
    assert_errno(
        sys::setxattr(&p, "user.c", b"c", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE of an absent name",
    );
    sys::setxattr(&p, "user.a", b"replaced", libc::XATTR_REPLACE).expect("XATTR_REPLACE");
    assert_eq!(sys::getxattr(&p, "user.a").expect("getxattr"), b"replaced");
    sys::removexattr(&p, "user.a").expect("removexattr");
    assert_errno(
        sys::getxattr(&p, "user.a"),
        libc::ENODATA,
        "getxattr after remove",
    );
    assert_errno(
        sys::removexattr(&p, "user.a"),
        libc::ENODATA,
        "remove an absent name",
    );
    let names = sys::listxattr(&p).expect("listxattr");
    assert_eq!(names, vec![b"user.b".to_vec()]);
    // Directories carry xattrs too.
    fs::create_dir(fx.path("d")).expect("mkdir");
    sys::setxattr(&fx.path("d"), "user.dir", b"yes", 0).expect("setxattr on a dir");
    assert_eq!(
        sys::getxattr(&fx.path("d"), "user.dir").expect("getxattr"),
        b"yes"
    );
}

#[test]
fn name_length_limits() {
    let (_w, fx) = fixture("name_length_limits");
    let ok = "a".repeat(255);
    fs::write(fx.path(&ok), b"255").expect("a 255-byte name");
    assert_eq!(read_all(&fx.path(&ok)), b"255");
    assert!(
        fs::read_dir(fx.mnt())
            .expect("readdir")
            .any(|e| e.expect("entry").file_name().as_bytes() == ok.as_bytes()),
        "the 255-byte name is listed"
    );
    let long = "b".repeat(256);
    assert_errno(
        fs::write(fx.path(&long), b"x"),
        libc::ENAMETOOLONG,
        "create 256 bytes",
    );
    assert_errno(
        fs::create_dir(fx.path(&long)),
        libc::ENAMETOOLONG,
        "mkdir 256 bytes",
    );
    assert_errno(
        fs::metadata(fx.path(&long)),
        libc::ENAMETOOLONG,
        "lookup 256 bytes",
    );
    assert_errno(
        fs::rename(fx.path(&ok), fx.path(&long)),
        libc::ENAMETOOLONG,
        "rename to 256 bytes",
    );
    assert_errno(
        std::os::unix::fs::symlink("t", fx.path(&long)),
        libc::ENAMETOOLONG,
        "symlink 256 bytes",
    );
    // Multi-byte: 255 bytes of UTF-8 is fine, 256 is not.
    let e_acute = "é".repeat(127) + "x";
    assert_eq!(e_acute.len(), 255);
    fs::write(fx.path(&e_acute), b"").expect("255 bytes of UTF-8");
    let over = "é".repeat(128);
    assert_errno(
        fs::write(fx.path(&over), b""),
        libc::ENAMETOOLONG,
        "256 bytes of UTF-8",
    );
}

#[test]
fn non_utf8_names() {
    let (_w, fx) = fixture("non_utf8_names");
    let names: [&[u8]; 4] = [
        b"caf\xe9",
        b"\xff\xfe\xfd",
        b"mixed-\xc3\x28-bad",
        b"\x01\x7f ok",
    ];
    for (i, n) in names.iter().enumerate() {
        let p = fx.mnt().join(OsStr::from_bytes(n));
        fs::write(&p, [i as u8; 3]).unwrap_or_else(|e| panic!("create {n:?}: {e}"));
    }
    let listed: BTreeSet<Vec<u8>> = fs::read_dir(fx.mnt())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().as_bytes().to_vec())
        .collect();
    for (i, n) in names.iter().enumerate() {
        assert!(
            listed.contains(*n),
            "{n:?} listed as the same bytes: {listed:?}"
        );
        let p = fx.mnt().join(OsStr::from_bytes(n));
        assert_eq!(read_all(&p), vec![i as u8; 3]);
    }
    let d = fx.mnt().join(OsStr::from_bytes(b"dir\xa0"));
    fs::create_dir(&d).expect("mkdir with a non-UTF-8 name");
    fs::rename(
        fx.mnt().join(OsStr::from_bytes(names[0])),
        d.join(OsStr::from_bytes(b"\xe9t\xe9")),
    )
    .expect("rename between non-UTF-8 names");
    assert_eq!(
        read_all(&d.join(OsStr::from_bytes(b"\xe9t\xe9"))),
        vec![0u8; 3]
    );
}

#[test]
fn invalid_names_and_kinds() {
    let (_w, fx) = fixture("invalid_names_and_kinds");
    let fifo = fx.path("fifo");
    let c = sys::cpath(&fifo);
    // SAFETY: valid C string.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo: {}",
        std::io::Error::last_os_error()
    );
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::symlink_metadata(&fifo).expect("lstat fifo").file_type()
    ));
    let dev = sys::cpath(&fx.path("dev"));
    // SAFETY: valid C string; mknod of a char device (stored as metadata;
    // tests/tests/devices.rs has the rest).
    let r = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) };
    assert_eq!(r, 0, "mknod c: {}", std::io::Error::last_os_error());
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &fs::symlink_metadata(fx.path("dev"))
            .expect("lstat dev")
            .file_type()
    ));
}

fn big_file_256mib(fx: &KeibiFixture) {
    const SIZE: u64 = 256 << 20;
    let p = fx.path("big");
    let pat = Pattern::new(256);
    let mut f = File::create(&p).expect("create");
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < SIZE {
        pat.fill(off, &mut buf);
        f.write_all(&buf).expect("write");
        off += buf.len() as u64;
    }
    f.sync_all().expect("fsync");
    drop(f);
    assert_eq!(fs::metadata(&p).expect("stat").len(), SIZE);
    let expected = hash_reader(pat.reader(SIZE)).expect("hash pattern");
    assert_eq!(
        hash_file(&p).expect("hash the file"),
        expected,
        "256 MiB read back"
    );
}
both_modes!(file_of_256_mib, Duration::from_secs(240), big_file_256mib);
