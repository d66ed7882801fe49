//! tenon-agent: placeholder entry point while the agent is assembled.
mod platform;
fn main() {}
