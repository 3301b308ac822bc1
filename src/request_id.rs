//! `X-Request-Id`: the client's when it looks like an id (so traces join up across services),
//! a fresh random one otherwise. Passed upstream and returned to the client.

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;

/// A `HeaderName`, not a `&str`: a string name is parsed again on every use.
pub static HEADER: HeaderName = HeaderName::from_static("x-request-id");
const MAX_LEN: usize = 128;

pub fn take_or_make(headers: &HeaderMap) -> HeaderValue {
    from_client(headers).unwrap_or_else(make)
}

/// The client's `X-Request-Id`, when it looks like an id.
pub fn from_client(headers: &HeaderMap) -> Option<HeaderValue> {
    let v = headers.get(&HEADER)?;
    let b = v.as_bytes();
    (!b.is_empty()
        && b.len() <= MAX_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':')))
    .then(|| v.clone())
}

/// A fresh random id: 32 hex characters.
pub fn make() -> HeaderValue {
    let n: u128 = rand::rng().random();
    // 32 hex characters, always a valid header value; written without `format!`, which costs
    // several times more on every request.
    let mut text = [0u8; 32];
    match hex::encode_to_slice(n.to_be_bytes(), &mut text) {
        Ok(()) => HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("0")),
        Err(_) => HeaderValue::from_static("0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_good_ids_and_replaces_bad_ones() {
        let mut h = HeaderMap::new();
        h.insert(&HEADER, "abc-123".parse().unwrap());
        assert_eq!(take_or_make(&h), "abc-123");
        h.insert(&HEADER, "has space".parse().unwrap());
        assert_eq!(take_or_make(&h).len(), 32);
        h.insert(&HEADER, "x".repeat(200).parse().unwrap());
        assert_eq!(take_or_make(&h).len(), 32);
        let made = take_or_make(&HeaderMap::new());
        assert!(
            made.as_bytes()
                .iter()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)),
            "{made:?}"
        );
        assert_ne!(
            take_or_make(&HeaderMap::new()),
            take_or_make(&HeaderMap::new())
        );
    }
}
