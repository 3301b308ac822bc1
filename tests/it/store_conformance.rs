//! One conformance suite for every [`KeyStore`]: each check below is written once, against the
//! trait, and the `conformance!` macro runs it against the embedded store (a SQLite file in a
//! temporary directory), against the Redis store on a private `redis-server`, and against the
//! Redis store on a private three-node Redis Cluster (see `support::redis`). Tests are named
//! `store_conformance::{embedded,redis,cluster}::<check>`.
//! Time-dependent behaviour (rotation grace) is tested through the `now` argument, not by
//! sleeping; the few real-time checks (Redis expiry, outage) are Redis-only and at the end.

// A failed unwrap is a failed test, which is what we want here (Cargo.toml: "tests may unwrap").
#![allow(clippy::unwrap_used)]

use crate::support::redis::{RedisCluster, RedisServer};
use chrono::{DateTime, Utc};
use keygate::auth::key::{KeyHash, KeyPrefix, NewKey, SlotTag, new_key_id};
use keygate::auth::record::{KeyRecord, KeyType};
use keygate::auth::verified::VerifiedKey;
use keygate::keys::{Actor, CreateKey, KeyChange, KeyRules, KeyService};
use keygate::store::embedded::EmbeddedStore;
use keygate::store::redis::RedisStore;
use keygate::store::{
    AuditAction, AuditEvent, AuditFilter, Change, ChangeFeed, KeyFilter, KeyStore, Member, Page,
    RECORD_CAP, Role, StoreError,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

// A ceiling for a CI machine with two cores running every test at once (a racing cluster
// rotation once took over 2 s there); these checks are about results, not latency.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// A store under test and what keeps its data alive.
struct Harness {
    store: Arc<dyn KeyStore>,
    backing: Backing,
}

enum Backing {
    Embedded(tempfile::TempDir),
    Redis { server: RedisServer, ns: String },
    Cluster { cluster: RedisCluster, ns: String },
}

impl Harness {
    fn embedded() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("keys.db")).unwrap();
        Self {
            store: Arc::new(store),
            backing: Backing::Embedded(dir),
        }
    }

    async fn redis() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let server = RedisServer::start();
        let ns = format!("kgt{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let store = RedisStore::connect(&server.url(), &ns, OP_TIMEOUT)
            .await
            .unwrap();
        Self {
            store: Arc::new(store),
            backing: Backing::Redis { server, ns },
        }
    }

    async fn cluster() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let cluster = RedisCluster::start();
        let ns = format!("kgc{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let store = RedisStore::connect_cluster(&cluster.urls(), &ns, OP_TIMEOUT)
            .await
            .unwrap();
        Self {
            store: Arc::new(store),
            backing: Backing::Cluster { cluster, ns },
        }
    }

    /// Another store on the same data: for the store, as good as another process.
    async fn second(&self) -> Arc<dyn KeyStore> {
        match &self.backing {
            Backing::Embedded(dir) => {
                Arc::new(EmbeddedStore::open(&dir.path().join("keys.db")).unwrap())
            }
            Backing::Redis { server, ns } => Arc::new(
                RedisStore::connect(&server.url(), ns, OP_TIMEOUT)
                    .await
                    .unwrap(),
            ),
            Backing::Cluster { cluster, ns } => Arc::new(
                RedisStore::connect_cluster(&cluster.urls(), ns, OP_TIMEOUT)
                    .await
                    .unwrap(),
            ),
        }
    }

    /// Another store on the same data that keeps about `cap` audit events, through the stores'
    /// test-only `with_audit_cap` (checking the real cap would take 100 000 appends).
    async fn with_audit_cap(&self, cap: usize) -> Arc<dyn KeyStore> {
        match &self.backing {
            Backing::Embedded(dir) => Arc::new(
                EmbeddedStore::open(&dir.path().join("keys.db"))
                    .unwrap()
                    .with_audit_cap(cap),
            ),
            Backing::Redis { server, ns } => Arc::new(
                RedisStore::connect(&server.url(), ns, OP_TIMEOUT)
                    .await
                    .unwrap()
                    .with_audit_cap(cap),
            ),
            Backing::Cluster { cluster, ns } => Arc::new(
                RedisStore::connect_cluster(&cluster.urls(), ns, OP_TIMEOUT)
                    .await
                    .unwrap()
                    .with_audit_cap(cap),
            ),
        }
    }
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $check() {
                    super::$check(super::Harness::embedded()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $check() {
                    super::$check(super::Harness::redis().await).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $check() {
                    super::$check(super::Harness::cluster().await).await;
                }
            )*
        }
    };
}

conformance!(
    create_and_find,
    get_update_delete,
    rotate_with_grace,
    rotate_with_zero_grace,
    delete_removes_every_hash,
    list_filters_and_pages,
    team_limit,
    team_limit_holds_under_concurrency,
    concurrent_rotations_leave_one_hash,
    change_feed_reports_every_write,
    update_of_a_stale_copy_is_refused,
    rotate_of_a_stale_copy_is_refused,
    delete_of_a_stale_copy_is_refused,
    concurrent_changes_never_undo_a_disable,
    updates_racing_a_delete_leave_nothing_listed,
    reveal_after_another_process_rotated_is_null,
    usage_adds_up_and_forgets_deleted_keys,
    usage_of_many_keys_in_many_slots_in_one_flush,
    members_put_get_remove,
    members_list_oldest_first,
    member_put_races_keep_the_first_added_time,
    audit_append_assigns_increasing_ids,
    audit_lists_newest_first_and_filters,
    audit_pages_and_totals,
    audit_pages_across_a_long_log,
    audit_is_capped,
    delete_of_an_unreadable_record_removes_every_hash,
);

/// The hash of a new key for `r`: in `r`'s slot, as the key service mints them (the Redis
/// store refuses a hash whose slot tag is not its key id's).
fn new_hash(r: &KeyRecord) -> KeyHash {
    let tag = SlotTag::of_key_id(&r.api_key_id).unwrap();
    NewKey::generate(&KeyPrefix::default(), tag).hash()
}

/// A record as the key service makes them: a team key in its team's slot, others in a random
/// one.
fn record(team: Option<&str>, created: DateTime<Utc>) -> KeyRecord {
    let tag = team.map_or_else(SlotTag::random, SlotTag::for_team);
    let mut r = KeyRecord::new(
        new_key_id(tag),
        "test key".into(),
        KeyType::Shared,
        "kg_abcdefg".into(),
        created,
    );
    r.team_id = team.map(str::to_owned);
    r.created_by = Some("tester".into());
    r.scope_names = vec!["read".into()];
    r
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

fn all_filter() -> KeyFilter {
    KeyFilter::default()
}

fn filter(team: Option<&str>, key_type: Option<KeyType>, is_enabled: Option<bool>) -> KeyFilter {
    let team_id = team.map(str::to_owned);
    KeyFilter {
        team_id,
        key_type,
        is_enabled,
    }
}

fn team(t: &str) -> KeyFilter {
    filter(Some(t), None, None)
}

/// What `hash` leads to at `at`; store errors fail the test. `find_by_hash`, checked against `find_verified_by_hash` (the request path's lookup, which a
/// store may decode differently): the same key, cut down the same way, grace periods included.
/// Redis may expire a rotated-out hash by itself between the two lookups, so the request path's
/// is made first: a hash the second lookup still finds, the first must have found the same; one
/// that only the first found must be gone on asking again (expiry only goes one way).
async fn find(s: &dyn KeyStore, hash: &KeyHash, at: DateTime<Utc>) -> Option<KeyRecord> {
    let verified = s.find_verified_by_hash(hash, at).await.unwrap();
    let record = s.find_by_hash(hash, at).await.unwrap();
    match &record {
        Some(r) => assert_eq!(verified, Some(VerifiedKey::from(r))),
        None if verified.is_some() => {
            assert_eq!(s.find_verified_by_hash(hash, at).await.unwrap(), None);
        }
        None => {}
    }
    record
}

fn page(page: u32, per_page: u32) -> Page {
    Page { page, per_page }
}

async fn create_and_find(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let key = new_hash(&r);
    s.create(&r, &key, None).await.unwrap();
    assert_eq!(find(s, &key, now).await, Some(r.clone()));
    assert_eq!(find(s, &new_hash(&r), now).await, None);
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), Some(r.clone()));
    assert_eq!(s.get("apk_doesnotexist").await.unwrap(), None);

    // Every field survives the round trip, including a key without a team.
    let mut rich = record(None, now);
    rich.description = Some("deploy bot".into());
    rich.key_type = KeyType::User;
    rich.behalf_of_user_id = Some("user-7".into());
    rich.allow_ips = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    rich.expires_time = Some(now + secs(86_400));
    rich.last_used_time = Some(now);
    rich.metadata.insert("env".into(), "prod".into());
    let rich_key = new_hash(&rich);
    s.create(&rich, &rich_key, None).await.unwrap();
    assert_eq!(find(s, &rich_key, now).await, Some(rich));
    s.ping().await.unwrap();
}

