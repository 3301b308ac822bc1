//! A member's removal against writes that race it, and against a store that fails half-way:
//! what the review of the key lifecycle found (a user key left enabled for someone who is no
//! longer a member). The races are made deterministic with a store that holds one chosen call
//! until the test lets it go.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keygate::auth::key::{KeyHash, KeyPrefix};
use keygate::auth::record::{KeyRecord, KeyType};
use keygate::keys::{Actor, CreateKey, KeyChange, KeyError, KeyRules, KeyService};
use keygate::store::embedded::EmbeddedStore;
use keygate::store::{
    AuditEvent, AuditFilter, ChangeFeed, KeyFilter, KeyStore, Member, Page, Role, StoreError,
    Usage, UsageDelta,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// Which store call to hold or fail next.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Call {
    Create,
    Update,
    List,
    GetMember,
}

/// One armed call: held until released, or failed.
enum Trap {
    Hold {
        entered: oneshot::Sender<()>,
        release: Arc<Notify>,
    },
    Fail,
}

/// The embedded store, with one call of a chosen kind held or failed.
struct Trapped {
    inner: EmbeddedStore,
    armed: Mutex<Vec<(Call, Trap)>>,
}

impl Trapped {
    /// Holds the next `call` until the returned `Notify` is notified; the receiver resolves
    /// once the call has reached the store.
    fn hold(&self, call: Call) -> (oneshot::Receiver<()>, Arc<Notify>) {
        let (entered, reached) = oneshot::channel();
        let release = Arc::new(Notify::new());
        let trap = Trap::Hold {
            entered,
            release: release.clone(),
        };
        self.armed.lock().unwrap().push((call, trap));
        (reached, release)
    }

    fn fail(&self, call: Call) {
        self.armed.lock().unwrap().push((call, Trap::Fail));
    }

    async fn sprung(&self, call: Call) -> Result<(), StoreError> {
        let trap = {
            let mut armed = self.armed.lock().unwrap();
            let i = armed.iter().position(|(c, _)| *c == call);
            i.map(|i| armed.remove(i).1)
        };
        match trap {
            None => Ok(()),
            Some(Trap::Fail) => Err(StoreError::Unavailable("injected failure".into())),
            Some(Trap::Hold { entered, release }) => {
                let _ = entered.send(());
                release.notified().await;
                Ok(())
            }
        }
    }
}

#[async_trait]
impl KeyStore for Trapped {
    async fn find_by_hash(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.find_by_hash(hash, now).await
    }
    async fn create(
        &self,
        record: &KeyRecord,
        hash: &KeyHash,
        team_limit: Option<u32>,
    ) -> Result<(), StoreError> {
        self.sprung(Call::Create).await?;
        self.inner.create(record, hash, team_limit).await
    }
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get(id).await
    }
    async fn update(&self, expected: &KeyRecord, record: &KeyRecord) -> Result<(), StoreError> {
        self.sprung(Call::Update).await?;
        self.inner.update(expected, record).await
    }
    async fn rotate(
        &self,
        expected: &KeyRecord,
        new_hash: &KeyHash,
        new_key_start: &str,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, StoreError> {
        self.inner
            .rotate(expected, new_hash, new_key_start, grace, now)
            .await
    }
    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.inner.delete(id).await
    }
    async fn delete_if(&self, expected: &KeyRecord) -> Result<(), StoreError> {
        self.inner.delete_if(expected).await
    }
    async fn list(
        &self,
        filter: &KeyFilter,
        page: Page,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError> {
        self.sprung(Call::List).await?;
        self.inner.list(filter, page).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn changes(&self) -> Result<ChangeFeed, StoreError> {
        self.inner.changes().await
    }
    async fn put_member(&self, member: &Member) -> Result<Member, StoreError> {
        self.inner.put_member(member).await
    }
    async fn remove_member(&self, team: &str, user: &str) -> Result<Option<Member>, StoreError> {
        self.inner.remove_member(team, user).await
    }
    async fn get_member(&self, team: &str, user: &str) -> Result<Option<Member>, StoreError> {
        self.sprung(Call::GetMember).await?;
        self.inner.get_member(team, user).await
    }
    async fn list_members(&self, team: &str) -> Result<Vec<Member>, StoreError> {
        self.inner.list_members(team).await
    }
    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditEvent, StoreError> {
        self.inner.append_audit(event).await
    }
    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: Page,
    ) -> Result<(Vec<AuditEvent>, u64), StoreError> {
        self.inner.list_audit(filter, page).await
    }
    async fn record_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError> {
        self.inner.record_usage(batch).await
    }
    async fn usage(&self, ids: &[String]) -> Result<Vec<Usage>, StoreError> {
        self.inner.usage(ids).await
    }
}

