//! One multiplexed connection with a peer: tasks, scheduling, flow control,
//! keepalive and closing.
//!
//! [`spawn`] takes the two halves of an established channel (anything that
//! implements [`FrameTx`] / [`FrameRx`]: the encrypted channel, or the
//! in-memory pair of the unit tests) and starts four tasks on the current
//! tokio runtime:
//!
//! - the **reader** decodes each frame into a [`Msg`] and dispatches it:
//!   answers `Ping`, records `Pong`s, hands replies and chunks to the waiting
//!   requesters and starts a serving task per incoming request
//!   ([`super::requests`]). It never waits on anything but the channel: every
//!   buffer it fills is bounded by the protocol (see below), so a slow
//!   consumer never stops it from reading (and so from answering pings).
//! - the **writer** takes the next frame from the [`Outbox`] and sends it.
//!   Priority: the closing frame, then `Pong`, `Ping`, control messages in
//!   the order they were queued (`Request`, `Reply`, `Cancel`, the first
//!   `Credit` of a stream), further `Credit`s, and last the stream frames
//!   (`Chunk`, and `End` after its stream's chunks), one frame per stream in
//!   turn (round robin). A small request is therefore answered after at most
//!   the one chunk being written, however many bulk streams are flowing.
//! - the **keepalive** task sends a `Ping` every `keepalive_timeout / 4`
//!   (always, so the round-trip time stays fresh; the RTT is smoothed as in
//!   RFC 6298, 7/8 old + 1/8 new) and closes the connection when nothing at
//!   all arrived for `keepalive_timeout`.
//! - the **driver** waits for the end (whichever comes first: a failed read
//!   or write, the peer's CLOSE, a protocol violation, keepalive expiry,
//!   [`PeerConn::close`], or the last [`PeerConn`] handle dropped), then stops
//!   the others; the writer gets [`CLOSE_GRACE`] to send the CLOSE frame.
//!
//! Flow control: a stream's receiver grants its sender credit (at first its
//! `stream_window`, then as its consumer takes chunks), and the serving side
//! queues a chunk only within that credit, and only while fewer than
//! [`MAX_QUEUED_STREAM_FRAMES`] of that stream's frames wait in the outbox.
//! So the chunk bytes of one stream that are buffered anywhere (outbox,
//! channel, receiver) never exceed the window, and a receiver that gets more
//! than it granted closes the connection. The other buffers are bounded too:
//! a side has at most [`MAX_IN_FLIGHT`] requests in flight to its peer (more
//! wait for a slot), and the serving side counts a request until its answer
//! is written, so a peer with more (one that sends requests without reading
//! the answers) breaks the protocol and is cut off; a `Pong` and each
//! stream's `Credit` are coalesced.
//!
//! Locking: all of a connection's state is in one `Mutex<State>` (the only
//! lock of this module), held for short, non-blocking steps and never across
//! an `.await`; while it is held, only `Notify`, oneshot and mpsc senders
//! (whose internal locks are leaves) and `tokio::spawn` are called. The
//! request slots (a semaphore) are awaited before the lock is taken, and
//! closed after it is released. The lock is a leaf for callers: code that
//! holds its own lock may call into a `PeerConn`.

use super::msg::Msg;
use super::requests::{self, Incoming, Outgoing, RequestHandler};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

/// The sending half of a channel: one message per frame.
pub trait FrameTx: Send + 'static {
    /// Send `payload` as one frame.
    fn send(&mut self, payload: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Tell the peer why the connection ends (a CLOSE frame), then end it.
    fn close(&mut self, reason: &str) -> impl Future<Output = io::Result<()>> + Send;
}

/// The receiving half of a channel.
pub trait FrameRx: Send + 'static {
    /// The next frame's payload (a large one in the buffer it arrived in,
    /// not copied). When the peer closed on purpose, the error's inner
    /// error is a [`PeerClosed`].
    fn recv(&mut self) -> impl Future<Output = io::Result<Bytes>> + Send;
}

/// Inside the `io::Error` of [`FrameRx::recv`]: the peer sent CLOSE with
/// this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the peer closed the connection: {0}")]
pub struct PeerClosed(pub String);

impl PeerClosed {
    /// The `io::Error` a [`FrameRx`] returns for a CLOSE with `reason`.
    pub fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, self)
    }
}

/// The encrypted channel's halves carry the connection. A channel error
/// becomes an `io::Error` that keeps its message; the peer's CLOSE becomes
/// [`PeerClosed`].
impl FrameTx for crate::channel::SecureSender {
    async fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        crate::channel::SecureSender::send(self, payload)
            .await
            .map_err(channel_error)
    }

    async fn close(&mut self, reason: &str) -> io::Result<()> {
        crate::channel::SecureSender::close(self, reason)
            .await
            .map_err(channel_error)
    }
}

impl FrameRx for crate::channel::SecureReceiver {
    async fn recv(&mut self) -> io::Result<Bytes> {
        crate::channel::SecureReceiver::recv_bytes(self)
            .await
            .map_err(channel_error)
    }
}

/// A channel error as an `io::Error` of the fitting kind, message kept.
fn channel_error(e: crate::channel::ChannelError) -> io::Error {
    use crate::channel::ChannelError;
    match e {
        ChannelError::Io(inner) => inner,
        ChannelError::Closed(reason) => PeerClosed(reason).into_io(),
        other => {
            let kind = match &other {
                ChannelError::Eof => io::ErrorKind::UnexpectedEof,
                ChannelError::Timeout(_) => io::ErrorKind::TimedOut,
                ChannelError::Oversize { .. } | ChannelError::BadFrame(_) => {
                    io::ErrorKind::InvalidData
                }
                _ => io::ErrorKind::Other,
            };
            io::Error::new(kind, other)
        }
    }
}

/// The default credit window per stream.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// The largest window a peer may grant; more credit than this outstanding
/// on one stream is a protocol error (it would let a peer make us buffer
/// without bound). [`ConnConfig::stream_window`] is clamped to
/// `MAX_CHUNK..=MAX_STREAM_WINDOW`.
pub const MAX_STREAM_WINDOW: u32 = 16 << 20;
/// The default keepalive timeout.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the writer may take to send the CLOSE frame once the
/// connection ends.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How many requests a side may have in flight to its peer at once: a
/// request holds a slot from when it is queued until its answer arrives or
/// it is cancelled. The serving side counts a request from its arrival
/// until its answer (`Reply` or `End`) is written; more than this many is
/// a protocol error.
pub const MAX_IN_FLIGHT: usize = 128;
/// How many frames of one stream may wait in the outbox (a serving task
/// waits beyond that), so that a peer granting a large window cannot make
/// the outbox grow faster than the writer drains it.
pub const MAX_QUEUED_STREAM_FRAMES: usize = 2;
/// How many unanswered `Ping`s are remembered for measuring the RTT.
const PINGS_TRACKED: usize = 8;
/// The longest close reason sent in a CLOSE frame (the channel's limit).
pub const MAX_CLOSE_REASON: usize = 1024;

