//! mesh-core: what Sluice's node agent and waypoint share — the mesh model,
//! workload identities and certificates, HBONE (HTTP/2 CONNECT over mutual
//! TLS) with its connection pool, and Istio-compatible metrics.

pub mod analyze;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod policy;
