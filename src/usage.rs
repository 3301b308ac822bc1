//! Usage records: per key, how many requests passed and when the last one did. Counted in
//! memory on the hot path (a sharded map, one short lock, no I/O) and flushed to the store in
//! batches every `usage.flush_interval`, so no request ever waits on a store write.

use crate::store::{KeyStore, StoreError, UsageDelta};
use chrono::{DateTime, Utc};
use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

const SHARDS: usize = 32;
/// Deltas per store call in a flush: what a failed call can leave in doubt.
const FLUSH_CHUNK: usize = 256;

#[derive(Default)]
struct Counts {
    requests: u64,
    last_used: Option<DateTime<Utc>>,
}

/// Key ids are ours (generated), so a fast seeded hash is enough; every map and the shard pick
/// get seeds of their own, so a shard's keys do not share their map's bucket bits.
pub struct UsageRecorder {
    shards: Vec<Mutex<HashMap<Box<str>, Counts, RandomState>>>,
    hasher: RandomState,
}

impl Default for UsageRecorder {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            hasher: RandomState::default(),
        }
    }
}

impl UsageRecorder {
    /// Counts one request for `key_id` at `now`.
    pub fn record(&self, key_id: &str, now: DateTime<Utc>) {
        let shard = (self.hasher.hash_one(key_id) as usize) % SHARDS;
        let mut map = self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let counts = match map.get_mut(key_id) {
            Some(c) => c,
            None => map.entry(key_id.into()).or_default(),
        };
        counts.requests += 1;
        if counts.last_used.is_none_or(|t| t < now) {
            counts.last_used = Some(now);
        }
    }

    /// Takes everything counted so far.
    #[cfg(test)]
    fn drain(&self) -> Vec<UsageDelta> {
        let mut out = Vec::new();
        for shard in &self.shards {
            out.extend(Self::take(shard));
        }
        out
    }

    /// Takes what one shard counted so far.
    fn take(
        shard: &Mutex<HashMap<Box<str>, Counts, RandomState>>,
    ) -> impl Iterator<Item = UsageDelta> {
        let taken = std::mem::take(&mut *shard.lock().unwrap_or_else(PoisonError::into_inner));
        taken.into_iter().filter_map(|(id, c)| {
            Some(UsageDelta {
                api_key_id: id.into(),
                requests: c.requests,
                last_used: c.last_used?,
            })
        })
    }

    /// Puts a batch back after a failed flush, so counts survive a store outage.
    fn restore(&self, batch: Vec<UsageDelta>) {
        for d in batch {
            let shard = (self.hasher.hash_one(d.api_key_id.as_str()) as usize) % SHARDS;
            let mut map = self.shards[shard]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let c = map.entry(d.api_key_id.into()).or_default();
            c.requests += d.requests;
            if c.last_used.is_none_or(|t| t < d.last_used) {
                c.last_used = Some(d.last_used);
            }
        }
    }

    /// Writes what was counted to the store; on failure keeps it for the next flush.
    pub async fn flush(&self, store: &dyn KeyStore) {
        self.flush_with(async |chunk| store.record_usage(chunk).await)
            .await;
    }

    /// Sends what was counted in chunks of [`FLUSH_CHUNK`], taking the shards one at a time as
    /// the chunks need them: a flush holds at most a shard and a chunk outside the maps, not a
    /// copy of every key counted (100 000 keys were ~15 MiB more resident while they flushed).
    /// When a chunk fails, it and what was taken but not sent are kept for the next flush, and
    /// the shards not yet taken keep counting; the chunks before it were applied and are not
    /// sent again. A failed chunk may have been applied in part (a timeout does not say), so its
    /// retry can count up to one chunk twice: counts err high, never lost.
    async fn flush_with(&self, mut send: impl AsyncFnMut(&[UsageDelta]) -> Result<(), StoreError>) {
        let mut shards = self.shards.iter();
        let mut pending: Vec<UsageDelta> = Vec::new();
        loop {
            while pending.len() < FLUSH_CHUNK
                && let Some(shard) = shards.next()
            {
                pending.extend(Self::take(shard));
            }
            if pending.is_empty() {
                return;
            }
            let chunk = pending.len() - pending.len().min(FLUSH_CHUNK);
            if let Err(e) = send(&pending[chunk..]).await {
                tracing::warn!(error = %e, keys = pending.len(), "usage flush failed; will retry");
                self.restore(pending);
                return;
            }
            pending.truncate(chunk);
        }
    }

