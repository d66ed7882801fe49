//! tenon-agent as a library: the binary in `main.rs` is a thin command-line front over these
//! modules, and integration tests (also the Windows ones run under Wine) drive them directly.

pub mod agent;
pub mod client;
pub mod first_start;
pub mod netwatch;
pub mod platform;
pub mod policies;
pub mod rotating_log;
pub mod server_escrow;
#[cfg(windows)]
pub mod service;
pub mod status;
pub mod transport;
pub mod vault;
