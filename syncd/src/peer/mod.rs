//! Talking to peers: the messages two syncd exchange inside the encrypted
//! channel ([`msg`]), one multiplexed connection per peer ([`conn`]) and the
//! requests over it ([`requests`]). See `docs/protocol.md`, "Peer messages".

// Used by the peer manager; until it is wired in, only the tests use it.
#![allow(dead_code)]

pub mod conn;
pub mod msg;
pub mod requests;
