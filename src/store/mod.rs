//! Where key records live. One small trait, two implementations that pass the same
//! conformance suite (`tests/it/store_conformance.rs`):
//! - [`redis::RedisStore`]: production, shared by every gateway replica; the hot path is one
//!   capped read (`GETRANGE`) by hash; every change is published so all replicas drop their cached copy.
//! - [`embedded::EmbeddedStore`]: the default, a SQLite file on local disk (WAL mode), usable
//!   by `keygate serve` and the `keygate keys` CLI at the same time; changes reach other
//!   processes through a change table that the gateway polls.
//!
//! The store knows nothing of HTTP or of the cache; it never sees a plaintext key.

pub mod embedded;
pub mod metered;
pub mod redis;

use crate::auth::key::KeyHash;
use crate::auth::record::{KeyRecord, KeyType};
use crate::auth::verified::VerifiedKey;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not answer (connection refused, timeout, I/O). The gateway turns this
    /// into 503 for uncached keys, never into a pass or a 401.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("no key with that id")]
    NotFound,
    #[error("the team already has {limit} keys")]
    LimitExceeded { limit: u32 },
    /// A stored value could not be decoded: a bug or a foreign writer, never the client's fault.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A conditional write found the record changed since the caller read it: read again.
    #[error("the key changed since it was read")]
    Conflict,
    /// The store refused the command itself (a Redis ACL without it): its configuration,
    /// not an outage, and trying again changes nothing until an operator grants it.
    #[error("the store's user may not run a command keygate needs: {0}")]
    Denied(String),
    /// A write was sent and whether the store applied it is unknown: its answer did not come
    /// (a timeout, a connection lost after sending) and reading the key back did not settle
    /// it either, or the store stopped the write partway (a command refused that the write's
    /// own check could not foresee). Not "nothing was changed": the caller must look (GET the
    /// key) before trying again.
    #[error("the store did not confirm whether a write was applied: {0}")]
    Indeterminate(String),
}

/// One unreadable record (a foreign writer, a hand edit) is left out of a listing, logged,
/// rather than failing it: it failed every listing of the store (500), so no other key could
/// be listed, nor a removed member's keys found (review).
pub(crate) fn unreadable_left_out(id: &str, error: &StoreError) {
    tracing::warn!(api_key_id = %id, %error, "a stored key record cannot be read; left out of the listing");
}

/// Filters for listing keys; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub team_id: Option<String>,
    pub key_type: Option<KeyType>,
    pub is_enabled: Option<bool>,
}

impl KeyFilter {
    pub fn matches(&self, r: &KeyRecord) -> bool {
        self.team_id
            .as_ref()
            .is_none_or(|t| r.team_id.as_ref() == Some(t))
            && self.key_type.is_none_or(|k| r.key_type == k)
            && self.is_enabled.is_none_or(|e| r.is_enabled == e)
    }
}

/// 1-based page of a listing.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub page: u32,
    pub per_page: u32,
}

/// A user's role in a team. The first owner (else admin) by `added_time` inherits the shared
/// keys that acted for a removed member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    /// As the admin API and `--role` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub team_id: String,
    pub user_id: String,
    pub role: Role,
    pub added_time: DateTime<Utc>,
}

/// What an audit event records. Serialized in snake_case (`create`, `member_remove`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    Create,
    Update,
    Disable,
    Enable,
    Delete,
    Rotate,
    Reveal,
    MemberPut,
    MemberRemove,
}

/// One audit entry: who did what to which key, when, from where. Never holds a key value.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuditEvent {
    /// Unique and increasing with time within one store (assigned by the store on append;
    /// callers pass an empty string).
    pub event_id: String,
    pub time: DateTime<Utc>,
    /// The admin key id, `bootstrap` for the bootstrap token, `cli` for the CLI.
    pub actor: String,
    pub action: AuditAction,
    pub api_key_id: Option<String>,
    pub team_id: Option<String>,
    pub user_id: Option<String>,
    pub client_ip: Option<String>,
    /// The id keygate made for the request (never one a client chose).
    pub request_id: Option<String>,
    /// The `X-Request-Id` the client sent, when it sent a well-formed one: for correlation
    /// with the client's own logs, not to be trusted. Absent in events written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_request_id: Option<String>,
    /// Small free-form facts (changed field names, grace seconds…), never secrets.
    #[serde(default)]
    pub details: BTreeMap<String, String>,
}