/// Settings of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnConfig {
    /// The connection is dead when nothing arrived for this long; a `Ping`
    /// goes out every quarter of it.
    pub keepalive_timeout: Duration,
    /// The credit this side grants each stream it receives (bytes).
    pub stream_window: u32,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            keepalive_timeout: KEEPALIVE_TIMEOUT,
            stream_window: STREAM_WINDOW,
        }
    }
}

impl ConnConfig {
    /// The settings actually used: the window within its bounds, the
    /// timeout at least 4 ms (so the ping period is not zero).
    fn normalized(&self) -> ConnConfig {
        ConnConfig {
            keepalive_timeout: self.keepalive_timeout.max(Duration::from_millis(4)),
            stream_window: self
                .stream_window
                .clamp(super::msg::MAX_CHUNK as u32, MAX_STREAM_WINDOW),
        }
    }
}

/// Who is at the other end, for logs and the in-flight registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLabel {
    /// The peer's fingerprint (52 characters, ungrouped).
    pub fingerprint: String,
    /// The name the user gave the peer, if any.
    pub name: Option<String>,
}

impl fmt::Display for PeerLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name} ({})", self.fingerprint),
            None => f.write_str(&self.fingerprint),
        }
    }
}

/// Counters of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnStats {
    /// Smoothed `Ping` → `Pong` time; `None` before the first `Pong`.
    pub rtt: Option<Duration>,
    /// Payload bytes of the frames sent.
    pub bytes_sent: u64,
    /// Payload bytes of the frames received.
    pub bytes_received: u64,
    /// When the last frame arrived (the start, before any).
    pub last_received: std::time::Instant,
    /// When the connection was handed to [`spawn`].
    pub opened: std::time::Instant,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// [`PeerConn::close`] was called here (or every handle was dropped).
    Local(String),
    /// The peer sent CLOSE with this reason.
    Remote(String),
    /// Nothing arrived for this long.
    Keepalive(Duration),
    /// The peer broke the protocol (an undecodable message, a window
    /// overrun, a reply to an unknown kind of request, ...).
    Protocol(String),
    /// The channel failed (I/O error, end of stream, a bad frame).
    Transport(String),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Local(r) => write!(f, "closed here: {r}"),
            CloseReason::Remote(r) => write!(f, "closed by the peer: {r}"),
            CloseReason::Keepalive(t) => {
                write!(f, "keepalive: nothing received from the peer for {t:?}")
            }
            CloseReason::Protocol(r) => write!(f, "protocol error: {r}"),
            CloseReason::Transport(r) => write!(f, "channel failed: {r}"),
        }
    }
}

impl CloseReason {
    /// The reason for a failed [`FrameRx::recv`].
    fn from_recv_error(e: io::Error) -> CloseReason {
        if let Some(closed) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<PeerClosed>())
        {
            return CloseReason::Remote(closed.0.clone());
        }
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return CloseReason::Transport(format!("the peer's stream ended: {e}"));
        }
        CloseReason::Transport(format!("receiving: {e}"))
    }
}

/// Frames waiting for the writer, in the writer's priority order (see the
/// module doc).
#[derive(Default)]
pub(super) struct Outbox {
    /// `Some(None)`: end without a CLOSE frame; `Some(Some(r))`: send CLOSE
    /// with reason `r`, then end.
    close: Option<Option<String>>,
    /// The newest unanswered `Ping`'s sequence number (older ones need no
    /// answer: the newest `Pong` serves keepalive and RTT alike).
    pong: Option<u64>,
    ping: Option<u64>,
    control: VecDeque<Queued>,
    /// Credit not yet sent, per stream (coalesced).
    credits: BTreeMap<u64, u64>,
    /// Streams with queued frames, in turn order.
    ring: VecDeque<u64>,
    streams: HashMap<u64, VecDeque<Queued>>,
    /// Answers (`Reply`, `End`) queued and not yet written.
    unsent_answers: usize,
}

/// A queued frame.
struct Queued {
    frame: Vec<u8>,
    /// The request this frame answers (it is a `Reply` or `End`).
    answers: Option<u64>,
}

/// What [`Outbox::pop`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Popped {
    /// A frame to send; `Source` says what it was, for bookkeeping.
    Frame(Vec<u8>, Source),
    /// End the writer, after sending CLOSE with the reason if there is one.
    Close(Option<String>),
    /// Nothing to send.
    Idle,
}

/// Where a popped frame came from.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Source {
    Ping(u64),
    Stream(u64),
    Other,
}

/// Encode a message that is small by construction.
fn encode_small(msg: &Msg) -> Vec<u8> {
    // Ping, Pong, Credit and Cancel are a few varints; encoding into a Vec
    // cannot fail and they are far below MAX_PAYLOAD.
    msg.encode().expect("a fixed-size message always encodes")
}

impl Outbox {
    /// Queue a control message (not an answer).
    pub(super) fn push_control(&mut self, frame: Vec<u8>) {
        self.control.push_back(Queued {
            frame,
            answers: None,
        });
    }

    /// Queue the `Reply` to unary request `id`.
    pub(super) fn push_reply(&mut self, id: u64, frame: Vec<u8>) {
        self.unsent_answers += 1;
        self.control.push_back(Queued {
            frame,
            answers: Some(id),
        });
    }

    /// Queue a `Chunk` of stream `id`.
    pub(super) fn push_chunk(&mut self, id: u64, frame: Vec<u8>) {
        self.push_stream(
            id,
            Queued {
                frame,
                answers: None,
            },
        );
    }

    /// Queue the `End` of stream `id`, after its chunks.
    pub(super) fn push_end(&mut self, id: u64, frame: Vec<u8>) {
        self.unsent_answers += 1;
        self.push_stream(
            id,
            Queued {
                frame,
                answers: Some(id),
            },
        );
    }

    fn push_stream(&mut self, id: u64, queued: Queued) {
        let queue = self.streams.entry(id).or_default();
        if queue.is_empty() {
            self.ring.push_back(id);
        }
        queue.push_back(queued);
    }

    /// Answers queued and not yet written.
    pub(super) fn unsent_answers(&self) -> usize {
        self.unsent_answers
    }

    /// Forget every queued frame of served request `id` (its requester
    /// cancelled): its stream frames and its answer.
    pub(super) fn drop_request(&mut self, id: u64) {
        if let Some(queue) = self.streams.remove(&id) {
            self.ring.retain(|queued| *queued != id);
            self.unsent_answers -= queue.iter().filter(|q| q.answers.is_some()).count();
        }
        let before = self.control.len();
        self.control.retain(|q| q.answers != Some(id));
        self.unsent_answers -= before - self.control.len();
    }

    /// How many frames of stream `id` wait.
    pub(super) fn stream_len(&self, id: u64) -> usize {
        self.streams.get(&id).map_or(0, VecDeque::len)
    }

    /// Grant `bytes` more credit to the sender of stream `id`.
    pub(super) fn grant(&mut self, id: u64, bytes: u64) {
        *self.credits.entry(id).or_default() += bytes;
    }

    /// Forget unsent credit of stream `id` (it ended or was cancelled).
    pub(super) fn forget_credit(&mut self, id: u64) {
        self.credits.remove(&id);
    }

    fn queue_pong(&mut self, seq: u64) {
        self.pong = Some(seq);
    }

