//! hyper's connection for the HTTP a client speaks: HTTP/2 when it opens with the preface
//! (prior-knowledge h2c, or h2 over TLS), HTTP/1.1 (with upgrades) otherwise.
//!
//! hyper-util's auto builder did this before. It read exactly the preface's 24 bytes and
//! handed them to hyper in a read of their own, so hyper parsed a request head that had
//! arrived whole in two goes: the second after scanning for the head's end and growing its
//! 8 KiB buffer by copying it. It also cloned its builder for every connection. Here the
//! protocol is told from [`ReadAhead`]'s first read, which hyper then gets whole, and there
//! is no rewinding layer under every later read: 66 477 → 62 116 instructions for a request
//! on a new connection, 48 051 → 47 188 on a kept-alive one (callgrind,
//! `NEWCONN=1 bash benches/load/instructions.sh`).

use super::read_ahead::{Protocol, ReadAhead};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// hyper's two connection builders, configured once per listener.
pub struct Builders {
    pub http1: http1::Builder,
    pub http2: http2::Builder<TokioExecutor>,
}

pin_project_lite::pin_project! {
    /// One client connection, served until it closes. Drop it to close it at once.
    pub struct HttpConnection<I, S>
    where
        S: HttpService<Incoming>,
    {
        #[pin]
        state: State<I, S>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<I, S>
    where
        S: HttpService<Incoming>,
    {
        /// Waiting for the first bytes.
        Opening {
            io: Option<ReadAhead<I>>,
            service: Option<S>,
            builders: std::sync::Arc<Builders>,
        },
        Http1 {
            #[pin]
            conn: http1::UpgradeableConnection<TokioIo<ReadAhead<I>>, S>,
        },
        Http2 {
            #[pin]
            conn: http2::Connection<TokioIo<ReadAhead<I>>, S, TokioExecutor>,
        },
        /// Shut down before it said anything.
        Closed,
    }
}

impl<I, S> HttpConnection<I, S>
where
    S: HttpService<Incoming>,
{
    pub fn new(builders: std::sync::Arc<Builders>, io: I, service: S) -> Self {
        Self {
            state: State::Opening {
                io: Some(ReadAhead::new(io)),
                service: Some(service),
                builders,
            },
        }
    }
}

impl<I, S> HttpConnection<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<BoxError>,
{
    /// Finishes the requests under way and closes (HTTP/2: GOAWAY first); a connection that
    /// has not said anything yet closes at once. Keep polling it until it ends.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        let mut state = self.project().state;
        match state.as_mut().project() {
            StateProj::Opening { .. } => state.set(State::Closed),
            StateProj::Http1 { conn } => conn.graceful_shutdown(),
            StateProj::Http2 { conn } => conn.graceful_shutdown(),
            StateProj::Closed => {}
        }
    }
}

impl<I, S> Future for HttpConnection<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            let next = match state.as_mut().project() {
                StateProj::Opening {
                    io,
                    service,
                    builders,
                } => {
                    let Some(reader) = io.as_mut() else {
                        return Poll::Ready(Ok(()));
                    };
                    let protocol = ready!(reader.poll_protocol(cx))?;
                    let (Some(io), Some(service)) = (io.take(), service.take()) else {
                        return Poll::Ready(Ok(()));
                    };
                    let io = TokioIo::new(io);
                    match protocol {
                        Protocol::Http1 => State::Http1 {
                            conn: builders.http1.serve_connection(io, service).with_upgrades(),
                        },
                        Protocol::Http2 => State::Http2 {
                            conn: builders.http2.serve_connection(io, service),
                        },
                    }
                }
                StateProj::Http1 { conn } => return conn.poll(cx).map_err(Into::into),
                StateProj::Http2 { conn } => return conn.poll(cx).map_err(Into::into),
                StateProj::Closed => return Poll::Ready(Ok(())),
            };
            state.set(next);
        }
    }
}