/// Audit listing filter; `None` matches everything. `since` inclusive, `until` exclusive.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub api_key_id: Option<String>,
    pub team_id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// Requests seen for one key since the last flush (from one gateway process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    pub api_key_id: String,
    pub requests: u64,
    pub last_used: DateTime<Utc>,
}

/// A key's usage, summed over every gateway that flushed into the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub request_count: u64,
    pub last_used_time: Option<DateTime<Utc>>,
}

/// What the change feed says: these hashes changed (drop them from every cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Keys(Vec<KeyHash>),
    /// Something changed that cannot be pinned to hashes: drop everything.
    All,
}

/// A live feed of changes. When the receiver yields `None` the feed was lost: the caller must
/// assume it missed changes (flush its cache) and ask for a new feed.
pub type ChangeFeed = mpsc::Receiver<Change>;

/// What a hash lookup decodes (the whole record, or the verifier's copy): either is clipped to
/// the end of the hash's rotation grace.
pub trait GraceEnd {
    fn expire_at_grace_end(&mut self, until_ms: i64);
}

impl GraceEnd for KeyRecord {
    fn expire_at_grace_end(&mut self, until_ms: i64) {
        self.expires_time = crate::auth::timestamp::earlier_expiry(self.expires_time, until_ms);
    }
}

impl GraceEnd for VerifiedKey {
    fn expire_at_grace_end(&mut self, until_ms: i64) {
        VerifiedKey::expire_at_grace_end(self, until_ms);
    }
}

/// A hash lookup's answer, with the end of the hash's rotation grace when it has one: a hash
/// in its grace yields the record with `expires_time` no later than the end of the grace, so
/// that a gateway which caches the answer (and its stale copy for outages) still refuses the
/// old key on time: nothing needs to be published when a grace ends.
pub fn at_grace_end<T: GraceEnd>(found: Option<(T, Option<i64>)>) -> Option<T> {
    found.map(|(mut found, grace_until)| {
        if let Some(until) = grace_until {
            found.expire_at_grace_end(until);
        }
        found
    })
}

