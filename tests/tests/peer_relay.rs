//! The test relay itself ([`harness::relay`]), against a tiny framed echo
//! server in this file: the peer-channel tests trust the relay to do
//! exactly the fault they ask for, so each fault is checked here on known
//! bytes. The server speaks only the framing (three handshake messages with
//! `u16` lengths, then `u32` frames), no crypto: it answers each frame with
//! `echo:` + the body, and records what it received.

use harness::Watchdog;
use harness::relay::{Dir, Fault, Relay};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the echo server saw on one connection.
#[derive(Default, Debug)]
struct Seen {
    bodies: Vec<Vec<u8>>,
    /// The first length prefix it refused (above 1 MiB), if any.
    refused_len: Option<u32>,
    eof: bool,
}

struct EchoServer {
    addr: std::net::SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>>,
}

impl EchoServer {
    fn start() -> EchoServer {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>> = Arc::default();
        let c = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let seen = Arc::new(Mutex::new(Seen::default()));
                c.lock().expect("lock").push(seen.clone());
                std::thread::spawn(move || serve(s, seen));
            }
        });
        EchoServer { addr, conns }
    }

    fn conn(&self, i: usize) -> Arc<Mutex<Seen>> {
        self.conns.lock().expect("lock")[i].clone()
    }
}

fn read_hs(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

fn write_hs(s: &mut TcpStream, body: &[u8]) {
    let mut m = (body.len() as u16).to_be_bytes().to_vec();
    m.extend_from_slice(body);
    s.write_all(&m).expect("write a handshake message");
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

fn serve(mut s: TcpStream, seen: Arc<Mutex<Seen>>) {
    if read_hs(&mut s).is_err() {
        return;
    }
    write_hs(&mut s, b"msg2");
    if read_hs(&mut s).is_err() {
        return;
    }
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            seen.lock().expect("lock").eof = true;
            return;
        }
        let n = u32::from_be_bytes(len);
        if n > 1024 * 1024 {
            // As the channel does: refuse before reading the body.
            seen.lock().expect("lock").refused_len = Some(n);
            return;
        }
        let mut body = vec![0u8; n as usize];
        if s.read_exact(&mut body).is_err() {
            seen.lock().expect("lock").eof = true;
            return;
        }
        seen.lock().expect("lock").bodies.push(body.clone());
        let mut reply = b"echo:".to_vec();
        reply.extend_from_slice(&body);
        if s.write_all(&frame(&reply)).is_err() {
            return;
        }
    }
}

/// A client through `relay`: the handshake, then ready to send frames.
fn client(relay: &Relay) -> TcpStream {
    let mut c = TcpStream::connect(relay.addr()).expect("connect to the relay");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write_hs(&mut c, b"msg1");
    assert_eq!(read_hs(&mut c).expect("msg2"), b"msg2");
    write_hs(&mut c, b"msg3");
    c
}

fn body(i: u8) -> Vec<u8> {
    format!("frame number {i} .......").into_bytes()
}

fn wait_bodies(seen: &Arc<Mutex<Seen>>, n: usize) -> Vec<Vec<u8>> {
    harness::poll_until(
        &format!("{n} frames at the server"),
        Duration::from_secs(10),
        || {
            let s = seen.lock().expect("lock");
            (s.bodies.len() >= n).then(|| s.bodies.clone())
        },
    )
}

#[test]
fn passes_frames_through_and_counts_and_finds_a_needle() {
    let _w = Watchdog::arm("relay-pass", Duration::from_secs(60));
    let server = EchoServer::start();
    let needle = b"KNOWN-PLAINTEXT-PATTERN";
    let relay = Relay::start(server.addr, None, needle);
    let mut c = client(&relay);
    let bodies = [body(0), body(1), b"--KNOWN-PLAINTEXT-PATTERN--".to_vec()];
    for b in &bodies {
        c.write_all(&frame(b)).expect("send");
        let mut want = b"echo:".to_vec();
        want.extend_from_slice(b);
        assert_eq!(read_frame(&mut c).expect("echo"), want);
    }
    let sent: u64 = 2 * (2 + 4) + bodies.iter().map(|b| 4 + b.len() as u64).sum::<u64>();
    // A pump counts a frame's bytes once it has written them on, which can
    // be after the echo came back: wait for the byte count too.
    let rec = harness::poll_until("the relay's counts", Duration::from_secs(10), || {
        let r = relay.records();
        (r.len() == 1 && r[0].back.frames == 3 && r[0].out.bytes >= sent).then(|| r[0].clone())
    });
    assert_eq!(rec.out.frames, 3);
    assert_eq!(rec.out.handshake.len(), 2);
    assert_eq!(rec.back.handshake.len(), 1);
    assert_eq!(rec.out.bytes, sent);
    assert_eq!(rec.out.heads[0], frame(&body(0)));
    assert_eq!(rec.out.needle_hits, 1, "{rec:?}");
    assert_eq!(rec.back.needle_hits, 1, "{rec:?}");
    assert!(!relay.fault_applied());
}

