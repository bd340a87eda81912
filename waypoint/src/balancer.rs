//! Choosing an endpoint for a request: the service's load-balancing policy
//! (round robin, least request, random, consistent hashing) over the
//! endpoints outlier detection has not ejected, preferring the waypoint's
//! own zone, then region, when locality balancing is on. Outcomes are
//! reported back so that failing endpoints are ejected for a while
//! (longer each time) and come back on their own.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::model::gateway::{parse_duration, OutlierDetection, SimpleLb};
use mesh_core::model::{MeshModel, Service, Workload};
use rand::Rng;

/// How to pick, compiled from a DestinationRule.
#[derive(Debug, Clone, Default)]
pub struct LbPolicy {
    pub simple: SimpleLb,
    /// Hash of the request's key when consistent hashing applies.
    pub hash: Option<HashOn>,
    pub locality: bool,
    pub outlier: Option<Outlier>,
    /// Circuit breaking: requests in flight to the service at once.
    pub max_requests: Option<u32>,
    /// Requests an upstream HTTP/1.1 connection carries before it is
    /// retired.
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Debug, Clone)]
pub enum HashOn {
    Header(String),
    Cookie(String),
    SourceIp,
}

#[derive(Debug, Clone)]
pub struct Outlier {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl LbPolicy {
    /// The policy of the service's DestinationRule (defaults without one).
    pub fn of(model: &MeshModel, svc: &Service) -> LbPolicy {
        let Some(dr) = model.destination_rule(svc) else {
            return LbPolicy::default();
        };
        let tp = &dr.spec.traffic_policy;
        let mut p = LbPolicy::default();
        if let Some(lb) = &tp.load_balancer {
            p.simple = lb.simple.unwrap_or_default();
            p.hash = lb.consistent_hash.as_ref().and_then(|h| {
                if let Some(name) = &h.http_header_name {
                    Some(HashOn::Header(name.to_ascii_lowercase()))
                } else if let Some(c) = &h.http_cookie {
                    Some(HashOn::Cookie(c.name.clone()))
                } else {
                    h.use_source_ip.then_some(HashOn::SourceIp)
                }
            });
            p.locality = lb.locality_lb_setting.as_ref().is_some_and(|l| l.enabled);
        }
        p.outlier = tp
            .outlier_detection
            .as_ref()
            .map(|o: &OutlierDetection| Outlier {
                consecutive_5xx: Some(o.consecutive5xx_errors.unwrap_or(5)).filter(|&n| n > 0),
                consecutive_gateway: o.consecutive_gateway_errors.filter(|&n| n > 0),
                base_ejection: o
                    .base_ejection_time
                    .as_deref()
                    .and_then(|d| parse_duration(d).ok())
                    .unwrap_or(Duration::from_secs(30)),
                max_ejection_percent: o.max_ejection_percent.unwrap_or(10),
            });
        let http = tp.connection_pool.as_ref().and_then(|c| c.http.as_ref());
        p.max_requests = http.and_then(|h| h.http2_max_requests);
        p.max_requests_per_connection = http
            .and_then(|h| h.max_requests_per_connection)
            .filter(|&n| n > 0);
        p
    }
}

#[derive(Default)]
struct EndpointState {
    in_flight: usize,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// A picked endpoint; counts as in flight until dropped.
pub struct Picked {
    pub addr: SocketAddr,
    pub workload: usize,
    service: String,
    balancer: Arc<Balancer>,
}

impl Drop for Picked {
    fn drop(&mut self) {
        let mut st = self
            .balancer
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(e) = st.endpoints.get_mut(&self.addr) {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
        if let Some(n) = st.service_in_flight.get_mut(&self.service) {
            *n = n.saturating_sub(1);
        }
    }
}

/// What happened to a request sent to an endpoint.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Status(u16),
    /// Connect failure, reset or timeout.
    Failed,
}

#[derive(Default)]
struct State {
    endpoints: HashMap<SocketAddr, EndpointState>,
    cursors: HashMap<String, usize>,
    service_in_flight: HashMap<String, usize>,
}

/// Why no endpoint was picked.
#[derive(Debug, PartialEq, Eq)]
pub enum PickError {
    NoEndpoints,
    /// The service's request limit is reached (circuit open).
    Overloaded,
}

/// Endpoint choice and health for all services of a waypoint.
#[derive(Default)]
pub struct Balancer {
    state: Mutex<State>,
}

/// Request attributes consistent hashing may use.
pub struct HashInput<'a> {
    pub headers: &'a http::HeaderMap,
    pub source_ip: std::net::IpAddr,
}

fn locality_tier(model: &MeshModel, local_node: Option<&str>, w: &Workload) -> u8 {
    let node = |name: &str| model.nodes.iter().find(|n| n.name == name);
    let (Some(me), Some(them)) = (local_node.and_then(node), node(&w.node)) else {
        return 2;
    };
    if me.region == them.region && me.zone == them.zone {
        0
    } else if me.region == them.region {
        1
    } else {
        2
    }
}

impl Balancer {
    /// Pick an endpoint of `svc` for `port`, avoiding `tried` when others
    /// exist. `local_node` is where the waypoint runs (for locality).
    #[allow(clippy::too_many_arguments)]
    pub fn pick(
        self: &Arc<Self>,
        model: &MeshModel,
        svc: &Service,
        port: u16,
        policy: &LbPolicy,
        input: &HashInput<'_>,
        local_node: Option<&str>,
        tried: &[SocketAddr],
    ) -> Result<Picked, PickError> {
        let target = svc
            .ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target())
            .unwrap_or(port);
        let key = format!("{}/{}", svc.namespace, svc.name);
        let mut candidates: Vec<(usize, SocketAddr, u8)> = model
            .service_endpoints(svc)
            .filter_map(|w| {
                let ip = w
                    .ips
                    .iter()
                    .find(|ip| ip.is_ipv4())
                    .or_else(|| w.ips.first())?;
                let idx = model.workloads.iter().position(|x| std::ptr::eq(x, w))?;
                Some((
                    idx,
                    SocketAddr::new(*ip, target),
                    locality_tier(model, local_node, w),
                ))
            })
            .collect();
        if candidates.is_empty() {
            return Err(PickError::NoEndpoints);
        }
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(max) = policy.max_requests {
            if st.service_in_flight.get(&key).copied().unwrap_or(0) >= max as usize {
                return Err(PickError::Overloaded);
            }
        }
        let healthy = |st: &State, a: &SocketAddr| {
            st.endpoints
                .get(a)
                .and_then(|e| e.ejected_until)
                .is_none_or(|t| t <= now)
        };
        // Ejected endpoints are skipped unless all are ejected (then all
        // are used: better a degraded answer than none).
        if candidates.iter().any(|(_, a, _)| healthy(&st, a)) {
            candidates.retain(|(_, a, _)| healthy(&st, a));
        }
        if candidates.iter().any(|(_, a, _)| !tried.contains(a)) {
            candidates.retain(|(_, a, _)| !tried.contains(a));
        }
        if policy.locality {
            let best = candidates.iter().map(|c| c.2).min().unwrap_or(2);
            candidates.retain(|c| c.2 == best);
        }
        let chosen = if let Some(on) = &policy.hash {
            let k = match on {
                HashOn::Header(h) => input
                    .headers
                    .get(h.as_str())
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                HashOn::Cookie(name) => cookie(input.headers, name),
                HashOn::SourceIp => Some(input.source_ip.to_string()),
            };
            match k {
                // Rendezvous hashing: stable when endpoints come and go.
                Some(k) => candidates
                    .iter()
                    .max_by_key(|(_, a, _)| {
                        let mut h = DefaultHasher::new();
                        (k.as_str(), a).hash(&mut h);
                        h.finish()
                    })
                    .copied(),
                None => candidates
                    .get(rand::rng().random_range(0..candidates.len()))
                    .copied(),
            }
        } else {
            match policy.simple {
                SimpleLb::RoundRobin => {
                    let c = st.cursors.entry(key.clone()).or_default();
                    *c = c.wrapping_add(1);
                    candidates.get(*c % candidates.len()).copied()
                }
                SimpleLb::Random => candidates
                    .get(rand::rng().random_range(0..candidates.len()))
                    .copied(),
                SimpleLb::LeastRequest => {
                    // Power of two choices, as Envoy does.
                    let mut rng = rand::rng();
                    let a = candidates[rng.random_range(0..candidates.len())];
                    let b = candidates[rng.random_range(0..candidates.len())];
                    let load = |c: &(usize, SocketAddr, u8)| {
                        st.endpoints.get(&c.1).map_or(0, |e| e.in_flight)
                    };
                    Some(if load(&b) < load(&a) { b } else { a })
                }
            }
        };
        let (workload, addr, _) = chosen.ok_or(PickError::NoEndpoints)?;
        st.endpoints.entry(addr).or_default().in_flight += 1;
        *st.service_in_flight.entry(key.clone()).or_default() += 1;
        Ok(Picked {
            addr,
            workload,
            service: key,
            balancer: self.clone(),
        })
    }

