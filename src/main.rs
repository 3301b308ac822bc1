//! The `keygate` command: `serve`, `check-config`, `keys …`. Parsing and printing only; the
//! work is in the library.

use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use keygate::auth::record::KeyType;
use keygate::config::{self, Config, StoreConfig};
use keygate::keys::{Actor, CreateKey, KeyRules, KeyService};
use keygate::store::{KeyFilter, Page};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::net::TcpListener;

/// `println!` for what a command prints. A reader that went away (`keygate check-config
/// f.toml | true`) ends the command quietly, its work done: `println!` panicked, exit 101 with
/// a backtrace. Not SIGPIPE's default action instead: it would end the process on any closed
/// pipe or socket it writes, a Redis unix socket included (std sends on TCP with
/// `MSG_NOSIGNAL`, but writes unix sockets plainly).
macro_rules! say {
    () => {
        print_line(format_args!(""), OnClosed::Exit)
    };
    ($($arg:tt)*) => {
        print_line(format_args!($($arg)*), OnClosed::Exit)
    };
}

/// `println!` for a server's start lines (`serve`, `echo`): a reader that went away stops
/// nothing, the server goes on (its logs are on stderr).
macro_rules! announce {
    () => {
        print_line(format_args!(""), OnClosed::Continue)
    };
    ($($arg:tt)*) => {
        print_line(format_args!($($arg)*), OnClosed::Continue)
    };
}

#[derive(Clone, Copy, PartialEq)]
enum OnClosed {
    Exit,
    Continue,
    /// The line is a key shown only once: a reader that went away never saw it, and the
    /// command fails saying so (review: `keys create | …` exited 0 with the value lost).
    Fail,
}

