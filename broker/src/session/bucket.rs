//! A token bucket: `rate` tokens a second, at most `burst` saved up.

use std::time::Instant;

/// A token bucket.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    /// Takes one token if there is one at `now` (never earlier than the last call's).
    pub(crate) fn take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the bucket was last looked at.
    #[cfg(test)]
    pub(crate) fn last(&self) -> Instant {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let mut b = TokenBucket::new(10.0, 5.0);
        let start = b.last();
        assert_eq!((0..20).filter(|_| b.take_at(start)).count(), 5);
        // 300 ms at 10 a second: three more, exactly.
        let later = start + Duration::from_millis(300);
        assert_eq!((0..20).filter(|_| b.take_at(later)).count(), 3);
        // Never more than the burst, however long it was idle.
        let much_later = later + Duration::from_secs(3600);
        assert_eq!((0..20).filter(|_| b.take_at(much_later)).count(), 5);
        // A clock read out of order takes nothing back.
        assert!(!b.take_at(start));
    }
}
