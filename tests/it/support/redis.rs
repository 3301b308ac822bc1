//! A throwaway `redis-server` for one test: its own loopback port, no persistence, killed on
//! drop. Ready means it answers `INFO` with our child's process id. Tests run in parallel, so
//! each starts its own. `stop`/`restart` simulate an outage on the same port (the data is gone
//! afterwards: nothing is saved). [`RedisCluster`]: three such servers in cluster mode.

use super::relay::Relay;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REDIS_SERVER: &str = "/usr/bin/redis-server";
/// How long one start may take before we give up on that port.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const PORT_ATTEMPTS: usize = 5;

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers PING.
    pub fn start() -> RedisServer {
        assert!(
            Path::new(REDIS_SERVER).exists(),
            "{REDIS_SERVER} not found: install redis-server (e.g. `apt-get install redis-server`) \
             to run the Redis store tests"
        );
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            // Another process may grab the port between our probe and redis binding it; then
            // redis exits and we try another port.
            if let Some(child) = spawn_ready(port, &[]) {
                return RedisServer {
                    child: Some(child),
                    port,
                };
            }
        }
        panic!("redis-server did not come up on any of {PORT_ATTEMPTS} ports");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (an outage); `restart` brings it back on the same port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP), as a hung Redis: its connections stay open and nothing
    /// answers. It resumes (SIGCONT) when the guard is dropped, a failing test's included.
    pub fn pause(&self) -> Paused {
        let pid = self.child.as_ref().expect("a running server").id();
        signal(pid, "-STOP");
        Paused { pid }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        let child = spawn_ready(self.port, &[]).unwrap_or_else(|| {
            panic!(
                "redis-server did not come back on port {} within {START_TIMEOUT:?}",
                self.port
            )
        });
        self.child = Some(child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server frozen by [`RedisServer::pause`] until this is dropped.
pub struct Paused {
    pid: u32,
}

impl Drop for Paused {
    fn drop(&mut self) {
        signal(self.pid, "-CONT");
    }
}

fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        sent || std::thread::panicking(),
        "kill {signal} {pid} failed"
    );
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// Spawns redis on `port` (with `extra` arguments) and polls it until it answers; `None`
/// (after killing it) if it exits or stays silent.
fn spawn_ready(port: u16, extra: &[String]) -> Option<Child> {
    let mut child = Command::new(REDIS_SERVER)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--dir", &std::env::temp_dir().to_string_lossy()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {REDIS_SERVER}: {e}"));
    let deadline = Instant::now() + START_TIMEOUT;
    let url = format!("redis://127.0.0.1:{port}/");
    let mut pause = Duration::from_millis(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return None; // exited: most likely the port was taken
        }
        // Ours, not another test's server that took the port first.
        if server_pid(&url) == Some(child.id()) {
            return Some(child);
        }
        // Back off a little between polls rather than sleeping a fixed time.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// The process id of the server answering at `url`, if one answers.
fn server_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(200))
        .ok()?;
    let info: String = redis::cmd("INFO").arg("server").query(&mut conn).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

const REDIS_CLI: &str = "/usr/bin/redis-cli";
const CLUSTER_NODES: usize = 3;
/// How long `redis-cli --cluster create` and the nodes' agreement on it may take.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// A throwaway three-primary Redis Cluster on loopback (no replicas, no persistence), its node
/// configuration files in a temporary directory; every node is killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
    /// Dropped after the nodes (fields drop in order), releasing this cluster's place.
    _slot: ClusterSlot,
}

/// At most this many clusters (3 redis-server processes each) run at once: the whole suite
/// starts one per cluster test, and a 2-core machine running dozens of them at the same time
/// makes unrelated tests miss their timeouts.
const MAX_LIVE_CLUSTERS: usize = 3;
static LIVE_CLUSTERS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static CLUSTER_FREED: std::sync::Condvar = std::sync::Condvar::new();

struct ClusterSlot;

impl ClusterSlot {
    fn take() -> ClusterSlot {
        let mut live = LIVE_CLUSTERS.lock().unwrap_or_else(|e| e.into_inner());
        while *live >= MAX_LIVE_CLUSTERS {
            live = CLUSTER_FREED.wait(live).unwrap_or_else(|e| e.into_inner());
        }
        *live += 1;
        ClusterSlot
    }
}

impl Drop for ClusterSlot {
    fn drop(&mut self) {
        let mut live = LIVE_CLUSTERS.lock().unwrap_or_else(|e| e.into_inner());
        *live -= 1;
        CLUSTER_FREED.notify_one();
    }
}

