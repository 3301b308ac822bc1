//! [`RedisStore`]: the production [`KeyStore`], shared by every gateway replica, on one Redis
//! server ([`RedisStore::connect`]) or on Redis Cluster ([`RedisStore::connect_cluster`]).
//!
//! Layout (`{ns}` is the configured namespace; `{<tag>}` is a Redis hash tag holding the key's
//! [`SlotTag`], which the presented key, its [`KeyHash`] and its id all carry, so on a cluster
//! every entry of one key, and for team keys every entry of the team, lands in one hash slot):
//! - `{ns}:h:{<tag>}:<sha256 hex>` → `{"valid_until": <ms>|null, "record": {...}}`. The hot path
//!   is one `GETRANGE` of this key, capped at [`RECORD_CAP`] (a longer value is unreadable and
//!   never fetched whole). Hashes rotated out with a grace period carry a `PX` expiry so
//!   Redis drops them by itself, and their `valid_until` so that [`KeyStore::find_by_hash`]
//!   refuses them at `now` even before Redis has expired them (and, before that, answers with
//!   `expires_time` clipped to it, so cached copies stop at the end of the grace too).
//! - `{ns}:k:{<tag>}:<id>` → `{"record": {...}, "hashes": [{"hash": <KeyHash hex>,
//!   "valid_until": ...}]}`: the authoritative copy, by id.
//! - `{ns}:team:{<tag>}:<team>` → SET of the ids of that team, for the atomic team limit; `<tag>`
//!   is the team's ([`SlotTag::for_team`]), which is also the tag of every key created in it.
//!   Keys without a team belong to no set and are never limited (same rule as the embedded
//!   store).
//! - `{ns}:members:{<tag>}:<team>` → HASH user id → [`Member`] JSON, the team's members. Not the
//!   team's SET of key ids. Emptied, Redis drops it.
//! - `{ns}:usage:{<tag>}:<id>` → HASH `count`, `last_ms`: usage summed over every gateway.
//! - `{ns}:all` → ZSET of every id scored by `created_time` in milliseconds (listing order).
//! - `{ns}:audit` → STREAM of audit events, one entry per event with a single field `event`
//!   holding the [`AuditEvent`] JSON (its `event_id` left empty: the entry id is the event id).
//!   Capped by `XADD … MAXLEN ~ AUDIT_CAP`: Redis trims whole stream nodes, so it may hold a few
//!   more than the cap, never fewer while that many were appended; listing scans it newest first
//!   with `XREVRANGE` in chunks and filters the decoded events here.
//! - channel `{ns}:changes` ← the [`KeyHash`] hex of the hashes touched by each write,
//!   space-separated; `*` means "drop everything". A cluster broadcasts PUBLISH to every node,
//!   so the change feed subscribes on whichever configured node answers first.
//!
//! One slot per write: a Lua script (like MULTI/EXEC) may only touch keys of one slot on a
//! cluster. Each write's script covers the key's own entries (and its team's SET); `{ns}:all`
//! and `{ns}:audit`, in slots of their own, are written by separate commands. Consequence: a
//! crash between the two can leave the listing index out of step with the keys. The order is
//! chosen so that this can only leave an id *without* a record (create adds to the index before
//! its script, delete removes from it after its script), which [`KeyStore::list`] skips; the
//! unfiltered total (`ZCARD`) counts it until an unfiltered listing comes across it, which
//! drops it once it is old enough not to be a create in progress
//! ([`RedisStore::drop_dangling`]). The other order could leave a working key that
//! no listing shows. Likewise, a key moved to another team by `update` stays in its creation
//! slot, so its new team's SET is updated by a separate command after the script (joining
//! first, then leaving: a crash leaves it listed in both teams, and listing filters on the
//! record's team). Commands that span slots otherwise: listing, which reads each id record by
//! a capped `GETRANGE` of its own (the cluster client routes each), and usage, sent as one
//! command per key rather than a pipeline.
//!
//! A key whose id record cannot be read (it does not decode, or is longer than [`RECORD_CAP`])
//! cannot say which hash entries are its own, while they may hold an intact copy that keeps
//! authenticating it. An unconditional delete finds them by the key's slot tag instead (a
//! `SCAN` on the node owning the slot): see [`RedisStore::purge`] for how and at what cost.
//!
//! Writes run as Lua scripts, which Redis executes atomically (like MULTI/EXEC, all or nothing
//! as far as other clients can see), because each write needs a check before it writes:
//! - create checks the team limit and the id together with the writes, so 20 concurrent creates
//!   against a limit of 5 leave exactly 5, and a failure half-way can never leave a reserved team
//!   slot without its key (which a limit script followed by a separate MULTI/EXEC could).
//! - update, rotate and delete read `{ns}:k:{id}`, compute the new state here, and apply it with a
//!   compare-and-set script that first checks the id key still holds what was read (and retries
//!   if not). `WATCH` cannot be used: the [`ConnectionManager`] multiplexes every task over one
//!   connection, and WATCH state belongs to the connection. Last-writer-wins is not acceptable
//!   either: two racing rotations would leave a valid hash that the key no longer lists (and
//!   that delete would miss), and an update racing a rotate could revive a rotated-out hash.
//!
//! Member writes are compare-and-set too (a script that checks the member's hash field still
//! holds what was read), so that a role change never loses the original `added_time` to a racing
//! first put, and a removal returns exactly what it removed.
//!
//! Every key a script touches is passed in `KEYS` (none is built inside Lua), so the cluster
//! client routes each script to the node owning its slot. The store checks on a single server
//! too that a create's or rotation's hash is in its id's slot and a team key in its team's, so a
//! caller breaking the rule fails in tests rather than first on a cluster.

use super::{
    AUDIT_CAP, AuditEvent, AuditFilter, Change, ChangeFeed, KeyFilter, KeyStore, Member, Page,
    RECORD_CAP, StoreError, Usage, UsageDelta,
};
use crate::auth::key::{DIGEST_HEX_LEN, KeyHash, SlotTag, TAG_LEN};
use crate::auth::record::KeyRecord;
use crate::auth::verified::VerifiedKey;
use crate::log_every::LogEvery;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError,
    RedisFuture, Script, Value,
};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use thread_local::ThreadLocal;
use tokio::sync::{Notify, mpsc};

/// How many times a compare-and-set write is tried when other writers change the same key in
/// between. Each lost round is another writer's win, so N concurrent writers on one key all
/// finish within N tries; more than this means something is hammering one key.
const CAS_ATTEMPTS: usize = 16;
/// Values read at once while listing, or while finding an unreadable key's hash entries (one
/// `GETRANGE` each, pipelined): at most this many times [`RECORD_CAP`] in memory at once.
const READS_IN_FLIGHT: usize = 64;
/// Names asked for per `SCAN` call when a key's entries are found by their slot tag (see
/// [`RedisStore::purge`]).
const SCAN_COUNT: usize = 1000;
const FEED_CAPACITY: usize = 256;
/// Stream entries read per `XREVRANGE` while listing the audit log: a full scan of a capped log
/// is about a hundred round trips, none of them a huge reply.
const AUDIT_CHUNK: usize = 1000;
/// The stream field that holds an audit event's JSON.
const AUDIT_FIELD: &str = "event";
/// A pub/sub connection whose peer vanished without a FIN (or a proxy in front of Redis that
/// stopped relaying) stays silent for ever, and a change published meanwhile reaches no cache
/// while its entries stay fresh. The feed pings its connection this often, and also at once
/// when any other operation of the store goes unanswered; a ping unanswered within
/// [`pubsub_ping_timeout`] ends the feed, which marks every cached entry stale (the verifier
/// asks the store for every key until it has resubscribed). So a silently dead feed is noticed
/// within this plus that, 1 s at most. (It was 15 s, and a disabled key passed for as long.)
const PUBSUB_PING_EVERY: Duration = Duration::from_millis(500);
/// The most a feed ping may wait for its answer.
const PUBSUB_PING_TIMEOUT_MAX: Duration = Duration::from_millis(500);

/// How long a feed ping waits for its answer: the operation timeout, at most
/// [`PUBSUB_PING_TIMEOUT_MAX`].
fn pubsub_ping_timeout(op_timeout: Duration) -> Duration {
    op_timeout.min(PUBSUB_PING_TIMEOUT_MAX)
}

/// Before its first write, every write script asks Redis whether this user may run each
/// command it is about to run, on the names it will run it on (`redis.acl_check_cmd`, Redis
/// 7.0+), and stops with nothing written if one is refused: Redis checks the ACL on each
/// `redis.call` and never rolls a script back, so a command refused partway (an ACL changed
/// while keygate runs: the start-up check passed) left half-written state (review: a rotation
/// rewrote the id record but kept the old hash entry valid for good, a delete left the id in its
/// team's SET). The refusal is a `NOPERM` reply starting with [`PROBE_REFUSED`], which tells it
/// apart from a command refused partway (on Redis 6, which has no `acl_check_cmd`: the probe is
/// skipped there). `checks` is a list of `{command, name, args...}`.
macro_rules! acl_probe_lua {
    () => {
        r"
local function refused(checks)
  if not redis.acl_check_cmd then return nil end
  for _, c in ipairs(checks) do
    if not redis.acl_check_cmd(unpack(c)) then
      return redis.error_reply('NOPERM keygate-probe: this user may not run ' .. c[1] .. ' on ' .. tostring(c[2]) .. '; nothing was written')
    end
  end
  return nil
end
"
    };
}

/// How a write script's own ACL probe (see [`acl_probe_lua`]) starts its refusal, after `NOPERM`:
/// such a script wrote nothing.
const PROBE_REFUSED: &str = "keygate-probe:";

