//! Requests over a peer connection: sending them, serving them, and the
//! per-peer registry of those in flight.
//!
//! A request is unary (answered by one `Reply`) or a stream (answered by
//! `Chunk`s then `End`); [`Request::is_stream`] decides, on both sides.
//! [`PeerConn::request`] sends a unary request and waits for its reply;
//! [`PeerConn::stream`] sends a stream request and returns a
//! [`ReplyStream`] to read it. Each has a deadline (the timeout is sent
//! along, and the serving side gives up after it too). Giving up early is
//! cancelling: dropping the future of `request()`, or the `ReplyStream`
//! before its end, removes the request here and sends `Cancel`, on which the
//! serving side aborts its task and drops the stream's queued frames.
//!
//! Ids: each side numbers the requests it sends from 1, increasing; an id
//! that does not increase is a protocol error (so a stale message can never
//! be taken for a new request's).
//!
//! Slots: a request holds one of [`conn::MAX_IN_FLIGHT`] slots of its
//! connection from before it is queued until its answer arrives or its
//! `Cancel` is queued; a caller beyond that waits (within its deadline).
//! The serving side relies on it: it counts a request until its answer is
//! written, and more than the limit is a protocol error.
//!
//! Serving: each incoming request runs in its own task, calling the
//! connection's [`RequestHandler`] ([`DefaultHandler`] serves `Ping`, `Echo`
//! and `Bulk`). A stream handler sends its data through a [`ChunkSink`],
//! which waits for credit (see `conn.rs`).
//!
//! The registry ([`PeerConn::in_flight`]) lists both directions: the
//! request's name, its age, and the bytes so far (received for an outgoing
//! request, queued for sending for an incoming one).

use super::conn::{self, MAX_QUEUED_STREAM_FRAMES, MAX_STREAM_WINDOW, PeerConn, Shared, State};
use super::msg::{
    MAX_CHUNK, Msg, RemoteError, RemoteErrorKind, Reply, Request, bulk_pattern_byte, encode_chunk,
};
use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The deadline passed (the request was cancelled).
    #[error("the peer did not answer in time")]
    Timeout,
    /// The connection ended (the reason says why).
    #[error("the peer connection ended: {0}")]
    Closed(String),
    /// The peer answered with an error.
    #[error("the peer failed the request: {0}")]
    Remote(RemoteError),
    /// The request does not fit one message (e.g. an `Echo` of more than
    /// `MAX_CHUNK` bytes).
    #[error("the request is too large for one message")]
    TooLarge,
    /// A stream request was passed to `request()`, or a unary one to
    /// `stream()`.
    #[error("{request} must be sent with {use_instead}()")]
    WrongMethod {
        request: &'static str,
        use_instead: &'static str,
    },
}

/// One request in flight on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOp {
    /// The request id (in the numbering of the side that sent it).
    pub id: u64,
    /// The request's name (`Ping`, `Echo`, `Bulk`, ...).
    pub request: String,
    /// `true` if this side sent it, `false` if this side serves it.
    pub outgoing: bool,
    /// How long ago it was sent or received.
    pub age: Duration,
    /// Bytes so far: received (outgoing) or queued to send (incoming).
    pub bytes: u64,
}

/// Serves the requests a peer sends. Object safe: the connection holds an
/// `Arc<dyn RequestHandler>`; each call runs in its own task and is aborted
/// when the requester cancels or the connection ends.
pub trait RequestHandler: Send + Sync + 'static {
    /// Answer a unary request.
    fn call(&self, req: Request) -> BoxFuture<'static, Result<Reply, RemoteError>>;
    /// Serve a stream request: send its data into `sink`; the result ends
    /// the stream.
    fn stream(&self, req: Request, sink: ChunkSink) -> BoxFuture<'static, Result<(), RemoteError>>;
    /// A new connection was admitted (by the peer manager, after the
    /// duplicate rule): the sync engine starts its session on it. Runs on
    /// the network runtime; must not block.
    fn connected(&self, _conn: PeerConn) {}
}

/// Serves part 1's requests: `Ping`, `Echo` (at most `MAX_CHUNK` bytes) and
/// `Bulk` (the fixed pattern, in chunks of `MAX_CHUNK`).
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultHandler;

impl RequestHandler for DefaultHandler {
    fn call(&self, req: Request) -> BoxFuture<'static, Result<Reply, RemoteError>> {
        Box::pin(async move {
            match req {
                Request::Ping => Ok(Reply::Pong),
                Request::Echo { data } if data.len() <= MAX_CHUNK => Ok(Reply::Echo { data }),
                Request::Echo { data } => Err(RemoteError::new(
                    RemoteErrorKind::Invalid,
                    format!("echo of {} bytes exceeds {MAX_CHUNK}", data.len()),
                )),
                other => Err(unsupported(&other)),
            }
        })
    }

    fn stream(
        &self,
        req: Request,
        mut sink: ChunkSink,
    ) -> BoxFuture<'static, Result<(), RemoteError>> {
        Box::pin(async move {
            match req {
                Request::Bulk { bytes } => send_bulk(&mut sink, bytes).await,
                other => Err(unsupported(&other)),
            }
        })
    }
}

fn unsupported(req: &Request) -> RemoteError {
    RemoteError::new(
        RemoteErrorKind::Unsupported,
        format!("{} is not served here", req.name()),
    )
}

