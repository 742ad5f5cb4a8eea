//! The opt-in metrics endpoints of keibi-syncd and keibi-mountd, on real
//! daemons and a real mount: each answers an HTTP GET on its Unix socket
//! with text that parses as OpenMetrics (`openmetrics-parser`, a strict
//! grammar), and its counters move when the test works on the mount; per
//! peer byte and chunk counters move when a file crosses between two
//! nodes; with no endpoint configured neither daemon listens on anything
//! new; a non-loopback TCP address is refused at start with a clear error.
//! The call counters also prove two of mountd's shortcuts: a directory
//! changed through the mount is stat'ed from the change's answer, and
//! `ls -l` of more files than the attribute cache holds asks syncd for
//! no extended attribute.

use harness::binaries::{mountd, syncd};
use harness::daemons::{KeibiFixture, Options};
use harness::mounts::keibi_mounts_at;
use harness::pair::{LinkMode, Pair, PairOptions, Side};
use harness::sync_helpers::wait_content;
use harness::{Watchdog, poll_until, run_bounded};
use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(240);
const WAIT: Duration = Duration::from_secs(20);

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// A directory for the metrics sockets that syncd (user `nobody`) can
/// create its socket in.
fn socket_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("kbm")
        .tempdir_in("/tmp")
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod the socket directory");
    dir
}

/// GET /metrics on the Unix socket at `path`: the status line, the
/// headers and the body.
fn get(path: &Path) -> (String, String) {
    let mut s = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connect to the metrics socket {}: {e}", path.display()));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: keibi\r\n\r\n")
        .expect("send the request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {answer:?}"));
    (head.to_string(), body.to_string())
}

/// Scrape and parse: a 200 answer of OpenMetrics text that the strict
/// parser accepts, with a Content-Length that matches.
fn scrape(path: &Path) -> (Exposition, String) {
    let (head, body) = get(path);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains(
            "\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"
        ),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
        "{head}"
    );
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&body)
        .unwrap_or_else(|e| panic!("not OpenMetrics text: {e:?}\n{body}"));
    (parsed, body)
}

/// The value of the sample of `family` with exactly `labels` (a counter's
/// or gauge's value, a histogram's count); 0 when the family has no such
/// sample yet (a labelled counter appears at its first increment).
fn value(exp: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    let Some(f) = exp.families.get(family) else {
        panic!(
            "no family {family}; families: {:?}",
            exp.families.keys().collect::<BTreeSet<_>>()
        )
    };
    for sample in f.iter_samples() {
        let set = sample.get_labelset().expect("labelset");
        let names: BTreeSet<&str> = set.iter_names().map(String::as_str).collect();
        let wanted: BTreeSet<&str> = labels.iter().map(|(k, _)| *k).collect();
        if names != wanted
            || labels
                .iter()
                .any(|(k, v)| set.get_label_value(k) != Some(*v))
        {
            continue;
        }
        return match &sample.value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Gauge(n) => n.as_f64(),
            OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0) as f64,
            other => panic!("{family}: unexpected value {other:?}"),
        };
    }
    0.0
}

