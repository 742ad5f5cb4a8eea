//! Open files: `open`/`create` (two steps, see the parent module's doc),
//! `release`, and the I/O on a handle's descriptor (`read`, `write`,
//! `fallocate`, `lseek`, `fsync`).

use super::*;

impl Keibi {
    /// Ask syncd to open `ino`, and take and validate the descriptor.
    pub async fn open_fd(&self, ino: u64, flags: i32) -> Result<OpenedFd, FsError> {
        // O_TRUNC changes the size; a writer changes it later.
        let _change = (Access::of_flags(flags) != Access::Read || flags & libc::O_TRUNC != 0)
            .then(|| self.change());
        let ticket = self.cache.ticket();
        let deadline = self.deadline();
        let r = self
            .client
            .call("open", ino, deadline, Retry::Once, |c, ctx| async move {
                Ok(c.client
                    .open(ctx, Ino(ino), flags)
                    .await?
                    .map(|o| (o, c.clone())))
            })
            .await;
        // The kernel found a name for `ino` and opens it by number. syncd
        // keeps an unlinked inode while the kernel references it (see
        // `crate::releases`), so this only meets an inode syncd really
        // freed (the limits in docs/architecture.md). ESTALE makes the
        // kernel look the name up again and retry once (as for NFS),
        // which opens or creates whatever the name is now.
        let r = r.map_err(|e| match e {
            CallError::Fs(e) if e.errno == libc::ENOENT => {
                CallError::Fs(FsError::new(libc::ESTALE, e.message))
            }
            e => e,
        });
        self.receive_fd("open", ino, flags, deadline, ticket, r)
            .await
    }

    /// Ask syncd to create and open `parent/name`, and take and validate
    /// the descriptor.
    pub async fn create_fd(
        &self,
        parent: u64,
        name: Name,
        perm: u16,
        flags: i32,
        caller: Caller,
    ) -> Result<OpenedFd, FsError> {
        let _change = self.change();
        let ticket = self.cache.ticket();
        let deadline = self.deadline();
        let n = name.clone();
        let r = self
            .client
            .call("create", parent, deadline, Retry::Once, |c, ctx| {
                let n = n.clone();
                async move {
                    Ok(c.client
                        .create(ctx, Ino(parent), n, perm, flags, caller)
                        .await?
                        .map(|o| (o, c.clone())))
                }
            })
            .await;
        let got = self
            .receive_fd("create", parent, flags, deadline, ticket, r)
            .await?;
        self.cache.changed(ticket, parent, None);
        self.cache
            .put_entry(ticket, parent, name.as_bytes(), &got.opened.attr);
        Ok(got)
    }

    /// Take the descriptor of an open syncd answered, and validate it.
    ///
    /// The handle counts as held (for a reconnect's list, see
    /// [`HandleTable::held`]) from before the connection is checked: if
    /// the connection it was opened on is no longer the current one, a
    /// reconnect may already have told syncd what mountd holds without it,
    /// so the open fails (EIO) and is released rather than kept unknown to
    /// syncd. Every failure after syncd answered releases the handle.
    pub(super) async fn receive_fd(
        &self,
        op: &'static str,
        ino: u64,
        flags: i32,
        deadline: Instant,
        ticket: Ticket,
        r: Result<(Opened, Arc<crate::syncd_client::Connection>), CallError>,
    ) -> Result<OpenedFd, FsError> {
        let (opened, conn) = r.map_err(|e| e.into_fs(op))?;
        self.handles.begin_opening(opened.handle, opened.attr.ino.0);
        if self.client.current_generation() != Some(conn.generation()) {
            self.abandon(opened.handle);
            return Err(fs_err!(
                EIO,
                "{op}: the connection to keibi-syncd changed during the open"
            ));
        }
        let wait_until = deadline.max(Instant::now() + FD_GRACE);
        let fd = match conn.inbox.take(opened.handle, wait_until).await {
            Ok(fd) => fd,
            Err(e) => {
                self.abandon(opened.handle);
                return Err(FsError::io(
                    format!("{op}: descriptor of {}", opened.handle),
                    &e,
                ));
            }
        };
        if let Err(why) = fd_check::validate(
            &fd,
            Access::of_flags(flags),
            &opened.content,
            conn.syncd_uid,
        ) {
            tracing::warn!(op, ino, syncd_handle = opened.handle.0, reason = %why, "refused the content descriptor keibi-syncd sent");
            drop(fd);
            self.abandon(opened.handle);
            return Err(fs_err!(EIO, "{op}: refused the content descriptor: {why}"));
        }
        if flags & libc::O_TRUNC != 0 {
            self.cache
                .changed(ticket, opened.attr.ino.0, Some(&opened.attr));
        } else {
            self.cache.put_attr(ticket, &opened.attr);
        }
        Ok(OpenedFd {
            opened,
            fd,
            writable: Access::of_flags(flags) != Access::Read,
        })
    }

