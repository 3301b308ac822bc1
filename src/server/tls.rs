//! TLS termination for the listeners (rustls, ring provider, TLS 1.2 and 1.3 only).
//!
//! The certificate lives behind a [`ResolvesServerCert`] holding an `ArcSwap<CertifiedKey>`, so
//! a reload swaps one pointer and the next handshake picks it up without touching the listener
//! or the connections already open. The client CA bundle (mTLS) is part of the `ServerConfig`
//! itself, which is therefore also behind an `ArcSwap` and rebuilt only when that bundle
//! changes. Reloads happen when the files' metadata change (polled every `reload_interval`) or
//! on SIGHUP; anything that does not load is refused with a warning and the previous material
//! keeps serving, so a half-written or mismatched file never takes the listener down.

use crate::config::{ClientAuth, TlsConfig};
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConnection, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, RootCertStore, ServerConfig};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};

/// What the serve loop knows about a connection, in every request's context
/// ([`crate::server::RequestContext`]) so handlers can tell how the request arrived (the gateway's `X-Forwarded-Proto`, for one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The connection is TLS (terminated here).
    pub tls: bool,
    /// The verified client certificate's subject (RFC 4514-like, e.g. `CN=svc-a, O=acme`),
    /// when the client presented one (mTLS).
    pub client_cert_subject: Option<Arc<str>>,
}

impl ConnectionInfo {
    /// `https` over TLS, `http` otherwise.
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    fn from_tls(conn: &ServerConnection) -> Self {
        let client_cert_subject = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| CertSummary::parse(leaf).ok())
            .map(|s| Arc::from(s.subject));
        Self {
            tls: true,
            client_cert_subject,
        }
    }
}

/// Which setting a [`TlsError`] is about, so configuration checks can name the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsField {
    CertFile,
    KeyFile,
    ClientCaFile,
    /// Not tied to one field: the table as a whole.
    Table,
}

