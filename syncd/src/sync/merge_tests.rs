//! Tests of the merge rules: every case of [`decide`], the conflict
//! names, and a proptest that replicas applying the same records in any
//! order converge.

use super::*;
use crate::sync::model::ChunkHash;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn dev(n: u8) -> DeviceId {
    DeviceId([n; 8])
}

fn vv(pairs: &[(u8, u64)]) -> VersionVector {
    VersionVector(pairs.iter().map(|(d, c)| (dev(*d), *c)).collect())
}

fn at(secs: i64) -> Timestamp {
    Timestamp { secs, nanos: 0 }
}

/// A file record of object 1 in the root named `a.txt`, made by `by`,
/// whose content is `content` (one chunk).
pub(crate) fn file_rec(by: u8, pairs: &[(u8, u64)], content: &[u8]) -> ObjRec {
    ObjRec {
        gid: Gid::new(dev(1), 1),
        vv: vv(pairs),
        modified_by: dev(by),
        deleted: false,
        kind: FileKind::File,
        names: vec![EntryName {
            parent: Gid::ROOT,
            name: b"a.txt".to_vec(),
        }],
        perm: 0o644,
        mtime: at(100),
        size: content.len() as u64,
        chunks: if content.is_empty() {
            Vec::new()
        } else {
            vec![ChunkHash::of(content)]
        },
        target: Vec::new(),
    }
}

fn tomb(rec: &ObjRec, by: u8, pairs: &[(u8, u64)]) -> ObjRec {
    ObjRec {
        vv: vv(pairs),
        modified_by: dev(by),
        deleted: true,
        names: Vec::new(),
        size: 0,
        chunks: Vec::new(),
        ..rec.clone()
    }
}

fn dir_rec(by: u8, pairs: &[(u8, u64)], name: &[u8], mtime: i64) -> ObjRec {
    ObjRec {
        kind: FileKind::Directory,
        names: vec![EntryName {
            parent: Gid::ROOT,
            name: name.to_vec(),
        }],
        perm: 0o755,
        mtime: at(mtime),
        size: 0,
        chunks: Vec::new(),
        ..file_rec(by, pairs, b"")
    }
}

fn stored(o: Outcome) -> (ObjRec, Option<ConflictCopy>, bool) {
    match o {
        Outcome::Store {
            rec,
            copy,
            conflict,
        } => (rec, copy, conflict),
        Outcome::Ignore => panic!("expected a record to store, got Ignore"),
    }
}

#[test]
fn an_unknown_object_is_stored_as_it_came() {
    let r = file_rec(2, &[(2, 1)], b"x");
    assert_eq!(decide(None, &r), store(r.clone(), None, false));
}

#[test]
fn an_older_or_equal_version_is_ignored() {
    let local = file_rec(1, &[(1, 2), (2, 1)], b"new");
    assert_eq!(
        decide(Some(&local), &file_rec(2, &[(2, 1)], b"old")),
        Outcome::Ignore
    );
    assert_eq!(decide(Some(&local), &local.clone()), Outcome::Ignore);
    // A tombstone older than a live version is ignored too.
    assert_eq!(
        decide(Some(&local), &tomb(&local, 2, &[(2, 1)])),
        Outcome::Ignore
    );
}

#[test]
fn a_newer_version_is_stored_as_it_came_whatever_its_state() {
    let local = file_rec(1, &[(1, 1)], b"x");
    for remote in [
        file_rec(2, &[(1, 1), (2, 1)], b"y"),
        tomb(&local, 2, &[(1, 1), (2, 1)]),
        ObjRec {
            mtime: at(1),
            ..file_rec(2, &[(1, 1), (2, 1)], b"y")
        },
    ] {
        assert_eq!(
            decide(Some(&local), &remote),
            store(remote.clone(), None, false),
            "even an older mtime: the vector decides"
        );
    }
}

/// Both sides of a concurrent pair decide the same record (and copy).
fn both_sides(a: &ObjRec, b: &ObjRec) -> (ObjRec, Option<ObjRec>, bool) {
    let (ra, ca, fa) = stored(decide(Some(a), b));
    let (rb, cb, fb) = stored(decide(Some(b), a));
    assert_eq!(ra, rb, "both peers store the same record");
    assert_eq!(fa, fb);
    let ca_rec = ca.as_ref().map(|c| c.rec.clone());
    assert_eq!(ca_rec, cb.as_ref().map(|c| c.rec.clone()), "the same copy");
    if let (Some(ca), Some(cb)) = (&ca, &cb) {
        assert_ne!(ca.from_local, cb.from_local, "one side has the loser");
    }
    assert_eq!(ra.vv, a.vv.merged(&b.vv), "merged, not bumped");
    (ra, ca_rec, fa)
}

