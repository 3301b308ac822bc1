//! Wiring: opens the store, builds the verifier and the gateway, keeps the cache subscribed to
//! the store's changes, and runs the proxy listener until shutdown. Nothing clever lives here.

use crate::admin::AdminApi;
use crate::auth::verify::{Verifier, follow_changes};
use crate::config::{Config, RedisTarget, StoreConfig};
use crate::gateway::{self, Gateway};
use crate::keys::{KeyRules, KeyService};
use crate::metrics::Metrics;
use crate::route::RouteTable;
use crate::server::{self, RequestContext, ServeOptions};
use crate::store::embedded::EmbeddedStore;
use crate::store::metered::MeteredStore;
use crate::store::redis::RedisStore;
use crate::store::{KeyStore, StoreError};
use crate::usage::UsageRecorder;
use crate::window_watch::SendWatch;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};

const SUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the last usage flush, once the proxy has drained, keeps trying a store that fails
/// (`UsageRecorder::flush_at_exit`); what it has not sent then is logged and dropped.
pub const LAST_USAGE_FLUSH_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn open_store(cfg: &StoreConfig) -> Result<Arc<dyn KeyStore>, StoreError> {
    Ok(match cfg {
        StoreConfig::Embedded { path } => Arc::new(EmbeddedStore::open(path)?),
        StoreConfig::Redis {
            target: RedisTarget::Single(url),
            namespace,
            timeout,
        } => Arc::new(RedisStore::connect(url, namespace, *timeout).await?),
        StoreConfig::Redis {
            target: RedisTarget::Cluster(nodes),
            namespace,
            timeout,
        } => Arc::new(RedisStore::connect_cluster(nodes, namespace, *timeout).await?),
    })
}

/// How often the permission check is made again while the store does not answer it.
const ACCESS_RECHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Checks, before serving, that the store lets keygate run everything it needs
/// ([`KeyStore::check_access`]; for Redis, the user's ACL). A refusal is a start-up error
/// naming what is refused: a missing permission stops a rollout at its first replica, where it
/// used to start, report ready, and fail the first admin write or lose the change feed.
///
/// A store that does not answer is not a refusal: start-up goes on, as it always has while
/// the store is down, and the check is made again every second until the store answers it.
/// A refusal found then comes out of the returned [`LateRefusal`], and the caller stops the
/// gateway: the outcome does not depend on whether Redis was up a moment earlier or later.
pub async fn check_store_access(store: &Arc<dyn KeyStore>) -> Result<LateRefusal, String> {
    match store.check_access().await {
        Ok(()) => Ok(LateRefusal(None)),
        Err(StoreError::Denied(why)) => Err(why),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot check the key store's permissions yet; checking again until it answers"
            );
            let (tx, rx) = oneshot::channel();
            let store = store.clone();
            tokio::spawn(async move {
                while !tx.is_closed() {
                    tokio::time::sleep(ACCESS_RECHECK_EVERY).await;
                    match store.check_access().await {
                        Ok(()) => {
                            tracing::info!("the key store grants every command keygate needs");
                            return;
                        }
                        Err(StoreError::Denied(why)) => {
                            let _ = tx.send(why);
                            return;
                        }
                        Err(_) => {}
                    }
                }
            });
            Ok(LateRefusal(Some(rx)))
        }
    }
}

/// A refusal found by the permission check made after start-up (see [`check_store_access`]).
pub struct LateRefusal(Option<oneshot::Receiver<String>>);

