//! Wiring: opens the store, builds the verifier and the gateway, keeps the cache subscribed to
//! the store's changes, and runs the proxy listener until shutdown. Nothing clever lives here.

use crate::admin::AdminApi;
use crate::auth::verify::{Verifier, follow_changes};
use crate::config::{Config, RedisTarget, StoreConfig};
use crate::gateway::Gateway;
use crate::keys::{KeyRules, KeyService};
use crate::metrics::Metrics;
use crate::route::RouteTable;
use crate::server::{self, ServeOptions};
use crate::store::embedded::EmbeddedStore;
use crate::store::metered::MeteredStore;
use crate::store::redis::RedisStore;
use crate::store::{KeyStore, StoreError};
use crate::usage::UsageRecorder;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio::sync::watch;

const SUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
    let follower = tokio::spawn(follow_changes(verifier.clone(), store.clone(), first_feed));
    let usage = config
        .usage
        .enabled
        .then(|| Arc::new(UsageRecorder::default()));
    let gateway = match Gateway::new(config, verifier.clone(), metrics.clone(), usage.clone()) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            follower.abort();
            return Err(e);
        }
    };
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let opts = ServeOptions {
        max_connections: config.proxy.max_connections,
        max_header_bytes: config.proxy.max_header_bytes,
        max_headers: config.proxy.max_headers,
        header_read_timeout: config.proxy.header_read_timeout,
        drain_timeout: config.proxy.drain_timeout,
        open_connections: Some(metrics.open_connections.clone()),
    };

    let proxy = server::serve(
        listeners.proxy,
        opts.clone(),
        listeners.proxy_tls,
        move |addr| {
            let gateway = gateway.clone();
            let peer = gateway.peer(addr);
            hyper::service::service_fn(move |req| {
                let gateway = gateway.clone();
                let peer = peer.clone();
                async move { Ok::<_, std::convert::Infallible>(gateway.handle(req, &peer).await) }
            })
        },
        stopped(stop_rx.clone()),
    );

    let admin = async {
        let Some(listener) = listeners.admin else {
            return;
        };
        let mut api = AdminApi::new(
            KeyService::new(
                store.clone(),
                config.auth.key_prefix.clone(),
                KeyRules::from_config(config),
            ),
            verifier.clone(),
            bootstrap_token,
            config.scopes.clone(),
            config.proxy.trusted_proxies.clone(),
            config.admin.max_body_bytes,
            ready.clone(),
            metrics.clone(),
        );
        api.ready_without_store = config.admin.ready_without_store;
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
                hyper::service::service_fn(move |req| {
                    let api = api.clone();
                    async move { Ok::<_, std::convert::Infallible>(api.handle(req, peer).await) }
                })
            },
            stopped(stop_rx.clone()),
        )
        .await;
    };

    let control = async {
        shutdown.await;
        // Unready first, so probes stop sending traffic, then stop accepting and drain.
        ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
    };

    let usage_for_flusher = usage.clone();
    let usage_flusher = async {
        if let Some(usage) = usage_for_flusher {
            crate::usage::flush_periodically(
                usage,
                store.clone(),
                config.usage.flush_interval,
                stopped(stop_rx.clone()),
            )
            .await;
        }
    };

    // Ready before the first poll: the listeners are bound and a connection already in the
    // backlog may be served as soon as the admin loop runs.
    ready.store(true, Ordering::Release);
    tokio::join!(proxy, admin, control, usage_flusher);
    // Requests that finished while draining were counted after the flusher's last flush.
    if let Some(usage) = &usage {
        usage.flush(&*store).await;
    }
    follower.abort();
    Ok(())
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
