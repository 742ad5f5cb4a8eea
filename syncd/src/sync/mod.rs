//! The sync engine: one folder on several machines.
//!
//! - [`model`]: what peers exchange about a file (global ids, version
//!   vectors, chunk hashes).
//! - [`engine`]: the engine's tasks and shared state, and the handler of
//!   peer requests.
//! - [`local`]: the local versioner (dirty inodes to versions).
//! - [`merge`]: the merge rules and conflict copies (pure).
//! - [`apply`]: applying a peer's record here.
//! - [`index`]: index items, their framing, and serving the change log.
//! - [`session`]: one peer session (pull, apply, defer, retry).
//! - [`status`]: per-peer progress for `keibictl status`.
//! - [`wired`]: the engine's data path made of the parts below.
//! - [`fetch`]: on-demand, verified chunk fetches from peers.
//! - [`serve`]: serving a chunk to a peer.
//! - [`inval`]: the invalidations mountd long-polls.
//!
//! The store keeps the index (`store::objects`); this module tree decides
//! what to do with local and remote changes and moves the data.

pub mod apply;
pub mod engine;
#[cfg(test)]
mod engine_tests;
pub mod index;
pub mod local;
pub mod merge;
#[allow(dead_code)]
pub mod model;
pub mod prefetch;
pub mod session;
pub mod status;
pub mod wired;

pub mod fetch;
pub mod inval;
pub mod serve;
