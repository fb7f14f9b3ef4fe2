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
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    #[cfg(test)]
    pub(crate) fn rewind(&mut self, by: std::time::Duration) {
        self.last -= by;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let mut b = TokenBucket::new(10.0, 5.0);
        assert_eq!((0..20).filter(|_| b.take()).count(), 5);
        b.rewind(std::time::Duration::from_millis(300));
        assert_eq!((0..20).filter(|_| b.take()).count(), 3);
    }
}
