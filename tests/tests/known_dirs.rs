//! Lookups of names that do not exist, in a directory made through this
//! mount, are answered by mountd itself (`mountd/src/known_dirs.rs`):
//! with keibi-syncd frozen, such a lookup still answers `ENOENT` at once,
//! where a lookup in a directory mountd does not know (the root) misses
//! the deadline (`ETIMEDOUT`). Names added, renamed and removed through
//! the mount keep the list exact; a name a peer adds to such a directory
//! shows on this mount (the announcement drops the list, not only the
//! kernel's negative entry).

use harness::daemons::{KeibiFixture, Options};
use harness::pair::{LinkMode, Pair, PairOptions};
use harness::sync_helpers::PROPAGATION;
use harness::wait::poll_until;
use harness::{Watchdog, assert_errno};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(240);
/// Far below the 60 s entry TTL the kernel is given by default.
const SOON: Duration = Duration::from_secs(15);

#[test]
fn absent_names_of_a_directory_made_here_are_answered_without_syncd() {
    let _w = Watchdog::arm("known_dirs::local", LIMIT);
    let fx = KeibiFixture::start(Options::default());
    let d = fx.path("d");
    std::fs::create_dir(&d).expect("mkdir d");
    for name in ["a", "b", "c"] {
        std::fs::write(d.join(name), name).expect("create in d");
    }
    std::fs::rename(d.join("a"), d.join("a2")).expect("rename a to a2");
    std::fs::remove_file(d.join("b")).expect("unlink b");
    std::fs::create_dir(d.join("sub")).expect("mkdir d/sub");
    // The directory's attributes, dropped by the kernel after each change
    // in it, are fresh again: the path walk below needs nothing of syncd.
    std::fs::metadata(&d).expect("stat d");

    fx.freeze_syncd();
    let t0 = Instant::now();
    for name in ["missing", "a", "b", "sub/x"] {
        assert_errno(
            std::fs::metadata(d.join(name)),
            libc::ENOENT,
            &format!("stat d/{name} with syncd frozen"),
        );
    }
    let local = t0.elapsed();
    // A directory mountd did not make (the mount's root): the lookup
    // needs syncd and misses the deadline.
    assert_errno(
        std::fs::metadata(fx.path("missing-at-root")),
        libc::ETIMEDOUT,
        "stat of a missing name in the root with syncd frozen",
    );
    fx.thaw_syncd();
    assert!(
        local < fx.options().deadline,
        "the absences took {local:?}, as long as a call to syncd"
    );

    // What exists is still found, through syncd.
    assert_eq!(std::fs::read(d.join("a2")).expect("read a2"), b"a");
    assert_eq!(std::fs::read(d.join("c")).expect("read c"), b"c");
    assert!(d.join("sub").is_dir());
    let mut names: Vec<String> = std::fs::read_dir(&d)
        .expect("list d")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a2", "c", "sub"]);
}

#[test]
fn a_name_a_peer_adds_to_a_directory_made_here_shows() {
    let _w = Watchdog::arm("known_dirs::peer", LIMIT);
    let p = Pair::start(PairOptions::new(LinkMode::Loopback));
    std::fs::create_dir(p.a.path("d")).expect("mkdir d on a");
    poll_until("b to see d", PROPAGATION, || {
        p.b.path("d").is_dir().then_some(())
    });
    // a answers the absence from its list of d, and the kernel caches it
    // as a negative entry for the 60 s TTL.
    assert_errno(
        std::fs::metadata(p.a.path("d/x")),
        libc::ENOENT,
        "stat d/x on a before b creates it",
    );
    std::fs::write(p.b.path("d/x"), b"from b\n").expect("create d/x on b");
    poll_until("a to see b's d/x", SOON, || {
        (std::fs::read(p.a.path("d/x")).ok()? == b"from b\n").then_some(())
    });
    // And a's own changes in d go on as before.
    std::fs::write(p.a.path("d/y"), b"from a\n").expect("create d/y on a");
    assert_errno(
        std::fs::metadata(p.a.path("d/z")),
        libc::ENOENT,
        "stat d/z on a",
    );
}
