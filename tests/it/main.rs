//! All end-to-end tests in one binary (one link, shared helpers).

// Test code: a panic is a failed test, not an outage.
#![allow(clippy::unwrap_used)]

mod admin;
mod cli;
mod form;
mod limits;
mod member_removal;
mod proxy;
mod redis_e2e;
mod store_conformance;
mod support;
mod tls;
mod websocket;