struct Setup {
    store: Arc<Trapped>,
    service: Arc<KeyService>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Trapped {
        inner: EmbeddedStore::open(&dir.path().join("keys.db")).unwrap(),
        armed: Mutex::new(Vec::new()),
    });
    let service = Arc::new(KeyService::new(
        store.clone(),
        KeyPrefix::default(),
        KeyRules::permissive(),
    ));
    Setup {
        store,
        service,
        _dir: dir,
    }
}

async fn member(s: &Setup, team: &str, user: &str, role: Role) {
    s.service
        .put_member(team, user, role, &Actor::cli(), Utc::now())
        .await
        .unwrap();
}

async fn key_for(s: &Setup, team: &str, user: &str, key_type: KeyType, enabled: bool) -> String {
    let mut req = CreateKey::new(key_type);
    req.team_id = Some(team.into());
    req.behalf_of_user_id = Some(user.into());
    req.is_enabled = enabled;
    let (_, record) = s
        .service
        .create(req, &Actor::cli(), Utc::now())
        .await
        .unwrap();
    record.api_key_id
}

async fn stored(s: &Setup, id: &str) -> KeyRecord {
    s.service.get(id).await.unwrap()
}

#[tokio::test]
async fn a_user_key_created_while_its_user_is_removed_ends_disabled() {
    let s = setup().await;
    member(&s, "t", "owner", Role::Owner).await;
    member(&s, "t", "u1", Role::Member).await;
    // The create has checked u1's membership and is about to write.
    let (reached, release) = s.store.hold(Call::Create);
    let service = s.service.clone();
    let create = tokio::spawn(async move {
        let mut req = CreateKey::new(KeyType::User);
        req.team_id = Some("t".into());
        req.behalf_of_user_id = Some("u1".into());
        service.create(req, &Actor::cli(), Utc::now()).await
    });
    reached.await.unwrap();
    let changed = s
        .service
        .remove_member("t", "u1", &Actor::cli(), Utc::now())
        .await
        .unwrap();
    assert!(changed.is_empty(), "the key was not written yet");
    release.notify_one();
    let (_, answered) = create.await.unwrap().unwrap();
    assert!(!answered.is_enabled, "answered as it is stored");
    assert!(!stored(&s, &answered.api_key_id).await.is_enabled);
}

#[tokio::test]
async fn a_user_key_enabled_while_its_user_is_removed_ends_disabled() {
    let s = setup().await;
    member(&s, "t", "u2", Role::Member).await;
    let id = key_for(&s, "t", "u2", KeyType::User, false).await;
    // The enable has read the key, checked u2's membership, and is about to write.
    let (reached, release) = s.store.hold(Call::Update);
    let service = s.service.clone();
    let key = id.clone();
    let enable = tokio::spawn(async move {
        let change = KeyChange {
            is_enabled: Some(true),
            ..KeyChange::default()
        };
        service
            .change(&key, change, &Actor::cli(), Utc::now())
            .await
    });
    reached.await.unwrap();
    // The removal finds the key disabled: nothing for it to write.
    let changed = s
        .service
        .remove_member("t", "u2", &Actor::cli(), Utc::now())
        .await
        .unwrap();
    assert!(changed.is_empty());
    release.notify_one();
    let answered = enable.await.unwrap().unwrap();
    assert!(!answered.is_enabled, "answered as it is stored");
    assert!(!stored(&s, &id).await.is_enabled);
}