/// Each family's `# TYPE` line and its first sample, for the test's log.
fn summary(body: &str) -> String {
    let mut seen = BTreeSet::new();
    body.lines()
        .filter(|l| l.starts_with("# TYPE") || !l.starts_with('#'))
        .filter(|l| {
            if l.starts_with('#') {
                return true;
            }
            let name = l.split(['{', ' ']).next().unwrap_or("");
            let family = name
                .trim_end_matches("_total")
                .trim_end_matches("_bucket")
                .trim_end_matches("_count")
                .trim_end_matches("_sum");
            seen.insert(family.to_string())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// mountd's calls to syncd (`keibi_mountd_syncd_calls`, either result)
/// whose op `keep` accepts.
fn mountd_calls(e: &Exposition, keep: impl Fn(&str) -> bool) -> f64 {
    e.families.get("keibi_mountd_syncd_calls").map_or(0.0, |f| {
        f.iter_samples()
            .filter(|s| {
                s.get_labelset()
                    .is_ok_and(|l| l.get_label_value("op").is_some_and(&keep))
            })
            .map(|s| match &s.value {
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                _ => 0.0,
            })
            .sum()
    })
}

fn with_metrics(dir: &Path) -> Options {
    Options {
        syncd_args: vec![
            "--metrics-socket".into(),
            dir.join("syncd.sock").display().to_string(),
        ],
        mountd_args: vec![
            "--metrics-socket".into(),
            dir.join("mountd.sock").display().to_string(),
        ],
        ..Options::default()
    }
}

#[test]
fn both_endpoints_parse_and_their_counters_move_with_work_on_the_mount() {
    let _w = Watchdog::arm("metrics_move", LIMIT);
    let dir = socket_dir();
    let (m_sock, s_sock) = (
        dir.path().join("mountd.sock"),
        dir.path().join("syncd.sock"),
    );
    let fx = KeibiFixture::start(with_metrics(dir.path()));
    let (fresh, text) = scrape(&m_sock);
    println!("--- keibi-mountd, fresh mount:\n{}", summary(&text));
    let (s_fresh, s_text) = scrape(&s_sock);
    println!("--- keibi-syncd, fresh mount:\n{}", summary(&s_text));
    assert_eq!(value(&fresh, "keibi_mountd_syncd_connected", &[]), 1.0);
    assert_eq!(value(&fresh, "keibi_mountd_open_handles", &[]), 0.0);
    assert_eq!(value(&s_fresh, "keibi_syncd_mounts_connected", &[]), 1.0);

    // Work: a directory, a file created and written, opened again and
    // held open.
    std::fs::create_dir(fx.path("d")).expect("mkdir");
    std::fs::write(fx.path("d/a.txt"), b"hello metrics").expect("write");
    let held = std::fs::File::open(fx.path("d/a.txt")).expect("open");
    assert_eq!(
        std::fs::read(fx.path("d/a.txt")).expect("read"),
        b"hello metrics"
    );
    // A name the kernel no longer caches is looked up in syncd (the
    // kernel drops unused entries on `drop_caches`); a missing name in d,
    // a directory made through this mount, is answered by mountd itself.
    std::fs::write(fx.path("d/b.txt"), b"b").expect("write b");
    std::fs::write("/proc/sys/vm/drop_caches", b"2").expect("echo 2 > drop_caches");
    assert_eq!(
        std::fs::metadata(fx.path("d/b.txt")).expect("stat b").len(),
        1
    );
    assert!(std::fs::metadata(fx.path("d/not-there")).is_err());

    let (after, _) = scrape(&m_sock);
    let absent = "keibi_mountd_lookups_answered_absent";
    assert!(
        value(&after, absent, &[]) > value(&fresh, absent, &[]),
        "{absent} did not move"
    );
    for op in ["mkdir", "create", "open", "lookup"] {
        let ok = [("op", op), ("result", "ok")];
        let (b, a) = (
            value(&fresh, "keibi_mountd_fuse_operations", &ok),
            value(&after, "keibi_mountd_fuse_operations", &ok),
        );
        assert!(a > b, "fuse_operations{{op={op}}}: {b} before, {a} after");
        let d = "keibi_mountd_fuse_operation_duration_seconds";
        assert!(
            value(&after, d, &[("op", op)]) > value(&fresh, d, &[("op", op)]),
            "{d}{{op={op}}} did not move"
        );
    }
    for call in ["mkdir", "create", "open"] {
        let ok = [("op", call), ("result", "ok")];
        assert!(
            value(&after, "keibi_mountd_syncd_calls", &ok)
                > value(&fresh, "keibi_mountd_syncd_calls", &ok),
            "syncd_calls{{op={call}}} did not move"
        );
        let d = "keibi_mountd_syncd_call_duration_seconds";
        assert!(value(&after, d, &[("op", call)]) >= 1.0, "{d}{{op={call}}}");
    }
    assert!(
        value(&after, "keibi_mountd_open_handles", &[]) >= 1.0,
        "a file is held open"
    );

    let (s_after, _) = scrape(&s_sock);
    for method in ["mkdir", "create", "open", "lookup"] {
        let ok = [("method", method), ("result", "ok")];
        assert!(
            value(&s_after, "keibi_syncd_ipc_requests", &ok)
                > value(&s_fresh, "keibi_syncd_ipc_requests", &ok),
            "ipc_requests{{method={method}}} did not move"
        );
        let d = "keibi_syncd_ipc_request_duration_seconds";
        assert!(
            value(&s_after, d, &[("method", method)]) >= 1.0,
            "{d}{{method={method}}}"
        );
    }
    // The store's figures come from the census, a scan started by the
    // scrape: a later scrape shows the new file.
    poll_until("store_files to count the new file", WAIT, || {
        let (s, _) = scrape(&s_sock);
        (value(&s, "keibi_syncd_store_files", &[]) >= 1.0
            && value(&s, "keibi_syncd_store_bytes", &[]) >= 13.0)
            .then_some(())
    });

    drop(held);
    poll_until(
        "open_handles to fall back to 0 after the close",
        WAIT,
        || {
            let (m, _) = scrape(&m_sock);
            (value(&m, "keibi_mountd_open_handles", &[]) == 0.0).then_some(())
        },
    );
    // Both remove their socket files when they stop.
    let mut fx = fx;
    fx.stop_mountd();
    fx.stop_syncd();
    assert!(!m_sock.exists(), "keibi-mountd left {}", m_sock.display());
    assert!(!s_sock.exists(), "keibi-syncd left {}", s_sock.display());
}

#[test]
fn a_directory_changed_through_the_mount_is_stat_without_asking_syncd() {
    let _w = Watchdog::arm("metrics_dir_changes", LIMIT);
    let dir = socket_dir();
    let m_sock = dir.path().join("mountd.sock");
    let fx = KeibiFixture::start(with_metrics(dir.path()));
    let d = fx.path("d");
    std::fs::create_dir(&d).expect("mkdir d");
    std::fs::metadata(&d).expect("stat d");
    const N: usize = 40;
    let from_changes = "keibi_mountd_getattrs_answered_from_changes";
    let getattrs = |e: &Exposition| mountd_calls(e, |op| op == "getattr");
    let (before, _) = scrape(&m_sock);
    // Each change of d's names makes the kernel drop d's attributes; the
    // `stat` of d after it is answered with those its answer carried.
    for i in 0..N {
        std::fs::write(d.join(format!("f{i}")), b"x").expect("create");
        std::fs::metadata(&d).expect("stat d after a create");
    }
    std::fs::create_dir(d.join("sub")).expect("mkdir d/sub");
    let after_mkdir = std::fs::metadata(&d).expect("stat d after mkdir");
    std::fs::rename(d.join("f0"), d.join("g0")).expect("rename");
    std::fs::metadata(&d).expect("stat d after rename");
    let mut last = after_mkdir.clone();
    for i in 1..N {
        std::fs::remove_file(d.join(format!("f{i}"))).expect("unlink");
        last = std::fs::metadata(&d).expect("stat d after an unlink");
    }
    let (after, _) = scrape(&m_sock);
    let answered = value(&after, from_changes, &[]) - value(&before, from_changes, &[]);
    let asked = getattrs(&after) - getattrs(&before);
    assert!(
        answered >= (2 * N) as f64,
        "{answered} of the {} stats of d after a change were answered from its answer",
        2 * N + 1
    );
    assert!(
        asked < (N / 2) as f64,
        "{asked} getattr calls reached syncd for {} stats of d",
        2 * N + 1
    );
    // Once only: after the kernel dropped d, its attributes come from
    // syncd again, and they are the ones the last change answered.
    std::fs::write("/proc/sys/vm/drop_caches", b"2").expect("echo 2 > drop_caches");
    let (cached, _) = scrape(&m_sock);
    let now = std::fs::metadata(&d).expect("stat d");
    let (asked_now, _) = scrape(&m_sock);
    assert_eq!(
        value(&asked_now, from_changes, &[]),
        value(&cached, from_changes, &[]),
        "answered twice from one change"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(after_mkdir.nlink(), 3, "d with one subdirectory");
    assert_eq!(
        (
            last.nlink(),
            last.mtime(),
            last.mtime_nsec(),
            last.ctime(),
            last.ctime_nsec()
        ),
        (
            now.nlink(),
            now.mtime(),
            now.mtime_nsec(),
            now.ctime(),
            now.ctime_nsec()
        ),
        "the last unlink's answer and syncd disagree on d"
    );
}

/// `ls -l` asks the extended attributes of every file; mountd answers
/// those of an inode known to have none itself. Here its attribute cache
/// holds 16 inodes and the listing 300: the knowledge kept beside the
/// kernel's lookup count of each inode it holds must answer them all, and
/// must not hide the one attribute that is set.
#[test]
fn listing_more_files_than_the_attribute_cache_asks_syncd_no_xattr_and_hides_none() {
    let _w = Watchdog::arm("metrics_xattrs_held", LIMIT);
    let dir = socket_dir();
    let m_sock = dir.path().join("mountd.sock");
    let mut opts = with_metrics(dir.path());
    opts.mountd_args
        .extend(["--attr-cache".into(), "16".into()]);
    let fx = KeibiFixture::start(opts);
    let d = fx.path("d");
    std::fs::create_dir(&d).expect("mkdir d");
    const N: usize = 300;
    for i in 0..N {
        std::fs::write(d.join(format!("f{i:03}")), b"x").expect("create");
    }
    harness::sys::setxattr(&d.join("f150"), "user.k", b"v", 0).expect("setxattr");
    // The kernel forgets every inode; the listing gives them all again
    // (readdirplus), far more than the cache keeps.
    std::fs::write("/proc/sys/vm/drop_caches", b"2").expect("echo 2 > drop_caches");
    let xattr_calls = |e: &Exposition| mountd_calls(e, |op| op.contains("xattr"));
    let listed = run_bounded(
        Command::new("ls").arg("-l").arg(&d),
        Duration::from_secs(60),
    );
    assert!(listed.status.success(), "ls -l: {listed:?}");
    let lines = String::from_utf8_lossy(&listed.stdout).lines().count();
    assert_eq!(lines, N + 1, "ls -l lists every file (and its total line)");
    let (before, _) = scrape(&m_sock);
    for i in (0..N).filter(|&i| i != 150) {
        let p = d.join(format!("f{i:03}"));
        let e = harness::sys::getxattr(&p, "user.k").expect_err("no such attribute");
        assert_eq!(e.raw_os_error(), Some(libc::ENODATA), "{}", p.display());
        assert!(harness::sys::listxattr(&p).expect("listxattr").is_empty());
    }
    let (after, _) = scrape(&m_sock);
    assert_eq!(
        xattr_calls(&after) - xattr_calls(&before),
        0.0,
        "xattr calls reached syncd for files known to have none"
    );
    // The one that has an attribute is asked for, and shown.
    assert_eq!(
        harness::sys::getxattr(&d.join("f150"), "user.k").expect("getxattr"),
        b"v"
    );
    let (asked, _) = scrape(&m_sock);
    assert!(
        xattr_calls(&asked) - xattr_calls(&after) >= 1.0,
        "the file with an attribute was answered without syncd"
    );
}

#[test]
fn mountd_counts_deadline_misses_and_answers_scrapes_while_syncd_is_frozen() {
    let _w = Watchdog::arm("metrics_deadline", LIMIT);
    let dir = socket_dir();
    let m_sock = dir.path().join("mountd.sock");
    let fx = KeibiFixture::start(with_metrics(dir.path()));
    let (before, _) = scrape(&m_sock);
    let misses = |e: &Exposition| {
        e.families
            .get("keibi_mountd_syncd_deadline_misses")
            .map_or(0.0, |f| {
                f.iter_samples()
                    .map(|s| match &s.value {
                        OpenMetricsValue::Counter(c) => c.value.as_f64(),
                        _ => 0.0,
                    })
                    .sum()
            })
    };
    assert_eq!(misses(&before), 0.0);
    // The fixture stat'ed the root when the mount came up. The stream of
    // invalidations started where syncd's stood before it answered this
    // mount anything, so no `All` dropped that: a `stat` of the root now
    // reaches nothing, and the one below waits on its lookup alone.
    let started = poll_until("mountd's invalidation stream to start", WAIT, || {
        fx.mountd_log()
            .lines()
            .find(|l| l.contains("invalidation stream started"))
            .map(str::to_owned)
    });
    assert!(
        started.contains("epoch=") && !started.contains("epoch=0 "),
        "the stream started from everything, not where syncd stood: {started}"
    );
    let calls = |e: &Exposition| mountd_calls(e, |op| op != "changes");
    let (settled, _) = scrape(&m_sock);
    std::fs::metadata(fx.mnt()).expect("stat the mount's root");
    let (after_stat, _) = scrape(&m_sock);
    assert_eq!(
        calls(&after_stat),
        calls(&settled),
        "the root's attributes were not cached when the stream started: {:?}",
        after_stat.families.get("keibi_mountd_syncd_calls")
    );
    fx.freeze_syncd();
    // A name never looked up: mountd must ask syncd, which cannot answer.
    let r = std::fs::metadata(fx.path("never-seen"));
    assert!(r.is_err(), "a lookup answered while syncd is frozen: {r:?}");
    let (during, _) = scrape(&m_sock);
    fx.thaw_syncd();
    assert!(
        value(
            &during,
            "keibi_mountd_syncd_deadline_misses",
            &[("op", "lookup")]
        ) >= 1.0,
        "no deadline miss of lookup counted: {:?}",
        during.families.get("keibi_mountd_syncd_deadline_misses")
    );
    assert!(
        value(
            &during,
            "keibi_mountd_syncd_calls",
            &[("op", "lookup"), ("result", "error")]
        ) >= 1.0
    );
}

#[test]
fn per_peer_bytes_and_chunks_move_when_a_file_crosses() {
    let _w = Watchdog::arm("metrics_peer", LIMIT);
    let dir = socket_dir();
    let s_sock = dir.path().join("a-syncd.sock");
    let mut p = Pair::start(PairOptions::new(LinkMode::Loopback));
    // Only a's syncd serves metrics (both share one config template):
    // restart it with the flag.
    p.a.fx_mut().stop_syncd();
    p.a.fx_mut().options_mut().syncd_args =
        vec!["--metrics-socket".into(), s_sock.display().to_string()];
    p.restart_syncd(Side::A);
    p.wait_connected(WAIT);
    let b_label: String = p.b.fingerprint().chars().take(8).collect();
    let (before, _) = scrape(&s_sock);
    assert_eq!(value(&before, "keibi_syncd_peers_connected", &[]), 1.0);
    assert_eq!(value(&before, "keibi_syncd_peers_paired", &[]), 1.0);
    let received = |e: &Exposition, family: &str| {
        value(
            e,
            family,
            &[("peer", b_label.as_str()), ("direction", "received")],
        )
    };

    // 300 KiB: more than one chunk, fetched eagerly on arrival.
    let content: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(p.b.path("crossing.bin"), &content).expect("write on b");
    wait_content(&p.a.path("crossing.bin"), &content, WAIT);
    let (after, _) = scrape(&s_sock);
    let bytes =
        received(&after, "keibi_syncd_peer_bytes") - received(&before, "keibi_syncd_peer_bytes");
    assert!(
        bytes >= content.len() as f64,
        "a received {bytes} bytes from b for a {} byte file",
        content.len()
    );
    assert!(
        value(
            &after,
            "keibi_syncd_peer_bytes",
            &[("peer", b_label.as_str()), ("direction", "sent")]
        ) > 0.0
    );
    let chunks =
        received(&after, "keibi_syncd_peer_chunks") - received(&before, "keibi_syncd_peer_chunks");
    assert!(chunks >= 2.0, "{chunks} chunks received from b");
    assert!(value(&after, "keibi_syncd_chunk_fetches", &[("result", "ok")]) >= 2.0);
}

#[test]
fn without_an_endpoint_neither_daemon_listens_on_anything_new() {
    let _w = Watchdog::arm("metrics_off", LIMIT);
    let fx = KeibiFixture::start_default();
    let listening = |pid: u32| -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for proto in ["-xlpn", "-tlpn", "-ulpn"] {
            let o = run_bounded(Command::new("ss").arg(proto), Duration::from_secs(30));
            assert!(o.status.success(), "ss {proto}: {o:?}");
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if line.contains(&format!("pid={pid},")) {
                    let local = line.split_whitespace().nth(4).unwrap_or("?");
                    out.insert(local.to_string());
                }
            }
        }
        out
    };
    let syncd = listening(fx.syncd_pid().expect("syncd runs"));
    let expected: BTreeSet<String> = [fx.fs_socket(), fx.control_socket()]
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(
        syncd, expected,
        "keibi-syncd listens on more than its two sockets"
    );
    let mountd = listening(fx.mountd_pid().expect("mountd runs"));
    assert_eq!(mountd.len(), 1, "keibi-mountd listens on {mountd:?}");
    assert!(
        mountd.iter().all(|s| s.ends_with("/ops.sock")),
        "keibi-mountd listens on {mountd:?}, not only its ops socket"
    );
    assert!(!fx.syncd_log().contains("serving metrics"));
    assert!(!fx.mountd_log().contains("serving metrics"));
}

#[test]
fn a_non_loopback_metrics_address_is_refused_at_start_with_a_clear_error() {
    let _w = Watchdog::arm("metrics_refused", LIMIT);
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let out = run_bounded(
        Command::new(mountd())
            .arg(&mnt)
            .args(["--syncd-socket", "/nonexistent/fs.sock", "--lock-dir"])
            .arg(dir.path().join("locks"))
            .args(["--metrics-listen", "0.0.0.0:9811"]),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\"0.0.0.0:9811\" is not a loopback address"),
        "{err}"
    );
    assert_eq!(keibi_mounts_at(&mnt), 0, "a refused start left a mount");
    assert!(
        !dir.path().join("locks").exists(),
        "refused before anything"
    );
    // A socket that cannot be bound stops mountd before it mounts.
    let out = run_bounded(
        Command::new(mountd())
            .arg(&mnt)
            .args(["--syncd-socket", "/nonexistent/fs.sock", "--lock-dir"])
            .arg(dir.path().join("locks"))
            .arg("--metrics-socket")
            .arg(dir.path().join("no-such-dir/metrics.sock")),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot serve metrics on unix:"), "{err}");
    assert_eq!(keibi_mounts_at(&mnt), 0, "a failed start left a mount");

    let state: PathBuf = dir.path().join("state");
    let out = run_bounded(
        Command::new(syncd())
            .arg("--allow-root")
            .arg("--state-dir")
            .arg(&state)
            .args(["--metrics-listen", "192.0.2.7:9810"]),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("\"192.0.2.7:9810\" is not a loopback address"),
        "{err}"
    );
    assert!(!state.exists(), "syncd created its state before refusing");

    let file = dir.path().join("syncd.toml");
    std::fs::write(&file, "metrics_listen = \"[::]:9810\"\n").expect("write");
    let out = run_bounded(
        Command::new(syncd()).arg("--check-config").arg(&file),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a loopback address"), "{err}");
    std::fs::write(&file, "metrics_listen = \"127.0.0.1:9810\"\n").expect("write");
    let out = run_bounded(
        Command::new(syncd()).arg("--check-config").arg(&file),
        Duration::from_secs(30),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("metrics_listen = \"127.0.0.1:9810\""),
        "{said}"
    );
}
