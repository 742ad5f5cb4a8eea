//! Liveness (failure modes 1 and 3): a frozen or dead syncd never makes
//! the mount hang. With syncd stopped by SIGSTOP, `stat`, `ls` and reads on
//! open handles return within mountd's deadline plus one second; after
//! SIGCONT everything works; a syncd killed and restarted is reconnected
//! without a remount; a process killed while syncd is frozen dies at once.

use harness::process::wait_child;
use harness::{KeibiFixture, Options, bounded, poll_until, setup};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);

/// mountd's deadline plus the one second the contract allows.
fn bound(fx: &KeibiFixture) -> Duration {
    fx.options().deadline + Duration::from_secs(1)
}

/// Run `op` with the bound; panics if it does not return in time.
fn within<T: Send + 'static>(
    fx: &KeibiFixture,
    what: &str,
    op: impl FnOnce() -> T + Send + 'static,
) -> T {
    let limit = bound(fx);
    let started = Instant::now();
    match bounded(limit, op) {
        Ok(v) => {
            eprintln!("{what}: returned in {:?}", started.elapsed());
            v
        }
        Err(waited) => panic!("{what} did not return within {limit:?} (waited {waited:?})"),
    }
}

/// Forget cached dentries and inodes so the next lookups reach mountd
/// instead of being answered from the kernel's caches.
fn drop_kernel_caches() {
    fs::write("/proc/sys/vm/drop_caches", "2").expect("write /proc/sys/vm/drop_caches");
}

/// Run `ls -l dir` as a child process and wait at most `limit`; returns
/// whether it succeeded. Panics if it hangs.
fn ls_within(dir: &Path, limit: Duration) -> bool {
    let mut child = Command::new("ls")
        .arg("-l")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ls");
    match wait_child(&mut child, limit) {
        Some(st) => st.success(),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ls -l {} did not return within {limit:?}", dir.display())
        }
    }
}

#[test]
fn frozen_syncd_stat_ls_and_open_handles_answer_within_the_deadline_passthrough() {
    frozen_syncd(true);
}

#[test]
fn frozen_syncd_stat_ls_and_open_handles_answer_within_the_deadline_plain() {
    frozen_syncd(false);
}

fn frozen_syncd(passthrough: bool) {
    let (_w, fx) = setup(
        "liveness SIGSTOP",
        LIMIT,
        Options {
            passthrough,
            ..Options::default()
        },
    );
    let known = fx.path("known");
    fs::write(&known, b"known bytes").expect("write");
    fs::create_dir(fx.path("dir")).expect("mkdir");
    for i in 0..20 {
        fs::write(fx.path(format!("dir/f{i}")), b"x").expect("write");
    }
    let known_md = fs::metadata(&known).expect("stat known");
    // Seen by mountd but not held open: its dentry can be dropped, so a
    // stat of it must reach mountd (the open file's dentry stays pinned).
    let seen = fx.path("dir/f7");
    let seen_md = fs::metadata(&seen).expect("stat seen");
    assert!(
        ls_within(&fx.path("dir"), Duration::from_secs(10)),
        "ls before the freeze"
    );
    let handle = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&known)
        .expect("open before the freeze");

    fx.freeze_syncd();
    drop_kernel_caches();

    let p = seen.clone();
    let md = within(&fx, "stat of a file mountd has seen", move || {
        fs::metadata(&p)
    })
    .expect("stat of a seen file while syncd is frozen answers the last known entry");
    assert_eq!((md.ino(), md.len()), (seen_md.ino(), seen_md.len()));

    let p = known.clone();
    let md = within(&fx, "stat of a known file", move || fs::metadata(&p))
        .expect("stat of a known file while syncd is frozen answers the last known attributes");
    assert_eq!((md.ino(), md.len()), (known_md.ino(), known_md.len()));

    let started = Instant::now();
    let ok = ls_within(&fx.path("dir"), bound(&fx));
    eprintln!(
        "ls -l dir while frozen: success {ok}, {:?}",
        started.elapsed()
    );

    let h = handle.try_clone().expect("dup");
    let got = within(&fx, "read on an open handle", move || {
        let mut buf = [0u8; 11];
        h.read_exact_at(&mut buf, 0).map(|_| buf)
    })
    .expect("read on an open handle while syncd is frozen");
    assert_eq!(&got, b"known bytes");

    let h = handle.try_clone().expect("dup");
    within(&fx, "write on an open handle", move || {
        h.write_all_at(b"KNOWN", 0)
    })
    .expect("write on an open handle while syncd is frozen");

    let p = fx.path("never-seen");
    let r = within(&fx, "stat of a never-seen name", move || fs::metadata(&p));
    assert!(
        r.is_err(),
        "a name mountd never saw cannot be answered from its cache"
    );

    let p = fx.path("new-while-frozen");
    let r = within(&fx, "create while frozen", move || fs::write(&p, b"x"));
    assert!(
        r.is_err(),
        "a create needs syncd: it fails (ETIMEDOUT), it does not hang"
    );

    fx.thaw_syncd();
    fx.wait_writable(Duration::from_secs(10));
    assert!(
        ls_within(&fx.path("dir"), Duration::from_secs(10)),
        "ls after SIGCONT"
    );
    assert_eq!(
        fs::read(&known).expect("read after SIGCONT"),
        b"KNOWN bytes"
    );
    fs::write(fx.path("after"), b"after").expect("create after SIGCONT");
    assert_eq!(fs::read(fx.path("after")).expect("read"), b"after");
    drop(handle);
    fx.assert_io_path();
}

