//! Every way an admin request can fail, and its answer: status and error code (the seeds'
//! codes where they exist). The one place where admin errors become HTTP; the match is
//! exhaustive on purpose.

use crate::keys::KeyError;
use crate::store::StoreError;
use http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("authentication required: send Authorization: Bearer <admin key or token>")]
    Unauthenticated,
    #[error("the admin credential is not valid")]
    InvalidCredential,
    #[error("this key lacks the {0} scope")]
    InsufficientScope(&'static str),
    #[error("a team's admin key grants only scopes it holds itself, and it lacks {0:?}")]
    ScopeNotGrantable(String),
    #[error("{0}")]
    InsufficientRole(&'static str),
    #[error("{0}")]
    LimitNotGrantable(&'static str),
    #[error("this key may not be used from this address")]
    AddressNotAllowed,
    #[error("no such endpoint")]
    NoEndpoint,
    #[error("method not allowed here")]
    MethodNotAllowed(&'static str),
    #[error("no team {0:?}")]
    TeamNotFound(String),
    #[error("{field}: {message}")]
    BadRequest { field: String, message: String },
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// What was wrong with the `Content-Type` or `Content-Encoding`.
    #[error("the request body must be JSON (Content-Type: application/json): {0}")]
    UnsupportedMediaType(String),
    #[error("the key store is unavailable; retry shortly")]
    StoreUnavailable,
    #[error("the admin key's stored record cannot be read")]
    KeyRecordUnreadable,
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl AdminError {
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        AdminError::BadRequest {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Status and code. Internal failures are logged by the caller and shown opaquely.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            AdminError::Unauthenticated => (S::UNAUTHORIZED, "UNAUTHENTICATED"),
            AdminError::InvalidCredential => (S::UNAUTHORIZED, "INVALID_CREDENTIAL"),
            AdminError::InsufficientScope(_)
            | AdminError::ScopeNotGrantable(_)
            | AdminError::LimitNotGrantable(_) => (S::FORBIDDEN, "INSUFFICIENT_SCOPE"),
            AdminError::InsufficientRole(_) => (S::FORBIDDEN, "INSUFFICIENT_ROLE"),
            AdminError::AddressNotAllowed => (S::FORBIDDEN, "API_KEY_IP_NOT_ALLOWED"),
            AdminError::NoEndpoint => (S::NOT_FOUND, "NOT_FOUND"),
            AdminError::MethodNotAllowed(_) => (S::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            AdminError::TeamNotFound(_) => (S::NOT_FOUND, "TEAM_NOT_FOUND"),
            AdminError::BadRequest { .. } => (S::BAD_REQUEST, "INVALID_REQUEST"),
            AdminError::BodyTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "BODY_TOO_LARGE"),
            AdminError::BodyTimeout(_) => (S::REQUEST_TIMEOUT, "BODY_TIMEOUT"),
            AdminError::UnsupportedMediaType(_) => {
                (S::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE")
            }
            AdminError::StoreUnavailable => (S::SERVICE_UNAVAILABLE, "STORE_UNAVAILABLE"),
            AdminError::KeyRecordUnreadable => (S::INTERNAL_SERVER_ERROR, "KEY_RECORD_UNREADABLE"),
            AdminError::Key(e) => match e {
                KeyError::NotFound => (S::NOT_FOUND, "API_KEY_NOT_FOUND"),
                KeyError::LimitExceeded { .. } => (S::FORBIDDEN, "API_KEY_LIMIT_EXCEEDED"),
                KeyError::ScopeInvalid(_) => (S::BAD_REQUEST, "API_KEY_SCOPE_NAME_INVALID"),
                KeyError::AllowIpInvalid(_) => (S::BAD_REQUEST, "API_KEY_ALLOW_IP_INVALID"),
                KeyError::UserInvalid(_) => (S::BAD_REQUEST, "API_KEY_USER_INVALID"),
                KeyError::MemberNotFound { .. } => (S::NOT_FOUND, "MEMBER_NOT_FOUND"),
                KeyError::Invalid { .. } => (S::BAD_REQUEST, "INVALID_REQUEST"),
                KeyError::ChangedMeanwhile => (S::CONFLICT, "API_KEY_CHANGED"),
                KeyError::Store(StoreError::Unavailable(_) | StoreError::Conflict) => {
                    (S::SERVICE_UNAVAILABLE, "STORE_UNAVAILABLE")
                }
                KeyError::Store(StoreError::Denied(_)) => {
                    (S::INTERNAL_SERVER_ERROR, "STORE_PERMISSION_DENIED")
                }
                KeyError::Store(StoreError::Indeterminate(_)) => {
                    (S::SERVICE_UNAVAILABLE, "STORE_OUTCOME_UNKNOWN")
                }
                KeyError::Store(
                    StoreError::NotFound
                    | StoreError::LimitExceeded { .. }
                    | StoreError::Corrupt(_),
                ) => (S::INTERNAL_SERVER_ERROR, "API_KEY_UPDATE_FAILED"),
            },
        }
    }

    /// The message shown to the client: internal details stay in the log.
    pub fn public_message(&self) -> String {
        match self {
            AdminError::Key(KeyError::Store(StoreError::Unavailable(_) | StoreError::Conflict)) => {
                "the key store is unavailable; retry shortly".into()
            }
            AdminError::Key(KeyError::Store(StoreError::Denied(_))) => {
                "the key store's user may not run a command keygate needs; nothing was changed \
                 (the log names the command)"
                    .into()
            }
            AdminError::Key(KeyError::Store(StoreError::Indeterminate(_))) => {
                "the key store did not confirm whether the change was made: GET the key (or \
                 list the keys, after a create) to see whether it was before retrying (the log \
                 says why)"
                    .into()
            }
            AdminError::Key(KeyError::Store(_)) => {
                "the key could not be updated because of an internal error; retry".into()
            }
            other => other.to_string(),
        }
    }

    pub fn is_internal(&self) -> bool {
        self.status_and_code().0.is_server_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_codes_and_statuses() {
        let cases: Vec<(AdminError, u16, &str)> = vec![
            (KeyError::NotFound.into(), 404, "API_KEY_NOT_FOUND"),
            (
                AdminError::BodyTimeout(std::time::Duration::from_secs(1)),
                408,
                "BODY_TIMEOUT",
            ),
            (
                KeyError::LimitExceeded { limit: 5 }.into(),
                403,
                "API_KEY_LIMIT_EXCEEDED",
            ),
            (
                KeyError::ScopeInvalid("x".into()).into(),
                400,
                "API_KEY_SCOPE_NAME_INVALID",
            ),
            (
                KeyError::AllowIpInvalid("x".into()).into(),
                400,
                "API_KEY_ALLOW_IP_INVALID",
            ),
            (
                KeyError::UserInvalid("x".into()).into(),
                400,
                "API_KEY_USER_INVALID",
            ),
            (
                KeyError::Store(StoreError::Corrupt("x".into())).into(),
                500,
                "API_KEY_UPDATE_FAILED",
            ),
            (AdminError::bad("name", "too long"), 400, "INVALID_REQUEST"),
            (AdminError::TeamNotFound("t".into()), 404, "TEAM_NOT_FOUND"),
            (KeyError::ChangedMeanwhile.into(), 409, "API_KEY_CHANGED"),
            (
                KeyError::Store(StoreError::Denied("NOPERM publish".into())).into(),
                500,
                "STORE_PERMISSION_DENIED",
            ),
            (
                KeyError::Store(StoreError::Indeterminate("no answer".into())).into(),
                503,
                "STORE_OUTCOME_UNKNOWN",
            ),
        ];
        for (e, status, code) in cases {
            let (s, c) = e.status_and_code();
            assert_eq!((s.as_u16(), c), (status, code), "{e:?}");
        }
    }

    /// Every code `status_and_code` answers with (read from this file's source, so a new one
    /// cannot be missed) is in the `Error.code` enum of `docs/openapi.yaml`, which
    /// schemathesis checks every error answer against.
    #[test]
    fn every_code_is_in_the_spec() {
        let source = include_str!("error.rs");
        let mapping = &source
            [source.find("fn status_and_code").unwrap()..source.find("fn public_message").unwrap()];
        let codes: Vec<&str> = mapping
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|c| c.len() > 3 && c.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .collect();
        assert!(codes.len() > 15, "{codes:?}");
        let spec = include_str!("../../docs/openapi.yaml");
        let code_schema = &spec[spec.find("\n    Error:\n      type: object").unwrap()..];
        let listed: Vec<&str> = code_schema
            .lines()
            .skip_while(|l| l.trim() != "enum:")
            .skip(1)
            .map_while(|l| l.trim().strip_prefix("- "))
            .collect();
        for code in &codes {
            assert!(
                listed.contains(code),
                "{code} is not in Error.code in docs/openapi.yaml ({listed:?})"
            );
        }
        for code in &listed {
            assert!(
                codes.contains(code),
                "docs/openapi.yaml lists {code}, never answered"
            );
        }
    }

    /// Review: a write refused partway, or whose answer was lost, was answered "nothing was
    /// changed" or "retry shortly" although it had been applied.
    #[test]
    fn an_unknown_outcome_is_not_said_to_have_changed_nothing() {
        let e: AdminError = KeyError::Store(StoreError::Indeterminate("timeout".into())).into();
        let said = e.public_message();
        assert!(!said.contains("nothing was changed"), "{said}");
        assert!(!said.contains("retry shortly"), "{said}");
        assert!(said.contains("GET the key"), "{said}");
    }

    #[test]
    fn internal_details_are_not_shown() {
        let e: AdminError = KeyError::Store(StoreError::Corrupt("row 7 bad json".into())).into();
        assert!(!e.public_message().contains("row 7"));
    }
}
