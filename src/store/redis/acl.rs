//! [`RedisStore::probe_access`]: whether keygate's Redis user may run every command keygate
//! sends, on every family of names it sends it on and on its channel. Without this check a user
//! missing one (an ACL without `EVALSHA`, `PUBLISH`, `XADD`…) started, reported ready, and then
//! failed the first admin write (500 `STORE_PERMISSION_DENIED`) or lost the change feed, the
//! audit log or the usage counts for good, with nothing at start-up to say so (review).
//!
//! Why probes: Redis has no command with which a user learns what it may run (`ACL DRYRUN` and
//! `ACL GETUSER` are admin commands that keygate's user should not have). So each command is
//! sent once, on a name of each family keygate sends it on, in a form that passes Redis' access
//! check and then changes nothing. Redis checks a command's access (the command, its keys,
//! its channels) before anything else it refuses a command for (its arguments, the type
//! of the value, the cluster slot, memory, a read-only replica): so a `NOPERM` answer means
//! "not permitted", and any other answer, an error included, means permitted. The forms:
//! reads of names that hold nothing; `SET … PX 0`, `HSET` with an odd field count, `HINCRBY`
//! by a non-number, `ZADD` of a non-number score and `XADD` of id `0-0`, which Redis refuses
//! after the check and before writing; `DEL`, `SREM`, `ZREM` and `HDEL` of names or members
//! that do not exist; `EVALSHA` of a script that does not exist (answered `NOSCRIPT`);
//! `SCRIPT LOAD` of keygate's own scripts (what `EVALSHA` does on `NOSCRIPT` anyway);
//! `PUBLISH` of an empty message on the change channel, which every subscriber skips (see
//! `parse_change`); `SUBSCRIBE` on a connection of its own, then closed. The one write without
//! such a form, `SADD`, adds a member that is no key id to a team set of a team that is no
//! team's, and `SREM` takes it out again at once.
//!
//! The probes' names are the real families' (`{ns}:h:{tag}:…`, `{ns}:k:{tag}:…`, the team,
//! member and usage names, `{ns}:all`, `{ns}:audit`, `{ns}:changes`), so an ACL whose key
//! patterns cover some families and not others (`~ns:k:*`, or `%R~` read-only selectors) is
//! caught for the family it misses.
//!
//! Redis Cluster: access lists are per node. Every configured node (`redis_cluster_nodes`) is
//! probed on a direct connection, where a keyed command for a slot the node does not own is
//! answered `MOVED`, after the access check: permitted. Nodes that are not configured are not
//! probed. A cluster client also needs `CLUSTER SLOTS` (slot discovery) and `ASKING` (slots
//! being moved), probed on cluster nodes only.

use super::{APPLY_LUA, CREATE_LUA, MEMBER_LUA, RedisStore, USAGE_LUA};
use crate::auth::key::SlotTag;
use crate::store::StoreError;
use futures_util::future::join_all;
use redis::{AsyncConnectionConfig, Client, Cmd, RedisError, Value};
use std::fmt;
use std::time::Duration;

/// A team id no team has (spaces and all), whose set and member names the probes use.
const PROBE_TEAM: &str = "keygate permission probe";
/// What the probes use as a key id, a team member and a hash field: never one of ours (an id
/// starts with `key_` and a slot tag).
const PROBE_ID: &str = "keygate-permission-probe";
/// The SHA1 of no script: `EVALSHA` of it is answered `NOSCRIPT` once the user may run it.
const NO_SUCH_SCRIPT: &str = "0000000000000000000000000000000000000000";

/// The commands probed on a cluster only: what the cluster client sends by itself.
const CLUSTER_ONLY: [&str; 2] = ["CLUSTER SLOTS", "ASKING"];

/// One command to try.
struct Probe {
    /// As docs/deploy.md names it.
    command: &'static str,
    /// The name or channel it is tried on, for the message.
    on: String,
    cmd: Cmd,
}

impl Probe {
    fn new(command: &'static str, on: impl Into<String>, cmd: Cmd) -> Self {
        Self {
            command,
            on: on.into(),
            cmd,
        }
    }

    fn refused(&self, reply: String) -> Refusal {
        Refusal {
            command: self.command,
            on: self.on.clone(),
            reply,
        }
    }
}

