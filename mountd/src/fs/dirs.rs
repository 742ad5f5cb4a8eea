//! Directory listing: `readdir`, directory handles and their read-ahead
//! (see [`crate::dir_handles`] and the change counter in the parent
//! module's doc).

use super::*;

impl Keibi {
    /// `readdir`: up to `limit` entries after `after`, with attributes if
    /// `plus` (then remembered for deadline answers).
    pub async fn readdir(
        &self,
        dir: u64,
        after: u64,
        limit: u32,
        plus: bool,
    ) -> Result<Vec<DirEntry>, FsError> {
        let op = if plus { "readdirplus" } else { "readdir" };
        let ticket = self.cache.ticket();
        let entries = self
            .client
            .call(
                op,
                dir,
                self.deadline(),
                Retry::Idempotent,
                |c, ctx| async move {
                    c.client
                        .readdir(ctx, Ino(dir), DirCookie(after), limit, plus)
                        .await
                },
            )
            .await
            .map_err(|e| e.into_fs(op))?;
        for e in &entries {
            if let Some(a) = &e.attr
                && e.name.as_bytes() != b"."
                && e.name.as_bytes() != b".."
            {
                self.cache.put_entry(ticket, dir, e.name.as_bytes(), a);
                self.passthrough.entry_seen(dir, e.name.as_bytes(), a.ino.0);
            }
        }
        Ok(entries)
    }

    /// `opendir`: a new directory handle for `dir`.
    pub fn opendir(&self, dir: u64) -> u64 {
        self.dirs.open(dir)
    }

    /// `releasedir`: forget the handle and its read-ahead.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.release(fh);
    }

    /// The read-ahead of handle `fh` if it answers a request at `offset`
    /// (bounded local work, for the dispatch thread). Its entries go to
    /// the kernel while [`Keibi::usable_ahead`] accepts them.
    pub fn read_ahead(&self, fh: u64, dir: u64, offset: u64, plus: bool) -> Option<ReadAhead> {
        self.dirs.take(fh, dir, offset, plus, self.changes())
    }

    /// Whether an entry of a read-ahead may go to the kernel: not with
    /// attributes while its file is open for writing on this mount (they
    /// may be older than the kernel's).
    pub fn usable_ahead(&self, e: &DirEntry, plus: bool) -> bool {
        !plus || !self.handles.has_writer(e.ino.0)
    }

    /// Ask syncd for the entries after `offset`, a batch larger than one
    /// reply: what the reply does not take is kept with
    /// [`Keibi::keep_ahead`].
    pub async fn read_dir_batch(
        &self,
        dir: u64,
        offset: u64,
        plus: bool,
    ) -> Result<ReadAhead, FsError> {
        let changes = self.changes();
        let since = self.ticket();
        let asked_at = std::time::Instant::now();
        let batch = dir_handles::batch(plus);
        let entries = self.readdir(dir, offset, batch, plus).await?;
        Ok(ReadAhead::new(offset, entries, batch, plus, asked_at, changes).with_ticket(since))
    }

    /// The entries after `offset` for a request the read-ahead of `fh`
    /// could not answer inline: from the prefetch on its way if it
    /// continues there (waited for within the deadline), else fresh from
    /// syncd. The flag says which: entries fresh from syncd may all go to
    /// the kernel, the others only while [`Keibi::usable_ahead`] accepts
    /// them.
    pub async fn next_entries(
        &self,
        fh: u64,
        dir: u64,
        offset: u64,
        plus: bool,
    ) -> Result<(ReadAhead, bool), FsError> {
        if let Some(mut done) = self.dirs.coming(fh, dir, offset, plus) {
            // Returns once the fetch is over, however it ended.
            let _ = tokio::time::timeout_at(self.deadline(), done.changed()).await;
            if let Some(a) = self.read_ahead(fh, dir, offset, plus)
                && a.front_usable(|e| self.usable_ahead(e, plus))
            {
                return Ok((a, false));
            }
        }
        Ok((self.read_dir_batch(dir, offset, plus).await?, true))
    }

    /// Keep what a reply did not take for the next request on `fh`; with
    /// `reading_on` (the reply came from a read-ahead), fetch the next
    /// batch in the background when this one runs low.
    pub fn keep_ahead(self: &Arc<Self>, fh: u64, dir: u64, ahead: ReadAhead, reading_on: bool) {
        let Some(p) = self.dirs.keep(fh, dir, ahead, reading_on) else {
            return;
        };
        let k = self.clone();
        self.rt.spawn(async move {
            let batch = k.read_dir_batch(dir, p.after, p.plus).await.ok();
            k.dirs.arrived(fh, dir, batch);
            // Wakes the requests waiting for this batch.
            drop(p.done);
        });
    }
}
