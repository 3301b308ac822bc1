//! [`EmbeddedStore`]: the default [`KeyStore`], one SQLite file on local disk.
//!
//! The file is opened in WAL mode with a 5 s busy timeout, so a `keygate serve` process and a
//! `keygate keys` CLI process can use it at the same time: readers never block on the writer,
//! and writers queue behind each other. Layout:
//! - `keys(id PRIMARY KEY, team_id, created_ms, record)`: `record` is the [`KeyRecord`] as JSON;
//!   `team_id` and `created_ms` are copies kept as columns for the team limit and the ordering.
//! - `hashes(hash BLOB PRIMARY KEY, key_id, valid_until_ms)`: every hash that leads to a key;
//!   `valid_until_ms` is NULL for the current hash and set for hashes rotated out with a grace
//!   (found through such a hash, the record's `expires_time` is clipped to it, so that cached
//!   copies stop working at the end of the grace too).
//! - `changes(seq AUTOINCREMENT, hashes, at_ms)`: one row per write, with the touched hashes as
//!   space-separated hex (`*`: everything). Other processes learn about changes by polling it.
//! - `members(team_id, user_id, role, added_s, added_ns)`, keyed by (team, user): `added_time`
//!   as seconds and nanoseconds, so that listing orders by the exact time in SQL.
//! - `audit(seq AUTOINCREMENT, time_s, time_ns, api_key_id, team_id, event)`: `event` is the
//!   [`AuditEvent`] as JSON (its `event_id` left empty: `seq` is the event id, rendered as a
//!   zero-padded decimal); the other columns are indexed copies for filtering. Rows beyond the
//!   cap are deleted by the append that lands on every 1% of the cap (at most every 1000
//!   appends), so the table may hold up to 1% more than the cap.
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction (it takes the write lock up front, so the
//! team-limit count and the insert cannot interleave with another writer, even in another
//! process). Key writes append their change row in the same transaction, and also prune change
//! rows older than [`CHANGE_RETENTION`] and hashes past their grace, so readers never write.
//! Member and audit writes log no change: no cache holds what they touch.
//!
//! Two connections, each behind a `std::sync::Mutex` and only used inside `spawn_blocking` (the
//! lock is never held across an `.await`): one for writes, one for reads (`find_by_hash`, the
//! change poller, `ping`, `get`, `list`, members, audit and usage reads; `PRAGMA query_only`).
//! A write may wait up to the busy timeout for another process's write lock (a CLI write, a
//! `sqlite3` shell, a backup) while holding the write connection; in WAL mode a read needs no
//! write lock, so with a connection of their own lookups, readiness pings and the change poller
//! never queue behind it (with one shared connection, an uncached key waited 3.5 s behind a usage
//! flush in a review's reproduction, and `/readyz` failed). Usage flushes wait at most
//! [`USAGE_BUSY_TIMEOUT`] for the lock: what they carry is kept and sent on the next flush, so
//! they need not hold up admin writes for the full [`BUSY_TIMEOUT`].

use super::{
    AUDIT_CAP, AuditEvent, AuditFilter, Change, ChangeFeed, KeyFilter, KeyStore, Member, Page,
    RECORD_CAP, Role, StoreError, Usage, UsageDelta,
};
use crate::auth::key::KeyHash;
use crate::auth::record::KeyRecord;
use crate::auth::verified::VerifiedKey;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::types::Value;
use rusqlite::{
    Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior, params,
    params_from_iter,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a statement waits for another connection's lock (writes: another process's write
/// lock; reads only without WAL).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a usage flush waits for the write lock: a flush that gives up keeps its counts for
/// the next one, and meanwhile it holds the write connection (admin writes wait behind it).
pub const USAGE_BUSY_TIMEOUT: Duration = Duration::from_secs(1);
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Change rows older than this are pruned. A feed that could not poll for half of it (a
/// suspended machine) may have missed rows and reports `Change::All`.
pub const CHANGE_RETENTION: Duration = Duration::from_secs(600);
const FEED_CAPACITY: usize = 256;
/// Rows forwarded per poll; the rest come on the next one.
const POLL_BATCH: i64 = 1000;

/// `SELECT <this> FROM keys`: the record column, or NULL when it is longer than
/// [`RECORD_CAP`] bytes (the number is the cap; a test checks it), so that keygate never
/// receives an oversized value (`octet_length`: SQLite 3.43 or later; the bundled one is
/// newer). Read through [`within_cap`].
macro_rules! capped_record {
    ($column:literal) => {
        concat!(
            "CASE WHEN octet_length(",
            $column,
            ") <= 262144 THEN ",
            $column,
            " END"
        )
    };
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    team_id TEXT,
    created_ms INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_team ON keys(team_id);
CREATE INDEX IF NOT EXISTS keys_created ON keys(created_ms, id);
CREATE TABLE IF NOT EXISTS hashes (
    hash BLOB PRIMARY KEY,
    key_id TEXT NOT NULL,
    valid_until_ms INTEGER
);
CREATE INDEX IF NOT EXISTS hashes_key ON hashes(key_id);
CREATE INDEX IF NOT EXISTS hashes_grace ON hashes(valid_until_ms) WHERE valid_until_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hashes TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    team_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    added_s INTEGER NOT NULL,
    added_ns INTEGER NOT NULL,
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX IF NOT EXISTS members_added ON members(team_id, added_s, added_ns, user_id);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time_s INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    api_key_id TEXT,
    team_id TEXT,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_key ON audit(api_key_id) WHERE api_key_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_team ON audit(team_id) WHERE team_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_time ON audit(time_s, time_ns);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    last_ms INTEGER NOT NULL
);
";

pub struct EmbeddedStore {
    /// Every write transaction, one at a time.
    writer: Arc<Mutex<Connection>>,
    /// Every read, so that none waits behind a write that waits for the write lock.
    reader: Arc<Mutex<Connection>>,
    /// [`AUDIT_CAP`], except in tests (see [`EmbeddedStore::with_audit_cap`]).
    audit_cap: usize,
    /// Moved on after every write of this process: its change feeds look at once instead of at
    /// their next poll, so a key disabled through this process's admin API is refused by
    /// this process's gateway within milliseconds, not up to [`POLL_EVERY`] later. Other
    /// processes on the same file still poll.
    written: tokio::sync::watch::Sender<u64>,
    /// [`POLL_EVERY`], except in tests (see [`EmbeddedStore::with_poll_every`]).
    poll_every: Duration,
}

impl EmbeddedStore {
    /// Removes `id` for good; with `expected`, only while its record still equals it.
    async fn delete_where(
        &self,
        id: String,
        expected: Option<KeyRecord>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let tx = begin(conn)?;
            if let Some(expected) = &expected {
                let json: Option<Option<String>> = tx
                    .query_row(
                        concat!(
                            "SELECT ",
                            capped_record!("record"),
                            " FROM keys WHERE id = ?1"
                        ),
                        [&id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db_err)?;
                let current: KeyRecord = decode(&within_cap(json.ok_or(StoreError::NotFound)?)?)?;
                if current != *expected {
                    return Err(StoreError::Conflict);
                }
            }
            let hashes = hashes_of(&tx, &id)?;
            let n = tx
                .execute("DELETE FROM keys WHERE id = ?1", [&id])
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            tx.execute("DELETE FROM hashes WHERE key_id = ?1", [&id])
                .map_err(db_err)?;
            tx.execute("DELETE FROM usage WHERE key_id = ?1", [&id])
                .map_err(db_err)?;
            log_change(&tx, &hashes)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    /// Opens (creating if absent) the database at `path` and its schema. Blocking, but brief:
    /// meant for start-up.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let mut conn = Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Happens on file systems without shared memory; still correct, just less
            // concurrent.
            tracing::warn!(%mode, "sqlite refused WAL mode");
        }
        // With WAL, NORMAL only risks the last commits on power loss, never corruption.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        tx.execute_batch(SCHEMA).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        // Opened after the schema exists and WAL is set (a property of the file, so this
        // connection reads in WAL mode too).
        let reader = Connection::open(path).map_err(db_err)?;
        reader.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        reader
            .pragma_update(None, "query_only", true)
            .map_err(db_err)?;
        Ok(Self {
            writer: Arc::new(Mutex::new(conn)),
            reader: Arc::new(Mutex::new(reader)),
            audit_cap: AUDIT_CAP,
            written: tokio::sync::watch::Sender::new(0),
            poll_every: POLL_EVERY,
        })
    }

    /// Keeps about `cap` audit events (at least 1) instead of [`AUDIT_CAP`]. For tests only:
    /// checking the cap would otherwise take a hundred thousand appends.
    #[doc(hidden)]
    #[must_use]
    pub fn with_audit_cap(mut self, cap: usize) -> Self {
        self.audit_cap = cap.max(1);
        self
    }

    /// Polls for other processes' changes every `every` instead of [`POLL_EVERY`]. For tests
    /// only: what this process writes must reach its feeds without a poll.
    #[doc(hidden)]
    #[must_use]
    pub fn with_poll_every(mut self, every: Duration) -> Self {
        self.poll_every = every;
        self
    }

    /// Runs `f` on the write connection on the blocking pool.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let result = run_blocking(self.writer.clone(), f).await;
        if result.is_ok() {
            self.written.send_modify(|n| *n = n.wrapping_add(1));
        }
        result
    }

    /// Runs `f` on the read connection on the blocking pool: `f` must not write (the connection
    /// is `query_only`).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        run_blocking(self.reader.clone(), f).await
    }
}

async fn run_blocking<T: Send + 'static>(
    conn: Arc<Mutex<Connection>>,
    f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(move || {
        // A panic while locked rolled its transaction back on unwind (Transaction's Drop), so
        // the connection is still sound: recover it rather than fail for ever.
        let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut conn)
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("sqlite task failed: {e}")))?
}

