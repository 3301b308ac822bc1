//! Bodies of unknown length (chunked, or ended by the sender closing), read ahead for as long
//! as their frames are already there before they are handed on. Both ways a body crosses two
//! tasks (a client connection's and an upstream connection's, joined by hyper's body channel,
//! which holds one frame): without this, the last chunk and the chunked terminator reach the
//! writing side one task poll apart, and hyper writes them separately, the head and data, then
//! the 5-byte `0\r\n\r\n` (strace: three `writev` per proxied request instead of two). Read
//! ahead, the head, the frames and, when the sender had finished, the end go in one system
//! call. A body whose length is known needs none of this: hyper ends it with its last data
//! frame. A body read ahead whole has an exact size, so hyper sends it with a `Content-Length`
//! (framing is hop-by-hop: the proxy picks it), unless it has trailers; one still streaming
//! stays chunked.

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

/// How much of a body is read ahead at most; beyond it the rest streams as it comes. The same
/// bound as an upstream connection's own buffer.
pub const READ_AHEAD_MAX_BYTES: usize = 64 * 1024;

/// A body as it is (the common case, no allocation), or what was read ahead followed by the
/// rest of it.
pub enum ReadAheadBody<B: Body> {
    Streaming(B),
    ReadAhead(Box<Ahead<B>>),
}

/// The frames read ahead, then the rest of the stream.
pub struct Ahead<B: Body> {
    frames: VecDeque<Frame<Bytes>>,
    /// An error met while reading ahead, given out after the frames read before it.
    error: Option<B::Error>,
    /// `None` once the body has ended (or failed).
    rest: Option<B>,
}

impl<B> ReadAheadBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    /// Reads ahead what `body` already has, when its length is unknown. It takes the frames that
    /// are ready, lets the other tasks run once (the sending connection's task decodes the next
    /// chunk or the end then), takes what became ready, and stops at the first frame that is
    /// still not there, at the end, or at [`READ_AHEAD_MAX_BYTES`]. A stream (server-sent
    /// events, a long poll, a slow upload) so waits one scheduler round, never for data.
    ///
    /// Not an `async fn`, which would keep `body` twice; nor is a frame kept across the yield.
    /// Its future is part of every request's future (both ways), and copied with it.
    // The `async fn` clippy asks for is the larger future (see above).
    #[allow(clippy::manual_async_fn)]
    pub fn read_ahead(mut body: B) -> impl Future<Output = Self> {
        async move {
            if body.is_end_stream() || body.size_hint().exact().is_some() {
                return ReadAheadBody::Streaming(body);
            }
            let mut frames = VecDeque::new();
            let mut bytes = 0;
            let mut yielded = false;
            loop {
                let step =
                    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)));
                let yield_now = match step.await {
                    Poll::Ready(Some(Ok(frame))) => {
                        let len = frame.data_ref().map_or(0, Buf::remaining);
                        if len == 0 && frame.is_data() {
                            // An HTTP/2 stream may end with an empty DATA frame. Kept, it would
                            // make a bodiless request look like one with a body of 0 bytes (and
                            // get a `content-length: 0` upstream).
                            continue;
                        }
                        bytes += len;
                        frames.push_back(frame);
                        if bytes >= READ_AHEAD_MAX_BYTES {
                            return Self::with_rest(frames, None, Some(body));
                        }
                        false
                    }
                    Poll::Ready(Some(Err(error))) => {
                        return Self::with_rest(frames, Some(error), None);
                    }
                    Poll::Ready(None) => return Self::with_rest(frames, None, None),
                    Poll::Pending if !yielded => true,
                    Poll::Pending if frames.is_empty() => return ReadAheadBody::Streaming(body),
                    Poll::Pending => return Self::with_rest(frames, None, Some(body)),
                };
                if yield_now {
                    yielded = true;
                    // After the tasks already woken (the sending connection's among them), not
                    // before them as a plain self-wake could be.
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    /// The body failed before it gave a single frame: nothing of it can reach the client, so
    /// the response is better answered as a failed exchange than sent as a head with a cut body.
    pub fn failed_before_any_frame(&self) -> bool {
        matches!(self, ReadAheadBody::ReadAhead(ahead) if ahead.frames.is_empty() && ahead.error.is_some())
    }

    fn with_rest(frames: VecDeque<Frame<Bytes>>, error: Option<B::Error>, rest: Option<B>) -> Self {
        ReadAheadBody::ReadAhead(Box::new(Ahead {
            frames,
            error,
            rest,
        }))
    }
}

// Nothing in it is ever pinned in place: the frames and the error are only moved, and `rest`
// (`Unpin` itself) is polled through `Pin::new`.
impl<B: Body + Unpin> Unpin for Ahead<B> {}

