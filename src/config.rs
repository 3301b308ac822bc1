//! Configuration: one TOML file, every value overridable from the environment as
//! `KEYGATE__SECTION__FIELD` (e.g. `KEYGATE__STORE__REDIS_URL`), read into plain `Raw*` structs
//! and then checked into typed values. Checking collects every problem, each named by its field
//! path, so a bad file is fixed in one round; nothing downstream parses strings.

use crate::auth::key::KeyPrefix;
use http::{HeaderName, Method, Uri};
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Raw: what the file and the environment say, with defaults, before any checking.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    proxy: RawProxy,
    admin: RawAdmin,
    usage: RawUsage,
    scopes: Vec<RawScope>,
    auth: RawAuth,
    cache: RawCache,
    store: RawStore,
    log: RawLog,
    upstreams: BTreeMap<String, RawUpstream>,
    routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    listen: String,
    trusted_proxies: Vec<String>,
    allow_ips: Vec<String>,
    deny_ips: Vec<String>,
    #[serde(deserialize_with = "strict::int")]
    max_connections: usize,
    #[serde(deserialize_with = "strict::int")]
    max_header_bytes: usize,
    #[serde(deserialize_with = "strict::int")]
    max_headers: usize,
    #[serde(deserialize_with = "strict::int")]
    max_concurrent_streams: u32,
    #[serde(deserialize_with = "strict::int")]
    max_peek_total_bytes: usize,
    #[serde(with = "duration")]
    header_read_timeout: Duration,
    #[serde(with = "duration")]
    idle_timeout: Duration,
    #[serde(with = "duration")]
    drain_timeout: Duration,
    #[serde(with = "duration")]
    send_timeout: Duration,
    #[serde(deserialize_with = "strict::opt_int")]
    worker_threads: Option<usize>,
    #[serde(deserialize_with = "strict::boolean")]
    work_stealing: bool,
    #[serde(deserialize_with = "strict::boolean")]
    case_insensitive_paths: bool,
    #[serde(deserialize_with = "strict::boolean")]
    transparent_huge_pages: bool,
    tls: Option<RawTls>,
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            trusted_proxies: vec![],
            allow_ips: vec![],
            deny_ips: vec![],
            max_connections: 10_000,
            // Also what hyper's read buffer grows to, so what one connection's upload holds in
            // reads: at 64 KiB a 1 MiB upload held ~110-180 KiB of buffers (two reads), at
            // 32 KiB 40-70 KiB, for the same CPU per MiB (benchmarks.md, "After midnight").
            // nginx's default allows 32 KiB of headers too (4 x 8k).
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            // Envoy's default; nginx's http2_max_concurrent_streams is 128. (hyper's own, 200,
            // let one connection hold 200 body peeks or upstream connections at once.)
            max_concurrent_streams: 100,
            max_peek_total_bytes: DEFAULT_MAX_PEEK_TOTAL_BYTES,
            header_read_timeout: Duration::from_secs(10),
            // nginx's keepalive_timeout, which it applies to HTTP/2 connections too.
            idle_timeout: Duration::from_secs(75),
            drain_timeout: Duration::from_secs(20),
            // nginx's send_timeout.
            send_timeout: Duration::from_secs(60),
            worker_threads: None,
            work_stealing: false,
            case_insensitive_paths: false,
            transparent_huge_pages: false,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    #[serde(deserialize_with = "strict::boolean")]
    enabled: bool,
    listen: String,
    #[serde(with = "duration")]
    reveal_window: Duration,
    #[serde(deserialize_with = "strict::int")]
    team_key_limit: u32,
    bootstrap_token_env: String,
    #[serde(deserialize_with = "strict::int")]
    max_body_bytes: usize,
    #[serde(with = "duration")]
    body_read_timeout: Duration,
    #[serde(deserialize_with = "strict::boolean")]
    ready_without_store: bool,
    tls: Option<RawTls>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9090".into(),
            reveal_window: Duration::from_secs(60),
            team_key_limit: 5,
            bootstrap_token_env: "KEYGATE_ADMIN_TOKEN".into(),
            max_body_bytes: 64 * 1024,
            body_read_timeout: Duration::from_secs(10),
            ready_without_store: false,
            tls: None,
        }
    }
}

/// `[proxy.tls]` / `[admin.tls]`: present means the listener speaks TLS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    cert_file: String,
    key_file: String,
    client_ca_file: Option<String>,
    client_auth: String,
    #[serde(with = "duration")]
    handshake_timeout: Duration,
    #[serde(with = "duration")]
    reload_interval: Duration,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: None,
            client_auth: "none".into(),
            handshake_timeout: Duration::from_secs(10),
            reload_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUsage {
    #[serde(deserialize_with = "strict::boolean")]
    enabled: bool,
    #[serde(with = "duration")]
    flush_interval: Duration,
}

