//! Key lifecycle: create, list, get, change, enable/disable, rotate, revoke, team membership,
//! and the audit trail of all of it. One implementation of the rules, used by the admin API and
//! the `keygate keys` CLI alike, so the two can never disagree. Plaintext keys leave this
//! module only inside [`NewKey`] (to be shown once) and through the reveal window.

use crate::auth::key::{KeyHash, KeyPrefix, NewKey, SlotTag, new_key_id};
use crate::auth::record::{KeyRecord, KeyType};
use crate::store::{
    AuditAction, AuditEvent, AuditFilter, KeyFilter, KeyStore, Member, Page, Role, StoreError,
};
use chrono::{DateTime, Utc};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The longest an old value may keep working after a rotation: the admin API and the CLI alike.
pub const MAX_ROTATION_GRACE: Duration = Duration::from_secs(30 * 86_400);

/// How often `change` re-reads a key that other writers keep changing before it gives up
/// (503, retryable): enough for any burst of admin requests on one key.
const CHANGE_ATTEMPTS: usize = 16;
/// How often a removed member's `shared` key looks for another owner to go to, when the one
/// it was given to left too.
const FALLBACK_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no API key with that id")]
    NotFound,
    #[error("the team already has its maximum of {limit} keys")]
    LimitExceeded { limit: u32 },
    #[error("unknown scope {0:?}")]
    ScopeInvalid(String),
    #[error("{0}")]
    AllowIpInvalid(String),
    #[error("{0}")]
    UserInvalid(String),
    #[error("no member {user:?} in team {team:?}")]
    MemberNotFound { team: String, user: String },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The key's authority-relevant fields ([`same_authority`]) are no longer those of the
    /// record the caller's right to act was checked against: acting anyway could hand out or
    /// enable powers the caller was never checked for.
    #[error("the key changed while this request was being checked; read it again and retry")]
    ChangedMeanwhile,
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for KeyError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => KeyError::NotFound,
            StoreError::LimitExceeded { limit } => KeyError::LimitExceeded { limit },
            other => KeyError::Store(other),
        }
    }
}

/// Who asks, for the audit trail.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Admin key id, `bootstrap` or `cli`.
    pub id: String,
    pub client_ip: Option<String>,
    /// An id keygate made itself for the request: never the client's, which an admin could
    /// choose to match another entry's.
    pub request_id: Option<String>,
    /// The `X-Request-Id` the client sent (when it looked like an id), kept apart.
    pub client_request_id: Option<String>,
}

impl Actor {
    pub fn cli() -> Self {
        Self {
            id: "cli".into(),
            client_ip: None,
            request_id: None,
            client_request_id: None,
        }
    }
}

/// The rules keys are created and changed under, from the configuration.
#[derive(Debug, Clone)]
pub struct KeyRules {
    /// Keys per team, enabled or not; `None`: unlimited.
    pub team_limit: Option<u32>,
    /// Scope names keys may carry; `None` accepts any well-formed name (embedders and tests).
    pub scope_catalogue: Option<Vec<String>>,
    /// How long `reveal` still returns a new key's value (zero: never).
    pub reveal_window: Duration,
}

impl KeyRules {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            team_limit: (cfg.admin.team_key_limit > 0).then_some(cfg.admin.team_key_limit),
            scope_catalogue: Some(cfg.scopes.iter().map(|s| s.name.clone()).collect()),
            reveal_window: cfg.admin.reveal_window,
        }
    }

    /// Unlimited, any scope, no reveal window.
    pub fn permissive() -> Self {
        Self {
            team_limit: None,
            scope_catalogue: None,
            reveal_window: Duration::ZERO,
        }
    }
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
        }
    }
}

