//! keygate: an API-key authentication gateway.
//!
//! Module map, in the order a request meets them:
//! - [`server`]: listeners, connection limits, graceful shutdown.
//! - [`client_ip`]: the client's address (peer, or forwarded by a trusted proxy).
//! - [`request_path`]: the path routes match (decoded; ambiguous paths refused).
//! - [`route`]: which upstream and which key rules apply to a request.
//! - [`credential`]: where the presented key comes from (headers, query).
//! - [`auth`]: key format, hash, cached verification and policy.
//! - [`proxy`]: forwarding to the upstream (header rules, pooled client).
//! - [`gateway`]: the request handler that strings the above together, and
//!   [`error`], the one place where a refusal becomes an HTTP answer.
//!
//! Around them: [`config`] (raw TOML → checked values), [`store`] (Redis and embedded),
//! [`keys`] (key lifecycle operations shared by the CLI and, later, the admin API),
//! [`app`] (wiring), [`idle`] (cutting off peers that stop moving), [`dev`] (the echo upstream), [`telemetry`] (logs), [`log_every`] (log lines a flood of failures would repeat, spaced out), [`striped`] (counters
//! many threads add to), [`memory`] (the process's huge pages).

pub mod admin;
pub mod app;
pub mod auth;
pub mod client_ip;
pub mod config;
pub mod credential;
pub mod dev;
pub mod error;
pub mod gateway;
pub mod idle;
pub mod keys;
pub mod log_every;
pub mod memory;
pub mod metrics;
pub mod proxy;
pub mod request_id;
pub mod request_path;
pub mod route;
pub mod server;
pub mod store;
pub mod striped;
pub mod telemetry;
pub mod usage;
pub mod window_watch;
