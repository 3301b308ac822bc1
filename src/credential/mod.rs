//! Where the presented key comes from: `Authorization: Bearer`, a configured header, a query
//! parameter, or a field of the request body ([`body`], [`form`]), tried in the route's order;
//! the first source that carries a value wins. Also how that credential is removed before
//! forwarding. Nothing here checks the key itself.

pub mod body;
pub mod budget;
pub mod form;
pub mod multipart;

use crate::config::KeySource;
use http::header::{AUTHORIZATION, Entry};
use http::{HeaderMap, HeaderName, Uri};
use std::borrow::Cow;

/// A key as presented, with where it came from (needed to strip it later).
#[derive(Debug, PartialEq, Eq)]
pub struct Presented<'a> {
    pub key: Cow<'a, str>,
    pub source: KeySource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// No source carried a key.
    #[error("no API key in the request")]
    Missing,
    /// A source carried something that cannot be a key (not UTF-8, empty bearer, etc.).
    #[error("the API key is malformed: {0}")]
    Malformed(&'static str),
    /// The same source appears more than once (two Authorization headers, two `api_key`s):
    /// we refuse to guess which one a proxy upstream of us would have used.
    #[error("more than one {0} in the request")]
    Ambiguous(&'static str),
}

/// Names the extractor needs, taken from the configuration once.
#[derive(Debug, Clone)]
pub struct SourceNames {
    pub header: HeaderName,
    pub query_param: String,
}

/// The key from the first of `sources` that carries one; body sources are skipped (see
/// [`find`] and [`body::peek`] for routes that read bodies).
pub fn extract<'a>(
    sources: &[KeySource],
    names: &SourceNames,
    headers: &'a HeaderMap,
    uri: &'a Uri,
) -> Result<Presented<'a>, CredentialError> {
    find(sources, names, headers, uri)?.ok_or(CredentialError::Missing)
}

/// Like [`extract`], with `None` when no source (body sources excepted) carries a key.
pub fn find<'a>(
    sources: &[KeySource],
    names: &SourceNames,
    headers: &'a HeaderMap,
    uri: &'a Uri,
) -> Result<Option<Presented<'a>>, CredentialError> {
    for &source in sources {
        let found = match source {
            KeySource::Bearer => bearer(headers)?,
            KeySource::Header => header(headers, &names.header)?,
            KeySource::Query => query(uri, &names.query_param)?,
            KeySource::Form | KeySource::Json => None,
        };
        if let Some(key) = found {
            return Ok(Some(Presented { key, source }));
        }
    }
    Ok(None)
}

/// `Authorization: Bearer <token>`; other schemes (Basic…) belong to the upstream, not to us.
fn bearer(headers: &HeaderMap) -> Result<Option<Cow<'_, str>>, CredentialError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(CredentialError::Ambiguous("Authorization header"));
    }
    let text = value
        .to_str()
        .map_err(|_| CredentialError::Malformed("Authorization header is not ASCII"))?;
    // Bytes: `str::split_once` costs ~150 instructions more here (callgrind), on every
    // request. `to_str` let only ASCII through, so `trim_ascii` is `trim`.
    let (scheme, rest) = match text.bytes().position(|b| b == b' ') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => (text, ""),
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = rest.trim_ascii();
    if token.is_empty() {
        return Err(CredentialError::Malformed("empty bearer token"));
    }
    Ok(Some(Cow::Borrowed(token)))
}

fn header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> Result<Option<Cow<'a, str>>, CredentialError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(CredentialError::Ambiguous("API key header"));
    }
    let text = value
        .to_str()
        .map_err(|_| CredentialError::Malformed("API key header is not ASCII"))?
        .trim();
    if text.is_empty() {
        return Err(CredentialError::Malformed("empty API key header"));
    }
    Ok(Some(Cow::Borrowed(text)))
}

