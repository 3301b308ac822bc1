//! The request handler. [`Gateway::handle`] is the outer half: it owns the request id, turns
//! any error into its answer (through [`crate::error`]) and writes the access-log line.
//! [`Gateway::authorize_and_forward`] is the inner half, the request path in order, written
//! with `?` only: client address → route → credential → verify → policy → forward. The
//! credential may come from the body ([`crate::credential::body`]); the body is then forwarded
//! as a replay of what was read followed by the rest of the stream.

use crate::auth::key::KeyHash;
use crate::auth::policy;
use crate::auth::verified::VerifiedKey;
use crate::auth::verify::{Verifier, VerifyError};
use crate::client_ip::{self, canonical};
use crate::config::{Config, ProxyConfig};
use crate::credential::body::{self as body_key, BodyError};
use crate::credential::budget::PeekBudget;
use crate::credential::{self, CredentialError, SourceNames};
use crate::error::{self, GatewayError, Outcome};
use crate::log_every::LogEvery;
use crate::metrics::{Metrics, RequestSeries};
use crate::proxy::tunnel::KeyEnds;
use crate::proxy::{ClientBody, ConnectionCaps, ForwardBody, Upstream, UpstreamBody, headers};
use crate::request_id;
use crate::request_path;
use crate::route::{self, Route, RouteTable};
use crate::server::RequestContext;
use crate::usage::UsageRecorder;
use crate::window_watch::SendWatch;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use ipnet::IpNet;
use prometheus::Histogram;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The upstream's response, or keygate's own answer; over HTTP/2 both are watched for a client
/// that withholds window (`window_watch`), or a client could hold a stream, and with it the
/// connection, on a 401 for good.
pub type ResponseBody = Either<UpstreamBody, SendWatch<Full<Bytes>>>;

/// Headers the gateway may add to a forwarded request: `X-Forwarded-For/-Proto/-Host`, the
/// request id, and the five identity headers.
const ADDED_HEADERS: usize = 9;

pub struct Gateway {
    routes: RouteTable,
    upstreams: Vec<Upstream>,
    /// `keygate_upstream_duration_seconds`, one series per entry of `upstreams`.
    upstream_duration: Vec<Histogram>,
    verifier: Arc<Verifier>,
    names: SourceNames,
    realm: String,
    reveal_refusal_reason: bool,
    trusted_proxies: Vec<IpNet>,
    /// `proxy.max_headers`: hyper enforces it over HTTP/1.1 only.
    max_headers: usize,
    allow_ips: Vec<IpNet>,
    deny_ips: Vec<IpNet>,
    /// This gateway's own copy of the per-request metrics (one per proxy thread).
    metrics: RequestSeries,
    /// `None` when usage records are disabled.
    usage: Option<Arc<UsageRecorder>>,
    /// `proxy.max_peek_total_bytes`, shared by every proxy thread's gateway.
    peek_budget: Arc<PeekBudget>,
    /// Set once this gateway's listener gave up draining: a request still unanswered then is
    /// dropped by keygate, not by its client.
    drain_expired: AtomicBool,
}

/// What every proxy thread's [`Gateway`] shares: the body peek budget, each upstream's
/// connection cap and failure-log spacing, so that the bounds hold for the process, not per
/// thread.
pub struct Shared {
    pub peek_budget: Arc<PeekBudget>,
    pub caps: ConnectionCaps,
    pub upstream_logs: BTreeMap<String, Arc<LogEvery>>,
}

impl Shared {
    /// `peek_gauge`: `keygate_peek_held_bytes`, when there are metrics; `caps`: from
    /// [`crate::proxy::connection_caps`].
    pub fn new(
        config: &Config,
        peek_gauge: Option<prometheus::IntGauge>,
        caps: ConnectionCaps,
    ) -> Self {
        Self {
            peek_budget: PeekBudget::new(config.proxy.max_peek_total_bytes, peek_gauge),
            caps,
            upstream_logs: config
                .upstreams
                .keys()
                .map(|name| (name.clone(), Arc::default()))
                .collect(),
        }
    }
}

