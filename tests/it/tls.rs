//! TLS termination end to end: a test CA and certificates made with rcgen at test time, the
//! real gateway binary with `[proxy.tls]` / `[admin.tls]`, real rustls clients (reqwest), and
//! raw sockets for what a well-behaved client never sends (TLS 1.1, plaintext, silence).

use crate::support::gateway::{BIN, spawn_and_read_addrs};
use crate::support::{create_key, eventually, upstream};
use keygate::server::{RequestContext, ServeOptions, TlsAcceptor};
use keygate::store::KeyStore;
use keygate::store::embedded::EmbeddedStore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// Test PKI

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, both PEM.
#[derive(Clone)]
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(&self, cn: &str, serial: u64, usage: ExtendedKeyUsagePurpose) -> Pair {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn server(&self, cn: &str, serial: u64) -> Pair {
        self.issue(cn, serial, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self, cn: &str) -> Pair {
        self.issue(cn, 7, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Replaces `path` the atomic way (write aside, rename over), as deployment tools do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The gateway under test

struct Tls {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    store: Arc<dyn KeyStore>,
    ca: Ca,
    cert_file: PathBuf,
    key_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Tls {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Setup<'a> {
    /// Extra lines for `[proxy.tls]` (client_auth, reload_interval, …).
    proxy_tls: &'a str,
    /// Extra lines for `[proxy]`.
    proxy: &'a str,
    /// A whole `[admin.tls]` table (file names relative to the test directory are filled in
    /// through `{dir}`), or empty for a plaintext admin listener.
    admin_tls: &'a str,
}

async fn start(setup: Setup<'_>) -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("keygate test CA");
    let first = ca.server("gen-1", 1);
    let cert_file = dir.path().join("server.crt");
    let key_file = dir.path().join("server.key");
    std::fs::write(&cert_file, &first.cert).unwrap();
    std::fs::write(&key_file, &first.key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let db = dir.path().join("keys.db");
    let echo = upstream::echo().await;
    let d = dir.path().display().to_string();
    let config = format!(
        r#"
        [proxy]
        {proxy}
        [proxy.tls]
        cert_file = "{cert}"
        key_file = "{key}"
        {proxy_tls}
        {admin_tls}
        [store]
        kind = "embedded"
        path = "{db}"
        [upstreams.echo]
        url = "http://{echo}"
        [[routes]]
        name = "api"
        path_prefix = "/"
        upstream = "echo"
        "#,
        proxy = setup.proxy,
        cert = cert_file.display(),
        key = key_file.display(),
        proxy_tls = setup.proxy_tls.replace("{dir}", &d),
        admin_tls = setup.admin_tls.replace("{dir}", &d),
        db = db.display(),
    );
    let config_path = dir.path().join("keygate.toml");
    std::fs::write(&config_path, config).unwrap();
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--config")
        .arg(&config_path)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--admin-listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // The start lines must name the scheme the listener really speaks.
    let admin_marker = if setup.admin_tls.is_empty() {
        "keygate: admin listening on http://"
    } else {
        "keygate: admin listening on https://"
    };
    let (child, addrs) =
        spawn_and_read_addrs(cmd, &["keygate: proxy listening on https://", admin_marker]);
    Tls {
        child,
        addr: addrs[0],
        admin: addrs[1],
        store,
        ca,
        cert_file,
        key_file,
        dir,
    }
}

impl Tls {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// A client that trusts only the test CA, reaches `localhost` at the gateway, and opens a
    /// new connection for every request (so each request sees the current certificate).
    fn client(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca.pem.as_bytes()).unwrap())
            .resolve("localhost", self.addr)
            .tls_info(true)
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
    }

    fn client_with(&self, identity: &Pair) -> reqwest::Client {
        let pem = format!("{}{}", identity.cert, identity.key);
        self.client()
            .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
            .build()
            .unwrap()
    }

    /// The common name of the certificate a new connection is served.
    async fn served_cn(&self) -> String {
        let r = self
            .client()
            .build()
            .unwrap()
            .get(self.url("/"))
            .send()
            .await
            .unwrap();
        let info = r.extensions().get::<reqwest::tls::TlsInfo>().unwrap();
        common_name(info.peer_certificate().unwrap())
    }

    fn replace_pair(&self, pair: &Pair) {
        // Key first: between the two renames the pair is inconsistent, which the reloader
        // must refuse and then pick up once the certificate follows.
        replace(&self.key_file, &pair.key);
        replace(&self.cert_file, &pair.cert);
    }
}

fn common_name(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Serving

#[tokio::test(flavor = "multi_thread")]
async fn h2_and_http1_over_tls_reach_the_upstream_with_a_valid_key() {
    let g = start(Setup::default()).await;
    let (key, record) = create_key(&g.store, |_| {}).await;

    // ALPN offers h2 first; a client that can do both gets HTTP/2.
    let r = g
        .client()
        .build()
        .unwrap()
        .get(g.url("/things?a=1"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let seen: serde_json::Value = r.json().await.unwrap();
    assert_eq!(seen["path"], "/things");
    assert_eq!(
        seen["headers"]["x-keygate-key-id"][0],
        record.api_key_id.as_str()
    );
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");

    // An HTTP/1.1-only client negotiates http/1.1 and is served too.
    let r = g
        .client()
        .http1_only()
        .build()
        .unwrap()
        .get(g.url("/things"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);

    // No key over TLS is the same 401 as in cleartext.
    let r = g
        .client()
        .build()
        .unwrap()
        .get(g.url("/things"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_is_told_the_request_came_over_https() {
    let g = start(Setup::default()).await;
    let (key, _) = create_key(&g.store, |_| {}).await;
    let r = g
        .client()
        .build()
        .unwrap()
        .get(g.url("/x"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    let seen: serde_json::Value = r.json().await.unwrap();
    assert_eq!(seen["headers"]["x-forwarded-proto"][0], "https", "{seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_1_2_is_served_and_tls_1_1_is_not() {
    let g = start(Setup::default()).await;
    let r = g
        .client()
        .max_tls_version(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap()
        .get(g.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // No TLS library we link can speak TLS 1.1, so send its ClientHello by hand: the answer
    // must be an alert (or a closed connection), never a ServerHello.
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    s.write_all(&tls11_client_hello()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the server answers or closes")
        .unwrap_or(0);
    if n > 0 {
        assert_eq!(
            buf[0],
            0x15,
            "expected a TLS alert record, got {:x?}",
            &buf[..n]
        );
    }
    if n >= 7 {
        // Alert level fatal (2), description protocol_version (70).
        assert_eq!(&buf[5..7], &[2, 70], "{:x?}", &buf[..n]);
    }
}

/// A TLS 1.1 ClientHello: version 3.2 in the record and the hello, CBC suites, no
/// `supported_versions` extension. It carries `signature_algorithms` (as many clients of that
/// era did) so the refusal is about the version, not a missing extension.
fn tls11_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02];
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x06, 0xc0, 0x13, 0xc0, 0x09, 0x00, 0x2f]);
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    let extensions: &[u8] = &[
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x04, 0x01, 0x08, 0x04, // sig algs
        0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17, // supported groups: P-256
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // ec point formats: uncompressed
    ];
    hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    hello.extend_from_slice(extensions);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x02];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_http_to_the_tls_port_is_not_served() {
    let g = start(Setup::default()).await;
    let mut s = TcpStream::connect(g.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection");
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // And reqwest over http:// fails the same way.
    let r = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("http://{}/", g.addr))
        .send()
        .await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_client_loses_its_slot_after_the_handshake_timeout() {
    let g = start(Setup {
        proxy: "max_connections = 1",
        proxy_tls: "handshake_timeout = \"500ms\"",
        ..Setup::default()
    })
    .await;
    // Takes the only connection slot and never says hello.
    let mut silent = TcpStream::connect(g.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "silent connection still open after {:?}: {closed:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // The slot is free again: a real client is served.
    let r = g
        .client()
        .build()
        .unwrap()
        .get(g.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

// ---------------------------------------------------------------------------------------------
// Client certificates

#[tokio::test(flavor = "multi_thread")]
async fn required_client_certificates_refuse_clients_without_one() {
    let g = start(Setup {
        proxy_tls: "client_auth = \"required\"\nclient_ca_file = \"{dir}/ca.pem\"",
        ..Setup::default()
    })
    .await;
    let (key, _) = create_key(&g.store, |_| {}).await;

    let none = g
        .client()
        .build()
        .unwrap()
        .get(g.url("/x"))
        .bearer_auth(&key)
        .send()
        .await;
    assert!(
        none.is_err(),
        "served without a client certificate: {none:?}"
    );

    let stranger = Ca::new("some other CA").client("intruder");
    let r = g
        .client_with(&stranger)
        .get(g.url("/x"))
        .bearer_auth(&key)
        .send()
        .await;
    assert!(
        r.is_err(),
        "served with an untrusted client certificate: {r:?}"
    );

    let r = g
        .client_with(&g.ca.client("svc-a"))
        .get(g.url("/x"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn optional_client_certificates_serve_both_but_refuse_untrusted_ones() {
    let g = start(Setup {
        proxy_tls: "client_auth = \"optional\"\nclient_ca_file = \"{dir}/ca.pem\"",
        ..Setup::default()
    })
    .await;
    let (key, _) = create_key(&g.store, |_| {}).await;
    let plain = g.client().build().unwrap();
    for client in [plain, g.client_with(&g.ca.client("svc-a"))] {
        let r = client
            .get(g.url("/x"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = g
        .client_with(&Ca::new("other").client("intruder"))
        .get(g.url("/x"))
        .send()
        .await;
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_listener_can_require_client_certificates_too() {
    let g = start(Setup {
        admin_tls: "[admin.tls]\ncert_file = \"{dir}/server.crt\"\nkey_file = \"{dir}/server.key\"\n\
                    client_auth = \"required\"\nclient_ca_file = \"{dir}/ca.pem\"",
        ..Setup::default()
    })
    .await;
    let url = format!("https://localhost:{}/healthz", g.admin.port());
    let client = |id: Option<&Pair>| {
        let b = g.client().resolve("localhost", g.admin);
        match id {
            Some(p) => b
                .identity(
                    reqwest::Identity::from_pem(format!("{}{}", p.cert, p.key).as_bytes()).unwrap(),
                )
                .build()
                .unwrap(),
            None => b.build().unwrap(),
        }
    };
    assert!(client(None).get(&url).send().await.is_err());
    let r = client(Some(&g.ca.client("ops")))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Reloading

#[tokio::test(flavor = "multi_thread")]
async fn certificates_reload_when_the_files_change_and_bad_ones_are_refused() {
    let g = start(Setup {
        proxy_tls: "reload_interval = \"200ms\"",
        ..Setup::default()
    })
    .await;
    assert_eq!(g.served_cn().await, "gen-1");

    let second = g.ca.server("gen-2", 2);
    g.replace_pair(&second);
    assert!(
        eventually(Duration::from_secs(10), || async {
            g.served_cn().await == "gen-2"
        })
        .await,
        "the new certificate was not picked up"
    );

    // A broken certificate file is refused; the previous certificate keeps serving.
    replace(
        &g.cert_file,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n",
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(g.served_cn().await, "gen-2");

    // So is a certificate whose key is not the one in key_file.
    let third = g.ca.server("gen-3", 3);
    replace(&g.cert_file, &third.cert);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(g.served_cn().await, "gen-2");

    // Once the matching key arrives, the pair is taken.
    replace(&g.key_file, &third.key);
    assert!(
        eventually(Duration::from_secs(10), || async {
            g.served_cn().await == "gen-3"
        })
        .await,
        "the repaired pair was not picked up"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_when_polling_is_off() {
    let g = start(Setup {
        proxy_tls: "reload_interval = \"0s\"",
        ..Setup::default()
    })
    .await;
    g.replace_pair(&g.ca.server("gen-2", 2));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(g.served_cn().await, "gen-1", "reloaded without being asked");

    let status = Command::new("kill")
        .arg("-HUP")
        .arg(g.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        eventually(Duration::from_secs(10), || async {
            g.served_cn().await == "gen-2"
        })
        .await,
        "SIGHUP did not reload the certificate"
    );
    // SIGHUP reloads; it does not stop the gateway.
    assert!(g.dir.path().exists());
    assert_eq!(g.served_cn().await, "gen-2");
}

// ---------------------------------------------------------------------------------------------
// What handlers see

#[tokio::test(flavor = "multi_thread")]
async fn requests_carry_connection_info() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("in-process CA");
    let pair = ca.server("in-process", 1);
    let (cert_file, key_file, ca_file) = (
        dir.path().join("c.pem"),
        dir.path().join("k.pem"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert_file, &pair.cert).unwrap();
    std::fs::write(&key_file, &pair.key).unwrap();
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let settings = keygate::config::TlsConfig {
        cert_file,
        key_file,
        client_ca_file: Some(ca_file),
        client_auth: keygate::config::ClientAuth::Optional,
        handshake_timeout: Duration::from_secs(5),
        reload_interval: Duration::ZERO,
    };
    let acceptor = TlsAcceptor::new("proxy", &settings).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(keygate::server::serve(
        listener,
        ServeOptions {
            max_connections: 8,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_concurrent_streams: 100,
            header_read_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
            drain_timeout: Duration::from_secs(1),
            open_connections: None,
            shared_slots: None,
        },
        Some(acceptor),
        |_peer| {
            |_req, context: RequestContext| async move {
                let info = &context.connection;
                let text = format!("{info:?} {}", info.scheme());
                Ok(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(text),
                )))
            }
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    let builder = || {
        reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
            .resolve("localhost", addr)
    };
    let url = format!("https://localhost:{}/", addr.port());

    let text = builder()
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("tls: true"), "{text}");
    assert!(text.contains("client_cert_subject: None"), "{text}");
    assert!(text.ends_with(" https"), "{text}");

    let client = ca.client("svc-a");
    let id =
        reqwest::Identity::from_pem(format!("{}{}", client.cert, client.key).as_bytes()).unwrap();
    let text = builder()
        .identity(id)
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("CN=svc-a"), "{text}");

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// check-config

#[test]
fn check_config_names_bad_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("check CA");
    let a = ca.server("a", 1);
    let b = ca.server("b", 2);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let a_cert = write("a.crt", &a.cert);
    let a_key = write("a.key", &a.key);
    let b_key = write("b.key", &b.key);
    let garbage = write("garbage.pem", "this is not PEM\n");
    let missing = dir.path().join("missing.crt").display().to_string();

    let run = |tls: &str| {
        let path = dir.path().join("keygate.toml");
        std::fs::write(
            &path,
            format!(
                "[upstreams.api]\nurl = \"http://127.0.0.1:9000\"\n[[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n{tls}"
            ),
        )
        .unwrap();
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (ok, stdout, stderr) = run(&format!(
        "[proxy.tls]\ncert_file = \"{a_cert}\"\nkey_file = \"{a_key}\"\n"
    ));
    assert!(ok, "{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");

    let cases = [
        (
            format!("[proxy.tls]\ncert_file = \"{missing}\"\nkey_file = \"{a_key}\"\n"),
            "proxy.tls.cert_file",
            "cannot read",
        ),
        (
            format!("[proxy.tls]\ncert_file = \"{garbage}\"\nkey_file = \"{a_key}\"\n"),
            "proxy.tls.cert_file",
            "no certificate",
        ),
        (
            format!("[proxy.tls]\ncert_file = \"{a_cert}\"\nkey_file = \"{garbage}\"\n"),
            "proxy.tls.key_file",
            "no private key",
        ),
        (
            format!("[proxy.tls]\ncert_file = \"{a_cert}\"\nkey_file = \"{b_key}\"\n"),
            "proxy.tls.key_file",
            "does not match",
        ),
        (
            format!(
                "[admin.tls]\ncert_file = \"{a_cert}\"\nkey_file = \"{a_key}\"\nclient_auth = \"required\"\n"
            ),
            "admin.tls.client_ca_file",
            "must be set",
        ),
        (
            format!(
                "[admin.tls]\ncert_file = \"{a_cert}\"\nkey_file = \"{a_key}\"\nclient_auth = \"required\"\nclient_ca_file = \"{garbage}\"\n"
            ),
            "admin.tls.client_ca_file",
            "no certificate",
        ),
        (
            "[proxy.tls]\nkey_file = \"x\"\nclient_auth = \"sometimes\"\nhandshake_timeout = \"0s\"\n"
                .to_string(),
            "proxy.tls.cert_file",
            "must be set",
        ),
    ];
    for (tls, field, words) in cases {
        let (ok, _, stderr) = run(&tls);
        assert!(!ok, "accepted:\n{tls}");
        assert!(
            stderr.contains(&format!("{field}: ")) && stderr.contains(words),
            "expected {field} / {words:?} for\n{tls}\ngot: {stderr}"
        );
    }
    // Every problem of a table at once.
    let (_, _, stderr) = run(
        "[proxy.tls]\nkey_file = \"x\"\nclient_auth = \"sometimes\"\nhandshake_timeout = \"0s\"\n",
    );
    for field in [
        "proxy.tls.cert_file",
        "proxy.tls.client_auth",
        "proxy.tls.handshake_timeout",
    ] {
        assert!(stderr.contains(field), "{field} missing from {stderr}");
    }

    // `serve` refuses the same file before listening.
    let path = dir.path().join("serve.toml");
    std::fs::write(
        &path,
        format!(
            "[upstreams.api]\nurl = \"http://127.0.0.1:9000\"\n[[routes]]\npath_prefix = \"/\"\nupstream = \"api\"\n[proxy.tls]\ncert_file = \"{missing}\"\nkey_file = \"{a_key}\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.tls.cert_file"));
}

// ---------------------------------------------------------------------------------------------
// Upstreams over TLS and HTTP/2

/// The echo upstream behind TLS with `pair`, offering h2 and http/1.1 by ALPN.
async fn tls_echo(pair: &Pair) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pair.cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(
                    hyper_util::rt::TokioIo::new(tls),
                    hyper::service::service_fn(keygate::dev::echo),
                )
                .await;
            });
        }
    });
    addr
}

/// An https upstream that accepts the TCP connection and never answers the TLS handshake (a
/// process that stopped calling accept(): its backlog still takes connects) is an unreachable
/// upstream within `connect_timeout`, for a request with a body too, over HTTP/1.1 and HTTP/2.
/// Before, such a POST waited for ever: `response_timeout` starts once the body is sent.
#[tokio::test(flavor = "multi_thread")]
async fn an_https_upstream_that_never_finishes_the_handshake_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let silent = crate::support::upstream::silent().await;
    let db = dir.path().join("keys.db");
    let config = format!(
        r#"
        [store]
        kind = "embedded"
        path = "{db}"
        [upstreams.mute]
        url = "https://localhost:{port}"
        connect_timeout = "300ms"
        response_timeout = "60s"
        body_idle_timeout = "60s"
        [upstreams.mute_h2]
        url = "https://localhost:{port}"
        connect_timeout = "300ms"
        response_timeout = "60s"
        body_idle_timeout = "60s"
        http2 = true
        [[routes]]
        path_prefix = "/mute"
        upstream = "mute"
        public = true
        [[routes]]
        path_prefix = "/h2mute"
        upstream = "mute_h2"
        public = true
        "#,
        db = db.display(),
        port = silent.port(),
    );
    let gw = crate::support::gateway::Gateway::start(&config);
    for path in ["/mute/x", "/h2mute/x"] {
        let started = std::time::Instant::now();
        let r = crate::support::client()
            .post(gw.url(path))
            .body("a body")
            .timeout(std::time::Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "UPSTREAM_UNAVAILABLE", "{path}: {v}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{path}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn https_and_http2_upstreams_are_verified_and_spoken_to() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("upstream CA");
    let other_ca = Ca::new("someone else");
    let ca_file = dir.path().join("ca.pem");
    let other_ca_file = dir.path().join("other.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    std::fs::write(&other_ca_file, &other_ca.pem).unwrap();
    let secure = tls_echo(&ca.server("localhost", 1)).await;
    let h2c = upstream::echo().await;
    let db = dir.path().join("keys.db");
    let config = format!(
        r#"
        [store]
        kind = "embedded"
        path = "{db}"
        [upstreams.secure]
        url = "https://localhost:{port}"
        ca_file = "{ca}"
        [upstreams.secure_h2]
        url = "https://localhost:{port}"
        ca_file = "{ca}"
        http2 = true
        [upstreams.untrusted]
        url = "https://localhost:{port}"
        ca_file = "{other}"
        [upstreams.h2c]
        url = "http://{h2c}"
        http2 = true
        [[routes]]
        path_prefix = "/secure"
        upstream = "secure"
        [[routes]]
        path_prefix = "/h2tls"
        upstream = "secure_h2"
        [[routes]]
        path_prefix = "/untrusted"
        upstream = "untrusted"
        [[routes]]
        path_prefix = "/h2c"
        upstream = "h2c"
        "#,
        db = db.display(),
        port = secure.port(),
        ca = ca_file.display(),
        other = other_ca_file.display(),
    );
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&db).unwrap());
    let gw = crate::support::gateway::Gateway::start(&config);
    let (key, _) = create_key(&store, |_| {}).await;
    let seen = |path: &'static str| {
        let url = gw.url(path);
        let key = key.clone();
        async move {
            let r = crate::support::client()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) = seen("/secure/x").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], "HTTP/1.1");
    assert_eq!(
        body["headers"]["host"][0],
        format!("localhost:{}", secure.port())
    );
    let (status, body) = seen("/h2tls/x").await;
    assert_eq!(
        (status, body["version"].as_str()),
        (200, Some("HTTP/2.0")),
        "{body}"
    );
    let (status, body) = seen("/h2c/x").await;
    assert_eq!(
        (status, body["version"].as_str()),
        (200, Some("HTTP/2.0")),
        "{body}"
    );
    // A certificate from a CA we were not told to trust is a failed upstream, never a pass.
    let (status, body) = seen("/untrusted/x").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "UPSTREAM_UNAVAILABLE");
}

#[test]
fn check_config_names_a_bad_upstream_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(
        &path,
        "[upstreams.a]\nurl = \"https://localhost:1\"\nca_file = \"/nonexistent/ca.pem\"\n\
         [upstreams.b]\nurl = \"http://localhost:1\"\nca_file = \"/x.pem\"\n\
         [[routes]]\npath_prefix = \"/\"\nupstream = \"a\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstreams.a.ca_file"), "{err}");
    assert!(err.contains("upstreams.b.ca_file"), "{err}");
}
