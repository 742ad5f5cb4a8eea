//! One peer session: pull the peer's change log over one connection and
//! apply it here.
//!
//! The session starts when the peer manager admits a connection (the
//! handler's `connected` hook) and ends with it. It opens one
//! `Index{since}` stream, `since` being the peer's sequence number applied
//! here (`Store::peer_applied`), so a reconnect pulls only what changed
//! after it. The stream has no useful deadline (it lives as long as the
//! connection; the connection's keepalive detects a dead peer and ends it),
//! so it is opened with the longest timeout the protocol carries.
//!
//! Items are applied in the order they come, in batches (what arrived
//! together, at most [`BATCH`]), each on the blocking pool
//! ([`super::apply`]). Records that cannot be applied yet are deferred:
//! kept in memory, in seq order, and retried when something that could
//! unblock them happens: after each batch (a parent's record, the
//! tombstone that frees a name), after each round of the local versioner
//! while one waits as `Busy` or for a name (a local change may free it;
//! the wake-up is registered before the batch is applied, so a round that
//! ends meanwhile is not missed), and on a timer ([`Backoff`]): [`RETRY`]
//! after a round that changed something, doubling while nothing does, up
//! to [`RETRY_MAX`], and never later than the end of a collision's grace.
//! A record
//! still colliding after its batch's retries and [`COLLISION_GRACE`] gets
//! the collision rule. A record that would replace the content of a local
//! version whose conflict copy is itself deferred waits for it
//! (`Wait::CopyFirst`, the copy rule of [`super::apply`]).
//!
//! When the session's index stream is open, the small files (up to
//! `eager_fetch_max`) that are still not all local are fetched again
//! ([`refetch_small_files`]): their eager fetch may have failed for lack of
//! a peer.
//!
//! Progress: the peer's sequence number applied here
//! (`Store::set_peer_applied`) moves only past records that are applied
//! or skipped, never past a deferred one; so after a restart or a cut,
//! the deferred records are pulled again, and nothing is lost. Records
//! already applied come back as equal versions and are ignored.

use super::apply::{self, Fate, Settle, Wait};
use super::engine::SyncEngine;
use super::index::{IndexItem, ItemReader};
use super::model::{Gid, ObjRec};
use crate::peer::conn::PeerConn;
use crate::peer::msg::Request;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most records applied in one blocking call.
pub const BATCH: usize = 512;

/// The first wait before deferred records are retried when nothing else
/// happens (see [`Backoff`]).
pub const RETRY: Duration = Duration::from_millis(250);

/// The longest wait between retries of deferred records when nothing
/// else happens.
pub const RETRY_MAX: Duration = Duration::from_secs(8);

/// The wait before an index stream that ended on a live connection is
/// opened again.
pub const REOPEN: Duration = Duration::from_secs(1);

/// How long a record whose name is held waits before the collision rule
/// settles it: the replaced file's tombstone of a rename over it is
/// committed just after the rename's record, and may come in the next
/// burst.
pub const COLLISION_GRACE: Duration = Duration::from_secs(1);

/// The index stream's timeout: the longest the protocol carries (the
/// stream ends with the connection; see the module doc).
pub const INDEX_STREAM_TIMEOUT: Duration = Duration::from_millis(u32::MAX as u64);

/// A record waiting to be applied, with the peer's seq.
#[derive(Clone, Debug)]
pub struct Deferred {
    /// The peer's sequence number of the record.
    pub seq: u64,
    /// The record.
    pub rec: ObjRec,
    /// Why it waits.
    pub wait: Wait,
    /// When it first had to wait.
    pub since: Instant,
}

/// Run a session on `conn` until the connection ends (an index stream
/// that ends before it is opened again after [`REOPEN`]).
pub async fn run(engine: Arc<SyncEngine>, conn: PeerConn) {
    let fp = conn.label().fingerprint.clone();
    engine.book.session_started(&fp);
    loop {
        let reason = session(&engine, &conn, &fp).await;
        if conn.close_reason().is_some() {
            tracing::info!(peer = %conn.label(), %reason, "sync session ended");
            break;
        }
        // The stream ended (its timeout, or the peer's error) but the
        // connection lives: pull again from the recorded progress.
        tracing::warn!(peer = %conn.label(), %reason, "index stream ended; opening it again");
        tokio::time::sleep(REOPEN).await;
    }
    engine.book.session_ended(&fp);
}

