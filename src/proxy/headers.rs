//! Header rules for forwarding: hop-by-hop removal (RFC 9110 §7.6.1), `X-Forwarded-*`, and the
//! verified identity. A client can never smuggle an identity header: every `x-keygate-*`
//! header it sends is dropped before ours are added.

use crate::auth::record::{KeyRecord, KeyType};
use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue, header};

pub const IDENTITY_PREFIX: &str = "x-keygate-";
pub static KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub static TEAM_ID: HeaderName = HeaderName::from_static("x-keygate-team-id");
pub static USER_ID: HeaderName = HeaderName::from_static("x-keygate-user-id");
pub static KEY_TYPE: HeaderName = HeaderName::from_static("x-keygate-key-type");
pub static SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Other claims of where a request came from, believed from trusted proxies only.
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The hop-by-hop fields (RFC 9110 §7.6.1, and the older `Keep-Alive`/`Proxy-Connection`),
/// the proxy-authentication ones, `Upgrade`, and `HTTP2-Settings` (only ever meant for the
/// next hop: RFC 9113 §3.2.1 of old). Not `Trailer`: it is end-to-end (RFC 9110 §6.6.2), and
/// hyper's HTTP/1.1 encoder sends only the trailer fields it declares, so without it every
/// trailer was dropped.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Whether a request's `TE` accepts trailers (`te: trailers`): the one `TE` an HTTP/2 hop may
/// carry (RFC 9113 §8.2.2), and what gRPC servers ask of their clients.
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(header::TE).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|t| {
            t.split(|&b| b == b';')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
        })
    })
}

/// What a message's `Transfer-Encoding`, removed with the hop-by-hop headers, said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferCoding {
    None,
    Chunked,
    /// A coding other than `chunked` (`gzip, chunked`). hyper undoes only chunked: the body
    /// would go on still coded (gzip bytes as if plain), its coding gone with the header.
    Other,
}

/// Whether a message's `Transfer-Encoding` names a coding other than `chunked`.
pub fn has_unsupported_transfer_coding(headers: &HeaderMap) -> bool {
    headers.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|coding| {
            let coding = coding.trim_ascii();
            !coding.is_empty() && !coding.eq_ignore_ascii_case(b"chunked")
        })
    })
}

/// Removes an upstream response's hop-by-hop headers and, when it came with a
/// `Transfer-Encoding`, its `Content-Length` too (RFC 9112 §6.3: such a length is not the
/// body's and must not be forwarded). hyper's client keeps that header while it decodes the
/// body by its transfer coding; left in, it would contradict the length hyper's server frames
/// the body with once the body is read ahead whole.
/// Returns what its `Transfer-Encoding` said (a response with another coding than chunked is
/// the caller's to refuse).
pub fn remove_upstream_framing(headers: &mut HeaderMap) -> TransferCoding {
    let coding = remove_hop_by_hop_and_claims(headers, false);
    if coding != TransferCoding::None {
        headers.remove(http::header::CONTENT_LENGTH);
    }
    coding
}

/// Removes hop-by-hop headers, including those the `Connection` header names. `Upgrade` goes
/// too (the gateway puts it back on an upgrade request).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let _ = remove_hop_by_hop_and_claims(headers, false);
}

/// RFC 9113 §8.2.3: an HTTP/2 client may send each cookie as a field of its own, and those
/// must be one `Cookie` (joined with `; `) before an HTTP/1.1 upstream, where many servers
/// read only the first line. One field is also what an HTTP/2 upstream accepts.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = BytesMut::from(first.as_bytes());
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    // Header value bytes joined by `; ` are a header value.
    if let Ok(value) = HeaderValue::from_maybe_shared(joined.freeze()) {
        headers.insert(header::COOKIE, value);
    }
}