    fn queue_ping(&mut self, seq: u64) {
        self.ping = Some(seq);
    }

    fn start_closing(&mut self, reason: Option<String>) {
        if self.close.is_none() {
            self.close = Some(reason);
        }
    }

    /// The next frame to send, in priority order.
    pub(super) fn pop(&mut self) -> Popped {
        if let Some(reason) = self.close.take() {
            // Leave a marker so that a second pop ends the writer too.
            self.close = Some(None);
            return Popped::Close(reason);
        }
        if let Some(seq) = self.pong.take() {
            return Popped::Frame(encode_small(&Msg::Pong { seq }), Source::Other);
        }
        if let Some(seq) = self.ping.take() {
            return Popped::Frame(encode_small(&Msg::Ping { seq }), Source::Ping(seq));
        }
        if let Some(queued) = self.control.pop_front() {
            if queued.answers.is_some() {
                self.unsent_answers -= 1;
            }
            return Popped::Frame(queued.frame, Source::Other);
        }
        if let Some((id, total)) = self.credits.pop_first() {
            let bytes = u32::try_from(total).unwrap_or(u32::MAX);
            if total > u64::from(bytes) {
                self.credits.insert(id, total - u64::from(bytes));
            }
            return Popped::Frame(encode_small(&Msg::Credit { id, bytes }), Source::Other);
        }
        while let Some(id) = self.ring.pop_front() {
            let Some(queue) = self.streams.get_mut(&id) else {
                continue;
            };
            let Some(queued) = queue.pop_front() else {
                self.streams.remove(&id);
                continue;
            };
            if queue.is_empty() {
                self.streams.remove(&id);
            } else {
                self.ring.push_back(id);
            }
            if queued.answers.is_some() {
                self.unsent_answers -= 1;
            }
            return Popped::Frame(queued.frame, Source::Stream(id));
        }
        Popped::Idle
    }
}

/// Everything of a connection that its tasks and handles share.
pub(super) struct State {
    pub(super) outbox: Outbox,
    /// Requests this side sent, by id.
    pub(super) outgoing: HashMap<u64, Outgoing>,
    /// Requests this side serves, by the peer's id.
    pub(super) incoming: HashMap<u64, Incoming>,
    /// The id of the next request this side sends.
    pub(super) next_id: u64,
    /// The highest request id received (ids must increase).
    pub(super) last_incoming_id: u64,
    /// Set once, when the connection ends.
    pub(super) closed: Option<CloseReason>,
    /// The `Ping`s written and not answered yet, oldest first, with when
    /// they were written (at most [`PINGS_TRACKED`]; the peer answers only
    /// the newest of those waiting, so several may go unanswered, and a
    /// round trip longer than the ping period still gets measured).
    pings_out: VecDeque<(u64, Instant)>,
    ping_seq: u64,
    srtt: Option<Duration>,
    last_received: Instant,
    bytes_sent: u64,
    bytes_received: u64,
    /// The most chunk bytes any served stream had unacknowledged at once
    /// (for tests of the window).
    pub(super) stream_high_water: u64,
}

/// The shared core of a connection.
pub(super) struct Shared {
    pub(super) label: PeerLabel,
    pub(super) cfg: ConnConfig,
    opened: Instant,
    /// This peer's byte counters in the metrics (`None` while they are off).
    metrics: Option<crate::metrics::PeerCounters>,
    /// The connection's only lock (see the module doc for what may be done
    /// while holding it).
    state: Mutex<State>,
    /// Wakes the writer when the outbox gains a frame or closing starts
    /// (one waiter: `notify_one` keeps a permit if it is busy).
    writer_wake: Notify,
    closed_tx: watch::Sender<Option<CloseReason>>,
    /// This side's request slots ([`MAX_IN_FLIGHT`]); closed at the end.
    pub(super) slots: Arc<Semaphore>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn wake_writer(&self) {
        self.writer_wake.notify_one();
    }

    /// The reason the connection ended, if it has.
    pub(super) fn close_reason(&self) -> Option<CloseReason> {
        self.closed_tx.borrow().clone()
    }

    /// End the connection (the first call wins): fail every pending
    /// request, stop every serving task, tell the writer to send CLOSE
    /// (when `send_close`) and end, and wake [`PeerConn::closed`].
    pub(super) fn shutdown(&self, reason: CloseReason, send_close: bool) {
        let (outgoing, incoming) = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            st.closed = Some(reason.clone());
            let wire_reason = send_close.then(|| close_text(&reason));
            st.outbox.start_closing(wire_reason);
            (
                std::mem::take(&mut st.outgoing),
                std::mem::take(&mut st.incoming),
            )
        };
        // Pending requesters see their senders dropped and read the reason;
        // serving tasks stop at their next await.
        drop(outgoing);
        self.slots.close();
        for served in incoming.into_values() {
            served.task.abort();
        }
        self.wake_writer();
        match &reason {
            CloseReason::Local(_) | CloseReason::Remote(_) => {
                tracing::info!(peer = %self.label, %reason, "peer connection closed")
            }
            _ => tracing::warn!(peer = %self.label, %reason, "peer connection closed"),
        }
        self.closed_tx.send_replace(Some(reason));
    }

    fn stats(&self) -> ConnStats {
        let st = self.lock();
        ConnStats {
            rtt: st.srtt,
            bytes_sent: st.bytes_sent,
            bytes_received: st.bytes_received,
            last_received: st.last_received.into_std(),
            opened: self.opened.into_std(),
        }
    }
}

/// The text of the CLOSE frame for `reason`, within the channel's limit.
fn close_text(reason: &CloseReason) -> String {
    let mut text = match reason {
        CloseReason::Local(r) => r.clone(),
        other => other.to_string(),
    };
    if text.len() > MAX_CLOSE_REASON {
        let mut cut = MAX_CLOSE_REASON;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// A handle on a connection; clones share it. The connection ends when
/// [`PeerConn::close`] is called, when it fails, or when the last clone is
/// dropped.
#[derive(Clone)]
pub struct PeerConn {
    handle: Arc<Handle>,
}

/// Closes the connection when the last [`PeerConn`] goes.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared
            .shutdown(CloseReason::Local("every handle was dropped".into()), true);
    }
}

impl PeerConn {
    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Who is at the other end.
    pub fn label(&self) -> &PeerLabel {
        &self.handle.shared.label
    }

    /// Counters: RTT, bytes each way, last arrival, start.
    pub fn stats(&self) -> ConnStats {
        self.handle.shared.stats()
    }

    /// End the connection: send CLOSE with `reason` (cut to
    /// [`MAX_CLOSE_REASON`] bytes) and stop. Pending requests fail with
    /// `Closed`. Does nothing if it has ended already.
    pub fn close(&self, reason: &str) {
        self.handle
            .shared
            .shutdown(CloseReason::Local(reason.to_owned()), true);
    }