fn query<'a>(uri: &'a Uri, param: &str) -> Result<Option<Cow<'a, str>>, CredentialError> {
    let Some(q) = uri.query() else {
        return Ok(None);
    };
    let mut found: Option<Cow<'a, str>> = None;
    for pair in q.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        // A name that does not decode to `param` is not ours to judge, whatever its bytes:
        // `?%ff=1` on a route whose key comes from the body is the upstream's business.
        if !decodes_to(name, param) {
            continue;
        }
        if found.is_some() {
            return Err(CredentialError::Ambiguous("API key query parameter"));
        }
        let value = decode(value)?;
        if value.is_empty() {
            return Err(CredentialError::Malformed("empty API key query parameter"));
        }
        found = Some(value);
    }
    Ok(found)
}

/// Whether `s`, form-style percent decoded (`+` is a space), is exactly `want`.
fn decodes_to(s: &str, want: &str) -> bool {
    if !s.contains(['%', '+']) {
        return s == want;
    }
    let replaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&replaced).eq(want.bytes())
}

/// Form-style percent decoding (`+` is a space) that refuses bytes that are not UTF-8.
fn decode(s: &str) -> Result<Cow<'_, str>, CredentialError> {
    if !s.contains(['%', '+']) {
        return Ok(Cow::Borrowed(s));
    }
    let replaced = s.replace('+', " ");
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(&replaced).collect();
    String::from_utf8(bytes)
        .map(Cow::Owned)
        .map_err(|_| CredentialError::Malformed("query parameter is not UTF-8"))
}

/// Removes every credential the route's header and query `sources` carry, the one the key
/// came from and any other (a client may send its key twice), so the upstream never sees
/// one. An `Authorization` header of another scheme (Basic…) is the upstream's and stays.
pub fn strip(sources: &[KeySource], names: &SourceNames, headers: &mut HeaderMap, uri: &mut Uri) {
    for source in sources {
        match source {
            KeySource::Bearer => {
                let is_bearer = |v: &http::HeaderValue| {
                    v.as_bytes()
                        .get(..6)
                        .is_some_and(|s| s.eq_ignore_ascii_case(b"bearer"))
                };
                // One lookup for the check and the removal.
                if let Entry::Occupied(entry) = headers.entry(AUTHORIZATION)
                    && entry.iter().any(is_bearer)
                {
                    entry.remove();
                }
            }
            KeySource::Header => {
                headers.remove(&names.header);
            }
            KeySource::Query => {
                if uri.query().is_some()
                    && let Some(stripped) = uri_without_param(uri, &names.query_param)
                {
                    *uri = stripped;
                }
            }
            // Bodies are stripped by `body::strip_field`, only when the route asks for it.
            KeySource::Form | KeySource::Json => {}
        }
    }
}

