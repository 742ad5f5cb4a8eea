//! Open directories and the entries read ahead for each of them.
//!
//! The kernel asks for a directory listing one page at a time: about
//! thirty entries per `readdirplus`, a hundred per `readdir`. Asking syncd
//! for each page would cost one round trip per page (an `ls -l` of 10,000
//! files: ~300). Instead each `opendir` gets its own file handle with a
//! [`ReadAhead`]: syncd is asked for [`BATCH`] entries at a time, the
//! kernel's request takes what fits in its reply, and the rest waits here
//! for the next request, which is answered inline on the dispatch thread.
//!
//! A read-ahead answers a request only when all of this holds
//! ([`ReadAhead::serves`]):
//!
//! - the request's offset is the cookie of the last entry handed out
//!   (cookies grow along a listing and stay valid while entries come and
//!   go, so continuing after that cookie at syncd would give the same
//!   entries); any other offset (`rewinddir`, `seekdir`) drops the
//!   read-ahead and syncd is asked from that cookie;
//! - it has the attributes if the request wants them (a `readdirplus`
//!   read-ahead also answers a plain `readdir`);
//! - nothing changed through this mount since it was asked for: every
//!   operation that changes names or attributes counts, from when it is
//!   sent until it is answered (the mount's change counter,
//!   [`crate::fs::Keibi`]). So a name created or removed here, or a chmod
//!   here, is never hidden behind older entries; changes made elsewhere
//!   appear as they would after the kernel's attribute TTL.
//!
//! - it is not older than `--attr-ttl` (its first entry, the oldest):
//!   changes made elsewhere show up no later than through the kernel's
//!   own caches.
//!
//! Attributes from a read-ahead are up to a few moments old when the
//! kernel gets them, and the kernel applies them as if they were new
//! (its guard against racing replies only covers the request's own flight
//! time). Hence: the TTL given with them is `--attr-ttl` minus their age
//! ([`ttl_left`]), and an entry whose file is open for writing on this
//! mount (writes there change its size without syncd) is not handed out
//! from a read-ahead: the reply stops before it and the next request asks
//! syncd again, whose fresh answer is covered by the kernel's guard.
//!
//! Prefetch: once the kernel continues a listing from a read-ahead (so it
//! is reading on, not looking at the first page only), the next batch is
//! asked of syncd in the background as soon as less than a batch is left
//! ([`DirHandles::keep`]); it is joined to the read-ahead when it arrives
//! if it continues it exactly, with the same change count
//! ([`ReadAhead::join`]). A request that finds the read-ahead used up
//! while that fetch is on its way waits for it (within its deadline)
//! instead of asking syncd a second time ([`DirHandles::coming`]). So
//! syncd lists the next entries while the kernel and the program work
//! through the current ones.
//!
//! The remembered entries are bounded: at most [`MAX_BUFFERED`] over all
//! directories; a batch that would pass the bound is not kept.
//!
//! Locks: one `Mutex` over the table, a leaf lock held only for map
//! operations and moving a read-ahead in or out (never across an await or
//! an IPC call); entries are handed to the kernel after it is released.

