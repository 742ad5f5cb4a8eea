//! Reading `/proc/self/mountinfo`, and tmpfs mounts for tests that need a
//! small filesystem.

use std::path::Path;

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 4 <= b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(v) = octal {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The filesystem types of the mounts stacked at `path`, bottom first.
pub fn fs_types_at(path: &Path) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let want = path.as_os_str().as_bytes();
    let mut found = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || sep + 1 >= fields.len() {
            continue;
        }
        if unescape(fields[4]) == want {
            found.push(fields[sep + 1].to_string());
        }
    }
    found
}

/// How many `fuse.keibi` mounts are at `path`.
pub fn keibi_mounts_at(path: &Path) -> usize {
    fs_types_at(path)
        .iter()
        .filter(|t| *t == "fuse.keibi")
        .count()
}

/// Whether anything is mounted at `path`.
pub fn is_mountpoint(path: &Path) -> bool {
    !fs_types_at(path).is_empty()
}

/// Detach whatever is mounted at `path` (all stacked mounts).
pub fn detach_all(path: &Path) {
    for _ in 0..8 {
        if !is_mountpoint(path) {
            return;
        }
        if nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_err() {
            return;
        }
    }
}

/// Mount a tmpfs of `bytes` at `path`.
pub fn mount_tmpfs(path: &Path, bytes: u64) {
    nix::mount::mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(format!("size={bytes},mode=0700").as_str()),
    )
    .unwrap_or_else(|e| panic!("mount a tmpfs of {bytes} bytes at {}: {e}", path.display()));
}

/// The systemd escaping of an absolute path (`systemd-escape --path`), as
/// the mountpoint's `keibi-mountd@` unit instance is named.
pub fn systemd_escape_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let trimmed: &[u8] = {
        let mut s = bytes;
        while let [b'/', rest @ ..] = s {
            s = rest;
        }
        while let [rest @ .., b'/'] = s {
            s = rest;
        }
        s
    };
    if trimmed.is_empty() {
        return "-".to_string();
    }
    let mut out = String::new();
    for (i, &c) in trimmed.iter().enumerate() {
        match c {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            c if c.is_ascii_alphanumeric() || c == b':' || c == b'_' || c == b'.' => {
                out.push(c as char)
            }
            c => out.push_str(&format!("\\x{c:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("/a\\040b"), b"/a b");
        assert_eq!(unescape("/plain"), b"/plain");
    }

    #[test]
    fn escapes_like_systemd() {
        assert_eq!(
            systemd_escape_path(Path::new("/tmp/kb1/mnt")),
            "tmp-kb1-mnt"
        );
        assert_eq!(systemd_escape_path(Path::new("/a-b/.c")), "a\\x2db-.c");
    }
}
