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
