//! Where the binaries under test are.
//!
//! The daemons are other packages of the workspace, so cargo does not build
//! them for this package's tests: they are taken from the target directory
//! this test executable runs from (`target/<profile>/deps/<test>` →
//! `target/<profile>/`), which `cargo build --workspace --bins` fills.

use std::path::PathBuf;

/// The directory holding this build's binaries (`target/<profile>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test executable");
    let mut dir = exe
        .parent()
        .expect("the test executable has a parent directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// The path of the workspace binary `name`; panics with what to run when it
/// is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (the end-to-end tests use the \
         daemons from the same target directory)",
        path.display()
    );
    path
}

/// `keibi-syncd`.
pub fn syncd() -> PathBuf {
    binary("keibi-syncd")
}

/// `keibi-mountd`.
pub fn mountd() -> PathBuf {
    binary("keibi-mountd")
}

/// `keibi-probe`, this package's handshake client (built by cargo for
/// integration tests; falls back to the profile directory).
pub fn probe() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_keibi-probe") {
        Some(p) => PathBuf::from(p),
        None => binary("keibi-probe"),
    }
}
