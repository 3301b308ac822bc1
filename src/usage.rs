//! Usage records: per key, how many requests passed and when the last one did. Counted in
//! memory on the hot path (a sharded map, one short lock, no I/O) and flushed to the store in
//! batches every `usage.flush_interval`, so no request ever waits on a store write. A flush
//! that fails for want of a store keeps its counts for the next one (one the store refused is
//! dropped: see `UsageRecorder::flush_with`); at shutdown the last flush is tried again for a
//! while (see [`UsageRecorder::flush_at_exit`]), then what is left is logged and dropped.

use crate::store::{KeyStore, StoreError, UsageDelta};
use chrono::{DateTime, Utc};
use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

const SHARDS: usize = 32;
/// Deltas per store call in a flush: what a failed call can leave in doubt.
const FLUSH_CHUNK: usize = 256;

/// The first pause between two tries of the last flush; it doubles up to [`EXIT_RETRY_MAX`].
const EXIT_RETRY_FIRST: Duration = Duration::from_millis(100);
const EXIT_RETRY_MAX: Duration = Duration::from_secs(1);

/// What the last flush could not send before its deadline: dropped when the process exits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub keys: usize,
    pub requests: u64,
}

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
        if let Err(e) = self
            .flush_with(async |chunk| store.record_usage(chunk).await)
            .await
        {
            tracing::warn!(
                error = %e,
                keys = self.keys_counted(),
                "usage flush failed; kept for the next flush"
            );
        }
    }

    /// The last flush, at shutdown: tried again after a failure (pausing 100 ms, doubling up to
    /// 1 s) until everything counted is sent or `within` has passed; a try under way when it
    /// passes is let finish (each store call is bounded: `store.timeout` on Redis, the usage
    /// busy timeout on SQLite). What is left then is dropped, logged at `error` with how many
    /// keys and requests, and returned.
    pub async fn flush_at_exit(&self, store: &dyn KeyStore, within: Duration) -> Dropped {
        self.flush_at_exit_with(async |chunk| store.record_usage(chunk).await, within)
            .await
    }

    async fn flush_at_exit_with(
        &self,
        mut send: impl AsyncFnMut(&[UsageDelta]) -> Result<(), StoreError>,
        within: Duration,
    ) -> Dropped {
        let deadline = Instant::now() + within;
        let mut pause = EXIT_RETRY_FIRST;
        loop {
            let Err(e) = self.flush_with(&mut send).await else {
                return Dropped::default();
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let dropped = self.drop_all();
                tracing::error!(
                    error = %e,
                    keys = dropped.keys,
                    requests = dropped.requests,
                    ?within,
                    "usage counts dropped at shutdown: the store had not taken them in time"
                );
                return dropped;
            }
            let retry_in = pause.min(left);
            tracing::warn!(
                error = %e,
                keys = self.keys_counted(),
                ?retry_in,
                "usage flush at shutdown failed; trying again"
            );
            tokio::time::sleep(retry_in).await;
            pause = (pause * 2).min(EXIT_RETRY_MAX);
        }
    }

    /// Empties every shard, saying how much was in them.
    fn drop_all(&self) -> Dropped {
        let mut dropped = Dropped::default();
        for shard in &self.shards {
            for d in Self::take(shard) {
                dropped.keys += 1;
                dropped.requests = dropped.requests.saturating_add(d.requests);
            }
        }
        dropped
    }

    /// Sends what was counted in chunks of [`FLUSH_CHUNK`], taking the shards one at a time as
    /// the chunks need them: a flush holds at most a shard and a chunk outside the maps, not a
    /// copy of every key counted (100 000 keys were ~15 MiB more resident while they flushed).
    /// When a chunk fails for want of a store (`StoreError::Unavailable`: a connection lost, a
    /// timeout), it and what was taken but not sent are kept for the next flush, and the shards
    /// not yet taken keep counting; the chunks before it were applied and are not sent again.
    /// Such a chunk may have been applied in part (a timeout does not say), so its retry can
    /// count up to one chunk twice: counts err high, by at most a chunk per failed call, never
    /// lost. A chunk the store answered but refused (any other error: what it holds cannot be
    /// read) would be refused again on every flush, and may have been applied (a reply that
    /// did not decode), so it is not kept: it is dropped, logged at `error`, and the flush goes
    /// on with the next. (The stores themselves repair or skip one key's unreadable usage
    /// rather than fail its chunk: see `store::redis`'s usage script.)
    async fn flush_with(
        &self,
        mut send: impl AsyncFnMut(&[UsageDelta]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut shards = self.shards.iter();
        let mut pending: Vec<UsageDelta> = Vec::new();
        let mut refused = Dropped::default();
        let mut refusal = None;
        let outcome = loop {
            while pending.len() < FLUSH_CHUNK
                && let Some(shard) = shards.next()
            {
                pending.extend(Self::take(shard));
            }
            if pending.is_empty() {
                break Ok(());
            }
            let chunk = pending.len() - pending.len().min(FLUSH_CHUNK);
            match send(&pending[chunk..]).await {
                Ok(()) => {}
                // A denied command (an ACL being fixed) is kept as an outage is: the counts
                // go through once it is granted.
                Err(e @ (StoreError::Unavailable(_) | StoreError::Denied(_))) => {
                    self.restore(pending);
                    break Err(e);
                }
                Err(e) => {
                    for d in &pending[chunk..] {
                        refused.keys += 1;
                        refused.requests = refused.requests.saturating_add(d.requests);
                    }
                    refusal = Some(e);
                }
            }
            pending.truncate(chunk);
        };
        if let Some(e) = refusal {
            tracing::error!(
                error = %e,
                keys = refused.keys,
                requests = refused.requests,
                "usage counts dropped: the store refused them (sent again, they would be \
                 refused again, or counted twice)"
            );
        }
        outcome
    }

    /// Keys with counts not yet flushed.
    fn keys_counted(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

/// Flushes every `interval` until `stop` resolves, then flushes what is left with
/// [`UsageRecorder::flush_at_exit`], trying again for up to `last_within`. Returns what that
/// last flush dropped. `stop` should resolve once nothing counts any more (the proxy drained).
pub async fn flush_periodically(
    recorder: Arc<UsageRecorder>,
    store: Arc<dyn KeyStore>,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
    last_within: Duration,
) -> Dropped {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => recorder.flush(&*store).await,
            () = &mut stop => break,
        }
    }
    recorder.flush_at_exit(&*store, last_within).await
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
        .await
        .unwrap();
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
        .await
        .unwrap_err();
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
        .await
        .unwrap();
        assert_eq!(resent, keys - FLUSH_CHUNK * 2);
        assert!(r.drain().is_empty());
    }

    /// A chunk the store answered but refused (not `Unavailable`) is dropped rather than kept
    /// and sent again on every flush; the chunks after it are sent, and the flush succeeds.
    #[tokio::test]
    async fn a_refused_chunk_is_dropped_and_the_rest_is_sent() {
        let r = UsageRecorder::default();
        let now = Utc::now();
        let keys = FLUSH_CHUNK * 3 + 7;
        for i in 0..keys {
            r.record(&format!("apk_{i}"), now);
        }
        let (mut calls, mut sent) = (0, 0);
        r.flush_with(async |chunk| {
            calls += 1;
            if calls == 2 {
                return Err(StoreError::Corrupt("refused".into()));
            }
            sent += chunk.len();
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(calls, 4);
        assert_eq!(sent, keys - FLUSH_CHUNK);
        assert_eq!(r.keys_counted(), 0, "nothing kept for the next flush");
    }

    /// Review: the last flush at shutdown was one try, so a store down at that moment lost
    /// every count since the last flush (while the log said "will retry"). It is tried again
    /// until the store takes it.
    #[tokio::test(start_paused = true)]
    async fn the_last_flush_is_tried_again_until_the_store_takes_it() {
        let r = UsageRecorder::default();
        let now = Utc::now();
        for i in 0..10 {
            r.record(&format!("apk_{i}"), now);
        }
        r.record("apk_0", now);
        let started = Instant::now();
        let (mut calls, mut sent) = (0, 0u64);
        let dropped = r
            .flush_at_exit_with(
                async |chunk| {
                    calls += 1;
                    if calls < 4 {
                        return Err(StoreError::Unavailable("down".into()));
                    }
                    sent += chunk.iter().map(|d| d.requests).sum::<u64>();
                    Ok(())
                },
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(dropped, Dropped::default());
        assert_eq!((calls, sent), (4, 11));
        // Pauses of 100, 200 and 400 ms between the tries.
        assert_eq!(started.elapsed(), Duration::from_millis(700));
        assert_eq!(r.keys_counted(), 0);
    }

    /// A store that takes nothing before the deadline: the last flush gives up then (not
    /// before), and says what it dropped.
    #[tokio::test(start_paused = true)]
    async fn the_last_flush_gives_up_at_its_deadline_and_says_what_it_dropped() {
        let r = UsageRecorder::default();
        let now = Utc::now();
        for _ in 0..3 {
            r.record("apk_a", now);
        }
        r.record("apk_b", now);
        let started = Instant::now();
        let mut calls = 0;
        let dropped = r
            .flush_at_exit_with(
                async |_| {
                    calls += 1;
                    Err(StoreError::Unavailable("down".into()))
                },
                Duration::from_secs(3),
            )
            .await;
        assert_eq!(
            dropped,
            Dropped {
                keys: 2,
                requests: 4
            }
        );
        // 0, 0.1, 0.3, 0.7, 1.5, 2.5 and 3 s (the last pause cut to the deadline).
        assert_eq!(calls, 7);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(r.keys_counted(), 0);
    }
}
