//! Evens out connections over the threads that accept from one listening socket. The kernel
//! wakes every waiting thread for a new connection and the first to call `accept` gets it, so
//! a burst (a client opening its 200 connections at start) can land on one thread while the
//! others idle: seen on 2 threads, every connection on one, 28 % fewer requests per second. A
//! thread that accepts while it serves more than one connection over the least loaded thread
//! hands the socket to that thread instead (before any byte is read, TLS included).
//!
//! Counts are of connections assigned, raised when a thread keeps or hands off a connection and
//! lowered when the connection ends, so a burst is split as it is accepted rather than after
//! the receivers have caught up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// A connection accepted by one thread for another to serve.
pub struct Handoff {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub permit: OwnedSemaphorePermit,
    pub assigned: Assigned,
}

/// One thread's place among those serving a socket: its index, and the connections other
/// threads hand it.
pub struct Member {
    index: usize,
    spread: Arc<Spread>,
    inbox: mpsc::UnboundedReceiver<Handoff>,
}

struct Spread {
    assigned: Vec<AtomicUsize>,
    inboxes: Vec<mpsc::UnboundedSender<Handoff>>,
}

/// One connection counted against a thread until dropped (when the connection ends).
pub struct Assigned {
    spread: Arc<Spread>,
    index: usize,
}

