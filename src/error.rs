//! Every way a proxied request can fail, and the one place where each becomes an HTTP answer
//! (status, RFC 6750 challenge, JSON body), an outcome label for logs and metrics. The `match`
//! is exhaustive on purpose: a new failure cannot ship without deciding its answer.

use crate::auth::policy::PolicyRefusal;
use crate::auth::verify::VerifyError;
use crate::credential::CredentialError;
use crate::credential::body::{BodyError, PeekError};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches this request")]
    NoRoute,
    #[error(transparent)]
    Path(#[from] crate::request_path::PathError),
    #[error(transparent)]
    Host(#[from] crate::route::HostError),
    /// More header fields than `max_headers` over HTTP/2 (hyper answers HTTP/1.1's itself).
    #[error("more header fields than max_headers")]
    TooManyHeaders,
    /// A transfer coding other than `chunked` (RFC 9112 §6.1: 501): hyper would not undo it,
    /// and the upstream would get the coded bytes as the body.
    #[error("a transfer coding other than chunked")]
    TransferCodingNotSupported,
    /// The request names another method (`X-HTTP-Method-Override`…) that is not a method, or
    /// that another route than its own governs.
    #[error("a method override names a method another route governs")]
    MethodOverride,
    /// `CONNECT` asks for a tunnel, which a reverse proxy does not open.
    #[error("CONNECT is not supported")]
    ConnectNotSupported,
    #[error("the client address is not allowed")]
    ClientIpDenied,
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Policy(#[from] PolicyRefusal),
    #[error("the request body is larger than this route allows")]
    BodyTooLarge,
    /// The client's body failed on its way upstream, after any key check (bad chunked framing,
    /// trailers over the limits, the client gone mid-body): its fault, not the upstream's.
    #[error("the request body broke off on its way upstream")]
    BodyBroken,
    /// The body bytes held by key peeks across the process are at `proxy.max_peek_total_bytes`:
    /// this request's peek would take them over.
    #[error("too many request bodies are being read for their API key")]
    PeekBudgetExhausted,
    #[error("the upstream cannot be reached")]
    UpstreamUnavailable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// The upstream answered, but its response head could not be read: over keygate's limits
    /// (more than 100 header fields, or larger than the read buffer) or malformed. Not that it
    /// cannot be reached: retrying elsewhere will not help, the upstream's answer must change.
    #[error("the upstream's response head is too large or malformed")]
    UpstreamBadResponse,
    /// Every connection the upstream's `max_connections` allows was in use, and none came free
    /// within its `connect_timeout`.
    #[error("the upstream's connection limit is reached")]
    UpstreamBusy,
}

impl From<PeekError> for GatewayError {
    fn from(e: PeekError) -> Self {
        match e {
            PeekError::Credential(c) => GatewayError::Credential(c),
            PeekError::Body(b) => GatewayError::Body(b),
            PeekError::Busy => GatewayError::PeekBudgetExhausted,
        }
    }
}

/// What happened to a request, as a low-cardinality label for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    NoRoute,
    BadRequest,
    /// The client was too slow sending what the gateway had to read.
    ClientTimeout,
    Unauthenticated,
    Forbidden,
    StoreUnavailable,
    /// Keygate's own fault, not the client's nor a dependency being down (an unreadable key
    /// record).
    InternalError,
    UpstreamError,
    /// The upstream's response head could not be read (too large or malformed): 502
    /// `UPSTREAM_BAD_RESPONSE`, apart from `upstream_error` so it is not taken for an outage.
    UpstreamBadResponse,
    /// Refused because keygate is at a process-wide limit (`proxy.max_peek_total_bytes`); the
    /// client may retry.
    Overloaded,
    /// The client closed its connection before the answer was ready (nginx's 499).
    ClientClosed,
    /// Keygate closed the connection before the answer was ready: the drain timeout ran out
    /// at shutdown (nginx's 444, "closed without a response").
    DrainCutOff,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::NoRoute => "no_route",
            Outcome::BadRequest => "bad_request",
            Outcome::ClientTimeout => "client_timeout",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Forbidden => "forbidden",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::InternalError => "internal_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamBadResponse => "upstream_bad_response",
            Outcome::Overloaded => "overloaded",
            Outcome::ClientClosed => "client_closed",
            Outcome::DrainCutOff => "drain_cut_off",
        }
    }
}

