//! The opt-in metrics endpoint of both daemons: their metrics as
//! OpenMetrics text (which Prometheus scrapes), answered to an HTTP GET on
//! a Unix socket or on a loopback TCP port.
//!
//! Off unless configured ([`Endpoint::from_options`]): keibi-syncd's
//! `metrics_socket`/`metrics_listen`, keibi-mountd's
//! `--metrics-socket`/`--metrics-listen`. A TCP address must be a
//! loopback one (`127.0.0.0/8` or `::1`) with a fixed port: the text names
//! peers and shows activity, and the endpoint has no authentication, so it
//! is never offered to the network. A Unix socket is created with the mode
//! the daemon asks for (both use 0660: the daemon's user and group); a
//! socket file left by a dead process is replaced, a live one (something
//! answers a connect) is refused.
//!
//! The responder is deliberately small, not a web server: per connection
//! it reads at most [`MAX_REQUEST`] bytes of request head (parsed by
//! `httparse`), answers one request (`GET` or `HEAD` of `/metrics` or
//! `/`; anything else gets 404, 405 or 400) with `Connection: close`, and
//! closes. The whole connection is bounded by [`Limits::timeout`], and at
//! most [`Limits::connections`] are served at once (more are closed at
//! once), so a slow or idle client holds only its own task. Rendering is
//! the daemon's [`Render`]: it reads atomics and counters kept on the
//! daemon's hot paths and never waits on the store or a FUSE request for
//! long.

use crate::local_socket::{self, Listener as UnixListener};
use futures::future::BoxFuture;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The largest request head read; a longer one is answered 431.
pub const MAX_REQUEST: usize = 8192;

/// The content type of the answer: OpenMetrics 1.0 text, what
/// `prometheus-client`'s text encoder writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders the metrics text for one scrape.
pub type Render = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// Where the endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// A loopback TCP address.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl Endpoint {
    /// The endpoint of a daemon's two settings: none when neither is set,
    /// an error when both are, or when `listen` is not a loopback
    /// `IP:PORT` ([`parse_listen`]). `what` names the settings in errors
    /// (e.g. `"--metrics-socket and --metrics-listen"`).
    pub fn from_options(
        socket: Option<&Path>,
        listen: Option<&str>,
        what: &str,
    ) -> Result<Option<Endpoint>, String> {
        match (socket, listen) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(format!("{what}: give one of the two, not both")),
            (Some(p), None) if p.as_os_str().is_empty() => {
                Err(format!("{what}: the socket path is empty"))
            }
            (Some(p), None) => Ok(Some(Endpoint::Unix(p.to_path_buf()))),
            (None, Some(a)) => parse_listen(a).map(|a| Some(Endpoint::Tcp(a))),
        }
    }
}

/// Parse a metrics TCP address: `IP:PORT` (IPv6 in brackets), a loopback
/// IP, a port other than 0. Anything else is refused, saying why.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.trim().parse().map_err(|_| {
        format!(
            "metrics address {s:?} is not IP:PORT (e.g. \"127.0.0.1:9810\" or \"[::1]:9810\"; host names are not accepted)"
        )
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "metrics address {s:?} is not a loopback address: the metrics endpoint has no authentication and is only served on 127.0.0.0/8 or [::1] (or use a Unix socket)"
        ));
    }
    if addr.port() == 0 {
        return Err(format!(
            "metrics address {s:?} has port 0; a scraper needs a fixed port"
        ));
    }
    Ok(addr)
}

/// Bounds on what one client may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest a connection may take, from accept to the last byte
    /// of the answer.
    pub timeout: Duration,
    /// Connections served at once; more are closed without an answer.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(5),
            connections: 8,
        }
    }
}

/// A bound endpoint, ready for [`serve`].
pub enum Bound {
    /// A Unix socket (its file is removed when the [`SocketFile`] of
    /// [`bind`] drops).
    Unix(UnixListener),
    /// A loopback TCP listener.
    Tcp(TcpListener),
}

/// The Unix socket's file: removed when dropped (at exit).
pub struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = std::fs::remove_file(&p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove the metrics socket");
        }
    }
}

