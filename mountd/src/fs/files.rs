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
        let got = match self
            .receive_fd("create", parent, flags, deadline, ticket, r)
            .await
        {
            Ok(got) => got,
            Err(e) => {
                // Made or not: unknown.
                self.cache.known.unsure(parent);
                return Err(e);
            }
        };
        self.cache.known.added(parent, name.as_bytes());
        self.cache
            .dir_changed(ticket, parent, got.opened.parent.as_ref());
        self.cache
            .put_entry(ticket, parent, name.as_bytes(), &got.opened.attr);
        self.passthrough
            .entry_seen(parent, name.as_bytes(), got.opened.attr.ino.0);
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
        let partial = match got.opened.partial.as_ref().map(PartialState::new) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                self.abandon(syncd_handle);
                return Err(e);
            }
        };
        let open = OpenKind {
            content: got.opened.content,
            partial: partial.is_some(),
            writable: got.writable,
        };
        let mode = match self.passthrough.mode_for(ino, open, || register(&got.fd)) {
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
            Mode::Plain | Mode::PlainDirect => None,
        };
        let cached_plain = matches!(mode, Mode::Plain);
        let writable = got.writable;
        let fh = self.handles.insert(Handle {
            ino,
            syncd_handle,
            file: File::from(got.fd),
            backing,
            writable,
            partial,
            cached_plain,
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
            if h.cached_plain {
                self.passthrough.plain_released(h.ino);
            }
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
        pread(&*self.handle(fh)?, fh, offset, size)
    }

    /// `write`: `pwrite` of all of `data` on the handle's descriptor.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        pwrite(&*self.handle(fh)?, fh, offset, data)
    }

    /// Whether an I/O of `[offset, offset + len)` on `fh` must first have
    /// syncd fetch missing chunks ([`crate::ondemand`]); if so, the
    /// `*_fetching` form of the operation runs on a task. Bounded local
    /// work, for the dispatch thread.
    pub fn needs_fetch(&self, fh: u64, offset: u64, len: u64) -> bool {
        let missing = self
            .handles
            .get(fh)
            .and_then(|h| h.partial.as_ref().map(|p| p.missing(offset, len)));
        if let Some(missing) = missing {
            crate::metrics::partial_io(missing);
        }
        missing.unwrap_or(false)
    }

    /// Have syncd make the chunks of `[offset, offset + len)` of `h`'s
    /// version present, within the read deadline, and note them.
    async fn fetch(&self, h: &Handle, offset: u64, len: u64) -> Result<(), FsError> {
        let Some(p) = &h.partial else {
            return Ok(());
        };
        if !p.missing(offset, len) {
            return Ok(());
        }
        let deadline = Instant::now() + self.read_deadline;
        let bitmap = self
            .data
            .fetch_range(h.syncd_handle, offset, len, deadline)
            .await
            .map_err(|e| {
                tracing::info!(ino = h.ino, offset, len, error = %e, "fetching missing bytes failed");
                ondemand::fetch_error(e)
            })?;
        p.merge(&bitmap);
        Ok(())
    }

    /// `read` of a range with missing chunks: fetch them, then `pread`.
    pub async fn read_fetching(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let h = self.handle(fh)?;
        self.fetch(&h, offset, u64::from(size)).await?;
        blocking(move || pread(&h, fh, offset, size)).await
    }

    /// `write` touching missing chunks: fetch them, then `pwrite`, so no
    /// later fetch overwrites the written bytes.
    pub async fn write_fetching(
        &self,
        fh: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u32, FsError> {
        let h = self.handle(fh)?;
        self.fetch(&h, offset, data.len() as u64).await?;
        blocking(move || pwrite(&h, fh, offset, &data)).await
    }

    /// `fallocate` over missing chunks (zeroing or punching changes their
    /// bytes): fetch them first, as for a write.
    pub async fn fallocate_fetching(
        &self,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), FsError> {
        let h = self.handle(fh)?;
        self.fetch(&h, offset, length).await?;
        blocking(move || fallocate(&h, fh, offset, length, mode)).await
    }

    /// `fallocate` on the handle's descriptor.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<(), FsError> {
        fallocate(&*self.handle(fh)?, fh, offset, length, mode)
    }

    /// `lseek`: `SEEK_DATA`/`SEEK_HOLE` (and `SEEK_END`) on the handle's
    /// descriptor; the kernel keeps the file position itself.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64, FsError> {
        match whence {
            libc::SEEK_SET => Ok(offset),
            libc::SEEK_DATA | libc::SEEK_HOLE | libc::SEEK_END => {
                let h = self.handle(fh)?;
                if h.partial.is_some() && whence != libc::SEEK_END {
                    return seek_without_holes(&h, fh, offset, whence);
                }
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

/// Run local descriptor work off the runtime's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, FsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| fs_err!(EIO, "I/O task failed: {e}"))?
}

/// `SEEK_DATA`/`SEEK_HOLE` on a partial file: its content file has holes
/// where chunks are not here yet, which are data of the file, so it
/// answers as a file without holes (data up to the size, the only hole
/// at the end). Otherwise `cp` and other sparse-aware programs would copy
/// missing chunks as zeros.
fn seek_without_holes(h: &Handle, fh: u64, offset: i64, whence: i32) -> Result<i64, FsError> {
    let size = h
        .file
        .metadata()
        .map_err(|e| FsError::io(format!("fstat of fh {fh}"), &e))?
        .len();
    let at = u64::try_from(offset).map_err(|_| fs_err!(ENXIO, "lseek: negative offset"))?;
    if at >= size {
        return Err(fs_err!(ENXIO, "lseek: offset {at} is at or beyond the end"));
    }
    if whence == libc::SEEK_DATA {
        Ok(offset)
    } else {
        i64::try_from(size).map_err(|_| fs_err!(EFBIG, "lseek: size out of range"))
    }
}

/// `pread` of `size` bytes at `offset`; short only at the end of the file.
///
/// The buffer is not zeroed first: the kernel fills its spare capacity and
/// only what it filled becomes part of the answer (zeroing each read's
/// buffer was a measurable part of serving reads that are not passed
/// through).
fn pread(h: &Handle, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
    let size = size as usize;
    let mut buf: Vec<u8> = Vec::with_capacity(size);
    while buf.len() < size {
        let done = buf.len();
        let Ok(at) = libc::off_t::try_from(offset + done as u64) else {
            return Err(fs_err!(
                EINVAL,
                "pread of fh {fh}: offset {offset} out of range"
            ));
        };
        // SAFETY: the kernel writes at most `size - done` bytes into the
        // spare capacity that starts at `done` (allocated above, never
        // read before written), on a descriptor kept open by `h`.
        let n = unsafe {
            libc::pread(
                h.file.as_raw_fd(),
                buf.as_mut_ptr().add(done).cast(),
                size - done,
                at,
            )
        };
        match n {
            0 => break,
            // SAFETY: the kernel initialised these `n` bytes (n is at most
            // `size - done`, so they lie within the capacity).
            n if n > 0 => unsafe { buf.set_len(done + n as usize) },
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(FsError::io(format!("pread of fh {fh}"), &e));
            }
        }
    }
    Ok(buf)
}