/// [`remove_hop_by_hop`], and with `untrusted_peer` the client's own `Forwarded`, `X-Real-IP`,
/// `X-Forwarded-*` other than the three [`set_forwarded`] writes (`-Port`, `-Prefix`, `-Ssl`…)
/// and the other address claims (`True-Client-IP`, `Client-IP`…): keygate does not write them,
/// so from anyone but a trusted proxy they are claims an upstream could believe. In the same
/// pass over the names.
/// Returns what the message's `Transfer-Encoding` said, read in the same pass.
pub fn remove_hop_by_hop_and_claims(
    headers: &mut HeaderMap,
    untrusted_peer: bool,
) -> TransferCoding {
    const FORWARDED_BIT: u16 = 1 << 14;
    const X_REAL_IP_BIT: u16 = 1 << 15;
    // One pass over the names, each matched once as a string, notes which of the names are
    // present: most messages carry none, a typical upstream answer only `Connection:
    // keep-alive`, and each removal or lookup costs more than the match.
    let mut present = 0u16;
    // The rarer claims of an untrusted peer, collected by name (nothing allocated without).
    let mut claims: Vec<HeaderName> = Vec::new();
    for header in headers.keys() {
        let name = header.as_str();
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        } else if untrusted_peer {
            match name {
                "forwarded" => present |= FORWARDED_BIT,
                "x-real-ip" => present |= X_REAL_IP_BIT,
                // `set_forwarded` replaces these three.
                "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" => {}
                _ if name.starts_with("x-forwarded-") || is_address_claim(name) => {
                    claims.push(header.clone());
                }
                _ => {}
            }
        }
    }
    for name in claims {
        headers.remove(name);
    }
    if present == 0 {
        return TransferCoding::None;
    }
    let coding = if present & (1 << TRANSFER_ENCODING_INDEX) == 0 {
        TransferCoding::None
    } else if has_unsupported_transfer_coding(headers) {
        TransferCoding::Other
    } else {
        TransferCoding::Chunked
    };
    if present & FORWARDED_BIT != 0 {
        headers.remove(header::FORWARDED);
    }
    if present & X_REAL_IP_BIT != 0 {
        headers.remove(&X_REAL_IP);
    }
    if present & 1 != 0 && !names_only_itself(headers) {
        // Names the `Connection` header lists beyond these (and `close`) are rare: only
        // they are parsed. Bytes, not text: a value with a non-ASCII byte in one token still
        // has its other tokens honoured.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| {
                !t.eq_ignore_ascii_case(b"close")
                    && HOP_BY_HOP
                        .iter()
                        .all(|h| !t.eq_ignore_ascii_case(h.as_str().as_bytes()))
            })
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    coding
}

/// Whether the `Connection` header is the one value nearly every message sends,
/// `keep-alive` or `close`, which names no other header: ~400 instructions less than parsing
/// its list (callgrind), on every upstream answer.
fn names_only_itself(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONNECTION).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => {
            let value = value.as_bytes();
            value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
        }
        _ => false,
    }
}

/// `transfer-encoding`'s place in `HOP_BY_HOP`.
const TRANSFER_ENCODING_INDEX: usize = 6;

