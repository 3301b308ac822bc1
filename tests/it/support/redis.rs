//! A throwaway `redis-server` for one test: its own loopback port, no persistence, killed on
//! drop. Ready means it answers `INFO` with our child's process id. Tests run in parallel, so each starts its own. `stop`/`restart` simulate an outage on
//! the same port (the data is gone afterwards: nothing is saved).

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
            if let Some(child) = spawn_ready(port) {
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

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        let child = spawn_ready(self.port).unwrap_or_else(|| {
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

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// Spawns redis on `port` and polls it until it answers; `None` (after killing it) if it
/// exits or stays silent.
fn spawn_ready(port: u16) -> Option<Child> {
    let mut child = Command::new(REDIS_SERVER)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--dir", &std::env::temp_dir().to_string_lossy()])
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
