//! What Gateway API says of an HTTPRoute, per parent: the `Accepted` and
//! `ResolvedRefs` conditions a conformant implementation writes in
//! `status.parents[]`, computed from the model alone so the waypoint
//! (which writes them in Kubernetes mode) and `analyze` (which reports the
//! False ones) say the same thing.

use serde::Serialize;

use super::gateway::HttpRoute;
use super::MeshModel;

/// One condition (`Accepted`, `ResolvedRefs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The conditions of one parent of a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParentStatus {
    /// Index into `spec.parentRefs`.
    pub index: usize,
    /// `namespace/name` of the parent Service (port when the ref names one).
    pub parent: String,
    /// A route in another namespace than its parent Service: it applies to
    /// that namespace's clients only.
    pub consumer: bool,
    pub conditions: Vec<Condition>,
}

/// The status of every parent of `r`.
pub fn conditions(m: &MeshModel, r: &HttpRoute) -> Vec<ParentStatus> {
    let route_ns = r.metadata.namespace.as_str();
    r.spec
        .parent_refs
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let ns = p.namespace.as_deref().unwrap_or(route_ns);
            let parent = match p.port {
                Some(port) => format!("{ns}/{}:{port}", p.name),
                None => format!("{ns}/{}", p.name),
            };
            let svc = m.service(ns, &p.name).filter(|_| p.is_service());
            let accepted = match svc {
                Some(s)
                    if p.port
                        .is_none_or(|port| s.ports.iter().any(|sp| sp.port == port)) =>
                {
                    Condition {
                        kind: "Accepted",
                        status: true,
                        reason: "Accepted",
                        message: "Route was valid".into(),
                    }
                }
                Some(_) => Condition {
                    kind: "Accepted",
                    status: false,
                    reason: "NoMatchingParent",
                    message: format!("service {parent} has no such port"),
                },
                None => Condition {
                    kind: "Accepted",
                    status: false,
                    reason: "NoMatchingParent",
                    message: format!("no service {ns}/{}", p.name),
                },
            };
            let problems: Vec<(usize, super::gateway::BackendProblem)> = r
                .spec
                .rules
                .iter()
                .enumerate()
                .flat_map(|(i, rule)| {
                    let mirrors = rule
                        .filters
                        .iter()
                        .filter_map(|f| f.request_mirror.as_ref().map(|x| &x.backend_ref));
                    rule.backend_refs
                        .iter()
                        .map(|b| &b.backend)
                        .chain(mirrors)
                        .map(move |b| (i, b))
                })
                .filter_map(|(i, b)| Some((i, m.backend_problem(route_ns, svc, b, p.port)?)))
                .collect();
            let resolved = match problems.first() {
                None => Condition {
                    kind: "ResolvedRefs",
                    status: true,
                    reason: "ResolvedRefs",
                    message: "All references resolved".into(),
                },
                Some((_, first)) => Condition {
                    kind: "ResolvedRefs",
                    status: false,
                    reason: first.reason(),
                    message: format!(
                        "{}; requests for these backends get 500",
                        problems
                            .iter()
                            .map(|(i, x)| format!("rules[{i}]: {x}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                },
            };
            ParentStatus {
                index,
                parent,
                consumer: ns != route_ns,
                conditions: vec![accepted, resolved],
            }
        })
        .collect()
}
