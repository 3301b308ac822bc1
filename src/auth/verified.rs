//! What the request path keeps of a key once it is verified: the policy's inputs, the ids the
//! access log, the usage counts and the admin API need, and the identity headers ready-made.
//! Built once per load from the store's [`KeyRecord`], it is what the cache holds, so:
//! - a cached request clones the identity headers (one reference count each) instead of
//!   validating, allocating and copying them from strings on every request;
//! - the cache does not pay memory for what no request reads (name, description, metadata,
//!   timestamps other than the expiry).

use super::record::{KeyRecord, KeyType};
use super::timestamp;
use crate::proxy::headers::IdentityHeaders;
use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, PartialEq)]
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
            // Records written before mapped networks were canonicalised still match.
            allow_ips: record
                .allow_ips
                .iter()
                .map(|n| crate::config::ipv4_mapped_as_ipv4(*n))
                .collect(),
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

/// Straight from a stored [`KeyRecord`]'s JSON, reading only the fields kept here: a cache miss
/// skips the name, description, metadata and three of the four timestamps, and allocates each
/// kept string once instead of twice (the record, then this). `cargo bench --bench hot_path --
/// record_decode`: 1.20 µs whole then cut down, 0.96 µs this way.
impl<'de> Deserialize<'de> for VerifiedKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Field names and defaults as in `KeyRecord`; the others are skipped unread, except that
        // the ones `KeyRecord` requires must be there (once): a record the admin API would call
        // corrupt for a missing field does not authenticate. Their contents are not checked (a
        // malformed `created_time` or `metadata` is found by the admin API, not here).
        #[derive(Deserialize)]
        #[allow(dead_code)] // the required-but-unread fields
        struct Stored {
            name: IgnoredAny,
            created_time: IgnoredAny,
            updated_time: IgnoredAny,
            key_start: IgnoredAny,
            api_key_id: Box<str>,
            key_type: KeyType,
            #[serde(default)]
            team_id: Option<Box<str>>,
            #[serde(default)]
            behalf_of_user_id: Option<Box<str>>,
            #[serde(default)]
            scope_names: Box<[Box<str>]>,
            #[serde(default)]
            allow_ips: Box<[IpNet]>,
            is_enabled: bool,
            #[serde(default, deserialize_with = "timestamp::deserialize_option")]
            expires_time: Option<DateTime<Utc>>,
        }
        let s = Stored::deserialize(d)?;
        let identity = IdentityHeaders::new(
            &s.api_key_id,
            s.team_id.as_deref(),
            s.behalf_of_user_id.as_deref(),
            &s.scope_names,
            s.key_type,
        );
        // A value the admin API would never have stored (a hand edit: `"acme\r\n"`) cannot go
        // out as its header: the key would reach the upstream without its team or user, as if
        // it had none (review). Such a record is unreadable, never a pass.
        if !identity.is_whole() {
            return Err(serde::de::Error::custom(
                "an identity value (id, team, user or scopes) cannot be sent as a header",
            ));
        }
        Ok(Self {
            api_key_id: s.api_key_id,
            team_id: s.team_id,
            key_type: s.key_type,
            scope_names: s.scope_names,
            allow_ips: {
                // Records written before mapped networks were canonicalised still match.
                let mut ips = s.allow_ips;
                for n in ips.iter_mut() {
                    *n = crate::config::ipv4_mapped_as_ipv4(*n);
                }
                ips
            },
            is_enabled: s.is_enabled,
            expires_time: s.expires_time,
            identity,
        })
    }
}

impl VerifiedKey {
    /// A rotated-out hash answers only until the end of its grace period (`until_ms`): the
    /// earlier of that and the key's own expiry.
    pub fn expire_at_grace_end(&mut self, until_ms: i64) {
        self.expires_time = timestamp::earlier_expiry(self.expires_time, until_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::record::sample_record;
    use proptest::prelude::*;

    fn any_text() -> impl Strategy<Value = String> {
        // Plain names, and text that JSON must escape (quotes, backslashes, control and
        // non-ASCII characters): the two decoders must agree on both.
        prop_oneof![
            "[a-z0-9_:-]{0,12}",
            any::<String>().prop_map(|s| s.chars().take(12).collect()),
        ]
    }

    fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
        (0i64..4_000_000_000_000).prop_map(|ms| DateTime::from_timestamp_millis(ms).unwrap())
    }

    prop_compose! {
        fn any_record()(
            id in any_text(),
            name in any_text(),
            description in proptest::option::of(any_text()),
            key_type in prop_oneof![Just(KeyType::Shared), Just(KeyType::User)],
            team in proptest::option::of(any_text()),
            created_by in proptest::option::of(any_text()),
            user in proptest::option::of(any_text()),
            scopes in proptest::collection::vec(any_text(), 0..4),
            ips in proptest::collection::vec(
                prop_oneof![
                    (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, p)| IpNet::new(a.into(), p).unwrap()),
                    (any::<[u16; 8]>(), 0u8..=128).prop_map(|(a, p)| IpNet::new(a.into(), p).unwrap()),
                ],
                0..3,
            ),
            enabled in any::<bool>(),
            created in any_time(),
            expires in proptest::option::of(any_time()),
            last_used in proptest::option::of(any_time()),
            metadata in proptest::collection::btree_map(any_text(), any_text(), 0..3),
        ) -> KeyRecord {
            let mut r = KeyRecord::new(id, name, key_type, "kg_abc".into(), created);
            r.description = description;
            r.team_id = team;
            r.created_by = created_by;
            r.behalf_of_user_id = user;
            r.scope_names = scopes;
            r.allow_ips = ips;
            r.is_enabled = enabled;
            r.expires_time = expires;
            r.last_used_time = last_used;
            r.metadata = metadata;
            r
        }
    }

