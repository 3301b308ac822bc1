//! Verification of a presented key: format and checksum first (no I/O), then the SHA-256, then
//! the in-process cache, then the store. Three moka caches, each with one job:
//! - `fresh`: known keys, for `cache.ttl`; concurrent misses on one hash share one store load.
//! - `stale`: the last good answer for each key, kept `ttl + stale_for`, read only when the
//!   store cannot answer, so keys already seen keep working through a store outage.
//! - `negative`: hashes the store did not know, smaller and shorter-lived, so a flood of
//!   well-formed but unknown keys costs one store lookup per key per `negative_ttl`.
//!
//! When the store fails, lookups skip it for a short back-off instead of making every request
//! wait for a timeout; an uncached key then gets `StoreUnavailable` (503), never a pass.

use super::key::{KeyFormatError, KeyHash, KeyPrefix, check_format};
use super::record::KeyRecord;
use crate::config::CacheConfig;
use crate::store::{Change, KeyStore, StoreError};
use chrono::{DateTime, Utc};
use moka::future::Cache;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long lookups skip a store that just failed.
const STORE_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Malformed(#[from] KeyFormatError),
    #[error("unknown API key")]
    Unknown,
    #[error("the key store is unavailable")]
    StoreUnavailable,
}

#[derive(Debug)]
enum LoadError {
    Unknown,
    Store(StoreError),
}

/// Counters read by the metrics endpoint and the tests.
#[derive(Debug, Default)]
pub struct VerifyStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub negative_hits: AtomicU64,
    pub stale_served: AtomicU64,
    pub store_lookups: AtomicU64,
    pub store_errors: AtomicU64,
}

pub struct Verifier {
    prefix: KeyPrefix,
    store: Arc<dyn KeyStore>,
    fresh: Cache<KeyHash, Arc<KeyRecord>>,
    stale: Cache<KeyHash, Arc<KeyRecord>>,
    negative: Cache<KeyHash, ()>,
    /// Milliseconds since `epoch` until which the store is not asked (0: ask).
    store_backoff_until_ms: AtomicI64,
    epoch: Instant,
    /// Bumped by every applied change; see `verify`.
    generation: AtomicU64,
    pub stats: VerifyStats,
}

impl Verifier {
    pub fn new(prefix: KeyPrefix, store: Arc<dyn KeyStore>, cfg: &CacheConfig) -> Self {
        Self {
            prefix,
            store,
            fresh: Cache::builder()
                .max_capacity(cfg.max_entries)
                .time_to_live(cfg.ttl)
                .build(),
            stale: Cache::builder()
                .max_capacity(cfg.max_entries)
                .time_to_live(cfg.ttl + cfg.stale_for)
                .build(),
            negative: Cache::builder()
                .max_capacity(cfg.negative_max_entries.max(1))
                .time_to_live(cfg.negative_ttl.max(Duration::from_millis(1)))
                .build(),
            store_backoff_until_ms: AtomicI64::new(0),
            epoch: Instant::now(),
            generation: AtomicU64::new(0),
            stats: VerifyStats::default(),
        }
    }

    pub fn prefix(&self) -> &KeyPrefix {
        &self.prefix
    }

    /// The record for a presented key, or why there is none. Policy is checked by the caller.
    pub async fn verify(
        &self,
        presented: &str,
        now: DateTime<Utc>,
    ) -> Result<Arc<KeyRecord>, VerifyError> {
        check_format(&self.prefix, presented)?;
        let hash = KeyHash::of(presented);
        if let Some(record) = self.fresh.get(&hash).await {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(record);
        }
        if self.negative.contains_key(&hash) {
            self.stats.negative_hits.fetch_add(1, Ordering::Relaxed);
            return Err(VerifyError::Unknown);
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        if self.store_in_backoff() {
            return self.stale_or_unavailable(&hash).await;
        }
        // A change that lands while the load is in flight may describe a newer state than the
        // one loaded; then the loaded copy must not stay cached.
        let generation = self.generation.load(Ordering::Acquire);
        let loaded = self
            .fresh
            .try_get_with(hash, async {
                self.stats.store_lookups.fetch_add(1, Ordering::Relaxed);
                match self.store.find_by_hash(&hash, now).await {
                    Ok(Some(record)) => {
                        let record = Arc::new(record);
                        self.stale.insert(hash, record.clone()).await;
                        Ok(record)
                    }
                    Ok(None) => Err(LoadError::Unknown),
                    Err(e) => Err(LoadError::Store(e)),
                }
            })
            .await;
        match loaded {
            Ok(record) => {
                if self.generation.load(Ordering::Acquire) != generation {
                    self.fresh.invalidate(&hash).await;
                }
                Ok(record)
            }
            Err(e) => match &*e {
                LoadError::Unknown => {
                    // A key known a moment ago may have been deleted: its stale copy must not
                    // outlive the store's "no".
                    self.stale.invalidate(&hash).await;
                    self.negative.insert(hash, ()).await;
                    Err(VerifyError::Unknown)
                }
                LoadError::Store(err) => {
                    self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %err, "key store lookup failed");
                    self.enter_backoff();
                    self.stale_or_unavailable(&hash).await
                }
            },
        }
    }

    async fn stale_or_unavailable(&self, hash: &KeyHash) -> Result<Arc<KeyRecord>, VerifyError> {
        match self.stale.get(hash).await {
            Some(record) => {
                self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                Ok(record)
            }
            None => Err(VerifyError::StoreUnavailable),
        }
    }

    fn now_ms(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    fn store_in_backoff(&self) -> bool {
        self.now_ms() < self.store_backoff_until_ms.load(Ordering::Relaxed)
    }

    fn enter_backoff(&self) {
        let until = self.now_ms() + STORE_BACKOFF.as_millis() as i64;
        self.store_backoff_until_ms.store(until, Ordering::Relaxed);
    }

    /// Applies a change from the store's feed.
    pub async fn apply(&self, change: &Change) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        match change {
            Change::Keys(hashes) => {
                for h in hashes {
                    self.fresh.invalidate(h).await;
                    self.stale.invalidate(h).await;
                    self.negative.invalidate(h).await;
                }
            }
            Change::All => {
                self.fresh.invalidate_all();
                self.stale.invalidate_all();
                self.negative.invalidate_all();
            }
        }
    }

    /// The change feed was lost: changes may have been missed. Answers must come from the store
    /// again, but the stale copies stay for outages (bounded by `stale_for`).
    pub fn feed_lost(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.fresh.invalidate_all();
        self.negative.invalidate_all();
    }

    pub fn cached_entries(&self) -> u64 {
        self.fresh.entry_count()
    }
}

/// Keeps the verifier subscribed to the store's changes for as long as the process runs:
/// on every (re)subscription and on every loss, the fresh caches are flushed. `first` is a feed
/// opened before serving began, so no change made after start-up can be missed.
pub async fn follow_changes(
    verifier: Arc<Verifier>,
    store: Arc<dyn KeyStore>,
    mut first: Option<crate::store::ChangeFeed>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let feed = match first.take() {
            Some(feed) => Ok(feed),
            None => store.changes().await,
        };
        match feed {
            Ok(mut feed) => {
                // Whatever changed while we were not listening is unknown: start clean.
                verifier.feed_lost();
                delay = Duration::from_millis(100);
                tracing::debug!("subscribed to key changes");
                while let Some(change) = feed.recv().await {
                    verifier.apply(&change).await;
                }
                tracing::warn!("key change feed lost; cache flushed, resubscribing");
                verifier.feed_lost();
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot subscribe to key changes yet");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}
