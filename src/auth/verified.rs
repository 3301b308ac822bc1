//! What the request path keeps of a key once it is verified: the policy's inputs, the ids the
//! access log, the usage counts and the admin API need, and the identity headers ready-made.
//! Built once per load from the store's [`KeyRecord`], it is what the cache holds, so:
//! - a cached request clones the identity headers (one reference count each) instead of
//!   validating, allocating and copying them from strings on every request;
//! - the cache does not pay memory for what no request reads (name, description, metadata,
//!   timestamps other than the expiry).

use super::record::{KeyRecord, KeyType};
use crate::proxy::headers::IdentityHeaders;
use chrono::{DateTime, Utc};
use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct VerifiedKey {
    pub api_key_id: Box<str>,
    pub team_id: Option<Box<str>>,
    pub key_type: KeyType,
    pub scope_names: Box<[Box<str>]>,
    /// Empty means any address.
    pub allow_ips: Box<[IpNet]>,
    pub is_enabled: bool,
    /// `None`: permanent.
    pub expires_time: Option<DateTime<Utc>>,
    pub identity: IdentityHeaders,
}

impl From<&KeyRecord> for VerifiedKey {
    fn from(record: &KeyRecord) -> Self {
        Self {
            api_key_id: record.api_key_id.as_str().into(),
            team_id: record.team_id.as_deref().map(Into::into),
            key_type: record.key_type,
            scope_names: record
                .scope_names
                .iter()
                .map(|s| s.as_str().into())
                .collect(),
            allow_ips: record.allow_ips.iter().copied().collect(),
            is_enabled: record.is_enabled,
            expires_time: record.expires_time,
            identity: IdentityHeaders::of(record),
        }
    }
}

impl From<KeyRecord> for VerifiedKey {
    fn from(record: KeyRecord) -> Self {
        Self::from(&record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::record::sample_record;

    #[test]
    fn keeps_what_requests_read() {
        let mut r = sample_record("apk_1");
        r.scope_names = vec!["read".into(), "write".into()];
        r.allow_ips = vec!["10.0.0.0/8".parse().unwrap()];
        r.is_enabled = false;
        r.expires_time = Some(Utc::now());
        let v = VerifiedKey::from(&r);
        assert_eq!(&*v.api_key_id, "apk_1");
        assert_eq!(v.team_id.as_deref(), Some("team1"));
        assert_eq!(v.key_type, KeyType::Shared);
        assert_eq!(v.scope_names.len(), 2);
        assert_eq!(&*v.scope_names[1], "write");
        assert_eq!(v.allow_ips.len(), 1);
        assert!(!v.is_enabled);
        assert_eq!(v.expires_time, r.expires_time);
    }
}
