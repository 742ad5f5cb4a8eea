//! Consistency: the start-up scan ([`Store::recover`]) and
//! `keibictl check` ([`Store::check`]).
//!
//! The start-up scan runs before anything is served. It compares the
//! content directory with the inode records: content files that no record
//! names (left by a crash after an unlink or before a create committed, or
//! unused spares) are removed, after a `syncfs` has made the recovered
//! store durable (a power cut right after must not bring back a name of a
//! file removed here); a named regular file whose content file is
//! missing is recreated empty, with a warning. Only a power cut can cause
//! the latter (the content file's directory entry was not yet durable
//! while sled's record naming it was; see `docs/architecture.md`), and an
//! empty file is a version that existed, so the name keeps working; the
//! bytes written before the power cut without an `fsync` are lost, as on a
//! local disk. `check` lists what this scan did. Extended attributes and
//! orphan marks of inodes that have no record are removed too.
//!
//! A start after a clean stop skips the scan. [`Store::mark_clean`] runs
//! last at a clean stop, once nothing else can change the store (syncd's
//! filesystem and network runtimes have stopped, so no request or remote
//! change is still running, see `main.rs`; no `check --repair` runs,
//! [`Repairs`]), and only while no content file of an old generation is
//! kept for an open handle. The content directory then
//! holds exactly the current content of every named file (the spares
//! were removed, the freed inodes reclaimed, the directory and sled
//! flushed), and the mark, written and flushed after that, says so (its
//! value is the run's handle epoch, which every start advances, so a run
//! that knew nothing of marks voids it). The
//! next start takes the mark away, durably, before anything can change
//! ([`Store::take_clean_mark`]), and skips the scan. Any other end (a
//! kill, a crash, a power cut, a stop that timed out) leaves no mark, and
//! the scan runs. The scan's time grows with the number of files: it was
//! nearly all of a start with a million files (see docs/architecture.md,
//! "Start-up").
//!
//! `check` scans the whole store and the content directory while the store
//! serves, without a snapshot: an operation running at the same moment can
//! make the store look inconsistent for an instant. So a scan that finds
//! anything is repeated (after the reclaimer has caught up), and only what
//! both scans found is reported. Content files younger than
//! [`YOUNG_CONTENT`] and spares are left out: a `create` may be about to
//! name them. With `repair`, each fix runs in its own transaction that
//! checks the inconsistency is still there, and a last scan reports what is
//! left.

use super::records::{
    DirentRec, InodeRec, META_CLEAN_STOP, be_u64, cookie_key, decode, dirent_key, ino_key,
};
use super::{Store, reclaim, store_err};
use ipc_schema::{CheckFinding, CheckKind, CheckReport, FileKind, FsError, Ino, Name, fs_err};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Content files younger than this are not reported as unreferenced.
pub const YOUNG_CONTENT: Duration = Duration::from_secs(60);

/// The repairs running (`keibictl check --repair`, on the control
/// runtime, which a stop does not wait for: its other calls only read),
/// and whether the stop was marked clean. Either a repair sees the mark
/// coming and is refused, or the mark sees the repair and is not written
/// (both sides write their own flag, then read the other's, `SeqCst`).
#[derive(Debug, Default)]
pub(crate) struct Repairs {
    running: AtomicUsize,
    closed: AtomicBool,
}

/// One running repair; ends when dropped.
pub(crate) struct Repairing<'a>(&'a AtomicUsize);

impl Drop for Repairing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Repairs {
    /// A repair begins; refused (ESHUTDOWN) once the stop is being marked.
    pub(crate) fn begin(&self) -> Result<Repairing<'_>, FsError> {
        self.running.fetch_add(1, Ordering::SeqCst);
        let r = Repairing(&self.running);
        if self.closed.load(Ordering::SeqCst) {
            return Err(fs_err!(ESHUTDOWN, "keibi-syncd is stopping; no repair now"));
        }
        Ok(r)
    }

    /// No repair may begin from now on; answers whether none is running.
    pub(crate) fn close(&self) -> bool {
        self.closed.store(true, Ordering::SeqCst);
        self.running.load(Ordering::SeqCst) == 0
    }
}

/// Re-exported for the store: one finding.
pub type Finding = CheckFinding;

