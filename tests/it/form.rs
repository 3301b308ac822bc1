//! Keys in request bodies, end to end: a real gateway process, the echo upstream (it reports
//! the length and SHA-256 of the body it received, so every check below is byte for byte), and
//! real clients: curl and Python `requests` as subprocesses, reqwest, and raw TCP for what
//! clients will not do on request (stall mid-body, stream 200 MiB).

use crate::support::gateway::{BIN, Gateway};
use crate::support::{client, create_key, h2_client, raw_exchange, upstream};
use keygate::store::KeyStore;
use keygate::store::embedded::EmbeddedStore;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Env {
    gw: Gateway,
    key: String,
    key_id: String,
    dir: tempfile::TempDir,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let echo = upstream::echo().await;
    let config = format!(
        r#"
        [store]
        kind = "embedded"
        path = "{db}"
        [upstreams.echo]
        url = "http://{echo}"
        [[routes]]
        name = "form"
        path_prefix = "/form"
        upstream = "echo"
        sources = ["bearer", "header", "form"]
        [[routes]]
        name = "fields"
        path_prefix = "/fields"
        upstream = "echo"
        sources = ["form", "bearer"]
        form_fields = ["api_key", "clientKey"]
        max_peek_bytes = 4096
        [[routes]]
        name = "strip"
        path_prefix = "/strip"
        upstream = "echo"
        sources = ["form"]
        strip_form_field = true
        [[routes]]
        name = "json"
        path_prefix = "/json"
        upstream = "echo"
        sources = ["header", "json"]
        [[routes]]
        name = "slow"
        path_prefix = "/slow"
        upstream = "echo"
        sources = ["form"]
        peek_timeout = "500ms"
        [[routes]]
        name = "api"
        path_prefix = "/api"
        upstream = "echo"
        "#,
        db = db.display()
    );
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let (key, record) = create_key(&store, |_| {}).await;
    let gw = Gateway::start(&config);
    Env {
        gw,
        key,
        key_id: record.api_key_id,
        dir,
    }
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Runs a command off the runtime's workers (the echo upstream runs on them).
async fn output(mut cmd: Command) -> Output {
    let program = format!("{:?}", cmd.get_program());
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (tests/run.sh installs curl and python3-requests)")
        })
}

/// A curl answer: status, JSON body (Null when not JSON), and curl's stderr.
struct Curl {
    status: u16,
    json: Value,
    stderr: String,
}

impl Curl {
    fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }
}

async fn curl(args: &[&str]) -> Curl {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "-w", "\n%{http_code}"])
        .args(args);
    let out = output(cmd).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Curl {
        status: status.trim().parse().unwrap_or(0),
        json: serde_json::from_str(body).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// curl POSTing `path` as a chunked urlencoded body.
async fn curl_chunked_form(path: &std::path::Path, url: &str) -> Curl {
    curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Content-Type: application/x-www-form-urlencoded",
        "--data-binary",
        &format!("@{}", path.display()),
        url,
    ])
    .await
}

/// What curl's `-F` sends, rebuilt from the boundary it chose (reported by the echo
/// upstream): each part is `--b CRLF headers CRLF CRLF value CRLF`, then `--b--`.
fn curl_multipart(seen: &Value, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let ct = seen["headers"]["content-type"][0].as_str().unwrap();
    let boundary = ct.split("boundary=").nth(1).unwrap();
    multipart(boundary, parts)
}

fn multipart(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, file, value) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => out.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