/// Where `name` (lowercase, as `HeaderName::as_str` gives it) is in `HOP_BY_HOP`.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "transfer-encoding" => 6,
        "upgrade" => 7,
        "http2-settings" => 8,
        _ => return None,
    })
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` plus `Upgrade`),
/// e.g. `websocket`. HTTP/2 requests never upgrade. Nor does a request that names `h2c`: an
/// upstream that took it would speak HTTP/2 on the spliced connection, and every request
/// after the first would reach it unseen by keygate (h2c smuggling). Such a request goes on
/// as a plain one, its `Upgrade` removed with the other hop-by-hop headers.
pub fn upgrade_protocol<B>(req: &http::Request<B>) -> Option<HeaderValue> {
    // Most requests have no `Upgrade`: looked for first, before `Connection` is parsed.
    if req.version() != http::Version::HTTP_11 || !req.headers().contains_key(header::UPGRADE) {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = req.headers().get(header::UPGRADE).filter(|_| asks)?;
    let h2c = protocol
        .as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"));
    (!h2c).then(|| protocol.clone())
}

/// Whether a 101's `Upgrade` (`switched`) names protocols, each one the request's `Upgrade`
/// (`asked`) named: the names compared without case, a version (`/13`) part of the name.
pub fn switches_to_asked(asked: Option<&HeaderValue>, switched: Option<&HeaderValue>) -> bool {
    let tokens = |v: &HeaderValue| -> Vec<Vec<u8>> {
        v.as_bytes()
            .split(|&b| b == b',')
            .map(|t| t.trim_ascii().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let (Some(asked), Some(switched)) = (asked, switched) else {
        return false;
    };
    let (asked, switched) = (tokens(asked), tokens(switched));
    !switched.is_empty() && switched.iter().all(|t| asked.contains(t))
}

/// Puts back the two headers an upgrade needs after the hop-by-hop removal.
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// The names a request asks for another method with. Rails, Laravel, Express and others run
/// the request as that method; keygate routes it by its own (see [`remove_client_claims`]).
pub const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Removes, on every route, what a client may never claim, and says whether the request asks
/// for another method (one of [`METHOD_OVERRIDES`], for the gateway to check against the
/// routes). Removed:
/// - every `x-keygate-*` header (the identity is keygate's alone);
/// - `X-Original-URL` and `X-Rewrite-URL`: IIS, Laminas and older Symfony serve the path they
///   name instead of the request's, which is the one keygate routed;
/// - a name written with `_` where keygate's own or a forwarding header has `-`
///   (`X_Keygate_Team_Id`, `X_Forwarded_For`, `X_API_Key`…): CGI, WSGI, Rack and PHP read both
///   as the same `HTTP_X_KEYGATE_TEAM_ID`, so the client's value would stand beside or before
///   keygate's. `key_header` is the configured key header, whose `_` twin goes too.
pub fn remove_client_claims(headers: &mut HeaderMap, key_header: &HeaderName) -> bool {
    let mut method_override = false;
    // A key header configured with `_` (`api_key`) has a `-` twin (`api-key`) too.
    let key_twin = key_header
        .as_str()
        .contains('_')
        .then(|| key_header.as_str().replace('_', "-"));
    // Collecting nothing allocates nothing: the common request pays the pass over its names.
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            if name.starts_with(IDENTITY_PREFIX)
                || matches!(name, "x-original-url" | "x-rewrite-url")
                || key_twin.as_deref() == Some(name)
            {
                return true;
            }
            if name.as_bytes().contains(&b'_') {
                return name != key_header.as_str() && is_claim_when_dashed(name, key_header);
            }
            if METHOD_OVERRIDES.contains(&name) {
                method_override = true;
            }
            false
        })
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
    method_override
}

/// Whether `name`, its `_` read as `-`, is a header keygate sets, removes or reads.
fn is_claim_when_dashed(name: &str, key_header: &HeaderName) -> bool {
    let dashed = name.replace('_', "-");
    is_claim(&dashed) || dashed == key_header.as_str().replace('_', "-")
}

/// Why `name` (a header name, lowercase) cannot be the header keys are read from
/// (`auth.header_name`): keygate removes, sets or reads it for something else, so no key would
/// be found in it, or one would be taken from a header the client does not mean as a key.
/// `None` when it can. A name with `_` is judged as the `-` name CGI, WSGI, Rack and PHP read
/// it as. `Authorization` is refused by the configuration on its own (the `bearer` source).
pub fn not_a_key_header(name: &str) -> Option<&'static str> {
    let dashed = name.replace('_', "-");
    let name = dashed.as_str();
    if name.starts_with(IDENTITY_PREFIX) {
        Some("x-keygate-* headers are keygate's: it removes the client's from every request")
    } else if hop_by_hop_index(name).is_some() {
        Some(
            "is a hop-by-hop header: it is for one connection only, and proxies on the way \
             remove or rewrite it",
        )
    } else if name.starts_with("x-forwarded-")
        || matches!(name, "forwarded" | "x-real-ip")
        || is_address_claim(name)
    {
        Some("is a forwarding header, which keygate sets or removes")
    } else if METHOD_OVERRIDES.contains(&name) || matches!(name, "x-original-url" | "x-rewrite-url")
    {
        Some("keygate removes or checks it: it changes the method or path upstreams serve")
    } else if name == request_id_name() {
        Some("keygate sets it on every request it forwards, and logs it")
    } else if matches!(
        name,
        "host" | "cookie" | "content-type" | "content-length" | "expect"
    ) {
        Some("HTTP itself uses it (routing, cookies, the body): it cannot carry a key")
    } else {
        None
    }
}

fn request_id_name() -> &'static str {
    crate::request_id::HEADER.as_str()
}

/// keygate's own and the forwarding headers, the credential headers, and what upstreams take
/// for the path, the method or the client's address. `name` is lowercase, with `-`.
fn is_claim(name: &str) -> bool {
    name.starts_with(IDENTITY_PREFIX)
        || name.starts_with("x-forwarded-")
        || METHOD_OVERRIDES.contains(&name)
        || is_address_claim(name)
        || matches!(
            name,
            "forwarded"
                | "x-real-ip"
                | "x-request-id"
                | "x-original-url"
                | "x-rewrite-url"
                | "authorization"
                | "proxy-authorization"
                | "x-api-key"
        )
}

/// Headers some upstreams take for the client's address or scheme, beside `X-Forwarded-*`,
/// `Forwarded` and `X-Real-IP`: believed from trusted proxies only (Rails reads `Client-IP`,
/// Akamai and Cloudflare set `True-Client-IP` and `CF-Connecting-IP`).
fn is_address_claim(name: &str) -> bool {
    matches!(
        name,
        "true-client-ip"
            | "client-ip"
            | "x-client-ip"
            | "x-cluster-client-ip"
            | "cf-connecting-ip"
            | "fastly-client-ip"
            | "x-original-forwarded-for"
            | "x-originating-ip"
            | "x-remote-addr"
            | "x-remote-ip"
            | "x-host"
            | "front-end-https"
    )
}

/// Removes the hop-by-hop fields from trailers, either way: an intermediary must (RFC 9113
/// §8.2.2), an HTTP/2 peer resets the stream over one (review: an upstream's `Keep-Alive`
/// trailer cost an HTTP/2 client the whole response), and an HTTP/2 upstream never answered a
/// request whose trailers had one (504 after the response timeout). Trailers are rare: a
/// removal per name costs nothing that matters.
pub fn remove_hop_by_hop_from_trailers(trailers: &mut HeaderMap) {
    for name in &HOP_BY_HOP {
        trailers.remove(name);
    }
}

/// Removes from a client's request trailers every field that claims what keygate sets or
/// removes in the head: identity, forwarding, the request id, credentials, `Host`. Upstream
/// frameworks may merge trailers into the headers. `key_header`: the configured key header,
/// when it is not `X-API-Key`.
pub fn remove_from_request_trailers(trailers: &mut HeaderMap, key_header: Option<&HeaderName>) {
    remove_hop_by_hop_from_trailers(trailers);
    if let Some(name) = key_header {
        trailers.remove(name);
    }
    let claims: Vec<HeaderName> = trailers
        .keys()
        .filter(|k| {
            let dashed = k.as_str().replace('_', "-");
            is_claim(&dashed)
                || matches!(dashed.as_str(), "host" | "cookie")
                || key_header.is_some_and(|h| dashed == h.as_str().replace('_', "-"))
        })
        .cloned()
        .collect();
    for name in claims {
        trailers.remove(name);
    }
}

/// `X-Forwarded-Host`'s value: the authority the client named, as it sent it, port and case
/// included (an upstream building links needs `api.example.com:8443`, not the name routing
/// uses, lowercased and without the port): an absolute URI's or HTTP/2's `:authority`, any
/// `user@` left out, else `Host`. `None` when it named none. Taken before the request's
/// headers are rewritten; `Host` costs a reference count, not a copy.
pub fn forwarded_host<B>(req: &http::Request<B>) -> Option<HeaderValue> {
    match req.uri().authority() {
        Some(authority) => {
            let text = authority.as_str();
            let host = text.rsplit_once('@').map_or(text, |(_, host)| host);
            HeaderValue::from_str(host).ok()
        }
        None => req
            .headers()
            .get(header::HOST)
            .filter(|v| !v.is_empty())
            .cloned(),
    }
}

/// Sets `X-Forwarded-For/-Proto/-Host`. From a trusted proxy the chain is extended; from
/// anyone else, what the client claimed is replaced, so the upstream can believe it (its
/// `Forwarded` and `X-Real-IP` go with [`remove_hop_by_hop_and_claims`]).
/// `peer` is the peer's address as header text; `host`, [`forwarded_host`]'s.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    peer_is_trusted: bool,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    // An untrusted peer's own list is replaced unread.
    let prior = peer_is_trusted
        .then(|| joined(headers, &X_FORWARDED_FOR))
        .flatten();
    let xff = match prior {
        Some(mut prior) => {
            prior.extend_from_slice(b", ");
            prior.extend_from_slice(peer.as_bytes());
            HeaderValue::from_maybe_shared(prior.freeze()).ok()
        }
        None => Some(peer.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(peer_is_trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if !(peer_is_trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(v) => {
                headers.insert(X_FORWARDED_HOST.clone(), v);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}

/// Every `name` value, joined as one list. Bytes, not text: a value the client wrote with a
/// byte that is not ASCII stays in the list, left of the hops after it, instead of taking them
/// with it.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<BytesMut> {
    let mut list: Option<BytesMut> = None;
    for value in headers.get_all(name) {
        match list.as_mut() {
            Some(list) => {
                list.extend_from_slice(b", ");
                list.extend_from_slice(value.as_bytes());
            }
            None => list = Some(BytesMut::from(value.as_bytes())),
        }
    }
    list
}

/// The `X-Keygate-*` values of one key, validated once when the key is loaded, in one shared
/// buffer: forwarding them costs a reference count each, not a validation, an allocation and
/// a copy per header per request. `None` where the key has no such value, or where it cannot
/// be a header value (it is then not sent, as before it was cached this way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityHeaders {
    /// Key id, team id, user id, scopes: in the order of `IDENTITY_VALUED`.
    values: [Option<HeaderValue>; 4],
    key_type: &'static str,
    /// Whether every value the key has became a header value (see [`Self::is_whole`]).
    whole: bool,
}

static IDENTITY_VALUED: [&HeaderName; 4] = [&KEY_ID, &TEAM_ID, &USER_ID, &SCOPES];

impl IdentityHeaders {
    pub fn of(key: &KeyRecord) -> Self {
        Self::new(
            &key.api_key_id,
            key.team_id.as_deref(),
            key.behalf_of_user_id.as_deref(),
            &key.scope_names,
            key.key_type,
        )
    }

    pub fn new<S: AsRef<str>>(
        api_key_id: &str,
        team_id: Option<&str>,
        behalf_of_user_id: Option<&str>,
        scope_names: &[S],
        key_type: KeyType,
    ) -> Self {
        let mut scopes = String::new();
        for (i, scope) in scope_names.iter().enumerate() {
            if i > 0 {
                scopes.push(' ');
            }
            scopes.push_str(scope.as_ref());
        }
        let texts = [
            Some(api_key_id),
            team_id,
            behalf_of_user_id,
            Some(scopes.as_str()),
        ];
        let mut joined = BytesMut::with_capacity(texts.iter().flatten().map(|t| t.len()).sum());
        for text in texts.iter().flatten() {
            joined.extend_from_slice(text.as_bytes());
        }
        let joined = joined.freeze();
        let mut at = 0;
        let mut whole = true;
        let values = texts.map(|text| {
            let text = text?;
            let value = joined.slice(at..at + text.len());
            at += text.len();
            // HTTP drops spaces and tabs around a value: `" alice"` would reach the upstream
            // as `alice`, another user (a record stored before the admin API refused it).
            let padded = text.starts_with([' ', '\t']) || text.ends_with([' ', '\t']);
            let value = HeaderValue::from_maybe_shared(value)
                .ok()
                .filter(|_| !padded);
            whole &= value.is_some();
            value
        });
        Self {
            values,
            key_type: key_type.as_str(),
            whole,
        }
    }

    /// Whether each of the key's values can be sent: a value with a control character (which
    /// the admin API refuses) is left out of the forwarded request, and the key would look to
    /// the upstream as if it had no team or user.
    pub fn is_whole(&self) -> bool {
        self.whole
    }
}

pub fn set_identity(headers: &mut HeaderMap, identity: &IdentityHeaders) {
    for (name, value) in IDENTITY_VALUED.iter().zip(&identity.values) {
        if let Some(value) = value {
            headers.insert(HeaderName::clone(name), value.clone());
        }
    }
    headers.insert(
        KEY_TYPE.clone(),
        HeaderValue::from_static(identity.key_type),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::record::sample_record;
    use proptest::prelude::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn the_name_match_is_exactly_the_hop_by_hop_list() {
        assert_eq!(
            HOP_BY_HOP[TRANSFER_ENCODING_INDEX],
            header::TRANSFER_ENCODING
        );
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(i), "{name}");
        }
        for name in [
            "x-connection",
            "te2",
            "content-length",
            "host",
            "keep-alive-x",
        ] {
            assert_eq!(hop_by_hop_index(name), None, "{name}");
        }
    }

    #[test]
    fn connection_listed_names_go_and_so_does_the_rest_whatever_the_case() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "Keep-Alive, close, X-Secret ,  x-other".parse().unwrap(),
        );
        h.append(header::CONNECTION, "x-third".parse().unwrap());
        for name in [
            "x-secret",
            "x-other",
            "x-third",
            "keep-alive",
            "te",
            "x-kept",
        ] {
            h.insert(HeaderName::from_static(name), "1".parse().unwrap());
        }
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    proptest! {
        /// Whatever the message carries: afterwards no hop-by-hop header and no name the
        /// `Connection` header listed (any case, any spacing) is left, and every other header
        /// is, with its values.
        #[test]
        fn removal_keeps_exactly_the_end_to_end_headers(
            names in prop::collection::vec(
                prop_oneof![
                    prop::sample::select(vec![
                        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "transfer-encoding", "upgrade",
                        "content-type", "x-a", "x-b", "x-c",
                    ]).prop_map(str::to_owned),
                    "x-[a-d]{1,2}",
                ],
                0..12,
            ),
            listed in prop::collection::vec(
                ("(?i)(x-[a-d]{1,2}|keep-alive|close|te|upgrade|content-type)", " {0,2}"),
                0..4,
            ),
        ) {
            let mut h = HeaderMap::new();
            for (i, name) in names.iter().enumerate() {
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                h.append(name, HeaderValue::from(i));
            }
            let tokens: Vec<String> =
                listed.iter().map(|(t, pad)| format!("{pad}{t}{pad}")).collect();
            if !tokens.is_empty() {
                h.append(header::CONNECTION, tokens.join(",").parse().unwrap());
            }
            let before = h.clone();
            let dropped: Vec<String> = tokens
                .iter()
                .map(|t| t.trim().to_ascii_lowercase())
                .collect();
            remove_hop_by_hop(&mut h);
            for name in before.keys() {
                let gone = hop_by_hop_index(name.as_str()).is_some()
                    || dropped.iter().any(|d| d == name.as_str());
                if gone {
                    prop_assert!(!h.contains_key(name), "{} kept", name);
                } else {
                    let kept: Vec<_> = h.get_all(name).iter().collect();
                    let was: Vec<_> = before.get_all(name).iter().collect();
                    prop_assert_eq!(kept, was, "{} changed", name);
                }
            }
            prop_assert!(h.keys().all(|k| before.contains_key(k)));
        }
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_removed() {
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), "x".parse().unwrap());
            h.insert("x-kept", "1".parse().unwrap());
            remove_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} kept");
        }
    }

    fn x_api_key() -> HeaderName {
        HeaderName::from_static("x-api-key")
    }

    #[test]
    fn spoofed_identity_is_dropped_and_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-keygate-key-id", "apk_forged".parse().unwrap());
        h.insert("x-keygate-admin", "true".parse().unwrap());
        assert!(!remove_client_claims(&mut h, &x_api_key()));
        assert!(h.is_empty());
        let mut k = sample_record("apk_real");
        k.behalf_of_user_id = Some("u1".into());
        set_identity(&mut h, &IdentityHeaders::of(&k));
        assert_eq!(h["x-keygate-key-id"], "apk_real");
        assert_eq!(h["x-keygate-team-id"], "team1");
        assert_eq!(h["x-keygate-user-id"], "u1");
        assert_eq!(h["x-keygate-key-type"], "shared");
        assert_eq!(h["x-keygate-scopes"], "read");
    }

    #[test]
    fn underscore_twins_of_claimed_names_and_url_overrides_go_the_rest_stays() {
        let mut h = HeaderMap::new();
        for name in [
            "x_keygate_team_id",
            "x_keygate_user-id",
            "x_forwarded_for",
            "x_forwarded_host",
            "x_real_ip",
            "x_request_id",
            "x_api_key",
            "proxy_authorization",
            "true_client_ip",
            "x_http_method_override",
            "x-original-url",
            "x-rewrite-url",
            "x_original_url",
        ] {
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "forged".parse().unwrap(),
            );
        }
        for kept in [
            "x_custom_thing",
            "accept_language",
            "x-custom",
            "authorization",
        ] {
            h.insert(
                HeaderName::from_bytes(kept.as_bytes()).unwrap(),
                "1".parse().unwrap(),
            );
        }
        assert!(!remove_client_claims(&mut h, &x_api_key()));
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 4, "{left:?}");
        for kept in [
            "x_custom_thing",
            "accept_language",
            "x-custom",
            "authorization",
        ] {
            assert!(h.contains_key(kept), "{kept} removed");
        }
    }

    #[test]
    fn the_configured_key_header_stays_and_its_twin_goes() {
        let key = HeaderName::from_static("api_key");
        let mut h = HeaderMap::new();
        h.insert("api_key", "kg_real".parse().unwrap());
        h.insert("api-key", "forged".parse().unwrap());
        remove_client_claims(&mut h, &key);
        assert_eq!(h.len(), 1);
        assert_eq!(h["api_key"], "kg_real");
        let key = HeaderName::from_static("x-client-key");
        let mut h = HeaderMap::new();
        h.insert("x-client-key", "kg_real".parse().unwrap());
        h.insert("x_client_key", "forged".parse().unwrap());
        remove_client_claims(&mut h, &key);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-client-key"], "kg_real");
    }

    #[test]
    fn a_method_override_is_reported_and_kept() {
        for name in METHOD_OVERRIDES {
            let mut h = HeaderMap::new();
            h.insert(name, "DELETE".parse().unwrap());
            assert!(remove_client_claims(&mut h, &x_api_key()), "{name}");
            assert!(h.contains_key(name));
        }
    }

    #[test]
    fn address_claims_go_from_untrusted_peers_only() {
        let claims = [
            "true-client-ip",
            "client-ip",
            "x-client-ip",
            "cf-connecting-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-forwarded-ssl",
            "x-forwarded-scheme",
        ];
        let headers = || {
            let mut h = HeaderMap::new();
            for name in claims {
                h.insert(name, "6.6.6.6".parse().unwrap());
            }
            h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
            h.insert("x-kept", "1".parse().unwrap());
            h
        };
        let mut untrusted = headers();
        remove_hop_by_hop_and_claims(&mut untrusted, true);
        let mut left: Vec<&str> = untrusted.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-forwarded-for", "x-kept"]);
        let mut trusted = headers();
        remove_hop_by_hop_and_claims(&mut trusted, false);
        assert_eq!(trusted.len(), claims.len() + 2);
    }

    #[test]
    fn trailer_claims_go_in_either_spelling() {
        let mut t = HeaderMap::new();
        for name in [
            "x_keygate_scopes",
            "x-forwarded-for",
            "x_forwarded_for",
            "x_real_ip",
            "client-ip",
            "x-http-method-override",
        ] {
            t.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "forged".parse().unwrap(),
            );
        }
        t.insert("x-checksum", "1".parse().unwrap());
        remove_from_request_trailers(&mut t, None);
        assert_eq!(t.len(), 1);
        assert!(t.contains_key("x-checksum"));
        // The configured key header, and its twin.
        let key = HeaderName::from_static("x-client-key");
        for name in ["x-client-key", "x_client_key"] {
            let mut t = HeaderMap::new();
            t.insert(HeaderName::from_static(name), "kg_forged".parse().unwrap());
            remove_from_request_trailers(&mut t, Some(&key));
            assert!(t.is_empty(), "{name} kept");
        }
    }

    #[test]
    fn identity_values_keep_their_own_bytes_and_skip_what_cannot_be_sent() {
        let mut k = sample_record("apk_2");
        k.team_id = Some("team\nbroken".into());
        k.behalf_of_user_id = Some("user-7".into());
        k.scope_names = vec!["read".into(), "write".into(), "admin".into()];
        k.key_type = crate::auth::record::KeyType::User;
        let mut h = HeaderMap::new();
        set_identity(&mut h, &IdentityHeaders::of(&k));
        assert_eq!(h["x-keygate-key-id"], "apk_2");
        assert!(!h.contains_key("x-keygate-team-id"));
        assert_eq!(h["x-keygate-user-id"], "user-7");
        assert_eq!(h["x-keygate-scopes"], "read write admin");
        assert_eq!(h["x-keygate-key-type"], "user");

        k.team_id = None;
        k.behalf_of_user_id = None;
        k.scope_names.clear();
        let mut h = HeaderMap::new();
        set_identity(&mut h, &IdentityHeaders::of(&k));
        assert_eq!(h["x-keygate-key-id"], "apk_2");
        assert!(!h.contains_key("x-keygate-team-id"));
        assert!(!h.contains_key("x-keygate-user-id"));
        assert_eq!(h["x-keygate-scopes"], "");
    }

    #[test]
    fn forwarded_headers_trust_only_trusted_peers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        h.insert("forwarded", "for=10.0.0.1;proto=https".parse().unwrap());
        h.insert("x-real-ip", "10.0.0.1".parse().unwrap());
        remove_hop_by_hop_and_claims(&mut h, true);
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("203.0.113.1"),
            false,
            "http",
            Some(HeaderValue::from_static("api.example:8443")),
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.1");
        assert_eq!(h["x-forwarded-host"], "api.example:8443");
        assert!(!h.contains_key("forwarded") && !h.contains_key("x-real-ip"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "198.51.100.2".parse().unwrap());
        h.insert("x-real-ip", "198.51.100.2".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        remove_hop_by_hop_and_claims(&mut h, false);
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("10.0.0.1"),
            true,
            "http",
            None,
        );
        assert_eq!(h["x-forwarded-for"], "198.51.100.2, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-real-ip"], "198.51.100.2");
        // A trusted proxy's own X-Forwarded-Host is kept; anyone else's is replaced.
        for (trusted, want) in [(true, "public.example"), (false, "internal:8080")] {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-host", "public.example".parse().unwrap());
            set_forwarded(
                &mut h,
                &HeaderValue::from_static("10.0.0.1"),
                trusted,
                "http",
                Some(HeaderValue::from_static("internal:8080")),
            );
            assert_eq!(h["x-forwarded-host"], want);
        }
    }

    #[test]
    fn forwarded_host_is_the_authority_as_the_client_sent_it_port_included() {
        let host = |req: http::Request<()>| forwarded_host(&req);
        let with_host = |uri: &str, value: &str| {
            http::Request::get(uri)
                .header(header::HOST, value)
                .body(())
                .unwrap()
        };
        assert_eq!(
            host(with_host("/x", "API.Example.com:8443")).unwrap(),
            "API.Example.com:8443"
        );
        assert_eq!(
            host(with_host("/x", "api.example.com")).unwrap(),
            "api.example.com"
        );
        assert_eq!(host(with_host("/x", "[::1]:9000")).unwrap(), "[::1]:9000");
        assert_eq!(host(with_host("/x", "")), None);
        assert_eq!(host(http::Request::get("/x").body(()).unwrap()), None);
        // HTTP/2's `:authority` (or an absolute URI) wins over `Host`, without `user@`.
        assert_eq!(
            host(with_host("https://api.example.com:8443/x", "other")).unwrap(),
            "api.example.com:8443"
        );
        assert_eq!(
            host(with_host("http://u:p@api.example.com:81/x", "other")).unwrap(),
            "api.example.com:81"
        );
    }

    #[test]
    fn a_forwarded_hop_that_is_not_ascii_keeps_the_hops_after_it() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_bytes(b"\xff").unwrap());
        h.append("x-forwarded-for", "203.0.113.5".parse().unwrap());
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("10.0.0.1"),
            true,
            "http",
            None,
        );
        assert_eq!(
            h["x-forwarded-for"].as_bytes(),
            b"\xff, 203.0.113.5, 10.0.0.1"
        );
    }

    #[test]
    fn cookies_split_by_an_http2_client_become_one_field() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1".parse().unwrap());
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        h.append(header::COOKIE, "b=2".parse().unwrap());
        h.append(header::COOKIE, "c=3".parse().unwrap());
        join_cookies(&mut h);
        let cookies: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
    }

    #[test]
    fn a_switch_must_be_to_what_was_asked() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert!(switches_to_asked(
            Some(&v("websocket")),
            Some(&v("WebSocket"))
        ));
        assert!(switches_to_asked(
            Some(&v("foo/2, websocket")),
            Some(&v("websocket"))
        ));
        assert!(!switches_to_asked(Some(&v("websocket")), Some(&v("h2c"))));
        assert!(!switches_to_asked(Some(&v("websocket")), None));
        assert!(!switches_to_asked(Some(&v("websocket")), Some(&v(" , "))));
        assert!(!switches_to_asked(None, Some(&v("websocket"))));
        assert!(!switches_to_asked(
            Some(&v("websocket")),
            Some(&v("websocket, h2c"))
        ));
    }

    #[test]
    fn request_trailers_lose_every_claim_and_keep_the_rest() {
        let mut t = HeaderMap::new();
        for name in [
            "x-keygate-key-id",
            "x-forwarded-for",
            "forwarded",
            "x-real-ip",
            "x-request-id",
            "authorization",
            "x-api-key",
            "host",
            "x-checksum",
            "grpc-status",
            // Hop-by-hop: an HTTP/2 hop resets the stream over one.
            "connection",
            "keep-alive",
            "te",
            "transfer-encoding",
            "upgrade",
        ] {
            t.insert(HeaderName::from_static(name), "v".parse().unwrap());
        }
        t.insert(
            HeaderName::from_static("x-client-key"),
            "v".parse().unwrap(),
        );
        remove_from_request_trailers(&mut t, Some(&HeaderName::from_static("x-client-key")));
        let mut kept: Vec<_> = t.keys().map(|k| k.as_str().to_owned()).collect();
        kept.sort();
        assert_eq!(kept, ["grpc-status", "x-checksum"]);
    }

    #[test]
    fn te_trailers_is_told_among_other_codings() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::TE, v.parse().unwrap());
            accepts_trailers(&h)
        };
        assert!(with("trailers"));
        assert!(with("gzip;q=0.5, Trailers"));
        assert!(!with("gzip"));
        assert!(!with("trailersx"));
        assert!(!accepts_trailers(&HeaderMap::new()));
    }

    #[test]
    fn only_chunked_is_a_supported_transfer_coding() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, v.parse().unwrap());
            }
            has_unsupported_transfer_coding(&h)
        };
        assert!(!with(&[]));
        assert!(!with(&["chunked"]));
        assert!(!with(&["Chunked"]));
        assert!(!with(&[" chunked , "]));
        assert!(with(&["gzip, chunked"]));
        assert!(with(&["gzip", "chunked"]));
        assert!(with(&["identity"]));
        assert!(with(&["chunked;q=1"]));
    }

    #[test]
    fn h2c_is_never_an_upgrade() {
        let req = |upgrade: &str| {
            http::Request::get("/")
                .header("connection", "Upgrade, HTTP2-Settings")
                .header("upgrade", upgrade)
                .header("http2-settings", "AAMAAABkAAQAAP__")
                .body(())
                .unwrap()
        };
        assert_eq!(upgrade_protocol(&req("websocket")).unwrap(), "websocket");
        for h2c in ["h2c", "H2C", "websocket, h2c", " h2c "] {
            assert_eq!(upgrade_protocol(&req(h2c)), None, "{h2c}");
        }
        let mut h = req("h2c").into_parts().0.headers;
        remove_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }
}
