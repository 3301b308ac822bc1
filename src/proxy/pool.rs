//! Connections to one upstream, kept open between requests. An [`Upstream`](super::Upstream) is
//! one origin, so unlike hyper-util's legacy client (which this replaced, cutting the proxy's
//! user-space instructions per request by 14 %, see docs/benchmarks.md) there is no map keyed
//! by scheme and authority to hash on every checkout and return, no checkout racing a connect,
//! and no per-request connection metadata: a request takes the most recently used idle
//! connection, or opens its own.
//!
//! What it keeps from that client:
//! - a request whose pooled connection turned out to be closed before anything was sent (the
//!   upstream's keep-alive timeout fired just then) is sent again on another connection; a
//!   request on a fresh connection is never re-sent;
//! - an HTTP/1.1 connection goes back to the pool only once its response has been read to the
//!   end (a task waits for that when the body is still streaming); an upgraded one (101) never;
//! - at most `pool_max_idle_per_host` idle connections; one idle longer than
//!   `pool_idle_timeout` is closed instead of used;
//! - idle connections are closed once idle for `pool_idle_timeout` even when no request comes
//!   (a sweep, [`Pool::reap`], one task per pool started with its first idle connection, that
//!   sleeps until the oldest one is due: nothing per request), and one the upstream closed
//!   is dropped then too (its socket already was, by its task on the upstream's FIN);
//! - an HTTP/2 upstream gets one connection, shared by every request and opened by one of them
//!   while the others wait; a new one when it closes.
//!
//! And what it did not have:
//! - a connection whose writes the upstream stops taking fails after the upstream's
//!   `body_idle_timeout` ([`WriteStall`]) instead of standing still;
//! - a cap on the connections open to the upstream (`max_connections`, [`ConnectionCap`]),
//!   shared by every proxy thread's pool: each connection, idle or in use, HTTP/1.1 or the
//!   HTTP/2 one, holds a permit from when it starts connecting until its socket is dropped. A
//!   request that finds no idle connection and no permit waits for whichever comes first,
//!   within the upstream's `connect_timeout`, then fails ([`PoolError::Busy`], 503): without
//!   the cap, many slow requests at once opened a connection each, until keygate ran out of
//!   file descriptors for everything else. While requests wait, a connection coming back to a
//!   pool with none waiting of its own is closed, so that its permit goes to one of them
//!   (another thread's pool would not wake them).

use super::BoxError;
use crate::idle::{CutOff, Peer, WriteStall};
use crate::window_watch::{SendWatch, Sends, Severable, Severance, StreamSends};
use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

pub type Connector = HttpsConnector<HttpConnector>;
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to the upstream failed: {0}")]
    Connect(BoxError),
    #[error("the upstream connection's HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("the upstream exchange failed: {0}")]
    Exchange(hyper::Error),
    #[error("all {max} connections the upstream may have were in use for {waited:?}")]
    Busy { max: usize, waited: Duration },
}

impl PoolError {
    /// The upstream could not be reached at all (as opposed to failing mid-exchange).
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_) | PoolError::Handshake(_))
    }

    /// The upstream answered with a response head hyper could not read: over its limits (more
    /// than 100 fields, `Parse::TooLarge`; larger than the read buffer, the same) or malformed
    /// (`is_parse`). Over HTTP/2 h2 reads the head and resets the stream itself (a header list
    /// over 16 KiB, a malformed or conflicting `content-length`, a bad pseudo-header): a reset
    /// or GOAWAY h2 made, not one the upstream sent.
    pub fn is_bad_response(&self) -> bool {
        let PoolError::Exchange(e) = self else {
            return false;
        };
        e.is_parse()
            || std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<h2::Error>())
                .is_some_and(h2::Error::is_library)
    }
}

/// The connections one upstream may have open (`max_connections`), shared by every proxy
/// thread's pool for it: a permit per connection, from when it starts connecting until its
/// socket is dropped ([`Held`]).
pub struct ConnectionCap {
    permits: Arc<Semaphore>,
    max: usize,
    /// `keygate_upstream_connections{upstream}`: the permits taken.
    open: IntGauge,
    /// The pools drawing on these permits, so that a request waiting for one can close
    /// another's idle connection: with a pool per proxy thread, a quiet thread's idle
    /// connections would otherwise hold permits that a busy thread's requests wait for.
    pools: Mutex<Vec<Weak<dyn ShedIdle>>>,
    /// Requests of any pool waiting for a permit: while there are any, a connection coming
    /// back to a pool with no waiter of its own is closed instead of kept idle, so that its
    /// permit goes to one of them (a pool's `returned` wakes only its own).
    waiting: AtomicUsize,
}

impl ConnectionCap {
    pub fn new(max: usize, open: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            open,
            pools: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
        })
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.open.inc();
        Slot {
            _permit: permit,
            open: self.open.clone(),
        }
    }

    fn try_slot(&self) -> Option<Slot> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    /// Waits for a permit. `None` only if the semaphore were closed, which nothing does.
    async fn next_slot(&self) -> Option<Slot> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        Some(self.slot(permit))
    }

    fn busy(&self, waited: Duration) -> PoolError {
        PoolError::Busy {
            max: self.max,
            waited,
        }
    }

    fn register(&self, pool: Weak<dyn ShedIdle>) {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools.retain(|p| p.strong_count() > 0);
        pools.push(pool);
    }

    /// Closes the oldest idle connection of the first pool that has one; its permit comes free
    /// once the connection's task has dropped the socket.
    fn shed_idle(&self) {
        let pools: Vec<_> = self
            .pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for pool in pools {
            if pool.shed_oldest() {
                return;
            }
        }
    }

    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// Counts a request in [`Pool::waiting`] until it has its connection, or was refused or dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A pool whose idle connections may be closed for another pool's waiting request.
trait ShedIdle: Send + Sync {
    /// Whether there was one to close.
    fn shed_oldest(&self) -> bool;
}

