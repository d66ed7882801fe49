//! tenon-agent as a library: the binary in `main.rs` is a thin command-line front over these
//! modules, and integration tests (also the Windows ones run under Wine) drive them directly.

pub mod platform;
pub mod policies;
pub mod rotating_log;
#[cfg(windows)]
pub mod service;
