//! The first read of a connection, made large, and the protocol told from it.
//!
//! [`ReadAhead`] answers the first read from one read of up to [`READ_AHEAD_BYTES`] and hands
//! out what is left before touching the socket again, so a request that arrived in one segment
//! costs one `recvfrom` (protocol detection that read the 24 bytes of the HTTP/2 preface on
//! their own measured 3.6 reads per request on a new connection against nginx's 2.0).
//! [`ReadAhead::poll_protocol`] tells HTTP/2 from HTTP/1.1 by looking at those bytes, so hyper
//! then gets them whole. The buffer is freed once drained: reads after it go straight to the
//! socket, and an idle connection keeps no extra memory.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read on the first read when the reader asks for fewer: what hyper's own first read
/// asks for (its 16 KiB buffer), so a small request's head and body still arrive in one read
/// and go upstream in one write. Not zeroed; only the bytes read are kept.
pub const READ_AHEAD_BYTES: usize = 16 * 1024;

/// What an HTTP/2 client sends first (RFC 9113, 3.4): prior-knowledge h2c, or h2 over TLS.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The HTTP a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

pub struct ReadAhead<I> {
    io: I,
    state: State,
}

enum State {
    /// Nothing read yet.
    First,
    /// Read ahead and not handed out yet: `buf[pos..]`.
    Buffered { buf: Box<[u8]>, pos: usize },
    /// Every read goes to the socket.
    Through,
}

impl<I> ReadAhead<I> {
    pub fn new(io: I) -> Self {
        Self {
            io,
            state: State::First,
        }
    }
}