#[test]
fn concurrent_tombstones_end_as_one_tombstone() {
    let base = file_rec(1, &[(1, 1)], b"x");
    let a = tomb(&base, 1, &[(1, 2)]);
    let b = tomb(&base, 2, &[(1, 1), (2, 1)]);
    let (rec, copy, conflict) = both_sides(&a, &b);
    assert!(rec.deleted);
    assert_eq!(copy, None);
    assert!(!conflict);
}

#[test]
fn concurrent_versions_of_the_same_state_merge_without_a_conflict() {
    let a = file_rec(1, &[(1, 2)], b"same");
    let b = file_rec(2, &[(1, 1), (2, 1)], b"same");
    let (rec, copy, conflict) = both_sides(&a, &b);
    assert!(rec.same_state(&a));
    assert_eq!(copy, None);
    assert!(!conflict);
}

#[test]
fn an_edit_wins_over_a_concurrent_delete_on_both_sides() {
    let base = file_rec(1, &[(1, 1)], b"x");
    // The delete is newer in time: the edit still wins.
    let edit = ObjRec {
        mtime: at(50),
        ..file_rec(1, &[(1, 2)], b"edited")
    };
    let delete = ObjRec {
        mtime: at(500),
        ..tomb(&base, 2, &[(1, 1), (2, 1)])
    };
    let (rec, copy, conflict) = both_sides(&edit, &delete);
    assert!(!rec.deleted);
    assert!(rec.same_state(&edit));
    assert_eq!(copy, None);
    assert!(conflict, "a delete undone counts as a conflict");
    // A live directory against a directory's tombstone: the live one.
    let d = dir_rec(1, &[(1, 2)], b"d", 10);
    let dt = tomb(&dir_rec(1, &[(1, 1)], b"d", 10), 2, &[(1, 1), (2, 1)]);
    let (rec, _, _) = both_sides(&d, &dt);
    assert!(!rec.deleted && rec.kind == FileKind::Directory);
}

#[test]
fn concurrent_directories_take_the_winner_without_a_copy() {
    let a = dir_rec(1, &[(1, 2)], b"renamed-on-a", 20);
    let b = dir_rec(2, &[(1, 1), (2, 1)], b"renamed-on-b", 10);
    let (rec, copy, conflict) = both_sides(&a, &b);
    assert_eq!(rec.names, a.names, "newer mtime wins");
    assert_eq!(copy, None);
    assert!(!conflict);
    // Same mtime: the greater device wins.
    let b = dir_rec(2, &[(1, 1), (2, 1)], b"renamed-on-b", 20);
    let (rec, _, _) = both_sides(&a, &b);
    assert_eq!(rec.names, b.names);
}

#[test]
fn concurrent_symlinks_take_the_winner_without_a_copy() {
    let link = |by, pairs: &[(u8, u64)], target: &[u8], mtime| ObjRec {
        kind: FileKind::Symlink,
        size: target.len() as u64,
        target: target.to_vec(),
        chunks: Vec::new(),
        mtime: at(mtime),
        ..file_rec(by, pairs, b"")
    };
    let a = link(1, &[(1, 2)], b"one", 5);
    let b = link(2, &[(1, 1), (2, 1)], b"other", 6);
    let (rec, copy, _) = both_sides(&a, &b);
    assert_eq!(rec.target, b"other");
    assert_eq!(copy, None);
}

#[test]
fn concurrent_files_with_the_same_content_take_the_winner_without_a_copy() {
    let a = ObjRec {
        perm: 0o600,
        ..file_rec(1, &[(1, 2)], b"same")
    };
    let b = ObjRec {
        mtime: at(200),
        ..file_rec(2, &[(1, 1), (2, 1)], b"same")
    };
    let (rec, copy, conflict) = both_sides(&a, &b);
    assert_eq!(rec.perm, b.perm);
    assert_eq!(copy, None);
    assert!(!conflict);
}

#[test]
fn concurrent_edits_keep_the_loser_as_a_conflict_copy() {
    let a = ObjRec {
        mtime: at(300),
        ..file_rec(1, &[(1, 2)], b"edit on a")
    };
    let b = ObjRec {
        mtime: at(200),
        ..file_rec(2, &[(1, 1), (2, 1)], b"edit on b")
    };
    let (rec, copy, conflict) = both_sides(&a, &b);
    assert!(conflict);
    assert_eq!(rec.chunks, a.chunks, "the newer edit wins");
    let copy = copy.expect("a conflict copy");
    assert_eq!(copy.chunks, b.chunks, "the copy keeps the loser's bytes");
    assert_eq!(copy.size, b.size);
    assert_eq!(copy.modified_by, b.modified_by);
    assert_eq!(copy.mtime, b.mtime);
    assert_eq!(copy.vv, VersionVector::default());
    assert_ne!(copy.gid, a.gid);
    assert_eq!(copy.names.len(), 1);
    assert_eq!(copy.names[0].parent, Gid::ROOT);
    assert_eq!(
        copy.names[0].name,
        b"a.sync-conflict-19700101-000320-02020202.txt".to_vec()
    );
    // The side that had the loser seeds the copy from its own content.
    let (_, c, _) = stored(decide(Some(&b), &a));
    assert!(c.expect("copy").from_local);
    let (_, c, _) = stored(decide(Some(&a), &b));
    assert!(!c.expect("copy").from_local);
}

