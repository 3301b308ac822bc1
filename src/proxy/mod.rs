//! Forwarding to an upstream over a pooled HTTP/1.1 client: the target URI, the header rules
//! in [`headers`], and the connect and response-header timeouts that turn a dead or slow
//! upstream into 502/504. Bodies stream both ways; nothing here buffers them.

pub mod headers;

use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

pub struct Upstream {
    pub name: String,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Prepended to every forwarded path; empty for `http://host:port`.
    base_path: String,
    response_timeout: Duration,
    client: Client<HttpConnector, Incoming>,
}

impl Upstream {
    pub fn new(name: &str, cfg: &UpstreamConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(connector);
        let parts = cfg.url.clone().into_parts();
        let base_path = cfg.url.path().trim_end_matches('/').to_owned();
        Self {
            name: name.to_owned(),
            scheme: parts.scheme.unwrap_or(http::uri::Scheme::HTTP),
            authority: parts
                .authority
                .unwrap_or(http::uri::Authority::from_static("invalid")),
            base_path,
            response_timeout: cfg.response_timeout,
            client,
        }
    }

    /// The URI the upstream sees: its own scheme and authority, its base path, then the
    /// request's path and query unchanged.
    fn target(&self, original: &Uri) -> Result<Uri, GatewayError> {
        let pq = original.path_and_query().map_or("/", PathAndQuery::as_str);
        let path_and_query = if self.base_path.is_empty() {
            PathAndQuery::try_from(pq)
        } else {
            PathAndQuery::try_from(format!("{}{}", self.base_path, pq))
        }
        .map_err(|_| GatewayError::UpstreamUnavailable)?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| GatewayError::UpstreamUnavailable)
    }

    /// Sends the prepared request (identity and forwarding headers already set) and waits for
    /// the response headers; the body streams afterwards.
    pub async fn send(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, GatewayError> {
        *req.uri_mut() = self.target(req.uri())?;
        // The pooled client speaks HTTP/1.1 to upstreams whatever the client spoke to us, and
        // sets Host from the target URI.
        *req.version_mut() = Version::HTTP_11;
        req.headers_mut().remove(http::header::HOST);
        let mut resp = match tokio::time::timeout(self.response_timeout, self.client.request(req))
            .await
        {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                tracing::warn!(upstream = %self.name, error = %e, connect = e.is_connect(), "upstream request failed");
                return Err(GatewayError::UpstreamUnavailable);
            }
            Err(_) => {
                tracing::warn!(upstream = %self.name, "upstream response timed out");
                return Err(GatewayError::UpstreamTimeout);
            }
        };
        headers::remove_hop_by_hop(resp.headers_mut());
        Ok(resp)
    }
}
