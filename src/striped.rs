//! A counter that many threads add to without sharing a cache line: each thread adds to its
//! own stripe and a read sums them. For counts bumped on every request (cache hits, negative
//! hits) and read only by a scrape; one shared atomic moved its line between cores on every
//! request once the proxy ran on several threads.

use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Proxy threads beyond this many share stripes (still far fewer writers per line).
const STRIPES: usize = 32;

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's stripe, handed out round-robin as threads first count.
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

pub struct StripedCounter {
    stripes: Box<[CachePadded<AtomicU64>; STRIPES]>,
}

impl Default for StripedCounter {
    fn default() -> Self {
        Self {
            stripes: Box::new(std::array::from_fn(|_| CachePadded::new(AtomicU64::new(0)))),
        }
    }
}

impl std::fmt::Debug for StripedCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StripedCounter").field(&self.get()).finish()
    }
}

impl StripedCounter {
    pub fn add(&self, n: u64) {
        let stripe = STRIPE.with(|s| *s);
        self.stripes[stripe].fetch_add(n, Ordering::Relaxed);
    }

    /// The sum of every thread's additions so far.
    pub fn get(&self) -> u64 {
        self.stripes
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_every_addition_from_every_thread() {
        let c = Arc::new(StripedCounter::default());
        let threads: Vec<_> = (0..40)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.add(1);
                    }
                    c.add(i);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.get(), 40 * 1000 + (0..40).sum::<u64>());
    }

    #[test]
    fn threads_count_on_different_lines() {
        let c = StripedCounter::default();
        c.add(1);
        std::thread::scope(|s| {
            s.spawn(|| c.add(1));
        });
        let used = c.stripes.iter().filter(|s| s.load(Ordering::Relaxed) > 0);
        assert_eq!(used.count(), 2);
    }
}
