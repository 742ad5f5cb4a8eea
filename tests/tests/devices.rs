//! Device nodes: `mknod` of character and block devices stores them as
//! metadata (kind and `rdev`); the mount is `nodev`, so opening one fails
//! (`EACCES`, from the kernel's nodev check); archiving and copying a tree
//! with device nodes works; they survive a restart of both daemons.

use harness::process::{check_output, run_bounded};
use harness::{Options, assert_errno, setup};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// (kind is char, rdev, ino) of `p`.
fn node(p: &Path) -> (bool, bool, u64, u64) {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = md.file_type();
    (
        ft.is_char_device(),
        ft.is_block_device(),
        md.rdev(),
        md.ino(),
    )
}

#[test]
fn device_nodes_are_stored_listed_archived_copied_and_kept() {
    let (_w, mut fx) = setup("device nodes", Duration::from_secs(180), Options::default());
    let tree = fx.path("tree");
    fs::create_dir(&tree).expect("mkdir");
    fs::write(tree.join("plain"), b"plain bytes").expect("write");
    let null = makedev(1, 3);
    let disk = makedev(8, 17);
    let big = makedev(300, 70_000);
    mknod(
        &tree.join("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        null,
    )
    .expect("mknod c 1 3 on the mount");
    mknod(
        &tree.join("sdb1"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        disk,
    )
    .expect("mknod b 8 17 on the mount");
    mknod(
        &tree.join("big"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        big,
    )
    .expect("mknod c 300 70000 on the mount");
    let (c, b, rdev, null_ino) = node(&tree.join("null"));
    assert!(c && !b, "null is a character device");
    assert_eq!(rdev, null);
    let (c, b, rdev, disk_ino) = node(&tree.join("sdb1"));
    assert!(!c && b, "sdb1 is a block device");
    assert_eq!(rdev, disk);
    assert_eq!(node(&tree.join("big")).2, big, "a large major and minor");
    // The listing shows them (readdirplus fills the kernel's cache).
    let listed = check_output(
        "ls -l",
        &run_bounded(
            Command::new("ls").arg("-l").arg(&tree),
            Duration::from_secs(30),
        ),
    );
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with('c') && l.ends_with(" null")),
        "{listed}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with('b') && l.ends_with(" sdb1")),
        "{listed}"
    );

    // nodev: no device behind them. The kernel refuses the open itself.
    let vfs = nix::sys::statvfs::statvfs(&fx.mnt()).expect("statvfs");
    assert!(
        vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_NODEV),
        "the mount is nodev"
    );
    assert_errno(
        fs::File::open(tree.join("null")),
        libc::EACCES,
        "open of a char device",
    );
    assert_errno(
        fs::OpenOptions::new().write(true).open(tree.join("sdb1")),
        libc::EACCES,
        "open of a block device",
    );

    // tar and cp -a of the tree.
    let archive = fx.scratch().join("tree.tar");
    check_output(
        "tar -cf",
        &run_bounded(
            Command::new("tar")
                .arg("-cf")
                .arg(&archive)
                .arg("-C")
                .arg(fx.mnt())
                .arg("tree"),
            Duration::from_secs(60),
        ),
    );
    let listing = check_output(
        "tar -tvf",
        &run_bounded(
            Command::new("tar").arg("-tvf").arg(&archive),
            Duration::from_secs(60),
        ),
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with('c') && l.contains("tree/null")),
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with('b') && l.contains("tree/sdb1")),
        "{listing}"
    );
    let untar = fx.path("untarred");
    fs::create_dir(&untar).expect("mkdir");
    check_output(
        "tar -xf onto the mount",
        &run_bounded(
            Command::new("tar")
                .arg("-xf")
                .arg(&archive)
                .arg("-C")
                .arg(&untar),
            Duration::from_secs(60),
        ),
    );
    assert_eq!(node(&untar.join("tree/null")).2, null);
    assert_eq!(node(&untar.join("tree/sdb1")).2, disk);
    check_output(
        "cp -a",
        &run_bounded(
            Command::new("cp")
                .arg("-a")
                .arg(&tree)
                .arg(fx.path("copied")),
            Duration::from_secs(60),
        ),
    );
    let (c, _, rdev, _) = node(&fx.path("copied/null"));
    assert!(c && rdev == null, "cp -a made the same char device");
    let (_, b, rdev, _) = node(&fx.path("copied/sdb1"));
    assert!(b && rdev == disk, "cp -a made the same block device");
    assert_eq!(
        fs::read(fx.path("copied/plain")).expect("read"),
        b"plain bytes"
    );

    // Durable with the directory's fsync, and kept across a restart.
    fs::File::open(&tree)
        .expect("open dir")
        .sync_all()
        .expect("fsync dir");
    fx.restart_both();
    assert_eq!(node(&tree.join("null")), (true, false, null, null_ino));
    assert_eq!(node(&tree.join("sdb1")), (false, true, disk, disk_ino));
    assert_eq!(node(&tree.join("big")).2, big);
}
