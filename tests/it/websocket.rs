//! WebSocket (HTTP/1.1 Upgrade) through the gateway: authenticated like any request, then the
//! two connections are spliced and frames flow both ways.

use crate::support::create_key;
use crate::support::gateway::Gateway;
use futures_util::{SinkExt, StreamExt};
use keygate::store::KeyStore;
use keygate::store::embedded::EmbeddedStore;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A WebSocket echo server that also reports the identity header it was given.
// tungstenite's handshake callback type fixes the large error variant.
#[allow(clippy::result_large_err)]
async fn ws_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut key_id = String::new();
                let callback =
                    |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                        key_id = req
                            .headers()
                            .get("x-keygate-key-id")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        Ok(resp)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                let _ = ws.send(Message::text(format!("hello {key_id}"))).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A WebSocket through the gateway at `addr` with `key`, once the echo's hello has come back
/// through it (the two connections are spliced).
async fn open_tunnel(
    addr: SocketAddr,
    key: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = format!("ws://{addr}/socket").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.next().await.unwrap().unwrap();
    ws
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_frames_flow_after_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let upstream = ws_echo().await;
    let gw = Gateway::start(&format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"\n[upstreams.ws]\nurl = \"http://{upstream}\"\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"ws\"\n",
        db.display()
    ));
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let (key, record) = create_key(&store, |_| {}).await;

    let url = format!("ws://{}/socket", gw.addr);
    // Without a key the upgrade is refused like any request.
    let err = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }

    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    let hello = ws.next().await.unwrap().unwrap();
    assert_eq!(
        hello.into_text().unwrap().as_str(),
        format!("hello {}", record.api_key_id)
    );
    for i in 0..20 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), format!("ping {i}"));
    }
    let big = vec![7u8; 300_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back.into_data().as_ref(), &big[..]);
    ws.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_tunnel_keeps_its_connection_slot_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let upstream = ws_echo().await;
    let gw = Gateway::start(&format!(
        "[proxy]\nmax_connections = 2\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.ws]\nurl = \"http://{upstream}\"\n[[routes]]\npath_prefix = \"/\"\n\
         upstream = \"ws\"\n",
        db.display()
    ));
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let (key, _) = create_key(&store, |_| {}).await;
    let open = || open_tunnel(gw.addr, &key);
    let metrics = || gw.metrics();
    let first = open().await;
    let _second = open().await;
    assert!(
        metrics().await.contains("\nkeygate_open_connections 2\n"),
        "{}",
        metrics().await
    );
    // Both slots are the tunnels': a third connection waits in the backlog.
    let third = tokio::time::timeout(std::time::Duration::from_millis(700), open()).await;
    assert!(
        third.is_err(),
        "a third connection was served beside two tunnels"
    );
    // One tunnel closes: its slot is free again.
    drop(first);
    let third = tokio::time::timeout(std::time::Duration::from_secs(10), open()).await;
    assert!(third.is_ok(), "the closed tunnel's slot was not given back");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_open_tunnel_finish_within_the_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let upstream = ws_echo().await;
    let mut gw = Gateway::start(&format!(
        "[proxy]\ndrain_timeout = \"30s\"\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.ws]\nurl = \"http://{upstream}\"\n[[routes]]\npath_prefix = \"/\"\n\
         upstream = \"ws\"\n",
        db.display()
    ));
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let (key, _) = create_key(&store, |_| {}).await;
    let mut ws = open_tunnel(gw.addr, &key).await;
    let addr = gw.addr;
    let started = std::time::Instant::now();
    let exit = tokio::task::spawn_blocking(move || gw.terminate());

    // The listener closes, the tunnel goes on.
    let mut refused = false;
    for _ in 0..50 {
        if std::net::TcpStream::connect(addr).is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(refused, "still accepting after SIGTERM");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for i in 0..5 {
        ws.send(Message::text(format!("late {i}"))).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), format!("late {i}"));
    }
    assert!(!exit.is_finished(), "keygate exited with a tunnel open");

    // Once the tunnel closes the drain is over, long before its 30 s.
    ws.close(None).await.unwrap();
    drop(ws);
    let status = exit.await.unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "the drain waited {:?} after the tunnel closed",
        started.elapsed()
    );
}

/// A tunnel ends once its key stops being valid (here: disabled), and a tunnel that carries
/// nothing either way for the upstream's `body_idle_timeout` ends too: neither outlives a
/// revocation nor holds its connection slot for ever (review: both stayed open).
#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_ends_with_its_key_or_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let upstream = ws_echo().await;
    let gw = Gateway::start(&format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"\n[upstreams.ws]\nurl = \"http://{upstream}\"\n\
         body_idle_timeout = \"2s\"\n[[routes]]\npath_prefix = \"/\"\nupstream = \"ws\"\n",
        db.display()
    ));
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let (key, record) = create_key(&store, |_| {}).await;
    let ends_within = |mut ws: tokio_tungstenite::WebSocketStream<_>, limit| async move {
        let started = std::time::Instant::now();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(limit), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        (ended.is_ok(), started.elapsed())
    };

    // Busy, past the idle limit: a message a second for 4 s keeps the tunnel open.
    let mut busy = open_tunnel(gw.addr, &key).await;
    for i in 0..4 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        busy.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(
            busy.next().await.unwrap().unwrap(),
            Message::text(format!("m{i}"))
        );
    }
    // Idle: closed after the 2 s limit.
    let (ended, took) = ends_within(busy, 10).await;
    assert!(ended, "an idle tunnel stayed open");
    assert!(took >= std::time::Duration::from_millis(1500), "{took:?}");

    // Disabled: closed within the key check's second (and well before the idle limit, the
    // tunnel being kept busy meanwhile).
    let mut ws = open_tunnel(gw.addr, &key).await;
    crate::support::service(&store)
        .set_enabled(
            &record.api_key_id,
            false,
            &crate::support::cli(),
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < std::time::Duration::from_secs(8) {
        if ws.send(Message::text("ping")).await.is_err() {
            closed = true;
            break;
        }
        match tokio::time::timeout(std::time::Duration::from_millis(500), ws.next()).await {
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "a disabled key's tunnel stayed open");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// A tunnel still open when the drain time runs out is closed then, even while the last usage
/// flush (here held up by another process's lock on the database) keeps the process up: it
/// went on relaying for as long.
#[tokio::test(flavor = "multi_thread")]
async fn the_drain_time_closes_a_tunnel_even_while_the_last_flush_waits() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let upstream = ws_echo().await;
    let mut gw = Gateway::start(&format!(
        "[proxy]\ndrain_timeout = \"500ms\"\n[usage]\nflush_interval = \"60s\"\n[store]\n\
         kind = \"embedded\"\npath = \"{}\"\n[upstreams.ws]\nurl = \"http://{upstream}\"\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"ws\"\n",
        db.display()
    ));
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let (key, _) = create_key(&store, |_| {}).await;
    let mut ws = open_tunnel(gw.addr, &key).await;
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(gw.pid().to_string())
        .status();
    // Past the drain time, well before the flush gives up (5 s).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let relayed = async {
        ws.send(Message::text("late")).await.ok()?;
        ws.next().await?.ok()?.into_text().ok()
    };
    let relayed = tokio::time::timeout(std::time::Duration::from_secs(2), relayed).await;
    assert!(
        !matches!(&relayed, Ok(Some(text)) if text.as_str() == "late"),
        "the tunnel still relayed after the drain time: {relayed:?}"
    );
    drop(lock);
    let status = tokio::task::spawn_blocking(move || gw.terminate())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}
