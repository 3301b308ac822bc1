//! All end-to-end tests in one binary (one link, shared helpers).

mod cli;
mod proxy;
mod redis_e2e;
mod store_conformance;
mod support;
