//! This daemon's peer identity: a static X25519 key kept in the state
//! directory, and the fingerprint people compare to pair two machines.
//!
//! The file is `<state dir>/identity`, mode 0600, owned by syncd's user:
//!
//! ```text
//! offset 0   8 bytes  magic "KEIBIID\0"
//! offset 8   4 bytes  format version, little endian (now 1)
//! offset 12  32 bytes X25519 static secret
//! ```
//!
//! It is made once, at the first start, and written atomically (a temp
//! file in the same directory, fsync, rename, fsync of the directory), so
//! a crash leaves either no identity or a whole one. Every later start
//! reads it back; a file that is there but truncated, too long, of another
//! magic or version, readable or writable by others, or unreadable stops
//! syncd with [`IdentityError`], which names the file and what is wrong.
//! It is never regenerated over: a new key would make every paired peer
//! refuse this machine.
//!
//! The handshake (Noise XX, with an ephemeral ML-KEM-768 exchange inside
//! it) needs no static ML-KEM key, so the X25519 public key is the only
//! public key, and the fingerprint is SHA-256 over
//! [`FINGERPRINT_LABEL`] and that key, in base32 (see
//! `docs/architecture.md`, "Peer identity").

use data_encoding::BASE32_NOPAD;
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// The identity file's name in the state directory.
pub const FILE_NAME: &str = "identity";
/// The first bytes of an identity file.
pub const MAGIC: &[u8; 8] = b"KEIBIID\0";
/// The format version written and read.
pub const FORMAT_VERSION: u32 = 1;
/// The identity file's length in this format.
const FILE_LEN: usize = MAGIC.len() + 4 + 32;
/// The file's mode.
const FILE_MODE: u32 = 0o600;
/// Hashed before the public key, so the fingerprint is keibi's and this
/// format's alone (no other use of SHA-256 over the key can collide with it).
pub const FINGERPRINT_LABEL: &[u8] = b"keibi peer identity v1\0";
/// Characters per group in the fingerprint as shown to people.
const GROUP: usize = 4;
/// The fingerprint's encoding: RFC 4648 base32, upper case, no padding,
/// unused trailing bits zero (also what a typed fingerprint is parsed
/// with, `store::peers::parse_fingerprint`).
pub const FINGERPRINT_BASE32: data_encoding::Encoding = BASE32_NOPAD;
/// Characters in a fingerprint (32 bytes of SHA-256 in base32).
pub const FINGERPRINT_LEN: usize = 52;

/// Why the identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file exists but cannot be read (or its mode checked).
    #[error("identity file {path}: cannot read it: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Group or others may read or write it.
    #[error(
        "identity file {path}: mode {mode:04o} lets other users at the secret key (it must be 0600, owned by this user); check who read it, then `chmod 600` it or, if it leaked, remove it (this machine then has a new identity and must be paired again)"
    )]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It is owned by another user.
    #[error("identity file {path}: owned by uid {owner}, not by this user (uid {me})")]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our uid.
        me: u32,
    },
    /// Wrong length or magic: not an identity file, or a damaged one.
    #[error(
        "identity file {path}: corrupt ({what}); it is left as it is: restore it from a backup, or remove it to make a new identity (this machine must then be paired again)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A format this syncd does not know.
    #[error(
        "identity file {path}: format version {found}, this keibi-syncd reads version {FORMAT_VERSION}; run the keibi release that wrote it"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
    },
    /// Making a new identity failed.
    #[error("identity file {path}: cannot create it: {source}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The loaded identity.
pub struct Identity {
    secret: StaticSecret,
    public: PublicKey,
    path: PathBuf,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .field("path", &self.path)
            .finish()
    }
}

/// Whether [`Identity::load_or_create`] found the file or made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read from an existing file.
    Loaded,
    /// Made now (first start).
    Created,
}

impl Identity {
    /// Read `<state_dir>/identity`, or make it when there is none.
    pub fn load_or_create(state_dir: &Path) -> Result<(Identity, Origin), IdentityError> {
        let path = state_dir.join(FILE_NAME);
        match File::open(&path) {
            Ok(file) => {
                let me = nix::unistd::geteuid().as_raw();
                Ok((Identity::read(file, path, me)?, Origin::Loaded))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                Ok((Identity::create(state_dir, path)?, Origin::Created))
            }
            Err(source) => Err(IdentityError::Unreadable { path, source }),
        }
    }

