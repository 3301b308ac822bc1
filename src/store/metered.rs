//! A [`KeyStore`] wrapper that times and counts every operation for the metrics endpoint, so
//! the stores themselves stay free of instrumentation.

use super::{
    AuditEvent, AuditFilter, ChangeFeed, KeyFilter, KeyStore, Member, Page, StoreError, Usage,
    UsageDelta,
};
use crate::auth::key::KeyHash;
use crate::auth::record::KeyRecord;
use crate::auth::verified::VerifiedKey;
use crate::metrics::Metrics;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct MeteredStore {
    inner: Arc<dyn KeyStore>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn KeyStore>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        operation: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = fut.await;
        let failed = matches!(
            result,
            Err(StoreError::Unavailable(_) | StoreError::Corrupt(_))
        );
        self.metrics
            .observe_store(operation, started.elapsed(), failed);
        match &result {
            Err(StoreError::Unavailable(_)) => self.metrics.set_store_up(false),
            Ok(_) => self.metrics.set_store_up(true),
            Err(_) => {}
        }
        result
    }
}

#[async_trait]
impl KeyStore for MeteredStore {
    async fn find_by_hash(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.timed("find_by_hash", self.inner.find_by_hash(hash, now))
            .await
    }

    /// Counted as `find_by_hash`: the same lookup, decoded less.
    async fn find_verified_by_hash(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<VerifiedKey>, StoreError> {
        self.timed("find_by_hash", self.inner.find_verified_by_hash(hash, now))
            .await
    }

    fn failure_domains(&self) -> usize {
        self.inner.failure_domains()
    }

    fn failure_domain(&self, hash: &KeyHash) -> usize {
        self.inner.failure_domain(hash)
    }

    async fn create(
        &self,
        record: &KeyRecord,
        hash: &KeyHash,
        team_limit: Option<u32>,
    ) -> Result<(), StoreError> {
        self.timed("create", self.inner.create(record, hash, team_limit))
            .await
    }

    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.timed("get", self.inner.get(id)).await
    }

    async fn update(&self, expected: &KeyRecord, record: &KeyRecord) -> Result<(), StoreError> {
        self.timed("update", self.inner.update(expected, record))
            .await
    }

    async fn rotate(
        &self,
        expected: &KeyRecord,
        new_hash: &KeyHash,
        new_key_start: &str,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, StoreError> {
        self.timed(
            "rotate",
            self.inner
                .rotate(expected, new_hash, new_key_start, grace, now),
        )
        .await
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.timed("delete", self.inner.delete(id)).await
    }

    async fn delete_if(&self, expected: &KeyRecord) -> Result<(), StoreError> {
        self.timed("delete", self.inner.delete_if(expected)).await
    }

    async fn list(
        &self,
        filter: &KeyFilter,
        page: Page,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError> {
        self.timed("list", self.inner.list(filter, page)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", self.inner.ping()).await
    }

    /// Not timed: a start-up check, not an operation of the gateway's.
    async fn check_access(&self) -> Result<(), StoreError> {
        self.inner.check_access().await
    }

    async fn changes(&self) -> Result<ChangeFeed, StoreError> {
        self.timed("subscribe", self.inner.changes()).await
    }

    async fn put_member(&self, member: &Member) -> Result<Member, StoreError> {
        self.timed("put_member", self.inner.put_member(member))
            .await
    }

    async fn remove_member(
        &self,
        team_id: &str,
        user_id: &str,
    ) -> Result<Option<Member>, StoreError> {
        self.timed("remove_member", self.inner.remove_member(team_id, user_id))
            .await
    }

    async fn get_member(&self, team_id: &str, user_id: &str) -> Result<Option<Member>, StoreError> {
        self.timed("get_member", self.inner.get_member(team_id, user_id))
            .await
    }

    async fn list_members(&self, team_id: &str) -> Result<Vec<Member>, StoreError> {
        self.timed("list_members", self.inner.list_members(team_id))
            .await
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditEvent, StoreError> {
        self.timed("append_audit", self.inner.append_audit(event))
            .await
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: Page,
    ) -> Result<(Vec<AuditEvent>, u64), StoreError> {
        self.timed("list_audit", self.inner.list_audit(filter, page))
            .await
    }

    async fn record_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError> {
        self.timed("record_usage", self.inner.record_usage(batch))
            .await
    }

    async fn usage(&self, ids: &[String]) -> Result<Vec<Usage>, StoreError> {
        self.timed("usage", self.inner.usage(ids)).await
    }
}
