//! Single-instance locks (failure mode 4): two daemons started together on
//! one state directory (or one mountpoint), many times, leave exactly one
//! running, and the other exits with status 3 naming the survivor's pid; a
//! lock file removed or replaced under a running daemon lets no second one
//! in.

use harness::daemons::{control_answers, make_dir, mountd_command, syncd_command, terminate};
use harness::mounts::keibi_mounts_at;
use harness::process::wait_child;
use harness::{KeibiFixture, Options, SYNCD_UID, poll_until, setup, watchdog};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

const ROUNDS: usize = 20;

fn spawn(mut cmd: std::process::Command) -> Child {
    let c = cmd.spawn().expect("spawn a daemon");
    watchdog::register_pid(c.id());
    c
}

/// Wait until one of the two has exited; returns (loser index, its exit
/// code, survivor index).
fn first_to_exit(pair: &mut [Child; 2]) -> (usize, Option<i32>, usize) {
    poll_until(
        "one of the two daemons to exit",
        Duration::from_secs(20),
        || {
            for (i, child) in pair.iter_mut().enumerate() {
                if let Ok(Some(st)) = child.try_wait() {
                    watchdog::unregister_pid(child.id());
                    return Some((i, st.code(), 1 - i));
                }
            }
            None
        },
    )
}

fn read_log(p: &Path) -> String {
    String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned()
}

#[test]
fn two_syncd_on_one_state_dir_exactly_one_runs() {
    let (_w, fx) = setup("two syncd", Duration::from_secs(240), Options::default());
    let state = fx.root().join("state2");
    make_dir(&state, SYNCD_UID, SYNCD_UID, 0o700);
    let run = fx.run_dir();
    for round in 0..ROUNDS {
        let names = ["a", "b"];
        let logs: Vec<PathBuf> = names
            .iter()
            .map(|n| fx.root().join(format!("round{round}-{n}.log")))
            .collect();
        let socks: Vec<(PathBuf, PathBuf)> = names
            .iter()
            .map(|n| {
                (
                    run.join(format!("{n}-fs.sock")),
                    run.join(format!("{n}-ctl.sock")),
                )
            })
            .collect();
        let mut pair = [
            spawn(syncd_command(&state, &socks[0].0, &socks[0].1, &logs[0])),
            spawn(syncd_command(&state, &socks[1].0, &socks[1].1, &logs[1])),
        ];
        let (loser, code, winner) = first_to_exit(&mut pair);
        let winner_pid = pair[winner].id();
        let loser_log = read_log(&logs[loser]);
        assert_eq!(
            code,
            Some(3),
            "round {round}: the second syncd exits with status 3\n{loser_log}"
        );
        assert!(
            loser_log.contains(&winner_pid.to_string()),
            "round {round}: the refusal names the holder's pid {winner_pid}:\n{loser_log}"
        );
        let ctl = socks[winner].1.clone();
        let survivor = &mut pair[winner];
        poll_until(
            "the surviving syncd to answer on its control socket",
            Duration::from_secs(20),
            || {
                if let Ok(Some(st)) = survivor.try_wait() {
                    panic!(
                        "round {round}: the survivor exited too ({st})\n{}",
                        read_log(&logs[winner])
                    );
                }
                control_answers(&ctl).then_some(())
            },
        );
        let (st, clean) = terminate(survivor, Duration::from_secs(10));
        assert!(
            clean && st.success(),
            "round {round}: survivor stops cleanly ({st})"
        );
    }
}

#[test]
fn removed_or_replaced_syncd_lock_file_keeps_a_second_syncd_out() {
    let (_w, fx) = setup(
        "syncd lock file tampering",
        Duration::from_secs(120),
        Options::default(),
    );
    let holder = fx.syncd_pid().expect("syncd runs");
    let lock = fx.state_dir().join("lock");
    assert_eq!(
        fs::read_to_string(&lock)
            .expect("the lock file exists")
            .trim(),
        holder.to_string(),
        "the lock file holds syncd's pid"
    );
    for tamper in ["remove", "replace"] {
        match tamper {
            "remove" => fs::remove_file(&lock).expect("remove the lock file"),
            _ => fs::write(fx.state_dir().join("lock.tmp"), "1\n")
                .and_then(|_| fs::rename(fx.state_dir().join("lock.tmp"), &lock))
                .expect("replace the lock file"),
        }
        let log = fx.root().join(format!("second-{tamper}.log"));
        let mut second = spawn(syncd_command(
            &fx.state_dir(),
            &fx.run_dir().join("x-fs.sock"),
            &fx.run_dir().join("x-ctl.sock"),
            &log,
        ));
        let st = wait_child(&mut second, Duration::from_secs(20));
        if st.is_none() {
            terminate(&mut second, Duration::from_secs(5));
            panic!(
                "after the lock file was {tamper}d a second syncd started\n{}",
                read_log(&log)
            );
        }
        watchdog::unregister_pid(second.id());
        let text = read_log(&log);
        assert_eq!(
            st.and_then(|s| s.code()),
            Some(3),
            "{tamper}: exit 3\n{text}"
        );
        assert!(
            text.contains(&holder.to_string()),
            "{tamper}: names pid {holder}:\n{text}"
        );
        // The holder puts its lock file back (repair every 2 s).
        poll_until(
            "syncd to repair its lock file",
            Duration::from_secs(10),
            || (fs::read_to_string(&lock).ok()?.trim() == holder.to_string()).then_some(()),
        );
    }
    assert!(
        control_answers(&fx.control_socket()),
        "the holder still serves"
    );
    fs::write(fx.path("still-works"), b"y").expect("the mount still works");
}

