//! [`Relay`]: a TCP relay that understands the peer channel's framing, to
//! stand between two syncd as a network attacker would.
//!
//! A dials the relay's port as if it were B; for each accepted connection
//! the relay dials B and pumps bytes both ways, one thread per direction.
//! Each pump parses the stream as the channel frames it (docs/protocol.md):
//! first the handshake messages, `u16` big-endian length then body (two
//! from the dialer — messages 1 and 3 — and one from the listener —
//! message 2), then transport frames, `u32` big-endian length then sealed
//! body, until the connection ends. Frames are numbered per direction from
//! 0 (frame 0 is the READY frame).
//!
//! It passes everything through and counts frames and bytes per connection
//! and direction, keeps the first [`HEAD_LEN`] bytes of each frame (up to
//! [`MAX_HEADS`] frames), and counts how often a `needle` (a known
//! plaintext) occurs anywhere in each direction's byte stream, across frame
//! boundaries. At most one [`Fault`] is applied, once, on the first
//! connection that reaches the frame it names: flip a bit, replay, reflect,
//! swap two frames, replace a frame with a `u32::MAX` length prefix, or
//! stall (stop forwarding). Later connections pass through, so the test can
//! watch the peers reconnect.
//!
//! Frame lengths above [`PARSE_CAP`] (which no honest peer sends) switch
//! that direction to raw byte forwarding, so the relay never trusts a
//! length it cannot buffer.
//!
//! Plain std threads and blocking sockets; `Drop` shuts every socket down,
//! which ends every pump, and joins the threads.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// How many bytes of each frame (length prefix included) are kept.
pub const HEAD_LEN: usize = 64;
/// How many frames per direction have their first bytes kept.
pub const MAX_HEADS: usize = 4096;
/// The largest frame the relay buffers (above the channel's own cap).
pub const PARSE_CAP: u32 = 4 * 1024 * 1024;
/// How many junk body bytes follow an injected oversize length prefix, so
/// that a receiver that believed the length would have to read (and
/// store) them.
pub const OVERSIZE_JUNK: usize = 64 * 1024 * 1024;

/// A direction of a relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the dialer (the handshake's initiator) to the listener.
    Out,
    /// From the listener (the responder) back to the dialer.
    Back,
}

impl Dir {
    /// The handshake messages that travel this way before the frames.
    fn handshake_messages(self) -> usize {
        match self {
            Dir::Out => 2,
            Dir::Back => 1,
        }
    }
}

/// What to do to transport frame `frame` (0 = READY) of direction `dir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Flip the lowest bit of the frame's first sealed byte.
    FlipBit { dir: Dir, frame: u64 },
    /// Forward the frame, then the same frame again.
    Replay { dir: Dir, frame: u64 },
    /// Forward the frame, and send a copy back to its sender.
    Reflect { dir: Dir, frame: u64 },
    /// Hold the frame and forward it after the next one.
    Swap { dir: Dir, frame: u64 },
    /// Instead of the frame, send a `u32::MAX` length prefix and then up to
    /// [`OVERSIZE_JUNK`] junk bytes (until the receiver stops reading).
    Oversize { dir: Dir, frame: u64 },
    /// From this frame on, forward nothing more in either direction of
    /// this connection, and keep its sockets open.
    Stall { dir: Dir, frame: u64 },
    /// Forward the first half of the frame, then reset the connection:
    /// both of its sockets send a TCP RST (a mid-stream reset, as a
    /// middlebox or a peer's crash makes; the receiver has a torn frame).
    Reset { dir: Dir, frame: u64 },
}

impl Fault {
    fn place(self) -> (Dir, u64) {
        match self {
            Fault::FlipBit { dir, frame }
            | Fault::Replay { dir, frame }
            | Fault::Reflect { dir, frame }
            | Fault::Swap { dir, frame }
            | Fault::Oversize { dir, frame }
            | Fault::Stall { dir, frame }
            | Fault::Reset { dir, frame } => (dir, frame),
        }
    }
}