/// Create: KEYS = id key, hash key, [team key], all in the key's slot; ARGV = id JSON, hash
/// JSON, id, limit ('' for none), channel, message. Returns 'ok', 'exists' or 'limit'.
///
/// The change is published before anything is written: Redis does not roll a script back, and
/// a user who may not PUBLISH (an ACL without `@pubsub`) had the key written, then the script
/// failed, the caller told to retry a create that had happened (review). Published first, such
/// a failure writes nothing; and no subscriber reads the message before the script has ended.
/// Every command is probed first (see [`acl_probe_lua`]). Should the script still stop partway
/// (Redis 6 has no probe), the order leaves nothing that works and cannot be found: the id
/// record first (what a delete finds every other entry by), then the team SET, and the hash
/// entry, the one that authenticates, last. A partial create is so a key record that does not
/// work, which a DELETE removes.
const CREATE_LUA: &str = concat!(
    acl_probe_lua!(),
    r"
local checks = {{'EXISTS', KEYS[1]}, {'EXISTS', KEYS[2]}, {'PUBLISH', ARGV[5], ARGV[6]},
  {'SET', KEYS[1], ARGV[1]}, {'SET', KEYS[2], ARGV[2]}}
if KEYS[3] then
  checks[#checks + 1] = {'SCARD', KEYS[3]}
  checks[#checks + 1] = {'SADD', KEYS[3], ARGV[3]}
end
local no = refused(checks)
if no then return no end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 'exists'
end
if KEYS[3] and ARGV[4] ~= '' and redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[4]) then
  return 'limit'
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
redis.call('SET', KEYS[1], ARGV[1])
if KEYS[3] then
  redis.call('SADD', KEYS[3], ARGV[3])
end
redis.call('SET', KEYS[2], ARGV[2])
return 'ok'
"
);

/// Usage, for any number of keys in one call: KEYS = (usage key, id key) per key; ARGV =
/// (requests, last-used ms) per key, in the same order. Adds to each count and keeps the latest
/// time, only while the key exists (a late flush must not resurrect a deleted key's usage).
///
/// One key's unreadable record never fails the call: a script that errors half-way keeps the
/// writes it made before (Redis does not roll a script back), so the flush would be kept and
/// sent again, counting the keys before the bad one once more on every flush and the keys
/// after it never. Each key's fields are read and checked before it is written (HMGET by
/// `redis.pcall`, the one command that can fail on the data: on a name of another type). Then:
/// a `count` that is not an integer is overwritten with this delta, and a `last_ms` that is not
/// an integer with this time (usage is a counter of ours: an unreadable value is repaired
/// rather than kept unreadable for good); a usage name holding another type than a hash, or a
/// count whose sum could pass 9.2e18 (HINCRBY refuses a sum past 2^63 - 1 ≈ 9.22e18; Lua's
/// numbers are doubles, hence the margin), is left as it is and the key skipped. The writes themselves go
/// by `redis.call`: what fails them is the store's state (out of memory, a read-only replica),
/// which Redis reports at a script's first write, before it wrote anything, and which must fail
/// the call so the flush keeps its counts. A key is so counted whole or not written at all.
/// Returns `{repaired, skipped}`: the 1-based positions of those keys in this call, which
/// `record_usage` logs.
const USAGE_LUA: &str = r"
local repaired, skipped = {}, {}
local function is_int(v)
  return v == '0' or string.match(v, '^%-?[1-9]%d*$') ~= nil
end
for i = 1, #KEYS, 2 do
  local n = (i + 1) / 2
  if redis.call('EXISTS', KEYS[i + 1]) == 1 then
    local old = redis.pcall('HMGET', KEYS[i], 'count', 'last_ms')
    if old['err'] then
      skipped[#skipped + 1] = n
    else
      local count, last = old[1], old[2]
      local fixed, skip = false, false
      if count and not is_int(count) then
        fixed = true
      elseif count and math.abs(tonumber(count)) > 9.2e18 - tonumber(ARGV[i]) then
        skip = true
        skipped[#skipped + 1] = n
      end
      if not skip then
        if fixed then
          redis.call('HSET', KEYS[i], 'count', ARGV[i])
        else
          redis.call('HINCRBY', KEYS[i], 'count', ARGV[i])
        end
        if last and not is_int(last) then
          redis.call('HSET', KEYS[i], 'last_ms', ARGV[i + 1])
          fixed = true
        elseif tonumber(ARGV[i + 1]) > tonumber(last or '0') then
          redis.call('HSET', KEYS[i], 'last_ms', ARGV[i + 1])
        end
        if fixed then repaired[#repaired + 1] = n end
      end
    end
  end
end
return {repaired, skipped}
";

/// Keys per usage script call. One call per key cost ~10 600 instructions per key in keygate
/// (callgrind) and one command, script lookup and reply per key in Redis.
const USAGE_KEYS_PER_CALL: usize = 16;
/// What a usage flush keeps in flight at once. Redis runs one script at a time, and what one
/// connection sent in one go, so a key lookup arriving meanwhile waits for all of it: this
/// window is what a flush adds to a cache miss's latency, at ~4 µs of Redis time per key
/// (docs/benchmarks.md, "Usage flushes and the miss path": with 256 keys in flight a miss's
/// p99 was 2.0–2.6 ms at 5 000 req/s; with 16, 0.46–0.57 ms; without usage counting 0.43 ms).
/// A flush of 100 000 keys takes ~0.9 s this way (0.6–0.7 s with 256). Up to this many keys (one
/// call on one server)...
const USAGE_KEYS_IN_FLIGHT: usize = 16;
/// Redis Cluster's hash slots.
const CLUSTER_SLOTS: usize = 16384;
/// How long after its `created_time` a listing index entry without a key record is taken for
/// one left behind (see [`RedisStore::drop_dangling`]) rather than a create in progress, with
/// room for clocks that disagree between replicas.
const DANGLING_AFTER: Duration = Duration::from_secs(300);

/// Slots backed off together when a lookup fails (`KeyStore::failure_domain`): a node owns
/// ranges of consecutive slots, so a group of 16 lies on one node but at a range's edge, and a
/// failed node's thousands of slots cost hundreds of lookups that wait for it, not thousands.
const SLOTS_PER_FAILURE_DOMAIN: usize = 16;

/// The cluster slot of every entry of `tag` (their names carry it as the hash tag `{tag}`):
/// CRC16 (XMODEM) of the tag, as Redis computes it.
fn cluster_slot(tag: SlotTag) -> u16 {
    let slots = u16::try_from(CLUSTER_SLOTS).unwrap_or(u16::MAX);
    crc16::State::<crc16::XMODEM>::calculate(tag.as_str().as_bytes()) % slots
}

/// ...and up to this many calls (on a cluster, keys without a team have slots of their own, so
/// most calls there carry one key, and the window's round trips overlap).
const USAGE_CALLS_IN_FLIGHT: usize = 16;

/// Compare-and-set: KEYS[1] is the id key and must still hold ARGV[1]; ARGV[2] is the channel,
/// ARGV[3] the message; then one (op, a, b) triple per key after the first, in KEYS order (the
/// id key may come again among them, to be written where its place in the order says). Ops are
/// validated, and every command probed (see [`acl_probe_lua`]), and the change published
/// before anything is written, because a Lua error half-way would not roll back (see
/// `CREATE_LUA`: a user who may not PUBLISH had disables written and answered 503, and other
/// gateways kept the key cached as enabled). The writes run in KEYS order, which the caller
/// chooses so that a script stopped partway anyway leaves more revoked, never less (see
/// `RedisStore::state_writes`).
/// Returns 1 when applied, 0 when the id key changed meanwhile.
const APPLY_LUA: &str = concat!(
    acl_probe_lua!(),
    r"
local known = {set='SET', del='DEL', sadd='SADD', srem='SREM'}
local checks = {{'GET', KEYS[1]}, {'PUBLISH', ARGV[2], ARGV[3]}}
for i = 2, #KEYS do
  local j = 4 + 3 * (i - 2)
  local cmd = known[ARGV[j]]
  if not cmd then return redis.error_reply('keygate: bad op') end
  if cmd == 'SADD' or cmd == 'SREM' or cmd == 'SET' then
    checks[#checks + 1] = {cmd, KEYS[i], ARGV[j + 1]}
  else
    checks[#checks + 1] = {cmd, KEYS[i]}
  end
end
local no = refused(checks)
if no then return no end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PUBLISH', ARGV[2], ARGV[3])
for i = 2, #KEYS do
  local key = KEYS[i]
  local j = 4 + 3 * (i - 2)
  local op, a, b = ARGV[j], ARGV[j + 1], ARGV[j + 2]
  if op == 'set' then
    if b == '0' then redis.call('SET', key, a) else redis.call('SET', key, a, 'PX', b) end
  elseif op == 'del' then redis.call('DEL', key)
  elseif op == 'sadd' then redis.call('SADD', key, a)
  elseif op == 'srem' then redis.call('SREM', key, a)
  end
end
return 1
"
);

/// Member compare-and-set: KEYS[1] is the team's member hash; ARGV = user id, the JSON its
/// field must still hold ('' when absent), the new JSON ('' to remove the member).
/// Returns 1 when applied, 0 when the field changed meanwhile.
const MEMBER_LUA: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
";

/// A key's id record, read through [`RECORD_CAP`]: KEYS[1] is the id key; ARGV[1] the cap.
/// Returns nil when there is none, else at most cap + 1 bytes of it. A script, not a bare
/// `GETRANGE` (which answers `""` for a missing name): an id record emptied by hand must read as
/// unreadable, not as no key, or the key could not be deleted while its hash entries work.
const READ_ID_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('GETRANGE', KEYS[1], 0, ARGV[1])
";

/// What the purge of an unreadable key compares, in Lua: the SHA-1 of the id record (however
/// large, as it is never sent to keygate), `type:<type>` for a name of another type, `false`
/// for none.
macro_rules! digest_lua {
    () => {
        r"
local function digest(key)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' then return false end
  if t ~= 'string' then return 'type:' .. t end
  return redis.sha1hex(redis.call('GET', key))
end
"
    };
}

/// The digest (see [`digest_lua`]) of KEYS[1].
const DIGEST_LUA: &str = concat!(digest_lua!(), "return digest(KEYS[1])\n");

/// Purge of a key whose id record cannot be read (see [`RedisStore::purge`]): KEYS[1] is the id
/// key, which must still have the digest ARGV[1]; ARGV[2] is the channel, ARGV[3] the message,
/// ARGV[4] the key id, ARGV[5] how many KEYS after the first to delete (its hash entries and
/// usage); the KEYS after those are team sets to remove the id from. All in the id's slot.
/// Returns 1 when applied, 0 when the id key is gone, -1 when it changed meanwhile. Probed and
/// published first, like every write (see [`CREATE_LUA`]); the id record is deleted last, so
/// that a purge stopped partway leaves it to find the rest by.
const PURGE_LUA: &str = concat!(
    acl_probe_lua!(),
    digest_lua!(),
    r"
local dels = tonumber(ARGV[5])
local checks = {{'TYPE', KEYS[1]}, {'GET', KEYS[1]}, {'PUBLISH', ARGV[2], ARGV[3]}}
for i = 1, 1 + dels do checks[#checks + 1] = {'DEL', KEYS[i]} end
for i = 2 + dels, #KEYS do checks[#checks + 1] = {'SREM', KEYS[i], ARGV[4]} end
local no = refused(checks)
if no then return no end
local d = digest(KEYS[1])
if not d then return 0 end
if d ~= ARGV[1] then return -1 end
redis.call('PUBLISH', ARGV[2], ARGV[3])
for i = 2, 1 + dels do redis.call('DEL', KEYS[i]) end
for i = 2 + dels, #KEYS do redis.call('SREM', KEYS[i], ARGV[4]) end
redis.call('DEL', KEYS[1])
return 1
"
);

/// What [`RedisStore::purge`] found with a key's slot tag: its hash entries (the name, and the
/// hash to announce where the name holds a valid one), and the team SETs of that tag.
struct TagEntries {
    hashes: Vec<(String, Option<String>)>,
    teams: Vec<String>,
}

/// Value of `{ns}:h:{hash}`.
#[derive(Serialize, Deserialize)]
struct HashEntry<R> {
    valid_until: Option<i64>,
    record: R,
}

/// Value of `{ns}:k:{id}`.
#[derive(Serialize, Deserialize)]
struct IdEntry<R, H> {
    record: R,
    hashes: H,
}

#[derive(Serialize, Deserialize)]
struct HashRef {
    hash: String,
    valid_until: Option<i64>,
}

type StoredId = IdEntry<KeyRecord, Vec<HashRef>>;

/// One write of the compare-and-set script.
enum Op {
    /// `SET`, with `PX` when given (at least 1 ms).
    Set(String, Option<i64>),
    Del,
    SAdd(String),
    SRem(String),
}

/// The keys and ops of one compare-and-set, all in the id's slot, run in this order; `id_key`
/// is the name compared (and written, if at all, by an op of its own, where the order puts it).
/// `after`: commands on keys of other slots (the listing index, the set of a team the key
/// moved to or from), sent one by one once the script has applied: see the module doc for what
/// a crash in between leaves and why that is tolerated.
struct Writes {
    id_key: String,
    /// What the id key holds once the script has applied (`None`: it is deleted), by which
    /// a write whose answer was lost is read back (see [`RedisStore::settle`]).
    id_after: Option<String>,
    keys: Vec<String>,
    ops: Vec<String>,
    after: Vec<Cmd>,
}

impl Writes {
    fn new(id_key: String) -> Self {
        Self {
            id_key,
            id_after: None,
            keys: Vec::new(),
            ops: Vec::new(),
            after: Vec::new(),
        }
    }

    fn push(&mut self, key: String, op: Op) {
        if key == self.id_key {
            self.id_after = match &op {
                Op::Set(v, _) => Some(v.clone()),
                _ => None,
            };
        }
        let (name, a, b) = match op {
            Op::Set(v, px) => ("set", v, px.map_or(0, |p| p.max(1)).to_string()),
            Op::Del => ("del", String::new(), String::new()),
            Op::SAdd(m) => ("sadd", m, String::new()),
            Op::SRem(m) => ("srem", m, String::new()),
        };
        self.keys.push(key);
        self.ops.extend([name.to_owned(), a, b]);
    }
}

/// Key names for one namespace. Every name that a single write changes together with others
/// carries the key's [`SlotTag`] in braces, so that on Redis Cluster it lands in the key's slot.
struct Names {
    ns: String,
}

impl Names {
    /// `{ns}:h:{tag}:{digest hex}`. Built by hand, not with `format!`: it is made on every
    /// cache miss (and for every unknown key of a flood), where formatting cost ~3 000
    /// instructions (callgrind, `instructions.sh` with `MISS`).
    fn hash(&self, hash: &KeyHash) -> String {
        let tag = hash.tag();
        let mut name = String::with_capacity(self.ns.len() + 5 + TAG_LEN + 2 + DIGEST_HEX_LEN);
        name.push_str(&self.ns);
        name.push_str(":h:{");
        name.push_str(tag.as_str());
        name.push_str("}:");
        hash.push_digest_hex(&mut name);
        name
    }
    /// A stored hash reference (`KeyHash::to_hex`) back to its entry's name.
    fn hash_hex(&self, hex: &str) -> Result<String, StoreError> {
        let hash = KeyHash::from_hex(hex)
            .ok_or_else(|| StoreError::Corrupt(format!("bad stored key hash {hex:?}")))?;
        Ok(self.hash(&hash))
    }
    fn id(&self, tag: SlotTag, id: &str) -> String {
        self.tagged("k", tag, id)
    }
    /// The team's SET of key ids, in the team's slot (where all its keys are created).
    fn team(&self, team: &str) -> String {
        format!("{}:team:{{{}}}:{team}", self.ns, SlotTag::for_team(team))
    }
    fn all(&self) -> String {
        format!("{}:all", self.ns)
    }
    fn members(&self, team: &str) -> String {
        format!("{}:members:{{{}}}:{team}", self.ns, SlotTag::for_team(team))
    }
    fn audit(&self) -> String {
        format!("{}:audit", self.ns)
    }
    /// Same slot as the id key, so the usage script may check the key still exists.
    fn usage(&self, tag: SlotTag, id: &str) -> String {
        self.tagged("usage", tag, id)
    }
    /// `{ns}:{kind}:{tag}:{id}`, built by hand like [`Self::hash`]: a usage flush makes two
    /// per key.
    fn tagged(&self, kind: &str, tag: SlotTag, id: &str) -> String {
        let mut name =
            String::with_capacity(self.ns.len() + 1 + kind.len() + 2 + TAG_LEN + 2 + id.len());
        name.push_str(&self.ns);
        name.push(':');
        name.push_str(kind);
        name.push_str(":{");
        name.push_str(tag.as_str());
        name.push_str("}:");
        name.push_str(id);
        name
    }
    fn channel(&self) -> String {
        format!("{}:changes", self.ns)
    }
}

/// The slot tag of a key id; `None` for a string that cannot be one of our ids (then nothing
/// can be stored under it).
fn id_tag(id: &str) -> Option<SlotTag> {
    SlotTag::of_key_id(id)
}

/// One connection handle for every deployment: [`ConnectionManager`] (one server; reconnects by
/// itself) or [`ClusterConnection`] (Redis Cluster; follows MOVED/ASK, routes each command by its key's slot).
/// Both are cheap clones over one multiplexed connection (per node), so the store clones one per
/// call. Scripts and commands run unchanged on either: every multi-key command and script touches
/// a single slot.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Connections of their own for the key lookups on the request path, one per thread that
/// looks up, each made (lazily, like the shared one) on that thread's runtime, so its driver
/// and its reconnections run there too. On the one shared connection a lookup from a proxy
/// thread was a message to the thread driving it and one back: two cross-thread wake-ups per
/// cache miss (docs/architecture.md, "Threads", has the counts).
///
/// A lookup left unanswered for the operation timeout replaces its thread's connection: redis-rs
/// reconnects only after an error, and a connection whose peer or route hangs (a stuck proxy or
/// load balancer in front of Redis, a dead route the kernel keeps retransmitting into) gives
/// none for many minutes, so without this every uncached key got 503 for as long, with Redis
/// answering new connections all along.
struct LookupConns {
    client: Client,
    /// Without a response timeout of its own: `RedisStore::lookup` bounds the whole lookup and
    /// must see the timeout to replace the connection.
    config: ConnectionManagerConfig,
    conns: ThreadLocal<RefCell<Made<ConnectionManager>>>,
}

impl LookupConns {
    fn fresh(&self) -> Result<RefCell<Made<ConnectionManager>>, RedisError> {
        ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
            .map(|conn| RefCell::new(Made::now(conn)))
    }
}

/// Why connecting to one Redis fails, when it fails for a reason other than silence. The
/// connection manager retries a refused login (or connection) for seconds, with back-off, so an
/// operation sees only its own timeout: a wrong password read "redis did not answer within
/// 500ms" on every lookup, each waiting the whole timeout. After an operation times out, one
/// direct connection attempt (no retries) finds the cause; a refused login then fails every
/// operation at once, naming it, and is looked at again at most once per [`RECHECK`] until a
/// login succeeds.
struct ConnectDoctor {
    client: Client,
    timeout: Duration,
    examining: AtomicBool,
    /// `found` holds a refused login: read without the lock by every operation.
    refusing: AtomicBool,
    found: Mutex<Option<Finding>>,
}

struct Finding {
    at: Instant,
    /// A refused login, which no retry fixes: fail fast. Anything else (refused connection,
    /// unknown host) is only named, as outages come and go.
    login_refused: bool,
    cause: String,
}

/// How long a refused login fails operations at once before it is checked again.
const RECHECK: Duration = Duration::from_secs(1);
/// How long a finding names the cause of later timeouts: each timeout examines again, so an
/// older one is from an earlier trouble.
const CAUSE_KEPT: Duration = Duration::from_secs(10);

impl ConnectDoctor {
    fn new(client: Client, timeout: Duration) -> Self {
        Self {
            client,
            timeout,
            examining: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            found: Mutex::new(None),
        }
    }

    fn found(&self) -> std::sync::MutexGuard<'_, Option<Finding>> {
        self.found.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The refused login to fail an operation with, if one is known; a stale one is checked
    /// again in the background meanwhile.
    fn refused_login(self: &Arc<Self>) -> Option<StoreError> {
        if !self.refusing.load(Ordering::Acquire) {
            return None;
        }
        let (cause, stale) = {
            let found = self.found();
            let f = found.as_ref().filter(|f| f.login_refused)?;
            (f.cause.clone(), f.at.elapsed() >= RECHECK)
        };
        if stale {
            self.examine();
        }
        Some(StoreError::Unavailable(format!(
            "redis refused keygate's login: {cause}"
        )))
    }

    /// What a recent examination found.
    fn cause(&self) -> Option<String> {
        let found = self.found();
        let f = found.as_ref().filter(|f| f.at.elapsed() < CAUSE_KEPT)?;
        Some(f.cause.clone())
    }

    /// Tries one connection in the background, unless one is being tried.
    fn examine(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.examining.swap(true, Ordering::AcqRel) {
            return;
        }
        let doctor = self.clone();
        runtime.spawn(async move {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(doctor.timeout))
                .set_response_timeout(Some(doctor.timeout));
            let attempt = tokio::time::timeout(
                doctor.timeout.saturating_mul(2),
                doctor
                    .client
                    .get_multiplexed_async_connection_with_config(&config),
            )
            .await;
            // Connected, or no answer: nothing to name (a hung connection is replaced anyway).
            let finding = match attempt {
                Ok(Err(e)) if !e.is_timeout() => Some(Finding {
                    at: Instant::now(),
                    login_refused: e.kind() == ErrorKind::AuthenticationFailed
                        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM")),
                    cause: e.to_string(),
                }),
                _ => None,
            };
            {
                let mut found = doctor.found();
                let news = finding.as_ref().map(|f| &f.cause) != found.as_ref().map(|f| &f.cause);
                if news && let Some(f) = &finding {
                    tracing::error!(cause = %f.cause, "cannot connect to redis");
                }
                let refusing = finding.as_ref().is_some_and(|f| f.login_refused);
                *found = finding;
                doctor.refusing.store(refusing, Ordering::Release);
            }
            doctor.examining.store(false, Ordering::Release);
        });
    }
}

/// A connection and when it was made: of the operations that time out on one connection at
/// once, the first replaces it and the others find a newer one and leave it.
struct Made<C> {
    conn: C,
    at: Instant,
}

impl<C> Made<C> {
    fn now(conn: C) -> Self {
        Self {
            conn,
            at: Instant::now(),
        }
    }
}

/// The connection for everything but the lookups on one server (see [`LookupConns`]), and for
/// everything on a cluster; replaced when an operation on it goes unanswered for the operation
/// timeout. The cluster client, too, retries a timed-out command on the same node connection
/// and never replaces it. On a cluster the replacement (every node's connection, the slots
/// discovered again) is made in the background and swapped in only once it is up, while the
/// current one goes on serving the nodes that answer: a node that stays hung makes each new
/// connection wait for it, and swapped in at once, every new one would time out in turn for
/// every node's keys.
struct SharedConn {
    current: Arc<RwLock<Made<Conn>>>,
    /// How to make another; `None` only until the constructor sets it.
    remake: Option<Remake>,
    /// A cluster connection is being made (at most one at a time, one a second).
    remaking: Arc<AtomicBool>,
}

/// How long a new cluster connection may take to come up (the seed nodes, the slots, every
/// node's connection), in operation timeouts.
const CLUSTER_REMAKE_TIMEOUTS: u32 = 10;
/// The least time between two cluster connections made in a row.
const CLUSTER_REMAKE_PAUSE: Duration = Duration::from_secs(1);

enum Remake {
    Single(Client, ConnectionManagerConfig),
    Cluster(ClusterClient, ClusterConfig),
}

impl SharedConn {
    fn new(conn: Conn) -> Self {
        Self {
            current: Arc::new(RwLock::new(Made::now(conn))),
            remake: None,
            remaking: Arc::new(AtomicBool::new(false)),
        }
    }

    fn get(&self) -> Conn {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .conn
            .clone()
    }

    fn is_cluster(&self) -> bool {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        matches!(current.conn, Conn::Cluster(_))
    }

    /// Replaces the connection unless it was made after `started` (by another operation that
    /// timed out on the old one).
    fn replace_if_older_than(&self, started: Instant, op_timeout: Duration) {
        match &self.remake {
            None => {}
            Some(Remake::Single(client, config)) => {
                let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
                if current.at > started {
                    return;
                }
                // Lazy: it connects on its first use.
                if let Ok(fresh) =
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                {
                    tracing::warn!(
                        "a Redis operation went unanswered; the shared connection is replaced"
                    );
                    *current = Made::now(Conn::Single(fresh));
                }
            }
            Some(Remake::Cluster(client, config)) => {
                let made_after = self
                    .current
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .at
                    > started;
                if made_after || self.remaking.swap(true, Ordering::AcqRel) {
                    return;
                }
                tracing::warn!(
                    "a Redis Cluster operation went unanswered; making a new cluster connection"
                );
                let (current, remaking) = (self.current.clone(), self.remaking.clone());
                let (client, config) = (client.clone(), config.clone());
                let limit = op_timeout.saturating_mul(CLUSTER_REMAKE_TIMEOUTS);
                tokio::spawn(async move {
                    let made = tokio::time::timeout(
                        limit,
                        client.get_async_connection_with_config(config),
                    )
                    .await;
                    match made {
                        Ok(Ok(conn)) => {
                            *current.write().unwrap_or_else(PoisonError::into_inner) =
                                Made::now(Conn::Cluster(conn));
                            tracing::warn!("the new Redis Cluster connection replaces the old");
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "no new Redis Cluster connection; the old one stays")
                        }
                        Err(_) => tracing::warn!(
                            ?limit,
                            "no new Redis Cluster connection in time; the old one stays"
                        ),
                    }
                    tokio::time::sleep(CLUSTER_REMAKE_PAUSE).await;
                    remaking.store(false, Ordering::Release);
                });
            }
        }
    }
}

pub struct RedisStore {
    /// Where the change feed subscribes, tried in order: the server, or every cluster seed node
    /// (a cluster broadcasts PUBLISH to all its nodes, so any one of them hears every change).
    pubsub: Vec<Client>,
    conn: SharedConn,
    /// One server: lookups on per-thread connections. A cluster connection routes by slot and
    /// keeps its own connections per node; lookups share it.
    lookups: Option<LookupConns>,
    names: Names,
    op_timeout: Duration,
    create_script: Script,
    apply_script: Script,
    member_script: Script,
    usage_script: Script,
    read_id_script: Script,
    digest_script: Script,
    purge_script: Script,
    /// Spaces out the warnings about unreadable usage records (see [`USAGE_LUA`]): a poisoned
    /// record would otherwise be logged on every flush.
    usage_log: LogEvery,
    /// [`AUDIT_CAP`], except in tests (see [`RedisStore::with_audit_cap`]).
    audit_cap: usize,
    /// One server: names why connecting fails (see [`ConnectDoctor`]).
    doctor: Option<Arc<ConnectDoctor>>,
    /// Woken when an operation goes unanswered: the change feeds ping their connections at
    /// once (a network fault that hangs one connection may hang the feed's too).
    feed_check: Arc<Notify>,
}

impl RedisStore {
    /// Prepares a store on one server at `url`. Performs no I/O that can fail: the connection is
    /// made lazily by the [`ConnectionManager`] (and re-made after any loss), so the gateway
    /// starts while Redis is down and answers `Unavailable` until it is back. Fails only on a
    /// malformed URL. `namespace` is used verbatim and must not contain braces (the config
    /// checks that).
    pub async fn connect(
        url: &str,
        namespace: &str,
        op_timeout: Duration,
    ) -> Result<Self, StoreError> {
        // The URL may carry a password; redis-rs's parse errors do not echo the URL.
        let client = Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid redis url: {e}")))?;
        // Reconnection backoff capped at 1 s so that recovery after an outage is quick; each
        // connection attempt bounded like the operations themselves. Answers get twice that,
        // as a backstop only: every operation is bounded by `bounded` or `lookup`, which must
        // see the timeout to replace the connection, and the same deadline here would come
        // first.
        let config = ConnectionManagerConfig::new()
            .set_max_delay(Duration::from_secs(1))
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(Some(op_timeout.saturating_mul(2)));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(unavailable)?;
        let mut store = Self::build(
            vec![client.clone()],
            Conn::Single(conn),
            namespace,
            op_timeout,
        );
        store.conn.remake = Some(Remake::Single(client.clone(), config.clone()));
        store.doctor = Some(Arc::new(ConnectDoctor::new(client.clone(), op_timeout)));
        store.lookups = Some(LookupConns {
            client,
            config: config.set_response_timeout(None),
            conns: ThreadLocal::new(),
        });
        Ok(store)
    }

    /// Prepares a store on the Redis Cluster that `nodes` (seed nodes, `redis://host:port`)
    /// belong to. Like [`RedisStore::connect`], no I/O that can fail: the cluster connection
    /// discovers the slots in the background and on first use, so the gateway starts while the
    /// cluster is down. Fails only on malformed URLs.
    pub async fn connect_cluster(
        nodes: &[String],
        namespace: &str,
        op_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let invalid = |e: RedisError| StoreError::Unavailable(format!("invalid redis url: {e}"));
        let pubsub = nodes
            .iter()
            .map(|url| Client::open(url.as_str()).map_err(invalid))
            .collect::<Result<Vec<_>, _>>()?;
        // Answers get twice the operation timeout, as a backstop only (see `connect`).
        let client = ClusterClient::builder(nodes.iter().map(String::as_str))
            .connection_timeout(op_timeout)
            .response_timeout(op_timeout.saturating_mul(2))
            .build()
            .map_err(invalid)?;
        let config = ClusterConfig::new()
            .set_connection_timeout(op_timeout)
            .set_response_timeout(op_timeout.saturating_mul(2));
        let conn = client.get_pending_async_connection_with_config(config.clone());
        let mut store = Self::build(pubsub, Conn::Cluster(conn), namespace, op_timeout);
        store.conn.remake = Some(Remake::Cluster(client, config));
        Ok(store)
    }

    fn build(pubsub: Vec<Client>, conn: Conn, namespace: &str, op_timeout: Duration) -> Self {
        let store = Self {
            pubsub,
            conn: SharedConn::new(conn),
            lookups: None,
            names: Names {
                ns: namespace.to_owned(),
            },
            op_timeout,
            create_script: Script::new(CREATE_LUA),
            apply_script: Script::new(APPLY_LUA),
            member_script: Script::new(MEMBER_LUA),
            usage_script: Script::new(USAGE_LUA),
            read_id_script: Script::new(READ_ID_LUA),
            digest_script: Script::new(DIGEST_LUA),
            purge_script: Script::new(PURGE_LUA),
            usage_log: LogEvery::default(),
            audit_cap: AUDIT_CAP,
            doctor: None,
            feed_check: Arc::new(Notify::new()),
        };
        // Warm the connection in the background so the first request does not pay for it; a
        // failure here only means Redis is not up yet.
        let mut warm = store.conn.get();
        tokio::spawn(async move {
            let ping = redis::cmd("PING");
            match tokio::time::timeout(op_timeout, ping.query_async::<Value>(&mut warm)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "redis not reachable yet; will retry"),
                Err(_) => tracing::warn!("redis did not answer yet; will retry"),
            }
        });
        store
    }

    /// Keeps about `cap` audit events (at least 1) instead of [`AUDIT_CAP`]. For tests only:
    /// checking the cap would otherwise take a hundred thousand appends.
    #[doc(hidden)]
    #[must_use]
    pub fn with_audit_cap(mut self, cap: usize) -> Self {
        self.audit_cap = cap.max(1);
        self
    }

    /// Runs `fut` within the operation timeout; running out of time means Unavailable, and a
    /// new shared connection (see [`SharedConn`]).
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if let Some(refused) = self.refused_login() {
            return Err(refused);
        }
        let started = Instant::now();
        match tokio::time::timeout(self.op_timeout, fut).await {
            Ok(done) => done,
            Err(_) => {
                self.conn.replace_if_older_than(started, self.op_timeout);
                Err(self.no_answer())
            }
        }
    }

    fn refused_login(&self) -> Option<StoreError> {
        self.doctor.as_ref()?.refused_login()
    }

    /// A timed-out operation's error; it also has the doctor look for a cause.
    fn no_answer(&self) -> StoreError {
        self.feed_check.notify_waiters();
        let cause = self.doctor.as_ref().and_then(|d| {
            d.examine();
            d.cause()
        });
        match cause {
            Some(cause) => StoreError::Unavailable(format!(
                "redis did not answer within {:?}; connecting to it fails: {cause}",
                self.op_timeout
            )),
            None => StoreError::Unavailable(format!(
                "redis did not answer within {:?}",
                self.op_timeout
            )),
        }
    }

    /// The record stored under `hash`, decoded as `R`, with the end of its grace period when the
    /// hash was rotated out; `None` when there is none or its grace has ended at `now`.
    async fn hash_entry<R: for<'de> Deserialize<'de>>(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<(R, Option<i64>)>, StoreError> {
        // As cheap as the `GET` it replaces: one command, one round trip, a reply as long.
        let raw: Vec<u8> = self.lookup(&capped_get(&self.names.hash(hash))).await?;
        // `GETRANGE` answers a missing name with `""`, which no record is: an entry emptied by
        // hand is no key (refused, 401) rather than an unreadable one.
        if raw.is_empty() {
            return Ok(None);
        }
        let raw = within_cap(raw)?;
        let entry: HashEntry<R> = decode(&raw).map_err(|e| match (e, stored_key_id(&raw)) {
            (StoreError::Corrupt(why), Some(id)) => StoreError::Corrupt(format!("key {id}: {why}")),
            (e, _) => e,
        })?;
        // Redis expiry is approximate; the recorded deadline is what counts.
        if entry
            .valid_until
            .is_some_and(|until| now.timestamp_millis() >= until)
        {
            return Ok(None);
        }
        Ok(Some((entry.record, entry.valid_until)))
    }

    /// One command on the shared connection (a cheap handle clone; the manager multiplexes).
    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        cmd.query_async(&mut self.conn.get())
            .await
            .map_err(redis_err)
    }

    /// One read on this thread's own connection (see [`LookupConns`]), or on the shared one,
    /// within the operation timeout.
    async fn lookup<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let Some(l) = &self.lookups else {
            return self.bounded(self.query(cmd)).await;
        };
        if let Some(refused) = self.refused_login() {
            return Err(refused);
        }
        // Making a lazy manager does no I/O and fails only on options we do not set.
        let started = Instant::now();
        let Ok(mut conn) = l
            .conns
            .get_or_try(|| l.fresh())
            .map(|c| c.borrow().conn.clone())
        else {
            return self.bounded(self.query(cmd)).await;
        };
        let answer = tokio::time::timeout(self.op_timeout, async {
            match cmd.query_async(&mut conn).await {
                // redis-rs answers a command on a dropped connection (a Redis restart, an idle
                // timeout: these connections idle while the cache answers) with the error and
                // reconnects behind it. A read is safe to send again, and one failed lookup per
                // thread would start the verifier's 1 s store backoff once per thread in turn:
                // seconds of 503s for uncached keys.
                Err(e) if e.is_unrecoverable_error() => cmd.query_async(&mut conn).await,
                other => other,
            }
        })
        .await;
        match answer {
            Ok(answer) => answer.map_err(redis_err),
            Err(_) => {
                // The thread the task is on now: on a proxy thread (a single-threaded
                // runtime) the one it started on.
                if let Some(slot) = l.conns.get() {
                    let made_before = slot.borrow().at <= started;
                    if made_before && let Ok(fresh) = l.fresh() {
                        tracing::warn!(
                            "a key lookup went unanswered; this thread's Redis connection is replaced"
                        );
                        slot.replace(fresh.into_inner());
                    }
                }
                Err(self.no_answer())
            }
        }
    }

    /// The raw and decoded value of `{ns}:k:{id}`; the raw text is what compare-and-set checks.
    async fn read_id(&self, id: &str) -> Result<Option<(String, StoredId)>, StoreError> {
        let Some(tag) = id_tag(id) else {
            return Ok(None);
        };
        let mut read = self.read_id_script.prepare_invoke();
        read.key(self.names.id(tag, id)).arg(RECORD_CAP);
        let raw: Option<Vec<u8>> = read
            .invoke_async(&mut self.conn.get())
            .await
            .map_err(redis_err)?;
        let Some(raw) = raw else { return Ok(None) };
        let raw = within_cap(raw)?;
        let entry = decode(&raw)?;
        Ok(Some((raw, entry)))
    }

    /// Applies `writes` if the id key still holds `expected`; false if someone got there first.
    /// Within the operation timeout; a write whose answer does not come is read back (see
    /// [`Self::settle`]) rather than reported as failed.
    async fn apply(
        &self,
        expected: &str,
        hashes: &[String],
        writes: Writes,
    ) -> Result<bool, StoreError> {
        if let Some(refused) = self.refused_login() {
            return Err(refused);
        }
        let mut inv = self.apply_script.prepare_invoke();
        inv.key(&writes.id_key);
        for k in &writes.keys {
            inv.key(k);
        }
        inv.arg(expected)
            .arg(self.names.channel())
            .arg(hashes.join(" "));
        for a in &writes.ops {
            inv.arg(a);
        }
        let mut conn = self.conn.get();
        let started = Instant::now();
        let sent = tokio::time::timeout(self.op_timeout, inv.invoke_async::<i64>(&mut conn)).await;
        let applied = match sent {
            Ok(Ok(applied)) => applied == 1,
            // Redis answered, with an error: see `write_err` for what the script left.
            Ok(Err(e)) if e.code().is_some() => return Err(write_err(e)),
            Ok(Err(e)) => {
                let lost = redis_err(e);
                let found = self.settle(&mut conn, &writes, Some(expected)).await;
                self.settled(found, lost).map(|()| true)?
            }
            Err(_) => {
                let lost = self.no_answer();
                let found = self.settle(&mut conn, &writes, Some(expected)).await;
                self.conn.replace_if_older_than(started, self.op_timeout);
                self.settled(found, lost).map(|()| true)?
            }
        };
        if !applied {
            return Ok(false);
        }
        // The key's own state is written; what is left are indexes in other slots. A failure
        // here must not report the write as failed (it happened), so it is logged: the listing
        // tolerates what it leaves (see the module doc).
        for cmd in &writes.after {
            if let Err(e) = self.bounded(self.query::<Value>(cmd)).await {
                tracing::warn!(error = %e, "redis index update after a write failed");
            }
        }
        Ok(true)
    }

    /// Reads back the id key of a write whose answer was lost (review: a rotation applied but
    /// answered 503 lost the new key value, a create applied made a key nobody held, and
    /// neither was audited). On the connection the write went out on, so Redis answers the
    /// read after the write if the write reached it; within the operation timeout.
    /// The read waits up to twice the operation timeout (what the connection allows an answer
    /// anyway): it is answered after the write's own late answer, so a write answered up to
    /// three operation timeouts late is settled. Admin writes only: no lookup waits on it.
    /// `Some(true)`: the id key holds what the write leaves (applied); `Some(false)`: it still
    /// holds `before` (`None`: nothing), so the write did not apply; `None`: unknown (the read
    /// failed too, or another writer changed the key since).
    async fn settle(&self, conn: &mut Conn, writes: &Writes, before: Option<&str>) -> Option<bool> {
        let mut read = self.read_id_script.prepare_invoke();
        read.key(&writes.id_key).arg(RECORD_CAP);
        let bound = self.op_timeout.saturating_mul(2);
        let raw = tokio::time::timeout(bound, read.invoke_async::<Option<Vec<u8>>>(conn))
            .await
            .ok()?
            .ok()?;
        let now = match raw {
            Some(raw) => Some(String::from_utf8(raw).ok()?),
            None => None,
        };
        if now.as_deref() == writes.id_after.as_deref() {
            Some(true)
        } else if now.as_deref() == before {
            Some(false)
        } else {
            None
        }
    }

    /// What [`Self::settle`] found, as the write's outcome: `Ok` when applied, else the error
    /// `lost` that made it read back (not applied), or [`StoreError::Indeterminate`].
    fn settled(&self, found: Option<bool>, lost: StoreError) -> Result<(), StoreError> {
        match found {
            Some(true) => {
                tracing::info!(error = %lost, "a write's answer was lost; read back, it was applied");
                Ok(())
            }
            Some(false) => Err(lost),
            None => {
                tracing::warn!(
                    error = %lost,
                    "a write's answer was lost, and reading it back did not tell whether it was applied"
                );
                Err(StoreError::Indeterminate(format!(
                    "{lost}; reading the key back did not tell whether the write was applied"
                )))
            }
        }
    }

    /// Read-modify-write loop: `plan` turns the current state into writes (plus the hashes to
    /// announce and a result), applied by compare-and-set, retried if the key moved meanwhile.
    async fn modify<T>(
        &self,
        id: &str,
        plan: impl Fn(StoredId) -> Result<(Writes, Vec<String>, T), StoreError>,
    ) -> Result<T, StoreError> {
        // Each read and each write within the operation timeout, not the loop as a whole: a
        // write whose answer is late is read back (see `apply`), which a timeout around the
        // loop would cut short.
        for _ in 0..CAS_ATTEMPTS {
            let Some((raw, entry)) = self.bounded(self.read_id(id)).await? else {
                return Err(StoreError::NotFound);
            };
            let (writes, hashes, out) = plan(entry)?;
            if self.apply(&raw, &hashes, writes).await? {
                return Ok(out);
            }
        }
        Err(StoreError::Unavailable(format!(
            "key {id} kept changing under concurrent writers"
        )))
    }

    /// Removes `id` for good; with `expected`, only while its record still equals it. Without,
    /// also when the id record cannot be read (see [`Self::purge`]).
    async fn delete_where(&self, id: &str, expected: Option<&KeyRecord>) -> Result<(), StoreError> {
        match self.delete_read(id, expected).await {
            Err(StoreError::Corrupt(why)) if expected.is_none() => self.purge(id, &why).await,
            other => other,
        }
    }

    /// [`Self::delete_where`] of a key whose id record reads: the hashes it lists.
    async fn delete_read(&self, id: &str, expected: Option<&KeyRecord>) -> Result<(), StoreError> {
        self.modify(id, |current| {
            if expected.is_some_and(|e| *e != current.record) {
                return Err(StoreError::Conflict);
            }
            let tag = id_tag(id).ok_or(StoreError::NotFound)?;
            // The hash entries first, the id record last: a script stopped partway (see
            // `APPLY_LUA`) leaves a key that no longer authenticates, whose record a retried
            // DELETE still finds, and with it what is left.
            let id_key = self.names.id(tag, id);
            let mut writes = Writes::new(id_key.clone());
            for h in &current.hashes {
                writes.push(self.names.hash_hex(&h.hash)?, Op::Del);
            }
            if let Some(t) = &current.record.team_id {
                self.team_write(&mut writes, id, t, false)?;
            }
            writes.push(self.names.usage(tag, id), Op::Del);
            writes.push(id_key, Op::Del);
            // Removed after the key is gone: a crash in between leaves an index entry without
            // a record, which listing skips.
            writes
                .after
                .push(redis::cmd("ZREM").arg(self.names.all()).arg(id).clone());
            let announce = current.hashes.into_iter().map(|h| h.hash).collect();
            Ok((writes, announce, ()))
        })
        .await
    }

    /// Deletes a key whose id record cannot be read (it does not decode, is too large, or names
    /// a hash that cannot be one), which therefore cannot say which hash entries are its own,
    /// while those entries may hold an intact copy that keeps authenticating the key. They are
    /// found by their slot tag instead: every entry of a key carries its id's tag, so a `SCAN`
    /// for `{ns}:*:{<tag>}:*` on the node owning that slot finds them, and each hash entry
    /// whose record names this id (read through the cap; see [`entry_key_id`]) is deleted.
    /// The key's team is unreadable too, so the id is removed from every team SET with its
    /// tag (a team's keys share its tag). An entry that names no id, or another, is left: it
    /// cannot authenticate this key.
    ///
    /// One compare-and-set script then deletes the id record, those entries and the usage, and
    /// publishes their hashes, only while the id record is what was examined (its SHA-1,
    /// computed in Redis, so an oversized value is never sent here): a rotation after a hand
    /// repair, in between, would otherwise leave a hash entry behind. The listing index entry
    /// goes after it, as in [`Self::delete_read`].
    ///
    /// Cost: a `SCAN` walks the node's whole keyspace (`MATCH` filters after reading), so on
    /// one server with N names, about N / [`SCAN_COUNT`] round trips, each bounded by the
    /// operation timeout: about a second per million names. Only the repair of a broken record
    /// pays it; every other delete reads the id record as before.
    async fn purge(&self, id: &str, why: &str) -> Result<(), StoreError> {
        let tag = id_tag(id).ok_or(StoreError::NotFound)?;
        let id_key = self.names.id(tag, id);
        for _ in 0..CAS_ATTEMPTS {
            let mut probe = self.digest_script.prepare_invoke();
            probe.key(&id_key);
            let mut conn = self.conn.get();
            let digest: Option<String> = self
                .bounded(async { probe.invoke_async(&mut conn).await.map_err(redis_err) })
                .await?;
            let Some(digest) = digest else {
                return Err(StoreError::NotFound);
            };
            let found = self.entries_of(tag, id).await?;
            let mut purge = self.purge_script.prepare_invoke();
            purge.key(&id_key);
            for name in found.hashes.iter().map(|(name, _)| name) {
                purge.key(name);
            }
            purge.key(self.names.usage(tag, id));
            for name in &found.teams {
                purge.key(name);
            }
            let hexes: Vec<&str> = found
                .hashes
                .iter()
                .filter_map(|(_, h)| h.as_deref())
                .collect();
            purge
                .arg(&digest)
                .arg(self.names.channel())
                .arg(hexes.join(" "))
                .arg(id)
                .arg(found.hashes.len() + 1);
            if let Some(refused) = self.refused_login() {
                return Err(refused);
            }
            let mut conn = self.conn.get();
            let started = Instant::now();
            let sent =
                tokio::time::timeout(self.op_timeout, purge.invoke_async::<i64>(&mut conn)).await;
            let lost = match sent {
                Ok(Ok(applied)) => Ok(applied),
                Ok(Err(e)) if e.code().is_some() => return Err(write_err(e)),
                Ok(Err(e)) => Err(redis_err(e)),
                Err(_) => {
                    let lost = self.no_answer();
                    self.conn.replace_if_older_than(started, self.op_timeout);
                    Err(lost)
                }
            };
            let applied = match lost {
                Ok(applied) => applied,
                // The answer was lost: the id record's digest, read back as in `settle`, says
                // whether the purge ran (it deletes the id record last).
                Err(lost) => {
                    let mut read = self.digest_script.prepare_invoke();
                    read.key(&id_key);
                    let bound = self.op_timeout.saturating_mul(2);
                    let now =
                        tokio::time::timeout(bound, read.invoke_async::<Option<String>>(&mut conn))
                            .await
                            .ok()
                            .and_then(Result::ok);
                    let found = match now {
                        Some(None) => Some(true),
                        Some(Some(d)) if d == digest => Some(false),
                        _ => None,
                    };
                    self.settled(found, lost)?;
                    1
                }
            };
            match applied {
                1 => {
                    tracing::warn!(
                        api_key_id = %id,
                        hash_entries = found.hashes.len(),
                        unreadable = %why,
                        "a key whose record cannot be read was deleted, its hash entries found by its slot tag"
                    );
                    let unindex = redis::cmd("ZREM").arg(self.names.all()).arg(id).clone();
                    if let Err(e) = self.bounded(self.query::<Value>(&unindex)).await {
                        tracing::warn!(error = %e, "redis index update after a write failed");
                    }
                    return Ok(());
                }
                0 => return Err(StoreError::NotFound),
                _ => continue,
            }
        }
        Err(StoreError::Unavailable(format!(
            "key {id} kept changing under concurrent writers"
        )))
    }

    /// The hash entries whose record names `id`, and the team SETs, among the names with `tag`.
    async fn entries_of(&self, tag: SlotTag, id: &str) -> Result<TagEntries, StoreError> {
        let ns = &self.names.ns;
        let (hash_prefix, team_prefix) = (
            format!("{ns}:h:{{{tag}}}:"),
            format!("{ns}:team:{{{tag}}}:"),
        );
        let pattern = format!("{}:*:{{{tag}}}:*", glob_escape(ns));
        let names = self.scan_slot(tag, &pattern).await?;
        let teams = names
            .iter()
            .filter(|n| n.starts_with(&team_prefix))
            .cloned()
            .collect();
        let candidates: Vec<(String, String)> = names
            .iter()
            .filter(|n| n.starts_with(&hash_prefix))
            .map(|n| (n.clone(), n.clone()))
            .collect();
        let tag_hex = hex::encode(tag.as_str());
        let hashes = self
            .bounded(async {
                let mut reads = self.read_capped(candidates);
                let mut hashes = Vec::new();
                while let Some((name, raw)) = reads.next().await {
                    // An entry that cannot be read (another type) is not this key's to judge.
                    let Ok(raw) = raw else { continue };
                    if entry_key_id(&raw).as_deref() != Some(id) {
                        continue;
                    }
                    let digest = &name[hash_prefix.len()..];
                    let hex = KeyHash::from_hex(&format!("{tag_hex}{digest}")).map(|h| h.to_hex());
                    hashes.push((name, hex));
                }
                Ok(hashes)
            })
            .await?;
        Ok(TagEntries { hashes, teams })
    }

    /// Every name matching `pattern` on the node that owns `tag`'s slot (on one server: the
    /// server), by `SCAN`, each call within the operation timeout.
    async fn scan_slot(&self, tag: SlotTag, pattern: &str) -> Result<BTreeSet<String>, StoreError> {
        let mut names = BTreeSet::new();
        let mut cursor: u64 = 0;
        loop {
            let scan = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .clone();
            let reply = self.bounded(self.on_slot_node(tag, scan)).await?;
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::from_redis_value(reply)
                .map_err(|e| StoreError::Corrupt(format!("redis: bad SCAN reply: {e}")))?;
            // A name that is not text is none of ours.
            names.extend(batch.into_iter().filter_map(|n| String::from_utf8(n).ok()));
            if next == 0 {
                return Ok(names);
            }
            cursor = next;
        }
    }

    /// `cmd`, which names no key, on the node owning `tag`'s slot: the cluster client would
    /// send it to any node.
    async fn on_slot_node(&self, tag: SlotTag, cmd: Cmd) -> Result<Value, StoreError> {
        match self.conn.get() {
            Conn::Single(mut c) => cmd.query_async(&mut c).await.map_err(redis_err),
            Conn::Cluster(mut c) => {
                let slot = Route::new(cluster_slot(tag), SlotAddr::Master);
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(slot));
                c.route_command(cmd, route).await.map_err(redis_err)
            }
        }
    }

    /// Writes that leave `id` holding `record` reached by `hashes` (those with a deadline expire
    /// by themselves when it passes, counted from `now_ms`), and remove the `gone` hashes.
    /// `new`: the hash among `hashes` that has no entry yet (a rotation's).
    ///
    /// In the order that leaves more revoked, never less, should the script stop partway (see
    /// `APPLY_LUA`; review: a rotation wrote the id record first and kept the old hash entry
    /// valid for good): the `gone` hashes deleted first, then the entries already there
    /// rewritten (a rotation's grace deadlines), then the id record, which lists every hash
    /// (so a DELETE finds them all from then on), and the new hash's entry last.
    fn state_writes(
        &self,
        id: &str,
        record: &KeyRecord,
        hashes: &[HashRef],
        gone: &[String],
        new: Option<&str>,
        now_ms: i64,
    ) -> Result<Writes, StoreError> {
        let tag = id_tag(id).ok_or(StoreError::NotFound)?;
        let by_id = encode_capped(&IdEntry { record, hashes })?;
        let id_key = self.names.id(tag, id);
        let mut writes = Writes::new(id_key.clone());
        for hex in gone {
            writes.push(self.names.hash_hex(hex)?, Op::Del);
        }
        let mut new_entry = None;
        for h in hashes {
            let valid_until = h.valid_until;
            let json = encode_capped(&HashEntry {
                valid_until,
                record,
            })?;
            let px = valid_until.map(|until| until - now_ms);
            let write = (self.names.hash_hex(&h.hash)?, Op::Set(json, px));
            if new == Some(h.hash.as_str()) {
                new_entry = Some(write);
            } else {
                writes.push(write.0, write.1);
            }
        }
        writes.push(id_key, Op::Set(by_id, None));
        if let Some((name, op)) = new_entry {
            writes.push(name, op);
        }
        Ok(writes)
    }

    /// `SADD`/`SREM` of `id` in `team`'s set: inside the script when the team's slot is the
    /// key's (always, unless the key moved teams after creation), else as a separate command
    /// after it, since a script may not span slots.
    fn team_write(
        &self,
        writes: &mut Writes,
        id: &str,
        team: &str,
        join: bool,
    ) -> Result<(), StoreError> {
        let tag = id_tag(id).ok_or(StoreError::NotFound)?;
        let key = self.names.team(team);
        if SlotTag::for_team(team) == tag {
            let op = if join {
                Op::SAdd(id.to_owned())
            } else {
                Op::SRem(id.to_owned())
            };
            writes.push(key, op);
        } else {
            let cmd = if join { "SADD" } else { "SREM" };
            writes.after.push(redis::cmd(cmd).arg(key).arg(id).clone());
        }
        Ok(())
    }

    /// The records of `ids` that have one, and the ids that have none (no id record, or an id
    /// that cannot be ours).
    async fn fetch_records(
        &self,
        ids: &[String],
    ) -> Result<(Vec<KeyRecord>, Vec<String>), StoreError> {
        // An id that cannot be ours has no record: skip it like a deleted one.
        let mut missing: Vec<String> = ids
            .iter()
            .filter(|id| id_tag(id).is_none())
            .cloned()
            .collect();
        let keyed: Vec<(String, String)> = ids
            .iter()
            .filter_map(|id| Some((id.clone(), self.names.id(id_tag(id)?, id))))
            .collect();
        let mut reads = self.read_capped(keyed);
        let mut out = Vec::with_capacity(ids.len());
        while let Some((id, raw)) = reads.next().await {
            // An id whose key is missing (`""`) was deleted between the two reads, or the index
            // still lists a key whose deletion did not reach it (module doc): skip it.
            // A value of another type there (WRONGTYPE) is one broken record, as an
            // undecodable one is; anything else (the store failing) fails the listing.
            let raw = match raw {
                Err(e @ StoreError::Corrupt(_)) => {
                    super::unreadable_left_out(&id, &e);
                    continue;
                }
                other => other?,
            };
            if raw.is_empty() {
                missing.push(id);
                continue;
            }
            match within_cap(raw).and_then(|raw| decode::<StoredId>(&raw)) {
                Ok(stored) => out.push(stored.record),
                Err(e) => super::unreadable_left_out(&id, &e),
            }
        }
        Ok((out, missing))
    }

    /// Takes out of the listing index `{ns}:all` the ids of `missing` (found there without a
    /// record) that were indexed (their score: `created_time`) at least [`DANGLING_AFTER`]
    /// ago and still have no id record: what a crash, a lost answer or a script stopped partway
    /// left between a write and the index (see the module doc), which the unfiltered total
    /// (`ZCARD`) counted for good (review: `meta.total` above the keys listed). A younger one
    /// may be a create between its `ZADD` and its script, and stays. Returns how many were
    /// taken out; a failure is logged (the listing answers all the same).
    async fn drop_dangling(&self, scored: &[(String, f64)], missing: &[String]) -> u64 {
        let cutoff = Utc::now() - chrono::Duration::from_std(DANGLING_AFTER).unwrap_or_default();
        let cutoff = cutoff.timestamp_millis() as f64;
        let mut stale = Vec::new();
        for id in missing {
            if !scored.iter().any(|(i, score)| i == id && *score < cutoff) {
                continue;
            }
            // Checked again by name: `GETRANGE` answers `""` for an id record emptied by hand
            // too, which is an unreadable key, not a deleted one, and must stay listed.
            let exists = match id_tag(id) {
                Some(tag) => {
                    let exists = redis::cmd("EXISTS").arg(self.names.id(tag, id)).clone();
                    match self.query::<i64>(&exists).await {
                        Ok(n) => n != 0,
                        Err(_) => true,
                    }
                }
                None => false,
            };
            if !exists {
                stale.push(id.as_str());
            }
        }
        if stale.is_empty() {
            return 0;
        }
        let zrem = redis::cmd("ZREM").arg(self.names.all()).arg(&stale).clone();
        match self.query::<u64>(&zrem).await {
            Ok(dropped) => {
                tracing::info!(ids = ?stale, "listing index entries without a key record were dropped");
                dropped
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not drop listing index entries without a key record");
                0
            }
        }
    }

    /// Each name's value read through the cap (`GETRANGE`), with what it came with, in order.
    /// One command per name rather than an `MGET`, which cannot be capped: [`READS_IN_FLIGHT`]
    /// at a time on the multiplexed connection, which pipelines them (a round trip per that
    /// many, about; on a cluster each goes to its slot's node). A caller that uses each value
    /// as it arrives so holds at most that many values of [`RECORD_CAP`] at once.
    fn read_capped<T: Send + 'static>(
        &self,
        names: Vec<(T, String)>,
    ) -> impl futures_util::Stream<Item = (T, Result<Vec<u8>, StoreError>)> + Send + '_ {
        futures_util::stream::iter(names)
            .map(move |(with, name)| async move {
                (with, self.query::<Vec<u8>>(&capped_get(&name)).await)
            })
            .buffered(READS_IN_FLIGHT)
    }

    async fn list_inner(
        &self,
        filter: &KeyFilter,
        page: Page,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError> {
        let (skip, take) = page_window(page);
        let all = self.names.all();
        if filter.team_id.is_none() && filter.key_type.is_none() && filter.is_enabled.is_none() {
            // No filter: let the ZSET do the paging instead of loading every record.
            let total: u64 = self.query(redis::cmd("ZCARD").arg(&all)).await?;
            if take == 0 || skip as u64 >= total {
                return Ok((Vec::new(), total));
            }
            let range = redis::cmd("ZRANGE")
                .arg(&all)
                .arg(skip)
                .arg(skip + take - 1)
                .arg("WITHSCORES")
                .clone();
            let scored: Vec<(String, f64)> = self.query(&range).await?;
            let ids: Vec<String> = scored.iter().map(|(id, _)| id.clone()).collect();
            let (records, missing) = self.fetch_records(&ids).await?;
            let dropped = if missing.is_empty() {
                0
            } else {
                self.drop_dangling(&scored, &missing).await
            };
            return Ok((records, total.saturating_sub(dropped)));
        }
        let ids: Vec<String> = match &filter.team_id {
            Some(team) => {
                self.query(redis::cmd("SMEMBERS").arg(self.names.team(team)))
                    .await?
            }
            None => {
                self.query(redis::cmd("ZRANGE").arg(&all).arg(0).arg(-1))
                    .await?
            }
        };
        let mut records: Vec<KeyRecord> = self
            .fetch_records(&ids)
            .await?
            .0
            .into_iter()
            .filter(|r| filter.matches(r))
            .collect();
        // Same order as the ZSET: by creation millis, then by id.
        records.sort_by(|a, b| {
            (a.created_time.timestamp_millis(), &a.api_key_id)
                .cmp(&(b.created_time.timestamp_millis(), &b.api_key_id))
        });
        let total = records.len() as u64;
        Ok((records.into_iter().skip(skip).take(take).collect(), total))
    }

    /// Read-modify-write of one member: `plan` turns the current member (if any) into the new
    /// one (`None`: none) and a result; applied by compare-and-set on the member's hash field,
    /// retried if another writer changed it in between.
    async fn modify_member<T>(
        &self,
        team: &str,
        user: &str,
        plan: impl Fn(Option<Member>) -> (Option<Member>, T),
    ) -> Result<T, StoreError> {
        let key = self.names.members(team);
        for _ in 0..CAS_ATTEMPTS {
            let raw: Option<String> = self.query(redis::cmd("HGET").arg(&key).arg(user)).await?;
            let current = raw.as_deref().map(decode::<Member>).transpose()?;
            let (next, out) = plan(current);
            let next = next.as_ref().map(encode).transpose()?;
            if raw.is_none() && next.is_none() {
                return Ok(out); // nothing there and nothing to write
            }
            let mut inv = self.member_script.prepare_invoke();
            inv.key(&key)
                .arg(user)
                .arg(raw.unwrap_or_default())
                .arg(next.unwrap_or_default());
            let applied: i64 = inv
                .invoke_async(&mut self.conn.get())
                .await
                .map_err(redis_err)?;
            if applied == 1 {
                return Ok(out);
            }
        }
        Err(StoreError::Unavailable(format!(
            "member {user} of team {team} kept changing under concurrent writers"
        )))
    }

    /// One usage script call: (usage key, id key) per key, then (requests, last-used ms).
    fn usage_call(&self, chunk: &[(SlotTag, &UsageDelta)]) -> redis::ScriptInvocation<'_> {
        let mut inv = self.usage_script.prepare_invoke();
        for (tag, d) in chunk {
            inv.key(self.names.usage(*tag, &d.api_key_id))
                .key(self.names.id(*tag, &d.api_key_id));
        }
        for (_, d) in chunk {
            inv.arg(d.requests).arg(d.last_used.timestamp_millis());
        }
        inv
    }

    async fn list_members_inner(&self, team: &str) -> Result<Vec<Member>, StoreError> {
        let raw: Vec<String> = self
            .query(redis::cmd("HVALS").arg(self.names.members(team)))
            .await?;
        let mut members = raw
            .iter()
            .map(|json| decode::<Member>(json))
            .collect::<Result<Vec<_>, _>>()?;
        members.sort_by(|a, b| (a.added_time, &a.user_id).cmp(&(b.added_time, &b.user_id)));
        Ok(members)
    }

    /// Walks the audit stream newest first, `AUDIT_CHUNK` entries per `XREVRANGE`, filtering the
    /// decoded events. The stream ids' milliseconds are Redis' append time while the filter is on
    /// the event's own `time` (set by the caller, on another clock), so they cannot bound the
    /// range without assuming synchronized clocks: a filtered listing reads the whole (capped)
    /// log. Each round trip, not the whole walk, gets the operation timeout: a walk of a full log
    /// is legitimately longer than one answer, and every step still fails fast when Redis does.
    async fn list_audit_inner(
        &self,
        filter: &AuditFilter,
        page: Page,
    ) -> Result<(Vec<AuditEvent>, u64), StoreError> {
        let (skip, take) = page_window(page);
        let key = self.names.audit();
        let unfiltered = filter.api_key_id.is_none()
            && filter.team_id.is_none()
            && filter.since.is_none()
            && filter.until.is_none();
        // Without a filter the stream's length is the total, and the walk stops after the page.
        let known_total = if unfiltered {
            let total: u64 = self
                .bounded(self.query(redis::cmd("XLEN").arg(&key)))
                .await?;
            if take == 0 || skip as u64 >= total {
                return Ok((Vec::new(), total));
            }
            Some(total)
        } else {
            None
        };
        let (mut out, mut matched) = (Vec::new(), 0usize);
        let mut end = "+".to_owned();
        loop {
            let count = match known_total {
                Some(_) => (skip + take).saturating_sub(matched).clamp(1, AUDIT_CHUNK),
                None => AUDIT_CHUNK,
            };
            let range = redis::cmd("XREVRANGE")
                .arg(&key)
                .arg(&end)
                .arg("-")
                .arg("COUNT")
                .arg(count)
                .clone();
            let entries: Vec<(String, Vec<String>)> = self.bounded(self.query(&range)).await?;
            let complete = entries.len() < count;
            let mut last = None;
            for (id, fields) in entries {
                if unfiltered {
                    // Only the page's entries are decoded; the rest are just counted.
                    if matched >= skip && out.len() < take {
                        out.push(decode_audit(&id, &fields)?);
                    }
                    matched += 1;
                } else {
                    let event = decode_audit(&id, &fields)?;
                    if audit_matches(filter, &event) {
                        if matched >= skip && out.len() < take {
                            out.push(event);
                        }
                        matched += 1;
                    }
                }
                last = Some(id);
            }
            if complete || (unfiltered && out.len() >= take) {
                break;
            }
            // The next chunk ends just before the oldest entry of this one.
            match last.as_deref().map(stream_id_before).transpose()?.flatten() {
                Some(before) => end = before,
                None => break,
            }
        }
        Ok((out, known_total.unwrap_or(matched as u64)))
    }
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn find_by_hash(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<KeyRecord>, StoreError> {
        Ok(super::at_grace_end(
            self.hash_entry::<KeyRecord>(hash, now).await?,
        ))
    }

    async fn find_verified_by_hash(
        &self,
        hash: &KeyHash,
        now: DateTime<Utc>,
    ) -> Result<Option<VerifiedKey>, StoreError> {
        Ok(super::at_grace_end(
            self.hash_entry::<VerifiedKey>(hash, now).await?,
        ))
    }

    fn failure_domains(&self) -> usize {
        if self.conn.is_cluster() {
            CLUSTER_SLOTS / SLOTS_PER_FAILURE_DOMAIN
        } else {
            1
        }
    }

    fn failure_domain(&self, hash: &KeyHash) -> usize {
        if self.conn.is_cluster() {
            usize::from(cluster_slot(hash.tag())) / SLOTS_PER_FAILURE_DOMAIN
        } else {
            0
        }
    }

    async fn create(
        &self,
        record: &KeyRecord,
        hash: &KeyHash,
        team_limit: Option<u32>,
    ) -> Result<(), StoreError> {
        let id = &record.api_key_id;
        let tag = id_tag(id).ok_or_else(|| {
            StoreError::Corrupt(format!("{id:?} is not a key id with a slot tag"))
        })?;
        // Everything the script writes must share one slot (Redis Cluster refuses the script
        // otherwise); the key service mints them so. Checked on a single server too, so that a
        // caller that breaks the rule fails in tests and not first in production.
        if hash.tag() != tag {
            return Err(StoreError::Corrupt(format!(
                "key hash slot tag {} differs from key id {id}'s",
                hash.tag()
            )));
        }
        if let Some(team) = &record.team_id
            && SlotTag::for_team(team) != tag
        {
            return Err(StoreError::Corrupt(format!(
                "key id {id} is not in the slot of team {team:?}"
            )));
        }
        let (hex, valid_until) = (hash.to_hex(), None);
        let hashes = [HashRef {
            hash: hex.clone(),
            valid_until,
        }];
        let id_json = encode_capped(&IdEntry { record, hashes })?;
        let hash_json = encode_capped(&HashEntry {
            valid_until,
            record,
        })?;
        let mut inv = self.create_script.prepare_invoke();
        inv.key(self.names.id(tag, id)).key(self.names.hash(hash));
        if let Some(team) = &record.team_id {
            inv.key(self.names.team(team));
        }
        inv.arg(&id_json)
            .arg(hash_json)
            .arg(id)
            .arg(team_limit.map(|l| l.to_string()).unwrap_or_default())
            .arg(self.names.channel())
            .arg(&hex);
        // The listing index lives in a slot of its own, so it cannot be in the script. Added
        // first: a crash after this leaves an id without a record, which listing skips; the
        // other order could leave a working key that no listing shows, which an admin could
        // then not find to revoke.
        let index = redis::cmd("ZADD")
            .arg(self.names.all())
            .arg(record.created_time.timestamp_millis())
            .arg(id)
            .clone();
        let unindex = redis::cmd("ZREM").arg(self.names.all()).arg(id).clone();
        let drop_index = || async {
            if let Err(e) = self.bounded(self.query::<Value>(&unindex)).await {
                tracing::warn!(error = %e, "could not drop a refused key from the listing index");
            }
        };
        self.bounded(self.query::<Value>(&index)).await?;
        if let Some(refused) = self.refused_login() {
            return Err(refused);
        }
        let mut conn = self.conn.get();
        let started = Instant::now();
        let sent =
            tokio::time::timeout(self.op_timeout, inv.invoke_async::<String>(&mut conn)).await;
        let lost = match sent {
            Ok(Ok(outcome)) => Ok(outcome),
            // Redis answered with an error. A refusal by the script's ACL probe (or out of
            // memory, which Redis reports at a script's first write) wrote nothing for this
            // id, and the index entry goes too; one refused partway leaves a record that does
            // not authenticate (see `CREATE_LUA`), which stays listed so it can be deleted.
            Ok(Err(e)) if e.code().is_some() => {
                let e = write_err(e);
                if !matches!(e, StoreError::Indeterminate(_)) {
                    drop_index().await;
                }
                return Err(e);
            }
            Ok(Err(e)) => Err(redis_err(e)),
            Err(_) => {
                let lost = self.no_answer();
                self.conn.replace_if_older_than(started, self.op_timeout);
                Err(lost)
            }
        };
        let outcome = match lost {
            Ok(outcome) => outcome,
            Err(lost) => {
                // The answer was lost: read the id record back (see `settle`). Applied: the
                // caller still holds the key's value and answers with it.
                let mut writes = Writes::new(self.names.id(tag, id));
                writes.id_after = Some(id_json.clone());
                let found = self.settle(&mut conn, &writes, None).await;
                if found == Some(false) {
                    drop_index().await;
                }
                self.settled(found, lost)?;
                "ok".to_owned()
            }
        };
        match (outcome.as_str(), team_limit) {
            ("ok", _) => Ok(()),
            ("limit", Some(limit)) => {
                // Nothing was written for this id: take it out of the index again (if that
                // fails, listing skips it).
                drop_index().await;
                Err(StoreError::LimitExceeded { limit })
            }
            // Ids are 95 random bits: a clash means a foreign writer or a bug. The index entry
            // stays: it may be the existing key's.
            ("exists", _) => Err(StoreError::Corrupt(format!(
                "key id {id} or its hash is already stored"
            ))),
            (other, _) => Err(StoreError::Corrupt(format!(
                "unexpected create script answer {other:?}"
            ))),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.bounded(async { Ok(self.read_id(id).await?.map(|(_, e)| e.record)) })
            .await
    }

    async fn update(&self, expected: &KeyRecord, record: &KeyRecord) -> Result<(), StoreError> {
        let id = record.api_key_id.as_str();
        self.modify(id, |current| {
            // The script compares the raw text `modify` read, so this decoded comparison holds
            // until the write lands.
            if current.record != *expected {
                return Err(StoreError::Conflict);
            }
            let now_ms = Utc::now().timestamp_millis();
            let (live, dead): (Vec<HashRef>, Vec<HashRef>) = current
                .hashes
                .into_iter()
                .partition(|h| h.valid_until.is_none_or(|u| u > now_ms));
            let dead: Vec<String> = dead.into_iter().map(|h| h.hash).collect();
            // `key_start` belongs to rotation: an update computed from a copy read before a
            // rotation must not bring the old hint back.
            let mut record = record.clone();
            record.key_start = current.record.key_start.clone();
            let record = &record;
            let mut writes = self.state_writes(id, record, &live, &dead, None, now_ms)?;
            if current.record.team_id != record.team_id {
                // Joined first, so that a crash in between leaves the key listed in both teams
                // (listing filters on the record's team) rather than in neither.
                if let Some(t) = &record.team_id {
                    self.team_write(&mut writes, id, t, true)?;
                }
                if let Some(t) = &current.record.team_id {
                    self.team_write(&mut writes, id, t, false)?;
                }
            }
            // No `ZADD` to the listing index here: create indexed the id before its record
            // existed, and a re-add after this script could land after a racing delete's
            // `ZREM`, leaving an id in the index for good with no record behind it.
            let announce = live.into_iter().map(|h| h.hash).chain(dead).collect();
            Ok((writes, announce, ()))
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
        let now_ms = now.timestamp_millis();
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX / 4);
        // Nothing older than the new key outlives now + grace: a zero-grace rotation (a leaked
        // key) also ends the grace of earlier rotations, and no rotation extends one.
        let deadline = now_ms.saturating_add(grace_ms);
        let id = expected.api_key_id.as_str();
        self.modify(id, |current| {
            // The new hash entry is written with the id entry, so it must be in the id's slot
            // (checked once the key is known to exist: an unknown id is NotFound).
            if id_tag(id).is_some_and(|tag| tag != new_hash.tag()) {
                return Err(StoreError::Corrupt(format!(
                    "new key hash slot tag {} differs from key id {id}'s",
                    new_hash.tag()
                )));
            }
            // As in `update`: the script compares the raw text `modify` read, so this decoded
            // comparison holds until the write lands.
            if current.record != *expected {
                return Err(StoreError::Conflict);
            }
            let mut record = current.record;
            record.key_start = new_key_start.to_owned();
            // Never backwards (see `KeyService::change_if`).
            record.updated_time = now.max(record.updated_time);
            let (mut hashes, mut gone) = (Vec::new(), Vec::new());
            for h in current.hashes {
                let until = h.valid_until.map_or(deadline, |u| u.min(deadline));
                if until > now_ms {
                    let valid_until = Some(until);
                    hashes.push(HashRef { valid_until, ..h });
                } else {
                    gone.push(h.hash);
                }
            }
            let (hash, valid_until) = (new_hash.to_hex(), None);
            hashes.push(HashRef {
                hash: hash.clone(),
                valid_until,
            });
            let writes = self.state_writes(id, &record, &hashes, &gone, Some(&hash), now_ms)?;
            let announce = hashes.into_iter().map(|h| h.hash).chain(gone).collect();
            Ok((writes, announce, record))
        })
        .await
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.delete_where(id, None).await
    }

    async fn delete_if(&self, expected: &KeyRecord) -> Result<(), StoreError> {
        self.delete_where(&expected.api_key_id, Some(expected))
            .await
    }

    async fn list(
        &self,
        filter: &KeyFilter,
        page: Page,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError> {
        self.bounded(self.list_inner(filter, page)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let ping = redis::cmd("PING");
        self.bounded(self.query::<redis::Value>(&ping))
            .await
            .map(drop)
    }

    async fn changes(&self) -> Result<ChangeFeed, StoreError> {
        // A dedicated connection: a subscribed connection can do nothing else. On a cluster,
        // the first seed node that answers: PUBLISH reaches every node of a cluster.
        let mut last_error = StoreError::Unavailable("no redis node to subscribe to".into());
        let mut subscribed = None;
        for client in &self.pubsub {
            let channel = self.names.channel();
            let attempt = self
                .bounded(async move {
                    let mut pubsub = client.get_async_pubsub().await.map_err(unavailable)?;
                    // `redis_err`: a user that may not SUBSCRIBE is told apart (`Denied`).
                    pubsub.subscribe(&channel).await.map_err(redis_err)?;
                    Ok(pubsub.split())
                })
                .await;
            match attempt {
                Ok(split) => {
                    subscribed = Some(split);
                    break;
                }
                Err(e) => last_error = e,
            }
        }
        let Some((mut sink, mut stream)) = subscribed else {
            return Err(last_error);
        };
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        let ping_timeout = pubsub_ping_timeout(self.op_timeout);
        let check = self.feed_check.clone();
        tokio::spawn(async move {
            let mut ping = tokio::time::interval(PUBSUB_PING_EVERY);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ping.tick().await; // the first tick is immediate
            // Ending drops `tx`, which tells the caller to flush and resubscribe.
            let ended = loop {
                tokio::select! {
                    () = tx.closed() => break "no longer followed",
                    msg = stream.next() => {
                        let Some(msg) = msg else { break "connection closed" };
                        let Some(change) = parse_change(msg.get_payload_bytes()) else {
                            continue;
                        };
                        if tx.send(change).await.is_err() {
                            break "no longer followed";
                        }
                    }
                    _ = ping.tick() => {
                        if !answers_ping(&mut sink, ping_timeout).await {
                            break "ping unanswered";
                        }
                    }
                    () = check.notified() => {
                        if !answers_ping(&mut sink, ping_timeout).await {
                            break "ping unanswered after another operation went unanswered";
                        }
                        ping.reset();
                    }
                }
            };
            tracing::debug!(why = ended, "redis change feed ended");
        });
        Ok(rx)
    }

    async fn put_member(&self, member: &Member) -> Result<Member, StoreError> {
        self.bounded(
            self.modify_member(&member.team_id, &member.user_id, |current| {
                // An existing member keeps the time they joined; only the role changes.
                let stored = match current {
                    Some(current) => Member {
                        role: member.role,
                        ..current
                    },
                    None => member.clone(),
                };
                (Some(stored.clone()), stored)
            }),
        )
        .await
    }

    async fn remove_member(
        &self,
        team_id: &str,
        user_id: &str,
    ) -> Result<Option<Member>, StoreError> {
        self.bounded(self.modify_member(team_id, user_id, |current| (None, current)))
            .await
    }

    async fn get_member(&self, team_id: &str, user_id: &str) -> Result<Option<Member>, StoreError> {
        let get = redis::cmd("HGET")
            .arg(self.names.members(team_id))
            .arg(user_id)
            .clone();
        let raw: Option<String> = self.bounded(self.query(&get)).await?;
        raw.as_deref().map(decode).transpose()
    }

    async fn list_members(&self, team_id: &str) -> Result<Vec<Member>, StoreError> {
        self.bounded(self.list_members_inner(team_id)).await
    }

    async fn append_audit(&self, event: &AuditEvent) -> Result<AuditEvent, StoreError> {
        // The entry id is the event id; storing it in the JSON as well could only disagree.
        let mut stored = AuditEvent {
            event_id: String::new(),
            ..event.clone()
        };
        let json = encode(&stored)?;
        // `~`: Redis trims whole stream nodes only, much cheaper than an exact cap.
        let add = redis::cmd("XADD")
            .arg(self.names.audit())
            .arg("MAXLEN")
            .arg("~")
            .arg(self.audit_cap)
            .arg("*")
            .arg(AUDIT_FIELD)
            .arg(json)
            .clone();
        stored.event_id = self.bounded(self.query(&add)).await?;
        Ok(stored)
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: Page,
    ) -> Result<(Vec<AuditEvent>, u64), StoreError> {
        // Bounded per round trip inside (see there).
        self.list_audit_inner(filter, page).await
    }

    async fn record_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError> {
        // Up to USAGE_KEYS_PER_CALL keys per script call, by its SHA (EVALSHA; loaded on the
        // first NOSCRIPT). A cluster runs a script only on keys of one slot, so there the keys
        // are grouped by slot first; one server takes them in any grouping. An id that cannot be
        // ours has no key to count for (deltas for gone keys drop).
        let tagged = batch
            .iter()
            .filter_map(|d| Some((id_tag(&d.api_key_id)?, d)));
        let groups: Vec<Vec<(SlotTag, &UsageDelta)>> = if self.conn.is_cluster() {
            let mut by_slot: HashMap<Slot, Vec<(SlotTag, &UsageDelta)>> = HashMap::new();
            for (tag, d) in tagged {
                by_slot
                    .entry(Slot::for_key(tag.as_str()))
                    .or_default()
                    .push((tag, d));
            }
            by_slot.into_values().collect()
        } else {
            vec![tagged.collect()]
        };
        // Made a window at a time: preparing every call of a large batch first kept the thread
        // from its requests for as long.
        let mut chunks: Vec<&[(SlotTag, &UsageDelta)]> = Vec::new();
        for group in &groups {
            chunks.extend(group.chunks(USAGE_KEYS_PER_CALL));
        }
        let mut rest = &chunks[..];
        let mut unreadable = UnreadableUsage::default();
        while !rest.is_empty() {
            let (mut n, mut keys) = (0, 0);
            while n < rest.len() && n < USAGE_CALLS_IN_FLIGHT && keys < USAGE_KEYS_IN_FLIGHT {
                keys += rest[n].len();
                n += 1;
            }
            let (window, after) = rest.split_at(n);
            rest = after;
            let calls: Vec<_> = window.iter().map(|chunk| self.usage_call(chunk)).collect();
            // Each window has its own timeout, so a large batch is not failed for its size.
            let sent = calls.iter().map(|inv| {
                let mut conn = self.conn.get();
                async move {
                    inv.invoke_async::<(Vec<usize>, Vec<usize>)>(&mut conn)
                        .await
                        .map_err(redis_err)
                }
            });
            let replies = self.bounded(try_join_all(sent)).await?;
            for (chunk, (repaired, skipped)) in window.iter().zip(replies) {
                let id = |n: usize| n.checked_sub(1).and_then(|i| chunk.get(i));
                unreadable
                    .repaired
                    .extend(repaired.into_iter().filter_map(id).map(|(_, d)| d));
                unreadable
                    .skipped
                    .extend(skipped.into_iter().filter_map(id).map(|(_, d)| d));
            }
        }
        unreadable.log(&self.usage_log);
        Ok(())
    }

    async fn usage(&self, ids: &[String]) -> Result<Vec<Usage>, StoreError> {
        // One HMGET per key, concurrently (see `record_usage`); `try_join_all` keeps the order.
        let reads = ids.iter().map(|id| async move {
            let Some(tag) = id_tag(id) else {
                return Ok((None, None));
            };
            let cmd = redis::cmd("HMGET")
                .arg(self.names.usage(tag, id))
                .arg("count")
                .arg("last_ms")
                .clone();
            self.query::<(Option<u64>, Option<i64>)>(&cmd).await
        });
        let rows = self.bounded(try_join_all(reads)).await?;
        Ok(rows
            .into_iter()
            .map(|(count, last_ms)| Usage {
                request_count: count.unwrap_or(0),
                last_used_time: last_ms.and_then(DateTime::from_timestamp_millis),
            })
            .collect())
    }

    /// Probes every command keygate sends (see `acl`): on the server, or on every configured
    /// cluster node.
    async fn check_access(&self) -> Result<(), StoreError> {
        self.probe_access().await
    }
}

/// The start-up check of the Redis user's permissions ([`KeyStore::check_access`]).
mod acl;

/// How often at most the unreadable usage records of a flush are logged.
const USAGE_UNREADABLE_LOG_EVERY: Duration = Duration::from_secs(60);
/// Key ids named in one such line, at most.
const USAGE_UNREADABLE_IDS_LOGGED: usize = 10;

/// The keys of one usage flush whose stored usage was unreadable (see [`USAGE_LUA`]).
#[derive(Default)]
struct UnreadableUsage<'a> {
    /// Counted, after their unreadable `count` or `last_ms` was overwritten.
    repaired: Vec<&'a UsageDelta>,
    /// Not counted: the usage name holds another type, or the count would overflow.
    skipped: Vec<&'a UsageDelta>,
}

impl UnreadableUsage<'_> {
    /// One `warn` line, at most every [`USAGE_UNREADABLE_LOG_EVERY`], naming the first keys.
    fn log(&self, every: &LogEvery) {
        if self.repaired.is_empty() && self.skipped.is_empty() {
            return;
        }
        let Some(unlogged) = every.due_now(USAGE_UNREADABLE_LOG_EVERY) else {
            return;
        };
        let ids = |ds: &[&UsageDelta]| {
            ds.iter()
                .take(USAGE_UNREADABLE_IDS_LOGGED)
                .map(|d| d.api_key_id.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let skipped_requests: u64 = self.skipped.iter().map(|d| d.requests).sum();
        tracing::warn!(
            repaired = self.repaired.len(),
            repaired_keys = %ids(&self.repaired),
            skipped = self.skipped.len(),
            skipped_keys = %ids(&self.skipped),
            skipped_requests,
            unlogged,
            "unreadable usage records in redis: a count or time that is not an integer was \
             overwritten with this flush's; a name of another type, or a count at its limit, \
             was left as it is and its requests not counted"
        );
    }
}

/// Whether the feed's connection answers a PING within `timeout`.
async fn answers_ping(sink: &mut redis::aio::PubSubSink, timeout: Duration) -> bool {
    let pong = sink.ping::<redis::Value>();
    matches!(tokio::time::timeout(timeout, pong).await, Ok(Ok(_)))
}

/// The event of one audit stream entry, with the entry id as its `event_id`.
fn decode_audit(id: &str, fields: &[String]) -> Result<AuditEvent, StoreError> {
    let json = fields
        .chunks_exact(2)
        .find_map(|kv| match kv {
            [k, v] if k == AUDIT_FIELD => Some(v),
            _ => None,
        })
        .ok_or_else(|| {
            StoreError::Corrupt(format!("audit entry {id} has no {AUDIT_FIELD} field"))
        })?;
    let mut event: AuditEvent = decode(json)?;
    event.event_id = id.to_owned();
    Ok(event)
}

fn audit_matches(filter: &AuditFilter, e: &AuditEvent) -> bool {
    filter
        .api_key_id
        .as_ref()
        .is_none_or(|k| e.api_key_id.as_ref() == Some(k))
        && filter
            .team_id
            .as_ref()
            .is_none_or(|t| e.team_id.as_ref() == Some(t))
        && filter.since.is_none_or(|since| e.time >= since)
        && filter.until.is_none_or(|until| e.time < until)
}

/// The greatest stream id below `id` (`<ms>-<seq>`), as an inclusive `XREVRANGE` end; `None`
/// below `0-0`. Computed rather than written `(id` so that Redis before 6.2 works too.
fn stream_id_before(id: &str) -> Result<Option<String>, StoreError> {
    let parsed = id
        .split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?)));
    let Some((ms, seq)) = parsed else {
        return Err(StoreError::Corrupt(format!("bad stream id {id:?}")));
    };
    Ok(match (ms, seq) {
        (0, 0) => None,
        (ms, 0) => Some(format!("{}-{}", ms - 1, u64::MAX)),
        (ms, seq) => Some(format!("{ms}-{}", seq - 1)),
    })
}

/// `*` → everything; otherwise hex hashes. Anything unreadable also means everything: dropping
/// too much from a cache is safe, keeping a stale entry is not.
fn parse_change(payload: &[u8]) -> Option<Change> {
    let Ok(text) = std::str::from_utf8(payload) else {
        return Some(Change::All);
    };
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

/// 1-based page → (items to skip, items to take).
fn page_window(page: Page) -> (usize, usize) {
    let per = page.per_page as usize;
    (page.page.saturating_sub(1) as usize * per, per)
}

fn encode<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

fn decode<T: for<'de> Deserialize<'de>>(raw: &str) -> Result<T, StoreError> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("bad stored value: {e}")))
}

