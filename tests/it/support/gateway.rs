//! Starts the real `keygate` binary on an ephemeral port with a generated configuration, and
//! stops it on drop. The port is learned from the line the binary prints at start, so there is
//! no port race and no sleep.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_keygate");

pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    /// The admin listener's address.
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// `config` is TOML; `proxy.listen` is forced to `127.0.0.1:0`.
    pub fn start(config: &str) -> Gateway {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Gateway {
        Self::spawn(config, env, Stdio::inherit())
    }

    /// Logs at `info` (access lines included) into the file at `log`.
    pub fn start_logging_to(config: &str, log: &Path) -> Gateway {
        let file = std::fs::File::create(log).expect("create the log file");
        Self::spawn(config, &[("RUST_LOG", "info")], Stdio::from(file))
    }

    fn spawn(config: &str, env: &[(&str, &str)], stderr: Stdio) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("keygate.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, addrs) = spawn_and_read_addrs(
            cmd,
            &[
                "keygate: proxy listening on ",
                "keygate: admin listening on ",
            ],
        );
        Gateway {
            child,
            addr: addrs[0],
            admin: addrs[1],
            config_path,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The admin listener's `/metrics` page.
    pub async fn metrics(&self) -> String {
        super::client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("read /metrics")
    }

    /// The value of the unlabelled series `name` on `/metrics` (empty when absent).
    pub async fn metric(&self, name: &str) -> String {
        let text = self.metrics().await;
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_default()
            .to_owned()
    }

    /// The gateway process's id (to read its memory use from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the process has exited by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("poll keygate")
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait for keygate")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd`, reads its stdout until a line starting with `marker`, and returns the address
/// after it. Stdout keeps being drained in the background so the child never blocks on it.
pub fn spawn_and_read_addr(cmd: Command, marker: &'static str) -> (Child, SocketAddr) {
    let (child, addrs) = spawn_and_read_addrs(cmd, &[marker]);
    (child, addrs[0])
}

/// Like [`spawn_and_read_addr`], for several start lines, returned in the order of `markers`.
pub fn spawn_and_read_addrs(
    mut cmd: Command,
    markers: &[&'static str],
) -> (Child, Vec<SocketAddr>) {
    let mut child = cmd.spawn().expect("start keygate");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let wanted: Vec<&'static str> = markers.to_vec();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            for (i, marker) in wanted.iter().enumerate() {
                if let Some(rest) = line.strip_prefix(marker) {
                    // The scheme (http:// or https:// with TLS) may follow the marker.
                    let rest = rest.trim();
                    let rest = ["https://", "http://"]
                        .iter()
                        .find_map(|s| rest.strip_prefix(s))
                        .unwrap_or(rest);
                    let _ = tx.send((i, rest.to_owned()));
                }
            }
        }
    });
    let mut found: Vec<Option<SocketAddr>> = vec![None; markers.len()];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, addr)) => found[i] = Some(addr.parse().expect("address in the start line")),
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().ok();
                panic!("keygate did not start: {out:?}");
            }
        }
    }
    (child, found.into_iter().flatten().collect())
}
