//! The cache-hit lookup on its own: a `moka::future::Cache<KeyHash, Arc<VerifiedKey>>` built as
//! `auth::verify::Verifier` builds its `known` cache (capacity, TTL, hasher), holding 100 000
//! keys, and one `get` of a present hash: always the same one (`cache_hit_lookup_100k`, what
//! `hot_path`'s `verify_cache_hit` measures, with the format check and the SHA-256 on top) and
//! a different one each time (`…_spread`, as a gateway serving many keys sees it). Then the full
//! `Verifier::verify` over 100 000 cached keys in turn (`verify_cache_hit_100k_spread`). Before
//! timing, it prints what the cache costs in resident memory: bytes per cached key, the entry
//! and the `VerifiedKey` it holds (identity headers included, after one request has cloned
//! them, as forwarding does). Results go to docs/benchmarks.md.

#![allow(clippy::unwrap_used)] // benchmark set-up: a panic is a broken bench

use chrono::Utc;
use criterion::{Criterion, black_box, criterion_group, criterion_main};
use keygate::auth::key::{KeyHash, KeyPrefix, NewKey, SlotTag};
use keygate::auth::record::{KeyRecord, KeyType};
use keygate::auth::verified::VerifiedKey;
use keygate::auth::verify::Verifier;
use keygate::config::CacheConfig;
use keygate::store::KeyStore;
use keygate::store::embedded::EmbeddedStore;
use moka::future::Cache;
use std::sync::Arc;
use std::time::Duration;

const ENTRIES: usize = 100_000;

fn record(n: usize) -> KeyRecord {
    let mut r = KeyRecord::new(
        format!("apk_{n:020}"),
        format!("bench key {n}"),
        KeyType::Shared,
        "kg_abcdefg".into(),
        Utc::now(),
    );
    r.team_id = Some("bench".into());
    r.created_by = Some("bench".into());
    r.scope_names = vec!["read".into()];
    r
}

/// Resident memory of this process in bytes (Linux; 0 elsewhere).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let prefix = KeyPrefix::default();
    let cache: Cache<KeyHash, Arc<VerifiedKey>, foldhash::fast::RandomState> = Cache::builder()
        .max_capacity(2 * ENTRIES as u64)
        .time_to_live(Duration::from_secs(3600))
        .build_with_hasher(foldhash::fast::RandomState::default());
    let hashes: Vec<KeyHash> = (0..ENTRIES)
        .map(|_| NewKey::generate(&prefix, SlotTag::random()).hash())
        .collect();
    let before = rss_bytes();
    rt.block_on(async {
        for (n, h) in hashes.iter().enumerate() {
            let key = Arc::new(VerifiedKey::from(record(n)));
            // Forwarding clones the identity headers, which gives their shared buffer its
            // reference count: memory as it is once the key has served a request.
            let mut forwarded = http::HeaderMap::new();
            keygate::proxy::headers::set_identity(&mut forwarded, &key.identity);
            cache.insert(*h, key).await;
        }
        cache.run_pending_tasks().await;
    });
    let one = rss_bytes();
    eprintln!(
        "cache_lookup: resident bytes per cached key: {} (VerifiedKey + one moka entry); \
         {} bytes of VerifiedKey inline ({} of the store's KeyRecord)",
        (one - before) / ENTRIES as u64,
        std::mem::size_of::<VerifiedKey>(),
        std::mem::size_of::<KeyRecord>()
    );
    let probe = hashes[ENTRIES / 2];
    c.bench_function("cache_hit_lookup_100k", |b| {
        b.to_async(&rt)
            .iter(|| async { cache.get(black_box(&probe)).await.is_some() })
    });
    let mut i = 0usize;
    c.bench_function("cache_hit_lookup_100k_spread", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 7919) % ENTRIES;
            let h = hashes[i];
            let cache = &cache;
            async move { cache.get(black_box(&h)).await.is_some() }
        })
    });
}

fn bench_verify_spread(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let prefix = KeyPrefix::default();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&dir.path().join("b.db")).unwrap());
    let keys: Vec<String> = rt.block_on(async {
        let mut keys = Vec::with_capacity(ENTRIES);
        for n in 0..ENTRIES {
            let key = NewKey::generate(&prefix, SlotTag::random());
            let mut rec = record(n);
            rec.api_key_id = keygate::auth::key::new_key_id(SlotTag::random());
            store.create(&rec, &key.hash(), None).await.unwrap();
            keys.push(key.expose().to_owned());
        }
        keys
    });
    let verifier = Verifier::new(
        prefix,
        store,
        &CacheConfig {
            ttl: Duration::from_secs(3600),
            max_entries: 2 * ENTRIES as u64,
            negative_ttl: Duration::from_secs(5),
            negative_max_entries: 10_000,
            stale_for: Duration::from_secs(60),
        },
    );
    // As a gateway with its change feed connected: entries may be fresh.
    verifier.feed_connected();
    let now = Utc::now();
    rt.block_on(async {
        for k in &keys {
            verifier.verify(k, now).await.unwrap();
        }
    });
    let mut i = 0usize;
    c.bench_function("verify_cache_hit_100k_spread", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 7919) % ENTRIES;
            let (verifier, key) = (&verifier, keys[i].as_str());
            async move { verifier.verify(black_box(key), now).await.is_ok() }
        })
    });
}

criterion_group!(benches, bench, bench_verify_spread);
criterion_main!(benches);