#[test]
fn needle_cut_by_a_frame_header_is_not_a_hit() {
    let _w = Watchdog::arm("relay-split", Duration::from_secs(60));
    let server = EchoServer::start();
    let relay = Relay::start(server.addr, None, b"0123456789");
    let mut c = client(&relay);
    // The search runs on the byte stream: "01234" ending one frame and
    // "56789" starting the next have a length prefix between them, so
    // they are not a hit; a frame holding the needle whole is one.
    c.write_all(&frame(b"abc01234")).expect("send");
    read_frame(&mut c).expect("echo");
    c.write_all(&frame(b"56789")).expect("send");
    read_frame(&mut c).expect("echo");
    c.write_all(&frame(b"0123456789")).expect("send");
    read_frame(&mut c).expect("echo");
    let rec = harness::poll_until("three echoes counted", Duration::from_secs(10), || {
        let r = relay.records();
        (r[0].back.frames == 3).then(|| r[0].clone())
    });
    assert_eq!(rec.out.needle_hits, 1, "{rec:?}");
}

fn run_fault(fault: Fault, frames: u8) -> (Relay, EchoServer, TcpStream) {
    let server = EchoServer::start();
    let relay = Relay::start(server.addr, Some(fault), b"");
    let mut c = client(&relay);
    for i in 0..frames {
        c.write_all(&frame(&body(i))).expect("send");
    }
    c.flush().expect("flush");
    (relay, server, c)
}

#[test]
fn flip_bit_changes_only_frame_n() {
    let _w = Watchdog::arm("relay-flip", Duration::from_secs(60));
    let (relay, server, _c) = run_fault(
        Fault::FlipBit {
            dir: Dir::Out,
            frame: 2,
        },
        4,
    );
    let got = wait_bodies(&server.conn(0), 4);
    let mut flipped = body(2);
    flipped[0] ^= 1;
    assert_eq!(got, vec![body(0), body(1), flipped, body(3)]);
    assert!(relay.fault_applied());
    assert!(relay.records()[0].faulted);
}

#[test]
fn replay_sends_frame_n_twice() {
    let _w = Watchdog::arm("relay-replay", Duration::from_secs(60));
    let (_relay, server, _c) = run_fault(
        Fault::Replay {
            dir: Dir::Out,
            frame: 1,
        },
        3,
    );
    let got = wait_bodies(&server.conn(0), 4);
    assert_eq!(got, vec![body(0), body(1), body(1), body(2)]);
}

#[test]
fn swap_exchanges_frames_n_and_n_plus_1() {
    let _w = Watchdog::arm("relay-swap", Duration::from_secs(60));
    let (_relay, server, _c) = run_fault(
        Fault::Swap {
            dir: Dir::Out,
            frame: 1,
        },
        4,
    );
    let got = wait_bodies(&server.conn(0), 4);
    assert_eq!(got, vec![body(0), body(2), body(1), body(3)]);
}

#[test]
fn reflect_sends_frame_n_back_to_its_sender_too() {
    let _w = Watchdog::arm("relay-reflect", Duration::from_secs(60));
    let (_relay, server, mut c) = run_fault(
        Fault::Reflect {
            dir: Dir::Out,
            frame: 1,
        },
        2,
    );
    let got = wait_bodies(&server.conn(0), 2);
    assert_eq!(got, vec![body(0), body(1)], "the frame still goes on");
    let mut back = Vec::new();
    for _ in 0..3 {
        back.push(read_frame(&mut c).expect("a frame back"));
    }
    let echo = |b: Vec<u8>| [b"echo:".to_vec(), b].concat();
    assert!(back.contains(&body(1)), "the reflected copy: {back:?}");
    assert!(back.contains(&echo(body(0))) && back.contains(&echo(body(1))));
}

