//! A connection's publish rate limit (`broker.max_publish_rate`, `max_publish_bytes_rate`):
//! token buckets that may go one publish into debt. While a bucket is in debt the connection
//! neither decodes what it already read nor reads its socket; once the bucket refilled to zero
//! it goes on. So the rate holds (bursts of at most a second's worth), nothing read is
//! dropped, and the sensor is slowed by TCP like any other backpressure.

use std::time::Duration;

use tokio::time::Instant;

/// One bucket: `rate` tokens a second, at most a second's worth held.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        let rate = rate as f64;
        Bucket { rate, tokens: rate, at: now }
    }

    fn take(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.at = now;
    }

    /// When the debt is paid; `None`: not in debt.
    fn ready_at(&self) -> Option<Instant> {
        (self.tokens < 0.0).then(|| self.at + Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Both limits of one connection; either may be absent.
#[derive(Debug)]
pub(super) struct RateLimit {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl RateLimit {
    /// `None` when neither limit is set: the connection pays nothing.
    pub(super) fn new(messages: Option<u64>, bytes: Option<u64>, now: Instant) -> Option<RateLimit> {
        (messages.is_some() || bytes.is_some()).then(|| RateLimit {
            messages: messages.map(|r| Bucket::new(r, now)),
            bytes: bytes.map(|r| Bucket::new(r, now)),
        })
    }

    /// Charges one publish of `size` bytes.
    pub(super) fn charge(&mut self, size: usize, now: Instant) {
        if let Some(b) = &mut self.messages {
            b.take(1, now);
        }
        if let Some(b) = &mut self.bytes {
            b.take(size as u64, now);
        }
    }

    /// Until when the socket must stay unread; `None`: read on.
    pub(super) fn paused_until(&self, now: Instant) -> Option<Instant> {
        let due = [&self.messages, &self.bytes].into_iter().flatten().filter_map(Bucket::ready_at).max()?;
        (due > now).then_some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_within_a_second_worth_passes_and_debt_pauses_reading() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(Some(10), None, t0).expect("a limit");
        for _ in 0..10 {
            limit.charge(100, t0);
        }
        assert_eq!(limit.paused_until(t0), None, "ten within the burst");
        limit.charge(100, t0);
        limit.charge(100, t0);
        let until = limit.paused_until(t0).expect("in debt");
        assert_eq!(until, t0 + Duration::from_millis(200), "two over at 10/s: 200 ms");
        assert_eq!(limit.paused_until(until), None);
    }

    #[test]
    fn the_slower_of_the_two_limits_decides() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(Some(1000), Some(1000), t0).expect("a limit");
        limit.charge(3000, t0);
        assert_eq!(limit.paused_until(t0), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn the_average_rate_holds_over_time() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(Some(100), None, t0).expect("a limit");
        let mut now = t0;
        let mut sent = 0u32;
        // A client that sends whenever it may, for 10 s.
        while now < t0 + Duration::from_secs(10) {
            match limit.paused_until(now) {
                Some(until) => now = until,
                None => {
                    limit.charge(10, now);
                    sent += 1;
                }
            }
        }
        // 100 of burst plus 100 a second.
        assert!((1099..=1101).contains(&sent), "{sent}");
    }

    #[test]
    fn no_limit_costs_nothing() {
        assert!(RateLimit::new(None, None, Instant::now()).is_none());
    }
}