impl LateRefusal {
    /// The refusal, once found; never resolves when there is none.
    pub async fn found(self) -> String {
        match self.0 {
            Some(rx) => match rx.await {
                Ok(why) => why,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

/// The sockets `run` serves; bound by the caller so it can print the addresses first.
pub struct Listeners {
    pub proxy: TcpListener,
    /// `None` when the admin API is disabled.
    pub admin: Option<TcpListener>,
    /// Built (and its reloader started) by the caller, so a certificate that does not load
    /// stops start-up before the address is announced.
    pub proxy_tls: Option<server::TlsAcceptor>,
    pub admin_tls: Option<server::TlsAcceptor>,
}

/// Runs the proxy (and the admin API) until `shutdown` resolves, then turns unready, stops
/// accepting and lets in-flight requests drain.
pub async fn run(
    config: &Config,
    store: Arc<dyn KeyStore>,
    listeners: Listeners,
    bootstrap_token: Option<Vec<u8>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let route_names = RouteTable::new(&config.routes, &config.auth.sources, |_| 0).names();
    let metrics = match Metrics::new(&route_names) {
        Ok(m) => Arc::new(m),
        // Only a programming error (a duplicate metric name) gets here.
        Err(e) => return Err(format!("metrics unavailable: {e}")),
    };
    let store: Arc<dyn KeyStore> = Arc::new(MeteredStore::new(store, metrics.clone()));
    let verifier = Arc::new(Verifier::new(
        config.auth.key_prefix.clone(),
        store.clone(),
        &config.cache,
    ));
    if let Err(e) = metrics.register_verify_stats(verifier.clone()) {
        tracing::error!(error = %e, "cache metrics unavailable");
    }
    // Subscribe before accepting, so every change made after start-up reaches the cache. A
    // store that is down now is retried in the background; serving starts regardless.
    let first_feed = match tokio::time::timeout(SUBSCRIBE_WAIT, store.changes()).await {
        Ok(Ok(feed)) => Some(feed),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot subscribe to key changes yet; retrying");
            None
        }
        Err(_) => None,
    };
    // Before serving begins (nothing is cached yet): with a feed, entries may be fresh from the
    // first request on; without one, every lookup asks the store until the feed is up.
    if first_feed.is_some() {
        verifier.feed_connected();
    }
    let follower = tokio::spawn(follow_changes(verifier.clone(), store.clone(), first_feed));
    let usage = config
        .usage
        .enabled
        .then(|| Arc::new(UsageRecorder::default()));
    // One gateway per proxy thread: each keeps its own upstream connections, driven by that
    // thread's scheduler, so a request never waits on another thread.
    let threads = proxy_threads(config);
    let per_thread = config_per_thread(config, threads);
    // `max_connections` is for the whole process: every thread's pool draws on one cap.
    let caps = crate::proxy::connection_caps(config, &metrics);
    for (name, upstream) in &config.upstreams {
        // Each thread keeps its own HTTP/2 connection: the threads past the cap would have none.
        if upstream.http2 && upstream.max_connections < threads {
            tracing::warn!(
                upstream = %name,
                max_connections = upstream.max_connections,
                threads,
                "an http2 upstream's max_connections is below the proxy threads, each of which \
                 keeps a connection of its own: requests on the others will be answered 503 \
                 UPSTREAM_BUSY"
            );
        }
    }
    // One peek budget and one failure log per upstream for the process: they bound what
    // every thread's peeks hold together, and what every thread's upstream failures log.
    let shared = gateway::Shared::new(config, Some(metrics.peek_held_bytes.clone()), caps);
    let gateways = match (0..threads)
        .map(|_| {
            Gateway::new(
                &per_thread,
                verifier.clone(),
                &metrics,
                usage.clone(),
                &shared,
            )
            .map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(g) => g,
        Err(e) => {
            follower.abort();
            return Err(e);
        }
    };
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every proxy thread has drained: no request counts usage any more.
    let (drained_tx, drained_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let opts = ServeOptions {
        max_connections: config.proxy.max_connections,
        max_header_bytes: config.proxy.max_header_bytes,
        max_headers: config.proxy.max_headers,
        max_concurrent_streams: config.proxy.max_concurrent_streams,
        header_read_timeout: config.proxy.header_read_timeout,
        idle_timeout: config.proxy.idle_timeout,
        drain_timeout: config.proxy.drain_timeout,
        send_timeout: config.proxy.send_timeout,
        open_connections: Some(metrics.open_connections.clone()),
        shared_slots: None,
    };

    // The other proxy threads first, each on a copy of the listening socket (the kernel hands
    // each connection to one of them); this thread serves it too, below.
    let mut gateways = gateways.into_iter();
    let own_gateway = gateways.next().ok_or("no proxy thread")?;
    let proxy_opts = ServeOptions {
        shared_slots: (threads > 1).then(|| Arc::new(Semaphore::new(config.proxy.max_connections))),
        ..opts.clone()
    };
    // With more than one thread, a thread that has accepted more than its share hands new
    // connections to the others (server/spread.rs).
    let mut members = if threads > 1 {
        server::spread::members(threads)
            .into_iter()
            .map(Some)
            .collect()
    } else {
        vec![None]
    }
    .into_iter();
    let own_member = members.next().flatten();
    // The other threads keep their runtimes running until the last usage flush is done: a
    // task that one of them started for everyone (redis-rs reconnects on the runtime that
    // noticed the failure) must outlive the drain.
    let (release_tx, release_rx) = watch::channel(false);
    let mut others_done = Vec::new();
    let mut other_threads = Vec::new();
    for ((index, gateway), member) in gateways.enumerate().zip(members) {
        let thread = ProxyThread {
            index: index + 1,
            threads,
            member,
            opts: proxy_opts.clone(),
            tls: listeners.proxy_tls.clone(),
            gateway,
            stop: stop_rx.clone(),
            release: release_rx.clone(),
        };
        let started = thread.start(&listeners.proxy);
        match started {
            Ok((done, thread)) => {
                others_done.push(done);
                other_threads.push(thread);
            }
            Err(e) => {
                // Those already started stop and drain on their own.
                let _ = stop_tx.send(true);
                follower.abort();
                return Err(format!("cannot start proxy thread {}: {e}", index + 1));
            }
        }
    }
    let proxy = async {
        let own = serve_proxy(
            listeners.proxy,
            own_member,
            proxy_opts,
            listeners.proxy_tls,
            own_gateway,
            stopped(stop_rx.clone()),
        );
        let others = async {
            for done in others_done {
                // An error means the thread ended without saying so (a panic): nothing to wait for.
                let _ = done.await;
            }
        };
        tokio::join!(own, others);
        let _ = drained_tx.send(true);
    };

    let admin_stop = drained_rx.clone();
    let admin = async {
        let Some(listener) = listeners.admin else {
            return;
        };
        let mut api = AdminApi::new(
            KeyService::new(
                store.clone(),
                config.auth.key_prefix.clone(),
                KeyRules::from_config(config),
            )
            .with_unaudited_counter(metrics.audit_unrecorded.clone()),
            verifier.clone(),
            bootstrap_token,
            config.scopes.clone(),
            config.proxy.trusted_proxies.clone(),
            config.admin.max_body_bytes,
            ready.clone(),
            metrics.clone(),
        );
        api.ready_without_store = config.admin.ready_without_store;
        api.body_read_timeout = config.admin.body_read_timeout;
        let api = Arc::new(api);
        server::serve(
            listener,
            ServeOptions {
                max_connections: 1024,
                open_connections: None,
                ..opts.clone()
            },
            listeners.admin_tls,
            move |peer| {
                let api = api.clone();
                move |req, context: RequestContext| {
                    let api = api.clone();
                    async move {
                        let resp = api.handle(req, peer).await;
                        Ok::<_, Infallible>(
                            resp.map(|body| SendWatch::answering_here(body, context.stream)),
                        )
                    }
                }
            },
            // Open through the proxy's drain: probes get 503 "shutting down" rather than a
            // refused connection, and /metrics can still be scraped while requests finish.
            stopped(admin_stop),
        )
        .await;
    };

    let control = async {
        shutdown.await;
        // Unready first, so probes stop sending traffic, then stop accepting and drain.
        ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
    };

    // Flushes go on through the drain; the last one, once it is done, covers the requests
    // that finished while draining.
    let usage_flusher = async {
        if let Some(usage) = usage {
            crate::usage::flush_periodically(
                usage,
                store.clone(),
                config.usage.flush_interval,
                stopped(drained_rx),
                LAST_USAGE_FLUSH_WITHIN,
            )
            .await;
        }
    };

    // Ready before the first poll: the listeners are bound and a connection already in the
    // backlog may be served as soon as the admin loop runs.
    ready.store(true, Ordering::Release);
    tokio::join!(proxy, admin, control, usage_flusher);
    let _ = release_tx.send(true);
    follower.abort();
    // Their runtimes drop what the drain cut off, writing those requests' access lines: done
    // before `run` returns, while the log writer is still there to take them.
    for thread in other_threads {
        let _ = thread.join();
    }
    Ok(())
}

/// Threads serving the proxy listener, each with its own single-threaded scheduler: `main`
/// resolves `worker_threads`; with `work_stealing` one pool serves everything instead.
fn proxy_threads(config: &Config) -> usize {
    if config.proxy.work_stealing {
        1
    } else {
        config.proxy.worker_threads.unwrap_or(1).max(1)
    }
}

/// The configuration each proxy thread's gateway is built from: upstream idle-connection
/// limits are for the whole process, so each thread gets its share.
fn config_per_thread(config: &Config, threads: usize) -> Config {
    let mut per_thread = config.clone();
    for upstream in per_thread.upstreams.values_mut() {
        upstream.pool_max_idle_per_host = upstream.pool_max_idle_per_host.div_ceil(threads);
    }
    per_thread
}

/// Serves the proxy listener with `gateway` until `shutdown`, then drains.
async fn serve_proxy(
    listener: TcpListener,
    member: Option<server::spread::Member>,
    opts: ServeOptions,
    tls: Option<server::TlsAcceptor>,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) {
    let cut_off = gateway.clone();
    let serving = server::serve_shared(
        listener,
        member,
        opts,
        tls,
        move |addr| {
            let gateway = gateway.clone();
            let peer = gateway.peer(addr);
            move |req, context| {
                let gateway = gateway.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(gateway.handle(req, &peer, context).await) }
            }
        },
        shutdown,
        move || cut_off.drain_expired(),
    );
    tokio::select! {
        _ = serving => {}
        () = timer_floor() => {}
    }
}

/// How often [`timer_floor`] ticks: well under the store's operation timeout (500 ms unless
/// configured), which every cache miss's lookup sets.
const TIMER_FLOOR_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// A timer always due within [`TIMER_FLOOR_PERIOD`] on this thread's runtime. tokio's time
/// driver wakes its thread (an eventfd write, then one more `epoll_wait`) whenever a new timer
/// is due before every timer it holds. On a proxy thread with no shorter timer, each cache
/// miss's store timeout was such a timer: ~1 such write per miss (perf: `Sleep::poll` →
/// `reregister` → `unpark`), none per cached request. With this one pending, later timers
/// never come first; it costs 10 wake-ups a second.
async fn timer_floor() {
    let mut tick = tokio::time::interval(TIMER_FLOOR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// A proxy thread after the first: its own single-threaded runtime serving a copy of the
/// listening socket (one accept queue for all) with its own gateway.
struct ProxyThread {
    /// 1.. (the main thread is 0), for the thread's name.
    index: usize,
    /// All proxy threads, the main one included.
    threads: usize,
    member: Option<server::spread::Member>,
    opts: ServeOptions,
    tls: Option<server::TlsAcceptor>,
    gateway: Arc<Gateway>,
    /// Stop accepting and drain.
    stop: watch::Receiver<bool>,
    /// The last usage flush is done: the runtime may go.
    release: watch::Receiver<bool>,
}

/// The longest a proxy thread's exit waits for its blocking tasks after the drain.
const RUNTIME_EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

impl ProxyThread {
    /// Starts the thread; everything that can fail happens before it does. The receiver
    /// resolves once the thread has drained (its runtime then runs until `release`); the
    /// thread ends once its runtime is dropped.
    fn start(
        self,
        listener: &TcpListener,
    ) -> std::io::Result<(oneshot::Receiver<()>, std::thread::JoinHandle<()>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Each thread has its own blocking pool (DNS lookups, the embedded store):
            // together about tokio's default for one runtime.
            .max_blocking_threads((512 / self.threads).max(8))
            .build()?;
        let copy = {
            let fd = std::os::fd::AsFd::as_fd(listener).try_clone_to_owned()?;
            let copy = std::net::TcpListener::from(fd);
            copy.set_nonblocking(true)?;
            let _in_runtime = runtime.enter();
            TcpListener::from_std(copy)?
        };
        let (done_tx, done_rx) = oneshot::channel();
        let Self {
            index,
            member,
            opts,
            tls,
            gateway,
            mut stop,
            mut release,
            ..
        } = self;
        let thread = std::thread::Builder::new()
            .name(format!("keygate-proxy-{index}"))
            .spawn(move || {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                runtime.block_on(serve_proxy(copy, member, opts, tls, gateway, stopped));
                let _ = done_tx.send(());
                runtime.block_on(async move {
                    let _ = release.wait_for(|r| *r).await;
                });
                // Drops the tasks the drain cut off (their access lines are written then);
                // a blocking task still running (a slow DNS lookup) is not waited for past
                // this, so exit stays within the drain time and a little more.
                runtime.shutdown_timeout(RUNTIME_EXIT_GRACE);
            })?;
        Ok((done_rx, thread))
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; draining");
}
