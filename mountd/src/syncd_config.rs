//! Which filesystem socket of keibi-syncd to connect to.
//!
//! syncd's own configuration file names its socket (`fs_socket` in
//! `/etc/keibi/syncd.toml`); mountd reads that key from the same file, so
//! that changing it there moves both daemons. In order of precedence:
//! `--syncd-socket`; `fs_socket` of the file given with `--syncd-config`
//! (which must exist); `fs_socket` of `/etc/keibi/syncd.toml` when that
//! exists; `/run/keibi/fs.sock` (syncd's default). Only `fs_socket` is
//! read; the other keys belong to syncd, which checks them.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// syncd's default configuration file.
pub const DEFAULT_SYNCD_CONFIG: &str = "/etc/keibi/syncd.toml";
/// syncd's default filesystem socket.
pub const DEFAULT_FS_SOCKET: &str = "/run/keibi/fs.sock";

/// The one key mountd takes from syncd's configuration.
#[derive(Deserialize, Default)]
struct SyncdFile {
    fs_socket: Option<PathBuf>,
}

/// Where the socket path came from (for the start-up log line).
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    /// `--syncd-socket`.
    Flag,
    /// `fs_socket` in this configuration file.
    Config(PathBuf),
    /// This configuration file exists but has no `fs_socket`, or there is
    /// no configuration file: syncd's default.
    Default,
}

/// The socket to connect to: see the module doc. `default_config` is
/// [`DEFAULT_SYNCD_CONFIG`] outside tests.
pub fn resolve(
    flag: Option<&Path>,
    config: Option<&Path>,
    default_config: &Path,
) -> Result<(PathBuf, Source), String> {
    if let Some(p) = flag {
        return Ok((p.to_path_buf(), Source::Flag));
    }
    let file = match config {
        Some(c) => Some(c),
        None if default_config.exists() => Some(default_config),
        None => None,
    };
    let Some(file) = file else {
        return Ok((PathBuf::from(DEFAULT_FS_SOCKET), Source::Default));
    };
    let text = std::fs::read_to_string(file).map_err(|e| {
        format!(
            "cannot read keibi-syncd's configuration {}: {e}",
            file.display()
        )
    })?;
    let parsed: SyncdFile = toml::from_str(&text)
        .map_err(|e| format!("keibi-syncd's configuration {}: {e}", file.display()))?;
    match parsed.fs_socket {
        Some(p) if p.is_absolute() => Ok((p, Source::Config(file.to_path_buf()))),
        Some(p) => Err(format!(
            "keibi-syncd's configuration {}: fs_socket {} is not an absolute path",
            file.display(),
            p.display()
        )),
        None => Ok((PathBuf::from(DEFAULT_FS_SOCKET), Source::Default)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_config_beats_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("syncd.toml");
        std::fs::write(
            &cfg,
            "state_dir = \"/srv/keibi\"\nfs_socket = \"/srv/run/fs.sock\"\n",
        )
        .expect("write config");
        let missing = dir.path().join("absent.toml");

        let (p, s) = resolve(Some(Path::new("/x.sock")), Some(&cfg), &missing).expect("flag");
        assert_eq!((p, s), (PathBuf::from("/x.sock"), Source::Flag));

        let (p, s) = resolve(None, Some(&cfg), &missing).expect("config");
        assert_eq!(p, PathBuf::from("/srv/run/fs.sock"));
        assert_eq!(s, Source::Config(cfg.clone()));

        // The default file is read when it exists.
        let (p, _) = resolve(None, None, &cfg).expect("default config");
        assert_eq!(p, PathBuf::from("/srv/run/fs.sock"));

        let (p, s) = resolve(None, None, &missing).expect("no config");
        assert_eq!((p, s), (PathBuf::from(DEFAULT_FS_SOCKET), Source::Default));
    }

    #[test]
    fn a_named_config_must_exist_and_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("absent.toml");
        assert!(resolve(None, Some(&missing), &missing).is_err());
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "fs_socket = [").expect("write");
        assert!(resolve(None, Some(&bad), &missing).is_err());
        let rel = dir.path().join("rel.toml");
        std::fs::write(&rel, "fs_socket = \"run/fs.sock\"").expect("write");
        assert!(resolve(None, Some(&rel), &missing).is_err());
        let empty = dir.path().join("empty.toml");
        std::fs::write(&empty, "# all defaults\n").expect("write");
        let (p, _) = resolve(None, Some(&empty), &missing).expect("empty");
        assert_eq!(p, PathBuf::from(DEFAULT_FS_SOCKET));
    }
}
