//! Phase 7, `forward`: send the request to the rule's backends — a backend
//! by weight, then one of its endpoints ([`crate::backend`]) — within the
//! rule's overall timeout, each attempt within its per-try timeout, and
//! retried (other endpoints first, jittered exponential backoff) as the
//! rule's retry policy says, while retries in flight stay inside the
//! waypoint's retry budget. Bodies are buffered only when a retry or a
//! mirror must send them again ([`Payload`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;
use mesh_core::model::MeshModel;
use rand::Rng;

use crate::backend::{Backends, Failure, FailureKind, RespBody};
use crate::proxy::answer::{full, Local, Record, ResponseFlag};
use crate::proxy::mirror::clone_parts;
use crate::routes::{Backend, Rule};
use crate::upstream;

/// Request bodies larger than this are not buffered for retries/mirroring.
pub const MAX_REPLAY_BODY: usize = 4 * 1024 * 1024;

/// A request body: kept whole when it may be sent more than once.
pub enum Payload {
    Buffered(Bytes),
    Streaming(upstream::Body),
}

impl Payload {
    /// Buffer `body` when `replay` (up to [`MAX_REPLAY_BODY`]; a larger
    /// one is answered 413), else stream it.
    pub async fn read<B>(body: B, replay: bool) -> Result<Payload, Local>
    where
        B: Body<Data = Bytes, Error = hyper::Error> + Send + Sync + 'static,
    {
        if !replay {
            return Ok(Payload::Streaming(body.boxed()));
        }
        match Limited::new(body, MAX_REPLAY_BODY).collect().await {
            Ok(c) => Ok(Payload::Buffered(c.to_bytes())),
            Err(e) => Err(Local::text(
                StatusCode::PAYLOAD_TOO_LARGE,
                ResponseFlag::None,
                format!("request body: {e}"),
                "request body too large to retry",
            )),
        }
    }
}

/// Requests and retries in flight: retries stay under 20 % of requests
/// (at least 10), so retries cannot snowball an outage.
#[derive(Default)]
pub struct RetryBudget {
    requests: AtomicUsize,
    retries: AtomicUsize,
}

/// Counts one in-flight request or retry until dropped (also when the
/// client goes away and the request's future is dropped).
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RetryBudget {
    /// A request has arrived.
    pub fn request(&self) -> InFlight<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.requests)
    }

    /// A retry may start, or the budget is spent.
    fn retry(&self) -> Option<InFlight<'_>> {
        let requests = self.requests.load(Ordering::Relaxed);
        if self.retries.load(Ordering::Relaxed) >= (requests / 5).max(10) {
            return None;
        }
        self.retries.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(&self.retries))
    }
}

/// Where requests go and what may be retried.
pub struct Forward<'a, B> {
    pub backends: &'a B,
    pub model: &'a MeshModel,
    pub source_ip: IpAddr,
    pub budget: &'a RetryBudget,
}

/// Pick a backend by weight.
fn weighted(backends: &[Backend]) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| b.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let mut x = rand::rng().random_range(0..total);
    backends.iter().find(|b| {
        if x < b.weight as u64 {
            true
        } else {
            x -= b.weight as u64;
            false
        }
    })
}

/// Whether the rule retries after this failure.
fn retries_failure(rule: &Rule, f: &Failure) -> bool {
    let Some(r) = &rule.retry else { return false };
    let on = match f.kind {
        FailureKind::Timeout => r.on_reset || r.on_5xx,
        FailureKind::Connect => r.on_connect_failure,
        _ => r.on_reset,
    };
    on && f.may_change()
}