/// The pieces of an answer before it is written out.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: &'static str,
    /// RFC 6750 `error=` value, when the answer carries a Bearer challenge.
    pub challenge: Option<Challenge>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// No credential at all: RFC 6750 §3.1 says the challenge carries no error code.
    Bare,
    InvalidRequest,
    InvalidToken,
    InsufficientScope,
}

/// `reveal_reason`: whether disabled/expired keys are told apart from unknown ones.
pub fn classify(err: &GatewayError, reveal_reason: bool) -> Answer {
    use Challenge::*;
    use StatusCode as S;
    let a = |status, code, message, challenge, outcome| Answer {
        status,
        code,
        message,
        challenge,
        outcome,
    };
    let invalid = || {
        a(
            S::UNAUTHORIZED,
            "API_KEY_INVALID",
            "the API key is not valid",
            Some(InvalidToken),
            Outcome::Unauthenticated,
        )
    };
    match err {
        GatewayError::NoRoute => a(
            S::NOT_FOUND,
            "ROUTE_NOT_FOUND",
            "no route matches this request",
            None,
            Outcome::NoRoute,
        ),
        GatewayError::Path(_) => a(
            S::BAD_REQUEST,
            "PATH_NOT_CANONICAL",
            "the path has dot or empty segments, `;` parameters, a backslash, an encoded `/`, `\\` or `%`, or a control character: upstreams read such paths differently",
            None,
            Outcome::BadRequest,
        ),
        GatewayError::Host(e) => a(
            S::BAD_REQUEST,
            "HOST_INVALID",
            match e {
                crate::route::HostError::Repeated => "the request has more than one Host header",
                crate::route::HostError::Invalid => {
                    "the Host header is not a host name or address with an optional port"
                }
                crate::route::HostError::Missing => "an HTTP/1.1 request needs a Host header",
            },
            None,
            Outcome::BadRequest,
        ),
        GatewayError::TooManyHeaders => a(
            S::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "REQUEST_HEADERS_TOO_MANY",
            "the request has more header fields than this gateway accepts",
            None,
            Outcome::BadRequest,
        ),
        GatewayError::TransferCodingNotSupported => a(
            S::NOT_IMPLEMENTED,
            "TRANSFER_CODING_NOT_SUPPORTED",
            "only the chunked transfer coding is supported",
            None,
            Outcome::BadRequest,
        ),
        GatewayError::MethodOverride => a(
            S::BAD_REQUEST,
            "METHOD_OVERRIDE_NOT_ALLOWED",
            "X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override or the _method query parameter names a method that is not one, or that another route governs: send the request with that method",
            None,
            Outcome::BadRequest,
        ),
        GatewayError::ConnectNotSupported => a(
            S::NOT_IMPLEMENTED,
            "METHOD_NOT_SUPPORTED",
            "CONNECT is not supported: keygate is a reverse proxy, not a tunnel",
            None,
            Outcome::BadRequest,
        ),
        GatewayError::ClientIpDenied => a(
            S::FORBIDDEN,
            "CLIENT_IP_DENIED",
            "requests from this address are not allowed",
            None,
            Outcome::Forbidden,
        ),
        GatewayError::Credential(CredentialError::Missing) => a(
            S::UNAUTHORIZED,
            "API_KEY_MISSING",
            "an API key is required",
            Some(Bare),
            Outcome::Unauthenticated,
        ),
        GatewayError::Credential(CredentialError::Malformed(_)) => a(
            S::UNAUTHORIZED,
            "API_KEY_MALFORMED",
            "the API key is malformed",
            Some(InvalidToken),
            Outcome::Unauthenticated,
        ),
        GatewayError::Credential(CredentialError::Ambiguous(_)) => a(
            S::BAD_REQUEST,
            "API_KEY_AMBIGUOUS",
            "the request carries more than one API key in the same place",
            Some(InvalidRequest),
            Outcome::BadRequest,
        ),
        // The reason is a fixed text naming what is wrong (never a piece of the body), so it
        // is safe and useful to show.
        GatewayError::Body(BodyError::Malformed(reason)) => a(
            S::BAD_REQUEST,
            "BODY_MALFORMED",
            reason,
            Some(InvalidRequest),
            Outcome::BadRequest,
        ),
        GatewayError::Body(BodyError::Unreadable) => a(
            S::BAD_REQUEST,
            "BODY_MALFORMED",
            "the request body could not be read to the end",
            Some(InvalidRequest),
            Outcome::BadRequest,
        ),
        // Same code as any missing key (clients need no new case); the message says where
        // keygate stopped looking.
        GatewayError::Body(BodyError::NotWithinLimit(_)) => a(
            S::UNAUTHORIZED,
            "API_KEY_MISSING",
            "an API key is required; none was found in the headers or in the part of the body \
             keygate reads (put the key field first)",
            Some(Bare),
            Outcome::Unauthenticated,
        ),
        GatewayError::Body(BodyError::TooLongToStrip(_)) => a(
            S::PAYLOAD_TOO_LARGE,
            "BODY_TOO_LARGE",
            "this route strips the API key field, which needs the whole form body within its \
             max_peek_bytes",
            Some(InvalidRequest),
            Outcome::BadRequest,
        ),
        GatewayError::Body(BodyError::Timeout) => a(
            S::REQUEST_TIMEOUT,
            "REQUEST_TIMEOUT",
            "the request body did not arrive in time",
            None,
            Outcome::ClientTimeout,
        ),
        GatewayError::Verify(VerifyError::Malformed(_)) => a(
            S::UNAUTHORIZED,
            "API_KEY_MALFORMED",
            "the API key is malformed",
            Some(InvalidToken),
            Outcome::Unauthenticated,
        ),
        GatewayError::Verify(VerifyError::Unknown) => invalid(),
        GatewayError::Verify(VerifyError::StoreUnavailable) => a(
            S::SERVICE_UNAVAILABLE,
            "STORE_UNAVAILABLE",
            "the key store is unavailable; retry shortly",
            None,
            Outcome::StoreUnavailable,
        ),
        // Not 401: the key may be perfectly good, and a client told its key is invalid would
        // drop it. Not 503: retrying does not help until the record is fixed.
        GatewayError::Verify(VerifyError::RecordUnreadable) => a(
            S::INTERNAL_SERVER_ERROR,
            "KEY_RECORD_UNREADABLE",
            "the API key's stored record cannot be read; the gateway's operators must fix it",
            None,
            Outcome::InternalError,
        ),
        GatewayError::Policy(PolicyRefusal::Disabled) if reveal_reason => a(
            S::UNAUTHORIZED,
            "API_KEY_DISABLED",
            "the API key is disabled",
            Some(InvalidToken),
            Outcome::Unauthenticated,
        ),
        GatewayError::Policy(PolicyRefusal::Expired) if reveal_reason => a(
            S::UNAUTHORIZED,
            "API_KEY_EXPIRED",
            "the API key has expired",
            Some(InvalidToken),
            Outcome::Unauthenticated,
        ),
        GatewayError::Policy(PolicyRefusal::Disabled | PolicyRefusal::Expired) => invalid(),
        GatewayError::Policy(PolicyRefusal::IpNotAllowed) => a(
            S::FORBIDDEN,
            "API_KEY_IP_NOT_ALLOWED",
            "the API key may not be used from this address",
            Some(InsufficientScope),
            Outcome::Forbidden,
        ),
        GatewayError::Policy(PolicyRefusal::ScopeMissing) => a(
            S::FORBIDDEN,
            "API_KEY_SCOPE_INSUFFICIENT",
            "the API key lacks a scope this route requires",
            Some(InsufficientScope),
            Outcome::Forbidden,
        ),
        GatewayError::BodyTooLarge => a(
            S::PAYLOAD_TOO_LARGE,
            "BODY_TOO_LARGE",
            "the request body is larger than this route allows",
            None,
            Outcome::BadRequest,
        ),
        // No challenge: the key, if the route wants one, was not the problem.
        GatewayError::BodyBroken => a(
            S::BAD_REQUEST,
            "BODY_MALFORMED",
            "the request body could not be read to the end",
            None,
            Outcome::BadRequest,
        ),
        // 503 (with `Retry-After: 1`): the request is fine and a retry soon is likely to pass.
        // No challenge: the key was not looked at.
        GatewayError::PeekBudgetExhausted => a(
            S::SERVICE_UNAVAILABLE,
            "GATEWAY_BUSY",
            "the gateway is reading as many request bodies for their API key as it may; retry \
             shortly, or send the key in a header",
            None,
            Outcome::Overloaded,
        ),
        GatewayError::UpstreamUnavailable => a(
            S::BAD_GATEWAY,
            "UPSTREAM_UNAVAILABLE",
            "the upstream service cannot be reached",
            None,
            Outcome::UpstreamError,
        ),
        GatewayError::UpstreamBadResponse => a(
            S::BAD_GATEWAY,
            "UPSTREAM_BAD_RESPONSE",
            "the upstream's response head is too large or malformed",
            None,
            Outcome::UpstreamBadResponse,
        ),
        GatewayError::UpstreamTimeout => a(
            S::GATEWAY_TIMEOUT,
            "UPSTREAM_TIMEOUT",
            "the upstream service did not answer in time",
            None,
            Outcome::UpstreamError,
        ),
        // 503 with Retry-After: keygate is fine and the upstream may be too; it is only busy
        // (the connection cap protects keygate's file descriptors, for every other upstream).
        GatewayError::UpstreamBusy => a(
            S::SERVICE_UNAVAILABLE,
            "UPSTREAM_BUSY",
            "every connection keygate may open to the upstream service is in use; retry shortly",
            None,
            Outcome::UpstreamError,
        ),
    }
}

