//! HTTP/2 clients that stop reading by withholding flow-control window. Over HTTP/1.1 a client
//! that stops reading fills its socket and [`WriteStall`](crate::idle::WriteStall) sees the
//! write wait. Over HTTP/2 its stack keeps reading the socket but sends no WINDOW_UPDATE, so the
//! socket never fills: hyper holds the frame it was handed and stops asking the response body
//! for the next one until the window opens, and no wait is seen anywhere. Left alone, the stream
//! would hold its upstream connection and a frame of buffers for as long as the client keeps
//! answering pings, up to the 200 streams of each connection.
//!
//! So each HTTP/2 request carries its stream's [`StreamSend`] (in its context), the
//! response body from the upstream is wrapped in a [`SendWatch`] that notes when it hands hyper
//! a frame and when it is asked for the next, and the connection's task looks over its streams
//! ([`StreamSends`]). hyper offers no way to reset one stream from outside, so a stream held
//! for `send_timeout` closes the connection, as a client that stops reading does over HTTP/1.1:
//! gracefully first (GOAWAY), so the connection's other streams have one more `send_timeout`
//! to finish and the client learns which requests were not processed; then at once.
//! Responses keygate makes itself (errors, the admin API's pages) are watched the same way:
//! small as they are, a client that grants no window holds them, its stream, and so the
//! connection (even a graceful close waits for it) for good.
//! The watch goes on each body where it is made (the upstream's, keygate's own) rather than
//! around every response in the server, so an HTTP/1.1 request pays a `None` check per frame:
//! wrapping every response in the server cost ~300 instructions per HTTP/1.1 request
//! (callgrind), moving each response once more.
//!
//! The same holds the other way, for an upload to an HTTP/2 upstream that withholds window:
//! the pool wraps each request body sent on its HTTP/2 connection, and that connection's task
//! looks over them with the upstream's `body_idle_timeout`. hyper's client drives the
//! connection in a task of its own, kept alive by every stream still sending, so ending the
//! dispatching task does not close it: its I/O is [`Severable`], and a stall severs it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

/// Live streams that make the registry look for dead ones: below it, registering never scans.
const PRUNE_FLOOR: usize = 64;

/// The responses of one HTTP/2 connection's streams, as its task sees them.
pub struct StreamSends {
    epoch: Instant,
    streams: Mutex<Streams>,
    /// Streams registered so far.
    opened: AtomicU64,
    /// Streams the client reset before they were answered, within [`PREMATURE_LIFETIME`].
    premature: AtomicU64,
    /// Set when `premature` reaches half of `opened` (past [`RESET_FLOOR`]), for the
    /// connection's task (`flood_waker`). Not a `tokio::sync::Notify`: its every poll takes a
    /// lock, and the connection's task polls it at each wake, HTTP/1.1's included (~500
    /// instructions per request, callgrind).
    flooded: AtomicBool,
    flood_waker: AtomicWaker,
}

/// A stream the client resets before its answer, this soon after opening it, cost the client
/// nothing while keygate (and the upstream) went to work on it: HTTP/2's "rapid reset"
/// (CVE-2023-44487). Envoy's default, which a client that cancels after waiting a while stays
/// clear of.
const PREMATURE_LIFETIME: Duration = Duration::from_secs(1);

/// Streams a connection opens before its resets are judged: Envoy's
/// `premature_reset_total_stream_count`. A connection with at least this many streams, half of
/// them reset prematurely, is closed.
const RESET_FLOOR: u64 = 500;

struct Streams {
    /// A stream's entry dies with its response body; dead entries go at the next look-over or
    /// when the list has doubled.
    sends: Vec<Weak<StreamSend>>,
    prune_at: usize,
}

/// What the look-over found.
#[derive(Debug, PartialEq, Eq)]
pub enum Sends {
    /// No stream's response has waited the limit; look again then.
    MovingUntil(Instant),
    /// A stream's response has waited the limit for the client to take its last frame.
    Stalled,
}

impl Default for StreamSends {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            streams: Mutex::new(Streams {
                sends: Vec::new(),
                prune_at: PRUNE_FLOOR,
            }),
            opened: AtomicU64::new(0),
            premature: AtomicU64::new(0),
            flooded: AtomicBool::new(false),
            flood_waker: AtomicWaker::new(),
        }
    }
}