/// Bind `endpoint` (a Unix socket with file `mode`). Must run inside the
/// tokio runtime that will serve it.
pub fn bind(endpoint: &Endpoint, mode: u32) -> io::Result<(Bound, SocketFile)> {
    match endpoint {
        Endpoint::Unix(path) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "metrics socket {}: another process answers on it",
                        path.display()
                    ),
                ));
            }
            let listener = local_socket::listen(path, mode, None, None)?;
            Ok((Bound::Unix(listener), SocketFile(Some(path.clone()))))
        }
        Endpoint::Tcp(addr) => {
            let std_listener = std::net::TcpListener::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("metrics address {addr}: {e}")))?;
            std_listener.set_nonblocking(true)?;
            Ok((
                Bound::Tcp(TcpListener::from_std(std_listener)?),
                SocketFile(None),
            ))
        }
    }
}

/// Answer scrapes on `bound` forever (see the module doc).
pub async fn serve(bound: Bound, render: Render, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    loop {
        let accepted: io::Result<Box<dyn Conn>> = match &bound {
            Bound::Unix(l) => local_socket::accept(l)
                .await
                .map(|s| Box::new(s) as Box<dyn Conn>),
            Bound::Tcp(l) => l.accept().await.map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics endpoint: too many connections; closed one");
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(limits.timeout, answer(conn, render))
                .await
                .is_err()
            {
                tracing::debug!("metrics endpoint: a connection took too long; closed");
            }
            drop(slot);
        });
    }
}

/// A stream the responder can answer on.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// What one request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    /// The metrics (`head`: headers only).
    Metrics { head: bool },
    /// An error status and its reason phrase.
    Error(u16, &'static str),
}

/// Read one request head from `conn` and answer it.
async fn answer(mut conn: Box<dyn Conn>, render: Render) {
    let asked = read_request(&mut conn).await;
    let (status, reason, body, head) = match asked {
        Some(Asked::Metrics { head }) => (200, "OK", render().await, head),
        Some(Asked::Error(status, reason)) => (status, reason, format!("{reason}\n"), false),
        None => return,
    };
    let content_type = if status == 200 {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head {
        response.extend_from_slice(body.as_bytes());
    }
    if conn.write_all(&response).await.is_ok() {
        let _ = conn.shutdown().await;
    }
}

/// Read until the request head is complete (or [`MAX_REQUEST`] bytes, or
/// the end of the stream) and say what it asks. `None`: the client went
/// away before sending a request.
async fn read_request(conn: &mut Box<dyn Conn>) -> Option<Asked> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut filled = 0;
    loop {
        let n = conn.read(&mut buf[filled..]).await.ok()?;
        if n == 0 {
            return (filled > 0).then_some(Asked::Error(400, "Bad Request"));
        }
        filled += n;
        match judge(&buf[..filled]) {
            Some(asked) => return Some(asked),
            None if filled == buf.len() => {
                return Some(Asked::Error(431, "Request Header Fields Too Large"));
            }
            None => {}
        }
    }
}