#[test]
fn conflict_names_keep_the_extension_and_fit_255_bytes() {
    let t = Timestamp {
        secs: 1_764_480_000, // 2025-11-30T05:20:00Z
        nanos: 0,
    };
    let d = DeviceId([0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89]);
    let name = |n: &[u8]| String::from_utf8(conflict_name(n, t, d)).expect("utf-8");
    assert_eq!(
        name(b"report.pdf"),
        "report.sync-conflict-20251130-052000-abcdef01.pdf"
    );
    assert_eq!(
        name(b"archive.tar.gz"),
        "archive.tar.sync-conflict-20251130-052000-abcdef01.gz"
    );
    assert_eq!(
        name(b"Makefile"),
        "Makefile.sync-conflict-20251130-052000-abcdef01"
    );
    assert_eq!(
        name(b".bashrc"),
        ".bashrc.sync-conflict-20251130-052000-abcdef01"
    );
    assert_eq!(name(b"x."), "x.sync-conflict-20251130-052000-abcdef01.");
    // A long name is cut in the stem, never in the suffix or extension.
    let long = format!("{}.txt", "n".repeat(251));
    let out = name(long.as_bytes());
    assert_eq!(out.len(), 255);
    assert!(out.ends_with(".sync-conflict-20251130-052000-abcdef01.txt"));
    // UTF-8 is cut at a character boundary.
    let long = "é".repeat(127) + ".txt"; // 254 + 4 bytes
    let out = conflict_name(long.as_bytes(), t, d);
    assert!(out.len() <= 255);
    assert!(std::str::from_utf8(&out).is_ok(), "still valid UTF-8");
    // An extension too long to leave room for a stem is part of the stem.
    let long = format!("a.{}", "e".repeat(240));
    let out = conflict_name(long.as_bytes(), t, d);
    assert_eq!(out.len(), 255);
    assert!(out.ends_with(b".sync-conflict-20251130-052000-abcdef01"));
    // Non-UTF-8 bytes survive.
    let out = conflict_name(b"\xff\xfe.bin", t, d);
    assert!(out.starts_with(b"\xff\xfe.sync-conflict-"));
}

#[test]
fn the_original_name_of_a_conflict_copy_is_found_again() {
    let t = at(1_764_480_000);
    for name in [
        &b"report.pdf"[..],
        b"Makefile",
        b".bashrc",
        b"a.tar.gz",
        b"x.",
    ] {
        let copy = conflict_name(name, t, dev(7));
        assert_eq!(original_name(&copy).as_deref(), Some(name), "{copy:?}");
    }
    assert_eq!(original_name(b"plain.txt"), None);
    assert_eq!(original_name(b"x.sync-conflict-short"), None);
}

#[test]
fn the_collision_rule_picks_one_loser_whichever_side_asks() {
    let a = ObjRec {
        gid: Gid::new(dev(1), 5),
        mtime: at(10),
        ..file_rec(1, &[(1, 1)], b"a")
    };
    let b = ObjRec {
        gid: Gid::new(dev(2), 5),
        mtime: at(20),
        ..file_rec(2, &[(2, 1)], b"b")
    };
    assert!(collision_loser(&a, &b));
    assert!(!collision_loser(&b, &a));
    let same_time = ObjRec {
        mtime: at(10),
        ..b.clone()
    };
    assert_ne!(
        collision_loser(&a, &same_time),
        collision_loser(&same_time, &a)
    );
    let moved = renamed_for_collision(&a, &a.names[0]);
    assert_eq!(moved.vv, a.vv, "the vector is unchanged");
    assert_eq!(
        moved.names[0].name,
        conflict_name(b"a.txt", a.mtime, a.modified_by)
    );
}

/// A replica in the model: the recorded version of every object.
type Replica = BTreeMap<Gid, ObjRec>;

/// Apply `rec` to `replica` as the engine does; answers the records
/// stored (which a real peer would pass on).
fn model_apply(replica: &mut Replica, rec: &ObjRec) -> Vec<ObjRec> {
    let mut out = Vec::new();
    if let Outcome::Store { rec, copy, .. } = decide(replica.get(&rec.gid), rec) {
        if let Some(copy) = copy
            && let Outcome::Store { rec: c, .. } = decide(replica.get(&copy.rec.gid), &copy.rec)
        {
            replica.insert(c.gid, c.clone());
            out.push(c);
        }
        replica.insert(rec.gid, rec.clone());
        out.push(rec);
    }
    out
}

