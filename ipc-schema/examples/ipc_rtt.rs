//! What one request and its answer cost between two processes on a Unix
//! socket, with and without keibi's IPC stack: the floor under every call
//! mountd makes to syncd. Run by `bench/ipc.sh`, which prints the table.
//!
//! ```text
//! ipc_rtt MODE [CALLS]
//!   raw      64 bytes written and read back with blocking std calls
//!   framed   a length-delimited frame each way on tokio
//!   tarpc    one tarpc call each, on ipc_schema::transport::framed (the
//!            transport mountd and syncd use), each call from a task of its
//!            own as mountd makes them, each answered from a task of its own
//!            as syncd answers them
//! ```
//!
//! The client's and the server's runtime have `CLIENT_WORKERS` and
//! `SERVER_WORKERS` (environment, default 1) worker threads; 0 means a
//! current-thread runtime. The server is a forked child; the two ends are
//! a `socketpair`. Prints one line: `MODE client=N server=N: X µs`.

use futures::{SinkExt, StreamExt};
use std::error::Error;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use tarpc::server::{BaseChannel, Channel};
use tokio_util::bytes::Bytes;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

type Res<T> = Result<T, Box<dyn Error>>;

#[tarpc::service]
trait Ping {
    /// Answers `x + 1`; `pad` makes the request about as large as a
    /// lookup's.
    async fn ping(x: u64, pad: Vec<u8>) -> u64;
}

#[derive(Clone)]
struct Server;

impl Ping for Server {
    async fn ping(self, _: tarpc::context::Context, x: u64, _pad: Vec<u8>) -> u64 {
        x.wrapping_add(1)
    }
}

fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

fn workers(var: &str) -> Res<usize> {
    match std::env::var(var) {
        Ok(v) => Ok(v.parse().map_err(|e| format!("{var}={v}: {e}"))?),
        Err(_) => Ok(1),
    }
}

fn tokio_stream(s: UnixStream) -> std::io::Result<tokio::net::UnixStream> {
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}

/// The forked server: answer until the client closes its end.
fn serve(mode: &str, s: UnixStream, server_workers: usize) -> Res<()> {
    match mode {
        "raw" => {
            let mut s = s;
            let mut buf = [0u8; 64];
            while s.read_exact(&mut buf).is_ok() {
                s.write_all(&buf)?;
            }
            Ok(())
        }
        "framed" => runtime(server_workers)?.block_on(async move {
            let mut f = Framed::new(tokio_stream(s)?, LengthDelimitedCodec::new());
            while let Some(Ok(m)) = f.next().await {
                f.send(m.freeze()).await?;
            }
            Ok(())
        }),
        _ => {
            let rt = runtime(server_workers)?;
            let _in_rt = rt.enter();
            let transport = ipc_schema::transport::framed(tokio_stream(s)?);
            // Spawned, as syncd spawns its connections: it runs on the
            // workers, not on the thread that waits for it.
            let served = rt.spawn(
                BaseChannel::with_defaults(transport)
                    .execute(Server.serve())
                    .for_each(|f| async {
                        tokio::spawn(f);
                    }),
            );
            rt.block_on(served)?;
            Ok(())
        }
    }
}

/// The client: `calls` round trips; returns the time they took.
fn client(mode: &str, s: UnixStream, calls: u64, client_workers: usize) -> Res<Duration> {
    match mode {
        "raw" => {
            let mut s = s;
            let mut buf = [0u8; 64];
            let t0 = Instant::now();
            for _ in 0..calls {
                s.write_all(&buf)?;
                s.read_exact(&mut buf)?;
            }
            Ok(t0.elapsed())
        }
        "framed" => runtime(client_workers)?.block_on(async move {
            let mut f = Framed::new(tokio_stream(s)?, LengthDelimitedCodec::new());
            let t0 = Instant::now();
            for _ in 0..calls {
                f.send(Bytes::from_static(&[0u8; 64])).await?;
                f.next().await.ok_or("the server closed the socket")??;
            }
            Ok(t0.elapsed())
        }),
        _ => runtime(client_workers)?.block_on(async move {
            let transport = ipc_schema::transport::framed(tokio_stream(s)?);
            let c = PingClient::new(tarpc::client::Config::default(), transport).spawn();
            let t0 = Instant::now();
            for i in 0..calls {
                let c = c.clone();
                let call = tokio::spawn(async move {
                    let ctx = ipc_schema::transport::context_with_timeout(Duration::from_secs(5));
                    c.ping(ctx, i, vec![0u8; 32]).await
                });
                let answer = call.await??;
                if answer != i.wrapping_add(1) {
                    return Err(format!("call {i} answered {answer}").into());
                }
            }
            Ok(t0.elapsed())
        }),
    }
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "tarpc".to_string());
    if !matches!(mode.as_str(), "raw" | "framed" | "tarpc") {
        return Err(format!("unknown mode {mode:?}: raw, framed or tarpc").into());
    }
    let calls: u64 = match args.next() {
        Some(n) => n.parse().map_err(|e| format!("CALLS {n}: {e}"))?,
        None => 20_000,
    };
    let (client_workers, server_workers) = (workers("CLIENT_WORKERS")?, workers("SERVER_WORKERS")?);
    let (a, b) = UnixStream::pair()?;
    // Forked before any runtime or thread exists in this process.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error().into()),
        0 => {
            drop(a);
            let code = match serve(&mode, b, server_workers) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("ipc_rtt server: {e}");
                    1
                }
            };
            std::process::exit(code);
        }
        child => {
            drop(b);
            let took = client(&mode, a, calls, client_workers);
            // Closing our end ends the server; reap it either way.
            let mut status = 0;
            unsafe { libc::waitpid(child, &mut status, 0) };
            let took = took?;
            let us = took.as_secs_f64() * 1e6 / calls as f64;
            println!("{mode} client={client_workers} server={server_workers}: {us:.1} µs");
            Ok(())
        }
    }
}
