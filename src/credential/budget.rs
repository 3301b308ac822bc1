//! The process-wide bound on the body bytes that key peeks hold (`proxy.max_peek_total_bytes`).
//!
//! `max_peek_bytes` bounds one peek and `max_concurrent_streams` the peeks of one connection,
//! but connections are many: without this, `max_connections` × `max_concurrent_streams` ×
//! `max_peek_bytes` could be held at once. Every peek charges the bytes it keeps to one shared
//! [`PeekBudget`] through a [`Charge`], and a charge that would take the budget past its limit is
//! refused at once (the request gets 503 `GATEWAY_BUSY`): waiting would let a client that holds
//! the budget with slow uploads stall everyone else's requests as well. A [`Charge`] gives its
//! bytes back as the replay hands them upstream, and whatever is left when it is dropped: after
//! the forward, on any error, or when the request's future is dropped because the client went
//! away. A request whose key is found in a header the route reads before any body source never
//! peeks, and never touches the budget.

use prometheus::IntGauge;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The shared count of bytes held by peeks, and its limit.
#[derive(Debug)]
pub struct PeekBudget {
    limit: usize,
    held: AtomicUsize,
    /// `keygate_peek_held_bytes`, kept equal to `held`.
    gauge: Option<IntGauge>,
}

/// A charge did not fit in what is left of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the body peek budget is exhausted")]
pub struct Exhausted;

impl PeekBudget {
    /// `gauge`, when given, follows the bytes held.
    pub fn new(limit: usize, gauge: Option<IntGauge>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: AtomicUsize::new(0),
            gauge,
        })
    }

    /// No bound (tests, tools).
    pub fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX, None)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes if they fit; all or nothing.
    fn take(&self, n: usize) -> Result<(), Exhausted> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&total| total <= self.limit)
            })
            .map_err(|_| Exhausted)?;
        if let Some(g) = &self.gauge {
            g.add(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Ok(())
    }

    fn give_back(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.held.fetch_sub(n, Ordering::AcqRel);
        if let Some(g) = &self.gauge {
            g.sub(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// The bytes one peek (and then its replay) holds against the budget; given back when
/// dropped, whatever the path.
#[derive(Debug, Default)]
pub struct Charge {
    /// `None`: nothing was read, nothing is charged.
    budget: Option<Arc<PeekBudget>>,
    bytes: usize,
}

impl Charge {
    pub fn new(budget: &Arc<PeekBudget>) -> Self {
        Self {
            budget: Some(budget.clone()),
            bytes: 0,
        }
    }

    /// Another charge against the same budget (a transient copy of the bytes).
    pub fn sibling(&self) -> Self {
        Self {
            budget: self.budget.clone(),
            bytes: 0,
        }
    }

    /// Charges `n` more bytes, or nothing when they do not fit.
    pub fn add(&mut self, n: usize) -> Result<(), Exhausted> {
        if let Some(b) = &self.budget {
            b.take(n)?;
            self.bytes += n;
        }
        Ok(())
    }

    /// Gives back up to `n` of the bytes charged.
    pub fn release(&mut self, n: usize) {
        let n = n.min(self.bytes);
        if let Some(b) = &self.budget {
            b.give_back(n);
        }
        self.bytes -= n;
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_add_up_and_are_given_back() {
        let budget = PeekBudget::new(100, None);
        let mut a = Charge::new(&budget);
        a.add(30).unwrap();
        a.add(20).unwrap();
        assert_eq!((a.bytes(), budget.held()), (50, 50));
        a.release(10);
        assert_eq!((a.bytes(), budget.held()), (40, 40));
        // Never more than was charged.
        a.release(1000);
        assert_eq!((a.bytes(), budget.held()), (0, 0));
    }

    #[test]
    fn a_charge_that_does_not_fit_is_refused_whole_and_takes_nothing() {
        let budget = PeekBudget::new(100, None);
        let mut a = Charge::new(&budget);
        let mut b = Charge::new(&budget);
        a.add(60).unwrap();
        assert_eq!(b.add(41), Err(Exhausted));
        assert_eq!((b.bytes(), budget.held()), (0, 60));
        // Exactly the limit fits.
        b.add(40).unwrap();
        assert_eq!(budget.held(), 100);
        assert_eq!(b.add(1), Err(Exhausted));
        drop(a);
        b.add(1).unwrap();
        assert_eq!(budget.held(), 41);
    }

    #[test]
    fn dropping_a_charge_gives_back_all_it_holds() {
        let gauge = IntGauge::new("peek_held_test", "test").unwrap();
        let budget = PeekBudget::new(1000, Some(gauge.clone()));
        {
            let mut a = Charge::new(&budget);
            a.add(300).unwrap();
            let mut copy = a.sibling();
            copy.add(200).unwrap();
            assert_eq!((budget.held(), gauge.get()), (500, 500));
            drop(copy);
            assert_eq!((budget.held(), gauge.get()), (300, 300));
        }
        assert_eq!((budget.held(), gauge.get()), (0, 0));
    }

    #[test]
    fn a_charge_without_a_budget_holds_nothing() {
        let mut none = Charge::default();
        none.add(usize::MAX).unwrap();
        assert_eq!(none.bytes(), 0);
        let unlimited = PeekBudget::unlimited();
        let mut c = Charge::new(&unlimited);
        c.add(usize::MAX / 2).unwrap();
        assert!(c.add(usize::MAX).is_err(), "no overflow");
    }

    #[test]
    fn concurrent_charges_never_exceed_the_limit() {
        let budget = PeekBudget::new(10_000, None);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..1000 {
                        let mut c = Charge::new(&budget);
                        if c.add(7).is_ok() {
                            assert!(budget.held() <= 10_000);
                            held.push(c);
                        }
                        if held.len() > 500 {
                            held.clear();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(budget.held(), 0);
    }
}
