//! An upgraded connection (WebSocket) spliced between client and upstream. It ends when either
//! side closes, when nothing crosses it either way for the upstream's `body_idle_timeout`
//! (nginx's `proxy_read_timeout` does the same to WebSockets), or when the key that opened it
//! stops being valid: a tunnel must not outlive a revocation, nor hold its connection slot
//! for ever.

use crate::idle::CutOff;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Resolves once the tunnel's key is no longer valid.
pub type KeyEnds = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Splices `client` and `upstream` until one closes, the tunnel idles for `idle`, or `key_ends`
/// resolves.
pub async fn splice<C, U>(client: C, upstream: U, idle: Duration, key_ends: Option<KeyEnds>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Active::new(client, start, last.clone());
    let mut upstream = Active::new(upstream, start, last.clone());
    let key_ends = async move {
        match key_ends {
            Some(ends) => ends.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = copied {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        () = idle_for(start, &last, idle) => {
            CutOff::TunnelIdle.add();
            tracing::debug!(idle = ?idle, "upgraded connection idle; closed");
        }
        () = key_ends => {
            CutOff::TunnelKeyInvalid.add();
            tracing::info!("upgraded connection closed: its key is no longer valid");
        }
    }
}

/// Resolves once nothing was read either way for `limit`.
async fn idle_for(start: Instant, last: &AtomicU64, limit: Duration) {
    loop {
        let last_ms = last.load(Ordering::Relaxed);
        let deadline = start + Duration::from_millis(last_ms) + limit;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Notes the time of every read that brought bytes.
struct Active<T> {
    io: T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Active<T> {
    fn new(io: T, start: Instant, last: Arc<AtomicU64>) -> Self {
        Self { io, start, last }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = u64::try_from(this.start.elapsed().as_millis()).unwrap_or(u64::MAX);
            this.last.store(ms, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_that_carries_nothing_for_the_limit_ends_and_a_busy_one_does_not() {
        let (client, mut client_far) = tokio::io::duplex(1024);
        let (upstream, mut upstream_far) = tokio::io::duplex(1024);
        let tunnel = tokio::spawn(splice(client, upstream, Duration::from_secs(10), None));
        // Busy: a byte every 4 s for 20 s keeps it open past twice the limit.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            client_far.write_all(b"x").await.unwrap();
            let mut got = [0u8; 1];
            upstream_far.read_exact(&mut got).await.unwrap();
        }
        assert!(!tunnel.is_finished());
        tokio::time::sleep(Duration::from_secs(11)).await;
        tokio::task::yield_now().await;
        assert!(tunnel.is_finished(), "idle for the limit and still open");
        let mut rest = Vec::new();
        upstream_far.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_ends_when_its_key_does() {
        let (client, _client_far) = tokio::io::duplex(1024);
        let (upstream, _upstream_far) = tokio::io::duplex(1024);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let ends: KeyEnds = Box::pin(async move {
            let _ = rx.await;
        });
        let tunnel = tokio::spawn(splice(
            client,
            upstream,
            Duration::from_secs(3600),
            Some(ends),
        ));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!tunnel.is_finished());
        let before = CutOff::TunnelKeyInvalid.count();
        tx.send(()).unwrap();
        tunnel.await.unwrap();
        assert_eq!(CutOff::TunnelKeyInvalid.count(), before + 1);
    }
}
