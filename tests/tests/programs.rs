//! Real programs on the mount: git, tar, sqlite3 (Debian packages `git`,
//! `tar`, `sqlite3`). A missing program is a failure saying what to
//! install, never a skip.

use harness::process::check_output;
use harness::{Options, Pattern, hash_file, run_bounded, setup};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{program}` is not installed: apt-get install -y {package}"
    );
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = run_bounded(cmd, Duration::from_secs(120));
    check_output(what, &out)
}

fn git(repo: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=Keibi Test",
            "-c",
            "user.email=test@keibi.invalid",
        ])
        .args(["-c", "init.defaultBranch=main", "-c", "safe.directory=*"])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", repo);
    run(&format!("git {}", args.join(" ")), &mut cmd)
}

#[test]
fn git_init_add_commit_log_status() {
    require("git", "git");
    let (_w, fx) = setup("git", LIMIT, Options::default());
    let repo = fx.path("repo");
    fs::create_dir(&repo).expect("mkdir repo");
    git(&repo, &["init", "-q"]);
    fs::create_dir(repo.join("src")).expect("mkdir src");
    for i in 0..30 {
        fs::write(
            repo.join(format!("src/m{i}.txt")),
            format!("module {i}\n").repeat(i + 1),
        )
        .expect("write");
    }
    fs::write(repo.join("README"), "hello\n").expect("write");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    fs::write(repo.join("README"), "hello again\n").expect("write");
    fs::remove_file(repo.join("src/m3.txt")).expect("rm");
    git(&repo, &["commit", "-q", "-a", "-m", "second"]);
    let log = git(&repo, &["log", "--format=%s"]);
    assert_eq!(log.lines().collect::<Vec<_>>(), vec!["second", "first"]);
    let status = git(&repo, &["status", "--porcelain"]);
    assert_eq!(status, "", "clean work tree after commit");
    fs::write(repo.join("untracked"), "u").expect("write");
    let status = git(&repo, &["status", "--porcelain"]);
    assert_eq!(status.trim(), "?? untracked");
    git(&repo, &["fsck", "--full", "--strict"]);
    let shown = git(&repo, &["show", "HEAD~1:README"]);
    assert_eq!(shown, "hello\n");
    // gc repacks: renames, fsyncs, unlinks of open files.
    git(&repo, &["gc", "-q", "--aggressive"]);
    assert_eq!(git(&repo, &["log", "--format=%s"]).lines().count(), 2);
}

/// Path → (mode, size, hash or link target) of every entry under `root`.
fn manifest(root: &Path) -> BTreeMap<PathBuf, (u32, u64, String)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).expect("readdir") {
            let e = e.expect("entry");
            let r = rel.join(e.file_name());
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).expect("lstat");
            let what = if md.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&p).expect("readlink").display())
            } else if md.is_dir() {
                stack.push(r.clone());
                "dir".to_string()
            } else {
                format!("{:?}", hash_file(&p).expect("hash"))
            };
            let size = if md.is_dir() { 0 } else { md.len() };
            out.insert(r, (md.mode() & 0o7777, size, what));
        }
    }
    out
}

fn make_source_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).expect("mkdir");
    for i in 0..40u64 {
        let dir = ["", "a", "a/b", "a/b/c"][(i % 4) as usize];
        let len = ((i * 104_729) % 700_000) as usize;
        fs::write(
            root.join(dir).join(format!("f{i}")),
            Pattern::new(i).bytes(0, len),
        )
        .expect("write");
    }
    fs::write(root.join("a/empty"), b"").expect("write");
    std::os::unix::fs::symlink("b/c/f3", root.join("a/link")).expect("symlink");
    fs::set_permissions(
        root.join("a/b/f2"),
        std::os::unix::fs::PermissionsExt::from_mode(0o751),
    )
    .expect("chmod");
}

fn tar_round_trip(from: &Path, via: &Path, to: &Path) {
    make_source_tree(from);
    run(
        "tar create",
        Command::new("tar")
            .arg("-C")
            .arg(from)
            .arg("-cf")
            .arg(via)
            .arg("."),
    );
    fs::create_dir_all(to).expect("mkdir target");
    run(
        "tar extract",
        Command::new("tar").arg("-C").arg(to).arg("-xpf").arg(via),
    );
    assert_eq!(
        manifest(to),
        manifest(from),
        "extracted tree equals the source"
    );
    run(
        "diff -r",
        Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(from)
            .arg(to),
    );
}

#[test]
fn tar_from_the_mount_to_local_disk() {
    require("tar", "tar");
    let (_w, fx) = setup("tar mount→disk", LIMIT, Options::default());
    let (from, via, to) = (
        fx.path("src"),
        fx.scratch().join("t.tar"),
        fx.scratch().join("out"),
    );
    tar_round_trip(&from, &via, &to);
}

#[test]
fn tar_from_local_disk_to_the_mount() {
    require("tar", "tar");
    let (_w, fx) = setup("tar disk→mount", LIMIT, Options::default());
    let (from, via, to) = (fx.scratch().join("src"), fx.path("t.tar"), fx.path("out"));
    tar_round_trip(&from, &via, &to);
}

#[test]
fn sqlite3_create_insert_query() {
    require("sqlite3", "sqlite3");
    let (_w, fx) = setup("sqlite3", LIMIT, Options::default());
    let db = fx.path("db.sqlite");
    let mut sql = String::from(
        "PRAGMA journal_mode=WAL;\nCREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, blob BLOB);\nBEGIN;\n",
    );
    for i in 0..1000 {
        sql.push_str(&format!(
            "INSERT INTO t(name, blob) VALUES('row {i}', randomblob({}));\n",
            (i * 37) % 2000
        ));
    }
    sql.push_str("COMMIT;\n");
    let script = fx.scratch().join("load.sql");
    fs::write(&script, sql).expect("write sql");
    run(
        "sqlite3 load",
        Command::new("sqlite3")
            .arg(&db)
            .arg(format!(".read {}", script.display())),
    );
    let count = run(
        "sqlite3 count",
        Command::new("sqlite3")
            .arg(&db)
            .arg("SELECT count(*) FROM t;"),
    );
    assert_eq!(count.trim(), "1000");
    let check = run(
        "sqlite3 integrity_check",
        Command::new("sqlite3")
            .arg(&db)
            .arg("PRAGMA integrity_check;"),
    );
    assert_eq!(check.trim(), "ok");
    // Rollback journal mode too (creates, fsyncs and unlinks a journal).
    let db2 = fx.path("journal.sqlite");
    run(
        "sqlite3 journal",
        Command::new("sqlite3").arg(&db2).arg(
            "PRAGMA journal_mode=DELETE; CREATE TABLE k(v); INSERT INTO k VALUES(1),(2),(3); \
             UPDATE k SET v = v * 10;",
        ),
    );
    let sum = run(
        "sqlite3 sum",
        Command::new("sqlite3")
            .arg(&db2)
            .arg("SELECT sum(v) FROM k;"),
    );
    assert_eq!(sum.trim(), "60");
}