/// One step of the generated history of three devices sharing one file.
#[derive(Clone, Debug)]
enum Step {
    /// Device `d` edits the file (content `c`, mtime `t`), or deletes it.
    Edit { d: u8, c: u8, t: i64, delete: bool },
    /// Device `d` pulls everything device `e` has.
    Sync { d: u8, e: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..3, 0u8..3, 0i64..4, prop::bool::weighted(0.2))
            .prop_map(|(d, c, t, delete)| Step::Edit { d, c, t, delete }),
        (0u8..3, 0u8..3).prop_map(|(d, e)| Step::Sync { d, e }),
    ]
}

/// Run a history; answers every record any device stored, and the
/// edits (versions made by a device, not by a merge).
fn history(steps: &[Step]) -> (Vec<ObjRec>, Vec<ObjRec>) {
    let base = file_rec(0, &[(0, 1)], b"base");
    let mut devices: Vec<Replica> = (0..3).map(|_| Replica::new()).collect();
    let mut all = vec![base.clone()];
    let mut edits = vec![base.clone()];
    for d in &mut devices {
        d.insert(base.gid, base.clone());
    }
    for s in steps {
        match *s {
            Step::Edit { d, c, t, delete } => {
                let Some(cur) = devices[d as usize].get(&base.gid).cloned() else {
                    continue;
                };
                if cur.deleted {
                    continue;
                }
                let next = if delete {
                    ObjRec {
                        mtime: at(t),
                        ..tomb(&cur, d, &[])
                    }
                } else {
                    ObjRec {
                        mtime: at(t),
                        ..file_rec(d, &[], &[c])
                    }
                };
                let next = ObjRec {
                    vv: cur.vv.bumped(dev(d)),
                    modified_by: dev(d),
                    ..next
                };
                devices[d as usize].insert(next.gid, next.clone());
                all.push(next.clone());
                edits.push(next);
            }
            Step::Sync { d, e } => {
                let theirs: Vec<ObjRec> = devices[e as usize].values().cloned().collect();
                for r in theirs {
                    all.extend(model_apply(&mut devices[d as usize], &r));
                }
            }
        }
    }
    (all, edits)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Two replicas that apply the same records, each in its own order,
    /// then exchange what they stored, end with the same records (the
    /// winner and every conflict copy) within a few rounds, and no edit
    /// that was not superseded is lost.
    #[test]
    fn replicas_converge_whatever_the_order(
        steps in prop::collection::vec(step(), 0..14),
        seed_a in any::<u64>(),
        seed_b in any::<u64>(),
    ) {
        let (all, edits) = history(&steps);
        let shuffled = |seed: u64| {
            let mut v = all.clone();
            // Fisher-Yates with a small LCG: the order is the input.
            let mut x = seed | 1;
            for i in (1..v.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                v.swap(i, (x >> 33) as usize % (i + 1));
            }
            v
        };
        let run = |order: Vec<ObjRec>| {
            let mut r = Replica::new();
            for rec in &order {
                model_apply(&mut r, rec);
            }
            r
        };
        let mut a = run(shuffled(seed_a));
        let mut b = run(shuffled(seed_b));
        // Then the two exchange what they stored (as index exchange does)
        // until neither changes: a few rounds at most.
        let mut rounds = 0;
        loop {
            let before = (a.clone(), b.clone());
            let from_b: Vec<ObjRec> = b.values().cloned().collect();
            for rec in &from_b {
                model_apply(&mut a, rec);
            }
            let from_a: Vec<ObjRec> = a.values().cloned().collect();
            for rec in &from_a {
                model_apply(&mut b, rec);
            }
            rounds += 1;
            if (a.clone(), b.clone()) == before {
                break;
            }
            prop_assert!(rounds < 5, "no quiescence after {} rounds", rounds);
        }
        prop_assert_eq!(&a, &b);
        // No edit was lost: the content of every live edit that no
        // other edit superseded is in the winner or in a conflict copy.
        let kept: std::collections::BTreeSet<Vec<ChunkHash>> =
            a.values().filter(|r| !r.deleted).map(|r| r.chunks.clone()).collect();
        for e in edits.iter().filter(|e| !e.deleted) {
            let superseded = edits.iter().any(|o| {
                o.vv.compare(&e.vv) == crate::sync::model::Causality::Newer
            });
            if !superseded {
                prop_assert!(kept.contains(&e.chunks), "lost {:?}", e);
            }
        }
    }
}