/// What went through one direction of one connection.
#[derive(Clone, Debug, Default)]
pub struct DirRecord {
    /// Transport frames forwarded (the handshake messages not included).
    pub frames: u64,
    /// Bytes forwarded, handshake and length prefixes included.
    pub bytes: u64,
    /// The first [`HEAD_LEN`] bytes of each of the first [`MAX_HEADS`]
    /// frames, length prefix included.
    pub heads: Vec<Vec<u8>>,
    /// The handshake messages, whole, length prefix included.
    pub handshake: Vec<Vec<u8>>,
    /// Occurrences of the needle in this direction's byte stream.
    pub needle_hits: u64,
    /// Whether the direction fell back to raw forwarding (a length above
    /// [`PARSE_CAP`]).
    pub raw: bool,
    /// When the pump of this direction stopped: its sender closed or
    /// failed, or its receiver stopped taking bytes.
    pub ended: Option<Instant>,
}

/// What went through one relayed connection.
#[derive(Clone, Debug, Default)]
pub struct ConnRecord {
    /// Dialer → listener.
    pub out: DirRecord,
    /// Listener → dialer.
    pub back: DirRecord,
    /// Whether the fault was applied on this connection.
    pub faulted: bool,
}

impl ConnRecord {
    /// The record of `dir`.
    pub fn dir(&self, dir: Dir) -> &DirRecord {
        match dir {
            Dir::Out => &self.out,
            Dir::Back => &self.back,
        }
    }

    fn dir_mut(&mut self, dir: Dir) -> &mut DirRecord {
        match dir {
            Dir::Out => &mut self.out,
            Dir::Back => &mut self.back,
        }
    }
}

/// State shared by the acceptor and the pumps.
struct Shared {
    upstream: SocketAddr,
    /// The fault to apply (settable later: [`Relay::arm`]).
    fault: Mutex<Option<Fault>>,
    /// How long each transport frame is held before it is forwarded.
    delay: std::time::Duration,
    /// Set by the pump that applies the fault (once per relay).
    fired: AtomicBool,
    /// When it was applied.
    fired_at: Mutex<Option<Instant>>,
    needle: Vec<u8>,
    stopping: AtomicBool,
    /// One record per accepted connection, in order.
    conns: Mutex<Vec<ConnRecord>>,
    /// Every socket, to shut down on drop.
    sockets: Mutex<Vec<TcpStream>>,
    /// Stall flags, one per connection.
    stalls: Mutex<Vec<Arc<AtomicBool>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A frame-aware relay to `upstream`. See the module docs.
pub struct Relay {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listen on a free port of 127.0.0.1 and relay each connection to
    /// `upstream`, applying `fault` once and counting `needle` (empty: no
    /// search).
    pub fn start(upstream: SocketAddr, fault: Option<Fault>, needle: &[u8]) -> Relay {
        Relay::start_delayed(upstream, fault, needle, std::time::Duration::ZERO)
    }

