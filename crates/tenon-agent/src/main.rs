//! tenon-agent: placeholder entry point while the agent is assembled.
fn main() {}