/// The JSON envelope shared with the admin API.
pub fn json_error_body(request_id: &str, code: &str, message: &str) -> Bytes {
    let body = serde_json::json!({
        "meta": { "request_id": request_id },
        "error": { "code": code, "message": message },
    });
    Bytes::from(body.to_string())
}

/// Writes an answer. `scopes` fills the `scope=` of an insufficient-scope challenge.
pub fn render(
    answer: &Answer,
    realm: &str,
    request_id: &str,
    scopes: &[String],
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(json_error_body(
        request_id,
        answer.code,
        answer.message,
    )));
    *resp.status_mut() = answer.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(challenge) = answer.challenge {
        let mut value = format!("Bearer realm=\"{realm}\"");
        match challenge {
            Challenge::Bare => {}
            Challenge::InvalidRequest => value.push_str(", error=\"invalid_request\""),
            Challenge::InvalidToken => value.push_str(", error=\"invalid_token\""),
            Challenge::InsufficientScope => {
                value.push_str(", error=\"insufficient_scope\"");
                if !scopes.is_empty() {
                    value.push_str(&format!(", scope=\"{}\"", scopes.join(" ")));
                }
            }
        }
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
    }
    if answer.status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::key::KeyFormatError;

    #[test]
    fn refusals_map_to_rfc6750_answers() {
        let cases: Vec<(GatewayError, u16, &str, Option<Challenge>)> = vec![
            (
                CredentialError::Missing.into(),
                401,
                "API_KEY_MISSING",
                Some(Challenge::Bare),
            ),
            (
                VerifyError::Malformed(KeyFormatError::BadChecksum).into(),
                401,
                "API_KEY_MALFORMED",
                Some(Challenge::InvalidToken),
            ),
            (
                VerifyError::Unknown.into(),
                401,
                "API_KEY_INVALID",
                Some(Challenge::InvalidToken),
            ),
            (
                PolicyRefusal::Disabled.into(),
                401,
                "API_KEY_INVALID",
                Some(Challenge::InvalidToken),
            ),
            (
                PolicyRefusal::Expired.into(),
                401,
                "API_KEY_INVALID",
                Some(Challenge::InvalidToken),
            ),
            (
                PolicyRefusal::IpNotAllowed.into(),
                403,
                "API_KEY_IP_NOT_ALLOWED",
                Some(Challenge::InsufficientScope),
            ),
            (
                PolicyRefusal::ScopeMissing.into(),
                403,
                "API_KEY_SCOPE_INSUFFICIENT",
                Some(Challenge::InsufficientScope),
            ),
            (
                VerifyError::StoreUnavailable.into(),
                503,
                "STORE_UNAVAILABLE",
                None,
            ),
            (
                VerifyError::RecordUnreadable.into(),
                500,
                "KEY_RECORD_UNREADABLE",
                None,
            ),
            (
                GatewayError::UpstreamUnavailable,
                502,
                "UPSTREAM_UNAVAILABLE",
                None,
            ),
            (GatewayError::UpstreamTimeout, 504, "UPSTREAM_TIMEOUT", None),
            (
                GatewayError::UpstreamBadResponse,
                502,
                "UPSTREAM_BAD_RESPONSE",
                None,
            ),
            (GatewayError::UpstreamBusy, 503, "UPSTREAM_BUSY", None),
            (PeekError::Busy.into(), 503, "GATEWAY_BUSY", None),
            (GatewayError::NoRoute, 404, "ROUTE_NOT_FOUND", None),
            (
                BodyError::Malformed("a multipart part is truncated").into(),
                400,
                "BODY_MALFORMED",
                Some(Challenge::InvalidRequest),
            ),
            (
                BodyError::Unreadable.into(),
                400,
                "BODY_MALFORMED",
                Some(Challenge::InvalidRequest),
            ),
            (GatewayError::BodyBroken, 400, "BODY_MALFORMED", None),
            (
                BodyError::NotWithinLimit(65536).into(),
                401,
                "API_KEY_MISSING",
                Some(Challenge::Bare),
            ),
            (BodyError::Timeout.into(), 408, "REQUEST_TIMEOUT", None),
            (
                PeekError::Credential(CredentialError::Ambiguous("API key body field")).into(),
                400,
                "API_KEY_AMBIGUOUS",
                Some(Challenge::InvalidRequest),
            ),
            (
                PeekError::Credential(CredentialError::Malformed("empty API key body field"))
                    .into(),
                401,
                "API_KEY_MALFORMED",
                Some(Challenge::InvalidToken),
            ),
        ];
        for (err, status, code, challenge) in cases {
            let a = classify(&err, false);
            assert_eq!(
                (a.status.as_u16(), a.code, a.challenge),
                (status, code, challenge),
                "{err:?}"
            );
        }
    }

    #[test]
    fn body_answers_name_the_problem_and_the_outcome() {
        let a = classify(
            &BodyError::Malformed("a multipart part is truncated").into(),
            false,
        );
        assert_eq!(a.message, "a multipart part is truncated");
        assert_eq!(a.outcome, Outcome::BadRequest);
        let a = classify(&BodyError::Timeout.into(), false);
        assert_eq!(a.outcome.as_str(), "client_timeout");
        let r = render(&a, "keygate", "req-1", &[]);
        assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
        assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());
        let a = classify(&BodyError::NotWithinLimit(1024).into(), false);
        assert!(a.message.contains("part of the body"), "{}", a.message);
        assert_eq!(a.outcome, Outcome::Unauthenticated);
    }

    #[test]
    fn reasons_are_revealed_only_when_enabled() {
        assert_eq!(
            classify(&PolicyRefusal::Disabled.into(), true).code,
            "API_KEY_DISABLED"
        );
        assert_eq!(
            classify(&PolicyRefusal::Expired.into(), true).code,
            "API_KEY_EXPIRED"
        );
    }

    #[test]
    fn rendered_answer_has_challenge_body_and_retry() {
        let a = classify(&PolicyRefusal::ScopeMissing.into(), false);
        let r = render(&a, "keygate", "req-1", &["write".into()]);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"write\""
        );
        let a = classify(&VerifyError::StoreUnavailable.into(), false);
        let r = render(&a, "keygate", "req-1", &[]);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let a = classify(&PeekError::Busy.into(), false);
        assert_eq!(a.outcome.as_str(), "overloaded");
        let r = render(&a, "keygate", "req-1", &[]);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());
    }
}