#[test]
fn syncd_killed_and_restarted_the_mount_recovers_without_remount() {
    let (_w, mut fx) = setup("liveness kill -9", LIMIT, Options::default());
    let p = fx.path("held");
    fs::write(&p, b"before restart").expect("write");
    let handle = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open");
    // Durable before the crash: kill -9 may lose what was never fsynced
    // (then the restarted syncd rightly does not know the inode).
    handle.sync_all().expect("fsync before the crash");
    let mountd_pid = fx.mountd_pid();
    fx.kill9_syncd();

    // Dead syncd: answers still come within the bound.
    let q = p.clone();
    within(&fx, "stat with syncd dead", move || fs::metadata(&q))
        .expect("stat of a known file with syncd dead");
    let h = handle.try_clone().expect("dup");
    within(&fx, "read with syncd dead", move || {
        let mut b = [0u8; 6];
        h.read_exact_at(&mut b, 0).map(|_| b)
    })
    .expect("read on an open handle with syncd dead");

    fx.start_syncd();
    fx.wait_writable(Duration::from_secs(20));
    assert_eq!(fx.mountd_pid(), mountd_pid, "same mountd");
    assert_eq!(
        harness::mounts::keibi_mounts_at(&fx.mnt()),
        1,
        "same single mount"
    );

    let mut buf = [0u8; 14];
    handle
        .read_exact_at(&mut buf, 0)
        .expect("read on a handle opened before the restart");
    assert_eq!(&buf, b"before restart");
    handle
        .write_all_at(b"AFTER!", 0)
        .expect("write on a handle opened before the restart");
    handle
        .sync_all()
        .expect("fsync on a handle opened before the restart");
    drop(handle);
    assert_eq!(fs::read(&p).expect("read"), b"AFTER! restart");
    fs::write(fx.path("new"), b"new").expect("create after restart");
}

/// A process holding a written file on the mount, killed while syncd is
/// frozen, must die at once; `ns` runs it in a fresh pid namespace.
fn killed_writer_is_reaped(ns: bool) {
    let (_w, fx) = setup(
        if ns {
            "liveness pid namespace"
        } else {
            "liveness plain kill"
        },
        LIMIT,
        Options::default(),
    );
    let file = fx.path("written");
    let marker = fx.scratch().join("ready");
    let script = format!(
        "exec 3>>'{}'; printf 'payload-from-dying-process' >&3; echo ready > '{}'; exec sleep 600",
        file.display(),
        marker.display()
    );
    let mut cmd = if ns {
        let mut c = Command::new("unshare");
        c.args(["--pid", "--fork", "--kill-child", "sh", "-c", &script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the writer (util-linux unshare)");
    let child_pid = child.id();
    poll_until(
        "the writer to open and write its file",
        Duration::from_secs(20),
        || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("the writer exited early: {st}");
            }
            marker.exists().then_some(())
        },
    );
    let inner = if ns {
        children_of(child_pid)
    } else {
        Vec::new()
    };
    assert!(
        !ns || !inner.is_empty(),
        "the namespace's init process is visible"
    );

    fx.freeze_syncd();
    let started = Instant::now();
    let _ = child.kill();
    let status = wait_child(&mut child, Duration::from_secs(5));
    assert!(
        status.is_some(),
        "the killed writer was not reaped within 5 s while syncd was frozen"
    );
    for pid in inner {
        poll_until(
            &format!("pid {pid} in the namespace to exit"),
            Duration::from_secs(5),
            || exited(pid).then_some(()),
        );
    }
    eprintln!("killed and reaped in {:?}", started.elapsed());

    fx.thaw_syncd();
    fx.wait_writable(Duration::from_secs(10));
    assert_eq!(
        fs::read(&file).expect("read after SIGCONT"),
        b"payload-from-dying-process"
    );
    let mut f = OpenOptions::new().append(true).open(&file).expect("reopen");
    f.write_all(b"+more").expect("append");
    drop(f);
    assert_eq!(
        fs::read(&file).expect("read"),
        b"payload-from-dying-process+more"
    );
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    for t in fs::read_dir(tasks).into_iter().flatten().flatten() {
        let text = fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|s| s.parse::<u32>().ok()),
        );
    }
    out
}

