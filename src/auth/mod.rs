//! Everything about deciding whether a presented key may pass: its format, its hash, the
//! cached lookup, and the policy. Nothing here speaks HTTP; a verified key only carries its
//! identity headers ready-made ([`verified`]), so cached requests do not rebuild them.

pub mod key;
pub mod policy;
pub mod record;
pub mod timestamp;
pub mod verified;
pub mod verify;
