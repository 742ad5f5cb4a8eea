//! `keibi-probe SOCKET [fs|control] [VERSION]`: connect to a keibi socket,
//! run the handshake for the service (the filesystem service by default,
//! with a fresh fd channel attached, as mountd does) and print one line
//! saying what happened:
//!
//! ```text
//! accepted
//! refused <reason code> <server version> <server's message>
//! connect-error <errno> <message>
//! error <message>
//! ```
//!
//! Exit status: 0 accepted, 1 refused, 2 could not connect, 3 anything
//! else. The tests run it as other users to check who a socket lets in.

use ipc_schema::handshake::{self, HandshakeError, ServiceKind};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: keibi-probe SOCKET [fs|control] [VERSION]");
        return ExitCode::from(3);
    };
    let service = match args.get(1).map(String::as_str) {
        None | Some("fs") => ServiceKind::Filesystem,
        Some("control") => ServiceKind::Control,
        Some(other) => {
            println!("error unknown service {other:?}");
            return ExitCode::from(3);
        }
    };
    let version = match args.get(2).map(|v| v.parse::<u32>()) {
        None => ipc_schema::PROTOCOL_VERSION,
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            println!("error bad version: {e}");
            return ExitCode::from(3);
        }
    };
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            println!("connect-error {} {e}", e.raw_os_error().unwrap_or(0));
            return ExitCode::from(2);
        }
    };
    let pair = match ipc_schema::fdpass::channel_pair() {
        Ok(p) => p,
        Err(e) => {
            println!("error socketpair: {e}");
            return ExitCode::from(3);
        }
    };
    let fd = (service == ServiceKind::Filesystem).then(|| pair.1.as_raw_fd());
    match handshake::client_speaking(&mut stream, service, fd, version) {
        Ok(()) => {
            println!("accepted");
            ExitCode::SUCCESS
        }
        Err(HandshakeError::Refused {
            reason,
            server_version,
            message,
        }) => {
            println!("refused {reason} {server_version} {message}");
            ExitCode::from(1)
        }
        Err(e) => {
            println!("error {e}");
            ExitCode::from(3)
        }
    }
}