impl TlsField {
    /// The field's name in the table; empty for [`TlsField::Table`].
    pub fn as_str(self) -> &'static str {
        match self {
            TlsField::CertFile => "cert_file",
            TlsField::KeyFile => "key_file",
            TlsField::ClientCaFile => "client_ca_file",
            TlsField::Table => "",
        }
    }

    /// The configuration path of the field in `table` (`proxy.tls` → `proxy.tls.key_file`).
    pub fn path_in(self, table: &str) -> String {
        match self {
            TlsField::Table => table.to_owned(),
            other => format!("{table}.{}", other.as_str()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        field: TlsField,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not valid PEM: {reason}", path.display())]
    Pem {
        field: TlsField,
        path: PathBuf,
        reason: String,
    },
    #[error("{}: no certificate in it (expected a PEM \"BEGIN CERTIFICATE\" block)", path.display())]
    NoCertificate { field: TlsField, path: PathBuf },
    #[error("{}: not a usable X.509 certificate: {reason}", path.display())]
    BadCertificate {
        field: TlsField,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{}: no private key in it (expected a PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" or \"BEGIN EC PRIVATE KEY\" block)",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error("{}: unusable private key: {source}", path.display())]
    BadKey {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: the private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("client_ca_file must be set when client_auth is optional or required")]
    NoClientCa,
    #[error("{}: cannot verify client certificates with it: {reason}", path.display())]
    BadClientCa { path: PathBuf, reason: String },
    #[error("cannot build the TLS configuration: {0}")]
    Settings(rustls::Error),
    #[error("the certificate reloader must be started inside the Tokio runtime")]
    NoRuntime,
}

impl TlsError {
    /// The setting to fix.
    pub fn field(&self) -> TlsField {
        match self {
            TlsError::Read { field, .. }
            | TlsError::Pem { field, .. }
            | TlsError::NoCertificate { field, .. }
            | TlsError::BadCertificate { field, .. } => *field,
            TlsError::NoKey { .. } | TlsError::BadKey { .. } | TlsError::KeyMismatch { .. } => {
                TlsField::KeyFile
            }
            TlsError::NoClientCa | TlsError::BadClientCa { .. } => TlsField::ClientCaFile,
            TlsError::Settings(_) | TlsError::NoRuntime => TlsField::Table,
        }
    }
}

/// Loads everything `settings` names, exactly as serving would, and returns every problem
/// (certificate/key and client CA bundle separately), for the configuration check.
pub fn check(settings: &TlsConfig) -> Vec<TlsError> {
    let provider = provider();
    let mut problems = Vec::new();
    if let Err(e) = load_certified_key(&provider, &settings.cert_file, &settings.key_file) {
        problems.push(e);
    }
    // A missing client_ca_file is the configuration check's to report.
    if settings.client_auth != ClientAuth::None
        && settings.client_ca_file.is_some()
        && let Err(e) = client_verifier(&provider, settings)
    {
        problems.push(e);
    }
    problems
}

/// Accepts TLS connections for one listener and keeps its certificate current.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: Arc<Shared>,
}

struct Shared {
    /// `proxy` or `admin`, for log lines.
    listener: &'static str,
    settings: TlsConfig,
    provider: Arc<CryptoProvider>,
    resolver: Arc<CertResolver>,
    config: ArcSwap<ServerConfig>,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("listener", &self.inner.listener)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Loads the certificate, key and client CA bundle; fails on the first problem.
    pub fn new(listener: &'static str, settings: &TlsConfig) -> Result<Self, TlsError> {
        let provider = provider();
        let (key, summary) =
            load_certified_key(&provider, &settings.cert_file, &settings.key_file)?;
        summary.log_loaded(listener, "TLS certificate loaded");
        let resolver = Arc::new(CertResolver {
            current: ArcSwap::from_pointee(key),
        });
        let config = server_config(&provider, settings, resolver.clone())?;
        Ok(Self {
            inner: Arc::new(Shared {
                listener,
                settings: settings.clone(),
                provider,
                resolver,
                config: ArcSwap::new(config),
            }),
        })
    }

    /// [`TlsAcceptor::new`], plus the background reloader (file polling and SIGHUP). The
    /// reloader ends by itself once every clone of the acceptor is gone. Must be called inside
    /// a Tokio runtime; SIGHUP is caught from this call on, so call it before announcing the
    /// listener.
    pub fn start(listener: &'static str, settings: &TlsConfig) -> Result<Self, TlsError> {
        // Before reading: a file replaced while this loads is then seen as changed.
        let seen = Fingerprint::of(settings);
        let acceptor = Self::new(listener, settings)?;
        acceptor.spawn_reloader(seen)?;
        Ok(acceptor)
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.inner.settings.handshake_timeout
    }

    /// Runs the server side of the handshake (no timeout here: the caller owns it).
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> std::io::Result<(tokio_rustls::server::TlsStream<IO>, ConnectionInfo)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.inner.config.load_full());
        let stream = acceptor.accept(io).await?;
        let info = ConnectionInfo::from_tls(stream.get_ref().1);
        Ok((stream, info))
    }

    /// The end-entity certificate new handshakes get.
    pub fn current_certificate(&self) -> Option<CertificateDer<'static>> {
        self.inner.resolver.current.load().cert.first().cloned()
    }

    /// Reads the files again: the certificate and key when `cert` is set, the client CA
    /// bundle when `ca` is set (and client certificates are checked at all). What loads is
    /// used by the next handshake; what does not changes nothing and is returned.
    pub fn reload(&self, cert: bool, ca: bool) -> Vec<TlsError> {
        let s = &self.inner;
        let mut problems = Vec::new();
        if cert {
            match load_certified_key(&s.provider, &s.settings.cert_file, &s.settings.key_file) {
                Ok((key, summary)) => {
                    s.resolver.current.store(Arc::new(key));
                    summary.log_loaded(s.listener, "TLS certificate reloaded");
                }
                Err(e) => problems.push(e),
            }
        }
        if ca && s.settings.client_auth != ClientAuth::None {
            match server_config(&s.provider, &s.settings, s.resolver.clone()) {
                Ok(config) => {
                    s.config.store(config);
                    tracing::info!(listener = s.listener, "TLS client CA bundle reloaded");
                }
                Err(e) => problems.push(e),
            }
        }
        problems
    }

    fn spawn_reloader(&self, seen: Fingerprint) -> Result<(), TlsError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| TlsError::NoRuntime)?;
        #[cfg(unix)]
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot catch SIGHUP; certificates reload on file changes only");
                None
            }
        };
        #[cfg(not(unix))]
        let hangup: Option<()> = None;
        let weak = Arc::downgrade(&self.inner);
        handle.spawn(reload_loop(weak, seen, hangup));
        Ok(())
    }
}

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

/// Why the reloader woke up.
enum Wake {
    Tick,
    Hangup,
}

