//! Operations that add, remove or move names: `mkdir`, `mknod`,
//! `symlink`, `link`, `unlink`, `rmdir`, `rename`, and what their answers
//! change in the attribute cache.

use super::*;

impl Keibi {
    /// The answer of a change that made `parent/name` (sent at `ticket`):
    /// the new entry's inode and the parent changed (the answer carries
    /// the parent's attributes after it, [`AttrCache::dir_changed`]).
    pub(super) fn created(
        &self,
        ticket: Ticket,
        parent: u64,
        name: &Name,
        r: Result<Made, CallError>,
        op: &str,
    ) -> Result<Attr, FsError> {
        let Made {
            attr: a,
            parent: dir,
        } = match r {
            Ok(m) => m,
            Err(e) => {
                self.cache.known.unsure(parent);
                return Err(e.into_fs(op));
            }
        };
        self.cache.known.added(parent, name.as_bytes());
        self.cache.changed(ticket, a.ino.0, Some(&a));
        self.cache.dir_changed(ticket, parent, dir.as_ref());
        self.cache.put_entry(ticket, parent, name.as_bytes(), &a);
        Ok(a)
    }

    /// A change that removed or replaced `parent/name` (sent at `ticket`)
    /// ended: the parent and the inode the name had (if known) changed.
    /// `dir` is the parent's attributes after it, when syncd answered them.
    pub(super) fn removed_entry(
        &self,
        ticket: Ticket,
        parent: u64,
        name: &[u8],
        ino: Option<u64>,
        dir: Option<&Attr>,
    ) {
        if let Some(ino) = ino {
            self.cache.changed(ticket, ino, None);
        }
        self.cache.dir_changed(ticket, parent, dir);
        self.cache.forget_entry(parent, name);
    }

    /// A removal of `parent/name` through this mount ended, `done` if
    /// syncd answered that it was done ([`crate::known_dirs`]).
    fn known_removed(&self, parent: u64, name: &[u8], done: bool) {
        if done {
            self.cache.known.removed(parent, name);
        } else {
            self.cache.known.unsure(parent);
        }
    }