fn print_line(line: std::fmt::Arguments<'_>, on_closed: OnClosed) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(_) if on_closed == OnClosed::Continue => {}
        Err(e) if on_closed == OnClosed::Fail => {
            eprintln!(
                "keygate: the key could not be written to stdout ({e}), and it is shown only \
                 once: rotate the key to get a value"
            );
            std::process::exit(1);
        }
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("keygate: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

#[derive(Parser)]
#[command(name = "keygate", version, about = "API-key authentication gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Check a configuration file (and the KEYGATE__* environment) without serving.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Manage keys directly in the configured store.
    Keys {
        /// Configuration file naming the store (default: built-in defaults + environment).
        #[arg(long, short, env = "KEYGATE_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage team membership directly in the configured store.
    Teams {
        /// Configuration file naming the store (default: built-in defaults + environment).
        #[arg(long, short, env = "KEYGATE_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: TeamsCommand,
    },
    /// Run only the echo upstream (for trying things out and for load tests).
    #[command(hide = true)]
    Echo {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (TOML). Every value can be overridden by KEYGATE__SECTION__FIELD.
    #[arg(long, short, env = "KEYGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Try-it-out mode: temporary embedded store, built-in echo upstream when no route is
    /// configured, and a fresh key printed with a ready curl line.
    #[arg(long)]
    dev: bool,
    /// Overrides `proxy.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `admin.listen`.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it (the only time it is shown).
    Create {
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Comma-separated scope names.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// An address or CIDR block the key may be used from; repeat for several.
        #[arg(long = "allow-ip")]
        allow_ip: Vec<String>,
        /// Lifetime, e.g. 30d, 12h; absent: permanent.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        #[arg(long = "type", default_value = "shared")]
        key_type: KeyType,
        /// The user a `user` key acts for.
        #[arg(long)]
        user: Option<String>,
        /// Create the key disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List keys (never their values).
    List {
        #[arg(long)]
        team: Option<String>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Disable a key (it can be enabled again).
    Disable { id: String },
    /// Enable a disabled key.
    Enable { id: String },
    /// Delete a key for good.
    Revoke { id: String },
    /// Give a key a new value; the old one keeps working for the grace period.
    Rotate {
        id: String,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        grace: Duration,
    },
}

#[derive(Subcommand)]
enum TeamsCommand {
    /// Add a member (or change their role).
    AddMember {
        team: String,
        user: String,
        #[arg(long, default_value = "member", value_parser = parse_role)]
        role: keygate::store::Role,
    },
    /// Remove a member: their user keys are disabled, shared keys fall back to an owner/admin.
    RemoveMember { team: String, user: String },
    /// List a team's members.
    Members { team: String },
}

fn parse_role(s: &str) -> Result<keygate::store::Role, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?} is not a role (owner, admin, member)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env_threads = match tokio_worker_threads() {
        Ok(n) => n,
        Err(message) => {
            eprintln!("keygate: {message}");
            return ExitCode::FAILURE;
        }
    };
    // `serve` reads its configuration first: the runtime's shape is part of it.
    let (runtime, serve_config) = match &cli.command {
        Command::Serve(args) => match load_config(args.config.as_deref()) {
            Ok(mut cfg) => {
                // Before the runtime, the log queue and the caches allocate: the setting only
                // governs pages faulted in after it (memory.rs says why off is the default).
                let huge_pages =
                    keygate::memory::set_transparent_huge_pages(cfg.proxy.transparent_huge_pages);
                let threads = worker_threads(cfg.proxy.worker_threads, env_threads);
                cfg.proxy.worker_threads = Some(threads);
                (
                    server_runtime(threads, cfg.proxy.work_stealing),
                    Some((cfg, huge_pages)),
                )
            }
            Err(message) => {
                eprintln!("keygate: {message}");
                return ExitCode::FAILURE;
            }
        },
        // The thread count given, so that tokio never reads `TOKIO_WORKER_THREADS` itself.
        _ => (
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(env_threads.unwrap_or_else(available_cpus))
                .enable_all()
                .build(),
            None,
        ),
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keygate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Dropping it writes out the lines still queued: held until the runtime is gone, for the
    // requests a drain cut off are dropped with it and log then.
    let log_writer = serve_config
        .as_ref()
        .map(|(cfg, _)| keygate::telemetry::init_logging(&cfg.log));
    if matches!(cli.command, Command::Keys { .. } | Command::Teams { .. }) {
        keygate::telemetry::init_cli_logging();
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => match serve_config {
                Some((cfg, huge_pages)) => serve(args, cfg, huge_pages).await,
                None => Err("configuration not loaded".into()),
            },
            Command::CheckConfig { file } => check_config(&file),
            Command::Keys { config, command } => keys(config, command).await,
            Command::Teams { config, command } => teams(config, command).await,
            Command::Echo { listen } => echo(listen).await,
        }
    });
    drop(runtime);
    drop(log_writer);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("keygate: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config, String> {
    config::load(path).map_err(|e| e.to_string())
}

/// Refuses what `serve` refuses (without `--dev`): `serve_checks` is the same call.
fn check_config(file: &std::path::Path) -> Result<(), String> {
    let cfg = load_config(Some(file))?;
    let checked = serve_checks(&cfg, false)?;
    for warning in &checked.warnings {
        eprintln!("keygate: warning: {warning}");
    }
    say!(
        "{}: ok ({} route(s), {} upstream(s), {} store)",
        file.display(),
        cfg.routes.len(),
        cfg.upstreams.len(),
        match cfg.store {
            StoreConfig::Embedded { .. } => "embedded",
            StoreConfig::Redis { .. } => "redis",
        }
    );
    Ok(())
}

/// What `serve` needs of a configuration beyond [`config::load`]'s checks.
struct ServeChecks {
    /// The bootstrap admin token, from `admin.bootstrap_token_env`.
    bootstrap: Option<String>,
    /// What serving can go on with but the operator should hear of.
    warnings: Vec<String>,
}

/// The checks `serve` makes before it opens anything, and `check-config` makes too, so that
/// it never says ok to what `serve` refuses: routes (`--dev` brings its own) and the bootstrap
/// token. `dev`: `serve --dev`.
fn serve_checks(cfg: &Config, dev: bool) -> Result<ServeChecks, String> {
    if !dev && cfg.routes.is_empty() {
        return Err(
            "no routes configured: pass --config FILE (examples in config/) or try --dev".into(),
        );
    }
    let bootstrap = bootstrap_token(cfg)?;
    let mut warnings = Vec::new();
    if !dev && cfg.admin.enabled && bootstrap.is_none() {
        warnings.push(format!(
            "{} (admin.bootstrap_token_env) is not set: the admin API has no bootstrap token \
             and takes only keys with the api_keys_read/api_keys_write scopes (keygate keys \
             create --scopes api_keys_write)",
            cfg.admin.bootstrap_token_env
        ));
    }
    // Whole, or in pieces (`0.0.0.0/1` and `128.0.0.0/1`: review).
    let trusted = ipnet::IpNet::aggregate(&cfg.proxy.trusted_proxies);
    if let Some(everyone) = trusted.iter().find(|n| n.prefix_len() == 0) {
        warnings.push(format!(
            "proxy.trusted_proxies covers {everyone}: every client is a trusted proxy, so any \
             client chooses its own address with X-Forwarded-For, past proxy.allow_ips, \
             proxy.deny_ips and keys' allow_ips; list only your proxies' addresses"
        ));
    }
    Ok(ServeChecks {
        bootstrap,
        warnings,
    })
}

/// `--listen` and `--admin-listen`, checked as the file's settings are: an address clash is an
/// error naming both (it used to surface only as a failed bind), and `--admin-listen` with the
/// admin API disabled is refused rather than ignored.
fn listen_overrides(
    cfg: &mut Config,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
) -> Result<(), String> {
    if admin_listen.is_some() && !cfg.admin.enabled {
        return Err(
            "--admin-listen: the admin API is disabled (admin.enabled = false); enable it or \
             leave --admin-listen out"
                .into(),
        );
    }
    if let Some(listen) = listen {
        cfg.proxy.listen = listen;
    }
    if let Some(listen) = admin_listen {
        cfg.admin.listen = listen;
    }
    if (listen.is_some() || admin_listen.is_some())
        && cfg.admin.enabled
        && config::same_port(cfg.proxy.listen, cfg.admin.listen)
    {
        let name = |flag: bool, arg: &str, field: &str| {
            if flag {
                arg.to_owned()
            } else {
                field.to_owned()
            }
        };
        return Err(format!(
            "{} ({}) clashes with {} ({}): the proxy and the admin listener need ports of \
             their own",
            name(admin_listen.is_some(), "--admin-listen", "admin.listen"),
            cfg.admin.listen,
            name(listen.is_some(), "--listen", "proxy.listen"),
            cfg.proxy.listen,
        ));
    }
    Ok(())
}

/// `proxy.worker_threads`; unset: `TOKIO_WORKER_THREADS`, else one per CPU the process may
/// use (at most [`config::MAX_WORKER_THREADS`]).
fn worker_threads(configured: Option<usize>, env_threads: Option<usize>) -> usize {
    configured
        .or(env_threads)
        .unwrap_or_else(available_cpus)
        .clamp(1, config::MAX_WORKER_THREADS)
}

fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(config::MAX_WORKER_THREADS)
}

/// `TOKIO_WORKER_THREADS`, read once, here, for every runtime `main` builds. tokio's own
/// reading of it panics on a value that is not a number or is 0 (`check-config`, `keys`,
/// `teams` and `echo` did), and `serve` used to drop an unparsable value and clamp the others
/// without a word.
fn tokio_worker_threads() -> Result<Option<usize>, String> {
    const NAME: &str = "TOKIO_WORKER_THREADS";
    let max = config::MAX_WORKER_THREADS;
    match std::env::var(NAME) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{NAME}: not valid UTF-8")),
        Ok(value) => match value.trim().parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "{NAME}={value:?}: must be a number of threads from 1 to {max}"
            )),
        },
    }
}