impl RedisCluster {
    /// Starts three cluster-mode servers, joins them with `redis-cli --cluster create`, and
    /// waits until every node reports `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        assert!(
            Path::new(REDIS_CLI).exists(),
            "{REDIS_CLI} not found: install redis-tools to run the Redis Cluster tests"
        );
        let slot = ClusterSlot::take();
        let dir = tempfile::tempdir().expect("temporary directory");
        let nodes: Vec<RedisServer> = (0..CLUSTER_NODES)
            .map(|_| start_cluster_node(dir.path()))
            .collect();
        let cluster = RedisCluster {
            nodes,
            _dir: dir,
            _slot: slot,
        };
        let mut create = Command::new(REDIS_CLI);
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {REDIS_CLI}: {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_until_ok();
        cluster
    }

    /// Seed node URLs, as `store.redis_cluster_nodes` takes them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// A [`Relay`] in front of every node, and every node announcing its relay's port: clients
    /// that learn the nodes from `CLUSTER SLOTS` (as cluster clients do) connect through the
    /// relays. The nodes still talk to each other directly, on their bus ports.
    pub async fn behind_relays(&self) -> Vec<Relay> {
        let mut relays = Vec::new();
        for node in &self.nodes {
            let relay = Relay::start(([127, 0, 0, 1], node.port()).into()).await;
            let client = redis::Client::open(node.url()).expect("node url");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to a cluster node");
            let bus: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("cluster-port")
                .query_async(&mut conn)
                .await
                .expect("CONFIG GET cluster-port");
            // Set explicitly: with only the client port announced, the bus port announced would
            // be derived from it.
            let () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("cluster-announce-bus-port")
                .arg(&bus[1])
                .arg("cluster-announce-port")
                .arg(relay.port())
                .query_async(&mut conn)
                .await
                .expect("CONFIG SET cluster-announce-port");
            relays.push(relay);
        }
        let relay_ports: Vec<u16> = relays.iter().map(Relay::port).collect();
        // Each node learns the others' new ports by gossip.
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        for node in &self.nodes {
            while !announces_only(&node.url(), &relay_ports).await {
                assert!(
                    Instant::now() < deadline,
                    "cluster nodes did not announce their relays within {CLUSTER_TIMEOUT:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        relays
    }

    /// Polls `CLUSTER INFO` on every node, with back-off, until all say `cluster_state:ok`.
    fn wait_until_ok(&self) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        let mut pause = Duration::from_millis(10);
        loop {
            if self.urls().iter().all(|u| cluster_state_ok(u)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {CLUSTER_TIMEOUT:?}"
            );
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

/// One cluster-mode server on a free port, with a free port of its own for the cluster bus
/// (the default, port + 10000, may be beyond 65535 or taken).
fn start_cluster_node(dir: &Path) -> RedisServer {
    for _ in 0..PORT_ATTEMPTS {
        let (port, bus) = (free_port(), free_port());
        if port == bus {
            continue;
        }
        let conf = dir.join(format!("nodes-{port}.conf"));
        let extra = [
            "--cluster-enabled".to_owned(),
            "yes".to_owned(),
            "--cluster-config-file".to_owned(),
            conf.to_string_lossy().into_owned(),
            "--cluster-port".to_owned(),
            bus.to_string(),
            "--dir".to_owned(),
            dir.to_string_lossy().into_owned(),
        ];
        if let Some(child) = spawn_ready(port, &extra) {
            return RedisServer {
                child: Some(child),
                port,
            };
        }
    }
    panic!("no cluster node came up on any of {PORT_ATTEMPTS} ports");
}

/// Whether every slot range's primary in `url`'s `CLUSTER SLOTS` has one of `ports`.
async fn announces_only(url: &str, ports: &[u16]) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    let Ok(ranges) = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async::<Vec<Vec<redis::Value>>>(&mut conn)
        .await
    else {
        return false;
    };
    // Each range: start, end, then its primary as [ip, port, id, ...], then any replicas.
    let primary_port = |range: &Vec<redis::Value>| match range.get(2) {
        Some(redis::Value::Array(node)) => match node.get(1) {
            Some(redis::Value::Int(port)) => u16::try_from(*port).ok(),
            _ => None,
        },
        _ => None,
    };
    !ranges.is_empty()
        && ranges
            .iter()
            .all(|range| primary_port(range).is_some_and(|port| ports.contains(&port)))
}

fn cluster_state_ok(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
        return false;
    };
    let info: Result<String, _> = redis::cmd("CLUSTER").arg("INFO").query(&mut conn);
    info.is_ok_and(|i| i.lines().any(|l| l.trim() == "cluster_state:ok"))
}