impl<B: Backends> Forward<'_, B> {
    /// The upstream's response, or the answer when none can be had.
    pub async fn send(
        &self,
        rule: &Rule,
        parts: Parts,
        payload: Payload,
        rec: &mut Record,
    ) -> Result<Response<RespBody>, Local> {
        let attempts = self.attempts(rule, parts, payload, rec);
        match rule.timeout {
            Some(t) => tokio::time::timeout(t, attempts).await.unwrap_or_else(|_| {
                Err(Local::text(
                    StatusCode::GATEWAY_TIMEOUT,
                    ResponseFlag::UpstreamRequestTimeout,
                    format!("request timeout {t:?}"),
                    "upstream request timeout",
                ))
            }),
            None => attempts.await,
        }
    }

    async fn attempts(
        &self,
        rule: &Rule,
        parts: Parts,
        payload: Payload,
        rec: &mut Record,
    ) -> Result<Response<RespBody>, Local> {
        let attempts = 1 + rule.retry.as_ref().map_or(0, |r| r.attempts);
        let (buffered, mut streaming) = match payload {
            Payload::Buffered(b) => (Some(b), None),
            Payload::Streaming(s) => (None, Some(s)),
        };
        let mut tried: Vec<SocketAddr> = vec![];
        let mut last: Option<Response<RespBody>> = None;
        for attempt in 0..attempts {
            let _retry = if attempt > 0 {
                let Some(slot) = self.budget.retry() else {
                    rec.reason.push_str("; retry budget exhausted");
                    break;
                };
                let base = rule
                    .retry
                    .as_ref()
                    .map_or(Duration::from_millis(25), |r| r.backoff);
                let cap = base.saturating_mul(1 << (attempt - 1).min(6));
                let backoff = rand::rng().random_range(cap / 2..=cap);
                tokio::time::sleep(backoff).await;
                Some(slot)
            } else {
                None
            };
            let Some(backend) = weighted(&rule.backends) else {
                return Err(Local::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ResponseFlag::NoRoute,
                    "no backend with weight",
                    "no backend",
                ));
            };
            if let Some(p) = &backend.problem {
                // Gateway API: the share of requests an invalid backend
                // would get is answered with a 500.
                return Err(Local::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ResponseFlag::NoClusterFound,
                    format!("backend {}/{}: {p}", backend.namespace, backend.name),
                    "invalid backend",
                ));
            }
            let body = match (&buffered, streaming.take()) {
                (Some(b), _) => full(b.clone()),
                (None, Some(s)) => s,
                (None, None) => full(Bytes::new()),
            };
            let req = Request::from_parts(clone_parts(&parts), body);
            rec.attempts = attempt + 1;
            let once = self
                .backends
                .send(self.model, self.source_ip, backend, req, &tried);
            let result = match rule.backend_timeout {
                Some(t) => tokio::time::timeout(t, once).await.unwrap_or_else(|_| {
                    Err(Failure {
                        kind: FailureKind::Timeout,
                        reason: format!("backend request timeout {t:?}"),
                    })
                }),
                None => once.await,
            };
            let can_retry = buffered.is_some() && attempt + 1 < attempts;
            match result {
                Ok(sent) => {
                    rec.upstream = Some(sent.endpoint);
                    rec.destination_workload = Some(sent.workload);
                    tried.push(sent.endpoint);
                    let status = sent.response.status().as_u16();
                    let retry = rule
                        .retry
                        .as_ref()
                        .is_some_and(|r| r.retries_status(status));
                    if retry && can_retry {
                        rec.flags = ResponseFlag::UpstreamRetryLimitExceeded;
                        rec.reason = format!("retrying after {status}");
                        last = Some(sent.response);
                        continue;
                    }
                    if !retry && rec.flags == ResponseFlag::UpstreamRetryLimitExceeded {
                        // A retry succeeded.
                        rec.flags = ResponseFlag::None;
                        rec.reason = format!("succeeded on attempt {}", attempt + 1);
                    }
                    return Ok(sent.response);
                }
                Err(f) => {
                    if retries_failure(rule, &f) && can_retry {
                        rec.flags = ResponseFlag::UpstreamRetryLimitExceeded;
                        rec.reason = f.reason;
                        last = None;
                        continue;
                    }
                    return Err(Local::upstream(f));
                }
            }
        }
        last.ok_or_else(|| {
            Local::text(
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamRetryLimitExceeded,
                std::mem::take(&mut rec.reason),
                "upstream failed after retries",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::FailureKind::*;
    use crate::proxy::testing::{self, FakeBackends, Reply};
    use crate::routes::RetryPolicy;

    fn retrying(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            backoff: Duration::from_millis(5),
            on_5xx: true,
            on_gateway_error: false,
            on_reset: true,
            on_connect_failure: true,
            codes: vec![],
        }
    }

    struct Run {
        result: Result<Response<RespBody>, Local>,
        rec: Record,
        backends: FakeBackends,
    }

    async fn run(rule: &Rule, replies: Vec<Reply>, payload: Payload) -> Run {
        let backends = FakeBackends::replying(replies);
        let model = testing::model("");
        let budget = RetryBudget::default();
        let _req = budget.request();
        let fwd = Forward {
            backends: &backends,
            model: &model,
            source_ip: "10.0.0.9".parse().unwrap(),
            budget: &budget,
        };
        let req = Request::post("/x").body(full("")).unwrap();
        let mut rec = Record::new(&req);
        let result = fwd.send(rule, req.into_parts().0, payload, &mut rec).await;
        Run {
            result,
            rec,
            backends,
        }
    }

    fn buffered() -> Payload {
        Payload::Buffered(Bytes::from_static(b"body"))
    }

    fn status(r: &Run) -> u16 {
        match &r.result {
            Ok(resp) => resp.status().as_u16(),
            Err(l) => l.status.as_u16(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_5xx_is_retried_on_another_endpoint_and_the_success_returned() {
        let mut rule = testing::rule();
        rule.retry = Some(retrying(2));
        let r = run(
            &rule,
            vec![Reply::Status(503), Reply::Status(200)],
            buffered(),
        )
        .await;
        assert_eq!(status(&r), 200);
        assert_eq!((r.rec.attempts, r.rec.flags), (2, ResponseFlag::None));
        assert_eq!(r.rec.reason, "succeeded on attempt 2");
        let seen = r.backends.seen();
        assert_eq!(seen.len(), 2);
        // The second attempt was told to avoid the first endpoint, and got
        // the same body.
        assert_eq!(seen[1].tried, [seen[0].endpoint]);
        assert_eq!(&seen[1].body[..], b"body");
    }

    #[tokio::test(start_paused = true)]
    async fn when_retries_run_out_the_last_answer_is_returned_flagged_urx() {
        let mut rule = testing::rule();
        rule.retry = Some(retrying(2));
        let r = run(&rule, vec![Reply::Status(503); 3], buffered()).await;
        assert_eq!(status(&r), 503);
        assert_eq!(
            (r.rec.attempts, r.rec.flags),
            (3, ResponseFlag::UpstreamRetryLimitExceeded)
        );
        // Every attempt failed to connect: the last failure is the answer
        // (and all three endpoints were tried).
        let r = run(&rule, vec![Reply::Fail(Connect); 3], buffered()).await;
        let l = r.result.unwrap_err();
        assert_eq!(
            (l.status.as_u16(), l.flag),
            (503, ResponseFlag::UpstreamConnectionFailure)
        );
        assert_eq!(r.backends.seen().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn overload_and_missing_endpoints_are_not_retried() {
        let mut rule = testing::rule();
        rule.retry = Some(retrying(3));
        for (kind, flag) in [
            (Overloaded, ResponseFlag::UpstreamOverflow),
            (NoHealthyEndpoint, ResponseFlag::NoHealthyUpstream),
            (NoService, ResponseFlag::NoRoute),
        ] {
            let r = run(
                &rule,
                vec![Reply::Fail(kind), Reply::Status(200)],
                buffered(),
            )
            .await;
            let l = r.result.unwrap_err();
            assert_eq!((l.status.as_u16(), l.flag), (503, flag));
            assert_eq!(r.backends.seen().len(), 1, "{kind:?}");
        }
    }

    #[tokio::test]
    async fn without_a_retry_policy_a_reset_is_the_answer() {
        let r = run(
            &testing::rule(),
            vec![Reply::Fail(Reset), Reply::Status(200)],
            buffered(),
        )
        .await;
        let l = r.result.unwrap_err();
        assert_eq!(
            (l.status.as_u16(), l.flag),
            (503, ResponseFlag::UpstreamConnectionTermination)
        );
        assert_eq!(
            &l.body[..],
            b"upstream connect error or disconnect/reset before headers\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_is_never_sent_twice() {
        let mut rule = testing::rule();
        rule.retry = Some(retrying(2));
        let stream = Payload::Streaming(full("once"));
        let r = run(&rule, vec![Reply::Status(503), Reply::Status(200)], stream).await;
        assert_eq!(status(&r), 503);
        assert_eq!(r.backends.seen().len(), 1);
        assert_eq!(&r.backends.seen()[0].body[..], b"once");
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_timeouts_are_retried_and_the_overall_timeout_ends_it() {
        let mut rule = testing::rule();
        rule.retry = Some(retrying(1));
        rule.backend_timeout = Some(Duration::from_millis(100));
        let r = run(&rule, vec![Reply::Hang, Reply::Status(200)], buffered()).await;
        assert_eq!(status(&r), 200);
        assert_eq!(r.rec.attempts, 2);

        let mut rule = testing::rule();
        rule.timeout = Some(Duration::from_millis(300));
        let r = run(&rule, vec![Reply::Hang], buffered()).await;
        let l = r.result.unwrap_err();
        assert_eq!(
            (l.status.as_u16(), l.flag),
            (504, ResponseFlag::UpstreamRequestTimeout)
        );
        assert_eq!(&l.body[..], b"upstream request timeout\n");
    }

    #[tokio::test]
    async fn invalid_backends_get_a_500_and_weights_split_traffic() {
        let mut rule = testing::rule();
        rule.backends[0].problem = Some(mesh_core::model::gateway::BackendProblem::NotFound(
            "reviews".into(),
        ));
        let r = run(&rule, vec![], buffered()).await;
        let l = r.result.unwrap_err();
        assert_eq!(
            (l.status.as_u16(), l.flag),
            (500, ResponseFlag::NoClusterFound)
        );
        assert!(r.backends.seen().is_empty());

        let mut rule = testing::rule();
        rule.backends[0].weight = 0;
        let r = run(&rule, vec![], buffered()).await;
        assert_eq!(r.result.unwrap_err().status.as_u16(), 500);

        let mut a = testing::backend("a");
        a.weight = 3;
        let mut b = testing::backend("b");
        b.weight = 1;
        let both = [a, b];
        let to_a = (0..4000)
            .filter(|_| weighted(&both).unwrap().name == "a")
            .count();
        let share = to_a as f64 / 4000.0;
        assert!((0.70..0.80).contains(&share), "{share}");
    }

    #[test]
    fn the_retry_budget_allows_ten_or_a_fifth_of_requests() {
        let budget = RetryBudget::default();
        let _reqs: Vec<_> = (0..20).map(|_| budget.request()).collect();
        let retries: Vec<_> = (0..10).map_while(|_| budget.retry()).collect();
        assert_eq!(retries.len(), 10);
        assert!(budget.retry().is_none());
        drop(retries);
        assert!(budget.retry().is_some());
        let _more: Vec<_> = (0..80).map(|_| budget.request()).collect();
        let extra: Vec<_> = (0..30).map_while(|_| budget.retry()).collect();
        // 100 requests in flight: 20 retries.
        assert_eq!(extra.len(), 20);
    }
}