/// `GETRANGE name 0 RECORD_CAP`: a value of at most [`RECORD_CAP`] bytes whole, of a longer one
/// the first `RECORD_CAP + 1` bytes, which say it is too long; `""` for no value.
fn capped_get(name: &str) -> Cmd {
    let mut cmd = redis::cmd("GETRANGE");
    cmd.arg(name).arg(0).arg(RECORD_CAP);
    cmd
}

/// A stored value read by [`capped_get`] as text; unreadable (`Corrupt`) when it is longer
/// than [`RECORD_CAP`] (naming the key when its start does) or is not UTF-8.
fn within_cap(raw: Vec<u8>) -> Result<String, StoreError> {
    if raw.len() > RECORD_CAP {
        let key = prefix_key_id(&raw).map_or_else(String::new, |id| format!("key {id}: "));
        return Err(StoreError::Corrupt(format!(
            "{key}stored value longer than {RECORD_CAP} bytes"
        )));
    }
    String::from_utf8(raw)
        .map_err(|e| StoreError::Corrupt(format!("stored value is not UTF-8: {e}")))
}

/// Encodes an entry, refusing one longer than [`RECORD_CAP`]: keygate would refuse to read it.
fn encode_capped<T: Serialize>(value: &T) -> Result<String, StoreError> {
    let json = encode(value)?;
    if json.len() > RECORD_CAP {
        return Err(StoreError::Corrupt(format!(
            "an entry of {} bytes would be longer than {RECORD_CAP}, which keygate reads",
            json.len()
        )));
    }
    Ok(json)
}

