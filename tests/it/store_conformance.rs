//! One conformance suite for every [`KeyStore`]: each check below is written once, against the
//! trait, and the `conformance!` macro runs it against the embedded store (a SQLite file in a
//! temporary directory) and against the Redis store (a private `redis-server`, see
//! `support::redis`). Tests are named `store_conformance::{embedded,redis}::<check>`.
//! Time-dependent behaviour (rotation grace) is tested through the `now` argument, not by
//! sleeping; the few real-time checks (Redis expiry, outage) are Redis-only and at the end.

// A failed unwrap is a failed test, which is what we want here (Cargo.toml: "tests may unwrap").
#![allow(clippy::unwrap_used)]

use crate::support::redis::RedisServer;
use chrono::{DateTime, Utc};
use keygate::auth::key::{KeyHash, KeyPrefix, NewKey, new_key_id};
use keygate::auth::record::{KeyRecord, KeyType};
use keygate::store::embedded::EmbeddedStore;
use keygate::store::redis::RedisStore;
use keygate::store::{Change, ChangeFeed, KeyFilter, KeyStore, Page, StoreError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const OP_TIMEOUT: Duration = Duration::from_secs(2);
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
    update_keeps_the_rotated_key_start,
);

fn new_hash() -> KeyHash {
    NewKey::generate(&KeyPrefix::default()).hash()
}

fn record(team: Option<&str>, created: DateTime<Utc>) -> KeyRecord {
    KeyRecord {
        api_key_id: new_key_id(),
        name: "test key".into(),
        description: None,
        key_type: KeyType::Shared,
        team_id: team.map(str::to_owned),
        created_by: Some("tester".into()),
        behalf_of_user_id: None,
        scope_names: vec!["read".into()],
        allow_ips: vec![],
        is_enabled: true,
        created_time: created,
        updated_time: created,
        expires_time: None,
        last_used_time: None,
        metadata: BTreeMap::new(),
        key_start: "kg_abcdefg".into(),
    }
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

/// What `hash` leads to at `at`; store errors fail the test.
async fn find(s: &dyn KeyStore, hash: &KeyHash, at: DateTime<Utc>) -> Option<KeyRecord> {
    s.find_by_hash(hash, at).await.unwrap()
}

fn page(page: u32, per_page: u32) -> Page {
    Page { page, per_page }
}

async fn create_and_find(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let key = new_hash();
    s.create(&r, &key, None).await.unwrap();
    assert_eq!(find(s, &key, now).await, Some(r.clone()));
    assert_eq!(find(s, &new_hash(), now).await, None);
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
    let rich_key = new_hash();
    s.create(&rich, &rich_key, None).await.unwrap();
    assert_eq!(find(s, &rich_key, now).await, Some(rich));
    s.ping().await.unwrap();
}

async fn get_update_delete(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let key = new_hash();
    s.create(&r, &key, None).await.unwrap();

    let mut changed = r.clone();
    changed.name = "renamed".into();
    changed.scope_names = vec!["write".into(), "admin".into()];
    changed.updated_time = now + secs(1);
    s.update(&changed).await.unwrap();
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), Some(changed.clone()));
    assert_eq!(find(s, &key, now).await, Some(changed.clone()));

    // Disabling is an update; the record says so and the gateway refuses it.
    changed.is_enabled = false;
    s.update(&changed).await.unwrap();
    let found = find(s, &key, now).await.unwrap();
    assert!(!found.is_enabled);

    // Moving to another team moves it in team listings too.
    changed.team_id = Some("team-b".into());
    s.update(&changed).await.unwrap();
    assert_eq!(s.list(&team("team-b"), page(1, 10)).await.unwrap().1, 1);
    assert_eq!(s.list(&team("team-a"), page(1, 10)).await.unwrap().1, 0);

    let missing = record(Some("team-a"), now);
    assert_not_found(s.update(&missing).await);
    assert_eq!(s.get(&missing.api_key_id).await.unwrap(), None);

    s.delete(&r.api_key_id).await.unwrap();
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), None);
    assert_eq!(find(s, &key, now).await, None);
    assert_not_found(s.delete(&r.api_key_id).await);
    assert_not_found(s.update(&changed).await);
}

