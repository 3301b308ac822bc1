//! A body that fails once it has kept its reader waiting for `limit` without a frame: a client
//! that stops sending its upload half-way, or an upstream that stops sending its response,
//! would otherwise hold the client's connection, the upstream connection and their buffers for
//! as long as the peer keeps the socket open (nginx's `client_body_timeout` and
//! `proxy_read_timeout`, 60 s each by default, do this job there).
//!
//! The wait begins when the reader asks and nothing is there, and ends with the next frame.
//! Time the reader spends elsewhere is not counted: hyper stops asking for a body while the far
//! side is not taking what was already written, and that stall is the far side's.

use super::BoxError;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

pub struct IdleTimeout<B> {
    inner: B,
    limit: Duration,
    /// Whose body this is, for the log line when it stalls.
    what: &'static str,
    /// Made on the first wait: a body whose frames are all there when asked for (most small
    /// ones) never allocates a timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// When the current wait ends; `None` between waits.
    deadline: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
#[error("the body sent nothing for {0:?}")]
pub struct BodyStalled(pub Duration);

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, limit: Duration, what: &'static str) -> Self {
        Self {
            inner,
            limit,
            what,
            timer: None,
            deadline: None,
        }
    }

    /// Whether the reader has waited `limit` since this wait began; arms the timer to wake it
    /// then.
    fn waited_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + limit);
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
                this.deadline = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending if this.waited_too_long(cx) => {
                tracing::warn!(timeout = ?this.limit, "{} sent nothing for its idle timeout; the exchange is cut off", this.what);
                Poll::Ready(Some(Err(Box::new(BodyStalled(this.limit)))))
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
        let mut body = IdleTimeout::new(body, Duration::from_secs(60), "a test body");
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
        let mut body = IdleTimeout::new(body, Duration::from_secs(60), "a test body");
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
        let mut body = IdleTimeout::new(body, Duration::from_secs(1), "a test body");
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "whole"
        );
        assert!(body.frame().await.is_none());
        assert!(body.timer.is_none());
    }
}
