//! Key lifecycle operations: create, list, enable/disable, revoke, rotate. One implementation of
//! the rules, used by the `keygate keys` CLI today and by the admin API later, so the two can
//! never disagree. Plaintext keys leave this module only inside [`NewKey`], to be shown once.

use crate::auth::key::{KeyPrefix, NewKey, new_key_id};
use crate::auth::record::{KeyRecord, KeyType};
use crate::store::{KeyFilter, KeyStore, Page, StoreError};
use chrono::{DateTime, Utc};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a caller may set when creating a key.
#[derive(Debug, Clone)]
pub struct CreateKey {
    pub key_type: KeyType,
    pub name: Option<String>,
    pub description: Option<String>,
    pub team_id: Option<String>,
    pub scope_names: Vec<String>,
    pub allow_ips: Vec<IpNet>,
    pub is_enabled: bool,
    pub behalf_of_user_id: Option<String>,
    pub expires_time: Option<DateTime<Utc>>,
    pub metadata: BTreeMap<String, String>,
    pub created_by: Option<String>,
}

impl CreateKey {
    pub fn new(key_type: KeyType) -> Self {
        Self {
            key_type,
            name: None,
            description: None,
            team_id: None,
            scope_names: vec![],
            allow_ips: vec![],
            is_enabled: true,
            behalf_of_user_id: None,
            expires_time: None,
            metadata: BTreeMap::new(),
            created_by: None,
        }
    }
}

pub struct KeyService {
    store: Arc<dyn KeyStore>,
    prefix: KeyPrefix,
    team_limit: Option<u32>,
}

impl KeyService {
    pub fn new(store: Arc<dyn KeyStore>, prefix: KeyPrefix, team_limit: Option<u32>) -> Self {
        Self {
            store,
            prefix,
            team_limit,
        }
    }

    pub async fn create(
        &self,
        req: CreateKey,
        now: DateTime<Utc>,
    ) -> Result<(NewKey, KeyRecord), KeyError> {
        if req.key_type == KeyType::User && req.behalf_of_user_id.is_none() {
            return Err(KeyError::Invalid {
                field: "behalf_of_user_id",
                reason: "a user key must name the user it acts for".into(),
            });
        }
        if let Some(t) = req.expires_time
            && t <= now
        {
            return Err(KeyError::Invalid {
                field: "expires_time",
                reason: "must be in the future".into(),
            });
        }
        for s in &req.scope_names {
            if s.is_empty() || s.contains(char::is_whitespace) {
                return Err(KeyError::Invalid {
                    field: "scope_names",
                    reason: format!("{s:?} is not a scope name (no spaces, not empty)"),
                });
            }
        }
        let key = NewKey::generate(&self.prefix);
        let id = new_key_id();
        let record = KeyRecord {
            name: req
                .name
                .unwrap_or_else(|| format!("key {}", now.format("%Y-%m-%d %H:%M:%S"))),
            api_key_id: id,
            description: req.description,
            key_type: req.key_type,
            team_id: req.team_id,
            created_by: req.created_by,
            behalf_of_user_id: req.behalf_of_user_id,
            scope_names: req.scope_names,
            allow_ips: req.allow_ips,
            is_enabled: req.is_enabled,
            created_time: now,
            updated_time: now,
            expires_time: req.expires_time,
            last_used_time: None,
            metadata: req.metadata,
            key_start: key.key_start(),
        };
        self.store
            .create(&record, &key.hash(), self.team_limit)
            .await?;
        Ok((key, record))
    }

    pub async fn list(
        &self,
        filter: &KeyFilter,
        page: Page,
    ) -> Result<(Vec<KeyRecord>, u64), KeyError> {
        Ok(self.store.list(filter, page).await?)
    }

    pub async fn get(&self, id: &str) -> Result<KeyRecord, KeyError> {
        self.store
            .get(id)
            .await?
            .ok_or(KeyError::Store(StoreError::NotFound))
    }

    pub async fn set_enabled(
        &self,
        id: &str,
        enabled: bool,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, KeyError> {
        let mut record = self.get(id).await?;
        record.is_enabled = enabled;
        record.updated_time = now;
        self.store.update(&record).await?;
        Ok(record)
    }

    pub async fn revoke(&self, id: &str) -> Result<(), KeyError> {
        Ok(self.store.delete(id).await?)
    }

    pub async fn rotate(
        &self,
        id: &str,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<(NewKey, KeyRecord), KeyError> {
        let key = NewKey::generate(&self.prefix);
        let record = self
            .store
            .rotate(id, &key.hash(), &key.key_start(), grace, now)
            .await?;
        Ok((key, record))
    }
}