impl Drop for Assigned {
    fn drop(&mut self) {
        self.spread.assigned[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where an accepted connection goes.
pub enum Decision {
    Keep(Assigned),
    HandTo(usize, Assigned),
}

/// The members for `threads` threads serving one socket, in thread order.
pub fn members(threads: usize) -> Vec<Member> {
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..threads).map(|_| mpsc::unbounded_channel()).unzip();
    let spread = Arc::new(Spread {
        assigned: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
        inboxes: senders,
    });
    receivers
        .into_iter()
        .enumerate()
        .map(|(index, inbox)| Member {
            index,
            spread: spread.clone(),
            inbox,
        })
        .collect()
}

impl Member {
    /// The next connection another thread handed over; pending forever once none can come.
    pub async fn handed(&mut self) -> Handoff {
        match self.inbox.recv().await {
            Some(h) => h,
            None => std::future::pending().await,
        }
    }

    /// Takes no more hand-offs (sending one fails from now on) and returns those already sent.
    pub fn close(&mut self) -> Vec<Handoff> {
        self.inbox.close();
        let mut queued = Vec::new();
        while let Ok(h) = self.inbox.try_recv() {
            queued.push(h);
        }
        queued
    }

    /// Keep a connection this thread accepted, or hand it to the least loaded thread when this
    /// one serves more than one connection over that.
    pub fn decide(&self) -> Decision {
        let counts = &self.spread.assigned;
        let n = counts.len();
        let own = counts[self.index].load(Ordering::Relaxed);
        // Ties go to the next thread after this one, not always to thread 0 (which also runs
        // the admin API and the store's background work).
        let (least, least_count) = (1..n)
            .map(|k| (self.index + k) % n)
            .map(|i| (i, counts[i].load(Ordering::Relaxed)))
            .min_by_key(|&(_, c)| c)
            .unwrap_or((self.index, own));
        let target = if least_count + 1 < own {
            least
        } else {
            self.index
        };
        counts[target].fetch_add(1, Ordering::Relaxed);
        let assigned = Assigned {
            spread: self.spread.clone(),
            index: target,
        };
        if target == self.index {
            Decision::Keep(assigned)
        } else {
            Decision::HandTo(target, assigned)
        }
    }

    /// Sends `handoff` to thread `target`; gives it back if that thread has stopped.
    pub fn hand(&self, target: usize, handoff: Handoff) -> Result<(), Handoff> {
        self.spread.inboxes[target]
            .send(handoff)
            .map_err(|mpsc::error::SendError(h)| h)
    }

    /// A connection assigned to this thread without asking (one handed back).
    pub fn assign_here(&self) -> Assigned {
        self.spread.assigned[self.index].fetch_add(1, Ordering::Relaxed);
        Assigned {
            spread: self.spread.clone(),
            index: self.index,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_on_one_thread_is_split_evenly() {
        let members = members(3);
        let mut kept = Vec::new();
        let mut per_thread = [0usize; 3];
        for _ in 0..30 {
            match members[0].decide() {
                Decision::Keep(a) => {
                    per_thread[0] += 1;
                    kept.push(a);
                }
                Decision::HandTo(t, a) => {
                    per_thread[t] += 1;
                    kept.push(a);
                }
            }
        }
        assert!(
            per_thread.iter().all(|&n| (9..=11).contains(&n)),
            "{per_thread:?}"
        );
        // Ended connections free their thread's share.
        drop(kept);
        assert!(matches!(members[1].decide(), Decision::Keep(_)));
    }

    /// Three threads on one socket, each answering with its own name: thirty connections
    /// opened at once and held are served ten or so by each, whichever thread the kernel woke.
    #[test]
    fn connections_held_open_are_served_evenly_by_real_threads() {
        use crate::server::{ServeOptions, serve_shared};
        use bytes::Bytes;
        use http_body_util::Full;
        use std::io::{Read, Write};
        use std::time::Duration;

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = ServeOptions {
            max_connections: 100,
            max_header_bytes: 16 * 1024,
            max_headers: 50,
            max_concurrent_streams: 100,
            header_read_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
            drain_timeout: Duration::from_millis(200),
            open_connections: None,
            shared_slots: None,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let threads: Vec<_> = members(3)
            .into_iter()
            .enumerate()
            .map(|(i, member)| {
                let copy = listener.try_clone().unwrap();
                let opts = opts.clone();
                let mut stop = stop_rx.clone();
                std::thread::Builder::new()
                    .name(format!("spread-test-{i}"))
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        rt.block_on(async move {
                            let l = tokio::net::TcpListener::from_std(copy).unwrap();
                            let service = |_peer| {
                                |_req, _context| async {
                                    let name = std::thread::current().name().unwrap().to_owned();
                                    Ok(http::Response::new(Full::new(Bytes::from(name))))
                                }
                            };
                            let stopped = async move {
                                let _ = stop.wait_for(|s| *s).await;
                            };
                            serve_shared(l, Some(member), opts, None, service, stopped, || {})
                                .await;
                        });
                    })
                    .unwrap()
            })
            .collect();

        let mut conns: Vec<std::net::TcpStream> = (0..30)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut per_thread = std::collections::BTreeMap::<String, usize>::new();
        for c in &mut conns {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
            let mut buf = [0u8; 1024];
            let n = c.read(&mut buf).unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let name = text.rsplit("\r\n").next().unwrap().to_owned();
            *per_thread.entry(name).or_default() += 1;
        }
        stop_tx.send(true).unwrap();
        drop(conns);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(per_thread.len(), 3, "{per_thread:?}");
        assert!(
            per_thread.values().all(|&n| (8..=12).contains(&n)),
            "{per_thread:?}"
        );
    }

    #[test]
    fn a_closed_member_returns_what_was_queued_and_refuses_more() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let slots = Arc::new(tokio::sync::Semaphore::new(2));
        let mut members = members(2);
        let handoff = || Handoff {
            stream: std::net::TcpStream::connect(addr).unwrap(),
            peer: addr,
            permit: slots.clone().try_acquire_owned().unwrap(),
            assigned: members[1].assign_here(),
        };
        let (first, second) = (handoff(), handoff());
        assert!(members[0].hand(1, first).is_ok());
        assert_eq!(members[1].close().len(), 1);
        assert!(
            members[0].hand(1, second).is_err(),
            "a closed member took a connection"
        );
    }

    #[test]
    fn a_single_thread_always_keeps() {
        let members = members(1);
        let held: Vec<_> = (0..5)
            .map(|_| match members[0].decide() {
                Decision::Keep(a) => a,
                Decision::HandTo(..) => panic!("handed off with one thread"),
            })
            .collect();
        assert_eq!(held.len(), 5);
    }
}