/// The single-threaded scheduler, unless `work_stealing` asks for one pool of `threads`: no
/// work stealing, no cross-thread wake-ups, measurably less CPU per request
/// (docs/benchmarks.md). With more than one thread, `app::run` starts the others, each with
/// its own scheduler, on the same listening socket.
fn server_runtime(threads: usize, work_stealing: bool) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 || !work_stealing {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// `huge_pages`: how setting the process's transparent huge pages went (`main` does it before
/// anything else allocates, logging included, so this logs a failure).
async fn serve(
    args: ServeArgs,
    mut cfg: Config,
    huge_pages: std::io::Result<()>,
) -> Result<(), String> {
    listen_overrides(&mut cfg, args.listen, args.admin_listen)?;
    let checked = serve_checks(&cfg, args.dev)?;
    for warning in &checked.warnings {
        tracing::warn!("{warning}");
    }
    let mut bootstrap = checked.bootstrap;
    // A token from the environment is the operator's secret: dev mode prints only one it made.
    let token_from_env = bootstrap.is_some();
    if args.dev && bootstrap.is_none() && cfg.admin.enabled {
        bootstrap = Some(
            keygate::auth::key::NewKey::generate(
                &cfg.auth.key_prefix,
                keygate::auth::key::SlotTag::random(),
            )
            .expose()
            .to_owned(),
        );
    }
    if let Err(e) = huge_pages {
        tracing::warn!(
            error = %e,
            wanted = cfg.proxy.transparent_huge_pages,
            "cannot set transparent huge pages for the process; the system's policy applies"
        );
    }

    catch_hangup(cfg.proxy.tls.is_some() || (cfg.admin.enabled && cfg.admin.tls.is_some()));

    // Dev mode keeps its temporary directory alive for the whole run.
    let mut _dev_dir = None;
    let mut dev_banner = None;
    if args.dev {
        let dir =
            tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        cfg.store = StoreConfig::Embedded {
            path: dir.path().join("keygate.db"),
        };
        _dev_dir = Some(dir);
        if cfg.routes.is_empty() {
            let echo = TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| format!("cannot start the echo upstream: {e}"))?;
            let echo_addr =
                keygate::dev::spawn_echo(echo).map_err(|e| format!("echo upstream: {e}"))?;
            cfg = with_echo_route(&cfg, echo_addr)?;
            dev_banner = Some(format!("echo upstream on http://{echo_addr}"));
        }
    }

    log_store(&cfg.store);
    let store = keygate::app::open_store(&cfg.store)
        .await
        .map_err(|e| format!("cannot open the key store: {e}"))?;
    // Before the ports are announced: a refusal stops start-up (see `check_store_access`).
    let late_refusal = keygate::app::check_store_access(&store)
        .await
        .map_err(|why| format!("cannot start: {why}"))?;
    let listener = TcpListener::bind(cfg.proxy.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.proxy.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    // Before the start lines: a certificate that does not load stops start-up, and SIGHUP
    // (certificate reload) is caught from the moment a client could see the address.
    let proxy_tls = start_tls("proxy", cfg.proxy.tls.as_ref())?;
    let admin_tls = if cfg.admin.enabled {
        start_tls("admin", cfg.admin.tls.as_ref())?
    } else {
        None
    };
    let scheme = |tls: &Option<keygate::server::TlsAcceptor>| {
        if tls.is_some() { "https" } else { "http" }
    };
    let proxy_scheme = scheme(&proxy_tls);
    // Both bound before either line: a tool that saw the proxy's line took the gateway for up
    // while the admin port could still fail to bind.
    let admin_listener = if cfg.admin.enabled {
        let l = TcpListener::bind(cfg.admin.listen)
            .await
            .map_err(|e| format!("cannot listen on {} (admin.listen): {e}", cfg.admin.listen))?;
        let admin_addr = l
            .local_addr()
            .map_err(|e| format!("cannot read the admin address: {e}"))?;
        Some((l, admin_addr))
    } else {
        None
    };
    // Tools and tests read these lines to learn the ports when `listen` used port 0.
    announce!("keygate: proxy listening on {proxy_scheme}://{addr}");
    if let Some((_, admin_addr)) = &admin_listener {
        announce!(
            "keygate: admin listening on {}://{admin_addr}",
            scheme(&admin_tls)
        );
    }

    if args.dev {
        let service = KeyService::new(
            store.clone(),
            cfg.auth.key_prefix.clone(),
            KeyRules::from_config(&cfg),
        );
        let mut req = CreateKey::new(KeyType::Shared);
        req.team_id = Some("dev".into());
        req.name = Some("dev key".into());
        req.scope_names = cfg.routes.iter().flat_map(|r| r.scopes.clone()).collect();
        req.scope_names.sort();
        req.scope_names.dedup();
        let (key, record) = service
            .create(req, &Actor::cli(), Utc::now())
            .await
            .map_err(|e| format!("cannot create the dev key: {e}"))?;
        announce!();
        announce!("keygate dev mode: temporary store, deleted on exit. Do not use in production.");
        if let Some(b) = &dev_banner {
            announce!("  upstream: {b}");
        }
        announce!("  key id:   {}", record.api_key_id);
        announce!("  API key:  {}   (shown once)", key.expose());
        announce!();
        announce!(
            "  curl -H 'Authorization: Bearer {}' {proxy_scheme}://{addr}/hello",
            key.expose()
        );
        announce!("  curl -i {proxy_scheme}://{addr}/hello        # no key: 401");
        announce!();
    }

    if args.dev
        && let (Some((_, admin_addr)), Some(token)) = (&admin_listener, &bootstrap)
    {
        let admin_scheme = scheme(&admin_tls);
        if token_from_env {
            let var = &cfg.admin.bootstrap_token_env;
            announce!("  admin API: {admin_scheme}://{admin_addr}   bootstrap token: ${var}");
            announce!(
                "  curl -H \"Authorization: Bearer ${var}\" {admin_scheme}://{admin_addr}/v1/keys"
            );
        } else {
            announce!("  admin API: {admin_scheme}://{admin_addr}   bootstrap token: {token}");
            announce!(
                "  curl -H 'Authorization: Bearer {token}' {admin_scheme}://{admin_addr}/v1/keys"
            );
        }
        announce!();
    }

    let listeners = keygate::app::Listeners {
        proxy: listener,
        admin: admin_listener.map(|(l, _)| l),
        proxy_tls,
        admin_tls,
    };
    // A refusal found once a store that was down at start-up answers stops the gateway as it
    // would have stopped start-up, draining first.
    let refused = std::sync::Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let refused = refused.clone();
        async move {
            tokio::select! {
                () = keygate::app::shutdown_signal() => {}
                why = late_refusal.found() => {
                    tracing::error!(%why, "stopping: the key store refuses what keygate needs");
                    let _ = refused.set(why);
                }
            }
        }
    };
    keygate::app::run(
        &cfg,
        store,
        listeners,
        bootstrap.map(String::into_bytes),
        shutdown,
    )
    .await?;
    match refused.get() {
        Some(why) => Err(format!("stopped: {why}")),
        None => Ok(()),
    }
}