impl Default for RawUsage {
    fn default() -> Self {
        Self {
            enabled: true,
            flush_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawScope {
    name: String,
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    key_prefix: String,
    realm: String,
    sources: Vec<String>,
    header_name: String,
    query_param: String,
    #[serde(deserialize_with = "strict::boolean")]
    reveal_refusal_reason: bool,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            key_prefix: "kg".into(),
            realm: "keygate".into(),
            sources: vec!["bearer".into(), "header".into()],
            header_name: "x-api-key".into(),
            query_param: "api_key".into(),
            reveal_refusal_reason: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCache {
    #[serde(with = "duration")]
    ttl: Duration,
    #[serde(deserialize_with = "strict::int")]
    max_entries: u64,
    #[serde(with = "duration")]
    negative_ttl: Duration,
    #[serde(deserialize_with = "strict::int")]
    negative_max_entries: u64,
    #[serde(with = "duration")]
    stale_for: Duration,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            max_entries: 100_000,
            negative_ttl: Duration::from_secs(5),
            negative_max_entries: 10_000,
            stale_for: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    kind: String,
    path: String,
    /// `None` unless set, so that setting it together with `redis_cluster_nodes` is caught,
    /// and so that a Redis setting under `kind = "embedded"` is refused rather than ignored
    /// (`namespace` and `timeout` too; their defaults are applied when checking).
    redis_url: Option<String>,
    redis_cluster_nodes: Vec<String>,
    namespace: Option<String>,
    #[serde(with = "duration::optional")]
    timeout: Option<Duration>,
}

/// Far above any machine keygate runs on; a typo such as `40000` is refused, not obeyed.
pub const MAX_WORKER_THREADS: usize = 1024;
/// More open connections than one process's file descriptors allow on any usual system; the
/// connection semaphore panics above `usize::MAX >> 3`, which `3000000000000000000` passed.
pub const MAX_MAX_CONNECTIONS: usize = 1_000_000;
/// Streams per HTTP/2 client connection: 1000 x `max_connections` is already more than any
/// gateway should hold in peeks and upstream connections.
pub const MAX_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Connections keygate may have open to one upstream (`upstreams.NAME.max_connections`): as
/// with `proxy.max_connections`, past any usual file-descriptor limit, and a typo is refused.
pub const MAX_UPSTREAM_CONNECTIONS: usize = 100_000;
/// Its default: far above what a healthy upstream needs, far below the descriptors a process
/// usually has.
const DEFAULT_UPSTREAM_CONNECTIONS: usize = 1024;
/// Where `redis_url` points when neither it nor `redis_cluster_nodes` is set.
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
const DEFAULT_REDIS_NAMESPACE: &str = "kg";
const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(500);

impl Default for RawStore {
    fn default() -> Self {
        Self {
            kind: "embedded".into(),
            path: "keygate.db".into(),
            redis_url: None,
            redis_cluster_nodes: Vec::new(),
            namespace: None,
            timeout: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: String,
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    url: String,
    #[serde(with = "duration")]
    connect_timeout: Duration,
    #[serde(with = "duration")]
    response_timeout: Duration,
    #[serde(with = "duration")]
    body_idle_timeout: Duration,
    #[serde(with = "duration")]
    pool_idle_timeout: Duration,
    #[serde(deserialize_with = "strict::int")]
    pool_max_idle_per_host: usize,
    #[serde(deserialize_with = "strict::int")]
    max_connections: usize,
    /// PEM CA bundle for an https upstream; absent: the system's roots.
    ca_file: Option<String>,
    /// Speak HTTP/2 to the upstream (h2c with prior knowledge for http://, ALPN for https://).
    #[serde(deserialize_with = "strict::boolean")]
    http2: bool,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            url: String::new(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(30),
            // nginx's client_body_timeout and proxy_read_timeout.
            body_idle_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            max_connections: DEFAULT_UPSTREAM_CONNECTIONS,
            ca_file: None,
            http2: false,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRoute {
    name: String,
    path_prefix: String,
    methods: Vec<String>,
    host: Option<String>,
    upstream: String,
    #[serde(deserialize_with = "strict::boolean")]
    public: bool,
    scopes: Vec<String>,
    #[serde(deserialize_with = "strict::boolean")]
    keep_credential: bool,
    sources: Option<Vec<String>>,
    form_fields: Option<Vec<String>>,
    #[serde(deserialize_with = "strict::opt_int")]
    max_peek_bytes: Option<usize>,
    #[serde(with = "duration::optional")]
    peek_timeout: Option<Duration>,
    #[serde(deserialize_with = "strict::boolean")]
    strip_form_field: bool,
    #[serde(deserialize_with = "strict::opt_int")]
    max_body_bytes: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Checked: what the rest of the program uses.

#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub usage: UsageConfig,
    /// The scope catalogue: configured scopes, every scope a route requires, and the two
    /// built-in admin scopes. Keys may only carry scopes from it.
    pub scopes: Vec<ScopeConfig>,
    pub auth: AuthConfig,
    pub cache: CacheConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Peers whose `X-Forwarded-For`/`Forwarded` we believe.
    pub trusted_proxies: Vec<IpNet>,
    /// Empty: every client address may connect.
    pub allow_ips: Vec<IpNet>,
    pub deny_ips: Vec<IpNet>,
    pub max_connections: usize,
    /// Largest request head (request line + headers) accepted; larger gets 431. HTTP/1's read
    /// buffer grows to this size, so it also bounds what one read of a body holds.
    pub max_header_bytes: usize,
    /// Most header fields accepted in one request; more gets 431.
    pub max_headers: usize,
    /// Most streams (requests) one HTTP/2 client connection may have open at once, announced
    /// in SETTINGS_MAX_CONCURRENT_STREAMS; each can hold a body peek or an upstream connection.
    pub max_concurrent_streams: u32,
    /// The most request body bytes all key peeks together may hold at once, across every
    /// connection and proxy thread; a peek that would take them over is refused with 503
    /// `GATEWAY_BUSY`. At least every body-reading route's `max_peek_bytes`.
    pub max_peek_total_bytes: usize,
    pub header_read_timeout: Duration,
    /// How long an HTTP/2 client connection may go without a new request before it is closed
    /// gracefully (GOAWAY; streams in flight finish).
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    /// How long a write to a client may wait for the client to take it (it stopped reading)
    /// before the connection is closed.
    pub send_timeout: Duration,
    /// Threads that serve requests; `None`: one per CPU the process may use. One thread runs
    /// the single-threaded scheduler, which costs less per request than a one-worker pool.
    pub worker_threads: Option<usize>,
    /// false (default): each worker thread runs its own single-threaded scheduler and accepts
    /// from the shared listening socket, as nginx's workers do: a connection stays on the
    /// thread that accepted it, with its own upstream connections. true: one work-stealing
    /// pool, which spreads the streams of a few busy HTTP/2 connections over every thread.
    pub work_stealing: bool,
    /// Route path prefixes match without regard to ASCII case (for upstreams that route so:
    /// otherwise `/ADMIN` would miss the `/admin` route's rules and reach the upstream's
    /// `/admin` under another route's).
    pub case_insensitive_paths: bool,
    /// false (default): the process uses 4 KiB pages only, whatever the system's THP policy;
    /// true: the system's policy applies (memory.rs says why off is the default).
    pub transparent_huge_pages: bool,
    /// `None`: plaintext (HTTP/1.1 and h2c).
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// How long after create/rotate `show_key_value=true` still returns the value (0: never).
    pub reveal_window: Duration,
    /// Keys per team, enabled or not (0: no limit).
    pub team_key_limit: u32,
    /// Name of the environment variable holding the bootstrap admin token (unset: none).
    pub bootstrap_token_env: String,
    pub max_body_bytes: usize,
    /// A request body must have arrived whole within this time (else 408).
    pub body_read_timeout: Duration,
    /// When true, `/readyz` stays ready while the store is unreachable (the gateway keeps
    /// serving cached keys for `cache.stale_for`); when false (default) it turns unready.
    pub ready_without_store: bool,
    /// `None`: plaintext.
    pub tls: Option<TlsConfig>,
}

/// A listener's TLS settings; the files were readable, parsable and consistent when checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM: the certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key_file: PathBuf,
    /// PEM bundle of the CAs client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// A connection must finish its handshake within this time.
    pub handshake_timeout: Duration,
    /// How often the files are checked for changes; zero: only on SIGHUP.
    pub reload_interval: Duration,
}

/// Whether clients must present a certificate signed by `client_ca_file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    /// Asked for; a client without one is served, one with an untrusted one is refused.
    Optional,
    Required,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::None => "none",
            ClientAuth::Optional => "optional",
            ClientAuth::Required => "required",
        }
    }
}

/// Per-key usage records (request count, last use), counted in memory and flushed in batches.
#[derive(Debug, Clone)]
pub struct UsageConfig {
    pub enabled: bool,
    pub flush_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ScopeConfig {
    pub name: String,
    pub description: String,
}

pub const SCOPE_KEYS_READ: &str = "api_keys_read";
pub const SCOPE_KEYS_WRITE: &str = "api_keys_write";

/// Where a key may be found in a request, tried in the configured order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `Authorization: Bearer <key>`
    Bearer,
    /// The configured header (`X-API-Key` by default).
    Header,
    /// The configured query parameter (`api_key` by default).
    Query,
    /// A field of an `application/x-www-form-urlencoded` or `multipart/form-data` body (the
    /// route's `form_fields`).
    Form,
    /// A top-level string field of an `application/json` body (the route's `form_fields`).
    Json,
}

impl KeySource {
    /// Whether finding the key means reading the request body.
    pub fn is_body(self) -> bool {
        matches!(self, KeySource::Form | KeySource::Json)
    }

    /// The name used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::Bearer => "bearer",
            KeySource::Header => "header",
            KeySource::Query => "query",
            KeySource::Form => "form",
            KeySource::Json => "json",
        }
    }
}

impl std::str::FromStr for KeySource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bearer" => Ok(KeySource::Bearer),
            "header" => Ok(KeySource::Header),
            "query" => Ok(KeySource::Query),
            "form" => Ok(KeySource::Form),
            "json" => Ok(KeySource::Json),
            other => Err(format!(
                "unknown key source {other:?} (expected bearer, header, query, form or json)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub key_prefix: KeyPrefix,
    pub realm: String,
    pub sources: Vec<KeySource>,
    pub header_name: HeaderName,
    pub query_param: String,
    /// When true, refusals name the reason (disabled, expired); when false (default) every
    /// unusable key gets the same `API_KEY_INVALID`, so a caller cannot probe which keys exist.
    pub reveal_refusal_reason: bool,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub max_entries: u64,
    pub negative_ttl: Duration,
    pub negative_max_entries: u64,
    /// How long past `ttl` a cached key keeps working while the store cannot answer.
    pub stale_for: Duration,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Embedded {
        path: PathBuf,
    },
    Redis {
        target: RedisTarget,
        namespace: String,
        timeout: Duration,
    },
}

/// Which Redis deployment the Redis store talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (`store.redis_url`).
    Single(String),
    /// Redis Cluster, discovered from these seed nodes (`store.redis_cluster_nodes`).
    Cluster(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `http://host:port` with an optional base path prepended to every forwarded path.
    pub url: Uri,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// How long the client's request body or the upstream's response body may keep its reader
    /// waiting for the next bytes before the exchange is cut off.
    pub body_idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// The most connections open to this upstream at once, over every proxy thread, idle ones
    /// included; a request that finds none free within `connect_timeout` is answered 503.
    pub max_connections: usize,
    /// Trust anchors for an https upstream (configured bundle or system roots); `None` for http.
    pub tls_roots: Option<Arc<rustls::RootCertStore>>,
    pub http2: bool,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    /// Empty: any method.
    pub methods: Vec<Method>,
    /// Lowercase host without port; `None`: any host.
    pub host: Option<String>,
    pub upstream: String,
    pub public: bool,
    pub scopes: Vec<String>,
    pub keep_credential: bool,
    /// `None`: the `[auth]` sources.
    pub sources: Option<Vec<KeySource>>,
    /// How the `form` and `json` sources read the body.
    pub body: BodyKeyConfig,
    /// Largest request body forwarded on this route; `None`: no limit. Over it: 413.
    pub max_body_bytes: Option<u64>,
}

/// A route's settings for keys in request bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyKeyConfig {
    /// Field names that carry the key, in form and JSON bodies alike.
    pub fields: Vec<String>,
    /// How much of the body may be read while looking for the key.
    pub max_peek_bytes: usize,
    /// How long the client may take to send those bytes.
    pub peek_timeout: Duration,
    /// Remove the key field from `application/x-www-form-urlencoded` bodies before forwarding
    /// (multipart and JSON bodies are always forwarded unchanged).
    pub strip_form_field: bool,
}

pub const DEFAULT_FORM_FIELD: &str = "clientKey";
pub const DEFAULT_MAX_PEEK_BYTES: usize = 64 * 1024;
/// The largest HTTP/2 DATA frame a client may send keygate (hyper's default
/// `SETTINGS_MAX_FRAME_SIZE`, which keygate does not raise).
const MAX_H2_FRAME: usize = 16 * 1024;

/// `proxy.max_peek_total_bytes`' default. Without it, peeks could hold `max_connections` (10,000)
/// × `max_concurrent_streams` (100) × `max_peek_bytes` (64 KiB): 64 GB. 64 MiB is 1,024 peeks of
/// the default 64 KiB held at once, all of them slow (a key field usually arrives with the
/// first bytes of the body, and its peek holds them only until the key is verified), and a
/// sum a small container can spare; it is also at least the largest `max_peek_bytes` allowed
/// ([`MAX_MAX_PEEK_BYTES`]), so the default fits every route.
pub const DEFAULT_MAX_PEEK_TOTAL_BYTES: usize = 64 * 1024 * 1024;
/// Large enough for any sensible form prelude, small enough that a request's peek buffer
/// cannot become a memory problem.
pub const MAX_MAX_PEEK_BYTES: usize = 16 * 1024 * 1024;
pub const MIN_MAX_PEEK_BYTES: usize = 1024;
const MAX_FORM_FIELD_LEN: usize = 256;

impl Default for BodyKeyConfig {
    fn default() -> Self {
        Self {
            fields: vec![DEFAULT_FORM_FIELD.to_owned()],
            max_peek_bytes: DEFAULT_MAX_PEEK_BYTES,
            peek_timeout: Duration::from_secs(10),
            strip_form_field: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub field: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(String),
    #[error("{}", format_problems(.0))]
    Invalid(Vec<ConfigProblem>),
    /// A `KEYGATE__*` variable (named lossily) whose name or value is not UTF-8.
    #[error("environment variable {0}: not valid UTF-8")]
    EnvNotUnicode(String),
}

fn format_problems(problems: &[ConfigProblem]) -> String {
    let mut out = format!("{} problem(s) in the configuration:", problems.len());
    for p in problems {
        out.push_str(&format!("\n  {}: {}", p.field, p.reason));
    }
    out
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

// ---------------------------------------------------------------------------------------------
// Loading

/// Reads `path` (or nothing, for the built-in defaults) plus the `KEYGATE__*` environment.
/// The shortest `send_timeout` and `body_idle_timeout` accepted.
const MIN_STALL_TIMEOUT: Duration = Duration::from_millis(100);

pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        if !path.exists() {
            return Err(ConfigError::Load(format!(
                "{}: no such file",
                path.display()
            )));
        }
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    builder = builder.add_source(env_source(keygate_vars(std::env::vars_os())?.into_iter()));
    let raw: RawConfig = builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::Load(e.to_string()))?;
    check(raw)
}

/// Parses TOML text (for tests and the embedded defaults), without the environment.
pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::Load(e.to_string()))?;
    check(raw)
}

/// What every environment variable that configures keygate starts with.
const ENV_PREFIX: &str = "KEYGATE__";

/// The `KEYGATE__*` variables of `vars`. No other is read as text: any may hold bytes that are
/// not UTF-8 (`std::env::vars` panicked at start-up on `OLDPWD=/tmp/\xff`), and a
/// `KEYGATE__*` one that does is an error naming it.
fn keygate_vars(
    vars: impl Iterator<Item = (OsString, OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in vars {
        if !name.as_encoded_bytes().starts_with(ENV_PREFIX.as_bytes()) {
            continue;
        }
        let name = name
            .into_string()
            .map_err(|n| ConfigError::EnvNotUnicode(n.to_string_lossy().into_owned()))?;
        let value = value
            .into_string()
            .map_err(|_| ConfigError::EnvNotUnicode(name.clone()))?;
        out.push((name, value));
    }
    Ok(out)
}

/// Lists in the environment are comma-separated (`KEYGATE__PROXY__TRUSTED_PROXIES=10.0.0.0/8,…`),
/// each item trimmed (`bearer, header` is two sources, not `" header"`), empty items dropped
/// (so an empty value is an empty list).
const ENV_LIST_KEYS: &[&str] = &[
    "proxy.trusted_proxies",
    "proxy.allow_ips",
    "proxy.deny_ips",
    "auth.sources",
    "store.redis_cluster_nodes",
];

/// The `KEYGATE__*` variables as a configuration source: `KEYGATE__STORE__NAMESPACE` sets
/// `store.namespace`. A value stays the text it was, which the field's type reads (config-rs
/// takes `"5000"` for a number and `"true"` for a bool where the field wants one), so a string
/// field keeps its exact text: config-rs's `try_parsing` turned `NAMESPACE=007` into `"7"`
/// (and `key_prefix`, `realm` likewise). The list fields ([`ENV_LIST_KEYS`]) are split on
/// commas here.
#[derive(Debug, Clone)]
struct EnvSource(config::Map<String, config::Value>);

fn env_source(vars: impl Iterator<Item = (String, String)>) -> EnvSource {
    let origin = "the environment".to_owned();
    let map = vars
        .filter_map(|(name, value)| {
            let key = name
                .strip_prefix(ENV_PREFIX)?
                .to_lowercase()
                .replace("__", ".");
            let value = if ENV_LIST_KEYS.contains(&key.as_str()) {
                config::ValueKind::Array(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|item| !item.is_empty())
                        .map(|item| config::Value::new(Some(&origin), item))
                        .collect(),
                )
            } else {
                config::ValueKind::String(value)
            };
            Some((key, config::Value::new(Some(&origin), value)))
        })
        .collect();
    EnvSource(map)
}

impl config::Source for EnvSource {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// Checking

struct Problems(Vec<ConfigProblem>);

/// A Redis server address: `redis://…`, or a unix socket where `unix_ok` (cluster nodes are
/// always TCP: the cluster tells clients other nodes' TCP addresses).
fn check_redis_url(p: &mut Problems, field: &str, url: &str, unix_ok: bool) {
    if url.starts_with("rediss://") {
        p.add(
            field,
            "TLS to Redis (rediss://) is not supported yet; use redis:// or a unix socket",
        );
    } else if unix_ok
        && !(url.starts_with("redis://")
            || url.starts_with("redis+unix://")
            || url.starts_with("unix://"))
    {
        p.add(field, "must start with redis://, redis+unix:// or unix://");
    } else if !unix_ok && !url.starts_with("redis://") {
        p.add(
            field,
            "must start with redis:// (cluster nodes are reached over TCP)",
        );
    } else {
        // Parsed as the store will parse it, so that `check-config` catches what `serve`
        // would fail on. Never the URL itself in the message: it may hold a password
        // (redis-rs's errors do not echo it).
        match redis::Client::open(url) {
            Err(e) => p.add(
                field,
                format!(
                    "is not a usable Redis URL ({e}); expected \
                     redis://[[user]:password@]host[:port][/db]"
                ),
            ),
            // Every connection would send SELECT, which a cluster node refuses: the store
            // would answer 503 for as long as it ran.
            Ok(client) if !unix_ok && client.get_connection_info().redis_settings().db() != 0 => {
                p.add(
                    field,
                    "names a database other than 0, and Redis Cluster has only database 0: \
                     remove the /db from the URL",
                );
            }
            Ok(_) => {}
        }
    }
}

/// The cluster's seed nodes together, as the store will take them (one password and user
/// for all), once each has passed [`check_redis_url`].
fn check_cluster_nodes(p: &mut Problems, nodes: &[String]) {
    if let Err(e) = redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str)).build()
    {
        p.add(
            "store.redis_cluster_nodes",
            format!("cannot be used as one cluster's nodes ({e})"),
        );
    }
}

impl Problems {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigProblem {
            field: field.into(),
            reason: reason.into(),
        });
    }
}

