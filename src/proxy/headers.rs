//! Header rules for forwarding: hop-by-hop removal (RFC 9110 §7.6.1), `X-Forwarded-*`, and the
//! verified identity. A client can never smuggle an identity header: every `x-keygate-*`
//! header it sends is dropped before ours are added.

use crate::auth::record::KeyRecord;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use std::net::IpAddr;

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub const IDENTITY_PREFIX: &str = "x-keygate-";
pub static KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
pub static TEAM_ID: HeaderName = HeaderName::from_static("x-keygate-team-id");
pub static USER_ID: HeaderName = HeaderName::from_static("x-keygate-user-id");
pub static KEY_TYPE: HeaderName = HeaderName::from_static("x-keygate-key-type");
pub static SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including those the `Connection` header names. `Upgrade` goes
/// too: upgrades are not proxied yet.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names costs less than nine lookups.
    if !headers
        .keys()
        .any(|k| k == header::UPGRADE || HOP_BY_HOP.contains(k))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` plus `Upgrade`),
/// e.g. `websocket`. HTTP/2 requests never upgrade.
pub fn upgrade_protocol<B>(req: &http::Request<B>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// Puts back the two headers an upgrade needs after the hop-by-hop removal.
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

pub fn remove_identity(headers: &mut HeaderMap) {
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(IDENTITY_PREFIX))
        .cloned()
        .collect();
    for name in spoofed {
        headers.remove(name);
    }
}

/// Sets `X-Forwarded-For/-Proto/-Host`. From a trusted proxy the chain is extended; from
/// anyone else, what the client claimed is replaced, so the upstream can believe it.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    peer_is_trusted: bool,
    proto: &'static str,
    host: Option<&str>,
) {
    let peer_text = peer.to_string();
    let xff = match (peer_is_trusted, joined(headers, &X_FORWARDED_FOR)) {
        (true, Some(prior)) => format!("{prior}, {peer_text}"),
        _ => peer_text,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(peer_is_trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if !(peer_is_trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match host.and_then(|h| HeaderValue::from_str(h).ok()) {
            Some(v) => {
                headers.insert(X_FORWARDED_HOST.clone(), v);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let parts: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

pub fn set_identity(headers: &mut HeaderMap, key: &KeyRecord) {
    let mut put = |name: &HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name.clone(), v);
        }
    };
    put(&KEY_ID, &key.api_key_id);
    if let Some(team) = &key.team_id {
        put(&TEAM_ID, team);
    }
    if let Some(user) = &key.behalf_of_user_id {
        put(&USER_ID, user);
    }
    match key.scope_names.as_slice() {
        [one] => put(&SCOPES, one),
        many => put(&SCOPES, &many.join(" ")),
    }
    headers.insert(
        KEY_TYPE.clone(),
        HeaderValue::from_static(key.key_type.as_str()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::record::sample_record;

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
    fn each_hop_by_hop_header_alone_is_removed() {
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), "x".parse().unwrap());
            h.insert("x-kept", "1".parse().unwrap());
            remove_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} kept");
        }
    }

    #[test]
    fn spoofed_identity_is_dropped_and_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-keygate-key-id", "apk_forged".parse().unwrap());
        h.insert("x-keygate-admin", "true".parse().unwrap());
        remove_identity(&mut h);
        assert!(h.is_empty());
        let mut k = sample_record("apk_real");
        k.behalf_of_user_id = Some("u1".into());
        set_identity(&mut h, &k);
        assert_eq!(h["x-keygate-key-id"], "apk_real");
        assert_eq!(h["x-keygate-team-id"], "team1");
        assert_eq!(h["x-keygate-user-id"], "u1");
        assert_eq!(h["x-keygate-key-type"], "shared");
        assert_eq!(h["x-keygate-scopes"], "read");
    }

    #[test]
    fn forwarded_headers_trust_only_trusted_peers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        set_forwarded(
            &mut h,
            "203.0.113.1".parse().unwrap(),
            false,
            "http",
            Some("api.example"),
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.1");
        assert_eq!(h["x-forwarded-host"], "api.example");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "198.51.100.2".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        set_forwarded(&mut h, "10.0.0.1".parse().unwrap(), true, "http", None);
        assert_eq!(h["x-forwarded-for"], "198.51.100.2, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