#[tokio::test]
async fn a_removal_that_failed_half_way_is_finished_by_the_same_request_again() {
    let s = setup().await;
    member(&s, "t", "owner", Role::Owner).await;
    member(&s, "t", "u3", Role::Member).await;
    let user_key = key_for(&s, "t", "u3", KeyType::User, true).await;
    let shared_key = key_for(&s, "t", "u3", KeyType::Shared, true).await;
    // The member row is gone, then the key scan fails.
    s.store.fail(Call::List);
    let first = s
        .service
        .remove_member("t", "u3", &Actor::cli(), Utc::now())
        .await;
    assert!(matches!(first, Err(KeyError::Store(_))), "{first:?}");
    assert!(stored(&s, &user_key).await.is_enabled, "not reached yet");

    let changed = s
        .service
        .remove_member("t", "u3", &Actor::cli(), Utc::now())
        .await
        .unwrap();
    let mut ids: Vec<_> = changed.iter().map(|k| k.api_key_id.clone()).collect();
    ids.sort();
    let mut expected = vec![user_key.clone(), shared_key.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    assert!(!stored(&s, &user_key).await.is_enabled);
    assert_eq!(
        stored(&s, &shared_key).await.behalf_of_user_id.as_deref(),
        Some("owner")
    );
    // Done: a third time there is nothing left, and no such member.
    let third = s
        .service
        .remove_member("t", "u3", &Actor::cli(), Utc::now())
        .await;
    assert!(
        matches!(third, Err(KeyError::MemberNotFound { .. })),
        "{third:?}"
    );
}

#[tokio::test]
async fn a_shared_key_goes_to_another_owner_when_the_first_one_leaves_meanwhile() {
    let s = setup().await;
    member(&s, "t2", "own", Role::Owner).await;
    member(&s, "t2", "admin", Role::Admin).await;
    member(&s, "t2", "u4", Role::Member).await;
    let shared_key = key_for(&s, "t2", "u4", KeyType::Shared, true).await;
    let user_key = key_for(&s, "t2", "u4", KeyType::User, true).await;
    // The removal has picked `own` for the shared key and is checking it is a member.
    let (reached, release) = s.store.hold(Call::GetMember);
    let service = s.service.clone();
    let removal = tokio::spawn(async move {
        service
            .remove_member("t2", "u4", &Actor::cli(), Utc::now())
            .await
    });
    reached.await.unwrap();
    s.service
        .remove_member("t2", "own", &Actor::cli(), Utc::now())
        .await
        .unwrap();
    release.notify_one();
    let changed = removal.await.unwrap().unwrap();
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert_eq!(
        stored(&s, &shared_key).await.behalf_of_user_id.as_deref(),
        Some("admin")
    );
    assert!(!stored(&s, &user_key).await.is_enabled);
}

#[tokio::test]
async fn changed_keys_lists_only_keys_the_removal_changed() {
    let s = setup().await;
    member(&s, "t", "u9", Role::Member).await;
    let disabled = key_for(&s, "t", "u9", KeyType::User, false).await;
    let enabled = key_for(&s, "t", "u9", KeyType::User, true).await;
    let changed = s
        .service
        .remove_member("t", "u9", &Actor::cli(), Utc::now())
        .await
        .unwrap();
    let ids: Vec<_> = changed.iter().map(|k| k.api_key_id.as_str()).collect();
    assert_eq!(ids, [enabled.as_str()]);
    assert!(!stored(&s, &disabled).await.is_enabled);
}
