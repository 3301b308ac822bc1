//! All end-to-end tests in one binary (one link, shared helpers).

mod store_conformance;
mod support;
