//! Who is calling the admin API, and what they may touch. Either the bootstrap token (from the
//! environment, compared in constant time: all teams, read and write) or a keygate key whose
//! scopes include `api_keys_read` (GET) / `api_keys_write` (changes). Admin keys obey the same
//! rules as any key (enabled, expiry, `allow_ips`), and a key bound to a team sees only that
//! team: everything else answers 404, as if it did not exist. A team's admin key also grants
//! no more than it holds ([`Held`]): no scope it lacks, no address outside its own
//! `allow_ips`, no life past its own expiry, on a key it creates or changes, and no value of a
//! key that holds more (rotate, reveal); Kubernetes RBAC's rule against escalation. Without
//! it, a team given an admin key to mint its own keys could mint any scope the gateway knows,
//! usable from anywhere, for ever. Among the team's people it stands where its user stands
//! ([`Standing`]): a `user` key, where the user it acts for does (owner, admin, member); a
//! `shared` key as a member, whoever it acts for, since keys for no one can be made by any
//! member and a removed member's shared keys move to an owner.

use super::error::AdminError;
use crate::auth::policy::{self, PolicyRefusal};
use crate::auth::record::KeyRecord;
use crate::auth::verified::VerifiedKey;
use crate::auth::verify::{Verifier, VerifyError};
use crate::store::Role;
use chrono::{DateTime, Utc};
use http::HeaderMap;
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use subtle::ConstantTimeEq;

/// An authenticated admin.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Admin key id, or `bootstrap`.
    pub actor_id: String,
    /// `Some(team)`: may only see and change that team.
    pub team: Option<String>,
    /// `Some`: the most this admin may grant (a team admin key's own limits); `None`:
    /// anything (the bootstrap token, an admin key bound to no team: the operator's).
    pub held: Option<Held>,
    /// The admin key's stored record, once a change has loaded it (`AdminApi::as_stored`).
    pub record: Option<KeyRecord>,
}

/// What a team's admin key holds, and so the most it may hand out.
#[derive(Debug, Clone)]
pub struct Held {
    pub scopes: Box<[Box<str>]>,
    /// Empty: any address.
    pub allow_ips: Box<[IpNet]>,
    /// `None`: never expires.
    pub expires: Option<DateTime<Utc>>,
}

impl Held {
    pub fn of(record: &KeyRecord) -> Self {
        Self {
            scopes: record
                .scope_names
                .iter()
                .map(|s| s.as_str().into())
                .collect(),
            allow_ips: record.allow_ips.clone().into(),
            expires: record.expires_time,
        }
    }
}

impl Admin {
    pub fn is_bootstrap(&self) -> bool {
        self.actor_id == BOOTSTRAP_ACTOR
    }

    /// Whether this admin may act on `team` (a key's or a path's team).
    pub fn may_access(&self, team: Option<&str>) -> bool {
        match &self.team {
            None => true,
            Some(own) => team == Some(own.as_str()),
        }
    }

    /// Whether this admin may grant every one of `scopes` (or hand out a key holding them).
    pub fn may_grant<'a>(
        &self,
        scopes: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), AdminError> {
        let Some(held) = &self.held else {
            return Ok(());
        };
        match scopes
            .into_iter()
            .find(|s| !held.scopes.iter().any(|h| **h == ***s))
        {
            Some(lacking) => Err(AdminError::ScopeNotGrantable(lacking.clone())),
            None => Ok(()),
        }
    }

    /// Whether this admin may hand out a key usable from `allow_ips` (empty: anywhere): each
    /// inside its own list, when it has one.
    pub fn may_grant_ips(&self, allow_ips: &[IpNet]) -> Result<(), AdminError> {
        let Some(held) = &self.held else {
            return Ok(());
        };
        if held.allow_ips.is_empty() {
            return Ok(());
        }
        if allow_ips.is_empty() {
            return Err(AdminError::LimitNotGrantable(
                "allow_ips: this admin key is limited to addresses, and so are the keys it hands out",
            ));
        }
        if allow_ips
            .iter()
            .all(|net| held.allow_ips.iter().any(|own| own.contains(net)))
        {
            Ok(())
        } else {
            Err(AdminError::LimitNotGrantable(
                "allow_ips: every entry must lie inside this admin key's own allow_ips",
            ))
        }
    }

    /// Whether this admin may hand out a key that expires at `expires` (`None`: never): not
    /// after itself.
    pub fn may_grant_expiry(&self, expires: Option<DateTime<Utc>>) -> Result<(), AdminError> {
        match (self.held.as_ref().and_then(|h| h.expires), expires) {
            (Some(_), None) => Err(AdminError::LimitNotGrantable(
                "expires_at: this admin key expires, and so must the keys it hands out",
            )),
            (Some(own), Some(at)) if at > own => Err(AdminError::LimitNotGrantable(
                "expires_at: not after this admin key's own expiry",
            )),
            _ => Ok(()),
        }
    }

    /// Whether this admin may hand out a key with `record`'s powers (its value: rotate,
    /// reveal; or any change to it but disabling).
    pub fn may_hand_out(&self, record: &KeyRecord) -> Result<(), AdminError> {
        self.may_grant(&record.scope_names)?;
        self.may_grant_ips(&record.allow_ips)?;
        self.may_grant_expiry(record.expires_time)
    }
}