async fn rotate_with_grace(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let id = r.api_key_id.clone();
    let (k1, k2, k3, k4) = (new_hash(), new_hash(), new_hash(), new_hash());
    s.create(&r, &k1, None).await.unwrap();

    let rotated = s.rotate(&id, &k2, "kg_second", MINUTE, now).await.unwrap();
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
    s.update(&updated).await.unwrap();
    assert_eq!(find(s, &k1, now + secs(59)).await, Some(old_view(&updated)));
    assert_eq!(find(s, &k1, now + secs(61)).await, None);

    // A later rotation with a longer grace never extends an earlier one...
    s.rotate(&id, &k3, "kg_third", HOUR, now + secs(10))
        .await
        .unwrap();
    assert!(find(s, &k1, now + secs(59)).await.is_some());
    assert_eq!(find(s, &k1, now + secs(61)).await, None);
    assert!(find(s, &k2, now + secs(3000)).await.is_some());
    // ...and a zero-grace rotation (a leaked key) ends every grace at once.
    let last = s
        .rotate(&id, &k4, "kg_fourth", Duration::ZERO, now + secs(20))
        .await
        .unwrap();
    for old in [&k1, &k2, &k3] {
        assert_eq!(find(s, old, now + secs(20)).await, None);
    }
    assert_eq!(find(s, &k4, now + secs(20)).await, Some(last));

    // A key that expires before the grace ends keeps its own expiry through the old hash.
    let mut short = record(None, now);
    short.expires_time = Some(now + secs(30));
    let (s1, s2) = (new_hash(), new_hash());
    s.create(&short, &s1, None).await.unwrap();
    s.rotate(&short.api_key_id, &s2, "kg_short", MINUTE, now)
        .await
        .unwrap();
    let seen = find(s, &s1, now).await.unwrap();
    assert_eq!(seen.expires_time, short.expires_time);

    assert_not_found(
        s.rotate("apk_doesnotexist", &new_hash(), "kg_x", Duration::ZERO, now)
            .await,
    );
}

async fn rotate_with_zero_grace(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(None, now);
    let (old, new) = (new_hash(), new_hash());
    s.create(&r, &old, None).await.unwrap();
    let rotated = s
        .rotate(&r.api_key_id, &new, "kg_new1234", Duration::ZERO, now)
        .await
        .unwrap();
    assert_eq!(find(s, &old, now).await, None);
    assert_eq!(find(s, &new, now).await, Some(rotated.clone()));
    assert_eq!(s.get(&r.api_key_id).await.unwrap(), Some(rotated));
}

async fn update_keeps_the_rotated_key_start(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(None, now);
    s.create(&r, &new_hash(), None).await.unwrap();
    // An update computed from a copy read before the rotation.
    let mut stale_copy = s.get(&r.api_key_id).await.unwrap().unwrap();
    s.rotate(
        &r.api_key_id,
        &new_hash(),
        "kg_rotated",
        Duration::ZERO,
        now,
    )
    .await
    .unwrap();
    stale_copy.name = "renamed".into();
    s.update(&stale_copy).await.unwrap();
    let stored = s.get(&r.api_key_id).await.unwrap().unwrap();
    assert_eq!(stored.name, "renamed");
    assert_eq!(stored.key_start, "kg_rotated");
}

