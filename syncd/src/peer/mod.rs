//! Talking to peers: the messages two syncd exchange inside the encrypted
//! channel ([`msg`]), one multiplexed connection per peer ([`conn`]) and the
//! requests over it ([`requests`]). See `docs/protocol.md`, "Peer messages".
//! Pairing, dialing and listening make those connections ([`manager`],
//! [`dial`], [`listen`]; see `docs/architecture.md`, "Peers").

// Unary requests (`PeerConn::request`) and a few accessors are there for
// part 2's requests and the tests; nothing in syncd calls them yet.
#[allow(dead_code)]
pub mod conn;
pub mod msg;
#[allow(dead_code)]
pub mod requests;

pub mod dial;
pub mod listen;
pub mod manager;
