//! Concurrent changes made while the link between the two nodes is down
//! (`ip link set down` on the veth pair), then the link comes back: both
//! trees end identical and no byte of either side is lost.
//! - the same file edited on both sides: exactly one conflict copy
//!   (`NAME.sync-conflict-YYYYMMDD-HHMMSS-<device>.EXT`), the two files
//!   hold the two versions;
//! - edited on one side, deleted on the other: the edit stays, no copy;
//! - the same new name created on both sides: a conflict, not a merge;
//! - a directory deleted on one side while a file is created inside it on
//!   the other: the directory and the new file stay.

use harness::Watchdog;
use harness::pair::{LinkMode, Pair, Side};
use harness::sync_helpers::PROPAGATION;
use harness::tree::{Kind, Tree, conflict_copies, wait_converged};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);
const NOTICE: Duration = Duration::from_secs(30);

/// Start a pair, run `setup` on a and wait until b has it.
fn pair_with(setup: impl FnOnce(&Pair)) -> Pair {
    let p = Pair::start_mode(LinkMode::Netns);
    setup(&p);
    wait_converged(&p.a.mnt(), &p.b.mnt(), PROPAGATION);
    p
}

/// Cut the link and wait until both sides know it.
fn cut(p: &Pair) {
    p.cut();
    p.wait_disconnected(Side::A, NOTICE);
    p.wait_disconnected(Side::B, NOTICE);
}

/// Bring the link back and wait for both trees to be the same.
fn restore_and_converge(p: &Pair) -> Tree {
    p.restore();
    p.wait_connected(NOTICE);
    wait_converged(&p.a.mnt(), &p.b.mnt(), PROPAGATION)
}

fn contents(p: &Pair, paths: &[PathBuf]) -> BTreeSet<Vec<u8>> {
    paths
        .iter()
        .map(|rel| std::fs::read(p.a.mnt().join(rel)).expect("read a converged file"))
        .collect()
}

/// The conflict copy's name: `STEM.sync-conflict-YYYYMMDD-HHMMSS-XXXXXXXX.EXT`.
fn assert_conflict_name(copy: &Path, stem: &str, ext: &str) {
    let name = copy
        .file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned();
    let rest = name
        .strip_prefix(&format!("{stem}.sync-conflict-"))
        .unwrap_or_else(|| panic!("conflict copy {name:?} does not start with {stem:?}"));
    let rest = rest
        .strip_suffix(&format!(".{ext}"))
        .unwrap_or_else(|| panic!("conflict copy {name:?} does not end with .{ext}"));
    let parts: Vec<&str> = rest.split('-').collect();
    assert!(
        parts.len() == 3
            && parts[0].len() == 8
            && parts[1].len() == 6
            && parts[2].len() == 8
            && parts[..2]
                .iter()
                .all(|p| p.bytes().all(|b| b.is_ascii_digit()))
            && parts[2].bytes().all(|b| b.is_ascii_hexdigit()),
        "conflict copy {name:?}: expected YYYYMMDD-HHMMSS-<8 hex of the device>"
    );
}

#[test]
fn concurrent_edits_keep_both_versions_with_one_conflict_copy() {
    let _w = Watchdog::arm("edit_edit", LIMIT);
    let p = pair_with(|p| std::fs::write(p.a.path("notes.txt"), b"base\n").expect("write"));
    cut(&p);
    std::fs::write(p.a.path("notes.txt"), b"edited on a\n").expect("edit on a");
    std::fs::write(p.b.path("notes.txt"), b"edited on b, longer\n").expect("edit on b");
    let t = restore_and_converge(&p);
    let copies = conflict_copies(&t);
    assert_eq!(copies.len(), 1, "exactly one conflict copy: {t:?}");
    assert_conflict_name(&copies[0], "notes", "txt");
    assert_eq!(copies[0].parent(), Some(Path::new("")));
    let got = contents(&p, &[PathBuf::from("notes.txt"), copies[0].clone()]);
    let want: BTreeSet<Vec<u8>> = [b"edited on a\n".to_vec(), b"edited on b, longer\n".to_vec()]
        .into_iter()
        .collect();
    assert_eq!(got, want, "both versions are kept");
}

#[test]
fn edit_against_delete_keeps_the_edit() {
    let _w = Watchdog::arm("edit_delete", LIMIT);
    let p = pair_with(|p| std::fs::write(p.a.path("doc.md"), b"base\n").expect("write"));
    cut(&p);
    std::fs::write(p.a.path("doc.md"), b"edited on a\n").expect("edit on a");
    std::fs::remove_file(p.b.path("doc.md")).expect("delete on b");
    let t = restore_and_converge(&p);
    assert!(conflict_copies(&t).is_empty(), "no conflict copy: {t:?}");
    assert_eq!(
        std::fs::read(p.b.path("doc.md")).expect("doc.md is back on b"),
        b"edited on a\n"
    );
}

#[test]
fn the_same_name_created_on_both_sides_is_a_conflict() {
    let _w = Watchdog::arm("create_create", LIMIT);
    let p = pair_with(|_| {});
    cut(&p);
    std::fs::write(p.a.path("report.csv"), b"a,1\n").expect("create on a");
    std::fs::write(p.b.path("report.csv"), b"b,2\nb,3\n").expect("create on b");
    let t = restore_and_converge(&p);
    let copies = conflict_copies(&t);
    assert_eq!(copies.len(), 1, "exactly one conflict copy: {t:?}");
    assert_conflict_name(&copies[0], "report", "csv");
    let got = contents(&p, &[PathBuf::from("report.csv"), copies[0].clone()]);
    let want: BTreeSet<Vec<u8>> = [b"a,1\n".to_vec(), b"b,2\nb,3\n".to_vec()]
        .into_iter()
        .collect();
    assert_eq!(got, want, "both files are kept, not merged");
}

#[test]
fn a_directory_deleted_while_a_file_is_created_inside_it_stays() {
    let _w = Watchdog::arm("rmdir_create", LIMIT);
    let p = pair_with(|p| {
        std::fs::create_dir(p.a.path("proj")).expect("mkdir");
        std::fs::write(p.a.path("proj/old.txt"), b"old\n").expect("write");
    });
    cut(&p);
    std::fs::remove_dir_all(p.b.path("proj")).expect("rm -r proj on b");
    std::fs::write(p.a.path("proj/new.txt"), b"new on a\n").expect("create inside on a");
    let t = restore_and_converge(&p);
    assert_eq!(t[Path::new("proj")].kind, Kind::Dir, "{t:?}");
    assert_eq!(
        std::fs::read(p.b.path("proj/new.txt")).expect("new.txt on b"),
        b"new on a\n"
    );
    assert!(conflict_copies(&t).is_empty(), "no conflict copy: {t:?}");
}