fn check(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut p = Problems(Vec::new());

    let proxy = ProxyConfig {
        listen: parse_socket_addr(&mut p, "proxy.listen", &raw.proxy.listen),
        trusted_proxies: parse_cidrs(&mut p, "proxy.trusted_proxies", &raw.proxy.trusted_proxies),
        allow_ips: parse_cidrs(&mut p, "proxy.allow_ips", &raw.proxy.allow_ips),
        deny_ips: parse_cidrs(&mut p, "proxy.deny_ips", &raw.proxy.deny_ips),
        max_connections: raw.proxy.max_connections,
        max_header_bytes: raw.proxy.max_header_bytes,
        max_headers: raw.proxy.max_headers,
        max_concurrent_streams: raw.proxy.max_concurrent_streams,
        max_peek_total_bytes: raw.proxy.max_peek_total_bytes,
        header_read_timeout: raw.proxy.header_read_timeout,
        idle_timeout: raw.proxy.idle_timeout,
        drain_timeout: raw.proxy.drain_timeout,
        send_timeout: raw.proxy.send_timeout,
        worker_threads: raw.proxy.worker_threads,
        work_stealing: raw.proxy.work_stealing,
        case_insensitive_paths: raw.proxy.case_insensitive_paths,
        transparent_huge_pages: raw.proxy.transparent_huge_pages,
        tls: check_tls(&mut p, "proxy.tls", raw.proxy.tls),
    };
    if !(1..=MAX_MAX_CONNECTIONS).contains(&proxy.max_connections) {
        p.add(
            "proxy.max_connections",
            format!("must be from 1 to {MAX_MAX_CONNECTIONS}"),
        );
    }
    if proxy
        .worker_threads
        .is_some_and(|n| !(1..=MAX_WORKER_THREADS).contains(&n))
    {
        p.add(
            "proxy.worker_threads",
            format!("must be from 1 to {MAX_WORKER_THREADS}"),
        );
    }
    // hyper refuses read buffers under 8 KiB.
    if !(8192..=1024 * 1024).contains(&proxy.max_header_bytes) {
        p.add("proxy.max_header_bytes", "must be from 8192 to 1048576");
    }
    if !(1..=1000).contains(&proxy.max_headers) {
        p.add("proxy.max_headers", "must be from 1 to 1000");
    }
    if !(1..=MAX_MAX_CONCURRENT_STREAMS).contains(&proxy.max_concurrent_streams) {
        p.add(
            "proxy.max_concurrent_streams",
            format!("must be from 1 to {MAX_MAX_CONCURRENT_STREAMS}"),
        );
    }
    if proxy.max_peek_total_bytes < MIN_MAX_PEEK_BYTES {
        p.add(
            "proxy.max_peek_total_bytes",
            format!("must be at least {MIN_MAX_PEEK_BYTES}"),
        );
    }
    if proxy.header_read_timeout.is_zero() {
        p.add("proxy.header_read_timeout", "must be more than zero");
    }
    if proxy.idle_timeout < Duration::from_secs(1) {
        p.add("proxy.idle_timeout", "must be at least 1s");
    }
    // Below this a socket buffer that fills for a moment would cut healthy clients off.
    if proxy.send_timeout < MIN_STALL_TIMEOUT {
        p.add("proxy.send_timeout", "must be at least 100ms");
    }

    let key_prefix = KeyPrefix::new(&raw.auth.key_prefix).unwrap_or_else(|reason| {
        p.add("auth.key_prefix", reason);
        KeyPrefix::default()
    });
    let header_name =
        HeaderName::from_bytes(raw.auth.header_name.as_bytes()).unwrap_or_else(|_| {
            p.add("auth.header_name", "is not a valid HTTP header name");
            HeaderName::from_static("x-api-key")
        });
    if header_name == http::header::AUTHORIZATION {
        p.add(
            "auth.header_name",
            "must not be Authorization (use the \"bearer\" source for it)",
        );
    } else if let Some(reason) = crate::proxy::headers::not_a_key_header(header_name.as_str()) {
        p.add(
            "auth.header_name",
            format!("must not be {}: {reason}", header_name.as_str()),
        );
    }
    // A control character would make every challenge an invalid header value, and 401s
    // would go out without their WWW-Authenticate.
    if raw
        .auth
        .realm
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        p.add(
            "auth.realm",
            "must not contain quotes, backslashes or control characters",
        );
    }
    if raw.auth.query_param.is_empty() {
        p.add("auth.query_param", "must not be empty");
    }
    let sources = parse_sources(&mut p, "auth.sources", &raw.auth.sources);
    let auth = AuthConfig {
        key_prefix,
        realm: raw.auth.realm,
        sources,
        header_name,
        query_param: raw.auth.query_param,
        reveal_refusal_reason: raw.auth.reveal_refusal_reason,
    };

    let cache = CacheConfig {
        ttl: raw.cache.ttl,
        max_entries: raw.cache.max_entries,
        negative_ttl: raw.cache.negative_ttl,
        negative_max_entries: raw.cache.negative_max_entries,
        stale_for: raw.cache.stale_for,
    };
    if cache.ttl.is_zero() {
        p.add("cache.ttl", "must be more than zero");
    }
    if cache.max_entries == 0 {
        p.add("cache.max_entries", "must be at least 1");
    }

    let store = match raw.store.kind.as_str() {
        "embedded" => {
            if raw.store.path.is_empty() {
                p.add("store.path", "must not be empty");
            }
            // Each replica would otherwise run on a SQLite file of its own while its operator
            // believes they share one Redis.
            let redis_only = [
                ("store.redis_url", raw.store.redis_url.is_some()),
                (
                    "store.redis_cluster_nodes",
                    !raw.store.redis_cluster_nodes.is_empty(),
                ),
                ("store.namespace", raw.store.namespace.is_some()),
                ("store.timeout", raw.store.timeout.is_some()),
            ];
            for (field, set) in redis_only {
                if set {
                    p.add(
                        field,
                        "only applies to the Redis store, and store.kind is \"embedded\" (the \
                         default): set store.kind = \"redis\" (KEYGATE__STORE__KIND=redis), or \
                         remove it",
                    );
                }
            }
            StoreConfig::Embedded {
                path: PathBuf::from(raw.store.path),
            }
        }
        "redis" => {
            let target = if raw.store.redis_cluster_nodes.is_empty() {
                let url = raw
                    .store
                    .redis_url
                    .unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned());
                check_redis_url(&mut p, "store.redis_url", &url, true);
                RedisTarget::Single(url)
            } else {
                if raw.store.redis_url.is_some() {
                    p.add(
                        "store.redis_cluster_nodes",
                        "set either redis_url (one server) or redis_cluster_nodes (a cluster), \
                         not both",
                    );
                }
                let before = p.0.len();
                for (i, url) in raw.store.redis_cluster_nodes.iter().enumerate() {
                    let field = format!("store.redis_cluster_nodes[{i}]");
                    check_redis_url(&mut p, &field, url, false);
                }
                if p.0.len() == before {
                    check_cluster_nodes(&mut p, &raw.store.redis_cluster_nodes);
                }
                RedisTarget::Cluster(raw.store.redis_cluster_nodes)
            };
            let namespace = raw
                .store
                .namespace
                .unwrap_or_else(|| DEFAULT_REDIS_NAMESPACE.to_owned());
            if namespace.is_empty() || namespace.contains(['{', '}', ' ', ':']) {
                p.add(
                    "store.namespace",
                    "must be non-empty, without braces, spaces or colons",
                );
            }
            let timeout = raw.store.timeout.unwrap_or(DEFAULT_REDIS_TIMEOUT);
            if timeout.is_zero() {
                p.add("store.timeout", "must be more than zero");
            }
            StoreConfig::Redis {
                target,
                namespace,
                timeout,
            }
        }
        other => {
            p.add(
                "store.kind",
                format!("unknown store {other:?} (expected embedded or redis)"),
            );
            StoreConfig::Embedded {
                path: PathBuf::new(),
            }
        }
    };

    let mut log = LogConfig {
        format: match raw.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                p.add(
                    "log.format",
                    format!("unknown format {other:?} (expected text or json)"),
                );
                LogFormat::Text
            }
        },
        level: raw.log.level,
    };
    match log_filter(&log.level) {
        Ok(filter) => log.level = filter,
        Err(reason) => p.add("log.level", reason),
    }

    let mut upstreams = BTreeMap::new();
    for (name, u) in raw.upstreams {
        if !valid_upstream_name(&name) {
            p.add(
                format!("upstreams.{name}"),
                "an upstream's name must be lowercase letters, digits, '-' and '_': the \
                 environment names upstreams in lowercase (KEYGATE__UPSTREAMS__API__URL sets \
                 upstreams.api), so an override of this one would make another upstream",
            );
        }
        let field = format!("upstreams.{name}.url");
        let url = match u.url.parse::<Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some() =>
            {
                if uri.query().is_some() {
                    p.add(&field, "must not have a query string");
                }
                if let Some(reason) = uri.authority().and_then(upstream_authority_problem) {
                    p.add(&field, reason);
                }
                // Never sent upstream, so refused rather than ignored; not echoed either.
                if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                    p.add(
                        &field,
                        "must not hold credentials (user:password@): keygate does not send them",
                    );
                }
                uri
            }
            _ => {
                // Echoed to help find the typo, unless it may hold a password.
                let shown = if u.url.contains('@') {
                    "it".to_owned()
                } else {
                    format!("{:?}", u.url)
                };
                p.add(&field, format!("{shown} is not an http(s)://host:port URL"));
                Uri::from_static("http://invalid")
            }
        };
        if u.connect_timeout.is_zero() {
            p.add(
                format!("upstreams.{name}.connect_timeout"),
                "must be more than zero",
            );
        }
        if !(1..=MAX_UPSTREAM_CONNECTIONS).contains(&u.max_connections) {
            p.add(
                format!("upstreams.{name}.max_connections"),
                format!("must be between 1 and {MAX_UPSTREAM_CONNECTIONS}"),
            );
        }
        if u.response_timeout.is_zero() {
            p.add(
                format!("upstreams.{name}.response_timeout"),
                "must be more than zero",
            );
        }
        // `0s` kept no connection past its response (every one counted as idle too long), so
        // pooling was off without a word; `pool_max_idle_per_host = 0` says so.
        if u.pool_idle_timeout.is_zero() {
            p.add(
                format!("upstreams.{name}.pool_idle_timeout"),
                "must be more than zero; to keep no idle connections to the upstream, set \
                 pool_max_idle_per_host = 0",
            );
        }
        if u.body_idle_timeout < MIN_STALL_TIMEOUT {
            p.add(
                format!("upstreams.{name}.body_idle_timeout"),
                "must be at least 100ms",
            );
        }
        let tls_roots = if url.scheme_str() == Some("https") {
            match upstream_roots(u.ca_file.as_deref()) {
                Ok(roots) => Some(Arc::new(roots)),
                Err(reason) => {
                    p.add(format!("upstreams.{name}.ca_file"), reason);
                    None
                }
            }
        } else {
            if u.ca_file.is_some() {
                p.add(
                    format!("upstreams.{name}.ca_file"),
                    "only applies to https:// upstreams",
                );
            }
            None
        };
        upstreams.insert(
            name,
            UpstreamConfig {
                url,
                connect_timeout: u.connect_timeout,
                response_timeout: u.response_timeout,
                body_idle_timeout: u.body_idle_timeout,
                pool_idle_timeout: u.pool_idle_timeout,
                pool_max_idle_per_host: u.pool_max_idle_per_host,
                max_connections: u.max_connections,
                tls_roots,
                http2: u.http2,
            },
        );
    }

    let mut routes = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
        let at = |f: &str| format!("routes[{i}].{f}");
        let name = if r.name.is_empty() {
            format!("route{i}")
        } else {
            r.name
        };
        if !names.insert(name.clone()) {
            p.add(at("name"), format!("{name:?} is used by another route"));
        }
        if !r.path_prefix.starts_with('/') {
            p.add(at("path_prefix"), "must start with /");
        } else if r.path_prefix.contains('%') {
            p.add(
                at("path_prefix"),
                "is matched against the decoded path: write it without percent-encoding",
            );
        } else if let Err(e) = crate::request_path::routing_path(&r.path_prefix) {
            p.add(
                at("path_prefix"),
                format!("no request could match it: {e}, and such paths are refused"),
            );
        } else if proxy.case_insensitive_paths && !r.path_prefix.is_ascii() {
            // Upstreams that ignore case differ on letters beyond ASCII.
            p.add(
                at("path_prefix"),
                "must be ASCII with proxy.case_insensitive_paths",
            );
        }
        let methods = r
            .methods
            .iter()
            .filter_map(
                |m| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                    Ok(m) => Some(m),
                    Err(_) => {
                        p.add(at("methods"), format!("{m:?} is not an HTTP method"));
                        None
                    }
                },
            )
            .collect();
        if !upstreams.contains_key(&r.upstream) {
            p.add(
                at("upstream"),
                format!("no upstream named {:?} in [upstreams]", r.upstream),
            );
        }
        if r.public && !r.scopes.is_empty() {
            p.add(at("scopes"), "a public route cannot require scopes");
        }
        let (sources, body) = if r.public {
            // A public route reads no key, so what says how to read one would be ignored.
            let key_settings = [
                ("sources", r.sources.is_some()),
                ("form_fields", r.form_fields.is_some()),
                ("max_peek_bytes", r.max_peek_bytes.is_some()),
                ("peek_timeout", r.peek_timeout.is_some()),
                ("strip_form_field", r.strip_form_field),
                ("keep_credential", r.keep_credential),
            ];
            for (field, set) in key_settings {
                if set {
                    p.add(
                        at(field),
                        "has no effect on a public route, which reads no key (and forwards \
                         the request as sent)",
                    );
                }
            }
            (None, BodyKeyConfig::default())
        } else {
            let sources = r
                .sources
                .as_ref()
                .map(|s| parse_sources(&mut p, &at("sources"), s));
            let effective = sources.as_deref().unwrap_or(&auth.sources);
            let raw_body = RawBodyKeys {
                form_fields: r.form_fields.as_deref(),
                max_peek_bytes: r.max_peek_bytes,
                peek_timeout: r.peek_timeout,
                strip_form_field: r.strip_form_field,
                keep_credential: r.keep_credential,
            };
            let body = check_body_keys(&mut p, &at, &raw_body, effective);
            // One peek of the route must fit in the budget all peeks share, or every request
            // whose key is in its body would be refused. A peek keeps the read that crosses
            // `max_peek_bytes` whole (one HTTP/1.1 read, at most `max_header_bytes`; one
            // HTTP/2 DATA frame, at most 16 KiB), and a JSON peek also holds a copy to parse.
            let peek_holds = (body.max_peek_bytes + proxy.max_header_bytes.max(MAX_H2_FRAME))
                * if effective.contains(&KeySource::Json) {
                    2
                } else {
                    1
                };
            if effective.iter().any(|s| s.is_body())
                && peek_holds > proxy.max_peek_total_bytes
                && proxy.max_peek_total_bytes >= MIN_MAX_PEEK_BYTES
            {
                p.add(
                    "proxy.max_peek_total_bytes",
                    format!(
                        "{} is less than the {peek_holds} bytes one body peek of that route may \
                         hold: {} ({}{}) and the read that crosses it (max_header_bytes or an \
                         HTTP/2 frame, 16 KiB){}",
                        proxy.max_peek_total_bytes,
                        at("max_peek_bytes"),
                        body.max_peek_bytes,
                        if r.max_peek_bytes.is_none() {
                            ", the default"
                        } else {
                            ""
                        },
                        if effective.contains(&KeySource::Json) {
                            ", twice for a JSON source's copy"
                        } else {
                            ""
                        }
                    ),
                );
            }
            (sources, body)
        };
        if r.max_body_bytes == Some(0) {
            p.add(
                at("max_body_bytes"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
        routes.push(RouteConfig {
            name,
            path_prefix: r.path_prefix,
            methods,
            host: r.host.and_then(|h| match route_host(&h) {
                Ok(host) => Some(host),
                Err(reason) => {
                    p.add(at("host"), reason);
                    None
                }
            }),
            upstream: r.upstream,
            public: r.public,
            scopes: r.scopes,
            keep_credential: r.keep_credential,
            sources,
            body,
            max_body_bytes: r.max_body_bytes,
        });
    }
    for name in upstreams.keys() {
        if !routes.iter().any(|r| &r.upstream == name) {
            p.add(
                format!("upstreams.{name}"),
                "no route uses it: route to it or remove it (a KEYGATE__UPSTREAMS__… override \
                 with a misspelt name makes a new upstream instead of changing the one meant)",
            );
        }
    }
    check_unreachable_routes(&mut p, &routes, proxy.case_insensitive_paths);

    let admin = AdminConfig {
        enabled: raw.admin.enabled,
        listen: parse_socket_addr(&mut p, "admin.listen", &raw.admin.listen),
        reveal_window: raw.admin.reveal_window,
        team_key_limit: raw.admin.team_key_limit,
        bootstrap_token_env: raw.admin.bootstrap_token_env,
        max_body_bytes: raw.admin.max_body_bytes,
        body_read_timeout: raw.admin.body_read_timeout,
        ready_without_store: raw.admin.ready_without_store,
        tls: check_tls(&mut p, "admin.tls", raw.admin.tls),
    };
    if admin.enabled && same_port(proxy.listen, admin.listen) {
        p.add(
            "admin.listen",
            format!(
                "{} clashes with proxy.listen ({}): the proxy and the admin listener need \
                 ports of their own",
                admin.listen, proxy.listen
            ),
        );
    }
    // No variable can have such a name: the token was never read, and nothing said so.
    if admin.bootstrap_token_env.is_empty() || admin.bootstrap_token_env.contains(['=', '\0']) {
        p.add(
            "admin.bootstrap_token_env",
            "must name an environment variable (not empty, without = or NUL), e.g. \
             KEYGATE_ADMIN_TOKEN",
        );
    }
    if admin.max_body_bytes < 1024 {
        p.add("admin.max_body_bytes", "must be at least 1024");
    }
    if admin.body_read_timeout.is_zero() {
        p.add("admin.body_read_timeout", "must be more than zero");
    }
    let scopes = scope_catalogue(&mut p, raw.scopes, &routes);
    let usage = UsageConfig {
        enabled: raw.usage.enabled,
        flush_interval: raw.usage.flush_interval,
    };
    if usage.flush_interval < Duration::from_millis(100) {
        p.add("usage.flush_interval", "must be at least 100ms");
    }

    if p.0.is_empty() {
        Ok(Config {
            proxy,
            admin,
            usage,
            scopes,
            auth,
            cache,
            store,
            log,
            upstreams,
            routes,
        })
    } else {
        Err(ConfigError::Invalid(p.0))
    }
}

/// Refuses each route no request can reach, naming the routes that take its requests: the
/// rules of one that never matches (its scopes, its key) were never enforced. Routes are tried
/// as [`crate::route::RouteTable`] tries them: by rank (prefix length, with a host before
/// without, with methods before without), the file's order among routes of one rank. Two
/// routes of one rank match the same requests only with the same prefix (but for ASCII case
/// where `ignore_case`) and host, and of those the first takes each method it serves, but
/// `HEAD`, which goes to the first that lists `HEAD` itself, else the first that lists `GET`.
/// A route without methods takes every method, and is reached only by being the first such.
fn check_unreachable_routes(p: &mut Problems, routes: &[RouteConfig], ignore_case: bool) {
    let same_requests = |a: &RouteConfig, b: &RouteConfig| {
        let prefix = if ignore_case {
            a.path_prefix.eq_ignore_ascii_case(&b.path_prefix)
        } else {
            a.path_prefix == b.path_prefix
        };
        prefix && a.host == b.host && a.methods.is_empty() == b.methods.is_empty()
    };
    let lists = |r: &RouteConfig, m: &Method| r.methods.contains(m);
    for (j, route) in routes.iter().enumerate() {
        let earlier: Vec<usize> = (0..j)
            .filter(|&i| same_requests(&routes[i], route))
            .collect();
        if earlier.is_empty() {
            continue;
        }
        // The earlier routes that take each request this one would serve.
        let mut takers: Vec<usize> = Vec::new();
        if route.methods.is_empty() {
            takers.push(earlier[0]);
        } else {
            let mut methods: Vec<&Method> = route.methods.iter().collect();
            if route.methods.contains(&Method::GET) && !route.methods.contains(&Method::HEAD) {
                methods.push(&Method::HEAD);
            }
            for m in methods {
                let taker = if *m == Method::HEAD {
                    // The first route of the group listing HEAD; else the first listing GET.
                    let group = || earlier.iter().copied().chain([j]);
                    group()
                        .find(|&i| lists(&routes[i], &Method::HEAD))
                        .or_else(|| group().find(|&i| lists(&routes[i], &Method::GET)))
                        .filter(|&i| i != j)
                } else {
                    earlier.iter().copied().find(|&i| lists(&routes[i], m))
                };
                match taker {
                    Some(i) => takers.push(i),
                    // This route takes some requests: it can be reached.
                    None => {
                        takers.clear();
                        break;
                    }
                }
            }
        }
        if takers.is_empty() {
            continue;
        }
        takers.sort_unstable();
        takers.dedup();
        let names: Vec<String> = takers
            .iter()
            .map(|&i| format!("routes[{i}] ({:?})", routes[i].name))
            .collect();
        let case = if takers
            .iter()
            .any(|&i| routes[i].path_prefix != route.path_prefix)
        {
            " (equal but for case, which proxy.case_insensitive_paths ignores)"
        } else {
            ""
        };
        let methods = if route.methods.is_empty() {
            "every method".to_owned()
        } else {
            let listed: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
            format!("its methods ({})", listed.join(", "))
        };
        p.add(
            format!("routes[{j}]"),
            format!(
                "route {:?} can never match: {} {} the same path_prefix {:?}{case} and host, \
                 and come{} first for {methods}, so its rules (scopes, public, key sources) \
                 would never apply; remove it, or give the routes different prefixes, hosts or \
                 methods",
                route.name,
                names.join(" and "),
                if names.len() == 1 { "has" } else { "have" },
                route.path_prefix,
                if names.len() == 1 { "s" } else { "" },
            ),
        );
    }
}

/// A logging filter (`log.level`, `RUST_LOG`), checked and with each comma-separated
/// directive trimmed: `EnvFilter` slices a directive with spaces around it wrongly (`info `
/// became a target named "info "). Each directive without `=` or `[` must be a level name
/// (`trace`, `debug`, `info`, `warn`, `error`, `off`): `EnvFilter` takes any other bare word
/// for a target to log at every level, so a misspelled level (`warning`, `verbose`) turned
/// every line off.
pub fn log_filter(filter: &str) -> Result<String, String> {
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    // `EnvFilter` reads no directive as `error`: every other line, the access log's included,
    // went without a word.
    if directives.is_empty() {
        return Err(
            "is empty: name a level (trace, debug, info, warn, error or off), e.g. info".into(),
        );
    }
    for directive in &directives {
        if directive.contains(['=', '[']) {
            continue;
        }
        if directive
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_err()
        {
            return Err(format!(
                "{directive:?} is not a level (trace, debug, info, warn, error or off); a \
                 target needs its level after = (e.g. {directive}=debug)"
            ));
        }
    }
    let filter = directives.join(",");
    match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(_) => Ok(filter),
        Err(_) => Err("is not a valid level or filter (e.g. info, keygate=debug)".to_owned()),
    }
}