use crate::attr_cache::Ticket;
use ipc_schema::DirEntry;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Entries asked of syncd at a time with attributes (`readdirplus`; the
/// kernel's 32 KiB request takes about 170 short names) and without
/// (`readdir`; about 1,300 short names per request).
pub const BATCH_PLUS: u32 = 512;
/// See [`BATCH_PLUS`].
pub const BATCH_PLAIN: u32 = 2048;

/// The batch size for a listing with or without attributes.
pub fn batch(plus: bool) -> u32 {
    if plus { BATCH_PLUS } else { BATCH_PLAIN }
}

/// Most entries kept in read-aheads over all open directories.
pub const MAX_BUFFERED: usize = 64 * 1024;

/// Entries syncd listed after a cookie, not yet handed to the kernel.
#[derive(Debug)]
pub struct ReadAhead {
    /// The cookie the first remaining entry follows: the kernel's offset
    /// that continues here.
    after: u64,
    /// Each entry with when syncd was asked for it (its attributes are at
    /// most that old).
    entries: VecDeque<(DirEntry, Instant)>,
    /// Attributes are included.
    plus: bool,
    /// syncd gave fewer entries than asked: the listing ended there.
    complete: bool,
    /// The mount's change counter when syncd was asked.
    changes: u64,
    /// The attribute cache's ticket when syncd was asked (the oldest, for
    /// entries joined from several requests): see [`ReadAhead::since`].
    since: Ticket,
}

impl ReadAhead {
    /// What syncd answered to `readdir(after, asked, plus)`, asked at
    /// `asked_at` when the change counter was `changes`.
    pub fn new(
        after: u64,
        entries: Vec<DirEntry>,
        asked: u32,
        plus: bool,
        asked_at: Instant,
        changes: u64,
    ) -> Self {
        ReadAhead {
            after,
            complete: entries.len() < asked as usize,
            entries: entries.into_iter().map(|e| (e, asked_at)).collect(),
            plus,
            changes,
            since: Ticket::default(),
        }
    }

    /// The same, asked at attribute-cache ticket `since` (taken before
    /// syncd was asked).
    pub fn with_ticket(mut self, since: Ticket) -> Self {
        self.since = since;
        self
    }

    /// The ticket of the request that listed these entries, for the TTL
    /// of their attributes (`Keibi::attr_ttl`).
    pub fn since(&self) -> Ticket {
        self.since
    }

    /// The cookie of the last entry (where a following batch starts).
    fn last_cookie(&self) -> u64 {
        self.entries.back().map_or(self.after, |(e, _)| e.cookie.0)
    }

    /// Append `next` if it continues this exactly: asked from this one's
    /// last cookie, with the same attributes and change count. Otherwise
    /// `next` is given back.
    pub fn join(&mut self, next: ReadAhead) -> Result<(), ReadAhead> {
        if self.complete
            || next.after != self.last_cookie()
            || next.plus != self.plus
            || next.changes != self.changes
        {
            return Err(next);
        }
        self.entries.extend(next.entries);
        self.complete = next.complete;
        self.since = self.since.min(next.since);
        Ok(())
    }

    /// Whether this answers a request at `offset` (with attributes if
    /// `plus`) while the change counter is `changes`.
    pub fn serves(&self, offset: u64, plus: bool, changes: u64) -> bool {
        self.after == offset
            && (self.plus || !plus)
            && self.changes == changes
            && (!self.entries.is_empty() || self.complete)
    }

    /// Whether the oldest entry was asked for at most `max_age` before
    /// `now`.
    fn young(&self, max_age: Duration, now: Instant) -> bool {
        self.entries
            .front()
            .is_none_or(|(_, at)| now.saturating_duration_since(*at) <= max_age)
    }

    /// Whether the first entry (if any) passes `usable`.
    pub fn front_usable(&self, usable: impl Fn(&DirEntry) -> bool) -> bool {
        self.entries.front().is_none_or(|(e, _)| usable(e))
    }

    /// Hand entries in order to `add` (with when syncd was asked for
    /// them; `add` answers `true` when the reply is full and the entry did
    /// not fit) while `usable` accepts them. Entries handed out are
    /// removed; the others stay. Returns how many were handed out.
    pub fn serve(
        &mut self,
        usable: impl Fn(&DirEntry) -> bool,
        mut add: impl FnMut(&DirEntry, Instant) -> bool,
    ) -> usize {
        let mut n = 0;
        while let Some((e, asked_at)) = self.entries.front() {
            if !usable(e) || add(e, *asked_at) {
                break;
            }
            self.after = e.cookie.0;
            self.entries.pop_front();
            n += 1;
        }
        n
    }

    /// Nothing remains and the listing ended: an empty reply (end of
    /// directory) is the answer.
    pub fn at_end(&self) -> bool {
        self.entries.is_empty() && self.complete
    }

    /// Entries remaining.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is nothing worth keeping.
    fn worthless(&self) -> bool {
        self.entries.is_empty() && !self.complete
    }
}

/// The TTL for attributes read at `asked_at`: what is left of `ttl` at
/// `now`, zero once they are older than `ttl`.
pub fn ttl_left(ttl: Duration, asked_at: Instant, now: Instant) -> Duration {
    ttl.saturating_sub(now.saturating_duration_since(asked_at))
}

/// A fetch on its way for an open directory.
struct Coming {
    after: u64,
    plus: bool,
    /// Closed when the fetch is over (its sender is dropped).
    done: watch::Receiver<()>,
}

/// A fetch to start (see [`DirHandles::keep`]): hold `done` until its
/// answer went to [`DirHandles::arrived`].
pub struct Prefetch {
    /// Ask syncd for the entries after this cookie.
    pub after: u64,
    /// With attributes.
    pub plus: bool,
    /// Dropping it wakes the requests waiting for this fetch.
    pub done: watch::Sender<()>,
}

struct OpenDir {
    ino: u64,
    ahead: Option<ReadAhead>,
    coming: Option<Coming>,
}

struct Table {
    dirs: HashMap<u64, OpenDir>,
    /// Entries in all read-aheads.
    buffered: usize,
}

/// Directory file handle → open directory.
pub struct DirHandles {
    table: Mutex<Table>,
    next: AtomicU64,
    max_buffered: usize,
    max_age: Duration,
}

impl DirHandles {
    /// A table whose read-aheads serve for at most `max_age` (the
    /// attribute TTL).
    pub fn new(max_age: Duration) -> Self {
        DirHandles::with_bound(MAX_BUFFERED, max_age)
    }

    /// A table keeping at most `max_buffered` entries read ahead, each
    /// for at most `max_age`.
    pub fn with_bound(max_buffered: usize, max_age: Duration) -> Self {
        DirHandles {
            table: Mutex::new(Table {
                dirs: HashMap::new(),
                buffered: 0,
            }),
            next: AtomicU64::new(1),
            max_buffered,
            max_age,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Table) -> T) -> T {
        // The table stays consistent if a holder panicked: keep using it.
        let mut g = self.table.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// A new handle for directory `ino` (never 0, never reused).
    pub fn open(&self, ino: u64) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.with(|t| {
            t.dirs.insert(
                fh,
                OpenDir {
                    ino,
                    ahead: None,
                    coming: None,
                },
            )
        });
        fh
    }

    /// Forget handle `fh` and its read-ahead.
    pub fn release(&self, fh: u64) {
        let gone = self.with(|t| {
            let d = t.dirs.remove(&fh)?;
            let a = d.ahead?;
            t.buffered -= a.len();
            Some(a)
        });
        drop(gone);
    }

    /// Take out the read-ahead of `fh` on `ino` if it answers a request at
    /// `offset` (see [`ReadAhead::serves`]) and is not older than the
    /// table's `max_age`; one that does not is dropped.
    pub fn take(
        &self,
        fh: u64,
        ino: u64,
        offset: u64,
        plus: bool,
        changes: u64,
    ) -> Option<ReadAhead> {
        let a = self.with(|t| {
            let d = t.dirs.get_mut(&fh).filter(|d| d.ino == ino)?;
            let a = d.ahead.take()?;
            t.buffered -= a.len();
            Some(a)
        })?;
        // A read-ahead that does not answer is dropped here, outside the
        // lock.
        (a.serves(offset, plus, changes) && a.young(self.max_age, Instant::now())).then_some(a)
    }

    /// Keep `ahead` for the next request on `fh` (if the handle is still
    /// open, the entries are worth keeping and the bound allows), joined
    /// with a batch that arrived for it meanwhile. With `prefetch` (the
    /// kernel is reading on from a read-ahead), asks for the next batch to
    /// be fetched when less than a batch is left and none is on its way:
    /// the caller starts that fetch and hands its answer to
    /// [`DirHandles::arrived`].
    pub fn keep(
        &self,
        fh: u64,
        ino: u64,
        mut ahead: ReadAhead,
        prefetch: bool,
    ) -> Option<Prefetch> {
        if ahead.worthless() {
            return None;
        }
        let (dropped, start) = self.with(|t| {
            let Table { dirs, buffered } = t;
            let Some(d) = dirs.get_mut(&fh).filter(|d| d.ino == ino) else {
                return (Some(ahead), None);
            };
            let mut dropped = None;
            if let Some(arrived) = d.ahead.take() {
                *buffered -= arrived.len();
                dropped = ahead.join(arrived).err();
            }
            if *buffered + ahead.len() > self.max_buffered {
                return (Some(ahead), None);
            }
            *buffered += ahead.len();
            let start = (prefetch
                && !ahead.complete
                && ahead.len() < batch(ahead.plus) as usize
                && d.coming.is_none())
            .then(|| {
                let (tx, rx) = watch::channel(());
                d.coming = Some(Coming {
                    after: ahead.last_cookie(),
                    plus: ahead.plus,
                    done: rx,
                });
                Prefetch {
                    after: ahead.last_cookie(),
                    plus: ahead.plus,
                    done: tx,
                }
            });
            d.ahead = Some(ahead);
            (dropped, start)
        });
        drop(dropped);
        start
    }

    /// A prefetched batch (`None` if the fetch failed) for `fh`: joined to
    /// its read-ahead, or kept until the read-ahead taken out by a request
    /// comes back (see [`DirHandles::keep`]).
    pub fn arrived(&self, fh: u64, ino: u64, batch: Option<ReadAhead>) {
        let dropped = self.with(|t| {
            let Table { dirs, buffered } = t;
            let d = dirs.get_mut(&fh).filter(|d| d.ino == ino)?;
            d.coming = None;
            let b = batch?;
            if *buffered + b.len() > self.max_buffered {
                return Some(b);
            }
            let n = b.len();
            match &mut d.ahead {
                Some(a) => a.join(b).err().or_else(|| {
                    *buffered += n;
                    None
                }),
                None => {
                    *buffered += n;
                    d.ahead = Some(b);
                    None
                }
            }
        });
        drop(dropped);
    }

    /// The end of the fetch on its way for `fh` that continues at
    /// `offset` (with attributes if `plus`), if there is one: wait for it
    /// with `changed()`, which returns once the fetch is over.
    pub fn coming(
        &self,
        fh: u64,
        ino: u64,
        offset: u64,
        plus: bool,
    ) -> Option<watch::Receiver<()>> {
        self.with(|t| {
            let c = t.dirs.get(&fh).filter(|d| d.ino == ino)?.coming.as_ref()?;
            (c.after == offset && (c.plus || !plus)).then(|| c.done.clone())
        })
    }

    /// Entries kept over all handles.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.with(|t| t.buffered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_schema::{Attr, DirCookie, FileKind, Ino, Name, Timestamp};

    fn attr(ino: u64) -> Attr {
        Attr {
            ino: Ino(ino),
            kind: FileKind::File,
            size: 0,
            blocks: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            crtime: Timestamp::default(),
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            blksize: 4096,
            rdev: 0,
            has_xattrs: false,
        }
    }

    /// Entries with cookies `cookies`; inode = 100 + cookie.
    fn entries(cookies: impl IntoIterator<Item = u64>, plus: bool) -> Vec<DirEntry> {
        cookies
            .into_iter()
            .map(|c| DirEntry {
                cookie: DirCookie(c),
                name: Name(format!("f{c}").into_bytes()),
                ino: Ino(100 + c),
                kind: FileKind::File,
                attr: plus.then(|| attr(100 + c)),
            })
            .collect()
    }

    /// Serve with a reply that holds `room` entries; the cookies served.
    fn serve_n(a: &mut ReadAhead, room: usize, usable: impl Fn(&DirEntry) -> bool) -> Vec<u64> {
        let mut got = Vec::new();
        a.serve(usable, |e, _| {
            if got.len() == room {
                return true;
            }
            got.push(e.cookie.0);
            false
        });
        got
    }

    #[test]
    fn continues_where_the_last_reply_ended() {
        let t0 = Instant::now();
        let mut a = ReadAhead::new(0, entries(1..=10, true), 10, true, t0, 7);
        assert!(!a.complete, "a full batch may have more after it");
        assert!(a.serves(0, true, 7));
        assert_eq!(serve_n(&mut a, 4, |_| true), vec![1, 2, 3, 4]);
        // The kernel's next offset is the last cookie it got.
        assert!(a.serves(4, true, 7));
        assert!(!a.serves(3, true, 7), "an earlier offset is a seek");
        assert!(!a.serves(5, true, 7), "a later offset is a seek");
        assert!(!a.serves(0, true, 7), "rewinddir");
        assert_eq!(serve_n(&mut a, 4, |_| true), vec![5, 6, 7, 8]);
        assert_eq!(serve_n(&mut a, 4, |_| true), vec![9, 10]);
        assert_eq!(a.len(), 0);
        assert!(!a.at_end());
        assert!(
            !a.serves(10, true, 7),
            "an emptied full batch must ask syncd for what follows"
        );
    }

    #[test]
    fn a_short_batch_ends_the_listing() {
        let mut a = ReadAhead::new(5, entries(6..=8, false), 512, false, Instant::now(), 0);
        assert!(a.serves(5, false, 0));
        assert_eq!(serve_n(&mut a, 100, |_| true), vec![6, 7, 8]);
        assert!(a.at_end());
        assert!(a.serves(8, false, 0), "end of directory answered locally");
    }

    #[test]
    fn attributes_and_changes_decide() {
        let plain = ReadAhead::new(0, entries(1..=3, false), 512, false, Instant::now(), 1);
        assert!(!plain.serves(0, true, 1), "no attributes for readdirplus");
        assert!(plain.serves(0, false, 1));
        let plus = ReadAhead::new(0, entries(1..=3, true), 512, true, Instant::now(), 1);
        assert!(
            plus.serves(0, false, 1),
            "readdirplus batch answers readdir"
        );
        assert!(!plus.serves(0, true, 2), "a change through this mount");
    }

    #[test]
    fn stops_before_an_unusable_entry_and_keeps_it() {
        let mut a = ReadAhead::new(0, entries(1..=6, true), 512, true, Instant::now(), 0);
        let open_for_writing = |e: &DirEntry| e.cookie.0 == 3;
        assert_eq!(serve_n(&mut a, 10, |e| !open_for_writing(e)), vec![1, 2]);
        assert!(a.serves(2, true, 0));
        assert_eq!(
            serve_n(&mut a, 10, |e| !open_for_writing(e)),
            Vec::<u64>::new()
        );
        assert_eq!(serve_n(&mut a, 10, |_| true), vec![3, 4, 5, 6]);
    }

    #[test]
    fn joins_only_a_batch_that_continues_exactly() {
        let t0 = Instant::now();
        let mut a = ReadAhead::new(0, entries(1..=4, true), 4, true, t0, 3);
        serve_n(&mut a, 2, |_| true);
        let t1 = t0 + Duration::from_millis(10);
        let gap = ReadAhead::new(5, entries(6..=7, true), 4, true, t1, 3);
        assert!(a.join(gap).is_err(), "does not start at the last cookie");
        let changed = ReadAhead::new(4, entries(5..=6, true), 4, true, t1, 4);
        assert!(a.join(changed).is_err(), "a change in between");
        let plain = ReadAhead::new(4, entries(5..=6, false), 4, false, t1, 3);
        assert!(a.join(plain).is_err(), "without attributes");
        let next = ReadAhead::new(4, entries(5..=6, true), 4, true, t1, 3);
        assert!(a.join(next).is_ok());
        let mut got = Vec::new();
        a.serve(
            |_| true,
            |e, at| {
                got.push((e.cookie.0, at));
                false
            },
        );
        // Each entry keeps the time its own batch was asked for.
        assert_eq!(got, vec![(3, t0), (4, t0), (5, t1), (6, t1)]);
        assert!(a.at_end(), "the joined batch was short: the listing ended");
        let more = ReadAhead::new(6, entries(7..=8, true), 4, true, t1, 3);
        assert!(a.join(more).is_err(), "nothing follows a complete listing");
    }

    #[test]
    fn prefetches_once_the_kernel_reads_on_and_joins_the_batch() {
        let h = DirHandles::new(Duration::from_secs(60));
        let fh = h.open(1);
        let now = Instant::now();
        let n = u64::from(BATCH_PLUS);
        // The first reply of a listing: no prefetch yet.
        let mut a = ReadAhead::new(0, entries(1..=n, true), BATCH_PLUS, true, now, 0);
        serve_n(&mut a, 100, |_| true);
        assert!(h.keep(fh, 1, a, false).is_none());
        // The kernel reads on from the read-ahead: fetch what follows.
        let mut a = h.take(fh, 1, 100, true, 0).expect("read-ahead");
        serve_n(&mut a, 100, |_| true);
        let p = h.keep(fh, 1, a, true).expect("a prefetch");
        assert_eq!((p.after, p.plus), (n, true));
        // Only one at a time.
        let mut a = h.take(fh, 1, 200, true, 0).expect("read-ahead");
        serve_n(&mut a, 100, |_| true);
        assert!(h.keep(fh, 1, a, true).is_none(), "one is on its way");
        // Nothing waits while entries remain before the fetch's start.
        assert!(h.coming(fh, 1, 300, true).is_none());
        assert!(h.coming(fh, 1, n, true).is_some());
        assert!(h.coming(fh, 1, n, false).is_some(), "plus serves plain");
        // It arrives while a request has the read-ahead out.
        let mut a = h.take(fh, 1, 300, true, 0).expect("read-ahead");
        let waiter = h.coming(fh, 1, n, true).expect("coming");
        h.arrived(
            fh,
            1,
            Some(ReadAhead::new(
                n,
                entries(n + 1..=n + 10, true),
                BATCH_PLUS,
                true,
                now,
                0,
            )),
        );
        drop(p.done);
        assert!(
            waiter.has_changed().is_err(),
            "waiters wake when it is over"
        );
        assert!(h.coming(fh, 1, n, true).is_none());
        serve_n(&mut a, 100, |_| true);
        assert!(h.keep(fh, 1, a, true).is_none(), "the listing is complete");
        let mut a = h.take(fh, 1, 400, true, 0).expect("joined read-ahead");
        let got = serve_n(&mut a, 1000, |_| true);
        assert_eq!(got, (401..=n + 10).collect::<Vec<_>>());
        assert!(a.at_end());
        assert_eq!(h.buffered(), 0);
    }

    #[test]
    fn a_failed_or_unjoinable_prefetch_is_dropped() {
        let h = DirHandles::new(Duration::from_secs(60));
        let fh = h.open(1);
        let now = Instant::now();
        let n = u64::from(BATCH_PLAIN);
        let mut a = ReadAhead::new(0, entries(1..=n, false), BATCH_PLAIN, false, now, 0);
        serve_n(&mut a, 10, |_| true);
        let p = h.keep(fh, 1, a, true).expect("prefetch");
        h.arrived(fh, 1, None);
        drop(p);
        assert!(h.coming(fh, 1, n, false).is_none());
        assert_eq!(h.buffered(), (n - 10) as usize);
        // A batch that does not continue the read-ahead (it changed).
        let mut a = h.take(fh, 1, 10, false, 0).expect("read-ahead");
        serve_n(&mut a, 10, |_| true);
        let _p = h.keep(fh, 1, a, true).expect("prefetch");
        h.arrived(
            fh,
            1,
            Some(ReadAhead::new(
                n,
                entries(n + 1..=n + 5, false),
                BATCH_PLAIN,
                false,
                now,
                1,
            )),
        );
        assert_eq!(h.buffered(), (n - 20) as usize);
    }

    #[test]
    fn a_read_ahead_older_than_the_ttl_is_not_used() {
        let h = DirHandles::new(Duration::from_millis(500));
        let fh = h.open(1);
        let old = Instant::now() - Duration::from_secs(2);
        assert!(
            h.keep(
                fh,
                1,
                ReadAhead::new(0, entries(1..=5, true), 10, true, old, 0),
                false
            )
            .is_none()
        );
        assert!(h.take(fh, 1, 0, true, 0).is_none());
        let now = Instant::now();
        assert!(
            h.keep(
                fh,
                1,
                ReadAhead::new(0, entries(1..=5, true), 10, true, now, 0),
                false
            )
            .is_none()
        );
        assert!(h.take(fh, 1, 0, true, 0).is_some());
    }

    #[test]
    fn ttl_shrinks_with_age() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(1);
        assert_eq!(ttl_left(ttl, t0, t0), ttl);
        assert_eq!(
            ttl_left(ttl, t0, t0 + Duration::from_millis(300)),
            Duration::from_millis(700)
        );
        assert_eq!(
            ttl_left(ttl, t0, t0 + Duration::from_secs(5)),
            Duration::ZERO
        );
        // A clock that seems to go back never lengthens it.
        assert_eq!(ttl_left(ttl, t0 + Duration::from_secs(1), t0), ttl);
    }

    #[test]
    fn handles_keep_and_drop_read_aheads() {
        let h = DirHandles::new(Duration::from_secs(60));
        let fh = h.open(1);
        let other = h.open(1);
        assert_ne!(fh, other);
        assert_ne!(fh, 0);
        let now = Instant::now();
        let mut a = ReadAhead::new(0, entries(1..=10, true), 10, true, now, 0);
        serve_n(&mut a, 3, |_| true);
        assert!(h.keep(fh, 1, a, false).is_none());
        assert_eq!(h.buffered(), 7);
        assert!(h.take(other, 1, 3, true, 0).is_none(), "per handle");
        assert!(h.take(fh, 2, 3, true, 0).is_none(), "another inode");
        let a = h.take(fh, 1, 3, true, 0).expect("the kept read-ahead");
        assert_eq!(h.buffered(), 0);
        assert!(h.keep(fh, 1, a, false).is_none());
        // A seek drops it.
        assert!(h.take(fh, 1, 0, true, 0).is_none());
        assert!(h.take(fh, 1, 3, true, 0).is_none(), "dropped by the seek");
        assert_eq!(h.buffered(), 0);
        // Released handles keep nothing.
        h.release(fh);
        assert!(
            h.keep(
                fh,
                1,
                ReadAhead::new(0, entries(1..=5, true), 10, true, now, 0),
                false,
            )
            .is_none()
        );
        assert!(h.take(fh, 1, 0, true, 0).is_none());
        assert_eq!(h.buffered(), 0);
        // Release frees what a handle kept.
        assert!(
            h.keep(
                other,
                1,
                ReadAhead::new(0, entries(1..=5, true), 10, true, now, 0),
                false,
            )
            .is_none()
        );
        assert_eq!(h.buffered(), 5);
        h.release(other);
        assert_eq!(h.buffered(), 0);
    }

    #[test]
    fn keeps_within_the_bound() {
        let h = DirHandles::with_bound(8, Duration::from_secs(60));
        let (a, b) = (h.open(1), h.open(2));
        let now = Instant::now();
        assert!(
            h.keep(
                a,
                1,
                ReadAhead::new(0, entries(1..=6, false), 6, false, now, 0),
                false,
            )
            .is_none()
        );
        assert!(
            h.keep(
                b,
                2,
                ReadAhead::new(0, entries(1..=6, false), 6, false, now, 0),
                false,
            )
            .is_none()
        );
        assert_eq!(h.buffered(), 6, "the second would pass the bound");
        assert!(h.take(b, 2, 0, false, 0).is_none());
        // Replacing a handle's own read-ahead frees its old entries first.
        assert!(
            h.keep(
                a,
                1,
                ReadAhead::new(0, entries(1..=8, false), 8, false, now, 0),
                false,
            )
            .is_none()
        );
        assert_eq!(h.buffered(), 8);
        assert_eq!(h.take(a, 1, 0, false, 0).map(|x| x.len()), Some(8));
        assert_eq!(h.buffered(), 0);
    }

    #[test]
    fn nothing_left_of_a_full_batch_is_not_kept() {
        let h = DirHandles::new(Duration::from_secs(60));
        let fh = h.open(1);
        let mut a = ReadAhead::new(0, entries(1..=2, false), 2, false, Instant::now(), 0);
        serve_n(&mut a, 10, |_| true);
        assert!(h.keep(fh, 1, a, false).is_none());
        assert!(h.take(fh, 1, 2, false, 0).is_none());
    }
}
