//! Pure policy decisions: each module turns configuration and device facts into a plan that the
//! agent only executes (DESIGN.md section 3).

pub mod delivery_optimization;