/// A change to a key; `None` leaves a field as it is. The inner `Option`s can clear a field.
#[derive(Debug, Clone, Default)]
pub struct KeyChange {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub scope_names: Option<Vec<String>>,
    pub allow_ips: Option<Vec<IpNet>>,
    pub is_enabled: Option<bool>,
    pub behalf_of_user_id: Option<Option<String>>,
    pub expires_time: Option<Option<DateTime<Utc>>>,
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The latest a key may expire: 9999-12-31T23:59:59Z. RFC 3339 has four-digit years; a later
/// time would be written `+10000-…`, which the documented `date-time` format is not.
pub const LATEST_EXPIRY: DateTime<Utc> = match DateTime::<Utc>::from_timestamp(253_402_300_799, 0) {
    Some(t) => t,
    None => panic!("9999-12-31T23:59:59Z is a valid time"),
};

pub const MAX_NAME_LEN: usize = 200;
pub const MAX_DESCRIPTION_LEN: usize = 2000;
pub const MAX_SCOPES: usize = 100;
pub const MAX_ALLOW_IPS: usize = 100;
pub const MAX_METADATA_ENTRIES: usize = 50;
pub const MAX_METADATA_KEY_LEN: usize = 100;
pub const MAX_METADATA_LEN: usize = 500;

/// `scope_names` without repeats, first occurrence kept: a repeat grants nothing more, and
/// storing it would show the key with the scope twice. More than `MAX_SCOPES` entries are
/// refused before, repeats or not: the pairwise check stays small.
fn dedup_scopes(scopes: Vec<String>) -> Result<Vec<String>, KeyError> {
    if scopes.len() > MAX_SCOPES {
        return Err(KeyError::Invalid {
            field: "scope_names",
            reason: format!("at most {MAX_SCOPES} scopes"),
        });
    }
    let mut out: Vec<String> = Vec::with_capacity(scopes.len());
    for s in scopes {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Whether `a` and `b` grant the same and stand the same in their team: every field an admin's
/// right to change, rotate or reveal a key is judged on (its team, type, the user it acts for,
/// its scopes, addresses and expiry). Names, metadata, `is_enabled` and times may differ.
pub fn same_authority(a: &KeyRecord, b: &KeyRecord) -> bool {
    a.api_key_id == b.api_key_id
        && a.team_id == b.team_id
        && a.key_type == b.key_type
        && a.behalf_of_user_id == b.behalf_of_user_id
        && a.scope_names == b.scope_names
        && a.allow_ips == b.allow_ips
        && a.expires_time == b.expires_time
}

/// A compare-and-set write that lost `CHANGE_ATTEMPTS` rounds to other writers: answered as
/// the store being unavailable (503, retry).
fn kept_changing(id: &str) -> KeyError {
    KeyError::Store(StoreError::Unavailable(format!(
        "key {id} kept changing under concurrent writers"
    )))
}

/// Sets `slot` to `value` and names it in `fields`, when that changes it.
fn set<T: PartialEq>(slot: &mut T, value: T, name: &'static str, fields: &mut Vec<&'static str>) {
    if *slot != value {
        *slot = value;
        fields.push(name);
    }
}

/// Parses a key's `allow_ips` entries (the admin API): IPv4 or IPv6 addresses or CIDR blocks,
/// as `config::parse_cidr` reads them, but stricter than the configuration: an entry with host
/// bits set (`10.1.2.3/8`) is refused, naming the network and the host it may have meant,
/// instead of silently becoming `10.0.0.0/8`; and an entry given twice (as parsed: `10.0.0.1`
/// and `10.0.0.1/32` are one) is refused rather than stored twice.
pub fn parse_allow_ips(list: &[String]) -> Result<Vec<IpNet>, KeyError> {
    if list.len() > MAX_ALLOW_IPS {
        return Err(KeyError::AllowIpInvalid(format!(
            "at most {MAX_ALLOW_IPS} entries"
        )));
    }
    let mut out: Vec<IpNet> = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let net = crate::config::parse_cidr(s)
            .map_err(|e| KeyError::AllowIpInvalid(format!("allow_ips[{i}]: {e}")))?;
        if let Ok(given) = s.trim().parse::<IpNet>()
            && given.trunc() != given
        {
            let host = crate::config::ipv4_mapped_as_ipv4(IpNet::from(given.addr()));
            return Err(KeyError::AllowIpInvalid(format!(
                "allow_ips[{i}]: {:?} has host bits set: give the network {net} or the host \
                 {host}",
                s.trim()
            )));
        }
        // A repeat (`10.0.0.1` and `10.0.0.1/32` are one) is kept once: it says nothing
        // another reading could take differently, and a key stored with one before repeats
        // were looked for must take back the list it is shown (review: refusing them failed
        // that round trip).
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

pub struct KeyService {
    store: Arc<dyn KeyStore>,
    prefix: KeyPrefix,
    rules: KeyRules,
    /// New key values by key id, for `rules.reveal_window` after create/rotate. Memory only:
    /// never written to the store, gone on restart, and only on the process that made the key.
    reveal: moka::sync::Cache<String, Arc<String>>,
    /// Counts changes whose audit event could not be stored (see `audit_done`).
    unaudited: Option<prometheus::IntCounter>,
}

impl KeyService {
    pub fn new(store: Arc<dyn KeyStore>, prefix: KeyPrefix, rules: KeyRules) -> Self {
        let reveal = moka::sync::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(rules.reveal_window.max(Duration::from_millis(1)))
            .build();
        Self {
            store,
            prefix,
            rules,
            reveal,
            unaudited: None,
        }
    }

    /// Counts changes that took effect without their audit event in `counter`.
    pub fn with_unaudited_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.unaudited = Some(counter);
        self
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    fn check_scopes(&self, scopes: &[String]) -> Result<(), KeyError> {
        if scopes.len() > MAX_SCOPES {
            return Err(KeyError::Invalid {
                field: "scope_names",
                reason: format!("at most {MAX_SCOPES} scopes"),
            });
        }
        for s in scopes {
            let known = match &self.rules.scope_catalogue {
                Some(catalogue) => catalogue.iter().any(|c| c == s),
                None => !s.is_empty() && !s.contains(char::is_whitespace),
            };
            if !known {
                return Err(KeyError::ScopeInvalid(s.clone()));
            }
        }
        Ok(())
    }

    fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), KeyError> {
        if value.chars().count() > max {
            return Err(KeyError::Invalid {
                field,
                reason: format!("at most {max} characters"),
            });
        }
        if value.chars().any(is_unsafe_in_text) {
            return Err(KeyError::Invalid {
                field,
                reason: "must not contain control characters (bidirectional ones included)".into(),
            });
        }
        Ok(())
    }

    /// Lengths in characters, like `name` and `description`; no control characters, which
    /// could forge lines in anything that prints metadata.
    fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), KeyError> {
        if metadata.len() > MAX_METADATA_ENTRIES {
            return Err(KeyError::Invalid {
                field: "metadata",
                reason: format!("at most {MAX_METADATA_ENTRIES} entries"),
            });
        }
        for (k, v) in metadata {
            if k.is_empty()
                || k.chars().count() > MAX_METADATA_KEY_LEN
                || v.chars().count() > MAX_METADATA_LEN
            {
                return Err(KeyError::Invalid {
                    field: "metadata",
                    reason: format!(
                        "keys must be 1-{MAX_METADATA_KEY_LEN} characters and values at most \
                         {MAX_METADATA_LEN}"
                    ),
                });
            }
            if k.chars().chain(v.chars()).any(is_unsafe_in_text) {
                return Err(KeyError::Invalid {
                    field: "metadata",
                    reason: "keys and values must not contain control characters \
                             (bidirectional ones included)"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// `behalf_of_user_id` must name a member of the key's team.
    async fn check_user(&self, team: Option<&str>, user: Option<&str>) -> Result<(), KeyError> {
        let Some(user) = user else { return Ok(()) };
        let Some(team) = team else {
            return Err(KeyError::UserInvalid(
                "behalf_of_user_id needs the key to belong to a team".into(),
            ));
        };
        match self.store.get_member(team, user).await? {
            Some(_) => Ok(()),
            None => Err(KeyError::UserInvalid(format!(
                "user {user:?} is not a member of team {team:?}"
            ))),
        }
    }

    /// A `user` key works only while its user is a member of its team: removing the member
    /// disables it, and enabling or rotating it again is refused as creating it would be.
    async fn check_user_key(&self, record: &KeyRecord) -> Result<(), KeyError> {
        match record.key_type {
            KeyType::User => {
                self.check_user(
                    record.team_id.as_deref(),
                    record.behalf_of_user_id.as_deref(),
                )
                .await
            }
            KeyType::Shared => Ok(()),
        }
    }

    /// A team or user id: part of store key names (no braces or slashes) and of identity
    /// headers (no control characters). Nor white space at either end, or invisible
    /// characters: HTTP drops the spaces around a header value, so `" alice"` reached the
    /// upstream as `alice`, and a team's admin could mint a key in an owner's name (review);
    /// a zero-width or direction character makes the same kind of twin to the eye.
    fn check_id(field: &'static str, v: &str) -> Result<(), KeyError> {
        if v.is_empty()
            || v.len() > 100
            || v.contains(['{', '}', '/'])
            || v.starts_with(char::is_whitespace)
            || v.ends_with(char::is_whitespace)
            || v.chars().any(|c| c.is_control() || is_invisible(c))
        {
            return Err(KeyError::Invalid {
                field,
                reason: "must be 1-100 characters, without braces, slashes, control or \
                         invisible characters, or white space at either end"
                    .into(),
            });
        }
        Ok(())
    }

    fn check_expiry(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Result<(), KeyError> {
        let reason = match t {
            Some(t) if t <= now => "must be in the future",
            Some(t) if t > LATEST_EXPIRY => "must be no later than 9999-12-31T23:59:59Z",
            _ => return Ok(()),
        };
        Err(KeyError::Invalid {
            field: "expires_at",
            reason: reason.into(),
        })
    }

    fn event(
        actor: &Actor,
        action: AuditAction,
        key: Option<&KeyRecord>,
        details: BTreeMap<String, String>,
        now: DateTime<Utc>,
    ) -> AuditEvent {
        AuditEvent {
            event_id: String::new(),
            time: now,
            actor: actor.id.clone(),
            action,
            api_key_id: key.map(|k| k.api_key_id.clone()),
            team_id: key.and_then(|k| k.team_id.clone()),
            user_id: key.and_then(|k| k.behalf_of_user_id.clone()),
            client_ip: actor.client_ip.clone(),
            request_id: actor.request_id.clone(),
            client_request_id: actor.client_request_id.clone(),
            details,
        }
    }

    /// Audits a change that is already in force.
    async fn audit(
        &self,
        actor: &Actor,
        action: AuditAction,
        key: Option<&KeyRecord>,
        details: BTreeMap<String, String>,
        now: DateTime<Utc>,
    ) {
        self.audit_done(Self::event(actor, action, key, details, now))
            .await;
    }

    /// Appends the event of a change that is already in force. A failure does not fail the
    /// request: the change stands either way, a retry would repeat it (a second rotation),
    /// and a create's or rotation's answer holds the only copy of the new value. So it is
    /// logged at error level (the event, never a value) and counted instead.
    async fn audit_done(&self, event: AuditEvent) {
        if let Err(e) = self.store.append_audit(&event).await {
            tracing::error!(
                error = %e,
                action = ?event.action,
                api_key_id = event.api_key_id.as_deref().unwrap_or(""),
                team_id = event.team_id.as_deref().unwrap_or(""),
                actor = %event.actor,
                request_id = event.request_id.as_deref().unwrap_or(""),
                "a change is in force but its audit event could not be stored"
            );
            if let Some(counter) = &self.unaudited {
                counter.inc();
            }
        }
    }

    pub async fn create(
        &self,
        req: CreateKey,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<(NewKey, KeyRecord), KeyError> {
        if req.key_type == KeyType::User && req.behalf_of_user_id.is_none() {
            return Err(KeyError::UserInvalid(
                "a user key must name the user it acts for (behalf_of_user_id)".into(),
            ));
        }
        if let Some(name) = &req.name {
            Self::check_text("name", name, MAX_NAME_LEN)?;
        }
        if let Some(d) = &req.description {
            Self::check_text("description", d, MAX_DESCRIPTION_LEN)?;
        }
        if let Some(t) = &req.team_id {
            // A control character could not go out in `X-Keygate-Team-Id`.
            Self::check_id("team_id", t)?;
        }
        Self::check_expiry(req.expires_time, now)?;
        let scope_names = dedup_scopes(req.scope_names)?;
        self.check_scopes(&scope_names)?;
        Self::check_metadata(&req.metadata)?;
        if req.allow_ips.len() > MAX_ALLOW_IPS {
            return Err(KeyError::AllowIpInvalid(format!(
                "at most {MAX_ALLOW_IPS} entries"
            )));
        }
        self.check_user(req.team_id.as_deref(), req.behalf_of_user_id.as_deref())
            .await?;
        // One slot for the key, its id and (with a team) the team's entries: the store writes
        // them in one atomic step, which Redis Cluster allows only within one slot.
        let tag = req
            .team_id
            .as_deref()
            .map_or_else(SlotTag::random, SlotTag::for_team);
        let key = NewKey::generate(&self.prefix, tag);
        let record = KeyRecord {
            name: req
                .name
                .unwrap_or_else(|| format!("API key {}", now.format("%Y-%m-%d %H:%M:%S"))),
            api_key_id: new_key_id(tag),
            // `""` is stored as no description, which is shown as `""` too.
            description: req.description.filter(|d| !d.is_empty()),
            key_type: req.key_type,
            team_id: req.team_id,
            created_by: Some(actor.id.clone()),
            behalf_of_user_id: req.behalf_of_user_id,
            scope_names,
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
            .create(&record, &key.hash(), self.rules.team_limit)
            .await?;
        self.remember_for_reveal(&record.api_key_id, &key);
        self.audit(
            actor,
            AuditAction::Create,
            Some(&record),
            BTreeMap::new(),
            now,
        )
        .await;
        let record = self.kept_with_its_user(record, actor, now).await;
        Ok((key, record))
    }

    fn remember_for_reveal(&self, id: &str, key: &NewKey) {
        if !self.rules.reveal_window.is_zero() {
            self.reveal
                .insert(id.to_owned(), Arc::new(key.expose().to_owned()));
        }
    }

    /// The key's value while inside the reveal window (each read audited), else `None`.
    pub async fn reveal(
        &self,
        record: &KeyRecord,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Option<Arc<String>>, KeyError> {
        let Some(value) = self.reveal.get(&record.api_key_id) else {
            return Ok(None);
        };
        // Only this process's latest value is remembered: another replica, or a concurrent
        // rotation here that stored later, may have replaced it, and handing it out would give
        // the caller a key that no longer works (or stops at the end of a grace period).
        if !self.is_current(record, &value, now).await? {
            return Ok(None);
        }
        // Audited before it is shown, and not shown unless audited: nothing has happened yet.
        let event = Self::event(
            actor,
            AuditAction::Reveal,
            Some(record),
            BTreeMap::new(),
            now,
        );
        self.store.append_audit(&event).await?;
        Ok(Some(value))
    }

    /// Whether `value` is `record`'s current key: its hint matches, and the store still leads
    /// from its hash to this key (the hint alone has only three random characters) as
    /// `record` has it, which the caller's right to see the value was judged on. A key
    /// widened since (a scope the caller could not grant) is not shown; nor is a value
    /// another rotation put in its grace period (the store clips its expiry to the grace).
    async fn is_current(
        &self,
        record: &KeyRecord,
        value: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, KeyError> {
        if !value.starts_with(&record.key_start) {
            return Ok(false);
        }
        let found = self.store.find_by_hash(&KeyHash::of(value), now).await?;
        Ok(found.is_some_and(|r| same_authority(&r, record)))
    }

    pub async fn list(
        &self,
        filter: &KeyFilter,
        page: Page,
    ) -> Result<(Vec<KeyRecord>, u64), KeyError> {
        Ok(self.store.list(filter, page).await?)
    }

    pub async fn get(&self, id: &str) -> Result<KeyRecord, KeyError> {
        self.store.get(id).await?.ok_or(KeyError::NotFound)
    }

    /// Applies `change` to the key. Read, check and write repeat (a few times at most) when
    /// another writer changed the key in between, so a change never undoes a concurrent one
    /// (a disable, a narrowed scope) and is checked against the record it is applied to.
    pub async fn change(
        &self,
        id: &str,
        change: KeyChange,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, KeyError> {
        self.change_if(id, change, actor, now, |_| true)
            .await?
            .ok_or(KeyError::NotFound)
    }

    /// [`Self::change`] on behalf of a caller whose right to make it was judged on `checked`
    /// (`None`: the operator, who may change any key): made only while the key's authority
    /// ([`same_authority`]) is still `checked`'s, else `ChangedMeanwhile` and nothing written.
    /// Without it, a concurrent writer could widen the key between the check and the write,
    /// and the change (an enable) would apply to a key the caller could not have changed.
    pub async fn change_checked(
        &self,
        id: &str,
        change: KeyChange,
        checked: Option<&KeyRecord>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, KeyError> {
        let Some(checked) = checked else {
            return self.change(id, change, actor, now).await;
        };
        self.change_if(id, change, actor, now, |current| {
            same_authority(current, checked)
        })
        .await?
        .ok_or(KeyError::ChangedMeanwhile)
    }

    /// [`Self::change`], made only while `applies` holds for the key as it is read (each
    /// attempt reads it again): `None` when it does not.
    async fn change_if(
        &self,
        id: &str,
        change: KeyChange,
        actor: &Actor,
        now: DateTime<Utc>,
        applies: impl Fn(&KeyRecord) -> bool,
    ) -> Result<Option<KeyRecord>, KeyError> {
        // Only a change that lets the key act for its user again (an enable, a new user) can
        // have raced that user's removal.
        let joins_user = change.is_enabled == Some(true) || change.behalf_of_user_id.is_some();
        let changed = self
            .write_change_if(id, change, actor, now, applies)
            .await?;
        match changed {
            Some(record) if joins_user => {
                Ok(Some(self.kept_with_its_user(record, actor, now).await))
            }
            other => Ok(other),
        }
    }

    /// [`Self::change_if`] without the membership check after the write.
    async fn write_change_if(
        &self,
        id: &str,
        change: KeyChange,
        actor: &Actor,
        now: DateTime<Utc>,
        applies: impl Fn(&KeyRecord) -> bool,
    ) -> Result<Option<KeyRecord>, KeyError> {
        for _ in 0..CHANGE_ATTEMPTS {
            let current = self.get(id).await?;
            if !applies(&current) {
                return Ok(None);
            }
            let (mut record, fields, toggled) = self
                .apply_change(current.clone(), change.clone(), now)
                .await?;
            // A change to what the key already is (`{}`, `is_enabled` as it stands) writes
            // nothing: no new updated_time, no change published to the gateways, no event.
            if record == current {
                return Ok(Some(current));
            }
            // Never before the stored stamp: `now` is this request's start, kept across the
            // attempts of this loop, and a writer that won one in between may have stamped a
            // later time (review: `updated_time` went backwards).
            record.updated_time = now.max(current.updated_time);
            match self.store.update(&current, &record).await {
                Ok(()) => {}
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
            if !fields.is_empty() {
                let details = BTreeMap::from([("fields".to_owned(), fields.join(","))]);
                self.audit(actor, AuditAction::Update, Some(&record), details, now)
                    .await;
            }
            if let Some(enabled) = toggled {
                let action = if enabled {
                    AuditAction::Enable
                } else {
                    AuditAction::Disable
                };
                self.audit(actor, action, Some(&record), BTreeMap::new(), now)
                    .await;
            }
            return Ok(Some(record));
        }
        Err(kept_changing(id))
    }

    /// `record` with `change` applied and checked, the names of the fields whose value it
    /// changes and, when it flips `is_enabled`, the new value. `updated_time` is the caller's.
    async fn apply_change(
        &self,
        mut record: KeyRecord,
        change: KeyChange,
        now: DateTime<Utc>,
    ) -> Result<(KeyRecord, Vec<&'static str>, Option<bool>), KeyError> {
        let mut fields: Vec<&'static str> = Vec::new();
        if let Some(name) = change.name {
            Self::check_text("name", &name, MAX_NAME_LEN)?;
            set(&mut record.name, name, "name", &mut fields);
        }
        if let Some(d) = change.description {
            if let Some(d) = &d {
                Self::check_text("description", d, MAX_DESCRIPTION_LEN)?;
            }
            // `""` is no description, as a key without one is shown: a client giving back the
            // `""` it read changes nothing (it once wrote the record and an audit event).
            let d = d.filter(|d| !d.is_empty());
            if record.description.as_deref().unwrap_or("") != d.as_deref().unwrap_or("") {
                set(&mut record.description, d, "description", &mut fields);
            }
        }
        if let Some(scopes) = change.scope_names {
            let scopes = dedup_scopes(scopes)?;
            self.check_scopes(&scopes)?;
            set(&mut record.scope_names, scopes, "scope_names", &mut fields);
        }
        if let Some(ips) = change.allow_ips {
            if ips.len() > MAX_ALLOW_IPS {
                return Err(KeyError::AllowIpInvalid(format!(
                    "at most {MAX_ALLOW_IPS} entries"
                )));
            }
            set(&mut record.allow_ips, ips, "allow_ips", &mut fields);
        }
        if let Some(user) = change.behalf_of_user_id {
            self.check_user(record.team_id.as_deref(), user.as_deref())
                .await?;
            if user.is_none() && record.key_type == KeyType::User {
                return Err(KeyError::UserInvalid(
                    "a user key must keep the user it acts for".into(),
                ));
            }
            set(
                &mut record.behalf_of_user_id,
                user,
                "behalf_of_user_id",
                &mut fields,
            );
        }
        if let Some(t) = change.expires_time {
            Self::check_expiry(t, now)?;
            set(&mut record.expires_time, t, "expires_time", &mut fields);
        }
        if let Some(m) = change.metadata {
            Self::check_metadata(&m)?;
            set(&mut record.metadata, m, "metadata", &mut fields);
        }
        let toggled = change
            .is_enabled
            .filter(|e| *e != record.is_enabled)
            .inspect(|e| record.is_enabled = *e);
        if toggled == Some(true) {
            self.check_user_key(&record).await?;
        }
        Ok((record, fields, toggled))
    }

    pub async fn set_enabled(
        &self,
        id: &str,
        enabled: bool,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, KeyError> {
        let change = KeyChange {
            is_enabled: Some(enabled),
            ..KeyChange::default()
        };
        self.change(id, change, actor, now).await
    }

    pub async fn revoke(
        &self,
        id: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<(), KeyError> {
        self.revoke_checked(id, None, actor, now).await
    }

    /// Deletes the key. `checked`: the record the caller's right to delete it was judged on
    /// (`None`: the operator); the key is deleted only while its authority
    /// ([`same_authority`]) is still `checked`'s, else `ChangedMeanwhile` and nothing removed
    /// (a key moved to an owner meanwhile is not a member's admin key's to delete).
    pub async fn revoke_checked(
        &self,
        id: &str,
        checked: Option<&KeyRecord>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<(), KeyError> {
        let mut deleted = None;
        for _ in 0..CHANGE_ATTEMPTS {
            let current = match self.get(id).await {
                Err(KeyError::Store(StoreError::Corrupt(why))) if checked.is_none() => {
                    return self.revoke_unreadable(id, &why, actor, now).await;
                }
                read => read?,
            };
            if checked.is_some_and(|checked| !same_authority(&current, checked)) {
                return Err(KeyError::ChangedMeanwhile);
            }
            match self.store.delete_if(&current).await {
                Ok(()) => {
                    deleted = Some(current);
                    break;
                }
                Err(StoreError::Conflict) => continue,
                // The record reads but what the store keeps beside it does not (a hash that
                // cannot be one): the operator's delete needs neither (see `revoke_unreadable`).
                Err(StoreError::Corrupt(why)) if checked.is_none() => {
                    tracing::warn!(api_key_id = %id, unreadable = %why, "deleting a key whose stored entry cannot be read");
                    self.store.delete(id).await?;
                    deleted = Some(current);
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let Some(record) = deleted else {
            return Err(kept_changing(id));
        };
        self.reveal.invalidate(id);
        self.audit(
            actor,
            AuditAction::Delete,
            Some(&record),
            BTreeMap::new(),
            now,
        )
        .await;
        Ok(())
    }

    /// The operator's delete of a key whose stored record cannot be read (a hand edit, a
    /// foreign writer): nothing readable says whose key it is, so only the operator may, and
    /// the store removes it unconditionally ([`KeyStore::delete`] finds its hashes without the
    /// record). On Redis its hash entries may hold an intact copy that still authenticates it,
    /// so this is how such a key is revoked. Audited with the id alone (team and user unknown).
    async fn revoke_unreadable(
        &self,
        id: &str,
        why: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<(), KeyError> {
        tracing::warn!(api_key_id = %id, unreadable = %why, "deleting a key whose stored record cannot be read");
        self.store.delete(id).await?;
        self.reveal.invalidate(id);
        let details = BTreeMap::from([("record".to_owned(), "unreadable".to_owned())]);
        let mut event = Self::event(actor, AuditAction::Delete, None, details, now);
        event.api_key_id = Some(id.to_owned());
        self.audit_done(event).await;
        Ok(())
    }

    /// Gives the key a new value. `checked`: the record the caller's right to hold the key's
    /// value was judged on (`None`: the operator, who may rotate any key); the rotation is made
    /// only while the key's authority ([`same_authority`]) is still `checked`'s, else
    /// `ChangedMeanwhile` and nothing written. The store rotates only the very record read
    /// here (`Conflict` otherwise), so a change landing in between is read again and checked.
    pub async fn rotate(
        &self,
        id: &str,
        grace: Duration,
        checked: Option<&KeyRecord>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<(NewKey, KeyRecord), KeyError> {
        if grace > MAX_ROTATION_GRACE {
            return Err(KeyError::Invalid {
                field: "grace_seconds",
                reason: format!("at most 30 days ({})", MAX_ROTATION_GRACE.as_secs()),
            });
        }
        // The new key stays in the key's slot, next to its id entry; an id without a tag cannot
        // name a stored key.
        let tag = SlotTag::of_key_id(id).ok_or(KeyError::NotFound)?;
        let key = NewKey::generate(&self.prefix, tag);
        for _ in 0..CHANGE_ATTEMPTS {
            let current = self.get(id).await?;
            if checked.is_some_and(|checked| !same_authority(&current, checked)) {
                return Err(KeyError::ChangedMeanwhile);
            }
            // A removed member's `user` key gets no new value, as it could not be made for them.
            self.check_user_key(&current).await?;
            let record = match self
                .store
                .rotate(&current, &key.hash(), &key.key_start(), grace, now)
                .await
            {
                Ok(record) => record,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            };
            self.remember_for_reveal(id, &key);
            let details =
                BTreeMap::from([("grace_seconds".to_owned(), grace.as_secs().to_string())]);
            self.audit(actor, AuditAction::Rotate, Some(&record), details, now)
                .await;
            return Ok((key, record));
        }
        Err(kept_changing(id))
    }

    pub async fn put_member(
        &self,
        team: &str,
        user: &str,
        role: Role,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Member, KeyError> {
        Self::check_id("team_id", team)?;
        Self::check_id("user_id", user)?;
        let member = self
            .store
            .put_member(&Member {
                team_id: team.to_owned(),
                user_id: user.to_owned(),
                role,
                added_time: now,
            })
            .await?;
        let event = AuditEvent {
            event_id: String::new(),
            time: now,
            actor: actor.id.clone(),
            action: AuditAction::MemberPut,
            api_key_id: None,
            team_id: Some(team.to_owned()),
            user_id: Some(user.to_owned()),
            client_ip: actor.client_ip.clone(),
            request_id: actor.request_id.clone(),
            client_request_id: actor.client_request_id.clone(),
            details: BTreeMap::from([("role".to_owned(), format!("{role:?}").to_lowercase())]),
        };
        self.audit_done(event).await;
        Ok(member)
    }

    /// Removes a member. Their `user` keys in the team are disabled; `shared` keys that acted
    /// for them fall back to the team's first owner (else admin), or to nobody.
    /// Returns the keys that changed.
    ///
    /// The member goes first, so that no key can be made or enabled for them meanwhile
    /// ([`Self::kept_with_its_user`] covers one whose check came just before), then their
    /// keys. A failure on the way (the store unreachable) leaves keys acting for someone who
    /// is no longer a member: the same request again finishes the job, as it looks for such
    /// keys even when the member is already gone (`MemberNotFound` only when there were none).
    pub async fn remove_member(
        &self,
        team: &str,
        user: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Vec<KeyRecord>, KeyError> {
        let removed = self.store.remove_member(team, user).await?;
        if removed.is_some() {
            let event = AuditEvent {
                event_id: String::new(),
                time: now,
                actor: actor.id.clone(),
                action: AuditAction::MemberRemove,
                api_key_id: None,
                team_id: Some(team.to_owned()),
                user_id: Some(user.to_owned()),
                client_ip: actor.client_ip.clone(),
                request_id: actor.request_id.clone(),
                client_request_id: actor.client_request_id.clone(),
                details: BTreeMap::new(),
            };
            self.audit_done(event).await;
        } else if self.store.get_member(team, user).await?.is_some() {
            // Added again meanwhile: their keys are theirs again.
            return Err(KeyError::MemberNotFound {
                team: team.to_owned(),
                user: user.to_owned(),
            });
        }

        let mut fallback = None;
        let mut changed = Vec::new();
        // Every key is tried: a failure on one leaves the others done, and the error for the
        // caller to try again.
        let mut failed = None;
        for (id, key_type) in self.keys_acting_for(team, user).await? {
            match self
                .settle_key(&id, key_type, team, user, &mut fallback, actor, now)
                .await
            {
                Ok(Some(record)) => changed.push(record),
                Ok(None) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if removed.is_none() && changed.is_empty() {
            return Err(KeyError::MemberNotFound {
                team: team.to_owned(),
                user: user.to_owned(),
            });
        }
        Ok(changed)
    }

    /// What a member's removal does to one of their keys: a `user` key is disabled, a `shared`
    /// one goes to `fallback` (the team's first owner, else admin, else nobody; looked up on
    /// first use and again when the one found is no longer a member). Only while the key is
    /// still the user's and would change: a concurrent change that gave it to someone else
    /// stands, and a key deleted since is passed over (`None`).
    #[allow(clippy::too_many_arguments)]
    async fn settle_key(
        &self,
        id: &str,
        key_type: KeyType,
        team: &str,
        user: &str,
        fallback: &mut Option<Option<String>>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyRecord>, KeyError> {
        let still_theirs = |k: &KeyRecord| {
            k.behalf_of_user_id.as_deref() == Some(user)
                && (k.key_type == KeyType::Shared || k.is_enabled)
        };
        if key_type == KeyType::User {
            let change = KeyChange {
                is_enabled: Some(false),
                ..KeyChange::default()
            };
            return match self
                .write_change_if(id, change, actor, now, still_theirs)
                .await
            {
                Err(KeyError::NotFound) => Ok(None),
                other => other,
            };
        }
        for _ in 0..FALLBACK_ATTEMPTS {
            let to = match fallback {
                Some(to) => to.clone(),
                None => fallback
                    .insert(self.fallback_user(team, user).await?)
                    .clone(),
            };
            let change = KeyChange {
                behalf_of_user_id: Some(to),
                ..KeyChange::default()
            };
            match self
                .write_change_if(id, change, actor, now, still_theirs)
                .await
            {
                Err(KeyError::NotFound) => return Ok(None),
                // The owner it was to go to was removed meanwhile: another one.
                Err(KeyError::UserInvalid(_)) => *fallback = None,
                other => return other,
            }
        }
        *fallback = Some(None);
        let change = KeyChange {
            behalf_of_user_id: Some(None),
            ..KeyChange::default()
        };
        match self
            .write_change_if(id, change, actor, now, still_theirs)
            .await
        {
            Err(KeyError::NotFound) => Ok(None),
            other => other,
        }
    }

    /// Who a removed member's `shared` keys act for next: the team's first owner, else its
    /// first admin, else nobody; never `removed` (who may be back in the list by now).
    async fn fallback_user(&self, team: &str, removed: &str) -> Result<Option<String>, KeyError> {
        let members = self.store.list_members(team).await?;
        let first = |role: Role| {
            members
                .iter()
                .find(|m| m.role == role && m.user_id != removed)
        };
        Ok(first(Role::Owner)
            .or_else(|| first(Role::Admin))
            .map(|m| m.user_id.clone()))
    }

    /// `record`, just written acting for its user (created, enabled, given to them), as it
    /// stands once that user's membership is checked again: the user may have been removed
    /// between the check before the write and the write, and the removal's pass over the
    /// team's keys may have gone by before the write landed. The key is then settled as the
    /// removal would have (`settle_key`), the same outcome as the write coming first. Checked
    /// a few times, as the user it is settled to may be leaving too. A failure here leaves the
    /// written record (logged): the write stands, and a retried removal finds the key.
    async fn kept_with_its_user(
        &self,
        mut record: KeyRecord,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> KeyRecord {
        for _ in 0..FALLBACK_ATTEMPTS {
            let (Some(team), Some(user)) = (&record.team_id, &record.behalf_of_user_id) else {
                return record;
            };
            if record.key_type == KeyType::User && !record.is_enabled {
                return record;
            }
            let (team, user) = (team.clone(), user.clone());
            let settled = match self.store.get_member(&team, &user).await {
                Ok(Some(_)) => return record,
                Ok(None) => {
                    let id = record.api_key_id.clone();
                    let mut fallback = None;
                    self.settle_key(
                        &id,
                        record.key_type,
                        &team,
                        &user,
                        &mut fallback,
                        actor,
                        now,
                    )
                    .await
                }
                Err(e) => Err(e.into()),
            };
            match settled {
                Ok(Some(next)) => record = next,
                Ok(None) => return record,
                Err(e) => {
                    tracing::warn!(
                        api_key_id = %record.api_key_id,
                        error = %e,
                        "could not check that a key's user is still a member; a retried \
                         member removal finds the key"
                    );
                    return record;
                }
            }
        }
        record
    }

    /// The ids and types of `team`'s keys that act for `user`, all read before any is changed.
    /// The listing pages by offset, oldest first: a key deleted (by anyone) between two page
    /// reads moves every later key back by one, and the one that moves onto a page already
    /// read is never seen. Changing keys between the reads, as this once did (a write and an
    /// audit event each), held the window open for the whole removal; now the pages are read
    /// back to back, and read again (a few times at most) when the team's key count moved
    /// during a pass.
    async fn keys_acting_for(
        &self,
        team: &str,
        user: &str,
    ) -> Result<Vec<(String, KeyType)>, KeyError> {
        const PER_PAGE: u32 = 500;
        const SCANS: usize = 4;
        let filter = KeyFilter {
            team_id: Some(team.to_owned()),
            ..KeyFilter::default()
        };
        let mut found: Vec<(String, KeyType)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..SCANS {
            let mut first_total = None;
            let mut steady = true;
            let mut page = 1;
            loop {
                let (records, total) = self
                    .store
                    .list(
                        &filter,
                        Page {
                            page,
                            per_page: PER_PAGE,
                        },
                    )
                    .await?;
                steady &= *first_total.get_or_insert(total) == total;
                for r in &records {
                    if r.behalf_of_user_id.as_deref() == Some(user)
                        && seen.insert(r.api_key_id.clone())
                    {
                        found.push((r.api_key_id.clone(), r.key_type));
                    }
                }
                if records.is_empty() || u64::from(page) * u64::from(PER_PAGE) >= total {
                    break;
                }
                page += 1;
            }
            if steady {
                break;
            }
        }
        Ok(found)
    }

    /// How often the key was used, summed over every gateway's flushed usage records.
    pub async fn usage(&self, id: &str) -> Result<crate::store::Usage, KeyError> {
        Ok(self
            .store
            .usage(&[id.to_owned()])
            .await?
            .into_iter()
            .next()
            .unwrap_or_default())
    }

    pub async fn list_members(&self, team: &str) -> Result<Vec<Member>, KeyError> {
        Ok(self.store.list_members(team).await?)
    }

    pub async fn audit_log(
        &self,
        filter: &AuditFilter,
        page: Page,
    ) -> Result<(Vec<AuditEvent>, u64), KeyError> {
        Ok(self.store.list_audit(filter, page).await?)
    }
}

/// Characters that show as nothing: the soft hyphen, zero-width ones, the direction marks
/// and overrides, word joiners, the byte-order mark.
fn is_invisible(c: char) -> bool {
    is_bidi_control(c)
        || matches!(c,
        '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// The bidirectional controls: the marks (LRM, RLM, ALM), embeddings and overrides, isolates.
/// In a name they reorder what is shown around them (a "Trojan Source" twin of another name).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// What free text (`name`, `description`, `metadata`) may not hold: control characters, which
/// could forge lines in anything that prints it, and the bidirectional controls.
fn is_unsafe_in_text(c: char) -> bool {
    c.is_control() || is_bidi_control(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    const TEAM_ADMIN_HOLDS: &str = "orders:read";
    const STRONGER: &str = "api_keys_read";

    /// A key service over an embedded store in `dir`, and a team key holding what a team admin
    /// holds too.
    async fn service_and_key(dir: &tempfile::TempDir) -> (KeyService, KeyRecord) {
        let store = EmbeddedStore::open(&dir.path().join("keys.db")).unwrap();
        let svc = KeyService::new(
            Arc::new(store),
            KeyPrefix::default(),
            KeyRules::permissive(),
        );
        let mut req = CreateKey::new(KeyType::Shared);
        req.team_id = Some("team-a".into());
        req.scope_names = vec![TEAM_ADMIN_HOLDS.into()];
        req.is_enabled = false;
        let (_, record) = svc.create(req, &Actor::cli(), Utc::now()).await.unwrap();
        (svc, record)
    }

    /// Another writer (the operator, on another replica) widens the key after the caller's
    /// right to act on it was checked: returns the record as checked.
    async fn widened_after_check(svc: &KeyService, id: &str) -> KeyRecord {
        let checked = svc.get(id).await.unwrap();
        let widen = KeyChange {
            scope_names: Some(vec![TEAM_ADMIN_HOLDS.into(), STRONGER.into()]),
            ..KeyChange::default()
        };
        svc.change(id, widen, &Actor::cli(), Utc::now())
            .await
            .unwrap();
        checked
    }

    #[tokio::test]
    async fn a_change_checked_against_a_since_widened_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, key) = service_and_key(&dir).await;
        let id = key.api_key_id.as_str();
        let checked = widened_after_check(&svc, id).await;
        let stored = svc.get(id).await.unwrap();

        let enable = KeyChange {
            is_enabled: Some(true),
            ..KeyChange::default()
        };
        let refused = svc
            .change_checked(
                id,
                enable.clone(),
                Some(&checked),
                &Actor::cli(),
                Utc::now(),
            )
            .await;
        assert!(
            matches!(refused, Err(KeyError::ChangedMeanwhile)),
            "{refused:?}"
        );
        assert_eq!(svc.get(id).await.unwrap(), stored, "written all the same");

        // Checked against what the key now is, it applies; the operator's (`None`) always does.
        let enabled = svc
            .change_checked(id, enable, Some(&stored), &Actor::cli(), Utc::now())
            .await
            .unwrap();
        assert!(enabled.is_enabled);
        let disable = KeyChange {
            is_enabled: Some(false),
            ..KeyChange::default()
        };
        let disabled = svc
            .change_checked(id, disable, None, &Actor::cli(), Utc::now())
            .await
            .unwrap();
        assert!(!disabled.is_enabled);
    }

    /// Review: a change stamped `updated_time` with its request's start time, kept across
    /// compare-and-set retries, so a change that lost a round to a later writer stamped a time
    /// before that writer's. A request whose time is behind the stored stamp keeps the stamp.
    #[tokio::test]
    async fn updated_time_never_goes_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, key) = service_and_key(&dir).await;
        let id = key.api_key_id.as_str();
        let later = Utc::now() + chrono::Duration::seconds(60);
        let enable = KeyChange {
            is_enabled: Some(true),
            ..KeyChange::default()
        };
        let stamped = svc.change(id, enable, &Actor::cli(), later).await.unwrap();
        assert_eq!(stamped.updated_time, later);
        let earlier = later - chrono::Duration::seconds(30);
        let rename = KeyChange {
            name: Some("renamed".into()),
            ..KeyChange::default()
        };
        let renamed = svc
            .change(id, rename, &Actor::cli(), earlier)
            .await
            .unwrap();
        assert_eq!(renamed.updated_time, later);
        let (_, rotated) = svc
            .rotate(id, Duration::ZERO, None, &Actor::cli(), earlier)
            .await
            .unwrap();
        assert_eq!(rotated.updated_time, later);
        assert_eq!(svc.get(id).await.unwrap().updated_time, later);
    }

    #[tokio::test]
    async fn a_delete_checked_against_a_since_widened_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, key) = service_and_key(&dir).await;
        let id = key.api_key_id.as_str();
        let checked = widened_after_check(&svc, id).await;
        let refused = svc
            .revoke_checked(id, Some(&checked), &Actor::cli(), Utc::now())
            .await;
        assert!(
            matches!(refused, Err(KeyError::ChangedMeanwhile)),
            "{refused:?}"
        );
        let now_is = svc.get(id).await.unwrap();
        svc.revoke_checked(id, Some(&now_is), &Actor::cli(), Utc::now())
            .await
            .unwrap();
        assert!(matches!(svc.get(id).await, Err(KeyError::NotFound)));
    }

    #[tokio::test]
    async fn a_value_is_not_revealed_for_a_key_widened_since_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("keys.db")).unwrap();
        let rules = KeyRules {
            reveal_window: Duration::from_secs(60),
            ..KeyRules::permissive()
        };
        let svc = KeyService::new(Arc::new(store), KeyPrefix::default(), rules);
        let mut req = CreateKey::new(KeyType::Shared);
        req.team_id = Some("team-a".into());
        req.scope_names = vec![TEAM_ADMIN_HOLDS.into()];
        let (key, record) = svc.create(req, &Actor::cli(), Utc::now()).await.unwrap();
        let id = record.api_key_id.as_str();
        let checked = widened_after_check(&svc, id).await;

        let shown = svc
            .reveal(&checked, &Actor::cli(), Utc::now())
            .await
            .unwrap();
        assert_eq!(shown, None, "a value for more than was checked");
        let now_is = svc.get(id).await.unwrap();
        let shown = svc
            .reveal(&now_is, &Actor::cli(), Utc::now())
            .await
            .unwrap();
        assert_eq!(shown.as_deref().map(String::as_str), Some(key.expose()));
    }

    #[tokio::test]
    async fn a_rotation_checked_against_a_since_widened_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, key) = service_and_key(&dir).await;
        let id = key.api_key_id.as_str();
        let checked = widened_after_check(&svc, id).await;
        let stored = svc.get(id).await.unwrap();

        let refused = svc
            .rotate(
                id,
                Duration::ZERO,
                Some(&checked),
                &Actor::cli(),
                Utc::now(),
            )
            .await;
        assert!(
            matches!(refused, Err(KeyError::ChangedMeanwhile)),
            "{refused:?}"
        );
        assert_eq!(svc.get(id).await.unwrap(), stored, "rotated all the same");
        let rotations = svc
            .audit_log(
                &AuditFilter {
                    api_key_id: Some(id.to_owned()),
                    ..AuditFilter::default()
                },
                Page {
                    page: 1,
                    per_page: 100,
                },
            )
            .await
            .unwrap()
            .0
            .into_iter()
            .filter(|e| e.action == AuditAction::Rotate)
            .count();
        assert_eq!(rotations, 0);

        // Checked against what the key now is, it rotates; so does the operator (`None`).
        let (value, rotated) = svc
            .rotate(id, Duration::ZERO, Some(&stored), &Actor::cli(), Utc::now())
            .await
            .unwrap();
        assert_eq!(rotated.key_start, value.key_start());
        svc.rotate(id, Duration::ZERO, None, &Actor::cli(), Utc::now())
            .await
            .unwrap();
    }

    /// Review: `" alice"` reached the upstream as `alice` (HTTP drops the spaces around a
    /// header value): a team's admin made a member `" alice"` and a key in the owner's name.
    /// `10.1.2.3/8` was once stored as `10.0.0.0/8`, and repeats were stored twice.
    #[test]
    fn allow_ips_refuse_host_bits_and_keep_a_repeat_once() {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let err = |l: &[&str]| match parse_allow_ips(&list(l)) {
            Err(KeyError::AllowIpInvalid(m)) => m,
            other => panic!("{l:?}: {other:?}"),
        };
        let m = err(&["10.1.2.3/8"]);
        assert!(
            m.contains("allow_ips[0]")
                && m.contains("\"10.1.2.3/8\"")
                && m.contains("10.0.0.0/8")
                && m.contains("10.1.2.3/32"),
            "{m}"
        );
        let m = err(&["2001:db8::1/32"]);
        assert!(
            m.contains("2001:db8::/32") && m.contains("2001:db8::1/128"),
            "{m}"
        );
        let once = |l: &[&str]| parse_allow_ips(&list(l)).unwrap();
        assert_eq!(
            once(&["10.0.0.1", "192.0.2.0/24", "10.0.0.1/32"]),
            once(&["10.0.0.1", "192.0.2.0/24"]),
            "a repeat is kept once"
        );
        assert_eq!(once(&["::ffff:10.0.0.1", "10.0.0.1"]).len(), 1);
        assert!(err(&["nope"]).contains("allow_ips[0]"));
        let ok = parse_allow_ips(&list(&[
            "10.0.0.0/8",
            "10.1.2.3",
            " 2001:db8::/32 ",
            "10.1.2.3/31",
        ]));
        assert!(ok.is_err(), "10.1.2.3/31 has a host bit set");
        let ok = parse_allow_ips(&list(&["10.0.0.0/8", "10.1.2.3", " 2001:db8::/32 "])).unwrap();
        assert_eq!(ok.len(), 3);
    }

    /// A bidirectional control in a name once passed: it is no `char::is_control`.
    #[test]
    fn free_text_refuses_bidi_controls() {
        for c in [
            '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{200e}', '\u{200f}', '\u{061c}',
        ] {
            let text = format!("invoice{c}fdp.exe");
            for field in ["name", "description"] {
                let e = KeyService::check_text(field, &text, 200).unwrap_err();
                assert!(
                    matches!(&e, KeyError::Invalid { field: f, .. } if *f == field),
                    "{c:?}: {e:?}"
                );
            }
            let m = BTreeMap::from([("k".to_owned(), text.clone())]);
            assert!(KeyService::check_metadata(&m).is_err(), "{c:?}");
            assert!(KeyService::check_id("team_id", &text).is_err(), "{c:?}");
        }
        KeyService::check_text("name", "ünïcödé name ✓ עברית", 200).unwrap();
    }

    #[test]
    fn ids_with_space_at_an_end_or_invisible_characters_are_refused() {
        for bad in [
            " alice",
            "alice ",
            "\talice",
            "alice\u{a0}",
            "al\u{200b}ice",
            "\u{feff}alice",
            "ali\u{202e}ce",
            "",
            "a/b",
            "a{b}",
            "a\nb",
        ] {
            assert!(KeyService::check_id("user_id", bad).is_err(), "{bad:?}");
        }
        for good in ["alice", "alice smith", "u-42", "bob@example.com", "zoë"] {
            assert!(KeyService::check_id("user_id", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn same_authority_ignores_what_grants_nothing() {
        let a = crate::auth::record::sample_record("apk_1");
        let mut b = a.clone();
        b.name = "renamed".into();
        b.is_enabled = !a.is_enabled;
        b.metadata.insert("k".into(), "v".into());
        b.updated_time = a.updated_time + chrono::Duration::seconds(1);
        assert!(same_authority(&a, &b));
        let widenings: [fn(&mut KeyRecord); 5] = [
            |r| r.scope_names.push(STRONGER.into()),
            |r| r.allow_ips.clear(),
            |r| r.expires_time = None,
            |r| r.behalf_of_user_id = Some("owner".into()),
            |r| r.team_id = Some("elsewhere".into()),
        ];
        for widen in widenings {
            let mut c = a.clone();
            c.allow_ips = vec!["10.0.0.0/8".parse().unwrap()];
            c.expires_time = Some(a.created_time + chrono::Duration::days(1));
            let before = c.clone();
            widen(&mut c);
            assert!(!same_authority(&before, &c), "{c:?}");
        }
    }
}