    /// [`Relay::start`], and each transport frame is held for `delay`
    /// before it is forwarded (in order, per direction: a slow hop that
    /// adds `delay` to every frame).
    pub fn start_delayed(
        upstream: SocketAddr,
        fault: Option<Fault>,
        needle: &[u8],
        delay: std::time::Duration,
    ) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("relay: local address");
        let shared = Arc::new(Shared {
            upstream,
            fault: Mutex::new(fault),
            delay,
            fired: AtomicBool::new(false),
            fired_at: Mutex::new(None),
            needle: needle.to_vec(),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
            stalls: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || accept_loop(listener, sh))
            .expect("spawn the relay's acceptor");
        Relay {
            shared,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// The address to dial, `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// A copy of the records of every connection so far.
    pub fn records(&self) -> Vec<ConnRecord> {
        lock(&self.shared.conns).clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Set the fault to apply (if none was applied yet): frames are
    /// numbered per connection, so a test can aim at a frame after what
    /// [`Relay::records`] shows has passed.
    pub fn arm(&self, fault: Fault) {
        *lock(&self.shared.fault) = Some(fault);
    }

    /// Whether the fault has been applied.
    pub fn fault_applied(&self) -> bool {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// When the fault was applied, if it was.
    pub fn fault_applied_at(&self) -> Option<Instant> {
        *lock(&self.shared.fired_at)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor.
        let _ = TcpStream::connect(self.addr);
        for s in lock(&self.shared.sockets).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for flag in lock(&self.shared.stalls).iter() {
            flag.store(false, Ordering::SeqCst);
        }
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        let Ok(server) = TcpStream::connect(shared.upstream) else {
            // Nothing listens upstream: the dialer sees the connection end.
            drop(client);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let clones = (
            client.try_clone(),
            client.try_clone(),
            server.try_clone(),
            server.try_clone(),
        );
        let (Ok(client_r), Ok(client_keep), Ok(server_r), Ok(server_keep)) = clones else {
            continue;
        };
        let (Ok(client_reset), Ok(server_reset)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let index = {
            let mut conns = lock(&shared.conns);
            conns.push(ConnRecord::default());
            conns.len() - 1
        };
        {
            let mut socks = lock(&shared.sockets);
            socks.push(client_keep);
            socks.push(server_keep);
        }
        // Stalled pumps park on this flag; holding the sockets open.
        let stall = Arc::new(AtomicBool::new(false));
        lock(&shared.stalls).push(stall.clone());
        let to_client = Arc::new(Mutex::new(client));
        let to_server = Arc::new(Mutex::new(server));
        for (dir, reader, dst, src, dst_raw) in [
            (
                Dir::Out,
                client_r,
                to_server.clone(),
                to_client.clone(),
                server_reset,
            ),
            (
                Dir::Back,
                server_r,
                to_client.clone(),
                to_server.clone(),
                client_reset,
            ),
        ] {
            let pump = Pump {
                shared: shared.clone(),
                conn: index,
                dir,
                reader,
                dst,
                src,
                dst_raw,
                stall: stall.clone(),
                tail: Vec::new(),
            };
            let t = std::thread::Builder::new()
                .name(format!("relay-{index}-{dir:?}"))
                .spawn(move || pump.run())
                .expect("spawn a relay pump");
            lock(&shared.threads).push(t);
        }
    }
}

/// One direction of one connection.
struct Pump {
    shared: Arc<Shared>,
    conn: usize,
    dir: Dir,
    reader: TcpStream,
    /// Where frames go (the other end).
    dst: Arc<Mutex<TcpStream>>,
    /// Where they came from (for reflection).
    src: Arc<Mutex<TcpStream>>,
    /// The socket of `dst`, outside its lock (the other pump may hold that
    /// lock in a blocked write): for [`Fault::Reset`].
    dst_raw: TcpStream,
    stall: Arc<AtomicBool>,
    /// The last `needle.len() - 1` bytes seen, for matches across writes.
    tail: Vec<u8>,
}

impl Pump {
    fn run(mut self) {
        let _ = self.pump();
        let now = Instant::now();
        self.record(|r| r.ended = Some(now));
        // Pass the end on, so the other side sees what the sender did.
        if !self.stall.load(Ordering::SeqCst) {
            let _ = lock(&self.dst).shutdown(Shutdown::Write);
        }
    }

    fn record<R>(&self, f: impl FnOnce(&mut DirRecord) -> R) -> R {
        let mut conns = lock(&self.shared.conns);
        f(conns[self.conn].dir_mut(self.dir))
    }

    /// Count needle matches in `bytes` (continuing the stream so far).
    fn scan(&mut self, bytes: &[u8]) {
        let n = self.shared.needle.len();
        if n == 0 {
            return;
        }
        let mut hay = std::mem::take(&mut self.tail);
        hay.extend_from_slice(bytes);
        let first = self.shared.needle[0];
        let mut hits = 0;
        if hay.len() >= n {
            for i in 0..=hay.len() - n {
                if hay[i] == first && hay[i..i + n] == self.shared.needle[..] {
                    hits += 1;
                }
            }
        }
        let keep = hay.len().min(n - 1);
        self.tail = hay[hay.len() - keep..].to_vec();
        if hits > 0 {
            self.record(|r| r.needle_hits += hits);
        }
    }

    /// Write `bytes` to the other end, counted and scanned.
    fn forward(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.scan(bytes);
        lock(&self.dst).write_all(bytes)?;
        self.record(|r| r.bytes += bytes.len() as u64);
        Ok(())
    }

    /// Park while this connection is stalled (until the relay drops).
    fn wait_if_stalled(&self) -> bool {
        while self.stall.load(Ordering::SeqCst) {
            if self.shared.stopping.load(Ordering::SeqCst) {
                return true;
            }
            std::thread::park_timeout(std::time::Duration::from_millis(20));
        }
        false
    }

    /// Claim the fault if it is for this direction and frame.
    fn claim(&self, frame: u64) -> Option<Fault> {
        let fault = (*lock(&self.shared.fault))?;
        if fault.place() != (self.dir, frame) {
            return None;
        }
        if self.shared.fired.swap(true, Ordering::SeqCst) {
            return None;
        }
        *lock(&self.shared.fired_at) = Some(Instant::now());
        lock(&self.shared.conns)[self.conn].faulted = true;
        Some(fault)
    }

    fn pump(&mut self) -> std::io::Result<()> {
        for _ in 0..self.dir.handshake_messages() {
            let mut len = [0u8; 2];
            self.reader.read_exact(&mut len)?;
            let mut msg = len.to_vec();
            msg.resize(2 + u16::from_be_bytes(len) as usize, 0);
            self.reader.read_exact(&mut msg[2..])?;
            self.forward(&msg)?;
            self.record(|r| r.handshake.push(msg.clone()));
        }
        let mut held: Option<Vec<u8>> = None;
        let mut frame_no: u64 = 0;
        loop {
            let mut len = [0u8; 4];
            self.reader.read_exact(&mut len)?;
            if self.wait_if_stalled() {
                return Ok(());
            }
            let body_len = u32::from_be_bytes(len);
            if body_len > PARSE_CAP {
                self.record(|r| r.raw = true);
                self.forward(&len)?;
                return self.raw_copy();
            }
            let mut frame = len.to_vec();
            frame.resize(4 + body_len as usize, 0);
            self.reader.read_exact(&mut frame[4..])?;
            let this = frame_no;
            frame_no += 1;
            if !self.shared.delay.is_zero() {
                std::thread::sleep(self.shared.delay);
            }
            self.record(|r| {
                r.frames += 1;
                if r.heads.len() < MAX_HEADS {
                    r.heads.push(frame[..frame.len().min(HEAD_LEN)].to_vec());
                }
            });
            match self.claim(this) {
                None => {
                    self.forward(&frame)?;
                    if let Some(h) = held.take() {
                        self.forward(&h)?;
                    }
                }
                Some(Fault::FlipBit { .. }) => {
                    if frame.len() > 4 {
                        frame[4] ^= 1;
                    }
                    self.forward(&frame)?;
                }
                Some(Fault::Replay { .. }) => {
                    self.forward(&frame)?;
                    self.forward(&frame)?;
                }
                Some(Fault::Reflect { .. }) => {
                    self.forward(&frame)?;
                    lock(&self.src).write_all(&frame)?;
                }
                Some(Fault::Swap { .. }) => held = Some(frame),
                Some(Fault::Oversize { .. }) => {
                    self.forward(&u32::MAX.to_be_bytes())?;
                    let junk = vec![0x5au8; 256 * 1024];
                    let mut sent = 0;
                    while sent < OVERSIZE_JUNK {
                        // The receiver closing is the expected way out.
                        if lock(&self.dst).write_all(&junk).is_err() {
                            return Ok(());
                        }
                        sent += junk.len();
                    }
                    return Ok(());
                }
                Some(Fault::Stall { .. }) => {
                    self.stall.store(true, Ordering::SeqCst);
                    self.wait_if_stalled();
                    return Ok(());
                }
                Some(Fault::Reset { .. }) => {
                    self.forward(&frame[..frame.len() / 2])?;
                    // The sender's side first: resetting the other side
                    // first lets the opposite pump see its end and send the
                    // sender a FIN before the RST.
                    reset(&self.reader);
                    reset(&self.dst_raw);
                    return Ok(());
                }
            }
        }
    }

    fn raw_copy(&mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.reader.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            self.forward(&buf[..n])?;
        }
    }
}

/// Reset a connected TCP socket: `connect` with an `AF_UNSPEC` address
/// disconnects it, and Linux answers the peer with an RST (unlike
/// `shutdown`, which sends a FIN, and unlike `close`, which only resets
/// once every duplicate of the descriptor is closed).
fn reset(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed sockaddr with only the family set is a valid
    // AF_UNSPEC address; the descriptor is open for the call's duration.
    let rc = unsafe {
        let mut addr: libc::sockaddr = std::mem::zeroed();
        addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            s.as_raw_fd(),
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    // A socket the other side already closed may refuse; the test sees
    // the connection end either way.
    let _ = rc;
}
