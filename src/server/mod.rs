//! Listeners: accept TCP connections (bounded by a semaphore taken *before* accept, so a flood
//! waits in the kernel's backlog instead of in our memory), optionally terminate TLS
//! ([`tls`]), serve HTTP/1.1 and HTTP/2 ([`connection`]: h2c with prior knowledge in
//! cleartext, ALPN-negotiated over TLS), close connections that sit idle, and shut down gracefully: stop
//! accepting, let in-flight requests and open tunnels finish up to the drain timeout, then
//! return. Shutdown is a future passed in, so `main` and
//! the tests drive it the same way.
//!
//! Each request goes to the [`Handler`] with its [`RequestContext`]: how its connection
//! arrived (TLS or not), the connection's hold for an upgrade, its HTTP/2 stream's watch.

mod connection;
mod read_ahead;
pub mod spread;
pub mod tls;

pub use tls::{ConnectionInfo, TlsAcceptor};

use crate::idle::{CutOff, Peer, WriteStall};
use crate::window_watch::{Sends, StreamSend, StreamSends};
use connection::{Builders, HttpConnection};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

/// How often an HTTP/2 connection with no frames from the client is pinged, and how long the
/// answer may take before the connection is closed.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Per HTTP/2 stream: 64 KiB, the most a stream holds beyond its upstream connection's
/// buffers; a response still streams at full speed through it (the upstream side refills it).
const H2_MAX_SEND_BUF_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_connections: usize,
    /// Largest request head; over it hyper answers 431 (HTTP/1) or refuses the stream (h2).
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// a stream over it is refused (RST_STREAM REFUSED_STREAM, safe for the client to retry).
    pub max_concurrent_streams: u32,
    /// Slowloris guard: a client must finish sending request headers within this time, and a
    /// new connection must bring its first request within it (HTTP/1.1 or HTTP/2, over TLS
    /// after the handshake).
    pub header_read_timeout: Duration,
    /// An HTTP/2 connection that brings no new request for this long (up to twice this) is
    /// closed gracefully: GOAWAY, streams in flight finish. (An idle HTTP/1.1 connection is
    /// closed by hyper when `header_read_timeout` passes without its next request.)
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    /// A write the client has not taken for this long (it stopped reading: its receive window
    /// stays shut) closes the connection, so a client cannot hold a response, and the
    /// upstream connection feeding it, for as long as it keeps the socket open.
    pub send_timeout: Duration,
    /// Gauge of open client connections (TLS handshakes included), when metrics are wanted.
    pub open_connections: Option<prometheus::IntGauge>,
    /// Connection slots shared by every thread serving the same listening socket, so
    /// `max_connections` holds for them together; `None`: this call's own `max_connections`.
    pub shared_slots: Option<Arc<Semaphore>>,
}

/// What the listener knows of a request beyond the request itself, handed to the handler
/// beside it. (It travelled in the request's extensions before: that map costs three
/// allocations on its first insert, which every HTTP/2 and TLS request paid.)
#[derive(Default)]
pub struct RequestContext {
    /// How the request's connection arrived.
    pub connection: ConnectionInfo,
    /// For a request that may upgrade (HTTP/1.1 with `Upgrade`): its connection's hold, for
    /// the tunnel to keep.
    pub hold: Option<ConnectionHold>,
    /// An HTTP/2 request's stream, for the body that answers it to be watched for window
    /// (`window_watch`); `None` over HTTP/1.1.
    pub stream: Option<Arc<StreamSend>>,
}

/// A listener's requests' handler: each request with its context in, its response out. (The
/// response comes as hyper's service gives it, in an infallible `Result`: wrapping the
/// handler's future to add it moved that future once more: +551 instructions of `memcpy` per
/// h2c request, callgrind.)
pub trait Handler: Send + 'static {
    type Body;
    type Future: Future<Output = Result<http::Response<Self::Body>, Infallible>> + Send + 'static;

    fn call(&self, req: http::Request<Incoming>, context: RequestContext) -> Self::Future;
}

impl<F, Fut, B> Handler for F
where
    F: Fn(http::Request<Incoming>, RequestContext) -> Fut + Send + 'static,
    Fut: Future<Output = Result<http::Response<B>, Infallible>> + Send + 'static,
{
    type Body = B;
    type Future = Fut;

    #[inline]
    fn call(&self, req: http::Request<Incoming>, context: RequestContext) -> Fut {
        self(req, context)
    }
}