/// Which store this gateway uses, so that a replica on an embedded store of its own (a Redis
/// setting that did not take) shows in its first lines. Never the Redis URL: it may hold a
/// password.
fn log_store(store: &StoreConfig) {
    match store {
        StoreConfig::Embedded { path } => {
            tracing::info!(store = "embedded", path = %path.display(), "key store");
        }
        StoreConfig::Redis {
            target, namespace, ..
        } => {
            let (deployment, nodes) = match target {
                config::RedisTarget::Single(_) => ("one server", 1),
                config::RedisTarget::Cluster(nodes) => ("cluster", nodes.len()),
            };
            tracing::info!(store = "redis", deployment, nodes, namespace = %namespace, "key store");
        }
    }
}

/// SIGHUP reloads TLS material (each acceptor's reloader catches it too). Caught from start-up
/// on, with or without TLS: its default action ends the process at once, no drain, and the
/// README tells operators to send it.
fn catch_hangup(tls: bool) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hangup) => {
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        if tls {
                            tracing::info!("SIGHUP received; reloading TLS material");
                        } else {
                            tracing::info!("SIGHUP received; no TLS configured, nothing to reload");
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot catch SIGHUP; it would end the process"),
        }
    }
    #[cfg(not(unix))]
    let _ = tls;
}