impl<B> Body for Ahead<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let next = Pin::new(rest).poll_frame(cx);
        if matches!(next, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // Ended: not polled again.
            this.rest = None;
        }
        next
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self
            .frames
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.remaining() as u64)
            .sum();
        let trailers = self.frames.iter().any(Frame::is_trailers);
        match &self.rest {
            // The whole body is here: hyper sends it with a `Content-Length` (the sender's
            // `Transfer-Encoding` is hop-by-hop, not forwarded). Not with trailers, which only
            // chunked encoding can carry.
            None if self.error.is_none() && !trailers => SizeHint::with_exact(held),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(held);
                hint
            }
            Some(rest) => after_prefix(held, &rest.size_hint()),
        }
    }
}

/// The size of `held` bytes already read followed by a stream of size `rest`.
pub fn after_prefix(held: u64, rest: &SizeHint) -> SizeHint {
    let mut hint = SizeHint::new();
    hint.set_lower(rest.lower().saturating_add(held));
    if let Some(upper) = rest.upper() {
        hint.set_upper(upper.saturating_add(held));
    }
    hint
}

impl<B> Body for ReadAheadBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut polled = match self.get_mut() {
            ReadAheadBody::Streaming(body) => Pin::new(body).poll_frame(cx),
            ReadAheadBody::ReadAhead(ahead) => Pin::new(ahead.as_mut()).poll_frame(cx),
        };
        if let Poll::Ready(Some(Ok(frame))) = &mut polled
            && let Some(trailers) = frame.trailers_mut()
        {
            crate::proxy::headers::remove_hop_by_hop_from_trailers(trailers);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReadAheadBody::Streaming(body) => body.is_end_stream(),
            ReadAheadBody::ReadAhead(ahead) => ahead.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReadAheadBody::Streaming(body) => body.size_hint(),
            ReadAheadBody::ReadAhead(ahead) => ahead.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::sync::mpsc;

    type Item = Result<Frame<Bytes>, std::io::Error>;

    /// A body of unknown length fed by a channel, as hyper's `Incoming` is fed by the upstream
    /// connection's task.
    fn channel_body() -> (
        mpsc::UnboundedSender<Item>,
        StreamBody<tokio_stream_shim::Receiver<Item>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, StreamBody::new(tokio_stream_shim::Receiver(rx)))
    }

    /// `tokio::sync::mpsc::UnboundedReceiver` as a `Stream`, without another dependency.
    mod tokio_stream_shim {
        use futures_util::Stream;
        use std::pin::Pin;
        use std::task::{Context, Poll};
        pub struct Receiver<T>(pub tokio::sync::mpsc::UnboundedReceiver<T>);
        impl<T> Stream for Receiver<T> {
            type Item = T;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
                self.0.poll_recv(cx)
            }
        }
    }

    fn data(text: &'static str) -> Item {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    fn is_read_ahead<B: Body>(body: &ReadAheadBody<B>) -> bool {
        matches!(body, ReadAheadBody::ReadAhead(_))
    }

    async fn collect<B>(body: ReadAheadBody<B>) -> Result<Vec<u8>, B::Error>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[test]
    fn a_prefix_adds_to_both_bounds_of_the_rest() {
        assert_eq!(after_prefix(5, &SizeHint::with_exact(10)).exact(), Some(15));
        let mut open = SizeHint::new();
        open.set_lower(3);
        let hint = after_prefix(5, &open);
        assert_eq!((hint.lower(), hint.upper()), (8, None));
        let huge = after_prefix(5, &SizeHint::with_exact(u64::MAX));
        assert_eq!((huge.lower(), huge.upper()), (u64::MAX, Some(u64::MAX)));
    }

    #[tokio::test]
    async fn a_still_open_rest_after_frames_gives_a_lower_bound_only() {
        let (tx, body) = channel_body();
        tx.send(data("abc")).unwrap();
        let body = ReadAheadBody::read_ahead(body).await;
        assert_eq!(
            (body.size_hint().lower(), body.size_hint().upper()),
            (3, None)
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_body_of_known_length_streams_as_it_is() {
        let body = ReadAheadBody::read_ahead(Full::new(Bytes::from_static(b"hello"))).await;
        assert!(!is_read_ahead(&body));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(collect(body).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn frames_already_there_and_the_end_are_read_ahead_so_the_last_frame_ends_the_body() {
        let (tx, body) = channel_body();
        tx.send(data("ab")).unwrap();
        tx.send(data("cd")).unwrap();
        drop(tx);
        let mut body = ReadAheadBody::read_ahead(body).await;
        assert!(is_read_ahead(&body));
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(4));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "ab");
        let second = body.frame().await.unwrap().unwrap();
        assert_eq!(second.into_data().unwrap(), "cd");
        // What lets hyper write the chunked terminator with the last chunk.
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_end_decoded_by_another_task_meanwhile_is_read_ahead_too() {
        let (tx, body) = channel_body();
        tx.send(data("last chunk")).unwrap();
        // Runs during the read-ahead's one yield, as the upstream connection's task would.
        tokio::spawn(async move { drop(tx) });
        let mut body = ReadAheadBody::read_ahead(body).await;
        let only = body.frame().await.unwrap().unwrap();
        assert_eq!(only.into_data().unwrap(), "last chunk");
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_stream_still_open_is_read_ahead_up_to_what_is_there_and_then_streams() {
        let (tx, body) = channel_body();
        tx.send(data("event: 1\n\n")).unwrap();
        let mut body = ReadAheadBody::read_ahead(body).await;
        assert!(is_read_ahead(&body));
        assert!(!body.is_end_stream());
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "event: 1\n\n");
        assert!(!body.is_end_stream());
        tx.send(data("event: 2\n\n")).unwrap();
        let second = body.frame().await.unwrap().unwrap();
        assert_eq!(second.into_data().unwrap(), "event: 2\n\n");
        drop(tx);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn nothing_there_yet_gives_the_stream_back_unboxed() {
        let (tx, body) = channel_body();
        let body = ReadAheadBody::read_ahead(body).await;
        assert!(!is_read_ahead(&body));
        tx.send(data("later")).unwrap();
        drop(tx);
        assert_eq!(collect(body).await.unwrap(), b"later");
    }

    #[tokio::test]
    async fn an_error_comes_after_the_frames_read_before_it() {
        let (tx, body) = channel_body();
        tx.send(data("partial")).unwrap();
        tx.send(Err(std::io::Error::other("upstream reset")))
            .unwrap();
        tx.send(data("never")).unwrap();
        let mut body = ReadAheadBody::read_ahead(body).await;
        assert!(!body.is_end_stream());
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "partial");
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "upstream reset");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn an_error_before_any_frame_is_told_apart_from_one_after_data() {
        let (tx, body) = channel_body();
        tx.send(Err(std::io::Error::other("bad chunk size")))
            .unwrap();
        assert!(
            ReadAheadBody::read_ahead(body)
                .await
                .failed_before_any_frame()
        );
        let (tx, body) = channel_body();
        tx.send(data("partial")).unwrap();
        tx.send(Err(std::io::Error::other("upstream reset")))
            .unwrap();
        assert!(
            !ReadAheadBody::read_ahead(body)
                .await
                .failed_before_any_frame()
        );
        let (tx, body) = channel_body();
        tx.send(data("fine")).unwrap();
        drop(tx);
        assert!(
            !ReadAheadBody::read_ahead(body)
                .await
                .failed_before_any_frame()
        );
    }

    #[tokio::test]
    async fn empty_data_frames_are_dropped_so_an_empty_body_is_an_ended_one() {
        let (tx, body) = channel_body();
        tx.send(data("")).unwrap();
        drop(tx);
        let body = ReadAheadBody::read_ahead(body).await;
        // hyper then sends no body and no `Content-Length: 0`, as for a bodiless request.
        assert!(body.is_end_stream());
        let (tx, body) = channel_body();
        tx.send(data("")).unwrap();
        tx.send(data("x")).unwrap();
        tx.send(data("")).unwrap();
        drop(tx);
        let body = ReadAheadBody::read_ahead(body).await;
        assert_eq!(body.size_hint().exact(), Some(1));
        assert_eq!(collect(body).await.unwrap(), b"x");
    }

    #[tokio::test]
    async fn trailers_are_kept_in_order() {
        let (tx, body) = channel_body();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        tx.send(data("payload")).unwrap();
        tx.send(Ok(Frame::trailers(trailers.clone()))).unwrap();
        drop(tx);
        let body = ReadAheadBody::read_ahead(body).await;
        // Only chunked encoding carries trailers: no exact length that would make it a
        // `Content-Length` response.
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(body.size_hint().lower(), 7);
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "payload");
    }

    #[tokio::test]
    async fn reading_ahead_stops_at_the_bound_and_the_rest_streams() {
        let (tx, body) = channel_body();
        let chunk = Bytes::from(vec![7u8; 16 * 1024]);
        let chunks = READ_AHEAD_MAX_BYTES / chunk.len() + 3;
        for _ in 0..chunks {
            tx.send(Ok(Frame::data(chunk.clone()))).unwrap();
        }
        drop(tx);
        let body = ReadAheadBody::read_ahead(body).await;
        match &body {
            ReadAheadBody::ReadAhead(ahead) => {
                let held: usize = ahead
                    .frames
                    .iter()
                    .filter_map(|f| f.data_ref())
                    .map(Bytes::len)
                    .sum();
                assert_eq!(held, READ_AHEAD_MAX_BYTES);
                assert!(ahead.rest.is_some());
            }
            ReadAheadBody::Streaming(_) => panic!("nothing read ahead"),
        }
        assert_eq!(collect(body).await.unwrap().len(), chunks * chunk.len());
    }
}
