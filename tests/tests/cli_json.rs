//! Every `keibictl --json` output, from real daemons, validates against
//! its checked-in JSON Schema (`docs/json-schema/<command>.json`, with
//! `additionalProperties: false`, so an undocumented field fails), and
//! the exit statuses of the README's table for each case a test can
//! produce: 0, 1 (syncd unreachable; `check` with an inconsistency;
//! `prefetch` of a path that is not a file), 2 (bad command line), 3
//! (unknown peer), 4 (`wait` and `prefetch` at their timeout).
//!
//! `wait --synced` is shown to wait for real pending work: a change of a's
//! that b defers while b holds the file open for writing keeps b's wait
//! from ending (exit 4, the pending change named), and once the file is
//! closed the wait ends with exit 0. `prefetch` makes a file that b has
//! only fetched on demand local, byte for byte. Plain `wait` started
//! while syncd is down ends once syncd is started; against a frozen syncd
//! `wait` ends at its timeout.

use harness::ctl::Ctl;
use harness::pair::{LinkMode, Pair, PairOptions};
use harness::process::{assert_exit as exit, run_bounded};
use harness::{Options, Watchdog, binaries, poll_until, setup};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);

fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/json-schema")
}

/// Validate `out`'s stdout against `docs/json-schema/<name>.json`, and
/// answer it.
#[track_caller]
fn valid(name: &str, out: &Output) -> Value {
    let path = schema_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema: Value = serde_json::from_str(&text).expect("the schema is JSON");
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("{}: not a usable schema: {e}", path.display()));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{name}: stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let errors: Vec<String> = validator
        .iter_errors(&v)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{name}: the output does not match {}: {errors:#?}\n{v:#}",
        path.display()
    );
    v
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// keibictl with `args` only (no `--socket` or `--timeout` added).
fn keibictl(args: &[&str]) -> Output {
    run_bounded(
        Command::new(binaries::binary("keibictl")).args(args),
        Duration::from_secs(60),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

#[test]
fn every_json_output_of_a_pair_matches_its_schema_and_wait_and_prefetch_work() {
    let _w = Watchdog::arm("cli-json-pair", LIMIT);
    // Files over 1 MiB are fetched on demand (the default eager limit).
    let p = Pair::start(PairOptions::new(LinkMode::Loopback));
    let (a, b) = (&p.a, &p.b);

    // `json-schema NAME` prints the checked-in file.
    let out = keibictl(&["json-schema", "status"]);
    exit(&out, 0, "json-schema status");
    let on_disk = std::fs::read(schema_dir().join("status.json")).expect("status.json");
    assert!(
        out.stdout == on_disk,
        "json-schema status differs from the file"
    );
    exit(&keibictl(&["json-schema", "nope"]), 2, "json-schema nope");

    // Read-only commands.
    let v = valid("id", &a.ctl().run(&["id", "--json"]));
    assert_eq!(v["fingerprint"].as_str(), Some(a.fingerprint()));
    let v = valid("status", &a.ctl().run(&["status", "--json"]));
    assert_eq!(v["sync"]["peers"][0]["connected"], true, "{v}");
    valid("check", &a.ctl().run(&["check", "--json"]));
    let v = valid("peer-list", &a.ctl().run(&["peer", "list", "--json"]));
    assert_eq!(v[0]["fingerprint"].as_str(), Some(b.fingerprint()));
    let lock_dir = a.lock_dir();
    let mnt = a.mnt();
    let v = valid(
        "debug-ops",
        &a.ctl().run(&[
            "debug",
            "ops",
            "--mount",
            s(&mnt),
            "--lock-dir",
            s(&lock_dir),
            "--json",
        ]),
    );
    assert!(
        v["syncd"].is_array() && v["mounts"][s(&mnt)].is_array(),
        "{v}"
    );
    let v = valid(
        "debug-passthrough",
        &a.ctl().run(&[
            "debug",
            "passthrough",
            "--mount",
            s(&mnt),
            "--lock-dir",
            s(&lock_dir),
            "--json",
        ]),
    );
    assert!(v["in_use"].is_boolean(), "{v}");
    let v = valid("wait", &a.ctl().run(&["wait", "--json"]));
    assert_eq!(
        (v["until"].as_str(), v["done"].as_bool()),
        (Some("answer"), Some(true))
    );

    // A bench of 1 MiB.
    let out = a.ctl().run(&[
        "peer",
        "bench",
        b.fingerprint(),
        "--bytes",
        "1MiB",
        "--json",
    ]);
    exit(&out, 0, "peer bench");
    let v = valid("peer-bench", &out);
    assert_eq!(v["bytes"], 1 << 20, "{v}");

    // A big file of a's arrives at b without its bytes; prefetch fetches
    // them.
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(a.path("big.bin"), &big).expect("write big.bin on a");
    let files = poll_until(
        "b to list big.bin as not local",
        Duration::from_secs(60),
        || {
            let out = b.ctl().run(&["status", "--files", "--json"]);
            exit(&out, 0, "status --files");
            let v = valid("status-files", &out);
            v.as_array()
                .is_some_and(|l| l.iter().any(|f| f["path"] == "/big.bin"))
                .then_some(v)
        },
    );
    assert_eq!(files[0]["size"], 3 << 20, "{files}");
    let big_on_b = b.path("big.bin");
    let out = b.ctl().run(&["prefetch", s(&big_on_b), "--json"]);
    exit(&out, 0, "prefetch big.bin");
    let v = valid("prefetch", &out);
    assert_eq!(v["done"], true, "{v}");
    assert_eq!(v["files"][0]["path"], "/big.bin", "{v}");
    assert_eq!(v["files"][0]["present_bytes"], 3 << 20, "{v}");
    let v = valid(
        "status-files",
        &b.ctl().run(&["status", "--files", "--json"]),
    );
    assert_eq!(v, serde_json::json!([]), "every file is local now");
    // Local means local: b's syncd reads it without asking a (stopped).
    p.stop_syncd(harness::pair::Side::A);
    let read = std::fs::read(&big_on_b);
    p.cont_syncd(harness::pair::Side::A);
    assert!(
        read.expect("read big.bin on b") == big,
        "b's big.bin is a's"
    );
    // A path that is no file of the share: exit 1, the error in the JSON.
    let out = b.ctl().run(&["prefetch", "/no/such/file", "--json"]);
    exit(&out, 1, "prefetch of a missing path");
    let v = valid("prefetch", &out);
    assert!(
        v["files"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("ENOENT")),
        "{v}"
    );

    // wait --synced waits for a change b has to defer.
    std::fs::write(a.path("held.txt"), b"first\n").expect("write held.txt on a");
    poll_until("held.txt on b", Duration::from_secs(60), || {
        (std::fs::read(b.path("held.txt")).ok()? == b"first\n").then_some(())
    });
    let held = std::fs::OpenOptions::new()
        .write(true)
        .open(b.path("held.txt"))
        .expect("open held.txt for writing on b");
    std::fs::write(a.path("held.txt"), b"second\n").expect("rewrite held.txt on a");
    poll_until("b to defer a's change", Duration::from_secs(60), || {
        let v = b.ctl().status();
        (v["sync"]["peers"][0]["deferred"].as_u64()? > 0).then_some(())
    });
    let out = b
        .ctl()
        .run_within(Duration::from_secs(2), &["wait", "--synced", "--json"]);
    exit(&out, 4, "wait --synced with a deferred change");
    let v = valid("wait", &out);
    assert_eq!(v["done"], false, "{v}");
    assert!(
        v["pending"]
            .as_str()
            .is_some_and(|p| p.contains(" waiting)") && !p.contains(", 0 waiting)")),
        "{v}"
    );
    assert!(
        stderr(&out).contains("keibictl: timed out after 2s"),
        "{}",
        stderr(&out)
    );
    drop(held);
    let out = b.ctl().run(&["wait", "--synced", "--json"]);
    exit(&out, 0, "wait --synced after the close");
    let v = valid("wait", &out);
    assert_eq!(v["done"], true, "{v}");
    assert_eq!(v["not_waited_for"], serde_json::json!([]), "{v}");
    assert_eq!(
        std::fs::read(b.path("held.txt")).expect("read held.txt on b"),
        b"second\n"
    );
    // The text form says it in words, with the plain progress lines (not
    // a terminal) on stderr only.
    let out = a.ctl().run(&["wait", "--synced"]);
    exit(&out, 0, "wait --synced (text)");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in sync\n");

    // Peer commands and their exit statuses.
    let v = valid(
        "peer-add",
        &a.ctl()
            .run(&["peer", "add", b.fingerprint(), "--name", "bee", "--json"]),
    );
    assert_eq!(v["name"], "bee", "{v}");
    let unknown = "A".repeat(52);
    let out = a.ctl().run(&["peer", "remove", &unknown, "--json"]);
    exit(&out, 3, "peer remove of an unknown peer");
    assert!(out.stdout.is_empty(), "no JSON on failure: {out:?}");
    exit(
        &a.ctl().run(&["peer", "add", "not-a-fingerprint", "--json"]),
        2,
        "peer add of a bad fingerprint",
    );
    let v = valid(
        "peer-remove",
        &b.ctl().run(&["peer", "remove", a.fingerprint(), "--json"]),
    );
    assert_eq!(v["fingerprint"].as_str(), Some(a.fingerprint()));
    exit(
        &b.ctl().run(&[
            "peer",
            "bench",
            a.fingerprint(),
            "--bytes",
            "1MiB",
            "--json",
        ]),
        3,
        "bench of a removed peer",
    );
    // With no peer left, wait --synced waits for local versioning only,
    // and says so.
    let out = b.ctl().run(&["wait", "--synced", "--json"]);
    exit(&out, 0, "wait --synced without peers");
    valid("wait", &out);
    assert!(stderr(&out).contains("no paired peers"), "{}", stderr(&out));
}

#[test]
fn exit_statuses_of_the_table_without_peers() {
    let (_w, mut fx) = setup(
        "cli-json-exit",
        Duration::from_secs(300),
        Options::default(),
    );
    let ctl = Ctl::new("solo", fx.control_socket());
    // 2: a bad command line.
    let out = keibictl(&["status", "--no-such-flag"]);
    exit(&out, 2, "bad flag");
    exit(&keibictl(&["wait", "--timeout", "0s"]), 2, "zero timeout");
    exit(&keibictl(&["prefetch"]), 2, "prefetch without a path");
    // 1: syncd unreachable.
    let absent = fx.root().join("absent.sock");
    let out = keibictl(&["--socket", s(&absent), "status", "--json"]);
    exit(&out, 1, "status without syncd");
    assert!(out.stdout.is_empty(), "no JSON without syncd: {out:?}");
    exit(
        &keibictl(&["--socket", s(&absent), "prefetch", "/x", "--timeout", "2s"]),
        1,
        "prefetch without syncd",
    );
    // 4: wait at its timeout, with the JSON still printed.
    let out = keibictl(&[
        "--socket",
        s(&absent),
        "wait",
        "--timeout",
        "500ms",
        "--json",
    ]);
    exit(&out, 4, "wait without syncd");
    let v = valid("wait", &out);
    assert_eq!(v["done"], false);
    assert!(v["sync"].is_null(), "{v}");
    // 0 and 1 of check: clean, then a content file removed behind
    // syncd's back.
    std::fs::write(fx.path("victim"), b"bytes").expect("write victim");
    let ino = std::fs::metadata(fx.path("victim"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("stat victim");
    // wait --synced with no peers at all: done once the new file is
    // versioned, and said on stderr. (Before the content file is removed
    // below: a file whose content is gone cannot be versioned, and stays
    // pending.)
    let out = ctl.run(&["wait", "--synced"]);
    exit(&out, 0, "wait --synced without peers");
    assert!(stderr(&out).contains("no paired peers"), "{}", stderr(&out));
    let out = ctl.run(&["check", "--json"]);
    exit(&out, 0, "check of a clean store");
    valid("check", &out);
    let content = fx.state_dir().join("content").join(format!("{ino:016x}"));
    std::fs::remove_file(&content).expect("remove the content file behind syncd's back");
    let out = ctl.run(&["check", "--json"]);
    exit(&out, 1, "check with an inconsistency");
    let v = valid("check", &out);
    assert_eq!(v["findings"][0]["kind"], "MissingContent", "{v}");
    // prefetch of a directory: exit 1.
    std::fs::create_dir(fx.path("dir")).expect("mkdir");
    let out = ctl.run(&["prefetch", s(&fx.path("dir")), "--json"]);
    exit(&out, 1, "prefetch of a directory");
    let v = valid("prefetch", &out);
    assert!(
        v["files"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("EINVAL")),
        "{v}"
    );

    // A frozen syncd: wait ends at its timeout, not later.
    fx.freeze_syncd();
    let started = std::time::Instant::now();
    let out = ctl.run_within(Duration::from_millis(1500), &["wait", "--synced"]);
    let took = started.elapsed();
    fx.thaw_syncd();
    exit(&out, 4, "wait --synced on a frozen syncd");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(stderr(&out).contains("did not answer"), "{}", stderr(&out));

    // wait without --synced is what a script runs after starting syncd:
    // started while syncd is down, it ends once syncd answers.
    let (st, clean) = fx.stop_syncd();
    assert!(clean && st.success(), "syncd stopped cleanly: {st}");
    let mut waiter = harness::daemons::spawn_registered(
        Command::new(binaries::binary("keibictl"))
            .arg("--socket")
            .arg(fx.control_socket())
            .args(["wait", "--timeout", "60s"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
        "keibictl wait",
    );
    // It is still waiting a moment later (syncd is down).
    let early = harness::wait::try_poll_until(Duration::from_millis(700), || {
        waiter.try_wait().expect("try_wait").map(|_| ())
    });
    assert!(early.is_none(), "keibictl wait ended while syncd was down");
    fx.start_syncd();
    let status = poll_until("keibictl wait to end", Duration::from_secs(60), || {
        waiter.try_wait().expect("try_wait")
    });
    let pid = waiter.id();
    let out = waiter.wait_with_output().expect("wait output");
    harness::watchdog::unregister_pid(pid);
    assert_eq!(status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "keibi-syncd answers\n"
    );
}