    #[cfg(test)]
    fn keys_counted(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// Flushes every `interval` until `stop` resolves, then once more.
pub async fn flush_periodically(
    recorder: Arc<UsageRecorder>,
    store: Arc<dyn KeyStore>,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => recorder.flush(&*store).await,
            () = &mut stop => break,
        }
    }
    recorder.flush(&*store).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_keep_the_latest_time() {
        let r = UsageRecorder::default();
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(5);
        r.record("apk_a", t1);
        r.record("apk_a", t0);
        r.record("apk_b", t0);
        let mut batch = r.drain();
        batch.sort_by(|a, b| a.api_key_id.cmp(&b.api_key_id));
        assert_eq!(batch.len(), 2);
        assert_eq!((batch[0].requests, batch[0].last_used), (2, t1));
        assert_eq!(batch[1].requests, 1);
        assert!(r.drain().is_empty());
        r.restore(batch);
        assert_eq!(r.drain().len(), 2);
    }

    #[tokio::test]
    async fn a_flush_takes_the_shards_as_its_chunks_need_them() {
        let r = UsageRecorder::default();
        let now = Utc::now();
        let keys = FLUSH_CHUNK * 40;
        for i in 0..keys {
            r.record(&format!("apk_{i}"), now);
        }
        let (mut sent, mut most_taken) = (0, 0);
        r.flush_with(async |chunk| {
            // Taken so far: what was sent, this chunk, and what waits for the next chunks.
            most_taken = most_taken.max(keys - r.keys_counted() - sent);
            sent += chunk.len();
            Ok(())
        })
        .await;
        assert_eq!(sent, keys);
        assert_eq!(r.keys_counted(), 0);
        // About one shard (keys / SHARDS, give or take the hash) plus a chunk; a flush that
        // took every shard first would hold all of them.
        assert!(
            most_taken < FLUSH_CHUNK + 2 * keys / SHARDS,
            "{most_taken} of {keys} keys taken out at once"
        );
    }

    #[tokio::test]
    async fn a_failed_chunk_keeps_itself_and_the_rest_but_not_what_was_applied() {
        let r = UsageRecorder::default();
        let now = Utc::now();
        let keys = FLUSH_CHUNK * 3 + 7;
        for i in 0..keys {
            r.record(&format!("apk_{i}"), now);
        }
        let mut applied: Vec<UsageDelta> = Vec::new();
        let mut calls = 0;
        r.flush_with(async |chunk| {
            calls += 1;
            assert!(chunk.len() <= FLUSH_CHUNK);
            if calls == 3 {
                return Err(StoreError::Unavailable("down".into()));
            }
            applied.extend_from_slice(chunk);
            Ok(())
        })
        .await;
        assert_eq!(calls, 3, "no chunk is sent after a failure");
        assert_eq!(applied.len(), FLUSH_CHUNK * 2);
        let kept = r.drain();
        assert_eq!(kept.len(), keys - FLUSH_CHUNK * 2);
        let mut ids: Vec<&str> = applied
            .iter()
            .chain(&kept)
            .map(|d| d.api_key_id.as_str())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), keys, "every key applied or kept, none both");
        assert!(kept.iter().all(|d| d.requests == 1));

        // The retry sends what was kept, once.
        r.restore(kept);
        let mut resent = 0;
        r.flush_with(async |chunk| {
            resent += chunk.len();
            Ok(())
        })
        .await;
        assert_eq!(resent, keys - FLUSH_CHUNK * 2);
        assert!(r.drain().is_empty());
    }
}
