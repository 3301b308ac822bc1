//! Who is calling the admin API, and what they may touch. Either the bootstrap token (from the
//! environment, compared in constant time: all teams, read and write) or a keygate key whose
//! scopes include `api_keys_read` (GET) / `api_keys_write` (changes). Admin keys obey the same
//! rules as any key (enabled, expiry, `allow_ips`), and a key bound to a team sees only that
//! team: everything else answers 404, as if it did not exist. A team's admin key also grants
//! no more than it holds: no scope it lacks on a key it creates or changes, and no value of a
//! key that holds more (rotate, reveal); Kubernetes RBAC's rule against escalation. Without
//! it, a team given an admin key to mint its own keys could mint any scope the gateway knows.
//! Among the team's people it stands where the user it acts for stands ([`Standing`]): a
//! member's key manages only keys acting for that member (or for no one) and no members; an
//! admin's makes no owner and touches none; an owner's (or a shared key's, which acts for the
//! team) may do everything in the team.

use super::error::AdminError;
use crate::auth::policy::{self, PolicyRefusal};
use crate::auth::verify::{Verifier, VerifyError};
use crate::store::Role;
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
    /// `Some`: the most this admin may grant (a team admin key's own scopes); `None`: any
    /// scope (the bootstrap token, an admin key bound to no team: the operator's).
    pub grantable: Option<Box<[Box<str>]>>,
}

impl Admin {
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
        let Some(held) = &self.grantable else {
            return Ok(());
        };
        match scopes
            .into_iter()
            .find(|s| !held.iter().any(|h| **h == ***s))
        {
            Some(lacking) => Err(AdminError::ScopeNotGrantable(lacking.clone())),
            None => Ok(()),
        }
    }
}

/// Where a team's admin key stands among the team's people: the user it acts for, that
/// user's role (a shared key acts for the team itself: an owner), and everyone's roles.
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
            grantable: None,
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
        grantable: key.team_id.is_some().then(|| key.scope_names.clone()),
    })
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
