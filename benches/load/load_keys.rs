//! Bulk-loads valid keygate keys into Redis for the load harness (`benches/load/run.sh`).
//!
//! Uses the library itself (`NewKey::generate`, `new_key_id`, `RedisStore::create`), so the records are
//! exactly what `keygate keys create` would write, whatever the layout becomes; many tasks share
//! the store's multiplexed connection, so the creates are pipelined. Prints nothing but a summary
//! on stderr; the plaintext keys go to `--out`, one per line, in creation order.
//!
//! ```sh
//! cargo run --release --example load_keys -- --redis redis://127.0.0.1:18601 \
//!     --namespace kg --count 100000 --team bench --out /tmp/keys.txt
//! ```

use chrono::Utc;
use keygate::auth::key::{KeyPrefix, NewKey, SlotTag, new_key_id};
use keygate::auth::record::{KeyRecord, KeyType};
use keygate::store::KeyStore;
use keygate::store::redis::RedisStore;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    redis: String,
    namespace: String,
    prefix: String,
    count: usize,
    concurrency: usize,
    team: Option<String>,
    scopes: Vec<String>,
    out: String,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        redis: "redis://127.0.0.1:6379".into(),
        namespace: "kg".into(),
        prefix: "kg".into(),
        count: 1000,
        concurrency: 128,
        team: None,
        scopes: Vec::new(),
        out: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--redis" => a.redis = value()?,
            "--namespace" => a.namespace = value()?,
            "--prefix" => a.prefix = value()?,
            "--count" => a.count = value()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--concurrency" => {
                a.concurrency = value()?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?
            }
            "--team" => a.team = Some(value()?),
            "--scopes" => {
                a.scopes = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            "--out" => a.out = value()?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.out.is_empty() {
        return Err("--out FILE is required".into());
    }
    Ok(a)
}

fn record(key: &NewKey, tag: SlotTag, n: usize, args: &Args) -> KeyRecord {
    let mut r = KeyRecord::new(
        new_key_id(tag),
        format!("bench key {n}"),
        KeyType::Shared,
        key.key_start(),
        Utc::now(),
    );
    r.team_id = args.team.clone();
    r.created_by = Some("bench".into());
    r.scope_names = args.scopes.clone();
    r
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("load_keys: {e}");
            std::process::exit(2);
        }
    };
    let prefix = match KeyPrefix::new(&args.prefix) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("load_keys: --prefix: {e}");
            std::process::exit(2);
        }
    };
    let store =
        match RedisStore::connect(&args.redis, &args.namespace, Duration::from_secs(30)).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                eprintln!("load_keys: {e}");
                std::process::exit(1);
            }
        };
    let started = Instant::now();
    let workers = args.concurrency.clamp(1, args.count.max(1));
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let (store, args, prefix) = (store.clone(), args.clone(), prefix.clone());
        // Worker w makes keys w, w + workers, w + 2·workers, …
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            let mut n = w;
            while n < args.count {
                // As `keys create` does: a team's keys carry the team's slot tag, others a random one.
                let tag = args
                    .team
                    .as_deref()
                    .map_or_else(SlotTag::random, SlotTag::for_team);
                let key = NewKey::generate(&prefix, tag);
                let rec = record(&key, tag, n, &args);
                store
                    .create(&rec, &key.hash(), None)
                    .await
                    .map_err(|e| format!("create #{n}: {e}"))?;
                made.push((n, key.expose().to_owned()));
                n += workers;
            }
            Ok::<_, String>(made)
        }));
    }
    let mut keys = vec![String::new(); args.count];
    for t in tasks {
        match t.await {
            Ok(Ok(made)) => {
                for (n, k) in made {
                    keys[n] = k;
                }
            }
            Ok(Err(e)) => {
                eprintln!("load_keys: {e}");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("load_keys: worker failed: {e}");
                std::process::exit(1);
            }
        }
    }
    let elapsed = started.elapsed();
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
        for k in &keys {
            writeln!(f, "{k}")?;
        }
        f.flush()
    };
    if let Err(e) = write() {
        eprintln!("load_keys: writing {}: {e}", args.out);
        std::process::exit(1);
    }
    eprintln!(
        "load_keys: {} keys in {:.1} s ({:.0}/s) -> {}",
        args.count,
        elapsed.as_secs_f64(),
        args.count as f64 / elapsed.as_secs_f64().max(1e-9),
        args.out
    );
}
