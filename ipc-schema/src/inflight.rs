//! The registry of operations in flight, read by `keibictl debug ops`.
//!
//! Each daemon keeps one [`InFlight`]: an operation registers when it
//! starts and gets an [`OpGuard`]; dropping the guard (the operation
//! answered, failed, or its task was cancelled) removes the entry. A
//! [`InFlight::snapshot`] copies the entries out with their ages, oldest
//! first.
//!
//! The map sits behind one std `Mutex` that is a leaf lock: it is held only
//! to insert, update, remove or copy entries, never across an `.await`, a
//! syscall or while taking another lock. So reading the registry cannot
//! wait on anything the operations wait on, which is the point: it must
//! answer while the daemon is stuck.

use crate::types::OpInFlight;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// One registered operation.
struct Entry {
    op: &'static str,
    ino: Option<u64>,
    fh: Option<u64>,
    start: Instant,
    waiting_on: String,
}

/// The operations in flight in one process.
#[derive(Default)]
pub struct InFlight {
    next: AtomicU64,
    /// Leaf lock (see the module doc). Ids grow, so key order is start order.
    entries: Mutex<BTreeMap<u64, Entry>>,
}

impl InFlight {
    /// An empty registry.
    pub fn new() -> Arc<InFlight> {
        Arc::new(InFlight::default())
    }

    /// Record that `op` started; it is listed until the guard drops.
    pub fn register(
        self: &Arc<Self>,
        op: &'static str,
        ino: Option<u64>,
        fh: Option<u64>,
        waiting_on: impl Into<String>,
    ) -> OpGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            op,
            ino,
            fh,
            start: Instant::now(),
            waiting_on: waiting_on.into(),
        };
        self.lock().insert(id, entry);
        OpGuard {
            registry: self.clone(),
            id,
        }
    }

    /// The operations in flight now, oldest first.
    pub fn snapshot(&self) -> Vec<OpInFlight> {
        let now = Instant::now();
        self.lock()
            .values()
            .map(|e| OpInFlight {
                op: e.op.to_string(),
                ino: e.ino,
                fh: e.fh,
                age_ms: now.saturating_duration_since(e.start).as_millis() as u64,
                waiting_on: e.waiting_on.clone(),
            })
            .collect()
    }

    /// How many operations are in flight.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An operation's place in the registry; dropping it removes the entry.
pub struct OpGuard {
    registry: Arc<InFlight>,
    id: u64,
}

impl OpGuard {
    /// Say what the operation waits on now.
    pub fn waiting_on(&self, what: impl Into<String>) {
        if let Some(e) = self.registry.lock().get_mut(&self.id) {
            e.waiting_on = what.into();
        }
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_as_long_as_their_guard() {
        let r = InFlight::new();
        assert!(r.is_empty());
        let a = r.register("lookup", Some(1), None, "keibi-syncd (lookup)");
        let b = r.register("read", Some(5), Some(9), "fd channel");
        let ops = r.snapshot();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].op, "lookup", "oldest first");
        assert_eq!(ops[0].ino, Some(1));
        assert_eq!(ops[0].fh, None);
        assert_eq!(ops[0].waiting_on, "keibi-syncd (lookup)");
        assert_eq!(ops[1].op, "read");
        assert_eq!(ops[1].fh, Some(9));
        drop(a);
        let ops = r.snapshot();
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].op, "read");
        drop(b);
        assert!(r.is_empty());
    }

    #[test]
    fn waiting_on_can_change_and_age_grows() {
        let r = InFlight::new();
        let g = r.register("open", Some(2), None, "keibi-syncd (open)");
        g.waiting_on("fd channel");
        let first = r.snapshot()[0].age_ms;
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while r.snapshot()[0].age_ms <= first {
            assert!(Instant::now() < deadline, "age never grew");
            std::thread::yield_now();
        }
        assert_eq!(r.snapshot()[0].waiting_on, "fd channel");
        drop(g);
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn a_cancelled_task_leaves_no_entry() {
        let r = InFlight::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let r2 = r.clone();
        let task = rt.spawn(async move {
            let _g = r2.register("getattr", Some(1), None, "keibi-syncd (getattr)");
            std::future::pending::<()>().await;
        });
        rt.block_on(async {
            while r.is_empty() {
                tokio::task::yield_now().await;
            }
        });
        assert_eq!(r.len(), 1);
        task.abort();
        rt.block_on(async {
            let _ = task.await;
        });
        assert!(r.is_empty());
    }
}