/// Send `total` bytes of the bulk pattern.
async fn send_bulk(sink: &mut ChunkSink, total: u64) -> Result<(), RemoteError> {
    // The pattern repeats every 251 bytes: one buffer of a chunk plus a
    // period holds every chunk, sliced at the offset's phase.
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    let pattern = PATTERN.get_or_init(|| {
        (0..(MAX_CHUNK + 251) as u64)
            .map(bulk_pattern_byte)
            .collect()
    });
    let mut sent = 0u64;
    while sent < total {
        let len = (total - sent).min(MAX_CHUNK as u64) as usize;
        let phase = (sent % 251) as usize;
        sink.send_slice(&pattern[phase..phase + len]).await?;
        sent += len as u64;
    }
    Ok(())
}

/// A request this side sent, waiting for its answer.
pub(super) struct Outgoing {
    name: &'static str,
    started: Instant,
    bytes: u64,
    kind: OutKind,
}

enum OutKind {
    Unary(oneshot::Sender<Result<Reply, RemoteError>>),
    Stream {
        events: mpsc::UnboundedSender<StreamEvent>,
        /// How many more chunk bytes the peer may send (granted, not yet
        /// received).
        credit_left: u64,
    },
}

enum StreamEvent {
    Chunk(Bytes),
    End(Result<(), RemoteError>),
}

/// A request this side serves.
pub(super) struct Incoming {
    name: &'static str,
    started: Instant,
    bytes: u64,
    pub(super) task: AbortHandle,
    stream: Option<StreamCredit>,
}

/// The sending side of a served stream's flow control.
struct StreamCredit {
    /// Bytes the peer still allows.
    credit: u64,
    /// Bytes queued or sent and not yet credited back.
    unacked: u64,
    /// Wakes the serving task's [`ChunkSink`] (credit arrived, or the
    /// writer took one of its frames).
    wake: Arc<Notify>,
}

/// The deadline `timeout` from now (far away when it would overflow).
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Holds an outgoing request's slot; cancels the request if it is given
/// up on.
struct OutgoingGuard {
    shared: Arc<Shared>,
    id: u64,
    /// Released when the request ends: after its answer arrived, or after
    /// its `Cancel` was queued (so a request that takes the slot next
    /// reaches the peer after the `Cancel`, and the peer never counts more
    /// than [`conn::MAX_IN_FLIGHT`] of ours).
    slot: Option<OwnedSemaphorePermit>,
}

impl OutgoingGuard {
    /// The request ended normally: nothing to cancel.
    fn disarm(&mut self) {
        self.slot = None;
    }

    /// Give up on the request: forget it and tell the peer (unless it ended
    /// meanwhile).
    fn cancel(&mut self) {
        let Some(slot) = self.slot.take() else { return };
        let mut st = self.shared.lock();
        if st.outgoing.remove(&self.id).is_some() && st.closed.is_none() {
            st.outbox.forget_credit(self.id);
            st.outbox.push_control(encode_cancel(self.id));
            drop(st);
            self.shared.wake_writer();
        }
        drop(slot);
    }
}

impl Drop for OutgoingGuard {
    fn drop(&mut self) {
        self.cancel();
    }
}

fn encode_cancel(id: u64) -> Vec<u8> {
    Msg::Cancel { id }
        .encode()
        .expect("a fixed-size message always encodes")
}

/// Take a request slot (waiting until `deadline`), then register and queue
/// a new outgoing request.
async fn start(
    shared: &Arc<Shared>,
    req: Request,
    timeout: Duration,
    deadline: Instant,
    kind: OutKind,
) -> Result<OutgoingGuard, RequestError> {
    if let Request::Echo { data } = &req
        && data.len() > MAX_CHUNK
    {
        return Err(RequestError::TooLarge);
    }
    let slot = match tokio::time::timeout_at(deadline, shared.slots.clone().acquire_owned()).await {
        Ok(Ok(slot)) => slot,
        Ok(Err(_)) => return Err(closed_error(shared)),
        Err(_) => return Err(RequestError::Timeout),
    };
    let name = req.name();
    let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    let initial_credit = match &kind {
        OutKind::Stream { credit_left, .. } => Some(*credit_left),
        OutKind::Unary(_) => None,
    };
    let mut st = shared.lock();
    if let Some(reason) = &st.closed {
        return Err(RequestError::Closed(reason.to_string()));
    }
    // The id is taken and the frame queued under one lock, so ids reach
    // the wire in increasing order.
    let id = st.next_id;
    let frame = Msg::Request {
        id,
        timeout_ms,
        req,
    }
    .encode()
    .map_err(|_| RequestError::TooLarge)?;
    st.next_id += 1;
    st.outbox.push_control(frame);
    if let Some(bytes) = initial_credit {
        // Right behind the Request, so the peer knows the stream before
        // its credit.
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        st.outbox.push_control(
            Msg::Credit { id, bytes }
                .encode()
                .expect("a fixed-size message always encodes"),
        );
    }
    st.outgoing.insert(
        id,
        Outgoing {
            name,
            started: Instant::now(),
            bytes: 0,
            kind,
        },
    );
    drop(st);
    shared.wake_writer();
    Ok(OutgoingGuard {
        shared: shared.clone(),
        id,
        slot: Some(slot),
    })
}

/// The error of a request whose connection ended.
fn closed_error(shared: &Shared) -> RequestError {
    RequestError::Closed(
        shared
            .close_reason()
            .map_or_else(|| "the connection ended".to_owned(), |r| r.to_string()),
    )
}