#[test]
fn oversize_sends_a_u32_max_prefix_instead_of_frame_n() {
    let _w = Watchdog::arm("relay-oversize", Duration::from_secs(60));
    let (relay, server, _c) = run_fault(
        Fault::Oversize {
            dir: Dir::Out,
            frame: 1,
        },
        3,
    );
    let seen = server.conn(0);
    harness::poll_until(
        "the server to see the oversize prefix",
        Duration::from_secs(10),
        || seen.lock().expect("lock").refused_len,
    );
    let s = seen.lock().expect("lock");
    assert_eq!(s.refused_len, Some(u32::MAX));
    assert_eq!(s.bodies, vec![body(0)]);
    assert!(relay.fault_applied());
}

#[test]
fn stall_forwards_nothing_more_and_keeps_the_connection_open() {
    let _w = Watchdog::arm("relay-stall", Duration::from_secs(60));
    let (relay, server, mut c) = run_fault(
        Fault::Stall {
            dir: Dir::Out,
            frame: 2,
        },
        2,
    );
    let seen = server.conn(0);
    let got = wait_bodies(&seen, 2);
    assert_eq!(got, vec![body(0), body(1)]);
    for _ in 0..2 {
        read_frame(&mut c).expect("echo");
    }
    c.write_all(&frame(&body(2))).expect("send");
    c.write_all(&frame(&body(3))).expect("send");
    harness::poll_until("the stall to take effect", Duration::from_secs(10), || {
        relay.fault_applied().then_some(())
    });
    // Neither EOF nor data comes back: the read times out.
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("read timeout");
    let mut b = [0u8; 1];
    let e = c
        .read(&mut b)
        .expect_err("nothing comes back through a stall");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    let s = seen.lock().expect("lock");
    assert_eq!(
        s.bodies.len(),
        2,
        "nothing after the stall reached the server"
    );
    assert!(!s.eof, "the server's connection is still open");
}

#[test]
fn reset_tears_frame_n_and_resets_both_ends() {
    let _w = Watchdog::arm("relay-reset", Duration::from_secs(60));
    let (relay, server, mut c) = run_fault(
        Fault::Reset {
            dir: Dir::Out,
            frame: 2,
        },
        2,
    );
    let seen = server.conn(0);
    assert_eq!(wait_bodies(&seen, 2), vec![body(0), body(1)]);
    for _ in 0..2 {
        read_frame(&mut c).expect("echo");
    }
    c.write_all(&frame(&body(2))).expect("send");
    harness::poll_until("the reset to take effect", Duration::from_secs(10), || {
        relay.fault_applied().then_some(())
    });
    // The dialer's side is reset: ECONNRESET, not a clean end.
    let mut b = [0u8; 1];
    let e = c
        .read(&mut b)
        .expect_err("a reset connection reads an error");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    // The server got half of frame 2 and then lost the connection.
    harness::poll_until("the server to see the end", Duration::from_secs(10), || {
        seen.lock().expect("lock").eof.then_some(())
    });
    assert_eq!(
        seen.lock().expect("lock").bodies.len(),
        2,
        "the torn frame never reached the server whole"
    );
    assert_eq!(relay.records()[0].out.frames, 3);
}

#[test]
fn the_fault_is_applied_once_then_connections_pass_through() {
    let _w = Watchdog::arm("relay-once", Duration::from_secs(60));
    let (relay, server, _c) = run_fault(
        Fault::FlipBit {
            dir: Dir::Out,
            frame: 0,
        },
        1,
    );
    wait_bodies(&server.conn(0), 1);
    let mut c2 = client(&relay);
    c2.write_all(&frame(&body(0))).expect("send");
    let got = read_frame(&mut c2).expect("echo");
    assert_eq!(got, [b"echo:".to_vec(), body(0)].concat());
    let recs = relay.records();
    assert!(recs[0].faulted && !recs[1].faulted);
}