/// Serves `listener` until `shutdown` resolves, then drains. `make_handler` builds the
/// per-connection handler from the peer address. With `tls`, every connection must complete a
/// TLS handshake within the acceptor's handshake timeout before HTTP starts; a failed or slow
/// handshake closes that connection only.
pub async fn serve<M, H, B>(
    listener: TcpListener,
    opts: ServeOptions,
    tls: Option<TlsAcceptor>,
    make_handler: M,
    shutdown: impl Future<Output = ()>,
) where
    M: Fn(SocketAddr) -> H,
    H: Handler<Body = B>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_shared(listener, None, opts, tls, make_handler, shutdown, || {}).await;
}

/// [`serve`] for one of several threads accepting from the same socket: `member` (from
/// [`spread::members`]) evens their connections out. `true` when the drain timeout ran out
/// with connections still open: `drain_expired` is called, then their tasks (HTTP/2 streams
/// with them) and their tunnels are ended, the requests they serve dropped.
pub async fn serve_shared<M, H, B>(
    listener: TcpListener,
    mut member: Option<spread::Member>,
    opts: ServeOptions,
    tls: Option<TlsAcceptor>,
    make_handler: M,
    shutdown: impl Future<Output = ()>,
    drain_expired: impl FnOnce(),
) -> bool
where
    M: Fn(SocketAddr) -> H,
    H: Handler<Body = B>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        // The head's own limit, exact. (The buffer's limit alone is reached or not depending
        // on how the head's bytes were cut into reads: a head read in larger pieces could
        // pass it by up to one read.)
        .max_header_size(opts.max_header_bytes)
        .max_buf_size(opts.max_header_bytes.max(8192))
        .max_headers(opts.max_headers);
    // `true` once the drain time has run out: tunnels still open then are ended. (An HTTP/2
    // stream's task ends with its connection's: hyper drops a request whose stream is reset.)
    let (cut_tx, cut_rx) = watch::channel(false);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(opts.max_header_bytes).unwrap_or(u32::MAX))
        // hyper's default is 200: each stream may hold a body peek or an upstream connection.
        .max_concurrent_streams(opts.max_concurrent_streams)
        // What one stream's response may queue beyond what the client has read. hyper's
        // default, ~400 KiB, let a client that grants a large window and reads nothing hold
        // that much per stream for `send_timeout` (review: 10 connections of 100 streams, 477
        // MB). The upstream side's buffers are capped the same (`UPSTREAM_MAX_BUF_BYTES`).
        .max_send_buf_size(H2_MAX_SEND_BUF_BYTES)
        // A peer that stops answering pings (gone, or never reading) is let go.
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let builders = Arc::new(Builders { http1, http2 });
    // Tells connections to finish (HTTP: gracefully; a TLS handshake: at once).
    let (closing_tx, closing_rx) = watch::channel(false);
    // Every connection's hold keeps a sender: the drain is over when the last is dropped,
    // upgraded connections (whose tunnels outlive hyper's connection) included.
    let (holds_tx, mut holds_rx) = mpsc::channel::<std::convert::Infallible>(1);
    let permits = opts
        .shared_slots
        .clone()
        .unwrap_or_else(|| Arc::new(Semaphore::new(opts.max_connections)));
    tokio::pin!(shutdown);

    // The connections' tasks, aborted when the drain time runs out (the runtime may live on
    // for the last usage flush, and would otherwise go on serving them).
    let mut tasks = JoinSet::new();
    // Serves one connection: accepted here, or handed over by another thread.
    let start = |stream: TcpStream,
                 peer: SocketAddr,
                 permit: OwnedSemaphorePermit,
                 assigned: Option<spread::Assigned>| {
        let _ = stream.set_nodelay(true);
        let handler = make_handler(peer);
        let conn = Conn {
            builders: builders.clone(),
            closing: closing_rx.clone(),
            peer,
            first_request_timeout: opts.header_read_timeout,
            idle_timeout: opts.idle_timeout,
            send_timeout: opts.send_timeout,
            hold: ConnectionHold {
                _held: Arc::new(Held {
                    _permit: permit,
                    _open: opts.open_connections.as_ref().map(OpenConnection::new),
                    _assigned: assigned,
                    _draining: holds_tx.clone(),
                    cut: cut_rx.clone(),
                }),
            },
        };
        let tls = tls.clone();
        let mut closing = closing_rx.clone();
        async move {
            let Some(acceptor) = tls else {
                return conn.serve(stream, handler, ConnectionInfo::default()).await;
            };
            let handshake =
                tokio::time::timeout(acceptor.handshake_timeout(), acceptor.accept(stream));
            let (stream, info) = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(done)) => done,
                    Ok(Err(e)) => {
                        // Scanners, plaintext HTTP, untrusted client certificates:
                        // routine on a public port, so debug, not warn.
                        tracing::debug!(error = %e, %peer, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                _ = closing.wait_for(|c| *c) => return,
            };
            conn.serve(stream, handler, info).await;
        }
    };

    loop {
        let handed = async {
            match member.as_mut() {
                Some(m) => m.handed().await,
                None => std::future::pending().await,
            }
        };
        let (stream, peer, permit, assigned) = tokio::select! {
            h = handed => match TcpStream::from_std(h.stream) {
                Ok(stream) => (stream, h.peer, h.permit, Some(h.assigned)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take over a connection from another thread");
                    continue;
                }
            },
            accepted = accept(&listener, &permits) => {
                let Some((stream, peer, permit)) = accepted else { continue };
                match member.as_ref() {
                    None => (stream, peer, permit, None),
                    Some(m) => match keep_or_hand_off(m, stream, peer, permit) {
                        Some((stream, permit, assigned)) => (stream, peer, permit, Some(assigned)),
                        None => continue,
                    },
                }
            },
            () = &mut shutdown => break,
        };
        tasks.spawn(start(stream, peer, permit, assigned));
        // Finished connections' entries go here, without a wake-up of their own.
        while tasks.try_join_next().is_some() {}
    }

    // A thread may have handed this one a connection after it stopped accepting: serve those
    // too, and refuse any more (the sender then serves them itself).
    if let Some(m) = member.as_mut() {
        for h in m.close() {
            match TcpStream::from_std(h.stream) {
                Ok(stream) => {
                    tasks.spawn(start(stream, h.peer, h.permit, Some(h.assigned)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take over a connection from another thread")
                }
            }
        }
    }
    drop(listener);
    drop(holds_tx);
    let _ = closing_tx.send(true);
    // HTTP connections finish their requests and close; open tunnels (WebSocket) are relayed
    // bytes keygate cannot ask to finish, so they get the drain time to close on their own.
    let drained = async { while holds_rx.recv().await.is_some() {} };
    tokio::select! {
        () = drained => {
            tracing::debug!("all connections drained");
            false
        }
        () = tokio::time::sleep(opts.drain_timeout) => {
            tracing::warn!("drain timeout reached; closing remaining connections");
            // Told first, so that what is dropped now is logged as cut off by the drain.
            drain_expired();
            let _ = cut_tx.send(true);
            tasks.abort_all();
            true
        }
    }
}

/// One accepted connection's share of the listener: the HTTP builder, the listener's signal
/// to finish, and what it holds while it lives.
struct Conn {
    builders: Arc<Builders>,
    /// `true` once the listener drains.
    closing: watch::Receiver<bool>,
    peer: SocketAddr,
    hold: ConnectionHold,
    /// A connection with no request by then is closed: hyper's header timeout starts only
    /// once it has seen which protocol the client speaks, and HTTP/2 has none, so a socket
    /// that sends nothing, or only the HTTP/2 preface, would hold its slot for good.
    first_request_timeout: Duration,
    /// [`ServeOptions::idle_timeout`].
    idle_timeout: Duration,
    /// [`ServeOptions::send_timeout`].
    send_timeout: Duration,
}

/// What a connection holds for as long as it lives, released when the last holder drops it:
/// the connection itself, and the relay of an upgraded (WebSocket) connection, which outlives
/// hyper's. A request that asks for an upgrade carries a clone in its context for the
/// relay to keep; without it a tunnel would give back its slot under `max_connections` and
/// leave `keygate_open_connections` while it still runs.
#[derive(Clone)]
pub struct ConnectionHold {
    _held: Arc<Held>,
}

struct Held {
    /// The connection's slot under `max_connections`.
    _permit: OwnedSemaphorePermit,
    /// Counts the connection in `keygate_open_connections`.
    _open: Option<OpenConnection>,
    /// Counts it against its thread's share of a shared socket.
    _assigned: Option<spread::Assigned>,
    /// Keeps the listener's drain waiting for this connection (or its tunnel).
    _draining: mpsc::Sender<std::convert::Infallible>,
    /// `true` once the listener's drain time has run out.
    cut: watch::Receiver<bool>,
}

impl ConnectionHold {
    /// Resolves when the listener's drain time runs out: a tunnel, which outlives the
    /// connection's task, ends then too.
    pub async fn cut_off(&self) {
        let mut cut = self._held.cut.clone();
        // A sender gone without saying so: the listener drained in time, nothing is cut.
        if cut.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A connection slot, then a connection; `None` after an accept error (backed off).
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let Ok(permit) = permits.clone().acquire_owned().await else {
        // Closed slots (never done): accept nothing more; shutdown still ends the loop.
        return std::future::pending().await;
    };
    match listener.accept().await {
        Ok((stream, peer)) => Some((stream, peer, permit)),
        Err(e) => {
            // EMFILE and friends: back off instead of spinning on a full table.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Conn {
    async fn serve<I, H, B>(self, io: I, handler: H, info: ConnectionInfo)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Handler<Body = B>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let activity = Arc::new(Activity::default());
        let sends = Arc::new(StreamSends::default());
        let service = WithContext {
            handler,
            info,
            activity: activity.clone(),
            hold: self.hold.clone(),
            sends: sends.clone(),
        };
        let conn = HttpConnection::new(
            self.builders.clone(),
            WriteStall::new(io, self.send_timeout, Peer::Client),
            service,
        );
        tokio::pin!(conn);
        let mut closing = self.closing;
        // One timer for two looks, each `None` once it is not needed. `idle_at`: the connection's
        // requests, until its first, then for as long as it is an HTTP/2 connection (hyper times
        // HTTP/1.1's idle waits). `sends_at`: its HTTP/2 streams' responses, draining included,
        // until it turns out to be HTTP/1.1 (whose stalled writes `WriteStall` sees).
        let now = tokio::time::Instant::now();
        let first_request_by = now + self.first_request_timeout;
        let mut idle_at = Some(now + self.first_request_timeout.min(self.idle_timeout));
        let mut sends_at = Some(now + self.send_timeout);
        let mut requests_at_check = 0;
        let mut finishing = false;
        // When a stalled stream's connection, closing gracefully, is cut off.
        let mut stall_cut_at = None;
        // When a connection closing for a flood of stream resets is cut off.
        let mut reset_cut_at = None;
        let ended = loop {
            let wake_at = [idle_at.filter(|_| !finishing), sends_at, reset_cut_at]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                ended = conn.as_mut() => break ended,
                _ = closing.wait_for(|c| *c), if !finishing => {
                    conn.as_mut().graceful_shutdown();
                    finishing = true;
                }
                // Rapid reset: closed gracefully, as a stall is, so that the streams the client
                // did not reset finish; a client that goes on resetting meanwhile (it may
                // never answer the ping that ends a graceful close) is cut off at once.
                () = sends.reset_flood() => {
                    if reset_cut_at.is_some() {
                        tracing::debug!(
                            peer = %self.peer,
                            "an HTTP/2 client went on resetting streams while its connection \
                             closed; cut off"
                        );
                        return;
                    }
                    CutOff::ClientResetFlood.add();
                    tracing::debug!(
                        peer = %self.peer,
                        "an HTTP/2 client reset half of its streams or more before their \
                         answers; closing the connection"
                    );
                    if !finishing {
                        conn.as_mut().graceful_shutdown();
                        finishing = true;
                    }
                    reset_cut_at = Some(tokio::time::Instant::now() + self.send_timeout);
                }
                () = sleep_until_some(wake_at), if wake_at.is_some() => {
                    let now = tokio::time::Instant::now();
                    if reset_cut_at.is_some_and(|at| at <= now) {
                        return;
                    }
                    if sends_at.is_some_and(|at| at <= now) {
                        match sends.look_over(self.send_timeout) {
                            Sends::MovingUntil(next) => sends_at = Some(next),
                            // The stalled stream cannot be reset alone (see `window_watch`):
                            // the connection is closed, gracefully first, so that its other
                            // streams finish and the client learns (GOAWAY) which requests
                            // were not processed, rather than losing them all to a reset.
                            Sends::Stalled => match stall_cut_at {
                                None => {
                                    CutOff::ClientNotReading.add();
                                    tracing::debug!(
                                        peer = %self.peer,
                                        timeout = ?self.send_timeout,
                                        "an HTTP/2 client gave no window for a response for the \
                                         send timeout; closing the connection, its other \
                                         streams have one more send timeout to finish"
                                    );
                                    if !finishing {
                                        conn.as_mut().graceful_shutdown();
                                        finishing = true;
                                    }
                                    let cut_at = now + self.send_timeout;
                                    stall_cut_at = Some(cut_at);
                                    sends_at = Some(cut_at);
                                }
                                Some(cut_at) if now < cut_at => sends_at = Some(cut_at),
                                Some(_) => return,
                            },
                        }
                    }
                    if finishing || idle_at.is_none_or(|at| at > now) {
                        continue;
                    }
                    let requests = activity.requests.load(Ordering::Relaxed);
                    if requests == 0 {
                        if now < first_request_by {
                            idle_at = Some(first_request_by);
                            continue;
                        }
                        tracing::debug!(peer = %self.peer, "no request in time; connection closed");
                        return;
                    }
                    if !activity.http2.load(Ordering::Relaxed) {
                        idle_at = None;
                        sends_at = None;
                    } else if requests == requests_at_check {
                        tracing::debug!(peer = %self.peer, "idle HTTP/2 connection closed");
                        conn.as_mut().graceful_shutdown();
                        finishing = true;
                    } else {
                        requests_at_check = requests;
                        idle_at = Some(now + self.idle_timeout);
                    }
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, peer = %self.peer, "connection ended with an error");
        }
    }
}

/// Sleeps until `at`; never ends for `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a connection's requests tell its idle check.
#[derive(Default)]
struct Activity {
    /// Requests so far (only its changes matter).
    requests: AtomicU64,
    /// Whether the connection speaks HTTP/2 (known from its first request).
    http2: AtomicBool,
}

/// The connection to serve on this thread, or `None` when it went to a less loaded one (or
/// could not be moved at all, and was closed).
fn keep_or_hand_off(
    member: &spread::Member,
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) -> Option<(TcpStream, OwnedSemaphorePermit, spread::Assigned)> {
    let (target, assigned) = match member.decide() {
        spread::Decision::Keep(assigned) => return Some((stream, permit, assigned)),
        spread::Decision::HandTo(target, assigned) => (target, assigned),
    };
    let stream = stream.into_std().ok()?;
    let handoff = spread::Handoff {
        stream,
        peer,
        permit,
        assigned,
    };
    match member.hand(target, handoff) {
        Ok(()) => None,
        // That thread has stopped: serve it here after all.
        Err(back) => {
            let stream = TcpStream::from_std(back.stream).ok()?;
            Some((stream, back.permit, member.assign_here()))
        }
    }
}

/// Hands every request to the handler with its [`RequestContext`].
struct WithContext<H> {
    handler: H,
    info: ConnectionInfo,
    /// Counts the connection's requests.
    activity: Arc<Activity>,
    /// Given to requests that ask for an upgrade.
    hold: ConnectionHold,
    /// Watches the responses of HTTP/2 streams: each request gets its stream's entry.
    sends: Arc<StreamSends>,
}

impl<H: Handler> Service<http::Request<Incoming>> for WithContext<H> {
    type Response = http::Response<H::Body>;
    type Error = Infallible;
    type Future = H::Future;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        // The connection's requests come one call at a time: no read-modify-write needed.
        let requests = self.activity.requests.load(Ordering::Relaxed);
        self.activity
            .requests
            .store(requests + 1, Ordering::Relaxed);
        if requests == 0 && req.version() == http::Version::HTTP_2 {
            self.activity.http2.store(true, Ordering::Relaxed);
        }
        // hyper marks the requests that may upgrade (HTTP/1.1 with `Upgrade`); looking for
        // its mark costs nothing on the others, whose extensions are empty.
        let may_upgrade = req
            .extensions()
            .get::<hyper::upgrade::OnUpgrade>()
            .is_some();
        let context = RequestContext {
            connection: self.info.clone(),
            hold: may_upgrade.then(|| self.hold.clone()),
            stream: (req.version() == http::Version::HTTP_2).then(|| self.sends.register()),
        };
        self.handler.call(req, context)
    }
}