#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The hot path: the record that `hash` belongs to, if `hash` is the key's current hash or
    /// a previous one still inside its rotation grace period at `now`. For a hash in its grace
    /// period, `expires_time` comes back clipped to the end of the grace, so a cached copy stops
    /// working on time without the cache knowing about rotations.
    async fn find_by_hash(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyRecord>, StoreError>;

    /// [`Self::find_by_hash`], keeping only what the request path reads: what the verifier
    /// caches. A store may decode that much of its stored record and no more.
    async fn find_verified_by_hash(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<VerifiedKey>, StoreError> {
        Ok(self.find_by_hash(hash, now).await?.map(VerifiedKey::from))
    }

    /// How many parts of the store can fail on their own: one for a server, a group of slots
    /// per part for Redis Cluster. The verifier backs lookups off per part, so a failed part
    /// does not get the others' uncached keys refused.
    fn failure_domains(&self) -> usize {
        1
    }

    /// Which of [`Self::failure_domains`] answers for `hash`.
    fn failure_domain(&self, _hash: &KeyHash) -> usize {
        0
    }

    /// Stores a new record under `hash`. With `team_limit`, refuses with `LimitExceeded` when the
    /// record's team already holds that many keys (enabled or not), atomically: concurrent
    /// creates never overshoot.
    async fn create(
        &self,
        record: &KeyRecord,
        hash: &KeyHash,
        team_limit: Option<u32>,
    ) -> Result<(), StoreError>;

    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;

    /// Replaces the record with the same `api_key_id` (`NotFound` if there is none), for every
    /// hash that still leads to it, and publishes the change, atomically and only if the stored
    /// record still equals `expected` (else `Conflict`, nothing written): a change computed
    /// from a copy that another writer has since replaced would silently undo that writer's
    /// change (a disable, a narrowed scope). `key_start` is kept from the stored record: only
    /// `rotate` changes it.
    async fn update(&self, expected: &KeyRecord, record: &KeyRecord) -> Result<(), StoreError>;

    /// Gives the key `expected.api_key_id` a new hash (`NotFound` if there is none). The
    /// previous current hash keeps working until `now + grace` (not at all when `grace` is
    /// zero), then stops by itself. Returns the updated record. Atomically and only if the
    /// stored record still equals `expected` (else `Conflict`, nothing written): the new value
    /// carries the record's powers, so whoever was allowed to rotate was allowed for
    /// `expected`, and must not be handed a value for a record another writer has since
    /// widened.
    async fn rotate(
        &self,
        expected: &KeyRecord,
        new_hash: &KeyHash,
        new_key_start: &str,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, StoreError>;

    /// Removes the key and all its hashes for good (`NotFound` if there is none), also when its
    /// record cannot be read (`get` answers `Corrupt`): such a key must still be revocable, and
    /// on Redis its hash entries may hold an intact copy that keeps authenticating it. (The
    /// Redis store then finds them by the key's slot tag, a scan; the embedded store by its
    /// `hashes` table.)
    async fn delete(&self, id: &str) -> Result<(), StoreError>;

    /// [`Self::delete`], only while the stored record still equals `expected` (else
    /// `Conflict`, nothing removed), like [`Self::update`], checked and removed atomically. No
    /// default: one that read and then deleted would let a change made in between be lost.
    async fn delete_if(&self, expected: &KeyRecord) -> Result<(), StoreError>;

    /// Records matching `filter`, oldest first, one page of them, and the total that matched.
    async fn list(
        &self,
        filter: &KeyFilter,
        page: Page,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError>;

    /// Cheap reachability check for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether the store lets keygate run everything it will ask of it (a Redis user's ACL may
    /// not): `Denied` naming what is refused, `Unavailable` when the store cannot tell now (it
    /// is not a refusal). Checked at start-up, so that a missing permission stops a rollout
    /// rather than failing the first write. A store without access rules has nothing to check.
    async fn check_access(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Subscribes to changes made by any process using the same store.
    async fn changes(&self) -> Result<ChangeFeed, StoreError>;

    /// Adds a member or changes their role (keeping the original `added_time` when present).
    async fn put_member(&self, member: &Member) -> Result<Member, StoreError>;

    /// Removes a member; `None` when they were not one.
    async fn remove_member(
        &self,
        team_id: &str,
        user_id: &str,
    ) -> Result<Option<Member>, StoreError>;

    async fn get_member(&self, team_id: &str, user_id: &str) -> Result<Option<Member>, StoreError>;

    /// A team's members, oldest `added_time` first.
    async fn list_members(&self, team_id: &str) -> Result<Vec<Member>, StoreError>;

    /// Appends an audit event (the store assigns `event_id`); the log is capped at
    /// `AUDIT_CAP` entries, the oldest dropped first. Returns the stored event.
    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditEvent, StoreError>;

    /// Audit events matching `filter`, newest first, one page, and the total that matched.
    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: Page,
    ) -> Result<(Vec<AuditEvent>, u64), StoreError>;

    /// Adds a batch of usage counts: counts add up, `last_used_time` keeps the latest. Deltas
    /// for keys that no longer exist are dropped. Never publishes a change: usage is not part
    /// of what the gateway caches.
    async fn record_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError>;

    /// Usage for each id, in the same order (zero/`None` for keys never used).
    async fn usage(&self, ids: &[String]) -> Result<Vec<Usage>, StoreError>;
}

/// The most keygate reads of one stored record (Redis: a hash entry or an id record; SQLite:
/// a `keys.record`): a value longer than this is unreadable (`StoreError::Corrupt`), like one
/// that does not decode, and is never fetched whole. A hand-corrupted 40 MB value at a Redis
/// hash entry was fetched with `GET` on every request that presented its key (76 ms each; the
/// gateway's memory 18 → 226 MiB: review).
///
/// Why 256 KiB: a typical record is under 2 KiB, but the limits the key service enforces allow
/// far more in the worst case (50 metadata entries of 100 + 500 characters, a 2000-character
/// description, 100 scopes and 100 networks; up to 6 bytes a character once JSON-escaped:
/// ~210 KB), and a cap below what the API accepts would make a valid key unreadable. A Redis id
/// record adds ~95 bytes per hash still in its rotation grace. Writes refuse a value above the
/// cap, so keygate never writes what it would refuse to read. A 40 MB value now costs at most
/// this much per request that presents its key.
pub const RECORD_CAP: usize = 256 * 1024;

/// How many audit events a store keeps.
pub const AUDIT_CAP: usize = 100_000;
