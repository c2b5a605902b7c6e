//! When the agent checks next. After a good check: a random moment in the check interval (so a
//! fleet spreads out). After a failed one — scheduled, pushed or asked for, or one that answered
//! but could not act on an offer (a download refused by a busy provider, say) — soon: 2 s
//! doubling, jittered by up to half, never later than the interval, so a push that met a busy
//! provider is not left for the next scheduled check. Pure: the loop feeds it outcomes and a
//! random source, and the tests feed it both.
use std::time::Duration;

/// A random pick in `0..=n`.
pub type Pick<'a> = &'a mut dyn FnMut(u64) -> u64;

/// A moment anywhere in `[min, max]`.
pub fn interval(min: Duration, max: Duration, pick: Pick) -> Duration {
    let span = max.saturating_sub(min).as_millis() as u64;
    min + Duration::from_millis(if span == 0 { 0 } else { pick(span) })
}

/// The retry state between checks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Schedule {
    failures: u32,
}

impl Schedule {
    /// Whether the last check failed (then every check, not only scheduled ones, reschedules).
    pub fn failing(&self) -> bool {
        self.failures > 0
    }

    /// The delay until the next check after one that went `ok` (or not); `normal` is a pick
    /// from the interval.
    pub fn after(&mut self, ok: bool, normal: Duration, pick: Pick) -> Duration {
        self.failures = if ok { 0 } else { self.failures.saturating_add(1) };
        if ok {
            return normal;
        }
        let base = Duration::from_secs(2u64.saturating_pow(self.failures.min(10)));
        (base + Duration::from_millis(pick(base.as_millis() as u64 / 2))).min(normal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_retry_soon_doubling_and_a_success_returns_to_the_interval() {
        let normal = Duration::from_secs(1800);
        let mut s = Schedule::default();
        let mut none = |_: u64| 0;
        let delays: Vec<u64> = (0..12).map(|_| s.after(false, normal, &mut none).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1024, 1024]);
        assert!(s.failing());
        assert_eq!(s.after(true, normal, &mut none), normal);
        assert!(!s.failing());
        // Never later than the interval, jitter included.
        let short = Duration::from_secs(10);
        let mut most = |n: u64| n;
        let d: Vec<u64> = (0..4).map(|_| s.after(false, short, &mut most).as_millis() as u64).collect();
        assert_eq!(d, [3000, 6000, 10_000, 10_000]);
    }

    #[test]
    fn the_interval_is_a_pick_within_its_bounds() {
        let (min, max) = (Duration::from_secs(30), Duration::from_secs(60));
        assert_eq!(interval(min, max, &mut |_| 0), min);
        assert_eq!(interval(min, max, &mut |n| n), max);
        assert_eq!(interval(max, max, &mut |_| unreachable!("no span, no pick")), max);
    }
}