/// How a finding is repaired.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fix {
    /// Cannot be repaired without guessing.
    None,
    RecreateContent(u64),
    /// A content file (inode, generation) of an inode with no record.
    RemoveContent(u64, u64),
    RemoveEntry {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
    },
    SetNlink {
        ino: u64,
        from: u32,
        to: u32,
    },
    SetDirCounts {
        ino: u64,
        nlink: u32,
        entries: u64,
        next_cookie: u64,
    },
    SetParent {
        ino: u64,
        parent: u64,
    },
    MarkOrphan(u64, bool),
    RemoveCookie {
        parent: u64,
        cookie: u64,
    },
    GiveCookie {
        parent: u64,
        name: Vec<u8>,
    },
    RemoveXattrs(u64),
}

/// A finding with its repair and a key that identifies it across scans.
#[derive(Clone, Debug)]
struct Raw {
    key: String,
    finding: CheckFinding,
    fix: Fix,
}

fn raw(kind: CheckKind, ino: Option<u64>, detail: String, fix: Fix) -> Raw {
    Raw {
        key: format!("{kind:?} {ino:?} {fix:?}"),
        finding: CheckFinding {
            kind,
            ino: ino.map(Ino),
            detail,
            repaired: false,
        },
        fix,
    }
}

fn shown(name: &[u8]) -> String {
    format!("{:?}", Name(name.to_vec()))
}

impl Store {
    /// Mark the store as stopped cleanly (see the module doc). Call it
    /// last, when nothing else can use the store any more. Answers whether
    /// the mark was written: not while content of old generations is kept
    /// for open handles (logged; the next start scans).
    pub fn mark_clean(&self) -> Result<bool, FsError> {
        if !self.repairs.close() {
            tracing::info!(
                "not marking the stop clean: a `keibictl check --repair` is still running; the next start scans the store"
            );
            return Ok(false);
        }
        let kept = self.lock_opens().old_generations_kept();
        if kept > 0 {
            tracing::info!(
                kept,
                "not marking the stop clean: content files of old generations are still kept for open handles; the next start scans the store"
            );
            return Ok(false);
        }
        self.flush()?;
        self.meta
            .insert(META_CLEAN_STOP, self.run_epoch()?)
            .map_err(|e| store_err("writing the clean-stop mark", e))?;
        self.flush_store()?;
        Ok(true)
    }

    /// At start, before anything can change: whether the last stop was
    /// clean. The mark is taken away and that is made durable first, so
    /// that any end from now on but another clean stop leaves none.
    pub(crate) fn take_clean_mark(&self) -> Result<bool, FsError> {
        let Some(mark) = self
            .meta
            .remove(META_CLEAN_STOP)
            .map_err(|e| store_err("reading the clean-stop mark", e))?
        else {
            return Ok(false);
        };
        self.flush_store()?;
        // The mark names the run that wrote it: a run that started since
        // (an older keibi-syncd, which knows no mark) voids it.
        let valid = mark == self.run_epoch()?;
        if !valid {
            tracing::info!("the clean-stop mark is from an earlier run; scanning");
        }
        Ok(valid)
    }

    /// The number of the current run: the handle epoch, which every
    /// start advances ([`Store::begin_handle_epoch`]); empty before the
    /// first.
    fn run_epoch(&self) -> Result<sled::IVec, FsError> {
        Ok(self
            .meta
            .get(super::files::META_HANDLE_EPOCH)
            .map_err(|e| store_err("reading the handle epoch", e))?
            .unwrap_or_default())
    }

