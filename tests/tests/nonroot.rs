//! The mount as an unprivileged user (uid 4242): the kernel enforces mode
//! bits and ownership (`default_permissions`) as on a local disk.

use harness::{OTHER_UID, Options, run_as, setup};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Output;
use std::time::Duration;

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn as_user_ok(script: &str) -> String {
    let o = run_as(OTHER_UID, script);
    assert!(
        o.status.success(),
        "as uid {OTHER_UID}: `{script}` failed:\n{}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
fn as_user_fails_with(script: &str, message: &str) {
    let o = run_as(OTHER_UID, script);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains(message),
        "as uid {OTHER_UID}: `{script}` must fail with \"{message}\":\n{}",
        text(&o)
    );
}

#[test]
fn unprivileged_user_works_in_own_dir_and_is_kept_out_of_roots_files() {
    let (_w, fx) = setup(
        "non-root user",
        Duration::from_secs(120),
        Options::default(),
    );
    let home = fx.path("home");
    fs::create_dir(&home).expect("mkdir");
    std::os::unix::fs::chown(&home, Some(OTHER_UID), Some(OTHER_UID)).expect("chown home");
    let public = fx.path("public");
    fs::write(&public, b"root's public file\n").expect("write");
    fs::set_permissions(&public, fs::Permissions::from_mode(0o644)).expect("chmod");
    let secret = fx.path("secret");
    fs::write(&secret, b"root's secret\n").expect("write");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod");

    let h = home.display();
    as_user_ok(&format!("printf 'hello from 4242' > '{h}/a'"));
    assert_eq!(as_user_ok(&format!("cat '{h}/a'")), "hello from 4242");
    let md = fs::metadata(home.join("a")).expect("stat");
    assert_eq!(
        (md.uid(), md.gid()),
        (OTHER_UID, OTHER_UID),
        "new files belong to their creator"
    );
    as_user_ok(&format!("printf ' and more' >> '{h}/a'"));
    as_user_ok(&format!("mv '{h}/a' '{h}/b'"));
    assert_eq!(
        fs::read(home.join("b")).expect("read as root"),
        b"hello from 4242 and more"
    );
    as_user_ok(&format!(
        "mkdir '{h}/d' && ln -s b '{h}/d/l' && ln '{h}/b' '{h}/c'"
    ));
    as_user_ok(&format!(
        "chmod 600 '{h}/b' && rm '{h}/b' '{h}/c' '{h}/d/l' && rmdir '{h}/d'"
    ));
    assert_eq!(fs::read_dir(&home).expect("readdir").count(), 0);

    // Root's files: read the public one, nothing else.
    assert_eq!(
        as_user_ok(&format!("cat '{}'", public.display())),
        "root's public file\n"
    );
    as_user_fails_with(
        &format!("printf x >> '{}'", public.display()),
        "Permission denied",
    );
    as_user_fails_with(
        &format!("printf x > '{}'", public.display()),
        "Permission denied",
    );
    as_user_fails_with(
        &format!("chmod 666 '{}'", public.display()),
        "Operation not permitted",
    );
    as_user_fails_with(&format!("cat '{}'", secret.display()), "Permission denied");
    as_user_fails_with(
        &format!("printf x > '{}/mine'", fx.mnt().display()),
        "Permission denied",
    );
    as_user_fails_with(
        &format!("rm -f '{}'", public.display()),
        "Permission denied",
    );
    assert_eq!(
        fs::read(&public).expect("read"),
        b"root's public file\n",
        "unchanged"
    );
    assert_eq!(
        fs::read(&secret).expect("read"),
        b"root's secret\n",
        "unchanged"
    );
    assert_eq!(fs::metadata(&public).expect("stat").mode() & 0o7777, 0o644);
}