async fn get_update_delete(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let key = new_hash(&r);
    s.create(&r, &key, None).await.unwrap();

    let mut changed = r.clone();
    changed.name = "renamed".into();
    changed.scope_names = vec!["write".into(), "admin".into()];
    changed.updated_time = now + secs(1);
    s.update(&r, &changed).await.unwrap();
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), Some(changed.clone()));
    assert_eq!(find(s, &key, now).await, Some(changed.clone()));

    // Disabling is an update; the record says so and the gateway refuses it.
    let before = changed.clone();
    changed.is_enabled = false;
    s.update(&before, &changed).await.unwrap();
    let found = find(s, &key, now).await.unwrap();
    assert!(!found.is_enabled);

    // Moving to another team moves it in team listings too.
    let before = changed.clone();
    changed.team_id = Some("team-b".into());
    s.update(&before, &changed).await.unwrap();
    assert_eq!(s.list(&team("team-b"), page(1, 10)).await.unwrap().1, 1);
    assert_eq!(s.list(&team("team-a"), page(1, 10)).await.unwrap().1, 0);

    let missing = record(Some("team-a"), now);
    assert_not_found(s.update(&missing, &missing).await);
    assert_eq!(s.get(&missing.api_key_id).await.unwrap(), None);

    s.delete(&r.api_key_id).await.unwrap();
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), None);
    assert_eq!(find(s, &key, now).await, None);
    assert_not_found(s.delete(&r.api_key_id).await);
    assert_not_found(s.update(&changed, &changed).await);
}

async fn rotate_with_grace(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let id = r.api_key_id.clone();
    let (k1, k2, k3, k4) = (new_hash(&r), new_hash(&r), new_hash(&r), new_hash(&r));
    s.create(&r, &k1, None).await.unwrap();

    let rotated = s.rotate(&r, &k2, "kg_second", MINUTE, now).await.unwrap();
    assert_eq!(rotated.key_start, "kg_second");
    assert_eq!(rotated.updated_time, now);
    assert_eq!(rotated.name, r.name);
    assert_eq!(s.get(&id).await.unwrap(), Some(rotated.clone()));
    // Both hashes lead to the new record during the grace; the old one stops at now + grace.
    assert_eq!(find(s, &k2, now).await, Some(rotated.clone()));
    // Through the old hash, the key expires when the grace ends: a gateway that caches this
    // answer still refuses the old key on time, with nothing to invalidate.
    let grace_end = DateTime::from_timestamp_millis((now + secs(60)).timestamp_millis()).unwrap();
    let old_view = |r: &KeyRecord| KeyRecord {
        expires_time: Some(grace_end),
        ..r.clone()
    };
    assert_eq!(find(s, &k1, now).await, Some(old_view(&rotated)));
    assert!(find(s, &k1, now + secs(59)).await.is_some());
    assert_eq!(find(s, &k1, now + secs(60)).await, None);
    assert_eq!(find(s, &k1, now + secs(61)).await, None);
    assert!(find(s, &k2, now + secs(86_400)).await.is_some());

    // An update during the grace reaches the old hash and keeps its deadline.
    let mut updated = rotated.clone();
    updated.name = "updated in grace".into();
    s.update(&rotated, &updated).await.unwrap();
    assert_eq!(find(s, &k1, now + secs(59)).await, Some(old_view(&updated)));
    assert_eq!(find(s, &k1, now + secs(61)).await, None);

    // A later rotation with a longer grace never extends an earlier one...
    let third = s
        .rotate(&updated, &k3, "kg_third", HOUR, now + secs(10))
        .await
        .unwrap();
    assert!(find(s, &k1, now + secs(59)).await.is_some());
    assert_eq!(find(s, &k1, now + secs(61)).await, None);
    assert!(find(s, &k2, now + secs(3000)).await.is_some());
    // ...and a zero-grace rotation (a leaked key) ends every grace at once.
    let last = s
        .rotate(&third, &k4, "kg_fourth", Duration::ZERO, now + secs(20))
        .await
        .unwrap();
    for old in [&k1, &k2, &k3] {
        assert_eq!(find(s, old, now + secs(20)).await, None);
    }
    assert_eq!(find(s, &k4, now + secs(20)).await, Some(last));

    // A key that expires before the grace ends keeps its own expiry through the old hash.
    let mut short = record(None, now);
    short.expires_time = Some(now + secs(30));
    let (s1, s2) = (new_hash(&short), new_hash(&short));
    s.create(&short, &s1, None).await.unwrap();
    s.rotate(&short, &s2, "kg_short", MINUTE, now)
        .await
        .unwrap();
    let seen = find(s, &s1, now).await.unwrap();
    assert_eq!(seen.expires_time, short.expires_time);

    assert_not_found(
        s.rotate(
            &KeyRecord {
                api_key_id: "apk_doesnotexist".into(),
                ..r.clone()
            },
            &new_hash(&r),
            "kg_x",
            Duration::ZERO,
            now,
        )
        .await,
    );
}

async fn rotate_with_zero_grace(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(None, now);
    let (old, new) = (new_hash(&r), new_hash(&r));
    s.create(&r, &old, None).await.unwrap();
    let rotated = s
        .rotate(&r, &new, "kg_new1234", Duration::ZERO, now)
        .await
        .unwrap();
    assert_eq!(find(s, &old, now).await, None);
    assert_eq!(find(s, &new, now).await, Some(rotated.clone()));
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), Some(rotated));
}

async fn usage_adds_up_and_forgets_deleted_keys(h: Harness) {
    use keygate::store::{Usage, UsageDelta};
    let s = &*h.store;
    let now = Utc::now();
    let r = record(None, now);
    s.create(&r, &new_hash(&r), None).await.unwrap();
    let id = r.api_key_id.clone();
    let delta = |n: u64, at: DateTime<Utc>| UsageDelta {
        api_key_id: id.clone(),
        requests: n,
        last_used: at,
    };
    s.record_usage(&[delta(3, now), delta(2, now - secs(60))])
        .await
        .unwrap();
    // A second gateway flushing an older batch never moves last_used back.
    h.second()
        .await
        .record_usage(&[delta(5, now - secs(30))])
        .await
        .unwrap();
    let got = s.usage(&[id.clone(), "apk_unknown".into()]).await.unwrap();
    assert_eq!(got[0].request_count, 10);
    assert_eq!(
        got[0].last_used_time.map(|t| t.timestamp_millis()),
        Some(now.timestamp_millis())
    );
    assert_eq!(got[1], Usage::default());
    s.delete(&id).await.unwrap();
    s.record_usage(&[delta(1, now)]).await.unwrap();
    assert_eq!(
        s.usage(std::slice::from_ref(&id)).await.unwrap()[0],
        Usage::default()
    );
}

/// More keys than one store call carries (150; Redis: 128 per script call, grouped by slot on a
/// cluster), team keys sharing a slot and others spread over every node, one key deleted before
/// the flush and one id that cannot be a key: each live key gets exactly its own count.
async fn usage_of_many_keys_in_many_slots_in_one_flush(h: Harness) {
    use keygate::store::{Usage, UsageDelta};
    let s = &*h.store;
    let now = Utc::now();
    let mut ids = Vec::new();
    for i in 0..150 {
        let team = match i % 3 {
            0 => Some("team-a"),
            1 => Some("team-b"),
            _ => None,
        };
        let r = record(team, now);
        s.create(&r, &new_hash(&r), None).await.unwrap();
        ids.push(r.api_key_id);
    }
    s.delete(&ids[7]).await.unwrap();
    let mut batch: Vec<UsageDelta> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| UsageDelta {
            api_key_id: id.clone(),
            requests: i as u64 + 1,
            last_used: now - secs(i as i64),
        })
        .collect();
    batch.push(UsageDelta {
        api_key_id: "not-a-key-id".into(),
        requests: 1,
        last_used: now,
    });
    s.record_usage(&batch).await.unwrap();
    let got = s.usage(&ids).await.unwrap();
    for (i, usage) in got.iter().enumerate() {
        if i == 7 {
            assert_eq!(*usage, Usage::default());
            continue;
        }
        assert_eq!(usage.request_count, i as u64 + 1, "key {i}");
        assert_eq!(
            usage.last_used_time.map(|t| t.timestamp_millis()),
            Some((now - secs(i as i64)).timestamp_millis()),
            "key {i}"
        );
    }
}

async fn update_of_a_stale_copy_is_refused(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(None, now);
    s.create(&r, &new_hash(&r), None).await.unwrap();
    // An update computed from a copy read before another writer's change (here a rotation)
    // would write that copy's other fields back: refused, nothing written.
    let stale_copy = s.get(&r.api_key_id).await.unwrap().unwrap();
    s.rotate(
        &stale_copy,
        &new_hash(&r),
        "kg_rotated",
        Duration::ZERO,
        now,
    )
    .await
    .unwrap();
    let mut renamed = stale_copy.clone();
    renamed.name = "renamed".into();
    assert!(matches!(
        s.update(&stale_copy, &renamed).await,
        Err(StoreError::Conflict)
    ));
    let stored = s.get(&r.api_key_id).await.unwrap().unwrap();
    assert_eq!(stored.name, r.name);
    assert_eq!(stored.key_start, "kg_rotated");

    // From the current copy it applies; `key_start` stays rotation's even if the update says
    // otherwise.
    let mut renamed = stored.clone();
    renamed.name = "renamed".into();
    renamed.key_start = "kg_forged".into();
    s.update(&stored, &renamed).await.unwrap();
    let stored = s.get(&r.api_key_id).await.unwrap().unwrap();
    assert_eq!(stored.name, "renamed");
    assert_eq!(stored.key_start, "kg_rotated");
}

