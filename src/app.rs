//! Wiring: opens the store, builds the verifier and the gateway, keeps the cache subscribed to
//! the store's changes, and runs the proxy listener until shutdown. Nothing clever lives here.

use crate::auth::verify::{Verifier, follow_changes};
use crate::config::{Config, StoreConfig};
use crate::gateway::Gateway;
use crate::server::{self, ServeOptions};
use crate::store::embedded::EmbeddedStore;
use crate::store::redis::RedisStore;
use crate::store::{KeyStore, StoreError};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

const SUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn open_store(cfg: &StoreConfig) -> Result<Arc<dyn KeyStore>, StoreError> {
    Ok(match cfg {
        StoreConfig::Embedded { path } => Arc::new(EmbeddedStore::open(path)?),
        StoreConfig::Redis {
            url,
            namespace,
            timeout,
        } => Arc::new(RedisStore::connect(url, namespace, *timeout).await?),
    })
}

/// Runs the proxy on `listener` until `shutdown` resolves and in-flight requests drain.
pub async fn run(
    config: &Config,
    store: Arc<dyn KeyStore>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let verifier = Arc::new(Verifier::new(
        config.auth.key_prefix.clone(),
        store.clone(),
        &config.cache,
    ));
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
    let follower = tokio::spawn(follow_changes(verifier.clone(), store, first_feed));
    let gateway = Arc::new(Gateway::new(config, verifier));
    let opts = ServeOptions {
        max_connections: config.proxy.max_connections,
        header_read_timeout: config.proxy.header_read_timeout,
        drain_timeout: config.proxy.drain_timeout,
    };
    server::serve(
        listener,
        opts,
        move |peer| {
            let gateway = gateway.clone();
            hyper::service::service_fn(move |req| {
                let gateway = gateway.clone();
                async move { Ok::<_, std::convert::Infallible>(gateway.handle(req, peer).await) }
            })
        },
        shutdown,
    )
    .await;
    follower.abort();
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