    /// Check and parse an open identity file; `me` is the uid that must
    /// own it.
    fn read(mut file: File, path: PathBuf, me: u32) -> Result<Identity, IdentityError> {
        let meta = file
            .metadata()
            .map_err(|source| IdentityError::Unreadable {
                path: path.clone(),
                source,
            })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Mode { path, mode });
        }
        if meta.uid() != me {
            return Err(IdentityError::Owner {
                path,
                owner: meta.uid(),
                me,
            });
        }
        // One byte more than the format, to tell "too long" from "right".
        let mut bytes = Zeroizing::new(Vec::with_capacity(FILE_LEN + 1));
        (&mut file)
            .take(FILE_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| IdentityError::Unreadable {
                path: path.clone(),
                source,
            })?;
        let corrupt = |what: String| IdentityError::Corrupt {
            path: path.clone(),
            what,
        };
        if bytes.len() < MAGIC.len() + 4 {
            return Err(corrupt(format!(
                "{} bytes, too short for the header",
                bytes.len()
            )));
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt("it does not start with keibi's magic".into()));
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(&bytes[MAGIC.len()..MAGIC.len() + 4]);
        let found = u32::from_le_bytes(v);
        if found != FORMAT_VERSION {
            return Err(IdentityError::Version { path, found });
        }
        if bytes.len() != FILE_LEN {
            return Err(corrupt(format!(
                "{}{} bytes, version {FORMAT_VERSION} has {FILE_LEN}",
                if bytes.len() > FILE_LEN {
                    "more than "
                } else {
                    ""
                },
                bytes.len().min(FILE_LEN)
            )));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&bytes[MAGIC.len() + 4..]);
        let secret = StaticSecret::from(*key);
        let public = PublicKey::from(&secret);
        Ok(Identity {
            secret,
            public,
            path,
        })
    }

    fn create(state_dir: &Path, path: PathBuf) -> Result<Identity, IdentityError> {
        let secret = StaticSecret::random();
        let public = PublicKey::from(&secret);
        let mut bytes = Zeroizing::new(Vec::with_capacity(FILE_LEN));
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(secret.as_bytes());
        write_atomically(state_dir, &path, &bytes).map_err(|source| IdentityError::Create {
            path: path.clone(),
            source,
        })?;
        Ok(Identity {
            secret,
            public,
            path,
        })
    }

    /// The X25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// The X25519 static secret, for the handshake.
    #[allow(dead_code)] // used by the peer channel (not built yet) and tests
    pub fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    /// The identity file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fingerprint: base32 (RFC 4648, upper case, no padding) of
    /// SHA-256 over [`FINGERPRINT_LABEL`] and the public key; 52
    /// characters, ungrouped. [`group`] splits it for reading aloud.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.public_key())
    }
}

/// The fingerprint of an X25519 public key (see [`Identity::fingerprint`]).
pub fn fingerprint_of(public_key: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(FINGERPRINT_LABEL);
    h.update(public_key);
    FINGERPRINT_BASE32.encode(&h.finalize())
}