    /// Record an outcome; ejects the endpoint when outlier detection says
    /// so. Returns true when this outcome ejected it.
    pub fn report(
        &self,
        picked: &Picked,
        outcome: Outcome,
        policy: &LbPolicy,
        endpoints_in_service: usize,
    ) -> bool {
        let Some(od) = &policy.outlier else {
            return false;
        };
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ejected_now = st
            .endpoints
            .values()
            .filter(|e| e.ejected_until.is_some_and(|t| t > now))
            .count();
        let e = st.endpoints.entry(picked.addr).or_default();
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::Failed => (true, true),
        };
        e.consecutive_5xx = if is_5xx { e.consecutive_5xx + 1 } else { 0 };
        e.consecutive_gateway = if is_gateway {
            e.consecutive_gateway + 1
        } else {
            0
        };
        let trip = od.consecutive_5xx.is_some_and(|n| e.consecutive_5xx >= n)
            || od
                .consecutive_gateway
                .is_some_and(|n| e.consecutive_gateway >= n);
        let allowed =
            ((endpoints_in_service as u32 * od.max_ejection_percent) / 100).max(1) as usize;
        if trip && e.ejected_until.is_none_or(|t| t <= now) && ejected_now < allowed {
            e.ejections += 1;
            e.ejected_until = Some(now + od.base_ejection * e.ejections);
            e.consecutive_5xx = 0;
            e.consecutive_gateway = 0;
            tracing::warn!(endpoint = %picked.addr, service = %picked.service, ejections = e.ejections, "outlier detection ejected an endpoint");
            return true;
        }
        false
    }

    /// Endpoints currently ejected (for the admin dump and tests).
    pub fn ejected(&self) -> Vec<SocketAddr> {
        let now = Instant::now();
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.endpoints
            .iter()
            .filter(|(_, e)| e.ejected_until.is_some_and(|t| t > now))
            .map(|(a, _)| *a)
            .collect()
    }
}