    /// Why the connection ended, once it has.
    pub async fn closed(&self) -> CloseReason {
        let mut rx = self.handle.shared.closed_tx.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `Shared`, which we hold: unreachable,
                // but answer rather than hang.
                return CloseReason::Local("connection state dropped".into());
            }
        }
    }

    /// Why the connection ended, or `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.handle.shared.close_reason()
    }

    /// The most unacknowledged chunk bytes any stream served on this
    /// connection had at once.
    #[cfg(test)]
    pub(super) fn stream_high_water(&self) -> u64 {
        self.handle.shared.lock().stream_high_water
    }
}

/// Start the connection's tasks on the current tokio runtime (must be
/// called inside one) and return its handle.
pub fn spawn<T: FrameTx, R: FrameRx>(
    tx: T,
    rx: R,
    label: PeerLabel,
    handler: Arc<dyn RequestHandler>,
    cfg: ConnConfig,
) -> PeerConn {
    let now = Instant::now();
    let metrics = crate::metrics::PeerCounters::of(&label.fingerprint);
    let shared = Arc::new(Shared {
        metrics,
        label,
        cfg: cfg.normalized(),
        opened: now,
        state: Mutex::new(State {
            outbox: Outbox::default(),
            outgoing: HashMap::new(),
            incoming: HashMap::new(),
            next_id: 1,
            last_incoming_id: 0,
            closed: None,
            pings_out: VecDeque::new(),
            ping_seq: 0,
            srtt: None,
            last_received: now,
            bytes_sent: 0,
            bytes_received: 0,
            stream_high_water: 0,
        }),
        writer_wake: Notify::new(),
        closed_tx: watch::channel(None).0,
        slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
    });
    tracing::debug!(peer = %shared.label, "peer connection started");
    tokio::spawn(drive(shared.clone(), tx, rx, handler));
    PeerConn {
        handle: Arc::new(Handle { shared }),
    }
}

/// Run the connection until it ends, then stop its tasks.
async fn drive<T: FrameTx, R: FrameRx>(
    shared: Arc<Shared>,
    tx: T,
    rx: R,
    handler: Arc<dyn RequestHandler>,
) {
    let mut closed = shared.closed_tx.subscribe();
    let mut writer = tokio::spawn(write_loop(shared.clone(), tx));
    let reader = tokio::spawn(read_loop(shared.clone(), rx, handler));
    let keepalive = tokio::spawn(keepalive_loop(shared.clone()));
    // Err only if the sender went, and `shared` holds it.
    let _ = closed.wait_for(Option::is_some).await;
    reader.abort();
    keepalive.abort();
    if tokio::time::timeout(CLOSE_GRACE, &mut writer)
        .await
        .is_err()
    {
        tracing::debug!(peer = %shared.label, "the CLOSE frame did not go out in time");
        writer.abort();
    }
}

async fn write_loop<T: FrameTx>(shared: Arc<Shared>, mut tx: T) {
    loop {
        let popped = {
            let mut st = shared.lock();
            let popped = st.outbox.pop();
            if let Popped::Frame(frame, source) = &popped {
                st.bytes_sent += frame.len() as u64;
                if let Some(m) = &shared.metrics {
                    m.add(crate::metrics::Direction::Sent, frame.len() as u64);
                }
                match source {
                    Source::Ping(seq) => {
                        if st.pings_out.len() == PINGS_TRACKED {
                            st.pings_out.pop_front();
                        }
                        st.pings_out.push_back((*seq, Instant::now()));
                    }
                    Source::Stream(id) => requests::stream_frame_left(&st, *id),
                    Source::Other => {}
                }
            }
            popped
        };
        match popped {
            Popped::Frame(frame, _) => {
                if let Err(e) = tx.send(&frame).await {
                    shared.shutdown(CloseReason::Transport(format!("sending: {e}")), false);
                    return;
                }
            }
            Popped::Close(Some(reason)) => {
                if let Err(e) = tx.close(&reason).await {
                    tracing::debug!(peer = %shared.label, error = %e, "sending CLOSE");
                }
                return;
            }
            Popped::Close(None) => return,
            Popped::Idle => shared.writer_wake.notified().await,
        }
    }
}

async fn read_loop<R: FrameRx>(shared: Arc<Shared>, mut rx: R, handler: Arc<dyn RequestHandler>) {
    loop {
        let frame = match rx.recv().await {
            Ok(frame) => frame,
            Err(e) => {
                let reason = CloseReason::from_recv_error(e);
                let send_close = !matches!(reason, CloseReason::Remote(_));
                shared.shutdown(reason, send_close);
                return;
            }
        };
        let len = frame.len() as u64;
        let msg = Msg::decode_frame(frame);
        let outcome = {
            let mut st = shared.lock();
            st.last_received = Instant::now();
            st.bytes_received += len;
            if let Some(m) = &shared.metrics {
                m.add(crate::metrics::Direction::Received, len);
            }
            match msg {
                Ok(msg) => dispatch(&shared, &mut st, msg, &handler),
                Err(e) => Err(format!("undecodable message: {e}")),
            }
        };
        if let Err(violation) = outcome {
            shared.shutdown(CloseReason::Protocol(violation), true);
            return;
        }
    }
}

/// Act on one received message; `Err` is a protocol violation.
fn dispatch(
    shared: &Arc<Shared>,
    st: &mut State,
    msg: Msg,
    handler: &Arc<dyn RequestHandler>,
) -> Result<(), String> {
    match msg {
        Msg::Ping { seq } => {
            st.outbox.queue_pong(seq);
            shared.wake_writer();
            Ok(())
        }
        Msg::Pong { seq } => {
            if let Some(at) = st.pings_out.iter().position(|(sent, _)| *sent == seq) {
                let sample = st.pings_out[at].1.elapsed();
                st.srtt = Some(match st.srtt {
                    None => sample,
                    Some(old) => old * 7 / 8 + sample / 8,
                });
                // Older pings will not be answered any more.
                st.pings_out.drain(..=at);
            }
            Ok(())
        }
        other => requests::dispatch(shared, st, other, handler),
    }
}

async fn keepalive_loop(shared: Arc<Shared>) {
    let timeout = shared.cfg.keepalive_timeout;
    let period = timeout / 4;
    let mut next_ping = Instant::now();
    loop {
        let last_received = {
            let st = shared.lock();
            if st.closed.is_some() {
                return;
            }
            st.last_received
        };
        let now = Instant::now();
        let dead_at = last_received + timeout;
        if now >= dead_at {
            shared.shutdown(CloseReason::Keepalive(timeout), true);
            return;
        }
        if now >= next_ping {
            {
                let mut st = shared.lock();
                st.ping_seq += 1;
                let seq = st.ping_seq;
                st.outbox.queue_ping(seq);
            }
            shared.wake_writer();
            next_ping = now + period;
        }
        tokio::time::sleep_until(dead_at.min(next_ping)).await;
    }
}

/// An in-memory channel pair for unit tests: frames pass through bounded
/// queues (like a socket buffer), CLOSE arrives as [`PeerClosed`], a
/// dropped sender as end of stream.
#[cfg(test)]
pub(crate) mod memory {
    use super::{FrameRx, FrameTx, PeerClosed};
    use std::io;
    use tokio::sync::mpsc;

    /// What travels in the queue.
    #[derive(Debug)]
    pub(crate) enum Frame {
        Data(Vec<u8>),
        Close(String),
    }