/// The session's loop; answers why it ended.
async fn session(engine: &Arc<SyncEngine>, conn: &PeerConn, fp: &str) -> String {
    let since = {
        let store = engine.store.clone();
        let fp = fp.to_owned();
        match tokio::task::spawn_blocking(move || store.peer_applied(&fp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return format!("cannot read the peer's progress: {e}"),
            Err(e) => return format!("cannot read the peer's progress: {e}"),
        }
    };
    engine.book.update(fp, |p| p.applied_seq = since);
    let mut stream = match conn
        .stream(Request::Index { since }, INDEX_STREAM_TIMEOUT)
        .await
    {
        Ok(s) => s,
        Err(e) => return format!("cannot open the index stream: {e}"),
    };
    tracing::info!(peer = %conn.label(), since, "sync session started");
    refetch_small_files(engine).await;
    let mut progress = Progress::new(since);
    let mut reader = ItemReader::default();
    let mut batch: Vec<(u64, ObjRec)> = Vec::new();
    let mut deferred: Vec<Deferred> = Vec::new();
    let mut backoff = Backoff::default();
    // The versioner's "round done", registered before each apply: a round
    // that ends while a record is refused as `Busy` still wakes the next
    // wait (a `Notified` made only at the wait would miss it, and the
    // record would wait for the timer).
    let mut versioned = Box::pin(engine.versioned.notified());
    loop {
        let local = deferred
            .iter()
            .any(|d| matches!(d.wait, Wait::Busy | Wait::Collision { .. }));
        let wait = backoff.wait(&deferred, Instant::now());
        tokio::select! {
            chunk = stream.next() => match chunk {
                None => return "the peer ended the index stream".into(),
                Some(Err(e)) => return e.to_string(),
                Some(Ok(bytes)) => reader.push(&bytes),
            },
            _ = versioned.as_mut(), if local => {}
            _ = tokio::time::sleep(wait.unwrap_or(RETRY)), if wait.is_some() => {}
        }
        versioned.set(engine.versioned.notified());
        let mut changed = false;
        loop {
            // Take what arrived, a batch at a time.
            while batch.len() < BATCH {
                match reader.next_item() {
                    Ok(Some(IndexItem::Rec { seq, rec })) => {
                        progress.seen(seq);
                        batch.push((seq, rec));
                    }
                    Ok(Some(IndexItem::CaughtUp { seq })) => {
                        progress.seen(seq);
                        engine.book.update(fp, |p| {
                            p.peer_seq = p.peer_seq.max(seq);
                            p.caught_up = true;
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(peer = %conn.label(), error = %e, "broken index stream");
                        conn.close("broken index stream");
                        return format!("broken index stream: {e}");
                    }
                }
            }
            let full = batch.len() >= BATCH;
            let taken = std::mem::take(&mut batch);
            let engine2 = engine.clone();
            let fp2 = fp.to_owned();
            let waiting = std::mem::take(&mut deferred);
            let before: Vec<u64> = waiting.iter().map(|d| d.seq).collect();
            changed |= !taken.is_empty();
            deferred = match tokio::task::spawn_blocking(move || {
                apply_batch(&engine2, &fp2, taken, waiting)
            })
            .await
            {
                Ok(d) => d,
                Err(e) => return format!("applying failed: {e}"),
            };
            changed |= deferred.iter().map(|d| d.seq).ne(before.iter().copied());
            if let Some(applied) = progress.applied(&deferred) {
                let store = engine.store.clone();
                let fp2 = fp.to_owned();
                match tokio::task::spawn_blocking(move || store.set_peer_applied(&fp2, applied))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return format!("cannot record the peer's progress: {e}"),
                    Err(e) => return format!("cannot record the peer's progress: {e}"),
                }
            }
            let n = deferred.len() as u64;
            let applied = progress.recorded;
            engine.book.update(fp, |p| {
                p.applied_seq = applied;
                p.deferred = n;
            });
            if !full {
                break;
            }
        }
        backoff.after_round(changed);
    }
}

/// When deferred records are retried if nothing else happens (see the
/// module doc).
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: RETRY }
    }
}

impl Backoff {
    /// After a round: `changed` (records arrived, or the deferred records
    /// are not the same): back to [`RETRY`]; else the wait doubles, up to
    /// [`RETRY_MAX`].
    fn after_round(&mut self, changed: bool) {
        self.next = if changed {
            RETRY
        } else {
            (self.next * 2).min(RETRY_MAX)
        };
    }

