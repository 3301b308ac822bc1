//! The command line: configuration checking and dev mode, as a user runs them.

use crate::support::client;
use crate::support::gateway::{BIN, spawn_and_read_addr};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn check_config_accepts_the_shipped_examples() {
    for file in [
        "config/dev.toml",
        "config/production-redis.toml",
        "config/sidecar.toml",
    ] {
        let out = Command::new(BIN)
            .args(["check-config", file])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    }
}

#[test]
fn check_config_names_every_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[proxy]\nlisten = \"nope\"\n[cache]\nttl = \"0s\"\n[[routes]]\npath_prefix = \"/\"\nupstream = \"missing\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["proxy.listen", "cache.ttl", "routes[0].upstream"] {
        assert!(err.contains(field), "{field} not named in: {err}");
    }
    // The environment overrides the file, and is checked the same way.
    let out = Command::new(BIN)
        .args(["check-config", "config/dev.toml"])
        .env("KEYGATE__STORE__KIND", "mongo")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("store.kind"));
    let out = Command::new(BIN)
        .args(["check-config", "does-not-exist.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file"));
}

/// An environment variable that is not UTF-8, any at all, made start-up panic
/// (`std::env::vars`); now only a `KEYGATE__*` one matters, and it is an error naming it.
#[cfg(unix)]
#[test]
fn an_environment_variable_that_is_not_utf8_is_no_panic() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let out = Command::new(BIN)
        .args(["check-config", "config/dev.toml"])
        .env("OLDPWD", OsString::from_vec(b"/tmp/\xff".to_vec()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = Command::new(BIN)
        .args(["check-config", "config/dev.toml"])
        .env(
            "KEYGATE__STORE__PATH",
            OsString::from_vec(b"/data/\xff.db".to_vec()),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KEYGATE__STORE__PATH") && err.contains("UTF-8"),
        "{err}"
    );
}

/// A bootstrap token no request can present (the admin API trims the presented one; a header
/// carries no control characters) was accepted and then never logged in: a token read from a
/// secret file with its trailing newline. Refused at start-up, named, never printed.
#[test]
fn serve_refuses_a_bootstrap_token_no_request_can_present() {
    const TOKEN: &str = "a-bootstrap-token-of-enough-length";
    for token in [
        format!("{TOKEN}\n"),
        format!(" {TOKEN}"),
        format!("{TOKEN}\t"),
        format!("bootstrap\u{1}{TOKEN}"),
        format!("bootstrap-ä-{TOKEN}"),
        // The old manifests' placeholder, and the like.
        format!("replace-me-with-{TOKEN}"),
        format!("{TOKEN}-CHANGEME"),
        format!("Change_Me_{TOKEN}"),
    ] {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("KEYGATE_ADMIN_TOKEN", &token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{token:?}: serve started with that bootstrap token");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let out = child.wait_with_output().unwrap();
        assert_eq!(status.code(), Some(1), "{token:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("KEYGATE_ADMIN_TOKEN"), "{token:?}: {err}");
        assert!(!err.contains(TOKEN), "the token was printed: {err}");
    }
}

/// `TOKIO_WORKER_THREADS` is read once, by keygate: tokio's own reading panicked (exit code
/// 101) on 0 or a value that is not a number, in every command but `serve`, which dropped or
/// clamped such a value without a word.
#[test]
fn a_bad_tokio_worker_threads_is_an_error_not_a_panic() {
    for value in ["0", "abc", "", "-1", "5000"] {
        let out = Command::new(BIN)
            .args(["check-config", "config/dev.toml"])
            .env("TOKIO_WORKER_THREADS", value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{value:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("TOKIO_WORKER_THREADS") && !err.contains("panicked"),
            "{value:?}: {err}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .env("TOKIO_WORKER_THREADS", "abc")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOKIO_WORKER_THREADS"));
    for value in ["1", " 2 "] {
        let out = Command::new(BIN)
            .args(["check-config", "config/dev.toml"])
            .env("TOKIO_WORKER_THREADS", value)
            .output()
            .unwrap();
        assert!(out.status.success(), "{value:?}: {out:?}");
    }
}

/// An invalid `RUST_LOG` (a misspelled level turns every line off) is ignored with a warning
/// naming it, not silently.
#[test]
fn an_invalid_rust_log_is_a_warning() {
    for value in ["warning", "keygate=loud"] {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", value)
            .env_remove("KEYGATE_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let rx = lines_of(stderr);
        let mut seen = Vec::new();
        let warned = loop {
            match rx.recv_timeout(std::time::Duration::from_secs(20)) {
                Ok(line) if line.contains("RUST_LOG") => break Some(line),
                Ok(line) => seen.push(line),
                Err(_) => break None,
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        let warned = warned.unwrap_or_else(|| panic!("RUST_LOG={value}: no warning in {seen:?}"));
        assert!(
            warned.contains("warning") && warned.contains(value),
            "{warned}"
        );
    }
}

/// A duration past what the clock arithmetic takes is a start-up error naming its key: it used
/// to pass the check and panic a proxy thread on its first connection.
#[test]
fn check_config_refuses_a_duration_of_ages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ages.toml");
    std::fs::write(
        &path,
        "[proxy]\nheader_read_timeout = \"500000000000years\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("proxy.header_read_timeout") && err.contains("10years"),
        "{err}"
    );
}

/// The key commands refuse what they cannot keep (the same rules as the admin API), with an
/// error, not a panic: an expiry past the calendar's end, a rotation grace over 30 days.
#[test]
fn key_commands_refuse_an_expiry_or_grace_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\nkind = \"embedded\"\npath = \"{}\"\n",
            dir.path().join("keys.db").display()
        ),
    )
    .unwrap();
    let keys = |args: &[&str]| {
        Command::new(BIN)
            .args(["keys", "--config"])
            .arg(&path)
            .args(args)
            .output()
            .unwrap()
    };
    let out = keys(&[
        "create",
        "--name",
        "forever",
        "--expires-in",
        "100000000years",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--expires-in: too long"));
    let out = keys(&["create", "--name", "rotated"]);
    assert!(out.status.success(), "{out:?}");
    let note = String::from_utf8_lossy(&out.stderr);
    let id = note.split_whitespace().nth(1).unwrap().to_owned();
    let out = keys(&["rotate", &id, "--grace", "31d"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("at most 30 days"), "{err}");
    assert!(
        err.contains("--grace") && !err.contains("grace_seconds"),
        "{err}"
    );
    let out = keys(&["rotate", &id, "--grace", "30d"]);
    assert!(out.status.success(), "{out:?}");
}

/// The README's key-management commands, as written, on a copy of `config/dev.toml` (the
/// `CFG` they use). The first failed on a scope the file did not define, the user key on a
/// user who was not a member of the team.
#[test]
fn the_readme_key_commands_work_on_the_dev_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("dev.toml");
    std::fs::copy("config/dev.toml", &cfg).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "{args:?}: {stdout}{stderr}");
        stdout + &stderr
    };
    let cfg = cfg.to_str().unwrap();
    let readme = std::fs::read_to_string("README.md").unwrap();
    let created = run(&[
        "keys",
        "--config",
        cfg,
        "create",
        "--team",
        "acme",
        "--name",
        "CI deploys",
        "--scopes",
        "orders:read,orders:write",
        "--allow-ip",
        "203.0.113.0/24",
        "--allow-ip",
        "2001:db8::/32",
        "--expires-in",
        "90d",
    ]);
    assert!(readme.contains("--scopes orders:read,orders:write"));
    let id = created
        .split_whitespace()
        .find(|w| w.starts_with("apk_"))
        .expect("the new key's id")
        .to_owned();
    assert!(readme.contains("keygate teams --config $CFG add-member acme u-42"));
    let added = run(&["teams", "--config", cfg, "add-member", "acme", "u-42"]);
    // The role as `--role` and the admin API spell it.
    assert!(added.contains("u-42 is member of acme"), "{added}");
    run(&[
        "keys", "--config", cfg, "create", "--team", "acme", "--type", "user", "--user", "u-42",
    ]);
    assert!(run(&["keys", "--config", cfg, "list", "--team", "acme"]).contains(&id));
    run(&["keys", "--config", cfg, "disable", &id]);
    run(&["keys", "--config", cfg, "enable", &id]);
    run(&["keys", "--config", cfg, "rotate", &id, "--grace", "1h"]);
    run(&["keys", "--config", cfg, "revoke", &id]);
}

#[test]
fn serve_without_routes_explains_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dev"));
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_mode_prints_a_working_key_and_curl_line() {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let rx = lines_of(stdout);
    let mut addr = None;
    let mut key = None;
    while key.is_none() {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("dev mode output");
        if let Some(a) = line.strip_prefix("keygate: proxy listening on http://") {
            addr = Some(a.trim().to_owned());
        }
        if let Some(k) = line.trim().strip_prefix("API key:") {
            key = k.split_whitespace().next().map(str::to_owned);
        }
    }
    let mut admin = None;
    while admin.is_none() {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("dev mode admin line");
        if let Some(rest) = line.trim().strip_prefix("admin API: http://") {
            let mut parts = rest.split_whitespace();
            let admin_addr = parts.next().unwrap().to_owned();
            let token = parts.last().unwrap().to_owned();
            admin = Some((admin_addr, token));
        }
    }
    let (admin_addr, token) = admin.unwrap();
    let r = client()
        .get(format!("http://{admin_addr}/v1/keys"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listed: serde_json::Value = r.json().await.unwrap();
    assert_eq!(listed["meta"]["total"], 1);
    let (addr, key) = (addr.unwrap(), key.unwrap());
    let ok = client()
        .get(format!("http://{addr}/hello"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let no = client()
        .get(format!("http://{addr}/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(no.status(), 401);
    let _ = child.kill();
    let _ = child.wait();
    let _ = spawn_and_read_addr; // shared helper, used by other tests
}

/// Review: `serve --dev` printed the bootstrap token from the environment, an operator's
/// secret, on stdout. It prints the variable's name instead; a token it made itself it shows.
#[test]
fn dev_mode_does_not_print_a_token_from_the_environment() {
    const TOKEN: &str = "my-real-production-admin-token-1234";
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("KEYGATE_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let rx = lines_of(stdout);
    let mut seen = Vec::new();
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(30)) {
        let done = line.contains("admin API:");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = seen.join("\n");
    assert!(
        text.contains("bootstrap token: $KEYGATE_ADMIN_TOKEN"),
        "{text}"
    );
    assert!(!text.contains(TOKEN), "{text}");
}

/// The lines `out` (a child's stdout or stderr) writes, as they come, read by a thread of
/// their own so the child never blocks on a full pipe.
fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `check-config` on `toml` (written to a file) with `env` set and `KEYGATE_ADMIN_TOKEN` unset
/// unless `env` sets it.
fn check_config_text(toml: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config")
        .arg(&path)
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

const ONE_ROUTE: &str = "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
    [upstreams.api]\nurl = \"http://127.0.0.1:9\"\n\
    [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"api\"\n";

/// Review: `check-config` said ok to what `serve` then refused: no routes, and a bootstrap
/// token no request can present (too short, a placeholder, a trailing newline).
#[test]
fn check_config_refuses_what_serve_refuses() {
    let token = "a-bootstrap-token-of-enough-length";
    let out = check_config_text(ONE_ROUTE, &[("KEYGATE_ADMIN_TOKEN", token)]);
    assert!(out.status.success(), "{out:?}");
    let no_routes = "[proxy]\nlisten = \"127.0.0.1:0\"\n";
    let out = check_config_text(no_routes, &[]);
    assert!(!out.status.success(), "no routes accepted: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no routes"),
        "{out:?}"
    );
    for bad in [
        "short".to_owned(),
        format!("{token}\n"),
        format!("replace-me-{token}"),
    ] {
        let out = check_config_text(ONE_ROUTE, &[("KEYGATE_ADMIN_TOKEN", &bad)]);
        assert!(!out.status.success(), "{bad:?} accepted: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("KEYGATE_ADMIN_TOKEN"), "{err}");
        assert!(!err.contains(token), "the token is printed: {err}");
    }
}

/// Review: two routes of one prefix, host and methods passed; the second never matched, so an
/// unauthenticated request reached the upstream its scopes were to guard.
#[test]
fn check_config_refuses_a_route_that_can_never_match() {
    let toml = format!(
        "{ONE_ROUTE}[[routes]]\nname = \"open\"\npath_prefix = \"/admin\"\nupstream = \"api\"\n\
         public = true\n[[routes]]\nname = \"locked\"\npath_prefix = \"/admin\"\n\
         upstream = \"api\"\nscopes = [\"admin\"]\n"
    );
    let out = check_config_text(&toml, &[]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes[2]") && err.contains("\"locked\"") && err.contains("\"open\""),
        "{err}"
    );
}

/// Review: settings that passed and then broke serving: an upstream port out of range (its
/// traffic went to port 80), a cluster node with a database (503 for ever), an empty
/// `log.level` (no access log), a key header keygate strips, a bootstrap variable no variable
/// can be.
#[test]
fn check_config_refuses_settings_that_cannot_work() {
    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: [(String, Env, &str); 6] = [
        (
            ONE_ROUTE.replace("127.0.0.1:9", "127.0.0.1:80800"),
            &[],
            "upstreams.api.url",
        ),
        (
            ONE_ROUTE.replace("127.0.0.1:9", ":8080"),
            &[],
            "upstreams.api.url",
        ),
        (
            format!(
                "{ONE_ROUTE}[store]\nkind = \"redis\"\n\
                 redis_cluster_nodes = [\"redis://127.0.0.1:27379/3\"]\n"
            ),
            &[],
            "only database 0",
        ),
        (
            ONE_ROUTE.to_owned(),
            &[("KEYGATE__LOG__LEVEL", "")],
            "log.level",
        ),
        (
            format!("{ONE_ROUTE}[auth]\nheader_name = \"x-keygate-key-id\"\n"),
            &[],
            "auth.header_name",
        ),
        (
            ONE_ROUTE.replace("[admin]\n", "[admin]\nbootstrap_token_env = \"A=B\"\n"),
            &[],
            "admin.bootstrap_token_env",
        ),
    ];
    for (toml, env, expected) in cases {
        let out = check_config_text(&toml, env);
        assert!(!out.status.success(), "accepted: {toml} {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{expected} not in {err}");
    }
}

/// A bootstrap variable that is not set is said (serving goes on: admin keys still work).
#[test]
fn an_unset_bootstrap_variable_is_a_warning() {
    let out = check_config_text(ONE_ROUTE, &[]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("KEYGATE_ADMIN_TOKEN"),
        "{err}"
    );
}

/// Review: `RUST_LOG=` (set, empty) turned off every line below error, the access log's too.
/// It is taken as unset: `log.level` applies.
#[test]
fn an_empty_rust_log_is_as_if_unset() {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "")
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .env_remove("KEYGATE__LOG__LEVEL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    let info = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(line) if line.contains("INFO") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(info, "no info line with RUST_LOG empty: {seen:?}");
    assert!(!seen.iter().any(|l| l.contains("RUST_LOG")), "{seen:?}");
}

/// Review: `--listen`/`--admin-listen` were applied after the clash check (a clash failed at
/// bind), an IPv4-mapped address did not clash with its IPv4 one, and `--admin-listen` with
/// the admin API disabled was ignored.
#[test]
fn listen_flags_are_checked_as_the_file_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(&path, ONE_ROUTE).unwrap();
    let serve = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(&path)
            .args(args)
            .env_remove("KEYGATE_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env("KEYGATE__STORE__PATH", dir.path().join("k.db"));
        let mut child = cmd.spawn().unwrap();
        let rx = lines_of(child.stderr.take().unwrap());
        // The old gateway served on: it is stopped after a while, and fails the test.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break child.wait().unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let err: Vec<String> = rx.iter().collect();
        (status, err.join("\n"))
    };
    // A port nothing may listen on without privileges: refused before any bind is tried.
    for (proxy, admin) in [
        ("127.0.0.1:1", "127.0.0.1:1"),
        ("[::ffff:127.0.0.1]:1", "127.0.0.1:1"),
    ] {
        let (status, err) = serve(&["--listen", proxy, "--admin-listen", admin], &[]);
        assert!(!status.success());
        assert!(
            err.contains("clashes") && err.contains("--admin-listen") && err.contains("--listen"),
            "{proxy} {admin}: {err}"
        );
    }
    let (status, err) = serve(
        &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        &[("KEYGATE__ADMIN__ENABLED", "false")],
    );
    assert!(!status.success());
    assert!(
        err.contains("--admin-listen") && err.contains("disabled"),
        "{err}"
    );
}

/// Review: "proxy listening" was printed before the admin port was bound, so a tool reading it
/// took a gateway that then failed to start for up.
#[test]
fn no_listening_line_before_both_ports_are_bound() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(
        &path,
        ONE_ROUTE.replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .env("KEYGATE__STORE__PATH", dir.path().join("k.db"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin.listen"),
        "{out:?}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "{out:?}"
    );
    drop(taken);
}

/// Review: every command panicked (exit 101, a backtrace) when its stdout was a pipe no one
/// reads (`keygate check-config f.toml | true`). It ends quietly.
#[test]
fn a_closed_stdout_is_no_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(["check-config", "config/dev.toml"])
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // Review: a key shown only once, to a reader that went away, was lost with exit 0.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\nkind = \"embedded\"\npath = \"{}\"\n",
            dir.path().join("keys.db").display()
        ),
    )
    .unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .args(["keys", "--config"])
        .arg(&path)
        .args(["create", "--name", "piped"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("rotate the key"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `trusted_proxies` that take in every address let any client choose its own with
/// `X-Forwarded-For`, past every IP rule: serving goes on, with a warning naming it.
#[test]
fn trusting_every_address_as_a_proxy_is_a_warning() {
    let with = |proxies: &str| {
        ONE_ROUTE.replacen(
            "[proxy]\n",
            &format!("[proxy]\ntrusted_proxies = [{proxies}]\n"),
            1,
        )
    };
    for (list, all) in [
        ("\"10.0.0.0/8\", \"0.0.0.0/0\"", "0.0.0.0/0"),
        ("\"::/0\"", "::/0"),
        ("\"0.0.0.0/1\", \"128.0.0.0/1\"", "0.0.0.0/0"),
        ("\"::/1\", \"8000::/1\"", "::/0"),
    ] {
        let out = check_config_text(&with(list), &[]);
        assert!(out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("warning") && err.contains("proxy.trusted_proxies") && err.contains(all),
            "{err}"
        );
    }
    let out = check_config_text(&with("\"10.0.0.0/8\""), &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("trusted_proxies"),
        "{out:?}"
    );
}
