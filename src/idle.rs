//! Cutting off a peer that stops moving: a body that keeps its reader waiting for its next frame
//! ([`IdleTimeout`]: a client that stops sending its upload half-way, an upstream that stops
//! sending its response), and a connection whose writes cannot progress ([`WriteStall`]: a
//! client that stops reading its response). Either would otherwise hold the client's connection,
//! an upstream connection and their buffers for as long as the peer keeps its socket open.
//! nginx does the same with `client_body_timeout`, `proxy_read_timeout` and `send_timeout`, 60 s
//! each by default.
//!
//! Only waiting counts: a wait begins when the reader (or writer) is told "not yet", and ends
//! with the next frame (or write). Time the reader spends elsewhere is not counted: hyper stops
//! asking for a body while the far side is not taking what was already written, and that stall
//! is the far side's.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// About 30 years: what tokio's timers take for "never".
const FOREVER: Duration = Duration::from_secs(86400 * 365 * 30);

/// One wait at a time, and whether it has lasted `limit`.
struct Wait {
    limit: Duration,
    /// Made on the first wait: a body whose frames are all there when asked for (most small
    /// ones), or a connection whose writes never block, never allocates a timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// When the current wait ends; `None` between waits.
    deadline: Option<Instant>,
}

impl Wait {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            timer: None,
            deadline: None,
        }
    }

    fn ended(&mut self) {
        self.deadline = None;
    }

    /// Whether the current wait (begun now when there is none) has lasted `limit`; arms the
    /// timer to wake the task at its end.
    fn too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let deadline = *self.deadline.get_or_insert_with(|| {
            let now = Instant::now();
            // A limit set absurdly high (`"1000000000years"`) waits "forever", as tokio's own
            // timers do, rather than overflowing.
            now.checked_add(limit).unwrap_or(now + FOREVER)
        });
        let timer = match &mut self.timer {
            Some(timer) => {
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        timer.as_mut().poll(cx).is_ready()
    }
}

/// A body that fails once it has kept its reader waiting `limit` for a frame.
pub struct IdleTimeout<B> {
    inner: B,
    wait: Wait,
    sender: Peer,
}

/// The peer a watch waits on: the one sending the body, or the one not taking the writes.
#[derive(Clone, Copy)]
pub enum Peer {
    /// A client's stalled body is logged at debug: it is answered 408, which the access log
    /// shows, and on a public port it can be routine.
    Client,
    /// An upstream's stalled body is logged as a warning: the operator's to look at.
    Upstream,
}

/// Exchanges and connections cut off, by [`CutOff`] (`keygate_cut_off_total`). Process-wide
/// atomics rather than a metrics handle in every wrapper: counted only when something is cut
/// off, and read at scrape time.
static CUT_OFFS: [AtomicU64; CutOff::ALL.len()] = [const { AtomicU64::new(0) }; CutOff::ALL.len()];

/// Why something was cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutOff {
    ClientBodyStalled,
    UpstreamBodyStalled,
    ClientNotReading,
    UpstreamNotReading,
    /// An upgraded connection (WebSocket) carried nothing either way for the idle limit.
    TunnelIdle,
    /// An upgraded connection's key stopped being valid (disabled, revoked, expired).
    TunnelKeyInvalid,
    /// An HTTP/2 client reset most of its streams before their answers (rapid reset).
    ClientResetFlood,
}

impl CutOff {
    pub const ALL: [CutOff; 7] = [
        CutOff::ClientBodyStalled,
        CutOff::UpstreamBodyStalled,
        CutOff::ClientNotReading,
        CutOff::UpstreamNotReading,
        CutOff::TunnelIdle,
        CutOff::TunnelKeyInvalid,
        CutOff::ClientResetFlood,
    ];

    fn of_body(sender: Peer) -> Self {
        match sender {
            Peer::Client => CutOff::ClientBodyStalled,
            Peer::Upstream => CutOff::UpstreamBodyStalled,
        }
    }

    fn of_writes(reader: Peer) -> Self {
        match reader {
            Peer::Client => CutOff::ClientNotReading,
            Peer::Upstream => CutOff::UpstreamNotReading,
        }
    }

