//! Pure policy decisions: each module turns configuration and device facts into a plan the agent
//! executes through its platform layer.

pub mod bitlocker;
pub mod escrow;