/// A listener's TLS acceptor with its certificate reloader running, when TLS is configured.
fn start_tls(
    listener: &'static str,
    settings: Option<&config::TlsConfig>,
) -> Result<Option<keygate::server::TlsAcceptor>, String> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    keygate::server::TlsAcceptor::start(listener, settings)
        .map(Some)
        .map_err(|e| format!("{}: {e}", e.field().path_in(&format!("{listener}.tls"))))
}

/// A token copied from an example rather than made: the deploy manifests once shipped
/// `replace-me-with-a-long-random-token`, which every cluster that applied them as they were
/// still has.
fn is_placeholder(token: &str) -> bool {
    let folded: String = token
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    ["replaceme", "changeme"].iter().any(|p| folded.contains(p))
}

/// The bootstrap admin token from the environment variable named by `admin.bootstrap_token_env`.
/// Refused (without printing it) when no request could present it: the admin API trims the
/// token it is given, and a header cannot carry control characters or non-ASCII text, so a
/// token read from a secret file with its trailing newline could never log in.
fn bootstrap_token(cfg: &Config) -> Result<Option<String>, String> {
    let name = &cfg.admin.bootstrap_token_env;
    match std::env::var(name) {
        Ok(t) if t.trim() != t => Err(format!(
            "{name}: the bootstrap admin token starts or ends with whitespace (a newline from \
             a secret file?), which no request can present; remove it"
        )),
        Ok(t) if t.chars().any(|c| c.is_control() || !c.is_ascii()) => Err(format!(
            "{name}: the bootstrap admin token holds control characters or non-ASCII text, \
             which no request can present in a header"
        )),
        Ok(t) if t.len() < keygate::admin::auth::MIN_BOOTSTRAP_LEN => Err(format!(
            "{name}: the bootstrap admin token must be at least {} characters",
            keygate::admin::auth::MIN_BOOTSTRAP_LEN
        )),
        Ok(t) if is_placeholder(&t) => Err(format!(
            "{name}: the bootstrap admin token is a placeholder (it says replace-me or \
             change-me), known to anyone who read the example it came from; use a random one: \
             openssl rand -hex 32"
        )),
        Ok(t) => Ok(Some(t)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{name}: not valid UTF-8")),
    }
}

fn with_echo_route(cfg: &Config, echo: SocketAddr) -> Result<Config, String> {
    // Form bodies (`clientKey`) are a source too, after the configured ones, so
    // `curl -F clientKey=…` works out of the box.
    let mut sources: Vec<&str> = cfg.auth.sources.iter().map(|s| s.as_str()).collect();
    if !sources.contains(&"form") {
        sources.push("form");
    }
    // Re-checked through the normal path so dev mode cannot build a config that files can't.
    let text = format!(
        "[upstreams.echo]\nurl = \"http://{echo}\"\n[[routes]]\nname = \"echo\"\npath_prefix = \"/\"\nupstream = \"echo\"\nsources = {sources:?}\n"
    );
    let extra = config::from_toml(&text).map_err(|e| e.to_string())?;
    let mut cfg = cfg.clone();
    cfg.upstreams = extra.upstreams;
    cfg.routes = extra.routes;
    Ok(cfg)
}

async fn keys(config_path: Option<PathBuf>, command: KeysCommand) -> Result<(), String> {
    let cfg = load_config(config_path.as_deref())?;
    let store = keygate::app::open_store(&cfg.store)
        .await
        .map_err(|e| format!("cannot open the key store: {e}"))?;
    let service = KeyService::new(
        store,
        cfg.auth.key_prefix.clone(),
        KeyRules::from_config(&cfg),
    );
    let actor = Actor::cli();
    let now = Utc::now();
    let fail = |e: keygate::keys::KeyError| e.to_string();
    match command {
        KeysCommand::Create {
            team,
            name,
            description,
            scopes,
            allow_ip,
            expires_in,
            key_type,
            user,
            disabled,
        } => {
            let mut req = CreateKey::new(key_type);
            req.team_id = team;
            req.name = name;
            req.description = description;
            req.scope_names = scopes.into_iter().filter(|s| !s.is_empty()).collect();
            // The admin API's rules (host bits refused, repeats kept once), not the config's.
            req.allow_ips = keygate::keys::parse_allow_ips(&allow_ip)
                .map_err(|e| format!("--allow-ip: {e}"))?;
            req.behalf_of_user_id = user;
            req.is_enabled = !disabled;
            if let Some(d) = expires_in {
                let until = chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| now.checked_add_signed(d))
                    .filter(|t| *t <= keygate::keys::LATEST_EXPIRY)
                    .ok_or("--expires-in: too long (a key expires by 9999-12-31T23:59:59Z)")?;
                req.expires_time = Some(until);
            }
            let (key, record) = service.create(req, &actor, now).await.map_err(fail)?;
            print_line(format_args!("{}", key.expose()), OnClosed::Fail);
            eprintln!(
                "created {} ({}); the key above is shown only once",
                record.api_key_id, record.name
            );
        }
        KeysCommand::List { team, json } => {
            let filter = KeyFilter {
                team_id: team,
                ..KeyFilter::default()
            };
            let mut page = 1;
            if !json {
                say!(
                    "{:<26} {:<12} {:<8} {:<8} {:<12} {:<20} NAME",
                    "ID",
                    "TEAM",
                    "TYPE",
                    "ENABLED",
                    "KEY START",
                    "SCOPES"
                );
            }
            loop {
                let (records, total) = service
                    .list(
                        &filter,
                        Page {
                            page,
                            per_page: 100,
                        },
                    )
                    .await
                    .map_err(fail)?;
                for r in &records {
                    if json {
                        say!("{}", serde_json::to_string(r).map_err(|e| e.to_string())?);
                    } else {
                        say!(
                            "{:<26} {:<12} {:<8} {:<8} {:<12} {:<20} {}",
                            r.api_key_id,
                            r.team_id.as_deref().unwrap_or("-"),
                            r.key_type.as_str(),
                            r.is_enabled,
                            r.key_start,
                            r.scope_names.join(","),
                            r.name
                        );
                    }
                }
                if records.is_empty() || u64::from(page) * 100 >= total {
                    break;
                }
                page += 1;
            }
        }
        KeysCommand::Disable { id } => {
            service
                .set_enabled(&id, false, &actor, now)
                .await
                .map_err(fail)?;
            say!("disabled {id}");
        }
        KeysCommand::Enable { id } => {
            service
                .set_enabled(&id, true, &actor, now)
                .await
                .map_err(fail)?;
            say!("enabled {id}");
        }
        KeysCommand::Revoke { id } => {
            service.revoke(&id, &actor, now).await.map_err(fail)?;
            say!("revoked {id}");
        }
        KeysCommand::Rotate { id, grace } => {
            // The rules are the admin API's, which names its field: here it is `--grace`.
            // The CLI is the operator's, who may rotate any key: nothing to re-check.
            let (key, _) = service
                .rotate(&id, grace, None, &actor, now)
                .await
                .map_err(|e| fail(e).replace("grace_seconds", "--grace"))?;
            print_line(format_args!("{}", key.expose()), OnClosed::Fail);
            eprintln!(
                "rotated {id}; the previous value works for {}",
                humantime::format_duration(grace)
            );
        }
    }
    Ok(())
}