async fn reload_loop(weak: Weak<Shared>, mut seen: Fingerprint, mut hangup: Option<Hangup>) {
    let interval = weak
        .upgrade()
        .map_or(Duration::ZERO, |s| s.settings.reload_interval);
    // The weak reference is checked at least this often, so a dropped acceptor's reloader
    // does not linger when polling is off.
    let tick = if interval.is_zero() {
        Duration::from_secs(5)
    } else {
        interval
    };
    loop {
        let wake = tokio::select! {
            () = tokio::time::sleep(tick) => Wake::Tick,
            true = next_hangup(&mut hangup) => Wake::Hangup,
        };
        let Some(shared) = weak.upgrade() else { return };
        let acceptor = TlsAcceptor { inner: shared };
        let polling = !interval.is_zero();
        let prev = seen.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            // Fingerprint first, then read: a write landing in between shows up as a change
            // on the next tick instead of being missed.
            let now = Fingerprint::of(&acceptor.inner.settings);
            let (cert, ca) = match wake {
                Wake::Hangup => (true, true),
                Wake::Tick if polling => (
                    now.cert != prev.cert || now.key != prev.key,
                    now.ca != prev.ca,
                ),
                Wake::Tick => (false, false),
            };
            let problems = acceptor.reload(cert, ca);
            (now, acceptor.inner.listener, problems)
        })
        .await;
        match outcome {
            Ok((now, listener, problems)) => {
                // Remember what was tried even when it failed: a broken file is reported
                // once, and any later change to it is tried again.
                seen = now;
                for e in problems {
                    tracing::warn!(
                        listener,
                        error = %e,
                        field = e.field().as_str(),
                        "TLS reload refused; the previous certificate and CA bundle stay in use"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "TLS reload task failed"),
        }
    }
}

/// Resolves to `true` on SIGHUP; never resolves when SIGHUP is not caught.
async fn next_hangup(hangup: &mut Option<Hangup>) -> bool {
    #[cfg(unix)]
    if let Some(s) = hangup {
        return s.recv().await.is_some();
    }
    let _ = hangup;
    std::future::pending::<bool>().await
}

/// What decides "the file changed": modification time and length everywhere, plus inode and
/// change time on Unix so a rename over the file (the atomic way to replace it, and what
/// Kubernetes secret volumes do) counts even when it keeps the old mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    cert: Option<FileStamp>,
    key: Option<FileStamp>,
    ca: Option<FileStamp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    ino: u64,
    #[cfg(unix)]
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(settings: &TlsConfig) -> Self {
        Self {
            cert: FileStamp::of(&settings.cert_file),
            key: FileStamp::of(&settings.key_file),
            ca: settings.client_ca_file.as_deref().and_then(FileStamp::of),
        }
    }
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Some(Self {
            modified: m.modified().ok(),
            len: m.len(),
            #[cfg(unix)]
            ino: m.ino(),
            #[cfg(unix)]
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Hands every handshake the current certificate, whatever the client asked for: one
/// listener serves one certificate (its SANs cover the names it answers to).
#[derive(Debug)]
struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// ring is the one provider compiled in; naming it explicitly keeps start-up independent of
/// which provider features other crates in the build happen to enable.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    settings: &TlsConfig,
    resolver: Arc<CertResolver>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = client_verifier(provider, settings)?;
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        // TLS 1.2 and 1.3 only: rustls has nothing older, and saying so keeps it that way.
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Settings)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    // h2 first: clients that can do both get HTTP/2; `server::connection` then sees the
    // preface the negotiated protocol implies.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn client_verifier(
    provider: &Arc<CryptoProvider>,
    settings: &TlsConfig,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    if settings.client_auth == ClientAuth::None {
        return Ok(WebPkiClientVerifier::no_client_auth());
    }
    let path = settings
        .client_ca_file
        .as_deref()
        .ok_or(TlsError::NoClientCa)?;
    let certs = read_certificates(TlsField::ClientCaFile, path)?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::BadClientCa {
            path: path.to_owned(),
            reason: format!("certificate #{}: {e}", i + 1),
        })?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = match settings.client_auth {
        ClientAuth::Optional => builder.allow_unauthenticated(),
        ClientAuth::Required | ClientAuth::None => builder,
    };
    builder.build().map_err(|e| TlsError::BadClientCa {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn read_file(field: TlsField, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_owned(),
        source,
    })
}

fn read_certificates(
    field: TlsField,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            field,
            path: path.to_owned(),
            reason: pem_reason(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            field,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// `pem::Error`'s own text prints marker lines as byte arrays; operators read text.
fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "a section has no \"-----END {}-----\" line",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => {
            format!("malformed line {:?}", String::from_utf8_lossy(line))
        }
        pem::Error::Base64Decode(detail) => format!("bad base64 inside a section ({detail})"),
        other => other.to_string(),
    }
}