/// `pwrite` of all of `data` at `offset`.
fn pwrite(h: &Handle, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
    h.file
        .write_all_at(data, offset)
        .map_err(|e| FsError::io(format!("pwrite of fh {fh}"), &e))?;
    Ok(data.len() as u32)
}

/// `fallocate` on the handle's descriptor.
fn fallocate(h: &Handle, fh: u64, offset: u64, length: u64, mode: i32) -> Result<(), FsError> {
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

#[cfg(test)]
mod tests {
    //! The on-demand read path against a fake syncd that "fetches" by
    //! writing the chunk into the content file, as syncd does.
    use super::*;
    use crate::attr_cache::AttrCache;
    use crate::sync_data::SyncData;
    use crate::syncd_client::{self, ConnectConfig};
    use futures::future::BoxFuture;
    use ipc_schema::{ChangeBatch, ContentId, FileKind, Partial, Timestamp};
    use std::path::PathBuf;
    use std::sync::Mutex;

    const CS: u64 = 4096;

    /// Fills the chunks asked for with `b'b'`, or fails with `fail`.
    struct FakeSyncd {
        path: PathBuf,
        fail: Option<i32>,
        asked: Mutex<Vec<(HandleId, u64, u64)>>,
        present: Mutex<Vec<u64>>,
    }

    impl SyncData for FakeSyncd {
        fn fetch_range(
            &self,
            handle: HandleId,
            offset: u64,
            len: u64,
            _deadline: Instant,
        ) -> BoxFuture<'static, Result<Vec<u64>, FsError>> {
            self.asked.lock().expect("lock").push((handle, offset, len));
            if let Some(errno) = self.fail {
                return Box::pin(async move { Err(FsError::new(errno, "fake")) });
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.path)
                .expect("content file");
            let mut present = self.present.lock().expect("lock");
            for i in offset / CS..=(offset + len - 1) / CS {
                if present[0] & (1 << i) == 0 {
                    f.write_all_at(&[b'b'; CS as usize], i * CS)
                        .expect("fill a chunk");
                    present[0] |= 1 << i;
                }
            }
            let bitmap = present.clone();
            Box::pin(async move { Ok(bitmap) })
        }

        fn changes(
            &self,
            _: u64,
            _: u64,
            _: Duration,
        ) -> BoxFuture<'static, Result<ChangeBatch, CallError>> {
            Box::pin(futures::future::pending())
        }
    }

    fn attr(ino: u64, size: u64) -> Attr {
        Attr {
            ino: Ino(ino),
            kind: FileKind::File,
            size,
            blocks: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            crtime: Timestamp::default(),
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            has_xattrs: false,
        }
    }

    /// A mount's filesystem over `fake`, with passthrough granted, and a
    /// partial handle of a 3-chunk file whose chunk 0 (`a`s) is present.
    fn partial_open(
        dir: &tempfile::TempDir,
        fail: Option<i32>,
    ) -> (Arc<Keibi>, Arc<FakeSyncd>, u64, Arc<Passthrough>) {
        let path = dir.path().join("content");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("content file");
        f.set_len(3 * CS).expect("sparse file");
        f.write_all_at(&[b'a'; CS as usize], 0).expect("chunk 0");
        let fake = Arc::new(FakeSyncd {
            path,
            fail,
            asked: Mutex::new(Vec::new()),
            present: Mutex::new(vec![0b001]),
        });
        let passthrough = Arc::new(Passthrough::new(true));
        passthrough.set_granted(true);
        let (client, _connector) = syncd_client::new(ConnectConfig {
            socket: dir.path().join("no-syncd.sock"),
            mountpoint: "/nowhere".into(),
            passthrough: passthrough.clone(),
        });
        let keibi = Arc::new(
            Keibi::new(
                client,
                passthrough.clone(),
                Duration::from_secs(1),
                AttrCache::new(16),
                Duration::from_secs(1),
                tokio::runtime::Handle::current(),
            )
            .with_data(fake.clone()),
        );
        let got = OpenedFd {
            opened: Opened {
                handle: HandleId(9),
                attr: attr(5, 3 * CS),
                content: ContentId {
                    dev: 1,
                    ino: 2,
                    uid: 3,
                },
                partial: Some(Partial {
                    chunk_size: CS,
                    size: 3 * CS,
                    present: vec![0b001],
                }),
                parent: None,
            },
            fd: OwnedFd::from(f),
            writable: true,
        };
        let (fh, mode) = keibi
            .install(got, |_| {
                panic!("a partial open never registers a backing file")
            })
            .expect("install");
        assert!(matches!(mode, Mode::Plain));
        (keibi, fake, fh, passthrough)
    }

    #[tokio::test]
    async fn present_chunks_are_read_inline_missing_ones_fetched_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k, fake, fh, _) = partial_open(&dir, None);
        assert!(!k.needs_fetch(fh, 0, CS));
        assert_eq!(k.read(fh, 100, 10).expect("read"), vec![b'a'; 10]);
        assert!(fake.asked.lock().expect("lock").is_empty());

        assert!(k.needs_fetch(fh, CS - 96, 200), "the range reaches chunk 1");
        let got = k.read_fetching(fh, CS - 96, 200).await.expect("read");
        let mut want = vec![b'a'; 96];
        want.extend_from_slice(&[b'b'; 104]);
        assert_eq!(got, want);
        assert_eq!(
            *fake.asked.lock().expect("lock"),
            vec![(HandleId(9), CS - 96, 200)]
        );
        assert!(!k.needs_fetch(fh, CS, CS), "chunk 1 is present now");
        assert!(k.needs_fetch(fh, 2 * CS, 1), "chunk 2 is not");
        assert!(!k.needs_fetch(fh, 3 * CS, CS), "nothing beyond the size");
    }

    #[tokio::test]
    async fn a_write_into_a_missing_chunk_fetches_it_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k, fake, fh, _) = partial_open(&dir, None);
        assert!(k.needs_fetch(fh, 2 * CS + 10, 5));
        let n = k
            .write_fetching(fh, 2 * CS + 10, b"hello".to_vec())
            .await
            .expect("write");
        assert_eq!(n, 5);
        assert_eq!(fake.asked.lock().expect("lock").len(), 1);
        let got = k.read(fh, 2 * CS + 8, 9).expect("read");
        assert_eq!(got, b"bbhellobb", "the fetch came first, the write after");
        // Writes beyond the size and into present chunks need nothing.
        assert!(!k.needs_fetch(fh, 3 * CS, 100));
        assert!(!k.needs_fetch(fh, 0, 100));
    }

    #[tokio::test]
    async fn a_truncate_through_the_mount_needs_no_fetch_beyond_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k, _, fh, _) = partial_open(&dir, None);
        assert!(k.needs_fetch(fh, CS, 10));
        k.handles.truncated(5, CS);
        assert!(!k.needs_fetch(fh, CS, 10));
        k.handles.truncated(6, 0);
        assert!(!k.needs_fetch(fh, 0, 10), "chunk 0 was present anyway");
    }

    #[tokio::test]
    async fn fetch_errors_are_the_reads_errno() {
        for (errno, want) in [
            (libc::ETIMEDOUT, libc::ETIMEDOUT),
            (libc::EIO, libc::EIO),
            (libc::ENOSYS, libc::EIO),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (k, _, fh, _) = partial_open(&dir, Some(errno));
            let r = k.read_fetching(fh, CS, 10).await;
            assert_eq!(
                r.map_err(|e| e.errno).err(),
                Some(want),
                "fetch failed with {errno}"
            );
            let r = k.write_fetching(fh, CS, b"x".to_vec()).await;
            assert_eq!(r.map_err(|e| e.errno).err(), Some(want));
            assert!(k.needs_fetch(fh, CS, 10), "still missing");
            assert_eq!(k.read(fh, 0, 4).expect("present bytes still read"), b"aaaa");
        }
    }

    #[tokio::test]
    async fn a_partial_file_has_no_holes_for_seek_data_and_seek_hole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k, _, fh, _) = partial_open(&dir, None);
        // Chunks 1 and 2 are holes in the content file, but data of the
        // file: they must not look like holes.
        assert_eq!(
            k.lseek(fh, CS as i64, libc::SEEK_DATA).expect("data"),
            CS as i64
        );
        assert_eq!(
            k.lseek(fh, 0, libc::SEEK_HOLE).expect("hole"),
            3 * CS as i64,
            "the only hole is at the end"
        );
        assert_eq!(
            k.lseek(fh, 3 * CS as i64, libc::SEEK_DATA)
                .map_err(|e| e.errno)
                .err(),
            Some(libc::ENXIO)
        );
        assert_eq!(k.lseek(fh, 0, libc::SEEK_END).expect("end"), 3 * CS as i64);
    }

    #[tokio::test]
    async fn releasing_the_partial_handle_ends_its_plain_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k, _, fh, passthrough) = partial_open(&dir, None);
        let open = OpenKind {
            content: ContentId {
                dev: 1,
                ino: 2,
                uid: 3,
            },
            partial: false,
            writable: true,
        };
        let r = passthrough.mode_for(5, open, || panic!("a plain handle is live"));
        assert!(matches!(r, Ok(Mode::Plain)));
        passthrough.plain_released(5);
        k.release(fh);
        let mut asked = false;
        let _ = passthrough.mode_for(5, open, || {
            asked = true;
            Err(io::Error::from_raw_os_error(libc::EBADF))
        });
        assert!(
            asked,
            "no plain handle left: a writer may register a backing file"
        );
    }
}