    /// `mkdir` (`perm` already masked by the umask).
    pub async fn mkdir(
        &self,
        parent: u64,
        name: Name,
        perm: u16,
        caller: Caller,
    ) -> Result<Attr, FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let n = name.clone();
        let r = self
            .client
            .call("mkdir", parent, self.deadline(), Retry::Once, |c, ctx| {
                let n = n.clone();
                async move { c.client.mkdir(ctx, Ino(parent), n, perm, caller).await }
            })
            .await;
        let a = self.created(ticket, parent, &name, r, "mkdir")?;
        self.cache.known.made(a.ino.0);
        Ok(a)
    }

    /// `mknod` of a fifo, socket or device node (stored as metadata with
    /// its `rdev`; the mount is `nodev`); a regular file is created and
    /// closed again.
    pub async fn mknod(
        &self,
        parent: u64,
        name: Name,
        mode: u32,
        perm: u16,
        rdev: u32,
        caller: Caller,
    ) -> Result<Attr, FsError> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFREG | 0 => {
                let got = self
                    .create_fd(parent, name, perm, libc::O_RDONLY, caller)
                    .await?;
                let attr = got.opened.attr;
                drop(got.fd);
                self.abandon(got.opened.handle);
                return Ok(attr);
            }
            other => return Err(fs_err!(EINVAL, "mknod: unknown file type {other:#o}")),
        };
        let _change = self.change();
        let ticket = self.cache.ticket();
        let n = name.clone();
        let r = self
            .client
            .call("mknod", parent, self.deadline(), Retry::Once, |c, ctx| {
                let n = n.clone();
                async move {
                    c.client
                        .mknod(ctx, Ino(parent), n, kind, perm, rdev, caller)
                        .await
                }
            })
            .await;
        self.created(ticket, parent, &name, r, "mknod")
    }

    /// `symlink`.
    pub async fn symlink(
        &self,
        parent: u64,
        name: Name,
        target: Vec<u8>,
        caller: Caller,
    ) -> Result<Attr, FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let n = name.clone();
        let r = self
            .client
            .call("symlink", parent, self.deadline(), Retry::Once, |c, ctx| {
                let n = n.clone();
                let t = target.clone();
                async move { c.client.symlink(ctx, Ino(parent), n, t, caller).await }
            })
            .await;
        self.created(ticket, parent, &name, r, "symlink")
    }

    /// `link`.
    pub async fn link(&self, ino: u64, new_parent: u64, new_name: Name) -> Result<Attr, FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let n = new_name.clone();
        let r = self
            .client
            .call("link", ino, self.deadline(), Retry::Once, |c, ctx| {
                let n = n.clone();
                async move { c.client.link(ctx, Ino(ino), Ino(new_parent), n).await }
            })
            .await;
        self.created(ticket, new_parent, &new_name, r, "link")
    }

    /// `unlink`.
    pub async fn unlink(&self, parent: u64, name: Name) -> Result<(), FsError> {
        let _change = self.change();
        let deadline = self.deadline();
        self.releases.crossings_settled(deadline).await;
        let ticket = self.cache.ticket();
        let n = name.clone();
        let ino = self.cache.entry_ino(parent, name.as_bytes());
        self.cache.forget_entry(parent, name.as_bytes());
        let r = self
            .client
            .call("unlink", parent, deadline, Retry::Once, |c, ctx| {
                let n = n.clone();
                async move { c.client.unlink(ctx, Ino(parent), n).await }
            })
            .await;
        let dir = r.as_ref().ok().and_then(|d| d.parent.as_ref());
        self.removed_entry(ticket, parent, name.as_bytes(), ino, dir);
        self.known_removed(parent, name.as_bytes(), r.is_ok());
        r.map(drop).map_err(|e| e.into_fs("unlink"))
    }

    /// `rmdir`.
    pub async fn rmdir(&self, parent: u64, name: Name) -> Result<(), FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let n = name.clone();
        let ino = self.cache.entry_ino(parent, name.as_bytes());
        self.cache.forget_entry(parent, name.as_bytes());
        let r = self
            .client
            .call("rmdir", parent, self.deadline(), Retry::Once, |c, ctx| {
                let n = n.clone();
                async move { c.client.rmdir(ctx, Ino(parent), n).await }
            })
            .await;
        let dir = r.as_ref().ok().and_then(|d| d.parent.as_ref());
        self.removed_entry(ticket, parent, name.as_bytes(), ino, dir);
        self.known_removed(parent, name.as_bytes(), r.is_ok());
        if let Some(dir) = ino {
            // Gone (or, after an error, no longer known): no list.
            self.cache.known.unsure(dir);
        }
        r.map(drop).map_err(|e| e.into_fs("rmdir"))
    }

    /// `rename`.
    pub async fn rename(
        &self,
        parent: u64,
        name: Name,
        new_parent: u64,
        new_name: Name,
        flags: RenameFlags,
    ) -> Result<(), FsError> {
        let _change = self.change();
        let deadline = self.deadline();
        self.releases.crossings_settled(deadline).await;
        let ticket = self.cache.ticket();
        let src = self.cache.entry_ino(parent, name.as_bytes());
        let dst = self.cache.entry_ino(new_parent, new_name.as_bytes());
        self.cache.forget_entry(parent, name.as_bytes());
        self.cache.forget_entry(new_parent, new_name.as_bytes());
        let r = self
            .client
            .call("rename", parent, deadline, Retry::Once, |c, ctx| {
                let (n, nn) = (name.clone(), new_name.clone());
                async move {
                    c.client
                        .rename(ctx, Ino(parent), n, Ino(new_parent), nn, flags)
                        .await
                }
            })
            .await;
        let dirs = r.as_ref().ok().cloned().unwrap_or_default();
        for ino in [src, dst].into_iter().flatten() {
            self.cache.changed(ticket, ino, None);
        }
        // A rename within one directory changes it once.
        self.cache.dir_changed(ticket, parent, dirs.parent.as_ref());
        if new_parent != parent {
            self.cache
                .dir_changed(ticket, new_parent, dirs.new_parent.as_ref());
        }
        self.cache.forget_entry(parent, name.as_bytes());
        self.cache.forget_entry(new_parent, new_name.as_bytes());
        match (&r, flags.exchange) {
            // Both names still exist, each naming the other's inode.
            (Ok(_), true) => {}
            (Ok(_), false) => {
                self.cache.known.removed(parent, name.as_bytes());
                self.cache.known.added(new_parent, new_name.as_bytes());
            }
            (Err(_), _) => {
                self.cache.known.unsure(parent);
                self.cache.known.unsure(new_parent);
            }
        }
        r.map(drop).map_err(|e| e.into_fs("rename"))
    }
}