fn assert_received(seen: &Value, sent: &[u8]) {
    assert_eq!(seen["body_len"], sent.len(), "{seen}");
    assert_eq!(seen["body_sha256"], sha(sent).as_str(), "{seen}");
    assert_eq!(seen["body_error"], Value::Null, "{seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_form_and_urlencoded_keys_reach_the_upstream_byte_for_byte() {
    let e = env().await;
    let url = e.gw.url("/form/items");
    let r = curl(&[
        "-F",
        &format!("clientKey={}", e.key),
        "-F",
        "page=2",
        "-F",
        "perPage=50",
        &url,
    ])
    .await;
    assert_eq!(r.status, 200, "{} {}", r.json, r.stderr);
    assert_eq!(r.json["headers"]["x-keygate-key-id"][0], e.key_id.as_str());
    let sent = curl_multipart(
        &r.json,
        &[
            ("clientKey", None, e.key.as_bytes()),
            ("page", None, b"2"),
            ("perPage", None, b"50"),
        ],
    );
    assert_received(&r.json, &sent);

    let r = curl(&[
        "--data-urlencode",
        &format!("clientKey={}", e.key),
        "--data-urlencode",
        // No space: curl versions differ on `+` versus `%20` for it.
        "q=a/b&c",
        "-d",
        "page=2",
        &url,
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_received(
        &r.json,
        format!("clientKey={}&q=a%2Fb%26c&page=2", e.key).as_bytes(),
    );

    // Chunked request bodies are peeked and forwarded the same way.
    let body = format!("page=2&clientKey={}&perPage=50", e.key);
    let path = e.dir.path().join("chunked.txt");
    std::fs::write(&path, &body).unwrap();
    let r = curl(&[
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Content-Type: application/x-www-form-urlencoded",
        "--data-binary",
        &format!("@{}", path.display()),
        &url,
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(r.json["headers"].get("content-length").is_none());
    assert_received(&r.json, body.as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let e = env().await;
    let file: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let body = multipart(
        "expect-boundary",
        &[
            ("clientKey", None, e.key.as_bytes()),
            ("file", Some("f.bin"), &file),
        ],
    );
    let path = e.dir.path().join("expect.bin");
    std::fs::write(&path, &body).unwrap();
    let started = Instant::now();
    let r = curl(&[
        "-v",
        "-H",
        "Expect: 100-continue",
        "-H",
        "Content-Type: multipart/form-data; boundary=expect-boundary",
        "--data-binary",
        &format!("@{}", path.display()),
        &e.gw.url("/form/upload"),
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.stderr);
    assert!(r.stderr.contains("HTTP/1.1 100 Continue"), "{}", r.stderr);
    // curl waits 1 s for a 100 that never comes; it came.
    assert!(started.elapsed() < Duration::from_millis(900));
    assert_received(&r.json, &body);
}

const PYTHON: &str = r#"
import hashlib, json, sys, requests
url, key = sys.argv[1], sys.argv[2]
s = requests.Session()
s.trust_env = False
out = []
def send(**kw):
    p = s.prepare_request(requests.Request("POST", url, **kw))
    body = p.body if isinstance(p.body, bytes) else p.body.encode()
    r = s.send(p)
    seen = r.json()
    out.append({
        "status": r.status_code,
        "sent_len": len(body),
        "sent_sha": hashlib.sha256(body).hexdigest(),
        "seen_len": seen.get("body_len"),
        "seen_sha": seen.get("body_sha256"),
        "code": (seen.get("error") or {}).get("code"),
    })
blob = bytes(range(256)) * 400
send(files={"clientKey": (None, key), "page": (None, "2"), "upload": ("data.bin", blob)})
send(data={"clientKey": key, "perPage": "10"})
send(data={"clientKey": key}, files={"upload": ("data.bin", blob)})
send(data={"page": "2"}, files={"upload": ("data.bin", blob)})
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn python_requests_files_and_data() {
    let e = env().await;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PYTHON, &e.gw.url("/form/py"), &e.key]);
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for r in &results[..3] {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["seen_len"], r["sent_len"], "{r}");
        assert_eq!(r["seen_sha"], r["sent_sha"], "{r}");
    }
    assert_eq!(results[3]["status"], 401, "{}", results[3]);
    assert_eq!(results[3]["code"], "API_KEY_MISSING");
}

#[tokio::test(flavor = "multi_thread")]
async fn key_after_a_large_file_part_passes_within_the_limit_only() {
    let e = env().await;
    let url = e.gw.url("/form/upload");
    let small = vec![b'a'; 40_000];
    let large = vec![b'b'; 100_000];
    std::fs::write(e.dir.path().join("small.bin"), &small).unwrap();
    std::fs::write(e.dir.path().join("large.bin"), &large).unwrap();
    let key_field = format!("clientKey={}", e.key);
    let file = |name: &str| format!("file=@{}", e.dir.path().join(name).display());

    let r = curl(&["-F", &file("small.bin"), "-F", &key_field, &url]).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let sent = curl_multipart(
        &r.json,
        &[
            ("file", Some("small.bin"), &small),
            ("clientKey", None, e.key.as_bytes()),
        ],
    );
    assert_received(&r.json, &sent);

    // Past the default 64 KiB: not found, 401, and the message says where we looked.
    let r = curl(&["-F", &file("large.bin"), "-F", &key_field, &url]).await;
    assert_eq!(r.status, 401, "{}", r.json);
    assert_eq!(r.code(), "API_KEY_MISSING");
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("part of the body"),
        "{}",
        r.json
    );

    // Key first, then the large part: passes, nothing after the key is waited for.
    let r = curl(&["-F", &key_field, "-F", &file("large.bin"), &url]).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let sent = curl_multipart(
        &r.json,
        &[
            ("clientKey", None, e.key.as_bytes()),
            ("file", Some("large.bin"), &large),
        ],
    );
    assert_received(&r.json, &sent);

    // A route with a 4 KiB limit whose later source is the bearer header: a body without a
    // key within the limit falls through to the header, and is forwarded whole.
    let r = curl(&[
        "-F",
        &file("small.bin"),
        "-H",
        &format!("Authorization: Bearer {}", e.key),
        &e.gw.url("/fields/x"),
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let sent = curl_multipart(&r.json, &[("file", Some("small.bin"), &small)]);
    assert_received(&r.json, &sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_wrong_and_duplicate_keys() {
    let e = env().await;
    let url = e.gw.url("/form/x");
    let r = curl(&["-i", "-F", "page=2", &url]).await;
    assert_eq!(r.status, 401);

    let r = curl(&["-F", "page=2", &url]).await;
    assert_eq!((r.status, r.code()), (401, "API_KEY_MISSING"));

    let unknown = keygate::auth::key::NewKey::generate(
        &Default::default(),
        keygate::auth::key::SlotTag::random(),
    );
    let r = curl(&["-F", &format!("clientKey={}", unknown.expose()), &url]).await;
    assert_eq!((r.status, r.code()), (401, "API_KEY_INVALID"));
    assert!(!r.json.to_string().contains(unknown.expose()));

    let r = curl(&["-F", "clientKey=not-a-key", &url]).await;
    assert_eq!((r.status, r.code()), (401, "API_KEY_MALFORMED"));

    let r = curl(&["-F", "clientKey=", "-F", "page=1", &url]).await;
    assert_eq!((r.status, r.code()), (401, "API_KEY_MALFORMED"));

    let key_field = format!("clientKey={}", e.key);
    let r = curl(&["-F", &key_field, "-F", &key_field, &url]).await;
    assert_eq!((r.status, r.code()), (400, "API_KEY_AMBIGUOUS"));
    let r = curl(&["-d", &key_field, "-d", &key_field, &url]).await;
    assert_eq!((r.status, r.code()), (400, "API_KEY_AMBIGUOUS"));
    let r = curl(&[
        "-d",
        &key_field,
        "-d",
        &format!("api_key={}", e.key),
        &e.gw.url("/fields/x"),
    ])
    .await;
    assert_eq!((r.status, r.code()), (400, "API_KEY_AMBIGUOUS"));

    // `/fields` names `api_key` too.
    let r = curl(&["-d", &format!("api_key={}", e.key), &e.gw.url("/fields/x")]).await;
    assert_eq!(r.status, 200, "{}", r.json);

    // Routes without the form source never read bodies.
    let r = curl(&["-F", &key_field, &e.gw.url("/api/x")]).await;
    assert_eq!((r.status, r.code()), (401, "API_KEY_MISSING"));

    // Header sources come first: with a good header key the body is not even read.
    let r = curl(&[
        "-H",
        &format!("X-API-Key: {}", e.key),
        "-F",
        "clientKey=junk",
        &url,
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let sent = curl_multipart(&r.json, &[("clientKey", None, b"junk")]);
    assert_received(&r.json, &sent);
    assert!(r.json["headers"].get("x-api-key").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_bodies_are_400_and_never_pass() {
    let e = env().await;
    let url = e.gw.url("/form/x");
    let post = |ct: String, body: Vec<u8>| {
        let url = url.clone();
        async move {
            let r = client()
                .post(url)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            (status, v)
        }
    };
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("").to_owned();
    let key = e.key.as_bytes();

    let whole = multipart("b1", &[("clientKey", None, key), ("page", None, b"2")]);
    let truncated = whole[..60].to_vec();
    let (s, v) = post("multipart/form-data; boundary=b1".into(), truncated).await;
    assert_eq!((s, code(&v).as_str()), (400, "BODY_MALFORMED"), "{v}");

    let (s, v) = post("multipart/form-data; boundary=other".into(), whole.clone()).await;
    assert_eq!((s, code(&v).as_str()), (400, "BODY_MALFORMED"), "{v}");

    let (s, v) = post("multipart/form-data".into(), whole.clone()).await;
    assert_eq!((s, code(&v).as_str()), (400, "BODY_MALFORMED"), "{v}");

    // A quoted boundary (RFC 2046 allows spaces and colons in it) is fine.
    let quoted = multipart("quoted boundary:1", &[("clientKey", None, key)]);
    let (s, v) = post(
        "multipart/form-data; boundary=\"quoted boundary:1\"".into(),
        quoted.clone(),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_received(&v, &quoted);

    let form = "application/x-www-form-urlencoded".to_owned();
    for bad in [
        "clientKey=%zz".to_owned(),
        "clientKey=%FF%FE".to_owned(),
        format!("page%g=1&clientKey={}", e.key),
    ] {
        let (s, v) = post(form.clone(), bad.clone().into_bytes()).await;
        assert_eq!(
            (s, code(&v).as_str()),
            (400, "BODY_MALFORMED"),
            "{bad}: {v}"
        );
    }
    let not_utf8 = multipart("b2", &[("clientKey", None, &[0xC3, 0x28])]);
    let (s, v) = post("multipart/form-data; boundary=b2".into(), not_utf8).await;
    assert_eq!((s, code(&v).as_str()), (400, "BODY_MALFORMED"), "{v}");

    // Parts an upstream could read another way than keygate: refused, not guessed.
    let k = &e.key;
    for bad in [
        format!(
            "--b3\r\nContent-Disposition: form-data; name=page\r\nContent-Disposition: form-data; name=clientKey\r\n\r\n{k}\r\n--b3--\r\n"
        ),
        format!(
            "--b3\r\nContent-Disposition: form-data; name=page; name=clientKey\r\n\r\n{k}\r\n--b3--\r\n"
        ),
        format!(
            "--b3\r\nContent-Disposition: form-data; name=\"clientKey\r\n\r\n{k}\r\n--b3--\r\n"
        ),
        format!(
            "--b3 junk\r\nContent-Disposition: form-data; name=clientKey\r\n\r\n{k}\r\n--b3--\r\n"
        ),
        // A bare-LF framed form hidden in the preamble (Flask would read its key, `other`).
        format!(
            "P\n--b3\nContent-Disposition: form-data; name=clientKey\n\nother\n--b3--\n\r\n--b3\r\nContent-Disposition: form-data; name=clientKey\r\n\r\n{k}\r\n--b3--\r\n"
        ),
        // The boundary inside the first line.
        format!(
            "x--b3\r\nContent-Disposition: form-data; name=clientKey\r\n\r\nother\r\n--b3\r\nContent-Disposition: form-data; name=clientKey\r\n\r\n{k}\r\n--b3--\r\n"
        ),
        // An RFC 2231 name, which some frameworks decode.
        format!(
            "--b3\r\nContent-Disposition: form-data; name*=UTF-8''clientKey\r\n\r\nother\r\n--b3\r\nContent-Disposition: form-data; name=clientKey\r\n\r\n{k}\r\n--b3--\r\n"
        ),
        // The key field as a file.
        format!(
            "--b3\r\nContent-Disposition: form-data; name=clientKey; filename=k.txt\r\n\r\n{k}\r\n--b3--\r\n"
        ),
        // An escape that parsers undo differently.
        format!(
            "--b3\r\nContent-Disposition: form-data; name=\"client\\Key\"\r\n\r\n{k}\r\n--b3--\r\n"
        ),
        // A bare-LF empty line in the part headers.
        format!(
            "--b3\r\nContent-Disposition: form-data; name=clientKey\n\nX: a\r\n\r\n{k}\r\n--b3--\r\n"
        ),
        // The boundary as the start of a longer line in the key's value.
        format!(
            "--b3\r\nContent-Disposition: form-data; name=clientKey\r\n\r\n{k}\r\n--b3W\r\n--b3--\r\n"
        ),
    ] {
        let (s, v) = post(
            "multipart/form-data; boundary=b3".into(),
            bad.clone().into_bytes(),
        )
        .await;
        assert_eq!(
            (s, code(&v).as_str()),
            (400, "BODY_MALFORMED"),
            "{bad}: {v}"
        );
    }
    let (s, v) = post(
        "multipart/form-data; boundary=b3; boundary=b4".into(),
        multipart("b3", &[("clientKey", None, key)]),
    )
    .await;
    assert_eq!((s, code(&v).as_str()), (400, "BODY_MALFORMED"), "{v}");

    // Bodies a framework reads another key from (found in review): refused.
    let urlencoded = "application/x-www-form-urlencoded".to_owned();
    for (ct, body, want) in [
        // PHP, qs, Rails: `clientKey[]` is an array named clientKey.
        (
            urlencoded.clone(),
            format!("clientKey={k}&clientKey[]=other"),
            "API_KEY_AMBIGUOUS",
        ),
        // PHP: a leading space is dropped.
        (
            urlencoded.clone(),
            format!("clientKey={k}&+clientKey=other"),
            "API_KEY_AMBIGUOUS",
        ),
        // Django REST framework and Express decode UTF-7.
        (
            "application/x-www-form-urlencoded; charset=utf-7".to_owned(),
            format!("clientKey={k}"),
            "BODY_MALFORMED",
        ),
        (
            "multipart/form-data; boundary=b6".to_owned(),
            format!(
                "--b6\r\nContent-Disposition: form-data; name=clientKey\r\n\r\n{k}\r\n--b6\r\nContent-Disposition: form-data; name=\"clientKey[0]\"\r\n\r\nother\r\n--b6--\r\n"
            ),
            "API_KEY_AMBIGUOUS",
        ),
    ] {
        let (s, v) = post(ct.clone(), body.clone().into_bytes()).await;
        assert_eq!((s, code(&v).as_str()), (400, want), "{ct} {body}: {v}");
    }
    // A compressed body: Express inflates it and could find another key inside.
    let r = client()
        .post(e.gw.url("/form/x"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-encoding", "gzip")
        .body(format!("clientKey={k}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "BODY_MALFORMED", "{v}");
    // Such a body is not read; a header source after `form` may still carry the key.
    let r = client()
        .post(e.gw.url("/fields/x"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-encoding", "gzip")
        .bearer_auth(k)
        .body("not really gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The key field's name in the query too: Flask's request.values would take the query's.
    let r = client()
        .post(e.gw.url("/form/x?page=1&clientKey=other"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("clientKey={k}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(code(&v), "API_KEY_AMBIGUOUS", "{v}");

    // What RFC 2046 allows but some framework reads as another key is refused (a differential
    // review): a preamble with text, padding after a boundary, a part without headers.
    for framed in [
        format!(
            "preamble\r\n--b5\r\ncontent-disposition: form-data; name=clientKey\r\n\r\n{k}\r\n--b5--"
        ),
        format!("--b5 \t\r\ncontent-disposition: form-data; name=clientKey\r\n\r\n{k}\r\n--b5--"),
        format!(
            "--b5\r\n\r\nno headers\r\n--b5\r\ncontent-disposition: form-data; name=clientKey\r\n\r\n{k}\r\n--b5--"
        ),
    ] {
        let (s, v) = post(
            "multipart/form-data; boundary=b5".into(),
            framed.into_bytes(),
        )
        .await;
        assert_eq!(s, 400, "{v}");
        assert_eq!(code(&v), "BODY_MALFORMED", "{v}");
    }
    // Read: a preamble of line breaks, a token name in other case, an epilogue of line breaks.
    let framed = format!(
        "\r\n--b5\r\ncontent-disposition: form-data; NAME=clientKey\r\n\r\n{k}\r\n--b5--\r\n\r\n"
    )
    .into_bytes();
    let (s, v) = post("multipart/form-data; boundary=b5".into(), framed.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_received(&v, &framed);

    // What Django or PHP would read another key from (review, checked against Django 5.2):
    // a part after the close delimiter, `--boundary` mid-line, a single-quoted name, another
    // parameter naming a boundary; and a name equal without case (ASP.NET).
    let part = |name: &str, value: &str| {
        format!("--b5\r\nContent-Disposition: form-data; name={name}\r\n\r\n{value}\r\n")
    };
    let real = part("\"clientKey\"", k);
    let cases = [
        (
            "b5",
            format!(
                "{real}--b5--\r\n{}--b5--\r\n",
                part("\"clientKey\"", "VICTIM")
            ),
            "BODY_MALFORMED",
        ),
        (
            "b5",
            format!(
                "{}{real}--b5--\r\n",
                part(
                    "\"note\"",
                    "hello--b5\r\nContent-Disposition: form-data; name=\"clientKey\"\r\n\r\nVICTIM"
                )
            ),
            "BODY_MALFORMED",
        ),
        (
            "b5",
            format!("{real}{}--b5--\r\n", part("'clientKey'", "VICTIM")),
            "BODY_MALFORMED",
        ),
        (
            "xboundary=AAA; boundary=b5",
            format!("{real}--b5--\r\n"),
            "BODY_MALFORMED",
        ),
        (
            "b5",
            format!("{real}{}--b5--\r\n", part("\"CLIENTKEY\"", "VICTIM")),
            "API_KEY_AMBIGUOUS",
        ),
    ];
    for (params, body, want) in cases {
        let params = if params.contains('=') {
            params.to_owned()
        } else {
            format!("boundary={params}")
        };
        let (s, v) = post(format!("multipart/form-data; {params}"), body.into_bytes()).await;
        assert_eq!(s, 400, "{params}: {v}");
        assert_eq!(code(&v), want, "{params}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_field_counts_within_and_past_the_limit() {
    let e = env().await;
    let url = e.gw.url("/form/x");
    let mut many: String = (0..7000).map(|i| format!("f{i}=1&")).collect();
    assert!(many.len() < 60_000);
    many.push_str(&format!("clientKey={}", e.key));
    let r = client()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(many.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_received(&r.json().await.unwrap(), many.as_bytes());

    let too_many: String = (0..30_000).map(|i| format!("f{i}=1&")).collect();
    let r = client()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(too_many)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let mut parts: Vec<(String, Vec<u8>)> =
        (0..600).map(|i| (format!("f{i}"), vec![b'v'])).collect();
    parts.push(("clientKey".into(), e.key.as_bytes().to_vec()));
    let refs: Vec<(&str, Option<&str>, &[u8])> = parts
        .iter()
        .map(|(n, v)| (n.as_str(), None, v.as_slice()))
        .collect();
    let body = multipart("many", &refs);
    let r = client()
        .post(&url)
        .header("content-type", "multipart/form-data; boundary=many")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_received(&r.json().await.unwrap(), &body);
}

/// Sends `head` and `body` on a fresh connection and returns the status line and the body.
async fn raw(gw: &Gateway, head: &str, body: &[u8]) -> (String, String) {
    let mut request = head.as_bytes().to_vec();
    request.extend_from_slice(body);
    raw_exchange(gw.addr, &request).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_sending_mid_peek_gets_408() {
    let e = env().await;
    let head = format!(
        "POST /slow/x HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: 200\r\n\r\n",
        e.gw.addr
    );
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(10),
        raw(&e.gw, &head, b"page=2&clientKey=kg_"),
    )
    .await
    .expect("the gateway gave up on the slow client");
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert!(body.contains("REQUEST_TIMEOUT"), "{body}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_200_mib_upload_with_the_key_first_streams_in_constant_memory() {
    const TOTAL: usize = 200 * 1024 * 1024;
    let e = env().await;
    let boundary = "big-upload";
    let mut head_part = multipart(boundary, &[("clientKey", None, e.key.as_bytes())]);
    // Drop the closing delimiter: the file part follows.
    head_part.truncate(head_part.len() - format!("--{boundary}--\r\n").len());
    head_part.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let content_length = head_part.len() + TOTAL + tail.len();
    let block: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    // The expected hash is computed beside the upload, not in its way.
    let expected = {
        let (head_part, block, tail) = (head_part.clone(), block.clone(), tail.clone());
        std::thread::spawn(move || {
            let mut hasher = Sha256::new();
            hasher.update(&head_part);
            for _ in 0..TOTAL / block.len() {
                hasher.update(&block);
            }
            hasher.update(tail.as_bytes());
            hex::encode(hasher.finalize())
        })
    };

    let pid = e.gw.pid();
    let before = rss_kib(pid);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };

    let started = Instant::now();
    let mut s = TcpStream::connect(e.gw.addr).await.unwrap();
    let head = format!(
        "POST /form/upload HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {content_length}\r\n\r\n",
        e.gw.addr
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&head_part).await.unwrap();
    for _ in 0..TOTAL / block.len() {
        s.write_all(&block).await.unwrap();
    }
    s.write_all(tail.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let elapsed = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();

    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let seen: Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(seen["body_len"], content_length);
    assert_eq!(seen["body_sha256"], expected.join().unwrap().as_str());
    // The upload is 200 MiB; the gateway's memory must not follow it.
    let grew = peak.saturating_sub(before);
    eprintln!(
        "200 MiB upload: {elapsed:?}, gateway RSS {before} KiB before, peak {peak} KiB (+{grew} KiB)"
    );
    assert!(peak > 0, "could not read the gateway's memory");
    assert!(grew < 32 * 1024, "gateway RSS grew by {grew} KiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn urlencoded_key_is_stripped_when_the_route_asks() {
    let e = env().await;
    let body = format!("page=2&clientKey={}&perPage=10", e.key);
    let r = client()
        .post(e.gw.url("/strip/x"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_received(&seen, b"page=2&perPage=10");
    assert_eq!(seen["headers"]["content-length"][0], "17");

    // Chunked: no length to fix, same bytes.
    let path = e.dir.path().join("strip.txt");
    std::fs::write(&path, format!("clientKey={}&page=3", e.key)).unwrap();
    let r = curl_chunked_form(&path, &e.gw.url("/strip/x")).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_received(&r.json, b"page=3");

    // Chunked with a second key field after the first: stripping the first would leave the
    // upstream only the second, so the whole body is read and the two are refused.
    std::fs::write(&path, format!("clientKey={}&clientKey=other", e.key)).unwrap();
    let r = curl_chunked_form(&path, &e.gw.url("/strip/x")).await;
    assert_eq!(
        (r.status, r.code()),
        (400, "API_KEY_AMBIGUOUS"),
        "{}",
        r.json
    );
    // Chunked and longer than max_peek_bytes (64 KiB): what follows cannot be checked.
    let mut long = format!("clientKey={}&filler=", e.key);
    long.push_str(&"x".repeat(70 * 1024));
    std::fs::write(&path, &long).unwrap();
    let r = curl_chunked_form(&path, &e.gw.url("/strip/x")).await;
    assert_eq!((r.status, r.code()), (413, "BODY_TOO_LARGE"), "{}", r.json);

    // Multipart bodies are forwarded unchanged even here (documented).
    let r = curl(&["-F", &format!("clientKey={}", e.key), &e.gw.url("/strip/x")]).await;
    assert_eq!(r.status, 200);
    let sent = curl_multipart(&r.json, &[("clientKey", None, e.key.as_bytes())]);
    assert_received(&r.json, &sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_bodies_over_http1_and_h2c() {
    let e = env().await;
    let body = format!(r#"{{"page":2,"clientKey":"{}","items":[1,2,3]}}"#, e.key);
    let h2 = h2_client();
    for c in [client(), h2] {
        let r = c
            .post(e.gw.url("/json/x"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_received(&r.json().await.unwrap(), body.as_bytes());
    }
    // The form route does not read JSON.
    let r = client()
        .post(e.gw.url("/form/x"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // h2c form posts work too.
    let form = format!("clientKey={}", e.key);
    let r = h2_client()
        .post(e.gw.url("/form/x"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_received(&r.json().await.unwrap(), form.as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_mode_accepts_curl_form_keys_out_of_the_box() {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut addr, mut key) = (None, None);
    while key.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("dev mode output");
        if let Some(a) = line.strip_prefix("keygate: proxy listening on http://") {
            addr = Some(a.trim().to_owned());
        }
        if let Some(k) = line.trim().strip_prefix("API key:") {
            key = k.split_whitespace().next().map(str::to_owned);
        }
    }
    let (addr, key) = (addr.unwrap(), key.unwrap());
    let r = curl(&[
        "-F",
        &format!("clientKey={key}"),
        "-F",
        "page=2",
        &format!("http://{addr}/hello"),
    ])
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.status, 200, "{} {}", r.json, r.stderr);
    let sent = curl_multipart(
        &r.json,
        &[("clientKey", None, key.as_bytes()), ("page", None, b"2")],
    );
    assert_received(&r.json, &sent);
}

/// Review: a chunked body read to its end for its key (the key field last) reached the upstream
/// with a `Content-Length` and without its trailers; and a request with trailers never counted
/// as sent, so the response timeout never ran (a 502 after the upstream's 40 s, not a 504). The
/// upstream here reads the whole request, trailers included, and never answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_key_request_keeps_its_trailers_and_its_response_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the request is whole: its trailer section ends with an empty line.
        while !String::from_utf8_lossy(&seen).contains("\r\n0\r\nx-sig: abc\r\n\r\n") {
            let Ok(n) = conn.read(&mut buf).await else {
                break;
            };
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        let _ = seen_tx.send(String::from_utf8_lossy(&seen).into_owned());
        // Holds the connection, never answering.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(conn);
    });
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let (key, _) = create_key(&store, |_| {}).await;
    let gw = Gateway::start(&format!(
        "[store]\nkind = \"embedded\"\npath = \"{}\"\n\
         [upstreams.up]\nurl = \"http://{up}\"\nresponse_timeout = \"1s\"\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"up\"\nsources = [\"form\"]\n",
        db.display()
    ));
    let body = format!("page=2&clientKey={key}");
    let request = format!(
        "POST /t HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Trailer: x-sig\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\nx-sig: abc\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    let (status, _) = raw_exchange(gw.addr, request.as_bytes()).await;
    assert!(status.contains(" 504 "), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the response timeout did not run: {:?}",
        started.elapsed()
    );
    let seen = tokio::time::timeout(Duration::from_secs(5), seen_rx)
        .await
        .expect("the upstream never got the whole request")
        .unwrap();
    assert!(seen.contains("x-sig: abc"), "the trailer was lost: {seen}");
    assert!(
        !seen.to_ascii_lowercase().contains("content-length"),
        "sent with a length, which cannot carry trailers: {seen}"
    );
}