    /// How long to wait before retrying `deferred` at `now` (`None`:
    /// nothing waits): the backoff, or less if a collision's grace ends
    /// sooner (its final pass settles it).
    fn wait(&self, deferred: &[Deferred], now: Instant) -> Option<Duration> {
        if deferred.is_empty() {
            return None;
        }
        let grace = deferred
            .iter()
            .filter(|d| matches!(d.wait, Wait::Collision { .. }))
            .map(|d| (d.since + COLLISION_GRACE).saturating_duration_since(now))
            .filter(|left| !left.is_zero())
            .min();
        Some(grace.map_or(self.next, |g| g.min(self.next)))
    }
}

/// The most partial files looked at when a session starts.
pub const REFETCH_SCAN_MAX: usize = 100_000;

/// A peer is here again: fetch the small files whose eager fetch failed
/// (no peer had their bytes then), as their arrival would have. Files
/// over `eager_fetch_max` stay fetched on demand.
async fn refetch_small_files(engine: &Arc<SyncEngine>) {
    let max = engine.data().eager_fetch_max();
    if max == 0 {
        return;
    }
    let store = engine.store.clone();
    let partial =
        match tokio::task::spawn_blocking(move || store.partial_files(REFETCH_SCAN_MAX)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot list the files not all local");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the files not all local");
                return;
            }
        };
    let small: Vec<_> = partial
        .into_iter()
        .filter(|(_, p)| p.size <= max)
        .map(|(ino, _)| ino)
        .collect();
    if !small.is_empty() {
        tracing::debug!(files = small.len(), "fetching small files not all local");
    }
    for ino in small {
        engine.data().prefetch(ino);
    }
}

/// Apply `batch` in order, then retry the deferred records (older ones
/// and the batch's) until no more can be applied, then settle what still
/// collides after [`COLLISION_GRACE`] and the directory deletes that meet
/// entries when no other delete waits. Answers what is still deferred, in
/// seq order.
pub fn apply_batch(
    engine: &SyncEngine,
    peer: &str,
    batch: Vec<(u64, ObjRec)>,
    waiting: Vec<Deferred>,
) -> Vec<Deferred> {
    let mut deferred = waiting;
    let mut held = Held::of(&deferred);
    for (seq, rec) in batch {
        match apply::apply_one(engine, peer, &rec, Settle::default(), &|g| held.has(g)) {
            Fate::Done | Fate::Skipped => {}
            Fate::Deferred(wait) => {
                held.add(rec.gid);
                deferred.push(Deferred {
                    seq,
                    rec,
                    wait,
                    since: Instant::now(),
                });
            }
        }
    }
    // Retry until a round applies nothing.
    loop {
        let before = deferred.len();
        deferred = retry(engine, peer, deferred, Settle::default());
        if deferred.len() == before || deferred.is_empty() {
            break;
        }
    }
    // A directory's tombstone that meets entries is settled (the
    // directory kept) only when no other delete waits: the entries may be
    // the ones those deletes remove.
    let deletes_wait = deferred
        .iter()
        .any(|d| d.rec.deleted && d.wait != Wait::NotEmpty);
    let settle = Settle {
        collision: true,
        not_empty: !deletes_wait,
    };
    if deferred.iter().any(|d| settles(d, settle)) {
        deferred = retry(engine, peer, deferred, settle);
    }
    deferred.sort_by_key(|d| d.seq);
    deferred
}

fn retry(engine: &SyncEngine, peer: &str, list: Vec<Deferred>, settle: Settle) -> Vec<Deferred> {
    let mut left = Vec::new();
    let mut held = Held::of(&list);
    for d in list {
        let settle = Settle {
            collision: settles(&d, settle) && matches!(d.wait, Wait::Collision { .. }),
            not_empty: settles(&d, settle) && d.wait == Wait::NotEmpty,
        };
        held.remove(&d.rec.gid);
        match apply::apply_one(engine, peer, &d.rec, settle, &|g| held.has(g)) {
            Fate::Done | Fate::Skipped => {}
            Fate::Deferred(wait) => {
                held.add(d.rec.gid);
                left.push(Deferred { wait, ..d });
            }
        }
    }
    left
}

/// The gids of the records that wait (counted: one object may wait with
/// two records), for the copy rule of [`apply`].
#[derive(Default)]
struct Held(std::collections::HashMap<Gid, usize>);

impl Held {
    fn of(list: &[Deferred]) -> Held {
        let mut h = Held::default();
        for d in list {
            h.add(d.rec.gid);
        }
        h
    }

