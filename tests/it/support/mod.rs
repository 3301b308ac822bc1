//! Test harness: real processes on ephemeral loopback ports, cleaned up on drop.

pub mod redis;
