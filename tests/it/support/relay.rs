//! A TCP relay in front of a server, whose open connections can be made to hang: what a stuck
//! proxy or load balancer in front of Redis does (the kernel still acknowledges what is sent,
//! nothing answers), while connections opened afterwards go through. Hanging only the
//! connections that sent `SUBSCRIBE` is a change feed that dies silently.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    addr: SocketAddr,
    /// Connections numbered below this one hang.
    hung_below: Arc<AtomicU64>,
    /// Connections that hang whatever their number.
    hung: Arc<Mutex<HashSet<u64>>>,
    /// Connections on which the client sent `SUBSCRIBE`.
    subscribers: Arc<Mutex<HashSet<u64>>>,
    next: Arc<AtomicU64>,
    /// While set: (marker, delay): the answer to what a client sends with the marker in it
    /// (and no `SUBSCRIBE`) is held back this long, and what follows it on that connection.
    slow: Slow,
    accept: tokio::task::JoinHandle<()>,
}

type Slow = Arc<Mutex<Option<(Vec<u8>, Duration)>>>;

/// What each direction of one connection needs to know.
#[derive(Clone)]
struct Conn {
    id: u64,
    hung_below: Arc<AtomicU64>,
    hung: Arc<Mutex<HashSet<u64>>>,
    /// Set on the client-to-server direction only.
    subscribers: Option<Arc<Mutex<HashSet<u64>>>>,
    slow: Slow,
    /// The delay the next answer on this connection is held back, set by the client's side.
    pending: Arc<Mutex<Option<Duration>>>,
}

impl Conn {
    fn is_hung(&self) -> bool {
        self.id < self.hung_below.load(Ordering::SeqCst) || lock(&self.hung).contains(&self.id)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Relay {
    /// Relays connections on a fresh loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let hung_below = Arc::new(AtomicU64::new(0));
        let hung = Arc::new(Mutex::new(HashSet::new()));
        let subscribers = Arc::new(Mutex::new(HashSet::new()));
        let next = Arc::new(AtomicU64::new(0));
        let slow: Slow = Arc::new(Mutex::new(None));
        let counter = next.clone();
        let (below, set, subs) = (hung_below.clone(), hung.clone(), subscribers.clone());
        let slow_conns = slow.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let id = counter.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let conn = Conn {
                    id,
                    hung_below: below.clone(),
                    hung: set.clone(),
                    subscribers: None,
                    slow: slow_conns.clone(),
                    pending: Arc::new(Mutex::new(None)),
                };
                let upstream = Conn {
                    subscribers: Some(subs.clone()),
                    ..conn.clone()
                };
                tokio::spawn(pipe(cr, sw, upstream));
                tokio::spawn(pipe(sr, cw, conn));
            }
        });
        Relay {
            addr,
            hung_below,
            hung,
            subscribers,
            next,
            slow,
            accept,
        }
    }

    /// From now on, the answer to anything a client sends with `marker` in it (a write script
    /// of keygate's names the change channel) is held back `delay` (and, in order, what comes
    /// after it on that connection); `None` turns that off.
    pub fn delay_answers_to(&self, slow: Option<(&[u8], Duration)>) {
        *lock(&self.slow) = slow.map(|(marker, delay)| (marker.to_vec(), delay));
    }

    /// How many connections have sent `SUBSCRIBE` so far.
    pub fn subscribers(&self) -> usize {
        lock(&self.subscribers).len()
    }

    /// Every connection that has sent `SUBSCRIBE` so far stops relaying, in both directions,
    /// and stays open: a change feed whose connection died without a word. Other connections,
    /// and subscribers that come later, go through.
    pub fn hang_subscribers(&self) {
        let subscribers = lock(&self.subscribers).clone();
        lock(&self.hung).extend(subscribers);
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

async fn pipe(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, conn: Conn) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(subscribers) = &conn.subscribers
            && buf[..n]
                .windows(9)
                .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
        {
            lock(subscribers).insert(conn.id);
        }
        if conn.is_hung() {
            // Hung: hold both ends open and pass nothing on, ever.
            std::future::pending::<()>().await;
        }
        if conn.subscribers.is_some() {
            let slow = lock(&conn.slow).clone();
            if let Some((marker, delay)) = slow
                && buf[..n].windows(marker.len()).any(|w| w == marker)
                && !buf[..n]
                    .windows(9)
                    .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
            {
                *lock(&conn.pending) = Some(delay);
            }
        } else {
            let pending = lock(&conn.pending).take();
            if let Some(delay) = pending {
                tokio::time::sleep(delay).await;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