/// The client end of one connection, worked out when it opens rather than on every request:
/// its address, whether it is a trusted proxy, and the `X-Forwarded-For` text most requests
/// send.
#[derive(Clone)]
pub struct Peer {
    addr: SocketAddr,
    /// `addr`'s IP, IPv4-mapped IPv6 as IPv4.
    ip: IpAddr,
    trusted: bool,
    forwarded_for: HeaderValue,
}

/// A presented key, the body to forward, and (urlencoded bodies) where the
/// key field lies in it.
struct Found<'p> {
    key: Cow<'p, str>,
    body: ForwardBody,
    field: Option<Range<u64>>,
}

/// What the inner handler learned, for the access log even when it fails.
#[derive(Default)]
struct Trace {
    route: Option<usize>,
    key: Option<Arc<VerifiedKey>>,
    client_ip: Option<IpAddr>,
}

/// One request between its headers and its answer: in `keygate_in_flight_requests` for that
/// long, then counted and logged once. When the client closes its connection first, hyper
/// drops [`Gateway::handle`] at its `await`; the drop still takes the request out of the gauge
/// and counts and logs it, as `client_closed` with nginx's status 499; when the drain timeout
/// dropped it, as `drain_cut_off` with nginx's 444.
struct InFlight<'g> {
    gateway: &'g Gateway,
    peer: &'g Peer,
    started: Instant,
    id: HeaderValue,
    method: http::Method,
    trace: Trace,
    finished: bool,
}

impl<'g> InFlight<'g> {
    fn start(gateway: &'g Gateway, peer: &'g Peer, req: &Request<Incoming>) -> Self {
        let started = Instant::now();
        gateway.metrics.in_flight.inc();
        Self {
            gateway,
            peer,
            started,
            id: request_id::take_or_make(req.headers()),
            method: req.method().clone(),
            trace: Trace::default(),
            finished: false,
        }
    }

    fn finish(&mut self, status: u16, outcome: Outcome, code: &str) {
        self.finished = true;
        let g = self.gateway;
        let elapsed = self.started.elapsed();
        g.metrics
            .observe_request(self.trace.route, outcome, elapsed);
        g.metrics.in_flight.dec();
        let route = self.trace.route.and_then(|i| g.routes.get(i));
        tracing::info!(
            target: "keygate::access",
            request_id = self.id.to_str().unwrap_or(""),
            method = %self.method,
            route = route.map_or("-", |r| r.name.as_str()),
            status,
            outcome = outcome.as_str(),
            code,
            key_id = self.trace.key.as_ref().map_or("-", |k| &*k.api_key_id),
            client_ip = %self.trace.client_ip.unwrap_or(self.peer.addr.ip()),
            duration_us = elapsed.as_micros() as u64,
        );
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            if self.gateway.drain_expired.load(Ordering::Relaxed) {
                self.finish(444, Outcome::DrainCutOff, "");
            } else {
                self.finish(499, Outcome::ClientClosed, "");
            }
        }
    }
}