/// A command Redis would not let keygate's user run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    command: &'static str,
    /// The name or channel, or empty for a command without one.
    on: String,
    /// What Redis answered.
    reply: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.on.is_empty() {
            write!(f, "{} ({})", self.command, self.reply)
        } else {
            write!(f, "{} on {} ({})", self.command, self.on, self.reply)
        }
    }
}

/// Why one node's probes found no verdict.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    /// Redis did not answer (down, unreachable, a refused login): nothing is known about the
    /// permissions, which must not be reported as missing.
    #[error("redis did not answer the permission check: {0}")]
    Unanswered(String),
}

/// Whether Redis refused `e`'s command for the user's access list: `NOPERM`, or, for a command
/// a script ran, a plain error saying so (Redis 7).
fn is_refusal(e: &RedisError) -> bool {
    e.code() == Some("NOPERM") || e.to_string().contains("can't run this command")
}

/// A probe's verdict from its answer: `Ok` when Redis let the command past its access check,
/// whatever it answered then (the probes are made to be refused for their arguments).
fn judge(probe: &Probe, answer: Result<Value, RedisError>) -> Result<Option<Refusal>, ProbeError> {
    let answer = match answer {
        Ok(Value::ServerError(e)) => Err(RedisError::from(e)),
        other => other,
    };
    match answer {
        Ok(_) => Ok(None),
        Err(e) if is_refusal(&e) => Ok(Some(probe.refused(e.to_string()))),
        Err(e) if e.code().is_some() => Ok(None),
        Err(e) => Err(ProbeError::Unanswered(e.to_string())),
    }
}