    /// The sending end.
    pub(crate) struct MemTx(pub(crate) mpsc::Sender<Frame>);
    /// The receiving end.
    pub(crate) struct MemRx(pub(crate) mpsc::Receiver<Frame>);

    /// Two connected ends, each a (tx, rx); `capacity` frames fit in each
    /// direction before `send` waits.
    pub(crate) fn pair(capacity: usize) -> ((MemTx, MemRx), (MemTx, MemRx)) {
        let (a_tx, b_rx) = mpsc::channel(capacity);
        let (b_tx, a_rx) = mpsc::channel(capacity);
        ((MemTx(a_tx), MemRx(a_rx)), (MemTx(b_tx), MemRx(b_rx)))
    }

    fn gone() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "the in-memory peer is gone")
    }

    impl FrameTx for MemTx {
        async fn send(&mut self, payload: &[u8]) -> io::Result<()> {
            self.0
                .send(Frame::Data(payload.to_vec()))
                .await
                .map_err(|_| gone())
        }

        async fn close(&mut self, reason: &str) -> io::Result<()> {
            self.0
                .send(Frame::Close(reason.to_owned()))
                .await
                .map_err(|_| gone())
        }
    }

    impl FrameRx for MemRx {
        async fn recv(&mut self) -> io::Result<bytes::Bytes> {
            match self.0.recv().await {
                Some(Frame::Data(data)) => Ok(bytes::Bytes::from(data)),
                Some(Frame::Close(reason)) => Err(PeerClosed(reason).into_io()),
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the in-memory peer ended",
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::{self, Frame, MemRx, MemTx};
    use super::*;
    use crate::peer::msg::{MAX_CHUNK, Reply, Request};
    use crate::peer::requests::{DefaultHandler, RequestError};

    fn label(name: &str) -> PeerLabel {
        PeerLabel {
            fingerprint: format!("FP{name}"),
            name: Some(name.to_owned()),
        }
    }

    fn cfg(keepalive: Duration, window: u32) -> ConnConfig {
        ConnConfig {
            keepalive_timeout: keepalive,
            stream_window: window,
        }
    }

    /// A connection whose other end the test drives by hand.
    fn with_raw_peer(config: ConnConfig) -> (PeerConn, MemTx, MemRx) {
        let ((tx, rx), (raw_tx, raw_rx)) = memory::pair(64);
        let conn = spawn(tx, rx, label("a"), Arc::new(DefaultHandler), config);
        (conn, raw_tx, raw_rx)
    }

    /// The next message the raw end receives that is not a Ping.
    async fn next_non_ping(raw_rx: &mut MemRx) -> Result<Msg, String> {
        loop {
            match raw_rx.0.recv().await {
                Some(Frame::Data(bytes)) => {
                    match Msg::decode(&bytes).expect("the conn sends valid messages") {
                        Msg::Ping { .. } => continue,
                        msg => return Ok(msg),
                    }
                }
                Some(Frame::Close(reason)) => return Err(reason),
                None => return Err("end of stream".into()),
            }
        }
    }

    /// The CLOSE reason the raw end receives (skipping everything else).
    async fn close_frame(raw_rx: &mut MemRx) -> Option<String> {
        while let Some(frame) = raw_rx.0.recv().await {
            if let Frame::Close(reason) = frame {
                return Some(reason);
            }
        }
        None
    }

    fn frame(msg: &Msg) -> Frame {
        Frame::Data(msg.encode().expect("encodes"))
    }

    #[test]
    fn outbox_sends_control_first_then_streams_in_turn() {
        let mut outbox = Outbox::default();
        for n in 0..3u8 {
            outbox.push_chunk(1, vec![1, n]);
            outbox.push_chunk(2, vec![2, n]);
        }
        outbox.push_chunk(3, vec![3, 0]);
        outbox.grant(9, 100);
        outbox.push_control(vec![0xC0]);
        outbox.queue_ping(5);
        outbox.queue_pong(4);
        outbox.push_control(vec![0xC1]);

        let mut order = Vec::new();
        loop {
            match outbox.pop() {
                Popped::Frame(frame, _) => order.push(frame),
                Popped::Idle => break,
                Popped::Close(_) => panic!("not closing"),
            }
        }
        let expected: Vec<Vec<u8>> = vec![
            Msg::Pong { seq: 4 }.encode().expect("encodes"),
            Msg::Ping { seq: 5 }.encode().expect("encodes"),
            vec![0xC0],
            vec![0xC1],
            Msg::Credit { id: 9, bytes: 100 }.encode().expect("encodes"),
            vec![1, 0],
            vec![2, 0],
            vec![3, 0],
            vec![1, 1],
            vec![2, 1],
            vec![1, 2],
            vec![2, 2],
        ];
        assert_eq!(order, expected);
    }

    #[test]
    fn outbox_control_overtakes_queued_chunks_and_close_overtakes_all() {
        let mut outbox = Outbox::default();
        outbox.push_chunk(1, vec![1]);
        outbox.push_chunk(1, vec![2]);
        assert_eq!(outbox.pop(), Popped::Frame(vec![1], Source::Stream(1)));
        outbox.push_control(vec![0xC0]);
        assert_eq!(outbox.pop(), Popped::Frame(vec![0xC0], Source::Other));
        outbox.drop_request(1);
        assert_eq!(outbox.stream_len(1), 0);
        assert_eq!(outbox.pop(), Popped::Idle);
        outbox.push_control(vec![0xC1]);
        outbox.start_closing(Some("bye".into()));
        outbox.start_closing(Some("second reason is ignored".into()));
        assert_eq!(outbox.pop(), Popped::Close(Some("bye".into())));
        assert_eq!(outbox.pop(), Popped::Close(None));
    }

    #[test]
    fn outbox_splits_credit_beyond_u32() {
        let mut outbox = Outbox::default();
        outbox.grant(1, u64::from(u32::MAX) + 10);
        let credits: Vec<Msg> = std::iter::from_fn(|| match outbox.pop() {
            Popped::Frame(f, _) => Some(Msg::decode(&f).expect("decodes")),
            _ => None,
        })
        .collect();
        assert_eq!(
            credits,
            vec![
                Msg::Credit {
                    id: 1,
                    bytes: u32::MAX
                },
                Msg::Credit { id: 1, bytes: 10 }
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_is_closed_after_the_keepalive_timeout() {
        let timeout = Duration::from_secs(5);
        let (conn, _raw_tx, mut raw_rx) = with_raw_peer(cfg(timeout, STREAM_WINDOW));
        let start = Instant::now();
        let pending = {
            let conn = conn.clone();
            tokio::spawn(async move { conn.request(Request::Ping, Duration::from_secs(60)).await })
        };
        // Not before the timeout...
        let early = tokio::time::timeout(timeout - Duration::from_millis(10), conn.closed()).await;
        assert!(early.is_err(), "closed early: {early:?}");
        // ...and at it.
        let reason = conn.closed().await;
        assert_eq!(reason, CloseReason::Keepalive(timeout));
        let waited = start.elapsed();
        assert!(
            waited >= timeout && waited < timeout + Duration::from_millis(100),
            "{waited:?}"
        );
        let err = pending
            .await
            .expect("request task")
            .expect_err("the request cannot succeed");
        match err {
            RequestError::Closed(why) => assert!(why.contains("keepalive"), "{why}"),
            other => panic!("expected Closed, got {other:?}"),
        }
        // The silent side was pinged meanwhile and then told why.
        let mut pings = 0;
        let mut close = None;
        while let Some(frame) = raw_rx.0.recv().await {
            match frame {
                Frame::Data(bytes) => {
                    if matches!(Msg::decode(&bytes), Ok(Msg::Ping { .. })) {
                        pings += 1;
                    }
                }
                Frame::Close(reason) => {
                    close = Some(reason);
                    break;
                }
            }
        }
        assert!(pings >= 4, "one ping per quarter timeout, got {pings}");
        let close = close.expect("a CLOSE frame");
        assert!(close.contains("keepalive"), "{close}");
    }

    #[tokio::test(start_paused = true)]
    async fn answering_peers_stay_connected_and_measure_rtt() {
        let timeout = Duration::from_secs(2);
        let ((a_tx, a_rx), (b_tx, b_rx)) = memory::pair(8);
        let a = spawn(
            a_tx,
            a_rx,
            label("a"),
            Arc::new(DefaultHandler),
            cfg(timeout, STREAM_WINDOW),
        );
        let b = spawn(
            b_tx,
            b_rx,
            label("b"),
            Arc::new(DefaultHandler),
            cfg(timeout, STREAM_WINDOW),
        );
        // Ten keepalive timeouts of silence from the application: the pings
        // alone keep both ends alive.
        tokio::time::sleep(timeout * 10).await;
        assert_eq!(a.close_reason(), None);
        assert_eq!(b.close_reason(), None);
        let stats = a.stats();
        assert!(stats.rtt.is_some(), "no RTT after {:?}", timeout * 10);
        assert!(
            stats.bytes_sent > 0 && stats.bytes_received > 0,
            "{stats:?}"
        );
        assert!(stats.last_received > stats.opened, "{stats:?}");
        a.close("done");
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_trip_longer_than_the_ping_period_is_measured() {
        // Pings go out every second; the raw peer answers each after 2.5 s
        // (a slow link), so three pings are always unanswered.
        let (conn, raw_tx, mut raw_rx) = with_raw_peer(cfg(Duration::from_secs(4), STREAM_WINDOW));
        let latency = Duration::from_millis(2500);
        let answerer = tokio::spawn(async move {
            while let Some(Frame::Data(bytes)) = raw_rx.0.recv().await {
                if let Ok(Msg::Ping { seq }) = Msg::decode(&bytes) {
                    let tx = raw_tx.0.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(latency).await;
                        let _ = tx.send(frame(&Msg::Pong { seq })).await;
                    });
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(conn.close_reason(), None, "the late pongs keep it alive");
        let rtt = conn.stats().rtt.expect("an RTT despite the late pongs");
        assert!(
            rtt >= latency && rtt < latency + Duration::from_millis(50),
            "{rtt:?}"
        );
        conn.close("done");
        answerer.abort();
    }

    #[tokio::test]
    async fn close_gives_each_side_its_reason_and_fails_pending_requests() {
        let ((a_tx, a_rx), (b_tx, b_rx)) = memory::pair(8);
        let a = spawn(
            a_tx,
            a_rx,
            label("a"),
            Arc::new(DefaultHandler),
            ConnConfig::default(),
        );
        let b = spawn(
            b_tx,
            b_rx,
            label("b"),
            Arc::new(DefaultHandler),
            ConnConfig::default(),
        );
        let mut stream = b
            .stream(Request::Bulk { bytes: 1 << 30 }, Duration::from_secs(60))
            .await
            .expect("stream starts");
        stream.next().await.expect("a chunk").expect("data");

        a.close("maintenance");
        assert_eq!(a.closed().await, CloseReason::Local("maintenance".into()));
        let seen_by_b = tokio::time::timeout(Duration::from_secs(10), b.closed())
            .await
            .expect("b closes");
        assert_eq!(seen_by_b, CloseReason::Remote("maintenance".into()));
        // The stream may still hand out chunks that arrived, then the reason.
        let err = loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => panic!("the stream cannot end successfully"),
            }
        };
        assert_eq!(
            err,
            RequestError::Closed("closed by the peer: maintenance".into())
        );
        assert_eq!(
            b.request(Request::Ping, Duration::from_secs(1)).await,
            Err(RequestError::Closed(
                "closed by the peer: maintenance".into()
            ))
        );
        // A second close changes nothing.
        a.close("again");
        assert_eq!(a.closed().await, CloseReason::Local("maintenance".into()));
    }

    #[tokio::test]
    async fn dropping_every_handle_closes_the_connection() {
        let ((a_tx, a_rx), (b_tx, b_rx)) = memory::pair(8);
        let a = spawn(
            a_tx,
            a_rx,
            label("a"),
            Arc::new(DefaultHandler),
            ConnConfig::default(),
        );
        let b = spawn(
            b_tx,
            b_rx,
            label("b"),
            Arc::new(DefaultHandler),
            ConnConfig::default(),
        );
        let a2 = a.clone();
        drop(a);
        assert_eq!(a2.close_reason(), None, "a clone still holds it");
        drop(a2);
        let reason = tokio::time::timeout(Duration::from_secs(10), b.closed())
            .await
            .expect("b closes");
        assert_eq!(
            reason,
            CloseReason::Remote("every handle was dropped".into())
        );
    }

    #[tokio::test]
    async fn undecodable_message_closes_with_a_protocol_error() {
        let (conn, raw_tx, mut raw_rx) = with_raw_peer(ConnConfig::default());
        raw_tx.0.send(Frame::Data(vec![99, 0])).await.expect("send");
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("closes");
        match &reason {
            CloseReason::Protocol(why) => assert!(why.contains("unknown message type 99"), "{why}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        let told = close_frame(&mut raw_rx).await.expect("a CLOSE frame");
        assert_eq!(told, reason.to_string());
    }

    #[tokio::test]
    async fn end_of_stream_closes_as_a_transport_failure() {
        let (conn, raw_tx, raw_rx) = with_raw_peer(ConnConfig::default());
        drop(raw_tx);
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("closes");
        assert!(
            matches!(&reason, CloseReason::Transport(why) if why.contains("ended")),
            "{reason:?}"
        );
        drop(raw_rx);
    }

    #[tokio::test]
    async fn chunks_beyond_the_granted_window_close_the_connection() {
        let (conn, raw_tx, mut raw_rx) = with_raw_peer(cfg(KEEPALIVE_TIMEOUT, MAX_CHUNK as u32));
        let mut stream = conn
            .stream(
                Request::Bulk {
                    bytes: 10 * MAX_CHUNK as u64,
                },
                Duration::from_secs(60),
            )
            .await
            .expect("stream starts");
        let Ok(Msg::Request { id, .. }) = next_non_ping(&mut raw_rx).await else {
            panic!("a Request first")
        };
        assert_eq!(
            next_non_ping(&mut raw_rx).await,
            Ok(Msg::Credit {
                id,
                bytes: MAX_CHUNK as u32
            })
        );
        // Exactly the window is fine; one more byte is not.
        let data = vec![0; MAX_CHUNK];
        raw_tx
            .0
            .send(frame(&Msg::Chunk {
                id,
                data: data.into(),
            }))
            .await
            .expect("send");
        raw_tx
            .0
            .send(frame(&Msg::Chunk {
                id,
                data: vec![0].into(),
            }))
            .await
            .expect("send");
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("closes");
        match &reason {
            CloseReason::Protocol(why) => assert!(why.contains("overran its window"), "{why}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        // The first chunk was delivered, then the stream failed.
        assert_eq!(
            stream.next().await.map(|r| r.map(|d| d.len())),
            Some(Ok(MAX_CHUNK))
        );
        assert!(matches!(
            stream.next().await,
            Some(Err(RequestError::Closed(_)))
        ));
    }

    #[tokio::test]
    async fn replies_to_requests_never_sent_close_the_connection() {
        let (conn, raw_tx, _raw_rx) = with_raw_peer(ConnConfig::default());
        raw_tx
            .0
            .send(frame(&Msg::Reply {
                id: 7,
                reply: Ok(Reply::Pong),
            }))
            .await
            .expect("send");
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("closes");
        assert_eq!(
            reason,
            CloseReason::Protocol("Reply for request 7, which was never sent".into())
        );
    }

    /// Two connections over the real encrypted channel on 127.0.0.1,
    /// rekeying every `rekey_bytes`: (dialer's, listener's).
    async fn over_the_channel(rekey_bytes: u64) -> (PeerConn, PeerConn) {
        use crate::channel::{ChannelConfig, LocalKeys, initiate, respond};
        use crate::identity::fingerprint_of;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (dial, accept) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (a_keys, b_keys) = (LocalKeys::new([1; 32]), LocalKeys::new([2; 32]));
        let (fp_a, fp_b) = (
            fingerprint_of(&a_keys.public()),
            fingerprint_of(&b_keys.public()),
        );
        let channel_cfg = ChannelConfig {
            handshake_timeout: Duration::from_secs(10),
            rekey_bytes,
            ..ChannelConfig::default()
        };
        let paired = {
            let fp_a = fp_a.clone();
            move |fp: &str| fp == fp_a
        };
        let (a, b) = tokio::join!(
            initiate(dial.expect("connect"), &a_keys, &fp_b, &channel_cfg),
            respond(accept.expect("accept").0, &b_keys, &paired, &channel_cfg),
        );
        let (a, b) = (
            a.expect("dialer's handshake"),
            b.expect("listener's handshake"),
        );
        let label = |fingerprint: String| PeerLabel {
            fingerprint,
            name: None,
        };
        let handler = Arc::new(DefaultHandler);
        (
            spawn(
                a.tx,
                a.rx,
                label(fp_b),
                handler.clone(),
                ConnConfig::default(),
            ),
            spawn(b.tx, b.rx, label(fp_a), handler, ConnConfig::default()),
        )
    }

    #[tokio::test]
    async fn requests_streams_and_close_work_over_the_encrypted_channel() {
        let (a, b) = over_the_channel(128 << 10).await;
        let bound = Duration::from_secs(30);
        assert_eq!(a.request(Request::Ping, bound).await, Ok(Reply::Pong));
        let data: Vec<u8> = (0..MAX_CHUNK).map(|i| (i * 7) as u8).collect();
        assert_eq!(
            b.request(Request::Echo { data: data.clone() }, bound).await,
            Ok(Reply::Echo { data })
        );
        // Two streams at once, each through several rekeys.
        let total = 1u64 << 20;
        let read_all = |conn: PeerConn| async move {
            let mut stream = conn
                .stream(Request::Bulk { bytes: total }, bound)
                .await
                .expect("starts");
            let mut offset = 0u64;
            while let Some(chunk) = stream.next().await {
                for byte in chunk.expect("stream data") {
                    assert_eq!(
                        byte,
                        crate::peer::msg::bulk_pattern_byte(offset),
                        "byte {offset}"
                    );
                    offset += 1;
                }
            }
            offset
        };
        let (from_b, from_a) = tokio::join!(read_all(a.clone()), read_all(b.clone()));
        assert_eq!((from_b, from_a), (total, total));
        assert!(a.stats().bytes_received > total && b.stats().bytes_received > total);
        a.close("moving house");
        let seen_by_b = tokio::time::timeout(bound, b.closed())
            .await
            .expect("b closes");
        assert_eq!(seen_by_b, CloseReason::Remote("moving house".into()));
        assert_eq!(a.closed().await, CloseReason::Local("moving house".into()));
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_its_answers_is_cut_off() {
        // The raw peer sends requests and never reads: the answers pile up
        // here (the queue to the raw peer holds 64 frames), until it has
        // more than MAX_IN_FLIGHT requests unanswered.
        let (conn, raw_tx, _raw_rx) = with_raw_peer(ConnConfig::default());
        let echo = vec![0x55; 1000];
        let mut sent = 0;
        let reason = loop {
            sent += 1;
            let request = Msg::Request {
                id: sent,
                timeout_ms: 60_000,
                req: Request::Echo { data: echo.clone() },
            };
            if raw_tx.0.send(frame(&request)).await.is_err() {
                break tokio::time::timeout(Duration::from_secs(10), conn.closed())
                    .await
                    .expect("closed");
            }
            if let Some(reason) = conn.close_reason() {
                break reason;
            }
            assert!(sent < 10_000, "still open after {sent} unread requests");
        };
        match &reason {
            CloseReason::Protocol(why) => assert!(why.contains("requests in flight"), "{why}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        assert!(sent as usize > MAX_IN_FLIGHT, "cut off after {sent}");
    }

    /// One case of the connection's fuzz test: feed `input` to a
    /// connection from a raw peer, then check that it either closed with a
    /// reason or still answers a `Ping` (so no task panicked or hung).
    async fn survives(input: Vec<Result<Msg, Vec<u8>>>) -> Result<(), String> {
        let config = cfg(Duration::from_secs(600), MAX_CHUNK as u32);
        let (conn, raw_tx, mut raw_rx) = with_raw_peer(config);
        // Some requests of its own, so that replies and credit can match.
        let mut own = Vec::new();
        for _ in 0..2 {
            let c = conn.clone();
            own.push(tokio::spawn(async move {
                c.request(Request::Ping, Duration::from_secs(600)).await
            }));
        }
        let c = conn.clone();
        own.push(tokio::spawn(async move {
            let mut s = c
                .stream(Request::Bulk { bytes: 1 << 20 }, Duration::from_secs(600))
                .await?;
            while let Some(chunk) = s.next().await {
                chunk?;
            }
            Ok(Reply::Pong)
        }));
        for item in input {
            let frame = match item {
                Ok(msg) => Frame::Data(msg.encode().map_err(|e| e.to_string())?),
                Err(bytes) => Frame::Data(bytes),
            };
            if raw_tx.0.send(frame).await.is_err() {
                break;
            }
        }
        let probe = Msg::Request {
            id: u64::MAX,
            timeout_ms: 10_000,
            req: Request::Ping,
        };
        let probed = raw_tx.0.send(frame(&probe)).await.is_ok();
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if !probed {
                    return Err(conn.closed().await);
                }
                match next_non_ping(&mut raw_rx).await {
                    Ok(Msg::Reply {
                        id: u64::MAX,
                        reply,
                    }) => return Ok(reply),
                    Ok(_) => continue,
                    Err(_) => return Err(conn.closed().await),
                }
            }
        })
        .await
        .map_err(|_| "neither answered nor closed".to_string())?;
        match outcome {
            Ok(Ok(Reply::Pong)) => {}
            Ok(other) => return Err(format!("probe answered {other:?}")),
            Err(CloseReason::Protocol(_) | CloseReason::Transport(_)) => {}
            Err(other) => return Err(format!("closed for an unexpected reason: {other}")),
        }
        conn.close("done");
        for task in own {
            task.abort();
        }
        Ok(())
    }

    use proptest::prelude::*;

    proptest! {
        /// The connection's fuzz target: any sequence of messages (with ids
        /// that name live requests) and arbitrary frames from a peer
        /// neither panics nor hangs it. (Case count: `PROPTEST_CASES`.)
        #[test]
        fn fuzz_connection_input(
            input in proptest::collection::vec(
                proptest::prop_oneof![
                    3 => crate::peer::msg::tests::msg_with_ids(0u64..5).prop_map(Ok),
                    1 => proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64).prop_map(Err),
                ],
                0..24,
            )
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let result = runtime.block_on(survives(input));
            prop_assert!(result.is_ok(), "{:?}", result);
        }
    }

    /// CPU time of the whole process so far.
    fn process_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// Throughput of `Bulk` streams through the whole stack (channel and
    /// connection, both ends in this process) on loopback; prints MB/s of
    /// payload and MB per CPU second (what it costs, whatever else runs on
    /// the machine), asserts only that every byte arrived. Run in release:
    /// `cargo test --release -p keibi-syncd bench_bulk -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a benchmark: run by hand, in release"]
    async fn bench_bulk_over_the_channel() {
        let (a, b) = over_the_channel(1 << 30).await;
        let total: u64 = 1 << 30;
        for streams in [1u64, 4] {
            let started = std::time::Instant::now();
            let cpu0 = process_cpu();
            let runs = (0..streams).map(|_| {
                let a = a.clone();
                tokio::spawn(async move {
                    let mut stream = a
                        .stream(
                            Request::Bulk {
                                bytes: total / streams,
                            },
                            Duration::from_secs(600),
                        )
                        .await
                        .expect("starts");
                    let mut got = 0u64;
                    while let Some(chunk) = stream.next().await {
                        got += chunk.expect("data").len() as u64;
                    }
                    got
                })
            });
            let mut got = 0;
            for run in runs.collect::<Vec<_>>() {
                got += run.await.expect("stream task");
            }
            assert_eq!(got, total / streams * streams);
            let seconds = started.elapsed().as_secs_f64();
            let cpu = (process_cpu() - cpu0).as_secs_f64();
            println!(
                "{streams} stream(s): {got} bytes in {seconds:.3} s = {:.0} MB/s; {cpu:.3} CPU s = {:.0} MB per CPU second",
                got as f64 / seconds / 1e6,
                got as f64 / cpu / 1e6
            );
        }
        a.close("done");
        drop(b);
    }

    #[tokio::test]
    async fn credit_beyond_the_largest_window_closes_the_connection() {
        let (conn, raw_tx, _raw_rx) = with_raw_peer(ConnConfig::default());
        let bulk = Msg::Request {
            id: 1,
            timeout_ms: 60_000,
            req: Request::Bulk { bytes: 1 << 40 },
        };
        raw_tx.0.send(frame(&bulk)).await.expect("send");
        let credit = Msg::Credit {
            id: 1,
            bytes: MAX_STREAM_WINDOW + 1,
        };
        raw_tx.0.send(frame(&credit)).await.expect("send");
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("closes");
        match &reason {
            CloseReason::Protocol(why) => assert!(why.contains("more than 16777216"), "{why}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    /// Start one request of the given kind from `conn` to the raw peer and
    /// return its id as the raw peer saw it.
    async fn raw_request(
        conn: &PeerConn,
        raw_rx: &mut MemRx,
        req: Request,
    ) -> (u64, tokio::task::JoinHandle<()>) {
        let c = conn.clone();
        let task = tokio::spawn(async move {
            if req.is_stream() {
                if let Ok(mut s) = c.stream(req, Duration::from_secs(60)).await {
                    while let Some(Ok(_)) = s.next().await {}
                }
            } else {
                let _ = c.request(req, Duration::from_secs(60)).await;
            }
        });
        match next_non_ping(raw_rx).await {
            Ok(Msg::Request { id, .. }) => (id, task),
            other => panic!("expected a Request, got {other:?}"),
        }
    }

    /// A request, the answer the raw peer gives it (from the id), and the
    /// protocol error that must follow.
    type WrongShape = (Request, fn(u64) -> Msg, &'static str);

    #[tokio::test]
    async fn answers_of_the_wrong_shape_close_the_connection() {
        let cases: [WrongShape; 4] = [
            (
                Request::Bulk { bytes: 1 },
                |id| Msg::Reply {
                    id,
                    reply: Ok(Reply::Pong),
                },
                "Reply to stream request 1 (Bulk)",
            ),
            (
                Request::Ping,
                |id| Msg::Chunk {
                    id,
                    data: vec![1].into(),
                },
                "Chunk for unary request 1 (Ping)",
            ),
            (
                Request::Ping,
                |id| Msg::End { id, result: Ok(()) },
                "End of unary request 1 (Ping)",
            ),
            (
                Request::Bulk { bytes: 1 },
                |id| Msg::Chunk {
                    id,
                    data: Bytes::new(),
                },
                "empty Chunk for request 1",
            ),
        ];
        for (req, answer, expected) in cases {
            let (conn, raw_tx, mut raw_rx) = with_raw_peer(ConnConfig::default());
            let (id, task) = raw_request(&conn, &mut raw_rx, req).await;
            raw_tx.0.send(frame(&answer(id))).await.expect("send");
            let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
                .await
                .expect("closes");
            assert_eq!(reason, CloseReason::Protocol(expected.into()));
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the request ends")
                .expect("task");
        }
    }

    #[tokio::test]
    async fn request_ids_must_increase() {
        let (conn, raw_tx, mut raw_rx) = with_raw_peer(ConnConfig::default());
        let ping = |id| {
            frame(&Msg::Request {
                id,
                timeout_ms: 1000,
                req: Request::Ping,
            })
        };
        raw_tx.0.send(ping(5)).await.expect("send");
        assert_eq!(
            next_non_ping(&mut raw_rx).await,
            Ok(Msg::Reply {
                id: 5,
                reply: Ok(Reply::Pong)
            })
        );
        raw_tx.0.send(ping(5)).await.expect("send");
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("closes");
        assert_eq!(
            reason,
            CloseReason::Protocol("request id 5 does not increase (the last was 5)".into())
        );
    }
}
