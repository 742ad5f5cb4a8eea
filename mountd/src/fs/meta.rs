//! Attributes and names read from syncd: `lookup`, `getattr` (both with
//! the last known answer when syncd misses the deadline), `setattr`,
//! `readlink`, `statfs`.

use super::*;

impl Keibi {
    /// `lookup`, or the last known entry when syncd misses the deadline.
    pub async fn lookup(&self, parent: u64, name: Name) -> Result<Attr, FsError> {
        let n = name.clone();
        let ticket = self.cache.ticket();
        let r = self
            .client
            .call(
                "lookup",
                parent,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| {
                    let n = n.clone();
                    async move { c.client.lookup(ctx, Ino(parent), n).await }
                },
            )
            .await;
        match r {
            Ok(a) => {
                self.cache.put_entry(ticket, parent, name.as_bytes(), &a);
                self.passthrough
                    .entry_seen(parent, name.as_bytes(), a.ino.0);
                Ok(a)
            }
            Err(CallError::Deadline { waited }) => {
                match self.cache.entry(parent, name.as_bytes()) {
                    Some(a) => {
                        tracing::info!(
                            op = "lookup",
                            ino = parent,
                            waited_ms = waited.as_millis() as u64,
                            "answered with the last known entry"
                        );
                        Ok(a)
                    }
                    None => Err(CallError::Deadline { waited }.into_fs("lookup")),
                }
            }
            Err(CallError::Fs(e)) => {
                if e.errno == libc::ENOENT {
                    self.cache.forget_entry(parent, name.as_bytes());
                    if self.cache.known.listed(parent, name.as_bytes()) {
                        // Removed without mountd hearing of it.
                        self.cache.known.unsure(parent);
                    }
                }
                Err(e)
            }
        }
    }

    /// `lookup` for the kernel's entry cache: `Ok(None)` when the name does
    /// not exist and nothing changed through this mount or was announced by
    /// syncd's invalidation stream while syncd was asked, so the kernel may
    /// cache the absence (a negative entry) for the entry TTL. A peer that
    /// creates the name later has it dropped by the invalidation stream
    /// (`Inval::Entry`, or every entry at once after `Inval::All`); a name
    /// made through this mount replaces the negative entry in the kernel
    /// itself. An absence seen while a change was under way answers
    /// `ENOENT`, which the kernel does not cache: that change's
    /// notification may have reached the kernel before this answer.
    ///
    /// A name of a directory whose every name mountd knows is answered
    /// without syncd ([`crate::known_dirs`]).
    pub async fn lookup_entry(&self, parent: u64, name: Name) -> Result<Option<Attr>, FsError> {
        if self.cache.known.absent(parent, name.as_bytes()) {
            crate::metrics::known_absent();
            return Ok(None);
        }
        let before = self.changes();
        match self.lookup(parent, name).await {
            Err(e) if e.errno == libc::ENOENT && self.changes() == before => Ok(None),
            r => r.map(Some),
        }
    }

    /// `getattr`, or the last known attributes when syncd misses the
    /// deadline.
    ///
    /// An inode syncd does not know but the kernel still holds was removed
    /// while referenced: it answers its last known attributes with
    /// `nlink` 0 (see [`crate::attr_cache`]).
    ///
    /// A directory whose names were just changed through this mount is
    /// answered with the attributes that change's answer carried, once,
    /// if nothing changed it since ([`crate::attr_cache::AttrCache::dir_changed`]).
    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        if let Some(a) = self.cache.take_fresh(ino) {
            crate::metrics::getattr_from_change();
            return Ok(a);
        }
        let ticket = self.cache.ticket();
        let r = self
            .client
            .call(
                "getattr",
                ino,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| async move { c.client.getattr(ctx, Ino(ino)).await },
            )
            .await;
        match r {
            Ok(a) => {
                self.cache.put_attr(ticket, &a);
                Ok(a)
            }
            Err(CallError::Fs(e)) if e.errno == libc::ENOENT => match self.cache.removed(ino) {
                Some(a) => {
                    tracing::debug!(ino, "removed but still referenced: nlink 0");
                    Ok(a)
                }
                None => Err(e),
            },
            Err(CallError::Deadline { waited }) => match self.cache.attr(ino) {
                Some(a) => {
                    tracing::info!(
                        op = "getattr",
                        ino,
                        waited_ms = waited.as_millis() as u64,
                        "answered with the last known attributes"
                    );
                    Ok(a)
                }
                None => Err(CallError::Deadline { waited }.into_fs("getattr")),
            },
            Err(CallError::Fs(e)) => Err(e),
        }
    }

    /// `setattr`.
    pub async fn setattr(&self, ino: u64, changes: SetAttr) -> Result<Attr, FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let a = self
            .client
            .call(
                "setattr",
                ino,
                self.deadline(),
                Retry::Once,
                |c, ctx| async move { c.client.setattr(ctx, Ino(ino), changes).await },
            )
            .await
            .map_err(|e| e.into_fs("setattr"))?;
        self.cache.changed(ticket, ino, Some(&a));
        if let Some(size) = changes.size {
            self.handles.truncated(ino, size);
        }
        Ok(a)
    }

    /// `readlink`.
    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        self.client
            .call(
                "readlink",
                ino,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| async move { c.client.readlink(ctx, Ino(ino)).await },
            )
            .await
            .map_err(|e| e.into_fs("readlink"))
    }

    /// `statfs`.
    pub async fn statfs(&self) -> Result<StatFs, FsError> {
        self.client
            .call(
                "statfs",
                1,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| async move { c.client.statfs(ctx).await },
            )
            .await
            .map_err(|e| e.into_fs("statfs"))
    }
}
