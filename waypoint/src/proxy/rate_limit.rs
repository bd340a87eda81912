//! Phase 3, `rate_limit`: the rule's local token bucket — per rule, or
//! per (rule, caller identity) — answered with a 429 and a `retry-after`
//! (whole seconds, at least 1) when empty, as Envoy's local rate limit
//! filter answers (`local_rate_limited`, flag `RL`).

use std::time::Instant;

use http::{HeaderValue, StatusCode};
use mesh_core::identity::SpiffeId;

use crate::proxy::answer::{Local, ResponseFlag};
use crate::ratelimit::RateLimiter;
use crate::routes::Rule;

/// Take a token for a request by `source` under `rule`, or answer 429.
pub fn check(
    limiter: &RateLimiter,
    rule: &Rule,
    source: &SpiffeId,
    now: Instant,
) -> Result<(), Local> {
    let Some(rl) = &rule.rate_limit else {
        return Ok(());
    };
    let key = if rl.per_source {
        format!("{}|{source}", rule.id)
    } else {
        rule.id.clone()
    };
    limiter.check(&key, rl, now).map_err(|wait| {
        let mut l = Local::text(
            StatusCode::TOO_MANY_REQUESTS,
            ResponseFlag::RateLimited,
            format!("rate limited ({key})"),
            "local_rate_limited",
        );
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        l.headers
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        l
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing;
    use crate::routes::RateLimitSpec;
    use std::time::Duration;

    fn limited(per_source: bool) -> Rule {
        let mut rule = testing::rule();
        rule.rate_limit = Some(RateLimitSpec {
            requests: 1,
            interval: Duration::from_secs(60),
            burst: 1,
            per_source,
        });
        rule
    }

    #[test]
    fn an_empty_bucket_answers_429_with_retry_after() {
        let (limiter, rule, now) = (RateLimiter::default(), limited(false), Instant::now());
        let alice = SpiffeId::new("cluster.local", "shop", "alice");
        let bob = SpiffeId::new("cluster.local", "shop", "bob");
        check(&limiter, &rule, &alice, now).unwrap();
        // One bucket for the rule: bob finds it empty too.
        let l = check(&limiter, &rule, &bob, now).unwrap_err();
        assert_eq!(
            (l.status, l.flag),
            (StatusCode::TOO_MANY_REQUESTS, ResponseFlag::RateLimited)
        );
        assert_eq!(l.headers.get(http::header::RETRY_AFTER).unwrap(), "60");
        assert_eq!(&l.body[..], b"local_rate_limited\n");
        // A minute later the bucket has a token again.
        check(&limiter, &rule, &bob, now + Duration::from_secs(60)).unwrap();
    }

    #[test]
    fn per_source_buckets_are_separate() {
        let (limiter, rule, now) = (RateLimiter::default(), limited(true), Instant::now());
        let alice = SpiffeId::new("cluster.local", "shop", "alice");
        let bob = SpiffeId::new("cluster.local", "shop", "bob");
        check(&limiter, &rule, &alice, now).unwrap();
        check(&limiter, &rule, &bob, now).unwrap();
        assert!(check(&limiter, &rule, &alice, now).is_err());
    }

    #[test]
    fn rules_without_a_limit_always_pass() {
        let (limiter, rule) = (RateLimiter::default(), testing::rule());
        let alice = SpiffeId::new("cluster.local", "shop", "alice");
        for _ in 0..100 {
            check(&limiter, &rule, &alice, Instant::now()).unwrap();
        }
    }
}