/// What a request head asks, or `None` while it is incomplete.
fn judge(bytes: &[u8]) -> Option<Asked> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => {
            Some(Asked::Error(431, "Request Header Fields Too Large"))
        }
        Err(_) => Some(Asked::Error(400, "Bad Request")),
        Ok(httparse::Status::Complete(_)) => {
            let head = match req.method {
                Some("GET") => false,
                Some("HEAD") => true,
                _ => return Some(Asked::Error(405, "Method Not Allowed")),
            };
            let path = req.path.unwrap_or("");
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            match path {
                "/metrics" | "/" => Some(Asked::Metrics { head }),
                _ => Some(Asked::Error(404, "Not Found")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn only_loopback_addresses_with_a_port_are_accepted() {
        assert_eq!(
            parse_listen("127.0.0.1:9810"),
            Ok("127.0.0.1:9810".parse().expect("addr"))
        );
        assert!(parse_listen("127.0.0.2:9810").is_ok());
        assert!(parse_listen("[::1]:9810").is_ok());
        for (bad, says) in [
            ("0.0.0.0:9810", "not a loopback address"),
            ("[::]:9810", "not a loopback address"),
            ("192.168.1.5:9810", "not a loopback address"),
            ("localhost:9810", "not IP:PORT"),
            ("127.0.0.1", "not IP:PORT"),
            ("127.0.0.1:0", "port 0"),
        ] {
            let err = parse_listen(bad).expect_err(bad);
            assert!(err.contains(bad) && err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_endpoint_is_off_unless_configured_and_takes_one_setting() {
        let what = "metrics_socket and metrics_listen";
        assert_eq!(Endpoint::from_options(None, None, what), Ok(None));
        assert_eq!(
            Endpoint::from_options(Some(Path::new("/run/m.sock")), None, what),
            Ok(Some(Endpoint::Unix("/run/m.sock".into())))
        );
        let err = Endpoint::from_options(Some(Path::new("/m")), Some("127.0.0.1:1"), what)
            .expect_err("both");
        assert!(err.contains(what) && err.contains("not both"), "{err}");
        let err = Endpoint::from_options(None, Some("10.0.0.1:9810"), what).expect_err("lan");
        assert!(err.contains("not a loopback address"), "{err}");
    }

    #[test]
    fn requests_are_judged_by_method_and_path() {
        let j = |s: &str| judge(s.as_bytes());
        assert_eq!(j("GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            j("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Asked::Metrics { head: false })
        );
        assert_eq!(
            j("GET /?x=1 HTTP/1.0\r\n\r\n"),
            Some(Asked::Metrics { head: false })
        );
        assert_eq!(
            j("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Some(Asked::Metrics { head: true })
        );
        assert_eq!(
            j("POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Asked::Error(405, "Method Not Allowed"))
        );
        assert_eq!(
            j("GET /other HTTP/1.1\r\n\r\n"),
            Some(Asked::Error(404, "Not Found"))
        );
        assert_eq!(
            j("\x01\x02 nonsense\r\n\r\n"),
            Some(Asked::Error(400, "Bad Request"))
        );
    }

    /// Serve `render` on a Unix socket in a runtime of its own; returns the
    /// socket's path (in `dir`) and the runtime.
    fn served(
        dir: &Path,
        body: &'static str,
        limits: Limits,
    ) -> (PathBuf, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let path = dir.join("metrics.sock");
        let (bound, file) = rt
            .block_on(async { bind(&Endpoint::Unix(path.clone()), 0o660) })
            .expect("bind");
        std::mem::forget(file);
        let render: Render = Arc::new(move || Box::pin(async move { body.to_owned() }));
        rt.spawn(serve(bound, render, limits));
        (path, rt)
    }

    fn exchange(path: &Path, request: &[u8]) -> String {
        let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request).expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read the answer");
        out
    }

    #[test]
    fn a_get_is_answered_with_the_rendered_text_and_others_with_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _rt) = served(dir.path(), "a_total 1\n# EOF\n", Limits::default());
        assert_eq!(
            std::fs::metadata(&path).expect("stat").mode() & 0o777,
            0o660
        );
        let ok = exchange(&path, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{ok}"
        );
        assert!(ok.contains("Content-Length: 16\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\na_total 1\n# EOF\n"), "{ok}");
        let head = exchange(&path, b"HEAD / HTTP/1.0\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let post = exchange(&path, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(
            post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD"),
            "{post}"
        );
        let huge = vec![b'a'; MAX_REQUEST];
        let big = exchange(&path, &huge);
        assert!(big.starts_with("HTTP/1.1 431 "), "{big}");
        // A live socket is not taken over by a second bind.
        let err = tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(async { bind(&Endpoint::Unix(path.clone()), 0o660).map(|_| ()) })
            .expect_err("the path is served");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    }

    #[test]
    fn a_client_that_sends_nothing_is_closed_at_the_timeout_and_others_are_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits {
            timeout: Duration::from_millis(300),
            connections: 2,
        };
        let (path, _rt) = served(dir.path(), "x 1\n", limits);
        let mut idle = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        idle.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // Served meanwhile: the idle client holds only its own slot.
        let ok = exchange(&path, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(ok.ends_with("x 1\n"), "{ok}");
        // The idle one is closed (end of stream, no answer) at the timeout.
        let mut out = Vec::new();
        idle.read_to_end(&mut out).expect("closed, not timed out");
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn connections_past_the_limit_are_closed_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A timeout far beyond the test's: a close comes from the limit.
        let limits = Limits {
            timeout: Duration::from_secs(600),
            connections: 2,
        };
        let (path, _rt) = served(dir.path(), "x 1\n", limits);
        let idle: Vec<_> = (0..2)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).expect("connect"))
            .collect();
        let mut third = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        third
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let _ = third.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        let mut out = Vec::new();
        match third.read_to_end(&mut out) {
            Ok(_) => assert!(out.is_empty(), "the third connection was answered: {out:?}"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
        drop(idle);
        // The slots come back: a later scrape is served.
        let ok = poll_served(&path);
        assert!(ok.ends_with("x 1\n"), "{ok}");
    }

    /// Scrape until served (the closed idle connections give their slots
    /// back asynchronously), within 60 s.
    fn poll_served(path: &Path) -> String {
        let until = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
            let mut out = String::new();
            if s.read_to_string(&mut out).is_ok() && !out.is_empty() {
                return out;
            }
            assert!(std::time::Instant::now() < until, "never served again");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