/// Where a team's admin key stands among the team's people: the user it acts for, its role
/// (that user's for a `user` key, a member's for a `shared` one), and everyone's roles.
#[derive(Debug, Clone)]
pub struct Standing {
    pub user: Option<String>,
    pub role: Role,
    /// The team's members and their roles.
    pub roles: Vec<(String, Role)>,
}

impl Standing {
    fn role_of(&self, user: &str) -> Option<Role> {
        self.roles.iter().find(|(u, _)| u == user).map(|(_, r)| *r)
    }

    /// Whether this admin may create, change, rotate, reveal or delete a key acting for
    /// `user`: an owner's key for anyone in the team, an admin's for anyone but an owner, a
    /// member's only for itself.
    pub fn may_act_for(&self, user: Option<&str>) -> Result<(), AdminError> {
        let Some(user) = user.filter(|u| self.user.as_deref() != Some(*u)) else {
            return Ok(());
        };
        match self.role {
            Role::Owner => Ok(()),
            Role::Admin if self.role_of(user) != Some(Role::Owner) => Ok(()),
            Role::Admin => Err(AdminError::InsufficientRole(
                "only an owner's key manages keys that act for an owner",
            )),
            Role::Member => Err(AdminError::InsufficientRole(
                "a member's key manages only keys that act for that member or for no one",
            )),
        }
    }

    /// Whether this admin may change `user`'s membership to `new` (`None`: removed).
    pub fn may_manage_member(&self, user: &str, new: Option<Role>) -> Result<(), AdminError> {
        let current = self.role_of(user);
        match self.role {
            Role::Owner => Ok(()),
            Role::Admin if current != Some(Role::Owner) && new != Some(Role::Owner) => Ok(()),
            Role::Admin => Err(AdminError::InsufficientRole(
                "only an owner's key may make, change or remove an owner",
            )),
            Role::Member => Err(AdminError::InsufficientRole(
                "a member's key may not change the team's members",
            )),
        }
    }
}

/// The actor id of the bootstrap token (key ids start with `apk_`).
const BOOTSTRAP_ACTOR: &str = "bootstrap";

/// Minimum bootstrap token length, checked at start-up.
pub const MIN_BOOTSTRAP_LEN: usize = 16;

/// Whether `token` is the bootstrap token, in a time that tells nothing of either: their
/// SHA-256 digests compared in constant time. `ct_eq` on the values themselves answers at once
/// when the lengths differ, and so would tell the token's length to anyone who times it.
fn is_bootstrap_token(token: &[u8], expected: &[u8]) -> bool {
    Sha256::digest(token)
        .ct_eq(&Sha256::digest(expected))
        .into()
}

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
        && is_bootstrap_token(token.as_bytes(), expected)
    {
        return Ok(Admin {
            actor_id: BOOTSTRAP_ACTOR.into(),
            team: None,
            held: None,
            record: None,
        });
    }

    let key = verifier.verify(token, now).await.map_err(|e| match e {
        VerifyError::StoreUnavailable => AdminError::StoreUnavailable,
        VerifyError::RecordUnreadable => AdminError::KeyRecordUnreadable,
        VerifyError::Malformed(_) | VerifyError::Unknown => AdminError::InvalidCredential,
    })?;
    authorize(&key, client_ip, required_scope, now)?;
    Ok(Admin {
        actor_id: key.api_key_id.to_string(),
        team: key.team_id.as_deref().map(str::to_owned),
        held: key.team_id.is_some().then(|| Held {
            scopes: key.scope_names.clone(),
            allow_ips: key.allow_ips.clone(),
            expires: key.expires_time,
        }),
        record: None,
    })
}

