//! The rules a known key must pass, in this order: enabled, not expired, client address
//! inside `allow_ips`, route scopes all granted. A pure function: the time comes in as an
//! argument and nothing here does I/O.

use super::verified::VerifiedKey;
use chrono::{DateTime, Utc};
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    #[error("the key is disabled")]
    Disabled,
    #[error("the key has expired")]
    Expired,
    #[error("the client address is not allowed for this key")]
    IpNotAllowed,
    #[error("the key lacks a scope this route requires")]
    ScopeMissing,
}

pub fn authorize(
    key: &VerifiedKey,
    required_scopes: &[String],
    client_ip: IpAddr,
    now: DateTime<Utc>,
) -> Result<(), PolicyRefusal> {
    if !key.is_enabled {
        return Err(PolicyRefusal::Disabled);
    }
    if key.expires_time.is_some_and(|t| t <= now) {
        return Err(PolicyRefusal::Expired);
    }
    if !key.allow_ips.is_empty() && !key.allow_ips.iter().any(|n| n.contains(&client_ip)) {
        return Err(PolicyRefusal::IpNotAllowed);
    }
    if !required_scopes
        .iter()
        .all(|s| key.scope_names.iter().any(|k| **k == **s))
    {
        return Err(PolicyRefusal::ScopeMissing);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::record::sample_record;
    use chrono::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn order_of_refusals() {
        let now = Utc::now();
        let mut k = sample_record("apk_1");
        k.is_enabled = false;
        k.expires_time = Some(now - Duration::seconds(1));
        k.allow_ips = vec!["10.0.0.0/8".parse().unwrap()];
        let need = vec!["write".to_string()];
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &need, ip("1.1.1.1"), now),
            Err(PolicyRefusal::Disabled)
        );
        k.is_enabled = true;
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &need, ip("1.1.1.1"), now),
            Err(PolicyRefusal::Expired)
        );
        k.expires_time = Some(now + Duration::seconds(60));
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &need, ip("1.1.1.1"), now),
            Err(PolicyRefusal::IpNotAllowed)
        );
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &need, ip("10.2.3.4"), now),
            Err(PolicyRefusal::ScopeMissing)
        );
        k.scope_names.push("write".into());
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &need, ip("10.2.3.4"), now),
            Ok(())
        );
    }

    #[test]
    fn expiry_is_exclusive_at_the_instant() {
        let now = Utc::now();
        let mut k = sample_record("apk_1");
        k.expires_time = Some(now);
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &[], ip("1.1.1.1"), now),
            Err(PolicyRefusal::Expired)
        );
    }

    #[test]
    fn ipv6_allow_list() {
        let now = Utc::now();
        let mut k = sample_record("apk_1");
        k.allow_ips = vec![
            "2001:db8::/32".parse().unwrap(),
            "192.0.2.1/32".parse().unwrap(),
        ];
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &[], ip("2001:db8::42"), now),
            Ok(())
        );
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &[], ip("192.0.2.1"), now),
            Ok(())
        );
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &[], ip("2001:db9::1"), now),
            Err(PolicyRefusal::IpNotAllowed)
        );
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &[], ip("192.0.2.2"), now),
            Err(PolicyRefusal::IpNotAllowed)
        );
    }

    #[test]
    fn no_scopes_needed_passes_any_key() {
        let mut k = sample_record("apk_1");
        k.scope_names.clear();
        assert_eq!(
            authorize(&VerifiedKey::from(&k), &[], ip("1.1.1.1"), Utc::now()),
            Ok(())
        );
    }
}
