//! Who is calling the admin API, and what they may touch. Either the bootstrap token (from the
//! environment, compared in constant time: all teams, read and write) or a keygate key whose
//! scopes include `api_keys_read` (GET) / `api_keys_write` (changes). Admin keys obey the same
//! rules as any key (enabled, expiry, `allow_ips`), and a key bound to a team sees only that
//! team: everything else answers 404, as if it did not exist.

use super::error::AdminError;
use crate::auth::policy::{self, PolicyRefusal};
use crate::auth::verify::{Verifier, VerifyError};
use chrono::{DateTime, Utc};
use http::HeaderMap;
use std::net::IpAddr;
use subtle::ConstantTimeEq;

/// An authenticated admin.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Admin key id, or `bootstrap`.
    pub actor_id: String,
    /// `Some(team)`: may only see and change that team.
    pub team: Option<String>,
}

impl Admin {
    /// Whether this admin may act on `team` (a key's or a path's team).
    pub fn may_access(&self, team: Option<&str>) -> bool {
        match &self.team {
            None => true,
            Some(own) => team == Some(own.as_str()),
        }
    }
}

/// Minimum bootstrap token length, checked at start-up.
pub const MIN_BOOTSTRAP_LEN: usize = 16;

pub async fn authenticate(
    headers: &HeaderMap,
    bootstrap: Option<&[u8]>,
    verifier: &Verifier,
    client_ip: IpAddr,
    required_scope: &'static str,
    now: DateTime<Utc>,
) -> Result<Admin, AdminError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(AdminError::Unauthenticated);
    };
    if values.next().is_some() {
        return Err(AdminError::bad(
            "Authorization",
            "more than one Authorization header",
        ));
    }
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or(AdminError::Unauthenticated)?;

    if let Some(expected) = bootstrap
        && bool::from(token.as_bytes().ct_eq(expected))
    {
        return Ok(Admin {
            actor_id: "bootstrap".into(),
            team: None,
        });
    }

    let key = verifier.verify(token, now).await.map_err(|e| match e {
        VerifyError::StoreUnavailable => AdminError::StoreUnavailable,
        VerifyError::Malformed(_) | VerifyError::Unknown => AdminError::InvalidCredential,
    })?;
    policy::authorize(&key, &[required_scope.to_owned()], client_ip, now).map_err(|e| match e {
        PolicyRefusal::Disabled | PolicyRefusal::Expired => AdminError::InvalidCredential,
        PolicyRefusal::IpNotAllowed => AdminError::AddressNotAllowed,
        PolicyRefusal::ScopeMissing => AdminError::InsufficientScope(required_scope),
    })?;
    Ok(Admin {
        actor_id: key.api_key_id.to_string(),
        team: key.team_id.as_deref().map(str::to_owned),
    })
}