/// The key id a stored entry (read through the cap, so maybe cut short) names: from the whole
/// JSON when it parses, else from its start (a record's first field is its id).
fn entry_key_id(raw: &[u8]) -> Option<String> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(stored_key_id)
        .or_else(|| prefix_key_id(raw))
}

/// The first `"api_key_id":"<id>"` of a value that may be cut short, when `<id>` can be one
/// of ours.
fn prefix_key_id(raw: &[u8]) -> Option<String> {
    const FIELD: &[u8] = b"\"api_key_id\":\"";
    let start = memchr::memmem::find(raw, FIELD)? + FIELD.len();
    let rest = raw.get(start..)?;
    let id = std::str::from_utf8(&rest[..memchr::memchr(b'"', rest)?]).ok()?;
    let ours = id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (ours && id_tag(id).is_some()).then(|| id.to_owned())
}

/// `text` as a `SCAN` pattern that matches it literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The key id in a stored entry that does not decode as a whole, so that the operator learns
/// which key to fix.
fn stored_key_id(raw: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(raw).ok()?;
    Some(value.get("record")?.get("api_key_id")?.as_str()?.to_owned())
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// Decoding and type errors are about the data; anything else (refused, dropped, timed out,
/// LOADING, READONLY...) means Redis cannot answer right now.
/// The error of a write script that Redis answered with an error. A refusal by the script's
/// own ACL probe (see [`acl_probe_lua`]) wrote nothing: [`StoreError::Denied`]. Any other
/// refusal came from a `redis.call` partway (Redis 6, which has no probe), after writes that
/// Redis does not roll back: [`StoreError::Indeterminate`], never "nothing was changed".
fn write_err(e: RedisError) -> StoreError {
    match redis_err(e) {
        StoreError::Denied(why) if !why.contains(PROBE_REFUSED) => {
            tracing::warn!(error = %why, "a write was refused partway: it may be partly applied");
            StoreError::Indeterminate(format!("refused partway, may be partly applied: {why}"))
        }
        other => other,
    }
}

fn redis_err(e: RedisError) -> StoreError {
    match e.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => {
            StoreError::Corrupt(format!("redis: {e}"))
        }
        // A value of another type at one of our names: that name is broken, Redis is not.
        _ if e.code() == Some("WRONGTYPE") => StoreError::Corrupt(format!("redis: {e}")),
        // An ACL without the command: NOPERM, or, for a command a script ran, a plain ERR
        // saying so (Redis 7).
        _ if e.code() == Some("NOPERM") || e.to_string().contains("can't run this command") => {
            StoreError::Denied(format!("redis: {e}"))
        }
        _ => unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review: a rotation wrote the id record first and deleted the hashes it dropped last, so
    /// a script stopped partway (a command refused at runtime, on Redis 6 where the scripts
    /// cannot probe first) left the old key valid for good. The writes now drop first, rewrite
    /// what stays, then the id record, and write the new hash entry last.
    #[tokio::test]
    async fn a_rotations_writes_revoke_before_they_grant() {
        let store = RedisStore::connect("redis://127.0.0.1:1/", "kg", Duration::from_millis(50))
            .await
            .unwrap();
        let tag = SlotTag::random();
        let id = crate::auth::key::new_key_id(tag);
        let key = |n: &str| KeyHash::of(&format!("kg_{tag}{n}"));
        let (gone, kept, new) = (key("gone"), key("kept"), key("new"));
        assert_eq!(new.tag(), tag);
        let record = crate::auth::record::sample_record(&id);
        let hashes = [
            HashRef {
                hash: kept.to_hex(),
                valid_until: Some(2_000),
            },
            HashRef {
                hash: new.to_hex(),
                valid_until: None,
            },
        ];
        let writes = store
            .state_writes(
                &id,
                &record,
                &hashes,
                &[gone.to_hex()],
                Some(&new.to_hex()),
                1_000,
            )
            .unwrap();
        let n = &store.names;
        assert_eq!(
            writes.keys,
            [n.hash(&gone), n.hash(&kept), n.id(tag, &id), n.hash(&new)]
        );
        let ops: Vec<&str> = writes.ops.iter().step_by(3).map(String::as_str).collect();
        assert_eq!(ops, ["del", "set", "set", "set"]);
        assert_eq!(writes.id_key, n.id(tag, &id));
        assert!(writes.id_after.is_some());
    }

    #[test]
    fn a_tags_cluster_slot_is_the_one_redis_routes_its_entries_to() {
        for _ in 0..2000 {
            let tag = SlotTag::random();
            let name = format!("ns:h:{{{tag}}}:00ff");
            assert_eq!(
                Slot::new(cluster_slot(tag)),
                Some(Slot::for_key(&name)),
                "{name}"
            );
        }
    }

    #[test]
    fn hash_entry_names_are_namespace_tag_and_digest() {
        let names = Names { ns: "kg".into() };
        for key in ["a", "kg_0000_whatever", ""] {
            let hash = KeyHash::of(key);
            assert_eq!(
                names.hash(&hash),
                format!("kg:h:{{{}}}:{}", hash.tag(), &hash.to_hex()[2 * TAG_LEN..])
            );
        }
    }

    /// README: a change is refused everywhere within a second. A feed whose connection died
    /// silently is noticed within one ping period and one ping timeout, whatever
    /// `store.timeout` is (e2e: `a_silently_dead_change_feed_is_noticed_within_a_second`).
    #[test]
    fn a_dead_feed_is_noticed_within_a_second_whatever_the_timeout() {
        for ms in [1, 100, 300, 500, 2_000, 60_000] {
            let timeout = pubsub_ping_timeout(Duration::from_millis(ms));
            assert!(timeout <= Duration::from_millis(ms));
            assert!(
                PUBSUB_PING_EVERY + timeout <= Duration::from_secs(1),
                "{ms} ms"
            );
        }
    }

    #[test]
    fn a_value_longer_than_the_cap_is_unreadable_and_names_its_key() {
        let id = crate::auth::key::new_key_id(SlotTag::random());
        let start = format!("{{\"valid_until\":null,\"record\":{{\"api_key_id\":\"{id}\",");
        let mut long = start.clone().into_bytes();
        long.resize(RECORD_CAP + 1, b' ');
        match within_cap(long.clone()) {
            Err(StoreError::Corrupt(why)) => assert!(why.contains(&id), "{why}"),
            other => panic!("{other:?}"),
        }
        long.truncate(RECORD_CAP);
        assert!(within_cap(long).is_ok());
        assert!(matches!(
            within_cap(vec![0xff]),
            Err(StoreError::Corrupt(_))
        ));
        // A value cut short by the cap still names its key; a made-up id does not count.
        assert_eq!(entry_key_id(start.as_bytes()), Some(id.clone()));
        assert_eq!(prefix_key_id(br#"{"record":{"api_key_id":"apk_", "#), None);
        assert_eq!(prefix_key_id(br#"{"record":{"api_key_id":"apk_"#), None);
        assert_eq!(entry_key_id(b"not json"), None);
    }

    #[test]
    fn an_entry_above_the_cap_is_not_written() {
        assert!(encode_capped(&"x".repeat(RECORD_CAP - 2)).is_ok());
        assert!(matches!(
            encode_capped(&"x".repeat(RECORD_CAP - 1)),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_namespace_is_matched_literally_by_scan() {
        assert_eq!(glob_escape("kg"), "kg");
        assert_eq!(glob_escape(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
    }

    #[test]
    fn stream_id_before_steps_back_one_id() {
        let before = |id: &str| stream_id_before(id).ok();
        assert_eq!(before("5-3"), Some(Some("5-2".to_owned())));
        assert_eq!(before("5-0"), Some(Some(format!("4-{}", u64::MAX))));
        assert_eq!(before("0-1"), Some(Some("0-0".to_owned())));
        assert_eq!(before("0-0"), Some(None));
        for bad in ["", "5", "5-", "-3", "a-b", "5-3-1"] {
            assert!(
                matches!(stream_id_before(bad), Err(StoreError::Corrupt(_))),
                "{bad:?}"
            );
        }
    }
}
