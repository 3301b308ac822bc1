//! Route matching: which upstream a request goes to and which key rules apply. Longest path
//! prefix wins; a route with a host beats one without at the same prefix length.

use crate::config::{BodyKeyConfig, KeySource, RouteConfig};
use http::Method;

/// A checked route, ready for matching.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    path_prefix: String,
    methods: Vec<Method>,
    host: Option<String>,
    /// Index into the gateway's upstream list.
    pub upstream: usize,
    pub public: bool,
    pub scopes: Vec<String>,
    pub keep_credential: bool,
    pub sources: Vec<KeySource>,
    pub body: BodyKeyConfig,
    pub max_body_bytes: Option<u64>,
}

impl Route {
    /// The order routes are tried in: longer prefixes first, then those with a host, then
    /// those with methods.
    fn rank(&self) -> (std::cmp::Reverse<usize>, bool, bool) {
        (
            std::cmp::Reverse(self.path_prefix.len()),
            self.host.is_none(),
            self.methods.is_empty(),
        )
    }

    /// Whether the route names `method` itself (case aside), not only through `GET`.
    fn lists(&self, method: &Method) -> bool {
        self.methods
            .iter()
            .any(|m| m.as_str().eq_ignore_ascii_case(method.as_str()))
    }

    fn matches(&self, method: &Method, host: Option<&str>, path: &[u8], ignore_case: bool) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| serves(m, method)))
            && self.host.as_deref().is_none_or(|h| Some(h) == host)
            && path_has_prefix(path, &self.path_prefix, ignore_case)
    }
}

/// Whether a route listing `listed` takes a request with `method`: without regard to case,
/// since frameworks (Werkzeug, Rack) upper-case the method before they route, and a `get` or
/// `post` must meet the rules of the route its upstream will run; and `HEAD` where `GET` is
/// listed, since upstreams run their GET handler for it.
fn serves(listed: &Method, method: &Method) -> bool {
    if listed == method {
        return true;
    }
    let method = method.as_str();
    listed.as_str().eq_ignore_ascii_case(method)
        || (*listed == Method::GET && method.eq_ignore_ascii_case("HEAD"))
}

/// `/api` matches `/api`, `/api/` and `/api/x`, never `/apix`; with `ignore_case`, `/API/x`
/// too (ASCII letters). `path` is the decoded path ([`crate::request_path::routing_path`]).
fn path_has_prefix(path: &[u8], prefix: &str, ignore_case: bool) -> bool {
    let prefix_bytes = prefix.as_bytes();
    let Some((head, rest)) = path.split_at_checked(prefix_bytes.len()) else {
        return false;
    };
    let same = if ignore_case {
        head.eq_ignore_ascii_case(prefix_bytes)
    } else {
        head == prefix_bytes
    };
    same && (prefix.ends_with('/') || rest.is_empty() || rest.starts_with(b"/"))
}

#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// `[proxy] case_insensitive_paths`.
    ignore_case: bool,
}

impl RouteTable {
    /// `upstream_index` maps an upstream name (checked to exist by the config) to its index.
    pub fn new(
        configs: &[RouteConfig],
        default_sources: &[KeySource],
        upstream_index: impl Fn(&str) -> usize,
    ) -> Self {
        let mut routes: Vec<Route> = configs
            .iter()
            .map(|r| Route {
                name: r.name.clone(),
                path_prefix: r.path_prefix.clone(),
                methods: r.methods.clone(),
                host: r.host.clone(),
                upstream: upstream_index(&r.upstream),
                public: r.public,
                scopes: r.scopes.clone(),
                keep_credential: r.keep_credential,
                sources: r
                    .sources
                    .clone()
                    .unwrap_or_else(|| default_sources.to_vec()),
                body: r.body.clone(),
                max_body_bytes: r.max_body_bytes,
            })
            .collect();
        // Stable sort keeps the file's order among equals.
        routes.sort_by_key(Route::rank);
        Self {
            routes,
            ignore_case: false,
        }
    }