impl StreamSends {
    /// A new stream's response, to be watched until its body is dropped.
    pub fn register(self: &Arc<Self>) -> Arc<StreamSend> {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let send = Arc::new(StreamSend {
            opened_at: self.epoch.elapsed(),
            sends: self.clone(),
            answered: AtomicBool::new(false),
            held_since: AtomicU64::new(NOT_HELD),
        });
        let mut streams = self.lock();
        if streams.sends.len() >= streams.prune_at {
            streams.sends.retain(|s| s.strong_count() > 0);
            streams.prune_at = (streams.sends.len() * 2).max(PRUNE_FLOOR);
        }
        streams.sends.push(Arc::downgrade(&send));
        send
    }

    /// Whether a stream's response has waited `limit` for hyper to ask for its next frame, and
    /// otherwise when to look again: when the oldest wait reaches `limit`, or `limit` from now
    /// (a wait that begins later is seen within twice the limit).
    pub fn look_over(&self, limit: Duration) -> Sends {
        let now = Instant::now();
        let mut next = now + limit;
        let mut streams = self.lock();
        let mut stalled = false;
        streams.sends.retain(|s| {
            let Some(send) = s.upgrade() else {
                return false;
            };
            if let Some(since) = send.held_since() {
                let due = since + limit;
                if due <= now {
                    stalled = true;
                }
                next = next.min(due);
            }
            true
        });
        streams.prune_at = (streams.sends.len() * 2).max(PRUNE_FLOOR);
        if stalled {
            Sends::Stalled
        } else {
            Sends::MovingUntil(next)
        }
    }