/// What is wrong with an upstream URL's `host[:port]`, where `http::Uri` let it pass: an empty
/// host (`http://:8080`) or a port that is not one (`:80800` was read as no port, and traffic
/// went to port 80; `:0` cannot be connected to).
fn upstream_authority_problem(authority: &http::uri::Authority) -> Option<&'static str> {
    // Without userinfo (refused on its own): the part after the last `@`.
    let host_port = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_, hp)| hp);
    let (host, port) = if let Some(rest) = host_port.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, after)) => (ip, after.strip_prefix(':')),
            None => (rest, None),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Some("has no host (expected http(s)://host:port)");
    }
    match port.map(str::parse::<u16>) {
        None => None,
        Some(Ok(0)) => Some("port 0 cannot be connected to"),
        Some(Ok(_)) => None,
        Some(Err(_)) => Some("the port must be a number from 1 to 65535"),
    }
}

/// A route's `host` as requests are matched against it: lowercase, without a trailing dot
/// (requests' are removed too). Refused: what no request host could equal once its port and
/// trailing dot are gone, as a port, an empty label or a wildcard; such a route never matched.
fn route_host(host: &str) -> Result<String, String> {
    if host.is_empty() {
        return Err("must not be empty (leave host out to match any host)".into());
    }
    if host.contains('*') {
        return Err("wildcards are not supported: give each host a route".into());
    }
    if let Some(inner) = host.strip_prefix('[') {
        // An IPv6 address: requests name it so, in brackets.
        return match inner
            .strip_suffix(']')
            .map(str::parse::<std::net::Ipv6Addr>)
        {
            Some(Ok(_)) => Ok(host.to_ascii_lowercase()),
            _ if inner.contains("]:") => Err(
                "must not have a port: a route matches its host on every port the proxy \
                 listens on"
                    .into(),
            ),
            _ => Err("is not an IPv6 address in brackets".into()),
        };
    }
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err("an IPv6 address must be in brackets, as requests name it ([::1])".into());
    }
    if host.contains(':') {
        return Err(
            "must not have a port: a route matches its host on every port the proxy listens on"
                .into(),
        );
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return Err("is not a host name: it has an empty label (\"..\" or a leading dot)".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(
            "must be a bare host name or address (letters, digits, '-', '_' and dots; an \
             internationalised name in its xn-- form), without scheme, port or path"
                .into(),
        );
    }
    Ok(name.to_ascii_lowercase())
}

/// A route's body-key settings; settings that cannot take effect are refused rather than
/// ignored, so a route never silently accepts fewer places than its author meant.
struct RawBodyKeys<'a> {
    form_fields: Option<&'a [String]>,
    max_peek_bytes: Option<usize>,
    peek_timeout: Option<Duration>,
    strip_form_field: bool,
    keep_credential: bool,
}

fn check_body_keys(
    p: &mut Problems,
    at: &dyn Fn(&str) -> String,
    r: &RawBodyKeys<'_>,
    sources: &[KeySource],
) -> BodyKeyConfig {
    let mut body = BodyKeyConfig::default();
    let reads_body = sources.iter().any(|s| s.is_body());
    let has_form = sources.contains(&KeySource::Form);
    let unused = "has no effect: the route's sources include neither \"form\" nor \"json\"";
    if let Some(fields) = &r.form_fields {
        if !reads_body {
            p.add(at("form_fields"), unused);
        }
        if fields.is_empty() {
            p.add(at("form_fields"), "must name at least one field");
        }
        for (j, f) in fields.iter().enumerate() {
            let field = format!("{}[{j}]", at("form_fields"));
            if f.is_empty() || f.len() > MAX_FORM_FIELD_LEN {
                p.add(field, format!("must be 1-{MAX_FORM_FIELD_LEN} bytes long"));
            } else if f.chars().any(|c| c.is_control() || c == '"') {
                p.add(field, "must not contain control characters or quotes");
            } else if fields[..j].contains(f) {
                p.add(field, "listed twice");
            }
        }
        body.fields = fields.to_vec();
    }
    if let Some(n) = r.max_peek_bytes {
        if !reads_body {
            p.add(at("max_peek_bytes"), unused);
        }
        if !(MIN_MAX_PEEK_BYTES..=MAX_MAX_PEEK_BYTES).contains(&n) {
            p.add(
                at("max_peek_bytes"),
                format!("must be between {MIN_MAX_PEEK_BYTES} and {MAX_MAX_PEEK_BYTES}"),
            );
        }
        body.max_peek_bytes = n;
    }
    if let Some(t) = r.peek_timeout {
        if !reads_body {
            p.add(at("peek_timeout"), unused);
        }
        if t.is_zero() {
            p.add(at("peek_timeout"), "must be more than zero");
        }
        body.peek_timeout = t;
    }
    if r.strip_form_field {
        if !has_form {
            p.add(
                at("strip_form_field"),
                "has no effect: the route's sources do not include \"form\"",
            );
        }
        if r.keep_credential {
            p.add(
                at("strip_form_field"),
                "contradicts keep_credential = true on the same route",
            );
        }
        body.strip_form_field = true;
    }
    body
}

fn valid_upstream_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

fn valid_scope_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.' | b'/'))
}

fn scope_catalogue(
    p: &mut Problems,
    raw: Vec<RawScope>,
    routes: &[RouteConfig],
) -> Vec<ScopeConfig> {
    let mut out: Vec<ScopeConfig> = Vec::new();
    let mut add = |name: &str, description: &str| {
        if !out.iter().any(|s| s.name == name) {
            out.push(ScopeConfig {
                name: name.to_owned(),
                description: description.to_owned(),
            });
        }
    };
    add(SCOPE_KEYS_READ, "Read API keys through the admin API");
    add(
        SCOPE_KEYS_WRITE,
        "Create, change and delete API keys through the admin API",
    );
    for (i, s) in raw.iter().enumerate() {
        if !valid_scope_name(&s.name) {
            p.add(
                format!("scopes[{i}].name"),
                format!(
                    "{:?} is not a scope name (1-64 of A-Z a-z 0-9 _ - : . /)",
                    s.name
                ),
            );
            continue;
        }
        add(&s.name, &s.description);
    }
    for (i, r) in routes.iter().enumerate() {
        for s in &r.scopes {
            if !valid_scope_name(s) {
                p.add(
                    format!("routes[{i}].scopes"),
                    format!("{s:?} is not a scope name"),
                );
                continue;
            }
            add(s, &format!("Required by route {}", r.name));
        }
    }
    out
}

/// The roots an https upstream is verified against: the PEM bundle at `ca_file`, or the
/// system's trust store.
fn upstream_roots(ca_file: Option<&str>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
            for cert in CertificateDer::pem_slice_iter(&bytes) {
                let cert =
                    cert.map_err(|e| format!("{path}: not a PEM certificate bundle ({e:?})"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{path}: unusable CA certificate ({e})"))?;
            }
            if roots.is_empty() {
                return Err(format!("{path}: no certificate in the file"));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err("no system CA certificates found; set ca_file to a PEM bundle".into());
            }
        }
    }
    Ok(roots)
}

/// Whether two listeners would take the same port: the same address, or one on every address
/// (`0.0.0.0`, `::`). Port 0 asks for a free port, so never clashes. An IPv4-mapped IPv6
/// address (`[::ffff:127.0.0.1]`) is the IPv4 address it maps.
pub fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    let (ip_a, ip_b) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() != 0
        && a.port() == b.port()
        && (ip_a == ip_b || ip_a.is_unspecified() || ip_b.is_unspecified())
}

