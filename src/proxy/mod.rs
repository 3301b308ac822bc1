//! Forwarding to an upstream over a pooled client (HTTP/1.1, or HTTP/2 when the upstream is
//! configured for it; plain or TLS by rustls with the system's or a configured CA bundle): the
//! target URI, the header rules in [`headers`], and the connect and response-header timeouts
//! that turn a dead or slow upstream into 502/504, and the cap on its connections (503 when
//! they are all in use, `pool.rs`). `Upgrade` requests (WebSocket) are relayed
//! after authentication: once the upstream answers 101, the two connections are spliced.
//!
//! Bodies stream both ways; nothing here waits for them. A request body is the client's own
//! stream, or, when the key was read from it, the [`Replay`] of the peeked bytes followed by the
//! rest of that stream ([`ForwardBody`]). A body of unknown length, either way, is first read
//! ahead for what is already there ([`read_ahead`]).

pub mod headers;
mod pool;
pub mod read_ahead;
pub mod tunnel;

use crate::config::UpstreamConfig;
use crate::credential::body::Replay;
use crate::error::GatewayError;
use crate::idle::{BodyStalled, IdleTimeout, Peer};
use crate::log_every::LogEvery;
use crate::metrics::Metrics;
use crate::window_watch::{SendWatch, StreamSend};
use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::{HeaderName, Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
pub use pool::ConnectionCap;
use pool::{Pool, PoolSettings};
pub use read_ahead::ReadAheadBody;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// The body sent upstream. An enum rather than a boxed body, so requests whose key is in a
/// header (the hot path) forward the client's stream with no allocation.
#[derive(Default)]
pub enum ForwardBody {
    Direct(Incoming),
    /// Boxed: only body-key requests pay for it, and it keeps the common variant small.
    Replay(Box<Replay<Incoming>>),
    /// A route's `max_body_bytes`: the stream fails once it exceeds the limit.
    Limited(Box<LimitedBody>),
    /// A chunked body's frames that were already there ([`read_ahead`]), then the rest.
    ReadAhead(Box<read_ahead::Ahead<Incoming>>),
    /// The upstream's `body_idle_timeout`: the stream fails once the client keeps it waiting
    /// that long.
    Watched(Box<WatchedBody>),
    /// No body: a request the pool sends again (`pool::Resend`).
    #[default]
    Empty,
}

/// The upstream's answer to a client's body: the body it was sent.
/// The upstream's response body as it goes back: watched for the upstream stalling, and over
/// HTTP/2 for the client withholding window (`window_watch`).
pub type UpstreamBody = SendWatch<IdleTimeout<ReadAheadBody<Incoming>>>;

/// A client's body on its way upstream, as the exchange waiting for the response sees it:
/// whether it went wrong, so that the failed exchange is answered as the client's fault (413,
/// 408, 400) rather than the upstream's (502), and whether all of it has been handed upstream,
/// from when the response timeout counts.
#[derive(Default)]
pub struct ClientBody {
    fault: AtomicU8,
    sent: AtomicBool,
    sent_now: tokio::sync::Notify,
    /// The configured key header (`auth.header_name`), kept out of the body's trailers with
    /// the names every gateway removes.
    key_header: Option<HeaderName>,
}

impl ClientBody {
    pub fn new(key_header: HeaderName) -> Self {
        Self {
            key_header: Some(key_header),
            ..Self::default()
        }
    }

    const TOO_LARGE: u8 = 1;
    const STALLED: u8 = 2;
    /// The client's stream itself failed: bad chunked framing, trailers over the head limit,
    /// its connection or HTTP/2 stream gone mid-body.
    const UNREADABLE: u8 = 3;

    fn set_fault(&self, fault: u8) {
        self.fault.store(fault, Ordering::Release);
    }

    pub fn error(&self) -> Option<GatewayError> {
        match self.fault.load(Ordering::Acquire) {
            Self::TOO_LARGE => Some(GatewayError::BodyTooLarge),
            Self::STALLED => Some(crate::credential::body::BodyError::Timeout.into()),
            Self::UNREADABLE => Some(GatewayError::BodyBroken),
            _ => None,
        }
    }

    fn mark_sent(&self) {
        if !self.sent.swap(true, Ordering::AcqRel) {
            self.sent_now.notify_waiters();
        }
    }

    /// Resolves once the last of the body has been handed to the upstream connection.
    async fn all_sent(&self) {
        let notified = self.sent_now.notified();
        tokio::pin!(notified);
        // Registered before the check, so a `mark_sent` in between is not missed.
        notified.as_mut().enable();
        if self.sent.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

/// Per upstream connection; hyper's default (~400 KiB) would let an upload queue that much.
const UPSTREAM_MAX_BUF_BYTES: usize = 64 * 1024;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl From<Replay<Incoming>> for ForwardBody {
    fn from(replay: Replay<Incoming>) -> Self {
        match replay.into_untouched() {
            Ok(body) => ForwardBody::Direct(body),
            Err(replay) => ForwardBody::Replay(replay),
        }
    }
}

impl ForwardBody {
    /// The client's own stream, read ahead when its length is unknown, so a chunked body that
    /// is all here goes upstream with the request head in one write ([`read_ahead`]).
    ///
    /// Not an `async fn`, which would keep `self` twice in its future, part of every request's.
    // The `async fn` clippy asks for is the larger future (see above).
    #[allow(clippy::manual_async_fn)]
    pub fn read_ahead(self) -> impl Future<Output = Self> {
        async move {
            match self {
                ForwardBody::Direct(body)
                    if !body.is_end_stream() && body.size_hint().exact().is_none() =>
                {
                    match ReadAheadBody::read_ahead(body).await {
                        ReadAheadBody::Streaming(body) => ForwardBody::Direct(body),
                        ReadAheadBody::ReadAhead(ahead) => ForwardBody::ReadAhead(ahead),
                    }
                }
                other => other,
            }
        }
    }

    /// Caps the body at `limit` bytes; `state` says so when a client sends more, so the caller
    /// can answer 413 instead of blaming the upstream.
    pub fn limit(self, limit: u64, state: Arc<ClientBody>) -> Self {
        ForwardBody::Limited(Box::new(LimitedBody {
            inner: self,
            remaining: limit,
            state,
        }))
    }

    /// Fails the body once the client keeps it waiting for `limit`; `state` says so, for a 408,
    /// and when the body has all been handed on.
    pub fn watch(self, limit: Duration, state: Arc<ClientBody>) -> Self {
        ForwardBody::Watched(Box::new(WatchedBody {
            inner: IdleTimeout::new(self, limit, Peer::Client),
            state,
        }))
    }
}

pub struct LimitedBody {
    inner: ForwardBody,
    remaining: u64,
    state: Arc<ClientBody>,
}

pub struct WatchedBody {
    inner: IdleTimeout<ForwardBody>,
    state: Arc<ClientBody>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body exceeds the route's limit")]
pub struct BodyLimitExceeded;

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut polled = Pin::new(&mut *this).poll_inner(cx);
        // A client's trailers reach the upstream, where frameworks may merge them into the
        // headers: none may claim what keygate sets or removes in the head. A body that can
        // still bring trailers is watched (`Gateway::forward`), and its state names the key
        // header.
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
        {
            let key_header = match this {
                ForwardBody::Watched(w) => w.state.key_header.as_ref(),
                _ => None,
            };
            headers::remove_from_request_trailers(trailers, key_header);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.is_end_stream_inner()
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint_inner()
    }
}

impl ForwardBody {
    fn poll_inner(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ForwardBody::Direct(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ForwardBody::Empty => Poll::Ready(None),
            ForwardBody::Replay(b) => Pin::new(b.as_mut()).poll_frame(cx).map_err(Into::into),
            ForwardBody::ReadAhead(b) => Pin::new(b.as_mut()).poll_frame(cx).map_err(Into::into),
            ForwardBody::Limited(l) => {
                let l = l.as_mut();
                match Pin::new(&mut l.inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                        if len > l.remaining {
                            l.state.set_fault(ClientBody::TOO_LARGE);
                            return Poll::Ready(Some(Err(Box::new(BodyLimitExceeded))));
                        }
                        l.remaining -= len;
                        Poll::Ready(Some(Ok(frame)))
                    }
                    other => other,
                }
            }
            ForwardBody::Watched(w) => {
                let w = w.as_mut();
                let polled = Pin::new(&mut w.inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Err(e))) if e.is::<BodyStalled>() => {
                        w.state.set_fault(ClientBody::STALLED);
                    }
                    // The route's limit set its own fault; any other error is the client's
                    // stream failing.
                    Poll::Ready(Some(Err(e))) if !e.is::<BodyLimitExceeded>() => {
                        w.state.set_fault(ClientBody::UNREADABLE);
                    }
                    // hyper stops asking once a body of known length says it has ended, and
                    // after trailers, always the last frame (review: a chunked body with
                    // trailers never counted as sent, and no response timeout ran).
                    Poll::Ready(None) => w.state.mark_sent(),
                    Poll::Ready(Some(Ok(frame)))
                        if frame.is_trailers() || w.inner.is_end_stream() =>
                    {
                        w.state.mark_sent()
                    }
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream_inner(&self) -> bool {
        match self {
            ForwardBody::Direct(b) => b.is_end_stream(),
            ForwardBody::Empty => true,
            ForwardBody::Replay(b) => b.is_end_stream(),
            ForwardBody::ReadAhead(b) => b.is_end_stream(),
            ForwardBody::Limited(l) => l.inner.is_end_stream(),
            ForwardBody::Watched(w) => {
                let ended = w.inner.is_end_stream();
                if ended {
                    w.state.mark_sent();
                }
                ended
            }
        }
    }

    fn size_hint_inner(&self) -> SizeHint {
        match self {
            ForwardBody::Direct(b) => b.size_hint(),
            ForwardBody::Empty => SizeHint::with_exact(0),
            ForwardBody::Replay(b) => b.size_hint(),
            ForwardBody::ReadAhead(b) => b.size_hint(),
            ForwardBody::Limited(l) => l.inner.size_hint(),
            ForwardBody::Watched(w) => w.inner.size_hint(),
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
    /// How long either body of an exchange may keep its reader waiting.
    pub body_idle_timeout: Duration,
    pub http2: bool,
    /// The `Host` an HTTP/1.1 upstream gets; `None` for HTTP/2.
    host: Option<http::HeaderValue>,
    pool: Arc<Pool<ForwardBody>>,
    /// Spaces out the warnings of failed exchanges ([`FAILURE_LOG_EVERY`]); shared by this
    /// upstream's copies on every proxy thread.
    failure_log: Arc<LogEvery>,
}

/// Each upstream's [`ConnectionCap`] by name, made once and shared by every proxy thread's
/// gateway: `max_connections` is for the whole process.
pub type ConnectionCaps = std::collections::BTreeMap<String, Arc<ConnectionCap>>;

pub fn connection_caps(config: &crate::config::Config, metrics: &Metrics) -> ConnectionCaps {
    config
        .upstreams
        .iter()
        .map(|(name, cfg)| {
            let open = metrics.upstream_connections(name);
            (name.clone(), ConnectionCap::new(cfg.max_connections, open))
        })
        .collect()
}

/// At most one warning of a failed exchange per upstream this often, with the count of those
/// left out: an upstream down under load fails every request, and a line each would flood the
/// logs (`keygate_requests_total{outcome="upstream_error"}` counts them all).
pub const FAILURE_LOG_EVERY: Duration = Duration::from_secs(1);

impl Upstream {
    /// `cap`: the upstream's, from [`connection_caps`]; `failure_log`: this upstream's, the
    /// same for its copies on every proxy thread.
    pub fn new(
        name: &str,
        cfg: &UpstreamConfig,
        cap: Arc<ConnectionCap>,
        failure_log: Arc<LogEvery>,
    ) -> Result<Self, String> {
        let roots = cfg
            .tls_roots
            .as_deref()
            .cloned()
            .unwrap_or_else(rustls::RootCertStore::empty);
        let connector = pool::connector(roots, Some(cfg.connect_timeout), cfg.http2)
            .map_err(|e| format!("upstream {name}: TLS client set-up failed: {e}"))?;
        let parts = cfg.url.clone().into_parts();
        let base_path = cfg.url.path().trim_end_matches('/').to_owned();
        let scheme = parts.scheme.unwrap_or(http::uri::Scheme::HTTP);
        let authority = parts
            .authority
            .unwrap_or(http::uri::Authority::from_static("invalid"));
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("upstream {name}: bad URL: {e}"))?;
        let pool = Pool::new(
            connector,
            origin,
            PoolSettings {
                http2: cfg.http2,
                max_idle: cfg.pool_max_idle_per_host,
                idle_timeout: cfg.pool_idle_timeout,
                // Caps the read buffer and the queue of body chunks waiting to be written:
                // memory per forwarded request stays bounded however fast the client sends.
                max_buf_size: UPSTREAM_MAX_BUF_BYTES,
                // The request's bytes standing still on their way upstream, as the bodies'
                // idle timeout has them standing still on their way in.
                send_timeout: cfg.body_idle_timeout,
                connect_timeout: cfg.connect_timeout,
            },
            cap,
        );
        Ok(Self {
            name: name.to_owned(),
            scheme,
            authority,
            base_path,
            response_timeout: cfg.response_timeout,
            body_idle_timeout: cfg.body_idle_timeout,
            http2: cfg.http2,
            host: if cfg.http2 {
                None
            } else {
                host_header(&cfg.url)
            },
            pool,
            failure_log,
        })
    }

    /// Whether a failed exchange's warning is due now ([`FAILURE_LOG_EVERY`]): `Some(how many
    /// were left out since the last one)`.
    fn failure_logged(&self) -> Option<u64> {
        self.failure_log.due_now(FAILURE_LOG_EVERY)
    }

    /// The URI the upstream sees: its base path, then the request's path and query unchanged
    /// (taken over as they are, not parsed again, when there is no base path). Origin-form for
    /// HTTP/1.1; HTTP/2 also gets the upstream's scheme and authority (its pseudo-headers).
    fn target(&self, original: Uri) -> Result<Uri, GatewayError> {
        let mut parts = original.into_parts();
        if !self.base_path.is_empty() {
            let pq = parts
                .path_and_query
                .as_ref()
                .map_or("/", PathAndQuery::as_str);
            let joined = PathAndQuery::try_from(format!("{}{}", self.base_path, pq))
                .map_err(|_| GatewayError::UpstreamUnavailable)?;
            parts.path_and_query = Some(joined);
        } else if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        if self.http2 {
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
        } else {
            parts.scheme = None;
            parts.authority = None;
        }
        Uri::from_parts(parts).map_err(|_| GatewayError::UpstreamUnavailable)
    }

    /// Sends the prepared request (identity and forwarding headers already set) and waits for
    /// the response headers; the body streams afterwards. `client_body`: the state of a request
    /// body still to come (see [`ForwardBody::watch`]).
    /// `stream`: an HTTP/2 client's stream, whose window the response will wait on; taken
    /// for the upstream's response, left for keygate's own answer when the exchange fails.
    ///
    /// Not an `async fn`: rustc keeps an `async fn`'s arguments in its future for as long as it
    /// runs, and this one is part of every request's future (copied with it); the request
    /// goes into the exchange's future at once.
    pub fn send<'a>(
        &'a self,
        req: Request<ForwardBody>,
        client_body: Option<&'a ClientBody>,
        stream: &'a mut Option<Arc<StreamSend>>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, GatewayError>> + 'a {
        let exchange = self.exchange(req, client_body);
        async move {
            // Checked by value: borrowed here, the response would stay in this future beside
            // the one `for_the_client` holds.
            let resp = self.asked_for(exchange.await?)?;
            self.for_the_client(resp, stream).await
        }
    }

    /// A response to a request that named no protocol to switch to.
    fn asked_for(&self, resp: Response<Incoming>) -> Result<Response<Incoming>, GatewayError> {
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            // Switching to a protocol the request did not name breaks RFC 9110 (15.2.2); passed
            // on, the 101 would leave the client with no answer at all.
            if let Some(unlogged) = self.failure_logged() {
                tracing::warn!(upstream = %self.name, unlogged, "upstream switched protocols unasked");
            }
            return Err(GatewayError::UpstreamUnavailable);
        }
        Ok(resp)
    }

    /// Forwards an `Upgrade` request (the `Connection`/`Upgrade` headers already restored by the
    /// caller). When the upstream switches protocols, the client's and the upstream's
    /// connections are spliced in a task of their own, and the 101 goes back to the client.
    pub async fn send_upgrade(
        &self,
        mut req: Request<ForwardBody>,
        client_body: Option<&ClientBody>,
        hold: Option<crate::server::ConnectionHold>,
        key_ends: Option<tunnel::KeyEnds>,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        if self.http2 {
            // HTTP/2 has no Upgrade; extended CONNECT is not supported.
            return Err(GatewayError::UpstreamUnavailable);
        }
        let client_side = hyper::upgrade::on(&mut req);
        let asked = req.headers().get(http::header::UPGRADE).cloned();
        let mut resp = self.exchange(req, client_body).await?;
        if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            // Upgrades are HTTP/1.1's: no stream to watch.
            return self.for_the_client(resp, &mut None).await;
        }
        let upgrade = resp.headers().get(http::header::UPGRADE).cloned();
        // A 101 names the protocol it switches to, one the client asked for (RFC 9110 §7.8).
        // Spliced as it came, a switch to h2c would carry every later request past keygate
        // (review: relayed and spliced with `Upgrade: h2c`, and with no `Upgrade` at all).
        if !headers::switches_to_asked(asked.as_ref(), upgrade.as_ref()) {
            if let Some(unlogged) = self.failure_logged() {
                tracing::warn!(upstream = %self.name, unlogged, "upstream switched to a protocol the client did not ask for");
            }
            return Err(GatewayError::UpstreamUnavailable);
        }
        headers::remove_hop_by_hop(resp.headers_mut());
        if let Some(protocol) = upgrade {
            resp.headers_mut().insert(http::header::UPGRADE, protocol);
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
        }
        let upstream_side = hyper::upgrade::on(&mut resp);
        let name = self.name.clone();
        let idle = self.body_idle_timeout;
        tokio::spawn(async move {
            let relay = async {
                match (client_side.await, upstream_side.await) {
                    (Ok(client), Ok(upstream)) => {
                        let (client, upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                        tunnel::splice(client, upstream, idle, key_ends).await;
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::debug!(upstream = %name, error = %e, "upgrade did not complete");
                    }
                }
            };
            // The client connection's slot and counts stay taken while the tunnel runs, and
            // it ends with the listener's drain time.
            match hold {
                Some(hold) => {
                    tokio::select! {
                        () = relay => {}
                        () = hold.cut_off() => {
                            tracing::debug!(upstream = %name, "tunnel closed: the drain time ran out");
                        }
                    }
                }
                None => relay.await,
            }
        });
        Ok(resp.map(|body| self.watched(ReadAheadBody::Streaming(body), None)))
    }

    /// An upstream response as it goes back: without hop-by-hop headers (and a `Content-Length`
    /// beside a `Transfer-Encoding`), its body read ahead when its length is unknown. A body
    /// that failed before its first byte makes the exchange a failed one (502).
    ///
    /// Not an `async fn`: rustc keeps an `async fn`'s arguments twice in its future, and this
    /// one is part of every request's future (copied with it).
    fn for_the_client<'a>(
        &'a self,
        resp: Response<Incoming>,
        stream: &'a mut Option<Arc<StreamSend>>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, GatewayError>> + 'a {
        let (mut parts, body) = resp.into_parts();
        let framing = headers::remove_upstream_framing(&mut parts.headers);
        async move {
            if framing == headers::TransferCoding::Other {
                if let Some(unlogged) = self.failure_logged() {
                    tracing::warn!(upstream = %self.name, unlogged, "upstream response has a transfer coding other than chunked");
                }
                return Err(GatewayError::UpstreamUnavailable);
            }
            let body = ReadAheadBody::read_ahead(body).await;
            if body.failed_before_any_frame() {
                if let Some(unlogged) = self.failure_logged() {
                    tracing::warn!(upstream = %self.name, unlogged, status = parts.status.as_u16(), "upstream response body failed before any data");
                }
                return Err(GatewayError::UpstreamUnavailable);
            }
            Ok(Response::from_parts(
                parts,
                self.watched(body, stream.take()),
            ))
        }
    }

    fn watched(
        &self,
        body: ReadAheadBody<Incoming>,
        stream: Option<Arc<StreamSend>>,
    ) -> UpstreamBody {
        SendWatch::new(
            IdleTimeout::new(body, self.body_idle_timeout, Peer::Upstream),
            stream,
        )
    }

    /// Not an `async fn`, for the same reason as `send`: the request is prepared and handed
    /// to the pool's future before this one is made.
    fn exchange<'a>(
        &'a self,
        req: Request<ForwardBody>,
        client_body: Option<&'a ClientBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, GatewayError>> + 'a {
        // Boxed: the pool's future is ~1.8 KiB, and inline it would be part of every enclosing
        // future (the timeout, this one, the gateway's, the connection's slot), each copied as
        // it is created: ~11 KiB of copying per request, against one allocation.
        let sent = self
            .for_upstream(req)
            .map(|req| Box::pin(self.pool.send(req)));
        async move {
            let mut sent = sent?;
            // The response timeout counts from the end of the request: while a body is still
            // going up, the client's pace and the upstream's reading are bounded by the body and
            // write watches instead, so a long upload at a steady pace is not taken for a slow
            // upstream.
            if let Some(body) = client_body {
                tokio::select! {
                    biased;
                    answered = &mut sent => return self.answered(answered, client_body),
                    () = body.all_sent() => {}
                }
            }
            let answered = tokio::time::timeout(self.response_timeout, sent)
                .await
                .map_err(|_| {
                    if let Some(unlogged) = self.failure_logged() {
                        tracing::warn!(upstream = %self.name, unlogged, "upstream response timed out");
                    }
                    GatewayError::UpstreamTimeout
                })?;
            self.answered(answered, client_body)
        }
    }

    /// The request as the upstream gets it: its URI, version and `Host`, and a length or
    /// chunked coding where hyper's client would otherwise lose the body or send no length.
    fn for_upstream(
        &self,
        mut req: Request<ForwardBody>,
    ) -> Result<Request<ForwardBody>, GatewayError> {
        *req.uri_mut() = self.target(std::mem::take(req.uri_mut()))?;
        // The client's HTTP version does not carry over: the upstream gets HTTP/1.1 (or HTTP/2
        // when configured), with Host set from the target URI.
        *req.version_mut() = if self.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        // Set here from the value made once, rather than left for the client to format from
        // the URI on every request. HTTP/2 carries it as `:authority` instead.
        match &self.host {
            Some(host) => req.headers_mut().insert(http::header::HOST, host.clone()),
            None => req.headers_mut().remove(http::header::HOST),
        };
        if !self.http2 {
            let body = req.body();
            let ended = body.is_end_stream();
            let sized = body.size_hint().exact().is_some();
            let bodiless_method = matches!(*req.method(), Method::GET | Method::HEAD);
            if bodiless_method && !ended && !sized {
                // hyper's client sends a GET or HEAD of unknown length as bodiless (it assumes
                // none) unless the request says it is chunked: the body would be dropped unseen.
                req.headers_mut().insert(
                    http::header::TRANSFER_ENCODING,
                    http::HeaderValue::from_static("chunked"),
                );
            } else if ended
                && matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
                && !req.headers().contains_key(http::header::CONTENT_LENGTH)
            {
                // An empty body with no length (an HTTP/2 stream that ended without data) would
                // go with neither header; some upstreams answer 411 to a POST without one.
                req.headers_mut().insert(
                    http::header::CONTENT_LENGTH,
                    http::HeaderValue::from_static("0"),
                );
            }
        }
        Ok(req)
    }

    /// The exchange's outcome as the gateway answers it (a failure the client's body caused is
    /// the caller's to answer, and not the upstream's to be warned about).
    fn answered(
        &self,
        answered: Result<Response<Incoming>, pool::PoolError>,
        client_body: Option<&ClientBody>,
    ) -> Result<Response<Incoming>, GatewayError> {
        answered.map_err(|e| {
            if let pool::PoolError::Busy { .. } = e {
                // Spaced out like the other failures: a burst past the cap is one 503 each.
                if let Some(unlogged) = self.failure_logged() {
                    tracing::warn!(upstream = %self.name, unlogged, error = %e, "upstream connection limit reached");
                }
                return GatewayError::UpstreamBusy;
            }
            if e.is_bad_response() {
                // The upstream's fault whatever the client's body did; its own log reason, as it
                // is not an outage.
                if let Some(unlogged) = self.failure_logged() {
                    tracing::warn!(upstream = %self.name, unlogged, error = %e, "upstream response head too large or malformed");
                }
                return GatewayError::UpstreamBadResponse;
            }
            if client_body.is_some_and(|b| b.error().is_some()) {
                tracing::debug!(upstream = %self.name, error = %e, "upstream request failed on the client's body");
            } else {
                if let Some(unlogged) = self.failure_logged() {
                    tracing::warn!(upstream = %self.name, unlogged, error = %e, connect = e.is_connect(), "upstream request failed");
                }
            }
            GatewayError::UpstreamUnavailable
        })
    }
}

/// `Host` for an upstream URL, as hyper-util's client would make it: the host, and the port
/// unless it is the scheme's default.
fn host_header(url: &Uri) -> Option<http::HeaderValue> {
    let host = url.host()?;
    let secure = matches!(url.scheme_str(), Some("https" | "wss"));
    let text = match (url.port_u16(), secure) {
        (Some(443), true) | (Some(80), false) | (None, _) => host.to_owned(),
        (Some(port), _) => format!("{host}:{port}"),
    };
    http::HeaderValue::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_drops_only_the_schemes_default_port() {
        let host = |url: &str| host_header(&url.parse().unwrap()).unwrap();
        assert_eq!(host("http://api.internal"), "api.internal");
        assert_eq!(host("http://api.internal:80/v1"), "api.internal");
        assert_eq!(host("http://api.internal:8080"), "api.internal:8080");
        assert_eq!(host("https://api.internal:443"), "api.internal");
        assert_eq!(host("https://api.internal:80"), "api.internal:80");
        assert_eq!(host("http://127.0.0.1:18700"), "127.0.0.1:18700");
        assert_eq!(host("http://[::1]:9000"), "[::1]:9000");
    }
}