    proptest! {
        /// The lean decode of a stored record is what the full decode then the conversion give.
        #[test]
        fn decoding_a_stored_record_directly_equals_decoding_it_whole(record in any_record()) {
            let json = serde_json::to_string(&record).unwrap();
            let whole: KeyRecord = serde_json::from_str(&json).unwrap();
            let direct = serde_json::from_str::<VerifiedKey>(&json);
            // One whose identity cannot go out as headers does not decode (see below).
            if crate::proxy::headers::IdentityHeaders::of(&whole).is_whole() {
                prop_assert_eq!(direct.unwrap(), VerifiedKey::from(&whole));
            } else {
                prop_assert!(direct.is_err());
            }
        }
    }

    #[test]
    fn optional_fields_left_out_decode_as_their_defaults() {
        let json = r#"{"api_key_id":"apk_1","name":"n","key_type":"shared","is_enabled":true,
            "created_time":"2026-01-01T00:00:00Z","updated_time":"2026-01-01T00:00:00Z",
            "key_start":"kg_abc","future_field":{"nested":[1,2]}}"#;
        let whole: KeyRecord = serde_json::from_str(json).unwrap();
        let direct: VerifiedKey = serde_json::from_str(json).unwrap();
        assert_eq!(direct, VerifiedKey::from(&whole));
        assert!(direct.scope_names.is_empty() && direct.allow_ips.is_empty());
    }

    #[test]
    fn a_record_missing_a_required_field_or_with_one_twice_is_refused_like_by_the_whole_decode() {
        let full = r#""api_key_id":"apk_1","key_type":"shared","is_enabled":true,
            "created_time":"2026-01-01T00:00:00Z","updated_time":"2026-01-01T00:00:00Z",
            "key_start":"kg_abc""#;
        for json in [
            format!("{{{full}}}"),
            format!("{{\"name\":\"a\",\"name\":\"b\",{full}}}"),
        ] {
            assert!(serde_json::from_str::<KeyRecord>(&json).is_err());
            assert!(
                serde_json::from_str::<VerifiedKey>(&json).is_err(),
                "{json}"
            );
        }
        let ok = format!("{{\"name\":\"a\",{full}}}");
        assert!(serde_json::from_str::<VerifiedKey>(&ok).is_ok());
    }

    /// Review: a hand-edited `team_id` of `"acme\r\n"` passed, and the upstream got no
    /// `X-Keygate-Team-Id` at all. Such a record does not decode: 500, never a pass.
    #[test]
    fn a_record_whose_identity_cannot_be_a_header_does_not_decode() {
        for field in ["team_id", "behalf_of_user_id"] {
            // A space or tab at either end too: HTTP drops it, and `" alice"` is `alice` to
            // the upstream (review).
            for value in ["acme\r\n", " alice", "alice\t"] {
                let mut r = serde_json::to_value(sample_record("apk_1")).unwrap();
                r[field] = serde_json::json!(value);
                let read = serde_json::from_value::<VerifiedKey>(r);
                assert!(read.is_err(), "{field}: {value:?}");
            }
        }
        let mut r = serde_json::to_value(sample_record("apk_1")).unwrap();
        r["scope_names"] = serde_json::json!(["read", "wr\u{7f}ite"]);
        assert!(serde_json::from_value::<VerifiedKey>(r).is_err());
        let fine = serde_json::to_value(sample_record("apk_1")).unwrap();
        assert!(serde_json::from_value::<VerifiedKey>(fine).is_ok());
    }

    #[test]
    fn a_grace_end_before_the_expiry_wins_and_one_after_does_not() {
        let mut v = VerifiedKey::from(&sample_record("apk_1"));
        v.expire_at_grace_end(1_000);
        assert_eq!(v.expires_time.map(|t| t.timestamp_millis()), Some(1_000));
        v.expire_at_grace_end(5_000);
        assert_eq!(v.expires_time.map(|t| t.timestamp_millis()), Some(1_000));
    }

    /// A record stored before `::ffff:a.b.c.d/len` was written as `a.b.c.d/(len-96)` matches
    /// IPv4 clients (their mapped addresses are taken as IPv4), read either way.
    #[test]
    fn a_stored_ipv4_mapped_network_is_its_ipv4_network() {
        let mut r = sample_record("apk_1");
        r.allow_ips = vec!["::ffff:10.0.0.0/104".parse().unwrap()];
        let want: IpNet = "10.0.0.0/8".parse().unwrap();
        assert_eq!(&*VerifiedKey::from(&r).allow_ips, [want]);
        let json = serde_json::to_vec(&r).unwrap();
        let read: VerifiedKey = serde_json::from_slice(&json).unwrap();
        assert_eq!(&*read.allow_ips, [want]);
    }

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
