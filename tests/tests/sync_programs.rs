//! Real programs on one node, their results read by real programs on the
//! other: `git commit` on a, `git log`/`git status` on b; `sqlite3`
//! writes on a, queries on b; `tar x` on a, `tar c` on b, and the archive
//! b makes unpacks to the same tree as the source.

use harness::pair::{LinkMode, Pair};
use harness::process::check_output;
use harness::sync_helpers::PROPAGATION;
use harness::tree::{snapshot, wait_converged};
use harness::{Watchdog, run_bounded};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);
const RUN: Duration = Duration::from_secs(120);

/// Run `program args` in `dir`, bounded; panics unless it exits 0;
/// returns stdout.
fn run_in(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = run_bounded(Command::new(program).args(args).current_dir(dir), RUN);
    check_output(&format!("{program} {args:?} in {}", dir.display()), &out)
}

/// git with a fixed identity, and the share's directories trusted (files
/// from a peer belong to the share owner, not to the user running git).
fn git(dir: &Path, args: &[&str]) -> String {
    let mut all = vec![
        "-c",
        "safe.directory=*",
        "-c",
        "user.name=keibi test",
        "-c",
        "user.email=test@keibi.invalid",
        "-c",
        "init.defaultBranch=main",
    ];
    all.extend_from_slice(args);
    run_in(dir, "git", &all)
}

#[test]
fn git_commit_on_a_is_a_clean_repository_on_b() {
    let _w = Watchdog::arm("git", LIMIT);
    let p = Pair::start_mode(LinkMode::Netns);
    let repo_a = p.a.path("repo");
    std::fs::create_dir(&repo_a).expect("mkdir repo");
    git(&repo_a, &["init", "-q"]);
    std::fs::write(repo_a.join("README"), "keibi\n").expect("write README");
    std::fs::create_dir(repo_a.join("src")).expect("mkdir src");
    std::fs::write(repo_a.join("src/main.c"), "int main(void) { return 0; }\n").expect("write");
    git(&repo_a, &["add", "-A"]);
    git(&repo_a, &["commit", "-q", "-m", "first commit from a"]);
    std::fs::write(repo_a.join("README"), "keibi, second\n").expect("write README");
    git(
        &repo_a,
        &["commit", "-q", "-a", "-m", "second commit from a"],
    );
    let head_a = git(&repo_a, &["rev-parse", "HEAD"]);

    wait_converged(&p.a.mnt(), &p.b.mnt(), PROPAGATION);
    let repo_b = p.b.path("repo");
    let log = git(&repo_b, &["log", "--format=%s"]);
    assert_eq!(log, "second commit from a\nfirst commit from a\n");
    assert_eq!(git(&repo_b, &["rev-parse", "HEAD"]), head_a);
    assert_eq!(
        git(&repo_b, &["status", "--porcelain"]),
        "",
        "b's worktree is clean"
    );
    git(&repo_b, &["fsck", "--strict"]);
}

#[test]
fn sqlite_writes_on_a_are_queried_on_b() {
    let _w = Watchdog::arm("sqlite", LIMIT);
    let p = Pair::start_mode(LinkMode::Netns);
    let mnt_a = p.a.mnt();
    run_in(
        &mnt_a,
        "sqlite3",
        &[
            "app.db",
            "PRAGMA journal_mode=DELETE; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 5000) \
             INSERT INTO t(v) SELECT printf('row %d', i) FROM n; \
             UPDATE t SET v = 'changed' WHERE id % 100 = 0;",
        ],
    );
    wait_converged(&p.a.mnt(), &p.b.mnt(), PROPAGATION);
    let out = run_in(
        &p.b.mnt(),
        "sqlite3",
        &[
            "app.db",
            "PRAGMA integrity_check; SELECT count(*), sum(id), sum(v = 'changed') FROM t;",
        ],
    );
    assert_eq!(out, "ok\n5000|12502500|50\n");
}

#[test]
fn tar_x_on_a_then_tar_c_on_b_gives_the_same_tree() {
    let _w = Watchdog::arm("tar", LIMIT);
    let p = Pair::start_mode(LinkMode::Netns);
    // A source tree on local disk, with a bit of everything shared.
    let src = p.a.scratch().join("src");
    std::fs::create_dir_all(src.join("a/b/c")).expect("mkdir");
    for i in 0..50 {
        std::fs::write(
            src.join(format!("a/f{i}.txt")),
            format!("{i}\n").repeat(i * 40),
        )
        .expect("write");
    }
    harness::sync_helpers::write_pattern(&src.join("a/b/big.bin"), 3, 5 << 20);
    std::os::unix::fs::symlink("../f1.txt", src.join("a/b/link")).expect("symlink");
    std::fs::write(src.join("a/b/c/run.sh"), "#!/bin/sh\n").expect("write");
    run_in(&src, "chmod", &["0750", "a/b/c/run.sh"]);
    let archive = p.a.scratch().join("src.tar");
    run_in(
        &src,
        "tar",
        &["cf", archive.to_str().expect("utf-8 path"), "."],
    );

    let dest_a = p.a.path("unpacked");
    std::fs::create_dir(&dest_a).expect("mkdir unpacked");
    run_in(
        &dest_a,
        "tar",
        &["xf", archive.to_str().expect("utf-8 path")],
    );
    wait_converged(&p.a.mnt(), &p.b.mnt(), PROPAGATION);

    let out_tar = p.b.scratch().join("out.tar");
    run_in(
        &p.b.path("unpacked"),
        "tar",
        &["cf", out_tar.to_str().expect("utf-8 path"), "."],
    );
    let out = p.b.scratch().join("out");
    std::fs::create_dir(&out).expect("mkdir out");
    run_in(&out, "tar", &["xf", out_tar.to_str().expect("utf-8 path")]);
    let (ts, to) = (
        snapshot(&src, true).expect("walk the source"),
        snapshot(&out, true).expect("walk what b archived"),
    );
    assert!(
        ts == to,
        "the tree b archived differs from the source:\n{}",
        harness::tree::diff(&ts, &to, 20)
    );
}
