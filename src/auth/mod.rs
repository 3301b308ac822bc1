//! Everything about deciding whether a presented key may pass: its format, its hash, the
//! cached lookup, and the policy. Nothing here knows about HTTP.

pub mod key;
pub mod policy;
pub mod record;
pub mod verify;
