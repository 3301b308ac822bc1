//! Logging set-up. Logs go to stderr (stdout carries the start-up lines tools read); the
//! filter comes from `log.level`, or `RUST_LOG` when set and not empty. Access lines use the target
//! `keygate::access`, so they can be turned off alone (`info,keygate::access=off`).
//!
//! Lines are formatted on the thread that logs them and written by a thread of their own:
//! a write to stderr is a system call per line, which on the request path made the access
//! line cost ~5.4 µs of a 28.5 µs request (docs/benchmarks.md, "Evening"). The writer thread
//! drains every queued line into one buffer and writes it with one call. The queue is
//! lossless: when it is full, the logging thread waits for room rather than drop a line.

use crate::config::{LogConfig, LogFormat};
use std::io::{BufWriter, IsTerminal};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines that may wait for the writer before a logging thread is held up: ~0.4 s of access
/// lines at 40 000 requests/s. The queue's slots are allocated and written at start, so the
/// crate's default (128 000) kept 4.1 MB resident in an idle process (heaptrack; idle RSS of
/// `serve --dev` 25.3 MB, 19.7 MB with this).
const QUEUED_LINES: usize = 16_384;

/// Installs the global subscriber. The guard flushes the queued lines when dropped: keep it
/// until the process is done logging. A second call (tests) keeps the first subscriber.
pub fn init_logging(cfg: &LogConfig) -> WorkerGuard {
    let filter = rust_log(&cfg.level)
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&cfg.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("keygate-log")
        // The worker appends every line it finds queued, and flushes once the queue is empty:
        // a burst of lines is one write.
        .finish(BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal: escape codes in a file, journald or
        // `kubectl logs` make lines harder to read and to search.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}

/// For the `keys` and `teams` commands: warnings and errors on stderr, beside what the command
/// prints. Without it a change made but not audited (its audit event refused by the store)
/// said so nowhere, and the command still succeeded. `RUST_LOG` may ask for more.
pub fn init_cli_logging() {
    let filter = rust_log("warn")
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// `RUST_LOG`, checked as `log.level` is (`config::log_filter`). One that does not pass is not
/// fatal, but said on stderr, before any log line: it used to be ignored without a word, so
/// an operator who set it wondered why the logs did not change.
fn rust_log(level: &str) -> Option<String> {
    let reason = match std::env::var("RUST_LOG") {
        Err(std::env::VarError::NotPresent) => return None,
        // Set but empty (`RUST_LOG=` in a unit file or a manifest): as if unset. Taken as a
        // filter it turned off every line below error, the access log's included.
        Ok(value) if value.trim().is_empty() => return None,
        Err(std::env::VarError::NotUnicode(_)) => "not valid UTF-8".to_owned(),
        Ok(value) => match crate::config::log_filter(&value) {
            Ok(filter) => return Some(filter),
            Err(reason) => format!("{value:?}: {reason}"),
        },
    };
    eprintln!("keygate: warning: RUST_LOG ignored, log.level ({level:?}) applies: {reason}");
    None
}