    /// The start-up scan (see the module doc). Returns what it repaired
    /// that `check` should show.
    pub(crate) fn recover(&self) -> Result<Vec<Finding>, FsError> {
        let listed: HashSet<(u64, u64)> = self
            .content
            .list()
            .map_err(|e| FsError::io("listing the content directory", &e))?
            .into_iter()
            .collect();
        let mut named = HashSet::new();
        let mut recovered = Vec::new();
        for item in self.inodes.iter() {
            let (k, v) = item.map_err(|e| store_err("scanning inodes", e))?;
            let (Some(ino), Ok(rec)) = (be_u64(&k), decode::<InodeRec>(&v)) else {
                continue;
            };
            if rec.kind != FileKind::File {
                continue;
            }
            named.insert((ino, rec.generation));
            if listed.contains(&(ino, rec.generation)) {
                continue;
            }
            self.content
                .create_gen(ino, rec.generation, nix::fcntl::OFlag::O_WRONLY)
                .map(drop)
                .map_err(|e| FsError::io(format!("recreating the content of {}", Ino(ino)), &e))?;
            tracing::warn!(
                ino,
                "the content file of a named regular file was missing (a power cut before it was durable?); recreated it empty"
            );
            recovered.push(CheckFinding {
                kind: CheckKind::RecoveredAtStart,
                ino: Some(Ino(ino)),
                detail: format!(
                    "{}: content file missing at start; recreated empty",
                    Ino(ino)
                ),
                repaired: true,
            });
        }
        if !recovered.is_empty() {
            self.content
                .sync_dir()
                .map_err(|e| FsError::io("syncing the content directory", &e))?;
        }
        // Every file that is not the current generation of a regular file:
        // unused spares, content of inodes freed before a crash, and older
        // generations (nothing is open at start).
        let unnamed: Vec<(u64, u64)> = listed.difference(&named).copied().collect();
        if !unnamed.is_empty() {
            // The state read above must be on disk before content goes
            // because of it: after a kill -9, sled's log may be only in
            // the page cache, and a power cut now would bring back names
            // of these files.
            self.content
                .sync_filesystem()
                .map_err(|e| FsError::io("syncing the state directory's filesystem", &e))?;
        }
        let mut removed = 0usize;
        for &(ino, generation) in &unnamed {
            self.content
                .remove(ino, generation)
                .map_err(|e| FsError::io(format!("removing the content of {}", Ino(ino)), &e))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed content files that no inode names (left by a crash, or unused spares)"
            );
        }
        let mut gone = BTreeSet::new();
        for item in self.xattrs.iter().keys() {
            let k = item.map_err(|e| store_err("scanning xattrs", e))?;
            if let Some(ino) = be_u64(&k)
                && !gone.contains(&ino)
                && self.read_inode(ino).ok().flatten().is_none()
            {
                gone.insert(ino);
            }
        }
        for &ino in &gone {
            reclaim::remove_xattrs(&self.xattrs, ino);
        }
        if !gone.is_empty() {
            tracing::info!(
                inodes = gone.len(),
                "removed extended attributes of inodes that no longer exist"
            );
        }
        for item in self.orphans.iter().keys() {
            let k = item.map_err(|e| store_err("scanning orphans", e))?;
            if let Some(ino) = be_u64(&k)
                && self.read_inode(ino).ok().flatten().is_none()
            {
                let _ = self.orphans.remove(k);
            }
        }
        Ok(recovered)
    }

    /// Scan the store and the content directory and report every
    /// inconsistency; with `repair`, fix what can be fixed without
    /// guessing (see the module doc). Blocking; a full scan.
    pub fn check(&self, repair: bool) -> Result<CheckReport, FsError> {
        self.check_with(repair, YOUNG_CONTENT)
    }

    /// [`Store::check`], leaving out content files changed in the last
    /// `young`.
    pub(crate) fn check_with(&self, repair: bool, young: Duration) -> Result<CheckReport, FsError> {
        let _repairing = match repair {
            true => Some(self.repairs.begin()?),
            false => None,
        };
        if !self.reclaim.settle() {
            tracing::warn!(
                "check: freed inodes are still waiting for a flush; their content files may be reported"
            );
        }
        let (mut report, first) = self.scan(young)?;
        let mut found = first;
        if !found.is_empty() {
            // Confirm: what an operation in flight showed for an instant
            // is gone in the second scan.
            let _ = self.reclaim.settle();
            let (again, second) = self.scan(young)?;
            report = again;
            let keys: HashSet<String> = second.iter().map(|r| r.key.clone()).collect();
            found.retain(|r| keys.contains(&r.key));
        }
        if repair && found.iter().any(|r| r.fix != Fix::None) {
            // Structural fixes first, counts after.
            found.sort_by_key(|r| match r.fix {
                Fix::RemoveEntry { .. } | Fix::RemoveCookie { .. } | Fix::GiveCookie { .. } => 0,
                _ => 1,
            });
            for r in &mut found {
                match self.apply(&r.fix, young) {
                    Ok(true) => {
                        tracing::info!(detail = %r.finding.detail, "check: repaired");
                        r.finding.repaired = true;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        r.finding.detail = format!("{} (repair failed: {e})", r.finding.detail);
                    }
                }
            }
            // What is left after the repairs.
            let _ = self.reclaim.settle();
            let (after, left) = self.scan(young)?;
            report = after;
            let known: HashSet<String> = found.iter().map(|r| r.key.clone()).collect();
            for r in left {
                if !known.contains(&r.key) {
                    found.push(r);
                } else if let Some(f) = found.iter_mut().find(|f| f.key == r.key) {
                    f.finding.repaired = false;
                }
            }
        }
        report.findings = found.into_iter().map(|r| r.finding).collect();
        report.recovered_at_start = self.recovered_at_start();
        Ok(report)
    }

    /// One scan: the counts, and every inconsistency with its fix.
    fn scan(&self, young: Duration) -> Result<(CheckReport, Vec<Raw>), FsError> {
        let mut out = Vec::new();
        let mut report = CheckReport::default();
        // Content files first: a file created after this list cannot be
        // reported as unreferenced.
        let mut content: HashSet<(u64, u64)> = self
            .content
            .list()
            .map_err(|e| FsError::io("listing the content directory", &e))?
            .into_iter()
            .collect();
        report.content_files = content.len() as u64;
        let mut inodes: BTreeMap<u64, InodeRec> = BTreeMap::new();
        for item in self.inodes.iter() {
            let (k, v) = item.map_err(|e| store_err("scanning inodes", e))?;
            let Some(ino) = be_u64(&k) else { continue };
            report.inodes += 1;
            match decode::<InodeRec>(&v) {
                Ok(rec) => {
                    inodes.insert(ino, rec);
                }
                Err(e) => out.push(raw(
                    CheckKind::Corrupt,
                    Some(ino),
                    format!("{}: record cannot be decoded: {e}", Ino(ino)),
                    Fix::None,
                )),
            }
        }
        // Entries: links per inode, entries and subdirectories per
        // directory, the entry naming each directory, the highest cookie.
        let mut links: HashMap<u64, u32> = HashMap::new();
        let mut entries: HashMap<u64, u64> = HashMap::new();
        let mut subdirs: HashMap<u64, u32> = HashMap::new();
        let mut named_in: HashMap<u64, u64> = HashMap::new();
        let mut max_cookie: HashMap<u64, u64> = HashMap::new();
        for item in self.dirents.iter() {
            let (k, v) = item.map_err(|e| store_err("scanning entries", e))?;
            let (Some(parent), name) = (be_u64(&k), k.get(8..).unwrap_or_default()) else {
                continue;
            };
            report.entries += 1;
            let d: DirentRec = match decode(&v) {
                Ok(d) => d,
                Err(e) => {
                    out.push(raw(
                        CheckKind::Corrupt,
                        Some(parent),
                        format!(
                            "entry {} in {}: cannot be decoded: {e}",
                            shown(name),
                            Ino(parent)
                        ),
                        Fix::None,
                    ));
                    continue;
                }
            };
            *entries.entry(parent).or_default() += 1;
            if d.kind == FileKind::Directory {
                *subdirs.entry(parent).or_default() += 1;
                named_in.insert(d.ino, parent);
            }
            let m = max_cookie.entry(parent).or_default();
            *m = (*m).max(d.cookie);
            if inodes.contains_key(&d.ino) {
                *links.entry(d.ino).or_default() += 1;
            } else if !self.inodes.contains_key(ino_key(d.ino)).unwrap_or(true) {
                out.push(raw(
                    CheckKind::EntryWithoutInode,
                    Some(d.ino),
                    format!(
                        "entry {} in {} names {}, which has no record",
                        shown(name),
                        Ino(parent),
                        Ino(d.ino)
                    ),
                    Fix::RemoveEntry {
                        parent,
                        name: name.to_vec(),
                        ino: d.ino,
                    },
                ));
            }
            match self
                .cookies
                .get(cookie_key(parent, d.cookie))
                .map_err(|e| store_err("scanning cookies", e))?
            {
                Some(n) if n.as_ref() == name => {}
                _ => out.push(raw(
                    CheckKind::Cookie,
                    Some(parent),
                    format!(
                        "entry {} in {} has cookie {}, which does not name it",
                        shown(name),
                        Ino(parent),
                        d.cookie
                    ),
                    Fix::GiveCookie {
                        parent,
                        name: name.to_vec(),
                    },
                )),
            }
        }
        for item in self.cookies.iter() {
            let (k, name) = item.map_err(|e| store_err("scanning cookies", e))?;
            let (Some(parent), Some(cookie)) = (be_u64(&k), k.get(8..).and_then(be_u64)) else {
                continue;
            };
            let ok = match self
                .dirents
                .get(dirent_key(parent, &name))
                .map_err(|e| store_err("scanning entries", e))?
            {
                Some(v) => decode::<DirentRec>(&v).is_ok_and(|d| d.cookie == cookie),
                None => false,
            };
            if !ok {
                out.push(raw(
                    CheckKind::Cookie,
                    Some(parent),
                    format!(
                        "cookie {cookie} in {} names {}, which has no entry with that cookie",
                        Ino(parent),
                        shown(&name)
                    ),
                    Fix::RemoveCookie { parent, cookie },
                ));
            }
        }
        let mut orphans = HashSet::new();
        for item in self.orphans.iter().keys() {
            let k = item.map_err(|e| store_err("scanning orphans", e))?;
            if let Some(ino) = be_u64(&k) {
                orphans.insert(ino);
                if !inodes.contains_key(&ino) {
                    out.push(raw(
                        CheckKind::OrphanMark,
                        Some(ino),
                        format!("orphan mark of {}, which has no record", Ino(ino)),
                        Fix::MarkOrphan(ino, false),
                    ));
                }
            }
        }
        let opens = self.lock_opens();
        let open: HashSet<u64> = inodes
            .keys()
            .copied()
            .filter(|&i| opens.held(Ino(i)))
            .collect();
        drop(opens);
        for (&ino, rec) in &inodes {
            self.check_inode(
                ino,
                rec,
                &mut content,
                links.get(&ino).copied().unwrap_or(0),
                (
                    entries.get(&ino).copied().unwrap_or(0),
                    subdirs.get(&ino).copied().unwrap_or(0),
                    max_cookie.get(&ino).copied().unwrap_or(0),
                ),
                named_in.get(&ino).copied(),
                orphans.contains(&ino),
                open.contains(&ino),
                &mut out,
            );
        }
        let spares: HashSet<u64> = self.spares.ready_list().into_iter().collect();
        // Other generations of a live inode are not listed: an open handle
        // may still read one, and the next start removes the rest.
        let mut unreferenced: Vec<(u64, u64)> = content
            .into_iter()
            .filter(|(ino, _)| !inodes.contains_key(ino))
            .collect();
        unreferenced.sort_unstable();
        for (ino, generation) in unreferenced {
            if (generation == 0 && spares.contains(&ino))
                || self.young_content(ino, generation, young)
            {
                continue;
            }
            out.push(raw(
                CheckKind::UnreferencedContent,
                Some(ino),
                format!("content file of {}, which has no record", Ino(ino)),
                Fix::RemoveContent(ino, generation),
            ));
        }
        let mut xattr_inos = BTreeSet::new();
        for item in self.xattrs.iter().keys() {
            let k = item.map_err(|e| store_err("scanning xattrs", e))?;
            if let Some(ino) = be_u64(&k)
                && !inodes.contains_key(&ino)
            {
                xattr_inos.insert(ino);
            }
        }
        for ino in xattr_inos {
            out.push(raw(
                CheckKind::XattrsWithoutInode,
                Some(ino),
                format!("extended attributes of {}, which has no record", Ino(ino)),
                Fix::RemoveXattrs(ino),
            ));
        }
        Ok((report, out))
    }

    #[allow(clippy::too_many_arguments)]
    fn check_inode(
        &self,
        ino: u64,
        rec: &InodeRec,
        content: &mut HashSet<(u64, u64)>,
        links: u32,
        (entries, subdirs, max_cookie): (u64, u32, u64),
        named_in: Option<u64>,
        orphan_mark: bool,
        open: bool,
        out: &mut Vec<Raw>,
    ) {
        let id = Ino(ino);
        if rec.kind == FileKind::File
            && !content.remove(&(ino, rec.generation))
            && !self.content_exists(ino, rec.generation)
        {
            out.push(raw(
                CheckKind::MissingContent,
                Some(ino),
                format!("{id} is a regular file with {links} name(s) and no content file"),
                Fix::RecreateContent(ino),
            ));
        }
        if rec.is_dir() {
            let root = ino == Ino::ROOT.0;
            let want_nlink = 2 + subdirs;
            let next_cookie = rec.next_cookie.max(max_cookie + 1);
            if rec.nlink != want_nlink || rec.entries != entries || next_cookie != rec.next_cookie {
                out.push(raw(
                    CheckKind::DirectoryCounts,
                    Some(ino),
                    format!(
                        "directory {id}: nlink {} (should be {want_nlink}), entries {} (should be {entries}), next cookie {} (should be at least {})",
                        rec.nlink,
                        rec.entries,
                        rec.next_cookie,
                        max_cookie + 1
                    ),
                    Fix::SetDirCounts {
                        ino,
                        nlink: want_nlink,
                        entries,
                        next_cookie,
                    },
                ));
            }
            if root {
                if rec.parent != ino {
                    out.push(raw(
                        CheckKind::DirectoryParent,
                        Some(ino),
                        format!("the root's parent is {}, not itself", Ino(rec.parent)),
                        Fix::SetParent { ino, parent: ino },
                    ));
                }
                return;
            }
            match named_in {
                None => out.push(raw(
                    CheckKind::Unreachable,
                    Some(ino),
                    format!("directory {id} is named by no entry"),
                    Fix::None,
                )),
                Some(p) if p != rec.parent => out.push(raw(
                    CheckKind::DirectoryParent,
                    Some(ino),
                    format!(
                        "directory {id} is in {} but its parent pointer says {}",
                        Ino(p),
                        Ino(rec.parent)
                    ),
                    Fix::SetParent { ino, parent: p },
                )),
                Some(_) => {}
            }
            return;
        }
        if links > 0 {
            if rec.nlink != links {
                out.push(raw(
                    CheckKind::LinkCount,
                    Some(ino),
                    format!(
                        "{id} has link count {} but {links} entries name it",
                        rec.nlink
                    ),
                    Fix::SetNlink {
                        ino,
                        from: rec.nlink,
                        to: links,
                    },
                ));
            }
            if orphan_mark {
                out.push(raw(
                    CheckKind::OrphanMark,
                    Some(ino),
                    format!("{id} has names but an orphan mark"),
                    Fix::MarkOrphan(ino, false),
                ));
            }
            return;
        }
        if open {
            // Unlinked and open, or referenced by a mount's kernel: an
            // orphan, as it should be.
            if !orphan_mark {
                out.push(raw(
                    CheckKind::OrphanMark,
                    Some(ino),
                    format!(
                        "{id} is open (or in use by the kernel) with no name but has no orphan mark"
                    ),
                    Fix::MarkOrphan(ino, true),
                ));
            }
            return;
        }
        out.push(raw(
            CheckKind::Unreachable,
            Some(ino),
            if rec.nlink == 0 {
                format!(
                    "{id} is unlinked and neither open nor in use by a mount's kernel (freed by the next registration of a mount)"
                )
            } else {
                format!("{id} has link count {} but no entry names it", rec.nlink)
            },
            Fix::None,
        ));
    }

    fn content_exists(&self, ino: u64, generation: u64) -> bool {
        match self.content.stat(ino, generation) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        }
    }

    /// Whether the content file of `ino` changed in the last `young` (or
    /// cannot be looked at): a create may be about to name it.
    fn young_content(&self, ino: u64, generation: u64, young: Duration) -> bool {
        let Ok(cs) = self.content.stat(ino, generation) else {
            return true;
        };
        let now = ipc_schema::Timestamp::now();
        now.secs.saturating_sub(cs.ctime.secs) < young.as_secs() as i64
    }

    /// Apply one fix if its inconsistency is still there. Ok(false): it
    /// was not (or cannot be repaired).
    fn apply(&self, fix: &Fix, young: Duration) -> Result<bool, FsError> {
        use super::tx::fail;
        match fix {
            Fix::None => Ok(false),
            Fix::RecreateContent(ino) => {
                let generation = match self.read_inode(*ino)? {
                    Some(r) if r.kind == FileKind::File => r.generation,
                    _ => return Ok(false),
                };
                if self.content_exists(*ino, generation) {
                    return Ok(false);
                }
                self.content
                    .create_gen(*ino, generation, nix::fcntl::OFlag::O_WRONLY)
                    .and_then(|_| self.content.sync_dir())
                    .map_err(|e| {
                        FsError::io(format!("recreating the content of {}", Ino(*ino)), &e)
                    })?;
                Ok(true)
            }
            Fix::RemoveContent(ino, generation) => {
                if self.read_inode(*ino)?.is_some() || self.young_content(*ino, *generation, young)
                {
                    return Ok(false);
                }
                self.content.remove(*ino, *generation).map_err(|e| {
                    FsError::io(format!("removing the content of {}", Ino(*ino)), &e)
                })?;
                Ok(true)
            }
            Fix::RemoveXattrs(ino) => {
                if self.read_inode(*ino)?.is_some() {
                    return Ok(false);
                }
                reclaim::remove_xattrs(&self.xattrs, *ino);
                Ok(true)
            }
            Fix::RemoveEntry { parent, name, ino } => self.tx(|t| {
                let Some(d) = t.entry(*parent, name)? else {
                    return Ok(false);
                };
                if d.ino != *ino || t.inode(*ino)?.is_some() {
                    return Ok(false);
                }
                let mut dir = t.need(*parent)?;
                t.remove_entry(*parent, &mut dir, name, &d)?;
                if d.kind == FileKind::Directory {
                    dir.nlink = dir.nlink.saturating_sub(1).max(2);
                }
                t.put(*parent, &dir)?;
                Ok(true)
            }),
            Fix::SetNlink { ino, from, to } => self.tx(|t| match t.inode(*ino)? {
                Some(mut r) if r.nlink == *from => {
                    r.nlink = *to;
                    t.put(*ino, &r)?;
                    Ok(true)
                }
                _ => Ok(false),
            }),
            Fix::SetDirCounts {
                ino,
                nlink,
                entries,
                next_cookie,
            } => self.tx(|t| match t.inode(*ino)? {
                Some(mut r) if r.is_dir() => {
                    r.nlink = *nlink;
                    r.entries = *entries;
                    r.next_cookie = r.next_cookie.max(*next_cookie);
                    t.put(*ino, &r)?;
                    Ok(true)
                }
                _ => Ok(false),
            }),
            Fix::SetParent { ino, parent } => self.tx(|t| match t.inode(*ino)? {
                Some(mut r) if r.is_dir() && r.parent != *parent => {
                    r.parent = *parent;
                    t.put(*ino, &r)?;
                    Ok(true)
                }
                _ => Ok(false),
            }),
            Fix::MarkOrphan(ino, mark) => {
                let k = ino_key(*ino);
                let r = if *mark {
                    self.orphans.insert(k, &[][..]).map(|_| ())
                } else {
                    self.orphans.remove(k).map(|_| ())
                };
                r.map_err(|e| store_err("changing an orphan mark", e))?;
                Ok(true)
            }
            Fix::RemoveCookie { parent, cookie } => self.tx(|t| {
                let Some(name) = t.cookies.get(cookie_key(*parent, *cookie))? else {
                    return Ok(false);
                };
                if t.entry(*parent, &name)?
                    .is_some_and(|d| d.cookie == *cookie)
                {
                    return Ok(false);
                }
                t.cookies.remove(&cookie_key(*parent, *cookie))?;
                Ok(true)
            }),
            Fix::GiveCookie { parent, name } => self.tx(|t| {
                let Some(mut d) = t.entry(*parent, name)? else {
                    return Ok(false);
                };
                if t.cookies
                    .get(cookie_key(*parent, d.cookie))?
                    .is_some_and(|n| n.as_ref() == name.as_slice())
                {
                    return Ok(false);
                }
                let Some(mut dir) = t.inode(*parent)? else {
                    return fail(fs_err!(ENOENT, "no directory {}", Ino(*parent)));
                };
                d.cookie = dir.next_cookie;
                dir.next_cookie += 1;
                t.set_entry(*parent, name, &d)?;
                t.cookies
                    .insert(&cookie_key(*parent, d.cookie), name.as_slice())?;
                t.put(*parent, &dir)?;
                Ok(true)
            }),
        }
    }
}