/// A rotation computed from a copy read before another writer widened the key (the scope a
/// team admin lacks): refused, nothing written, so the caller reads the key again and its right
/// to the new value is judged on what the key now holds.
async fn rotate_of_a_stale_copy_is_refused(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let old = new_hash(&r);
    s.create(&r, &old, None).await.unwrap();
    let stale_copy = s.get(&r.api_key_id).await.unwrap().unwrap();
    let mut widened = stale_copy.clone();
    widened.scope_names.push("api_keys_read".into());
    s.update(&stale_copy, &widened).await.unwrap();

    let new = new_hash(&r);
    assert!(matches!(
        s.rotate(&stale_copy, &new, "kg_stale", MINUTE, now).await,
        Err(StoreError::Conflict)
    ));
    // No new hash, the record as the other writer left it, and the old hash still the current
    // one (no grace deadline set on it).
    assert_eq!(find(s, &new, now).await, None);
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), Some(widened.clone()));
    assert_eq!(
        find(s, &old, now + secs(86_400)).await,
        Some(widened.clone())
    );

    // From the current copy it applies.
    let rotated = s
        .rotate(&widened, &new, "kg_fresh", MINUTE, now)
        .await
        .unwrap();
    assert_eq!(rotated.key_start, "kg_fresh");
    assert_eq!(find(s, &new, now).await, Some(rotated));
}

/// A delete judged on a copy another writer has since changed (a key moved to an owner, a
/// scope added) removes nothing: the caller must read the key again.
async fn delete_of_a_stale_copy_is_refused(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let hash = new_hash(&r);
    s.create(&r, &hash, None).await.unwrap();
    let stale_copy = s.get(&r.api_key_id).await.unwrap().unwrap();
    let mut widened = stale_copy.clone();
    widened.scope_names.push("api_keys_read".into());
    s.update(&stale_copy, &widened).await.unwrap();

    assert!(matches!(
        s.delete_if(&stale_copy).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), Some(widened.clone()));
    assert_eq!(find(s, &hash, now).await, Some(widened.clone()));

    s.delete_if(&widened).await.unwrap();
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), None);
    assert_eq!(find(s, &hash, now).await, None);
    assert!(matches!(
        s.delete_if(&widened).await,
        Err(StoreError::NotFound)
    ));
}

