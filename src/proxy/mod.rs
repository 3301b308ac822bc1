//! Forwarding to an upstream over a pooled HTTP/1.1 client: the target URI, the header rules
//! in [`headers`], and the connect and response-header timeouts that turn a dead or slow
//! upstream into 502/504. Bodies stream both ways; nothing here buffers them. A request body
//! is the client's own stream, or, when the key was read from it, the [`Replay`] of the
//! peeked bytes followed by the rest of that stream ([`ForwardBody`]).

pub mod headers;

use crate::config::UpstreamConfig;
use crate::credential::body::Replay;
use crate::error::GatewayError;
use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// The body sent upstream. An enum rather than a boxed body, so requests whose key is in a
/// header (the hot path) forward the client's stream with no allocation.
pub enum ForwardBody {
    Direct(Incoming),
    /// Boxed: only body-key requests pay for it, and it keeps the common variant small.
    Replay(Box<Replay<Incoming>>),
}

impl From<Replay<Incoming>> for ForwardBody {
    fn from(replay: Replay<Incoming>) -> Self {
        match replay.into_untouched() {
            Ok(body) => ForwardBody::Direct(body),
            Err(replay) => ForwardBody::Replay(replay),
        }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ForwardBody::Direct(b) => Pin::new(b).poll_frame(cx),
            ForwardBody::Replay(b) => Pin::new(b.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ForwardBody::Direct(b) => b.is_end_stream(),
            ForwardBody::Replay(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ForwardBody::Direct(b) => b.size_hint(),
            ForwardBody::Replay(b) => b.size_hint(),
        }
    }
}

pub struct Upstream {
    pub name: String,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Prepended to every forwarded path; empty for `http://host:port`.
    base_path: String,
    response_timeout: Duration,
    client: Client<HttpConnector, ForwardBody>,
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
        mut req: Request<ForwardBody>,
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
