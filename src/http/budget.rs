//! The in-flight body budget (`http.max_inflight_bytes`): request bodies being read or handled hold
//! their buffers here, so what the daemon buffers is bounded by configuration, not by how many clients
//! upload at once. Bytes are taken as they arrive, never on a client's word (`Content-Length`): a
//! request that finds the budget spent, or whose next chunk does not fit, is refused (503).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

/// Bytes of request bodies held across all requests, at most `limit`, mirrored in `gauge`.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    limit: usize,
    held: AtomicUsize,
    gauge: IntGauge,
}

impl BodyBudget {
    pub(crate) fn new(limit: usize, gauge: IntGauge) -> Arc<Self> {
        Arc::new(BodyBudget { limit, held: AtomicUsize::new(0), gauge })
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes `bytes` from the budget, or `None` when they do not fit. A request that takes nothing up
    /// front (every request: bodies take their bytes as they arrive) still needs the budget not to be
    /// spent.
    pub(crate) fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        self.try_take(bytes, bytes == 0)?;
        Some(Reservation { budget: Arc::clone(self), bytes })
    }

    /// Adds `bytes` to `held` if the result stays within the limit (strictly below it when `strict`).
    fn try_take(&self, bytes: usize, strict: bool) -> Option<()> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                let after = held.checked_add(bytes)?;
                let fits = if strict { after < self.limit } else { after <= self.limit };
                fits.then_some(after)
            })
            .ok()?;
        self.gauge.add(i64::try_from(bytes).unwrap_or(i64::MAX));
        Some(())
    }
}

/// Bytes one request holds; given back when it is dropped, which is also what happens when the
/// client goes away and hyper drops the handler.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Reservation {
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Grows the reservation to `total` bytes; `false` (nothing taken) when the budget cannot cover it.
    pub(crate) fn try_grow_to(&mut self, total: usize) -> bool {
        let Some(more) = total.checked_sub(self.bytes) else { return true };
        if more == 0 {
            return true;
        }
        if self.budget.try_take(more, false).is_none() {
            return false;
        }
        self.bytes = total;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.gauge.sub(i64::try_from(self.bytes).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_given_back_on_drop() {
        let gauge = IntGauge::new("held", "held").expect("valid gauge");
        let budget = BodyBudget::new(10, gauge.clone());
        let a = budget.try_reserve(6).expect("fits");
        assert!(budget.try_reserve(5).is_none(), "6 + 5 > 10");
        let mut b = budget.try_reserve(0).expect("budget not spent");
        assert!(b.try_grow_to(4));
        assert_eq!(budget.held(), 10);
        assert_eq!(gauge.get(), 10);
        assert!(budget.try_reserve(0).is_none(), "a spent budget refuses even a request that takes nothing yet");
        assert!(!b.try_grow_to(5), "growing past the limit fails");
        assert_eq!(b.bytes(), 4, "and takes nothing");
        drop(a);
        assert!(b.try_grow_to(10));
        drop(b);
        assert_eq!((budget.held(), gauge.get()), (0, 0));
    }
}
