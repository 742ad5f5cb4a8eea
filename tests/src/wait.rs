//! Waiting without sleeping for a guess: [`poll_until`] checks a condition
//! with short growing pauses until it holds or a deadline passes, and
//! [`bounded`] runs work that may block in the kernel on another thread and
//! gives up on it after a limit.

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Poll `check` until it returns `Some`, for at most `timeout`; panics
/// naming `what` when the deadline passes.
pub fn poll_until<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    match try_poll_until(timeout, check) {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Poll `check` until it returns `Some`, for at most `timeout`; `None` when
/// the deadline passed.
pub fn try_poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::park_timeout(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Run `work` on its own thread and wait at most `limit` for it. Returns
/// its result, or `Err(elapsed)` when it did not finish in time (the thread
/// is left behind; it ends when whatever it blocks on goes away, e.g. when
/// the fixture kills mountd). A panic in `work` is re-raised here.
pub fn bounded<T: Send + 'static>(
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Duration> {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    std::thread::Builder::new()
        .name("bounded-op".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            let _ = tx.send(r);
        })
        .expect("spawn a thread");
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Err(started.elapsed()),
    }
}
