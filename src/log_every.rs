//! Log lines that a flood of failures could repeat thousands of times a second (a store or an
//! upstream down under load), spaced out: at most one per interval, each saying how many were
//! left out since the one before (`unlogged`). Two atomics, no lock; the metrics count every
//! failure whatever the log shows.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One line at most every interval, for one source of lines (a store, an upstream).
#[derive(Debug, Default)]
pub struct LogEvery {
    /// Milliseconds on the caller's clock when the last line went out, plus one (0: none yet).
    last_ms: AtomicI64,
    left_out: AtomicU64,
}

impl LogEvery {
    /// `Some(lines left out since the last)` when a line is due at `now_ms` (milliseconds on
    /// a clock of the caller's, never below 0); `None` counts this one as left out.
    pub fn due(&self, now_ms: i64, every: Duration) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        let every = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
        let due = last == 0 || now_ms.saturating_add(1).saturating_sub(last) >= every;
        // Of callers that find a line due at the same moment, one writes it.
        if due
            && self
                .last_ms
                .compare_exchange(
                    last,
                    now_ms.saturating_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.left_out.swap(0, Ordering::Relaxed));
        }
        self.left_out.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// [`LogEvery::due`] on the process's monotonic clock.
    pub fn due_now(&self, every: Duration) -> Option<u64> {
        self.due(process_ms(), every)
    }
}

/// Milliseconds since the first call in this process.
fn process_ms() -> i64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    i64::try_from(epoch.elapsed().as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn one_line_a_second_with_the_count_left_out() {
        let log = LogEvery::default();
        assert_eq!(log.due(0, SECOND), Some(0));
        assert_eq!(log.due(10, SECOND), None);
        assert_eq!(log.due(999, SECOND), None);
        assert_eq!(log.due(1000, SECOND), Some(2));
        assert_eq!(log.due(1500, SECOND), None);
        assert_eq!(log.due(2000, SECOND), Some(1));
        // A quiet spell: the next failure is logged at once, with nothing left out.
        assert_eq!(log.due(60_000, SECOND), Some(0));
    }

    #[test]
    fn the_interval_is_the_callers() {
        let log = LogEvery::default();
        assert_eq!(log.due(5, Duration::from_millis(100)), Some(0));
        assert_eq!(log.due(104, Duration::from_millis(100)), None);
        assert_eq!(log.due(105, Duration::from_millis(100)), Some(1));
    }

    #[test]
    fn the_process_clock_logs_the_first_and_leaves_out_a_burst() {
        let log = LogEvery::default();
        assert_eq!(log.due_now(Duration::from_secs(3600)), Some(0));
        for _ in 0..100 {
            assert_eq!(log.due_now(Duration::from_secs(3600)), None);
        }
        assert_eq!(log.due(i64::MAX - 1, Duration::from_secs(3600)), Some(100));
    }

    #[test]
    fn many_threads_at_once_write_one_line_and_count_the_rest() {
        let log = std::sync::Arc::new(LogEvery::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| log.due(0, SECOND).is_some()).count()
                })
            })
            .collect();
        let written: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(written, 1);
        assert_eq!(log.due(1000, SECOND), Some(3999));
    }
}
