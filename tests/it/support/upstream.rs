//! Real upstreams for the tests: the echo server from the library (it reports what it
//! received), one that accepts connections and never answers, and an address where nothing
//! listens.

use std::net::SocketAddr;
use tokio::net::TcpListener;

pub async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    keygate::dev::spawn_echo(listener).expect("spawn echo")
}

/// Accepts and holds connections without ever answering.
pub async fn silent() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind silent");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

/// An address that refuses connections (bound, then closed).
pub fn closed() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Answers 200 after `delay`, so requests are in flight for a known time.
pub async fn delayed(delay: std::time::Duration) -> SocketAddr {
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind delayed");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"done")),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    addr
}

/// Connections an upstream has open now, and the most it had open at once.
#[derive(Default)]
pub struct OpenConnections {
    pub now: std::sync::atomic::AtomicUsize,
    pub peak: std::sync::atomic::AtomicUsize,
    pub accepted: std::sync::atomic::AtomicUsize,
}

/// As [`delayed`], counting the connections it has open at once.
pub async fn delayed_counting(
    delay: std::time::Duration,
) -> (SocketAddr, std::sync::Arc<OpenConnections>) {
    use hyper::service::service_fn;
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind delayed");
    let addr = listener.local_addr().expect("addr");
    let open = std::sync::Arc::new(OpenConnections::default());
    let counts = open.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counts.accepted.fetch_add(1, Ordering::SeqCst);
            let now = counts.now.fetch_add(1, Ordering::SeqCst) + 1;
            counts.peak.fetch_max(now, Ordering::SeqCst);
            let counts = counts.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"done")),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
                counts.now.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

/// Answers every request with a chunked body (no `Content-Length`) fed by a channel: the
/// response head and `first` go out at once, the rest of `then` only after `release` is
/// notified, so a test can tell a stream forwarded as it comes from one held back.
pub async fn chunked(
    first: &'static [&'static str],
    then: &'static [&'static str],
    release: std::sync::Arc<tokio::sync::Notify>,
) -> SocketAddr {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind chunked");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let release = release.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let release = release.clone();
                    async move {
                        let (tx, rx) = tokio::sync::mpsc::channel::<
                            Result<Frame<bytes::Bytes>, std::convert::Infallible>,
                        >(16);
                        tokio::spawn(async move {
                            for text in first {
                                let _ = tx.send(Ok(Frame::data((*text).into()))).await;
                            }
                            if !then.is_empty() {
                                release.notified().await;
                                for text in then {
                                    let _ = tx.send(Ok(Frame::data((*text).into()))).await;
                                }
                            }
                        });
                        let body = StreamBody::new(futures_util::stream::unfold(
                            rx,
                            |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
                        ));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    addr
}

/// Reads each request's body: `got_first` is notified when its first data frame arrives, and the
/// answer is the body's length once it has ended. Shows whether a streamed upload is forwarded
/// as it comes.
pub async fn signals_first_frame(got_first: std::sync::Arc<tokio::sync::Notify>) -> SocketAddr {
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind signalling upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let got_first = got_first.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let got_first = got_first.clone();
                    async move {
                        let mut body = req.into_body();
                        let mut len = 0;
                        let mut first = true;
                        while let Some(frame) = body.frame().await {
                            let Ok(frame) = frame else { break };
                            if let Some(data) = frame.data_ref() {
                                len += data.len();
                                if first && !data.is_empty() {
                                    first = false;
                                    got_first.notify_one();
                                }
                            }
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(format!("{len}"))),
                        ))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    addr
}

/// Answers every request (bodiless) `200 ok` on a kept-alive connection, and reports for each
/// connection how long after its last answer keygate closed it (the upstream read its FIN),
/// and what it received on it. With `hang_up`, it half-closes the connection right after its
/// first answer (its FIN, as when an upstream's keep-alive timeout runs out) and goes on
/// reading: a keygate that kept its end open would leave the socket in CLOSE_WAIT, and this
/// would never report it.
pub async fn reports_close(
    hang_up: bool,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(std::time::Duration, String)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut received = Vec::new();
                let mut buf = [0u8; 4096];
                let mut heads = 0;
                let mut answered = std::time::Instant::now();
                loop {
                    let n = match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Err(_) => return,
                        Ok(n) => n,
                    };
                    received.extend_from_slice(&buf[..n]);
                    let count = received.windows(4).filter(|w| *w == b"\r\n\r\n").count();
                    while heads < count {
                        heads += 1;
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                        answered = std::time::Instant::now();
                        if hang_up {
                            let _ = stream.shutdown().await;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&received).into_owned();
                let _ = tx.send((answered.elapsed(), text));
            });
        }
    });
    (addr, rx)
}

/// Answers every request (bodiless; keep-alive) with `response`, bytes as given: for framing a
/// well-behaved HTTP library would not produce.
pub async fn raw(response: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind raw");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if stream.write_all(response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Answers each request on a path starting with `/held` with 200 `released` once `release`
/// is notified, and any other with a body of `len` zero bytes at once.
pub async fn large_and_held(
    len: usize,
    release: std::sync::Arc<tokio::sync::Notify>,
) -> SocketAddr {
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind held");
    let addr = listener.local_addr().expect("addr");
    let body = bytes::Bytes::from(vec![0u8; len]);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (body, release) = (body.clone(), release.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (body, release) = (body.clone(), release.clone());
                    async move {
                        let body = if req.uri().path().starts_with("/held") {
                            release.notified().await;
                            bytes::Bytes::from_static(b"released")
                        } else {
                            body
                        };
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(body),
                        ))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    addr
}

/// Answers every request with a body of `len` zero bytes (with its `Content-Length`).
pub async fn large(len: usize) -> SocketAddr {
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind large");
    let addr = listener.local_addr().expect("addr");
    let body = bytes::Bytes::from(vec![0u8; len]);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(body),
                        ))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    addr
}

/// Reads each request's head, answers `200 ok` at once, and then never reads again, holding
/// the connection open: an upstream that stopped taking the request body. Its receive buffer is
/// small, so the sender's writes stop soon.
pub async fn answers_early_then_never_reads() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(16).expect("listen");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
                // Open, unread, for as long as the test runs.
                std::future::pending::<()>().await;
                drop(stream);
            });
        }
    });
    addr
}

/// An HTTP/2 (h2c) upstream that takes each request and then neither reads its body nor
/// answers, keeping the connection open: hyper gives window back only as a body is read, so
/// an upload to it stops once its first window (hyper's default, 1 MiB) is spent, with the
/// socket still taking frames.
pub async fn h2_never_reads() -> SocketAddr {
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind h2_never_reads");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let _held = req;
                    std::future::pending::<
                        Result<
                            hyper::Response<http_body_util::Empty<bytes::Bytes>>,
                            std::convert::Infallible,
                        >,
                    >()
                    .await
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    addr
}
