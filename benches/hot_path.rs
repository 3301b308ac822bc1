//! Micro-benchmarks of the per-request work: key format check, SHA-256, credential extraction,
//! policy with a 20-entry CIDR list, and a full verify on a cache hit (embedded store behind it;
//! the hit never reaches it). Targets are in issue "Benchmarks"; results go to
//! docs/benchmarks.md with the machine they ran on.

#![allow(clippy::unwrap_used)] // benchmark set-up: a panic is a broken bench

use chrono::Utc;
use criterion::{Criterion, black_box, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, Uri};
use keygate::auth::key::{KeyHash, KeyPrefix, NewKey, SlotTag, check_format};
use keygate::auth::policy::authorize;
use keygate::auth::record::{KeyRecord, KeyType};
use keygate::auth::verified::VerifiedKey;
use keygate::auth::verify::Verifier;
use keygate::config::{CacheConfig, KeySource};
use keygate::credential::{SourceNames, extract};
use keygate::keys::{Actor, CreateKey, KeyRules, KeyService};
use keygate::store::KeyStore;
use keygate::store::embedded::EmbeddedStore;
use std::sync::Arc;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let prefix = KeyPrefix::default();
    let key = NewKey::generate(&prefix, SlotTag::random());
    let value = key.expose().to_owned();

    c.bench_function("key_check_format", |b| {
        b.iter(|| check_format(&prefix, black_box(&value)))
    });
    c.bench_function("key_sha256", |b| b.iter(|| KeyHash::of(black_box(&value))));

    let names = SourceNames {
        header: HeaderName::from_static("x-api-key"),
        query_param: "api_key".into(),
    };
    let mut headers = HeaderMap::new();
    headers.insert("authorization", format!("Bearer {value}").parse().unwrap());
    headers.insert("accept", "application/json".parse().unwrap());
    headers.insert("user-agent", "bench/1.0".parse().unwrap());
    let uri: Uri = "/api/items?page=2".parse().unwrap();
    let sources = [KeySource::Bearer, KeySource::Header];
    c.bench_function("credential_extract_bearer", |b| {
        b.iter(|| extract(&sources, &names, black_box(&headers), &uri).map(|p| p.key.len()))
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KeyStore> = Arc::new(EmbeddedStore::open(&dir.path().join("b.db")).unwrap());
    let (cached_key, mut record) = rt.block_on(async {
        let service = KeyService::new(store.clone(), prefix.clone(), KeyRules::permissive());
        let mut req = CreateKey::new(KeyType::Shared);
        req.scope_names = vec!["read".into(), "write".into()];
        service
            .create(req, &Actor::cli(), Utc::now())
            .await
            .unwrap()
    });
    record.allow_ips = (0..20)
        .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
        .collect();
    let record = VerifiedKey::from(record);
    let scopes = vec!["read".to_string(), "write".to_string()];
    let ip = "10.19.3.4".parse().unwrap();
    let now = Utc::now();
    c.bench_function("policy_scopes_and_20_cidrs", |b| {
        b.iter(|| authorize(black_box(&record), &scopes, ip, now))
    });

    let verifier = Verifier::new(
        prefix.clone(),
        store,
        &CacheConfig {
            ttl: Duration::from_secs(600),
            max_entries: 100_000,
            negative_ttl: Duration::from_secs(5),
            negative_max_entries: 10_000,
            stale_for: Duration::from_secs(60),
        },
    );
    // As a gateway with its change feed connected: entries may be fresh.
    verifier.feed_connected();
    let cached = cached_key.expose().to_owned();
    rt.block_on(verifier.verify(&cached, now)).unwrap();
    c.bench_function("verify_cache_hit", |b| {
        b.to_async(&rt)
            .iter(|| verifier.verify(black_box(&cached), now))
    });

    // A cache miss decodes the stored record: whole then cut down, or only what is kept.
    let mut record = KeyRecord::new(
        "apk_0AbCdEfGhIjKlMnOpQrStUv".into(),
        "billing service, production".into(),
        KeyType::Shared,
        "kg_0AbC".into(),
        now,
    );
    record.team_id = Some("team-acme".into());
    record.created_by = Some("admin@example.com".into());
    record.scope_names = vec!["read".into(), "write".into()];
    record.allow_ips = vec!["10.0.0.0/8".parse().unwrap()];
    record.expires_time = Some(now + chrono::Duration::days(90));
    record.metadata = [("env".to_owned(), "prod".to_owned())].into();
    let json = serde_json::to_string(&record).unwrap();
    c.bench_function("record_decode_whole_then_cut", |b| {
        b.iter(|| {
            let whole: KeyRecord = serde_json::from_str(black_box(&json)).unwrap();
            VerifiedKey::from(whole)
        })
    });
    c.bench_function("record_decode_verified_only", |b| {
        b.iter(|| serde_json::from_str::<VerifiedKey>(black_box(&json)).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
