//! Phase 4, `fault`: a rule's injected delay (the request waits, flag
//! `DI`) and abort (a local answer with the configured status, flag `FI`),
//! each for its percentage of requests, as Istio's fault injection does.

use http::StatusCode;
use rand::Rng;

use crate::proxy::answer::{Local, ResponseFlag};
use crate::routes::Fault;

/// True for `percent` % of calls.
pub fn chance(percent: f64) -> bool {
    percent >= 100.0 || rand::rng().random::<f64>() * 100.0 < percent
}

/// What the fault did to a request that goes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Injected {
    Nothing,
    Delayed,
}

/// Delay and/or abort per `fault`, rolling the dice with `roll`.
pub async fn inject(
    fault: Option<&Fault>,
    mut roll: impl FnMut(f64) -> bool,
) -> Result<Injected, Local> {
    let Some(f) = fault else {
        return Ok(Injected::Nothing);
    };
    let mut injected = Injected::Nothing;
    if let Some((d, pct)) = f.delay {
        if roll(pct) {
            injected = Injected::Delayed;
            tokio::time::sleep(d).await;
        }
    }
    if let Some((status, pct)) = f.abort {
        if roll(pct) {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Err(Local::text(
                status,
                ResponseFlag::FaultInjected,
                "fault injected",
                "fault filter abort",
            ));
        }
    }
    Ok(injected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fault(delay: Option<(u64, f64)>, abort: Option<(u16, f64)>) -> Fault {
        Fault {
            delay: delay.map(|(ms, p)| (Duration::from_millis(ms), p)),
            abort,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_holds_the_request_for_its_duration() {
        let t0 = tokio::time::Instant::now();
        let f = fault(Some((1500, 100.0)), None);
        assert_eq!(inject(Some(&f), chance).await.unwrap(), Injected::Delayed);
        // Paused time: it advances exactly by the sleep.
        assert_eq!(t0.elapsed(), Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn an_abort_answers_with_its_status() {
        let f = fault(None, Some((418, 100.0)));
        let l = inject(Some(&f), chance).await.unwrap_err();
        assert_eq!(
            (l.status.as_u16(), l.flag),
            (418, ResponseFlag::FaultInjected)
        );
        assert_eq!(&l.body[..], b"fault filter abort\n");
    }

    #[tokio::test(start_paused = true)]
    async fn delay_then_abort_and_percentages_are_rolled_per_fault() {
        let f = fault(Some((10, 50.0)), Some((503, 25.0)));
        let mut asked = vec![];
        let out = inject(Some(&f), |p| {
            asked.push(p);
            p > 30.0
        })
        .await;
        assert_eq!(out.unwrap(), Injected::Delayed);
        assert_eq!(asked, [50.0, 25.0]);
        // Nothing configured, nothing rolled.
        let out = inject(None, |_| panic!("no dice without a fault")).await;
        assert_eq!(out.unwrap(), Injected::Nothing);
    }

    #[test]
    fn chance_is_never_for_0_and_always_for_100() {
        assert!((0..1000).all(|_| !chance(0.0)));
        assert!((0..1000).all(|_| chance(100.0)));
    }
}
