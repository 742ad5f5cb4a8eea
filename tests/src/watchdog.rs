//! The last line of defence against a test that hangs.
//!
//! A test that blocks in the kernel on a FUSE request cannot be unwound, so
//! the fixture's `Drop` would never run. Each test arms a [`Watchdog`]; if
//! it is still armed when its limit passes, it kills every daemon and
//! detaches every mount that live fixtures registered here, prints what it
//! did, and aborts the test binary: a hung test fails loudly and leaves
//! nothing behind.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What live fixtures own, for emergency cleanup.
#[derive(Default)]
struct Live {
    pids: Vec<u32>,
    mounts: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    netns: Vec<String>,
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    pids: Vec::new(),
    mounts: Vec::new(),
    logs: Vec::new(),
    netns: Vec::new(),
});

fn live() -> std::sync::MutexGuard<'static, Live> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remember a child process to kill in an emergency.
pub fn register_pid(pid: u32) {
    live().pids.push(pid);
}

/// Forget a child process (it was reaped).
pub fn unregister_pid(pid: u32) {
    live().pids.retain(|p| *p != pid);
}

/// Remember a mount (FUSE or tmpfs) to detach in an emergency.
pub fn register_mount(path: PathBuf) {
    live().mounts.push(path);
}

/// Forget a mount.
pub fn unregister_mount(path: &std::path::Path) {
    live().mounts.retain(|p| p != path);
}

/// Remember a log file whose tail to print in an emergency.
pub fn register_log(path: PathBuf) {
    live().logs.push(path);
}

/// Forget a log file.
pub fn unregister_log(path: &std::path::Path) {
    live().logs.retain(|p| p != path);
}

/// Remember a network namespace to delete in an emergency.
pub fn register_netns(name: &str) {
    live().netns.push(name.to_string());
}

/// Forget a network namespace (it was deleted).
pub fn unregister_netns(name: &str) {
    live().netns.retain(|n| n != name);
}

/// Print straight to the process's stderr: `eprintln!` output is captured
/// by the test harness, and a captured message is lost when we abort.
fn say(text: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
    let _ = err.flush();
}

/// Kill everything registered and detach its mounts.
fn emergency_cleanup() {
    let (pids, mounts, logs, netns) = {
        let l = live();
        (
            l.pids.clone(),
            l.mounts.clone(),
            l.logs.clone(),
            l.netns.clone(),
        )
    };
    for log in &logs {
        say(&crate::daemons::log_tail(log, 40));
    }
    for pid in pids {
        // SAFETY: kill(2) with a pid we spawned; at worst it is gone already.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGCONT);
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    // Mounts were registered outermost last (tmpfs state dirs before the
    // FUSE mounts that use them): detach in reverse.
    for m in mounts.iter().rev() {
        let _ = nix::mount::umount2(m.as_path(), nix::mount::MntFlags::MNT_DETACH);
    }
    // Deleting a namespace also removes the veth end inside it.
    for ns in netns {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
    }
}

/// Aborts the test binary (after cleaning up) unless dropped within its
/// limit.
pub struct Watchdog {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::Thread>,
}

impl Watchdog {
    /// Arm a watchdog for the test `name`.
    pub fn arm(name: &str, limit: Duration) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let name = name.to_string();
        let handle = std::thread::Builder::new()
            .name(format!("watchdog-{name}"))
            .spawn(move || {
                let deadline = std::time::Instant::now() + limit;
                loop {
                    if flag.load(Ordering::SeqCst) {
                        return;
                    }
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        break;
                    }
                    std::thread::park_timeout(deadline - now);
                }
                say(&format!(
                    "WATCHDOG: test `{name}` still running after {limit:?}; killing its daemons, \
                     detaching its mounts and aborting"
                ));
                emergency_cleanup();
                std::process::abort();
            })
            .expect("spawn the watchdog thread");
        Watchdog {
            done,
            thread: Some(handle.thread().clone()),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.unpark();
        }
    }
}