impl PeerConn {
    /// Send a unary request and wait (at most `timeout`) for its reply.
    /// Dropping the future before it ends cancels the request.
    pub async fn request(&self, req: Request, timeout: Duration) -> Result<Reply, RequestError> {
        if req.is_stream() {
            return Err(RequestError::WrongMethod {
                request: req.name(),
                use_instead: "stream",
            });
        }
        let deadline = deadline_after(timeout);
        let (tx, rx) = oneshot::channel();
        let mut guard = start(self.shared(), req, timeout, deadline, OutKind::Unary(tx)).await?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => {
                guard.disarm();
                reply.map_err(RequestError::Remote)
            }
            Ok(Err(_)) => {
                guard.disarm();
                Err(closed_error(self.shared()))
            }
            // The guard cancels it.
            Err(_) => Err(RequestError::Timeout),
        }
    }

    /// Send a stream request; its data comes from the returned
    /// [`ReplyStream`]. `timeout` bounds the whole stream.
    pub async fn stream(
        &self,
        req: Request,
        timeout: Duration,
    ) -> Result<ReplyStream, RequestError> {
        if !req.is_stream() {
            return Err(RequestError::WrongMethod {
                request: req.name(),
                use_instead: "request",
            });
        }
        let deadline = deadline_after(timeout);
        let window = u64::from(self.shared().cfg.stream_window);
        let (events_tx, events) = mpsc::unbounded_channel();
        let kind = OutKind::Stream {
            events: events_tx,
            credit_left: window,
        };
        let guard = start(self.shared(), req, timeout, deadline, kind).await?;
        Ok(ReplyStream {
            shared: self.shared().clone(),
            id: guard.id,
            events,
            deadline,
            window,
            unreported: 0,
            done: false,
            guard,
        })
    }

    /// The requests in flight on this connection, both directions.
    pub fn in_flight(&self) -> Vec<PeerOp> {
        let st = self.shared().lock();
        let now = Instant::now();
        let outgoing = st.outgoing.iter().map(|(id, op)| PeerOp {
            id: *id,
            request: op.name.to_owned(),
            outgoing: true,
            age: now - op.started,
            bytes: op.bytes,
        });
        let incoming = st.incoming.iter().map(|(id, op)| PeerOp {
            id: *id,
            request: op.name.to_owned(),
            outgoing: false,
            age: now - op.started,
            bytes: op.bytes,
        });
        let mut ops: Vec<PeerOp> = outgoing.chain(incoming).collect();
        ops.sort_by_key(|op| (!op.outgoing, op.id));
        ops
    }
}

/// The data of a stream request, chunk by chunk. Dropping it before the end
/// cancels the request.
pub struct ReplyStream {
    shared: Arc<Shared>,
    id: u64,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    deadline: Instant,
    window: u64,
    /// Bytes taken by the consumer and not yet credited back.
    unreported: u64,
    done: bool,
    guard: OutgoingGuard,
}

impl ReplyStream {
    /// The next chunk; `None` after the stream's successful end. After an
    /// error (timeout, connection closed, the peer's error) the stream is
    /// over and `next` returns `None`.
    pub async fn next(&mut self) -> Option<Result<Bytes, RequestError>> {
        if self.done {
            return None;
        }
        // Past the deadline, what is buffered no longer counts.
        let event = if Instant::now() >= self.deadline {
            Err(())
        } else {
            tokio::time::timeout_at(self.deadline, self.events.recv())
                .await
                .map_err(|_| ())
        };
        let event = match event {
            Ok(event) => event,
            Err(_) => {
                self.done = true;
                // Cancel now rather than when the stream is dropped.
                self.guard.cancel();
                return Some(Err(RequestError::Timeout));
            }
        };
        match event {
            Some(StreamEvent::Chunk(data)) => {
                self.consumed(data.len() as u64);
                Some(Ok(data))
            }
            Some(StreamEvent::End(result)) => {
                self.done = true;
                self.guard.disarm();
                result.err().map(|e| Err(RequestError::Remote(e)))
            }
            None => {
                self.done = true;
                self.guard.disarm();
                Some(Err(closed_error(&self.shared)))
            }
        }
    }

    /// Credit the peer for bytes the consumer took: in batches of a quarter
    /// window, or at once when nothing more is buffered here (so a sender
    /// waiting for a whole chunk's credit is never left short).
    fn consumed(&mut self, bytes: u64) {
        self.unreported += bytes;
        if self.unreported < self.window / 4 && !self.events.is_empty() {
            return;
        }
        let grant = std::mem::take(&mut self.unreported);
        let mut st = self.shared.lock();
        if st.closed.is_some() {
            return;
        }
        if let Some(Outgoing {
            kind: OutKind::Stream { credit_left, .. },
            ..
        }) = st.outgoing.get_mut(&self.id)
        {
            *credit_left += grant;
            st.outbox.grant(self.id, grant);
            drop(st);
            self.shared.wake_writer();
        }
    }
}

/// Where a stream handler sends its data. Each [`ChunkSink::send`] waits for
/// the requester's credit, so a slow consumer slows the handler down
/// instead of filling memory.
pub struct ChunkSink {
    shared: Arc<Shared>,
    id: u64,
    wake: Arc<Notify>,
}

impl ChunkSink {
    /// The peer that asked for the stream.
    pub fn peer(&self) -> &conn::PeerLabel {
        &self.shared.label
    }

    /// Queue one chunk (at most `MAX_CHUNK` bytes; an empty one is skipped)
    /// once the requester has granted credit for it.
    pub async fn send(&mut self, data: Vec<u8>) -> Result<(), RemoteError> {
        self.send_slice(&data).await
    }

