//! Local rate limiting: token buckets per route, or per (route, source
//! identity). A request that finds its bucket empty is answered 429 with a
//! `retry-after` saying when the next token arrives. Buckets live in the
//! waypoint's memory; a rule that changes gets fresh buckets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::routes::RateLimitSpec;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// All buckets of one waypoint.
#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Upper bound of distinct buckets kept (per-source keys come from the
/// network); beyond it, full buckets are forgotten first.
const MAX_BUCKETS: usize = 100_000;

impl RateLimiter {
    /// Take a token from `key`'s bucket, or say how long until one exists.
    pub fn check(&self, key: &str, spec: &RateLimitSpec, now: Instant) -> Result<(), Duration> {
        let rate = spec.requests as f64 / spec.interval.as_secs_f64();
        let capacity = spec.burst.max(1) as f64;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.updated).as_secs_f64() * rate < capacity
            });
        }
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(capacity);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(requests: u32, burst: u32) -> RateLimitSpec {
        RateLimitSpec {
            requests,
            interval: Duration::from_secs(1),
            burst,
            per_source: false,
        }
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        let l = RateLimiter::default();
        let s = spec(10, 5);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check("r", &s, t0).is_ok());
        }
        let wait = l.check("r", &s, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // 100 ms later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.check("r", &s, t1).is_ok());
        assert!(l.check("r", &s, t1).is_err());
        // Buckets are independent.
        assert!(l.check("other", &s, t1).is_ok());
    }

    #[test]
    fn a_long_pause_refills_only_to_the_burst() {
        let l = RateLimiter::default();
        let s = spec(1, 2);
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3600);
        let allowed = (0..10).filter(|_| l.check("r", &s, later).is_ok()).count();
        assert_eq!(allowed, 2);
    }
}
