//! Limits on what clients can make keygate hold: HTTP/2 streams per client connection,
//! connections to one upstream, and the body bytes all key peeks hold together.

use crate::support::gateway::Gateway;
use crate::support::{client, create_key, eventually, upstream};
use keygate::store::KeyStore;
use keygate::store::embedded::EmbeddedStore;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = len[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

async fn read_frame(s: &mut TcpStream) -> Frame {
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("a frame within 5 s")
        .expect("the connection stays open");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

/// Opens an h2c connection (preface, empty SETTINGS), acknowledges keygate's SETTINGS, and
/// returns the connection and keygate's SETTINGS_MAX_CONCURRENT_STREAMS (`None`: not sent).
async fn handshake(addr: SocketAddr) -> (TcpStream, Option<u32>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    s.write_all(&hello).await.unwrap();
    let settings = loop {
        let f = read_frame(&mut s).await;
        if f.kind == SETTINGS && f.flags & ACK == 0 {
            break f;
        }
    };
    let max_streams = settings.payload.chunks_exact(6).find_map(|setting| {
        (u16::from_be_bytes([setting[0], setting[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
    });
    s.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
    (s, max_streams)
}

/// A GET (HPACK literals without indexing, so no table state), ending the stream.
fn get(stream: u32, authority: &str, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
    for (name_index, value) in [(4u8, path), (1u8, authority)] {
        block.push(name_index);
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    frame(HEADERS, 0x4 | 0x1, stream, &block) // END_HEADERS | END_STREAM
}

fn config(dir: &tempfile::TempDir, up: SocketAddr, proxy: &str) -> String {
    format!(
        "[proxy]\n{proxy}\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.up]\nurl = \"http://{up}\"\n\
         [[routes]]\npath_prefix = \"/public\"\nupstream = \"up\"\npublic = true\n",
        dir.path().join("keys.db").display()
    )
}

/// keygate announces `proxy.max_concurrent_streams` (100 by default, not hyper's 200) and
/// refuses a stream over it while the others are in flight (RST_STREAM REFUSED_STREAM, which
/// clients retry), so one connection cannot hold more body peeks or upstream connections.
#[tokio::test]
async fn http2_clients_get_the_configured_max_concurrent_streams_and_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::delayed(Duration::from_secs(2)).await;

    let gw = Gateway::start(&config(&dir, up, ""));
    let (_conn, announced) = handshake(gw.addr).await;
    assert_eq!(announced, Some(100), "the default");
    drop(gw);

    let gw = Gateway::start(&config(&dir, up, "max_concurrent_streams = 2"));
    let (mut s, announced) = handshake(gw.addr).await;
    assert_eq!(announced, Some(2));
    let authority = gw.addr.to_string();
    let mut requests = Vec::new();
    for stream in [1, 3, 5] {
        requests.extend(get(stream, &authority, "/public/slow"));
    }
    s.write_all(&requests).await.unwrap();
    // The upstream answers after 2 s: before then, the only stream ended is the third.
    let refused = loop {
        let f = read_frame(&mut s).await;
        if f.kind == RST_STREAM || (f.kind == HEADERS && f.stream != 0) {
            break f;
        }
    };
    assert_eq!(
        (refused.kind, refused.stream),
        (RST_STREAM, 5),
        "the third stream is refused, before any answer"
    );
    let code = u32::from_be_bytes(refused.payload[..4].try_into().unwrap());
    assert_eq!(code, REFUSED_STREAM);
    // The two within the limit are answered.
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let f = read_frame(&mut s).await;
        assert_ne!(f.kind, RST_STREAM, "stream {} reset", f.stream);
        if f.kind == HEADERS {
            answered.push(f.stream);
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, [1, 3]);
}

const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CANCEL: u32 = 0x8;

/// The `keygate_cut_off_total` series for `reason` in a scrape.
fn cut_offs(scrape: &str, reason: &str) -> Option<u64> {
    let series = format!("keygate_cut_off_total{{reason=\"{reason}\"}} ");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
}

/// HTTP/2 "rapid reset" (CVE-2023-44487): a client that opens streams and resets them before
/// their answers makes keygate and the upstream work while it holds nothing. Once half of at
/// least 500 streams (those keygate did not answer itself) were reset that way the connection
/// gets a GOAWAY, and a client that goes
/// on resetting is cut off; the streams are reset after keygate took them (hyper's own limit
/// covers streams reset before that).
#[tokio::test]
async fn an_http2_client_that_resets_its_streams_before_their_answers_is_closed() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let dir = tempfile::tempdir().unwrap();
    // Counts the requests it gets, and answers none in the test's time.
    let received = Arc::new(AtomicU32::new(0));
    let up = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let received = received.clone();
                let svc = hyper::service::service_fn(move |_req| {
                    received.fetch_add(1, Ordering::SeqCst);
                    async {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(String::new()))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
        addr
    };
    let gw = Gateway::start(&config(&dir, up, ""));
    let (mut s, _) = handshake(gw.addr).await;
    // Window for every answer on the connection: without it the 404s' bodies stop at the
    // connection's first 64 KiB, their streams stay open, and later ones are refused.
    s.write_all(&frame(WINDOW_UPDATE, 0, 0, &0x7fff_0000u32.to_be_bytes()))
        .await
        .unwrap();
    let (mut reader, mut writer) = s.into_split();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut head = [0u8; 9];
        loop {
            if reader.read_exact(&mut head).await.is_err() {
                let _ = seen_tx.send(None);
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if reader.read_exact(&mut payload).await.is_err() {
                let _ = seen_tx.send(None);
                return;
            }
            if head[3] == GOAWAY {
                // NO_ERROR: keygate's graceful close (h2's own refusal of streams reset
                // before they were taken is ENHANCE_YOUR_CALM).
                let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                let _ = seen_tx.send(Some(code));
            }
        }
    });
    let authority = gw.addr.to_string();
    let mut opened = 0u32;
    let mut goaway_after = None;
    let mut closed_after = None;
    // Each batch: 40 streams to the upstream, reset once it was asked, and 50 that keygate
    // answers itself at once (404): these must not dilute the resets (review).
    'batches: for batch in 0..40u32 {
        let ids: Vec<u32> = (0..90).map(|i| 1 + 2 * (batch * 90 + i)).collect();
        let (streams, pads) = ids.split_at(40);
        let heads: Vec<u8> = streams
            .iter()
            .flat_map(|&id| get(id, &authority, "/public/slow"))
            .chain(pads.iter().flat_map(|&id| get(id, &authority, "/nowhere")))
            .collect();
        if writer.write_all(&heads).await.is_err() {
            closed_after.get_or_insert(opened);
            break;
        }
        opened += 40;
        // Reset only once keygate has taken the streams and asked the upstream; after its
        // GOAWAY it takes no more (the resets then meet h2's own limit on streams reset
        // before they are taken).
        if goaway_after.is_none() {
            tokio::time::timeout(Duration::from_secs(10), async {
                while received.load(Ordering::SeqCst) < opened {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
            .await
            .expect("the upstream asked for every stream");
        } else {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let resets: Vec<u8> = streams
            .iter()
            .flat_map(|&id| frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()))
            .collect();
        let _ = writer.write_all(&resets).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        while let Ok(event) = seen.try_recv() {
            match event {
                Some(code) => {
                    if goaway_after.is_none() {
                        assert_eq!(code, 0, "the first GOAWAY's code, after {opened} streams");
                    }
                    goaway_after.get_or_insert(opened);
                }
                None => {
                    closed_after.get_or_insert(opened);
                    break 'batches;
                }
            }
        }
    }
    let goaway_after = goaway_after.expect("a GOAWAY");
    assert!(
        (500..=600).contains(&goaway_after),
        "GOAWAY after {goaway_after} streams"
    );
    let closed_after = closed_after.expect("the connection cut off");
    assert!(
        closed_after <= goaway_after + 100,
        "cut off after {closed_after} streams, GOAWAY after {goaway_after}"
    );
    assert_eq!(cut_offs(&gw.metrics().await, "client_reset_flood"), Some(1));
}

/// Streams answered in full are not resets, however many: a busy connection stays open.
#[tokio::test]
async fn an_http2_connection_with_many_answered_streams_is_not_taken_for_a_reset_flood() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream::delayed(Duration::ZERO).await;
    let gw = Gateway::start(&config(&dir, up, ""));
    let client = crate::support::h2_client();
    for round in 0..12 {
        let answers = futures_util::future::join_all(
            (0..50).map(|i| client.get(gw.url(&format!("/public/{round}/{i}"))).send()),
        )
        .await;
        for answer in answers {
            assert_eq!(answer.unwrap().status(), 200);
        }
    }
    assert_eq!(cut_offs(&gw.metrics().await, "client_reset_flood"), Some(0));
}

/// Many requests at once to a slow upstream (streams of one HTTP/2 client connection, the
/// reported attack) open no more than the upstream's `max_connections`: a request that finds
/// none free within `connect_timeout` is answered 503 `UPSTREAM_BUSY`, and once they are free
/// again requests go through.
#[tokio::test]
async fn connections_to_one_upstream_stay_within_its_max_connections() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (up, open) = upstream::delayed_counting(Duration::from_millis(1500)).await;
    let config = format!(
        "[proxy]\n[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.up]\nurl = \"http://{up}\"\nmax_connections = 2\nconnect_timeout = \"300ms\"\n\
         [[routes]]\npath_prefix = \"/public\"\nupstream = \"up\"\npublic = true\n",
        dir.path().join("keys.db").display()
    );
    let gw = Gateway::start(&config);
    let client = crate::support::h2_client();
    let send = |i: usize| {
        let request = client.get(gw.url(&format!("/public/{i}"))).send();
        async move {
            let r = request.await.unwrap();
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (
                status,
                retry_after,
                body["error"]["code"].as_str().map(str::to_owned),
            )
        }
    };
    let answers = futures_util::future::join_all((0..6).map(send)).await;
    let ok = answers.iter().filter(|(status, ..)| *status == 200).count();
    let busy: Vec<_> = answers
        .iter()
        .filter(|(status, ..)| *status != 200)
        .collect();
    assert!(
        open.peak.load(Ordering::SeqCst) <= 2,
        "the upstream had {} connections at once: {answers:?}",
        open.peak.load(Ordering::SeqCst)
    );
    assert_eq!(ok, 2, "{answers:?}");
    for answer in &busy {
        assert_eq!(
            *answer,
            &(503, Some("1".to_owned()), Some("UPSTREAM_BUSY".to_owned())),
            "{answers:?}"
        );
    }
    let metrics = gw.metrics().await;
    let gauge = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keygate_upstream_connections{upstream=\"up\"} "))
        .unwrap_or_else(|| panic!("no upstream connections gauge: {metrics}"));
    assert!(gauge == "1" || gauge == "2", "{gauge}");
    // Free again: the idle connections are reused (or one is closed for a new one).
    let (status, ..) = send(6).await;
    assert_eq!(status, 200);
    assert!(open.peak.load(Ordering::SeqCst) <= 2);
}

/// The value of the unlabelled series `name` in a scrape.
fn gauge(scrape: &str, name: &str) -> Option<u64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `proxy.max_peek_total_bytes` bounds the body bytes every key peek holds together: slow form
/// uploads that fill it make the next body-key request get 503 `GATEWAY_BUSY` with
/// `Retry-After`, while a request with its key in a header passes, body or not; once the slow
/// uploads are gone the budget is whole again and body keys pass.
#[tokio::test]
async fn body_peeks_share_one_byte_budget_that_header_keys_do_not_touch() {
    // Each upload holds less than the route's max_peek_bytes (4096), all together the budget,
    // which must have room for one peek and the read that crosses it (4096 + 16 KiB).
    const UPLOADS: usize = 6;
    const HELD_EACH: usize = 3584;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let echo = upstream::echo().await;
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let (key, _) = create_key(&store, |_| {}).await;
    drop(store);
    let gw = Gateway::start(&format!(
        r#"
        [proxy]
        max_peek_total_bytes = {total}
        max_header_bytes = 8192
        [store]
        kind = "embedded"
        path = "{db}"
        [upstreams.echo]
        url = "http://{echo}"
        [[routes]]
        name = "form"
        path_prefix = "/form"
        upstream = "echo"
        sources = ["bearer", "form"]
        max_peek_bytes = 4096
        peek_timeout = "30s"
        "#,
        total = UPLOADS * HELD_EACH,
        db = db.display()
    ));
    let form = |body: String| {
        client()
            .post(gw.url("/form"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
    };
    let key_in_body = format!("clientKey={key}&a=1");
    let ok = form(key_in_body.clone()).send().await.unwrap();
    assert_eq!(ok.status(), 200, "{:?}", ok.text().await);
    let held = || async { gauge(&gw.metrics().await, "keygate_peek_held_bytes") };
    assert!(
        eventually(Duration::from_secs(5), || async { held().await == Some(0) }).await,
        "a forwarded peek gives its bytes back: {:?}",
        held().await
    );

    // Slow uploads: the start of a long form without the key, then nothing; each peek holds
    // what it read while it waits for the key.
    let mut uploads = Vec::new();
    for _ in 0..UPLOADS {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let mut head = b"POST /form HTTP/1.1\r\nHost: x\r\n\
                         Content-Type: application/x-www-form-urlencoded\r\n\
                         Content-Length: 100000\r\n\r\npad="
            .to_vec();
        head.extend(std::iter::repeat_n(b'x', HELD_EACH - 4));
        s.write_all(&head).await.unwrap();
        uploads.push(s);
    }
    let full = Some((UPLOADS * HELD_EACH) as u64);
    assert!(
        eventually(Duration::from_secs(5), || async { held().await == full }).await,
        "the slow uploads fill the budget: {:?}",
        held().await
    );

    let busy = form(key_in_body.clone()).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    assert_eq!(busy.headers()["retry-after"], "1");
    let answer: serde_json::Value = busy.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "GATEWAY_BUSY", "{answer}");
    // The key in a header: no peek, no budget, with a form body or none.
    let header_key = form("a=1&b=2".into())
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(header_key.status(), 200);
    let get = client()
        .get(gw.url("/form"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    let scrape = gw.metrics().await;
    let overloaded = scrape.lines().find(|l| {
        l.starts_with("keygate_requests_total{")
            && l.contains("outcome=\"overloaded\"")
            && l.contains("route=\"form\"")
    });
    assert_eq!(overloaded.and_then(|l| l.rsplit(' ').next()), Some("1"));

    // The clients give up: their peeks fail, and the bytes go back.
    drop(uploads);
    assert!(
        eventually(Duration::from_secs(5), || async { held().await == Some(0) }).await,
        "closed uploads give their bytes back: {:?}",
        held().await
    );
    let again = form(key_in_body).send().await.unwrap();
    assert_eq!(again.status(), 200, "{:?}", again.text().await);
}
