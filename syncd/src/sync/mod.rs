//! The sync engine: one folder on several machines.
//!
//! - [`model`]: what peers exchange about a file (global ids, version
//!   vectors, chunk hashes).
//!
//! The store keeps the index (`store::objects`); this module tree decides
//! what to do with local and remote changes and moves the data.

#[allow(dead_code)]
pub mod model;