fn mountd_anchor(fx: &KeibiFixture, mnt: &Path) -> PathBuf {
    ipc_schema::paths::mount_anchor(&fx.lock_dir(), mnt)
}

#[test]
fn two_mountd_on_one_mountpoint_exactly_one_runs() {
    let (_w, fx) = setup("two mountd", Duration::from_secs(300), Options::default());
    let mnt = fx.root().join("mnt2");
    make_dir(&mnt, 0, 0, 0o755);
    for round in 0..ROUNDS {
        let logs: Vec<PathBuf> = ["a", "b"]
            .iter()
            .map(|n| fx.root().join(format!("mountd-round{round}-{n}.log")))
            .collect();
        let cmd = |log: &Path| {
            mountd_command(
                &mnt,
                &fx.fs_socket(),
                &fx.lock_dir(),
                Duration::from_secs(2),
                true,
                log,
            )
        };
        watchdog::register_mount(mnt.clone());
        let mut pair = [spawn(cmd(&logs[0])), spawn(cmd(&logs[1]))];
        let (loser, code, winner) = first_to_exit(&mut pair);
        let winner_pid = pair[winner].id();
        let loser_log = read_log(&logs[loser]);
        assert_eq!(
            code,
            Some(3),
            "round {round}: the second mountd exits 3\n{loser_log}"
        );
        assert!(
            loser_log.contains(&winner_pid.to_string()),
            "round {round}: the refusal names the holder's pid {winner_pid}:\n{loser_log}"
        );
        let survivor = &mut pair[winner];
        poll_until("the survivor's mount", Duration::from_secs(20), || {
            if let Ok(Some(st)) = survivor.try_wait() {
                panic!(
                    "round {round}: the survivor exited too ({st})\n{}",
                    read_log(&logs[winner])
                );
            }
            (keibi_mounts_at(&mnt) >= 1 && fs::metadata(&mnt).is_ok()).then_some(())
        });
        assert_eq!(keibi_mounts_at(&mnt), 1, "round {round}: exactly one mount");
        let (st, clean) = terminate(survivor, Duration::from_secs(5));
        let unmounted = keibi_mounts_at(&mnt) == 0;
        harness::mounts::detach_all(&mnt);
        watchdog::unregister_mount(&mnt);
        assert!(
            clean && st.success() && unmounted,
            "round {round}: survivor stops cleanly and unmounts ({st}, unmounted {unmounted})"
        );
    }
    assert!(
        mountd_anchor(&fx, &mnt).join("lock").exists(),
        "mountd's lock file is at <lock dir>/<anchor>/lock"
    );
}

#[test]
fn removed_or_replaced_mountd_lock_file_keeps_a_second_mountd_out() {
    let (_w, fx) = setup(
        "mountd lock file tampering",
        Duration::from_secs(120),
        Options::default(),
    );
    let holder = fx.mountd_pid().expect("mountd runs");
    let lock = mountd_anchor(&fx, &fx.mnt()).join("lock");
    assert_eq!(
        fs::read_to_string(&lock)
            .unwrap_or_else(|e| panic!("{}: {e}", lock.display()))
            .trim(),
        holder.to_string()
    );
    for tamper in ["remove", "replace"] {
        match tamper {
            "remove" => fs::remove_file(&lock).expect("remove"),
            _ => fs::write(lock.with_extension("tmp"), "1\n")
                .and_then(|_| fs::rename(lock.with_extension("tmp"), &lock))
                .expect("replace"),
        }
        let log = fx.root().join(format!("mountd-second-{tamper}.log"));
        let mut second = spawn(mountd_command(
            &fx.mnt(),
            &fx.fs_socket(),
            &fx.lock_dir(),
            Duration::from_secs(2),
            true,
            &log,
        ));
        let st = wait_child(&mut second, Duration::from_secs(20));
        if st.is_none() {
            terminate(&mut second, Duration::from_secs(5));
            panic!(
                "after the lock file was {tamper}d a second mountd started\n{}",
                read_log(&log)
            );
        }
        watchdog::unregister_pid(second.id());
        let text = read_log(&log);
        assert_eq!(
            st.and_then(|s| s.code()),
            Some(3),
            "{tamper}: exit 3\n{text}"
        );
        assert!(
            text.contains(&holder.to_string()),
            "{tamper}: names pid {holder}:\n{text}"
        );
        assert_eq!(
            keibi_mounts_at(&fx.mnt()),
            1,
            "{tamper}: the mount was left alone"
        );
        fs::write(fx.path(format!("after-{tamper}")), b"ok").expect("the mount still works");
    }
}
