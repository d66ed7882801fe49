//! Tenon's pure core: identifiers, canonical JSON, the settings merge, the trust chain and signed
//! envelopes, and policy decisions. It does no I/O: no files, no network, no clock, no randomness.
//! Callers pass in time (as Unix seconds), random bytes and device facts.

pub mod api;
pub mod canonical;
pub mod directory;
pub mod dirsync;
pub mod envelope;
pub mod ids;
pub mod packages;
pub mod policy;
pub mod schema;
pub mod settings;
pub mod trust;