    /// Matches path prefixes without regard to ASCII case, as an upstream that routes so
    /// (Express's default, ASP.NET) reads them.
    pub fn ignoring_path_case(mut self, ignore_case: bool) -> Self {
        self.ignore_case = ignore_case;
        self
    }

    pub fn ignores_path_case(&self) -> bool {
        self.ignore_case
    }

    /// `host` is the request's host without port, lowercase; `path` the decoded path.
    pub fn find(&self, method: &Method, host: Option<&str>, path: &[u8]) -> Option<&Route> {
        self.find_index(method, host, path)
            .and_then(|i| self.get(i))
    }

    pub fn find_index(&self, method: &Method, host: Option<&str>, path: &[u8]) -> Option<usize> {
        let matches = |r: &Route| r.matches(method, host, path, self.ignore_case);
        let first = self.routes.iter().position(matches)?;
        // A `HEAD` taken by a route only because it lists `GET` goes to a route of the same
        // rank that lists `HEAD` itself, wherever the file put the two.
        let route = &self.routes[first];
        if method.as_str().eq_ignore_ascii_case("HEAD") && !route.lists(method) {
            let rank = route.rank();
            let explicit = self.routes[first + 1..]
                .iter()
                .take_while(|r| r.rank() == rank)
                .position(|r| r.lists(method) && matches(r));
            if let Some(i) = explicit {
                return Some(first + 1 + i);
            }
        }
        Some(first)
    }

    pub fn get(&self, index: usize) -> Option<&Route> {
        self.routes.get(index)
    }

    /// Route names in table order (the indices `find_index` returns).
    pub fn names(&self) -> Vec<String> {
        self.routes.iter().map(|r| r.name.clone()).collect()
    }
}

/// Why a request's host is refused: RFC 9112 §3.2 requires a 400 for each, and a gateway
/// that routes by host must not guess which of two hosts the upstream will read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("more than one Host header")]
    Repeated,
    #[error("the Host header is not a host name or address, with an optional port")]
    Invalid,
    #[error("an HTTP/1.1 request without a Host header")]
    Missing,
}

