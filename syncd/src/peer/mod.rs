//! Peers: the multiplexed connection over the encrypted channel
//! ([`msg`], [`conn`], [`requests`]), and the pairing, dialing and
//! listening that make those connections ([`manager`], [`dial`],
//! [`listen`]).

pub mod conn;
pub mod msg;
pub mod requests;

pub mod dial;
pub mod listen;
pub mod manager;