    fn add(&mut self, gid: Gid) {
        *self.0.entry(gid).or_default() += 1;
    }

    fn remove(&mut self, gid: &Gid) {
        if let Some(n) = self.0.get_mut(gid) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(gid);
            }
        }
    }

    fn has(&self, gid: &Gid) -> bool {
        self.0.contains_key(gid)
    }
}

/// Whether the final pass settles `d` (see [`apply_batch`]).
fn settles(d: &Deferred, settle: Settle) -> bool {
    match d.wait {
        Wait::Collision { .. } => settle.collision && d.since.elapsed() >= COLLISION_GRACE,
        Wait::NotEmpty => settle.not_empty,
        _ => false,
    }
}

/// How far the session got in the peer's log.
#[derive(Debug)]
struct Progress {
    /// The highest seq seen (record or `CaughtUp`).
    seen: u64,
    /// The last value recorded in the store.
    recorded: u64,
}

impl Progress {
    fn new(since: u64) -> Progress {
        Progress {
            seen: since,
            recorded: since,
        }
    }

    fn seen(&mut self, seq: u64) {
        self.seen = self.seen.max(seq);
    }

    /// The new value to record, if it moved: everything seen, but not
    /// past a deferred record.
    fn applied(&mut self, deferred: &[Deferred]) -> Option<u64> {
        let upto = match deferred.iter().map(|d| d.seq).min() {
            Some(first) => first.saturating_sub(1).min(self.seen),
            None => self.seen,
        };
        if upto > self.recorded {
            self.recorded = upto;
            Some(upto)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(seq: u64, wait: Wait, since: Instant) -> Deferred {
        Deferred {
            seq,
            rec: crate::sync::merge::tests::file_rec(1, &[(1, 1)], b"x"),
            wait,
            since,
        }
    }

    #[test]
    fn deferred_records_are_retried_with_a_bounded_backoff() {
        let now = Instant::now();
        let mut b = Backoff::default();
        assert_eq!(b.wait(&[], now), None, "nothing waits: no timer");
        let parent = [waiting(1, Wait::MissingParent(Gid([7; 16])), now)];
        assert_eq!(b.wait(&parent, now), Some(RETRY));
        // Rounds that change nothing: the wait doubles, up to the bound.
        let mut seen = Vec::new();
        for _ in 0..8 {
            b.after_round(false);
            seen.push(b.wait(&parent, now).expect("a wait"));
        }
        assert_eq!(
            seen,
            [500, 1000, 2000, 4000, 8000, 8000, 8000, 8000].map(Duration::from_millis)
        );
        assert!(RETRY_MAX >= COLLISION_GRACE);
        // Something arrived, or the deferred records changed: back to
        // the first wait.
        b.after_round(true);
        assert_eq!(b.wait(&parent, now), Some(RETRY));
        // A collision is retried when its grace ends, even when the
        // backoff is longer; once the grace is over, the backoff rules.
        for _ in 0..5 {
            b.after_round(false);
        }
        let half = now - COLLISION_GRACE / 2;
        let colliding = |since| {
            waiting(
                2,
                Wait::Collision {
                    at: crate::sync::model::EntryName {
                        parent: Gid::ROOT,
                        name: b"x".to_vec(),
                    },
                    existing: Gid([9; 16]),
                },
                since,
            )
        };
        assert_eq!(
            b.wait(&[parent[0].clone(), colliding(half)], now),
            Some(COLLISION_GRACE / 2)
        );
        assert_eq!(
            b.wait(&[colliding(now - COLLISION_GRACE * 2)], now),
            Some(RETRY_MAX),
            "a grace that is over does not make the timer spin"
        );
    }

    #[test]
    fn progress_never_passes_a_deferred_record() {
        let mut p = Progress::new(3);
        p.seen(10);
        let rec = |seq| Deferred {
            seq,
            rec: crate::sync::merge::tests::file_rec(1, &[(1, 1)], b"x"),
            wait: Wait::Busy,
            since: Instant::now(),
        };
        assert_eq!(p.applied(&[rec(7), rec(9)]), Some(6));
        assert_eq!(p.applied(&[rec(7)]), None, "no move");
        assert_eq!(p.applied(&[]), Some(10));
        p.seen(12);
        assert_eq!(p.applied(&[rec(4)]), None, "never backwards");
        assert_eq!(p.applied(&[]), Some(12));
    }
}
