//! Log lines that a client can cause are throttled: a burst, then a steady trickle, and the
//! next line written says how many were left out. A flood of bad connections or refused calls
//! then costs the log a few lines a second, not one per attempt.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// A token bucket for log lines.
#[derive(Debug)]
pub(crate) struct Throttle {
    state: Mutex<State>,
    burst: u32,
    every: Duration,
}

#[derive(Debug)]
struct State {
    tokens: u32,
    refilled: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `burst` lines at once, then one line per `every`.
    pub(crate) const fn new(burst: u32, every: Duration) -> Throttle {
        Throttle {
            state: Mutex::new(State {
                tokens: burst,
                refilled: None,
                suppressed: 0,
            }),
            burst,
            every,
        }
    }

    /// `Some(n)` when a line may be written now, `n` being the lines left out since the last
    /// one written; `None` when this line is to be left out (and counted).
    pub(crate) fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let since = *state.refilled.get_or_insert(now);
        let periods = now.saturating_duration_since(since).as_nanos() / self.every.as_nanos().max(1);
        if periods > 0 {
            let periods = u32::try_from(periods).unwrap_or(u32::MAX);
            state.tokens = state.tokens.saturating_add(periods).min(self.burst);
            state.refilled = Some(now);
        }
        if state.tokens == 0 {
            state.suppressed += 1;
            return None;
        }
        state.tokens -= 1;
        Some(std::mem::take(&mut state.suppressed))
    }
}

/// Logs at info level through `throttle`: `$($field)*` and the message, plus how many such lines
/// were left out before this one.
macro_rules! throttled_info {
    ($throttle:expr, $($rest:tt)*) => {
        if let Some(suppressed) = $throttle.admit() {
            tracing::info!(suppressed, $($rest)*);
        }
    };
}
pub(crate) use throttled_info;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_a_burst_through_then_counts_what_it_leaves_out() {
        let t = Throttle::new(3, Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(t.admit_at(start), Some(0));
        assert_eq!(t.admit_at(start), Some(0));
        assert_eq!(t.admit_at(start), Some(0));
        for _ in 0..100 {
            assert_eq!(t.admit_at(start), None);
        }
        // One period later, one line, which reports the hundred left out.
        assert_eq!(t.admit_at(start + Duration::from_secs(1)), Some(100));
        assert_eq!(t.admit_at(start + Duration::from_secs(1)), None);
        assert_eq!(t.admit_at(start + Duration::from_secs(2)), Some(1));
    }

    #[test]
    fn throttle_refills_no_more_than_its_burst() {
        let t = Throttle::new(2, Duration::from_millis(10));
        let start = Instant::now();
        let later = start + Duration::from_secs(3600);
        assert_eq!(t.admit_at(start), Some(0));
        assert_eq!(t.admit_at(later), Some(0));
        assert_eq!(t.admit_at(later), Some(0));
        assert_eq!(t.admit_at(later), None);
    }
}