fn load_certified_key(
    provider: &CryptoProvider,
    cert_file: &Path,
    key_file: &Path,
) -> Result<(CertifiedKey, CertSummary), TlsError> {
    let chain = read_certificates(TlsField::CertFile, cert_file)?;
    let summary = chain
        .first()
        .map(CertSummary::parse)
        .transpose()
        .map_err(|reason| TlsError::BadCertificate {
            field: TlsField::CertFile,
            path: cert_file.to_owned(),
            reason,
        })?
        .ok_or_else(|| TlsError::NoCertificate {
            field: TlsField::CertFile,
            path: cert_file.to_owned(),
        })?;
    let key_bytes = read_file(TlsField::KeyFile, key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: key_file.to_owned(),
        },
        other => TlsError::Pem {
            field: TlsField::KeyFile,
            path: key_file.to_owned(),
            reason: pem_reason(&other),
        },
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            path: key_file.to_owned(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Unknown: the key type cannot export its public half; the handshake would still
        // fail loudly on a real mismatch.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch {
                key: key_file.to_owned(),
                cert: cert_file.to_owned(),
            });
        }
        Err(e) => {
            return Err(TlsError::BadCertificate {
                field: TlsField::CertFile,
                path: cert_file.to_owned(),
                reason: e.to_string(),
            });
        }
    }
    Ok((certified, summary))
}

/// The parts of a certificate worth a log line.
struct CertSummary {
    subject: String,
    serial: String,
    not_after: String,
    valid_now: bool,
}

impl CertSummary {
    fn parse(der: &CertificateDer<'_>) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let validity = cert.validity();
        Ok(Self {
            subject: cert.subject().to_string(),
            serial: cert.tbs_certificate.raw_serial_as_string(),
            not_after: validity.not_after.to_string(),
            valid_now: validity.is_valid(),
        })
    }