/// The reviewer's race: renames from two "replicas" racing one disable. Each change re-reads
/// and re-applies on a conflict, so the disable (answered Ok) is never written over by a
/// rename computed from the enabled copy, and the audit log records it exactly once.
async fn concurrent_changes_never_undo_a_disable(h: Harness) {
    let services = [h.store.clone(), h.second().await].map(|s| {
        Arc::new(KeyService::new(
            s,
            KeyPrefix::default(),
            KeyRules::permissive(),
        ))
    });
    let actor = Actor::cli();
    for trial in 0..10 {
        let (_, created) = services[0]
            .create(CreateKey::new(KeyType::Shared), &actor, Utc::now())
            .await
            .unwrap();
        let id = created.api_key_id;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (svc, key, who) = (services[i % 2].clone(), id.clone(), actor.clone());
            tasks.push(tokio::spawn(async move {
                let change = KeyChange {
                    name: Some(format!("n{i}")),
                    description: Some(Some(format!("d{i}"))),
                    ..KeyChange::default()
                };
                svc.change(&key, change, &who, Utc::now()).await.unwrap();
            }));
            if i == 3 {
                let (svc, key, who) = (services[1].clone(), id.clone(), actor.clone());
                tasks.push(tokio::spawn(async move {
                    svc.set_enabled(&key, false, &who, Utc::now())
                        .await
                        .unwrap();
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let stored = h.store.get(&id).await.unwrap().unwrap();
        assert!(!stored.is_enabled, "trial {trial}: the disable was undone");
        let filter = AuditFilter {
            api_key_id: Some(id.clone()),
            ..AuditFilter::default()
        };
        let (events, _) = h.store.list_audit(&filter, page(1, 100)).await.unwrap();
        let count = |a: AuditAction| events.iter().filter(|e| e.action == a).count();
        assert_eq!(count(AuditAction::Disable), 1, "trial {trial}");
        assert_eq!(count(AuditAction::Update), 8, "trial {trial}");
    }
}

/// An update racing a delete (from another process) must not put the deleted id back into
/// the listing index: the unfiltered total would count it for good.
async fn updates_racing_a_delete_leave_nothing_listed(h: Harness) {
    let deleter = h.second().await;
    let now = Utc::now();
    for _ in 0..10 {
        let mut races = Vec::new();
        for _ in 0..30 {
            let r = record(None, now);
            h.store.create(&r, &new_hash(&r), None).await.unwrap();
            let mut renamed = r.clone();
            renamed.name = "renamed".into();
            let (store, deleter, id) = (h.store.clone(), deleter.clone(), r.api_key_id.clone());
            races.push(tokio::spawn(async move {
                let update = store.update(&r, &renamed);
                let (_, deleted) = tokio::join!(update, deleter.delete(&id));
                // The update may find the key gone; only what is left afterwards matters.
                deleted.unwrap();
            }));
        }
        for race in races {
            race.await.unwrap();
        }
    }
    let (listed, total) = h.store.list(&all_filter(), page(1, 10)).await.unwrap();
    assert!(listed.is_empty());
    assert_eq!(total, 0, "deleted ids left in the listing index");
}

/// The reveal window is one process's memory: once another process (replica) rotated the key,
/// the value remembered here is not the key's any more, so it is not handed out, nor audited
/// as revealed; the rotating process reveals its own value.
async fn reveal_after_another_process_rotated_is_null(h: Harness) {
    let rules = KeyRules {
        reveal_window: MINUTE,
        ..KeyRules::permissive()
    };
    let [here, there] = [h.store.clone(), h.second().await]
        .map(|s| KeyService::new(s, KeyPrefix::default(), rules.clone()));
    let actor = Actor::cli();
    let reveals = |id: &str| {
        let filter = AuditFilter {
            api_key_id: Some(id.to_owned()),
            ..AuditFilter::default()
        };
        let store = h.store.clone();
        async move {
            let (events, _) = store.list_audit(&filter, page(1, 100)).await.unwrap();
            events
                .iter()
                .filter(|e| e.action == AuditAction::Reveal)
                .count()
        }
    };
    // Rotated elsewhere with and without a grace period: the old value still works in the
    // first case, but is not the key's value any more.
    for grace in [Duration::ZERO, HOUR] {
        let (key, created) = here
            .create(CreateKey::new(KeyType::Shared), &actor, Utc::now())
            .await
            .unwrap();
        let id = created.api_key_id.clone();
        let shown = here.reveal(&created, &actor, Utc::now()).await.unwrap();
        assert_eq!(shown.as_deref().map(String::as_str), Some(key.expose()));
        assert_eq!(reveals(&id).await, 1);

        let (rotated, _) = there
            .rotate(&id, grace, None, &actor, Utc::now())
            .await
            .unwrap();
        let stored = h.store.get(&id).await.unwrap().unwrap();
        assert_eq!(
            here.reveal(&stored, &actor, Utc::now()).await.unwrap(),
            None
        );
        assert_eq!(
            reveals(&id).await,
            1,
            "a withheld value audited as revealed"
        );
        let shown = there.reveal(&stored, &actor, Utc::now()).await.unwrap();
        assert_eq!(shown.as_deref().map(String::as_str), Some(rotated.expose()));
    }
}

async fn delete_removes_every_hash(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let id = r.api_key_id.clone();
    let keys = [new_hash(&r), new_hash(&r), new_hash(&r)];
    s.create(&r, &keys[0], None).await.unwrap();
    let mut current = r.clone();
    for (i, k) in keys[1..].iter().enumerate() {
        let start = format!("kg_rot{i}");
        current = s.rotate(&current, k, &start, HOUR, now).await.unwrap();
    }
    for k in &keys {
        assert!(find(s, k, now).await.is_some());
    }
    s.delete(&id).await.unwrap();
    for k in &keys {
        assert_eq!(find(s, k, now).await, None);
    }
    assert_eq!(s.get(&id).await.unwrap(), None);
    assert_eq!(s.list(&all_filter(), page(1, 10)).await.unwrap().1, 0);
}

async fn list_filters_and_pages(h: Harness) {
    let s = &*h.store;
    let base = Utc::now();
    // (team, type, enabled); created one second apart in this order.
    let specs = [
        (Some("a"), KeyType::Shared, true),
        (Some("a"), KeyType::User, true),
        (Some("b"), KeyType::Shared, false),
        (None, KeyType::User, true),
        (Some("a"), KeyType::Shared, false),
        (Some("b"), KeyType::User, true),
        (Some("a"), KeyType::User, false),
    ];
    let all: Vec<KeyRecord> = specs
        .iter()
        .zip(0..)
        .map(|(&(team, key_type, enabled), i)| {
            let mut r = record(team, base + secs(i));
            r.key_type = key_type;
            r.is_enabled = enabled;
            if key_type == KeyType::User {
                r.behalf_of_user_id = Some(format!("user-{i}"));
            }
            r
        })
        .collect();
    // Stored out of order: listing is by creation time, not by insertion.
    for i in [3, 0, 6, 1, 5, 2, 4] {
        s.create(&all[i], &new_hash(&all[i]), None).await.unwrap();
    }

    let (first, total) = s.list(&all_filter(), page(1, 3)).await.unwrap();
    assert_eq!((first, total), (all[0..3].to_vec(), 7));
    let (second, _) = s.list(&all_filter(), page(2, 3)).await.unwrap();
    assert_eq!(second, all[3..6].to_vec());
    let (third, _) = s.list(&all_filter(), page(3, 3)).await.unwrap();
    assert_eq!(third, all[6..].to_vec());
    let (beyond, total) = s.list(&all_filter(), page(4, 3)).await.unwrap();
    assert_eq!((beyond.len(), total), (0, 7));

    let filters = [
        team("a"),
        filter(None, Some(KeyType::User), None),
        filter(None, None, Some(false)),
        filter(Some("a"), Some(KeyType::Shared), Some(true)),
        team("nobody"),
    ];
    for f in &filters {
        let expected: Vec<KeyRecord> = all.iter().filter(|r| f.matches(r)).cloned().collect();
        let (got, total) = s.list(f, page(1, 100)).await.unwrap();
        assert_eq!(got, expected, "{f:?}");
        assert_eq!(total, expected.len() as u64, "{f:?}");
        // Paging a filtered listing: page 2 of size 2, total unchanged.
        let (got, total) = s.list(f, page(2, 2)).await.unwrap();
        let want: Vec<KeyRecord> = expected.iter().skip(2).take(2).cloned().collect();
        assert_eq!((got, total), (want, expected.len() as u64), "{f:?}");
    }
}

async fn team_limit(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let limit = Some(2);
    let a = record(Some("t"), now);
    let mut b = record(Some("t"), now + secs(1));
    b.is_enabled = false; // disabled keys count too
    s.create(&a, &new_hash(&a), limit).await.unwrap();
    s.create(&b, &new_hash(&b), limit).await.unwrap();

    let c = record(Some("t"), now + secs(2));
    let c_key = new_hash(&c);
    let err = s.create(&c, &c_key, limit).await.unwrap_err();
    assert!(
        matches!(err, StoreError::LimitExceeded { limit: 2 }),
        "{err:?}"
    );
    // A refused create leaves nothing behind.
    assert_eq!(s.get(&c.api_key_id).await.unwrap(), None);
    assert_eq!(find(s, &c_key, now).await, None);
    // Without a limit, or for another team, creates go through.
    let u = record(Some("u"), now);
    s.create(&u, &new_hash(&u), limit).await.unwrap();
    // Keys without a team are never limited.
    for _ in 0..3 {
        let free = record(None, now);
        s.create(&free, &new_hash(&free), Some(1)).await.unwrap();
    }
    // Deleting frees a slot.
    s.delete(&a.api_key_id).await.unwrap();
    s.create(&c, &c_key, limit).await.unwrap();
    assert_eq!(s.list(&team("t"), page(1, 10)).await.unwrap().1, 2);
}

async fn team_limit_holds_under_concurrency(h: Harness) {
    // Half the creates go through a second store instance (another process, as far as the
    // storage can tell), so the limit must hold across connections, not just within one.
    let stores = [h.store.clone(), h.second().await];
    let now = Utc::now();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = stores[i % 2].clone();
            let r = record(Some("busy"), now + secs(i as i64));
            tokio::spawn(async move { store.create(&r, &new_hash(&r), Some(5)).await })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(StoreError::LimitExceeded { limit: 5 }) => refused += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!((ok, refused), (5, 15));
    assert_eq!(
        h.store.list(&team("busy"), page(1, 100)).await.unwrap().1,
        5
    );
}

async fn concurrent_rotations_leave_one_hash(h: Harness) {
    // Racing zero-grace rotations: whatever the interleaving, exactly one new hash may work
    // afterwards, and deleting the key must leave none. A lost update here would leave a valid
    // hash that the key no longer knows about, and that delete would then miss.
    let stores = [h.store.clone(), h.second().await];
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let first = new_hash(&r);
    h.store.create(&r, &first, None).await.unwrap();
    let hashes: Vec<KeyHash> = (0..8).map(|_| new_hash(&r)).collect();
    let tasks: Vec<_> = hashes
        .iter()
        .enumerate()
        .map(|(i, hash)| {
            let (store, id, hash) = (stores[i % 2].clone(), r.api_key_id.clone(), *hash);
            tokio::spawn(async move {
                let start = format!("kg_race{i}");
                // Each rotates the record it read, and reads again when another got there
                // first, as `KeyService::rotate` does.
                for _ in 0..100 {
                    let current = store.get(&id).await?.ok_or(StoreError::NotFound)?;
                    match store
                        .rotate(&current, &hash, &start, Duration::ZERO, now)
                        .await
                    {
                        Err(StoreError::Conflict) => continue,
                        other => return other,
                    }
                }
                Err(StoreError::Conflict)
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let current = h.store.get(&r.api_key_id).await.unwrap().unwrap();
    let mut valid = Vec::new();
    for (i, hash) in hashes.iter().enumerate() {
        if let Some(found) = find(&*h.store, hash, now).await {
            assert_eq!(found, current);
            valid.push(i);
        }
    }
    assert_eq!(valid.len(), 1, "valid hashes after the race: {valid:?}");
    assert_eq!(current.key_start, format!("kg_race{}", valid[0]));
    assert_eq!(find(&*h.store, &first, now).await, None);
    h.store.delete(&r.api_key_id).await.unwrap();
    for hash in hashes.iter().chain([&first]) {
        assert_eq!(find(&*h.store, hash, now).await, None);
    }
}

// ---- members ----

fn member(team: &str, user: &str, role: Role, added: DateTime<Utc>) -> Member {
    Member {
        team_id: team.into(),
        user_id: user.into(),
        role,
        added_time: added,
    }
}

async fn members_put_get_remove(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    assert_eq!(s.get_member("team-a", "alice").await.unwrap(), None);
    let alice = member("team-a", "alice", Role::Member, now);
    assert_eq!(s.put_member(&alice).await.unwrap(), alice);
    assert_eq!(
        s.get_member("team-a", "alice").await.unwrap(),
        Some(alice.clone())
    );

    // A role change keeps the original added_time, whatever the caller passes.
    let promoted = member("team-a", "alice", Role::Owner, now + secs(60));
    let stored = s.put_member(&promoted).await.unwrap();
    let expected = Member {
        role: Role::Owner,
        ..alice.clone()
    };
    assert_eq!(stored, expected);
    assert_eq!(
        s.get_member("team-a", "alice").await.unwrap(),
        Some(expected.clone())
    );

    // The same user in another team is another membership.
    assert_eq!(s.get_member("team-b", "alice").await.unwrap(), None);
    let elsewhere = member("team-b", "alice", Role::Admin, now + secs(5));
    assert_eq!(s.put_member(&elsewhere).await.unwrap(), elsewhere);

    // Removing returns what was removed, once.
    assert_eq!(
        s.remove_member("team-a", "alice").await.unwrap(),
        Some(expected)
    );
    assert_eq!(s.remove_member("team-a", "alice").await.unwrap(), None);
    assert_eq!(s.get_member("team-a", "alice").await.unwrap(), None);
    assert_eq!(s.remove_member("team-x", "nobody").await.unwrap(), None);
    assert_eq!(
        s.get_member("team-b", "alice").await.unwrap(),
        Some(elsewhere)
    );

    // Coming back after a removal is a new membership, with the new added_time.
    let again = member("team-a", "alice", Role::Member, now + secs(120));
    assert_eq!(s.put_member(&again).await.unwrap(), again);
    assert_eq!(s.get_member("team-a", "alice").await.unwrap(), Some(again));
}

async fn members_list_oldest_first(h: Harness) {
    let s = &*h.store;
    let base = Utc::now();
    let at = |n: i64| base + secs(n);
    let ns = chrono::Duration::nanoseconds(1);
    let joined = [
        member("team-a", "dave", Role::Member, at(3)),
        member("team-a", "carol", Role::Admin, at(1)),
        // One nanosecond apart: ordered by the exact time, not by the name (nor by milliseconds).
        member("team-a", "aaron", Role::Member, base + ns),
        member("team-a", "zed", Role::Owner, base),
        // Same instant: by user id.
        member("team-a", "bob", Role::Member, at(1)),
        member("team-b", "erin", Role::Owner, at(0)),
    ];
    for m in &joined {
        s.put_member(m).await.unwrap();
    }
    let names =
        |members: &[Member]| -> Vec<String> { members.iter().map(|m| m.user_id.clone()).collect() };
    let listed = s.list_members("team-a").await.unwrap();
    assert_eq!(names(&listed), ["zed", "aaron", "bob", "carol", "dave"]);
    // Every member comes back whole.
    for m in &listed {
        assert!(joined.contains(m), "{m:?}");
    }
    assert_eq!(
        s.list_members("team-b").await.unwrap(),
        vec![joined[5].clone()]
    );
    assert_eq!(s.list_members("nobody").await.unwrap(), vec![]);

    // A role change does not move anyone; a removal does.
    s.put_member(&member("team-a", "dave", Role::Owner, at(100)))
        .await
        .unwrap();
    s.remove_member("team-a", "aaron").await.unwrap();
    let listed = s.list_members("team-a").await.unwrap();
    assert_eq!(names(&listed), ["zed", "bob", "carol", "dave"]);
    assert_eq!(listed[3].role, Role::Owner);
    assert_eq!(listed[3].added_time, at(3));
}

async fn member_put_races_keep_the_first_added_time(h: Harness) {
    // Racing first puts of one member, through two store instances: one added_time wins, and
    // every put answers with it (none may overwrite it, none may report its own).
    let stores = [h.store.clone(), h.second().await];
    let base = Utc::now();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = stores[i % 2].clone();
            let role = if i % 2 == 0 {
                Role::Member
            } else {
                Role::Admin
            };
            let m = member("race", "u", role, base + secs(i as i64));
            tokio::spawn(async move { store.put_member(&m).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap().unwrap());
    }
    let stored = h.store.get_member("race", "u").await.unwrap().unwrap();
    assert!(
        (0..8).any(|i| stored.added_time == base + secs(i)),
        "{stored:?}"
    );
    for a in &answers {
        assert_eq!(a.added_time, stored.added_time, "{answers:?}");
    }
    assert_eq!(h.store.list_members("race").await.unwrap(), vec![stored]);
}

// ---- audit ----

fn event(
    action: AuditAction,
    key: Option<&str>,
    team: Option<&str>,
    time: DateTime<Utc>,
) -> AuditEvent {
    AuditEvent {
        event_id: String::new(),
        time,
        actor: "apk_admin".into(),
        action,
        api_key_id: key.map(str::to_owned),
        team_id: team.map(str::to_owned),
        user_id: None,
        client_ip: None,
        request_id: None,
        client_request_id: None,
        details: BTreeMap::new(),
    }
}

/// Event ids are plain numbers (embedded) or `<ms>-<seq>` stream ids (Redis): compared here by
/// their numeric parts, in order.
fn id_order(id: &str) -> Vec<u64> {
    id.split('-')
        .map(|part| part.parse().unwrap_or_else(|_| panic!("event id {id:?}")))
        .collect()
}

/// What the filter means, spelled out: the expectation the stores are checked against.
fn audit_matches(f: &AuditFilter, e: &AuditEvent) -> bool {
    (f.api_key_id.is_none() || f.api_key_id == e.api_key_id)
        && (f.team_id.is_none() || f.team_id == e.team_id)
        && f.since.is_none_or(|t| e.time >= t)
        && f.until.is_none_or(|t| e.time < t)
}

fn audit_filter(
    key: Option<&str>,
    team: Option<&str>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> AuditFilter {
    AuditFilter {
        api_key_id: key.map(str::to_owned),
        team_id: team.map(str::to_owned),
        since,
        until,
    }
}

async fn audit_append_assigns_increasing_ids(h: Harness) {
    // Appends alternate between two instances: ids are unique for the store, not per process.
    let stores = [h.store.clone(), h.second().await];
    let now = Utc::now();
    let mut appended: Vec<AuditEvent> = Vec::new();
    for i in 0..10 {
        let mut e = event(AuditAction::Update, Some("apk_1"), Some("team-a"), now);
        e.details.insert("n".into(), i.to_string());
        if i == 0 {
            // Every field survives the round trip.
            e.user_id = Some("user-7".into());
            e.client_ip = Some("203.0.113.9".into());
            e.request_id = Some("req-1".into());
            e.client_request_id = Some("client-chosen-1".into());
            e.details.insert("fields".into(), "name,scopes".into());
        }
        let stored = stores[i % 2].append_audit(&e).await.unwrap();
        assert!(!stored.event_id.is_empty());
        let without_id = AuditEvent {
            event_id: String::new(),
            ..stored.clone()
        };
        assert_eq!(without_id, e);
        if let Some(prev) = appended.last() {
            assert!(
                id_order(&prev.event_id) < id_order(&stored.event_id),
                "{} then {}",
                prev.event_id,
                stored.event_id
            );
        }
        appended.push(stored);
    }
    // The listing gives back exactly the stored events, ids included, newest first.
    let (listed, total) = h
        .store
        .list_audit(&AuditFilter::default(), page(1, 100))
        .await
        .unwrap();
    appended.reverse();
    assert_eq!((listed, total), (appended, 10));
}

async fn audit_lists_newest_first_and_filters(h: Harness) {
    let s = &*h.store;
    let base = Utc::now();
    let at = |n: i64| base + secs(n);
    let specs = [
        (AuditAction::Create, Some("k1"), Some("ta")),
        (AuditAction::Update, Some("k1"), Some("ta")),
        (AuditAction::Create, Some("k2"), Some("tb")),
        (AuditAction::MemberPut, None, Some("ta")),
        (AuditAction::Rotate, Some("k2"), Some("tb")),
        (AuditAction::Delete, Some("k1"), Some("ta")),
        (AuditAction::Create, Some("k3"), None),
        (AuditAction::MemberRemove, None, Some("tb")),
    ];
    let mut appended = Vec::new();
    for (&(action, key, team), i) in specs.iter().zip(0..) {
        let e = event(action, key, team, at(i));
        appended.push(s.append_audit(&e).await.unwrap());
    }
    let ns = chrono::Duration::nanoseconds(1);
    let filters = [
        AuditFilter::default(),
        audit_filter(Some("k1"), None, None, None),
        audit_filter(Some("k2"), None, None, None),
        audit_filter(Some("nope"), None, None, None),
        audit_filter(None, Some("ta"), None, None),
        audit_filter(None, Some("tb"), None, None),
        audit_filter(Some("k2"), Some("tb"), None, None),
        audit_filter(Some("k1"), Some("tb"), None, None),
        // `since` is inclusive and `until` exclusive, to the nanosecond.
        audit_filter(None, None, Some(at(3)), None),
        audit_filter(None, None, Some(at(3) + ns), None),
        audit_filter(None, None, None, Some(at(3))),
        audit_filter(None, None, None, Some(at(3) + ns)),
        audit_filter(None, None, Some(at(2)), Some(at(5))),
        audit_filter(None, Some("ta"), Some(at(1)), Some(at(5))),
        audit_filter(Some("k1"), Some("ta"), Some(at(1)), None),
        audit_filter(None, None, Some(at(4)), Some(at(4))),
        audit_filter(None, None, Some(at(100)), None),
    ];
    for f in &filters {
        let expected: Vec<AuditEvent> = appended
            .iter()
            .rev()
            .filter(|e| audit_matches(f, e))
            .cloned()
            .collect();
        let (got, total) = s.list_audit(f, page(1, 100)).await.unwrap();
        assert_eq!(total, expected.len() as u64, "{f:?}");
        assert_eq!(got, expected, "{f:?}");
    }
    // Spot checks that the expectations above are not vacuous.
    let k1 = &filters[1];
    let (got, _) = s.list_audit(k1, page(1, 100)).await.unwrap();
    let actions: Vec<AuditAction> = got.iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        [
            AuditAction::Delete,
            AuditAction::Update,
            AuditAction::Create
        ]
    );
    let (window, _) = s.list_audit(&filters[12], page(1, 100)).await.unwrap();
    assert_eq!(
        window,
        vec![
            appended[4].clone(),
            appended[3].clone(),
            appended[2].clone()
        ]
    );
}

async fn audit_pages_and_totals(h: Harness) {
    let s = &*h.store;
    let base = Utc::now();
    let mut appended = Vec::new();
    for i in 0..7 {
        let team = if i % 2 == 0 { "ta" } else { "tb" };
        let e = event(AuditAction::Update, None, Some(team), base + secs(i));
        appended.push(s.append_audit(&e).await.unwrap());
    }
    let newest: Vec<AuditEvent> = appended.iter().rev().cloned().collect();
    let all = AuditFilter::default();
    for (n, want) in [
        (1, &newest[0..3]),
        (2, &newest[3..6]),
        (3, &newest[6..]),
        (4, &[][..]),
    ] {
        let (got, total) = s.list_audit(&all, page(n, 3)).await.unwrap();
        assert_eq!((got.as_slice(), total), (want, 7), "page {n}");
    }
    let (got, total) = s.list_audit(&all, page(1, 0)).await.unwrap();
    assert_eq!((got.len(), total), (0, 7));

    // A filtered listing pages the same way, with the filtered total.
    let ta = audit_filter(None, Some("ta"), None, None);
    let ta_newest: Vec<AuditEvent> = newest
        .iter()
        .filter(|e| e.team_id.as_deref() == Some("ta"))
        .cloned()
        .collect();
    assert_eq!(ta_newest.len(), 4);
    for (n, want) in [(1, &ta_newest[0..3]), (2, &ta_newest[3..]), (3, &[][..])] {
        let (got, total) = s.list_audit(&ta, page(n, 3)).await.unwrap();
        assert_eq!((got.as_slice(), total), (want, 4), "page {n}");
    }
    let (got, total) = s.list_audit(&ta, page(2, 2)).await.unwrap();
    assert_eq!((got.as_slice(), total), (&ta_newest[2..4], 4));
}

async fn audit_pages_across_a_long_log(h: Harness) {
    // More events than one read of the Redis store fetches (1000), so that listings, filtered or
    // not, continue from one chunk to the next.
    let s = &*h.store;
    let base = Utc::now();
    let at = |n: i64| base + secs(n);
    let mut appended = Vec::new();
    for i in 0..2500 {
        let key = format!("k{}", i % 3);
        let team = if i % 2 == 0 { "ta" } else { "tb" };
        let e = event(AuditAction::Update, Some(&key), Some(team), at(i));
        appended.push(s.append_audit(&e).await.unwrap());
    }
    appended.reverse(); // newest first, like the listings
    let cases = [
        (AuditFilter::default(), page(3, 1000)),
        (AuditFilter::default(), page(2, 999)),
        (AuditFilter::default(), page(1, 2500)),
        (audit_filter(Some("k1"), None, None, None), page(2, 300)),
        (
            audit_filter(Some("k1"), Some("tb"), None, None),
            page(1, 1000),
        ),
        (
            audit_filter(None, None, Some(at(500)), Some(at(1700))),
            page(1, 5000),
        ),
        (
            audit_filter(None, Some("ta"), Some(at(100)), None),
            page(5, 200),
        ),
    ];
    for (f, p) in &cases {
        let matched: Vec<&AuditEvent> = appended.iter().filter(|e| audit_matches(f, e)).collect();
        let skip = (p.page as usize - 1) * p.per_page as usize;
        let want: Vec<AuditEvent> = matched
            .iter()
            .skip(skip)
            .take(p.per_page as usize)
            .map(|e| (*e).clone())
            .collect();
        let (got, total) = s.list_audit(f, *p).await.unwrap();
        assert_eq!(total, matched.len() as u64, "{f:?} {p:?}");
        assert!(!want.is_empty(), "{f:?} {p:?}");
        assert!(got == want, "{f:?} {p:?}: got {} events", got.len());
    }
}

async fn audit_is_capped(h: Harness) {
    // With a cap of 10 (test-only constructor). Both stores trim approximately: Redis'
    // `MAXLEN ~` drops whole stream nodes (at most 100 entries each), the embedded store prunes
    // every 1% of the cap. So: at least the cap, never a node more; always the newest ones.
    const CAP: u64 = 10;
    let s = h.with_audit_cap(CAP as usize).await;
    let base = Utc::now();
    let mut appended = Vec::new();
    for i in 0..300 {
        let e = event(AuditAction::Reveal, Some("k"), None, base + secs(i));
        appended.push(s.append_audit(&e).await.unwrap());
    }
    let (listed, total) = s
        .list_audit(&AuditFilter::default(), page(1, 1000))
        .await
        .unwrap();
    assert!((CAP..CAP + 100).contains(&total), "{total} events kept");
    assert_eq!(listed.len() as u64, total);
    let newest: Vec<AuditEvent> = appended.iter().rev().take(listed.len()).cloned().collect();
    assert_eq!(listed, newest);
    // A filter sees the same capped log.
    let by_key = audit_filter(Some("k"), None, None, None);
    assert_eq!(s.list_audit(&by_key, page(1, 1)).await.unwrap().1, total);
}

/// Waits (up to 2 s) for a change that covers all of `hashes`; `All` covers everything.
async fn expect_change(feed: &mut ChangeFeed, hashes: &[KeyHash]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let next = tokio::time::timeout_at(deadline, feed.recv())
            .await
            .unwrap_or_else(|_| panic!("no change for {hashes:?} within 2 s"));
        match next {
            Some(Change::All) => return,
            Some(Change::Keys(got)) if hashes.iter().all(|h| got.contains(h)) => return,
            Some(Change::Keys(_)) => continue,
            None => panic!("the change feed ended"),
        }
    }
}

async fn change_feed_reports_every_write(h: Harness) {
    // The writer is another instance: changes must cross processes, not just stay in memory.
    let writer = h.second().await;
    let mut feed = h.store.changes().await.unwrap();
    let now = Utc::now();
    let mut r = record(Some("team-a"), now);
    let (k1, k2) = (new_hash(&r), new_hash(&r));

    writer.create(&r, &k1, None).await.unwrap();
    expect_change(&mut feed, &[k1]).await;

    let before = r.clone();
    r.is_enabled = false;
    writer.update(&before, &r).await.unwrap();
    expect_change(&mut feed, &[k1]).await;

    writer
        .rotate(&r, &k2, "kg_rotated", MINUTE, now)
        .await
        .unwrap();
    expect_change(&mut feed, &[k1, k2]).await;

    writer.delete(&r.api_key_id).await.unwrap();
    expect_change(&mut feed, &[k1, k2]).await;
}

// ---- The audit log failing on its own ----

/// Once a change is in force, failing to audit it must not fail the request: above all a
/// rotation without grace, whose answer holds the only copy of the key's new value. The audit
/// log is broken for real: a trigger refusing inserts into the embedded store's table, the
/// wrong type under the Redis store's stream key.
async fn changes_stand_when_their_audit_event_cannot_be_stored(
    h: &Harness,
    break_audit: impl FnOnce(),
) {
    let unaudited = prometheus::IntCounter::new("unaudited", "changes not audited").unwrap();
    let svc = KeyService::new(
        h.store.clone(),
        KeyPrefix::default(),
        KeyRules::permissive(),
    )
    .with_unaudited_counter(unaudited.clone());
    let actor = Actor::cli();
    let (_, created) = svc
        .create(CreateKey::new(KeyType::Shared), &actor, Utc::now())
        .await
        .unwrap();
    let id = created.api_key_id;
    break_audit();
    let probe = AuditEvent {
        event_id: String::new(),
        time: Utc::now(),
        actor: "tester".into(),
        action: AuditAction::Update,
        api_key_id: None,
        team_id: None,
        user_id: None,
        client_ip: None,
        request_id: None,
        client_request_id: None,
        details: BTreeMap::new(),
    };
    assert!(
        h.store.append_audit(&probe).await.is_err(),
        "audit log not broken"
    );

    let now = Utc::now();
    let (new_key, _) = svc
        .rotate(&id, Duration::ZERO, None, &actor, now)
        .await
        .unwrap();
    let found = h.store.find_by_hash(&new_key.hash(), now).await.unwrap();
    assert_eq!(found.map(|r| r.api_key_id), Some(id.clone()));
    let disable = KeyChange {
        is_enabled: Some(false),
        ..KeyChange::default()
    };
    let changed = svc.change(&id, disable, &actor, Utc::now()).await.unwrap();
    assert!(!changed.is_enabled);
    assert!(!h.store.get(&id).await.unwrap().unwrap().is_enabled);
    let (_, other) = svc
        .create(CreateKey::new(KeyType::Shared), &actor, Utc::now())
        .await
        .unwrap();
    assert!(h.store.get(&other.api_key_id).await.unwrap().is_some());
    svc.put_member("team-a", "alice", Role::Owner, &actor, Utc::now())
        .await
        .unwrap();
    svc.remove_member("team-a", "alice", &actor, Utc::now())
        .await
        .unwrap();
    svc.revoke(&id, &actor, Utc::now()).await.unwrap();
    assert_eq!(h.store.get(&id).await.unwrap(), None);
    // Rotate, disable, create, member put and remove, revoke: each counted once.
    assert_eq!(unaudited.get(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_changes_stand_when_their_audit_event_cannot_be_stored() {
    let h = Harness::embedded();
    let Backing::Embedded(dir) = &h.backing else {
        unreachable!()
    };
    let path = dir.path().join("keys.db");
    changes_stand_when_their_audit_event_cannot_be_stored(&h, || {
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER audit_down BEFORE INSERT ON audit \
                 BEGIN SELECT RAISE(ABORT, 'audit log down'); END;",
            )
            .unwrap();
    })
    .await;
}

/// Removing a member reads every key acting for them before it changes any. It once changed
/// each page's keys before reading the next page (by offset, oldest first): a key deleted
/// meanwhile moved every later key back by one, and the one moved onto the page already read
/// was never disabled. Here a trigger plays the concurrent delete: the team's oldest key goes
/// the moment alice's first key is changed, and her last key heads the second page.
#[tokio::test(flavor = "multi_thread")]
async fn embedded_member_removal_misses_no_key_deleted_around_it() {
    let h = Harness::embedded();
    let svc = KeyService::new(
        h.store.clone(),
        KeyPrefix::default(),
        KeyRules::permissive(),
    );
    let actor = Actor::cli();
    let t0 = Utc::now();
    svc.put_member("team-a", "alice", Role::Member, &actor, t0)
        .await
        .unwrap();
    // 0: for no one; 1: alice's (shared); 2..=499: for no one; 500: alice's (user), the first
    // key of the second page of 500.
    let mut ids = Vec::new();
    for i in 0..=500 {
        let alices = i == 1 || i == 500;
        let mut req = CreateKey::new(if i == 500 {
            KeyType::User
        } else {
            KeyType::Shared
        });
        req.team_id = Some("team-a".into());
        req.behalf_of_user_id = alices.then(|| "alice".to_owned());
        let at = t0 + chrono::Duration::milliseconds(i);
        ids.push(svc.create(req, &actor, at).await.unwrap().1.api_key_id);
    }
    let Backing::Embedded(dir) = &h.backing else {
        unreachable!()
    };
    rusqlite::Connection::open(dir.path().join("keys.db"))
        .unwrap()
        .execute_batch(&format!(
            "CREATE TRIGGER concurrent_delete AFTER UPDATE ON keys WHEN OLD.id = '{}' \
             BEGIN DELETE FROM keys WHERE id = '{}'; END;",
            ids[1], ids[0]
        ))
        .unwrap();
    let changed = svc
        .remove_member("team-a", "alice", &actor, Utc::now())
        .await
        .unwrap();
    let changed: Vec<&str> = changed.iter().map(|r| r.api_key_id.as_str()).collect();
    assert_eq!(changed, [ids[1].as_str(), ids[500].as_str()]);
    assert!(
        h.store.get(&ids[0]).await.unwrap().is_none(),
        "the trigger ran"
    );
    assert!(!h.store.get(&ids[500]).await.unwrap().unwrap().is_enabled);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_changes_stand_when_their_audit_event_cannot_be_stored() {
    let h = Harness::redis().await;
    let Backing::Redis { server, ns } = &h.backing else {
        unreachable!()
    };
    let mut raw = raw_conn(server);
    let key = format!("{ns}:audit");
    changes_stand_when_their_audit_event_cannot_be_stored(&h, move || {
        let _: () = ::redis::cmd("SET")
            .arg(&key)
            .arg("not a stream")
            .query(&mut raw)
            .unwrap();
    })
    .await;
}

impl Harness {
    /// Overwrites what the store holds for `id`'s record with `value`, by hand (a foreign
    /// writer, a hand edit): the SQLite row, or the Redis id record `{ns}:k:{<tag>}:<id>`.
    fn overwrite_id_record(&self, id: &str, value: &[u8]) {
        match &self.backing {
            Backing::Embedded(dir) => {
                let db = rusqlite::Connection::open(dir.path().join("keys.db")).unwrap();
                let text = String::from_utf8_lossy(value).into_owned();
                db.execute("UPDATE keys SET record = ?1 WHERE id = ?2", [&text, id])
                    .unwrap();
            }
            _ => {
                let tag = SlotTag::of_key_id(id).unwrap();
                self.set_raw(&format!("{}:k:{{{tag}}}:{id}", self.ns()), value);
            }
        }
    }

    /// Overwrites the Redis hash entry of `hash` with `value`.
    fn overwrite_hash_entry(&self, hash: &KeyHash, value: &[u8]) {
        let name = format!("{}:h:{{{}}}:{}", self.ns(), hash.tag(), hash.digest_hex());
        self.set_raw(&name, value);
    }

    fn ns(&self) -> &str {
        match &self.backing {
            Backing::Redis { ns, .. } | Backing::Cluster { ns, .. } => ns,
            Backing::Embedded(_) => unreachable!("no Redis names in the embedded store"),
        }
    }

    /// `SET name value` on the Redis server or cluster behind the store; the name must exist.
    fn set_raw(&self, name: &str, value: &[u8]) {
        let set = ::redis::cmd("SET").arg(name).arg(value).arg("XX").clone();
        let done: Option<String> = match &self.backing {
            Backing::Redis { server, .. } => set.query(&mut raw_conn(server)).unwrap(),
            Backing::Cluster { cluster, .. } => {
                let client = ::redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
                set.query(&mut client.get_connection().unwrap()).unwrap()
            }
            Backing::Embedded(_) => unreachable!("no Redis names in the embedded store"),
        };
        assert_eq!(done.as_deref(), Some("OK"), "{name} is not stored");
    }
}

/// Review: a key whose id record no longer decodes (a hand edit) could not be deleted (the
/// delete read the record first and failed), while its hash entries, intact, kept
/// authenticating it. Deleting it now removes every hash of the key, announces them, frees its
/// place in its team, and leaves the other keys of the team (which share its slot tag) alone.
async fn delete_of_an_unreadable_record_removes_every_hash(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-u"), now);
    let other = record(Some("team-u"), now);
    let id = r.api_key_id.clone();
    let (old, new, other_hash) = (new_hash(&r), new_hash(&r), new_hash(&other));
    s.create(&r, &old, None).await.unwrap();
    s.create(&other, &other_hash, None).await.unwrap();
    s.rotate(&r, &new, "kg_rot", HOUR, now).await.unwrap();
    h.overwrite_id_record(&id, b"{\"record\":");
    assert!(matches!(s.get(&id).await, Err(StoreError::Corrupt(_))));
    let mut feed = s.changes().await.unwrap();
    s.delete(&id).await.unwrap();
    expect_change(&mut feed, &[old, new]).await;
    for k in [&old, &new] {
        assert_eq!(find(s, k, now).await, None);
    }
    assert_eq!(s.get(&id).await.unwrap(), None);
    assert_not_found(s.delete(&id).await);
    assert_eq!(find(s, &other_hash, now).await, Some(other.clone()));
    assert_eq!(s.get(&other.api_key_id).await.unwrap(), Some(other.clone()));
    // The team holds one key again: a limit of 2 lets one more in.
    let third = record(Some("team-u"), now);
    s.create(&third, &new_hash(&third), Some(2)).await.unwrap();
    let listed = s.list(&team("team-u"), page(1, 10)).await.unwrap();
    assert_eq!(listed.1, 2, "{listed:?}");
}

/// What Redis has sent to its clients so far (`INFO stats`).
fn net_output_bytes(server: &RedisServer) -> u64 {
    let info: String = ::redis::cmd("INFO")
        .arg("stats")
        .query(&mut raw_conn(server))
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A value far above any record's size (and [`RECORD_CAP`]).
const HUGE: usize = 4 << 20;

/// Review: a hand-corrupted 40 MB value at a hash entry was fetched whole on every request that
/// presented its key (76 ms each; the gateway's memory 18 → 226 MiB). An oversized hash entry
/// or id record is now unreadable like one that does not decode, and read only up to the cap:
/// the lookup, `get`, a listing and a delete all take far less from Redis than the value.
async fn oversized_records_are_refused_unread(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let (r, good) = (record(None, now), record(None, now));
    let (hash, good_hash) = (new_hash(&r), new_hash(&good));
    s.create(&r, &hash, None).await.unwrap();
    s.create(&good, &good_hash, None).await.unwrap();
    let before = match &h.backing {
        Backing::Redis { server, .. } => Some(net_output_bytes(server)),
        _ => None,
    };
    // Starts like the record it replaces, so that only its size is wrong.
    let mut huge =
        serde_json::to_vec(&serde_json::json!({"valid_until": null, "record": r})).unwrap();
    huge.resize(HUGE, b' ');
    h.overwrite_hash_entry(&hash, &huge);
    for _ in 0..3 {
        let found = s.find_by_hash(&hash, now).await;
        assert!(matches!(found, Err(StoreError::Corrupt(_))), "{found:?}");
        let found = s.find_verified_by_hash(&hash, now).await;
        assert!(matches!(found, Err(StoreError::Corrupt(_))), "{found:?}");
    }
    assert_eq!(find(s, &good_hash, now).await, Some(good.clone()));
    h.overwrite_id_record(&r.api_key_id, &huge);
    assert!(matches!(
        s.get(&r.api_key_id).await,
        Err(StoreError::Corrupt(_))
    ));
    let (listed, _) = s.list(&all_filter(), page(1, 10)).await.unwrap();
    assert_eq!(listed, std::slice::from_ref(&good));
    // Eight reads (six lookups, `get`, the listing's), each at most the cap and a little.
    if let (Some(before), Backing::Redis { server, .. }) = (before, &h.backing) {
        let sent = net_output_bytes(server) - before;
        let most = 8 * (RECORD_CAP as u64 + 4096);
        assert!(sent < most, "redis sent {sent} bytes, more than {most}");
    }
    s.delete(&r.api_key_id).await.unwrap();
    assert_eq!(s.find_by_hash(&hash, now).await.unwrap(), None);
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), None);
    assert_eq!(find(s, &good_hash, now).await, Some(good));
}

/// An id record that decodes but names a hash that cannot be one (a hand edit) failed every
/// delete; the operator's delete (the key service's, unconditional in the store) removes the
/// key and its working hash entry.
#[tokio::test(flavor = "multi_thread")]
async fn redis_a_key_listing_a_broken_hash_can_be_deleted() {
    let h = Harness::redis().await;
    let Backing::Redis { server, ns } = &h.backing else {
        unreachable!()
    };
    let s = &h.store;
    let now = Utc::now();
    let r = record(None, now);
    let hash = new_hash(&r);
    s.create(&r, &hash, None).await.unwrap();
    let tag = SlotTag::of_key_id(&r.api_key_id).unwrap();
    let name = format!("{ns}:k:{{{tag}}}:{}", r.api_key_id);
    let stored: String = ::redis::cmd("GET")
        .arg(&name)
        .query(&mut raw_conn(server))
        .unwrap();
    let broken = stored.replace(&hash.to_hex(), "zz");
    assert_ne!(broken, stored);
    h.set_raw(&name, broken.as_bytes());
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), Some(r.clone()));
    assert!(matches!(s.delete_if(&r).await, Err(StoreError::Corrupt(_))));
    crate::support::service(s)
        .revoke(&r.api_key_id, &crate::support::cli(), now)
        .await
        .unwrap();
    assert_eq!(find(&**s, &hash, now).await, None);
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_oversized_records_are_refused_unread() {
    oversized_records_are_refused_unread(Harness::redis().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_oversized_records_are_refused_unread() {
    oversized_records_are_refused_unread(Harness::cluster().await).await;
}

// ---- Redis only: real time, layout and outages ----

fn raw_conn(server: &RedisServer) -> ::redis::Connection {
    ::redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_grace_expires_by_itself() {
    let h = Harness::redis().await;
    let s = &*h.store;
    let t0 = Utc::now();
    let r = record(None, t0);
    let (old, new) = (new_hash(&r), new_hash(&r));
    s.create(&r, &old, None).await.unwrap();
    s.rotate(&r, &new, "kg_new", Duration::from_secs(1), t0)
        .await
        .unwrap();
    assert!(find(s, &old, t0).await.is_some());
    // Asking "as of t0" keeps the deadline out of the way: only Redis' own expiry (PEXPIRE)
    // can make the old hash disappear.
    let started = Instant::now();
    while find(s, &old, t0).await.is_some() {
        assert!(started.elapsed() < Duration::from_secs(3), "not expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(find(s, &new, t0).await.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_layout_is_as_documented() {
    let h = Harness::redis().await;
    let Backing::Redis { server, ns } = &h.backing else {
        unreachable!()
    };
    let mut raw = raw_conn(server);
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let (old, new) = (new_hash(&r), new_hash(&r));
    s.create(&r, &old, None).await.unwrap();
    s.rotate(&r, &new, "kg_new", MINUTE, now).await.unwrap();

    let get = |raw: &mut ::redis::Connection, key: String| -> serde_json::Value {
        let text: String = ::redis::cmd("GET").arg(key).query(raw).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    // Every entry of a team key carries the team's slot tag.
    let tag = SlotTag::for_team("team-a");
    assert_eq!(SlotTag::of_key_id(&r.api_key_id), Some(tag));
    let old_key = format!("{ns}:h:{{{tag}}}:{}", old.digest_hex());
    let old_entry = get(&mut raw, old_key.clone());
    assert_eq!(
        old_entry["valid_until"],
        (now + secs(60)).timestamp_millis()
    );
    assert_eq!(old_entry["record"]["key_start"], "kg_new");
    let pttl: i64 = ::redis::cmd("PTTL").arg(&old_key).query(&mut raw).unwrap();
    assert!(pttl > 0 && pttl <= 60_000, "{pttl}");
    let new_entry = get(&mut raw, format!("{ns}:h:{{{tag}}}:{}", new.digest_hex()));
    assert!(new_entry["valid_until"].is_null());
    let by_id = get(&mut raw, format!("{ns}:k:{{{tag}}}:{}", r.api_key_id));
    assert_eq!(by_id["hashes"].as_array().unwrap().len(), 2);
    let team: Vec<String> = ::redis::cmd("SMEMBERS")
        .arg(format!("{ns}:team:{{{tag}}}:team-a"))
        .query(&mut raw)
        .unwrap();
    assert_eq!(team, vec![r.api_key_id.clone()]);
    let all: Vec<String> = ::redis::cmd("ZRANGE")
        .arg(format!("{ns}:all"))
        .arg(0)
        .arg(-1)
        .query(&mut raw)
        .unwrap();
    assert_eq!(all, vec![r.api_key_id.clone()]);

    // Deleting leaves nothing of the namespace behind.
    s.delete(&r.api_key_id).await.unwrap();
    let left: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{ns}:*"))
        .query(&mut raw)
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// `{ns}:all` is written outside the key's script; a crash in between can leave an id there
/// without a record. Listing skips it (filtered or not) instead of failing.
#[tokio::test(flavor = "multi_thread")]
async fn redis_listing_skips_index_entries_without_a_record() {
    let h = Harness::redis().await;
    let Backing::Redis { server, ns } = &h.backing else {
        unreachable!()
    };
    let mut raw = raw_conn(server);
    let s = &*h.store;
    let now = Utc::now();
    let r = record(None, now);
    s.create(&r, &new_hash(&r), None).await.unwrap();
    let ghost = new_key_id(SlotTag::random());
    let _: i64 = ::redis::cmd("ZADD")
        .arg(format!("{ns}:all"))
        .arg(now.timestamp_millis() - 1)
        .arg(&ghost)
        .query(&mut raw)
        .unwrap();
    let (listed, _) = s.list(&all_filter(), page(1, 10)).await.unwrap();
    assert_eq!(listed, vec![r.clone()]);
    let enabled = filter(None, None, Some(true));
    assert_eq!(s.list(&enabled, page(1, 10)).await.unwrap(), (vec![r], 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_members_and_audit_layout_is_as_documented() {
    let h = Harness::redis().await;
    let Backing::Redis { server, ns } = &h.backing else {
        unreachable!()
    };
    let mut raw = raw_conn(server);
    let s = &*h.store;
    let now = Utc::now();
    // A team with a key and a member: the key set and the member hash are distinct keys.
    let r = record(Some("team-a"), now);
    s.create(&r, &new_hash(&r), Some(5)).await.unwrap();
    s.put_member(&member("team-a", "alice", Role::Admin, now))
        .await
        .unwrap();
    let tag = SlotTag::for_team("team-a");
    let members_key = format!("{ns}:members:{{{tag}}}:team-a");
    let kind: String = ::redis::cmd("TYPE")
        .arg(&members_key)
        .query(&mut raw)
        .unwrap();
    assert_eq!(kind, "hash");
    let json: String = ::redis::cmd("HGET")
        .arg(&members_key)
        .arg("alice")
        .query(&mut raw)
        .unwrap();
    let stored: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(stored["role"], "admin");
    assert_eq!(stored["user_id"], "alice");
    let kind: String = ::redis::cmd("TYPE")
        .arg(format!("{ns}:team:{{{tag}}}:team-a"))
        .query(&mut raw)
        .unwrap();
    assert_eq!(kind, "set");
    // Removing the last member leaves no empty hash behind.
    s.remove_member("team-a", "alice").await.unwrap();
    let exists: i64 = ::redis::cmd("EXISTS")
        .arg(&members_key)
        .query(&mut raw)
        .unwrap();
    assert_eq!(exists, 0);

    // The audit log is a stream; the entry id is the event id, the field `event` its JSON.
    let e = event(AuditAction::Create, Some("k1"), Some("team-a"), now);
    let appended = s.append_audit(&e).await.unwrap();
    let audit_key = format!("{ns}:audit");
    let kind: String = ::redis::cmd("TYPE")
        .arg(&audit_key)
        .query(&mut raw)
        .unwrap();
    assert_eq!(kind, "stream");
    let entries: Vec<(String, Vec<String>)> = ::redis::cmd("XRANGE")
        .arg(&audit_key)
        .arg("-")
        .arg("+")
        .query(&mut raw)
        .unwrap();
    assert_eq!(entries.len(), 1);
    let (id, fields) = &entries[0];
    assert_eq!(id, &appended.event_id);
    assert_eq!(fields[0], "event");
    let stored: serde_json::Value = serde_json::from_str(&fields[1]).unwrap();
    assert_eq!(stored["action"], "create");
    assert_eq!(stored["api_key_id"], "k1");
}

fn assert_not_found<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    assert!(matches!(result, Err(StoreError::NotFound)), "{result:?}");
}

fn assert_unavailable<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) {
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{what}: {result:?}"
    );
}

/// Polls `ping` until the store answers again (the same store: no rebuild).
async fn wait_until_reachable(store: &dyn KeyStore) {
    let started = Instant::now();
    while store.ping().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "store did not recover within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_is_unavailable_and_recovers() {
    let mut server = RedisServer::start();
    let op_timeout = Duration::from_millis(500);
    let store = RedisStore::connect(&server.url(), "kgout", op_timeout)
        .await
        .unwrap();
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let key = new_hash(&r);
    store.create(&r, &key, Some(10)).await.unwrap();
    let mut feed = store.changes().await.unwrap();

    server.stop();
    let started = Instant::now();
    assert_unavailable("find", store.find_by_hash(&key, now).await);
    assert!(started.elapsed() < op_timeout + Duration::from_secs(1));
    assert_unavailable("get", store.get(&r.api_key_id).await);
    assert_unavailable("create", store.create(&r, &new_hash(&r), None).await);
    assert_unavailable("update", store.update(&r, &r).await);
    assert_unavailable("list", store.list(&all_filter(), page(1, 10)).await);
    assert_unavailable("ping", store.ping().await);
    assert_unavailable("changes", store.changes().await);
    let m = member("team-a", "alice", Role::Member, now);
    assert_unavailable("put_member", store.put_member(&m).await);
    assert_unavailable("get_member", store.get_member("team-a", "alice").await);
    assert_unavailable(
        "remove_member",
        store.remove_member("team-a", "alice").await,
    );
    assert_unavailable("list_members", store.list_members("team-a").await);
    let e = event(AuditAction::Create, None, None, now);
    assert_unavailable("append_audit", store.append_audit(&e).await);
    let everything = AuditFilter::default();
    assert_unavailable(
        "list_audit",
        store.list_audit(&everything, page(1, 10)).await,
    );
    let by_team = audit_filter(None, Some("team-a"), None, None);
    assert_unavailable("list_audit", store.list_audit(&by_team, page(1, 10)).await);
    // The feed ends, telling its reader to flush and resubscribe.
    let end = tokio::time::timeout(Duration::from_secs(5), feed.recv()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");

    server.restart();
    wait_until_reachable(&store).await;
    // The restarted server is empty (no persistence); the same store works again.
    let r2 = record(Some("team-a"), now);
    let key2 = new_hash(&r2);
    store.create(&r2, &key2, Some(10)).await.unwrap();
    assert_eq!(find(&store, &key2, now).await, Some(r2));
    let mut feed = store.changes().await.unwrap();
    let r3 = record(None, now);
    let key3 = new_hash(&r3);
    store.create(&r3, &key3, None).await.unwrap();
    expect_change(&mut feed, &[key3]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_at_start_up_is_not_fatal() {
    let mut server = RedisServer::start();
    assert!(server.url().contains(&format!(":{}/", server.port())));
    server.stop();
    let store = RedisStore::connect(&server.url(), "kgboot", Duration::from_millis(500))
        .await
        .expect("connect must not need Redis to be up");
    assert_unavailable("ping", store.ping().await);
    assert_unavailable(
        "find",
        store
            .find_by_hash(&new_hash(&record(None, Utc::now())), Utc::now())
            .await,
    );
    server.restart();
    wait_until_reachable(&store).await;
    let r = record(None, Utc::now());
    let key = new_hash(&r);
    store.create(&r, &key, None).await.unwrap();
    assert_eq!(find(&store, &key, Utc::now()).await, Some(r));

    assert!(
        RedisStore::connect("not a url", "kg", Duration::from_secs(1))
            .await
            .is_err()
    );
}