fn parse_socket_addr(p: &mut Problems, field: &str, s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| {
        p.add(field, format!("{s:?} is not an address:port"));
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// A listener's TLS table. The files are loaded here exactly as serving loads them, so
/// `check-config` catches an unreadable, unparsable or mismatched certificate or key.
fn check_tls(p: &mut Problems, at: &str, raw: Option<RawTls>) -> Option<TlsConfig> {
    let raw = raw?;
    let field = |f: &str| format!("{at}.{f}");
    for (name, value) in [("cert_file", &raw.cert_file), ("key_file", &raw.key_file)] {
        if value.is_empty() {
            p.add(field(name), "must be set (a PEM file path)");
        }
    }
    let client_auth = match raw.client_auth.as_str() {
        "none" => ClientAuth::None,
        "optional" => ClientAuth::Optional,
        "required" => ClientAuth::Required,
        other => {
            p.add(
                field("client_auth"),
                format!("unknown mode {other:?} (expected none, optional or required)"),
            );
            ClientAuth::None
        }
    };
    match (&raw.client_ca_file, client_auth) {
        (Some(f), _) if f.is_empty() => p.add(field("client_ca_file"), "must not be empty"),
        (Some(_), ClientAuth::None) => p.add(
            field("client_ca_file"),
            "has no effect: client_auth is \"none\" (set it to \"optional\" or \"required\")",
        ),
        (None, ClientAuth::Optional | ClientAuth::Required) => p.add(
            field("client_ca_file"),
            format!("must be set when client_auth is {:?}", client_auth.as_str()),
        ),
        _ => {}
    }
    if raw.handshake_timeout.is_zero() {
        p.add(field("handshake_timeout"), "must be more than zero");
    }
    if !raw.reload_interval.is_zero() && raw.reload_interval < Duration::from_millis(100) {
        p.add(
            field("reload_interval"),
            "must be 0s (no polling; SIGHUP still reloads) or at least 100ms",
        );
    }
    let tls = TlsConfig {
        cert_file: PathBuf::from(raw.cert_file),
        key_file: PathBuf::from(raw.key_file),
        client_ca_file: raw.client_ca_file.map(PathBuf::from),
        client_auth,
        handshake_timeout: raw.handshake_timeout,
        reload_interval: raw.reload_interval,
    };
    // Reading an unnamed file would only repeat the problem above.
    if !tls.cert_file.as_os_str().is_empty() && !tls.key_file.as_os_str().is_empty() {
        for e in crate::server::tls::check(&tls) {
            p.add(e.field().path_in(at), e.to_string());
        }
    }
    Some(tls)
}

/// Parses a list of addresses and CIDR blocks; a bare address is a /32 or /128.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = if let Ok(net) = s.parse::<IpNet>() {
        net.trunc()
    } else if let Ok(ip) = s.parse::<IpAddr>() {
        IpNet::from(ip)
    } else {
        return Err(format!("{s:?} is not an IP address or CIDR block"));
    };
    Ok(ipv4_mapped_as_ipv4(net))
}

/// `::ffff:10.0.0.0/104` is `10.0.0.0/8`: a client's IPv4-mapped address is taken as its IPv4
/// address (`client_ip::canonical`), so a mapped network as written would never match, and an
/// entry in `deny_ips` would never deny.
pub fn ipv4_mapped_as_ipv4(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

fn parse_cidrs(p: &mut Problems, field: &str, list: &[String]) -> Vec<IpNet> {
    list.iter()
        .enumerate()
        .filter_map(|(i, s)| match parse_cidr(s) {
            Ok(n) => Some(n),
            Err(e) => {
                p.add(format!("{field}[{i}]"), e);
                None
            }
        })
        .collect()
}

fn parse_sources(p: &mut Problems, field: &str, list: &[String]) -> Vec<KeySource> {
    if list.is_empty() {
        p.add(field, "must name at least one source");
    }
    let mut out = Vec::new();
    for (i, s) in list.iter().enumerate() {
        match s.parse::<KeySource>() {
            Ok(src) if out.contains(&src) => p.add(format!("{field}[{i}]"), "listed twice"),
            Ok(src) => out.push(src),
            Err(e) => p.add(format!("{field}[{i}]"), e),
        }
    }
    out
}

/// Durations: humantime's syntax (`"30s"`, `"5m"`, `"1h 30m"`), at most [`duration::MAX`]. A
/// longer one would overflow the clock arithmetic that arms a timer: `header_read_timeout =
/// "500000000000years"` passed the check and then panicked a proxy thread on its first
/// connection. Nothing here needs more than a few days.
mod duration {
    use serde::{Deserialize, Deserializer, de::Error};
    use std::time::Duration;

    /// Ten years, as humantime counts them (365.25 days each), so the message says "10years".
    pub const MAX: Duration = Duration::from_secs(10 * 31_557_600);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let value: Duration = humantime_serde::deserialize(d)?;
        within_max(value)
    }

    fn within_max<E: Error>(value: Duration) -> Result<Duration, E> {
        if value > MAX {
            return Err(E::custom(format!(
                "{} is longer than the longest duration accepted, {}",
                humantime::format_duration(value),
                humantime::format_duration(MAX)
            )));
        }
        Ok(value)
    }

    pub mod optional {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let value: Option<humantime_serde::Serde<Duration>> = Option::deserialize(d)?;
            value.map(|v| within_max(v.into_inner())).transpose()
        }
    }
}

/// Whole numbers and booleans as written. config-rs converts between them: a float was rounded
/// into an integer field (`team_key_limit = -1.0` became 0, which means no limit), a bool was
/// 0 or 1, a number was a bool. These take a TOML integer (or boolean), or its text, which is
/// how the environment gives every value.
mod strict {
    use serde::Deserialize;
    use serde::de::{self, Deserializer, Unexpected, Visitor};
    use std::fmt;
    use std::marker::PhantomData;

    /// An unsigned whole number.
    struct Int<T>(T);

    struct IntVisitor<T>(PhantomData<T>);

