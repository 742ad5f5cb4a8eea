//! The sync engine: one folder on several machines.
//!
//! - [`model`]: what peers exchange about a file (global ids, version
//!   vectors, chunk hashes).
//! - [`fetch`]: on-demand, verified chunk fetches from peers.
//! - [`serve`]: serving a chunk to a peer.
//! - [`inval`]: the invalidations mountd long-polls.
//!
//! The store keeps the index (`store::objects`); this module tree decides
//! what to do with local and remote changes and moves the data.

#[allow(dead_code)]
pub mod model;

pub mod fetch;
// Fed and served by the sync engine (index exchange and the peer handler).
#[allow(dead_code)]
pub mod inval;
#[allow(dead_code)]
pub mod serve;