async fn delete_removes_every_hash(h: Harness) {
    let s = &*h.store;
    let now = Utc::now();
    let r = record(Some("team-a"), now);
    let id = r.api_key_id.clone();
    let keys = [new_hash(), new_hash(), new_hash()];
    s.create(&r, &keys[0], None).await.unwrap();
    for (i, k) in keys[1..].iter().enumerate() {
        let start = format!("kg_rot{i}");
        s.rotate(&id, k, &start, HOUR, now).await.unwrap();
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
        s.create(&all[i], &new_hash(), None).await.unwrap();
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
    s.create(&a, &new_hash(), limit).await.unwrap();
    s.create(&b, &new_hash(), limit).await.unwrap();

    let c = record(Some("t"), now + secs(2));
    let c_key = new_hash();
    let err = s.create(&c, &c_key, limit).await.unwrap_err();
    assert!(
        matches!(err, StoreError::LimitExceeded { limit: 2 }),
        "{err:?}"
    );
    // A refused create leaves nothing behind.
    assert_eq!(s.get(&c.api_key_id).await.unwrap(), None);
    assert_eq!(find(s, &c_key, now).await, None);
    // Without a limit, or for another team, creates go through.
    s.create(&record(Some("u"), now), &new_hash(), limit)
        .await
        .unwrap();
    // Keys without a team are never limited.
    for _ in 0..3 {
        s.create(&record(None, now), &new_hash(), Some(1))
            .await
            .unwrap();
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
            tokio::spawn(async move { store.create(&r, &new_hash(), Some(5)).await })
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
    let first = new_hash();
    h.store.create(&r, &first, None).await.unwrap();
    let hashes: Vec<KeyHash> = (0..8).map(|_| new_hash()).collect();
    let tasks: Vec<_> = hashes
        .iter()
        .enumerate()
        .map(|(i, hash)| {
            let (store, id, hash) = (stores[i % 2].clone(), r.api_key_id.clone(), *hash);
            tokio::spawn(async move {
                let start = format!("kg_race{i}");
                store.rotate(&id, &hash, &start, Duration::ZERO, now).await
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
    let (k1, k2) = (new_hash(), new_hash());

    writer.create(&r, &k1, None).await.unwrap();
    expect_change(&mut feed, &[k1]).await;

    r.is_enabled = false;
    writer.update(&r).await.unwrap();
    expect_change(&mut feed, &[k1]).await;

    writer
        .rotate(&r.api_key_id, &k2, "kg_rotated", MINUTE, now)
        .await
        .unwrap();
    expect_change(&mut feed, &[k1, k2]).await;

    writer.delete(&r.api_key_id).await.unwrap();
    expect_change(&mut feed, &[k1, k2]).await;
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
    let (old, new) = (new_hash(), new_hash());
    s.create(&r, &old, None).await.unwrap();
    s.rotate(&r.api_key_id, &new, "kg_new", Duration::from_secs(1), t0)
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
    let (old, new) = (new_hash(), new_hash());
    s.create(&r, &old, None).await.unwrap();
    s.rotate(&r.api_key_id, &new, "kg_new", MINUTE, now)
        .await
        .unwrap();

    let get = |raw: &mut ::redis::Connection, key: String| -> serde_json::Value {
        let text: String = ::redis::cmd("GET").arg(key).query(raw).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let old_key = format!("{ns}:h:{{{}}}", old.to_hex());
    let old_entry = get(&mut raw, old_key.clone());
    assert_eq!(
        old_entry["valid_until"],
        (now + secs(60)).timestamp_millis()
    );
    assert_eq!(old_entry["record"]["key_start"], "kg_new");
    let pttl: i64 = ::redis::cmd("PTTL").arg(&old_key).query(&mut raw).unwrap();
    assert!(pttl > 0 && pttl <= 60_000, "{pttl}");
    let new_entry = get(&mut raw, format!("{ns}:h:{{{}}}", new.to_hex()));
    assert!(new_entry["valid_until"].is_null());
    let by_id = get(&mut raw, format!("{ns}:k:{{{}}}", r.api_key_id));
    assert_eq!(by_id["hashes"].as_array().unwrap().len(), 2);
    let team: Vec<String> = ::redis::cmd("SMEMBERS")
        .arg(format!("{ns}:team:{{team-a}}"))
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
    let key = new_hash();
    store.create(&r, &key, Some(10)).await.unwrap();
    let mut feed = store.changes().await.unwrap();

    server.stop();
    let started = Instant::now();
    assert_unavailable("find", store.find_by_hash(&key, now).await);
    assert!(started.elapsed() < op_timeout + Duration::from_secs(1));
    assert_unavailable("get", store.get(&r.api_key_id).await);
    assert_unavailable(
        "create",
        store.create(&record(None, now), &new_hash(), None).await,
    );
    assert_unavailable("update", store.update(&r).await);
    assert_unavailable("list", store.list(&all_filter(), page(1, 10)).await);
    assert_unavailable("ping", store.ping().await);
    assert_unavailable("changes", store.changes().await);
    // The feed ends, telling its reader to flush and resubscribe.
    let end = tokio::time::timeout(Duration::from_secs(5), feed.recv()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");

    server.restart();
    wait_until_reachable(&store).await;
    // The restarted server is empty (no persistence); the same store works again.
    let r2 = record(Some("team-a"), now);
    let key2 = new_hash();
    store.create(&r2, &key2, Some(10)).await.unwrap();
    assert_eq!(find(&store, &key2, now).await, Some(r2));
    let mut feed = store.changes().await.unwrap();
    let r3 = record(None, now);
    let key3 = new_hash();
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
    assert_unavailable("find", store.find_by_hash(&new_hash(), Utc::now()).await);
    server.restart();
    wait_until_reachable(&store).await;
    let r = record(None, Utc::now());
    let key = new_hash();
    store.create(&r, &key, None).await.unwrap();
    assert_eq!(find(&store, &key, Utc::now()).await, Some(r));

    assert!(
        RedisStore::connect("not a url", "kg", Duration::from_secs(1))
            .await
            .is_err()
    );
}