/// Gone, or a zombie waiting for a parent that is not us: either way no
/// longer running or stuck in the kernel.
fn exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

#[test]
fn process_killed_in_a_pid_namespace_while_syncd_is_frozen_is_reaped() {
    killed_writer_is_reaped(true);
}

#[test]
fn process_killed_plainly_while_syncd_is_frozen_is_reaped() {
    killed_writer_is_reaped(false);
}

#[test]
fn mountd_sigterm_unmounts_and_a_dead_mount_is_cleared_at_start() {
    let (_w, mut fx) = setup("mountd stop and dead mount", LIMIT, Options::default());
    fs::write(fx.path("kept"), b"kept").expect("write");
    let (status, by_itself, unmounted) = fx.stop_mountd();
    assert!(
        by_itself && status.success(),
        "mountd exits 0 on SIGTERM ({status})"
    );
    assert!(unmounted, "mountd unmounts on SIGTERM");
    fx.start_mountd();
    assert_eq!(fs::read(fx.path("kept")).expect("read"), b"kept");

    fx.kill9_mountd();
    // A directory listing always reaches the daemon (stat may be answered
    // from the kernel's attribute cache).
    let m = fx.mnt();
    let dead = bounded(Duration::from_secs(5), move || fs::read_dir(&m).map(drop))
        .expect("readdir of a dead mount returns");
    assert_eq!(
        dead.err().and_then(|e| e.raw_os_error()),
        Some(libc::ENOTCONN),
        "after kill -9 the mount is dead"
    );
    assert_eq!(
        harness::mounts::keibi_mounts_at(&fx.mnt()),
        1,
        "the dead mount is still there"
    );
    fx.start_mountd();
    assert_eq!(
        harness::mounts::keibi_mounts_at(&fx.mnt()),
        1,
        "the dead mount was cleared, not stacked on"
    );
    assert_eq!(fs::read(fx.path("kept")).expect("read"), b"kept");
}

/// The contract: reads and writes on an open handle never need syncd (they
/// are `pread`/`pwrite` on mountd's descriptor, or kernel passthrough). So
/// the first write after syncd froze must not wait for mountd's deadline;
/// half of it is the bound here, far above a local write's cost.
fn open_handle_io_does_not_wait_for_syncd(passthrough: bool) {
    let (_w, fx) = setup(
        "open-handle I/O with syncd frozen",
        LIMIT,
        Options {
            passthrough,
            ..Options::default()
        },
    );
    fs::write(fx.path("f"), b"hello").expect("write");
    let h = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.path("f"))
        .expect("open");
    h.write_all_at(b"H", 0).expect("write before the freeze");
    fx.freeze_syncd();
    let limit = fx.options().deadline / 2;
    let h2 = h.try_clone().expect("dup");
    let started = Instant::now();
    let r = bounded(bound(&fx), move || h2.write_all_at(b"E", 1))
        .unwrap_or_else(|w| panic!("a write on an open handle hung ({w:?})"));
    let took = started.elapsed();
    r.expect("a write on an open handle while syncd is frozen");
    assert!(
        took < limit,
        "the first write on an open handle took {took:?} with syncd frozen: it waited on syncd \
         (bound {limit:?})"
    );
    let h2 = h.try_clone().expect("dup");
    let started = Instant::now();
    let got = bounded(bound(&fx), move || {
        let mut b = [0u8; 5];
        h2.read_exact_at(&mut b, 0).map(|_| b)
    })
    .unwrap_or_else(|w| panic!("a read on an open handle hung ({w:?})"))
    .expect("read");
    let took = started.elapsed();
    assert_eq!(&got, b"HEllo");
    assert!(
        took < limit,
        "a read on an open handle took {took:?} with syncd frozen"
    );
    fx.thaw_syncd();
    fx.assert_io_path();
}

#[test]
fn open_handle_io_does_not_wait_for_a_frozen_syncd_passthrough() {
    open_handle_io_does_not_wait_for_syncd(true);
}

#[test]
fn open_handle_io_does_not_wait_for_a_frozen_syncd_plain() {
    open_handle_io_does_not_wait_for_syncd(false);
}