    /// [`ChunkSink::send`] from borrowed data: the data is copied once,
    /// straight into the frame.
    pub async fn send_slice(&mut self, data: &[u8]) -> Result<(), RemoteError> {
        if data.is_empty() {
            return Ok(());
        }
        if data.len() > MAX_CHUNK {
            return Err(RemoteError::new(
                RemoteErrorKind::Failed,
                format!("a chunk of {} bytes exceeds {MAX_CHUNK}", data.len()),
            ));
        }
        let len = data.len() as u64;
        let frame = encode_chunk(self.id, data)
            .map_err(|e| RemoteError::new(RemoteErrorKind::Failed, e.to_string()))?;
        loop {
            {
                let mut guard = self.shared.lock();
                let st = &mut *guard;
                let gone = || RemoteError::new(RemoteErrorKind::Failed, "the stream was cancelled");
                if st.closed.is_some() {
                    return Err(gone());
                }
                let Some(served) = st.incoming.get_mut(&self.id) else {
                    return Err(gone());
                };
                let Some(flow) = served.stream.as_mut() else {
                    return Err(gone());
                };
                if flow.credit >= len && st.outbox.stream_len(self.id) < MAX_QUEUED_STREAM_FRAMES {
                    flow.credit -= len;
                    flow.unacked += len;
                    st.stream_high_water = st.stream_high_water.max(flow.unacked);
                    served.bytes += len;
                    st.outbox.push_chunk(self.id, frame);
                    drop(guard);
                    self.shared.wake_writer();
                    return Ok(());
                }
            }
            // A permit stored by a notify_one between the check and here
            // makes this return at once.
            self.wake.notified().await;
        }
    }
}

/// The writer took a frame of served stream `id`: its sink may queue more.
pub(super) fn stream_frame_left(st: &State, id: u64) {
    if let Some(flow) = st
        .incoming
        .get(&id)
        .and_then(|served| served.stream.as_ref())
    {
        flow.wake.notify_one();
    }
}

/// Act on a received request-layer message; `Err` is a protocol violation.
pub(super) fn dispatch(
    shared: &Arc<Shared>,
    st: &mut State,
    msg: Msg,
    handler: &Arc<dyn RequestHandler>,
) -> Result<(), String> {
    match msg {
        Msg::Ping { .. } | Msg::Pong { .. } => Ok(()),
        Msg::Request {
            id,
            timeout_ms,
            req,
        } => on_request(
            shared,
            st,
            id,
            Duration::from_millis(timeout_ms.into()),
            req,
            handler,
        ),
        Msg::Reply { id, reply } => {
            check_sent(st, id, "Reply")?;
            match st.outgoing.remove(&id) {
                // Given up on here already.
                None => Ok(()),
                Some(Outgoing {
                    kind: OutKind::Unary(tx),
                    ..
                }) => {
                    let _ = tx.send(reply);
                    Ok(())
                }
                Some(Outgoing { name, .. }) => {
                    Err(format!("Reply to stream request {id} ({name})"))
                }
            }
        }
        Msg::Chunk { id, data } => {
            check_sent(st, id, "Chunk")?;
            if data.is_empty() {
                return Err(format!("empty Chunk for request {id}"));
            }
            let Some(op) = st.outgoing.get_mut(&id) else {
                // Cancelled here; the chunks in transit are dropped.
                return Ok(());
            };
            match &mut op.kind {
                OutKind::Unary(_) => Err(format!("Chunk for unary request {id} ({})", op.name)),
                OutKind::Stream {
                    events,
                    credit_left,
                } => {
                    let len = data.len() as u64;
                    if len > *credit_left {
                        return Err(format!(
                            "stream {id} ({}) overran its window: a {len}-byte chunk with {credit_left} bytes of credit",
                            op.name
                        ));
                    }
                    *credit_left -= len;
                    op.bytes += len;
                    // The receiver may be gone (dropped just now): its guard
                    // cancels.
                    let _ = events.send(StreamEvent::Chunk(data));
                    Ok(())
                }
            }
        }
        Msg::End { id, result } => {
            check_sent(st, id, "End")?;
            match st.outgoing.remove(&id) {
                None => Ok(()),
                Some(Outgoing {
                    kind: OutKind::Stream { events, .. },
                    ..
                }) => {
                    st.outbox.forget_credit(id);
                    let _ = events.send(StreamEvent::End(result));
                    Ok(())
                }
                Some(Outgoing { name, .. }) => Err(format!("End of unary request {id} ({name})")),
            }
        }
        Msg::Credit { id, bytes } => {
            check_received(st, id, "Credit")?;
            let Some(flow) = st.incoming.get_mut(&id).and_then(|s| s.stream.as_mut()) else {
                // Finished here already (or unary: credit means nothing).
                return Ok(());
            };
            let bytes = u64::from(bytes);
            flow.credit += bytes;
            flow.unacked = flow.unacked.saturating_sub(bytes);
            if flow.credit + flow.unacked > u64::from(MAX_STREAM_WINDOW) {
                return Err(format!(
                    "stream {id} was granted {} bytes of window, more than {MAX_STREAM_WINDOW}",
                    flow.credit + flow.unacked
                ));
            }
            flow.wake.notify_one();
            Ok(())
        }
        Msg::Cancel { id } => {
            check_received(st, id, "Cancel")?;
            if let Some(served) = st.incoming.remove(&id) {
                served.task.abort();
            }
            // Its queued chunks and answer too, if any: the requester has
            // forgotten it.
            st.outbox.drop_request(id);
            Ok(())
        }
    }
}

/// A reply-side message must name a request this side sent.
fn check_sent(st: &State, id: u64, what: &str) -> Result<(), String> {
    if id == 0 || id >= st.next_id {
        return Err(format!("{what} for request {id}, which was never sent"));
    }
    Ok(())
}

/// A requester-side message must name a request this side received.
fn check_received(st: &State, id: u64, what: &str) -> Result<(), String> {
    if id == 0 || id > st.last_incoming_id {
        return Err(format!("{what} for request {id}, which was never received"));
    }
    Ok(())
}