impl<I: AsyncRead + Unpin> ReadAhead<I> {
    /// HTTP/2 when the connection opens with [`H2_PREFACE`], else HTTP/1.1, read ahead for
    /// (no byte is consumed: the reads after it get them all). Bytes that begin the preface
    /// but stop short of it are read on until it is whole or ruled out; the end of the
    /// stream first is HTTP/1.1 (hyper then sees the end, or the partial head).
    pub fn poll_protocol(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Protocol>> {
        loop {
            let more = match &mut self.state {
                State::First => {
                    let mut space = Box::new_uninit_slice(READ_AHEAD_BYTES);
                    let mut ahead = ReadBuf::uninit(&mut space);
                    ready!(Pin::new(&mut self.io).poll_read(cx, &mut ahead))?;
                    self.state = if ahead.filled().is_empty() {
                        State::Through
                    } else {
                        State::Buffered {
                            buf: ahead.filled().into(),
                            pos: 0,
                        }
                    };
                    continue;
                }
                State::Through => return Poll::Ready(Ok(Protocol::Http1)),
                State::Buffered { buf, pos } => {
                    let seen = &buf[*pos..];
                    if seen.starts_with(H2_PREFACE) {
                        return Poll::Ready(Ok(Protocol::Http2));
                    }
                    if !H2_PREFACE.starts_with(seen) {
                        return Poll::Ready(Ok(Protocol::Http1));
                    }
                    // A preface cut short (it is 24 bytes: rare): read the rest of it.
                    let mut more = [0u8; H2_PREFACE.len()];
                    let mut rest = ReadBuf::new(&mut more[..H2_PREFACE.len() - seen.len()]);
                    ready!(Pin::new(&mut self.io).poll_read(cx, &mut rest))?;
                    if rest.filled().is_empty() {
                        return Poll::Ready(Ok(Protocol::Http1));
                    }
                    [seen, rest.filled()].concat()
                }
            };
            self.state = State::Buffered {
                buf: more.into(),
                pos: 0,
            };
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ReadAhead<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::First if out.remaining() < READ_AHEAD_BYTES => {
                    let mut space = Box::new_uninit_slice(READ_AHEAD_BYTES);
                    let mut ahead = ReadBuf::uninit(&mut space);
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut ahead))?;
                    if ahead.filled().is_empty() {
                        // End of stream before any byte: nothing to keep.
                        this.state = State::Through;
                        return Poll::Ready(Ok(()));
                    }
                    this.state = State::Buffered {
                        buf: ahead.filled().into(),
                        pos: 0,
                    };
                }
                State::First => this.state = State::Through,
                State::Buffered { buf, pos } => {
                    let n = out.remaining().min(buf.len() - *pos);
                    out.put_slice(&buf[*pos..*pos + n]);
                    *pos += n;
                    if *pos == buf.len() {
                        this.state = State::Through;
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Through => return Pin::new(&mut this.io).poll_read(cx, out),
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ReadAhead<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads everything through `ReadAhead`, `sizes` giving each read's buffer size in turn.
    async fn read_all<I: AsyncRead + Unpin>(io: I, sizes: &[usize]) -> (Vec<u8>, ReadAhead<I>) {
        let mut r = ReadAhead::new(io);
        let mut got = Vec::new();
        for i in 0.. {
            let mut buf = vec![0u8; sizes[i % sizes.len()].max(1)];
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        (got, r)
    }

    /// Counts the reads that reach the wrapped stream (the socket, in production).
    struct CountReads<I> {
        io: I,
        reads: usize,
    }

    impl<I: AsyncRead + Unpin> AsyncRead for CountReads<I> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads += 1;
            Pin::new(&mut self.io).poll_read(cx, out)
        }
    }

    #[tokio::test]
    async fn a_small_first_read_gets_the_rest_without_a_second_socket_read() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let head = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n".repeat(3);
        client.write_all(&head).await.unwrap();
        let mut r = ReadAhead::new(CountReads {
            io: server,
            reads: 0,
        });
        let mut preface = [0u8; 24];
        assert_eq!(r.read(&mut preface).await.unwrap(), 24);
        let mut rest = vec![0u8; 8192];
        let n = r.read(&mut rest).await.unwrap();
        assert_eq!([&preface[..], &rest[..n]].concat(), head);
        assert_eq!(r.io.reads, 1, "the rest of the head was read again");
        assert!(matches!(r.state, State::Through), "buffer not freed");
        // Later reads go to the stream.
        client.write_all(b"more").await.unwrap();
        assert_eq!(r.read(&mut rest).await.unwrap(), 4);
        assert_eq!(r.io.reads, 2);
    }

    #[tokio::test]
    async fn a_large_first_read_goes_straight_to_the_socket() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"hello").await.unwrap();
        let mut r = ReadAhead::new(server);
        let mut buf = vec![0u8; READ_AHEAD_BYTES];
        assert_eq!(r.read(&mut buf).await.unwrap(), 5);
        assert!(matches!(r.state, State::Through));
    }

    #[tokio::test]
    async fn end_of_stream_before_any_byte_is_end_of_stream() {
        let (client, server) = tokio::io::duplex(1024);
        drop(client);
        let (got, r) = read_all(server, &[24]).await;
        assert!(got.is_empty());
        assert!(matches!(r.state, State::Through));
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut r = ReadAhead::new(server);
        r.write_all(b"answer").await.unwrap();
        r.flush().await.unwrap();
        let mut buf = [0u8; 6];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"answer");
    }

    /// The protocol `chunks` (the first there before the first read, the others sent one
    /// after another, then the end) open with, everything read after it, and the polls that
    /// reached the stream before the protocol was known.
    async fn protocol_then_all(chunks: Vec<Vec<u8>>) -> (Protocol, Vec<u8>, usize) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut chunks = chunks.into_iter();
        if let Some(first) = chunks.next() {
            client.write_all(&first).await.unwrap();
        }
        let writer = tokio::spawn(async move {
            for c in chunks {
                client.write_all(&c).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut r = ReadAhead::new(CountReads {
            io: server,
            reads: 0,
        });
        let protocol = std::future::poll_fn(|cx| r.poll_protocol(cx))
            .await
            .unwrap();
        let reads_to_tell = r.io.reads;
        writer.await.unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        (protocol, got, reads_to_tell)
    }

    #[tokio::test]
    async fn an_http1_head_is_told_from_one_read_and_then_read_whole() {
        let head = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n".to_vec();
        let (protocol, got, reads) = protocol_then_all(vec![head.clone()]).await;
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(got, head);
        assert_eq!(reads, 1);
    }

    #[tokio::test]
    async fn the_http2_preface_is_http2_and_stays_in_the_stream() {
        let opening = [H2_PREFACE, b"\0\0\0\x04\0\0\0\0\0"].concat();
        let (protocol, got, reads) = protocol_then_all(vec![opening.clone()]).await;
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(got, opening);
        assert_eq!(reads, 1);
    }

    #[tokio::test]
    async fn a_preface_cut_short_is_read_on_until_it_is_whole_or_ruled_out() {
        let (protocol, got, _) =
            protocol_then_all(vec![H2_PREFACE[..3].to_vec(), H2_PREFACE[3..].to_vec()]).await;
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(got, H2_PREFACE);
        // "PRI * HTTP/1.1": the preface's first 10 bytes, then something else.
        let (protocol, got, _) =
            protocol_then_all(vec![b"PRI * HTTP".to_vec(), b"/1.1\r\n\r\n".to_vec()]).await;
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(got, b"PRI * HTTP/1.1\r\n\r\n");
        // The end of the stream within the preface.
        let (protocol, got, _) = protocol_then_all(vec![b"PRI * HT".to_vec()]).await;
        assert_eq!(protocol, Protocol::Http1);
        assert_eq!(got, b"PRI * HT");
        let (protocol, got, _) = protocol_then_all(vec![]).await;
        assert_eq!(protocol, Protocol::Http1);
        assert!(got.is_empty());
    }

    proptest! {
        /// However the peer's bytes are cut, the protocol is HTTP/2 exactly when they start
        /// with the preface, and they all come out after it, in order.
        #[test]
        fn the_protocol_is_http2_exactly_for_the_preface_and_no_byte_is_lost(
            preface_len in 0usize..=24,
            tail in prop::collection::vec(any::<u8>(), 0..64),
            cuts in prop::collection::vec(1usize..30, 0..6),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let sent = [&H2_PREFACE[..preface_len], &tail[..]].concat();
            let mut chunks = Vec::new();
            let mut rest = &sent[..];
            for cut in cuts {
                let (chunk, after) = rest.split_at(cut.min(rest.len()));
                chunks.push(chunk.to_vec());
                rest = after;
            }
            chunks.push(rest.to_vec());
            chunks.retain(|c| !c.is_empty());
            let (protocol, got, _) = rt.block_on(protocol_then_all(chunks));
            let expected = if sent.starts_with(H2_PREFACE) { Protocol::Http2 } else { Protocol::Http1 };
            prop_assert_eq!(protocol, expected);
            prop_assert_eq!(got, sent);
        }

        /// Whatever the chunks the peer sends and the sizes the reader asks for, the bytes
        /// come out whole and in order.
        #[test]
        fn bytes_come_out_whole_and_in_order(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..3000), 0..8),
            sizes in prop::collection::vec(1usize..5000, 1..6),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let sent: Vec<u8> = chunks.concat();
            let got = rt.block_on(async {
                let (mut client, server) = tokio::io::duplex(1024);
                let writer = tokio::spawn(async move {
                    for c in chunks {
                        client.write_all(&c).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                });
                let (got, _) = read_all(server, &sizes).await;
                writer.await.unwrap();
                got
            });
            prop_assert_eq!(got, sent);
        }
    }
}
