//! Extended attributes, with the shortcut for inodes known to have none.

use super::*;

impl Keibi {
    /// `setxattr`.
    pub async fn setxattr(
        &self,
        ino: u64,
        name: Name,
        value: Vec<u8>,
        mode: XattrSet,
    ) -> Result<(), FsError> {
        let _change = self.change();
        let r = self
            .client
            .call("setxattr", ino, self.deadline(), Retry::Once, |c, ctx| {
                let (n, v) = (name.clone(), value.clone());
                async move { c.client.setxattr(ctx, Ino(ino), n, v, mode).await }
            })
            .await;
        // Marked whatever the outcome: a call that timed out may have been
        // applied, and the mark only makes getxattr ask syncd.
        self.cache.set_xattr_done(ino);
        r.map_err(|e| e.into_fs("setxattr"))
    }

    /// Whether the last known attributes of `ino` say it has no extended
    /// attribute at all, so `getxattr`/`listxattr` can be answered here.
    /// Every `setxattr` passes through this mount and marks the inode, and
    /// a reply sent before that mark can no longer replace it (see
    /// [`crate::attr_cache`]), so the flag cannot hide an attribute set
    /// here.
    fn known_without_xattrs(&self, ino: u64) -> bool {
        self.cache.known_without_xattrs(ino)
    }

    /// `getxattr` answered without syncd, when the inode is known to have
    /// no extended attributes (`ls -l` asks two names of every file, and
    /// the kernel asks `security.capability` before every write): bounded
    /// local work, for the dispatch thread.
    pub fn getxattr_local(&self, ino: u64) -> Option<Result<XattrReply, FsError>> {
        self.known_without_xattrs(ino)
            .then(|| Err(fs_err!(ENODATA, "{} has no extended attributes", Ino(ino))))
    }

    /// `listxattr` answered without syncd, as [`Keibi::getxattr_local`].
    pub fn listxattr_local(&self, ino: u64, size: u32) -> Option<Result<XattrReply, FsError>> {
        self.known_without_xattrs(ino)
            .then(|| sized(Vec::new(), size))
    }

    /// `getxattr`: the size when `size` is 0, else the value, or `ERANGE`.
    /// An inode known to have no attributes answers `ENODATA` at once.
    pub async fn getxattr(&self, ino: u64, name: Name, size: u32) -> Result<XattrReply, FsError> {
        if self.known_without_xattrs(ino) {
            return Err(fs_err!(ENODATA, "{} has no extended attributes", Ino(ino)));
        }
        let v = self
            .client
            .call(
                "getxattr",
                ino,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| {
                    let n = name.clone();
                    async move { c.client.getxattr(ctx, Ino(ino), n).await }
                },
            )
            .await
            .map_err(|e| e.into_fs("getxattr"))?;
        sized(v, size)
    }

    /// `listxattr`: NUL-terminated names, sized as for `getxattr`.
    pub async fn listxattr(&self, ino: u64, size: u32) -> Result<XattrReply, FsError> {
        if self.known_without_xattrs(ino) {
            return sized(Vec::new(), size);
        }
        let names = self
            .client
            .call(
                "listxattr",
                ino,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| async move { c.client.listxattr(ctx, Ino(ino)).await },
            )
            .await
            .map_err(|e| e.into_fs("listxattr"))?;
        let mut v = Vec::new();
        for n in names {
            v.extend_from_slice(n.as_bytes());
            v.push(0);
        }
        sized(v, size)
    }

    /// `removexattr`.
    pub async fn removexattr(&self, ino: u64, name: Name) -> Result<(), FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let r = self
            .client
            .call(
                "removexattr",
                ino,
                self.deadline(),
                Retry::Once,
                |c, ctx| {
                    let n = name.clone();
                    async move { c.client.removexattr(ctx, Ino(ino), n).await }
                },
            )
            .await;
        self.cache.changed(ticket, ino, None);
        r.map_err(|e| e.into_fs("removexattr"))
    }
}

pub(super) fn sized(v: Vec<u8>, size: u32) -> Result<XattrReply, FsError> {
    let len = u32::try_from(v.len()).map_err(|_| fs_err!(E2BIG, "xattr value too large"))?;
    if size == 0 {
        Ok(XattrReply::Size(len))
    } else if len > size {
        Err(fs_err!(
            ERANGE,
            "xattr needs {len} bytes, the buffer has {size}"
        ))
    } else {
        Ok(XattrReply::Data(v))
    }
}