    fn log_loaded(&self, listener: &'static str, message: &'static str) {
        tracing::info!(
            listener,
            subject = %self.subject,
            serial = %self.serial,
            not_after = %self.not_after,
            "{message}"
        );
        if !self.valid_now {
            // Served anyway: refusing would turn an operator's clock or renewal problem into
            // an outage for clients that do not check dates.
            tracing::warn!(
                listener,
                subject = %self.subject,
                not_after = %self.not_after,
                "the TLS certificate is expired or not yet valid"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigError, from_toml};

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// Writes a fresh self-signed pair as `<name>.crt` / `<name>.key`.
        fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
            let (c, k) = (
                self.path(&format!("{name}.crt")),
                self.path(&format!("{name}.key")),
            );
            std::fs::write(&c, ck.cert.pem()).unwrap();
            std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
            (c, k)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.path(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    fn settings(cert: &Path, key: &Path) -> TlsConfig {
        TlsConfig {
            cert_file: cert.to_owned(),
            key_file: key.to_owned(),
            client_ca_file: None,
            client_auth: ClientAuth::None,
            handshake_timeout: Duration::from_secs(10),
            reload_interval: Duration::ZERO,
        }
    }

    fn problem_fields(text: &str) -> Vec<String> {
        match from_toml(text) {
            Err(ConfigError::Invalid(problems)) => problems.into_iter().map(|p| p.field).collect(),
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn a_good_table_gets_its_defaults() {
        let f = Files::new();
        let (c, k) = f.pair("a");
        let cfg = from_toml(&format!(
            "[proxy.tls]\ncert_file = {c:?}\nkey_file = {k:?}\n[admin.tls]\ncert_file = {c:?}\n\
             key_file = {k:?}\nclient_auth = \"required\"\nclient_ca_file = {c:?}\n\
             handshake_timeout = \"3s\"\nreload_interval = \"0s\"\n"
        ))
        .unwrap();
        assert_eq!(
            cfg.proxy.tls,
            Some(settings(&c, &k)).map(|s| TlsConfig {
                reload_interval: Duration::from_secs(5),
                ..s
            })
        );
        let admin = cfg.admin.tls.unwrap();
        assert_eq!(admin.client_auth, ClientAuth::Required);
        assert_eq!(admin.handshake_timeout, Duration::from_secs(3));
        assert_eq!(admin.reload_interval, Duration::ZERO);
        assert!(from_toml("").unwrap().proxy.tls.is_none());
    }

    #[test]
    fn every_tls_problem_is_named_by_its_field() {
        let f = Files::new();
        let (c, k) = f.pair("a");
        let (_, other_key) = f.pair("b");
        let garbage = f.write("garbage.pem", "not pem\n");
        let fields = problem_fields(&format!(
            "[proxy.tls]\nclient_auth = \"sometimes\"\nhandshake_timeout = \"0s\"\n\
             reload_interval = \"10ms\"\n[admin.tls]\ncert_file = {c:?}\nkey_file = {other_key:?}\n\
             client_ca_file = {garbage:?}\n"
        ));
        for want in [
            "proxy.tls.cert_file",
            "proxy.tls.key_file",
            "proxy.tls.client_auth",
            "proxy.tls.handshake_timeout",
            "proxy.tls.reload_interval",
            "admin.tls.key_file",
            "admin.tls.client_ca_file",
        ] {
            assert!(
                fields.iter().any(|f| f == want),
                "{want} missing from {fields:?}"
            );
        }
        let fields = problem_fields(&format!(
            "[proxy.tls]\ncert_file = {c:?}\nkey_file = {k:?}\nclient_auth = \"optional\"\n\
             client_ca_file = {garbage:?}\n"
        ));
        assert_eq!(fields, vec!["proxy.tls.client_ca_file".to_string()]);
    }

    #[test]
    fn file_problems_say_what_is_wrong() {
        let f = Files::new();
        let (c, k) = f.pair("a");
        let (_, other_key) = f.pair("b");
        let broken = f.write("broken.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
        let reasons = |cert: &Path, key: &Path| -> Vec<(TlsField, String)> {
            check(&settings(cert, key))
                .into_iter()
                .map(|e| (e.field(), e.to_string()))
                .collect()
        };
        assert!(reasons(&c, &k).is_empty());
        let r = reasons(&f.path("missing.crt"), &k);
        assert_eq!(r[0].0, TlsField::CertFile);
        assert!(r[0].1.contains("cannot read"), "{r:?}");
        let r = reasons(&broken, &k);
        assert_eq!(r[0].0, TlsField::CertFile);
        assert!(r[0].1.contains("-----END CERTIFICATE-----"), "{r:?}");
        let r = reasons(&c, &c);
        assert_eq!(r[0].0, TlsField::KeyFile);
        assert!(r[0].1.contains("no private key"), "{r:?}");
        let r = reasons(&c, &other_key);
        assert_eq!(r[0].0, TlsField::KeyFile);
        assert!(r[0].1.contains("does not match"), "{r:?}");
    }

    #[test]
    fn a_failed_reload_keeps_the_previous_certificate() {
        let f = Files::new();
        let (c, k) = f.pair("live");
        let acceptor = TlsAcceptor::new("proxy", &settings(&c, &k)).unwrap();
        let first = acceptor.current_certificate().unwrap();

        std::fs::write(&c, "garbage").unwrap();
        let problems = acceptor.reload(true, true);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field(), TlsField::CertFile);
        assert_eq!(acceptor.current_certificate().unwrap(), first);

        let (c2, k2) = f.pair("next");
        std::fs::copy(&c2, &c).unwrap();
        assert_eq!(acceptor.reload(true, false)[0].field(), TlsField::KeyFile);
        assert_eq!(acceptor.current_certificate().unwrap(), first);

        std::fs::copy(&k2, &k).unwrap();
        assert!(acceptor.reload(true, false).is_empty());
        let now = acceptor.current_certificate().unwrap();
        assert_ne!(now, first);
        assert_eq!(
            now.as_ref(),
            std::fs::read(&c2)
                .map(|pem| {
                    CertificateDer::from_pem_slice(&pem)
                        .unwrap()
                        .as_ref()
                        .to_vec()
                })
                .unwrap()
        );
    }

    #[test]
    fn fingerprints_see_a_rename_over_the_file() {
        let f = Files::new();
        let (c, k) = f.pair("a");
        let s = settings(&c, &k);
        let before = Fingerprint::of(&s);
        assert_eq!(before, Fingerprint::of(&s));
        let (c2, _) = f.pair("b");
        std::fs::rename(&c2, &c).unwrap();
        assert_ne!(before, Fingerprint::of(&s));
    }

    #[test]
    fn connection_info_scheme() {
        assert_eq!(ConnectionInfo::default().scheme(), "http");
        let tls = ConnectionInfo {
            tls: true,
            client_cert_subject: None,
        };
        assert_eq!(tls.scheme(), "https");
    }
}
