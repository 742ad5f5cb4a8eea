//! The contract between keibi's processes.
//!
//! Everything that crosses a process boundary inside one machine is defined
//! here, so that `keibi-mountd`, `keibi-syncd` and `keibictl` compile against
//! one description of it:
//!
//! - [`types`]: the named values of the filesystem protocol ([`Ino`],
//!   [`HandleId`], [`Name`], [`Attr`], ...).
//! - [`error`]: [`FsError`], the one error type; it carries the errno the
//!   kernel will see.
//! - [`service`]: the tarpc services: [`service::Filesystem`]
//!   (mountd → syncd), [`service::Control`] (keibictl → syncd) and
//!   [`service::MountDebug`] (keibictl → mountd, its ops socket).
//! - [`handshake`]: the few bytes exchanged on every new connection before
//!   tarpc starts: magic, protocol version, service, and (for the filesystem
//!   socket) the descriptor channel. A version mismatch is refused there, with
//!   both versions named, before a single tarpc frame is decoded.
//! - [`fdpass`]: content file descriptors sent by `SCM_RIGHTS` over a
//!   `SOCK_SEQPACKET` pair, tagged with the [`HandleId`] of the open they
//!   belong to.
//! - [`transport`]: the tarpc transport (length-delimited bincode frames
//!   with a hard size cap) and the connect helpers.
//! - [`local_socket`]: binding, accepting and connecting the local sockets
//!   (with `interprocess`), peer credentials, and the server side of the
//!   handshake.
//! - [`inflight`]: the registry of operations in flight that
//!   `keibictl debug ops` reads from each daemon ([`OpInFlight`]).
//! - [`logging`]: both daemons' logging, to stderr or the systemd journal.
//! - [`metrics_endpoint`]: the opt-in metrics endpoint both daemons serve
//!   (OpenMetrics text over a minimal HTTP GET responder).
//! - [`paths`]: where a mount's lock and debug socket live.
//! - [`lockfile`]: the single-instance lock both daemons take (open, `flock`,
//!   verify the inode, retry), see `docs/architecture.md`.
//!
//! The protocol is described for people in `docs/protocol.md`.

pub mod error;
pub mod fdpass;
pub mod handshake;
pub mod inflight;
pub mod local_socket;
pub mod lockfile;
pub mod logging;
pub mod metrics_endpoint;
pub mod paths;
pub mod service;
pub mod transport;
pub mod types;

pub use error::FsError;
pub use types::*;

/// Version of the IPC protocol. Bumped on any change of a service method or
/// of a type that crosses the socket; checked by [`handshake`] on connect.
pub const PROTOCOL_VERSION: u32 = 8;

/// Version of the keibi release these binaries belong to.
pub const KEIBI_VERSION: &str = env!("CARGO_PKG_VERSION");