/// How often an open tunnel's key is checked again (a cache hit but for the first check after
/// a change).
const TUNNEL_KEY_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl Gateway {
    pub fn new(
        config: &Config,
        verifier: Arc<Verifier>,
        metrics: &Metrics,
        usage: Option<Arc<UsageRecorder>>,
        shared: &Shared,
    ) -> Result<Self, String> {
        let metrics = metrics.request_series().map_err(|e| e.to_string())?;
        let upstream_names: Vec<&String> = config.upstreams.keys().collect();
        let upstreams = config
            .upstreams
            .iter()
            .map(|(name, cfg)| {
                let cap = shared
                    .caps
                    .get(name)
                    .ok_or_else(|| format!("upstream {name}: no connection cap"))?;
                let log = shared.upstream_logs.get(name).cloned().unwrap_or_default();
                Upstream::new(name, cfg, cap.clone(), log)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let routes = RouteTable::new(&config.routes, &config.auth.sources, |name| {
            upstream_names
                .iter()
                .position(|n| n.as_str() == name)
                .unwrap_or(0)
        })
        .ignoring_path_case(config.proxy.case_insensitive_paths);
        let ProxyConfig {
            trusted_proxies,
            allow_ips,
            deny_ips,
            ..
        } = config.proxy.clone();
        let upstream_duration = upstreams
            .iter()
            .map(|u| metrics.upstream_duration(&u.name))
            .collect();
        Ok(Self {
            routes,
            upstreams,
            upstream_duration,
            verifier,
            names: SourceNames {
                header: config.auth.header_name.clone(),
                query_param: config.auth.query_param.clone(),
            },
            realm: config.auth.realm.clone(),
            reveal_refusal_reason: config.auth.reveal_refusal_reason,
            max_headers: config.proxy.max_headers,
            trusted_proxies,
            allow_ips,
            deny_ips,
            metrics,
            usage,
            peek_budget: shared.peek_budget.clone(),
            drain_expired: AtomicBool::new(false),
        })
    }

    /// The listener stopped draining with requests of this gateway still unanswered; they are
    /// dropped next (with the runtime), and logged as cut off by the drain.
    pub fn drain_expired(&self) {
        self.drain_expired.store(true, Ordering::Relaxed);
    }

    pub fn peer(&self, addr: SocketAddr) -> Peer {
        let ip = canonical(addr.ip());
        Peer {
            addr,
            ip,
            trusted: self.trusted_proxies.iter().any(|n| n.contains(&ip)),
            forwarded_for: client_ip::header_text(ip),
        }
    }

    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.verifier
    }

    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: &Peer,
        mut context: RequestContext,
    ) -> Response<ResponseBody> {
        let mut request = InFlight::start(self, peer, &req);
        let result = self
            .authorize_and_forward(req, peer, &request.id, &mut request.trace, &mut context)
            .await;
        let route = request.trace.route.and_then(|i| self.routes.get(i));
        let (mut resp, outcome, code) = match result {
            Ok(resp) => (resp.map(Either::Left), Outcome::Forwarded, ""),
            Err(err) => {
                let answer = error::classify(&err, self.reveal_refusal_reason);
                let scopes = route.map_or(&[][..], |r| &r.scopes[..]);
                let id = request.id.to_str().unwrap_or("");
                let resp = error::render(&answer, &self.realm, id, scopes)
                    .map(|body| Either::Right(SendWatch::answering_here(body, context.stream)));
                if answer.outcome != Outcome::Forwarded {
                    tracing::debug!(request_id = id, reason = %err, "request refused");
                }
                (resp, answer.outcome, answer.code)
            }
        };
        resp.headers_mut()
            .insert(request_id::HEADER.clone(), request.id.clone());
        request.finish(resp.status().as_u16(), outcome, code);
        resp
    }

    async fn authorize_and_forward(
        &self,
        mut req: Request<Incoming>,
        peer: &Peer,
        request_id: &HeaderValue,
        trace: &mut Trace,
        context: &mut RequestContext,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let client_ip = client_ip::client_ip(peer.ip, req.headers(), &self.trusted_proxies);
        trace.client_ip = Some(client_ip);
        self.check_network(client_ip)?;
        if req.method() == http::Method::CONNECT {
            return Err(GatewayError::ConnectNotSupported);
        }
        // Over HTTP/2 only the header list's bytes are bounded (`max_header_bytes`); hyper's
        // count limit is HTTP/1.1's.
        if req.version() == http::Version::HTTP_2 && req.headers().len() > self.max_headers {
            // Browsers send each cookie as a field of its own over HTTP/2; over HTTP/1.1 they
            // are one line, and count as one here too.
            let cookies = req.headers().get_all(http::header::COOKIE).iter().count();
            if req.headers().len() - cookies.saturating_sub(1) > self.max_headers {
                return Err(GatewayError::TooManyHeaders);
            }
        }
        // Refused before the key is looked for (a body source would read the coded bytes) or
        // counted as used; only a request with a body can have a transfer coding.
        if !http_body::Body::is_end_stream(req.body())
            && headers::has_unsupported_transfer_coding(req.headers())
        {
            return Err(GatewayError::TransferCodingNotSupported);
        }

        // On every route, public ones included.
        let method_override = headers::remove_client_claims(req.headers_mut(), &self.names.header);
        let host = route::request_host(&req)?;
        let path = request_path::routing_path(req.uri().path())?;
        if self.routes.ignores_path_case() {
            request_path::check_case_folding(&path)?;
        }
        let route_index = self
            .routes
            .find_index(req.method(), host.as_deref(), &path)
            .ok_or(GatewayError::NoRoute)?;
        // Frameworks decode the name, which may be percent-encoded (`%5Fmethod`): a query with
        // a `%` is parsed too.
        let query_override = req
            .uri()
            .query()
            .filter(|q| q.contains("_method") || q.contains('%'));
        if method_override || query_override.is_some() {
            self.check_method_override(
                req.headers(),
                query_override,
                route_index,
                host.as_deref(),
                &path,
            )?;
        }
        drop(path);
        trace.route = Some(route_index);
        let route = self.routes.get(route_index).ok_or(GatewayError::NoRoute)?;

        let (mut parts, incoming) = req.into_parts();
        // Room for what is added below (forwarding, request id, identity) in one allocation,
        // instead of the map doubling twice on the way.
        parts.headers.reserve(ADDED_HEADERS);
        let mut verified = None;
        // A request that may become a tunnel keeps its key's hash, to end the tunnel when
        // the key stops being valid.
        let mut tunnel_key = None;
        let body = if route.public {
            ForwardBody::Direct(incoming)
        } else {
            // Taken apart at once: kept whole, `found` would stay in this future beside its
            // fields.
            let Found {
                key: presented,
                mut body,
                field,
            } = self.find_key(route, &parts, incoming).await?;
            // After the key is found: a body source may have waited up to `peek_timeout` for
            // it, and a key that expired meanwhile must not pass on the time it arrived at.
            let now = chrono::Utc::now();
            let key = self.verifier.verify(&presented, now).await?;
            trace.key = Some(key.clone());
            policy::authorize(&key, &route.scopes, client_ip, now)?;
            if context.hold.is_some() {
                tunnel_key = Some(KeyHash::of(&presented));
            }
            if let Some(usage) = &self.usage {
                usage.record(&key.api_key_id, now);
            }
            if !route.keep_credential {
                credential::strip(
                    &route.sources,
                    &self.names,
                    &mut parts.headers,
                    &mut parts.uri,
                );
                if let (true, Some(range), ForwardBody::Replay(replay)) =
                    (route.body.strip_form_field, field, &mut body)
                {
                    body_key::strip_field(replay, &mut parts.headers, range);
                }
            }
            verified = Some(key);
            body
        };
        // Not with `Expect: 100-continue`: the first poll of the body sends the client its
        // `100 Continue`, which waits until the upstream has been reached.
        let body = if parts.headers.contains_key(http::header::EXPECT) {
            body
        } else {
            body.read_ahead().await
        };
        let upstream = self
            .upstreams
            .get(route.upstream)
            .ok_or(GatewayError::UpstreamUnavailable)?;
        if let Some(limit) = route.max_body_bytes {
            let declared = parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            // A chunked body read ahead whole knows its size too: refused before the upstream
            // is asked.
            if declared.is_some_and(|n| n > limit)
                || http_body::Body::size_hint(&body).lower() > limit
            {
                return Err(GatewayError::BodyTooLarge);
            }
        }
        // A body still to come may outgrow the route's limit or stall; either fails the
        // exchange, and is then answered as the client's fault. The response timeout counts
        // from its end.
        let client_body = (!http_body::Body::is_end_stream(&body))
            .then(|| Arc::new(ClientBody::new(self.names.header.clone())));
        let body = match &client_body {
            None => body,
            Some(state) => {
                let body = match route.max_body_bytes {
                    Some(limit) => body.limit(limit, state.clone()),
                    None => body,
                };
                body.watch(upstream.body_idle_timeout, state.clone())
            }
        };
        let mut req = Request::from_parts(parts, body);

        let proto = context.connection.scheme();
        let upgrade = headers::upgrade_protocol(&req);
        let from_http2 = req.version() == http::Version::HTTP_2;
        // As the client sent it, port included, before any header is removed: `host` is the
        // name routing uses (lowercased, no port).
        let forwarded_host = headers::forwarded_host(&req);
        let h = req.headers_mut();
        // `TE` is hop-by-hop, but an HTTP/2 upstream may get `te: trailers` (gRPC asks for it).
        let te_trailers = upstream.http2 && headers::accepts_trailers(h);
        if headers::remove_hop_by_hop_and_claims(h, !peer.trusted) == headers::TransferCoding::Other
        {
            return Err(GatewayError::TransferCodingNotSupported);
        }
        if te_trailers {
            h.insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        if from_http2 {
            headers::join_cookies(h);
        }
        if let Some(protocol) = &upgrade {
            headers::restore_upgrade(h, protocol.clone());
        }
        // Only now: a client's `Connection` may name any header, ours included, and what it
        // names is removed above.
        if let Some(key) = &verified {
            headers::set_identity(h, &key.identity);
        }
        headers::set_forwarded(h, &peer.forwarded_for, peer.trusted, proto, forwarded_host);
        h.insert(request_id::HEADER.clone(), request_id.clone());
        let sent = Instant::now();
        let result = match upgrade {
            None => {
                upstream
                    .send(req, client_body.as_deref(), &mut context.stream)
                    .await
            }
            Some(_) => {
                let hold = context.hold.take();
                let key_ends =
                    tunnel_key.map(|hash| self.key_ends(hash, route.scopes.clone(), client_ip));
                // Boxed: the upgrade's future is ~1 KB and rare; inline it would be part of
                // (and moved with) every request's future.
                Box::pin(upstream.send_upgrade(req, client_body.as_deref(), hold, key_ends)).await
            }
        };
        if let Some(h) = self.upstream_duration.get(route.upstream) {
            h.observe(sent.elapsed().as_secs_f64());
        }
        if result.is_err()
            && let Some(client_fault) = client_body.as_ref().and_then(|b| b.error())
        {
            return Err(client_fault);
        }
        result
    }

    /// The route's sources in order. Header sources before the first body source are tried
    /// without touching the body; then the body is peeked (once, whatever body sources the
    /// route lists: the `Content-Type` picks one); then the remaining header sources.
    async fn find_key<'p>(
        &self,
        route: &Route,
        parts: &'p Parts,
        incoming: Incoming,
    ) -> Result<Found<'p>, GatewayError> {
        let sources = &route.sources[..];
        let split = sources
            .iter()
            .position(|s| s.is_body())
            .unwrap_or(sources.len());
        let (before, after) = sources.split_at(split);
        if let Some(p) = credential::find(before, &self.names, &parts.headers, &parts.uri)? {
            return Ok(Found {
                key: p.key,
                body: ForwardBody::Direct(incoming),
                field: None,
            });
        }
        if after.is_empty() {
            return Err(CredentialError::Missing.into());
        }
        // Boxed: the peek's future is large, and inline it would be copied on every request,
        // header-key ones included.
        let peeked = Box::pin(body_key::peek(
            &route.body,
            after,
            &parts.headers,
            incoming,
            &self.peek_budget,
        ))
        .await?;
        let body = ForwardBody::from(peeked.body);
        if let Some(k) = peeked.key {
            if let Some(query) = parts.uri.query()
                && credential::form::query_names_a_field(query, &route.body.fields)
            {
                return Err(CredentialError::Ambiguous("API key body field").into());
            }
            return Ok(Found {
                key: Cow::Owned(k.value),
                body,
                field: k.strip,
            });
        }
        match credential::find(after, &self.names, &parts.headers, &parts.uri)? {
            Some(p) => Ok(Found {
                key: p.key,
                body,
                field: None,
            }),
            None if peeked.limit_reached => {
                Err(BodyError::NotWithinLimit(route.body.max_peek_bytes).into())
            }
            None => Err(match peeked.unreadable {
                Some(reason) => BodyError::Malformed(reason).into(),
                None => CredentialError::Missing.into(),
            }),
        }
    }

    /// Listener-wide address rules: deny wins, then the allow list when there is one.
    /// Resolves once the key with `hash` no longer passes (disabled, revoked, expired, its
    /// scopes or addresses narrowed): checked every `TUNNEL_KEY_CHECK`, from this thread's
    /// cache, which every change reaches at once. A store outage or an unreadable record says
    /// nothing against the key: the tunnel stays.
    fn key_ends(&self, hash: KeyHash, scopes: Vec<String>, client_ip: IpAddr) -> KeyEnds {
        let verifier = self.verifier.clone();
        Box::pin(async move {
            loop {
                tokio::time::sleep(TUNNEL_KEY_CHECK).await;
                let now = chrono::Utc::now();
                let valid = match verifier.reverify(&hash, now).await {
                    Ok(key) => policy::authorize(&key, &scopes, client_ip, now).is_ok(),
                    Err(VerifyError::StoreUnavailable | VerifyError::RecordUnreadable) => true,
                    Err(VerifyError::Unknown | VerifyError::Malformed(_)) => false,
                };
                if !valid {
                    return;
                }
            }
        })
    }

    /// A request that asks for another method (`X-HTTP-Method-Override: DELETE` on a POST, or
    /// `?_method=DELETE`, which Symfony, Laravel and Express's method-override read) runs as
    /// that method in Rails, Laravel, Express and others, but was routed by its own: it passes
    /// only when each method it names goes to the same route, whose scopes it was checked
    /// against. Frameworks read the name without regard to case, so keygate does.
    fn check_method_override(
        &self,
        headers: &http::HeaderMap,
        query: Option<&str>,
        route_index: usize,
        host: Option<&str>,
        path: &[u8],
    ) -> Result<(), GatewayError> {
        let same_route = |asked: &[u8]| {
            let asked = asked.trim_ascii().to_ascii_uppercase();
            let method =
                http::Method::from_bytes(&asked).map_err(|_| GatewayError::MethodOverride)?;
            match self.routes.find_index(&method, host, path) == Some(route_index) {
                true => Ok(()),
                false => Err(GatewayError::MethodOverride),
            }
        };
        for name in headers::METHOD_OVERRIDES {
            for value in headers.get_all(name) {
                same_route(value.as_bytes())?;
            }
        }
        for (name, value) in query
            .map(|q| form_urlencoded::parse(q.as_bytes()))
            .into_iter()
            .flatten()
        {
            if name == "_method" {
                same_route(value.as_bytes())?;
            }
        }
        Ok(())
    }

    fn check_network(&self, ip: IpAddr) -> Result<(), GatewayError> {
        if self.deny_ips.iter().any(|n| n.contains(&ip))
            || (!self.allow_ips.is_empty() && !self.allow_ips.iter().any(|n| n.contains(&ip)))
        {
            return Err(GatewayError::ClientIpDenied);
        }
        Ok(())
    }
}
