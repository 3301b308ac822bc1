//! Test harness: real processes on ephemeral loopback ports, cleaned up on drop.

pub mod gateway;
pub mod redis;
pub mod relay;
pub mod upstream;

use keygate::auth::key::KeyPrefix;
use keygate::auth::record::{KeyRecord, KeyType};
use keygate::keys::{Actor, CreateKey, KeyRules, KeyService};
use keygate::store::KeyStore;
use std::sync::Arc;

/// Creates a key directly in `store` and returns its value and record.
pub async fn create_key(
    store: &Arc<dyn KeyStore>,
    edit: impl FnOnce(&mut CreateKey),
) -> (String, KeyRecord) {
    let service = service(store);
    let mut req = CreateKey::new(KeyType::Shared);
    req.team_id = Some("team1".into());
    edit(&mut req);
    let (key, record) = service
        .create(req, &Actor::cli(), chrono::Utc::now())
        .await
        .expect("create key");
    (key.expose().to_owned(), record)
}

/// Key operations with no team limit and any scope name (the tests' routes use ad-hoc scopes).
pub fn service(store: &Arc<dyn KeyStore>) -> KeyService {
    KeyService::new(store.clone(), KeyPrefix::default(), KeyRules::permissive())
}

pub fn cli() -> Actor {
    Actor::cli()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client")
}

/// A client speaking HTTP/2 in cleartext (h2c, prior knowledge).
pub fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("h2c client")
}

/// A streamed request body that turns out empty: over HTTP/2, HEADERS without END_STREAM, then
/// an empty DATA frame that ends the stream.
pub fn empty_stream_body() -> reqwest::Body {
    reqwest::Body::wrap_stream(futures_util::stream::iter(Vec::<
        Result<Vec<u8>, std::io::Error>,
    >::new()))
}

/// Polls `check` every 20 ms until it is true or `within` passes.
pub async fn eventually<F, Fut>(within: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Writes `request` (bytes as given: for what a well-behaved client would not send) on a fresh
/// connection to `addr`, reads until the server closes it, and returns the status line and
/// the body.
pub async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut out),
    )
    .await
    .expect("no answer")
    .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}
