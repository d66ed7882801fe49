//! Pure policy decisions: each policy's plan computed from config and device facts, no I/O.

pub mod signatures;