    /// The metric's `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            CutOff::ClientBodyStalled => "client_body_stalled",
            CutOff::UpstreamBodyStalled => "upstream_body_stalled",
            CutOff::ClientNotReading => "client_not_reading",
            CutOff::UpstreamNotReading => "upstream_not_reading",
            CutOff::TunnelIdle => "tunnel_idle",
            CutOff::TunnelKeyInvalid => "tunnel_key_invalid",
            CutOff::ClientResetFlood => "client_reset_flood",
        }
    }

    /// How many so far, in this process.
    pub fn count(self) -> u64 {
        CUT_OFFS[self as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn add(self) {
        CUT_OFFS[self as usize].fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the body sent nothing for {0:?}")]
pub struct BodyStalled(pub Duration);

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, limit: Duration, sender: Peer) -> Self {
        Self {
            inner,
            wait: Wait::new(limit),
            sender,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.wait.ended();
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending if this.wait.too_long(cx) => {
                let limit = this.wait.limit;
                CutOff::of_body(this.sender).add();
                match this.sender {
                    Peer::Client => {
                        tracing::debug!(
                            timeout = ?limit,
                            "a client's request body stalled; the exchange is cut off"
                        )
                    }
                    Peer::Upstream => {
                        tracing::warn!(
                            timeout = ?limit,
                            "an upstream's response body stalled; the response is cut off"
                        )
                    }
                }
                Poll::Ready(Some(Err(Box::new(BodyStalled(limit)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection whose writes fail with `TimedOut` once one has waited `limit` to be taken (the
/// peer's receive window stays shut); reads pass through untouched.
pub struct WriteStall<I> {
    io: I,
    wait: Wait,
    /// Who should be taking the writes.
    reader: Peer,
}

impl<I> WriteStall<I> {
    pub fn new(io: I, limit: Duration, reader: Peer) -> Self {
        Self {
            io,
            wait: Wait::new(limit),
            reader,
        }
    }

    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending if self.wait.too_long(cx) => {
                CutOff::of_writes(self.reader).add();
                tracing::debug!(
                    timeout = ?self.wait.limit,
                    "a peer took nothing written for the send timeout; closing"
                );
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer took nothing written for {:?}", self.wait.limit),
                )))
            }
            Poll::Pending => Poll::Pending,
            ready => {
                self.wait.ended();
                ready
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteStall<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteStall<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.check(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.check(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.check(cx, polled)
    }
}

/// The same for hyper's own I/O traits: an upstream connection as the pool makes it.
impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for WriteStall<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for WriteStall<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.check(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.check(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.check(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use http_body_util::StreamBody;
    use std::convert::Infallible;
    use tokio::sync::mpsc;

    /// A body fed by a channel: frames arrive when the test sends them.
    fn channel_body() -> (
        mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
        impl Body<Data = Bytes, Error = Infallible> + Unpin,
    ) {
        let (tx, rx) = mpsc::channel(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, StreamBody::new(Box::pin(stream)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_its_reader_waiting_fails() {
        let (tx, body) = channel_body();
        let mut body = IdleTimeout::new(body, Duration::from_secs(60), Peer::Upstream);
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyStalled>(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_starts_the_wait_afresh() {
        let (tx, body) = channel_body();
        let mut body = IdleTimeout::new(body, Duration::from_secs(60), Peer::Upstream);
        let feeder = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .unwrap();
            }
        });
        let mut got = 0;
        while let Some(frame) = body.frame().await {
            got += frame.unwrap().into_data().unwrap().len();
        }
        assert_eq!(got, 5);
        feeder.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_body_needs_no_timer() {
        let body = http_body_util::Full::new(Bytes::from_static(b"whole"));
        let mut body = IdleTimeout::new(body, Duration::from_secs(1), Peer::Upstream);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "whole"
        );
        assert!(body.frame().await.is_none());
        assert!(body.wait.timer.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_fails_after_the_limit() {
        use tokio::io::AsyncWriteExt;
        // A pipe with room for 64 bytes whose other end nobody reads.
        let (near, _far) = tokio::io::duplex(64);
        let mut conn = WriteStall::new(near, Duration::from_secs(60), Peer::Client);
        let started = Instant::now();
        let err = conn.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_is_not_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (near, mut far) = tokio::io::duplex(64);
        let mut conn = WriteStall::new(near, Duration::from_secs(60), Peer::Client);
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            loop {
                tokio::time::sleep(Duration::from_secs(50)).await;
                match far.read(&mut buf).await.unwrap() {
                    0 => return got,
                    n => got += n,
                }
            }
        });
        conn.write_all(&[0u8; 640]).await.unwrap();
        conn.shutdown().await.unwrap();
        drop(conn);
        assert_eq!(reader.await.unwrap(), 640);
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_past_the_end_of_time_waits_and_does_not_panic() {
        let (_tx, body) = channel_body();
        let mut body = IdleTimeout::new(body, Duration::MAX, Peer::Upstream);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
    }
}