/// The probes on `store`'s names, for one server or one cluster node (see the module doc).
fn probes(store: &RedisStore, cluster: bool) -> Vec<Probe> {
    let names = &store.names;
    let tag = SlotTag::for_team(PROBE_TEAM);
    let hash = names.tagged("h", tag, PROBE_ID);
    let id = names.id(tag, PROBE_ID);
    let team = names.team(PROBE_TEAM);
    let members = names.members(PROBE_TEAM);
    let usage = names.usage(tag, PROBE_ID);
    let (all, audit, channel) = (names.all(), names.audit(), names.channel());
    let c = redis::cmd;
    let mut p = vec![Probe::new("PING", "", c("PING"))];
    for name in [&hash, &id] {
        p.push(Probe::new("GET", name, c("GET").arg(name).clone()));
        let set = c("SET").arg(name).arg("").arg("PX").arg(0).clone();
        p.push(Probe::new("SET", name, set));
        p.push(Probe::new("DEL", name, c("DEL").arg(name).clone()));
        p.push(Probe::new("EXISTS", name, c("EXISTS").arg(name).clone()));
        let getrange = c("GETRANGE").arg(name).arg(0).arg(0).clone();
        p.push(Probe::new("GETRANGE", name, getrange));
        p.push(Probe::new("TYPE", name, c("TYPE").arg(name).clone()));
    }
    // Keyless for access lists; only the command is checked. One name at most is read.
    let pattern = format!("{}:*", names.ns);
    let scan = c("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(&pattern)
        .arg("COUNT")
        .arg(1)
        .clone();
    p.push(Probe::new("SCAN", "", scan));
    p.push(Probe::new("SCARD", &team, c("SCARD").arg(&team).clone()));
    p.push(Probe::new(
        "SMEMBERS",
        &team,
        c("SMEMBERS").arg(&team).clone(),
    ));
    p.push(Probe::new(
        "HGET",
        &members,
        c("HGET").arg(&members).arg(PROBE_ID).clone(),
    ));
    p.push(Probe::new(
        "HVALS",
        &members,
        c("HVALS").arg(&members).clone(),
    ));
    p.push(Probe::new(
        "HDEL",
        &members,
        c("HDEL").arg(&members).arg(PROBE_ID).clone(),
    ));
    for name in [&members, &usage] {
        // An odd number of field and value arguments: refused after the access check.
        let hset = c("HSET")
            .arg(name)
            .arg(PROBE_ID)
            .arg("")
            .arg(PROBE_ID)
            .clone();
        p.push(Probe::new("HSET", name, hset));
    }
    let hmget = c("HMGET").arg(&usage).arg("count").arg("last_ms").clone();
    p.push(Probe::new("HMGET", &usage, hmget));
    let hincrby = c("HINCRBY").arg(&usage).arg("count").arg("x").clone();
    p.push(Probe::new("HINCRBY", &usage, hincrby));
    p.push(Probe::new("DEL", &usage, c("DEL").arg(&usage).clone()));
    p.push(Probe::new(
        "ZADD",
        &all,
        c("ZADD").arg(&all).arg("x").arg(PROBE_ID).clone(),
    ));
    p.push(Probe::new(
        "ZREM",
        &all,
        c("ZREM").arg(&all).arg(PROBE_ID).clone(),
    ));
    p.push(Probe::new("ZCARD", &all, c("ZCARD").arg(&all).clone()));
    p.push(Probe::new(
        "ZRANGE",
        &all,
        c("ZRANGE").arg(&all).arg(0).arg(0).clone(),
    ));
    let xadd = c("XADD")
        .arg(&audit)
        .arg("0-0")
        .arg("event")
        .arg("")
        .clone();
    p.push(Probe::new("XADD", &audit, xadd));
    p.push(Probe::new("XLEN", &audit, c("XLEN").arg(&audit).clone()));
    let xrevrange = c("XREVRANGE")
        .arg(&audit)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .clone();
    p.push(Probe::new("XREVRANGE", &audit, xrevrange));
    // Every name a script is given, so that a key pattern missing one family is caught here.
    let script_keys = [&id, &hash, &team, &members, &usage];
    let evalsha = c("EVALSHA")
        .arg(NO_SUCH_SCRIPT)
        .arg(script_keys.len())
        .arg(&script_keys[..])
        .clone();
    p.push(Probe::new("EVALSHA", &id, evalsha));
    for script in [CREATE_LUA, APPLY_LUA, MEMBER_LUA, USAGE_LUA] {
        let load = c("SCRIPT").arg("LOAD").arg(script).clone();
        p.push(Probe::new("SCRIPT LOAD", "", load));
    }
    p.push(Probe::new(
        "PUBLISH",
        &channel,
        c("PUBLISH").arg(&channel).arg("").clone(),
    ));
    if cluster {
        for command in CLUSTER_ONLY {
            let mut cmd = Cmd::new();
            for word in command.split(' ') {
                cmd.arg(word);
            }
            p.push(Probe::new(command, "", cmd));
        }
    }
    p
}

impl RedisStore {
    /// Tries every command keygate sends (see the module doc) on the server, or on every
    /// configured cluster node. `Denied` names each refused command, the name or channel it was
    /// tried on, and the Redis user; `Unavailable` when a node did not answer (nothing is known
    /// then, and a refusal found on another node is reported first).
    pub(super) async fn probe_access(&self) -> Result<(), StoreError> {
        let cluster = self.conn.is_cluster();
        let mut refused: Vec<Refusal> = Vec::new();
        let mut unanswered = None;
        let mut answered = 0;
        // All nodes at once: a hung one delays start-up by its timeouts once, not once per node.
        let nodes = join_all(self.pubsub.iter().map(|c| self.probe_node(c, cluster))).await;
        for node in nodes {
            match node {
                Ok(found) => {
                    answered += 1;
                    for r in found {
                        if !refused.contains(&r) {
                            refused.push(r);
                        }
                    }
                }
                Err(e) => unanswered = Some(e),
            }
        }
        if !refused.is_empty() {
            return Err(StoreError::Denied(denial(self.user(), &refused)));
        }
        match unanswered {
            // A cluster's seed list may name a node that is gone ("any reachable node will
            // do"): checked on the nodes that answer, not again every second for ever
            // (review: a dead seed made the check run, and PUBLISH, every second).
            Some(e) if answered > 0 => {
                tracing::warn!(
                    error = %e,
                    answered,
                    "a Redis node in store.redis_cluster_nodes did not answer the permission \
                     check; checked on the nodes that answered"
                );
                Ok(())
            }
            Some(e) => Err(StoreError::Unavailable(e.to_string())),
            None => Ok(()),
        }
    }

    /// The Redis user keygate logs in as: the URL's, else `default` (what Redis calls a login
    /// with a password only, or none).
    fn user(&self) -> String {
        self.pubsub
            .first()
            .and_then(|c| c.get_connection_info().redis_settings().username())
            .unwrap_or("default")
            .to_owned()
    }

    /// The refusals of one node, on a direct connection of the probes' own.
    async fn probe_node(&self, client: &Client, cluster: bool) -> Result<Vec<Refusal>, ProbeError> {
        let timeout = self.op_timeout;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let connecting = client.get_multiplexed_async_connection_with_config(&config);
        let conn = match bounded(timeout.saturating_mul(2), connecting).await? {
            Ok(conn) => conn,
            // A `SELECT` of the URL's database the user may not run fails the login itself.
            Err(e) if is_refusal(&e) => {
                let login = Probe::new("SELECT", "", redis::cmd("SELECT"));
                return Ok(vec![login.refused(e.to_string())]);
            }
            Err(e) => return Err(ProbeError::Unanswered(e.to_string())),
        };
        let probes = probes(self, cluster);
        let answers = join_all(probes.iter().map(|probe| {
            let mut conn = conn.clone();
            async move { probe.cmd.query_async::<Value>(&mut conn).await }
        }));
        let answers = bounded(timeout.saturating_mul(2), answers).await?;
        let mut refused = Vec::new();
        for (probe, answer) in probes.iter().zip(answers) {
            refused.extend(judge(probe, answer)?);
        }
        refused.extend(self.probe_sadd(&conn, timeout).await?);
        refused.extend(self.probe_subscribe(client, timeout).await?);
        Ok(refused)
    }

    /// `SADD` has no form that writes nothing: a member that is no key id goes into the set of
    /// a team that is no team's, and out again at once. `SREM` is tried first, removing the
    /// absent member (nothing written): a user that may add but not remove would otherwise
    /// keep the member (review).
    async fn probe_sadd(
        &self,
        conn: &redis::aio::MultiplexedConnection,
        timeout: Duration,
    ) -> Result<Option<Refusal>, ProbeError> {
        let team = self.names.team(PROBE_TEAM);
        let sadd = Probe::new(
            "SADD",
            &team,
            redis::cmd("SADD").arg(&team).arg(PROBE_ID).clone(),
        );
        let srem = Probe::new(
            "SREM",
            &team,
            redis::cmd("SREM").arg(&team).arg(PROBE_ID).clone(),
        );
        let mut conn = conn.clone();
        let removed = bounded(timeout, srem.cmd.query_async::<Value>(&mut conn)).await?;
        if let Some(refused) = judge(&srem, removed)? {
            return Ok(Some(refused));
        }
        let added = bounded(timeout, sadd.cmd.query_async::<Value>(&mut conn)).await?;
        let added = judge(&sadd, added)?;
        let removed = bounded(timeout, srem.cmd.query_async::<Value>(&mut conn)).await?;
        Ok(added.or(judge(&srem, removed)?))
    }

    /// `SUBSCRIBE` to the change channel on a connection of its own, closed right after.
    async fn probe_subscribe(
        &self,
        client: &Client,
        timeout: Duration,
    ) -> Result<Option<Refusal>, ProbeError> {
        let channel = self.names.channel();
        let probe = Probe::new("SUBSCRIBE", &channel, redis::cmd("SUBSCRIBE"));
        let subscribed = bounded(timeout.saturating_mul(2), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await
        })
        .await?;
        judge(&probe, subscribed.map(|()| Value::Okay))
    }
}