fn on_request(
    shared: &Arc<Shared>,
    st: &mut State,
    id: u64,
    timeout: Duration,
    req: Request,
    handler: &Arc<dyn RequestHandler>,
) -> Result<(), String> {
    if id <= st.last_incoming_id {
        return Err(format!(
            "request id {id} does not increase (the last was {})",
            st.last_incoming_id
        ));
    }
    st.last_incoming_id = id;
    let stream = req.is_stream();
    // Served, or answered with the answer not yet written: an honest peer
    // holds a slot for each of these (see `OutgoingGuard::slot`).
    let in_flight = st.incoming.len() + st.outbox.unsent_answers();
    if in_flight >= conn::MAX_IN_FLIGHT {
        return Err(format!(
            "the peer has more than {} requests in flight (it is not reading the answers?)",
            conn::MAX_IN_FLIGHT
        ));
    }
    let name = req.name();
    let flow = stream.then(|| StreamCredit {
        credit: 0,
        unacked: 0,
        wake: Arc::new(Notify::new()),
    });
    let sink_wake = flow.as_ref().map(|f| f.wake.clone());
    // The task cannot finish before the entry exists: it needs the lock
    // held here to report its end.
    let task = tokio::spawn(serve(
        shared.clone(),
        id,
        req,
        timeout,
        handler.clone(),
        sink_wake,
    ));
    st.incoming.insert(
        id,
        Incoming {
            name,
            started: Instant::now(),
            bytes: 0,
            task: task.abort_handle(),
            stream: flow,
        },
    );
    Ok(())
}

/// Run one incoming request and queue its answer (unless it was cancelled
/// or the connection ended meanwhile).
async fn serve(
    shared: Arc<Shared>,
    id: u64,
    req: Request,
    timeout: Duration,
    handler: Arc<dyn RequestHandler>,
    sink_wake: Option<Arc<Notify>>,
) {
    let frame = match sink_wake {
        None => {
            let name = req.name();
            let reply = guarded(&shared, name, timeout, || handler.call(req)).await;
            Msg::Reply { id, reply }.encode().unwrap_or_else(|e| {
                let reply = Err(RemoteError::new(RemoteErrorKind::Failed, e.to_string()));
                encode_error(Msg::Reply { id, reply })
            })
        }
        Some(wake) => {
            let sink = ChunkSink {
                shared: shared.clone(),
                id,
                wake,
            };
            let name = req.name();
            let result = guarded(&shared, name, timeout, || handler.stream(req, sink)).await;
            Msg::End { id, result }.encode().unwrap_or_else(|e| {
                let result = Err(RemoteError::new(RemoteErrorKind::Failed, e.to_string()));
                encode_error(Msg::End { id, result })
            })
        }
    };
    let mut st = shared.lock();
    let Some(served) = st.incoming.remove(&id) else {
        return;
    };
    if st.closed.is_some() {
        return;
    }
    if served.stream.is_some() {
        st.outbox.push_end(id, frame);
    } else {
        st.outbox.push_reply(id, frame);
    }
    drop(st);
    shared.wake_writer();
}

/// Run a handler within `timeout`, turning a panic (while making its
/// future or running it) into a `Failed` error, so that a buggy handler
/// costs one request, not the connection's bookkeeping.
async fn guarded<T>(
    shared: &Shared,
    request: &'static str,
    timeout: Duration,
    make: impl FnOnce() -> BoxFuture<'static, Result<T, RemoteError>>,
) -> Result<T, RemoteError> {
    let panicked = || {
        tracing::error!(peer = %shared.label, request, "the request handler panicked");
        RemoteError::new(
            RemoteErrorKind::Failed,
            format!("the handler of {request} failed"),
        )
    };
    let Ok(future) = std::panic::catch_unwind(AssertUnwindSafe(make)) else {
        return Err(panicked());
    };
    match tokio::time::timeout(timeout, AssertUnwindSafe(future).catch_unwind()).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(panicked()),
        Err(_) => Err(RemoteError::new(
            RemoteErrorKind::Timeout,
            format!("not served within {timeout:?}"),
        )),
    }
}

