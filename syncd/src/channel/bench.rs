//! Throughput of the channel's crypto and of one channel over loopback,
//! as `#[ignore]` tests that print MB/s (no assertion on speed):
//!
//! ```text
//! cargo test -p keibi-syncd --release bench_ -- --ignored --nocapture --test-threads=1
//! ```
//!
//! `bench_seal_open_in_memory` seals and opens 256 KiB DATA frames on one
//! thread, with each AEAD (the CPU cost of a frame at both ends); `bench_channel_over_tcp`
//! sends them through a real channel on 127.0.0.1 with the sender and the
//! receiver on separate tokio worker threads (what one peer connection
//! can carry when crypto is the limit). Each prints wall-clock MB/s and
//! MB per CPU second (thread or process CPU time), the second being the
//! meaningful one on a machine shared with other work.

use super::aead::{Aead, AeadKind};
use super::frame::{self, FrameType};
use super::transport;
use super::{ChannelConfig, MAX_PAYLOAD};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

const TOTAL: usize = 2 << 30;

/// CPU time used so far by this thread or by the whole process. On a
/// shared machine, bytes per CPU second says what the code costs
/// whatever else is running; wall-clock MB/s says what it got.
fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn report_cpu(what: &str, bytes: usize, cpu: Duration) {
    eprintln!(
        "{what}: {:.3} CPU s = {:.0} MB per CPU second",
        cpu.as_secs_f64(),
        bytes as f64 / cpu.as_secs_f64() / 1e6
    );
}

fn report(what: &str, bytes: usize, took: Duration) {
    let avx512 = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl");
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    eprintln!(
        "{what}: {} MiB of payload in {:.3} s = {:.0} MB/s (CPU: avx512 {avx512}, avx2 {avx2})",
        bytes >> 20,
        took.as_secs_f64(),
        bytes as f64 / took.as_secs_f64() / 1e6,
    );
}

#[test]
#[ignore = "benchmark: run with --release --ignored --nocapture"]
fn bench_seal_open_in_memory() {
    for kind in AeadKind::ALL {
        seal_open_in_memory(kind);
    }
}

fn seal_open_in_memory(kind: AeadKind) {
    let cfg = ChannelConfig::default();
    let key = Zeroizing::new([7u8; 32]);
    let (mut sealer, _) = transport::pair(kind, key.clone(), Zeroizing::new([0; 32]), &cfg);
    let (_, mut opener) = transport::pair(kind, Zeroizing::new([1; 32]), key, &cfg);
    let payload = vec![0x5au8; MAX_PAYLOAD];
    let mut wire = Vec::with_capacity(super::MAX_FRAME + 64);
    let mut body = Vec::with_capacity(super::MAX_FRAME);
    let frames = TOTAL / MAX_PAYLOAD;
    let start = Instant::now();
    let cpu0 = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID);
    for _ in 0..frames {
        wire.clear();
        sealer
            .seal(FrameType::Data, &payload, &mut wire)
            .expect("seal");
        let mut r = wire.as_slice();
        // A REKEY frame may come first.
        loop {
            let header =
                futures::executor::block_on(frame::read_frame(&mut r, &mut body)).expect("read");
            if opener.open(header, &mut body).expect("open") == FrameType::Data {
                break;
            }
        }
    }
    let took = start.elapsed();
    let cpu = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID) - cpu0;
    // The ceiling in the same run: the bare AEAD in place on 256 KiB
    // buffers (encrypt, then decrypt), no framing, no copies.
    let aead = Aead::new(kind, &[7u8; 32]);
    let mut buf = vec![0x5au8; MAX_PAYLOAD];
    let bare = Instant::now();
    let bare_cpu0 = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID);
    for n in 0..frames as u64 {
        let tag = aead.seal(n, b"", &mut buf).expect("encrypt");
        aead.open(n, b"", &mut buf, &tag).expect("decrypt");
    }
    let bare_took = bare.elapsed();
    let bare_cpu = cpu_time(libc::CLOCK_THREAD_CPUTIME_ID) - bare_cpu0;
    let what = format!("bare {kind} encrypt+decrypt in place, 1 thread");
    report(&what, frames * MAX_PAYLOAD, bare_took);
    report_cpu(&what, frames * MAX_PAYLOAD, bare_cpu);
    let what = format!("{kind} seal+open in memory, 1 thread");
    report(&what, frames * MAX_PAYLOAD, took);
    report_cpu(&what, frames * MAX_PAYLOAD, cpu);
}

#[test]
#[ignore = "benchmark: run with --release --ignored --nocapture"]
fn bench_channel_over_tcp() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let cfg = ChannelConfig::default();
        let (mut i, mut r) = super::tests::established(&cfg).await;
        eprintln!("AEAD: {} (offered: {:?})", i.aead, cfg.aeads);
        let frames = TOTAL / MAX_PAYLOAD;
        let start = Instant::now();
        let cpu0 = cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID);
        let sender = tokio::spawn(async move {
            let payload = vec![0x5au8; MAX_PAYLOAD];
            for _ in 0..frames {
                i.tx.send(&payload).await.expect("send");
            }
            i
        });
        let mut buf = Vec::new();
        for _ in 0..frames {
            r.rx.recv(&mut buf).await.expect("recv");
            assert_eq!(buf.len(), MAX_PAYLOAD);
        }
        let took = start.elapsed();
        let i = sender.await.expect("sender");
        let cpu = cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID) - cpu0;
        let what = "one channel over TCP 127.0.0.1, 2 workers";
        report(what, frames * MAX_PAYLOAD, took);
        report_cpu(
            &format!("{what} (sender and receiver, kernel included)"),
            frames * MAX_PAYLOAD,
            cpu,
        );
        eprintln!(
            "handshake {:?}; wire bytes {} ({} rekeys)",
            i.handshake_time,
            i.tx.bytes_sent(),
            i.tx.rekeys()
        );
    });
}