impl EmbeddedStore {
    /// The record `hash` reaches, decoded as `T`, with the end of its rotation grace if it has
    /// one; `None` for an unknown hash or one past its grace.
    async fn hash_row<T: DeserializeOwned>(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<(T, Option<i64>)>, StoreError> {
        let hash = *hash;
        let now_ms = now.timestamp_millis();
        let row: Option<(Option<String>, Option<i64>)> = self
            .read(move |conn| {
                let mut stmt = conn
                    .prepare_cached(concat!(
                        "SELECT ",
                        capped_record!("k.record"),
                        ", h.valid_until_ms FROM hashes h \
                         JOIN keys k ON k.id = h.key_id WHERE h.hash = ?1"
                    ))
                    .map_err(db_err)?;
                stmt.query_row([&hash.0[..]], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(db_err)
            })
            .await?;
        match row {
            // Past its grace: refused here; a later write deletes the row (no write on the
            // hot path, which would queue behind other writers).
            Some((_, Some(until))) if now_ms >= until => Ok(None),
            Some((json, until)) => Ok(Some((decode(&within_cap(json)?)?, until))),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl KeyStore for EmbeddedStore {
    async fn find_by_hash(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyRecord>, StoreError> {
        Ok(super::at_grace_end(
            self.hash_row::<KeyRecord>(hash, now).await?,
        ))
    }

    /// Decoded straight into what the verifier keeps, as the Redis store does: the same
    /// checks (an identity value that cannot be a header makes the record unreadable), and
    /// no full record built only to be cut down.
    async fn find_verified_by_hash(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<VerifiedKey>, StoreError> {
        Ok(super::at_grace_end(
            self.hash_row::<VerifiedKey>(hash, now).await?,
        ))
    }

    async fn create(
        &self,
        record: &KeyRecord,
        hash: &KeyHash,
        team_limit: Option<u32>,
    ) -> Result<(), StoreError> {
        let json = encode_capped(record)?;
        let id = record.api_key_id.clone();
        let team = record.team_id.clone();
        let created_ms = record.created_time.timestamp_millis();
        let hash = *hash;
        self.write(move |conn| {
            let tx = begin(conn)?;
            // Keys without a team are never limited (same rule as the Redis store).
            if let (Some(limit), Some(team)) = (team_limit, &team) {
                let count: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM keys WHERE team_id = ?1",
                        [team],
                        |r| r.get(0),
                    )
                    .map_err(db_err)?;
                if count >= i64::from(limit) {
                    return Err(StoreError::LimitExceeded { limit });
                }
            }
            tx.execute(
                "INSERT INTO keys (id, team_id, created_ms, record) VALUES (?1, ?2, ?3, ?4)",
                params![id, team, created_ms, json],
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO hashes (hash, key_id, valid_until_ms) VALUES (?1, ?2, NULL)",
                params![&hash.0[..], id],
            )
            .map_err(db_err)?;
            log_change(&tx, &[hash.to_hex()])?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_owned();
        let json: Option<Option<String>> = self
            .read(move |conn| {
                conn.query_row(
                    concat!(
                        "SELECT ",
                        capped_record!("record"),
                        " FROM keys WHERE id = ?1"
                    ),
                    [&id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)
            })
            .await?;
        json.map(|json| decode(&within_cap(json)?)).transpose()
    }

    async fn update(&self, expected: &KeyRecord, record: &KeyRecord) -> Result<(), StoreError> {
        let expected = expected.clone();
        let mut record = record.clone();
        let id = record.api_key_id.clone();
        let team = record.team_id.clone();
        let created_ms = record.created_time.timestamp_millis();
        self.write(move |conn| {
            let tx = begin(conn)?;
            // `key_start` belongs to rotation: an update computed from a copy read before a
            // rotation must not bring the old hint back.
            let current: Option<Option<String>> = tx
                .query_row(
                    concat!(
                        "SELECT ",
                        capped_record!("record"),
                        " FROM keys WHERE id = ?1"
                    ),
                    params![id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            let Some(current) = current else {
                return Err(StoreError::NotFound);
            };
            let current: KeyRecord = decode(&within_cap(current)?)?;
            if current != expected {
                return Err(StoreError::Conflict);
            }
            record.key_start = current.key_start;
            let json = encode_capped(&record)?;
            let n = tx
                .execute(
                    "UPDATE keys SET team_id = ?2, created_ms = ?3, record = ?4 WHERE id = ?1",
                    params![id, team, created_ms, json],
                )
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            // Every hash of the key reads the record through the join, so announcing them is
            // all that is left to do.
            let hashes = hashes_of(&tx, &id)?;
            log_change(&tx, &hashes)?;
            tx.commit().map_err(db_err)
        })
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
        let expected = expected.clone();
        let id = expected.api_key_id.clone();
        let new_hash = *new_hash;
        let new_key_start = new_key_start.to_owned();
        let now_ms = now.timestamp_millis();
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX / 4);
        // Nothing older than the new key outlives now + grace: a zero-grace rotation (a leaked
        // key) also ends the grace of earlier rotations, and no rotation extends one.
        let deadline = now_ms.saturating_add(grace_ms);
        self.write(move |conn| {
            let tx = begin(conn)?;
            let json: Option<String> = tx
                .query_row(
                    concat!(
                        "SELECT ",
                        capped_record!("record"),
                        " FROM keys WHERE id = ?1"
                    ),
                    [&id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?
                .ok_or(StoreError::NotFound)?;
            let mut record: KeyRecord = decode(&within_cap(json)?)?;
            // Checked inside the transaction, before anything is written: see the trait.
            if record != expected {
                return Err(StoreError::Conflict);
            }
            record.key_start = new_key_start;
            // Never backwards (see `KeyService::change_if`).
            record.updated_time = now.max(record.updated_time);
            let mut announce = hashes_of(&tx, &id)?;
            tx.execute(
                "UPDATE hashes SET valid_until_ms = MIN(COALESCE(valid_until_ms, ?2), ?2) \
                 WHERE key_id = ?1",
                params![id, deadline],
            )
            .map_err(db_err)?;
            tx.execute(
                "DELETE FROM hashes WHERE key_id = ?1 AND valid_until_ms <= ?2",
                params![id, now_ms],
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO hashes (hash, key_id, valid_until_ms) VALUES (?1, ?2, NULL)",
                params![&new_hash.0[..], id],
            )
            .map_err(db_err)?;
            tx.execute(
                "UPDATE keys SET record = ?2 WHERE id = ?1",
                params![id, encode_capped(&record)?],
            )
            .map_err(db_err)?;
            announce.push(new_hash.to_hex());
            log_change(&tx, &announce)?;
            tx.commit().map_err(db_err)?;
            Ok(record)
        })
        .await
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.delete_where(id.to_owned(), None).await
    }

    async fn delete_if(&self, expected: &KeyRecord) -> Result<(), StoreError> {
        self.delete_where(expected.api_key_id.clone(), Some(expected.clone()))
            .await
    }

    async fn list(
        &self,
        filter: &KeyFilter,
        page: Page,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError> {
        let team = filter.team_id.clone();
        let rows: Vec<(String, Option<String>)> = self
            .read(move |conn| {
                let mut stmt = conn
                    .prepare_cached(concat!(
                        "SELECT id, ",
                        capped_record!("record"),
                        " FROM keys WHERE ?1 IS NULL OR team_id = ?1 \
                         ORDER BY created_ms, id"
                    ))
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map([team], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(db_err)?
                    .collect::<Result<Vec<(String, Option<String>)>, _>>()
                    .map_err(db_err)?;
                Ok(rows)
            })
            .await?;
        // The other filters apply to the decoded record, exactly as the Redis store does.
        let mut matched = Vec::new();
        for (id, json) in rows {
            match within_cap(json).and_then(|json| decode::<KeyRecord>(&json)) {
                Ok(record) if filter.matches(&record) => matched.push(record),
                Ok(_) => {}
                Err(e) => super::unreadable_left_out(&id, &e),
            }
        }
        let total = matched.len() as u64;
        let per = page.per_page as usize;
        let skip = page.page.saturating_sub(1) as usize * per;
        Ok((matched.into_iter().skip(skip).take(per).collect(), total))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(drop)
                .map_err(db_err)
        })
        .await
    }

    async fn changes(&self) -> Result<ChangeFeed, StoreError> {
        // Only changes after this point are forwarded: the caller starts from a flushed cache.
        let start: i64 = self
            .read(|conn| {
                conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| {
                    r.get(0)
                })
                .map_err(db_err)
            })
            .await?;
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        tokio::spawn(poll_changes(
            self.reader.clone(),
            start,
            tx,
            self.written.subscribe(),
            self.poll_every,
        ));
        Ok(rx)
    }

    async fn put_member(&self, member: &Member) -> Result<Member, StoreError> {
        let Member {
            team_id,
            user_id,
            role,
            added_time,
        } = member.clone();
        let role = role_text(role)?;
        let (added_s, added_ns) = split_time(added_time);
        let (role, added_s, added_ns) = self
            .write(move |conn| {
                let tx = begin(conn)?;
                // One statement, so that the first put's `added_time` is the one kept even when
                // puts race; RETURNING gives back what is stored, not what was asked for.
                let row = tx
                    .query_row(
                        "INSERT INTO members (team_id, user_id, role, added_s, added_ns) \
                         VALUES (?1, ?2, ?3, ?4, ?5) \
                         ON CONFLICT (team_id, user_id) DO UPDATE SET role = excluded.role \
                         RETURNING role, added_s, added_ns",
                        params![team_id, user_id, role, added_s, added_ns],
                        |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok(row)
            })
            .await?;
        Ok(Member {
            team_id: member.team_id.clone(),
            user_id: member.user_id.clone(),
            role: parse_role(role)?,
            added_time: join_time(added_s, added_ns)?,
        })
    }

    async fn remove_member(
        &self,
        team_id: &str,
        user_id: &str,
    ) -> Result<Option<Member>, StoreError> {
        let (team, user) = (team_id.to_owned(), user_id.to_owned());
        let row: Option<(String, i64, i64)> = self
            .write(move |conn| {
                let tx = begin(conn)?;
                let row = tx
                    .query_row(
                        "DELETE FROM members WHERE team_id = ?1 AND user_id = ?2 \
                         RETURNING role, added_s, added_ns",
                        params![team, user],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                    .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok(row)
            })
            .await?;
        row.map(|(role, s, ns)| member_from_row(team_id, user_id.to_owned(), role, s, ns))
            .transpose()
    }

    async fn get_member(&self, team_id: &str, user_id: &str) -> Result<Option<Member>, StoreError> {
        let (team, user) = (team_id.to_owned(), user_id.to_owned());
        let row: Option<(String, i64, i64)> = self
            .read(move |conn| {
                conn.query_row(
                    "SELECT role, added_s, added_ns FROM members \
                     WHERE team_id = ?1 AND user_id = ?2",
                    params![team, user],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(db_err)
            })
            .await?;
        row.map(|(role, s, ns)| member_from_row(team_id, user_id.to_owned(), role, s, ns))
            .transpose()
    }

    async fn list_members(&self, team_id: &str) -> Result<Vec<Member>, StoreError> {
        let team = team_id.to_owned();
        let rows: Vec<(String, String, i64, i64)> = self
            .read(move |conn| {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT user_id, role, added_s, added_ns FROM members \
                         WHERE team_id = ?1 ORDER BY added_s, added_ns, user_id",
                    )
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map([team], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|(user, role, s, ns)| member_from_row(team_id, user, role, s, ns))
            .collect()
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditEvent, StoreError> {
        // `seq` is the event id; storing it in the JSON as well could only disagree.
        let mut stored = AuditEvent {
            event_id: String::new(),
            ..event.clone()
        };
        let json = encode(&stored)?;
        let (time_s, time_ns) = split_time(stored.time);
        let (key, team) = (stored.api_key_id.clone(), stored.team_id.clone());
        let cap = i64::try_from(self.audit_cap).unwrap_or(i64::MAX);
        let every = prune_every(self.audit_cap);
        let seq = self
            .write(move |conn| {
                let tx = begin(conn)?;
                tx.execute(
                    "INSERT INTO audit (time_s, time_ns, api_key_id, team_id, event) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![time_s, time_ns, key, team, json],
                )
                .map_err(db_err)?;
                let seq = tx.last_insert_rowid();
                if seq % every == 0 {
                    // Everything older than the cap-th newest row goes (the subquery walks the
                    // primary key, newest first; fewer rows than the cap: NULL, nothing goes).
                    tx.execute(
                        "DELETE FROM audit WHERE seq < \
                         (SELECT seq FROM audit ORDER BY seq DESC LIMIT 1 OFFSET ?1)",
                        [cap - 1],
                    )
                    .map_err(db_err)?;
                }
                tx.commit().map_err(db_err)?;
                Ok(seq)
            })
            .await?;
        stored.event_id = event_id(seq);
        Ok(stored)
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: Page,
    ) -> Result<(Vec<AuditEvent>, u64), StoreError> {
        // Only the filters that are set become SQL terms, so that SQLite can pick the index of
        // the most selective one (`?1 IS NULL OR …` would defeat every index).
        let (mut terms, mut args): (Vec<&str>, Vec<Value>) = (Vec::new(), Vec::new());
        if let Some(key) = &filter.api_key_id {
            terms.push("api_key_id = ?");
            args.push(Value::Text(key.clone()));
        }
        if let Some(team) = &filter.team_id {
            terms.push("team_id = ?");
            args.push(Value::Text(team.clone()));
        }
        if let Some(since) = filter.since {
            let (s, ns) = split_time(since);
            terms.push("(time_s, time_ns) >= (?, ?)");
            args.extend([Value::Integer(s), Value::Integer(ns)]);
        }
        if let Some(until) = filter.until {
            let (s, ns) = split_time(until);
            terms.push("(time_s, time_ns) < (?, ?)");
            args.extend([Value::Integer(s), Value::Integer(ns)]);
        }
        let where_sql = if terms.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", terms.join(" AND "))
        };
        let per = i64::from(page.per_page);
        let skip = i64::from(page.page.saturating_sub(1)).saturating_mul(per);
        let (rows, total) = self
            .read(move |conn| {
                // One read transaction: the page and the total come from the same snapshot.
                let tx = conn.transaction().map_err(db_err)?;
                let total: i64 = tx
                    .query_row(
                        &format!("SELECT COUNT(*) FROM audit{where_sql}"),
                        params_from_iter(&args),
                        |r| r.get(0),
                    )
                    .map_err(db_err)?;
                args.extend([Value::Integer(per), Value::Integer(skip)]);
                let mut stmt = tx
                    .prepare(&format!(
                        "SELECT seq, event FROM audit{where_sql} \
                         ORDER BY seq DESC LIMIT ? OFFSET ?"
                    ))
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(params_from_iter(&args), |r| {
                        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                    })
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                drop(stmt);
                tx.commit().map_err(db_err)?;
                Ok((rows, total))
            })
            .await?;
        let events = rows
            .into_iter()
            .map(|(seq, json)| {
                let mut event: AuditEvent = decode(&json)?;
                event.event_id = event_id(seq);
                Ok(event)
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((events, u64::try_from(total).unwrap_or(0)))
    }

    async fn record_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let rows: Vec<(String, i64, i64)> = batch
            .iter()
            .map(|d| {
                (
                    d.api_key_id.clone(),
                    i64::try_from(d.requests).unwrap_or(i64::MAX),
                    d.last_used.timestamp_millis(),
                )
            })
            .collect();
        self.write(move |conn| {
            // A flush that cannot get the lock soon gives up (its counts are kept for the next
            // one) rather than hold the write connection for the full busy timeout.
            conn.busy_timeout(USAGE_BUSY_TIMEOUT).map_err(db_err)?;
            let written = write_usage(conn, &rows);
            conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
            written
        })
        .await
    }

    async fn usage(&self, ids: &[String]) -> Result<Vec<Usage>, StoreError> {
        let ids = ids.to_vec();
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT count, last_ms FROM usage WHERE key_id = ?1")
                .map_err(db_err)?;
            ids.iter()
                .map(|id| {
                    let row: Option<(i64, i64)> = stmt
                        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                        .map_err(db_err)?;
                    Ok(row.map_or_else(Usage::default, |(count, ms)| Usage {
                        request_count: u64::try_from(count).unwrap_or(0),
                        last_used_time: DateTime::from_timestamp_millis(ms),
                    }))
                })
                .collect()
        })
        .await
    }
}

/// Forwards new change rows until the receiver goes away or the database fails; returning
/// drops `tx`, which tells the caller to flush and subscribe again. `conn` is the read
/// connection.
async fn poll_changes(
    conn: Arc<Mutex<Connection>>,
    mut last: i64,
    tx: mpsc::Sender<Change>,
    mut written: tokio::sync::watch::Receiver<u64>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            () = tx.closed() => return,
            _ = tick.tick() => {}
            // This process wrote: look now. (The store, which holds the sender, outlives its
            // feeds in practice; without it, the ticks go on.)
            Ok(()) = written.changed() => {}
        }
        let after = last;
        let rows = run_blocking(conn.clone(), move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, hashes FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![after, POLL_BATCH], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(db_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
            Ok(rows)
        })
        .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "embedded change feed ended");
                return;
            }
        };
        // Rows may have been pruned while we were not looking: assume the worst.
        if last_ok.elapsed() > CHANGE_RETENTION / 2 && tx.send(Change::All).await.is_err() {
            return;
        }
        last_ok = Instant::now();
        for (seq, text) in rows {
            last = seq;
            if let Some(change) = parse_change(&text)
                && tx.send(change).await.is_err()
            {
                return;
            }
        }
    }
}

/// Adds usage `rows` (id, requests, last-used ms) in one write transaction.
///
/// A row whose values are not integers (a foreign writer's: the table is not STRICT, so its
/// INTEGER columns keep text, or a float, as given) fails nothing here (SQLite's arithmetic
/// takes text as 0, and `max` ranks text above any integer), but before it kept the key's usage
/// unreadable for good: the time stayed text. Such a count or time is overwritten with this
/// flush's, as on Redis (`store::redis`'s usage script). A count that would pass the largest
/// integer stays where it is (SQLite would have made it a float).
fn write_usage(conn: &mut Connection, rows: &[(String, i64, i64)]) -> Result<(), StoreError> {
    let tx = begin(conn)?;
    {
        // Only keys that still exist: a late flush must not resurrect a deleted key.
        let mut stmt = tx
            .prepare_cached(
                "INSERT INTO usage (key_id, count, last_ms) \
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM keys WHERE id = ?1) \
                 ON CONFLICT(key_id) DO UPDATE SET \
                 count = CASE WHEN typeof(count) <> 'integer' THEN excluded.count \
                   WHEN count > 9223372036854775807 - excluded.count THEN count \
                   ELSE count + excluded.count END, \
                 last_ms = CASE WHEN typeof(last_ms) <> 'integer' THEN excluded.last_ms \
                   ELSE max(last_ms, excluded.last_ms) END",
            )
            .map_err(db_err)?;
        for (id, n, ms) in rows {
            stmt.execute(params![id, n, ms]).map_err(db_err)?;
        }
    }
    tx.commit().map_err(db_err)
}

fn begin(conn: &mut Connection) -> Result<Transaction<'_>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)
}

/// Hex of every hash that leads to `id`.
fn hashes_of(tx: &Transaction<'_>, id: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = tx
        .prepare_cached("SELECT hash FROM hashes WHERE key_id = ?1")
        .map_err(db_err)?;
    let blobs = stmt
        .query_map([id], |r| r.get::<_, Vec<u8>>(0))
        .map_err(db_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)?;
    Ok(blobs.iter().map(hex::encode).collect())
}

/// Appends a change row and prunes what has outlived its use, inside the caller's write
/// transaction (so a reader-only process never needs the write lock).
fn log_change(tx: &Transaction<'_>, hashes: &[String]) -> Result<(), StoreError> {
    let now_ms = Utc::now().timestamp_millis();
    let retention_ms = i64::try_from(CHANGE_RETENTION.as_millis()).unwrap_or(i64::MAX);
    tx.execute(
        "DELETE FROM changes WHERE at_ms < ?1",
        [now_ms.saturating_sub(retention_ms)],
    )
    .map_err(db_err)?;
    tx.execute(
        "DELETE FROM hashes WHERE valid_until_ms IS NOT NULL AND valid_until_ms <= ?1",
        [now_ms],
    )
    .map_err(db_err)?;
    tx.execute(
        "INSERT INTO changes (hashes, at_ms) VALUES (?1, ?2)",
        params![hashes.join(" "), now_ms],
    )
    .map_err(db_err)?;
    Ok(())
}

/// `*` → everything; otherwise hex hashes. Anything unreadable also means everything: dropping
/// too much from a cache is safe, keeping a stale entry is not.
fn parse_change(text: &str) -> Option<Change> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if text == "*" {
        return Some(Change::All);
    }
    let hashes: Option<Vec<KeyHash>> = text.split_whitespace().map(KeyHash::from_hex).collect();
    Some(hashes.map_or(Change::All, Change::Keys))
}

/// How many audit inserts between two prunings for a given cap: a pruning walks `cap` index
/// entries, so doing it on every insert would cost that much each time; every 1% of the cap (at
/// most every 1000 inserts) keeps the cost amortized and the overshoot at 1% of the cap.
fn prune_every(cap: usize) -> i64 {
    i64::try_from(cap / 100).unwrap_or(i64::MAX).clamp(1, 1000)
}

/// The event id of audit row `seq`: zero-padded, so that ids also sort as text.
fn event_id(seq: i64) -> String {
    format!("{seq:020}")
}

/// A time as (seconds, nanoseconds): exact, and ordered like the time itself.
fn split_time(t: DateTime<Utc>) -> (i64, i64) {
    (t.timestamp(), i64::from(t.timestamp_subsec_nanos()))
}

fn join_time(s: i64, ns: i64) -> Result<DateTime<Utc>, StoreError> {
    u32::try_from(ns)
        .ok()
        .and_then(|ns| DateTime::from_timestamp(s, ns))
        .ok_or_else(|| StoreError::Corrupt(format!("bad stored time {s}.{ns:09}")))
}

/// The role as its serde name (`owner`…), so the column reads like the API.
fn role_text(role: Role) -> Result<String, StoreError> {
    match serde_json::to_value(role) {
        Ok(serde_json::Value::String(text)) => Ok(text),
        other => Err(StoreError::Corrupt(format!(
            "cannot encode role {role:?}: {other:?}"
        ))),
    }
}

fn parse_role(text: String) -> Result<Role, StoreError> {
    serde_json::from_value(serde_json::Value::String(text))
        .map_err(|e| StoreError::Corrupt(format!("bad stored role: {e}")))
}

fn member_from_row(
    team_id: &str,
    user_id: String,
    role: String,
    added_s: i64,
    added_ns: i64,
) -> Result<Member, StoreError> {
    Ok(Member {
        team_id: team_id.to_owned(),
        user_id,
        role: parse_role(role)?,
        added_time: join_time(added_s, added_ns)?,
    })
}

fn encode<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

/// A record read through [`capped_record`]: NULL means longer than [`RECORD_CAP`].
fn within_cap(json: Option<String>) -> Result<String, StoreError> {
    json.ok_or_else(|| StoreError::Corrupt(format!("stored record longer than {RECORD_CAP} bytes")))
}

/// Encodes a record, refusing one longer than [`RECORD_CAP`]: keygate would refuse to read it.
fn encode_capped(record: &KeyRecord) -> Result<String, StoreError> {
    let json = encode(record)?;
    if json.len() > RECORD_CAP {
        return Err(StoreError::Corrupt(format!(
            "a record of {} bytes would be longer than {RECORD_CAP}, which keygate reads",
            json.len()
        )));
    }
    Ok(json)
}

fn decode<T: DeserializeOwned>(json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("bad stored value: {e}")))
}

/// Busy past the timeout, I/O and the like mean the database cannot answer now; a constraint
/// violation (an id or hash stored twice) or an unreadable column means the data is wrong.
fn db_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation => {
            StoreError::Corrupt(format!("sqlite: {e}"))
        }
        rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..) => {
            StoreError::Corrupt(format!("sqlite: {e}"))
        }
        _ => StoreError::Unavailable(format!("sqlite: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::record::sample_record;

    #[test]
    fn the_record_read_is_capped_at_the_cap() {
        assert!(capped_record!("record").contains(&format!("<= {RECORD_CAP} ")));
    }

    /// A record longer than [`RECORD_CAP`] (valid JSON, padded: only its size is wrong) is
    /// unreadable like one that does not decode, everywhere it is read, and still deletable.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_oversized_record_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let (store, hash, id) = store_with_key(&path).await;
        let db = Connection::open(&path).unwrap();
        db.execute(
            "UPDATE keys SET record = record || ?1 WHERE id = ?2",
            params![" ".repeat(RECORD_CAP), id],
        )
        .unwrap();
        let now = Utc::now();
        let unreadable = |r: Result<_, StoreError>| matches!(r, Err(StoreError::Corrupt(_)));
        assert!(unreadable(store.find_by_hash(&hash, now).await.map(drop)));
        assert!(unreadable(store.get(&id).await.map(drop)));
        let page = Page {
            page: 1,
            per_page: 10,
        };
        let (listed, _) = store.list(&KeyFilter::default(), page).await.unwrap();
        assert!(listed.is_empty());
        store.delete(&id).await.unwrap();
        assert_eq!(store.find_by_hash(&hash, now).await.unwrap(), None);
    }

    /// Another process's write transaction (a CLI write, a `sqlite3` shell, a backup) on the
    /// file at `path`, committed after `hold`.
    fn hold_write_lock(path: &Path, hold: Duration) -> std::thread::JoinHandle<()> {
        let other = Connection::open(path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(hold);
            other.execute_batch("COMMIT").unwrap();
        })
    }

    /// What this process writes reaches its own change feeds at once, not at the next poll
    /// (here an hour away): a key disabled through the admin API was served for up to 200 ms
    /// more by the same process (the docs' walk-through said "at once").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn this_process_writes_reach_its_feeds_without_a_poll() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("k.db"))
            .unwrap()
            .with_poll_every(Duration::from_secs(3600));
        let mut feed = store.changes().await.unwrap();
        // The interval's first tick is at once: let that poll pass.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let hash = KeyHash::of("kg_seen_at_once");
        store
            .create(&sample_record("apk_at_once"), &hash, None)
            .await
            .unwrap();
        let change = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("no change within 10 s: the feed waited for its next poll");
        match change {
            Some(Change::Keys(hashes)) => assert_eq!(hashes, vec![hash]),
            other => panic!("{other:?}"),
        }
    }

    async fn store_with_key(path: &Path) -> (Arc<EmbeddedStore>, KeyHash, String) {
        let store = Arc::new(EmbeddedStore::open(path).unwrap());
        let hash = KeyHash::of("kg_reads_do_not_wait");
        let record = sample_record("apk_reads");
        store.create(&record, &hash, None).await.unwrap();
        (store, hash, record.api_key_id)
    }

    /// Review: a usage flush (or an admin write) waiting for another process's write lock held
    /// the store's only connection for up to the 5 s busy timeout, and every lookup, change
    /// poll and readiness ping queued behind it (an uncached key took 3.5 s, `/readyz` 503).
    /// Reads have a connection of their own now: in WAL mode they need no lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_do_not_wait_behind_a_write_that_waits_for_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let (store, hash, id) = store_with_key(&path).await;
        let mut feed = store.changes().await.unwrap();
        let hold = Duration::from_secs(3);
        let held = hold_write_lock(&path, hold);
        let locked_at = Instant::now();
        // Both kinds of gateway write, waiting for the lock on the write connection: a usage
        // flush, then an admin write (which waits out the whole hold).
        let flush = tokio::spawn({
            let (store, id) = (store.clone(), id.clone());
            async move {
                let delta = UsageDelta {
                    api_key_id: id,
                    requests: 1,
                    last_used: Utc::now(),
                };
                store.record_usage(&[delta]).await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let create = tokio::spawn({
            let store = store.clone();
            async move {
                let record = sample_record("apk_second");
                store.create(&record, &KeyHash::of("kg_second"), None).await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut slowest = Duration::ZERO;
        for _ in 0..5 {
            let started = Instant::now();
            let found = store.find_by_hash(&hash, Utc::now()).await.unwrap();
            assert_eq!(found.map(|r| r.api_key_id), Some(id.clone()));
            store.ping().await.unwrap();
            assert!(store.get(&id).await.unwrap().is_some());
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Generous for a loaded machine; the first read took ~3 s before (until the hold
        // ended). All of them ran while the lock was held.
        assert!(
            slowest < Duration::from_secs(1),
            "a read took {slowest:?} while a write waited for the lock"
        );
        assert!(locked_at.elapsed() < hold, "the reads outlasted the hold");
        held.join().unwrap();
        // The admin write got the lock once it was free; the change poller (on the read
        // connection too) reports it.
        create.await.unwrap().unwrap();
        let change = tokio::time::timeout(Duration::from_secs(5), feed.recv()).await;
        assert_eq!(
            change.unwrap(),
            Some(Change::Keys(vec![KeyHash::of("kg_second")]))
        );
        // The flush gave up after its own, shorter busy timeout (see the next test).
        assert!(matches!(
            flush.await.unwrap(),
            Err(StoreError::Unavailable(_))
        ));
    }

    /// A usage flush gives up on a held write lock after [`USAGE_BUSY_TIMEOUT`] rather than the
    /// full busy timeout (admin writes would wait behind it meanwhile); its counts are kept for
    /// the next flush by the recorder. Once the lock is free it goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_usage_flush_gives_up_on_a_held_write_lock_sooner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let (store, _hash, id) = store_with_key(&path).await;
        let delta = UsageDelta {
            api_key_id: id.clone(),
            requests: 3,
            last_used: Utc::now(),
        };
        let held = hold_write_lock(&path, Duration::from_secs(3));
        let started = Instant::now();
        let failed = store.record_usage(std::slice::from_ref(&delta)).await;
        let waited = started.elapsed();
        assert!(
            matches!(failed, Err(StoreError::Unavailable(_))),
            "{failed:?}"
        );
        assert!(
            waited >= USAGE_BUSY_TIMEOUT - Duration::from_millis(100) && waited < BUSY_TIMEOUT,
            "gave up after {waited:?}"
        );
        held.join().unwrap();
        // The connection's own busy timeout is back for the other writes.
        let busy_ms: i64 = store
            .write(|conn| {
                conn.query_row("PRAGMA busy_timeout", [], |r| r.get(0))
                    .map_err(db_err)
            })
            .await
            .unwrap();
        assert_eq!(u128::try_from(busy_ms).unwrap(), BUSY_TIMEOUT.as_millis());
        store.record_usage(&[delta]).await.unwrap();
        assert_eq!(store.usage(&[id]).await.unwrap()[0].request_count, 3);
    }

    /// The read connection never writes, and sees every write as soon as it is committed.
    #[tokio::test]
    async fn the_read_connection_sees_each_write_at_once_and_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let (store, hash, id) = store_with_key(&dir.path().join("k.db")).await;
        assert!(
            store
                .find_by_hash(&hash, Utc::now())
                .await
                .unwrap()
                .is_some()
        );
        store.delete(&id).await.unwrap();
        assert!(
            store
                .find_by_hash(&hash, Utc::now())
                .await
                .unwrap()
                .is_none()
        );
        let wrote = store
            .read(|conn| {
                conn.execute("DELETE FROM changes", [])
                    .map(drop)
                    .map_err(db_err)
            })
            .await;
        assert!(wrote.is_err(), "the read connection wrote");
    }

    /// A usage row with values that are not integers (a foreign writer's; SQLite's INTEGER
    /// column keeps text as text) fails no flush, and the other keys of the batch are counted
    /// once. Its count and time are overwritten with the flush's, as on Redis, so that reading
    /// the key's usage works again (the time was kept as text before: `max` ranks text above
    /// every integer), and a count at the limit of an integer stays there rather than turning
    /// into a float.
    #[tokio::test]
    async fn an_unreadable_usage_row_is_overwritten_and_blocks_no_other_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("k.db")).unwrap();
        let mut ids = Vec::new();
        for (i, name) in ["apk_usage_a", "apk_usage_b", "apk_usage_c", "apk_usage_d"]
            .into_iter()
            .enumerate()
        {
            let record = sample_record(name);
            let hash = KeyHash::of(&format!("kg_usage_{i}"));
            store.create(&record, &hash, None).await.unwrap();
            ids.push(record.api_key_id);
        }
        let poison = |id: &str, count: &str, last_ms: &str| {
            let sql = format!(
                "INSERT INTO usage (key_id, count, last_ms) VALUES ('{id}', {count}, {last_ms})"
            );
            store.write(move |conn| conn.execute(&sql, []).map(drop).map_err(db_err))
        };
        poison(&ids[1], "'notanumber'", "'soon'").await.unwrap();
        poison(&ids[2], "1.5", "2.5").await.unwrap();
        poison(&ids[3], &i64::MAX.to_string(), "0").await.unwrap();
        let now = Utc::now();
        let batch: Vec<UsageDelta> = ids
            .iter()
            .map(|id| UsageDelta {
                api_key_id: id.clone(),
                requests: 3,
                last_used: now,
            })
            .collect();
        store.record_usage(&batch).await.unwrap();
        store.record_usage(&batch).await.unwrap();
        let usage = store.usage(&ids).await.unwrap();
        assert_eq!(
            usage.iter().map(|u| u.request_count).collect::<Vec<_>>(),
            [6, 6, 6, u64::try_from(i64::MAX).unwrap()],
            "{usage:?}"
        );
        assert!(
            usage
                .iter()
                .all(|u| u.last_used_time.map(|t| t.timestamp_millis())
                    == Some(now.timestamp_millis())),
            "{usage:?}"
        );
    }

    /// Review: the Redis store refused a record whose team, user, id or scopes cannot be sent
    /// as a header, the embedded store passed it and the upstream got no `X-Keygate-Team-Id`.
    /// Both decode the verifier's copy the same way now.
    #[tokio::test]
    async fn a_record_whose_identity_cannot_be_a_header_does_not_authenticate() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("k.db")).unwrap();
        let mut record = sample_record("apk_identity");
        record.team_id = Some("acme".into());
        let hash = KeyHash::of("kg_identity");
        store.create(&record, &hash, None).await.unwrap();
        let now = Utc::now();
        assert!(
            store
                .find_verified_by_hash(&hash, now)
                .await
                .unwrap()
                .is_some()
        );

        let sql = "UPDATE keys SET record = json_set(record, '$.team_id', 'acme' || char(13, 10))";
        store
            .write(move |conn| conn.execute(sql, []).map(drop).map_err(db_err))
            .await
            .unwrap();
        let err = store.find_verified_by_hash(&hash, now).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt(m) if m.contains("cannot be sent as a header")),
            "{err:?}"
        );
    }
}
