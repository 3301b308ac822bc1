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
            // Split the bytes, not a text of the whole value: a value with one byte that is not
            // ASCII (written by the client, left of the proxy's own hop) must cost the client
            // only its own hops, never make the proxy's address the answer.
            for part in value.as_bytes().split(|&b| b == b',') {
                match parse_xff_element(part) {
                    Some(ip) => hops.push(ip),
                    // An unparsable hop: nothing to its left can be trusted.
                    None => hops.clear(),
                }
            }
        }
    } else {
        for value in headers.get_all(http::header::FORWARDED) {
            for element in value.as_bytes().split(|&b| b == b',') {
                // An element that is not UTF-8 is an unparsable hop, as in X-Forwarded-For.
                let for_value = std::str::from_utf8(element).ok().and_then(|element| {
                    element.split(';').find_map(|pair| {
                        let (k, v) = pair.split_once('=')?;
                        k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
                    })
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

fn parse_xff_element(bytes: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(bytes).ok()?.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    // Some proxies append the port: `1.2.3.4:5678` or `[::1]:5678`; some bracket IPv6
    // without one: `[2001:db8::1]`.
    if let Some(ip) = s
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse::<std::net::Ipv6Addr>().ok())
    {
        return Some(canonical(IpAddr::V6(ip)));
    }
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
    fn an_ipv6_hop_in_brackets_with_or_without_a_port_is_read() {
        for hop in ["[2001:db8::7]", "[2001:db8::7]:443", "2001:db8::7"] {
            let h = headers(&[("x-forwarded-for", hop)]);
            assert_eq!(
                client_ip(ip("10.0.0.2"), &h, &trusted()),
                ip("2001:db8::7"),
                "{hop}"
            );
        }
        for junk in ["[2001:db8::7", "[1.2.3.4]", "[]"] {
            let h = headers(&[("x-forwarded-for", junk)]);
            assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted()), ip("10.0.0.2"));
        }
    }

    #[test]
    fn garbage_hop_stops_the_walk() {
        let h = headers(&[("x-forwarded-for", "198.51.100.7, junk")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted()), ip("10.0.0.2"));
    }

    fn header_of_bytes(name: &'static str, bytes: &[u8]) -> (http::HeaderName, HeaderValue) {
        (
            http::HeaderName::from_static(name),
            HeaderValue::from_bytes(bytes).unwrap(),
        )
    }

    #[test]
    fn a_hop_that_is_not_ascii_costs_only_the_hops_left_of_it() {
        for pairs in [
            vec![header_of_bytes("x-forwarded-for", b"\xff, 203.0.113.5")],
            vec![
                header_of_bytes("x-forwarded-for", b"\xff"),
                header_of_bytes("x-forwarded-for", b"203.0.113.5"),
            ],
            vec![header_of_bytes("forwarded", b"for=\xff, for=203.0.113.5")],
            vec![header_of_bytes(
                "forwarded",
                b"for=\"\xc3\xa9\", for=203.0.113.5;proto=http",
            )],
        ] {
            let h: HeaderMap = pairs.into_iter().collect();
            assert_eq!(
                client_ip(ip("10.0.0.2"), &h, &trusted()),
                ip("203.0.113.5"),
                "{h:?}"
            );
        }
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

        /// Whatever bytes the client sends, a trusted proxy that appends its peer's address
        /// to the list makes that address the client's.
        #[test]
        fn the_hop_a_trusted_proxy_appends_wins(
            sent in proptest::collection::vec(
                any::<u8>().prop_filter("a header value byte", |&b| b == b'\t' || (b >= 0x20 && b != 0x7f)),
                0..64,
            ),
            v4 in any::<u32>(),
            forwarded in any::<bool>(),
        ) {
            let real = canonical(IpAddr::from(v4.to_be_bytes()));
            prop_assume!(!is_trusted(real, &trusted()));
            let (name, appended) = if forwarded {
                ("forwarded", format!(", for={real}"))
            } else {
                ("x-forwarded-for", format!(", {real}"))
            };
            let mut value = sent;
            value.extend_from_slice(appended.as_bytes());
            let h: HeaderMap = [header_of_bytes(name, &value)].into_iter().collect();
            prop_assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted()), real);
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