/// `fut` within `limit`; running out of time is no answer.
async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> Result<T, ProbeError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| ProbeError::Unanswered(format!("no answer within {limit:?}")))
}

/// The operator's message: every refusal, the user, and where the list of what to grant is.
fn denial(user: String, refused: &[Refusal]) -> String {
    let list: Vec<String> = refused.iter().map(ToString::to_string).collect();
    format!(
        "the Redis user {user:?} may not run what keygate needs: {}; grant it (docs/deploy.md, \
         \"The Redis user (ACL)\", lists every command, key pattern and channel)",
        list.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The names of the commands `source` sends: `redis::cmd("X")` and `redis.call('X'` /
    /// `redis.pcall('X'` in its scripts.
    fn commands_sent(source: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for (open, close) in [
            ("redis::cmd(\"", '"'),
            ("redis.call('", '\''),
            ("redis.pcall('", '\''),
        ] {
            for (at, _) in source.match_indices(open) {
                let rest = &source[at + open.len()..];
                if let Some(end) = rest.find(close) {
                    found.insert(rest[..end].to_owned());
                }
            }
        }
        found
    }

    async fn store(cluster: bool) -> RedisStore {
        let timeout = Duration::from_millis(100);
        if cluster {
            let nodes = ["redis://127.0.0.1:1/".to_owned()];
            RedisStore::connect_cluster(&nodes, "kg", timeout)
                .await
                .unwrap()
        } else {
            RedisStore::connect("redis://127.0.0.1:1/", "kg", timeout)
                .await
                .unwrap()
        }
    }

    /// A command added to the store without a probe would pass the start-up check and then
    /// fail where the ACL lacks it: every command the store's source sends is probed.
    #[tokio::test]
    async fn every_command_the_store_sends_is_probed() {
        let sent = commands_sent(include_str!("../redis.rs"));
        for expected in ["GET", "PUBLISH", "HINCRBY", "XADD", "PING", "ZADD", "HSET"] {
            assert!(sent.contains(expected), "{expected} not found in {sent:?}");
        }
        let single = probes(&store(false).await, false);
        let mut probed: BTreeSet<&str> = single.iter().map(|p| p.command).collect();
        // Probed each by a function of its own (`probe_sadd`, `probe_subscribe`).
        probed.extend(["SADD", "SREM", "SUBSCRIBE"]);
        for command in &sent {
            assert!(probed.contains(command.as_str()), "{command} is not probed");
        }
        // Scripts (`Script::invoke_async`: EVALSHA, and SCRIPT LOAD on NOSCRIPT) and the feed.
        for command in ["EVALSHA", "SCRIPT LOAD"] {
            assert!(probed.contains(command), "{command} is not probed");
        }
        assert!(CLUSTER_ONLY.iter().all(|c| !probed.contains(c)));
        let cluster = probes(&store(true).await, true);
        let probed: BTreeSet<&str> = cluster.iter().map(|p| p.command).collect();
        assert!(CLUSTER_ONLY.iter().all(|c| probed.contains(c)));
    }

    /// Every probed name is in the namespace (`~kg:*` covers it), and none can be a real
    /// key's: the probes that write must never touch one.
    #[tokio::test]
    async fn probes_stay_in_the_namespace_and_off_real_keys() {
        assert!(SlotTag::of_key_id(PROBE_ID).is_none());
        for probe in probes(&store(false).await, false) {
            assert!(
                probe.on.is_empty() || probe.on.starts_with("kg:"),
                "{} on {}",
                probe.command,
                probe.on
            );
        }
    }

    #[test]
    fn only_an_access_refusal_is_a_refusal() {
        let probe = Probe::new("SET", "kg:x", redis::cmd("SET"));
        let server = |reply: &str| redis::parse_redis_value(reply.as_bytes());
        let refused = judge(&probe, server("-NOPERM this user has no permissions\r\n"));
        assert!(matches!(refused, Ok(Some(_))), "{refused:?}");
        let in_script =
            "-ERR The user executing the script can't run this command or subcommand\r\n";
        assert!(matches!(judge(&probe, server(in_script)), Ok(Some(_))));
        // Past the access check: refused for its arguments, or for another slot's node.
        for reply in [
            "-ERR invalid expire time\r\n",
            "-MOVED 3999 127.0.0.1:6381\r\n",
            "-NOSCRIPT No matching script\r\n",
        ] {
            let verdict = judge(&probe, server(reply));
            assert!(matches!(verdict, Ok(None)), "{reply}: {verdict:?}");
        }
        let io = Err(RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(matches!(judge(&probe, io), Err(ProbeError::Unanswered(_))));
        assert!(matches!(judge(&probe, Ok(Value::Okay)), Ok(None)));
    }

    #[test]
    fn the_message_names_the_user_the_commands_and_the_docs() {
        let r = Refusal {
            command: "PUBLISH",
            on: "kg:changes".into(),
            reply: "NOPERM".into(),
        };
        let text = denial("kg".into(), &[r]);
        assert!(text.contains("\"kg\""), "{text}");
        assert!(text.contains("PUBLISH on kg:changes"), "{text}");
        assert!(text.contains("docs/deploy.md"), "{text}");
    }
}