/// One connection's permit, counted in the gauge while held.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A connection's socket with its permit: whoever owns the socket (the connection's task, or
/// an upgrade's tunnel after a 101) holds the permit, so it comes free exactly when the
/// connection is closed.
struct Held<I> {
    io: I,
    _slot: Slot,
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for Held<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for Held<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// TCP with TCP_NODELAY and the connect timeout, wrapped in rustls (ring provider, `roots` as
/// trust anchors) for https origins. ALPN offers h2 only with `http2`, so upgrades (HTTP/1.1
/// only) keep working against upstreams that would otherwise pick h2.
pub fn connector(
    roots: rustls::RootCertStore,
    connect_timeout: Option<Duration>,
    http2: bool,
) -> Result<Connector, rustls::Error> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(connect_timeout);
    http.set_nodelay(true);
    // The TLS connector wraps plain TCP; with an http:// origin it is never used.
    http.enforce_http(false);
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    Ok(if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    })
}

pub struct PoolSettings {
    pub http2: bool,
    pub max_idle: usize,
    pub idle_timeout: Duration,
    /// HTTP/1.1 read buffer and write queue per connection.
    pub max_buf_size: usize,
    /// A write the upstream has not taken for this long (it stopped reading) fails the
    /// connection ([`WriteStall`]).
    pub send_timeout: Duration,
    /// TCP connect and TLS handshake together. The connector bounds the TCP connect only; an
    /// upstream that accepts and then never finishes the handshake (a process that stopped
    /// calling accept(), its backlog still taking connects) would hold a request with a body
    /// for ever: `response_timeout` starts only once the body is sent. Also the longest a
    /// request waits for a connection when `max_connections` are all in use.
    pub connect_timeout: Duration,
}

/// Generic over the request body only so the tests can send empty bodies; the gateway's is
/// [`ForwardBody`](super::ForwardBody).
pub struct Pool<B> {
    connector: Connector,
    /// `scheme://authority`: where the connector connects.
    origin: Uri,
    settings: PoolSettings,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// HTTP/1.1 connections ready for a request, the most recently returned last.
    idle: Mutex<IdleList<B>>,
    /// Told when a connection comes back to `idle`, for requests waiting for a permit.
    returned: Notify,
    /// Requests waiting for a permit: only then does a returned connection tell `returned`
    /// (whose `notify_waiters` takes a lock, on every request otherwise).
    waiting: AtomicUsize,
    cap: Arc<ConnectionCap>,
    /// The HTTP/2 connection and when a request last took it; the lock is held while one is
    /// being opened.
    shared: tokio::sync::Mutex<Option<(SharedH2<B>, Instant)>>,
}

/// The HTTP/2 connection to the upstream, and its streams' request bodies, watched as the
/// client connections' responses are (`window_watch`): an upstream that withholds
/// window from an upload holds it before the socket fills, where the write watch cannot see.
struct SharedH2<B> {
    conn: http2::SendRequest<SendWatch<B>>,
    sends: Arc<StreamSends>,
}

impl<B> Clone for SharedH2<B> {
    fn clone(&self) -> Self {
        Self {
            conn: self.conn.clone(),
            sends: self.sends.clone(),
        }
    }
}

impl<B> SharedH2<B> {
    /// `req`, its body watched as one of this connection's streams.
    fn watched(&self, req: Request<B>) -> Request<SendWatch<B>> {
        let send = self.sends.register();
        req.map(|body| SendWatch::new(body, Some(send)))
    }
}

struct Idle<B> {
    conn: http1::SendRequest<B>,
    since: Instant,
}

/// The idle connections, oldest first, and whether the sweep that closes them as they expire
/// ([`Pool::reap`]) was started: under the lock `put` takes anyway, so starting it once costs
/// the requests after nothing.
struct IdleList<B> {
    conns: Vec<Idle<B>>,
    reaper: bool,
}

/// Ends once one of `sends`' streams has waited `limit` for window.
async fn stalled(sends: &StreamSends, limit: Duration) {
    let mut next = tokio::time::Instant::now() + limit;
    loop {
        tokio::time::sleep_until(next).await;
        match sends.look_over(limit) {
            Sends::MovingUntil(at) => next = at,
            Sends::Stalled => return,
        }
    }
}

/// A pooled connection idle at least this long may be closing under the request sent on it:
/// the upstream's keep-alive timeout (gunicorn's 2 s, Node's and uvicorn's 5 s) ran out as
/// the request went. Under load connections are reused within milliseconds and never are.
const CLOSING_RISK: Duration = Duration::from_millis(250);