/// A cookie's value from the `cookie` headers.
pub fn cookie(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(dr: &str) -> MeshModel {
        MeshModel::from_yaml(
            &format!(
                r#"
nodes: [{{name: a, zone: z1, region: r1}}, {{name: b, zone: z2, region: r1}}, {{name: c, zone: z9, region: r9}}]
workloads:
  - {{name: e1, namespace: s, node: a, ips: [10.0.0.1], labels: {{app: x}}}}
  - {{name: e2, namespace: s, node: b, ips: [10.0.0.2], labels: {{app: x}}}}
  - {{name: e3, namespace: s, node: c, ips: [10.0.0.3], labels: {{app: x}}}}
services:
  - {{name: x, namespace: s, ports: [{{port: 80, targetPort: 8080}}], selector: {{app: x}}}}
{dr}"#
            ),
            "t",
        )
        .unwrap()
    }

    fn picks(
        b: &Arc<Balancer>,
        m: &MeshModel,
        p: &LbPolicy,
        headers: &http::HeaderMap,
        n: usize,
    ) -> Vec<SocketAddr> {
        let svc = m.service("s", "x").unwrap();
        let input = HashInput {
            headers,
            source_ip: "10.1.1.1".parse().unwrap(),
        };
        (0..n)
            .map(|_| b.pick(m, svc, 80, p, &input, Some("a"), &[]).unwrap().addr)
            .collect()
    }

    #[test]
    fn round_robin_visits_every_endpoint_on_the_target_port() {
        let m = model("");
        let b = Arc::new(Balancer::default());
        let mut got = picks(
            &b,
            &m,
            &LbPolicy::of(&m, m.service("s", "x").unwrap()),
            &Default::default(),
            6,
        );
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|a| a.port() == 8080));
    }

    #[test]
    fn consistent_hash_sticks_to_one_endpoint_per_key() {
        let m = model(
            "destinationRules:\n  - metadata: {name: x, namespace: s}\n    spec: {host: x, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}}\n",
        );
        let p = LbPolicy::of(&m, m.service("s", "x").unwrap());
        let b = Arc::new(Balancer::default());
        let mut seen = std::collections::HashSet::new();
        for user in ["ann", "bob", "cyd", "dan", "eve", "fay"] {
            let mut h = http::HeaderMap::new();
            h.insert("x-user", user.parse().unwrap());
            let got = picks(&b, &m, &p, &h, 5);
            assert!(got.windows(2).all(|w| w[0] == w[1]), "{user}: {got:?}");
            seen.insert(got[0]);
        }
        assert!(seen.len() > 1, "all keys on one endpoint");
    }

    #[test]
    fn outliers_are_ejected_then_locality_fails_over_and_comes_back() {
        let m = model(
            "destinationRules:\n  - metadata: {name: x, namespace: s}\n    spec: {host: x.s.svc.cluster.local, trafficPolicy: {loadBalancer: {localityLbSetting: {enabled: true}}, outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 200ms, maxEjectionPercent: 100}}}\n",
        );
        let p = LbPolicy::of(&m, m.service("s", "x").unwrap());
        let b = Arc::new(Balancer::default());
        let local: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        // Same zone first.
        assert!(picks(&b, &m, &p, &Default::default(), 5)
            .iter()
            .all(|a| *a == local));
        let svc = m.service("s", "x").unwrap();
        let input = HashInput {
            headers: &Default::default(),
            source_ip: "10.1.1.1".parse().unwrap(),
        };
        for i in 0..2 {
            let pk = b.pick(&m, svc, 80, &p, &input, Some("a"), &[]).unwrap();
            assert_eq!(b.report(&pk, Outcome::Status(503), &p, 3), i == 1);
        }
        assert_eq!(b.ejected(), [local]);
        // Then the same region (zone z2), not the far one.
        let other: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        assert!(picks(&b, &m, &p, &Default::default(), 5)
            .iter()
            .all(|a| *a == other));
        std::thread::sleep(Duration::from_millis(250));
        assert!(b.ejected().is_empty());
        assert!(picks(&b, &m, &p, &Default::default(), 3)
            .iter()
            .all(|a| *a == local));
    }

    #[test]
    fn circuit_breaker_limits_requests_in_flight() {
        let m = model(
            "destinationRules:\n  - metadata: {name: x, namespace: s}\n    spec: {host: x, trafficPolicy: {connectionPool: {http: {http2MaxRequests: 2}}}}\n",
        );
        let p = LbPolicy::of(&m, m.service("s", "x").unwrap());
        let b = Arc::new(Balancer::default());
        let svc = m.service("s", "x").unwrap();
        let input = HashInput {
            headers: &Default::default(),
            source_ip: "10.1.1.1".parse().unwrap(),
        };
        let one = b.pick(&m, svc, 80, &p, &input, None, &[]).unwrap();
        let _two = b.pick(&m, svc, 80, &p, &input, None, &[]).unwrap();
        assert_eq!(
            b.pick(&m, svc, 80, &p, &input, None, &[]).err(),
            Some(PickError::Overloaded)
        );
        drop(one);
        assert!(b.pick(&m, svc, 80, &p, &input, None, &[]).is_ok());
    }
}