    impl<T: TryFrom<u64>> Visitor<'_> for IntVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            T::try_from(v).map_err(|_| E::custom(format!("{v} is too large")))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!("{v} is negative"))),
            }
        }

        fn visit_u128<E: de::Error>(self, v: u128) -> Result<T, E> {
            let v = u64::try_from(v).map_err(|_| E::custom(format!("{v} is too large")))?;
            self.visit_u64(v)
        }

        fn visit_i128<E: de::Error>(self, v: i128) -> Result<T, E> {
            if v < 0 {
                return Err(E::custom(format!("{v} is negative")));
            }
            self.visit_u128(v.unsigned_abs())
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            let t = v.trim();
            if let Ok(n) = t.parse::<u64>() {
                self.visit_u64(n)
            } else if let Ok(n) = t.parse::<i64>() {
                self.visit_i64(n)
            } else {
                Err(E::invalid_value(Unexpected::Str(v), &self))
            }
        }
    }

    impl<'de, T: TryFrom<u64>> Deserialize<'de> for Int<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(IntVisitor(PhantomData)).map(Int)
        }
    }

    pub fn int<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
        Int::deserialize(d).map(|Int(v)| v)
    }

    pub fn opt_int<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        Option::<Int<T>>::deserialize(d).map(|v| v.map(|Int(v)| v))
    }

    struct BoolVisitor;

    impl Visitor<'_> for BoolVisitor {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("true or false")
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }

        /// The words config-rs took from the environment before, so no deployment breaks.
        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
            }
        }
    }

    pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        d.deserialize_any(BoolVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = r#"
        [proxy]
        listen = "127.0.0.1:0"
        trusted_proxies = ["10.0.0.0/8", "::1"]
        [upstreams.api]
        url = "http://127.0.0.1:9000"
        [[routes]]
        name = "api"
        path_prefix = "/"
        upstream = "api"
        scopes = ["read"]
    "#;

    #[test]
    fn good_config_checks() {
        let c = from_toml(GOOD).unwrap();
        assert_eq!(c.routes[0].scopes, vec!["read".to_string()]);
        assert_eq!(c.proxy.trusted_proxies.len(), 2);
        assert_eq!(c.auth.sources, vec![KeySource::Bearer, KeySource::Header]);
    }

    #[test]
    fn the_proxy_and_admin_listeners_may_not_share_a_port() {
        for (proxy, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "[::ffff:127.0.0.1]:8080"),
            ("[::ffff:0.0.0.0]:8080", "127.0.0.1:8080"),
        ] {
            let toml = format!("[proxy]\nlisten = \"{proxy}\"\n[admin]\nlisten = \"{admin}\"\n");
            let Err(ConfigError::Invalid(problems)) = from_toml(&toml) else {
                panic!("{proxy} and {admin} accepted")
            };
            assert!(
                problems
                    .iter()
                    .any(|p| p.field == "admin.listen" && p.reason.contains("proxy.listen")),
                "{problems:?}"
            );
        }
        for (proxy, admin, enabled) in [
            ("127.0.0.1:8080", "127.0.0.1:9090", true),
            ("127.0.0.1:8080", "127.0.0.2:8080", true),
            ("127.0.0.1:0", "127.0.0.1:0", true),
            ("127.0.0.1:8080", "127.0.0.1:8080", false),
        ] {
            let toml = format!(
                "[proxy]\nlisten = \"{proxy}\"\n[admin]\nlisten = \"{admin}\"\nenabled = {enabled}\n"
            );
            if let Err(ConfigError::Invalid(problems)) = from_toml(&toml) {
                assert!(
                    !problems.iter().any(|p| p.field == "admin.listen"),
                    "{proxy} {admin} {enabled}: {problems:?}"
                );
            }
        }
    }

    /// No variable has such a name: the token was never read and serve started without one.
    #[test]
    fn the_bootstrap_token_variable_is_a_variable_name() {
        for name in ["", "A=B", "A\\u0000B", "="] {
            let toml = format!("{GOOD}\n[admin]\nbootstrap_token_env = \"{name}\"\n");
            let Err(ConfigError::Invalid(problems)) = from_toml(&toml) else {
                panic!("bootstrap_token_env = {name:?} accepted")
            };
            assert!(
                problems
                    .iter()
                    .any(|p| p.field == "admin.bootstrap_token_env"),
                "{name:?}: {problems:?}"
            );
        }
        let toml = format!("{GOOD}\n[admin]\nbootstrap_token_env = \"MY_TOKEN\"\n");
        assert_eq!(
            from_toml(&toml).unwrap().admin.bootstrap_token_env,
            "MY_TOKEN"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let bad = r#"
            [proxy]
            listen = "nowhere"
            trusted_proxies = ["10.0.0.0/33"]
            idle_timeout = "500ms"
            [admin]
            body_read_timeout = "0s"
            [auth]
            key_prefix = "Bad_Prefix"
            sources = ["bearer", "cookie"]
            [store]
            kind = "mongo"
            [upstreams.api]
            url = "ftp://x"
            [[routes]]
            path_prefix = "api"
            upstream = "nope"
            methods = ["G ET"]
        "#;
        let Err(ConfigError::Invalid(problems)) = from_toml(bad) else {
            panic!("expected problems")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "proxy.listen",
            "proxy.trusted_proxies[0]",
            "proxy.idle_timeout",
            "admin.body_read_timeout",
            "auth.key_prefix",
            "auth.sources[1]",
            "store.kind",
            "upstreams.api.url",
            "routes[0].path_prefix",
            "routes[0].upstream",
            "routes[0].methods",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn case_insensitive_paths_need_ascii_prefixes() {
        let with = |flag: bool| {
            let good = GOOD.replace(
                "[proxy]\n",
                &format!("[proxy]\ncase_insensitive_paths = {flag}\n"),
            );
            format!(
                "{good}\n[[routes]]\nname = \"u\"\npath_prefix = \"/über\"\nupstream = \"api\"\n"
            )
        };
        assert!(from_toml(&with(false)).is_ok());
        let Err(ConfigError::Invalid(problems)) = from_toml(&with(true)) else {
            panic!("expected a problem")
        };
        assert!(
            problems.iter().any(|p| p.field.ends_with(".path_prefix")),
            "{problems:?}"
        );
        // Two spellings of one prefix: fine when case counts, refused when it does not.
        let twice = |flag: bool| {
            GOOD.replace(
                "[proxy]\n",
                &format!("[proxy]\ncase_insensitive_paths = {flag}\n"),
            ) + "[[routes]]\nname = \"a\"\npath_prefix = \"/Admin\"\nupstream = \"api\"\n\
                 [[routes]]\nname = \"b\"\npath_prefix = \"/admin\"\nupstream = \"api\"\n"
        };
        assert!(from_toml(&twice(false)).is_ok());
        let Err(ConfigError::Invalid(problems)) = from_toml(&twice(true)) else {
            panic!("expected a problem")
        };
        assert!(
            problems
                .iter()
                .any(|p| p.field == "routes[2]" && p.reason.contains("but for case")),
            "{problems:?}"
        );
    }

    /// Review: `/admin` public, then `/admin` with scopes: the second never matched, and every
    /// request reached the upstream unauthenticated.
    #[test]
    fn a_route_that_can_never_match_is_refused_naming_both() {
        let with = |routes: &str| {
            format!("{GOOD}\n{routes}").replace("path_prefix = \"/\"", "path_prefix = \"/x\"")
        };
        let route = |name: &str, extra: &str| {
            format!(
                "[[routes]]\nname = \"{name}\"\npath_prefix = \"/admin\"\nupstream = \"api\"\n{extra}\n"
            )
        };
        let refused = [
            // The review's case.
            (route("open", "public = true") + &route("locked", "scopes = [\"admin\"]")),
            // Methods compared as sets, case aside.
            (route("a", "methods = [\"GET\", \"POST\"]")
                + &route("b", "methods = [\"post\", \"get\"]")),
            // Every method of the later one taken, by one or by several.
            (route("a", "methods = [\"GET\", \"POST\"]") + &route("b", "methods = [\"GET\"]")),
            (route("a", "methods = [\"GET\"]")
                + &route("b", "methods = [\"POST\"]")
                + &route("c", "methods = [\"POST\", \"GET\"]")),
            // HEAD goes with GET where no route of the rank lists it.
            (route("a", "methods = [\"GET\"]")
                + &route("b", "methods = [\"HEAD\", \"GET\"]")
                + &route("c", "methods = [\"HEAD\"]")),
            // Same host.
            (route("a", "host = \"api.example\"")
                + &route("b", "host = \"API.example\"\nscopes = [\"s\"]")),
        ];
        for routes in refused {
            let Err(ConfigError::Invalid(problems)) = from_toml(&with(&routes)) else {
                panic!("accepted:\n{routes}")
            };
            let p = problems
                .iter()
                .find(|p| p.reason.contains("can never match"))
                .unwrap_or_else(|| panic!("{routes}: {problems:?}"));
            assert!(p.field.starts_with("routes["), "{p}");
            assert_eq!(p.reason.matches("routes[").count(), {
                let n = p.reason.matches(" and routes[").count();
                n + 1
            });
        }
        let first = from_toml(&with(
            &(route("open", "public = true") + &route("locked", "scopes = [\"admin\"]")),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            first.contains("routes[2]")
                && first.contains("\"locked\"")
                && first.contains("routes[1] (\"open\")"),
            "{first}"
        );
        let accepted = [
            (route("a", "methods = [\"GET\"]") + &route("b", "methods = [\"POST\"]")),
            (route("a", "methods = [\"GET\"]") + &route("b", "")),
            (route("a", "") + &route("b", "methods = [\"GET\"]")),
            (route("a", "methods = [\"GET\"]") + &route("b", "methods = [\"HEAD\"]")),
            (route("a", "methods = [\"GET\"]") + &route("b", "methods = [\"GET\", \"HEAD\"]")),
            (route("a", "") + &route("b", "host = \"api.example\"")),
            (route("a", "host = \"a.example\"") + &route("b", "host = \"b.example\"")),
        ];
        for routes in accepted {
            let c = from_toml(&with(&routes));
            assert!(c.is_ok(), "{routes}: {:?}", c.err());
        }
    }

    /// The check refuses exactly the routes `RouteTable` never returns: every set of up to three
    /// routes over two spellings of a prefix, a host or none, and a few method lists, against
    /// every request that could reach one of them.
    #[test]
    fn the_unreachable_route_check_agrees_with_the_route_table() {
        let method_sets: [&[Method]; 6] = [
            &[],
            &[Method::GET],
            &[Method::HEAD],
            &[Method::POST],
            &[Method::GET, Method::HEAD],
            &[Method::POST, Method::GET],
        ];
        let mut universe = Vec::new();
        for prefix in ["/a", "/A"] {
            for host in [None, Some("h")] {
                for methods in method_sets {
                    universe.push((prefix, host, methods));
                }
            }
        }
        let route =
            |i: usize, (prefix, host, methods): (&str, Option<&str>, &[Method])| RouteConfig {
                name: format!("r{i}"),
                path_prefix: prefix.into(),
                methods: methods.to_vec(),
                host: host.map(Into::into),
                upstream: "u".into(),
                public: false,
                scopes: vec![],
                keep_credential: false,
                sources: None,
                body: BodyKeyConfig::default(),
                max_body_bytes: None,
            };
        let requests: Vec<(Method, Option<&str>, &str)> = [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::from_bytes(b"get").unwrap(),
        ]
        .into_iter()
        .flat_map(|m| {
            [None, Some("h"), Some("x")]
                .into_iter()
                .flat_map(move |h| ["/a", "/A"].map(|p| (m.clone(), h, p)))
        })
        .collect();
        let n = universe.len();
        let mut sets: Vec<Vec<usize>> = Vec::new();
        for a in 0..n {
            for b in 0..n {
                sets.push(vec![a, b]);
                for c in 0..n {
                    sets.push(vec![a, b, c]);
                }
            }
        }
        for ignore_case in [false, true] {
            for set in &sets {
                let routes: Vec<RouteConfig> = set
                    .iter()
                    .enumerate()
                    .map(|(i, &u)| route(i, universe[u]))
                    .collect();
                let table = crate::route::RouteTable::new(&routes, &[KeySource::Bearer], |_| 0)
                    .ignoring_path_case(ignore_case);
                let reached: std::collections::HashSet<String> = requests
                    .iter()
                    .filter_map(|(m, h, p)| table.find(m, *h, p.as_bytes()))
                    .map(|r| r.name.clone())
                    .collect();
                let mut p = Problems(Vec::new());
                check_unreachable_routes(&mut p, &routes, ignore_case);
                let refused: std::collections::HashSet<String> =
                    p.0.iter()
                        .map(|p| p.field.replace("routes[", "r").replace(']', ""))
                        .collect();
                let unreached: std::collections::HashSet<String> = routes
                    .iter()
                    .map(|r| r.name.clone())
                    .filter(|n| !reached.contains(n))
                    .collect();
                assert_eq!(
                    refused,
                    unreached,
                    "ignore_case {ignore_case}: {:?}",
                    set.iter().map(|&u| universe[u]).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn path_prefixes_must_be_matchable_paths() {
        for prefix in ["/a/../b", "//a", "/a;v=1", "/%61pi"] {
            let toml = format!(
                "{GOOD}\n[[routes]]\nname = \"odd\"\npath_prefix = \"{prefix}\"\nupstream = \"api\"\n"
            );
            let Err(ConfigError::Invalid(problems)) = from_toml(&toml) else {
                panic!("{prefix} accepted")
            };
            assert!(
                problems.iter().any(|p| p.field.ends_with(".path_prefix")),
                "{prefix}: {problems:?}"
            );
        }
    }

    #[test]
    fn worker_threads_is_optional_and_bounded() {
        assert_eq!(from_toml(GOOD).unwrap().proxy.worker_threads, None);
        let with = |n: &str| {
            from_toml(&GOOD.replacen("[proxy]", &format!("[proxy]\nworker_threads = {n}"), 1))
        };
        assert_eq!(with("1").unwrap().proxy.worker_threads, Some(1));
        assert_eq!(with("16").unwrap().proxy.worker_threads, Some(16));
        assert!(!from_toml(GOOD).unwrap().proxy.work_stealing);
        let stealing = GOOD.replacen("[proxy]", "[proxy]\nwork_stealing = true", 1);
        assert!(from_toml(&stealing).unwrap().proxy.work_stealing);
        let not_bool = GOOD.replacen("[proxy]", "[proxy]\nwork_stealing = \"sometimes\"", 1);
        assert!(from_toml(&not_bool).is_err());
        assert!(!from_toml(GOOD).unwrap().proxy.transparent_huge_pages);
        let thp = GOOD.replacen("[proxy]", "[proxy]\ntransparent_huge_pages = true", 1);
        assert!(from_toml(&thp).unwrap().proxy.transparent_huge_pages);
        let not_bool = GOOD.replacen(
            "[proxy]",
            "[proxy]\ntransparent_huge_pages = \"sometimes\"",
            1,
        );
        assert!(from_toml(&not_bool).is_err());
        for bad in ["0", "40000"] {
            let Err(ConfigError::Invalid(problems)) = with(bad) else {
                panic!("worker_threads = {bad} accepted")
            };
            assert_eq!(problems[0].field, "proxy.worker_threads");
        }
    }

    #[test]
    fn max_concurrent_streams_defaults_to_100_and_is_bounded() {
        assert_eq!(from_toml(GOOD).unwrap().proxy.max_concurrent_streams, 100);
        let with = |n: &str| {
            from_toml(&GOOD.replacen(
                "[proxy]",
                &format!("[proxy]\nmax_concurrent_streams = {n}"),
                1,
            ))
        };
        for n in [1, 128, 1000] {
            assert_eq!(
                with(&n.to_string()).unwrap().proxy.max_concurrent_streams,
                n
            );
        }
        for bad in ["0", "1001", "200000"] {
            let Err(ConfigError::Invalid(problems)) = with(bad) else {
                panic!("max_concurrent_streams = {bad} accepted")
            };
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].field, "proxy.max_concurrent_streams");
            assert!(problems[0].reason.contains("1 to 1000"), "{problems:?}");
        }
        // Out of u32's range, negative, or not a number: refused while loading.
        for bad in ["-1", "4294967296", "\"many\""] {
            assert!(
                with(bad).is_err(),
                "max_concurrent_streams = {bad} accepted"
            );
        }
    }

    #[test]
    fn max_peek_total_bytes_defaults_to_64_mib_and_holds_every_body_route_peek() {
        assert_eq!(
            from_toml(GOOD).unwrap().proxy.max_peek_total_bytes,
            64 * 1024 * 1024
        );
        let with = |total: usize, peek: Option<usize>| {
            let peek = peek.map_or(String::new(), |n| format!("max_peek_bytes = {n}\n"));
            from_toml(&format!(
                "{}\n[[routes]]\nname = \"form\"\npath_prefix = \"/f\"\nupstream = \"api\"\n\
                 sources = [\"form\"]\n{peek}",
                GOOD.replacen(
                    "[proxy]",
                    &format!("[proxy]\nmax_peek_total_bytes = {total}"),
                    1
                )
            ))
        };
        // The default peek (64 KiB) and one read at the default max_header_bytes (32 KiB).
        assert_eq!(with(98304, None).unwrap().proxy.max_peek_total_bytes, 98304);
        assert!(with(4096 + 32768, Some(4096)).is_ok());
        for (total, peek, shown) in [
            (98303, None, "(65536, the default)"),
            (65536, None, "(65536, the default)"),
            (36863, Some(4096), "(4096)"),
        ] {
            let Err(ConfigError::Invalid(problems)) = with(total, peek) else {
                panic!("max_peek_total_bytes = {total} accepted")
            };
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].field, "proxy.max_peek_total_bytes");
            let reason = &problems[0].reason;
            assert!(reason.contains(".max_peek_bytes "), "{reason}");
            assert!(reason.contains(shown), "{reason}");
        }
        // A JSON source parses a copy of what it keeps: twice the room.
        let json = |total: usize| {
            from_toml(&format!(
                "{}\n[[routes]]\nname = \"json\"\npath_prefix = \"/j\"\nupstream = \"api\"\n\
                 sources = [\"json\"]\n",
                GOOD.replacen(
                    "[proxy]",
                    &format!("[proxy]\nmax_peek_total_bytes = {total}"),
                    1
                )
            ))
        };
        assert!(json(196_608).is_ok());
        let Err(ConfigError::Invalid(problems)) = json(196_607) else {
            panic!("a JSON route's peek fitted in less than twice its room")
        };
        assert!(problems[0].reason.contains("twice"), "{problems:?}");
        // Routes that read no body need no room.
        let c = from_toml(&GOOD.replacen("[proxy]", "[proxy]\nmax_peek_total_bytes = 1024", 1));
        assert_eq!(c.unwrap().proxy.max_peek_total_bytes, 1024);
        let Err(ConfigError::Invalid(problems)) =
            from_toml(&GOOD.replacen("[proxy]", "[proxy]\nmax_peek_total_bytes = 1023", 1))
        else {
            panic!("max_peek_total_bytes = 1023 accepted")
        };
        assert_eq!(problems[0].field, "proxy.max_peek_total_bytes");
    }

    /// `3000000000000000000` passed the check and panicked in `Semaphore::new`.
    #[test]
    fn max_connections_is_bounded() {
        let with = |n: &str| {
            from_toml(&GOOD.replacen("[proxy]", &format!("[proxy]\nmax_connections = {n}"), 1))
        };
        assert_eq!(with("1").unwrap().proxy.max_connections, 1);
        assert_eq!(
            with("1000000").unwrap().proxy.max_connections,
            MAX_MAX_CONNECTIONS
        );
        for bad in ["0", "1000001", "3000000000000000000"] {
            let Err(ConfigError::Invalid(problems)) = with(bad) else {
                panic!("max_connections = {bad} accepted")
            };
            assert_eq!(problems[0].field, "proxy.max_connections", "{problems:?}");
        }
    }

    #[test]
    fn upstream_max_connections_has_a_default_and_is_bounded() {
        let with = |n: &str| {
            from_toml(&GOOD.replacen(
                "[upstreams.api]",
                &format!("[upstreams.api]\nmax_connections = {n}"),
                1,
            ))
        };
        let default = from_toml(GOOD).unwrap();
        assert_eq!(default.upstreams["api"].max_connections, 1024);
        assert_eq!(with("1").unwrap().upstreams["api"].max_connections, 1);
        assert_eq!(
            with("100000").unwrap().upstreams["api"].max_connections,
            MAX_UPSTREAM_CONNECTIONS
        );
        assert_eq!(with("\"64\"").unwrap().upstreams["api"].max_connections, 64);
        for bad in ["0", "100001", "3000000000000000000"] {
            let Err(ConfigError::Invalid(problems)) = with(bad) else {
                panic!("max_connections = {bad} accepted")
            };
            assert_eq!(
                problems[0].field, "upstreams.api.max_connections",
                "{problems:?}"
            );
        }
        for bad in ["-1", "2.5", "1e3", "true", "\"many\""] {
            let err = with(bad).unwrap_err();
            assert!(
                matches!(err, ConfigError::Load(_)) && err.to_string().contains("max_connections"),
                "max_connections = {bad}: {err}"
            );
        }
    }

    #[test]
    fn body_key_settings_have_defaults_and_are_checked() {
        let c = from_toml(&format!(
            "{GOOD}\n[[routes]]\nname = \"form\"\npath_prefix = \"/f\"\nupstream = \"api\"\n\
             sources = [\"bearer\", \"form\"]\nform_fields = [\"clientKey\", \"api_key\"]\n\
             max_peek_bytes = 4096\npeek_timeout = \"2s\"\nstrip_form_field = true\n"
        ))
        .unwrap();
        assert_eq!(c.routes[0].body, BodyKeyConfig::default());
        let b = &c.routes[1].body;
        assert_eq!(
            c.routes[1].sources,
            Some(vec![KeySource::Bearer, KeySource::Form])
        );
        assert_eq!(
            b.fields,
            vec!["clientKey".to_string(), "api_key".to_string()]
        );
        assert_eq!(
            (b.max_peek_bytes, b.peek_timeout, b.strip_form_field),
            (4096, Duration::from_secs(2), true)
        );

        let bad = r#"
            [upstreams.api]
            url = "http://127.0.0.1:9000"
            [[routes]]
            path_prefix = "/a"
            upstream = "api"
            form_fields = ["clientKey"]
            strip_form_field = true
            [[routes]]
            path_prefix = "/b"
            upstream = "api"
            sources = ["form"]
            form_fields = ["", "k", "k"]
            max_peek_bytes = 10
            peek_timeout = "0s"
            [[routes]]
            path_prefix = "/c"
            upstream = "api"
            sources = ["json"]
            form_fields = []
            strip_form_field = true
            keep_credential = true
        "#;
        let Err(ConfigError::Invalid(problems)) = from_toml(bad) else {
            panic!("expected problems")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "routes[0].form_fields",
            "routes[0].strip_form_field",
            "routes[1].form_fields[0]",
            "routes[1].form_fields[2]",
            "routes[1].max_peek_bytes",
            "routes[1].peek_timeout",
            "routes[2].form_fields",
            "routes[2].strip_form_field",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        assert_eq!(
            problems
                .iter()
                .filter(|p| p.field == "routes[2].strip_form_field")
                .count(),
            2,
            "{problems:?}"
        );
    }

    /// `EnvFilter` takes a bare word that is not a level for a target, so these turned every
    /// log line off instead of being refused.
    #[test]
    fn log_level_must_name_a_level() {
        for bad in [
            "warning",
            "verbose",
            "notice",
            "err",
            "info,warning",
            "keygate",
            "keygate=loud",
            // Nothing at all read as `error`: the access log and every warning went silent.
            "",
            " ",
            ",",
            " , ",
        ] {
            let Err(ConfigError::Invalid(problems)) =
                from_toml(&format!("[log]\nlevel = \"{bad}\""))
            else {
                panic!("log.level = {bad:?} accepted")
            };
            assert_eq!(problems[0].field, "log.level", "{bad}: {problems:?}");
        }
        for good in [
            "trace",
            "debug",
            "info",
            "warn",
            "error",
            "off",
            "WARN",
            "info,keygate::access=off",
            "warn, keygate=debug",
            "info,",
            "[request]=debug",
        ] {
            let c = from_toml(&format!("[log]\nlevel = \"{good}\""));
            assert!(c.is_ok(), "log.level = {good:?}: {:?}", c.err());
        }
        // Spaces around a directive would make `EnvFilter` read "info " as a target.
        let c = from_toml("[log]\nlevel = \" warn , keygate=debug \"").unwrap();
        assert_eq!(c.log.level, "warn,keygate=debug");
    }

    /// A host that no request's could equal (ports and trailing dots are removed from
    /// requests' hosts) made a route that never matched.
    #[test]
    fn route_hosts_are_bare_host_names() {
        let with_host = |host: &str| {
            from_toml(&format!(
                "{GOOD}\n[[routes]]\nname = \"h\"\npath_prefix = \"/h\"\nupstream = \"api\"\n\
                 host = \"{host}\"\n"
            ))
        };
        for bad in [
            "",
            "api.example.com:8080",
            "*.example.com",
            "*",
            "a..example.com",
            ".example.com",
            ".",
            "http://api.example.com",
            "api.example.com/x",
            "api example.com",
            "bücher.example",
            "::1",
            "[::1]:8080",
            "[nope]",
        ] {
            let Err(ConfigError::Invalid(problems)) = with_host(bad) else {
                panic!("host = {bad:?} accepted")
            };
            assert_eq!(
                problems
                    .iter()
                    .map(|p| p.field.as_str())
                    .collect::<Vec<_>>(),
                ["routes[1].host"],
                "{bad:?}"
            );
        }
        for (good, matched) in [
            ("API.Example.com", "api.example.com"),
            ("api.example.com.", "api.example.com"),
            ("localhost", "localhost"),
            ("10.0.0.1", "10.0.0.1"),
            ("[::1]", "[::1]"),
            ("[2001:DB8::1]", "[2001:db8::1]"),
            ("my_host-1.internal", "my_host-1.internal"),
        ] {
            let c = with_host(good).unwrap();
            assert_eq!(c.routes[1].host.as_deref(), Some(matched), "{good}");
            // The request side agrees: the route is found for a request to that host.
            let req = http::Request::get("/h")
                .header("host", format!("{good}:8080"))
                .body(())
                .unwrap();
            let host = crate::route::request_host(&req).unwrap();
            assert_eq!(host.as_deref(), Some(matched), "{good}");
        }
    }

    /// config-rs lowercases environment keys, so `KEYGATE__UPSTREAMS__ORDERS__URL` made a
    /// second upstream `orders` beside the file's `Orders`, which no route used: the override
    /// was silently lost.
    #[test]
    fn upstreams_are_lowercase_and_used() {
        let toml = "[upstreams.Orders]\nurl = \"http://127.0.0.1:9000\"\n\
                    [[routes]]\npath_prefix = \"/\"\nupstream = \"Orders\"\n";
        let Err(ConfigError::Invalid(problems)) = from_toml(toml) else {
            panic!("upstream name with capitals accepted")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["upstreams.Orders"], "{problems:?}");
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(
                &GOOD
                    .replace("[upstreams.api]", "[upstreams.API]")
                    .replace("upstream = \"api\"", "upstream = \"API\""),
                config::FileFormat::Toml,
            ))
            .add_source(env_source(
                [(
                    "KEYGATE__UPSTREAMS__API__URL".to_string(),
                    "http://10.0.0.9:9000".to_string(),
                )]
                .into_iter(),
            ))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let Err(ConfigError::Invalid(problems)) = check(raw) else {
            panic!("the override's new upstream accepted")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["upstreams.API", "upstreams.api"], "{problems:?}");

        let unused = format!("{GOOD}\n[upstreams.spare]\nurl = \"http://127.0.0.1:9001\"\n");
        let Err(ConfigError::Invalid(problems)) = from_toml(&unused) else {
            panic!("an upstream no route uses accepted")
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "upstreams.spare");
        assert!(problems[0].reason.contains("no route uses it"));
        let names = GOOD
            .replace("upstreams.api", "upstreams.api_v2-1")
            .replace("upstream = \"api\"", "upstream = \"api_v2-1\"");
        assert!(from_toml(&names).is_ok());
    }

    /// A public route reads no key: settings for reading one were accepted and ignored.
    #[test]
    fn a_public_route_takes_no_key_settings() {
        for setting in [
            "sources = [\"query\"]",
            "form_fields = [\"k\"]",
            "max_peek_bytes = 4096",
            "peek_timeout = \"2s\"",
            "strip_form_field = true",
            "keep_credential = true",
            "scopes = [\"read\"]",
        ] {
            let toml = format!(
                "{GOOD}\n[[routes]]\nname = \"open\"\npath_prefix = \"/open\"\n\
                 upstream = \"api\"\npublic = true\n{setting}\n"
            );
            let Err(ConfigError::Invalid(problems)) = from_toml(&toml) else {
                panic!("{setting} accepted on a public route")
            };
            let field = format!("routes[1].{}", setting.split(' ').next().unwrap());
            let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
            assert_eq!(fields, [field.as_str()], "{setting}");
        }
        let open = format!(
            "{GOOD}\n[[routes]]\nname = \"open\"\npath_prefix = \"/open\"\n\
             upstream = \"api\"\npublic = true\nkeep_credential = false\n\
             strip_form_field = false\n"
        );
        assert!(from_toml(&open).unwrap().routes[1].public);
    }

    /// A control character in the realm made every challenge an invalid header value, so
    /// 401s went out without WWW-Authenticate.
    /// A key header keygate strips, sets or reads for something else found no key, ever.
    #[test]
    fn the_key_header_is_not_one_keygate_uses() {
        for name in [
            "x-keygate-key-id",
            "X-Keygate-Scopes",
            "x_keygate_team_id",
            "host",
            "cookie",
            "content-type",
            "content-length",
            "connection",
            "keep-alive",
            "te",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-port",
            "x-real-ip",
            "true-client-ip",
            "x-http-method-override",
            "x-original-url",
            "x-request-id",
            "authorization",
        ] {
            let toml = format!("{GOOD}\n[auth]\nheader_name = \"{name}\"\n");
            let Err(ConfigError::Invalid(problems)) = from_toml(&toml) else {
                panic!("header_name = {name} accepted")
            };
            assert!(
                problems.iter().any(|p| p.field == "auth.header_name"),
                "{name}: {problems:?}"
            );
        }
        for name in [
            "x-api-key",
            "X-Client-Key",
            "api_key",
            "apikey",
            "x-keygate",
        ] {
            let toml = format!("{GOOD}\n[auth]\nheader_name = \"{name}\"\n");
            let c = from_toml(&toml);
            assert!(c.is_ok(), "{name}: {:?}", c.err());
        }
    }

    #[test]
    fn the_realm_must_fit_in_a_header() {
        for bad in ["a\\nb", "a\\tb", "a\\u007fb", "a\\\"b", "a\\\\b"] {
            let Err(ConfigError::Invalid(problems)) =
                from_toml(&format!("[auth]\nrealm = \"{bad}\""))
            else {
                panic!("realm {bad:?} accepted")
            };
            assert_eq!(problems[0].field, "auth.realm", "{bad}");
        }
        let c = from_toml("[auth]\nrealm = \"Zürich API v2\"").unwrap();
        assert_eq!(c.auth.realm, "Zürich API v2");
    }

    /// Credentials in an upstream URL are never sent: refused, and never echoed.
    #[test]
    fn upstream_urls_carry_no_credentials() {
        for url in [
            "http://user:hunter2@api:8080",
            "http://hunter2@api",
            "http://:hunter2@api:1",
        ] {
            let toml = GOOD.replace("http://127.0.0.1:9000", url);
            let Err(ConfigError::Invalid(problems)) = from_toml(&toml) else {
                panic!("{url} accepted")
            };
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].field, "upstreams.api.url");
            assert!(!problems[0].to_string().contains("hunter2"), "{problems:?}");
        }
        let toml = GOOD.replace("http://127.0.0.1:9000", "http://u:hunter2@ bad");
        let Err(ConfigError::Invalid(problems)) = from_toml(&toml) else {
            panic!("a bad URL accepted")
        };
        assert!(!problems[0].to_string().contains("hunter2"), "{problems:?}");
    }

    /// `http://127.0.0.1:80800` passed and its traffic went to port 80; `http://:8080` (no host)
    /// passed too.
    #[test]
    fn upstream_urls_need_a_host_and_a_real_port() {
        for url in [
            "http://127.0.0.1:80800",
            "http://127.0.0.1:65536",
            "http://127.0.0.1:0",
            "http://api:",
            "http://:8080",
            "https://:443",
            "http://[::1]:99999",
        ] {
            let toml = GOOD.replace("http://127.0.0.1:9000", url);
            let Err(ConfigError::Invalid(problems)) = from_toml(&toml) else {
                panic!("{url} accepted")
            };
            assert!(
                problems.iter().any(|p| p.field == "upstreams.api.url"),
                "{url}: {problems:?}"
            );
        }
        for url in [
            "http://127.0.0.1:65535",
            "http://127.0.0.1:1",
            "http://api",
            "http://[::1]:8080",
            "http://[::1]",
        ] {
            let toml = GOOD.replace("http://127.0.0.1:9000", url);
            assert!(from_toml(&toml).is_ok(), "{url} refused");
        }
    }

    /// config-rs rounded a float into an integer field (`team_key_limit = -1.0` became 0, no
    /// limit) and took a number for a bool; each is now refused, naming its key.
    #[test]
    fn numbers_and_booleans_are_taken_as_written() {
        for (text, key) in [
            ("[admin]\nteam_key_limit = -1.0", "team_key_limit"),
            ("[admin]\nteam_key_limit = 2.5", "team_key_limit"),
            ("[admin]\nteam_key_limit = -1", "team_key_limit"),
            ("[admin]\nteam_key_limit = 4294967296", "team_key_limit"),
            ("[admin]\nteam_key_limit = true", "team_key_limit"),
            ("[proxy]\nmax_connections = 1e4", "max_connections"),
            ("[proxy]\nworker_threads = 2.0", "worker_threads"),
            ("[cache]\nmax_entries = \"lots\"", "max_entries"),
            ("[usage]\nenabled = 0", "enabled"),
            ("[proxy]\nwork_stealing = 1.0", "work_stealing"),
            ("[admin]\nenabled = \"maybe\"", "enabled"),
            (
                "[[routes]]\npath_prefix = \"/\"\nupstream = \"u\"\nmax_body_bytes = 1.5",
                "max_body_bytes",
            ),
            (
                "[[routes]]\npath_prefix = \"/\"\nupstream = \"u\"\npublic = 1",
                "public",
            ),
        ] {
            let err = from_toml(text).unwrap_err();
            assert!(
                matches!(err, ConfigError::Load(_)) && err.to_string().contains(key),
                "{text}: {err}"
            );
        }
        let c = from_toml(
            "[admin]\nteam_key_limit = 7\nenabled = false\n[proxy]\nworker_threads = 2\n\
             max_connections = \"300\"\n[usage]\nenabled = \"off\"",
        )
        .unwrap();
        assert_eq!(c.admin.team_key_limit, 7);
        assert!(!c.admin.enabled && !c.usage.enabled);
        assert_eq!(c.proxy.worker_threads, Some(2));
        assert_eq!(c.proxy.max_connections, 300);
    }

    #[test]
    fn unknown_field_is_refused() {
        let err = from_toml("[proxy]\nlisten_on = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listen_on"), "{err}");
    }

    #[test]
    fn durations_are_human() {
        let c = from_toml("[cache]\nttl = \"2m\"\nstale_for = \"1h 30m\"").unwrap();
        assert_eq!(c.cache.ttl, Duration::from_secs(120));
        assert_eq!(c.cache.stale_for, Duration::from_secs(5400));
    }

    #[test]
    fn durations_out_of_bounds_are_refused_naming_their_key() {
        assert_eq!(
            from_toml("[cache]\nttl = \"10years\"").unwrap().cache.ttl,
            duration::MAX
        );
        for (section, key) in [
            ("proxy", "header_read_timeout"),
            ("proxy", "send_timeout"),
            ("cache", "ttl"),
            ("store", "timeout"),
            ("admin", "reveal_window"),
            ("upstreams.up", "body_idle_timeout"),
        ] {
            for value in ["10years 1s", "500000000000years"] {
                let err = from_toml(&format!("[{section}]\n{key} = \"{value}\"")).unwrap_err();
                let text = err.to_string();
                assert!(
                    matches!(err, ConfigError::Load(_)) && text.contains(key),
                    "{section}.{key} = {value}: {text}"
                );
            }
        }
        let route =
            "[[routes]]\npath_prefix = \"/\"\nupstream = \"up\"\npeek_timeout = \"11years\"";
        let err = from_toml(route).unwrap_err().to_string();
        assert!(
            err.contains("peek_timeout") && err.contains("10years"),
            "{err}"
        );
        for (text, field) in [
            ("[proxy]\nsend_timeout = \"50ms\"", "proxy.send_timeout"),
            (
                "[upstreams.up]\nurl = \"http://127.0.0.1:1\"\nbody_idle_timeout = \"50ms\"",
                "upstreams.up.body_idle_timeout",
            ),
        ] {
            let err = from_toml(text).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("at least 100ms"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_zero_pool_idle_timeout_is_refused_pointing_at_pool_max_idle_per_host() {
        let with = |setting: &str| {
            from_toml(&format!(
                "[upstreams.up]\nurl = \"http://127.0.0.1:1\"\n{setting}\n\
                 [[routes]]\npath_prefix = \"/\"\nupstream = \"up\"\n"
            ))
        };
        let err = with("pool_idle_timeout = \"0s\"").unwrap_err().to_string();
        assert!(
            err.contains("upstreams.up.pool_idle_timeout")
                && err.contains("more than zero")
                && err.contains("pool_max_idle_per_host = 0"),
            "{err}"
        );
        // The documented way to keep no idle connections, and a short timeout, pass.
        let off = with("pool_max_idle_per_host = 0").unwrap();
        assert_eq!(off.upstreams["up"].pool_max_idle_per_host, 0);
        let short = with("pool_idle_timeout = \"1ms\"").unwrap();
        assert_eq!(
            short.upstreams["up"].pool_idle_timeout,
            Duration::from_millis(1)
        );
    }

    #[test]
    fn redis_single_or_cluster_by_configuration() {
        let single = from_toml(&format!("{GOOD}\n[store]\nkind = \"redis\"")).unwrap();
        match single.store {
            StoreConfig::Redis { target, .. } => {
                assert_eq!(target, RedisTarget::Single(DEFAULT_REDIS_URL.into()));
            }
            other => panic!("{other:?}"),
        }
        let nodes = "redis_cluster_nodes = [\"redis://a:6379\", \"redis://b:6379\"]";
        let cluster = from_toml(&format!("{GOOD}\n[store]\nkind = \"redis\"\n{nodes}")).unwrap();
        match cluster.store {
            StoreConfig::Redis { target, .. } => assert_eq!(
                target,
                RedisTarget::Cluster(vec!["redis://a:6379".into(), "redis://b:6379".into()])
            ),
            other => panic!("{other:?}"),
        }
        let bad = "\n[store]\nkind = \"redis\"\nredis_url = \"redis://x:1\"\n\
                   redis_cluster_nodes = [\"redis://a:6379\", \"unix:///tmp/r.sock\"]";
        let Err(ConfigError::Invalid(problems)) = from_toml(&format!("{GOOD}{bad}")) else {
            panic!("expected problems")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["store.redis_cluster_nodes", "store.redis_cluster_nodes[1]"]
        );
    }

    /// `KEYGATE__STORE__REDIS_URL` without `KEYGATE__STORE__KIND=redis` used to run every
    /// replica on a SQLite file of its own (the kind defaults to embedded).
    #[test]
    fn redis_settings_are_refused_when_the_store_is_embedded() {
        let Err(ConfigError::Invalid(problems)) =
            from_toml("[store]\nredis_url = \"redis://r:6379/0\"")
        else {
            panic!("a Redis URL for the embedded store accepted")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["store.redis_url"], "{problems:?}");
        assert!(problems[0].reason.contains("store.kind"), "{problems:?}");
        assert!(!problems[0].reason.contains("r:6379"), "{problems:?}");
        let all = "[store]\nkind = \"embedded\"\nredis_cluster_nodes = [\"redis://a:1\"]\n\
                   namespace = \"x\"\ntimeout = \"1s\"";
        let Err(ConfigError::Invalid(problems)) = from_toml(all) else {
            panic!("Redis settings for the embedded store accepted")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "store.redis_cluster_nodes",
                "store.namespace",
                "store.timeout"
            ]
        );
        // Unset, they keep their defaults for the Redis store, and an empty list is no setting.
        let c = from_toml("[store]\nredis_cluster_nodes = []").unwrap();
        assert!(matches!(c.store, StoreConfig::Embedded { .. }));
        match from_toml("[store]\nkind = \"redis\"").unwrap().store {
            StoreConfig::Redis {
                namespace, timeout, ..
            } => assert_eq!(
                (namespace.as_str(), timeout),
                ("kg", Duration::from_millis(500))
            ),
            other => panic!("{other:?}"),
        }
    }

    /// `check-config` only looked at the scheme, so `redis://r:6379/prod` passed and `serve`
    /// failed later without naming the field. Never the URL in the message (a password).
    #[test]
    fn redis_urls_are_parsed_as_the_store_parses_them() {
        let store = |lines: &str| from_toml(&format!("{GOOD}\n[store]\nkind = \"redis\"\n{lines}"));
        for url in [
            "redis://:hunter2@r:6379/prod",
            "redis://:hunter2@r:6379/0?protocol=9",
            "redis://:hunter2@0.0.0.0:6379",
            "redis://",
        ] {
            let Err(ConfigError::Invalid(problems)) = store(&format!("redis_url = \"{url}\""))
            else {
                panic!("{url} accepted")
            };
            assert_eq!(problems.len(), 1, "{url}: {problems:?}");
            assert_eq!(problems[0].field, "store.redis_url", "{url}");
            let text = problems[0].to_string();
            assert!(
                !text.contains("hunter2") && !text.contains("r:6379"),
                "{text}"
            );
        }
        for url in [
            "redis://:pw@r:6379/3",
            "redis://user:pw@r",
            "unix:///run/redis.sock",
            "redis+unix:///run/redis.sock?db=2",
        ] {
            assert!(store(&format!("redis_url = \"{url}\"")).is_ok(), "{url}");
        }
        let Err(ConfigError::Invalid(problems)) =
            store("redis_cluster_nodes = [\"redis://a:6379\", \"redis://:hunter2@b:6379/x\"]")
        else {
            panic!("a bad cluster node accepted")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["store.redis_cluster_nodes[1]"]);
        assert!(!problems[0].to_string().contains("hunter2"));
        let Err(ConfigError::Invalid(problems)) =
            store("redis_cluster_nodes = [\"redis://:one@a:6379\", \"redis://:two@b:6379\"]")
        else {
            panic!("nodes with different passwords accepted")
        };
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["store.redis_cluster_nodes"]);
        assert!(!problems[0].to_string().contains("one@"));
    }

    /// A cluster node with a database (`/3`) passed, and every connection's SELECT was then
    /// refused by the cluster: 503 for as long as the gateway ran.
    #[test]
    fn a_cluster_node_names_no_database_but_0() {
        let store = |lines: &str| from_toml(&format!("{GOOD}\n[store]\nkind = \"redis\"\n{lines}"));
        for nodes in [
            r#"["redis://127.0.0.1:27379/3"]"#,
            r#"["redis://a:6379", "redis://:pw@b:6379/1"]"#,
        ] {
            let Err(ConfigError::Invalid(problems)) =
                store(&format!("redis_cluster_nodes = {nodes}"))
            else {
                panic!("{nodes} accepted")
            };
            assert!(
                problems
                    .iter()
                    .any(|p| p.field.starts_with("store.redis_cluster_nodes[")
                        && p.reason.contains("only database 0")),
                "{nodes}: {problems:?}"
            );
        }
        for nodes in [
            r#"["redis://127.0.0.1:27379"]"#,
            r#"["redis://127.0.0.1:27379/0", "redis://b:6379/"]"#,
        ] {
            assert!(
                store(&format!("redis_cluster_nodes = {nodes}")).is_ok(),
                "{nodes}"
            );
        }
        // One server may use any database.
        assert!(store("redis_url = \"redis://127.0.0.1:6379/3\"").is_ok());
    }

    #[test]
    fn environment_overrides_file() {
        let vars = vec![
            ("KEYGATE__STORE__KIND".to_string(), "redis".to_string()),
            (
                "KEYGATE__STORE__REDIS_URL".to_string(),
                "redis://10.1.1.1:6380".to_string(),
            ),
            (
                "KEYGATE__PROXY__TRUSTED_PROXIES".to_string(),
                "10.0.0.0/8,192.168.0.0/16".to_string(),
            ),
            ("UNRELATED".to_string(), "x".to_string()),
            // Strings keep their text (config-rs's `try_parsing` made these "7", "7", "1.5"),
            // and numbers, booleans and durations are still read from theirs.
            ("KEYGATE__STORE__NAMESPACE".to_string(), "007".to_string()),
            ("KEYGATE__AUTH__KEY_PREFIX".to_string(), "007".to_string()),
            ("KEYGATE__AUTH__REALM".to_string(), "1.50".to_string()),
            (
                "KEYGATE__PROXY__MAX_CONNECTIONS".to_string(),
                "5000".to_string(),
            ),
            (
                "KEYGATE__PROXY__WORKER_THREADS".to_string(),
                "3".to_string(),
            ),
            ("KEYGATE__USAGE__ENABLED".to_string(), "false".to_string()),
            (
                "KEYGATE__AUTH__REVEAL_REFUSAL_REASON".to_string(),
                "TRUE".to_string(),
            ),
            ("KEYGATE__CACHE__TTL".to_string(), "2m".to_string()),
            (
                "KEYGATE__AUTH__SOURCES".to_string(),
                " query, bearer ,".to_string(),
            ),
            ("KEYGATE__PROXY__DENY_IPS".to_string(), "".to_string()),
        ];
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(GOOD, config::FileFormat::Toml))
            .add_source(env_source(vars.into_iter()))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        let c = check(raw).unwrap();
        match c.store {
            StoreConfig::Redis {
                target, namespace, ..
            } => {
                assert_eq!(target, RedisTarget::Single("redis://10.1.1.1:6380".into()));
                assert_eq!(namespace, "007");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.proxy.trusted_proxies.len(), 2);
        assert_eq!(c.auth.key_prefix.as_str(), "007");
        assert_eq!(c.auth.realm, "1.50");
        assert_eq!(c.proxy.max_connections, 5000);
        assert_eq!(c.proxy.worker_threads, Some(3));
        assert!(!c.usage.enabled);
        assert!(c.auth.reveal_refusal_reason);
        assert_eq!(c.cache.ttl, Duration::from_secs(120));
        assert_eq!(c.auth.sources, [KeySource::Query, KeySource::Bearer]);
        assert!(c.proxy.deny_ips.is_empty());
    }

    /// Variables other than `KEYGATE__*` are never read as text; a `KEYGATE__*` one that is
    /// not UTF-8 is an error naming it.
    #[cfg(unix)]
    #[test]
    fn only_keygate_variables_need_to_be_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let bytes = |b: &[u8]| OsString::from_vec(b.to_vec());
        let vars = vec![
            (bytes(b"OLDPWD"), bytes(b"/tmp/\xff")),
            (bytes(b"\xffODD"), bytes(b"x")),
            (bytes(b"KEYGATE__LOG__LEVEL"), bytes(b"warn")),
        ];
        assert_eq!(
            keygate_vars(vars.into_iter()).unwrap(),
            [("KEYGATE__LOG__LEVEL".to_string(), "warn".to_string())]
        );
        let vars = vec![(bytes(b"KEYGATE__STORE__PATH"), bytes(b"/data/\xff.db"))];
        match keygate_vars(vars.into_iter()) {
            Err(e @ ConfigError::EnvNotUnicode(_)) => {
                assert!(e.to_string().contains("KEYGATE__STORE__PATH"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cidr_forms() {
        assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_cidr("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert_eq!(
            parse_cidr(" 2001:db8::/32 ").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("example.com").is_err());
        assert!(parse_cidr("").is_err());
        // IPv4-mapped forms are their IPv4 networks: clients' mapped addresses are IPv4.
        for (mapped, v4) in [
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("::ffff:1.2.3.4", "1.2.3.4/32"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
        ] {
            assert_eq!(parse_cidr(mapped).unwrap().to_string(), v4, "{mapped}");
        }
        let client = crate::client_ip::canonical("::ffff:10.1.2.3".parse().unwrap());
        assert!(parse_cidr("::ffff:10.0.0.0/104").unwrap().contains(&client));
        assert_eq!(
            parse_cidr("::ffff:0:0/95").unwrap().to_string(),
            "::fffe:0:0/95"
        );
    }

    proptest! {
        #[test]
        fn cidr_parser_never_panics(s in ".{0,60}") {
            let _ = parse_cidr(&s);
        }

        #[test]
        fn cidr_round_trips(a: u8, b: u8, c: u8, d: u8, len in 0u8..=32) {
            let text = format!("{a}.{b}.{c}.{d}/{len}");
            let net = parse_cidr(&text).unwrap();
            prop_assert_eq!(net.prefix_len(), len);
            let ip: IpAddr = format!("{a}.{b}.{c}.{d}").parse().unwrap();
            prop_assert!(net.contains(&ip));
        }

        #[test]
        fn a_duration_is_accepted_only_up_to_ten_years(secs: u64) {
            let parsed = from_toml(&format!("[proxy]\nsend_timeout = \"{secs}s\""));
            match parsed {
                Ok(c) => prop_assert!(c.proxy.send_timeout <= duration::MAX),
                Err(e) => prop_assert!(
                    secs == 0 || Duration::from_secs(secs) > duration::MAX,
                    "{secs}s refused: {e}"
                ),
            }
        }

        /// A string from the environment is the text that was written (config-rs's
        /// `try_parsing` made `007` 7 and `1.50` 1.5).
        #[test]
        fn an_environment_string_keeps_its_text(
            text in "[0-9][0-9.]{0,6}|[ -~]{1,16}",
        ) {
            prop_assume!(!text.contains(['"', '\\']));
            let raw: RawConfig = config::Config::builder()
                .add_source(env_source(
                    [("KEYGATE__AUTH__REALM".to_string(), text.clone())].into_iter(),
                ))
                .build()
                .unwrap()
                .try_deserialize()
                .unwrap();
            prop_assert_eq!(check(raw).unwrap().auth.realm, text);
        }

        /// A route host that is accepted is what a request naming that host, with or without
        /// a port, is matched as; nothing panics.
        #[test]
        fn accepted_route_hosts_match_their_requests(
            host in "[a-zA-Z0-9._:*\\[\\]-]{0,16}",
            port in proptest::option::of(1u16..),
        ) {
            if let Ok(matched) = route_host(&host) {
                let authority = match port {
                    Some(port) => format!("{host}:{port}"),
                    None => host.clone(),
                };
                let req = http::Request::get("/").header("host", authority).body(());
                prop_assume!(req.is_ok());
                let found = crate::route::request_host(&req.unwrap());
                prop_assert_eq!(found, Ok(Some(matched)), "{}", host);
            }
        }

        #[test]
        fn config_parser_never_panics(s in "(\\[[a-z]{1,8}\\]\n)?([a-z_]{1,12} = (\"[ -~]{0,12}\"|[0-9]{1,4}|true)\n){0,4}") {
            let _ = from_toml(&s);
        }
    }
}