/// The host a request names (`:authority` for HTTP/2 or an absolute URI, else `Host`),
/// lowercased, port and a trailing dot removed (`api.example.com.` is the same name, and DNS
/// and most servers take it so). `None` when the request names none and may do so (HTTP/1.0,
/// HTTP/2, an empty `Host`).
pub fn request_host<B>(req: &http::Request<B>) -> Result<Option<String>, HostError> {
    let mut values = req.headers().get_all(http::header::HOST).iter();
    let value = values.next();
    if values.next().is_some() {
        return Err(HostError::Repeated);
    }
    let authority: http::uri::Authority;
    let host = match (req.uri().host(), value) {
        (Some(h), _) => h,
        (None, Some(value)) if value.is_empty() => return Ok(None),
        (None, Some(value)) => match plain_host(value.as_bytes()) {
            Some(host) => host,
            None => {
                authority = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or(HostError::Invalid)?;
                if !is_host_and_port(&authority) {
                    return Err(HostError::Invalid);
                }
                authority.host()
            }
        },
        (None, None) if req.version() == http::Version::HTTP_11 => {
            return Err(HostError::Missing);
        }
        (None, None) => return Ok(None),
    };
    // RFC 3986 lets a name hold `!$&'()*+,;=` and `%`-escapes; no DNS name does, and parsers
    // differ on them: `X-Forwarded-Host: b.example,a.example` is `b.example` to Express.
    if !is_name_or_literal(host) {
        return Err(HostError::Invalid);
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    // `a..example` or `example..`: no name has an empty label, and an upstream that mends
    // it would serve another host's routes. (A byte loop: `str::contains` costs ~280
    // instructions here, callgrind.)
    let empty_label = host.is_empty()
        || host.starts_with('.')
        || host.ends_with('.')
        || host.as_bytes().windows(2).any(|w| w == b"..");
    if empty_label {
        return Err(HostError::Invalid);
    }
    Ok(Some(host.to_ascii_lowercase()))
}

/// Whether a `Host` value `Authority` took is a host and at most a port (RFC 9110's
/// `uri-host [ ":" port ]`): userinfo (`user@host`), which `Authority` allows, would reach the
/// upstream in `X-Forwarded-Host` (review: `Host: b.example,@a.example` was routed as
/// `a.example` and forwarded as written), and so would a port that is none.
fn is_host_and_port(authority: &http::uri::Authority) -> bool {
    let text = authority.as_str();
    if text.contains('@') {
        return false;
    }
    match text.strip_prefix(authority.host()) {
        Some("") => true,
        Some(port) => {
            port.len() <= 6
                && port.len() >= 2
                && port[1..].bytes().all(|b| b.is_ascii_digit())
                && authority.port_u16().is_some()
        }
        None => false,
    }
}

/// A DNS-like name (letters, digits, `.`, `-`, `_`) or a bracketed IP literal.
fn is_name_or_literal(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(ip) => {
            !ip.is_empty()
                && ip
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        None => host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')),
    }
}

/// The host of a `Host` value that is a plain name or IPv4 address with an optional port
/// (`api.example.com`, `10.0.0.1:8080`), what nearly every client sends, read without
/// `Authority`'s parse: that copies the value into new bytes and searches it twice, ~700
/// instructions a request (callgrind). `None` for anything else (a port out of range, an IPv6
/// literal, userinfo, other characters), which `Authority` decides on; a property test holds
/// the two to the same answer.
fn plain_host(value: &[u8]) -> Option<&str> {
    let mut colon = None;
    for (i, &b) in value.iter().enumerate() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' => {}
            b':' if colon.is_none() => colon = Some(i),
            _ => return None,
        }
    }
    let host = match colon {
        Some(i) => {
            let port = &value[i + 1..];
            if !(1..=5).contains(&port.len()) || !port.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let number = port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
            if number > u32::from(u16::MAX) {
                return None;
            }
            &value[..i]
        }
        None => value,
    };
    if host.is_empty() {
        return None;
    }
    // Only ASCII was let through.
    std::str::from_utf8(host).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, prefix: &str, host: Option<&str>, methods: &[Method]) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            path_prefix: prefix.into(),
            methods: methods.to_vec(),
            host: host.map(Into::into),
            upstream: "u".into(),
            public: false,
            scopes: vec![],
            keep_credential: false,
            sources: None,
            body: BodyKeyConfig::default(),
            max_body_bytes: None,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(
            &[
                route("root", "/", None, &[]),
                route("api", "/api", None, &[]),
                route("api-write", "/api", None, &[Method::POST]),
                route("api-host", "/api", Some("a.example"), &[]),
                route("health", "/health/", None, &[Method::GET]),
            ],
            &[KeySource::Bearer],
            |_| 0,
        )
    }

    fn name(m: Method, host: Option<&str>, path: &str) -> Option<String> {
        table()
            .find(&m, host, path.as_bytes())
            .map(|r| r.name.clone())
    }

    #[test]
    fn longest_prefix_and_specific_routes_win() {
        assert_eq!(name(Method::GET, None, "/api/x").as_deref(), Some("api"));
        assert_eq!(
            name(Method::POST, None, "/api/x").as_deref(),
            Some("api-write")
        );
        assert_eq!(
            name(Method::GET, Some("a.example"), "/api").as_deref(),
            Some("api-host")
        );
        assert_eq!(name(Method::GET, None, "/apix").as_deref(), Some("root"));
        assert_eq!(
            name(Method::GET, None, "/health/live").as_deref(),
            Some("health")
        );
        assert_eq!(
            name(Method::POST, None, "/health/live").as_deref(),
            Some("root")
        );
    }

    /// Upstreams run `post` as POST and HEAD as GET: such a request must meet the rules of
    /// the route that lists POST or GET, not fall to a wider one.
    #[test]
    fn methods_match_as_upstreams_route_them() {
        let method = |m: &str| Method::from_bytes(m.as_bytes()).unwrap();
        for (m, path, want) in [
            ("post", "/api/x", "api-write"),
            ("Post", "/api/x", "api-write"),
            ("HEAD", "/health/live", "health"),
            ("head", "/health/live", "health"),
            ("get", "/health/live", "health"),
            ("HEAD", "/api/x", "api"),
            ("PUT", "/api/x", "api"),
            ("postx", "/api/x", "api"),
            ("OPTIONS", "/health/live", "root"),
        ] {
            assert_eq!(
                name(method(m), None, path).as_deref(),
                Some(want),
                "{m} {path}"
            );
        }
    }

    /// A route that lists `HEAD` takes HEAD requests from one of the same rank that takes
    /// them only through `GET`, in either order in the file; GET stays with the GET route.
    #[test]
    fn an_explicit_head_route_beats_a_get_route_of_the_same_rank() {
        let method = |m: &str| Method::from_bytes(m.as_bytes()).unwrap();
        let get = route("get", "/files", None, &[Method::GET]);
        let head = route("head", "/files", None, &[Method::HEAD]);
        let wider_head = route("wider-head", "/", None, &[Method::HEAD]);
        for configs in [
            vec![get.clone(), head.clone(), wider_head.clone()],
            vec![head.clone(), get.clone(), wider_head.clone()],
        ] {
            let t = RouteTable::new(&configs, &[KeySource::Bearer], |_| 0);
            let name = |m: &str| {
                t.find(&method(m), None, b"/files/a")
                    .map(|r| r.name.clone())
            };
            assert_eq!(name("HEAD").as_deref(), Some("head"));
            assert_eq!(name("head").as_deref(), Some("head"));
            assert_eq!(name("GET").as_deref(), Some("get"));
        }
        // A HEAD route of a lower rank (a shorter prefix) does not take it from the GET route.
        let t = RouteTable::new(&[get, wider_head], &[KeySource::Bearer], |_| 0);
        assert_eq!(
            t.find(&Method::HEAD, None, b"/files/a")
                .map(|r| r.name.as_str()),
            Some("get")
        );
    }

    #[test]
    fn case_is_ignored_only_when_asked() {
        let t = table();
        assert_eq!(
            t.find(&Method::GET, None, b"/API/x")
                .map(|r| r.name.as_str()),
            Some("root")
        );
        let t = table().ignoring_path_case(true);
        for path in ["/API/x", "/Api", "/api/x", "/aPI/"] {
            assert_eq!(
                t.find(&Method::GET, None, path.as_bytes())
                    .map(|r| r.name.as_str()),
                Some("api"),
                "{path}"
            );
        }
        assert_eq!(
            t.find(&Method::GET, None, b"/APIX")
                .map(|r| r.name.as_str()),
            Some("root")
        );
        assert_eq!(
            t.find(&Method::GET, None, b"/HEALTH/live")
                .map(|r| r.name.as_str()),
            Some("health")
        );
    }

    proptest::proptest! {
        /// Ignoring case is matching the lowercased path against the lowercased prefix, and
        /// never matches less than the case-sensitive match.
        #[test]
        fn ignoring_case_is_lowercasing(path in "/[a-zA-Z/]{0,12}", prefix in "/[a-zA-Z]{0,5}/?") {
            let lower = |s: &str| s.to_ascii_lowercase();
            let folded = path_has_prefix(lower(&path).as_bytes(), &lower(&prefix), false);
            proptest::prop_assert_eq!(path_has_prefix(path.as_bytes(), &prefix, true), folded);
            if path_has_prefix(path.as_bytes(), &prefix, false) {
                proptest::prop_assert!(folded);
            }
        }

        /// The shortcut for plain hosts answers as `Authority` does, where it answers at all.
        #[test]
        fn a_plain_host_is_what_authority_makes_of_it(
            value in "[a-zA-Z0-9.:@\\[\\]_%-]{0,24}|[a-z.-]{1,12}:[0-9]{0,7}",
        ) {
            if let Some(host) = plain_host(value.as_bytes()) {
                let authority: Result<http::uri::Authority, _> = value.parse();
                proptest::prop_assert!(authority.is_ok(), "{} accepted", value);
                let authority = authority.unwrap();
                proptest::prop_assert_eq!(host, authority.host());
            }
        }
    }

    #[test]
    fn plain_hosts_are_read_without_authority_and_the_rest_with_it() {
        assert_eq!(plain_host(b"api.example.com"), Some("api.example.com"));
        assert_eq!(plain_host(b"API.Example:8443"), Some("API.Example"));
        assert_eq!(plain_host(b"10.0.0.1:65535"), Some("10.0.0.1"));
        for other in [
            &b"[::1]:80"[..],
            b"user@host",
            b"host:65536",
            b"host:",
            b"host:80:81",
            b":80",
            b"",
            b"h\xc3\xa9",
        ] {
            assert_eq!(
                plain_host(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    /// Review: userinfo in `Host` reached the upstream in `X-Forwarded-Host`, and a name
    /// with a `,` reads as another host to some frameworks.
    #[test]
    fn a_host_header_is_a_name_or_literal_and_a_port_only() {
        let host = |value: &str| {
            let req = http::Request::get("/x")
                .header(http::header::HOST, value)
                .body(())
                .unwrap();
            request_host(&req)
        };
        for good in [
            "api.example.com",
            "API.example.com:8443",
            "my_service:8080",
            "[::1]:8080",
            "[2001:db8::1]",
            "10.0.0.1",
        ] {
            assert!(host(good).is_ok(), "{good}");
        }
        for bad in [
            "user@api.example.com",
            "b.example,@a.example",
            "b.example,a.example",
            "a%41.example",
            "a;b.example",
            "api.example.com:",
            "api.example.com:99999",
            "api.example.com:+80",
            "[fe80::1%25eth0]",
        ] {
            assert!(
                matches!(host(bad), Err(HostError::Invalid)),
                "{bad}: {:?}",
                host(bad)
            );
        }
        let absolute = http::Request::get("http://a,b.example/x").body(()).unwrap();
        assert!(matches!(request_host(&absolute), Err(HostError::Invalid)));
    }

    #[test]
    fn no_route_without_catch_all() {
        let t = RouteTable::new(&[route("api", "/api", None, &[])], &[], |_| 0);
        assert!(t.find(&Method::GET, None, b"/other").is_none());
    }

    #[test]
    fn host_comes_from_uri_or_header() {
        let req = http::Request::get("/x")
            .header("host", "API.Example:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).unwrap().as_deref(), Some("api.example"));
        let req = http::Request::get("/x")
            .header("host", "api.example.:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).unwrap().as_deref(), Some("api.example"));
        let req = http::Request::get("http://h2.example/x").body(()).unwrap();
        assert_eq!(request_host(&req).unwrap().as_deref(), Some("h2.example"));
        let req = http::Request::get("/x")
            .header("host", "")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), Ok(None));
        for version in [http::Version::HTTP_10, http::Version::HTTP_2] {
            let req = http::Request::get("/x").version(version).body(()).unwrap();
            assert_eq!(request_host(&req), Ok(None), "{version:?}");
        }
    }

    #[test]
    fn a_host_the_upstream_could_read_otherwise_is_refused() {
        let with = |hosts: &[&[u8]]| {
            let mut req = http::Request::get("/x");
            for h in hosts {
                req = req.header("host", http::HeaderValue::from_bytes(h).unwrap());
            }
            request_host(&req.body(()).unwrap())
        };
        assert_eq!(
            with(&[b"a.example", b"b.example"]),
            Err(HostError::Repeated)
        );
        assert_eq!(
            with(&[b"a.example", b"a.example"]),
            Err(HostError::Repeated)
        );
        for bad in [
            &b"bad host"[..],
            b"a.example..",
            b"a..example",
            b".a.example",
            b":80",
            b"a.example\xff",
            b"a.example/x",
        ] {
            assert_eq!(with(&[bad]), Err(HostError::Invalid), "{:?}", bad);
        }
        assert_eq!(with(&[]), Err(HostError::Missing));
        let absolute = http::Request::get("http://a.example/x")
            .header("host", "a.example")
            .header("host", "b.example")
            .body(())
            .unwrap();
        assert_eq!(request_host(&absolute), Err(HostError::Repeated));
    }
}