/// The rules any key must pass (enabled, not expired, `client_ip` inside its `allow_ips`,
/// `required_scope` held), as admin answers.
fn authorize(
    key: &VerifiedKey,
    client_ip: IpAddr,
    required_scope: &'static str,
    now: DateTime<Utc>,
) -> Result<(), AdminError> {
    policy::authorize(key, &[required_scope.to_owned()], client_ip, now).map_err(|e| match e {
        PolicyRefusal::Disabled | PolicyRefusal::Expired => AdminError::InvalidCredential,
        PolicyRefusal::IpNotAllowed => AdminError::AddressNotAllowed,
        PolicyRefusal::ScopeMissing => AdminError::InsufficientScope(required_scope),
    })
}

/// [`authenticate`]'s rules applied to the admin key's stored record, rather than the copy the
/// verifier cached: one function for both, so a write is refused for whatever (and with the
/// same answer as) a fresh authentication would refuse it for.
pub fn authorize_stored(
    record: &KeyRecord,
    client_ip: IpAddr,
    required_scope: &'static str,
    now: DateTime<Utc>,
) -> Result<(), AdminError> {
    authorize(&VerifiedKey::from(record), client_ip, required_scope, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::*;

    fn standing(user: Option<&str>, role: Role) -> Standing {
        Standing {
            user: user.map(str::to_owned),
            role,
            roles: vec![
                ("own".into(), Owner),
                ("adm".into(), Admin),
                ("dev".into(), Member),
            ],
        }
    }

    #[test]
    fn the_bootstrap_token_matches_itself_only() {
        let long = "x".repeat(1000);
        for token in ["", "a", "bootstrap-token-for-tests-0123", long.as_str()] {
            assert!(
                is_bootstrap_token(token.as_bytes(), token.as_bytes()),
                "{token}"
            );
        }
        let expected = b"bootstrap-token-for-tests-0123";
        for other in [
            &b""[..],
            b"b",
            b"bootstrap-token-for-tests-012",
            b"bootstrap-token-for-tests-0124",
            b"bootstrap-token-for-tests-01234",
            b"Bootstrap-token-for-tests-0123",
            long.as_bytes(),
        ] {
            assert!(!is_bootstrap_token(other, expected), "{other:?}");
            assert!(!is_bootstrap_token(expected, other), "{other:?}");
        }
    }

    #[test]
    fn keys_act_for_whom_their_user_may() {
        let (owner, shared, admin, member) = (
            standing(Some("own"), Owner),
            standing(None, Owner),
            standing(Some("adm"), Admin),
            standing(Some("dev"), Member),
        );
        for s in [&owner, &shared, &admin, &member] {
            assert!(s.may_act_for(None).is_ok());
        }
        assert!(member.may_act_for(Some("dev")).is_ok());
        assert!(member.may_act_for(Some("adm")).is_err());
        assert!(member.may_act_for(Some("own")).is_err());
        assert!(admin.may_act_for(Some("dev")).is_ok());
        assert!(admin.may_act_for(Some("adm")).is_ok());
        assert!(admin.may_act_for(Some("own")).is_err());
        for s in [&owner, &shared] {
            for u in ["own", "adm", "dev", "new"] {
                assert!(s.may_act_for(Some(u)).is_ok(), "{u}");
            }
        }
    }

    #[test]
    fn only_owners_touch_owners_and_members_touch_no_one() {
        let (owner, admin, member) = (
            standing(None, Owner),
            standing(Some("adm"), Admin),
            standing(Some("dev"), Member),
        );
        for (user, new) in [
            ("new", Some(Owner)),
            ("own", None),
            ("own", Some(Member)),
            ("dev", Some(Owner)),
        ] {
            assert!(owner.may_manage_member(user, new).is_ok());
            assert!(admin.may_manage_member(user, new).is_err());
            assert!(member.may_manage_member(user, new).is_err());
        }
        for (user, new) in [
            ("new", Some(Member)),
            ("new", Some(Admin)),
            ("adm", None),
            ("dev", Some(Admin)),
        ] {
            assert!(admin.may_manage_member(user, new).is_ok());
            assert!(member.may_manage_member(user, new).is_err());
        }
    }
}