/// What is needed to send a request with no body again.
struct Resend {
    method: http::Method,
    uri: Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Resend {
    /// Kept for a request that can be sent again: an idempotent method (RFC 9110 §9.2.2), no
    /// body, no upgrade (whose request carries the hand-over in its extensions).
    fn of<B: http_body::Body>(req: &Request<B>) -> Option<Self> {
        use http::Method;
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        (idempotent
            && req.body().is_end_stream()
            && !req.headers().contains_key(http::header::UPGRADE))
        .then(|| Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn request<B: Default>(self) -> Request<B> {
        let mut req = Request::new(B::default());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

impl<B> Pool<B>
where
    B: http_body::Body<Data = Bytes> + Default + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub fn new(
        connector: Connector,
        origin: Uri,
        settings: PoolSettings,
        cap: Arc<ConnectionCap>,
    ) -> Arc<Self> {
        let mut h1 = http1::Builder::new();
        h1.max_buf_size(settings.max_buf_size.max(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        let pool = Arc::new(Self {
            connector,
            origin,
            settings,
            h1,
            h2,
            idle: Mutex::new(IdleList {
                conns: Vec::new(),
                reaper: false,
            }),
            returned: Notify::new(),
            waiting: AtomicUsize::new(0),
            cap,
            shared: tokio::sync::Mutex::new(None),
        });
        let weak: Weak<dyn ShedIdle> = Arc::downgrade(&pool) as Weak<Self>;
        pool.cap.register(weak);
        pool
    }

    /// Sends `req` (its URI origin-form for HTTP/1.1, absolute for HTTP/2) and waits for the
    /// response head; the body streams afterwards.
    pub async fn send(self: &Arc<Self>, req: Request<B>) -> Result<Response<Incoming>, PoolError> {
        if self.settings.http2 {
            self.send_h2(req).await
        } else {
            self.send_h1(req).await
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<B>,
    ) -> Result<Response<Incoming>, PoolError> {
        let mut resent = false;
        loop {
            // Boxed: connecting is rare on a warm pool, and its future (connector, TLS,
            // handshake) inline would make every request's future kilobytes larger, copied
            // as it is created and moved.
            let (mut conn, idle_for) = match self.checkout() {
                Some((conn, idle_for)) => (conn, Some(idle_for)),
                None => Box::pin(self.checkout_or_connect()).await?,
            };
            let reused = idle_for.is_some();
            // The keep-alive race (review: 2 in 60 GETs got 502, 7 in 60 the upstream's 408
            // for its idle connection): a request written as the upstream closed the
            // connection fails with no answer, or gets the 408 the upstream sent as it closed.
            // An idempotent request without a body is sent once more on another connection,
            // as nginx and browsers do; anything else is the client's to retry.
            let resend = match idle_for {
                Some(idle) if !resent && idle >= CLOSING_RISK => Resend::of(&req),
                _ => None,
            };
            match (conn.try_send_request(req).await, resend) {
                (Ok(resp), Some(again)) if resp.status() == StatusCode::REQUEST_TIMEOUT => {
                    req = again.request();
                    resent = true;
                }
                (Ok(resp), _) => {
                    // A 101 hands the connection over to the upgrade.
                    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                        self.recycle(conn);
                    }
                    return Ok(resp);
                }
                // Not sent at all: the pooled connection was closed under us. Each retry takes
                // another idle connection or opens one, so this ends.
                (Err(mut e), resend) => match (e.take_message(), resend) {
                    (Some(unsent), _) if reused => req = unsent,
                    (None, Some(again))
                        if e.error().is_incomplete_message() || e.error().is_closed() =>
                    {
                        req = again.request();
                        resent = true;
                    }
                    _ => return Err(PoolError::Exchange(e.into_error())),
                },
            }
        }
    }

    async fn send_h2(&self, req: Request<B>) -> Result<Response<Incoming>, PoolError> {
        let started = tokio::time::Instant::now();
        let (mut h2, reused) = self.shared_h2(started).await?;
        let req = h2.watched(req);
        match h2.conn.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // hyper hands a message back only once the connection is closed (GOAWAY or
                // gone), so `shared_h2` opens a new one: once.
                Some(unsent) if reused => {
                    let (mut h2, _) = self.shared_h2(started).await?;
                    let req = h2.watched(unsent.map(SendWatch::into_inner));
                    h2.conn
                        .try_send_request(req)
                        .await
                        .map_err(|e| PoolError::Exchange(e.into_error()))
                }
                _ => Err(PoolError::Exchange(e.into_error())),
            },
        }
    }

    /// The most recently used idle connection that is still open and not too old.
    /// With how long it was idle.
    fn checkout(&self) -> Option<(http1::SendRequest<B>, Duration)> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(entry) = idle.conns.pop() {
            let idle_for = entry.since.elapsed();
            if idle_for > self.settings.idle_timeout {
                // The rest were returned earlier still.
                idle.conns.clear();
                return None;
            }
            // Not ready: the upstream closed it while it sat idle.
            if entry.conn.is_ready() {
                return Some((entry.conn, idle_for));
            }
        }
        None
    }

    /// An idle connection or a new one, whichever a request may have first: a new one needs a
    /// permit, and without one the request waits for a permit or a returned connection, for
    /// at most `connect_timeout`. With an idle one, how long it was idle.
    async fn checkout_or_connect(
        &self,
    ) -> Result<(http1::SendRequest<B>, Option<Duration>), PoolError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.settings.connect_timeout;
        let mut shed = false;
        // Counted before looking at `idle` (under its lock), so a `put` after the look sees it.
        let _waiting = Waiting::new(&self.waiting);
        let mut cap_waiting = None;
        let slot = loop {
            // Registered before looking, so a connection returned in between is not missed.
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some((conn, idle_for)) = self.checkout() {
                return Ok((conn, Some(idle_for)));
            }
            if let Some(slot) = self.cap.try_slot() {
                break slot;
            }
            if !shed {
                // Counted before shedding: another pool's connection returned before this
                // is counted is idle there to be shed, one returned after is closed by `put`.
                cap_waiting = Some(Waiting::new(&self.cap.waiting));
                // This pool has no idle connection (it was just looked at); another thread's
                // may, holding a permit no request there is using.
                self.cap.shed_idle();
                shed = true;
            }
            tokio::select! {
                slot = self.cap.next_slot() => match slot {
                    Some(slot) => break slot,
                    None => return Err(self.cap.busy(started.elapsed())),
                },
                () = &mut returned => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(self.cap.busy(started.elapsed()));
                }
            }
        };
        // Not waiting any more while it connects: other pools keep what comes back to them.
        drop(cap_waiting);
        Ok((self.connect_h1(slot).await?, None))
    }

    /// Back to the pool once its response has been read; at once when it already has.
    fn recycle(self: &Arc<Self>, mut conn: http1::SendRequest<B>) {
        if self.settings.max_idle == 0 {
            return;
        }
        if conn.is_ready() {
            self.put(conn);
        } else if !conn.is_closed() {
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                if conn.ready().await.is_ok()
                    && let Some(pool) = pool.upgrade()
                {
                    pool.put(conn);
                }
            });
        }
    }

    /// Keeps `conn` idle, for this pool's next request (or one waiting now); closes it instead
    /// when the pool is full, or when only another pool's requests are waiting for a permit:
    /// dropping the last handle ends the connection's task, which drops the socket and its
    /// permit, and the semaphore hands that to the next waiter.
    fn put(self: &Arc<Self>, conn: http1::SendRequest<B>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Read under the lock: a waiter counted on the cap sheds idle connections under it.
        let others_wait =
            self.waiting.load(Ordering::SeqCst) == 0 && self.cap.waiting.load(Ordering::SeqCst) > 0;
        if idle.conns.len() < self.settings.max_idle && !others_wait {
            idle.conns.push(Idle {
                conn,
                since: Instant::now(),
            });
            // Once per pool: on the runtime of the proxy thread whose requests use it.
            let reaper = if idle.reaper {
                None
            } else {
                let runtime = tokio::runtime::Handle::try_current().ok();
                idle.reaper = runtime.is_some();
                runtime
            };
            drop(idle);
            if let Some(runtime) = reaper {
                runtime.spawn(Self::reap(Arc::downgrade(self), self.settings.idle_timeout));
            }
            if self.waiting.load(Ordering::SeqCst) > 0 {
                // Every waiter looks; one takes it, the others wait on.
                self.returned.notify_waiters();
            }
        }
    }

    async fn connect_h1(&self, slot: Slot) -> Result<http1::SendRequest<B>, PoolError> {
        let io = self.connect_io(slot).await?;
        let (mut conn, driver) = self.h1.handshake(io).await.map_err(PoolError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = driver.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        conn.ready().await.map_err(PoolError::Handshake)?;
        Ok(conn)
    }

    /// The shared HTTP/2 connection, opened when there is none (or it closed); `true` when it
    /// was already open. Waiting for the lock (another request opening it) and for a permit
    /// together take at most `connect_timeout` from `started`, when the request came.
    async fn shared_h2(
        &self,
        started: tokio::time::Instant,
    ) -> Result<(SharedH2<B>, bool), PoolError> {
        let deadline = started + self.settings.connect_timeout;
        let Ok(mut shared) = tokio::time::timeout_at(deadline, self.shared.lock()).await else {
            // Behind a request waiting for a permit, or one still connecting with its permit.
            return Err(if self.cap.permits.available_permits() == 0 {
                self.cap.busy(started.elapsed())
            } else {
                PoolError::Connect(
                    format!(
                        "no HTTP/2 connection within {:?}: another request is still opening it",
                        self.settings.connect_timeout
                    )
                    .into(),
                )
            });
        };
        let mut slot = None;
        if let Some((h2, last_used)) = shared.as_mut()
            && !h2.conn.is_closed()
        {
            if last_used.elapsed() <= self.settings.idle_timeout {
                *last_used = Instant::now();
                return Ok((h2.clone(), true));
            }
            // Unused for longer than an idle connection may live: a middlebox may have dropped
            // it without either end knowing, so it is replaced. But it may only look unused,
            // busy with a long stream (SSE) that holds its permit: with no permit for a new
            // one, it goes on being used rather than every request waiting for one.
            slot = self.cap.try_slot();
            if slot.is_none() && h2.conn.is_ready() {
                return Ok((h2.clone(), true));
            }
        }
        // Dropped first: with no stream open its permit comes free for the new one.
        *shared = None;
        let slot = match slot.or_else(|| self.cap.try_slot()) {
            Some(slot) => slot,
            None => {
                let _waiting = Waiting::new(&self.cap.waiting);
                self.cap.shed_idle();
                tokio::time::timeout_at(deadline, self.cap.next_slot())
                    .await
                    .ok()
                    .flatten()
                    .ok_or_else(|| self.cap.busy(started.elapsed()))?
            }
        };
        // Boxed, as in `send_h1`.
        let conn = Box::pin(self.connect_h2(slot)).await?;
        *shared = Some((conn.clone(), Instant::now()));
        Ok((conn, false))
    }

    async fn connect_h2(&self, slot: Slot) -> Result<SharedH2<B>, PoolError> {
        let severance = Arc::new(Severance::default());
        let io = Severable::new(self.connect_io(slot).await?, severance.clone());
        let (mut conn, driver) = self.h2.handshake(io).await.map_err(PoolError::Handshake)?;
        let sends = Arc::new(StreamSends::default());
        let watched = sends.clone();
        let limit = self.settings.send_timeout;
        tokio::spawn(async move {
            tokio::select! {
                ended = driver => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                    }
                }
                () = stalled(&watched, limit) => {
                    // hyper runs the connection in a task of its own, which its streams keep
                    // alive: cut its I/O, and every stream on it fails.
                    severance.sever();
                    CutOff::UpstreamNotReading.add();
                    tracing::warn!(
                        timeout = ?limit,
                        "an HTTP/2 upstream gave no window for a request body for the body idle \
                         timeout; closing its connection"
                    );
                }
            }
        });
        conn.ready().await.map_err(PoolError::Handshake)?;
        Ok(SharedH2 { conn, sends })
    }

    /// TCP (and TLS for https) to the origin, within the connect timeout, holding `slot` for
    /// as long as the socket is open.
    async fn connect_io(&self, slot: Slot) -> Result<WriteStall<Held<Io>>, PoolError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(PoolError::Connect)?;
        let limit = self.settings.connect_timeout;
        let io = tokio::time::timeout(limit, connector.call(self.origin.clone()))
            .await
            .map_err(|_| {
                PoolError::Connect(format!("no connection (TLS included) within {limit:?}").into())
            })?
            .map_err(PoolError::Connect)?;
        Ok(WriteStall::new(
            Held { io, _slot: slot },
            self.settings.send_timeout,
            Peer::Upstream,
        ))
    }

    /// Closes idle connections as they reach `idle_timeout`, whether or not a request comes:
    /// without it, a thread with no traffic kept them open for ever (and the upstream, its own
    /// keep-alive timeout never running out, kept a socket for each). Sleeps until the oldest
    /// is due (`idle_timeout` when there is none: one put meanwhile is due later still), so
    /// it wakes once per expiry at most, and ends with the pool.
    async fn reap(pool: Weak<Self>, idle_timeout: Duration) {
        let mut wait = idle_timeout;
        loop {
            tokio::time::sleep(wait).await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            match pool.close_expired() {
                Some(next) => wait = next,
                // No idle connection left: the next `put` starts another (review: a reaper
                // that slept `idle_timeout` over an empty list woke forever, 1 ms apart with
                // a tiny timeout).
                None => return,
            }
        }
    }

    /// Drops the idle connections that are due or that the upstream closed; how long until
    /// the oldest one left is due, or `None` when none is left (the reaper is then marked
    /// gone, under the same lock `put` reads it with).
    fn close_expired(&self) -> Option<Duration> {
        let limit = self.settings.idle_timeout;
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Oldest first: the due ones are in front.
        let due = idle
            .conns
            .iter()
            .take_while(|e| e.since.elapsed() >= limit)
            .count();
        let mut closed: Vec<Idle<B>> = idle.conns.drain(..due).collect();
        // Their tasks dropped the sockets already; these are the handles.
        if idle.conns.iter().any(|e| e.conn.is_closed()) {
            idle.conns.retain(|e| !e.conn.is_closed());
        }
        let wait = idle
            .conns
            .first()
            .map(|e| limit.saturating_sub(e.since.elapsed()));
        if wait.is_none() {
            idle.reaper = false;
        }
        drop(idle);
        // Each connection's task sees its request side gone and closes the socket.
        closed.clear();
        // Not a busy loop should a clock read come out equal.
        wait.map(|w| w.max(Duration::from_millis(1)))
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .conns
            .len()
    }
}