async fn teams(config_path: Option<PathBuf>, command: TeamsCommand) -> Result<(), String> {
    let cfg = load_config(config_path.as_deref())?;
    let store = keygate::app::open_store(&cfg.store)
        .await
        .map_err(|e| format!("cannot open the key store: {e}"))?;
    let service = KeyService::new(
        store,
        cfg.auth.key_prefix.clone(),
        KeyRules::from_config(&cfg),
    );
    let actor = Actor::cli();
    let fail = |e: keygate::keys::KeyError| e.to_string();
    match command {
        TeamsCommand::AddMember { team, user, role } => {
            let m = service
                .put_member(&team, &user, role, &actor, Utc::now())
                .await
                .map_err(fail)?;
            say!("{} is {} of {}", m.user_id, m.role.as_str(), m.team_id);
        }
        TeamsCommand::RemoveMember { team, user } => {
            let changed = service
                .remove_member(&team, &user, &actor, Utc::now())
                .await
                .map_err(fail)?;
            say!(
                "removed {user} from {team}; {} key(s) changed",
                changed.len()
            );
        }
        TeamsCommand::Members { team } => {
            for m in service.list_members(&team).await.map_err(fail)? {
                say!("{:<24} {}", m.user_id, m.role.as_str());
            }
        }
    }
    Ok(())
}

async fn echo(listen: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = keygate::dev::spawn_echo(listener).map_err(|e| e.to_string())?;
    announce!("keygate: echo listening on http://{addr}");
    keygate::app::shutdown_signal().await;
    Ok(())
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