    /// Put an opened descriptor in the handle table, deciding passthrough
    /// with `register` (the reply's `open_backing`). Returns the FUSE file
    /// handle and how the open is to be answered.
    pub fn install(
        &self,
        got: OpenedFd,
        register: impl FnOnce(&OwnedFd) -> io::Result<BackingId>,
    ) -> Result<(u64, Mode), FsError> {
        let ino = got.opened.attr.ino.0;
        let syncd_handle = got.opened.handle;
        let mode = match self.passthrough.mode_for(ino, || register(&got.fd)) {
            Ok(m) => m,
            Err(e) => {
                self.abandon(syncd_handle);
                return Err(FsError::io(
                    format!("registering {syncd_handle} of ino {ino} for passthrough"),
                    &e,
                ));
            }
        };
        let backing = match &mode {
            Mode::Passthrough(id) => Some(id.clone()),
            Mode::Plain => None,
        };
        let writable = got.writable;
        let fh = self.handles.insert(Handle {
            ino,
            syncd_handle,
            file: File::from(got.fd),
            backing,
            writable,
        });
        if writable && let Some(inval) = &self.attr_inval {
            // From now on attributes go out with TTL 0; drop what the
            // kernel cached before.
            inval.attrs_of(ino);
        }
        tracing::trace!(fh, ino, syncd_handle = syncd_handle.0, "handle opened");
        Ok((fh, mode))
    }

    /// An open that was not installed is over: stop counting it as held
    /// and release it.
    pub fn abandon(&self, syncd_handle: HandleId) {
        self.handles.end_opening(syncd_handle);
        self.releases.queue(syncd_handle);
    }

    /// `release`: drop the table's reference and tell syncd.
    pub fn release(&self, fh: u64) {
        if let Some(h) = self.handles.remove(fh) {
            if h.writable {
                // Its writes changed the file's size and times: count the
                // change, as the module doc says.
                drop(self.change());
            }
            tracing::trace!(
                fh,
                ino = h.ino,
                passthrough = h.backing.is_some(),
                "handle closed"
            );
            // Delivered in the background, retried until syncd has it
            // (see `crate::releases`).
            self.releases.queue(h.syncd_handle);
        }
    }

    pub(super) fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        self.handles
            .get(fh)
            .ok_or_else(|| fs_err!(EBADF, "no open file handle {fh}"))
    }

    /// `read`: `pread` on the handle's descriptor; short only at the end of
    /// the file.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let h = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match h.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FsError::io(format!("pread of fh {fh}"), &e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// `write`: `pwrite` of all of `data` on the handle's descriptor.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let h = self.handle(fh)?;
        h.file
            .write_all_at(data, offset)
            .map_err(|e| FsError::io(format!("pwrite of fh {fh}"), &e))?;
        Ok(data.len() as u32)
    }

    /// `fallocate` on the handle's descriptor.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<(), FsError> {
        let h = self.handle(fh)?;
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
            return Err(fs_err!(EFBIG, "fallocate: range out of bounds"));
        };
        // SAFETY: fallocate on a descriptor we own (kept open by `h`); no
        // memory is passed.
        let r = unsafe { libc::fallocate(h.file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            Ok(())
        } else {
            Err(FsError::io(
                format!("fallocate of fh {fh}"),
                &io::Error::last_os_error(),
            ))
        }
    }

    /// `lseek`: `SEEK_DATA`/`SEEK_HOLE` (and `SEEK_END`) on the handle's
    /// descriptor; the kernel keeps the file position itself.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64, FsError> {
        match whence {
            libc::SEEK_SET => Ok(offset),
            libc::SEEK_DATA | libc::SEEK_HOLE | libc::SEEK_END => {
                let h = self.handle(fh)?;
                // SAFETY: lseek on a descriptor we own (kept open by `h`).
                // Its file position is never used: I/O is pread/pwrite.
                let r = unsafe { libc::lseek(h.file.as_raw_fd(), offset, whence) };
                if r >= 0 {
                    Ok(r)
                } else {
                    Err(FsError::io(
                        format!("lseek of fh {fh}"),
                        &io::Error::last_os_error(),
                    ))
                }
            }
            _ => Err(fs_err!(EINVAL, "lseek: whence {whence} is not supported")),
        }
    }

    /// `fsync`: the content descriptor (if this handle is open), then the
    /// store (syncd), all within the fsync deadline, which the stalled
    /// mode of the syncd client never shortens (see
    /// [`SyncdClient::call_durable`]).
    pub async fn fsync(&self, ino: u64, fh: Option<u64>, datasync: bool) -> Result<(), FsError> {
        let deadline = Instant::now() + self.fsync_deadline;
        if let Some(h) = fh.and_then(|fh| self.handles.get(fh)) {
            let local = tokio::task::spawn_blocking(move || {
                if datasync {
                    h.file.sync_data()
                } else {
                    h.file.sync_all()
                }
            });
            let r = tokio::time::timeout_at(deadline, local)
                .await
                .map_err(|_| {
                    fs_err!(
                        ETIMEDOUT,
                        "fsync of ino {ino}: the content file did not sync within {} ms",
                        self.fsync_deadline.as_millis()
                    )
                })?
                .map_err(|e| fs_err!(EIO, "fsync task failed: {e}"))?;
            r.map_err(|e| FsError::io(format!("fsync of ino {ino}"), &e))?;
        }
        self.client
            .call_durable("fsync", ino, deadline, |c, ctx| async move {
                c.client.fsync(ctx, Ino(ino), datasync).await
            })
            .await
            .map_err(|e| e.into_fs("fsync"))
    }
}