impl<B: Send> ShedIdle for Pool<B> {
    fn shed_oldest(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.conns.is_empty() {
            return false;
        }
        let oldest = idle.conns.remove(0);
        drop(idle);
        // Its task sees the request side gone and drops the socket, and with it the permit.
        drop(oldest);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// How a test upstream answers, and what it does with the connection afterwards.
    #[derive(Clone, Copy)]
    enum Answer {
        KeepOpen,
        /// Closes the connection this long after answering, without saying so: an upstream's
        /// keep-alive timeout.
        HangUp(Duration),
        /// Sends the head, then the body this long after.
        SlowBody(Duration),
    }

    /// A real HTTP/1.1 upstream on loopback (GET only, a 2-byte answer); counts connections.
    async fn upstream(answer: Answer) -> (SocketAddr, Arc<AtomicUsize>) {
        let (addr, counts) = counted_upstream(answer).await;
        (addr, counts.accepted.clone())
    }

    /// Connections an upstream accepted, has open, and had open at most at once.
    #[derive(Default)]
    struct Counts {
        accepted: Arc<AtomicUsize>,
        open: AtomicUsize,
        peak: AtomicUsize,
    }

    /// Ends with the connection's task: it was closed.
    struct OpenGuard(Arc<Counts>);

    impl Drop for OpenGuard {
        fn drop(&mut self) {
            self.0.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    async fn counted_upstream(answer: Answer) -> (SocketAddr, Arc<Counts>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let count = counts.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                count.accepted.fetch_add(1, Ordering::SeqCst);
                let now = count.open.fetch_add(1, Ordering::SeqCst) + 1;
                count.peak.fetch_max(now, Ordering::SeqCst);
                let guard = OpenGuard(count.clone());
                tokio::spawn(async move {
                    let _guard = guard;
                    let mut have = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n";
                            if s.write_all(head).await.is_err() {
                                return;
                            }
                            if let Answer::SlowBody(d) = answer {
                                tokio::time::sleep(d).await;
                            }
                            if s.write_all(b"ok").await.is_err() {
                                return;
                            }
                            if let Answer::HangUp(d) = answer {
                                tokio::time::sleep(d).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, counts)
    }

    fn pool(addr: SocketAddr, max_idle: usize, idle_timeout: Duration) -> Arc<Pool<Empty<Bytes>>> {
        pool_for(addr, false, max_idle, idle_timeout)
    }

    fn pool_for(
        addr: SocketAddr,
        http2: bool,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Pool<Empty<Bytes>>> {
        let cap = ConnectionCap::new(1024, gauge());
        capped_pool(
            addr,
            http2,
            max_idle,
            idle_timeout,
            cap,
            Duration::from_secs(2),
        )
    }

    fn gauge() -> IntGauge {
        IntGauge::new("test_upstream_connections", "test").unwrap()
    }

    fn capped_pool(
        addr: SocketAddr,
        http2: bool,
        max_idle: usize,
        idle_timeout: Duration,
        cap: Arc<ConnectionCap>,
        connect_timeout: Duration,
    ) -> Arc<Pool<Empty<Bytes>>> {
        let connector = connector(rustls::RootCertStore::empty(), None, http2).unwrap();
        let origin = format!("http://{addr}/").parse().unwrap();
        Pool::new(
            connector,
            origin,
            PoolSettings {
                http2,
                max_idle,
                idle_timeout,
                max_buf_size: 64 * 1024,
                send_timeout: Duration::from_secs(60),
                connect_timeout,
            },
            cap,
        )
    }

    async fn get(pool: &Arc<Pool<Empty<Bytes>>>, host: SocketAddr) -> Bytes {
        let req = Request::get("/x")
            .header(http::header::HOST, host.to_string())
            .body(Empty::new())
            .unwrap();
        let resp = pool.send(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    /// The pool's idle count once returns in flight have landed.
    async fn settled_idle(pool: &Arc<Pool<Empty<Bytes>>>, want: usize) -> usize {
        for _ in 0..100 {
            if pool.idle_count() == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pool.idle_count()
    }

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (addr, accepted) = upstream(Answer::KeepOpen).await;
        let pool = pool(addr, 8, LONG);
        for _ in 0..5 {
            assert_eq!(get(&pool, addr).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(settled_idle(&pool, 1).await, 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_their_own_and_all_come_back_up_to_the_cap() {
        let (addr, accepted) = upstream(Answer::SlowBody(Duration::from_millis(100))).await;
        let pool = pool(addr, 2, LONG);
        let (a, b, c) = tokio::join!(get(&pool, addr), get(&pool, addr), get(&pool, addr));
        assert_eq!(
            (&a[..], &b[..], &c[..]),
            (&b"ok"[..], &b"ok"[..], &b"ok"[..])
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(settled_idle(&pool, 2).await, 2, "capped at max_idle");
        get(&pool, addr).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_comes_back_only_once_its_body_was_read() {
        let (addr, accepted) = upstream(Answer::SlowBody(Duration::from_millis(150))).await;
        let pool = pool(addr, 8, LONG);
        let req = Request::get("/x").body(Empty::new()).unwrap();
        let resp = pool.send(req).await.unwrap();
        // Head received, body still coming: the connection is not free for another request.
        assert_eq!(pool.idle_count(), 0);
        let (second, first_body) = tokio::join!(get(&pool, addr), resp.into_body().collect());
        assert_eq!(second, "ok");
        assert_eq!(first_body.unwrap().to_bytes(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(settled_idle(&pool, 2).await, 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
        let (addr, accepted) = upstream(Answer::HangUp(Duration::from_millis(20))).await;
        let pool = pool(addr, 8, LONG);
        for _ in 0..3 {
            assert_eq!(get(&pool, addr).await, "ok");
            tokio::time::sleep(Duration::from_millis(80)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idle_connections_expire_and_max_idle_zero_keeps_none() {
        let (addr, accepted) = upstream(Answer::KeepOpen).await;
        let pool = pool(addr, 8, Duration::from_millis(50));
        get(&pool, addr).await;
        get(&pool, addr).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        get(&pool, addr).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "expired: a new connection"
        );

        let (addr, accepted) = upstream(Answer::KeepOpen).await;
        let pool = self::pool(addr, 0, LONG);
        get(&pool, addr).await;
        get(&pool, addr).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 0);
    }

    /// With no request after it, an idle connection is still closed once `pool_idle_timeout`
    /// has passed (before the sweep, only the thread's next request closed it).
    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_idle_timeout_without_a_request() {
        let (addr, counts) = counted_upstream(Answer::KeepOpen).await;
        let cap = ConnectionCap::new(8, gauge());
        let limit = Duration::from_millis(200);
        let pool = capped_pool(addr, false, 8, limit, cap.clone(), Duration::from_secs(2));
        get(&pool, addr).await;
        get(&pool, addr).await;
        assert_eq!(settled_idle(&pool, 1).await, 1);
        let idle_from = Instant::now();
        tokio::time::sleep(limit / 2).await;
        assert_eq!(counts.open.load(Ordering::SeqCst), 1, "closed too early");
        let mut closed_after = None;
        for _ in 0..200 {
            if counts.open.load(Ordering::SeqCst) == 0 {
                closed_after = Some(idle_from.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let closed_after = closed_after.expect("the idle connection was never closed");
        // Measured from when the test saw it idle, a little after it was.
        assert!(
            closed_after + Duration::from_millis(50) >= limit,
            "{closed_after:?}"
        );
        assert!(
            closed_after < limit + Duration::from_millis(300),
            "{closed_after:?}"
        );
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(settled_in_use(&cap, 0).await, 0, "its permit is free");
        // With nothing idle the reaper is gone, not waking for nothing.
        assert!(!pool.idle.lock().unwrap().reaper, "the reaper stopped");
        // The pool goes on as before, and its next idle connection gets a reaper again.
        assert_eq!(get(&pool, addr).await, "ok");
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(settled_idle(&pool, 1).await, 1);
        assert!(pool.idle.lock().unwrap().reaper);
        for _ in 0..100 {
            if counts.open.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            counts.open.load(Ordering::SeqCst),
            0,
            "closed by the new reaper"
        );
    }

    /// Connections returned at different times are each closed when their own time is up, and
    /// one the upstream closed leaves the idle list with the sweep.
    #[tokio::test]
    async fn idle_connections_are_swept_each_at_its_own_time() {
        let (addr, counts) = counted_upstream(Answer::SlowBody(Duration::from_millis(50))).await;
        let cap = ConnectionCap::new(8, gauge());
        let limit = Duration::from_millis(400);
        let pool = capped_pool(addr, false, 8, limit, cap, Duration::from_secs(2));
        let (a, b) = tokio::join!(get(&pool, addr), get(&pool, addr));
        assert_eq!((&a[..], &b[..]), (&b"ok"[..], &b"ok"[..]));
        assert_eq!(settled_idle(&pool, 2).await, 2);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Takes the newer one, and returns it 150 ms after the other.
        get(&pool, addr).await;
        assert_eq!(settled_idle(&pool, 2).await, 2);
        // The older one is due ~200 ms after that return, the newer one 400 ms after.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            pool.idle_count(),
            1,
            "the older one is closed, the newer kept"
        );
        assert_eq!(counts.open.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(counts.open.load(Ordering::SeqCst), 0);
    }

    /// A response body that ends this long after its head: an event stream (SSE) held open.
    struct LateBody(Option<Pin<Box<tokio::time::Sleep>>>);

    impl http_body::Body for LateBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            let Some(sleep) = self.0.as_mut() else {
                return Poll::Ready(None);
            };
            std::task::ready!(std::future::Future::poll(sleep.as_mut(), cx));
            self.0 = None;
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b"h2")))))
        }
    }

    /// A real h2c upstream (hyper's HTTP/2 server); counts connections. `/sse` answers at once
    /// and ends its body 1.5 s later.
    async fn h2_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let after = if req.uri().path() == "/sse" {
                        Duration::from_millis(1500)
                    } else {
                        Duration::ZERO
                    };
                    let body = LateBody(Some(Box::pin(tokio::time::sleep(after))));
                    Ok::<_, std::convert::Infallible>(Response::new(body))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), service),
                );
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection_until_it_has_idled_too_long() {
        let (addr, accepted) = h2_upstream().await;
        let pool = pool_for(addr, true, 8, Duration::from_millis(300));
        let get = || async {
            let resp = h2_get(&pool, addr, "/x").await;
            resp.into_body().collect().await.unwrap().to_bytes()
        };
        let (a, b, c) = tokio::join!(get(), get(), get());
        assert_eq!(
            (&a[..], &b[..], &c[..]),
            (&b"h2"[..], &b"h2"[..], &b"h2"[..])
        );
        assert_eq!(get().await, "h2");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one shared connection");
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(get().await, "h2");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "idle too long: a new one"
        );
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = pool(addr, 8, LONG);
        let req = Request::get("/x").body(Empty::new()).unwrap();
        let err = pool.send(req).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
    }

    /// An upstream whose answer is `head` for every request, then closes.
    async fn answers(head: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let head = head.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(&head).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_response_head_over_the_limits_or_malformed_is_a_bad_response() {
        let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
        // Past the 64 KiB read buffer (a read may overshoot it: by far).
        let large = format!("x-big: {}\r\n", "a".repeat(1024 * 1024));
        for head in [
            format!("HTTP/1.1 200 OK\r\n{many}content-length: 0\r\n\r\n"),
            format!("HTTP/1.1 200 OK\r\n{large}content-length: 0\r\n\r\n"),
            "HTTP/1.1 2x0 OK\r\ncontent-length: 0\r\n\r\n".to_owned(),
        ] {
            let addr = answers(head.clone().into_bytes()).await;
            let pool = pool(addr, 8, LONG);
            let req = Request::get("/x").body(Empty::new()).unwrap();
            let Err(err) = pool.send(req).await else {
                panic!("answered: {}", &head[..40]);
            };
            assert!(err.is_bad_response(), "{err}");
            assert!(!err.is_connect(), "{err}");
        }
        // A connection closed with no answer is not one.
        let addr = answers(Vec::new()).await;
        let pool = pool(addr, 8, LONG);
        let req = Request::post("/x").body(Empty::new()).unwrap();
        let err = pool.send(req).await.unwrap_err();
        assert!(!err.is_bad_response(), "{err}");
    }

    /// An upstream whose HTTP/2 response head h2 refuses (a header list over hyper's 16 KiB,
    /// two `content-length`s that differ) answers a bad response, as over HTTP/1.1; one that
    /// resets the stream itself does not.
    #[tokio::test]
    async fn an_http2_response_head_h2_refuses_is_a_bad_response() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let mut resp = Response::new(Empty::<Bytes>::new());
                    match req.uri().path() {
                        "/large" => {
                            let big = http::HeaderValue::from_str(&"a".repeat(20 * 1024)).unwrap();
                            resp.headers_mut().insert("x-big", big);
                        }
                        "/lengths" => {
                            let h = resp.headers_mut();
                            h.append("content-length", http::HeaderValue::from_static("1"));
                            h.append("content-length", http::HeaderValue::from_static("2"));
                        }
                        _ => {}
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), service),
                );
            }
        });
        let pool = pool_for(addr, true, 8, LONG);
        for path in ["/large", "/lengths"] {
            let req = Request::get(format!("http://{addr}{path}"))
                .version(http::Version::HTTP_2)
                .body(Empty::new())
                .unwrap();
            let Err(err) = pool.send(req).await else {
                panic!("{path} answered");
            };
            assert!(err.is_bad_response(), "{path}: {err}");
        }
        // The shared connection still serves.
        assert_eq!(h2_get(&pool, addr, "/fine").await.status(), 200);
    }

    /// The cap's permits in use once closes in flight have landed.
    async fn settled_in_use(cap: &ConnectionCap, want: usize) -> usize {
        for _ in 0..200 {
            if cap.in_use() == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cap.in_use()
    }

    #[tokio::test]
    async fn the_cap_bounds_connections_and_a_waiter_takes_a_returned_one() {
        let (addr, counts) = counted_upstream(Answer::SlowBody(Duration::from_millis(200))).await;
        let cap = ConnectionCap::new(2, gauge());
        let pool = capped_pool(addr, false, 8, LONG, cap.clone(), Duration::from_secs(5));
        let started = Instant::now();
        let (a, b, c) = tokio::join!(get(&pool, addr), get(&pool, addr), get(&pool, addr));
        assert_eq!(
            (&a[..], &b[..], &c[..]),
            (&b"ok"[..], &b"ok"[..], &b"ok"[..])
        );
        assert_eq!(counts.peak.load(Ordering::SeqCst), 2, "at most 2 at once");
        // The third waited for one of the first two to come back, and reused it.
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert_eq!(cap.in_use(), 2, "idle connections keep their permits");
        assert_eq!(cap.open.get(), 2);
    }

    #[tokio::test]
    async fn a_waiter_takes_the_permit_of_a_connection_that_closed() {
        let (addr, counts) = counted_upstream(Answer::SlowBody(Duration::from_millis(200))).await;
        let cap = ConnectionCap::new(2, gauge());
        // Nothing kept idle: each connection closes after its response.
        let pool = capped_pool(addr, false, 0, LONG, cap.clone(), Duration::from_secs(5));
        let (a, b, c) = tokio::join!(get(&pool, addr), get(&pool, addr), get(&pool, addr));
        assert_eq!(
            (&a[..], &b[..], &c[..]),
            (&b"ok"[..], &b"ok"[..], &b"ok"[..])
        );
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(counts.peak.load(Ordering::SeqCst), 2, "at most 2 at once");
        assert_eq!(settled_in_use(&cap, 0).await, 0);
        assert_eq!(cap.open.get(), 0);
    }

    #[tokio::test]
    async fn a_request_finding_no_permit_within_the_connect_timeout_is_refused_busy() {
        let (addr, counts) = counted_upstream(Answer::SlowBody(Duration::from_millis(1500))).await;
        let cap = ConnectionCap::new(2, gauge());
        let pool = capped_pool(addr, false, 8, LONG, cap, Duration::from_millis(200));
        let busy = {
            let pool = pool.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let started = Instant::now();
                let req = Request::get("/x").body(Empty::new()).unwrap();
                (pool.send(req).await, started.elapsed())
            }
        };
        let (a, b, (refused, waited)) = tokio::join!(get(&pool, addr), get(&pool, addr), busy);
        assert_eq!((&a[..], &b[..]), (&b"ok"[..], &b"ok"[..]));
        let err = refused.unwrap_err();
        assert!(matches!(err, PoolError::Busy { max: 2, .. }), "{err}");
        assert!(!err.is_connect());
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_millis(1200), "{waited:?}");
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_expired_idle_connection_gives_its_permit_back() {
        let (addr, counts) = counted_upstream(Answer::KeepOpen).await;
        let cap = ConnectionCap::new(1, gauge());
        let pool = capped_pool(
            addr,
            false,
            8,
            Duration::from_millis(50),
            cap.clone(),
            Duration::from_secs(2),
        );
        get(&pool, addr).await;
        assert_eq!(settled_idle(&pool, 1).await, 1);
        assert_eq!(cap.in_use(), 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        // The expired one is closed; its permit lets the new one open.
        let started = Instant::now();
        get(&pool, addr).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(settled_in_use(&cap, 1).await, 1);
        assert_eq!(cap.open.get(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_gives_its_permit_back() {
        let (addr, counts) = counted_upstream(Answer::HangUp(Duration::from_millis(20))).await;
        let cap = ConnectionCap::new(1, gauge());
        let pool = capped_pool(
            addr,
            false,
            8,
            LONG,
            cap.clone(),
            Duration::from_millis(300),
        );
        get(&pool, addr).await;
        // Still pooled (idle), but closed by the upstream: the permit is free.
        assert_eq!(settled_in_use(&cap, 0).await, 0);
        assert_eq!(pool.idle_count(), 1);
        get(&pool, addr).await;
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(counts.peak.load(Ordering::SeqCst), 1);
    }

    /// Two proxy threads' pools on one cap: one's idle connection is closed for the other's
    /// request rather than holding the only permit.
    #[tokio::test]
    async fn a_waiter_closes_another_pools_idle_connection() {
        let (addr, counts) = counted_upstream(Answer::KeepOpen).await;
        let cap = ConnectionCap::new(1, gauge());
        let first = capped_pool(addr, false, 8, LONG, cap.clone(), Duration::from_secs(2));
        let second = capped_pool(addr, false, 8, LONG, cap.clone(), Duration::from_secs(2));
        get(&first, addr).await;
        assert_eq!(settled_idle(&first, 1).await, 1);
        get(&second, addr).await;
        assert_eq!(first.idle_count(), 0);
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(counts.peak.load(Ordering::SeqCst), 1);
        assert_eq!(settled_in_use(&cap, 1).await, 1);
    }

    #[tokio::test]
    async fn the_shared_http2_connection_takes_one_permit() {
        let (addr, accepted) = h2_upstream().await;
        let cap = ConnectionCap::new(1, gauge());
        let pool = capped_pool(addr, true, 8, LONG, cap.clone(), Duration::from_millis(300));
        let get = || async {
            let resp = h2_get(&pool, addr, "/x").await;
            resp.into_body().collect().await.unwrap().to_bytes()
        };
        let (a, b, c) = tokio::join!(get(), get(), get());
        assert_eq!(
            (&a[..], &b[..], &c[..]),
            (&b"h2"[..], &b"h2"[..], &b"h2"[..])
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(cap.in_use(), 1);
        assert_eq!(cap.open.get(), 1);
    }

    async fn h2_get(
        pool: &Arc<Pool<Empty<Bytes>>>,
        addr: SocketAddr,
        path: &str,
    ) -> Response<Incoming> {
        let req = Request::get(format!("http://{addr}{path}"))
            .version(http::Version::HTTP_2)
            .body(Empty::new())
            .unwrap();
        pool.send(req).await.unwrap()
    }

    /// Two proxy threads' pools on one cap: a connection coming back to the first while the
    /// second's request waits is closed rather than kept idle, so its permit goes to that
    /// request instead of it waiting out the connect timeout.
    #[tokio::test]
    async fn a_waiter_gets_the_permit_of_a_connection_another_pool_got_back() {
        let (addr, counts) = counted_upstream(Answer::SlowBody(Duration::from_millis(300))).await;
        let cap = ConnectionCap::new(1, gauge());
        let first = capped_pool(addr, false, 8, LONG, cap.clone(), Duration::from_secs(2));
        let second = capped_pool(addr, false, 8, LONG, cap.clone(), Duration::from_secs(2));
        let waiter = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let started = Instant::now();
            let req = Request::get("/x").body(Empty::new()).unwrap();
            let answered = second.send(req).await;
            (answered.map(|_| ()), started.elapsed())
        };
        let (a, (b, waited)) = tokio::join!(get(&first, addr), waiter);
        assert_eq!(a, "ok");
        b.unwrap();
        assert!(waited < Duration::from_secs(1), "{waited:?}");
        assert_eq!(first.idle_count(), 0, "closed for the waiter, not kept");
        assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(counts.peak.load(Ordering::SeqCst), 1);
    }

    /// HTTP/2 requests queued for the shared connection all give up `connect_timeout` after
    /// they started, not one `connect_timeout` after another, and say how long they waited.
    #[tokio::test]
    async fn queued_http2_requests_wait_for_a_permit_within_one_connect_timeout() {
        let (addr, accepted) = h2_upstream().await;
        let cap = ConnectionCap::new(1, gauge());
        let limit = Duration::from_millis(300);
        // Another thread's pool holds the only permit with its shared connection.
        let holder = capped_pool(addr, true, 8, LONG, cap.clone(), limit);
        h2_get(&holder, addr, "/x").await;
        let pool = capped_pool(addr, true, 8, LONG, cap.clone(), limit);
        let refused = || async {
            let started = Instant::now();
            let req = Request::get(format!("http://{addr}/x"))
                .version(http::Version::HTTP_2)
                .body(Empty::new())
                .unwrap();
            let err = pool.send(req).await.unwrap_err();
            (err, started.elapsed())
        };
        let (a, b, c) = tokio::join!(refused(), refused(), refused());
        for (err, elapsed) in [a, b, c] {
            let PoolError::Busy { max: 1, waited } = err else {
                panic!("{err}");
            };
            assert!(elapsed >= limit, "{elapsed:?}");
            assert!(elapsed < limit * 2, "{elapsed:?}");
            assert!(
                waited >= limit && waited <= elapsed,
                "{waited:?} of {elapsed:?}"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// A shared HTTP/2 connection busy with a long stream (SSE) past `pool_idle_timeout` is
    /// kept using while no permit is free for a new one, rather than every request waiting
    /// for a permit the stream holds.
    #[tokio::test]
    async fn a_shared_http2_connection_with_a_long_stream_is_kept_when_no_permit_is_free() {
        let (addr, accepted) = h2_upstream().await;
        let cap = ConnectionCap::new(1, gauge());
        let pool = capped_pool(
            addr,
            true,
            8,
            Duration::from_millis(100),
            cap.clone(),
            Duration::from_millis(300),
        );
        let stream = h2_get(&pool, addr, "/sse").await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let started = Instant::now();
        let resp = h2_get(&pool, addr, "/x").await;
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "h2");
        assert!(started.elapsed() < Duration::from_millis(200));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let body = stream.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "h2");
        assert_eq!(cap.in_use(), 1);
    }
}
