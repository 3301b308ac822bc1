//! The stored description of a key: everything the gateway and the admin API know about it,
//! and never the key itself (only its hash lives in the store, beside this record).

use super::timestamp;
use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `user`: acts for one user (`behalf_of_user_id`); `shared`: a team's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    User,
    Shared,
}

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::User => "user",
            KeyType::Shared => "shared",
        }
    }
}

impl std::str::FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(KeyType::User),
            "shared" => Ok(KeyType::Shared),
            other => Err(format!(
                "unknown key type {other:?} (expected user or shared)"
            )),
        }
    }
}

/// One API key's record. Field names are the seeds' (Keypup/Uptok admin APIs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub api_key_id: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub key_type: KeyType,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub behalf_of_user_id: Option<String>,
    #[serde(default)]
    pub scope_names: Vec<String>,
    /// Empty means any address.
    #[serde(default)]
    pub allow_ips: Vec<IpNet>,
    pub is_enabled: bool,
    #[serde(deserialize_with = "timestamp::deserialize")]
    pub created_time: DateTime<Utc>,
    #[serde(deserialize_with = "timestamp::deserialize")]
    pub updated_time: DateTime<Utc>,
    /// `None`: permanent.
    #[serde(default, deserialize_with = "timestamp::deserialize_option")]
    pub expires_time: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "timestamp::deserialize_option")]
    pub last_used_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// First characters of the current key: the hint shown after creation.
    pub key_start: String,
}

impl KeyRecord {
    /// An enabled, permanent record created (and updated) at `now`, with everything optional
    /// empty: no team, user, scopes, address rules, metadata or description. Callers set the
    /// rest.
    pub fn new(
        api_key_id: String,
        name: String,
        key_type: KeyType,
        key_start: String,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            api_key_id,
            name,
            description: None,
            key_type,
            team_id: None,
            created_by: None,
            behalf_of_user_id: None,
            scope_names: Vec::new(),
            allow_ips: Vec::new(),
            is_enabled: true,
            created_time: now,
            updated_time: now,
            expires_time: None,
            last_used_time: None,
            metadata: BTreeMap::new(),
            key_start,
        }
    }
}

#[cfg(test)]
pub(crate) fn sample_record(id: &str) -> KeyRecord {
    let mut r = KeyRecord::new(
        id.to_owned(),
        "sample".into(),
        KeyType::Shared,
        "kg_abcdefg".into(),
        Utc::now(),
    );
    r.team_id = Some("team1".into());
    r.scope_names = vec!["read".into()];
    r
}