/// `fingerprint` in groups of four characters separated by spaces.
pub fn group(fingerprint: &str) -> String {
    fingerprint
        .as_bytes()
        .chunks(GROUP)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The temp file a new identity is written to before the rename.
const TMP_NAME: &str = ".identity.tmp";

/// Write `bytes` to `path` so that a crash leaves either nothing or the
/// whole file: a new temp file (mode 0600) in `dir`, fsync, rename over
/// `path`, fsync `dir`. A temp file left by a crash is removed first (the
/// caller holds the state directory's instance lock, so no other syncd is
/// writing it); it is removed on failure too.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(TMP_NAME);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        // The umask cannot widen the mode, but make sure of it.
        f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    fn file(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    #[test]
    fn first_start_creates_a_0600_file_and_later_starts_load_it() {
        let dir = state();
        let (a, origin) = Identity::load_or_create(dir.path()).expect("create");
        assert_eq!(origin, Origin::Created);
        let meta = std::fs::metadata(file(dir.path())).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(meta.len(), FILE_LEN as u64);
        let (b, origin) = Identity::load_or_create(dir.path()).expect("load");
        assert_eq!(origin, Origin::Loaded);
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.secret().to_bytes(), b.secret().to_bytes());
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }

    #[test]
    fn a_temp_file_left_by_a_crash_does_not_block_creation() {
        let dir = state();
        std::fs::write(dir.path().join(TMP_NAME), b"half written").expect("stale temp");
        let (_, origin) = Identity::load_or_create(dir.path()).expect("create");
        assert_eq!(origin, Origin::Created);
        assert!(!dir.path().join(TMP_NAME).exists(), "stale temp removed");
        assert_eq!(
            std::fs::metadata(file(dir.path())).expect("stat").len(),
            FILE_LEN as u64
        );
    }

    #[test]
    fn two_state_dirs_have_different_identities() {
        let (a, _) = Identity::load_or_create(state().path()).expect("a");
        let (b, _) = Identity::load_or_create(state().path()).expect("b");
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn fingerprint_is_sha256_of_label_and_key_in_base32() {
        // A fixed key gives a fixed fingerprint: a change of label, hash or
        // encoding would change every machine's fingerprint.
        let key = [7u8; 32];
        let mut h = Sha256::new();
        h.update(b"keibi peer identity v1\0");
        h.update(key);
        let expected = BASE32_NOPAD.encode(&h.finalize());
        assert_eq!(fingerprint_of(&key), expected);
        // The same, computed independently (Python's hashlib and base64).
        assert_eq!(
            expected,
            "5DFF2ROC6H4JLT2FHXKV5SBKYD6A7UKEYESYEDGMISHCIN2INFFQ"
        );
        assert_eq!(expected.len(), 52);
        assert!(
            expected
                .bytes()
                .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(&c))
        );
        let grouped = group(&expected);
        assert_eq!(grouped.len(), 52 + 12);
        assert!(grouped.split(' ').all(|g| g.len() == 4), "{grouped}");
    }

    fn assert_refused(dir: &Path, expect: impl Fn(&IdentityError) -> bool) {
        let before = std::fs::read(file(dir)).ok();
        let err = Identity::load_or_create(dir).expect_err("must be refused");
        assert!(expect(&err), "{err:?}");
        assert!(
            err.to_string().contains(&file(dir).display().to_string()),
            "message does not name the file: {err}"
        );
        // Never regenerated: the bytes are as they were.
        assert_eq!(std::fs::read(file(dir)).ok(), before);
    }

    fn make(dir: &Path) -> Vec<u8> {
        Identity::load_or_create(dir).expect("create");
        std::fs::read(file(dir)).expect("read")
    }

    fn put(dir: &Path, bytes: &[u8]) {
        std::fs::write(file(dir), bytes).expect("write");
    }

    #[test]
    fn truncated_file_is_refused_and_kept() {
        let dir = state();
        let bytes = make(dir.path());
        for len in [0, 5, 12, FILE_LEN - 1] {
            put(dir.path(), &bytes[..len]);
            assert_refused(dir.path(), |e| matches!(e, IdentityError::Corrupt { .. }));
        }
    }

    #[test]
    fn too_long_or_wrong_magic_is_corrupt() {
        let dir = state();
        let mut bytes = make(dir.path());
        bytes.push(0);
        put(dir.path(), &bytes);
        assert_refused(dir.path(), |e| matches!(e, IdentityError::Corrupt { .. }));
        bytes.pop();
        bytes[0] ^= 0xff;
        put(dir.path(), &bytes);
        assert_refused(dir.path(), |e| matches!(e, IdentityError::Corrupt { .. }));
    }

    #[test]
    fn other_version_is_refused_with_both_versions() {
        let dir = state();
        let mut bytes = make(dir.path());
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        put(dir.path(), &bytes);
        assert_refused(dir.path(), |e| {
            matches!(e, IdentityError::Version { found: 2, .. })
                && e.to_string().contains("version 2")
                && e.to_string().contains("version 1")
        });
    }

    #[test]
    fn readable_by_others_is_refused() {
        let dir = state();
        make(dir.path());
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(file(dir.path()), std::fs::Permissions::from_mode(mode))
                .expect("chmod");
            assert_refused(
                dir.path(),
                |e| matches!(e, IdentityError::Mode { mode: m, .. } if *m == mode),
            );
        }
    }

    #[test]
    fn file_of_another_owner_is_refused() {
        let dir = state();
        make(dir.path());
        let path = file(dir.path());
        let owner = std::fs::metadata(&path).expect("stat").uid();
        let err = Identity::read(File::open(&path).expect("open"), path.clone(), owner + 1)
            .expect_err("another owner");
        assert!(
            matches!(err, IdentityError::Owner { owner: o, .. } if o == owner),
            "{err:?}"
        );
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn unreadable_file_is_refused() {
        // A directory in its place cannot be read as a file; this works
        // as root too (a mode-000 file would not stop root).
        let dir = state();
        std::fs::create_dir(file(dir.path())).expect("mkdir");
        std::fs::set_permissions(file(dir.path()), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let err = Identity::load_or_create(dir.path()).expect_err("a directory");
        assert!(
            matches!(err, IdentityError::Unreadable { .. }),
            "{err:?}: {err}"
        );
        assert!(
            err.to_string()
                .contains(&file(dir.path()).display().to_string())
        );
        assert!(file(dir.path()).is_dir(), "left as it was");
    }

    #[test]
    fn unwritable_state_dir_fails_to_create() {
        let dir = state();
        let missing = dir.path().join("no-such-dir");
        let err = Identity::load_or_create(&missing).expect_err("no directory");
        assert!(matches!(err, IdentityError::Create { .. }), "{err:?}");
    }
}
