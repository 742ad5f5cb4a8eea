//! Hostile names and paths from a real peer are refused and change nothing
//! on disk. Node a runs with syncd's test hook
//! `KEIBI_TEST_INJECT_INDEX=<JSON array of ObjRec>`, so its index stream
//! carries, after the real catch-up, records that no honest peer sends:
//! names `../x`, `a/b`, `.`, `..`, one with a NUL byte, one of 300 bytes,
//! the same name twice in one record, and a file whose parent is a symlink
//! pointing out of the share (syncd must never follow it). Two honest
//! records ride along (a directory, and that symlink, which is a legal
//! object) and must arrive: they show the hook worked and b kept applying.

use harness::pair::{LinkMode, Pair, PairOptions};
use harness::sync_helpers::PROPAGATION;
use harness::tree::{Kind, snapshot};
use harness::{Watchdog, poll_until};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);

fn gid(byte: u8) -> Value {
    json!(vec![byte; 16])
}

const ROOT: u8 = 0;

/// A record as `ObjRec`'s JSON form (serde): `name` as an array of bytes.
/// The version vector is empty (JSON maps need string keys); an object the
/// receiver has never seen is new to it whatever its vector.
fn rec(g: u8, kind: &str, names: &[(u8, &[u8])], target: &[u8]) -> Value {
    let names: Vec<Value> = names
        .iter()
        .map(|(parent, name)| json!({ "parent": gid(*parent), "name": name.to_vec() }))
        .collect();
    json!({
        "gid": gid(g),
        "vv": {},
        "modified_by": vec![7u8; 8],
        "deleted": false,
        "kind": kind,
        "names": names,
        "perm": if kind == "Directory" { 0o755 } else { 0o644 },
        "mtime": { "secs": 1_700_000_000i64, "nanos": 0 },
        "size": target.len(),
        "chunks": [],
        "target": target.to_vec(),
    })
}

fn entries_named(dir: &Path, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .filter(|n| std::fs::symlink_metadata(dir.join(n)).is_ok())
        .map(|n| dir.join(n).display().to_string())
        .collect()
}

#[test]
fn hostile_names_and_paths_from_a_peer_are_refused_and_touch_nothing() {
    let _w = Watchdog::arm("hostile", LIMIT);
    let outside = tempfile::Builder::new()
        .prefix("kb-outside")
        .tempdir_in("/tmp")
        .expect("a directory outside every share");
    std::fs::set_permissions(
        outside.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod the outside directory");
    let target = outside
        .path()
        .to_str()
        .expect("utf-8 path")
        .as_bytes()
        .to_vec();
    let long = vec![b'n'; 300];
    let records = json!([
        rec(0x11, "Directory", &[(ROOT, b"ok-dir")], b""),
        rec(0x12, "Symlink", &[(ROOT, b"escape")], &target),
        rec(0x21, "File", &[(ROOT, b"../x")], b""),
        rec(0x22, "File", &[(ROOT, b"a/b")], b""),
        rec(0x23, "Directory", &[(ROOT, b".")], b""),
        rec(0x24, "Directory", &[(ROOT, b"..")], b""),
        rec(0x25, "File", &[(ROOT, b"nul\0byte")], b""),
        rec(0x26, "File", &[(ROOT, &long)], b""),
        rec(0x27, "File", &[(ROOT, b"dup"), (ROOT, b"dup")], b""),
        rec(0x28, "File", &[(0x12, b"pwned")], b""),
        rec(0x29, "File", &[(0x11, b"..")], b""),
    ]);
    let mut o = PairOptions::new(LinkMode::Netns);
    // Beside the outside directory, readable by syncd (nobody); kept until
    // the end of the test (syncd reads it when it serves the stream).
    let hook_dir = tempfile::Builder::new()
        .prefix("kb-inject")
        .tempdir_in("/tmp")
        .expect("a directory for the hook file");
    std::fs::set_permissions(
        hook_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the hook directory");
    let hook_file = hook_dir.path().join("records.json");
    std::fs::write(&hook_file, serde_json::to_vec(&records).expect("JSON")).expect("write hook");
    std::fs::set_permissions(
        &hook_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod hook file");
    o.env_a = vec![(
        "KEIBI_TEST_INJECT_INDEX".into(),
        hook_file.display().to_string(),
    )];
    let p = Pair::start(o);

    // The honest records arrive.
    poll_until("ok-dir and escape on b", PROPAGATION, || {
        let t = snapshot(&p.b.mnt(), false).ok()?;
        (t.get(Path::new("ok-dir")).map(|e| &e.kind) == Some(&Kind::Dir)
            && t.get(Path::new("escape")).map(|e| &e.kind) == Some(&Kind::Symlink))
        .then_some(())
    });
    // b keeps working after the hostile ones: a change made after them
    // still arrives (so they were all seen and refused, not pending).
    std::fs::write(p.a.path("after.txt"), b"after\n").expect("write on a");
    harness::sync_helpers::wait_content(&p.b.path("after.txt"), b"after\n", PROPAGATION);

    let t = snapshot(&p.b.mnt(), false).expect("walk b's mount");
    let names: Vec<String> = t.keys().map(|k| k.display().to_string()).collect();
    assert_eq!(
        names,
        ["", "after.txt", "escape", "ok-dir"],
        "only the honest records reached b's tree"
    );
    assert_eq!(
        std::fs::read_dir(outside.path())
            .expect("list outside")
            .count(),
        0,
        "nothing was created through the symlink out of the share"
    );
    for dir in [p.b.root().to_path_buf(), p.b.state_dir()] {
        let found = entries_named(&dir, &["x", "b", "pwned", "dup", "nul"]);
        assert!(
            found.is_empty(),
            "hostile names reached the disk: {found:?}"
        );
    }
    // `../x` resolved from b's directory or its state directory.
    for dir in [p.b.root().parent(), p.b.state_dir().parent()]
        .into_iter()
        .flatten()
    {
        let found = entries_named(dir, &["x", "pwned"]);
        assert!(
            found.is_empty(),
            "hostile names reached the disk: {found:?}"
        );
    }
    let log = p.b.syncd_log();
    assert!(
        log.contains("invalid") || log.contains("Invalid") || log.contains("refus"),
        "b's log names the refused records"
    );
}
