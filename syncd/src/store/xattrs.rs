//! Extended attributes, kept in the `xattrs` tree under the inode number
//! and the attribute name. Values are bounded ([`MAX_VALUE`]), names by the
//! kernel's own limit (ERANGE above it).

use super::records::{ino_key, xattr_key};
use super::tx::fail;
use super::{Store, store_err};
use ipc_schema::{FsError, Ino, Name, Timestamp, XattrSet, fs_err};

/// Largest value accepted (as `XATTR_SIZE_MAX`); larger gets E2BIG.
pub const MAX_VALUE: usize = 64 * 1024;
/// Longest name accepted (as `XATTR_NAME_MAX`); longer gets ERANGE.
pub const MAX_NAME: usize = 255;

fn check_name(name: &Name) -> Result<(), FsError> {
    let n = name.as_bytes();
    if n.is_empty() || n.len() > MAX_NAME {
        return Err(fs_err!(ERANGE, "xattr name of {} bytes", n.len()));
    }
    if n.contains(&0) {
        return Err(fs_err!(EINVAL, "xattr name contains NUL"));
    }
    Ok(())
}

impl Store {
    /// Set attribute `name` of `ino` (`mode`: create only, replace only, or
    /// either).
    pub fn setxattr(
        &self,
        ino: Ino,
        name: &Name,
        value: &[u8],
        mode: XattrSet,
    ) -> Result<(), FsError> {
        check_name(name)?;
        if value.len() > MAX_VALUE {
            return Err(fs_err!(
                E2BIG,
                "xattr value of {} bytes is over {MAX_VALUE}",
                value.len()
            ));
        }
        let now = Timestamp::now();
        let key = xattr_key(ino.0, name.as_bytes());
        self.note_xattrs();
        self.tx(|t| {
            let mut rec = t.need(ino.0)?;
            let exists = t.xattrs.get(&key)?.is_some();
            match mode {
                XattrSet::Create if exists => {
                    return fail(fs_err!(EEXIST, "xattr {name:?} of {ino} exists"));
                }
                XattrSet::Replace if !exists => {
                    return fail(fs_err!(ENODATA, "no xattr {name:?} on {ino}"));
                }
                _ => {}
            }
            t.xattrs.insert(key.as_slice(), value)?;
            rec.ctime = now;
            t.put(ino.0, &rec)?;
            Ok(())
        })
    }

    /// The value of attribute `name` of `ino` (ENODATA when absent).
    pub fn getxattr(&self, ino: Ino, name: &Name) -> Result<Vec<u8>, FsError> {
        check_name(name)?;
        self.read_inode(ino.0)?
            .ok_or_else(|| fs_err!(ENOENT, "no inode {ino}"))?;
        self.xattrs
            .get(xattr_key(ino.0, name.as_bytes()))
            .map_err(|e| store_err("getxattr", e))?
            .map(|v| v.to_vec())
            .ok_or_else(|| fs_err!(ENODATA, "no xattr {name:?} on {ino}"))
    }

    /// The attribute names of `ino`.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<Name>, FsError> {
        self.read_inode(ino.0)?
            .ok_or_else(|| fs_err!(ENOENT, "no inode {ino}"))?;
        let mut names = Vec::new();
        for item in self.xattrs.scan_prefix(ino_key(ino.0)) {
            let (k, _) = item.map_err(|e| store_err("listxattr", e))?;
            names.push(Name(k[8..].to_vec()));
        }
        Ok(names)
    }

    /// Remove attribute `name` of `ino` (ENODATA when absent).
    pub fn removexattr(&self, ino: Ino, name: &Name) -> Result<(), FsError> {
        check_name(name)?;
        let now = Timestamp::now();
        let key = xattr_key(ino.0, name.as_bytes());
        self.tx(|t| {
            let mut rec = t.need(ino.0)?;
            if t.xattrs.remove(key.as_slice())?.is_none() {
                return fail(fs_err!(ENODATA, "no xattr {name:?} on {ino}"));
            }
            rec.ctime = now;
            t.put(ino.0, &rec)?;
            Ok(())
        })
    }
}