/// Encode a `Reply` or `End` that carries an error.
fn encode_error(msg: Msg) -> Vec<u8> {
    // A RemoteError's message is at most MAX_ERROR_MESSAGE bytes.
    msg.encode().expect("an error message always fits a frame")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::conn::memory;
    use crate::peer::conn::{
        ConnConfig, KEEPALIVE_TIMEOUT, MAX_IN_FLIGHT, PeerLabel, STREAM_WINDOW, spawn,
    };
    use futures::future::join_all;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Bound for every wait in these tests.
    const BOUND: Duration = Duration::from_secs(20);

    /// Counts serving tasks that ended without finishing (aborted).
    #[derive(Default)]
    struct Counters {
        started: AtomicUsize,
        aborted: AtomicUsize,
    }

    /// Marks its task aborted when dropped before `finish`.
    struct AbortSignal {
        counters: Arc<Counters>,
        finished: bool,
    }

    impl AbortSignal {
        fn new(counters: &Arc<Counters>) -> AbortSignal {
            counters.started.fetch_add(1, Ordering::SeqCst);
            AbortSignal {
                counters: counters.clone(),
                finished: false,
            }
        }

        /// The task finished (a method, so the async block captures the
        /// whole signal, not just the flag).
        fn finish(&mut self) {
            self.finished = true;
        }
    }

    impl Drop for AbortSignal {
        fn drop(&mut self) {
            if !self.finished {
                self.counters.aborted.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// The default handler, except that `Echo` of `b"stall"` never answers,
    /// a `Bulk` of 13 bytes fails after its first chunk, and every serving
    /// task reports whether it was aborted.
    struct TestHandler {
        counters: Arc<Counters>,
    }

    impl RequestHandler for TestHandler {
        fn call(&self, req: Request) -> BoxFuture<'static, Result<Reply, RemoteError>> {
            let mut signal = AbortSignal::new(&self.counters);
            Box::pin(async move {
                if matches!(&req, Request::Echo { data } if data == b"stall") {
                    std::future::pending::<()>().await;
                }
                if matches!(&req, Request::Echo { data } if data == b"panic") {
                    panic!("a handler bug (expected by the test)");
                }
                let reply = DefaultHandler.call(req).await;
                signal.finish();
                reply
            })
        }

        fn stream(
            &self,
            req: Request,
            mut sink: ChunkSink,
        ) -> BoxFuture<'static, Result<(), RemoteError>> {
            let mut signal = AbortSignal::new(&self.counters);
            Box::pin(async move {
                let result = if req == (Request::Bulk { bytes: 13 }) {
                    sink.send(vec![1; 13]).await?;
                    Err(RemoteError::new(RemoteErrorKind::Failed, "disk on fire"))
                } else {
                    DefaultHandler.stream(req, sink).await
                };
                signal.finish();
                result
            })
        }
    }

    struct Pair {
        client: PeerConn,
        server: PeerConn,
        counters: Arc<Counters>,
    }

    /// A client (default handler) and a server (test handler); `window` is
    /// what the client grants each stream.
    fn pair(window: u32) -> Pair {
        let ((c_tx, c_rx), (s_tx, s_rx)) = memory::pair(8);
        let counters = Arc::new(Counters::default());
        let label = |name: &str| PeerLabel {
            fingerprint: name.to_uppercase(),
            name: Some(name.into()),
        };
        let client_cfg = ConnConfig {
            keepalive_timeout: KEEPALIVE_TIMEOUT,
            stream_window: window,
        };
        let client = spawn(
            c_tx,
            c_rx,
            label("client"),
            Arc::new(DefaultHandler),
            client_cfg,
        );
        let handler = Arc::new(TestHandler {
            counters: counters.clone(),
        });
        let server = spawn(s_tx, s_rx, label("server"), handler, ConnConfig::default());
        Pair {
            client,
            server,
            counters,
        }
    }

    /// Wait (bounded) until `check` holds.
    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let polled = tokio::time::timeout(BOUND, async {
            while !check() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        assert!(polled.await.is_ok(), "timed out waiting until {what}");
    }

    fn check_bulk(offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            assert_eq!(
                *byte,
                bulk_pattern_byte(offset + i as u64),
                "byte {}",
                offset + i as u64
            );
        }
    }

    /// Read a stream to its end; the total bytes.
    async fn drain(stream: &mut ReplyStream, mut offset: u64) -> u64 {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("stream data");
            assert!(!chunk.is_empty() && chunk.len() <= MAX_CHUNK);
            check_bulk(offset, &chunk);
            offset += chunk.len() as u64;
        }
        offset
    }

    #[tokio::test]
    async fn requests_are_answered_both_ways() {
        let p = pair(STREAM_WINDOW);
        assert_eq!(
            p.client.request(Request::Ping, BOUND).await,
            Ok(Reply::Pong)
        );
        assert_eq!(
            p.server.request(Request::Ping, BOUND).await,
            Ok(Reply::Pong)
        );
        let data = vec![7u8; MAX_CHUNK];
        assert_eq!(
            p.client
                .request(Request::Echo { data: data.clone() }, BOUND)
                .await,
            Ok(Reply::Echo { data })
        );
        let mut stream = p
            .server
            .stream(Request::Bulk { bytes: 1_000_000 }, BOUND)
            .await
            .expect("starts");
        assert_eq!(drain(&mut stream, 0).await, 1_000_000);
        assert!(stream.next().await.is_none(), "over after its end");
        until("both registries are empty", || {
            p.client.in_flight().is_empty() && p.server.in_flight().is_empty()
        })
        .await;
        assert_eq!(p.counters.aborted.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn misuse_and_oversize_are_refused_before_sending() {
        let p = pair(STREAM_WINDOW);
        assert_eq!(
            p.client.request(Request::Bulk { bytes: 1 }, BOUND).await,
            Err(RequestError::WrongMethod {
                request: "Bulk",
                use_instead: "stream"
            })
        );
        assert_eq!(
            p.client.stream(Request::Ping, BOUND).await.err(),
            Some(RequestError::WrongMethod {
                request: "Ping",
                use_instead: "request"
            })
        );
        assert_eq!(
            p.client
                .request(
                    Request::Echo {
                        data: vec![0; MAX_CHUNK + 1]
                    },
                    BOUND
                )
                .await,
            Err(RequestError::TooLarge)
        );
        assert_eq!(
            p.counters.started.load(Ordering::SeqCst),
            0,
            "nothing reached the server"
        );
    }

    #[tokio::test]
    async fn remote_errors_reach_the_requester() {
        let p = pair(STREAM_WINDOW);
        let mut stream = p
            .client
            .stream(Request::Bulk { bytes: 13 }, BOUND)
            .await
            .expect("starts");
        assert_eq!(stream.next().await, Some(Ok(Bytes::from(vec![1; 13]))));
        assert_eq!(
            stream.next().await,
            Some(Err(RequestError::Remote(RemoteError::new(
                RemoteErrorKind::Failed,
                "disk on fire"
            ))))
        );
        assert_eq!(stream.next().await, None);
    }

    #[tokio::test]
    async fn a_panicking_handler_fails_its_request_only() {
        let p = pair(STREAM_WINDOW);
        let panic = Request::Echo {
            data: b"panic".to_vec(),
        };
        match p.client.request(panic, BOUND).await {
            Err(RequestError::Remote(e)) => {
                assert_eq!(e.kind, RemoteErrorKind::Failed);
                assert_eq!(e.message, "the handler of Echo failed");
            }
            other => panic!("expected the handler's failure, got {other:?}"),
        }
        assert!(p.server.in_flight().is_empty(), "its slot is free");
        assert_eq!(
            p.client.request(Request::Ping, BOUND).await,
            Ok(Reply::Pong)
        );
    }

    #[tokio::test]
    async fn many_concurrent_requests_each_get_their_own_answer() {
        let p = pair(STREAM_WINDOW);
        let calls = (0..3 * MAX_IN_FLIGHT as u32).map(|n| {
            let client = p.client.clone();
            async move {
                let data = n.to_le_bytes().repeat(1 + n as usize % 50);
                let reply = client
                    .request(Request::Echo { data: data.clone() }, BOUND)
                    .await;
                assert_eq!(reply, Ok(Reply::Echo { data }), "request {n}");
            }
        });
        // Streams in the middle of it, too.
        let streams = (0..4u64).map(|n| {
            let client = p.client.clone();
            async move {
                let bytes = 300_000 + n * 77_777;
                let mut stream = client
                    .stream(Request::Bulk { bytes }, BOUND)
                    .await
                    .expect("starts");
                assert_eq!(drain(&mut stream, 0).await, bytes);
            }
        });
        tokio::join!(join_all(calls), join_all(streams));
        assert_eq!(
            p.counters.started.load(Ordering::SeqCst),
            3 * MAX_IN_FLIGHT + 4
        );
    }

    #[tokio::test]
    async fn requests_beyond_the_limit_wait_for_a_slot() {
        let p = pair(STREAM_WINDOW);
        let stall = || Request::Echo {
            data: b"stall".to_vec(),
        };
        let mut stalled: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|_| {
                let client = p.client.clone();
                tokio::spawn(async move { client.request(stall(), BOUND).await })
            })
            .collect();
        until("the server serves the limit", || {
            p.server.in_flight().len() == MAX_IN_FLIGHT
        })
        .await;
        // One more waits here, unsent...
        let extra = {
            let client = p.client.clone();
            tokio::spawn(async move { client.request(Request::Ping, BOUND).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(
            p.client.in_flight().len(),
            MAX_IN_FLIGHT,
            "the extra one is not sent"
        );
        assert_eq!(p.server.in_flight().len(), MAX_IN_FLIGHT);
        assert!(!extra.is_finished());
        // ...until a slot frees up.
        stalled.pop().expect("a stalled request").abort();
        let answer = tokio::time::timeout(BOUND, extra)
            .await
            .expect("answered")
            .expect("task");
        assert_eq!(answer, Ok(Reply::Pong));
        assert_eq!(p.client.close_reason(), None);
        for task in stalled {
            task.abort();
        }
        until("the stalled requests are cancelled", || {
            p.server.in_flight().is_empty()
        })
        .await;
        assert_eq!(p.counters.aborted.load(Ordering::SeqCst), MAX_IN_FLIGHT);
    }

    #[tokio::test]
    async fn a_small_request_is_answered_while_a_bulk_stream_flows() {
        let p = pair(STREAM_WINDOW);
        let total = 3 * STREAM_WINDOW as u64;
        let mut bulk = p
            .client
            .stream(Request::Bulk { bytes: total }, BOUND)
            .await
            .expect("starts");
        let first = bulk.next().await.expect("a chunk").expect("data");
        check_bulk(0, &first);
        // The bulk stream has more than its window left to send, and its
        // server task is still running (it has sent at most a window), yet
        // the echo is answered now.
        let echo = p
            .client
            .request(
                Request::Echo {
                    data: b"small".to_vec(),
                },
                BOUND,
            )
            .await;
        assert_eq!(
            echo,
            Ok(Reply::Echo {
                data: b"small".to_vec()
            })
        );
        let serving: Vec<_> = p
            .server
            .in_flight()
            .into_iter()
            .filter(|op| op.request == "Bulk")
            .collect();
        assert_eq!(serving.len(), 1, "the bulk stream is still being served");
        assert!(serving[0].bytes < total);
        // Then the bulk stream completes, intact.
        assert_eq!(drain(&mut bulk, first.len() as u64).await, total);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_requests_keep_being_answered_while_a_consumed_bulk_stream_flows() {
        let p = pair(STREAM_WINDOW);
        let received = Arc::new(AtomicUsize::new(0));
        let mut bulk = p
            .client
            .stream(Request::Bulk { bytes: u64::MAX }, BOUND)
            .await
            .expect("starts");
        let consumer = {
            let received = received.clone();
            tokio::spawn(async move {
                let mut offset = 0u64;
                while let Some(chunk) = bulk.next().await {
                    let chunk = chunk.expect("stream data");
                    check_bulk(offset, &chunk);
                    offset += chunk.len() as u64;
                    received.store(offset as usize, Ordering::SeqCst);
                }
                panic!("an endless stream ended");
            })
        };
        until("the bulk stream flows", || {
            received.load(Ordering::SeqCst) > 0
        })
        .await;
        for n in 0..20u8 {
            let before = received.load(Ordering::SeqCst);
            let echo = p
                .client
                .request(Request::Echo { data: vec![n; 100] }, BOUND)
                .await;
            assert_eq!(echo, Ok(Reply::Echo { data: vec![n; 100] }));
            // The stream goes on meanwhile: it is not paused for the echo.
            until("more bulk data arrives", || {
                received.load(Ordering::SeqCst) > before
            })
            .await;
        }
        assert!(!consumer.is_finished(), "the bulk stream is still flowing");
        consumer.abort();
    }

    #[tokio::test]
    async fn the_window_bounds_the_senders_unacknowledged_bytes() {
        let window = 2 * MAX_CHUNK as u32;
        let p = pair(window);
        let total = 40 * MAX_CHUNK as u64;
        let mut bulk = p
            .client
            .stream(Request::Bulk { bytes: total }, BOUND)
            .await
            .expect("starts");
        let first = bulk.next().await.expect("a chunk").expect("data");
        // With the consumer stopped, the sender fills the window and waits.
        until("the sender has a full window out", || {
            p.server.stream_high_water() == u64::from(window)
        })
        .await;
        let client_op = p.client.in_flight().pop().expect("the stream is in flight");
        assert!(
            client_op.bytes <= u64::from(window),
            "received {} > window",
            client_op.bytes
        );
        assert_eq!(drain(&mut bulk, first.len() as u64).await, total);
        assert_eq!(
            p.server.stream_high_water(),
            u64::from(window),
            "never more than the window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_request_is_cancelled_on_the_server() {
        let p = pair(STREAM_WINDOW);
        let result = p
            .client
            .request(
                Request::Echo {
                    data: b"stall".to_vec(),
                },
                Duration::from_millis(300),
            )
            .await;
        assert_eq!(result, Err(RequestError::Timeout));
        assert!(p.client.in_flight().is_empty(), "the requester forgot it");
        until("the serving task is aborted", || {
            p.counters.aborted.load(Ordering::SeqCst) == 1
        })
        .await;
        assert!(p.server.in_flight().is_empty());
    }

    #[tokio::test]
    async fn dropping_a_request_future_cancels_it_on_the_server() {
        let p = pair(STREAM_WINDOW);
        let client = p.client.clone();
        let task = tokio::spawn(async move {
            client
                .request(
                    Request::Echo {
                        data: b"stall".to_vec(),
                    },
                    Duration::from_secs(3600),
                )
                .await
        });
        until("the server serves it", || p.server.in_flight().len() == 1).await;
        assert_eq!(p.counters.aborted.load(Ordering::SeqCst), 0);
        task.abort();
        until("the serving task is aborted", || {
            p.counters.aborted.load(Ordering::SeqCst) == 1
        })
        .await;
        assert!(p.server.in_flight().is_empty());
        assert!(p.client.in_flight().is_empty());
        assert_eq!(p.client.close_reason(), None, "the connection goes on");
        assert_eq!(
            p.client.request(Request::Ping, BOUND).await,
            Ok(Reply::Pong)
        );
    }

    #[tokio::test]
    async fn dropping_a_reply_stream_cancels_it_on_the_server() {
        let p = pair(STREAM_WINDOW);
        let mut bulk = p
            .client
            .stream(Request::Bulk { bytes: u64::MAX }, BOUND)
            .await
            .expect("starts");
        bulk.next().await.expect("a chunk").expect("data");
        assert_eq!(p.server.in_flight().len(), 1);
        drop(bulk);
        until("the serving task is aborted", || {
            p.counters.aborted.load(Ordering::SeqCst) == 1
        })
        .await;
        assert!(p.server.in_flight().is_empty());
        assert!(p.client.in_flight().is_empty());
        assert_eq!(
            p.client.request(Request::Ping, BOUND).await,
            Ok(Reply::Pong)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_past_its_deadline_times_out_and_is_cancelled() {
        let p = pair(STREAM_WINDOW);
        let mut bulk = p
            .client
            .stream(Request::Bulk { bytes: u64::MAX }, Duration::from_secs(3))
            .await
            .expect("starts");
        let mut received = 0u64;
        let err = loop {
            match bulk.next().await {
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if received > 8 * u64::from(STREAM_WINDOW) {
                        // Stop consuming: the deadline passes while we wait.
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
                Some(Err(e)) => break e,
                None => panic!("an endless stream cannot end"),
            }
        };
        assert_eq!(err, RequestError::Timeout);
        assert_eq!(bulk.next().await, None);
        until("the serving task is aborted", || {
            p.counters.aborted.load(Ordering::SeqCst) == 1
        })
        .await;
        assert!(p.server.in_flight().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_shows_ongoing_requests_with_their_age_and_bytes() {
        let p = pair(STREAM_WINDOW);
        let mut bulk = p
            .client
            .stream(Request::Bulk { bytes: 1 << 30 }, BOUND)
            .await
            .expect("starts");
        let mut consumed = 0;
        for _ in 0..3 {
            consumed += bulk.next().await.expect("a chunk").expect("data").len() as u64;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let client_ops = p.client.in_flight();
        let server_ops = p.server.in_flight();
        assert_eq!(client_ops.len(), 1, "{client_ops:?}");
        assert_eq!(server_ops.len(), 1, "{server_ops:?}");
        let (mine, theirs) = (&client_ops[0], &server_ops[0]);
        assert_eq!(
            (mine.id, mine.request.as_str(), mine.outgoing),
            (1, "Bulk", true)
        );
        assert_eq!(
            (theirs.id, theirs.request.as_str(), theirs.outgoing),
            (1, "Bulk", false)
        );
        assert!(mine.age >= Duration::from_secs(2) && theirs.age >= Duration::from_secs(2));
        // Received so far: what was consumed plus what is buffered, within
        // a window; sent so far: at least that.
        assert!(
            mine.bytes >= consumed && mine.bytes <= consumed + u64::from(STREAM_WINDOW),
            "{mine:?}"
        );
        assert!(theirs.bytes >= mine.bytes, "{theirs:?} vs {mine:?}");
        drop(bulk);
        until("the registries are empty", || {
            p.client.in_flight().is_empty() && p.server.in_flight().is_empty()
        })
        .await;
    }
}
