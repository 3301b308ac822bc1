//! The client's address. The TCP peer, unless the peer is a trusted proxy: then the nearest
//! untrusted address in `X-Forwarded-For` (or, if absent, `Forwarded: for=`), walking from the
//! right, since everything left of the last trusted hop may be written by the client.

use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;
use std::net::IpAddr;

pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    if headers.contains_key("x-forwarded-for") {
        for value in headers.get_all("x-forwarded-for") {
            let Ok(text) = value.to_str() else {
                return peer;
            };
            for part in text.split(',') {
                match parse_xff_element(part) {
                    Some(ip) => hops.push(ip),
                    // An unparsable hop: nothing to its left can be trusted.
                    None => hops.clear(),
                }
            }
        }
    } else {
        for value in headers.get_all(http::header::FORWARDED) {
            let Ok(text) = value.to_str() else {
                return peer;
            };
            for element in text.split(',') {
                let for_value = element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
                });
                match for_value.and_then(parse_forwarded_node) {
                    Some(ip) => hops.push(ip),
                    None => hops.clear(),
                }
            }
        }
    }
    for ip in hops.into_iter().rev() {
        if !is_trusted(ip, trusted) {
            return ip;
        }
    }
    peer
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&ip))
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`, from dual-stack sockets) is treated as the IPv4 address,
/// so IPv4 rules apply to it.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// `ip` as text, for `X-Forwarded-For`: the same text as its `Display`, which took ~2 600
/// instructions for an IPv4 address (a formatter call per octet, padding checks), once per
/// new connection (callgrind). IPv4 is written octet by octet (`itoa`); IPv6 is rare enough.
pub fn header_text(ip: IpAddr) -> HeaderValue {
    let text = match ip {
        IpAddr::V4(v4) => {
            let mut text = String::with_capacity(15);
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                text.push_str(digits.format(octet));
            }
            text
        }
        IpAddr::V6(v6) => v6.to_string(),
    };
    // An address's text is always a valid header value.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
        .unwrap_or(HeaderValue::from_static("unknown"))
}

fn parse_xff_element(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    // Some proxies append the port: `1.2.3.4:5678` or `[::1]:5678`.
    s.parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| canonical(a.ip()))
}

/// RFC 7239 node: `1.2.3.4`, `"1.2.3.4:80"`, `"[2001:db8::1]:443"`, or an obfuscated name.
fn parse_forwarded_node(v: &str) -> Option<IpAddr> {
    let v = v.trim().trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        let end = rest.find(']')?;
        return rest[..end].parse().ok().map(canonical);
    }
    let host = match v.rsplit_once(':') {
        Some((h, _port)) if !h.contains(':') => h,
        _ => v,
    };
    host.parse().ok().map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn trusted() -> Vec<IpNet> {
        vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()]
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_says() {
        let h = headers(&[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(
            client_ip(ip("203.0.113.9"), &h, &trusted()),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn trusted_peer_gives_rightmost_untrusted_hop() {
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.1.1")]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted()),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn several_xff_headers_are_one_list() {
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.7"),
            ("x-forwarded-for", "10.1.1.1"),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted()),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn garbage_hop_stops_the_walk() {
        let h = headers(&[("x-forwarded-for", "198.51.100.7, junk")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted()), ip("10.0.0.2"));
    }

    #[test]
    fn forwarded_header_is_used_without_xff() {
        let h = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8::7]:443\"",
        )]);
        assert_eq!(client_ip(ip("fd00::1"), &h, &trusted()), ip("2001:db8::7"));
    }

    #[test]
    fn mapped_ipv6_peer_is_ipv4() {
        let h = HeaderMap::new();
        assert_eq!(client_ip(ip("::ffff:10.0.0.1"), &h, &[]), ip("10.0.0.1"));
    }

    proptest! {
        #[test]
        fn header_text_is_the_address_display(v4 in any::<u32>(), v6 in any::<u128>()) {
            for ip in [IpAddr::from(v4.to_be_bytes()), IpAddr::from(v6.to_be_bytes())] {
                let text = header_text(ip);
                prop_assert_eq!(text.to_str().unwrap(), ip.to_string());
            }
        }

        #[test]
        fn never_panics(xff in ".{0,64}", fwd in ".{0,64}") {
            let mut h = HeaderMap::new();
            if let Ok(v) = xff.parse() { h.insert("x-forwarded-for", v); }
            if let Ok(v) = fwd.parse() { h.insert("forwarded", v); }
            let _ = client_ip(ip("10.0.0.1"), &h, &trusted());
        }
    }
}