    /// Ends once the client has reset at least half of the connection's streams before their
    /// answers, soon after opening them, over at least [`RESET_FLOOR`] streams; again at each
    /// such reset after that.
    pub fn reset_flood(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            if self.take_flood() {
                return Poll::Ready(());
            }
            self.flood_waker.register(cx.waker());
            if self.take_flood() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    fn take_flood(&self) -> bool {
        self.flooded.load(Ordering::Acquire) && self.flooded.swap(false, Ordering::AcqRel)
    }

    fn reset_prematurely(&self) {
        let premature = self.premature.fetch_add(1, Ordering::Relaxed) + 1;
        let opened = self.opened.load(Ordering::Relaxed);
        if opened >= RESET_FLOOR && premature.saturating_mul(2) >= opened {
            self.flooded.store(true, Ordering::Release);
            self.flood_waker.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Streams> {
        // The lists are whole after any panic (push and retain), so a poisoned lock is usable.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

const NOT_HELD: u64 = 0;

/// One stream's response: since when hyper has held a frame without asking for the next.
pub struct StreamSend {
    /// After the connection's epoch.
    opened_at: Duration,
    sends: Arc<StreamSends>,
    /// Set once the stream's response exists (its body is watched); hyper drops a stream's
    /// request future, and with it this entry, when the client resets the stream first.
    answered: AtomicBool,
    /// Nanoseconds after the epoch, plus one; [`NOT_HELD`] while hyper is asking or the body
    /// is done.
    held_since: AtomicU64,
}

impl Drop for StreamSend {
    fn drop(&mut self) {
        if !self.answered.load(Ordering::Relaxed)
            && self.sends.epoch.elapsed().saturating_sub(self.opened_at) < PREMATURE_LIFETIME
        {
            self.sends.reset_prematurely();
        }
    }
}

impl StreamSend {
    fn asked(&self) {
        self.held_since.store(NOT_HELD, Ordering::Relaxed);
    }

    fn handed_a_frame(&self) {
        let since = u64::try_from(self.sends.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.held_since.store(since + 1, Ordering::Relaxed);
    }

    fn held_since(&self) -> Option<Instant> {
        match self.held_since.load(Ordering::Relaxed) {
            NOT_HELD => None,
            n => Some(self.sends.epoch + Duration::from_nanos(n - 1)),
        }
    }
}

/// The most a watched body hands hyper at once: HTTP/2's default largest frame. hyper asks for
/// the next piece only once the stream's window covers what it holds and one byte more
/// (h2's `capacity()` is the window beyond what is buffered), so a wait measures how long the
/// stream stood without window (nginx's `send_timeout` over HTTP/2) rather than how long a
/// client took over a whole piece: unsplit, a client reading steadily at under 64 KiB (an
/// upstream read) per `send_timeout` was cut off.
///
/// The piece that ends the stream is different: hyper hands it to h2 once the stream has any
/// window at all and drops the body at once, the data still waiting in h2 for the rest of the
/// window. So a body's last byte goes alone, after the rest: hyper asks for it only once the
/// window covers everything before it, and that byte then has its window too. Without this, a
/// client that granted one byte (its initial window 1) held a response, a 401 included, and its
/// connection for good (a review found it).
const PIECE_BYTES: usize = 16 * 1024;

pin_project! {
    /// A body that tells its stream's [`StreamSend`] when it hands over a frame and when it is
    /// asked for the next, handing data over [`PIECE_BYTES`] at a time; without a stream
    /// (HTTP/1.1) it only passes frames on.
    pub struct SendWatch<B> {
        #[pin]
        inner: B,
        send: Option<Arc<StreamSend>>,
        // What is left of the frame being handed over in pieces.
        rest: Bytes,
    }
}

impl<B> SendWatch<B> {
    pub fn new(inner: B, send: Option<Arc<StreamSend>>) -> Self {
        if let Some(send) = &send {
            send.answered.store(true, Ordering::Relaxed);
        }
        Self {
            inner,
            send,
            rest: Bytes::new(),
        }
    }

    /// [`Self::new`] for an answer keygate makes itself (an error, the admin API's): the
    /// stream is answered, and left out of the streams the reset-flood rule weighs resets
    /// against, or a client could dilute resets that cost the upstream work with requests
    /// keygate refuses at no cost (review: two keyless requests per reset hid any number).
    pub fn answering_here(inner: B, send: Option<Arc<StreamSend>>) -> Self {
        if let Some(send) = &send {
            send.sends.opened.fetch_sub(1, Ordering::Relaxed);
        }
        Self::new(inner, send)
    }

    /// The body, no longer watched. Only for a body not yet polled: a piece held back would
    /// be lost.
    pub fn into_inner(self) -> B {
        debug_assert!(self.rest.is_empty());
        self.inner
    }
}

impl<B: Body<Data = Bytes>> Body for SendWatch<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let Some(send) = this.send.as_ref() else {
            return this.inner.poll_frame(cx);
        };
        send.asked();
        let mut data = if this.rest.is_empty() {
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                ended => return Poll::Ready(ended),
            }
        } else {
            std::mem::take(this.rest)
        };
        if data.len() > PIECE_BYTES {
            *this.rest = data.split_off(PIECE_BYTES);
        } else if data.len() > 1 && this.inner.is_end_stream() {
            *this.rest = data.split_off(data.len() - 1);
        }
        // Every piece with data waits for window, the last one too: hyper keeps it until the
        // stream has window (a review found single-frame responses, and the last frame of every
        // sized one, held unwatched when the last frame was left out). Empty frames need none.
        if !data.is_empty() {
            send.handed_a_frame();
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        if self.rest.is_empty() {
            return inner;
        }
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// Cuts a connection from outside the task that drives it: once severed, its reads and writes
/// fail, and the task, waiting to read, is woken to find out.
#[derive(Default)]
pub struct Severance {
    severed: AtomicBool,
    reader: AtomicWaker,
}

impl Severance {
    pub fn sever(&self) {
        self.severed.store(true, Ordering::Release);
        self.reader.wake();
    }

    fn check(&self) -> io::Result<()> {
        if self.severed.load(Ordering::Acquire) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection was cut off",
            ))
        } else {
            Ok(())
        }
    }
}

/// A connection (hyper's I/O traits) that a [`Severance`] can cut.
pub struct Severable<I> {
    io: I,
    severance: Arc<Severance>,
}

impl<I> Severable<I> {
    pub fn new(io: I, severance: Arc<Severance>) -> Self {
        Self { io, severance }
    }
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for Severable<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.severance.reader.register(cx.waker());
        this.severance.check()?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for Severable<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.severance.check()?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.severance.check()?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.severance.check()?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const LIMIT: Duration = Duration::from_secs(60);

    fn two_frames() -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames = [b"a", b"b"].map(|d| Ok(Frame::data(Bytes::from_static(d))));
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_hyper_holds_for_the_limit_is_a_stall() {
        let sends = Arc::new(StreamSends::default());
        let mut body = SendWatch::new(two_frames(), Some(sends.register()));
        body.frame().await.unwrap().unwrap();
        let started = Instant::now();
        assert_eq!(sends.look_over(LIMIT), Sends::MovingUntil(started + LIMIT));
        tokio::time::advance(LIMIT - Duration::from_secs(1)).await;
        assert_eq!(sends.look_over(LIMIT), Sends::MovingUntil(started + LIMIT));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(sends.look_over(LIMIT), Sends::Stalled);
    }

    #[tokio::test(start_paused = true)]
    async fn asking_for_the_next_frame_ends_the_wait() {
        let sends = Arc::new(StreamSends::default());
        let mut body = SendWatch::new(two_frames(), Some(sends.register()));
        body.frame().await.unwrap().unwrap();
        tokio::time::advance(LIMIT - Duration::from_secs(1)).await;
        body.frame().await.unwrap().unwrap();
        // The second frame is not the last (the stream does not know yet), so it is held anew.
        let now = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(sends.look_over(LIMIT), Sends::MovingUntil(now + LIMIT));
        assert!(body.frame().await.is_none());
        let now = Instant::now();
        assert_eq!(sends.look_over(LIMIT), Sends::MovingUntil(now + LIMIT));
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_frame_waits_until_the_body_is_dropped() {
        let sends = Arc::new(StreamSends::default());
        let mut whole = SendWatch::new(
            http_body_util::Full::new(Bytes::from_static(b"whole")),
            Some(sends.register()),
        );
        whole.frame().await.unwrap().unwrap();
        let started = Instant::now();
        tokio::time::advance(LIMIT).await;
        assert_eq!(
            sends.look_over(LIMIT),
            Sends::Stalled,
            "a last frame never sent"
        );
        drop(whole);
        let now = Instant::now();
        assert_eq!(sends.look_over(LIMIT), Sends::MovingUntil(now + LIMIT));
        assert!(
            sends.lock().sends.is_empty(),
            "the dropped stream's entry is gone"
        );
        assert!(now > started);
    }

    /// Whether `reset_flood` has been woken (without waiting).
    fn flooded(sends: &StreamSends) -> bool {
        let notified = sends.reset_flood();
        let mut notified = std::pin::pin!(notified);
        notified
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
            .is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn half_of_500_streams_dropped_unanswered_at_once_is_a_reset_flood() {
        let sends = Arc::new(StreamSends::default());
        // Answered streams, and streams dropped unanswered after waiting a second: not resets
        // that cost the client nothing.
        for _ in 0..200 {
            drop(SendWatch::new(two_frames(), Some(sends.register())));
        }
        let waited: Vec<_> = (0..100).map(|_| sends.register()).collect();
        tokio::time::advance(PREMATURE_LIFETIME).await;
        drop(waited);
        assert!(!flooded(&sends));
        // 300 streams so far; 299 reset at once make 599, 299 of them premature.
        for _ in 0..299 {
            drop(sends.register());
        }
        assert!(!flooded(&sends), "under half");
        drop(sends.register());
        assert!(flooded(&sends), "300 of 600");
        // Each further one wakes it again.
        assert!(!flooded(&sends));
        drop(sends.register());
        assert!(flooded(&sends));
    }

    #[tokio::test(start_paused = true)]
    async fn streams_keygate_answers_itself_do_not_dilute_resets() {
        let sends = Arc::new(StreamSends::default());
        for _ in 0..1000 {
            drop(SendWatch::answering_here(
                two_frames(),
                Some(sends.register()),
            ));
        }
        for _ in 0..499 {
            drop(sends.register());
        }
        assert!(!flooded(&sends), "499 streams weighed");
        drop(sends.register());
        assert!(flooded(&sends), "500 of 500 reset");
    }

    #[tokio::test(start_paused = true)]
    async fn resets_on_a_young_connection_are_not_judged() {
        let sends = Arc::new(StreamSends::default());
        for _ in 0..RESET_FLOOR - 1 {
            drop(sends.register());
        }
        assert!(!flooded(&sends), "499 streams, all reset");
    }

    #[tokio::test(start_paused = true)]
    async fn dead_entries_do_not_pile_up_between_look_overs() {
        let sends = Arc::new(StreamSends::default());
        let live: Vec<_> = (0..10).map(|_| sends.register()).collect();
        for _ in 0..10_000 {
            drop(sends.register());
        }
        let len = sends.lock().sends.len();
        assert!(len <= 2 * PRUNE_FLOOR, "{len} entries for 10 live streams");
        drop(live);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_frame_is_handed_over_in_pieces_each_awaited() {
        let sends = Arc::new(StreamSends::default());
        let whole = Bytes::from((0..40_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let mut body = SendWatch::new(
            http_body_util::Full::new(whole.clone()),
            Some(sends.register()),
        );
        assert_eq!(body.size_hint().exact(), Some(40_000));
        let (mut got, mut sizes) = (Vec::new(), Vec::new());
        while let Some(frame) = body.frame().await {
            let piece = frame.unwrap().into_data().unwrap();
            sizes.push(piece.len());
            let started = Instant::now();
            tokio::time::advance(LIMIT).await;
            assert_eq!(sends.look_over(LIMIT), Sends::Stalled, "each piece waits");
            let left = whole.len() - got.len() - piece.len();
            assert_eq!(body.size_hint().exact(), Some(left as u64));
            assert_eq!(body.is_end_stream(), left == 0);
            got.extend_from_slice(&piece);
            assert!(Instant::now() > started);
        }
        assert_eq!(got, whole);
        // The last byte alone, so that hyper asks for it only once the rest has window.
        assert_eq!(
            sizes,
            [PIECE_BYTES, PIECE_BYTES, 40_000 - 2 * PIECE_BYTES - 1, 1]
        );
    }

    #[tokio::test]
    async fn only_a_body_known_to_end_keeps_its_last_byte_back() {
        let sends = Arc::new(StreamSends::default());
        let mut sized = SendWatch::new(
            http_body_util::Full::new(Bytes::from_static(b"whole")),
            Some(sends.register()),
        );
        let mut pieces = Vec::new();
        while let Some(frame) = sized.frame().await {
            pieces.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(pieces, ["whol", "e"]);
        // A stream whose end shows only as its `None` (chunked): frames go whole. hyper asks
        // for that `None` only once the last frame has window, so the last wait is seen.
        let frames = [b"abc", b"def"].map(|d| Ok(Frame::data(Bytes::from_static(d))));
        let mut chunked = SendWatch::new(
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)),
            Some(sends.register()),
        )
        .map_err(|e: std::convert::Infallible| e);
        let mut pieces = Vec::new();
        while let Some(frame) = chunked.frame().await {
            pieces.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(pieces, ["abc", "def"]);
    }

    #[tokio::test]
    async fn trailers_and_empty_frames_pass_and_wait_for_nothing() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = [Frame::data(Bytes::new()), Frame::trailers(trailers.clone())]
            .map(Ok::<_, std::convert::Infallible>);
        let sends = Arc::new(StreamSends::default());
        let mut body = SendWatch::new(
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)),
            Some(sends.register()),
        );
        assert!(
            body.frame()
                .await
                .unwrap()
                .unwrap()
                .data_ref()
                .unwrap()
                .is_empty()
        );
        assert!(matches!(sends.look_over(LIMIT), Sends::MovingUntil(_)));
        let last = body.frame().await.unwrap().unwrap();
        assert_eq!(last.trailers_ref(), Some(&trailers));
        assert!(
            sends.lock().sends[0]
                .upgrade()
                .unwrap()
                .held_since()
                .is_none()
        );
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn without_a_stream_frames_pass_whole() {
        let whole = Bytes::from(vec![7u8; 40_000]);
        let mut body = SendWatch::new(http_body_util::Full::new(whole.clone()), None);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            whole
        );
    }

    #[tokio::test]
    async fn without_a_stream_frames_only_pass_through() {
        let body = SendWatch::new(two_frames(), None);
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got, "ab");
    }
}
