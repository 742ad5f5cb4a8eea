//! Two mounts of one keibi-syncd see each other's changes at once, not
//! after the kernel's attribute TTL (60 s by default): a change made
//! through one mount is announced to every other mount of that syncd
//! (`InvalQueue::push_from`), which drops the kernel's entries and
//! attributes and mountd's own list of a directory's names
//! (`known_dirs`). Each check below is bounded well under the TTL, and
//! two of them (a name added to a directory the other mount made, whose
//! absence that mount answers itself) could never pass without the
//! announcement.

use harness::daemons::{KeibiFixture, Options, START_TIMEOUT, mountd_command};
use harness::extra_mountd::ExtraMountd;
use harness::wait::poll_until;
use harness::{Watchdog, assert_errno};
use std::fs;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(240);
/// Far below the 60 s TTL the kernel is given by default.
const SOON: Duration = Duration::from_secs(15);

#[test]
fn two_mounts_of_one_syncd_see_each_others_changes_before_the_ttl_ends() {
    let _w = Watchdog::arm("two_mounts", LIMIT);
    let fx = KeibiFixture::start(Options::default());
    let b = fx.root().join("mnt2");
    fs::create_dir_all(&b).expect("mkdir the second mountpoint");
    let log = fx.root().join("mountd2.log");
    let mut cmd = mountd_command(
        &b,
        &fx.fs_socket(),
        &fx.root().join("locks2"),
        fx.options().deadline,
        fx.options().passthrough,
        &log,
    );
    let mut second = ExtraMountd::spawn(&mut cmd, &b, &log, true);
    second.wait_mounted(START_TIMEOUT);
    let a = fx.mnt();

    // d is made through a, so a knows every name in it.
    fs::create_dir(a.join("d")).expect("mkdir d on a");
    poll_until("b to see d", SOON, || b.join("d").is_dir().then_some(()));
    // a answers the absence of d/x from its list; b's kernel caches the
    // absence of d/y for the TTL.
    assert_errno(fs::metadata(a.join("d/x")), libc::ENOENT, "d/x on a");
    assert_errno(fs::metadata(b.join("d/y")), libc::ENOENT, "d/y on b");

    fs::write(b.join("d/x"), b"from b").expect("create d/x on b");
    poll_until("a to see b's d/x", SOON, || {
        (fs::read(a.join("d/x")).ok()? == b"from b").then_some(())
    });
    fs::write(a.join("d/y"), b"from a").expect("create d/y on a");
    poll_until("b to see a's d/y", SOON, || {
        (fs::read(b.join("d/y")).ok()? == b"from a").then_some(())
    });

    // b caches d/y's attributes; a rewrites it longer.
    assert_eq!(fs::metadata(b.join("d/y")).expect("stat on b").len(), 6);
    fs::write(a.join("d/y"), b"from a, longer").expect("rewrite on a");
    poll_until("b to see the new size and bytes", SOON, || {
        let len = fs::metadata(b.join("d/y")).ok()?.len();
        (len == 14 && fs::read(b.join("d/y")).ok()? == b"from a, longer").then_some(())
    });

    // a removes a name b's kernel holds.
    fs::remove_file(a.join("d/x")).expect("unlink d/x on a");
    poll_until("b to see d/x gone", SOON, || {
        fs::metadata(b.join("d/x")).is_err().then_some(())
    });
    assert_errno(
        fs::metadata(b.join("d/x")),
        libc::ENOENT,
        "d/x on b after a removed it",
    );
    drop(second);
}
