//! A TCP relay in front of a server, whose open connections can be made to hang: what a stuck
//! proxy or load balancer in front of Redis does (the kernel still acknowledges what is sent,
//! nothing answers), while connections opened afterwards go through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    addr: SocketAddr,
    /// Connections numbered below this one hang.
    hung_below: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays connections on a fresh loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let hung_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let (hung, counter) = (hung_below.clone(), next.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = counter.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, id, hung.clone()));
                tokio::spawn(pipe(sr, cw, id, hung.clone()));
            }
        });
        Relay {
            addr,
            hung_below,
            next,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Every connection open now stops relaying, in both directions, and stays open.
    pub fn hang_open_connections(&self) {
        self.hung_below
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Every connection, open now or opened later, stops relaying: a server that is there (it
    /// accepts) and answers nothing.
    pub fn hang_everything(&self) {
        self.hung_below.store(u64::MAX, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    id: u64,
    hung_below: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if id < hung_below.load(Ordering::SeqCst) {
            // Hung: hold both ends open and pass nothing on, ever.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