fn uri_without_param(uri: &Uri, param: &str) -> Option<Uri> {
    let q = uri.query()?;
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            !decodes_to(name, param)
        })
        .collect();
    let mut pq = uri.path().to_owned();
    if !kept.is_empty() {
        pq.push('?');
        pq.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names() -> SourceNames {
        SourceNames {
            header: HeaderName::from_static("x-api-key"),
            query_param: "api_key".into(),
        }
    }

    const ALL: [KeySource; 3] = [KeySource::Bearer, KeySource::Header, KeySource::Query];

    fn run(headers: &[(&str, &str)], uri: &str) -> Result<(String, KeySource), CredentialError> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let uri: Uri = uri.parse().unwrap();
        extract(&ALL, &names(), &h, &uri).map(|p| (p.key.into_owned(), p.source))
    }

    #[test]
    fn each_source_in_order() {
        assert_eq!(
            run(&[("authorization", "Bearer abc")], "/"),
            Ok(("abc".into(), KeySource::Bearer))
        );
        assert_eq!(
            run(&[("authorization", "bearer  abc ")], "/"),
            Ok(("abc".into(), KeySource::Bearer))
        );
        assert_eq!(
            run(&[("x-api-key", "k1")], "/"),
            Ok(("k1".into(), KeySource::Header))
        );
        assert_eq!(
            run(&[], "/p?a=1&api_key=k%5F2"),
            Ok(("k_2".into(), KeySource::Query))
        );
        assert_eq!(
            run(
                &[("authorization", "Bearer b"), ("x-api-key", "h")],
                "/?api_key=q"
            ),
            Ok(("b".into(), KeySource::Bearer))
        );
    }

    #[test]
    fn other_auth_schemes_are_not_ours() {
        assert_eq!(
            run(
                &[("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", "k")],
                "/"
            ),
            Ok(("k".into(), KeySource::Header))
        );
        assert_eq!(
            run(&[("authorization", "Basic dXNlcjpwYXNz")], "/"),
            Err(CredentialError::Missing)
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(run(&[], "/"), Err(CredentialError::Missing));
        assert!(matches!(
            run(&[("authorization", "Bearer ")], "/"),
            Err(CredentialError::Malformed(_))
        ));
        assert!(matches!(
            run(
                &[("authorization", "Bearer a"), ("authorization", "Bearer b")],
                "/"
            ),
            Err(CredentialError::Ambiguous(_))
        ));
        assert!(matches!(
            run(&[], "/?api_key=a&api_key=b"),
            Err(CredentialError::Ambiguous(_))
        ));
        assert!(matches!(
            run(&[], "/?api_key=%FF"),
            Err(CredentialError::Malformed(_))
        ));
    }

    /// Another parameter's name that is not UTF-8 is the upstream's business: it neither
    /// hides nor spoils the key in a later source.
    #[test]
    fn an_undecodable_parameter_name_is_not_the_key_parameter() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "k".parse().unwrap());
        for uri in ["/?%ff=1", "/?%ff", "/?a%ff+b=1&api_key%ff=2"] {
            let uri: Uri = uri.parse().unwrap();
            let query_first = [KeySource::Query, KeySource::Header];
            assert_eq!(
                extract(&query_first, &names(), &h, &uri).map(|p| (p.key.into_owned(), p.source)),
                Ok(("k".into(), KeySource::Header)),
                "{uri}"
            );
        }
        assert_eq!(
            run(&[], "/?%ff=1&api%5Fkey=q"),
            Ok(("q".into(), KeySource::Query))
        );
        let mut uri: Uri = "/p?%ff=1&api_key=z".parse().unwrap();
        strip(
            &[KeySource::Query],
            &names(),
            &mut HeaderMap::new(),
            &mut uri,
        );
        assert_eq!(uri.to_string(), "/p?%ff=1");
    }

    #[test]
    fn strip_removes_the_credentials_of_the_given_sources_only() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Bearer x".parse().unwrap());
        h.insert("x-api-key", "y".parse().unwrap());
        let mut uri: Uri = "/p?a=1&api_key=z&b=2".parse().unwrap();
        strip(&[KeySource::Query], &names(), &mut h, &mut uri);
        assert_eq!(uri.to_string(), "/p?a=1&b=2");
        strip(&[KeySource::Bearer], &names(), &mut h, &mut uri);
        assert!(h.get(AUTHORIZATION).is_none());
        assert!(h.get("x-api-key").is_some());
        let mut only: Uri = "/p?api_key=z".parse().unwrap();
        strip(&[KeySource::Query], &names(), &mut h, &mut only);
        assert_eq!(only.to_string(), "/p");
        // Every source at once; another scheme's Authorization is the upstream's.
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Basic dTpw".parse().unwrap());
        h.insert("x-api-key", "y".parse().unwrap());
        let mut uri: Uri = "/p?api_key=z".parse().unwrap();
        strip(&ALL, &names(), &mut h, &mut uri);
        assert_eq!(h.get(AUTHORIZATION).unwrap(), "Basic dTpw");
        assert!(h.get("x-api-key").is_none());
        assert_eq!(uri.to_string(), "/p");
    }

    proptest! {
        #[test]
        fn extraction_never_panics(auth in "[ -~]{0,40}", key in "[ -~]{0,40}", q in "[!-~]{0,60}") {
            let mut h = HeaderMap::new();
            if let Ok(v) = auth.parse() { h.insert(AUTHORIZATION, v); }
            if let Ok(v) = key.parse() { h.insert("x-api-key", v); }
            if let Ok(uri) = format!("/p?{q}").parse::<Uri>() {
                let _ = extract(&ALL, &names(), &h, &uri);
                let mut u2 = uri.clone();
                strip(&ALL, &names(), &mut h, &mut u2);
            }
        }
    }
}
